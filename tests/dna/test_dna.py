"""DNA: JASPAR motifs load offline, planted motifs raise both oracles, the training oracle is
differentiable and the evaluation oracle differs from it, the generator samples valid bases (the
recipes run in tests/test_recipes.py, with this domain's output checks in recipe_checks.py)."""

import pytest
import torch

pytest.importorskip("pyjaspar")

from domains.dna.motifs import (  # noqa: E402
    BASES,
    LIVER_TFS,
    GCContent,
    MotifActivity,
    MotifHitActivity,
    bases_of,
    generate_corpus,
    jaspar_pwm,
)


def test_jaspar_pwms_are_probabilities():
    for m in LIVER_TFS:
        pwm = jaspar_pwm(m)
        assert pwm.shape[1] == 4 and abs(pwm.sum(1) - 1).max() < 1e-9
    with pytest.raises(ValueError, match="no motif named"):
        jaspar_pwm("NOT_A_TF")


def test_planted_motifs_raise_both_oracles():
    planted = generate_corpus(200, 64, seed=1, max_sites=3)
    background = generate_corpus(200, 64, seed=1, max_sites=0)
    for oracle in (MotifActivity(), MotifHitActivity()):
        assert oracle(planted).total.mean() > oracle(background).total.mean() + 0.5


def test_training_oracle_is_differentiable_and_the_evaluation_oracle_differs():
    x = bases_of(generate_corpus(64, 64, seed=2)).requires_grad_(True)
    MotifActivity()(x).total.sum().backward()
    assert x.grad.abs().sum() > 0
    assert not MotifHitActivity.differentiable
    a, b = MotifActivity()(x.detach()).total, MotifHitActivity()(x.detach()).total
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.95, "a separate oracle, not a rescaling"
    gc = GCContent()(["GGCC", "ATAT"]).total
    assert gc.tolist() == [1.0, 0.0]


def test_generator_samples_valid_bases():
    from domains.dna.generator import DNAGenerator

    g = DNAGenerator("embedded:tiny-dna", num_steps=8)
    with torch.no_grad():
        x = g.sample(g.encode_condition([None] * 16), generator=torch.Generator().manual_seed(0))
    seqs = g.to_text(x)
    assert all(len(s) == g.seq_len and set(s) <= set(BASES) for s in seqs)


def test_shipped_model_learned_the_motifs():
    """The tiny default samples motifs: its sequences score far above motif-free background on both
    oracles (and below the planted corpus, leaving room for steering and fine-tuning)."""
    from domains.dna.generator import DNAGenerator

    g = DNAGenerator("embedded:tiny-dna", num_steps=32)
    with torch.no_grad():
        x = g.sample(g.encode_condition([None] * 64), generator=torch.Generator().manual_seed(0))
    background = generate_corpus(64, 64, seed=5, max_sites=0)
    planted = generate_corpus(64, 64, seed=6, min_sites=2, max_sites=4)
    # measured (128 samples): activity 7.1 vs background -11.1 / corpus 21.2; hits 1.19 vs 0.16 / 2.23
    for oracle, margin in ((MotifActivity(), 10.0), (MotifHitActivity(), 0.5)):
        got, bg, top = (oracle(s).total.mean() for s in (x, background, planted))
        assert bg + margin < got < top
