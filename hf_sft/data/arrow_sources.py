"""Sources that `datasets` reads into Arrow: JSON lines (parsed by pyarrow), parquet, saved folders, Hub datasets.

Each is first checked vectorised (`hf_sft.data.arrow_records.normalise_in_arrow`); parquet, saved and Hub sources
that it cannot vouch for are validated row by row in `Dataset.map` (messages `SOURCE row N: reason`), JSON lines
go back to the line-by-line reader (`hf_sft.data.text_records`), whose messages name the file and line.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

from hf_sft.data.jsonfile import object_lines
from hf_sft.data.records import Records, check_skipped
from hf_sft.data.shapes import unrecognised_shape
from hf_sft.data.sources import Source
from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)
# Bytes per parse of `load_dataset("json")`, whose first chunk is also parsed into Python objects (to look for mixed
# types): the default 10 MiB makes that a transient of about 50 MB of objects and several seconds.
JSON_CHUNK = 256 << 10


def parsed_in_arrow(
    source: Source, fields: Mapping[str, tuple[str, ...]], cache_dir: str | Path | None, num_proc: int | None
) -> Records | None:
    """JSON lines parsed by `datasets` and checked in Arrow; None when the records must be read one by one."""
    import datasets

    from hf_sft.data.arrow_records import arrow_columns, normalise_in_arrow

    files = [str(path) for path in source.files]
    with _quiet():
        try:
            loaded = datasets.load_dataset(
                "json", data_files=files, split="train", cache_dir=_cache(cache_dir), chunksize=JSON_CHUNK
            )
        except Exception:  # anything pyarrow cannot parse: the line-by-line reader says exactly what and where
            logger.debug("%s: not parsed in Arrow, validating record by record", source.name, exc_info=True)
            return None
        lines = [object_lines(path) for path in source.files]
        if None in lines or len(loaded) != sum(lines):  # not one record per line: the row numbers would not hold
            return None
        columns = arrow_columns(loaded.features, fields, one_name_each=True)
        dataset = normalise_in_arrow(loaded, columns, num_proc) if columns else None
    return Records(dataset=dataset, source=source.name) if dataset is not None else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bar and no parse-error log: an attempt that fails only means "read it line by line", and the
    user's one line is then the line-by-line reader's message."""
    import datasets

    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    level, bars = json_logger.level, not datasets.utils.are_progress_bars_disabled()
    json_logger.setLevel(logging.CRITICAL)
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        json_logger.setLevel(level)
        if bars:
            datasets.utils.enable_progress_bars()


def arrow_records(
    source: Source,
    fields: Mapping[str, tuple[str, ...]],
    skip_bad_records: bool,
    cache_dir: str | Path | None,
    num_proc: int | None,
    hub: dict,
) -> Records:
    """A parquet file or folder, a saved folder or a Hub dataset: checked in Arrow, row by row if need be."""
    import datasets

    from hf_sft.data.arrow_records import arrow_columns, load_datasets_source, normalise_in_arrow, validate_dataset

    if source.kind == "parquet":
        files = [str(path) for path in source.files]
        try:
            dataset = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=_cache(cache_dir))
        except Exception as err:  # a file that is not parquet, or shards whose columns differ
            raise UsageError(f"{source.name}: cannot read the parquet data: {err}") from None
    else:
        dataset = load_datasets_source(source.name, cache_dir, **hub)
    shape = "messages" if "messages" in dataset.column_names else "instruction"
    problem = unrecognised_shape(dataset.column_names, fields)
    if problem:
        raise UsageError(f"{source.name}: {problem}")
    columns = arrow_columns(dataset.features, fields, one_name_each=False) if shape == "instruction" else None
    good = normalise_in_arrow(dataset, columns, num_proc) if columns else None
    if good is not None:
        return Records(dataset=good, source=source.name)
    good, skipped, examples = validate_dataset(dataset, fields, shape, num_proc)
    records = Records(dataset=good, source=source.name, skipped=skipped)
    records.skipped_messages = [f"{_row_location(source, row)}: {message}" for row, message in examples]
    check_skipped(records, len(good), skip_bad_records)
    return records


def _row_location(source: Source, row: int) -> str:
    """`SOURCE row N`; for parquet shards, the shard and the row in it."""
    if len(source.files) > 1:
        import pyarrow.parquet as pq

        for path in source.files:
            rows = pq.ParquetFile(path).metadata.num_rows
            if row < rows:
                return f"{path} row {row}"
            row -= rows
    return f"{source.files[0] if source.files else source.name} row {row}"


def _cache(cache_dir: str | Path | None) -> str | None:
    return str(cache_dir) if cache_dir else None
