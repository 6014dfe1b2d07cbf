"""Stream kinds by name. Imported lazily so that one kind's dependencies never load another's."""

from __future__ import annotations

import importlib

from cellfeed.server.errors import CellfeedError
from cellfeed.server.sources.base import Source

_KINDS = {
    "perturbation": "cellfeed.server.sources.perturbation:PerturbationSource",
    "dynaclr": "cellfeed.server.sources.dynaclr:DynaCLRSource",
    "table": "cellfeed.server.sources.table:TableSource",
}


def kinds() -> list[str]:
    return sorted(_KINDS)


def source_class(kind: str) -> type[Source]:
    """The Source class for `kind`, or a CellfeedError listing the kinds there are."""
    try:
        target = _KINDS[kind]
    except KeyError:
        raise CellfeedError(f"unknown stream kind {kind!r}; known kinds: {', '.join(kinds())}") from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
