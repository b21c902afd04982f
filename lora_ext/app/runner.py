"""Generation with `<lora:...>` tags on a diffusers pipeline: the CLI's host of `lora_ext.session`.

A `Session` keeps the pipeline and a `LoraSession` (patcher, parsed-file cache) between images, so switching LoRA sets
only recomputes the layers that change. Names resolve as in the WebUI (the catalogue of the LoRA folders, A1111's
rules), `start=`/`stop=` switch the UNet part per step as in the WebUI, textual inversions bundled in the files
(`bundle_emb.*`) work in the prompt as in the WebUI, and the PNG gets the WebUI's infotext.
Weights are restored after every image, also when generation fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ext.formats.infotext import GenerationParameters
from lora_ext.library.index import LoraIndex
from lora_ext.library.lookup import IndexResolver
from lora_ext.patch import LoraCache, Patcher, PatchReport, adapter_for_pipeline
from lora_ext.patch.bypass import GenerationShape
from lora_ext.patch.embeddings import EmbeddingError, TokenInjector, attach_bundled, fitted_vectors
from lora_ext.prompt import LoraRef, parse_prompt
from lora_ext.session import Activation, LoraSession, step_of_call

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
    notes: list[str] = field(default_factory=list)  # how changing or FP8 LoRAs were applied (merge or bypass)

    def report_lines(self) -> list[str]:
        lines = [n.summary() for n in self.report.networks]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"note: {n}" for n in self.notes]
        if self.report.networks:
            lines.append(f"patched {self.report.layers_recomputed} layers in {self.report.seconds * 1000:.0f} ms")
        return lines

    def to_dict(self) -> dict:
        return {"out": str(self.out) if self.out else None, "prompt": self.prompt,
                "loras": [{"name": r.name, "te": r.te, "unet": r.unet} for r in self.refs],
                "report": self.report.to_dict(), "warnings": self.warnings, "infotext": self.infotext}


def lora_session(lora_dirs: Sequence[Path], cache: LoraCache | None = None) -> LoraSession:
    """The session for diffusers pipelines over the catalogue of `lora_dirs` (no index cache file)."""
    return LoraSession(adapter_for_pipeline, IndexResolver(LoraIndex(list(lora_dirs))), cache=cache)


class Session:
    """A loaded pipeline with its LoRA session. Use one per model."""

    def __init__(self, model: Path, *, scheduler: str | None = "euler", cache: LoraCache | None = None,
                 pipe: Any = None, arch: str | None = None, loras: LoraSession | None = None,
                 lora_dirs: Sequence[Path] = ()) -> None:
        if pipe is None:
            from lora_ext.models.loading import load_pipeline

            loaded = load_pipeline(model, scheduler=scheduler)
            pipe, arch = loaded.pipe, loaded.arch
        self.model = model
        self.pipe = pipe
        self.arch = arch
        self.scheduler = scheduler or "default"
        self.loras = loras or lora_session(lora_dirs, cache)
        self._lora_dirs = tuple(Path(d) for d in lora_dirs)
        self.loras.bind(pipe)

    @property
    def patcher(self) -> Patcher:
        return self.loras.bind(self.pipe)

    def use_lora_dirs(self, lora_dirs: Sequence[Path]) -> None:
        """Resolve names in `lora_dirs` from now on (the parsed-file cache and the patcher are kept)."""
        dirs = tuple(Path(d) for d in lora_dirs)
        if dirs != self._lora_dirs:
            self.loras.resolver = IndexResolver(LoraIndex(list(dirs)))
            self._lora_dirs = dirs

    def generate(self, prompt: str, negative: str = "", *, seed: int = 0, steps: int = 20, width: int = 512,
                 height: int = 512, cfg: float = 7.0, lora_dirs: Sequence[Path] | None = None, skip_bad: bool = False,
                 out: Path | None = None) -> GenerateResult:
        """One image. Without `skip_bad` the first unusable tag raises its LoraExtError (nothing generated)."""
        from lora_ext.app.generate import generate_image

        text, refs = parse_prompt(prompt)
        if lora_dirs is not None:
            self.use_lora_dirs(lora_dirs)
        try:
            act = self.loras.activate(self.pipe, refs, strict=not skip_bad,
                                      shape=GenerationShape(steps=steps, height=height, width=width))
            on_step = None
            if self.loras.has_windows:
                self.loras.at_step(0, steps)

                def on_step(call: int, calls: int) -> None:
                    self.loras.at_step(step_of_call(call, calls, steps), steps)

            injectors = self._bundled_embeddings(act, strict=not skip_bad)
            try:
                image = generate_image(self.pipe, text, negative, seed=seed, steps=steps, width=width,
                                       height=height, cfg=cfg, on_step=on_step)
            finally:
                for injector in injectors:
                    injector.remove()
        finally:
            self.loras.restore()
        info = GenerationParameters(prompt=prompt, negative=negative, steps=steps, sampler=self.scheduler, cfg=cfg,
                                    seed=seed, width=width, height=height, lora_hashes=act.hashes).text()
        if out is not None:
            save_png(image, out, info)
        return GenerateResult(out=out, prompt=text, refs=refs, report=act.report or PatchReport(),
                              warnings=act.problems, infotext=info, image=image, notes=act.notes)


    def _bundled_embeddings(self, act: Activation, *, strict: bool) -> list[TokenInjector]:
        """The textual inversions bundled in the applied LoRAs, active in the prompt while the image is made (as the
        WebUI's built-in does: the embedding's name in the prompt stands for its vectors). The first file that
        bundles a name wins; an embedding this model cannot use raises EmbeddingError (strict) or is left out."""
        embeddings: dict[str, dict] = {}
        for name, net in zip(act.applied, act.networks, strict=True):
            for emb_name, tensors in net.bundled_embeddings.items():
                if emb_name in embeddings:
                    act.problems.append(f"{name}: bundled embedding {emb_name!r} skipped: another LoRA of the prompt "
                                        "bundles the same name")
                    continue
                try:
                    fitted_vectors(self.pipe, emb_name, tensors)  # fits this model?
                except EmbeddingError as err:
                    if strict:
                        raise
                    act.problems.append(f"{name}: {err}")
                    continue
                embeddings[emb_name] = tensors
        return attach_bundled(self.pipe, embeddings)


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
    loras = lora_session(req.lora_dirs)
    loras.prepare(refs, strict=not req.skip_bad)
    session = Session(req.model, scheduler=req.scheduler, loras=loras, lora_dirs=req.lora_dirs)
    return session.generate(req.prompt, req.negative, seed=req.seed, steps=req.steps, width=req.width,
                            height=req.height, cfg=req.cfg, skip_bad=req.skip_bad, out=req.out)
