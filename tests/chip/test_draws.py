"""The counter-based draws of the crossbar's read-outs (``cimsim.chip.draws``): the values of an
independent SplitMix64 + Box-Muller, the same on any thread count, layout and code path (compiled
or eager), and the statistics of independent standard normals."""

import itertools
import math

import pytest
import torch
from scipy import stats

from cimsim.chip import compiled, draws, fused
from cimsim.chip import compiled as cmp
from cimsim.chip.periphery import quantize_

_M64 = (1 << 64) - 1


def _splitmix64(key: int, i: int) -> int:
    """Steele et al.'s SplitMix64 output ``i`` (0-based) of a generator seeded with ``key``,
    written from the published constants with Python integers."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _box_muller(bits: int) -> float:
    u1 = ((bits >> 32) + 1) / 2**32
    u2 = (bits & 0xFFFFFFFF) / 2**32
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@pytest.mark.parametrize("key", [0, 12345, 2**63 + 17, 2**64 - 1])
def test_draws_are_splitmix64_and_box_muller(key):
    z = draws.normal_like(torch.empty(3, 5, 7), draws.stream(key))
    expected = torch.tensor([_box_muller(_splitmix64(key, i)) for i in range(z.numel())])
    # float32 Box-Muller against float64: a few ulps of values of order 1
    torch.testing.assert_close(z.flatten(), expected.float(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (2, 1, 4), (13,), ()])
@pytest.mark.parametrize("key", [0, 2**63 + 17, 2**64 - 1])
def test_compiled_counters_are_splitmix64s_counters(shape, key):
    """Compiled, the counter ``key + (i + 1) * gamma`` is a sum of one term per dimension: the
    same 64-bit values as the row-major index's, wrapping included."""
    got = draws._counters(draws.stream(key), torch.Size(shape), "cpu").flatten().tolist()
    n = math.prod(shape)
    expected = [(key + (i + 1) * 0x9E3779B97F4A7C15) & _M64 for i in range(n)]
    assert [v & _M64 for v in got] == expected


@pytest.mark.parametrize("at", [0, 2, 4])
def test_a_slices_counters_are_the_slice_of_the_counters(at):
    """``fixed`` (a tile's draws computed apart): the counters of ``[:, at]``, wrapping included."""
    key, shape = draws.stream(2**64 - 5), torch.Size((3, 5, 4, 2))
    whole = draws._counters(key, shape, "cpu")
    assert torch.equal(draws._counters(key, shape, "cpu", {1: at}), whole[:, at])


def test_draws_follow_the_logical_index_not_the_memory_layout():
    key = draws.stream(3)
    dense = draws.normal_like(torch.empty(2, 6, 4, 5), key)
    channels_last = torch.empty(2, 6, 4, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(draws.normal_like(channels_last, key), dense)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_draws_do_not_depend_on_the_thread_count_or_the_path(threads, monkeypatch):
    """Above ``COMPILE_MIN`` the draws run compiled (where a compiler works); below, or with
    ``CIMSIM_COMPILE=0``, eagerly: the same values either way, on one thread or two."""
    n = compiled.COMPILE_MIN * 2
    key = draws.stream(2024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fast = draws.normal_like(torch.empty(n), key)
    finally:
        torch.set_num_threads(before)
    assert not compiled._FAILED and draws._gaussian in compiled._COMPILED  # it did compile
    monkeypatch.setenv("CIMSIM_COMPILE", "0")
    eager = draws.normal_like(torch.empty(n), key)
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
    head = torch.tensor([_box_muller(_splitmix64(2024, i)) for i in range(64)]).float()
    torch.testing.assert_close(fast[:64], head, rtol=1e-5, atol=2e-6)


def test_a_fresh_key_comes_from_the_global_generator():
    torch.manual_seed(5)
    a = draws.normal_like(torch.empty(100))
    torch.manual_seed(5)
    assert torch.equal(draws.normal_like(torch.empty(100)), a)
    assert not torch.equal(draws.normal_like(torch.empty(100)), a)


def test_draws_are_independent_standard_normals():
    """n = 2^20 draws: the mean within 4 / sqrt(n), the variance within 4 sqrt(2 / n), the
    kurtosis within 4 sqrt(24 / n), a KS test at p > 1e-3, lag-1 and cross-stream correlations
    (keys 1 apart) within 4 / sqrt(n): a bad mixer or a shifted stream fails one of them."""
    n = 1 << 20
    z = draws.normal_like(torch.empty(n), draws.stream(7)).double()
    bound = 4 / math.sqrt(n)
    assert abs(z.mean().item()) < bound
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / n)
    kurtosis = ((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3
    assert abs(kurtosis) < 4 * math.sqrt(24 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < bound
    other = draws.normal_like(torch.empty(n), draws.stream(8)).double()
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < bound
    shifted = draws.normal_like(torch.empty(n), draws.stream(7 + 0x9E3779B97F4A7C15)).double()
    assert abs(torch.corrcoef(torch.stack([z[1:], shifted[:-1]]))[0, 1].item()) > 0.99  # sanity


@pytest.mark.parametrize("key", [0, 2**63 + 17])
def test_paired_draws_are_both_box_muller_draws_of_the_even_counter(key):
    """Paired over dim 1 (the tiles): element ``(a, t, c)`` is ``r cos(2 pi u2)`` for even ``t``
    and ``r sin(2 pi u2)`` for odd ``t``, both from SplitMix64 at the index of ``(a, t - t % 2,
    c)``; computed here with Python floats from the published constants, eager and compiled."""
    shape = (2, 5, 3)
    expected = torch.empty(shape, dtype=torch.float64)
    for a, t, c in itertools.product(*map(range, shape)):
        bits = _splitmix64(key, (a * shape[1] + t - t % 2) * shape[2] + c)
        u1, u2 = ((bits >> 32) + 1) / 2**32, (bits & 0xFFFFFFFF) / 2**32
        trig = math.cos if t % 2 == 0 else math.sin
        expected[a, t, c] = math.sqrt(-2.0 * math.log(u1)) * trig(2.0 * math.pi * u2)
    k = draws.stream(key)
    eager = draws._gaussian(k, torch.Size(shape), "cpu", paired=1)
    torch.testing.assert_close(eager, expected.float(), rtol=1e-5, atol=4e-6)
    close = {"rtol": 1e-5, "atol": 1e-6}  # the compiled math library's rounding
    compiled_fn = torch.compile(draws._gaussian, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled_fn(k, torch.Size(shape), "cpu", paired=1), eager, **close)
    at = torch.compile(draws._gaussian_at, dynamic=False, fullgraph=True)
    for t in range(shape[1]):  # a tile's draws computed alone, compiled
        got = at(k, torch.Size(shape), 1, t, "cpu", torch.float32)
        torch.testing.assert_close(got, eager[:, t], **close)


def test_the_two_draws_of_a_pair_are_independent_standard_normals():
    """n = 2^19 pairs: each half is standard normal (KS at p > 1e-3), and the halves are
    uncorrelated, as are their squares (within 4 / sqrt(n)): a pair built from one angle, or
    from one radius and a dependent angle, fails one of them."""
    n = 1 << 19
    z = draws._gaussian(draws.stream(11), torch.Size((n, 2)), "cpu", paired=1).double()
    bound = 4 / math.sqrt(n)
    for half in (z[:, 0], z[:, 1]):
        assert stats.kstest(half.numpy(), "norm").pvalue > 1e-3
    assert abs(torch.corrcoef(z.t())[0, 1].item()) < bound
    assert abs(torch.corrcoef((z**2).t())[0, 1].item()) < bound


def _tail_reference(y, unit, key, out_noise, bound, levels, alpha):
    """The tile tail step by step: noise from the same stream (paired over the tiles, as
    checked above), ``quantize_`` (the periphery's quantizer) or a clip, the gain, the sum."""
    noisy = y + draws._gaussian(key, y.shape, y.device, paired=1) * unit * out_noise
    b = (unit * bound).expand_as(noisy)
    inside = (noisy >= -b) & (noisy <= b)
    q = noisy.clone()
    if levels is None:
        q = torch.minimum(torch.maximum(q, -b), b)
    else:
        quantize_(q, b, levels)
    return (q * alpha).sum(dim=1), inside


@pytest.mark.parametrize(("channels_last", "parts"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("levels", [None, 15, 16])
def test_the_fused_tail_is_noise_then_adc_then_gain_then_sum(
    levels, compiled, channels_last, parts, monkeypatch
):
    """Also on a conv's partial sums, channels-last ``(B, T*C, H, W)`` viewed as ``(B, T, C, H,
    W)``: the tail then runs in that memory order, with the same values; and on the tiles'
    partial sums given apart (``parts``: a list), with the draws of the stacked index."""
    if not compiled:
        monkeypatch.setenv("CIMSIM_COMPILE", "0")
    g = torch.Generator().manual_seed(1)
    shape = (16, 3, 8, 6, 6) if not compiled else (64, 3, 16, 24, 24)  # above COMPILE_MIN
    y = torch.randn(shape, generator=g) * 3
    if channels_last:  # the same values, laid out (B, H, W, T, C)
        flat = y.flatten(1, 2).contiguous(memory_format=torch.channels_last)
        y, logical = flat.view(shape), y
        assert y.stride(2) == 1 and torch.equal(y, logical)
    unit = torch.rand(shape[0], shape[1], 1, *shape[3:], generator=g) + 0.1
    alpha = torch.rand(1, shape[1], shape[2], 1, 1, generator=g) + 0.5
    key = draws.stream(99)
    given = [t.contiguous() for t in y.unbind(1)] if parts else y.clone()
    out, inside = fused.fused_tail(
        given, unit, out_noise=0.3, bound=2.5, levels=levels, alpha=alpha, key=key
    )
    ref, ref_inside = _tail_reference(y, unit, key, 0.3, 2.5, levels, alpha)
    if compiled:
        assert not cmp._FAILED and fused._tail in cmp._COMPILED  # it did compile
    # a value exactly on a rounding boundary may land one level apart between the two
    # expressions (their float operations differ in order): a handful out of ~10^5 to 10^6
    assert inside.shape == ref_inside.shape
    assert (inside != ref_inside).float().mean().item() < 1e-4
    step = 2 * 2.5 * unit.max().item() * alpha.max().item() / ((levels or 2) - 1)
    assert ((out - ref).abs() > 1e-4).float().mean().item() < 1e-3
    assert (out - ref).abs().max().item() <= shape[1] * step + 1e-4


def test_no_draw_is_larger_than_z_max():
    """The tail skips the mask where ``|y| <= b - Z_MAX * out_noise * unit``: that needs every
    draw within ``Z_MAX``. Box-Muller's largest draw is at counter 0 (SplitMix64's mix keeps 0:
    ``u1 = 2^-32``, ``u2 = 0``), eager and compiled, and no larger than ``Z_MAX``."""
    zero = torch.zeros(1 << 18, dtype=torch.int64)
    eager = draws._box_muller(zero)
    compiled_ = torch.compile(draws._box_muller)(zero)
    largest = math.sqrt(-2.0 * math.log(2.0**-32))
    for got in (eager, compiled_):
        assert got.max().item() == pytest.approx(largest, rel=1e-6)
        assert got.max().item() < draws.Z_MAX < 6.67


@pytest.mark.parametrize("compiled", [False, True])
def test_the_largest_draw_decides_the_mask_at_the_bound(compiled, monkeypatch):
    """The stream whose element 0 gets counter 0 draws the largest value there. A partial sum
    just inside ``b - (largest - 1e-3) sigma u`` clips through it: the mask is returned, that
    element outside; one just inside ``b - Z_MAX sigma u`` cannot clip: no mask."""
    if not compiled:
        monkeypatch.setenv("CIMSIM_COMPILE", "0")
    shape = (64, 3, 16, 24, 24) if compiled else (8, 3, 8, 6, 6)
    key = draws.stream((-draws._GAMMA) % 2**64)  # counter of element i: (i + 1) gamma + key
    largest = math.sqrt(-2.0 * math.log(2.0**-32))
    unit = torch.full((shape[0], shape[1], 1, *shape[3:]), 0.5)  # the margin scales with it
    sigma, bound = 0.04, 2.0
    y = torch.zeros(shape)  # every other partial sum far inside
    if compiled:
        assert cmp.enabled(y)
    y.view(-1)[0] = 0.5 * (bound - (largest - 1e-3) * sigma)
    _, inside = fused.fused_tail(y, unit, out_noise=sigma, bound=bound, levels=255, key=key)
    assert inside is not None and not inside.reshape(-1)[0] and inside.reshape(-1)[1:].all()
    y.view(-1)[0] = 0.5 * (bound - 6.6615 * sigma)
    _, inside = fused.fused_tail(y, unit, out_noise=sigma, bound=bound, levels=255, key=key)
    assert inside is None


@pytest.mark.parametrize("compiled", [False, True])
def test_the_mask_is_skipped_only_where_no_draw_can_clip(compiled, monkeypatch):
    """Partial sums ``2 sigma`` inside the range's end clip only through their noise (about
    2 % of them): the tail must still return the exact mask. Partial sums more than ``Z_MAX``
    noise stds inside can never clip: no mask (the dense gradient)."""
    if not compiled:
        monkeypatch.setenv("CIMSIM_COMPILE", "0")
    g = torch.Generator().manual_seed(3)
    shape = (64, 3, 16, 24, 24) if compiled else (8, 3, 8, 6, 6)  # above COMPILE_MIN or not
    sign = torch.randint(0, 2, shape, generator=g) * 2.0 - 1
    unit = torch.rand(shape[0], shape[1], 1, *shape[3:], generator=g) + 0.5
    sigma, bound, key = 0.04, 2.0, draws.stream(7)
    near = sign * unit * (bound - 2 * sigma)
    _, inside = fused.fused_tail(near.clone(), unit, out_noise=sigma, bound=bound, levels=255,
                                 key=key)  # fmt: skip
    _, ref_inside = _tail_reference(near, unit, key, sigma, bound, 255, torch.ones(1))
    assert 0.01 < 1 - ref_inside.float().mean().item() < 0.04  # P(xi > 2) = 2.3 %
    assert inside is not None and (inside != ref_inside).float().mean().item() < 1e-4
    far = near * (bound - 6.7 * sigma) / (bound - 2 * sigma)
    _, inside = fused.fused_tail(far.clone(), unit, out_noise=sigma, bound=bound, levels=255,
                                 key=key)  # fmt: skip
    assert inside is None
    assert _tail_reference(far, unit, key, sigma, bound, 255, torch.ones(1))[1].all()
    if compiled:
        assert fused._tail in cmp._COMPILED


def test_rows_of_noisy_reads_name_their_generator():
    """Rows measured with another noise generator must not mix with these: the row settings of
    a chip that draws output or read noise name the generator (``readout_draws``)."""
    from torch import nn

    from cimsim import AnalogConfig, convert_to_analog
    from cimsim.robustness.fingerprints import READOUT_DRAWS, READOUT_DRAWS_PAIRED, readout_draws

    def model(**chip):
        return convert_to_analog(nn.Sequential(nn.Linear(4, 2)), AnalogConfig(**chip))

    assert readout_draws(model(sigma=0.1)) is None
    # output noise pairs the tiles' draws (rows from before the pairing are stale)
    assert readout_draws(model(out_noise=0.04)) == READOUT_DRAWS_PAIRED != READOUT_DRAWS
    assert readout_draws(model(out_noise=0.04, w_read_noise=0.01)) == READOUT_DRAWS_PAIRED
    assert readout_draws(model(w_read_noise=0.01)) == READOUT_DRAWS


def test_eager_draws_in_chunks_are_the_same_draws(monkeypatch):
    """Run eagerly, large draws are computed in chunks (bounded memory): the same values."""
    monkeypatch.setenv("CIMSIM_COMPILE", "0")
    key = draws.stream(11)
    whole = draws.normal_like(torch.empty(3, 1000), key)
    monkeypatch.setattr(draws, "EAGER_CHUNK", 256)
    torch.testing.assert_close(draws.normal_like(torch.empty(3, 1000), key), whole, rtol=0, atol=0)
