"""Textual-inversion vectors in a CLIP text encoder, the way AUTOMATIC1111's prompt parser places them.

Wherever the token ids of an embedding's name stand in a prompt's ids, they are replaced by that embedding's vectors
(one position per vector, the rest of the row shifted and cut to its length, the end token and padding kept), and the
encoder reads the vectors at those positions instead of its token table's rows. Used by training (pivotal tuning:
the vectors are trainable parameters) and by `lora_ext.session` for the embeddings bundled in LoRA files
(`bundle_emb.<name>.*`), so both see the same thing A1111 shows for the same prompt.

Attached as hooks on the encoder instance (a pre-hook that rewrites the ids, a hook on its token embedding that
writes the vectors); no class and no weight is changed, `remove()` detaches. The vectors are read at every forward,
so trainable parameters get their gradient through the encoder.

The bundled-embedding layouts (what A1111 v1.10's `create_embedding_from_data` reads): SD1/SD2
`bundle_emb.<name>.string_to_param.*` [n, width]; SDXL `bundle_emb.<name>.clip_l` [n, 768] and `.clip_g` [n, 1280].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lora_ext.errors import LoraExtError
from lora_ext.formats.keys import BUNDLE_PREFIX, EMBEDDING_NAME_RE

VectorSource = Tensor | Callable[[], Tensor]  # [n_vectors, width]; a callable is read at every forward

# which text encoder of a pipeline each bundled vector key belongs to
SDXL_PARTS = ("clip_l", "clip_g")
SD_PART = "string_to_param"


class EmbeddingError(LoraExtError, ValueError):
    """A bundled or trained embedding that cannot be used with this model."""


def check_name(name: str, field: str = "embedding name") -> str:
    if not EMBEDDING_NAME_RE.match(name or ""):
        raise EmbeddingError(f"{field} {name!r} is not usable as an embedding name: use one word without spaces, "
                             "dots or brackets (e.g. 'hrtz')")
    return name


def name_ids(tokenizer: Any, name: str) -> list[int]:
    """The token ids of `name` as it stands in a prompt (no start/end tokens), as A1111 looks it up."""
    ids = tokenizer([name], add_special_tokens=False).input_ids[0]
    if not ids:
        raise EmbeddingError(f"embedding name {name!r} tokenizes to nothing")
    return list(ids)


def token_embedding(encoder: nn.Module) -> nn.Embedding:
    return encoder.get_input_embeddings()


def _check_width(name: str, vectors: Tensor, width: int) -> None:
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise EmbeddingError(f"embedding {name!r} has shape {tuple(vectors.shape)}; this text encoder needs "
                             f"[n, {width}]")


class TokenInjector:
    """Put `vectors` ({name: [n, width] tensor or a callable returning one}) into `encoder`'s input wherever `name`
    stands in the ids it is given (every row of every forward while attached)."""

    def __init__(self, tokenizer: Any, encoder: nn.Module, vectors: Mapping[str, VectorSource]) -> None:
        self.encoder = encoder
        emb = token_embedding(encoder)
        width = emb.weight.shape[1]
        self.sources = dict(vectors)
        # longest names first, so a name that is the start of another does not take its place
        self.names = sorted(((tuple(name_ids(tokenizer, n)), n) for n in self.sources), key=lambda x: -len(x[0]))
        for name in self.sources:
            _check_width(name, self._vectors(name), width)
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._slots: tuple[Tensor, Tensor, list[tuple[str, int]]] | None = None
        self._handles = [
            encoder.register_forward_pre_hook(self._rewrite_ids, with_kwargs=True),
            emb.register_forward_hook(self._write_vectors),
        ]

    def _vectors(self, name: str) -> Tensor:
        src = self.sources[name]
        return src() if callable(src) else src

    def splice(self, ids: Tensor) -> tuple[Tensor, list[tuple[int, int, str, int]]]:
        """Rows of `ids` with every name replaced by placeholders for its vectors; the placeholders
        [(row, position, name, vector index)]."""
        rows, slots = [], []
        length = ids.shape[1]
        for b, row in enumerate(ids.tolist()):
            start = 1 if row and row[0] == self.bos else 0
            end = row.index(self.eos, start) if self.eos in row[start:] else length
            content: list[int | tuple[str, int]] = []
            body, i = row[start:end], 0
            while i < len(body):
                for key, name in self.names:
                    if tuple(body[i : i + len(key)]) == key:
                        content += [(name, j) for j in range(self._vectors(name).shape[0])]
                        i += len(key)
                        break
                else:
                    content.append(body[i])
                    i += 1
            keep_end = end < length
            room = length - start - (1 if keep_end else 0)
            content = content[:room]
            new = row[:start]
            for item in content:
                if isinstance(item, tuple):
                    slots.append((b, len(new), item[0], item[1]))
                    new.append(self.eos - 1 if self.eos else 0)  # any non-end id; its row is replaced
                else:
                    new.append(item)
            if keep_end:
                new.append(self.eos)
            new += [self.pad] * (length - len(new))
            rows.append(new)
        return torch.tensor(rows, dtype=ids.dtype, device=ids.device), slots

    def _rewrite_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._slots = None
        if ids is None:
            return None
        new, slots = self.splice(ids)
        if not slots:
            return None
        b = torch.tensor([s[0] for s in slots], device=ids.device)
        p = torch.tensor([s[1] for s in slots], device=ids.device)
        self._slots = (b, p, [(s[2], s[3]) for s in slots])
        if "input_ids" in kwargs:
            return args, {**kwargs, "input_ids": new}
        return (new, *args[1:]), kwargs

    def _write_vectors(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._slots is None:
            return None
        b, p, which = self._slots
        self._slots = None
        tables = {name: self._vectors(name) for name in {n for n, _ in which}}
        rows = torch.stack([tables[n][j] for n, j in which]).to(device=output.device, dtype=output.dtype)
        out = output.clone()
        out[b, p] = rows
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._slots = None


def pipeline_parts(pipe: Any) -> list[tuple[str, Any, nn.Module]]:
    """(bundle key part, tokenizer, text encoder) of a diffusers pipeline: one for SD1/SD2, clip_l + clip_g for SDXL."""
    encoders = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
                (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    encoders = [(t, e) for t, e in encoders if t is not None and e is not None]
    if len(encoders) == 2:
        return [(part, t, e) for part, (t, e) in zip(SDXL_PARTS, encoders)]
    return [(SD_PART, t, e) for t, e in encoders]


def bundle_vectors(tensors: Mapping[str, Tensor], part: str) -> Tensor | None:
    """The vectors of one encoder from a bundled embedding's tensors ({"string_to_param.*": ...} or
    {"clip_l": ..., "clip_g": ...}); None when the embedding has none for it."""
    if part == SD_PART:
        for key, t in tensors.items():
            if key.split(".", 1)[0] == SD_PART:
                return t
        return None
    return tensors.get(part)


def fitted_vectors(pipe: Any, name: str, tensors: Mapping[str, Tensor]) -> list[Tensor]:
    """A bundled embedding's vectors ({rest of the key: tensor}, as parsed from the file), one float tensor per text
    encoder of `pipe` (`pipeline_parts` order). Raises EmbeddingError when the name is unusable or the embedding has
    no vectors for one of this model's encoders or the wrong width (made for another model family)."""
    check_name(name)
    out = []
    for part, _, encoder in pipeline_parts(pipe):
        vec = bundle_vectors(tensors, part)
        if vec is None:
            raise EmbeddingError(f"bundled embedding {name!r} has no vectors for this model's text encoder ({part}; "
                                 f"it has {', '.join(sorted(tensors))}): it was made for another model family")
        _check_width(name, vec, token_embedding(encoder).weight.shape[1])
        out.append(vec.detach().float())
    return out


def attach_bundled(pipe: Any, embeddings: Mapping[str, Mapping[str, Tensor]]) -> list[TokenInjector]:
    """Injectors for bundled embeddings ({name: tensors as parsed from the file}) on `pipe`'s text encoders.

    Raises EmbeddingError (see `fitted_vectors`) before any hook is attached."""
    if not embeddings:
        return []
    fitted = {name: fitted_vectors(pipe, name, tensors) for name, tensors in embeddings.items()}
    return [TokenInjector(tokenizer, encoder, {name: vecs[i] for name, vecs in fitted.items()})
            for i, (_, tokenizer, encoder) in enumerate(pipeline_parts(pipe))]


def bundle_keys(name: str, vectors: Sequence[Tensor]) -> dict[str, Tensor]:
    """The LoRA-file tensors of an embedding with one [n, width] tensor per encoder (1: SD1/SD2, 2: SDXL)."""
    if len(vectors) == 1:
        return {f"{BUNDLE_PREFIX}{name}.{SD_PART}.*": vectors[0]}
    return {f"{BUNDLE_PREFIX}{name}.{part}": v for part, v in zip(SDXL_PARTS, vectors, strict=True)}
