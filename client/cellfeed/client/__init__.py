"""cellfeed's client: Lightning DataModules that pull ready batches from a cellfeed server.

Needs pyarrow and torch only; nothing here imports HDF5, zarr or tensorstore.
"""

from cellfeed.wire.malloc import reuse_freed_memory

reuse_freed_memory()  # before pyarrow.flight starts threads: their malloc arenas must be the one heap

from cellfeed.client.connection import Connection, Session  # noqa: E402
from cellfeed.client.errors import RequestError, ServerUnavailable
from cellfeed.client.loader import RemoteLoader
from cellfeed.client.perturbation import PerturbationDataModule

__all__ = [
    "Connection",
    "PerturbationDataModule",
    "RemoteLoader",
    "RequestError",
    "ServerUnavailable",
    "Session",
]
from cellfeed.client.dynaclr import MultiExperimentDataModule  # noqa: E402
from cellfeed.client.table import TableDataModule  # noqa: E402
