#!/usr/bin/env bash
# The demo: builds a tiny random Dia2 checkpoint (no real weights can be downloaded here)
# and speaks one line with it, writing out/demo.wav. Pass a model folder to use real weights:
#   scripts/demo.sh /path/to/Dia2-2B
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh "service,voice"
MODEL="${1:-out/tiny-model}"
if [ "$MODEL" = "out/tiny-model" ] && [ ! -f out/tiny-model/config.json ]; then
    echo "==> no model given: writing a tiny RANDOM checkpoint to out/tiny-model (it babbles; real weights speak)"
    .venv/bin/python -m dia2 random-checkpoint --out out/tiny-model --shape tiny
fi
exec .venv/bin/python -m dia2 generate --model "$MODEL" \
    --text "[S1] Hello, thanks for calling. How can I help you today?" --out out/demo.wav --seed 1
