"""The one model-folder reader: every reading command refuses a damaged folder the same way, before any work."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers.hub_server import HubStandIn

from hf_sft.cli import main
from hf_sft.errors import UsageError
from hf_sft.model_folder import read_model_folder, safetensors_problem

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER = FIXTURES / "tiny_bpe.json"
DATA = FIXTURES / "tiny_sft.jsonl"
TOKEN = "hf_TestTokenForTheReaderTests0123456789"
SEEDS = range(3)


def _edit_config(**fields):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | fields))

    return damage


def _cut_at(seed: int):
    """Cut model.safetensors at a seeded offset: in the length field, in the header or in the tensors."""

    def damage(folder: Path) -> None:
        path = folder / "model.safetensors"
        data = path.read_bytes()
        header_end = 8 + int.from_bytes(data[:8], "little")
        rng = random.Random(seed)
        where = [rng.randrange(1, 8), rng.randrange(8, header_end), rng.randrange(header_end, len(data))][seed % 3]
        path.write_bytes(data[:where])

    return damage


def _garble_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00" * 8  # the JSON header's first bytes
    path.write_bytes(bytes(data))


def _huge_header_length(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _shift_offsets(folder: Path) -> None:
    """A header that parses but whose first tensor's byte range no longer fits its shape (same length)."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = sorted(k for k in header if k != "__metadata__")[0]
    begin, end = header[name]["data_offsets"]
    text = data[8 : 8 + length].replace(f"[{begin},{end}]".encode(), f"[{begin},{end - 4}]".encode(), 1)
    assert len(text) == length or len(text) == length - 1  # one digit fewer at most: pad to keep the length
    path.write_bytes(data[:8] + text.ljust(length) + data[8 + length :])


def _remove_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[1].unlink()


def _cut_shard(folder: Path) -> None:
    path = sorted(folder.glob("model-*.safetensors"))[0]
    path.write_bytes(path.read_bytes()[:-10])


def _remove_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)


def _garble_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("garbage")


def _garble_tokenizer_config(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_text("{bad")


def _grow_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(VOCAB + 5 - len(tokenizer))])
    tokenizer.save_pretrained(folder)


VOCAB = 400
# case -> (the folder it damages: "plain" or "sharded", how, a part of the refusal every command must print)
CASES = {
    "layers: config 3, weights 2": ("plain", _edit_config(num_hidden_layers=3), "config.json describes 3 layers"),
    "layers: config 1, weights 2": ("plain", _edit_config(num_hidden_layers=1), "that config.json does not describe"),
    "hidden size": ("plain", _edit_config(hidden_size=64), "config.json describes other shapes"),
    "vocabulary": ("plain", _edit_config(vocab_size=VOCAB + 100), "model.embed_tokens.weight [400, 32]"),
    "key/value heads": ("plain", _edit_config(num_key_value_heads=2), "self_attn.k_proj.weight [32, 32]"),
    "heads that do not divide the width": ("plain", _edit_config(num_attention_heads=5), "must be divisible"),
    **{f"cut at seed {seed}": ("plain", _cut_at(seed), "is cut short") for seed in SEEDS},
    "garbled header": ("plain", _garble_header, "has an unreadable safetensors header"),
    "header length beyond the file": ("plain", _huge_header_length, "its safetensors header is incomplete"),
    "byte range that does not fit": ("plain", _shift_offsets, "has a damaged safetensors header"),
    "missing shard": ("sharded", _remove_shard, "safetensors, which is missing"),
    "cut shard": ("sharded", _cut_shard, "is cut short"),
    "no tokenizer": ("plain", _remove_tokenizer, "no tokenizer in"),
    "garbled tokenizer": ("plain", _garble_tokenizer, "cannot load the tokenizer in"),
    "garbled tokenizer config": ("plain", _garble_tokenizer_config, "cannot load the tokenizer in"),
    "tokenizer larger than the vocabulary": ("plain", _grow_tokenizer, f"has {VOCAB} embeddings (vocab_size)"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny nanoGPT-style model, saved whole and in two shards, with its tokenizer: built once."""
    from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
    from hf_sft.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("model_folders")
    tokenizer = load_tokenizer(TOKENIZER)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = HfSftGPTConfig(
        family="nanogpt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **ids
    )
    torch.manual_seed(0)
    model = HfSftGPTForCausalLM(config)
    model.save_pretrained(root / "plain")
    model.save_pretrained(root / "sharded", max_shard_size="60KB")
    for name in ("plain", "sharded"):
        tokenizer.save_pretrained(root / name)
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    return {"plain": root / "plain", "sharded": root / "sharded"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubStandIn(tmp_path_factory.mktemp("hub"), TOKEN) as server:
        yield server


@pytest.fixture
def commands(hub, monkeypatch, tmp_path):
    """Each reading command, run in this process as `hf-sft` runs it, on a folder; `push` talks to the stand-in Hub.

    Returns `run(command, folder) -> (status, last stderr line, the outputs it would have written)`.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session runs offline
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS

    def argv(command: str, folder: Path, out: Path) -> list[str]:
        return {
            "generate": ["generate", str(folder), "--instruction", "Name a fish.", "--device", "cpu"],
            "export": ["export", str(folder), "--to", "gpt2", "--out", str(out)],
            "push": ["push", str(folder), "--repo_id", f"tester/{folder.name}"],
            "eval": ["eval", str(folder), "--data_path", str(DATA), "--device", "cpu", "--out", str(out)],
            "train": [
                "train", "--pretrained_ckpt_path", str(folder), "--data_path", str(DATA), "--out_dir", str(out),
                "--device", "cpu", "--max_iters", "1", "--val_split", "0", "--max_seq_len", "64",
            ],
        }[command]  # fmt: skip

    def run(command: str, folder: Path, capsys) -> tuple[int, str, list[Path]]:
        out = tmp_path / f"{command}-out"
        status = main(argv(command, folder, out))
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        written = [out] if out.exists() else []
        if command == "push" and hub.load_repo(f"tester/{folder.name}") is not None:
            written.append(Path(f"tester/{folder.name}"))
        if command == "generate" and captured.out.strip():
            written.append(Path("<stdout>"))
        return status, (lines[-1] if lines else ""), written

    return run


READERS = ["generate", "export", "push", "eval", "train"]


def damaged(folders: dict[str, Path], tmp_path: Path, case: str) -> Path:
    base, damage, _ = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(folders[base], folder)
    damage(folder)
    return folder


def test_the_undamaged_folders_pass_the_reader(folders):
    for folder in folders.values():
        checked = read_model_folder(folder)
        assert checked.config.num_hidden_layers == 2 and checked.tokenizer is not None
        assert len(checked.shapes) == len(checked.load_model().state_dict()) - 1  # the tied head is not saved


@pytest.mark.parametrize("case", list(CASES))
def test_every_reading_command_refuses_a_damaged_folder_the_same_way(folders, commands, tmp_path, capsys, case):
    folder = damaged(folders, tmp_path, case)
    with pytest.raises(UsageError) as refused:
        read_model_folder(folder)
    message = str(refused.value)
    assert CASES[case][2] in message and str(folder) in message and "\n" not in message
    for command in READERS:
        status, line, written = commands(command, folder, capsys)
        prefix = "--pretrained_ckpt_path: " if command == "train" else ""
        assert (status, line) == (2, f"error: {prefix}{message}"), command
        assert written == [], f"{command} went on past the reader: {written}"


def test_push_refuses_weights_cut_short_as_generate_and_export_do(folders, commands, tmp_path, capsys):
    """`hf-sft push` uploaded a folder whose model.safetensors was cut short, with exit 0."""
    folder = tmp_path / "model"
    shutil.copytree(folders["plain"], folder)
    weights = folder / "model.safetensors"
    whole = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: whole // 2])
    expected = f"error: {weights} is cut short: {whole // 2} bytes, its safetensors header describes {whole}"
    for command in ("push", "generate", "export"):
        assert commands(command, folder, capsys) == (2, expected, []), command


def test_a_config_with_more_layers_than_the_weights_is_refused_by_every_reading_command(
    folders, commands, tmp_path, capsys
):
    """A config.json saying 3 layers over 2 layers of weights was exported, generated from and trained on with a
    randomly initialised third layer and exit 0."""
    folder = tmp_path / "model"
    shutil.copytree(folders["plain"], folder)
    _edit_config(num_hidden_layers=3)(folder)
    expected = (
        f"{folder}: config.json describes 3 layers, the weights hold 2; the weights lack "
        "model.layers.2.input_layernorm.bias, model.layers.2.input_layernorm.weight, "
        "model.layers.2.mlp.down_proj.bias, ... (16 tensors)"
    )
    for command in READERS:
        prefix = "--pretrained_ckpt_path: " if command == "train" else ""
        assert commands(command, folder, capsys) == (2, f"error: {prefix}{expected}", []), command
    exported = tmp_path / "legacy.pt"
    assert main(["export", str(folder), "--to", "legacy-pt", "--out", str(exported)]) == 2
    assert not exported.exists()


def test_a_good_folder_goes_past_the_reader_in_push(folders, commands, hub, capsys):
    """The control: the stand-in Hub receives the undamaged folder (the refusals above are the reader's)."""
    status, line, written = commands("push", folders["plain"], capsys)
    assert status == 0, line
    assert written == [Path("tester/plain")] and "model.safetensors" in hub.files("tester/plain")


def test_safetensors_problem_checks_every_byte_range(folders, tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(folders["plain"] / "model.safetensors", path)
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    with path.open("ab") as handle:  # bytes beyond the last tensor: not what was saved
        handle.write(b"\0" * 4)
    assert safetensors_problem(path) == (
        f"{path} is {len(data) + 4} bytes, its safetensors header describes {len(data)}: bytes follow its tensors"
    )
