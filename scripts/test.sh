#!/usr/bin/env bash
# The test command: creates .venv on first use, installs everything the suite needs, runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k twilio).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh "voice,speech,test"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "==> ruff"
.venv/bin/ruff check dia2 callbridge tests bench
echo "==> pytest"
exec .venv/bin/python -m pytest -q "$@"
