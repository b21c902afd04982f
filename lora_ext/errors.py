"""Typed errors. Every user-facing failure is one of these: it names the file/key/field and says what to do.

The hierarchy lets callers (CLI, WebUI glue) catch `LoraExtError` and show `str(err)` to the user verbatim.
"""

from __future__ import annotations

from pathlib import Path


class LoraExtError(Exception):
    """Base class of every error lora_ext raises on purpose."""


class PromptSyntaxError(LoraExtError, ValueError):
    """A `<lora:...>` tag is malformed. The message quotes the tag."""

    def __init__(self, tag: str, problem: str) -> None:
        self.tag = tag
        self.problem = problem
        super().__init__(f"bad LoRA tag {tag!r}: {problem}")


class LoraNotFoundError(LoraExtError, FileNotFoundError):
    """A LoRA name did not resolve to a file inside the LoRA directories."""


class LoraFileError(LoraExtError, ValueError):
    """A LoRA file cannot be read or its content is invalid.

    `path` is the file, `key` the tensor key or metadata field at fault (if any), `reason` what is wrong.
    """

    def __init__(self, path: str | Path | None, reason: str, key: str | None = None, hint: str | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.key = key
        self.reason = reason
        self.hint = hint
        where = self.path or "<in-memory LoRA>"
        if key:
            where += f" [{key}]"
        msg = f"{where}: {reason}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class UnsafeFileError(LoraFileError):
    """A legacy pickle file contains code or objects other than tensors; it was not loaded."""


class NonFiniteWeightError(LoraFileError):
    """A LoRA tensor, or the weight it would produce, contains NaN or inf. The model was left untouched."""


class ShapeMismatchError(LoraFileError):
    """A LoRA module's tensors do not fit each other or the model layer they target."""


class ArchitectureMismatchError(LoraExtError, ValueError):
    """A LoRA was made for another base model family than the one loaded (e.g. an SDXL LoRA on SD1.5)."""

    def __init__(self, path: str | Path | None, lora_arch: str, model_arch: str, evidence: str) -> None:
        self.path = str(path) if path is not None else None
        self.lora_arch = lora_arch
        self.model_arch = model_arch
        self.evidence = evidence
        super().__init__(
            f"{self.path or '<in-memory LoRA>'}: this LoRA is for {lora_arch} but the loaded model is {model_arch} "
            f"({evidence}); load a {lora_arch} checkpoint or pick a LoRA made for {model_arch}"
        )


class ModelLoadError(LoraExtError, ValueError):
    """A base model (diffusers folder or single-file checkpoint) could not be loaded or recognised."""


class DatasetError(LoraExtError, ValueError):
    """A training dataset cannot be used as configured (missing folder, bad setting, unreadable file during training).

    The message names the path or setting at fault and says what to do. Problems that do not stop a run (an odd image,
    a missing caption) are not raised: they are listed in the dataset report instead.
    """


class TrainingError(LoraExtError):
    """A training run cannot go on or its output is unusable (no layer to train, a file that would be overwritten,
    an exported LoRA that does not read back cleanly). The message names the file or setting and says what to do."""


class ConfigError(LoraExtError, ValueError):
    """A training option is missing, has the wrong type or an invalid value, or needs a package that is not
    installed. The message names the option and says what to do; `field` is the option's name when one option is at
    fault (a form highlights it)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
