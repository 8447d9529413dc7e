"""The edge listener's TLS (`gateway.edge_tls`): certificates chosen by SNI, ALPN h2 and http/1.1, reloaded when
their files change; and HTTP/2 from the standard clients, curl and h2load, over TLS and over h2c.

Certificates come from a trustme CA; curl and h2load are Debian's (curl with nghttp2, nghttp2-client)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
import yaml
from cryptography import x509

from tests.conftest import Gateway, StartGateway, gateway_config, hello, listeners, metric, wait_for
from tests.e2e.upstream_app import UpstreamServer


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(*hosts)
    chain, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return chain, key


def presented(address: tuple[str, int], ca: trustme.CA, server_name: str | None) -> tuple[set[str], str | None]:
    """The DNS names of the certificate the edge presents for `server_name` (None: no SNI), and the ALPN chosen."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection(address, timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return set(san.value.get_values_for_type(x509.DNSName)), tls.selected_alpn_protocol()


@pytest.fixture
def tls_edge(
    tmp_path: Path, ca: trustme.CA, start_gateway: StartGateway, hello_upstream: UpstreamServer
) -> tuple[Gateway, Path]:
    hello_pair = write_pair(ca, tmp_path, "hello", "hello", "localhost")
    api_pair = write_pair(ca, tmp_path, "api", "api.example", "*.api.example")
    edge_tls = [{"cert": str(cert), "key": str(key)} for cert, key in (hello_pair, api_pair)]
    config = gateway_config(hello(hello_upstream.address), listen=listeners("edge"), edge_tls=edge_tls)
    return start_gateway(config), tmp_path


def test_the_edge_picks_a_certificate_by_sni_and_offers_h2(tls_edge: tuple[Gateway, Path], ca: trustme.CA) -> None:
    gateway, _ = tls_edge
    edge = gateway.addresses["edge"]
    assert presented(edge, ca, "hello") == ({"hello", "localhost"}, "h2")
    assert presented(edge, ca, "api.example")[0] == {"api.example", "*.api.example"}
    assert presented(edge, ca, "v2.api.example")[0] == {"api.example", "*.api.example"}  # the wildcard
    assert presented(edge, ca, "other.example")[0] == {"hello", "localhost"}  # no match: the first
    assert presented(edge, ca, None)[0] == {"hello", "localhost"}  # no SNI: the first


@pytest.mark.parametrize("version", ["--http2", "--http1.1"])
def test_curl_through_the_tls_edge(tls_edge: tuple[Gateway, Path], ca: trustme.CA, version: str) -> None:
    gateway, directory = tls_edge
    host, port = gateway.addresses["edge"]
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    done = subprocess.run(
        ["curl", "-sS", "-i", version, "--cacert", str(directory / "ca.pem"), "--resolve", f"hello:{port}:{host}"]
        + [f"https://hello:{port}/echo"],
        capture_output=True,
        timeout=15,
        check=True,
    )
    status_line = done.stdout.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/2 200" if version == "--http2" else b"HTTP/1.1 200 "), done.stdout[:300]
    assert re.search(rb"(?im)^x-request-id: [0-9a-f-]{36}\r$", done.stdout), done.stdout[:500]
    assert metric(gateway, "meshgate_requests_total", source="external", code="200") == 1


def test_curl_with_prior_knowledge_through_the_plain_edge(edge_gateway: Gateway) -> None:
    host, port = edge_gateway.addresses["edge"]
    done = subprocess.run(
        ["curl", "-sS", "-i", "--http2-prior-knowledge", "-H", "host: hello", f"http://{host}:{port}/echo"],
        capture_output=True,
        timeout=15,
        check=True,
    )
    assert done.stdout.startswith(b"HTTP/2 200 "), done.stdout[:300]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "h2c"])
def test_h2load_through_the_edge(
    tls: bool, tls_edge: tuple[Gateway, Path], edge_gateway: Gateway, hello_upstream: UpstreamServer
) -> None:
    """h2load, many streams on few connections: every request answered 200, each counted once."""
    if shutil.which("h2load") is None:
        pytest.fail("h2load is missing: apt-get install nghttp2-client (.ci/run installs it)")
    gateway = tls_edge[0] if tls else edge_gateway
    host, port = gateway.addresses["edge"]
    url = f"{'https' if tls else 'http'}://{host}:{port}/echo"
    done = subprocess.run(
        ["h2load", "-n", "400", "-c", "4", "-m", "10", "-H", ":authority: hello", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert re.search(r"requests: 400 total, 400 started, 400 done, 400 succeeded", done.stdout), done.stdout
    assert re.search(r"status codes: 400 2xx", done.stdout), done.stdout
    wait_for(lambda: metric(gateway, "meshgate_requests_total", source="external", code="200") == 400, 5)


def test_a_renewed_certificate_is_presented_without_a_restart_and_a_broken_one_is_not(
    tls_edge: tuple[Gateway, Path], ca: trustme.CA
) -> None:
    gateway, directory = tls_edge
    edge = gateway.addresses["edge"]
    # A renewal (as certbot or cert-manager writes it): same names plus one, new key.
    write_pair(ca, directory, "hello", "hello", "localhost", "renewed.example")
    wait_for(lambda: "renewed.example" in presented(edge, ca, "hello")[0], 10, what="the renewed certificate")
    gateway.wait_log("edge certificate")
    # A half-written file: the previous certificate stays, and the log says why.
    (directory / "hello.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    gateway.wait_log("not reloaded, the previous one stays")
    assert "renewed.example" in presented(edge, ca, "hello")[0]


def test_an_edge_certificate_that_does_not_load_stops_the_start_with_its_name(
    tmp_path: Path, hello_upstream: UpstreamServer
) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    (tmp_path / "bad.key").write_text("not a key\n")
    config = gateway_config(
        hello(hello_upstream.address), listen=listeners("edge"), edge_tls=[{"cert": "bad.pem", "key": "bad.key"}]
    )

    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    missing = gateway_config(hello(hello_upstream.address), edge_tls=[{"cert": "nope.pem", "key": "bad.key"}])
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    checked = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", "gateway", "--check", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 2
    assert "gateway.edge_tls[0].cert: expected an existing file" in checked.stderr, checked.stderr
    started = subprocess.run(
        [sys.executable, "-m", "meshgate.cli", "gateway", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert started.returncode == 2, started.stderr
    assert f"gateway.edge_tls: edge certificate {tmp_path / 'bad.pem'}" in started.stderr
    assert "Traceback" not in started.stderr
