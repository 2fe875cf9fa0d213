"""The `rewardopt` command explains a bad config in at most three lines (which key, what is wrong, the
fix) and exits with code 2; --debug / REWARDOPT_DEBUG=1 add the full traceback. Each case runs the
installed command on a copy of the tiny DRaFT-LV recipe with one mistake, as a new user would. A real
error (not a config mistake) keeps its normal traceback and exit code 1, and the output held back while
the config was built is shown, even when the process is killed."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from domains.images.rewards import ShapeAttributeReward
from rewardopt.cli import exception_chain
from tests.conftest import ROOT

HELD_LINE = "rewardopt-test: printed while the config is built"


class CrashingReward(ShapeAttributeReward):
    """A reward whose construction hits a real error (not a config mistake) after printing a line on
    stderr: a RuntimeError (as an out-of-memory error is), or the process killed (the OOM killer)."""

    def __init__(self, crash: str = "runtime_error", **kwargs) -> None:
        super().__init__(**kwargs)
        print(HELD_LINE, file=sys.stderr, flush=True)
        if crash == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("out of memory (simulated): not a config mistake")


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
STEER_RECIPE = (ROOT / "recipes/images/steer/best_of_n_jpeg_tiny.yaml").read_text()
CRASHING_REWARD = "      class_path: tests.test_cli_errors.CrashingReward\n      init_args:\n        crash: %s\n"
OTHER_RUNS = {  # name: (recipe, old, new, subcommand)
    # two components of one class; the second (eval_reward) is wrong: the error must name that one
    "eval_reward_bad_on_failure": (STEER_RECIPE, "    n: 4 ", "    eval_reward:\n      class_path: domains.images."
                                   "rewards.JpegCompressibilityReward\n      init_args: {on_failure: skip}\n    n: 4 ",
                                   "predict"),
    "runtime_error_in_init": (RECIPE, REWARD_BLOCK, CRASHING_REWARD % "runtime_error", "fit"),
    "killed_in_init": (RECIPE, REWARD_BLOCK, CRASHING_REWARD % "kill", "fit"),
}
RUN_TIMEOUT_S = 300


def bad_recipe(tmp_path: Path, mistake: str) -> Path:
    recipe, old, new, _ = OTHER_RUNS[mistake] if mistake in OTHER_RUNS else (RECIPE, *MISTAKES[mistake], "fit")
    assert recipe.count(old) == 1, f"the recipe changed; update MISTAKES / OTHER_RUNS[{mistake!r}]"
    path = tmp_path / f"{mistake}.yaml"
    path.write_text(recipe.replace(old, new))
    return path


def start_rewardopt_fit(config: Path, *extra: str, subcommand: str = "fit") -> subprocess.Popen:
    """`rewardopt fit --config <config>` as a user runs it (no test-only verbosity settings)."""
    exe = Path(sys.executable).parent / "rewardopt"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY") and not k.startswith("REWARDOPT_")}
    # config-time output is held back up to this long; a loaded CI machine can take a while to import
    env.update(OMP_NUM_THREADS="1", REWARDOPT_HOLD_OUTPUT_S=str(RUN_TIMEOUT_S))
    # CrashingReward (this file) is a user's own module: importable as a user makes it, on PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([str(exe), subcommand, "--config", str(config), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """(exit code, stderr) of each bad recipe; the commands run side by side (their imports dominate)."""
    tmp = tmp_path_factory.mktemp("bad_recipes")
    procs = {m: start_rewardopt_fit(bad_recipe(tmp, m)) for m in MISTAKES}
    procs.update({m: start_rewardopt_fit(bad_recipe(tmp, m), subcommand=OTHER_RUNS[m][3]) for m in OTHER_RUNS})
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
                                    "Use DDPO (policy gradient) or VARD (a learned value) for fine-tuning"),
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


def test_error_names_the_failing_one_of_two_components_of_the_same_class(runs):
    rc, err = runs["eval_reward_bad_on_failure"]
    lines = err.strip().splitlines()
    assert rc == 2 and 1 <= len(lines) <= 3, err
    assert "rewardopt: error in model.init_args.eval_reward (JpegCompressibilityReward)" in lines[0], err
    assert "on_failure must be 'raise', 'exclude', a number or null" in lines[0] and "got 'skip'" in lines[0]


def test_a_real_error_while_building_keeps_its_traceback_exit_code_1_and_the_held_output(runs):
    rc, err = runs["runtime_error_in_init"]
    assert rc == 1, err
    assert "Traceback (most recent call last)" in err and 'test_cli_errors.py", line' in err, "the user's frames"
    assert "\nRuntimeError: out of memory (simulated): not a config mistake\n" in err, err
    if sys.version_info >= (3, 11):  # the last line names the cause under jsonargparse's wrapping error
        assert err.strip().splitlines()[-1] == ("rewardopt: not a config error; the cause is RuntimeError: out of "
                                                "memory (simulated): not a config mistake (its traceback is above)")
    assert HELD_LINE in err and err.index(HELD_LINE) < err.index("Traceback"), "held output shown, in order"
    assert "rewardopt: error in" not in err


def test_output_held_back_is_shown_when_the_process_is_killed(runs):
    rc, err = runs["killed_in_init"]
    assert rc == -signal.SIGKILL, err
    assert HELD_LINE in err and "Seed set to 0" in err, f"the held output was lost:\n{err}"


def test_error_lists_every_candidate_key_when_the_failing_component_cannot_be_told_apart():
    """Two components with the same class and the same init args: either may be the one that failed."""
    from jsonargparse import ArgumentParser

    from rewardopt.cli import _mark_config_error, explain_config_error
    from rewardopt.rewards.base import Reward

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    parser.add_argument("--eval_reward", type=Reward)
    same = '{"class_path": "domains.images.rewards.JpegCompressibilityReward", "init_args": {"on_failure": "skip"}}'
    config = parser.parse_args(["--reward", same, "--eval_reward", same])
    with pytest.raises(ValueError) as error:
        parser.instantiate_classes(config)
    _mark_config_error(error.value, config, None)
    first = explain_config_error(error.value)[0]
    assert first.startswith("rewardopt: error in reward or eval_reward (JpegCompressibilityReward): "), first


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
