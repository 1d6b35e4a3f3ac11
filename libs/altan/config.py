"""Settings of every Altan process, read from the environment once at start-up and validated.

Nothing reads the environment at import time: ``Settings()`` is built in ``__main__`` (or by the CLI) and passed
down. A bad value stops the process at start with a clear message instead of failing on the first request.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "ConfigurationError",
    "Settings",
    "configuration_problems",
    "default_data_dir",
    "development_secret",
    "setting_name",
]

_JWT_ALGORITHMS = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256"}
# HMAC keys shorter than the hash output are guessable offline from one token (RFC 7518 section 3.2).
MIN_JWT_SECRET_BYTES = 32


class ConfigurationError(Exception):
    """A setting a process cannot use; stops it with one line that names the setting (never its value)."""


def default_data_dir() -> Path:
    """Where an embedded install keeps its state and generated keys when ``ALTAN_DATA_DIR`` is unset: the user's
    data directory (XDG), ``~/.local/share/altan``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "altan"


def development_secret(data_dir: Path, name: str, size: int = 32) -> str:
    """Read, or create on first use, a random base64 secret in the data directory (mode 0600).

    Raises :class:`ConfigurationError` naming ``ALTAN_DATA_DIR`` when the directory cannot hold it.
    """
    path = data_dir / name
    try:
        if path.exists():
            return path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"ALTAN_DATA_DIR: cannot read {path}: {_reason(exc)}") from None
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigurationError(f"ALTAN_DATA_DIR: {data_dir} is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"ALTAN_DATA_DIR: cannot create {data_dir}: {_reason(exc)}") from None
    # Write aside, then link into place: processes starting together never read a half-written file,
    # and the first link wins.
    tmp = data_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"ALTAN_DATA_DIR: {data_dir} is not writable ({_reason(exc)})") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(secrets.token_bytes(size)).decode() + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def _reason(exc: OSError) -> str:
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return "not a directory"
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


class Settings(BaseSettings):
    """Everything a process may be configured with; each service reads the part it needs."""

    model_config = SettingsConfigDict(env_prefix="ALTAN_", extra="ignore", frozen=True)

    # Authentication (API.md "Authentication").
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_jwks_file: Path | None = None
    jwt_algorithms: Annotated[tuple[str, ...], NoDecode] = ()
    jwt_audience: str = "altan"
    jwt_issuer: str = "altan-dev"
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=60)

    # Listening and finding each other.
    bind_host: str = "127.0.0.1"
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    agent_port: int = Field(default=50061, ge=0, le=65535)
    tool_port: int = Field(default=50062, ge=0, le=65535)
    integrator_port: int = Field(default=50063, ge=0, le=65535)
    agent_addr: str = "127.0.0.1:50061"
    tool_addr: str = "127.0.0.1:50062"
    integrator_addr: str = "127.0.0.1:50063"
    # Mutual TLS between the services (docs/operations.md, "mTLS between the services"): the PEM files of this
    # process's certificate, its key and the CA of its peers, all three or none. Set: the internal ports (agent, tool,
    # integrator) require a client certificate from the CA, and the services call each other with theirs.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # With TLS, the identities (DNS or URI names in a certificate) that may call this process's internal port,
    # comma-separated; empty: any certificate of the CA.
    tls_allowed_clients: Annotated[tuple[str, ...], NoDecode] = ()
    # A plaintext port that answers gRPC health checks and nothing else, for probes that present no certificate
    # (kubelet's); unset: none.
    health_port: int | None = Field(default=None, ge=1, le=65535)
    # Tool containers (docs/tool-developers.md): the `host:port` of each, comma-separated, listed by the Tool Service
    # at start-up and every `tool_containers_refresh_seconds` (sooner while one is unreachable).
    tool_containers: Annotated[tuple[str, ...], NoDecode] = ()
    tool_containers_refresh_seconds: float = Field(default=30.0, ge=1, le=3600)
    # MCP servers: besides following `notifications/tools/list_changed`, the tools of a server with a session kept
    # in the Tool Service are listed again when none was heard within this many seconds (a server that forgets to
    # notify).
    mcp_relist_seconds: float = Field(default=300.0, ge=1, le=86_400)
    # Tool containers found through the Kubernetes API as well: "kubernetes" watches the Services labelled
    # `altan.io/tool-container: "true"` of `tool_discovery_namespace` (default: the pod's own, from its service
    # account) with the in-cluster credentials (or KUBECONFIG outside a cluster). "" (the default): only the list.
    tool_discovery: Literal["", "kubernetes"] = ""
    tool_discovery_namespace: str = Field(default="", max_length=63)
    # How a discovered Service is reached: "dns" as `<service>.<namespace>.svc:<port>`, "cluster-ip" at its
    # spec.clusterIP (for a Tool Service that does not use the cluster's DNS).
    tool_discovery_address: Literal["dns", "cluster-ip"] = "dns"

    # State and secrets.
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "ALTAN_REDIS_URL"))
    data_dir: Path = Field(default_factory=default_data_dir)
    # Where state lives without REDIS_URL: "sqlite" (the default), one file under data_dir shared by the processes
    # of one machine and kept across restarts; "memory", each process's own, gone when it stops (benchmarks,
    # throw-away runs). With REDIS_URL set state lives in Redis, and "memory" is refused.
    state: Literal["sqlite", "memory"] = "sqlite"
    master_key: str | None = None
    # OAuth2: how long an authorization's one-time `state` (and its PKCE verifier) waits for the callback; how long
    # before an access token's expiry it is refreshed.
    oauth2_state_ttl_seconds: float = Field(default=600.0, gt=0, le=3600)
    oauth2_refresh_margin_seconds: float = Field(default=60.0, ge=0, le=3600)
    # Where the integrator keeps credential secrets: "local" (encrypted in the state store with keys derived from the
    # master key) or "gcp" (one Google Secret Manager secret per tenant credential, in gcp_project). Never both: an
    # unreachable backend is an error, not a reason to use the other.
    secret_backend: Literal["local", "gcp"] = "local"  # noqa: S105 (a backend's name, not a secret)
    # Optional copy of every audit event to Google Cloud Logging (the log gcp_audit_log_name in gcp_project), written
    # ahead of each call: a call whose audit entry cannot be written does not run.
    audit_sink: Literal["none", "gcp"] = "none"
    gcp_project: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
    # Secret ids are "<prefix>-<sha256 of tenant and name>": the prefix tells installs sharing a project apart and
    # lets IAM conditions grant an install exactly its own secrets (resource.name.startsWith).
    gcp_secret_prefix: str = Field(default="altan", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
    gcp_audit_log_name: str = Field(default="altan-audit", pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    # One Google API call, its retries of transient failures included.
    gcp_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # A local emulator (host:port on loopback) in place of Google's endpoint: plaintext gRPC, no credentials. For
    # tests and development only; the secret is sent in the clear, hence loopback only.
    gcp_emulator_host: str | None = Field(default=None, pattern=r"^(127\.0\.0\.1|localhost|\[::1\]):[0-9]{1,5}$")

    # Outbound calls and limits.
    egress_allow: str = ""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=8 * 1024 * 1024)
    # Size limits: what one tool call may answer; what a task step's ${...} references may bring into its
    # arguments; what one task document (input, outputs, result) may hold. Over them a step fails, clearly.
    max_output_bytes: int = Field(default=1024 * 1024, ge=1024, le=8 * 1024 * 1024)
    max_expansion_bytes: int = Field(default=1024 * 1024, ge=1024, le=8 * 1024 * 1024)
    max_task_bytes: int = Field(default=4 * 1024 * 1024, ge=16 * 1024, le=12 * 1024 * 1024)
    call_deadline_seconds: float = Field(default=30.0, gt=0, le=600)
    tool_retry_attempts: int = Field(default=3, ge=1, le=10)
    retry_after_cap_seconds: float = Field(default=10.0, ge=0, le=300)
    shutdown_grace_seconds: float = Field(default=5.0, ge=0, le=60)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Requests per second of one tenant at the gateway, REST and public gRPC together (a token bucket; with Redis
    # shared by every gateway replica); 0: no limit. The burst is how many may come at once (0: twice the rate).
    tenant_requests_per_second: float = Field(default=0.0, ge=0, le=1_000_000)
    tenant_burst: int = Field(default=0, ge=0, le=10_000_000)

    # The LLM loop (docs/architecture.md, "The agent loop").
    llm_deadline_seconds: float = Field(default=120.0, gt=0, le=3600)  # one model turn, retries and fallbacks included
    llm_retry_attempts: int = Field(default=3, ge=1, le=10)  # per LLM, before its fallback
    max_llm_turns: int = Field(default=10, ge=1, le=100)  # model turns of one task before it fails
    max_tool_result_chars: int = Field(default=16_000, ge=256, le=1_000_000)  # what the model reads of one result
    max_tool_call_errors: int = Field(default=3, ge=0, le=20)  # malformed tool calls answered before the task fails
    context_budget_tokens: int = Field(default=32_000, ge=1_000, le=2_000_000)  # a thread's history sent to the model
    tool_concurrency: int = Field(default=16, ge=1, le=256)  # one tenant's tool calls in flight in one agent replica
    # Durable tasks (docs/architecture.md, "Durable tasks"). A task not ended this long after it was accepted fails
    # with that reason, wherever it is (running, waiting, queued behind a crash).
    task_deadline_seconds: float = Field(default=3600.0, ge=1, le=7 * 24 * 3600)
    # How long a task's lease holds without a heartbeat: a replica that died is noticed (and its tasks run elsewhere)
    # this long after its last heartbeat. Redis only; the embedded queue has one consumer.
    task_lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    # The queue's key in the state store (with Redis, a stream and its consumer group `agents`): installs sharing one
    # Redis keep their queues apart with a key each. The empty tenant part of the default is one no tenant can have.
    task_queue: str = Field(default="altan::agent:work", pattern=r"^altan:[A-Za-z0-9_:.-]{1,200}$")
    # Tasks one agent replica runs at once; more wait in the queue (for this replica or another).
    task_concurrency: int = Field(default=2000, ge=1, le=100_000)
    # Which work queue holds accepted tasks (docs/operations.md, "Running on Cloud Tasks"): "" (the default) Redis
    # Streams with REDIS_URL, else the embedded queue; "cloud-tasks" a Google Cloud Tasks queue that pushes each task
    # to an agent's push port over HTTPS with an OIDC token of `cloud_tasks_service_account`.
    work_queue: Literal["", "cloud-tasks"] = ""
    # The queue, projects/P/locations/L/queues/Q (created beforehand, e.g. by Terraform: its retry and rate settings
    # are the operator's).
    cloud_tasks_queue: str | None = Field(
        default=None,
        pattern=r"^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/locations/[a-z0-9-]{1,63}/queues/[A-Za-z0-9-]{1,100}$",
    )
    # Where Cloud Tasks pushes a task: the agents' push endpoint as Google reaches it (an Ingress or Gateway in front of
    # ALTAN_AGENT_PUSH_PORT), https://.../v1/work; plain http only to a loopback address (tests).
    cloud_tasks_push_url: str | None = None
    # The service account whose OIDC token Cloud Tasks sends (the agent's own Google identity needs
    # roles/iam.serviceAccountUser on it); the push endpoint accepts no token of another.
    cloud_tasks_service_account: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,99}@[a-z0-9][a-z0-9.-]{0,200}$"
    )
    # The `aud` of those tokens; default: the push URL (what Cloud Tasks itself defaults to).
    cloud_tasks_audience: str | None = None
    # Where the push endpoint finds the keys that sign the tokens: Google's by default; plain http only on loopback.
    cloud_tasks_jwks_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    # How long Cloud Tasks waits for one push before it counts the attempt failed and retries it (15 s to 30 min): a
    # task's run must end within it (a wait for approval does not hold the push: docs/decisions.md).
    cloud_tasks_dispatch_deadline_seconds: float = Field(default=1800.0, ge=15, le=1800)
    # The agent's HTTP port for Cloud Tasks' pushes (and /healthz); required with ALTAN_WORK_QUEUE=cloud-tasks.
    agent_push_port: int | None = Field(default=None, ge=1, le=65535)
    # Task delegations (altan.delegation): the agent signs, with this ES256 (P-256) private key in PEM, the
    # short-lived delegation token a task runs with (tenant, user, role, task id), which only the internal services
    # accept. The agent only: any other process given it refuses to start. Unset: a task runs only in the replica
    # that accepted it, with its caller's token. `altan up` generates a pair in the data directory.
    delegation_signing_key_file: Path | None = None
    # The PEM public keys (or certificates) delegations are verified with, by the agent, tool and integrator
    # services and the tool containers; several during a rotation (each token names its key by `kid`). Unset:
    # delegations are refused.
    delegation_public_keys_file: Path | None = None
    # The symmetric key of earlier versions: no longer read; set, it is refused (see _internal_key_is_gone).
    internal_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    # Connections one process keeps open to third parties and LLM endpoints, all of them together; a call past it
    # waits for one to be free. An LLM turn holds its connection for as long as the model thinks. 1,024: a burst of
    # 1,000 slow calls (issue 9) runs in one wave; each service raises its open-files limit to fit (up to the hard
    # limit; altan.bootstrap.open_files_for).
    outbound_max_connections: int = Field(default=1024, ge=1, le=10_000)
    # Connections each Redis client of a process holds at most (a service has up to three: commands, blocking reads
    # such as task event streams, the work queue); a command past them is refused (503 with Retry-After).
    redis_max_connections: int = Field(default=1024, ge=4, le=10_000)
    # Install-level keys, used for an agent whose llm names no credential, and only towards these hosts.
    openai_api_key: SecretStr | None = None
    openai_api_hosts: str = "api.openai.com"
    anthropic_api_key: SecretStr | None = None
    anthropic_api_hosts: str = "api.anthropic.com"
    # Prometheus metrics (altan.metrics; the integrator's also LLM calls per provider and model) of each service on
    # its own port, /metrics in text or OpenMetrics format; unset: not served. The gateway serves its own on the
    # REST port (/metrics).
    agent_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    tool_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    integrator_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Send the W3C trace context (traceparent) to third parties (tools' endpoints, LLM APIs) too. Off: a third party
    # never learns which of its calls belong to one task; OTEL_* variables configure tracing itself.
    trace_propagate_outbound: bool = False
    # The models that get a label of their own in those metrics; any other counts as "other" (model names are
    # the tenants' to choose: they stay out of the operator's metrics unless listed here).
    metrics_models: str = (
        "gpt-4o,gpt-4o-mini,gpt-4.1,gpt-4.1-mini,gpt-4.1-nano,o3,o4-mini,gpt-5,gpt-5-mini,"
        "claude-sonnet-4-5,claude-opus-4-1,claude-haiku-4-5,claude-3-5-haiku-latest"
    )

    # ``altan up`` (the local stack): how long it waits for readiness, and for a clean stop.
    startup_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    stop_timeout_seconds: float = Field(default=15.0, gt=0, le=600)

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _split_algorithms(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(a.strip() for a in value.split(",") if a.strip())
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - _JWT_ALGORITHMS
        if unknown:
            raise ValueError(f"unsupported JWT algorithms: {sorted(unknown)} ('none' is never accepted)")
        return value

    @field_validator("tool_containers", "tls_allowed_clients", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(a.strip() for a in value.split(",") if a.strip())
        return value

    @field_validator("tool_containers")
    @classmethod
    def _containers_are_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
                raise ValueError("each entry must be host:port (port 1 to 65535)")
        if len(set(value)) != len(value):
            raise ValueError("a container is named twice")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret_is_long_enough(cls, value: str | None) -> str | None:
        if value and len(value.encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_JWT_SECRET_BYTES} bytes (e.g. `openssl rand -base64 32`)")
        return value

    @field_validator("internal_key")
    @classmethod
    def _internal_key_is_gone(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raise ValueError(
                "no longer read: delegations are signed with ALTAN_DELEGATION_SIGNING_KEY_FILE (the agent's ES256 "
                "private key) and verified with ALTAN_DELEGATION_PUBLIC_KEYS_FILE; remove it (docs/operations.md)"
            )
        return value

    @field_validator("master_key")
    @classmethod
    def _master_key_is_32_bytes(cls, value: str | None) -> str | None:
        if value is not None and len(_b64(value)) != 32:
            raise ValueError("must be base64 of exactly 32 bytes")
        return value

    @model_validator(mode="after")
    def _algorithms_match_keys(self) -> Settings:
        if not self.jwt_algorithms:
            default = ("HS256",) if self.jwt_secret else ("RS256", "ES256")
            object.__setattr__(self, "jwt_algorithms", default)
        symmetric = {a for a in self.jwt_algorithms if a.startswith("HS")}
        if symmetric and not self.jwt_secret:
            raise ValueError("HS* algorithms need ALTAN_JWT_SECRET")
        if symmetric and len(symmetric) != len(self.jwt_algorithms):
            # Mixing would let a public key be used as an HMAC secret (algorithm confusion).
            raise ValueError("ALTAN_JWT_ALGORITHMS must not mix HS* with asymmetric algorithms")
        if not symmetric and not (self.jwt_jwks_url or self.jwt_jwks_file):
            raise ValueError("asymmetric algorithms need ALTAN_JWT_JWKS_URL or ALTAN_JWT_JWKS_FILE")
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(tls) and not all(tls):
            raise ValueError("ALTAN_TLS_CERT_FILE, ALTAN_TLS_KEY_FILE and ALTAN_TLS_CA_FILE go together: set all three")
        if self.tls_allowed_clients and not all(tls):
            raise ValueError("ALTAN_TLS_ALLOWED_CLIENTS needs the ALTAN_TLS_*_FILE settings")
        if self.redis_url and self.state == "memory":
            raise ValueError("ALTAN_STATE=memory and REDIS_URL: choose one (state lives in Redis when it is set)")
        if "gcp" in (self.secret_backend, self.audit_sink) and not self.gcp_project:
            raise ValueError("ALTAN_SECRET_BACKEND=gcp and ALTAN_AUDIT_SINK=gcp need ALTAN_GCP_PROJECT")
        if self.work_queue == "cloud-tasks":
            _check_cloud_tasks(self)
        return self

    def state_file(self) -> Path | None:
        """The embedded state's SQLite file, when state is embedded and kept (``None``: Redis, or memory)."""
        if self.redis_url or self.state == "memory":
            return None
        return self.data_dir / "state.db"

    def master_key_bytes(self) -> bytes:
        """The 32-byte master key: configured, or generated into the data directory for development."""
        if self.master_key:
            return _b64(self.master_key)
        try:
            key = _b64(development_secret(self.data_dir, "master.key"))
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigurationError(f"ALTAN_DATA_DIR: {self.data_dir / 'master.key'} is not base64 of 32 bytes")
        return key


def _loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def _check_cloud_tasks(settings: Settings) -> None:
    """ALTAN_WORK_QUEUE=cloud-tasks: everything it needs is set, and coherent (one line naming what is wrong)."""
    needed = {
        "ALTAN_CLOUD_TASKS_QUEUE": settings.cloud_tasks_queue,
        "ALTAN_CLOUD_TASKS_PUSH_URL": settings.cloud_tasks_push_url,
        "ALTAN_CLOUD_TASKS_SERVICE_ACCOUNT": settings.cloud_tasks_service_account,
        "ALTAN_AGENT_PUSH_PORT": settings.agent_push_port,
    }
    missing = [name for name, value in needed.items() if not value]
    if missing:
        raise ValueError(f"ALTAN_WORK_QUEUE=cloud-tasks needs {', '.join(missing)}")
    # (and the agent ALTAN_DELEGATION_SIGNING_KEY_FILE, checked by the agent: no other process may hold it)
    if not settings.redis_url:
        raise ValueError("ALTAN_WORK_QUEUE=cloud-tasks needs REDIS_URL (every agent replica must read every task)")
    for name, url in (
        ("ALTAN_CLOUD_TASKS_PUSH_URL", settings.cloud_tasks_push_url or ""),
        ("ALTAN_CLOUD_TASKS_JWKS_URL", settings.cloud_tasks_jwks_url),
    ):
        parts = urlsplit(url)
        if not parts.hostname or parts.scheme not in ("https", "http"):
            raise ValueError(f"{name}: must be an https:// URL")
        if parts.scheme == "http" and not _loopback_url(url):
            raise ValueError(f"{name}: must be https:// (plain http only to a loopback address)")


def setting_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field (``http_port`` -> ``ALTAN_HTTP_PORT``)."""
    info = Settings.model_fields.get(field)
    if info is None:
        return field  # already the name of a variable (an alias)
    if isinstance(info.validation_alias, AliasChoices):
        return str(info.validation_alias.choices[0])
    return f"ALTAN_{field.upper()}"


def configuration_problems(exc: ValidationError, names: Mapping[str, str] | None = None) -> list[str]:
    """One line per problem, each naming its setting (``names`` overrides a field's variable name).

    The submitted value is never part of a line: it may be a secret.
    """
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        field = str(error["loc"][0]) if error["loc"] else ""
        if field:
            message = f"{(names or {}).get(field) or setting_name(field)}: {message}"
        lines.append(message)
    return lines


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ValueError("not valid base64") from exc
