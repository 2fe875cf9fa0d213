"""Super-resolution hallucinations on the embedded tiny x4 model (issue 17; Ren et al., "Hallucination Score",
arXiv 2507.14367): do the proxies track the oracle Hallucination Score, and does reward fine-tuning cut
hallucinations at equal fidelity?

1. **Correlation.** A pool of SR outputs of varying quality — the same held-out glyphs super-resolved with
   several sampler seeds, step counts, LR noise levels and CFG weights — each scored by the oracle HS
   (1 - P_oracle(true class | SR), the project's frozen HR classifier) and by every proxy: the deep-feature
   distances d_feat(SR, GT) and LPIPS-style (the feature network independent of the oracle), the GT-free
   d_feat(down(SR), LR), pixel MSE (= -PSNR) to the GT and to the LR, and the HS judge over HTTP (the
   project's served stand-in for an MLLM, shown LR | SR). Spearman's ρ of each with the oracle HS, with a
   95% percentile bootstrap interval (1,000 resamples of the outputs; the outputs of one glyph are not
   independent, so the intervals are optimistic).
2. **Mitigation.** ``recipes/super_resolution/draft_k_feature_tiny.yaml`` (DRaFT-K, K = 1: the SR model's
   denoising loss on (LR, GT) pairs + λ·(-d_feat(SR, GT))) trained per λ and seed; its plain samples on the
   held-out glyphs against the base model's (same noise): hallucination rate (oracle class flips), mean HS,
   the same flip rate by a second, independent classifier (the hacking check: ``embedded:sr-checker``, another
   architecture and training data), PSNR, and sharpness (mean gradient magnitude of SR / of GT). λ = 0 is the
   denoising-loss-only control.
3. **Inference time.** Best-of-N and SVDD with the GT-free proxy, Best-of-N with the judge, at 4x the plain
   sampler's NFE, from their recipes; the plain sampler (same η = 1 DDIM) and bicubic upsampling as references.

    python benchmarks/superres.py                        # 128 glyphs, 3 seeds, λ in 0 0.3 1 3
    python benchmarks/superres.py --glyphs 32 --seeds 0 --lambdas 0 1 --ft-steps 10 --no-page   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import statistics
import time
from pathlib import Path

import torch
import yaml
from results_md import RESULTS, write_result
from vard import build  # one recipe-section builder for the benchmarks

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "super_resolution"
JUDGE = "HS judge (LR | SR panel, HTTP; checker network)"
PIXEL = "pixel MSE to GT (= -PSNR)"
BENCH_SEED = 4242  # the held-out glyphs (pretraining used seeds 0/1, fine-tuning 10/11)
#: the correlation pool: (label, num_steps, noise_level, guidance_scale, sampler seed)
POOL = [
    ("20 steps", 20, 20, 1.0, 0),
    ("20 steps, another seed", 20, 20, 1.0, 1),
    ("5 steps", 5, 20, 1.0, 0),
    ("2 steps", 2, 20, 1.0, 0),
    ("noise level 150", 20, 150, 1.0, 0),
    ("noise level 300", 20, 300, 1.0, 0),
    ("CFG 4", 20, 20, 4.0, 0),
    ("CFG 8", 20, 20, 8.0, 0),
]
STEERING = {  # label -> recipe
    "Best-of-N (GT-free proxy)": "best_of_n_lr_proxy_tiny",
    "SVDD (GT-free proxy)": "svdd_lr_proxy_tiny",
    "Best-of-N (HS judge)": "best_of_n_judge_tiny",
}


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def held_out(n: int) -> list[dict]:
    from domains.super_resolution.glyphs import GlyphDataset
    from domains.super_resolution.upscaler import glyph_conditions

    return glyph_conditions(GlyphDataset(n, 32, BENCH_SEED), range(n), seed=BENCH_SEED)


def generator(**overrides):
    spec = copy.deepcopy(recipe("draft_k_feature_tiny")["model"]["init_args"]["generator"])
    spec["init_args"].update(lora_rank=None, gradient_checkpointing=False, **overrides)
    return build(spec).eval()


@torch.no_grad()
def super_resolve(g, conds: list[dict], seed: int, batch: int = 64) -> torch.Tensor:
    out = []
    for b in range(0, len(conds), batch):
        cond = g.encode_condition(conds[b:b + batch])
        rng = torch.Generator().manual_seed(seed * 100_003 + b)
        out.append(g.decode(g.sample(cond, generator=rng)))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------ scoring
class Scorer:
    """Every figure of a set of SR outputs: the oracle and checker, the proxies, fidelity, sharpness."""

    def __init__(self, judge_url: str | None):
        from domains.super_resolution.hallucination import OracleHallucination
        from domains.super_resolution.rewards import (
            FeatureDistance,
            HallucinationJudge,
            LPIPSStyleDistance,
            LRFeatureDistance,
            PixelDistance,
        )

        self.oracle = OracleHallucination()
        self.checker = OracleHallucination("embedded:sr-checker")
        self.proxies = {
            "d_feat(SR, GT)": FeatureDistance(),
            "LPIPS-style(SR, GT)": LPIPSStyleDistance(),
            "d_feat(down(SR), LR) (GT-free)": LRFeatureDistance(),
            PIXEL: PixelDistance("hr"),
            "pixel MSE of down(SR) to LR (GT-free)": PixelDistance("lr"),
        }
        if judge_url is not None:
            self.proxies[JUDGE] = HallucinationJudge(judge_url, timeout_s=60)

    @torch.no_grad()
    def __call__(self, sr: torch.Tensor, conds: list[dict], proxies: bool = False) -> dict[str, torch.Tensor]:
        o, c = self.oracle(sr, conds), self.checker(sr, conds)
        gt = torch.stack([d["hr"] for d in conds])
        mse = (sr - gt).pow(2).flatten(1).mean(1)
        res = {"hs": o.terms["hs"], "flip": o.terms["flip"], "checker_flip": c.terms["flip"],
               "psnr": -10 * torch.log10(mse.clamp_min(1e-10)), "sharpness": sharpness(sr) / sharpness(gt).mean()}
        if proxies:
            for k, r in self.proxies.items():
                res[k] = -r(sr, conds).total  # a distance / rating: higher = worse
        return res


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude per image (finite differences, grey level)."""
    grey = images.mean(1)
    gx, gy = grey[:, :, 1:] - grey[:, :, :-1], grey[:, 1:, :] - grey[:, :-1, :]
    return (gx.abs().flatten(1).mean(1) + gy.abs().flatten(1).mean(1)) / 2


def summarise(res: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"halluc": float(res["flip"].mean()), "hs": float(res["hs"].mean()),
            "checker": float(res["checker_flip"].mean()), "psnr": float(res["psnr"].mean()),
            "sharp": float(res["sharpness"].mean())}


# ------------------------------------------------------------------------------------------ 1. correlation
def run_correlation(args, scorer: Scorer, conds: list[dict]) -> tuple[list[dict], dict, list[dict]]:
    from rewardopt.stats import correlation_table, difference_ci

    pooled: dict[str, list[float]] = {"glyph": []}
    per_config = []
    for label, steps, level, cfg, seed in POOL:
        g = generator(num_steps=steps, noise_level=level, guidance_scale=cfg, eta=0.0)
        t0 = time.perf_counter()
        sr = super_resolve(g, conds, seed)
        res = scorer(sr, conds, proxies=True)
        for k, v in res.items():
            pooled.setdefault(k, []).extend(v.tolist())
        pooled["glyph"].extend(range(len(conds)))
        per_config.append({"config": label, **summarise(res)})
        print(f"  pool {label:18s} halluc {per_config[-1]['halluc']:.3f}  HS {per_config[-1]['hs']:.3f}  "
              f"PSNR {per_config[-1]['psnr']:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    # the cluster bootstrap: a glyph's 8 outputs are resampled together (they are not independent)
    kw = dict(n_boot=args.n_boot, seed=0, groups=pooled["glyph"])
    table = correlation_table({k: pooled[k] for k in scorer.proxies}, pooled["hs"], **kw)
    flips = correlation_table({k: pooled[k] for k in scorer.proxies}, pooled["flip"], **kw)
    rows = []
    for k in scorer.proxies:
        row = {"proxy": k, "rho_hs": table[k].value, "lo": table[k].low, "hi": table[k].high,
               "rho_flip": flips[k].value, "flo": flips[k].low, "fhi": flips[k].high}
        if k != PIXEL:  # is it better than the pixel metric? rho(proxy) - rho(pixel MSE), same resamples
            d = difference_ci(pooled[k], pooled[PIXEL], pooled["hs"], **kw)
            row.update(diff=d.value, dlo=d.low, dhi=d.high)
        rows.append(row)
    return rows, pooled, per_config


# ------------------------------------------------------------------------------------------ 2. mitigation
def run_mitigation(args, scorer: Scorer, conds: list[dict]) -> tuple[list[dict], dict]:
    from rewardopt.cli import RewardOptCLI

    rows, examples = [], {}
    base_done = set()
    for lam in args.lambdas:
        for seed in args.seeds:
            out = Path(args.out) / f"draft_lambda{lam:g}_seed{seed}"
            cli = RewardOptCLI(args=["--config", str(RECIPES / "draft_k_feature_tiny.yaml"),
                                     f"--seed_everything={seed}", f"--model.init_args.seed={seed}",
                                     f"--model.init_args.reward_weight={lam}",
                                     f"--trainer.default_root_dir={out}", f"--trainer.max_steps={args.ft_steps}",
                                     f"--trainer.logger.init_args.save_dir={out}",
                                     "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
                                     "--trainer.limit_val_batches=0", f"--model.init_args.output_dir={out}"],
                               run=False)
            t0 = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            wall = time.perf_counter() - t0
            g = cli.model.generator.eval()
            counts = g.counter.state_dict()
            sr = super_resolve(g, conds, 7_000 + seed)
            r = summarise(scorer(sr, conds))
            rows.append({"lambda": lam, "seed": seed, "train_wall_s": wall, "nfe_train": counts["nfe"], **r})
            if seed == args.seeds[0]:
                examples[f"λ = {lam:g}"] = sr
            if seed not in base_done:  # the base model, same noise, once per seed
                with g.base_model():
                    sr0 = super_resolve(g, conds, 7_000 + seed)
                rows.append({"lambda": None, "seed": seed, "train_wall_s": 0.0, "nfe_train": 0,
                             **summarise(scorer(sr0, conds))})
                base_done.add(seed)
                if seed == args.seeds[0]:
                    examples["base"] = sr0
            print(f"  DRaFT-K λ={lam:g} seed {seed}: halluc {r['halluc']:.3f}  checker {r['checker']:.3f}  "
                  f"PSNR {r['psnr']:.2f}  sharp {r['sharp']:.2f}  ({wall:.0f} s)", flush=True)
            (Path(args.out) / "mitigation_partial.json").write_text(json.dumps(rows, indent=1))
    return rows, examples


# ------------------------------------------------------------------------------------------ 3. steering
def run_steering(args, scorer: Scorer, conds: list[dict], judge_url: str | None) -> list[dict]:
    from domains.super_resolution.glyphs import upsample
    from rewardopt.methods.best_of_n import BestOfN

    gen = build(recipe("best_of_n_lr_proxy_tiny")["model"]["init_args"]["generator"]).eval()
    lr = torch.stack([d["image"] for d in conds])
    rows = [{"method": "bicubic upsampling", "nfe": 0.0, "calls": 0.0, "wall": 0.0, "seed": args.seeds[0],
             **summarise(scorer(upsample(lr), conds))}]  # deterministic: one row
    labels = ["plain sampler (η = 1)"] + [k for k in STEERING if judge_url is not None or "judge" not in k]
    for label in labels:
        for seed in args.seeds:
            if label.startswith("plain"):
                reward = build(recipe("best_of_n_lr_proxy_tiny")["model"]["init_args"]["reward"])
                m = BestOfN(gen, reward, n=1, seed=seed, save_samples=False)
            else:
                spec = copy.deepcopy(recipe(STEERING[label])["model"])
                if judge_url is not None and spec["init_args"]["reward"]["class_path"].endswith("HallucinationJudge"):
                    spec["init_args"]["reward"]["init_args"]["base_url"] = judge_url
                init = {k: v for k, v in spec["init_args"].items() if k not in ("generator", "reward", "eval_reward")}
                module, _, cname = spec["class_path"].rpartition(".")
                cls = getattr(importlib.import_module(module), cname)
                m = cls(gen, build(spec["init_args"]["reward"]), **{**init, "seed": seed, "save_samples": False})
            c0 = m.counts()
            t0 = time.perf_counter()
            srs = []
            for b in range(0, len(conds), args.batch):
                samples, _ = m.generate(conds[b:b + args.batch], batch_idx=b)
                srs.append(samples)
            wall = time.perf_counter() - t0
            c1 = m.counts()
            rows.append({"method": label, "seed": seed, "nfe": (c1["nfe"] - c0["nfe"]) / len(conds),
                         "calls": (c1["reward_calls"] - c0["reward_calls"]) / len(conds), "wall": wall / len(conds),
                         **summarise(scorer(torch.cat(srs), conds))})
            r = rows[-1]
            print(f"  {label:28s} seed {seed}: halluc {r['halluc']:.3f}  checker {r['checker']:.3f}  "
                  f"PSNR {r['psnr']:.2f}  NFE {r['nfe']:.0f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ tables and figures
def mean_sd(vals: list[float], fmt: str = "{:.3f}") -> str:
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def correlation_md(rows: list[dict], n: int) -> str:
    lines = [f"### Proxies vs the oracle Hallucination Score ({n} SR outputs)", "",
             "| proxy (a distance or rating: higher = worse) | Spearman ρ with oracle HS [95% CI] | "
             "ρ − ρ(pixel MSE to GT) [95% CI] | ρ with the class flip [95% CI] |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["rho_hs"]):
        name = r["proxy"].replace("|", "\\|")  # a markdown cell
        diff = f"{r['diff']:+.3f} [{r['dlo']:+.3f}, {r['dhi']:+.3f}]" if "diff" in r else "—"
        lines.append(f"| {name} | {r['rho_hs']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {diff} | "
                     f"{r['rho_flip']:+.3f} [{r['flo']:+.3f}, {r['fhi']:+.3f}] |")
    return "\n".join(lines)


def pool_md(rows: list[dict]) -> str:
    lines = ["### The pool: quality of each sampler setting", "",
             "| setting | hallucination rate (oracle) | mean oracle HS | checker flip rate | PSNR (dB) | "
             "sharpness (SR/GT) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['halluc']:.3f} | {r['hs']:.3f} | {r['checker']:.3f} | {r['psnr']:.2f} | "
                     f"{r['sharp']:.2f} |")
    return "\n".join(lines)


def group(rows: list[dict], key: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def mitigation_md(rows: list[dict], steps: int) -> str:
    lines = [f"### DRaFT-K (K = 1) fine-tuning, {steps} steps: denoising loss + λ·(-d_feat(SR, GT))", "",
             "| model | seeds | hallucination rate (oracle flips) | mean oracle HS | checker flip rate (hacking "
             "check) | PSNR (dB) | sharpness (SR/GT) | training NFE |", "|---|---|---|---|---|---|---|---|"]
    for lam, rs in group(rows, "lambda").items():
        name = "base model (no fine-tuning)" if lam is None else (
            "λ = 0 (denoising loss only)" if lam == 0 else f"λ = {lam:g}")
        nfe = statistics.mean(r["nfe_train"] for r in rs)
        lines.append(f"| {name} | {len(rs)} | {mean_sd([r['halluc'] for r in rs])} | "
                     f"{mean_sd([r['hs'] for r in rs])} | {mean_sd([r['checker'] for r in rs])} | "
                     f"{mean_sd([r['psnr'] for r in rs], '{:.2f}')} | {mean_sd([r['sharp'] for r in rs], '{:.2f}')} | "
                     f"{nfe:.0f} |")
    return "\n".join(lines)


def steering_md(rows: list[dict]) -> str:
    lines = ["### Inference-time steering at 4x the plain sampler's NFE", "",
             "| method | seeds | NFE per output | reward calls per output | wall per output (x plain) | "
             "hallucination rate (oracle) | mean oracle HS | checker flip rate | PSNR (dB) | sharpness (SR/GT) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    plain = [r["wall"] for r in rows if r["method"].startswith("plain")]
    base = statistics.mean(plain) if plain else float("nan")
    for label, rs in group(rows, "method").items():
        wall = statistics.mean(r["wall"] for r in rs) / base if rs[0]["wall"] else 0.0
        lines.append(f"| {label} | {len(rs)} | {statistics.mean(r['nfe'] for r in rs):.0f} | "
                     f"{statistics.mean(r['calls'] for r in rs):.0f} | {wall:.1f} | "
                     f"{mean_sd([r['halluc'] for r in rs])} | {mean_sd([r['hs'] for r in rs])} | "
                     f"{mean_sd([r['checker'] for r in rs])} | {mean_sd([r['psnr'] for r in rs], '{:.2f}')} | "
                     f"{mean_sd([r['sharp'] for r in rs], '{:.2f}')} |")
    return "\n".join(lines)


def pareto_png(mitigation: list[dict], steering: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    pts = []
    for lam, rs in group(mitigation, "lambda").items():
        x = [r["psnr"] for r in rs]
        y = [r["halluc"] for r in rs]
        label = "base" if lam is None else f"λ={lam:g}"
        pts.append((statistics.mean(x), statistics.mean(y), label))
        ax.errorbar(statistics.mean(x), statistics.mean(y), xerr=statistics.pstdev(x), yerr=statistics.pstdev(y),
                    fmt="o", color="black" if lam is None else "tab:blue", capsize=2)
        ax.annotate(label, (statistics.mean(x), statistics.mean(y)), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    lam_pts = sorted((p for p in pts if p[2] != "base"), key=lambda p: float(p[2][2:]))
    ax.plot([p[0] for p in lam_pts], [p[1] for p in lam_pts], "-", color="tab:blue", alpha=0.5,
            label="DRaFT-K over λ (mean ± SD over seeds)")
    for label, rs in group(steering, "method").items():
        x, y = statistics.mean(r["psnr"] for r in rs), statistics.mean(r["halluc"] for r in rs)
        ax.scatter([x], [y], marker="s", s=28)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, -9), fontsize=7)
    ax.set_xlabel("PSNR to ground truth (dB) →")
    ax.set_ylabel("hallucination rate (oracle class flips) ↓")
    ax.set_title("Tiny x4 SR: hallucinations vs fidelity")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def panels_png(conds: list[dict], examples: dict[str, torch.Tensor], scorer: Scorer, path: Path, n: int = 8) -> Path:
    """For each of ``n`` glyphs a row per model: LR | SR | GT | |SR - GT|, captioned with HS and d_feat."""
    from domains.super_resolution.panels import comparison_rows, save_panel

    sub = conds[:n]
    rows = []
    for name, sr in examples.items():
        s = sr[:n]
        res = scorer(s, sub, proxies=False)
        d = -scorer.proxies["d_feat(SR, GT)"](s, sub).total
        label = name.replace("λ", "lambda")  # PIL's default font has no Greek
        rows.append((label, s, [f"HS {h:.2f} d {v:.3f}" for h, v in zip(res["hs"].tolist(), d.tolist())]))
    return save_panel(comparison_rows(sub, rows), path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glyphs", type=int, default=128, help="held-out glyphs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    p.add_argument("--ft-steps", type=int, default=150)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--parts", nargs="+", default=["correlation", "mitigation", "steering"])
    p.add_argument("--no-judge", action="store_true", help="skip the HTTP judge (proxy row and Best-of-N)")
    p.add_argument("--out", default="runs/bench_superres")
    p.add_argument("--report", action="store_true",
                   help="write the page from the parts already saved in --out (parts run side by side as separate "
                        "processes, e.g. --parts mitigation and --parts correlation steering)")
    p.add_argument("--command", default=None, help="the command line to record on the page (with --report)")
    p.add_argument("--no-page", action="store_true", help="print only; do not write benchmarks/results/superres.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conds = held_out(args.glyphs)
    if not args.report:
        run_parts(args, conds)
    results = {}
    for part in ("correlation", "mitigation", "steering"):
        f = out / f"part_{part}.json"
        if f.is_file():
            results[part] = json.loads(f.read_text())
    tables = []
    if "correlation" in results:
        r = results["correlation"]
        tables += [correlation_md(r["rows"], r["n"]), pool_md(r["pool"])]
    if "mitigation" in results:
        tables.append(mitigation_md(results["mitigation"]["rows"], results["mitigation"]["steps"]))
    if "steering" in results:
        tables.append(steering_md(results["steering"]["rows"]))
    for t in tables:
        print("\n" + t)
    if args.no_page:
        return
    figures = []
    if "mitigation" in results:
        mit = results["mitigation"]
        figures.append(pareto_png(mit["rows"], results.get("steering", {}).get("rows", []),
                                  RESULTS / "superres_pareto.png"))
        examples = {k: torch.load(out / "examples.pt")[k] for k in mit["examples"]}
        figures.append(panels_png(conds, examples, Scorer(None), RESULTS / "superres_panels.png"))
    seeds = sorted({s for part in results.values() for s in part.get("seeds", [])})
    steps = results.get("mitigation", {}).get("steps", args.ft_steps)
    notes = NOTES.format(glyphs=args.glyphs, steps=steps, figures=", ".join(f"`{f.name}`" for f in figures))
    write_result("superres", tables, seeds=seeds or args.seeds, notes=notes, command=args.command,
                 title="Super-resolution hallucinations (tiny x4 glyphs)")


def run_parts(args, conds: list[dict]) -> None:
    """Run the requested parts and save each as ``part_<name>.json`` in ``--out``."""
    from contextlib import nullcontext

    from domains.super_resolution.judge import serve

    out = Path(args.out)
    need_judge = not args.no_judge and bool({"correlation", "steering"} & set(args.parts))
    # the judge reads SR tiles with the checker, not the oracle that grades every table (no circularity)
    with (serve(port=0, oracle="embedded:sr-checker") if need_judge else nullcontext()) as server:
        url = None if server is None else server.base_url
        scorer = Scorer(url)
        if "correlation" in args.parts:
            print("correlation pool", flush=True)
            corr, pooled, per_config = run_correlation(args, scorer, conds)
            (out / "part_correlation.json").write_text(json.dumps(
                {"rows": corr, "pool": per_config, "n": len(pooled["hs"]), "seeds": [c[4] for c in POOL]}, indent=1))
        if "mitigation" in args.parts:
            print("mitigation", flush=True)
            mit, examples = run_mitigation(args, scorer, conds)
            torch.save({k: v[:8].clone() for k, v in examples.items()}, out / "examples.pt")
            (out / "part_mitigation.json").write_text(json.dumps(
                {"rows": mit, "steps": args.ft_steps, "examples": list(examples), "seeds": args.seeds}, indent=1))
        if "steering" in args.parts:
            print("steering", flush=True)
            steer = run_steering(args, scorer, conds, url)
            (out / "part_steering.json").write_text(json.dumps({"rows": steer, "seeds": args.seeds}, indent=1))


NOTES = """\
{glyphs} held-out glyphs (`GlyphDataset` seed 4242, never seen in pretraining or fine-tuning), 32x32 ground truth,
8x8 LR inputs (antialiased bicubic x4). The oracle Hallucination Score is 1 - P(true class | SR) under the frozen
HR classifier `embedded:sr-oracle`; a hallucination is a class flip (the oracle's argmax is not the true class).
The checker (`embedded:sr-checker`, a patch-mixer: another architecture, other data seeds and augmentation) repeats
the flip count: outputs that only the oracle reads as right would lower its count and not the checker's. The HS
judge is served here with the checker as its HR network (`serve(oracle="embedded:sr-checker")`; the default serves
the oracle's), so the judge row of the correlation table and judge-chosen Best-of-N are graded by a network the judge
never used; the checker column of that row is the judge's own network and is not an independent check. The judge
still reads the LR with `embedded:sr-lr-classifier` and never sees the ground truth. Correlation intervals are a
cluster bootstrap over glyphs (each glyph's 8 outputs resampled together), 1,000 resamples; "ρ − ρ(pixel)" is the
difference to the pixel metric on the same resamples. The feature network is trained on other characters than the
10 classes (disjoint labels) but with the same renderer and fonts: independent of the oracle's weights and labels,
not of the image distribution.
Proxies use the feature network `embedded:sr-features` (another architecture, trained only on characters outside
the 10 classes), never the oracle. Fine-tuning: {steps} steps of the committed DRaFT-K recipe per λ and seed,
batch 8; evaluation: the plain 20-step DDIM sampler on the held-out glyphs, base and fine-tuned with the same noise.
Figures: {figures}.
"""


if __name__ == "__main__":
    main()
