"""config.json parsing: official keys, defaults, and errors that name the key."""

from __future__ import annotations

import copy
import json

import pytest

from dia2.config import load_config, parse_config
from dia2.errors import ConfigError
from dia2.random_checkpoint import shape_config


def minimal_config() -> dict:
    """Only the keys the official schema requires."""
    return {
        "data": {
            "channels": 34,
            "text_vocab_size": 49280,
            "audio_vocab_size": 2050,
            "action_vocab_size": 2,
            "text_pad_token_id": 3,
            "text_new_word_token_id": 2,
            "action_pad_token_id": 0,
            "action_new_word_token_id": 1,
            "delay_pattern": [16] + [18] * 31,
        },
        "model": {
            "decoder": {"n_layer": 2, "n_embd": 64, "n_hidden": 128, "gqa_query_heads": 4, "kv_heads": 2, "gqa_head_dim": 16},
            "depformer": {"n_layer": 1, "n_embd": 32, "n_hidden": 64, "gqa_query_heads": 2, "kv_heads": 2, "gqa_head_dim": 16},
        },
        "runtime": {},
    }


def test_defaults_follow_the_official_schema() -> None:
    cfg = parse_config(minimal_config())
    d, m = cfg.data, cfg.model
    assert d.text_zero_token_id == 7
    assert d.audio_pad_token_id == 2049 and d.audio_bos_token_id == 2048
    assert d.first_word_min_start == 0 and d.max_pad == 0 and d.second_stream_ahead == 0
    assert m.normalization_layer_epsilon == 1e-5  # the loader default, NOT the released 1e-6
    assert m.depformer.text_embedding is True  # loader default; released checkpoints say false
    assert m.depformer.apply_rope is True
    assert m.decoder.mlp_activations == ("silu", "linear")
    assert m.rope_min_timescale == 1 and m.rope_max_timescale == 10000
    assert m.decoder.low_rank_dim is None
    assert cfg.runtime.max_context_steps == 1500
    assert cfg.runtime.weights_schedule == tuple(range(31))
    assert cfg.assets.mimi is None and cfg.assets.tokenizer is None
    assert cfg.audio_logit_limit == 2048
    assert cfg.num_stages == 31 and cfg.data.max_delay == 18


def test_released_shape_values_parse() -> None:
    cfg = parse_config(shape_config("2b"))
    assert cfg.model.decoder.n_layer == 28 and cfg.model.decoder.n_embd == 2048
    assert cfg.model.normalization_layer_epsilon == 1e-6
    assert cfg.weight_set_ids == (0, 1, 2, 3, 4)
    assert cfg.data.second_stream_ahead == 2


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("data", "channels"), "data.channels"),
        (("data", "text_pad_token_id"), "data.text_pad_token_id"),
        (("model", "decoder", "n_layer"), "model.decoder.n_layer"),
        (("model", "depformer", "gqa_head_dim"), "model.depformer.gqa_head_dim"),
        (("runtime",), "runtime"),
    ],
)
def test_missing_required_key_is_named(path: tuple[str, ...], message: str) -> None:
    raw = minimal_config()
    block = raw
    for key in path[:-1]:
        block = block[key]
    del block[path[-1]]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(raw)


def test_inconsistent_values_are_refused() -> None:
    raw = minimal_config()
    raw["data"]["delay_pattern"] = [16, 18]
    with pytest.raises(ConfigError, match="one per audio codebook"):
        parse_config(raw)
    raw = minimal_config()
    raw["runtime"]["weights_schedule"] = [0, 1]
    with pytest.raises(ConfigError, match="one per depformer stage"):
        parse_config(raw)
    raw = minimal_config()
    raw["model"]["depformer"]["kv_heads"] = 1
    with pytest.raises(ConfigError, match="kv_heads"):
        parse_config(raw)
    raw = minimal_config()
    raw["model"]["linear"] = {"mlp_activations": ["silu", "tanhish"]}
    with pytest.raises(ConfigError, match="unknown activation"):
        parse_config(raw)
    raw = minimal_config()
    raw["data"]["channels"] = "34"
    with pytest.raises(ConfigError, match="must be an integer"):
        parse_config(raw)


def test_load_config_names_the_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.json")
    raw = minimal_config()
    path.write_text(json.dumps(raw))
    assert load_config(path).data.channels == 34


def test_content_hash_tracks_model_defining_content() -> None:
    a = parse_config(minimal_config())
    raw = copy.deepcopy(minimal_config())
    assert parse_config(raw).content_hash() == a.content_hash()
    raw["model"]["decoder"]["n_layer"] = 3
    assert parse_config(raw).content_hash() != a.content_hash()
