"""Finding catalogue entries by prompt name (`IndexResolver`) and by pasted hash (`find_by_hash`). Hashes are checked
against A1111's rule computed here from the file bytes (sha256 of the data after the safetensors header)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from lora_ext.errors import LoraNotFoundError
from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.library import LoraIndex
from lora_ext.library.lookup import IndexResolver, find_by_hash


def _addnet12(path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


@pytest.fixture
def lora_dir(tmp_path):
    d = tmp_path / "Lora"
    (d / "sub").mkdir(parents=True)
    save_safetensors_atomic({"a.alpha": torch.tensor(1.0)}, d / "small.safetensors")
    save_safetensors_atomic({"a.alpha": torch.zeros(64)}, d / "sub" / "big.safetensors",
                            metadata={"ss_output_name": "Big One"})
    return d


def test_find_by_hash_hashes_unhashed_files_within_the_budget(lora_dir, tmp_path):
    cache = tmp_path / "index.json"
    index = LoraIndex([lora_dir], cache_file=cache)
    big = lora_dir / "sub" / "big.safetensors"
    assert all(not e.shorthash for e in index.entries())  # listing never hashes
    assert find_by_hash(index, _addnet12(big), budget=os.path.getsize(lora_dir / "small.safetensors")) is None
    entry = find_by_hash(index, _addnet12(big).upper())
    assert entry is not None and os.path.samefile(entry.path, big)
    assert index.entry_for_path(big).shorthash == _addnet12(big)
    assert _addnet12(big) in json.dumps(json.loads(cache.read_text()))  # learnt hashes written to the cache
    assert find_by_hash(index, "ffffffffffff") is None


def test_resolver_names_and_hash(lora_dir):
    index = LoraIndex([lora_dir])
    resolver = IndexResolver(index)
    big = lora_dir / "sub" / "big.safetensors"
    assert os.path.samefile(resolver.resolve("Big One"), big) and os.path.samefile(resolver.resolve("sub/big"), big)
    with pytest.raises(LoraNotFoundError, match=r"Lora not found: nope .*" + str(lora_dir).replace("/", ".")):
        resolver.resolve("nope")
    save_safetensors_atomic({"a.alpha": torch.tensor(2.0)}, lora_dir / "late.safetensors")
    assert resolver.resolve("late").name == "late.safetensors"  # an unknown name rescans once
    assert resolver.shorthash(big, {}) == _addnet12(big)
    outside = lora_dir.parent / "outside.safetensors"  # not in the catalogue: A1111's rule on the file itself
    save_safetensors_atomic({"a.alpha": torch.tensor(3.0)}, outside)
    assert resolver.shorthash(outside, {"sshs_model_hash": "abcdef0123456789"}) == "abcdef012345"
    assert resolver.shorthash(outside, {}) == _addnet12(outside)
