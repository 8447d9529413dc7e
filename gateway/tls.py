"""A gateway's mesh identity on the wire: its key and CSR, mTLS contexts, certificate rotation and peer identities.

A joined gateway makes a key and CSR (`new_key_and_csr`), sends the CSR to the control server and gets back an
X.509-SVID chain whose only URI SAN is `spiffe://<trust-domain>/group/<group>`. It builds its listener and dialer
contexts once (`mesh_context`, then `install`; or `mesh_server_context` / `mesh_client_context` in one step) and,
at `renew_at`, swaps the fresh certificate into those same contexts with `reload`. Peers are checked by SPIFFE ID
(`peer_spiffe_id`, `group_of`), not by hostname.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

# SPIFFE ID grammar: a lowercase trust domain, then path segments of letters, digits, '.', '-' and '_' that are
# neither '.' nor '..'.
_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._-]+"
_SPIFFE_ID = re.compile(rf"spiffe://([a-z0-9._-]+)((?:/{_SEGMENT})+)")
_GROUP_PATH = re.compile(rf"/group/({_SEGMENT})")
RENEW_JITTER = 0.1  # renewal lands within ±10 % of the half-life, so gateways joined together don't renew together
RENEW_MIN_INTERVAL = 5.0  # seconds: however short a certificate's life, it is renewed at most this often


def new_key_and_csr() -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key (PKCS#8 PEM) and a CSR for it; the control server decides the identity, not the CSR."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def spki_hash(cert_pem: bytes) -> str:
    """`sha256:<hex>` of the first certificate's SubjectPublicKeyInfo: kubeadm's `--discovery-token-ca-cert-hash`."""
    spki = (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def not_before(chain_pem: bytes) -> float:
    """The leaf's (first certificate's) notBefore as a Unix time."""
    return x509.load_pem_x509_certificate(chain_pem).not_valid_before_utc.timestamp()


def not_after(chain_pem: bytes) -> float:
    """The leaf's (first certificate's) notAfter as a Unix time."""
    return x509.load_pem_x509_certificate(chain_pem).not_valid_after_utc.timestamp()


def renew_at(received: float, not_after: float, rand: float) -> float:
    """When to renew a certificate that came at `received`: at half the life it had then, moved by up to ±10 % of
    that half, and never sooner than RENEW_MIN_INTERVAL after it came. `rand` is uniform in [0, 1].

    Counted from receipt, not from notBefore: the CA backdates notBefore by minutes for peers with slow clocks, so a
    short certificate would look half spent on arrival and be renewed again at once, in a loop.
    """
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    half = (not_after - received) / 2
    return received + max(RENEW_MIN_INTERVAL, half * (1 + RENEW_JITTER * (2 * rand - 1)))


def mesh_server_context(chain_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """The inbound listener's context: TLS 1.3 only, and every peer must present a certificate chaining to `ca_pem`."""
    context = mesh_context(server=True)
    install(context, chain_pem, key_pem, ca_pem)
    return context


def mesh_client_context(chain_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """The context for dialing peer gateways: TLS 1.3, our certificate offered, the peer's verified against `ca_pem`.

    Hostnames are not checked: the caller compares `peer_spiffe_id` with the group it meant to reach.
    """
    context = mesh_context(server=False)
    install(context, chain_pem, key_pem, ca_pem)
    return context


def mesh_context(server: bool, h2: bool = False) -> ssl.SSLContext:
    """A mesh context with no identity yet (handshakes fail until `install`), for listeners made before joining.
    A server offers ALPN h2 and http/1.1; a client asks for h2 only with `h2` (HTTP/1.1 pools offer no ALPN)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if server:
        context.set_alpn_protocols(["h2", "http/1.1"])
    elif h2:
        context.set_alpn_protocols(["h2"])
    return context


def install(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
    """`reload` the certificate, and trust `ca_pem` too. Roots trusted before stay trusted: OpenSSL only adds."""
    ca = ca_pem.decode("ascii")
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=ca)  # so a bad CA changes nothing either
    reload(context, chain_pem, key_pem)
    context.load_verify_locations(cadata=ca)


def reload(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Put a new certificate chain and key into `context` itself.

    OpenSSL copies the context's certificate into each connection when it starts, so handshakes after this call
    present the new chain and connections already open keep theirs. The pair is tried on a scratch context first:
    a key that doesn't match would otherwise leave the live context with the new chain and no usable key.
    """
    directory = tempfile.mkdtemp(prefix="meshgate-tls-")  # 0700: the key is never readable by others
    try:
        chain_file, key_file = os.path.join(directory, "chain.pem"), os.path.join(directory, "key.pem")
        _write_private(chain_file, chain_pem)
        _write_private(key_file, key_pem)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain_file, key_file)
        context.load_cert_chain(chain_file, key_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The SPIFFE ID of the verified peer: its certificate's only URI SAN, or None if it has none or several."""
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    sans = cert.get("subjectAltName", ())
    uris = [str(entry[1]) for entry in sans if isinstance(entry, tuple) and entry[0] == "URI"]
    if len(uris) != 1 or _SPIFFE_ID.fullmatch(uris[0]) is None:
        return None  # an X.509-SVID carries exactly one URI SAN, and it is the SPIFFE ID
    return uris[0]


def spiffe_id_of(chain_pem: bytes) -> str:
    """The SPIFFE ID of the chain's leaf; ValueError if it carries none."""
    cert = x509.load_pem_x509_certificate(chain_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or _SPIFFE_ID.fullmatch(uris[0]) is None:
        raise ValueError(f"the certificate carries no single SPIFFE ID (URI SANs: {uris})")
    return uris[0]


def trust_domain_of(chain_pem: bytes) -> str:
    """`meshgate.local` for a leaf whose SPIFFE ID is `spiffe://meshgate.local/...`; ValueError if it has none."""
    return spiffe_id_of(chain_pem).removeprefix("spiffe://").partition("/")[0]


def group_of(spiffe_id: str | None, trust_domain: str | None) -> str | None:
    """`catalog` for `spiffe://<trust_domain>/group/catalog`; None for any other ID or trust domain.

    A standalone gateway with a `tls` block knows no trust domain (None): its CA file alone decides who is a peer.
    """
    if spiffe_id is None:
        return None
    match = _SPIFFE_ID.fullmatch(spiffe_id)
    if match is None or trust_domain not in (None, match.group(1)):
        return None
    group = _GROUP_PATH.fullmatch(match.group(2))
    return group.group(1) if group else None


class EdgeCertificates:
    """The edge listener's TLS: server certificates chosen by the client's SNI, reloaded when their files change.

    Each certificate answers for the DNS names in its subjectAltName (a `*.` name for one label below); the first is
    the default, for clients that send no SNI or a name no certificate has. ALPN offers h2 and http/1.1. `check()`
    (the server calls it every few seconds) loads a changed file into the live context, so handshakes after it
    present the new certificate; a pair that does not load is logged and the previous one stays.

    >>> edge = EdgeCertificates([("shop.pem", "shop.key"), ("api.pem", "api.key")]); edge.context
    """

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs
        self.contexts = [self._context(cert, key) for cert, key in pairs]  # raises with the file's name
        self.names = [_dns_names(cert) for cert, _ in pairs]
        self.stamps = [_stamp(pair) for pair in pairs]
        self.context = self.contexts[0]
        self.context.sni_callback = self.pick

    @staticmethod
    def _context(cert: str, key: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2", "http/1.1"])
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"edge certificate {cert} with key {key} does not load: {exc}") from None
        return context

    def pick(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        if server_name:
            name = server_name.lower()
            wildcard = "*." + name.partition(".")[2]
            for context, names in zip(self.contexts, self.names, strict=True):
                if name in names or wildcard in names:
                    conn.context = context
                    return

    def check(self) -> list[str]:
        """Reload the certificates whose files changed; returns what happened, one line each, for the log."""
        said = []
        for index, pair in enumerate(self.pairs):
            stamp = _stamp(pair)
            if stamp == self.stamps[index]:
                continue
            self.stamps[index] = stamp
            cert, key = pair
            try:
                with open(cert, "rb") as chain_file, open(key, "rb") as key_file:
                    reload(self.contexts[index], chain_file.read(), key_file.read())
                self.names[index] = _dns_names(cert)
                said.append(f"edge certificate {cert} reloaded")
            except (OSError, ValueError, ssl.SSLError) as exc:
                said.append(f"edge certificate {cert} not reloaded, the previous one stays: {exc}")
        return said


def _stamp(pair: tuple[str, str]) -> tuple[float, ...]:
    try:
        return tuple(os.stat(path).st_mtime for path in pair)
    except OSError:
        return ()


def _dns_names(cert_path: str) -> frozenset[str]:
    try:
        with open(cert_path, "rb") as file:
            cert = x509.load_pem_x509_certificate(file.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return frozenset()
    return frozenset(name.lower() for name in san.get_values_for_type(x509.DNSName))
