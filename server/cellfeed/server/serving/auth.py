"""One bearer token guards both planes when configured: Flight middleware and a FastAPI dependency."""

from __future__ import annotations

import hmac

import pyarrow.flight as flight
from fastapi import HTTPException, Request


def token_ok(expected: str | None, header: str | None) -> bool:
    if not expected:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), expected.encode())


class TokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Refuses every Flight call whose `authorization` header is not `Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self.token = token

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> None:
        values = headers.get("authorization") or headers.get("Authorization") or []
        if not token_ok(self.token, values[0] if values else None):
            raise flight.FlightUnauthenticatedError("missing or wrong token: send `authorization: Bearer <token>`")
        return None


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the server's token (when one is set)."""
    expected = request.app.state.ctx.settings.token
    if not token_ok(expected, request.headers.get("authorization")):
        raise HTTPException(status_code=401, detail="missing or wrong token: send `Authorization: Bearer <token>`")
