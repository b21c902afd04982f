"""The recipe of the `shapes` base model: an SD1.5-structured model trained from scratch on the shapes world.

Four stages, each seeded, on the CPU (the numbers below are the recipe; `tools/make_shapes_model.py` runs it):

1. the VAE (SD's AutoencoderKL, 4 levels so latents are 1/8 of the image, 4 latent channels) learns to reconstruct
   world images (MSE + a small KL term);
2. the training set (world images, a fixed seed) is encoded once; the latents' spread sets `scaling_factor`;
3. the text encoder (CLIPTextModel with SD1.5's names, the real CLIP tokenizer) and the UNet (UNet2DConditionModel
   with SD1.5's block types, two res blocks per level, cross-attention on three levels) learn together with SD1.5's
   noise schedule (scaled-linear betas, epsilon prediction), 10% empty captions for classifier-free guidance, and an
   exponential moving average of the weights that is what gets shipped;
4. the VAE's decoder is fine-tuned on the latents of the frozen encoder (as Stability's "ft-MSE" VAE was for SD):
   same losses, the encoder untouched, so the latent space the UNet learned is the same and only the drawing of those
   latents gets sharper (a star's points: the judge read about a third of the first decoder's reconstructed stars as
   stars). It starts from the VAE rounded to fp16, the weights that ship, so the decoder learns on the latents the
   shipped encoder gives.

Everything runs in float32 with one intra-op thread count fixed by the caller; the same torch build and thread count
give the same numbers (PyTorch's CPU kernels are deterministic for these ops).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lora_ext.models import assets
from lora_ext.shapes import world

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    side: int = world.SIDE
    train_images: int = 6000
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    vae_l1: float = 0.5  # weight of an L1 term (sharper flat colours than MSE alone)
    vae_edge: float = 1.0  # weight of an L1 term on image gradients (sharp shape outlines)
    unet_images: int = 30000  # the UNet's training set: the VAE's images and more from the same stream
    unet_steps: int = 7000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.999
    empty_caption: float = 0.1
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023): faster convergence
    unet_channels: tuple[int, ...] = (32, 64, 64, 64)
    unet_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    vae_layers: int = 1
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    dec_steps: int = 1000  # stage 4: decoder fine-tune on the frozen encoder's latents
    dec_batch: int = 16
    dec_lr: float = 5e-4
    dec_warmup: int = 100


def configs(r: Recipe) -> dict[str, dict]:
    """Component configs: SD1.5's shipped configs with the widths of the recipe."""
    cfg = {c: assets.load_config("sd15", c) for c in ("model_index", "unet", "vae", "text_encoder", "scheduler")}
    cfg["vae"].update(block_out_channels=list(r.vae_channels), layers_per_block=r.vae_layers, sample_size=r.side)
    cfg["text_encoder"].update(hidden_size=r.text_width, intermediate_size=4 * r.text_width,
                               num_attention_heads=r.text_heads, num_hidden_layers=r.text_layers,
                               projection_dim=r.text_width)
    cfg["unet"].update(block_out_channels=list(r.unet_channels), attention_head_dim=r.unet_heads,
                       cross_attention_dim=r.text_width, sample_size=r.side // 8)
    return cfg


def training_set(r: Recipe, n: int | None = None) -> tuple[np.ndarray, list[world.Scene], list[tuple[float, float]]]:
    """The first `n` (default `train_images`) images of the recipe's fixed stream (uint8, n x side x side x 3), with
    their scenes and jitters."""
    n = r.train_images if n is None else n
    rng = random.Random(r.seed)
    images, scenes, jitters = np.empty((n, r.side, r.side, 3), np.uint8), [], []
    for i in range(n):
        scene = world.sample_scene(rng)
        jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))
        images[i] = np.asarray(world.render(scene, r.side, jitter=jitter))
        scenes.append(scene)
        jitters.append(jitter)
    return images, scenes, jitters


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def train_vae(r: Recipe, cfg: dict, images: np.ndarray, log: Callable[[str], None] = logger.info):
    from diffusers import AutoencoderKL

    torch.manual_seed(r.seed + 1)
    vae = AutoencoderKL.from_config(cfg["vae"])
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    gen = np.random.default_rng(r.seed + 2)
    t0 = time.perf_counter()
    vae.train()
    for step in range(r.vae_steps):
        for g in opt.param_groups:
            g["lr"] = r.vae_lr * _lr_at(step, r.vae_steps, r.warmup)
        x = _to_tensor(images[gen.integers(0, len(images), r.vae_batch)])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(step))
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = _reconstruction_loss(r, rec, x, extra=r.vae_kl * kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == r.vae_steps - 1:
            log(f"vae step {step}/{r.vae_steps} mse {mse.item():.5f} kl {kl.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    return vae


def finetune_decoder(r: Recipe, vae, images: np.ndarray, log: Callable[[str], None] = logger.info):
    """Stage 4: the decoder (and post-quant conv) learns again on the frozen encoder's latents of `images`, from the
    VAE's fp16-rounded weights; the encoder's weights stay bit for bit. Returns the VAE (eval mode)."""
    if not r.dec_steps:
        return vae
    vae.to(torch.float16).to(torch.float32)  # start from the weights as shipped
    vae.eval()
    means, stds = encode(vae, images)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=r.dec_lr, weight_decay=0.0)
    gen = np.random.default_rng(r.seed + 6)
    noise = torch.Generator().manual_seed(r.seed + 7)
    t0 = time.perf_counter()
    vae.decoder.train()
    for step in range(r.dec_steps):
        for g in opt.param_groups:
            g["lr"] = r.dec_lr * _lr_at(step, r.dec_steps, r.dec_warmup)
        idx = gen.integers(0, len(images), r.dec_batch)
        x = _to_tensor(images[idx])
        index = torch.from_numpy(idx)
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=noise)
        rec = vae.decode(z).sample
        loss = _reconstruction_loss(r, rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == r.dec_steps - 1:
            log(f"decoder step {step}/{r.dec_steps} loss {loss.item():.5f} ({time.perf_counter() - t0:.0f} s)")
    vae.requires_grad_(True)
    return vae.eval()


def _reconstruction_loss(r: Recipe, rec: torch.Tensor, x: torch.Tensor, extra: torch.Tensor | None = None):
    """MSE (+ `extra`, stage 1's KL term, added in this order so stage 1's numbers stay those of the first
    recipe) + L1 + L1 on image gradients."""
    loss = torch.nn.functional.mse_loss(rec, x)
    if extra is not None:
        loss = loss + extra
    if r.vae_l1:
        loss = loss + r.vae_l1 * (rec - x).abs().mean()
    if r.vae_edge:
        loss = loss + r.vae_edge * (_gradients(rec) - _gradients(x)).abs().mean()
    return loss


def _gradients(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([(x[..., 1:, :] - x[..., :-1, :]).flatten(1), (x[..., :, 1:] - x[..., :, :-1]).flatten(1)], 1)


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (float32)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(_to_tensor(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(r: Recipe, cfg: dict, means: torch.Tensor, stds: torch.Tensor, scenes: list[world.Scene],
               scale: float, log: Callable[[str], None] = logger.info):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(r.seed + 3)
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    te = CLIPTextModel(CLIPTextConfig.from_dict(cfg["text_encoder"]))
    tok = assets.load_tokenizer("clip")
    sched = DDPMScheduler.from_config(cfg["scheduler"])
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    rng = random.Random(r.seed + 4)
    gen = torch.Generator().manual_seed(r.seed + 5)
    alphas = sched.alphas_cumprod
    t0 = time.perf_counter()
    unet.train()
    te.train()
    for step in range(r.unet_steps):
        for g in opt.param_groups:
            g["lr"] = r.unet_lr * _lr_at(step, r.unet_steps, r.warmup)
        idx = [rng.randrange(len(scenes)) for _ in range(r.unet_batch)]
        captions = ["" if rng.random() < r.empty_caption else world.training_caption(scenes[i], rng) for i in idx]
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        index = torch.tensor(idx)
        z = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(idx),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        context = te(ids)[0]
        pred = unet(noisy, t, context).sample
        loss = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if r.snr_gamma:
            snr = a.flatten() / (1 - a.flatten())
            loss = loss * snr.clamp(max=r.snr_gamma) / snr
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(r.ema, (1 + step) / (10 + step))
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == r.unet_steps - 1:
            log(f"unet step {step}/{r.unet_steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    return ema_unet.eval(), ema_te.eval()


def recipe_dict(r: Recipe) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()}


def stage_digest(r: Recipe, stage: str) -> str:
    """A short digest of the recipe fields a stage depends on ('vae': the data and VAE fields; 'unet': all but the
    decoder fine-tune's; 'decoder': all)."""
    import hashlib
    import json

    fields = recipe_dict(r)
    if stage == "vae":
        fields = {k: v for k, v in fields.items() if k in ("seed", "side", "train_images") or k.startswith("vae_")}
    elif stage == "unet":
        fields = {k: v for k, v in fields.items() if not k.startswith("dec_")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
