"""Provider latency: the official SDKs, direct and through egressd, at real distances.

    python bench/provider_latency.py                          # about 5 minutes
    python bench/provider_latency.py --quick                  # about 1.5 minutes
    python bench/provider_latency.py --pool '{min_warm: 2}' --ready-when-warm
    python bench/provider_latency.py --json out.json

The official Stripe, SendGrid, Mailgun and PayPal SDKs (stripe, sendgrid, mailgun,
paypal-server-sdk) call the fakes (`fakes/`, served over TLS with a throw-away CA made by
`trustme`) through a loopback relay that adds a round trip, either directly (SDK -> relay ->
TLS fake) or through egressd (SDK -> egressd on plain loopback HTTP -> relay -> TLS fake;
egressd's policy trusts the CA with `tls: {ca_file: ...}`). Every party is its own process:
the fakes, the relay, egressd, and this driver, which runs the SDKs one call at a time and
times each call around the SDK method (`time.perf_counter`).

In one run, for every SDK at each round trip (`--rtts`, default 0, 20 and 80 ms):

- steady: `--calls` calls back to back on one long-lived SDK client per path, direct and
  through egressd interleaved call by call (the first two of each are not counted);
- sparse: one call per client every few seconds, each after its connections were idle longer
  than the provider's keep-alive. The provider's keep-alive is simulated by the relay, which
  closes a connection (FIN both ways) after `--idle-close` seconds without a byte in either
  direction, like a provider's load balancer; the fakes' own idle timeout stays aiohttp's
  (75 s). Every call of a sparse client therefore finds its connection closed;
- first call after start-up: egressd is restarted `--first-calls` times; after each start
  (and `/readyz` 200), a new SDK client per path makes one call, direct and through egressd.

The steady cells and the sparse ones have separate upstreams in separate policy sets, served
by egressd one after the other (a warm pool against the relay's short idle close churns,
and that background work must not load the machine while the steady figures are taken).
`--pool` is the pool block of every policy, `--pool-sparse` that of the sparse ones.

Prints one markdown table: p50 / p99 per SDK and round trip, the ratio through egressd /
direct, and a check of issue 16's targets at 20 ms. `--json FILE` writes the raw samples.

The relay (`--relay`, its own asyncio process) models propagation delay only: every byte is
delivered rtt/2 after it arrived, in each direction, in order. The TCP handshake costs one
round trip: a new connection's first client bytes are held until the handshake would have
completed (accept + rtt), then take rtt/2 (the kernel accepts at once on loopback, so the
client's connect() returns early, but its first flight arrives when it would have). TLS
costs its real round trips on top (TLS 1.3: one; Python's clients and servers negotiate
1.3 and use no 0-RTT), so a new connection costs about 3 round trips before its answer and a
reused one 1. It does not model bandwidth, loss, retransmission, congestion windows (slow
start), Nagle or delayed-ACK effects, or jitter beyond the scheduler's own; transfers are
small JSON bodies, so latency is dominated by round trips.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SDKS = ("stripe", "sendgrid", "mailgun", "paypal")
PATHS = ("direct", "egressd")
MODES = ("steady", "sparse")
MAILGUN_DOMAIN = "mg.example.com"
PAYPAL_TOKEN = "APPTOKEN"  # accepted by the fake without a token call (`extra_tokens`)
PROVIDERS = {
    "stripe": "stripe",
    "sendgrid": "sendgrid",
    "mailgun": f"{{name: mailgun, domain: {MAILGUN_DOMAIN}}}",
    "paypal": "paypal",
}


# --------------------------------------------------------------------------- the relay (own process)


_EOF = b""  # markers in a direction's queue, after the bytes before them
_CLOSE = "close"
_ABORT = "abort"
Item = bytes | str


class _Side(asyncio.Protocol):
    """One end of a relayed connection (the app's, or the upstream's)."""

    def __init__(self, conn: _RelayConn, which: int) -> None:
        self.conn = conn
        self.which = which  # 0: the client side, 1: the upstream side
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.side_up(self.which, self)

    def data_received(self, data: bytes) -> None:
        self.conn.forward(self.which, data)

    def eof_received(self) -> bool:
        self.conn.forward(self.which, _EOF)
        return True  # half-close: the other direction may still carry bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.conn.side_lost(self.which, exc)


class _RelayConn:
    """A client connection relayed to the upstream, each direction delayed by rtt/2."""

    def __init__(self, relay: _Listener, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self.loop = loop
        self.accepted = loop.time()
        self.last = self.accepted
        self.sides: list[_Side | None] = [None, None]
        # Per direction (0: client -> upstream, 1: upstream -> client): (due, item) in order.
        self.queues: list[collections.deque[tuple[float, Item]]] = [collections.deque(), collections.deque()]
        self.timers: list[asyncio.TimerHandle | None] = [None, None]
        self.closed = False

    def side_up(self, which: int, side: _Side) -> None:
        self.sides[which] = side
        if self.closed:
            if side.transport is not None:
                side.transport.close()
            return
        if which == 0:
            self.relay.accepted += 1
            self.relay.live.add(self)
            self.loop.create_task(self._connect_upstream())
        elif self.timers[0] is None:
            self._arm(0)  # bytes held while the upstream side was connecting

    async def _connect_upstream(self) -> None:
        try:
            await self.loop.create_connection(lambda: _Side(self, 1), "127.0.0.1", self.relay.target)
        except OSError:
            self.close(abort=True)

    def forward(self, which: int, item: Item) -> None:
        now = self.loop.time()
        self.last = now
        half = self.relay.rtt / 2
        due = now + half
        if which == 0:
            # The client's first flight leaves when its TCP handshake would have completed.
            due = max(now, self.accepted + self.relay.rtt) + half
        queue = self.queues[which]
        if queue and queue[-1][0] > due:
            due = queue[-1][0]
        queue.append((due, item))
        if self.timers[which] is None and self.sides[1 - which] is not None:
            self._arm(which)

    def _arm(self, which: int) -> None:
        queue = self.queues[which]
        self.timers[which] = self.loop.call_at(queue[0][0], self._pump, which) if queue else None

    def _pump(self, which: int) -> None:
        self.timers[which] = None
        out = self.sides[1 - which]
        queue = self.queues[which]
        if out is None or out.transport is None:
            queue.clear()
            return
        tr = out.transport
        now = self.loop.time()
        while queue and queue[0][0] <= now + 0.0002:
            _, item = queue.popleft()
            if item == _ABORT:
                tr.abort()
                queue.clear()
                return
            if item == _CLOSE:
                tr.close()
                queue.clear()
                return
            if item == _EOF:
                if tr.can_write_eof() and not tr.is_closing():
                    tr.write_eof()
                continue
            assert isinstance(item, bytes)
            tr.write(item)
            self.last = now
        self._arm(which)

    def side_lost(self, which: int, exc: Exception | None) -> None:
        if self.closed:
            return
        # The other side ends after the bytes still on their way to it, as it would on a wire.
        self.forward(which, _ABORT if exc is not None else _CLOSE)
        other = self.sides[1 - which]
        if other is None or other.transport is None:
            self.close()

    def idle_for(self, now: float) -> float:
        if self.queues[0] or self.queues[1]:
            return 0.0
        return now - self.last

    def close(self, *, abort: bool = False) -> None:
        self.closed = True
        self.relay.live.discard(self)
        for timer in self.timers:
            if timer is not None:
                timer.cancel()
        for side in self.sides:
            if side is not None and side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()


@dataclass
class _Listener:
    target: int  # the upstream's port on 127.0.0.1
    rtt: float
    idle_close: float  # 0: never
    accepted: int = 0
    live: set[_RelayConn] = field(default_factory=set)


async def _relay_main(spec: list[dict[str, Any]]) -> None:
    loop = asyncio.get_running_loop()
    listeners: list[_Listener] = []
    ports: list[int] = []
    for item in spec:
        lst = _Listener(int(item["target"]), float(item["rtt"]), float(item.get("idle_close", 0)))

        def factory(lst: _Listener = lst) -> _Side:
            return _Side(_RelayConn(lst, loop), 0)

        server = await loop.create_server(factory, "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
        listeners.append(lst)

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One line in, one JSON line out: the connections each listener accepted so far.
        await reader.readline()
        writer.write((json.dumps([x.accepted for x in listeners]) + "\n").encode())
        await writer.drain()
        writer.close()

    ctl = await asyncio.start_server(control, "127.0.0.1", 0)
    print(json.dumps({"ports": ports, "control": ctl.sockets[0].getsockname()[1]}), flush=True)
    while True:
        await asyncio.sleep(0.05)
        now = loop.time()
        for lst in listeners:
            if lst.idle_close > 0:
                for conn in [c for c in lst.live if c.idle_for(now) >= lst.idle_close]:
                    conn.close()


def relay_child(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    _use_uvloop()
    asyncio.run(_relay_main(spec))
    return 0


# --------------------------------------------------------------------------- the fakes (own process)


async def _fakes_main(cert_dir: Path) -> None:
    import ssl

    from fakes import FakeServer

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_dir / "server.pem")
    ports: dict[str, int] = {}
    servers = []
    for name in SDKS:
        extra: dict[str, Any] = {"extra_tokens": {PAYPAL_TOKEN}} if name == "paypal" else {}
        srv = await FakeServer(name, ssl_context=ctx, **extra).start()
        servers.append(srv)
        ports[name] = srv.port
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


def fakes_child(argv: list[str]) -> int:
    _use_uvloop()
    asyncio.run(_fakes_main(Path(argv[0])))
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


def spawn(name: str, cmd: list[str], tmp: Path) -> tuple[Proc, str]:
    """Start a child that prints one JSON line on stdout when it is ready."""
    log = tmp / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, start_new_session=True, env=_child_env()
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line:
        proc.wait(timeout=5)
        raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-2000:]}")
    return Proc(name, proc, log), line


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stop(p: Proc) -> None:
    if p.proc.poll() is None:
        p.proc.send_signal(signal.SIGTERM)
        try:
            p.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(timeout=5)


def start_minimal(target: str, tmp: Path, name: str) -> tuple[Proc, int]:
    """bench/minimal_proxy.py for one target; it trusts the CA through SSL_CERT_FILE."""
    log = tmp / f"minimal-{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "minimal_proxy.py"), "--target", target],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            start_new_session=True,
            env=_child_env(),
        )
    p = Proc(f"minimal-{name}", proc, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace")
        if "listening on" in text:
            return p, int(text.split("listening on", 1)[1].split()[0].rsplit(":", 1)[1])
        time.sleep(0.02)
    stop(p)
    raise RuntimeError(f"minimal proxy did not start: {log.read_text(errors='replace')[-2000:]}")


@dataclass
class Egressd:
    proc: Proc
    port: int
    admin: int
    started: float
    ready_after: float


def start_egressd(policies: Path, tmp: Path, *, ready_when_warm: bool, n: int) -> Egressd:
    log = tmp / f"egressd-{n}.log"
    cmd = [
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--policies",
        str(policies),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--data-dir",
        "none",
        "--log-format",
        "json",
        "--log-level",
        "info",
    ]
    if ready_when_warm:
        cmd.append("--ready-when-warm")
    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, start_new_session=True, env=_child_env()
        )
    p = Proc("egressd", proc, log)
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(ports) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(p)
            raise RuntimeError(f"egressd did not start: {log.read_text(errors='replace')[-2000:]}")
        for line in log.read_text(errors="replace").splitlines():
            for key in ("main", "admin"):
                marker = f"{key} listening on 127.0.0.1:"
                if marker in line:
                    ports[key] = int(line.split(marker, 1)[1].split('"', 1)[0].split()[0])
        time.sleep(0.02)
    # Ready: /readyz answers 200 (with --ready-when-warm, once the warm connections are up).
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(p)
            raise RuntimeError(f"egressd never got ready: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.01)
    return Egressd(p, ports["main"], ports["admin"], t0, time.perf_counter() - t0)


def egressd_status(admin: int) -> dict[str, Any]:
    """Per upstream: egressd's own latency (`overhead_p50_ms`/`p99`) and pool, from /status.json
    (empty for an egressd that does not report them)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status.json", timeout=5) as r:
            data = json.loads(r.read())
    except (OSError, ValueError):
        return {}
    out = {}
    for name, up in (data.get("upstreams") or {}).items():
        out[name] = {k: up.get(k) for k in ("overhead_p50_ms", "overhead_p99_ms", "p50_ms", "pool")}
    return out


def relay_counts(control: int) -> list[int]:
    with socket.create_connection(("127.0.0.1", control), timeout=5) as s:
        s.sendall(b"stats\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the SDKs


MAIL = {
    "personalizations": [{"to": [{"email": "ann@example.org"}]}],
    "from": {"email": "shop@example.com"},
    "subject": "Your order",
    "content": [{"type": "text/plain", "value": "Thanks"}],
}


def make_client(sdk: str, base: str) -> Callable[[], None]:
    """A new SDK client for `base`; the returned function makes one call and checks it."""
    if sdk == "stripe":
        import requests
        import stripe

        session = requests.Session()
        session.trust_env = False
        sc = stripe.StripeClient(
            "sk_test_bench",
            base_addresses={"api": base},
            max_network_retries=0,
            http_client=stripe.RequestsClient(session=session),
        )

        def call() -> None:
            pi = sc.v1.payment_intents.create(
                params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
            )
            assert pi.status == "succeeded", pi

        return call
    if sdk == "sendgrid":
        from sendgrid import SendGridAPIClient

        sg = SendGridAPIClient("SG.bench-key", host=base)

        def call() -> None:
            r = sg.client.mail.send.post(request_body=MAIL)
            assert r.status_code == 202, r.status_code

        return call
    if sdk == "mailgun":
        from mailgun.client import Client
        from mailgun.config import RetryPolicy

        mg = Client(auth=("api", "key-bench"), api_url=base, retry_policy=RetryPolicy(max_retries=0))

        def call() -> None:
            r = mg.messages.create(
                domain=MAILGUN_DOMAIN,
                data={"from": f"shop@{MAILGUN_DOMAIN}", "to": ["ann@example.org"], "subject": "Hi", "text": "x"},
            )
            assert r.status_code == 200, r.status_code

        return call
    if sdk == "paypal":
        pp = _paypal_client(base)
        order = _paypal_order()
        seq = iter(range(1 << 62))

        def call() -> None:
            r = pp.orders.create_order(
                {
                    "body": order,
                    "prefer": "return=representation",
                    "paypal_request_id": f"bench-{os.getpid()}-{time.time_ns()}-{next(seq)}",
                }
            )
            assert r.status_code == 201, r.status_code

        return call
    raise ValueError(sdk)


def _paypal_client(base: str) -> Any:
    from paypalserversdk.configuration import Environment, Server
    from paypalserversdk.http.auth.o_auth_2 import ClientCredentialsAuthCredentials
    from paypalserversdk.models.o_auth_token import OAuthToken
    from paypalserversdk.paypal_serversdk_client import PaypalServersdkClient

    tok = OAuthToken(access_token=PAYPAL_TOKEN, token_type="Bearer", expires_in=36000, expiry=int(time.time()) + 36000)
    creds = ClientCredentialsAuthCredentials(o_auth_client_id="id", o_auth_client_secret="s", o_auth_token=tok)
    pp = PaypalServersdkClient(client_credentials_auth_credentials=creds, environment=Environment.SANDBOX)
    pp.config.environments = {Environment.SANDBOX: {Server.DEFAULT: base}}
    return pp


def _paypal_order() -> Any:
    from paypalserversdk.models.amount_with_breakdown import AmountWithBreakdown
    from paypalserversdk.models.card_request import CardRequest
    from paypalserversdk.models.checkout_payment_intent import CheckoutPaymentIntent
    from paypalserversdk.models.order_request import OrderRequest
    from paypalserversdk.models.payment_source import PaymentSource
    from paypalserversdk.models.purchase_unit_request import PurchaseUnitRequest

    unit = PurchaseUnitRequest(reference_id="u0", amount=AmountWithBreakdown(currency_code="USD", value="20.00"))
    return OrderRequest(
        intent=CheckoutPaymentIntent.CAPTURE,
        purchase_units=[unit],
        payment_source=PaymentSource(card=CardRequest(vault_id="8TX02017P3456")),
    )


def timed(call: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Cell:
    sdk: str
    rtt_ms: int
    mode: str  # steady | sparse

    @property
    def upstream(self) -> str:
        return f"{self.sdk}-{self.rtt_ms}ms-{self.mode}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def write_policies(directory: Path, cells: list[Cell], ports: dict[tuple[Cell, str], int], ca: Path, pool: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    docs = []
    for cell in cells:
        text = (
            f"upstream: {cell.upstream}\n"
            f"target: https://127.0.0.1:{ports[cell, 'egressd']}\n"
            f"provider: {PROVIDERS[cell.sdk]}\n"
            f"tls: {{ca_file: {ca}}}\n"
        )
        if pool:
            text += f"pool: {pool}\n"
        docs.append(text)
    (directory / "bench.yaml").write_text("---\n".join(docs))


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("stripe", "sendgrid", "mailgun", "paypalserversdk", "requests", "urllib3", "aiohttp", "uvloop"):
        try:
            from importlib.metadata import version

            dist = {"paypalserversdk": "paypal-server-sdk"}.get(mod, mod)
            versions[mod] = version(dist)
        except Exception:
            versions[mod] = "?"
    import ssl

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "versions": versions,
        "loadavg_start": os.getloadavg(),
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        return relay_child(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--fakes":
        return fakes_child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rtts", default="0,20,80", help="round trips to model, in ms (comma-separated)")
    p.add_argument("--calls", type=int, default=30, help="steady calls per SDK, round trip and path (counted)")
    p.add_argument("--sparse-rounds", type=int, default=12, help="sparse calls per SDK, round trip and path")
    p.add_argument("--idle-close", type=float, default=1.0, help="the relay closes sparse connections idle this long")
    p.add_argument("--first-calls", type=int, default=5, help="egressd restarts for the first-call figures")
    p.add_argument("--pool", default="", help="the policies' pool block, a YAML flow mapping, e.g. '{min_warm: 2}'")
    p.add_argument(
        "--pool-sparse",
        help="the pool block of the sparse cells' policies (default: --pool), e.g. with an idle_timeout "
        "below the relay's --idle-close, as an operator would set it below a provider's keep-alive",
    )
    p.add_argument("--ready-when-warm", action="store_true", help="run egressd with --ready-when-warm")
    p.add_argument("--sdks", default=",".join(SDKS))
    p.add_argument(
        "--reference",
        type=int,
        metavar="RTT_MS",
        help="also run a minimal aiohttp pass-through proxy (bench/minimal_proxy.py) in egressd's place, "
        "steady calls at this round trip (one of --rtts): the floor of any sidecar hop",
    )
    p.add_argument("--quick", action="store_true", help="10 steady calls, 4 sparse rounds, 2 restarts")
    p.add_argument("--json", metavar="FILE", help="also write the samples as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep the logs and policies in DIR")
    a = p.parse_args()
    if a.quick:
        a.calls, a.sparse_rounds, a.first_calls = 10, 4, 2
    rtts = [int(x) for x in a.rtts.split(",") if x.strip()]
    sdks = [s for s in a.sdks.split(",") if s]
    info = machine()
    wall0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="egressd-provlat-"))
    procs: list[Proc] = []
    egressd: Egressd | None = None
    # The SDKs read the CA from the environment (urllib: SSL_CERT_FILE; requests:
    # REQUESTS_CA_BUNDLE; Stripe's own `ca_bundle_path`); no proxy from the environment.
    import trustme

    ca = trustme.CA()
    ca_path = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(ca_path)
    import stripe

    stripe.ca_bundle_path = str(ca_path)
    try:
        fakes_proc, line = spawn("fakes", [sys.executable, str(Path(__file__).resolve()), "--fakes", str(tmp)], tmp)
        procs.append(fakes_proc)
        fake_ports: dict[str, int] = json.loads(line)
        cells = [Cell(sdk, rtt, mode) for rtt in rtts for sdk in sdks for mode in MODES]
        keys = [(cell, path) for cell in cells for path in PATHS]
        # The reference: a ~30-line aiohttp pass-through proxy (bench/minimal_proxy.py) in
        # egressd's place, for the steady cells at one round trip: the floor of any sidecar hop.
        reference = [Cell(sdk, a.reference, "steady") for sdk in sdks] if a.reference is not None else []
        keys += [(cell, "minimal") for cell in reference]
        spec = [
            {
                "target": fake_ports[cell.sdk],
                "rtt": cell.rtt_ms / 1000,
                "idle_close": a.idle_close if cell.mode == "sparse" else 0,
            }
            for cell, _ in keys
        ]
        relay_proc, line = spawn(
            "relay", [sys.executable, str(Path(__file__).resolve()), "--relay", json.dumps(spec)], tmp
        )
        procs.append(relay_proc)
        relay = json.loads(line)
        ports = dict(zip(keys, relay["ports"], strict=True))
        index = {key: i for i, key in enumerate(keys)}
        # Two policy sets, never served at once: the steady cells (also the first-call
        # phase) and the sparse ones. A warm pool behind the relay's 1 s idle close is
        # replaced about every second; in the same process during the steady phase that
        # churn would load the machine the steady figures are taken on.
        policies = tmp / "policies"
        write_policies(policies, [c for c in cells if c.mode == "steady"], ports, ca_path, a.pool)
        sparse_policies = tmp / "policies-sparse"
        pool_sparse = a.pool if a.pool_sparse is None else a.pool_sparse
        write_policies(sparse_policies, [c for c in cells if c.mode == "sparse"], ports, ca_path, pool_sparse)
        minimal: dict[Cell, int] = {}
        for cell in reference:
            proc, port = start_minimal(f"https://127.0.0.1:{ports[cell, 'minimal']}", tmp, cell.sdk)
            procs.append(proc)
            minimal[cell] = port
        restarts = 0
        egressd = start_egressd(policies, tmp, ready_when_warm=a.ready_when_warm, n=restarts)

        def base(cell: Cell, path: str) -> str:
            if path == "direct":
                return f"https://127.0.0.1:{ports[cell, path]}"
            if path == "minimal":
                return f"http://127.0.0.1:{minimal[cell]}"
            assert egressd is not None
            return f"http://127.0.0.1:{egressd.port}/{cell.upstream}"

        samples: dict[str, list[float]] = collections.defaultdict(list)
        conns: dict[str, int] = {}

        def key(cell: Cell, path: str, phase: str) -> str:
            return f"{cell.sdk}|{cell.rtt_ms}|{phase}|{path}"

        # -- steady ----------------------------------------------------------------------
        for rtt in rtts:
            for sdk in sdks:
                cell = Cell(sdk, rtt, "steady")
                print(f"steady: {sdk} at {rtt} ms ...", file=sys.stderr, flush=True)
                paths = PATHS + (("minimal",) if cell in minimal else ())
                clients = {path: make_client(sdk, base(cell, path)) for path in paths}
                for path in paths:  # the first two calls of each client are not counted
                    timed(clients[path])
                    timed(clients[path])
                before = relay_counts(relay["control"])
                for i in range(a.calls):
                    order = paths if i % 2 == 0 else paths[::-1]
                    for path in order:
                        samples[key(cell, path, "steady")].append(timed(clients[path]))
                after = relay_counts(relay["control"])
                for path in paths:
                    j = index[cell, path]
                    conns[key(cell, path, "steady")] = after[j] - before[j]

        own = egressd_status(egressd.admin)  # egressd's own share of the steady calls (if it reports it)

        # -- sparse ----------------------------------------------------------------------
        stop(egressd.proc)
        restarts += 1
        egressd = start_egressd(sparse_policies, tmp, ready_when_warm=a.ready_when_warm, n=restarts)
        sparse_clients = {
            (cell, path): make_client(cell.sdk, base(cell, path))
            for cell in cells
            if cell.mode == "sparse"
            for path in PATHS
        }
        last_call: dict[tuple[Cell, str], float] = {}
        gap = a.idle_close + 0.5
        before = relay_counts(relay["control"])
        for rnd in range(a.sparse_rounds + 1):  # round 0: first use of each client, not counted
            print(f"sparse: round {rnd}/{a.sparse_rounds} ...", file=sys.stderr, flush=True)
            if rnd == 1:
                before = relay_counts(relay["control"])
            for (cell, path), call in sparse_clients.items():
                wait = last_call.get((cell, path), 0.0) + gap - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                took = timed(call)
                last_call[cell, path] = time.monotonic()
                if rnd > 0:
                    samples[key(cell, path, "sparse")].append(took)
        after = relay_counts(relay["control"])
        for cell, path in sparse_clients:
            j = index[cell, path]
            conns[key(cell, path, "sparse")] = after[j] - before[j]
        own_sparse = egressd_status(egressd.admin)

        # -- the first call after start-up -----------------------------------------------
        ready_after: list[float] = []
        for k in range(a.first_calls):
            print(f"first call: restart {k + 1}/{a.first_calls} ...", file=sys.stderr, flush=True)
            stop(egressd.proc)
            restarts += 1
            egressd = start_egressd(policies, tmp, ready_when_warm=a.ready_when_warm, n=restarts)
            ready_after.append(egressd.ready_after)
            for rtt in rtts:
                for sdk in sdks:
                    cell = Cell(sdk, rtt, "steady")
                    order = PATHS if k % 2 == 0 else PATHS[::-1]
                    for path in order:
                        client = make_client(sdk, base(cell, path))
                        samples[key(cell, path, "first")].append(timed(client))

        for pr in procs:
            if pr.proc.poll() is not None:
                raise RuntimeError(f"{pr.name} exited early: {pr.log.read_text(errors='replace')[-2000:]}")
        report = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "machine": info,
            "loadavg_end": os.getloadavg(),
            "settings": {
                "rtts_ms": rtts,
                "sdks": sdks,
                "calls": a.calls,
                "sparse_rounds": a.sparse_rounds,
                "idle_close": a.idle_close,
                "first_calls": a.first_calls,
                "pool": a.pool or None,
                "pool_sparse": pool_sparse or None,
                "reference_rtt_ms": a.reference,
                "ready_when_warm": a.ready_when_warm,
            },
            "egressd_ready_after_s": ready_after,
            "samples": samples,
            "new_connections": conns,
            "egressd_own_steady": own,
            "egressd_own_sparse": own_sparse,
            "elapsed_seconds": round(time.monotonic() - wall0, 1),
        }
        print(render(report))
        print(f"(run took {report['elapsed_seconds']} s)", file=sys.stderr)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
        return 0
    finally:
        if egressd is not None:
            stop(egressd.proc)
        for pr in reversed(procs):
            stop(pr)
        if a.keep:
            import shutil

            shutil.copytree(tmp, a.keep, dirs_exist_ok=True)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the report


def _ms(v: float) -> str:
    return "-" if v != v else f"{v * 1000:.1f}"


def _ratio(a: float, b: float) -> str:
    return "-" if not (a == a and b == b and b > 0) else f"{a / b:.2f}"


def render(report: dict[str, Any]) -> str:
    m, st = report["machine"], report["settings"]
    s: dict[str, list[float]] = report["samples"]
    conns: dict[str, int] = report["new_connections"]

    def get(sdk: str, rtt: int, phase: str, path: str) -> list[float]:
        return s.get(f"{sdk}|{rtt}|{phase}|{path}", [])

    lines = [
        "egressd provider latency benchmark (official SDKs, TLS fakes behind a round-trip relay)",
        f"date:     {report['date']}",
        f"command:  {report['command']}",
        f"machine:  {m['nproc']} CPU(s), {m['cpu_model']}, Linux {m['kernel']}, Python {m['python']}, {m['openssl']}",
        "sdks:     " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"settings: {st['calls']} steady calls, {st['sparse_rounds']} sparse calls (relay closes after "
        f"{st['idle_close']} s idle), {st['first_calls']} restarts per path and cell; pool: {st['pool'] or 'none'}, "
        f"sparse cells: {st.get('pool_sparse') or 'none'}; "
        f"--ready-when-warm: {'yes' if st['ready_when_warm'] else 'no'}",
        f"loadavg:  start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
        f"end {' '.join(f'{x:.2f}' for x in report['loadavg_end'])}; egressd ready after "
        + ", ".join(f"{x:.2f}" for x in report["egressd_ready_after_s"])
        + " s",
        "",
        "| SDK | RTT | steady direct p50 / p99 | steady egressd p50 / p99 | ratio p50 | new conns/call d / e "
        "| sparse direct p50 / p99 | sparse egressd p50 / p99 | ratio p50 "
        "| first call direct | first call egressd | egressd first / warm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    checks: list[tuple[str, float, str, bool]] = []
    for rtt in st["rtts_ms"]:
        for sdk in st["sdks"]:
            sd, se = get(sdk, rtt, "steady", "direct"), get(sdk, rtt, "steady", "egressd")
            pd, pe = get(sdk, rtt, "sparse", "direct"), get(sdk, rtt, "sparse", "egressd")
            fd, fe = get(sdk, rtt, "first", "direct"), get(sdk, rtt, "first", "egressd")
            cd = conns.get(f"{sdk}|{rtt}|steady|direct", 0) / max(len(sd), 1)
            ce = conns.get(f"{sdk}|{rtt}|steady|egressd", 0) / max(len(se), 1)
            fdm = statistics.median(fd) if fd else float("nan")
            fem = statistics.median(fe) if fe else float("nan")
            lines.append(
                f"| {sdk} | {rtt} ms | {_ms(pct(sd, 0.5))} / {_ms(pct(sd, 0.99))} | {_ms(pct(se, 0.5))} / "
                f"{_ms(pct(se, 0.99))} | {_ratio(pct(se, 0.5), pct(sd, 0.5))} | {cd:.2f} / {ce:.2f} | "
                f"{_ms(pct(pd, 0.5))} / {_ms(pct(pd, 0.99))} | {_ms(pct(pe, 0.5))} / {_ms(pct(pe, 0.99))} | "
                f"{_ratio(pct(pe, 0.5), pct(pd, 0.5))} | {_ms(fdm)} | {_ms(fem)} | {_ratio(fem, pct(se, 0.5))} |"
            )
            if rtt == 20:
                d50, e50 = pct(sd, 0.5), pct(se, 0.5)
                if sdk == "sendgrid":
                    checks.append((f"{sdk} steady p50 egressd / direct", e50 / d50, "<= 0.50", e50 <= 0.5 * d50))
                elif sdk in ("stripe", "mailgun"):
                    extra = (e50 - d50) * 1000
                    checks.append((f"{sdk} steady p50 egressd - direct (ms)", extra, "<= 0.50", extra <= 0.5))
                else:
                    checks.append((f"{sdk} steady p50 egressd / direct (info)", e50 / d50, "", True))
                ps = pct(pe, 0.5) / pct(pd, 0.5)
                checks.append((f"{sdk} sparse p50 egressd / direct", ps, "<= 0.50", ps <= 0.5))
                fw = fem / e50
                checks.append((f"{sdk} first call / warm call (egressd)", fw, "<= 1.20", fw <= 1.2))
    lines.append("")
    lines.append(
        "Times in ms, per call as the app sees it (the SDK method). With fewer than 100 samples p99 is "
        f"the largest ({st['calls']} steady, {st['sparse_rounds']} sparse calls per cell and path); "
        f"first call: median of {st['first_calls']} restarts. "
        "new conns/call: connections the relay accepted per steady call, direct / through egressd."
    )
    ref = st.get("reference_rtt_ms")
    if ref is not None:
        own = report.get("egressd_own_steady") or {}
        lines.append("")
        lines.append(
            f"Reference at {ref} ms, steady p50 (ms): a minimal aiohttp pass-through proxy "
            "(bench/minimal_proxy.py) in egressd's place, and egressd's own share from its /status.json."
        )
        lines.append("")
        lines.append("| SDK | direct | minimal proxy | egressd | egressd - minimal | egressd's own p50 / p99 |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for sdk in st["sdks"]:
            d50 = pct(get(sdk, ref, "steady", "direct"), 0.5)
            m50 = pct(get(sdk, ref, "steady", "minimal"), 0.5)
            e50 = pct(get(sdk, ref, "steady", "egressd"), 0.5)
            mine = own.get(f"{sdk}-{ref}ms-steady") or {}
            o50, o99 = mine.get("overhead_p50_ms"), mine.get("overhead_p99_ms")
            own_text = "-" if o50 is None else f"{o50:.2f} / {o99:.2f}"
            lines.append(f"| {sdk} | {_ms(d50)} | {_ms(m50)} | {_ms(e50)} | {(e50 - m50) * 1000:+.2f} | {own_text} |")
    if checks:
        lines.append("")
        lines.append("| target at 20 ms (issue 16) | value | target | verdict |")
        lines.append("| --- | ---: | --- | --- |")
        for label, value, target, ok in checks:
            verdict = "" if not target else ("ok" if ok else "MISS")
            lines.append(f"| {label} | {value:.2f} | {target} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
