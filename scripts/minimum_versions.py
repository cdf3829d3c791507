"""The declared minimum versions of napari-gradcam's dependencies, as pip pins.

Why: a floor in ``pyproject.toml`` is a promise ("works with zarr 3.0.8") that nothing checks
unless something installs exactly that version and runs the tests. This script reads the floors
from ``pyproject.toml`` itself (the runtime dependencies and the extras named on the command
line), so the check in ``scripts/check_minimum_versions.sh`` can never drift from what is
declared: change a floor and the check installs the new one.

    python scripts/minimum_versions.py [--extra napari] [--extra distributed]
        prints one ``name==floor`` line per dependency with a ``>=`` floor
    python scripts/minimum_versions.py --verify [--extra ...]
        exits 1 (and says which) when an installed version is not its declared floor

A dependency without a floor (``qtpy``) is left to pip. torch is the exception on purpose: the
project's machines install the one local CPU wheel that ``constraints.txt`` pins (torch 2.13.0),
so ``torch>=2.4`` is declared for users with a CUDA build and not installed at its floor here.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
#: Pinned elsewhere (constraints.txt): not installed at the declared floor.
NOT_AT_FLOOR = frozenset({"torch"})
_REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
                          r"(?P<spec>[^;]*)(?:;.*)?$")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503: case and ``-_.`` runs ignored)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(pyproject: Path = ROOT / "pyproject.toml",
           extras: tuple[str, ...] = ("napari",)) -> dict[str, str]:
    """``{name: floor}`` for every requirement of the runtime dependencies and ``extras`` that
    has a ``>=`` bound. The same name twice (``napari`` and ``napari[pyqt6]``) must have the
    same floor, or the declaration contradicts itself: that is an error, not a silent pick."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} "
                             f"(it has {', '.join(sorted(optional))})")
        requirements += optional[extra]
    found: dict[str, str] = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"cannot read the requirement {requirement!r} in pyproject.toml")
        name = canonical(match["name"])
        bound = re.search(r">=\s*([0-9][^,\s]*)", match["spec"])
        if bound is None or name in NOT_AT_FLOOR:
            continue
        if name in found and found[name] != bound[1]:
            raise SystemExit(f"pyproject.toml declares two floors for {name}: "
                             f"{found[name]} and {bound[1]}")
        found[name] = bound[1]
    return found


def mismatches(wanted: dict[str, str]) -> list[str]:
    """What is installed differently from its floor (or not at all), one line each."""
    problems = []
    for name, floor in sorted(wanted.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (floor {floor})")
            continue
        if _release(installed) != _release(floor):
            problems.append(f"{name}: {installed} installed, declared floor {floor}")
    return problems


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version (``2023.1.23`` == ``2023.01.23``, ``6.0`` == ``6``)."""
    parts = [int(p) for p in re.findall(r"\d+", version.split("+")[0])]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", action="append", default=[],
                        help="an extra of pyproject.toml whose floors are included too")
    parser.add_argument("--verify", action="store_true",
                        help="check the installed versions instead of printing pins")
    args = parser.parse_args(argv)
    wanted = floors(extras=tuple(args.extra))
    if args.verify:
        problems = mismatches(wanted)
        for line in problems:
            print(f"minimum versions: {line}", file=sys.stderr)
        if not problems:
            print("minimum versions installed: " + ", ".join(
                f"{name} {floor}" for name, floor in sorted(wanted.items())))
        return 1 if problems else 0
    for name, floor in sorted(wanted.items()):
        print(f"{name}=={floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
