"""`hf-sft export MODEL --to gguf --out FILE.gguf`: one GGUF for llama.cpp (llama-server), Ollama, LM Studio.

Everything that can be refused is refused before anything is written (exit 2): a model llama.cpp's architectures
cannot express (`gguf_model.gguf_architecture`), a tokenizer component it cannot reproduce (`gguf_vocab`), a
destination the writer refuses. The file is then written with the `gguf` package into a temporary sibling, the
tokenizer self-check runs on that file (`gguf_check`), and only a file that passed (or `--allow_tokenizer_mismatch`)
is renamed into place, together with the Ollama Modelfile beside it (`NAME.Modelfile`): the Modelfile is renamed
in first, so a GGUF never appears without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hf_sft.errors import UsageError
from hf_sft.export.targets import check_export_destination, load_hfsft_model, read_hfsft_folder

# Token texts that llama.cpp always treats as end-of-generation, whatever the metadata says (`special_eog_ids` in
# `src/llama-vocab.cpp`): its end-of-turn texts, and the fill-in-the-middle pad, repo and file-separator texts, which
# it adds to them (so `[PAD]` and `<PAD>` end generation). Each seen in llama.cpp b11549's load log (xllamacpp).
LLAMA_CPP_END_TOKENS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
        "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
        "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "[e~[",
        "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
    }
)  # fmt: skip


class TokenizerMismatch(Exception):
    """The written GGUF tokenizes some text differently from the folder's tokenizer (the CLI exits 1)."""


@dataclass(frozen=True)
class GGUFExport:
    """What an export wrote and found.

    Attributes:
        path: the GGUF file.
        modelfile: the Ollama Modelfile beside it.
        arch: llama.cpp's architecture (`gpt2` or `llama`).
        outtype: the tensor type of the weight matrices.
        check: the tokenizer self-check's one-line summary.
        notes: things a user should know about how llama.cpp will run it.
    """

    path: Path
    modelfile: Path
    arch: str
    outtype: str
    check: str
    notes: tuple[str, ...] = ()


def export_gguf(
    model_dir: str | Path,
    out: str | Path,
    outtype: str = "f32",
    check_data: str | Path | None = None,
    allow_tokenizer_mismatch: bool = False,
    overwrite: bool = False,
) -> GGUFExport:
    """Write the GGUF and its Modelfile, checking the tokenizer on the written file.

    Args:
        model_dir: an hf_sft model folder (or `checkpoint-STEP` folder).
        out: the `.gguf` file to write.
        outtype: `f32`, `f16`, `bf16` or `q8_0` for the weight matrices (norms and biases stay f32).
        check_data: records (a training data file) whose prompts and training texts are checked too.
        allow_tokenizer_mismatch: keep a file that tokenizes some checked text differently.
        overwrite: replace existing output files.

    Returns:
        What was written and the check's summary.

    Raises:
        UsageError: bad arguments, a model or tokenizer llama.cpp cannot represent, a refused destination.
        TokenizerMismatch: the check found mismatches (nothing is written) and they were not allowed.
        WriteFailed: the system refused a write.
    """
    import gguf

    from hf_sft.data import format_of
    from hf_sft.export.gguf_check import check_file, format_texts, probes, records_for_check
    from hf_sft.export.gguf_model import OUTTYPES, gguf_architecture, write_hparams, write_tensors
    from hf_sft.export.gguf_vocab import build_vocab, check_prefix_space
    from hf_sft.export.ollama import MODELFILE_MARKER, modelfile, modelfile_path
    from hf_sft.tokenizer import load_tokenizer
    from hf_sft.writer import new_files

    if outtype not in OUTTYPES:
        raise UsageError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise UsageError(f"--out {out}: --to gguf writes a .gguf file (e.g. {out.with_suffix('.gguf').name})")
    sidecar = modelfile_path(out)
    inputs = [check_data] if check_data is not None else []
    check_export_destination(model_dir, "gguf", out, overwrite, inputs=inputs)
    check_export_destination(model_dir, "gguf", sidecar, overwrite, inputs=inputs, marker=MODELFILE_MARKER)
    folder = read_hfsft_folder(model_dir)  # a GGUF carries its tokenizer
    model_dir, config = folder.path, folder.config
    arch = gguf_architecture(config, str(model_dir))
    tokenizer = load_tokenizer(folder.tokenizer_path)
    template = format_of(tokenizer)
    vocab = build_vocab(tokenizer, config.vocab_size, template.chat_template())
    check_prefix_space(vocab, format_texts(tokenizer, template), _added_tokens(tokenizer), template.name)
    records, skipped = records_for_check(check_data) if check_data is not None else ([], None)

    model = load_hfsft_model(folder)
    # The Modelfile is renamed in first and the GGUF last: a GGUF is never seen without its Modelfile, and a Modelfile
    # left alone by a kill between the two renames is recognised as ours (`MODELFILE_MARKER`) and rewritten.
    with new_files(sidecar, out) as (sidecar_staging, staging):
        writer = gguf.GGUFWriter(staging, arch)
        writer.add_name(model_dir.resolve().name)
        write_hparams(writer, config, arch, outtype)
        vocab.write(writer)
        write_tensors(writer, model, arch, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        report = check_file(staging, probes(tokenizer, template, records, vocab.prefix_space), tokenizer, vocab.pre)
        if report.mismatches and not allow_tokenizer_mismatch:
            raise TokenizerMismatch(
                f"{report.summary()}; first: {report.first_mismatch()}; nothing written "
                "(--allow_tokenizer_mismatch writes the file anyway)"
            )
        bos = tokenizer.bos_token if template.bos and not vocab.add_bos else ""  # else llama.cpp adds it
        text = modelfile(out.name, template, bos, tokenizer.eos_token, config.max_position_embeddings)
        sidecar_staging.write_text(text, encoding="utf-8")
    return GGUFExport(out, sidecar, arch, outtype, report.summary(), (*_notes(vocab), *filter(None, [skipped])))


def _added_tokens(tokenizer) -> list[str]:
    return [token.content for token in tokenizer.added_tokens_decoder.values()]


def _notes(vocab) -> tuple[str, ...]:
    """llama.cpp behaviours that differ from transformers' for this vocabulary."""
    eos = vocab.special_ids.get("eos")
    also = [f"{token!r} ({i})" for i, token in enumerate(vocab.tokens) if token in LLAMA_CPP_END_TOKENS and i != eos]
    if not also:
        return ()
    return (f"llama.cpp also ends generation at {', '.join(also)}: it treats these token texts as end-of-generation",)
