"""QA recipes' own checks for tests/test_recipes.py: generation writes scored QA pairs, one per
held-out (article, length tag); training reports its method and saves a model that loads back."""

from __future__ import annotations

import json


def check_predict(run) -> None:
    rows = [json.loads(line) for line in (run.out / "generations.jsonl").read_text().splitlines()]
    s = run.summary
    assert 0 < len(rows) == s["all"]["n"] <= run.config("data.init_args.max_val")
    assert {"id", "question", "answer", "bucket", "fact_accuracy", "bucket_compliance", "question_rouge_l",
            "centricity"} <= set(rows[0])
    tags = ["<|l0|>", "<|l1|>", "<|l2|>", "<|l3|>"]
    assert [r["bucket"] for r in rows[:4]] == tags[:len(rows)]  # each length tag in turn
    assert 0 <= s["all"]["fact_accuracy"] <= 1


def check_fit(run) -> None:
    from domains.qa_text.model import TwoDecoderBart

    s = run.summary
    sampled = run.config("model.init_args.sample_prob") > 0
    assert s["method"] == ("DRIL" if sampled else "MLE")
    if not sampled:
        assert s["sampled_steps"] == 0
    TwoDecoderBart(str(run.out))
