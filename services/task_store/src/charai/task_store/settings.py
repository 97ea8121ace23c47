"""task_store settings (env prefix ``CHARAI_``)."""

from __future__ import annotations

from charai.core.settings import CommonSettings
from pydantic import Field


class Settings(CommonSettings):
    #: ``sqlite:///path/to/tasks.db`` (default: ``<data dir>/tasks.db``) or ``postgresql://…``.
    database_url: str = ""
    max_attempts: int = Field(default=6, ge=1, le=20)
    retry_base_seconds: float = Field(default=1.0, gt=0)
    retry_cap_seconds: float = Field(default=60.0, gt=0)
    #: How long a claimed attempt may go without a report before another worker may take over.
    lease_seconds: float = Field(default=30.0, gt=0)
    #: A job published longer ago than this, whose task is still waiting, is checked for in the
    #: stream and re-published if NATS lost it.
    redispatch_after_seconds: float = Field(default=60.0, gt=0)
    sweep_interval_seconds: float = Field(default=10.0, gt=0)

    def sqlite_path(self) -> str:
        url = self.database_url or f"sqlite:///{self.data_dir / 'tasks.db'}"
        if not url.startswith("sqlite:///"):
            raise ValueError(
                "CHARAI_DATABASE_URL must start with sqlite:/// (postgresql:// is not built yet)"
            )
        return url[len("sqlite:///") :]
