"""Stated bounds on what one request may ask for, so that no request can exhaust the server.

- JSON bodies and session configs: at most MAX_JSON_BYTES, nested at most MAX_JSON_DEPTH deep
  (a deeper document would hit Python's recursion limit while being parsed).
- Batches: at most Settings.max_batch_size (CELLFEED_MAX_BATCH_SIZE, 65,536) rows (cells,
  groups or patches) per batch, and groups x cells at most 16 times that, checked when a session
  opens, before anything is allocated.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field

from cellfeed.server.errors import CellfeedError
from cellfeed.server.paths import check_name

MAX_JSON_BYTES = 1 << 20
MAX_PATH_CHARS = 4096


def _path_name(value: str) -> str:
    try:
        return check_name(value)
    except CellfeedError as exc:
        raise ValueError(str(exc)) from None


# a path inside the data root as a request names it (jobs' inputs and folders). The schema says
# what the data root refuses for its form anyway (so a schema-valid name is never refused for
# it), and the validator says what is wrong in the data root's own words (a NUL byte, too long).
PathName = Annotated[
    str,
    AfterValidator(_path_name),
    Field(json_schema_extra={"minLength": 1, "maxLength": MAX_PATH_CHARS, "pattern": r"^[^\x00/]{0,255}(/[^\x00/]{0,255})*$"}),
]
CELLS_PER_ROW_CAP = 16  # groups x cells per batch: at most this many times the batch cap
MAX_JSON_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes | str) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped), without parsing it."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if b"[" not in data and b"{" not in data:
        return 0
    codes = np.frombuffer(_STRINGS.sub(b"", data), dtype=np.uint8)
    step = np.isin(codes, (ord("["), ord("{"))).astype(np.int32) - np.isin(codes, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def check_json(raw: bytes | str, where: str) -> None:
    """A CellfeedError naming `where` when the JSON text is larger or deeper than stated."""
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > MAX_JSON_BYTES:
        raise CellfeedError(f"{where}: {size:,} bytes of JSON; at most {MAX_JSON_BYTES:,} are accepted")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise CellfeedError(f"{where}: JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")


def loads(raw: bytes | str, where: str) -> Any:
    """json.loads within the stated bounds; every failure is a CellfeedError naming `where`."""
    check_json(raw, where)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CellfeedError(f"{where} is not JSON: {exc}") from None


def object_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON (dicts and lists; a scalar is 0), counted up to limit + 1."""
    depth, level = 0, [value]
    while depth <= limit:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def check_batch_size(config: dict[str, Any], cap: int, where: str) -> None:
    """Refuse a batch larger than the server's cap (rows per batch, and groups x cells), before
    anything is allocated for it."""
    for key in ("batch_size", "group_size_S", "cell_sentence_len"):
        value = config.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and value > cap:
            raise CellfeedError(f"{where}: {key}={value:,} is more than this server serves in one batch (at most {cap:,}; the server's CELLFEED_MAX_BATCH_SIZE)")
    batch, group = config.get("batch_size"), config.get("group_size_S")
    if isinstance(batch, int) and isinstance(group, int) and not isinstance(batch, bool) and batch * group > cap * CELLS_PER_ROW_CAP:
        raise CellfeedError(f"{where}: batch_size x group_size_S = {batch * group:,} cells per batch; at most {cap * CELLS_PER_ROW_CAP:,}")
