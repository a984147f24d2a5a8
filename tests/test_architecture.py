"""ARCHITECTURE.md is kept true to the code: its module map names every module of the package, and
every module or folder it names exists. (The file is the living design; a stale map misleads more
than none.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgetransfer"


def _module_map() -> list[tuple[list[str], str]]:
    """(the backticked names of the first cell, the whole row) for each row of the module map table."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [(re.findall(r"`([^`]+)`", row.split(" | ", 1)[0]), row) for row in rows]


def _named_modules() -> set[str]:
    named = set()
    for names, row in _module_map():
        for name in names:
            if name.endswith(".py"):
                named.add(name)
            elif name.endswith("/"):  # a folder row names its modules by file name in the description
                named.update(name + m for m in re.findall(r"`(\w+\.py)`", row))
    return named


def test_every_module_of_the_package_is_on_the_map():
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    empty = {m for m in modules if m.endswith("__init__.py") and not (PACKAGE / m).read_text().strip()}
    missing = sorted(modules - empty - _named_modules())
    assert not missing, f"ARCHITECTURE.md's module map does not name: {missing}"


def test_every_name_on_the_map_exists():
    for names, _ in _module_map():
        for name in names:
            if name.endswith((".py", "/")):
                where = ROOT / name.rstrip("/") if (ROOT / name.rstrip("/")).exists() else PACKAGE / name
                assert where.exists(), f"ARCHITECTURE.md names {name!r}, which does not exist"
            elif name.endswith(".yaml"):
                pattern = name.replace("<major>", "*")
                assert list(PACKAGE.glob(pattern)), f"ARCHITECTURE.md names {name!r}, which matches no file"
