"""Deterministic tiny random-weight SD1.5 and SDXL pipelines with the real module structure.

Same module tree (block types, levels, transformer depths, linear vs conv projections, text-time conditioning) as
the real models, with small widths matching the WebUI test harness (`make_tiny_ckpt.py`):

    sd15: UNet (32, 64, 128, 128), CrossAttn x3 + Down / Up + CrossAttn x3, 2 heads, context 32;
          VAE (32, 64, 128, 128); CLIP text 32 wide x 2 layers, 2 heads, MLP 64, quick_gelu; PNDM scheduler.
    sdxl: UNet (32, 64, 128), Down + CrossAttn x2, transformer depth (1, 2, 10), 16-channel heads, linear proj,
          context 64 (= 32 + 32), text_time embedding 256 per size value, 1568 = 32 + 6 x 256 inputs;
          VAE as sd15; TE1 as sd15; TE2 CLIPTextModelWithProjection 32 x 2 layers, MLP 128, gelu, projection 32;
          Euler scheduler.

Every parameter is random (also norm weights/biases and the layers real models zero-initialise), drawn from a
per-tensor generator seeded by (seed, component, parameter name): the weights depend only on the seed and the
module names, never on construction order or the global RNG. Tokenizers are the real shipped ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch

from lora_ext import families
from lora_ext.errors import ModelLoadError
from lora_ext.models import assets
from lora_ext.models.loading import SINGLE_FILE_HINTS_KEY, scheduler_from_config

logger = logging.getLogger(__name__)

TINY_ARCHS = ("sd15", "sdxl")
TINY_FORMATS = ("diffusers", "single-file")
# Open_clip model name of the tiny second text encoder, as in the WebUI harness (`make_tiny_ckpt.py --arch sdxl`).
TINY_SDXL_TE2_OPENCLIP_NAME = "tiny-sdxl-te2"

_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
              "projection_dim": 32}
_TINY_TEXT_2 = {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                "projection_dim": 32}
_TINY_VAE = {"block_out_channels": [32, 64, 128, 128], "sample_size": 64}


def tiny_configs(arch: str) -> dict[str, dict]:
    """Component configs of a tiny model: the shipped real configs with the widths overridden.

    Keys: unet, vae, text_encoder, [text_encoder_2], scheduler, model_index.
    """
    _check_arch(arch)
    real = families.family(arch).config()
    cfg = {c: assets.load_config(real, c) for c in ("model_index", "unet", "vae", "text_encoder", "scheduler")}
    cfg["vae"].update(_TINY_VAE)
    cfg["text_encoder"].update(_TINY_TEXT)
    if arch == "sd15":
        cfg["unet"].update(block_out_channels=[32, 64, 128, 128], attention_head_dim=2, cross_attention_dim=32,
                           sample_size=8)
    else:
        cfg["text_encoder_2"] = assets.load_config(real, "text_encoder_2")
        cfg["text_encoder_2"].update(_TINY_TEXT_2)
        context = _TINY_TEXT["hidden_size"] + _TINY_TEXT_2["hidden_size"]
        time_dim = cfg["unet"]["addition_time_embed_dim"]  # 256, as sgm's ConcatTimestepEmbedderND(outdim=256)
        # diffusers' `attention_head_dim` holds head *counts*; 16-channel heads like SDXL's 64-channel ones
        cfg["unet"].update(block_out_channels=[32, 64, 128], attention_head_dim=[2, 4, 8],
                           cross_attention_dim=context, sample_size=8,
                           projection_class_embeddings_input_dim=_TINY_TEXT_2["projection_dim"] + 6 * time_dim)
    return cfg


def build_tiny_pipeline(arch: str, seed: int = 0):
    """A tiny random-weight `StableDiffusionPipeline` (arch 'sd15') or `StableDiffusionXLPipeline` ('sdxl').

    fp32, CPU, eval mode, no safety checker. The same (arch, seed) gives bit-identical weights on every run.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = tiny_configs(arch)
    with torch.random.fork_rng(devices=[]):  # default initialisers draw from the global RNG: leave it untouched
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))
        te2 = None
        if arch == "sdxl":
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(cfg["text_encoder_2"]))
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2)):
        if module is not None:
            randomise_(module, seed, component)
            module.eval()
    return _assemble(arch, cfg, unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2)


def save_tiny_model(arch: str, out_dir: str | os.PathLike, fmt: str = "diffusers", *, seed: int = 0,
                    name: str | None = None) -> Path:
    """Build the tiny model and write it; returns the diffusers folder or the `.safetensors` file.

    fmt 'diffusers': a pipeline folder at `out_dir` (model_index.json, unet/, vae/, text_encoder/, tokenizer/, ...).
    fmt 'single-file': `out_dir/<name>.safetensors` (default name `tiny-<arch>`) in the original LDM (sd15) / SGM
    (sdxl) layout, fp32, plus what AUTOMATIC1111 needs to load a non-standard size (see `write_a1111_sidecars`).
    File bytes are identical for the same (arch, seed) (fixed metadata order).
    """
    if fmt not in TINY_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(TINY_FORMATS)}")
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(arch, seed)
    if fmt == "diffusers":
        save_diffusers_folder(pipe, out_dir, tokenizer_kinds=families.family(arch).tokenizers)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or 'tiny-' + arch}.safetensors"
    sd = pipeline_to_single_file(pipe, families.normalise_family(arch))
    metadata = {"format": "pt", "modelspec.architecture": families.family(arch).modelspec_architecture["epsilon"],
                "lora_ext.note": f"random tiny {arch} test checkpoint (seed {seed})",
                SINGLE_FILE_HINTS_KEY: json.dumps(single_file_hints(arch), sort_keys=True)}
    save_safetensors_deterministic(sd, path, metadata)
    write_a1111_sidecars(arch, path)
    return path


# --- building blocks shared with the loader ---------------------------------------------------------------------


def randomise_(module: torch.nn.Module, seed: int, component: str) -> None:
    """Overwrite every parameter of `module` in place with seeded random values.

    >=2-D weights ~ N(0, 1/fan_in) (fan_in = elements per output row); 1-D norm weights ~ 1 + N(0, 0.05^2);
    other 1-D parameters (biases) ~ N(0, 0.05^2). Each tensor has its own generator seeded from
    sha256("<seed>/<component>/<name>"), so values do not depend on iteration order. CLIP text models are named as
    on the hub (`text_model.*`) whatever the transformers version calls them.
    """
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_weights = {f"{m_name}.weight" if m_name else "weight"
                    for m_name, m in module.named_modules() if isinstance(m, norm_types)}
    with torch.no_grad():
        for p_name, p in module.named_parameters():
            name = _hub_clip_name(p_name) if _is_clip_text(module) else p_name
            digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
            gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            values = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                values *= 1.0 / math.sqrt(p[0].numel())
            elif p_name in norm_weights:
                values = 1.0 + 0.05 * values
            else:
                values *= 0.05
            p.copy_(values.to(p.dtype))


def _is_clip_text(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection")


def _hub_clip_name(name: str) -> str:
    """transformers >= 5.6 drops `text_model.` inside CLIPTextModel; the hub (and transformers 4) keep it."""
    return name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name


def _assemble(arch: str, cfg: dict[str, dict], *, unet, vae, text_encoder, text_encoder_2=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler_from_config(cfg["scheduler"])
    tokenizers = [assets.load_tokenizer(k) for k in families.family(arch).tokenizers]
    if arch == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_diffusers_folder(pipe, out_dir: Path, tokenizer_kinds: tuple[str, ...]) -> None:
    """`pipe.save_pretrained(out_dir)` (safetensors), then replace the tokenizer folders by the shipped files.

    transformers 5 writes only tokenizer.json; the shipped vocab.json/merges.txt files load with every transformers
    version (the WebUI pins 4.30) and keep the folder's bytes independent of the transformers version.
    """
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for sub, kind in zip(("tokenizer", "tokenizer_2"), tokenizer_kinds):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        shutil.copytree(assets.tokenizer_dir(kind), out_dir / sub)


def pipeline_to_single_file(pipe, family: str) -> dict[str, torch.Tensor]:
    """State dict of a diffusers pipeline in the original single-file layout (via `convert.diffusers_to_single_file`).

    Keys: model.diffusion_model.*, first_stage_model.*, cond_stage_model.* (sd1/sd2) or conditioner.embedders.{0,1}.*
    (sdxl). Tensors are contiguous copies.
    """
    from lora_ext.models import convert

    te_models = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    te_sds = [canonical_text_encoder_state_dict(m) for m in te_models]
    te_configs = [m.config.to_dict() for m in te_models]
    sd = convert.diffusers_to_single_file(
        family, dict(pipe.unet.state_dict()), dict(pipe.unet.config), dict(pipe.vae.state_dict()),
        dict(pipe.vae.config), te_sds, te_configs)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def canonical_text_encoder_state_dict(model) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict with the hub's key names (`text_model.*`, `text_projection.weight`).

    transformers >= 5.6 drops the `text_model.` level inside CLIPTextModel; files on disk and the converters use
    the canonical names.
    """
    return {_hub_clip_name(k): v for k, v in model.state_dict().items()}


def single_file_hints(arch: str, cfg: dict[str, dict] | None = None) -> dict[str, int]:
    """What `convert.single_file_to_diffusers` cannot read from a small model's shapes: head sizes, default size.

    Stored in the single file's metadata (`lora_ext.single_file_hints`) so `load_pipeline` rebuilds it exactly.
    `cfg`: the component configs (unet, vae, text_encoder); default the tiny model's.
    """
    cfg = cfg if cfg is not None else tiny_configs(arch)
    unet, te = cfg["unet"], cfg["text_encoder"]
    hints = {"te_head_channels": te["hidden_size"] // te["num_attention_heads"],
             "image_size": unet["sample_size"] * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)}
    heads = unet["attention_head_dim"]
    if isinstance(heads, int):
        hints["unet_heads"] = heads
    else:
        widths = {c // h for c, h in zip(unet["block_out_channels"], heads)}
        hints["unet_head_channels"] = widths.pop()
    return hints


def save_safetensors_deterministic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a .safetensors file whose bytes depend only on its content, atomically.

    safetensors serialises `__metadata__` from a Rust hash map (random key order per process); the header is
    rebuilt with the metadata keys sorted (the data offsets are relative to the data buffer, so its length may change).
    """
    import safetensors.torch

    from lora_ext.formats.safetensors_io import write_bytes_atomic
    from lora_ext.formats.safetensors_stream import encode_header

    blob = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
    write_bytes_atomic(path, encode_header(ordered) + blob[8 + n :])


# --- AUTOMATIC1111 sidecars ---------------------------------------------------------------------------------------

def write_a1111_sidecars(arch: str, ckpt: Path, cfg: dict[str, dict] | None = None) -> list[Path]:
    """Files AUTOMATIC1111 needs beside a tiny single file (it cannot infer non-standard widths from the keys).

    - `<stem>.yaml`: the ldm `v1-inference.yaml` (sd15) / sgm `sd_xl_base.yaml` (sdxl) model config with the tiny
      widths; A1111 uses a same-named yaml next to a checkpoint.
    - `<stem>.clip-text/`: config.json of the tiny CLIP text encoder + the shipped tokenizer; the yaml's
      FrozenCLIPEmbedder `version` points at it (absolute path, as in the harness).
    - sdxl only: `<stem>.open_clip.json`, the open_clip model config of the tiny second text encoder. The WebUI's
      open_clip finds model names only in its own `model_configs/` directory: copy it there as
      `tiny-sdxl-te2.json` (the harness's `make_tiny_ckpt.py --arch sdxl` writes the same config).
    `cfg`: the component configs (unet, vae, text_encoder[, text_encoder_2]); default the tiny model's.
    Returns the written paths.
    """
    ckpt = Path(ckpt)
    cfg = cfg if cfg is not None else tiny_configs(arch)
    te = cfg["text_encoder"]
    clip_dir = ckpt.with_name(ckpt.stem + ".clip-text")
    shutil.rmtree(clip_dir, ignore_errors=True)
    shutil.copytree(assets.tokenizer_dir("clip"), clip_dir)
    text_config = {k: te[k] for k in sorted(te) if k != "architectures"}
    text_config["architectures"] = ["CLIPTextModel"]
    (clip_dir / "config.json").write_text(json.dumps(text_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written = [clip_dir]
    yaml_path = ckpt.with_suffix(".yaml")
    if arch == "sd15":
        yaml_path.write_text(_sd15_yaml(cfg, clip_dir), encoding="utf-8")
    else:
        yaml_path.write_text(_sdxl_yaml(cfg, clip_dir), encoding="utf-8")
        oc = ckpt.with_name(ckpt.stem + ".open_clip.json")
        oc.write_text(json.dumps(_open_clip_te2_config(cfg), indent=2) + "\n", encoding="utf-8")
        written.append(oc)
    written.append(yaml_path)
    return written


def _open_clip_te2_config(cfg: dict[str, dict]) -> dict:
    te2 = cfg["text_encoder_2"]
    return {"embed_dim": te2["projection_dim"],
            # the vision tower is required by open_clip's config schema; sgm deletes it after construction
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": te2["max_position_embeddings"], "vocab_size": te2["vocab_size"],
                         "width": te2["hidden_size"], "heads": te2["num_attention_heads"],
                         "layers": te2["num_hidden_layers"]}}


def _sd15_yaml(cfg: dict[str, dict], clip_dir: Path) -> str:
    u, v = cfg["unet"], cfg["vae"]
    ch = u["block_out_channels"]
    return _SD15_YAML.format(
        model_channels=ch[0], channel_mult=_mult(ch), num_heads=u["attention_head_dim"],
        context_dim=u["cross_attention_dim"], vae_ch=v["block_out_channels"][0],
        vae_mult=_mult(v["block_out_channels"]), vae_layers=v.get("layers_per_block", 2),
        scale_factor=v["scaling_factor"], version=json.dumps(str(clip_dir)))


def _sdxl_yaml(cfg: dict[str, dict], clip_dir: Path) -> str:
    u, v = cfg["unet"], cfg["vae"]
    ch = u["block_out_channels"]
    heads = u["attention_head_dim"]
    head_channels = {c // h for c, h in zip(ch, heads)}
    if len(head_channels) != 1:
        raise ModelLoadError(f"sgm needs one head width for all levels, got {sorted(head_channels)}")
    return _SDXL_YAML.format(
        adm_in_channels=u["projection_class_embeddings_input_dim"], model_channels=ch[0], channel_mult=_mult(ch),
        num_head_channels=head_channels.pop(), transformer_depth=list(u["transformer_layers_per_block"]),
        context_dim=u["cross_attention_dim"], layer_idx=cfg["text_encoder"]["num_hidden_layers"] - 1,
        version=json.dumps(str(clip_dir)), te2_arch=TINY_SDXL_TE2_OPENCLIP_NAME,
        time_dim=u["addition_time_embed_dim"], vae_ch=v["block_out_channels"][0],
        vae_mult=_mult(v["block_out_channels"]), scale_factor=v["scaling_factor"])


def _mult(channels: list[int]) -> list[int]:
    return [c // channels[0] for c in channels]


_SD15_YAML = """\
# small SD1.5-structured model made by lora_ext (lora_ext.models.tiny / lora_ext.shapes); AUTOMATIC1111 reads this
# file next to the checkpoint
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scale_factor}
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: {model_channels}
        attention_resolutions: [4, 2, 1]
        num_res_blocks: 2
        channel_mult: {channel_mult}
        num_heads: {num_heads}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {context_dim}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: {vae_ch}
          ch_mult: {vae_mult}
          num_res_blocks: {vae_layers}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {version}
"""

_SDXL_YAML = """\
# tiny SDXL-structured model for tests (lora_ext.models.tiny); AUTOMATIC1111 reads this file next to the checkpoint.
# The second text encoder's open_clip config ({te2_arch}) must be in the WebUI's open_clip model_configs/.
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: {scale_factor}
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm_in_channels}
        num_classes: sequential
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: {model_channels}
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: {channel_mult}
        num_head_channels: {num_head_channels}
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: {transformer_depth}
        context_dim: {context_dim}
        spatial_transformer_attn_type: softmax-xformers
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: {layer_idx}
              version: {version}
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: {te2_arch}
              version: null
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {time_dim}
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {time_dim}
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: {time_dim}
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: {vae_ch}
          ch_mult: {vae_mult}
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def _check_arch(arch: str) -> None:
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; valid: {', '.join(TINY_ARCHS)}")

