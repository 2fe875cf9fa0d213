"""Inference-time steering at equal NFE on the embedded tiny text-to-image default, plus the
black-box judge's throughput against a local server.

Methods: pretrained (plain sampler), Best-of-N, SVDD-PM, DSearch, SMC (FK difference potential),
Free²Guide (the first 10% of steps guided, as the paper and its public code) and DPS, each given the
same NFE per output sample (``budget`` = 4x, 8x, 16x the plain sampler's T by default) — the
budget sets each method's width (N, M, W, k, n, chains). Next to the rewards every table shows
what a sample really cost, counted: NFE, NFE with autograd, backward passes (DPS backprops through
the reward, the VAE decoder and the UNet at every step), decodes (x̂0 decoded for a value: SVDD
M·T, Best-of-N N, plus the output) and reward calls per sample. Rewards: ``jpeg``
(default; minus the JPEG size in kB — the SVDD paper's image task; black-box, so DPS is skipped),
``colour`` (1 - mean pixel distance to blue; differentiable, so DPS runs) or ``classifier`` (the
shapes classifier's log p(blue); it saturates at 0 within a few x T, so it separates methods only
at small budgets). Held-out prompts: the 12 held-out shapes prompts, ``--per-prompt``
samples each; diversity = mean RMS pixel distance between the samples of one prompt.

Judge throughput: an ``OpenAIJudge`` scores ``--judge-requests`` distinct images against the local
judge server answering in ``--judge-latency`` seconds, at several concurrencies; the target is at
least 80% of concurrency / latency requests per second. ``--judge-only`` runs just this and replaces
only the judge section of benchmarks/results/inference_time_<reward>.md (with its own date, commit
and command; the steering tables stay).

Usage: python benchmarks/inference_time.py [--reward jpeg|colour] [--steps 10] [--multiples 4 8 16] [--seeds 0 1 2]
       python benchmarks/inference_time.py --judge-only
Prints markdown tables and writes them to benchmarks/results/inference_time_<reward>.md; also writes
runs/inference_time.json and runs/inference_time.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

#: counters reported per output sample (keys of InferenceTimeSteering.COUNTS)
COUNTED = ("nfe", "nfe_grad", "backward", "decodes", "reward_calls")


def build(method: str, gen, reward, budget: int | None, seed: int, steps: int, smc_alpha: float = 1.0,
          dps_scale: float = 0.1, free2guide_frac: float = 0.1):
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.methods.dps import DPS
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.free2guide import Free2Guide
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD

    common = {"budget": budget, "seed": seed, "save_samples": False}
    if method == "pretrained":
        return BestOfN(gen, reward, n=1, seed=seed, save_samples=False)
    if method == "Best-of-N":
        return BestOfN(gen, reward, **common)
    if method == "SVDD-PM":
        return SVDD(gen, reward, alpha=0.0, **common)
    if method == "DSearch":
        return DSearch(gen, reward, schedule="exponential", search_start=0.5, lookahead=0, **common)
    if method == "SMC":
        return SMC(gen, reward, potential="difference", alpha=smc_alpha, resample="ess", **common)
    if method == "Free2Guide":
        return Free2Guide(gen, reward, guide_steps=max(1, round(free2guide_frac * steps)), **common)
    if method == "DPS":
        return DPS(gen, reward, scale=dps_scale, normalize=True, **common)
    raise ValueError(method)


def run_methods(args) -> list[dict]:
    import torch
    from sample_efficiency import tiny_image_generator

    from domains.images.rewards import ColourReward, JpegCompressibilityReward, ShapeAttributeReward
    from domains.images.shapes import split_prompts
    from rewardopt.methods.steering import mean_pairwise_distance

    torch.set_num_threads(2)
    gen = tiny_image_generator(getattr(args, "family", "ddim"), stochastic=True, num_steps=args.steps,
                               sde_noise_level=getattr(args, "sde_noise_level", 0.7), gradient_checkpointing=False,
                               lora_rank=None)
    reward = {"jpeg": lambda: JpegCompressibilityReward(max_workers=2),
              "colour": lambda: ColourReward("blue"),
              "classifier": lambda: ShapeAttributeReward("colour", target="blue")}[args.reward]()
    methods = [m for m in args.methods if not (m == "DPS" and args.reward == "jpeg")]
    _, prompts = split_prompts(0)
    prompts = prompts[:args.prompts]
    rows = []
    for mult in [None, *args.multiples]:
        for method in methods:
            plain = method in ("pretrained", "pretrained (ODE)")
            if (mult is None) != plain:
                continue
            per_seed = []
            for seed in args.seeds:
                # "pretrained (ODE)": a flow model's plain sampler without the SDE's noise (what the SDE costs)
                ode = method == "pretrained (ODE)"
                m = build("pretrained" if ode else method, gen, reward, None if mult is None else mult * args.steps,
                          seed, args.steps, args.smc_alpha, args.dps_scale, args.free2guide_frac)
                m.num_samples = args.per_prompt
                c0 = m.counts()
                t0 = time.perf_counter()
                vals, divs = [], []
                for b in range(0, len(prompts), args.batch):
                    batch = prompts[b:b + args.batch]
                    with gen.ode_sampling() if ode else nullcontext():
                        samples, _ = m.generate(batch, batch_idx=b)
                    calls = reward.calls
                    with torch.no_grad():
                        vals += reward(samples, [p for p in batch for _ in range(args.per_prompt)]).total.tolist()
                    reward.calls = calls
                    divs.append(mean_pairwise_distance(samples, args.per_prompt))
                n = len(vals)
                v = sorted(vals, reverse=True)
                k = max(1, round(0.1 * n))
                c1 = m.counts()
                per_seed.append({"median": statistics.median(vals), "top10": sum(v[:k]) / k, "mean": sum(vals) / n,
                                 "diversity": sum(divs) / len(divs),
                                 **{key: (c1[key] - c0[key]) / n for key in COUNTED},
                                 "wall_s": time.perf_counter() - t0,
                                 "width": getattr(m, m.width_name) if mult is not None else 1})
            agg = {k: statistics.mean(s[k] for s in per_seed) for k in per_seed[0]}
            agg.update({f"{k}_sd": statistics.pstdev([s[k] for s in per_seed]) for k in ("median", "top10")})
            rows.append({"method": method, "multiple": mult or 1, "budget": (mult or 1) * args.steps, **agg})
            r = rows[-1]
            print(f"  {method:11s} x{r['multiple']:<3d} width {r['width']:>5.0f}  median {r['median']:9.3f}  "
                  f"top10 {r['top10']:9.3f}  div {r['diversity']:.3f}  NFE {r['nfe']:.0f} (grad {r['nfe_grad']:.0f})  "
                  f"backward {r['backward']:.0f}  decodes {r['decodes']:.0f}  calls {r['reward_calls']:.0f}  "
                  f"{r['wall_s']:.1f}s", flush=True)
    return rows


def judge_throughput(args) -> list[dict]:
    import torch

    from rewardopt.rewards.judges import OpenAIJudge
    from rewardopt.testing.judge_server import JudgeServer

    out = []
    imgs = torch.rand(args.judge_requests, 3, 24, 24)
    for conc in args.concurrency:
        with JudgeServer(latency_s=args.judge_latency) as srv:
            j = OpenAIJudge(srv.base_url, "bench", max_workers=conc, cache_size=0, timeout_s=10)
            j(imgs[:conc], ["warm"] * conc)  # connections and threads up
            t0 = time.perf_counter()
            res = j(imgs, ["a prompt"] * len(imgs))
            dt = time.perf_counter() - t0
        rps, ideal = len(imgs) / dt, conc / args.judge_latency
        out.append({"concurrency": conc, "requests": len(imgs), "seconds": dt, "rps": rps, "ideal_rps": ideal,
                    "ratio": rps / ideal, "failed": res.info["failed"]})
        print(f"  judge concurrency {conc}: {rps:.1f} req/s of ideal {ideal:.1f} ({rps / ideal:.2f})", flush=True)
    return out


JUDGE_SECTION = "Judge throughput against the local judge server:"


def judge_table(judge: list[dict], latency: float) -> str:
    lines = ["| concurrency | requests | latency (s) | req/s | ideal req/s | ratio (target >= 0.8) |",
             "|---|---|---|---|---|---|"]
    for j in judge:
        lines.append(f"| {j['concurrency']} | {j['requests']} | {latency} | {j['rps']:.1f} | "
                     f"{j['ideal_rps']:.1f} | {j['ratio']:.2f} |")
    return "\n".join(lines)


def replace_judge_section(page: Path, table: str, provenance: dict[str, str]) -> None:
    """Put ``table`` (with this run's provenance) in place of the judge section at the end of ``page``,
    keeping everything before it; a page without one gets it appended."""
    text = page.read_text() if page.is_file() else ""
    head = text.split(JUDGE_SECTION)[0].rstrip()
    meta = "; ".join(f"{k} `{v}`" if k == "command" else f"{k} {v}" for k, v in provenance.items() if k != "seeds")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text((head + "\n\n" if head else "") + f"{JUDGE_SECTION}\n\nMeasured separately ({meta}).\n\n"
                    f"{table}\n")
    print(f"[benchmark] judge section of {page} replaced")


def plot(rows, path: Path, reward_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"Best-of-N": "C0", "SVDD-PM": "C1", "DSearch": "C2", "SMC": "C3", "Free2Guide": "C4", "DPS": "C5"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    base = [r for r in rows if r["method"] == "pretrained"]
    for key, ax in zip(("median", "top10"), axes):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "pretrained"):
            rs = [r for r in rows if r["method"] == method]
            ax.errorbar([r["multiple"] for r in rs], [r[key] for r in rs], yerr=[r[f"{key}_sd"] for r in rs],
                        marker="o", capsize=2, label=method, color=colours.get(method))
        if base:
            ax.axhline(base[0][key], color="k", ls="--", lw=1, label="pretrained")
        mults = sorted({r["multiple"] for r in rows if r["method"] != "pretrained"})
        ax.set_xscale("log", base=2), ax.set_xticks(mults, [f"{m}x" for m in mults])
        ax.set_xlabel("NFE budget per sample (x the plain sampler's T)"), ax.set_ylabel(f"{key} reward ({reward_name})")
    axes[1].legend(fontsize=7)
    fig.suptitle("Inference-time steering at equal NFE (tiny text-to-image, mean over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description="inference-time steering at equal NFE")
    p.add_argument("--steps", type=int, default=10, help="sampling steps T of the plain sampler")
    p.add_argument("--multiples", type=int, nargs="+", default=[4, 8, 16], help="budgets as multiples of T")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-prompt", type=int, default=2, help="samples per held-out prompt")
    p.add_argument("--batch", type=int, default=6, help="prompts per generate() call")
    p.add_argument("--reward", choices=["jpeg", "colour", "classifier"], default="jpeg")
    p.add_argument("--methods", nargs="*",
                   default=["pretrained", "Best-of-N", "SVDD-PM", "DSearch", "SMC", "Free2Guide", "DPS"])
    p.add_argument("--smc-alpha", type=float, default=0.01,
                   help="SMC potential temperature, in reward units (the reward's spread between candidates)")
    p.add_argument("--dps-scale", type=float, default=0.1, help="DPS step on the RMS-normalised gradient")
    p.add_argument("--free2guide-frac", type=float, default=0.1,
                   help="fraction of the first steps Free2Guide guides (issue 12: 10%%; the public code guides "
                        "steps 0-5 of 50, 12%%, the method's default)")
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts used (of 12; fewer for a smoke run)")
    p.add_argument("--no-results", action="store_true",
                   help="do not write benchmarks/results/inference_time_<reward>.md")
    p.add_argument("--judge-latency", type=float, default=0.2)
    p.add_argument("--judge-requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--skip-judge", action="store_true")
    p.add_argument("--judge-only", action="store_true",
                   help="only the judge throughput; replaces the judge section of the result page")
    p.add_argument("--out", default="runs/inference_time")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="only redraw the plot from earlier runs' JSON (later files replace a method's rows)")
    args = p.parse_args()
    if args.replot:
        rows: dict = {}
        for path in args.replot:
            data = json.loads(Path(path).read_text())
            for m in {r["method"] for r in data["steering"]}:
                rows = {k: v for k, v in rows.items() if k[0] != m}
            rows.update({(r["method"], r["multiple"]): r for r in data["steering"]})
        plot(list(rows.values()), Path(f"{args.out}.png"), data["args"]["reward"])
        print(f"wrote {args.out}.png")
        return

    if args.judge_only:
        judge = judge_throughput(args)
        table = judge_table(judge, args.judge_latency)
        print("\n" + table)
        if not args.no_results:
            from results_md import RESULTS, provenance

            replace_judge_section(RESULTS / f"inference_time_{args.reward}.md", table, provenance())
        return

    print(f"steering: T={args.steps}, budgets {[m * args.steps for m in args.multiples]} NFE/sample, "
          f"seeds {args.seeds}")
    rows = run_methods(args) if args.methods else []
    judge = [] if args.skip_judge else judge_throughput(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"args": vars(args), "steering": rows, "judge": judge}, indent=2))
    tables = []
    if rows:
        plot(rows, Path(f"{out}.png"), args.reward)
        lines = [f"Reward: {args.reward}; {len(args.seeds)} seeds x {args.prompts} held-out prompts x "
                 f"{args.per_prompt} samples; mean over seeds (± sd over seeds). Counted per output sample: NFE, "
                 "NFE with autograd, backward passes, decodes (VAE), reward calls.", "",
                 "| method | budget (x T) | width | NFE | NFE grad | backward | decodes | reward calls | median | "
                 "top-10% | diversity |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['multiple']} | {r['width']:.0f} | {r['nfe']:.1f} | "
                         f"{r['nfe_grad']:.1f} | {r['backward']:.1f} | {r['decodes']:.1f} | {r['reward_calls']:.1f} | "
                         f"{r['median']:.3f} ± {r['median_sd']:.3f} | {r['top10']:.3f} ± {r['top10_sd']:.3f} | "
                         f"{r['diversity']:.3f} |")
        verdicts = []
        for mult in args.multiples:
            at = {r["method"]: r for r in rows if r["multiple"] == mult}
            if {"SVDD-PM", "Best-of-N"} <= set(at):
                s, b = at["SVDD-PM"], at["Best-of-N"]
                line = (f"x{mult}: SVDD-PM vs Best-of-N median {s['median']:.3f} vs {b['median']:.3f} "
                        f"({'beats' if s['median'] > b['median'] else 'does NOT beat'})")
                if "DSearch" in at:
                    d = at["DSearch"]
                    line += (f"; DSearch vs SVDD-PM {d['median']:.3f} vs {s['median']:.3f} "
                             f"({'at least as good' if d['median'] >= s['median'] else 'worse'})")
                verdicts.append(line)
        tables += ["\n".join(lines), "\n\n".join(verdicts)] if verdicts else ["\n".join(lines)]
    if judge:
        tables.append(f"{JUDGE_SECTION}\n\n{judge_table(judge, args.judge_latency)}")
    for t in tables:
        print("\n" + t)
    if tables and not args.no_results:
        from results_md import write_result

        write_result(f"inference_time_{args.reward}", tables=tables, seeds=args.seeds,
                     title=f"Inference-time steering at equal NFE ({args.reward})",
                     notes="Tiny text-to-image default (embedded:tiny-shapes, 24 px), DDIM eta=1, CFG 3, "
                           f"T={args.steps}; budgets {[m * args.steps for m in args.multiples]} NFE per sample.")
    print(f"\nwrote {out}.json" + (f" and {out}.png" if rows else ""))


if __name__ == "__main__":
    main()
