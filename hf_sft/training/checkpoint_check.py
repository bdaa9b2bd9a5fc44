"""What makes a checkpoint folder whole: the manifest it is sealed with, and the checks a resume makes against it.

A checkpoint is sealed (`seal`) once every process has written it, before it is renamed into place: its manifest,
`checkpoint_complete`, records the step and the name, size and SHA-256 of every file. `problem` then reads a
checkpoint the way a resume will need it: the manifest is there and names the folder's step; every file it lists is
there with its size; the files Trainer restores from exist (weights, optimizer, scheduler, random-number state,
`trainer_state.json`); safetensors headers parse and describe exactly the bytes the file holds; torch files end with
their zip directory (a file cut short loses it), and the state files Trainer unpickles name no global outside the
list its loads trust; every file still has the content it was sealed with (a same-size change is found here);
`trainer_state.json`'s `global_step` is the folder's step. A checkpoint sealed by an older hf_sft (sizes only, or a
marker that says only `step N`) gets every check its manifest allows.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path

from hf_sft.safe_pickle import unsafe_globals
from hf_sft.writer import write_json

MANIFEST = "checkpoint_complete"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_FORMAT = 2
_TRAINER_STATE = "trainer_state.json"
# What Trainer restores from, each as the alternatives the engines write (the first one is named when none is there).
_NEEDED = (
    (
        "model weights",
        (
            "model.safetensors",
            "model.safetensors.index.json",
            "adapter_model.safetensors",
            "pytorch_model_fsdp_0",
            "pytorch_model_fsdp.bin",
            "global_step*",
        ),
    ),
    ("optimizer state", ("optimizer.pt", "optimizer_0", "optimizer.bin", "global_step*")),
    ("scheduler state", ("scheduler.pt", "global_step*")),
    ("random-number state", ("rng_state.pth", "rng_state_0.pth")),
    ("trainer state", (_TRAINER_STATE,)),
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# The torch files Trainer unpickles itself on resume (`weights_only=True`): a global outside its allow-list is refused
# here, in our words. Engines' own files (DeepSpeed's `global_step*/`, FSDP's `.distcp`) are read by their engines.
_TRAINER_PICKLES = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")


def folder_step(folder: str | Path) -> int | None:
    """The step in a `checkpoint-STEP` folder's name, or None for another name."""
    match = CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def seal(folder: str | Path, step: int, absent: dict[str, str] | None = None) -> None:
    """Write `folder`'s manifest: the step and every file's relative name, size and SHA-256 (write it last).

    Args:
        folder: the complete checkpoint folder.
        step: its optimizer step.
        absent: what Trainer could restore that this checkpoint knowingly lacks, e.g. `{"random-number state":
            "why"}` (Trainer then goes on with the process's own state); a resume does not ask for it.
    """
    folder = Path(folder)
    files = {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": digest(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    unknown = set(absent or {}) - {what for what, _ in _NEEDED}
    if unknown:
        raise ValueError(f"unknown checkpoint contents {sorted(unknown)}")
    write_json(folder / MANIFEST, {"format": _FORMAT, "step": step, "files": files, "absent": absent or {}})


def problem(folder: str | Path) -> str | None:
    """What keeps `folder` from being resumed, as one phrase naming the file, or None when it verifies."""
    folder = Path(folder)
    marker = folder / MANIFEST
    if not marker.is_file():
        return f"{folder} has no {MANIFEST}: it was not completely written"
    manifest = _read_manifest(marker)
    step = folder_step(folder)
    if manifest is None:
        return f"{marker} is neither a manifest nor a completion mark"
    if step is not None and manifest["step"] != step:
        return f"{marker} is for step {manifest['step']}, not {step}"
    for name, sealed in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != sealed["size"]:
            return f"{path} has {actual} bytes, {sealed['size']} when the checkpoint was sealed"
    for what, names in _NEEDED:
        if what not in manifest["absent"] and not any(_exists(folder, name) for name in names):
            return f"{folder / names[0]} is missing (the {what})"
    for path in sorted(folder.rglob("*")):
        found = _file_problem(path) if path.is_file() else None
        if found:
            return found
    found = _step_problem(folder / _TRAINER_STATE, manifest["step"])
    if found:
        return found
    # Last, as the only check that reads every byte: what the cheaper ones say is the more precise line.
    for name, sealed in manifest["files"].items():
        if "sha256" in sealed and digest(folder / name) != sealed["sha256"]:
            return f"{folder / name} is not the file the checkpoint was sealed with: its content changed since"
    return None


def digest(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read_manifest(marker: Path) -> dict | None:
    """The manifest with each file as `{"size", "sha256"}` (sizes alone for format 1), or for an older hf_sft's
    `step N` mark the step alone; None if it is neither."""
    text = marker.read_text(encoding="utf-8", errors="replace")
    legacy = re.fullmatch(r"step (\d+)\s*", text)
    if legacy:
        return {"step": int(legacy.group(1)), "files": {}, "absent": {}}
    try:
        manifest = json.loads(text)
        step, files, absent = int(manifest["step"]), dict(manifest["files"]), dict(manifest.get("absent", {}))
    except (ValueError, KeyError, TypeError):
        return None
    files = {name: {"size": entry} if isinstance(entry, int) else entry for name, entry in files.items()}
    if not all(isinstance(entry, dict) and isinstance(entry.get("size"), int) for entry in files.values()):
        return None
    return {"step": step, "files": files, "absent": absent}


def _exists(folder: Path, name: str) -> bool:
    return any(True for _ in folder.glob(name)) if "*" in name else (folder / name).exists()


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in _TORCH_SUFFIXES:
        # torch.save writes a zip archive whose directory comes last: a file cut short has none.
        if not zipfile.is_zipfile(path):
            return f"{path} is not a complete torch file (cut short: no zip directory at its end)"
        if _TRAINER_PICKLES.match(path.name):
            try:
                unsafe = unsafe_globals(path)
            except Exception as err:  # noqa: BLE001 - whatever torch's static reader trips on, the file is damaged
                return f"{path} is not a readable torch file ({type(err).__name__}: {err})"
            if unsafe:
                return f"{path} names {', '.join(unsafe)}, which no checkpoint holds: refusing to load it"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The header parses and its tensors end exactly where the file does (a file cut short ends before)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0 or 8 + length > size:
            return f"{path} is cut short: its safetensors header is incomplete ({size} bytes)"
        try:
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path} has an unreadable safetensors header"
    if 8 + length + end != size:
        return f"{path} is cut short: {size} bytes, its safetensors header describes {8 + length + end}"
    return None


def _step_problem(state: Path, step: int) -> str | None:
    try:
        saved = int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{state} is not a readable trainer state"
    if saved != step:
        return f"{state} says global_step {saved}, but the checkpoint is for step {step}"
    return None
