"""DNA recipes' own checks for tests/test_recipes.py: steering writes valid sequences; DRAKES takes
the KL's gradient at every sampler step; pretraining saves a model that loads back as trained."""

from __future__ import annotations

import torch


def check_predict(run) -> None:
    from domains.dna.motifs import BASES

    lines = [line for f in sorted((run.out / "samples").glob("*.txt")) for line in f.read_text().split()]
    assert len(lines) == run.summary["samples"]
    length = run.config("model.init_args.generator.init_args.seq_len")
    assert all(set(line) <= set(BASES) and len(line) == length for line in lines)


def check_fit(run) -> None:
    from domains.dna.generator import DNAGenerator
    from rewardopt.methods.drakes import DRAKES

    if isinstance(run.cli.model, DRAKES) and not run.config("model.init_args.truncate_kl"):
        steps, batch = run.spec.steps, run.config("data.init_args.batch_size")
        assert run.summary["nfe_grad"] == steps * batch * run.config("model.init_args.generator.init_args.num_steps")
    if run.cli.model.__class__.__name__ == "MaskedDiffusionPretraining":
        assert_same_weights(DNAGenerator(pretrained=str(run.out), num_steps=2), run.cli.model.generator)


def assert_same_weights(loaded: torch.nn.Module, trained: torch.nn.Module) -> None:
    """Every tensor of ``loaded`` equals the one of that name in ``trained``."""
    mine, theirs = loaded.state_dict(), trained.state_dict()
    assert mine and set(mine) <= set(theirs)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k
