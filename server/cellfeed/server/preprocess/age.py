"""Age in years from development_stage: by ontology term ID when present, else by label.

Point stages ("65-year-old stage", "9-month-old stage", "6 weeks", "21-day-old stage") convert
to years; a bounded range of whole ages ("2-4 year-old", "sixth decade stage" = 50-59) becomes its
mean; "newborn" is 0. Prenatal, open-ended ("80 year-old and over") and named stages are null.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

STAGES = Path(__file__).parent / "data" / "development_stages.tsv"
YEARS_PER = {"year": 1.0, "month": 1 / 12, "week": 7 / 365.25, "day": 1 / 365.25}
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth"]
_UNIT = r"(year|month|week|day)s?"
_RANGE = re.compile(rf"(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)[\s-]+{_UNIT}\b")
_POINT = re.compile(rf"(\d+(?:\.\d+)?)[\s-]+{_UNIT}(?:[\s-]+old)?\b")
_DECADE = re.compile(rf"\b({'|'.join(ORDINALS)}) decade\b")
_OPEN = re.compile(r"\b(over|older|under)\b|\d\+")


@functools.cache
def age_in_years(label: str) -> float | None:
    """The age a development stage label stands for, in years, or None when it gives none."""
    text = label.strip().lower()
    if not text or "post-fertilization" in text or "lmp" in text or "carnegie" in text or "theiler" in text:
        return None
    if text.startswith("newborn"):
        return 0.0
    if _OPEN.search(text):
        return None
    if m := _RANGE.search(text):
        return (float(m[1]) + float(m[2])) / 2 * YEARS_PER[m[3]]
    if m := _POINT.search(text):
        return float(m[1]) * YEARS_PER[m[2]]
    if m := _DECADE.search(text):
        n = ORDINALS.index(m[1]) + 1
        return 10 * n - 5.5
    return None


@functools.cache
def stage_labels() -> dict[str, str]:
    """HsapDv/MmusDv term ID -> label (shipped table, see data/README.md)."""
    lines = STAGES.read_text(encoding="utf-8").splitlines()[1:]
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


def ages(labels: pa.Array | None, term_ids: pa.Array | None = None) -> pa.Array:
    """float64 ages for a column of labels and/or ontology term IDs (the term wins when known)."""
    known = stage_labels()
    if term_ids is not None:
        terms = term_ids.cast(pa.string())
        from_terms = pc.take(pa.array([_term_age(t, known) for t in terms.unique().to_pylist()], pa.float64()), pc.index_in(terms, terms.unique()))
        if labels is None:
            return from_terms
        return pc.coalesce(from_terms, ages(labels))
    assert labels is not None
    labels = labels.cast(pa.string())
    uniq = labels.unique()
    values = pa.array([age_in_years(v) if v is not None else None for v in uniq.to_pylist()], pa.float64())
    return pc.take(values, pc.index_in(labels, uniq))


def _term_age(term: str | None, known: dict[str, str]) -> float | None:
    return age_in_years(known[term]) if term in known else None


@dataclass
class AgeCounts:
    """How many cells got an age, which labels gave none, and the age distribution; per file."""

    cells: int = 0
    with_age: int = 0
    null_labels: Counter = field(default_factory=Counter)
    distribution: Counter = field(default_factory=Counter)

    def add(self, labels: pa.Array, values: pa.Array) -> None:
        self.cells += len(values)
        self.with_age += len(values) - values.null_count
        if values.null_count:
            missing = pc.filter(labels.cast(pa.string()).fill_null("<missing>"), pc.is_null(values))
            for item in pc.value_counts(missing).to_pylist():
                self.null_labels[item["values"]] += item["counts"]
        for item in pc.value_counts(values.drop_null()).to_pylist():
            self.distribution[item["values"]] += item["counts"]

    def as_dict(self) -> dict:
        return {
            "cells": self.cells,
            "with_age": self.with_age,
            "null": self.cells - self.with_age,
            "null_percent": round(100 * (self.cells - self.with_age) / self.cells, 3) if self.cells else 0.0,
            "null_labels": dict(self.null_labels.most_common(10)),
            "distribution": {str(k): v for k, v in sorted(self.distribution.items())[:200]},
        }
