"""`merge-model`: write a checkpoint with LoRAs merged in, bit for bit the weights the patcher gives the same tags.

The checkpoint is streamed: each tensor is read from the file, merged when a LoRA touches it (with the patcher's own
arithmetic, `lora_ext.patch.patcher.merge_weight`), and written at once; tensors no LoRA touches are copied byte for
byte (or cast, with `dtype`). Peak memory is about one tensor plus the LoRAs. Layouts: a single file (A1111/LDM/SGM,
SD1/SD2/SDXL) gives a single file, a diffusers folder gives a folder; the output is written atomically (temporary
file or folder, verified, then renamed) and never replaces an existing one unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from lora_ext.errors import LoraFileError, ModelLoadError
from lora_ext.formats.hashes import lora_short_hash
from lora_ext.formats.network import load_lora
from lora_ext.formats.safetensors_io import fsync_dir
from lora_ext.formats.safetensors_stream import DTYPE_NAMES, FLOAT_NAMES, Entry, StreamWriter, TensorFile, tensor_bytes
from lora_ext.patch.patcher import ActiveLora, Patcher, max_abs_of, merge_bias, merge_weight
from lora_ext.prompt import LoraRef
from lora_ext.session import active_lora
from lora_ext.tools.common import ToolError, check_output, dtype_arg
from lora_ext.tools.model_files import ModelFiles, Place, open_model

MERGE_METADATA_KEY = "lora_ext.merged_loras"

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, what)


@dataclass(frozen=True)
class LoraInput:
    """A LoRA to merge: its file and the tag arguments (te/unet multipliers, dyn, lbw) as a parsed tag."""

    path: Path
    ref: LoraRef


@dataclass
class MergeReport:
    out: Path
    arch: str
    layout: str
    loras: list[dict] = field(default_factory=list)
    tensors_merged: int = 0
    tensors_total: int = 0
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_written: int = 0
    sidecars: list[str] = field(default_factory=list)  # files copied next to the output (the input's .yaml)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "out": str(self.out)}

    def lines(self) -> list[str]:
        out = [f"merged {len(self.loras)} LoRA(s) into {self.tensors_merged} of {self.tensors_total} tensors "
               f"({self.arch}, {self.layout}) in {self.seconds:.1f} s"]
        for lora in self.loras:
            out.append(f"  {lora['name']} te={lora['te']:g} unet={lora['unet']:g}"
                       + (f" lbw={lora['lbw']}" if lora.get("lbw") else "") + f"  [{lora['shorthash']}]")
        for name, keys in self.unmatched.items():
            out.append(f"  warning: {name}: {len(keys)} modules match no layer of this model (e.g. {keys[0]})")
        out.append(f"wrote {self.out}")
        return out


_Work = dict[tuple[Path, str], tuple[str, list]]  # (file, key) -> ("weight"|"bias", contributions)


def plan_merge(files: ModelFiles, loras: Sequence[ActiveLora]) -> tuple[_Work, dict[str, list[str]]]:
    """What to write where: the patcher's own plan (all its checks), keyed by stored tensor instead of module."""
    patcher = Patcher(files.adapter)
    report, _, weight_work, bias_work = patcher.plan(loras)
    unmatched = {n.name: list(n.unmatched) for n in report.networks if n.unmatched}
    work: _Work = {}
    holders: dict[tuple[Path, str], torch.nn.Module] = {}
    for what, table in (("weight", weight_work), ("bias", bias_work)):
        for contribs in table.values():
            target = contribs[0].target
            attr = target.weight_attr if what == "weight" else target.bias_attr
            place = files.place_of(target.module, attr)
            cs = contribs if place.chunk is None else [_as_chunk(c, files, place, holders) for c in contribs]
            entry = work.setdefault((place.file, place.key), (what, []))
            entry[1].extend(cs)
    return work, unmatched


def _as_chunk(c, files: ModelFiles, place: Place, holders: dict) -> object:
    """The contribution re-targeted at its third of a fused OpenCLIP in_proj weight (as A1111's model holds it)."""
    weight_place = files.place_of(c.target.module, c.target.weight_attr)
    key = (weight_place.file, weight_place.key)
    holder = holders.get(key)
    if holder is None:
        holder = torch.nn.Module()
        shape = files.headers[weight_place.file].tensors[weight_place.key].shape
        holder.register_parameter("weight", torch.nn.Parameter(torch.empty(shape, device="meta"), False))
        holders[key] = holder
    target = dataclasses.replace(c.target, module=holder, weight_attr="weight", chunk=place.chunk)
    return dataclasses.replace(c, target=target)


def merge_model(model: str | Path, loras: Sequence[LoraInput], out: str | Path, *, dtype: str | None = None,
                overwrite: bool = False, allowed_dirs: Sequence[Path] | None = None,
                progress: Progress | None = None) -> MergeReport:
    """Merge `loras` (in order, with their tag multipliers) into the checkpoint `model`, write `out`."""
    t0 = time.perf_counter()
    files = open_model(model)
    out = Path(out)
    if files.layout == "single-file" and out.suffix.lower() != ".safetensors":
        raise ToolError(f"{out}: a merged single-file checkpoint is written as .safetensors; name it *.safetensors")
    check_output(out, overwrite=overwrite, allowed_dirs=allowed_dirs, folder=files.layout == "diffusers")
    if out.resolve() == files.path.resolve():
        raise ToolError(f"{out}: the output would replace the input checkpoint; choose another name")
    want_dtype = dtype_arg(dtype)
    if not loras:
        raise ToolError("no LoRA given: name at least one with --lora NAME[:WEIGHT]")
    actives, described = [], []
    for item in loras:
        net = load_lora(item.path, name=item.ref.name)
        actives.append(active_lora(net, item.ref))
        described.append({"name": item.ref.name, "file": item.path.name, "shorthash": lora_short_hash(item.path),
                          "te": item.ref.te, "unet": item.ref.unet, "dyn": item.ref.dyn,
                          "lbw": str(item.ref.lbw) if item.ref.lbw is not None else None, "tag": item.ref.to_tag()})
    work, unmatched = plan_merge(files, actives)
    report = MergeReport(out=out, arch=files.arch, layout=files.layout, loras=described, unmatched=unmatched,
                         tensors_total=sum(len(h.tensors) for h in files.headers.values()))
    report.tensors_merged = len(work)
    meta_value = json.dumps({"base": files.path.name, "loras": described, "dtype": dtype}, ensure_ascii=False)
    total = files.nbytes
    done = [0]

    def tick(n: int, what: str) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total, what)

    checks: dict[tuple[Path, str], int] = {}
    if files.layout == "single-file":
        meta = dict(files.metadata)
        meta[MERGE_METADATA_KEY] = meta_value
        if "modelspec.title" in meta:  # modelspec (sai): the merged model is a model of its own
            meta["modelspec.title"] = out.stem
            merged = ", ".join(f"{d['name']} ({d['tag']})" for d in described)
            old = meta.get("modelspec.description", "")
            meta["modelspec.description"] = (old + "\n\n" if old else "") + f"LoRAs merged by lora_ext: {merged}"
        _stream_file(files, files.path, out, work, want_dtype, meta, overwrite, tick, checks,
                     verify=lambda tmp: _verify_single(files, tmp, checks))
        report.bytes_written = out.stat().st_size
        report.sidecars = _copy_sidecars(files.path, out, overwrite)
    else:
        report.bytes_written = _merge_folder(files, out, work, want_dtype, meta_value, overwrite, tick, checks)
    report.seconds = time.perf_counter() - t0
    return report


def _stream_file(files: ModelFiles, src: Path, dst: Path, work: _Work, want_dtype: torch.dtype | None,
                 metadata: dict[str, str] | None, overwrite: bool, tick: Callable[[int, str], None],
                 checks: dict, verify: Callable[[Path], None] | None = None, atomic: bool = True) -> None:
    """Write `src` to `dst` tensor by tensor: merged where `work` says, cast to `want_dtype` (floating tensors), else
    the bytes as they are. `atomic`: a temporary file verified and renamed; else written in place (inside a folder
    that is itself built aside)."""
    cast = DTYPE_NAMES[want_dtype] if want_dtype is not None else None
    with TensorFile(src, files.headers.get(src)) as tf:
        infos = tf.header.tensors
        entries = [Entry(k, cast if cast and infos[k].dtype in FLOAT_NAMES else infos[k].dtype, tuple(infos[k].shape))
                   for k in tf.keys]

        def produce(fh: BinaryIO, entry: Entry) -> None:
            info = infos[entry.key]
            job = work.get((src, entry.key))
            if job is None and entry.dtype == info.dtype:
                tf.copy_bytes(entry.key, fh)
            else:
                t = tf.tensor(entry.key)
                if entry.dtype != info.dtype:
                    t = t.to(want_dtype)
                if job is not None:
                    what, contribs = job
                    merged = t.clone()
                    if what == "weight":
                        merge_weight(merged, t, contribs, max_abs_of(t))
                    else:
                        merge_bias(merged, t, contribs)
                    t = merged
                data = tensor_bytes(t)
                if job is not None:
                    checks[(src, entry.key)] = zlib.crc32(data)
                fh.write(data)
            tick(info.nbytes, entry.key)

        writer = StreamWriter(dst, entries, metadata, overwrite=overwrite)
        if atomic:
            writer.write(produce, verify)
        else:
            with open(dst, "wb") as fh:
                writer.write_into(fh, produce)
                os.fsync(fh.fileno())


SIDECAR_SUFFIXES = (".yaml", ".open_clip.json")  # what A1111 (and our loader) read next to an unusual checkpoint


def _copy_sidecars(src: Path, out: Path, overwrite: bool) -> list[str]:
    """The input's sidecar config files, next to the output under its name: the merged checkpoint loads as the base
    did (A1111 reads <name>.yaml for models it cannot tell from their keys)."""
    from lora_ext.formats.safetensors_io import write_bytes_atomic

    copied = []
    for suffix in SIDECAR_SUFFIXES:
        side = src.with_name(src.stem + suffix)
        if side.is_file():
            dst = out.with_name(out.stem + suffix)
            if dst.exists() and not overwrite:
                continue
            write_bytes_atomic(dst, side.read_bytes(), overwrite=overwrite)
            copied.append(str(dst))
    return copied


def _verify_crcs(path: Path, crcs: dict[str, int]) -> None:
    """Read the merged tensors of a written file back: their bytes must be what was computed."""
    with TensorFile(path) as tf:
        for key, crc in crcs.items():
            if zlib.crc32(tensor_bytes(tf.tensor(key))) != crc:
                raise ModelLoadError(f"{path} [{key}]: the merged tensor read back differs from what was written "
                                     "(disk or memory error); nothing was kept")


def _verify_single(files: ModelFiles, tmp: Path, checks: dict) -> None:
    from lora_ext.tools.model_files import _open_single_file

    _verify_crcs(tmp, {k: v for (_, k), v in checks.items()})
    back = _open_single_file(tmp, like=files.path)
    if back.arch != files.arch:
        raise ModelLoadError(f"internal error: the merged file reads back as {back.arch}, not {files.arch}")


def _merge_folder(files: ModelFiles, out: Path, work: _Work, want_dtype: torch.dtype | None, meta_value: str,
                  overwrite: bool, tick: Callable[[int, str], None], checks: dict) -> int:
    """A diffusers folder: every .safetensors streamed (merged where needed), the other files copied; built in a
    temporary sibling folder, verified, then renamed into place."""
    src_root = files.path
    parent = out.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    written = 0
    try:
        for path in sorted(src_root.rglob("*")):
            rel = path.relative_to(src_root)
            dst = tmp / rel
            if path.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors" and (path in files.headers or want_dtype is not None):
                if path not in files.headers:
                    from lora_ext.tools.model_files import _header

                    files.headers[path] = _header(path)
                meta = dict(files.headers[path].metadata)
                if path.parent.name in ("unet", "text_encoder", "text_encoder_2"):
                    meta[MERGE_METADATA_KEY] = meta_value
                _stream_file(files, path, dst, work, want_dtype, meta, True, tick, checks, atomic=False)
                _verify_crcs(dst, {k: v for (f, k), v in checks.items() if f == path})
            else:  # configs, tokenizer, scheduler, shard indexes (names and keys do not change)
                shutil.copyfile(path, dst)
            written += dst.stat().st_size
        back = open_model(tmp)
        if back.arch != files.arch:
            raise ModelLoadError(f"internal error: the merged folder reads back as {back.arch}, not {files.arch}")
        if out.exists():
            if not overwrite:
                raise ToolError(f"{out}: already exists; choose another name or pass --force")
            old = parent / f".{out.name}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise LoraFileError(out, f"writing failed: {exc}", hint="nothing was written; check the disk") from exc
        raise
    return written
