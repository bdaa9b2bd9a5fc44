"""What a data source can be, and how each kind is opened: the one place that knows the input kinds.

A `--data_path` entry is one of:

- a local file: `.jsonl` (JSON lines), `.json` (an array of objects, or JSON lines), `.csv` (a header row, then one
  record per row) or `.parquet`; the three text kinds may be gzip-compressed (`.jsonl.gz`, `.json.gz`, `.csv.gz`);
- a folder of such files, all of one kind: shards of one source, read in name order (subfolders included, hidden
  files and files of other kinds, such as a README, ignored);
- a folder written by `Dataset.save_to_disk` (a `DatasetDict`'s split chosen with `--dataset_split`);
- a Hub dataset id (`owner/name`), loaded with `datasets.load_dataset` and `--dataset_config`, `--dataset_split`,
  `--dataset_revision`.

Records of the text kinds are located as `FILE:LINE` in messages (the line where a record starts), those of
parquet files and `datasets` objects as `SOURCE row N` (0-based).

What a source holds is fingerprinted here too (`source_fingerprint`): a local source by the size and sha256 of each of
its files, its path resolved; a Hub dataset by its resolved revision. A checkpoint records the fingerprints of its
run's sources and a resume compares them (`fingerprint_changes`).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hf_sft.errors import UsageError

TEXT_KINDS = ("jsonl", "json", "csv")
FILE_KINDS = (*TEXT_KINDS, "parquet")
COMPRESSIONS = {".gz": gzip.open}
# What `Dataset.save_to_disk` / `DatasetDict.save_to_disk` leave in a folder.
DATASETS_FOLDER_MARKERS = ("state.json", "dataset_dict.json")
DEFAULT_SPLIT = "train"
SUFFIXES = (*(f".{kind}{gz}" for kind in TEXT_KINDS for gz in ("", *COMPRESSIONS)), ".parquet")
# A Hub id as `owner/name`: the one pattern of it (a local path that does not exist is taken for one).
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CHUNK = 1 << 20
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Source:
    """One resolved `--data_path` entry.

    Attributes:
        name: as the user gave it (used in messages).
        kind: `jsonl`, `json`, `csv`, `parquet` (local files), `saved` (a `save_to_disk` folder) or `hub`.
        files: the local files of the file kinds, in reading order (one, or a folder's shards).
    """

    name: str
    kind: str
    files: tuple[Path, ...] = ()

    @property
    def is_text(self) -> bool:
        """Records located by file and line (`FILE:LINE`)."""
        return self.kind in TEXT_KINDS


def file_kind(path: Path) -> str | None:
    """The kind of a data file from its name (`data.jsonl.gz` -> `jsonl`), or None for other files."""
    name = path.name.lower()
    for compression in COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
            kind = name.rpartition(".")[2]
            return kind if "." in name and kind in TEXT_KINDS else None
    kind = name.rpartition(".")[2]
    return kind if "." in name and kind in FILE_KINDS else None


def resolve_source(data: str | Path) -> Source:
    """Which kind of source `data` is, and its files.

    Raises:
        UsageError: a missing path, a file of an unsupported kind, a folder with no data file or files of several
            kinds.
    """
    path, name = Path(data), str(data)
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASETS_FOLDER_MARKERS):
            return Source(name, "saved")
        return _shards(path)
    if not path.exists():
        if HUB_ID.match(name) and not _looks_like_a_file(path):
            return Source(name, "hub")
        raise UsageError(f"data file not found: {path}")
    kind = file_kind(path)
    if kind is None:
        double = len(path.suffixes) > 1 and path.suffixes[-2][1:].lower() in FILE_KINDS  # data.jsonl.bz2
        suffix = "".join(path.suffixes[-2:]) if double else path.suffix
        raise UsageError(f"{path}: unsupported extension {suffix or '(none)'!r}; use {', '.join(SUFFIXES)}")
    return Source(name, kind, (path,))


def folder_problem(path: Path) -> str | None:
    """Why a folder cannot be a data source (no data file, several kinds), or None when it can."""
    try:
        resolve_source(path)
    except UsageError as err:
        return str(err)
    return None


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends with a compression suffix."""
    opener = COMPRESSIONS.get(path.suffix.lower())
    return opener(path, "rb") if opener else path.open("rb")


def content_key(files: tuple[Path, ...]) -> str:
    """A sha256 of the files' bytes (read in chunks: memory stays flat whatever their size)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0".encode())
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """A file's size and the sha256 of its bytes, read in blocks (memory stays flat whatever its size)."""
    path = Path(path)
    with path.open("rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": sha256}


def source_fingerprint(data: str | Path, revision: str | None = None) -> dict[str, Any]:
    """What identifies the content of one `--data_path` entry.

    A local source: `path` resolved (absolute) and `files`, each file's size and sha256 by its path relative to the
    source (a file: its name; a folder of shards: its data files; a `save_to_disk` folder: every file). A Hub
    dataset: `path` as given and `revision`, the commit `revision` resolves to (as given where the Hub cannot be
    reached).
    """
    source = resolve_source(data)
    if source.kind == "hub":
        return {"path": source.name, "revision": _hub_revision(source.name, revision)}
    path = Path(data).resolve()
    if source.kind == "saved":
        members = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        members = [Path(f).resolve() for f in source.files]
    root = path if path.is_dir() else path.parent
    return {"path": str(path), "files": {p.relative_to(root).as_posix(): file_fingerprint(p) for p in members}}


def fingerprint_changes(recorded: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    """What differs between two runs' source fingerprints (`source_fingerprint` of each source), one phrase each."""
    changes = []
    now = {entry["path"]: entry for entry in current}
    for before in recorded:
        name, after = before["path"], now.get(before["path"])
        if after is None:
            changes.append(f"{name} is no longer a source of the run")
        elif "revision" in before or "revision" in after:
            # Only two commits compare: a revision the Hub could not resolve (offline) says nothing of the content.
            revisions = before.get("revision"), after.get("revision")
            if all(_COMMIT.match(str(r)) for r in revisions) and revisions[0] != revisions[1]:
                changes.append(f"{name}: revision {revisions[0]} is now {revisions[1]}")
        else:
            changes += _file_changes(name, before["files"], after["files"])
    known = {entry["path"] for entry in recorded}
    changes += [f"{entry['path']} is a new source" for entry in current if entry["path"] not in known]
    return changes


def _file_changes(source: str, before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    changes = []
    for name in sorted(before.keys() | after.keys()):
        where = source if Path(source).name == name and not Path(source).is_dir() else f"{source}/{name}"
        old, new = before.get(name), after.get(name)
        if new is None:
            changes.append(f"{where} was removed")
        elif old is None:
            changes.append(f"{where} was added")
        elif old["size"] != new["size"]:
            changes.append(f"{where}: {old['size']} bytes, now {new['size']} (content differs)")
        elif old["sha256"] != new["sha256"]:
            changes.append(f"{where}: same size ({new['size']} bytes), content differs (sha256)")
    return changes


def _hub_revision(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub dataset's revision resolves to, or the revision as given where the Hub cannot say."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo_id, revision=revision).sha or revision
    except Exception:  # offline, no such repo, no network: the load that follows reports it
        return revision


def _shards(folder: Path) -> Source:
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)) and file_kind(p)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    kinds = sorted({file_kind(p) for p in files})
    if not files:
        raise UsageError(
            f"{folder} is a folder with no data file ({', '.join(SUFFIXES)}) and no dataset written by "
            "`Dataset.save_to_disk`"
        )
    if len(kinds) > 1:
        raise UsageError(f"{folder} holds data files of several kinds ({', '.join(kinds)}); a folder is one kind")
    return Source(str(folder), kinds[0], tuple(files))


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _looks_like_a_file(path: Path) -> bool:
    return path.suffix.lower() in {*(f".{kind}" for kind in FILE_KINDS), *COMPRESSIONS}
