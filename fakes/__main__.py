"""``python -m fakes NAME [NAME ...] [--host H] [--port P] [--fault JSON ...]``

Serves one or more fakes until SIGINT/SIGTERM.  With one fake, prints its URL on a line
of its own; with several, prints ``NAME URL`` lines.  ``--port`` applies to the first
fake (the others get free ports).  ``--fault`` takes a JSON fault object (see
docs/fakes.md) and applies it to every fake started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from .faults import FaultError, parse_fault_specs
from .server import FAKE_NAMES, FakeServer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fakes", description="Serve fake provider APIs.")
    p.add_argument("names", nargs="+", choices=FAKE_NAMES, metavar="NAME", help=" | ".join(FAKE_NAMES))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="port of the first fake (0: a free port)")
    p.add_argument("--fault", action="append", default=[], metavar="JSON", help="a fault to inject")
    return p


async def serve(names: Sequence[str], host: str, port: int, fault_specs: Sequence[str]) -> int:
    payloads: list[object] = []
    for spec in fault_specs:
        try:
            payload = json.loads(spec)
            parse_fault_specs(payload)
        except (ValueError, FaultError) as exc:
            print(f"bad --fault {spec!r}: {exc}", file=sys.stderr)
            return 2
        payloads.append(payload)
    servers: list[FakeServer] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for i, name in enumerate(names):
            server = await FakeServer(name, host=host, port=port if i == 0 else 0).start()
            servers.append(server)
            for payload in payloads:  # fresh Fault objects per server: rules keep counters
                for fault in parse_fault_specs(payload)[0]:
                    server.faults.add(fault)
            print(server.url if len(names) == 1 else f"{name} {server.url}", flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(serve(args.names, args.host, args.port, args.fault))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
