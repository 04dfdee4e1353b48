"""A child process that sends the fakes' webhooks (``python -m fakes.courier``).

The fakes normally POST their webhooks from their own event loop. A simulation that runs
the fakes, the client and the proxy under test on one event loop (``egressd demo``) pays
for every such POST there, and providers' webhooks come from other machines anyway. With
``fake.webhooks.courier = courier`` (a running :class:`Courier`), a fake hands each event
to this process instead: it waits, signs every try (fakes/signing.py), POSTs, retries and
redelivers exactly as the fake would (``fakes.webhooks.deliver``), and reports every try
back, so ``sender.attempts``, ``delivered()``, ``failed()`` and ``drain()`` work the same.

Protocol: one JSON object per line. To the child: ``{"n", "sender", "event", "type",
"payload" (base64), "url", "deliveries", "settings", "spec"}``. From it: ``{"n", "attempt":
{...}}`` per try, ``{"n", "done": true}`` when the event's deliveries have ended. Each
sender (fake) gets its own HTTP client in the child, so ``settings.concurrency`` bounds
each fake's POSTs in flight, as it does in process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .signing import SignSpec
from .webhooks import Poster, WebhookAttempt, WebhookSettings, deliver

__all__ = ["Courier"]

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # where this `fakes` package is importable from


class Courier:
    """The parent's handle on the courier process. ``await Courier().start()``; ``stop()``."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._next = 0
        self._waiting: dict[int, tuple[asyncio.Future[None], Callable[[WebhookAttempt], None]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Courier:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fakes.courier",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=1024 * 1024,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    def submit(
        self,
        sender: str,
        event_id: str,
        event_type: str,
        payload: bytes,
        url: str,
        deliveries: int,
        settings: WebhookSettings,
        spec: SignSpec,
        record: Callable[[WebhookAttempt], None],
    ) -> asyncio.Future[None]:
        """Hand one event over; the future is done when its deliveries have ended."""
        if self.proc is None or self.proc.stdin is None or self.proc.returncode is not None:
            raise RuntimeError("the courier is not running")
        self._next += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = (future, record)
        line = {
            "n": self._next,
            "sender": sender,
            "event": event_id,
            "type": event_type,
            "payload": base64.b64encode(payload).decode(),
            "url": url,
            "deliveries": deliveries,
            "settings": asdict(settings),
            "spec": dict(spec),
        }
        self.proc.stdin.write(json.dumps(line).encode() + b"\n")
        return future

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                message = json.loads(line)
                waiting = self._waiting.get(int(message["n"]))
                if waiting is None:
                    continue
                future, record = waiting
                if "attempt" in message:
                    record(WebhookAttempt(**message["attempt"]))
                elif message.get("done"):
                    del self._waiting[int(message["n"])]
                    if not future.done():
                        future.set_result(None)
        finally:
            # The child is gone: nothing more will be reported.
            for future, _ in self._waiting.values():
                if not future.done():
                    future.set_exception(RuntimeError("the courier process ended"))
            self._waiting.clear()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._reader
            self._reader = None

    async def __aenter__(self) -> Courier:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    posters: dict[str, Poster] = {}
    tasks: set[asyncio.Task[None]] = set()

    def write(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    async def one(message: dict[str, Any]) -> None:
        n = message["n"]
        try:
            await deliver(
                str(message["event"]),
                str(message["type"]),
                base64.b64decode(message["payload"]),
                str(message["url"]),
                int(message["deliveries"]),
                WebhookSettings.of(message["settings"]),
                message["spec"],
                posters.setdefault(str(message.get("sender", "")), Poster()),
                lambda attempt: write({"n": n, "attempt": asdict(attempt)}),
            )
        finally:
            write({"n": n, "done": True})

    try:
        while line := await reader.readline():
            task = loop.create_task(one(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:  # stdin closed: finish what was handed over
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for poster in posters.values():
            await poster.close()


def main() -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
