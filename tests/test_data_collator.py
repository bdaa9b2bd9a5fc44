"""Collators: dynamic padding, and padding-free packing whose per-token losses equal the padded batch's."""

import doctest
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

import hf_sft.data.collator as collator_module
from hf_sft.data.collator import IGNORE_INDEX, PaddingCollator, make_collator, padded_length
from hf_sft.data.masking import Encoder, tokenize_and_mask
from hf_sft.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
RECORDS = {
    "instruction": ["Name a primary colour.", "Which is a fish?", "Summarise the text.", "Hello world!"],
    "input": ["", "Tope or Rope", "The cat sat on the mat all day long.", ""],
    "output": ["Red is a primary colour.", "Tope", "A cat sat.", "How are you today? Numbers 1 2 3."],
}


@pytest.fixture(scope="module")
def features() -> list[dict]:
    tokenizer = load_tokenizer(FIXTURES / "tiny_bpe.json")
    columns = tokenize_and_mask(RECORDS, Encoder.from_tokenizer(tokenizer))
    return [{key: columns[key][i] for key in ("input_ids", "attention_mask", "labels")} for i in range(4)]


def test_doctests():
    assert doctest.testmod(collator_module).failed == 0


@pytest.mark.parametrize("multiple", [None, 8])
def test_padding_keeps_every_example_and_masks_the_rest(features, multiple):
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=multiple)(features)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (4, padded_length(longest, multiple))
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert batch["labels"][row, :n].tolist() == feature["labels"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all() and (batch["input_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert padded_length(17, 8) == 24 and padded_length(16, 8) == 16 and padded_length(5, None) == 5


def test_packing_concatenates_without_attention_mask(features):
    batch = make_collator(pad_token_id=0, packing=True)(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    lengths = [len(f["input_ids"]) for f in features]
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(4)]
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in starts)
    supervised = sum(label != IGNORE_INDEX for f in features for label in f["labels"])
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == supervised  # nothing lost: first tokens are prompt
    fully_supervised = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    packed = make_collator(0, packing=True)(fully_supervised)
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]
    assert isinstance(make_collator(0), PaddingCollator)
    assert isinstance(make_collator(0, packing=True), DataCollatorWithFlattening)


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every supervised position, in row-major order."""
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    keep = labels != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")


@pytest.fixture(params=["nanogpt", "llama"])
def model(request):
    modeling = pytest.importorskip("hf_sft.modeling_hfsft_gpt")
    from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig

    config = HfSftGPTConfig(
        family=request.param,
        vocab_size=400,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        multiple_of=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return modeling.HfSftGPTForCausalLM(config).eval()


@torch.no_grad()
def test_packed_and_padded_batches_give_the_same_per_token_losses(model, features):
    padded = PaddingCollator(pad_token_id=0)(features)
    packed = make_collator(0, packing=True)(features)
    padded_out = model(**padded)
    packed_out = model(**packed)
    padded_losses = per_token_losses(padded_out.logits, padded["labels"])
    packed_losses = per_token_losses(packed_out.logits, packed["labels"])
    assert padded_losses.numel() == sum(sum(lab != IGNORE_INDEX for lab in f["labels"]) for f in features)
    torch.testing.assert_close(packed_losses, padded_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_no_token_attends_across_an_example_boundary(model, features):
    packed = make_collator(0, packing=True)(features)
    lengths = [len(f["input_ids"]) for f in features]
    bounds = [(sum(lengths[:i]), sum(lengths[: i + 1])) for i in range(len(lengths))]
    reference = model(**packed).logits
    for victim, (start, end) in enumerate(bounds):
        perturbed = {key: value.clone() for key, value in packed.items()}
        perturbed["input_ids"][0, start:end] = (perturbed["input_ids"][0, start:end] + 7) % 400
        logits = model(**perturbed).logits
        for other, (o_start, o_end) in enumerate(bounds):
            if other == victim:
                assert not torch.allclose(logits[0, o_start:o_end], reference[0, o_start:o_end])
            else:
                torch.testing.assert_close(logits[0, o_start:o_end], reference[0, o_start:o_end], atol=1e-5, rtol=0)
