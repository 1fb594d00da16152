"""TLS on the gRPC port: credentials from the configured PEM files, checked before the port opens."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from prefd_server.kernel.ids import id_problem
from prefd_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

CERT_FILE = "PREFD_TLS_CERT_FILE"
KEY_FILE = "PREFD_TLS_KEY_FILE"
CLIENT_CA_FILE = "PREFD_TLS_CLIENT_CA_FILE"
SUBJECT_AS_CALLER = "PREFD_TLS_CLIENT_SUBJECT_AS_CALLER"
SUBJECT_ROLES = "PREFD_TLS_CLIENT_SUBJECT_ROLES"


def read_pem(setting: str, path: Path) -> bytes:
    """The bytes of a configured file; SettingsError naming the setting when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def _certificates(setting: str, path: Path) -> list[x509.Certificate]:
    data = read_pem(setting, path)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise SettingsError(f"{setting}: {path} holds no readable PEM certificate") from exc
    return certificates


def _private_key_spki(path: Path, data: bytes) -> bytes:
    """The key's public half (DER SubjectPublicKeyInfo), to check it belongs to the certificate."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise SettingsError(f"{KEY_FILE}: {path} is encrypted; prefd needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SettingsError(f"{KEY_FILE}: {path} holds no readable PEM private key") from exc
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_caller_settings(settings: Settings) -> None:
    if not settings.tls_client_subject_as_caller:
        return
    if settings.tls_client_ca_file is None:
        raise SettingsError(
            f"{SUBJECT_AS_CALLER}: needs {CLIENT_CA_FILE} (only a client certificate the server "
            "verified may stand for a caller)"
        )
    for name in settings.tls_client_subject_roles:
        problem = id_problem(name)
        if problem:
            raise SettingsError(f"{SUBJECT_ROLES}: {name[:128]!r} can never be a caller's name: {problem}")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (requiring client certificates when a client CA is set),
    or None for plaintext; SettingsError naming the setting for anything prefd cannot serve with."""
    cert_file, key_file, ca_file = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert_file is None and key_file is None:
        if ca_file is not None:
            raise SettingsError(f"{CLIENT_CA_FILE}: needs {CERT_FILE} and {KEY_FILE} (the server's own certificate)")
        if settings.tls_client_subject_as_caller:
            raise SettingsError(f"{SUBJECT_AS_CALLER}: needs {CERT_FILE}, {KEY_FILE} and {CLIENT_CA_FILE}")
        return None
    if cert_file is None:
        raise SettingsError(f"{CERT_FILE}: not set; {KEY_FILE} needs the certificate it belongs to")
    if key_file is None:
        raise SettingsError(f"{KEY_FILE}: not set; {CERT_FILE} needs its private key")
    chain = _certificates(CERT_FILE, cert_file)
    key = read_pem(KEY_FILE, key_file)
    leaf_spki = (
        chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if _private_key_spki(key_file, key) != leaf_spki:
        raise SettingsError(f"{KEY_FILE}: {key_file} is not the private key of the certificate in {cert_file}")
    if chain[0].not_valid_after_utc < datetime.now(UTC):
        log.warning("%s: the certificate in %s expired at %s", CERT_FILE, cert_file, chain[0].not_valid_after_utc)
    client_ca = None
    if ca_file is not None:
        _certificates(CLIENT_CA_FILE, ca_file)
        client_ca = read_pem(CLIENT_CA_FILE, ca_file)
    _check_caller_settings(settings)
    return grpc.ssl_server_credentials(
        [(key, read_pem(CERT_FILE, cert_file))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def add_port(server: grpc.aio.Server, settings: Settings) -> int:
    """Open the gRPC port: TLS only when a certificate is configured, else plaintext; the bound port."""
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def self_anchored_names(cert_file: Path) -> tuple[list[str], list[str]] | None:
    """The DNS names and IP addresses the leaf of `cert_file` carries when the file ends with its own
    trust anchor (a self-signed certificate, or a chain followed by its root), so that the file alone
    can be trusted; None otherwise."""
    try:
        chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
    except (OSError, ValueError):
        return None
    anchor = chain[-1]
    if anchor.issuer != anchor.subject:
        return None
    try:
        names = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return names.get_values_for_type(x509.DNSName), [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


def grpcurl_flags(settings: Settings) -> list[str] | None:
    """grpcurl's flags to reach this server on localhost: `-plaintext`, or `-cacert` (and `-authority`
    when the certificate does not name localhost) when PREFD_TLS_CERT_FILE carries its own trust
    anchor; None when grpcurl needs files prefd does not have (a CA, a client certificate)."""
    if settings.tls_cert_file is None:
        return ["-plaintext"]
    if settings.tls_client_ca_file is not None:
        return None
    names = self_anchored_names(settings.tls_cert_file)
    if names is None or not names[0]:
        return None  # grpcurl checks a certificate's DNS names, and there is none
    flags = ["-cacert", str(settings.tls_cert_file.resolve())]
    if "localhost" not in names[0]:
        flags += ["-authority", names[0][0]]
    return flags
