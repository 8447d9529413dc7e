"""A mesh on loopback: a real dashboard, three groups' joined gateways and real upstreams, with certificates from
the dashboard's mesh CA. Calls go app -> own gateway's outbound -> mTLS -> owner's inbound -> upstream."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from dashboard.identity import MeshCA
from gateway import tls
from tests.conftest import Gateway, StartUpstream, metric, raw_request, wait_for, workers_of
from tests.e2e.identities import issue_client_cert
from tests.e2e.mesh import Dashboard, joined_gateway, wait_ready
from tests.e2e.upstream_app import UpstreamServer


@dataclass
class Mesh:
    dashboard: Dashboard
    gateways: dict[str, Gateway]
    upstreams: dict[str, UpstreamServer]
    directory: Path

    def call(
        self, group: str, service: str, path: str = "/echo", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """What an app of `group` does: call `service` through its own gateway's outbound listener."""
        url = self.gateways[group].url("outbound") + path
        return httpx.get(url, headers={"host": service, **(headers or {})}, timeout=10)

    def restart(self, group: str, *extra: str) -> Gateway:
        """Stop and start a gateway on the same ports (peers know it by its advertised address)."""
        old = self.gateways[group]
        old.stop()
        config = yaml.safe_load(old.config_path.read_text())
        config["gateway"]["listen"] = {kind: f"{host}:{port}" for kind, (host, port) in old.addresses.items()}
        old.config_path.write_text(yaml.safe_dump(config))
        gateway = self.gateways[group] = Gateway(old.config_path, [str(arg) for arg in old.proc.args[6:]] + list(extra))  # type: ignore[index]
        return gateway


@pytest.fixture
def mesh(tmp_path: Path, start_upstream: StartUpstream) -> Iterator[Mesh]:
    with running_mesh(tmp_path, start_upstream) as found:
        yield found


@contextlib.contextmanager
def running_mesh(tmp_path: Path, start_upstream: StartUpstream, *dashboard_args: str) -> Iterator[Mesh]:
    upstreams = {name: start_upstream(name) for name in ("store", "v1", "v2", "pay")}
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text(
        yaml.safe_dump(
            {
                "groups": {"shop": ["storefront"], "catalog": ["catalog"], "payments": ["payments"]},
                "services": {
                    "storefront": {"subsets": {"v1": {"endpoints": [upstreams["store"].address]}}},
                    "catalog": {
                        "subsets": {
                            "v1": {"endpoints": [upstreams["v1"].address]},
                            "v2": {"endpoints": [upstreams["v2"].address]},
                        },
                        "routes": [{"name": "default", "split": {"v1": 100, "v2": 0}}],
                    },
                    "payments": {
                        "subsets": {"v1": {"endpoints": [upstreams["pay"].address]}},
                        "authorization": {"allow": ["shop"]},
                    },
                },
            }
        )
    )
    dashboard = Dashboard(tmp_path / "dashboard", "--config", str(mesh_file), "--signals-step", "0.5s", *dashboard_args)
    gateways: dict[str, Gateway] = {}
    try:
        for group in ("shop", "catalog", "payments"):
            gateways[group] = joined_gateway(dashboard, tmp_path, group)
        wait_ready(*gateways.values())
        found = Mesh(dashboard, gateways, upstreams, tmp_path)
        # Every gateway knows every other group's gateways once heartbeats have gone round.
        wait_for(lambda: found.call("shop", "catalog").status_code == 200, 15, what="shop reaches catalog")
        wait_for(lambda: found.call("catalog", "payments").status_code == 403, 15, what="catalog reaches payments")
        yield found
    finally:
        for gateway in gateways.values():
            gateway.stop()
        dashboard.stop()


def test_a_call_to_another_group_crosses_mtls_and_is_counted_once_per_side(mesh: Mesh) -> None:
    answer = mesh.call("shop", "catalog")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-upstream"] == "v1"
    request_id = answer.headers["x-request-id"]
    assert answer.json()["headers"]["x-request-id"] == [request_id]  # the same ID across both hops
    # The owner saw the caller's mesh identity (only mTLS could tell it "shop") and counted as destination.
    owner = dict(reporter="destination", source="shop", destination="catalog", subset="v1", code="200")
    assert metric(mesh.gateways["catalog"], "meshgate_requests_total", **owner) >= 1
    caller = dict(reporter="source", source="shop", destination="catalog", subset="catalog", code="200")
    assert metric(mesh.gateways["shop"], "meshgate_requests_total", **caller) >= 1
    # Both hops are found by the request ID in their gateways' rings, as one trace: caller's span, then owner's.
    (caller_hop,), (owner_hop,) = (
        httpx.get(mesh.gateways[group].url("admin") + f"/requests/{request_id}", timeout=5).json()["hops"]
        for group in ("shop", "catalog")
    )
    assert owner_hop["trace_id"] == caller_hop["trace_id"]
    assert owner_hop["parent_span_id"] == caller_hop["span_id"]


def test_calls_spread_over_the_owning_groups_gateway_replicas_and_http_proxy_works(mesh: Mesh) -> None:
    (mesh.directory / "replica").mkdir()
    second = joined_gateway(mesh.dashboard, mesh.directory / "replica", "catalog")
    try:
        wait_ready(second)
        replicas = (mesh.gateways["catalog"], second)
        owner = dict(reporter="destination", source="shop", destination="catalog")

        def counts() -> list[float]:
            return [metric(gateway, "meshgate_requests_total", **owner) for gateway in replicas]

        before = counts()
        proxy = mesh.gateways["shop"].url("outbound")
        with httpx.Client(proxy=proxy, timeout=10) as client:  # an app with HTTP_PROXY set: absolute-form requests
            wait_for(
                lambda: client.get("http://catalog/echo").status_code == 200 and counts()[1] > before[1],
                15,
                what="the new replica in shop's view",
            )
            answers = [client.get("http://catalog/echo") for _ in range(100)]
        assert {answer.status_code for answer in answers} == {200}
        after = counts()
        assert all(b - a >= 10 for a, b in zip(before, after, strict=True)), (before, after)
    finally:
        second.stop()
    # The certificate's expiry is a metric on every gateway.
    expiry = metric(mesh.gateways["shop"], "meshgate_certificate_expiry_timestamp_seconds")
    assert expiry > time.time() + 3600


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_dashboard_identity_looks_up_hop_records_over_mtls(mesh: Mesh, workers: str) -> None:
    catalog = mesh.restart("catalog", "--workers", workers) if workers != "1" else mesh.gateways["catalog"]
    wait_ready(catalog)
    wait_for(lambda: mesh.call("shop", "catalog").status_code == 200, 10, what="shop reaches catalog")
    ids = [mesh.call("shop", "catalog").headers["x-request-id"] for _ in range(8)]  # spread over the workers
    ca = MeshCA.load_or_create(str(mesh.dashboard.data / "ca"), "meshgate.local")
    key, chain, _ = ca.issue(ca.dashboard_id)
    host, port = catalog.inbound
    served = metric(catalog, "meshgate_requests_total", reporter="destination")
    with httpx.Client(verify=tls.mesh_client_context(chain, key, ca.root_pem), timeout=5) as dashboard:
        for request_id in ids:
            found = dashboard.get(f"https://{host}:{port}/requests/{request_id}")
            assert found.status_code == 200, found.text
            assert [hop["source"] for hop in found.json()["hops"]] == ["shop"]
        assert dashboard.get(f"https://{host}:{port}/config").status_code == 404  # lookups, nothing else
        lookup = dashboard.get(f"https://{host}:{port}/requests/{ids[0]}").headers["x-request-id"]
    # The lookups are not traffic: no series counts them (an `unknown -> unknown` edge on the graph, before) and no
    # hop record was kept for them.
    assert metric(catalog, "meshgate_requests_total", reporter="destination") == served
    with httpx.Client(verify=tls.mesh_client_context(chain, key, ca.root_pem), timeout=5) as dashboard:
        assert dashboard.get(f"https://{host}:{port}/requests/{lookup}").status_code == 404
    # A group's identity is a caller, not the dashboard: its /requests/... is just a path on the service.
    shop_key, csr = tls.new_key_and_csr()
    shop = tls.mesh_client_context(ca.sign_csr(csr, "shop").chain_pem, shop_key, ca.root_pem)
    with httpx.Client(verify=shop, timeout=5) as caller:
        proxied = caller.get(f"https://{host}:{port}/requests/{ids[0]}", headers={"host": "catalog"})
    assert proxied.headers["x-upstream"] in ("v1", "v2")


def test_sampled_hops_are_exported_to_the_dashboard_by_default(mesh: Mesh) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    sampled = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}  # the caller sampled it: every hop exports
    answer = mesh.call("shop", "catalog", headers=sampled)
    assert answer.status_code == 200
    request_id = answer.headers["x-request-id"]
    with mesh.dashboard.api() as api:

        def stored() -> list[dict[str, object]] | None:
            found = api.get("/traces", params={"request_id": request_id})
            spans = found.json().get("spans", []) if found.status_code == 200 else []
            in_store = [span for span in spans if "store" in span["found_in"]]
            return in_store if len(in_store) == 2 else None

        spans = wait_for(stored, 10, what="both hops' spans in the dashboard's span store")
    assert {span["trace_id"] for span in spans} == {trace_id}


def test_inbound_serves_only_its_own_groups_services(mesh: Mesh) -> None:
    """A gateway is not a relay: catalog's inbound does not forward to payments, even for a mesh peer."""
    wanted = httpx.get(mesh.gateways["catalog"].url("outbound") + "/echo", headers={"host": "payments"}, timeout=5)
    assert wanted.status_code == 403  # catalog may not call payments at all: its authorization says shop only
    local = httpx.get(mesh.gateways["shop"].url("outbound") + "/echo", headers={"host": "storefront"}, timeout=5)
    assert local.status_code == 200 and local.headers["x-upstream"] == "store"


def test_authorization_denies_other_groups_with_a_reason_and_counts_it(mesh: Mesh) -> None:
    allowed = mesh.call("shop", "payments")
    assert allowed.status_code == 200 and allowed.headers["x-upstream"] == "pay"
    denied = mesh.call("catalog", "payments")
    assert denied.status_code == 403
    assert "'catalog' may not call service 'payments'" in denied.text
    labels = dict(reporter="destination", source="catalog", destination="payments", code="403")
    assert metric(mesh.gateways["payments"], "meshgate_requests_total", **labels) >= 1


def test_a_weight_change_through_the_api_moves_real_traffic_within_a_second(mesh: Mesh) -> None:
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                answer = client.get(mesh.gateways["shop"].url("outbound") + "/echo", headers={"host": "catalog"})
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code} {answer.text}")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        with mesh.dashboard.api() as api:
            changed = api.put("/services/catalog/weights", json={"weights": {"v1": 0, "v2": 100}, "reason": "canary"})
            assert changed.status_code == 200, changed.text
            started = time.monotonic()
        wait_for(lambda: mesh.call("shop", "catalog").headers["x-upstream"] == "v2", 1.0, 0.01, "traffic on v2")
        took = time.monotonic() - started
        assert all(mesh.call("shop", "catalog").headers["x-upstream"] == "v2" for _ in range(20))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert took < 1.0
    # Reverting to the first version is one call, and a new version that traffic follows too.
    with mesh.dashboard.api() as api:
        reverted = api.post("/config/revert", json={"version": 1, "reason": "roll back"})
        assert reverted.status_code == 200, reverted.text
        assert reverted.json()["version"] == changed.json()["version"] + 1
    wait_for(lambda: mesh.call("shop", "catalog").headers["x-upstream"] == "v1", 1.0, 0.01, "traffic back on v1")


def test_gateways_keep_serving_while_the_dashboard_is_down_and_resync_after(mesh: Mesh) -> None:
    with mesh.dashboard.api() as api:
        before = api.get("/config").json()["version"]
    mesh.dashboard.kill()
    statuses = [mesh.call("shop", "catalog").status_code for _ in range(100)]
    assert statuses == [200] * 100
    # A gateway restarted while the dashboard is away serves its cached config.
    catalog = mesh.restart("catalog")
    wait_ready(catalog)
    statuses = [mesh.call("shop", "catalog").status_code for _ in range(50)]
    assert statuses == [200] * 50
    mesh.dashboard.restart()
    with mesh.dashboard.api() as api:
        assert api.get("/config").json()["version"] == before
        changed = api.put("/services/catalog/weights", json={"weights": {"v2": 100}})
        assert changed.status_code == 200, changed.text
    wait_for(lambda: mesh.call("shop", "catalog").headers["x-upstream"] == "v2", 15, what="resync after restart")


def sync_answers(dashboard: Dashboard, code: str) -> float:
    """How many /sync long-polls the dashboard has answered with `code` (304: a quiet spell), from its /metrics."""
    text = httpx.get(dashboard.url + "/metrics", timeout=5, trust_env=False).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "meshgate_dashboard_request_duration_seconds_count"
        and sample.labels.get("route") == "/api/v1/sync"
        and sample.labels.get("code") == code
    )


def weights_land(mesh: Mesh, weights: dict[str, int], subset: str) -> float:
    """Seconds from the dashboard acknowledging a change of catalog's weights to shop's calls following it."""
    with mesh.dashboard.api() as api:
        changed = api.put("/services/catalog/weights", json={"weights": weights, "reason": "test"})
        acknowledged = time.monotonic()
    assert changed.status_code == 200, changed.text
    wait_for(lambda: mesh.call("shop", "catalog").headers["x-upstream"] == subset, 10, 0.01, f"traffic on {subset}")
    return time.monotonic() - acknowledged


def test_quiet_long_polls_are_no_outage_so_the_change_after_them_lands_within_a_second(
    tmp_path: Path, start_upstream: StartUpstream
) -> None:
    """The dashboard holds long-polls 0.1 s here (`--sync-hold`), so 20 quiet spells per gateway take two seconds
    instead of ten minutes. Each 304 is the normal answer: nothing logged, nothing backed off, and the change that
    ends the quiet reaches traffic within a second."""
    with running_mesh(tmp_path, start_upstream, "--sync-hold", "0.1s") as mesh:
        quiet = sync_answers(mesh.dashboard, "304") + 20 * len(mesh.gateways)
        wait_for(lambda: sync_answers(mesh.dashboard, "304") >= quiet, 15, 0.05, "20 quiet long-polls per gateway")
        took = weights_land(mesh, {"v1": 0, "v2": 100}, "v2")
        logs = {group: gateway.output() for group, gateway in mesh.gateways.items()}
    assert took < 1.0, took
    for group, output in logs.items():
        assert " WARNING meshgate.control" not in output and "unavailable" not in output, f"{group}:\n{output}"


OUTAGE = 4.0  # seconds the dashboard is away: long enough that the old backoff had grown to seconds


def test_after_a_dashboard_restart_gateways_are_back_within_a_second_and_so_is_the_first_change(mesh: Mesh) -> None:
    killed = time.monotonic()
    mesh.dashboard.kill()
    for gateway in mesh.gateways.values():
        gateway.wait_log("control server unavailable")  # the long-poll broke
    time.sleep(max(0.0, killed + OUTAGE - time.monotonic()))  # the outage itself, not a synchronisation
    mesh.dashboard.restart()
    down = time.monotonic() - killed  # until the dashboard logged "listening"
    took = weights_land(mesh, {"v1": 0, "v2": 100}, "v2")  # made at once: it may reach gateways not yet back
    outages = {}
    for group, gateway in mesh.gateways.items():
        gateway.wait_log("control server reachable again after")
        found = re.search(r"control server reachable again after ([0-9.]+)s", gateway.output())
        assert found is not None
        outages[group] = float(found[1])  # from the long-poll breaking to the first answer after the restart
    assert took < 1.0, took
    # Probes every 0.5 s (±50 %) during a young outage: each gateway is back within about a second of "listening".
    assert all(outage - down < 1.0 for outage in outages.values()), (down, outages)


def test_a_joined_gateway_with_workers_joins_once_and_every_worker_serves_mtls(mesh: Mesh) -> None:
    catalog = mesh.restart("catalog", "--workers", "2")
    wait_ready(catalog)
    assert len(workers_of(catalog)) == 2
    answers = [mesh.call("shop", "catalog") for _ in range(60)]
    assert [answer.status_code for answer in answers] == [200] * 60
    # Workers push their counts to the supervisor every second; all 60 calls were counted with source "shop".
    owner = dict(reporter="destination", source="shop", destination="catalog", code="200")
    wait_for(lambda: metric(catalog, "meshgate_requests_total", **owner) >= 60, 5, what="60 counted calls")
    with mesh.dashboard.api() as api:
        version = api.put("/services/catalog/weights", json={"weights": {"v2": 100}}).json()["version"]
        wait_for(lambda: mesh.call("shop", "catalog").headers["x-upstream"] == "v2", 2, what="both workers on v2")
        assert all(mesh.call("shop", "catalog").headers["x-upstream"] == "v2" for _ in range(20))

        def catalog_gateways() -> list[dict[str, object]] | None:
            listed = [g for g in api.get("/gateways").json() if g["group"] == "catalog" and not g["stale"]]
            return listed if listed and listed[0]["config_version"] == version else None

        # One heartbeat for the whole gateway (the supervisor), not one per worker.
        assert len(wait_for(catalog_gateways, 10, what="catalog heartbeat at the new version")) == 1


def test_topology_and_service_signals_come_from_live_traffic(mesh: Mesh) -> None:
    for _ in range(30):
        assert mesh.call("shop", "catalog").status_code == 200
    assert mesh.call("catalog", "payments").status_code == 403
    with mesh.dashboard.api() as api:

        def edges() -> dict[tuple[str, str], dict[str, object]] | None:
            found = {(e["source"], e["destination"]): e for e in api.get("/topology?window=5m").json()["edges"]}
            ready = ("group:shop", "service:catalog") in found and ("group:catalog", "service:payments") in found
            return found if ready else None

        found = wait_for(edges, 15, what="both edges on the topology")
        catalog = found[("group:shop", "service:catalog")]
        assert float(catalog["rps"]) > 0 and catalog["error_rate"] == 0 and catalog["mtls"] is True
        assert float(catalog["p99_ms"]) > 0
        assert found[("group:catalog", "service:payments")]["denied"]  # the refused call shows on the topology
        services = {s["name"]: s for s in api.get("/services").json()["services"]}
        assert services["catalog"]["signals"]["rps"] > 0
        assert services["catalog"]["signals"]["subsets"]["v1"]["rps"] > 0


def test_the_api_lists_every_gateway_in_sync_with_its_certificate(mesh: Mesh) -> None:
    with mesh.dashboard.api() as api:
        version = api.get("/config").json()["version"]

        def listed() -> list[dict[str, object]] | None:
            gateways = api.get("/gateways").json()
            ok = len(gateways) == 3 and all(g["in_sync"] and g["config_version"] == version for g in gateways)
            return gateways if ok else None

        gateways = wait_for(listed, 10, what="three gateways in sync")
    assert {g["group"] for g in gateways} == {"shop", "catalog", "payments"}
    for gateway in gateways:
        assert float(gateway["cert_not_after"]) > time.time() + 3600


@pytest.mark.slow  # 15 s; the default run has the renewal schedule's unit tests, and test_soak.py this again
def test_certificates_rotate_under_load_without_a_failed_request(tmp_path: Path, start_upstream: StartUpstream) -> None:
    """Ten-second certificates (the shortest `--cert-lifetime`) renew at about half the life they had when they
    came: a rotation every 5 s or so on every gateway during the load, not a loop (the CA backdates notBefore by
    5 minutes: counted from there, they were spent on arrival). Rotations go into live SSL contexts: connections
    open before one keep working, and new handshakes get the new cert."""
    with running_mesh(tmp_path, start_upstream, "--cert-lifetime", "10s") as mesh:
        first = {group: gw.output().count("mesh identity") for group, gw in mesh.gateways.items()}
        started = time.monotonic()
        ca = MeshCA.load_or_create(str(mesh.dashboard.data / "ca"), "meshgate.local")
        key, csr = tls.new_key_and_csr()
        probe = _client(ca.sign_csr(csr, "shop").chain_pem, key)
        statuses: list[int] = []
        served: set[int] = set()  # serial numbers the catalog gateway's inbound presented to new handshakes
        deadline = started + 12
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                url = mesh.gateways["shop"].url("outbound") + "/echo"
                statuses.append(client.get(url, headers={"host": "catalog"}).status_code)
                statuses.append(client.get(url, headers={"host": "payments"}).status_code)
                if len(statuses) % 50 == 0:
                    served.add(_served_serial(mesh.gateways["catalog"].inbound, probe))
        renewals = {group: gw.output().count("mesh identity") - first[group] for group, gw in mesh.gateways.items()}
        elapsed = time.monotonic() - started
    assert set(statuses) == {200}, {status: statuses.count(status) for status in set(statuses)}
    assert len(statuses) > 200
    # At 5 s ±10 % apart: two in 12 s at least, and no more than the window holds.
    assert all(2 <= count <= elapsed / 4.5 + 1 for count in renewals.values()), (renewals, elapsed)
    assert len(served) >= 2, served


def _served_serial(address: tuple[str, int], context: ssl.SSLContext) -> int:
    """A new handshake: the serial number of the certificate the server presents (and its request succeeds)."""
    with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw) as conn:
        conn.sendall(b"GET /echo HTTP/1.1\r\nhost: catalog\r\n\r\n")
        assert conn.recv(1024).startswith(b"HTTP/1.1 200")
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# The inbound mesh port refuses what is not a mesh peer.


def _handshake(address: tuple[str, int], context: ssl.SSLContext) -> str:
    """Open TLS and send a request; the server's answer, or "refused" with why.

    In TLS 1.3 the server checks the client's certificate after the client thinks the handshake is done, so a
    refusal shows up as an alert or a close on the first read.
    """
    try:
        with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw) as conn:
            conn.sendall(b"GET /echo HTTP/1.1\r\nhost: catalog\r\n\r\n")
            data = conn.recv(1024)
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"
    return data.decode(errors="replace") if data else "refused: closed without an answer"


def _client(cert: bytes | None = None, key: bytes | None = None, ca: bytes | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test judges the server's verdict on us, not the other way round
    if cert is not None and key is not None:
        with tempfile.TemporaryDirectory() as directory:
            Path(directory, "c.pem").write_bytes(cert)
            Path(directory, "k.pem").write_bytes(key)
            context.load_cert_chain(Path(directory, "c.pem"), Path(directory, "k.pem"))
    return context


def test_inbound_refuses_peers_without_a_mesh_certificate(mesh: Mesh) -> None:
    inbound = mesh.gateways["catalog"].inbound
    ca = MeshCA.load_or_create(str(mesh.dashboard.data / "ca"), "meshgate.local")
    key, csr = tls.new_key_and_csr()
    good = ca.sign_csr(csr, "shop")
    assert _handshake(inbound, _client(good.chain_pem, key)).startswith("HTTP/1.1 200")  # the control case

    assert _handshake(inbound, _client()).startswith("refused")  # no certificate
    expired = ca.sign_csr(csr, "shop", lifetime=3600, now=time.time() - 7200)
    assert _handshake(inbound, _client(expired.chain_pem, key)).startswith("refused")
    cert, key_file = issue_client_cert(trustme.CA(), "spiffe://meshgate.local/group/shop", mesh.directory)
    assert _handshake(inbound, _client(cert.read_bytes(), key_file.read_bytes())).startswith("refused")
    plain = raw_request(inbound, b"GET /echo HTTP/1.1\r\nhost: catalog\r\n\r\n")
    assert not plain.startswith(b"HTTP/"), plain  # plaintext gets no answer from the mesh port
