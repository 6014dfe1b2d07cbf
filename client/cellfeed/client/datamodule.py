"""What every cellfeed DataModule shares: one session, one kept loader per split, resume state.

Subclasses name their stream `kind`, give `session_config()` and `on_session()` (which builds
the decoder), and may change how many streams and how much prefetch a loader gets.

Where the server is: the `server` argument (typed `ServerAddress`, `str | list[str] | None`, so
LightningCLI YAML takes one address or a list), else CELLFEED_SERVER, else grpc://127.0.0.1:8815
(one address, or several replicas: a list, commas, or a name of several hosts; see
cellfeed.client.replicas); the token: `token`, else CELLFEED_TOKEN; the client's TLS files:
CELLFEED_TLS_ROOT_CERTS, CELLFEED_TLS_CERT_CHAIN, CELLFEED_TLS_PRIVATE_KEY (paths). Neither variable is saved in hparams, so a secret set in the
environment stays out of LightningCLI's saved config.yaml (`token` is never saved).

Fast, visible failure: the first `setup()` checks the address within `connect_timeout` (else
CELLFEED_CONNECT_TIMEOUT, else 5 s) and says what is probably wrong (nothing listening, cellfeed's
HTTP port given for its Flight port, an unknown host; cellfeed.client.preflight). Once
connected, reconnecting mid-epoch has its own budget, `retry_seconds` (else
CELLFEED_RETRY_SECONDS, else 60 s).

A module pickles at any point (Lightning's ddp_spawn, multiprocessing, a deep copy): the Flight
connection, the loaders and the shared-memory reader stay behind; the session's facts and each
loader's position travel, and the copy reconnects when it next needs the server.
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import pyarrow as pa

from lightning.pytorch.core.mixins import hparams_mixin

from cellfeed.client.connection import Connection, Session
from cellfeed.client.distributed import resolve_rank
from cellfeed.client import preflight, shm
from cellfeed.client.loader import RemoteLoader
from cellfeed.client.replicas import ReplicaSet, preflight_any
from cellfeed.client.shm import SlotReader

DEFAULT_SERVER = "grpc://127.0.0.1:8815"
DEFAULT_PREFETCH = 2
# What a DataModule's `server` argument takes: one address, a comma-separated string or a list
# of replicas (LightningCLI YAML: `server: grpc://a:8815` or `server: [grpc://a:8815, grpc://b:8815]`),
# or None for $CELLFEED_SERVER, else the local default.
ServerAddress = str | list[str] | None


def resolve_server(server: ServerAddress) -> str | list[str]:
    """`server` (one address, commas, or a list of replicas), else $CELLFEED_SERVER, else the
    local default (grpc://127.0.0.1:8815)."""
    if isinstance(server, (list, tuple)):
        return [str(s) for s in server] if server else resolve_server(None)
    return server or os.environ.get("CELLFEED_SERVER") or DEFAULT_SERVER


def resolve_token(token: str | None) -> str | None:
    """`token`, else $CELLFEED_TOKEN (unset or empty: no token)."""
    return token if token is not None else (os.environ.get("CELLFEED_TOKEN") or None)


def _names_class(class_path: Any, cls: type) -> bool:
    """Whether LightningCLI's `class_path` is `cls` (an alias such as cellfeed.client.X counts)."""
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) is cls
    except (ImportError, AttributeError):
        return False


class RemoteDataModule(pl.LightningDataModule):
    """Base of the DataModules that pull batches from a cellfeed server (no I/O in __init__)."""

    kind: ClassVar[str]
    decoder: Callable[[pa.RecordBatch], Any]

    def __init__(self, token: str | None = None) -> None:
        super().__init__()
        self.token = resolve_token(token)
        self.session: Session | None = None
        self._connection: Connection | None = None
        self._replicas: ReplicaSet | None = None  # every replica `server` names; _connection is the first
        self._loaders: dict[str, RemoteLoader] = {}
        self._pending_state: dict[str, Any] = {}
        self._slots: SlotReader | None = None
        self._slots_probed = False

    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's, except that a module built inside another's `__init__` under LightningCLI
        (the cell-load drop-in builds cellfeed's perturbation module) saves its own arguments,
        not the outer module's config that LightningCLI hands to whatever saves first."""
        frame = frame or inspect.currentframe().f_back
        given = hparams_mixin._given_hyperparameters.get()
        if given is None or _names_class(given.get("_class_path"), type(self)):
            return super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        token = hparams_mixin._given_hyperparameters.set(None)
        try:
            return super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)
        finally:
            hparams_mixin._given_hyperparameters.reset(token)

    # -- what subclasses decide ----------------------------------------------------------------
    def session_config(self) -> dict[str, Any]:
        """The JSON the server receives to open this module's session."""
        raise NotImplementedError

    def on_session(self, session: Session) -> None:
        """Called once the session is open; override to build `self.decoder` from its facts."""

    @property
    def train_split(self) -> str:
        return "train"

    @property
    def num_streams(self) -> int:
        return max(1, int(self.hparams.num_workers))

    @property
    def server(self) -> str | list[str]:
        """The Flight address(es) this module reads from (`server`, else CELLFEED_SERVER, else
        local): one, a list or a comma-separated string of replicas (cellfeed.client.replicas)."""
        return resolve_server(self.hparams.get("server"))

    @property
    def connect_timeout(self) -> float:
        """Seconds `setup()` gives the server to answer before it fails, saying why
        (`connect_timeout`, else CELLFEED_CONNECT_TIMEOUT, else 5)."""
        return preflight.env_seconds("CELLFEED_CONNECT_TIMEOUT", self.hparams.get("connect_timeout"), preflight.DEFAULT_CONNECT_TIMEOUT)

    @property
    def retry_seconds(self) -> float | None:
        """The retry budget once connected (mid-epoch reconnection): `retry_seconds`, else
        CELLFEED_RETRY_SECONDS, else the Connection's default (60)."""
        return preflight.env_seconds("CELLFEED_RETRY_SECONDS", self.hparams.get("retry_seconds"), None)

    @property
    def prefetch(self) -> int:
        """Decoded batches queued per stream: `prefetch_factor` (else a deprecated `prefetch`, else 2)."""
        factor = self.hparams.get("prefetch_factor")
        if factor is None:
            factor = self.hparams.get("prefetch")
        return int(factor if factor is not None else DEFAULT_PREFETCH)

    @staticmethod
    def warn_prefetch_alias(prefetch: int | None, prefetch_factor: int | None) -> None:
        """`prefetch` is the old name of `prefetch_factor` (one name across the DataModules)."""
        if prefetch is None:
            return
        if prefetch_factor is not None and prefetch_factor != prefetch:
            raise ValueError(f"prefetch={prefetch} and prefetch_factor={prefetch_factor}: give prefetch_factor only")
        warnings.warn("`prefetch` is deprecated: use `prefetch_factor` (the same number)", FutureWarning, stacklevel=3)

    # -- session -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open the session once (every stage shares it) and find this process's rank."""
        if self.session is None:
            config = self.session_config()  # a local file's fault is named before the network's
            replicas = self._connect_replicas()
            preflight_any(replicas, self.connect_timeout)
            self.session = replicas.open_session(self.kind, config)
            self.on_session(self.session)
        self._connect_slots()
        self.rank, self.world_size = resolve_rank(self.trainer, self.hparams.rank, self.hparams.world_size)

    def _connect(self) -> Connection:
        """The connection to the server, made on first need (again after unpickling)."""
        if self._connection is None:
            self._connection = self._connect_replicas().primary
            self._slots_probed = False
        return self._connection

    def _connect_replicas(self) -> ReplicaSet:
        """One Connection per replica `server` names (a list, commas, a name of several hosts)."""
        if getattr(self, "_replicas", None) is None:
            tls = self.tls_files()
            self._replicas = ReplicaSet(
                self.server, lambda location: Connection(location, self.token, retry_seconds=self.retry_seconds, **tls)
            )
            self._connection = None
        if self._connection is None:
            self._connection = self._replicas.primary
            self._slots_probed = False
        return self._replicas

    def tls_files(self) -> dict[str, bytes]:
        """The Flight client's TLS files, read from the paths `tls_root_certs`, `tls_cert_chain`
        and `tls_private_key` (hparams of a module that takes them), else CELLFEED_TLS_ROOT_CERTS,
        CELLFEED_TLS_CERT_CHAIN and CELLFEED_TLS_PRIVATE_KEY; a client certificate needs its key."""
        paths = {}
        for arg, name in (("tls_root_certs", "tls_root_certs"), ("tls_cert_chain", "cert_chain"), ("tls_private_key", "private_key")):
            path = self.hparams.get(arg) or os.environ.get(f"CELLFEED_{arg.upper()}")
            if path:
                paths[name] = (arg, path)
        if ("cert_chain" in paths) != ("private_key" in paths):
            raise ValueError("tls_cert_chain and tls_private_key go together (mutual TLS): give both, or neither")
        files = {}
        for name, (arg, path) in paths.items():
            try:
                with open(os.path.expanduser(str(path)), "rb") as handle:
                    files[name] = handle.read()
            except OSError as exc:
                raise ValueError(f"{arg}={str(path)!r}: cannot read it ({exc.strerror or exc})") from None
        return files

    def _connect_slots(self) -> None:
        """Probe once per connection for shared-memory slots (after the session is open)."""
        connection = self._connect()
        if not getattr(self, "_slots_probed", False):
            self._slots = self._shared_memory(connection)
            self._slots_probed = True

    # -- pickling ------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        pending = dict(self._pending_state)
        for split, loader in self._loaders.items():
            pending[split] = loader.state_dict()  # the copy goes on where this one stands
        state["_pending_state"] = pending
        state["_connection"] = None
        state["_replicas"] = None
        state["_loaders"] = {}
        state["_slots"] = None
        state["_slots_probed"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _shared_memory(self, connection: Connection) -> SlotReader | None:
        """Slots when the module asks for them (`shared_memory`: None = when the server shares
        this host's shared-memory folder, True = required, False = never)."""
        wanted = self.hparams.get("shared_memory", False)
        if wanted is False:
            return None
        directory = shm.probe(connection)
        if directory is None and wanted:
            raise RuntimeError(
                f"shared_memory=True, but the server at {connection.location} does not see this host's shared-memory "
                "folder (CELLFEED_SHM_DIR, default /dev/shm): run it on this host or share the folder, or pass shared_memory=None"
            )
        return SlotReader(directory) if directory is not None else None

    @property
    def info(self) -> dict[str, Any]:
        if self.session is None:
            raise RuntimeError("call setup() first: the data's facts come from the server")
        return self.session.info

    # -- loaders -------------------------------------------------------------------------------
    def loader(self, split: str) -> RemoteLoader:
        """The loader of one split, created once and kept (so resume state and epochs persist)."""
        if split not in self._loaders:
            if self.session is None:
                raise RuntimeError("call setup() before asking for a dataloader")
            connection = self._connect()
            self._connect_slots()
            loader = RemoteLoader(
                connection,
                self.session,
                split,
                self.decoder,
                rank=self.rank,
                world_size=self.world_size,
                num_streams=self.num_streams,
                prefetch=self.prefetch,
                fixed_epoch=split != self.train_split,
                slots=self._slots,
                replicas=getattr(self, "_replicas", None),
            )
            if split in self._pending_state:
                loader.load_state_dict(self._pending_state.pop(split))
            self._loaders[split] = loader
        return self._loaders[split]

    def loader_if_any(self, split: str) -> RemoteLoader | list:
        """The split's loader, or [] (Lightning's "no loader") when the split has no batches."""
        loader = self.loader(split)
        return loader if len(loader) else []

    def train_dataloader(self) -> RemoteLoader:
        return self.loader(self.train_split)

    def teardown(self, stage: str) -> None:
        """End the training streams that went on into an epoch that will not come."""
        for loader in self._loaders.values():
            loader.close()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        loader = self._loaders.get(self.train_split)
        return {self.train_split: loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        for split, loader in self._loaders.items():
            if split in self._pending_state:
                loader.load_state_dict(self._pending_state.pop(split))
