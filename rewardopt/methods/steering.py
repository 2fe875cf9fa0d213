"""What every inference-time steering method shares.

These methods never train the generator: they decide, step by step, which candidate continuation
to keep. They talk to the generator only through the ``Generator`` contract (``init_state``,
``model_output``, ``step(out=...)``, ``predict_x0(out=...)``, ``decode``), so nothing here is
specific to images.

Compute is counted exactly and compared, never assumed:

* NFE — denoiser evaluations per output sample (``generator.counter``). A candidate's value
  needs the model output at the candidate (for its x̂0), and that same output drives the next step
  if the candidate is kept, so it is computed once and passed back with ``out=``.
* reward calls — samples scored by the reward (``reward.calls``); a batch of B counts B.
* value calls — evaluations of a learned value network (SVDD-MC), counted separately.
* nfe_grad / backward — NFE run with autograd and rows backpropagated (DPS: every guided step
  backprops through the reward, the decoder and the denoiser, so its "equal NFE" costs more).
* decodes — rows through ``generator.decode`` (a VAE pass for latent diffusion: SVDD decodes every
  child's x̂0, M·T per sample; Best-of-N N), including the final decode of each output.

Each method states its analytic cost per output sample (``expected_cost``); tests check the
counters against it, and ``budget`` (NFE per output sample) picks the method's width knob — the
largest width whose cost fits — so that methods are compared at equal NFE.

``rewardopt predict --config recipes/<domain>/<method>_<reward>.yaml`` runs ``predict_step`` over
the data module's ``predict_dataloader``; the method holds the search and the counting only. Its
outputs — the samples, per-sample rewards (``rewards.csv``), a grid (``grid.png``) and
``summary.json`` in ``output_dir`` — are written, and gathered across DDP ranks, by the prediction
writer it installs (``rewardopt.writers.SteeringOutputWriter``).

Failed evaluations. The reported reward is scored once more after the search (``eval_reward``,
default: the steering reward, whose default black-box failure policy is then "exclude"). A sample
that evaluation excludes is not dropped: rewards.csv marks it (``eval_excluded``, reward -inf),
summary.json counts it (``eval_excluded``; ``reward_stats.failed`` / ``failed_frac``), and it ranks
below every valid reward in the median and top-10% mean, so a method whose outputs crash the judge
more can only look worse (``rewardopt.writers.reward_stats``; the mean is over the valid
samples). An ``eval_reward`` left at its default policy raises on a failure; a numeric
``on_failure`` is scored as that value.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning as L
import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.rewards.base import Reward
from rewardopt.run import RunMixin, derived_seed
from rewardopt.writers import SteeringOutputWriter

#: the value ``InferenceTimeSteering.score`` gives an excluded candidate (below any real reward, finite)
EXCLUDED_VALUE = -1e30


def is_excluded(values: torch.Tensor) -> torch.Tensor:
    """Which of ``score``'s values mark excluded candidates (EXCLUDED_VALUE, or -inf), as a bool tensor."""
    return values <= 0.5 * EXCLUDED_VALUE


def group_argmax(values: torch.Tensor, group: int) -> torch.Tensor:
    """Index (into the flat (B*group,) tensor) of the best entry in each consecutive group."""
    v = values.view(-1, group)
    return v.argmax(1) + torch.arange(v.shape[0], device=values.device) * group


def group_sample(values: torch.Tensor, group: int, alpha: float, rng: torch.Generator, k: int = 1,
                 replacement: bool = True) -> torch.Tensor:
    """k indices per group drawn from softmax(values / alpha) (flat indices, (B*k,)).

    Without replacement the picks are the top k of v/α + G with Gumbel noise G (Gumbel-top-k: an
    exact draw without replacement in the Plackett-Luce order, best first), in log space, so a
    softmax that underflows to exact zeros at small α cannot make later picks arbitrary. With
    replacement, k independent draws from the float64 softmax (an entry that underflows there has
    probability below 1e-300). -inf entries are never picked while a finite one is left; a group
    with none finite is drawn uniformly among all its entries (with or without replacement). NaN
    and +inf are errors (ValueError): no draw from them means anything."""
    v = values.detach().double().cpu().view(-1, group) / alpha
    if torch.isnan(v).any() or torch.isposinf(v).any():
        bad = (torch.isnan(v) | torch.isposinf(v)).flatten().nonzero().flatten().tolist()
        raise ValueError(f"group_sample: values must be finite or -inf, got NaN/+inf at flat indices {bad[:10]}")
    v = torch.where(torch.isfinite(v).any(1, keepdim=True), v, torch.zeros_like(v))  # none finite: uniform
    if replacement:
        p = torch.softmax(v, dim=1)
        idx = torch.multinomial(p, k, replacement=True, generator=rng)
    else:
        if k > group:
            raise ValueError(f"cannot draw {k} of {group} without replacement")
        u = torch.rand(v.shape, generator=rng, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
        idx = (v - torch.log(-torch.log(u))).topk(k, dim=1).indices
    return (idx + torch.arange(v.shape[0]).unsqueeze(1) * group).flatten().to(values.device)


def group_topk(values: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """The k best entries of each group, best first (flat indices, (B*k,))."""
    v = values.view(-1, group)
    idx = v.topk(k, dim=1).indices
    return (idx + torch.arange(v.shape[0], device=values.device).unsqueeze(1) * group).flatten()


def replace_worst(values: torch.Tensor, group: int, frac: float) -> torch.Tensor:
    """SVDD-R / DSearch-R replacement. Within each group of ``group`` units, the ceil(frac*group)
    lowest-valued units become copies of the highest-valued ones (worst <- best, second worst <-
    second best, ...). Returns the index that applies it, (B,)."""
    n = values.numel()
    idx = torch.arange(n, device=values.device)
    r = min(math.ceil(frac * group), group // 2) if frac > 0 else 0
    if r == 0:
        return idx
    offsets = torch.arange(n // group, device=values.device).unsqueeze(1) * group
    order = values.view(-1, group).argsort(dim=1, descending=True) + offsets
    idx[order[:, group - r:].flip(1).flatten()] = order[:, :r].flatten()
    return idx


def mean_pairwise_distance(samples: Any, group: int) -> float | None:
    """Diversity: mean RMS distance between the samples of each group (same condition), averaged
    over groups. None when samples are not tensors or groups have one member."""
    if not isinstance(samples, torch.Tensor) or group < 2:
        return None
    x = samples.detach().float().flatten(1).view(-1, group, samples[0].numel())
    d = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    off = ~torch.eye(group, dtype=torch.bool, device=d.device)
    return float(d[:, off].mean())


class InferenceTimeSteering(RunMixin, L.LightningModule):
    """Base LightningModule for inference-time methods (``predict_step`` only).

    Args:
        generator: any ``Generator``; it is frozen (nothing is trained).
        reward: the reward steered toward (black-box is fine for all but DPS).
        budget: NFE per output sample; when set, the method's width knob (``width_name``) is the
            largest whose analytic cost fits. None: use the width given.
        num_samples: outputs per condition (independent searches; SVDD-R / DSearch-R replace among them).
        seed: seed of the sampling noise; batch b on rank r uses (seed, b, r), so runs are reproducible.
        eval_reward: reward reported in rewards.csv / summary.json (default: ``reward``). Its calls
            are not charged to the method; its failures are counted and ranked last (module docstring).
        output_dir: where samples, rewards.csv, grid.png and summary.json go (default: the trainer's
            ``log_dir``: ``default_root_dir`` without a logger; ``RunMixin``).
        save_samples: write every sample (``generator.write_samples``: PNGs for images, SMILES or DNA
            as text, WAVs for speech, else JSON lines) and the grid.
        trace: keep per-step candidate values and choices in ``self.traces`` (for tests and plots).
    """

    #: the knob ``budget`` sets (e.g. "num_children"); None: the method has a fixed cost
    width_name: ClassVar[str | None] = None
    #: needs distinct children from ``step`` (a stochastic sampler)
    needs_stochastic: ClassVar[bool] = True

    def __init__(self, generator: Generator, reward: Reward, budget: int | None = None, num_samples: int = 1,
                 seed: int = 0, eval_reward: Reward | None = None, output_dir: str | None = None,
                 save_samples: bool = True, trace: bool = False) -> None:
        super().__init__()
        self.generator, self.reward = generator, reward
        if isinstance(reward, Reward):  # a black-box reward's default failure policy becomes "exclude"
            reward.for_selection()
        self.excluded_samples = self.all_excluded_groups = 0  # candidates excluded; groups where all were
        self.eval_reward = eval_reward
        generator.requires_grad_(False)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if self.needs_stochastic and not generator.stochastic:
            raise ValueError(
                f"{type(self).__name__} picks among stochastic children, but {type(generator).__name__} samples "
                "deterministically; use a stochastic sampler (DDIM with eta > 0, or sampler: ddpm)")
        self.budget, self.num_samples, self.seed = budget, num_samples, seed
        self._output_dir, self.save_samples, self.trace = output_dir, save_samples, trace
        self.traces: list[dict[str, Any]] = []
        self.value_calls = 0

    # ------------------------------------------------------------------ subclass API
    def search(self, cond: Condition, rng: torch.Generator, select_rng: torch.Generator) -> torch.Tensor:
        """Final states, one per row of ``cond``. ``rng`` draws the sampler's noise (in the same order
        as ``Generator.sample`` at width 1); ``select_rng`` draws the method's own random choices."""
        raise NotImplementedError

    def expected_cost(self) -> dict[str, int]:
        """Analytic compute per output sample, every key of ``COUNTS`` (build it with ``cost``)."""
        raise NotImplementedError

    #: what ``counts`` reads and ``expected_cost`` states, per output sample
    COUNTS: ClassVar[tuple[str, ...]] = ("nfe", "nfe_grad", "backward", "decodes", "reward_calls", "value_calls")

    @classmethod
    def cost(cls, **kw: int) -> dict[str, int]:
        """An ``expected_cost`` dict: the given counts, 0 for the others."""
        unknown = set(kw) - set(cls.COUNTS)
        if unknown:
            raise KeyError(f"unknown cost keys {sorted(unknown)}; known: {cls.COUNTS}")
        return {k: int(kw.get(k, 0)) for k in cls.COUNTS}

    def counts(self) -> dict[str, int]:
        """The counters now (generator, reward, value network), keyed as ``COUNTS``."""
        c = self.generator.counter
        return {"nfe": c.nfe, "nfe_grad": c.nfe_grad, "backward": c.backward, "decodes": c.decodes,
                "reward_calls": self.reward.calls, "value_calls": self.value_calls}

    def extra_counts(self) -> dict[str, int]:
        """Method-specific event counters (cumulative ints, e.g. SMC's dead particles); summary.json
        reports what each grew by during the predict run, summed over ranks."""
        return {}

    def branching(self, i: int, m: int) -> int:
        """Children worth drawing at step i: m, or 1 where the step draws no noise (all m children
        would be the same state; DDPM's last step, DDIM with ``set_alpha_to_one``)."""
        return 1 if m > 1 and self.generator.step_is_deterministic(i) else m

    # ------------------------------------------------------------------ budgets
    def fit_budget(self) -> None:
        """Set ``width_name`` to the largest width whose NFE per output sample is <= ``budget``."""
        if self.budget is None:
            return
        if self.width_name is None:
            raise ValueError(f"{type(self).__name__} has a fixed cost of {self.expected_cost()['nfe']} NFE per sample; "
                             "it takes no budget")
        setattr(self, self.width_name, 1)
        if self.expected_cost()["nfe"] > self.budget:
            raise ValueError(f"{type(self).__name__}: budget {self.budget} NFE per sample is below the cost of width 1 "
                             f"({self.expected_cost()['nfe']} NFE)")
        w = 1
        while True:
            setattr(self, self.width_name, w + 1)
            if self.expected_cost()["nfe"] > self.budget or w >= 100_000:
                break
            w += 1
        setattr(self, self.width_name, w)

    # ------------------------------------------------------------------ shared steps
    @property
    def T(self) -> int:
        return self.generator.num_steps

    def score(self, samples: Any, cond: Condition, group: int | None = None) -> torch.Tensor:
        """Reward of decoded samples (counted in reward.calls). A batch-relative reward (min-max or
        rank ensembles) is scored one ``group`` of competing candidates at a time, so its
        normalisation never mixes different chains' decisions.

        Excluded candidates (``RewardOutput.excluded``: a black-box failure under
        ``on_failure="exclude"``) get the value -1e30 rather than -inf: below any real reward, so
        argmax, top-k and softmax never pick one while its group (``group`` adjacent candidates; all
        if None) has a valid candidate; and finite, so that softmax and log-weights over a group whose
        candidates ALL failed stay uniform instead of NaN. Then the rule chooses among equals
        (argmax: the first candidate). ``is_excluded`` recognises the value; a method that carries
        values along a path (SMC's potentials) must not let it into arithmetic (``smc.py``: dead
        particles). Counted in ``excluded_samples`` and ``all_excluded_groups`` (summary.json:
        "excluded", "all_excluded")."""
        if group and getattr(self.reward, "batch_relative", False) and len(samples) > group:
            outs = [self.reward(samples[s:s + group], cond.raw[s:s + group]) for s in range(0, len(samples), group)]
        else:
            outs = [self.reward(samples, cond.raw)]
        v = torch.cat([o.total.detach().float() for o in outs])
        if all(o.excluded is None for o in outs):
            return v
        exc = torch.cat([o.excluded.to(v.device) if o.excluded is not None
                         else torch.zeros(len(o.total), dtype=torch.bool, device=v.device) for o in outs])
        if exc.any():
            g = group if group and len(v) % group == 0 else len(v)
            self.excluded_samples += int(exc.sum())
            self.all_excluded_groups += int(exc.view(-1, g).all(1).sum())
            v = v.masked_fill(exc, EXCLUDED_VALUE)
        return v

    def x0_cost(self, level: int, rows: int) -> int:
        """NFE that valuing ``rows`` states at ``level`` spends inside x̂0 (``Generator.x0_nfe``;
        none at the final level, where the value is the reward of the state itself)."""
        return rows * self.generator.x0_nfe(level) if level < self.T else 0

    def value(self, x: torch.Tensor, level: int, cond: Condition, out: torch.Tensor | None = None,
              group: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior-mean value of states ``x`` that have taken ``level`` steps: r(decode(x̂0(x))).
        ``group``: candidates compared with each other (adjacent), as in ``score``.

        Returns (values, model output at x) — the output is reused by the next step. At
        ``level == T`` the states are final: the value is the reward itself and no NFE is spent."""
        g = self.generator
        if level >= self.T:
            return self.score(g.decode(x), cond, group), None
        out = g.model_output(x, level, cond) if out is None else out
        return self.score(g.decode(g.predict_x0(x, level, cond, out=out)), cond, group), out

    def expand(self, x: torch.Tensor, i: int, cond: Condition, out: torch.Tensor | None, m: int,
                 rng: torch.Generator) -> torch.Tensor:
        """m stochastic children of each state (B -> B*m, children of a state adjacent)."""
        if m == 1:
            return self.generator.step(x, i, cond, generator=rng, out=out)
        rep = lambda t: None if t is None else t.repeat_interleave(m, dim=0)  # noqa: E731
        return self.generator.step(rep(x), i, cond.repeat_interleave(m), generator=rng, out=rep(out))

    def next_output(self, x: torch.Tensor, level: int, cond: Condition) -> torch.Tensor | None:
        return self.generator.model_output(x, level, cond) if level < self.T else None

    def record(self, **kw: Any) -> None:
        if self.trace:
            self.traces.append({k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                                for k, v in kw.items()})

    def tally(self) -> dict[str, int]:
        """Every counter, cumulative: ``counts()``, the candidates ``score`` excluded ("excluded") and
        the groups where all were ("all_excluded"), then ``extra_counts()``. A predict run reports
        what each grew by (``SteeringOutputWriter``)."""
        return {**self.counts(), "excluded": self.excluded_samples, "all_excluded": self.all_excluded_groups,
                **self.extra_counts()}

    # ------------------------------------------------------------------ Lightning
    def rngs(self, batch_idx: int) -> tuple[torch.Generator, torch.Generator]:
        """(sampler noise, the method's own choices) of predict batch ``batch_idx`` on this rank."""
        rank, world = self.rank_and_world()
        s = derived_seed(self.seed, batch_idx, rank, world)
        return torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 2**40)

    @torch.no_grad()
    def generate(self, raw: list[Any], batch_idx: int = 0) -> tuple[Any, torch.Tensor]:
        """(decoded samples, final states) for ``raw`` conditions, ``num_samples`` each, adjacent."""
        g = self.generator
        cond = g.encode_condition(raw).repeat_interleave(self.num_samples)
        rng, select_rng = self.rngs(batch_idx)
        x = self.search(cond, rng, select_rng)
        return g.decode(x), x

    def configure_callbacks(self) -> list[L.Callback]:
        """The output writer, unless the trainer has one already (a user's, with its own settings)."""
        if self._trainer is not None and any(isinstance(c, SteeringOutputWriter) for c in self.trainer.callbacks):
            return []
        return [SteeringOutputWriter()]

    def on_predict_start(self) -> None:
        self.traces = []
        if self.budget is not None:
            self.print(f"[rewardopt] {type(self).__name__}: budget {self.budget} NFE/sample -> {self.width_name}="
                       f"{getattr(self, self.width_name)} (expected {self.expected_cost()})")

    def predict_step(self, batch: list[Any], batch_idx: int) -> dict[str, Any]:
        """Steer ``num_samples`` samples per condition and score them with the evaluation reward (not
        charged to the method). Returns ``records`` (a dict per sample: batch, rank, condition, chain,
        reward, ``eval_excluded`` when the evaluation can fail, ``term/<name>``, and ``diversity`` on
        the first), ``conditions`` (the batch) and ``samples`` (the writer saves, then drops them)."""
        raw = list(batch)
        samples, _ = self.generate(raw, batch_idx)
        rew = self.eval_reward if self.eval_reward is not None else self.reward
        calls = rew.calls
        with torch.no_grad():
            out = rew(samples, [r for r in raw for _ in range(self.num_samples)])
        rew.calls = calls  # reporting is not charged to the method
        rank, _ = self.rank_and_world()
        records = []
        for j in range(len(raw) * self.num_samples):
            rec = {"batch": batch_idx, "rank": rank, "condition": raw[j // self.num_samples],
                   "chain": j % self.num_samples, "reward": float(out.total[j])}
            if out.excluded is not None:  # the evaluation failed (reward -inf): counted, ranked last
                rec["eval_excluded"] = int(out.excluded[j])
            rec.update({f"term/{k}": float(v[j]) for k, v in out.terms.items() if k != rew.name})
            records.append(rec)
        div = mean_pairwise_distance(samples, self.num_samples)
        if div is not None:
            records[0]["diversity"] = div
        return {"records": records, "conditions": raw, "samples": samples}
