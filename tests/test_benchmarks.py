"""The benchmark plumbing: result pages and the GPU script's CPU smoke mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402
import results_md  # noqa: E402


def test_result_page_records_provenance(tmp_path):
    out = results_md.write_result("demo_table", ["| a | b |\n|---|---|\n| 1 | 2 |"], seeds=[0, 1, 2],
                                  notes="a note", command="python benchmarks/x.py --seeds 0 1 2", folder=tmp_path)
    text = out.read_text()
    assert out == tmp_path / "demo_table.md"
    for field in ("**date**", "**commit**", "**machine**", "**seeds**: 0, 1, 2",
                  "`python benchmarks/x.py --seeds 0 1 2`", "a note", "| 1 | 2 |"):
        assert field in text, field
    commit = next(line for line in text.splitlines() if "**commit**" in line)
    assert "unknown" not in commit  # the test runs inside the git checkout


def test_result_page_rejects_paths(tmp_path):
    with pytest.raises(ValueError, match="plain file stem"):
        results_md.write_result("../escape", ["x"], folder=tmp_path)


def test_gpu_configs_are_sd15_sized():
    """The offline configs build SD 1.5's exact architecture (published parameter counts)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**gpu.SD15_UNET)
        vae = AutoencoderKL(**gpu.SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **gpu.SD15_TEXT))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)


def test_gpu_script_tiny_mode_writes_a_table(tmp_path):
    rows = gpu.main(["--tiny", "--methods", "DRaFT-1", "DDPO", "--batches", "1", "--repeats", "1",
                     "--out", str(tmp_path)])
    assert [(r["method"], r["batch"]) for r in rows] == [("DRaFT-1", 1), ("DDPO", 1)]
    for r in rows:
        assert r["step_s"] > 0 and r["plain_s"] > 0 and r["ratio"] == pytest.approx(r["step_s"] / r["plain_s"])
    page = (tmp_path / "gpu_tiny.md").read_text()
    assert "| DRaFT-1 | 1 |" in page and "| DDPO | 1 |" in page and "step / plain" in page


def test_gpu_script_refuses_full_size_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--tiny"):
        gpu.main([])


def test_record_stdout_tees_printed_tables(tmp_path, capsys):
    with results_md.record_stdout("teed", seeds=[3], folder=tmp_path) as rec:
        print("| x |\n|---|\n| 7 |")
    assert "| 7 |" in capsys.readouterr().out  # still printed
    assert rec.path.read_text().endswith("| 7 |\n") and "**seeds**: 3" in rec.path.read_text()
    with pytest.raises(RuntimeError), results_md.record_stdout("failed", folder=tmp_path):
        print("partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "failed.md").exists()  # a failed run leaves no page


def test_judge_only_run_replaces_only_the_judge_section(tmp_path):
    from argparse import Namespace

    import inference_time

    rows = inference_time.judge_throughput(Namespace(judge_requests=8, concurrency=[2], judge_latency=0.02))
    assert [(r["concurrency"], r["requests"], r["failed"]) for r in rows] == [(2, 8, 0)] and rows[0]["rps"] > 0
    page = tmp_path / "inference_time_jpeg.md"
    page.write_text("# Steering\n\n| method |\n|---|\n| SMC |\n\n" + inference_time.JUDGE_SECTION
                    + "\n\n| concurrency |\n|---|\n| 999 |\n")
    table = inference_time.judge_table(rows, 0.02)
    for _ in range(2):  # a re-run replaces its own section again
        inference_time.replace_judge_section(page, table,
                                             {"date": "D", "commit": "C", "command": "python x --judge-only"})
    text = page.read_text()
    assert text.startswith("# Steering\n\n| method |\n|---|\n| SMC |\n\n") and "| 999 |" not in text
    assert text.count(inference_time.JUDGE_SECTION) == 1 and "| 2 | 8 | 0.02 |" in text
    assert "date D; commit C; command `python x --judge-only`" in text


def test_vard_benchmark_builds_each_method_from_its_recipe_with_only_the_stated_replacements():
    import vard
    import yaml

    clf_reward = yaml.safe_load((ROOT / vard.RECIPES["classifier", "VARD"]).read_text())["model"]["init_args"]["reward"]
    model, _, _ = vard.recipe_specs("classifier", "DDPO")
    ddpo = yaml.safe_load((ROOT / "recipes/images/ddpo_tiny.yaml").read_text())["model"]["init_args"]
    assert model["init_args"]["reward"] == clf_reward  # the reward VARD and DRaFT-LV are scored with
    assert {k: v for k, v in model["init_args"].items() if k != "reward"} == \
        {k: v for k, v in ddpo.items() if k != "reward"}
    qed_model, qed_data, _ = vard.recipe_specs("qed", "DDPO")
    vard_qed = yaml.safe_load((ROOT / vard.RECIPES["qed", "VARD"]).read_text())
    args = qed_model["init_args"]
    assert qed_model["class_path"] == "rewardopt.methods.ddpo.DDPO"
    assert args["generator"] == vard_qed["model"]["init_args"]["generator"]
    assert args["reward"] == vard_qed["model"]["init_args"]["reward"]
    assert args["lr"] == vard_qed["model"]["init_args"]["lr"] and args["clip_range"] == ddpo["clip_range"]
    # equal samples per step: DDPO's prompts x samples_per_prompt = VARD's batch
    per_step = qed_data["init_args"]["batch_size"] * args["samples_per_prompt"]
    assert per_step == vard_qed["data"]["init_args"]["batch_size"]
    grids = vard.task_grids("jpeg", ["VARD", "DDPO"], 64, 256)
    assert grids == {"VARD": [0, 4, 8, 16, 32, 64], "DDPO": [0, 8, 16, 32, 64, 128, 256]}


def test_vard_benchmark_kl_is_zero_at_the_pretrained_model_and_grows_with_the_adapter():
    import vard

    from domains.images.data import ShapePromptDataModule
    from rewardopt.methods.ddpo import DDPO
    from tests.conftest import tiny_generator

    g = tiny_generator(eta=1.0, lora_rank=4)
    model = DDPO(g, __import__("domains.images.rewards", fromlist=["x"]).JpegCompressibilityReward())
    data = ShapePromptDataModule(batch_size=2, val_batch_size=4, val_repeats=1)
    data.val_dataloader = lambda: [["one red circle", "two blue squares"]]
    assert vard.kl_to_base(model, data, seed=0) == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    with torch.no_grad():
        for name, p in g.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    small = vard.kl_to_base(model, data, seed=0)
    with torch.no_grad():
        for name, p in g.denoiser.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    assert 0 < small < vard.kl_to_base(model, data, seed=0)
    g.eta = 0.0  # DRaFT's deterministic sampler: measured on the eta = 1 chain, then restored
    assert vard.kl_to_base(model, data, seed=0) > small and g.eta == 0.0


def test_video_benchmark_builds_each_steering_method_from_its_recipe_with_only_the_stated_swaps():
    """Each row's reward is its recipe's (or the named swap), every judge points at the benchmark's server,
    and the budget is the only other change."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_video", ROOT / "benchmarks" / "video.py")
    video = importlib.util.module_from_spec(spec)  # by path: "video" is also the tests/video package
    spec.loader.exec_module(video)

    url = "http://127.0.0.1:1/v1"
    rec = video.recipe
    ens = rec("free2guide_ensemble_tiny")["model"]["init_args"]["reward"]
    assert video.reward_spec("Free²Guide (ensemble)", url)["init_args"]["rewards"]["judge"]["init_args"][
        "base_url"] == url
    assert ens["init_args"]["rewards"]["judge"]["init_args"]["base_url"] != url  # the recipe itself untouched
    assert video.reward_spec("Free²Guide (image reward)", url) == ens["init_args"]["rewards"]["image"]
    judge = video.reward_spec("SVDD (judge)", url)
    assert judge["class_path"].endswith("OpenAIJudge") and judge["init_args"]["base_url"] == url
    assert video.reward_spec("SVDD (classifier)", url) == rec("svdd_classifier_tiny")["model"]["init_args"]["reward"]
    for label, (name, _) in video.STEERING.items():  # one generator (the recipes share it) serves every row
        assert rec(name)["model"]["init_args"]["generator"] == rec("free2guide_judge_tiny")["model"]["init_args"][
            "generator"], label


def test_superres_benchmark_shares_one_sampler_across_its_steering_recipes_and_measures_sharpness():
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_superres", ROOT / "benchmarks" / "superres.py")
    sr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sr)

    gens = [sr.recipe(name)["model"]["init_args"]["generator"] for name in sr.STEERING.values()]
    assert all(g == gens[0] for g in gens)  # one generator (built from the first recipe) serves every row
    steps = gens[0]["init_args"]["num_steps"]
    assert all(sr.recipe(n)["model"]["init_args"]["budget"] == 4 * steps for n in sr.STEERING.values())
    ft = sr.recipe("draft_k_feature_tiny")["model"]["init_args"]
    assert ft["generator"]["init_args"]["num_steps"] == steps and ft["denoising_weight"] > 0
    flat = torch.full((2, 3, 8, 8), 0.5)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float().expand(2, 3, 8, 8)
    assert torch.equal(sr.sharpness(flat), torch.zeros(2)) and torch.allclose(sr.sharpness(checker), torch.ones(2))
    row = {"proxy": "judge (LR | SR)", "rho_hs": 0.5, "lo": 0.4, "hi": 0.6, "rho_flip": 0.1, "flo": 0.0, "fhi": 0.2}
    table = sr.correlation_md([row], 10)
    assert "LR \\| SR" in table and table.splitlines()[-1].count(" | ") == 3  # a pipe in a name is escaped


def _benchmark_module(name: str):
    """benchmarks/<name>.py by path (``import text_to_3d`` would find the tests/text_to_3d package first)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_to_3d_tables_check_counted_compute_and_print_unsigned_sds():
    t3d = _benchmark_module("text_to_3d")

    def row(method, prompt, seed, psnr, nfe=1200, grad=0):
        return {"method": method, "prompt": prompt, "seed": seed, "psnr": psnr, "psnr_front": psnr, "psnr_back": psnr,
                "ssim": 0.5, "accuracy": 1.0, "consistency": 1.0, "p_prompt": 0.9, "prior_nfe": nfe,
                "visual_prompt_nfe": 0, "reward_calls": 0, "nfe_grad": grad, "wall_s": 1.0}

    rows = [row(m, "p", s, 10.0 + s + (0.5 if m == "VP-SDS" else 0.0)) for m in ("SDS", "VP-SDS") for s in (0, 1, 2)]
    rows[4]["psnr"] += 0.3  # VP-SDS seed 1: the paired differences vary, so their sd is > 0
    assert "| SDS | 3 | 11.00 ± 1.00 |" in t3d.main_table(rows, ["SDS", "VP-SDS"])
    assert "| 1.000 ± 0.000 | — | 1.000 ± 0.000 |" in t3d.main_table(rows, ["SDS"])  # no OOD views measured: —
    paired = t3d.paired_table(rows, ["SDS", "VP-SDS"])
    assert "| VP-SDS − SDS | 3 | +0.60 ± 0.17 | 3 / 0 |" in paired and "± +" not in paired
    with pytest.raises(RuntimeError, match="counted compute differs"):
        t3d.main_table(rows[:2] + [row("SDS", "p", 2, 12.0, nfe=1100)] + rows[3:], ["SDS", "VP-SDS"])
    with pytest.raises(RuntimeError, match="grad calls"):
        t3d.main_table([row("SDS", "p", 0, 10.0, grad=4)], ["SDS"])


@pytest.mark.slow
def test_flow_benchmark_runs_every_row_at_a_tiny_budget(capsys):
    """benchmarks/flow.py end to end at a tiny budget (~1 min): every training method and steering row, the gains at
    the common sample count, the ODE row beside the SDE's."""
    flow = _benchmark_module("flow")
    flow.main(["--seeds", "0", "--prompts", "2", "--budget", "8", "--rl-budget", "8", "--steps", "4", "--no-page"])
    out = capsys.readouterr().out
    for method in flow.TRAINING:
        assert f"**{method}** (mean ± sd over 1 seeds; gain" in out and "at 8 samples" in out
    for method in flow.STEERING:
        assert f"| {method} | " in out
    assert "| Best-of-N | 4 | 4 | 16.0 | 5.0 | 4.0 |" in out  # counted: 4 samples of 4 steps, 4 reward calls
