"""The GGUF export checks itself: texts tokenized by the folder's tokenizer and by the written file, id for id.

The texts are the training format's prompts (what `hf-sft generate` feeds the model, BOS included) and full
training texts (the ids training used) for built-in sample records and for the user's records (`--check_data`),
plus raw probe texts (digits, contractions, whitespace runs, accents, CJK, emoji, special tokens inside text)
encoded with and without special tokens, which checks the BOS/EOS the file adds.

The file's side is llama.cpp itself (llama-server's `/tokenize`) when xllamacpp is installed, else a read-back of the
file's vocabulary (`hf_sft.export.gguf_tokenize`); the report says which.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hf_sft.data import Encoder, encode_prompt, tokenize_and_mask, unencodable_characters
from hf_sft.export.gguf_tokenize import file_tokenizer, lost_symbols_break

SAMPLE_RECORDS = (
    {"instruction": "Give me three ideas for a rainy day.", "input": "", "output": "Read, bake bread, or nap."},
    {
        "instruction": "When did Virgin Australia start operating?",
        "input": "Virgin Australia, the trading name of Virgin Australia Airlines Pty Ltd, commenced services on "
        "31 August 2000 as Virgin Blue, with two aircraft on a single route.[3]",
        "output": "Virgin Australia commenced services on 31 August 2000.",
    },
    {
        "instruction": "Why isn't 12,345.67 prime? Can't you check 2+2=4 & 10% off?",
        "input": "  leading spaces, tabs\tand\nnew lines\n\n",
        "output": "It's not an integer; they'll say it's 12345.67 -- and we'd agree.\n\nDone.",
    },
    {
        "instruction": "Translate: café, naïve, Straße, 東京, 😀 — “quoted” text…",
        "input": "",
        "output": "Kaffee, naiv, street, Tokyo, smile.",
    },
)
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What colour is grass?"},
    {"role": "assistant", "content": "Grass is green."},
    {"role": "user", "content": "And the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
]
RAW_PROBES = (
    "Hello world",
    "I'm sure you're right; they've gone, we'll see, she'd know, it's 'quoted'.",
    "3.14159 1234567 2024-01-01 0x1F 1,000,000",
    "multiple   spaces\tand\ttabs\n\nand new lines\r\nand trailing spaces   ",
    "accents éàüñ, CJK 漢字かな, emoji 🤖👍🏽, arrows → ⇒, math ∑∫√",
    "code: def f(x):\n    return x**2  # comment {braces} [brackets] <angle>",
)


@dataclass(frozen=True)
class Probe:
    """One text and the ids the folder's tokenizer gives it.

    Attributes:
        what: where the text comes from, for the report.
        text: the text.
        expected: the folder's ids.
        add_special: encode with special tokens (BOS/EOS as the tokenizer adds them).
    """

    what: str
    text: str
    expected: list[int]
    add_special: bool = False


@dataclass
class CheckReport:
    """What the self-check found.

    Attributes:
        by: what tokenized the file's side ("llama.cpp bN, xllamacpp V" or the read-back fallback).
        checked: number of texts compared.
        mismatches: `(probe, ids from the file)` for every text that differs, lost characters aside.
        lost_texts: texts holding characters the tokenizer cannot encode (not in its byte alphabet).
        lost_differences: those of them that the file tokenizes differently, exactly as if each lost character
            ended a word (llama.cpp keeps an unknown symbol until the end, so it blocks merges, then drops it; ours
            drops it first and merges across): no vocabulary can make llama.cpp merge across a symbol it keeps.
        lost_characters: the characters concerned.
    """

    by: str
    checked: int = 0
    mismatches: list[tuple[Probe, list[int]]] = field(default_factory=list)
    lost_texts: int = 0
    lost_differences: list[tuple[Probe, list[int]]] = field(default_factory=list)
    lost_characters: str = ""

    def summary(self) -> str:
        """One line: how many texts, how many mismatches, by what."""
        line = f"tokenizer check: {self.checked} texts, {len(self.mismatches)} mismatches"
        if self.lost_texts:
            shown = self.lost_characters[:20] + ("..." if len(self.lost_characters) > 20 else "")
            line += (
                f"; {self.lost_texts} texts hold characters the tokenizer cannot encode ({shown}), which it drops: "
                f"llama.cpp tokenizes {len(self.lost_differences)} of them differently around those characters"
            )
        return f"{line} ({self.by})"

    def first_mismatch(self) -> str:
        """The first mismatch, readably (empty when none)."""
        if not self.mismatches:
            return ""
        probe, got = self.mismatches[0]
        at = next((i for i, (a, b) in enumerate(zip(probe.expected, got, strict=False)) if a != b), None)
        at = min(len(probe.expected), len(got)) if at is None else at
        return (
            f"{probe.what}: {probe.text[:60]!r}... differs at token {at}: "
            f"ours {probe.expected[at : at + 4]}, llama.cpp's {got[at : at + 4]}"
        )


def probes(tokenizer, template, records: Iterable[dict] = (), prefix_space: bool = False) -> list[Probe]:
    """The texts to check, with the folder's ids.

    Args:
        tokenizer: the folder's `PreTrainedTokenizerFast`.
        template: its training format (`hf_sft.data.format_of(tokenizer)`).
        records: extra normalised records (`instruction`/`input`/`output`, or `messages`), e.g. the user's data.
        prefix_space: the tokenizer adds a prefix space (llama.cpp does not): raw probes then start with a space,
            as the format's pieces do.
    """
    encoder = Encoder.from_tokenizer(tokenizer)
    out = []
    samples = [*SAMPLE_RECORDS, {"messages": SAMPLE_CONVERSATION}]
    for i, record in enumerate([*samples, *records]):
        what = f"sample {i}" if i < len(samples) else f"record {i - len(samples)}"
        out += _record_probes(what, record, tokenizer, encoder, template)
    specials = [tokenizer.bos_token, tokenizer.eos_token]
    raw = [*RAW_PROBES, f"{specials[0]} starts{specials[1]} and ends {specials[1]}"]
    for i, text in enumerate(raw):
        text = f" {text}" if prefix_space else text
        plain = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        special = tokenizer.backend_tokenizer.encode(text, add_special_tokens=True).ids
        out += [Probe(f"probe {i}", text, plain), Probe(f"probe {i} with special tokens", text, special, True)]
    return out


def format_texts(tokenizer, template) -> list[str]:
    """The format's renderings of the sample records (for `gguf_vocab.check_prefix_space`)."""
    encoder = Encoder.from_tokenizer(tokenizer)
    samples = [*SAMPLE_RECORDS, {"messages": SAMPLE_CONVERSATION}]
    return [probe.text for record in samples for probe in _record_probes("", record, tokenizer, encoder, template)]


def check_file(path: Path, probe_list: list[Probe], tokenizer, pre: str) -> CheckReport:
    """Tokenize every probe with the GGUF at `path` and compare with the folder's ids.

    Args:
        path: the GGUF file.
        probe_list: from `probes`.
        tokenizer: the folder's tokenizer (to recognise characters it cannot encode).
        pre: the file's pre-tokenizer name.
    """
    tokenize, by, close = file_tokenizer(path, pre)
    encoder = Encoder.from_tokenizer(tokenizer)
    breaking = lost_symbols_break(tokenizer)
    report, lost = CheckReport(by=by, checked=len(probe_list)), set()
    try:
        for probe in probe_list:
            got = tokenize(probe.text, probe.add_special)
            chars = unencodable_characters(encoder, [probe.text])
            lost.update(chars)
            report.lost_texts += bool(chars)
            if got == probe.expected:
                continue
            explained = chars and got == breaking.encode(probe.text, add_special_tokens=probe.add_special).ids
            (report.lost_differences if explained else report.mismatches).append((probe, got))
    finally:
        close()
    report.lost_characters = "".join(sorted(lost))
    return report


def _record_probes(what: str, record: dict, tokenizer, encoder: Encoder, template) -> list[Probe]:
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    if "messages" in record:
        pieces = template.segments(record["messages"], bos)
        last = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
        full = "".join(text + (eos if supervised else "") for text, supervised in pieces[: last + 1])
        prompt = pieces[0][0]
        prompt_ids = encoder.encode_prompts([prompt])[0]
    else:
        prompt = template.prompt_text(record["instruction"], record["input"], bos_token=bos)
        full = prompt + template.response_text(record["output"]) + eos
        prompt_ids = encode_prompt(tokenizer, record["instruction"], record["input"], template=template)
    full_ids = tokenize_and_mask({key: [value] for key, value in record.items()}, encoder, template)["input_ids"][0]
    return [Probe(f"{what} prompt", prompt, prompt_ids), Probe(f"{what} training text", full, full_ids)]


def records_for_check(path: str | Path) -> tuple[list[dict], str | None]:
    """The valid records of `--check_data PATH`, read and validated as training reads them.

    Bad records are left out of the check (a run never trains on them: it refuses them, or skips them with
    `--skip_bad_records`), so export takes no flag for them.

    Returns:
        `(records, note)`: the normalised records, and a note naming the bad records left out (None if none).
    """
    from hf_sft.data import load_records

    loaded = load_records(path, skip_bad_records=True)
    dataset = loaded.dataset
    columns = [c for c in ("messages", "instruction", "input", "output") if c in dataset.column_names]
    note = None
    if loaded.skipped:
        count = sum(loaded.skipped.values())
        note = (
            f"--check_data {path}: {count} bad record{'s' if count > 1 else ''} left out of the check (first: "
            f"{loaded.skipped_messages[0]}); a run refuses {'them' if count > 1 else 'it'} unless it skips bad records"
        )
    return [{c: row[c] for c in columns} for row in dataset], note
