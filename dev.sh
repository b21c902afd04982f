#!/usr/bin/env bash
# Developer entry point. Each command sets up its own virtualenv (.venv) first, then runs.
#   bash dev.sh demo   # tiny default model -> images with and without a LoRA, in demo_out/
#   bash dev.sh test   # ruff + the test suite (CPU, tiny models)
#   bash dev.sh setup  # only the set-up
#   bash dev.sh py ... # run python inside the venv
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LORA_EXT_VENV:-.venv}"
PY="$VENV/bin/python"
# torch: on machines with a local CPU wheel `torch==2.13.0` is what pip finds; elsewhere set LORA_EXT_TORCH
# (e.g. "torch --index-url https://download.pytorch.org/whl/cpu") or install torch into the venv yourself first.
TORCH_SPEC="${LORA_EXT_TORCH:-torch==2.13.0}"

setup() {
    if [ ! -x "$PY" ]; then
        echo "[dev] creating virtualenv $VENV"
        python3 -m venv "$VENV"
        "$PY" -m pip install -q --upgrade pip
    fi
    local stamp="$VENV/.lora_ext_setup" want
    want="$(cat pyproject.toml dev.sh | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[dev] installing $TORCH_SPEC"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q $TORCH_SPEC
    fi
    echo "[dev] installing lora_ext with test extras"
    "$PY" -m pip install -q -e ".[test]"
    # Oracles that must not pull their own torch/transformers pins: installed without dependencies.
    # `ldm` (original SD classes) and open_clip (OpenCLIP text tower names); lycoris-lora (LyCORIS math).
    "$PY" -m pip install -q omegaconf einops toml ftfy
    "$PY" -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5" "open-clip-torch==3.3.0" "lycoris-lora==4.1.3"
    echo "$want" > "$stamp"
}

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1

cmd="${1:-test}"; shift || true
case "$cmd" in
    setup) setup ;;
    test)
        setup
        "$PY" -m ruff check lora_ext tests scripts bench tools install.py
        "$PY" -m pytest -q "$@"
        ;;
    demo)
        setup
        "$PY" -m lora_ext demo --out "${DEMO_OUT:-demo_out}" "$@"
        ;;
    py) setup; "$PY" "$@" ;;
    *) echo "usage: bash dev.sh demo|test|setup|py ..." >&2; exit 2 ;;
esac
