"""Fine-tune a GPT on instruction data with transformers' Trainer (the same as `hf-sft train`).

    python scripts/train.py                                   # built-in demo: tiny new model, CPU, a few minutes
    accelerate launch scripts/train.py --config configs/dolly.yaml
    accelerate launch scripts/train.py --config configs/dolly.yaml --learning_rate 1e-4 --max_iters 500
    accelerate launch --config_file configs/accelerate/fsdp2.yaml scripts/train.py --config configs/dolly.yaml
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml scripts/train.py --device cpu ...

Every YAML key can be overridden on the command line; `--help` lists every flag.
"""

import sys

from hf_sft.cli import main

if __name__ == "__main__":
    sys.argv.insert(1, "train")  # `main()` without arguments: this process ends with it (hf_sft.cli)
    sys.exit(main())
