"""`hf-sft export --to gguf`: what the file holds, the writer's rules, the self-check, llama-server's chat."""

from pathlib import Path

import gguf
import pytest

from hf_sft.cli import main
from hf_sft.export.gguf_file import LLAMA_CPP_END_TOKENS, export_gguf
from hf_sft.export.gguf_vocab import GGUFVocab
from hf_sft.export.llama_server import LlamaServer
from hf_sft.generate import generate_response, load_for_generation
from hf_sft.tokenizer import load_tokenizer
from hf_sft.writer import leftovers

pytestmark = pytest.mark.slow
HINT = "choose another path, or pass --overwrite to replace it"
INSTRUCTIONS = ("Give me three ideas for a rainy day.", "What is the capital of Norway?")


def export(capsys, folder: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["export", str(folder), "--to", "gguf", "--out", str(out), *flags])
    out_text, err = capsys.readouterr()
    return code, out_text, err.strip().splitlines()[-1] if err.strip() else ""


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_file_carries_architecture_tokenizer_and_chat_template(gguf_folders, tmp_path, capsys, family):
    folder = gguf_folders[family, "trained"]
    code, out, _ = export(capsys, folder, tmp_path / "sft.gguf")
    arch = {"nanogpt": "gpt2", "llama": "llama"}[family]
    assert code == 0
    assert f"to gguf ({arch}, f32): {tmp_path / 'sft.gguf'}" in out and "0 mismatches" in out
    # simple_llama's vocabulary has <EOT>, one of llama.cpp's end-of-generation texts; both pad tokens are texts of
    # its fill-in-the-middle pad, which it ends at too.
    also = {"nanogpt": "'[PAD]' (0)", "llama": "'<PAD>' (2), '<EOT>' (9)"}[family]
    assert f"note: llama.cpp also ends generation at {also}: " in out
    tokenizer = load_tokenizer(folder)
    meta = metadata(tmp_path / "sft.gguf")
    assert meta["general.architecture"] == arch and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.add_bos_token"] is True  # training's tokenizer adds BOS, as the seed format starts
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta[f"{arch}.context_length"] == 128
    modelfile = (tmp_path / "sft.Modelfile").read_text()
    assert modelfile.splitlines()[2] == "FROM ./sft.gguf" and "PARAMETER num_ctx 128" in modelfile
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.Modelfile", "sft.gguf"]


@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_llama_server_chat_completions_answer_as_hf_sft_generate(gguf_folders, tmp_path, capsys, family):
    """llama-server formats the chat with the file's own template, as training did, and stops at EOS."""
    folder = gguf_folders[family, "trained"]
    assert export(capsys, folder, tmp_path / "sft.gguf")[0] == 0
    model, tokenizer = load_for_generation(folder, device="cpu")
    with LlamaServer(tmp_path / "sft.gguf", n_ctx=128) as llm:
        for instruction in INSTRUCTIONS:
            ours = generate_response(model, tokenizer, instruction, max_new_tokens=24)
            reply = llm.chat([{"role": "user", "content": instruction}], max_tokens=24)
            assert reply["choices"][0]["message"]["content"].strip() == ours


@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_llama_server_ends_generation_exactly_at_eos_and_the_tokens_the_note_names(gguf_folders, gguf_files, family):
    """Each token forced in turn: llama-server stops at it (end of generation) or goes on, as the export predicts."""
    tokenizer = load_tokenizer(gguf_folders[family, "trained"])
    vocab = tokenizer.get_vocab()
    ends = {i for token, i in vocab.items() if token in LLAMA_CPP_END_TOKENS} | {tokenizer.eos_token_id}
    prompt = [tokenizer.bos_token_id]
    with LlamaServer(gguf_files[family, "trained"], n_ctx=128) as llm:
        for token in sorted(ends | {i for i in tokenizer.all_special_ids if i not in ends}):
            answer = llm.complete(prompt, 2, logit_bias=[[token, 1e9]])
            stopped = answer["stop_type"] == "eos" and answer["tokens_predicted"] == 1
            assert stopped == (token in ends), (token, tokenizer.convert_ids_to_tokens(token), answer["stop_type"])


def test_existing_files_are_refused_unless_overwrite(gguf_folders, tmp_path, capsys):
    folder = gguf_folders["nanogpt", "converted"]
    (tmp_path / "sft.gguf").write_text("mine")
    code, _, err = export(capsys, folder, tmp_path / "sft.gguf")
    assert code == 2 and err == f"error: --out {tmp_path / 'sft.gguf'} already exists: {HINT}"
    assert (tmp_path / "sft.gguf").read_text() == "mine"
    (tmp_path / "sft.gguf").unlink()
    (tmp_path / "sft.Modelfile").write_text("mine")
    assert export(capsys, folder, tmp_path / "sft.gguf")[0] == 2 and not (tmp_path / "sft.gguf").exists()
    done = export_gguf(folder, tmp_path / "sft.gguf", overwrite=True)
    assert done.path.read_bytes()[:4] == b"GGUF" and done.modelfile.read_text().startswith("# Ollama Modelfile")


@pytest.mark.parametrize(
    ("out", "flags", "message"),
    [
        ("sft.bin", [], "--to gguf writes a .gguf file"),
        ("sft.gguf", ["--outtype", "q4_0"], "--outtype must be one of f32, f16, bf16, q8_0, got 'q4_0'"),
        ("sft.gguf", ["--mask_buffers"], "--mask_buffers only applies to --to legacy-pt"),
        ("MODEL/sft.gguf", [], "is inside the input"),
    ],
)
def test_bad_arguments_exit_2_before_writing(gguf_folders, tmp_path, capsys, out, flags, message):
    folder = gguf_folders["nanogpt", "converted"]
    target = folder / "sft.gguf" if out.startswith("MODEL/") else tmp_path / out
    code = main(["export", str(folder), "--to", "gguf", "--out", str(target), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_mismatching_vocabulary_fails_the_export_and_writes_nothing(gguf_folders, tmp_path, capsys, monkeypatch):
    """A vocabulary written wrong (half its merges lost) is caught on the written file by llama.cpp itself."""
    write = GGUFVocab.write

    def broken(self, writer):
        write(GGUFVocab(**{**self.__dict__, "merges": self.merges[: len(self.merges) // 2]}), writer)

    monkeypatch.setattr(GGUFVocab, "write", broken)
    folder = gguf_folders["nanogpt", "trained"]
    code, _, err = export(capsys, folder, tmp_path / "sft.gguf")
    assert code == 1 and err.startswith("error: TokenizerMismatch: tokenizer check: 24 texts, 14 mismatches"), err
    assert "nothing written (--allow_tokenizer_mismatch writes the file anyway)" in err
    assert list(tmp_path.iterdir()) == [] and leftovers(tmp_path) == []
    code, out, _ = export(capsys, folder, tmp_path / "sft.gguf", "--allow_tokenizer_mismatch")
    assert code == 0 and "24 texts, 14 mismatches" in out and (tmp_path / "sft.gguf").is_file()
