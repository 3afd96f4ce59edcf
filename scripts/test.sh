#!/usr/bin/env bash
# The test command: creates .venv on first use, installs everything the suite needs, runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k twilio).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh "voice,speech,check,test"
# Real peers for the integration tests (they skip without them): a SIP client and a Redis server.
need() {  # need PROGRAM DEBIAN-PACKAGE WHAT-FOR
    command -v "$1" >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing $2 ($3)"
        apt-get install -y --no-install-recommends "$2" >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$2" >/dev/null; }
    else
        echo "==> $1 not found and not root: the $3 will be skipped"
    fi
}
need baresip baresip-core "SIP integration tests"
need redis-server redis-server "cluster tests"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "==> ruff"
.venv/bin/ruff check dia2 callbridge tests bench
echo "==> pytest"
exec .venv/bin/python -m pytest -q "$@"
