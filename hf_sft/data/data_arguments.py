"""The data arguments: what the examples are. `hf-sft train` and `hf-sft data` both parse `DataArguments`, so the
two commands read the data the same way; `hf_sft.data.pipeline.build_run_datasets` turns them into datasets.

Every default is stated once, in its `field(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_sft.data.masking import LENGTH_POLICIES
from hf_sft.data.sources import DEFAULT_SPLIT
from hf_sft.data.template import DEFAULT_FORMAT, FORMATS


@dataclass
class DataArguments:
    """What the examples are: the source, its fields, the prompt format, the split and the length limit."""

    # One source is kept as a plain string (as run_args.json of earlier runs holds it), several as a list.
    data_path: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training data: one or more sources, each a .jsonl/.json/.csv file (also .gz), a .parquet file, "
            "a folder of such files, a save_to_disk folder, a folder of `hf-sft data --save_to` or a Hub dataset "
            "id; several are concatenated, or mixed by --data_weights (hf_sft/data/sources.py)."
        },
    )
    data_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Mixing weights, one per --data_path source: records interleaved under --seed."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset: its configuration."})
    dataset_split: str = field(
        default=DEFAULT_SPLIT, metadata={"help": "Hub dataset or saved DatasetDict: the split to train on."}
    )
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub dataset: a branch, tag or commit."})
    field_map: str | None = field(
        default=None, metadata={"help": "Source field names, e.g. instruction=question,output=answer."}
    )
    eval_data_path: str | None = field(default=None, metadata={"help": "Separate evaluation file (else --val_split)."})
    val_split: float = field(default=0.05, metadata={"help": "Fraction of the data held out for evaluation."})
    max_seq_len: int | None = field(default=None, metadata={"help": "Longest example in tokens (default: model max)."})
    length_policy: str = field(
        default="drop",
        metadata={"help": "Examples longer than max_seq_len (hf_sft/data/masking.py).", "choices": LENGTH_POLICIES},
    )
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip invalid records (and count them)."})
    num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes for validation and tokenisation.", "aliases": ["--dataset_num_proc"]},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Train from the data read and tokenised as consumed (constant memory; the map-style order "
            "and losses; exact resume). See docs/data.md, 'Streaming'."
        },
    )
    template: str = field(
        default=DEFAULT_FORMAT.name,
        metadata={"help": f"Prompt format: {', '.join(FORMATS)}, or the path of a Jinja chat template file."},
    )

    def __post_init__(self):
        if isinstance(self.data_path, list | tuple) and len(self.data_path) == 1:
            self.data_path = self.data_path[0]

    def data_paths(self) -> list[str]:
        """The `--data_path` sources as a list (empty when none is given)."""
        if not self.data_path:
            return []
        return [self.data_path] if isinstance(self.data_path, str) else list(self.data_path)

    def input_paths(self) -> list[Path]:
        """The local files and folders these arguments read (data, eval data, a Jinja template): what a command
        declares to `hf_sft.writer.check_destination` as its sources. Hub ids and format names are left out."""
        given = (*self.data_paths(), self.eval_data_path, self.template)
        return [Path(path) for path in given if path and Path(path).exists()]
