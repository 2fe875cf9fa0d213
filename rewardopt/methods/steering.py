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
the data module's ``predict_dataloader`` and writes, into ``output_dir``: the samples, per-sample
rewards (``rewards.csv``), a grid (``grid.png``, for images) and ``summary.json``.

Failed evaluations. The reported reward is scored once more after the search (``eval_reward``,
default: the steering reward, whose default black-box failure policy is then "exclude"). A sample
that evaluation excludes is not dropped: rewards.csv marks it (``eval_excluded``, reward -inf),
summary.json counts it (``eval_excluded``; ``reward_stats.failed`` / ``failed_frac``), and it ranks
below every valid reward in the median and top-10% mean, so a method whose outputs crash the judge
more can only look worse (``reward_stats``; the mean is over the valid samples). An ``eval_reward``
left at its default policy raises on a failure; a numeric ``on_failure`` is scored as that value.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from rewardopt.generators.base import Condition, Generator
from rewardopt.rewards.base import Reward


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
    order = values.view(-1, group).argsort(dim=1, descending=True) + torch.arange(n // group, device=values.device).unsqueeze(1) * group
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


def reward_stats(values: torch.Tensor, failed: torch.Tensor | None = None) -> dict[str, float | int | None]:
    """Mean, median and top-10% mean (the SVDD paper's table columns) of per-sample rewards (n,).

    ``failed`` (n,) bool marks evaluations that failed (an excluded sample; its value is ignored).
    They rank below every valid reward in the median and the top-10% mean (over all n samples), so a
    failure can only lower those — a method whose outputs crash the judge more cannot look better —
    and a statistic that lands on a failure is None. The mean is over the valid samples (None if
    none is). ``failed`` / ``failed_frac`` give the count and fraction next to them, so every table
    row shows them."""
    v = values.detach().double().cpu().flatten()
    bad = torch.zeros_like(v, dtype=torch.bool) if failed is None else failed.detach().cpu().flatten().bool()
    n, nf = v.numel(), int(bad.sum())
    ranked = v.masked_fill(bad, float("-inf")).float()
    k = max(1, math.ceil(0.1 * n))
    med, top = float(ranked.median()), float(ranked.topk(k).values.mean())
    fin = lambda x: x if math.isfinite(x) else None  # noqa: E731
    return {"mean": float(v[~bad].float().mean()) if nf < n else None, "median": fin(med), "top10": fin(top),
            "failed": nf, "failed_frac": nf / max(n, 1)}


class InferenceTimeSteering(L.LightningModule):
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
        output_dir: where samples, rewards.csv and summary.json go (default: trainer.default_root_dir).
        save_samples: write every sample (PNG for images, JSON lines otherwise).
        trace: keep per-step candidate values and choices in ``self.traces`` (for tests and plots).
    """

    #: the knob ``budget`` sets (e.g. "num_children"); None: the method has a fixed cost
    width_name: ClassVar[str | None] = None
    #: needs distinct children from ``step`` (a stochastic sampler)
    needs_stochastic: ClassVar[bool] = True

    def __init__(self, generator: Generator, reward: Reward, budget: int | None = None, num_samples: int = 1, seed: int = 0,
                 eval_reward: Reward | None = None, output_dir: str | None = None, save_samples: bool = True,
                 trace: bool = False) -> None:
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
        self._records: list[dict[str, Any]] = []
        self._grid_samples: list[Any] = []
        self._wall = 0.0

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
            self.traces.append({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    # ------------------------------------------------------------------ Lightning
    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)

    def rngs(self, batch_idx: int) -> tuple[torch.Generator, torch.Generator]:
        rank, world = self._rank()
        s = self.seed * 1_000_003 + batch_idx * world + rank
        return torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 2**40)

    @torch.no_grad()
    def generate(self, raw: list[Any], batch_idx: int = 0) -> tuple[Any, torch.Tensor]:
        """(decoded samples, final states) for ``raw`` conditions, ``num_samples`` each, adjacent."""
        g = self.generator
        cond = g.encode_condition(raw).repeat_interleave(self.num_samples)
        rng, select_rng = self.rngs(batch_idx)
        x = self.search(cond, rng, select_rng)
        return g.decode(x), x

    def on_predict_start(self) -> None:
        self._records, self._grid_samples, self.traces = [], [], []
        self._counts0, self._extra0 = self.counts(), self.extra_counts()
        self._t0 = time.perf_counter()
        if self.budget is not None:
            self.print(f"[rewardopt] {type(self).__name__}: budget {self.budget} NFE/sample -> {self.width_name}="
                       f"{getattr(self, self.width_name)} (expected {self.expected_cost()})")

    def predict_step(self, batch: list[Any], batch_idx: int) -> dict[str, Any]:
        raw = list(batch)
        samples, _ = self.generate(raw, batch_idx)
        rew = self.eval_reward if self.eval_reward is not None else self.reward
        calls = rew.calls
        with torch.no_grad():
            out = rew(samples, [r for r in raw for _ in range(self.num_samples)])
        rew.calls = calls  # reporting is not charged to the method
        rank, world = self._rank()
        base = len(self._records)
        for j in range(len(raw) * self.num_samples):
            rec = {"batch": batch_idx, "rank": rank, "condition": raw[j // self.num_samples], "chain": j % self.num_samples,
                   "reward": float(out.total[j])}
            if out.excluded is not None:  # the evaluation failed (reward -inf): counted, ranked last
                rec["eval_excluded"] = int(out.excluded[j])
            rec.update({f"term/{k}": float(v[j]) for k, v in out.terms.items() if k != rew.name})
            self._records.append(rec)
        div = mean_pairwise_distance(samples, self.num_samples)
        if div is not None:
            self._records[base]["diversity"] = div
        if self.save_samples:
            self._save(samples, batch_idx, rank)
            self._collect_grid(raw, samples, out.total.tolist())
        return out.total.detach().cpu()  # small: samples are on disk, not held in memory

    def _collect_grid(self, raw: list[Any], samples: Any, totals: list[float], rows: int = 6) -> None:
        """Keep up to ``rows`` grid rows of pictures (``generator.render``): one row per condition, or
        for unconditional samples rows of up to 6 samples."""
        n = self.num_samples
        if all(r is None for r in raw):
            start = 0
            if self._grid_samples and len(self._grid_samples[-1][1]) < 6:  # top up the last row first
                label, pics, vals = self._grid_samples[-1]
                start = 6 - len(pics)
                more = self.generator.render(samples[:start])
                if more is None:
                    return
                self._grid_samples[-1] = (label, torch.cat([pics, more.cpu()]), vals + totals[:start])
            groups = [("", slice(k, min(k + 6, len(totals)))) for k in range(start, len(totals), 6)]
        else:
            groups = [(str(raw[j]), slice(j * n, (j + 1) * n)) for j in range(len(raw))]
        for label, sl in groups[: max(0, rows - len(self._grid_samples))]:
            pictures = self.generator.render(samples[sl])
            if pictures is None:
                return
            self._grid_samples.append((label, pictures.cpu(), totals[sl]))

    def _save(self, samples: Any, batch_idx: int, rank: int) -> None:
        self.generator.write_samples(samples, self.output_dir / "samples", f"r{rank}_b{batch_idx:05d}")

    @property
    def output_dir(self) -> Path:
        if self._output_dir:
            return Path(self._output_dir)
        if self._trainer is not None and self.trainer.default_root_dir:
            return Path(self.trainer.default_root_dir)
        return Path("runs/unnamed")

    def on_predict_end(self) -> None:
        now = self.counts()
        local = {"records": self._records, "wall": time.perf_counter() - self._t0,
                 **{k: now[k] - self._counts0[k] for k in self.COUNTS}}
        local["excluded"], local["all_excluded"] = self.excluded_samples, self.all_excluded_groups
        local["extra"] = {k: v - self._extra0.get(k, 0) for k, v in self.extra_counts().items()}
        self.excluded_samples = self.all_excluded_groups = 0  # counted per predict run
        rank, world = self._rank()
        parts = [local]
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, local)
        if rank != 0:
            return
        records = [r for p in parts for r in p["records"]]
        n = len(records)
        totals = {k: sum(p[k] for p in parts) for k in self.COUNTS}
        values = torch.tensor([r["reward"] for r in records])
        eval_failed = torch.tensor([bool(r.get("eval_excluded", 0)) for r in records], dtype=torch.bool)
        eval_failed |= ~values.isfinite()
        divs = [r["diversity"] for r in records if "diversity" in r]
        summary = {
            "method": type(self).__name__,
            "reward": (self.eval_reward or self.reward).name,
            "steered_by": self.reward.name,
            "budget": self.budget,
            "width": {self.width_name: getattr(self, self.width_name)} if self.width_name else None,
            "num_steps": self.T,
            "samples": n,
            "reward_stats": reward_stats(values, eval_failed) if n else None,
            # evaluations that failed (excluded by the evaluation reward): ranked last in reward_stats
            "eval_excluded": int(eval_failed.sum()),
            "diversity": sum(divs) / len(divs) if divs else None,
            **totals, **{f"{k}_per_sample": v / max(n, 1) for k, v in totals.items()},
            "expected_cost_per_sample": self.expected_cost(),
            "wall_time_s": round(max(p["wall"] for p in parts), 2),
            "world_size": world,
            # candidates never selected (black-box failures under on_failure: exclude), and the groups
            # whose candidates all failed (the first was kept)
            "excluded": sum(p["excluded"] for p in parts), "all_excluded": sum(p["all_excluded"] for p in parts),
            **{k: sum(p["extra"][k] for p in parts) for k in parts[0]["extra"]},
        }
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in records for k in r}, key=lambda k: (k not in ("rank", "batch", "chain", "condition", "reward"), k))
        with open(out / "rewards.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(records)
        if self._grid_samples:
            from rewardopt.callbacks import save_image_grid

            rows = [s for _, s, _ in self._grid_samples]
            save_image_grid(rows, out / "grid.png", row_labels=[p for p, _, _ in self._grid_samples],
                            cell_labels=[[f"{v:.2f}" for v in r] for _, _, r in self._grid_samples], title=f"{type(self).__name__} ({self.reward.name}), "
                            f"{self.num_samples} per prompt, {summary['nfe_per_sample']:.0f} NFE/sample")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        st = summary["reward_stats"] or {}
        num = lambda x: float("nan") if x is None else x  # noqa: E731
        failed = f" ({summary['eval_excluded']} evaluations failed, ranked last)" if summary["eval_excluded"] else ""
        self.print(f"[rewardopt] {type(self).__name__}: {n} samples, reward median {num(st.get('median')):.4f} "
                   f"top-10% {num(st.get('top10')):.4f}{failed}, NFE/sample {summary['nfe_per_sample']:.1f}, "
                   f"reward calls/sample {summary['reward_calls_per_sample']:.1f}")
        self.print(f"[rewardopt] summary: {out / 'summary.json'}")
