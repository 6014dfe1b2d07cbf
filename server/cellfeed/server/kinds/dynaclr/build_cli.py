"""`cellfeed build-cell-index`: VisCy main's `dynaclr build-cell-index` (and, with --preprocess,
`preprocess-cell-index`) on cellfeed: a collection YAML to a cell index parquet."""

from __future__ import annotations

import argparse
import json
import sys

from cellfeed.server.errors import CellfeedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellfeed build-cell-index", description=__doc__)
    parser.add_argument("collection", help="collection YAML (VisCy main's schema)")
    parser.add_argument("output", help="cell index parquet to write")
    parser.add_argument("--data-root", default=".", help="every path (collection, plates, tracks, output) must lie inside it [.]")
    parser.add_argument("--include-wells", nargs="+", default=None, help="only these wells (A/1 ...)")
    parser.add_argument("--exclude-fovs", nargs="+", default=None, help="skip these FOVs (A/1/0 ...)")
    parser.add_argument("--preprocess", action="store_true", help="also fill norm_* and z_focus_mean from the plates and drop rows without timepoint statistics")
    parser.add_argument("--focus-channel", default=None, help="channel of focus_slice for z_focus_mean [each experiment's first channel]")
    args = parser.parse_args(argv)
    from cellfeed.server.kinds.dynaclr.cell_index import build_from_collection
    from cellfeed.server.paths import DataRoot

    try:
        done = build_from_collection(
            args.collection, args.output, DataRoot(args.data_root), include_wells=args.include_wells,
            exclude_fovs=args.exclude_fovs, preprocess=args.preprocess, focus_channel=args.focus_channel,
        )
    except CellfeedError as exc:
        print(f"cellfeed build-cell-index: {exc}", file=sys.stderr)
        return 2
    for warning in done.pop("warnings"):
        print(f"warning: {warning}", file=sys.stderr)
    print(json.dumps(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
