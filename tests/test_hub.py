"""`hf-sft push` and `train --push_to_hub` upload the model files to a local stand-in Hub and never leak the token."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.hub_server import HubStandIn
from helpers.tiny_trained import TINY_TRAIN_ARGS

from hf_sft import MODEL_CODE_FILES
from hf_sft.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
LOADER = Path(__file__).resolve().parent / "helpers" / "load_anywhere.py"
TOKEN = "hf_TestTokenThatMustNeverBeWritten0123456789"
MODEL_FILES = {
    "README.md",
    "chat_template.jinja",
    "config.json",
    *MODEL_CODE_FILES,
    "generation_config.json",
    "loss.png",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubStandIn(tmp_path_factory.mktemp("hub"), TOKEN) as server:
        yield server


def hub_env(endpoint: str, home: Path, token: str | None = TOKEN, **extra: str) -> dict:
    """The environment of a user pointed at `endpoint`: online, no Xet (the stand-in speaks LFS), own HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home), "PYTHONPATH": str(REPO)})
    env.update(extra)
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def hf_sft(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """The `hf-sft` command as users run it."""
    return run(["-m", "hf_sft.cli", *args], env, cwd)


def assert_token_nowhere(folders: list[Path], outputs: list[str]) -> None:
    for text in outputs:
        assert TOKEN not in text
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), f"the token was written to {path}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def trained(hub, tmp_path_factory):
    """A tiny run with --push_to_hub; the token given as --hub_token, the riskiest way."""
    tmp = tmp_path_factory.mktemp("push_train")
    out, home = tmp / "sft", tmp / "hf_home"
    push = ["--push_to_hub", "--hub_model_id", "tester/trained-sft", "--hub_private_repo", "true"]
    result = hf_sft(
        [*TINY_TRAIN_ARGS, "--out_dir", str(out), *push, "--hub_token", TOKEN], hub_env(hub.endpoint, home, None), tmp
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(out=out, home=home, result=result)


@pytest.fixture(scope="module")
def pushed(hub, trained, tmp_path_factory):
    """`hf-sft push` of the trained folder to a new public repository, token from HF_TOKEN."""
    tmp = tmp_path_factory.mktemp("push_cli")
    home = tmp / "hf_home"
    result = hf_sft(["push", str(trained.out), "--repo_id", "tester/tiny-sft"], hub_env(hub.endpoint, home), tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(repo_id="tester/tiny-sft", home=home, result=result)


def test_push_command_uploads_exactly_the_model_files(hub, trained, pushed):
    uploaded = hub.files(pushed.repo_id)
    assert set(uploaded) == MODEL_FILES  # no train.log, training_args.bin, checkpoint-*/
    for name, content in uploaded.items():
        assert content == (trained.out / name).read_bytes(), name
    assert json.loads(uploaded["config.json"])["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_hfsft_gpt.HfSftGPTForCausalLM"
    )
    assert b"Instruction" in uploaded["chat_template.jinja"]
    assert hub.load_repo(pushed.repo_id)["private"] is False
    # The weights went through the LFS batch API and a basic-transfer PUT, as on the Hub.
    oid = hashlib.sha256(uploaded["model.safetensors"]).hexdigest()
    assert ("PUT", f"/_lfs/{oid}", 200) in hub.requests
    assert f"pushed {len(MODEL_FILES)} files to tester/tiny-sft" in pushed.result.stdout
    assert_token_nowhere([trained.out, pushed.home, hub.root], [pushed.result.stdout, pushed.result.stderr])


def test_uploaded_repo_downloads_back_with_snapshot_download(hub, trained, pushed, tmp_path):
    code = "import sys; from huggingface_hub import snapshot_download; print(snapshot_download(sys.argv[1]))"
    env = hub_env(hub.endpoint, tmp_path / "anonymous", token=None)
    result = run(["-c", code, pushed.repo_id], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    downloaded = {p.name for p in snapshot.iterdir()}
    assert downloaded == MODEL_FILES
    for name in downloaded:
        assert (snapshot / name).read_bytes() == (trained.out / name).read_bytes(), name


def test_uploaded_repo_loads_with_from_pretrained_where_hf_sft_cannot_be_imported(hub, trained, pushed, tmp_path):
    from hf_sft import HfSftGPTForCausalLM

    env = hub_env(hub.endpoint, tmp_path / "anonymous", token=None, PYTHONPATH="")
    result = run([str(LOADER), pushed.repo_id, "remote"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hf_sft_modules"] == []
    assert report["model_module"].startswith("transformers_modules.")  # the code came from the Hub repo
    model = HfSftGPTForCausalLM.from_pretrained(trained.out).eval()
    with torch.no_grad():
        expected = model(torch.arange(12).view(1, 12)).logits[0]
    torch.testing.assert_close(torch.tensor(report["logits"]), expected, atol=1e-5, rtol=1e-5)
    assert report["cached"] == report["uncached"] and report["chat"][-1]["role"] == "assistant"


def test_training_pushes_through_trainer_and_keeps_the_token_off_disk(hub, trained):
    uploaded = hub.files("tester/trained-sft")
    # Trainer's own checkpoint push (hub_strategy every_save) uploads its output folder as it stands, with
    # train.log and training_args.bin; the final commit adds the model card, the code and the plot.
    assert set(uploaded) == MODEL_FILES | {"train.log", "training_args.bin"}
    repo = hub.load_repo("tester/trained-sft")
    assert repo["private"] is True
    assert [c["summary"] for c in repo["commits"]] == ["Training in progress, step 4", "End of training"]
    for name in MODEL_FILES:
        assert uploaded[name] == (trained.out / name).read_bytes(), name
    assert b'from_pretrained("tester/trained-sft"' in uploaded["README.md"]
    for args_file in (trained.out / "training_args.bin", trained.out / "checkpoint-4" / "training_args.bin"):
        assert torch.load(args_file, weights_only=False).hub_token is None
    assert_token_nowhere([trained.out, trained.home, hub.root], [trained.result.stdout, trained.result.stderr])


def test_push_with_saved_login_creates_a_private_repo(hub, trained, tmp_path):
    home = tmp_path / "logged_in"
    home.mkdir()
    (home / "token").write_text(TOKEN)  # what `hf auth login` saves
    env = hub_env(hub.endpoint, home, token=None)
    result = hf_sft(["push", str(trained.out), "tester/private-sft", "--private"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.load_repo("tester/private-sft")["private"] is True
    assert set(hub.files("tester/private-sft")) == MODEL_FILES
    assert_token_nowhere([trained.out], [result.stdout, result.stderr])

    code = "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])"
    anonymous = run(["-c", code, "tester/private-sft"], hub_env(hub.endpoint, tmp_path / "anon", None), tmp_path)
    assert anonymous.returncode != 0 and "RepositoryNotFoundError" in anonymous.stderr


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """Run `hf_sft.cli.main` here, online, without any token, pointed at the endpoint the test gives."""
    from huggingface_hub import constants

    from hf_sft.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session runs offline
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_login" / "token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    def cli(args: list[str], endpoint: str, token: str | None = None) -> int:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        return main(args)

    return cli


def test_push_without_network_fails_fast_with_status_1(trained, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    result = hf_sft(["push", str(trained.out), "--repo_id", "tester/x"], hub_env(endpoint, tmp_path), tmp_path)
    assert result.returncode == 1
    assert time.monotonic() - start < 60  # interpreter start-up included; the check itself gives up after 10 s
    assert result.stderr.startswith(f"error: cannot reach {endpoint}") and "Traceback" not in result.stderr
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_push_in_offline_mode_fails_with_status_1(trained, in_process, capsys, monkeypatch, variable):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")  # the message names the variable that is set
    assert in_process(["push", str(trained.out), "--repo_id", "tester/x"], "http://127.0.0.1:9", TOKEN) == 1
    assert capsys.readouterr().err.startswith(f"error: {variable} is set: unset it to push")


def test_check_hub_gives_up_on_a_server_that_never_answers(monkeypatch):
    from huggingface_hub import constants

    from hf_sft.hub import HubError, check_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the kernel's backlog; nothing ever reads or answers
        start = time.monotonic()
        with pytest.raises(HubError, match="no answer within 1 s"):
            check_hub(f"http://127.0.0.1:{silent.getsockname()[1]}", token=TOKEN, timeout=1)
        assert time.monotonic() - start < 10


def test_push_refuses_a_wrong_or_missing_token(hub, trained, in_process, capsys):
    wrong = "hf_WrongTokenWrongTokenWrongToken"
    push = ["push", str(trained.out), "--repo_id", "tester/x"]
    assert in_process(push, hub.endpoint) == 2
    assert "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert in_process(push, hub.endpoint, wrong) == 2
    captured = capsys.readouterr()
    assert "rejected the token" in captured.err and wrong not in captured.err + captured.out
    assert hub.load_repo("tester/x") is None


def test_training_with_push_fails_before_training_without_network(in_process, tmp_path, capsys):
    out = tmp_path / "sft"
    endpoint = f"http://127.0.0.1:{closed_port()}"
    args = [*TINY_TRAIN_ARGS, "--out_dir", str(out), "--push_to_hub", "--hub_model_id", "tester/never"]
    assert in_process(args, endpoint, TOKEN) == 1
    assert f"cannot reach {endpoint}" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_files_to_upload_checks_the_folder(trained, tmp_path, monkeypatch):
    import shutil

    from hf_sft.hub import files_to_upload, push_folder

    assert set(files_to_upload(trained.out)) == MODEL_FILES
    folder = tmp_path / "model"
    shutil.copytree(trained.out, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    (folder / "modeling_hfsft_gpt.py").unlink()
    with pytest.raises(UsageError, match="lacks the model code .*modeling_hfsft_gpt.py"):
        files_to_upload(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="no auto_map"):
        files_to_upload(folder)
    (folder / "config.json").write_bytes((trained.out / "config.json").read_bytes())
    shutil.copy(trained.out / "modeling_hfsft_gpt.py", folder)
    (folder / "packing_hfsft_gpt.py").unlink()  # a sibling the modeling file imports
    with pytest.raises(UsageError, match="lacks a model code file that the others import: packing_hfsft_gpt.py"):
        files_to_upload(folder)
    shutil.copy(trained.out / "packing_hfsft_gpt.py", folder)
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")  # the same weights, pickled
    (folder / "model.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match=r"no \*\.safetensors weights"):
        files_to_upload(folder)
    (folder / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").rename(folder / "model.safetensors")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (folder / "README.md").write_text(f"token: {TOKEN}\n")
    with pytest.raises(UsageError, match="README.md contains the Hugging Face token"):
        push_folder(folder, "tester/leak", endpoint=f"http://127.0.0.1:{closed_port()}")
