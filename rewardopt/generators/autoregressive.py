"""Autoregressive token language models behind the ``Generator`` contract.

A step is a token position: step ``i`` draws generated token ``i`` from the causal LM given the
prompt and tokens ``0..i-1``. The state is a (B, N, V) float tensor over ``N = max_new_tokens``
positions: row ``n`` is the one-hot of token ``n`` once drawn and all zeros before (a zero row is no
token, so states of any progress share one shape and search methods can stack and index them).
After an EOS the remaining positions are filled with ``pad_token_id``.

Differentiable sampling, the two relaxations the reward-backprop methods use:

* ``step`` with grad on: straight-through Gumbel-max (one-hot forward, softmax((logp + g)/τ)
  backward), so gradients reach the LM through the drawn token and through every later position
  that reads it (the LM reads ``x @ embedding_matrix``, soft rows included).
* ``teacher_forced``: DiffRO's relaxation — one pass over the prompt and the *ground-truth* prefix,
  every position drawn by Gumbel-softmax from the model's logits at once; it returns the soft
  one-hot tokens (straight-through) and the per-position log-probabilities (for the KL to the
  frozen reference, ``kl_to_reference``).

The LM is any ``transformers`` causal LM that accepts ``inputs_embeds``, ``attention_mask`` and
``position_ids`` (GPT-2, Llama, Qwen, ...): tiny from a config in tests, real checkpoints by path.
Prompts are left-padded; positions count only real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewardopt.generators.base import Condition, FullyTrainedGenerator
from rewardopt.generators.capabilities import DeterministicStep
from rewardopt.pretraining import GeneratorPretraining


def gumbel(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise from uniforms drawn on the CPU generator (reproducible across devices)."""
    u = torch.rand(shape, generator=generator).clamp(1e-10, 1 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens and the smallest set whose probability reaches ``top_p``
    (nucleus); the rest get -inf. (..., V) -> (..., V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class AutoregressiveGenerator(DeterministicStep, FullyTrainedGenerator):
    """A token LM as a sequential sampler, one token per step: trained in full (``Trainable`` with
    ``full_finetune``; the frozen copy of ``lm`` is the reference policy), greedy decoding as its
    deterministic step.

    Args:
        lm: a causal LM (``transformers`` ``*ForCausalLM``) reading ``inputs_embeds``.
        max_new_tokens: N, the number of steps.
        bos_token_id: prepended to every prompt.
        eos_token_id: ends a sequence (later positions become ``pad_token_id``); None: never.
        pad_token_id: left padding of prompts and filler after EOS (default: eos, else bos).
        temperature: sampling temperature (0: greedy; the generator is then deterministic).
        top_k, top_p: free-running sampling filters (0 / 1.0: off); ``teacher_forced`` and the KL
            use the unfiltered policy.
        tau: Gumbel-softmax temperature of the relaxations (DiffRO: 1).
        forbidden_token_ids: never generated (e.g. text tokens in a codec LM's output).
        full_finetune: keep a frozen copy of the LM as the reference policy (KL terms need it);
            fine-tuning trains all LM weights either way (no adapters).
        x0_rollout: greedy tokens ``predict_x0`` adds after the next one (0: none, no NFE; None: to the end).
    """

    random_init = False  # x_T is the empty sequence
    network_attr = "lm"  # the network trained in full (its frozen copy is the reference policy)
    legacy_state_prefixes = {"denoiser.": "lm."}  # earlier releases stored the LM as ``denoiser``

    def __init__(self, lm: nn.Module, max_new_tokens: int, bos_token_id: int, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 tau: float = 1.0, forbidden_token_ids: Sequence[int] = (), full_finetune: bool = False,
                 x0_rollout: int | None = 0) -> None:
        super().__init__()
        if max_new_tokens < 1 or temperature < 0 or tau <= 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need max_new_tokens >= 1, temperature >= 0, tau > 0, 0 < top_p <= 1, top_k >= 0; got "
                             f"{max_new_tokens}, {temperature}, {tau}, {top_p}, {top_k}")
        self.lm = lm
        self.vocab_size = int(lm.get_input_embeddings().weight.shape[0])
        for name, t in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if t is not None and not 0 <= t < self.vocab_size:
                raise ValueError(f"{name}={t} is outside the vocabulary (size {self.vocab_size})")
        self.max_new_tokens, self.bos_token_id, self.eos_token_id = max_new_tokens, bos_token_id, eos_token_id
        self.pad_token_id = (pad_token_id if pad_token_id is not None
                             else eos_token_id if eos_token_id is not None else bos_token_id)
        self.temperature, self.top_k, self.top_p, self.tau = temperature, top_k, top_p, tau
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        banned[list(forbidden_token_ids)] = True
        self.register_buffer("banned", banned, persistent=False)
        self.full_finetune, self.x0_rollout = full_finetune, x0_rollout

    # ------------------------------------------------------------------ schedule
    @property
    def timesteps(self) -> torch.Tensor:
        return torch.arange(self.max_new_tokens)

    @property
    def stochastic(self) -> bool:
        return self.temperature > 0

    # ------------------------------------------------------------------ conditions and states
    def prompt_tokens(self, raw: Any) -> list[int]:
        """One raw condition -> prompt token ids (BOS is added by ``encode_condition``). Default: a
        sequence of ids, or None for no prompt. Domains override this (text, phonemes, tags)."""
        if raw is None:
            return []
        if isinstance(raw, str):
            raise TypeError(f"{type(self).__name__} takes token-id prompts; override prompt_tokens to tokenise text")
        return [int(t) for t in raw]

    def encode_condition(self, raw: Sequence[Any]) -> Condition:
        """Left-padded prompts: tensors "prompt" (B, P) ids and "prompt_mask" (B, P) 1 for real tokens."""
        if isinstance(raw, str):
            raise TypeError("encode_condition takes a list (one entry per sample), not one string")
        ids = [[self.bos_token_id, *self.prompt_tokens(r)] for r in raw]
        P = max(len(t) for t in ids) if ids else 1
        for t in ids:
            if any(not 0 <= v < self.vocab_size for v in t):
                raise ValueError(f"prompt token outside the vocabulary (size {self.vocab_size}): {t}")
        device = self.banned.device
        prompt = torch.tensor([[self.pad_token_id] * (P - len(t)) + t for t in ids], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (P - len(t)) + [1] * len(t) for t in ids], dtype=torch.long, device=device)
        return Condition(list(raw), {"prompt": prompt, "prompt_mask": mask})

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """No token drawn yet: (B, N, V) zeros. Draws no randomness."""
        return torch.zeros(len(cond), self.max_new_tokens, self.vocab_size, device=self.banned.device)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens.long(), self.vocab_size).float()

    # ------------------------------------------------------------------ model
    def _forward(self, cond: Condition, x: torch.Tensor, lm: nn.Module | None = None) -> torch.Tensor:
        """Logits (B, P + n, V) of the LM over [prompt, x rows] (x: (B, n, V) one-hot or soft)."""
        lm = lm or self.lm
        emb = lm.get_input_embeddings().weight
        prompt, pmask = cond.tensors["prompt"], cond.tensors["prompt_mask"]
        inputs = torch.cat([emb[prompt], x.to(emb.dtype) @ emb], dim=1)
        mask = torch.cat([pmask, pmask.new_ones(x.shape[:2])], dim=1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        self.counter.nfe += x.shape[0]
        if torch.is_grad_enabled():
            self.counter.nfe_grad += x.shape[0]
        return lm(inputs_embeds=inputs, attention_mask=mask, position_ids=pos).logits.float()

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution's log-probabilities from raw logits: forbidden tokens, top-k /
        top-p filtering, temperature (1 when greedy)."""
        logits = filter_logits(logits.masked_fill(self.banned, float("-inf")), self.top_k, self.top_p)
        return torch.log_softmax(logits / (self.temperature or 1.0), dim=-1)

    def policy_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The policy π itself (forbidden tokens removed; no temperature or top-k/top-p): what the
        relaxations sample from and the KL compares."""
        return torch.log_softmax(logits.masked_fill(self.banned, float("-inf")), dim=-1)

    def model_output(self, x_t: torch.Tensor, i: int, cond: Condition) -> torch.Tensor:
        """log π(token i | prompt, tokens < i), (B, V). One NFE per row (no KV cache: the tiny
        defaults do not need one; real models should keep sequences short or add one)."""
        return self.log_probs(self._forward(cond, x_t[:, :i])[:, -1])

    def finished(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """(B,) bool: an EOS is among tokens < i."""
        if self.eos_token_id is None or i == 0:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        prev = x[:, :i].detach()
        return ((prev.argmax(-1) == self.eos_token_id) & (prev.sum(-1) > 0)).any(1)

    def _draw(self, logp: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """One-hot of argmax(logp + g) (greedy when g is None), straight-through with grad."""
        scores = logp if g is None else logp + g
        hard = F.one_hot(scores.argmax(-1), self.vocab_size).to(logp.dtype)
        if not torch.is_grad_enabled():
            return hard
        soft = torch.softmax(scores.masked_fill(torch.isinf(scores), -1e9) / self.tau, dim=-1)
        return hard + soft - soft.detach()

    def step(self, x_t, i, cond, noise=None, generator=None, out=None):
        """Draw token i (Gumbel-max; straight-through with grad). ``noise``: (B, N, V) Gumbel noise
        (row i is used) or (B, V)."""
        logp = self.model_output(x_t, i, cond) if out is None else out
        if not self.stochastic:
            g = None
        elif noise is not None:
            g = noise[:, i] if noise.ndim == 3 else noise
        else:
            g = gumbel(logp.shape, generator, logp.device)
        y = self._draw(logp, g)
        done = self.finished(x_t, i)
        if done.any():
            pad = F.one_hot(torch.tensor(self.pad_token_id, device=y.device), self.vocab_size).to(y.dtype)
            y = torch.where(done[:, None], pad, y)
        return torch.cat([x_t[:, :i], y[:, None], x_t[:, i + 1:]], dim=1)

    def predict_x0(self, x_t, i, cond, out=None):
        """x̂0 at step i: the prefix plus the greedy token i (from ``out``: no NFE), then ``x0_rollout``
        further greedy tokens (one NFE each, counted; None: to the end). With the default 0 later
        positions stay empty, so x̂0 is a partial sequence — rewards that value prefixes read it."""
        x = x_t
        last = self.max_new_tokens if self.x0_rollout is None else min(self.max_new_tokens, i + 1 + self.x0_rollout)
        for j in range(i, last):
            logp = out if (j == i and out is not None) else self.model_output(x, j, cond)
            y = self._draw(logp, None)
            done = self.finished(x, j)
            if done.any():
                pad = F.one_hot(torch.tensor(self.pad_token_id, device=y.device), self.vocab_size).to(y)
                y = torch.where(done[:, None], pad, y)
            x = torch.cat([x[:, :j], y[:, None], x[:, j + 1:]], dim=1)
        return x

    def deterministic_step(self, x_t, i, cond, out=None):
        """Greedy decoding of token i (the deterministic sampler; look-ahead values)."""
        logp = self.model_output(x_t, i, cond) if out is None else out
        return self.step(x_t, i, cond, noise=torch.zeros_like(logp), out=logp)

    def x0_nfe(self, level: int) -> int:
        last = self.max_new_tokens if self.x0_rollout is None else min(self.max_new_tokens, level + 1 + self.x0_rollout)
        return max(0, last - level - 1)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The (B, N, V) one-hot tokens themselves (straight-through-differentiable): rewards read
        them through their own embedding tables; ``tokens`` gives ids."""
        self.counter.count_decodes(x0.shape[0])
        return x0

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        """(B, N, V) -> (B, N) ids (-1 where no token was drawn yet)."""
        ids = x.detach().argmax(-1)
        return ids.masked_fill(x.detach().sum(-1) == 0, -1)

    def pad_targets(self, targets: Sequence[Sequence[int]],
                    append_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id lists -> (B, N) ids padded with ``pad_token_id`` and (B, N) float mask of real
        positions; ``append_eos`` ends each with EOS (what a model must learn to stop). Too-long
        targets are cut at N; ids outside the vocabulary raise."""
        N = self.max_new_tokens
        ids = torch.full((len(targets), N), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(targets), N)
        for b, t in enumerate(targets):
            t = [int(v) for v in t]
            if any(not 0 <= v < self.vocab_size for v in t):
                raise ValueError(f"target token outside the vocabulary (size {self.vocab_size})")
            if append_eos and self.eos_token_id is not None:
                t = t + [self.eos_token_id]
            t = t[:N]
            ids[b, :len(t)] = torch.tensor(t, dtype=torch.long)
            mask[b, :len(t)] = 1
        device = self.banned.device
        return ids.to(device), mask.to(device)

    def sampled_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample's (B, N) ids and the mask of positions the policy drew: up to and including the
        first EOS (the padding after it was forced, not drawn)."""
        ids = self.tokens(x)
        drawn = ids >= 0
        if self.eos_token_id is not None:
            eos = (ids == self.eos_token_id).long()
            drawn &= (eos.cumsum(1) - eos) == 0
        return ids.clamp(min=0), drawn.float()

    def teacher_forced_nll(self, cond: Condition, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample Σ_positions −log π(target | prompt, target prefix) over ``mask``, (B,)."""
        logp = self.policy_log_probs(self._forward(cond, self.from_tokens(ids[:, :-1]))[:, -ids.shape[1]:])
        nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (nll.masked_fill(mask == 0, 0.0)).sum(-1)

    # ------------------------------------------------------------------ relaxations for reward backprop
    def teacher_forced(self, cond: Condition, targets: torch.Tensor, generator: torch.Generator | None = None,
                       tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffRO's single pass: logits at every position given the ground-truth prefix
        ``targets`` (B, N) ids; each position drawn by Gumbel-softmax. Returns (soft tokens (B, N, V),
        straight-through with grad; log π (B, N, V), unfiltered: ``policy_log_probs``)."""
        N = targets.shape[1]
        prefix = self.from_tokens(targets[:, :-1]).to(self.banned.device)
        logp = self.policy_log_probs(self._forward(cond, prefix)[:, -N:])
        g = gumbel(logp.shape, generator, logp.device)
        scores = logp + g
        hard = F.one_hot(scores.argmax(-1), self.vocab_size).to(logp.dtype)
        if not torch.is_grad_enabled():
            return hard, logp
        soft = torch.softmax(scores.masked_fill(torch.isinf(scores), -1e9) / (tau or self.tau), dim=-1)
        return hard + soft - soft.detach(), logp

    def kl_to_reference(self, cond: Condition, targets: torch.Tensor, logp: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_positions KL(π_θ(·|prefix) || π_ref(·|prefix)) per sample, (B,), at the ground-truth
        prefixes; ``logp`` from ``teacher_forced``; ``mask`` (B, N) selects positions (default all)."""
        N = targets.shape[1]
        with torch.no_grad(), self.base_model():
            ref_logits = self._forward(cond, self.from_tokens(targets[:, :-1]).to(logp.device))
            logp_ref = self.policy_log_probs(ref_logits[:, -N:])
        diff = (logp - logp_ref).masked_fill(self.banned, 0.0)  # -inf - -inf on forbidden tokens
        kl = (logp.exp() * diff).sum(-1)
        return (kl * mask).sum(-1) if mask is not None else kl.sum(-1)


class CausalLMPretraining(GeneratorPretraining):
    """Teacher-forced maximum likelihood for an ``AutoregressiveGenerator``: batches are lists of
    ``(condition, target token ids)``; the loss is the mean per-token negative log-likelihood of
    the targets followed by EOS. At the end ``generator.save_pretrained(output_dir)`` (if any) and
    ``generator_fit.json``.

    Args: generator; lr, weight_decay (AdamW); warmup_steps, decay (``rewardopt.schedules``);
    output_dir (default: the trainer's log folder).
    """

    metric, unit = "val/nll", " nats/token"

    def loss(self, batch: list) -> torch.Tensor:
        g = self.generator
        if not batch or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batch):
            raise ValueError("CausalLMPretraining trains on (condition, target token ids) pairs")
        ids, mask = g.pad_targets([t for _, t in batch], append_eos=True)
        nll = g.teacher_forced_nll(g.encode_condition([c for c, _ in batch]), ids, mask)
        return nll.sum() / mask.sum()

    def training_step(self, batch: list, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/nll", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def validation_step(self, batch: list, batch_idx: int) -> None:
        self.log("val/nll", self.loss(batch), prog_bar=True, batch_size=len(batch))
