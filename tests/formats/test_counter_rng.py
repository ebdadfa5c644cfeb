"""Counter-based uniforms for stochastic rounding (lowbit.formats.counter_rng)."""

import pytest
import torch

from lowbit.formats.counter_rng import draw_seed, uniforms

U64 = 1 << 64


def splitmix64_uniform(seed: int, index: int) -> float:
    """Half of SplitMix64's output function (Steele, Lea and Flood 2014) of counter index // 2, in
    plain Python integers: the top 24 bits for an even index, the 24 below them for an odd one."""
    z = (seed + (index // 2 + 1) * 0x9E3779B97F4A7C15) % U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % U64
    z ^= z >> 31
    bits = z >> 40 if index % 2 == 0 else (z >> 16) & (2**24 - 1)
    return bits / 2**24


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**62 + 7, 2**63 - 2])
@pytest.mark.parametrize("shape", [(3, 1000), (3, 333)], ids=str)  # an even and an odd count
def test_uniforms_are_splitmix64_of_the_row_major_index(seed, shape):
    u = uniforms(shape, seed)
    assert u.dtype == torch.float32 and u.shape == shape
    for index in [0, 1, 2, 332, 333, 998, 999, 1000, 1717, 2999]:
        if index < u.numel():
            assert u.flatten()[index].item() == splitmix64_uniform(seed, index)


def test_uniforms_look_uniform_and_independent():
    u = uniforms((1 << 20,), draw_seed(torch.Generator().manual_seed(0))).double()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert u.mean().item() == pytest.approx(0.5, abs=3e-3)  # std of the mean: 2.8e-4
    assert u.var().item() == pytest.approx(1 / 12, abs=1e-3)
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above 120
    lag1 = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(lag1) < 5e-3
    # The two draws of one hash (even index, odd index) are uncorrelated too.
    pairs = torch.corrcoef(torch.stack([u[0::2], u[1::2]]))[0, 1].item()
    assert abs(pairs) < 5e-3


def test_seeds_come_from_the_generator():
    a = draw_seed(torch.Generator().manual_seed(7))
    assert a == draw_seed(torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    assert draw_seed(generator) != draw_seed(generator)  # successive calls: new draws
    torch.manual_seed(3)
    first = draw_seed()
    torch.manual_seed(3)
    assert draw_seed() == first  # the global generator by default
