"""Mesh mTLS with real certificates from a real `MeshCA`, over real TLS handshakes on 127.0.0.1.

`MeshServer` accepts connections with a given server context in threads, records each handshake's outcome (the
client's SPIFFE ID, or the exception the server's context raised) and echoes what it receives, so a test can show
both that a peer was refused and why, and that an open connection still carries data.
"""

from __future__ import annotations

import queue
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dashboard.identity import MeshCA
from gateway.tls import (
    RENEW_MIN_INTERVAL,
    group_of,
    install,
    mesh_client_context,
    mesh_context,
    mesh_server_context,
    new_key_and_csr,
    not_after,
    not_before,
    peer_spiffe_id,
    reload,
    renew_at,
    spiffe_id_of,
    spki_hash,
    trust_domain_of,
)

TD = "meshgate.local"
CATALOG = f"spiffe://{TD}/group/catalog"
SHOP = f"spiffe://{TD}/group/shop"
Outcome = str | None | Exception


class MeshServer:
    """A TLS server on 127.0.0.1 that reports each handshake's outcome and then echoes until the client is done."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.listener.getsockname()
        self.outcomes: queue.Queue[Outcome] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was shut down
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError as exc:  # ssl.SSLError is an OSError
            conn.close()
            self.outcomes.put(exc)
            return
        with tls:
            self.outcomes.put(peer_spiffe_id(tls))
            try:
                while data := tls.recv(4096):
                    tls.sendall(data)
            except OSError:
                pass  # the client went away mid-stream; its test has already said what it expects

    def outcome(self) -> Outcome:
        return self.outcomes.get(timeout=10)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the other thread
        self.listener.close()


def connect(server: MeshServer, context: ssl.SSLContext, server_hostname: str | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(server.address, timeout=10)
    try:
        return context.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise


def echo(tls: ssl.SSLSocket, data: bytes = b"ping") -> bytes:
    tls.sendall(data)
    return tls.recv(4096)


def identity(ca: MeshCA, group: str, **kwargs: float) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) for `group`, through the same CSR path a gateway uses."""
    key_pem, csr_pem = new_key_and_csr()
    return ca.sign_csr(csr_pem, group, **kwargs).chain_pem, key_pem


@pytest.fixture
def ca(tmp_path: Path) -> MeshCA:
    return MeshCA.load_or_create(str(tmp_path / "ca"), TD)


@pytest.fixture
def catalog_server(ca: MeshCA) -> Iterator[MeshServer]:
    server = MeshServer(mesh_server_context(*identity(ca, "catalog"), ca.root_pem))
    yield server
    server.close()


def test_mesh_contexts_verify_each_other_up_to_the_root(ca: MeshCA, catalog_server: MeshServer) -> None:
    client = mesh_client_context(*identity(ca, "shop"), ca.root_pem)
    with connect(catalog_server, client) as tls:
        assert tls.version() == "TLSv1.3"
        assert peer_spiffe_id(tls) == CATALOG
        assert catalog_server.outcome() == SHOP
        assert echo(tls) == b"ping"
    assert group_of(SHOP, TD) == "shop"


def test_server_refuses_a_client_without_a_certificate(ca: MeshCA, catalog_server: MeshServer) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.root_pem.decode())
    with connect(catalog_server, anonymous) as tls, pytest.raises(OSError):
        echo(tls)  # TLS 1.3: the client learns of the refusal only when it reads (an alert, or a reset)
    refusal = catalog_server.outcome()
    assert isinstance(refusal, ssl.SSLError)
    assert refusal.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_server_refuses_an_expired_client_certificate(ca: MeshCA, catalog_server: MeshServer) -> None:
    chain, key = identity(ca, "shop", lifetime=3600, now=time.time() - 86400)
    assert not_after(chain) < time.time()
    with connect(catalog_server, mesh_client_context(chain, key, ca.root_pem)) as tls, pytest.raises(OSError):
        echo(tls)
    refusal = catalog_server.outcome()
    assert isinstance(refusal, ssl.SSLCertVerificationError)
    assert refusal.verify_message == "certificate has expired"


def test_server_refuses_a_client_from_a_foreign_ca(tmp_path: Path, ca: MeshCA, catalog_server: MeshServer) -> None:
    foreign = MeshCA.load_or_create(str(tmp_path / "foreign"), TD)  # same trust domain, same SPIFFE ID: not enough
    client = mesh_client_context(*identity(foreign, "shop"), ca.root_pem)
    with connect(catalog_server, client) as tls, pytest.raises(OSError):
        echo(tls)
    refusal = catalog_server.outcome()
    assert isinstance(refusal, ssl.SSLCertVerificationError)
    assert refusal.verify_message == "unable to get local issuer certificate"


def test_client_refuses_a_server_from_a_foreign_ca(tmp_path: Path, ca: MeshCA) -> None:
    foreign = MeshCA.load_or_create(str(tmp_path / "foreign"), TD)
    server = MeshServer(mesh_server_context(*identity(foreign, "catalog"), foreign.root_pem))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
            connect(server, mesh_client_context(*identity(ca, "shop"), ca.root_pem))
        assert isinstance(server.outcome(), ssl.SSLError)
    finally:
        server.close()


def test_server_refuses_tls_1_2(ca: MeshCA, catalog_server: MeshServer) -> None:
    old = mesh_client_context(*identity(ca, "shop"), ca.root_pem)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        connect(catalog_server, old)
    refusal = catalog_server.outcome()
    assert isinstance(refusal, ssl.SSLError)
    assert refusal.reason == "UNSUPPORTED_PROTOCOL"


def test_a_context_made_before_joining_serves_once_an_identity_is_installed(ca: MeshCA) -> None:
    server = MeshServer(mesh_context(server=True))
    client = mesh_context(server=False)
    try:
        with pytest.raises(ssl.SSLError):
            connect(server, client)  # no certificate on either side yet
        assert isinstance(server.outcome(), ssl.SSLError)
        install(server.context, *identity(ca, "catalog"), ca.root_pem)
        install(client, *identity(ca, "shop"), ca.root_pem)
        with connect(server, client) as tls:
            assert peer_spiffe_id(tls) == CATALOG
            assert server.outcome() == SHOP
    finally:
        server.close()


def test_install_with_a_bad_ca_changes_nothing(ca: MeshCA) -> None:
    chain, key = identity(ca, "catalog")
    context = mesh_server_context(chain, key, ca.root_pem)
    with pytest.raises(ssl.SSLError):
        install(context, *identity(ca, "catalog"), b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert context.cert_store_stats()["x509_ca"] == 1
    server = MeshServer(context)
    try:
        with connect(server, mesh_client_context(*identity(ca, "shop"), ca.root_pem)) as tls:
            presented = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            assert presented.serial_number == x509.load_pem_x509_certificate(chain).serial_number
    finally:
        server.close()


def test_reload_serves_the_new_certificate_and_keeps_open_connections(ca: MeshCA) -> None:
    context = mesh_server_context(*identity(ca, "catalog", lifetime=3600), ca.root_pem)
    server = MeshServer(context)
    client = mesh_client_context(*identity(ca, "shop"), ca.root_pem)
    try:
        with connect(server, client) as before:
            assert server.outcome() == SHOP
            old_serial = x509.load_der_x509_certificate(before.getpeercert(binary_form=True) or b"").serial_number
            new_chain, new_key = identity(ca, "catalog", lifetime=7200)
            reload(context, new_chain, new_key)
            with connect(server, client) as after:
                assert server.outcome() == SHOP
                presented = x509.load_der_x509_certificate(after.getpeercert(binary_form=True) or b"")
                assert presented.serial_number == x509.load_pem_x509_certificate(new_chain).serial_number
                assert presented.serial_number != old_serial
                assert echo(after, b"new") == b"new"
            assert echo(before, b"still here") == b"still here"
    finally:
        server.close()


def test_reload_with_a_key_that_does_not_match_changes_nothing(ca: MeshCA) -> None:
    chain, key = identity(ca, "catalog")
    context = mesh_server_context(chain, key, ca.root_pem)
    other_chain, _ = identity(ca, "catalog")
    with pytest.raises(ssl.SSLError):
        reload(context, other_chain, key)
    server = MeshServer(context)
    try:
        with connect(server, mesh_client_context(*identity(ca, "shop"), ca.root_pem)) as tls:
            presented = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
            assert presented.serial_number == x509.load_pem_x509_certificate(chain).serial_number
            assert echo(tls) == b"ping"
    finally:
        server.close()


def test_reload_leaves_no_key_file_behind(ca: MeshCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    chain, key = identity(ca, "catalog")
    context = mesh_server_context(chain, key, ca.root_pem)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    reload(context, *identity(ca, "catalog"))
    assert list(scratch.iterdir()) == []


def test_peer_without_a_uri_san_has_no_spiffe_id(tmp_path: Path) -> None:
    authority = trustme.CA()
    server_cert = authority.issue_cert("localhost")
    server_ctx = mesh_server_context(
        server_cert.cert_chain_pems[0].bytes(), server_cert.private_key_pem.bytes(), authority.cert_pem.bytes()
    )
    client_cert = authority.issue_cert("client.example")
    client_ctx = mesh_client_context(
        client_cert.cert_chain_pems[0].bytes(), client_cert.private_key_pem.bytes(), authority.cert_pem.bytes()
    )
    server = MeshServer(server_ctx)
    try:
        with connect(server, client_ctx) as tls:
            assert tls.getpeercert()  # verified, and still no identity
            assert peer_spiffe_id(tls) is None
            assert server.outcome() is None
    finally:
        server.close()


@pytest.mark.parametrize(
    ("spiffe_id", "group"),
    [
        (CATALOG, "catalog"),
        ("spiffe://other.domain/group/catalog", None),
        ("spiffe://meshgate.local/dashboard", None),
        ("spiffe://meshgate.local/group/catalog/extra", None),
        ("spiffe://meshgate.local/group/..", None),
        ("spiffe://meshgate.local/group/", None),
        ("https://meshgate.local/group/catalog", None),
        (None, None),
    ],
)
def test_group_of(spiffe_id: str | None, group: str | None) -> None:
    assert group_of(spiffe_id, TD) == group


def test_renew_at_is_half_life_within_ten_percent() -> None:
    start, end = 1_000_000.0, 1_000_000.0 + 86400
    assert renew_at(start, end, 0.5) == start + 43200
    assert renew_at(start, end, 0.0) == pytest.approx(start + 43200 * 0.9)
    assert renew_at(start, end, 1.0) == pytest.approx(start + 43200 * 1.1)
    rng = random.Random(4)
    times = [renew_at(start, end, rng.random()) for _ in range(1000)]
    assert all(start + 43200 * 0.9 <= t <= start + 43200 * 1.1 for t in times)
    assert max(times) - min(times) > 43200 * 0.15  # it really spreads
    with pytest.raises(ValueError, match="rand"):
        renew_at(start, end, 1.5)


def test_a_short_certificate_renews_at_half_the_life_it_had_when_it_came(ca: MeshCA) -> None:
    """The CA backdates notBefore by minutes; counted from there, a 20 s certificate is spent on arrival and was
    renewed in a loop. Counted from receipt, it renews 10 s (±10 %) later."""
    _, csr_pem = new_key_and_csr()
    received = float(int(time.time()))
    issued = ca.sign_csr(csr_pem, "catalog", lifetime=20, now=received)
    assert renew_at(not_before(issued.chain_pem), issued.not_after, 1.0) < received  # the loop's mechanism
    assert renew_at(received, issued.not_after, 0.5) == received + 10
    times = [renew_at(received, issued.not_after, rand) for rand in (0.0, 0.25, 0.75, 1.0)]
    assert all(received + 9 <= t <= received + 11 for t in times), times


def test_renewal_comes_at_most_every_five_seconds_however_short_or_skewed_the_certificate() -> None:
    received = 1_000_000.0
    assert RENEW_MIN_INTERVAL == 5.0
    assert renew_at(received, received + 6, 0.5) == received + 5  # half-life 3 s: no sooner than 5 s
    assert renew_at(received, received - 60, 0.5) == received + 5  # expired on arrival (a clock ahead): 5 s, not now
    assert renew_at(received, received + 10, 1.0) == pytest.approx(received + 5.5)


def test_new_key_and_csr_make_a_p256_key_and_a_csr_signed_by_it() -> None:
    key_pem, csr_pem = new_key_and_csr()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    assert new_key_and_csr()[0] != key_pem


def test_validity_and_spki_hash_read_the_leaf(ca: MeshCA) -> None:
    _, csr_pem = new_key_and_csr()
    now = float(int(time.time()))
    issued = ca.sign_csr(csr_pem, "catalog", lifetime=3600, now=now)
    assert not_after(issued.chain_pem) == issued.not_after == now + 3600
    assert not_before(issued.chain_pem) < now
    assert spki_hash(ca.root_pem) == ca.ca_hash
    assert spki_hash(issued.chain_pem) != ca.ca_hash  # the first certificate counts: here the leaf


def test_spiffe_id_and_trust_domain_of_a_chain(ca: MeshCA) -> None:
    chain, _ = identity(ca, "catalog")
    assert spiffe_id_of(chain) == CATALOG
    assert trust_domain_of(chain) == TD
    plain = trustme.CA().issue_cert("localhost").cert_chain_pems[0].bytes()
    with pytest.raises(ValueError, match="no single SPIFFE ID"):
        trust_domain_of(plain)
