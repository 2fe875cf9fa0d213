"""Simulated raters, and a rating session that runs the private bandit against one.

Raters:
    ``RKHSFunction`` — a known f(z) = sum_i alpha_i k(z, z_i) with ||f||_H = ``norm``, so |f(z)| <= norm
        (Cauchy-Schwarz with k(z, z) = 1): the regret benchmark's ground truth (``benchmarks/dp_bandit.py``).
    ``SimulatedRater`` — a project reward as the rater's "true taste" (e.g. the shapes classifier's
        p(count = the prompt's count)), mapped to a 1-9 score as a person would give it.

The rating scale: a score s in 1..9 becomes the bandit's reward (s - 5) / 4 in [-1, 1] (``score_to_reward``),
so the reward bound is B = 1; the web page (``rewardopt.feedback.server``) uses the same map.

``SimulatedRatings`` is the rating session as a ``rewardopt predict`` run: each predict batch is a batch
of users; each user brings a prompt (drawn i.i.d. from the training prompts), the generator proposes
``candidates`` samples, the bandit chooses which one the user sees, the simulated rater scores it and the
bandit observes the score (while exploring, only the shown candidate is drawn: see ``predict_step``).
After ``explore_rounds`` ratings the bandit releases its private estimate once;
later users get its greedy choice. At the end the release is saved as a reward model
(``rewardopt.feedback.reward.PrivateRewardModel`` loads it) and ``summary.json`` reports the privacy spent,
the ratings, and how well the released model ranks fresh candidates of the held-out prompts.
(A predict run, not a fit: nothing is trained by gradient steps; the bandit chooses queries and releases
once, and the loop is the trainer's prediction loop.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from rewardopt.data import ListDataset, PromptDataModule
from rewardopt.feedback.bandit import PrivateKernelBandit
from rewardopt.feedback.kernels import KernelFeatures, RandomFourierFeatures, kernel_matrix
from rewardopt.generators.base import Generator
from rewardopt.rewards.base import Reward
from rewardopt.run import RunMixin, derived_seed


def score_to_reward(score: torch.Tensor | float) -> torch.Tensor | float:
    """A 1-9 rating -> the bandit's reward in [-1, 1]: (s - 5) / 4."""
    return (score - 5) / 4


# ----------------------------------------------------------------------------------- a known RKHS function
class RKHSFunction(nn.Module):
    """f(z) = sum_i alpha_i k(z, z_i) over ``num_centres`` random centres, scaled to ||f||_H = ``norm``
    (||f||_H^2 = alpha^T K alpha), so |f(z)| <= norm for every z.

    Args:
        in_dim: input dimension; centres are drawn N(0, centre_scale^2 I), weights alpha N(0, 1).
        lengthscale, kernel: the RKHS's kernel (``rewardopt.feedback.kernels.kernel_matrix``).
        norm: the RKHS norm of f.
        seed: fixes centres and weights.
    """

    def __init__(self, in_dim: int, num_centres: int = 16, lengthscale: float = 1.0, kernel: str = "rbf",
                 norm: float = 1.0, centre_scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(num_centres, in_dim, generator=g, dtype=torch.float64) * centre_scale
        alpha = torch.randn(num_centres, generator=g, dtype=torch.float64)
        K = kernel_matrix(centres, centres, lengthscale, kernel)
        alpha = alpha * (norm / torch.sqrt(alpha @ K @ alpha))
        self.lengthscale, self.kernel, self.norm = float(lengthscale), kernel, float(norm)
        self.register_buffer("centres", centres)
        self.register_buffer("alpha", alpha)

    @property
    def rkhs_norm(self) -> float:
        K = kernel_matrix(self.centres, self.centres, self.lengthscale, self.kernel)
        return float(torch.sqrt(self.alpha @ K @ self.alpha))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, in_dim) -> f(z) (N,)."""
        return kernel_matrix(z.to(self.centres), self.centres, self.lengthscale, self.kernel) @ self.alpha


# ----------------------------------------------------------------------------------- a project reward as taste
class SimulatedRater(nn.Module):
    """A rater whose "true taste" is a project reward: samples and prompts -> scores in 1..9.

    The reward's value r becomes u in [0, 1] — u = exp(r) for a log-probability (``transform="exp"``: the
    shapes classifier's rewards), else (r - low) / (high - low) clipped — and the score is 1 + 8u, rounded
    to an integer when ``integer`` (people give whole numbers).

    Args:
        taste: the reward (e.g. ``domains.images.rewards.ShapeAttributeReward``, by class_path in a recipe).
        transform: "exp" or "linear".
        low, high: the reward values that score 1 and 9 (``transform="linear"``).
        integer: round the score.
    """

    def __init__(self, taste: Reward, transform: str = "exp", low: float = 0.0, high: float = 1.0,
                 integer: bool = True) -> None:
        super().__init__()
        if transform not in ("exp", "linear"):
            raise ValueError(f"transform must be 'exp' or 'linear', got {transform!r}")
        if transform == "linear" and not high > low:
            raise ValueError(f"need high > low for transform='linear'; got low={low}, high={high}")
        self.taste, self.transform, self.low, self.high, self.integer = taste, transform, low, high, integer

    def utility(self, samples, prompts: Sequence[str] | None) -> torch.Tensor:
        """The taste in [0, 1] (before the 1-9 scale): (B,)."""
        with torch.no_grad():
            r = self.taste(samples, None if prompts is None else list(prompts)).total.double()
        u = r.exp() if self.transform == "exp" else (r - self.low) / (self.high - self.low)
        return u.clamp(0, 1)

    def forward(self, samples, prompts: Sequence[str] | None) -> torch.Tensor:
        """Scores (B,) in 1..9."""
        s = 1 + 8 * self.utility(samples, prompts)
        return s.round() if self.integer else s


# ----------------------------------------------------------------------------------- the rating session
class RatingRounds(L.LightningDataModule):
    """The users of a rating session: ``rounds`` prompts drawn i.i.d. (uniformly, seeded) from the training
    prompts of ``source``, in batches of ``batch_size`` (one predict batch = ``batch_size`` users); the
    held-out prompts of ``source`` evaluate the released model, ``num_eval`` candidate sets each.

    Args:
        source: any ``PromptDataModule`` (e.g. ``domains.images.data.ShapePromptDataModule``).
    """

    def __init__(self, source: PromptDataModule, rounds: int = 1024, batch_size: int = 16, num_eval: int = 4,
                 seed: int = 0) -> None:
        super().__init__()
        if rounds < 1 or batch_size < 1 or num_eval < 1:
            raise ValueError(f"rounds, batch_size and num_eval must be >= 1; got {rounds}, {batch_size}, {num_eval}")
        self.source, self.rounds, self.batch_size, self.num_eval, self.seed = source, rounds, batch_size, num_eval, seed

    @property
    def heldout_prompts(self) -> list[str]:
        return list(self.source.val_prompts)

    def prompts(self) -> list[str]:
        train = self.source.train_prompts
        g = torch.Generator().manual_seed(derived_seed(self.seed, 0))
        return [train[i] for i in torch.randint(len(train), (self.rounds,), generator=g).tolist()]

    def predict_dataloader(self):
        return torch.utils.data.DataLoader(ListDataset(self.prompts()), batch_size=self.batch_size, collate_fn=list)


class SimulatedRatings(RunMixin, L.LightningModule):
    """A private rating session against a simulated rater (``rewardopt predict``; see the module docstring).

    Args:
        generator: proposes the candidates (any ``Generator``; its decoded samples go to the embedder and rater).
        rater: the simulated person (``SimulatedRater``).
        context_embedder: prompts -> (N, dc) (``rewardopt.feedback.embed.SentenceEmbedder``).
        action_embedder: samples -> (N, da) (``rewardopt.feedback.embed.ColourLayoutEmbedder``).
        candidates: K, samples proposed per user; the bandit shows one.
        epsilon, delta, lam, explore_rounds: ``PrivateKernelBandit``'s.
        num_features, lengthscale, kernel: the random Fourier features over [context; action].
        seed: the bandit's exploration, the features' and the candidates' seed.
        noise_seed: the release noise's (``PrivateKernelBandit``): None, a secret one (the released numbers then
            vary from run to run by the noise alone); an int for a reproducible simulation.
        output_dir: where ``reward_model/`` and ``summary.json`` go (default: the trainer's folder).
    """

    default_output_dir = "runs/feedback/private_reward_tiny"

    def __init__(self, generator: Generator, rater: SimulatedRater, context_embedder: nn.Module,
                 action_embedder: nn.Module, candidates: int = 4, epsilon: float = 1.0, delta: float = 1e-5,
                 lam: float = 1.0, explore_rounds: int = 1024, num_features: int = 256, lengthscale: float = 1.0,
                 kernel: str = "rbf", seed: int = 0, noise_seed: int | None = None,
                 output_dir: str | None = None) -> None:
        super().__init__()
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.generator, self.rater = generator, rater
        self.context_embedder, self.action_embedder = context_embedder, action_embedder
        self.candidates, self.seed, self._output_dir = candidates, seed, output_dir
        in_dim = context_embedder.dim + action_embedder.dim
        features: KernelFeatures = RandomFourierFeatures(in_dim, num_features, lengthscale, kernel, seed=seed)
        self.bandit = PrivateKernelBandit(features, epsilon, delta, reward_bound=1.0, lam=lam,
                                          explore_rounds=explore_rounds, seed=seed, noise_seed=noise_seed)
        self.log_rounds: list[dict] = []
        self._start = time.perf_counter()

    def on_predict_start(self) -> None:
        if self.rank_and_world()[1] > 1:
            raise RuntimeError("SimulatedRatings is one sequential session (the bandit's rounds are ordered); "
                               "run it on one device (trainer.devices=1)")
        self._start = time.perf_counter()

    def propose(self, prompts: list[str], index: int, k: int | None = None) -> torch.Tensor:
        """k (default ``candidates``) decoded candidates per prompt, (len(prompts) * k, ...), prompt-major."""
        g, k = self.generator, k or self.candidates
        with torch.no_grad():
            cond = g.encode_condition(prompts).repeat_interleave(k)
            x = g.sample(cond, generator=self.rank_generator(self.seed, index))
            return g.decode(x)

    def predict_step(self, batch: list[str], batch_idx: int):
        b = self.bandit
        n = 0 if b.released else min(len(batch), b.explore_rounds - b.t)
        if n:
            # Exploring users: the bandit's choice is uniform over K i.i.d. candidates, independent of them, so
            # the candidate shown is distributed as one fresh sample — only that one is drawn (K times less
            # compute; a real rating page draws all K, see rewardopt.feedback.server).
            samples = self.propose(batch[:n], batch_idx, k=1)
            ctx = self.context_embedder(batch[:n])
            acts = self.action_embedder(samples).detach()
            scores = self.rater(samples, batch[:n])
            b.observe_batch(ctx, acts, score_to_reward(scores))
            self.log_rounds += [{"t": b.t - n + i + 1, "score": float(v), "greedy": False}
                                for i, v in enumerate(scores.tolist())]
        rest = batch[n:]
        if not rest:
            return None
        K = self.candidates
        samples = self.propose(rest, batch_idx + 10**6)  # a stream of its own: the greedy users' candidates
        ctx = self.context_embedder(rest)
        acts = self.action_embedder(samples).detach()
        for i, prompt in enumerate(rest):
            cand = samples[i * K:(i + 1) * K]
            j = b.select(ctx[i], acts[i * K:(i + 1) * K])[0]
            score = float(self.rater(cand[j:j + 1], [prompt])[0])
            b.observe(ctx[i], acts[i * K + j], score_to_reward(score))
            # for the report only: the rater's taste of every candidate (a simulation may peek)
            u = self.rater.utility(cand, [prompt] * K)
            self.log_rounds.append({"t": b.t, "score": score, "greedy": True, "regret": float(u.max() - u[j]),
                                    "random_regret": float(u.max() - u.mean())})
        return None

    def on_predict_end(self) -> None:
        from rewardopt.feedback.reward import save_release

        if not self.bandit.released:  # fewer users than explore_rounds: release what there is
            self.bandit.release()
        heldout = self.heldout_evaluation()
        if not self.is_global_zero():
            return
        folder = save_release(self.output_dir / "reward_model", self.bandit, self.context_embedder,
                              self.action_embedder, extra={"rater": type(self.rater.taste).__name__})
        explore = [r["score"] for r in self.log_rounds if not r["greedy"]]
        greedy = [r for r in self.log_rounds if r["greedy"]]
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
        summary = {
            "method": type(self).__name__, "users": self.bandit.t, "explore_rounds": self.bandit.explore_rounds,
            "observations_released": self.bandit._n, "candidates": self.candidates,
            "privacy": self.bandit.accountant.record(self.bandit.delta),
            "sigma": self.bandit.sigma, "sensitivity": self.bandit.sensitivity, "lambda": self.bandit.lam,
            # raw statistics of the simulated raters' scores: NOT covered by the privacy record (fine for a
            # simulation; a deployment must not publish such numbers)
            "non_private_diagnostics": {
                "mean_score_exploring": mean(explore), "mean_score_greedy": mean([r["score"] for r in greedy]),
                "greedy_regret": mean([r["regret"] for r in greedy]),
                "random_regret_same_rounds": mean([r["random_regret"] for r in greedy])},
            "heldout": heldout, "reward_model": str(folder), "wall_time_s": time.perf_counter() - self._start,
        }
        self.write_summary(summary)

    def heldout_evaluation(self) -> dict:
        """The released model on fresh candidates of every held-out prompt (``num_eval`` sets each): its
        simple regret in the rater's taste (0-1) next to a random choice's, and its correlation with the taste."""
        dm = self.trainer.datamodule
        prompts = [p for p in dm.heldout_prompts for _ in range(dm.num_eval)]
        K = self.candidates
        regrets, randoms, preds, tastes = [], [], [], []
        for start in range(0, len(prompts), 16):
            batch = prompts[start:start + 16]
            samples = self.propose(batch, 10**7 + start)  # streams apart from the session's
            ctx = self.context_embedder(batch)
            acts = self.action_embedder(samples).detach()
            u = self.rater.utility(samples, [p for p in batch for _ in range(K)]).view(len(batch), K)
            with torch.no_grad():
                pred = torch.stack([self.bandit.predict(ctx[i], acts[i * K:(i + 1) * K]) for i in range(len(batch))])
            for i in range(len(batch)):
                chosen = int(pred[i].argmax())
                regrets.append(float(u[i].max() - u[i, chosen]))
                randoms.append(float(u[i].max() - u[i].mean()))
            preds.append(pred.flatten().double())
            tastes.append(u.flatten())
        p, t = torch.cat(preds), torch.cat(tastes)
        corr = float(torch.corrcoef(torch.stack([p, t]))[0, 1]) if p.std() > 0 and t.std() > 0 else 0.0
        return {"prompts": len(dm.heldout_prompts), "sets": len(prompts), "greedy_regret": sum(regrets) / len(regrets),
                "random_regret": sum(randoms) / len(randoms), "pearson": corr if math.isfinite(corr) else 0.0}
