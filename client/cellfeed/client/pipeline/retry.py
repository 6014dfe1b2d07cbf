"""The client's one retry policy (tenacity), for every call and every stream.

An attempt that may be tried again raises `Retry`. A transport failure counts against the retry
budget (`retry_seconds`, measured from the call's start: for a stream, from its last batch), with
waits of 0.1 s doubling to 5 s, none when another replica is up; reopening a session the server
forgot and falling back from shared memory to gRPC are retried at once and outside the budget
(their callers bound how often). Anything else an attempt raises (a refusal, a TLS or server
failure, a decode error) ends the call at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

FIRST_WAIT_S = 0.1
MAX_WAIT_S = 5.0
T = TypeVar("T")


class Retry(Exception):
    """Try again: `cause` failed. `at_once`: without waiting; `budgeted`: a transport failure,
    which counts against the retry budget."""

    def __init__(self, cause: BaseException, *, at_once: bool = False, budgeted: bool = True) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.at_once = at_once
        self.budgeted = budgeted


class Closed(Exception):
    """The stage was closed while it retried or read: its thread ends quietly."""


def _retry_of(state: tenacity.RetryCallState) -> Retry:
    exc = state.outcome.exception() if state.outcome is not None else None
    assert isinstance(exc, Retry), exc
    return exc


def call(
    attempt: Callable[[], T],
    *,
    budget_s: Callable[[], float],
    give_up: Callable[[BaseException, float], BaseException],
    stop: threading.Event | None = None,
    max_wait_s: float = MAX_WAIT_S,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """attempt() until it returns or raises something other than Retry. Past the budget (read
    at each failure, so a changed `retry_seconds` applies at once) it raises give_up(cause,
    budget); once `stop` is set, Closed. `on_retry(cause, attempt_number)` runs before each wait."""

    def wait(state: tenacity.RetryCallState) -> float:
        if _retry_of(state).at_once:
            return 0.0
        return min(FIRST_WAIT_S * 2 ** (state.attempt_number - 1), max_wait_s)

    def should_stop(state: tenacity.RetryCallState) -> bool:
        if stop is not None and stop.is_set():
            return True
        return _retry_of(state).budgeted and state.seconds_since_start + (state.upcoming_sleep or 0.0) > budget_s()

    def fail(state: tenacity.RetryCallState) -> T:
        if stop is not None and stop.is_set():
            raise Closed() from None
        cause = _retry_of(state).cause
        raise give_up(cause, budget_s()) from cause

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(Retry),
        wait=wait,
        stop=should_stop,
        sleep=stop.wait if stop is not None else time.sleep,
        retry_error_callback=fail,
        before_sleep=(lambda state: on_retry(_retry_of(state).cause, state.attempt_number)) if on_retry else None,
    )
    return retrying(attempt)
