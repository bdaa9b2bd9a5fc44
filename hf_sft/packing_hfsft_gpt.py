"""How each batch is attended: transformers' causal mask, or for training layouts that need none, a packed kernel.

With SDPA, two training layouts skip `create_causal_mask`:

- a right-padded training batch (CPU): plain causal attention gives real tokens the same outputs;
- a padding-free packed row (`position_ids` restarting at 0 per example, no `attention_mask`): attention stays
  inside each example, through the kernel `packed_attention_kind` picks for the device: one causal SDPA call per
  example ("segments", CPU; under `torch.compile` inside one opaque operator), torch's variable-length flash kernel
  ("varlen", CUDA in half precision) or a block-diagonal mask built on the device ("document_mask", anywhere).

Off the CPU nothing here reads a device tensor on the host, so a training step never waits for the device to choose
its kernel. This file imports only torch and transformers: Hub users execute it beside `modeling_hfsft_gpt.py`.
"""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # torch >= 2.10: variable-length flash attention for packed rows on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`; older 5.x releases
# pass and read `past_key_values`.
CACHE_FIELD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def attention_inputs(
    config: PretrainedConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor, cache: Cache | None, training: bool, output_attentions: bool,
) -> tuple[torch.Tensor | None, dict]:  # fmt: skip
    """The mask every layer attends with, and the kwargs that select a packed kernel (empty for the configured one).

    A batch continuing a cache, asking for attention weights (the eager path needs the full mask) or not recognised
    by `fast_attention_layout` gets `create_causal_mask`'s mask. The arguments are the base model forward's.
    """
    layout = None
    if cache is None and not output_attentions:
        layout = fast_attention_layout(config, inputs_embeds, attention_mask, position_ids, training)
    if layout is not None:
        return layout
    # By keyword: the cache's is `cache` from transformers 5.24, `past_key_values` before (keyword-only there).
    mask = create_causal_mask(
        config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
        **{CACHE_FIELD: cache},
    )  # fmt: skip
    return mask, {}


def fast_attention_layout(
    config: PretrainedConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor, training: bool,
) -> tuple[torch.Tensor | None, dict] | None:  # fmt: skip
    """`(mask, attention kwargs)` for a batch that SDPA attends without `create_causal_mask`, else None.

    Args:
        config: the model config (its `_attn_implementation` and `attention_dropout`).
        inputs_embeds: (B, T, D) input embeddings: their device and dtype pick the packed kernel.
        attention_mask: the 2-D padding mask, or None.
        position_ids: (B, T) positions.
        training: the model is in training mode (pad positions may then be left unspecified).

    Returns:
        `(None, {})` for plain causal attention, `(None, kernel kwargs)` or `(block-diagonal mask, {})` for a packed
        row, or None where the batch needs the masked path (left padding, custom positions, other attention).
    """
    # The kernels here stand in for transformers' own SDPA function only: a replaced one (DeepSpeed's Ulysses
    # sequence parallelism wraps it to exchange sequence shards) must see every call.
    if config._attn_implementation != "sdpa" or ALL_ATTENTION_FUNCTIONS.get("sdpa") is not sdpa_attention_forward:
        return None
    if attention_mask is not None:
        return (None, {}) if training and is_right_padded(attention_mask, position_ids) else None
    if position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    device = inputs_embeds.device
    autocast = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
    half = inputs_embeds.dtype in (torch.float16, torch.bfloat16) or autocast
    kind = packed_attention_kind(device, half, config.attention_dropout if training else 0.0)
    if kind == "segments" and not compiling():
        lengths = segment_lengths(position_ids[0])
        return None if lengths is None else (None, {"segment_lengths": lengths})
    document_ids = packed_document_ids(position_ids)
    if kind == "segments":  # traced: the operator reads the lengths when it runs
        return None, {"segment_document_ids": document_ids}
    if kind == "varlen":
        return None, {"cu_seq_lens": varlen_boundaries(document_ids), "max_length": position_ids.shape[1]}
    return document_causal_mask(document_ids), {}


def packed_attention_interface(attention_kwargs: dict) -> Callable | None:
    """The kernel that the kwargs of `fast_attention_layout` ask for, or None (the configured attention).

    A caller that asks for plain causal attention gets it: accelerate's context parallelism drops the mask and passes
    `is_causal=True`, and its ring attention exchanges the sequence shards inside SDPA only.
    """
    if attention_kwargs.get("is_causal"):
        return None
    if attention_kwargs.get("segment_lengths") is not None:
        return segmented_sdpa_attention
    if attention_kwargs.get("segment_document_ids") is not None:
        return traced_segments_attention
    if attention_kwargs.get("cu_seq_lens") is not None:
        return varlen_attention
    return None


def is_right_padded(attention_mask: torch.Tensor, position_ids: torch.Tensor) -> bool:
    """Whether every row is real tokens then padding, at positions 0, 1, ...: then causal attention is exact for them.

    Deciding reads the mask on the host: free on the CPU; elsewhere every forward would wait for the device, so there
    (and under `torch.compile`, which cannot trace the read) the answer is False: the batch keeps the masked path.
    """
    if attention_mask.dim() != 2 or attention_mask.device.type != "cpu" or compiling():
        return False
    real = attention_mask.bool()
    if not real[:, 0].all() or (real[:, 1:] & ~real[:, :-1]).any():
        return False
    positions = torch.arange(real.shape[1], device=real.device)
    return bool(((position_ids == positions) | ~real).all())


def packed_attention_kind(device: torch.device, half_precision: bool, dropout: float) -> str:
    """How a padding-free packed row is attended on `device`.

    - "segments": one causal SDPA call per example (lengths read on the host). Fastest on CPU, where reading them
      costs nothing. The read is not traceable, so under `torch.compile` the calls run inside one custom operator
      (`traced_segments_attention`), opaque to the graph; it has no dropout.
    - "varlen": torch's variable-length flash kernel on CUDA (half precision, no dropout): no host sync.
    - "document_mask": SDPA with a block-diagonal causal mask built on the device: no host sync, any device, dtype
      or dropout, traceable in one graph; it attends to every pair of positions, hence the CPU's eager default stays
      "segments".
    """
    if device.type == "cuda" and varlen_attn is not None and half_precision and dropout == 0.0:
        return "varlen"
    if device.type == "cpu" and (dropout == 0.0 or not compiling()):
        return "segments"
    return "document_mask"


def compiling() -> bool:
    """Whether this code is being traced by `torch.compile` (where no tensor can be read on the host)."""
    return torch.compiler.is_compiling()


def segment_lengths(positions: torch.Tensor) -> list[int] | None:
    """Example lengths of a packed (T,) row whose positions count 0, 1, ... per example; None for any other row."""
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() < 2 or starts[0] != 0:
        return None
    segment = (positions == 0).cumsum(0) - 1
    if not (positions == torch.arange(positions.shape[0], device=positions.device) - starts[segment]).all():
        return None
    return torch.diff(starts, append=starts.new_tensor([positions.shape[0]])).tolist()


def packed_document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the example each token belongs to: a new example wherever the position does not go up by 1.

    The rule transformers uses to recognise packed rows; computed on the device, with no host synchronisation.
    """
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask: causal attention within each packed example, none across examples."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return same.tril()[:, None]


def varlen_boundaries(document_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example lengths of one packed (1, T) row, padded to a fixed T + 1 entries.

    Fixed-size so no data-dependent shape (and no host sync) arises: entries past the last example repeat T, i.e.
    empty examples, which the kernel skips.
    """
    ids = document_ids[0]
    total = ids.shape[0]
    index = torch.arange(total, device=ids.device)
    is_start = torch.diff(ids, prepend=ids[:1] - 1) != 0
    starts = torch.where(is_start, index, total).sort().values
    return torch.cat([starts, starts.new_full((1,), total)]).to(torch.int32)


def segmented_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    segment_lengths: list[int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Padding-free packed attention computed example by example (one packed row, no mask).

    A block-diagonal mask sends SDPA to its slow masked kernel (on CPU about 8x slower than padding); causal calls on
    the slices of each example use the fast flash kernel and compute the same outputs. In half precision on CPU the
    flash kernel's backward is the slowest op of a training step (2x the matmul form on a 1k-token row), so there
    each example takes the eager form: matmuls, causal mask, softmax in float32.
    """
    groups = module.num_key_value_groups
    eager = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
    if eager and groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)  # (B, nh, T, hs)
    outputs = []
    for q, k, v in zip(*(t.split(segment_lengths, dim=2) for t in (query, key, value)), strict=True):
        if eager:
            outputs.append(causal_eager_attention(q, k, v, scaling, dropout, module.training))
        else:
            sdpa = F.scaled_dot_product_attention
            outputs.append(sdpa(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (B, T, nh, hs)


def causal_eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, dropout: float, training: bool
) -> torch.Tensor:
    """(B, nh, T, hs) causal attention as the model's eager attention computes it, without returning the weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, T)
    causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    weights = weights.masked_fill(~causal, torch.finfo(weights.dtype).min)
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(F.dropout(weights, p=dropout, training=training), value)


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    cu_seq_lens: torch.Tensor | None = None,
    max_length: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Padding-free packed attention with torch's variable-length flash kernel (CUDA, half precision, no dropout).

    `cu_seq_lens` are the example boundaries of the flattened batch (a device tensor, built without reading it on
    the host) and `max_length` an upper bound of the example length: nothing here synchronises with the host.
    """
    batch, _, seq_len, head_dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * seq_len, -1, head_dim) for t in (query, key, value)]  # (B*T, nh, hs)
    output = varlen_attn(
        *flat, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling,
        window_size=(-1, 0),  # causal
        enable_gqa=module.num_key_value_groups > 1,
    )  # fmt: skip
    return output.view(batch, seq_len, -1, head_dim), None  # (B, T, nh, hs)


# The causal flash kernel for CPU and its backward, per example. Private aten ops (torch >= 2.2): the public SDPA
# cannot be differentiated inside a custom operator, which runs below autograd.
_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _example_lengths(document_ids: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(document_ids.flatten(), return_counts=True)[1].tolist()


def _segments_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, document_ids: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nh, T, hs) output and (B, nh, T) float32 log-sum-exp of causal attention within each example."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    outputs, logsumexps = [], []
    for q, k, v in zip(*(t.split(_example_lengths(document_ids), dim=2) for t in (query, key, value)), strict=True):
        output, logsumexp = _cpu_flash(q, k, v, 0.0, True, scale=scale)
        outputs.append(output)
        logsumexps.append(logsumexp)
    return torch.cat(outputs, dim=2).contiguous(), torch.cat(logsumexps, dim=2).contiguous()


def _segments_backward(
    grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
    logsumexp: torch.Tensor, document_ids: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    groups = query.shape[1] // key.shape[1]
    expanded = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    grads = []
    tensors = (grad, query, *expanded, output, logsumexp)
    for g, q, k, v, o, lse in zip(*(t.split(_example_lengths(document_ids), dim=2) for t in tensors), strict=True):
        grads.append(_cpu_flash_backward(g, q, k, v, o, lse, 0.0, True, scale=scale))
    d_query, d_key, d_value = (torch.cat(parts, dim=2).contiguous() for parts in zip(*grads, strict=True))
    if groups > 1:  # each key/value head served `groups` query heads
        batch, heads, length, head_dim = d_key.shape
        d_key, d_value = (t.view(batch, heads // groups, groups, length, head_dim).sum(2) for t in (d_key, d_value))
    return d_query, d_key, d_value


def _register_segments_operator():
    """`hf_sft::segments_attention`: packed causal attention, example by example, as one opaque graph node.

    Registered once per process: this file may be imported twice (from the package and from a Hub folder).
    """
    if hasattr(torch.ops.hf_sft, "segments_attention"):
        return torch.ops.hf_sft.segments_attention
    forward = torch.library.custom_op("hf_sft::segments_attention", _segments_forward, mutates_args=())
    backward = torch.library.custom_op("hf_sft::segments_attention_backward", _segments_backward, mutates_args=())

    @forward.register_fake
    def _(query, key, value, document_ids, scale):
        return query.new_empty(query.shape), query.new_empty(query.shape[:3], dtype=torch.float32)

    @backward.register_fake
    def _(grad, query, key, value, output, logsumexp, document_ids, scale):
        return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)

    def save(ctx, inputs, output):
        query, key, value, document_ids, ctx.scale = inputs
        ctx.save_for_backward(query, key, value, *output, document_ids)

    def differentiate(ctx, grad, _grad_logsumexp):
        query, key, value, output, logsumexp, document_ids = ctx.saved_tensors
        grads = backward(grad.contiguous(), query, key, value, output, logsumexp, document_ids, ctx.scale)
        return *grads, None, None

    forward.register_autograd(differentiate, setup_context=save)
    return torch.ops.hf_sft.segments_attention


segments_attention_operator = _register_segments_operator()


def traced_segments_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    segment_document_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """ "segments" under `torch.compile` on CPU: the per-example flash calls of one packed row in a custom operator
    that reads the example lengths when it runs, so the compiled graph has no break and serves every layout.

    Autocast does not reach inside a custom operator: the inputs are cast to its dtype here, as SDPA's are.
    """
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    output, _ = segments_attention_operator(query, key, value, segment_document_ids, scaling)
    return output.transpose(1, 2).contiguous(), None  # (B, T, nh, hs)
