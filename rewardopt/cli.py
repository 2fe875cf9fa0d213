"""The ``rewardopt`` command: LightningCLI over any method (model) and data module.

    rewardopt fit --config recipes/images/draft_lv_tiny.yaml
    rewardopt predict --config recipes/images/...yaml
    rewardopt fit --config recipes/images/draft_lv_tiny.yaml --trainer.devices 2 --trainer.strategy ddp

Recipes name their classes with ``class_path``; that is the registry — there is no other.

A mistake in the config (a misspelled key, a bad value, a missing model folder, a method paired with
a reward it cannot use) is reported in at most three lines — which key, what is wrong, the fix — and
the command exits with code 2. ``--debug`` (or ``REWARDOPT_DEBUG=1``) prints the full traceback too.
The explanation is found by walking the exception chain (``__cause__`` / ``__context__``, which is
how jsonargparse nests its errors) to the first exception raised outside the parsing machinery.
Output printed while the config is parsed and its classes are built (seed, weight-loading bars) is
held back while that lasts — up to ``REWARDOPT_HOLD_OUTPUT_S`` seconds (default 30; after that it
streams, so a long download shows its progress) — and dropped if the config turns out to be wrong.
Errors raised once the run has started keep their normal traceback.
"""

from __future__ import annotations

import argparse
import builtins
import difflib
import os
import re
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI

CONFIG_ERROR_EXIT_CODE = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "REWARDOPT_DEBUG"
HOLD_ENV = "REWARDOPT_HOLD_OUTPUT_S"
_CONFIG_STAGE = "_rewardopt_config_stage"  # attribute set on exceptions raised before the run starts


class RewardOptCLI(LightningCLI):
    """LightningCLI with rewardopt's defaults: any LightningModule / DataModule via class_path,
    seed 0 unless the recipe says otherwise, and the resolved config saved into the run folder.

    Exceptions raised while parsing or instantiating propagate unchanged (tests match on them) but
    are marked as config errors, so that ``main`` can explain them briefly. ``on_configured`` is
    called once every class is built, before the subcommand runs."""

    def __init__(self, *args, on_configured: Callable[[], None] | None = None, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        self._on_configured = on_configured
        self._configuring = True
        try:
            super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)
        except Exception as e:
            if self._configuring:
                _mark_config_error(e, getattr(self, "config", None), getattr(self, "subcommand", None))
            raise

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self._configuring = False
        if self._on_configured is not None:
            self._on_configured()


def _mark_config_error(e: BaseException, config, subcommand: str | None) -> None:
    try:
        setattr(e, _CONFIG_STAGE, (config, subcommand))
    except (AttributeError, TypeError):  # an exception type that refuses attributes: explained without the config
        pass


# ----------------------------------------------------------------------------- explaining a config error
def _machinery_dirs() -> tuple[str, ...]:
    """Files whose frames are parsing plumbing, never the root cause of a config error."""
    import jsonargparse
    import lightning.pytorch.cli as lcli

    return (str(Path(jsonargparse.__file__).parent), argparse.__file__, lcli.__file__, __file__)


def exception_chain(e: BaseException) -> list[BaseException]:
    """``e`` and what caused it, outermost first (explicit ``__cause__``, else unsuppressed ``__context__``)."""
    chain: list[BaseException] = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return chain


def _raised_in(e: BaseException, dirs: tuple[str, ...]) -> bool:
    tb = e.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(dirs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else ""


# jsonargparse nests one error per config level, each opening with one of these two lines
_KEY_LINE = re.compile(r'Parser key "([^"]+)":$')
_CLASS_LINE = re.compile(r"Problem with given class_path '([^']+)':$")


def _nested_location(chain: list[BaseException]) -> tuple[str | None, str | None]:
    """(config key, class_path) of the innermost config level jsonargparse's nested errors name."""
    keys: list[str] = []
    class_path = None
    previous = None
    for e in chain:
        line = _first_line(e)
        if line == previous:  # the same level re-raised (ArgumentError from TypeError ...)
            continue
        previous = line
        if m := _KEY_LINE.match(line):
            keys.append(f"init_args.{m.group(1)}" if class_path is not None else m.group(1))
        elif m := _CLASS_LINE.match(line):
            class_path = m.group(1)
    return (".".join(keys) or None), class_path


def _constructing_class(e: BaseException, dirs: tuple[str, ...]) -> type | None:
    """The class whose ``__init__`` raised ``e``: the outermost frame outside the machinery, if an ``__init__``."""
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if not frame.f_code.co_filename.startswith(dirs):
            if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
                return type(frame.f_locals["self"])
            return None
        tb = tb.tb_next
    return None


def _class_paths(tree, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(key, class_path) for every component of a config tree (nested dicts / lists)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("class_path"), str):
            yield prefix, tree["class_path"]
        for k, v in tree.items():
            yield from _class_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _class_paths(v, f"{prefix}[{i}]")


def _components(config, subcommand: str | None) -> list[tuple[str, str]]:
    """(key, class_path) of every component of a parsed config (that of ``subcommand`` if given)."""
    try:
        tree = config.as_dict()
    except AttributeError:
        return []
    if subcommand and isinstance(tree.get(subcommand), dict):
        tree = tree[subcommand]
    return list(_class_paths(tree))


def _locate_component(cls: type, message: str, components: list[tuple[str, str]]) -> tuple[str | None, str]:
    """The config key of the component of class ``cls`` whose ``__init__`` failed — or of the one
    component inside it that ``message`` names by class (DRaFT refusing its reward points at the reward)."""
    names = {f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__}
    key = next((k for k, path in components if path in names), None)
    if key is None:
        return None, f"{cls.__module__}.{cls.__qualname__}"
    named = [(k, path) for k, path in components if k.startswith(key + ".")
             and re.search(rf"\b{re.escape(path.rsplit('.', 1)[-1])}\b", message)]
    return named[0] if len(named) == 1 else (key, f"{cls.__module__}.{cls.__qualname__}")


def _accepted_options(class_path: str) -> list[str]:
    """The init arguments jsonargparse accepts for ``class_path`` (``**kwargs`` forwarding resolved)."""
    from jsonargparse import ArgumentParser
    from jsonargparse._util import import_object

    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(import_object(class_path), fail_untyped=False)
    except Exception:
        return []
    names = [a.dest.split(".")[0] for a in parser._actions if a.dest not in ("help", "config")]
    return list(dict.fromkeys(names))


def _suggest_option(message: str, class_path: str | None) -> str | None:
    """'did you mean ...' for a quoted name in ``message`` that ``class_path`` does not accept."""
    if class_path is None:
        return None
    options = _accepted_options(class_path)
    for name in re.findall(r"'([A-Za-z_][\w]*)'", message):
        if options and name not in options and not hasattr(builtins, name):  # not <class 'int'>'s int
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
            short = class_path.rsplit(".", 1)[-1]
            if close:
                return f"did you mean '{close[0]}'?"
            return f"{short} takes: {', '.join(options)}"
    return None


def explain_config_error(e: BaseException, debug: bool = False) -> list[str]:
    """At most three lines for a config error: where (key and class), what is wrong, the fix (and,
    unless ``debug``, how to see the traceback)."""
    config, subcommand = getattr(e, _CONFIG_STAGE, (None, None))
    dirs = _machinery_dirs()
    chain = exception_chain(e)
    # the root cause: the first exception raised by user code (outermost, so a message that wraps a
    # library error wins), else the innermost of jsonargparse's nested errors
    root = next((c for c in chain if not _raised_in(c, dirs)), chain[-1])
    key, class_path = _nested_location(chain[: chain.index(root) + 1])
    what = " ".join(str(root).split()) or type(root).__name__
    if class_path is None and (cls := _constructing_class(root, dirs)) is not None:
        found, class_path = _locate_component(cls, what, _components(config, subcommand))
        key = found or key
    if not _raised_in(root, dirs) and not isinstance(root, (ValueError, TypeError)):
        what = f"{type(root).__name__}: {what}"
    where = key or "config"
    if class_path is not None:
        where += f" ({class_path.rsplit('.', 1)[-1]})"
    lines = [f"rewardopt: error in {where}: {what}"]
    fix = _suggest_option(what, class_path) if _raised_in(root, dirs) else None
    if fix is None and isinstance(root, argparse.ArgumentError) and key is None:
        fix = "see `rewardopt --help` and `rewardopt fit --help` for the accepted options"
    if fix:
        lines.append(f"rewardopt: fix: {fix}")
    if not debug:
        lines.append(f"rewardopt: rerun with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the full traceback")
    return lines


# ----------------------------------------------------------------------------- holding back config-time output
class HeldStderr:
    """Redirect file descriptor 2 to a temporary file until ``release``; after ``hold_s`` seconds
    give it back (replaying what was held) so that long loads still show progress."""

    def __init__(self, hold_s: float) -> None:
        self._lock = threading.Lock()
        self._saved: int | None = None
        try:
            sys.stderr.flush()
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): hold nothing
            self._saved = None
            return
        self._timer = threading.Timer(hold_s, self.release, kwargs={"replay": True, "flush": False})
        self._timer.daemon = True
        self._timer.start()

    def release(self, replay: bool, flush: bool = True) -> None:
        with self._lock:
            if self._saved is None:
                return
            if flush:
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = None
            if threading.current_thread() is not self._timer:
                self._timer.cancel()
            if replay:
                self._tmp.seek(0)
                data = self._tmp.read()
                while data:
                    data = data[os.write(2, data):]
            self._tmp.close()


def _debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def main(args: list[str] | None = None) -> None:
    # The repository root holds the `domains` package; make it importable when run from a clone.
    cwd = os.getcwd()
    if os.path.isdir(os.path.join(cwd, "domains")) and cwd not in sys.path:
        sys.path.insert(0, cwd)
    argv = sys.argv[1:] if args is None else list(args)
    debug = _debug_requested(argv)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = argv
    held = None if debug else HeldStderr(float(os.environ.get(HOLD_ENV, "30")))
    try:
        RewardOptCLI(args=None if args is None else argv, parser_kwargs={"exit_on_error": False},
                     on_configured=lambda: held and held.release(replay=True))
    except Exception as e:
        if not hasattr(e, _CONFIG_STAGE):
            if held:
                held.release(replay=True)
            raise
        if held:
            held.release(replay=False)
        if debug:
            traceback.print_exception(e)
        sys.stderr.write("".join(f"{line}\n" for line in explain_config_error(e, debug)))
        sys.stderr.flush()
        sys.exit(CONFIG_ERROR_EXIT_CODE)
    finally:
        if held:
            held.release(replay=True)


if __name__ == "__main__":
    main()
