"""A real `python -m proxy run` process for tests, restartable on the same ports and data dir.

`egressd_factory` (a fixture, registered in tests/conftest.py) writes a policy directory
and makes an `Egressd`; every one made is killed at the end of the test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.redis_server import REPO_ROOT, free_port


class Egressd:
    """One `python -m proxy run` on fixed free ports, restartable on the same ports."""

    def __init__(
        self,
        policies: Path,
        *,
        redis_url: str | None = None,
        drain: float = 5.0,
        data_dir: Path | None = None,
        args: Sequence[str] = (),
        nofile: int | None = None,
    ) -> None:
        self.policies = policies
        self.args = list(args)  # more `egressd run` flags
        self.nofile = nofile  # a file limit (soft and hard) for the process
        self.redis_url = redis_url
        self.drain = drain
        # Its own durable store, kept across restarts of this object (never ./egressd-data).
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="egressd-data-"))
        self.prefix = f"proc-{uuid.uuid4().hex[:6]}:"  # kept across restarts: the records are found again
        self.listen = free_port()
        self.admin = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="egressd-proc-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    def start(self, timeout: float = 20.0) -> None:
        cmd = [
            sys.executable, "-m", "proxy", "run", "--policies", str(self.policies),
            "--listen", f"127.0.0.1:{self.listen}", "--admin", f"127.0.0.1:{self.admin}",
            "--log-format", "text", "--log-level", "warning", "--drain", str(self.drain),
            "--data-dir", str(self.data_dir),
        ]  # fmt: skip
        if self.redis_url:
            cmd += ["--redis", self.redis_url, "--redis-prefix", self.prefix]
        cmd += self.args
        env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSD_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env, preexec_fn=self._limits
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"egressd exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=0.5) as r:
                    if r.status == 200:
                        return
            time.sleep(0.05)
        raise RuntimeError(f"egressd not ready within {timeout}s:\n{self.log()}")

    def _limits(self) -> None:
        if self.nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def egressd_factory(tmp_path: Path) -> Iterator[Callable[..., Egressd]]:
    made: list[Egressd] = []

    def make(docs: list[dict[str, Any]], **kwargs: Any) -> Egressd:
        directory = tmp_path / f"policies{len(made)}"
        directory.mkdir()
        (directory / "p.yaml").write_text(yaml.safe_dump_all(docs))
        proc = Egressd(directory, **kwargs)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()
