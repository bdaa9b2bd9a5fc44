"""The hf_sft GPT: a pre-norm decoder-only transformer covering two pretraining families.

- nanoGPT-style: LayerNorm (optional bias), learned absolute positions, GELU MLP of 4x width, LM head tied to the
  token embedding, residual projections initialised with std 0.02/sqrt(2 * n_layer).
- LLaMA-style (simple_llama): RMSNorm computed in float32, rotary positions in the rotate-half layout (every RoPE
  scaling type of transformers' `ROPE_INIT_FUNCTIONS`), SwiGLU MLP, no biases, untied LM head.

Heads: causal LM, and sequence classification / token classification / question answering on the same backbone
(`model.`, so an SFT folder loads into them), computed in `heads_hfsft_gpt.py`. Attention goes through transformers'
attention interface (SDPA by default, eager as reference), the KV cache through its `Cache` classes, the mask through
`create_causal_mask` (`position_ids` without an `attention_mask` describe a padding-free packed batch), or a packed
kernel for the training layouts that need no mask (`packing_hfsft_gpt.py`). This file imports only torch,
transformers and its siblings: Hub users execute it.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_hfsft_gpt import HfSftGPTConfig
from .heads_hfsft_gpt import (
    QuestionAnsweringHead,
    SequenceClassificationHead,
    TokenClassificationHead,
    head_output,
    lm_logits_and_loss,
    next_token_labels,
)
from .packing_hfsft_gpt import CACHE_FIELD, attention_inputs, packed_attention_interface

# The forwards take both names of the cache argument (`cache` from transformers 5.24, `past_key_values` before). From
# 5.24 `past_key_values=` warns as in stock models; before, it is renamed silently (a reached version warns nobody).
cache_keyword = deprecate_kwarg("past_key_values", "5.40.0" if CACHE_FIELD == "cache" else "5.0.0", new_name="cache")


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

    `inv_freq` and `attention_scaling` from `ROPE_INIT_FUNCTIONS[rope_type]`, updated by `dynamic_rope_update`.
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
    if module.num_key_value_groups > 1:  # each key/value head serves that many query heads: (B, nh, S, hs)
        key = key.repeat_interleave(module.num_key_value_groups, dim=1)
        value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    elif query.shape[2] > 1:  # no mask at all means plain causal attention over the whole key range
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        causal = causal.tril(key.shape[2] - query.shape[2])
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return attn_output, attn_weights


class HfSftGPTAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with separate q/k/v projections."""

    def __init__(self, config: HfSftGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        width, q_width, kv_width = config.hidden_size, config.hidden_size, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(width, q_width, bias=config.use_bias)
        self.k_proj = nn.Linear(width, kv_width, bias=config.use_bias)
        self.v_proj = nn.Linear(width, kv_width, bias=config.use_bias)
        self.o_proj = nn.Linear(q_width, width, bias=config.use_bias)
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
        if not output_attentions:  # only the eager path materialises the weights
            attention_interface = packed_attention_interface(kwargs) or ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        dropout = self.config.attention_dropout if self.training else 0.0
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
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
        # By keyword: accelerate's context parallelism finds `attention_mask` among the attention's kwargs.
        attn_output, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_embeddings=position_embeddings, cache=cache, **kwargs,
        )  # fmt: skip
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
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if use_cache is None:  # a training forward has no use for a cache: it only holds memory
            use_cache = config.use_cache and not self.training
        use_cache = use_cache and not (self.gradient_checkpointing and self.training)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        # A cache created here is empty: the mask must not see it, or a packed batch would not be recognised as such.
        mask_cache = cache
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if position_ids is None:
            position_ids = default_position_ids(config, inputs_embeds, attention_mask, cache)

        causal_mask, attention_kwargs = attention_inputs(
            config, inputs_embeds, attention_mask, position_ids, mask_cache, self.training, output_attentions
        )

        hidden_states, position_embeddings = inputs_embeds, None
        if config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        else:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
        hidden_states = self.dropout(hidden_states)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(
                hidden_states, attention_mask=causal_mask, position_embeddings=position_embeddings, cache=cache,
                use_cache=use_cache, output_attentions=output_attentions, position_ids=position_ids,
                **attention_kwargs, **kwargs,
            )  # fmt: skip
            all_attentions = all_attentions + (attn_weights,) if output_attentions else None
            all_hidden_states = all_hidden_states + (hidden_states,) if output_hidden_states else None
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:  # GPT-2 convention: the last entry is the normed output that the LM head reads
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if (config.return_dict if return_dict is None else return_dict) else output.to_tuple()


def default_position_ids(
    config: HfSftGPTConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
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

    `model.supervised_logits_only = True` (hf-sft's training sets it) asks for the memory-saving mode of
    `lm_logits_and_loss`: the LM head on the supervised positions alone. Off by default: logits are (B, T, V). The
    switch lives on the model object, never in its saved config.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Tensor parallelism splits the head over the vocabulary and gathers the logits (the style's name since 5.1).
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.model = HfSftGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.supervised_logits_only = False
        if config.tie_word_embeddings:
            # The tied head is saved once, as the embedding: naming it lets Trainer's resume re-tie it instead of
            # warning that the checkpoint lacks it.
            self._keys_to_ignore_on_save = list(self._tied_weights_keys)
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
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        supervised_positions: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Args:
            labels: token ids aligned with `input_ids` (NOT shifted), -100 where no loss is wanted. The loss is the
                mean over supervised tokens, or their sum divided by `num_items_in_batch` when that is passed (as
                Trainer does, so that gradient accumulation equals one large batch).
            logits_to_keep: an int keeps the last N positions (0 keeps all); a 1-D tensor keeps those positions.
                With `labels`, the loss covers the kept positions.
            supervised_positions: (N,) indices into the flattened (B * T) positions whose next token is supervised
                (`heads_hfsft_gpt.supervised_positions`), built with the batch on the host. Read only in the
                supervised-only mode, with `labels` and every position kept; without them the forward selects the
                positions itself, which waits for the device and breaks a `torch.compile` graph.
            shift_labels (keyword): the targets already shifted, (B, T) aligned with the positions that predict them;
                they take precedence over `labels`. Context and sequence parallelism shift the labels on the whole
                sequence before cutting it into shards, and pass them so.
        """
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, return_dict=True, **kwargs
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep]
        logits, loss = None, None
        if labels is None and shift_labels is None:
            logits = self.lm_head(hidden_states)
        else:
            keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
            if shift_labels is not None or not keeps_all:  # the positions index `labels` over the whole batch
                supervised_positions = None
            if shift_labels is None:  # what each position predicts: the next token
                shift_labels = next_token_labels(labels)
            shift_labels = shift_labels[:, keep].contiguous()
            logits, loss = lm_logits_and_loss(
                self, hidden_states, shift_labels, positions=supervised_positions, **kwargs
            )

        return head_output(self, CausalLMOutputWithPast, outputs, return_dict, loss=loss, logits=logits)


class HfSftGPTTaskModel(HfSftGPTPreTrainedModel):
    """The body of the task heads (`heads_hfsft_gpt.py`): the transformer as `model`, so SFT folders load into it."""

    def __init__(self, config: HfSftGPTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = HfSftGPTModel(config)


class HfSftGPTForSequenceClassification(SequenceClassificationHead, HfSftGPTTaskModel): ...


class HfSftGPTForTokenClassification(TokenClassificationHead, HfSftGPTTaskModel): ...


class HfSftGPTForQuestionAnswering(QuestionAnsweringHead, HfSftGPTTaskModel): ...


__all__ = [
    "HfSftGPTPreTrainedModel",
    "HfSftGPTModel",
    "HfSftGPTForCausalLM",
    "HfSftGPTForSequenceClassification",
    "HfSftGPTForTokenClassification",
    "HfSftGPTForQuestionAnswering",
]
