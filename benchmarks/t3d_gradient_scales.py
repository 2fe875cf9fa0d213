"""Derive VP-SDS + rewards' reward weights: the scene-gradient norm of the SDS term and of each reward at init.

At the recipe's starting scene (the untrained density blob), for each prompt and ``--draws`` independent draws of
4 views, timesteps and noise, this measures ‖∂L/∂θ‖ over the scene's parameters θ for the SDS loss and for each
reward's mean at weight 1. A reward's weight is then chosen so that its median gradient is ``--ratio`` times the
SDS term's (VP3D gives no weights for its rewards; equal-order gradients is the choice stated in the recipe). The
prompts are tiny-world prompts the benchmark (``benchmarks/text_to_3d.py``) does NOT use, so the weights are not
fitted to the benchmark's prompts.

    python benchmarks/t3d_gradient_scales.py                    # 4 non-benchmark prompts, 8 draws each
"""

from __future__ import annotations

import argparse
import statistics

import torch
from text_to_3d import PROMPTS as BENCHMARK_PROMPTS
from text_to_3d import model_spec
from vard import build

from domains.text_to_3d.objects import PROMPTS as WORLD

# the tiny world's stacks and pairs the benchmark leaves out (two of each)
DEFAULT_PROMPTS = ([q for q in WORLD if " on " in q and q not in BENCHMARK_PROMPTS][:2]
                   + [q for q in WORLD if " and " in q and q not in BENCHMARK_PROMPTS][:2])


def gradient_norms(prompt: str, draws: int, method: str = "VP-SDS + rewards") -> dict[str, list[float]]:
    """{"SDS": [...], reward name: [...]} scene-gradient norms at init, one per draw."""
    model = build(model_spec(method, prompt, 0))
    model.ensure_visual_prompt()
    params = [p for p in model.scene.parameters() if p.requires_grad]

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))

    out: dict[str, list[float]] = {"SDS": [], **{r.name: [] for r in model.rewards}}
    for k in range(draws):
        rng = torch.Generator().manual_seed(k)
        views = model.scene.random_views(model.views_per_step, rng)
        images = model.scene.render(views, generator=rng)
        out["SDS"].append(norm(model.distillation_terms(images, model.scene.view_names(views), rng)["loss"]))
        conds = [model.reward_condition() for _ in range(images.shape[0])]
        for r in model.rewards:
            out[r.name].append(norm(r(images, conds).total.mean()))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.5, help="each reward's gradient / the SDS gradient at init")
    args = p.parse_args(argv)
    overlap = sorted(set(args.prompts) & set(BENCHMARK_PROMPTS))
    if overlap:
        p.error(f"{overlap} are benchmark prompts: derive the weights on others")
    torch.set_num_threads(1)
    pooled: dict[str, list[float]] = {}
    print("| prompt | " + " | ".join(["SDS", "text_alignment", "visual_consistency"]) + " |")
    for q in args.prompts:
        norms = gradient_norms(q, args.draws)
        for k, v in norms.items():
            pooled.setdefault(k, []).extend(v)
        print(f"| {q} | " + " | ".join(f"{statistics.median(v):.3g} [{min(v):.3g}, {max(v):.3g}]"
                                        for v in norms.values()) + " |")
    sds = statistics.median(pooled.pop("SDS"))
    print(f"\nmedian SDS scene-gradient norm {sds:.3g} (weight 1, {len(args.prompts)} prompts x {args.draws} draws)")
    for k, v in pooled.items():
        med = statistics.median(v)
        print(f"{k}: median {med:.3g} at weight 1 -> weight {args.ratio * sds / med:.3g} for {args.ratio}x SDS")


if __name__ == "__main__":
    main()
