"""[speech] settings: the shipped file is valid and complete, bad values name their key, the
factory maps settings to the objects they configure."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from callbridge.config import DEFAULT_CONFIG, Settings, SettingsError, SpeechSettings, load_settings
from callbridge.speech import EndpointerConfig
from callbridge.speech.factory import endpointer_config, guards, speech_worker


def test_the_shipped_config_documents_every_speech_key_with_its_default() -> None:
    shipped = tomllib.loads(DEFAULT_CONFIG.read_text())["speech"]
    assert shipped == {f.name: getattr(SpeechSettings(), f.name) for f in fields(SpeechSettings)}
    assert load_settings(DEFAULT_CONFIG, env={}).speech == SpeechSettings()


@pytest.mark.parametrize(("values", "key"), [
    ({"backend": "vosk"}, "speech.backend"),
    ({"enabled": True}, "speech.model"),
    ({"silence_ms": 50}, "speech.silence_ms"),
    ({"max_utterance_s": 45.0}, "speech.max_utterance_s"),
    ({"no_speech_threshold": 2.0}, "speech.no_speech_threshold"),
    ({"logprob_threshold": 0.5}, "speech.logprob_threshold"),
    ({"queue_size": 0}, "speech.queue_size"),
    ({"device": "tpu"}, "speech.device"),
])
def test_bad_values_name_the_key(values: dict[str, object], key: str) -> None:
    with pytest.raises(SettingsError, match=key):
        Settings().with_(speech=values)


def test_environment_enables_speech_with_a_model(tmp_path: Path) -> None:
    empty = tmp_path / "c.toml"
    empty.write_text("")
    s = load_settings(empty, env={"CALLBRIDGE_SPEECH": "1", "CALLBRIDGE_SPEECH_MODEL": "/models/tiny.en"})
    assert s.speech.enabled and s.speech.model == "/models/tiny.en"
    with pytest.raises(SettingsError, match="speech.model"):
        load_settings(empty, env={"CALLBRIDGE_SPEECH": "1"})


def test_factory_maps_settings() -> None:
    s = Settings().with_(speech={"silence_ms": 700, "max_utterance_s": 10.0, "pre_roll_ms": 200,
                                 "no_speech_threshold": 0.5, "logprob_threshold": -0.8, "queue_size": 3}).speech
    assert endpointer_config(s) == EndpointerConfig(silence_ms=700, max_utterance_s=10.0, pre_roll_ms=200)
    assert (guards(s).no_speech_threshold, guards(s).logprob_threshold) == (0.5, -0.8)
    worker = speech_worker(s)  # not started: nothing loads
    assert worker.guards == guards(s) and worker.transcriber is None


def test_a_missing_model_fails_on_the_worker_as_unavailable(tmp_path: Path) -> None:
    pytest.importorskip("faster_whisper")
    s = Settings().with_(speech={"enabled": True, "model": str(tmp_path / "nothing-here")}).speech
    worker = speech_worker(s)
    worker.start()
    try:
        assert worker.wait_ready(60) and not worker.available
        assert "nothing-here" in worker.load_error
    finally:
        worker.stop()
