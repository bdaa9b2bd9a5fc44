#!/usr/bin/env bash
# The model files against the oldest supported transformers 5.x release and the installed (newest) one.
#
#   bash scripts/check_transformers_versions.sh            # 5.4.0 (oldest supported) and the installed release
#   bash scripts/check_transformers_versions.sh 5.10.4     # any other releases, one venv each
#
# Each release gets a virtual environment under ${VENV_ROOT:-/tmp} made with --system-site-packages (it reuses the
# installed torch, datasets, trl, ...) with only transformers replaced, and runs the model tests there. Needs PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
TESTS=(tests/test_modeling.py tests/test_modeling_rope.py tests/test_modeling_heads.py tests/test_modeling_perf.py
       tests/test_modeling_tp.py tests/test_convert.py tests/test_export.py)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(5.4.0 installed)
status=0
for version in "${versions[@]}"; do
  python=python3
  if [ "$version" != installed ]; then
    venv="${VENV_ROOT:-/tmp}/hf_sft_transformers_$version"
    [ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install -q "transformers==$version"
    python="$venv/bin/python"
  fi
  echo "== transformers $("$python" -c 'import transformers; print(transformers.__version__)')"
  "$python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" -k "not benchmark" || status=1
done
exit $status
