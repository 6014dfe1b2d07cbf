"""Which channels, which items, which split, which groups: VisCy main's selection arguments on one
cell index (`channels_per_sample`, `split_ratio`, `batch_group_by`, `stratify_by`,
`group_weights`, `positive_cell_source`, `positive_match_columns`, `positive_channel_source`,
`label_columns`).

An *item* is what the sampler draws: an index row, or with `channels_per_sample=1` (bag of
channels) a (row, channel) pair for each source channel valid in the row's well.
"""

from __future__ import annotations

import numpy as np

from cellfeed.server.kinds.dynaclr.config import DynaCLRConfig
from cellfeed.server.kinds.dynaclr.index import CellIndex
from cellfeed.server.kinds.dynaclr.registry import ExperimentRegistry
from cellfeed.server.errors import CellfeedError

# Columns that can group, stratify, match positives or label samples. "condition" and
# "perturbation" are one column (app-dynaclr's and main's names).
COLUMNS = ("experiment", "perturbation", "condition", "marker", "channel_name", "organelle", "microscope", "well", "fov_name", "track_id", "t", "lineage_id")
_ALIAS = {"condition": "perturbation"}


class Selection:
    def __init__(self, config: DynaCLRConfig, registry: ExperimentRegistry, index: CellIndex) -> None:
        self.config, self.registry, self.index = config, registry, index
        rows = index.rows
        exps = registry.experiments
        cps = config.channels_per_sample
        self.bag = cps == 1 and not isinstance(cps, bool)
        if isinstance(cps, list):
            self.read_channels = [self._resolve_fixed(exp, cps) for exp in exps]
        else:
            self.read_channels = [list(exp.source_channel) for exp in exps]
        self.read_markers = [
            [exp.source_markers[exp.source_channel.index(c)] if c in exp.source_channel else c for c in chans]
            for exp, chans in zip(exps, self.read_channels)
        ]
        self.num_channels = 1 if self.bag else len(self.read_channels[0])
        # Items: rows, or (row, slot) for each channel valid in the row's well.
        n = len(index)
        if self.bag:
            fov_well = [ref.fov.well for ref in index.fovs]
            per_slot = []
            for s in range(max(len(chans) for chans in self.read_channels)):  # an experiment may read fewer channels
                ok_fov = np.array(
                    [s < len(self.read_channels[ref.experiment]) and _channel_valid(exps[ref.experiment].channel_wells, s, fov_well[f])
                     for f, ref in enumerate(index.fovs)],
                    dtype=bool,
                )
                per_slot.append(ok_fov[rows["fov"]])
            valid = np.stack(per_slot, axis=1)  # [rows, slots]
            r, sl = np.nonzero(valid)
            self.item_row, self.item_slot = r.astype(np.int64), sl.astype(np.int64)
        else:
            self.item_row = np.arange(n, dtype=np.int64)
            self.item_slot = np.full(n, -1, dtype=np.int64)
        self._item_start = np.searchsorted(self.item_row, np.arange(n + 1))
        self.vocab = {name: self._vocab(name) for name in ("perturbation", "marker", "channel_name", "organelle", "microscope", "well")}
        # Grouping and strata: main's names win when given; else app-dynaclr's booleans.
        self.group_columns = self._columns(config.batch_group_by, ["experiment"] if config.experiment_aware else [], "batch_group_by")
        self.stratify_columns = self._columns(config.stratify_by, ["perturbation"] if config.condition_balanced else [], "stratify_by")
        self.match_mode = config.positive_cell_source != "self" and not config.temporal_positives
        self.label_vocab: dict[str, list[str]] = {}
        self._label_columns = dict(config.label_columns or {})
        for key, column in self._label_columns.items():
            self._check_column(column, "label_columns")
        self.return_meta = config.return_meta or bool(self._label_columns)
        self.split_mode = "experiment"
        self.val_fovs: dict[str, list[str]] = {}
        for key, column in self._label_columns.items():  # encoders over every row of the session, so train and val agree
            codes, names = self.codes(np.arange(len(self.item_row)), [column])
            self.label_vocab[key] = sorted(names)

    # -- channels ----------------------------------------------------------------------------
    def _resolve_fixed(self, exp, labels: list[str]) -> list[str]:
        out = []
        for label in labels:
            if label in exp.source_markers:
                out.append(exp.source_channel[exp.source_markers.index(label)])
            elif label in exp.channel_names:
                out.append(label)
            else:
                raise CellfeedError(
                    f"experiment {exp.name!r}: channels_per_sample names {label!r}, which is neither a marker "
                    f"({exp.source_markers}) nor a channel ({exp.channel_names})"
                )
        return out

    def channel_keys(self, form: str) -> list[str]:
        """The transform keys: ch_i (app-dynaclr form); VisCy main's labels in the main forms
        (the markers when every experiment has the same ones, channel_0 for one channel a sample,
        the list given)."""
        cps = self.config.channels_per_sample
        if form == "experiments_yaml":
            return [f"ch_{i}" for i in range(self.num_channels)]
        if self.bag:
            return ["channel_0"]
        if isinstance(cps, list):
            return list(cps)
        markers = self.read_markers
        if all(m == markers[0] for m in markers) and len(set(markers[0])) == len(markers[0]):
            return list(markers[0])
        return [f"ch_{i}" for i in range(self.num_channels)]

    def positive_slots(self, slots: np.ndarray, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The positive's channel: the anchor's ("same") or drawn among those valid for it ("any")."""
        if not self.bag or self.config.positive_channel_source == "same":
            return slots.copy()
        out = slots.copy()
        u = rng.random(len(positives))
        for i, row in enumerate(positives):
            lo, hi = self._item_start[row], self._item_start[row + 1]
            if hi > lo:
                out[i] = self.item_slot[lo + min(int(u[i] * (hi - lo)), hi - lo - 1)]
        return out

    # -- items and splits --------------------------------------------------------------------
    def items_of(self, row_mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(row_mask[self.item_row])

    def anchor_rows(self, match: "MatchPositives | None") -> np.ndarray:
        if self.config.positive_cell_source == "self":
            return np.ones(len(self.index), dtype=bool)
        if match is not None:
            return match.count >= 2
        return self.index.valid

    def train_rows(self, val_experiments: list[str]) -> np.ndarray:
        """Rows of the training split: outside val_experiments, or (none named, split_ratio < 1) in
        the training FOVs of each experiment, drawn as VisCy main does (default_rng(seed), each
        experiment's sorted FOV names shuffled in experiment-name order, max(1, int(n * ratio)) train)."""
        rows, names = self.index.rows, self.registry.names
        if val_experiments:
            return ~np.isin(rows["experiment"], [names.index(n) for n in val_experiments])
        if self.config.split_ratio >= 1:
            self.split_mode = "none"
            return np.ones(len(self.index), dtype=bool)
        self.split_mode = "fov"
        rng = np.random.default_rng(self.config.seed)
        fov_names = np.array([ref.fov.name for ref in self.index.fovs], dtype=object)
        train_fovs = np.zeros(len(self.index.fovs), dtype=bool)
        for name in sorted(names):
            e = names.index(name)
            own = np.flatnonzero(np.array([ref.experiment == e for ref in self.index.fovs], dtype=bool))
            present = set(np.unique(rows["fov"][rows["experiment"] == e]).tolist())
            own = [f for f in own if f in present]
            if not own:
                continue
            fovs = sorted(fov_names[own].tolist())
            n_train = max(1, int(len(fovs) * self.config.split_ratio))
            rng.shuffle(fovs)
            chosen = set(fovs[:n_train])
            self.val_fovs[name] = sorted(fovs[n_train:])
            for f in own:
                train_fovs[f] = fov_names[f] in chosen
        return train_fovs[rows["fov"]]

    # -- columns -----------------------------------------------------------------------------
    def _check_column(self, column: str, key: str) -> str:
        if column not in COLUMNS:
            raise CellfeedError(f"dynaclr config: {key} names column {column!r}; known: {', '.join(COLUMNS)}")
        return _ALIAS.get(column, column)

    def _columns(self, given: list[str] | None, default: list[str], key: str) -> list[str]:
        columns = default if given is None else given
        return [self._check_column(c, key) for c in columns]

    def _vocab(self, name: str) -> list[str]:
        exps, index = self.registry.experiments, self.index
        if name == "perturbation":
            return list(index.conditions)
        if name == "marker":
            return sorted({m for ms in self.read_markers for m in ms})
        if name == "channel_name":
            return sorted({c for cs in self.read_channels for c in cs})
        if name == "well":
            return sorted({ref.fov.well for ref in index.fovs})
        return sorted({getattr(e, name) for e in exps})

    def value_codes(self, name: str, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """int32 codes into `vocab[name]` (or the experiment / FOV name codes) for each row."""
        r, exps, fovs = self.index.rows, self.registry.experiments, self.index.fovs
        if name == "experiment":
            return r["experiment"][rows].astype(np.int32)
        if name == "perturbation":
            return r["condition"][rows].astype(np.int32)
        vocab = {v: i for i, v in enumerate(self.vocab[name])}
        exp = r["experiment"][rows].astype(np.int64)
        if name in ("marker", "channel_name"):
            table = self.read_markers if name == "marker" else self.read_channels
            width = max(len(t) for t in table)
            codes = np.array([[vocab[t[min(s, len(t) - 1)]] for s in range(width)] for t in table], dtype=np.int32)
            return codes[exp, np.maximum(slots, 0)]
        if name == "well":
            per_fov = np.array([vocab[ref.fov.well] for ref in fovs], dtype=np.int32)
            return per_fov[r["fov"][rows]]
        per_exp = np.array([vocab[getattr(e, name)] for e in exps], dtype=np.int32)
        return per_exp[exp]

    def _values(self, name: str, rows: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, list[str]]:
        r = self.index.rows
        if name == "fov_name":
            names = sorted({ref.fov.name for ref in self.index.fovs})
            code = {n: i for i, n in enumerate(names)}
            per_fov = np.array([code[ref.fov.name] for ref in self.index.fovs], dtype=np.int64)
            return per_fov[r["fov"][rows]], names
        if name in ("track_id", "t"):
            # a track id is unique within its FOV only
            values = r["fov"][rows].astype(np.int64) * (int(r[name].max()) + 1) + r[name][rows] if name == "track_id" else r["t"][rows]
            uniq, codes = np.unique(values, return_inverse=True)
            return codes.astype(np.int64), [str(v) for v in uniq]
        if name == "lineage_id":
            uniq, codes = np.unique(r["lineage"][rows], return_inverse=True)
            return codes.astype(np.int64), [str(v) for v in uniq]
        vocab = self.index.experiments if name == "experiment" else self.vocab[name]
        return self.value_codes(name, rows, slots).astype(np.int64), list(vocab)

    def codes(self, items: np.ndarray, columns: list[str]) -> tuple[np.ndarray, list[str]]:
        """Per item, the code of its (columns...) value; and each code's name, "|"-joined as VisCy
        keys multi-column groups."""
        if not columns:
            return np.zeros(len(items), dtype=np.int64), [""]
        rows, slots = self.item_row[items], self.item_slot[items]
        parts = [self._values(c, rows, slots) for c in columns]
        stacked = np.stack([p[0] for p in parts], axis=1) if len(items) else np.zeros((0, len(parts)), np.int64)
        uniq, codes = np.unique(stacked, axis=0, return_inverse=True)
        names = ["|".join(parts[j][1][k] for j, k in enumerate(u)) for u in uniq]
        return codes.ravel().astype(np.int64), names

    def group_weights(self, names: list[str]) -> tuple[float, ...] | None:
        weights, key = self.config.group_weights, "group_weights"
        if weights is None and self.config.experiment_weights is not None:
            weights, key = self.config.experiment_weights, "experiment_weights"
            unknown = sorted(set(weights) - set(self.registry.names))
            known = self.registry.names
            if not unknown and not self.group_columns:
                return (1.0,)  # batches are not per experiment: the weights only make sampling weighted, as before
            if not unknown and self.group_columns != ["experiment"]:
                raise CellfeedError("dynaclr config: experiment_weights needs batches grouped by experiment; use group_weights")
        elif weights is not None:
            unknown, known = sorted(set(weights) - set(names)), names
        else:
            return None
        if unknown:
            raise CellfeedError(f"dynaclr config: {key} names {unknown[0]!r}, which is not one of {', '.join(known)}")
        return tuple(float(weights.get(n, 0.0)) for n in names)

    def stratum_ratio(self, names: list[str]) -> tuple[float, ...] | None:
        ratio = self.config.condition_ratio
        if ratio is None:
            return None
        unknown = sorted(set(ratio) - set(self.index.conditions))
        if unknown:
            raise CellfeedError(f"dynaclr config: condition_ratio names {unknown[0]!r}, which is not one of {', '.join(self.index.conditions)}")
        if not self.stratify_columns:
            return None  # no strata: nothing to weigh
        if self.stratify_columns != ["perturbation"]:
            raise CellfeedError("dynaclr config: condition_ratio needs strata by condition (perturbation)")
        k = len(self.index.conditions)
        return tuple(float(ratio.get(n, 1.0 / k)) for n in names)

    def label_codes(self, rows: np.ndarray, slots: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for key, column in self._label_columns.items():
            codes, names = self._values(_ALIAS.get(column, column), rows, slots)
            lookup = {n: i for i, n in enumerate(self.label_vocab[key])}
            remap = np.array([lookup.get(n, -1) for n in names], dtype=np.int32)
            out[key] = remap[codes] if len(codes) else np.zeros(0, np.int32)
        return out


class MatchPositives:
    """VisCy main's column-match positives (e.g. `["perturbation", "marker"]`): another row with the
    same values, drawn uniformly (the anchor itself excluded; VisCy may return the anchor)."""

    def __init__(self, sel: Selection, columns: list[str], split: np.ndarray) -> None:
        """`split`: a code per row (train / val); a positive never comes from the other split."""
        n = len(sel.index)
        rows = np.arange(n)
        slots = np.zeros(n, dtype=np.int64)
        parts = [sel._values(sel._check_column(c, "positive_match_columns"), rows, slots)[0] for c in columns]
        parts.append(split.astype(np.int64))
        _, code = np.unique(np.stack(parts, axis=1), axis=0, return_inverse=True) if n else (None, np.zeros(0, np.int64))
        code = code.ravel()
        self.members = np.argsort(code, kind="stable")
        size = np.bincount(code, minlength=int(code.max()) + 1 if n else 0)
        start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
        self.count = size[code]
        self.start = start[code]
        rank = np.empty(n, dtype=np.int64)
        rank[self.members] = np.arange(n) - np.repeat(start, size)
        self.rank = rank

    def sample(self, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        count = self.count[anchors]
        if len(anchors) and (count < 2).any():
            raise ValueError("an anchor without another row of its match group reached the positive sampler")
        k = np.minimum((rng.random(len(anchors)) * (count - 1)).astype(np.int64), count - 2)
        k = k + (k >= self.rank[anchors])
        return self.members[self.start[anchors] + k]


def _channel_valid(channel_wells: list[list[str]], slot: int, well: str) -> bool:
    if not channel_wells or slot >= len(channel_wells) or not channel_wells[slot]:
        return True
    return well in channel_wells[slot]
