"""The outbox with real `egressd run` processes: kill -9 in the middle of a burst, SIGTERM
with sends still kept, and `egressd outbox` against a running process. Side effects are
counted at the fakes, which run in the test's event loop."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from fakes import FakeServer
from tests.egressd_process import Egressd
from tests.redis_server import REPO_ROOT

HEADERS = {"Authorization": "Bearer SG.app-key", "Content-Type": "application/json"}


def mail(n: int) -> bytes:
    return json.dumps(
        {
            "personalizations": [{"to": [{"email": f"c{n}@example.org"}]}],
            "from": {"email": "shop@example.com"},
            "subject": f"order {n}",
            "content": [{"type": "text/plain", "value": "thanks"}],
            "custom_args": {"n": str(n)},
        }
    ).encode()


def sendgrid_doc(url: str, rate: str) -> dict[str, Any]:
    return {
        "upstream": "sendgrid",
        "target": url,
        "provider": "sendgrid",
        "rate_limit": {"rate": rate, "burst": 1, "queue": {"max_wait": "2s"}},
        "retry": {"attempts": 1},
        "outbox": {"when": "always", "probe_after": "300ms", "concurrency": 8},
    }


async def accept_all(proc: Egressd, count: int) -> list[str]:
    ids: list[str] = []
    async with aiohttp.ClientSession() as http:

        async def one(n: int) -> str:
            async with http.post(f"{proc.url}/sendgrid/v3/mail/send", data=mail(n), headers=HEADERS) as r:
                assert r.status == 202, await r.text()
                return r.headers["X-Message-Id"]

        for start in range(0, count, 50):
            ids += await asyncio.gather(*(one(n) for n in range(start, min(start + 50, count))))
    return ids


async def wait_for(check: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def sent_numbers(fake: FakeServer) -> Counter[str]:
    return Counter(e.data["custom_args"]["n"] for e in fake.ledger.effects("mail.sent"))


async def test_kill9_mid_burst_then_restart_delivers_each_send_once(
    egressd_factory: Callable[..., Egressd],
) -> None:
    async with FakeServer("sendgrid") as sg:
        proc = egressd_factory([sendgrid_doc(sg.url, "40/s")])
        proc.start()
        count = 200
        await accept_all(proc, count)
        await wait_for(lambda: sg.ledger.count("mail.sent") >= 60, within=20)
        proc.signal(signal.SIGKILL)
        proc.wait()
        at_kill = sg.ledger.count("mail.sent")
        assert at_kill < count, "the kill came before the burst was delivered"
        proc.start()  # same data dir: the dead process's entries are taken back
        await wait_for(lambda: sg.ledger.count("mail.sent") >= count, within=40)
        await asyncio.sleep(1.0)  # anything sent twice would show up now
        numbers = sent_numbers(sg)
        assert len(numbers) == count and set(numbers.values()) == {1}, numbers.most_common(3)


async def test_sigterm_keeps_what_is_not_delivered_and_the_next_process_sends_it(
    egressd_factory: Callable[..., Egressd],
) -> None:
    async with FakeServer("sendgrid") as sg:
        proc = egressd_factory([sendgrid_doc(sg.url, "10/s")], drain=1.0)
        proc.start()
        await accept_all(proc, 40)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        assert time.monotonic() - started < 1.0 + 2.5  # within the drain + 2 s
        assert sg.ledger.count("mail.sent") < 40
        proc.start()
        await wait_for(lambda: sg.ledger.count("mail.sent") >= 40, within=30)
        await asyncio.sleep(0.5)
        numbers = sent_numbers(sg)
        assert len(numbers) == 40 and set(numbers.values()) == {1}


async def test_egressd_outbox_list_retry_and_drop(egressd_factory: Callable[..., Egressd], run_app: Any) -> None:
    hits: list[bytes] = []

    async def jobs(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response(status=500 if len(hits) <= 2 else 200, text="{}")

    app = web.Application()
    app.router.add_post("/jobs", jobs)
    upstream = await run_app(app)
    doc = {"upstream": "jobs", "target": upstream.url, "retry": {"attempts": 1}, "outbox": {"when": "always"}}
    proc = egressd_factory([doc])
    proc.start()
    ids = []
    async with aiohttp.ClientSession() as http:
        for n in range(2):
            async with http.post(f"{proc.url}/jobs/jobs", json={"n": n}) as r:
                assert r.status == 202
                ids.append((await r.json())["outbox_id"])
    await wait_for(lambda: len(hits) == 2, within=10)

    def egressd(*args: str, admin: str = f"127.0.0.1:{proc.admin}") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "outbox", "--admin", admin, *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO_ROOT,
        )

    for _ in range(50):
        listed = await asyncio.to_thread(egressd, "list", "--state", "ambiguous")
        if all(i in listed.stdout for i in ids):
            break
        await asyncio.sleep(0.1)
    assert listed.returncode == 0, listed.stderr
    assert "jobs: 0 pending" in listed.stdout and "2 ambiguous" in listed.stdout
    assert all(i in listed.stdout for i in ids)

    retried = await asyncio.to_thread(egressd, "retry", ids[0])
    assert (retried.returncode, retried.stdout.strip()) == (0, f"{ids[0]}: queued again")
    await wait_for(lambda: len(hits) == 3, within=10)
    dropped = await asyncio.to_thread(egressd, "drop", ids[1])
    assert (dropped.returncode, dropped.stdout.strip()) == (0, f"{ids[1]}: dropped (it was ambiguous)")
    again = await asyncio.to_thread(egressd, "drop", ids[1])
    assert again.returncode == 1 and "no such outbox entry" in again.stderr
    delivered = await asyncio.to_thread(egressd, "list", "--json")
    entries = {e["id"]: e for e in json.loads(delivered.stdout)["entries"]}
    assert entries[ids[0]]["state"] == "delivered" and ids[1] not in entries
    gone = await asyncio.to_thread(egressd, "list", admin="127.0.0.1:1")
    assert gone.returncode == 1 and "cannot reach the admin listener" in gone.stderr
    await asyncio.sleep(0.3)
    assert len(hits) == 3  # the dropped one was never sent again
