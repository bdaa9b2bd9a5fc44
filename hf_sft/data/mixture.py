"""Several sources as one: concatenated in the order given, or mixed by weight (`--data_weights`).

Each source is loaded and validated on its own (`hf_sft.data.pipeline.load_records`). Without weights the records
follow one another; with weights they are interleaved by `datasets.interleave_datasets`: each next record comes from
source i with probability weight_i / sum(weights) under the seed (the same seed gives the same mixture), until one
source runs out (`first_exhausted`: no record is repeated, and the shares hold for the whole mixture).

A record's `index` stays the position of its record in the sources taken in order: a record of the second source
counts on from the records (valid or not) of the first, so `--dump` and the messages point at one record each.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from hf_sft.data.records import MESSAGES_KEPT, Records
from hf_sft.errors import UsageError

logger = logging.getLogger(__name__)
STOPPING_STRATEGY = "first_exhausted"


def check_weights(weights: Sequence[float] | None, n_sources: int) -> list[float] | None:
    """The mixing probabilities (weights scaled to sum to 1), or None to concatenate.

    Raises:
        UsageError: not one weight per source, or a weight that is not a positive finite number.
    """
    if weights is None:
        return None
    weights = list(weights)
    if len(weights) != n_sources:
        raise UsageError(f"--data_weights gives {len(weights)} weights for {n_sources} --data_path sources")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise UsageError(f"--data_weights must be positive numbers, got {' '.join(map(str, weights))}")
    return [w / sum(weights) for w in weights]


def load_mixture(
    sources: list[str | Path], weights: Sequence[float] | None, seed: int, load: Callable[[str | Path], Records]
) -> Records:
    """The records of several sources, concatenated or mixed (see the module docstring).

    Args:
        sources: the `--data_path` entries.
        weights: `--data_weights`, or None.
        seed: seed of the mixing.
        load: loads one source (`load_records` with the run's options).
    """
    import datasets

    if not sources:
        raise UsageError("--data_path names no source")
    probabilities = check_weights(weights, len(sources))
    if len(sources) == 1 and probabilities is None:
        return load(sources[0])
    parts = [load(source) for source in sources]
    shapes = {"messages" if "messages" in part.dataset.column_names else "instruction" for part in parts}
    if len(shapes) > 1:
        raise UsageError("the --data_path sources mix instruction records and messages records; use one shape")
    offset, shifted = 0, []
    for part in parts:
        shifted.append(_shift_index(part.dataset, offset))
        offset += len(part.dataset) + sum(part.skipped.values())
    if probabilities is None:
        dataset = datasets.concatenate_datasets(shifted)
    else:
        dataset = datasets.interleave_datasets(
            shifted, probabilities=probabilities, seed=seed, stopping_strategy=STOPPING_STRATEGY
        )
        logger.info(
            "mixture of %s: %d records",
            ", ".join(f"{p.source} ({w:.3g})" for p, w in zip(parts, probabilities, strict=True)),
            len(dataset),
        )
    skipped = sum((part.skipped for part in parts), Counter())
    messages = [message for part in parts for message in part.skipped_messages][:MESSAGES_KEPT]
    return Records(dataset, " + ".join(part.source for part in parts), skipped, messages)


def _shift_index(dataset, offset: int):
    if not offset:
        return dataset
    return dataset.with_format("arrow").map(_shifted, batched=True, fn_kwargs={"offset": offset}).with_format(None)


def _shifted(batch, offset: int):
    import pyarrow.compute as pc

    column = batch.schema.get_field_index("index")
    return batch.set_column(column, "index", pc.add(batch.column(column), offset))
