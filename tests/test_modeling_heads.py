"""The task heads: shapes and losses as stock Llama's, loading from an SFT folder, a reward model trained with TRL."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers.tiny_trained import train_tiny
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from hf_sft import (
    HfSftGPTConfig,
    HfSftGPTForCausalLM,
    HfSftGPTForQuestionAnswering,
    HfSftGPTForSequenceClassification,
    HfSftGPTForTokenClassification,
)

VOCAB, PAD = 97, 0


def config(family: str, **overrides) -> HfSftGPTConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multiple_of=16)
    return HfSftGPTConfig(family=family, pad_token_id=PAD, **{**fields, **overrides})


def ids(batch: int = 3, length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["nanogpt", "llama"])
def family(request) -> str:
    return request.param


def test_sequence_classification_reads_the_last_real_token_whatever_the_padding(family):
    torch.manual_seed(0)
    model = HfSftGPTForSequenceClassification(config(family, num_labels=3)).eval()
    short, long = ids(1, 6, seed=1), ids(1, 9, seed=2)
    pad = torch.full((1, 3), PAD)
    alone = model(short).logits
    assert alone.shape == (1, 3)
    for padded, mask in (
        (torch.cat([short, pad], 1), torch.cat([torch.ones_like(short), torch.zeros_like(pad)], 1)),
        (torch.cat([pad, short], 1), torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1)),
    ):
        batch = model(torch.cat([padded, long]), attention_mask=torch.cat([mask, torch.ones_like(long)])).logits
        torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch[1], model(long).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_labels, labels, expected", [(1, "float", "mse"), (3, "long", "ce")])
def test_sequence_classification_loss(family, num_labels, labels, expected):
    torch.manual_seed(0)
    model = HfSftGPTForSequenceClassification(config(family, num_labels=num_labels)).eval()
    target = torch.tensor([0.5, -1.0, 2.0]) if labels == "float" else torch.tensor([2, 0, 1])
    out = model(ids(), labels=target)
    reference = (
        F.mse_loss(out.logits.squeeze(-1), target) if expected == "mse" else F.cross_entropy(out.logits, target)
    )
    torch.testing.assert_close(out.loss, reference)


def test_token_classification_shapes_and_loss(family):
    torch.manual_seed(0)
    model = HfSftGPTForTokenClassification(config(family, num_labels=5)).eval()
    input_ids = ids()
    labels = torch.randint(0, 5, input_ids.shape)
    labels[:, :3] = -100
    out = model(input_ids, labels=labels)
    assert out.logits.shape == (3, 10, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)))


def test_question_answering_shapes_and_loss(family):
    torch.manual_seed(0)
    model = HfSftGPTForQuestionAnswering(config(family)).eval()
    start, end = torch.tensor([1, 4, 2]), torch.tensor([3, 8, 2])
    out = model(ids(), start_positions=start, end_positions=end)
    assert out.start_logits.shape == out.end_logits.shape == (3, 10)
    expected = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "auto, head",
    [
        (AutoModelForSequenceClassification, "score"),
        (AutoModelForTokenClassification, "score"),
        (AutoModelForQuestionAnswering, "qa_outputs"),
    ],
)
def test_heads_load_from_a_causal_lm_folder(family, tmp_path, auto, head):
    torch.manual_seed(0)
    causal = HfSftGPTForCausalLM(config(family))
    causal.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map[auto.__name__].startswith("modeling_hfsft_gpt.HfSftGPTFor")
    model, info = auto.from_pretrained(tmp_path, output_loading_info=True)
    for name, param in causal.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], param), name
    assert {key.split(".")[0] for key in info["missing_keys"]} == {head}  # reported as newly initialised
    assert not model.config.tie_word_embeddings or "lm_head.weight" not in info["unexpected_keys"]


# Run where the checkout is not on sys.path: the folder's own copy of the code must provide the heads.
REMOTE_LOAD = """
import json, sys
import transformers
autos = ("AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering")
classes = [getattr(transformers, a).from_pretrained(sys.argv[1], trust_remote_code=True).__class__ for a in autos]
print(json.dumps({"classes": [c.__module__ + "." + c.__name__ for c in classes],
                  "hf_sft": sorted(m for m in sys.modules if m.split(".")[0] == "hf_sft")}))
"""


def test_heads_load_with_trust_remote_code_without_hf_sft(tmp_path):
    HfSftGPTForCausalLM(config("llama")).save_pretrained(tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "model")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["hf_sft"] == []
    assert [name.rsplit(".", 1)[1] for name in report["classes"]] == [
        "HfSftGPTForSequenceClassification",
        "HfSftGPTForTokenClassification",
        "HfSftGPTForQuestionAnswering",
    ]
    assert all(name.startswith("transformers_modules.") for name in report["classes"])


@pytest.mark.slow
def test_reward_model_trains_from_an_sft_folder_with_trl(tmp_path):
    """The stage after SFT: a reward head on the SFT model, a few RewardTrainer steps on a tiny preference set."""
    from trl import RewardConfig, RewardTrainer

    sft = train_tiny(tmp_path / "sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    assert isinstance(model, HfSftGPTForSequenceClassification)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    pairs = [
        ("What month comes after March?", "April.", "Banana."),
        ("How many legs does a cat have?", "Four.", "Blue."),
        ("What is the capital of Norway?", "Oslo.", "Seven."),
        ("Name a primary colour.", "Red.", "Tuesday."),
    ] * 2
    data = Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in pairs])
    args = RewardConfig(
        output_dir=str(tmp_path / "reward"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_length=64,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    changed = {name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])}
    assert "score.weight" in changed and any(name.startswith("model.layers.") for name in changed)
