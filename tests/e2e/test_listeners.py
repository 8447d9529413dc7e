"""End-to-end tests of each listener kind: inbound (plain and mTLS), edge, outbound, admin and metrics.

Every test starts a real `meshgate gateway` process on ephemeral loopback ports in front of a real upstream
(tests/e2e/upstream_app.py). The mTLS tests use real certificates: a trustme CA and server certificate, and client
certificates built with `cryptography` because trustme cannot put a URI SAN (a SPIFFE ID) into a certificate.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.conftest import (
    Gateway,
    StartGateway,
    StartUpstream,
    assert_uuid4,
    gateway_config,
    hello,
    listeners,
    raw_request,
    service,
)
from tests.e2e.identities import issue_client_cert


def client(base_url: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=base_url, trust_env=False, timeout=10.0, **kwargs)


def assert_echoed(response: httpx.Response, path: str, proto: str) -> None:
    """`hello_upstream` answered the request for `path`, which reached it over `proto`."""
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "v1"
    echo = response.json()
    assert echo["path"] == path
    assert echo["headers"]["x-forwarded-proto"] == [proto]


def upstream_request_id(response: httpx.Response) -> str:
    """The one x-request-id the upstream saw (the echo body lists header values)."""
    seen = response.json()["headers"]["x-request-id"]
    assert len(seen) == 1, seen
    return str(seen[0])


# Plain listeners


def test_inbound_plain_proxies_and_replaces_untrusted_request_id(hello_gateway: Gateway) -> None:
    with client(hello_gateway.url("inbound")) as http:
        response = http.get("/echo/in?q=1", headers={"host": "hello", "x-request-id": "client-chosen-id"})
        assert_echoed(response, "/echo/in?q=1", "http")
        assert response.json()["headers"]["host"] == ["hello"]
        # A plain inbound client is not a trusted sender: its ID is replaced by a fresh UUID4, end to end.
        request_id = upstream_request_id(response)
        assert request_id != "client-chosen-id"
        assert_uuid4(request_id)
        assert response.headers["x-request-id"] == request_id

        missing = http.get("/echo", headers={"host": "nosuch"})
        assert missing.status_code == 404
        assert "nosuch" in missing.text
        assert_uuid4(missing.headers["x-request-id"])


def test_edge_listener_marks_source_external_and_keeps_client_request_id(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    upstream = start_upstream("v1")
    services = {
        "public": service(upstream.address, authorization={"allow": ["external"]}),
        "private": service(upstream.address, authorization={"allow": ["shop"]}),
    }
    gw = start_gateway(gateway_config(services, listen=listeners("edge")))
    assert "edge" in gw.addresses
    with client(gw.url("edge")) as http:
        response = http.get("/echo/edge", headers={"host": "public", "x-request-id": "edge-client-7"})
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "edge-client-7"  # preserve_request_id defaults to true
        assert upstream_request_id(response) == "edge-client-7"
        assert response.json()["headers"]["x-forwarded-proto"] == ["http"]

        # A malformed ID is never kept, even on the edge.
        bad = http.get("/echo/edge", headers={"host": "public", "x-request-id": "has spaces and $ signs"})
        assert bad.status_code == 200
        assert_uuid4(bad.headers["x-request-id"])
        assert upstream_request_id(bad) == bad.headers["x-request-id"]

        # The edge's source is `external`: a service allowing only `shop` refuses it, naming that source.
        refused = http.get("/echo/edge", headers={"host": "private"})
        assert refused.status_code == 403
        assert "external" in refused.text
        assert refused.headers["x-request-id"]
    # The same service that lets `external` in refuses a plain inbound caller (source `unknown`).
    with client(gw.url("inbound")) as http:
        assert http.get("/echo", headers={"host": "public"}).status_code == 403


def test_edge_replaces_request_id_when_preserve_is_off(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=listeners("edge"), preserve_request_id=False))
    with client(gw.url("edge")) as http:
        response = http.get("/echo", headers={"host": "hello", "x-request-id": "edge-client-8"})
        assert response.status_code == 200
        assert response.headers["x-request-id"] != "edge-client-8"
        assert_uuid4(response.headers["x-request-id"])
        assert upstream_request_id(response) == response.headers["x-request-id"]


def test_outbound_routes_by_host_and_absolute_form(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    v1, v2 = start_upstream("v1"), start_upstream("v2")
    gw = start_gateway(gateway_config({"alpha": service(v1.address), "beta": service(v2.address)}))
    with client(gw.url("outbound")) as http:
        hosts = [("alpha", "v1"), ("beta", "v2"), ("beta:8080", "v2"), ("alpha.svc.local", "v1"), ("Beta", "v2")]
        for host, name in hosts:
            response = http.get("/echo/h", headers={"host": host, "x-request-id": "app-id-1"})
            assert response.status_code == 200, (host, response.text)
            assert response.headers["x-upstream"] == name
            # The local app is a trusted sender: its request ID is kept.
            assert response.headers["x-request-id"] == "app-id-1"
            assert upstream_request_id(response) == "app-id-1"

    # An app with HTTP_PROXY pointing at the outbound listener sends absolute-form requests.
    with httpx.Client(proxy=gw.url("outbound"), trust_env=False, timeout=10.0) as proxied:
        response = proxied.get("http://beta/echo/abs?x=1")
        assert response.status_code == 200
        assert response.headers["x-upstream"] == "v2"
        assert response.json()["path"] == "/echo/abs?x=1"
        assert response.json()["headers"]["host"] == ["beta"]
        assert proxied.get("http://alpha:9999/echo").headers["x-upstream"] == "v1"

    # The authority in an absolute-form target wins over the Host header (RFC 9112 section 3.2.2), and an empty
    # path becomes "/".
    targets = [(b"http://alpha/echo/raw", "/echo/raw"), (b"http://alpha", "/"), (b"http://alpha?q=2", "/?q=2")]
    for target, path in targets:
        raw = raw_request(
            gw.addresses["outbound"], b"GET %s HTTP/1.1\r\nhost: beta\r\nconnection: close\r\n\r\n" % target
        )
        assert raw.startswith(b"HTTP/1.1 200 "), raw
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"x-upstream: v1" in head
        echo = json.loads(body)
        assert echo["path"] == path
        assert echo["headers"]["host"] == ["alpha"]

    # Absolute-form is an outbound-listener feature only.
    refused = raw_request(gw.inbound, b"GET http://alpha/echo HTTP/1.1\r\nhost: alpha\r\nconnection: close\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 400 ")
    assert b"x-request-id: " in refused.lower()
    assert v1.requests == 6


def test_admin_endpoints(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), group="admintest"))
    with client(gw.url("admin")) as http:
        healthz = http.get("/healthz")
        assert healthz.status_code == 200
        assert http.get("/ready").status_code == 200

        config = http.get("/config")
        assert config.status_code == 200
        assert config.headers["content-type"].startswith("application/json")
        body = config.json()
        assert body["version"] == 1
        assert body["config"]["gateway"]["group"] == "admintest"
        assert body["config"]["services"]["hello"]["subsets"]["v1"]["endpoints"] == [upstream.address]

        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "# TYPE meshgate_config_version gauge" in metrics.text
        assert any(line.split() == ["meshgate_config_version", "1.0"] for line in metrics.text.splitlines())

        post = http.post("/config", content=b"{}")
        assert post.status_code == 405
        unknown = http.get("/nope")
        assert unknown.status_code == 404

        for response in (healthz, config, metrics, post, unknown):
            assert_uuid4(response.headers["x-request-id"], response.request.url)


def test_metrics_listener_serves_only_metrics_and_ready(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), listen=listeners("metrics")))
    assert gw.addresses["metrics"] != gw.addresses["admin"]
    with client(gw.url("metrics")) as http:
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "meshgate_config_version" in metrics.text
        ready = http.get("/ready")  # for probes that cannot reach the loopback admin listener
        assert (ready.status_code, ready.text) == (200, "ready\n")
        for path in ("/config", "/healthz", "/requests/abc"):
            response = http.get(path)
            assert response.status_code == 404, path
            assert "version" not in response.text
            assert response.headers["x-request-id"]
        assert http.post("/metrics").status_code == 405
        assert metrics.headers["x-request-id"]


# Inbound mTLS


@dataclass
class PKI:
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path
    shop: tuple[Path, Path]
    other: tuple[Path, Path]
    foreign: tuple[Path, Path]  # a `shop` identity signed by a CA the gateway does not trust

    def tls_block(self) -> dict[str, str]:
        return {"cert": str(self.server_cert), "key": str(self.server_key), "ca": str(self.ca_file)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = directory / "mesh-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server_cert, server_key = directory / "gw.pem", directory / "gw.key"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    server.private_key_pem.write_to_path(str(server_key))
    return PKI(
        ca=ca,
        ca_file=ca_file,
        server_cert=server_cert,
        server_key=server_key,
        shop=issue_client_cert(ca, "spiffe://example.test/group/shop", directory, "shop"),
        other=issue_client_cert(ca, "spiffe://example.test/group/other", directory, "other"),
        foreign=issue_client_cert(trustme.CA(), "spiffe://example.test/group/shop", directory, "foreign"),
    )


def client_context(pki: PKI, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


def tls_client(gw: Gateway, pki: PKI, cert: tuple[Path, Path] | None) -> httpx.Client:
    host, port = gw.inbound
    return client(f"https://{host}:{port}", verify=client_context(pki, cert))


def raw_tls_request(address: tuple[str, int], context: ssl.SSLContext) -> bytes | Exception:
    """One request over TLS; the bytes the server answered, or the exception that ended the exchange."""
    request = b"GET /echo HTTP/1.1\r\nhost: hello\r\nconnection: close\r\n\r\n"
    try:
        with (
            socket.create_connection(address, timeout=5) as sock,
            context.wrap_socket(sock, server_hostname=address[0]) as tls,
        ):
            tls.sendall(request)
            chunks = []
            while chunk := tls.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; named for the reader
        return exc


def test_inbound_mtls_proxies_for_mesh_peers(
    start_gateway: StartGateway, start_upstream: StartUpstream, pki: PKI
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), tls=pki.tls_block()))
    with tls_client(gw, pki, pki.shop) as http:
        response = http.get("/echo/tls", headers={"host": "hello", "x-request-id": "peer-id-42"})
        assert_echoed(response, "/echo/tls", "https")
        # A mesh mTLS peer is a trusted sender: its request ID is kept, both ways.
        assert response.headers["x-request-id"] == "peer-id-42"
        assert upstream_request_id(response) == "peer-id-42"
        second = http.get("/echo/tls2", headers={"host": "hello"})
        assert second.status_code == 200
        assert_uuid4(second.headers["x-request-id"])
    assert upstream.requests == 2
    with client(gw.url("admin")) as http:
        assert http.get("/config").json()["config"]["gateway"]["tls"] == pki.tls_block()


def test_inbound_mtls_refuses_clients_without_a_trusted_certificate(
    start_gateway: StartGateway, start_upstream: StartUpstream, pki: PKI
) -> None:
    upstream = start_upstream("v1")
    gw = start_gateway(gateway_config(hello(upstream.address), tls=pki.tls_block()))
    for name, cert in [("no certificate", None), ("certificate from another CA", pki.foreign)]:
        result = raw_tls_request(gw.inbound, client_context(pki, cert))
        assert not (isinstance(result, bytes) and result.startswith(b"HTTP/")), (name, result)
        with tls_client(gw, pki, cert) as http, pytest.raises(httpx.TransportError):
            http.get("/echo", headers={"host": "hello"})
    # Plain HTTP on the mTLS port gets no HTTP answer either.
    plain = raw_request(gw.inbound, b"GET /echo HTTP/1.1\r\nhost: hello\r\nconnection: close\r\n\r\n", timeout=3)
    assert not plain.startswith(b"HTTP/1.1 200")
    assert upstream.requests == 0
    # The refused handshakes did not hurt the listener.
    result = raw_tls_request(gw.inbound, client_context(pki, pki.shop))
    assert isinstance(result, bytes) and result.startswith(b"HTTP/1.1 200 "), result
    assert upstream.requests == 1


def test_inbound_mtls_authorization_by_source_group(
    start_gateway: StartGateway, start_upstream: StartUpstream, pki: PKI
) -> None:
    upstream = start_upstream("v1")
    services = {
        "orders": service(upstream.address, authorization={"allow": ["shop"]}),
        "open": service(upstream.address),  # allow defaults to ["*"]: any mesh identity
    }
    gw = start_gateway(gateway_config(services, tls=pki.tls_block()))
    with tls_client(gw, pki, pki.shop) as http:
        allowed = http.get("/echo/orders", headers={"host": "orders"})
        assert allowed.status_code == 200
        assert allowed.headers["x-upstream"] == "v1"
        assert http.get("/echo/open", headers={"host": "open"}).status_code == 200
    with tls_client(gw, pki, pki.other) as http:
        refused = http.get("/echo/orders", headers={"host": "orders", "x-request-id": "other-id-1"})
        assert refused.status_code == 403
        assert "other" in refused.text and "orders" in refused.text  # names the source and the service
        assert refused.headers["x-request-id"] == "other-id-1"
        assert http.get("/echo/open", headers={"host": "open"}).status_code == 200
    assert upstream.requests == 3
