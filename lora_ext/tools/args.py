"""Reading the tools' LoRA arguments: `NAME_OR_PATH[:ARGS]`, the tag's own syntax without `<lora:` and `>`.

`style:0.8`, `style:0.8:0.5` (te, unet), `style:1:lbw=INALL`, `./out/style.safetensors:0.7:unet=1`, or a whole tag
`<lora:style:0.8>`. A path wins over a name when the text before a ':' is an existing file; names are looked up in the
LoRA folders as the prompt's tags are (file stem, alias, sub/dir/name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lora_ext.prompt import LoraRef, parse_tag
from lora_ext.tools.common import ToolError
from lora_ext.tools.merge_model import LoraInput


def _split_path(text: str) -> tuple[Path, str] | None:
    """(file, rest) when `text` starts with an existing file path, else None."""
    if Path(text).is_file():
        return Path(text), ""
    for i, ch in enumerate(text):
        if ch == ":" and i and Path(text[:i]).is_file():
            return Path(text[:i]), text[i + 1:]
    return None


def parse_lora_arg(text: str, lora_dirs: Sequence[Path] = ()) -> LoraInput:
    """A `--lora` value -> the file and its parsed tag (PromptSyntaxError / LoraNotFoundError / ToolError)."""
    text = text.strip()
    if text.startswith("<"):
        ref = parse_tag(text)
        return LoraInput(resolve_lora(ref.name, lora_dirs), ref)
    split = _split_path(text)
    if split is not None:
        path, rest = split
        ref = parse_tag(f"<lora:{_safe_name(path.stem)}{':' + rest if rest else ''}>")
        return LoraInput(path, ref)
    ref = parse_tag(f"<lora:{text}>")
    return LoraInput(resolve_lora(ref.name, lora_dirs), ref)


def _safe_name(stem: str) -> str:
    return "".join("_" if c in ":<>=" else c for c in stem) or "lora"


def resolve_lora(name: str, lora_dirs: Sequence[Path]) -> Path:
    """The file a tag's name means in `lora_dirs` (the prompt's rules); LoraNotFoundError naming where it looked."""
    from lora_ext.library.index import LoraIndex
    from lora_ext.library.lookup import IndexResolver

    if not lora_dirs:
        raise ToolError(f"LoRA {name!r} is not a file, and no LoRA folder was given to look it up "
                        "(pass --lora-dir, or give the file's path)")
    return IndexResolver(LoraIndex(list(lora_dirs))).resolve(name)


def ref_weights(ref: LoraRef) -> float:
    """The single weight of a tag for tools that take one (merge-loras): te and unet must agree."""
    if ref.te != ref.unet or ref.lbw is not None or ref.dyn is not None:
        raise ToolError(f"{ref.tag}: merge-loras takes one weight per LoRA (NAME:W); te/unet splits, lbw and dyn "
                        "apply when a LoRA is used or merged into a checkpoint")
    return ref.te
