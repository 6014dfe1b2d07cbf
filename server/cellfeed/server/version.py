"""The installed cellfeed version, as `cellfeed --version`, /healthz and the OpenAPI give it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("cellfeed")
except PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "0+unknown"
