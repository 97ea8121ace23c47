"""What one provider call gives back: its answer (:class:`Response`) or its failure, already
classified (:class:`ProviderError`). Every layer above the wire speaks these two; nothing here
does I/O."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from charai.core.domain import errors
from charai.core.domain.errors import ProviderFailure


class ProviderError(Exception):
    """A failed provider call, already classified (retryability is a property of ``failure.kind``)."""

    def __init__(self, failure: ProviderFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise ProviderError(errors.bad_response("the body is not valid JSON", self.status)) from None
