"""Regression tests for the review of seeds and defaults (issue 12, items 13-15): training noise is
drawn per micro-batch (not per optimiser step) so gradient accumulation sees fresh noise, with
resumes still exact; DRAKES sums the KL over every step and relaxes intermediate steps with soft
Gumbel-softmax samples; DRIL's defaults follow the reference code (amazon-research/sc2qa-dril)."""


import lightning as L
import pytest
import torch

from rewardopt.data import PromptDataModule
from rewardopt.methods.drakes import DRAKES
from tests.test_masked_diffusion import MASK, CountToken, make


def record_training_noise(method):
    """Wrap ``method.training_rng`` so each call records the first draws of the generator it returns."""
    draws = []
    original = method.training_rng

    def wrapped():
        rng = original()
        probe = torch.Generator().set_state(rng.get_state())
        draws.append(torch.rand(8, generator=probe))
        return rng

    method.training_rng = wrapped
    return draws


def tiny_fit(method, data, steps, accumulate, **kw):
    L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, **kw).fit(method, datamodule=data)


# ---------------------------------------------------------------------------------------- item 13: seeds
def test_training_seed_is_distinct_per_micro_batch_and_rank():
    from rewardopt.run import derived_seed

    seeds = {derived_seed(7, b, r, 4) for b in range(50) for r in range(4)}
    assert len(seeds) == 200
    assert derived_seed(7, 3, 0, 1) == 7 * 1_000_003 + 3, "one process, no accumulation: the old global-step seeds"


def test_accumulated_micro_batches_draw_different_training_noise(tmp_path):
    """accumulate_grad_batches=2, 2 optimiser steps: the 4 micro-batches must draw 4 different noises
    (seeded from global_step, micro-batches 0/1 and 2/3 drew the same x_T / Gumbel noise)."""
    m = DRAKES(make(T=2, full_finetune=True), CountToken(), truncate=1, lr=1e-3, output_dir=str(tmp_path))
    draws = record_training_noise(m)
    data = PromptDataModule(list(range(8)), list(range(2)), batch_size=2, val_batch_size=2, epoch_size=16)
    tiny_fit(m, data, steps=2, accumulate=2)
    assert m.global_step == 2 and len(draws) == 4
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i))


def test_dril_accumulated_micro_batches_draw_different_branches_and_samples(tmp_path):
    from domains.qa_text.data import QADataModule
    from domains.qa_text.model import TwoDecoderBart
    from rewardopt.methods.dril import DRIL

    model = TwoDecoderBart(None, d_model=16, layers=1, vocab_size=300, n_towns=30, max_answer_tokens=8)
    m = DRIL(model, sample_prob=0.5, output_dir=str(tmp_path))
    draws = record_training_noise(m)
    data = QADataModule(n_towns=30, batch_size=2, val_batch_size=2, max_val=2, epoch_size=16)
    tiny_fit(m, data, steps=2, accumulate=2)
    assert m.global_step == 2 and len(draws) == 4
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i))


def test_resume_under_gradient_accumulation_is_exact(tmp_path):
    """DRIL, accumulate_grad_batches=2: 2 optimiser steps + checkpoint, resumed to 4 == 4 at once
    (the micro-batch index restored from the checkpoint's loop progress seeds branches and samples)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from domains.qa_text.data import QADataModule
    from domains.qa_text.model import TwoDecoderBart
    from rewardopt.methods.dril import DRIL

    def run(steps, folder, resume=False, checkpoint=True):
        model = TwoDecoderBart(None, d_model=16, layers=1, vocab_size=300, n_towns=30, max_answer_tokens=8)
        m = DRIL(model, sample_prob=0.5, lr=1e-3, output_dir=str(folder))
        cb = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)] if checkpoint else []
        data = QADataModule(n_towns=30, batch_size=2, val_batch_size=2, max_val=2, epoch_size=64)
        L.Trainer(max_steps=steps, accumulate_grad_batches=2, accelerator="cpu", logger=False, callbacks=cb,
                  enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(folder)).fit(
            m, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt") if resume else None)
        return m

    straight = run(4, tmp_path / "straight", checkpoint=False)
    run(2, tmp_path / "killed")
    resumed = run(4, tmp_path / "killed", resume=True)
    assert resumed.global_step == 4 and resumed.sampled_steps == straight.sampled_steps
    assert 0 < straight.sampled_steps < 8, "both branches ran"
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


# ---------------------------------------------------------------------------------------- item 14: DRAKES
def perturbed(T, seed=0):
    """A tiny masked generator whose fine-tuned copy differs from its frozen base (KL > 0)."""
    g = make(T=T, full_finetune=True)
    g.setup_trainable()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in g.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    return g


def hand_rollout(g, cond, seed):
    """The sampler without grad and the KL of every step at the states it visits, one by one."""
    rng = torch.Generator().manual_seed(seed)
    x, per_step = g.init_state(cond, rng), []
    with torch.no_grad():
        for i in range(g.num_steps):
            logp = g.model_output(x, i, cond)
            per_step.append(g.kl_to_base(x, i, cond, logp))
            x = g.step(x, i, cond, generator=rng, out=logp)
    return x, per_step


@pytest.mark.parametrize("intermediate", [None, "soft", "straight_through"])
def test_drakes_kl_sums_every_step_like_the_reference_default(intermediate):
    """Reference default truncate_kl=False: the KL term covers all T steps, the early ones at their
    detached states (before: only the last ``truncate`` steps)."""
    g = perturbed(T=4)
    kw = {} if intermediate is None else {"intermediate": intermediate}
    m = DRAKES(g, CountToken(), truncate=1, kl_weight=1.0, **kw)
    cond = g.encode_condition([None] * 3)
    nfe_grad = g.counter.nfe_grad
    x0, kl = m.rollout(cond, torch.Generator().manual_seed(5))
    hand_x0, per_step = hand_rollout(g, cond, 5)
    # the same sampled states (straight-through one-hots equal the hand's up to float rounding of hard + soft - soft)
    assert torch.equal(x0.detach().argmax(-1), hand_x0.argmax(-1)), "the same sampled states"
    torch.testing.assert_close(x0.detach(), hand_x0)
    assert all((k > 0).any() for k in per_step[:-1]), "the early steps' KL is not zero on this model"
    assert torch.allclose(kl, sum(per_step), rtol=1e-5, atol=1e-7)
    assert g.counter.nfe_grad - nfe_grad == 4 * 3, "one forward with grad per step (for its KL)"
    kl.sum().backward()  # the early terms reach the weights, through the model at fixed states
    assert sum(float(p.grad.abs().sum()) for p in g.trainable_parameters() if p.grad is not None) > 0
    _, truncated = DRAKES(g, CountToken(), truncate=1, kl_weight=1.0, truncate_kl=True, **kw).rollout(
        cond, torch.Generator().manual_seed(5))
    assert torch.allclose(truncated, per_step[-1], rtol=1e-5, atol=1e-7), "truncate_kl: the last step only"


def denoiser_inputs(method, cond, seed=0):
    """The states the denoiser reads during a DRAKES rollout (with grad) and x_0."""
    g, seen = method.generator, []
    original = g.model_output

    def spy(x_t, i, c):
        if torch.is_grad_enabled() and x_t.requires_grad:
            seen.append(x_t.detach().clone())
        return original(x_t, i, c)

    g.model_output = spy
    try:
        x0, _ = method.rollout(cond, torch.Generator().manual_seed(seed))
    finally:
        del g.model_output
    return seen, x0


def is_one_hot(x, atol=1e-6):
    """Every row is a one-hot vector (up to the rounding of straight-through's hard + soft - soft)."""
    zero_or_one = ((x.abs() < atol) | ((x - 1).abs() < atol)).all()
    return bool(zero_or_one and torch.allclose(x.sum(-1), torch.ones(x.shape[:-1])))


def test_drakes_intermediate_steps_are_soft_gumbel_softmax_by_default():
    """The paper relaxes each intermediate step to a soft Gumbel-softmax sample that the next denoiser
    call reads (before: straight-through one-hots); x_0 stays one-hot forward (straight-through)."""
    cond = make().encode_condition([None] * 4)
    soft = DRAKES(perturbed(T=4), CountToken(), truncate=None, kl_weight=0.0)
    assert soft.intermediate == "soft"
    seen, x0 = denoiser_inputs(soft, cond)
    assert len(seen) == 3 and not any(is_one_hot(s) for s in seen), "steps 1..3 read soft states"
    assert all(torch.allclose(s.sum(-1), torch.ones(s.shape[:-1]), atol=1e-5) for s in seen), "on the simplex"
    assert is_one_hot(x0.detach()) and not (x0.detach().argmax(-1) == MASK).any()
    x0[..., 3].sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in soft.generator.trainable_parameters() if p.grad is not None) > 0

    st = DRAKES(perturbed(T=4), CountToken(), truncate=None, kl_weight=0.0, intermediate="straight_through")
    seen, x0 = denoiser_inputs(st, cond)
    assert len(seen) == 3 and all(is_one_hot(s) for s in seen), "straight-through: one-hot states forward"
    assert is_one_hot(x0.detach())
    with pytest.raises(ValueError, match="intermediate"):
        DRAKES(perturbed(T=4), CountToken(), intermediate="hard")


# ---------------------------------------------------------------------------------------- item 15: DRIL
def tiny_qa(**kw):
    from domains.qa_text.model import TwoDecoderBart

    torch.manual_seed(0)
    return TwoDecoderBart(None, d_model=16, layers=1, vocab_size=300, n_towns=30, max_answer_tokens=24, **kw)


@pytest.fixture(scope="module")
def qa_examples():
    from domains.qa_text.kb import build_examples, make_towns

    return build_examples(make_towns(12, seed=3), seed=3)


def test_question_memory_defaults_to_the_answer_for_new_models_only(tmp_path):
    """Reference: decoder 2 cross-attends to decoder 1's states only. A model saved before the option
    existed (no qa.json) keeps "answer+source", which it was trained with; the shipped tiny one is "answer"."""
    from domains.qa_text.model import EMBEDDED, TwoDecoderBart

    m = tiny_qa()
    assert m.question_memory == "answer"
    m.save_pretrained(tmp_path / "saved")
    assert TwoDecoderBart(str(tmp_path / "saved")).question_memory == "answer"
    (tmp_path / "saved" / "qa.json").unlink()  # an older save: its decoder 2 was trained on [source; answer]
    assert TwoDecoderBart(str(tmp_path / "saved")).question_memory == "answer+source"
    m.bart.save_pretrained(tmp_path / "plain")  # a plain BART checkpoint: decoder 2 is new
    m.tokenizer.save_pretrained(tmp_path / "plain")
    assert TwoDecoderBart(str(tmp_path / "plain")).question_memory == "answer"
    if (EMBEDDED["embedded:tiny-qa"] / "bart").is_dir():
        assert TwoDecoderBart("embedded:tiny-qa").question_memory == "answer"  # pretrained so (issue 14 item 3)


def test_dril_default_loss_mixture_is_the_reference_one(qa_examples):
    """Reference (sc2qa-dril, modeling_bart.py): sampled branch 0.3 x the question's NLL given the
    sampled answer, nothing else; gold branch the answer's NLL only (the question's is x 0)."""
    from rewardopt.methods.dril import DRIL

    m, batch = tiny_qa(), qa_examples[:3]
    sampled = DRIL(m, sample_prob=1.0).loss_terms(batch)
    assert torch.isclose(sampled["loss"], 0.3 * sampled["reconstruction_nll"])
    gold = DRIL(m, sample_prob=0.0).loss_terms(batch)
    assert torch.isclose(gold["loss"], gold["answer_nll"])
    m.zero_grad()
    gold["loss"].backward()
    grads = [p.grad for p in m.question_decoder.layers.parameters()]
    assert all(g is not None and not g.any() for g in grads), "gold steps: decoder 2 in the graph, zero gradient"
    ours = DRIL(m, sample_prob=1.0, mle_in_sample_branch=True).loss_terms(batch)
    assert torch.isclose(ours["loss"], ours["answer_nll"] + 0.3 * ours["reconstruction_nll"])
    ours = DRIL(m, sample_prob=0.0, question_mle=True).loss_terms(batch)
    assert torch.isclose(ours["loss"], ours["answer_nll"] + ours["question_nll"])


def test_sampled_answers_block_repeated_trigrams_and_early_ends(qa_examples):
    """Reference rollouts: no_repeat_ngram_size=3 and min_length=10 (HF semantics: the decoder start
    token counts, so EOS comes 10th at the earliest). A model that wants to repeat one token and stop
    must do neither."""
    m = tiny_qa()
    favourite = 100
    with torch.no_grad():
        m.bart.final_logits_bias[0, m.eos] += 12.0
        m.bart.final_logits_bias[0, favourite] += 10.0
    ids = m.sample_answers(qa_examples[:4], generator=torch.Generator().manual_seed(0))
    for row in ids.tolist():
        row = row[: row.index(m.eos) + 1]
        assert len(row) >= 10, row
        trigrams = [tuple(row[j:j + 3]) for j in range(len(row) - 2)]
        assert len(trigrams) == len(set(trigrams)), row
    free = tiny_qa(no_repeat_ngram_size=0, min_answer_length=0)
    free.load_state_dict(m.state_dict())
    loose = free.sample_answers(qa_examples[:4], generator=torch.Generator().manual_seed(0))
    assert (loose[:, :3] == m.eos).any(1).all(), "unconstrained (the option): this model stops at once"
