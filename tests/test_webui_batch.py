"""`lora_ext.webui.batch` without the WebUI: the prompt marks that keep A1111 from sharing one conditioning between
images with different text-encoder LoRAs are invisible to CLIP's tokenizer, survive A1111's AND split, map back to
their image, and the CFG row layout handed to the session is A1111's (conditional rows per AND-part, then one
unconditional row per image)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from transformers import CLIPTokenizer

from lora_ext.models.assets import tokenizer_dir
from lora_ext.webui import batch

# A1111 v1.10 modules/prompt_parser.py: how a prompt is split at AND and its weight read (the regexes, as data)
RE_AND = re.compile(r"\bAND\b")
RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def _subprompts(prompt: str) -> list[str]:
    return [RE_WEIGHT.search(part).group(1) for part in RE_AND.split(prompt)]


def test_marks_do_not_change_the_tokens_and_survive_and():
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir("clip")))
    for prompt in ("a cat", "  a (cat:1.2) on a mat ", "a cat AND a dog:0.5", "[cat:dog:5] AND  bird"):
        for count in (1, 2, 5):
            marked = batch._mark(prompt, count)
            plain_parts, marked_parts = _subprompts(prompt), _subprompts(marked)
            assert len(plain_parts) == len(marked_parts)
            for plain, part in zip(plain_parts, marked_parts, strict=True):
                assert batch._leading_spaces(part) == count, (prompt, count, part)  # every part says its image
                assert tok(part)["input_ids"] == tok(plain)["input_ids"]
    # a blank prompt: A1111's parser strips the mark (the glue maps "no mark" to a blank-prompt image instead)
    assert _subprompts(batch._mark("", 2)) == [""]


class _Session:
    def __init__(self, images: int) -> None:
        self.images = images
        self.rows: list[int] | None = None
        self.per_image = True
        self.model = None  # the model the session is bound to (an A1111 model in these tests)

    def text_signatures(self, negative=False):
        return [(float(i),) for i in range(self.images)]

    def batch_rows(self, rows, uncond=None):
        self.rows = list(rows)
        self.uncond = list(uncond) if uncond is not None else None


def test_cfg_row_layout_plain_and_with_and(monkeypatch):
    session = _Session(3)
    st = SimpleNamespace(session=session, batch_marked=[])
    params = SimpleNamespace(x=torch.zeros(6, 4, 8, 8), text_cond=torch.zeros(3, 77, 8))
    batch.on_step(st, params)
    assert session.rows == [0, 1, 2, 0, 1, 2] and session.uncond == [False] * 3 + [True] * 3
    # image 1's prompt has two AND-parts: conditional rows 0, 1, 1, 2, then the three unconditional rows
    p = SimpleNamespace(prompts=["a cat", "a cat AND a dog", "a bird"], is_hr_pass=False)
    params = SimpleNamespace(x=torch.zeros(7, 4, 8, 8), text_cond={"crossattn": torch.zeros(4, 77, 8)},
                             denoiser=SimpleNamespace(p=p))
    import sys

    # A1111's prompt_parser.get_multicond_prompt_list: per prompt, one (index, weight) per AND-part
    prompt_parser = SimpleNamespace(get_multicond_prompt_list=lambda prompts: (
        [[(j, 1.0) for j in range(len(RE_AND.split(pr)))] for pr in prompts], None, None))
    monkeypatch.setitem(sys.modules, "modules", SimpleNamespace(prompt_parser=prompt_parser))
    monkeypatch.setitem(sys.modules, "modules.prompt_parser", prompt_parser)
    batch.on_step(st, params)
    assert session.rows == [0, 1, 1, 2, 0, 1, 2] and session.uncond == [False] * 4 + [True] * 3


def test_unmark_restores_the_prompts_a1111_had():
    p = SimpleNamespace(prompts=["  a cat", "   a cat"])
    st = SimpleNamespace(batch_marked=[(p, "prompts", ["a cat", "a cat"])], batch_hooks=[])
    batch.detach(st)
    assert p.prompts == ["a cat", "a cat"] and st.batch_marked == []


def test_forge_rows_come_from_each_calls_chunks():
    """Forge batches the UNet's rows in chunks of one row per image and says which chunk is conditional (0) or
    unconditional (1) in `transformer_options["cond_or_uncond"]` (backend/sampling/sampling_function.py); the order of
    the chunks is Forge's own. A call that does not fit that shape gets the first image's LoRAs (and one warning)."""
    session = _Session(2)
    calls = []
    session.unet_call = calls.append
    hook = batch._forge_unet_hook(session)
    hook(None, (torch.zeros(6, 4, 8, 8),), {"transformer_options": {"cond_or_uncond": [1, 0, 0]}})
    assert session.rows == [0, 1, 0, 1, 0, 1] and session.uncond == [True, True] + [False] * 4 and calls == [6]
    hook(None, (torch.zeros(2, 4, 8, 8),), {"transformer_options": {"cond_or_uncond": [0]}})  # CFG 1: no uncond
    assert session.rows == [0, 1] and session.uncond == [False, False] and calls == [6, 2]
    hook(None, (torch.zeros(3, 4, 8, 8),), {"transformer_options": {"cond_or_uncond": [0]}})
    assert session.rows == [0, 0, 0] and calls == [6, 2, 3]


def test_forge_texts_are_seen_where_forge_still_has_them():
    """Forge's text encoders get token ids; the marked texts pass through the model object's
    `get_learned_conditioning`, wrapped on that instance only while the batch runs."""

    class Model:
        def get_learned_conditioning(self, texts):
            return f"cond of {list(texts)}"

    model, other, seen = Model(), Model(), []
    wrap = batch._ConditioningWrap(model, lambda module, args, kwargs: seen.append(batch.prompt_texts(args, kwargs)))
    assert model.get_learned_conditioning(["  a cat"]) == "cond of ['  a cat']" and seen == [["  a cat"]]
    assert other.get_learned_conditioning(["a dog"]) == "cond of ['a dog']" and len(seen) == 1  # the class untouched
    wrap.remove()
    assert "get_learned_conditioning" not in vars(model) and model.get_learned_conditioning(["x"]) == "cond of ['x']"
    assert len(seen) == 1
