"""compose/: the docker compose stack, checked as far as this machine allows.

Docker cannot run here (no engine on this machine), so nothing is started in containers. What is checked instead:
- Debian's docker-compose 1.29 accepts the file (`config` needs no daemon), and everything below reads its
  `config` output, so variables, anchors and relative paths are resolved as compose resolves them;
- every container's command line passes the real CLI's `--check`, with the files compose mounts;
- the addresses services name agree: gateways and the dashboard, the dashboard and etcd, Prometheus and Jaeger,
  apps and their own group's gateway, mesh.yaml's DNS names and the app services, Prometheus's targets and the
  gateways' metrics listeners, healthchecks and listeners, published ports on 127.0.0.1 only;
- `promtool check config` accepts compose/prometheus.yml;
- compose/bootstrap.sh runs for real (twice) against a real etcd, with the venv's `meshgate` on PATH.
Each kind of check is also shown failing on a broken copy of the stack.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboard.api.auth import digest
from dashboard.mesh import Mesh
from dashboard.store import open_store
from gateway.config import Config, Listen
from gateway.tls import spki_hash
from gateway.units import parse_duration
from tests.deploy.commands import check_command, flag_value, flag_values, host_port, url_host_port
from tests.etcd import EtcdServer

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
DOCKER_COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
VENV_BIN = Path(sys.executable).parent  # holds the `meshgate` script bootstrap.sh calls
TIMEOUT = 60.0
# The ports the third-party images listen on by default (the stack does not change them).
PROMETHEUS_PORT = 9090
JAEGER_QUERY_PORT = 16686
JAEGER_OTLP_HTTP_PORT = 4318


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs)


def compose_config(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    if not os.access(DOCKER_COMPOSE, os.X_OK):
        pytest.skip(f"{DOCKER_COMPOSE} is not installed (apt-get install docker-compose)")
    env = {name: value for name, value in os.environ.items() if not name.startswith("MESHGATE_")}
    return run([DOCKER_COMPOSE, "-f", str(directory / "docker-compose.yml"), "config", *extra], env=env)


@dataclass
class Stack:
    """A compose stack as `docker-compose config` resolves it. `volumes` is where named volumes live in tests."""

    services: dict[str, Any]
    volumes: Path

    @classmethod
    def load(cls, directory: Path, volumes: Path) -> Stack:
        done = compose_config(directory)
        assert done.returncode == 0, done.stderr
        return cls(yaml.safe_load(done.stdout)["services"], volumes)

    def command(self, name: str) -> list[str]:
        return [str(arg) for arg in self.services[name].get("command") or []]

    def named(self, *prefix: str) -> list[str]:
        """The services whose command starts with `prefix`, e.g. ("meshgate", "gateway")."""
        return sorted(name for name in self.services if self.command(name)[: len(prefix)] == list(prefix))

    def the(self, *prefix: str) -> str:
        (name,) = self.named(*prefix)
        return name

    def networks(self, name: str) -> set[str]:
        return set(self.services[name].get("networks") or ())

    def _volumes(self, name: str) -> list[tuple[str, str]]:
        """(source, container path) of each mount: a host path (bind mount, made absolute by compose) or a
        named volume."""
        pairs = (str(volume).split(":") for volume in self.services[name].get("volumes") or ())
        return [(pair[0], pair[1]) for pair in pairs]

    def mounts(self, name: str) -> dict[str, Path]:
        """Container path -> host path: bind mounts where compose found them, named volumes under `volumes`."""
        return {
            target: Path(source) if source.startswith("/") else self.volumes / source
            for source, target in self._volumes(name)
        }

    def volume_of(self, name: str, container_path: str) -> str:
        """The named volume (or host path) mounted where `container_path` lies in service `name`."""
        for source, target in self._volumes(name):
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return source
        raise AssertionError(f"{name}: nothing is mounted at {container_path}")

    def host_file(self, name: str, container_path: str) -> Path:
        found = self.mounts(name).get(container_path)
        assert found is not None, f"{name}: {container_path} is not a mounted file"
        return found

    def gateway_config(self, name: str) -> Config:
        return Config.load(str(self.host_file(name, flag_value(self.command(name), "--config"))))

    def gateway_listen(self, name: str) -> Listen:
        return self.gateway_config(name).gateway.listen

    def mesh(self) -> Mesh:
        dashboard = self.the("meshgate", "dashboard")
        return Mesh.load(str(self.host_file(dashboard, flag_value(self.command(dashboard), "--config"))))

    def gateways(self) -> dict[str, str]:
        """Group -> its gateway service."""
        return {flag_value(self.command(name), "--group"): name for name in self.named("meshgate", "gateway")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return Stack.load(COMPOSE, tmp_path_factory.mktemp("volumes"))


@pytest.fixture
def broken(tmp_path: Path) -> Callable[[str, str, str], Stack]:
    """A copy of compose/ with `old` replaced by `new` in one of its files, loaded like the real one."""

    def copy(file: str, old: str, new: str) -> Stack:
        directory = tmp_path / "compose"
        shutil.copytree(COMPOSE, directory, dirs_exist_ok=True)
        text = (directory / file).read_text()
        assert old in text, f"{old!r} is not in compose/{file}"
        (directory / file).write_text(text.replace(old, new))
        return Stack.load(directory, tmp_path / "volumes")

    return copy


# The compose file


def test_docker_compose_accepts_the_file() -> None:
    done = compose_config(COMPOSE, "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_docker_compose_refuses_a_broken_file(tmp_path: Path) -> None:
    shutil.copytree(COMPOSE, tmp_path / "compose")
    path = tmp_path / "compose" / "docker-compose.yml"
    path.write_text(path.read_text().replace("service_completed_successfully", "service_finished"))
    done = compose_config(tmp_path / "compose", "-q")
    assert done.returncode != 0 and "service_finished" in done.stderr


def test_the_stack_has_what_the_issue_asks_for(stack: Stack) -> None:
    assert {"etcd", "bootstrap", "dashboard", "prometheus", "jaeger", "traffic"} <= set(stack.services)
    assert sorted(stack.gateways()) == ["catalog", "inventory", "payments", "shop"]
    assert "grafana" not in " ".join(str(service.get("image")) for service in stack.services.values())
    for name, service in stack.services.items():
        image = str(service["image"])
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image, got {image}"
    assert stack.services["bootstrap"]["restart"] == "no"


# Command lines


def check_commands(stack: Stack) -> list[str]:
    """Every meshgate or `python -m` command passes `--check`; returns the services checked."""
    checked = [*stack.named("meshgate"), *stack.named("python", "-m")]
    for name in checked:
        check_command(stack.command(name), stack.mounts(name), stack.services[name].get("environment"))
    return checked


def test_every_command_line_passes_the_cli_check(stack: Stack) -> None:
    checked = check_commands(stack)
    apps = {"storefront", "catalog-v1", "catalog-v2", "inventory", "payments", "traffic"}
    assert set(checked) == {"dashboard", *stack.gateways().values(), *apps}
    assert not list(stack.volumes.iterdir()), "--check wrote into a volume (the CA, a data directory)"


def test_a_command_line_the_cli_refuses_fails_the_check(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken("docker-compose.yml", "      - --ca=/bootstrap/ca.pem\n", "")  # unpinned beyond loopback
    with pytest.raises(pytest.fail.Exception, match="pin the mesh CA"):
        check_commands(stack)


# Cross-references


def check_control_plane(stack: Stack) -> None:
    """Gateways reach the dashboard, which reaches etcd, Prometheus and Jaeger, at the ports they listen on."""
    dashboard = stack.the("meshgate", "dashboard")
    argv = stack.command(dashboard)
    listen = host_port(flag_value(argv, "--listen"))
    etcd_urls = flag_values(stack.command("etcd"), "--listen-client-urls")
    assert url_host_port(flag_value(argv, "--store")) == ("etcd", url_host_port(etcd_urls[0])[1])
    assert url_host_port(flag_value(argv, "--prometheus")) == ("prometheus", PROMETHEUS_PORT)
    assert url_host_port(flag_value(argv, "--jaeger")) == ("jaeger", JAEGER_QUERY_PORT)
    assert stack.services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert dashboard in flag_values(argv, "--san"), "the name gateways dial is in the dashboard's certificate"
    groups = {name for name, _ in stack.mesh().groups}
    for group, gateway in stack.gateways().items():
        command = stack.command(gateway)
        control = flag_value(command, "--control")
        assert control.startswith("https://"), f"{gateway}: beyond loopback the dashboard serves https"
        assert url_host_port(control) == (dashboard, listen[1]), gateway
        assert group in groups, f"{gateway}: group {group} is not in mesh.yaml"
        token = flag_value(command, "--token-file")
        assert os.path.basename(token) == f"{group}.token", gateway
        assert stack.volume_of(gateway, token) == stack.volume_of("bootstrap", "/bootstrap/x"), gateway
        assert stack.networks(gateway) >= {"mesh"} and stack.networks(dashboard) >= {"mesh"}
        config = stack.gateway_config(gateway)
        tracing = config.gateway.telemetry.tracing.endpoint
        assert tracing is not None and url_host_port(tracing) == ("jaeger", JAEGER_OTLP_HTTP_PORT), gateway
        advertise = config.gateway.listen.advertise
        assert advertise is not None and advertise.host == gateway, f"{gateway}: peers dial its service name"
        assert advertise.port == config.gateway.listen.inbound.port, gateway


def test_gateways_dashboard_etcd_prometheus_and_jaeger_agree(stack: Stack) -> None:
    check_control_plane(stack)


def test_a_gateway_pointed_at_the_wrong_port_fails_the_check(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken(
        "docker-compose.yml",
        "--control=https://dashboard:9000\n      - --group=catalog",
        "--control=https://dashboard:9001\n      - --group=catalog",
    )
    with pytest.raises(AssertionError, match="gateway-catalog"):
        check_control_plane(stack)


def prometheus_file(stack: Stack) -> Path:
    return stack.host_file("prometheus", "/etc/prometheus/prometheus.yml")


def check_prometheus_targets(stack: Stack) -> None:
    """Prometheus scrapes every gateway's metrics listener, named as the dashboard looks gateways up (advertised
    host, metrics port), and nothing else, as often as the dashboard is told."""
    prometheus = yaml.safe_load(prometheus_file(stack).read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    expected = []
    for gateway in stack.gateways().values():
        listen = stack.gateway_listen(gateway)
        assert listen.metrics is not None and listen.advertise is not None, gateway
        expected.append(f"{listen.advertise.host}:{listen.metrics.port}")
        assert "mesh" in stack.networks(gateway) and "mesh" in stack.networks("prometheus")
    assert sorted(targets) == sorted(expected)
    dashboard = stack.command(stack.the("meshgate", "dashboard"))
    interval = parse_duration(flag_value(dashboard, "--prometheus-scrape-interval"))
    assert parse_duration(prometheus["global"]["scrape_interval"]) == interval
    for job in prometheus["scrape_configs"]:
        assert parse_duration(job.get("scrape_interval", prometheus["global"]["scrape_interval"])) == interval


def test_prometheus_scrapes_every_gateway_and_nothing_else(stack: Stack) -> None:
    check_prometheus_targets(stack)


def test_a_wrong_prometheus_target_fails_the_check(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken("prometheus.yml", "gateway-shop:15090", "gateway-shop:15000")
    with pytest.raises(AssertionError, match="gateway-shop:15000"):
        check_prometheus_targets(stack)


def check_apps(stack: Stack) -> None:
    """Each app calls its own group's gateway on its outbound listener, shares a network with that gateway and
    with no other, and exports spans to Jaeger; mesh.yaml's DNS subsets name these app services and ports."""
    mesh = stack.mesh()
    gateways = stack.gateways()
    apps = stack.named("python", "-m", "meshgate.demoapps.shop")
    for app in apps:
        command = stack.command(app)
        service = command[3]
        group = mesh.group_of(service)
        gateway = gateways[group]
        outbound = stack.gateway_listen(gateway).outbound
        assert url_host_port(flag_value(command, "--gateway")) == (gateway, outbound.port), app
        assert stack.networks(app) & stack.networks(gateway), f"{app} cannot reach {gateway}"
        for other in set(gateways.values()) - {gateway}:
            assert not stack.networks(app) & stack.networks(other), f"{app} can reach {other}'s outbound listener"
        assert url_host_port(flag_value(command, "--otlp")) == ("jaeger", JAEGER_OTLP_HTTP_PORT), app
        assert stack.networks(app) & stack.networks("jaeger"), f"{app} cannot reach jaeger"
    discovered = set()
    for mesh_service in mesh.services:
        gateway = gateways[mesh.group_of(mesh_service.name)]
        for subset in mesh_service.subsets:
            assert subset.dns is not None, f"{mesh_service.name}.{subset.name}: expected a dns subset"
            app = subset.dns.host
            assert app in apps, f"{mesh_service.name}.{subset.name}: no app service {app}"
            command = stack.command(app)
            assert command[3] == mesh_service.name and flag_value(command, "--version") == subset.name, app
            assert int(flag_value(command, "--port")) == subset.dns.port, app
            assert stack.networks(app) & stack.networks(gateway), f"{gateway} cannot resolve or reach {app}"
            discovered.add(app)
    assert discovered == set(apps), "every app is in the mesh"
    traffic = stack.command(stack.the("python", "-m", "meshgate.demoapps.traffic"))
    edge = stack.gateway_listen(gateways["shop"]).edge
    assert edge is not None and url_host_port(flag_value(traffic, "--url")) == (gateways["shop"], edge.port)
    assert stack.networks("traffic") & stack.networks(gateways["shop"])


def test_apps_reach_only_their_own_gateway_and_mesh_yaml_names_them(stack: Stack) -> None:
    check_apps(stack)


def test_an_app_calling_another_groups_gateway_fails_the_check(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken(
        "docker-compose.yml", "--gateway=http://gateway-inventory:15001", "--gateway=http://gateway-shop:15001"
    )
    with pytest.raises(AssertionError, match="inventory"):
        check_apps(stack)


def test_a_dns_name_that_is_no_service_fails_the_check(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken("mesh.yaml", 'dns: "catalog-v2:8080"', 'dns: "catalog-canary:8080"')
    with pytest.raises(AssertionError, match="catalog-canary"):
        check_apps(stack)


def check_ports(stack: Stack) -> None:
    """Published ports are bound to 127.0.0.1, each on a port its service listens on; healthchecks probe a
    listener of their own service."""
    listening: dict[str, set[int]] = {
        "dashboard": {host_port(flag_value(stack.command("dashboard"), "--listen"))[1]},
        "prometheus": {PROMETHEUS_PORT},
        "jaeger": {JAEGER_QUERY_PORT, JAEGER_OTLP_HTTP_PORT},
    }
    for gateway in stack.gateways().values():
        listen = stack.gateway_listen(gateway)
        listening[gateway] = {a.port for a in (listen.inbound, listen.edge, listen.outbound, listen.metrics) if a}
    for app in stack.named("python", "-m", "meshgate.demoapps.shop"):
        listening[app] = {int(flag_value(stack.command(app), "--port"))}
    for name, service in stack.services.items():
        for published in service.get("ports") or ():
            host, _, rest = str(published).partition(":")
            assert host == "127.0.0.1", f"{name}: {published} is published beyond this host"
            host_side, _, container = rest.partition(":")
            assert int(container.split("/")[0]) in listening[name], f"{name}: {published}: nothing listens there"
        probe = " ".join(str(part) for part in (service.get("healthcheck") or {}).get("test", ()))
        for url in (word.strip("'\"()") for word in probe.replace(",", " ").split()):
            if url.startswith(("http://", "https://")) and name in listening:
                assert url_host_port(url)[1] in listening[name], f"{name}: the healthcheck probes {url}"


def test_published_ports_and_healthchecks_match_listeners(stack: Stack) -> None:
    check_ports(stack)
    probes = {name: str(service.get("healthcheck")) for name, service in stack.services.items()}
    for gateway in stack.gateways().values():
        assert ":15090/ready" in probes[gateway], "the metrics listener answers /ready (the admin one is loopback)"
    assert "/healthz" in probes["dashboard"]


def test_a_port_published_beyond_loopback_fails_the_check(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken("docker-compose.yml", '"127.0.0.1:9090:9090"', '"9090:9090"')
    with pytest.raises(AssertionError, match="published beyond this host"):
        check_ports(stack)


# Prometheus's own validation


def promtool(path: Path) -> subprocess.CompletedProcess[str]:
    if not os.access(PROMTOOL, os.X_OK):
        pytest.skip(f"{PROMTOOL} is not installed (apt-get install prometheus)")
    return run([PROMTOOL, "check", "config", str(path)])


def test_promtool_accepts_prometheus_yml(stack: Stack) -> None:
    done = promtool(prometheus_file(stack))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_refuses_a_broken_prometheus_yml(broken: Callable[[str, str, str], Stack]) -> None:
    stack = broken("prometheus.yml", "scrape_interval: 15s", "scrape_interval: fast")
    done = promtool(prometheus_file(stack))
    assert done.returncode != 0 and "fast" in done.stdout + done.stderr


# bootstrap.sh, for real


def bootstrap_env(stack: Stack, tmp_path: Path, store: str) -> dict[str, str]:
    """The bootstrap service's environment, its container paths mapped to tmp_path; checked against the volumes
    and flags the other services use, so the script writes where they read."""
    env = {name: str(value) for name, value in stack.services["bootstrap"]["environment"].items()}
    dashboard = stack.command(stack.the("meshgate", "dashboard"))
    assert env["MESHGATE_DATA"] == flag_value(dashboard, "--data")
    assert stack.volume_of("bootstrap", env["MESHGATE_DATA"]) == stack.volume_of("dashboard", env["MESHGATE_DATA"])
    assert env["MESHGATE_STORE"] == flag_value(dashboard, "--store")
    assert env["MESHGATE_GROUPS"].split() == [name for name, _ in stack.mesh().groups]
    for gateway in stack.gateways().values():
        assert os.path.dirname(flag_value(stack.command(gateway), "--ca")) == env["MESHGATE_BOOTSTRAP"]
    (tmp_path / "bootstrap").mkdir()
    path = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    return {
        **env,
        "MESHGATE_DATA": str(tmp_path / "data"),
        "MESHGATE_BOOTSTRAP": str(tmp_path / "bootstrap"),
        "MESHGATE_STORE": store,
        "PATH": path,
        "HOME": str(tmp_path),
    }


def bootstrap(stack: Stack, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    shell, script = stack.command("bootstrap")
    assert shell == "sh"
    return run(["sh", str(stack.host_file("bootstrap", script))], env=env)


async def stored_tokens(store_url: str, files: list[Path]) -> tuple[list[tuple[str, str | None]], int]:
    """(role, group) of the token in each file, as the store knows it, and how many tokens the store holds."""
    store = open_store(store_url)
    try:
        found = []
        for path in files:
            record = await store.find_token(digest(path.read_text().strip()))
            assert record is not None, f"{path.name}: the store does not know this token"
            found.append((record.role, record.group))
        return found, len(await store.tokens())
    finally:
        await store.close()


def test_bootstrap_makes_the_ca_and_the_tokens_once(stack: Stack, tmp_path: Path, etcd: EtcdServer) -> None:
    env = bootstrap_env(stack, tmp_path, etcd.url)
    first = bootstrap(stack, env)
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "bootstrap"
    groups = env["MESHGATE_GROUPS"].split()
    tokens = [out / f"{group}.token" for group in groups] + [out / "operator.token"]
    assert sorted(out.iterdir()) == sorted([out / "ca.pem", *tokens]), "no temporary files left"
    assert stat.S_IMODE((out / "ca.pem").stat().st_mode) == 0o644
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in tokens)
    shown = run([str(VENV_BIN / "meshgate"), "dashboard", "ca", "--data", env["MESHGATE_DATA"]])
    assert shown.returncode == 0 and shown.stdout.strip() == spki_hash((out / "ca.pem").read_bytes())
    assert shown.stdout.strip() in first.stdout, "the script shows the hash too"
    roles, count = asyncio.run(stored_tokens(etcd.url, tokens))
    assert roles == [*(("gateway", group) for group in groups), ("operator", None)] and count == len(tokens)

    before = {path: path.read_bytes() for path in out.iterdir()}
    again = bootstrap(stack, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {path: path.read_bytes() for path in out.iterdir()} == before
    assert again.stderr.count("already holds a token; none created") == len(tokens)
    assert asyncio.run(stored_tokens(etcd.url, tokens))[1] == len(tokens), "no new tokens in the store"


def test_bootstrap_stops_at_the_first_failure(stack: Stack, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        closed = f"etcd://127.0.0.1:{sock.getsockname()[1]}"
    done = bootstrap(stack, bootstrap_env(stack, tmp_path, closed))
    assert done.returncode != 0 and "etcd is unreachable" in done.stderr
    assert sorted(path.name for path in (tmp_path / "bootstrap").iterdir()) == ["ca.pem"], "no token files"


# The image (it cannot be built here: the wheel it installs is what CI's packaging test builds)


def test_the_image_copies_everything_the_wheel_is_built_from() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    copied = {part for line in dockerfile if line.startswith("COPY ") for part in line.split()[1:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    roots = {
        setuptools["package-dir"].get(name, name.replace(".", "/")).split("/")[0] for name in setuptools["packages"]
    }
    assert copied == {"pyproject.toml", pyproject["project"]["readme"], *roots}
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert copied <= allowed, ".dockerignore keeps a copied path out of the build context"
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users and not users[-1].startswith(("0", "root")), "the containers run as a non-root user"
    assert not any(line.startswith("ENTRYPOINT") for line in dockerfile), "commands are whole command lines"
