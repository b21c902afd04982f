"""The training service behind the tab and the REST API: one object per host (WebUI or standalone app).

It turns form/JSON values into a validated `TrainConfig` (the CLI's rules plus the host's: paths must stay inside the
configured roots, the output name must be free unless overwrite is ticked, the dataset must yield images), previews
the dataset (the backend's dry run), and runs jobs through `lora_ext.train.jobs.JobRunner` (one at a time, state from
the child's events, GPU hand-off around every job). Nothing here imports gradio or FastAPI.

    service = TrainService(Roots(datasets=[...], models=[...], lora_dir=..., work_dir=...),
                           current_model=lambda: "/path/of/the/webui/checkpoint.safetensors",
                           hooks=GpuHandoff(before=..., after=...), on_new_lora=refresh_catalogue)
    service.preview(values)       # family, buckets, steps and formula, thumbnails with captions, problems
    job = service.start(values)   # ConfigError(field=...) / PathNotAllowed / JobConflict: nothing starts
    service.view(job.id)          # the live view: progress, losses, lr, it/s, ETA, memory, samples, log tail
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ext.errors import ConfigError, LoraExtError
from lora_ext.models.assets import SHAPES_MODEL_NAME, resolve_model_name, shapes_model_available
from lora_ext.runfolder import CHECKPOINTS, EVENTS_FILE, RUN_CONFIG_FILE, default_runs_dir
from lora_ext.train.config import TrainConfig
from lora_ext.train.jobs import GpuHandoff, Job, JobRunner
from lora_ext.ui.form import clean_values, config_from_values, estimate_line, format_duration

MODEL_SUFFIXES = (".safetensors", ".ckpt")
CURRENT_MODEL = ""  # the form value that means "the WebUI's current checkpoint"
PATH_FIELDS = {  # field -> which roots it must stay inside
    "pretrained_model": "models", "vae": "models", "train_data_dir": "datasets", "metadata_file": "datasets",
    "instance_dir": "datasets", "class_dir": "datasets",
}
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
THUMBNAILS = 24  # images shown in the dataset preview
LATENT_FACTOR = 64  # VAE /8 and three UNet down-samplings: sides must be multiples of 64 without buckets


class PathNotAllowed(LoraExtError, ValueError):
    """A path in a request leaves the configured roots (or names something that is not there)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Roots:
    """Where requests may point. datasets: roots of dataset folders (and uploads); models: roots of base models and
    VAEs; lora_dir: where finished LoRAs go (runs go beside it, see lora_ext.runfolder); work_dir: the service's own
    files (job records, uploads)."""

    datasets: list[Path]
    models: list[Path]
    lora_dir: Path
    work_dir: Path
    extra_models: list[Path] = field(default_factory=list)  # single files allowed by name (the WebUI's checkpoint)

    def __post_init__(self) -> None:
        self.datasets = [Path(p).resolve() for p in self.datasets]
        self.models = [Path(p).resolve() for p in self.models]
        self.lora_dir, self.work_dir = Path(self.lora_dir).resolve(), Path(self.work_dir).resolve()

    @property
    def runs_dir(self) -> Path:
        return default_runs_dir(self.lora_dir)

    @property
    def uploads_dir(self) -> Path:
        return self.work_dir / "uploads"

    def allowed(self, kind: str) -> list[Path]:
        if kind == "datasets":
            return [*self.datasets, self.uploads_dir.resolve()]
        if kind == "runs":
            return [self.runs_dir.resolve()]
        if kind == "loras":
            return [self.lora_dir]
        return list(self.models)

    def check(self, name: str, value: str, kind: str) -> Path:
        """`value` as an absolute path (relative paths against the first root of `kind`); PathNotAllowed when it
        leaves them. The check is on the path as written, with `..` collapsed: a request cannot climb out of a root,
        while a symbolic link that the server's owner put inside a root (a dataset or checkpoint kept on another disk)
        is followed, as the WebUI follows them."""
        roots = self.allowed(kind)
        raw = Path(os.path.expanduser(str(value)))
        path = Path(os.path.normpath(raw if raw.is_absolute() else roots[0] / raw))
        lexical_roots = [Path(os.path.abspath(r)) for r in roots]
        if not any(path == r or r in path.parents for r in [*roots, *lexical_roots]) and \
                path not in self.extra_models:
            shown = ", ".join(str(r) for r in roots)
            raise PathNotAllowed(f"{name}: {value} is outside the folders this server may read ({shown}); put it "
                                 "inside one of them (or start the server with that folder as a root)", field=name)
        return path


class TrainService:
    """See the module docstring."""

    def __init__(self, roots: Roots, *, current_model: Callable[[], str | None] | None = None,
                 hooks: GpuHandoff | None = None, on_new_lora: Callable[[Path], None] | None = None,
                 on_new_checkpoint: Callable[[Path], None] | None = None) -> None:
        self.roots = roots
        self.current_model = current_model
        self.on_new_lora = on_new_lora
        self.on_new_checkpoint = on_new_checkpoint
        self.runner = JobRunner(roots.work_dir / "jobs", hooks=hooks, on_end=self._ended)

    # ----------------------------------------------------------------------------------------------- choices
    def model_choices(self) -> list[str]:
        """Base models under the model roots: diffusers folders and single files, as paths relative to their root
        (what the form shows; `resolve_model` turns them back)."""
        out: list[str] = []
        ours = [self.roots.lora_dir, self.roots.runs_dir.resolve(), self.roots.work_dir]
        for root in self.roots.models:
            if not root.is_dir():
                continue
            for folder, dirs, files in os.walk(root, followlinks=True):
                here = Path(folder)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in ours)
                if (here / "model_index.json").is_file():  # a diffusers folder: one model, not its parts
                    if here != root:
                        out.append(here.relative_to(root).as_posix())
                    dirs[:] = []
                    continue
                out += [(here / f).relative_to(root).as_posix() for f in sorted(files)
                        if not f.startswith(".") and Path(f).suffix.lower() in MODEL_SUFFIXES]
        if shapes_model_available() and SHAPES_MODEL_NAME not in out:
            out.append(SHAPES_MODEL_NAME)  # the shipped shapes-world model: always there, first when nothing else is
        return out

    def resolve_model(self, value: str | None) -> str:
        """A form/JSON model value -> a path: "" = the WebUI's current checkpoint; a name from `model_choices`; or a
        path inside the model roots."""
        if not value:
            current = self.current_model() if self.current_model else None
            if not current:
                raise ConfigError("pretrained_model: choose a base model (none given, and no checkpoint is loaded "
                                  "in the WebUI)", field="pretrained_model")
            return current
        current = self.current_model() if self.current_model else None
        if current and Path(value).resolve() == Path(current).resolve():
            return current
        if value == SHAPES_MODEL_NAME and not any((root / value).exists() for root in self.roots.models):
            return resolve_model_name(value)
        for root in self.roots.models:
            candidate = (root / value).resolve()
            if candidate.exists() and (candidate == root or root in candidate.parents):
                return str(candidate)
        path = self.roots.check("pretrained_model", value, "models")
        if not path.exists():
            raise ConfigError(f"pretrained_model: {value} does not exist; pick one of the listed models",
                              field="pretrained_model")
        return str(path)

    def family(self, model: str | None) -> str:
        """"SD1.x (epsilon)"-style label of a base model (form value as `resolve_model` takes it)."""
        from lora_ext.train.denoiser import peek_model_family

        path = self.resolve_model(model)
        arch, prediction = peek_model_family(path)
        return f"{FAMILY_LABELS.get(arch, arch)} ({prediction})"

    # --------------------------------------------------------------------------------------------- configuration
    def config(self, values: Mapping[str, Any], *, dry: bool = False) -> TrainConfig:
        """A validated TrainConfig for this host from form/JSON values (see the module docstring). `dry`: for a
        preview (no output name needed)."""
        vals = clean_values(values)
        for host_field in ("output_dir", "runs_dir", "run_dir", "resume"):
            if vals.get(host_field) not in (None, ""):
                raise ConfigError(f"{host_field}: set by the server (LoRAs go to {self.roots.lora_dir}); leave it out",
                                  field=host_field)
            vals.pop(host_field, None)
        vals["pretrained_model"] = self.resolve_model(vals.get("pretrained_model"))
        for name, kind in PATH_FIELDS.items():
            if name != "pretrained_model" and vals.get(name):
                vals[name] = str(self.roots.check(name, str(vals[name]), kind))
        vals["output_dir"] = str(self.roots.lora_dir)
        vals["dry_run"] = dry
        for name in ("train_data_dir", "instance_dir", "class_dir"):
            if vals.get(name) and not Path(vals[name]).is_dir() and not (name == "class_dir" and vals.get(
                    "num_class_images")):
                raise ConfigError(f"{name}: {vals[name]} is not a folder; give the folder that holds the images",
                                  field=name)
        cfg = config_from_values(vals, source="form")
        if cfg.resolution is not None and not cfg.enable_bucket and cfg.resolution % LATENT_FACTOR:
            raise ConfigError(f"resolution: {cfg.resolution} must be a multiple of {LATENT_FACTOR} without aspect "
                              "buckets (the UNet halves the latent three times)", field="resolution")
        return cfg

    def check_output(self, cfg: TrainConfig) -> None:
        if cfg.output_path.exists() and not cfg.overwrite:
            raise ConfigError(f"output_name: {cfg.output_path.name} already exists in {cfg.output_dir}; choose another "
                              "name, or tick overwrite to replace it when training finishes", field="output_name")

    def upload(self, folder_name: str, files: Sequence[str | Path]) -> Path:
        """Copy uploaded images and their caption files into a new folder under the uploads root; returns it.
        Refuses unsafe names, an existing folder, other file types and an upload without images (nothing is left
        half-written: the files land in a temporary folder that is renamed at the end)."""
        import shutil
        import tempfile

        from lora_ext.train.dataset import IMAGE_EXTENSIONS

        name = (folder_name or "").strip()
        if not name or name in (".", "..") or any(ch in name for ch in '/\\:*?"<>|') or name.startswith("."):
            raise ConfigError("dataset name: give a plain folder name (letters, digits, '-', '_'; optionally "
                              "kohya's '10_name' repeat prefix)", field="dataset_name")
        target = self.roots.uploads_dir / name
        if target.exists():
            raise ConfigError(f"dataset name: {target} already exists; choose another name", field="dataset_name")
        allowed = {e.lower() for e in IMAGE_EXTENSIONS} | {".txt", ".caption", ".jsonl"}
        paths = [Path(f) for f in files]
        bad = [p.name for p in paths if p.suffix.lower() not in allowed]
        if bad:
            raise ConfigError(f"upload: {', '.join(bad[:5])} are not images or caption files (.txt/.caption)",
                              field="upload")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in paths):
            raise ConfigError("upload: no image among the files; add the images with their caption files",
                              field="upload")
        self.roots.uploads_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.roots.uploads_dir))
        try:
            for p in paths:
                shutil.copyfile(p, tmp / _upload_name(p))
            tmp.rename(target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"upload: could not store the files in {target} ({exc})", field="upload") from exc
        return target

    # ------------------------------------------------------------------------------------------------- preview
    def preview(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The dataset as training will see it: family, resolution, counts, buckets, steps and the formula,
        thumbnails with their captions, every problem with what to do, and the total steps / time line."""
        from lora_ext.train.rundir import dataset_preview

        cfg = self.config(values, dry=True)
        found = dataset_preview(cfg)
        report = found.report
        problems = list(report.problems)
        problems += [f"skipped {path}: {reason}" for path, reason in report.skipped]
        if not report.images:
            problems.insert(0, "no usable image: add images (png, jpg, webp, ...) to the folder, or fix the skipped "
                               "files listed here")
        rate, basis = self.seconds_per_step()
        return {
            "model": cfg.pretrained_model, "arch": found.arch, "family": FAMILY_LABELS.get(found.arch, found.arch),
            "prediction_type": found.prediction_type, "resolution": found.resolution,
            "report": report.to_dict(), "lines": report.lines(), "problems": problems,
            "thumbnails": [{"path": str(r.path), "caption": r.caption} for r in found.records if not r.is_class][
                :THUMBNAILS],
            "estimate": estimate_line(report.total_steps, report.epochs, rate, basis),
            "trainable": report.trainable,
        }

    def seconds_per_step(self) -> tuple[float | None, str]:
        """The speed of the last job that ran steps on this server (the basis of the time estimate)."""
        for job in self.runner.jobs():
            if job.it_s:
                return 1.0 / job.it_s, f"at {job.it_s:.2f} it/s, measured in {job.name}"
        return None, ""

    # ----------------------------------------------------------------------------------------------------- jobs
    def start(self, values: Mapping[str, Any]) -> Job:
        """Validate everything that can be checked here (config, paths, output name, dataset) and start a job."""
        from lora_ext.train.loop import check_machine
        from lora_ext.train.rundir import preflight

        cfg = self.config(values)
        self.check_output(cfg)
        check_machine(cfg)
        preflight(cfg)
        return self.runner.submit(cfg)

    def resume(self, run: str, **changes: Any) -> Job:
        """Continue a stopped run: `run` is a run folder (inside the runs folder) or the id of a job."""
        try:
            run_dir = Path(self.runner.get(run).run_dir)
        except LoraExtError:
            run_dir = self.roots.check("run_dir", run, "runs")
        if not (run_dir / RUN_CONFIG_FILE).is_file():
            raise ConfigError(f"resume: {run} is not a run folder of this server", field="run_dir")
        return self.runner.resume(run_dir, **changes)

    def resumable_runs(self) -> list[dict[str, Any]]:
        """Run folders with a checkpoint whose LoRA was not exported by them (stopped, cancelled, or interrupted by a
        server restart), newest first."""
        runs_dir = self.roots.runs_dir
        out = []
        if not runs_dir.is_dir():
            return out
        active = self.runner.active()
        for run_dir in runs_dir.iterdir():
            ckpts = run_dir / CHECKPOINTS
            if not (run_dir / RUN_CONFIG_FILE).is_file() or not ckpts.is_dir() or not any(ckpts.iterdir()):
                continue
            if active is not None and Path(active.run_dir).resolve() == run_dir.resolve():
                continue
            last = _last_event(run_dir / EVENTS_FILE)
            if last.get("type") == "done" and last.get("status") == "finished":
                continue
            out.append({"run_dir": str(run_dir), "name": run_dir.name, "step": last.get("step"),
                        "modified": run_dir.stat().st_mtime})
        return sorted(out, key=lambda r: r["modified"], reverse=True)

    def view(self, job_id: str) -> dict[str, Any]:
        """Everything the live view shows about a job (JSON-friendly)."""
        job = self.runner.get(job_id)
        data = job.to_dict()
        total = job.total_steps or 0
        data["fraction"] = (job.step / total) if total else 0.0
        data["eta"] = format_duration(job.eta_s) if job.eta_s is not None else None
        data["samples"] = [p for p in job.samples if Path(p).is_file()]
        data["resumable"] = job.state in ("cancelled", "failed") and _has_checkpoint(Path(job.run_dir))
        return data

    def events(self, job_id: str, after: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, event) of the job's run since line `after` (its events.jsonl; the SSE stream reads it)."""
        job = self.runner.get(job_id)
        path = Path(job.run_dir) / EVENTS_FILE
        if not path.is_file():
            return
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if n <= after or not line.endswith("\n"):
                    continue
                try:
                    yield n, json.loads(line)
                except ValueError:
                    continue

    def _ended(self, job: Job) -> None:
        if job.state != "finished" or not job.output:
            return
        if job.kind == "tool" and job.tool == "merge-model":
            if self.on_new_checkpoint is not None:
                self.on_new_checkpoint(Path(job.output))
        elif self.on_new_lora is not None:
            self.on_new_lora(Path(job.output))

    # ------------------------------------------------------------------------------------------------ model tools
    @property
    def checkpoint_dir(self) -> Path:
        """Where merged checkpoints go: the first model root (the WebUI's models/Stable-diffusion)."""
        return self.roots.models[0]

    def lora_choices(self) -> list[str]:
        """LoRA files under the LoRA folder, relative to it (what the tools' forms offer)."""
        root = self.roots.lora_dir
        if not root.is_dir():
            return []
        runs = self.roots.runs_dir.resolve()
        out = []
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in (".safetensors", ".pt", ".ckpt") and path.is_file() and \
                    runs not in path.resolve().parents and not any(p.startswith(".") for p in path.parts):
                out.append(path.relative_to(root).as_posix())
        return out

    def _lora_path(self, field_name: str, value: str) -> Path:
        value = str(value or "").strip()
        if not value:
            raise ConfigError(f"{field_name}: choose a LoRA", field=field_name)
        candidate = self.roots.lora_dir / value
        if candidate.is_file():
            path = self.roots.check(field_name, str(candidate), "loras")
        else:
            from lora_ext.errors import LoraNotFoundError
            from lora_ext.tools.args import resolve_lora

            try:
                path = resolve_lora(value, [self.roots.lora_dir])
            except LoraNotFoundError as exc:
                raise ConfigError(f"{field_name}: {exc}", field=field_name) from None
        return path

    def _out_path(self, folder: Path, value: Any, overwrite: bool, *, folder_output: bool = False) -> Path:
        name = str(value or "").strip()
        if not name or name in (".", "..") or any(ch in name for ch in '/\\:*?"<>|') or name.startswith("."):
            raise ConfigError("out_name: give a plain file name (letters, digits, '-', '_')", field="out_name")
        path = folder / name if folder_output or name.endswith(".safetensors") else folder / f"{name}.safetensors"
        if path.exists() and not overwrite:
            raise ConfigError(f"out_name: {path.name} already exists in {folder}; choose another name or tick "
                              "overwrite", field="out_name")
        return path

    def tool_args(self, tool: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Form/JSON values -> the checked arguments of a tool job (lora_ext.tools.job). Inputs must be inside the
        server's folders; outputs go to the LoRA folder (or, for merge-model, the checkpoint folder)."""
        from lora_ext.prompt import parse_tag
        from lora_ext.tools.common import DTYPES, ToolError

        v = dict(values)
        overwrite = bool(v.get("overwrite"))
        dtype = v.get("dtype") or None
        if dtype is not None and str(dtype).lower() not in DTYPES:
            raise ConfigError(f"dtype: {dtype!r} is not one of fp32, fp16, bf16", field="dtype")

        def number(name: str, kind: type = int, required: bool = False) -> Any:
            raw = v.get(name)
            if raw in (None, ""):
                if required:
                    raise ConfigError(f"{name}: required", field=name)
                return None
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: {raw!r} is not a number", field=name) from None
            if value <= 0:
                raise ConfigError(f"{name}: must be > 0", field=name)
            return value

        model = self.resolve_model(v["model"]) if v.get("model") else None
        if tool == "merge-model":
            src = self.resolve_model(v.get("model"))
            loras = []
            for i, item in enumerate(v.get("loras") or []):
                if isinstance(item, str):
                    tag = item if item.startswith("<") else f"<lora:{item}>"
                else:
                    args = [str(item.get("name", "")), repr(float(item.get("weight", 1.0)))]
                    if item.get("unet") not in (None, ""):
                        args.append(repr(float(item["unet"])))
                    if item.get("lbw"):
                        args.append(f"lbw={item['lbw']}")
                    tag = "<lora:" + ":".join(args) + ">"
                try:
                    ref = parse_tag(tag)
                except LoraExtError as exc:
                    raise ConfigError(f"loras[{i}]: {exc}", field="loras") from None
                loras.append({"path": str(self._lora_path("loras", ref.name)), "tag": ref.to_tag()})
            if not loras:
                raise ConfigError("loras: choose at least one LoRA to merge", field="loras")
            folder_output = Path(src).is_dir()
            out = self._out_path(self.checkpoint_dir, v.get("out_name"), overwrite, folder_output=folder_output)
            return {"model": src, "loras": loras, "out": str(out), "dtype": dtype, "overwrite": overwrite}
        if tool == "merge-loras":
            inputs = []
            for i, item in enumerate(v.get("inputs") or []):
                name, weight = (item, 1.0) if isinstance(item, str) else (item.get("name"), item.get("weight", 1.0))
                try:
                    weight = float(weight)
                except (TypeError, ValueError):
                    raise ConfigError(f"inputs[{i}]: weight {weight!r} is not a number", field="inputs") from None
                inputs.append([str(self._lora_path("inputs", name)), weight])
            if not inputs:
                raise ConfigError("inputs: choose the LoRAs to merge", field="inputs")
            return {"inputs": inputs, "out": str(self._out_path(self.roots.lora_dir, v.get("out_name"), overwrite)),
                    "rank": number("rank"), "model": model, "dtype": dtype, "overwrite": overwrite}
        if tool == "resize":
            dynamic = v.get("dynamic") or None
            if dynamic is None and number("rank") is None:
                raise ConfigError("rank: give a rank, or a dynamic method with its parameter", field="rank")
            return {"input": str(self._lora_path("input", v.get("input"))), "rank": number("rank"),
                    "dynamic": dynamic, "param": number("param", float, required=dynamic is not None),
                    "out": str(self._out_path(self.roots.lora_dir, v.get("out_name"), overwrite)), "model": model,
                    "dtype": dtype, "overwrite": overwrite}
        if tool == "extract":
            return {"base": self.resolve_model(v.get("base")), "tuned": self.resolve_model(v.get("tuned")),
                    "rank": number("rank", required=True), "conv_rank": number("conv_rank"),
                    "out": str(self._out_path(self.roots.lora_dir, v.get("out_name"), overwrite)),
                    "dtype": dtype, "overwrite": overwrite}
        if tool == "convert":
            if v.get("to") not in ("kohya", "diffusers"):
                raise ConfigError("to: kohya or diffusers", field="to")
            return {"input": str(self._lora_path("input", v.get("input"))), "to": v["to"],
                    "out": str(self._out_path(self.roots.lora_dir, v.get("out_name"), overwrite)), "model": model,
                    "dtype": dtype, "overwrite": overwrite}
        raise ToolError(f"unknown tool {tool!r}; valid: merge-model, merge-loras, resize, extract, convert")

    def run_tool(self, tool: str, values: Mapping[str, Any]) -> Job:
        """Check a tool's values (ConfigError / PathNotAllowed: nothing starts) and start it as a job."""
        args = self.tool_args(tool, values)
        return self.runner.submit_tool(tool, args, name=f"{tool}: {Path(args['out']).name}")


def _upload_name(path: Path) -> str:
    """The original file name of an upload (gradio stores uploads as <tmp>/<hash>/<original name>)."""
    return Path(path.name).name


def _last_event(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                last = json.loads(line)
            except ValueError:
                continue
    return last


def _has_checkpoint(run_dir: Path) -> bool:
    ckpts = run_dir / CHECKPOINTS
    return ckpts.is_dir() and any(ckpts.iterdir())


def prompt_for(name: str, weight: float, activation: str | Sequence[str] = "") -> str:
    """`<lora:name:weight>` plus the activation text: what "Send to txt2img" puts into the prompt."""
    words = activation if isinstance(activation, str) else ", ".join(activation)
    tag = f"<lora:{name}:{weight:g}>"
    return f"{tag} {words}".strip() if words else tag
