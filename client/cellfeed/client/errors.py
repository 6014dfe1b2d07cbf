"""What the client raises: the server refused a request, failed on it, or could not be reached in time."""

from __future__ import annotations


class RequestError(ValueError):
    """The server refused the request because of its input; the message says what is at fault.

    Also a refusal the client makes itself: a bad token, a TLS handshake that fails."""


class ServerError(RequestError):
    """The server failed building its answer (a file it cannot read, a server bug); retrying the
    same request would fail the same way, so it is not retried. The message is the server's."""


class ServerUnavailable(ConnectionError):
    """The server could not be reached, or did not answer in time, within the retry budget."""
