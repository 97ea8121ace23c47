"""Names and request builders shared by the task_store test modules (both backends)."""

from __future__ import annotations

from charai.core.domain.errors import ErrorKind
from charai.core.domain.retry import RetryPolicy
from charai.store.v1 import store_service_pb2 as spb
from charai.tasks.v1 import task_pb2, task_service_pb2

IMAGE = task_pb2.TASK_TYPE_IMAGE_GENERATION
TTS = task_pb2.TASK_TYPE_TTS_GENERATION
QUEUED = task_pb2.TASK_STATUS_QUEUED
RUNNING = task_pb2.TASK_STATUS_RUNNING
COMPLETED = task_pb2.TASK_STATUS_COMPLETED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELLED = task_pb2.TASK_STATUS_CANCELLED
EV = task_pb2.TaskEventType
RUN = spb.CLAIM_OUTCOME_RUN
DONE = spb.CLAIM_OUTCOME_DONE
DEFER = spb.CLAIM_OUTCOME_DEFER
FAST_RETRY = RetryPolicy(base=0.05, cap=0.2, max_attempts=6)


def image_request(
    character_id: str = "char_001",
    *,
    metadata: dict[str, str] | None = None,
    request_id: str = "",
    priority: int = task_pb2.PRIORITY_NORMAL,
    view_type: str = "front",
    costume_id: str = "",
    prompt: str = "a knight in silver armour",
) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=IMAGE,
        priority=priority,  # type: ignore[arg-type]
        metadata=metadata or {},
        request_id=request_id,
        image=task_pb2.ImagePayload(
            character_id=character_id,
            character_name="Aki",
            prompt=prompt,
            resolution="1024x1024",
            view_type=view_type,
            costume_id=costume_id,
        ),
    )


def tts_request(
    character_id: str = "char_001", *, metadata: dict[str, str] | None = None, request_id: str = ""
) -> task_service_pb2.CreateTaskRequest:
    return task_service_pb2.CreateTaskRequest(
        type=TTS,
        metadata=metadata or {},
        request_id=request_id,
        tts=task_pb2.TtsPayload(
            character_id=character_id, character_name="Aki", text="hello", voice_style="calm"
        ),
    )


def image_result() -> task_pb2.ImageResult:
    return task_pb2.ImageResult(image_url="charai-media:x.png", prompt="p", resolution="1024x1024")


def complete_req(task_id: str, attempt: int) -> spb.CompleteTaskRequest:
    return spb.CompleteTaskRequest(task_id=task_id, attempt=attempt, image_result=image_result())


def fail_req(task_id: str, attempt: int, kind: ErrorKind, message: str = "boom") -> spb.FailTaskRequest:
    return spb.FailTaskRequest(
        task_id=task_id,
        attempt=attempt,
        error=task_pb2.TaskError(code=int(kind), message=message),  # type: ignore[arg-type]
    )
