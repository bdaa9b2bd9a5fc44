"""`hf-sft export`: stock GPT-2 / LLaMA folders with the same logits and no custom code; exact legacy round trips."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.legacy_checkpoints import NANOGPT, PAIRS, SIMPLE_LLAMA, shared_checkpoint, shared_tokenizer

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.cli import main
from hf_sft.export import blockers
from hf_sft.export.legacy import fuse_interleaved_qkv
from hf_sft.legacy import convert_to_folder, load_legacy_checkpoint, split_interleaved_qkv
from hf_sft.safe_pickle import load_checkpoint
from hf_sft.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_bpe.json"
ATOL = 1e-4
SMALL = {"vocab_size": 400, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
MODELS = {  # name -> (config fields, stock target)
    "nanogpt": ({"family": "nanogpt", "max_position_embeddings": 64}, "gpt2"),
    "nanogpt_untied": ({"family": "nanogpt", "max_position_embeddings": 64, "tie_word_embeddings": False}, "gpt2"),
    "nanogpt_nobias": ({"family": "nanogpt", "max_position_embeddings": 64, "use_bias": False}, "gpt2"),
    "llama": ({"family": "llama", "multiple_of": 16, "rope_theta": 500.0}, "llama"),
    "llama_gqa": ({"family": "llama", "multiple_of": 16, "num_key_value_heads": 2}, "llama"),
    "llama_tied_bias": ({"family": "llama", "multiple_of": 8, "use_bias": True, "tie_word_embeddings": True}, "llama"),
}
# Loads each exported folder with plain Auto classes where hf_sft cannot be imported; saves logits and a summary.
STOCK_LOADER = """
import json, sys
sys.modules["hf_sft"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
report = {}
for folder in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    input_ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(input_ids).logits, folder + "/logits.pt")
    report[folder] = {"class": type(model).__name__, "dtype": str(model.dtype), "eos": tokenizer.eos_token_id,
                      "bos": tokenizer.bos_token_id, "generation_eos": model.generation_config.eos_token_id}
report["hf_sft_modules"] = sorted(name for name, mod in sys.modules.items() if name.startswith("hf_sft") and mod)
print(json.dumps(report))
"""


def make_model_folder(folder: Path, seed: int = 0, **fields) -> HfSftGPTForCausalLM:
    """A random model with every weight (norms and biases too) perturbed, saved with a tokenizer beside it."""
    tokenizer = load_tokenizer(TOKENIZER)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(seed)
    model = HfSftGPTForCausalLM(HfSftGPTConfig(**SMALL, **ids, **fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def export(*argv) -> int:
    return main(["export", *map(str, argv)])


@pytest.fixture(scope="module")
def stock_exports(tmp_path_factory):
    """Every model of MODELS exported to its stock target, then loaded in one hf_sft-free subprocess."""
    root = tmp_path_factory.mktemp("stock")
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(input_ids, root / "input_ids.pt")
    cases = {}
    for i, (name, (fields, target)) in enumerate(MODELS.items()):
        model = make_model_folder(root / name, seed=i, **fields)
        assert export(root / name, "--to", target, "--out", root / f"{name}-{target}") == 0
        with torch.no_grad():
            cases[name] = (model(input_ids).logits, root / f"{name}-{target}", target)
    folders = json.dumps([str(out) for _, out, _ in cases.values()])
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, folders, str(root / "input_ids.pt")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return cases, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(MODELS))
def test_stock_folder_matches_logits_without_hf_sft(stock_exports, name):
    cases, report = stock_exports
    logits, out, target = cases[name]
    assert report["hf_sft_modules"] == []
    loaded = report[str(out)]
    assert loaded["class"] == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[target]
    assert loaded["dtype"] == "torch.float32"
    torch.testing.assert_close(torch.load(out / "logits.pt"), logits, atol=ATOL, rtol=0)

    assert not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == target
    tokenizer = load_tokenizer(TOKENIZER)
    assert (loaded["bos"], loaded["eos"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert loaded["generation_eos"] == tokenizer.eos_token_id
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


def test_gpt2_export_of_biasless_model_writes_zero_biases(stock_exports):
    from safetensors.torch import load_file

    _, out, _ = stock_exports[0]["nanogpt_nobias"]
    weights = load_file(out / "model.safetensors")
    biases = [k for k in weights if k.endswith(".bias")]
    assert "transformer.h.0.attn.c_attn.bias" in biases and "transformer.ln_f.bias" in biases
    assert all(not weights[k].any() for k in biases)


def test_untied_head_stays_untied(stock_exports):
    from safetensors.torch import load_file

    _, out, _ = stock_exports[0]["nanogpt_untied"]
    weights = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


@pytest.mark.parametrize(
    ("fields", "target", "named", "not_named"),
    [
        ({"family": "llama"}, "gpt2", ["RMSNorm", "rotary positions", "SwiGLU"], []),
        ({"family": "nanogpt", "norm_type": "rmsnorm"}, "gpt2", ["RMSNorm"], ["rotary", "SwiGLU"]),
        ({"family": "llama", "num_key_value_heads": 2}, "gpt2", ["grouped-query attention"], []),
        ({"family": "nanogpt"}, "llama", ["LayerNorm", "learned absolute positions", "GELU"], []),
        ({"family": "llama", "position_embedding_type": "learned"}, "llama", ["learned absolute positions"], ["GELU"]),
    ],
)
def test_blockers_name_the_features_a_stock_target_lacks(fields, target, named, not_named):
    found = " ".join(blockers(HfSftGPTConfig(**SMALL, **fields), target))
    assert all(feature in found for feature in named), found
    assert not any(feature in found for feature in not_named), found


def test_unexportable_model_is_a_clear_usage_error(tmp_path, capsys):
    make_model_folder(tmp_path / "m", family="llama", multiple_of=16)
    assert export(tmp_path / "m", "--to", "gpt2", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot export") and "RMSNorm" in err and "--to llama" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_folder_takes_the_run_folders_tokenizer(tmp_path):
    run = tmp_path / "run"
    make_model_folder(run, family="nanogpt", max_position_embeddings=64)
    checkpoint = run / "checkpoint-7"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (checkpoint / name).write_bytes((run / name).read_bytes())
    assert export(checkpoint, "--to", "gpt2", "--out", tmp_path / "out") == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (None, ["--to", "gpt2", "--out", "{tmp}/out"], "does not exist"),
        ("model", ["--to", "gpt2", "--out", "{tmp}/model"], "is the input"),
        ("model", ["--to", "legacy-pt", "--out", "{tmp}"], "holds the input"),
        ("model", ["--to", "legacy-pt", "--out", "{tmp}/code"], "is a folder"),
        ("code", ["--to", "gpt2", "--out", "{tmp}/code"], "is not empty (it holds files this command did not write)"),
        ("stock", ["--to", "gpt2", "--out", "{tmp}/again"], "not an hf_sft one"),
        ("model", ["--to", "gpt2", "--out", "{tmp}/o", "--mask_buffers"], "only applies to --to legacy-pt"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, setup, argv, message):
    if setup is not None:
        make_model_folder(tmp_path / "model", family="nanogpt", max_position_embeddings=64)
    if setup is not None:
        (tmp_path / "code").mkdir()
        (tmp_path / "code" / "modeling_x.py").write_text("")
    if setup == "stock":
        assert export(tmp_path / "model", "--to", "gpt2", "--out", tmp_path / "stock") == 0
        capsys.readouterr()
    model_dir = tmp_path / ("stock" if setup == "stock" else "model")
    assert export(model_dir, *(arg.format(tmp=tmp_path) for arg in argv)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("checkpoint", [NANOGPT, SIMPLE_LLAMA])
def test_legacy_round_trip_reproduces_the_original_checkpoint(shared_dir, tmp_path, checkpoint):
    specials = PAIRS[checkpoint][1]
    source = shared_checkpoint(shared_dir, checkpoint)
    convert_to_folder(source, shared_tokenizer(shared_dir, checkpoint), tmp_path / "hf", **specials)
    assert export(tmp_path / "hf", "--to", "legacy-pt", "--out", tmp_path / "back.pt") == 0

    original, back = load_checkpoint(source), load_checkpoint(tmp_path / "back.pt")
    before, after = original["model_state_dict"], back["model_state_dict"]
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    if checkpoint == NANOGPT:
        assert set(back) == {"model_state_dict", "model_args"}
        assert back["model_args"] == original["model_args"]
        assert after["lm_head.weight"].data_ptr() == after["transformer.wte.weight"].data_ptr()  # tied: one tensor
    else:
        assert set(back) == {"model_state_dict", "config"}
        fields = vars(back["config"])
        assert {k: v for k, v in original["config"].to_dict().items() if k in fields} == {
            k: v for k, v in fields.items() if k in original["config"].to_dict()
        }
    # hf-sft convert reads the written file back to the same weights
    reread = load_legacy_checkpoint(tmp_path / "back.pt")
    assert reread.config.to_dict() == load_legacy_checkpoint(source).config.to_dict()


def test_legacy_nanogpt_with_mask_buffers(shared_dir, tmp_path):
    original = torch.load(shared_checkpoint(shared_dir, NANOGPT), weights_only=True)
    state_dict, block = dict(original["model_state_dict"]), original["model_args"]["block_size"]
    mask = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
    with_mask = {}
    for key, value in state_dict.items():  # nanoGPT's order: the attention's own buffer before its children
        if key.endswith("attn.c_attn.weight"):
            with_mask[key.replace("c_attn.weight", "bias")] = mask
        with_mask[key] = value
    torch.save({**original, "model_state_dict": with_mask}, tmp_path / "masked.pt")
    convert_to_folder(tmp_path / "masked.pt", shared_tokenizer(shared_dir, NANOGPT), tmp_path / "hf")

    assert export(tmp_path / "hf", "--to", "legacy-pt", "--out", tmp_path / "back.pt", "--mask_buffers") == 0
    after = torch.load(tmp_path / "back.pt", weights_only=True)["model_state_dict"]
    assert list(after) == list(with_mask)
    assert all(torch.equal(after[k], with_mask[k]) for k in with_mask)


@pytest.mark.parametrize("name", ["nanogpt_untied", "nanogpt_nobias", "llama"])
def test_legacy_export_converts_back_to_the_same_logits(tmp_path, name):
    from hf_sft.legacy import convert_checkpoint

    fields = MODELS[name][0]
    model = make_model_folder(tmp_path / "m", **fields)
    assert export(tmp_path / "m", "--to", "legacy-pt", "--out", tmp_path / "legacy.pt") == 0
    back, _ = convert_checkpoint(tmp_path / "legacy.pt", TOKENIZER)
    input_ids = torch.randint(0, SMALL["vocab_size"], (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, model(input_ids).logits, atol=ATOL, rtol=0)


def test_legacy_refuses_what_the_original_code_cannot_run(tmp_path, capsys):
    make_model_folder(tmp_path / "m", family="llama", multiple_of=16, num_key_value_heads=2)
    assert export(tmp_path / "m", "--to", "legacy-pt", "--out", tmp_path / "x.pt") == 2
    err = capsys.readouterr().err
    assert "simple_llama" in err and "grouped-query attention" in err and not (tmp_path / "x.pt").exists()


def test_fused_qkv_is_the_inverse_of_converts_split():
    heads, width = 4, 32
    fused = torch.randn(3 * width, width)
    assert torch.equal(fuse_interleaved_qkv(*split_interleaved_qkv(fused, heads), heads=heads), fused)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_legacy_pt_inside_the_model_is_refused_before_anything_is_read(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    make_model_folder(model_dir, family="nanogpt", max_position_embeddings=64)
    before = tree(model_dir)

    def must_not_read(*args, **kwargs):
        raise AssertionError("the model was read before the destination was checked")

    monkeypatch.setattr("hf_sft.export.read_hfsft_folder", must_not_read)
    for flags in ([], ["--overwrite"]):
        out = model_dir / "model.safetensors"
        assert export(model_dir, "--to", "legacy-pt", "--out", out, *flags) == 2
        assert capsys.readouterr().err.strip() == f"error: --out {out} is inside the input {model_dir.resolve()}"
    assert tree(model_dir) == before


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path, capsys):
    make_model_folder(tmp_path / "model", family="nanogpt", max_position_embeddings=64)
    optimizer = tmp_path / "run" / "checkpoint-4" / "optimizer.pt"
    optimizer.parent.mkdir(parents=True)
    optimizer.write_bytes(b"the optimizer state of a run")
    assert export(tmp_path / "model", "--to", "legacy-pt", "--out", optimizer) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {optimizer} already exists: choose another path, or pass --overwrite to replace it"
    )
    assert optimizer.read_bytes() == b"the optimizer state of a run"
    assert export(tmp_path / "model", "--to", "legacy-pt", "--out", optimizer, "--overwrite") == 0
    assert set(load_checkpoint(optimizer)) == {"model_state_dict", "model_args"}
    assert sorted(p.name for p in optimizer.parent.iterdir()) == ["optimizer.pt"]  # no temporary file left


def test_a_folder_holds_exactly_the_export_after_overwrite(tmp_path, capsys):
    make_model_folder(tmp_path / "model", family="llama", multiple_of=16)
    assert export(tmp_path / "model", "--to", "llama", "--out", tmp_path / "fresh") == 0
    again = tree(tmp_path / "fresh")
    assert export(tmp_path / "model", "--to", "llama", "--out", tmp_path / "fresh") == 0  # its own earlier output
    assert tree(tmp_path / "fresh") == again

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("a card describing another model")
    (out / "chat_template.jinja").write_text("{{ another format }}")
    assert export(tmp_path / "model", "--to", "llama", "--out", out) == 2
    assert (out / "README.md").read_text() == "a card describing another model"
    capsys.readouterr()
    assert export(tmp_path / "model", "--to", "llama", "--out", out, "--overwrite") == 0
    assert tree(out) == tree(tmp_path / "fresh")


def test_a_failed_export_leaves_the_destination_as_it_was(tmp_path, capsys, monkeypatch):
    make_model_folder(tmp_path / "model", family="nanogpt", max_position_embeddings=64)
    out = tmp_path / "out"
    assert export(tmp_path / "model", "--to", "gpt2", "--out", out) == 0
    before = tree(out)

    def fail(source, folder):  # the weights are written, then the tokenizer files cannot be
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr("hf_sft.export.stock.copy_tokenizer_files", fail)
    capsys.readouterr()
    assert export(tmp_path / "model", "--to", "gpt2", "--out", out) == 1
    assert capsys.readouterr().err.strip() == f"error: cannot write {out}: no space left on device"
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
