"""`egressd outbox list|retry ID|drop ID [--admin HOST:PORT]`: the outbox of a running
egressd, through its admin listener (`/outbox.json`, `POST /outbox/ID/retry|drop`).

Exit status: 0 done; 1 the admin listener refused (no such entry, an entry in the wrong
state) or could not be reached (one line on stderr says which).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT = 10.0


def add_parser(sub: Any, admin_default: str) -> None:
    outbox = sub.add_parser("outbox", help="list, retry or drop kept sends of a running egressd")
    outbox.add_argument("--admin", default=admin_default, help="the admin listener HOST:PORT")
    actions = outbox.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="kept sends, oldest first")
    listing.add_argument("--state", help="only this state (queued, doubt, ambiguous, dead, delivered, ...)")
    listing.add_argument("--upstream", help="only this upstream")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true", help="print /outbox.json as it is")
    for name, text in (("retry", "send an ambiguous or dead entry again"), ("drop", "delete an entry")):
        action = actions.add_parser(name, help=text)
        action.add_argument("id")


def _base(admin: str) -> str:
    host, _, port = admin.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):  # a wildcard bind is reached on loopback
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def _request(url: str, *, post: bool = False) -> tuple[int, Any]:
    headers = {"X-Egressd-Admin": "outbox"} if post else {}
    req = urllib.request.Request(url, data=b"" if post else None, headers=headers, method="POST" if post else "GET")
    try:
        # No proxy from the environment: the admin listener is reached directly.
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": exc.reason}


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def run(args: argparse.Namespace) -> int:
    base = _base(args.admin)
    try:
        if args.action == "list":
            query = {"limit": str(args.limit)}
            if args.state:
                query["state"] = args.state
            if args.upstream:
                query["upstream"] = args.upstream
            status, data = _request(f"{base}/outbox.json?{urllib.parse.urlencode(query)}")
            if status != 200:
                print(f"egressd outbox: {data.get('error', status)}", file=sys.stderr)
                return 1
            if args.json:
                print(json.dumps(data, indent=2))
                return 0
            for name, up in (data.get("upstreams") or {}).items():
                print(
                    f"{name}: {up['pending']} pending (oldest {_age(up['oldest_seconds'])}), "
                    f"{up['in_doubt']} in doubt, {up['ambiguous']} ambiguous, {up['dead']} dead"
                )
            entries = data.get("entries") or []
            if entries:
                print(f"{'ID':<28} {'UPSTREAM':<12} {'STATE':<10} {'AGE':>6} {'TRIES':>5}  LAST ERROR")
            now = time.time()
            for e in entries:
                print(
                    f"{e['id']:<28} {e['upstream']:<12} {e['state']:<10} {_age(now - e['created']):>6} "
                    f"{e['attempts']:>5}  {e['last_error']}"
                )
            return 0
        status, data = _request(f"{base}/outbox/{urllib.parse.quote(args.id, safe='')}/{args.action}", post=True)
    except (OSError, ValueError) as exc:
        print(f"egressd outbox: cannot reach the admin listener at {base}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"egressd outbox {args.action} {args.id}: {data.get('error', status)}", file=sys.stderr)
        return 1
    if args.action == "drop":
        print(f"{args.id}: dropped (it was {data.get('state')})")
    else:
        print(f"{args.id}: queued again")
    return 0
