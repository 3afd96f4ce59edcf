"""Sampling: CFG candidate filter, temperature/top-k, and the counter-based per-stream RNG."""

from __future__ import annotations

import torch

from dia2.sampling import cfg_filter, sample, stream_uniforms


def test_uniforms_depend_only_on_seed_step_and_slot() -> None:
    seeds = torch.tensor([1, 2, 1, 2**40 + 7])
    steps = torch.tensor([5, 5, 5, 9])
    u = stream_uniforms(seeds, steps, 3)
    assert torch.all((u >= 0) & (u < 1))
    assert u[0] == u[2] and u[0] != u[1]
    # Same (seed, step, slot) alone or inside a batch: same number.
    assert stream_uniforms(seeds[3:], steps[3:], 3) == u[3]
    assert stream_uniforms(seeds, steps, 4)[0] != u[0]


def test_uniforms_look_uniform() -> None:
    steps = torch.arange(20000)
    u = stream_uniforms(torch.full_like(steps, 1234), steps, 0)
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert hist.min() > 1700 and hist.max() < 2300
    assert abs(u.mean().item() - 0.5) < 0.01


def test_cfg_filter_keeps_top_k_of_guided_and_returns_conditional_values() -> None:
    cond = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    uncond = torch.tensor([[0.0, 3.0, 0.0, 0.0]])
    # guided = uncond + 2 (cond - uncond) = [0, -1, 4, 6]: the top 2 are ids 3 and 2.
    out = cfg_filter(cond, uncond, torch.tensor([2.0]), torch.tensor([2]))
    assert torch.equal(out, torch.tensor([[float("-inf"), float("-inf"), 2.0, 3.0]]))
    # Scale 1 leaves the row alone; k >= vocab keeps everything.
    assert torch.equal(cfg_filter(cond, uncond, torch.tensor([1.0]), torch.tensor([2])), cond)
    assert torch.equal(cfg_filter(cond, uncond, torch.tensor([2.0]), torch.tensor([10])), cond)


def test_cfg_filter_keeps_ties() -> None:
    cond = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = cfg_filter(cond, cond, torch.tensor([3.0]), torch.tensor([1]))
    assert torch.isfinite(out[0, :3]).all() and out[0, 3] == float("-inf")


def test_greedy_and_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]] * 3)
    temps = torch.tensor([0.0, 1.0, 1.0])
    top_k = torch.tensor([0, 1, 2])
    picks = [sample(logits, temps, top_k, torch.full((3,), u)).tolist() for u in (0.0, 0.5, 0.99)]
    assert all(p[0] == 1 for p in picks)  # greedy
    assert all(p[1] == 1 for p in picks)  # top-1 is greedy too
    assert {p[2] for p in picks} == {1, 2}  # top-2 only ever picks the two best


def test_inverse_cdf_follows_probabilities() -> None:
    logits = torch.log(torch.tensor([[0.25, 0.75]]))
    u = torch.linspace(0, 0.999, 1000)
    picks = torch.stack([sample(logits, torch.ones(1), torch.zeros(1, dtype=torch.long), x[None]) for x in u])
    assert abs(picks.float().mean().item() - 0.75) < 0.01


def test_all_masked_row_falls_back_to_id_zero() -> None:
    logits = torch.full((1, 4), float("-inf"))
    assert sample(logits, torch.ones(1), torch.zeros(1, dtype=torch.long), torch.tensor([0.3])).item() == 0
