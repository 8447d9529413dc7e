"""deploy/kubernetes/, checked offline as `kubectl apply -k deploy/kubernetes` would create it (the objects as
tests/deploy/kubernetes.py reads them).

Each check returns the problems it finds as one-line strings, so that a test can break a loaded copy and show the
check catch it:
- schemas: every object against the Kubernetes 1.30 schemas (kubernetes-validate, strict: unknown fields fail);
- selectors and named ports: workloads, Services, PodDisruptionBudgets, probes;
- volumes and files: each ConfigMap and Secret a pod mounts is in the manifests or among the objects the operator
  makes (`operator_created`, listed in kustomization.yaml too), and each file a command line names is mounted;
- listeners and references: a meshgate program's container ports are the ports its flags and config file listen
  on, and every address a command line or config file names (--control, --store, --prometheus, --jaeger,
  --gateway, --otlp, --url, the tracing endpoint, Prometheus's DNS discovery) is a Service port in front of the
  right kind of port; the gateways' prometheus.io/* annotations name their metrics listener;
- the mesh: mesh.yaml's `dns:` subsets are headless Services of the owning group's pods, and its groups are the
  gateways' --group;
- network policies: every connection the deployment needs is allowed, and a guarded port admits no one else (the
  outbound listener only its group's apps, apps only their group's gateway, etcd only the dashboard);
- the restricted Pod Security Standard, which the namespaces enforce, and one meshgate image tag: the project's.

Every meshgate command line also passes the real CLI's `--check` (tests/deploy/commands.py) with its config files
mapped to their sources under config/, and Prometheus's config passes the real promtool.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from dashboard.mesh import Mesh
from dashboard.settings import PROMETHEUS_SCRAPE_INTERVAL
from gateway.config import ConfigError
from gateway.units import is_wildcard, parse_duration
from meshgate.demo import APPS, Ports, mesh_document
from tests.deploy.commands import check_command, flag_value, flag_values, host_port
from tests.deploy.kubernetes import (
    CLUSTER_DOMAIN,
    DEPLOY,
    OUTSIDE,
    ROOT,
    Cluster,
    Pod,
    allowed,
    argv,
    describe,
    flows,
    host_mounts,
    ingress_policies,
    listeners,
    load,
    mesh_references,
    mounted,
    namespace_of,
    operator_created,
    peer_selects,
    reach,
    references,
    selects,
    volume_objects,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
KUBERNETES = "1.30.0"  # the oldest release the manifests are for: they use nothing newer
OPEN_PORTS = ("metrics", "edge")  # by design reachable from anywhere: Prometheus wherever it runs, external clients
RESTRICTED_VOLUMES = {"configMap", "secret", "projected", "emptyDir", "persistentVolumeClaim", "downwardAPI"}


@functools.cache
def loaded() -> Cluster:
    return load()


@pytest.fixture
def cluster() -> Cluster:
    """A copy each test may break."""
    return copy.deepcopy(loaded())


def schema_problems(cluster: Cluster) -> list[str]:
    problems = []
    for obj in cluster.objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{describe(obj)}: {'.'.join(map(str, err.path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{describe(obj)}: {err.message}")
    return problems


def selector_problems(cluster: Cluster) -> list[str]:
    problems = []
    for pod in cluster.pods():
        workload = pod.workload
        if not selects(workload["spec"]["selector"], pod.labels):
            problems.append(f"{pod}: its selector does not select its own pods")
        others = [other for other in cluster.selected(pod.namespace, workload["spec"]["selector"]) if other != pod]
        problems += [f"{pod}: its selector also selects the pods of {other}" for other in others]
    for obj in cluster.of("Service", "PodDisruptionBudget"):
        selector = obj["spec"].get("selector")
        selector = {"matchLabels": selector} if obj["kind"] == "Service" else selector
        if not cluster.selected(namespace_of(obj), selector):
            problems.append(f"{describe(obj)}: its selector selects no pods")
    return problems


def port_problems(cluster: Cluster) -> list[str]:
    """Service targetPorts and probe ports name container ports."""
    problems = []
    for service in cluster.of("Service"):
        for pod in cluster.selected(namespace_of(service), {"matchLabels": service["spec"]["selector"]}):
            for entry in service["spec"]["ports"]:
                if pod.port(entry.get("targetPort", entry["port"])) is None:
                    problems.append(f"{describe(service)}: targetPort {entry.get('targetPort')} is no port of {pod}")
    for pod in cluster.pods():
        for container in pod.containers():
            ports = {key for port in container.get("ports") or [] for key in (port.get("name"), port["containerPort"])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                action = (container.get(probe) or {}).get("httpGet") or (container.get(probe) or {}).get("tcpSocket")
                if action and action["port"] not in ports:
                    problems.append(f"{pod} {container['name']}: {probe} port {action['port']} is not a container port")
    return problems


FILE_FLAGS = ("--config", "--token-file", "--ca", "--config.file")


def volume_problems(cluster: Cluster) -> list[str]:
    """Every ConfigMap and Secret a pod mounts exists (with the keys it picks), and every file a command names."""
    problems = []
    for pod in cluster.pods():
        volumes = {volume["name"] for volume in pod.spec.get("volumes") or []}
        volumes |= {claim["metadata"]["name"] for claim in pod.workload["spec"].get("volumeClaimTemplates") or []}
        for volume in pod.spec.get("volumes") or []:
            for kind, name, items in volume_objects(volume):
                keys = cluster.keys(kind, pod.namespace, name)
                if keys is None:
                    problems.append(f"{pod}: {kind} {name} is neither in the manifests nor made by the operator")
                else:
                    missing = [item["key"] for item in items or [] if item["key"] not in keys]
                    problems += [f"{pod}: {kind} {name} has no key {key}" for key in missing]
        for container in pod.containers(init=True):
            files = mounted(cluster, pod, container)
            problems += [
                f"{pod} {container['name']}: volumeMount {mount['name']} names no volume"
                for mount in container.get("volumeMounts") or []
                if mount["name"] not in volumes
            ]
            words = argv(container)
            for flag in FILE_FLAGS:
                problems += [
                    f"{pod} {container['name']}: {flag} {path} is not a mounted file"
                    for path in flag_values(words, flag)
                    if files.get(path, ("emptyDir",))[0] == "emptyDir"
                ]
            for path in flag_values(words, "--data"):
                writable = [base for base, backing in files.items() if backing == ("emptyDir",)]
                if not any(path == base or path.startswith(f"{base}/") for base in writable):
                    problems.append(f"{pod} {container['name']}: --data {path} is on no writable volume")
    return problems


def listen_problems(cluster: Cluster) -> list[str]:
    problems = []
    for pod, container, words in cluster.programs("meshgate") + cluster.programs("python"):
        try:
            listening = listeners(cluster, pod, container)
        except ConfigError as err:
            problems.append(f"{pod}: {err}")
            continue
        declared = {port.get("name"): port["containerPort"] for port in container.get("ports") or []}
        if {name: port for name, (_, port) in listening.items()} != declared:
            problems.append(f"{pod}: listens on {listening}, but its container ports are {declared}")
        problems += [
            f"{pod}: {name} listens on {host}, not on every address"
            for name, (host, _) in listening.items()
            if not is_wildcard(host)
        ]
        for advertise in flag_values(words, "--advertise"):
            if host_port(advertise)[1] != listening.get("inbound", ("", 0))[1]:
                problems.append(f"{pod}: --advertise {advertise} is not the inbound listener's port")
    return problems


def reference_problems(cluster: Cluster) -> list[str]:
    problems = []
    scraped: set[Pod] = set()
    sans = {san for _, _, words in cluster.programs("meshgate", "dashboard") for san in flag_values(words, "--san")}
    for reference in references(cluster):
        endpoints, wrong = reach(cluster, reference)
        problems += wrong
        for endpoint in endpoints:
            target = endpoint.pod.labels.get("meshgate.io/gateway")
            if reference.what == "--gateway" and target != reference.pod.labels.get("meshgate.io/group"):
                problems.append(f"{reference.pod}: --gateway reaches group {target}'s gateway, not its own group's")
            if reference.what == "--control" and reference.host not in sans:
                problems.append(f"{reference.pod}: --control {reference.host} is not among the dashboard's --san")
            if reference.what == "dns_sd_configs":
                scraped.add(endpoint.pod)
    for pod in cluster.pods():
        if pod.port("metrics") is not None and pod not in scraped:
            problems.append(f"{pod}: has a metrics port that Prometheus does not scrape")
    return problems


def annotation_problems(cluster: Cluster) -> list[str]:
    """The pods' prometheus.io/* annotations, for operators' own Prometheus, name the metrics listener."""
    problems = []
    for pod, container, _ in cluster.programs("meshgate", "gateway"):
        metrics = listeners(cluster, pod, container).get("metrics")
        port = str(metrics[1]) if metrics else "(no metrics listener)"
        wanted = {"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}
        annotations = pod.template["metadata"].get("annotations") or {}
        if {key: annotations.get(key) for key in wanted} != wanted:
            problems.append(f"{pod}: annotations {annotations}, expected {wanted}")
    return problems


def mesh_problems(cluster: Cluster) -> list[str]:
    mesh = cluster.mesh()
    groups = {name for name, _ in mesh.groups}
    problems = [
        f"gateway --group {group} is no group in mesh.yaml" for group in cluster.groups() if group not in groups
    ]
    problems += [f"mesh.yaml group {group} has no gateway" for group in sorted(groups - set(cluster.groups()))]
    for service in mesh.services:
        problems += [f"mesh.yaml {service.name}.{s.name}: expected a dns: subset" for s in service.subsets if not s.dns]
    for reference in mesh_references(cluster):
        if not reference.host.endswith(f".{CLUSTER_DOMAIN}"):
            problems.append(f"{reference.what}: {reference.host} is not a full NAME.NAMESPACE.{CLUSTER_DOMAIN}")
        endpoints, wrong = reach(cluster, reference)
        problems += wrong
        owner = reference.pod.labels["meshgate.io/gateway"]
        problems += [
            f"{reference.what}: names {endpoint.pod}, an app of group {endpoint.pod.labels.get('meshgate.io/group')}"
            f", but group {owner} owns the service"
            for endpoint in endpoints
            if endpoint.pod.labels.get("meshgate.io/group") != owner
        ]
    return problems


def network_problems(cluster: Cluster) -> list[str]:
    problems = []
    pods = cluster.pods()
    for policy in cluster.of("NetworkPolicy"):
        selected = cluster.selected(namespace_of(policy), policy["spec"]["podSelector"])
        if not selected:
            problems.append(f"{describe(policy)}: selects no pods")
        for rule in policy["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                if not any(peer_selects(cluster, peer, namespace_of(policy), pod) for pod in pods):
                    problems.append(f"{describe(policy)}: a rule admits {peer}, which selects no pods")
            for entry in rule.get("ports") or []:
                problems += [
                    f"{describe(policy)}: {pod} has no port {entry['port']}"
                    for pod in selected
                    if pod.port(entry["port"]) is None
                ]
    needed = flows(cluster)
    problems += [
        f"{source} cannot reach {end.pod} {end.port} ({why})"
        for source, end, why in needed
        if not allowed(cluster, source, end)
    ]
    guarded = {end for _, end, _ in needed if end.port not in OPEN_PORTS}
    for end in sorted(guarded, key=str):  # a port behind a policy admits only those that connect to it
        if ingress_policies(cluster, end.pod):
            admitted = {source for source in [*pods, OUTSIDE] if allowed(cluster, source, end)}
            extra = admitted - {source for source, other, _ in needed if other == end}
            problems += [f"{end.pod} {end.port} admits {source}, which has no reason to connect" for source in extra]
    return problems


def security_problems(cluster: Cluster) -> list[str]:
    """The restricted Pod Security Standard (the namespaces enforce it), plus read-only root filesystems."""
    problems = []
    for pod in cluster.pods():
        spec = pod.spec
        problems += [f"{pod}: {key}" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
        problems += [
            f"{pod}: volume {volume['name']} is of a kind the restricted policy forbids"
            for volume in spec.get("volumes") or []
            if not volume.keys() - {"name"} <= RESTRICTED_VOLUMES
        ]
        for container in pod.containers(init=True):
            context = {**(spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
            wanted = {
                "runAsNonRoot": True,
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            }
            problems += [
                f"{pod} {container['name']}: securityContext {key} is {context.get(key)!r}, expected {value!r}"
                for key, value in wanted.items()
                if context.get(key) != value
            ]
            if context.get("runAsUser") == 0 or context.get("privileged"):
                problems.append(f"{pod} {container['name']}: runs as root or privileged")
    return problems


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def image_problems(cluster: Cluster) -> list[str]:
    """meshgate images carry the project's version, others a pinned tag."""
    problems = []
    for pod in cluster.pods():
        for container in pod.containers(init=True):
            name, _, tag = container["image"].rpartition(":")
            if name == "meshgate" and tag != project_version():
                problems.append(
                    f"{pod} {container['name']}: {container['image']}, expected meshgate:{project_version()}"
                )
            if not re.fullmatch(r"v?\d+\.\d+\.\d+", tag):
                problems.append(f"{pod} {container['name']}: {container['image']} is not pinned to a release")
    return problems


CHECKS = [
    schema_problems,
    selector_problems,
    port_problems,
    volume_problems,
    listen_problems,
    reference_problems,
    annotation_problems,
    mesh_problems,
    network_problems,
    security_problems,
    image_problems,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_manifests_pass_the_check(cluster: Cluster, check: Callable[[Cluster], list[str]]) -> None:
    assert check(cluster) == []


def obj(cluster: Cluster, kind: str, namespace: str, name: str) -> Any:
    found = cluster.get(kind, namespace, name)
    assert found is not None, f"{kind}/{namespace}/{name}"
    return found


def container(cluster: Cluster, kind: str, namespace: str, name: str) -> Any:
    """The workload's first container itself, for a test to change."""
    return obj(cluster, kind, namespace, name)["spec"]["template"]["spec"]["containers"][0]


def edit_arg(workload: str, old: str, new: str) -> Callable[[Cluster], None]:
    """A change of one argument of a workload's (first) container."""

    def edit(cluster: Cluster) -> None:
        [pod] = [pod for pod in cluster.pods() if pod.name == workload]
        args = pod.workload["spec"]["template"]["spec"]["containers"][0]["args"]
        args[args.index(old)] = new

    return edit


def edit_file(namespace: str, configmap: str, old: str, new: str) -> Callable[[Cluster], None]:
    """A change of a generated ConfigMap's one file."""

    def edit(cluster: Cluster) -> None:
        data = obj(cluster, "ConfigMap", namespace, configmap)["data"]
        [key] = data
        assert old in data[key]
        data[key] = data[key].replace(old, new)

    return edit


def unknown_field(cluster: Cluster) -> None:
    container(cluster, "Deployment", "shop", "meshgate-gateway-catalog")["readinesProbe"] = {}


def select_nothing(cluster: Cluster) -> None:
    obj(cluster, "Service", "shop", "catalog-v2")["spec"]["selector"]["app.kubernetes.io/version"] = "v3"


def rename_port(cluster: Cluster) -> None:
    container(cluster, "Deployment", "shop", "meshgate-gateway-shop")["ports"][1]["name"] = "out"


def missing_configmap(cluster: Cluster) -> None:
    volumes = obj(cluster, "Deployment", "meshgate", "meshgate-dashboard")["spec"]["template"]["spec"]["volumes"]
    [volume] = [volume for volume in volumes if volume["name"] == "mesh"]
    volume["configMap"]["name"] = "meshgate-mesh-v2"


def scrape_admin(cluster: Cluster) -> None:
    template = obj(cluster, "Deployment", "shop", "meshgate-gateway-shop")["spec"]["template"]
    template["metadata"]["annotations"]["prometheus.io/port"] = "15000"


def open_outbound(cluster: Cluster) -> None:
    obj(cluster, "NetworkPolicy", "shop", "meshgate-gateway-catalog")["spec"]["ingress"][0].pop("from")


def close_inventory(cluster: Cluster) -> None:
    [peer] = obj(cluster, "NetworkPolicy", "shop", "apps-inventory")["spec"]["ingress"][0]["from"]
    peer["podSelector"]["matchLabels"]["meshgate.io/gateway"] = "catalog"


def escalate(cluster: Cluster) -> None:
    container(cluster, "Deployment", "meshgate", "meshgate-dashboard")["securityContext"].pop(
        "allowPrivilegeEscalation"
    )


def latest(cluster: Cluster) -> None:
    container(cluster, "Deployment", "shop", "traffic")["image"] = "meshgate:latest"


CONTROL = "--control=https://meshgate-dashboard.meshgate.svc:9000"
BREAKS = [
    (schema_problems, unknown_field, "'readinesProbe' was unexpected"),
    (selector_problems, select_nothing, "Service/shop/catalog-v2: its selector selects no pods"),
    (port_problems, rename_port, "targetPort outbound is no port of Deployment/shop/meshgate-gateway-shop"),
    (volume_problems, missing_configmap, "ConfigMap meshgate-mesh-v2 is neither in the manifests"),
    (
        volume_problems,
        edit_arg("meshgate-gateway-payments", "--ca=/etc/meshgate/ca/ca.pem", "--ca=/etc/meshgate/ca.pem"),
        "--ca /etc/meshgate/ca.pem is not a mounted file",
    ),
    (
        listen_problems,
        edit_file("shop", "meshgate-gateway", "outbound: 0.0.0.0:15001", "outbound: 0.0.0.0:15002"),
        "Deployment/shop/meshgate-gateway-catalog: listens on",
    ),
    (
        reference_problems,
        edit_arg("meshgate-gateway-inventory", CONTROL, CONTROL.replace("9000", "9443")),
        "Service/meshgate/meshgate-dashboard has no port 9443",
    ),
    (
        reference_problems,
        edit_arg(
            "payments",
            "--gateway=http://meshgate-gateway-payments:15001",
            "--gateway=http://meshgate-gateway-shop:15001",
        ),
        "--gateway reaches group shop's gateway, not its own group's",
    ),
    (annotation_problems, scrape_admin, "Deployment/shop/meshgate-gateway-shop: annotations"),
    (
        mesh_problems,
        edit_file(
            "meshgate",
            "meshgate-mesh",
            "catalog-v2.shop.svc.cluster.local:8080",
            "catalog-v2.shop.svc.cluster.local:8081",
        ),
        "Service/shop/catalog-v2 has no port 8081",
    ),
    (
        mesh_problems,
        edit_arg("meshgate-gateway-inventory", "--group=inventory", "--group=stock"),
        "gateway --group stock is no group in mesh.yaml",
    ),
    (network_problems, open_outbound, "meshgate-gateway-catalog outbound admits Deployment/shop/storefront"),
    (
        network_problems,
        close_inventory,
        "Deployment/shop/meshgate-gateway-inventory cannot reach Deployment/shop/inventory",
    ),
    (security_problems, escalate, "dashboard: securityContext allowPrivilegeEscalation is None"),
    (image_problems, latest, "traffic: meshgate:latest, expected meshgate:"),
]


@pytest.mark.parametrize(
    ("check", "breaks", "expected"), BREAKS, ids=[f"{check.__name__}-{n}" for n, (check, _, _) in enumerate(BREAKS)]
)
def test_the_check_catches_a_broken_copy(
    cluster: Cluster, check: Callable[[Cluster], list[str]], breaks: Callable[[Cluster], None], expected: str
) -> None:
    breaks(cluster)
    problems = check(cluster)
    assert any(expected in problem for problem in problems), problems


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        path.name for path in DEPLOY.glob("*.yaml") if path.name != "kustomization.yaml"
    )
    assert set(loaded().sources.values()) == set((DEPLOY / "config").iterdir())
    [image] = kustomization["images"]
    assert (image["name"], str(image["newTag"])) == ("meshgate", project_version())
    # The objects the operator makes are listed in its header, where someone reading the manifests looks.
    listed = re.findall(r"^#\s+(Secret|ConfigMap)\s+(\S+)/(\S+)\s", (DEPLOY / "kustomization.yaml").read_text(), re.M)
    made = {
        (kind, space, re.sub(r"^meshgate-join-.*", "meshgate-join-<group>", name))
        for kind, space, name in operator_created(loaded().groups())
    }
    assert set(listed) == made


def test_the_pieces_the_issue_asks_for_are_there() -> None:
    names = {describe(item) for item in loaded().objects}
    assert {"Namespace/-/meshgate", "Namespace/-/shop", "StatefulSet/meshgate/meshgate-etcd"} <= names
    assert {"Deployment/meshgate/meshgate-dashboard", "PodDisruptionBudget/meshgate/meshgate-dashboard"} <= names
    assert loaded().groups() == ["shop", "catalog", "inventory", "payments"]
    for group in loaded().groups():
        assert {f"{kind}/shop/meshgate-gateway-{group}" for kind in ("Deployment", "Service", "NetworkPolicy")} <= names


def meshgate_commands() -> list[Any]:
    return [
        pytest.param(pod, container, id=f"{pod.namespace}/{pod.name}/{container['name']}")
        for pod, container, words in loaded().commands()
        if words[:1] in (["meshgate"], ["python"])
    ]


@pytest.mark.parametrize(("pod", "container"), meshgate_commands())
def test_every_meshgate_command_line_passes_check(pod: Pod, container: dict[str, Any], tmp_path: Path) -> None:
    check_command(argv(container), host_mounts(loaded(), pod, container, tmp_path))


def test_a_command_line_the_cli_refuses_fails_the_check(cluster: Cluster, tmp_path: Path) -> None:
    [(pod, container, _)] = [
        found for found in cluster.programs("meshgate", "gateway") if found[0].name.endswith("-shop")
    ]
    container["args"][container["args"].index("--group=shop")] = "--group=Shop"  # not a group name
    with pytest.raises(pytest.fail.Exception, match="exit 2"):
        check_command(argv(container), host_mounts(cluster, pod, container, tmp_path))


def test_only_the_ca_copy_is_no_meshgate_command() -> None:
    others = [
        f"{pod.name}/{container['name']}"
        for pod, container, words in loaded().commands()
        if container["image"].startswith("meshgate:") and words[:1] not in (["meshgate"], ["python"])
    ]
    assert others == ["meshgate-dashboard/ca"]


def promtool(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def test_prometheus_config_passes_promtool_and_scrapes_as_the_dashboard_expects(tmp_path: Path) -> None:
    path = DEPLOY / "config" / "prometheus.yml"
    done = promtool(path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(path.read_text().replace("type: A", "type: CNAME"))
    assert promtool(broken).returncode != 0
    [(_, _, words)] = loaded().programs("meshgate", "dashboard")
    [interval] = [parse_duration(value) for value in flag_values(words, "--prometheus-scrape-interval")] or [
        PROMETHEUS_SCRAPE_INTERVAL
    ]
    assert parse_duration(yaml.safe_load(path.read_text())["global"]["scrape_interval"]) == interval


def test_the_shop_is_the_demo_shop() -> None:
    """The same mesh as `meshgate demo`, but with subsets discovered by DNS, and the same apps and arguments."""
    mesh = loaded().mesh().to_dict()
    demo = Mesh.parse(mesh_document(Ports(19000))).to_dict()
    for document in (mesh, demo):
        for service in document["services"].values():
            service.pop("subsets")
    assert mesh == demo
    apps = {pod.name: words for pod, _, words in loaded().programs("python", "-m", "meshgate.demoapps.shop")}
    assert {app.name for app in APPS} == set(apps)
    for app in APPS:
        words = apps[app.name]
        assert (words[3], flag_value(words, "--version")) == (app.service, app.version)
        extra = [word for word in words[4:] if word.split("=")[0] in ("--latency", "--fail-every")]
        assert extra == [f"{flag}={value}" for flag, value in zip(app.args[::2], app.args[1::2], strict=True)]
