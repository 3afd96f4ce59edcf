"""callbridge.speech.transcriber guards, the WER normaliser, and the CTranslate2 → openai-whisper converter."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from callbridge.speech import DecodeOptions, Guards, Segment, Transcript, Word
from callbridge.speech.ct2_convert import convert_ct2_to_openai, read_ct2_model
from callbridge.speech.transcriber import DropReason, apply_guards
from callbridge.speech.wer import normalise, number_words, wer


def seg(text: str = " Hello there.", *, ns: float = 0.1, lp: float = -0.3, cr: float = 1.2,
        words: tuple[Word, ...] = ()) -> Segment:
    return Segment(text, 0.0, 1.0, no_speech_prob=ns, avg_logprob=lp, compression_ratio=cr, words=words)


# ------------------------------------------------------------------------------------ guards


def test_line_noise_dot_that_passes_whispers_own_rule_is_dropped() -> None:
    """Measured on tiny.en with -40 dBFS mu-law noise: "." with no_speech 0.95, avg_logprob -0.96.
    Whisper drops a segment only if BOTH thresholds fail, so it kept these; ours drops on either."""
    assert Guards().verdict(seg(" .", ns=0.95, lp=-0.96)) is DropReason.EMPTY
    assert Guards().verdict(seg(" Thank you.", ns=0.95, lp=-0.96)) is DropReason.NO_SPEECH


@pytest.mark.parametrize(("segment", "reason"), [
    (seg(ns=0.61), DropReason.NO_SPEECH),
    (seg(lp=-1.01), DropReason.LOW_LOGPROB),
    (seg(cr=2.5), DropReason.REPETITION),
    (seg(" ... !"), DropReason.EMPTY),
    (seg(ns=float("nan")), DropReason.NO_SPEECH),
    (seg(lp=float("-inf")), DropReason.LOW_LOGPROB),
    (seg(), None),
    (seg(ns=0.6, lp=-1.0, cr=2.4), None),  # the thresholds themselves pass
])
def test_each_guard(segment: Segment, reason: DropReason | None) -> None:
    assert Guards().verdict(segment) is reason


def test_apply_guards_keeps_passing_segments_and_reports_the_worst_figures() -> None:
    w1, w2 = Word("Hello", 0.0, 0.4, 0.9), Word("again", 1.2, 1.5, 0.8)
    out = apply_guards("u7", [seg(" Hello", ns=0.2, lp=-0.5, words=(w1,)), seg(" .", ns=0.9),
                              seg(" again.", ns=0.3, lp=-0.2, words=(w2,))], Guards(), stt_ms=12.5)
    assert isinstance(out, Transcript)
    assert out.text == "Hello again." and out.words == (w1, w2)
    assert (out.no_speech_prob, out.avg_logprob, out.dropped) == (0.3, -0.5, (DropReason.EMPTY,))
    js = out.to_json()
    assert js["utterance_id"] == "u7" and js["final"] is True and js["stt_ms"] == 12.5
    assert js["words"][1] == {"word": "again", "start": 1.2, "end": 1.5, "p": 0.8}


def test_apply_guards_with_nothing_left_says_why() -> None:
    assert apply_guards("u1", [seg(ns=0.99), seg(lp=-3.0)], Guards(), 1.0) == (
        DropReason.NO_SPEECH, DropReason.LOW_LOGPROB)
    assert apply_guards("u1", [], Guards(), 1.0) == (DropReason.EMPTY,)


@pytest.mark.parametrize("kwargs", [{"no_speech_threshold": 1.5}, {"logprob_threshold": 0.5},
                                    {"compression_ratio_threshold": 0.9}])
def test_bad_guards_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Guards(**kwargs)


# ------------------------------------------------------------------------------------ WER


def test_normalise_spells_numbers_and_drops_punctuation() -> None:
    assert normalise("Call me at 9 o'clock, OK?") == ["call", "me", "at", "nine", "o'clock", "ok"]
    assert normalise("4, 5, 6.") == normalise("four five six")
    assert normalise("It's 1,250 & 3.5%") == ["it's", "one", "thousand", "two", "hundred", "fifty", "and",
                                               "three", "point", "five", "percent"]
    assert normalise("'quoted' well-known") == ["quoted", "well", "known"]
    assert number_words(101) == ["one", "hundred", "one"] and number_words(40_000) == ["forty", "thousand"]


def test_wer_counts_substitutions_deletions_and_insertions() -> None:
    assert wer("please call me back", "Please, call me back!") == 0.0
    assert wer("please call me back", "please call me") == 0.25
    assert wer("please call me back", "please call mac back now") == 0.5
    assert wer("one two", "") == 1.0
    with pytest.raises(ValueError, match="no words"):
        wer("...", "anything")


# ------------------------------------------------------------------------------------ converter


def _write_ct2(path: Path, variables: dict[str, np.ndarray]) -> None:
    """A CTranslate2 model.bin in the layout ct2_convert documents (written here independently)."""

    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int32): 3, np.dtype(np.float16): 4}
    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        out += [string(name), struct.pack("<B", arr.ndim), *(struct.pack("<I", d) for d in arr.shape),
                struct.pack("<B", type_ids[arr.dtype]), struct.pack("<I", arr.nbytes), arr.tobytes()]
    out += [struct.pack("<I", 1), string("decoder/projection/weight"), string("decoder/embeddings/weight")]
    path.write_bytes(b"".join(out))


def _as_ct2(sd: dict[str, np.ndarray], n_layer: int, heads: int) -> dict[str, np.ndarray]:
    """openai-whisper names → CTranslate2 names, fusing q/k/v (key bias zero) as the CT2 converter does."""
    v: dict[str, np.ndarray] = {}

    def lin(src: str, dst: str) -> None:
        v[f"{dst}/weight"], v[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(src: str, dst: str) -> None:
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(prefix: str, parts: list[str], dst: str) -> None:
        v[f"{dst}/weight"] = np.concatenate([sd[f"{prefix}.{p}.weight"] for p in parts])
        v[f"{dst}/bias"] = np.concatenate([sd.get(f"{prefix}.{p}.bias", np.zeros_like(sd[f"{prefix}.{p}.weight"][:, 0]))
                                           for p in parts])

    for side in ("encoder", "decoder"):
        for i in range(n_layer):
            s, d = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            fused(f"{s}.attn", ["query", "key", "value"], f"{d}/self_attention/linear_0")
            lin(f"{s}.attn.out", f"{d}/self_attention/linear_1")
            norm(f"{s}.attn_ln", f"{d}/self_attention/layer_norm")
            lin(f"{s}.mlp.0", f"{d}/ffn/linear_0")
            lin(f"{s}.mlp.2", f"{d}/ffn/linear_1")
            norm(f"{s}.mlp_ln", f"{d}/ffn/layer_norm")
            if side == "decoder":
                lin(f"{s}.cross_attn.query", f"{d}/attention/linear_0")
                fused(f"{s}.cross_attn", ["key", "value"], f"{d}/attention/linear_1")
                lin(f"{s}.cross_attn.out", f"{d}/attention/linear_2")
                norm(f"{s}.cross_attn_ln", f"{d}/attention/layer_norm")
        v[f"{side}/num_heads"] = np.array(heads, dtype=np.int32)
    lin("encoder.conv1", "encoder/conv1")
    lin("encoder.conv2", "encoder/conv2")
    v["encoder/position_encodings/encodings"] = sd["encoder.positional_embedding"]
    norm("encoder.ln_post", "encoder/layer_norm")
    v["decoder/embeddings/weight"] = sd["decoder.token_embedding.weight"]
    v["decoder/position_encodings/encodings"] = sd["decoder.positional_embedding"]
    norm("decoder.ln", "decoder/layer_norm")
    v["decoder/scale_embeddings"] = np.array(0, dtype=np.int8)  # scalars the converter ignores
    return v


def _random_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter random and non-zero (biases and norms too, so a swapped mapping shows), fp16."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return {k: t.numpy().astype(np.float16) for k, t in model.state_dict().items()}


def test_converter_round_trips_a_random_whisper(tmp_path: Path) -> None:
    whisper = pytest.importorskip("whisper")
    dims = whisper.model.ModelDimensions(80, 1500, 64, 2, 2, 51864, 448, 64, 2, 2)
    sd = _random_state(whisper.model.Whisper(dims))
    (tmp_path / "ct2").mkdir()
    _write_ct2(tmp_path / "ct2" / "model.bin", _as_ct2(sd, 2, 2))
    (tmp_path / "ct2" / "config.json").write_text('{"alignment_heads": [[1, 0], [1, 1]]}')

    spec, variables = read_ct2_model(tmp_path / "ct2" / "model.bin")
    assert spec == "WhisperSpec" and variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    out_dims = convert_ct2_to_openai(tmp_path / "ct2", tmp_path / "model.pt")
    assert out_dims == vars(dims)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(ckpt["model_state_dict"]) == set(sd)
    for name, arr in sd.items():
        assert np.array_equal(ckpt["model_state_dict"][name].numpy(), arr), name
    rebuilt = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt["dims"]))
    rebuilt.set_alignment_heads(ckpt["alignment_heads"].encode("ascii"))
    assert rebuilt.alignment_heads.to_dense().nonzero().tolist() == [[1, 0], [1, 1]]


def test_converter_refuses_a_key_bias(tmp_path: Path) -> None:
    whisper = pytest.importorskip("whisper")
    sd = _random_state(whisper.model.Whisper(whisper.model.ModelDimensions(80, 1500, 64, 2, 1, 51864, 448, 64, 2, 1)))
    v = _as_ct2(sd, 1, 2)
    v["encoder/layer_0/self_attention/linear_0/bias"][64:128] = 1.0  # the key's slice
    (tmp_path / "ct2").mkdir()
    _write_ct2(tmp_path / "ct2" / "model.bin", v)
    with pytest.raises(ValueError, match="key has a non-zero bias"):
        convert_ct2_to_openai(tmp_path / "ct2", tmp_path / "model.pt")


# ------------------------------------------------------------------------------------ decode rules


class _Recorder:
    """Stands in for a backend's model/module: records the keyword arguments of the decode call."""

    def __init__(self, result: Any) -> None:
        self.kwargs: dict[str, Any] = {}
        self.result = result

    def transcribe(self, *args: Any, **kwargs: Any) -> Any:
        self.kwargs = kwargs
        return self.result


def test_faster_whisper_decodes_at_temperature_0_alone_with_its_own_filters_off() -> None:
    pytest.importorskip("faster_whisper")
    from callbridge.speech.faster_backend import FasterWhisper

    backend = FasterWhisper.__new__(FasterWhisper)  # no model load: the decode call is what is checked
    backend.options = DecodeOptions(beam_size=1, word_timestamps=True)
    seg = SimpleNamespace(text=" Hi.", start=0.0, end=0.5, no_speech_prob=0.1, avg_logprob=-0.2,
                          compression_ratio=1.0, words=[SimpleNamespace(word=" Hi.", start=0.0, end=0.4,
                                                                        probability=float("nan"))])
    backend.model = rec = _Recorder((iter([seg]), None))
    (out,) = backend.decode(np.zeros(16000, dtype=np.float32))
    assert out.words == (Word("Hi.", 0.0, 0.4, 0.0),)  # a NaN probability never reaches JSON
    kw = rec.kwargs
    assert kw["temperature"] == 0.0 and isinstance(kw["temperature"], float)  # no fallback list
    assert kw["condition_on_previous_text"] is False and kw["vad_filter"] is False
    assert kw["no_speech_threshold"] is None and kw["log_prob_threshold"] is None
    assert kw["compression_ratio_threshold"] is None and kw["language"] == "en" and kw["beam_size"] == 1


def test_openai_whisper_decodes_at_temperature_0_alone_with_its_own_filters_off() -> None:
    pytest.importorskip("whisper")
    from callbridge.speech.openai_backend import OpenAIWhisper

    backend = OpenAIWhisper.__new__(OpenAIWhisper)
    backend.options = DecodeOptions(word_timestamps=False)
    backend.device = "cpu"
    backend.model = SimpleNamespace(is_multilingual=False)
    result = {"segments": [{"text": " Hi.", "start": 0.0, "end": 0.5, "no_speech_prob": 0.1,
                            "avg_logprob": float("nan"), "compression_ratio": 1.0}]}
    rec = _Recorder(result)
    backend._whisper = SimpleNamespace(transcribe=lambda model, audio, **kw: rec.transcribe(**kw))
    (out,) = backend.decode(np.zeros(16000, dtype=np.float32))
    assert out.avg_logprob == float("-inf")  # NaN: dropped by the guards, never emitted
    kw = rec.kwargs
    assert kw["temperature"] == 0.0 and isinstance(kw["temperature"], float)
    assert kw["condition_on_previous_text"] is False and kw["fp16"] is False
    assert kw["no_speech_threshold"] is None and kw["logprob_threshold"] is None
    assert kw["compression_ratio_threshold"] is None and kw["language"] == "en" and "beam_size" not in kw
