"""The glue's process-wide state, typed. Created once by `glue.setup()` (never at import) and kept across "Reload UI";
`api` and `cards` receive it as an argument."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ext.library.index import LoraIndex
from lora_ext.library.lookup import IndexResolver
from lora_ext.patch.cache import LoraCache
from lora_ext.session import LoraSession
from lora_ext.webui import host


@dataclass
class GlueState:
    index: LoraIndex  # the catalogue of the WebUI's LoRA folders
    session: LoraSession  # tags -> weights on the WebUI's model (lora_ext.session)
    network: Any = None  # our ExtraNetwork (a subclass of A1111's, defined in the glue)
    previous: Any = None  # the ExtraNetwork that held 'lora' before us (the built-in's), to hand the tag back
    routes_app: Any = None  # the FastAPI app our routes were added to (UI mode makes a new one per reload)
    training: Any = None  # the TrainService of the training tab and routes (lora_ext.webui.training), made once
    bundled: dict[str, Any] = field(default_factory=dict)  # embedding name -> Embedding of the active LoRAs
    lock: threading.RLock = field(default_factory=threading.RLock)  # serializes hand-overs of the tag
    batch_hooks: list[Any] = field(default_factory=list)  # UNet / text-encoder pre-hooks of a per-image batch
    batch_images: dict[int, int] = field(default_factory=dict)  # leading-space count of a prompt -> its image
    batch_negative_images: dict[int, int] = field(default_factory=dict)  # ... of a negative prompt
    batch_marked: list[Any] = field(default_factory=list)  # (p, attribute, prompts before marking)
    generation: Any = None  # (p, tags, per-image tags, hires) between activate and deactivate
    sampling: bool = False  # True once the generation's sampling started (a model switch then is the refiner)
    pending_hooks: list[Any] = field(default_factory=list)  # one-shot hooks that put the LoRAs back (glue._aside)

    @classmethod
    def create(cls, dirs: list[Path], cache_file: Path | None) -> GlueState:
        """A catalogue over `dirs` and a session on this host's model trees (`host.model_adapter`)."""
        index = LoraIndex(dirs, cache_file=cache_file, addnet_hashes=host.addnet_hashes())
        return cls(index=index, session=LoraSession(host.model_adapter, IndexResolver(index), cache=LoraCache(),
                                                    **host.session_options()))
