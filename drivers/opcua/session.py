"""Opening an OPC UA client session the way a bus table describes it.

One function, :func:`open_client`, used by the driver at every (re)connection and by the
``lampyre opcua browse`` tool: it builds a fresh asyncua ``Client`` (a client that lost its
server is never reused: reconnecting the same client object can hang on a black-holed
address), loads the client certificate and key through the SDK's private-file rules, pins the
server certificate to the trust list, sets the user identity and connects, all or nothing.

Errors are :class:`SessionError` (or its subclasses) with a message for a technician; the
driver turns them into ``BusUnavailable`` or ``FatalDriverError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.sdk import KeyFileError, LampyreError, read_private_file

from .security import (
    TrustList,
    UntrustedServerCertificate,
    certificate_application_uri,
    load_certificate,
)
from .settings import BusSettings, default_application_uri

__all__ = [
    "POLICY_CLASSES",
    "ClientFilesMissing",
    "SessionError",
    "SessionRefused",
    "close_client",
    "open_client",
]

log = logging.getLogger(__name__)

POLICY_CLASSES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
CLOSE_TIMEOUT_S = 1.5
"""Bound on the polite goodbye (CloseSession) before the socket is simply closed: a frozen
server must not hold a reconnection up."""


class SessionError(LampyreError):
    """The session could not be opened; the message says why and what to do."""


class ClientFilesMissing(SessionError):
    """The client certificate or key is missing or unusable (nothing network-related)."""


class SessionRefused(SessionError):
    """The server or the trust list refused the session (certificate, identity, policy): a
    retry will fail the same way until someone changes a file or the server's settings."""


@dataclass(frozen=True, slots=True)
class _ClientFiles:
    certificate_der: bytes
    key_der: bytes
    application_uri: str


def _key_to_der(data: bytes, path: str) -> bytes:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        try:
            key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError):
            raise KeyFileError(
                f"key file {path} is not an unencrypted PEM or DER private key"
            ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"key file {path} is not an RSA key, which OPC UA security needs")
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_client_files(settings: BusSettings, bus_id: str) -> _ClientFiles:
    """Blocking: the client certificate (DER) and key, with the SDK's permission rules."""
    hint = f"create them with: lampyre opcua cert --config CONFIG --bus {bus_id}"
    if not settings.certificate.exists():
        raise ClientFilesMissing(f"no OPC UA client certificate at {settings.certificate}; {hint}")
    try:
        key_data = read_private_file(settings.private_key)
    except FileNotFoundError:
        raise ClientFilesMissing(
            f"no OPC UA client private key at {settings.private_key}; {hint}"
        ) from None
    except KeyFileError as exc:
        raise ClientFilesMissing(str(exc)) from None
    try:
        key_der = _key_to_der(key_data, str(settings.private_key))
        cert = load_certificate(settings.certificate)
    except LampyreError as exc:
        raise ClientFilesMissing(str(exc)) from None
    public = serialization.load_der_private_key(key_der, password=None).public_key()
    if cert.public_key() != public:
        raise ClientFilesMissing(
            f"certificate {settings.certificate} does not belong to key {settings.private_key}"
        )
    in_cert = certificate_application_uri(cert)
    if settings.application_uri is not None and in_cert not in (None, settings.application_uri):
        raise ClientFilesMissing(
            f"application_uri is {settings.application_uri!r} but certificate "
            f"{settings.certificate} was made for {in_cert!r}; servers refuse such a session. "
            "Make a new certificate or change application_uri"
        )
    uri = in_cert or settings.application_uri or default_application_uri()
    return _ClientFiles(cert.public_bytes(serialization.Encoding.DER), key_der, uri)


def _load_user_identity(
    settings: BusSettings,
) -> tuple[str | None, x509.Certificate | None, bytes | None]:
    """Blocking: the password, or the user certificate and its key (DER)."""
    if settings.identity == "username":
        assert settings.password_file is not None
        try:
            raw = read_private_file(settings.password_file, limit=4096)
        except FileNotFoundError:
            raise ClientFilesMissing(f"no password file at {settings.password_file}") from None
        except KeyFileError as exc:
            raise ClientFilesMissing(str(exc)) from None
        try:
            password = raw.decode().rstrip("\r\n")
        except UnicodeDecodeError:
            raise ClientFilesMissing(
                f"password file {settings.password_file} is not UTF-8"
            ) from None
        return password, None, None
    if settings.identity == "certificate":
        assert settings.user_certificate is not None and settings.user_private_key is not None
        try:
            cert = load_certificate(settings.user_certificate)
            key = _key_to_der(
                read_private_file(settings.user_private_key), str(settings.user_private_key)
            )
        except FileNotFoundError:
            raise ClientFilesMissing(f"no user key at {settings.user_private_key}") from None
        except LampyreError as exc:
            raise ClientFilesMissing(str(exc)) from None
        return None, cert, key
    return None, None, None


def _first_certificate(data: bytes) -> bytes:
    """The server's own certificate (DER) out of what its endpoint sends, which may be a chain."""
    # A chain is DER certificates back to back; the first is the server's own. Its length is
    # in its outer SEQUENCE header (0x30, then a short or long-form length).
    if len(data) > 4 and data[0] == 0x30 and data[1] & 0x80:
        size_bytes = data[1] & 0x7F
        end = 2 + size_bytes + int.from_bytes(data[2 : 2 + size_bytes], "big")
        data = data[:end]
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def _refusal(exc: BaseException) -> SessionRefused | None:
    """A refusal that retrying will not cure, with the words a technician needs."""
    if isinstance(exc, UntrustedServerCertificate):
        return SessionRefused(str(exc))
    if isinstance(exc, UaStatusCodeError):
        code = exc.code
        names = {
            StatusCodes.BadCertificateUntrusted: "the server does not trust this gateway's "
            "client certificate: give the certificate (lampyre opcua cert prints its path and "
            "fingerprint) to the server's administrator",
            StatusCodes.BadSecurityChecksFailed: "the server refused this gateway's "
            "certificate or signature (BadSecurityChecksFailed): check that it trusts the "
            "client certificate",
            StatusCodes.BadIdentityTokenRejected: "the server refused the user identity "
            "(BadIdentityTokenRejected)",
            StatusCodes.BadIdentityTokenInvalid: "the server does not accept this kind of "
            "user identity (BadIdentityTokenInvalid)",
            StatusCodes.BadUserAccessDenied: "the server refused the user name or password "
            "(BadUserAccessDenied)",
            StatusCodes.BadCertificateUriInvalid: "the server says the certificate's "
            "application URI does not match (BadCertificateUriInvalid)",
            StatusCodes.BadSecurityPolicyRejected: "the server rejects this security policy",
        }
        if code in names:
            return SessionRefused(names[code])
    return None


async def open_client(settings: BusSettings, *, bus_id: str, name: str) -> Client:
    """A connected client with an activated session; all or nothing.

    Raises :class:`ClientFilesMissing` for missing or unusable local files,
    :class:`SessionRefused` when the server or the trust list refuse (untrusted certificate,
    wrong identity, no endpoint with the configured policy), and :class:`SessionError` for
    everything else (refused connection, time-out, reset), which a retry may cure.
    """
    client = Client(
        settings.endpoint,
        timeout=settings.request_timeout_s,
        watchdog_intervall=settings.keepalive_s,
    )
    client.session_timeout = int(settings.session_timeout_s * 1000)
    client.name = client.description = f"Lampyre {name}"
    client.product_uri = "urn:lampyre:agent"
    password, user_cert, user_key = await asyncio.to_thread(_load_user_identity, settings)
    if settings.identity == "username":
        client.set_user(settings.username or "")
        client.set_password(password or "")
    elif user_cert is not None and user_key is not None:
        client.user_certificate = user_cert
        client.user_private_key = serialization.load_der_private_key(user_key, password=None)
    try:
        policy = POLICY_CLASSES.get(settings.policy, security_policies.SecurityPolicyNone)
        mode = _MODES.get(settings.mode, ua.MessageSecurityMode.None_)
        # Discovery: GetEndpoints on an unsecured channel lists what the server offers and
        # gives its certificate; the trust list checks that certificate at CreateSession,
        # before any credential is sent.
        async with asyncio.timeout(settings.request_timeout_s * 2):
            endpoints = await client.connect_and_get_server_endpoints()
        try:
            endpoint = Client.find_endpoint(endpoints, mode, policy.URI)
        except UaError:
            offered = sorted(
                {
                    f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]} {e.SecurityMode.name.rstrip('_')}"
                    for e in endpoints
                    if e.EndpointUrl.startswith(ua.OPC_TCP_SCHEME)
                }
            )
            raise SessionRefused(
                f"the server offers no endpoint with {settings.policy} {settings.mode}; "
                f"it offers: {', '.join(offered) or 'none'}"
            ) from None
        if settings.secure:
            files = await asyncio.to_thread(_load_client_files, settings, bus_id)
            client.application_uri = files.application_uri
            client.certificate_validator = TrustList(
                settings.trust_dir, trust_on_first_use=settings.trust_on_first_use
            )
            await client.set_security(
                policy,
                certificate=files.certificate_der,
                private_key=files.key_der,
                server_certificate=_first_certificate(endpoint.ServerCertificate),
                mode=mode,
            )
        async with asyncio.timeout(settings.request_timeout_s * 3):
            await client.connect()
    except SessionError:
        await close_client(client)
        raise
    except (Exception, TimeoutError) as exc:
        await close_client(client)
        refusal = _refusal(exc)
        if refusal is not None:
            raise refusal from None
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = "no answer in time"
        raise SessionError(
            f"cannot open an OPC UA session with {settings.endpoint}: {reason}"
        ) from None
    return client


async def close_client(client: Client) -> None:
    """Close politely if the server answers quickly, else just drop the socket. Never raises."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await client.disconnect()
    except (Exception, TimeoutError):
        log.debug("OPC UA session did not close cleanly; dropping the connection")
        with contextlib.suppress(Exception):
            client.uaclient.request_disconnect()
        with contextlib.suppress(Exception):
            client.disconnect_socket()
