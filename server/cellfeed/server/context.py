"""What every part of a running server shares: settings, the data root, open handles, sessions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cellfeed.server.paths import DataRoot
from cellfeed.server.reading.blocks import BlockCache
from cellfeed.server.reading.handles import HandleCache
from cellfeed.server.settings import Settings


@dataclass
class ServerContext:
    """One per server process; handed to sources, the Flight service, the HTTP app and jobs."""

    settings: Settings
    data_root: DataRoot
    handles: HandleCache = field(default_factory=HandleCache)
    blocks: BlockCache = field(default_factory=lambda: BlockCache(1 << 30))

    @property
    def state_dir(self) -> Path:
        return self.settings.resolved_state_dir()

    @classmethod
    def from_settings(cls, settings: Settings) -> "ServerContext":
        return cls(settings=settings, data_root=DataRoot(settings.data_root), blocks=BlockCache(settings.cache_bytes))
