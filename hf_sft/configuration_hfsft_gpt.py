"""Configuration of the hf_sft GPT: one config for the two families our users pretrain.

- ``family="nanogpt"``: LayerNorm (optional bias), learned absolute positions, GELU MLP of 4x width, biases optional,
  LM head tied to the token embedding.
- ``family="llama"``: RMSNorm, rotary positions (``rope_parameters``: any ``rope_type`` of the installed transformers),
  SwiGLU MLP whose width is 2/3 of 4x rounded up to ``multiple_of``, no biases, untied LM head.

Every component can also be set on its own; ``family`` only chooses the defaults of the ones left unset.
This file imports only the standard library and transformers: Hub users execute it.
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

FAMILY_DEFAULTS = {
    "nanogpt": {
        "norm_type": "layernorm",
        "position_embedding_type": "learned",
        "mlp_type": "gelu",
        "use_bias": True,
        "tie_word_embeddings": True,
    },
    "llama": {
        "norm_type": "rmsnorm",
        "position_embedding_type": "rope",
        "mlp_type": "swiglu",
        "use_bias": False,
        "tie_word_embeddings": False,
    },
}

# Written into every saved config so that AutoConfig, AutoModel and AutoModelForCausalLM all resolve with
# trust_remote_code; save_pretrained itself adds only the class being saved.
AUTO_MAP = {
    "AutoConfig": "configuration_hfsft_gpt.HfSftGPTConfig",
    "AutoModel": "modeling_hfsft_gpt.HfSftGPTModel",
    "AutoModelForCausalLM": "modeling_hfsft_gpt.HfSftGPTForCausalLM",
    "AutoModelForSequenceClassification": "modeling_hfsft_gpt.HfSftGPTForSequenceClassification",
    "AutoModelForTokenClassification": "modeling_hfsft_gpt.HfSftGPTForTokenClassification",
    "AutoModelForQuestionAnswering": "modeling_hfsft_gpt.HfSftGPTForQuestionAnswering",
}

# Keys of configs written by earlier versions that no longer mean anything; loading drops them.
RETIRED_KEYS = ("supervised_logits_in_training",)


def swiglu_hidden_size(hidden_size: int, multiple_of: int) -> int:
    """LLaMA's MLP width: 2/3 of 4x the model width, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * (4 * hidden_size) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class HfSftGPTConfig(PretrainedConfig):
    r"""
    Args:
        family (`str`, defaults to `"nanogpt"`): `"nanogpt"` or `"llama"`; picks defaults for the fields below.
        vocab_size (`int`): rows of the token embedding (may exceed the tokenizer's vocabulary).
        hidden_size (`int`): model width (nanoGPT's `n_embd`).
        num_hidden_layers (`int`): number of blocks (`n_layer`).
        num_attention_heads (`int`): query heads (`n_head`).
        num_key_value_heads (`int`, *optional*): key/value heads; defaults to `num_attention_heads`.
        intermediate_size (`int`, *optional*): MLP width; defaults to 4x (GELU) or the rounded SwiGLU width.
        multiple_of (`int`): rounding of the SwiGLU width when `intermediate_size` is not given.
        max_position_embeddings (`int`): longest sequence (`block_size`).
        norm_type (`str`): `"layernorm"` or `"rmsnorm"`.
        norm_eps (`float`): epsilon of the norms.
        position_embedding_type (`str`): `"learned"` or `"rope"`.
        rope_theta (`float`): rotary base, stored in `rope_parameters` (rotary positions only).
        rope_parameters (`dict`, *optional*): transformers' RoPE settings, e.g. `{"rope_type": "yarn", "factor": 4.0}`;
            `rope_theta` and, for the scaled types, `original_max_position_embeddings` are filled in. Learned
            positions carry no RoPE settings: the key is dropped (folders saved by earlier versions have it).
        mlp_type (`str`): `"gelu"` (exact GELU, two matrices) or `"swiglu"` (three matrices).
        use_bias (`bool`): biases in linear layers and LayerNorm.
        attention_dropout (`float`): dropout on attention probabilities.
        hidden_dropout (`float`): dropout on embeddings and on each residual branch.
        initializer_range (`float`): std of the normal init.
        tie_word_embeddings (`bool`): share the LM head with the token embedding.
    """

    model_type = "hfsft_gpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): heads and MLP width split across ranks, as Llama.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    attribute_map = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}

    def __init__(
        self,
        family: str = "nanogpt",
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        multiple_of: int = 256,
        max_position_embeddings: int = 512,
        norm_type: str | None = None,
        norm_eps: float = 1e-5,
        position_embedding_type: str | None = None,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        mlp_type: str | None = None,
        use_bias: bool | None = None,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = 0,
        **kwargs,
    ):
        if family not in FAMILY_DEFAULTS:
            raise ValueError(f"family must be one of {sorted(FAMILY_DEFAULTS)}, got {family!r}")
        defaults = FAMILY_DEFAULTS[family]
        self.family = family
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.norm_type = norm_type or defaults["norm_type"]
        self.norm_eps = norm_eps
        self.position_embedding_type = position_embedding_type or defaults["position_embedding_type"]
        self.mlp_type = mlp_type or defaults["mlp_type"]
        self.use_bias = defaults["use_bias"] if use_bias is None else use_bias
        self.multiple_of = multiple_of
        if intermediate_size is None:
            swiglu = self.mlp_type == "swiglu"
            intermediate_size = swiglu_hidden_size(hidden_size, multiple_of) if swiglu else 4 * hidden_size
        self.intermediate_size = intermediate_size
        if self.mlp_type != "swiglu":  # the GELU MLP has no gate (to_dict leaves the plan out of config.json)
            self.base_model_tp_plan = {k: v for k, v in type(self).base_model_tp_plan.items() if "gate_proj" not in k}
        if self.position_embedding_type == "rope":
            # transformers' PretrainedConfig fills in and checks the rest of the RoPE settings when it sees this.
            self.rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta), **(rope_parameters or {})}
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.head_dim = hidden_size // num_attention_heads if num_attention_heads else 0
        self._validate()
        for key in RETIRED_KEYS:
            kwargs.pop(key, None)
        tied = defaults["tie_word_embeddings"] if tie_word_embeddings is None else tie_word_embeddings
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tied,
            **kwargs,
        )
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}

    @property
    def rope_theta(self) -> float:
        """The rotary base; an AttributeError for learned positions, which have none."""
        if "rope_parameters" not in self.__dict__:
            raise AttributeError(f"{self.position_embedding_type!r} positions have no rope_theta")
        return float(self.rope_parameters.get("rope_theta", 10000.0))

    def _validate(self) -> None:
        choices = {
            "norm_type": ("layernorm", "rmsnorm"),
            "position_embedding_type": ("learned", "rope"),
            "mlp_type": ("gelu", "swiglu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        rope_type = getattr(self, "rope_parameters", {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            supported = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
            raise ValueError(
                f"rope_parameters: rope_type {rope_type!r} is not one of this transformers' ({supported})"
            )
        if self.position_embedding_type == "rope" and self.head_dim % 2:
            raise ValueError(
                f"rotary positions need an even head size, got hidden_size/num_attention_heads = {self.head_dim}"
            )


# Registered wherever this file runs: with the hf_sft package, and for Hub users when `trust_remote_code=True` runs
# the folder's copy. `AutoTokenizer.from_pretrained(folder)` reads the folder's config first, and an unregistered
# `model_type` with an `auto_map` would make it ask whether to run custom code (and wait for an answer, in a
# terminal) although the tokenizer needs none. AutoConfig then reads every folder of this type with this class.
AutoConfig.register(HfSftGPTConfig.model_type, HfSftGPTConfig, exist_ok=True)

__all__ = ["HfSftGPTConfig"]
