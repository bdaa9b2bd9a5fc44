"""Local text files (JSON lines, JSON arrays, CSV; gzip-compressed too) validated record by record as they stream.

Each record is read (`hf_sft.data.line_reader`), checked (`hf_sft.data.records.RecordChecker`) and, when valid,
written normalised (`index` plus the shape's columns) to a JSONL copy in the `datasets` cache; nothing per record
stays in memory, so memory is flat in the size of the source. The copy is named by a hash of the source's bytes
(read in chunks), the field names and this code, and a summary beside it keeps the skip counts and messages and what
verifies the copy (its size and sha256): a rerun reuses both without reading the source again once the copy
verifies, and `load_dataset("json")` of the copy hits its own cache. A copy that does not verify (cut short, changed,
or its summary unreadable) is rebuilt from the source, with a warning. A bad record is reported as
`FILE:LINE: reason`, the line being where the record starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hf_sft.data import line_reader, records
from hf_sft.data.records import RecordChecker, Records, check_skipped, normalised_features
from hf_sft.data.sources import Source, content_key
from hf_sft.errors import UsageError
from hf_sft.writer import new_file, write_json

logger = logging.getLogger(__name__)

COPY_FOLDER = "hf_sft_records"


def load_text_records(
    source: Source, fields: Mapping[str, tuple[str, ...]], skip_bad_records: bool, cache_dir: str | Path | None
) -> Records:
    """Validate the records of local text files and load the valid ones (see the module docstring).

    Raises:
        UsageError: an empty source, a record of no known shape, a file mixing shapes, a bad record unless skipped,
            or no valid record at all.
    """
    import datasets

    root = cache_root(cache_dir)
    target = root / COPY_FOLDER / f"records-{_key(source, fields)}.jsonl"
    summary_path = target.with_suffix(".summary.json")
    summary = _verified_summary(target, summary_path, source)
    if summary is None:
        summary = _write_copy(source, fields, target)
        write_json(summary_path, summary)
    found = Records(None, source.name, Counter(summary["skipped"]), summary["messages"])
    check_skipped(found, summary["good"], skip_bad_records)
    found.dataset = datasets.load_dataset(
        "json",
        data_files=str(target),
        split="train",
        features=normalised_features(summary["shape"]),
        cache_dir=str(root),
    )
    return found


def cache_root(cache_dir: str | Path | None) -> Path:
    """The folder the records' copies (and `datasets`' own cache files) go to: `cache_dir`, else `datasets`' cache."""
    import datasets

    return Path(cache_dir) if cache_dir else Path(datasets.config.HF_DATASETS_CACHE)


def located_rows(source: Source) -> Iterator[tuple[Path, int, Any]]:
    """`(file, line, parsed value or BadRecord)` per record of the source's files, in order."""
    for path in source.files:
        for line, value in line_reader.iter_records(path):
            yield path, line, value


def _write_copy(source: Source, fields: Mapping[str, tuple[str, ...]], target: Path) -> dict[str, Any]:
    """Stream the source into the normalised copy; return the summary (counts, first messages, shape)."""
    checker = RecordChecker(fields)
    good, index, size, digest = 0, -1, 0, hashlib.sha256()
    with new_file(target) as partial, partial.open("wb") as out:
        for index, (path, line, obj) in enumerate(located_rows(source)):
            record = checker.check(path, line, obj)
            if record is not None:
                data = (json.dumps({"index": index, **record}, ensure_ascii=False) + "\n").encode("utf-8")
                out.write(data)
                digest.update(data)
                size += len(data)
                good += 1
        if index < 0:
            raise UsageError(f"{source.name} is empty")
    shape = checker.shape or "instruction"
    copy = {"bytes": size, "sha256": digest.hexdigest()}
    return {"shape": shape, "good": good, "skipped": dict(checker.skipped), "messages": checker.messages, "copy": copy}


def _verified_summary(target: Path, summary_path: Path, source: Source) -> dict[str, Any] | None:
    """The summary of a copy that is whole (its size and sha256 as recorded), else None (after a warning when there
    was a copy to reuse)."""
    if not target.is_file() and not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        recorded = summary["copy"]
        problem = None
        if target.stat().st_size != recorded["bytes"]:
            problem = f"{target.stat().st_size} bytes, {recorded['bytes']} written"
        else:
            with target.open("rb") as handle:
                if hashlib.file_digest(handle, "sha256").hexdigest() != recorded["sha256"]:
                    problem = "its content changed since it was written"
    except FileNotFoundError as err:
        problem = f"{err.filename} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        problem = f"{summary_path.name} is unreadable or from an older hf_sft"
    if problem is None:
        return summary
    logger.warning("the records cache %s does not verify (%s): rebuilding it from %s", target, problem, source.name)
    return None


def _key(source: Source, fields: Mapping[str, tuple[str, ...]]) -> str:
    # The paths too: the summary's messages name the files.
    paths = json.dumps([str(Path(path).resolve()) for path in source.files])
    digest = hashlib.sha256(
        f"{content_key(source.files)}|{paths}|{source.kind}|{json.dumps(fields, sort_keys=True)}".encode()
    )
    for module in (line_reader, records):  # a change to the checks must not reuse an old copy
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:24]
