"""A digits entry edited by hand (its checksum made to match) crashed the run (a row number past
the data) or trained on part of it (a row in no split): each such entry is a miss now, as a
damaged word-pieces or syntax-tags entry is.
"""

import hashlib
import json
import shutil

import pytest
import torch

from lowbit.data import load_digit_splits


def without_row(entry):
    entry["train"].pop()


DAMAGES = {  # an edit of the digits entry, each a whole JSON value of another shape or meaning
    "a row number past the data": lambda e: e["test"].__setitem__(0, 5000),
    "a row in two splits": lambda e: e["test"].__setitem__(0, e["train"][0]),
    "a row in no split": without_row,
    "a fractional row number": lambda e: e["validation"].__setitem__(0, 0.5),
    "an image short": lambda e: e.__setitem__("pixels", e["pixels"][:-64]),
    "a pixel past 16": lambda e: e["pixels"].__setitem__(3, 17.0),
    "a label past the classes": lambda e: e["labels"].__setitem__(0, 10),
    "a label short": lambda e: e["labels"].pop(),
    "no test split": lambda e: e.pop("test"),
    "an empty object": lambda e: e.clear(),
}


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """The splits as made without a cache, and a cache folder holding their pristine entry, made
    once for the module's tests (each copies the folder)."""
    folder = tmp_path_factory.mktemp("digits-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOWBIT_CACHE_DIR", "")
        expected = load_digit_splits(seed=0)
        patch.setenv("LOWBIT_CACHE_DIR", str(folder))
        load_digit_splits(seed=0)
    return expected, folder


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_digits_entry_is_made_again(tmp_path, monkeypatch, digits_cache, damage):
    """An entry edited by hand, its checksum made to match, is a miss: the splits are made
    again from scikit-learn, as without a cache, and the entry rewritten."""
    expected, pristine_cache = digits_cache
    cache = tmp_path / "cache"
    shutil.copytree(pristine_cache, cache)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(cache))
    (path,) = cache.glob("digits/*/*.json")
    pristine = path.read_bytes()
    header, _, payload = pristine.partition(b"\n")
    entry = json.loads(payload)
    DAMAGES[damage](entry)
    payload = json.dumps(entry).encode()
    meta = {**json.loads(header), "sha256": hashlib.sha256(payload).hexdigest()}
    path.write_bytes(json.dumps(meta).encode() + b"\n" + payload)
    splits = load_digit_splits(seed=0)
    assert splits.keys() == expected.keys()
    for name, (images, labels) in expected.items():
        assert torch.equal(splits[name][0], images) and torch.equal(splits[name][1], labels)
    assert path.read_bytes() == pristine
