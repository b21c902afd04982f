"""A Stable Diffusion checkpoint seen as files: its family, a key map of its layers, and where each weight is stored.

`open_model` reads only headers and configs. It builds the model's diffusers module tree on the `meta` device (no
memory) and the same key map the standalone host patches (`adapter_for_pipeline`), then finds, for every patchable
weight, the file, tensor key and (for OpenCLIP's fused q/k/v `in_proj_weight`) the third of the rows that holds it:
- single file (A1111/LDM/SGM layout, SD1/SD2/SDXL): `model.diffusion_model.<ldm path>`, CLIP under
  `cond_stage_model.transformer.` / `conditioner.embedders.0.transformer.`, OpenCLIP under `cond_stage_model.model.` /
  `conditioner.embedders.1.model.`;
- diffusers folder: `unet/*.safetensors`, `text_encoder/*.safetensors`, `text_encoder_2/*.safetensors` (also sharded).
So the model tools stream any checkpoint tensor by tensor and still compute exactly what the patcher computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_ext.errors import LoraFileError, ModelLoadError
from lora_ext.formats.layouts import clip_hf_to_openclip, hf_clip_module_path, unet_module_map
from lora_ext.formats.safetensors_io import SafetensorsHeader, read_header
from lora_ext.formats.safetensors_stream import TORCH_DTYPES, TensorFiles
from lora_ext.models import assets
from lora_ext.models.convert import TE_PREFIXES, UNET_PREFIX
from lora_ext.models.loading import empty_diffusers_model, empty_text_encoder
from lora_ext.patch.keymap import ModelAdapter, TextEncoderPart, build_adapter

DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Place:
    """Where one parameter of the skeleton lives: file, tensor key, and which third of a fused q/k/v (or None)."""

    file: Path
    key: str
    chunk: int | None = None


@dataclass
class ModelFiles:
    """A checkpoint opened for streaming (see the module docstring)."""

    path: Path
    layout: str  # "single-file" | "diffusers"
    arch: str  # "sd1" | "sd2" | "sdxl"
    adapter: ModelAdapter  # on meta modules: specs and names only
    headers: dict[Path, SafetensorsHeader]
    places: dict[tuple[int, str], Place] = field(default_factory=dict)  # (id(module), attr) -> where it is stored
    metadata: dict[str, str] = field(default_factory=dict)  # of the single file (empty for a folder)
    unplaced: set[int] = field(default_factory=set)  # id(module) of key-map layers this layout cannot patch

    def place_of(self, module: torch.nn.Module, attr: str) -> Place:
        place = self.places.get((id(module), attr))
        if place is None:
            what = next((t.key for t in self.adapter.targets.values() if t.module is module), type(module).__name__)
            raise ModelLoadError(f"{self.path}: the layer {what} is not stored as a plain weight in this checkpoint "
                                 "layout (OpenCLIP keeps text_projection transposed); a LoRA that patches it cannot "
                                 "be merged here")
        return place

    def stored(self, module: torch.nn.Module, attr: str, files: TensorFiles) -> torch.Tensor:
        """A key-map parameter as the files store it (its third of a fused q/k/v weight), read into fresh memory
        through the open `files`."""
        place = self.place_of(module, attr)
        t = files.get(place.file, self.headers[place.file]).tensor(place.key)
        if place.chunk is not None:
            n = t.shape[0] // 3
            t = t[place.chunk * n:(place.chunk + 1) * n]
        return t

    @property
    def nbytes(self) -> int:
        return sum(h.file_size for h in self.headers.values())


def open_model(path: str | Path) -> ModelFiles:
    """Open a single-file checkpoint (.safetensors) or a diffusers folder; `shapes` names the shipped model.
    Raises ModelLoadError naming the file and what to do."""
    src = Path(assets.resolve_model_name(str(path)))
    if src.is_dir():
        return _open_folder(src)
    if not src.exists():
        raise ModelLoadError(f"{src}: no such checkpoint file or folder")
    if src.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{src}: the model tools read .safetensors checkpoints (and diffusers folders), tensor "
                             "by tensor; a pickled .ckpt is not read here. Convert it once (e.g. the WebUI's "
                             "checkpoint merger with 'safetensors' output) and use that file")
    return _open_single_file(src)


# ------------------------------------------------------------------------------------------------------- skeletons


def _header(path: Path) -> SafetensorsHeader:
    try:
        return read_header(path)
    except LoraFileError as exc:
        raise ModelLoadError(f"{path}: cannot read the checkpoint: {exc.reason}") from exc


def _meta_state(header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    return {k: torch.empty(i.shape, dtype=TORCH_DTYPES.get(i.dtype, torch.uint8), device="meta")
            for k, i in header.tensors.items()}


# ------------------------------------------------------------------------------------------------------ single file


def _open_single_file(src: Path, *, like: Path | None = None) -> ModelFiles:
    """`like`: read the conversion hints (sidecar yaml) of that file instead (a temporary output being checked)."""
    from lora_ext.models import convert
    from lora_ext.models.loading import _read_sidecar_yaml, conversion_hints

    header = _header(src)
    meta = _meta_state(header)
    hints_src = like or src
    hints = conversion_hints(hints_src, header.metadata, _read_sidecar_yaml(hints_src))
    parts = convert.single_file_to_diffusers(meta, **hints)
    arch = parts.arch
    unet = empty_diffusers_model("UNet2DConditionModel", parts.unet_config)
    tes = [empty_text_encoder(cfg) for cfg in parts.te_configs]
    te_parts = [TextEncoderPart(f"te{i + 1}", te, "hf") for i, te in enumerate(tes)]
    adapter = build_adapter(arch, unet, parts.unet_config, "diffusers", te_parts)
    files = ModelFiles(path=src, layout="single-file", arch=arch, adapter=adapter, headers={src: header},
                       metadata=dict(header.metadata))
    keys = header.tensors
    d2l = unet_module_map(parts.unet_config)
    for dpath, module in unet.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            lpath = d2l.get(dpath)
            key = f"{UNET_PREFIX}{lpath}.{attr}" if lpath is not None else None
            if key in keys:
                files.places[(id(module), attr)] = Place(src, key)
    layouts = {"sd1": ["hf"], "sd2": ["openclip"], "sdxl": ["hf", "openclip"]}[arch]
    for te, prefix, layout in zip(tes, TE_PREFIXES[arch], layouts):
        if layout == "hf":
            spelled = {hf_clip_module_path(k[len(prefix):]): k for k in keys if k.startswith(prefix)}
            for path, module in te.named_modules():
                for attr, _ in module.named_parameters(recurse=False):
                    key = spelled.get(f"{hf_clip_module_path(path)}.{attr}")
                    if key is not None:
                        files.places[(id(module), attr)] = Place(src, key)
            continue
        table = clip_hf_to_openclip(te.config.num_hidden_layers)
        for path, module in te.named_modules():
            slot = table.get(hf_clip_module_path(path))
            if slot is None:
                continue
            if slot.transposed:  # OpenCLIP's text_projection [W, P]: A1111 holds it as a parameter, no LoRA target
                files.unplaced.add(id(module))
                continue
            for attr, name in (("weight", slot.param), ("bias", slot.bias)):
                key = f"{prefix}{slot.module}.{name}" if slot.module else f"{prefix}{name}"
                if name is not None and getattr(module, attr, None) is not None and key in keys:
                    files.places[(id(module), attr)] = Place(src, key, slot.chunk)
    _check_places(files)
    return files


# --------------------------------------------------------------------------------------------------- diffusers folder


def _part_files(folder: Path) -> list[Path]:
    """The safetensors files of one component (the index's shards, or the single weights file)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    files = [p for p in sorted(folder.glob("*.safetensors")) if ".fp16." not in p.name and ".ema." not in p.name]
    if not files:
        found = ", ".join(p.name for p in sorted(folder.iterdir()) if p.is_file()) or "nothing"
        raise ModelLoadError(f"{folder}: no .safetensors weights (found {found}); the model tools read safetensors "
                             "only: save the pipeline with safe_serialization=True")
    if len(files) > 1:
        raise ModelLoadError(f"{folder}: several weight files ({', '.join(p.name for p in files)}) and no index")
    return files


def _open_folder(src: Path) -> ModelFiles:
    from lora_ext.models.loading import family_from_configs

    if not (src / "model_index.json").is_file():
        raise ModelLoadError(f"{src}: not a diffusers model folder (no model_index.json)")

    def config(part: str) -> dict:
        p = src / part / "config.json"
        if not p.is_file():
            raise ModelLoadError(f"{src}: {part}/config.json is missing")
        return json.loads(p.read_text(encoding="utf-8"))

    unet_cfg = config("unet")
    te_cfgs = [config(p) for p in ("text_encoder", "text_encoder_2") if (src / p).is_dir()]
    arch = family_from_configs(unet_cfg, te_cfgs[0] if te_cfgs else None)
    unet = empty_diffusers_model("UNet2DConditionModel", unet_cfg)
    tes = [empty_text_encoder(c) for c in te_cfgs]
    adapter = build_adapter(arch, unet, unet_cfg, "diffusers",
                            [TextEncoderPart(f"te{i + 1}", te, "hf") for i, te in enumerate(tes)])
    headers: dict[Path, SafetensorsHeader] = {}
    for part in DIFFUSERS_PARTS:
        if (src / part).is_dir():
            for f in _part_files(src / part):
                headers[f] = _header(f)
    files = ModelFiles(path=src, layout="diffusers", arch=arch, adapter=adapter, headers=headers)

    def where(part: str) -> dict[str, tuple[Path, str]]:
        out = {}
        for f, h in headers.items():
            if f.parent.name == part:
                out.update({(hf_clip_module_path(k) if part != "unet" else k): (f, k) for k in h.tensors})
        return out

    for part, model in (("unet", unet), *zip(("text_encoder", "text_encoder_2"), tes)):
        found = where(part)
        for path, module in model.named_modules():
            for attr, _ in module.named_parameters(recurse=False):
                name = f"{path}.{attr}" if part == "unet" else f"{hf_clip_module_path(path)}.{attr}"
                hit = found.get(name)
                if hit is not None:
                    files.places[(id(module), attr)] = Place(hit[0], hit[1])
    _check_places(files)
    return files


def _check_places(files: ModelFiles) -> None:
    """Every patchable weight of the key map must be found in the files, with the shape the map expects."""
    missing = []
    for target in files.adapter.targets.values():
        if id(target.module) in files.unplaced:
            continue
        for attr in (target.weight_attr, target.bias_attr):
            if attr is None:
                continue
            place = files.places.get((id(target.module), attr))
            if place is None:
                missing.append(f"{target.key}.{attr}")
                continue
            info = files.headers[place.file].tensors[place.key]
            want = tuple(getattr(target.module, attr).shape)
            have = info.shape if place.chunk is None else (info.shape[0] // 3, *info.shape[1:])
            if tuple(have) != want:
                raise ModelLoadError(f"{place.file} [{place.key}]: shape {tuple(info.shape)} does not fit the "
                                     f"model's {target.key}.{attr} {want}; the checkpoint is damaged or unusual")
    if missing:
        raise ModelLoadError(f"{files.path}: {len(missing)} weights of the {files.arch} model were not found in the "
                             f"files (e.g. {missing[0]}); the checkpoint is incomplete or has an unknown layout")
