"""DRIL — Zhou et al., "Generating Self-Contained and Summary-Centric Question Answer Pairs via
Differentiable Reward Imitation Learning" (EMNLP 2021; code amazon-research/sc2qa-dril).

A two-stage seq2seq model writes an answer (decoder 1) and then a question that attends to the
answer decoder's hidden states (decoder 2). MLE trains both on gold pairs, teacher-forced, so the
answer decoder never sees its own mistakes (exposure bias). DRIL adds a differentiable reward on
the model's *own* answers: with probability ``sample_prob`` (paper and reference 0.5) a step samples
answers free-running, re-runs decoder 1 teacher-forced on them, and the gold question's
cross-entropy under decoder 2 (weight ``reconstruction_weight``, 0.3) backpropagates through
decoder 1's hidden states into decoder 1 and the encoder: an answer from which the question can be
reconstructed is rewarded; otherwise the step trains on the gold pair.

Loss mixture, by default the reference code's (amazon-research/sc2qa-dril, ``modeling_bart.py``:
``train_what`` "one_decoder" / "two_decoders"): a sampled step is 0.3 × the reconstruction NLL and
nothing else; a gold step is the answer's NLL only (the reference multiplies the gold question's
NLL by 0, so decoder 2 gets zero gradients there and learns only from reconstruction). Our earlier mixture is an option:
``mle_in_sample_branch`` adds the answer's NLL to sampled steps and ``question_mle`` the gold
question's NLL to gold steps. Pretraining (``sample_prob: 0``, ``question_mle: true``) is plain MLE
of both decoders. The rollouts' sampling constraints (no_repeat_ngram_size=3, min_length=10 in the
reference) are the model's (``TwoDecoderBart``). Losses are per-token means over the batch.

The model is a ``TwoStageSeq2Seq`` (``domains/qa_text/model.py: TwoDecoderBart`` is):
``mle_terms(batch)`` -> {answer_nll, question_nll, answer_tokens, question_tokens} per example;
``sample_answers(batch, generator)`` -> (B, L) ids; ``reconstruction_nll(batch, answer_ids)`` ->
per-example NLL of the gold question given those answers; and ``save_pretrained(path)``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import lightning as L
import torch
from torch import nn

from rewardopt.methods.base import micro_batch_index
from rewardopt.run import RunMixin
from rewardopt.schedules import warmup_decay


class TwoStageSeq2Seq(ABC):
    """What DRIL trains: decoder 1 writes an answer from the source, decoder 2 the question from it."""

    @abstractmethod
    def mle_terms(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Per-example {answer_nll, question_nll, answer_tokens, question_tokens} of the gold pair."""

    @abstractmethod
    def sample_answers(self, batch: list[dict[str, Any]], generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) answer token ids drawn from decoder 1."""

    @abstractmethod
    def reconstruction_nll(self, batch: list[dict[str, Any]], answer_ids: torch.Tensor) -> torch.Tensor:
        """Per-example NLL of the gold question given ``answer_ids``, (B,)."""

    @abstractmethod
    def save_pretrained(self, path: str) -> None:
        """Write the model under ``path``."""


class DRIL(RunMixin, L.LightningModule):
    """Args:
        model: the two-stage seq2seq model (see the module docstring).
        sample_prob: probability that a step trains on the model's own answers (paper 0.5; 0: MLE).
        reconstruction_weight: weight of the question-reconstruction loss on own answers (paper 0.3).
        mle_in_sample_branch: also add the answer's NLL to sampled steps (ours; reference: no).
        question_mle: also add the gold question's NLL to gold steps (ours, and pretraining; reference: no).
        lr, weight_decay, warmup_steps, decay: AdamW with linear warm-up and optional linear decay.
        seed: the branch draws and answer sampling (with the micro-batch index and rank: exact resumes).
        output_dir: where the trained model (``save_pretrained``) and ``summary.json`` go (default: the
            trainer's ``log_dir``, ``default_root_dir`` without a logger; ``RunMixin``).
    """

    default_output_dir = "runs/dril"

    def __init__(self, model: nn.Module, sample_prob: float = 0.5, reconstruction_weight: float = 0.3,
                 mle_in_sample_branch: bool = False, question_mle: bool = False, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0,
                 decay: bool = False, seed: int = 0, output_dir: str | None = None) -> None:
        super().__init__()
        if not 0 <= sample_prob <= 1 or reconstruction_weight < 0:
            raise ValueError("need 0 <= sample_prob <= 1 and reconstruction_weight >= 0; "
                             f"got {sample_prob}, {reconstruction_weight}")
        if not isinstance(model, TwoStageSeq2Seq):
            raise TypeError(f"DRIL needs a TwoStageSeq2Seq model (rewardopt.methods.dril: mle_terms, sample_answers, "
                            f"reconstruction_nll, save_pretrained; e.g. domains.qa_text.model.TwoDecoderBart); "
                            f"got {type(model).__name__}")
        self.model = model
        self.sample_prob, self.reconstruction_weight = sample_prob, reconstruction_weight
        self.mle_in_sample_branch, self.question_mle = mle_in_sample_branch, question_mle
        self.lr, self.weight_decay, self.warmup_steps, self.decay = lr, weight_decay, warmup_steps, decay
        self.seed = seed
        self._output_dir = output_dir
        self.sampled_steps = 0
        self.val_history: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def training_rng(self) -> torch.Generator:
        """The branch draw and answer samples of this micro-batch on this rank (exact resumes)."""
        return self.rank_generator(self.seed, micro_batch_index(self))

    def loss_terms(self, batch: list[dict[str, Any]], rng: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        rng = rng or torch.Generator().manual_seed(self.seed)
        sampled = bool(torch.rand((), generator=rng) < self.sample_prob)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (not sampled or self.mle_in_sample_branch)):
            t = self.model.mle_terms(batch)  # only logged in a reference-mixture sampled step
        answer = t["answer_nll"].sum() / t["answer_tokens"].sum()
        question = t["question_nll"].sum() / t["question_tokens"].sum()
        out = {"answer_nll": answer.detach(), "question_nll": question.detach(),
               "sampled": torch.tensor(float(sampled))}
        if sampled:
            ids = self.model.sample_answers(batch, generator=rng)
            rec = self.model.reconstruction_nll(batch, ids).sum() / t["question_tokens"].sum()
            out["reconstruction_nll"] = rec.detach()
            out["loss"] = (answer if self.mle_in_sample_branch else 0.0) + self.reconstruction_weight * rec
        else:
            # the reference's gold step: question NLL x 0 — decoder 2 stays in the graph with zero gradients
            # (as there: DDP sees every parameter used, and AdamW still steps it on its moments)
            out["loss"] = answer + (1.0 if self.question_mle else 0.0) * question
        return out

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        t = self.loss_terms(batch, self.training_rng())
        self.sampled_steps += int(t["sampled"])
        n = len(batch)
        self.log("train/loss", t["loss"], prog_bar=True, batch_size=n)
        self.log("train/answer_nll", t["answer_nll"], prog_bar=True, batch_size=n)
        self.log("train/question_nll", t["question_nll"], batch_size=n)
        if "reconstruction_nll" in t:
            self.log("train/reconstruction_nll", t["reconstruction_nll"], batch_size=n)
        return t["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val = {"answer": 0.0, "question": 0.0, "a_tok": 0, "q_tok": 0}

    @torch.no_grad()
    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        t = self.model.mle_terms(batch)
        self._val["answer"] += float(t["answer_nll"].sum())
        self._val["question"] += float(t["question_nll"].sum())
        self._val["a_tok"] += int(t["answer_tokens"].sum())
        self._val["q_tok"] += int(t["question_tokens"].sum())

    def on_validation_epoch_end(self) -> None:
        v = self._val
        metrics = {"val/answer_nll": v["answer"] / max(v["a_tok"], 1),
                   "val/question_nll": v["question"] / max(v["q_tok"], 1)}
        self.log_dict(metrics, sync_dist=True)
        self.val_history.append({"step": self.global_step, **metrics})
        self.print(f"[rewardopt] step {self.global_step}: held-out answer NLL {metrics['val/answer_nll']:.4f}, "
                   f"question NLL {metrics['val/question_nll']:.4f} (per token)")

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=self.lr,
                                weight_decay=self.weight_decay)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else 0
        sched = warmup_decay(opt, self.warmup_steps, total if self.decay else 0)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["dril"] = {"sampled_steps": self.sampled_steps, "val_history": self.val_history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("dril", {})
        self.sampled_steps = state.get("sampled_steps", 0)
        self.val_history = list(state.get("val_history", []))

    def on_fit_end(self) -> None:
        if not self.is_global_zero():
            return
        out = self.output_dir
        self.model.save_pretrained(out)
        summary = {"method": "DRIL" if self.sample_prob > 0 else "MLE", "sample_prob": self.sample_prob,
                   "reconstruction_weight": self.reconstruction_weight,
                   "mle_in_sample_branch": self.mle_in_sample_branch, "question_mle": self.question_mle,
                   "steps": self.global_step,
                   "sampled_steps": self.sampled_steps, "validation": self.val_history,
                   "wall_time_s": round(time.perf_counter() - self._t0, 1)}
        self.print(f"[rewardopt] model: {out} ({self.global_step} steps, {self.sampled_steps} on own samples)")
        self.write_summary(summary)
