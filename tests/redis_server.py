"""Real `redis-server` processes for tests: one node, or a 3-node Cluster, on free ports.

Never mocked. If the binary is missing, tests that need it are skipped locally and FAIL
when the `CI` environment variable is set (CI installs redis-server with apt-get).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.missing import missing as skip_or_fail

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server") or "/usr/bin/redis-server"
REPO_ROOT = Path(__file__).resolve().parent.parent
REDIS_CLI = os.environ.get("REDIS_CLI_BIN") or shutil.which("redis-cli") or "/usr/bin/redis-cli"


def require_redis(*, cluster: bool = False) -> None:
    """Skip (locally) or fail (CI) when the binaries are not installed."""
    missing = [b for b in ([REDIS_SERVER, REDIS_CLI] if cluster else [REDIS_SERVER]) if not os.access(b, os.X_OK)]
    if not missing:
        return
    skip_or_fail(f"{', '.join(missing)} not found: install redis-server (apt-get install -y redis-server)")


def free_port(*, cluster_bus: bool = False) -> int:
    """A free loopback port; with `cluster_bus`, port + 10000 (the Cluster bus) is free too."""
    if not cluster_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)  # below the usual ephemeral range, bus below 40000
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int, *, tls: bool = False) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            if tls:
                return True  # listening is enough; the client checks the handshake
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; can be killed, paused (SIGSTOP) and restarted on its port."""

    def __init__(self, *, port: int | None = None, extra: tuple[str, ...] = (), tls: bool = False) -> None:
        self.port = port or free_port()
        self.extra = extra
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="egressd-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = "s3cret" if tls else None
        if tls:
            self.cert = self.dir / "cert.pem"
            key = self.dir / "key.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                 str(self.cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            self.extra = (
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
                "--requirepass", "s3cret", *extra,
            )  # fmt: skip

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.cert}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        cmd = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--protected-mode", "no",
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {' '.join(cmd)}")
            if _ping(self.port, tls=self.tls):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot die of SIGTERM
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def suspend(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three masters with `--cluster-enabled yes`, joined by `redis-cli --cluster create`.

    With `replicas=1`, one replica per master (six nodes; `--cluster-replicas 1`), so a
    master can fail over: `master_of`, `replica_of` and `wait_failover` help tests do that.
    """

    def __init__(self, size: int = 3, *, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.replicas = replicas
        self.nodes = [
            RedisServer(
                port=free_port(cluster_bus=True),
                extra=("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms)),
            )
            for _ in range(size * (1 + replicas))
        ]
        for node in self.nodes:
            node.extra = (*node.extra, "--cluster-config-file", str(node.dir / "nodes.conf"))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{hosts}"

    def start(self, timeout: float = 20.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(n.port) for n in self.nodes) and self._replicas_in_sync():
                return self
            time.sleep(0.05)
        raise RuntimeError("the Redis cluster did not reach cluster_state:ok")

    @staticmethod
    def _ok(port: int) -> bool:
        out = subprocess.run(
            [REDIS_CLI, "-p", str(port), "cluster", "info"], capture_output=True, text=True, timeout=5
        ).stdout
        return "cluster_state:ok" in out

    def _replicas_in_sync(self) -> bool:
        """Every replica's link to its master is up (trivially true without replicas)."""
        for node in self.nodes:
            if node.proc is None:
                continue
            info = cli(node.port, "info", "replication")
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def topology(self, via: RedisServer | None = None) -> dict[int, tuple[str, int | None]]:
        """port -> ("master" | "replica" | "fail", master's port for a replica), per `CLUSTER NODES`."""
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        asked = via or alive[0]
        lines = [line.split() for line in cli(asked.port, "cluster", "nodes").splitlines() if line.strip()]
        ids = {parts[0]: int(parts[1].split("@")[0].rsplit(":", 1)[1]) for parts in lines}
        out: dict[int, tuple[str, int | None]] = {}
        for parts in lines:
            port, flags, master = ids[parts[0]], parts[2].split(","), parts[3]
            role = "fail" if "fail" in flags else "master" if "master" in flags else "replica"
            out[port] = (role, ids.get(master) if master != "-" else None)
        return out

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> list[RedisServer]:
        return [self.node(p) for p, (role, _) in self.topology().items() if role == "master"]

    def replica_of(self, master: RedisServer) -> RedisServer:
        return next(self.node(p) for p, (role, m) in self.topology().items() if role == "replica" and m == master.port)

    def wait_failover(self, old_master: RedisServer, new_master: RedisServer, timeout: float = 20.0) -> float:
        """Wait until `new_master` is a master and every live node agrees the cluster is ok;
        returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(OSError, subprocess.SubprocessError, StopIteration, KeyError, IndexError):
                alive = [n for n in self.nodes if n.proc is not None and n is not old_master]
                if self.topology(via=new_master)[new_master.port][0] == "master" and all(
                    self._ok(n.port) for n in alive
                ):
                    return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"{new_master.port} did not take over from {old_master.port} within {timeout}s")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def cli(port: int, *args: str, timeout: float = 5.0) -> str:
    """`redis-cli -p port args...` -> stdout."""
    return subprocess.run(
        [REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout, check=False
    ).stdout


class RedisSentinel:
    """One Sentinel process watching `master` as service `mymaster`."""

    def __init__(self, master: RedisServer, service: str = "mymaster") -> None:
        self.master = master
        self.service = service
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="egressd-sentinel-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}"

    def start(self, timeout: float = 10.0) -> RedisSentinel:
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n"
        )
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _ping(self.port):
                return self
            time.sleep(0.02)
        raise RuntimeError("redis sentinel did not start")

    def cleanup(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis(**kwargs: object) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def running_cluster(*, replicas: int = 0) -> Iterator[RedisCluster]:
    """A 3-master Cluster; `replicas=1` adds one replica per master (six nodes)."""
    require_redis(cluster=True)
    cluster = RedisCluster(replicas=replicas)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


class EgressProcess:
    """One `python -m proxy run` process on free ports (used by multi-process tests and bench)."""

    def __init__(
        self,
        policies: Path,
        *,
        redis_url: str | None,
        prefix: str = "egressd:",
        log_path: Path | None = None,
        log_level: str = "warning",
    ) -> None:
        self.listen = free_port()
        self.admin = free_port()
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="egressd-", suffix=".log")[1])
        cmd = [
            sys.executable, "-m", "proxy", "run",
            "--policies", str(policies),
            "--listen", f"127.0.0.1:{self.listen}",
            "--admin", f"127.0.0.1:{self.admin}",
            "--log-format", "text", "--log-level", log_level, "--drain", "0",
            "--data-dir", tempfile.mkdtemp(prefix="egressd-data-"),
        ]  # fmt: skip
        if redis_url:
            cmd += ["--redis", redis_url, "--redis-prefix", prefix]
        env = {k: v for k, v in os.environ.items() if k != "EGRESSD_REDIS_URL"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"egressd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.admin_url + "/readyz", timeout=0.5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"egressd did not become ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@contextlib.contextmanager
def egress_fleet(
    count: int, policies: Path, *, redis_url: str | None, prefix: str = "egressd:", log_dir: Path | None = None
) -> Iterator[list[EgressProcess]]:
    """`count` egressd processes sharing one policy directory (and Redis); always stopped."""
    fleet: list[EgressProcess] = []
    try:
        for i in range(count):
            log_path = log_dir / f"egressd-{i}.log" if log_dir else None
            fleet.append(EgressProcess(policies, redis_url=redis_url, prefix=prefix, log_path=log_path))
        for proc in fleet:
            proc.wait_ready()
        yield fleet
    finally:
        for proc in fleet:
            proc.stop()
