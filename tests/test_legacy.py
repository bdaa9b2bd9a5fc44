"""`hf-sft convert`: legacy checkpoints become HF folders that reproduce the original logits, or fail with exit 2."""

import json
import os
import shutil

import pytest
import torch
from helpers.legacy_checkpoints import (
    NANOGPT,
    SIMPLE_LLAMA,
    SIMPLE_LLAMA_SPECIALS,
    cli_special_flags,
    expected_outputs,
    save_simple_llama,
    shared_checkpoint,
    shared_simple_llama_parts,
    shared_tokenizer,
)
from transformers import AutoModelForCausalLM

from hf_sft import MODEL_CODE_FILES
from hf_sft.cli import main
from hf_sft.errors import UsageError
from hf_sft.legacy import convert_checkpoint, load_legacy_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module")
def nanogpt_parts(shared_dir):
    obj = torch.load(shared_checkpoint(shared_dir, NANOGPT), weights_only=True)
    return dict(obj["model_state_dict"]), dict(obj["model_args"])


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def convert_cli(capsys, checkpoint, tokenizer, out, *flags) -> tuple[int, str, str]:
    return run_cli(capsys, "--checkpoint", checkpoint, "--tokenizer", tokenizer, "--out", out, *flags)


def assert_usage_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def assert_reproduces_logits(model, shared_dir, checkpoint: str) -> None:
    expected = expected_outputs(shared_dir, checkpoint)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("checkpoint", [NANOGPT, SIMPLE_LLAMA])
def test_cli_folder_reproduces_original_logits(shared_dir, tmp_path, capsys, checkpoint):
    out = tmp_path / "model"
    code, stdout, err = convert_cli(
        capsys,
        shared_checkpoint(shared_dir, checkpoint),
        shared_tokenizer(shared_dir, checkpoint),
        out,
        *cli_special_flags(checkpoint),
    )
    assert code == 0, err
    assert "layers: 2" in stdout and str(out) in stdout

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.dtype == torch.float32 and not model.training
    assert_reproduces_logits(model, shared_dir, checkpoint)
    saved = {p.name for p in out.iterdir()}
    assert {"model.safetensors", *MODEL_CODE_FILES} <= saved

    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    specials = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # [BOS]/[EOS]/[PAD] of dolly_bpe_4k
    if checkpoint == SIMPLE_LLAMA:
        specials = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}  # <SOS>/<EOS>/<PAD>
    for name, token_id in specials.items():
        assert config[name] == generation[name] == token_id, name
    assert config["tie_word_embeddings"] is (checkpoint == NANOGPT)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "module._orig_mod."])
def test_nanogpt_train_layout_and_wrapper_prefixes(shared_dir, tmp_path, nanogpt_parts, prefix):
    state_dict, model_args = nanogpt_parts
    # nanoGPT without flash attention also saves its causal mask, as a buffer named attn.bias.
    mask = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
    state_dict = {**state_dict, **{f"transformer.h.{i}.attn.bias": mask for i in range(2)}}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {prefix + k: v for k, v in state_dict.items()}, "model_args": model_args}, path)

    checkpoint = load_legacy_checkpoint(path)
    assert checkpoint.source == "nanogpt"
    assert set(checkpoint.state_dict) == set(state_dict)
    model, _ = convert_checkpoint(path, shared_tokenizer(shared_dir, NANOGPT))
    assert_reproduces_logits(model, shared_dir, NANOGPT)


def test_simple_llama_resaved_with_ddp_prefix(shared_dir, tmp_path):
    state_dict, fields = shared_simple_llama_parts(shared_dir)
    path = save_simple_llama(tmp_path / "ddp.pth", {"module." + k: v for k, v in state_dict.items()}, **fields)
    model, tokenizer = convert_checkpoint(path, shared_tokenizer(shared_dir, SIMPLE_LLAMA), **SIMPLE_LLAMA_SPECIALS)
    assert_reproduces_logits(model, shared_dir, SIMPLE_LLAMA)
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 1)


def test_tokenizer_of_another_model_is_refused_unless_allowed(shared_dir, tmp_path, capsys):
    # simple_llama embeds 8192 rows and does not pad; dolly_bpe_4k has 4096 tokens (and the [BOS]/[EOS] defaults).
    checkpoint, tokenizer = shared_checkpoint(shared_dir, SIMPLE_LLAMA), shared_tokenizer(shared_dir, NANOGPT)
    code, _, err = convert_cli(capsys, checkpoint, tokenizer, tmp_path / "out")
    assert_usage_error(
        code,
        err,
        f"the tokenizer {tokenizer} has 4096 tokens but the model in {checkpoint} embeds 8192 (simple_llama does not "
        "pad): is it the tokenizer the model was pretrained with? Pass --allow_vocab_mismatch",
    )
    assert not (tmp_path / "out").exists()
    code, out, _ = convert_cli(capsys, checkpoint, tokenizer, tmp_path / "out", "--allow_vocab_mismatch")
    assert code == 0 and "vocab: 8192 (tokenizer: 4096)" in out


def test_nanogpt_padded_vocabulary_is_accepted(shared_dir, tmp_path, nanogpt_parts):
    # nanoGPT rounds up to a multiple of 64: 4096 tokens in 4160 rows is its padding, not another tokenizer.
    state_dict, model_args = nanogpt_parts
    state_dict = dict(state_dict)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        state_dict[key] = torch.cat([state_dict[key], torch.zeros(64, state_dict[key].shape[1])])
    path = tmp_path / "padded.pt"
    torch.save({"model": state_dict, "model_args": {**model_args, "vocab_size": 4160}}, path)
    model, tokenizer = convert_checkpoint(path, shared_tokenizer(shared_dir, NANOGPT))
    assert (len(tokenizer), model.config.vocab_size) == (4096, 4160)
    torch.save({"model": state_dict, "model_args": {**model_args, "vocab_size": 4224}}, path)
    with pytest.raises(UsageError, match=r"has 4096 tokens but .* embeds 4224 \(nanoGPT pads by at most 64"):
        convert_checkpoint(path, shared_tokenizer(shared_dir, NANOGPT))


def test_every_missing_special_token_is_named_at_once(shared_dir, tmp_path, capsys):
    checkpoint, tokenizer = shared_checkpoint(shared_dir, SIMPLE_LLAMA), shared_tokenizer(shared_dir, SIMPLE_LLAMA)
    code, _, err = convert_cli(capsys, checkpoint, tokenizer, tmp_path / "out")
    assert_usage_error(
        code,
        err,
        f"the tokenizer {tokenizer} lacks the special tokens BOS '[BOS]' (--bos_token), EOS '[EOS]' (--eos_token), "
        "PAD '[PAD]' (--pad_token), UNK '[UNK]' (--unk_token); its special tokens are: <SOS>, <EOS>, <PAD>, <UNK>",
    )


def test_tokenizer_larger_than_model_vocabulary_is_refused(shared_dir, tmp_path, capsys):
    code, _, err = convert_cli(
        capsys,
        shared_checkpoint(shared_dir, NANOGPT),
        shared_tokenizer(shared_dir, SIMPLE_LLAMA),
        tmp_path / "out",
        *cli_special_flags(SIMPLE_LLAMA),
    )
    assert_usage_error(code, err, "8192 tokens", "4096")


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"), ["missing keys", "transformer.h.1.mlp.c_fc.weight"]),
        (
            lambda sd: sd.__setitem__("transformer.h.0.attn.rotary.weight", torch.zeros(4)),
            ["unexpected keys", "transformer.h.0.attn.rotary.weight"],
        ),
        (
            lambda sd: sd.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(190, 64)),
            ["wrong shapes", "transformer.h.0.attn.c_attn.weight is [190, 64], the model needs [192, 64]"],
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_key_and_shape_problems_exit_2_naming_the_key(shared_dir, tmp_path, capsys, nanogpt_parts, edit, fragments):
    state_dict, model_args = nanogpt_parts
    state_dict = dict(state_dict)
    edit(state_dict)
    path = tmp_path / "broken.pt"
    torch.save({"model_state_dict": state_dict, "model_args": model_args}, path)
    code, _, err = convert_cli(capsys, path, shared_tokenizer(shared_dir, NANOGPT), tmp_path / "out")
    assert_usage_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_simple_llama_mla_is_refused(shared_dir, tmp_path, capsys):
    state_dict, fields = shared_simple_llama_parts(shared_dir)
    for i in range(2):
        del state_dict[f"decoder_blocks.{i}.attention.qkv_linear.weight"]
        state_dict[f"decoder_blocks.{i}.attention.kv_down_proj.weight"] = torch.zeros(32, 64)
        state_dict[f"decoder_blocks.{i}.attention.q_proj.weight"] = torch.zeros(64, 64)
    path = save_simple_llama(tmp_path / "mla.pth", state_dict, **{**fields, "use_mla": True})
    code, _, err = convert_cli(
        capsys, path, shared_tokenizer(shared_dir, SIMPLE_LLAMA), tmp_path / "out", *cli_special_flags(SIMPLE_LLAMA)
    )
    assert_usage_error(code, err, "MLA", "not support")


def test_mla_keys_are_detected_without_the_config_flag(shared_dir, tmp_path):
    state_dict, fields = shared_simple_llama_parts(shared_dir)
    state_dict["decoder_blocks.0.attention.w_dkv.weight"] = torch.zeros(32, 64)
    path = save_simple_llama(tmp_path / "mla.pth", state_dict, **fields)
    with pytest.raises(UsageError, match="MLA"):
        load_legacy_checkpoint(path)


def test_malicious_checkpoint_is_refused_without_running_it(shared_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "model_args": {"n_layer": 1}, "x": Payload()}, path)
    code, _, err = convert_cli(capsys, path, shared_tokenizer(shared_dir, NANOGPT), tmp_path / "out")
    assert_usage_error(code, err, "refusing to load", f"call {os.system.__module__}.system")
    assert not marker.exists()


def test_bad_paths_and_layouts_exit_2(shared_dir, tmp_path, capsys):
    checkpoint, tokenizer = shared_checkpoint(shared_dir, NANOGPT), shared_tokenizer(shared_dir, NANOGPT)
    code, _, err = convert_cli(capsys, tmp_path / "nope.pt", tokenizer, tmp_path / "out")
    assert_usage_error(code, err, "checkpoint not found", "nope.pt")
    code, _, err = convert_cli(capsys, checkpoint, tmp_path / "nope.json", tmp_path / "out")
    assert_usage_error(code, err, "nope.json")
    (tmp_path / "file").write_text("x")
    code, _, err = convert_cli(capsys, checkpoint, tokenizer, tmp_path / "file")
    assert_usage_error(code, err, "not a folder")

    torch.save({"weights": {}}, tmp_path / "other.pt")
    code, _, err = convert_cli(capsys, tmp_path / "other.pt", tokenizer, tmp_path / "out")
    assert_usage_error(code, err, "not a checkpoint layout", "weights")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    code, _, err = convert_cli(capsys, tmp_path / "text.pt", tokenizer, tmp_path / "out")
    assert_usage_error(code, err, "text.pt")


def test_missing_model_args_field_is_named(shared_dir, tmp_path, nanogpt_parts):
    state_dict, model_args = nanogpt_parts
    model_args = {k: v for k, v in model_args.items() if k != "n_head"}
    torch.save({"model": state_dict, "model_args": model_args}, tmp_path / "ckpt.pt")
    with pytest.raises(UsageError, match="model_args lacks n_head"):
        load_legacy_checkpoint(tmp_path / "ckpt.pt")


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder`, relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished training run's folder: final model, model card, chat template, train.log, checkpoints."""
    from helpers.tiny_trained import train_tiny

    return train_tiny(tmp_path_factory.mktemp("run") / "run")


def test_convert_into_a_trained_run_folder_is_refused_unless_overwrite(shared_dir, tmp_path, capsys, trained_run):
    checkpoint, tokenizer = shared_checkpoint(shared_dir, NANOGPT), shared_tokenizer(shared_dir, NANOGPT)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = tree(run)
    assert {"README.md", "chat_template.jinja", "train.log"} <= set(before)
    code, _, err = convert_cli(capsys, checkpoint, tokenizer, run)
    assert_usage_error(code, err)
    assert err.strip() == (
        f"error: --out {run} is not empty (it holds the output of `hf-sft train`): choose another path, "
        "or pass --overwrite to replace it"
    )
    assert tree(run) == before

    code, _, err = convert_cli(capsys, checkpoint, tokenizer, tmp_path / "fresh")
    assert code == 0, err
    code, _, err = convert_cli(capsys, checkpoint, tokenizer, run, "--overwrite")
    assert code == 0, err
    # Exactly the converted model: no model card, chat template, log or checkpoint of the run is left.
    assert tree(run) == tree(tmp_path / "fresh")
    assert not (run / "README.md").exists() and not list(run.glob("checkpoint-*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf_sft")]  # no temporary sibling left


def test_convert_may_rewrite_its_own_output_and_never_its_inputs(shared_dir, tmp_path, capsys):
    checkpoint, tokenizer = shared_checkpoint(shared_dir, NANOGPT), shared_tokenizer(shared_dir, NANOGPT)
    assert convert_cli(capsys, checkpoint, tokenizer, tmp_path / "out")[0] == 0
    first = tree(tmp_path / "out")
    assert convert_cli(capsys, checkpoint, tokenizer, tmp_path / "out")[0] == 0  # its own earlier output
    assert tree(tmp_path / "out") == first

    local = tmp_path / "pretrain"
    local.mkdir()
    shutil.copy(checkpoint, local / "ckpt.pt")
    shutil.copy(tokenizer, local / "tokenizer.json")
    before = tree(local)
    for out, flags, message in [
        (local, ["--overwrite"], f"error: --out {local} holds the input {(local / 'ckpt.pt').resolve()}"),
        (local / "ckpt.pt", ["--overwrite"], f"error: --out {local / 'ckpt.pt'} is the input"),
        (local / "ckpt.pt" / "x", [], f"error: --out {local / 'ckpt.pt' / 'x'} is inside the input"),
    ]:
        code, _, err = convert_cli(capsys, local / "ckpt.pt", local / "tokenizer.json", out, *flags)
        assert_usage_error(code, err)
        assert err.strip().startswith(message), err
    assert tree(local) == before


def test_a_failed_conversion_leaves_the_destination_as_it_was(shared_dir, tmp_path, capsys, monkeypatch):
    checkpoint, tokenizer = shared_checkpoint(shared_dir, NANOGPT), shared_tokenizer(shared_dir, NANOGPT)
    out = tmp_path / "out"
    assert convert_cli(capsys, checkpoint, tokenizer, out)[0] == 0
    before = tree(out)

    def fail(self, folder, *args, **kwargs):  # the weights are written, then the tokenizer cannot be
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr("transformers.PreTrainedTokenizerFast.save_pretrained", fail)
    code, _, err = convert_cli(capsys, checkpoint, tokenizer, out)
    assert code == 1 and err.strip() == f"error: cannot write {out}: no space left on device"
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
