"""Server settings: command-line flags, each also settable by a CELLFEED_* environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class Settings:
    """Everything `cellfeed serve` accepts. Environment: CELLFEED_<NAME> (e.g. CELLFEED_DATA_ROOT)."""

    data_root: str = "."
    host: str = "127.0.0.1"
    flight_port: int = 8815
    http_port: int = 8000
    token: str | None = None
    state_dir: str | None = None  # default: <data_root>/.cellfeed
    dask_scheduler: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: Flight then requires client certificates it signed
    cache_bytes: int = 1 << 30  # decoded rows kept between batches, across sessions
    max_batch_size: int = 1 << 16  # rows (cells, groups, patches) one batch may ask for
    session_idle_seconds: int = 600  # a session with no live stream for this long is closed
    max_sessions: int = 64  # beyond this many, the least recently used idle sessions are closed
    max_session_bytes: int = 4 << 30  # beyond this much held by sessions, likewise

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        """Defaults, then CELLFEED_* variables, then explicit (non-None) overrides."""
        values: dict[str, object] = {}
        for f in fields(cls):
            env = os.environ.get(f"CELLFEED_{f.name.upper()}")
            if env is not None and env != "":
                values[f.name] = int(env) if f.type in ("int", int) else env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def resolved_state_dir(self) -> Path:
        path = Path(self.state_dir) if self.state_dir else Path(self.data_root) / ".cellfeed"
        path.mkdir(parents=True, exist_ok=True)
        return path
