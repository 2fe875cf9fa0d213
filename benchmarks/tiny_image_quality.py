"""How clean the tiny text-to-image model's samples are, and whether they follow the prompt.

For each model: 16 shapes prompts (``quality_prompts``) x ``--per-prompt`` samples, DDIM T=20, CFG 3
(the defaults), per seed: the Laplacian ratio (mean |4-neighbour Laplacian| of the samples over that of
procedural renders of the same prompts; 1.0 = as smooth as the data) and the shapes classifier's
colour / shape / count accuracy on the samples, under each ``--classifier``, and a classifier-free
pixel reader's colour and count accuracy (``domains.images.quality.read_pixels``). The ``renders`` rows are
each reader on the renders themselves (its ceiling). Target (issue 14): ratio <= 1.5 with colour,
count >= 0.9 and shape >= 0.8.

Usage: python benchmarks/tiny_image_quality.py [--model LABEL=PATH ...] [--seeds 0 1 2] [--name tiny_image_quality]
Prints a markdown table and writes benchmarks/results/<name>.md and a sample grid
benchmarks/results/<name>_<label>.png per model (the first seed's samples, one per prompt per row).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PIXELS = "pixels (no classifier)"


def _mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def measure(path: str, seeds: list[int], per_prompt: int, steps: int, cfg: float,
            classifiers: dict[str, str], family: str = "ddim") -> tuple[dict, dict, torch.Tensor]:
    """Per-seed Laplacian ratios, per-classifier per-seed accuracies, and the first seed's samples. ``family``:
    "ddim" (``StableDiffusionGenerator``, DDIM eta 0) or "flow" (``FlowUNetGenerator``, the Euler ODE)."""
    from domains.images.quality import classifier_accuracy, laplacian_ratio, quality_prompts, sample_images
    from domains.images.rewards import ShapeClassifier
    from domains.images.stable_diffusion import FlowUNetGenerator, StableDiffusionGenerator

    cls = {"ddim": StableDiffusionGenerator, "flow": FlowUNetGenerator}[family]
    g = cls(path, height=24, width=24, num_steps=steps, guidance_scale=cfg, lora_rank=None).eval()
    clfs = {label: ShapeClassifier.from_pretrained(c) for label, c in classifiers.items()}
    prompts = quality_prompts() * per_prompt
    from domains.images.quality import pixel_accuracy

    ratios: list[float] = []
    acc = {label: {"colour": [], "shape": [], "count": []} for label in clfs}
    acc[PIXELS] = {"colour": [], "count": []}
    first = None
    for seed in seeds:
        images = sample_images(g, prompts, seed)
        first = images if first is None else first
        ratios.append(laplacian_ratio(g, prompts, seed, images))
        for label, clf in clfs.items():
            for k, v in classifier_accuracy(clf, images, prompts).items():
                acc[label][k].append(v)
        for k, v in pixel_accuracy(images, prompts).items():
            acc[PIXELS][k].append(v)
    return ratios, acc, first


def main() -> None:
    p = argparse.ArgumentParser(description="tiny text-to-image sample cleanliness and prompt following")
    p.add_argument("--model", action="append", metavar="LABEL=PATH",
                   help="a model to measure (repeatable; default: shipped=embedded:tiny-shapes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-prompt", type=int, default=4, help="samples per prompt per seed")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--family", choices=["ddim", "flow"], default="ddim",
                   help="the models' sampler: DDIM (eta 0) or a rectified flow's Euler ODE (embedded:tiny-shapes-flow)")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--name", default="tiny_image_quality", help="results file stem")
    p.add_argument("--notes", default="", help="a paragraph placed above the table")
    p.add_argument("--append", metavar="MD", help="a markdown file (e.g. a table of pilot runs) placed after the table")
    p.add_argument("--no-results", action="store_true", help="print only")
    p.add_argument("--classifier", action="append", metavar="LABEL=PATH",
                   help="a shapes classifier to read prompt following with (repeatable; default: "
                        "shipped=embedded:shape-classifier)")
    args = p.parse_args()
    models = [m.split("=", 1) for m in (args.model or ["shipped=embedded:tiny-shapes"])]

    from domains.images.quality import classifier_accuracy, quality_prompts, renders
    from domains.images.rewards import ShapeClassifier
    from rewardopt.callbacks import save_image_grid

    classifiers = dict(c.split("=", 1) for c in (args.classifier or ["shipped=embedded:shape-classifier"]))
    lines = ["| model | classifier | Laplacian ratio (target ≤ 1.5) | colour acc (≥ 0.9) | shape acc (≥ 0.8) "
             "| count acc (≥ 0.9) |", "|---|---|---|---|---|---|"]
    prompts = quality_prompts() * args.per_prompt
    for clabel, cpath in classifiers.items():
        clf = ShapeClassifier.from_pretrained(cpath)
        ref = {k: [] for k in ("colour", "shape", "count")}
        for seed in args.seeds:
            for k, v in classifier_accuracy(clf, renders(prompts, 24, seed), prompts).items():
                ref[k].append(v)
        lines.append(f"| renders (procedural data) | {clabel} | 1.00 | " + " | ".join(_mean_sd(ref[k]) for k in ref)
                     + " |")
    from domains.images.quality import pixel_accuracy

    ref = {"colour": [], "count": []}
    for seed in args.seeds:
        for k, v in pixel_accuracy(renders(prompts, 24, seed), prompts).items():
            ref[k].append(v)
    lines.append(f"| renders (procedural data) | {PIXELS} | 1.00 | {_mean_sd(ref['colour'])} | — | "
                 f"{_mean_sd(ref['count'])} |")
    grids = []
    sampler = "DDIM" if args.family == "ddim" else "flow Euler ODE"
    for label, path in models:
        ratios, acc, images = measure(path, args.seeds, args.per_prompt, args.steps, args.cfg, classifiers,
                                      args.family)
        for clabel, rows in acc.items():
            cells = [_mean_sd(rows[k]) if k in rows else "—" for k in ("colour", "shape", "count")]
            lines.append(f"| {label} (`{path}`) | {clabel} | {_mean_sd(ratios)} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
        if not args.no_results:
            n = len(quality_prompts())
            grid = save_image_grid([images[i * n:(i + 1) * n] for i in range(min(2, args.per_prompt))],
                                   RESULTS / f"{args.name}_{label}.png", col_labels=quality_prompts(),
                                   title=f"{label}: {sampler} T={args.steps}, CFG {args.cfg}, seed {args.seeds[0]}")
            grids.append(f"- {label}: [{grid.name}]({grid.name})")
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_results:
        from results_md import write_result

        notes = (f"{args.notes}\n\n" if args.notes else "") + (
            f"16 shapes prompts x {args.per_prompt} samples per seed, {sampler} T={args.steps}"
            f"{' (eta 0)' if args.family == 'ddim' else ''}, CFG {args.cfg}, "
            "24 px. Mean ± sd over seeds. Laplacian ratio: mean |4-neighbour Laplacian| of the samples over that "
            "of procedural renders of the same prompts (domains/images/quality.py).")
        extra = [Path(args.append).read_text()] if args.append else []
        out = write_result(args.name, tables=[table, "Sample grids (first seed):\n\n" + "\n".join(grids), *extra],
                           seeds=args.seeds, title="Tiny text-to-image model: sample cleanliness and prompt following",
                           notes=notes)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
