"""Masked (absorbing-state) discrete diffusion — MDLM (Sahoo et al., arXiv 2406.07524) with the
SUBS parameterisation, the sampler DRAKES fine-tunes (Wang et al., arXiv 2410.13643).

States are one-hot float tensors (B, L, V) over a vocabulary that includes the [MASK] token, so
the same code runs without grad (hard one-hots) and with grad (straight-through Gumbel-softmax):

* forward process: each token is independently replaced by [MASK] with probability 1 - α(t);
  log-linear schedule α(t) = 1 - (1 - eps)·t, t from 1 (all masked) to 0;
* SUBS: the denoiser never predicts [MASK] (its logit is -inf) and unmasked tokens are carried over;
* reverse step t -> s (= t - 1/T) for a masked position: unmask to token k with probability
  (α_s - α_t)/(1 - α_t)·x̂0_k, stay masked with (1 - α_s)/(1 - α_t); at s = 0 everything unmasks;
* sampling uses Gumbel-max on log q plus Gumbel noise G = -log(-log U), U ~ Uniform drawn as
  ``torch.rand((B, L, V), generator=...)`` — ``noise`` injects G, so candidates are reproducible;
* with grad on, each step returns hard + softmax((log q + G)/τ) - stop_grad(softmax(...)): one-hot
  in the forward pass, the Gumbel-softmax gradient in the backward pass (straight-through), so
  ``sample(grad_last_k=K)`` truncates backprop to the last K steps exactly as DRaFT-K does;
  ``relaxed_step(soft=True)`` instead feeds the soft Gumbel-softmax sample forward (DRAKES's relaxation).

The denoiser is any bidirectional ``transformers`` encoder with an LM head (``BertForMaskedLM``,
``RobertaForMaskedLM``, ...); it reads ``inputs_embeds = x @ word_embeddings`` so soft states
carry gradient. MDLM's absorbing SUBS model needs no time input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewardopt.generators.base import Condition, FullyTrainedGenerator
from rewardopt.generators.capabilities import DeterministicStep, TransitionLogProbs
from rewardopt.pretraining import GeneratorPretraining


def gumbel_noise(shape: Sequence[int], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """G = -log(-log U), U ~ Uniform(0, 1) clamped away from 0 and 1."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device if generator is not None else device)
    return -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))


def tiny_denoiser(vocab_size: int, seq_len: int, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                  arch: str = "bert"):
    """A small seeded bidirectional masked-LM without dropout, the tiny defaults' denoiser.

    ``arch``: "bert" (learned absolute positions) or "roformer" (rotary, i.e. relative, positions:
    position-free patterns such as DNA motifs planted anywhere are learned much faster).
    """
    from transformers import BertConfig, BertForMaskedLM, RoFormerConfig, RoFormerForMaskedLM

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, max_position_embeddings=seq_len, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    if arch == "bert":
        return BertForMaskedLM(BertConfig(**common))
    if arch == "roformer":
        return RoFormerForMaskedLM(RoFormerConfig(embedding_size=hidden, **common))
    raise ValueError(f"arch must be 'bert' or 'roformer', got {arch!r}")


class MaskedDiffusionGenerator(TransitionLogProbs, DeterministicStep, FullyTrainedGenerator):
    """Absorbing-state discrete diffusion over sequences of length ``seq_len``: trained in full
    (``Trainable`` with ``full_finetune``), with greedy unmasking as its deterministic step.

    Args:
        denoiser: a transformers masked-LM (logits (B, L, V) from ``inputs_embeds``).
        mask_token_id: the [MASK] (absorbing) token.
        seq_len: L.
        num_steps: T reverse steps (DRAKES: 128).
        eps: schedule floor: α(1) = eps.
        tau: Gumbel-softmax temperature for differentiable steps (DRAKES: 1).
        soft_steps: with grad, ``step`` relaxes intermediate steps to soft Gumbel-softmax samples (the
            DRAKES paper's relaxation, see ``relaxed_step``; the denoiser then reads soft inputs) instead
            of straight-through one-hots; x_0 is straight-through either way. DRAKES chooses its own
            relaxation (``intermediate``, soft by default) through ``relaxed_step``.
        forbidden_token_ids: tokens never sampled (padding, BOS/EOS, ...), besides [MASK].
        full_finetune: keep a frozen copy of the denoiser as the pretrained model (KL terms need it);
            fine-tuning trains all denoiser weights either way (no adapters).
    """

    random_init = False  # x_T is all [MASK]

    def __init__(self, denoiser: nn.Module, mask_token_id: int, seq_len: int, num_steps: int = 128, eps: float = 1e-3,
                 tau: float = 1.0, forbidden_token_ids: Sequence[int] = (), full_finetune: bool = False,
                 soft_steps: bool = False) -> None:
        super().__init__()
        if num_steps < 1 or seq_len < 1 or tau <= 0 or not 0 < eps < 1:
            raise ValueError(f"need num_steps >= 1, seq_len >= 1, tau > 0, 0 < eps < 1; "
                             f"got {num_steps}, {seq_len}, {tau}, {eps}")
        self.denoiser = denoiser
        self.vocab_size = int(denoiser.get_input_embeddings().weight.shape[0])
        if not 0 <= mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary (size {self.vocab_size})")
        self.mask_token_id, self.seq_len, self.eps, self.tau = mask_token_id, seq_len, eps, tau
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        banned[[mask_token_id, *forbidden_token_ids]] = True
        self.register_buffer("banned", banned, persistent=False)
        self.full_finetune, self.soft_steps = full_finetune, soft_steps
        self._set_schedule(num_steps)

    # ------------------------------------------------------------------ schedule
    def _set_schedule(self, num_steps: int) -> None:
        self._t = torch.linspace(1.0, 0.0, num_steps + 1)  # t_0 = 1 ... t_T = 0

    @property
    def timesteps(self) -> torch.Tensor:
        return self._t[:-1]

    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        """Probability that a token is still unmasked at time t (log-linear schedule)."""
        return 1 - (1 - self.eps) * torch.as_tensor(t, dtype=torch.float32)

    def transition_probs(self, i: int) -> tuple[float, float]:
        """(p_unmask, p_stay_masked) for a masked position at step i."""
        a_t, a_s = float(self.alpha(self._t[i])), float(self.alpha(self._t[i + 1]))
        return (a_s - a_t) / (1 - a_t), (1 - a_s) / (1 - a_t)

    # ------------------------------------------------------------------ states
    def encode_condition(self, raw: Sequence[Any]) -> Condition:
        """Unconditional generation: one (ignored) raw condition per sample."""
        if isinstance(raw, str):
            raise TypeError("encode_condition takes a list (one entry per sample), not one string")
        return Condition(list(raw))

    def init_state(self, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """All positions masked: (B, L, V) one-hots. Draws no randomness."""
        x = torch.zeros(len(cond), self.seq_len, self.vocab_size, device=self.banned.device)
        x[..., self.mask_token_id] = 1.0
        return x

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, V) one-hot states."""
        return F.one_hot(tokens.long(), self.vocab_size).float()

    def is_masked(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, 1) float indicator of [MASK] positions (no gradient)."""
        return (x.detach().argmax(-1) == self.mask_token_id).unsqueeze(-1).to(x.dtype)

    # ------------------------------------------------------------------ model
    def model_output(self, x_t: torch.Tensor, i: int, cond: Condition) -> torch.Tensor:
        """log x̂0 probabilities (B, L, V) with [MASK] and forbidden tokens at -inf (SUBS)."""
        self.counter.nfe += x_t.shape[0]
        if torch.is_grad_enabled():
            self.counter.nfe_grad += x_t.shape[0]
        emb = self.denoiser.get_input_embeddings().weight
        logits = self.denoiser(inputs_embeds=x_t.to(emb.dtype) @ emb).logits.float()
        logits = logits.masked_fill(self.banned, float("-inf"))
        return torch.log_softmax(logits, dim=-1)

    def _straight_through(self, scores: torch.Tensor, tau: float) -> torch.Tensor:
        hard = F.one_hot(scores.argmax(-1), self.vocab_size).to(scores.dtype)
        if not torch.is_grad_enabled():
            return hard
        soft = torch.softmax(scores / tau, dim=-1)
        return hard + soft - soft.detach()

    def step_log_probs(self, logp: torch.Tensor, i: int) -> torch.Tensor:
        """log q(x_s | x_t masked) over the vocabulary, (B, L, V)."""
        p_unmask, p_stay = self.transition_probs(i)
        logq = logp + torch.log(torch.tensor(p_unmask))
        stay = torch.log(torch.tensor(p_stay)) if p_stay > 0 else torch.tensor(float("-inf"))
        return logq.index_fill(-1, torch.tensor([self.mask_token_id], device=logq.device), float(stay))

    def step(self, x_t, i, cond, noise=None, generator=None, out=None):
        return self.relaxed_step(x_t, i, cond, noise, generator, out, soft=self.soft_steps)

    def relaxed_step(self, x_t, i, cond, noise=None, generator=None, out=None, soft: bool = False) -> torch.Tensor:
        """One reverse step (B, L, V) -> (B, L, V); ``step`` with the relaxation chosen by the caller.

        Without grad both relaxations are the plain sampler (hard one-hots). With grad:
        ``soft=False``: straight-through — each newly drawn token is one-hot forward, Gumbel-softmax
        backward, and positions whose argmax is a token are carried over.
        ``soft=True`` (DRAKES's relaxation): an intermediate step returns the soft Gumbel-softmax sample
        y = softmax((log q + G)/τ) mixed by the state's mask probability m = x_t[..., MASK] (the
        reference code's soft copy flag): x_s = m·y + (1 - m)·x_t, so the next denoiser call reads a
        point of the simplex; the last step (nothing stays masked) returns the straight-through
        one-hot of that mixture's argmax. The same Gumbel draws are consumed either way.
        """
        logp = self.model_output(x_t, i, cond) if out is None else out
        g = gumbel_noise(x_t.shape, generator, x_t.device).to(x_t.device) if noise is None else noise
        scores = self.step_log_probs(logp, i) + g
        if not (soft and torch.is_grad_enabled()):
            y = self._straight_through(scores, self.tau)
            m = self.is_masked(x_t)
            return m * y + (1 - m) * x_t
        m = x_t[..., self.mask_token_id:self.mask_token_id + 1]
        x_s = m * torch.softmax(scores / self.tau, dim=-1) + (1 - m) * x_t
        if i + 1 < self.num_steps:
            return x_s
        hard = F.one_hot(x_s.detach().masked_fill(self.banned, float("-inf")).argmax(-1), self.vocab_size).to(x_s.dtype)
        return hard + x_s - x_s.detach()

    def predict_x0(self, x_t, i, cond, out=None):
        """The denoiser's most likely token at masked positions (straight-through softmax with grad);
        unmasked tokens carried over."""
        logp = self.model_output(x_t, i, cond) if out is None else out
        m = self.is_masked(x_t)
        return m * self._straight_through(logp, 1.0) + (1 - m) * x_t

    def deterministic_step(self, x_t, i, cond, out=None):
        """Greedy unmasking, the deterministic counterpart of ``step`` (look-ahead values). The number
        of masked positions follows the schedule: after step i, round(L·(1 - α(t_{i+1}))) of the L
        positions stay masked (the sampler's expected count from all-[MASK]; none after the last
        step), so each sequence unmasks n - that many of its n masked positions (none if it is
        already at or below the schedule), those whose most likely token is the most probable, which
        take that token. (Unmasking round(n·p_unmask) per step instead rounds to 0 at every step but
        the last once L/T < 0.5; a zero-noise ``step`` never unmasks: p_unmask <= p_stay until the
        last steps.) Hard one-hots."""
        logp = self.model_output(x_t, i, cond) if out is None else out
        masked = self.is_masked(x_t).squeeze(-1).bool()  # (B, L)
        n = masked.sum(1)
        keep_masked = 0 if i + 1 >= self.num_steps else round(masked.shape[1] * (1 - float(self.alpha(self._t[i + 1]))))
        k = (n - keep_masked).clamp(min=0)
        conf, tok = logp.detach().max(-1)
        order = conf.masked_fill(~masked, float("-inf")).argsort(1, descending=True)
        positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        pick = masked & (rank < k[:, None])
        return torch.where(pick[..., None], F.one_hot(tok, self.vocab_size).to(x_t.dtype), x_t.detach())

    def transition_log_prob(self, x_t: torch.Tensor, i: int, x_prev: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """log q(x_prev | x_t) of the sampler's step i from the denoiser's output ``logp`` (B, L, V),
        averaged over the L positions (as DDPO averages Gaussian log-densities over dimensions), (B,).
        A position masked in x_t contributes log q of the token (or [MASK]) x_prev holds there; an
        unmasked one is carried over with probability 1 (log 1 = 0). x_prev: hard one-hots."""
        logq = self.step_log_probs(logp, i)
        picked = logq.gather(-1, self.tokens(x_prev).unsqueeze(-1)).squeeze(-1)  # (B, L)
        return torch.where(self.is_masked(x_t).squeeze(-1).bool(), picked, picked.new_zeros(())).mean(-1)

    def log_prob(self, x_t, i, x_prev, cond):
        """log q(x_prev | x_t, c) per sample (B,), averaged over positions; one denoiser call."""
        return self.transition_log_prob(x_t, i, x_prev, self.model_output(x_t, i, cond))

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """The one-hot sequences themselves, (B, L, V) — differentiable under straight-through, so
        a differentiable reward (a surrogate network) takes them as they are; black-box rewards turn
        each into a string / molecule in ``to_object`` (``tokens`` gives the ids)."""
        self.counter.count_decodes(x0.shape[0])
        return x0

    @staticmethod
    def tokens(x: torch.Tensor) -> torch.Tensor:
        """(B, L, V) one-hots -> (B, L) token ids."""
        return x.detach().argmax(-1)

    def kl_to_base(self, x_t: torch.Tensor, i: int, cond: Condition, logp: torch.Tensor | None = None) -> torch.Tensor:
        """KL(q_θ(x_s | x_t) || q_pre(x_s | x_t)) per sample, (B,): masked positions only; the shared
        stay-masked mass cancels, leaving p_unmask · KL(x̂0_θ || x̂0_pre). On a soft (relaxed) state
        each position is weighted by its mask probability x_t[..., MASK] (no gradient), which is the
        [MASK] indicator on one-hot states."""
        logp = self.model_output(x_t, i, cond) if logp is None else logp
        with torch.no_grad(), self.base_model():
            logp_pre = self.model_output(x_t.detach(), i, cond)
        p_unmask, _ = self.transition_probs(i)
        # banned tokens have log-prob -inf under both models: zero their difference before the
        # product so neither the value nor its gradient sees -inf - -inf
        diff = (logp - logp_pre).masked_fill(self.banned, 0.0)
        kl = (logp.exp() * diff).sum(-1)  # (B, L)
        return p_unmask * (kl * x_t.detach()[..., self.mask_token_id]).sum(-1)


class MaskedDiffusionPretraining(GeneratorPretraining):
    """Train a masked diffusion model with MDLM's continuous-time objective: draw t ~ U(0, 1], mask
    each token with probability 1 - α(t), and minimise (1/t)·Σ_masked -log x̂0(token) per sequence,
    averaged over tokens — for the log-linear schedule α'(t)/(1 - α(t)) = -1/t, so this is the
    NELBO's weighting. Batches are (B, L) token-id tensors. At the end the generator's
    ``save_pretrained(output_dir)`` writes the weights (if it has one), with ``generator_fit.json``.

    Args:
        generator: the ``MaskedDiffusionGenerator`` to train (all denoiser weights).
        lr, weight_decay: AdamW.
        warmup_steps: linear learning-rate warm-up; decay: then decay linearly to 5% at max_steps.
        output_dir: where the model is saved (default: the trainer's log folder).
    """

    metric, unit = "val/nelbo", " nats/token"

    def loss(self, tokens: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        g = self.generator
        B = tokens.shape[0]
        t = torch.rand(B, 1, generator=rng).clamp(min=1e-3).to(tokens.device)
        masked = torch.rand(tokens.shape, generator=rng).to(tokens.device) < (1 - g.alpha(t).to(tokens.device))
        x = g.from_tokens(torch.where(masked, torch.full_like(tokens, g.mask_token_id), tokens))
        logp = g.model_output(x, 0, Condition([None] * B))
        nll = -logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (nll * masked / t).sum() / tokens.numel()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/nelbo", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        rng = torch.Generator().manual_seed(batch_idx)
        self.log("val/nelbo", self.loss(batch, rng), prog_bar=True, batch_size=batch.shape[0])
