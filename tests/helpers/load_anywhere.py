"""Load a model (folder or Hub id) through the Auto classes and `pipeline`, the way a user of the Hub does.

    python tests/helpers/load_anywhere.py SOURCE remote      # hf_sft made unimportable, trust_remote_code=True
    python tests/helpers/load_anywhere.py SOURCE registered  # `import hf_sft` registers the classes, no flag

Prints one JSON line: the classes and their modules, the logits of fixed input ids, the chat-formatted prompt,
greedy tokens with and without the KV cache, the pipeline's answer to a chat message, and the hf_sft modules that got
imported. Needs only torch and transformers in `remote` mode.
"""

import json
import sys

INSTRUCTION = "Name three colours."


def load(source: str, trust_remote_code: bool) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, pipeline

    flag = {"trust_remote_code": True} if trust_remote_code else {}
    config = AutoConfig.from_pretrained(source, **flag)
    base = AutoModel.from_pretrained(source, **flag)
    model = AutoModelForCausalLM.from_pretrained(source, **flag)
    tokenizer = AutoTokenizer.from_pretrained(source)  # needs no code of ours: no flag, and no question
    input_ids = torch.arange(12).remainder(config.vocab_size).view(1, 12)
    with torch.no_grad():
        logits = model(input_ids).logits
        hidden = base(input_ids).last_hidden_state

    messages = [{"role": "user", "content": INSTRUCTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    greedy = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
    cached = model.generate(ids, use_cache=True, **greedy)[0, ids.shape[1] :].tolist()
    uncached = model.generate(ids, use_cache=False, **greedy)[0, ids.shape[1] :].tolist()
    generator = pipeline("text-generation", model=source, **flag)  # the pipeline loads model and tokenizer itself
    chat = generator(messages, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0]["generated_text"]
    return {
        "config": type(config).__name__,
        "base": type(base).__name__,
        "model": type(model).__name__,
        "model_module": type(model).__module__,
        "pipeline_model_module": type(generator.model).__module__,
        "tokenizer": type(tokenizer).__name__,
        "logits": logits[0].tolist(),
        "hidden_shape": list(hidden.shape),
        "prompt": prompt,
        "cached": cached,
        "uncached": uncached,
        "chat": chat,
    }


def main() -> None:
    source, mode = sys.argv[1], sys.argv[2]
    if mode == "remote":
        sys.modules["hf_sft"] = None  # an installed (or editable) hf_sft would otherwise be importable
        try:
            import hf_sft  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("hf_sft is still importable")
    else:
        import hf_sft  # noqa: F401
    report = load(source, trust_remote_code=mode == "remote")
    report["hf_sft_modules"] = sorted(n for n, m in sys.modules.items() if n.startswith("hf_sft") and m is not None)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
