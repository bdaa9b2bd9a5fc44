"""Checkpoints: find, verify, stage, seal, rotate, the files hf_sft adds, and the sharded gather.

A checkpoint is `out_dir/checkpoint-STEP/`, written by Trainer (weights, optimizer and scheduler, random-number
state, `trainer_state.json`) plus hf_sft's own files, and never modified in place once under its own name.

- **Find** (`list_checkpoints`, `resolve_resume_path`, `newer_checkpoints`): `--resume_from_ckpt_path latest` takes
  the newest checkpoint that verifies and logs each newer one it skips and why; an explicit checkpoint that does not
  verify is refused naming the file. Resuming from one while the run folder holds newer ones is refused, naming them,
  unless `--discard_newer_checkpoints` says to delete them (and the final model, which belongs to them) first.
- **Verify** (`problem`): a checkpoint is read the way a resume will need it: its manifest is there and names the
  folder's step; every file it lists is there with its size; the files Trainer restores from exist; safetensors
  headers parse and describe exactly the bytes the file holds; torch files end with their zip directory (a file cut
  short loses it), and the state files Trainer unpickles name no global outside the list its loads trust; every file
  still has the content it was sealed with (a same-size change is found here); `trainer_state.json`'s `global_step`
  is the folder's step. A checkpoint sealed by an older hf_sft (sizes only, or a marker that says only `step N`) gets
  every check its manifest allows.
- **Stage and seal** (`staged_checkpoint`, `seal`): for the length of each save Trainer writes into a staging folder
  of the run's (`out_dir/.hf_sft-tmp-checkpoint-STEP/checkpoint-STEP/`, the same name on every process); the main
  process adds hf_sft's files, and once every process is done writes the manifest, `checkpoint_complete` (the step,
  and the name, size and SHA-256 of every file), and renames the folder into place through `hf_sft.writer`. A crash
  leaves only the staging folder, which the next save of that step and the next run in the folder remove. A write the
  system refuses (a full disk, say) stops the run with one line naming the path, the cause and the newest checkpoint
  to resume from.
- **Rotate** (`rotate_checkpoints`): old checkpoints are removed (`save_total_limit`) only after the new one is in
  place.
- **The extra files** (`CheckpointFiles`): `run_args.json` (`RUN_ARGS_FILE`, read back by `hf_sft.training.resume`),
  and the model's config and tokenizer where the engine's checkpoint lacks them, as a sharded one (FSDP, ZeRO-3)
  may: resuming builds the model from them. Under FSDP2 the config, model code and tokenizer are written again from
  our own model class: with SHARDED_STATE_DICT Trainer writes only the weight and optimizer shards, and with
  FULL_STATE_DICT it saves the model through FSDP2's subclass of our class, so the folder would receive torch's FSDP
  source files and an `auto_map` naming them.
- **The sharded gather** (`consolidated_model`): under FSDP and ZeRO-3 no process holds every weight, and under
  FSDP's SHARDED_STATE_DICT `Trainer.save_model` writes nothing at all; the final folder is written from gathered
  weights put into a fresh model of our own class.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_sft.errors import UsageError, WriteFailed
from hf_sft.model_folder import safetensors_problem
from hf_sft.safe_pickle import unsafe_globals
from hf_sft.writer import new_folder, remove, shared_temp, user_error, write_json, write_text

logger = logging.getLogger("hf_sft.train")

MANIFEST = "checkpoint_complete"
COMPLETE_MARKER = MANIFEST  # the manifest is the completion mark (older hf_sft wrote `step N` under this name)
RUN_ARGS_FILE = "run_args.json"  # the run's arguments, written into every checkpoint (`hf_sft.training.resume`)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DISCARD_FLAG = "--discard_newer_checkpoints"
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


# Find


def folder_step(folder: str | Path) -> int | None:
    """The step in a `checkpoint-STEP` folder's name, or None for another name."""
    match = CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders under `output_dir`, oldest step first (`complete_only`: those with a completion mark)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and folder_step(p) is not None]
    if complete_only:
        found = [p for p in found if (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=folder_step)


def resolve_resume_path(resume: str | None, output_dir: str | Path, discard_newer: bool = False) -> str | None:
    """`latest` -> the newest checkpoint in `output_dir` that verifies; a path must verify and be the newest.

    Args:
        resume: `--resume_from_ckpt_path` as given.
        output_dir: the run's `--out_dir`, where `latest` looks and where newer checkpoints would be replaced.
        discard_newer: `--discard_newer_checkpoints` (the newer ones are then removed by `discard_newer`).

    Raises:
        UsageError: no checkpoint verifies, the path does not verify (naming the file), or newer checkpoints exist
            and `discard_newer` is false (naming them).
    """
    if not resume:
        return None
    if resume == "latest":
        return str(_latest(Path(output_dir)))
    path = Path(resume)
    if path.is_file():
        raise UsageError(_not_a_run_checkpoint(path))
    if not (path / "trainer_state.json").is_file() and not (path / COMPLETE_MARKER).is_file():
        raise UsageError(f"--resume_from_ckpt_path {resume}: not a checkpoint folder (no trainer_state.json)")
    found = problem(path)
    if found:
        raise UsageError(
            f"--resume_from_ckpt_path {resume}: {found}; resume from another checkpoint "
            "(--resume_from_ckpt_path latest takes the newest one that verifies)"
        )
    newer = newer_checkpoints(path, output_dir)
    if newer and not discard_newer:
        names = ", ".join(p.name for p in newer)
        raise UsageError(
            f"--resume_from_ckpt_path {resume}: {output_dir} holds newer checkpoints ({names}) that this run would "
            f"replace: continue from the newest with --resume_from_ckpt_path latest, or delete them (and the final "
            f"model) and continue from {path.name} with {DISCARD_FLAG}"
        )
    return str(path)


def newer_checkpoints(checkpoint: str | Path, output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir` past `checkpoint`'s step (none if it lies in another folder)."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    step = folder_step(checkpoint)
    if step is None or not output_dir.is_dir() or checkpoint.resolve().parent != output_dir.resolve():
        return []
    return [p for p in list_checkpoints(output_dir) if folder_step(p) > step]


def _latest(output_dir: Path) -> Path:
    complete = list_checkpoints(output_dir)
    for folder in reversed(complete):
        found = problem(folder)
        if found is None:
            return folder
        logger.warning("--resume_from_ckpt_path latest: skipping %s: %s", folder.name, found)
    if complete:
        raise UsageError(
            f"--resume_from_ckpt_path latest: no checkpoint in {output_dir} verifies ({_skipped(complete)}); "
            f"start again with {_OVERWRITE_FLAG}"
        )
    raise UsageError(f"--resume_from_ckpt_path latest: no complete checkpoint in {output_dir}")


_OVERWRITE_FLAG = "--overwrite_output_dir"


def _skipped(folders: list[Path]) -> str:
    return "; ".join(f"{folder.name}: {problem(folder)}" for folder in folders)


def _not_a_run_checkpoint(path: Path) -> str:
    """What to do with a seed-format `.pt` given to `--resume_from_ckpt_path`."""
    from hf_sft.safe_pickle import load_checkpoint

    saved = load_checkpoint(path)
    keys = set(saved) if isinstance(saved, dict) else set()
    if "iter_num" in keys and keys & {"optimizer", "optimizer_state_dict"}:
        # finetune_gpt.py's optimizer state and data order belong to its own loop; Trainer cannot continue them.
        return (
            f"--resume_from_ckpt_path {path} is a finetune_gpt.py checkpoint (iteration {saved['iter_num']}): its "
            "optimizer state and data position cannot be continued by this trainer; fine-tune its weights further "
            f"with --pretrained_ckpt_path {path}"
        )
    return (
        f"--resume_from_ckpt_path {path} is a pretraining checkpoint, not a checkpoint folder of a fine-tuning run: "
        f"to fine-tune from it pass --pretrained_ckpt_path {path}"
    )


# Verify


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
        return safetensors_problem(path)
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


def _step_problem(state: Path, step: int) -> str | None:
    try:
        saved = int(json.loads(state.read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{state} is not a readable trainer state"
    if saved != step:
        return f"{state} says global_step {saved}, but the checkpoint is for step {step}"
    return None


# Stage, seal, rotate


@contextlib.contextmanager
def staged_checkpoint(
    run_dir: Path, step: int, main: bool, barrier: Callable[[], None]
) -> Iterator[tuple[Path, Path | None]]:
    """Stage `run_dir/checkpoint-STEP`: the block writes into the staged folder, which is then sealed and renamed.

    Every process enters the block; inside it Trainer writes under the staging root (the same path on every process).

    Args:
        run_dir: the run folder.
        step: the checkpoint's optimizer step.
        main: this is the main process (it creates, seals and renames the folder).
        barrier: waits for every process (`accelerator.wait_for_everyone`).

    Yields:
        `(staging root, staged checkpoint folder)`; the folder is None on the other processes.

    Raises:
        WriteFailed: the system refused a write, naming the checkpoint, the cause and the way forward.
    """
    final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    root = shared_temp(final)
    if main:
        remove(root)  # what a killed save of this step left
    try:
        with new_folder(final, temp=root / final.name) if main else contextlib.nullcontext() as staged:
            barrier()  # the staging folder exists before anyone writes into it
            yield root, staged
            barrier()  # every process's files are in
            if main:
                seal(staged, step)
    except WriteFailed as err:  # named after the checkpoint, not the staged file that failed
        cause = user_error(err.__cause__) or "no space left on device"
        raise WriteFailed(f"cannot write {final}: {cause}; {_way_forward(run_dir)}") from err.__cause__
    finally:
        if main:
            remove(root)


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


def rotate_checkpoints(run_dir: Path, current: Path, keep: int | None) -> None:
    """Remove folders without a completion mark, then all but the newest `keep` complete checkpoints (not `current`).

    Folders without a mark are what an older hf_sft left when a write was cut short.
    """
    for folder in list_checkpoints(run_dir, complete_only=False):
        if folder != current and not (folder / MANIFEST).is_file():
            logger.warning("removing incomplete checkpoint %s", folder)
            remove(folder)
    if keep:
        for folder in list_checkpoints(run_dir)[:-keep]:
            if folder != current:
                remove(folder)


def _way_forward(run_dir: Path) -> str:
    complete = list_checkpoints(run_dir)  # a failed save leaves its destination as it was
    if not complete:
        return "no checkpoint was written before it: make room, then run the same command again"
    return (
        f"the newest complete checkpoint is {complete[-1].name}: make room, then continue with "
        "--resume_from_ckpt_path latest"
    )


# The extra files


class CheckpointFiles:
    """Writes hf_sft's files into a staged checkpoint folder (on the main process, before it is sealed).

    Args:
        record: what `run_args.json` holds (`hf_sft.training.resume.record_arguments`).
        tokenizer: the run's tokenizer.
    """

    def __init__(self, record: dict[str, Any], tokenizer):
        self.record = record
        self.tokenizer = tokenizer

    def write(self, folder: str | Path, model) -> None:
        """Add `run_args.json`, and the config, code and tokenizer where needed, to the checkpoint `folder`."""
        from torch.distributed.fsdp import FSDPModule

        folder = Path(folder)
        write_text(folder / RUN_ARGS_FILE, json.dumps(self.record, indent=2, sort_keys=True) + "\n")
        if isinstance(model, FSDPModule):
            for name in code_files(type(model)):
                (folder / name).unlink(missing_ok=True)
            write_model_files(model, folder)
            self.tokenizer.save_pretrained(folder)
            return
        config = getattr(model, "config", None)
        if config is not None and not self.record["shape"].get("use_lora") and not (folder / "config.json").is_file():
            config.save_pretrained(folder)
        if not (folder / "tokenizer.json").is_file():
            self.tokenizer.save_pretrained(folder)


# The sharded gather


def full_state_dict(trainer) -> dict | None:
    """The whole model's weights gathered from a sharded engine, on rank 0 (every rank must call this).

    Returns None when the model is not sharded: the model itself then holds every weight. Under FSDP with
    SHARDED_STATE_DICT `Trainer.save_model` writes nothing at all, hence this explicit gather.
    """
    from accelerate.utils import DistributedType

    accelerator = trainer.accelerator
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.get_state_dict(trainer.model)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(trainer.model_wrapped)
    return None


def consolidated_model(trainer, model):
    """On rank 0, a plain model holding every weight, to be written as the final folder (every rank calls this).

    Unsharded runs get `model` back. Sharded ones get a new model filled with the gathered weights, leaving the
    engine's model alone: FSDP2 replaces the class of the model it shards, and `save_pretrained` on it would write
    FSDP's code files and an `auto_map` that points at them.
    """
    state_dict = full_state_dict(trainer)
    if state_dict is None or not trainer.is_world_process_zero():
        return model
    plain = _plain_instance(model)
    unexpected = plain.load_state_dict(state_dict, strict=False, assign=True).unexpected_keys
    plain.tie_weights()  # a tied head may be missing from the gathered weights
    missing = [name for name, param in plain.named_parameters() if param.is_meta]
    if missing or unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return plain


def write_model_files(model, folder: Path) -> None:
    """config.json (with `auto_map`), generation config and the model code files, without weights."""
    plain = _plain_instance(model)
    plain.config.architectures = [type(plain).__name__]
    if plain._auto_class is not None:
        custom_object_save(plain, folder, config=plain.config)
    plain.config.save_pretrained(folder)
    if plain.generation_config is not None:
        plain.generation_config.save_pretrained(folder)


def _plain_instance(model):
    """A new, empty instance (meta device) of `model`'s own class, not FSDP2's subclass of it; it shares the config."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.generation_config = model.generation_config
    return plain


def code_files(cls: type) -> list[str]:
    """The file names `save_pretrained` copies for a model of class `cls`: its module and the modules it imports."""
    module_file = sys.modules[cls.__module__].__file__
    return [Path(f).name for f in (module_file, *get_relative_import_files(module_file))]
