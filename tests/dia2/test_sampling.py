"""Sampling: CFG candidate filter, temperature/top-k, the Gumbel-max draw and the counter-based
per-stream RNG."""

from __future__ import annotations

import torch

from dia2.sampling import cfg_filter, gumbel, sample, stream_uniforms

IDS = torch.arange(8)


def test_uniforms_depend_only_on_seed_step_slot_and_id() -> None:
    seeds = torch.tensor([1, 2, 1, 2**40 + 7])
    steps = torch.tensor([5, 5, 5, 9])
    u = stream_uniforms(seeds, steps, 3, IDS)  # [4, 8]
    assert u.shape == (4, 8)
    assert torch.all((u > 0) & (u < 1))
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    # Same (seed, step, slot, id) alone or inside a batch, or with other ids: same number.
    assert torch.equal(stream_uniforms(seeds[3:], steps[3:], 3, IDS), u[3:])
    assert torch.equal(stream_uniforms(seeds, steps, 3, IDS[5:]), u[:, 5:])
    assert not torch.equal(stream_uniforms(seeds, steps, 4, IDS)[0], u[0])
    assert len(set(u[0].tolist())) == 8  # a different number per id


def test_uniforms_look_uniform_and_gumbel_noise_is_finite() -> None:
    steps = torch.arange(4000)
    u = stream_uniforms(torch.full_like(steps, 1234), steps, 0, torch.arange(16))  # [4000, 16]
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert hist.min() > 5900 and hist.max() < 6900  # 6400 each
    assert abs(u.mean().item() - 0.5) < 0.005
    # Neighbouring ids and neighbouring steps are not correlated.
    corr = torch.corrcoef(torch.stack([u[:, 0], u[:, 1], u[:, 0].roll(1)]))
    assert (corr - torch.eye(3)).abs().max() < 0.05
    # The extremes the hash can give stay finite through -log(-log u).
    extremes = torch.tensor([2.0**-24, 1 - 2.0**-24])
    assert torch.isfinite(gumbel(extremes)).all()
    assert torch.isfinite(gumbel(u)).all()


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


def noise_rows(rows: int, vocab: int, seed: int = 7) -> torch.Tensor:
    """Gumbel noise [rows, vocab] from the stream RNG: one row per step of one stream."""
    steps = torch.arange(rows)
    return gumbel(stream_uniforms(torch.full_like(steps, seed), steps, 2, torch.arange(vocab)))


def test_greedy_and_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]] * 3)
    temps = torch.tensor([0.0, 1.0, 1.0])
    top_k = torch.tensor([0, 1, 2])
    picks = [sample(logits, temps, top_k, noise[None].expand(3, 4)).tolist() for noise in noise_rows(200, 4)]
    assert all(p[0] == 1 for p in picks)  # greedy: the noise is not used
    assert all(p[1] == 1 for p in picks)  # top-1 is greedy too
    assert {p[2] for p in picks} == {1, 2}  # top-2 only ever picks the two best


def test_greedy_takes_the_first_largest_logit() -> None:
    """Ties: the first maximum in vocabulary order, as argmax and the reference do; a negative
    temperature is greedy too, whatever the noise."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [float("-inf"), 2.0, 2.0, float("-inf")]])
    for noise in noise_rows(50, 4) * 10:
        picks = sample(logits, torch.tensor([0.0, -1.0]), torch.tensor([0, 2]), noise[None].expand(2, 4))
        assert picks.tolist() == [1, 1]


def test_sampled_frequencies_follow_softmax_over_the_top_k() -> None:
    """Gumbel-max draws with the stream RNG against softmax(logits / T) restricted to the top k
    (ties at the cut kept). Deterministic (fixed seeds); a loose chi-square bound: the statistic
    is ~df for a right sampler and hundreds for a wrong temperature or cut."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=gen) * 2
    logits[10] = logits[11] = logits.topk(5).values[-1] + 0.25  # a tie at the 5th place: both kept
    assert (logits >= logits.topk(5).values[-1]).sum() == 6
    draws = 20000
    noise = noise_rows(draws, 64)
    for temperature, top_k in ((1.0, 0), (0.8, 10), (2.0, 5), (0.3, 64)):
        picks = sample(logits[None].expand(draws, 64), torch.full((draws,), temperature),
                       torch.full((draws,), top_k), noise)
        counts = torch.bincount(picks, minlength=64).double()
        probs = torch.softmax(logits.double() / temperature, 0)
        if 0 < top_k < 64:
            probs = torch.where(logits >= logits.topk(top_k).values[-1], probs, 0.0)
        kept = probs > 0
        expected = probs[kept] / probs[kept].sum() * draws
        chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
        df = int(kept.sum()) - 1
        assert counts[~kept].sum() == 0, (temperature, top_k)
        assert chi2 < df + 8 * (2 * df) ** 0.5 + 10, (temperature, top_k, chi2, df)


def test_all_masked_row_draws_id_zero() -> None:
    logits = torch.full((2, 4), float("-inf"))
    noise = noise_rows(2, 4)
    assert sample(logits, torch.tensor([1.0, 0.0]), torch.tensor([0, 2]), noise).tolist() == [0, 0]
