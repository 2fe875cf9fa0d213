"""Score distillation: a frozen 2D diffusion prior steers a differentiable 3D scene, plus rewards on its renders.

``SDS`` (DreamFusion, Poole et al. 2022; the estimator as threestudio implements it). Each step renders B random
views x = g(θ) of the scene, encodes them (``encode_images``: the VAE, or pixels in [-1, 1]), draws
t ~ U{⌊t_min·T⌋, …, ⌊t_max·T⌋} and ε ~ N(0, I) per view, noises x_t = √ᾱ_t x + √(1-ᾱ_t) ε with the generator's
``add_noise``, and asks the frozen prior for the guided ε̂(x_t; y_view, t) (CFG, typically ~100) with the
view-dependent prompt "<prompt>, <front|side|back|overhead> view". The SDS gradient

    ∇_θ L_SDS = E_{t,ε}[ w(t) (ε̂(x_t; y, t) − ε) ∂x/∂θ ],   w(t) = 1 − ᾱ_t,

skips the UNet's Jacobian: it is applied as L = ½‖x − sg(x − w(t)(ε̂ − ε))‖² summed over pixels and averaged over the
views (threestudio's form), whose gradient w.r.t. x is exactly w(t)(ε̂ − ε) per view (÷ B). The prior is called under
``no_grad``: no activation is stored and nothing backpropagates through it (``nfe_grad`` stays 0).

Rewards (VP3D, Chen et al. CVPR 2024): any differentiable ``Reward`` on the renders adds ``− weight · reward``; VP3D
uses a human-feedback text-alignment reward and a visual-consistency reward between renders and the visual prompt.

``VPSDS`` (VP3D's visual-prompted SDS): the prior is also conditioned on a visual prompt image (an ``ImagePrompted``
generator: IP-Adapter style). The image is first generated from the text by the same prior ("text-to-image first":
the front-view prompt, sampled with the generator's own sampler and guidance), or read from ``visual_prompt`` (a path:
VP3D's stylised text-to-3D). Rewards then receive ``ImagePrompt`` conditions, so a visual-consistency reward can
compare each render with the visual prompt.

Counted compute: ``prior_nfe`` (guided prior evaluations during distillation, one per view per step: a CFG pair counts
once, as everywhere in rewardopt), ``visual_prompt_nfe`` (the text-to-image step), ``reward_calls`` per reward.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from rewardopt.generators.base import Condition, Generator
from rewardopt.generators.capabilities import EncodesImages, ImagePrompt, ImagePrompted, require
from rewardopt.generators.diffusion import DiffusionGenerator
from rewardopt.rewards.base import Reward
from rewardopt.run import RunMixin
from rewardopt.scenes import Scene, view_dependent_prompt

VIEWS = ("front", "side", "back", "overhead")


def sds_loss(x: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """½‖x − sg(x − w(ε̂ − ε))‖² summed over each row's elements and averaged over rows: d/dx = w(ε̂ − ε) / B.
    ``w``: (B,) weights; NaNs in the gradient are zeroed (threestudio's ``nan_to_num``)."""
    grad = torch.nan_to_num(w.reshape(-1, *[1] * (x.dim() - 1)) * (eps_hat - noise))
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x, target, reduction="sum") / x.shape[0]


class SDS(RunMixin, L.LightningModule):
    """Score distillation sampling of ``scene`` from the frozen ``generator``, with optional rewards on renders.

    Args:
        generator: the 2D diffusion prior (a ``DiffusionGenerator`` that ``EncodesImages``); frozen.
        scene: the differentiable scene whose parameters are trained (``rewardopt.scenes.Scene``).
        prompt: the text.
        guidance_scale: CFG during distillation (threestudio: 100); the generator's own ``guidance_scale`` is kept
            for sampling (VP-SDS's text-to-image step).
        t_range: (t_min, t_max) as fractions of the training timesteps T (DreamFusion: 0.02, 0.98).
        views_per_step: B views rendered per step.
        view_dependent: append ", <front|side|back|overhead> view" to the prompt per view.
        rewards / reward_weights: differentiable rewards on the renders and their weights (loss − weight·reward).
        sds_weight: the SDS term's weight (0: rewards only).
        lr: Adam learning rate of the scene's parameters. seed: the training noise's seed.
        eval_views: views rendered at the end for the rewards, the picture and the summary.
    """

    strict_loading = False  # checkpoints hold the scene only

    def __init__(self, generator: Generator, scene: Scene, prompt: str, guidance_scale: float = 100.0,
                 t_range: tuple[float, float] = (0.02, 0.98), views_per_step: int = 4, view_dependent: bool = True,
                 rewards: list[Reward] | None = None, reward_weights: list[float] | None = None,
                 sds_weight: float = 1.0, lr: float = 0.05, seed: int = 0, eval_views: int = 8,
                 turntable_frames: int = 24, output_dir: str | None = None) -> None:
        super().__init__()
        if not isinstance(generator, DiffusionGenerator):
            raise TypeError(f"{type(self).__name__} distils a diffusion prior (a DiffusionGenerator: add_noise, "
                            f"noise_prediction); got {type(generator).__name__}")
        require(generator, EncodesImages, type(self).__name__)
        if not isinstance(scene, Scene):
            raise TypeError(f"scene must be a rewardopt.scenes.Scene (e.g. domains.text_to_3d.scene.VoxelScene), got "
                            f"{type(scene).__name__}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        lo, hi = (float(v) for v in t_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= t_min < t_max <= 1, got {list(t_range)}")
        rewards = list(rewards or [])
        weights = [1.0] * len(rewards) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(rewards):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(rewards)} rewards")
        for r in rewards:
            if not r.differentiable:
                raise ValueError(f"reward {r.name} is not differentiable; SDS backpropagates rewards into the scene")
        if views_per_step < 1:
            raise ValueError(f"views_per_step must be >= 1, got {views_per_step}")
        generator.requires_grad_(False)
        generator.eval()
        self.generator, self.scene, self.prompt = generator, scene, prompt.strip()
        self.guidance_scale, self.views_per_step = float(guidance_scale), int(views_per_step)
        self.view_dependent, self.sds_weight, self.lr, self.seed = view_dependent, float(sds_weight), lr, seed
        self.rewards = torch.nn.ModuleList(rewards)
        self.reward_weights = weights
        self.eval_views, self.turntable_frames, self._output_dir = int(eval_views), int(turntable_frames), output_dir
        T = int(generator.scheduler.config.num_train_timesteps)
        self.t_min, self.t_max = int(lo * T), min(int(hi * T), T - 1)
        self.prior_nfe = 0
        self._cond_cache: Condition | None = None
        self._cond_cache_device: torch.device | None = None
        self._wall_offset, self._t0 = 0.0, None

    # ------------------------------------------------------------------ conditions
    def raw_condition(self, view: str) -> Any:
        """What the prior is conditioned on for one view: the (view-dependent) prompt."""
        return view_dependent_prompt(self.prompt, view) if self.view_dependent else self.prompt

    def reward_condition(self) -> Any:
        """What rewards receive for each render (the prompt without a view suffix)."""
        return self.prompt

    def view_conditions(self, names: list[str]) -> Condition:
        """The encoded conditions of views named ``names`` (each of ``VIEWS`` encoded once and indexed)."""
        if self._cond_cache is None or self._cond_cache_device != self.device:
            with torch.no_grad():
                self._cond_cache = self.generator.encode_condition([self.raw_condition(v) for v in VIEWS])
            self._cond_cache_device = self.device
        unknown = sorted(set(names) - set(VIEWS))
        if unknown:
            raise ValueError(f"the scene named views {unknown}; view-dependent prompting knows {list(VIEWS)}")
        return self._cond_cache.index([VIEWS.index(n) for n in names])

    # ------------------------------------------------------------------ the loss
    @contextmanager
    def distillation_guidance(self):
        g = self.generator
        saved, g.guidance_scale = g.guidance_scale, self.guidance_scale
        try:
            yield
        finally:
            g.guidance_scale = saved

    def distillation_terms(self, images: torch.Tensor, names: list[str], rng: torch.Generator | None) -> dict:
        """SDS on rendered ``images`` (B, 3, H, W) seen from views ``names``: the loss and what the gradient is made
        of (``t``, ``w``, ``noise``, ``eps_hat``, the encoded ``x``), for tests and logs."""
        g = self.generator
        if images.shape[-2:] != (g.height, g.width):  # threestudio renders small and resizes to the prior's size
            images = F.interpolate(images, size=(g.height, g.width), mode="bilinear", align_corners=False)
        x = g.encode_images(images)
        b = x.shape[0]
        t = torch.randint(self.t_min, self.t_max + 1, (b,), generator=rng).to(x.device)
        noise = torch.randn(x.shape, generator=rng).to(x.device, x.dtype)
        cond = self.view_conditions(names)
        with torch.no_grad(), self.distillation_guidance():
            x_t = g.add_noise(x.detach(), t, noise)
            eps_hat = g.noise_prediction(x_t, t, cond)
        self.prior_nfe += b
        w = (1 - g.alphas_cumprod[t]).to(x.dtype)
        return {"loss": sds_loss(x, eps_hat, noise, w), "t": t, "w": w, "noise": noise, "eps_hat": eps_hat, "x": x}

    def reward_terms(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(− Σ weight · mean reward, {reward name: mean reward}) on the renders."""
        loss, logs = images.new_zeros(()), {}
        conds = [self.reward_condition() for _ in range(images.shape[0])]
        for r, wgt in zip(self.rewards, self.reward_weights):
            value = r(images, conds).total.mean()
            loss = loss - wgt * value
            logs[r.name] = value.detach()
        return loss, logs

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rng = self.rank_generator(self.seed, int(self.trainer.fit_loop.epoch_loop.total_batch_idx))
        views = self.scene.random_views(self.views_per_step, rng)
        images = self.scene.render(views, generator=rng)
        loss = images.new_zeros(())
        if self.sds_weight:
            sds = self.distillation_terms(images, self.scene.view_names(views), rng)
            loss = loss + self.sds_weight * sds["loss"]
            self.log("train/sds_loss", sds["loss"].detach(), prog_bar=True)
        if len(self.rewards):
            r_loss, logs = self.reward_terms(images)
            loss = loss + r_loss
            for k, v in logs.items():
                self.log(f"train/reward/{k}", v, prog_bar=True)
        self.log("compute/prior_nfe", float(self.prior_nfe))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.scene.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self.scene).__name__} has no trainable parameters")
        return torch.optim.Adam(params, lr=self.lr)

    def train_dataloader(self):
        """One item per step (the scene draws its own views); ``trainer.max_steps`` ends the run."""
        from rewardopt.data import StepsDataModule

        return StepsDataModule().train_dataloader()

    # ------------------------------------------------------------------ runs
    def wall_time(self) -> float:
        return self._wall_offset + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"scene.{n}" for n, _ in self.scene.named_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rewardopt"] = {"prior_nfe": self.prior_nfe, "reward_calls": [r.calls for r in self.rewards],
                                   "wall": self.wall_time(), **self.extra_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint["state_dict"]
        missing = [f"scene.{n}" for n, _ in self.scene.named_parameters() if f"scene.{n}" not in saved]
        if missing:
            raise KeyError(f"the checkpoint lacks the scene weights {missing[:3]}: it was written for another scene")
        state = checkpoint.get("rewardopt", {})
        self.prior_nfe = int(state.get("prior_nfe", 0))
        for r, c in zip(self.rewards, state.get("reward_calls", [])):
            r.calls = int(c)
        self._wall_offset = float(state.get("wall", 0.0))
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def evaluation(self) -> dict[str, Any]:
        """Renders of ``eval_views`` fixed views and each reward's mean on them."""
        views = self.scene.evaluation_views(self.eval_views)
        images = self.scene.render(views)
        conds = [self.reward_condition() for _ in range(images.shape[0])]
        out = {"images": images, "rewards": {}}
        for r in self.rewards:
            calls = r.calls
            out["rewards"][r.name] = float(r(images, conds).total.mean())
            r.calls = calls  # evaluation is not charged to the run
        return out

    def on_train_end(self) -> None:
        if not self.is_global_zero():
            return
        from safetensors.torch import save_model

        from rewardopt.callbacks import save_image_grid

        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        ev = self.evaluation()
        save_model(self.scene, str(out / "scene.safetensors"))
        files = {"scene": str(out / "scene.safetensors"),
                 "views": str(save_image_grid(self.picture_rows(ev["images"]), out / "views.png",
                                              title=self.prompt))}
        try:
            files["turntable"] = str(self.scene.save_turntable(out / "turntable.gif", self.turntable_frames))
        except NotImplementedError:
            pass
        summary = {
            "method": type(self).__name__, "prompt": self.prompt, "steps": int(self.global_step),
            "views_per_step": self.views_per_step, "guidance_scale": self.guidance_scale,
            "t_range": [self.t_min, self.t_max], "prior_nfe": self.prior_nfe,
            "nfe_grad": self.generator.counter.nfe_grad,
            "reward_calls": {r.name: r.calls for r in self.rewards},
            "reward_weights": {r.name: w for r, w in zip(self.rewards, self.reward_weights)},
            "eval_rewards": ev["rewards"], "wall_time_s": round(self.wall_time(), 2), "files": files,
            **self.extra_state(),
        }
        self.print(f"[rewardopt] {type(self).__name__} '{self.prompt}': {summary['steps']} steps, prior NFE "
                   f"{self.prior_nfe}, eval rewards {ev['rewards']}")
        self.write_summary(summary)

    def picture_rows(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images]


class VPSDS(SDS):
    """VP3D's visual-prompted score distillation: ``SDS`` whose prior is also conditioned on a visual prompt image.

    Args:
        visual_prompt: a path to an image (stylised text-to-3D: the user's reference), or None to generate it from the
            text with the same prior first (the front-view prompt; the generator's own sampler and guidance).
        visual_prompt_seed: the seed of that generation.
        Other arguments: see ``SDS``.
    """

    def __init__(self, *args, visual_prompt: str | None = None, visual_prompt_seed: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        require(self.generator, ImagePrompted, type(self).__name__)
        if visual_prompt is not None and not Path(visual_prompt).is_file():
            raise FileNotFoundError(f"visual_prompt: no image at {visual_prompt!r}")
        self.visual_prompt_path, self.visual_prompt_seed = visual_prompt, int(visual_prompt_seed)
        self.visual_prompt_nfe = 0
        self.register_buffer("visual_prompt", torch.empty(0), persistent=False)

    def load_visual_prompt(self) -> torch.Tensor:
        """(3, H, W) in [0, 1] at the prior's size: the user's image, or the prior's own front view of the prompt."""
        g = self.generator
        if self.visual_prompt_path is not None:
            from PIL import Image

            from rewardopt.media import decode_image

            with Image.open(self.visual_prompt_path) as im:
                img = decode_image(im).to(self.device)
            return F.interpolate(img[None], size=(g.height, g.width), mode="bilinear", align_corners=False,
                                 antialias=True)[0].clamp(0, 1)
        before = g.counter.nfe
        with torch.no_grad():
            cond = g.encode_condition([SDS.raw_condition(self, "front")])  # the front-view prompt if view-dependent
            rng = torch.Generator().manual_seed(self.visual_prompt_seed)
            img = g.decode(g.sample(cond, generator=rng, grad_last_k=0))[0]
        self.visual_prompt_nfe += g.counter.nfe - before
        return img

    def on_fit_start(self) -> None:
        # after the strategy moved the module to its device: the text-to-image step runs where training runs
        self.ensure_visual_prompt()

    def ensure_visual_prompt(self) -> torch.Tensor:
        if self.visual_prompt.numel() == 0:
            self.visual_prompt = self.load_visual_prompt().to(self.device)
        elif self.visual_prompt.device != self.device:  # restored from a checkpoint before the move
            self.visual_prompt = self.visual_prompt.to(self.device)
        return self.visual_prompt

    def raw_condition(self, view: str) -> Any:
        return ImagePrompt(super().raw_condition(view), self.ensure_visual_prompt())

    def reward_condition(self) -> Any:
        return ImagePrompt(self.prompt, self.ensure_visual_prompt())

    def extra_state(self) -> dict[str, Any]:
        return {"visual_prompt_nfe": self.visual_prompt_nfe,
                "visual_prompt_source": self.visual_prompt_path or "generated (front view, text only)"}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.visual_prompt.numel():  # a resumed run keeps the very image (and is not charged for it again)
            checkpoint["rewardopt"]["visual_prompt"] = self.visual_prompt.detach().cpu()

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.visual_prompt_nfe = int(state.get("visual_prompt_nfe", 0))
        if isinstance(state.get("visual_prompt"), torch.Tensor):
            self.visual_prompt = state["visual_prompt"].to(self.device)

    def picture_rows(self, images: torch.Tensor) -> list[torch.Tensor]:
        vp = F.interpolate(self.visual_prompt[None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return [torch.cat([vp, images])]


__all__ = ["SDS", "VPSDS", "sds_loss", "VIEWS"]
