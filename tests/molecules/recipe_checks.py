"""Molecule recipes' own checks for tests/test_recipes.py: steering writes canonical SMILES (or
``<invalid>``) with rewards in [0, 1] and draws them in a row; DRAKES takes the KL's gradient at
every sampler step, draws before/after and saves a model that loads back as trained; pretraining
saves a loadable model of the recipe's vocabulary kind."""

from __future__ import annotations

import csv

import torch


def check_predict(run) -> None:
    from PIL import Image

    from domains.molecules.chem import canonical

    rows = list(csv.DictReader((run.out / "rewards.csv").open()))
    assert all(0.0 <= float(r["reward"]) <= 1.0 for r in rows)
    lines = [line for f in sorted((run.out / "samples").glob("*.txt")) for line in f.read_text().splitlines()]
    assert len(lines) == run.summary["samples"]
    assert all(line == "<invalid>" or canonical(line) == line for line in lines)
    w, h = Image.open(run.out / "grid.png").size  # the molecules drawn in a row
    assert w > h


def assert_same_weights(loaded: torch.nn.Module, trained: torch.nn.Module) -> None:
    """Every tensor of ``loaded`` equals the one of that name in ``trained``."""
    mine, theirs = loaded.state_dict(), trained.state_dict()
    assert mine and set(mine) <= set(theirs)
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def check_fit(run) -> None:
    from domains.molecules.generator import MoleculeGenerator
    from rewardopt.methods.drakes import DRAKES

    model = run.cli.model
    if isinstance(model, DRAKES):
        s = run.summary
        if not run.config("model.init_args.truncate_kl"):
            steps, batch = run.spec.steps, run.config("data.init_args.batch_size")
            assert s["nfe_grad"] == steps * batch * run.config("model.init_args.generator.init_args.num_steps")
        assert (run.out / "before_after.png").is_file()  # molecules drawn before/after fine-tuning
        assert_same_weights(MoleculeGenerator(pretrained=s["adapter"], num_steps=2), model.generator)
    if type(model).__name__ == "MaskedDiffusionPretraining":
        g = MoleculeGenerator(pretrained=str(run.out), num_steps=2)
        assert type(g.vocab).kind == ("smiles" if "smiles" in run.recipe.stem else "selfies")
        assert_same_weights(g, model.generator)
