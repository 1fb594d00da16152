"""Settings, read once from the environment at the edge and passed down frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefd_server.kernel.bounded_cache import DEFAULT_CACHE_BYTES, parse_size

# The roles a verified client certificate may stand for (the token roles).
CertificateRole = Literal["user", "service", "admin"]


class SettingsError(Exception):
    """A setting prefd cannot start with; the message begins with the setting's name."""


class Settings(BaseSettings):
    """Every knob prefd has; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="PREFD_", frozen=True, extra="ignore")

    database_url: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL", "PREFD_DATABASE_URL"))
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "PREFD_REDIS_URL"))
    host: str = "[::]"
    port: int = Field(default=50051, ge=0, le=65535)
    data_dir: Path = Path(".prefd")
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # TLS on the gRPC port (PEM files): with a certificate and key the port speaks only TLS; with a
    # client CA as well every client must present a certificate that CA signed (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Under mTLS, a call without a bearer token is made by its client certificate's common name,
    # with the role tls_client_subject_roles gives that name, else tls_client_subject_role.
    tls_client_subject_as_caller: bool = False
    tls_client_subject_role: CertificateRole = "service"
    tls_client_subject_roles: dict[str, CertificateRole] = Field(default_factory=dict)
    # How `prefd healthcheck` reaches a TLS port: the CA to trust (default: the system's roots), a
    # client certificate and key under mTLS, and the name the server's certificate carries when it
    # is not the address checked.
    healthcheck_ca_file: Path | None = None
    healthcheck_cert_file: Path | None = None
    healthcheck_key_file: Path | None = None
    healthcheck_server_name: str | None = None
    grace_period_s: float = Field(default=10.0, ge=0)
    db_pool_min: int = Field(default=2, ge=1)
    db_pool_max: int = Field(default=10, ge=1)
    db_statement_timeout_ms: int = Field(default=15000, ge=0)
    # Ceiling on a unary call without a client deadline, and on any single database visit (seconds).
    call_timeout_s: float = Field(default=30.0, gt=0)
    health_interval_s: float = Field(default=0.25, gt=0)
    health_timeout_s: float = Field(default=0.5, gt=0)
    feed_poll_interval_s: float = Field(default=0.1, gt=0)
    feed_notify: bool = True
    watch_progress_interval_s: float = Field(default=5.0, gt=0)
    watch_queue_capacity: int = Field(default=10_000, ge=1)
    redis_ttl_s: int = Field(default=60, ge=1)
    # Bytes every in-process cache may hold together (override layers, prebuilt responses, org bases,
    # AI configuration, consents, notification decisions, parsed requests): a number of bytes or a size
    # such as 256MiB or 1GB; each cache gets a fixed share.
    cache_bytes: int = DEFAULT_CACHE_BYTES
    workers: int = Field(default=1, ge=1)
    # GetDatabaseHealth: statements with a mean time at or over this are slow; a transaction open
    # longer than this holding the change feed's horizon is an alert.
    slow_query_threshold_ms: float = Field(default=500.0, ge=0)
    long_transaction_alert_s: float = Field(default=60.0, gt=0)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    definitions_file: Path | None = None
    log_level: str = "INFO"
    # "json" (one object per line, with the request id) or "text".
    log_format: Literal["json", "text"] = "json"
    print_token: bool = True
    # AES-GCM master keys for API keys: comma-separated base64url 32-byte keys, the first current.
    secret_key: SecretStr | None = None
    # The AI configuration's environment layer (between the defaults and GLOBAL).
    ai_model: str | None = None
    ai_temperature: float | None = None
    ai_max_tokens: int | None = None
    ai_api_key: SecretStr | None = None

    @field_validator("cache_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        """A positive size: bytes, or a number with KB, KiB, MB, MiB, GB or GiB."""
        if isinstance(value, bool):
            raise ValueError("must be a positive size")
        if isinstance(value, int):
            if value <= 0:
                raise ValueError(f"must be a positive size (got {value})")
            return value
        return parse_size(str(value))

    @field_validator(
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "healthcheck_ca_file",
        "healthcheck_cert_file",
        "healthcheck_key_file",
        "healthcheck_server_name",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable (`PREFD_TLS_CERT_FILE=`) leaves the setting unset rather than naming '.'."""
        return None if value == "" else value

    @property
    def embedded(self) -> bool:
        """True when prefd runs its own PostgreSQL in the data directory (DATABASE_URL unset or empty)."""
        return not self.database_url

    @property
    def tls(self) -> bool:
        """True when the gRPC port speaks TLS."""
        return self.tls_cert_file is not None or self.tls_key_file is not None
