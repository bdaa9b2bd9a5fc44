"""Tokenise once: `hf-sft data ... --save_to DIR` writes the tokenised, masked splits; `hf-sft train --data_path DIR`
trains on them without tokenising again.

The folder is a `DatasetDict.save_to_disk` folder (`train`, and `eval` when there is one) whose rows carry the model
columns plus `index` (the record's position in the source) and `length`, and a manifest (`MANIFEST`) holding what
decided the tokens: a fingerprint of the tokenizer (its serialisation without padding/truncation settings and
post-processor, its BOS string and EOS id: what `Encoder` uses), the prompt format (name and a hash of its
chat-template text), `max_seq_len`, the length policy, the field mapping and the split; the sources (path, size,
sha256); each split's counts (kept, dropped and why, bad records skipped) so that the report of a saved folder
needs nothing else; and the size of every file `save_to_disk` wrote. A run whose settings differ in any of these is
refused, naming each difference.

Loading verifies the folder before any step: every file the manifest lists has its size (a folder cut short or
changed after it was saved is refused, naming the file), each split has the number of examples the manifest records,
and no token id reaches the tokenizer's vocabulary (the model's embedding has no row for it: training would fail at
step 1). Each refusal is one line naming the folder; the remedy is to write it again with `--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hf_sft.data.masking import IGNORE_INDEX, MODEL_COLUMNS
from hf_sft.data.sources import file_fingerprint
from hf_sft.data.splits import SFTData, TokenizedSplit
from hf_sft.errors import UsageError, bad_input
from hf_sft.writer import SAVED_DATASET

MANIFEST = "hf_sft_tokenized.json"
MANIFEST_VERSION = 1
SAVE_COMMAND = SAVED_DATASET  # the writer's mark of a saved dataset
# setting -> how the difference is named in the refusal
SETTING_NAMES = {
    "tokenizer": "the tokenizer (fingerprint)",
    "format": "--template",
    "format_sha256": "the prompt format's text (sha256)",
    "max_seq_len": "--max_seq_len",
    "length_policy": "--length_policy",
    "field_map": "--field_map",
    "val_split": "--val_split",
    "seed": "--seed (of the held-out split)",
    "eval_data_path": "--eval_data_path",
}


def is_saved_dataset(path: str | Path | None) -> bool:
    """Whether `path` is a folder written by `hf-sft data --save_to` (it holds the manifest)."""
    return bool(path) and (Path(path) / MANIFEST).is_file()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the tokenizer's serialisation, its BOS string and its EOS id.

    Left out: padding and truncation settings, and the post-processor (masking encodes without special tokens, so it
    never acts; transformers rewrites it when special tokens or the chat template are set).
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for key in ("padding", "truncation", "post_processor"):
        spec.pop(key, None)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token_id]).encode())
    return digest.hexdigest()


def run_settings(tokenizer, template, data_args, *, max_seq_len: int | None, val_split: float, seed: int) -> dict:
    """The settings that decide a run's tokenised examples (compared with a saved folder's)."""
    return {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": template.name,
        "format_sha256": hashlib.sha256(template.chat_template().encode()).hexdigest(),
        "max_seq_len": max_seq_len,
        "length_policy": data_args.length_policy,
        "field_map": data_args.field_map,
        "val_split": val_split,
        "seed": seed if val_split else None,
        "eval_data_path": data_args.eval_data_path,
    }


def source_fingerprints(*paths: str | Path | None) -> list[dict[str, Any]]:
    """Path, size and sha256 of each local source file (a Hub id or a folder: its name only)."""
    found = []
    for path in paths:
        if not path:
            continue
        entry: dict[str, Any] = {"path": str(path)}
        if Path(path).is_file():
            fingerprint = file_fingerprint(path)
            entry |= {"sha256": fingerprint["sha256"], "bytes": fingerprint["size"]}
        found.append(entry)
    return found


def save_tokenized(data: SFTData, dest: str | Path, settings: dict, sources: list[dict]) -> int:
    """Write the splits of `data` and the manifest to `dest` through `hf_sft.writer` (check the destination first).

    Returns:
        The number of examples written.
    """
    import datasets

    from hf_sft.writer import new_folder

    splits = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})}
    parts = {name: _with_bookkeeping(split) for name, split in splits.items()}
    manifest = {
        "version": MANIFEST_VERSION,
        "settings": settings,
        "sources": sources,
        "splits": {name: _split_record(split) for name, split in splits.items()},
    }
    with new_folder(dest, command=SAVE_COMMAND) as staging:
        datasets.DatasetDict(parts).save_to_disk(str(staging))
        # What save_to_disk wrote; the writer's own records (hidden files) are not the dataset's.
        written = (path.relative_to(staging) for path in sorted(staging.rglob("*")) if path.is_file())
        manifest["files"] = {
            name.as_posix(): (staging / name).stat().st_size
            for name in written
            if not any(part.startswith(".") for part in name.parts)
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sum(len(split.index) for split in splits.values())


def load_saved(data_args, tokenizer, template, *, max_seq_len: int | None, val_split: float, seed: int) -> SFTData:
    """The splits saved in `data_args.data_path`, if they were tokenised as this run would tokenise.

    Raises:
        UsageError: the folder was tokenised with other settings (each difference named), does not verify (a file's
            size, a split's count) or cannot be read, or holds a token id beyond the tokenizer's vocabulary.
    """
    import datasets

    folder = Path(data_args.data_path)
    with bad_input(f"--data_path {folder}: cannot read {MANIFEST}"):
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise UsageError(f"--data_path {folder}: {MANIFEST} is not a version {MANIFEST_VERSION} manifest")
    current = run_settings(tokenizer, template, data_args, max_seq_len=max_seq_len, val_split=val_split, seed=seed)
    saved = manifest.get("settings", {})
    differences = [
        f"{SETTING_NAMES[key]} {_shown(key, saved.get(key))} (this run: {_shown(key, value)})"
        for key, value in current.items()
        if saved.get(key) != value
    ]
    if differences:
        raise UsageError(
            f"--data_path {folder} was tokenised for another run: {'; '.join(differences)}. Tokenise it again with "
            f"this run's flags (hf-sft data ... --save_to {folder} --overwrite) or train with the same ones"
        )
    _check_files(folder, manifest)
    with bad_input(f"--data_path {folder}: cannot read the tokenised dataset"):
        loaded = datasets.load_from_disk(str(folder))
    recorded = manifest.get("splits", {})
    if set(loaded) != set(recorded):
        raise UsageError(
            f"--data_path {folder}: holds the splits {', '.join(sorted(loaded))}, its {MANIFEST} records "
            f"{', '.join(sorted(recorded))}: {_REMEDY.format(folder=folder)}"
        )
    for name in loaded:
        if len(loaded[name]) != recorded[name]["examples"]:
            raise UsageError(
                f"--data_path {folder}: its {name} split holds {len(loaded[name])} examples, its {MANIFEST} records "
                f"{recorded[name]['examples']}: {_REMEDY.format(folder=folder)}"
            )
        check_token_ids(loaded[name], len(tokenizer), f"--data_path {folder}: its {name} split")
    splits = {name: _split(loaded[name], recorded[name]) for name in loaded}
    return SFTData(splits["train"], splits.get("eval"))


def check_token_ids(dataset, vocab_size: int, what: str) -> None:
    """Refuse tokenised examples holding a token id that the vocabulary lacks (`input_ids` and supervised `labels`).

    Raises:
        UsageError: "{what} holds token id N; the tokenizer has V tokens (ids 0 to V-1)".
    """
    import pyarrow.compute as pc

    for column in ("input_ids", "labels"):
        values = pc.list_flatten(dataset.data.column(column))
        largest = pc.max(values).as_py()
        if largest is not None and largest >= vocab_size:
            raise UsageError(
                f"{what} holds token id {largest} in {column}; the tokenizer has {vocab_size} tokens "
                f"(ids 0 to {vocab_size - 1}): the model has no embedding for it"
            )


# The end of every refusal of a folder that does not verify.
_REMEDY = (
    "it was changed or cut short after it was saved; write it again (hf-sft data ... --save_to {folder} --overwrite)"
)


def _check_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists is there with its size (a manifest from before sizes were recorded: none)."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise UsageError(f"--data_path {folder}: {MANIFEST} is not a version {MANIFEST_VERSION} manifest")
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise UsageError(f"--data_path {folder}: {name} is missing: {_REMEDY.format(folder=folder)}")
        if path.stat().st_size != size:
            raise UsageError(
                f"--data_path {folder}: {name} is {path.stat().st_size} bytes, {MANIFEST} records {size}: "
                f"{_REMEDY.format(folder=folder)}"
            )


def _shown(key: str, value: Any) -> str:
    if key in ("tokenizer", "format_sha256") and isinstance(value, str):
        return value[:12]
    return "none" if value is None else str(value)


def _split_record(split: TokenizedSplit) -> dict[str, Any]:
    return {
        "source": split.source,
        "examples": len(split.index),
        "status": dict(split.status),
        "skipped": dict(split.skipped),
        "skipped_messages": list(split.skipped_messages),
        "lost_characters": split.lost_characters,
        "records_losing_characters": split.records_losing_characters,
        "supervised_tokens": split.supervised_tokens,
    }


def _with_bookkeeping(split: TokenizedSplit):
    return split.dataset.add_column("index", np.asarray(split.index)).add_column("length", np.asarray(split.lengths))


def _split(dataset, record: dict[str, Any]) -> TokenizedSplit:
    return TokenizedSplit(
        dataset=dataset.select_columns(list(MODEL_COLUMNS)),
        index=np.asarray(dataset.data.column("index").to_numpy(), dtype=np.int64),
        lengths=np.asarray(dataset.data.column("length").to_numpy(), dtype=np.int64),
        status=Counter(record["status"]),
        skipped=Counter(record["skipped"]),
        skipped_messages=list(record["skipped_messages"]),
        source=record["source"],
        lost_characters=record["lost_characters"],
        records_losing_characters=record["records_losing_characters"],
        supervised_tokens=record["supervised_tokens"] if "supervised_tokens" in record else _supervised(dataset),
    )


def _supervised(dataset) -> int:
    """Labels that are not -100, counted from the dataset (a folder saved before its manifest recorded them)."""
    import pyarrow.compute as pc

    labels = dataset.data.column("labels")
    return pc.sum(pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)).as_py() or 0
