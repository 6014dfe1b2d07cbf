from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class OpenSession(_message.Message):
    __slots__ = ("kind", "config_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    config_json: str
    def __init__(self, kind: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "kind", "info_json", "tables")
    class TablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: str
    info_json: str
    tables: _containers.ScalarMap[str, bytes]
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[str] = ..., info_json: _Optional[str] = ..., tables: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("session_id", "split", "epoch", "rank", "world_size", "stream_count", "first_batch", "shm_pool", "continue_epochs", "locations")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STREAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_BATCH_FIELD_NUMBER: _ClassVar[int]
    SHM_POOL_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    split: str
    epoch: int
    rank: int
    world_size: int
    stream_count: int
    first_batch: int
    shm_pool: str
    continue_epochs: bool
    locations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., split: _Optional[str] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., stream_count: _Optional[int] = ..., first_batch: _Optional[int] = ..., shm_pool: _Optional[str] = ..., continue_epochs: _Optional[bool] = ..., locations: _Optional[_Iterable[str]] = ...) -> None: ...

class Ticket(_message.Message):
    __slots__ = ("session_id", "split", "epoch", "rank", "world_size", "stream_index", "stream_count", "first_batch", "shm_pool", "continue_epochs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STREAM_INDEX_FIELD_NUMBER: _ClassVar[int]
    STREAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_BATCH_FIELD_NUMBER: _ClassVar[int]
    SHM_POOL_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    split: str
    epoch: int
    rank: int
    world_size: int
    stream_index: int
    stream_count: int
    first_batch: int
    shm_pool: str
    continue_epochs: bool
    def __init__(self, session_id: _Optional[str] = ..., split: _Optional[str] = ..., epoch: _Optional[int] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., stream_index: _Optional[int] = ..., stream_count: _Optional[int] = ..., first_batch: _Optional[int] = ..., shm_pool: _Optional[str] = ..., continue_epochs: _Optional[bool] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("num_batches", "batch_size")
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    num_batches: int
    batch_size: int
    def __init__(self, num_batches: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...
