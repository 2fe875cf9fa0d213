"""Super-resolution recipes' own checks for tests/test_recipes.py: the x4-upscaler recipe is built with a tiny local
``StableDiffusionUpscalePipeline``-layout folder, a tiny DINOv2 and folders of random images; judge recipes run
against the domain's served Hallucination Score judge; predict runs write one PNG per SR output and the oracle's HS
terms; fine-tuning runs write a diffusers-format LoRA adapter."""

from __future__ import annotations

import csv
from pathlib import Path

SR = "domains.super_resolution.upscaler.SuperResolutionGenerator"


def judge_server():
    """The offline HS judge (LR classifier + oracle network reading the LR | SR panel), served like vLLM."""
    from domains.super_resolution.judge import serve

    return serve(port=0)


def _tiny_pipeline_dir(tmp_path: Path) -> Path:
    from domains.super_resolution.tiny import build_tiny_sr_generator

    path = tmp_path / "tiny_x4"
    if not (path / "unet").is_dir():
        build_tiny_sr_generator(seed=0, size=32, vae_channels=(8, 16, 16), unet_channels=(16, 32),
                                lora_rank=None).save_pretrained(path)
    return path


def _tiny_dinov2(tmp_path: Path) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path / "tiny_dinov2"
    if not path.is_dir():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 patch_size=8, image_size=32)).save_pretrained(path)
    return path


def _images(path: Path, n: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    if not path.is_dir():
        path.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for k in range(n):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(path / f"{k}.png")
    return path


def stand_ins(recipe: Path, cfg, tmp_path: Path, request) -> list[str] | None:
    gen = "model.init_args.generator"
    if cfg.get(f"{gen}.class_path") != SR or str(cfg.get(f"{gen}.init_args.pretrained")).startswith("embedded:"):
        return None
    reward = "model.init_args.reward.init_args.backend"
    return ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.devices", "1",
            f"--{gen}.init_args.pretrained", str(_tiny_pipeline_dir(tmp_path)), f"--{gen}.init_args.num_steps", "2",
            f"--{reward}.init_args.path", str(_tiny_dinov2(tmp_path)), f"--{reward}.init_args.size", "32",
            "--data.init_args.train_dir", str(_images(tmp_path / "train")),
            "--data.init_args.val_dir", str(_images(tmp_path / "val")), "--data.init_args.hr_size", "32",
            "--trainer.default_root_dir", str(tmp_path)]


def check_built(cli) -> None:
    from rewardopt.methods.base import RewardFineTuning

    g = cli.model.generator
    assert g.vae_factor == 4 and g.noise_level == 20
    if isinstance(cli.model, RewardFineTuning):
        assert g.trainable_parameters() and cli.model.denoising_weight > 0
        batch = next(iter(cli.datamodule.train_dataloader()))
        assert batch[0]["hr"].shape == (3, 32, 32) and batch[0]["image"].shape == (3, 8, 8)


def check_predict(run) -> None:
    from PIL import Image

    s = run.summary
    if "samples" not in s:
        return
    pngs = sorted((run.out / "samples").glob("*.png"))
    assert len(pngs) == s["samples"] and Image.open(pngs[0]).size == (32, 32)
    rows = list(csv.DictReader((run.out / "rewards.csv").open()))
    assert rows and all(0 <= float(r["term/hs"]) <= 1 and r["term/flip"] in ("0.0", "1.0") for r in rows)
    assert all(float(r["reward"]) == -float(r["term/hs"]) for r in rows)  # the oracle grades, it does not steer
    assert all("tensor" not in r["condition"] for r in rows)  # conditions print as their names


def check_fit(run) -> None:
    s = run.summary
    if s is None:
        return
    if run.config("model.init_args.generator.init_args.lora_rank"):
        assert (run.out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert (run.out / "before_after.png").is_file()
