"""VARD vs DDPO (and DRaFT-LV where the reward is differentiable): held-out reward vs samples generated,
KL to the pretrained model and value-net calls, over seeds, on three tasks:

* ``jpeg``: the embedded tiny text-to-image model, JPEG compressibility (-kB at quality 95; black-box);
* ``classifier``: the same model, the shapes classifier's log p(colour = blue) (differentiable);
* ``qed``: the tiny masked-diffusion molecule model, RDKit QED (black-box; invalid molecules 0).

Every method is built from its committed tiny recipe (``recipes/images/vard_jpeg_tiny.yaml``,
``vard_classifier_tiny.yaml``, ``ddpo_tiny.yaml``, ``draft_lv_tiny.yaml``, ``recipes/molecules/vard_qed_tiny.yaml``)
with only the reward, the seed and the output folder replaced — DDPO on ``classifier`` takes VARD's reward
section; DDPO on ``qed`` takes VARD's generator and reward sections with DDPO's knobs from ``ddpo_tiny.yaml``
and VARD's generator learning rate (full fine-tuning; DDPO's 3e-4 is the reference's LoRA rate). Nothing is
tuned here.

Measured per run: the held-out reward at doubling sample counts (the recipe's held-out set: 12 prompts x 2
fixed-noise samples for images, 64 fixed-noise molecules), then at the end the KL of the fine-tuned sampler
to the pretrained one along 24 (images) / 64 (molecules) fine-tuned trajectories from fixed noise — the exact
per-step KL summed over steps (nats per sample): for images the eta = 1 DDIM chain's Gaussian KL
Σ_i ||μ_θ - μ_base||² / (2σ_i²) (also for DRaFT-LV, which trains with eta = 0), for molecules Σ_i of the
unmasking step's KL (``kl_to_base``). Wall time is reported as a ratio to DDPO's per sample (shared machine).

Usage: python benchmarks/vard.py [--tasks jpeg classifier qed] [--seeds 0 1 2] [--budget 64] [--ddpo-budget 256]
Writes runs/vard/<task>.json and benchmarks/results/vard.md (a reduced run: --out elsewhere). Tasks may run in
separate processes (``--no-page``), then ``--report`` writes the page from their saved results.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

import yaml
from sample_efficiency import crossing, eval_grid, grid_trainer  # the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    ("jpeg", "VARD"): "recipes/images/vard_jpeg_tiny.yaml",
    ("jpeg", "DDPO"): "recipes/images/ddpo_tiny.yaml",
    ("classifier", "VARD"): "recipes/images/vard_classifier_tiny.yaml",
    ("classifier", "DRaFT-LV"): "recipes/images/draft_lv_tiny.yaml",
    ("classifier", "DDPO"): "recipes/images/ddpo_tiny.yaml",
    ("qed", "VARD"): "recipes/molecules/vard_qed_tiny.yaml",
    ("qed", "DDPO"): "recipes/molecules/vard_qed_tiny.yaml",
}
METHODS = {"jpeg": ["VARD", "DDPO"], "classifier": ["VARD", "DRaFT-LV", "DDPO"], "qed": ["VARD", "DDPO"]}
# Ablations (not in the default run; ``--ablation``): VARD with more value-net steps per training step, the
# knob its R² near 0 points at. Rows are labelled; the recipes keep their defaults.
ABLATIONS = {"VARD (value_updates 32)": ("VARD", {"value_updates": 32})}
REWARD_NAME = {"jpeg": "-kB (JPEG q95)", "classifier": "classifier log p(blue)", "qed": "RDKit QED"}


def build(spec):
    """Instantiate a recipe section: dicts with ``class_path`` (and ``init_args``) become objects,
    recursively, as the CLI does."""
    if isinstance(spec, list):
        return [build(s) for s in spec]
    if not isinstance(spec, dict):
        return spec
    if "class_path" not in spec:
        return {k: build(v) for k, v in spec.items()}
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{k: build(v) for k, v in (spec.get("init_args") or {}).items()})


def recipe_specs(task: str, method: str) -> tuple[dict, dict, dict]:
    """(model, data, trainer) sections for this task and method, with the cross-recipe replacements."""
    if method in ABLATIONS:
        base, override = ABLATIONS[method]
        model, data, trainer = recipe_specs(task, base)
        model = copy.deepcopy(model)
        model["init_args"].update(override)
        return model, data, trainer
    recipe = yaml.safe_load((ROOT / RECIPES[task, method]).read_text())
    model, data, trainer = recipe["model"], recipe["data"], recipe["trainer"]
    if task == "classifier" and method == "DDPO":
        vard = yaml.safe_load((ROOT / RECIPES["classifier", "VARD"]).read_text())["model"]
        model["init_args"]["reward"] = vard["init_args"]["reward"]
    if task == "qed" and method == "DDPO":
        ddpo = yaml.safe_load((ROOT / RECIPES["jpeg", "DDPO"]).read_text())
        knobs = {k: v for k, v in ddpo["model"]["init_args"].items() if k not in ("generator", "reward", "lr")}
        vard_args = model["init_args"]
        model = {"class_path": ddpo["model"]["class_path"],
                 "init_args": {"generator": vard_args["generator"], "reward": vard_args["reward"], **knobs,
                               "lr": vard_args["lr"]}}
        batch = data["init_args"]["batch_size"] // knobs["samples_per_prompt"]  # VARD's samples per step
        data = copy.deepcopy(data)
        data["init_args"]["batch_size"] = batch
    return model, data, trainer


def samples_per_batch(method: str, model, data) -> int:
    per_prompt = getattr(model, "samples_per_prompt", 1)
    return data.batch_size * per_prompt


def run(task: str, method: str, seed: int, grid: list[int], out_root: Path) -> dict:
    import lightning as L

    model_spec, data_spec, trainer_spec = recipe_specs(task, method)
    model_spec = copy.deepcopy(model_spec)
    out = out_root / "{}_{}_{}".format(task, "".join(c if c.isalnum() else "_" for c in method), seed)
    model_spec["init_args"].update(seed=seed, output_dir=str(out))
    if "seed" in (data_spec.get("init_args") or {}) or data_spec["class_path"].endswith("ShapePromptDataModule"):
        data_spec = copy.deepcopy(data_spec)
        data_spec["init_args"]["seed"] = seed
    L.seed_everything(seed, verbose=False)
    model, data = build(model_spec), build(data_spec)
    per_batch = samples_per_batch(method, model, data)
    if any(s % per_batch for s in grid):
        raise ValueError(f"{task}/{method}: evaluation points {grid} must be multiples of its batch ({per_batch})")
    opt_steps = grid[-1] // per_batch * getattr(model, "num_minibatches", 1) * getattr(model, "num_inner_epochs", 1)

    trainer = grid_trainer(grid, opt_steps,
                           gradient_clip_val=None if method == "DDPO" else trainer_spec.get("gradient_clip_val"))
    evaluate, eval_s = model.evaluate, [0.0]

    def timed_evaluate(*a, **kw):  # held-out evaluations are timed apart from training
        t = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            eval_s[0] += time.perf_counter() - t

    model.evaluate = timed_evaluate
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - t0 - eval_s[0]
    s = json.loads((out / "summary.json").read_text())
    kl = kl_to_base(model, data, seed=1234)
    r2 = value_calibration(model, data, seed=4321) if method.startswith("VARD") else None
    return {"task": task, "method": method, "seed": seed, "history": s["history"], "wall_s": wall,
            "eval_s": eval_s[0], "kl": kl,
            "nfe": s["nfe"], "nfe_grad": s.get("nfe_grad"), "samples": s["samples"],
            "reward_calls": s.get("reward_calls"), "value_calls": s.get("value_calls", 0), "value_r2": r2}


def kl_to_base(model, data, seed: int) -> float:
    """Mean over the held-out conditions of the fine-tuned sampler's path KL to the pretrained one (nats per
    sample), along fine-tuned trajectories from fixed noise (see the module docstring)."""
    import torch

    from rewardopt.generators.masked import MaskedDiffusionGenerator

    g = model.generator
    raw = [c for batch in data.val_dataloader() for c in batch]
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = g.encode_condition(raw)
        x = g.init_state(cond, rng)
        total = torch.zeros(len(raw))
        if isinstance(g, MaskedDiffusionGenerator):
            for i in range(g.num_steps):
                out = g.model_output(x, i, cond)
                total += g.kl_to_base(x, i, cond, out).float().cpu()
                x = g.step(x, i, cond, generator=rng, out=out)
            return float(total.mean())
        saved, g.eta = g.eta, 1.0
        try:
            for i in range(g.num_steps):
                mean, std, _ = g.transition(x, i, cond)
                with g.base_model():
                    mean_base, _, _ = g.transition(x, i, cond)
                if float(std) > 0:
                    total += ((mean - mean_base) ** 2 / (2 * std**2)).flatten(1).sum(1).float().cpu()
                x = mean + std * torch.randn(x.shape, generator=rng).to(x)
        finally:
            g.eta = saved
    return float(total.mean())


def value_calibration(model, data, seed: int) -> dict[str, float]:
    """R² of the trained VARD's value net against the realised reward of fresh rollouts of the fine-tuned model
    on the held-out conditions (not in V's buffer), at levels 1 (x_{T-1}), T/2 and T (x_0)."""
    import torch

    g = model.generator
    raw = [c for batch in data.val_dataloader() for c in batch]
    with torch.no_grad():
        cond = g.encode_condition(raw)
        traj = model.rollout(cond, torch.Generator().manual_seed(seed))
        rewards = model.reward(g.decode(traj[-1]), raw).total.float()
        r2 = model.calibration(traj, rewards, cond)
    T = g.num_steps
    return {str(lvl): r2.get(lvl, float("nan")) for lvl in (1, T // 2, T)}


def task_grids(task: str, methods: list[str], budget: int, ddpo_budget: int) -> dict[str, list[int]]:
    first = 16 if task == "qed" else 4
    grids = {}
    for m in methods:
        model_spec, data_spec, _ = recipe_specs(task, m)
        per_batch = data_spec["init_args"]["batch_size"] * model_spec["init_args"].get("samples_per_prompt", 1)
        grids[m] = eval_grid(ddpo_budget if m == "DDPO" else budget, max(first, per_batch))
    return grids


def task_tables(task: str, results: list[dict], grids: dict[str, list[int]], seeds: list[int]) -> str:
    import numpy as np

    methods = [m for m in grids if any(r["method"] == m for r in results)]
    curves = {m: np.array([[next(h["reward"] for h in r["history"] if h["samples"] == s) for s in grids[m]]
                           for r in results if r["method"] == m]) for m in methods}
    ddpo_wall = np.mean([r["wall_s"] / r["samples"] for r in results if r["method"] == "DDPO"]) \
        if "DDPO" in methods else None
    blocks = [f"### {task}: held-out {REWARD_NAME[task]} (mean ± sd over {len(seeds)} seeds)"]
    for m in methods:
        g, arr = grids[m], curves[m]
        blocks.append(f"**{m}**\n\n| samples | " + " | ".join(str(s) for s in g) + " |\n|---|" + "---|" * len(g)
                      + "\n| held-out reward | "
                      + " | ".join(f"{a:.3f}±{b:.3f}" for a, b in zip(arr.mean(0), arr.std(0))) + " |")
    timed = all("eval_s" in r for r in results)
    rows = ["| method | samples | final held-out reward | gain over pretrained | DDPO's gain at this budget "
            "| KL to base (nats/sample) | NFE (grad) per sample | reward calls | value-net rows "
            "| V's held-out R² at levels 1 / T/2 / T | wall per sample / DDPO's"
            + ("" if timed else " (incl. held-out evaluation)") + " |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    ddpo_gain = (curves["DDPO"] - curves["DDPO"][:, :1]) if "DDPO" in methods else None
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        arr = curves[m]
        gain = arr[:, -1] - arr[:, 0]
        kl = np.array([r["kl"] for r in rs])
        n = rs[0]["samples"]
        at = "—"
        if ddpo_gain is not None and n in grids["DDPO"]:
            col = ddpo_gain[:, grids["DDPO"].index(n)]
            at = f"{col.mean():+.3f} ± {col.std():.3f}"
        nfe = np.mean([r["nfe"] / r["samples"] for r in rs])
        nfe_g = np.mean([(r["nfe_grad"] or 0) / r["samples"] for r in rs])
        wall = np.mean([r["wall_s"] / r["samples"] for r in rs])
        ratio = f"{wall / ddpo_wall:.2f}" if ddpo_wall else "—"
        r2 = "—"
        if rs[0].get("value_r2"):
            r2 = " / ".join(f"{np.nanmean([r['value_r2'][k] for r in rs]):.2f}" for k in rs[0]["value_r2"])
        rows.append(f"| {m} | {n} | {arr[:, -1].mean():.3f} ± {arr[:, -1].std():.3f} "
                    f"| {gain.mean():+.3f} ± {gain.std():.3f} "
                    f"| {at} | {kl.mean():.3g} ± {kl.std():.2g} | {nfe:.1f} ({nfe_g:.1f}) "
                    f"| {np.mean([r['reward_calls'] or 0 for r in rs]):.0f} "
                    f"| {np.mean([r['value_calls'] for r in rs]):.0f} | {r2} | {ratio} |")
    blocks.append("\n".join(rows))
    if "DDPO" in methods:
        blocks.append(sample_ratio_lines(methods, grids, curves))
    return "\n\n".join(blocks)


def sample_ratio_lines(methods: list[str], grids: dict[str, list[int]], curves: dict) -> str:
    """Samples each method needs to reach DDPO's final *gain* over its own pretrained point (methods sample
    differently — DRaFT-LV at eta = 0 — so their starting rewards differ). The ratio is given only when
    DDPO's gain is more than 2 standard errors over seeds (otherwise it is noise and any method 'reaches' it
    at once); brackets come from the mean curves, and the per-seed crossings are listed."""
    import numpy as np

    gains = {m: c - c[:, :1] for m, c in curves.items()}
    d = gains["DDPO"]
    final = d[:, -1]
    se = final.std(ddof=1) / np.sqrt(len(final)) if len(final) > 1 else float("inf")
    target = float(final.mean())
    lines = [f"Target: DDPO's final gain over its pretrained point after {grids['DDPO'][-1]} samples, "
             f"{target:+.3f} (standard error over seeds {se:.3f})."]
    if not target > 2 * se:
        lines.append("DDPO's gain is not above 2 standard errors, so no sample ratio is defined.")
        return "\n".join(lines)
    lo_d, hi_d, est_d = crossing(grids["DDPO"], d.mean(0), target)
    lines[0] += f" DDPO's mean gain curve first reaches it between {lo_d} and {hi_d} samples."
    lines += ["", "| method | samples to reach DDPO's final gain (bracket, mean curve) | per seed (first grid point) "
                  "| DDPO samples / method samples |", "|---|---|---|---|"]
    for m in methods:
        if m == "DDPO":
            continue
        lo, hi, est = crossing(grids[m], gains[m].mean(0), target)
        per_seed = [crossing(grids[m], row, target)[1] for row in gains[m]]
        seeds = ", ".join("—" if h is None else str(h) for h in per_seed)
        if hi is None:
            lines.append(f"| {m} | not reached within {grids[m][-1]} | {seeds} | — |")
        else:
            ratio_hi = f"{hi_d / lo:.1f}" if lo > 0 else "∞"
            lines.append(f"| {m} | {lo}–{hi} | {seeds} | {lo_d / hi:.1f}–{ratio_hi}× (interpolated "
                         f"{est_d / est:.1f}×) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["jpeg", "classifier", "qed"], choices=list(METHODS))
    ap.add_argument("--methods", nargs="+", default=None, help="subset of each task's methods")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=64, help="samples per VARD / DRaFT-LV run (images)")
    ap.add_argument("--ddpo-budget", type=int, default=256, help="samples per DDPO run (images)")
    ap.add_argument("--qed-budget", type=int, default=256, help="samples per VARD run on qed")
    ap.add_argument("--qed-ddpo-budget", type=int, default=1024, help="samples per DDPO run on qed")
    ap.add_argument("--out", type=Path, default=None, help="result folder (default benchmarks/results)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "vard")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: write the page from the tasks' saved runs/vard/<task>.json (tasks run in "
                         "separate processes)")
    ap.add_argument("--no-page", action="store_true", help="save runs/vard/<task>.json only")
    ap.add_argument("--ablation", action="store_true",
                    help="run only the ABLATIONS rows, into runs/vard/<task>+ablation.json (merged by --report)")
    args = ap.parse_args(argv)
    results, blocks, commands, seeds = [], [], [], []
    for task in args.tasks:
        saved = args.runs / (f"{task}+ablation.json" if args.ablation else f"{task}.json")
        if args.report:
            record = json.loads(saved.read_text())
            extra = args.runs / f"{task}+ablation.json"
            if extra.is_file():  # ablation rows, run separately
                more = json.loads(extra.read_text())
                record["grids"].update(more["grids"])
                record["results"] += more["results"]
                record["command"] += " ; " + more["command"]
        else:
            methods = [m for m in METHODS[task] if args.methods is None or m in args.methods]
            if args.ablation:
                methods = list(ABLATIONS)
            b, db = (args.qed_budget, args.qed_ddpo_budget) if task == "qed" else (args.budget, args.ddpo_budget)
            grids = task_grids(task, methods, b, db)
            task_results = []
            for m in methods:
                for seed in args.seeds:
                    r = run(task, m, seed, grids[m], args.runs)
                    task_results.append(r)
                    print(f"  {task}/{m} seed {seed}: {r['history'][0]['reward']:.3f} -> "
                          f"{r['history'][-1]['reward']:.3f} KL {r['kl']:.3g} ({r['samples']} samples, "
                          f"{r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            record = {"grids": grids, "results": task_results, "seeds": args.seeds,
                      "command": "python benchmarks/vard.py " + " ".join(argv if argv is not None else sys.argv[1:])}
            args.runs.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(record, indent=2))
        results += record["results"]
        seeds = sorted(set(seeds) | set(record["seeds"]))
        commands.append(record["command"])
        blocks.append(task_tables(task, record["results"], record["grids"], record["seeds"]))
        print(blocks[-1], flush=True)
    if args.no_page:
        return results
    from results_md import write_result

    command = " ; ".join(dict.fromkeys(commands)) + (" ; python benchmarks/vard.py --report" if args.report else "")
    write_result("vard", blocks, seeds=seeds, title="VARD vs DDPO (and DRaFT-LV): held-out reward vs samples",
                 command=command.strip(), folder=args.out,
                 notes="Each method at its committed tiny recipe (see benchmarks/vard.py's docstring for the "
                       "replacements). Samples: generated for training (VARD's value-only warm-up included). KL: "
                       "the fine-tuned sampler's path KL to the pretrained one along its own held-out trajectories "
                       "(images: the eta=1 DDIM chain, nats summed over pixels and steps; molecules: the unmasking "
                       "steps' KL summed over positions and steps). Value-net rows: states V evaluated "
                       "(fitting, calibration, policy queries). Wall time: per generated sample, as a ratio to "
                       "DDPO's in the same run, held-out evaluation excluded (this machine is shared). On "
                       "classifier VARD runs with hybrid: true (the reward's exact gradient at the last step), "
                       "so it is not black-box there. Ablation rows change one VARD knob; the recipes keep "
                       "their defaults.")
    return results


if __name__ == "__main__":
    main()
