"""The LoRA catalogue (`lora_ext.library`): A1111 v1.10's listing rules, key-based base-model detection, lazy hashes,
the header cache, sidecars and robustness.

References are independent of the code under test: A1111's `process_network_files` / `load_networks` lookup /
`NetworkOnDisk.get_alias` / `walk_files` order are written out by hand below from their source; hashes are computed
with hashlib over bytes parsed here with struct; base-model widths are the published ones (CLIP ViT-L 768 for SD1,
OpenCLIP ViT-H 1024 for SD2, 768 + 1280 = 2048 for SDXL); files are written with the `safetensors` library itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import threading
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

import lora_ext.library.cache as cache_mod
import lora_ext.library.index as index_mod
import lora_ext.library.scan as scan_mod
from lora_ext.formats import hashes
from lora_ext.formats.keys import PLAIN_SUFFIXES, SplitKey, split_key
from lora_ext.library import LoraIndex

SD1_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SD_UNET_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
SDXL_TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


def lora_tensors(modules: dict[str, tuple[int, int]], rank: int = 4) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors: module -> (in, out) features."""
    out = {}
    for name, (fin, fout) in modules.items():
        out[f"{name}.lora_down.weight"] = torch.zeros(rank, fin, dtype=torch.float16)
        out[f"{name}.lora_up.weight"] = torch.zeros(fout, rank, dtype=torch.float16)
        out[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    return out


def write(path: Path, tensors: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """A real .safetensors file (written by the safetensors library). Default: a tiny LoRA whose shapes say nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = lora_tensors({"lora_unet_mid_block_attentions_0_proj_in": (32, 32)})
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def header_of(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def names(entries) -> list[str]:
    return [e.relpath for e in entries]


# ------------------------------------------------------------------------ A1111's rules, written out from its source


class A1111Listing:
    """networks.process_network_files + load_networks' lookup + NetworkOnDisk.get_alias, by hand.

    `files`: (name, alias, path) in walk order. Lookup: a name whose lowercase is forbidden resolves in
    `available_networks` (by file name), anything else in `available_network_aliases`.
    """

    def __init__(self, files: list[tuple[str, str, str]]) -> None:
        self.available: dict[str, tuple[str, str, str]] = {}
        self.aliases: dict[str, tuple[str, str, str]] = {}
        self.forbidden = {"none": 1, "Addams": 1}
        for f in files:
            name, alias, _ = f
            self.available[name] = f
            if alias in self.aliases:
                self.forbidden[alias.lower()] = 1
            self.aliases[name] = f
            self.aliases[alias] = f

    def get(self, text: str) -> str | None:
        f = self.available.get(text) if text.lower() in self.forbidden else self.aliases.get(text)
        return None if f is None else f[2]

    def get_alias(self, f: tuple[str, str, str], preferred: str) -> str:
        name, alias, _ = f
        return name if preferred == "Filename" or alias.lower() in self.forbidden else alias


def a1111_walk_order(root: Path) -> list[str]:
    """modules.util.walk_files: os.walk(followlinks=True), roots and files by natural sort (lowercase, digit runs as
    numbers), extensions .pt/.ckpt/.safetensors (any case); relative POSIX paths."""

    def key(s: str) -> list:
        return [int(t) if t.isdigit() else t.lower() for t in re.split("([0-9]+)", s)]

    out = []
    for dirpath, _, files in sorted(os.walk(root, followlinks=True), key=lambda x: key(x[0])):
        for f in sorted(files, key=key):
            if os.path.splitext(f)[1].lower() in (".pt", ".ckpt", ".safetensors"):
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return out


# ------------------------------------------------------------------------------------------------ names and order


def test_listing_order_and_extensions_follow_walk_files(tmp_path):
    root = tmp_path / "Lora"
    for rel in ["lora10.safetensors", "lora2.safetensors", "Lora3.SAFETENSORS", "b/x.pt", "a 1/y.ckpt",
                "a/z9.safetensors", "a/z10.safetensors", "a/sub/w.safetensors", "notes.txt", "img.png",
                "model.bin"]:  # fmt: skip
        p = root / rel
        if p.suffix.lower() == ".safetensors":
            write(p)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"not a tensor file")
    entries = LoraIndex([root]).refresh()
    assert names(entries) == a1111_walk_order(root)
    assert names(entries)[:3] == ["lora2.safetensors", "Lora3.SAFETENSORS", "lora10.safetensors"]
    by = {e.relpath: e for e in entries}
    assert by["Lora3.SAFETENSORS"].name == "Lora3" and by["Lora3.SAFETENSORS"].is_safetensors
    assert by["a/sub/w.safetensors"].root == root.absolute()
    assert by["a/sub/w.safetensors"].path == (root / "a/sub/w.safetensors").absolute()


def _alias_tree(root: Path) -> list[tuple[str, str]]:
    """(relpath, ss_output_name or '') covering every alias rule."""
    files = [
        ("a.safetensors", "Alpha"),  # alias shared with b -> forbidden
        ("b.safetensors", "Alpha"),
        ("c.safetensors", "Cee"),  # plain alias
        ("x.safetensors", "y"),  # alias equal to a later file's name -> forbidden
        ("y.safetensors", ""),
        ("n.safetensors", "None"),  # "none" is always forbidden
        ("p.safetensors", "Pee"),
        ("q.safetensors", "p"),  # alias equal to an earlier file's name -> forbidden
        ("sub1/dup.safetensors", ""),  # duplicate file names: the later one wins the name
        ("sub2/dup.safetensors", "Dupe"),
        ("empty.safetensors", " "),  # whitespace alias: treated as absent
    ]
    for rel, alias in files:
        write(root / rel, metadata={"ss_output_name": alias, "ss_network_dim": "4"} if alias else None)
    return files


def test_name_and_alias_lookup_match_a1111(tmp_path):
    root = tmp_path / "Lora"
    _alias_tree(root)
    idx = LoraIndex([root])
    entries = idx.refresh()
    ref = A1111Listing([(e.name, e.metadata.get("ss_output_name", e.name), str(e.path)) for e in entries])
    queries = {e.name for e in entries} | {e.alias for e in entries} | {"Alpha", "alpha", "none", "None", "nope", "p"}
    for q in sorted(queries):
        got = idx.get(q)
        assert (str(got.path) if got else None) == ref.get(q), q
    assert idx.forbidden_aliases == {"alpha", "y", "none", "p"}
    # spelled-out consequences
    assert idx.get("Alpha") is None  # forbidden alias and no file named "Alpha"
    assert idx.get("Cee").name == "c"
    assert idx.get("y").name == "y"  # the file named y, not x whose alias is y
    assert idx.get("p").name == "p"
    assert idx.get("dup").relpath == "sub2/dup.safetensors"
    assert idx.get("Dupe").relpath == "sub2/dup.safetensors"
    assert idx.get("empty").alias == "empty"


def test_relpath_form_reaches_every_duplicate(tmp_path):
    root = tmp_path / "Lora"
    _alias_tree(root)
    idx = LoraIndex([root])
    idx.refresh()
    assert idx.get("sub1/dup").relpath == "sub1/dup.safetensors"
    assert idx.get("sub1/dup.safetensors").relpath == "sub1/dup.safetensors"
    assert idx.get("sub1\\dup").relpath == "sub1/dup.safetensors"
    assert idx.get("sub2/dup").relpath == "sub2/dup.safetensors"
    assert idx.get("sub3/dup") is None
    assert idx.get("") is None


@pytest.mark.parametrize("preferred", ["Alias from file", "Filename"])
def test_display_name_is_get_alias_and_always_resolves_back(tmp_path, preferred):
    root = tmp_path / "Lora"
    _alias_tree(root)
    idx = LoraIndex([root])
    entries = idx.refresh()
    ref = A1111Listing([(e.name, e.metadata.get("ss_output_name", e.name), str(e.path)) for e in entries])
    for e in entries:
        shown = idx.display_name(e, preferred)
        assert idx.get(shown) == e, (e.relpath, shown)  # ours always resolves to the same file
        # A1111 cannot name the shadowed duplicate at all, and offers a whitespace alias as it is
        if e.relpath not in ("sub1/dup.safetensors", "empty.safetensors"):
            a1111 = (e.name, e.metadata.get("ss_output_name", e.name), str(e.path))
            assert shown == ref.get_alias(a1111, preferred), e.relpath
    assert idx.display_name(idx.get("sub1/dup"), preferred) == "sub1/dup"
    assert idx.display_name(idx.get("c"), preferred) == ("Cee" if preferred == "Alias from file" else "c")


def test_alias_that_would_break_the_tag_is_not_offered(tmp_path):
    root = tmp_path / "Lora"
    write(root / "odd.safetensors", metadata={"ss_output_name": "my:lora<v2>"})
    idx = LoraIndex([root])
    (e,) = idx.refresh()
    assert e.alias == "my:lora<v2>" and idx.get("my:lora<v2>") == e  # still resolves when typed
    assert idx.display_name(e) == "odd"


def test_several_dirs_later_dir_wins_the_name_and_a_repeated_dir_is_listed_once(tmp_path):
    lora, lyco = tmp_path / "Lora", tmp_path / "LyCORIS"
    write(lora / "same.safetensors")
    write(lyco / "same.safetensors")
    write(lyco / "other.safetensors")
    idx = LoraIndex([lora, lyco, lora])
    entries = idx.refresh()
    assert [(e.root.name, e.relpath) for e in entries] == [
        ("Lora", "same.safetensors"), ("LyCORIS", "other.safetensors"), ("LyCORIS", "same.safetensors")]
    assert idx.get("same").root.name == "LyCORIS"
    assert idx.forbidden_aliases == {"none", "same"}
    assert LoraIndex([tmp_path / "missing", lora]).refresh()[0].root.name == "Lora"


def test_hidden_dirs_and_symlink_cycles(tmp_path):
    root = tmp_path / "Lora"
    write(root / ".hidden" / "h.safetensors")
    write(root / ".dotfile.safetensors")
    write(root / "d" / "v.safetensors")
    os.symlink(root, root / "d" / "loop")  # a cycle back to the root
    os.symlink(root / "d", root / "alias_of_d")  # the same folder twice
    everything = names(LoraIndex([root]).refresh())  # each folder once, the real one rather than the link
    assert sorted(everything) == [".dotfile.safetensors", ".hidden/h.safetensors", "d/v.safetensors"]
    visible = names(LoraIndex([root], include_hidden=False).refresh())
    assert ".hidden/h.safetensors" not in visible and ".dotfile.safetensors" in visible


def test_broken_symlink_and_unlisted_files_do_not_stop_the_listing(tmp_path):
    root = tmp_path / "Lora"
    write(root / "ok.safetensors")
    os.symlink(tmp_path / "gone.safetensors", root / "dangling.safetensors")
    (root / "folder.safetensors").mkdir()
    assert names(LoraIndex([root]).refresh()) == ["ok.safetensors"]


# --------------------------------------------------------------------------------------------------- sd_version


@pytest.mark.parametrize(
    ("tensors", "metadata", "version", "source"),
    [
        # metadata only (shapes of a tiny model say nothing): A1111's rules
        (None, {"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL", "metadata"),
        (None, {"ss_v2": "True", "ss_network_dim": "4"}, "SD2", "metadata"),
        (None, {"ss_network_dim": "4"}, "SD1", "metadata"),  # any other kohya metadata -> SD1
        (None, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "SDXL", "metadata"),
        (None, None, "Unknown", "none"),
        # deviation from A1111 (which says SD1 for any non-empty metadata): no base-model information -> Unknown
        (None, {"format": "pt"}, "Unknown", "none"),
        # key names and shapes
        (lora_tensors({SD_UNET_K: (768, 320)}), None, "SD1", "keys"),
        (lora_tensors({SD_UNET_K: (1024, 320)}), None, "SD2", "keys"),
        (lora_tensors({SD_UNET_K: (2048, 640)}), None, "SDXL", "keys"),
        (lora_tensors({SDXL_TE2: (1280, 1280)}), None, "SDXL", "keys"),
        (lora_tensors({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024)}), None, "SD2", "keys"),
        (lora_tensors({SD1_TE: (768, 768)}), None, "SD1", "keys"),
        # shapes outrank metadata
        (lora_tensors({SD_UNET_K: (2048, 640)}), {"ss_v2": "True"}, "SDXL", "keys"),
    ],
)
def test_sd_version_from_metadata_and_keys(tmp_path, tensors, metadata, version, source):
    write(tmp_path / "Lora" / "x.safetensors", tensors, metadata)
    (e,) = LoraIndex([tmp_path / "Lora"]).refresh()
    assert (e.sd_version, e.sd_version_source) == (version, source), e.sd_version_evidence
    if source == "keys" and metadata:
        assert "metadata says SD2.x" in e.sd_version_evidence
    if source == "keys" and tensors is not None and SD_UNET_K in next(iter(tensors)):
        assert "text features" in e.sd_version_evidence


def test_user_sidecar_sd_version_overrides_for_the_card(tmp_path):
    write(tmp_path / "Lora" / "x.safetensors", lora_tensors({SD_UNET_K: (768, 320)}))
    (tmp_path / "Lora" / "x.json").write_text(json.dumps({"sd version": "SDXL"}))
    (tmp_path / "Lora" / "y.json").write_text(json.dumps({"sd version": "SD9"}))
    write(tmp_path / "Lora" / "y.safetensors", lora_tensors({SD_UNET_K: (768, 320)}))
    x, y = LoraIndex([tmp_path / "Lora"]).refresh()
    assert (x.sd_version, x.effective_sd_version) == ("SD1", "SDXL")
    assert y.effective_sd_version == "SD1"  # not one of A1111's SdVersion names: ignored, as there


# ----------------------------------------------------------------------------------- algorithm, rank, module count


def _algo_file(kind: str) -> dict[str, torch.Tensor]:
    m = "lora_unet_mid_block_attentions_0_proj_in"
    z = torch.zeros
    if kind == "lora":
        return lora_tensors({m: (32, 32), "lora_unet_mid_block_attentions_0_proj_out": (32, 32)}, rank=8)
    if kind == "peft":
        return {"unet.mid_block.attentions.0.proj_in.lora_A.weight": z(6, 32),
                "unet.mid_block.attentions.0.proj_in.lora_B.weight": z(32, 6)}
    if kind == "loha":
        return {f"{m}.hada_w1_a": z(32, 4), f"{m}.hada_w1_b": z(4, 32), f"{m}.hada_w2_a": z(32, 4),
                f"{m}.hada_w2_b": z(4, 32), f"{m}.alpha": torch.tensor(1.0)}
    if kind == "lokr+norm":
        return {f"{m}.lokr_w1": z(4, 4), f"{m}.lokr_w2": z(8, 8), "lora_unet_mid_block_attentions_0_proj_out.lokr_w1":
                z(4, 4), "lora_unet_mid_block_attentions_0_proj_out.lokr_w2": z(8, 8),
                "lora_unet_mid_block_attentions_0_norm.w_norm": z(32)}
    if kind == "full":
        return {f"{m}.diff": z(32, 32), f"{m}.diff_b": z(32)}
    if kind == "ia3":
        return {f"{m}.weight": z(32), f"{m}.on_input": torch.tensor(False)}
    if kind == "dora":
        return {**lora_tensors({m: (32, 32)}), f"{m}.dora_scale": z(1, 32)}
    raise ValueError(kind)


@pytest.mark.parametrize(
    ("kind", "algorithm", "rank", "n_modules"),
    [("lora", "lora", 8, 2), ("peft", "lora", 6, 1), ("loha", "loha", None, 1), ("lokr+norm", "lokr+norm", None, 3),
     ("full", "full", None, 1), ("ia3", "ia3", None, 1), ("dora", "dora", 4, 1)],
)
def test_algorithm_rank_and_module_count_from_the_header(tmp_path, kind, algorithm, rank, n_modules):
    write(tmp_path / "Lora" / "x.safetensors", _algo_file(kind))
    (e,) = LoraIndex([tmp_path / "Lora"]).refresh()
    assert (e.algorithm, e.rank, e.n_modules) == (algorithm, rank, n_modules)
    assert e.problems == ()


def test_plain_suffix_shortcut_agrees_with_split_key():
    """The listing splits kohya keys at the first dot only for suffixes that split_key keeps as they are."""
    assert {"lora_up.weight", "lora_down.weight", "alpha", "hada_w1_a", "lokr_w1", "diff"} <= PLAIN_SUFFIXES
    for suffix in PLAIN_SUFFIXES:
        for module in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te2_text_model_encoder_layers_0_mlp_fc1"):
            assert split_key(f"{module}.{suffix}") == SplitKey(module, suffix)


def test_not_a_lora_is_listed_with_a_problem(tmp_path):
    write(tmp_path / "Lora" / "ckpt.safetensors", {"model.diffusion_model.out.0.weight": torch.zeros(4)})
    (e,) = LoraIndex([tmp_path / "Lora"]).refresh()
    assert e.n_modules == 0 and e.algorithm is None and e.sd_version == "Unknown"
    assert str(e.path) in e.problems[0] and "LoRA" in e.problems[0]


def test_non_compact_headers_give_the_same_facts_as_the_library_layout(tmp_path):
    """Headers written with spaces, another field order or metadata last go through the full reader."""
    tensors = lora_tensors({SD_UNET_K: (1024, 320), SD1_TE: (1024, 1024)})
    meta = {"ss_output_name": "Spaced", "ss_network_dim": "4", "sshs_model_hash": "ab" * 32}
    ref_path = write(tmp_path / "Lora" / "compact.safetensors", tensors, meta)
    n, header = header_of(ref_path)
    data = ref_path.read_bytes()[8 + n :]
    variants = {
        "spaces": json.dumps(header),
        "metadata_last": json.dumps({**{k: v for k, v in header.items() if k != "__metadata__"},
                                     "__metadata__": header["__metadata__"]}, separators=(",", ":")),
        "field_order": json.dumps({k: (v if k == "__metadata__" else {"shape": v["shape"], "dtype": v["dtype"],
                                                                     "data_offsets": v["data_offsets"]})
                                   for k, v in header.items()}, separators=(",", ":")),
        "escaped": json.dumps(header, separators=(",", ":")).replace("lora_te_", "lora\\u005fte_"),
    }
    for name, text in variants.items():
        raw = text.encode()
        (tmp_path / "Lora" / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    entries = LoraIndex([tmp_path / "Lora"]).refresh()
    facts = {(e.alias, e.sd_version, e.sd_version_source, e.algorithm, e.rank, e.n_modules, e.shorthash, e.problems)
             for e in entries}
    assert facts == {("Spaced", "SD2", "keys", "lora", 4, 2, "ab" * 6, ())}, facts
    assert len(entries) == 5


# ------------------------------------------------------------------------------------------------- broken files


def _broken_files(root: Path) -> dict[str, str]:
    """file name -> a word its problem must contain."""
    good = write(root / "good.safetensors")
    raw = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(raw[:-10])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "garbage.safetensors").write_bytes(b"\xff" * 100)
    (root / "badjson.safetensors").write_bytes(struct.pack("<Q", 6) + b"{nope}")
    (root / "badmeta.safetensors").write_bytes(struct.pack("<Q", 32) + b'{"__metadata__":{"a":1}}'.ljust(32))
    with zipfile.ZipFile(root / "zip.safetensors", "w") as z:
        z.writestr("archive/data.pkl", b"x")
    return {"truncated": "bytes", "empty": "too short", "garbage": "header", "badjson": "JSON", "badmeta": "string",
            "zip": "zip"}


def test_broken_safetensors_are_listed_with_a_problem_naming_the_file(tmp_path):
    root = tmp_path / "Lora"
    expected = _broken_files(root)
    entries = {e.name: e for e in LoraIndex([root]).refresh()}
    assert set(entries) == {"good", *expected}
    assert entries["good"].problems == ()
    for name, word in expected.items():
        e = entries[name]
        assert e.sd_version == "Unknown" and e.algorithm is None and e.n_modules is None and e.metadata == {}
        assert len(e.problems) == 1 and str(e.path) in e.problems[0] and word in e.problems[0], e.problems


def test_pickles_are_never_unpickled_while_listing_or_hashing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    root = tmp_path / "Lora"
    root.mkdir()
    payload = pickle.dumps({"lora_unet_x.lora_down.weight": Evil()})
    (root / "evil.pt").write_bytes(payload)
    torch.save({"lora_unet_x.alpha": torch.tensor(1.0)}, root / "plain.ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
        mp.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
        mp.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
        idx = LoraIndex([root])
        entries = {e.name: e for e in idx.refresh()}
        evil = entries["evil"]
        assert (evil.sd_version, evil.sd_version_source, evil.metadata, evil.algorithm) == ("Unknown", "none", {}, None)
        assert idx.get("evil") == evil and idx.get("plain") is not None
        # hashing reads bytes only: the whole file, as A1111 hashes non-safetensors files
        assert idx.full_hash(evil) == hashlib.sha256(payload).hexdigest()
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------- hashes


def _no_hashing(mp: pytest.MonkeyPatch) -> None:
    for fn in ("lora_content_hash",):
        mp.setattr(index_mod, fn, lambda *a, **k: pytest.fail("hashed a file"))


def test_listing_never_hashes_and_full_hash_is_the_addnet_hash(tmp_path):
    root = tmp_path / "Lora"
    path = write(root / "x.safetensors", lora_tensors({SD1_TE: (768, 768)}), {"ss_output_name": "X"})
    with pytest.MonkeyPatch.context() as mp:
        _no_hashing(mp)
        idx = LoraIndex([root], cache_file=tmp_path / "cache.json")
        (e,) = idx.refresh()
    assert e.shorthash is None
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    expected = hashlib.sha256(raw[8 + n :]).hexdigest()  # kohya's "addnet" hash: tensor data only
    assert idx.full_hash(e) == expected == hashes.addnet_hash_safetensors(path)
    assert idx.get("X").shorthash == expected[:12] == hashes.lora_short_hash(path)
    assert idx.by_hash(expected[:12].upper()) == idx.get("X")
    assert e.shorthash is None  # entries are immutable: the new hash is in new entries
    with pytest.MonkeyPatch.context() as mp:  # persisted: a new process knows it without hashing
        _no_hashing(mp)
        idx2 = LoraIndex([root], cache_file=tmp_path / "cache.json")
        assert idx2.get("X").shorthash == expected[:12]
        assert idx2.full_hash(idx2.get("X")) == expected
    path.write_bytes(raw[:-2] + b"\x01\x02")  # same size, new content and mtime: the cached hash is not reused
    os.utime(path, ns=(e.mtime_ns + 10**9, e.mtime_ns + 10**9))
    idx3 = LoraIndex([root], cache_file=tmp_path / "cache.json")
    assert idx3.get("X").shorthash is None
    assert idx3.full_hash(idx3.get("X")) == hashlib.sha256(path.read_bytes()[8 + n :]).hexdigest() != expected


def test_sshs_metadata_is_the_hash_without_reading_the_file(tmp_path):
    root = tmp_path / "Lora"
    sshs = "0123456789abcdef" * 4
    write(root / "x.safetensors", metadata={"sshs_model_hash": sshs})
    with pytest.MonkeyPatch.context() as mp:
        _no_hashing(mp)
        idx = LoraIndex([root])
        (e,) = idx.refresh()
        assert e.shorthash == sshs[:12] == hashes.lora_short_hash(e.path)
        assert idx.full_hash(e) == sshs
        assert idx.by_hash("0123456789ab") == e and idx.by_hash("0123") == e and idx.by_hash(sshs) == e


def test_forges_rule_hashes_the_whole_file_unless_sshs_is_set(tmp_path):
    """Forge (f2.0.1) writes the sha256 of the whole file as "Lora hashes" for a safetensors without
    `sshs_model_hash` (its `hashes.sha256` ignores `use_addnet_hash`; its infotext then differs from A1111's for the
    same file); `sshs_model_hash` wins there too."""
    root = tmp_path / "Lora"
    path = write(root / "x.safetensors", lora_tensors({SD1_TE: (768, 768)}), {"ss_output_name": "X"})
    sshs = "0123456789abcdef" * 4
    write(root / "y.safetensors", lora_tensors({SD1_TE: (768, 768)}), {"ss_output_name": "Y", "sshs_model_hash": sshs})
    idx = LoraIndex([root], addnet_hashes=False)
    whole = hashlib.sha256(path.read_bytes()).hexdigest()
    assert whole != hashes.addnet_hash_safetensors(path)
    assert idx.full_hash(idx.get("X")) == whole and idx.get("X").shorthash == whole[:12]
    assert hashes.lora_short_hash(path, addnet=False) == whole[:12]
    assert idx.full_hash(idx.get("Y")) == sshs
    assert hashes.lora_short_hash(root / "y.safetensors", addnet=False) == sshs[:12]


def test_by_hash_unknown_or_ambiguous(tmp_path):
    root = tmp_path / "Lora"
    write(root / "a.safetensors", metadata={"sshs_model_hash": "aa11" + "0" * 60})
    write(root / "b.safetensors", metadata={"sshs_model_hash": "aa22" + "0" * 60})
    write(root / "c.safetensors", metadata={"sshs_model_hash": "aa11" + "0" * 60})  # same content as a
    idx = LoraIndex([root])
    assert idx.by_hash("aa") is None  # two different hashes
    assert idx.by_hash("aa11").name == "a"  # two copies of one file: the first listed
    assert idx.by_hash("aa22").name == "b"
    assert idx.by_hash("ffff") is None and idx.by_hash(" ") is None


# ---------------------------------------------------------------------------------------------------- cache file


def _count_reads(mp: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    fast, full, metadata = scan_mod.read_compact_header, scan_mod.read_header, index_mod.read_metadata

    def counting_fast(path, size):
        reads.append(str(path))
        return fast(path, size)

    def counting_full(path):
        reads.append(str(path))
        return full(path)

    def counting_metadata(path):
        reads.append(str(path))
        return metadata(path)

    mp.setattr(scan_mod, "read_compact_header", counting_fast)
    mp.setattr(scan_mod, "read_header", counting_full)
    mp.setattr(index_mod, "read_metadata", counting_metadata)
    return reads


def test_cache_reuses_unchanged_files_and_rereads_changed_ones(tmp_path, monkeypatch):
    root, cache = tmp_path / "Lora", tmp_path / "cache" / "index.json"
    paths = [write(root / f"f{i}.safetensors", metadata={"ss_output_name": f"F{i}"}) for i in range(4)]
    reads = _count_reads(monkeypatch)
    first = LoraIndex([root], cache_file=cache).refresh()
    assert len(reads) == 4 and cache.is_file()
    reads.clear()
    idx = LoraIndex([root], cache_file=cache)  # a new process
    assert idx.refresh() == first and reads == []
    assert idx.refresh() == first and reads == []  # refresh on the same index
    mtime = cache.stat().st_mtime_ns
    os.utime(paths[0], ns=(first[0].mtime_ns + 5 * 10**9,) * 2)  # touched: re-read
    write(paths[1], metadata={"ss_output_name": "changed!"})  # rewritten: new size and mtime
    paths[2].unlink()  # gone
    entries = idx.refresh()
    assert sorted(reads) == sorted(str(p) for p in paths[:2])
    assert [e.alias for e in entries] == ["F0", "changed!", "F3"]
    assert cache.stat().st_mtime_ns != mtime
    saved = json.loads(cache.read_bytes())
    assert sorted(saved["files"]) == sorted(str(p.absolute()) for p in (paths[0], paths[1], paths[3]))
    reads.clear()
    assert [e.alias for e in LoraIndex([root], cache_file=cache).refresh()] == ["F0", "changed!", "F3"]
    assert reads == []


def test_unchanged_listing_does_not_rewrite_the_cache(tmp_path):
    root, cache = tmp_path / "Lora", tmp_path / "index.json"
    write(root / "a.safetensors")
    LoraIndex([root], cache_file=cache).refresh()
    os.utime(cache, ns=(1, 1))
    LoraIndex([root], cache_file=cache).refresh()
    assert cache.stat().st_mtime_ns == 1


@pytest.mark.parametrize(
    "content",
    [b"\x00\xff garbage", b"", b'{"hello": 1}', b"[1, 2, 3]", b'{"format": "lora_ext.library.index", "version": 2}',
     b'{"format": "lora_ext.library.index", "version": 2, "facts": [{"sd_version": "SD9"}], "files": {"x": {}}, '
     b'"sidecars": 5}',
     b'{"format": "lora_ext.library.index", "version": 999, "facts": [], "files": {}, "sidecars": {}}',
     b'{"format": "lora_ext.library.index", "version": 2, "facts": [], "files": {', b"[" * 100000,
     # version 1 (positional lists): another version, ignored
     b'{"format": "lora_ext.library.index", "version": 1, "facts": [["SD1", "keys", "x", "lora", 4, 1]], '
     b'"files": {}, "sidecars": {}}'],
)
def test_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path, monkeypatch, content):
    root, cache = tmp_path / "Lora", tmp_path / "index.json"
    write(root / "a.safetensors", metadata={"ss_output_name": "A"})
    cache.write_bytes(content)
    reads = _count_reads(monkeypatch)
    (e,) = LoraIndex([root], cache_file=cache).refresh()
    assert e.alias == "A" and len(reads) == 1
    saved = json.loads(cache.read_bytes())
    assert saved["format"] == "lora_ext.library.index" and list(saved["files"]) == [str(e.path)]


def test_cache_records_have_named_fields_and_a_version(tmp_path, monkeypatch):
    root, cache = tmp_path / "Lora", tmp_path / "index.json"
    path = write(root / "a.safetensors", metadata={"ss_output_name": "A", "sshs_model_hash": "cd" * 32})
    LoraIndex([root], cache_file=cache).refresh()
    saved = json.loads(cache.read_bytes())
    assert saved["version"] == 2
    st = os.stat(path)
    rec = saved["files"][str(path.absolute())]
    assert rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "alias": "A", "sshs": "cd" * 32, "facts": 0}
    reads = _count_reads(monkeypatch)
    (e,) = LoraIndex([root], cache_file=cache).refresh()  # the fields left out read back as their defaults
    assert reads == [] and (e.alias, e.shorthash, e.problems) == ("A", "cd" * 6, ())
    assert set(saved["facts"][0]) == {"sd_version", "sd_version_source", "sd_version_evidence", "algorithm", "rank",
                                      "n_modules"}


def test_a_wrong_record_is_dropped_and_only_that_file_is_reread(tmp_path, monkeypatch):
    root, cache = tmp_path / "Lora", tmp_path / "index.json"
    write(root / "a.safetensors")
    write(root / "b.safetensors")
    LoraIndex([root], cache_file=cache).refresh()
    saved = json.loads(cache.read_bytes())
    saved["files"][str((root / "b.safetensors").absolute())]["size"] = "not a size"
    cache.write_text(json.dumps(saved))
    reads = _count_reads(monkeypatch)
    assert len(LoraIndex([root], cache_file=cache).refresh()) == 2
    assert reads == [str((root / "b.safetensors").absolute())]


def test_unwritable_cache_location_only_logs(tmp_path, caplog):
    root = tmp_path / "Lora"
    write(root / "a.safetensors")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    entries = LoraIndex([root], cache_file=blocker / "sub" / "index.json").refresh()
    assert len(entries) == 1 and "could not be written" in caplog.text


# ------------------------------------------------------------------------------------------------------ sidecars


def test_sidecar_json_preview_and_description(tmp_path):
    root = tmp_path / "Lora"
    card = {"description": "d", "sd version": "SD1", "activation text": "trigger", "preferred weight": 0.7,
            "negative text": "bad", "notes": "n"}
    for stem in ("a", "b", "c", "d", "e"):
        write(root / f"{stem}.safetensors")
    (root / "a.json").write_text(json.dumps(card), encoding="utf-8")
    (root / "a.preview.png").write_bytes(b"p")
    (root / "a.txt").write_text("about a")
    (root / "b.png").write_bytes(b"p")
    (root / "b.preview.png").write_bytes(b"p")  # for one extension A1111 tries <stem>.png first
    (root / "c.webp").write_bytes(b"p")
    (root / "c.description.txt").write_text("about c")
    (root / "d.json").write_text("{broken")
    (root / "e.json").write_text("[1, 2]")
    (root / "e.preview.png").mkdir()  # a folder is not a preview
    idx = LoraIndex([root])
    a, b, c, d, e = idx.refresh()
    assert a.user_metadata == card and a.preview == root.absolute() / "a.preview.png" and a.problems == ()
    assert a.description_file == root.absolute() / "a.txt"
    assert b.preview.name == "b.png" and b.user_metadata == {} and b.description_file is None
    assert c.preview.name == "c.webp" and c.description_file.name == "c.description.txt"
    assert d.user_metadata == {} and len(d.problems) == 1 and str(root.absolute() / "d.json") in d.problems[0]
    assert "JSON" in d.problems[0]
    assert e.user_metadata == {} and "object" in e.problems[0] and e.preview is None
    # a sidecar edit is picked up by the next refresh
    (root / "d.json").write_text(json.dumps({"notes": "fixed"}))
    os.utime(root / "d.json", ns=(d.mtime_ns + 10**9,) * 2)
    assert idx.refresh()[3].user_metadata == {"notes": "fixed"} and idx.get("d").problems == ()
    assert LoraIndex([root], preview_extensions=("webp", "png")).refresh()[1].preview.name == "b.png"


def test_metadata_is_read_lazily_from_the_header(tmp_path, monkeypatch):
    root = tmp_path / "Lora"
    meta = {"ss_output_name": "M", "ss_tag_frequency": json.dumps({"x": {"tag": 3}}), "unicode": "ünï"}
    write(root / "m.safetensors", metadata=meta)
    cache = tmp_path / "index.json"
    LoraIndex([root], cache_file=cache).refresh()
    assert "ss_tag_frequency" not in cache.read_text()  # the cache keeps facts, not the metadata
    reads = _count_reads(monkeypatch)
    (e,) = LoraIndex([root], cache_file=cache).refresh()
    assert reads == []
    assert e.metadata == meta and len(reads) == 1
    assert e.metadata == meta and len(reads) == 1  # read once


def test_entry_for_path(tmp_path):
    root = tmp_path / "Lora"
    p = write(root / "sub" / "x.safetensors")
    idx = LoraIndex([root])
    assert idx.entry_for_path(p).relpath == "sub/x.safetensors"
    assert idx.entry_for_path(str(p)) == idx.get("x")
    assert idx.entry_for_path(tmp_path / "other.safetensors") is None


# ------------------------------------------------------------------------------------------------ thread safety


def test_concurrent_refresh_get_and_hash(tmp_path):
    root = tmp_path / "Lora"
    for i in range(30):
        write(root / f"d{i % 3}" / f"f{i}.safetensors", lora_tensors({SD1_TE: (768, 768)}),
              {"ss_output_name": f"A{i}"})
    idx = LoraIndex([root], cache_file=tmp_path / "index.json")
    errors: list[BaseException] = []
    rounds: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                snapshot = idx.entries()
                assert len(snapshot) == 30 and isinstance(snapshot, tuple)
                for i in (0, 7, 29):
                    assert idx.get(f"A{i}").name == f"f{i}" and idx.get(f"f{i}").alias == f"A{i}"
                rounds.append(1)
                time.sleep(0.0005)  # request threads, not spinning ones (which starve I/O-bound threads of the GIL)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def writer() -> None:
        try:
            for i in range(30):
                idx.refresh()
                idx.full_hash(idx.get(f"f{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads[3:]:
        t.join(timeout=60)
    stop.set()
    for t in threads[:3]:
        t.join(timeout=60)
    assert errors == [] and len(rounds) >= 3  # the readers really ran alongside the writers
    assert all(e.shorthash for e in idx.entries())
    assert all(e.shorthash for e in LoraIndex([root], cache_file=tmp_path / "index.json").entries())


def test_file_names_that_are_not_utf8_survive_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "Lora"
    write(root / "plain.safetensors")
    try:
        raw_name = os.path.join(os.fsencode(root), b"caf\xe9.safetensors")
        with open(raw_name, "wb") as f:
            f.write((root / "plain.safetensors").read_bytes())
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    cache = tmp_path / "index.json"
    first = LoraIndex([root], cache_file=cache).refresh()
    assert len(first) == 2 and json.loads(cache.read_bytes())["format"] == "lora_ext.library.index"
    reads = _count_reads(monkeypatch)
    again = LoraIndex([root], cache_file=cache)
    assert again.refresh() == first and again.get(os.fsdecode(b"caf\xe9")) is not None
    assert reads == []


def test_display_name_of_a_top_level_file_shadowed_by_a_subfolder_file(tmp_path):
    """A1111's later-wins rule gives "alpha" to sub/alpha; the top-level file must still get a name that reaches it."""
    root = tmp_path / "Lora"
    write(root / "alpha.safetensors")
    write(root / "sub" / "alpha.safetensors")
    idx = LoraIndex([root])
    idx.refresh()
    top = idx.entry_for_path(root / "alpha.safetensors")
    shown = idx.display_name(top)
    assert idx.get(shown) == top, shown
    assert idx.get("alpha") != top  # the bare name is taken by the subfolder file, as in A1111


def test_full_hash_without_persist_writes_the_cache_once_on_save(tmp_path, monkeypatch):
    root = tmp_path / "Lora"
    for i in range(3):
        write(root / f"f{i}.safetensors")
    cache = tmp_path / "cache.json"
    idx = LoraIndex([root], cache_file=cache)
    entries = idx.refresh()
    writes = []
    real = cache_mod.write_bytes_atomic
    monkeypatch.setattr(cache_mod, "write_bytes_atomic", lambda *a, **k: writes.append(a[0]) or real(*a, **k))
    hashes = [idx.full_hash(e, persist=False) for e in entries]
    assert writes == []
    idx.save()
    assert writes == [cache]
    again = LoraIndex([root], cache_file=cache)  # a new process sees the hashes
    assert sorted(e.shorthash for e in again.refresh()) == sorted(h[:12] for h in hashes)
