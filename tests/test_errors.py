"""Library errors on a user's input become one line and exit 2: `bad_input`, and an audit of every call site."""

import ast
from pathlib import Path

import pytest

from hf_sft.errors import UsageError, bad_input

REPO = Path(__file__).resolve().parents[1]
# The modules that take a user's flags, files and folders (hf_sft/data/* is audited by its own tests).
MODULES = sorted(
    {
        *REPO.glob("hf_sft/commands/*.py"),
        *REPO.glob("hf_sft/export/*.py"),
        *(REPO / "hf_sft" / f"{m}.py" for m in ("cli", "flags", "legacy", "safe_pickle")),
        *(REPO / "hf_sft" / f"{m}.py" for m in ("tokenizer", "model_folder", "generate", "hub")),
        *(REPO / "hf_sft" / "training" / f"{m}.py" for m in ("model_and_data", "resume", "callbacks", "config")),
        *(REPO / "hf_sft" / "training" / f"{m}.py" for m in ("validation", "arguments", "run")),
    }
)
# Library calls that read a file, a folder or a value a user gave: each raises its own exceptions on bad input.
LOADERS = {
    "from_pretrained",
    "from_config",
    "from_file",
    "get_peft_model",
    "load_dataset",
    "load_from_disk",
    "safe_open",
    "load_file",
    "validate_repo_id",
    "safe_load",
}
LOADERS_OF = {("json", "loads"), ("json", "load"), ("torch", "load"), ("torch", "device")}
# Call sites outside a guard, each with why no library exception can escape from it on a user's input.
PROVEN_SAFE = {
    ("hf_sft/legacy.py", "convert_state_dict", "torch.device"): "torch.device('meta'): a constant",
    ("hf_sft/export/gguf_tokenize.py", "lost_symbols_break", "json.loads"): (
        "the tokenizers library's own serialisation of a tokenizer already loaded"
    ),
    ("hf_sft/export/gguf_vocab.py", "build_vocab", "json.loads"): (
        "the tokenizers library's own serialisation of a tokenizer already loaded"
    ),
    ("hf_sft/export/llama_server.py", "post", "json.load"): "the JSON answer of llama-server, not a user's file",
    ("hf_sft/export/stock.py", "copy_tokenizer_files", "json.loads"): (
        "tokenizer_config.json, parsed by model_folder.read_tokenizer under bad_input before anything is written"
    ),
    ("hf_sft/model_folder.py", "_read_header", "json.loads"): (
        "inside try/except: an unreadable header is the problem returned, which the callers raise as a UsageError"
    ),
    ("hf_sft/tokenizer.py", "_uses_byte_level", "json.loads"): "the tokenizers library's own serialisation",
    ("hf_sft/training/arguments.py", "_json_flag", "json.loads"): "a probe inside try/except ValueError",
    ("hf_sft/training/resume.py", "checkpoint_step", "json.loads"): "inside try/except: unreadable means step 0",
    ("hf_sft/training/resume.py", "load_from_checkpoint", "AutoModelForCausalLM.from_config"): (
        "the config was read and validated by AutoConfig.from_pretrained under bad_input just before"
    ),
    ("hf_sft/training/resume.py", "_plain", "json.loads"): "the round trip of json.dumps' own output",
}


def _callee(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute):
        receiver = func.value.id if isinstance(func.value, ast.Name) else None
        if func.attr in LOADERS or (receiver, func.attr) in LOADERS_OF:
            return f"{receiver}.{func.attr}" if receiver else func.attr
    if isinstance(func, ast.Name) and func.id in LOADERS:
        return func.id
    return None


def _guards(node: ast.AST, call: ast.Call) -> bool:
    """`with bad_input(...)` around the call, or a `try` around it whose handler raises a UsageError."""
    if isinstance(node, ast.With):
        return any(
            getattr(item.context_expr, "func", None) is not None and ast.unparse(item.context_expr.func) == "bad_input"
            for item in node.items
        )
    if isinstance(node, ast.Try) and any(call in ast.walk(statement) for statement in node.body):
        return any(
            isinstance(raised, ast.Raise) and raised.exc is not None and "UsageError" in ast.unparse(raised.exc)
            for handler in node.handlers
            for raised in ast.walk(handler)
        )
    return False


def call_sites() -> list[tuple[str, str, str, bool]]:
    """(module, function, callee, guarded) for every loader call in MODULES."""
    found = []

    def visit(node: ast.AST, enclosing: list[ast.AST], function: str, module: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.Call) and (name := _callee(node)):
            found.append((module, function, name, any(_guards(outer, node) for outer in enclosing)))
        for child in ast.iter_child_nodes(node):
            visit(child, [*enclosing, node], function, module)

    for path in MODULES:
        visit(ast.parse(path.read_text(encoding="utf-8")), [], "<module>", str(path.relative_to(REPO)))
    return found


def test_every_library_call_on_user_input_is_guarded_or_proven_safe():
    sites = call_sites()
    assert len(sites) > 15  # the audit sees the loaders (a renamed helper would hide them)
    unguarded = {(module, function, name) for module, function, name, guarded in sites if not guarded}
    escaping = sorted(unguarded - set(PROVEN_SAFE))
    assert not escaping, f"library exceptions can escape from: {escaping} (wrap in bad_input or prove safe)"
    stale = sorted(set(PROVEN_SAFE) - unguarded)
    assert not stale, f"PROVEN_SAFE lists call sites that are gone or now guarded: {stale}"


def test_bad_input_names_the_input_and_keeps_the_library_message():
    with pytest.raises(UsageError) as caught, bad_input("--pretrained_ckpt_path models/x: cannot load the model"):
        raise OSError("no file named model.safetensors")
    assert (
        str(caught.value) == "--pretrained_ckpt_path models/x: cannot load the model: no file named model.safetensors"
    )
    with pytest.raises(KeyError), bad_input("a bug is not a bad input"):
        raise KeyError("kept, with its traceback")
    with pytest.raises(UsageError, match="^ours$"), bad_input("not prefixed twice"):
        raise UsageError("ours")
