"""llama.cpp's own server on a GGUF file, in this process, from the prebuilt `xllamacpp` wheel (no compiler).

This is llama.cpp as llama-server users run it (Ollama and LM Studio embed the same library): the file is loaded as
`llama-server -m FILE` loads it and reached through the server's own routes: `/tokenize` (what the export's
tokenizer check compares), `/completion` (greedy tokens and, with `n_probs`, the log-probabilities of the whole
vocabulary at a position) and the chat completions of `Server.handle_chat_completions`, which apply the chat
template stored in the file.

The server listens on 127.0.0.1 on a port of its own; it stops when `close` drops it (xllamacpp's `Server` stops
its loop in its destructor).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

# What installs llama.cpp for hf_sft: the extra holds the prebuilt xllamacpp wheel.
INSTALL = "pip install 'hf-sft[llama-cpp]'"
# llama.cpp's KV cache types by name (its default is f16).
KV_CACHE_TYPES = ("f16", "f32")
# The server is on 127.0.0.1: a user's HTTP(S)_PROXY must not take the requests elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# llama-server's `--flash-attn` values. "auto" (its default) turns it on on CPU, where its kernel rounds through
# f16: about 3e-4 on these logits, against 1e-5 without it.
FLASH_ATTENTION = {"auto": "AUTO", "on": "ENABLED", "off": "DISABLED"}


def llama_cpp_version() -> str:
    """`"llama.cpp bNNNNN, xllamacpp V"`, or raise ImportError when xllamacpp is not installed."""
    import xllamacpp

    version = xllamacpp.__version__
    build = version.rsplit(".", 1)[-1]  # xllamacpp versions end with llama.cpp's build number
    return f"llama.cpp b{build}, xllamacpp {version}"


class LlamaServer:
    """llama-server on one GGUF file.

    Args:
        path: the GGUF file.
        n_ctx: the context length (tokens).
        kv_cache: the KV cache's type, one of `KV_CACHE_TYPES`.
        flash_attention: one of `FLASH_ATTENTION` ("auto", llama-server's default).
        threads: CPU threads for evaluation and for prompt batches.

    Raises:
        ImportError: xllamacpp is not installed.
        RuntimeError: llama.cpp cannot load the file.
    """

    def __init__(
        self,
        path: str | Path,
        n_ctx: int = 512,
        kv_cache: str = "f16",
        flash_attention: str = "auto",
        threads: int = 2,
    ) -> None:
        import xllamacpp

        if kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
        if flash_attention not in FLASH_ATTENTION:
            raise ValueError(f"flash_attention must be one of {', '.join(FLASH_ATTENTION)}, got {flash_attention!r}")
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1  # one slot: requests run one after the other on one KV cache
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        cache_type = getattr(xllamacpp.ggml_type, f"GGML_TYPE_{kv_cache.upper()}")
        params.cache_type_k = params.cache_type_v = cache_type
        attention = f"LLAMA_FLASH_ATTN_TYPE_{FLASH_ATTENTION[flash_attention]}"
        params.flash_attn_type = getattr(xllamacpp.llama_flash_attn_type, attention)
        params.warmup = False  # a warm-up run touches every weight: not needed to tokenize
        params.sampling.temp, params.sampling.top_k = 0.0, 1  # greedy unless a request says otherwise
        params.verbosity = -1  # llama.cpp's log lines (load, timings) stay out of the user's output
        try:
            self._server = xllamacpp.Server(params)
        except Exception as err:  # xllamacpp raises a plain RuntimeError/ValueError naming llama.cpp's failure
            raise RuntimeError(f"llama.cpp could not load {path}: {err}") from None
        self.address = self._server.listening_address

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server (idempotent)."""
        self._server = None

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` as JSON to one of llama-server's routes and return its JSON answer."""
        request = urllib.request.Request(
            self.address + route, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
        )
        with _DIRECT.open(request, timeout=600) as answer:
            return json.load(answer)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """llama.cpp's ids for `text`, special-token texts parsed as special tokens (as `llama_tokenize`)."""
        return self.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]

    def complete(self, prompt: list[int] | str, n_predict: int, **options: Any) -> dict[str, Any]:
        """llama-server's `/completion` (greedy by default): `tokens`, `content`, `completion_probabilities`, ...

        Args:
            prompt: token ids (used as they are: no BOS added) or a text (tokenized with BOS as the file says).
            n_predict: the most tokens to generate.
            options: other request fields (`n_probs`, `logit_bias`, `temperature`, ...).
        """
        body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "return_tokens": True}
        return self.post("/completion", {**body, "cache_prompt": True, **options})

    def logprobs(self, ids: list[int], vocab_size: int) -> list[list[float]]:
        """llama.cpp's log-probability of every token after each prefix of `ids`: `len(ids)` rows of `vocab_size`.

        llama-server reports no raw logits; `n_probs` set to the vocabulary size gives the log-softmax of them at
        the last prompt position, before any sampler (the logits up to a constant per position). Each prefix in
        turn runs on the server's cached KV. The server holds back a generated token that is not complete UTF-8
        text, with its probabilities: a plain letter is forced (`logit_bias` acts in the sampler, after the
        report). A token missing from the report is `nan`.
        """
        letter = self.tokenize("a", False)[0]
        rows = []
        for end in range(1, len(ids) + 1):
            answer = self.complete(ids[:end], 1, n_probs=vocab_size, logit_bias=[[letter, 1e9]])
            (step,) = answer["completion_probabilities"]
            row = [float("nan")] * vocab_size
            for entry in step["top_logprobs"]:
                row[entry["id"]] = entry["logprob"]
            rows.append(row)
        return rows

    def chat(self, messages: list[dict[str, str]], max_tokens: int, **options: Any) -> dict[str, Any]:
        """An OpenAI chat completion (greedy by default), formatted with the chat template stored in the file."""
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1, **options}
        return self._server.handle_chat_completions(body)
