"""Text-to-3D recipes' own checks for tests/test_recipes.py: the SD 1.5 + IP-Adapter recipe is built with tiny local
stand-ins of the same families (an SD-layout folder with a VAE, a separate h94-layout IP-Adapter repo, a tiny CLIP and
a tiny DINOv2); every fit writes a scene, a turntable and a summary whose prior NFE is views x steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PRIOR = "domains.text_to_3d.prior.MultiViewPrior"


def _tiny_sd_and_ip_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A latent (VAE x4) tiny prior saved as an SD folder, and its IP-Adapter as an h94-layout repo beside it."""
    import torch
    from diffusers import AutoencoderKL

    from domains.images.tiny import tiny_scheduler, tiny_text_encoder, tiny_unet
    from domains.text_to_3d.prior import IP_WEIGHTS, MultiViewPrior, init_ip_adapter
    from domains.text_to_3d.tiny import MAX_TOKENS, build_tokenizer, tiny_image_encoder

    sd, repo = tmp_path / "tiny_sd", tmp_path / "tiny_ip_adapter"
    if (sd / "unet").is_dir():
        return sd, repo
    torch.manual_seed(0)
    tok = build_tokenizer()
    unet = tiny_unet(8, in_channels=4, channels=(8, 16), plain_levels=1)
    init_ip_adapter(unet, 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32)
    g = MultiViewPrior.from_components(unet, tiny_text_encoder(len(tok), max_tokens=MAX_TOKENS), tok,
                                       tiny_scheduler("epsilon"), vae=vae,
                                       image_encoder=tiny_image_encoder(32, 8, 16, projection_dim=16),
                                       height=32, width=32)
    full = tmp_path / "tiny_full"
    g.save_pretrained(full)
    shutil.copytree(full, sd, ignore=shutil.ignore_patterns("models"))
    (repo / "models").mkdir(parents=True)
    shutil.copy(full / "models" / IP_WEIGHTS, repo / "models" / "ip-adapter_sd15.safetensors")
    shutil.copytree(full / "models" / "image_encoder", repo / "models" / "image_encoder")
    return sd, repo


def stand_ins(recipe: Path, cfg, tmp_path: Path, request) -> list[str] | None:
    gen = "model.init_args.generator"
    if cfg.get(f"{gen}.class_path") != PRIOR or str(cfg.get(f"{gen}.init_args.pretrained")).startswith("embedded:"):
        return None
    from tests.super_resolution.recipe_checks import _tiny_dinov2

    sd, repo = _tiny_sd_and_ip_adapter(tmp_path)
    clip = str(request.getfixturevalue("tiny_clip_dir"))
    rewards = json.dumps([
        {"class_path": "domains.text_to_3d.rewards.TextAlignmentReward",
         "init_args": {"backend": f"clip:{clip}"}},
        {"class_path": "domains.text_to_3d.rewards.VisualConsistencyReward",
         "init_args": {"backend": f"dinov2:{_tiny_dinov2(tmp_path)}"}}])
    return ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.devices", "1",
            f"--{gen}.init_args.pretrained", str(sd), f"--{gen}.init_args.ip_adapter", str(repo),
            f"--{gen}.init_args.height", "32", f"--{gen}.init_args.width", "32", f"--{gen}.init_args.num_steps", "2",
            "--model.init_args.scene.init_args.resolution", "8", "--model.init_args.scene.init_args.render_size", "16",
            "--model.init_args.scene.init_args.num_samples", "8", "--model.init_args.rewards", rewards,
            "--trainer.default_root_dir", str(tmp_path)]


def check_built(cli) -> None:
    """The stand-in recipe holds a latent prior with the IP-Adapter loaded from the separate repo, and one SDS step
    runs through the VAE (renders upsampled to the prior's size)."""
    import torch

    m = cli.model
    g = m.generator
    assert g.vae is not None and g.has_ip_adapter and g.image_prompt_scale == 0.6
    rng = torch.Generator().manual_seed(0)
    views = m.scene.random_views(1, rng)
    images = m.scene.render(views, rng)
    terms = m.distillation_terms(images, m.scene.view_names(views), rng)
    terms["loss"].backward()
    assert terms["x"].shape == (1, 4, 8, 8) and m.scene.grid.density_raw.grad is not None
    r_loss, logs = m.reward_terms(m.scene.render(views))
    assert set(logs) == {"text_alignment", "visual_consistency"} and torch.isfinite(r_loss)


TRAINING_REPORTS = {"TinyMultiViewPriorPretraining": ("generator_fit.json", {"val/loss", "val/loss_text_only"}),
                    "AlignmentClassifierTraining": ("alignment_fit.json", {"val/acc", "val/degraded_acc"}),
                    "RenderEvaluatorTraining": ("evaluator_fit.json", {"val/acc", "val/degraded_acc"}),
                    "FeatureNetTraining": ("features_fit.json", {"val/instance_retrieval", "val/pos_cos"})}


def _check_training(run, name: str) -> None:
    """The domain's training recipes (prior, reward classifiers, evaluator) write their report and weights that load
    back through the same path the rewards and benchmark use."""
    report, keys = TRAINING_REPORTS[name]
    out = run.out
    fit = json.loads((out / report).read_text())
    assert keys <= set(fit) and fit["steps"] == run.spec.steps, fit
    if name == "TinyMultiViewPriorPretraining":
        from domains.text_to_3d.prior import MultiViewPrior

        assert MultiViewPrior(str(out), num_steps=2).has_ip_adapter  # the SD + h94 layout loads back
    else:
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def check_fit(run) -> None:
    name = type(run.cli.model).__name__
    if name in TRAINING_REPORTS:
        return _check_training(run, name)
    s = run.summary
    assert s is not None and s["prior_nfe"] == s["steps"] * s["views_per_step"] and s["nfe_grad"] == 0
    for key in ("scene", "turntable", "views"):
        assert Path(s["files"][key]).is_file(), key
    if s["method"] == "VPSDS":
        assert s["visual_prompt_nfe"] == (0 if "reference" in s["visual_prompt_source"] else
                                          run.cli.model.generator.num_steps)
