"""``GET /api/usage``: GetUsage as JSON (query string in, rows and budgets out, lowerCamelCase).

``?startDay=YYYY-MM-DD&endDay=YYYY-MM-DD`` (UTC, inclusive; default: this month so far),
``tenant=<name>`` or ``allTenants=true`` (operator tenants only), ``pageSize``, ``pageToken``.
"""

from __future__ import annotations

from typing import Any

from charai.core.validation import whole_number
from charai.gateway.rest.errors import RestError
from charai.tasks.v1 import task_service_pb2

_PARAMS = "tenant, allTenants, startDay, endDay, pageSize, pageToken"
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def usage_request(items: list[tuple[str, str]]) -> task_service_pb2.GetUsageRequest:
    """The query string as a GetUsageRequest; unknown, repeated or mistyped parameters are a 400
    naming them (the day checks are the gRPC port's)."""
    request = task_service_pb2.GetUsageRequest()
    bad: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in items:
        if key in seen:
            bad.append((key, "given more than once"))
            continue
        seen.add(key)
        if key == "tenant":
            request.tenant = value
        elif key == "allTenants":
            if value.lower() not in _BOOLEANS:
                bad.append((key, "must be true or false"))
            else:
                request.all_tenants = _BOOLEANS[value.lower()]
        elif key == "startDay":
            request.start_day = value
        elif key == "endDay":
            request.end_day = value
        elif key == "pageSize":
            if not whole_number(value) or len(value) > 6:
                bad.append((key, "must be a whole number"))
            else:
                request.page_size = int(value)
        elif key == "pageToken":
            request.page_token = value
        elif key != "_":  # ``_`` is the usual cache-buster
            bad.append((key, f"unknown query parameter (use {_PARAMS})"))
    if bad:
        raise RestError.invalid(bad)
    return request


def usage_json(response: task_service_pb2.GetUsageResponse) -> dict[str, Any]:
    """``{rows, budgets, startDay, endDay, nextPageToken}``, every figure present (zeros too)."""
    return {
        "rows": [
            {
                "tenant": row.tenant,
                "provider": row.provider,
                "model": row.model,
                "day": row.day,
                "calls": row.calls,
                "images": row.images,
                "speechCharacters": row.speech_characters,
                "audioSeconds": row.audio_seconds,
                "costUsd": row.cost_usd,
                "reused": row.reused,
            }
            for row in response.rows
        ],
        "budgets": [
            {
                "tenant": b.tenant,
                "period": b.period,
                "unit": b.unit,
                "limit": b.limit,
                "spent": b.spent,
                "reached": b.reached,
                "periodEndTime": b.period_end_time.ToJsonString(),
            }
            for b in response.budgets
        ],
        "startDay": response.start_day,
        "endDay": response.end_day,
        "nextPageToken": response.next_page_token or None,
    }
