"""task_store settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from charai.core.domain.prices import SETTING as PRICES_SETTING
from charai.core.domain.prices import PriceTable, parse_prices
from charai.core.domain.webhooks import SCHEDULE
from charai.core.settings import CommaList, CommonSettings
from charai.core.tenants import Tenants, load_tenants
from pydantic import Field, SecretStr, field_validator

#: Where Docker (compose) mounts the ``postgres_password`` secret.
DEFAULT_PASSWORD_FILE = "/run/secrets/postgres_password"  # noqa: S105 - a path, not a password


class Settings(CommonSettings):
    #: ``sqlite:///path/to/tasks.db`` (default: ``<data dir>/tasks.db``) or
    #: ``postgresql://user@host:port/db``. Not validated by pydantic on purpose: a validation error
    #: prints the variable's value, and this one may hold a password (see :meth:`database`).
    database_url: str = Field(default="", repr=False)
    #: A file holding the PostgreSQL password, used when the URL has none. Unset: the Docker
    #: secret at ``/run/secrets/postgres_password`` when it exists.
    database_password_file: str = ""
    #: Connections per task_store process (PostgreSQL).
    database_pool_size: int = Field(default=10, ge=1, le=500)
    max_attempts: int = Field(default=6, ge=1, le=20)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_cap_seconds: float = Field(default=60.0, gt=0)
    #: How long a claimed attempt may go without a report before another worker may take over.
    lease_seconds: float = Field(default=30.0, gt=0)
    #: A job published longer ago than this, whose task is still waiting, is checked for in the
    #: stream and re-published if NATS lost it.
    redispatch_after_seconds: float = Field(default=60.0, gt=0)
    sweep_interval_seconds: float = Field(default=10.0, gt=0)
    #: Push dispatch: a new task's job goes straight to a worker that offered free slots on its
    #: ExchangeStream (claimed in the create's transaction) instead of through JetStream.
    push_dispatch: bool = True
    #: How long an outbox relay owns the jobs it claimed: a replica that dies while publishing
    #: leaves them to the other replicas after this.
    outbox_claim_seconds: float = Field(default=30.0, gt=0)
    #: Ended tasks (completed, failed, cancelled) are deleted with their events and media this
    #: many days after their last change; 0 (the default): kept for good.
    retention_days: float = Field(default=0.0, ge=0, le=36_500)
    #: How long a completed TTS task's audio (or a seeded image) is reused by an identical request
    #: of the same tenant, from its latest completion; 0: reuse off (README, "Identical requests
    #: are reused").
    reuse_ttl_seconds: float = Field(default=86400.0, ge=0)
    #: Secret from which each tenant's webhook signing secret is derived (unset: generated into
    #: the data dir; replicas sharing one database need the same value).
    webhook_signing_key: SecretStr = SecretStr("")
    #: Delays before each webhook attempt, the first included (seconds, comma-separated).
    webhook_retry_schedule: CommaList = tuple(str(d) for d in SCHEDULE)
    #: Consecutive failed attempts after which an endpoint is disabled (0: only a 410 does).
    webhook_disable_after: int = Field(default=20, ge=0)
    #: At most one progress delivery per task per this many milliseconds (latest wins).
    webhook_progress_interval_ms: int = Field(default=1000, ge=0)
    #: How long a sender holds a delivery it claimed (more than CHARAI_WEBHOOK_TIMEOUT_SECONDS): a
    #: dead sender's deliveries go to another after this.
    webhook_claim_seconds: float = Field(default=60.0, gt=0)
    #: How long a rotated-out webhook secret keeps signing beside the new one.
    webhook_secret_grace_seconds: float = Field(default=86400.0, ge=0)
    #: Per-tenant fair-share weights and budgets (TOML, see :mod:`charai.core.tenants`); unset:
    #: every tenant weight 1, no budget.
    tenants_file: Path | None = None
    #: Fair share: released jobs not claimed yet per task type, at least; the rest of the queue
    #: waits in task_store and is released in fair order between tenants. The buffer grows to
    #: the number of tasks of that type running (one round of the workers) or started within
    #: ``dispatch_round_ms``, so this only has
    #: to cover a quiet start; smaller is fairer (a tenant's next task waits behind at most
    #: about this many, or one round), larger hides more of the release round trip.
    dispatch_buffer: int = Field(default=4, ge=1, le=10_000)
    #: Fair share: the buffer also covers the tasks of its type started in this many
    #: milliseconds (one round of release, publish, delivery and claim at the workers' pace), so
    #: tasks that end at once (a reused result) are not held to ``CHARAI_DISPATCH_BUFFER`` jobs a
    #: round; slow lanes start few tasks a round and keep their small buffer. 0: off.
    dispatch_round_ms: int = Field(default=50, ge=0, le=10_000)
    #: Fair share: within one tenant, a priority step is worth this much waiting (a ``low`` task
    #: goes before ``high`` ones created more than twice this after it).
    priority_aging_seconds: float = Field(default=60.0, gt=0)

    def tenants(self) -> Tenants:
        """The tenants file, parsed; raises ValueError naming ``CHARAI_TENANTS_FILE``."""
        return load_tenants(self.tenants_file)

    #: Prices per provider and model over the built-in examples (TOML, see
    #: :mod:`charai.core.domain.prices`); unset: the built-in prices.
    prices_file: Path | None = None

    def prices(self) -> PriceTable:
        """The built-in prices with the prices file over them; raises ValueError naming
        ``CHARAI_PRICES_FILE`` (and the entry, for a bad one)."""
        if self.prices_file is None:
            return PriceTable()
        try:
            text = self.prices_file.read_text()
        except OSError as exc:
            raise ValueError(f"{PRICES_SETTING}: cannot read {self.prices_file} ({exc.strerror})") from None
        return parse_prices(text)

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _schedule(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            delays = [float(v) for v in value]
        except ValueError:
            raise ValueError("must be seconds, comma-separated (e.g. 0,5,300)") from None
        if not delays or len(delays) > 20 or any(not 0 <= d <= 86400 for d in delays):
            raise ValueError("must be 1 to 20 delays, each between 0 and 86400 seconds")
        return value

    def webhook_schedule(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.webhook_retry_schedule)

    @field_validator("task_store_addr")
    @classmethod
    def _one_listen_addr(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Gateways and workers may list several replicas; task_store reads it as its own address.
        if len(value) != 1:
            raise ValueError(
                "must be one HOST:PORT for task_store: it is this replica's own listen address "
                "(only gateways and workers take a list)"
            )
        return value

    @property
    def listen_addr(self) -> str:
        """This replica's own gRPC address (``CHARAI_TASK_STORE_ADDR``: one HOST:PORT here)."""
        return self.task_store_addr[0]

    def derived_secrets(self) -> Iterator[str]:
        """The PostgreSQL password: inside the URL or read from its file."""
        try:
            url = self.resolved_database_url()
            password = urlsplit(url).password
            from_file = self.database_password() if url.startswith(("postgresql://", "postgres://")) else None
        except ValueError:  # start-up stops on it, with a message naming the setting
            return
        yield from (p for p in (password, from_file) if p)

    def resolved_database_url(self) -> str:
        """The database URL (the SQLite default filled in); raises ValueError naming the
        variable — never echoing its value — when it is not one we support."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'tasks.db'}"
        if url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            return url
        raise ValueError("CHARAI_DATABASE_URL must start with sqlite:/// or postgresql://")

    def is_postgres(self) -> bool:
        return self.resolved_database_url().startswith(("postgresql://", "postgres://"))

    def database_password(self) -> str | None:
        """The PostgreSQL password from ``CHARAI_DATABASE_PASSWORD_FILE`` (or the default Docker
        secret), stripped of its trailing newline; None when there is none to read."""
        if self.database_password_file:
            path = Path(self.database_password_file)
            try:
                return path.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"CHARAI_DATABASE_PASSWORD_FILE: cannot read {path} ({exc.strerror})"
                ) from None
        default = Path(DEFAULT_PASSWORD_FILE)
        if default.is_file():
            try:
                return default.read_text().rstrip("\r\n")
            except OSError:
                return None
        return None

    def sqlite_path(self) -> str:
        url = self.resolved_database_url()
        if not url.startswith("sqlite:///"):
            raise ValueError("CHARAI_DATABASE_URL is not a sqlite:/// URL")
        return url[len("sqlite:///") :]
