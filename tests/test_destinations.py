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
# A cache only adds files under its own names: any other folder may hold one, the data's own folder included
# (hf_sft.writer.check_cache).
NOT_FORBIDDEN = {
    ("data --cache_dir", "a folder holding an input"),
    ("data --cache_dir", "a folder holding a user's file"),
    ("data --cache_dir", "another kind's output"),
}
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


# One test per finding of "Nothing is lost, II" that the destination rule answers (the numbers are the issue's).


@pytest.fixture
def world(tmp_path, shared_dir, model_folder) -> dict[str, Path]:
    return make_world(tmp_path / "world", shared_dir, model_folder)


def refused(argv: list[str], root: Path, capsys) -> str:
    """Run `argv`, assert exit 2 with one line and no byte changed under `root`; return the line."""
    before = hashes(root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert hashes(root) == before
    return err


def test_1_a_dump_never_overwrites_an_input_even_with_overwrite(world, tmp_path, capsys):
    data, tok, model = str(world["data"]), str(world["tok"]), world["model"]
    base = ["data", "--data_path", data, "--pretrained_ckpt_path", str(model), "--overwrite"]
    err = refused([*base, "--dump", data], tmp_path, capsys)
    assert err == f"error: --dump {data} is the input {data}"
    weights = model / "model.safetensors"
    err = refused([*base, "--dump", str(weights)], tmp_path, capsys)
    assert err == f"error: --dump {weights} is inside the input {model}"
    err = refused(["data", "--data_path", data, "--tokenizer_path", tok, "--dump", tok], tmp_path, capsys)
    assert "is the input" in err and "--overwrite" not in err


def test_2_a_run_never_writes_over_a_users_files(world, tmp_path, capsys):
    data, tok = str(world["data"]), str(world["tok"])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "config.json").write_text("{}\n")
    train = ["train", "--data_path", data, "--tokenizer_path", tok, "--device", "cpu", *TINY, "--out_dir", str(out)]
    err = refused(train, tmp_path, capsys)
    assert err == (
        f"error: --out_dir {out} is not empty (it holds files this command did not write): choose another path, "
        "or pass --overwrite_output_dir to replace it"
    )
    for name in ("data", "tok"):  # an input inside the out_dir: refused even with the flag
        shutil.copy(world[name], out / world[name].name)
        argv = ["train", "--data_path", str(out / world["data"].name) if name == "data" else data]
        argv += ["--tokenizer_path", str(out / world["tok"].name) if name == "tok" else tok, "--device", "cpu"]
        err = refused([*argv, *TINY, "--out_dir", str(out), "--overwrite_output_dir"], tmp_path, capsys)
        assert f"error: --out_dir {out} holds the input" in err and "--overwrite" not in err
        (out / world[name].name).unlink()


def test_3_save_to_never_deletes_the_tokenizer_or_model_it_reads(world, tmp_path, capsys):
    dest = world["data"].parent  # holds the tokenizer file and the model folder this command reads
    err = refused(
        ["data", "--data_path", str(world["data"]), "--tokenizer_path", str(world["tok"]), "--save_to", str(dest)]
        + ["--overwrite"],
        tmp_path,
        capsys,
    )
    assert err.startswith(f"error: --save_to {dest} holds the input ") and "--overwrite" not in err
    inner = tmp_path / "elsewhere"
    shutil.copytree(world["model"], inner / "model")
    err = refused(
        ["data", "--data_path", str(world["data"]), "--pretrained_ckpt_path", str(inner / "model")]
        + ["--save_to", str(inner), "--overwrite"],
        tmp_path,
        capsys,
    )
    assert err == f"error: --save_to {inner} holds the input {inner / 'model'}: choose another destination"


def test_4_a_run_and_a_saved_dataset_never_share_a_folder_even_with_overwrite(world, tmp_path, capsys):
    data, tok = str(world["data"]), str(world["tok"])
    saved, run = tmp_path / "world" / "saved.gguf", tmp_path / "world" / "run.gguf"
    train = ["train", "--data_path", data, "--tokenizer_path", tok, "--device", "cpu", *TINY]
    err = refused([*train, "--out_dir", str(saved), "--overwrite_output_dir"], tmp_path, capsys)
    assert err == (
        f"error: --out_dir {saved} holds the output of `hf-sft data --save_to`, which `hf-sft train` never writes "
        "into: choose another path"
    )
    save = ["data", "--data_path", data, "--tokenizer_path", tok, "--save_to", str(run), "--overwrite"]
    err = refused(save, tmp_path, capsys)
    assert "holds the output of `hf-sft train`, which `hf-sft data --save_to` never writes into" in err


@pytest.mark.parametrize(
    ("command", "flag"),
    [("convert", "--out"), ("export legacy-pt", "--out"), ("data --save_to", "--save_to"), ("train", "--out_dir")],
)
def test_12_a_destination_under_a_file_is_refused_before_any_work(command, flag, world, tmp_path, capsys):
    dest = tmp_path / "world" / "plain" / "sub"
    err = refused(argv_for(command, dest, world), tmp_path, capsys)
    assert err == f"error: {flag} {dest}: cannot create it under {dest.parent}: not a directory"


def test_12_a_home_that_is_a_file_is_named_before_any_work(world, tmp_path, capsys, monkeypatch):
    import datasets

    home = tmp_path / "home"
    home.write_text("not a folder\n")
    cache = home / ".cache" / "huggingface" / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # what HOME=<a file> gives
    for argv in (
        ["data", "--data_path", str(world["data"]), "--tokenizer_path", str(world["tok"])],
        argv_for("train", tmp_path / "run", world),
    ):
        err = refused(argv, tmp_path, capsys)
        assert err == f"error: the datasets cache {cache}: cannot create it under {home}: not a directory"


def test_16_an_out_dir_that_is_the_base_model_names_no_destroying_flag(world, tmp_path, capsys):
    model = world["model"]
    argv = ["train", "--pretrained_ckpt_path", str(model), "--data_path", str(world["data"]), "--device", "cpu"]
    for extra in ([], ["--overwrite_output_dir"]):
        err = refused([*argv, "--max_iters", "1", "--out_dir", str(model), *extra], tmp_path, capsys)
        assert err == f"error: --out_dir {model} is the input {model}"


def signal_at_rename(monkeypatch, signum: int, nth: int = 1) -> list[str]:
    """Send `signum` to this process as the `nth` rename of a temporary sibling into place begins; returns the names
    renamed in so far."""
    import signal as signals

    renamed, real = [], {"rename": os.rename, "replace": os.replace}

    def wrap(name):
        def move(src, dst, *args, **kwargs):
            if writer.is_temporary(src) and not writer.is_temporary(dst):
                renamed.append(Path(dst).name)
                if len(renamed) == nth:
                    os.kill(os.getpid(), signal_of[signum])
            return real[name](src, dst, *args, **kwargs)

        return move

    signal_of = {int(s): s for s in (signals.SIGTERM, signals.SIGINT)}
    monkeypatch.setattr(os, "rename", wrap("rename"))
    monkeypatch.setattr(os, "replace", wrap("replace"))
    return renamed


@pytest.mark.parametrize(
    ("command", "signum", "status"),
    [("convert", 15, 143), ("export gpt2", 15, 143), ("data --dump", 15, 143), ("data --save_to", 2, 130)],
)
def test_14_a_signal_stops_every_command_with_nothing_half_written(
    command, signum, status, world, tmp_path, monkeypatch, capsys
):
    dest = tmp_path / "out"
    before = hashes(tmp_path)
    signal_at_rename(monkeypatch, signum)
    capsys.readouterr()
    assert main(argv_for(command, dest, world)) == status
    err = capsys.readouterr().err.strip()
    name = {15: "SIGTERM", 2: "SIGINT"}[signum]
    assert err.splitlines()[-1] == f"stopped by {name}: hf-sft {command.split()[0]} did not finish; " + (
        "nothing half-written is left"
    )
    assert len([line for line in err.splitlines() if "stopped by" in line or "error" in line]) == 1
    assert not dest.exists() and writer.leftovers(tmp_path) == []
    assert hashes(tmp_path) == before


def test_14_a_gguf_never_appears_without_its_modelfile_and_an_orphan_modelfile_is_rewritten(
    world, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "model.gguf"
    argv = ["export", str(world["model"]), "--to", "gguf", "--out", str(out)]
    renamed = signal_at_rename(monkeypatch, 15, nth=1)  # as the Modelfile, the first of the two, moves in
    assert main(argv) == 143
    assert renamed == ["model.Modelfile"] and not out.exists() and not out.with_suffix(".Modelfile").exists()
    monkeypatch.undo()
    renamed = signal_at_rename(monkeypatch, 15, nth=2)  # between the two renames
    assert main(argv) == 143
    assert renamed == ["model.Modelfile", "model.gguf"] and not out.exists()
    assert out.with_suffix(".Modelfile").read_bytes().startswith(MODELFILE_MARKER)  # alone, and ours
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err  # no --overwrite needed
    assert out.is_file() and out.with_suffix(".Modelfile").is_file() and writer.leftovers(tmp_path) == []
