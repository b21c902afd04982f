#!/usr/bin/env bash
# Developer entry point. Each command sets up its own virtualenv (.venv) first, then runs.
#   bash dev.sh demo   # the shapes model learns a heart: a LoRA, images with and without it, in demo_out/
#   bash dev.sh test   # ruff + the test suite (CPU, tiny models)
#   bash dev.sh setup  # only the set-up
#   bash dev.sh test-webui-stack  # the test suite on A1111 v1.10's package versions, in .venv-webui (no ruff)
#   bash dev.sh test-forge-stack  # the test suite on Forge's package versions (gradio 4.40, ...), in .venv-forge
#   bash dev.sh ui     # the app (train, generate, library) on demo_out/ (the demo runs first if needed)
#   bash dev.sh chromium  # only the system browser for the browser tests (Debian's chromium, via apt-get)
#   bash dev.sh py ... # run python inside the venv
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LORA_EXT_VENV:-.venv}"
PY="$VENV/bin/python"
# torch: on machines with a local CPU wheel `torch==2.13.0` is what pip finds; elsewhere set LORA_EXT_TORCH
# (e.g. "torch --index-url https://download.pytorch.org/whl/cpu") or install torch into the venv yourself first.
TORCH_SPEC="${LORA_EXT_TORCH:-torch==2.13.0}"
# A1111 v1.10's environment: its pins (requirements_versions.txt; torch excepted, TORCH_SPEC is used), the
# huggingface_hub pip gives transformers 4.30.2 there (the newest < 1.0), and the newest diffusers / peft that work
# beside them: diffusers 0.27-0.28 import hub's cached_download (gone from hub 0.26), 0.31 needs
# transformers.integrations.deepspeed (4.33) in training_utils, 0.32+ transformers' Siglip (4.37); peft 0.14+ needs
# transformers' Cache (4.36). With transformers 4.30 diffusers' LoRA loader (PEFT backend) is off: those tests skip.
# The web stack (the `ui` extra) as a real A1111 v1.10.1 venv has it: gradio, fastapi, httpx, httpcore pinned by its
# requirements_versions.txt, the rest as pip resolved them there (gradio_client, starlette, pydantic 1, anyio 3, ...).
WEBUI_VENV="${LORA_EXT_WEBUI_VENV:-.venv-webui}"
WEBUI_PINS="transformers==4.30.2 tokenizers==0.13.3 accelerate==0.21.0 safetensors==0.4.2 numpy==1.26.2 Pillow==9.5.0
huggingface_hub==0.36.2 diffusers==0.30.3 peft==0.13.2
gradio==3.41.2 gradio_client==0.5.0 fastapi==0.94.0 starlette==0.26.1 pydantic==1.10.27 httpx==0.24.1 httpcore==0.15.0
h11==0.12.0 anyio==3.7.1 uvicorn==0.55.0 websockets==11.0.3"
# Forge (lllyasviel/stable-diffusion-webui-forge at dfdcbab, f2.0.1v1.10.1): its requirements_versions.txt (torch
# excepted) and what pip resolved beside them in a real Forge venv (gradio_client, starlette, tokenizers, ...).
FORGE_VENV="${LORA_EXT_FORGE_VENV:-.venv-forge}"
FORGE_PINS="transformers==4.46.1 tokenizers==0.20.3 accelerate==0.31.0 safetensors==0.4.2 numpy==1.26.2 Pillow==9.5.0
huggingface_hub==0.26.2 diffusers==0.31.0 peft==0.13.2
gradio==4.40.0 gradio_client==1.2.0 fastapi==0.104.1 starlette==0.27.0 pydantic==2.8.2 httpx==0.24.1 httpcore==0.15.0
h11==0.12.0 anyio==3.7.1 uvicorn==0.55.0 websockets==12.0"

# setup_venv DIR [PINS]: create DIR if needed and install lora_ext + test and ui extras + oracles, every install
# constrained to PINS (newline/space-separated requirements) when given; skipped while DIR's stamp matches this file
# and PINS.
setup_venv() {
    local venv="$1" pins="${2:-}" py="$1/bin/python" constraints=()
    if [ ! -x "$py" ]; then
        echo "[dev] creating virtualenv $venv"
        python3 -m venv "$venv"
        echo "*" > "$venv/.gitignore"
        "$py" -m pip install -q --upgrade pip
    fi
    local stamp="$venv/.lora_ext_setup" want
    want="$(printf '%s\n' "$pins" | cat pyproject.toml dev.sh - | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if ! "$py" -c "import torch" >/dev/null 2>&1; then
        echo "[dev] installing $TORCH_SPEC"
        # shellcheck disable=SC2086
        "$py" -m pip install -q $TORCH_SPEC
    fi
    if [ -n "$pins" ]; then
        printf '%s\n' $pins > "$venv/constraints.txt"
        constraints=(-c "$venv/constraints.txt")
        echo "[dev] installing the pinned stack into $venv:" $pins
        # shellcheck disable=SC2086
        "$py" -m pip install -q "${constraints[@]}" $pins
    fi
    echo "[dev] installing lora_ext with test and ui extras"
    "$py" -m pip install -q "${constraints[@]}" -e ".[test,ui]"
    # Oracles that must not pull their own torch/transformers pins: installed without dependencies.
    # `ldm` (original SD classes) and open_clip (OpenCLIP text tower names); lycoris-lora (LyCORIS math).
    "$py" -m pip install -q "${constraints[@]}" omegaconf einops toml ftfy
    "$py" -m pip install -q --no-deps "stable-diffusion-sdkit==2.1.5" "open-clip-torch==3.3.0" "lycoris-lora==4.1.3"
    echo "$want" > "$stamp"
}

# ensure_chromium: the browser tests drive Debian's `chromium` (Playwright's own browser download cannot work offline).
# Installs it with apt-get when missing (as root, or through passwordless sudo); otherwise stops with the command to
# run. LORA_EXT_CHROMIUM names another browser binary instead; the tests read the same variable.
ensure_chromium() {
    local exe="${LORA_EXT_CHROMIUM:-}" sudo=""
    if [ -n "$exe" ]; then
        [ -x "$exe" ] && return 0
        echo "[dev] ERROR: LORA_EXT_CHROMIUM=$exe is not an executable file" >&2
        return 1
    fi
    command -v chromium >/dev/null 2>&1 && return 0
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo -n"
        else
            echo "[dev] ERROR: the browser tests need Debian's chromium, which is not installed, and this user cannot" \
                 "install it (not root, no passwordless sudo). Run:" >&2
            echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium" >&2
            echo "  or point LORA_EXT_CHROMIUM at a Chromium/Chrome binary." >&2
            return 1
        fi
    fi
    local apt="${sudo:+$sudo }env DEBIAN_FRONTEND=noninteractive apt-get -q" shown="${sudo:+sudo }apt-get"
    echo "[dev] installing Debian's chromium for the browser tests: $shown install -y --no-install-recommends chromium"
    # shellcheck disable=SC2086
    if ! $apt install -y --no-install-recommends chromium >/dev/null; then
        echo "[dev] that failed; refreshing the package lists ($shown update) and trying again"
        # shellcheck disable=SC2086
        if ! { $apt update >/dev/null && $apt install -y --no-install-recommends chromium >/dev/null; }; then
            echo "[dev] ERROR: could not install chromium (see apt-get's messages above). Run:" >&2
            echo "    $shown update && $shown install -y --no-install-recommends chromium" >&2
            return 1
        fi
    fi
    echo "[dev] chromium: $(command -v chromium) ($(chromium --version 2>/dev/null || echo 'version unknown'))"
}

setup() { setup_venv "$VENV"; }

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# pytest-xdist: one worker per core (LORA_EXT_TEST_WORKERS=0 runs in one process, e.g. to debug); the real-WebUI tests
# share one worker (tests/webui/conftest.py), so only one WebUI server runs at a time.
PYTEST_PAR=(-n "${LORA_EXT_TEST_WORKERS:-auto}" --dist loadgroup)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1

cmd="${1:-test}"; shift || true
case "$cmd" in
    setup) setup; ensure_chromium ;;
    chromium) ensure_chromium ;;
    test)
        setup
        ensure_chromium
        "$PY" -m ruff check lora_ext tests scripts bench tools install.py
        "$PY" -m pytest -q "${PYTEST_PAR[@]}" "$@"
        ;;
    test-webui-stack)
        setup_venv "$WEBUI_VENV" "$WEBUI_PINS"
        ensure_chromium
        "$WEBUI_VENV/bin/python" -m pytest -q "${PYTEST_PAR[@]}" "$@"
        ;;
    test-forge-stack)
        setup_venv "$FORGE_VENV" "$FORGE_PINS"
        ensure_chromium
        "$FORGE_VENV/bin/python" -m pytest -q "${PYTEST_PAR[@]}" "$@"
        ;;
    demo)
        setup
        "$PY" -m lora_ext demo --out "${DEMO_OUT:-demo_out}" "$@"
        ;;
    ui)
        setup
        out="${DEMO_OUT:-demo_out}"
        if [ ! -f "$out/Lora/hearts.safetensors" ]; then "$PY" -m lora_ext demo --out "$out"; fi
        "$PY" -m lora_ext ui --models-dir "$out" --lora-dir "$out/Lora" --datasets-dir "$out" "$@"
        ;;
    py) setup; "$PY" "$@" ;;
    *) echo "usage: bash dev.sh demo|test|test-webui-stack|test-forge-stack|setup|py ..." >&2; exit 2 ;;
esac
