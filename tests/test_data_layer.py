"""The data layer's imports: below training and the commands, leaves aside; public names only, its tests included."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEAVES = ("hf_sft.errors", "hf_sft.writer", "hf_sft.flags")


def imports(path: Path) -> list[tuple[str, str]]:
    """`(module, name)` of every `from hf_sft... import name` and `import hf_sft...` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_sft"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("hf_sft")]
    return found


def test_the_data_package_imports_only_itself_and_the_leaves():
    wrong = [
        f"{path.relative_to(REPO)}: {module}"
        for path in sorted((REPO / "hf_sft" / "data").glob("*.py"))
        for module, _ in imports(path)
        if not (module == "hf_sft.data" or module.startswith("hf_sft.data.") or module in LEAVES)
    ]
    assert not wrong


def test_no_private_name_crosses_a_module_boundary():
    files = [*(REPO / "hf_sft" / "data").glob("*.py"), *(REPO / "tests").glob("test_data_*.py")]
    files += [REPO / "hf_sft" / "commands" / "data.py"]
    taken = [
        f"{path.relative_to(REPO)} takes {name} from {module}"
        for path in sorted(files)
        for module, name in imports(path)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not taken
