"""One writer for every benchmark's result page: ``benchmarks/results/<name>.md``.

Each page records what a reader needs to trust or re-run a table: the date, the commit (and whether
the tree had uncommitted changes), the machine, the exact command and the seeds, then the tables
the benchmark printed. The README links every page; re-running a benchmark overwrites its page.

Usage inside a benchmark::

    # a sibling module: `python benchmarks/x.py` runs with benchmarks/ first on sys.path
    from results_md import write_result
    write_result("inference_time_jpeg", tables=[md_table, ...], seeds=[0, 1, 2], notes="...")
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {cores} CPU cores, {dev}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def provenance(seeds: Sequence[int] | None = None, command: str | None = None) -> dict[str, str]:
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    cmd = command or "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "machine": machine(),
        "command": cmd,
        "seeds": ", ".join(str(s) for s in seeds) if seeds else "none (deterministic)",
    }


def write_result(name: str, tables: Sequence[str], seeds: Sequence[int] | None = None, title: str | None = None,
                 notes: str = "", command: str | None = None, folder: Path | None = None) -> Path:
    """Write ``<folder or benchmarks/results>/<name>.md`` and return its path.

    ``tables``: markdown blocks (tables or short paragraphs) in the order printed."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    p = provenance(seeds, command)
    lines = [f"# {title or name}", ""]
    lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in p.items()]
    lines.append("")
    if notes:
        lines += [notes.strip(), ""]
    for t in tables:
        lines += [t.rstrip(), ""]
    out = (folder or RESULTS) / f"{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"[benchmark] results written to {out}")
    return out


class record_stdout:
    """Everything printed to stdout inside the block is echoed and also written as the result page::

        with record_stdout("qa", seeds=args.seeds, title="..."):
            print_tables(...)
    """

    def __init__(self, name: str, seeds: Sequence[int] | None = None, title: str | None = None, notes: str = "",
                 folder: Path | None = None) -> None:
        self.kw = dict(name=name, seeds=seeds, title=title, notes=notes, folder=folder)

    def __enter__(self) -> "record_stdout":
        import io

        self._buf, self._stdout = io.StringIO(), sys.stdout
        outer = self

        class _Tee(io.TextIOBase):
            def write(self, s: str) -> int:
                outer._stdout.write(s)
                return outer._buf.write(s)

            def flush(self) -> None:
                outer._stdout.flush()

        sys.stdout = _Tee()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        sys.stdout = self._stdout
        if exc_type is None:
            self.path = write_result(tables=[self._buf.getvalue()], **self.kw)
