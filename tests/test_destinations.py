"""Every command that writes, against every kind of forbidden destination: exit 2, one line, no byte changed."""

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from hf_sft import writer
from hf_sft.cli import main
from hf_sft.data.summary import DUMP_MARKER
from hf_sft.export.ollama import MODELFILE_MARKER
from hf_sft.writer import OUTPUT_RECORD, RUN_FOLDER, SAVED_DATASET

CHECKPOINT = "nanogpt_bias_seedformat.pt"
TOKENIZER = "dolly_bpe_4k.json"
TINY = ["--n_layer", "1", "--n_head", "1", "--n_embd", "8", "--block_size", "32", "--max_iters", "1"]


@pytest.fixture(scope="module")
def model_folder(shared_dir, tmp_path_factory) -> Path:
    """The shared nanoGPT checkpoint, converted once (a second or two)."""
    out = tmp_path_factory.mktemp("model") / "base"
    data = shared_dir / "data"
    argv = ["convert", "--checkpoint", str(data / "legacy_checkpoints" / CHECKPOINT)]
    assert main([*argv, "--tokenizer", str(data / "tokenizers" / TOKENIZER), "--out", str(out)]) == 0
    return out


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (links not followed), by relative path; folders by name alone."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        found[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def make_world(root: Path, shared: Path, model: Path) -> dict[str, Path]:
    """The inputs every command reads, a user's files and folders, other commands' outputs, a file, a read-only
    folder. Names end in .gguf where they may, so that `export --to gguf` meets each case past its suffix check."""
    inputs = root / "inputs.gguf"
    inputs.mkdir(parents=True)
    lines = (shared / "data" / "dolly" / "dolly_sample.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    (inputs / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (inputs / "records.gguf").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(shared / "data" / "tokenizers" / TOKENIZER, inputs / "tok.json")
    shutil.copy(shared / "data" / "legacy_checkpoints" / CHECKPOINT, inputs / "ckpt.pt")
    shutil.copytree(model, inputs / "model")
    (root / "notes.gguf").write_text("a user's own notes\n")
    (root / "user.gguf").mkdir()
    (root / "user.gguf" / "eval_results.json").write_text('{"mine": true}\n')  # a name eval writes, not its output
    for name, command in (("saved.gguf", SAVED_DATASET), ("run.gguf", RUN_FOLDER)):
        (root / name).mkdir()
        (root / name / OUTPUT_RECORD).write_text(json.dumps({"command": command}))
        (root / name / "data-00000-of-00001.arrow").write_bytes(b"work of its own")
    (root / "dump.gguf").write_bytes(DUMP_MARKER + b"0}\n")  # an earlier `data --dump`
    (root / "export.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # an earlier `export --to gguf`
    (root / "plain").write_text("a regular file\n")
    (root / "ro").mkdir()
    return {
        "data": inputs / "data.jsonl",
        "records": inputs / "records.gguf",
        "tok": inputs / "tok.json",
        "ckpt": inputs / "ckpt.pt",
        "model": inputs / "model",
    }


def argv_for(command: str, dest: Path, w: dict[str, Path]) -> list[str]:
    data, tok, model = str(w["data"]), str(w["tok"]), str(w["model"])
    prefix = {
        "data --dump": ["data", "--data_path", data, "--tokenizer_path", tok, "--dump"],
        "data --save_to": ["data", "--data_path", data, "--tokenizer_path", tok, "--save_to"],
        "data --cache_dir": ["data", "--data_path", data, "--tokenizer_path", tok, "--cache_dir"],
        "train": ["train", "--data_path", data, "--tokenizer_path", tok, "--device", "cpu", *TINY, "--out_dir"],
        "convert": ["convert", "--checkpoint", str(w["ckpt"]), "--tokenizer", tok, "--out"],
        "export gpt2": ["export", model, "--to", "gpt2", "--out"],
        "export llama": ["export", model, "--to", "llama", "--out"],
        "export legacy-pt": ["export", model, "--to", "legacy-pt", "--out"],
        "export gguf": ["export", model, "--to", "gguf", "--check_data", str(w["records"]), "--out"],
        "eval": ["eval", model, "--data_path", data, "--out"],
    }[command]
    return [*prefix, str(dest)]


FILE_WRITERS = ("data --dump", "export legacy-pt", "export gguf")
COMMANDS = (
    "data --dump",
    "data --save_to",
    "train",
    "convert",
    "export gpt2",
    "export llama",
    "export legacy-pt",
    "export gguf",
    "eval",
    "data --cache_dir",
)
FORBIDDEN = (
    "its own input file",
    "a folder holding an input",
    "a user's file",
    "a folder holding a user's file",
    "another kind's output",
    "a path under a regular file",
    "a read-only file system",
)
# A cache only adds files under its own names: any user's folder may hold one (hf_sft.writer.check_cache).
NOT_FORBIDDEN = {("data --cache_dir", "a folder holding a user's file"), ("data --cache_dir", "another kind's output")}
OWN_INPUT = {"convert": "ckpt", "export gpt2": "model", "export llama": "model", "export legacy-pt": "model"}


def destination(case: str, command: str, root: Path, w: dict[str, Path]) -> Path:
    if case == "its own input file":
        return w["records"] if command == "export gguf" else w[OWN_INPUT.get(command, "data")]
    if case == "another kind's output":
        if command in FILE_WRITERS:
            return root / ("export.gguf" if command == "data --dump" else "dump.gguf")
        return root / ("run.gguf" if command == "data --save_to" else "saved.gguf")
    return {
        "a folder holding an input": root / "inputs.gguf",
        "a user's file": root / "notes.gguf",
        "a folder holding a user's file": root / "user.gguf",
        "a path under a regular file": root / "plain" / "out.gguf",
        "a read-only file system": root / "ro" / "out.gguf",
    }[case]


CASES = [(command, case) for command in COMMANDS for case in FORBIDDEN if (command, case) not in NOT_FORBIDDEN]


@pytest.mark.parametrize(("command", "case"), CASES)
def test_every_writer_refuses_every_forbidden_destination(
    command, case, tmp_path, shared_dir, model_folder, monkeypatch, capsys
):
    root = tmp_path / "world"
    w = make_world(root, shared_dir, model_folder)
    dest = destination(case, command, root, w)
    probe = writer.writable_error
    # The one place that probes writability, told that `ro` is a read-only mount (works as root, unlike chmod).
    monkeypatch.setattr(
        writer, "writable_error", lambda folder: errno.EROFS if Path(folder) == root / "ro" else probe(folder)
    )
    before = hashes(tmp_path)
    capsys.readouterr()
    assert main(argv_for(command, dest, w)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    if case in ("its own input file", "a folder holding an input"):
        assert "--overwrite" not in err, err  # never a flag that would destroy an input
    if case == "a read-only file system":
        assert "read-only file system" in err, err
    if case == "a path under a regular file":
        assert "not a directory" in err, err
    assert hashes(tmp_path) == before


def test_an_earlier_dump_and_an_orphan_modelfile_are_ours_other_files_are_not(tmp_path):
    dump, other = tmp_path / "tokens.jsonl", tmp_path / "notes.jsonl"
    dump.write_bytes(DUMP_MARKER + b"0}\n")
    other.write_text("mine\n")
    common = {"kind": "file", "command": "data --dump", "marker": DUMP_MARKER, "flag": "--dump"}
    assert writer.check_destination(dump, **common) == dump
    with pytest.raises(writer.UsageError, match=r"--dump .*notes.jsonl already exists: choose another path, or pass"):
        writer.check_destination(other, **common)
    modelfile = tmp_path / "m.Modelfile"
    modelfile.write_bytes(MODELFILE_MARKER + b"\nFROM ./m.gguf\n")
    assert writer.check_destination(modelfile, kind="file", command="export --to gguf", marker=MODELFILE_MARKER)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores a folder's permissions")
def test_a_folder_without_write_permission_is_named_as_the_system_names_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(writer.UsageError) as err:
            writer.check_destination(locked / "out", kind="folder", command="convert")
    finally:
        locked.chmod(0o755)
    assert str(err.value) == f"--out {locked / 'out'}: cannot write in {locked}: permission denied"
