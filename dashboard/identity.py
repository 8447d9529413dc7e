"""The mesh certificate authority: a root and an intermediate that issue SPIFFE X.509-SVIDs to gateways.

The root (10 years) only signs the intermediate (1 year, path length 0); the intermediate signs every leaf. Both
live as PEM files in one directory: `root.pem root.key intermediate.pem intermediate.key`. Files an operator put
there are used as they are, after checking they fit together; `root.key` may then be absent (an offline root).
Gateways pin the root by `ca_hash`, in kubeadm's format.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import ExtensionType
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dashboard.errors import DashboardError
from gateway.tls import spki_hash

log = logging.getLogger("meshgate.identity")

ROOT_LIFETIME: Final = 10 * 365 * 86400.0
INTERMEDIATE_LIFETIME: Final = 365 * 86400.0
INTERMEDIATE_RENEW_BEFORE: Final = 30 * 86400.0  # a new intermediate this long before the old one expires
BACKDATE: Final = 300.0  # notBefore lies this far in the past, for peers whose clocks run a little behind
FILES: Final = ("root.pem", "root.key", "intermediate.pem", "intermediate.key")

_TRUST_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_DNS_NAME = re.compile(r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_CURVES: Final = (ec.SECP256R1, ec.SECP384R1)

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
ExtensionT = TypeVar("ExtensionT", bound=ExtensionType)


class IdentityError(DashboardError):
    """A CA file, CSR or identity that cannot be used; the message is one line that says why."""

    status = 422


def check_trust_domain(trust_domain: str) -> None:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise IdentityError(f"trust domain {trust_domain!r}: expected lowercase letters, digits, '.', '-', '_'")


def is_dns_name(name: str) -> bool:
    """A name a certificate's DNS SAN may hold (a leading `*.` wildcard too)."""
    return _DNS_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Issued:
    """An X.509-SVID issued from a CSR: the leaf and the intermediate in PEM, and what the leaf says."""

    chain_pem: bytes
    not_after: float
    spiffe_id: str
    serial: int


class MeshCA:
    """The mesh's certificate authority.

    >>> ca = MeshCA.load_or_create("meshgate-data/ca", "meshgate.local")
    >>> key_pem, csr_pem = gateway.tls.new_key_and_csr()
    >>> ca.sign_csr(csr_pem, "catalog").spiffe_id
    'spiffe://meshgate.local/group/catalog'
    """

    def __init__(
        self,
        trust_domain: str,
        root: x509.Certificate,
        intermediate: x509.Certificate,
        intermediate_key: CAKey,
    ) -> None:
        self.trust_domain = trust_domain
        self.root = root
        self.intermediate = intermediate
        self._key = intermediate_key
        self.root_pem = root.public_bytes(serialization.Encoding.PEM)
        self.ca_hash = spki_hash(self.root_pem)
        self._intermediate_pem = intermediate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: str, trust_domain: str) -> MeshCA:
        """The CA kept in `directory`, made there first if the directory holds none of its files."""
        check_trust_domain(trust_domain)
        path = Path(directory)
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _locked(path):
                return cls._load_or_create(path, trust_domain)
        except OSError as exc:
            raise IdentityError(f"{exc.filename or path}: {exc.strerror or exc}") from None

    @classmethod
    def _load_or_create(cls, path: Path, trust_domain: str) -> MeshCA:
        present = {name for name in FILES if (path / name).exists()}
        if not present:
            new_key, new_root = _new_root(trust_domain)
            _write_key(path / "root.key", new_key)
            _write(path / "root.pem", _pem(new_root), 0o644)
            present = {"root.pem", "root.key"}
            log.info("created a mesh root CA in %s (%s)", path, spki_hash(_pem(new_root)))
        if "root.pem" not in present:
            raise IdentityError(f"{path}: root.pem is missing but {', '.join(sorted(present))} exist")
        pair = present & {"intermediate.pem", "intermediate.key"}
        if len(pair) == 1:
            raise IdentityError(
                f"{path}: intermediate.pem and intermediate.key go together, but only {pair.pop()} exists"
            )
        root = _load_cert(path / "root.pem")
        _check_root(root, path / "root.pem")
        root_key = _load_key(path / "root.key", root) if "root.key" in present else None
        if pair:
            intermediate = _load_cert(path / "intermediate.pem")
            key = _load_key(path / "intermediate.key", intermediate)
            _check_intermediate(intermediate, root, path / "intermediate.pem")
            if _keep(intermediate, path / "intermediate.pem", can_renew=root_key is not None):
                return cls(trust_domain, root, intermediate, key)
        if root_key is None:
            raise IdentityError(f"{path}: intermediate.pem and intermediate.key are missing, and so is root.key")
        key, intermediate = _new_intermediate(trust_domain, root, root_key)
        _write_key(path / "intermediate.key", key)
        _write(path / "intermediate.pem", _pem(intermediate), 0o644)
        log.info("issued a new intermediate CA in %s, valid until %s", path, intermediate.not_valid_after_utc)
        return cls(trust_domain, root, intermediate, key)

    @property
    def dashboard_id(self) -> str:
        return f"spiffe://{self.trust_domain}/dashboard"

    def group_id(self, group: str) -> str:
        if not _is_segment(group):
            raise IdentityError(f"group {group!r} is not a SPIFFE path segment (letters, digits, '.', '-', '_')")
        return f"spiffe://{self.trust_domain}/group/{group}"

    def sign_csr(self, csr_pem: bytes, group: str, lifetime: float = 86400, *, now: float | None = None) -> Issued:
        """An X.509-SVID for `group` on the CSR's key. Only the key is taken from the CSR: subject and SANs are ours."""
        spiffe_id = self.group_id(group)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise IdentityError("CSR is not a PEM certificate request") from None
        try:
            public_key = _leaf_key(csr.public_key())
        except (ValueError, UnsupportedAlgorithm):
            raise IdentityError("CSR key type is unsupported") from None
        if not csr.is_signature_valid:
            raise IdentityError("CSR signature does not verify with its own key")
        cert = self._sign_leaf(public_key, [x509.UniformResourceIdentifier(spiffe_id)], lifetime, now)
        chain = _pem(cert) + self._intermediate_pem
        return Issued(chain, cert.not_valid_after_utc.timestamp(), spiffe_id, cert.serial_number)

    def issue(
        self,
        spiffe_id: str,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        lifetime: float = 86400,
        *,
        now: float | None = None,
    ) -> tuple[bytes, bytes, float]:
        """A new key and chain for `spiffe_id` plus DNS/IP SANs: the dashboard's mesh identity and HTTPS certificate.

        Returns (key PEM, leaf + intermediate PEM, notAfter).
        """
        prefix = f"spiffe://{self.trust_domain}/"
        segments = spiffe_id.removeprefix(prefix).split("/")
        if not spiffe_id.startswith(prefix) or not all(map(_is_segment, segments)):
            raise IdentityError(f"{spiffe_id!r} is not a SPIFFE ID in trust domain {self.trust_domain}")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        for name in dns_names:
            if not is_dns_name(name):
                raise IdentityError(f"{name!r} is not a DNS name")
            names.append(x509.DNSName(name))
        try:
            names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        except ValueError as exc:
            raise IdentityError(str(exc)) from None
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign_leaf(key.public_key(), names, lifetime, now)
        return _key_pem(key), _pem(cert) + self._intermediate_pem, cert.not_valid_after_utc.timestamp()

    def _sign_leaf(
        self, public_key: LeafKey, names: list[x509.GeneralName], lifetime: float, now: float | None
    ) -> x509.Certificate:
        if lifetime <= 0:
            raise ValueError(f"lifetime must be positive, got {lifetime}")
        start = time.time() if now is None else now
        # A leaf never outlives the intermediate that signed it: it would fail verification from then on anyway.
        end = min(start + lifetime, self.intermediate.not_valid_after_utc.timestamp())
        if end <= start:
            raise IdentityError(f"the intermediate CA expired on {self.intermediate.not_valid_after_utc:%Y-%m-%d}")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # X.509-SVIDs identify by URI SAN; an empty subject makes the SAN critical
            .issuer_name(self.intermediate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(start - BACKDATE))
            .not_valid_after(_utc(end))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.intermediate), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())


LeafKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def _leaf_key(public_key: CertificatePublicKeyTypes) -> LeafKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _CURVES):
            raise IdentityError(f"CSR key type is unsupported: curve {public_key.curve.name} (use P-256 or P-384)")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise IdentityError(f"CSR key type is unsupported: RSA {public_key.key_size} bits (at least 2048)")
    else:
        raise IdentityError(f"CSR key type is unsupported: {type(public_key).__name__} (use ECDSA P-256)")
    return public_key


def _new_root(trust_domain: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _ca_name(f"meshgate root CA ({trust_domain})")
    now = time.time()
    cert = (
        _ca_builder(name, name, key.public_key(), now, now + ROOT_LIFETIME, path_length=1)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _new_intermediate(
    trust_domain: str, root: x509.Certificate, root_key: CAKey
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    end = min(now + INTERMEDIATE_LIFETIME, root.not_valid_after_utc.timestamp())
    name = _ca_name(f"meshgate intermediate CA ({trust_domain})")
    cert = (
        _ca_builder(name, root.subject, key.public_key(), now, end, path_length=0)
        .add_extension(_authority_key_id(root), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    return key, cert


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    start: float,
    end: float,
    path_length: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(start - BACKDATE))
        .not_valid_after(_utc(end))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value  # checked on load
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _is_segment(text: str) -> bool:
    return _SEGMENT.fullmatch(text) is not None and text not in (".", "..")


def _keep(intermediate: x509.Certificate, path: Path, can_renew: bool) -> bool:
    """Whether to go on with this intermediate rather than issue a new one from the root."""
    expires = intermediate.not_valid_after_utc
    remaining = expires.timestamp() - time.time()
    if remaining > INTERMEDIATE_RENEW_BEFORE:
        return True
    if can_renew:
        return False
    if remaining <= 0:
        raise IdentityError(f"{path}: expired on {expires:%Y-%m-%d}, and root.key is absent to issue a new one")
    log.warning("%s expires on %s; put root.key beside it or replace it", path, f"{expires:%Y-%m-%d}")
    return True


def _check_root(root: x509.Certificate, path: Path) -> None:
    _check_ca(root, path)
    if root.not_valid_after_utc.timestamp() <= time.time():
        raise IdentityError(f"{path}: expired on {root.not_valid_after_utc:%Y-%m-%d}")
    if root.issuer != root.subject:
        raise IdentityError(f"{path}: not self-signed (issuer differs from subject)")
    if root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0:
        raise IdentityError(f"{path}: its pathLenConstraint of 0 leaves no room for the intermediate")
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(f"{path}: its self-signature does not verify") from None


def _check_intermediate(intermediate: x509.Certificate, root: x509.Certificate, path: Path) -> None:
    _check_ca(intermediate, path)
    if _extension(intermediate, x509.AuthorityKeyIdentifier) is None:
        raise IdentityError(f"{path}: {_STRICT} authorityKeyIdentifier, and it is missing")
    try:
        intermediate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(f"{path}: not signed by root.pem") from None


_STRICT = "gateways verify strictly (OpenSSL X509_STRICT), which needs"


def _check_ca(cert: x509.Certificate, path: Path) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.value.ca:
        raise IdentityError(f"{path}: not a CA certificate (basicConstraints CA:TRUE is missing)")
    if not constraints.critical:
        raise IdentityError(f"{path}: {_STRICT} basicConstraints marked critical")
    usage = _extension(cert, x509.KeyUsage)
    if usage is None or not usage.value.key_cert_sign:
        raise IdentityError(f"{path}: {_STRICT} keyUsage with keyCertSign")
    if _extension(cert, x509.SubjectKeyIdentifier) is None:
        raise IdentityError(f"{path}: {_STRICT} subjectKeyIdentifier, and it is missing")
    _check_ca_key(cert, path)


def _extension(cert: x509.Certificate, kind: type[ExtensionT]) -> x509.Extension[ExtensionT] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _check_ca_key(cert: x509.Certificate, path: Path) -> None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise IdentityError(f"{path}: unsupported key type {type(key).__name__} (use ECDSA or RSA)")


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise IdentityError(f"{path}: not a PEM certificate") from None


def _load_key(path: Path, cert: x509.Certificate) -> CAKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o); chmod 600 it", path, mode)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise IdentityError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"{path}: unsupported key type {type(key).__name__} (use ECDSA or RSA)")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise IdentityError(f"{path}: does not match the public key in {path.with_suffix('.pem').name}")
    return key


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_key(path: Path, key: CAKey) -> None:
    path.parent.chmod(0o700)  # the directory that holds a CA key is ours alone
    _write(path, _key_pem(key), 0o600)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file and a rename, so a crash leaves the old file or the new one, never half."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Two dashboards starting on one directory must not both create a CA."""
    try:
        fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        # A read-only directory (a mounted secret, say) can only be loaded from, and loading needs no lock.
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _key_pem(key: CAKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
