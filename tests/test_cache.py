"""The parsed-file cache: hits, reload on change (new token -> the patcher recomputes), size bound."""

from __future__ import annotations

import os

import torch

from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.patch import LoraCache


def _write(path, seed: int, rows: int = 8) -> None:
    g = torch.Generator().manual_seed(seed)
    save_safetensors_atomic({
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, rows, generator=g),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(rows, 2, generator=g),
    }, path)


def test_hit_reload_and_bound(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _write(a, 1)
    _write(b, 2, rows=64)
    cache = LoraCache(max_bytes=1000)  # a: 128 bytes of tensors, b: 1024
    first = cache.get(a)
    assert cache.get(a) is first and cache.hits == 1
    _write(a, 3)
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    again = cache.get(a)
    assert again is not first and again.token != first.token  # changed file: parsed anew, new token
    assert not torch.equal(next(iter(again.modules.values())).algorithm.tensors()["lora_up.weight"],
                           next(iter(first.modules.values())).algorithm.tensors()["lora_up.weight"])
    cache.get(b)  # b alone is bigger than the bound: a is evicted, b kept (the entry in use is never evicted)
    assert cache.nbytes == 1024 and cache.misses == 3
    assert cache.get(b) and cache.hits == 2


def test_a_hit_under_another_name_carries_that_name(tmp_path):
    """<lora:alias> then <lora:file>: one parse, each named as the prompt names it (reports, infotext, problems)."""
    a = tmp_path / "a.safetensors"
    _write(a, 1)
    cache = LoraCache()
    by_alias = cache.get(a, name="Alias Style")
    by_file = cache.get(a, name="a")
    assert (by_alias.name, by_file.name, cache.misses, cache.hits) == ("Alias Style", "a", 1, 1)
    assert by_file.token == by_alias.token and by_file.modules is by_alias.modules  # nothing parsed or patched again
    assert cache.get(a).name == "Alias Style"
