"""The openai-whisper backend (PyTorch), a :class:`~callbridge.speech.transcriber.Transcriber`.

openai-whisper pads every input to 30 s, so its encoder costs the same for 1 s and 10 s of
speech; word timestamps are a second pass (DTW on CPU without triton). It never downloads
here: a model is a ``.pt`` file (``{"dims", "model_state_dict"}``, e.g. made from a
faster-whisper model by :mod:`callbridge.speech.ct2_convert`), a name whose file already
sits in the cache (``~/.cache/whisper/tiny.en.pt``), or a model object (tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .transcriber import DecodeOptions, Segment, Transcriber, TranscriberError, Word, finite_or

if TYPE_CHECKING:
    import whisper

__all__ = ["OpenAIWhisper", "whisper_cache_path"]


def whisper_cache_path(name: str) -> Path:
    """Where openai-whisper keeps model ``name`` (``$XDG_CACHE_HOME/whisper/<name>.pt``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "whisper" / f"{name}.pt"


class OpenAIWhisper(Transcriber):
    """openai-whisper on ``device`` ("cpu" or "cuda"); fp16 on CUDA, fp32 on CPU."""

    name = "openai-whisper"

    def __init__(
        self, model: str | Path | whisper.Whisper, *, device: str = "cpu", options: DecodeOptions | None = None
    ) -> None:
        super().__init__(options)
        try:
            import whisper
        except ImportError:
            raise TranscriberError(
                "openai-whisper is not installed: run scripts/setup_venv.sh with the voice extra"
            ) from None
        self._whisper = whisper
        self.device = device
        if isinstance(model, whisper.Whisper):
            self.model = model.to(device)
        else:
            self.model = self._load(self._resolve(model), device)
        self.model.eval()
        if self.options.language != "en" and not self.model.is_multilingual:
            raise TranscriberError(f"this model is English-only; language {self.options.language!r} needs a multilingual model")

    @staticmethod
    def _resolve(model: str | Path) -> Path:
        path = Path(model)
        if path.is_file():
            return path
        if path.suffix != ".pt" and "/" not in str(model):
            cached = whisper_cache_path(str(model))
            if cached.is_file():
                return cached
            raise TranscriberError(
                f"openai-whisper model {model!r} is not in the cache ({cached}); callbridge never downloads: "
                "put the .pt file there or set speech.model to a .pt path"
            )
        raise TranscriberError(f"openai-whisper model file not found: {path}")

    def _load(self, path: Path, device: str) -> whisper.Whisper:
        """What ``whisper.load_model`` does for a file, plus alignment heads stored in the file
        (:mod:`~callbridge.speech.ct2_convert` writes them; a name-less file gets none otherwise)."""
        import torch

        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            dims = self._whisper.model.ModelDimensions(**checkpoint["dims"])
            model = self._whisper.model.Whisper(dims)
            model.load_state_dict(checkpoint["model_state_dict"])
        except (OSError, KeyError, TypeError, RuntimeError) as exc:
            raise TranscriberError(f"{path} is not an openai-whisper checkpoint: {exc}") from None
        heads = checkpoint.get("alignment_heads")
        if isinstance(heads, str):
            model.set_alignment_heads(heads.encode("ascii"))
        return model.to(device)

    def decode(self, audio16k: np.ndarray) -> list[Segment]:
        opts = self.options
        decode_kw: dict[str, Any] = {"language": opts.language if self.model.is_multilingual else "en"}
        if opts.beam_size > 1:
            decode_kw["beam_size"] = opts.beam_size
        result = self._whisper.transcribe(
            self.model,
            audio16k.astype(np.float32, copy=False),
            verbose=None,  # no progress bar, no printing
            temperature=0.0,  # a float, not a tuple: one decode, no fallback loop
            condition_on_previous_text=False,
            # Whisper's own filters off: apply_guards applies ours to every backend alike.
            compression_ratio_threshold=None,
            logprob_threshold=None,
            no_speech_threshold=None,
            word_timestamps=opts.word_timestamps,
            fp16=self.device != "cpu",
            **decode_kw,
        )
        segments = []
        for seg in result["segments"]:
            words = tuple(
                Word(w["word"].strip(), float(w["start"]), float(w["end"]), finite_or(float(w["probability"]), 0.0))
                for w in seg.get("words", ())
            )
            segments.append(
                Segment(
                    text=seg["text"],
                    start=float(seg["start"]),
                    end=float(seg["end"]),
                    no_speech_prob=finite_or(float(seg["no_speech_prob"]), 1.0),
                    avg_logprob=finite_or(float(seg["avg_logprob"]), float("-inf")),
                    compression_ratio=finite_or(float(seg["compression_ratio"]), float("inf")),
                    words=words,
                )
            )
        return segments

    def close(self) -> None:
        del self.model
