"""Key maps: every layer a LoRA may patch, and every name a file may use for it, built from the model's own modules.

A `Target` is one weight of the model (or one q/k/v third of an OpenCLIP `in_proj_weight`) under a canonical name,
`<component>:<diffusers/transformers-4 module path>`, e.g.
`unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or `te1:text_model.encoder.layers.0.self_attn.q_proj`.
The aliases are the spellings files use for that layer: kohya underscore names in diffusers or compvis layout
(`lora_unet_...`, `lora_te_...`, `lora_te1_/lora_te2_...`), `lycoris_...`, and dotted diffusers/PEFT names
(`unet....`, `text_encoder....`, `text_encoder_2....`). They are generated from the module tree of the model at hand
(a diffusers pipeline, or A1111's ldm/sgm model), so lookups are exact dictionary hits: no regex guessing, and every
file key is either applied or reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lora_ext.formats.algorithms.base import LayerSpec
from lora_ext.formats.layouts import clip_hf_to_openclip, hf_clip_module_path, ldm_unet_block, unet_module_map
from lora_ext.patch.quant import logical_shape, quantized

COMPONENTS = ("unet", "te1", "te2")
# how tools write a target's module name: kohya with diffusers paths (SD1/SD2 sd-scripts), kohya with compvis/ldm
# paths (sd-scripts SDXL, A1111/LyCORIS compvis), diffusers/PEFT dotted names
SPELLINGS = ("kohya_diffusers", "kohya_compvis", "peft")


@dataclass(frozen=True, eq=False)
class Target:
    """One patchable weight. `chunk` selects rows [chunk*n:(chunk+1)*n] of a fused q/k/v `in_proj_weight`
    (n = rows / 3)."""

    key: str
    component: str
    module: nn.Module
    weight_attr: str
    bias_attr: str | None
    chunk: int | None
    spec: LayerSpec
    block: str  # "BASE" for text encoders and UNet parts outside the numbered blocks, else "IN00".."OUT11", "M00"
    spellings: Mapping[str, str] = field(default_factory=dict)  # style -> file module name (see `SPELLINGS`)

    def rows(self) -> slice | None:
        if self.chunk is None:
            return None
        n = getattr(self.module, self.weight_attr).shape[0] // 3
        return slice(self.chunk * n, (self.chunk + 1) * n)


@dataclass(frozen=True)
class TextEncoderPart:
    """A text encoder of the model: `layout` is "hf" (transformers CLIPTextModel[WithProjection]) or "openclip"
    (OpenCLIP text tower with nn.MultiheadAttention, as A1111 holds SD2's and SDXL's second encoder)."""

    component: str  # "te1" or "te2"
    module: nn.Module
    layout: str = "hf"


@dataclass
class ModelAdapter:
    """The targets of one model and the file names that reach them."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    targets: dict[str, Target] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    components: tuple[str, ...] = ()

    def lookup(self, module_name: str) -> Target | None:
        key = self.aliases.get(module_name)
        return self.targets[key] if key is not None else None

    def _add(self, target: Target, names: Iterable[str]) -> None:
        if target.key in self.targets:
            raise RuntimeError(f"internal error: duplicate target {target.key}")
        self.targets[target.key] = target
        for name in names:
            previous = self.aliases.setdefault(name, target.key)
            if previous != target.key:
                raise RuntimeError(f"internal error: alias {name!r} names both {previous} and {target.key}")


def _us(path: str) -> str:
    return path.replace(".", "_")


def is_linear(module: nn.Module) -> bool:
    """`nn.Linear`, or a linear layer of a host's own operations that is not one: Forge's
    `backend.operations.ForgeOperations.Linear` is a plain `nn.Module` with `in_features`, `out_features` and a
    (out, in) `weight` Parameter, computing `F.linear(x, weight, bias)` (on a weight it may cast on the fly); its 4-bit
    and GGUF variants hold a quantized weight (`lora_ext.patch.quant`), the GGUF one without `in_features`."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    if type(module).__name__ != "Linear" or not isinstance(weight, nn.Parameter):
        return False
    shape = logical_shape(weight)
    if not hasattr(module, "in_features"):  # Forge's GGUF Linear keeps only its (quantized) weight and bias
        return len(shape) == 2 and quantized(weight) is not None
    return shape == (getattr(module, "out_features", None), getattr(module, "in_features", None))


def layer_spec(module: nn.Module, weight_shape: tuple[int, ...] | None = None) -> LayerSpec | None:
    """LayerSpec for the module kinds a LoRA can patch; None for others."""
    if is_linear(module):
        return LayerSpec("linear", tuple(weight_shape or logical_shape(module.weight)))
    if isinstance(module, nn.Conv2d):
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        return LayerSpec("conv", tuple(module.weight.shape), stride=tuple(module.stride), padding=padding,
                         dilation=tuple(module.dilation), groups=module.groups)
    if isinstance(module, nn.GroupNorm) and module.weight is not None:
        return LayerSpec("norm", tuple(module.weight.shape), num_groups=module.num_groups, eps=module.eps)
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return LayerSpec("norm", tuple(module.weight.shape), eps=module.eps)
    if isinstance(module, nn.Embedding):
        return LayerSpec("embedding", tuple(module.weight.shape))
    if isinstance(module, nn.MultiheadAttention) and weight_shape is not None:
        return LayerSpec("linear", weight_shape)
    return None


def _has_bias(module: nn.Module, attr: str) -> str | None:
    return attr if getattr(module, attr, None) is not None else None


# ---------------------------------------------------------------------------------------------------------------- UNet


def _unet_aliases(dpath: str, lpath: str | None) -> list[str]:
    # kohya sd-scripts' OFT (networks/oft.py) names its modules "oft_unet_<path>"
    names = [f"lora_unet_{_us(dpath)}", f"lycoris_{_us(dpath)}", f"oft_unet_{_us(dpath)}", f"unet.{dpath}", dpath]
    if lpath is not None:
        names += [f"lora_unet_{_us(lpath)}", f"lycoris_{_us(lpath)}", f"oft_unet_{_us(lpath)}",
                  f"diffusion_model.{lpath}"]
    return names


def add_unet(adapter: ModelAdapter, unet: nn.Module, unet_config: Mapping[str, Any], layout: str) -> None:
    """Register the UNet's patchable layers. layout "diffusers" (UNet2DConditionModel) or "ldm" (ldm/sgm UNetModel)."""
    d2l = unet_module_map(unet_config)
    path_of = d2l if layout == "diffusers" else {v: k for k, v in d2l.items()}  # module path -> other layout's path
    for path, module in unet.named_modules():
        spec = layer_spec(module)
        if spec is None:
            continue
        other = path_of.get(path)
        dpath, lpath = (path, other) if layout == "diffusers" else (other, path)
        if dpath is None:
            raise RuntimeError(f"internal error: UNet module {path!r} has no diffusers name (layout {layout})")
        target = Target(key=f"unet:{dpath}", component="unet", module=module, weight_attr="weight",
                        bias_attr=_has_bias(module, "bias"), chunk=None, spec=spec,
                        block=ldm_unet_block(lpath) if lpath else "BASE",
                        spellings={"kohya_diffusers": f"lora_unet_{_us(dpath)}",
                                   "kohya_compvis": f"lora_unet_{_us(lpath or dpath)}", "peft": f"unet.{dpath}"})
        adapter._add(target, _unet_aliases(dpath, lpath))


# ------------------------------------------------------------------------------------------------------- text encoders

_TE_PREFIXES = {
    # component -> (kohya prefixes, diffusers/PEFT prefixes)
    "te": (("lora_te_", "lora_te1_"), ("text_encoder.",)),
    "te1": (("lora_te1_",), ("text_encoder.",)),
    "te2": (("lora_te2_",), ("text_encoder_2.",)),
}


def _te_spellings(kind: str, hpath: str) -> dict[str, str]:
    kohya = _TE_PREFIXES[kind][0][0] + _us(hpath)
    return {"kohya_diffusers": kohya, "kohya_compvis": kohya, "peft": _TE_PREFIXES[kind][1][0] + hpath}


def _te_aliases(kind: str, hpath: str) -> list[str]:
    kohya, dotted = _TE_PREFIXES[kind]
    short = hpath[len("text_model.") :] if hpath.startswith("text_model.") else hpath
    names = [p + _us(hpath) for p in kohya]
    if short != hpath:  # kohya-style names written under transformers >= 5.6 (LyCORIS wrapper): lora_te_encoder_...
        names += [p + _us(short) for p in kohya]
    for p in dotted:
        names += [p + hpath, p + short]
    if kind == "te":  # PEFT adapter of the one text encoder alone ("base_model.model.text_model..." minus the wrapper)
        names += [hpath, short]
    return names


def add_text_encoder(adapter: ModelAdapter, part: TextEncoderPart, single: bool) -> None:
    """Register a text encoder. `single` = the model has one encoder (SD1/SD2: kohya prefix lora_te_)."""
    kind = "te" if single else part.component
    if part.layout == "hf":
        for path, module in part.module.named_modules():
            spec = layer_spec(module)
            if spec is None:
                continue
            hpath = hf_clip_module_path(path)
            target = Target(key=f"{part.component}:{hpath}", component=part.component, module=module,
                            weight_attr="weight", bias_attr=_has_bias(module, "bias"), chunk=None, spec=spec,
                            block="BASE", spellings=_te_spellings(kind, hpath))
            adapter._add(target, _te_aliases(kind, hpath))
        return
    if part.layout != "openclip":
        raise ValueError(f"unknown text-encoder layout {part.layout!r}")
    modules = dict(part.module.named_modules())
    num_layers = len(part.module.transformer.resblocks)
    for hpath, slot in clip_hf_to_openclip(num_layers).items():
        module = modules.get(slot.module)
        if module is None or not hasattr(module, slot.param) or slot.param not in ("weight", "in_proj_weight"):
            continue  # e.g. positional_embedding / text_projection are parameters, not LoRA targets here
        weight = getattr(module, slot.param)
        if slot.chunk is not None:
            shape = (weight.shape[0] // 3, *weight.shape[1:])
            spec = layer_spec(module, shape)
            bias_attr = _has_bias(module, "in_proj_bias")
        else:
            spec = layer_spec(module)
            bias_attr = _has_bias(module, "bias")
        if spec is None:
            continue
        target = Target(key=f"{part.component}:{hpath}", component=part.component, module=module,
                        weight_attr=slot.param, bias_attr=bias_attr, chunk=slot.chunk, spec=spec, block="BASE",
                        spellings=_te_spellings(kind, hpath))
        names = _te_aliases(kind, hpath)
        if single and slot.chunk is None:  # A1111's own spelling of OpenCLIP layers, e.g. lora_te_model_..._mlp_c_fc
            names.append(f"lora_te_model_{_us(slot.module)}")
        adapter._add(target, names)


# ------------------------------------------------------------------------------------------------------------ builders


def build_adapter(arch: str, unet: nn.Module | None, unet_config: Mapping[str, Any] | None, unet_layout: str,
                  text_encoders: Iterable[TextEncoderPart] = ()) -> ModelAdapter:
    """Key map for any supported module tree. arch: "sd1" | "sd2" | "sdxl"."""
    tes = list(text_encoders)
    adapter = ModelAdapter(arch=arch)
    comps: list[str] = []
    if unet is not None:
        if unet_config is None:
            raise ValueError("unet_config is required with a UNet")
        add_unet(adapter, unet, unet_config, unet_layout)
        comps.append("unet")
    for part in tes:
        add_text_encoder(adapter, part, single=len(tes) == 1)
        comps.append(part.component)
    adapter.components = tuple(comps)
    return adapter


def arch_of_diffusers_unet(config: Mapping[str, Any]) -> str:
    """SDXL has text-time additional embeddings; SD2.x uses linear projections in its transformers; else SD1.x."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def adapter_for_pipeline(pipe: Any) -> ModelAdapter:
    """Key map for a diffusers StableDiffusion(XL)Pipeline (or any object with unet/text_encoder/text_encoder_2)."""
    unet = pipe.unet
    config = dict(unet.config)
    parts = []
    if getattr(pipe, "text_encoder", None) is not None:
        parts.append(TextEncoderPart("te1", pipe.text_encoder, "hf"))
    if getattr(pipe, "text_encoder_2", None) is not None:
        parts.append(TextEncoderPart("te2", pipe.text_encoder_2, "hf"))
    return build_adapter(arch_of_diffusers_unet(config), unet, config, "diffusers", parts)
