"""Video recipes' own checks for tests/test_recipes.py: full-size (zeroscope / ModelScope) recipes are built
with a tiny local ``TextToVideoSDPipeline``-layout folder and tiny CLIP; judge recipes run against the video
domain's trained grid judge behind its OpenAI-compatible server; steering runs write one GIF per sample and a
key-frame grid; fine-tuning runs write before | after GIFs and a peft-format adapter."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

T2V = "domains.video.text_to_video.TextToVideoGenerator"


def judge_server():
    """The grid-reading judge the video domain trains, served like vLLM (answers "Reasoning: ... Answer: N")."""
    from domains.video.judge import serve

    return serve(port=0)


def tiny_pipeline_dir(tmp_path: Path) -> Path:
    """A tiny random model in the TextToVideoSDPipeline folder layout (no VAE: pixel space, 16 px)."""
    from domains.video.tiny import build_tiny_video_generator

    path = tmp_path / "tiny_t2v"
    if not (path / "unet").is_dir():
        build_tiny_video_generator(seed=0, size=16, frames=4, channels=(8, 16), lora_rank=None).save_pretrained(path)
    return path


def _clip(reward: dict, clip: str) -> None:
    """Point every CLIPScoreReward in a (nested) reward config at the tiny CLIP folder."""
    if reward.get("class_path", "").endswith("CLIPScoreReward"):
        reward.setdefault("init_args", {}).update(clip_model=clip, tokenizer=clip)
    for v in (reward.get("init_args") or {}).values():
        if isinstance(v, dict):
            if "class_path" in v:
                _clip(v, clip)
            else:
                for m in v.values():
                    if isinstance(m, dict) and "class_path" in m:
                        _clip(m, clip)


def stand_ins(recipe: Path, cfg, tmp_path: Path, request) -> list[str] | None:
    gen = "model.init_args.generator"
    if cfg.get(f"{gen}.class_path") != T2V or str(cfg.get(f"{gen}.init_args.pretrained")).startswith("embedded:"):
        return None
    args = ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.devices", "1",
            f"--{gen}.init_args.pretrained", str(tiny_pipeline_dir(tmp_path)), f"--{gen}.init_args.num_frames", "4",
            f"--{gen}.init_args.height", "16", f"--{gen}.init_args.width", "16", f"--{gen}.init_args.num_steps", "2",
            "--trainer.default_root_dir", str(tmp_path)]
    if "model.init_args.budget" in cfg and cfg.get("model.init_args.budget") is not None:
        args += ["--model.init_args.budget", "8"]
    if cfg.get("model.init_args.guide_steps", 0) is None or isinstance(cfg.get("model.init_args.guide_steps"), int):
        args += ["--model.init_args.guide_steps", "1"]
    reward = yaml.safe_load(recipe.read_text())["model"]["init_args"]["reward"]
    clip = str(request.getfixturevalue("tiny_clip_dir"))
    _clip(reward, clip)
    args += ["--model.init_args.reward", json.dumps(reward)]
    return args


def check_built(cli) -> None:
    from rewardopt.methods.base import RewardFineTuning

    assert cli.model.generator.num_frames == 4
    if isinstance(cli.model, RewardFineTuning):
        assert cli.model.generator.trainable_parameters()


def check_predict(run) -> None:
    from PIL import Image

    s = run.summary
    if "samples" not in s:
        return
    gifs = sorted((run.out / "samples").glob("*.gif"))
    assert len(gifs) == s["samples"]
    frames = run.config("model.init_args.generator.init_args.num_frames")
    assert all(Image.open(p).n_frames == frames for p in gifs)
    assert (run.out / "grid.png").is_file()


def check_fit(run) -> None:
    from PIL import Image

    s = run.summary
    if s is None:
        return
    if run.config("model.init_args.generator.init_args.lora_rank"):
        assert (run.out / "adapter" / "adapter_model.safetensors").is_file()
    gifs = sorted((run.out / "before_after").glob("*.gif"))
    assert gifs and (run.out / "before_after.png").is_file()
    assert Image.open(gifs[0]).n_frames == run.config("model.init_args.generator.init_args.num_frames")
