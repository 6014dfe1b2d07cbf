"""The `cellfeed` command: `cellfeed serve ...` and `cellfeed preprocess ...`."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
import sys

from cellfeed.server.version import VERSION
from cellfeed.wire.malloc import reuse_freed_memory


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ISO 8601 UTC time, level, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    """`serve`'s flags, one per Settings field: its description, variable and default in --help."""
    p = sub.add_parser("serve", help="run the server (Flight data plane + HTTP control plane)")
    try:
        from cellfeed.server.settings import Settings, env_name, flag_name
    except ModuleNotFoundError:  # a client-only install: main() refuses `serve`, naming what to install
        return
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else f", {_shown(field.default)}"
        p.add_argument(f"--{flag_name(name)}", dest=name, metavar=name.upper(), help=f"{field.description} [{env_name(name)}{default}]")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR [INFO]")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one JSON object a line, for log collectors [text]")


def _shown(default: object) -> str:
    """A default as --help says it: whole GiB as such (1 GiB), anything else as is."""
    if isinstance(default, int) and default >= 1 << 30 and default % (1 << 30) == 0:
        return f"{default >> 30} GiB"
    return str(default)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "preprocess":
        from cellfeed.server.preprocess.cli import main as preprocess_main

        return preprocess_main(argv[1:])
    if argv and argv[0] == "build-cell-index":
        from cellfeed.server.kinds.dynaclr.build_cli import main as build_cell_index_main

        return build_cell_index_main(argv[1:])
    parser = argparse.ArgumentParser(prog="cellfeed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cellfeed {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    sub.add_parser("preprocess", help="h5ad -> training-ready parquet; `cellfeed preprocess --help`")
    sub.add_parser("build-cell-index", help="DynaCLR collection YAML -> cell index parquet; `cellfeed build-cell-index --help`")
    args, unknown = parser.parse_known_args(argv)  # unknown: serve's flags where the server is not installed
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if getattr(args, "log_format", "text") == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(), handlers=[handler])
    reuse_freed_memory()  # before pyarrow.flight starts threads: their malloc arenas must be the one heap
    try:
        from cellfeed.server.errors import StartupError
        from cellfeed.server.serving.server import serve
        from cellfeed.server.settings import Settings
    except ModuleNotFoundError as exc:
        print(f"cellfeed serve: {exc.name!r} is not installed; the server needs `pip install 'cellfeed[server]'`", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    try:
        serve(Settings.from_env(**overrides))
    except StartupError as exc:
        print(f"cellfeed serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
