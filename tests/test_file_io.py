"""LoRA file I/O: safetensors header validation, safe legacy loading, atomic writes, metadata and hashes.

Every broken or hostile file is generated here under tmp_path (no binaries in the repository). Expected values come
from independent computation: the bytes are parsed / hashed by hand with struct, json and hashlib, the reference
`safetensors` library is the oracle for what a valid file is, and A1111 / sd-scripts rules are written out from
their documented behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import stat
import struct
import zipfile
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ext.errors import LoraFileError, UnsafeFileError
from lora_ext.formats import hashes
from lora_ext.formats.hashes import (
    addnet_hash_safetensors,
    legacy_hash,
    lora_short_hash,
    sha256_file,
    sshs_hashes_for,
)
from lora_ext.formats.legacy import load_any, load_legacy
from lora_ext.formats.metadata import (
    a1111_sd_version,
    base_model_from_metadata,
    metadata_summary,
    parse_metadata,
    tag_frequency,
)
from lora_ext.formats.safetensors_io import (
    SafetensorsHeader,
    TensorInfo,
    load_tensors,
    read_compact_header,
    read_header,
    read_metadata,
    save_safetensors_atomic,
    write_bytes_atomic,
)

# ------------------------------------------------------------------------------------------------------ helpers


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", declared_len: int | None = None) -> Path:
    """Hand-assemble a safetensors file: u64 LE length, header bytes, data."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    n = len(hb) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g).half(),
        "lora_unet_a.alpha": torch.tensor(4.0),
        "lora_te_b.lora_down.weight": torch.randn(2, 3, 3, 3, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 5),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def _library_rejects(path: Path) -> bool:
    try:
        safetensors.torch.load_file(str(path))
    except Exception:
        return True
    return False


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ reading: valid


def test_read_header_matches_hand_parsed_bytes(tmp_path):
    tensors = _sample_tensors()
    meta = {"ss_network_dim": "4", "ss_tag_frequency": '{"d": {"cat": 2}}'}
    path = tmp_path / "ok.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=meta)

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hand = json.loads(raw[8 : 8 + n])
    hand_meta = hand.pop("__metadata__")

    h = read_header(path)
    assert isinstance(h, SafetensorsHeader)
    assert h.path == path and h.header_size == n and h.file_size == len(raw) and h.data_start == 8 + n
    assert h.metadata == hand_meta == meta
    assert h.tensors == {
        k: TensorInfo(dtype=v["dtype"], shape=tuple(v["shape"]), data_offsets=tuple(v["data_offsets"]))
        for k, v in hand.items()
    }
    assert h.tensors["lora_unet_a.lora_up.weight"].dtype == "F16"
    assert h.tensors["lora_te_b.lora_down.weight"].shape == (2, 3, 3, 3)
    assert h.tensors["empty"].nbytes == 0


def test_load_tensors_roundtrip_subset_and_missing_key(tmp_path):
    tensors = _sample_tensors()
    path = tmp_path / "ok.safetensors"
    safetensors.torch.save_file(tensors, str(path))

    loaded = load_tensors(path)
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k

    header = read_header(path)
    some = load_tensors(path, keys=["lora_unet_a.alpha"], header=header)
    assert list(some) == ["lora_unet_a.alpha"] and some["lora_unet_a.alpha"].item() == 4.0

    with pytest.raises(LoraFileError) as ei:
        load_tensors(path, keys=["nope"])
    assert ei.value.key == "nope" and str(path) in str(ei.value)


def test_load_tensors_detects_file_changed_after_header(tmp_path):
    path = tmp_path / "ok.safetensors"
    safetensors.torch.save_file({"a": torch.ones(4)}, str(path))
    header = read_header(path)
    safetensors.torch.save_file({"a": torch.ones(8)}, str(path))
    with pytest.raises(LoraFileError, match="changed"):
        load_tensors(path, header=header)


def test_header_allows_leading_space_and_null_metadata_like_the_library(tmp_path):
    hb = b' {"__metadata__": null, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}   '
    path = _raw_file(tmp_path / "ws.safetensors", hb, struct.pack("<f", 1.5))
    assert not _library_rejects(path)
    h = read_header(path)
    assert h.metadata == {} and h.tensors["a"].shape == (1,)
    assert load_tensors(path)["a"].item() == 1.5


# ------------------------------------------------------------------------------------- reading: hostile corpus

F32x2 = _entry("F32", [2], 0, 8)

# (name, header (dict/bytes), data, declared header length or None, reason substring, key, library also rejects)
CORRUPT_SAFETENSORS = [
    ("header_json_not_json", b"{this is not json}", b"", None, "not valid JSON", "header", True),
    ("header_json_array", b"[1, 2, 3]", b"", None, "not an object", "header", True),
    ("header_bad_utf8", b'{"a\xff\xfe": 1}', b"", None, "not valid UTF-8", "header", True),
    ("header_len_past_eof", {"a": F32x2}, b"\0" * 8, 4096, "larger than", "header", True),
    ("header_len_huge", {"a": F32x2}, b"\0" * 8, 2**60, "exceeds", "header", True),
    ("unknown_dtype", {"w": _entry("F17", [2], 0, 8)}, b"\0" * 8, None, "unknown dtype", "w", True),
    ("dtype_not_str", {"w": _entry(32, [2], 0, 8)}, b"\0" * 8, None, "unknown dtype", "w", True),
    ("negative_offset", {"w": _entry("F32", [2], -8, 0)}, b"\0" * 8, None, "non-negative", "w", True),
    ("offsets_reversed", {"w": _entry("F32", [0], 8, 0)}, b"\0" * 8, None, "before begin", "w", True),
    ("offsets_not_pair", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, None, "pair", "w",
     True),
    ("offset_out_of_range", {"w": _entry("F32", [2], 100, 108)}, b"\0" * 8, None, "past the end", "w", True),
    ("overlap", {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, b"\0" * 12, None, "overlaps", "b",
     True),
    ("gap", {"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, b"\0" * 12, None, "unused bytes", "b",
     True),
    ("trailing_bytes", {"a": F32x2}, b"\0" * 16, None, "belong to no tensor", "header", True),
    ("shape_disagrees", {"w": _entry("F32", [3], 0, 8)}, b"\0" * 8, None, "needs 12 bytes", "w", True),
    ("shape_negative", {"w": _entry("F32", [-2], 0, 8)}, b"\0" * 8, None, "non-negative integers", "w", True),
    ("shape_float", {"w": _entry("F32", [2.0], 0, 8)}, b"\0" * 8, None, "non-negative integers", "w", True),
    ("shape_bool", {"w": _entry("U8", [True], 0, 1)}, b"\0", None, "non-negative integers", "w", True),
    ("missing_field", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "data_offsets", "w", True),
    ("entry_not_object", {"w": [1, 2]}, b"", None, "not an object", "w", True),
    ("metadata_non_str", {"__metadata__": {"ss_network_dim": 4}, "a": F32x2}, b"\0" * 8, None, "must be a string",
     "__metadata__.ss_network_dim", True),
    ("metadata_array", {"__metadata__": ["x"], "a": F32x2}, b"\0" * 8, None, "metadata is a JSON array",
     "__metadata__", True),
    ("deeply_nested", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "not valid JSON", "header",
     True),
    ("huge_integer", b'{"a": {"dtype": "U8", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 1]}}', b"\0",
     None, "not valid JSON", "header", True),
    ("duplicate_key", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": '
     b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "twice", "a", False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "header", "data", "declared", "reason", "key", "library_rejects"),
    CORRUPT_SAFETENSORS,
    ids=[c[0] for c in CORRUPT_SAFETENSORS],
)
def test_corrupt_safetensors_raise_typed_error(tmp_path, name, header, data, declared, reason, key, library_rejects):
    path = _raw_file(tmp_path / f"{name}.safetensors", header, data, declared)
    # the reference library agrees that the file is invalid (the duplicate key is our stricter rule)
    assert _library_rejects(path) is library_rejects
    for call in (read_header, load_tensors, load_any):
        with pytest.raises(LoraFileError) as ei:
            call(path)
        err = ei.value
        assert type(err) is LoraFileError, call
        assert err.path == str(path) and str(path) in str(err)
        assert reason in err.reason, (call, err.reason)
        assert err.key == key
        assert err.hint


@pytest.mark.parametrize("with_metadata", [True, False])
def test_compact_reader_matches_hand_parsed_bytes(tmp_path, with_metadata):
    """The listing's fast reader: metadata, keys in file order and shapes as the bytes say (the library's layout)."""
    meta = {"ss_network_dim": "4", "unicode": "\u00fcn\u00ef", "ss_tag_frequency": '{"d": {"cat": 2}}'}
    path = tmp_path / "ok.safetensors"
    safetensors.torch.save_file(_sample_tensors(), str(path), metadata=meta if with_metadata else None)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hand = json.loads(raw[8 : 8 + n])
    hand_meta = hand.pop("__metadata__", {})
    header = read_compact_header(path, len(raw))
    assert header is not None and header.metadata == hand_meta == (meta if with_metadata else {})
    assert header.keys() == list(hand)
    assert {k: header.shape(k) for k in hand} == {k: tuple(v["shape"]) for k, v in hand.items()}
    assert read_metadata(path) == hand_meta
    # the same tensors under other metadata (other padding): the same layout; other shapes: another
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(_sample_tensors(), str(other), metadata={"x": "y" * 51} if with_metadata else None)
    assert read_compact_header(other, other.stat().st_size).layout == header.layout
    safetensors.torch.save_file({**_sample_tensors(), "empty": torch.zeros(0, 6)}, str(other))
    assert read_compact_header(other, other.stat().st_size).layout != header.layout


def test_compact_reader_leaves_other_layouts_to_the_full_reader(tmp_path):
    tensors = {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 8, 12)}
    spaced = _raw_file(tmp_path / "spaced.safetensors", {"__metadata__": {"k": "v"}, **tensors}, b"\0" * 12)
    header = read_compact_header(spaced, spaced.stat().st_size)
    assert header is None or header.keys() is None  # spaces: not the compact layout
    assert read_metadata(spaced) == read_header(spaced).metadata == {"k": "v"}
    meta_last = _raw_file(tmp_path / "last.safetensors", json.dumps({**tensors, "__metadata__": {"k": "v"}},
                                                                    separators=(",", ":")).encode(), b"\0" * 12)
    assert read_compact_header(meta_last, meta_last.stat().st_size) is None
    assert read_metadata(meta_last) == {"k": "v"}


_FRAMING_AND_METADATA = ("header_json_array", "header_bad_utf8", "header_len_past_eof", "header_len_huge",
                         "trailing_bytes", "metadata_non_str", "metadata_array")


@pytest.mark.parametrize("case", [c for c in CORRUPT_SAFETENSORS if c[0] in _FRAMING_AND_METADATA], ids=lambda c: c[0])
def test_compact_reader_refuses_what_read_header_refuses_in_what_it_reads(tmp_path, case):
    """The fast reader shares read_header's rules for framing, metadata and where the data ends: it returns None
    (and the caller's fall-back to read_header names the problem)."""
    name, header, data, declared, *_ = case
    compact = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    path = _raw_file(tmp_path / f"{name}.safetensors", compact, data, declared)
    with pytest.raises(LoraFileError):
        read_header(path)
    assert read_compact_header(path, path.stat().st_size) is None


@pytest.mark.parametrize("size", [0, 5])
def test_too_short_files(tmp_path, size):
    path = tmp_path / f"short{size}.safetensors"
    path.write_bytes(b"\x07" * size)
    with pytest.raises(LoraFileError, match="too short") as ei:
        read_header(path)
    assert str(path) in str(ei.value) and f"{size} bytes" in str(ei.value)


def test_truncated_tensor_data(tmp_path):
    path = tmp_path / "trunc.safetensors"
    safetensors.torch.save_file({"a": torch.ones(16), "b": torch.ones(16)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    assert _library_rejects(path)
    with pytest.raises(LoraFileError, match="past the end") as ei:
        load_tensors(path)
    assert ei.value.key == "b" and "damaged" in str(ei.value)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pytorch_file_named_safetensors_gets_a_rename_hint(tmp_path, zip_format):
    path = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(LoraFileError, match="rename it to .pt"):
        read_header(path)
    tensors, _ = load_any(path.rename(tmp_path / "renamed.pt"))
    assert torch.equal(tensors["w"], torch.ones(2))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoraFileError, match="not found"):
        read_header(tmp_path / "nope.safetensors")
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(LoraFileError, match="not a regular file"):
        read_header(d)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzzed_files_fail_typed_or_load_like_the_library(tmp_path, edits, cut):
    """Random byte edits/truncations: our reader raises LoraFileError exactly when the reference library refuses the
    file (bar duplicate keys), and otherwise loads what the library loads (same keys, dtypes, bytes)."""
    path = tmp_path / "fuzz.safetensors"
    safetensors.torch.save_file(
        {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.float16)},
        str(path),
        metadata={"k": "v"},
    )
    raw = bytearray(path.read_bytes())
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    path.write_bytes(bytes(raw))
    try:
        ours = load_tensors(path)
    except LoraFileError as err:
        assert "twice" in err.reason or _library_rejects(path), err  # stricter only about duplicate keys
        return
    ref = safetensors.torch.load_file(str(path))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8))


# -------------------------------------------------------------------------------------------- legacy pickles


class _Exploit:
    """Unpickling this runs os.system; it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'echo pwned > "{self.marker}"',))


def _pickle_globals(data: bytes) -> set[str]:
    """Globals a pickle references (read with pickletools, nothing is executed)."""
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
    return found


OS_SYSTEM = f"{os.system.__module__}.{os.system.__name__}"  # posix.system / nt.system


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_raw_pickle_exploit_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "marker.txt"
    data = pickle.dumps({"w": _Exploit(marker)}, protocol=protocol)
    assert OS_SYSTEM in _pickle_globals(data)  # the payload is real
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    with pytest.raises(UnsafeFileError) as ei:
        load_legacy(path)
    assert str(path) in str(ei.value) and ".safetensors" in str(ei.value)
    if protocol == 2:
        assert ei.value.key == OS_SYSTEM and OS_SYSTEM in str(ei.value)
    assert not marker.exists()


def test_torch_zip_with_exploit_is_refused_and_names_the_global(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Exploit(marker)}, path)
    for call in (load_legacy, load_any):
        with pytest.raises(UnsafeFileError) as ei:
            call(path)
        assert ei.value.key == OS_SYSTEM
        assert str(path) in str(ei.value) and OS_SYSTEM in str(ei.value) and "safetensors" in str(ei.value)
    assert not marker.exists()


def test_other_non_weight_objects_are_refused(tmp_path):
    import argparse

    path = tmp_path / "ns.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UnsafeFileError) as ei:
        load_legacy(path)
    assert ei.value.key == "argparse.Namespace"


@pytest.mark.parametrize("zip_format", [True, False])
def test_plain_tensor_pt_loads(tmp_path, zip_format):
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.alpha": torch.tensor(1.0)}
    path = tmp_path / "plain.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    loaded, meta = load_legacy(path)
    assert meta == {} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    loaded2, _ = load_any(path)
    assert torch.equal(loaded2["lora_unet_x.lora_down.weight"], tensors["lora_unet_x.lora_down.weight"])


def test_ckpt_with_nested_state_dict_is_unwrapped(tmp_path):
    sd = {"lora_unet_x.lora_down.weight": torch.randn(2, 3), "lora_unet_x.lora_up.weight": torch.randn(3, 2)}
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 120, "name": "run1", "lrs": [0.1, 0.01]}, path)
    loaded, meta = load_legacy(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert meta == {"epoch": "3", "global_step": "120", "name": "run1", "lrs": "[0.1, 0.01]"}


def test_absurdly_nested_dicts_fail_typed(tmp_path):
    """The safe unpickler builds nesting of any depth without recursion; walking it must not hit RecursionError."""
    base = tmp_path / "base.pt"
    torch.save({"x": 1}, base)
    depth = 5000  # protocol-2 pickle of {"w": 1, "d": {"d": {... {} ...}}}, written opcode by opcode
    deep_pickle = b"\x80\x02}X\x01\x00\x00\x00wK\x01s" + b"X\x01\x00\x00\x00d}" * depth + b"s" * depth + b"."
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            zout.writestr(name, deep_pickle if name.endswith("/data.pkl") else zin.read(name))
    assert torch.load(path, weights_only=True)["w"] == 1  # torch accepts the file
    with pytest.raises(LoraFileError, match="no tensors"):
        load_legacy(path)


def test_model_wrapper_and_nested_dicts_are_flattened(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"model": {"a": {"weight": torch.ones(1)}, "b.weight": torch.zeros(1), "rank": 4}}, path)
    loaded, meta = load_legacy(path)
    assert sorted(loaded) == ["a.weight", "b.weight"] and meta == {"rank": "4"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"this is not a pickle nor a zip", "cannot read"),
        (None, "zip"),  # truncated torch zip
        ("list", "not a dict"),
        ("no_tensors", "no tensors"),
    ],
)
def test_broken_legacy_files(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif content == "list":
        torch.save([torch.ones(1)], path)
    elif content == "no_tensors":
        torch.save({"epoch": 1}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(LoraFileError) as ei:
        load_legacy(path)
    assert type(ei.value) is LoraFileError
    assert str(path) in str(ei.value) and reason in str(ei.value)


def test_load_any_dispatch(tmp_path):
    path = tmp_path / "x.SafeTensors"
    safetensors.torch.save_file({"a": torch.ones(3)}, str(path), metadata={"ss_v2": "False"})
    tensors, meta = load_any(path)
    assert torch.equal(tensors["a"], torch.ones(3)) and meta == {"ss_v2": "False"}

    other = tmp_path / "x.txt"
    other.write_bytes(path.read_bytes())
    with pytest.raises(LoraFileError, match="unknown file extension") as ei:
        load_any(other)
    assert str(other) in str(ei.value)


# ------------------------------------------------------------------------------------------------- atomic writes


def test_save_roundtrip_with_views_and_shared_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"full": base, "t": base.T, "row": base[1], "strided": base[:, ::2], "same": base}
    before = {k: v.clone() for k, v in tensors.items()}
    path = save_safetensors_atomic(tensors, tmp_path / "out.safetensors", metadata={"ss_network_dim": "4"})
    assert path == tmp_path / "out.safetensors" and _listing(tmp_path) == ["out.safetensors"]
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"ss_network_dim": "4"}
        for k, v in before.items():
            assert torch.equal(f.get_tensor(k), v), k
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)  # caller's tensors untouched
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_overwrite_replaces_and_keeps_mode(tmp_path):
    path = tmp_path / "out.safetensors"
    save_safetensors_atomic({"a": torch.ones(2)}, path)
    os.chmod(path, 0o640)
    save_safetensors_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(load_tensors(path)["a"], torch.zeros(2))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert _listing(tmp_path) == ["out.safetensors"]


def test_overwrite_false_refuses_existing(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(LoraFileError, match="already exists") as ei:
        save_safetensors_atomic({"a": torch.ones(2)}, path, overwrite=False)
    assert str(path) in str(ei.value)
    with pytest.raises(LoraFileError, match="already exists"):
        write_bytes_atomic(path, b"{}", overwrite=False)
    assert path.read_bytes() == b"precious" and _listing(tmp_path) == ["out.safetensors"]
    new = save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "new.safetensors", overwrite=False)
    assert torch.equal(load_tensors(new)["a"], torch.ones(2))


def test_overwrite_false_loses_no_race(tmp_path, monkeypatch):
    """A file that appears while we write (after the up-front check) is still not clobbered."""
    path = tmp_path / "out.safetensors"
    real_save = safetensors.torch.save_file

    def save_and_race(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        path.write_bytes(b"someone else")

    monkeypatch.setattr(safetensors.torch, "save_file", save_and_race)
    with pytest.raises(LoraFileError, match="already exists"):
        save_safetensors_atomic({"a": torch.ones(2)}, path, overwrite=False)
    assert path.read_bytes() == b"someone else" and _listing(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize(
    ("tensors", "metadata", "match"),
    [
        ({"a": torch.ones(2)}, {"ss_network_dim": 4}, "must be strings"),
        ({"a": torch.ones(2)}, {"ss_tags": ["x"]}, "must be strings"),
        ({"a": torch.empty(3, device="meta")}, None, "cannot be copied"),
        ({"a": [1.0, 2.0]}, None, "not a torch.Tensor"),
        ({"a": torch.ones(2).to_sparse()}, None, "to_dense"),
        ({"__metadata__": torch.ones(2)}, None, "reserved"),
    ],
)
def test_failing_save_leaves_nothing_and_keeps_old_file(tmp_path, tensors, metadata, match):
    old = tmp_path / "out.safetensors"
    old.write_bytes(b"old content")
    with pytest.raises(LoraFileError, match=match) as ei:
        save_safetensors_atomic(tensors, old, metadata=metadata)
    assert str(old) in str(ei.value)
    assert old.read_bytes() == b"old content" and _listing(tmp_path) == ["out.safetensors"]
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(LoraFileError):
        save_safetensors_atomic(tensors, fresh, metadata=metadata)
    assert _listing(tmp_path) == ["out.safetensors"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_cleans_the_temp_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old content")
    seen: list[str] = []

    def half_write(tensors, filename, metadata=None):
        seen.append(filename)
        Path(filename).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"')
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    expected = LoraFileError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_safetensors_atomic({"a": torch.ones(2)}, path)
    assert Path(seen[0]).parent == tmp_path  # the temp file was in the target's directory
    assert path.read_bytes() == b"old content" and _listing(tmp_path) == ["out.safetensors"]


def test_write_bytes_atomic(tmp_path):
    path = write_bytes_atomic(tmp_path / "x.json", b'{"a": 1}')
    assert json.loads(path.read_text()) == {"a": 1} and _listing(tmp_path) == ["x.json"]
    write_bytes_atomic(path, b"[]")
    assert path.read_bytes() == b"[]"
    with pytest.raises(LoraFileError, match="does not exist"):
        write_bytes_atomic(tmp_path / "missing" / "x.json", b"")
    with pytest.raises(TypeError):
        write_bytes_atomic(tmp_path / "y.json", "text")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- hashes


def _big_tensors() -> dict[str, torch.Tensor]:
    """> 1.1 MiB of data so the legacy hash window (1 MiB + 64 KiB) is inside the file."""
    g = torch.Generator().manual_seed(1)
    return {"b.weight": torch.randn(300_000, generator=g), "a.weight": torch.randn(4, 4, generator=g)}


def test_sha256_and_addnet_hash_by_hand(tmp_path):
    path = tmp_path / "h.safetensors"
    safetensors.torch.save_file(_big_tensors(), str(path), metadata={"ss_output_name": "h"})
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert sha256_file(path) == hashlib.sha256(raw).hexdigest()
    assert addnet_hash_safetensors(path) == hashlib.sha256(raw[8 + n :]).hexdigest()

    # editing metadata changes the file hash but not the addnet hash
    other = tmp_path / "h2.safetensors"
    safetensors.torch.save_file(_big_tensors(), str(other), metadata={"ss_output_name": "renamed", "x": "y"})
    assert sha256_file(other) != sha256_file(path)
    assert addnet_hash_safetensors(other) == addnet_hash_safetensors(path)


def test_legacy_hash_by_hand(tmp_path):
    path = tmp_path / "h.safetensors"
    safetensors.torch.save_file(_big_tensors(), str(path))
    raw = path.read_bytes()
    assert len(raw) > 0x110000
    assert legacy_hash(path) == hashlib.sha256(raw[1024 * 1024 : 1024 * 1024 + 64 * 1024]).hexdigest()[:8]
    small = tmp_path / "small.pt"
    small.write_bytes(b"x" * 1000)
    assert legacy_hash(small) == hashlib.sha256(b"").hexdigest()[:8]  # window past EOF: empty, as in A1111


def test_lora_short_hash_follows_a1111(tmp_path):
    tensors = {"a": torch.randn(64)}
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tensors, str(plain), metadata={"ss_network_dim": "4"})
    raw = plain.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    addnet12 = hashlib.sha256(raw[8 + n :]).hexdigest()[:12]
    assert lora_short_hash(plain, read_header(plain).metadata) == addnet12
    assert lora_short_hash(plain) == addnet12  # metadata read from the file

    stored = "0123456789abcdef" * 4
    tagged = tmp_path / "tagged.SAFETENSORS"
    safetensors.torch.save_file(tensors, str(tagged), metadata={"sshs_model_hash": stored})
    assert lora_short_hash(tagged) == "0123456789ab"
    assert lora_short_hash(tagged, {"sshs_model_hash": ""}) == addnet12  # empty value: fall back

    pt = tmp_path / "x.pt"
    torch.save(tensors, pt)
    whole12 = hashlib.sha256(pt.read_bytes()).hexdigest()[:12]
    assert lora_short_hash(pt, {"sshs_model_hash": stored}) == whole12  # metadata never consulted for .pt


def test_sshs_hashes_match_sd_scripts_rule(tmp_path):
    tensors = _big_tensors()
    metadata = {
        "ss_network_dim": "8",
        "ss_output_name": "x",
        "modelspec.title": "X",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "user_note": "edited later" * 50,
    }
    model_hash, legacy = sshs_hashes_for(tensors, metadata)

    # model hash: sha256 of the tensor data; all F32 here, so safetensors orders it by name: computed by hand
    by_hand = hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest()
    assert model_hash == by_hand

    # it equals the addnet hash of the final file, whatever extra metadata that file carries
    path = save_safetensors_atomic(
        tensors, tmp_path / "x.safetensors", {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    )
    assert addnet_hash_safetensors(path) == model_hash
    assert lora_short_hash(path) == model_hash[:12]

    # legacy hash: 64 KiB at 1 MiB of the file as written with only the ss_* metadata
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    ref = tmp_path / "ss_only.safetensors"
    safetensors.torch.save_file(tensors, str(ref), metadata=ss_only)
    raw = ref.read_bytes()
    assert legacy == hashlib.sha256(raw[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert legacy != hashes.legacy_hash(path)  # the non-ss_ metadata shifts the final file's bytes

    # insertion order and non-contiguous inputs do not matter
    shuffled = {"a.weight": tensors["a.weight"].T.contiguous().T, "b.weight": tensors["b.weight"]}
    assert sshs_hashes_for(shuffled, metadata) == (model_hash, legacy)


def test_hash_of_missing_file_is_typed(tmp_path):
    for fn in (sha256_file, addnet_hash_safetensors, legacy_hash):
        with pytest.raises(LoraFileError, match="not found"):
            fn(tmp_path / "gone.safetensors")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(LoraFileError, match="too short"):
        addnet_hash_safetensors(tiny)


# -------------------------------------------------------------------------------------------------- metadata


def test_parse_metadata():
    meta = {
        "obj": '{"a": {"b": 1}}',
        "arr": "[1, 2]",
        "bad": "{not json",
        "plain": "hello",
        "num": "1.5",
        "quoted": '"x"',
        "brace_str": "[a]",
    }
    assert parse_metadata(meta) == {
        "obj": {"a": {"b": 1}},
        "arr": [1, 2],
        "bad": "{not json",
        "plain": "hello",
        "num": "1.5",
        "quoted": '"x"',
        "brace_str": "[a]",
    }


@pytest.mark.parametrize(
    ("meta", "ours", "a1111"),
    [
        ({}, None, None),
        ({"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}, "sdxl", "sdxl"),
        ({"ss_v2": "True", "ss_network_dim": "4"}, "sd2", "sd2"),
        ({"ss_v2": "true"}, "sd1", "sd1"),  # A1111 compares with "True" exactly
        ({"ss_v2": "False", "ss_network_dim": "4"}, "sd1", "sd1"),
        ({"ss_base_model_version": "sd_v1"}, "sd1", "sd1"),
        ({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "sd2", "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl", "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2", "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1", "sd1"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, "sdxl-refiner", "sd1"),
        ({"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}, "flux", "sd1"),
        ({"format": "pt"}, None, "sd1"),  # diffusers' metadata says nothing about the base model
    ],
)
def test_base_model_from_metadata(meta, ours, a1111):
    assert base_model_from_metadata(meta) == ours
    assert a1111_sd_version(meta) == a1111


def test_tag_frequency_merges_dataset_dirs():
    meta = {"ss_tag_frequency": json.dumps({"10_cat": {"cat": 5, " blue sky": 2, "x": "bad"}, "5_dog": {"cat": 1}})}
    meta["ss_tag_frequency"] = meta["ss_tag_frequency"].replace('"bad"', '"3"')
    assert tag_frequency(meta) == {"cat": 6, "x": 3, "blue sky": 2}
    assert list(tag_frequency(meta)) == ["cat", "x", "blue sky"]
    assert tag_frequency({"ss_tag_frequency": "{broken"}) == {}
    assert tag_frequency({}) == {}
    assert tag_frequency(parse_metadata(meta)) == {"cat": 6, "x": 3, "blue sky": 2}


def test_metadata_summary_of_kohya_metadata():
    meta = {
        "ss_output_name": "mylora",
        "ss_sd_model_name": "v1-5-pruned.safetensors",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "16",
        "ss_network_alpha": "8.0",
        "ss_network_args": '{"conv_dim": "4", "conv_alpha": "1"}',
        "ss_learning_rate": "0.0001",
        "ss_steps": "1200",
        "ss_clip_skip": "None",
        "ss_resolution": "(512, 512)",
        "ss_training_started_at": "1700000000.5",
        "ss_dataset_dirs": '{"10_cat": {"n_repeats": 10, "img_count": 20}}',
        "ss_tag_frequency": '{"10_cat": {"cat": 20, "sitting": 3}}',
        "ss_bucket_info": '{"buckets": {"0": {"resolution": [512, 512], "count": 15},'
        ' "1": {"resolution": [448, 576], "count": 5}}, "mean_img_ar_error": 0.0}',
        "sshs_model_hash": "ab" * 32,
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.thumbnail": "data:image/png;base64," + "A" * 1000,
    }
    s = metadata_summary(meta)
    assert s["output_name"] == "mylora" and s["base_model"] == "sd1"
    assert s["network_module"] == "networks.lora" and s["network_dim"] == 16 and s["network_alpha"] == 8.0
    assert s["network_args"] == {"conv_dim": "4", "conv_alpha": "1"}
    assert s["learning_rate"] == 1e-4 and s["steps"] == 1200 and "clip_skip" not in s
    assert s["resolution"] == "(512, 512)"
    assert s["trained_at"] == "2023-11-14T22:13:20+00:00"
    assert s["dataset_dirs"] == {"10_cat": {"n_repeats": 10, "img_count": 20}}
    assert s["top_tags"] == {"cat": 20, "sitting": 3} and s["tag_count"] == 2
    assert s["bucket_resolutions"] == {"512x512": 15, "448x576": 5}
    assert s["modelspec"]["architecture"] == "stable-diffusion-v1/lora"
    assert s["modelspec"]["thumbnail"] == f"<{len(meta['modelspec.thumbnail'])} characters>"
    assert s["sshs_model_hash"] == "ab" * 32 and s["num_metadata_keys"] == len(meta)
    assert metadata_summary({}) == {"num_metadata_keys": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_save_and_load(tmp_path):
    tensors = {"a": torch.randn(3, 4, device="cuda"), "b": torch.randn(4, 3, device="cuda").T}
    path = save_safetensors_atomic(tensors, tmp_path / "gpu.safetensors")
    loaded = load_tensors(path, device="cuda:0")
    assert all(loaded[k].is_cuda and torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert sshs_hashes_for(tensors, None)[0] == addnet_hash_safetensors(path)
