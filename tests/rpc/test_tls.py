"""TLS and mTLS on the gRPC port: only TLS is spoken, client certificates are required and verified
under mTLS, a verified certificate may stand for the caller, bad TLS settings refuse to start, and
the healthcheck command, the client library, the examples and the printed grpcurl line speak TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shlex
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prefd.client import AsyncPrefdClient, PrefdClient, PrefdError
from prefd.client.channel import TLSConfig
from prefd.v1 import common_pb2, preferences_pb2, preferences_pb2_grpc
from prefd_server.app import App
from prefd_server.cli.serve import print_quickstart
from prefd_server.settings import Settings, SettingsError
from tests.helpers.auth import auth, token, unique
from tests.helpers.processes import ROOT
from tests.helpers.requests import set_request, user
from tests.helpers.settings import SECRET, make_settings

EXAMPLES = ROOT / "clients" / "python" / "examples"


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, the server's certificate (SAN localhost, 127.0.0.1) and key, the same
    certificate followed by its CA, clients the CA signed, and a client signed by another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    server_chain: Path
    client_cert: Path  # CN trading-engine
    client_key: Path
    admin_cert: Path  # CN ops-console
    admin_key: Path
    odd_cert: Path  # CN "not a caller" (not a valid caller name)
    odd_key: Path
    stranger_cert: Path  # CN trading-engine, signed by another CA
    stranger_key: Path
    other_ca: Path
    internal_cert: Path  # self-signed, naming only prefd.internal
    internal_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _authority(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _self_signed(dns_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(_name(dns_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _issue(
    authority: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], common_name: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = authority
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_pair(directory: Path, name: str, pair: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    key, certificate = pair
    (directory / f"{name}.pem").write_bytes(_pem(certificate))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    authority, other = _authority("prefd test CA"), _authority("another CA")
    (directory / "ca.pem").write_bytes(_pem(authority[1]))
    (directory / "other-ca.pem").write_bytes(_pem(other[1]))
    server = _issue(authority, "localhost", server=True)
    _write_pair(directory, "server", server)
    (directory / "server-chain.pem").write_bytes(_pem(server[1]) + _pem(authority[1]))
    _write_pair(directory, "client", _issue(authority, "trading-engine", server=False))
    _write_pair(directory, "admin", _issue(authority, "ops-console", server=False))
    _write_pair(directory, "odd", _issue(authority, "not a caller", server=False))
    _write_pair(directory, "stranger", _issue(other, "trading-engine", server=False))
    _write_pair(directory, "internal", _self_signed("prefd.internal"))
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        server_chain=directory / "server-chain.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        admin_cert=directory / "admin.pem",
        admin_key=directory / "admin.key",
        odd_cert=directory / "odd.pem",
        odd_key=directory / "odd.key",
        stranger_cert=directory / "stranger.pem",
        stranger_key=directory / "stranger.key",
        other_ca=directory / "other-ca.pem",
        internal_cert=directory / "internal.pem",
        internal_key=directory / "internal.key",
    )


@contextlib.asynccontextmanager
async def tls_server(database_url: str, tmp_path: Path, pki: Pki, **overrides: Any) -> AsyncIterator[App]:
    tls = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    settings = make_settings(database_url, tmp_path, **{**tls, **overrides})
    async with App(settings) as app:
        yield app


def effective(user_id: str) -> preferences_pb2.GetEffectivePreferencesRequest:
    return preferences_pb2.GetEffectivePreferencesRequest(
        subject=common_pb2.Subject(user_id=user_id), key_prefixes=["display.theme"]
    )


async def read_over(app: App, tls: TLSConfig | None, bearer: str = "", target: str = "") -> grpc.StatusCode:
    """The status of one GetEffectivePreferences call through prefd.client (OK when served)."""
    async with AsyncPrefdClient(target or f"localhost:{app.port}", bearer, tls=tls, timeout_s=10) as client:
        try:
            reply = await client.get_effective_preferences(effective(unique("u")))
        except PrefdError as error:
            return error.code
    assert reply.values[0].key == "display.theme"
    return grpc.StatusCode.OK


async def test_a_tls_port_refuses_plaintext_and_serves_clients_trusting_its_ca(
    database_url: str, tmp_path: Path, pki: Pki
) -> None:
    async with tls_server(database_url, tmp_path, pki) as app:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await preferences_pb2_grpc.PreferencesServiceStub(plain).GetEffectivePreferences(
                    effective("alice"), metadata=auth(), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        trusting = TLSConfig.from_files(ca_file=pki.ca)
        assert await read_over(app, trusting, token("service")) == grpc.StatusCode.OK
        assert await read_over(app, trusting, token("service"), f"127.0.0.1:{app.port}") == grpc.StatusCode.OK
        # A client that does not trust the server's CA never talks to it.
        stranger = TLSConfig.from_files(ca_file=pki.other_ca)
        assert await read_over(app, stranger, token("service")) == grpc.StatusCode.UNAVAILABLE
        # The server name override is what the certificate is checked against.
        named = TLSConfig.from_files(ca_file=pki.ca, server_name="localhost")
        assert await read_over(app, named, token("service"), f"127.0.0.1:{app.port}") == grpc.StatusCode.OK
        misnamed = TLSConfig.from_files(ca_file=pki.ca, server_name="elsewhere.example")
        assert await read_over(app, misnamed, token("service")) == grpc.StatusCode.UNAVAILABLE
        # Tokens are still required over TLS.
        assert await read_over(app, trusting) == grpc.StatusCode.UNAUTHENTICATED

        def blocking_read() -> str:
            with PrefdClient(f"localhost:{app.port}", token("service"), tls=trusting, timeout_s=10) as client:
                return client.get_effective_preferences(effective(unique("u"))).values[0].key

        assert await asyncio.to_thread(blocking_read) == "display.theme"


async def _prefd(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "prefd_server",
        *args,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def _example(script: str, count: int, *args: str) -> list[str]:
    """Run an example until it printed `count` JSON events (then stop it if it runs on); their names."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / script),
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    events = []
    try:
        async with asyncio.timeout(60):
            while len(events) < count:
                line = await process.stdout.readline()
                assert line, (await process.stderr.read()).decode()
                events.append(json.loads(line)["event"])
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    return events


async def test_mtls_requires_a_client_certificate_its_ca_signed(database_url: str, tmp_path: Path, pki: Pki) -> None:
    async with tls_server(database_url, tmp_path, pki, tls_client_ca_file=pki.ca) as app:
        bearer = token("service")
        no_certificate = TLSConfig.from_files(ca_file=pki.ca)
        assert await read_over(app, no_certificate, bearer) == grpc.StatusCode.UNAVAILABLE
        foreign = TLSConfig.from_files(ca_file=pki.ca, cert_file=pki.stranger_cert, key_file=pki.stranger_key)
        assert await read_over(app, foreign, bearer) == grpc.StatusCode.UNAVAILABLE
        good = TLSConfig.from_files(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        assert await read_over(app, good, bearer) == grpc.StatusCode.OK
        # Without PREFD_TLS_CLIENT_SUBJECT_AS_CALLER a certificate alone is no caller.
        assert await read_over(app, good, "") == grpc.StatusCode.UNAUTHENTICATED

        port = str(app.port)
        tls_options = ("--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key))
        code, out, err = await _prefd("healthcheck", "--port", port, *tls_options)
        assert (code, out.strip()) == (0, "SERVING"), err
        code, _, err = await _prefd("healthcheck", "--port", port, "--ca-file", str(pki.ca))
        assert (code, err.splitlines()[-1]) == (1, "unhealthy: UNAVAILABLE")
        code, _, err = await _prefd("healthcheck", "--port", port)
        assert (code, err.splitlines()[-1]) == (1, "unhealthy: UNAVAILABLE")
        # The options may come from the environment, as the container's HEALTHCHECK has them.
        env = {
            "PREFD_HEALTHCHECK_CA_FILE": str(pki.ca),
            "PREFD_HEALTHCHECK_CERT_FILE": str(pki.client_cert),
            "PREFD_HEALTHCHECK_KEY_FILE": str(pki.client_key),
            "PREFD_HEALTHCHECK_SERVER_NAME": "localhost",
        }
        code, out, err = await _prefd("healthcheck", "--port", port, env=env)
        assert (code, out.strip()) == (0, "SERVING"), err
        code, _, err = await _prefd("healthcheck", "--port", port, "--ca-file", str(tmp_path / "missing.pem"))
        assert code == 2 and "ca_file: cannot read" in err

        uid = unique("trader")
        common = ("--target", f"localhost:{port}", "--token", token("admin", "example-operator"), *tls_options)
        trading, generation, notification = await asyncio.gather(
            _example("trading_engine.py", 2, *common, "--user", uid),
            _example("generation_worker.py", 2, *common, "--user", uid, "--jobs", "1"),
            _example("notification_worker.py", 2, *common, "--user", uid, "--events", "1"),
        )
        assert (trading, generation, notification) == (
            ["ready", "order_check"],
            ["ready", "job_done"],
            ["ready", "decided"],
        )


async def test_a_verified_client_certificate_stands_for_the_caller_when_configured(
    database_url: str, tmp_path: Path, pki: Pki
) -> None:
    async with tls_server(
        database_url,
        tmp_path,
        pki,
        tls_client_ca_file=pki.ca,
        tls_client_subject_as_caller=True,
        tls_client_subject_roles={"ops-console": "admin"},
    ) as app:
        target = f"localhost:{app.port}"
        engine = TLSConfig.from_files(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        console = TLSConfig.from_files(ca_file=pki.ca, cert_file=pki.admin_cert, key_file=pki.admin_key)
        odd = TLSConfig.from_files(ca_file=pki.ca, cert_file=pki.odd_cert, key_file=pki.odd_key)
        uid, other = unique("u"), unique("u")
        conn = await asyncpg.connect(app.dsn)
        try:
            # trading-engine: the default role, service: reads any subject, writes nothing.
            assert await read_over(app, engine) == grpc.StatusCode.OK
            async with AsyncPrefdClient(target, "", tls=engine) as client:
                with pytest.raises(PrefdError) as denied:
                    await client.set_preferences(set_request(user(uid), {"display.theme": "dark"}))
                assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert await conn.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", uid) == 0
            # ops-console: mapped to admin; its writes are recorded under its name.
            async with AsyncPrefdClient(target, "", tls=console) as client:
                reply = await client.set_preferences(set_request(user(uid), {"display.theme": "dark"}))
                assert reply.changes[0].new_version == 1
            assert await conn.fetchval("SELECT actor FROM changes WHERE scope_id = $1", uid) == "ops-console"
            # A bearer token still decides who calls: a user token reads only itself, certificate or not.
            as_user = token("user", uid)
            async with AsyncPrefdClient(target, as_user, tls=engine) as client:
                await client.get_effective_preferences(effective(uid))
                with pytest.raises(PrefdError) as denied:
                    await client.get_effective_preferences(effective(other))
                assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
            # A malformed authorization header is refused, never replaced by the certificate.
            async with grpc.aio.secure_channel(target, engine.credentials()) as channel:
                stub = preferences_pb2_grpc.PreferencesServiceStub(channel)
                for header in ("Basic abc", "Bearer ", "Bearer not.a.jwt"):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.GetEffectivePreferences(
                            effective(uid), metadata=(("authorization", header),), timeout=10
                        )
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, header
            # A common name that is no valid caller name is refused.
            assert await read_over(app, odd) == grpc.StatusCode.UNAUTHENTICATED
            async with AsyncPrefdClient(target, "", tls=odd) as client:
                with pytest.raises(PrefdError) as refused_write:
                    await client.set_preferences(set_request(user(other), {"display.theme": "dark"}))
                assert refused_write.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert await conn.fetchval("SELECT count(*) FROM changes WHERE scope_id = $1", other) == 0
        finally:
            await conn.close()


def test_tls_files_the_client_cannot_use_are_refused_at_once(pki: Pki) -> None:
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        TLSConfig.from_files(ca_file=pki.ca, cert_file=pki.client_cert)
    with pytest.raises(ValueError, match="ca_file: cannot read"):
        TLSConfig.from_files(ca_file=pki.ca.with_name("missing.pem"))


def _embedded_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(database_url=None, data_dir=tmp_path / "data", jwt_secret=SECRET, **overrides)


async def test_the_printed_grpcurl_line_and_the_healthcheck_trust_a_self_anchored_certificate(
    database_url: str, tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    # A certificate file that ends with its CA, and a self-signed one naming only prefd.internal:
    # the printed line trusts the file with -cacert (and names the server with -authority).
    for cert, key, authority in (
        (pki.server_chain, pki.server_key, None),
        (pki.internal_cert, pki.internal_key, "prefd.internal"),
    ):
        async with tls_server(database_url, tmp_path, pki, tls_cert_file=cert, tls_key_file=key) as app:
            settings = _embedded_settings(tmp_path, tls_cert_file=cert, tls_key_file=key)
            print_quickstart(settings, app.port, embedded=True)
            printed = capsys.readouterr().out.splitlines()
            export = next(line for line in printed if line.startswith("export PREFD_TOKEN="))
            [grpcurl] = [line for line in printed if line.startswith("grpcurl ")]
            assert "-plaintext" not in grpcurl and f"-cacert {shlex.quote(str(cert))}" in grpcurl
            assert ("-authority" in grpcurl) == (authority is not None)
            process = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                f"{export}\n{grpcurl}\n",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
            )
            async with asyncio.timeout(30):
                out, err = await process.communicate()
            assert process.returncode == 0, err.decode()
            assert "display.theme" in out.decode()
            # The container's HEALTHCHECK: the server's own settings, no options.
            server_env = {"PREFD_TLS_CERT_FILE": str(cert), "PREFD_TLS_KEY_FILE": str(key)}
            code, out_text, err_text = await _prefd("healthcheck", "--port", str(app.port), env=server_env)
            assert (code, out_text.strip()) == (0, "SERVING"), err_text
        if authority is None:
            # The same server certificate without its CA in the file: nothing to trust but the system's roots.
            not_anchored = {"PREFD_TLS_CERT_FILE": str(pki.server_cert), "PREFD_TLS_KEY_FILE": str(key)}
            async with tls_server(database_url, tmp_path, pki) as app:
                code, _, err_text = await _prefd("healthcheck", "--port", str(app.port), env=not_anchored)
                assert (code, err_text.splitlines()[-1]) == (1, "unhealthy: UNAVAILABLE")

    # Without the CA in the file, or under mTLS, grpcurl needs files prefd does not have: no
    # runnable line, a comment saying what to add.
    for extra in ({}, {"tls_client_ca_file": pki.ca}):
        settings = _embedded_settings(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, **extra)
        print_quickstart(settings, 50051, embedded=True)
        printed_text = capsys.readouterr().out
        assert "\ngrpcurl " not in printed_text and "-plaintext" not in printed_text
        assert "# grpcurl -cacert CA.pem" in printed_text
        assert ("-cert CLIENT.pem -key CLIENT.key" in printed_text) == bool(extra)
    # Plaintext: unchanged.
    print_quickstart(_embedded_settings(tmp_path), 50051, embedded=True)
    assert "\ngrpcurl -plaintext " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "setting", "message"),
    [
        ("missing cert", "PREFD_TLS_CERT_FILE", "cannot read {missing}: No such file or directory"),
        ("cert without key", "PREFD_TLS_KEY_FILE", "not set; PREFD_TLS_CERT_FILE needs its private key"),
        ("key without cert", "PREFD_TLS_CERT_FILE", "not set; PREFD_TLS_KEY_FILE needs the certificate"),
        ("not a certificate", "PREFD_TLS_CERT_FILE", "holds no readable PEM certificate"),
        ("not a key", "PREFD_TLS_KEY_FILE", "holds no readable PEM private key"),
        ("another key", "PREFD_TLS_KEY_FILE", "is not the private key of the certificate"),
        ("missing client CA", "PREFD_TLS_CLIENT_CA_FILE", "cannot read {missing}: No such file or directory"),
        ("client CA without cert", "PREFD_TLS_CLIENT_CA_FILE", "needs PREFD_TLS_CERT_FILE and PREFD_TLS_KEY_FILE"),
        ("subject without CA", "PREFD_TLS_CLIENT_SUBJECT_AS_CALLER", "needs PREFD_TLS_CLIENT_CA_FILE"),
        ("bad subject mapping", "PREFD_TLS_CLIENT_SUBJECT_ROLES", "can never be a caller's name"),
        ("unknown role", "PREFD_TLS_CLIENT_SUBJECT_ROLE", "Input should be 'user', 'service' or 'admin'"),
        ("unknown mapped role", "PREFD_TLS_CLIENT_SUBJECT_ROLES", "Input should be 'user', 'service' or 'admin'"),
    ],
)
async def test_bad_tls_settings_refuse_to_start(
    fresh_database: Any, tmp_path: Path, pki: Pki, case: str, setting: str, message: str
) -> None:
    missing = tmp_path / "nowhere" / "file.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    cert, key = str(pki.server_cert), str(pki.server_key)
    tls = {
        "missing cert": {"PREFD_TLS_CERT_FILE": str(missing), "PREFD_TLS_KEY_FILE": key},
        "cert without key": {"PREFD_TLS_CERT_FILE": cert},
        "key without cert": {"PREFD_TLS_KEY_FILE": key},
        "not a certificate": {"PREFD_TLS_CERT_FILE": str(garbage), "PREFD_TLS_KEY_FILE": key},
        "not a key": {"PREFD_TLS_CERT_FILE": cert, "PREFD_TLS_KEY_FILE": str(garbage)},
        "another key": {"PREFD_TLS_CERT_FILE": cert, "PREFD_TLS_KEY_FILE": str(pki.client_key)},
        "missing client CA": {
            "PREFD_TLS_CERT_FILE": cert,
            "PREFD_TLS_KEY_FILE": key,
            "PREFD_TLS_CLIENT_CA_FILE": str(missing),
        },
        "client CA without cert": {"PREFD_TLS_CLIENT_CA_FILE": str(pki.ca)},
        "subject without CA": {
            "PREFD_TLS_CERT_FILE": cert,
            "PREFD_TLS_KEY_FILE": key,
            "PREFD_TLS_CLIENT_SUBJECT_AS_CALLER": "true",
        },
        "bad subject mapping": {
            "PREFD_TLS_CERT_FILE": cert,
            "PREFD_TLS_KEY_FILE": key,
            "PREFD_TLS_CLIENT_CA_FILE": str(pki.ca),
            "PREFD_TLS_CLIENT_SUBJECT_AS_CALLER": "true",
            "PREFD_TLS_CLIENT_SUBJECT_ROLES": '{"ops console": "admin"}',
        },
        "unknown role": {"PREFD_TLS_CLIENT_SUBJECT_ROLE": "root"},
        "unknown mapped role": {"PREFD_TLS_CLIENT_SUBJECT_ROLES": '{"ops-console": "root"}'},
    }[case]
    url = await fresh_database()
    env = {"DATABASE_URL": url, "PREFD_JWT_SECRET": SECRET, "PREFD_PORT": "0", "PREFD_HOST": "127.0.0.1", **tls}
    code, out, err = await _prefd("serve", env=env)
    assert code == 2, out + err
    [refusal] = [line for line in err.splitlines() if line.startswith("prefd: ")]
    assert refusal.startswith(f"prefd: {setting}: ") and message.format(missing=missing) in refusal, refusal
    assert "prefd serving" not in out and "Traceback" not in err
    # Refused before anything started: the database was not even migrated.
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT to_regclass('changes')") is None
    finally:
        await conn.close()


async def test_an_app_with_an_unreadable_certificate_does_not_start(
    database_url: str, tmp_path: Path, pki: Pki
) -> None:
    settings = make_settings(
        database_url, tmp_path, tls_cert_file=tmp_path / "gone.pem", tls_key_file=pki.server_key, port=0
    )
    with pytest.raises(SettingsError, match=r"^PREFD_TLS_CERT_FILE: cannot read .*gone\.pem"):
        async with App(settings):
            pass
