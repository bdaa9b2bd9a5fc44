"""Did it learn? A model evaluated on instruction data, per group of records, optionally against its base model.

Contents, in the order of a run:

- `load_model`: the model to evaluate, or the base to compare with (a model folder, a legacy `.pt` with its
  tokenizer, or a Hub id), with a description of where it came from (path, revision or sha256).
- `EvalData`: the examples, tokenised and masked by the data pipeline exactly as training tokenises and masks them
  (`hf_sft.data.build_datasets`), the group of each (`--group_by`, by default `category` when the records have it),
  the reference records for the side-by-side answers, and the fingerprint of the data files.
- `score`: mean loss, perplexity and next-token accuracy over the supervised tokens only, overall and per group,
  batched (padded, or packed padding-free) by the collator training uses.
- `evaluate`: both models on the same tokens, the difference per group, greedy answers side by side; the results
  as one JSON-ready dict.
- `render_report`, `card_with_results`, `write_outputs`: `eval_results.json`, the self-contained
  `eval_report.html` and the model card's model-index metadata, written together through `hf_sft.writer`;
  `recover_interrupted_write` undoes such a write cut short.
- `evaluate_after_training`: the same, for a training run that ends with an evaluation split.

Figures are token-weighted, as the training loss is: a group's loss is the sum of its tokens' cross-entropies over
its number of supervised tokens; perplexity is `exp(loss)`; accuracy is the share of supervised tokens whose
most likely prediction is the reference token.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hf_sft.errors import UsageError, bad_input

RESULTS_FILE = "eval_results.json"
REPORT_FILE = "eval_report.html"
CARD_FILE = "README.md"
DEFAULT_GROUP_FIELD = "category"
OVERALL = "all"
UNGROUPED = "(no group)"  # records without the --group_by field
METRICS = ("loss", "perplexity", "accuracy")
LEGACY_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_INTERRUPTED_NOTE = "hf-sft eval was cut short while writing its results: run it again"
_HASH_CHUNK = 1 << 20


# --- models -------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM in eval mode, its tokenizer and where it came from.

    Attributes:
        model: the model, on its device.
        tokenizer: its tokenizer.
        origin: `{"kind": "folder"|"legacy"|"hub", "path": ..., "revision": ...}` (a folder's or file's revision is
            the sha256 of its weights; a Hub model's the commit it was loaded from).
    """

    model: Any
    tokenizer: Any
    origin: dict


def load_model(
    spec: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Load a model to evaluate: a model folder (or `checkpoint-STEP`), a legacy checkpoint, or a Hub id.

    Args:
        spec: the folder, the `.pt`/`.pth` file, or `owner/name` on the Hub.
        tokenizer_path: the tokenizer of a legacy checkpoint (required for one, ignored otherwise).
        special_tokens: BOS/EOS/PAD/UNK overrides for a legacy checkpoint's tokenizer.
        device: `cpu`, `cuda`, ...; default CUDA when available.

    Raises:
        UsageError: a missing path, an incomplete folder, a legacy checkpoint without its tokenizer, a Hub id that
            cannot be loaded.
    """
    from hf_sft.generate import load_for_generation

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(spec)
    if path.suffix in LEGACY_SUFFIXES:
        from hf_sft.legacy import convert_checkpoint

        if not path.is_file():
            raise UsageError(f"{spec}: file not found")
        if not tokenizer_path:
            raise UsageError(f"{spec} is a legacy checkpoint: pass its --tokenizer_path too")
        model, tokenizer = convert_checkpoint(path, tokenizer_path, **(special_tokens or {}))
        origin = {"kind": "legacy", "path": str(path.resolve()), "revision": _sha256(path)}
        origin["tokenizer"] = str(Path(tokenizer_path).resolve())
        return LoadedModel(model.to(device).eval(), tokenizer, origin)
    if path.exists():
        model, tokenizer = load_for_generation(path, device=device)
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        revision = _sha256(*weights) if weights else None
        return LoadedModel(model, tokenizer, {"kind": "folder", "path": str(path.resolve()), "revision": revision})
    from huggingface_hub import hf_hub_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_sft  # noqa: F401 - registers the hf_sft model with the Auto classes

    with bad_input(f"{spec} is neither a local path nor a model on the Hub"):
        # The cache keeps each download under snapshots/<commit>/: the commit the model is then pinned to.
        revision = Path(hf_hub_download(str(spec), "config.json")).parent.name
        tokenizer = AutoTokenizer.from_pretrained(str(spec), revision=revision)
        model = AutoModelForCausalLM.from_pretrained(str(spec), revision=revision, dtype=torch.float32)
    return LoadedModel(model.to(device).eval(), tokenizer, {"kind": "hub", "path": str(spec), "revision": revision})


def check_same_vocabulary(model: LoadedModel, base: LoadedModel) -> None:
    """Refuse a base whose tokenizer differs from the model's: the two would not read the same tokens.

    Raises:
        UsageError: naming the first difference found.
    """
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(model.tokenizer, name) != getattr(base.tokenizer, name):
            raise UsageError(
                f"--compare {base.origin['path']}: its {name} is {getattr(base.tokenizer, name)}, the model's "
                f"{getattr(model.tokenizer, name)}: the two models must share a tokenizer to read the same tokens"
            )
    if model.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        raise UsageError(
            f"--compare {base.origin['path']}: its tokenizer's vocabulary differs from the model's: the two models "
            "must share a tokenizer to read the same tokens"
        )
    biggest = len(model.tokenizer) - 1
    if biggest >= base.model.config.vocab_size:
        raise UsageError(f"--compare {base.origin['path']}: its embedding has no row for token {biggest}")


# --- data ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """The examples to score, each with its group, and the records whose answers are shown.

    Attributes:
        dataset: rows `input_ids`, `attention_mask`, `labels`, masked as training masks them.
        groups: the group of each row of `dataset`.
        group_by: the record field the groups come from, or None (every example in `OVERALL`).
        references: the first records, as `{"index", "instruction", "input", "reference"}`, in dataset order.
        source: the data's path or Hub id, as messages name it.
        fingerprint: what identifies the data (`files`: path, size and sha256 of each local file).
        counts: `{"examples": kept, "dropped": {reason: n}, "skipped": {kind: n}}`.
    """

    dataset: Any
    groups: list[str]
    group_by: str | None
    references: list[dict]
    source: str
    fingerprint: dict
    counts: dict

    @classmethod
    def from_split(
        cls,
        split,
        records_source: str | Sequence[str],
        *,
        field_map: Mapping[str, str] | None = None,
        group_by: str | None = None,
        num_answers: int = 0,
        cache_dir: str | Path | None = None,
        hub_options: Mapping[str, str | None] | None = None,
    ) -> EvalData:
        """Group an already tokenised split (`hf_sft.data.TokenizedSplit`) by a field of its source records.

        Args:
            split: the tokenised split (its `index` names each example's record in `records_source`).
            records_source: the source the split was read from.
            field_map: the `--field_map` the split was read with.
            group_by: the record field that names each example's group; None: `category` when the records have
                it, else no groups. A record whose field is missing, empty or not a string joins `UNGROUPED`.
            num_answers: how many reference records to keep for the side-by-side answers.
            cache_dir: `datasets` cache folder.
            hub_options: `dataset_config`, `dataset_split`, `dataset_revision` of a Hub source.

        Raises:
            UsageError: `group_by` was given and no record has that field, or the records are conversations.
        """
        from hf_sft.data import load_records, resolve_fields

        if not len(split.index):
            raise UsageError(f"no example with a supervised token in {split.source}: nothing to evaluate")
        options = {"skip_bad_records": True, "cache_dir": cache_dir, **(hub_options or {})}
        groups = [OVERALL] * len(split.index)
        field_name = group_by or DEFAULT_GROUP_FIELD
        # The record loader reads every source kind and numbers records as the split's `index` does; reading the
        # group field as the optional `input` column gives each record's group ("" where it lacks the field).
        by_group = load_records(records_source, resolve_fields({**(field_map or {}), "input": field_name}), **options)
        values = _column_by_index(by_group.dataset, "input")
        if values is None or not any(values.values()):
            if group_by is not None:
                kind = "holds conversations" if values is None else f"has no record with a text field {group_by!r}"
                raise UsageError(f"--group_by {group_by}: {split.source} {kind}")
            field_name = None
        else:
            groups = [values.get(int(i)) or UNGROUPED for i in split.index]
        references = []
        if num_answers > 0:
            texts = load_records(records_source, resolve_fields(field_map), **options).dataset
            if "instruction" in texts.column_names:
                wanted = [int(i) for i in split.index[:num_answers]]
                row_of = {int(index): row for row, index in enumerate(texts["index"])}
                rows = texts.select([row_of[i] for i in wanted])
                references = [
                    {"index": i, "instruction": r["instruction"], "input": r["input"], "reference": r["output"]}
                    for i, r in zip(wanted, rows, strict=True)
                ]
        counts = {
            "examples": len(split.index),
            "dropped": dict(split.dropped),
            "skipped": dict(split.skipped),
        }
        sources = [records_source] if isinstance(records_source, str | Path) else list(records_source)
        fingerprint = {"source": split.source, "files": data_fingerprint(sources)}
        if not all(Path(source).exists() for source in sources):  # a Hub dataset: its config, split, revision
            fingerprint |= dict(hub_options or {})
        return cls(split.dataset, groups, field_name, references, split.source, fingerprint, counts)


def prepare_data(
    data_path: str | Sequence[str],
    tokenizer,
    *,
    template,
    max_seq_len: int | None,
    field_map: Mapping[str, str] | None = None,
    group_by: str | None = None,
    num_answers: int = 0,
    val_split: float = 0.0,
    eval_data_path: str | None = None,
    seed: int = 42,
    cache_dir: str | Path | None = None,
    **build_options,
) -> EvalData:
    """Tokenise and mask the records to evaluate, as training does, and group them.

    The records evaluated are `eval_data_path` when given, the part of `data_path` that training with the same
    `val_split` and `seed` held out when `val_split` is given, else all of `data_path`.

    Args:
        data_path: the source(s), as `hf-sft train --data_path` takes them.
        tokenizer: the evaluated model's tokenizer.
        template: the prompt format (`hf_sft.data.get_format`, or `format_of(tokenizer)`).
        max_seq_len: the length limit (`hf_sft.data.resolve_max_seq_len`).
        field_map, group_by, num_answers, cache_dir: as for `EvalData.from_split`.
        val_split, eval_data_path, seed: which records, as above.
        **build_options: the other keywords of `hf_sft.data.build_datasets` (`length_policy`, `skip_bad_records`,
            `num_proc`, `data_weights`, `dataset_config`, `dataset_split`, `dataset_revision`).

    Raises:
        UsageError: a bad source or record, no example left, or a `group_by` field no record has.
    """
    from hf_sft.data import build_datasets

    held_out = bool(val_split or eval_data_path)
    data = build_datasets(
        data_path,
        tokenizer,
        template=template,
        field_map=field_map,
        max_seq_len=max_seq_len,
        val_split=val_split,
        eval_data_path=eval_data_path,
        seed=seed,
        cache_dir=cache_dir,
        **build_options,
    )
    split = data.eval if held_out else data.train
    if split is None:
        raise UsageError(f"--val_split {val_split} of {data.train.source} holds out no example: nothing to evaluate")
    hub = {key: build_options.get(key) for key in ("dataset_config", "dataset_split", "dataset_revision")}
    return EvalData.from_split(
        split,
        eval_data_path or data_path,
        field_map=field_map,
        group_by=group_by,
        num_answers=num_answers,
        cache_dir=cache_dir,
        hub_options={key: value for key, value in hub.items() if value is not None},
    )


def data_fingerprint(sources: Iterable[str | Path]) -> list[dict]:
    """Path, size and sha256 of every local file of `sources` (a folder's files each); a Hub id has none."""
    from hf_sft.data.sources import file_fingerprint

    files = []
    for source in sources:
        path = Path(source)
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files += [{"path": str(p.resolve()), **file_fingerprint(p)} for p in members if p.is_file()]
    return files


# --- scoring ------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Sums over supervised tokens: cross-entropy, count, correct next-token predictions; and examples seen."""

    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0
    examples: int = 0

    def add(self, loss_sum: float, tokens: int, correct: int) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.correct += correct
        self.examples += 1

    def figures(self) -> dict:
        """`loss`, `perplexity`, `accuracy`, `tokens`, `examples` (the means over supervised tokens)."""
        loss = self.loss_sum / self.tokens if self.tokens else float("nan")
        perplexity = math.exp(loss) if loss < 700 else float("inf")
        accuracy = self.correct / self.tokens if self.tokens else float("nan")
        return {
            "loss": loss,
            "perplexity": perplexity,
            "accuracy": accuracy,
            "tokens": self.tokens,
            "examples": self.examples,
        }


@torch.no_grad()
def score(
    model,
    data: EvalData,
    *,
    pad_token_id: int,
    packing: bool,
    batch_size: int,
    dtype: torch.dtype | None = None,
    progress: str | None = None,
) -> dict[str, Tally]:
    """The tallies of `model` on `data`, overall (`OVERALL`) and per group.

    Batches are made by the collator training uses (`hf_sft.data.make_collator`): padded to the longest, or packed
    padding-free into one row whose `position_ids` restart per example (no example attends to another). Each
    supervised position's loss is the cross-entropy of the model's next-token distribution in float32, as the
    training loss computes it; the LM head runs on the positions that carry a label only.

    Args:
        model: a causal LM in eval mode.
        data: the examples and their groups.
        pad_token_id: the tokenizer's pad id (padding only).
        packing: pack each batch into one row instead of padding.
        batch_size: examples per forward.
        dtype: autocast to this dtype (None: the model's own precision).
        progress: the progress bar's label (None: no bar).
    """
    from tqdm.auto import tqdm

    from hf_sft.data import IGNORE_INDEX, make_collator

    collate = make_collator(pad_token_id, packing=packing)
    device = model.device
    tallies = {OVERALL: Tally()}
    n = len(data.groups)
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=progress, unit="batch", file=sys.stderr, disable=progress is None, dynamic_ncols=True)
    for start in bar:
        rows = data.dataset[start : start + batch_size]
        features = [{name: rows[name][i] for name in rows} for i in range(len(rows["input_ids"]))]
        batch = collate(features)
        labels = batch.pop("labels")
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # what each position predicts: the next token
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        inputs = {name: value.to(device) for name, value in batch.items()}
        with _autocast(device, dtype):
            logits = model(**inputs, logits_to_keep=keep.to(device), use_cache=False).logits
        targets = targets[:, keep].to(device)
        supervised = targets != IGNORE_INDEX
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
        correct = (logits.argmax(-1) == targets) & supervised
        if packing:  # one row; an example starts wherever the positions restart
            example = (batch["position_ids"][0] == 0).cumsum(0)[keep] - 1
            example = example.unsqueeze(0).to(device)
        else:
            example = torch.arange(len(features), device=device).unsqueeze(1).expand_as(targets)
        count = len(features)
        ids = example[supervised]
        sums = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, ids, losses[supervised].double())
        tokens = torch.bincount(ids, minlength=count)
        hits = torch.bincount(ids, weights=correct[supervised].double(), minlength=count)
        for row, (loss_sum, n_tokens, n_correct) in enumerate(
            zip(sums.tolist(), tokens.tolist(), hits.tolist(), strict=True)
        ):
            for name in {OVERALL, data.groups[start + row]}:
                tallies.setdefault(name, Tally()).add(loss_sum, n_tokens, round(n_correct))
    return tallies


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --- a whole evaluation -------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """How an evaluation runs: batching as the training run's (`hf-sft eval` defaults to its defaults), answers.

    Attributes:
        batch_size: examples per forward.
        packing: padding-free packing of each batch.
        num_answers: records whose greedy answers are shown side by side.
        max_new_tokens: the longest answer.
        dtype: autocast dtype (None: float32).
        progress: show a progress bar.
    """

    batch_size: int
    packing: bool
    num_answers: int = 3
    max_new_tokens: int = 64
    dtype: torch.dtype | None = None
    progress: bool = True


def evaluate(
    model: LoadedModel,
    data: EvalData,
    *,
    template,
    settings: EvalSettings,
    base: LoadedModel | None = None,
    command: str,
    data_settings: Mapping[str, Any] | None = None,
) -> dict:
    """Score `model` (and `base` on the same tokens), answer the reference records; the results as a dict.

    Args:
        model: the model evaluated.
        data: the examples (tokenised with `model`'s tokenizer; `base` reads the same tokens).
        template: the prompt format of the answers' prompts.
        settings: batch size, packing, answers.
        base: the model to compare with, or None.
        command: the command line, recorded.
        data_settings: how the data was read (template, length limit, ...), recorded.

    Returns:
        What `eval_results.json` holds: `command`, `model`, `base`, `data`, `settings`, `overall`, `groups`
        (each `{"model": figures, "base": figures, "difference": model minus base}`), `answers`.
    """
    from hf_sft import __version__

    pad_id = model.tokenizer.pad_token_id
    pad_id = model.tokenizer.eos_token_id if pad_id is None else pad_id
    options = {"pad_token_id": pad_id, "packing": settings.packing, "batch_size": settings.batch_size}
    options["dtype"] = settings.dtype
    runs = {"model": model}
    if base is not None:
        check_same_vocabulary(model, base)
        runs["base"] = base
    scores = {
        role: score(loaded.model, data, progress=f"eval {role}" if settings.progress else None, **options)
        for role, loaded in runs.items()
    }
    names = [OVERALL, *sorted(set(data.groups) - {OVERALL})]
    table = {name: _group_entry({role: tallies[name] for role, tallies in scores.items()}) for name in names}
    answers = []
    for record in data.references[: settings.num_answers]:
        entry = dict(record)
        for role, loaded in runs.items():
            entry[role] = _answer(loaded.model, model.tokenizer, template, record, settings.max_new_tokens)
        answers.append(entry)
    return {
        "command": command,
        "hf_sft_version": __version__,
        "model": model.origin,
        "base": base.origin if base is not None else None,
        "data": {**data.fingerprint, "group_by": data.group_by, **data.counts, **(data_settings or {})},
        "settings": {
            "batch_size": settings.batch_size,
            "packing": settings.packing,
            "dtype": str(settings.dtype or torch.float32).removeprefix("torch."),
            "max_new_tokens": settings.max_new_tokens,
        },
        "overall": table[OVERALL],
        "groups": {name: table[name] for name in names if name != OVERALL},
        "answers": answers,
    }


def _group_entry(tallies: Mapping[str, Tally]) -> dict:
    entry = {role: tally.figures() for role, tally in tallies.items()}
    if "base" in entry:
        entry["difference"] = {name: entry["model"][name] - entry["base"][name] for name in METRICS}
    return entry


def _answer(model, tokenizer, template, record: Mapping[str, str], max_new_tokens: int) -> str:
    from hf_sft.generate import generate_response

    try:
        return generate_response(
            model, tokenizer, record["instruction"], record["input"], max_new_tokens, template=template
        )
    except UsageError as err:  # a prompt longer than the model's context: say so in the table
        return f"({err})"


# --- outputs ------------------------------------------------------------------------------------------------------


def render_report(results: Mapping[str, Any]) -> str:
    """`eval_report.html`: one self-contained page (inline SVG, no script, no external reference).

    Shows the per-group table (each figure rounded, its exact value in the cell's `title`), a bar chart of the loss
    per group for both models, and the answers side by side with the reference.
    """
    roles = ["model", "base"] if results.get("base") else ["model"]
    rows = [(OVERALL, results["overall"]), *results["groups"].items()]
    head = ["group", "examples", "supervised tokens"]
    head += [f"{metric} ({role})" for role in roles for metric in METRICS]
    if "base" in roles:
        head += [f"{metric} difference" for metric in METRICS]
    body = []
    for name, entry in rows:
        cells = [_cell(name), _number(entry["model"]["examples"]), _number(entry["model"]["tokens"])]
        cells += [_number(entry[role][metric]) for role in roles for metric in METRICS]
        if "base" in roles:
            cells += [_number(entry["difference"][metric], signed=True) for metric in METRICS]
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead>"
    table += "<tbody>" + "\n".join(body) + "</tbody></table>"
    answers = ""
    if results["answers"]:
        answer_head = ["record", "instruction", "input", "reference", *roles]
        answer_rows = [
            "<tr>"
            + _number(a["index"])
            + "".join(_cell(a[key]) for key in ("instruction", "input", "reference", *roles))
            + "</tr>"
            for a in results["answers"]
        ]
        answers = (
            "<h2>Greedy answers</h2><table><thead><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in answer_head)
            + "</tr></thead><tbody>"
            + "\n".join(answer_rows)
            + "</tbody></table>"
        )
    model, base = results["model"], results.get("base")
    described = f"{html.escape(model['path'])} (revision {html.escape(str(model['revision']))})"
    if base:
        described += f" against {html.escape(base['path'])} (revision {html.escape(str(base['revision']))})"
    data = results["data"]
    return _PAGE.format(
        model=described,
        data=html.escape(str(data["source"])),
        group_by=html.escape(str(data["group_by"] or "no grouping")),
        command=html.escape(results["command"]),
        table=table,
        chart=loss_chart(rows, roles),
        answers=answers,
    )


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>hf-sft eval</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
code {{ background: #f4f4f4; padding: 0.1em 0.3em; }}
</style></head><body>
<h1>Evaluation</h1>
<p>Model: {model}</p>
<p>Data: {data}; groups by: {group_by}</p>
<p>Command: <code>{command}</code></p>
<p>Loss, perplexity and next-token accuracy over the supervised tokens only (the response and its end-of-sequence
token, masked as in training). Lower loss and perplexity, higher accuracy are better; a difference is the model's
figure minus the base's. Hover a figure for its exact value.</p>
<h2>Per group</h2>
{table}
<h2>Loss per group</h2>
{chart}
{answers}
</body></html>
"""
# How the two files an evaluation writes begin: an existing file of that name that begins otherwise is not ours,
# and `hf-sft eval` refuses to replace it (`hf_sft.writer.check_destination`).
OUTPUT_MARKERS = {
    RESULTS_FILE: b'{\n  "command": ',  # `hf-sft eval` or the training run that evaluated its final folder
    REPORT_FILE: _PAGE[: _PAGE.index("</title>")].encode(),
}

_COLOURS = {"model": "#3b75af", "base": "#ef8636"}


def loss_chart(rows: Sequence[tuple[str, Mapping]], roles: Sequence[str]) -> str:
    """An inline SVG bar chart of the loss per group, one bar per model."""
    bar, gap, label_width, width = 14, 10, 180, 420
    top = 24
    finite = [entry[role]["loss"] for _, entry in rows for role in roles if math.isfinite(entry[role]["loss"])]
    most = max(finite, default=1.0) or 1.0
    height = top + len(rows) * (bar * len(roles) + gap) + 10
    parts = [f'<svg width="{label_width + width + 90}" height="{height}" role="img" aria-label="loss per group">']
    for i, role in enumerate(roles):
        x = label_width + i * 120
        parts.append(f'<rect x="{x}" y="4" width="12" height="12" fill="{_COLOURS[role]}"/>')
        parts.append(f'<text x="{x + 16}" y="14" font-size="12">{role}</text>')
    y = top
    for name, entry in rows:
        parts.append(f'<text x="0" y="{y + bar * len(roles) / 2 + 4}" font-size="12">{html.escape(name)}</text>')
        for role in roles:
            loss = entry[role]["loss"]
            length = width * loss / most if math.isfinite(loss) else 0
            parts.append(
                f'<rect x="{label_width}" y="{y}" width="{length:.1f}" height="{bar - 2}" fill="{_COLOURS[role]}">'
                f"<title>{html.escape(name)}, {role}: {loss!r}</title></rect>"
            )
            parts.append(
                f'<text x="{label_width + length + 4:.1f}" y="{y + bar - 4}" font-size="11">{loss:.3f}</text>'
            )
            y += bar
        y += gap
    parts.append("</svg>")
    return "\n".join(parts)


def _cell(text: str) -> str:
    return f"<td>{html.escape(str(text))}</td>"


def _number(value: float | int, signed: bool = False) -> str:
    if isinstance(value, int):
        return f'<td class="n">{value}</td>'
    shown = f"{value:+.4f}" if signed else f"{value:.4f}"
    return f'<td class="n" title="{value!r}">{shown}</td>'


def card_with_results(card_path: str | Path, results: Mapping[str, Any], model_name: str | None = None) -> str:
    """The text of the model card at `card_path` (a new one if absent) with the results as model-index metadata.

    The card's text and other metadata are kept; earlier `hf-sft eval` results on the same data are replaced. Each
    group is an `EvalResult` whose `dataset_config` is the group's name (the overall figures have none), with the
    loss, perplexity and accuracy as its metrics.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    card_path = Path(card_path)
    if card_path.is_file():
        with bad_input(f"{card_path}: cannot read the model card"):
            card = ModelCard.load(card_path)
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# {Path(card_path).parent.name}\n")
    data = results["data"]
    dataset_name = Path(str(data["source"]).removesuffix(" (held out)")).name
    split = "held out" if str(data["source"]).endswith("(held out)") else "all"
    kept = [
        result
        for result in card.data.eval_results or []
        if not (result.task_type == "text-generation" and result.dataset_name == dataset_name)
    ]
    groups = [(None, results["overall"]), *results["groups"].items()]
    new = [
        EvalResult(
            task_type="text-generation",
            dataset_type="json" if Path(dataset_name).suffix else dataset_name,
            dataset_name=dataset_name,
            dataset_config=name,
            dataset_split=split,
            metric_type=metric,
            metric_name=f"{metric} ({name or OVERALL})",
            metric_value=_yaml_number(entry["model"][metric]),
        )
        for name, entry in groups
        for metric in METRICS
    ]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or model_name or card_path.parent.resolve().name
    return str(card.content)


def _yaml_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def write_outputs(
    results: Mapping[str, Any], out_dir: str | Path, *, card_folder: str | Path | None = None
) -> list[Path]:
    """Write `eval_results.json` and `eval_report.html` into `out_dir`, and the model card into `card_folder`.

    The files are staged first and moved in together (`hf_sft.writer.replace_files`): an evaluation interrupted
    before that leaves every final name as it was; one cut short during the moves leaves the folder marked
    incomplete, which `recover_interrupted_write` (run first by `hf-sft eval`) undoes. The card goes with the other
    two when `card_folder` is `out_dir`.

    Returns:
        The paths written.
    """
    import json

    from hf_sft.writer import replace_files, write_text

    out_dir = Path(out_dir)
    files = {
        RESULTS_FILE: json.dumps(results, indent=2, ensure_ascii=False) + "\n",
        REPORT_FILE: render_report(results),
    }
    card_text = None
    if card_folder is not None:
        card_text = card_with_results(Path(card_folder) / CARD_FILE, results)
        if Path(card_folder).resolve() == out_dir.resolve():
            files[CARD_FILE] = card_text
            card_text = None
    with replace_files(out_dir, replaces=list(files), note=_INTERRUPTED_NOTE) as staging:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
    written = [out_dir / name for name in files]
    if card_text is not None:
        write_text(Path(card_folder) / CARD_FILE, card_text)
        written.append(Path(card_folder) / CARD_FILE)
    return written


def recover_interrupted_write(folder: str | Path) -> bool:
    """Undo what a `write_outputs` cut short during its final moves left in `folder`, so it can run again.

    Such a folder is marked incomplete (`hf_sft.writer.check_complete` refuses it) although only the evaluation's
    files were being replaced: the model is intact, the card is the old or the new one whole (each move is atomic),
    and the results and report may be from different runs. Those two and the mark are removed. A folder marked by
    anything else (a training run's final save) is left alone.

    Returns:
        Whether there was such a write to undo.
    """
    from hf_sft.writer import PENDING_RECORD, incomplete, remove

    folder = Path(folder)
    if not folder.is_dir() or incomplete(folder) != _INTERRUPTED_NOTE:
        return False
    for name in (RESULTS_FILE, REPORT_FILE, PENDING_RECORD):
        remove(folder / name)
    return True


def evaluate_after_training(
    model_dir: str | Path,
    eval_split,
    *,
    records_source: str | Sequence[str],
    base: str | None,
    command: str,
    batch_size: int,
    packing: bool,
    base_tokenizer_path: str | None = None,
    special_tokens: Mapping[str, str | None] | None = None,
    field_map: Mapping[str, str] | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    num_answers: int = EvalSettings.num_answers,
    max_new_tokens: int = EvalSettings.max_new_tokens,
    cache_dir: str | Path | None = None,
    hub_options: Mapping[str, str | None] | None = None,
    data_settings: Mapping[str, Any] | None = None,
) -> dict:
    """At the end of a training run with an evaluation split: evaluate the final folder against its base.

    The final folder is read back from disk (what a push uploads), the split is used as the run tokenised it, and
    `eval_results.json`, `eval_report.html` and the card's model-index are written into `model_dir`, exactly as
    `hf-sft eval model_dir --data_path SOURCE --compare BASE` would. Call it on the main process only, after the
    final model and its card are saved and before the push.

    Args:
        model_dir: the run's final model folder.
        eval_split: the run's evaluation split (`SFTData.eval`, a `hf_sft.data.TokenizedSplit`).
        records_source: the source that split was read from (`--eval_data_path`, else `--data_path`).
        base: the model the run started from (`--pretrained_ckpt_path`), or None for a model trained from scratch
            (no comparison).
        command: the training command line, recorded.
        batch_size: the run's evaluation batch size (`per_device_eval_batch_size`).
        packing: the run's `--packing`.
        base_tokenizer_path: `--tokenizer_path` (needed when `base` is a legacy checkpoint).
        special_tokens: the run's BOS/EOS/PAD/UNK overrides.
        field_map: the run's `--field_map`.
        device: where to evaluate (default CUDA when available).
        dtype: autocast dtype (the run's bf16/fp16, or None for float32).
        num_answers, max_new_tokens: the side-by-side answers.
        cache_dir: `datasets` cache folder.
        hub_options: `dataset_config`, `dataset_split`, `dataset_revision` of a Hub source.
        data_settings: template, length limit and policy of the run, recorded.

    Returns:
        The results (as written to `eval_results.json`).
    """
    from hf_sft.data import format_of

    model = load_model(model_dir, device=device)
    base_model = None
    if base:
        base_model = load_model(
            base, tokenizer_path=base_tokenizer_path, special_tokens=special_tokens, device=str(model.model.device)
        )
    data = EvalData.from_split(
        eval_split,
        records_source,
        field_map=field_map,
        num_answers=num_answers,
        cache_dir=cache_dir,
        hub_options=hub_options,
    )
    settings = EvalSettings(batch_size, packing, num_answers, max_new_tokens, dtype)
    results = evaluate(
        model,
        data,
        template=format_of(model.tokenizer),
        settings=settings,
        base=base_model,
        command=command,
        data_settings=data_settings,
    )
    write_outputs(results, model_dir, card_folder=model_dir)
    return results


def _column_by_index(dataset, column: str) -> dict[int, str] | None:
    if column not in dataset.column_names:
        return None
    return dict(zip(dataset["index"], dataset[column], strict=True))


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
