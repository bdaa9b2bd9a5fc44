"""`transformers serve` answers /v1/chat/completions for a trained folder's stock export as `hf-sft generate` does.

transformers' server finds a model's class as `getattr(transformers, config.architectures[0])`, so it serves stock
architectures only: the trained folder is served through `hf-sft export --to gpt2|llama`.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import openai
import pytest
from helpers.ports import free_port

from hf_sft.cli import main
from hf_sft.generate import generate_response, load_for_generation

pytestmark = pytest.mark.slow
INSTRUCTION = "What is the capital of Norway?"
STARTUP_S = 180


@contextlib.contextmanager
def served(folder, log_path):
    """`transformers serve FOLDER` on a free 127.0.0.1 port; yields the base URL; stopped (and reaped) on exit."""
    port = free_port()
    command = [shutil.which("transformers"), "serve", str(folder), "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            assert time.monotonic() < deadline, f"no answer within {STARTUP_S} s: {log_path.read_text()[-3000:]}"
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


@pytest.mark.parametrize(("family", "target"), [("nanogpt", "gpt2"), ("llama", "llama")])
def test_served_stock_export_answers_as_hf_sft_generate(gguf_folders, tmp_path, family, target):
    trained = gguf_folders[family, "trained"]
    stock = tmp_path / target
    assert main(["export", str(trained), "--to", target, "--out", str(stock)]) == 0
    model, tokenizer = load_for_generation(trained, device="cpu")
    expected = generate_response(model, tokenizer, INSTRUCTION, max_new_tokens=24)
    with served(stock, tmp_path / "server.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        reply = client.chat.completions.create(
            model=str(stock), messages=[{"role": "user", "content": INSTRUCTION}], temperature=0, max_tokens=24
        )
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.prompt_tokens == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": INSTRUCTION}], add_generation_prompt=True, tokenize=True, return_dict=False
    ))  # fmt: skip
