"""Proxy overhead benchmark: direct vs a minimal aiohttp proxy vs egressd (with and without stages).

    python bench/overhead.py                 # 3 rounds of ~5 s per phase, about 2.5 minutes
    python bench/overhead.py --quick         # 1 short round, under 40 s
    python bench/overhead.py --json out.json

Every party runs in its own process so that its CPU time can be read from /proc/PID/stat:
a fast upstream (bench/upstream.py), the baseline proxy (bench/minimal_proxy.py), egressd with
no stages, and egressd with retry + circuit breaker + rate limit (far above the load) + metrics
configured but idle. Rounds alternate the targets so that machine noise spreads evenly.

Per target and round: a saturated phase (`wrk`, or a built-in aiohttp client in its own process
when wrk is missing; install wrk for best results: `apt-get install wrk`) at --connections
connections, then an open-loop paced phase at --rate calls/s (own client: calls are issued at
fixed times whatever the answers do, latency is counted from the scheduled time) during which
the proxy's CPU time (utime+stime) is read before and after. Finally each proxy's RSS is read
idle and sampled while a --body-mb body streams through it, upload and download.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PATH = "/v1/charges"
TARGETS = ("direct", "minimal", "egressd", "egressd+stages")


# --------------------------------------------------------------------------- /proc readers


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for mod in ("aiohttp", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    wrk = shutil.which("wrk")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **versions,
        "load_generator": f"wrk ({wrk})" if wrk else "built-in aiohttp client",
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- client modes (own process)


async def _client_sat(url: str, conns: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    done = errors = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as session:

        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                        await r.read()
                        if r.status == 200:
                            done += 1
                        else:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.monotonic() - start
    return {"rps": done / elapsed, "calls": done, "errors": errors, "seconds": elapsed}


async def _client_paced(
    url: str,
    rate: float,
    seconds: float,
    pids: list[int],
    *,
    method: str = "GET",
    body: bytes | None = None,
    keyed: bool = False,
) -> dict[str, Any]:
    """Open-loop load at `rate` calls/s; `pids`' CPU time is read around the measured part.
    `keyed`: every call carries a new `Idempotency-Key` (bench/durable_cost.py)."""
    import aiohttp

    interval = 1.0 / rate
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        errors = 0
        lat: list[float] = []

        async def one(at: float, record: bool) -> None:
            nonlocal errors
            headers = {"Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"} if keyed else None
            try:
                async with session.request(method, url, data=body, headers=headers, timeout=timeout) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if record:
                if ok:
                    lat.append(time.perf_counter() - at)
                else:
                    errors += 1

        async def pace(n: int, record: bool) -> None:
            tasks = []
            t0 = time.perf_counter()
            for i in range(n):
                at = t0 + i * interval
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(at, record)))
            await asyncio.gather(*tasks)

        await pace(max(50, int(rate * 0.3)), record=False)  # warm the pools; not measured
        cpu0 = [cpu_seconds(p) for p in pids]
        w0 = time.perf_counter()
        n = int(rate * seconds)
        await pace(n, record=True)
        wall = time.perf_counter() - w0
        cpu1 = [cpu_seconds(p) for p in pids]
    return {
        "calls": n,
        "errors": errors,
        "wall": wall,
        "cpu": [b - a for a, b in zip(cpu0, cpu1, strict=True)],
        "latencies": lat,
    }


async def _client_body(url: str, mode: str, size: int) -> dict[str, Any]:
    import aiohttp

    chunk = b"y" * 65536
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        if mode == "upload":

            async def gen() -> Any:
                left = size
                while left > 0:
                    piece = chunk if left >= len(chunk) else chunk[:left]
                    left -= len(piece)
                    yield piece

            async with session.post(url, data=gen()) as r:
                text = await r.text()
                ok = r.status == 200 and f'"received":{size}' in text
                got = size if ok else 0
        else:
            async with session.get(url) as r:
                got = 0
                async for piece in r.content.iter_chunked(65536):
                    got += len(piece)
                ok = r.status == 200 and got == size
    return {"ok": ok, "bytes": got, "seconds": time.perf_counter() - start}


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="overhead.py --client")
    p.add_argument("mode", choices=("sat", "paced", "upload", "download"))
    p.add_argument("--url", required=True)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rate", type=float, default=500)
    p.add_argument("--pid", type=int, action="append", default=[])
    p.add_argument("--size", type=int, default=100 * 1024 * 1024)
    a = p.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.mode == "sat":
        out = asyncio.run(_client_sat(a.url, a.conns, a.seconds))
    elif a.mode == "paced":
        out = asyncio.run(_client_paced(a.url, a.rate, a.seconds, a.pid))
    else:
        out = asyncio.run(_client_body(a.url, a.mode, a.size))
    print(json.dumps(out))
    return 0


def run_client(*args: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- processes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid


def start(name: str, cmd: list[str], tmp: Path, pattern: str, timeout: float = 20.0) -> Server:
    log = tmp / f"{name}.log"
    fh = open(log, "wb")  # the child inherits it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh, cwd=ROOT, start_new_session=True)
    fh.close()
    srv = Server(name, proc, log)
    if not pattern:
        return srv  # the caller finds the port another way
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(log.read_text(errors="replace"))
        if m:
            srv.port = int(m.group(1))
            return srv
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop(srv)
    raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(srv: Server, timeout: float = 20.0) -> Server:
    """For an egressd whose log level hides the `listening` line: wait until the port answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and srv.proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", srv.port), timeout=0.5):
            return srv
        time.sleep(0.05)
    stop(srv)
    raise RuntimeError(f"{srv.name} did not start: {srv.log.read_text(errors='replace')[-2000:]}")


def stop(srv: Server) -> None:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(timeout=5)


def write_policy(directory: Path, upstream_port: int, stages: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = f"upstream: bench\ntarget: http://127.0.0.1:{upstream_port}\nlimits: {{max_body: 200MiB}}\n"
    if stages:
        text += "retry: {attempts: 3}\ncircuit_breaker: {}\nrate_limit: {rate: 100000/s, burst: 1000}\n"
    (directory / "bench.yaml").write_text(text)


# --------------------------------------------------------------------------- measurements


def saturate(url: str, conns: int, seconds: float, use_wrk: bool, pid: int | None) -> dict[str, Any]:
    """Closed-loop load; also the proxy's CPU per call under it (a secondary figure)."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = _saturate(url, conns, seconds, use_wrk)
    if pid and out["calls"]:
        out["cpu_per_call"] = (cpu_seconds(pid) - cpu0) / out["calls"]
    return out


def _saturate(url: str, conns: int, seconds: float, use_wrk: bool) -> dict[str, Any]:
    if use_wrk:
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False).stdout
        m = re.search(r"Requests/sec:\s*([\d.]+)", out)
        if not m:
            raise RuntimeError(f"cannot parse wrk output: {out}")
        bad = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
        total = re.search(r"(\d+) requests in", out)
        return {"rps": float(m.group(1)), "errors": errors, "calls": int(total.group(1)) if total else 0}
    return run_client("sat", "--url", url, "--conns", str(conns), "--seconds", str(seconds), timeout=seconds + 30)


def sample_rss_during(pid: int, cmd_args: list[str], timeout: float) -> dict[str, Any]:
    """Run a body client while sampling the proxy's RSS every 5 ms; report the peak rise."""
    base = rss_bytes(pid)
    peak = base
    stop_flag = threading.Event()

    def sampler() -> None:
        nonlocal peak
        while not stop_flag.is_set():
            with contextlib.suppress(OSError):
                peak = max(peak, rss_bytes(pid))
            time.sleep(0.005)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    try:
        result = run_client(*cmd_args, timeout=timeout)
    finally:
        stop_flag.set()
        t.join()
    return {**result, "rss_base": base, "rss_peak": peak, "rss_rise": peak - base}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class TargetResult:
    name: str
    url: str
    pid: int | None
    sat: list[dict[str, Any]] = field(default_factory=list)
    paced: list[dict[str, Any]] = field(default_factory=list)
    rss_idle: int | None = None
    upload: dict[str, Any] | None = None
    download: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        lat = [x for p in self.paced for x in p["latencies"]]
        proxy_cpu = [p["cpu"][0] / p["calls"] for p in self.paced] if self.pid else []
        up_cpu = [p["cpu"][-1] / p["calls"] for p in self.paced]
        sat_cpu = [x["cpu_per_call"] for x in self.sat if "cpu_per_call" in x]
        return {
            "rps": statistics.median(s["rps"] for s in self.sat) if self.sat else None,
            "rps_rounds": [round(s["rps"], 1) for s in self.sat],
            "sat_errors": sum(s["errors"] for s in self.sat),
            "cpu_us_per_call": statistics.median(proxy_cpu) * 1e6 if proxy_cpu else None,
            "cpu_us_rounds": [round(c * 1e6, 1) for c in proxy_cpu],
            "upstream_cpu_us_per_call": statistics.median(up_cpu) * 1e6 if up_cpu else None,
            "sat_cpu_us_per_call": statistics.median(sat_cpu) * 1e6 if sat_cpu else None,
            "p50_ms": pct(lat, 0.50) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3,
            "paced_calls": sum(p["calls"] for p in self.paced),
            "paced_errors": sum(p["errors"] for p in self.paced),
            "rss_idle_mb": self.rss_idle / 2**20 if self.rss_idle else None,
            "upload_rss_rise_mb": self.upload["rss_rise"] / 2**20 if self.upload else None,
            "download_rss_rise_mb": self.download["rss_rise"] / 2**20 if self.download else None,
            "upload_ok": self.upload["ok"] if self.upload else None,
            "download_ok": self.download["ok"] if self.download else None,
        }


# --------------------------------------------------------------------------- report


def fmt(v: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if v is None or v != v else f"{v:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["results"]
    d = s["direct"]
    lines = [
        "egressd overhead benchmark",
        f"date:     {report['date']}",
        f"command:  {report['command']}",
        f"machine:  {m['nproc']} CPU(s), {m['cpu_model']}, Linux {m['kernel']}",
        f"software: Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}; load: {m['load_generator']}",
        f"settings: {report['settings']['rounds']} round(s); saturated {report['settings']['seconds']} s at "
        f"{report['settings']['connections']} connections; paced {report['settings']['paced_seconds']} s at "
        f"{report['settings']['rate']:.0f} calls/s; body {report['settings']['body_mb']} MB",
        f"loadavg:  start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
        f"end {' '.join(f'{x:.2f}' for x in report['loadavg_end'])}",
        "",
        f"{'target':<16}{'CPU/call':>10}{'@sat':>6}{'sat rps':>10}{'p50':>9}{'p99':>9}{'+p50':>9}{'+p99':>9}"
        f"{'RSS idle':>10}{'+RSS up':>9}{'+RSS down':>10}",
        f"{'':<16}{'(us)':>10}{'(us)':>6}{'(32 conn)':>10}{'(ms)':>9}{'(ms)':>9}{'(ms)':>9}{'(ms)':>9}"
        f"{'(MB)':>10}{'(MB)':>9}{'(MB)':>10}",
    ]
    lines[-1] = lines[-1].replace("(32 conn)", f"({report['settings']['connections']} conn)")
    for name in TARGETS:
        r = s[name]
        direct = name == "direct"
        lines.append(
            f"{name:<16}"
            f"{fmt(r['cpu_us_per_call'], '.0f') if not direct else '-':>10}"
            f"{fmt(r['sat_cpu_us_per_call'], '.0f') if not direct else '-':>6}"
            f"{fmt(r['rps'], '.0f'):>10}"
            f"{fmt(r['p50_ms'], '.2f'):>9}{fmt(r['p99_ms'], '.2f'):>9}"
            f"{'-' if direct else fmt(r['p50_ms'] - d['p50_ms'], '.2f'):>9}"
            f"{'-' if direct else fmt(r['p99_ms'] - d['p99_ms'], '.2f'):>9}"
            f"{fmt(r['rss_idle_mb'], '.1f'):>10}{fmt(r['upload_rss_rise_mb'], '.1f'):>9}"
            f"{fmt(r['download_rss_rise_mb'], '.1f'):>10}"
        )
    lines.append("")
    lines.append("per-round spread (CPU us/call | sat rps):")
    for name in TARGETS:
        r = s[name]
        lines.append(f"  {name:<16}{r['cpu_us_rounds'] or '-'!s:<28} {r['rps_rounds']}")
    e, mi, st = s["egressd"], s["minimal"], s["egressd+stages"]
    checks = [
        ("CPU/call egressd / minimal", ratio(e["cpu_us_per_call"], mi["cpu_us_per_call"]), "<= 0.90", "le", 0.9),
        ("sat rps  egressd / minimal", ratio(e["rps"], mi["rps"]), ">= 1.00", "ge", 1.0),
        ("sat rps  stages / egressd", ratio(st["rps"], e["rps"]), ">= 0.90", "ge", 0.9),
        ("CPU/call stages / egressd", ratio(st["cpu_us_per_call"], e["cpu_us_per_call"]), "(info)", "", 0),
        ("added p50 egressd (ms)", e["p50_ms"] - d["p50_ms"], "<= 0.50", "le", 0.5),
        ("added p99 egressd (ms)", e["p99_ms"] - d["p99_ms"], "<= 2.00", "le", 2.0),
        ("RSS idle egressd (MB)", e["rss_idle_mb"], "<= 80", "le", 80),
        (
            "RSS rise 100 MB body, max (MB)",
            max((x for x in (e["upload_rss_rise_mb"], e["download_rss_rise_mb"]) if x is not None), default=None),
            "< 20",
            "lt",
            20,
        ),
    ]
    lines.append("")
    lines.append(f"{'ratio / target check':<34}{'value':>8}  {'target':<9} verdict")
    for label, value, target, op, bound in checks:
        if value is None:
            verdict = "n/a"
        elif op == "le":
            verdict = "ok" if value <= bound else "MISS"
        elif op == "ge":
            verdict = "ok" if value >= bound else "MISS"
        elif op == "lt":
            verdict = "ok" if value < bound else "MISS"
        else:
            verdict = ""
        lines.append(f"{label:<34}{fmt(value, '.2f'):>8}  {target:<9} {verdict}")
    errs = {n: (s[n]["sat_errors"], s[n]["paced_errors"]) for n in TARGETS}
    if any(a or b for a, b in errs.values()):
        lines.append(f"errors (saturated, paced): {errs}")
    bodies = {n: (s[n]["upload_ok"], s[n]["download_ok"]) for n in TARGETS if n != "direct"}
    if report["settings"]["body_mb"] and not all(a and b for a, b in bodies.values()):
        lines.append(f"WARNING: a body transfer failed (upload ok, download ok): {bodies}")
    lines.append(
        "CPU/call: proxy process utime+stime over the paced phase / calls (median of rounds); @sat: the same "
        "under the saturated load; +p50/+p99: over direct."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        return client_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="saturated phase length per target and round")
    p.add_argument("--paced-seconds", type=float, default=5.0, help="paced phase length per target and round")
    p.add_argument("--rate", type=float, default=500.0, help="paced calls per second")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--body-mb", type=int, default=100, help="streamed body size for the RSS check (0: skip)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 s phases (under 40 s)")
    p.add_argument("--no-wrk", action="store_true", help="use the built-in client even when wrk is installed")
    p.add_argument("--egressd-log-level", default="info", help="egressd --log-level (info logs every call)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep the egressd logs in DIR")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.seconds, a.paced_seconds = 1, 2.0, 2.0
    use_wrk = bool(shutil.which("wrk")) and not a.no_wrk
    if not use_wrk and not a.no_wrk:
        print(
            "note: wrk not found, using the built-in client (install wrk for best results: apt-get install wrk)",
            file=sys.stderr,
        )
    info = machine()
    started_wall = time.monotonic()
    py = sys.executable
    servers: list[Server] = []
    tmp = Path(tempfile.mkdtemp(prefix="egressd-bench-"))
    try:
        up = start("upstream", [py, str(HERE / "upstream.py")], tmp, r"listening on [\d.]+:(\d+)")
        servers.append(up)
        mini = start(
            "minimal",
            [py, str(HERE / "minimal_proxy.py"), "--target", f"http://127.0.0.1:{up.port}"],
            tmp,
            r"listening on [\d.]+:(\d+)",
        )
        servers.append(mini)
        eg: dict[str, Server] = {}
        for name, stages in (("egressd", False), ("egressd+stages", True)):
            pol = tmp / name.replace("+", "_")
            write_policy(pol, up.port, stages)
            quiet = a.egressd_log_level not in ("debug", "info")  # no `listening` line to read the port from
            port = free_port() if quiet else 0
            cmd = [
                py,
                "-m",
                "proxy",
                "run",
                "--policies",
                str(pol),
                "--listen",
                f"127.0.0.1:{port}",
                "--admin",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--log-level",
                a.egressd_log_level,
            ]
            if quiet:
                eg[name] = start(name.replace("+", "_"), cmd, tmp, "", timeout=0)
                eg[name].port = port
                wait_port(eg[name])
            else:
                eg[name] = start(name.replace("+", "_"), cmd, tmp, r"main listening on [\d.]+:(\d+)")
            servers.append(eg[name])
        results = {
            "direct": TargetResult("direct", f"http://127.0.0.1:{up.port}{PATH}", None),
            "minimal": TargetResult("minimal", f"http://127.0.0.1:{mini.port}{PATH}", mini.pid),
            "egressd": TargetResult("egressd", f"http://127.0.0.1:{eg['egressd'].port}/bench{PATH}", eg["egressd"].pid),
            "egressd+stages": TargetResult(
                "egressd+stages", f"http://127.0.0.1:{eg['egressd+stages'].port}/bench{PATH}", eg["egressd+stages"].pid
            ),
        }
        # warm every path once (imports, pools), then read idle RSS
        for r in results.values():
            run_client("sat", "--url", r.url, "--conns", "4", "--seconds", "0.3", timeout=30)
        time.sleep(0.5)
        for r in results.values():
            if r.pid:
                r.rss_idle = rss_bytes(r.pid)
        for rnd in range(a.rounds):
            order = TARGETS[rnd % len(TARGETS) :] + TARGETS[: rnd % len(TARGETS)]
            for name in order:
                r = results[name]
                print(f"round {rnd + 1}/{a.rounds}: {name} ...", file=sys.stderr, flush=True)
                r.sat.append(saturate(r.url, a.connections, a.seconds, use_wrk, r.pid))
                time.sleep(0.3)
                pids = ([r.pid] if r.pid else []) + [up.pid]
                r.paced.append(
                    run_client(
                        "paced",
                        "--url",
                        r.url,
                        "--rate",
                        str(a.rate),
                        "--seconds",
                        str(a.paced_seconds),
                        *[x for pid in pids for x in ("--pid", str(pid))],
                        timeout=a.paced_seconds + 30,
                    )
                )
        if a.body_mb > 0:
            size = a.body_mb * 1024 * 1024
            for name in TARGETS[1:]:
                r = results[name]
                assert r.pid
                base = r.url.rsplit(PATH, 1)[0]
                print(f"body {a.body_mb} MB: {name} ...", file=sys.stderr, flush=True)
                time.sleep(0.3)
                r.upload = sample_rss_during(r.pid, ["upload", "--url", f"{base}/sink", "--size", str(size)], 150)
                time.sleep(0.3)
                r.download = sample_rss_during(
                    r.pid, ["download", "--url", f"{base}/stream?size={size}", "--size", str(size)], 150
                )
        for srv in servers:
            if srv.proc.poll() is not None:
                raise RuntimeError(f"{srv.name} exited early: {srv.log.read_text(errors='replace')[-2000:]}")
        report = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "machine": info,
            "loadavg_end": os.getloadavg(),
            "settings": {
                "rounds": a.rounds,
                "seconds": a.seconds,
                "paced_seconds": a.paced_seconds,
                "rate": a.rate,
                "connections": a.connections,
                "body_mb": a.body_mb,
                "egressd_log_level": a.egressd_log_level,
            },
            "results": {n: results[n].summary() for n in TARGETS},
            "elapsed_seconds": round(time.monotonic() - started_wall, 1),
        }
        print(render(report))
        print(f"(run took {report['elapsed_seconds']} s)", file=sys.stderr)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    finally:
        for srv in reversed(servers):
            stop(srv)
        if a.keep:
            shutil.copytree(tmp, a.keep, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
