"""Steering and DRAKES on discrete sequences: the tiny masked-diffusion molecule model.

For each oracle (RDKit QED, SA): pretrained, Best-of-N, SVDD-PM, SMC and DSearch at the same NFE
per molecule (``--multiple`` x the plain sampler's T), and DRAKES (fine-tuned on the
differentiable QED surrogate, then sampled plainly: T NFE per molecule; its training compute is
listed separately). Columns: median and top-10% of the oracle, validity (RDKit parses it),
uniqueness (distinct / valid), diversity (1 - mean pairwise Tanimoto of Morgan fingerprints), and
for DRAKES the surrogate it trained on next to the oracle (the over-optimisation gap).

Usage: python benchmarks/discrete.py [--steps 32] [--multiple 4] [--seeds 0 1 2] [--n 64]
Prints markdown tables; writes runs/discrete.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def evaluate(gen, x, oracle, surrogate=None) -> dict:
    smiles = gen.smiles(x)
    calls = oracle.calls
    import torch

    with torch.no_grad():
        vals = oracle(smiles).total.tolist()
        sur = surrogate(x).total.mean().item() if surrogate is not None else None
    oracle.calls = calls
    valid = [s for s in smiles if s]
    v = sorted(vals, reverse=True)
    k = max(1, round(0.1 * len(v)))
    return {"median": statistics.median(vals), "top10": sum(v[:k]) / k, "validity": len(valid) / len(smiles),
            "uniqueness": len(set(valid)) / max(1, len(valid)), "diversity": diversity(valid), "surrogate": sur}


def train_drakes(steps: int, T: int, seed: int):
    import lightning as L

    from rewardopt.data import UnconditionalDataModule
    from domains.molecules.generator import MoleculeGenerator
    from rewardopt.methods.drakes import DRAKES
    from rewardopt.rewards.surrogate import SequenceSurrogate

    L.seed_everything(seed, verbose=False)
    g = MoleculeGenerator("embedded:tiny-nci", num_steps=T, full_finetune=True)
    sur = SequenceSurrogate(97, 48, 64, checkpoint=str(ROOT / "domains/molecules/assets/surrogate_qed/surrogate.pt"))
    m = DRAKES(g, sur, truncate=max(1, round(T * 50 / 128)), kl_weight=1e-3, lr=1e-4, seed=seed,
               output_dir=f"runs/discrete/drakes_{seed}")
    t0 = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0).fit(
        m, datamodule=UnconditionalDataModule(batch_size=16, num_eval=16, val_batch_size=16))
    return g, sur, {"train_nfe": g.counter.nfe, "train_nfe_grad": g.counter.nfe_grad, "train_s": time.perf_counter() - t0}


def main() -> None:
    import torch

    from domains.molecules.generator import MoleculeGenerator
    from domains.molecules.rewards import QEDReward, SAReward
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD
    from rewardopt.rewards.surrogate import SequenceSurrogate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--multiple", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=64, help="molecules per method and seed")
    p.add_argument("--drakes-steps", type=int, default=100)
    p.add_argument("--smc-alpha", type=float, default=0.01)
    p.add_argument("--domains", nargs="+", default=["molecules", "dna"], choices=["molecules", "dna"])
    p.add_argument("--dna-smc-alpha", type=float, default=1.0)
    p.add_argument("--out", default="runs/discrete")
    args = p.parse_args()
    torch.set_num_threads(2)
    T, budget = args.steps, args.multiple * args.steps
    gen = MoleculeGenerator("embedded:tiny-nci", num_steps=T)
    results = []
    drakes = {s: train_drakes(args.drakes_steps, T, s) for s in args.seeds} if "molecules" in args.domains else {}
    sur = SequenceSurrogate(97, 48, 64, checkpoint=str(ROOT / "domains/molecules/assets/surrogate_qed/surrogate.pt"))
    for oracle_name, oracle in (("QED", QEDReward()), ("SA", SAReward())) if "molecules" in args.domains else ():
        methods = {
            "pretrained": lambda s: BestOfN(gen, oracle, n=1, seed=s, save_samples=False),
            "Best-of-N": lambda s: BestOfN(gen, oracle, budget=budget, seed=s, save_samples=False),
            "SVDD-PM": lambda s: SVDD(gen, oracle, budget=budget, seed=s, save_samples=False),
            "SMC": lambda s: SMC(gen, oracle, budget=budget, alpha=args.smc_alpha, seed=s, save_samples=False),
            "DSearch": lambda s: DSearch(gen, oracle, budget=budget, seed=s, save_samples=False),
        }
        for name, make in methods.items():
            per = []
            for s in args.seeds:
                m = make(s)
                n0, c0 = gen.counter.nfe, oracle.calls
                with torch.no_grad():
                    cond = gen.encode_condition([None] * args.n)
                    rng, srng = m.rngs(0)
                    x = m.search(cond, rng, srng)
                per.append({**evaluate(gen, x, oracle, sur), "nfe": (gen.counter.nfe - n0) / args.n,
                            "reward_calls": (oracle.calls - c0) / args.n})
            results.append(summarise(oracle_name, name, per))
        if oracle_name == "QED":
            per = []
            for s in args.seeds:
                g, _, info = drakes[s]
                with torch.no_grad():
                    x = g.sample(g.encode_condition([None] * args.n), generator=torch.Generator().manual_seed(10_000 + s))
                per.append({**evaluate(g, x, oracle, sur), "nfe": float(T), "reward_calls": 0.0, **info})
            results.append(summarise(oracle_name, "DRAKES (QED surrogate)", per))
    if "dna" in args.domains:
        results += run_dna(args, budget)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nTiny masked-diffusion molecule model (NCI SELFIES), T={T}; budget {budget} NFE/molecule "
          f"({args.multiple}x); {args.n} molecules x {len(args.seeds)} seeds; mean over seeds (± sd).\n")
    print("| oracle | method | NFE/sample | oracle calls/sample | median | top-10% | validity | uniqueness | diversity | second score |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['oracle']} | {r['method']} | {r['nfe']:.0f} | {r['reward_calls']:.0f} | {r['median']:.3f} ± {r['median_sd']:.3f} | "
              f"{r['top10']:.3f} ± {r['top10_sd']:.3f} | {r['validity']:.2f} | {r['uniqueness']:.2f} | {r['diversity']:.3f} | "
              f"{r['surrogate']:.3f} |")
    print("\nsecond score: molecules — the differentiable QED surrogate DRAKES trains on; DNA — the separate evaluation "
          "oracle (motif hit counts with other weights). DNA diversity: mean pairwise Hamming distance / L.")
    for d in (r for r in results if r["method"].startswith("DRAKES")):
        print(f"DRAKES ({d['oracle']}) training: {d.get('train_nfe', 0):.0f} NFE ({d.get('train_nfe_grad', 0):.0f} with grad), "
              f"{d.get('train_s', 0):.0f} s per seed, {args.drakes_steps} steps of 16 sequences.")
    print(f"wrote {out}.json")


def run_dna(args, budget: int) -> list[dict]:
    import lightning as L
    import torch

    from domains.dna.generator import DNAGenerator
    from domains.dna.motifs import MotifActivity, MotifHitActivity
    from rewardopt.data import UnconditionalDataModule
    from rewardopt.methods.best_of_n import BestOfN
    from rewardopt.methods.drakes import DRAKES
    from rewardopt.methods.dsearch import DSearch
    from rewardopt.methods.smc import SMC
    from rewardopt.methods.svdd import SVDD

    T = args.steps
    gen = DNAGenerator("embedded:tiny-dna", num_steps=T)
    oracle, held_out = MotifActivity(), MotifHitActivity()

    def evaluate_dna(g, x):
        calls = oracle.calls
        with torch.no_grad():
            vals, ev = oracle(x).total.tolist(), held_out(x).total.mean().item()
        oracle.calls = calls  # evaluation is not charged to the method
        seqs = g.to_text(x)
        ids = g.tokens(x).float()
        ham = torch.cdist(ids, ids, p=0) / ids.shape[1]  # differing positions / L
        n = len(seqs)
        v = sorted(vals, reverse=True)
        k = max(1, round(0.1 * n))
        return {"median": statistics.median(vals), "top10": sum(v[:k]) / k, "validity": 1.0,
                "uniqueness": len(set(seqs)) / n, "diversity": float(ham.sum() / (n * (n - 1))), "surrogate": ev}

    methods = {
        "pretrained": lambda s: BestOfN(gen, oracle, n=1, seed=s, save_samples=False),
        "Best-of-N": lambda s: BestOfN(gen, oracle, budget=budget, seed=s, save_samples=False),
        "SVDD-PM": lambda s: SVDD(gen, oracle, budget=budget, seed=s, save_samples=False),
        "SMC": lambda s: SMC(gen, oracle, budget=budget, alpha=args.dna_smc_alpha, seed=s, save_samples=False),
        "DSearch": lambda s: DSearch(gen, oracle, budget=budget, seed=s, save_samples=False),
    }
    results = []
    for name, make in methods.items():
        per = []
        for s in args.seeds:
            m = make(s)
            n0, c0 = gen.counter.nfe, oracle.calls
            with torch.no_grad():
                rng, srng = m.rngs(0)
                x = m.search(gen.encode_condition([None] * args.n), rng, srng)
            per.append({**evaluate_dna(gen, x), "nfe": (gen.counter.nfe - n0) / args.n,
                        "reward_calls": (oracle.calls - c0) / args.n})
        results.append(summarise("DNA motif activity", name, per))
    per = []
    for s in args.seeds:
        L.seed_everything(s, verbose=False)
        g = DNAGenerator("embedded:tiny-dna", num_steps=T, full_finetune=True)
        m = DRAKES(g, MotifActivity(), truncate=max(1, round(T * 50 / 128)), kl_weight=1e-3, lr=1e-4, seed=s,
                   output_dir=f"runs/discrete/drakes_dna_{s}")
        t0 = time.perf_counter()
        L.Trainer(max_steps=args.drakes_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0).fit(
            m, datamodule=UnconditionalDataModule(batch_size=16, num_eval=16, val_batch_size=16))
        info = {"train_nfe": g.counter.nfe, "train_nfe_grad": g.counter.nfe_grad, "train_s": time.perf_counter() - t0}
        with torch.no_grad():
            x = g.sample(g.encode_condition([None] * args.n), generator=torch.Generator().manual_seed(10_000 + s))
        per.append({**evaluate_dna(g, x), "nfe": float(T), "reward_calls": 0.0, **info})
    results.append(summarise("DNA motif activity", "DRAKES (training oracle)", per))
    return results


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
