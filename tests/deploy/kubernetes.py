"""deploy/kubernetes/ as the objects `kubectl apply -k deploy/kubernetes` creates, read offline for the checks in
test_kubernetes.py.

`load()` reads the kustomization's resources and builds the ConfigMaps its generator makes from config/, under the
names they have before kustomize appends a content hash (it writes the hash into every reference too), and
remembers each generated file's source. On top of the plain objects:

- `Pod`: a workload's pod template; `argv` its containers' command lines as the kubelet expands them; `mounted`
  the files a container sees, each backed by a ConfigMap or Secret key (or an emptyDir);
- `Reference`: an address a command line or config file names, `reach` the container ports it gets to through
  the Service its DNS name means (`service_of`);
- `flows`: every connection the deployment needs, and `allowed` whether the NetworkPolicies let it through.

    cluster = load()
    [(pod, container, words)] = cluster.programs("meshgate", "dashboard")
    cluster.file_text(pod, container, flag_value(words, "--config"))   # mesh.yaml's text
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dashboard.mesh import Mesh
from gateway.config import Config
from gateway.units import is_loopback
from tests.deploy.commands import flag_value, flag_values, host_port, url_host_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
CLUSTER_DOMAIN = "svc.cluster.local"
DOWNWARD_API = {"status.podIP": "10.244.1.7", "metadata.name": "pod-0"}  # stand-ins for what the kubelet fills in
LISTENERS = ("inbound", "edge", "outbound", "admin", "metrics")
# What each flag or config key names: the name of the container port it must land on.
LANDS_ON = {
    "--control": "https",
    "--store": "client",
    "--prometheus": "http",
    "--jaeger": "query",
    "--gateway": "outbound",
    "--otlp": "otlp-http",
    "--url": "edge",
    "tracing.endpoint": "otlp-http",
    "dns_sd_configs": "metrics",
}


def operator_created(groups: Iterable[str]) -> dict[tuple[str, str, str], set[str]]:
    """(kind, namespace, name) -> keys of the objects the README's steps make: key material stays out of the repo."""
    made = {
        ("Secret", "meshgate", "meshgate-ca"): {"root.pem", "intermediate.pem", "intermediate.key"},
        ("ConfigMap", "shop", "meshgate-ca-root"): {"ca.pem"},
    }
    made.update({("Secret", "shop", f"meshgate-join-{group}"): {"token"} for group in groups})
    return made


@dataclass(frozen=True)
class Pod:
    """A workload's pod template, named after the workload."""

    kind: str
    namespace: str
    name: str
    workload: dict[str, Any] = field(compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"

    @property
    def template(self) -> dict[str, Any]:
        template: dict[str, Any] = self.workload["spec"]["template"]
        return template

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.template["metadata"].get("labels") or {})

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.template["spec"]
        return spec

    def containers(self, init: bool = False) -> list[dict[str, Any]]:
        return [*(self.spec.get("initContainers") or [] if init else []), *self.spec["containers"]]

    def port(self, name_or_number: object) -> tuple[str, int] | None:
        """The container port a Service or NetworkPolicy names: (its name, its number)."""
        for container in self.containers():
            for port in container.get("ports") or []:
                if name_or_number in (port.get("name"), port["containerPort"]):
                    return port.get("name", ""), port["containerPort"]
        return None


# A client beyond the cluster: no NetworkPolicy peer selects it; only a rule without `from` admits it.
OUTSIDE = Pod("Client", "-", "outside", {"spec": {"template": {"metadata": {}, "spec": {"containers": []}}}})


@dataclass(frozen=True)
class Endpoint:
    """A container port of a pod, where a connection lands."""

    pod: Pod
    port: str  # the container port's name
    number: int


@dataclass(frozen=True)
class Reference:
    """An address a pod's command line or config file names, and the kind of port it must reach."""

    pod: Pod
    what: str
    host: str
    port: int
    lands_on: str
    headless: bool = False  # DNS discovery: the name must resolve to pod addresses


@dataclass
class Cluster:
    """The objects, and the files under config/ that the generated ConfigMaps hold."""

    objects: list[dict[str, Any]]
    sources: dict[tuple[str, ...], Path]  # (namespace, ConfigMap, key) -> its file under config/

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] in kinds]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = [obj for obj in self.of(kind) if (namespace_of(obj), obj["metadata"]["name"]) == (namespace, name)]
        return found[0] if found else None

    def pods(self) -> list[Pod]:
        return [
            Pod(obj["kind"], namespace_of(obj), obj["metadata"]["name"], obj)
            for obj in self.of("Deployment", "StatefulSet")
        ]

    def selected(self, namespace: str, selector: Mapping[str, Any]) -> list[Pod]:
        return [pod for pod in self.pods() if pod.namespace == namespace and selects(selector, pod.labels)]

    def keys(self, kind: str, namespace: str, name: str) -> set[str] | None:
        """The keys of a ConfigMap or Secret, from the manifests or the operator's list; None if neither has it."""
        obj = self.get(kind, namespace, name)
        if obj is not None:
            return {key for part in ("data", "binaryData", "stringData") for key in obj.get(part) or {}}
        return operator_created(self.groups()).get((kind, namespace, name))

    def text(self, kind: str, namespace: str, name: str, key: str) -> str | None:
        obj = self.get(kind, namespace, name)
        return None if obj is None or kind != "ConfigMap" else (obj.get("data") or {}).get(key)

    def commands(self) -> list[tuple[Pod, dict[str, Any], list[str]]]:
        return [(pod, container, argv(container)) for pod in self.pods() for container in pod.containers(init=True)]

    def programs(self, *prefix: str) -> list[tuple[Pod, dict[str, Any], list[str]]]:
        return [(pod, c, words) for pod, c, words in self.commands() if tuple(words[: len(prefix)]) == prefix]

    def file_text(self, pod: Pod, container: dict[str, Any], path: str) -> str | None:
        backing = mounted(self, pod, container).get(path)
        return None if backing is None or backing[0] == "emptyDir" else self.text(*backing)

    def mesh(self) -> Mesh:
        """The mesh the dashboard seeds its store with: the file its --config names."""
        [(pod, container, words)] = self.programs("meshgate", "dashboard")
        text = self.file_text(pod, container, flag_value(words, "--config"))
        return Mesh.parse(yaml.safe_load(text or ""), source="mesh.yaml")

    def groups(self) -> list[str]:
        return [flag_value(words, "--group") for _, _, words in self.programs("meshgate", "gateway")]


def namespace_of(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"].get("namespace", ""))


def describe(obj: Mapping[str, Any]) -> str:
    return f"{obj['kind']}/{namespace_of(obj) or '-'}/{obj['metadata']['name']}"


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    assert "matchExpressions" not in selector, "these checks read matchLabels only"
    return all(labels.get(key) == value for key, value in (selector.get("matchLabels") or {}).items())


def argv(container: Mapping[str, Any]) -> list[str]:
    """The container's command line, with $(VAR) expanded from its environment as the kubelet does."""
    env = {
        item["name"]: item["value"] if "value" in item else DOWNWARD_API[item["valueFrom"]["fieldRef"]["fieldPath"]]
        for item in container.get("env") or []
    }
    words = [*container.get("command", []), *container.get("args", [])]
    return [re.sub(r"\$\((\w+)\)", lambda match: env.get(match[1], match[0]), str(word)) for word in words]


Backing = tuple[str, ...]  # ("emptyDir",) or (kind, namespace, name, key)


def volume_objects(volume: Mapping[str, Any]) -> list[tuple[str, str, list[dict[str, str]] | None]]:
    """The ConfigMaps and Secrets a volume (projected or not) shows: (kind, name, the items it picks or None)."""
    found = []
    for source in volume["projected"]["sources"] if "projected" in volume else [volume]:
        for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
            if key in source:
                found.append((kind, source[key].get("name") or source[key]["secretName"], source[key].get("items")))
    return found


def volume_files(cluster: Cluster, namespace: str, volume: Mapping[str, Any]) -> dict[str, Backing]:
    """The files a volume holds: relative path -> (kind, namespace, name, key)."""
    files: dict[str, Backing] = {}
    for kind, name, items in volume_objects(volume):
        picked = items or [{"key": key, "path": key} for key in cluster.keys(kind, namespace, name) or ()]
        files.update({item["path"]: (kind, namespace, name, item["key"]) for item in picked})
    return files


def mounted(cluster: Cluster, pod: Pod, container: Mapping[str, Any]) -> dict[str, Backing]:
    """What a container sees from its volumes: each mounted file, and each emptyDir's directory."""
    volumes = {volume["name"]: volume for volume in pod.spec.get("volumes") or []}
    found: dict[str, Backing] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"], {})
        base = mount["mountPath"].rstrip("/")
        if "emptyDir" in volume:
            found[base] = ("emptyDir",)
        found.update(
            {f"{base}/{path}": backing for path, backing in volume_files(cluster, pod.namespace, volume).items()}
        )
    return found


def load() -> Cluster:
    """The kustomization's resources, and a ConfigMap for each of its configMapGenerator entries."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    objects = [
        doc for name in kustomization["resources"] for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc
    ]
    sources: dict[tuple[str, ...], Path] = {}
    for generator in kustomization.get("configMapGenerator", []):
        namespace, name = generator["namespace"], generator["name"]
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
            sources[(namespace, name, key)] = DEPLOY / path
        data = {key: path.read_text() for (ns, cm, key), path in sources.items() if (ns, cm) == (namespace, name)}
        metadata = {"name": name, "namespace": namespace}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return Cluster(objects, sources)


def listeners(cluster: Cluster, pod: Pod, container: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """What a meshgate program listens on beyond loopback, named as its container ports are: {} for others."""
    words = argv(container)
    found: dict[str, tuple[str, int]] = {}
    if words[:2] == ["meshgate", "gateway"]:
        text = cluster.file_text(pod, container, flag_value(words, "--config"))
        listen = Config.parse(yaml.safe_load(text or ""), source=flag_value(words, "--config")).gateway.listen
        found = {name: (address.host, address.port) for name in LISTENERS if (address := getattr(listen, name))}
    elif words[:2] == ["meshgate", "dashboard"]:
        found = {"https": host_port(flag_value(words, "--listen"))}
    elif words[:3] == ["python", "-m", "meshgate.demoapps.shop"]:
        found = {"http": (flag_value(words, "--host"), int(flag_value(words, "--port")))}
    return {name: address for name, address in found.items() if not is_loopback(address[0])}


def references(cluster: Cluster) -> list[Reference]:
    """The addresses command lines and config files name, with the kind of port each must reach."""
    found = []
    for pod, container, words in cluster.commands():
        for flag in ("--control", "--store", "--prometheus", "--jaeger", "--gateway", "--otlp", "--url"):
            for value in flag_values(words, flag):
                addresses = value.removeprefix("etcd://").split(",") if value.startswith("etcd://") else [value]
                for address in addresses:
                    host, port = host_port(address) if flag == "--store" else url_host_port(address)
                    found.append(Reference(pod, flag, host, port, LANDS_ON[flag]))
        if words[:2] == ["meshgate", "gateway"]:
            text = cluster.file_text(pod, container, flag_value(words, "--config"))
            endpoint = Config.parse(yaml.safe_load(text or "")).gateway.telemetry.tracing.endpoint
            if endpoint:
                found.append(Reference(pod, "tracing.endpoint", *url_host_port(endpoint), LANDS_ON["tracing.endpoint"]))
        for path in flag_values(words, "--config.file"):  # Prometheus
            scrape = yaml.safe_load(cluster.file_text(pod, container, path) or "")
            found += [
                Reference(pod, "dns_sd_configs", name, discovery["port"], "metrics", headless=True)
                for job in scrape["scrape_configs"]
                for discovery in job.get("dns_sd_configs") or []
                for name in discovery["names"]
            ]
    return found


def mesh_references(cluster: Cluster) -> list[Reference]:
    """Each owning group's gateway pods and the `dns:` names of that group's subsets."""
    mesh = cluster.mesh()
    gateways = {flag_value(words, "--group"): pod for pod, _, words in cluster.programs("meshgate", "gateway")}
    found = []
    for service in mesh.services:
        owner = mesh.group_of(service.name)
        for subset in service.subsets:
            if subset.dns is not None and owner in gateways:
                what = f"mesh.yaml services.{service.name}.subsets.{subset.name}.dns"
                found.append(Reference(gateways[owner], what, subset.dns.host, subset.dns.port, "http", headless=True))
    return found


def service_of(cluster: Cluster, host: str, namespace: str) -> dict[str, Any] | None:
    """The Service a DNS name means from a pod in `namespace`: NAME, NAME.NS, NAME.NS.svc or the full name."""
    name, _, rest = host.partition(".")
    space, _, suffix = rest.partition(".")
    if suffix not in ("", "svc", CLUSTER_DOMAIN):
        return None
    return cluster.get("Service", space or namespace, name)


def reach(cluster: Cluster, reference: Reference) -> tuple[list[Endpoint], list[str]]:
    """The container ports a reference reaches through its Service, and what is wrong on the way."""
    where = f"{reference.pod}: {reference.what} {reference.host}:{reference.port}"
    service = service_of(cluster, reference.host, reference.pod.namespace)
    if service is None:
        return [], [f"{where}: no Service has that name"]
    if reference.headless and service["spec"].get("clusterIP") != "None":
        return [], [f"{where}: the Service is not headless, so DNS gives its virtual IP, not the pods"]
    entry = next((entry for entry in service["spec"]["ports"] if entry["port"] == reference.port), None)
    if entry is None:
        return [], [f"{where}: {describe(service)} has no port {reference.port}"]
    endpoints, problems = [], []
    for pod in cluster.selected(namespace_of(service), {"matchLabels": service["spec"]["selector"]}):
        port = pod.port(entry.get("targetPort", entry["port"]))
        if port is None or port[0] != reference.lands_on:
            problems.append(f"{where}: reaches {pod} port {port}, expected its {reference.lands_on} port")
        else:
            endpoints.append(Endpoint(pod, *port))
    return endpoints, problems


def ingress_policies(cluster: Cluster, pod: Pod) -> list[dict[str, Any]]:
    """The NetworkPolicies that limit what may connect to `pod` (none here limits egress)."""
    return [
        policy
        for policy in cluster.of("NetworkPolicy")
        if namespace_of(policy) == pod.namespace
        and selects(policy["spec"]["podSelector"], pod.labels)
        and "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
    ]


def allowed(cluster: Cluster, source: Pod, endpoint: Endpoint) -> bool:
    """Whether the NetworkPolicies let `source` connect to `endpoint`."""
    policies = ingress_policies(cluster, endpoint.pod)
    if not policies:
        return True
    return any(
        admits_port(rule.get("ports"), endpoint) and admits_source(cluster, rule.get("from"), policy, source)
        for policy in policies
        for rule in policy["spec"].get("ingress") or []
    )


def admits_port(ports: list[dict[str, Any]] | None, endpoint: Endpoint) -> bool:
    return not ports or any(entry["port"] in (endpoint.port, endpoint.number) for entry in ports)


def admits_source(cluster: Cluster, peers: list[dict[str, Any]] | None, policy: dict[str, Any], source: Pod) -> bool:
    if not peers:
        return True
    return source is not OUTSIDE and any(peer_selects(cluster, peer, namespace_of(policy), source) for peer in peers)


def peer_selects(cluster: Cluster, peer: Mapping[str, Any], namespace: str, pod: Pod) -> bool:
    if "namespaceSelector" in peer:
        labels = {"kubernetes.io/metadata.name": pod.namespace}  # the label every namespace gets
        labels.update((cluster.get("Namespace", "", pod.namespace) or {"metadata": {}})["metadata"].get("labels") or {})
        in_namespace = selects(peer["namespaceSelector"], labels)
    else:
        in_namespace = pod.namespace == namespace
    return in_namespace and selects(peer.get("podSelector") or {}, pod.labels)


def flows(cluster: Cluster) -> list[tuple[Pod, Endpoint, str]]:
    """Every connection the deployment needs: (source, destination, why)."""
    needed = []
    for reference in references(cluster) + mesh_references(cluster):
        needed += [(reference.pod, endpoint, reference.what) for endpoint in reach(cluster, reference)[0]]
    gateways = [pod for pod, _, _ in cluster.programs("meshgate", "gateway")]
    callers = gateways + [pod for pod, _, _ in cluster.programs("meshgate", "dashboard")]  # request lookup
    for pod in gateways:
        for name, sources, why in (("inbound", callers, "mTLS, request lookup"), ("edge", [OUTSIDE], "clients")):
            port = pod.port(name)
            needed += [(source, Endpoint(pod, *port), why) for source in sources] if port else []
    return needed


def host_mounts(cluster: Cluster, pod: Pod, container: Mapping[str, Any], scratch: Path) -> dict[str, Path]:
    """For `check_command`: each path the container sees, as a host path. A generated ConfigMap's file is its
    source under config/; an object the operator makes gets a stand-in (`--check` reads neither the join token nor
    the CA certificate); an emptyDir, a new directory under `scratch`."""
    mounts = {}
    for path, backing in mounted(cluster, pod, container).items():
        host = scratch / path.strip("/").replace("/", "_")
        if backing == ("emptyDir",):
            host.mkdir()
        elif backing[0] == "ConfigMap" and (source := cluster.sources.get(backing[1:])) is not None:
            host = source
        else:
            host.write_text(cluster.text(*backing) or "made by the operator\n")
        mounts[path] = host
    return mounts
