"""The data pipeline: instruction or chat records -> prompt format -> masked token ids -> padded or packed batches.

Typical use (as in `hf_sft.training.run`)::

    template = get_format("alpaca")  # or "seed", "chatml", a Jinja file
    install_chat_template(tokenizer, template)
    data = build_datasets("dolly.jsonl", tokenizer, template=template, max_seq_len=512, val_split=0.05)
    trainer = Trainer(model, args, train_dataset=data.train.dataset, eval_dataset=data.eval.dataset,
                      data_collator=make_collator(tokenizer.pad_token_id, packing=True))
"""

from hf_sft.data.collator import PackingCollator, PaddingCollator, make_collator
from hf_sft.data.lengths import LENGTH_POLICIES, resolve_max_seq_len
from hf_sft.data.masking import IGNORE_INDEX, MODEL_COLUMNS, Encoder, encode_prompt, tokenize_and_mask
from hf_sft.data.pipeline import SFTData, TokenizedSplit, build_datasets, tokenize_records
from hf_sft.data.records import load_records, parse_field_map, resolve_fields
from hf_sft.data.template import (
    DEFAULT_FORMAT,
    FORMATS,
    JinjaFormat,
    PromptFormat,
    format_of,
    get_format,
    install_chat_template,
    prompt_text,
)

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "IGNORE_INDEX",
    "LENGTH_POLICIES",
    "MODEL_COLUMNS",
    "Encoder",
    "PackingCollator",
    "PaddingCollator",
    "JinjaFormat",
    "PromptFormat",
    "SFTData",
    "TokenizedSplit",
    "build_datasets",
    "encode_prompt",
    "format_of",
    "get_format",
    "install_chat_template",
    "load_records",
    "make_collator",
    "parse_field_map",
    "prompt_text",
    "resolve_fields",
    "resolve_max_seq_len",
    "tokenize_and_mask",
    "tokenize_records",
]
