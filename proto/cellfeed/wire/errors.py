"""Error kinds: what a failed cellfeed call means, written once for the server and the client.

Every error a cellfeed server sends is a `FlightServerError` whose message names the file, key
or value at fault and whose `extra_info` is its kind, b"cellfeed:<kind>": structured, never
parsed out of the message, and the same before a stream and during one (the server raises a
stream's error outside the C++ reader, which would drop it). An error without a kind did not
come from a cellfeed server's handlers but from the transport (a reset stream, a dying process).

What the client does with each kind is part of the contract (docs/protocol.md, "Errors"):
`not_found` reopen the session, then retry; `shm_unavailable` stream again without `shm_pool`;
`invalid` and `internal` fail at once (retrying gives the same answer: the plan is a pure
function of the request). Transport failures (refused, reset, deadline) are retried.
"""

from __future__ import annotations

import re
from enum import Enum

import pyarrow.flight as flight

PREFIX = "cellfeed:"
_GRPC_DETAIL = (". Detail:", ". gRPC client debug context")
# what gRPC says when the TLS handshake fails (bad certificate, plain server, wrong host name)
_TLS_FAILURE = re.compile(r"handshake failed|SSL_ERROR|CERTIFICATE_VERIFY_FAILED|certificate verify failed", re.IGNORECASE)


class ErrorKind(str, Enum):
    """The kinds of refusal a cellfeed server sends."""

    NOT_FOUND = "not_found"  # a named thing does not exist (a session, after a restart): reopen, retry
    INVALID = "invalid"  # the request's own input is at fault (config key, ticket field): fix it
    SHM_UNAVAILABLE = "shm_unavailable"  # no shared-memory slot could be made: stream without shm_pool
    INTERNAL = "internal"  # the server failed building the answer (a file it cannot read, a bug)

    @property
    def wire(self) -> bytes:
        """The kind as `extra_info` carries it: b"cellfeed:<kind>"."""
        return f"{PREFIX}{self.value}".encode()

    @classmethod
    def parse(cls, text: str) -> "ErrorKind":
        """The kind named by `<kind>` or `cellfeed:<kind>`; a kind this version does not know (a
        newer server's) counts as internal: a refusal all the same, not retried."""
        name = text[len(PREFIX):] if text.startswith(PREFIX) else text
        try:
            return cls(name)
        except ValueError:
            return cls.INTERNAL


def server_error(message: str, kind: ErrorKind) -> flight.FlightServerError:
    """The FlightServerError a server raises: the message as given, the kind in extra_info."""
    return flight.FlightServerError(message, extra_info=kind.wire)


def _head(text: str) -> str:
    """The server's own text, without gRPC's trailing detail and debug context."""
    for marker in _GRPC_DETAIL:
        if marker in text:
            text = text.split(marker)[0]
    return text


def kind_of(exc: BaseException) -> ErrorKind | None:
    """The kind of a cellfeed server's error, from its extra_info; None when the error has none
    (it came from the transport, or is not a Flight error at all)."""
    if not isinstance(exc, flight.FlightError):
        return None
    info = getattr(exc, "extra_info", b"") or b""
    return ErrorKind.parse(info.decode(errors="replace")) if info.startswith(PREFIX.encode()) else None


def message_of(exc: BaseException) -> str:
    """The server's message, without gRPC's trailing detail."""
    return _head(str(exc)).removeprefix("Flight returned unavailable error, with message: ")


def is_tls_failure(exc: BaseException) -> bool:
    """Whether a failure to connect was the TLS handshake (retrying cannot mend a certificate)."""
    return isinstance(exc, flight.FlightError) and bool(_TLS_FAILURE.search(str(exc)))
