"""A finetune_gpt.py `ckpt_iter_N.pt` continues: weights, AdamW moments and step mapped exactly, hf_sft's schedule."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers.nanogpt import GPT, MODEL_ARGS, finetune_gpt_checkpoint
from transformers import Trainer

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.cli import main
from hf_sft.legacy import convert_parameter_tensors, convert_state_dict, load_legacy_checkpoint
from hf_sft.safe_pickle import load_checkpoint
from hf_sft.training.arguments import parse_args
from hf_sft.training.resume import RUN_ARGS_FILE, read_seed_run, write_continuation

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "tests" / "fixtures" / "tiny_bpe.json")
DATA = str(REPO / "hf_sft" / "demo" / "demo_sample.jsonl")
# The seed script's arguments, as its checkpoint records them.
SEED_FLAGS = {
    "tokenizer_path": TOKENIZER,
    "data_path": DATA,
    "pretrained_ckpt_path": "out/pretrain/best_model.pt",
    "resume_from_ckpt_path": None,
    "out_dir": "out/finetune",
    "batch_size": 2,
    "learning_rate": 1e-3,
    "num_epochs": 1,
    "max_iters": 5,
    "gradient_accumulation_steps": 1,
    "log_interval": 1,
    "save_interval": 100,
    "device": "cpu",
    "dtype": "float32",
}
RUN = ["--val_split", "0", "--max_seq_len", "64", "--warmup_steps", "2"]


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """3 optimizer steps of a finetune_gpt.py-style loop on nanoGPT."""
    return finetune_gpt_checkpoint(tmp_path_factory.mktemp("seed") / "ckpt_iter_3.pt", 3, SEED_FLAGS)


def _as_plain_adamw(optimizer) -> None:
    """The same elementwise AdamW kernel on both sides, so that one step compares bit for bit."""
    for group in optimizer.param_groups:
        group.update(foreach=False, fused=False)


def test_adamw_moments_and_step_continue_exactly(seed_checkpoint, tmp_path):
    saved = load_checkpoint(seed_checkpoint)
    run = read_seed_run(seed_checkpoint)
    assert (run.step, run.iter_num) == (3, 3)
    parsed = parse_args(["--tokenizer_path", TOKENIZER, "--data_path", DATA, "--out_dir", str(tmp_path / "out")])
    folder = write_continuation(run, parsed, parse_args)

    # The seed side: nanoGPT and its AdamW as saved.
    seed_model = GPT(**MODEL_ARGS)
    seed_model.load_state_dict(saved["model_state_dict"])
    seed_optimizer = seed_model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    seed_optimizer.load_state_dict(saved["optimizer_state_dict"])
    # Ours: the folder's weights in the optimizer Trainer builds, loaded from optimizer.pt as Trainer loads it.
    model = HfSftGPTForCausalLM.from_pretrained(folder)
    trainer = Trainer(model=model, args=dataclasses.replace(parsed[2], eval_strategy="no"))
    trainer.create_optimizer()
    optimizer = trainer.optimizer
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    for ours, theirs in zip(optimizer.param_groups, seed_optimizer.param_groups, strict=True):  # decayed, not
        ours.update({key: theirs[key] for key in ("lr", "betas", "eps", "weight_decay")})
    _as_plain_adamw(optimizer)
    _as_plain_adamw(seed_optimizer)

    checkpoint = load_legacy_checkpoint(seed_checkpoint)
    seed_params = dict(seed_model.named_parameters())
    ours = dict(model.named_parameters())

    def seed_state(moment):
        return {name: seed_optimizer.state[param][moment] for name, param in seed_params.items()}

    for moment in ("exp_avg", "exp_avg_sq"):  # mapped as the weights are, before any step
        mapped = convert_parameter_tensors(checkpoint, seed_state(moment))
        assert mapped.keys() == ours.keys()
        assert all(torch.equal(optimizer.state[ours[name]][moment], mapped[name]) for name in ours), moment
    assert all(float(optimizer.state[param]["step"]) == 3 for param in ours.values())

    # One more step on both sides with the same gradients: the weights and moments stay the mapped ones.
    generator = torch.Generator().manual_seed(1)
    gradients = {name: torch.randn(param.shape, generator=generator) for name, param in seed_params.items()}
    for name, param in seed_params.items():
        param.grad = gradients[name].clone()
    for name, grad in convert_parameter_tensors(checkpoint, gradients).items():
        ours[name].grad = grad.clone()
    seed_optimizer.step()
    optimizer.step()
    checkpoint.state_dict = {**checkpoint.state_dict, **{k: v.detach() for k, v in seed_model.state_dict().items()}}
    expected = convert_state_dict(checkpoint)
    assert all(torch.equal(ours[name].detach(), expected[name]) for name in ours)
    for moment in ("exp_avg", "exp_avg_sq"):
        mapped = convert_parameter_tensors(checkpoint, seed_state(moment))
        assert all(torch.equal(optimizer.state[ours[name]][moment], mapped[name]) for name in ours), moment


def test_simple_llama_moments_are_split_and_permuted_like_the_weights(tmp_path):
    """AdamW is elementwise: stepping in the legacy layout and mapping equals mapping and stepping in ours."""
    from hf_sft.export import export_model
    from hf_sft.tokenizer import load_tokenizer

    config = HfSftGPTConfig(
        family="llama", vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multiple_of=16
    )
    HfSftGPTForCausalLM(config).save_pretrained(tmp_path / "m")
    load_tokenizer(TOKENIZER).save_pretrained(tmp_path / "m")
    export_model(tmp_path / "m", "legacy-pt", tmp_path / "legacy.pt")
    checkpoint = load_legacy_checkpoint(tmp_path / "legacy.pt")
    assert checkpoint.source == "simple_llama"

    generator = torch.Generator().manual_seed(0)
    legacy = {k: torch.randn(v.shape, generator=generator).requires_grad_() for k, v in checkpoint.state_dict.items()}
    grads = {k: torch.randn(v.shape, generator=generator) for k, v in legacy.items()}
    mapped = {k: v.detach().clone().requires_grad_() for k, v in convert_parameter_tensors(checkpoint, legacy).items()}
    mapped_grads = convert_parameter_tensors(checkpoint, grads)
    optimizers = []
    for params, gradients in ((legacy, grads), (mapped, mapped_grads)):
        for name, param in params.items():
            param.grad = gradients[name]
        optimizers.append(torch.optim.AdamW(list(params.values()), lr=1e-2, foreach=False))
    for _ in range(2):
        for optimizer in optimizers:
            optimizer.step()
    moments = {k: optimizers[0].state[v]["exp_avg_sq"] for k, v in legacy.items()}
    after = convert_parameter_tensors(checkpoint, {k: v.detach() for k, v in legacy.items()})
    assert all(torch.equal(after[k], mapped[k].detach()) for k in mapped)
    assert all(
        torch.equal(v, optimizers[1].state[mapped[k]]["exp_avg_sq"])
        for k, v in convert_parameter_tensors(checkpoint, moments).items()
    )


def _history(folder: Path) -> dict[int, dict]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def test_a_finetune_gpt_run_continues_at_its_step_in_hf_sfts_schedule(seed_checkpoint, tmp_path):
    out = tmp_path / "continued"
    assert main(["train", "--resume_from_ckpt_path", str(seed_checkpoint), "--out_dir", str(out), *RUN]) == 0
    log = (out / "train.log").read_text()
    assert (
        "continuing finetune_gpt.py checkpoint ckpt_iter_3.pt (iteration 3, optimizer step 3) at step 3 of 5: its "
        "weights and AdamW moments; hf_sft's data order and learning-rate schedule from step 3 on"
    ) in log
    continued = _history(out / "checkpoint-5")
    assert sorted(continued) == [4, 5]  # steps 1-3 were the seed's
    record = json.loads((out / "checkpoint-5" / RUN_ARGS_FILE).read_text())
    assert record["values"]["learning_rate"] == 1e-3 and record["shape"]["per_device_train_batch_size"] == 2
    assert record["base_model"].startswith("finetune_gpt.py checkpoint ckpt_iter_3.pt")

    # The same flags from the weights alone: steps 4 and 5 see the same learning rates and the same examples.
    fresh = tmp_path / "fresh"
    flags = ["--tokenizer_path", TOKENIZER, "--data_path", DATA, "--batch_size", "2", "--learning_rate", "1e-3"]
    flags += ["--gradient_accumulation_steps", "1", "--max_iters", "5", "--log_interval", "1", "--device", "cpu"]
    argv = ["train", "--pretrained_ckpt_path", str(seed_checkpoint), *flags, *RUN, "--out_dir", str(fresh)]
    assert main([*argv, "--save_interval", "5"]) == 0
    reference = _history(fresh / "checkpoint-5")
    for step in (4, 5):
        assert continued[step]["learning_rate"] == reference[step]["learning_rate"]
        tokens = reference[step]["num_input_tokens_seen"] - reference[step - 1]["num_input_tokens_seen"]
        assert (
            continued[step]["num_input_tokens_seen"] - continued.get(step - 1, {}).get("num_input_tokens_seen", 0)
            == tokens
        )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--batch_size", "4"],
            "error: --resume_from_ckpt_path {ckpt}: --batch_size 4 (the checkpoint's run: 2). A continued run keeps "
            "its weights and batch layout; to change them, start a new run from its weights with "
            "--pretrained_ckpt_path {ckpt}",
        ),
        (["--max_iters", "3"], "error: --max_iters 3 is not beyond the checkpoint's step 3: nothing is left to train"),
        (["--learning_rate", "inf"], "error: --learning_rate must be a finite number, got inf"),
    ],
)
def test_a_continuation_that_cannot_be_faithful_is_refused(seed_checkpoint, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["train", "--resume_from_ckpt_path", str(seed_checkpoint), "--out_dir", str(out), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message.format(ckpt=seed_checkpoint)
    assert not out.exists()


def test_moments_that_match_no_parameter_layout_are_refused(seed_checkpoint, tmp_path, capsys):
    saved = load_checkpoint(seed_checkpoint)
    saved["config"] = dict(vars(saved["config"]))  # the arguments as a dict (vars(args)) are read as well
    groups = saved["optimizer_state_dict"]["param_groups"]
    groups[0]["params"], groups[1]["params"] = groups[0]["params"][:-1], groups[0]["params"][-1:] + groups[1]["params"]
    torch.save(saved, tmp_path / "ckpt_iter_3.pt")
    no_tokenizer = {**saved, "config": {**SEED_FLAGS, "tokenizer_path": None}}
    torch.save(no_tokenizer, tmp_path / "no_tokenizer.pt")
    assert main(["train", "--resume_from_ckpt_path", str(tmp_path / "ckpt_iter_3.pt")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'ckpt_iter_3.pt'}: its optimizer's 2 param group(s) of [9, 19] parameters do not "
        "follow the model's 28 parameters (one group, or nanoGPT's configure_optimizers), so its AdamW moments "
        f"cannot be matched to the weights; to keep the weights only, pass --pretrained_ckpt_path "
        f"{tmp_path / 'ckpt_iter_3.pt'}"
    )
    assert main(["train", "--resume_from_ckpt_path", str(tmp_path / "no_tokenizer.pt")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume_from_ckpt_path {tmp_path / 'no_tokenizer.pt'} is a finetune_gpt.py checkpoint, which "
        "holds no tokenizer: pass --tokenizer_path (the tokenizer it was trained with)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_iter_3.pt", "no_tokenizer.pt"]
