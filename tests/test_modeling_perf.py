"""The training fast paths (packed attention, supervised-only LM head) equal the plain paths; the benchmarks run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sft import heads_hfsft_gpt, packing_hfsft_gpt
from hf_sft.configuration_hfsft_gpt import HfSftGPTConfig
from hf_sft.modeling_hfsft_gpt import HfSftGPTForCausalLM, default_position_ids

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

CONFIGS = {
    "nanogpt": {"family": "nanogpt"},
    "llama_gqa": {"family": "llama", "num_key_value_heads": 2, "multiple_of": 16},
}


def make_model(name: str, **overrides) -> HfSftGPTForCausalLM:
    torch.manual_seed(0)
    config = HfSftGPTConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **CONFIGS[name], **overrides
    )
    return HfSftGPTForCausalLM(config)


def right_padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(3, 97, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100
    return input_ids, attention_mask, labels


def packed_row() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    lengths = [5, 9, 3]
    input_ids = torch.randint(3, 97, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = input_ids.clone()
    labels[position_ids < 2] = -100
    return input_ids, position_ids, labels


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def assert_each_example_alone(model, input_ids: torch.Tensor, packed_logits: torch.Tensor, lengths) -> None:
    """The logits of each packed example equal its logits when it is run alone (eval mode)."""
    model.eval()
    start = 0
    for length in lengths:
        alone = model(input_ids[:, start : start + length]).logits
        torch.testing.assert_close(alone, packed_logits[:, start : start + length], atol=1e-5, rtol=1e-5)
        start += length


def fast_layout(model, attention_mask, position_ids):
    """The layout the model's forward would take for this batch, in the model's current mode."""
    embeds = model.model.embed_tokens(torch.zeros_like(position_ids))
    return packing_hfsft_gpt.fast_attention_layout(model.config, embeds, attention_mask, position_ids, model.training)


def test_fast_layout_is_chosen_only_where_it_is_exact():
    model = make_model("nanogpt").train()
    input_ids, attention_mask, _ = right_padded_batch()
    positions = default_position_ids(model.config, model.model.embed_tokens(input_ids), attention_mask, None)
    assert fast_layout(model, attention_mask, positions) == (None, {})
    left = attention_mask.flip(-1)
    assert fast_layout(model, left, positions) is None
    _, packed_positions, _ = packed_row()
    segments = (None, {"segment_lengths": [5, 9, 3]})
    assert fast_layout(model, None, packed_positions) == segments
    assert fast_layout(model, None, packed_positions + 1) is None  # not restarting at 0: not packed
    model.eval()
    assert fast_layout(model, attention_mask, positions) is None
    assert fast_layout(model, None, packed_positions) == segments  # exact everywhere: eval too
    model.train().config._attn_implementation = "eager"
    assert fast_layout(model, attention_mask, positions) is None


def test_a_replaced_sdpa_function_sees_every_attention_call(monkeypatch):
    """Sequence parallelism (DeepSpeed's Ulysses) wraps transformers' SDPA function: no packed kernel may bypass it."""
    model = make_model("llama_gqa").train()
    input_ids, position_ids, labels = packed_row()
    reference = model(input_ids, position_ids=position_ids, labels=labels)
    sdpa, calls = packing_hfsft_gpt.ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def wrapped(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask.shape if attention_mask is not None else None)
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(packing_hfsft_gpt.ALL_ATTENTION_FUNCTIONS, "sdpa", wrapped)
    assert fast_layout(model, None, position_ids) is None
    out = model(input_ids, position_ids=position_ids, labels=labels)
    assert len(calls) == 2 and all(shape[-2:] == (17, 17) for shape in calls)  # every layer, with the packed mask
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-5)


def test_context_parallel_attention_is_left_to_sdpa():
    """accelerate's context-parallel hook asks the attention for plain causal SDPA, where its ring attention works."""
    from accelerate.big_modeling import _attach_context_parallel_hooks

    model = make_model("llama_gqa").train()
    input_ids, position_ids, _ = packed_row()
    plain_causal = model(input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids)).logits
    packed = model(input_ids, position_ids=position_ids).logits
    assert not torch.allclose(packed, plain_causal, atol=1e-3)  # the row's examples attend to each other there
    _attach_context_parallel_hooks(model)
    torch.testing.assert_close(model(input_ids, position_ids=position_ids).logits, plain_causal, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_off_the_cpu_choosing_a_layout_reads_no_device_tensor(name):
    """Meta tensors stand in for an accelerator's: the host cannot read them, so any read while choosing raises."""
    with torch.device("meta"):
        model = make_model(name).train()
    input_ids, position_ids, labels = (t.to("meta") for t in packed_row())
    packed = fast_layout(model, None, position_ids)
    assert packed[0].shape == (1, 1, 17, 17) and packed[1] == {}  # the device-built document mask
    model(input_ids, position_ids=position_ids, labels=labels).loss.backward()  # a whole packed training step
    boundaries = packing_hfsft_gpt.varlen_boundaries(packing_hfsft_gpt.packed_document_ids(position_ids))
    assert boundaries.shape == (18,) and boundaries.dtype == torch.int32  # the CUDA kernel's boundaries alike
    padded_ids, attention_mask, _ = (t.to("meta") for t in right_padded_batch())
    positions = default_position_ids(model.config, model.model.embed_tokens(padded_ids), attention_mask, None)
    assert fast_layout(model, attention_mask, positions) is None  # declined unread


@pytest.mark.parametrize("name", CONFIGS)
def test_right_padded_training_forward_equals_the_masked_one(name):
    model = make_model(name)
    input_ids, attention_mask, labels = right_padded_batch()
    real = attention_mask.bool()
    model.train()
    fast = model(input_ids, attention_mask=attention_mask, labels=labels)
    fast.loss.backward()
    fast_grads = gradients(model)
    model.config._attn_implementation = "eager"  # the masked reference path
    masked = model(input_ids, attention_mask=attention_mask, labels=labels)
    masked.loss.backward()
    torch.testing.assert_close(fast.logits[real], masked.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.loss, masked.loss)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_training_forward_equals_examples_alone(name):
    model = make_model(name).train()
    input_ids, position_ids, labels = packed_row()
    packed = model(input_ids, position_ids=position_ids, labels=labels)
    packed.loss.backward()
    packed_grads = gradients(model)
    model.config._attn_implementation = "eager"  # block-diagonal mask from position_ids
    masked = model(input_ids, position_ids=position_ids, labels=labels)
    masked.loss.backward()
    torch.testing.assert_close(packed.logits, masked.logits, atol=1e-5, rtol=1e-5)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert_each_example_alone(model, input_ids, packed.logits, (5, 9, 3))


def test_packed_attention_kind_follows_device_precision_and_dropout():
    kind = packing_hfsft_gpt.packed_attention_kind
    assert kind(torch.device("cpu"), half_precision=False, dropout=0.0) == "segments"
    assert kind(torch.device("cpu"), half_precision=True, dropout=0.0) == "segments"
    assert kind(torch.device("meta"), half_precision=True, dropout=0.0) == "document_mask"
    cuda = torch.device("cuda")
    expected = "varlen" if packing_hfsft_gpt.varlen_attn is not None else "document_mask"
    assert kind(cuda, half_precision=True, dropout=0.0) == expected
    assert kind(cuda, half_precision=False, dropout=0.0) == "document_mask"  # the flash kernel has no fp32
    assert kind(cuda, half_precision=True, dropout=0.1) == "document_mask"


def test_under_compile_the_cpu_keeps_segments_unless_there_is_dropout(monkeypatch):
    """Traced, the CPU's per-example calls run in the custom operator, which has no dropout: the mask takes those."""
    monkeypatch.setattr(packing_hfsft_gpt, "compiling", lambda: True)
    kind = packing_hfsft_gpt.packed_attention_kind
    assert kind(torch.device("cpu"), half_precision=False, dropout=0.0) == "segments"
    assert kind(torch.device("cpu"), half_precision=True, dropout=0.0) == "segments"
    assert kind(torch.device("cpu"), half_precision=False, dropout=0.1) == "document_mask"
    model = make_model("nanogpt").train()
    _, position_ids, _ = packed_row()
    mask, kwargs = fast_layout(model, None, position_ids)
    assert mask is None and kwargs["segment_document_ids"].tolist() == [[0] * 5 + [1] * 9 + [2] * 3]
    assert packing_hfsft_gpt.packed_attention_interface(kwargs) is packing_hfsft_gpt.traced_segments_attention


@pytest.mark.parametrize("groups", [1, 2])
def test_the_segments_operator_equals_the_per_example_calls(groups):
    """Outputs and gradients of the custom operator (what a compiled CPU step runs) equal the eager per-example
    calls', on rows of random layouts (seeded); `torch.library.opcheck` checks its fake and autograd registrations."""
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    generator = torch.Generator().manual_seed(5)
    for _ in range(6):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 5, (1,), generator=generator)),), generator=generator)
        lengths = lengths.tolist()
        total = sum(lengths)
        query = torch.randn(1, 4, total, 8, generator=generator, requires_grad=True)
        key, value = (torch.randn(1, 4 // groups, total, 8, generator=generator, requires_grad=True) for _ in "kv")
        document_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        eager, _ = packing_hfsft_gpt.segmented_sdpa_attention(module, query, key, value, None, 0.3, 0.0, lengths)
        traced, _ = packing_hfsft_gpt.traced_segments_attention(
            module, query, key, value, None, 0.3, segment_document_ids=document_ids
        )
        torch.testing.assert_close(traced, eager, atol=1e-5, rtol=1e-5)
        weights = torch.randn(eager.shape, generator=generator)
        expected = torch.autograd.grad((eager * weights).sum(), (query, key, value))
        actual = torch.autograd.grad((traced * weights).sum(), (query, key, value))
        for name, want, got in zip("qkv", expected, actual, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    operator = packing_hfsft_gpt.segments_attention_operator.default
    torch.library.opcheck(operator, (query, key, value, document_ids, 0.3))


def test_varlen_boundaries_have_a_fixed_size():
    _, position_ids, _ = packed_row()
    document_ids = packing_hfsft_gpt.packed_document_ids(position_ids)
    assert document_ids.tolist() == [[0] * 5 + [1] * 9 + [2] * 3]
    boundaries = packing_hfsft_gpt.varlen_boundaries(document_ids)
    assert boundaries.dtype == torch.int32
    assert boundaries.tolist() == [0, 5, 14] + [17] * 15  # T + 1 entries: the tail is empty examples


@pytest.mark.parametrize("groups", [1, 2])
def test_half_precision_segments_take_the_eager_form_and_agree_with_fp32(groups):
    torch.manual_seed(3)
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    lengths = [5, 9, 3]
    query = torch.randn(1, 4, 17, 8)
    key, value = torch.randn(1, 4 // groups, 17, 8), torch.randn(1, 4 // groups, 17, 8)
    reference, _ = packing_hfsft_gpt.segmented_sdpa_attention(module, query, key, value, None, 8**-0.5, 0.0, lengths)
    half, _ = packing_hfsft_gpt.segmented_sdpa_attention(
        module, query.bfloat16(), key.bfloat16(), value.bfloat16(), None, 8**-0.5, 0.0, lengths
    )
    assert half.dtype == torch.bfloat16 and half.shape == (1, 17, 4, 8)
    torch.testing.assert_close(half.float(), reference, atol=3e-2, rtol=3e-2)
    start = 0
    for length in lengths:  # causal within each example: the first token sees only itself
        first = value[:, :, start].repeat_interleave(groups, dim=1)  # (1, nh, hs)
        torch.testing.assert_close(reference[:, start], first, atol=1e-6, rtol=1e-6)
        start += length


@pytest.mark.parametrize("name", CONFIGS)
def test_document_mask_packed_attention_equals_examples_alone(name, monkeypatch):
    model = make_model(name).train()
    input_ids, position_ids, labels = packed_row()
    segments = model(input_ids, position_ids=position_ids, labels=labels)
    segments.loss.backward()
    segment_grads = gradients(model)
    monkeypatch.setattr(packing_hfsft_gpt, "packed_attention_kind", lambda *args: "document_mask")
    assert fast_layout(model, None, position_ids)[0].shape == (1, 1, 17, 17)
    packed = model(input_ids, position_ids=position_ids, labels=labels)
    packed.loss.backward()
    torch.testing.assert_close(packed.logits, segments.logits, atol=1e-5, rtol=1e-5)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(segment_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert_each_example_alone(model, input_ids, packed.logits, (5, 9, 3))
    with_weights = model(input_ids, position_ids=position_ids, output_attentions=True)  # eager, full mask
    torch.testing.assert_close(with_weights.logits, packed.logits, atol=1e-5, rtol=1e-5)
    assert with_weights.attentions[0][0, :, 5, :5].abs().sum() == 0  # an example's first token sees no earlier one


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["segments", "document_mask"])
@pytest.mark.parametrize("supervised_only", [True, False], ids=["supervised_only", "full_logits"])
@pytest.mark.parametrize("name", CONFIGS)
def test_packed_training_step_compiles_in_one_graph(name, supervised_only, kind, monkeypatch):
    """No graph break, the CPU stand-in for "no host sync" on an accelerator: fullgraph=True raises at the first one.

    Both loss paths, the supervised-only head with the positions its batches carry; the CPU's attention (the
    segments operator) and the device-side mask that accelerators without the varlen kernel use. aot_eager traces
    forward and backward without code generation. The compiled step gives eager's loss and gradients.
    """
    if kind == "document_mask":
        monkeypatch.setattr(packing_hfsft_gpt, "packed_attention_kind", lambda *args: "document_mask")
    model = make_model(name).train()
    model.supervised_logits_only = supervised_only
    input_ids, position_ids, labels = packed_row()
    positions = heads_hfsft_gpt.supervised_positions(heads_hfsft_gpt.next_token_labels(labels))
    batch = {"position_ids": position_ids, "labels": labels, "supervised_positions": positions}
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    eager = model(input_ids, **batch, num_items_in_batch=num_items)
    eager.loss.backward()
    eager_grads = gradients(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(input_ids, **batch, num_items_in_batch=num_items).loss
    loss.backward()
    torch.testing.assert_close(loss, eager.loss, atol=1e-5, rtol=1e-5)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(eager_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_causal_lm_declares_the_positions_a_run_gives_it():
    """A run adds `supervised_positions` to its batches only for a model whose forward names them (not stock ones)."""
    import inspect

    from hf_sft.training.trainer import SUPERVISED_POSITIONS

    assert SUPERVISED_POSITIONS in inspect.signature(make_model("nanogpt").forward).parameters


def test_packed_rows_of_any_length_share_one_compiled_graph():
    """Under `--torch_compile` the run asks for dynamic shapes: rows of new lengths and supervision reuse the graph."""
    model = make_model("llama_gqa").train()
    model.supervised_logits_only = True
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=True)
    torch.manual_seed(4)
    for lengths in ([5, 9, 3], [7, 4], [12, 2, 6, 3]):
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        input_ids = torch.randint(3, 97, position_ids.shape)
        labels = input_ids.masked_fill(torch.rand(position_ids.shape) < 0.4, -100)
        positions = heads_hfsft_gpt.supervised_positions(heads_hfsft_gpt.next_token_labels(labels))
        batch = {"position_ids": position_ids, "labels": labels, "supervised_positions": positions}
        compiled(input_ids, **batch, num_items_in_batch=torch.tensor(positions.numel())).loss.backward()
    assert len(graphs) == 1


@pytest.mark.parametrize("name", CONFIGS)
def test_supervised_positions_given_or_found_give_the_same_loss_and_gradients(name):
    """The positions a batch carries are the ones the head would find itself; without them it still works."""
    model = make_model(name).train()
    model.supervised_logits_only = True
    input_ids, attention_mask, labels = right_padded_batch()
    positions = heads_hfsft_gpt.supervised_positions(heads_hfsft_gpt.next_token_labels(labels))
    assert positions.tolist() == (labels[:, 1:] != -100).nonzero().mul(torch.tensor([12, 1])).sum(-1).tolist()
    found = model(input_ids, attention_mask=attention_mask, labels=labels)
    found.loss.backward()
    found_grads = gradients(model)
    given = model(input_ids, attention_mask=attention_mask, labels=labels, supervised_positions=positions)
    given.loss.backward()
    torch.testing.assert_close(given.loss, found.loss, atol=0, rtol=0)
    torch.testing.assert_close(given.logits, found.logits, atol=0, rtol=0)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(found_grads[name], grad, atol=0, rtol=0, msg=name)
    kept = model(input_ids, attention_mask=attention_mask, labels=labels, supervised_positions=positions[:1],
                 logits_to_keep=6)  # fmt: skip
    assert kept.logits.shape[0] == (labels[:, 7:] != -100).sum()  # positions of the whole row: ignored


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_supervised_only_logits_give_the_full_loss_and_gradients(name, chunked, monkeypatch):
    if chunked:  # 97-token vocabulary, 2 rows per chunk
        monkeypatch.setattr(heads_hfsft_gpt, "LOSS_CHUNK_ELEMENTS", 2 * 97)
    model = make_model(name).train()
    model.supervised_logits_only = True
    input_ids, attention_mask, labels = right_padded_batch()
    num_items = torch.tensor(int((labels[:, 1:] != -100).sum()) + 5)  # as if other micro-batches had 5 more
    out = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=num_items)
    out.loss.backward()
    supervised_grads = gradients(model)
    model.supervised_logits_only = False
    full = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=num_items)
    full.loss.backward()
    assert full.logits.shape == (3, 12, 97)
    if chunked:
        assert out.logits is None
    else:
        assert out.logits.shape == ((labels[:, 1:] != -100).sum(), 97)
    torch.testing.assert_close(out.loss, full.loss)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(supervised_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_full_logits_unless_the_memory_saving_mode_is_asked_for():
    model = make_model("nanogpt").train()
    input_ids, attention_mask, labels = right_padded_batch()
    out = model(input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=torch.tensor(10))
    assert out.logits.shape == (3, 12, 97)  # Trainer's training step included
    model.eval()
    assert model(input_ids, attention_mask=attention_mask, labels=labels).logits.shape == (3, 12, 97)


def test_the_switch_is_not_saved_and_old_configs_load(tmp_path):
    model = make_model("nanogpt")
    model.supervised_logits_only = True
    model.save_pretrained(tmp_path)
    assert "supervised" not in (tmp_path / "config.json").read_text()
    assert HfSftGPTForCausalLM.from_pretrained(tmp_path).supervised_logits_only is False
    old = HfSftGPTConfig(supervised_logits_in_training=False)  # folders saved by earlier versions carry the key
    assert not hasattr(old, "supervised_logits_in_training")


def _run_script(*argv: str) -> str:
    if not (SHARED / "data" / "dolly" / "dolly_sample.jsonl").is_file():
        pytest.skip(f"needs the shared Dolly sample under {SHARED}")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_loss_memory_benchmark_tiny():
    out = _run_script("scripts/benchmark_loss_memory.py", "--tiny")
    assert "losses equal: True" in out
    assert out.strip().splitlines()[-1].startswith("loss_path_ratio=")


@pytest.mark.slow
def test_throughput_benchmark_tiny(tmp_path):
    out = _run_script("scripts/benchmark_throughput.py", "--tiny", "--work_dir", str(tmp_path))
    last = out.strip().splitlines()[-1]
    assert last.startswith("ratio_vs_loop=") and " ratio_vs_trl=" in last and " mfu=" in last
    assert " bf16_of_peak=" in last and " mfu_bf16=" in last
    assert " compile_vs_eager=" in last and " bf16_loss_gap=" in last
    assert "nan" not in last
    assert "micro-batch x accumulation 2x8" in out  # read back from the run itself
    assert "d: " in out and " (1 graphs compiled in " in out  # one graph for every row length, no recompilation
    for variant in ("float32 eager", "float32 compiled", "bfloat16 eager"):
        assert variant in out
