"""Speaker embeddings for the voice check: resemblyzer's voice encoder, offline, on the CPU.

``resemblyzer`` 0.1.4 ships its weights in the wheel (``resemblyzer/pretrained.pt``, 17 MB: a
3-layer LSTM over 40-band mels at 16 kHz giving a 256-d, L2-normalised embedding), so nothing
is downloaded. Its wheel asks for ``webrtcvad``, which would build from source and overwrite
the ``webrtcvad`` module our ``webrtcvad-wheels`` already provides, and for the ``typing``
backport; so it is installed with ``--no-deps`` from ``requirements/voice-check-model.txt``
(pinned by hash) and its real needs (librosa, scipy) come with the ``check`` extra
(scripts/setup_venv.sh does both). CPU on purpose: an utterance embeds in tens of ms, and the
GPU belongs to Dia2.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np

__all__ = ["INSTALL_HINT", "ResemblyzerEncoder", "SpeakerEncoder", "SpeakerModelMissing", "load_speaker_encoder"]

INSTALL_HINT = ("pip install -e '.[check]' && pip install --no-deps --require-hashes -r "
                "requirements/voice-check-model.txt (or scripts/setup_venv.sh with the check extra)")


class SpeakerModelMissing(Exception):
    """The speaker-embedding model is not installed; the message says how to install it."""


class SpeakerEncoder(Protocol):
    name: str

    def embed(self, pcm: np.ndarray, sample_rate: int) -> np.ndarray:
        """Float mono ``[N]`` at ``sample_rate`` → a 1-d embedding (cosine compares two)."""
        ...


class ResemblyzerEncoder:
    """resemblyzer's ``VoiceEncoder``: its own preprocessing (resample to 16 kHz, level, long
    silences trimmed by its VAD), then the mean of its partial-utterance embeddings."""

    name = "resemblyzer-0.1.4"

    def __init__(self, module: Any) -> None:
        self._module = module
        self._encoder = module.VoiceEncoder(device="cpu", verbose=False)

    def embed(self, pcm: np.ndarray, sample_rate: int) -> np.ndarray:
        if pcm.size == 0 or float(np.max(np.abs(pcm))) < 1e-4:
            return np.zeros(256, dtype=np.float32)  # silence has no speaker (and its level is -inf)
        wav = self._module.preprocess_wav(np.asarray(pcm, dtype=np.float32), source_sr=sample_rate)
        if wav.size < sample_rate // 10:  # its VAD kept nothing: no voice to embed
            return np.zeros(256, dtype=np.float32)
        return np.asarray(self._encoder.embed_utterance(wav), dtype=np.float32)


def load_speaker_encoder() -> ResemblyzerEncoder:
    """The installed speaker model; :class:`SpeakerModelMissing` when it (or librosa) is not installed."""
    with warnings.catch_warnings():
        # resemblyzer imports scipy.ndimage.morphology, a namespace scipy deprecates.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import resemblyzer
        except ImportError as exc:
            missing = f" (missing module: {exc.name})" if exc.name and exc.name != "resemblyzer" else ""
            raise SpeakerModelMissing(f"the speaker model (resemblyzer) is not installed{missing}: "
                                      f"{INSTALL_HINT}") from None
    try:
        return ResemblyzerEncoder(resemblyzer)
    except Exception as exc:  # noqa: BLE001 - a broken install, reported as such
        raise SpeakerModelMissing(f"the speaker model (resemblyzer) did not load ({type(exc).__name__}: {exc}): "
                                  f"reinstall it: {INSTALL_HINT}") from None
