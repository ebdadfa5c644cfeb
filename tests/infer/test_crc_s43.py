"""Session 43: `file_crc32` reads into one reused buffer; its CRC-32 is zlib's of the whole file,
whatever the file's length against the buffer's."""

from __future__ import annotations

import random
import zlib

import pytest

from lowbit.infer.io import file_crc32


@pytest.mark.parametrize("size", [0, 1, (1 << 18) - 1, 1 << 18, (600 << 10) + 7])
def test_the_crc32_of_a_file_is_zlibs_of_its_bytes(tmp_path, size):
    data = random.Random(size).randbytes(size)
    (tmp_path / "f").write_bytes(data)
    assert file_crc32(tmp_path / "f") == f"{zlib.crc32(data):08x}"
