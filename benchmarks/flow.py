"""Flow matching on the embedded tiny rectified flow (``embedded:tiny-shapes-flow``, issue 20), 3 seeds:

1. held-out reward vs samples generated for Flow-GRPO, Flow-GRPO without its "Fast" window (every SDE step trained,
   as DDPO: isolates the window from the rest of Flow-GRPO), DDPO on the flow's SDE and DRaFT-LV (through the ODE),
   with the image benchmarks' reward (the shapes classifier's log p(colour = blue); ``benchmarks/sample_efficiency.py``
   on the DDIM model is the same protocol), each at its tiny recipe's settings; the gains are also compared at the
   largest sample count every method reached (equal samples);
2. inference-time steering at equal NFE on the flow's SDE (noise level 0.7): the plain sampler (and the plain ODE
   sampler, to show what the SDE's noise costs by itself), Best-of-N, SVDD-PM, SMC and DSearch at a budget of
   ``--multiple`` x T NFE per sample, with the JPEG reward (``benchmarks/inference_time.py`` on the DDIM model is the
   same protocol).

    python benchmarks/flow.py                     # both parts, 3 seeds
    python benchmarks/flow.py --part steering --seeds 0 --prompts 2 --no-page   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
from results_md import write_result
from sample_efficiency import RL_METHODS as RL
from sample_efficiency import eval_grid, run

TRAINING = ["Flow-GRPO", "Flow-GRPO (all steps)", "DDPO", "DRaFT-LV"]
STEERING = ["pretrained (ODE)", "pretrained", "Best-of-N", "SVDD-PM", "SMC", "DSearch"]


def training_tables(args) -> list[str]:
    grids = {m: eval_grid(args.rl_budget if m in RL else args.budget, 8 if m in RL else 4) for m in args.methods}
    common = max(set.intersection(*(set(g) for g in grids.values())))  # the largest count in every grid
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run(method, seed, grids[method][-1], grids[method], family="flow")
            results.append(r)
            print(f"  {method} seed {seed}: {r['history'][0]['reward']:.3f} -> {r['history'][-1]['reward']:.3f} "
                  f"({r['samples']} samples, {r['wall_s']:.0f} s, NFE {r['nfe']})", file=sys.stderr, flush=True)
    tables = []
    base_wall = None
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        g = grids[method]
        arr = np.array([[next(h["reward"] for h in r["history"] if h["samples"] == s) for s in g] for r in runs])
        wall = statistics.mean(r["wall_s"] / r["samples"] for r in runs)
        base_wall = base_wall or wall
        nfe = statistics.mean(r["nfe"] / r["samples"] for r in runs)
        rows = ["| samples | " + " | ".join(str(s) for s in g) + " |", "|---|" + "---|" * len(g),
                "| held-out reward | " + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in zip(arr.mean(0), arr.std(0)))
                + " |"]
        gain = arr[:, -1] - arr[:, 0]
        at = arr[:, g.index(common)] - arr[:, 0]
        tables.append(f"**{method}** (mean ± sd over {len(runs)} seeds; gain {gain.mean():+.2f} ± {gain.std():.2f}, "
                      f"at {common} samples {at.mean():+.2f} ± {at.std():.2f}; "
                      f"counted NFE per training sample {nfe:.1f}; wall per sample {wall / base_wall:.2f}x "
                      f"{args.methods[0]}'s)\n\n" + "\n".join(rows))
    return tables


def steering_table(args, noise: float = 0.7) -> str:
    from inference_time import run_methods

    ns = SimpleNamespace(family="flow", steps=args.steps, reward="jpeg", methods=STEERING, multiples=[args.multiple],
                         seeds=args.seeds, per_prompt=2, batch=6, prompts=args.prompts, smc_alpha=0.01,
                         dps_scale=0.1, free2guide_frac=0.1, sde_noise_level=noise)
    rows = run_methods(ns)
    lines = [f"Reward: JPEG compressibility (minus kB; black-box); {len(args.seeds)} seeds x {args.prompts} held-out "
             f"prompts x 2 samples; flow SDE noise level {noise:g}, T = {args.steps}, CFG 3; mean over seeds (± sd).",
             "",
             "| method | budget (x T) | width | NFE / sample | decodes / sample | reward calls / sample | median | "
             "top-10% | diversity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['multiple']} | {r['width']:.0f} | {r['nfe']:.1f} | {r['decodes']:.1f} | "
                     f"{r['reward_calls']:.1f} | {r['median']:.3f} ± {r['median_sd']:.3f} | "
                     f"{r['top10']:.3f} ± {r['top10_sd']:.3f} | {r['diversity']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "training", "steering"], default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=TRAINING)
    p.add_argument("--budget", type=int, default=32, help="samples per run for DRaFT-LV")
    p.add_argument("--rl-budget", type=int, default=128, help="samples per run for Flow-GRPO and DDPO")
    p.add_argument("--steps", type=int, default=10, help="steering: sampling steps T")
    p.add_argument("--multiple", type=int, default=4, help="steering: NFE budget per sample as a multiple of T")
    p.add_argument("--prompts", type=int, default=12, help="steering: held-out prompts (of 12)")
    p.add_argument("--steering-noise", type=float, nargs="+", default=[0.7],
                   help="steering: the SDE noise levels a (one table each; Flow-GRPO trains at 0.7)")
    p.add_argument("--name", default="flow", help="the result page's stem (benchmarks/results/<name>.md)")
    p.add_argument("--no-page", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tables = []
    if args.part in ("all", "training"):
        tables.append("## 1. Held-out reward vs samples (log p(blue) of the shapes classifier)")
        tables += training_tables(args)
    if args.part in ("all", "steering"):
        for noise in args.steering_noise:
            tables += [f"## 2. Steering at equal NFE on the flow's SDE (noise level {noise:g})",
                       steering_table(args, noise)]
    for t in tables:
        print("\n" + t)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.no_page:
        return
    write_result(args.name, tables, seeds=args.seeds, title="Flow matching on the tiny rectified flow",
                 notes="`embedded:tiny-shapes-flow`: the tiny shapes UNet + text encoder trained with SD3's "
                       "rectified-flow objective (recipes/images/pretrain_tiny_flow.yaml), 24 px, CFG 3, "
                       "FlowMatchEulerDiscreteScheduler (shift 1). Training: T = 20; Flow-GRPO and DDPO sample "
                       "with Flow-GRPO's SDE (noise level 0.7; Flow-GRPO 'Fast': 2 SDE steps in the first 10, the "
                       "rest ODE; 'all steps': every step SDE and trained, as DDPO) and evaluate with the ODE; "
                       "DRaFT-LV trains through the ODE. Held-out: 12 "
                       "prompts x 2 fixed-noise samples. Wall times are ratios within this run (the machine is "
                       "shared). The DDIM model's pages: sample_efficiency.md, inference_time_jpeg.md.")


if __name__ == "__main__":
    main()
