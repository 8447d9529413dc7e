"""The mesh CA: its files on disk, operator-supplied CAs, and the certificates it issues.

Certificates are checked three independent ways: parsed with `cryptography`, verified by the `openssl` command
line (`openssl verify -x509_strict`), and used in real TLS handshakes on 127.0.0.1 (tests/gateway/test_tls.py for
the mesh contexts, here for the dashboard's HTTPS certificate with hostname checking on).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dashboard.identity import FILES, IdentityError, MeshCA
from gateway.tls import new_key_and_csr, not_after, spki_hash
from tests.gateway.test_tls import MeshServer, connect, echo

TD = "meshgate.local"
CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def certs(chain_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(chain_pem)


def uris(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def openssl_verify(tmp_path: Path, root_pem: bytes, chain_pem: bytes, *options: str) -> None:
    """`openssl verify` the chain's leaf against `root_pem`, with the chain's other certificates as intermediates."""
    leaf, *rest = certs(chain_pem)
    (tmp_path / "v-root.pem").write_bytes(root_pem)
    (tmp_path / "v-leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "v-rest.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in rest))
    command = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "v-root.pem")]
    command += ["-untrusted", str(tmp_path / "v-rest.pem"), *options, str(tmp_path / "v-leaf.pem")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def make_ca_cert(
    name: str,
    key: CAKey,
    issuer: x509.Certificate | None,
    issuer_key: CAKey,
    days: float,
    ca: bool = True,
    strict: bool = True,
    path_length: int | None = None,
) -> x509.Certificate:
    """A CA certificate as an operator's own tooling might make it; `strict=False` leaves out what X509_STRICT needs."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    )
    if strict:
        usage = dict.fromkeys(["content_commitment", "key_encipherment", "data_encipherment", "key_agreement"], False)
        builder = (
            builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                    **usage,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_pem(path: Path, item: x509.Certificate | CAKey) -> None:
    if isinstance(item, x509.Certificate):
        path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    else:
        pem = item.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_bytes(pem)
        path.chmod(0o600)


@pytest.fixture
def ca(tmp_path: Path) -> MeshCA:
    return MeshCA.load_or_create(str(tmp_path / "ca"), TD)


@pytest.fixture
def operator_dir(tmp_path: Path) -> Path:
    """root.pem (P-384) + intermediate.pem/.key (RSA 2048) an operator made; root.key stays offline."""
    directory = tmp_path / "operator-ca"
    directory.mkdir()
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = make_ca_cert("Example Corp Root", root_key, None, root_key, days=3650)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    intermediate = make_ca_cert("Example Corp Mesh Issuing", key, root, root_key, days=365)
    write_pem(directory / "root.pem", root)
    write_pem(directory / "intermediate.pem", intermediate)
    write_pem(directory / "intermediate.key", key)
    return directory


def test_first_start_creates_a_root_and_an_intermediate_with_private_files(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "ca"
    ca = MeshCA.load_or_create(str(directory), TD)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in FILES:
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == 0o600 if name.endswith(".key") else mode & 0o077 in (0, 0o044), (name, oct(mode))
    root, intermediate = ca.root, ca.intermediate
    assert (directory / "root.pem").read_bytes() == ca.root_pem
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(intermediate.public_key(), ec.EllipticCurvePublicKey)
    root_key = root.public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey) and root_key.curve.name == "secp256r1"
    intermediate.verify_directly_issued_by(root)
    constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    years = (root.not_valid_after_utc - root.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    assert 364 <= (intermediate.not_valid_after_utc - intermediate.not_valid_before_utc).days <= 366


def test_restart_loads_the_same_ca(tmp_path: Path, ca: MeshCA) -> None:
    before = {name: (tmp_path / "ca" / name).read_bytes() for name in FILES}
    _, csr_pem = new_key_and_csr()
    issued = ca.sign_csr(csr_pem, "catalog")
    again = MeshCA.load_or_create(str(tmp_path / "ca"), TD)
    assert again.ca_hash == ca.ca_hash
    assert again.root_pem == ca.root_pem
    assert {name: (tmp_path / "ca" / name).read_bytes() for name in FILES} == before
    assert certs(issued.chain_pem)[1] == again.intermediate  # what was issued before still chains the same way
    openssl_verify(tmp_path, again.root_pem, issued.chain_pem)


def test_two_dashboards_starting_together_make_one_ca(tmp_path: Path) -> None:
    hashes_seen: list[str] = []
    threads = [
        threading.Thread(target=lambda: hashes_seen.append(MeshCA.load_or_create(str(tmp_path / "ca"), TD).ca_hash))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(hashes_seen) == 4 and len(set(hashes_seen)) == 1


def test_ca_hash_is_kubeadms_spki_sha256(tmp_path: Path, ca: MeshCA) -> None:
    pubkey = subprocess.run(
        ["openssl", "x509", "-pubkey", "-noout"], input=ca.root_pem, capture_output=True, check=True, timeout=30
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pubkey, capture_output=True, check=True, timeout=30
    ).stdout
    digest = subprocess.run(["sha256sum"], input=der, capture_output=True, check=True, timeout=30).stdout
    assert ca.ca_hash == "sha256:" + digest.split()[0].decode()
    assert spki_hash(ca.root_pem) == ca.ca_hash


def test_operator_supplied_ca_is_used_as_it_is(tmp_path: Path, operator_dir: Path) -> None:
    before = {path.name: path.read_bytes() for path in operator_dir.iterdir()}
    ca = MeshCA.load_or_create(str(operator_dir), TD)
    assert ca.root_pem == before["root.pem"]
    assert ca.ca_hash == spki_hash(before["root.pem"])
    assert not (operator_dir / "root.key").exists()  # an offline root stays offline
    assert {path.name: path.read_bytes() for path in operator_dir.iterdir() if path.name != ".lock"} == before
    _, csr_pem = new_key_and_csr()
    issued = ca.sign_csr(csr_pem, "catalog")
    leaf, intermediate = certs(issued.chain_pem)
    assert intermediate.public_bytes(serialization.Encoding.PEM) == before["intermediate.pem"]
    assert isinstance(intermediate.public_key(), rsa.RSAPublicKey)
    openssl_verify(tmp_path, ca.root_pem, issued.chain_pem, "-purpose", "sslclient")


def test_operator_root_alone_gets_an_intermediate(tmp_path: Path) -> None:
    directory = tmp_path / "root-only"
    directory.mkdir()
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = make_ca_cert("Example Corp Root", root_key, None, root_key, days=3650)
    write_pem(directory / "root.pem", root)
    write_pem(directory / "root.key", root_key)
    ca = MeshCA.load_or_create(str(directory), TD)
    assert ca.root == root
    ca.intermediate.verify_directly_issued_by(root)
    assert stat.S_IMODE((directory / "intermediate.key").stat().st_mode) == 0o600
    _, csr_pem = new_key_and_csr()
    openssl_verify(tmp_path, ca.root_pem, ca.sign_csr(csr_pem, "shop").chain_pem, "-purpose", "sslserver")


def test_an_intermediate_near_its_end_is_replaced_under_the_same_root(tmp_path: Path, ca: MeshCA) -> None:
    directory = tmp_path / "ca"
    root_key = serialization.load_pem_private_key((directory / "root.key").read_bytes(), password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    write_pem(directory / "intermediate.pem", make_ca_cert("old", key, ca.root, root_key, days=10))
    write_pem(directory / "intermediate.key", key)
    renewed = MeshCA.load_or_create(str(directory), TD)
    assert renewed.ca_hash == ca.ca_hash
    assert renewed.intermediate.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(300)
    assert (directory / "intermediate.pem").read_bytes() == renewed.intermediate.public_bytes(
        serialization.Encoding.PEM
    )


def _not_signed_by_root(directory: Path) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    write_pem(directory / "intermediate.pem", make_ca_cert("stray", key, None, stranger, days=365))
    write_pem(directory / "intermediate.key", key)


def _wrong_key(directory: Path) -> None:
    write_pem(directory / "intermediate.key", ec.generate_private_key(ec.SECP256R1()))


def _not_a_ca(directory: Path) -> None:
    root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
    root_key = serialization.load_pem_private_key((directory / "root.key").read_bytes(), password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    write_pem(directory / "intermediate.pem", make_ca_cert("leaf", key, root, root_key, days=365, ca=False))
    write_pem(directory / "intermediate.key", key)


def _lax_operator_root(directory: Path) -> None:
    for name in FILES:
        (directory / name).unlink()
    root_key = ec.generate_private_key(ec.SECP256R1())
    write_pem(directory / "root.pem", make_ca_cert("lax root", root_key, None, root_key, days=3650, strict=False))
    write_pem(directory / "root.key", root_key)


def _root_without_room(directory: Path) -> None:
    for name in FILES:
        (directory / name).unlink()
    root_key = ec.generate_private_key(ec.SECP256R1())
    write_pem(directory / "root.pem", make_ca_cert("flat root", root_key, None, root_key, days=3650, path_length=0))
    write_pem(directory / "root.key", root_key)


def _expired_without_root_key(directory: Path) -> None:
    root = x509.load_pem_x509_certificate((directory / "root.pem").read_bytes())
    root_key = serialization.load_pem_private_key((directory / "root.key").read_bytes(), password=None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    write_pem(directory / "intermediate.pem", make_ca_cert("old", key, root, root_key, days=-0.5))
    write_pem(directory / "intermediate.key", key)
    (directory / "root.key").unlink()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda d: (d / "root.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n"), "root.pem: not a PEM cert"),
        (lambda d: (d / "intermediate.key").write_bytes(b"garbage"), "intermediate.key: not an unencrypted PEM"),
        (_not_signed_by_root, "intermediate.pem: not signed by root.pem"),
        (_wrong_key, "intermediate.key: does not match the public key in intermediate.pem"),
        (_not_a_ca, "intermediate.pem: not a CA certificate"),
        (_lax_operator_root, "root.pem: gateways verify strictly (OpenSSL X509_STRICT), which needs keyUsage"),
        (_root_without_room, "root.pem: its pathLenConstraint of 0 leaves no room for the intermediate"),
        (_expired_without_root_key, "intermediate.pem: expired on"),
        (lambda d: (d / "intermediate.key").unlink(), "go together, but only intermediate.pem exists"),
        (lambda d: (d / "root.pem").unlink(), "root.pem is missing but"),
        (lambda d: [(d / n).unlink() for n in ("root.key", "intermediate.pem", "intermediate.key")], "so is root.key"),
    ],
)
def test_unusable_ca_files_are_refused_in_one_line(tmp_path: Path, ca: MeshCA, spoil: object, reason: str) -> None:
    directory = tmp_path / "ca"
    assert callable(spoil)
    spoil(directory)
    with pytest.raises(IdentityError) as caught:
        MeshCA.load_or_create(str(directory), TD)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_trust_domain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="trust domain"):
        MeshCA.load_or_create(str(tmp_path / "ca"), "Mesh/Gate")


def test_sign_csr_issues_a_spiffe_svid(tmp_path: Path, ca: MeshCA) -> None:
    key_pem, csr_pem = new_key_and_csr()
    before = time.time()
    issued = ca.sign_csr(csr_pem, "catalog", lifetime=3600)
    assert issued.spiffe_id == "spiffe://meshgate.local/group/catalog"
    leaf, intermediate = certs(issued.chain_pem)
    assert intermediate == ca.intermediate
    assert leaf.serial_number == issued.serial
    assert uris(leaf) == [issued.spiffe_id]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert len(san.value) == 1  # the URI SAN only: no DNS, IP or e-mail names
    assert san.critical  # the subject is empty (RFC 5280 4.2.1.6)
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert leaf.public_key() == key.public_key()
    assert before + 3600 - 1 <= issued.not_after == not_after(issued.chain_pem) <= time.time() + 3600
    openssl_verify(tmp_path, ca.root_pem, issued.chain_pem, "-purpose", "sslclient")
    openssl_verify(tmp_path, ca.root_pem, issued.chain_pem, "-purpose", "sslserver")


def test_sign_csr_ignores_what_the_csr_asks_for(ca: MeshCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    wanted = x509.SubjectAlternativeName(
        [
            x509.UniformResourceIdentifier("spiffe://meshgate.local/dashboard"),
            x509.DNSName("evil.example"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        ]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(wanted, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    issued = ca.sign_csr(csr.public_bytes(serialization.Encoding.PEM), "shop")
    leaf = certs(issued.chain_pem)[0]
    assert uris(leaf) == ["spiffe://meshgate.local/group/shop"]
    assert len(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == 1
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_leaf_never_outlives_its_intermediate(ca: MeshCA) -> None:
    _, csr_pem = new_key_and_csr()
    issued = ca.sign_csr(csr_pem, "catalog", lifetime=20 * 365 * 86400)
    assert issued.not_after == ca.intermediate.not_valid_after_utc.timestamp()


def _tampered() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tamper-me")]))
        .sign(key, hashes.SHA256())
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    assert der.count(b"tamper-me") == 1
    return x509.load_der_x509_csr(der.replace(b"tamper-me", b"tamper-us")).public_bytes(serialization.Encoding.PEM)


def _ed25519() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, None)
    return csr.public_bytes(serialization.Encoding.PEM)


def _small_rsa() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("make_csr", "group", "reason"),
    [
        (_tampered, "catalog", "CSR signature does not verify"),
        (lambda: b"not a csr", "catalog", "CSR is not a PEM certificate request"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "catalog", "PEM"),
        (_ed25519, "catalog", "CSR key type is unsupported: Ed25519"),
        (_small_rsa, "catalog", "RSA 1024 bits"),
        (lambda: new_key_and_csr()[1], "../root", "not a SPIFFE path segment"),
        (lambda: new_key_and_csr()[1], "a/b", "not a SPIFFE path segment"),
    ],
)
def test_sign_csr_refuses_in_one_line(ca: MeshCA, make_csr: object, group: str, reason: str) -> None:
    assert callable(make_csr)
    with pytest.raises(IdentityError) as caught:
        ca.sign_csr(make_csr(), group)
    assert reason in str(caught.value)
    assert "\n" not in str(caught.value)


def test_issue_makes_the_dashboards_https_and_mesh_certificate(tmp_path: Path, ca: MeshCA) -> None:
    key_pem, chain_pem, expires = ca.issue(ca.dashboard_id, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    leaf = certs(chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://meshgate.local/dashboard"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert expires == not_after(chain_pem)
    openssl_verify(tmp_path, ca.root_pem, chain_pem, "-purpose", "sslserver", "-verify_ip", "127.0.0.1")

    # A browser-like client: no client certificate, hostname checked, the mesh root as its only trust anchor.
    (tmp_path / "https.pem").write_bytes(chain_pem)
    (tmp_path / "https.key").write_bytes(key_pem)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "https.pem", tmp_path / "https.key")
    server = MeshServer(server_context)
    try:
        browser = ssl.create_default_context(cadata=ca.root_pem.decode())
        with connect(server, browser, server_hostname="localhost") as tls:
            assert echo(tls) == b"ping"
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            connect(server, browser, server_hostname="dashboard.example")
    finally:
        server.close()


@pytest.mark.parametrize(
    ("spiffe_id", "dns", "ip", "reason"),
    [
        ("spiffe://other.domain/dashboard", (), (), "not a SPIFFE ID in trust domain meshgate.local"),
        ("spiffe://meshgate.local/", (), (), "not a SPIFFE ID"),
        ("spiffe://meshgate.local/dashboard", ("bad name",), (), "is not a DNS name"),
        ("spiffe://meshgate.local/dashboard", (), ("localhost",), "does not appear to be an IPv4 or IPv6 address"),
    ],
)
def test_issue_refuses_bad_names(
    ca: MeshCA, spiffe_id: str, dns: tuple[str, ...], ip: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(IdentityError, match=reason):
        ca.issue(spiffe_id, dns_names=dns, ip_addresses=ip)
