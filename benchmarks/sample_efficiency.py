"""Held-out reward vs number of generated samples: DRaFT-1, DRaFT-LV, AlignProp and DDPO on the
embedded tiny text-to-image default, with the same reward and the same sample budget, over seeds.

Reward: ShapeAttributeReward(colour, target=blue) — differentiable, so the backprop methods use its
gradient; DDPO uses only its values. Held-out reward: the 12 held-out prompts x 2 fixed-noise samples.
Each method uses its tiny recipe's settings (lr, LoRA rank 4, T=20, CFG 3; DDPO: eta=1,
4 samples per prompt, PPO clip 1e-4, 2 minibatches).

The held-out reward is measured at doubling sample counts (4, 8, 16, ... for the backprop methods,
8, 16, ... for DDPO, whose budget is longer), so the samples each method needs to reach DDPO's final
reward are bracketed between two measured points rather than limited to one fixed interval.

Usage: python benchmarks/sample_efficiency.py [--budget 64] [--ddpo-budget 512] [--seeds 0 1 2]
Prints markdown tables; writes runs/sample_efficiency.{json,png} and benchmarks/results/sample_efficiency.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_image_generator(family: str = "ddim", stochastic: bool = False, num_steps: int = 20,
                         sde_noise_level: float = 0.7, **kwargs):
    """The embedded tiny text-to-image default of a ``family``: "ddim" (``embedded:tiny-shapes``; stochastic: DDIM
    eta 1) or "flow" (``embedded:tiny-shapes-flow``; stochastic: Flow-GRPO's SDE at ``sde_noise_level``, 0.7 as the
    paper). 24 px, CFG 3."""
    from domains.images.stable_diffusion import FlowUNetGenerator, StableDiffusionGenerator

    kwargs.setdefault("guidance_scale", 3.0)
    if family == "flow":
        return FlowUNetGenerator("embedded:tiny-shapes-flow", height=24, width=24, num_steps=num_steps,
                                 sde_noise_level=sde_noise_level if stochastic else 0.0, **kwargs)
    if family != "ddim":
        raise ValueError(f"family must be ddim or flow, got {family!r}")
    return StableDiffusionGenerator("embedded:tiny-shapes", height=24, width=24, num_steps=num_steps,
                                    eta=1.0 if stochastic else 0.0, **kwargs)


RL_METHODS = ("DDPO", "Flow-GRPO", "Flow-GRPO (all steps)")


def make(method: str, seed: int, family: str = "ddim"):
    import lightning as L

    from domains.images.rewards import ShapeAttributeReward
    from rewardopt.methods.alignprop import AlignProp
    from rewardopt.methods.ddpo import DDPO
    from rewardopt.methods.draft import DRaFT
    from rewardopt.methods.flow_grpo import FlowGRPO

    L.seed_everything(seed, verbose=False)
    gen = tiny_image_generator(family, stochastic=method in RL_METHODS, lora_rank=4,
                               gradient_checkpointing=method == "AlignProp")
    reward = ShapeAttributeReward("colour", target="blue")
    out = f"runs/sample_efficiency/{method}_{family}_{seed}"
    if method == "DRaFT-1":
        return DRaFT(gen, reward, k=1, lr=1e-3, seed=seed, output_dir=out), 4
    if method == "DRaFT-LV":
        return DRaFT(gen, reward, k=1, lv_samples=2, lr=1e-3, seed=seed, output_dir=out), 4
    if method == "AlignProp":
        return AlignProp(gen, reward, truncation="gaussian", lr=1e-3, seed=seed, output_dir=out), 4
    if method == "Flow-GRPO":  # the tiny recipe's settings (recipes/images/flow/flow_grpo_tiny.yaml)
        return FlowGRPO(gen, reward, group_size=4, num_minibatches=2, clip_range=1e-4, sde_window_size=2,
                        sde_window_range=[0, 10], lr=3e-4, seed=seed, output_dir=out), 2
    if method == "Flow-GRPO (all steps)":  # the same without the "Fast" window: every SDE step trained, as DDPO
        return FlowGRPO(gen, reward, group_size=4, num_minibatches=2, clip_range=1e-4, lr=3e-4, seed=seed,
                        output_dir=out), 2
    if method != "DDPO":
        raise ValueError(f"unknown method {method!r}")
    return DDPO(gen, reward, samples_per_prompt=4, num_minibatches=2, clip_range=1e-4, min_count=8, lr=3e-4,
                seed=seed, output_dir=out, eval_sde=family != "flow"), 2


def eval_grid(budget: int, first: int) -> list[int]:
    """Sample counts at which the held-out reward is measured: 0, then doubling from ``first`` up to
    ``budget`` (and ``budget`` itself), so a fast method is resolved early and a slow one late."""
    pts, s = [0], first
    while s < budget:
        pts.append(s)
        s *= 2
    return pts + [budget]


def grid_trainer(grid: list[int], max_steps: int, gradient_clip_val: float | None):
    """A quiet CPU Trainer that appends the held-out reward to the method's ``history`` each time the
    samples generated reach the next interior point of ``grid`` (the method's own evaluation gives the
    first and last)."""
    import lightning as L

    class EvalAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            n = pl_module.samples_seen
            if n in grid[1:-1] and all(h["samples"] != n for h in pl_module.history):
                pl_module.history.append({"samples": n, "reward": pl_module.evaluate()})

    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=[EvalAt()], gradient_clip_val=gradient_clip_val)


def run(method: str, seed: int, budget: int, grid: list[int], family: str = "ddim") -> dict:

    from domains.images.data import ShapePromptDataModule

    model, prompts_per_step = make(method, seed, family)
    samples_per_batch = prompts_per_step * (4 if method in RL_METHODS else 1)
    if any(s % samples_per_batch for s in grid):
        raise ValueError(f"{method}: evaluation points {grid} must be multiples of its batch ({samples_per_batch})")
    batches = budget // samples_per_batch
    opt_steps = batches * (2 if method in RL_METHODS else 1)
    data = ShapePromptDataModule(batch_size=prompts_per_step, val_batch_size=24, val_repeats=2, seed=seed)

    trainer = grid_trainer(grid, opt_steps, gradient_clip_val=None if method in RL_METHODS else 1.0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    s = json.loads((Path(model.output_dir) / "summary.json").read_text())
    return {"method": method, "family": family, "seed": seed, "history": s["history"],
            "wall_s": time.perf_counter() - t0, "nfe": s["nfe"], "samples": s["samples"]}


def crossing(grid: list[int], curve, target: float) -> tuple[int | None, int | None, float | None]:
    """Where a mean curve first reaches ``target``: (last point below, first point at or above, the
    linear interpolation between them). (None, None, None) if it never does; (0, 0, 0) if at once."""
    for j, (s, v) in enumerate(zip(grid, curve)):
        if v >= target:
            if j == 0:
                return 0, 0, 0.0
            s0, v0 = grid[j - 1], curve[j - 1]
            return s0, s, s0 + (target - v0) / (v - v0) * (s - s0)
    return None, None, None


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=64, help="samples per run for the backprop methods")
    ap.add_argument("--ddpo-budget", type=int, default=512, help="samples per run for DDPO")
    ap.add_argument("--first-eval", type=int, default=4, help="first evaluation point (then doubling)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["DRaFT-1", "DRaFT-LV", "AlignProp", "DDPO"])
    args = ap.parse_args()
    grids = {m: eval_grid(args.ddpo_budget if m == "DDPO" else args.budget, 8 if m == "DDPO" else args.first_eval)
             for m in args.methods}
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run(method, seed, grids[method][-1], grids[method])
            results.append(r)
            print(f"  {method} seed {seed}: {r['history'][0]['reward']:.3f} -> {r['history'][-1]['reward']:.3f} "
                  f"({r['samples']} samples, {r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    curves = {}
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        curves[method] = np.array([[next(h["reward"] for h in r["history"] if h["samples"] == s) for s in grids[method]]
                                   for r in runs])
    tables = []
    for method in args.methods:
        g, arr = grids[method], curves[method]
        wall = np.mean([r["wall_s"] for r in results if r["method"] == method])
        rows = ["| samples | " + " | ".join(str(s) for s in g) + " |", "|---|" + "---|" * len(g),
                "| held-out reward | "
                + " | ".join(f"{m:.2f}±{sd:.2f}" for m, sd in zip(arr.mean(0), arr.std(0))) + " |"]
        tables.append(f"**{method}** (mean ± sd over {len(args.seeds)} seeds; {wall:.0f} s per run)\n\n"
                      + "\n".join(rows))
    summary = []
    if "DDPO" in curves:
        ddpo = curves["DDPO"].mean(0)
        target = float(ddpo[-1])
        lo_d, hi_d, est_d = crossing(grids["DDPO"], ddpo, target)
        summary.append(f"Target: DDPO's final held-out reward after {args.ddpo_budget} samples, {target:.3f} "
                       f"(its mean curve first reaches it between {lo_d} and {hi_d} samples).")
        if hi_d == 0:
            summary.append("DDPO did not improve on the pretrained model, so no ratio is defined.")
            curves_to_rank = []
        else:
            curves_to_rank = [m for m in args.methods if m != "DDPO"]
        summary.append("")
        summary.append("| method | samples to reach DDPO's final reward (bracket) | interpolated "
                       "| DDPO samples / method samples |")
        summary.append("|---|---|---|---|")
        for method in curves_to_rank:
            lo, hi, est = crossing(grids[method], curves[method].mean(0), target)
            if hi is None:
                summary.append(f"| {method} | not reached within {args.budget} | — | — |")
            elif hi == 0:
                summary.append(f"| {method} | already at 0 (pretrained) | — | — |")
            else:
                # DDPO needs more than lo_d samples and at most hi_d; the method more than lo and at most hi
                ratio_lo = lo_d / hi
                ratio_hi = f"{hi_d / lo:.1f}" if lo > 0 else "∞"
                summary.append(f"| {method} | {lo}–{hi} | {est:.1f} | {ratio_lo:.1f}–{ratio_hi}× "
                               f"(interpolated {est_d / est:.1f}×) |")
    text = "\n\n".join(tables) + "\n\n" + "\n".join(summary)
    print("\nHeld-out reward (ShapeAttributeReward colour=blue, log p(blue)) vs samples generated\n")
    print(text)
    out = ROOT / "runs"
    out.mkdir(exist_ok=True)
    (out / "sample_efficiency.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method, arr in curves.items():
        x = np.maximum(grids[method], 1)
        ax.errorbar(x, arr.mean(0), yerr=arr.std(0), label=method, capsize=2, marker="o", ms=3)
    ax.set_xscale("log"), ax.set_xlabel("samples generated (0 plotted at 1)"), ax.set_ylabel("held-out log p(blue)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sample_efficiency.png", dpi=110)
    from results_md import write_result

    write_result("sample_efficiency", [text], seeds=args.seeds, title="Sample efficiency: held-out reward vs samples",
                 notes="Embedded tiny text-to-image default (24 px, DDIM T=20, CFG 3, LoRA r4); reward "
                       "ShapeAttributeReward(colour, target=blue), differentiable; held-out: 12 prompts x 2 "
                       "fixed-noise samples. Each method at its tiny recipe's settings (DRaFT-1/LV, AlignProp: lr "
                       "1e-3, 4 prompts per step; DDPO: eta=1, lr 3e-4, 2 prompts x 4 samples, 2 minibatches, PPO "
                       "clip 1e-4).")
    print(f"\nplot: {out / 'sample_efficiency.png'}")


if __name__ == "__main__":
    main()
