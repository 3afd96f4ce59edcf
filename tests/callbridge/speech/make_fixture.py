"""Make the caller-speech fixture: three spoken sentences through the phone path (8 kHz G.711 mu-law).

Run from the repository root (needs espeak-ng: ``apt-get install -y espeak-ng``):

    PYTHONPATH=. python tests/callbridge/speech/make_fixture.py

Writes ``data/phone_speech.ulaw`` (raw mu-law, 8 kHz mono: 0.5 s of line silence, then each
sentence followed by 1.2 s of silence, the last by 1.0 s) and ``data/phone_speech.json`` (the
sentences and where they are). espeak-ng's output differs a little between versions, so the
committed files are the reference; tests never run this script.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from callbridge.audio import LINE_RATE, pcm16_to_ulaw

HERE = Path(__file__).resolve().parent / "data"
SENTENCES = (
    "Hello, this is a test of the phone bridge.",
    "Please call me back tomorrow at 9 o'clock.",
    "My order number is 4 5 6.",
)
GAPS_S = (0.5, 1.2, 1.2, 1.0)  # before, between, after


def speak(text: str) -> np.ndarray:
    """espeak-ng's voice for ``text`` as 8 kHz float32 (it speaks at 22.05 kHz)."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", text],
                         check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, rate, LINE_RATE, quality="HQ")


def main() -> None:
    parts: list[np.ndarray] = [np.zeros(round(GAPS_S[0] * LINE_RATE), dtype=np.float32)]
    spans = []
    for text, gap in zip(SENTENCES, GAPS_S[1:], strict=True):
        start = sum(p.size for p in parts)
        voice = speak(text)
        parts += [voice, np.zeros(round(gap * LINE_RATE), dtype=np.float32)]
        spans.append({"text": text, "start_ms": start * 1000 // LINE_RATE,
                      "end_ms": (start + voice.size) * 1000 // LINE_RATE})
    audio = np.concatenate(parts)
    pcm16 = np.rint(np.clip(audio * 0.7, -1, 1) * 32767).astype(np.int16)  # -3 dB of headroom
    HERE.mkdir(exist_ok=True)
    (HERE / "phone_speech.ulaw").write_bytes(pcm16_to_ulaw(pcm16))
    (HERE / "phone_speech.json").write_text(json.dumps(
        {"sample_rate": LINE_RATE, "encoding": "mulaw", "utterances": spans}, indent=2) + "\n")
    print(f"wrote {HERE / 'phone_speech.ulaw'} ({pcm16.size / LINE_RATE:.1f} s)")


if __name__ == "__main__":
    main()
