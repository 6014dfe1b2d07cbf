"""cellfeed's client: Lightning DataModules that pull ready batches from a cellfeed server.

Needs pyarrow and torch only; nothing here imports HDF5, zarr or tensorstore. Importing it
tunes glibc malloc for batch-sized buffers (see cellfeed.wire.malloc; CELLFEED_MALLOPT=0 opts out).
"""

import warnings

from cellfeed.wire.malloc import reuse_freed_memory

reuse_freed_memory()  # before pyarrow.flight starts threads: their malloc arenas must be the one heap
# Arrow buffers are read-only; the tensors built on them are never written in place.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module="cellfeed")

from cellfeed.client.connection import Connection, Session  # noqa: E402
from cellfeed.client.datamodule import RemoteDataModule  # noqa: E402
from cellfeed.client.dynaclr import MultiExperimentDataModule  # noqa: E402
from cellfeed.client.errors import RequestError, ServerUnavailable  # noqa: E402
from cellfeed.client.loader import RemoteLoader  # noqa: E402
from cellfeed.client.perturbation import PerturbationDataModule  # noqa: E402
from cellfeed.client.table import TableDataModule  # noqa: E402

__all__ = [
    "Connection",
    "MultiExperimentDataModule",
    "PerturbationDataModule",
    "RemoteDataModule",
    "RemoteLoader",
    "RequestError",
    "ServerUnavailable",
    "Session",
    "TableDataModule",
]
