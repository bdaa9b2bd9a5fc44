"""Where an export may write: the targets, what each one's `--out` names, and the check made before any work.

The check goes through `hf_sft.writer`: an `--out` that is the model folder, lies inside it or holds it is refused
even with `--overwrite`; one that holds something other than an earlier export to the same target is refused
without it.
"""

from __future__ import annotations

from pathlib import Path

from hf_sft.errors import UsageError
from hf_sft.generate import tokenizer_dir
from hf_sft.writer import check_destination

# target -> what its --out names: a "folder" or a "file"
TARGETS = {"gpt2": "folder", "llama": "folder", "legacy-pt": "file", "gguf": "file"}


def export_command(target: str) -> str:
    """The command recorded in (and allowed to rewrite) an export's output folder."""
    return f"export --to {target}"


def check_export_destination(model_dir: str | Path, target: str, out: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before anything is read, an `--out` that exporting `model_dir` to `target` may not write.

    The sources are the model folder and, for a `checkpoint-STEP` folder without a tokenizer, the run folder's
    tokenizer files: `--out` may be none of them, lie inside them or hold them.

    Raises:
        UsageError: see `hf_sft.writer.check_destination`; also an unknown target.
    """
    if target not in TARGETS:
        raise UsageError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    model_dir = Path(model_dir)
    sources = [model_dir]
    tokenizer = tokenizer_dir(model_dir) if model_dir.is_dir() else None
    if tokenizer is not None and tokenizer != model_dir:
        sources += [path for path in tokenizer.iterdir() if path.is_file()]
    kind = TARGETS[target]
    return check_destination(out, kind=kind, command=export_command(target), sources=sources, overwrite=overwrite)
