"""GGUF weights run by llama.cpp's own server (xllamacpp) as by transformers: logits, greedy tokens, quantized files.

llama-server gives no raw logits: they are compared through the log-probabilities of the whole vocabulary that it
reports at every prompt position (`LlamaServer.logprobs`), against the log-softmax of ours: the logits up to a
constant per position.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers.gguf_folders import dolly
from transformers import AutoModelForCausalLM

from hf_sft import HfSftGPTConfig, HfSftGPTForCausalLM
from hf_sft.cli import main
from hf_sft.data import encode_prompt, format_of, install_chat_template
from hf_sft.export import load_hfsft_model
from hf_sft.export.gguf_file import LLAMA_CPP_END_TOKENS as END_TOKENS
from hf_sft.export.llama_server import LlamaServer
from hf_sft.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
TOKENIZER = Path(__file__).parent / "fixtures" / "tiny_bpe.json"
CASES = [(family, stage) for family in ("nanogpt", "llama") for stage in ("converted", "trained")]
TRAINED = [case for case in CASES if case[1] == "trained"]
NEW_TOKENS = 24
LOGITS_ATOL = 1e-3
# With an f32 KV cache llama.cpp computes what we do but for GELU, which its gpt2 graph takes as the tanh
# approximation through an f16 table (nanoGPT uses the exact one): measured 1.2e-4 (gpt2) and 1.1e-6 (llama).
F32_CACHE_ATOL = {"nanogpt": 1e-3, "llama": 1e-5}
TIE = 1e-4


def export(folder: Path, out: Path, *flags: str) -> Path:
    assert main(["export", str(folder), "--to", "gguf", "--out", str(out), *flags]) == 0
    return out


def llama(path: Path, n_ctx: int, kv_cache: str = "f16", flash_attention: str = "auto") -> LlamaServer:
    """llama-server on the file, by default as `llama-server -m FILE` runs it (f16 KV cache, flash attention auto)."""
    return LlamaServer(path, n_ctx=n_ctx, kv_cache=kv_cache, flash_attention=flash_attention)


def llama_logprobs(llm: LlamaServer, ids: list[int], vocab_size: int) -> torch.Tensor:
    """(len(ids), vocab) llama.cpp's log-probabilities after each prefix of `ids`."""
    return torch.tensor(llm.logprobs(ids, vocab_size))


def our_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def llama_greedy(llm: LlamaServer, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    """llama-server's greedy tokens after `ids`, up to `n` or an end-of-generation token (not included)."""
    return llm.complete(ids, n)["tokens"]


def assert_same_greedy(model, tokenizer, ids: list[int], ours: list[int], theirs: list[int]) -> None:
    """llama-server's greedy tokens are ours, up to where it stops: our end, or a token llama.cpp also ends at."""
    assert theirs == ours[: len(theirs)], greedy_report(model, ids, ours, theirs)
    if len(theirs) < len(ours):  # the server leaves out the end-of-generation token it stopped at
        ends = {tokenizer.eos_token_id} | {
            tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS if t in tokenizer.get_vocab()
        }
        assert ours[len(theirs)] in ends, greedy_report(model, ids, ours, theirs)


def training_prompts(folder: Path, shared: Path, n: int = 3) -> list[list[int]]:
    """The training-format prompts (BOS included) of the first Dolly records that leave room for the answer."""
    tokenizer = load_tokenizer(folder)
    template = format_of(tokenizer)
    prompts = []
    for line in map(json.loads, dolly(shared).read_text(encoding="utf-8").splitlines()):
        ids = encode_prompt(tokenizer, line["instruction"], line["context"], template=template)
        if len(ids) + NEW_TOKENS <= 128:
            prompts.append(ids)
        if len(prompts) == n:
            return prompts
    raise AssertionError("not enough short records")


def greedy_report(model, ids: list[int], ours: list[int], theirs: list[int]) -> str:
    """Where the two greedy sequences part, and whether our top two logits there were a near-tie."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    if at == len(ours) or at == len(theirs):
        return f"greedy tokens agree for {at} steps, then one side stops: ours {ours[at:]}, llama.cpp {theirs[at:]}"
    with torch.no_grad():
        logits = model(torch.tensor([ids + ours[:at]])).logits[0, -1]
    gap = (lambda top: float(top[0] - top[1]))(logits.topk(2).values)
    tie = "a near-tie" if gap < TIE else "not a tie"
    return f"greedy tokens part at step {at}: ours {ours[at]}, llama.cpp {theirs[at]} ({tie}: top-2 gap {gap:.2e})"


@pytest.fixture(scope="module")
def f16_files(gguf_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_f16")
    return {case: export(gguf_folders[case], root / f"{'-'.join(case)}.gguf", "--outtype", "f16") for case in TRAINED}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_f32_file_gives_our_logits_and_greedy_tokens(shared_dir, gguf_folders, gguf_files, case):
    folder = gguf_folders[case]
    model = load_hfsft_model(folder).float()
    tokenizer = load_tokenizer(folder)
    vocab, n_ctx = model.config.vocab_size, model.config.max_position_embeddings
    with llama(gguf_files[case], n_ctx) as llm:
        for ids in training_prompts(folder, shared_dir):
            torch.testing.assert_close(
                llama_logprobs(llm, ids, vocab), our_logprobs(model, ids), atol=LOGITS_ATOL, rtol=0
            )
            generated = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
            ours, theirs = generated[0, len(ids) :].tolist(), llama_greedy(llm, ids)
            assert len(ours) == NEW_TOKENS or ours[-1] == tokenizer.eos_token_id
            assert_same_greedy(model, tokenizer, ids, ours, theirs)
    # Without flash attention (which rounds through f16 on CPU) and with an f32 cache, llama.cpp computes ours.
    with llama(gguf_files[case], n_ctx, kv_cache="f32", flash_attention="off") as llm:
        for ids in training_prompts(folder, shared_dir):
            torch.testing.assert_close(
                llama_logprobs(llm, ids, vocab), our_logprobs(model, ids), atol=F32_CACHE_ATOL[case[0]], rtol=0
            )


@pytest.mark.parametrize("case", TRAINED, ids=lambda c: c[0])
def test_f16_file_gives_the_f32_files_greedy_tokens(shared_dir, gguf_folders, gguf_files, f16_files, case):
    folder = gguf_folders[case]
    n_ctx = load_hfsft_model(folder).config.max_position_embeddings
    prompts = training_prompts(folder, shared_dir)
    with llama(gguf_files[case], n_ctx) as llm:
        full = [llama_greedy(llm, ids) for ids in prompts]
    with llama(f16_files[case], n_ctx) as llm:
        assert [llama_greedy(llm, ids) for ids in prompts] == full


# Largest logit error measured on these models (near-uniform: logit std 0.16-0.58): q8_0 2.9e-2 (bf16 8.5e-3:
# scripts/gguf_agreement.py).
ROUNDING = {"q8_0": 6e-2}


@pytest.mark.parametrize("outtype", list(ROUNDING))
@pytest.mark.parametrize("case", TRAINED, ids=lambda c: c[0])
def test_rounded_files_leave_our_greedy_tokens_only_at_near_ties(shared_dir, gguf_folders, case, outtype, tmp_path):
    """q8_0 moves logits by its rounding: greedy choices may flip where two logits are closer than that."""
    folder = gguf_folders[case]
    model = load_hfsft_model(folder).float()
    path = export(folder, tmp_path / f"model-{outtype}.gguf", "--outtype", outtype)
    vocab = model.config.vocab_size
    with llama(path, model.config.max_position_embeddings) as llm:
        for ids in training_prompts(folder, shared_dir):
            torch.testing.assert_close(
                llama_logprobs(llm, ids, vocab), our_logprobs(model, ids), atol=ROUNDING[outtype], rtol=0
            )
            ours = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids) :]
            theirs = llama_greedy(llm, ids)
            if theirs != ours.tolist()[: len(theirs)]:
                at = next(i for i, (a, b) in enumerate(zip(ours.tolist(), theirs, strict=False)) if a != b)
                with torch.no_grad():
                    top = model(torch.tensor([ids + ours[:at].tolist()])).logits[0, -1].topk(2).values
                assert top[0] - top[1] < ROUNDING[outtype], greedy_report(model, ids, ours.tolist(), theirs)


@pytest.mark.parametrize("case", TRAINED, ids=lambda c: c[0])
def test_transformers_reads_the_f32_file_back(gguf_folders, gguf_files, case):
    folder, path = gguf_folders[case], gguf_files[case]
    ours = load_hfsft_model(folder).float()
    # transformers 5.24's GGUF reader maps gpt2's context_length to `n_ctx`, which GPT2Config ignores, and assumes
    # GPT-2's tanh GELU; nanoGPT-style models use exact GELU and their own length.
    fixes = {"n_positions": ours.config.max_position_embeddings, "activation_function": "gelu"}
    back = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, **(fixes if case[0] == "nanogpt" else {})
    ).eval()
    assert type(back).__name__ == {"nanogpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[case[0]]
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)


def random_llama(folder: Path, **fields) -> HfSftGPTForCausalLM:
    """A small random LLaMA-style model (biases and norms perturbed) with the tiny tokenizer, saved in `folder`."""
    tokenizer = load_tokenizer(TOKENIZER)
    ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    config = HfSftGPTConfig(
        family="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        multiple_of=16, max_position_embeddings=256, **ids | fields,
    )  # fmt: skip
    model = HfSftGPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    install_chat_template(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


VARIANTS = {
    "gqa_rope_theta": {"num_key_value_heads": 2, "rope_theta": 500.0},
    "biases_tied_head": {"use_bias": True, "tie_word_embeddings": True},
    "linear_rope": {"rope_parameters": {"rope_type": "linear", "factor": 4.0}},
    "llama3_rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    },  # fmt: skip
    "yarn_rope": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llama_variants_run_in_llama_cpp_with_our_logits(tmp_path, variant):
    """Grouped-query heads, biases, a tied head and every static rotary scaling, over 200 positions."""
    model = random_llama(tmp_path / "model", **VARIANTS[variant])
    path = export(tmp_path / "model", tmp_path / "model.gguf")
    ids = torch.randint(4, 400, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    with llama(path, 256) as llm:
        torch.testing.assert_close(llama_logprobs(llm, ids, 400), our_logprobs(model, ids), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"family": "llama", "position_embedding_type": "learned"}, "learned absolute positions"),
        ({"family": "nanogpt", "norm_type": "rmsnorm"}, "RMSNorm"),
        ({"family": "llama", "mlp_type": "gelu"}, "a GELU MLP"),
        ({"family": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ],
)
def test_variants_llama_cpp_cannot_run_are_refused_naming_them(tmp_path, capsys, fields, named):
    tokenizer = load_tokenizer(TOKENIZER)
    config = HfSftGPTConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, **fields)
    HfSftGPTForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    code = main(["export", str(tmp_path / "model"), "--to", "gguf", "--out", str(tmp_path / "model.gguf")])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after save_pretrained's progress bar
    assert code == 2 and named in err and err.startswith("error: cannot export"), err
    assert not (tmp_path / "model.gguf").exists() and not (tmp_path / "model.Modelfile").exists()
