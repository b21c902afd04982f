"""Generation with `<lora:...>` tags on a diffusers pipeline: parse tags, resolve files, patch, generate, restore.

A `Session` keeps the pipeline, its patcher and the parsed-file cache between images, so switching LoRA sets only
recomputes the layers that change. Weights are restored after every image, also when generation fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ext.errors import LoraExtError
from lora_ext.patch import ActiveLora, LoraCache, Patcher, PatchReport, adapter_for_pipeline
from lora_ext.prompt import LoraRef, parse_prompt, resolve_lora_path

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    model: Path
    prompt: str
    out: Path
    negative: str = ""
    seed: int = 0
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg: float = 7.0
    scheduler: str | None = "euler"
    lora_dirs: list[Path] = field(default_factory=list)
    skip_bad: bool = False


@dataclass
class GenerateResult:
    out: Path | None
    prompt: str  # the prompt without LoRA tags, as given to the pipeline
    refs: list[LoraRef]
    report: PatchReport
    warnings: list[str]
    infotext: str
    image: Any = None

    def report_lines(self) -> list[str]:
        lines = [n.summary() for n in self.report.networks]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.report.networks:
            lines.append(f"patched {self.report.layers_recomputed} layers in {self.report.seconds * 1000:.0f} ms")
        return lines

    def to_dict(self) -> dict:
        return {"out": str(self.out) if self.out else None, "prompt": self.prompt,
                "loras": [{"name": r.name, "te": r.te, "unet": r.unet} for r in self.refs],
                "report": self.report.to_dict(), "warnings": self.warnings, "infotext": self.infotext}


def infotext(prompt: str, negative: str, *, steps: int, sampler: str, cfg: float, seed: int, width: int, height: int,
             lora_hashes: dict[str, str]) -> str:
    """A1111-style generation parameters (what the WebUI writes into the PNG's "parameters" text)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    params = [f"Steps: {steps}", f"Sampler: {sampler}", f"CFG scale: {cfg:g}", f"Seed: {seed}",
              f"Size: {width}x{height}"]
    if lora_hashes:
        params.append('Lora hashes: "' + ", ".join(f"{k}: {v}" for k, v in lora_hashes.items()) + '"')
    lines.append(", ".join(params))
    return "\n".join(lines)


class Session:
    """A loaded pipeline with a patcher. Use one per model."""

    def __init__(self, model: Path, *, scheduler: str | None = "euler", cache: LoraCache | None = None,
                 pipe: Any = None, arch: str | None = None) -> None:
        if pipe is None:
            from lora_ext.models.loading import load_pipeline

            loaded = load_pipeline(model, scheduler=scheduler)
            pipe, arch = loaded.pipe, loaded.arch
        self.model = model
        self.pipe = pipe
        self.arch = arch
        self.scheduler = scheduler or "default"
        self.patcher = Patcher(adapter_for_pipeline(pipe))
        self.cache = cache or LoraCache()

    def activate(self, refs: list[LoraRef], lora_dirs: list[Path], skip_bad: bool) -> tuple[PatchReport, list[str],
                                                                                               dict[str, str]]:
        from lora_ext.formats.hashes import lora_short_hash

        warnings: list[str] = []
        actives: list[ActiveLora] = []
        hashes: dict[str, str] = {}
        for ref in refs:
            try:
                path = resolve_lora_path(ref.name, lora_dirs)
                net = self.cache.get(path, name=ref.name)
            except LoraExtError as err:
                if not skip_bad:
                    raise
                warnings.append(f"{ref.tag}: {err}")
                continue
            if ref.start is not None or ref.stop is not None:
                warnings.append(f"{ref.tag}: start=/stop= are parsed but not applied yet; the LoRA is active for "
                                "all steps")
            actives.append(ActiveLora(net, te=ref.te, unet=ref.unet, dyn=ref.dyn, block_weights=ref.lbw))
            hashes[ref.name] = lora_short_hash(path, net.metadata)
        report = self.patcher.apply(actives, skip_bad=skip_bad)
        for n in report.networks:
            if n.error:
                hashes.pop(n.name, None)
        return report, warnings, hashes

    def generate(self, prompt: str, negative: str = "", *, seed: int = 0, steps: int = 20, width: int = 512,
                 height: int = 512, cfg: float = 7.0, lora_dirs: list[Path] | None = None, skip_bad: bool = False,
                 out: Path | None = None) -> GenerateResult:
        from lora_ext.app.generate import generate_image

        text, refs = parse_prompt(prompt)
        try:
            report, warnings, hashes = self.activate(refs, list(lora_dirs or []), skip_bad)
            image = generate_image(self.pipe, text, negative, seed=seed, steps=steps, width=width, height=height,
                                   cfg=cfg)
        finally:
            self.patcher.restore()
        info = infotext(prompt, negative, steps=steps, sampler=self.scheduler, cfg=cfg, seed=seed, width=width,
                        height=height, lora_hashes=hashes)
        if out is not None:
            save_png(image, out, info)
        return GenerateResult(out=out, prompt=text, refs=refs, report=report, warnings=warnings, infotext=info,
                              image=image)


def save_png(image: Any, out: Path, parameters: str) -> None:
    """Write a PNG with the A1111 "parameters" text chunk, atomically."""
    import io

    from PIL import PngImagePlugin

    from lora_ext.formats.safetensors_io import write_bytes_atomic

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, buf.getvalue())


def generate_with_loras(req: GenerateRequest) -> GenerateResult:
    """One image. Tags are parsed and LoRA files read before the model is loaded, so bad input fails fast."""
    _, refs = parse_prompt(req.prompt)
    cache = LoraCache()
    for ref in refs:
        try:
            cache.get(resolve_lora_path(ref.name, req.lora_dirs), name=ref.name)
        except LoraExtError:
            if not req.skip_bad:
                raise
    session = Session(req.model, scheduler=req.scheduler, cache=cache)
    return session.generate(req.prompt, req.negative, seed=req.seed, steps=req.steps, width=req.width,
                            height=req.height, cfg=req.cfg, lora_dirs=req.lora_dirs, skip_bad=req.skip_bad,
                            out=req.out)
