"""The QA corpus (generated from ``kb.py``: nothing to download) and its tokenizer.

``corpus(n_towns, seed)`` builds the knowledge base, one article per town and its four length
buckets, split by town (the last ``val_fraction`` of towns are held out, so held-out answers name
towns the model never saw). ``build_tokenizer`` trains a byte-level BPE (``tokenizers``) on the
training articles with the bucket tags as special tokens and wraps it as a ``transformers`` fast
tokenizer, so it saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
like a real checkpoint's.
"""

from __future__ import annotations

from functools import lru_cache

from domains.qa_text.kb import BUCKETS, Town, build_examples, make_towns
from rewardopt.data import PromptDataModule

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4


@lru_cache(maxsize=4)
def corpus(n_towns: int = 3000, seed: int = 0,
           val_fraction: float = 0.1) -> tuple[list[dict], list[dict], dict[str, Town]]:
    """(train examples, held-out examples, knowledge base by town name)."""
    towns = make_towns(n_towns, seed)
    n_val = max(1, int(round(val_fraction * n_towns)))
    train, val = towns[:-n_val], towns[-n_val:]
    return build_examples(train, seed), build_examples(val, seed + 1), {t.name: t for t in towns}


def build_tokenizer(texts: list[str], vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + BUCKETS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", additional_special_tokens=BUCKETS)


def tokenizer_texts(train: list[dict]) -> list[str]:
    """Each article once, every question and every article's longest answer (its "It"/"Its" sentences)."""
    seen, texts = set(), []
    for e in train:
        if e["article"] not in seen:
            seen.add(e["article"])
            texts.append(e["article"])
        texts.append(e["question"])
        if e["bucket"] == len(BUCKETS) - 1:
            texts.append(e["answer"])
    return texts


class QADataModule(PromptDataModule):
    """Training and held-out examples (dicts: id, town, focus, bucket, article, answer, question).

    Args:
        n_towns, seed, val_fraction: the corpus (``corpus``).
        max_val: at most this many held-out examples (evaluation and prediction cost), taken
            evenly over the buckets.
        batch_size, val_batch_size, epoch_size: ``PromptDataModule``.
    """

    def __init__(self, n_towns: int = 3000, seed: int = 0, val_fraction: float = 0.1, max_val: int | None = 64,
                 batch_size: int = 32, val_batch_size: int = 32, epoch_size: int = 4096) -> None:
        train, val, kb = corpus(n_towns, seed, val_fraction)
        if max_val is not None:
            val = val[:max_val]  # towns in order, four buckets each: every bucket equally often
        super().__init__(train, val, batch_size=batch_size, val_batch_size=val_batch_size, val_repeats=1,
                         epoch_size=epoch_size, seed=seed)
        self.kb = kb
