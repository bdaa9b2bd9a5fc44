"""What hf_sft adds to each checkpoint Trainer writes: `run_args.json`, and the model files a resume builds from.

One owner for them all, called while the checkpoint is still staged (`hf_sft.training.staged_save`):

- `run_args.json`, the run's arguments (`hf_sft.training.resume`).
- The model's `config.json` and the tokenizer where the engine's checkpoint lacks them, as a sharded one (FSDP,
  ZeRO-3) may: resuming builds the model from them.
- Under FSDP2, the config, model code and tokenizer written again from our own model class. Trainer gets them wrong
  there: with SHARDED_STATE_DICT it writes only the weight and optimizer shards, and with FULL_STATE_DICT it saves
  the model through FSDP2's subclass of our class, so the folder receives torch's FSDP source files and an
  `auto_map` naming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hf_sft.training.resume import RUN_ARGS_FILE
from hf_sft.training.sharded_save import code_files, write_model_files
from hf_sft.writer import write_text


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
