"""Make the voice-check fixtures: two espeak-ng speakers, 24 kHz mono FLAC.

Run from the repository root (needs espeak-ng: ``apt-get install -y espeak-ng``):

    PYTHONPATH=. python tests/callbridge/voicecheck/make_speakers.py

Writes into ``data/``: ``a_prompt.flac`` (speaker A, ``en-us``: the voice prompt, with
``a_prompt_words.json``, word timings spread evenly: only the snapshot builder reads them),
``a_turn.flac`` (speaker A, another sentence: a turn of the same voice) and ``b_turn.flac``
(speaker B, ``en-us+f3``, espeak-ng's female variant: the same sentence in another voice), and
``speakers.json`` (the texts). resemblyzer scored A against A 0.85-0.93 and A against B
0.62-0.70 when this was written. espeak-ng's output differs a little between versions, so the
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

RATE = 24000
HERE = Path(__file__).resolve().parent / "data"
PROMPT = "Good morning, you are through to the front desk of the riverside hotel."
TURN = "Please call me back tomorrow at 9 o'clock about my order."
VOICES = {"a": "en-us", "b": "en-us+f3"}


def speak(voice: str, text: str) -> np.ndarray:
    """espeak-ng's ``voice`` saying ``text``, at 24 kHz float32, 0.2 s of silence either side, -3 dB peak."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "--stdout", text],
                         check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = soxr.resample(audio, rate, RATE, quality="HQ").astype(np.float32)
    audio = audio / max(float(np.max(np.abs(audio))), 1e-6) * 0.7
    pad = np.zeros(RATE // 5, dtype=np.float32)
    return np.concatenate([pad, audio, pad])


def even_words(text: str, seconds: float) -> list[dict[str, float | str]]:
    words = text.split()
    step = (seconds - 0.4) / len(words)
    return [{"word": w, "start": round(0.2 + i * step, 3), "end": round(0.2 + (i + 0.9) * step, 3)}
            for i, w in enumerate(words)]


def main() -> None:
    HERE.mkdir(exist_ok=True)
    prompt = speak(VOICES["a"], PROMPT)
    sf.write(str(HERE / "a_prompt.flac"), prompt, RATE, subtype="PCM_16")
    (HERE / "a_prompt_words.json").write_text(json.dumps(even_words(PROMPT, prompt.size / RATE), indent=1) + "\n")
    sf.write(str(HERE / "a_turn.flac"), speak(VOICES["a"], TURN), RATE, subtype="PCM_16")
    sf.write(str(HERE / "b_turn.flac"), speak(VOICES["b"], TURN), RATE, subtype="PCM_16")
    (HERE / "speakers.json").write_text(json.dumps({"prompt": PROMPT, "turn": TURN, "voices": VOICES}, indent=2)
                                        + "\n")
    print(f"wrote {HERE}/")


if __name__ == "__main__":
    main()
