"""lowbit's on-disk cache (`lowbit.data.cache`) and the temporary files of its writes.

An entry is written to a ``.tmp-*`` file and renamed into place. A write interrupted by Ctrl-C,
or by a kill (SIGKILL, the OOM killer), left that file behind for good, each as large as its
entry (MiniLM's word pieces: 0.45 MB). An interrupted write removes its own now; one a killed
process left is removed by the next process to use the cache once it is an hour old, while one
that another process is writing is kept. An entry too deeply nested to parse crashed the run.
"""

import os
import subprocess
import sys
import time

import pytest
import torch

from lowbit.data import load_digit_splits
from lowbit.data.cache import JsonCache


def same_splits(got, expected) -> bool:
    return got.keys() == expected.keys() and all(
        torch.equal(got[name][0], images) and torch.equal(got[name][1], labels)
        for name, (images, labels) in expected.items()
    )


def test_a_killed_writers_temporary_file_goes_once_stale_a_live_ones_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    load_digit_splits(seed=0)
    (entry,) = tmp_path.glob("digits/*/*.json")
    pristine = entry.read_bytes()
    stale, live = entry.parent / ".tmp-k1lled0.json", entry.parent / ".tmp-wr1ting.json"
    for path in (stale, live):
        path.write_bytes(pristine[:1000])  # an entry cut short by the kill
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    other = entry.parent / ".hidden"  # not lowbit's: left alone
    other.write_text("x")
    os.utime(other, (two_hours_ago, two_hours_ago))
    script = "from lowbit.data import load_digit_splits; load_digit_splits(seed=0)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists() and live.exists() and other.exists()
    assert entry.read_bytes() == pristine


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    cache = JsonCache("test", "g1")
    cache.put("a" * 64, [1, 2, 3])

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.put("b" * 64, list(range(1000)))
    assert sorted(p.name for p in (tmp_path / "test" / "g1").iterdir()) == ["a" * 64 + ".json"]


def test_an_entry_nested_too_deep_to_read_is_made_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    expected = load_digit_splits(seed=0)
    (entry,) = tmp_path.glob("digits/*/*.json")
    pristine = entry.read_bytes()
    entry.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n" + pristine.partition(b"\n")[2])
    assert same_splits(load_digit_splits(seed=0), expected)
    assert entry.read_bytes() == pristine
