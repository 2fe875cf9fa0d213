"""``TwoDecoderBart``: a BART encoder, decoder 1 writing the length-constrained answer, decoder 2
writing the question while attending to decoder 1's hidden states (the DRIL paper's wiring).

Decoder 2 is a second ``BartDecoder`` (initialised as a copy of decoder 1, sharing the token
embeddings and the LM head). By default (``question_memory="answer"``, the reference code's
wiring: amazon-research/sc2qa-dril, ``BartTwoDecoderForConditionalGeneration``) its
cross-attention reads decoder 1's last hidden states only, so the question must be recoverable
from the answer; ``"answer+source"`` reads the concatenation [encoder states; decoder 1's states]
under the concatenated padding masks (our earlier reading, which keeps the article visible to it).
The choice is saved with the model (``qa.json``); the shipped tiny model is pretrained with
"answer" (its questions name facts of the answer: ``kb.py``). Because the question's loss reaches
decoder 1 through those hidden states, a question-reconstruction loss on a teacher-forced *sample*
trains decoder 1 and the encoder (DRIL, ``rewardopt/methods/dril.py``).

Loading: ``TwoDecoderBart(pretrained=path)`` takes a folder written by ``save_pretrained``
(``bart/``, ``question_decoder.safetensors``, ``tokenizer/``) or any ``BartForConditionalGeneration``
checkpoint folder with its tokenizer (e.g. distilBART): decoder 2 then starts as a copy of its
decoder. "embedded:tiny-qa" is the shipped tiny model (``recipes/qa_text/pretrain_tiny.yaml``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardopt.methods.dril import TwoStageSeq2Seq

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"embedded:tiny-qa": ASSETS / "tiny_qa"}


def tiny_bart(vocab_size: int, d_model: int = 128, layers: int = 2, heads: int = 4, max_positions: int = 256,
              pad: int = 1, bos: int = 0, eos: int = 2, seed: int = 0):
    """A small seeded ``BartForConditionalGeneration`` without dropout."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                     encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
                     decoder_ffn_dim=4 * d_model, max_position_embeddings=max_positions, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=pad, bos_token_id=bos,
                     eos_token_id=eos, decoder_start_token_id=eos, forced_bos_token_id=None, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg)


class TwoDecoderBart(TwoStageSeq2Seq, nn.Module):
    """Args:
        pretrained: "embedded:tiny-qa", a folder (``save_pretrained`` output or a BART checkpoint
            with its tokenizer), or None: a random tiny BART and a BPE tokenizer trained on the
            corpus (for pretraining; ``d_model``, ``layers``, ``vocab_size``, ``n_towns``, ``seed``).
        max_answer_tokens, max_question_tokens: generation limits.
        question_memory: what decoder 2 cross-attends to — "answer" (decoder 1's states only: the
            reference code's wiring, where the question must be recoverable from the answer; the
            shipped tiny model's) or "answer+source" (decoder 1's states and the encoder's). None:
            the saved model's choice (``qa.json``); a folder saved before that file existed (it has
            ``question_decoder.safetensors`` but no ``qa.json``) was trained with "answer+source";
            a new model (``pretrained=None`` or a plain BART checkpoint) gets "answer".
        no_repeat_ngram_size, min_answer_length: constraints on *sampled* answers (DRIL's rollouts;
            the reference samples with no_repeat_ngram_size=3 and its config's min_length=10, which
            in Hugging Face's ``generate`` counts the decoder start token: EOS comes 10th at the
            earliest). 0 turns each off. Greedy answers (``generate``'s default) are unconstrained.
    """

    MEMORIES = ("answer", "answer+source")

    def __init__(self, pretrained: str | None = "embedded:tiny-qa", max_answer_tokens: int = 96,
                 max_question_tokens: int = 40, question_memory: str | None = None, no_repeat_ngram_size: int = 3,
                 min_answer_length: int = 10, d_model: int = 128, layers: int = 2, vocab_size: int = 1000,
                 n_towns: int = 3000, seed: int = 0) -> None:
        super().__init__()
        qd_state, saved = None, {}
        if pretrained is None:
            from domains.qa_text.data import build_tokenizer, corpus, tokenizer_texts

            tokenizer = build_tokenizer(tokenizer_texts(corpus(n_towns, seed)[0]), vocab_size)
            bart = tiny_bart(len(tokenizer), d_model, layers, pad=tokenizer.pad_token_id, bos=tokenizer.bos_token_id,
                             eos=tokenizer.eos_token_id, seed=seed)
        else:
            from transformers import AutoTokenizer, BartForConditionalGeneration

            path = Path(EMBEDDED.get(str(pretrained), pretrained))
            if not path.is_dir():
                raise FileNotFoundError(f"{pretrained}: not a model folder (embedded: {sorted(EMBEDDED)}; the tiny one "
                                        "is trained by recipes/qa_text/pretrain_tiny.yaml)")
            bart = BartForConditionalGeneration.from_pretrained(path / "bart" if (path / "bart").is_dir() else path)
            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer" if (path / "tokenizer").is_dir() else path)
            if (path / "question_decoder.safetensors").is_file():
                from safetensors.torch import load_file

                qd_state = load_file(path / "question_decoder.safetensors")
                saved = {"question_memory": "answer+source"}  # saved before qa.json existed
            if (path / "qa.json").is_file():
                saved = json.loads((path / "qa.json").read_text())
        self.bart, self.tokenizer = bart.train(), tokenizer
        self.question_decoder = copy.deepcopy(bart.model.decoder)
        self.question_decoder.embed_tokens = bart.model.shared
        if qd_state is not None:
            missing, unexpected = self.question_decoder.load_state_dict(qd_state, strict=False)
            if unexpected or any(not k.startswith("embed_tokens") for k in missing):
                raise ValueError(f"{pretrained}: question decoder weights do not match: missing {missing}, "
                                 f"unexpected {unexpected}")
        self.max_answer_tokens, self.max_question_tokens = max_answer_tokens, max_question_tokens
        self.question_memory = question_memory or saved.get("question_memory", "answer")
        if self.question_memory not in self.MEMORIES:
            raise ValueError(f"question_memory must be one of {self.MEMORIES}, got {self.question_memory!r}")
        if no_repeat_ngram_size < 0 or min_answer_length < 0:
            raise ValueError(f"no_repeat_ngram_size and min_answer_length must be >= 0 (0: off); "
                             f"got {no_repeat_ngram_size}, {min_answer_length}")
        self.no_repeat_ngram_size, self.min_answer_length = no_repeat_ngram_size, min_answer_length
        cfg = bart.config
        self.pad, self.eos, self.start = cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.bart.save_pretrained(path / "bart")
        self.tokenizer.save_pretrained(path / "tokenizer")
        state = {k: v.contiguous() for k, v in self.question_decoder.state_dict().items()
                 if not k.startswith("embed_tokens")}
        save_file(state, path / "question_decoder.safetensors")
        (path / "qa.json").write_text(json.dumps({"question_memory": self.question_memory}))

    # ------------------------------------------------------------------ tokenisation
    def source(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Encoder inputs: "<|lB|> article" per example."""
        from domains.qa_text.kb import BUCKETS

        texts = [f"{BUCKETS[e['bucket']]} {e['article']}" for e in examples]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=self.bart.config.max_position_embeddings)
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def target(self, texts: list[str], max_tokens: int) -> torch.Tensor:
        """Token ids of target texts ending with EOS, right-padded with ``pad`` (B, L)."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [self.eos] for t in texts]
        return self.pad_ids(ids)

    def pad_ids(self, ids: list[list[int]]) -> torch.Tensor:
        L = max(len(i) for i in ids)
        return torch.tensor([i + [self.pad] * (L - len(i)) for i in ids], device=self.device)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of (B, L) ids, cut at the first EOS."""
        out = []
        for row in ids.tolist():
            row = row[: row.index(self.eos)] if self.eos in row else row
            out.append(self.tokenizer.decode([t for t in row if t != self.pad], skip_special_tokens=True).strip())
        return out

    @property
    def device(self) -> torch.device:
        return self.bart.device

    # ------------------------------------------------------------------ passes
    def encode(self, src: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.bart.model.encoder(input_ids=src["input_ids"], attention_mask=src["attention_mask"])
        return out.last_hidden_state

    def _shift(self, labels: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(labels[:, :1], self.start)
        return torch.cat([start, labels[:, :-1]], 1)

    def answer_pass(self, enc: torch.Tensor, src_mask: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder 1 on ``labels`` (B, L): (per-example summed NLL, last hidden states)."""
        out = self.bart.model.decoder(input_ids=self._shift(labels), attention_mask=None, encoder_hidden_states=enc,
                                      encoder_attention_mask=src_mask)
        h = out.last_hidden_state
        logits = self.bart.lm_head(h) + self.bart.final_logits_bias
        return self._nll(logits, labels), h

    def question_pass(self, enc: torch.Tensor, src_mask: torch.Tensor, answer_h: torch.Tensor,
                      answer_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder 2 on question ``labels``, attending to ``_memory``: per-example
        summed NLL (differentiable into decoder 1, and the encoder)."""
        memory, mask = self._memory(enc, src_mask, answer_h, answer_mask)
        h = self.question_decoder(input_ids=self._shift(labels), encoder_hidden_states=memory,
                                  encoder_attention_mask=mask).last_hidden_state
        return self._nll(self.bart.lm_head(h) + self.bart.final_logits_bias, labels)

    def _memory(self, enc, src_mask, answer_h, answer_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """What decoder 2 cross-attends to, and its padding mask."""
        if self.question_memory == "answer":
            return answer_h, answer_mask.to(src_mask)
        return torch.cat([enc, answer_h], 1), torch.cat([src_mask, answer_mask.to(src_mask)], 1)

    def _nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none")
        return (nll * (labels != self.pad)).sum(1)

    # ------------------------------------------------------------------ the DRIL protocol
    def mle_terms(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Per-example NLL of the gold answer (decoder 1) and of the gold question given the gold
        answer (decoder 2), and the number of target tokens of each."""
        src = self.source(examples)
        enc = self.encode(src)
        a = self.target([e["answer"] for e in examples], self.max_answer_tokens)
        q = self.target([e["question"] for e in examples], self.max_question_tokens)
        a_nll, h = self.answer_pass(enc, src["attention_mask"], a)
        q_nll = self.question_pass(enc, src["attention_mask"], h, a != self.pad, q)
        return {"answer_nll": a_nll, "question_nll": q_nll, "answer_tokens": (a != self.pad).sum(1),
                "question_tokens": (q != self.pad).sum(1)}

    @torch.no_grad()
    def sample_answers(self, examples: list[dict], generator: torch.Generator | None = None, greedy: bool = False,
                       temperature: float = 1.0) -> torch.Tensor:
        """Free-running answers of decoder 1: (B, L) ids ending with EOS, right-padded (ancestral
        sampling from ``generator`` under ``no_repeat_ngram_size`` and ``min_answer_length``, unless
        ``greedy``: unconstrained greedy decoding)."""
        src = self.source(examples)
        seed = int(torch.randint(0, 2**62, (), generator=generator)) if generator is not None else None
        with torch.random.fork_rng(devices=[]):  # generate() draws from the global generator: seed it from ours
            if seed is not None:
                torch.manual_seed(seed)
            ys = self.bart.generate(**src, do_sample=not greedy, temperature=temperature if not greedy else None,
                                    top_k=0 if not greedy else None, top_p=None, num_beams=1,
                                    max_new_tokens=self.max_answer_tokens,
                                    min_length=0 if greedy else self.min_answer_length,
                                    no_repeat_ngram_size=0 if greedy else self.no_repeat_ngram_size,
                                    decoder_start_token_id=self.start,
                                    eos_token_id=self.eos, pad_token_id=self.pad, forced_bos_token_id=None,
                                    forced_eos_token_id=None)
        out = ys[:, 1:]
        out = out.masked_fill(torch.cumsum((out == self.eos).int(), 1) - (out == self.eos).int() > 0, self.pad)
        no_eos = ~(out == self.eos).any(1)
        if no_eos.any():  # cut at the limit: close with EOS
            out = torch.cat([out, torch.where(no_eos, self.eos, self.pad)[:, None]], 1)
        return out

    def reconstruction_nll(self, examples: list[dict], answer_ids: torch.Tensor) -> torch.Tensor:
        """Per-example NLL of the gold question under decoder 2 when decoder 1 is teacher-forced on
        ``answer_ids`` (e.g. its own sample): differentiable into decoder 1 and the encoder. This is
        DRIL's reconstruction reward (its negative).

        Its limit, measured on the shipped model (``tests/qa_text/test_qa.py``, gold answers of 32
        held-out <|l2|>/<|l3|> examples teacher-forced with the founding year changed): decoder 2 copies
        a *small* corruption into its question (year − 1: 30 of 32 questions name the corrupted year;
        − 37: 14 of 32) but not a gross one (− 300: none does, and 22 of 32 name the *true* year).
        Decoder 2 reads decoder 1's hidden states, which were computed with the article in view, so
        they carry the article's year as well as the token written; the gold question then stays
        likely under a grossly wrong answer, and the reward can hardly see such an error."""
        src = self.source(examples)
        enc = self.encode(src)
        _, h = self.answer_pass(enc, src["attention_mask"], answer_ids)
        q = self.target([e["question"] for e in examples], self.max_question_tokens)
        return self.question_pass(enc, src["attention_mask"], h, answer_ids != self.pad, q)

    @torch.no_grad()
    def generate(self, examples: list[dict], generator: torch.Generator | None = None,
                 greedy: bool = True) -> list[dict]:
        """Answer, then question (greedy, attending to the generated answer): [{"answer", "question"}]."""
        a = self.sample_answers(examples, generator, greedy=greedy)
        return [{"answer": ans, "question": q} for ans, q in zip(self.decode(a), self.write_questions(examples, a))]

    @torch.no_grad()
    def write_questions(self, examples: list[dict], answer_ids: torch.Tensor) -> list[str]:
        """Greedy questions of decoder 2 with decoder 1 teacher-forced on ``answer_ids`` (B, L; a
        generated answer, or any answer text through ``target``)."""
        a = answer_ids.to(self.device)
        src = self.source(examples)
        enc = self.encode(src)
        _, h = self.answer_pass(enc, src["attention_mask"], a)
        memory, mask = self._memory(enc, src["attention_mask"], h, a != self.pad)
        B = a.shape[0]
        ys = torch.full((B, 1), self.start, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for _ in range(self.max_question_tokens):
            hq = self.question_decoder(input_ids=ys, encoder_hidden_states=memory,
                                       encoder_attention_mask=mask).last_hidden_state[:, -1]
            nxt = (self.bart.lm_head(hq) + self.bart.final_logits_bias).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            ys = torch.cat([ys, nxt[:, None]], 1)
            done |= nxt == self.eos
            if done.all():
                break
        return self.decode(ys[:, 1:])
