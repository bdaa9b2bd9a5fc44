"""Measure a fine-tuned model on held-out data, per category, against its base (same as `hf-sft eval`).

python scripts/eval.py out/finetune --data_path data/dolly_test.jsonl
python scripts/eval.py out/finetune --data_path data/dolly.jsonl --val_split 0.05 --compare models/base
"""

import sys

from hf_sft.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
