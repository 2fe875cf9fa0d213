"""The install is what makes `rewardopt` and `domains` importable: no module edits `sys.path`, both
import from any directory, and a built wheel ships every domain's assets."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT

SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.(insert|append|extend)\b|\[|[+]?=)")


def test_no_module_edits_sys_path():
    files = [*(ROOT / "rewardopt").rglob("*.py"), *(ROOT / "domains").rglob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / "tests" / "conftest.py"]
    edits = [f"{f.relative_to(ROOT)}:{i}" for f in files
             for i, line in enumerate(f.read_text().splitlines(), 1) if SYS_PATH_EDIT.search(line)]
    assert not edits, f"sys.path edited (the editable install, `pip install -e .`, provides the imports): {edits}"


def test_packages_import_from_any_directory_as_this_checkout(tmp_path):
    """`-I` ignores PYTHONPATH and the current directory: only the install can resolve them."""
    code = "import domains.images.tiny, rewardopt.cli, domains, rewardopt; print(domains.__file__, rewardopt.__file__)"
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(ROOT / "domains" / "__init__.py"), str(ROOT / "rewardopt" / "__init__.py")], \
        "the environment's install points at another checkout: re-run `pip install -e .` here"


def test_wheel_ships_every_domain_asset_and_nothing_else(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("rewardopt", "domains"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rewardopt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(src).as_posix() for pkg in ("rewardopt", "domains") for p in (src / pkg).rglob("*")
                if p.is_file()}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (a new domain's assets need a package-data line): {missing[:5]}"
    assert {n.split("/")[0] for n in names} == {"rewardopt", "domains", wheel.name.split("-py")[0] + ".dist-info"}
