"""Every recipe says how it is tested (its ``# Test:`` header line) and is run that way through the
``rewardopt`` CLI, with its outputs in a temporary folder: ``fit N`` trains N steps, ``predict`` runs on
a small slice, ``skip <reason>`` only parses it (and builds it with tiny stand-ins where a domain
provides them). The run's outputs must exist and be sane; a domain adds its own output checks in
``tests/<domain>/recipe_checks.py``. Also: runs resume, DDP keeps ranks in sync (fit and predict),
bad pairings fail at config time.

The header line grammar (one line in the recipe's leading comment block)::

    # Test: [slow] fit STEPS [needs PATH [(HINT)]] [--key=value ...]
    # Test: [slow] predict [needs PATH [(HINT)]] [--key=value ...]
    # Test: skip REASON

``slow`` puts the run behind the ``slow`` marker; ``needs PATH`` (relative to the repository root)
names a file the run needs that a fresh checkout may lack: when it is missing the recipe is only
parsed and the test is skipped with the hint; ``--key=value`` overrides are added after the runner's
own (which shrink the run and send every output into the temporary folder).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import math
import re
import shlex
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from rewardopt.cli import RewardOptCLI
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
HEADER_KEYS = ("Goal:", "Launch:", "Hardware:")


# ---------------------------------------------------------------------------------------- the header


@dataclass(frozen=True)
class RecipeTest:
    """How a recipe is tested, as its ``# Test:`` line says."""

    action: str  # "fit" | "predict" | "skip"
    steps: int | None = None  # fit only
    slow: bool = False
    needs: str | None = None
    hint: str = ""
    overrides: tuple[str, ...] = ()
    reason: str = ""  # skip only


_RUN = re.compile(r"(?:(?P<slow>slow)\s+)?(?:fit\s+(?P<steps>\d+)|(?P<predict>predict))"
                  r"(?:\s+needs\s+(?P<needs>[^\s(]+)(?:\s+\((?P<hint>[^)]*)\))?)?(?P<overrides>(?:\s+--\S+=\S+)*)")
_SKIP = re.compile(r"skip\s+(?P<reason>\S.*)")


def header_lines(text: str) -> list[str]:
    """The recipe's leading comment block."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def parse_test_header(text: str) -> RecipeTest:
    """The ``RecipeTest`` of a recipe's text; ``ValueError`` (saying what is wrong) when the leading
    comment block has no ``# Test:`` line, several, or one that does not follow the grammar."""
    specs = [line.split(":", 1)[1].strip() for line in header_lines(text) if re.match(r"#\s*Test:", line)]
    if not specs:
        raise ValueError("no `# Test:` line in the recipe's header (see tests/test_recipes.py for the grammar)")
    if len(specs) > 1:
        raise ValueError(f"{len(specs)} `# Test:` lines in the recipe's header; one says how it is tested")
    spec = specs[0]
    if m := _SKIP.fullmatch(spec):
        return RecipeTest("skip", reason=m["reason"].strip())
    m = _RUN.fullmatch(spec)
    if m is None:
        raise ValueError(f"cannot read `# Test: {spec}`: expected `[slow] fit STEPS | [slow] predict` "
                         "[needs PATH [(HINT)]] [--key=value ...], or `skip REASON`")
    steps = int(m["steps"]) if m["steps"] else None
    if steps == 0:
        raise ValueError("`# Test: fit 0` trains nothing; give at least 1 step")
    return RecipeTest("fit" if steps else "predict", steps=steps, slow=bool(m["slow"]), needs=m["needs"],
                      hint=(m["hint"] or "").strip(), overrides=tuple(shlex.split(m["overrides"])))


def recipe_param(recipe: Path):
    """A pytest parameter for ``recipe``, behind ``slow`` when its header says so (an unreadable header
    is not an error here: the test itself fails on it)."""
    try:
        slow = parse_test_header(recipe.read_text()).slow
    except ValueError:
        slow = False
    return pytest.param(recipe, id=str(recipe.relative_to(ROOT / "recipes").with_suffix("")),
                        marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("text, expected", [
    ("# Goal: x\n# Test:     fit 2\nseed_everything: 0\n", RecipeTest("fit", steps=2)),
    ("# Test: slow fit 3 --data.init_args.n=200\n",
     RecipeTest("fit", steps=3, slow=True, overrides=("--data.init_args.n=200",))),
    ("# Test: predict\n", RecipeTest("predict")),
    ("# Test: slow predict needs runs/a.pt (python -m make_it)\n",
     RecipeTest("predict", slow=True, needs="runs/a.pt", hint="python -m make_it")),
    ("# Test: fit 2 needs runs/m.pt --a.b=1 --c=x\n",
     RecipeTest("fit", steps=2, needs="runs/m.pt", overrides=("--a.b=1", "--c=x"))),
    ("# Test: skip needs SD-1.5 from the hub\n", RecipeTest("skip", reason="needs SD-1.5 from the hub")),
])
def test_test_header_is_read(text, expected):
    assert parse_test_header(text) == expected


@pytest.mark.parametrize("text, message", [
    ("# Goal: x\nseed_everything: 0\n", "no `# Test:` line"),
    ("# Goal: x\nseed_everything: 0\n# Test: fit 2\n", "no `# Test:` line"),  # below the header: not read
    ("# Test: fit 2\n# Test: predict\n", "2 `# Test:` lines"),
    ("# Test: fit\n", "cannot read"),
    ("# Test: train 2\n", "cannot read"),
    ("# Test: predict 2\n", "cannot read"),
    ("# Test: fit 2 --trainer.max_steps 3\n", "cannot read"),  # overrides are --key=value
    ("# Test: skip\n", "cannot read"),
    ("# Test: fit 0\n", "trains nothing"),
])
def test_bad_test_header_is_an_error(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_test_header(text)


class ParseOnly(RewardOptCLI):
    """The CLI's parser and validation, without building the classes."""

    def instantiate_classes(self):
        pass


def parsed_config(recipe: Path, extra: list[str] | tuple[str, ...] = ()):
    return ParseOnly(args=["--config", str(recipe), *extra], run=False).config


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes").with_suffix("")))
def test_every_recipe_has_its_header_and_parses(recipe):
    text = recipe.read_text()
    header = header_lines(text)
    for key in HEADER_KEYS:
        assert any(key in line for line in header), f"{recipe.name} header lacks {key}"
    parse_test_header(text)
    assert parsed_config(recipe)["model"]["class_path"]


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    for m in ("best_of_n", "svdd", "dsearch", "smc", "free2guide"):
        assert f"{m}_jpeg_tiny" in names and f"{m}_classifier_tiny" in names
    assert "dps_classifier_tiny" in names
    assert sum("sd15" in n for n in names) >= 7
    for domain in ("images", "molecules", "dna", "tts", "qa_text"):
        assert (ROOT / "recipes" / domain / "pretrain_tiny.yaml").is_file()


# ---------------------------------------------------------------------------------------- the runner


@dataclass
class RecipeRun:
    """A finished recipe run: what a domain's ``check_fit`` / ``check_predict`` look at."""

    recipe: Path
    spec: RecipeTest
    cli: RewardOptCLI
    out: Path  # the module's output_dir
    root: Path  # trainer.default_root_dir (outputs of modules that have no output_dir)
    tmp: Path
    before: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable weights before the run
    judge_requests: int | None = None

    @property
    def summary(self) -> dict[str, Any] | None:
        path = self.out / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def config(self, key: str, default: Any = None) -> Any:
        """A value of the run's parsed config, by dotted key."""
        return self.cli.config[self.spec.action].get(key, default)


class RecordingCLI(RewardOptCLI):
    """The ``rewardopt`` CLI, keeping the trainable weights as they were once the classes are built."""

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self.weights_before = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def domain_checks(recipe: Path) -> ModuleType | None:
    """``tests/<domain>/recipe_checks.py`` of the recipe's domain, if the domain has one."""
    domain = recipe.relative_to(ROOT / "recipes").parts[0]
    if not (ROOT / "tests" / domain / "recipe_checks.py").is_file():
        return None
    return importlib.import_module(f"tests.{domain}.recipe_checks")


def _has(cfg, key: str) -> bool:
    try:
        return key in cfg
    except (KeyError, TypeError):
        return False


def _plain(value: Any) -> Any:
    """A parsed config value as plain JSON-able data."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _typed(cfg, arg: str) -> bool:
    """Whether the model class annotates ``arg``: only then can the CLI override its nested init args
    (an unannotated argument takes the recipe's value as given)."""
    module, name = cfg["model.class_path"].rsplit(".", 1)
    param = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get(arg)
    return param is not None and param.annotation is not inspect.Parameter.empty


def small_overrides(cfg, spec: RecipeTest, tmp: Path) -> list[str]:
    """CLI overrides that shrink the run (few sampler steps, small batches and held-out sets, one
    predict batch) and send every output (output folder, logs, checkpoints) into ``tmp``.
    Only keys the recipe's classes have are set."""
    o: dict[str, Any] = {"trainer.default_root_dir": tmp / "root", "trainer.enable_progress_bar": False,
                         "trainer.enable_model_summary": False}
    if _has(cfg, "model.init_args.output_dir"):
        o["model.init_args.output_dir"] = tmp / "out"
    logger = cfg.get("trainer.logger")
    if _has(cfg, "trainer.logger.init_args.save_dir") and logger not in (None, False, True):
        o["trainer.logger.init_args.save_dir"] = tmp / "logs"
    callbacks = _plain(cfg.get("trainer.callbacks"))
    if callbacks:
        for cb in callbacks:
            args = cb.get("init_args") or {}
            if "dirpath" in args:
                args["dirpath"] = str(tmp / "checkpoints")
            if cb["class_path"].endswith("SampleGrid") and "n" in args:
                args["n"] = min(args["n"], 2)
        o["trainer.callbacks"] = json.dumps(callbacks)
    # the sampler: 4 steps (12 tokens), the budget scaled with it (recipes give it as a multiple of the plain sampler)
    gen = "model.init_args.generator.init_args"
    for key, small in ((f"{gen}.num_steps", 4), (f"{gen}.max_new_tokens", 12)):
        if _has(cfg, key) and isinstance(cfg[key], int) and cfg[key] > small and _typed(cfg, "generator"):
            if _has(cfg, "model.init_args.budget") and isinstance(cfg["model.init_args.budget"], int):
                o["model.init_args.budget"] = cfg["model.init_args.budget"] * small // cfg[key]
            o[key] = small
            if key.endswith("num_steps") and _has(cfg, "model.init_args.value.init_args.num_steps"):
                o["model.init_args.value.init_args.num_steps"] = small  # a value net per sampler step
    if _has(cfg, "model.init_args.truncate") and isinstance(cfg["model.init_args.truncate"], int):
        o["model.init_args.truncate"] = min(cfg["model.init_args.truncate"], 2)
    if _has(cfg, "model.init_args.num_samples") and isinstance(cfg["model.init_args.num_samples"], int):
        o["model.init_args.num_samples"] = min(cfg["model.init_args.num_samples"], 2)
    # data: small batches, small held-out sets
    for key, small in (("batch_size", 2), ("val_batch_size", 2), ("num_eval", 4), ("max_val", 4), ("val_repeats", 1)):
        key = f"data.init_args.{key}"
        if _has(cfg, key) and isinstance(cfg[key], int) and cfg[key] > small:
            o[key] = small
    if spec.action == "fit":
        o["trainer.max_steps"] = spec.steps
        o["trainer.log_every_n_steps"] = 1
        if isinstance(cfg.get("trainer.val_check_interval"), int):
            o["trainer.val_check_interval"] = spec.steps  # the validation loop runs once, at the end
        if cfg.get("trainer.limit_val_batches") != 0:
            o["trainer.limit_val_batches"] = 1
    else:
        o["trainer.limit_predict_batches"] = 1
    return [f"--{k}={v}" for k, v in o.items()]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@contextmanager
def nothing_written_to(folders: list[Path]):
    """Fail if the block adds, changes or removes a file under ``folders`` (the shipped assets, the
    recipe's own run folder)."""
    before = {f: _files(f) for f in folders if f.is_dir()}
    existed = {f for f in folders if f.exists()}
    yield
    for f in folders:
        assert f.exists() == (f in existed), f"the run created {f}"
        if f in before:
            assert _files(f) == before[f], f"the run wrote into {f}"


def is_judge(spec: Any) -> bool:
    """Whether a reward spec's class is ``OpenAIJudge`` or a subclass (a domain's judge, e.g. the SR one)."""
    from rewardopt.rewards.judges import OpenAIJudge

    path = spec.get("class_path") if isinstance(spec, dict) else None
    if not path:
        return False
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    return isinstance(cls, type) and issubclass(cls, OpenAIJudge)


def judge_overrides(recipe: Path, base_url: str) -> list[str]:
    """CLI overrides pointing the recipe's HTTP judges at ``base_url``: the reward itself, or the judge
    members of an ensemble (its ``rewards`` given again as JSON with the URL replaced). Empty: no judge."""
    import yaml

    reward = yaml.safe_load(recipe.read_text())["model"]["init_args"].get("reward") or {}
    if is_judge(reward):
        return [f"--model.init_args.reward.init_args.base_url={base_url}"]
    members = (reward.get("init_args") or {}).get("rewards")
    if not isinstance(members, dict) or not any(is_judge(m) for m in members.values()):
        return []
    for m in members.values():
        if is_judge(m):
            m.setdefault("init_args", {})["base_url"] = base_url
    return ["--model.init_args.reward.init_args.rewards", json.dumps(members)]


@contextmanager
def judge_server(recipe: Path):
    """A local judge server when the recipe's reward is (or ensembles) an HTTP judge (the recipe's URL is
    localhost): the domain's own (``recipe_checks.judge_server()``, e.g. the video domain's trained
    grid judge) or the generic test server."""
    if not judge_overrides(recipe, "http://x"):
        yield None
        return
    from rewardopt.testing.judge_server import JudgeServer

    checks = domain_checks(recipe)
    make = getattr(checks, "judge_server", None) or JudgeServer
    with make() as server:
        yield server


def run_recipe(recipe: Path, spec: RecipeTest, tmp: Path) -> RecipeRun:
    """Run ``rewardopt <fit|predict> --config recipe`` in-process with the small overrides."""
    cfg = parsed_config(recipe)
    args = [spec.action, "--config", str(recipe), *small_overrides(cfg, spec, tmp)]
    watched = [*sorted((ROOT / "domains").glob("*/assets")), ROOT / cfg["trainer.default_root_dir"]]
    with judge_server(recipe) as server, nothing_written_to(watched):
        if server is not None:
            args += judge_overrides(recipe, server.base_url)
        cli = RecordingCLI(args=[*args, *spec.overrides], parser_kwargs={"exit_on_error": False})
    out = tmp / "out" if _has(cfg, "model.init_args.output_dir") else tmp / "root"
    return RecipeRun(recipe, spec, cli, out, tmp / "root", tmp, cli.weights_before,
                     server.requests if server is not None else None)


def assert_finite_numbers(data: Any, where: str) -> None:
    """Every number in a JSON document is finite (None is allowed: "not measured")."""
    if isinstance(data, dict):
        for k, v in data.items():
            assert_finite_numbers(v, f"{where}.{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            assert_finite_numbers(v, f"{where}[{i}]")
    elif isinstance(data, float):
        assert math.isfinite(data), f"{where} = {data}"


def json_reports(run: RecipeRun) -> dict[Path, Any]:
    reports = {p: json.loads(p.read_text()) for p in sorted(run.tmp.rglob("*.json"))}
    for path, data in reports.items():
        assert_finite_numbers(data, str(path.relative_to(run.tmp)))
    return reports


def check_fit(run: RecipeRun) -> None:
    """A fit ran its steps, changed trainable weights and wrote a sane report (and logged metrics)."""
    from rewardopt.methods.base import RewardFineTuning

    assert run.cli.trainer.global_step == run.spec.steps
    after = dict(run.cli.model.named_parameters())
    changed = [n for n, p in run.before.items() if not torch.equal(p, after[n].detach())]
    assert run.before and changed, "no trainable weight changed"
    reports = json_reports(run)
    assert reports, f"no JSON report under {run.tmp}"
    for path, data in reports.items():
        if isinstance(data, dict) and "steps" in data:
            assert data["steps"] == run.spec.steps, path
    if isinstance(run.cli.model, RewardFineTuning):
        s = run.summary
        assert s is not None, "a fine-tuning run writes summary.json"
        assert {"reward_before", "reward_after", "nfe", "reward_calls", "samples", "wall_time_s"} <= set(s)
        assert s["samples"] > 0 and s["nfe"] > 0 and s["reward_calls"] > 0
    if run.config("trainer.logger") not in (None, False):
        metrics = list((run.tmp / "logs").rglob("metrics.csv"))
        assert metrics and list(csv.DictReader(metrics[0].open())), "the logger wrote no metrics"


def check_predict(run: RecipeRun) -> None:
    """A predict run wrote a sane summary; a steering run also its rewards (one finite row per sample),
    its samples, and counted exactly the compute its expected cost promises."""
    from rewardopt.methods.steering import InferenceTimeSteering

    json_reports(run)
    s = run.summary
    assert s is not None, f"no summary.json in {run.out}"
    if not isinstance(run.cli.model, InferenceTimeSteering):
        return
    assert s["samples"] > 0
    exp = s["expected_cost_per_sample"]
    assert s["nfe"] == s["samples"] * exp["nfe"]
    assert s["reward_calls"] == s["samples"] * exp["reward_calls"]
    rows = list(csv.DictReader((run.out / "rewards.csv").open()))
    assert len(rows) == s["samples"]
    rewards = torch.tensor([float(r["reward"]) for r in rows])
    assert rewards.isfinite().all()
    assert s["reward_stats"]["median"] == pytest.approx(float(rewards.median()), abs=1e-4)
    assert any((run.out / "samples").iterdir()), "no samples written"
    if run.judge_requests is not None:
        assert run.judge_requests >= s["reward_calls"] // 2  # scored over HTTP (the cache answers repeats)


def validate(recipe: Path, tmp: Path, request) -> str:
    """Parse the recipe; build it with the domain's tiny stand-ins where it provides them. Says which."""
    cfg = parsed_config(recipe)
    checks = domain_checks(recipe)
    stand_ins = getattr(checks, "stand_ins", None)
    args = stand_ins(recipe, cfg, tmp, request) if stand_ins else None
    if args is None:
        return "parsed"
    cli = RewardOptCLI(args=["--config", str(recipe), *args], run=False)
    assert type(cli.model).__name__ in recipe.read_text()
    if hasattr(checks, "check_built"):
        checks.check_built(cli)
    return "built with tiny stand-ins"


@pytest.mark.parametrize("recipe", [recipe_param(p) for p in RECIPES])
def test_recipe_runs_as_its_header_says(recipe, tmp_path, monkeypatch, request):
    spec = parse_test_header(recipe.read_text())
    monkeypatch.chdir(ROOT)  # recipes name files relative to the repository root
    if spec.action == "skip":
        pytest.skip(f"{validate(recipe, tmp_path, request)}, not run: {spec.reason}")
    if spec.needs and not (ROOT / spec.needs).exists():
        hint = f" ({spec.hint})" if spec.hint else ""
        pytest.skip(f"{validate(recipe, tmp_path, request)}, not run: {spec.needs} is missing{hint}")
    run = run_recipe(recipe, spec, tmp_path)
    (check_fit if spec.action == "fit" else check_predict)(run)
    own = getattr(domain_checks(recipe), f"check_{spec.action}", None)
    if own is not None:
        own(run)


def test_runner_sends_every_output_into_the_temporary_folder(tmp_path):
    """The overrides move the recipe's run folder, logs and checkpoints (the shipped-assets guard is
    the other half: ``nothing_written_to``)."""
    recipe = ROOT / "recipes/images/draft_k_tiny.yaml"
    args = small_overrides(parsed_config(recipe), RecipeTest("fit", steps=2), tmp_path)
    cfg = parsed_config(recipe, args)
    assert cfg["trainer.default_root_dir"] == str(tmp_path / "root")
    assert cfg["model.init_args.output_dir"] == str(tmp_path / "out")
    assert cfg["trainer.logger.init_args.save_dir"] == str(tmp_path / "logs")
    dirpaths = [c.init_args.dirpath for c in cfg["trainer.callbacks"] if "dirpath" in c.get("init_args", {})]
    assert dirpaths == [str(tmp_path / "checkpoints")]
    assert cfg["trainer.max_steps"] == 2 and cfg["model.init_args.generator.init_args.num_steps"] == 4


def test_shipped_assets_guard_catches_a_write(tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    (folder / "w.pt").write_bytes(b"0")
    with pytest.raises(AssertionError, match="wrote into"):
        with nothing_written_to([folder]):
            (folder / "w.pt").write_bytes(b"01")
    with pytest.raises(AssertionError, match="created"):
        with nothing_written_to([tmp_path / "runs"]):
            (tmp_path / "runs").mkdir()


# ---------------------------------------------------------------------------------------- other checks


def cli(args):
    """Build the recipe's trainer, model and data in-process, as `rewardopt fit` would."""
    return RewardOptCLI(args=args, run=False)


def run_two_steps(recipe, tmp_path, extra=()):
    args = ["--config", str(recipe), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "run",
            "--model.init_args.output_dir", str(tmp_path / "run"), "--trainer.callbacks", "[]",
            "--data.init_args.val_repeats", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.log_every_n_steps", "1", *extra]
    c = cli(args)
    before = [p.detach().clone() for p in c.model.generator.trainable_parameters()]
    c.trainer.fit(c.model, datamodule=c.datamodule)
    return c, before


def test_black_box_reward_with_draft_fails_at_config_time(tmp_path):
    recipe = ROOT / "recipes/images/draft_lv_tiny.yaml"
    # jsonargparse reports the TypeError raised while building the model
    message = "DRaFT needs a differentiable reward; JpegCompressibilityReward is black-box. Use DDPO"
    with pytest.raises((TypeError, ValueError), match=message):
        cli(["--config", str(recipe), "--model.init_args.reward", "domains.images.rewards.JpegCompressibilityReward"])


@pytest.mark.slow  # a killed subprocess and its resume (~100 s); qa_text and test_ddpo keep exact resume in default
def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    recipe = ROOT / "recipes/images/draft_k_tiny.yaml"
    ckpt = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.save_last=true",
            "--trainer.callbacks.every_n_train_steps=1"]
    c, _ = run_two_steps(recipe, tmp_path, ckpt)
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    lora_at_2 = [p.detach().clone() for p in c.model.generator.trainable_parameters()]
    # a fresh process-like start: new objects, resume from last.ckpt to 4 steps
    c2 = cli(["--config", str(recipe), "--trainer.max_steps", "4", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "run",
              "--model.init_args.output_dir", str(tmp_path / "run"), "--trainer.callbacks", "[]",
              "--data.init_args.val_repeats", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.log_every_n_steps", "1", *ckpt])
    c2.trainer.fit(c2.model, datamodule=c2.datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    second = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert second["steps"] == 4
    assert second["samples"] == 2 * first["samples"], "compute counters continue from the checkpoint"
    assert second["reward_before"] == first["reward_before"], "the pre-training evaluation is not redone"
    assert second["wall_time_s"] > first["wall_time_s"]
    ck = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all("lora_" in k for k in ck["state_dict"]), "checkpoints hold only the trainable weights"
    # the resumed run started from the step-2 adapter, not from scratch: a 4-step uninterrupted run agrees
    straight, _ = run_two_steps(recipe, tmp_path / "straight", ["--trainer.max_steps", "4"])
    for a, b in zip(c2.model.generator.trainable_parameters(), straight.model.generator.trainable_parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    train_steps = [int(r["step"]) for r in rows if r.get("train/reward")]
    assert train_steps == sorted(set(train_steps)) == [0, 1, 2, 3], "both segments' metrics, none twice"
    assert not torch.allclose(lora_at_2[0], c2.model.generator.trainable_parameters()[0])


@pytest.mark.slow  # 2 spawned processes (~45 s); test_ddpo's DDP test stays in the default suite
def test_ddp_two_processes_keep_lora_in_sync(tmp_path):
    recipe = ROOT / "recipes/images/draft_k_tiny.yaml"
    cmd = [sys.executable, "-m", "rewardopt.cli", "fit", "--config", str(recipe), "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.max_steps", "3", "--trainer.callbacks", "[]",
           "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
           "--model.init_args.output_dir", str(tmp_path / "out"), "--data.init_args.val_repeats", "1",
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["world_size"] == 2
    assert len(s["param_checksums"]) == 2 and s["ranks_in_sync"], s["param_checksums"]
    per_rank = s["last_train_reward_per_rank"]
    assert per_rank[0] != per_rank[1], "ranks see different prompts and noise"
    assert s["last_train_reward_reduced"] == pytest.approx(sum(per_rank) / 2, rel=1e-5)


@pytest.mark.slow  # 2 spawned processes (~30 s)
def test_ddp_predict_shards_prompts_and_gathers_one_summary(tmp_path):
    cmd = [sys.executable, "-m", "rewardopt.cli", "predict", "--config",
           str(ROOT / "recipes/images/steer/best_of_n_classifier_tiny.yaml"), "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--model.init_args.generator.init_args.num_steps", "2",
           "--model.init_args.budget", "4", "--model.init_args.num_samples", "2",
           "--model.init_args.output_dir", str(tmp_path), "--data.init_args.val_batch_size", "3",
           "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["samples"] == 24
    assert s["nfe"] == 24 * s["expected_cost_per_sample"]["nfe"]
    rows = list(csv.DictReader((tmp_path / "rewards.csv").open()))
    assert {r["rank"] for r in rows} == {"0", "1"}
    from domains.images.shapes import split_prompts

    conditions = sorted({r["condition"] for r in rows})
    assert conditions == sorted(split_prompts(0)[1]), "every held-out prompt, once per chain"
    assert len(list((tmp_path / "samples").glob("*.png"))) == 24


def test_svdd_mc_fit_then_steer(tmp_path):
    """The value network the fit recipe trains is the one the steering recipe loads and calls."""
    T = 3
    fit = ["--config", str(ROOT / "recipes/images/steer/svdd_mc_value_fit_tiny.yaml"), "--trainer.max_steps", "3",
           "--model.init_args.generator.init_args.num_steps", str(T),
           "--model.init_args.value.init_args.num_steps", str(T),
           "--trainer.default_root_dir", str(tmp_path / "fit"), "--data.init_args.batch_size", "4",
           "--trainer.enable_progress_bar", "false"]
    c = RewardOptCLI(args=fit, run=False)
    c.trainer.fit(c.model, datamodule=c.datamodule)
    value_pt = tmp_path / "fit" / "value.pt"
    assert value_pt.is_file()
    state = torch.load(value_pt, weights_only=True)
    assert float(state["target_std"]) != 1.0, "targets were standardised by the first batch"
    args = ["--config", str(ROOT / "recipes/images/steer/svdd_mc_classifier_tiny.yaml"),
            "--model.init_args.generator.init_args.num_steps", str(T),
            "--model.init_args.value.init_args.num_steps", str(T),
            "--model.init_args.value.init_args.checkpoint", str(value_pt), "--model.init_args.num_samples", "2",
            "--model.init_args.num_children", "3", "--model.init_args.output_dir", str(tmp_path / "pred"),
            "--trainer.limit_predict_batches", "1", "--data.init_args.val_batch_size", "2",
            "--trainer.enable_progress_bar", "false"]
    c = RewardOptCLI(args=args, run=False)
    assert torch.equal(c.model.value_net.target_std, state["target_std"]), "the trained weights were loaded"
    c.trainer.predict(c.model, datamodule=c.datamodule)
    s = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert s["nfe"] == T * 4 and s["reward_calls"] == 0 and s["value_calls"] == 3 * T * 4


def test_missing_value_checkpoint_is_a_clear_error(tmp_path):
    args = ["--config", str(ROOT / "recipes/images/steer/svdd_mc_classifier_tiny.yaml"),
            "--model.init_args.value.init_args.checkpoint", str(tmp_path / "nope.pt")]
    with pytest.raises((FileNotFoundError, ValueError), match="value checkpoint"):
        RewardOptCLI(args=args, run=False)
