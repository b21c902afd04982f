"""A full-size SDXL-shaped random checkpoint and a LoRA for it, for the real-Forge SDXL test (Forge recognises a model
by its real shapes, so the tiny SDXL of the A1111 harness does not load there). Run with the project's Python:

    python tests/webui/make_full_ckpt.py sdxl CKPT LORA

The UNet, VAE and both text encoders are built from the configs Forge ships
(`$SD_WEBUI_DIR/backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0`) with random fp16 weights (torch's
default initialisation, seeded), written in the SGM single-file layout by `lora_ext.models.convert` (6.9 GB). The LoRA
(rank 4, kohya's SDXL names: `lora_unet_<compvis path>`, `lora_te1_`, `lora_te2_`) covers the UNet's cross-attention
key/value projections and every text-encoder layer kohya trains: enough to change the image, small enough that the
backups of two handlers fit beside the fp32 model in 24 GB. (SD2 built the same way draws black images in Forge:
default initialisation is not enough there; not offered.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_ext.formats.safetensors_io import save_safetensors_atomic
from lora_ext.models.convert import diffusers_to_single_file
from lora_ext.patch.keymap import adapter_for_pipeline
from lora_ext.patch.synth import SynthSpec, make_lora_tensors
from lora_ext.patch.targets import is_cross_kv

REPOS = {"sdxl": "stable-diffusion-xl-base-1.0"}


def main(arch: str, ckpt: str, lora: str) -> None:
    config = Path(os.environ["SD_WEBUI_DIR"], "backend", "huggingface", "stabilityai", REPOS[arch])

    def read(part: str) -> dict:
        return {k: v for k, v in json.loads((config / part / "config.json").read_text()).items()
                if not k.startswith("_")}

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # built in fp16 directly: SDXL 6.9 GB instead of 14
    unet = UNet2DConditionModel.from_config(read("unet"))
    vae = AutoencoderKL.from_config(read("vae"))
    encoders = [CLIPTextModel(CLIPTextConfig(**read("text_encoder"))),
                CLIPTextModelWithProjection(CLIPTextConfig(**read("text_encoder_2")))]
    torch.set_default_dtype(torch.float32)
    adapter = adapter_for_pipeline(SimpleNamespace(unet=unet, text_encoder=encoders[0], text_encoder_2=encoders[1]))

    def select(target) -> bool:
        return target.component != "unet" or is_cross_kv(target)

    tensors = make_lora_tensors(adapter, SynthSpec(rank=4, std=0.1), select=select, seed=3)
    save_safetensors_atomic(tensors, Path(lora))
    sd = diffusers_to_single_file(arch, unet.state_dict(), unet.config, vae.state_dict(), vae.config,
                                  [te.state_dict() for te in encoders], [te.config for te in encoders])
    del unet, vae, encoders
    tmp = Path(ckpt + ".part")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    tmp.replace(ckpt)
    print(json.dumps({"tensors": len(sd), "lora_modules": len({k.split(".", 1)[0] for k in tensors})}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
