"""The `rewardopt` command explains a bad config in at most three lines (which key, what is wrong, the
fix) and exits with code 2; --debug / REWARDOPT_DEBUG=1 add the full traceback. Each case runs the
installed command on a copy of the tiny DRaFT-LV recipe with one mistake, as a new user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewardopt.cli import exception_chain
from tests.conftest import ROOT

RECIPE = (ROOT / "recipes/images/draft_lv_tiny.yaml").read_text()
REWARD_BLOCK = """      class_path: domains.images.rewards.ShapeAttributeReward
      init_args:
        attribute: colour
        target: blue                 # null: reward agreement with each prompt's colour instead
"""
MISTAKES = {
    "misspelled_key": ("        lora_rank: 4 ", "        lora_rnak: 4 "),
    "height_25": ("        height: 24", "        height: 25"),
    "missing_model_folder": ("pretrained: embedded:tiny-shapes", "pretrained: ./no/such/model"),
    "black_box_reward_with_draft": (
        REWARD_BLOCK, "      class_path: domains.images.rewards.JpegCompressibilityReward\n"),
}
RUN_TIMEOUT_S = 300


def bad_recipe(tmp_path: Path, mistake: str) -> Path:
    old, new = MISTAKES[mistake]
    assert RECIPE.count(old) == 1, f"the tiny recipe changed; update MISTAKES[{mistake!r}]"
    path = tmp_path / f"{mistake}.yaml"
    path.write_text(RECIPE.replace(old, new))
    return path


def start_rewardopt_fit(config: Path, *extra: str) -> subprocess.Popen:
    """`rewardopt fit --config <config>` as a user runs it (no test-only verbosity settings)."""
    exe = Path(sys.executable).parent / "rewardopt"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY") and not k.startswith("REWARDOPT_")}
    # config-time output is held back up to this long; a loaded CI machine can take a while to import
    env.update(OMP_NUM_THREADS="1", REWARDOPT_HOLD_OUTPUT_S=str(RUN_TIMEOUT_S))
    return subprocess.Popen([str(exe), "fit", "--config", str(config), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """(exit code, stderr) of each bad recipe; the commands run side by side (their imports dominate)."""
    tmp = tmp_path_factory.mktemp("bad_recipes")
    procs = {m: start_rewardopt_fit(bad_recipe(tmp, m)) for m in MISTAKES}
    out = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        out[name] = (proc.returncode, err)
    return out


EXPECTED = {
    # (key, what is wrong, the fix): each must appear on the few lines printed
    "misspelled_key": ("model.init_args.generator (StableDiffusionGenerator)", "Option 'lora_rnak' is not accepted",
                       "did you mean 'lora_rank'?"),
    "height_25": ("model.init_args.generator (StableDiffusionGenerator)",
                  "generator.height=25 is not a positive multiple of 4", "try 24"),
    "missing_model_folder": ("model.init_args.generator (StableDiffusionGenerator)",
                             "generator.pretrained: no model folder at './no/such/model'",
                             "or 'embedded:tiny-shapes'"),
    "black_box_reward_with_draft": ("error in model.init_args.reward (JpegCompressibilityReward)",
                                    "DRaFT needs a differentiable reward; JpegCompressibilityReward is black-box",
                                    "Use DDPO (policy gradient) for fine-tuning with a black-box reward"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_config_mistake_is_explained_in_three_lines_with_exit_code_2(mistake, runs):
    rc, err = runs[mistake]
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert 1 <= len(lines) <= 3, f"{len(lines)} lines on stderr:\n{err}"
    for text in EXPECTED[mistake]:
        assert text in err, f"{text!r} missing from:\n{err}"
    assert "Traceback" not in err and "Union subtypes" not in err and "Namespace(" not in err
    assert "--debug" in lines[-1]
    print(err)  # the verbatim output, for the closing note (pytest -s)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_full_traceback(how, monkeypatch, capfd, tmp_path):
    from rewardopt.cli import main

    args = ["fit", "--config", str(bad_recipe(tmp_path, "height_25"))]  # in-process: the imports are loaded
    if how == "flag":
        args.append("--debug")
    else:
        monkeypatch.setenv("REWARDOPT_DEBUG", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback (most recent call last)" in err
    assert 'stable_diffusion.py", line' in err and "_check_size" in err, "the user's frames are shown"
    last = err.strip().splitlines()[-1]
    assert last.startswith("rewardopt: error in model.init_args.generator") and "try 24" in last


def test_exception_chain_follows_cause_then_context():
    try:
        try:
            raise KeyError("inner")
        except KeyError:
            try:
                raise OSError("middle")
            except OSError as e:
                raise ValueError("outer") from e
    except ValueError as e:
        chain = exception_chain(e)
    assert [type(c).__name__ for c in chain] == ["ValueError", "OSError", "KeyError"]
