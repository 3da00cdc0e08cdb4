"""The OPC UA client certificate and the trust list of server certificates.

The client proves who it is with a self-signed X.509 certificate that
:func:`ensure_client_certificate` creates on first use (the private key file mode 0600, never
readable by group or others). The server proves who it is with its own certificate, which the
client accepts only if an exact copy sits in the trust-list folder (:class:`TrustList`): a
certificate pinned by a person, not one trusted silently because it was the first seen.

asyncua checks nothing by default (``Client.certificate_validator`` is None), so the driver must
set ``client.certificate_validator = TrustList(folder)``. The check runs inside CreateSession,
before ActivateSession, so a user name and password never reach an untrusted server.

Everything here except :meth:`TrustList.__call__` does blocking file I/O: from the event loop,
call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.sdk import KeyFileError, LampyreError, create_file_atomically, read_private_file

__all__ = [
    "CERT_VALIDITY_DAYS",
    "RSA_KEY_BITS",
    "TRUSTED_SUFFIXES",
    "CertificateFileError",
    "KeyFileError",
    "ServerCertificateExpired",
    "TrustList",
    "UntrustedServerCertificate",
    "certificate_application_uri",
    "ensure_client_certificate",
    "fingerprint",
    "load_certificate",
]

log = logging.getLogger(__name__)

RSA_KEY_BITS = 2048
"""Minimum for Basic256Sha256 and the two Aes* policies (they allow 2048 to 4096)."""
CERT_VALIDITY_DAYS = 730
CLOCK_SKEW_S = 300
"""The certificate is back-dated by this much so a server whose clock is a little behind
does not refuse it as not yet valid."""
TRUSTED_SUFFIXES = (".der", ".cer", ".crt", ".pem")
"""Files in the trust-list folder that are read as certificates; anything else is ignored."""

_PEM_MARKER = b"-----BEGIN"


class CertificateFileError(LampyreError):
    """A certificate file cannot be read or does not fit its key."""


class UntrustedServerCertificate(LampyreError):
    """The server's certificate is not in the trust list: the connection is refused."""

    def __init__(self, message: str, certificate: x509.Certificate) -> None:
        super().__init__(message)
        self.certificate = certificate


class ServerCertificateExpired(UntrustedServerCertificate):
    """The server's certificate is trusted but outside its validity period."""


# --------------------------------------------------------------------------- helpers


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as colon-separated upper-case hex (``AB:CD:...``), the
    form OPC UA servers and ``openssl x509 -fingerprint -sha256`` show."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def certificate_application_uri(cert: x509.Certificate) -> str | None:
    """The application URI in the certificate's subject alternative name, if any (the client's
    ``application_uri`` must equal it, or servers refuse the session)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate in ``path``, DER or PEM (told apart by content, not name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateFileError(f"cannot read certificate {path}: {exc.strerror}") from None
    certs = _parse_certificates(data)
    if not certs:
        raise CertificateFileError(f"{path} holds no DER or PEM X.509 certificate")
    return certs[0]


def _parse_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        if _PEM_MARKER in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        return []


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


# --------------------------------------------------------------------------- client certificate


def ensure_client_certificate(
    cert_path: Path, key_path: Path, *, application_uri: str, common_name: str
) -> tuple[Path, Path]:
    """The client certificate and private key at these paths, created if missing.

    A missing key is generated (RSA, :data:`RSA_KEY_BITS`) and written atomically with mode
    0600; a missing certificate is self-signed with that key for ``application_uri``. The
    certificate is written as PEM if ``cert_path`` ends in ``.pem``, DER otherwise (what OPC UA
    servers usually import); the key is always PEM (PKCS#8, unencrypted: the agent starts
    unattended). Existing files are kept as they are, never overwritten.

    Raises :class:`KeyFileError` if the key file is a symlink, not a regular file or open to
    group/others, and :class:`CertificateFileError` if an existing certificate does not belong
    to the key or exists without its key.
    """
    key = _read_private_key(key_path)
    if key is None:
        if cert_path.exists():
            raise CertificateFileError(
                f"certificate {cert_path} exists but its private key {key_path} does not; "
                "restore the key, or move the certificate away to create a new pair"
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            create_file_atomically(key_path, pem, mode=0o600)
        except FileExistsError:
            # Another process created it between our read and our create: use theirs.
            key = _read_private_key(key_path)
            if key is None:
                raise KeyFileError(f"key file {key_path} vanished while being created") from None
        else:
            log.info("created OPC UA client private key %s (mode 0600)", key_path)
    if cert_path.exists():
        cert = load_certificate(cert_path)
        if cert.public_key() != key.public_key():
            raise CertificateFileError(
                f"certificate {cert_path} does not belong to private key {key_path}"
            )
        return cert_path, key_path
    cert = _self_signed(key, application_uri=application_uri, common_name=common_name)
    encoding = (
        serialization.Encoding.PEM
        if cert_path.suffix.lower() == ".pem"
        else serialization.Encoding.DER
    )
    with contextlib.suppress(FileExistsError):
        create_file_atomically(cert_path, cert.public_bytes(encoding), mode=0o644)
        log.info(
            "created OPC UA client certificate %s for %s, SHA-256 %s",
            cert_path,
            application_uri,
            fingerprint(cert),
        )
    return cert_path, key_path


def _self_signed(
    key: rsa.RSAPrivateKey, *, application_uri: str, common_name: str
) -> x509.Certificate:
    # A common name is capped at 64 (UTF-8) bytes; a long gateway or bus id must not break it.
    short_name = common_name.encode()[:64].decode(errors="ignore") or "Lampyre"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, short_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lampyre"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW_S))
        .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(application_uri)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,  # nonRepudiation, which OPC UA Part 6 asks for
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _read_private_key(path: Path) -> rsa.RSAPrivateKey | None:
    """The key at ``path``, or None if there is no file; refuses symlinks and open modes."""
    try:
        data = read_private_file(path)
    except FileNotFoundError:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never include the file's content: it is (or was meant to be) a secret.
        raise KeyFileError(f"key file {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < RSA_KEY_BITS:
        raise KeyFileError(
            f"key file {path} is not an RSA key of at least {RSA_KEY_BITS} bits, "
            "which the OPC UA security policies need"
        )
    return key


# --------------------------------------------------------------------------- trust list


class TrustList:
    """Server certificates trusted by an exact copy in ``folder`` (DER or PEM files).

    An instance is an asyncua ``CertificateValidatorMethod``: assign it to
    ``Client.certificate_validator``. A certificate is accepted if the folder holds the same
    certificate (compared byte for byte, i.e. by SHA-256 fingerprint) and it is within its
    validity period. The folder is read at every check, so a certificate copied in takes
    effect at the next connection attempt without a restart.

    ``trust_on_first_use`` (off by default, and only when the configuration says so) accepts
    an unknown certificate *only while the folder holds no certificate at all*, stores it there
    and logs a warning with its fingerprint. Once a certificate is pinned, a different one is
    refused like any untrusted certificate, since a changed server certificate is exactly what
    an attacker in the middle would present.
    """

    def __init__(self, folder: Path, *, trust_on_first_use: bool = False) -> None:
        self.folder = folder
        self.trust_on_first_use = trust_on_first_use

    def __repr__(self) -> str:
        return f"TrustList({str(self.folder)!r}, trust_on_first_use={self.trust_on_first_use})"

    async def __call__(self, certificate: x509.Certificate, application: object) -> None:
        """The asyncua validator hook; ``application`` (the server's ApplicationDescription)
        is not used: trust is in the pinned certificate, not in what the server claims."""
        await asyncio.to_thread(self.validate, certificate)

    def certificates(self) -> list[x509.Certificate]:
        """Every certificate in the folder; unreadable files are logged and skipped."""
        found: list[x509.Certificate] = []
        try:
            entries = sorted(self.folder.iterdir())
        except FileNotFoundError:
            return found
        for entry in entries:
            if entry.suffix.lower() not in TRUSTED_SUFFIXES or not entry.is_file():
                continue
            try:
                certs = _parse_certificates(entry.read_bytes())
            except OSError as exc:
                log.warning("trust list: cannot read %s: %s", entry, exc.strerror)
                continue
            if not certs:
                log.warning("trust list: %s holds no DER or PEM certificate; ignored", entry)
            found.extend(certs)
        return found

    def validate(self, certificate: x509.Certificate) -> None:
        """Return if ``certificate`` is trusted; raise :class:`UntrustedServerCertificate`
        (or :class:`ServerCertificateExpired`) with what a technician needs otherwise."""
        trusted = self.certificates()
        wanted = certificate.fingerprint(hashes.SHA256())
        if any(c.fingerprint(hashes.SHA256()) == wanted for c in trusted):
            self._check_validity(certificate)
            return
        if self.trust_on_first_use and not trusted:
            self._check_validity(certificate)
            path = self.add(certificate)
            log.warning(
                "trust on first use: trusting OPC UA server certificate %s, SHA-256 %s, "
                "stored as %s; compare the fingerprint with the server's",
                _describe(certificate),
                fingerprint(certificate),
                path,
            )
            return
        why = (
            "trust on first use is on, but the trust list already holds another certificate"
            if self.trust_on_first_use
            else "it is not in the trust list"
        )
        raise UntrustedServerCertificate(
            f"OPC UA server certificate refused: {why}. Subject: {_describe(certificate)}; "
            f"SHA-256 fingerprint: {fingerprint(certificate)}. If the server's administrator "
            f"confirms this fingerprint, copy the certificate into {self.folder} "
            f"(lampyre opcua trust --dir {self.folder} CERTFILE)",
            certificate,
        )

    def add(self, certificate: x509.Certificate) -> Path:
        """Store ``certificate`` in the folder (DER, named after its subject and fingerprint)
        and return its path; a copy already there is left as it is."""
        path = self.folder / _trusted_file_name(certificate)
        with contextlib.suppress(FileExistsError):
            der = certificate.public_bytes(serialization.Encoding.DER)
            create_file_atomically(path, der, mode=0o644)
        return path

    @staticmethod
    def _check_validity(certificate: x509.Certificate) -> None:
        now = dt.datetime.now(dt.UTC)
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if not start <= now <= end:
            raise ServerCertificateExpired(
                f"OPC UA server certificate {_describe(certificate)} (SHA-256 "
                f"{fingerprint(certificate)}) is trusted but valid only from "
                f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC; the server needs a new "
                "certificate (or this "
                "gateway's clock is wrong)",
                certificate,
            )


def _trusted_file_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    label = str(names[0].value) if names else "server"
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "server"
    return f"{label[:40]}_{certificate.fingerprint(hashes.SHA256()).hex()[:16]}.der"
