"""``rewardopt predict`` for QA pairs: the answer (decoder 1, greedy or sampled) and then the
question (decoder 2, attending to the generated answer) for held-out articles, scored and written
as JSON lines: article id, question, answer, bucket and scores (exact fact accuracy, bucket
compliance, question ROUGE-L against the gold question, summary-centricity)."""

from __future__ import annotations

import json
import statistics
from typing import Any

import lightning as L
import torch

from domains.qa_text.kb import BUCKETS, Town, check_facts
from domains.qa_text.model import TwoDecoderBart
from domains.qa_text.rewards import SummaryCentricity, bucket_compliant, rouge_l
from rewardopt.run import RunMixin

METRICS = ("fact_accuracy", "bucket_compliance", "question_rouge_l", "centricity")


def score(examples: list[dict], generated: list[dict], kb: dict[str, Town], centricity: bool = True) -> list[dict]:
    """One record per example: id, town, bucket, answer, question, gold question and the scores."""
    cent = SummaryCentricity()([g["answer"] for g in generated], examples).total.tolist() if centricity else None
    rows = []
    for j, (e, g) in enumerate(zip(examples, generated)):
        facts = check_facts(g["answer"], kb, e["town"])
        rows.append({"id": e["id"], "town": e["town"], "bucket": BUCKETS[e["bucket"]], "question": g["question"],
                     "answer": g["answer"], "gold_question": e["question"],
                     "fact_accuracy": facts["accuracy"], "sentences": facts["sentences"],
                     "bucket_compliance": float(bucket_compliant(g["answer"], e["bucket"])),
                     "question_rouge_l": rouge_l(g["question"], e["question"]),
                     **({"centricity": cent[j]} if cent is not None else {})})
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each score per length bucket and over all."""
    out = {}
    for b in [*BUCKETS, "all"]:
        sel = [r for r in rows if b == "all" or r["bucket"] == b]
        if sel:
            out[b] = {m: statistics.mean(r[m] for r in sel) for m in METRICS if m in sel[0]} | {"n": len(sel)}
    return out


class QAGeneration(RunMixin, L.LightningModule):
    """Args:
        model: the ``TwoDecoderBart`` to generate with.
        greedy: greedy answers (else sampled with ``seed``).
        centricity: score summary-centricity with the packaged MiniLM sentence encoder.
        output_dir: where ``generations.jsonl`` and ``summary.json`` go (default: the trainer's folder;
            ``RunMixin``).
    """

    default_output_dir = "runs/qa_text/generate"

    def __init__(self, model: TwoDecoderBart, greedy: bool = True, centricity: bool = True, seed: int = 0,
                 output_dir: str | None = None) -> None:
        super().__init__()
        self.model, self.greedy, self.centricity = model.eval(), greedy, centricity
        self.seed, self._output_dir = seed, output_dir

    def on_predict_start(self) -> None:
        self._rows: list[dict[str, Any]] = []

    @torch.no_grad()
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        kb = self.trainer.datamodule.kb
        rng = self.rank_generator(self.seed, batch_idx)  # distinct per rank (sampled answers under DDP)
        rows = score(batch, self.model.generate(batch, generator=rng, greedy=self.greedy), kb, self.centricity)
        self._rows += rows
        return rows

    def on_predict_end(self) -> None:
        parts = self.gather(self._rows)  # held-out examples were sharded over ranks
        if not self.is_global_zero():
            return
        self._rows = [r for part in parts for r in part]
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "generations.jsonl", "w") as f:
            for r in self._rows:
                f.write(json.dumps(r) + "\n")
        summary = summarise(self._rows)
        self.write_summary(summary)
        a = summary.get("all", {})
        self.print(f"[rewardopt] {len(self._rows)} QA pairs: fact accuracy {a.get('fact_accuracy', float('nan')):.3f}, "
                   f"bucket compliance {a.get('bucket_compliance', float('nan')):.3f}, question ROUGE-L "
                   f"{a.get('question_rouge_l', float('nan')):.3f} -> {out / 'generations.jsonl'}")
