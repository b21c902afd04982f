"""The shipped `shapes` base model: where it lives, how the name `shapes` selects it, how it is rebuilt.

The package ships it as a diffusers folder in fp16 (`lora_ext/data/shapes/`, with `recipe.json`: the recipe and
the measured numbers). A1111 needs a single file with a yaml whose text-encoder entry is an absolute path, so the
single file is written where it is needed (`write_checkpoint`, e.g. into `models/Stable-diffusion`); its bytes are
a function of the shipped folder (hash-checked by the tests).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from lora_ext.models import assets

logger = logging.getLogger(__name__)

NAME = assets.SHAPES_MODEL_NAME
CHECKPOINT_STEM = "lora_ext_shapes"


def shipped_dir() -> Path:
    return Path(assets.resolve_model_name(NAME))


def recipe_info() -> dict[str, Any]:
    path = shipped_dir() / "recipe.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def assemble(cfg: dict[str, dict], *, unet, vae, text_encoder):
    """A StableDiffusionPipeline from trained parts (the tiny models' assembly: same tokenizer, PNDM scheduler)."""
    from lora_ext.models.tiny import _assemble

    return _assemble("sd15", cfg, unet=unet, vae=vae, text_encoder=text_encoder)


def save_shipped(pipe, out_dir: Path, info: dict[str, Any]) -> Path:
    """Write the pipeline in fp16 as a diffusers folder with `recipe.json`; returns the folder."""
    import shutil

    import torch

    from lora_ext.models.tiny import (
        canonical_text_encoder_state_dict,
        save_diffusers_folder,
        save_safetensors_deterministic,
    )

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16)
    save_diffusers_folder(pipe, tmp, tokenizer_kinds=("clip",))
    # the text encoder with the hub's key names (`text_model.*`): transformers 5 saves without that level, and
    # transformers 4 (A1111's 4.30) would then load nothing
    te_file = tmp / "text_encoder" / "model.safetensors"
    te_sd = {k: v.contiguous() for k, v in canonical_text_encoder_state_dict(pipe.text_encoder).items()}
    te_file.unlink()
    save_safetensors_deterministic(te_sd, te_file, {"format": "pt"})
    pipe.to(torch.float32)
    (tmp / "recipe.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's weight files (relative name + bytes), in name order."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def write_checkpoint(dest_dir: str | os.PathLike, *, stem: str = CHECKPOINT_STEM, src: Path | None = None) -> Path:
    """The shapes model as an A1111 single file (fp16, LDM layout) plus its yaml and text-encoder folder, in
    `dest_dir` (e.g. the WebUI's models/Stable-diffusion). Returns the .safetensors path; kept when up to date."""
    import torch

    from lora_ext.models.loading import SINGLE_FILE_HINTS_KEY, load_pipeline
    from lora_ext.models.tiny import (
        pipeline_to_single_file,
        save_safetensors_deterministic,
        single_file_hints,
        write_a1111_sidecars,
    )

    src = Path(src) if src is not None else shipped_dir()
    dest = Path(dest_dir) / f"{stem}.safetensors"
    digest = folder_digest(src)
    if dest.is_file() and _file_source_digest(dest) == digest and dest.with_suffix(".yaml").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(src, dtype=torch.float32).pipe
    sd = {k: v.to(torch.float16) for k, v in pipeline_to_single_file(pipe, "sd1").items()}
    cfg = configs_of(pipe)
    metadata = {"format": "pt", "modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "lora_ext shapes",
                "lora_ext.note": "the shapes-world base model made by lora_ext (tools/make_shapes_model.py)",
                "lora_ext.source_digest": digest,
                SINGLE_FILE_HINTS_KEY: json.dumps(single_file_hints("sd15", cfg), sort_keys=True)}
    save_safetensors_deterministic(sd, dest, metadata)
    write_a1111_sidecars("sd15", dest, cfg=cfg)
    logger.info("wrote the shapes checkpoint %s", dest)
    return dest


def _file_source_digest(path: Path) -> str | None:
    from lora_ext.formats.safetensors_io import read_metadata

    try:
        return read_metadata(path).get("lora_ext.source_digest")
    except Exception:  # noqa: BLE001 - an unreadable file is rewritten
        return None


def configs_of(pipe) -> dict[str, dict]:
    return {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config),
            "text_encoder": pipe.text_encoder.config.to_dict()}

