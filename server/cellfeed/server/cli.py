"""The `cellfeed` command: `cellfeed serve ...` and `cellfeed preprocess ...`."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
import sys

from cellfeed.server.settings import Settings
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
    p = sub.add_parser("serve", help="run the server (Flight data plane + HTTP control plane)")
    p.add_argument("--data-root", help="directory every client path is resolved in [CELLFEED_DATA_ROOT]")
    p.add_argument("--host", help="address to bind [CELLFEED_HOST, 127.0.0.1]")
    p.add_argument("--flight-port", type=int, help="Arrow Flight port [CELLFEED_FLIGHT_PORT, 8815]")
    p.add_argument("--http-port", type=int, help="HTTP port [CELLFEED_HTTP_PORT, 8000]")
    p.add_argument("--token", help="bearer token both planes require [CELLFEED_TOKEN]")
    p.add_argument("--state-dir", help="job records and logs [CELLFEED_STATE_DIR, <data-root>/.cellfeed]")
    p.add_argument("--dask-scheduler", help="run jobs on this Dask scheduler [CELLFEED_DASK_SCHEDULER]")
    p.add_argument("--tls-cert", help="PEM certificate: serve Flight over TLS and HTTP over HTTPS [CELLFEED_TLS_CERT]")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert [CELLFEED_TLS_KEY]")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: Flight requires client certificates signed by it (mutual TLS) [CELLFEED_TLS_CLIENT_CA]")
    p.add_argument("--max-batch-size", type=int, help="most rows (cells, groups, patches) one batch may ask for [CELLFEED_MAX_BATCH_SIZE, 65536]")
    p.add_argument("--session-idle-seconds", type=int, help="close a session with no live stream after this long [CELLFEED_SESSION_IDLE_SECONDS, 600]")
    p.add_argument("--max-sessions", type=int, help="close the least recently used idle sessions beyond this many [CELLFEED_MAX_SESSIONS, 64]")
    p.add_argument("--max-session-bytes", type=int, help="... or beyond this many bytes held by sessions [CELLFEED_MAX_SESSION_BYTES, 4 GiB]")
    p.add_argument("--cache-bytes", type=int, help="bytes of decoded row blocks kept [CELLFEED_CACHE_BYTES, 1 GiB]")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR [INFO]")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: one JSON object a line, for log collectors [text]")


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
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if getattr(args, "log_format", "text") == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(args, "log_level", "INFO").upper(), handlers=[handler])
    reuse_freed_memory()  # before pyarrow.flight starts threads: their malloc arenas must be the one heap
    try:
        from cellfeed.server.errors import StartupError
        from cellfeed.server.serving.server import serve
    except ModuleNotFoundError as exc:
        print(f"cellfeed serve: {exc.name!r} is not installed; the server needs `pip install 'cellfeed[server]'`", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "log_level", "log_format")}
    try:
        serve(Settings.from_env(**overrides))
    except StartupError as exc:
        print(f"cellfeed serve: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
