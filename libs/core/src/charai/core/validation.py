"""Validation of client requests, with one violation per bad field (google.rpc.BadRequest).

Runs in the gateway (early, clear errors) and again in task_store (nothing invalid is ever stored,
whoever calls it). Field paths use the proto field names of the public API.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from urllib.parse import SplitResult, urlsplit

from charai.core.domain import provider_models
from charai.core.domain.provider_models import ImageModel, ProviderModels, TtsModel
from charai.core.domain.webhooks import parse_events
from charai.tasks.v1 import task_pb2, task_service_pb2

#: Limits of the default models (glm-image, GLM-TTS); other models have their own
#: (:mod:`charai.core.domain.provider_models`). UTF-8 bytes are capped at 4 per character.
MAX_PROMPT_CHARS = 4000
MAX_PROMPT_BYTES = 16_000
MAX_TTS_TEXT_CHARS = 1024  # GLM-TTS `input` maxLength
#: Largest image seed: 2^53 - 1, so a JavaScript client (a JSON number) keeps it exact.
MAX_SEED = 2**53 - 1
MAX_NAME_CHARS = 200
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_METADATA_BYTES = 8192
MAX_REQUEST_ID_CHARS = 128
MAX_WEBHOOK_URL_CHARS = 2048
#: Requests one BatchCreateTasks call may carry.
MAX_BATCH_CREATE = 100
MAX_PAGE_SIZE = 500
#: Task ids one access token may name.
MAX_TOKEN_TASKS = 100
#: ``metadata.category`` of a task submitted with a character callback (the seed's query).
CHARACTER_CATEGORY = "character_design"
CALLBACK_TYPES: dict[int, tuple[str, ...]] = {
    task_pb2.TASK_TYPE_IMAGE_GENERATION: ("character_view", "character_costume"),
    task_pb2.TASK_TYPE_TTS_GENERATION: ("character_voice",),
}
AUDIO_FORMATS = provider_models.AUDIO_FORMATS
_IDENT = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
#: The enums' known values, once: ``EnumTypeWrapper.values()`` builds a new list on every call
#: (0.74 µs against 0.02 µs for a set look-up; 1 % of the gateway's samples under B2's creates).
_PRIORITIES = frozenset(task_pb2.Priority.values())
_TASK_TYPES = frozenset(task_pb2.TaskType.values())
_TASK_STATUSES = frozenset(task_pb2.TaskStatus.values())
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
_RESOLUTION = re.compile(r"([0-9]{3,4})[x×]([0-9]{3,4})")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TASK_ID = re.compile(r"task_[0-9a-f]{32}")
_DELIVERY_ID = re.compile(r"msg_[0-9a-f]{32}")
#: The largest integer SQLite and PostgreSQL's bigint hold: a bound for numbers read from page tokens.
MAX_INT64 = 2**63 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    field: str
    description: str


class RequestInvalidError(Exception):
    """A request with one or more bad fields; nothing was stored."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")


def _http_parts(url: str) -> SplitResult | None:
    """The URL's parts if it is http(s) with a host and a port of 1 to 65535 (or none), else
    None (urllib raises ValueError for a bad IPv6 literal or a port out of range)."""
    try:
        parts = urlsplit(url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:
        return None
    return parts if usable else None


def whole_number(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes a superscript two, which ``int`` refuses, and
    Arabic-Indic digits, which ``int`` reads and gRPC does not."""
    return text.isascii() and text.isdigit()


def in_batch(index: int, violations: Sequence[Violation]) -> list[Violation]:
    """``violations`` of one request, each field named as the ``index``-th request of a batch
    names it: ``requests[i].field``."""
    return [Violation(f"requests[{index}].{v.field}", v.description) for v in violations]


class _Checker:
    def __init__(self) -> None:
        self.violations: list[Violation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(Violation(field, description))

    def text(
        self, field: str, value: str, *, required: bool, max_chars: int, max_bytes: int | None = None
    ) -> None:
        if required and not value.strip():
            self.add(field, "must not be empty")
            return
        if len(value) > max_chars:
            self.add(field, f"must be at most {max_chars} characters (got {len(value)})")
        elif max_bytes is not None and len(value.encode("utf-8", "surrogatepass")) > max_bytes:
            self.add(field, f"must be at most {max_bytes} bytes of UTF-8")
        if "\x00" in value or _CONTROL.search(value):
            self.add(field, "must not contain control characters")

    def ident(self, field: str, value: str, *, required: bool) -> None:
        if not value:
            if required:
                self.add(field, "must not be empty")
            return
        if not _IDENT.fullmatch(value):
            self.add(field, "must be 1-128 characters of letters, digits, '_', '-', '.', ':'")

    def raise_if_any(self) -> None:
        if self.violations:
            raise RequestInvalidError(self.violations)


def size_rule(model: str) -> tuple[int, int, int, int]:
    """The custom-size rule of Zhipu image model ``model``."""
    return provider_models.image_model(provider_models.ZHIPU, model).size_rule


def parse_resolution(value: str, model: str | ImageModel = "glm-image") -> tuple[int, int] | None:
    """``"1024x1024"`` → (1024, 1024); None when malformed or outside the model's documented bounds.

    ``model`` is a Zhipu model name or any model's rules (OpenAI's models take a fixed list of
    sizes; their ``auto`` is not a ``WxH`` and is checked by the caller).
    """
    rules = (
        model if isinstance(model, ImageModel) else provider_models.image_model(provider_models.ZHIPU, model)
    )
    match = _RESOLUTION.fullmatch(value)
    if not match:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    if rules.sizes:
        return (width, height) if f"{width}x{height}" in rules.sizes else None
    if (width, height) in rules.recommended:
        return width, height
    low, high, multiple, pixels = rules.size_rule
    if not (low <= width <= high and low <= height <= high):
        return None
    if width * height > pixels or width % multiple or height % multiple:
        return None
    return width, height


def validate_metadata(c: _Checker, field: str, metadata: Mapping[str, str]) -> None:
    items = dict(metadata)
    if len(items) > MAX_METADATA_ENTRIES:
        c.add(field, f"must have at most {MAX_METADATA_ENTRIES} entries (got {len(items)})")
        return
    total = 0
    for key, value in items.items():
        total += len(key.encode("utf-8", "surrogatepass")) + len(value.encode("utf-8", "surrogatepass"))
        if not _KEY.fullmatch(key):
            c.add(
                f"{field}[{key[:40]!r}]",
                "key must start with a letter and use letters, digits, '_', '-', '.'",
            )
        elif len(value) > MAX_METADATA_VALUE_CHARS:
            c.add(f"{field}[{key}]", f"value must be at most {MAX_METADATA_VALUE_CHARS} characters")
        elif _CONTROL.search(value):
            c.add(f"{field}[{key}]", "value must not contain control characters")
    if total > MAX_METADATA_BYTES:
        c.add(field, f"must be at most {MAX_METADATA_BYTES} bytes in all (got {total})")


def _callback(c: _Checker, field: str, cb: task_pb2.Callback, task_type: int, has: bool) -> None:
    if not has:
        return
    allowed = CALLBACK_TYPES[task_type]
    if cb.type and cb.type not in allowed:
        c.add(f"{field}.type", f"must be one of {', '.join(allowed)} for this task type")
    c.ident(f"{field}.character_id", cb.character_id, required=False)
    c.ident(f"{field}.view_type", cb.view_type, required=False)
    c.ident(f"{field}.costume_id", cb.costume_id, required=False)


def validate_create(
    req: task_service_pb2.CreateTaskRequest, models: ProviderModels | str = "glm-image"
) -> None:
    """Raises :class:`RequestInvalidError` naming every bad field of a CreateTaskRequest.

    ``models`` (the ``CHARAI_IMAGE_PROVIDER``/``_MODEL`` and ``CHARAI_TTS_PROVIDER``/``_MODEL``
    settings) decides the limits: sizes, prompt and text length, qualities, formats, voices,
    speeds. A bare string is a Zhipu image model name (the TTS model then GLM-TTS).
    """
    if isinstance(models, str):
        models = ProviderModels(image_model=models)
    c = _Checker()
    kind = req.WhichOneof("payload")
    if req.type not in CALLBACK_TYPES:
        c.add("type", "must be TASK_TYPE_IMAGE_GENERATION or TASK_TYPE_TTS_GENERATION")
    if req.priority not in _PRIORITIES:
        c.add("priority", f"unknown value {req.priority}")
    if kind is None:
        c.add("payload", "one of image or tts is required")
    elif req.type == task_pb2.TASK_TYPE_IMAGE_GENERATION and kind != "image":
        c.add("payload", "an image task needs the image payload")
    elif req.type == task_pb2.TASK_TYPE_TTS_GENERATION and kind != "tts":
        c.add("payload", "a TTS task needs the tts payload")
    if kind == "image" and req.type == task_pb2.TASK_TYPE_IMAGE_GENERATION:
        _image_payload(c, req.image, models.image, models.image_provider)
        _callback(c, "image.callback", req.image.callback, req.type, req.image.HasField("callback"))
    if kind == "tts" and req.type == task_pb2.TASK_TYPE_TTS_GENERATION:
        _tts_payload(c, req.tts, models.tts, models.tts_provider)
        _callback(c, "tts.callback", req.tts.callback, req.type, req.tts.HasField("callback"))
    validate_metadata(c, "metadata", req.metadata)
    if len(req.request_id) > MAX_REQUEST_ID_CHARS or _CONTROL.search(req.request_id):
        c.add("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    if req.HasField("webhook"):
        validate_webhook(c, "webhook", req.webhook)
    c.raise_if_any()


def _image_payload(c: _Checker, p: task_pb2.ImagePayload, rules: ImageModel, provider: str) -> None:
    """The image payload against the configured image model's limits."""
    model = f"model {rules.name} (CHARAI_IMAGE_PROVIDER={provider})"
    c.ident("image.character_id", p.character_id, required=True)
    c.text("image.character_name", p.character_name, required=False, max_chars=MAX_NAME_CHARS)
    prompt_bytes = (
        MAX_PROMPT_BYTES if rules.max_prompt_chars == MAX_PROMPT_CHARS else 4 * rules.max_prompt_chars
    )
    c.text("image.prompt", p.prompt, required=True, max_chars=rules.max_prompt_chars, max_bytes=prompt_bytes)
    auto = p.resolution == "auto" and "auto" in rules.sizes
    if p.resolution and not auto and parse_resolution(p.resolution, rules) is None:
        if rules.sizes:
            c.add("image.resolution", f"must be one of {', '.join(rules.sizes)} for {model}")
        else:
            low, high, multiple, pixels = rules.size_rule
            c.add(
                "image.resolution",
                f"must be WxH with each side {low}-{high} px, a multiple of {multiple}, "
                f"at most {pixels} pixels in all, for {model} (e.g. 1024x1024)",
            )
    if p.quality:
        if rules.qualities is None:
            c.ident("image.quality", p.quality, required=False)
        elif p.quality not in rules.qualities:
            allowed = ", ".join(rules.qualities) or "none"
            c.add("image.quality", f"must be one of {allowed} for {model}")
    if p.output_format and p.output_format not in rules.output_formats:
        if rules.output_formats:
            c.add("image.output_format", f"must be one of {', '.join(rules.output_formats)} for {model}")
        else:
            c.add("image.output_format", f"is not supported by {model}: leave it empty")
    if p.HasField("seed") and not 0 <= p.seed <= MAX_SEED:
        c.add("image.seed", f"must be a whole number from 0 to {MAX_SEED}")
    c.ident("image.view_type", p.view_type, required=False)
    c.ident("image.costume_id", p.costume_id, required=False)


def _tts_payload(c: _Checker, t: task_pb2.TtsPayload, rules: TtsModel, provider: str) -> None:
    """The TTS payload against the configured TTS model's limits."""
    model = f"model {rules.name} (CHARAI_TTS_PROVIDER={provider})"
    c.ident("tts.character_id", t.character_id, required=True)
    c.text("tts.character_name", t.character_name, required=False, max_chars=MAX_NAME_CHARS)
    c.text(
        "tts.text", t.text, required=True, max_chars=rules.max_text_chars, max_bytes=4 * rules.max_text_chars
    )
    c.ident("tts.voice_style", t.voice_style, required=True)
    if t.voice_style and rules.voices is not None and t.voice_style not in rules.voices:
        c.add("tts.voice_style", f"must be one of {', '.join(sorted(rules.voices))} for {model}")
    low, high = rules.min_speed, rules.max_speed
    if t.HasField("speed") and not (math.isfinite(t.speed) and low <= t.speed <= high):
        c.add("tts.speed", f"must be between {low:g} and {high:g}")
    if t.HasField("volume") and not (math.isfinite(t.volume) and 0 < t.volume <= 10):
        c.add("tts.volume", "must be greater than 0 and at most 10")
    if t.response_format and t.response_format not in AUDIO_FORMATS:
        c.add("tts.response_format", "must be wav, pcm or mp3")


def validate_batch_size(requests: Sequence[object]) -> None:
    """1 to :data:`MAX_BATCH_CREATE` requests (checked before anything else is looked at)."""
    if not 1 <= len(requests) <= MAX_BATCH_CREATE:
        raise RequestInvalidError(
            [Violation("requests", f"must hold 1 to {MAX_BATCH_CREATE} requests, not {len(requests)}")]
        )


def validate_batch(
    requests: Sequence[task_service_pb2.CreateTaskRequest], models: ProviderModels | str = "glm-image"
) -> None:
    """Every request as CreateTask checks it; the violations of all of them at once, each field
    named ``requests[i].field`` (all or nothing: one bad request refuses the batch)."""
    validate_batch_size(requests)
    violations: list[Violation] = []
    first: dict[str, tuple[int, bytes]] = {}
    for index, request in enumerate(requests):
        try:
            validate_create(request, models)
        except RequestInvalidError as exc:
            violations += in_batch(index, exc.violations)
        if request.request_id:
            # One request_id is one task: a repeat of the same request answers it twice; another
            # request under it would be dropped without a word (it answered the first's task).
            body = request.SerializeToString(deterministic=True)
            earlier, seen = first.setdefault(request.request_id, (index, body))
            if seen != body:
                violations.append(
                    Violation(
                        f"requests[{index}].request_id",
                        f"is requests[{earlier}]'s, whose request differs (one request_id is one task)",
                    )
                )
    if violations:
        raise RequestInvalidError(violations)


def validate_webhook(c: _Checker, field: str, hook: task_pb2.Webhook) -> None:
    """An http(s) URL with a host, no credentials, and known event names (each once)."""
    url = hook.url
    if not url:
        c.add(f"{field}.url", "is required")
    elif len(url) > MAX_WEBHOOK_URL_CHARS or _CONTROL.search(url) or " " in url:
        c.add(f"{field}.url", f"must be an http(s) URL of at most {MAX_WEBHOOK_URL_CHARS} characters")
    else:
        parts = _http_parts(url)
        if parts is None:
            c.add(f"{field}.url", "must be an http(s) URL with a host (and a port of 1 to 65535)")
        elif parts.username or parts.password:
            c.add(f"{field}.url", "must not carry credentials (sign-in is by signature)")
    names = list(hook.events)
    try:
        parse_events(names)
    except ValueError as exc:
        c.add(f"{field}.events", str(exc))
    else:
        if len(set(names)) != len(names):
            c.add(f"{field}.events", "must not repeat an event")


def validate_task_id(field: str, value: str) -> None:
    """Ids are server-made; anything else cannot name a task (NOT_FOUND is then correct, but a
    malformed id is a client bug worth naming)."""
    if not _TASK_ID.fullmatch(value):
        raise RequestInvalidError([Violation(field, "must be a task id like task_<32 hex digits>")])


def validate_redeliver(req: task_service_pb2.RedeliverWebhookRequest) -> int | None:
    """Raises :class:`RequestInvalidError` unless the request names exactly one of a delivery
    (``msg_<32 hex digits>``) and a valid ``since``; returns ``since`` in microseconds (None
    for a delivery)."""
    if bool(req.delivery_id) == req.HasField("since"):
        raise RequestInvalidError([Violation("delivery_id", "give exactly one of delivery_id and since")])
    if req.delivery_id:
        if not _DELIVERY_ID.fullmatch(req.delivery_id):
            raise RequestInvalidError(
                [Violation("delivery_id", "must be a delivery id like msg_<32 hex digits>")]
            )
        return None
    try:
        return int(req.since.ToMicroseconds())  # checks the range: years 1 to 9999, nanos < 1e9
    except ValueError:
        raise RequestInvalidError(
            [Violation("since", "must be a valid timestamp (0001-01-01 to 9999-12-31 UTC)")]
        ) from None


def validate_list(req: task_service_pb2.ListTasksRequest) -> None:
    c = _Checker()
    validate_metadata(c, "metadata", req.metadata)
    if req.type not in _TASK_TYPES:
        c.add("type", f"unknown value {req.type}")
    if req.status not in _TASK_STATUSES:
        c.add("status", f"unknown value {req.status}")
    if req.page_size < 0 or req.page_size > MAX_PAGE_SIZE:
        c.add("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    if len(req.page_token) > 256:
        c.add("page_token", "is not a token this server issued")
    c.raise_if_any()


def validate_watch_filter(metadata: Mapping[str, str], task_type: int, after_sequence: int) -> None:
    c = _Checker()
    validate_metadata(c, "metadata", metadata)
    if task_type not in _TASK_TYPES:
        c.add("type", f"unknown value {task_type}")
    if after_sequence < 0:
        c.add("after_sequence", "must not be negative")
    c.raise_if_any()


def payload_identity(req: task_service_pb2.CreateTaskRequest) -> list[tuple[str, str, str]]:
    """Whom the payload says the task is for: (metadata key, value, field) for each character,
    view and costume id of the payload and of its callback that is set. An access token's
    creates must agree with its scope there too, not only in the metadata (which the client may
    set apart from the payload)."""
    kind = req.WhichOneof("payload")
    if kind is None:
        return []
    fields = [f for f in _payload_fields(req, kind) if f[0] != "characterName"]  # a name is no id
    payload = req.image if kind == "image" else req.tts
    if payload.HasField("callback"):
        cb = payload.callback
        fields += [
            ("characterId", cb.character_id, f"{kind}.callback.character_id"),
            ("viewType", cb.view_type, f"{kind}.callback.view_type"),
            ("costumeId", cb.costume_id, f"{kind}.callback.costume_id"),
        ]
    return [(key, value, field) for key, value, field in fields if value]


def _payload_fields(req: task_service_pb2.CreateTaskRequest, kind: str) -> list[tuple[str, str, str]]:
    """(metadata key, value, field) of each id and name the payload of ``kind`` has, set or not:
    what :func:`fill_metadata` copies and :func:`payload_identity` checks."""
    if kind == "image":
        p = req.image
        return [
            ("characterId", p.character_id, "image.character_id"),
            ("characterName", p.character_name, "image.character_name"),
            ("viewType", p.view_type, "image.view_type"),
            ("costumeId", p.costume_id, "image.costume_id"),
        ]
    t = req.tts
    return [
        ("characterId", t.character_id, "tts.character_id"),
        ("characterName", t.character_name, "tts.character_name"),
    ]


def fill_metadata(req: task_service_pb2.CreateTaskRequest) -> dict[str, str]:
    """Metadata of a new task: the client's, plus characterId/characterName/viewType/costumeId
    from the payload unless the client set those keys (so ``metadata.characterId=…`` always works)."""
    metadata = dict(req.metadata)
    kind = req.WhichOneof("payload")
    if kind is None:
        return metadata
    for key, value, _ in _payload_fields(req, kind):
        if value and key not in metadata:
            metadata[key] = value
    # Tasks the seed's frontend submits carry a character callback and no metadata; its own
    # query (metadata.category=character_design) must find them.
    if (req.image if kind == "image" else req.tts).HasField("callback") and "category" not in metadata:
        metadata["category"] = CHARACTER_CATEGORY
    return metadata


def validate_access_token_request(
    task_ids: Sequence[str],
    metadata: Mapping[str, str],
    allow_create: bool,
    ttl_seconds: float,
    max_ttl: float,
) -> None:
    """Raises :class:`RequestInvalidError` naming every bad field of a CreateAccessTokenRequest."""
    c = _Checker()
    if not task_ids and not metadata:
        c.add("task_ids", "give task_ids or metadata: a token that reaches nothing is of no use")
    if len(task_ids) > MAX_TOKEN_TASKS:
        c.add("task_ids", f"must name at most {MAX_TOKEN_TASKS} tasks (got {len(task_ids)})")
    for n, task_id in enumerate(task_ids[:MAX_TOKEN_TASKS]):
        if not _TASK_ID.fullmatch(task_id):
            c.add(f"task_ids[{n}]", "must be a task id like task_<32 hex digits>")
    validate_metadata(c, "metadata", metadata)
    if allow_create and not metadata:
        c.add("allow_create", "needs metadata: a token creates tasks only inside its metadata scope")
    if not (math.isfinite(ttl_seconds) and 0 < ttl_seconds <= max_ttl):
        c.add("ttl", f"must be more than 0 and at most {max_ttl:g} s (CHARAI_ACCESS_TOKEN_MAX_TTL_SECONDS)")
    c.raise_if_any()
