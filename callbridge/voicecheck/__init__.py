"""The voice check: speak test sentences in a voice and prove the words, the speaker and the audio.

- :mod:`.sentences`: the default telephone-like set, or a user's file;
- :mod:`.analysis`: figures and thresholds from audio + text (pure, no model);
- :mod:`.speaker`: speaker embeddings (resemblyzer, shipped weights, CPU);
- :mod:`.run`: the edge: the calls' TTS path, speech-to-text, embeddings;
- :mod:`.report`: report.json and a self-contained HTML page;
- :mod:`.cli`: ``callbridge voice check`` and the check at the end of ``voice build``.
"""

from .analysis import CheckResult, PromptInput, TurnFigures, TurnInput, analyse

__all__ = ["CheckResult", "PromptInput", "TurnFigures", "TurnInput", "analyse"]
