"""What every part of a running server shares: settings, the data root, open handles, caches."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cellfeed.server.metrics import Metrics
from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.blocks import BlockCache
from cellfeed.server.reading.handles import HandleCache
from cellfeed.server.settings import Settings

if TYPE_CHECKING:
    from cellfeed.server.reading.omezarr import ImageReader


@dataclass
class ServerContext:
    """One per server process; handed to sources, the Flight service, the HTTP app and jobs."""

    settings: Settings
    data_root: DataRoot
    handles: HandleCache = field(default_factory=HandleCache)
    blocks: BlockCache = field(default_factory=lambda: BlockCache(1 << 30))
    metrics: Metrics = field(default_factory=Metrics)
    _image_readers: dict[int, "ImageReader"] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.handles.root is None:  # every file opened through the handles stays inside the root
            self.handles.root = self.data_root
        self.handles.on_close = self.blocks.forget  # a closed file's blocks leave the cache with it

    def image_reader(self, cache_pool_bytes: int) -> "ImageReader":
        """The tensorstore reader (one context, one chunk-cache pool) shared by every DynaCLR
        session that asks for this pool size."""
        from cellfeed.server.reading.omezarr import ImageReader  # tensorstore: only when needed

        with self._lock:
            if cache_pool_bytes not in self._image_readers:
                self._image_readers[cache_pool_bytes] = ImageReader(cache_pool_bytes)
            return self._image_readers[cache_pool_bytes]

    @property
    def state_dir(self) -> Path:
        return self.settings.resolved_state_dir()

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServerContext":
        return cls(settings=settings, data_root=DataRoot(settings.data_root), blocks=BlockCache(settings.cache_bytes))
