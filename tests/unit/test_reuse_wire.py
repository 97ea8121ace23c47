"""Reuse on the wire, without a server: the REST body's ``reuse`` and ``seed``, the JSON a task is
shown as (``reused`` always said, ``seed`` a number), and the CLI's ``--no-reuse`` / ``--seed``."""

from __future__ import annotations

from typing import Any

import pytest
from charai.client.cli.parser import build_parser
from charai.core.domain.lifecycle import ClaimOutcome
from charai.gateway.rest.errors import RestError
from charai.gateway.rest.parsing import create_request
from charai.store.v1 import store_service_pb2 as spb
from charai.taskapi.json import task_json
from charai.tasks.v1 import task_pb2


def tts_body(**payload: Any) -> dict[str, Any]:
    return {
        "type": "tts_generation",
        "payload": {"characterId": "c1", "text": "hi", "voiceStyle": "v", **payload},
    }


def image_body(**payload: Any) -> dict[str, Any]:
    return {"type": "image_generation", "payload": {"characterId": "c1", "prompt": "p", **payload}}


def test_rest_reuse_and_seed_reach_the_request() -> None:
    assert not create_request(tts_body(), None).tts.HasField("reuse")
    off = create_request(tts_body(reuse=False), None).tts
    assert off.HasField("reuse") and off.reuse is False
    assert create_request(tts_body(reuse=True), None).tts.reuse is True
    assert create_request(image_body(seed=2**53 - 1), None).image.seed == 2**53 - 1
    assert not create_request(image_body(), None).image.HasField("seed")
    assert not create_request(image_body(seed=None), None).image.HasField("seed")  # null: absent


@pytest.mark.parametrize(
    ("body", "field", "description"),
    [
        (tts_body(reuse="false"), "payload.reuse", "must be true or false"),
        (tts_body(reuse=0), "payload.reuse", "must be true or false"),
        (image_body(seed=1.5), "payload.seed", "must be a whole number"),
        (image_body(seed="7"), "payload.seed", "must be a whole number"),
        (image_body(seed=True), "payload.seed", "must be a whole number"),
        (image_body(seed=2**64), "payload.seed", "must be a whole number"),
        (image_body(reuse=False), "payload.reuse", "unknown field"),  # images reuse by seed only
    ],
)
def test_rest_names_a_mistyped_reuse_or_seed(body: dict[str, Any], field: str, description: str) -> None:
    with pytest.raises(RestError) as refused:
        create_request(body, None)
    assert refused.value.violations == [(field, description)]


def test_task_json_says_whether_a_result_was_reused_and_keeps_the_seed_a_number() -> None:
    task = task_pb2.Task(id="task_b", image=task_pb2.ImagePayload(prompt="p", seed=42))
    task.image_result.image_url = "https://example/media/k.png"
    shown = task_json(task)
    assert shown["payload"]["seed"] == 42
    assert shown["result"]["reused"] is False and "reusedFromTaskId" not in shown["result"]
    task.image_result.reused = True
    task.image_result.reused_from_task_id = "task_a"
    shown = task_json(task)
    assert (shown["result"]["reused"], shown["result"]["reusedFromTaskId"]) == (True, "task_a")
    speech = task_pb2.Task(id="task_c", tts=task_pb2.TtsPayload(text="hi", reuse=False))
    assert task_json(speech)["payload"]["reuse"] is False
    assert task_json(speech)["result"] is None


def test_cli_no_reuse_and_seed() -> None:
    parser = build_parser()
    assert parser.parse_args(["tts", "--character", "c1", "--text", "hi"]).reuse is None
    assert parser.parse_args(["tts", "--character", "c1", "--text", "hi", "--no-reuse"]).reuse is False
    assert parser.parse_args(["image", "--character", "c1", "--prompt", "p"]).seed is None
    assert parser.parse_args(["image", "--character", "c1", "--prompt", "p", "--seed", "7"]).seed == 7


def test_the_cores_claim_outcomes_are_the_store_protos() -> None:
    assert {o.name: int(o) for o in ClaimOutcome} == {
        name.removeprefix("CLAIM_OUTCOME_"): number
        for name, number in spb.ClaimOutcome.items()
        if number != spb.CLAIM_OUTCOME_UNSPECIFIED
    }
