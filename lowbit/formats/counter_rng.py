"""Counter-based uniforms for stochastic rounding: one seed per call, a hash per element.

Stochastic rounding needs one uniform draw per element. `torch.rand` on a CPU runs PyTorch's
Mersenne Twister, a serial generator: in the `mxfp4` recipe's step (stochastic rounding on every
gradient operand) `aten::uniform_` took a quarter of the step (162 of 600 ms, torch.profiler
over 5 steps as `python benchmarks/recipe_speed.py --profile mxfp4` does now; docs/formats.md). A counter-based generator (Salmon et al. 2011, the idea
behind Philox, which PyTorch uses on CUDA) instead computes draw ``i`` as a hash of
``(seed, i)``, so the fused CPU kernel (`lowbit.kernels`) computes it where it rounds, in parallel,
without a noise tensor, and the PyTorch path computes the same values with integer tensor ops: both
paths round identically.

The hash is SplitMix64's output function (Steele, Lea and Flood 2014; the seeding generator of
Java's SplittableRandom and of xoshiro), applied to ``seed + (k + 1) * 0x9E3779B97F4A7C15`` mod
2**64. Each hash gives two draws, ``u = bits / 2**24`` of its top 24 bits for draw ``2k`` and of the
24 bits below them for draw ``2k + 1`` (the 24-bit resolution of a float32 `torch.rand` draw): the
hash's three 64-bit multiplications were half the cost of stochastic rounding in the kernel, and
every output bit of the function is equally well mixed. ``seed`` is drawn from the caller's torch
generator (or the global one) once per call, so `torch.manual_seed` makes runs reproducible and
successive calls independent.
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, SplitMix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U64 = 1 << 64


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 math)."""
    return value - _U64 if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def seeded_generator(seed: int, index: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` whose stream depends only on ``(seed, index)``, the two mixed by
    numpy's SeedSequence: a batch order per epoch, a rank's own stream, a shard's rounding."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One 63-bit seed from ``generator`` (default: the global CPU generator)."""
    return int(seed_tensor(generator))


def seed_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """`draw_seed`'s draw as a 0-dim int64 tensor, on the generator's device. What quantization
    draws: under `torch.compile` the ``int()`` of a tensor breaks the graph (and a graph break in
    a layer's backward sent its whole autograd function back to eager), while a tensor seed stays
    in the graph, drawn afresh at every call from the same generator, so the bits are eager's."""
    if generator is None and torch.compiler.is_compiling():
        return _traced_seed()
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**63 - 1, (), generator=generator, device=device)


# A traced graph's seed: `seed_tensor`'s draw from the global CPU generator, as an op with an
# ordered side effect. A plain ``randint`` has no inputs, and AOTAutograd's partitioner may move
# a backward quantization whose operand comes from the forward (the weight gradient's ``x.T``),
# its seed draw with it, into the forward graph when saving the quantized operand costs fewer
# bytes than saving ``x`` (an fp32 input of 640 rows, 64 wide: its bf16 MXFP4 operand is half
# the size). The compiled step then drew that seed first, every other one a place later than
# eager did, and the weight gradients differed from eager's in bits. An effectful op stays in
# the graph (forward or backward) it was traced in, in trace order with the others: eager's order.
# (A caller's own generator still draws by ``randint``: an op takes no generator; layers use none.)
@torch.library.custom_op("lowbit_traced::seed", mutates_args=())
def _traced_seed() -> torch.Tensor:
    return torch.randint(0, 2**63 - 1, (), device="cpu")


@_traced_seed.register_fake
def _() -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


_traced_seed.register_effect(torch.library.EffectType.ORDERED)


def uniforms(shape, seed: int | torch.Tensor, device=None) -> torch.Tensor:
    """float32 draws ``u[i]`` for the row-major index ``i`` of ``shape``: of ``z = hash(seed, i // 2)``,
    ``(z >> 40) / 2**24`` for even ``i`` and ``((z >> 16) & (2**24 - 1)) / 2**24`` for odd ``i``.
    ``seed``: an int, or a 0-dim int64 tensor (`seed_tensor`'s, in [0, 2**63): the same bits).

    Integer tensor arithmetic wraps modulo 2**64 (two's complement), as the C++ kernel's uint64 does.
    """
    count = 1
    for size in shape:
        count *= size
    z = torch.arange(1, (count + 1) // 2 + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN)
    z += seed.to(z.device) if isinstance(seed, torch.Tensor) else _signed(seed % _U64)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    z ^= _shift_right(z, 31)
    draws = torch.stack((_shift_right(z, 40), _shift_right(z, 16) & ((1 << 24) - 1)), dim=-1)
    return draws.reshape(-1)[:count].to(torch.float32).mul_(2.0**-24).reshape(shape)
