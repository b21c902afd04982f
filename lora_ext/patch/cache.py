"""A size-bounded cache of parsed LoRA files, keyed by path and invalidated by size + mtime."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from lora_ext.formats.network import LoraNetwork, load_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stamp:
    size: int
    mtime_ns: int


class LoraCache:
    """LRU by bytes. A file that changed on disk (size or mtime) is parsed again, which gives the network a new token
    so that the patcher recomputes the layers it touches."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Path, tuple[_Stamp, LoraNetwork]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(net.nbytes for _, net in self._items.values())

    def get(self, path: str | Path, *, name: str | None = None) -> LoraNetwork:
        """The parsed file, named `name` (None: as first parsed). A hit under another name (an alias of the same
        file) is the same parse with that name: same tensors and token, so the patcher recomputes nothing."""
        path = Path(path).resolve()
        st = path.stat()
        stamp = _Stamp(st.st_size, st.st_mtime_ns)
        hit = self._items.get(path)
        if hit is not None and hit[0] == stamp:
            self._items.move_to_end(path)
            self.hits += 1
            net = hit[1]
            return net if name is None or name == net.name else replace(net, name=name)
        self.misses += 1
        net = load_lora(path, name=name)
        self._items[path] = (stamp, net)
        self._items.move_to_end(path)
        self._evict(keep=path)
        return net

    def _evict(self, keep: Path) -> None:
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            oldest = next(iter(self._items))
            if oldest == keep:
                break
            self._items.pop(oldest)
            log.debug("LoRA cache: evicted %s", oldest)

    def clear(self) -> None:
        self._items.clear()
