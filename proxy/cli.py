"""`egressd run | check | demo | schema` (also `python -m proxy`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy.observe.logs import configure_logging

LEVELS = ("debug", "info", "warning", "error")
DATA_DIR_NONE_WARNING = (
    "--data-dir none: idempotency records and the failover ledger are kept in memory only and are lost on restart"
)
# The head limits' flags: (flag, env var, default, upper bound, help). Values are whole numbers
# from 1 to the bound; the defaults are proxy/listener.py's and proxy/_http1.py's.
HEAD_LIMITS = (
    (
        "--max-request-header-size",
        "EGRESSD_MAX_REQUEST_HEADER_SIZE",
        8190,
        1024 * 1024,
        "bytes the request line and each request header (name and value) may take; past it: 400",
    ),
    ("--max-request-headers", "EGRESSD_MAX_REQUEST_HEADERS", 128, 10_000, "header fields a request may carry"),
    (
        "--max-response-header-size",
        "EGRESSD_MAX_RESPONSE_HEADER_SIZE",
        8190,
        1024 * 1024,
        "bytes each header of an upstream's answer may take; past it: 502 header_too_large",
    ),
    (
        "--max-response-head-size",
        "EGRESSD_MAX_RESPONSE_HEAD_SIZE",
        65536,
        16 * 1024 * 1024,
        "bytes the whole head of an upstream's answer may take; past it: 502 header_too_large",
    ),
)
DEMO_MISSING = "egressd: the demo is not part of this installation (`pip install .` from a source checkout includes it)"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egressd", description="A sidecar reverse proxy for outbound API calls.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the proxy until SIGTERM/SIGINT")
    run.add_argument("--policies", default=_env("EGRESSD_POLICIES", "./policies"), help="policy directory")
    run.add_argument("--listen", default=_env("EGRESSD_LISTEN", "127.0.0.1:8080"), help="main listener HOST:PORT")
    run.add_argument("--admin", default=_env("EGRESSD_ADMIN", "127.0.0.1:9901"), help="admin listener HOST:PORT")
    run.add_argument("--redis", default=os.environ.get("EGRESSD_REDIS_URL"), help="Redis URL for shared state")
    run.add_argument("--redis-prefix", default=_env("EGRESSD_REDIS_PREFIX", "egressd:"), help="Redis key prefix")
    run.add_argument(
        "--data-dir",
        default=_env("EGRESSD_DATA_DIR", "./egressd-data"),
        help="the durable store (idempotency records, failover ledger; created if missing); "
        "'none' keeps them in memory only",
    )
    run.add_argument(
        "--log-format", default=_env("EGRESSD_LOG_FORMAT", "json"), choices=("json", "text"), help="log line format"
    )
    run.add_argument("--log-level", default=_env("EGRESSD_LOG_LEVEL", "info").lower(), choices=LEVELS)
    run.add_argument("--drain", default=_env("EGRESSD_DRAIN", "20"), help="seconds in-flight calls get at SIGTERM")
    run.add_argument(
        "--header-timeout",
        default=_env("EGRESSD_HEADER_TIMEOUT", "10"),
        help="seconds a client may take to send a request head (slowloris guard; 0 turns it off)",
    )
    run.add_argument(
        "--keepalive-timeout",
        default=_env("EGRESSD_KEEPALIVE_TIMEOUT", "75"),
        help="seconds an app connection may stay idle between requests before egressd closes it",
    )
    run.add_argument(
        "--webhook-listen",
        default=os.environ.get("EGRESSD_WEBHOOK_LISTEN") or None,
        metavar="HOST:PORT",
        help="the inbound webhook listener (POST /<upstream> from the providers); off when not given",
    )
    run.add_argument(
        "--ready-when-warm",
        action="store_true",
        default=_env("EGRESSD_READY_WHEN_WARM", "").strip().lower() in ("1", "true", "yes", "on"),
        help="keep /readyz at 503 after start until every upstream's pool.min_warm connections are up "
        "(at most --warm-wait seconds)",
    )
    run.add_argument(
        "--warm-wait",
        default=_env("EGRESSD_WARM_WAIT", "10"),
        metavar="SECONDS",
        help="with --ready-when-warm: turn ready anyway after this long, logging the upstreams still cold",
    )
    for flag, env, default, _, text in HEAD_LIMITS:
        run.add_argument(flag, default=_env(env, str(default)), metavar="N", help=f"{text} (default {default})")

    check = sub.add_parser("check", help="validate a policy directory (exit 0 valid, 1 not)")
    check.add_argument("directory", nargs="?", default=_env("EGRESSD_POLICIES", "./policies"))

    demo = sub.add_parser("demo", help="a self-contained demonstration with local fake providers")
    demo.add_argument("--quiet", action="store_true", help="print only the report")
    demo.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="shrink or grow the Black-Friday simulation's counts and durations (0.01..20; 1: about 40 s)",
    )
    demo.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report with charts")

    sub.add_parser("schema", help="print the JSON Schema of one policy document")
    from proxy.outbox import cli as outbox_cli

    outbox_cli.add_parser(sub, _env("EGRESSD_ADMIN", "127.0.0.1:9901"))
    return parser


def _check(directory: str) -> int:
    from proxy.config.loader import load_policy_dir

    result = load_policy_dir(directory, secrets="lenient")
    for problem in result.problems:
        print(problem, file=sys.stderr)  # a warning says so itself (FILE:LINE: warning: ...)
    if result.ok and result.policy_set is not None:
        names = ", ".join(p.upstream for p in result.policy_set.policies)
        print(f"ok: {len(result.policy_set.policies)} upstream(s): {names}")
        return 0
    return 1


def _head_limit(args: argparse.Namespace, flag: str, upper: int) -> int:
    """One head limit's value: a whole number from 1 to `upper` (ValueError otherwise)."""
    raw = str(getattr(args, flag.lstrip("-").replace("-", "_"))).strip()
    if not raw.isdigit() or not 1 <= int(raw) <= upper:
        raise ValueError(f"{flag} must be a whole number from 1 to {upper}, not {raw[:20]!r}")
    return int(raw)


def _run(args: argparse.Namespace) -> int:
    from proxy.server import Settings, parse_hostport, serve

    configure_logging(args.log_format, args.log_level)
    data_dir: Path | None = None
    if args.data_dir.strip().lower() == "none":
        logging.getLogger("egressd").warning(DATA_DIR_NONE_WARNING)
    else:
        data_dir = Path(args.data_dir)
    try:
        drain = float(args.drain)
        header_timeout = float(args.header_timeout)
        keepalive_timeout = float(args.keepalive_timeout)
        warm_wait = float(args.warm_wait)
        if drain < 0 or header_timeout < 0 or keepalive_timeout < 0 or warm_wait < 0:
            raise ValueError("--drain, --header-timeout, --keepalive-timeout and --warm-wait must not be negative")
        limits = [_head_limit(args, flag, upper) for flag, _, _, upper, _ in HEAD_LIMITS]
        settings = Settings(
            policies=Path(args.policies),
            listen=parse_hostport(args.listen),
            admin=parse_hostport(args.admin),
            redis_url=args.redis or None,
            redis_prefix=args.redis_prefix,
            data_dir=data_dir,
            drain=drain,
            header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout,
            max_request_header_size=limits[0],
            max_request_headers=limits[1],
            max_response_header_size=limits[2],
            max_response_head_size=limits[3],
            webhook_listen=parse_hostport(args.webhook_listen) if args.webhook_listen else None,
            ready_when_warm=bool(args.ready_when_warm),
            warm_wait=warm_wait,
        )
    except ValueError as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    return asyncio.run(serve(settings))


def install_uvloop() -> bool:
    """Use uvloop when it is installed (it is a dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _demo(args: argparse.Namespace) -> int:
    # The demo and the fakes are top-level packages beside `proxy` (demo/, fakes/): a
    # `pip install .` from a checkout installs them, the container image does not.
    try:
        from demo.run import run_demo
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("demo", "fakes"):
            raise
        print(DEMO_MISSING, file=sys.stderr)
        return 2
    if not 0.01 <= args.scale <= 20:
        print("egressd: --scale must be within 0.01..20", file=sys.stderr)
        return 2
    install_uvloop()
    return asyncio.run(run_demo(quiet=args.quiet, scale=args.scale, html=args.html))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args.directory)
        if args.command == "schema":
            from proxy.config.loader import policy_json_schema

            print(json.dumps(policy_json_schema(), indent=2))
            return 0
        if args.command == "demo":
            return _demo(args)
        if args.command == "outbox":
            from proxy.outbox import cli as outbox_cli

            return outbox_cli.run(args)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
