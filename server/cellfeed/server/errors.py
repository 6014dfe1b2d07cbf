"""Errors meant for people: a bad request fails that request, with a message naming the culprit."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError


class CellfeedError(Exception):
    """A request cannot be served because of its input (file, column, value, config key).

    The message is sent to the client as is, so it must name what is at fault and, where one
    exists, the fix. Anything else raised while serving is a server bug and is logged.
    """


class NotFound(CellfeedError):
    """A named thing (session, dataset, job, split) does not exist."""


class MissingFile(CellfeedError):
    """A file or folder a request names is not in the data root (HTTP 404; on Flight, a refusal
    like any other: it is not a lost session)."""


class OutsideRoot(CellfeedError):
    """A path a request names resolves outside the server's data root (HTTP 403)."""


class StartupError(Exception):
    """The server cannot start as configured (a folder it cannot write, a port taken); the
    message says which setting is at fault."""


Model = TypeVar("Model", bound=BaseModel)


def parse_model(model: type[Model], raw: Any, where: str) -> Model:
    """Validate `raw` as `model`, turning the first pydantic error into a CellfeedError for people."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields)
            raise CellfeedError(f"{where}: unknown key {loc!r} (known: {known})") from None
        raise CellfeedError(f"{where}: {loc or 'value'}: {first['msg']}") from None
