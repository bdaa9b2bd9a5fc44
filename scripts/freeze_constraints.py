"""Write tests/constraints.txt: the installed version of every package that `hf-sft[dev]` pulls in.

Run it after a green suite on the newest releases, so the README's test command installs what was last seen green:

    python3 -m pip install --upgrade -e ".[dev]" && python3 -m pytest -q && python3 scripts/freeze_constraints.py
"""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

OUT = Path(__file__).resolve().parents[1] / "tests" / "constraints.txt"
HEADER = """\
# The versions the test suite was last run green with: the README's test command installs these (-c), so a release
# published overnight cannot turn a fresh clone red. Update on purpose: install without -c (see docs/development.md),
# run the suite, then `python3 scripts/freeze_constraints.py`.
"""
# The build backend is installed in pip's isolated build environment, which these constraints do not reach.
NOT_PINNED = {"hf-sft", "setuptools"}


def closure(name: str, extras: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """Every installed distribution `name[extras]` requires, recursively, with the extras asked of each."""
    seen: dict[str, set[str]] = {}

    def visit(name: str, extras: tuple[str, ...]) -> None:
        key = canonicalize_name(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # an optional dependency of a dependency that nobody installed
            return
        if key in seen and set(extras) <= seen[key]:
            return
        seen.setdefault(key, set()).update(extras)
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))
            if wanted:
                visit(req.name, tuple(req.extras))

    visit(name, extras)
    return seen


def main() -> None:
    pins = []
    for key in closure("hf-sft", ("dev",)):
        if key not in NOT_PINNED:
            version = metadata.version(key).split("+")[0]  # torch's local label (+cpu) is the build, not the release
            pins.append(f"{metadata.distribution(key).metadata['Name']}=={version}")
    OUT.write_text(HEADER + "".join(f"{pin}\n" for pin in sorted(pins, key=str.lower)))
    print(f"wrote {len(pins)} pins to {OUT}")


if __name__ == "__main__":
    main()
