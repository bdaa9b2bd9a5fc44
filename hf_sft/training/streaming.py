"""A `--streaming` run: the Trainer arguments a stream needs, and the stream's position kept in every checkpoint.

Trainer needs `max_steps` for a dataset without a length: given none, it is computed from `--num_epochs` and the
number of training records, as a map-style run computes it from its number of examples. Several processes each read
the whole stream and keep their share of each batch (accelerate's `IterableDatasetShard`, with `dispatch_batches`
off: a packed batch is one row and cannot be split across processes after collation).

Trainer would replay the consumed batches of an iterable dataset on resume (reading and tokenising them again); a
streaming run switches that replay off (`ignore_data_skip`) and starts its stream at the recorded position instead.
The position lives in `trainer_state.json` (as an `ExportableState` callback's state), so it is written with the
checkpoint, atomically, and read back before the stream starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hf_sft.data import StreamedSplit, StreamingExamples
from hf_sft.errors import UsageError

logger = logging.getLogger("hf_sft.train")
# Orders that need every example's length before the first step.
UNSTREAMABLE_ORDERS = ("group_by_length", "batch_rebalance")


def check_streaming(args) -> None:
    """Refuse, before any work, what a stream cannot do.

    Raises:
        UsageError: length grouping, or data loader workers (the stream's position is tracked in this process).
    """
    strategy = _sampling(args)
    if strategy in UNSTREAMABLE_ORDERS:
        raise UsageError(
            f"--train_sampling_strategy {strategy} needs every example's length before the first step and cannot "
            "stream: drop --streaming or choose random or sequential"
        )
    if args.dataloader_num_workers:
        raise UsageError("--streaming reads its stream in the training process: --dataloader_num_workers must be 0")


def streaming_arguments(args, split: StreamedSplit):
    """The run's arguments for the stream of `split` (see the module docstring); a sequential order set on it."""
    split.dataset.shuffle = _sampling(args) != "sequential"
    records = split.records
    changes = {"ignore_data_skip": True}  # the stream starts at its recorded position instead of replaying
    if args.max_steps <= 0:
        batches = math.ceil(records / (args.per_device_train_batch_size * args.world_size))
        changes["max_steps"] = math.ceil(args.num_train_epochs * batches / args.gradient_accumulation_steps)
        logger.info(
            "--streaming: %d steps for %s epochs of %d records", changes["max_steps"], args.num_train_epochs, records
        )
    args = dataclasses.replace(args, **changes)
    args.accelerator_config.dispatch_batches = False
    return args


def _sampling(args) -> str:
    return str(getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy))


def stream_line(role: str, split: StreamedSplit) -> str:
    """The log line of a streamed split (`split_line`'s twin: drops are counted as the stream reads)."""
    skipped = sum(split.skipped.values())
    line = f"{role} data: streaming {split.records} records from {split.source}, tokenised as consumed"
    return line + (f"; skipped {skipped} bad record{'s' if skipped != 1 else ''}" if skipped else "")


def examples_per_step(args) -> int:
    """Examples one optimizer step takes from the stream (each process reads all of them and keeps its share)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


class StreamPositionCallback(TrainerCallback, ExportableState):
    """Records, in each checkpoint's `trainer_state.json`, where the stream stands after the checkpoint's step.

    Args:
        stream: the training `StreamingExamples`.
        examples_per_step: examples one optimizer step consumes from the stream (batch size x accumulation x
            processes: every process reads the whole stream and keeps its share).
    """

    def __init__(self, stream: StreamingExamples, examples_per_step: int):
        self.stream = stream
        self.examples_per_step = examples_per_step
        stream.keep_positions(4 * examples_per_step + 2 * stream.chunk_size)
        self.first_step = self.step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        status = self.stream.status
        dropped = ", ".join(
            f"{n} {key.removeprefix('drop:')}" for key, n in sorted(status.items()) if key.startswith("drop:")
        )
        logger.info(
            "streamed %d records: %d dropped (%s)",
            self.stream.tokenized,
            sum(n for key, n in status.items() if key.startswith("drop:")),
            dropped or "none",
        )

    def state(self) -> dict:
        epoch, position = self.stream.position_after((self.step - self.first_step) * self.examples_per_step)
        return {
            "args": {"examples_per_step": self.examples_per_step},
            "attributes": {"epoch": epoch, "position": position},
        }


def recorded_position(checkpoint: str | Path) -> tuple[int, int]:
    """The stream position a checkpoint of a `--streaming` run recorded.

    Raises:
        UsageError: the checkpoint holds no stream position (it is not one of a `--streaming` run).
    """
    state_file = Path(checkpoint) / "trainer_state.json"
    try:
        saved = json.loads(state_file.read_text(encoding="utf-8"))["stateful_callbacks"][
            StreamPositionCallback.__name__
        ]
        return int(saved["attributes"]["epoch"]), int(saved["attributes"]["position"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{checkpoint} holds no stream position: it is not a checkpoint of a --streaming run"
        ) from None
