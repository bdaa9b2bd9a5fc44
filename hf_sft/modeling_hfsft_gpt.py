"""The hf_sft GPT: a pre-norm decoder-only transformer covering two pretraining families.

- nanoGPT-style: LayerNorm (optional bias), learned absolute positions, GELU MLP of 4x width, LM head tied to the
  token embedding, residual projections initialised with std 0.02/sqrt(2 * n_layer).
- LLaMA-style (simple_llama): RMSNorm computed in float32, rotary positions in the rotate-half layout (every RoPE
  scaling type of transformers' `ROPE_INIT_FUNCTIONS`), SwiGLU MLP, no biases, untied LM head.

Heads: causal LM, and sequence classification / token classification / question answering on the same backbone
(`model.`), so an SFT folder loads into them.

Attention goes through transformers' attention interface (SDPA by default, eager as reference), the KV cache through
transformers' `Cache` classes, the mask through `create_causal_mask` (so `position_ids` without an `attention_mask`
describes a padding-free packed batch). This file imports only torch, transformers and its configuration sibling:
it is the code that Hub users execute.
"""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    ModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_hfsft_gpt import HfSftGPTConfig

try:  # torch >= 2.10: variable-length flash attention for packed rows on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache`; older 5.x releases
# pass and read `past_key_values`. The forwards accept both, the outputs use the name this release reads.
CACHE_FIELD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
# From 5.24 `past_key_values=` warns as in stock models; before, it is the current name (`generate` passes it) and is
# renamed silently: a deprecation whose version is already reached warns nobody.
cache_keyword = deprecate_kwarg("past_key_values", "5.40.0" if CACHE_FIELD == "cache" else "5.0.0", new_name="cache")

# Supervised-only loss: above this many logits (64 MiB in float32) the LM head and loss run in chunks.
LOSS_CHUNK_ELEMENTS = 2**24


class HfSftGPTRMSNorm(nn.Module):
    """RMSNorm in float32 whatever the input dtype, as LLaMA and simple_llama compute it."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


def build_norm(config: HfSftGPTConfig) -> nn.Module:
    if config.norm_type == "rmsnorm":
        return HfSftGPTRMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.use_bias)


class HfSftGPTRotaryEmbedding(nn.Module):
    """cos/sin tables for rotary positions, as stock Llama computes them for every `rope_type` transformers knows.

    `inv_freq` and `attention_scaling` come from `ROPE_INIT_FUNCTIONS[rope_type]` (`compute_default_rope_parameters`
    for `"default"`); `dynamic_rope_update` recomputes them for the dynamic and longrope types as sequences grow.
    """

    def __init__(self, config: HfSftGPTConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HfSftGPTConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE: `inv_freq` (hs/2,) from `rope_theta`, no scaling of cos/sin. PreTrainedModel's init calls it."""
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs): broadcast over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hs) -> (B, n_kv * n_rep, T, hs)."""
    if n_rep == 1:
        return hidden_states
    batch, n_kv, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, n_kv, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, n_kv * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention that also returns the attention weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    elif query.shape[2] > 1:
        # No mask at all means plain causal attention over the whole key range.
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        causal = causal.tril(key.shape[2] - query.shape[2])
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return attn_output, attn_weights


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
    eager = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
    if eager:
        key = repeat_kv(key, module.num_key_value_groups)
        value = repeat_kv(value, module.num_key_value_groups)
    outputs = []
    for q, k, v in zip(
        query.split(segment_lengths, dim=2),
        key.split(segment_lengths, dim=2),
        value.split(segment_lengths, dim=2),
        strict=True,
    ):
        if eager:
            outputs.append(causal_eager_attention(q, k, v, scaling, dropout, module.training))
        else:
            gqa = module.num_key_value_groups > 1
            output = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
            )
            outputs.append(output)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (B, T, nh, hs)


def causal_eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, dropout: float, training: bool
) -> torch.Tensor:
    """(B, nh, T, hs) causal attention as `eager_attention_forward` computes it, without returning the weights."""
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
        *flat,
        cu_seq_lens,
        cu_seq_lens,
        max_length,
        max_length,
        scale=scaling,
        window_size=(-1, 0),  # causal
        enable_gqa=module.num_key_value_groups > 1,
    )
    return output.view(batch, seq_len, -1, head_dim), None  # (B, T, nh, hs)


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


def packed_attention_kind(device: torch.device, half_precision: bool, dropout: float) -> str:
    """How a padding-free packed batch is attended on `device`.

    - "segments": one causal SDPA call per example (lengths read on the host). Fastest on CPU, where reading them
      costs nothing, but not traceable: `torch.compile` breaks the graph there and recompiles for each new layout.
    - "varlen": torch's variable-length flash kernel on CUDA (half precision, no dropout): no host sync.
    - "document_mask": SDPA with a block-diagonal causal mask built on the device: no host sync, any device, dtype
      or dropout, traceable in one graph; it attends to every pair of positions, hence the CPU's eager default stays
      "segments".
    """
    if device.type == "cuda" and varlen_attn is not None and half_precision and dropout == 0.0:
        return "varlen"
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return "segments"
    return "document_mask"


class HfSftGPTAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with separate q/k/v projections."""

    def __init__(self, config: HfSftGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.use_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.o_proj.is_residual_projection = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        key = self.k_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        value = self.v_proj(hidden_states).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = eager_attention_forward
        if kwargs.get("segment_lengths") is not None and not output_attentions:
            attention_interface = segmented_sdpa_attention
        elif kwargs.get("cu_seq_lens") is not None and not output_attentions:
            attention_interface = varlen_attention
        elif not output_attentions:  # only the eager path materialises the weights
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, seq_len, -1).contiguous()  # (B, T, nh * hs)
        return self.o_proj(attn_output), attn_weights


class HfSftGPTMLP(nn.Module):
    """GELU MLP (nanoGPT: up=c_fc, down=c_proj) or SwiGLU (LLaMA: down(silu(gate x) * up x))."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__()
        self.swiglu = config.mlp_type == "swiglu"
        bias = config.use_bias
        if self.swiglu:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.down_proj.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class HfSftGPTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); dropout on each residual branch."""

    def __init__(self, config: HfSftGPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = build_norm(config)
        self.self_attn = HfSftGPTAttention(config, layer_idx)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = HfSftGPTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + self.dropout(attn_output)
        hidden_states = hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))
        return hidden_states, attn_weights


class HfSftGPTPreTrainedModel(PreTrainedModel):
    config_class = HfSftGPTConfig
    config: HfSftGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfSftGPTDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        # PreTrainedModel._init_weights rebuilds the rotary buffers (through `compute_default_rope_parameters`).
        if isinstance(module, HfSftGPTRMSNorm):
            init.ones_(module.weight)
        elif getattr(module, "is_residual_projection", False):
            # nanoGPT/GPT-2: projections into the residual stream are scaled down by depth to keep its variance.
            init.normal_(module.weight, mean=0.0, std=std / (2 * self.config.num_hidden_layers) ** 0.5)


class HfSftGPTModel(HfSftGPTPreTrainedModel):
    """The transformer without its LM head: embeddings, blocks, final norm."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.rotary_emb = HfSftGPTRotaryEmbedding(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(HfSftGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @cache_keyword
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if use_cache is None:  # a training forward has no use for a cache: it only holds memory
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        return_dict = self.config.return_dict if return_dict is None else return_dict

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # A cache we create here is empty: the mask must not see it, or a packed batch (position_ids restarting per
        # example, no attention_mask) would not be recognised as packed.
        mask_cache = cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = self._default_position_ids(self.config, inputs_embeds, attention_mask, cache)

        # Attention weights come from the eager path only, which needs the full mask.
        fast = mask_cache is None and not output_attentions
        layout = self._fast_training_layout(attention_mask, position_ids) if fast else None
        if layout is None:
            # By keyword: the cache's is `cache` from transformers 5.24, `past_key_values` before (keyword-only there).
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **{CACHE_FIELD: mask_cache},
            )
        else:
            causal_mask, attention_kwargs = layout
            kwargs.update(attention_kwargs)
        hidden_states = inputs_embeds
        position_embeddings = None
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.dropout(hidden_states)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                output_attentions=output_attentions,
                position_ids=position_ids,
                **kwargs,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # GPT-2 convention: the last entry is the normed output that the LM head reads.
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _fast_training_layout(
        self, attention_mask: torch.Tensor | None, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict] | None:
        """With SDPA, the batch layouts that need no `create_causal_mask`: `(mask, attention kwargs)`, or None.

        A right-padded training batch gives `(None, {})`: plain causal attention (real tokens never attend to the pads
        that follow them, so they get the same outputs; pad positions are left unspecified, hence training only).
        A padding-free packed row (`position_ids` restarting per example, no `attention_mask`) is attended per
        example, exactly for every position, by the kernel `packed_attention_kind` picks for the device. Left
        padding, caches and custom positions keep the masked path.
        """
        if self.config._attn_implementation != "sdpa":
            return None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or not self.training:
                return None
            real = attention_mask.bool()
            positions = torch.arange(real.shape[1], device=real.device)
            right_padded = real[:, 0].all() and not (real[:, 1:] & ~real[:, :-1]).any()
            if right_padded and ((position_ids == positions) | ~real).all():
                return None, {}
            return None
        if position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
            return None
        weight = self.embed_tokens.weight
        half = weight.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(weight.device.type)
        dropout = self.config.attention_dropout if self.training else 0.0
        kind = packed_attention_kind(weight.device, half, dropout)
        if kind == "segments":
            lengths = self._segment_lengths(position_ids[0])
            return None if lengths is None else (None, {"segment_lengths": lengths})
        document_ids = packed_document_ids(position_ids)
        if kind == "varlen":
            return None, {"cu_seq_lens": varlen_boundaries(document_ids), "max_length": position_ids.shape[1]}
        return document_causal_mask(document_ids), {}

    @staticmethod
    def _segment_lengths(positions: torch.Tensor) -> list[int] | None:
        """Example lengths of a packed row whose positions count 0, 1, ... per example; None for any other row."""
        starts = (positions == 0).nonzero().flatten()
        if starts.numel() < 2 or starts[0] != 0:
            return None
        segment = (positions == 0).cumsum(0) - 1
        if not (positions == torch.arange(positions.shape[0], device=positions.device) - starts[segment]).all():
            return None
        return torch.diff(starts, append=starts.new_tensor([positions.shape[0]])).tolist()

    @staticmethod
    def _default_position_ids(
        config: HfSftGPTConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.LongTensor:
        """Positions count real tokens only, so left padding does not shift learned positions."""
        seq_len = inputs_embeds.shape[1]
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len + seq_len > config.max_position_embeddings and config.position_embedding_type == "learned":
            raise ValueError(
                f"{past_len + seq_len} tokens exceed max_position_embeddings ({config.max_position_embeddings}), "
                "the longest sequence this model's learned positions cover"
            )
        if attention_mask is not None and attention_mask.dim() == 2:
            position_ids = attention_mask.long().cumsum(-1) - 1
            return position_ids.clamp(min=0)[:, -seq_len:]
        return torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device).unsqueeze(0)


class HfSftGPTForCausalLM(HfSftGPTPreTrainedModel, GenerationMixin):
    """The transformer with its LM head; `labels` (unshifted, -100 ignored) give the next-token loss.

    `model.supervised_logits_only = True` (hf-sft's training sets it) asks for the memory-saving mode: a forward with
    `labels` then runs the LM head on the supervised positions alone and returns their (N, V) logits, or None past
    `LOSS_CHUNK_ELEMENTS` logits, where head and loss run in checkpointed chunks. Off by default: logits are
    (B, T, V). The switch lives on the model object, never in its saved config.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Tensor parallelism splits the head over the vocabulary and gathers the logits (the style's name since 5.1).
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.model = HfSftGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.supervised_logits_only = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @cache_keyword
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Args:
            labels: token ids aligned with `input_ids` (NOT shifted), -100 where no loss is wanted. The loss is the
                mean over supervised tokens, or their sum divided by `num_items_in_batch` when that is passed (as
                Trainer does, so that gradient accumulation equals one large batch).
            logits_to_keep: an int keeps the last N positions (0 keeps all); a 1-D tensor keeps those positions.
                With `labels`, the loss covers the kept positions.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep]
        if labels is None:
            logits, loss = self.lm_head(hidden_states), None
        else:
            next_labels = F.pad(labels, (0, 1), value=-100)[:, 1:][:, keep].contiguous()  # what each position predicts
            logits, loss = self._lm_loss(hidden_states, next_labels, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()

    def _lm_loss(
        self,
        hidden_states: torch.Tensor,
        next_labels: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits and `self.loss_function` on the positions kept: all of them, or the supervised ones alone.

        Returns (B, T, V) logits, or in the memory-saving mode the (N, V) logits of the N supervised positions (None
        when chunked). Every chunk's loss is its sum over `num_items_in_batch` (default N): they add up to the loss.
        """
        if not self.supervised_logits_only:
            logits = self.lm_head(hidden_states)  # (B, T, V)
            loss = self._loss(logits, next_labels, num_items_in_batch, **kwargs)
            return logits, loss
        supervised = next_labels != -100  # (B, T) boolean mask: the positions the loss reads
        hidden_states, targets = hidden_states[supervised], next_labels[supervised]  # (N, D), (N,)
        rows = max(1, LOSS_CHUNK_ELEMENTS // self.config.vocab_size)
        if hidden_states.shape[0] <= rows:
            logits = self.lm_head(hidden_states)  # (N, V)
            return logits, self._loss(logits, targets, num_items_in_batch, **kwargs)
        denominator = targets.shape[0] if num_items_in_batch is None else num_items_in_batch
        losses = [
            checkpoint(self._chunk_loss, hidden, target, denominator, use_reentrant=False, **kwargs)
            for hidden, target in zip(hidden_states.split(rows), targets.split(rows), strict=True)
        ]
        return None, torch.stack(losses).sum()

    def _loss(
        self, logits: torch.Tensor, next_labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None, **kwargs
    ) -> torch.Tensor:
        # Labels come already shifted: `shift_labels` tells the loss so.
        return self.loss_function(
            logits=logits,
            labels=None,
            shift_labels=next_labels,
            vocab_size=self.config.vocab_size,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )

    def _chunk_loss(
        self, hidden_states: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor | int, **kwargs
    ) -> torch.Tensor:
        return self._loss(self.lm_head(hidden_states), targets, denominator, **kwargs)


class HfSftGPTTaskModel(HfSftGPTPreTrainedModel):
    """Shared body of the task heads: the transformer (`model`, so SFT folders load into it) and their outputs."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HfSftGPTModel(config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _output(
        self, output_class: type[ModelOutput], return_dict: bool | None, outputs, **fields
    ) -> ModelOutput | tuple:
        fields.update(hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        if CACHE_FIELD in output_class.__dataclass_fields__:
            fields[CACHE_FIELD] = getattr(outputs, CACHE_FIELD)
        output = output_class(**fields)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class HfSftGPTForSequenceClassification(HfSftGPTTaskModel):
    """One score vector per sequence, read at its last non-pad token as in stock Llama (reward models, classifiers)."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @cache_keyword
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self.model(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, output_attentions,
            output_hidden_states, return_dict=True, **kwargs,
        )  # fmt: skip
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch = logits.shape[0]
        if self.config.pad_token_id is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        last = torch.full((batch,), -1, device=logits.device)  # no ids to look at: the last position
        if self.config.pad_token_id is not None and input_ids is not None:
            # The rightmost token that is not padding, whichever side the padding is on.
            real = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * real).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return self._output(SequenceClassifierOutputWithPast, return_dict, outputs, loss=loss, logits=pooled)


class HfSftGPTForTokenClassification(HfSftGPTTaskModel):
    """One score vector per token (tagging)."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        outputs = self.model(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_attentions,
            output_hidden_states, return_dict=True, **kwargs,
        )  # fmt: skip
        logits = self.score(self.dropout(outputs.last_hidden_state))  # (B, T, num_labels)
        loss = None if labels is None else self.loss_function(logits, labels, self.config)
        return self._output(TokenClassifierOutput, return_dict, outputs, loss=loss, logits=logits)


class HfSftGPTForQuestionAnswering(HfSftGPTTaskModel):
    """Extractive QA: start and end logits per token."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput | tuple:
        outputs = self.model(
            input_ids, attention_mask, position_ids, None, inputs_embeds, False, output_attentions,
            output_hidden_states, return_dict=True, **kwargs,
        )  # fmt: skip
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return self._output(
            QuestionAnsweringModelOutput, return_dict, outputs, loss=loss, start_logits=start_logits,
            end_logits=end_logits,
        )  # fmt: skip


__all__ = [
    "HfSftGPTPreTrainedModel",
    "HfSftGPTModel",
    "HfSftGPTForCausalLM",
    "HfSftGPTForSequenceClassification",
    "HfSftGPTForTokenClassification",
    "HfSftGPTForQuestionAnswering",
]
