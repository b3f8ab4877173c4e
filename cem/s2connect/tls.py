"""The CEM's own TLS material for S2 Connect: a self-signed CA and a leaf it signed.

LAN pairing servers have no public certificate: the spec has them make a self-signed root
and a separate server (leaf) certificate. Paired clients pin the root, so the leaf may be
renewed (it is, when it has less than 30 days left or lacks a name it must carry) without
pairing again; the root lives 20 years. Made with `cryptography`, EC P-256, kept in one folder
next to the store: ``ca.pem``, ``ca.key``, ``leaf.pem`` (leaf then CA: the chain the server
sends, so clients can pin the root), ``leaf.key``; keys are 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sitekit.s2connect import sha256_fingerprint

CA_YEARS = 20
LEAF_DAYS = 180
RENEW_DAYS = 30


@dataclass(frozen=True)
class TlsMaterial:
    """Paths and fingerprints of the CEM's S2 Connect certificates."""

    folder: Path
    ca_cert: Path
    chain: Path            # leaf + CA, what the server presents
    leaf_key: Path
    ca_der: bytes
    leaf_der: bytes

    @property
    def leaf_fingerprint(self) -> bytes:
        """F in the LAN challenge-response: SHA-256 of the leaf (32 bytes)."""
        return sha256_fingerprint(self.leaf_der)

    @property
    def ca_fingerprint(self) -> bytes:
        return sha256_fingerprint(self.ca_der)

    @property
    def ca_pem(self) -> str:
        return self.ca_cert.read_text(encoding="ascii")


def default_names(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names the leaf carries: loopback, this host (also as .local) and any extra."""
    host = socket.gethostname().split(".")[0] or "localhost"
    names = ["localhost", "127.0.0.1", "::1", host, f"{host}.local", *extra]
    return tuple(dict.fromkeys(n for n in names if n and n not in ("0.0.0.0", "::")))


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _new_ca(now: dt.datetime, label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} S2 Connect root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _new_leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, names: tuple[str, ...],
              now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_san(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _leaf_ok(leaf: x509.Certificate, names: tuple[str, ...], now: dt.datetime) -> bool:
    if leaf.not_valid_after_utc - now < dt.timedelta(days=RENEW_DAYS):
        return False
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    wanted = set()
    for name in names:
        try:
            wanted.add(str(ipaddress.ip_address(name)))
        except ValueError:
            wanted.add(name)
    return wanted <= have


def ensure_tls(folder: Path, names: tuple[str, ...], *, label: str = "S2 CEM") -> TlsMaterial:
    """The CA and leaf in `folder`, made on first use; the leaf renewed when due.

    Raises OSError when the folder cannot be written or ValueError for unreadable files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        now = dt.datetime.now(dt.UTC)
        ca_path, ca_key_path = folder / "ca.pem", folder / "ca.key"
        chain_path, leaf_key_path = folder / "leaf.pem", folder / "leaf.key"
        if ca_path.exists() and ca_key_path.exists():
            ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
            loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{ca_key_path} is not an EC key")
            ca_key = loaded
        else:
            ca_key, ca = _new_ca(now, label)
            _write(ca_key_path, _key_pem(ca_key), private=True)
            _write(ca_path, _pem(ca))
            chain_path.unlink(missing_ok=True)
        leaf = None
        if chain_path.exists() and leaf_key_path.exists():
            leaf = x509.load_pem_x509_certificates(chain_path.read_bytes())[0]
            if leaf.issuer != ca.subject or not _leaf_ok(leaf, names, now):
                leaf = None
        if leaf is None:
            leaf_key, leaf = _new_leaf(ca_key, ca, names, now)
            _write(leaf_key_path, _key_pem(leaf_key), private=True)
            _write(chain_path, _pem(leaf) + _pem(ca))
    return TlsMaterial(folder, ca_path, chain_path, leaf_key_path,
                       ca.public_bytes(serialization.Encoding.DER),
                       leaf.public_bytes(serialization.Encoding.DER))


class _folder_lock:
    """An exclusive lock file, so `cem run` and `cem pair` never both make a CA."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"

    def __enter__(self) -> None:
        import fcntl

        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
