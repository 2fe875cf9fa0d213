"""MLE vs DRIL on the tiny two-decoder BART, at equal steps, per answer-length bucket.

From the shipped pretrained model (``embedded:tiny-qa``), per seed: ``--steps`` optimiser steps of
``--batch`` examples with plain MLE (``sample_prob`` 0) and with DRIL (``sample_prob`` 0.5,
reconstruction weight 0.3), same learning rate. Then greedy answers and questions for ``--n``
held-out examples (towns never seen in training; the four buckets equally often), scored exactly
against the knowledge base: free-running answer fact accuracy, question-reconstruction ROUGE-L
against the gold question, bucket compliance and summary-centricity (MiniLM cosine).

Usage: python benchmarks/qa.py [--steps 150] [--seeds 0 1 2] [--n 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from results_md import record_stdout


def run(method: str, steps: int, batch: int, lr: float, seed: int, weight: float = 0.3,
        pretrained: str = "embedded:tiny-qa"):
    import lightning as L

    from domains.qa_text.data import QADataModule
    from domains.qa_text.model import TwoDecoderBart
    from rewardopt.methods.dril import DRIL

    L.seed_everything(seed, verbose=False)
    model = TwoDecoderBart(pretrained)
    if steps == 0:
        return model, 0.0
    m = DRIL(model, sample_prob=0.5 if method == "DRIL" else 0.0, reconstruction_weight=weight, lr=lr, seed=seed,
             output_dir=f"runs/qa_bench/{method}_{seed}")
    t0 = time.perf_counter()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0).fit(
        m, datamodule=QADataModule(batch_size=batch, seed=seed, max_val=8))
    return model, time.perf_counter() - t0


def print_table(results: dict[str, list[dict]], times: dict[str, list[float]], args) -> None:
    from domains.qa_text.generation import METRICS
    from domains.qa_text.kb import BUCKET_SENTENCES, BUCKETS

    def cell(method: str, bucket: str, metric: str) -> str:
        vals = [r[bucket][metric] for r in results[method]]
        return f"{statistics.mean(vals):.3f}" + (f" ± {statistics.pstdev(vals):.3f}" if len(vals) > 1 else "")

    print(f"\nTiny two-decoder BART, {args.n} held-out examples ({args.n // 4} per bucket) x {len(args.seeds)} seeds; "
          f"{args.steps} steps of {args.batch}, lr {args.lr}, DRIL weight {getattr(args, 'weight', 0.3)}; "
          "greedy decoding; mean ± sd over seeds.\n")
    names = {"fact_accuracy": "fact accuracy", "bucket_compliance": "bucket compliance",
             "question_rouge_l": "question ROUGE-L", "centricity": "centricity"}
    print("| bucket (sentences) | method | " + " | ".join(names[m] for m in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for b, nb in zip([*BUCKETS, "all"], [*BUCKET_SENTENCES, None]):
        for method in results:
            label = f"{b} ({nb})" if nb else "all"
            print(f"| {label} | {method} | " + " | ".join(cell(method, b, m) for m in METRICS) + " |")
    for method in ("MLE", "DRIL"):
        if times.get(method):
            print(f"{method}: {statistics.mean(times[method]):.0f} s training per seed")


def main() -> None:
    import torch

    from domains.qa_text.data import corpus
    from domains.qa_text.generation import METRICS, score, summarise

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--pretrained", default="embedded:tiny-qa", help="the model every run starts from")
    p.add_argument("--weight", type=float, default=0.3, help="DRIL's reconstruction weight (paper 0.3)")
    p.add_argument("--out", default="runs/qa_bench")
    p.add_argument("--table", metavar="QA_JSON", help="only print the table of an earlier run's qa.json")
    args = p.parse_args()
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print_table(saved["results"], saved["train_s"], argparse.Namespace(**saved["args"]))
        return
    torch.set_num_threads(2)
    _, val, kb = corpus()
    examples = val[: args.n]
    results: dict[str, list[dict]] = {}
    times: dict[str, list[float]] = {}
    for method, steps in (("pretrained", 0), ("MLE", args.steps), ("DRIL", args.steps)):
        for s in (args.seeds if steps else args.seeds[:1]):
            model, secs = run(method, steps, args.batch, args.lr, s, args.weight, args.pretrained)
            model.eval()
            gen = []
            with torch.no_grad():
                for k in range(0, len(examples), 32):
                    gen += model.generate(examples[k:k + 32])
            summ = summarise(score(examples, gen, kb))
            results.setdefault(method, []).append(summ)
            times.setdefault(method, []).append(secs)
            a = summ["all"]
            print(f"  {method:10s} seed {s}: " + " ".join(f"{m} {a[m]:.3f}" for m in METRICS) + f" ({secs:.0f} s)",
                  flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "qa.json").write_text(json.dumps({"args": vars(args), "results": results, "train_s": times},
                                                    indent=2))

    with record_stdout("qa", seeds=args.seeds, title="QA text: DRIL vs MLE"):
        print_table(results, times, args)


if __name__ == "__main__":
    main()
