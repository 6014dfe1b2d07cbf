"""`cellfeed preprocess ...`: the seed's commands and options (run-all, step1..4, upload) and sort.

Exit status: 0 when every file succeeded or was skipped, 1 when any failed, 2 on a usage error.
Also runnable as `python -m cellfeed.server.preprocess.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess import steps, summary
from cellfeed.server.preprocess.h5ad_reader import cells_of
from cellfeed.server.preprocess.folders import RunFolders, dataset_name, find_inputs
from cellfeed.server.preprocess.pipeline import FileResult, Options, run_file
from cellfeed.server.preprocess.sort import SortOptions
from cellfeed.server.suffixes import is_h5ad
from cellfeed.wire.malloc import reuse_freed_memory


def _run_folders(args: argparse.Namespace) -> RunFolders:
    return RunFolders(Path(args.interim_dir), Path(getattr(args, "output_dir", "./data/output")), Path(getattr(args, "log_dir", "./logs")))


def _options(args: argparse.Namespace, **extra: object) -> Options:
    fields = Options.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if getattr(args, "random_state", None) is not None:
        values["seed"] = args.random_state
    if getattr(args, "no_age_filter", False):
        values["keep_null_age"] = True
    if getattr(args, "mappers", None):
        values["gene_table"] = args.mappers
    values.update(extra)
    return Options(**values)


def _bar(desc: str, disable: bool) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar in cells, fed by the pipeline's progress callback."""
    bar = tqdm(desc=desc, unit="cells", unit_scale=True, disable=disable or None, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def _report(results: list[FileResult], dirs: RunFolders, write: bool = True) -> int:
    print(summary.render(results, dirs))
    if write:
        try:
            print(f"Summary: {summary.write(results, dirs)}")
        except OSError as exc:
            print(f"warning: cannot write the summary to {dirs.output_dir}: {exc.strerror or exc}", file=sys.stderr)
    return 1 if any(r.status == "FAILED" for r in results) else 0


class JobProgress:
    """The whole run in cells (every input's n_obs, read from its shape up front): a tqdm bar with
    the ETA on a terminal, and one line per finished file on stderr
    (`[2/5] b: SUCCESS; 2,400 of 6,000 cells (40%), 3.1 s elapsed, ETA 4.6 s`)."""

    def __init__(self, files: list[Path], disable: bool) -> None:
        self.sizes = [cells_of(p) for p in files]
        self.total = sum(self.sizes)
        self.disable = disable
        self.started = time.monotonic()
        self.finished = 0  # cells of files done
        self.files = 0
        self.bar = tqdm(desc="all files", total=self.total, unit="cells", unit_scale=True, disable=disable or None, leave=False, position=1)

    def file(self, index: int) -> Callable[[int, int], None]:
        """The progress callback of file `index` (its own bar, and the overall one)."""
        size = self.sizes[index]

        def update(done: int, total: int) -> None:
            self.bar.n = self.finished + min(done * size // max(1, total), size)
            self.bar.refresh()

        return update

    def done(self, index: int, name: str, status: str) -> None:
        self.finished += self.sizes[index]
        self.files += 1
        self.bar.n = self.finished
        self.bar.refresh()
        if self.disable:
            return
        elapsed = time.monotonic() - self.started
        share = self.finished / self.total if self.total else 1.0
        eta = elapsed * (self.total - self.finished) / self.finished if self.finished else None
        eta_text = f"ETA {eta:.1f} s" if eta is not None else "ETA unknown"
        print(
            f"[{self.files}/{len(self.sizes)}] {name}: {status}; {self.finished:,} of {self.total:,} cells ({share:.0%}), "
            f"{elapsed:.1f} s elapsed, {eta_text}",
            file=sys.stderr, flush=True,
        )

    def close(self) -> None:
        self.bar.close()


def _each_file(args: argparse.Namespace, dirs: RunFolders, fn: Callable[..., FileResult]) -> list[FileResult]:
    files = find_inputs(args.h5ad_path, args.input_dir)
    results = []
    overall = JobProgress(files, args.no_progress)
    try:
        for i, path in enumerate(files):
            update, close = _bar(dataset_name(path), args.no_progress)
            whole = overall.file(i)

            def both(done: int, total: int, update=update, whole=whole) -> None:
                update(done, total)
                whole(done, total)

            try:
                results.append(fn(path, both))
            finally:
                close()
            overall.done(i, results[-1].dataset, results[-1].status)
    finally:
        overall.close()
    return results


def cmd_run_all(args: argparse.Namespace) -> int:
    dirs = _run_folders(args)
    token = args.token or os.environ.get("HF_TOKEN")
    options = _options(args, token=token)
    if args.create_hgnc:
        path, _ = steps.write_gene_table(dirs, Path(args.hgnc_file) if args.hgnc_file else None)
        options.gene_table = str(path)
    results = _each_file(args, dirs, lambda p, update: run_file(p, dirs, options, progress=update))
    return _report(results, dirs)


def cmd_step1(args: argparse.Namespace) -> int:
    path, n = steps.write_gene_table(_run_folders(args), Path(args.hgnc_file) if args.hgnc_file else None)
    print(f"gene table: {n:,} Ensembl IDs with a symbol -> {path}")
    return 0


def cmd_step2(args: argparse.Namespace) -> int:
    dirs = _run_folders(args)
    options = _options(args)
    if options.gene_table is None and dirs.gene_table().exists():
        options.gene_table = str(dirs.gene_table())
    results = _each_file(args, dirs, lambda p, update: steps.convert(p, dirs, options, progress=update))
    return _report(results, dirs, write=False)


def _datasets(args: argparse.Namespace, dirs: RunFolders) -> list[str]:
    if args.datasets:
        return [dataset_name(d) if is_h5ad(d) else d for d in args.datasets]
    root = dirs.interim_dir / "parquet_chunks"
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    if not names:
        raise CellfeedError(f"no datasets in {str(root)!r}; run step2-convert-h5ad first")
    return names


def cmd_step3(args: argparse.Namespace) -> int:
    dirs = _run_folders(args)
    options = _options(args)
    return _report([steps.add_age(n, dirs, options) for n in _datasets(args, dirs)], dirs, write=False)


def cmd_step4(args: argparse.Namespace) -> int:
    dirs = _run_folders(args)
    options = _options(args)
    return _report([steps.split(n, dirs, options) for n in _datasets(args, dirs)], dirs)


def cmd_upload(args: argparse.Namespace) -> int:
    from cellfeed.server.preprocess.upload import upload_dataset

    token = args.token or os.environ.get("HF_TOKEN")
    if not token:
        raise CellfeedError("upload needs a token: --token or the HF_TOKEN environment variable")
    out = Path(args.output_dir)
    names = args.datasets or sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:
        repo, added = upload_dataset(out / name, name, args.repo_id, token, readme=Path(args.readme) if args.readme else None)
        print(f"{name}: {len(added)} files -> https://huggingface.co/datasets/{repo}")
    return 0


def cmd_sort(args: argparse.Namespace) -> int:
    from cellfeed.server.preprocess.sort import sort_file

    options = SortOptions(target_label=args.target_label, batch_label=args.batch_label, output_dir=args.output_dir)
    failed = 0
    if args.output and len(args.inputs) > 1:
        raise CellfeedError("--output names one file: give it with one input only (or use --output-dir)")
    inputs = [Path(p) for p in args.inputs]
    overall = JobProgress(inputs, args.no_progress)
    for i, path in enumerate(inputs):
        output = Path(args.output) if args.output else None
        update, close = _bar(path.name, args.no_progress)
        whole = overall.file(i)
        status = "FAILED"
        try:
            done = sort_file(path, output, options, progress=lambda d, t: (update(d, t), whole(d, t)))
            print(f"✓ {path} -> {done.output} ({done.message})")
            status = "SUCCESS"
        except CellfeedError as exc:
            failed += 1
            print(f"✗ {path}: {exc}", file=sys.stderr)
        finally:
            close()
        overall.done(i, path.name, status)
    overall.close()
    return 1 if failed else 0


def _dirs(p: argparse.ArgumentParser, *, output: bool = True, logs: bool = True) -> None:
    p.add_argument("--interim-dir", default="./data/interim")
    if output:
        p.add_argument("-o", "--output-dir", default="./data/output")
    if logs:
        p.add_argument("--log-dir", default="./logs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("h5ad_path", nargs="?", help="an .h5ad file or a folder of them (default: --input-dir)")
    p.add_argument("--input-dir", default="./data/input", help="folder searched for .h5ad and .h5 files when no path is given")
    p.add_argument("--batch-mode", action="store_true", help="process every .h5ad or .h5 file found (implied by a folder)")


def _convert_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--chunk-size", type=int, help="rows per parquet chunk [10000]")
    p.add_argument("--top-genes", type=int, help="genes per cell sentence [2000]")
    p.add_argument("--compression", choices=["zstd", "snappy", "gzip", "brotli", "lz4", "none"], help="parquet codec [zstd]")
    p.add_argument("--compression-level", type=int, help="codec level [1; the seed used 3: ~10%% smaller, twice the CPU]")
    p.add_argument("-m", "--mappers", help="gene table from step1-hgnc-mapper, or an HGNC complete set (TSV)")
    p.add_argument("--threads", type=int, help="threads ranking blocks [2]")


def _split_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-size", type=float, help="share of cells in test [0.05]")
    p.add_argument("--seed", "--random-state", dest="seed", type=int, help="split seed [42]")
    p.add_argument("--skip-train-test-split", action="store_true", default=None, help="write output/<name>/chunks unsplit")
    p.add_argument("--donor-column", help="obs column of donors [first of donor_id, donor, subject_id, individual]")
    p.add_argument("--no-age-filter", action="store_true", help="keep cells without an age (the seed drops them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellfeed preprocess", description="h5ad -> training-ready parquet (cell sentences, age, train/test)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run-all", help="every step on one file or a folder of files")
    _inputs(p)
    _dirs(p)
    _convert_opts(p)
    _split_opts(p)
    p.add_argument("--keep-interim", action="store_true", default=None, help="also keep interim/parquet_chunks/<name>/chunks")
    p.add_argument("--skip-existing", action="store_true", default=None, help="skip files whose output is already made from them")
    p.add_argument("--development-stage-column", help="obs column with stage labels [development_stage]")
    p.add_argument("--create-hgnc", action="store_true", help="run step1 first (with --hgnc-file if given)")
    p.add_argument("--hgnc-file", help="an HGNC complete set (hgnc_complete_set.txt) for --create-hgnc")
    p.add_argument("-r", "--repo-id", help="upload each dataset to <repo-id>-<name> on the Hugging Face hub")
    p.add_argument("-t", "--token", help="Hugging Face token [HF_TOKEN]")
    p.set_defaults(func=cmd_run_all)

    p = sub.add_parser("step1-hgnc-mapper", help="write the Ensembl -> symbol table (offline)")
    p.add_argument("--hgnc-file", help="an HGNC complete set to use instead of the shipped GENCODE table")
    _dirs(p, output=False, logs=False)
    p.set_defaults(func=cmd_step1)

    p = sub.add_parser("step2-convert-h5ad", help="h5ad -> interim/parquet_chunks/<name>/chunks")
    _inputs(p)
    _dirs(p, output=False)
    _convert_opts(p)
    p.set_defaults(func=cmd_step2)

    p = sub.add_parser("step3-add-age", help="add the age column to interim chunks")
    p.add_argument("datasets", nargs="*", help="dataset names (default: every one in the interim folder)")
    p.add_argument("--batch-mode", action="store_true", help="every dataset in the interim folder (the default)")
    p.add_argument("--development-stage-column", help="column with stage labels [development_stage]")
    _dirs(p, output=False)
    p.set_defaults(func=cmd_step3)

    p = sub.add_parser("step4-train-test-split", help="interim chunks -> output/<name>/{train,test}/chunks")
    p.add_argument("datasets", nargs="*", help="dataset names (default: every one in the interim folder)")
    p.add_argument("-c", "--chunk-size", type=int, help="rows per parquet chunk [10000]")
    p.add_argument("--compression", choices=["zstd", "snappy", "gzip", "brotli", "lz4", "none"])
    _split_opts(p)
    _dirs(p)
    p.set_defaults(func=cmd_step4)

    for name in ("upload", "step5-upload"):
        p = sub.add_parser(name, help="upload finished datasets to the Hugging Face hub")
        p.add_argument("datasets", nargs="*", help="dataset names (default: every one in the output folder)")
        p.add_argument("-o", "--output-dir", default="./data/output")
        p.add_argument("-r", "--repo-id", required=True)
        p.add_argument("-t", "--token")
        p.add_argument("--readme", help="a README.md to commit with the data")
        p.set_defaults(func=cmd_upload)

    p = sub.add_parser("sort", help="rewrite perturbation h5ad files sorted by target, then batch")
    p.add_argument("inputs", nargs="+", help=".h5ad files")
    p.add_argument("--output", help="output path (one input only; default: <input folder>/sorted/<stem>.sorted.h5ad)")
    sort_fields = SortOptions.model_fields  # the sort job's options: one definition of names, defaults and help
    p.add_argument("--output-dir", help=sort_fields["output_dir"].description)
    p.add_argument("--target-label", default=sort_fields["target_label"].default, help=sort_fields["target_label"].description)
    p.add_argument("--batch-label", default=sort_fields["batch_label"].default, help=sort_fields["batch_label"].description)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sort)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    reuse_freed_memory()  # row groups are tens of MB: reuse their pages instead of faulting new ones
    try:
        return args.func(args)
    except CellfeedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
