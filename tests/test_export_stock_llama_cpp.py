"""Stock exports through llama.cpp's own `convert_hf_to_gguf.py`: it reads both as far as the tokenizer.

The converter is not in llama-cpp-python's wheel; it is in its sdist (llama.cpp's sources), which this test fetches
once with `pip download` into `~/.cache/hf_sft-tests` (the one test of the suite that reaches a package index). The
converter then stops at the tokenizer, as for every home-grown tokenizer: it knows tokenizers only by the hash of
published ones. `hf-sft export --to gguf` is the road for those.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import llama_cpp
import pytest

from hf_sft.cli import main

pytestmark = pytest.mark.slow
UNRECOGNISED = "NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"


@pytest.fixture(scope="module")
def converter() -> Path:
    """`convert_hf_to_gguf.py` of the installed llama-cpp-python's llama.cpp, unpacked from its sdist."""
    version = llama_cpp.__version__
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_sft-tests"
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache)]
        subprocess.run([*download, f"llama-cpp-python=={version}"], check=True, capture_output=True, timeout=600)
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as sdist:
            wanted = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [
                m for m in sdist.getmembers() if m.name.startswith(wanted) and _converter_part(m.name[len(wanted) :])
            ]
            sdist.extractall(cache, members=members, filter="data")
    return root / "convert_hf_to_gguf.py"


def _converter_part(name: str) -> bool:
    return name == "convert_hf_to_gguf.py" or name.startswith(("conversion/", "gguf-py/"))


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
