"""The one vocabulary of model families: every fact lora_ext declares per family lives here, once.

    from lora_ext import families
    fam = families.family("sd15")                       # aliases resolve: -> Family(id="sd1", ...)
    fam.label, fam.sd_version                            # "SD1.x", "SD1" (A1111's card "sd version")
    families.default_resolution("sd2", "v")             # 768
    families.normalise_prediction("v-prediction")       # "v_prediction"

Supported families (we load, train and patch them): "sd1", "sd2", "sdxl". Recognised ones (named in metadata, never
loaded): "sdxl-refiner", "sd3", "flux". Names are matched case-insensitively after stripping; an unknown name raises
`UnknownFamilyError` (a ValueError) whose message lists the valid names. Callers wrap it in their own error type.

Stdlib only and imported by every layer: nothing here imports torch or another lora_ext module.
How to add a family: docs/adding-a-family.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

PREDICTION_TYPES = ("epsilon", "v_prediction")
EPSILON, V_PREDICTION = PREDICTION_TYPES
# spellings of the prediction types in the wild: diffusers, modelspec ("v"), ldm yaml, our own short forms
_PREDICTION_ALIASES = {"v": V_PREDICTION, "v-prediction": V_PREDICTION, "v_pred": V_PREDICTION, "eps": EPSILON}


class UnknownFamilyError(ValueError):
    """A model family name (or prediction type) that is not in the vocabulary; the message lists the valid ones."""


def _by_prediction(epsilon, v_prediction=None) -> Mapping[str, object]:
    return MappingProxyType({EPSILON: epsilon, V_PREDICTION: epsilon if v_prediction is None else v_prediction})


@dataclass(frozen=True)
class Family:
    """What lora_ext knows about one supported model family."""

    id: str  # "sd1" | "sd2" | "sdxl": the name every module uses
    label: str  # for people: "SD1.x"
    sd_version: str  # A1111's "sd version" spelling (card editor, sidecar, the built-in's filter): "SD1"
    resolution: Mapping[str, int]  # training resolution by prediction type (SD2 v-prediction models are 768 px)
    configs: Mapping[str, str]  # shipped diffusers config (lora_ext/data/configs/<name>) by prediction type
    tokenizers: tuple[str, ...]  # shipped tokenizer kind of each text encoder, in pipeline order
    text_widths: tuple[int, ...]  # hidden width of each text encoder (CLIP ViT-L 768, OpenCLIP ViT-H 1024, bigG 1280)
    context_dim: int  # what the UNet's cross-attention reads (to_k/to_v input width)
    image_size: int  # the real model's native image size (single-file configs when nothing else says)
    vae_scaling_factor: float
    unet_heads: int | None  # real UNet head count; None: 64-channel heads (the count follows the width)
    single_file_te_prefixes: tuple[str, ...]  # state-dict prefix of each text encoder in the original checkpoint
    ss_base_model_version: Mapping[str, str]  # what sd-scripts writes, by prediction type
    modelspec_architecture: Mapping[str, str]  # sai_model_spec architecture id (before "/lora"), by prediction type
    sgm: bool = False  # made by Stability's generative-models code (modelspec.implementation, A1111's sgm UNet)
    aliases: tuple[str, ...] = field(default=())  # other names users and tools write for it

    def config(self, prediction_type: str | None = None) -> str:
        """The shipped config for a prediction type (None: epsilon)."""
        return self.configs[normalise_prediction(prediction_type or EPSILON)]

    def default_resolution(self, prediction_type: str | None = None) -> int:
        return self.resolution[normalise_prediction(prediction_type or EPSILON)]


FAMILIES: Mapping[str, Family] = MappingProxyType({f.id: f for f in (
    Family(
        id="sd1", label="SD1.x", sd_version="SD1", resolution=_by_prediction(512), configs=_by_prediction("sd15"),
        tokenizers=("clip",), text_widths=(768,), context_dim=768, image_size=512, vae_scaling_factor=0.18215,
        unet_heads=8, single_file_te_prefixes=("cond_stage_model.transformer.",),
        ss_base_model_version=_by_prediction("sd_v1", "sd_v1_v"),
        modelspec_architecture=_by_prediction("stable-diffusion-v1"),
        aliases=("sd15", "sd1.5"),
    ),
    Family(
        id="sd2", label="SD2.x", sd_version="SD2", resolution=_by_prediction(512, 768),
        configs=_by_prediction("sd2-base", "sd21-v"), tokenizers=("openclip",), text_widths=(1024,), context_dim=1024,
        image_size=768, vae_scaling_factor=0.18215, unet_heads=None,
        single_file_te_prefixes=("cond_stage_model.model.",),
        ss_base_model_version=_by_prediction("sd_v2", "sd_v2_v"),
        modelspec_architecture=_by_prediction("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"),
        aliases=("sd2-base", "sd21", "sd21-v", "sd2-v"),
    ),
    Family(
        id="sdxl", label="SDXL", sd_version="SDXL", resolution=_by_prediction(1024),
        configs=_by_prediction("sdxl-base"), tokenizers=("clip", "openclip"), text_widths=(768, 1280),
        context_dim=2048, image_size=1024, vae_scaling_factor=0.13025, unet_heads=None,
        single_file_te_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
        ss_base_model_version=_by_prediction("sdxl_base_v1-0"),
        modelspec_architecture=_by_prediction("stable-diffusion-xl-v1-base"), sgm=True,
        aliases=("sdxl-base",),
    ),
)})
SUPPORTED = tuple(FAMILIES)  # ("sd1", "sd2", "sdxl")
# families that metadata may name but that lora_ext does not load: id -> label
RECOGNISED: Mapping[str, str] = MappingProxyType(
    {"sdxl-refiner": "the SDXL refiner", "sd3": "SD3", "flux": "FLUX.1"})
KNOWN = SUPPORTED + tuple(RECOGNISED)  # every family id metadata can be read as
LABELS: Mapping[str, str] = MappingProxyType({**{f.id: f.label for f in FAMILIES.values()}, **RECOGNISED})
SD_VERSIONS = tuple(f.sd_version for f in FAMILIES.values())  # ("SD1", "SD2", "SDXL")
# alias -> family id; the one alias table (built from each family's `aliases`)
ALIASES: Mapping[str, str] = MappingProxyType({a: f.id for f in FAMILIES.values() for a in f.aliases})
# aliases that also say which prediction type (and so which shipped config) is meant
_ALIAS_PREDICTION = {"sd2-base": EPSILON, "sd21": V_PREDICTION, "sd21-v": V_PREDICTION, "sd2-v": V_PREDICTION}
CONFIG_NAMES = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.configs.values()))


def valid_names() -> str:
    """The names `family` accepts, for error messages: "sd1, sd2, sdxl (or sd15, sd1.5, ...)"."""
    return f"{', '.join(SUPPORTED)} (or {', '.join(ALIASES)})"


def normalise_family(name: str) -> str:
    """A family id from a family id or alias ("SD15" -> "sd1"). Raises UnknownFamilyError listing the valid names."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in FAMILIES:
        raise UnknownFamilyError(f"unknown model family {name!r}; valid: {valid_names()}")
    return key


def family(name: str) -> Family:
    """The `Family` of a family id or alias. Raises UnknownFamilyError listing the valid names."""
    return FAMILIES[normalise_family(name)]


def label(name: str | None, default: str | None = None) -> str:
    """The label of any known family id ("sd1" -> "SD1.x", "flux" -> "FLUX.1"); else `default` (or the name)."""
    if name in LABELS:
        return LABELS[name]
    return default if default is not None else str(name)


def sd_version(name: str) -> str:
    """A1111's "sd version" spelling of a supported family ("sdxl" -> "SDXL")."""
    return family(name).sd_version


def normalise_prediction(value: str) -> str:
    """"epsilon" or "v_prediction" from any spelling ("v", "v-prediction", "v_pred", "eps", any case).
    Raises UnknownFamilyError (a ValueError) for anything else."""
    key = str(value).strip().lower()
    key = _PREDICTION_ALIASES.get(key, key)
    if key not in PREDICTION_TYPES:
        raise UnknownFamilyError(f"unknown prediction type {value!r}; valid: {', '.join(PREDICTION_TYPES)} (or v, eps)")
    return key


def is_v_prediction(prediction_type: str | None) -> bool:
    """True for any spelling of v-prediction; False for epsilon or None."""
    return normalise_prediction(prediction_type or EPSILON) == V_PREDICTION


def default_resolution(name: str, prediction_type: str | None = None) -> int:
    """Training resolution of a family: 512 (SD1, SD2-512), 768 (SD2 v-prediction), 1024 (SDXL)."""
    return family(name).default_resolution(prediction_type)


def shipped_config(name: str, prediction_type: str | None = None) -> str:
    """The shipped config for a config name, family id or alias ("sd21" -> "sd21-v"); `prediction_type` picks among a
    family's configs when the name does not. Raises UnknownFamilyError listing the valid names."""
    if name in CONFIG_NAMES:
        return name
    key = str(name).strip().lower()
    try:
        fam = family(key)
    except UnknownFamilyError:
        raise UnknownFamilyError(
            f"no shipped config for {name!r}; valid: {', '.join(CONFIG_NAMES)} or a family {valid_names()}") from None
    return fam.config(prediction_type or _ALIAS_PREDICTION.get(key))
