"""What the client raises: the server refused a request, or could not be reached in time."""

from __future__ import annotations


class RequestError(ValueError):
    """The server refused the request because of its input; the message says what is at fault."""


class ServerUnavailable(ConnectionError):
    """The server could not be reached (or kept failing) within the retry budget."""
