"""One bearer token guards both planes when configured: Flight middleware and a FastAPI dependency."""

from __future__ import annotations

import hmac
import logging

import pyarrow.flight as flight
from fastapi import HTTPException, Request

log = logging.getLogger(__name__)


def _why(header: str | None) -> str:
    """What was wrong with the credentials, never what they were."""
    if not header:
        return "no token"
    return "a wrong token" if header.startswith("Bearer ") else "no bearer token"


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
            # Flight gives middleware no peer address; the call is named
            log.warning("auth failed: Flight %s with %s", info.method.name, _why(values[0] if values else None))
            raise flight.FlightUnauthenticatedError("missing or wrong token: send `authorization: Bearer <token>`")
        return None


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the server's token (when one is set)."""
    expected = request.app.state.ctx.settings.token
    header = request.headers.get("authorization")
    if not token_ok(expected, header):
        peer = f"{request.client.host}:{request.client.port}" if request.client else "unknown peer"
        log.warning("auth failed: %s %s from %s with %s", request.method, request.url.path, peer, _why(header))
        raise HTTPException(status_code=401, detail="missing or wrong token: send `Authorization: Bearer <token>`")
