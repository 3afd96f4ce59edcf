"""The voice check's report: ``report.json``, a self-contained ``index.html``, and each turn's audio.

The page is for a person: the verdict and every failed threshold on top, the figures table,
then each turn's waveform (inline SVG drawn here, no plotting library) with the words the
speech-to-text heard at their times, a leak marked in red, and players for the 24 kHz and
8 kHz audio (the WAV files beside the page).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import LINE_RATE, TTS_RATE
from .analysis import CheckResult, TurnFigures

__all__ = ["REPORT_FILE", "PAGE_FILE", "report_json", "waveform_svg", "write_report"]

REPORT_FILE = "report.json"
PAGE_FILE = "index.html"
FORMAT = 1  # version of report.json

SVG_W, SVG_H, LABEL_H = 900, 120, 36


def _r(x: float | None, n: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, n)


def report_json(result: CheckResult, *, voice: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT,
        "voice": voice,
        "passed": result.passed,
        "failures": result.failures,
        "wer": _r(result.wer),
        "leak_turns": result.leak_turns,
        "similarity": (None if result.similarity is None
                       else [[round(x, 3) for x in row] for row in result.similarity]),
        "thresholds": asdict(result.thresholds),
        "turns": [f.to_json() for f in result.turns],
        **meta,
    }


def waveform_svg(pcm24k: np.ndarray, f: TurnFigures) -> str:
    """The turn's waveform (min/max per column) with each heard word at its time."""
    duration = max(pcm24k.size / TTS_RATE, 1e-3)
    cols = SVG_W
    mid = LABEL_H + SVG_H / 2
    parts: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H + LABEL_H}" '
                        f'viewBox="0 0 {SVG_W} {SVG_H + LABEL_H}" role="img" '
                        f'aria-label="waveform of turn {f.index}">']
    parts.append(f'<rect x="0" y="{LABEL_H}" width="{SVG_W}" height="{SVG_H}" fill="#f6f7f9"/>')
    if f.leak is not None:
        x0 = f.leak.at_s / duration * SVG_W
        x1 = f.leak.end_s / duration * SVG_W
        parts.append(f'<rect x="{x0:.1f}" y="{LABEL_H}" width="{max(x1 - x0, 2):.1f}" height="{SVG_H}" '
                     'fill="#f8d0d0"><title>prompt leak</title></rect>')
    if pcm24k.size:
        edges = np.linspace(0, pcm24k.size, cols + 1).astype(int)
        lo = [float(pcm24k[a:b].min()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])]
        hi = [float(pcm24k[a:b].max()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])]
        scale = SVG_H / 2 * 0.95
        top = " ".join(f"{x},{mid - max(-1.0, min(1.0, v)) * scale:.1f}" for x, v in enumerate(hi))
        bottom = " ".join(f"{x},{mid - max(-1.0, min(1.0, v)) * scale:.1f}" for x, v in reversed(list(enumerate(lo))))
        parts.append(f'<polygon points="{top} {bottom}" fill="#3b6ea8"/>')
    for i, w in enumerate(f.heard):
        x = w.start / duration * SVG_W
        y = 12 if i % 2 == 0 else 28
        parts.append(f'<line x1="{x:.1f}" y1="{y + 2}" x2="{x:.1f}" y2="{LABEL_H + SVG_H}" stroke="#999" '
                     'stroke-width="0.5"/>')
        parts.append(f'<text x="{x + 2:.1f}" y="{y}" font-size="11" font-family="sans-serif">'
                     f'{html.escape(w.word)}<title>{w.start:.2f}-{w.end:.2f} s, p={w.p:.2f}</title></text>')
    for s in range(int(duration) + 1):  # a tick per second
        x = s / duration * SVG_W
        parts.append(f'<line x1="{x:.1f}" y1="{LABEL_H + SVG_H - 6}" x2="{x:.1f}" y2="{LABEL_H + SVG_H}" '
                     'stroke="#333"/>')
    parts.append("</svg>")
    return "".join(parts)


def _cell(x: float | None, fmt: str, bad: bool = False) -> str:
    text = "–" if x is None or not math.isfinite(x) else format(x, fmt)
    return f'<td class="{"bad" if bad else ""}">{text}</td>'


def _table(result: CheckResult) -> str:
    t = result.thresholds
    rows = []
    for f in result.turns:
        rows.append(
            "<tr>"
            f"<td>{f.index}</td><td>{html.escape(f.text)}</td>"
            + _cell(f.wer, ".2f", f.wer > t.max_turn_wer)
            + f'<td class="{"bad" if f.leak else ""}">{"yes" if f.leak else "no"}</td>'
            + _cell(f.pre_speech_ms, ".0f", f.pre_speech_ms is not None and f.pre_speech_ms > t.max_pre_speech_ms)
            + _cell(f.prompt_similarity, ".2f",
                    f.prompt_similarity is not None and f.prompt_similarity < t.min_prompt_similarity)
            + _cell(f.turn_similarity, ".2f",
                    f.turn_similarity is not None and f.turn_similarity < t.min_turn_similarity)
            + _cell(f.level.rms_dbfs, ".1f", f.level.rms_dbfs < t.min_level_dbfs)
            + _cell(f.level.peak_dbfs, ".1f")
            + _cell(f.level.clipped_fraction * 100, ".3f", f.level.clipped_fraction > t.max_clipped_fraction)
            + _cell(f.words_per_s, ".1f", f.words_per_s is None
                    or not t.min_words_per_s <= f.words_per_s <= t.max_words_per_s)
            + _cell(f.ttfa_s, ".2f", t.max_ttfa_s > 0 and f.ttfa_s is not None and f.ttfa_s > t.max_ttfa_s)
            + f"<td>{f.parts}</td>"
            + "</tr>"
        )
    head = ("<tr><th>#</th><th>sentence</th><th>WER</th><th>leak</th><th>sound before<br>1st word (ms)</th>"
            "<th>similarity<br>to prompt</th><th>similarity<br>to turns</th><th>level<br>(dBFS)</th>"
            "<th>peak<br>(dBFS)</th><th>clipped<br>(%)</th><th>words/s</th><th>first audio<br>(s)</th>"
            "<th>parts</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1000px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
td:nth-child(2){text-align:left}.bad{background:#f8d0d0}.pass{color:#1a7f37}.fail{color:#b42318}
.turn{margin:1.2em 0}.heard{color:#555;font-size:13px}"""


def _page(result: CheckResult, voice: str, turns_pcm: Sequence[np.ndarray], meta: dict[str, Any]) -> str:
    t = result.thresholds
    verdict = ('<h2 class="pass">PASS</h2>' if result.passed else
               '<h2 class="fail">FAIL</h2><ul>' + "".join(f"<li>{html.escape(x)}</li>" for x in result.failures)
               + "</ul>")
    sim = "" if result.similarity is None else f"; speaker model {html.escape(str(meta.get('speaker_model')))}"
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>voice check: {html.escape(voice)}</title>"
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>Voice check: {html.escape(voice)}</h1>",
           f"<p>{len(result.turns)} turns; overall word error rate <b>{result.wer:.2f}</b> "
           f"(threshold {t.max_wer:g}); turns opening with the prompt's words: <b>{result.leak_turns}</b>; "
           f"speech-to-text {html.escape(str(meta.get('stt_model')))}{sim}; model "
           f"{html.escape(str(meta.get('model')))}.</p>",
           verdict, _table(result)]
    for f, pcm in zip(result.turns, turns_pcm):
        out.append(f'<div class="turn"><h3>Turn {f.index}: {html.escape(f.text)}</h3>'
                   f'<div class="heard">heard: {html.escape(f.heard_text) or "(nothing)"}</div>'
                   + waveform_svg(pcm, f)
                   + f'<div>24 kHz <audio controls preload="none" src="turn{f.index}_24k.wav"></audio> '
                   f'8 kHz (phone) <audio controls preload="none" src="turn{f.index}_8k.wav"></audio></div>'
                   + "".join(f'<div class="fail">{html.escape(x)}</div>' for x in f.failures) + "</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    folder: Path,
    result: CheckResult,
    *,
    voice: str,
    turns_pcm24k: Sequence[np.ndarray],
    turns_pcm8k: Sequence[np.ndarray],
    meta: dict[str, Any],
) -> Path:
    """Write ``report.json``, ``index.html`` and ``turnN_24k.wav`` / ``turnN_8k.wav``; returns the page."""
    from dia2 import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    for i, (pcm24k, pcm8k) in enumerate(zip(turns_pcm24k, turns_pcm8k), 1):
        write_wav(folder / f"turn{i}_24k.wav", pcm24k, TTS_RATE)
        write_wav(folder / f"turn{i}_8k.wav", pcm8k, LINE_RATE)
    data = report_json(result, voice=voice, meta=meta)
    (folder / REPORT_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    page = folder / PAGE_FILE
    page.write_text(_page(result, voice, turns_pcm24k, meta), encoding="utf-8")
    return page
