import pytest
import torch

from lowbit.formats import cast
from lowbit.infer.packing import (
    codes_to_fp4,
    codes_to_int4,
    fp4_to_codes,
    int4_to_codes,
    pack_nibbles,
    unpack_nibbles,
)


@pytest.mark.parametrize("k", [1, 2, 7, 344])
def test_nibbles_round_trip_and_take_half_a_byte(k):
    codes = torch.randint(
        0, 16, (5, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k)
    )
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, k), codes)


def test_int4_codes_cover_every_value():
    values = torch.arange(-8, 8, dtype=torch.int8)
    codes = int4_to_codes(values)
    assert sorted(codes.tolist()) == list(range(16))
    assert torch.equal(codes_to_int4(codes), values)


def test_fp4_codes_are_the_e2m1_encoding():
    codes = torch.arange(16, dtype=torch.uint8)
    values = codes_to_fp4(codes)
    # every value is an fp4 e2m1 number, and the 16 codes give 15 distinct values (+0 and -0)
    assert torch.equal(cast(values, "fp4_e2m1"), values)
    assert len(set(values.tolist())) == 15
    assert values[7] == 6.0 and values[15] == -6.0 and values[1] == 0.5
    back = fp4_to_codes(values)
    assert torch.equal(back[:8], codes[:8]) and torch.equal(back[9:], codes[9:])
    assert back[8] == 0  # -0.0 is stored as +0


def test_fp4_codes_refuse_values_off_the_grid():
    with pytest.raises(ValueError, match="not an fp4"):
        fp4_to_codes(torch.tensor([0.75]))
