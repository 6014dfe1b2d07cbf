"""Errors meant for people: a bad request fails that request, with a message naming the culprit."""

from __future__ import annotations


class CellfeedError(Exception):
    """A request cannot be served because of its input (file, column, value, config key).

    The message is sent to the client as is, so it must name what is at fault and, where one
    exists, the fix. Anything else raised while serving is a server bug and is logged.
    """


class NotFound(CellfeedError):
    """A named thing (session, dataset, job, split) does not exist."""
