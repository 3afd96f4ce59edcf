"""Checkpoints whose depformer embeds text (``text_embedding: true``): the text stage 0 reads.

The reference runtime feeds stage 0 the state machine's output for column t+1 on *both* CFG
rows (the unconditional row too), and that text is what the step actually feeds next, hold
included. The released checkpoints have no depformer text embedding, so only a random
checkpoint written with ``--depformer-text-embedding`` exercises this path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dia2 import Dia2, GenerationConfig
from dia2.cli import main as dia2_main
from dia2.engine import StepEngine, StepRecord
from dia2.state_machine import needs_text, new_text_state
from dia2.trace import teacher_forced_trace

TEXT = "[S1] Hello there, how are you?"


@pytest.fixture(scope="module")
def text_embed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint with a depformer text embedding, written by the CLI."""
    out = tmp_path_factory.mktemp("tiny-text-embed")
    assert dia2_main(["random-checkpoint", "--out", str(out), "--shape", "tiny", "--depformer-text-embedding"]) == 0
    return out


@pytest.fixture(scope="module")
def text_embed_runtime(text_embed_dir: Path) -> Dia2:
    return Dia2.load(text_embed_dir, device="cpu", progress=False)


def test_random_checkpoint_option_writes_a_depformer_text_embedding(text_embed_dir: Path,
                                                                    text_embed_runtime: Dia2) -> None:
    assert json.loads((text_embed_dir / "config.json").read_text())["model"]["depformer"]["text_embedding"] is True
    assert text_embed_runtime.model.depformer.text_embed is not None


def assert_stage_logits_match_the_trace(runtime: Dia2, records: list[StepRecord]) -> int:
    """Every step's stage logits equal a teacher-forced trace of the fed tokens; returns how many steps ran the
    depformer. The trace gives stage 0 the text fed at t+1 (row 0's, on both rows)."""
    tokens = torch.stack([r.tokens for r in records], dim=2)  # [2, C, steps]
    trace = teacher_forced_trace(runtime.model, tokens)
    compared = 0
    for t in range(tokens.shape[2] - 1):
        stage = records[t].stage_logits
        if stage is not None:
            torch.testing.assert_close(trace["depformer_logits"][:, t], stage, rtol=0, atol=1e-5, msg=f"step {t}")
            compared += 1
    return compared


def test_the_trace_gives_the_unconditional_row_the_conditional_text(text_embed_runtime: Dia2) -> None:
    """Bug: the unconditional row got its own (zero/pad) text at stage 0; the reference gives it row 0's."""
    model = text_embed_runtime.model
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (2, 34, 2), generator=gen)
    tokens[0, 0:2] = torch.tensor([[40, 41], [3, 52]])  # row 0: main, second text of columns 0 and 1
    tokens[1, 0], tokens[1, 1] = 7, 3  # row 1: the unconditional text (zero, pad)
    trace = teacher_forced_trace(model, tokens)
    with torch.inference_mode():
        cache = model.allocate_decoder_cache(2, slots=1)
        hidden = model.transformer(tokens[:, :, :1], torch.zeros(2, dtype=torch.long), cache, slots=1).hidden[:, 0]
        prev = tokens[:, 2, 1]
        cond_text = (torch.full((2,), 41), torch.full((2,), 52))
        want = model.depformer.stage(0, hidden, prev, model.allocate_depformer_cache(2), text=cond_text)
        own_text = (tokens[:, 0, 1], tokens[:, 1, 1])
        not_want = model.depformer.stage(0, hidden, prev, model.allocate_depformer_cache(2), text=own_text)
    assert not torch.allclose(want[1], not_want[1])  # the text embedding matters for row 1
    torch.testing.assert_close(trace["depformer_logits"][:, 0, 0], want, rtol=0, atol=1e-6)


def test_generation_feeds_the_unconditional_row_the_conditional_text(text_embed_runtime: Dia2) -> None:
    """Bug: with cfg_scale != 1 the engine fed the unconditional row pad text at stage 0."""
    cfg = GenerationConfig(seed=0, cfg_scale=3.0).greedy()
    result = text_embed_runtime.generate(TEXT, config=cfg, record=True)
    assert assert_stage_logits_match_the_trace(text_embed_runtime, result.records) > 10


def test_the_depformer_text_preview_follows_a_hold(text_embed_runtime: Dia2) -> None:
    """Bug: the preview of column t+1's text ignored "hold", so on a held step whose sampled action was a new
    word the depformer read the word's first token while the step fed pad."""
    runtime = text_embed_runtime
    rules = runtime.rules()
    engine = StepEngine(runtime.model, rules, max_streams=1)
    # An open text with one word: it lacks its two-word look-ahead, so the stream holds from step 2 on.
    text = new_text_state(rules, runtime.script_entries("[S1] Hello"), closed=False)
    slot = engine.start_fresh(0, GenerationConfig(seed=1, cfg_scale=2.0), text, runtime.token_ids.bos)
    slot.record = []
    held_word_actions = 0
    try:
        for _ in range(40):
            held = needs_text(rules, slot.text)
            engine.step([0])
            held_word_actions += int(held and slot.record[-1].action == 1)
    finally:
        engine.release(0)
    assert held_word_actions > 0, "no held step sampled a new word: the check below would prove nothing"
    assert assert_stage_logits_match_the_trace(runtime, slot.record) > 10
