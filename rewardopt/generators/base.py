"""The Generator contract: a sequential sampler p(x_{0:T} | c).

Every method talks to a generator only through this class, so one method serves every domain.
A step index ``i`` runs over ``range(len(timesteps))``; ``timesteps[i]`` is the model's own time
value (a diffusion timestep, an unmasking step, a token position).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardopt.generators.capabilities import FrozenCopy, Trainable


@dataclass
class Condition:
    """A batch of encoded conditions. ``raw`` keeps what the user passed (e.g. prompt strings) so
    rewards that need it (prompt alignment, judges) can read it; ``tensors`` holds what the model
    consumes. All tensors share the batch dimension B."""

    raw: list[Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.raw)

    def repeat_interleave(self, n: int) -> "Condition":
        """Each condition n times in a row: (B, ...) -> (B*n, ...)."""
        return Condition(
            [r for r in self.raw for _ in range(n)],
            {k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()},
        )

    def index(self, idx: torch.Tensor | Sequence[int]) -> "Condition":
        idx_list = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        t_idx = torch.as_tensor(idx_list, dtype=torch.long)
        return Condition(
            [self.raw[i] for i in idx_list],
            {k: v[t_idx.to(v.device)] for k, v in self.tensors.items()},
        )


class ComputeCounter:
    """Counts the compute a method spends: denoiser calls (NFE, per sample), reward calls (per
    sample scored) and wall time. Methods are compared at equal compute, never equal steps.

    ``nfe`` counts one per sample per denoiser evaluation (a CFG pass over a batch of B counts B,
    not 2B: the cond/uncond pair is one guided evaluation, as papers count it). ``nfe_grad``: those
    evaluated with autograd on (each is backpropagated once). ``decodes``: rows through the
    generator's ``decode`` (a VAE pass for latent diffusion; free for pixel or token states),
    ``decodes_grad`` those with autograd on. ``backward``: rows a method backpropagated through
    on its own (DPS: one per guided step, through the reward, decoder and denoiser).
    """

    FIELDS = ("nfe", "nfe_grad", "decodes", "decodes_grad", "backward", "reward_calls", "samples")

    def __init__(self) -> None:
        for k in self.FIELDS:
            setattr(self, k, 0)

    def count_decodes(self, rows: int) -> None:
        """Count ``rows`` decoded samples (generators call it from ``decode``)."""
        self.decodes += rows
        if torch.is_grad_enabled():
            self.decodes_grad += rows

    def state_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.FIELDS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


class Generator(nn.Module, ABC):
    """A sequential sampler: the core every method uses.

    Required (abstract): ``timesteps``, ``encode_condition``, ``init_state``, ``model_output``,
    ``step``, ``predict_x0``, ``decode``. Provided with defaults a subclass may override:
    ``num_steps``, ``stochastic``, ``random_init``, ``legacy_state_prefixes``, ``step_is_deterministic``, ``x0_nfe``,
    ``sample``, ``write_samples``, ``trainable_parameters`` and ``counter`` (the ``ComputeCounter``
    users read for NFE). Everything else a method may need is a declared capability
    (``rewardopt.generators.capabilities``: ``Trainable``, ``Renderable``, ``TextSerialisable``,
    ``TransitionLogProbs``, ``DeterministicStep``, ``SavesPretrained``), checked when the method is built.

    Shapes: states are (B, ...) tensors; ``decode`` returns domain samples (images (B, C, H, W) in
    [0, 1] for image generators).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counter = ComputeCounter()

    # --- schedule and states -------------------------------------------------------------
    @property
    @abstractmethod
    def timesteps(self) -> torch.Tensor:
        """The sampling schedule, first step first."""

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @abstractmethod
    def encode_condition(self, raw: Sequence[Any]) -> Condition:
        """Turn raw conditions (prompts, ...) into a ``Condition`` once per batch."""

    @abstractmethod
    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_T for each condition in ``cond`` (one sample per row)."""

    @abstractmethod
    def model_output(self, x_t: torch.Tensor, i: int, cond: Condition) -> torch.Tensor:
        """The network evaluation at step ``i`` that ``step`` and ``predict_x0`` share (one NFE per
        row; a (B, ...) tensor). Search methods compute it once per state and pass it back as
        ``out=`` so that scoring a candidate and stepping from it cost one evaluation, not two."""

    @property
    def stochastic(self) -> bool:
        """Whether ``step`` draws noise (SVDD, SMC, Free2Guide and DSearch need distinct children)."""
        return True

    #: parameter-name prefixes that older releases used, old -> new (checkpoints are renamed on load)
    legacy_state_prefixes: dict[str, str] = {}

    #: whether ``init_state`` draws randomness (continuous diffusion's x_T); masked diffusion and
    #: token LMs start from one fixed state. Free²Guide's step-0 candidates are initial noises only if so.
    random_init: bool = True

    def step_is_deterministic(self, i: int) -> bool:
        """Whether step ``i`` draws no noise, so that every child of a state is the same (a
        stochastic sampler's last step can be: DDPM, DDIM with ``set_alpha_to_one``). Search
        methods then value one child, not M."""
        return not self.stochastic

    @abstractmethod
    def step(self, x_t: torch.Tensor, i: int, cond: Condition, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """One transition x_t -> x_{t-1} at step index ``i``. Differentiable when grad is enabled.
        ``noise`` (same shape as x_t) is injected instead of drawing it, for reproducible candidates.
        ``out``: ``model_output(x_t, i, cond)`` if the caller already has it (no NFE is spent)."""

    @abstractmethod
    def predict_x0(self, x_t: torch.Tensor, i: int, cond: Condition, out: torch.Tensor | None = None) -> torch.Tensor:
        """One-shot clean estimate of x_0 from x_t (Tweedie for diffusion); ``out`` as in ``step``."""

    def x0_nfe(self, level: int) -> int:
        """NFE per row that ``predict_x0`` at ``level`` spends beyond the shared ``out`` (0 for
        diffusion's one-shot estimate; a token LM that completes x̂0 greedily spends more). The
        search methods add it to their ``expected_cost``."""
        return 0

    @abstractmethod
    def decode(self, x0: torch.Tensor) -> Any:
        """Domain samples from final states."""

    def write_samples(self, samples: Any, folder: str | os.PathLike, stem: str) -> list[Path]:
        """Save decoded samples under ``folder`` (files named from ``stem``) and return the paths:
        ``ImageSamples`` as one PNG each, ``VideoSamples`` as one GIF each (and MP4 with ffmpeg),
        ``TextSerialisable`` samples (SMILES, DNA, codec codes) as one text file with a line per sample,
        anything else as JSON lines. Domains with a medium of their own (speech: WAVs) extend this."""
        import json

        from rewardopt.generators.capabilities import ImageSamples, TextSerialisable, VideoSamples

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self, VideoSamples):
            from rewardopt.media import ffmpeg, save_gif, save_mp4

            paths = [save_gif(v, folder / f"{stem}_{j:03d}.gif", self.fps) for j, v in enumerate(samples)]
            if ffmpeg() is not None:
                paths += [save_mp4(v, folder / f"{stem}_{j:03d}.mp4", self.fps) for j, v in enumerate(samples)]
            return paths
        if isinstance(self, ImageSamples):
            from PIL import Image

            arr = (samples.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            paths = [folder / f"{stem}_{j:03d}.png" for j in range(len(arr))]
            for a, path in zip(arr, paths):
                Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(path)
            return paths
        if isinstance(self, TextSerialisable):
            path = folder / f"{stem}.txt"
            path.write_text("".join(f"{t}\n" for t in self.to_text(samples)))
            return [path]
        if isinstance(samples, torch.Tensor) and samples.ndim == 4 and samples.shape[1] in (1, 3):
            import warnings

            warnings.warn(f"{type(self).__name__}'s samples look like images but it does not declare ImageSamples "
                          "(rewardopt.generators.capabilities), so they are written as JSON lines and get no grid; "
                          "inherit ImageSamples to write PNGs", stacklevel=2)
        path = folder / f"{stem}.jsonl"
        with open(path, "w") as f:
            for s in samples:
                f.write(json.dumps(s.tolist() if isinstance(s, torch.Tensor) else s, default=str) + "\n")
        return [path]

    # --- parameters -----------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a fine-tuning method may train (LoRA adapters, or all of the denoiser)."""
        return [p for p in self.parameters() if p.requires_grad]

    # --- sampling -------------------------------------------------------------------------
    def sample(
        self,
        cond: Condition,
        *,
        generator: torch.Generator | None = None,
        grad_last_k: int | None = 0,
        x_T: torch.Tensor | None = None,
        noises: Sequence[torch.Tensor | None] | None = None,
        return_trajectory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the whole sampler from x_T to x_0.

        ``grad_last_k``: how many of the final steps run with autograd on (0: none, None: all).
        Earlier steps run under ``torch.no_grad()`` — they build no graph and store nothing — so
        the cost of DRaFT-K is T-K plain forwards plus K differentiable ones. The grad mode of the
        caller is respected: with grad disabled globally nothing is differentiable.
        """
        x = self.init_state(cond, generator) if x_T is None else x_T
        T = self.num_steps
        first_grad = 0 if grad_last_k is None else T - min(int(grad_last_k), T)
        outer = torch.is_grad_enabled()
        traj = [x] if return_trajectory else []
        for i in range(T):
            with torch.set_grad_enabled(outer and i >= first_grad):
                x = self.step(x, i, cond, noise=None if noises is None else noises[i], generator=generator)
            if return_trajectory:
                traj.append(x)
        return (x, traj) if return_trajectory else x


class FullyTrainedGenerator(FrozenCopy, Trainable, Generator):
    """A generator fine-tuned by training its whole network (``network_attr``; it has no adapters).
    With ``full_finetune`` a frozen copy of the network is kept as the pretrained model (the KL anchor,
    the reference policy); without it the network is trained with no copy (``has_base_model`` False,
    so methods refuse KL terms). Masked diffusion and token LMs use it."""

    full_finetune: bool = False

    def setup_trainable(self) -> None:
        if self.__dict__.get("_trainable_ready"):
            return
        self.requires_grad_(False)
        getattr(self, self.network_attr).requires_grad_(True)
        if self.full_finetune:
            self.freeze_copy()
        self._trainable_ready = True

    def base_model(self):
        return self.frozen_network()

    @property
    def has_base_model(self) -> bool:
        return self.has_frozen_copy

    def save_trained(self, path: str | os.PathLike) -> Path | None:
        """The whole trained model (``FrozenCopy.save_full``)."""
        return self.save_full(path)


def resolve_local_pretrained(pretrained: str, embedded: dict, marker: str, recipe: str) -> str:
    """``embedded:<name>`` -> its shipped folder (which must hold ``marker``; else: run ``recipe``),
    or an existing local folder; anything else is a FileNotFoundError naming both options."""
    import os

    if pretrained in embedded:
        path = embedded[pretrained]
        if not os.path.exists(os.path.join(path, marker)):
            raise FileNotFoundError(f"{pretrained} is not built: run `rewardopt fit --config {recipe}`")
        return str(path)
    if not os.path.isdir(pretrained):
        raise FileNotFoundError(f"pretrained={pretrained!r} is neither an embedded model ({sorted(embedded)}) "
                                "nor a folder")
    return pretrained
