#!/usr/bin/env bash
# The demo: starts the service in-process and places one simulated Twilio call on loopback.
# With no model configured it uses a tiny RANDOM Dia2 checkpoint (it babbles; real weights
# speak): set CALLBRIDGE_MODEL=/path/to/Dia2-2B (and build a voice) for the real thing.
# Then the caller speaks and the example agent answers what the service transcribed, where a
# speech-to-text model is installed (README "Caller speech"); else one line says so.
# Writes out/heard.wav (what the caller heard) and out/report.json, and prints the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh "voice"
exec .venv/bin/callbridge demo --out out/heard.wav --report out/report.json "$@"
