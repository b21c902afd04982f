"""The model side of training: what family a base model is, text encoding as the pipelines do it, and the
`Denoiser` module accelerate prepares (UNet + text encoders + the LoRA network whose hooks live on their layers)."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_ext.errors import LoraExtError

logger = logging.getLogger(__name__)


def peek_model_family(path: str | Path, prediction_type: str | None = None) -> tuple[str, str]:
    """(arch, prediction_type) of a base model without loading its weights where possible.

    Diffusers folder: the configs. `.safetensors`: the header's key names and metadata. Other single files (pickles)
    must be read in full. Raises ModelLoadError. The name `shapes` is the shipped shapes model.
    """
    from lora_ext.errors import ModelLoadError
    from lora_ext.models import convert, loading
    from lora_ext.models.assets import resolve_model_name

    path = resolve_model_name(path)

    p = Path(path)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{p}: not a diffusers model folder (no model_index.json)")
        try:
            unet = json.loads((p / "unet" / "config.json").read_text(encoding="utf-8"))
            te_file = p / "text_encoder" / "config.json"
            te = json.loads(te_file.read_text(encoding="utf-8")) if te_file.is_file() else None
            sched_file = p / "scheduler" / "scheduler_config.json"
            sched = json.loads(sched_file.read_text(encoding="utf-8")) if sched_file.is_file() else {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{p}: cannot read the model configs ({exc})") from exc
        return loading.family_from_configs(unet, te), prediction_type or sched.get("prediction_type", "epsilon")
    if p.suffix.lower() == ".safetensors" and p.is_file():
        from lora_ext.formats.safetensors_io import read_header

        try:
            header = read_header(p)
        except LoraExtError as exc:
            raise ModelLoadError(f"{p}: cannot read the checkpoint header ({exc})") from exc
        arch = convert.detect_single_file_arch(dict.fromkeys(header.tensors))
        meta = header.metadata.get("modelspec.prediction_type") or header.metadata.get("prediction_type") or ""
        if prediction_type is None:
            prediction_type = "v_prediction" if meta.strip().lower() in ("v", "v_prediction") else "epsilon"
        return arch, prediction_type
    loaded = loading.load_pipeline(p, prediction_type=prediction_type)
    return loaded.arch, loaded.prediction_type


def tokenize(tokenizer: Any, captions: Sequence[str]) -> Tensor:
    """Token ids [B, model_max_length] (padded and truncated, as the pipelines do)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests the layers in .text_model
    return inner.final_layer_norm


def encode_text(arch: str, text_encoders: Sequence[nn.Module], input_ids: Sequence[Tensor], clip_skip: int
                ) -> tuple[Tensor, Tensor | None]:
    """(encoder_hidden_states [B, 77, D], pooled [B, P] for SDXL else None).

    SD1/SD2: the last layer's output (clip_skip 1), else the output of the clip_skip-th last layer passed through the
    final layer norm (AUTOMATIC1111 / sd-scripts). SDXL: both encoders' penultimate hidden states (moved back by
    clip_skip - 1), concatenated, and the second encoder's projected pooled output (diffusers' SDXL scripts).
    """
    if arch != "sdxl":
        te = text_encoders[0]
        ids = input_ids[0].to(te.device)
        if clip_skip <= 1:
            return te(ids)[0], None
        out = te(ids, output_hidden_states=True)
        return _final_layer_norm(te)(out.hidden_states[-clip_skip]), None
    hidden, pooled = [], None
    for te, ids in zip(text_encoders, input_ids):
        out = te(ids.to(te.device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-(clip_skip + 1)])
    return torch.cat(hidden, dim=-1), pooled


class Denoiser(nn.Module):
    """What accelerate prepares (and DDP wraps): the UNet, the text encoders and the LoRA network, whose hooks live
    on their layers. forward = text encoding (unless embeddings are given) + the UNet's prediction [B, C, h, w]."""

    def __init__(self, arch: str, unet: nn.Module, text_encoders: Sequence[nn.Module], network: nn.Module, *,
                 clip_skip: int, train_text_encoder: bool) -> None:
        super().__init__()
        self.arch = arch
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.network = network
        self.clip_skip = clip_skip
        self.train_text_encoder = train_text_encoder

    def encode(self, input_ids: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        ctx = contextlib.nullcontext() if self.train_text_encoder else torch.no_grad()
        with ctx:
            return encode_text(self.arch, list(self.text_encoders), input_ids, self.clip_skip)

    def forward(self, noisy_latents: Tensor, timesteps: Tensor, *, input_ids: Sequence[Tensor] | None = None,
                embeddings: tuple[Tensor, Tensor | None] | None = None, add_time_ids: Tensor | None = None
                ) -> Tensor:
        hidden, pooled = embeddings if embeddings is not None else self.encode(input_ids or [])
        unet_dtype = next(self.unet.parameters()).dtype
        kwargs: dict[str, Any] = {}
        if self.arch == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet_dtype),
                                           "time_ids": add_time_ids.to(device=hidden.device, dtype=unet_dtype)}
        return self.unet(noisy_latents.to(unet_dtype), timesteps, hidden.to(unet_dtype), **kwargs).sample


def enable_text_encoder_checkpointing(text_encoder: Any) -> None:
    """Activation checkpointing for a transformers text encoder, non-reentrant where transformers lets us choose
    (>= 4.35; 5.x renamed the method). Older ones checkpoint re-entrantly, which gives the LoRA weights inside no
    gradient unless the layers' input requires grad: the embeddings' output is made to (their weights stay frozen)."""
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif "gradient_checkpointing_kwargs" in inspect.signature(text_encoder.gradient_checkpointing_enable).parameters:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable()
        text_encoder.enable_input_require_grads()
