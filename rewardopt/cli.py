"""The ``rewardopt`` command: LightningCLI over any method (model) and data module.

    rewardopt fit --config recipes/images/draft_lv_tiny.yaml
    rewardopt predict --config recipes/images/...yaml
    rewardopt fit --config recipes/images/draft_lv_tiny.yaml --trainer.devices 2 --trainer.strategy ddp

Recipes name their classes with ``class_path``; that is the registry — there is no other.

A mistake in the config (a misspelled key, a bad value, a missing model folder, a method paired with
a reward it cannot use) is reported in at most three lines — which key, what is wrong, the fix — and
the command exits with code 2. ``--debug`` (or ``REWARDOPT_DEBUG=1``) prints the full traceback too.
The explanation is found by walking the exception chain (``__cause__`` / ``__context__``, which is
how jsonargparse nests its errors) to the root cause: the first exception raised outside the parsing
machinery. It is a config error (``is_config_error``) when it was raised by the parser itself (jsonargparse,
argparse, LightningCLI: unknown keys, wrong types, unknown class paths), by the YAML reader, or — while
the config's classes are built — is a ``ValueError``, ``TypeError``, ``FileNotFoundError`` or
``KeyError`` (``CONFIG_ERROR_TYPES``: how rewardopt's classes refuse a bad argument). Anything else
raised before the run starts (a ``RuntimeError`` such as out-of-memory, an ``OSError`` from a
download, a bug) keeps its normal traceback and exit code 1, as do errors once the run has started.
Output printed while the config is parsed and its classes are built (seed, weight-loading bars) is
held back while that lasts — up to ``REWARDOPT_HOLD_OUTPUT_S`` seconds (default 30; after that it
streams, so a long download shows its progress) — and dropped only if the config turns out to be
wrong; otherwise it is shown, before the traceback of a real error. A watchdog process shows it too if
the command dies while holding it (killed, out of memory, a crash in native code).
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import difflib
import inspect
import os
import re
import subprocess
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
# what user classes raise for a bad argument while the config is built (anything else: a real error)
CONFIG_ERROR_TYPES = (ValueError, TypeError, FileNotFoundError, KeyError)


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


def _root_cause(chain: list[BaseException], dirs: tuple[str, ...]) -> BaseException:
    """The first exception raised outside the machinery (outermost, so a message that wraps a library
    error wins), else the innermost of jsonargparse's nested errors."""
    return next((c for c in chain if not _raised_in(c, dirs)), chain[-1])


def is_config_error(e: BaseException) -> bool:
    """Whether ``e`` (raised before the run started) is a mistake in the config, explained briefly with
    exit code 2: its root cause was raised by the parser (or the YAML reader), or is one of
    ``CONFIG_ERROR_TYPES`` raised while the config's classes were built. Not: a RuntimeError (out of
    memory ...), an OSError from a download, any other exception — they keep their traceback."""
    if not hasattr(e, _CONFIG_STAGE):
        return False
    dirs = _machinery_dirs()
    root = _root_cause(exception_chain(e), dirs)
    if _raised_in(root, dirs) or type(root).__module__.split(".")[0] == "yaml":
        return True
    return isinstance(root, CONFIG_ERROR_TYPES)


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


def _frame_arguments(frame) -> dict:
    """The arguments of a frame's function as they stand (``**kwargs`` spread)."""
    code, local = frame.f_code, frame.f_locals
    n = code.co_argcount + code.co_kwonlyargcount
    args = {name: local[name] for name in code.co_varnames[:n] if name in local and name != "self"}
    if code.co_flags & inspect.CO_VARKEYWORDS:
        varkw = code.co_varnames[n + bool(code.co_flags & inspect.CO_VARARGS)]
        if isinstance(local.get(varkw), dict):
            args = {**local[varkw], **args}
    return args


def _constructing_instance(e: BaseException, dirs: tuple[str, ...]) -> tuple[type, dict] | None:
    """(class, init arguments) of the object whose ``__init__`` raised ``e``: the first frame outside the
    machinery that the machinery called, if an ``__init__`` (frames above the machinery — the command's
    entry point, a caller — are skipped); its arguments gathered from every frame on that object
    (``super().__init__`` calls: the argument ``**kwargs`` forwarded is named there)."""
    tb, entered, obj, args = e.__traceback__, False, None, {}
    while tb is not None:
        frame = tb.tb_frame
        inside = frame.f_code.co_filename.startswith(dirs)
        if obj is None and not inside and entered:
            if frame.f_code.co_name != "__init__" or "self" not in frame.f_locals:
                return None
            obj = frame.f_locals["self"]
        if obj is not None and not inside and frame.f_locals.get("self") is obj:
            args = {**_frame_arguments(frame), **args}  # outer frames first: what the config passed
        entered = entered or inside
        tb = tb.tb_next
    return None if obj is None else (type(obj), args)


def _class_paths(tree, prefix: str = "") -> Iterator[tuple[str, str, dict]]:
    """(key, class_path, init_args) for every component of a config tree (nested dicts / lists)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("class_path"), str):
            init_args = tree.get("init_args")
            yield prefix, tree["class_path"], init_args if isinstance(init_args, dict) else {}
        for k, v in tree.items():
            yield from _class_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _class_paths(v, f"{prefix}[{i}]")


def _components(config, subcommand: str | None) -> list[tuple[str, str, dict]]:
    """(key, class_path, init_args) of every component of a parsed config (that of ``subcommand`` if given)."""
    try:
        tree = config.as_dict()
    except AttributeError:
        return []
    if subcommand and isinstance(tree.get(subcommand), dict):
        tree = tree[subcommand]
    return list(_class_paths(tree))


def _same_value(configured, actual) -> bool | None:
    """Whether a config value and an argument agree (None: not comparable, e.g. a nested component)."""
    if isinstance(configured, dict):
        return None
    if isinstance(actual, os.PathLike):
        actual = os.fspath(actual)
    if isinstance(configured, (list, tuple)) and isinstance(actual, (list, tuple)):
        configured, actual = list(configured), list(actual)
    if not (_plain(actual) or isinstance(actual, list) and all(map(_plain, actual))):
        return None
    try:
        return bool(configured == actual)
    except Exception:
        return None


def _plain(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _mismatches(init_args: dict, args: dict) -> int:
    return sum(_same_value(v, args[k]) is False for k, v in init_args.items() if k in args)


def _locate_component(cls: type, args: dict, message: str,
                      components: list[tuple[str, str, dict]]) -> tuple[str | None, str]:
    """The config key of the component of class ``cls`` whose ``__init__`` failed (with arguments
    ``args``: among several of that class, the one whose init_args they match; "a or b" when they match
    several equally) — or of the one component inside it that ``message`` names by class (DRaFT refusing
    its reward points at the reward)."""
    names = {f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__}
    full = f"{cls.__module__}.{cls.__qualname__}"
    candidates = [(k, _mismatches(init_args, args)) for k, path, init_args in components if path in names]
    if not candidates:
        return None, full
    best = min(n for _, n in candidates)
    keys = [k for k, n in candidates if n == best]
    if len(keys) > 1:
        return f"{', '.join(keys[:-1])} or {keys[-1]}", full
    key = keys[0]
    named = [(k, path) for k, path, _ in components if k.startswith(key + ".")
             and re.search(rf"\b{re.escape(path.rsplit('.', 1)[-1])}\b", message)]
    return named[0] if len(named) == 1 else (key, full)


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
    root = _root_cause(chain, dirs)
    key, class_path = _nested_location(chain[: chain.index(root) + 1])
    what = " ".join(str(root).split()) or type(root).__name__
    if class_path is None and (built := _constructing_instance(root, dirs)) is not None:
        found, class_path = _locate_component(*built, what, _components(config, subcommand))
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
# Run by HeldStderr in a separate interpreter. It blocks on its stdin (a pipe from the command): a byte
# means the command released the hold itself; end-of-file without one means the command died while
# holding (killed, out of memory, a native crash), and the watchdog copies what was held to stderr.
_WATCHDOG = """import os, sys
held = int(sys.argv[1])
if not os.read(0, 1):
    offset = 0
    while chunk := os.pread(held, 1 << 16, offset):
        offset += len(chunk)
        while chunk:
            chunk = chunk[os.write(1, chunk):]
"""


class HeldStderr:
    """Redirect file descriptor 2 to a temporary file until ``release``; after ``hold_s`` seconds
    give it back (replaying what was held) so that long loads still show progress. What is held is
    never lost: ``release(replay=True)`` runs at exit if nobody released it, and a watchdog process
    (``_WATCHDOG``) replays it if the process dies without exiting (SIGKILL, a segfault)."""

    def __init__(self, hold_s: float) -> None:
        self._lock = threading.Lock()
        self._saved: int | None = None
        self._watchdog: subprocess.Popen | None = None
        try:
            sys.stderr.flush()
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): hold nothing
            self._saved = None
            return
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(self._tmp.fileno())], stdin=subprocess.PIPE,
                stdout=self._saved, stderr=subprocess.DEVNULL, pass_fds=(self._tmp.fileno(),))
        except (OSError, ValueError, subprocess.SubprocessError):  # no watchdog: do not hold (nothing is lost)
            os.close(self._saved)
            self._saved = None
            self._tmp.close()
            return
        os.dup2(self._tmp.fileno(), 2)
        atexit.register(self._at_exit)
        self._timer = threading.Timer(hold_s, self.release, kwargs={"replay": True, "flush": False})
        self._timer.daemon = True
        self._timer.start()

    def _at_exit(self) -> None:
        self.release(replay=True)

    def release(self, replay: bool, flush: bool = True) -> None:
        """Give fd 2 back; show what was held (``replay``) or drop it (a config error, explained briefly)."""
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
            atexit.unregister(self._at_exit)
            if replay:
                self._tmp.seek(0)
                data = self._tmp.read()
                while data:
                    data = data[os.write(2, data):]
            self._dismiss_watchdog()  # after the replay: if this process dies in between, the watchdog shows it
            self._tmp.close()

    def _dismiss_watchdog(self) -> None:
        try:
            self._watchdog.stdin.write(b"x")
            self._watchdog.stdin.close()
            self._watchdog.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):  # it died, or is slow to: not our output
            pass


def _note_root_cause(e: BaseException) -> None:
    """Name the root cause under a real error's traceback when jsonargparse wrapped it (its last line
    would otherwise be a union-validation message that reads like a config mistake)."""
    chain = exception_chain(e)
    root = _root_cause(chain, _machinery_dirs())
    if root is not e and hasattr(e, "add_note"):  # Python >= 3.11
        e.add_note(f"rewardopt: not a config error; the cause is {type(root).__name__}: {_first_line(root)} "
                   "(its traceback is above)")


def _debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["serve-ratings"]:  # the rating web page (rewardopt.feedback.server), not a LightningCLI run
        from rewardopt.feedback.server import serve_main

        return serve_main(argv[1:])
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
        if not is_config_error(e):  # a real error: what was held, then the normal traceback (exit code 1)
            if held:
                held.release(replay=True)
            _note_root_cause(e)
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
