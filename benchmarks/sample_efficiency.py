"""Held-out reward vs number of generated samples: DRaFT-1, DRaFT-LV, AlignProp and DDPO on the
embedded tiny text-to-image default, with the same reward and the same sample budget, over seeds.

Reward: ShapeAttributeReward(colour, target=blue) — differentiable, so the backprop methods use its
gradient; DDPO uses only its values. Held-out reward: the 12 held-out prompts x 2 fixed-noise samples.
Each method uses its tiny recipe's settings (lr, LoRA rank 4, T=20, CFG 3; DDPO: eta=1,
4 samples per prompt, PPO clip 1e-4, 2 minibatches).

Usage: python benchmarks/sample_efficiency.py [--budget 384] [--seeds 0 1 2] [--eval-every 48]
Prints a markdown table; writes runs/sample_efficiency.json and runs/sample_efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make(method: str, seed: int):
    import lightning as L

    from domains.images.rewards import ShapeAttributeReward
    from domains.images.stable_diffusion import StableDiffusionGenerator
    from rewardopt.methods.alignprop import AlignProp
    from rewardopt.methods.ddpo import DDPO
    from rewardopt.methods.draft import DRaFT

    L.seed_everything(seed, verbose=False)
    gen = StableDiffusionGenerator("embedded:tiny-shapes", height=24, width=24, num_steps=20, guidance_scale=3.0,
                                   eta=1.0 if method == "DDPO" else 0.0, lora_rank=4,
                                   gradient_checkpointing=method == "AlignProp")
    reward = ShapeAttributeReward("colour", target="blue")
    out = f"runs/sample_efficiency/{method}_{seed}"
    if method == "DRaFT-1":
        return DRaFT(gen, reward, k=1, lr=1e-3, seed=seed, output_dir=out), 4
    if method == "DRaFT-LV":
        return DRaFT(gen, reward, k=1, lv_samples=2, lr=1e-3, seed=seed, output_dir=out), 4
    if method == "AlignProp":
        return AlignProp(gen, reward, truncation="gaussian", lr=1e-3, seed=seed, output_dir=out), 4
    return DDPO(gen, reward, samples_per_prompt=4, num_minibatches=2, clip_range=1e-4, min_count=8, lr=3e-4,
                seed=seed, output_dir=out), 2


def run(method: str, seed: int, budget: int, eval_every: int) -> dict:
    import lightning as L

    from domains.images.data import ShapePromptDataModule

    model, prompts_per_step = make(method, seed)
    samples_per_batch = prompts_per_step * (4 if method == "DDPO" else 1)
    batches = budget // samples_per_batch
    opt_steps = batches * (2 if method == "DDPO" else 1)
    data = ShapePromptDataModule(batch_size=prompts_per_step, val_batch_size=24, val_repeats=2, seed=seed)
    trainer = L.Trainer(max_steps=opt_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=max(1, eval_every // samples_per_batch),
                        check_val_every_n_epoch=None, gradient_clip_val=None if method == "DDPO" else 1.0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=data)
    s = json.loads((Path(model.output_dir) / "summary.json").read_text())
    return {"method": method, "seed": seed, "history": s["history"], "wall_s": time.perf_counter() - t0,
            "nfe": s["nfe"], "samples": s["samples"]}


def curve_at(history: list[dict], samples: int) -> float:
    """Held-out reward at the last evaluation with at most ``samples`` generated."""
    pts = [h for h in history if h["samples"] <= samples]
    return pts[-1]["reward"]


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=384)
    ap.add_argument("--eval-every", type=int, default=48)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["DRaFT-1", "DRaFT-LV", "AlignProp", "DDPO"])
    args = ap.parse_args()
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run(method, seed, args.budget, args.eval_every)
            results.append(r)
            print(f"  {method} seed {seed}: {r['history'][0]['reward']:.3f} -> {r['history'][-1]['reward']:.3f} "
                  f"({r['samples']} samples, {r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    grid = list(range(0, args.budget + 1, args.eval_every))
    table = {}
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        table[method] = np.array([[curve_at(r["history"], s) for s in grid] for r in runs])
    print("\nHeld-out reward (log p(blue), mean ± sd over seeds) vs samples generated\n")
    print("| method | " + " | ".join(str(s) for s in grid) + " | wall s / run |")
    print("|---|" + "---|" * (len(grid) + 1))
    for method, arr in table.items():
        wall = np.mean([r["wall_s"] for r in results if r["method"] == method])
        cells = [f"{m:.2f}±{sd:.2f}" for m, sd in zip(arr.mean(0), arr.std(0))]
        print(f"| {method} | " + " | ".join(cells) + f" | {wall:.0f} |")
    if "DDPO" in table:
        target = table["DDPO"].mean(0)[-1]
        print(f"\nDDPO's final held-out reward after {args.budget} samples: {target:.3f}")
        for method, arr in table.items():
            if method == "DDPO":
                continue
            mean = arr.mean(0)
            hit = next((s for s, v in zip(grid, mean) if v >= target), None)
            if hit is None:
                print(f"  {method}: did not reach it within {args.budget} samples")
            elif hit == 0:
                print(f"  {method}: the pretrained model already scores >= DDPO's final reward")
            else:
                print(f"  {method}: reached it after {hit} samples -> {args.budget / hit:.1f}x fewer than DDPO "
                      f"(resolution: {args.eval_every} samples; the ratio is a lower bound)")
    out = ROOT / "runs"
    out.mkdir(exist_ok=True)
    (out / "sample_efficiency.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method, arr in table.items():
        ax.errorbar(grid, arr.mean(0), yerr=arr.std(0), label=method, capsize=2, marker="o", ms=3)
    ax.set_xlabel("samples generated"), ax.set_ylabel("held-out log p(blue)"), ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sample_efficiency.png", dpi=110)
    print(f"\nplot: {out / 'sample_efficiency.png'}")


if __name__ == "__main__":
    main()
