"""hf_sft: instruction fine-tuning of home-grown GPTs, the Hugging Face way.

Importing the package registers the model with the Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)`
works without `trust_remote_code`; saved folders also carry the model code for users without hf_sft.
"""

from transformers import (
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
# The code `save_pretrained` copies beside the weights: the modeling file and the siblings it imports.
MODEL_CODE_FILES = (
    "configuration_hfsft_gpt.py",
    "heads_hfsft_gpt.py",
    "modeling_hfsft_gpt.py",
    "packing_hfsft_gpt.py",
)

# The config registers itself with AutoConfig (configuration_hfsft_gpt.py). The heads start the stages after SFT:
# AutoModelForSequenceClassification.from_pretrained(sft_folder) trains a reward model.
AUTO_CLASSES = {
    AutoModel: HfSftGPTModel,
    AutoModelForCausalLM: HfSftGPTForCausalLM,
    AutoModelForSequenceClassification: HfSftGPTForSequenceClassification,
    AutoModelForTokenClassification: HfSftGPTForTokenClassification,
    AutoModelForQuestionAnswering: HfSftGPTForQuestionAnswering,
}
for _auto, _model in AUTO_CLASSES.items():
    _auto.register(HfSftGPTConfig, _model, exist_ok=True)
    # save_pretrained writes `auto_map` and copies the model code files, for Hub users who do not have hf_sft.
    _model.register_for_auto_class(_auto.__name__)
HfSftGPTConfig.register_for_auto_class()

__all__ = [
    "HfSftGPTConfig",
    "HfSftGPTModel",
    "HfSftGPTForCausalLM",
    "HfSftGPTForSequenceClassification",
    "HfSftGPTForTokenClassification",
    "HfSftGPTForQuestionAnswering",
    "MODEL_CODE_FILES",
    "__version__",
]
