"""Stream kinds by name. Imported lazily so that one kind's dependencies never load another's."""

from __future__ import annotations

import importlib

from cellfeed.server.errors import CellfeedError
from cellfeed.server.kinds.base import Source

_KINDS = {
    "perturbation": "cellfeed.server.kinds.perturbation.source:PerturbationSource",
    "dynaclr": "cellfeed.server.kinds.dynaclr.source:DynaCLRSource",
    "table": "cellfeed.server.kinds.table.source:TableSource",
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
