"""The model behaves like an in-tree transformers causal LM, for both families (transformers' tester pattern)."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.dynamic_module_utils import get_relative_import_files

from hf_sft import AUTO_CLASSES, MODEL_CODE_FILES, HfSftGPTConfig, HfSftGPTForCausalLM, HfSftGPTModel, heads_hfsft_gpt
from hf_sft.modeling_hfsft_gpt import CACHE_FIELD

VOCAB = 97


def tiny_config(family: str, **overrides) -> HfSftGPTConfig:
    kwargs = dict(
        family=family,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        multiple_of=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return HfSftGPTConfig(**kwargs)


FAMILIES = {
    "nanogpt": {},
    "llama": {},
    "llama_gqa": {"num_key_value_heads": 2, "rope_theta": 500.0},
    "nanogpt_nobias": {"use_bias": False},
}


@pytest.fixture(params=list(FAMILIES))
def config(request) -> HfSftGPTConfig:
    family = request.param.split("_")[0]
    return tiny_config(family, **FAMILIES[request.param])


def make_model(config: HfSftGPTConfig, attn: str = "sdpa", seed: int = 0) -> HfSftGPTForCausalLM:
    torch.manual_seed(seed)
    model = HfSftGPTForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    with torch.no_grad():  # norms start at 1/0: perturb them so a wrong norm shows up in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_works_with_no_arguments_and_carries_special_ids():
    config = HfSftGPTConfig()
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.tie_word_embeddings and config.position_embedding_type == "learned"
    llama = HfSftGPTConfig(family="llama", hidden_size=64, multiple_of=32)
    assert not llama.tie_word_embeddings and llama.intermediate_size == 192 and llama.rope_theta == 10000.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"mlp_type": "x"}, "mlp_type"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config("llama", **overrides)


def test_loss_equals_hand_computed_shifted_cross_entropy(config):
    model = make_model(config)
    input_ids = ids()
    labels = input_ids.clone()
    labels[:, :5] = -100
    out = model(input_ids, labels=labels)
    shift_logits, shift_labels = out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    keep = shift_labels != -100
    expected = F.cross_entropy(shift_logits[keep], shift_labels[keep])
    torch.testing.assert_close(out.loss, expected)
    # num_items_in_batch turns the mean into sum / N: what makes accumulation equal one large batch.
    summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss
    torch.testing.assert_close(summed, F.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="sum") / 50)


@pytest.mark.parametrize("path", ["full logits", "supervised only", "supervised only, chunked"])
@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_causal_lm_loss_honors_shift_labels(family, path, monkeypatch):
    """transformers 5.24's common check: given `shift_labels`, the loss follows them and ignores `labels`.

    Context and sequence parallelism shift the labels over the whole sequence, then cut it into shards and pass each
    shard its `shift_labels`: a model that shifted `labels` again would train every shard on the wrong targets.
    """
    if path.endswith("chunked"):
        monkeypatch.setattr(heads_hfsft_gpt, "LOSS_CHUNK_ELEMENTS", 2 * VOCAB)  # 2 rows per chunk
    model = make_model(tiny_config(family))
    model.supervised_logits_only = path != "full logits"
    input_ids = ids()
    labels = input_ids.clone()
    labels[:, :3] = -100
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]  # what each position predicts
    loss = model(input_ids, labels=labels).loss
    given = model(input_ids, labels=labels, shift_labels=shift_labels)
    torch.testing.assert_close(given.loss, loss)
    assert (given.logits is None) == path.endswith("chunked")
    torch.testing.assert_close(model(input_ids, shift_labels=shift_labels).loss, loss)  # labels are not needed
    other_labels = (labels.clamp(min=0) + 1) % VOCAB  # only `labels` change (all of them): the loss stays
    torch.testing.assert_close(model(input_ids, labels=other_labels, shift_labels=shift_labels).loss, loss)
    moved = shift_labels.clone()  # `shift_labels` change: the loss moves
    moved[:, 4:8] = (moved[:, 4:8] + 1) % VOCAB
    assert not torch.allclose(model(input_ids, labels=labels, shift_labels=moved).loss, loss)
    last = shift_labels.clone()  # a shard's last position predicts the next shard's first token
    last[:, -1] = 5
    expected = F.cross_entropy(model(input_ids).logits.reshape(-1, VOCAB), last.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(input_ids, labels=labels, shift_labels=last).loss, expected)


def test_causality_future_tokens_do_not_change_past_logits(config):
    model = make_model(config)
    input_ids = ids()
    changed = input_ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 5) % VOCAB
    a, b = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_token_logits(config, side):
    model = make_model(config)
    short, long = ids(1, 7, seed=2), ids(1, 12, seed=3)
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([pad, short] if side == "left" else [short, pad], dim=1)
    mask = torch.cat(
        [torch.zeros_like(pad), torch.ones_like(short)]
        if side == "left"
        else [torch.ones_like(short), torch.zeros_like(pad)],
        1,
    )
    batch = torch.cat([padded, long])
    batch_mask = torch.cat([mask, torch.ones_like(long)])
    out = model(batch, attention_mask=batch_mask).logits
    real = out[0, 5:] if side == "left" else out[0, :7]
    torch.testing.assert_close(real, model(short).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(long).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_eager_and_sdpa_agree(config, dtype, padding):
    eager, sdpa = make_model(config, "eager").to(dtype), make_model(config, "sdpa").to(dtype)
    input_ids = ids()
    mask = None
    if padding:
        mask = torch.ones_like(input_ids)
        mask[0, :4] = 0 if padding == "left" else 1
        mask[0, -4:] = 0 if padding == "right" else 1
    a = eager(input_ids, attention_mask=mask).logits.float()
    b = sdpa(input_ids, attention_mask=mask).logits.float()
    real = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(a[real], b[real], atol=tol, rtol=tol)


def test_packed_position_ids_confine_attention_to_each_example(config):
    model = make_model(config)
    first, second = ids(1, 5, seed=4), ids(1, 7, seed=5)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    logits = model(packed, position_ids=position_ids).logits
    torch.testing.assert_close(logits[0, :5], model(first).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0, 5:], model(second).logits[0], atol=1e-5, rtol=1e-5)


def test_output_attentions_and_hidden_states(config):
    model = make_model(config)
    out = model(ids(), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == config.num_hidden_layers
    assert out.attentions[0].shape == (2, config.num_attention_heads, 12, 12)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, config.num_attention_heads, 12))
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_inputs_embeds_equal_input_ids(config):
    model = make_model(config)
    input_ids = ids()
    embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids).logits)


def test_logits_to_keep(config):
    model = make_model(config)
    input_ids = ids()
    full = model(input_ids).logits
    torch.testing.assert_close(model(input_ids, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(input_ids, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])


def test_gradient_checkpointing_gives_the_same_gradients(config):
    config.hidden_dropout = 0.0
    model = make_model(config).train()
    input_ids = ids()
    model(input_ids, labels=input_ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)


def test_dropout_is_active_only_in_training(config):
    config.hidden_dropout, config.attention_dropout = 0.3, 0.3
    model = make_model(config)
    input_ids = ids()
    torch.testing.assert_close(model(input_ids).logits, model(input_ids).logits)
    model.train()
    assert not torch.allclose(model(input_ids).logits, model(input_ids).logits)


def test_resize_token_embeddings(config):
    model = make_model(config)
    input_ids = ids()
    before = model(input_ids).logits
    model.resize_token_embeddings(VOCAB + 8)
    assert model.config.vocab_size == VOCAB + 8
    assert model.lm_head.weight.shape[0] == VOCAB + 8
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(model(input_ids).logits[..., :VOCAB], before)


def test_save_and_load_round_trip_is_exact(config, tmp_path):
    model = make_model(config)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    # The code files: the modeling file and every sibling it imports (what transformers follows), no other.
    assert {p.name for p in tmp_path.glob("*.py")} == set(MODEL_CODE_FILES)
    modeling_file = sys.modules[HfSftGPTForCausalLM.__module__].__file__
    assert {"modeling_hfsft_gpt.py", *(Path(f).name for f in get_relative_import_files(modeling_file))} == set(
        MODEL_CODE_FILES
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HfSftGPTForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.config.auto_map.keys() == {"AutoConfig", *(auto.__name__ for auto in AUTO_CLASSES)}
    base = HfSftGPTModel.from_pretrained(tmp_path)
    assert torch.equal(base.embed_tokens.weight, model.model.embed_tokens.weight)


def test_fresh_init_is_deterministic_and_scaled(config):
    torch.manual_seed(0)
    a = HfSftGPTForCausalLM(config)
    torch.manual_seed(0)
    b = HfSftGPTForCausalLM(config)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    o_proj = a.model.layers[0].self_attn.o_proj.weight
    q_proj = a.model.layers[0].self_attn.q_proj.weight
    assert o_proj.std() < 0.75 * q_proj.std()  # residual projections scaled by 1/sqrt(2 * n_layer)


# --- generation -------------------------------------------------------------------------------------------------


def generate(model, input_ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("pad_token_id", 0)
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_greedy_with_and_without_cache_agree(config):
    model = make_model(config)
    prompt = ids(2, 6)
    assert torch.equal(
        generate(model, prompt, do_sample=False), generate(model, prompt, do_sample=False, use_cache=False)
    )


def test_left_padded_batch_generation_matches_single_prompts(config):
    model = make_model(config)
    short, long = ids(1, 4, seed=7), ids(1, 7, seed=8)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.cat(
        [torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(short)], 1), torch.ones_like(long)]
    )
    out = model.generate(
        batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(out[0, 3:], generate(model, short, max_new_tokens=8, eos_token_id=None)[0])
    assert torch.equal(out[1], generate(model, long, max_new_tokens=8, eos_token_id=None)[0])


def test_sampling_is_reproducible_and_cache_independent(config):
    model = make_model(config)
    prompt = ids(2, 6)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        runs.append(generate(model, prompt, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, use_cache=use_cache))
    assert torch.equal(runs[0], runs[1])


def test_beam_search_runs_and_beats_greedy_score(config):
    model = make_model(config)
    prompt = ids(1, 6)
    kw = dict(max_new_tokens=6, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    beam = generate(model, prompt, num_beams=4, do_sample=False, **kw)
    greedy = generate(model, prompt, do_sample=False, **kw)

    def logprob(seq):
        logits = model(seq).logits[0, 5:-1].log_softmax(-1)
        return logits.gather(-1, seq[0, 6:, None]).sum()

    assert beam.sequences.shape == (1, 12)
    assert logprob(beam.sequences) >= logprob(greedy.sequences) - 1e-4


def test_assisted_and_prompt_lookup_decoding_equal_greedy(config):
    model = make_model(config)
    prompt = torch.cat([ids(1, 6), ids(1, 6)], 1)  # repeated n-grams give prompt lookup candidates
    # With the model's EOS (prompt lookup fails without one on transformers 5.4): equal outputs stop at the same step.
    greedy = generate(model, prompt, do_sample=False)
    assistant = make_model(config, seed=5)
    assert torch.equal(generate(model, prompt, do_sample=False, assistant_model=assistant), greedy)
    lookup = generate(model, prompt, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup[:, : greedy.shape[1]], greedy)  # 5.4's prompt lookup may add one token past the limit


def test_generation_continues_from_a_given_cache(config):
    model = make_model(config)
    prompt = ids(1, 6)
    full = generate(model, prompt, max_new_tokens=10, eos_token_id=None)
    cache = {CACHE_FIELD: DynamicCache(config=model.config)}  # the keyword this transformers release uses
    first = model.generate(prompt, max_new_tokens=4, pad_token_id=0, eos_token_id=None, **cache)
    resumed = model.generate(first, max_new_tokens=6, pad_token_id=0, eos_token_id=None, **cache)
    assert torch.equal(resumed, full)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_manual_cached_decoding_matches_full_forward(config, keyword):
    """Both names of the cache argument work: `cache` (transformers >= 5.24) and `past_key_values` (earlier 5.x)."""
    model = make_model(config)
    sequence = ids(2, 10)
    out = model(sequence[:, :6], use_cache=True)
    step = model(sequence[:, 6:], use_cache=True, **{keyword: getattr(out, CACHE_FIELD)})
    torch.testing.assert_close(step.logits, model(sequence).logits[:, 6:], atol=1e-5, rtol=1e-5)
    assert getattr(step, CACHE_FIELD).get_seq_length() == 10


def test_generation_config_saves_and_loads(config, tmp_path):
    model = make_model(config)
    model.generation_config.max_new_tokens = 33
    model.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.max_new_tokens) == (1, 2, 0, 33)


def test_copy_of_config_builds_an_identical_model(config):
    model = make_model(config)
    clone = HfSftGPTForCausalLM(copy.deepcopy(model.config))
    clone.load_state_dict(model.state_dict())
    clone.eval().set_attn_implementation("sdpa")
    torch.testing.assert_close(clone(ids()).logits, model(ids()).logits)


def test_past_key_values_keyword_is_deprecated_as_in_stock_models(config):
    model = make_model(config)
    sequence = ids(1, 8)
    cache = getattr(model(sequence[:, :5], use_cache=True), CACHE_FIELD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = model(sequence[:, 5:], past_key_values=cache, use_cache=True)
    deprecations = [w for w in caught if "past_key_values" in str(w.message)]
    # From transformers 5.24 the old name warns (FutureWarning, as stock Llama); before, it is the current name.
    assert len(deprecations) == (1 if CACHE_FIELD == "cache" else 0)
    assert all(issubclass(w.category, FutureWarning) for w in deprecations)
    torch.testing.assert_close(step.logits, model(sequence).logits[:, 5:], atol=1e-5, rtol=1e-5)


def test_each_returned_layer_output_is_that_layers_output(config):
    """Outputs are collected by hand (see docs/model.md): entry i is what layer i computed, attentions included."""
    model = make_model(config, attn="eager")
    seen = {}
    hooks = [
        layer.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    out = model(ids(), output_attentions=True, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(
        out.hidden_states[0],
        model.model.embed_tokens(ids())
        + (model.model.embed_positions(torch.arange(12))[None] if config.position_embedding_type == "learned" else 0),
    )
    for i in range(config.num_hidden_layers - 1):
        torch.testing.assert_close(out.hidden_states[i + 1], seen[i][0])
    torch.testing.assert_close(out.hidden_states[-1], model.model.norm(seen[config.num_hidden_layers - 1][0]))
    for i in range(config.num_hidden_layers):
        torch.testing.assert_close(out.attentions[i], seen[i][1])
