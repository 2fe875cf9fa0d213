"""Image recipes' own checks for tests/test_recipes.py: full-size (SD 1.5) recipes are built with tiny
local stand-ins of the same model families; steering runs write one PNG per sample and a grid;
LoRA fine-tuning runs write a diffusers-loadable adapter."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import aesthetic_stand_in_args

SD = "domains.images.stable_diffusion.StableDiffusionGenerator"


def stand_ins(recipe: Path, cfg, tmp_path: Path, request) -> list[str] | None:
    """CLI overrides that swap a recipe's hub downloads for tiny local models (None: nothing to swap)."""
    from tests.images.tiny_flow import STAND_INS as FLOW_STAND_INS
    from tests.images.tiny_flow import T5_TOKENS, stand_in_folder

    gen = "model.init_args.generator"
    class_path = cfg.get(f"{gen}.class_path")
    if class_path in FLOW_STAND_INS:  # SD3 / FLUX: a tiny folder of the family, weights in float32
        tiny = stand_in_folder(class_path, tmp_path / "tiny_flow")
        args = [f"--{gen}.init_args.max_sequence_length", str(T5_TOKENS), f"--{gen}.init_args.dtype", "float32"]
    elif class_path != SD or str(cfg.get(f"{gen}.init_args.pretrained")).startswith("embedded:"):
        return None
    else:
        tiny, args = str(request.getfixturevalue("tiny_model_dir")), []
    args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.devices", "1",
             f"--{gen}.init_args.pretrained", tiny,
             f"--{gen}.init_args.height", "16", f"--{gen}.init_args.width", "16", f"--{gen}.init_args.num_steps", "2",
             "--trainer.default_root_dir", str(tmp_path)]
    if cfg.get("trainer.logger") not in (None, False, True):
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    if "model.init_args.budget" in cfg:
        args += ["--model.init_args.budget", "8"]
    if isinstance(cfg.get("model.init_args.guide_steps"), int):  # Free2Guide's guided steps, within the 2
        args += ["--model.init_args.guide_steps", "1"]
    if isinstance(cfg.get("model.init_args.steps_per_rollout"), int):  # VARD's differentiable steps, within the 2
        args += ["--model.init_args.steps_per_rollout", "1"]
    reward = cfg.get("model.init_args.reward.class_path", "")
    if reward.endswith("AestheticReward"):
        args += aesthetic_stand_in_args(tmp_path)
    if reward.endswith("CLIPScoreReward"):
        clip = str(request.getfixturevalue("tiny_clip_dir"))
        args += ["--model.init_args.reward.init_args.clip_model", clip,
                 "--model.init_args.reward.init_args.tokenizer", clip]
    if reward.endswith("WeightedSum"):  # a judge (HTTP: nothing to download) and a CLIP score
        clip = str(request.getfixturevalue("tiny_clip_dir"))
        rewards = yaml.safe_load(recipe.read_text())["model"]["init_args"]["reward"]["init_args"]["rewards"]
        for r in rewards.values():
            if r["class_path"].endswith("CLIPScoreReward"):
                r.setdefault("init_args", {}).update(clip_model=clip, tokenizer=clip)
        args += ["--model.init_args.reward.init_args.rewards", json.dumps(rewards)]
    return args


def check_built(cli) -> None:
    from rewardopt.methods.base import RewardFineTuning
    from rewardopt.methods.steering import InferenceTimeSteering

    if isinstance(cli.model, RewardFineTuning):
        assert cli.model.generator.trainable_parameters()
    if isinstance(cli.model, InferenceTimeSteering):
        assert cli.model.expected_cost()["nfe"] <= 8  # the budget given


def check_predict(run) -> None:
    s = run.summary
    if "samples" not in s:
        return
    assert len(list((run.out / "samples").glob("*.png"))) == s["samples"]
    assert (run.out / "grid.png").is_file()


def check_fit(run) -> None:
    s = run.summary
    if s is not None and run.config("model.init_args.generator.init_args.lora_rank"):
        assert (run.out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
