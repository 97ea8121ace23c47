"""The seed's REST routes (``characterTasksApi``) on the gateway's HTTP port, as JSON over gRPC.

Why through the loopback gRPC channel: a REST call is a TaskService call made on the client's
behalf (its ``Authorization`` header forwarded), so auth, validation, tenancy and logging are the
gRPC port's own. This package only translates: the seed's JSON in (:mod:`.parsing`), the seed's
JSON out and Server-Sent Events (:mod:`.views`), gRPC status codes as HTTP statuses
(:mod:`.errors`); :mod:`.routes` serves them.

Routes: ``POST /api/tasks``, ``POST /api/tasks:batchCreate``, ``GET /api/tasks/{id}``,
``GET /api/tasks?metadata.characterId=…``,
``POST /api/tasks/{id}/cancel``, ``DELETE /api/tasks/{id}``, ``GET /api/tasks/{id}/events`` and
``GET /api/tasks/events?metadata.…`` (SSE, resumable with ``Last-Event-ID``, :mod:`.streams`),
``POST /api/access-tokens``, ``GET /api/usage`` (:mod:`.usage`).
"""

from charai.gateway.rest.errors import HTTP_STATUS, RestError, json_field
from charai.gateway.rest.parsing import create_request, list_request
from charai.gateway.rest.routes import CALL_TIMEOUT, MAX_BODY_BYTES, RestApi
from charai.gateway.rest.streams import SSE_RETRY_MS
from charai.gateway.rest.views import event_json, event_name, sse_block, task_json

__all__ = [
    "CALL_TIMEOUT",
    "HTTP_STATUS",
    "MAX_BODY_BYTES",
    "SSE_RETRY_MS",
    "RestApi",
    "RestError",
    "create_request",
    "event_json",
    "event_name",
    "json_field",
    "list_request",
    "sse_block",
    "task_json",
]
