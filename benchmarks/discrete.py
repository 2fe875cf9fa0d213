"""Steering and DRAKES on discrete sequences: the tiny masked-diffusion molecule and DNA models.

For each task (RDKit QED, SA; the DNA motif-activity oracle): pretrained, Best-of-N, SVDD-PM, SMC
and DSearch at the same NFE per sample (``--multiple`` x the plain sampler's T), and DRAKES
(fine-tuned on a differentiable reward, then sampled plainly: T NFE per sample; its training
compute is listed separately). Columns: median and top-10% of the oracle, validity, uniqueness
(distinct / valid), diversity, and a second score that shows over-optimisation: for molecules the
surrogate DRAKES trains on (vs the RDKit oracle), for DNA the separate evaluation oracle.

Usage: python benchmarks/discrete.py [--domains molecules dna] [--steps 32] [--multiple 4] [--seeds 0 1 2] [--n 64]
       [--drakes-steps 100 --drakes-lr 1e-4 --drakes-kl 1e-3]
Prints markdown tables; writes runs/discrete.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from results_md import record_stdout

ROOT = Path(__file__).resolve().parents[1]


def diversity(smiles: list[str | None]) -> float:
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles if s]
    if len(fps) < 2:
        return 0.0
    sims = []
    for i in range(len(fps)):
        sims += DataStructs.BulkTanimotoSimilarity(fps[i], fps[i + 1:])
    return 1.0 - sum(sims) / len(sims)


METHODS = ["pretrained", "Best-of-N", "SVDD-PM", "SMC", "DSearch", "DRAKES"]
SURROGATES = {"QED": "surrogate_qed", "SA": "surrogate_sa"}


def molecule_surrogate(oracle: str):
    from rewardopt.rewards.surrogate import SequenceSurrogate

    path = ROOT / "domains/molecules/assets" / SURROGATES[oracle] / "surrogate.pt"
    if not path.exists():
        return None
    return SequenceSurrogate(97, 48, 64, checkpoint=str(path), name=f"{oracle.lower()}_surrogate")


def molecule_tasks() -> list[dict]:
    """QED and SA: steering uses the RDKit oracle (black-box); DRAKES trains on the oracle's
    differentiable surrogate; the second score is that surrogate."""
    from domains.molecules.generator import MoleculeGenerator
    from domains.molecules.rewards import QEDReward, SAReward

    def evaluate(g, x, oracle, second):
        import torch

        smiles = g.smiles(x)
        with torch.no_grad():
            vals = oracle(smiles).total.tolist()
            sec = second(x).total.mean().item() if second is not None else None
        valid = [s for s in smiles if s]
        return {**top_stats(vals), "validity": len(valid) / len(smiles),
                "uniqueness": len(set(valid)) / max(1, len(valid)), "diversity": diversity(valid), "second": sec}

    tasks = []
    for name, oracle in (("QED", QEDReward()), ("SA", SAReward())):
        sur = molecule_surrogate(name)
        tasks.append({"name": name,
                      "generator": lambda T, ft=False: MoleculeGenerator("embedded:tiny-nci", num_steps=T,
                                                                         full_finetune=ft),
                      "oracle": oracle, "second": sur, "drakes_reward": sur,
                      "drakes_label": f"DRAKES ({name} surrogate)", "evaluate": evaluate})
    return tasks


def dna_tasks() -> list[dict]:
    """The motif-activity oracle: steering and DRAKES both use it (it is differentiable); the second
    score is the separate evaluation oracle (motif hit counts, other weights)."""
    import torch

    from domains.dna.generator import DNAGenerator
    from domains.dna.motifs import MotifActivity, MotifHitActivity

    def evaluate(g, x, oracle, second):
        with torch.no_grad():
            vals, sec = oracle(x).total.tolist(), second(x).total.mean().item()
        seqs = g.to_text(x)
        ids = g.tokens(x).float()
        n = len(seqs)
        ham = torch.cdist(ids, ids, p=0) / ids.shape[1]  # differing positions / L
        return {**top_stats(vals), "validity": 1.0, "uniqueness": len(set(seqs)) / n,
                "diversity": float(ham.sum() / (n * (n - 1))), "second": sec}

    oracle = MotifActivity()
    return [{"name": "DNA motif activity",
             "generator": lambda T, ft=False: DNAGenerator("embedded:tiny-dna", num_steps=T, full_finetune=ft),
             "oracle": oracle, "second": MotifHitActivity(), "drakes_reward": oracle,
             "drakes_label": "DRAKES (training oracle)", "evaluate": evaluate, "dna": True}]


def top_stats(vals: list[float]) -> dict:
    v = sorted(vals, reverse=True)
    k = max(1, round(0.1 * len(v)))
    return {"median": statistics.median(vals), "top10": sum(v[:k]) / k}


def measured(task: dict, g, x, **extra) -> dict:
    """The task's evaluation of samples x; oracle calls made here are not charged to the method."""
    oracle = task["oracle"]
    calls = oracle.calls
    out = task["evaluate"](g, x, oracle, task["second"])
    oracle.calls = calls
    return {**out, **extra}


def run_task(task: dict, args) -> list[dict]:
    """Pretrained, Best-of-N, SVDD-PM, SMC and DSearch at ``args.multiple`` x T NFE per sample, and
    DRAKES (fine-tuned on the task's differentiable reward, then sampled plainly), over the seeds."""
    import lightning as L
    import torch

    from rewardopt.data import UnconditionalDataModule
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.methods.drakes import DRAKES
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD

    T, budget, oracle = args.steps, args.multiple * args.steps, task["oracle"]
    gen = task["generator"](T)
    alpha = args.dna_smc_alpha if task.get("dna") else args.smc_alpha
    methods = {
        "pretrained": lambda s: BestOfN(gen, oracle, n=1, seed=s, save_samples=False),
        "Best-of-N": lambda s: BestOfN(gen, oracle, budget=budget, seed=s, save_samples=False),
        "SVDD-PM": lambda s: SVDD(gen, oracle, budget=budget, seed=s, save_samples=False),
        "SMC": lambda s: SMC(gen, oracle, budget=budget, alpha=alpha, seed=s, save_samples=False),
        "DSearch": lambda s: DSearch(gen, oracle, budget=budget, seed=s, save_samples=False),
    }
    results = []
    for name, make in methods.items():
        if name not in args.methods:
            continue
        per = []
        for s in args.seeds:
            m = make(s)
            n0, c0 = gen.counter.nfe, oracle.calls
            with torch.no_grad():
                rng, srng = m.rngs(0)
                x = m.search(gen.encode_condition([None] * args.n), rng, srng)
            per.append(measured(task, gen, x, nfe=(gen.counter.nfe - n0) / args.n,
                                reward_calls=(oracle.calls - c0) / args.n))
        results.append(summarise(task["name"], name, per))
    if task["drakes_reward"] is None or args.drakes_steps <= 0 or "DRAKES" not in args.methods:
        return results
    per = []
    for s in args.seeds:
        L.seed_everything(s, verbose=False)
        g = task["generator"](T, True)
        m = DRAKES(g, task["drakes_reward"], truncate=max(1, round(T * 50 / 128)), kl_weight=args.drakes_kl,
                   lr=args.drakes_lr, seed=s, output_dir=f"{args.out}/drakes_{task['name'].replace(' ', '_')}_{s}")
        t0 = time.perf_counter()
        L.Trainer(max_steps=args.drakes_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  gradient_clip_val=1.0).fit(
            m, datamodule=UnconditionalDataModule(batch_size=args.drakes_batch, num_eval=16, val_batch_size=16))
        info = {"train_nfe": g.counter.nfe, "train_nfe_grad": g.counter.nfe_grad, "train_s": time.perf_counter() - t0}
        with torch.no_grad():
            x = g.sample(g.encode_condition([None] * args.n), generator=torch.Generator().manual_seed(10_000 + s))
        per.append(measured(task, g, x, nfe=float(T), reward_calls=0.0, **info))
    results.append(summarise(task["name"], task["drakes_label"], per))
    return results


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--multiple", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=64, help="samples per method and seed")
    p.add_argument("--drakes-steps", type=int, default=100)
    p.add_argument("--drakes-lr", type=float, default=1e-4)
    p.add_argument("--drakes-kl", type=float, default=1e-3)
    p.add_argument("--drakes-batch", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--smc-alpha", type=float, default=0.01)
    p.add_argument("--domains", nargs="+", default=["molecules", "dna"], choices=["molecules", "dna"])
    p.add_argument("--dna-smc-alpha", type=float, default=1.0)
    p.add_argument("--out", default="runs/discrete")
    args = p.parse_args()
    torch.set_num_threads(2)
    tasks = (molecule_tasks() if "molecules" in args.domains else []) + (dna_tasks() if "dna" in args.domains else [])
    results = [r for task in tasks for r in run_task(task, args)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    with record_stdout("discrete", seeds=args.seeds, title="Discrete steering and DRAKES: molecules and DNA"):
        print(f"\nTiny masked-diffusion models, T={args.steps}; budget {args.multiple * args.steps} NFE/sample "
              f"({args.multiple}x); {args.n} samples x {len(args.seeds)} seeds; mean over seeds (± sd).\n")
        print("| oracle | method | NFE/sample | oracle calls/sample | median | top-10% "
              "| validity | uniqueness | diversity | second score |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            sec = f"{r['second']:.3f}" if "second" in r else "-"
            print(f"| {r['oracle']} | {r['method']} | {r['nfe']:.0f} | {r['reward_calls']:.0f} "
                  f"| {r['median']:.3f} ± {r['median_sd']:.3f} | {r['top10']:.3f} ± {r['top10_sd']:.3f} "
                  f"| {r['validity']:.2f} | {r['uniqueness']:.2f} | {r['diversity']:.3f} | {sec} |")
        print("\nsecond score: molecules — the differentiable surrogate of that oracle (what DRAKES trains on); "
              "DNA — the separate evaluation oracle (motif hit counts with other weights). Molecule diversity: "
              "1 - mean pairwise Tanimoto (Morgan r=2); DNA diversity: mean pairwise Hamming distance / L.")
        for d in (r for r in results if r["method"].startswith("DRAKES")):
            print(f"{d['method']} on {d['oracle']}: {d.get('train_nfe', 0):.0f} training NFE "
                  f"({d.get('train_nfe_grad', 0):.0f} with grad), {d.get('train_s', 0):.0f} s per seed, "
                  f"{args.drakes_steps} steps of {args.drakes_batch} sequences, lr {args.drakes_lr}.")
        print(f"wrote {out}.json")


def summarise(oracle: str, method: str, per: list[dict]) -> dict:
    keys = [k for k in per[0] if per[0][k] is not None]
    agg = {k: statistics.mean(p[k] for p in per) for k in keys}
    agg.update({f"{k}_sd": statistics.pstdev([p[k] for p in per]) for k in ("median", "top10")})
    r = {"oracle": oracle, "method": method, **agg}
    print(f"  {oracle} {method:24s} median {r['median']:.3f} top10 {r['top10']:.3f} valid {r['validity']:.2f} "
          f"uniq {r['uniqueness']:.2f} div {r['diversity']:.3f} NFE {r['nfe']:.0f}", flush=True)
    return r


if __name__ == "__main__":
    main()
