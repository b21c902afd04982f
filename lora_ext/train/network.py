"""Trainable LoRA modules attached to a diffusers pipeline with forward hooks.

    network = LoraTrainingNetwork(pipe, rank=8, alpha=4, targets="attn_mlp", train_text_encoder=True)
    optimizer = torch.optim.AdamW(network.param_groups(unet_lr=1e-4))   # TE group at 0.5x unless given
    ... train ...
    tensors = network.state_dict_kohya()                                  # kohya names + alpha, fp16
    network.remove()                                                      # pipeline exactly as before

Every layer the network trains is a `Target` of the engine's key map (`adapter_for_pipeline(pipe)`), and its extra
output is the engine's own LoRA math, `Lora.from_tensors({...}).bypass(x, weight, spec)`, added by a forward hook on
the layer instance. So what is trained is exactly what the patcher later merges from the exported file. Nothing in
the pipeline is replaced: no module is swapped, no `torch.nn` method is patched, no base weight is written. The base
parameters are frozen (`requires_grad=False`) while the network is attached; `remove()` restores their flags.

Factors are stored in the shapes kohya sd-scripts writes (so exporting is a cast):
    linear          lora_down (r, in),          lora_up (out, r)
    conv kxk        lora_down (r, in, kh, kw),  lora_up (out, r, 1, 1)    (1x1 convs: kh = kw = 1)
    DoRA            dora_scale (1, in[, 1, 1]): the per-input-column magnitude (LyCORIS wd_on_out=False, the layout
                    AUTOMATIC1111 v1.10 applies)
Initialisation as kohya / Microsoft LoRA / PEFT: lora_down ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in),
1/sqrt(fan_in)) with fan_in = in * kh * kw; lora_up = 0; dora_scale = the column norms of the base weight. Step 0 is
therefore bit-identical to the base model.

Target presets "attn", "attn_mlp", "attn_mlp_conv" (kohya's rules; the text encoder, when trained, gets
q/k/v/out_proj and mlp fc1/fc2 of every layer): `lora_ext.patch.targets`, the rules the synthetic test files use
too. In "attn_mlp_conv" 3x3 convs use conv_rank/conv_alpha, 1x1 convs (conv_shortcut) and time_emb_proj rank/alpha.
A callable `(Target) -> bool` selects explicitly; `blocks` ("IN04", "M00", "OUT03", ...) restricts the UNet part.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ext.errors import TrainingError
from lora_ext.formats.algorithms import Lora, apply_dora, weight_norm
from lora_ext.formats.algorithms.base import ALPHA_KEY, DORA_KEY, layer_forward
from lora_ext.formats.algorithms.lora import DOWN, UP
from lora_ext.formats.keys import split_bundle_key
from lora_ext.patch import ModelAdapter, Target, adapter_for_pipeline
from lora_ext.patch.targets import PRESETS, file_module_name, selector, trainable_kind
from lora_ext.train.pivotal import PivotalEmbedding

log = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"  # what sd-scripts writes as ss_network_module for this kind of file


ALPHA, DORA = ALPHA_KEY, DORA_KEY


# ---------------------------------------------------------------------------------------------------------- selection


def is_conv_kxk(target: Target) -> bool:
    """A conv with a spatial kernel (not 1x1): trained with conv_rank / conv_alpha."""
    return target.spec.kind == "conv" and any(k != 1 for k in target.spec.weight_shape[2:])


# ------------------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class NetworkConfig:
    """The settings a network was built with (also what goes into the file's ss_network_* metadata)."""

    rank: int
    alpha: float
    targets: str  # a preset name, or "custom" for a selector callable
    conv_rank: int | None
    conv_alpha: float | None
    train_text_encoder: bool
    dora: bool
    dropout: float
    blocks: tuple[str, ...] | None


@dataclass(frozen=True)
class PivotalSpec:
    """Pivotal tuning's word (see `lora_ext.train.pivotal`): its name, the text it starts from, vectors per encoder."""

    token: str
    init_text: str = ""
    vectors: int = 1


# ---------------------------------------------------------------------------------------------------------- the module


class TrainableLora(nn.Module):
    """The trainable factors of ONE target layer (shapes: see the module docstring), in `dtype` on the layer's device.

    `contribution(x, weight)` is the layer's extra output for input x, multiplier not applied: the engine's LoRA
    bypass (or, with DoRA, the layer's op with the decomposed delta W' - W, computed differentiably with the formula
    of `lora_ext.formats.algorithms.dora`, `apply_dora`).
    """

    def __init__(self, name: str, target: Target, rank: int, alpha: float, *, dora: bool, dtype: torch.dtype,
                 generator: torch.Generator | None) -> None:
        super().__init__()
        shape = target.spec.weight_shape
        module = target.module
        weight = getattr(module, target.weight_attr)
        device = weight.device
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        self.name = name
        self.target = target  # a plain record (holds the base layer; not registered as a submodule)
        self.rank = int(rank)
        self.alpha = float(alpha)
        down = torch.empty((self.rank, in_dim, *kernel), dtype=dtype, device=device)
        # kaiming_uniform(a=sqrt(5)) draws from U(-b, b), b = 1/sqrt(fan_in), fan_in = in * kh * kw, as nn.Linear and
        # nn.Conv2d initialise themselves (kohya networks.lora and PEFT use this exact call).
        if generator is not None and device.type != generator.device.type:
            cpu = torch.empty(down.shape, dtype=dtype)
            nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
            down.copy_(cpu)
        else:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(torch.zeros((out_dim, self.rank, *([1] * len(kernel))), dtype=dtype,
                                                device=device))
        if dora:
            with torch.no_grad():
                norms = weight_norm(weight.detach().to(torch.float32), "in")
            self.dora_scale: nn.Parameter | None = nn.Parameter(norms.to(dtype))
        else:
            self.dora_scale = None
        self._algorithm: Lora | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def set_alpha(self, alpha: float) -> None:
        self.alpha = float(alpha)
        self._algorithm = None

    def algorithm(self) -> Lora:
        """The engine's LoRA object over this module's live parameters (no DoRA magnitude), cached."""
        algo = self._algorithm
        if algo is None or algo.up is not self.lora_up or algo.down is not self.lora_down:
            algo = Lora.from_tensors({UP: self.lora_up, DOWN: self.lora_down, ALPHA: torch.tensor(self.alpha)})
            if algo is None:  # pragma: no cover - Lora always accepts up + down
                raise TrainingError(f"internal error: the engine refused the LoRA factors of {self.name}")
            self._algorithm = algo
        return algo

    def contribution(self, x: Tensor, weight: Tensor) -> Tensor:
        """Extra output for input `x` of the layer whose current weight is `weight` (multiplier not applied)."""
        spec = self.target.spec
        if self.dora_scale is None:
            return self.algorithm().bypass(x, weight, spec)
        delta = self.dora_delta(weight)
        dtype = x.dtype if x.is_floating_point() else weight.dtype
        return layer_forward(x, delta.to(dtype), None, spec)

    def dora_delta(self, weight: Tensor) -> Tensor:
        """W' - W = dora_scale * (W + dW) / ||W + dW||_col - W, float32, differentiable in the LoRA parameters:
        the engine's own `apply_dora` (a (1, in, ...) magnitude normalises each input column)."""
        if self.dora_scale is None:
            raise TrainingError(f"internal error: {self.name} has no DoRA magnitude")
        spec = self.target.spec
        delta = self.algorithm().weight_delta(weight, spec).materialize(spec.weight_shape)
        return apply_dora(weight.detach(), delta, self.dora_scale)  # the base weight is frozen

    def kohya_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """This module's file tensors (suffix -> detached CPU tensor): factors and dora_scale in `dtype`; alpha as a
        0-d tensor in `dtype` when exactly representable there (sd-scripts casts it too), else float32."""
        out = {
            DOWN: self.lora_down.detach().to(device="cpu", dtype=dtype).contiguous(),
            UP: self.lora_up.detach().to(device="cpu", dtype=dtype).contiguous(),
        }
        alpha = torch.tensor(self.alpha, dtype=dtype)
        out[ALPHA] = alpha if float(alpha) == self.alpha else torch.tensor(self.alpha, dtype=torch.float32)
        if self.dora_scale is not None:
            out[DORA] = self.dora_scale.detach().to(device="cpu", dtype=dtype).contiguous()
        return out

    def extra_repr(self) -> str:
        return f"{self.name}: rank={self.rank}, alpha={self.alpha:g}, dora={self.dora_scale is not None}"


# --------------------------------------------------------------------------------------------------------- the network


class LoraTrainingNetwork(nn.Module):
    """Trainable LoRA attached to a diffusers StableDiffusion(XL)Pipeline by forward hooks.

    pipe: any object `adapter_for_pipeline` accepts (unet, text_encoder[, text_encoder_2]).
    rank/alpha: the LoRA dim and alpha (alpha None = rank: scale 1); conv_rank/conv_alpha: the same for kxk convs
    ("attn_mlp_conv"; None = rank / conv_rank). targets: a preset name (see the module docstring) or a selector
    callable over the key map's `Target`s (it may pick UNet and text-encoder layers, linear or conv). blocks: if given,
    only UNet layers in these blocks ("IN00".."IN11", "M00", "OUT00".."OUT11") are trained. dora: learn a per-column
    magnitude too. dropout: dropout on the LoRA path's input while `training` (PEFT's lora_dropout). dtype: the dtype
    of the trainable parameters (keep float32 when the base model is in half precision). seed: seeds the down-factor
    initialisation (None = the global torch RNG, as sd-scripts). freeze_base: set requires_grad=False on the UNet and
    text encoders while attached (restored by `remove()`).

    Raises ValueError for invalid settings and TrainingError when nothing would be trained.
    """

    def __init__(self, pipe: Any, *, rank: int = 4, alpha: float | None = None,
                 targets: str | Callable[[Target], bool] = "attn", conv_rank: int | None = None,
                 conv_alpha: float | None = None, train_text_encoder: bool = False, dora: bool = False,
                 dropout: float = 0.0, dtype: torch.dtype = torch.float32, blocks: Collection[str] | None = None,
                 seed: int | None = None, freeze_base: bool = True, pivotal: PivotalSpec | None = None) -> None:
        super().__init__()
        _check_settings(rank, alpha, conv_rank, conv_alpha, dropout, dtype, targets)
        self.pipe = pipe
        self.adapter: ModelAdapter = adapter_for_pipeline(pipe)
        self.arch = self.adapter.arch
        self.multiplier = 1.0
        self.enabled = True
        self.dropout = float(dropout)
        alpha = float(rank if alpha is None else alpha)
        conv_rank_eff = int(conv_rank if conv_rank is not None else rank)
        conv_alpha_eff = float(conv_alpha if conv_alpha is not None else conv_rank_eff)
        block_set = None if blocks is None else tuple(sorted({str(b).upper() for b in blocks}))
        self.config = NetworkConfig(
            rank=int(rank), alpha=alpha, targets=targets if isinstance(targets, str) else "custom",
            conv_rank=conv_rank, conv_alpha=None if conv_alpha is None else float(conv_alpha),
            train_text_encoder=bool(train_text_encoder), dora=bool(dora), dropout=float(dropout), blocks=block_set)

        selected = self._select(targets, train_text_encoder, block_set)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.loras = nn.ModuleDict()
        for target in selected:
            name = file_module_name(self.adapter, target, "kohya")
            if name in self.loras:
                raise TrainingError(f"internal error: two layers map to the LoRA module name {name}")
            kxk = is_conv_kxk(target)
            self.loras[name] = TrainableLora(
                name, target, conv_rank_eff if kxk else int(rank), conv_alpha_eff if kxk else alpha,
                dora=bool(dora), dtype=dtype, generator=generator)

        self._frozen: list[tuple[nn.Parameter, bool]] = []
        if freeze_base:
            for component in self._components():
                for p in component.parameters():
                    self._frozen.append((p, p.requires_grad))
                    p.requires_grad_(False)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for lora in self.loras.values():
            module = lora.target.module
            self._handles.append(module.register_forward_hook(self._make_hook(lora), with_kwargs=True))
        self.pivotal: PivotalEmbedding | None = None
        if pivotal is not None:
            self.pivotal = PivotalEmbedding(pipe, pivotal.token, init_text=pivotal.init_text,
                                            vectors=pivotal.vectors)
        self.attached = True
        counts = self.module_counts()
        log.info("LoRA network: %d modules (%s), rank %d, alpha %g%s", len(self.loras),
                 ", ".join(f"{k}: {v}" for k, v in counts.items()), rank, alpha, ", DoRA" if dora else "")

    # ------------------------------------------------------------------------------------------------- building

    def _select(self, targets: str | Callable[[Target], bool], train_text_encoder: bool,
                blocks: tuple[str, ...] | None) -> list[Target]:
        if isinstance(targets, str):
            select = selector(targets, text_encoder=train_text_encoder)
        else:
            def select(t: Target) -> bool:
                return (t.component == "unet" or train_text_encoder) and targets(t)
        chosen: list[Target] = []
        for target in self.adapter.targets.values():
            if not select(target):
                continue
            if target.component == "unet" and blocks is not None and target.block not in blocks:
                continue
            if not trainable_kind(target):
                raise TrainingError(
                    f"layer {target.key} is a {target.spec.kind} layer; LoRA trains only linear and conv layers "
                    f"(fix the target selection)")
            chosen.append(target)
        if not chosen:
            what = targets if isinstance(targets, str) else "the target selector"
            raise TrainingError(
                f"no layer of this {self.arch} model matches {what}"
                + (f" in blocks {', '.join(blocks)}" if blocks else "")
                + "; pick other targets or blocks")
        return chosen

    def _components(self) -> list[nn.Module]:
        comps = [self.pipe.unet]
        for attr in ("text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, attr, None)
            if module is not None:
                comps.append(module)
        return comps

    def _make_hook(self, lora: TrainableLora) -> Callable[..., Tensor | None]:
        weight_attr = lora.target.weight_attr

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
            multiplier = self.multiplier
            if not self.enabled or multiplier == 0.0:
                return None
            x = args[0] if args else kwargs["input"]  # nn.Linear / nn.Conv2d take one tensor named "input"
            if self.dropout and self.training:
                x = F.dropout(x, p=self.dropout, training=True)
            extra = lora.contribution(x, getattr(module, weight_attr))
            if multiplier != 1.0:
                extra = extra * multiplier
            return output + extra.to(output.dtype)

        return hook

    # --------------------------------------------------------------------------------------------------- queries

    def module_counts(self) -> dict[str, int]:
        """Number of LoRA modules per component ("unet", "te1", "te2")."""
        counts: dict[str, int] = {}
        for lora in self.loras.values():
            counts[lora.target.component] = counts.get(lora.target.component, 0) + 1
        return counts

    def unet_parameters(self) -> Iterator[nn.Parameter]:
        for lora in self.loras.values():
            if lora.target.component == "unet":
                yield from lora.parameters()

    def text_encoder_parameters(self) -> Iterator[nn.Parameter]:
        for lora in self.loras.values():
            if lora.target.component != "unet":
                yield from lora.parameters()

    def param_groups(self, unet_lr: float, te_lr: float | None = None, embedding_lr: float | None = None
                     ) -> list[dict[str, Any]]:
        """Optimizer parameter groups: {"params", "lr", "name"} for "unet" and "text_encoder" (te_lr None = 0.5 x
        unet_lr), then "embedding" (pivotal tuning's vectors, without weight decay); a component without LoRA modules
        has no group."""
        groups = []
        unet = list(self.unet_parameters())
        if unet:
            groups.append({"params": unet, "lr": float(unet_lr), "name": "unet"})
        te = list(self.text_encoder_parameters())
        if te:
            groups.append({"params": te, "lr": float(0.5 * unet_lr if te_lr is None else te_lr),
                           "name": "text_encoder"})
        if self.pivotal is not None:
            groups.append({"params": list(self.pivotal.parameters()), "weight_decay": 0.0,
                           "lr": float(unet_lr if embedding_lr is None else embedding_lr), "name": "embedding"})
        return groups

    def metadata_fields(self) -> dict[str, str]:
        """The ss_network_* metadata entries that describe this network, as sd-scripts writes them (all str)."""
        cfg = self.config
        args: dict[str, str] = {}
        kxk = [lora for lora in self.loras.values() if is_conv_kxk(lora.target)]
        if kxk:
            args["conv_dim"] = str(kxk[0].rank)
            args["conv_alpha"] = _num(kxk[0].alpha)
        if cfg.dora:
            args["dora_wd"] = "True"
        args["targets"] = cfg.targets
        if cfg.blocks:
            args["blocks"] = ",".join(cfg.blocks)
        if cfg.train_text_encoder:
            args["train_text_encoder"] = "True"
        if self.pivotal is not None:
            args["pivotal_token"] = self.pivotal.token
            args["pivotal_vectors"] = str(self.pivotal.n_vectors)
        return {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(cfg.rank),
            "ss_network_alpha": str(float(cfg.alpha)),
            "ss_network_dropout": str(cfg.dropout) if cfg.dropout else "None",
            "ss_network_args": json.dumps(args),
        }

    # ----------------------------------------------------------------------------------------------------- state

    def state_dict_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        """The LoRA as a kohya file's tensors: "<name>.lora_down.weight", ".lora_up.weight", ".alpha"
        [, ".dora_scale"], detached CPU copies in `dtype` (see `TrainableLora.kohya_tensors` for alpha)."""
        out: dict[str, Tensor] = {}
        for name, lora in self.loras.items():
            for suffix, t in lora.kohya_tensors(dtype).items():
                out[f"{name}.{suffix}"] = t
        if self.pivotal is not None:
            out.update(self.pivotal.bundle_tensors(dtype))
        return out

    def load_state_dict_kohya(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy factors (and dora_scale, alpha) from kohya-named tensors into the parameters, in place.

        Every module of the network must be present with the same shapes, and nothing else (TrainingError
        otherwise). Alpha is taken from the tensors when present (it defines the scale the factors were trained
        with)."""
        bundle = {k: t for k, t in tensors.items() if split_bundle_key(k) is not None}
        if bundle or self.pivotal is not None:
            if self.pivotal is None:
                raise TrainingError(f"the LoRA state has a bundled embedding ({next(iter(bundle))}) but this run "
                                    "trains none (pivotal_token is empty)")
            self.pivotal.load_bundle(bundle)
            tensors = {k: t for k, t in tensors.items() if k not in bundle}
        expected = {DOWN, UP} | ({DORA} if self.config.dora else set())
        unknown = []
        by_module: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            name, _, suffix = key.partition(".")
            if name not in self.loras or suffix not in expected | {ALPHA}:
                unknown.append(key)
                continue
            by_module.setdefault(name, {})[suffix] = t
        if unknown:
            raise TrainingError(f"the LoRA state has {len(unknown)} keys this network does not have (e.g. "
                                f"{unknown[0]}); it was made with other targets or settings")
        missing = [f"{n}.{s}" for n in self.loras for s in sorted(expected) if s not in by_module.get(n, {})]
        if missing:
            raise TrainingError(f"the LoRA state lacks {len(missing)} tensors of this network (e.g. {missing[0]}); "
                                f"it was made with other targets or settings")
        with torch.no_grad():
            for name, parts in by_module.items():
                lora = self.loras[name]
                for suffix, param in ((DOWN, lora.lora_down), (UP, lora.lora_up), (DORA, lora.dora_scale)):
                    if param is None:
                        continue
                    src = parts[suffix]
                    if tuple(src.shape) != tuple(param.shape):
                        raise TrainingError(f"{name}.{suffix} has shape {tuple(src.shape)}, the network expects "
                                            f"{tuple(param.shape)}; it was made with another rank or model")
                    param.copy_(src.to(device=param.device, dtype=param.dtype))
                if ALPHA in parts:
                    alpha = float(parts[ALPHA].float().reshape(()).item())
                    if alpha != lora.alpha:
                        log.info("%s: alpha %g from the loaded state replaces %g", name, alpha, lora.alpha)
                        lora.set_alpha(alpha)

    # ----------------------------------------------------------------------------------------------- attachment

    def set_enabled(self, enabled: bool) -> None:
        """Turn the LoRA contribution on or off (the hooks stay; off = the base model's outputs)."""
        self.enabled = bool(enabled)

    def remove(self) -> None:
        """Detach: remove every hook and restore the base parameters' requires_grad flags. Idempotent.

        The pipeline is then exactly as before: same modules, same weights (never written), no hooks of ours."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.pivotal is not None:
            self.pivotal.remove()
        for param, flag in self._frozen:
            param.requires_grad_(flag)
        self._frozen.clear()
        self.attached = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TrainingError("LoraTrainingNetwork is not called directly: run the pipeline's UNet / text encoder, "
                            "whose layers it hooks")


def _num(x: float) -> str:
    """A number as a user types it in sd-scripts' network_args ("4", "0.5")."""
    return str(int(x)) if float(x).is_integer() else str(float(x))


def _check_settings(rank: int, alpha: float | None, conv_rank: int | None, conv_alpha: float | None, dropout: float,
                    dtype: torch.dtype, targets: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if conv_rank is not None and (isinstance(conv_rank, bool) or not isinstance(conv_rank, int) or conv_rank < 1):
        raise ValueError(f"conv_rank must be a positive integer or None, got {conv_rank!r}")
    for label, value in (("alpha", alpha), ("conv_alpha", conv_alpha)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{label} must be a positive number or None, got {value!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(f"unknown targets {targets!r}; expected one of {', '.join(PRESETS)} or a callable")
    elif not callable(targets):
        raise ValueError(f"targets must be a preset name or a callable, got {type(targets).__name__}")
