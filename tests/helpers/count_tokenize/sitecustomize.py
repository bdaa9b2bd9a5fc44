"""Test instrumentation for multi-process launches, loaded by every process when this folder is on PYTHONPATH.

With HF_SFT_TOKENIZE_LOG set, every call of `tokenize_and_mask` in a training process appends that process's pid to
the file it names, so a test can count which processes tokenised. The tokenisation itself is the product's.
"""

import os

# LOCAL_RANK: only in the training processes that the launcher starts, not in the launcher itself.
if os.environ.get("HF_SFT_TOKENIZE_LOG") and "LOCAL_RANK" in os.environ:
    import hf_sft.data.pipeline as pipeline

    _tokenize_and_mask = pipeline.tokenize_and_mask

    def _logged(*args, **kwargs):
        with open(os.environ["HF_SFT_TOKENIZE_LOG"], "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()}\n")
        return _tokenize_and_mask(*args, **kwargs)

    pipeline.tokenize_and_mask = _logged  # the name `tokenize_records` maps with
