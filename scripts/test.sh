#!/usr/bin/env bash
# The test command: creates .venv on first use, installs everything the suite needs, runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k twilio).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh "voice,speech,check,test"
# A real SIP client for the SIP integration tests (they skip without it).
if ! command -v baresip >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing baresip-core (SIP integration tests)"
        apt-get install -y --no-install-recommends baresip-core >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends baresip-core >/dev/null; }
    else
        echo "==> baresip not found and not root: the SIP integration tests will be skipped"
    fi
fi
# A real Redis server for the cluster tests (they skip without it).
if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing redis-server (cluster tests)"
        apt-get install -y --no-install-recommends redis-server >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends redis-server >/dev/null; }
    else
        echo "==> redis-server not found and not root: the cluster tests will be skipped"
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "==> ruff"
.venv/bin/ruff check dia2 callbridge tests bench
echo "==> pytest"
exec .venv/bin/python -m pytest -q "$@"
