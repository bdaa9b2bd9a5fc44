"""The GGUF vocabulary: llama.cpp tokenizes as our tokenizers do (every shared Dolly record), or the export refuses."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.gguf_folders import dolly
from helpers.legacy_checkpoints import SIMPLE_LLAMA, SIMPLE_LLAMA_SPECIALS, shared_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.cli import main
from hf_sft.data import Encoder, format_of, get_format, install_chat_template, unencodable_characters
from hf_sft.export.gguf_check import check_file, lost_symbols_break, probes, records_for_check
from hf_sft.export.gguf_vocab import PRE_TOKENIZERS, build_vocab
from hf_sft.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
CASES = [(family, stage) for family in ("nanogpt", "llama") for stage in ("converted", "trained")]


def export(folder: Path, out: Path, *flags: str) -> int:
    return main(["export", str(folder), "--to", "gguf", "--out", str(out), *flags])


def check_dolly(folder: Path, path: Path, shared: Path):
    tokenizer = load_tokenizer(folder)
    vocab = build_vocab(tokenizer, tokenizer.backend_tokenizer.get_vocab_size())
    records, _ = records_for_check(dolly(shared))
    return tokenizer, check_file(
        path, probes(tokenizer, format_of(tokenizer), records, vocab.prefix_space), tokenizer, vocab.pre
    )


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_llama_cpp_tokenizes_every_dolly_record_as_we_do(shared_dir, gguf_folders, gguf_files, case):
    """Prompts (BOS included) and whole training texts of all 198 records, plus the built-in probes."""
    tokenizer, report = check_dolly(gguf_folders[case], gguf_files[case], shared_dir)
    assert report.by.startswith("llama.cpp")
    assert report.checked == 2 * 198 + 2 * 5 + 2 * 7
    assert report.mismatches == []
    if case[0] == "nanogpt":  # dolly_bpe_4k holds all 256 byte symbols
        assert report.lost_texts == 0 and report.lost_differences == []
    else:
        # simple_llama's 8k vocabulary lacks 161 byte symbols (accented letters, IPA, dashes, CJK, emoji). Ours
        # drops such a symbol and merges across it; llama.cpp keeps it, so it blocks merges, then drops it. Every
        # text that differs differs exactly so, and holds such a character.
        encoder, breaking = Encoder.from_tokenizer(tokenizer), lost_symbols_break(tokenizer)
        assert report.lost_texts > 0 and report.lost_differences
        for probe, got in report.lost_differences:
            assert unencodable_characters(encoder, [probe.text])
            assert breaking.encode(probe.text, add_special_tokens=probe.add_special).ids == got
        records = {p.what.split()[1] for p, _ in report.lost_differences if p.what.startswith("record")}
        assert len(records) == 10  # of 198: those with such a character inside a word (5, 46, 71, 95, 98, ...)


def test_readback_without_llama_cpp_agrees_with_llama_cpp(shared_dir, gguf_folders, gguf_files, monkeypatch):
    """On the 8k tokenizer, whose lost byte symbols make the read-back model llama.cpp's word breaks too."""
    case = ("llama", "trained")
    _, real = check_dolly(gguf_folders[case], gguf_files[case], shared_dir)
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # import fails
    _, readback = check_dolly(gguf_folders[case], gguf_files[case], shared_dir)
    assert readback.by == "read back with gguf; xllamacpp is not installed (pip install 'hf-sft[llama-cpp]')"
    differences = [[(p.what, ids) for p, ids in r.lost_differences] for r in (readback, real)]
    assert differences[0] == differences[1]
    assert readback.mismatches == real.mismatches == []


def trained_tokenizer(shared: Path, pre_tokenizer, decoder=None, normalizer=None, **bpe) -> Tokenizer:
    """A byte-level BPE of 600 tokens trained on the shared Dolly sample, with the given pre-tokenizer."""
    backend = Tokenizer(models.BPE(**bpe))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder or decoders.ByteLevel()
    if normalizer is not None:
        backend.normalizer = normalizer
    texts = [" ".join(r.values()) for r in map(json.loads, dolly(shared).read_text().splitlines())]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(texts, trainer)
    return backend


def model_folder(folder: Path, backend: Tokenizer, template: str = "seed", **specials: str) -> Path:
    """A random LLaMA-style model saved with this tokenizer, trained-format chat template installed."""
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = load_tokenizer(folder / "tokenizer.json", **specials)
    install_chat_template(tokenizer, get_format(template))
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = HfSftGPTConfig(
        family="llama", vocab_size=backend.get_vocab_size(), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, multiple_of=16, **ids,
    )  # fmt: skip
    torch.manual_seed(0)
    HfSftGPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def split_then_bytes(regex: str, prefix_space: bool = False) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=False)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])


@pytest.mark.parametrize(
    ("pre", "ignore_merges"),
    [("gpt-2", False), ("llama-bpe", True), ("qwen2", False)],
)
def test_each_pre_tokenizer_llama_cpp_knows_travels_exactly(shared_dir, tmp_path, capsys, pre, ignore_merges):
    regex = PRE_TOKENIZERS[pre][0]
    pre_tokenizer = pre_tokenizers.ByteLevel() if regex is None else split_then_bytes(regex)
    backend = trained_tokenizer(shared_dir, pre_tokenizer, ignore_merges=ignore_merges)
    folder = model_folder(tmp_path / "model", backend)
    assert export(folder, tmp_path / "model.gguf", "--check_data", str(dolly(shared_dir))) == 0
    out = capsys.readouterr().out
    assert "tokenizer check: 420 texts, 0 mismatches (llama.cpp" in out, out
    assert build_vocab(load_tokenizer(folder), backend.get_vocab_size()).pre == pre


REFUSED = {
    "metaspace": (dict(pre_tokenizer=pre_tokenizers.Metaspace()), "pre_tokenizer Metaspace("),
    "whitespace": (dict(pre_tokenizer=pre_tokenizers.Whitespace()), "pre_tokenizer Whitespace("),
    "other_regex": (
        dict(pre_tokenizer=split_then_bytes(r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+")),
        "pre_tokenizer Sequence",
    ),
    "split_prefix": (dict(pre_tokenizer=split_then_bytes(PRE_TOKENIZERS["qwen2"][0], True)), "add_prefix_space=True"),
    "normalizer": (dict(pre_tokenizer=pre_tokenizers.ByteLevel(), normalizer=normalizers.NFKC()), "normalizer NFKC"),
    "ignore_merges": (dict(pre_tokenizer=pre_tokenizers.ByteLevel(), ignore_merges=True), "ignore_merges=True"),
    "decoder": (dict(pre_tokenizer=pre_tokenizers.ByteLevel(), decoder=decoders.Metaspace()), "decoder Metaspace"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_tokenizer_llama_cpp_cannot_reproduce_is_refused_naming_the_component(shared_dir, tmp_path, capsys, kind):
    options, named = REFUSED[kind]
    folder = model_folder(tmp_path / "model", trained_tokenizer(shared_dir, **options))
    assert export(folder, tmp_path / "model.gguf") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot export this tokenizer to gguf: llama.cpp cannot reproduce its "), err
    assert named in err, err
    assert list(tmp_path.iterdir()) == [tmp_path / "model"]


def test_prefix_space_is_refused_for_a_format_whose_text_starts_without_one(shared_dir, tmp_path, capsys):
    """simple_llama's ByteLevel adds a prefix space: exact with seed's ' Instruction:', not with alpaca's 'Below'."""
    backend = Tokenizer.from_file(str(shared_tokenizer(shared_dir, SIMPLE_LLAMA)))
    folder = model_folder(tmp_path / "alpaca", backend, template="alpaca", **SIMPLE_LLAMA_SPECIALS)
    assert export(folder, tmp_path / "alpaca.gguf") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "add_prefix_space: true" in err and "'alpaca' format renders 'Below is an instruction" in err, err
    folder = model_folder(tmp_path / "seed", backend, template="seed", **SIMPLE_LLAMA_SPECIALS)
    assert export(folder, tmp_path / "seed.gguf") == 0


def test_padded_embedding_rows_become_unused_tokens(tmp_path):
    tokenizer = load_tokenizer(Path(__file__).parent / "fixtures" / "tiny_bpe.json")
    vocab = build_vocab(tokenizer, 448)  # nanoGPT pads its vocabulary to a multiple of 64
    assert len(vocab.tokens) == 448 and vocab.tokens[400] == "[PAD400]" and set(vocab.token_types[400:]) == {5}
    assert vocab.token_types[:4] == [3, 3, 3, 3] and vocab.special_ids == {"bos": 1, "eos": 2, "pad": 0, "unk": 3}
