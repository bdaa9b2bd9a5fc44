#!/usr/bin/env bash
# One-GPU check, under 8 minutes on an H100/H200-class GPU:
#   1. packed attention on the GPU (torch's varlen flash kernel in bf16, the device-built document mask in fp32)
#      equals attention example by example (SDPA on each example alone), for both model families;
#   2. bf16 training with packing of a 124M-parameter model of each family, at the seed's defaults (micro-batch 2 x
#      accumulation 8) and at micro-batch 16, for 200 optimizer steps, `hf-sft train` against TRL's SFTTrainer on the
#      same model and records: real tokens/s, MFU against the GPU's bf16 dense peak, peak GPU memory.
#
#   bash scripts/check_gpu.sh [output-dir]        # figures also in <output-dir>/gpu_throughput.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/hf_sft_gpu_check}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"

echo "== packed attention on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
python3 - <<'EOF'
import torch

from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM
from hf_sft.packing_hfsft_gpt import fast_attention_layout

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
families = {"nanogpt": {"family": "nanogpt"}, "llama": {"family": "llama", "num_key_value_heads": 2}}
lengths = [37, 130, 5, 300, 64]
for name, extra in families.items():
    torch.manual_seed(0)
    config = HfSftGPTConfig(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, **extra)
    model = HfSftGPTForCausalLM(config).cuda().eval()
    ids = torch.randint(0, 512, (1, sum(lengths)), device="cuda")
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    for dtype, expected, tolerance in ((torch.bfloat16, "varlen", 5e-2), (torch.float32, "document_mask", 1e-4)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            embeds = model.model.embed_tokens(ids)
            layout = fast_attention_layout(config, embeds, None, positions, model.training)
            kind = "varlen" if "cu_seq_lens" in layout[1] else "document_mask" if layout[0] is not None else "other"
            assert kind == expected, f"{name} {dtype}: packed rows took {kind}, expected {expected}"
            packed = model(ids, position_ids=positions).logits.float()
            # Each example alone, through the masked path: plain SDPA, independent of the packed kernels.
            parts = ids.split(lengths, dim=1)
            alone = torch.cat([model(p, attention_mask=torch.ones_like(p)).logits.float() for p in parts], dim=1)
        error = (packed - alone).abs().max().item()
        print(f"{name:8} {str(dtype)[6:]:9} {kind:14} max |packed - per example| = {error:.2e}")
        assert error <= tolerance, f"{name} {dtype}: {error} > {tolerance}"
EOF

echo "== training throughput: hf-sft train (a) vs TRL SFTTrainer (c), bf16, packing for (a)"
python3 scripts/benchmark_throughput.py --device cuda --models nanogpt124m,llama124m --dtypes bfloat16 \
  --points 2x8,16x1 --stacks ac --bf16_stacks ac --repeats 1 --warmup 10 --steps 200 --records 3400 \
  --peak_seconds 1 --json "$OUT/gpu_throughput.json"

echo "== MFU against the bf16 dense peak of the datasheet"
python3 - "$OUT/gpu_throughput.json" <<'EOF'
import json
import sys

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets (SXM parts).
DATASHEET = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}
name = torch.cuda.get_device_name()
peak = next((tflops for key, tflops in DATASHEET.items() if key in name), None)
summary = json.load(open(sys.argv[1]))
measured = summary.pop("peaks")["bfloat16"] / 1e3
peak = peak or measured
print(f"{name}: bf16 dense peak {peak:.0f} TFLOP/s (measured matmul {measured:.0f})")
print(f"{'run':<28}{'stack':>6}{'real tok/s':>12}{'MFU':>8}{'peak GPU MiB':>14}{'final loss':>12}")
for run, figures in summary.items():
    for stack, m in figures["medians"].items():
        mfu = 6 * figures["params"] * m["real_tok_s"] / (peak * 1e12)
        line = f"{run:<28}{stack:>6}{m['real_tok_s']:>12.0f}{mfu:>8.1%}{m['peak_gpu_mb']:>14.0f}"
        print(line + f"{m['final_loss']:>12.4f}")
EOF
