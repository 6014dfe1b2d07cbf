"""Every public `__init__` argument of the four DataModules has a Google-style `Args:` entry,
which is what LightningCLI shows in `--help` (parsed here the way jsonargparse parses it)."""

from __future__ import annotations

import inspect

import docstring_parser
import pytest

from cellfeed.client import MultiExperimentDataModule, PerturbationDataModule, TableDataModule
from cellfeed.client.cell_load.data_modules import PerturbationDataModule as CellLoadDataModule


def documented(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for text in (cls.__doc__, cls.__init__.__doc__):
        for param in docstring_parser.parse(text or "", docstring_parser.DocstringStyle.GOOGLE).params:
            for name in param.arg_name.split(","):  # "pin_memory, buffer_size: ..." documents both
                docs[name.strip()] = param.description or ""
    return docs


@pytest.mark.parametrize("cls", [PerturbationDataModule, CellLoadDataModule, MultiExperimentDataModule, TableDataModule])
def test_every_init_argument_is_documented(cls):
    params = [
        name for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    docs = documented(cls)
    missing = [name for name in params if not docs.get(name, "").strip()]
    assert not missing, f"{cls.__module__}.{cls.__name__}: no Args entry for {', '.join(missing)}"
