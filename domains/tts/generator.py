"""``CodecLMGenerator``: a causal LM from a text prompt (with optional attribute tags) to codec tokens.

Conditions are strings (the text) or dicts ``{"text": ..., "gender": "male", "pitch": "high",
"rate": "slow"}``; the prompt is ``[tags] characters [SEP]`` (``domains.tts.data.TTSVocab``). Only
codec tokens and EOS are ever generated. ``pretrained``: "embedded:tiny-tts" (trained by
``recipes/tts/pretrain_tiny.yaml``), a folder from ``save_pretrained`` (``lm/`` + ``tts.json``), or
None for a random GPT-2 of the given size (for pretraining).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

from domains.tts.data import CODEC, TTSVocab
from rewardopt.generators.autoregressive import AutoregressiveGenerator
from rewardopt.generators.base import resolve_local_pretrained
from rewardopt.generators.capabilities import SavesPretrained, TextSerialisable

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-tts": ASSETS / "tiny_tts"}


def tiny_lm(vocab_size: int, max_len: int, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
            dropout: float = 0.0):
    """A small seeded GPT-2 (no dropout unless ``dropout``: pretraining's regulariser; the shipped
    models are saved without it, see ``domains.tts.pretraining``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=hidden, n_layer=layers,
                                      n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


class CodecLMGenerator(TextSerialisable, SavesPretrained, AutoregressiveGenerator):
    """Args:
        pretrained: "embedded:tiny-tts", a folder, or None (random model; needs ``codebook_size``).
        max_new_tokens: codec tokens per utterance at most (~21.5 per second).
        temperature, top_k, top_p, tau, full_finetune, x0_rollout: ``AutoregressiveGenerator``.
        kv_cache: sample with the LM's key/value cache (see ``model_output``); False: the base class's
            full pass over the prefix at every step (same tokens, up to float rounding).
        codebook_size, hidden, layers, max_prompt, seed: the random model's shape; dropout: its
            dropout rate (for pretraining only: Lightning trains in ``train()`` mode, so a model that
            samples must have none).
    """

    def __init__(self, pretrained: str | None = "embedded:tiny-tts", max_new_tokens: int = 80, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, tau: float = 1.0, full_finetune: bool = False,
                 x0_rollout: int | None = 0, codebook_size: int = 128, hidden: int = 128, layers: int = 2,
                 max_prompt: int = 64, seed: int = 0, dropout: float = 0.0, kv_cache: bool = True) -> None:
        if pretrained is not None:
            from transformers import AutoModelForCausalLM

            path = resolve_local_pretrained(pretrained, EMBEDDED, "tts.json", "recipes/tts/pretrain_tiny.yaml")
            cfg = json.loads(Path(path, "tts.json").read_text())
            codebook_size = cfg["codebook_size"]
            lm = AutoModelForCausalLM.from_pretrained(os.path.join(path, "lm")).eval()
        else:
            lm = None
        vocab = TTSVocab(codebook_size)
        if lm is None:
            lm = tiny_lm(len(vocab), max_prompt + max_new_tokens + 2, hidden, layers, seed=seed, dropout=dropout)
        super().__init__(lm, max_new_tokens, bos_token_id=vocab.bos, eos_token_id=vocab.eos, pad_token_id=vocab.pad,
                         temperature=temperature, top_k=top_k, top_p=top_p, tau=tau,
                         forbidden_token_ids=vocab.non_codec_ids(), full_finetune=full_finetune,
                         x0_rollout=x0_rollout)
        self.vocab = vocab
        self.kv_cache = kv_cache
        self._kv: dict | None = None

    def model_output(self, x_t: torch.Tensor, i: int, cond) -> torch.Tensor:
        """log π(token i | prompt, tokens < i), (B, V), as the base class computes it; without grad
        and with ``kv_cache``, from the cached keys/values of the previous call when that call was
        the same LM, the same condition and batch, and its rows are the prefix of this one (plain
        sampling: one new token per call), else from a full pass. Counts one NFE per row either way."""
        if not self.kv_cache or torch.is_grad_enabled():
            return super().model_output(x_t, i, cond)
        lm, x = self.lm, x_t[:, :i]
        prompt, pmask = cond.tensors["prompt"], cond.tensors["prompt_mask"]
        key = (id(lm), x.shape[0])
        c = self._kv  # a sampling run starts at i = 0 with a full pass: the weights may have changed since
        hit = (i > 0 and c is not None and c["key"] == key and c["n"] <= i and torch.equal(c["prompt"], prompt)
               and torch.equal(c["pmask"], pmask) and torch.equal(c["rows"], x[:, :c["n"]]))
        emb = lm.get_input_embeddings().weight
        mask = torch.cat([pmask, pmask.new_ones(x.shape[:2])], dim=1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        self.counter.nfe += x.shape[0]
        if hit and c["n"] == i:
            logits = c["last"]
        else:
            if hit:
                new, past = x[:, c["n"]:], c["past"]
                inputs, positions = new.to(emb.dtype) @ emb, pos[:, -new.shape[1]:]
            else:
                from transformers import DynamicCache

                past = DynamicCache()
                inputs, positions = torch.cat([emb[prompt], x.to(emb.dtype) @ emb], dim=1), pos
            # the cache argument is ``cache`` in transformers >= 5.2x, ``past_key_values`` before; either way
            # the DynamicCache is extended in place
            name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
            out = lm(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True, **{name: past})
            logits = out.logits[:, -1].float()
            self._kv = {"key": key, "n": i, "rows": x.clone(), "prompt": prompt, "pmask": pmask, "past": past,
                        "last": logits}
        return self.log_probs(logits)

    def prompt_tokens(self, raw: Any) -> list[int]:
        if isinstance(raw, str):
            return self.vocab.prompt(raw)
        if isinstance(raw, dict) and "text" in raw:
            return self.vocab.prompt(raw["text"], {k: v for k, v in raw.items() if k != "text"})
        raise TypeError(f"a TTS condition is a text or a dict with 'text' (and attributes); got {raw!r}")

    def codes(self, x: torch.Tensor) -> list[list[int]]:
        """Codec codes of each sample, up to its EOS."""
        return self.vocab.to_codes(self.tokens(x))

    def to_text(self, x: torch.Tensor) -> list[str]:
        """One line per sample for saved outputs: the codec codes."""
        return [" ".join(map(str, c)) for c in self.codes(x)]

    def to_audio(self, x: torch.Tensor, codec=None) -> list[torch.Tensor]:
        """Waveforms (22,050 Hz) of each sample through the shipped codec (Griffin-Lim)."""
        from domains.tts.codec import MelCodec

        codec = codec or MelCodec.load(CODEC)
        return [codec.to_audio(torch.tensor(c)) if c else torch.zeros(0) for c in self.codes(x)]

    def write_samples(self, samples: torch.Tensor, folder: str | os.PathLike, stem: str) -> list[Path]:
        """The codes (one text line per sample) and one 22,050 Hz WAV per sample to listen to
        (``{stem}_{j:03d}.wav``; an empty sample — EOS first — is a WAV of no frames)."""
        from domains.tts.codec import write_wav

        paths = super().write_samples(samples, folder, stem)
        for j, wav in enumerate(self.to_audio(samples)):
            paths.append(write_wav(Path(folder) / f"{stem}_{j:03d}.wav", wav))
        return paths

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path / "lm")
        (path / "tts.json").write_text(json.dumps({"codebook_size": self.vocab.codebook_size,
                                                   "max_new_tokens": self.max_new_tokens}))
