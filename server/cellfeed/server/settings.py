"""Server settings: one model lists them; `cellfeed serve` flags, CELLFEED_* variables and defaults
all come from it, so they cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cellfeed.server.errors import StartupError

ENV_PREFIX = "CELLFEED_"


class Settings(BaseSettings):
    """Everything `cellfeed serve` accepts: --<name> on the command line, CELLFEED_<NAME> in the
    environment (an empty variable counts as unset), else the default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", validate_default=True)

    data_root: str = Field(".", description="directory every client path is resolved in")
    host: str = Field("127.0.0.1", description="address to bind")
    flight_port: int = Field(8815, ge=0, le=65535, description="Arrow Flight port (0: any free port)")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    token: str | None = Field(None, description="bearer token both planes require")
    state_dir: str | None = Field(None, description="job records and logs (default: <data-root>/.cellfeed)")
    dask_scheduler: str | None = Field(None, description="run jobs on this Dask scheduler")
    tls_cert: str | None = Field(None, description="PEM certificate: serve Flight over TLS and HTTP over HTTPS")
    tls_key: str | None = Field(None, description="PEM private key for --tls-cert")
    tls_client_ca: str | None = Field(None, description="PEM CA bundle: Flight requires client certificates signed by it (mutual TLS)")
    cache_bytes: int = Field(1 << 30, ge=0, description="bytes of decoded row blocks kept between batches, across sessions")
    max_batch_size: int = Field(1 << 16, ge=1, description="most rows (cells, groups, patches) one batch may ask for")
    session_idle_seconds: int = Field(600, ge=0, description="close a session with no live stream after this long")
    max_sessions: int = Field(64, ge=1, description="close the least recently used idle sessions beyond this many")
    max_session_bytes: int = Field(4 << 30, ge=0, description="... or beyond this many bytes held by sessions")

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Defaults, then CELLFEED_* variables, then explicit (non-None) overrides such as flags;
        an invalid value is a StartupError naming the flag or variable it came from."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else ""
            source = f"--{flag_name(name)}" if name in given else env_name(name)
            raise StartupError(f"{source}={first.get('input')!r}: {first['msg']}") from None

    def resolved_state_dir(self) -> Path:
        """The state folder (created if missing): --state-dir, else <data-root>/.cellfeed."""
        path = Path(self.state_dir) if self.state_dir else Path(self.data_root) / ".cellfeed"
        path.mkdir(parents=True, exist_ok=True)
        return path


def flag_name(field: str) -> str:
    """The command-line flag of a setting, without its dashes: max_batch_size -> max-batch-size."""
    return field.replace("_", "-")


def env_name(field: str) -> str:
    """The environment variable of a setting: max_batch_size -> CELLFEED_MAX_BATCH_SIZE."""
    return f"{ENV_PREFIX}{field.upper()}"
