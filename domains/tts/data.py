"""The TTS token vocabulary, the shipped tokenised corpus and its data modules.

One vocabulary serves the codec LM: specials, attribute tags, characters (the text side) and codec
tokens (the speech side). A prompt is ``[tags] text-characters [SEP]``; the LM continues with codec
tokens and EOS.

``build(n, codebook_size)`` (``python -m domains.tts.data``) speaks the corpus with espeak-ng, fits the
codec, and writes ``assets/codec/`` and ``assets/corpus.json`` (text, attributes, codec tokens) —
both shipped, so nothing here needs espeak-ng at run time — plus ``runs/tts/mels.pt`` (the
log-mel features, for training the evaluation recogniser; not shipped).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from domains.tts.corpus import ATTRIBUTES
from rewardopt.data import PromptDataModule

ASSETS = Path(__file__).parent / "assets"
CORPUS = ASSETS / "corpus.json"
CODEC = ASSETS / "codec"
MELS = Path("runs/tts/mels.pt")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<sep>"]
TAGS = [f"<{v}>" for vals in ATTRIBUTES.values() for v in vals]
CHARS = list(" abcdefghijklmnopqrstuvwxyz")


class TTSVocab:
    """Token ids: specials, tags, characters, then ``codebook_size`` codec tokens."""

    def __init__(self, codebook_size: int) -> None:
        self.tokens = SPECIALS + TAGS + CHARS + [f"c{k}" for k in range(codebook_size)]
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.codebook_size = codebook_size
        self.codec_offset = len(SPECIALS) + len(TAGS) + len(CHARS)
        self.pad, self.bos, self.eos, self.sep = (self.index[t] for t in SPECIALS)

    def __len__(self) -> int:
        return len(self.tokens)

    def text_ids(self, text: str) -> list[int]:
        """Lower-cased characters; anything outside a-z and space is dropped."""
        return [self.index[c] for c in text.lower() if c in self.index and c in CHARS]

    def prompt(self, text: str, attributes: dict[str, str] | None = None) -> list[int]:
        """[tags in ATTRIBUTES order] + characters + [SEP]. Unknown attribute values raise."""
        tags = []
        for key, value in (attributes or {}).items():
            if key not in ATTRIBUTES:
                continue
            if value not in ATTRIBUTES[key]:
                raise ValueError(f"{key}={value!r}: expected one of {ATTRIBUTES[key]}")
            tags.append(self.index[f"<{value}>"])
        return tags + self.text_ids(text) + [self.sep]

    def codec_ids(self, codes) -> list[int]:
        return [self.codec_offset + int(c) for c in codes]

    def to_codes(self, ids: torch.Tensor) -> list[list[int]]:
        """(B, N) LM ids -> codec codes per row, up to the first non-codec token (EOS, padding)."""
        out = []
        for row in ids.tolist():
            codes = []
            for t in row:
                if not self.codec_offset <= t < self.codec_offset + self.codebook_size:
                    break
                codes.append(t - self.codec_offset)
            out.append(codes)
        return out

    def non_codec_ids(self) -> list[int]:
        """Everything the LM must never generate (all but codec tokens and EOS)."""
        return [i for i in range(self.codec_offset) if i != self.eos]


def load_corpus(path: str | os.PathLike = CORPUS) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: build it with `python -m domains.tts.data` (needs espeak-ng)")
    return json.loads(Path(path).read_text())


def split(items: list[dict], val_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """Held-out items are the first ones (the corpus is i.i.d.)."""
    n_val = max(1, int(len(items) * val_fraction))
    return items[n_val:], items[:n_val]


def build(n: int = 2000, codebook_size: int = 128, seed: int = 0, out: str | os.PathLike = ASSETS,
          mels: str | os.PathLike = MELS) -> dict:
    from domains.tts.codec import MelCodec
    from domains.tts.corpus import build_corpus

    items = build_corpus(n, seed)
    codec = MelCodec(codebook_size)
    stats = codec.fit([torch.as_tensor(i["mel"]) for i in items], seed=seed)
    out = Path(out)
    codec.save(out / "codec")
    rows = [{k: v for k, v in i.items() if k != "mel"} | {"codes": codec.encode(torch.as_tensor(i["mel"])).tolist()}
            for i in items]
    (out / "corpus.json").write_text(json.dumps({"seed": seed, "codebook_size": codebook_size, "codec_fit": stats,
                                                 "items": rows}))
    Path(mels).parent.mkdir(parents=True, exist_ok=True)
    torch.save([torch.as_tensor(i["mel"]).half() for i in items], mels)
    return stats


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Speak the TTS corpus with espeak-ng and fit the codec.")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--codebook-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(build(a.n, a.codebook_size, a.seed))


def condition_of(item: dict, attributes: bool = True) -> dict:
    """The LM condition of a corpus item: its text, and its attribute tags when ``attributes``."""
    return {"text": item["text"], **({k: item[k] for k in ATTRIBUTES} if attributes else {})}


class TTSDataModule(PromptDataModule):
    """Training items: (condition, codec LM ids) pairs of the shipped corpus; held-out items: the
    conditions of its first ``val_fraction``.

    Args:
        corpus: corpus.json path. attributes: put the attribute tags in the prompts.
        batch_size, val_batch_size, epoch_size, seed: ``PromptDataModule``. val_fraction: held-out share.
        max_val: at most this many held-out conditions (evaluation cost).
        val_targets: held-out items are (condition, ids) pairs too (for pretraining's validation NLL).
        random_attributes: attributes whose requested value in *training* prompts is drawn at random
            (seeded) instead of the recording's own, so that a reward on that attribute (DiffRO-MTR)
            rewards following the tag rather than copying the target's.
    """

    def __init__(self, corpus: str = str(CORPUS), attributes: bool = True, batch_size: int = 16,
                 val_batch_size: int = 32, val_fraction: float = 0.1, max_val: int | None = 64,
                 val_targets: bool = False, epoch_size: int = 1024, random_attributes: list[str] | None = None,
                 seed: int = 0) -> None:
        data = load_corpus(corpus)
        vocab = TTSVocab(data["codebook_size"])
        train, val = split(data["items"], val_fraction)
        pairs = [(condition_of(i, attributes), vocab.codec_ids(i["codes"])) for i in train]
        if random_attributes:
            unknown = set(random_attributes) - set(ATTRIBUTES)
            if unknown or not attributes:
                raise ValueError(f"random_attributes must name tagged attributes among {sorted(ATTRIBUTES)}; "
                                 f"got {random_attributes} (attributes={attributes})")
            rnd = random.Random(seed)
            pairs = [({**c, **{k: rnd.choice(ATTRIBUTES[k]) for k in random_attributes}}, t) for c, t in pairs]
        conds = [(condition_of(i, attributes), vocab.codec_ids(i["codes"])) if val_targets
                 else condition_of(i, attributes) for i in val][:max_val]
        super().__init__(pairs, conds, batch_size=batch_size, val_batch_size=val_batch_size, val_repeats=1,
                         epoch_size=epoch_size, seed=seed)
        self.val_items = val[:max_val]


class CorpusItemsDataModule(PromptDataModule):
    """Corpus items themselves (dicts with text, attributes and codes), for training the reward
    models: the same held-out split as ``TTSDataModule``."""

    def __init__(self, corpus: str = str(CORPUS), batch_size: int = 32, val_batch_size: int = 100,
                 val_fraction: float = 0.1, epoch_size: int = 2048, seed: int = 0) -> None:
        train, val = split(load_corpus(corpus)["items"], val_fraction)
        super().__init__(train, val, batch_size=batch_size, val_batch_size=val_batch_size, val_repeats=1,
                         epoch_size=epoch_size, seed=seed)


class MelTextDataModule(PromptDataModule):
    """(log-mel, corpus item) pairs of the corpus recordings (``runs/tts/mels.pt`` from ``build``), for the
    evaluation recogniser; the same held-out split as the token data."""

    def __init__(self, mels: str = str(MELS), corpus: str = str(CORPUS), batch_size: int = 32,
                 val_batch_size: int = 100, val_fraction: float = 0.1, epoch_size: int = 2048, seed: int = 0) -> None:
        if not Path(mels).is_file():
            raise FileNotFoundError(f"{mels} is missing: run `python -m domains.tts.data` (needs espeak-ng)")
        feats = torch.load(mels, weights_only=True)
        items = load_corpus(corpus)["items"]
        if len(feats) != len(items):
            raise ValueError(f"{mels} has {len(feats)} utterances but {corpus} has {len(items)}: rebuild both")
        pairs = [(m, i) for m, i in zip(feats, items)]
        train, val = split(pairs, val_fraction)
        super().__init__(train, val, batch_size=batch_size, val_batch_size=val_batch_size, val_repeats=1,
                         epoch_size=epoch_size, seed=seed)
