"""Test instrumentation for multi-process launches, loaded by every process when this folder is on PYTHONPATH.

With HF_SFT_RANK0_LOGITS set, `Trainer.train` is followed by one forward pass of the trained model on fixed tokens
(a collective under FSDP and ZeRO-3, so every rank runs it) and rank 0 saves its logits to that path. The training
itself, its callbacks and its final save are the product's, untouched.
"""

import os

# LOCAL_RANK: only in the training processes that the launcher starts, not in the launcher itself.
if os.environ.get("HF_SFT_RANK0_LOGITS") and "LOCAL_RANK" in os.environ:
    import torch
    import transformers

    PROBE_IDS = torch.arange(3, 35).unsqueeze(0)
    _train = transformers.Trainer.train

    def _train_then_probe(self, *args, **kwargs):
        result = _train(self, *args, **kwargs)
        model = self.model_wrapped
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=PROBE_IDS.to(self.args.device)).logits
        if self.is_world_process_zero():
            torch.save(logits.cpu(), os.environ["HF_SFT_RANK0_LOGITS"])
        return result

    transformers.Trainer.train = _train_then_probe
