"""hf_sft: instruction fine-tuning of home-grown GPTs, the Hugging Face way.

Importing the package registers the model with the Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)`
works without `trust_remote_code`; saved folders also carry the model code for users without hf_sft.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_hfsft_gpt import HfSftGPTConfig
from .modeling_hfsft_gpt import (
    HfSftGPTForCausalLM,
    HfSftGPTForQuestionAnswering,
    HfSftGPTForSequenceClassification,
    HfSftGPTForTokenClassification,
    HfSftGPTModel,
)

__version__ = "0.1.0"

AutoConfig.register(HfSftGPTConfig.model_type, HfSftGPTConfig, exist_ok=True)
# The heads start the stages after SFT: AutoModelForSequenceClassification.from_pretrained(sft_folder) trains a reward
# model.
AUTO_CLASSES = {
    AutoModel: HfSftGPTModel,
    AutoModelForCausalLM: HfSftGPTForCausalLM,
    AutoModelForSequenceClassification: HfSftGPTForSequenceClassification,
    AutoModelForTokenClassification: HfSftGPTForTokenClassification,
    AutoModelForQuestionAnswering: HfSftGPTForQuestionAnswering,
}
for _auto, _model in AUTO_CLASSES.items():
    _auto.register(HfSftGPTConfig, _model, exist_ok=True)
    # save_pretrained writes `auto_map` and copies the two code files, for Hub users who do not have hf_sft.
    _model.register_for_auto_class(_auto.__name__)
HfSftGPTConfig.register_for_auto_class()

__all__ = [
    "HfSftGPTConfig",
    "HfSftGPTModel",
    "HfSftGPTForCausalLM",
    "HfSftGPTForSequenceClassification",
    "HfSftGPTForTokenClassification",
    "HfSftGPTForQuestionAnswering",
    "__version__",
]
