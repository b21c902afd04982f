"""Pivotal tuning: a new word's token embedding trained together with the LoRA and saved inside the LoRA file.

The word (`pivotal_token`) gets `n` trainable vectors per text encoder, starting from the mean token embedding of
`init_text` (default: the word itself, i.e. what the model makes of it today). Captions stay plain text: wherever the
word's tokens stand, the encoder reads the vectors instead (`lora_ext.patch.embeddings.TokenInjector`, the placement
A1111 uses for textual inversions), so the trained result is what A1111 shows when the file's bundled embedding
(`bundle_emb.<word>.*`) is active. The text encoders' own weights stay frozen unless the LoRA trains them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lora_ext.errors import TrainingError
from lora_ext.patch.embeddings import TokenInjector, bundle_keys, check_name, name_ids, pipeline_parts, token_embedding


class PivotalEmbedding(nn.Module):
    def __init__(self, pipe: Any, token: str, *, init_text: str = "", vectors: int = 1,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.token = check_name(token, "pivotal_token")
        if vectors < 1:
            raise TrainingError(f"pivotal_vectors must be >= 1, got {vectors}")
        self.n_vectors = int(vectors)
        self.vectors = nn.ParameterList()
        self.parts: list[str] = []
        self._injectors: list[TokenInjector] = []
        for part, tokenizer, encoder in pipeline_parts(pipe):
            table = token_embedding(encoder).weight
            start = table[name_ids(tokenizer, init_text or token)].detach().float().mean(0)
            param = nn.Parameter(start.repeat(self.n_vectors, 1).to(device=table.device, dtype=dtype))
            self.vectors.append(param)
            self.parts.append(part)
            self._injectors.append(TokenInjector(tokenizer, encoder, {self.token: (lambda p=param: p)}))

    def bundle_tensors(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """`bundle_emb.<token>.*` tensors (detached CPU copies in `dtype`), as A1111's built-in reads them."""
        return bundle_keys(self.token, [p.detach().to("cpu", dtype).clone() for p in self.vectors])

    def load_bundle(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy the vectors from `bundle_tensors`-named tensors (checkpoints, resume)."""
        expected = bundle_keys(self.token, list(self.vectors))
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise TrainingError(f"the saved embedding tensors do not fit pivotal_token {self.token!r} with "
                                f"{self.n_vectors} vectors (missing {missing[:2]}, unexpected {extra[:2]})")
        with torch.no_grad():
            for key, param in zip(expected, self.vectors, strict=True):
                src = tensors[key]
                if tuple(src.shape) != tuple(param.shape):
                    raise TrainingError(f"{key} has shape {tuple(src.shape)}, this run needs {tuple(param.shape)}")
                param.copy_(src.to(device=param.device, dtype=param.dtype))

    def remove(self) -> None:
        for injector in self._injectors:
            injector.remove()
        self._injectors.clear()
