"""Steering recipes run end to end through the CLI on the tiny default (few steps), write their
outputs, and count exactly what they promise; full-size ones build with tiny stand-ins."""

import csv
import json

import pytest
import torch

from rewardopt.cli import RewardOptCLI
from rewardopt.testing.judge_server import JudgeServer
from tests.conftest import ROOT, aesthetic_stand_in_args

STEER = sorted((ROOT / "recipes/images/steer").glob("*.yaml"))
PREDICT_TINY = [p for p in STEER if p.stem.endswith("_tiny") and "svdd_mc" not in p.stem]


def predict_args(recipe, tmp_path, T=3):
    return ["--config", str(recipe), "--model.init_args.generator.init_args.num_steps", str(T),
            "--model.init_args.budget", str(4 * T), "--model.init_args.num_samples", "2",
            "--model.init_args.output_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.limit_predict_batches", "1", "--data.init_args.val_batch_size", "2",
            "--trainer.enable_progress_bar", "false"]


def test_steering_recipes_exist():
    names = {p.stem for p in STEER}
    for m in ("best_of_n", "svdd", "dsearch", "smc", "free2guide"):
        assert f"{m}_jpeg_tiny" in names and f"{m}_classifier_tiny" in names
    assert "dps_classifier_tiny" in names and sum("sd15" in n for n in names) >= 3


@pytest.mark.parametrize("recipe", PREDICT_TINY, ids=lambda p: p.stem)
def test_tiny_steering_recipe_predicts(recipe, tmp_path):
    args = predict_args(recipe, tmp_path)
    server = JudgeServer() if "judge" in recipe.stem else None
    if server is not None:
        server.__enter__()
        args += ["--model.init_args.reward.init_args.base_url", server.base_url]
    try:
        c = RewardOptCLI(args=args, run=False)
        c.trainer.predict(c.model, datamodule=c.datamodule)
    finally:
        if server is not None:
            server.__exit__()
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["samples"] == 4 and s["num_steps"] == 3
    exp = s["expected_cost_per_sample"]
    assert exp["nfe"] <= 12 and s["nfe"] == exp["nfe"] * 4 and s["reward_calls"] == exp["reward_calls"] * 4
    rows = list(csv.DictReader((tmp_path / "rewards.csv").open()))
    assert len(rows) == 4 and all(float(r["reward"]) == float(r["reward"]) for r in rows)
    assert rows[0]["condition"] == rows[1]["condition"] and rows[0]["chain"] == "0" and rows[1]["chain"] == "1"
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4
    assert (tmp_path / "grid.png").is_file()
    assert s["reward_stats"]["median"] == pytest.approx(sorted(float(r["reward"]) for r in rows)[1], abs=1e-4)
    if server is not None:
        assert server.requests >= s["reward_calls"] // 2  # scored through HTTP (the cache answers repeats)


def test_svdd_mc_fit_then_steer(tmp_path):
    T = 3
    fit = ["--config", str(ROOT / "recipes/images/steer/svdd_mc_value_fit_tiny.yaml"), "--trainer.max_steps", "3",
           "--model.init_args.generator.init_args.num_steps", str(T), "--model.init_args.value.init_args.num_steps", str(T),
           "--trainer.default_root_dir", str(tmp_path / "fit"), "--data.init_args.batch_size", "4",
           "--trainer.enable_progress_bar", "false"]
    c = RewardOptCLI(args=fit, run=False)
    c.trainer.fit(c.model, datamodule=c.datamodule)
    value_pt = tmp_path / "fit" / "value.pt"
    assert value_pt.is_file()
    report = json.loads((tmp_path / "fit" / "value_fit.json").read_text())
    assert report["steps"] == 3
    state = torch.load(value_pt, weights_only=True)
    assert float(state["target_std"]) != 1.0, "targets were standardised by the first batch"
    args = ["--config", str(ROOT / "recipes/images/steer/svdd_mc_classifier_tiny.yaml"),
            "--model.init_args.generator.init_args.num_steps", str(T), "--model.init_args.value.init_args.num_steps", str(T),
            "--model.init_args.value.init_args.checkpoint", str(value_pt), "--model.init_args.num_samples", "2",
            "--model.init_args.num_children", "3", "--model.init_args.output_dir", str(tmp_path / "pred"),
            "--trainer.limit_predict_batches", "1", "--data.init_args.val_batch_size", "2", "--trainer.enable_progress_bar", "false"]
    c = RewardOptCLI(args=args, run=False)
    assert torch.equal(c.model.value_net.target_std, state["target_std"]), "the trained weights were loaded"
    c.trainer.predict(c.model, datamodule=c.datamodule)
    s = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert s["nfe"] == T * 4 and s["reward_calls"] == 0 and s["value_calls"] == 3 * T * 4


def test_missing_value_checkpoint_is_a_clear_error(tmp_path):
    args = ["--config", str(ROOT / "recipes/images/steer/svdd_mc_classifier_tiny.yaml"),
            "--model.init_args.value.init_args.checkpoint", str(tmp_path / "nope.pt")]
    with pytest.raises((FileNotFoundError, ValueError), match="value checkpoint"):
        RewardOptCLI(args=args, run=False)


@pytest.mark.parametrize("recipe", [p for p in STEER if "sd15" in p.stem and "judge" not in p.stem], ids=lambda p: p.stem)
def test_full_size_steering_recipes_build_with_stand_ins(recipe, tiny_model_dir, tmp_path):
    args = ["--config", str(recipe), "--trainer.accelerator", "cpu", "--trainer.precision", "32",
            "--model.init_args.generator.init_args.pretrained", str(tiny_model_dir),
            "--model.init_args.generator.init_args.height", "16", "--model.init_args.generator.init_args.width", "16",
            "--model.init_args.generator.init_args.num_steps", "2", "--model.init_args.budget", "8"]
    if "aesthetic" in recipe.stem:
        args += aesthetic_stand_in_args(tmp_path)
    c = RewardOptCLI(args=args, run=False)
    assert type(c.model).__name__ in recipe.read_text()
    assert c.model.expected_cost()["nfe"] <= 8


def test_ddp_predict_shards_prompts_and_gathers_one_summary(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rewardopt.cli", "predict", "--config",
           str(ROOT / "recipes/images/steer/best_of_n_classifier_tiny.yaml"), "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--model.init_args.generator.init_args.num_steps", "2",
           "--model.init_args.budget", "4", "--model.init_args.num_samples", "2",
           "--model.init_args.output_dir", str(tmp_path), "--data.init_args.val_batch_size", "3",
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["samples"] == 24
    assert s["nfe"] == 24 * s["expected_cost_per_sample"]["nfe"]
    rows = list(csv.DictReader((tmp_path / "rewards.csv").open()))
    assert {r["rank"] for r in rows} == {"0", "1"}
    from domains.images.shapes import split_prompts

    assert sorted({r["condition"] for r in rows}) == sorted(split_prompts(0)[1]), "every held-out prompt, once per chain"
    assert len(list((tmp_path / "samples").glob("*.png"))) == 24
