"""benchmarks/dp_bandit.py in its tiny mode: the page, the plot and the audit's verdict (regret and audit in the
default tier; with the Best-of-N section, which loads the tiny image generator, in the slow tier)."""

from __future__ import annotations

import math
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def _run(tmp_path, *extra):
    import dp_bandit

    return dp_bandit.main(["--tiny", "--out", str(tmp_path), *extra])


def test_tiny_regret_and_audit_page(tmp_path):
    out = _run(tmp_path, "--skip-bon")
    text = out["page"].read_text()
    assert out["png"].is_file() and out["png"].stat().st_size > 1000
    for field in ("**commit**", "**seeds**: 0, 1", "dp_bandit_regret.png", "## 1. Simple regret", "## 2. Empirical"):
        assert field in text, field
    assert "## 3." not in text
    # every (method, epsilon) has a fitted slope; output perturbation at epsilon = inf is plain KRR: the bandit's row
    assert set(out["slopes"]) >= {("private bandit", e) for e in (0.5, 1.0, 4.0, math.inf)}
    assert out["curves"]["output perturbation, lam = 1", math.inf] == out["curves"]["private bandit", math.inf]
    # with fresh noise the audit never exceeds the nominal epsilon; with the seed known it does (8 trials suffice
    # at epsilon = 0.5)
    secret = [line for line in text.splitlines() if "| secret (fresh per trial) |" in line]
    known = [line for line in text.splitlines() if "| known to the attacker" in line]
    assert len(secret) == len(known) == 3
    assert all(line.rstrip().endswith("| yes |") for line in secret)
    assert known[0].rstrip().endswith("| NO |")


@pytest.mark.slow
def test_tiny_page_with_best_of_n(tmp_path):
    text = _run(tmp_path)["page"].read_text()
    assert "## 3. Best-of-N" in text and "true taste (oracle)" in text and "plain sampler" in text
    assert (tmp_path / "seed0" / "eps_1" / "reward_model" / "reward_model.json").is_file()
