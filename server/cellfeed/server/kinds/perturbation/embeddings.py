"""Target embeddings: a torch.load-able dict target -> vector, as one [n_targets, D] matrix."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cellfeed.server.errors import CellfeedError

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


def load_embeddings(path: Path, label: str, targets: list[str], *, control: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Rows in `targets` order; a target missing from the file gets zeros (warned once per target).

    The control label may be absent without a warning (controls are never perturbed items).
    Returns the matrix and the missing targets. A file that is not a dict of equal-length 1-D
    vectors is refused with the key at fault.
    """
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CellfeedError(f"{label}: cannot read the embedding file with torch.load ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise CellfeedError(f"{label}: the embedding file must hold a non-empty dict target -> vector, not {type(raw).__name__}")
    dim: int | None = None
    vectors: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        try:
            vector = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value, dtype=np.float32)
        except (TypeError, ValueError):
            raise CellfeedError(f"{label}: embedding for {key!r} is not a numeric vector") from None
        vector = vector.reshape(-1) if vector.ndim == 2 and 1 in vector.shape else vector
        if vector.ndim != 1:
            raise CellfeedError(f"{label}: embedding for {key!r} has shape {tuple(vector.shape)}, expected a 1-D vector")
        if dim is None:
            dim = vector.shape[0]
        elif vector.shape[0] != dim:
            raise CellfeedError(f"{label}: embedding for {key!r} has {vector.shape[0]} values, others have {dim}")
        vectors[str(key)] = vector
    assert dim is not None
    matrix = np.zeros((len(targets), dim), dtype=np.float32)
    missing = []
    for i, target in enumerate(targets):
        vector = vectors.get(target)
        if vector is None and target != control:
            missing.append(target)
        elif vector is not None:
            matrix[i] = vector
    new = [t for t in missing if (label, t) not in _warned]
    if new:
        _warned.update((label, t) for t in new)
        log.warning("%s: no embedding for %d target(s), using zeros of size %d: %s", label, len(new), dim, ", ".join(new))
    return matrix, missing
