"""The data pipeline: instruction or chat records -> prompt format -> masked token ids -> padded or packed batches.

Typical use (as in `hf_sft.training.run`)::

    template = get_format("alpaca")  # or "seed", "chatml", a Jinja file
    install_chat_template(tokenizer, template)
    data = build_datasets("dolly.jsonl", tokenizer, template=template, max_seq_len=512, val_split=0.05)
    trainer = Trainer(model, args, train_dataset=data.train.dataset, eval_dataset=data.eval.dataset,
                      data_collator=make_collator(tokenizer.pad_token_id, packing=True))

A run reads its data through `build_run_datasets(data_args, ...)` (`DataArguments`: the flags both `hf-sft train`
and `hf-sft data` parse); `streaming=True` gives a training split that is read and tokenised as it is consumed.
Either kind of split says what it is (`split.streamed`) and gives its one-line account (`split.describe(role)`;
`data.describe()` gives both splits' lines, as training logs them and `hf-sft data` prints them).
"""

from hf_sft.data.collator import PackingCollator, PaddingCollator, make_collator
from hf_sft.data.data_arguments import DataArguments
from hf_sft.data.masking import (
    IGNORE_INDEX,
    LENGTH_POLICIES,
    MODEL_COLUMNS,
    Encoder,
    encode_prompt,
    resolve_max_seq_len,
    tokenize_and_mask,
    unencodable_characters,
)
from hf_sft.data.pipeline import build_datasets, build_run_datasets, load_records, tokenize_records
from hf_sft.data.records import parse_field_map, resolve_fields
from hf_sft.data.saved import is_saved_dataset
from hf_sft.data.sources import HUB_ID, folder_problem
from hf_sft.data.splits import SFTData, StreamedSplit, TokenizedSplit, split_line
from hf_sft.data.stream import StreamingExamples
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
from hf_sft.data.text_records import cache_root

__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "HUB_ID",
    "IGNORE_INDEX",
    "LENGTH_POLICIES",
    "MODEL_COLUMNS",
    "DataArguments",
    "Encoder",
    "JinjaFormat",
    "PackingCollator",
    "PaddingCollator",
    "PromptFormat",
    "SFTData",
    "StreamedSplit",
    "StreamingExamples",
    "TokenizedSplit",
    "build_datasets",
    "build_run_datasets",
    "cache_root",
    "encode_prompt",
    "folder_problem",
    "format_of",
    "get_format",
    "install_chat_template",
    "is_saved_dataset",
    "load_records",
    "make_collator",
    "parse_field_map",
    "prompt_text",
    "resolve_fields",
    "resolve_max_seq_len",
    "split_line",
    "tokenize_and_mask",
    "tokenize_records",
    "unencodable_characters",
]
