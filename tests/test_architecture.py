"""The package's shape: imports run one way (the contracts in pyproject.toml), no circles, no private names taken
across modules, and docs/architecture.md names every module."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp
import networkx
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_sft"


def module_names() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_the_import_contracts_hold():
    # In a process of its own: import-linter configures logging, which would silence the loggers of later tests.
    check = (
        "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_circle_of_imports_between_modules():
    graph = grimp.build_graph("hf_sft")
    edges = networkx.DiGraph()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            # A package's __init__ that re-exports a child and the child itself are one concept by construction.
            if not imported.startswith(importer + ".") and not importer.startswith(imported + "."):
                edges.add_edge(importer, imported)
            elif importer.startswith(imported + ".") and imported != "hf_sft":
                edges.add_edge(importer, imported)  # a child that needs its package's __init__ closes a circle
    circles = [sorted(c) for c in networkx.strongly_connected_components(edges) if len(c) > 1]
    assert circles == []


def private_takes(path: Path) -> list[str]:
    """`from hf_sft.x import _name` and `module._name` for an hf_sft module bound in this file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules, taken = module_names(), []
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_sft"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    bound[alias.asname or alias.name] = full
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    taken.append(f"{alias.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hf_sft") and alias.asname:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
            and re.fullmatch(r"_[a-zA-Z0-9]\w*", node.attr)
        ):
            taken.append(f"{node.attr} of {bound[node.value.id]}")
    return taken


@pytest.mark.parametrize("tree", ["hf_sft", "tests", "scripts"])
def test_no_module_takes_another_modules_private_name(tree):
    taken = {
        str(path.relative_to(REPO)): names
        for path in sorted((REPO / tree).rglob("*.py"))
        if (names := private_takes(path))
    }
    assert taken == {}


def test_the_architecture_page_names_every_module_and_no_other():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(hf_sft(?:\.\w+)*)`", page))
    assert module_names() - named == set(), "modules the page does not name"
    assert {name for name in named if name not in module_names()} == set(), "names on the page that are no module"
