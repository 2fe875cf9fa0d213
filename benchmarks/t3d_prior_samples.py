"""How well the tiny multi-view prior follows its prompts: the independent evaluator's reading of its samples.

For each of the tiny world's 36 prompts and each view ("front", "side", "back"), ``--samples`` samples of
"<prompt>, <view> view" (DDIM ``--steps``, CFG ``--cfg``) are drawn text-only, and again conditioned on a visual
prompt: a ground-truth render of the prompt's canonical object from a random front-cone camera (as a text-to-image
front view would be). The evaluator (``embedded:t3d-evaluator``, never a reward) reads each sample; the table gives
the fraction read as the prompt per view and layout. This is the figure the prior's recipe header quotes.

    python benchmarks/t3d_prior_samples.py
"""

from __future__ import annotations

import argparse

import torch


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    from domains.text_to_3d.evaluator import RenderEvaluator
    from domains.text_to_3d.objects import PROMPTS, front_cone_cameras, parse_prompt, render_views
    from domains.text_to_3d.prior import MultiViewPrior
    from rewardopt.generators.capabilities import ImagePrompt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = MultiViewPrior("embedded:tiny-multiview-prior", height=32, width=32, num_steps=args.steps,
                       guidance_scale=args.cfg, lora_rank=None, gradient_checkpointing=False)
    ev = RenderEvaluator()
    cams = front_cone_cameras(len(PROMPTS), torch.Generator().manual_seed(args.seed + 99))
    refs = torch.cat([render_views(q, type(cams)(cams.azimuth[i:i + 1], cams.elevation[i:i + 1]), 32, 64)
                      for i, q in enumerate(PROMPTS)])
    layouts = [parse_prompt(q)[0] for q in PROMPTS]
    results: dict[tuple[str, str], list[bool]] = {}
    for mode in ("text only", "with visual prompt"):
        for view in ("front", "side", "back"):
            for s in range(args.samples):
                raw = [f"{q}, {view} view" for q in PROMPTS]
                if mode != "text only":
                    raw = [ImagePrompt(r, refs[i]) for i, r in enumerate(raw)]
                rng = torch.Generator().manual_seed(args.seed * 1000 + s)
                imgs = g.decode(g.sample(g.encode_condition(raw), generator=rng, grad_last_k=0))
                ok = (ev.probs(imgs).argmax(-1) == torch.arange(len(PROMPTS))).tolist()
                for lay, hit in zip(layouts, ok):
                    results.setdefault((mode, view), []).append(hit)
                    results.setdefault((mode, lay), []).append(hit)
    cols = ["front", "side", "back", "single", "stack", "pair"]
    print(f"Evaluator reads the prompt (fraction; {args.samples} samples per prompt and view, DDIM {args.steps}, "
          f"CFG {args.cfg}, 36 prompts)\n")
    print("| prior conditioning | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for mode in ("text only", "with visual prompt"):
        cells = [f"{sum(results[(mode, c)]) / len(results[(mode, c)]):.2f}" for c in cols]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
