"""Pure tests of request validation (charai.core.validation)."""

from __future__ import annotations

import math

import pytest
from charai.core import validation
from charai.core.validation import (
    RequestInvalidError,
    fill_metadata,
    parse_resolution,
    validate_create,
    validate_list,
    validate_task_id,
    validate_watch_filter,
)
from charai.tasks.v1 import task_pb2, task_service_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

IMAGE = task_pb2.TASK_TYPE_IMAGE_GENERATION
TTS = task_pb2.TASK_TYPE_TTS_GENERATION
TASK_ID = "task_" + "0123456789abcdef" * 2


# --- the seed's sample payloads (character-ai-task-queue-design.md) ---------------------------------


def seed_image(**overrides: object) -> task_service_pb2.CreateTaskRequest:
    image = {
        "character_id": "char_001",
        "character_name": "李明",
        "prompt": "一位穿着蓝色长袍的年轻剑客，正面全身像，白色背景",
        "resolution": "1024x1024",
        "view_type": "front",
        "callback": task_pb2.Callback(type="character_view", character_id="char_001", view_type="front"),
    }
    image.update(overrides)
    return task_service_pb2.CreateTaskRequest(
        type=IMAGE,
        priority=task_pb2.PRIORITY_NORMAL,
        image=task_pb2.ImagePayload(**image),  # type: ignore[arg-type]
        metadata={
            "characterId": "char_001",
            "characterName": "李明",
            "viewType": "front",
            "category": "character_design",
        },
    )


def seed_costume() -> task_service_pb2.CreateTaskRequest:
    return seed_image(
        view_type="front",
        costume_id="costume_summer",
        callback=task_pb2.Callback(
            type="character_costume", character_id="char_001", view_type="front", costume_id="costume_summer"
        ),
    )


def seed_tts(**overrides: object) -> task_service_pb2.CreateTaskRequest:
    tts = {
        "character_id": "char_001",
        "character_name": "李明",
        "text": "你好，我是李明。今天天气真不错！",
        "voice_style": "tongtong",
        "speed": 1.0,
        "volume": 1.0,
        "response_format": "wav",
        "callback": task_pb2.Callback(type="character_voice", character_id="char_001"),
    }
    tts.update(overrides)
    return task_service_pb2.CreateTaskRequest(
        type=TTS,
        priority=task_pb2.PRIORITY_NORMAL,
        tts=task_pb2.TtsPayload(**tts),  # type: ignore[arg-type]
        request_id="3f2c1b7e-8a4d-4c1e-9b2a-0d6e5f4a3b21",
    )


def violations(req: task_service_pb2.CreateTaskRequest, model: str = "glm-image") -> dict[str, str]:
    with pytest.raises(RequestInvalidError) as info:
        validate_create(req, model)
    assert str(info.value).startswith("invalid request: ")
    return {v.field: v.description for v in info.value.violations}


@pytest.mark.parametrize(
    "req",
    [
        seed_image(),
        seed_costume(),
        seed_image(resolution=""),  # the model's default size
        seed_image(callback=None),
        seed_tts(),
        seed_tts(response_format="mp3"),
        seed_tts(response_format="pcm"),
        seed_tts(response_format=""),
        seed_tts(speed=None, volume=None, callback=None),
        seed_tts(speed=0.5, volume=10.0),
        seed_tts(speed=2.0, volume=0.01),
    ],
    ids=lambda r: r.WhichOneof("payload"),
)
def test_seed_payloads_are_accepted(req: task_service_pb2.CreateTaskRequest) -> None:
    validate_create(req)


def test_every_priority_is_accepted() -> None:
    for priority in task_pb2.Priority.values():
        req = seed_image()
        req.priority = priority
        validate_create(req)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "type", task_pb2.TASK_TYPE_UNSPECIFIED), "type"),
        (lambda r: setattr(r, "type", 42), "type"),
        (lambda r: setattr(r, "priority", 9), "priority"),
        (lambda r: r.ClearField("image"), "payload"),
        (lambda r: setattr(r, "type", TTS), "payload"),
        (lambda r: setattr(r.image, "character_id", ""), "image.character_id"),
        (lambda r: setattr(r.image, "character_id", "char 001"), "image.character_id"),
        (lambda r: setattr(r.image, "character_id", "c" * 129), "image.character_id"),
        (lambda r: setattr(r.image, "character_id", "../etc/passwd"), "image.character_id"),
        (lambda r: setattr(r.image, "character_name", "n" * 201), "image.character_name"),
        (lambda r: setattr(r.image, "character_name", "李\x00明"), "image.character_name"),
        (lambda r: setattr(r.image, "prompt", ""), "image.prompt"),
        (lambda r: setattr(r.image, "prompt", " \t\n "), "image.prompt"),
        (lambda r: setattr(r.image, "prompt", "p" * 4001), "image.prompt"),
        (lambda r: setattr(r.image, "prompt", "a\x07b"), "image.prompt"),
        (lambda r: setattr(r.image, "prompt", "a\x7fb"), "image.prompt"),
        (lambda r: setattr(r.image, "resolution", "1024*1024"), "image.resolution"),
        (lambda r: setattr(r.image, "resolution", "1000x1000"), "image.resolution"),
        (lambda r: setattr(r.image, "resolution", "big"), "image.resolution"),
        (lambda r: setattr(r.image, "view_type", "front view"), "image.view_type"),
        (lambda r: setattr(r.image, "costume_id", "a/b"), "image.costume_id"),
        (lambda r: setattr(r.image.callback, "type", "character_voice"), "image.callback.type"),
        (lambda r: setattr(r.image.callback, "character_id", "x y"), "image.callback.character_id"),
        (lambda r: setattr(r.image.callback, "view_type", "?"), "image.callback.view_type"),
        (lambda r: setattr(r.image.callback, "costume_id", "é"), "image.callback.costume_id"),
        (lambda r: r.metadata.update({"1bad": "x"}), "metadata['1bad']"),
        (lambda r: r.metadata.update({"good": "v" * 513}), "metadata[good]"),
        (lambda r: r.metadata.update({"good": "a\x1bb"}), "metadata[good]"),
        (lambda r: setattr(r, "request_id", "r" * 129), "request_id"),
        (lambda r: setattr(r, "request_id", "a\x00b"), "request_id"),
    ],
)
def test_bad_image_field_is_named(mutate: object, field: str) -> None:
    req = seed_image()
    mutate(req)  # type: ignore[operator]
    found = violations(req)
    assert field in found, found


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "type", IMAGE), "payload"),
        (lambda r: setattr(r.tts, "character_id", ""), "tts.character_id"),
        (lambda r: setattr(r.tts, "character_name", "n" * 201), "tts.character_name"),
        (lambda r: setattr(r.tts, "text", ""), "tts.text"),
        (lambda r: setattr(r.tts, "text", "t" * 1025), "tts.text"),
        (lambda r: setattr(r.tts, "text", "hi\x00"), "tts.text"),
        (lambda r: setattr(r.tts, "voice_style", ""), "tts.voice_style"),
        (lambda r: setattr(r.tts, "voice_style", "tong tong"), "tts.voice_style"),
        (lambda r: setattr(r.tts, "speed", 0.49), "tts.speed"),
        (lambda r: setattr(r.tts, "speed", 2.01), "tts.speed"),
        (lambda r: setattr(r.tts, "speed", 0.0), "tts.speed"),
        (lambda r: setattr(r.tts, "speed", math.nan), "tts.speed"),
        (lambda r: setattr(r.tts, "speed", math.inf), "tts.speed"),
        (lambda r: setattr(r.tts, "volume", 0.0), "tts.volume"),
        (lambda r: setattr(r.tts, "volume", -1.0), "tts.volume"),
        (lambda r: setattr(r.tts, "volume", 10.01), "tts.volume"),
        (lambda r: setattr(r.tts, "volume", math.nan), "tts.volume"),
        (lambda r: setattr(r.tts, "response_format", "ogg"), "tts.response_format"),
        (lambda r: setattr(r.tts, "response_format", "WAV"), "tts.response_format"),
        (lambda r: setattr(r.tts.callback, "type", "character_view"), "tts.callback.type"),
        (lambda r: setattr(r.tts.callback, "character_id", "a b"), "tts.callback.character_id"),
    ],
)
def test_bad_tts_field_is_named(mutate: object, field: str) -> None:
    req = seed_tts()
    mutate(req)  # type: ignore[operator]
    found = violations(req)
    assert field in found, found


def test_every_bad_field_is_reported_at_once() -> None:
    req = seed_image(character_id="", prompt="", resolution="1x1", view_type="a b")
    req.request_id = "x" * 200
    found = violations(req)
    assert {"image.character_id", "image.prompt", "image.resolution", "image.view_type", "request_id"} <= set(
        found
    )
    assert "1024-2048" in found["image.resolution"]
    assert "glm-image" in found["image.resolution"]


def test_limits_are_inclusive() -> None:
    validate_create(seed_image(prompt="p" * 4000, character_name="n" * 200, character_id="c" * 128))
    validate_create(seed_image(prompt="😀" * 4000))  # 16000 bytes of UTF-8
    validate_create(seed_tts(text="字" * 1024))
    req = seed_image()
    req.request_id = "r" * 128
    validate_create(req)


def test_an_image_seed_is_a_whole_number_a_javascript_client_keeps_exact() -> None:
    validate_create(seed_image(seed=0))
    validate_create(seed_image(seed=validation.MAX_SEED))
    validate_create(seed_tts(reuse=False))
    for bad in (-1, validation.MAX_SEED + 1, 2**63 - 1):
        found = violations(seed_image(seed=bad))
        assert found == {"image.seed": f"must be a whole number from 0 to {validation.MAX_SEED}"}, bad


def test_prompt_may_contain_tabs_and_newlines() -> None:
    validate_create(seed_image(prompt="line one\n\tline two\r\n"))


def test_metadata_limits() -> None:
    req = seed_image()
    req.metadata.clear()
    req.metadata.update({f"k{i}": "v" for i in range(32)})
    validate_create(req)
    req.metadata["k32"] = "v"
    assert "metadata" in violations(req)

    req = seed_image()
    req.metadata.clear()
    req.metadata.update({f"k{i}": "v" * 512 for i in range(17)})  # 17 * (2-3 + 512) > 8192 bytes
    assert "bytes" in violations(req)["metadata"]

    req = seed_image()
    req.metadata.clear()
    req.metadata["k" * 64] = "v"
    validate_create(req)
    req.metadata["k" * 65] = "v"
    assert any(field.startswith("metadata[") for field in violations(req))


def test_image_model_changes_the_allowed_sizes() -> None:
    req = seed_image(resolution="768x1344")
    assert "image.resolution" in violations(req, "glm-image")
    validate_create(req, "cogview-4")
    req = seed_image(resolution="2048x2048")
    validate_create(req, "glm-image")
    found = violations(req, "cogview-4")
    assert "512-2048" in found["image.resolution"]
    assert "cogview-4" in found["image.resolution"]


# --- parse_resolution ---------------------------------------------------------------------------------


def oracle(width: int, height: int, model: str) -> bool:
    """The documented custom-size rules (reference/zhipu-api.md), written independently."""
    if model == "glm-image":
        return (
            1024 <= width <= 2048
            and 1024 <= height <= 2048
            and width % 32 == 0 == height % 32
            and (width * height <= 2**22)
        )
    return (
        512 <= width <= 2048
        and 512 <= height <= 2048
        and width % 16 == 0 == height % 16
        and (width * height <= 2**21)
    )


@given(
    st.integers(100, 9999),
    st.integers(100, 9999),
    st.sampled_from(["glm-image", "cogview-4", "cogview-3-flash"]),
)
def test_parse_resolution_matches_the_documented_rules(width: int, height: int, model: str) -> None:
    expected = (width, height) if oracle(width, height, model) else None
    assert parse_resolution(f"{width}x{height}", model) == expected


def multiples(low: int, high: int, step: int) -> st.SearchStrategy[int]:
    return st.integers(low // step, high // step).map(lambda n: n * step)


@given(multiples(1024, 2048, 32), multiples(1024, 2048, 32))
def test_parse_resolution_glm_image_boundaries(width: int, height: int) -> None:
    result = parse_resolution(f"{width}x{height}", "glm-image")
    assert (result is not None) is (width * height <= 2**22)


@pytest.mark.parametrize(
    ("value", "model", "expected"),
    [
        ("1024x1024", "glm-image", (1024, 1024)),
        ("1280x1280", "glm-image", (1280, 1280)),  # glm-image's default
        ("2048x2048", "glm-image", (2048, 2048)),  # exactly 2^22 pixels
        ("1024×1024", "glm-image", (1024, 1024)),  # Zhipu's docs write the multiplication sign
        ("2048x2080", "glm-image", None),
        ("1040x1040", "glm-image", None),  # not a multiple of 32
        ("992x1024", "glm-image", None),
        ("1024x1024", "cogview-4", (1024, 1024)),  # the other models' default
        ("2048x1024", "cogview-4", (2048, 1024)),  # exactly 2^21 pixels
        ("2048x1040", "cogview-4", None),
        ("512x512", "cogview-4", (512, 512)),
        ("496x512", "cogview-4", None),
        ("520x520", "cogview-4", None),  # not divisible by 16
        ("1024X1024", "glm-image", None),
        (" 1024x1024", "glm-image", None),
        ("1024x1024px", "glm-image", None),
        ("01024x1024", "glm-image", None),
        ("", "glm-image", None),
        ("x", "glm-image", None),
    ],
)
def test_parse_resolution_examples(value: str, model: str, expected: tuple[int, int] | None) -> None:
    assert parse_resolution(value, model) == expected


@pytest.mark.parametrize("size", ["1568x1056", "1056x1568", "1472x1088", "1088x1472", "1728x960", "960x1728"])
def test_glm_image_recommended_sizes_are_accepted(size: str) -> None:
    """reference/zhipu-api.md lists these as glm-image's recommended sizes.

    BUG (libs/core/src/charai/core/validation.py:26 SIZE_RULES / parse_resolution): 1728x960 and
    960x1728 have a 960 px side, under the 1024 px custom-size minimum, so validate_create refuses
    two sizes the provider itself recommends for glm-image.
    """
    assert parse_resolution(size, "glm-image") is not None, f"{size} is a recommended glm-image size"


@pytest.mark.parametrize("size", ["768x1344", "864x1152", "1344x768", "1152x864", "1440x720", "720x1440"])
def test_other_models_recommended_sizes_are_accepted(size: str) -> None:
    assert parse_resolution(size, "cogview-4") is not None


@pytest.mark.parametrize(
    "value",
    [
        "1024x1024\n",  # `$` matches before a final newline
        "١٠٢٤x١٠٢٤",  # Arabic-Indic digits: `\d` is any Unicode digit, int() accepts them
        "１０２４x１０２４",  # fullwidth digits
    ],
)
def test_parse_resolution_refuses_non_ascii_sizes(value: str) -> None:
    """BUG (libs/core/src/charai/core/validation.py:36): ``_RESOLUTION = ^(\\d{3,4})[x\\u00d7](\\d{3,4})$``.

    ``$`` also matches before a trailing newline and ``\\d`` matches any Unicode decimal digit, so these
    pass validation, and services/image_worker/.../handler.py:90 then sends the raw string as Zhipu's
    ``size`` (a provider INVALID_REQUEST after queueing, instead of an early BadRequest). Use
    ``re.fullmatch`` with ``[0-9]`` (or ``re.ASCII``).
    """
    assert parse_resolution(value, "glm-image") is None, f"{value!r} must not be a valid resolution"


# --- arbitrary input never escapes as anything but RequestInvalidError ---------------------------------

any_text = st.text(max_size=60) | st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=10)
big_text = any_text | st.text(min_size=4001, max_size=4100)
maybe_float = st.none() | st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def arbitrary_requests(draw: st.DrawFn) -> task_service_pb2.CreateTaskRequest:
    req = task_service_pb2.CreateTaskRequest(
        # numbers outside the enums on purpose: ValueType is an int on the wire, unknown ones included
        type=task_pb2.TaskType.ValueType(draw(st.sampled_from([0, IMAGE, TTS, 7, -1]))),
        priority=task_pb2.Priority.ValueType(draw(st.sampled_from([0, 1, 2, 3, 4, -5]))),
        request_id=draw(any_text),
        metadata=draw(st.dictionaries(any_text, any_text, max_size=5)),
    )
    callback = task_pb2.Callback(
        type=draw(any_text), character_id=draw(any_text), view_type=draw(any_text), costume_id=draw(any_text)
    )
    payload = draw(st.sampled_from(["image", "tts", None]))
    if payload == "image":
        req.image.CopyFrom(
            task_pb2.ImagePayload(
                character_id=draw(any_text),
                character_name=draw(any_text),
                prompt=draw(big_text),
                resolution=draw(any_text | st.sampled_from(["1024x1024", "2048x2048", "1024×1024"])),
                view_type=draw(any_text),
                costume_id=draw(any_text),
            )
        )
        if draw(st.booleans()):
            req.image.callback.CopyFrom(callback)
    elif payload == "tts":
        req.tts.CopyFrom(
            task_pb2.TtsPayload(
                character_id=draw(any_text),
                character_name=draw(any_text),
                text=draw(big_text),
                voice_style=draw(any_text),
                response_format=draw(any_text | st.sampled_from(["wav", "pcm", "mp3"])),
            )
        )
        speed, volume = draw(maybe_float), draw(maybe_float)
        if speed is not None:
            req.tts.speed = speed
        if volume is not None:
            req.tts.volume = volume
        if draw(st.booleans()):
            req.tts.callback.CopyFrom(callback)
    return req


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(arbitrary_requests(), st.sampled_from(["glm-image", "cogview-4"]))
def test_validate_create_only_ever_raises_request_invalid(
    req: task_service_pb2.CreateTaskRequest, model: str
) -> None:
    try:
        validate_create(req, model)
    except RequestInvalidError as exc:
        assert exc.violations
        for violation in exc.violations:
            assert violation.field
            assert violation.description


ident = st.from_regex(r"[A-Za-z0-9_.:\-]{1,128}", fullmatch=True)
clean_text = st.text(
    alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=200
).filter(lambda s: s.strip())


@given(
    ident,
    st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=200),
    clean_text,
    multiples(1024, 2048, 32),
    multiples(1024, 2048, 32),
)
def test_well_formed_image_requests_pass(
    character_id: str, name: str, prompt: str, width: int, height: int
) -> None:
    resolution = f"{width}x{height}" if width * height <= 2**22 else ""
    validate_create(
        seed_image(character_id=character_id, character_name=name, prompt=prompt, resolution=resolution)
    )


@given(
    ident,
    clean_text,
    ident,
    st.floats(0.5, 2.0),
    st.floats(0.001, 10.0),
    st.sampled_from(["wav", "pcm", "mp3"]),
)
def test_well_formed_tts_requests_pass(
    character_id: str, text: str, voice: str, speed: float, volume: float, fmt: str
) -> None:
    validate_create(
        seed_tts(
            character_id=character_id,
            text=text,
            voice_style=voice,
            speed=speed,
            volume=volume,
            response_format=fmt,
        )
    )


@given(st.text(max_size=80))
def test_control_characters_in_the_prompt_are_refused(prompt: str) -> None:
    req = seed_image(prompt=prompt)
    has_control = any((ord(ch) < 0x20 and ch not in "\t\n\r") or ch == "\x7f" for ch in prompt)
    try:
        validate_create(req)
    except RequestInvalidError as exc:
        fields = {v.field for v in exc.violations}
        assert fields == {"image.prompt"}
        assert has_control or not prompt.strip()
    else:
        assert not has_control
        assert prompt.strip()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("character_id", "char_001\n"),
        ("view_type", "front\n"),
        ("costume_id", "costume\n"),
    ],
)
def test_identifiers_refuse_a_trailing_newline(field: str, value: str) -> None:
    """BUG (libs/core/src/charai/core/validation.py:33): ``_IDENT = ^[A-Za-z0-9_.:\\-]{1,128}$`` used with
    ``re.match``: ``$`` matches before a final "\\n", so "char_001\\n" passes as an identifier (and is
    stored, and copied into metadata.characterId by fill_metadata). Same for ``_KEY`` (metadata keys,
    line 34) and ``_TASK_ID`` (line 38). Use ``re.fullmatch`` or ``\\Z``.
    """
    req = seed_image(**{field: value})
    with pytest.raises(RequestInvalidError, match=f"image.{field}"):
        validate_create(req)


def test_metadata_key_refuses_a_trailing_newline() -> None:
    """BUG (validation.py:34, ``_KEY`` ends in ``$``): see test_identifiers_refuse_a_trailing_newline."""
    req = seed_image()
    req.metadata["characterId\n"] = "char_001"
    with pytest.raises(RequestInvalidError, match="metadata"):
        validate_create(req)


# --- task ids, list and watch filters --------------------------------------------------------------------


def test_validate_task_id_accepts_server_ids() -> None:
    validate_task_id("id", TASK_ID)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "task_",
        "task_" + "0" * 31,
        "task_" + "0" * 33,
        "task_" + "A" * 32,
        "TASK_" + "0" * 32,
        "job_" + "0" * 32,
        "../task_" + "0" * 32,
        "task_" + "0" * 31 + "g",
        " task_" + "0" * 32,
    ],
)
def test_validate_task_id_refuses_anything_else(value: str) -> None:
    with pytest.raises(RequestInvalidError) as info:
        validate_task_id("id", value)
    assert [v.field for v in info.value.violations] == ["id"]


def test_validate_task_id_refuses_a_trailing_newline() -> None:
    """BUG (validation.py:38): ``_TASK_ID = ^task_[0-9a-f]{32}$`` with ``re.match`` accepts a final "\\n"."""
    with pytest.raises(RequestInvalidError):
        validate_task_id("id", TASK_ID + "\n")


@given(st.text(max_size=50))
def test_validate_task_id_is_total(value: str) -> None:
    try:
        validate_task_id("name", value)
    except RequestInvalidError:
        return
    assert value.rstrip("\n").startswith("task_")


def test_validate_list() -> None:
    validate_list(task_service_pb2.ListTasksRequest())
    validate_list(
        task_service_pb2.ListTasksRequest(
            metadata={"characterId": "char_001", "category": "character_design"},
            type=IMAGE,
            status=task_pb2.TASK_STATUS_RUNNING,
            page_size=500,
            page_token="t" * 256,
        )
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_size": 501}, "page_size"),
        ({"type": 9}, "type"),
        ({"status": 6}, "status"),
        ({"page_token": "t" * 257}, "page_token"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
        ({"metadata": {"bad key": "v"}}, "metadata['bad key']"),
    ],
)
def test_validate_list_names_bad_fields(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(RequestInvalidError) as info:
        validate_list(task_service_pb2.ListTasksRequest(**kwargs))  # type: ignore[arg-type]
    assert field in {v.field for v in info.value.violations}


def test_validate_watch_filter() -> None:
    validate_watch_filter({}, task_pb2.TASK_TYPE_UNSPECIFIED, 0)
    validate_watch_filter({"characterId": "char_001"}, TTS, 12345)
    with pytest.raises(RequestInvalidError) as info:
        validate_watch_filter({"9": "x"}, 77, -1)
    fields = {v.field for v in info.value.violations}
    assert fields == {"metadata['9']", "type", "after_sequence"}


@given(st.dictionaries(any_text, any_text, max_size=40), st.integers(-5, 5), st.integers(-(2**63), 2**63 - 1))
def test_validate_watch_filter_is_total(metadata: dict[str, str], task_type: int, after: int) -> None:
    try:
        validate_watch_filter(metadata, task_type, after)
    except RequestInvalidError as exc:
        assert exc.violations


# --- fill_metadata ------------------------------------------------------------------------------------------


def test_fill_metadata_from_image_payload() -> None:
    req = seed_costume()
    req.metadata.clear()
    req.metadata["category"] = "character_design"
    assert fill_metadata(req) == {
        "category": "character_design",
        "characterId": "char_001",
        "characterName": "李明",
        "viewType": "front",
        "costumeId": "costume_summer",
    }


def test_fill_metadata_from_tts_payload() -> None:
    req = seed_tts()
    # The seed's tasks carry a character callback: they are character_design, as its query expects.
    assert fill_metadata(req) == {
        "characterId": "char_001",
        "characterName": "李明",
        "category": "character_design",
    }
    req.tts.ClearField("callback")
    assert fill_metadata(req) == {"characterId": "char_001", "characterName": "李明"}
    req.tts.callback.type = "character_voice"
    req.metadata["category"] = "voice_lines"
    assert fill_metadata(req)["category"] == "voice_lines"  # the client's own category wins


def test_fill_metadata_keeps_what_the_client_set() -> None:
    req = seed_image()
    req.metadata.clear()
    req.metadata.update({"characterId": "someone_else", "viewType": ""})
    filled = fill_metadata(req)
    assert filled["characterId"] == "someone_else"
    assert filled["viewType"] == ""
    assert filled["characterName"] == "李明"
    assert "costumeId" not in filled  # empty payload values are not copied


def test_fill_metadata_does_not_touch_the_request() -> None:
    req = seed_image()
    req.metadata.clear()
    before = task_service_pb2.CreateTaskRequest()
    before.CopyFrom(req)
    fill_metadata(req)
    assert req == before


def test_fill_metadata_without_payload() -> None:
    req = task_service_pb2.CreateTaskRequest(metadata={"a": "b"})
    assert fill_metadata(req) == {"a": "b"}


@given(
    ident,
    st.text(max_size=30),
    st.dictionaries(st.sampled_from(["characterId", "characterName", "x"]), ident),
)
def test_fill_metadata_property(character_id: str, name: str, client: dict[str, str]) -> None:
    req = seed_tts(character_id=character_id, character_name=name)
    req.metadata.update(client)
    filled = fill_metadata(req)
    for key, value in client.items():
        assert filled[key] == value
    if "characterId" not in client:
        assert filled["characterId"] == character_id
    if "characterName" not in client:
        assert filled.get("characterName", "") == name


def test_limits_constants() -> None:
    assert validation.MAX_PROMPT_CHARS == 4000
    assert validation.MAX_TTS_TEXT_CHARS == 1024
    assert validation.MAX_PAGE_SIZE == 500


# --- webhook URLs and RedeliverWebhook ------------------------------------------------------------


def with_webhook(url: str) -> task_service_pb2.CreateTaskRequest:
    req = seed_image()
    req.webhook.url = url
    return req


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # urllib raises ValueError (a bad IPv6 literal)
        "http://[zz]/x",
        "https://hooks.example.com:99999/x",  # a port out of range: ValueError when read
        "https://hooks.example.com:0/x",
        "https://hooks.example.com:x/",
        "https:///x",
    ],
)
def test_a_webhook_url_without_a_usable_host_and_port_is_named(url: str) -> None:
    with pytest.raises(RequestInvalidError) as caught:
        validate_create(with_webhook(url))
    assert [v.field for v in caught.value.violations] == ["webhook.url"]


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/x", "https://hooks.example.com:8443/x", "http://[::1]:8080/in"]
)
def test_a_webhook_url_with_a_host_and_a_port_passes(url: str) -> None:
    validate_create(with_webhook(url))


@given(st.text(max_size=60), st.sampled_from(["", "http://", "https://", "http://[", "https://h:"]))
def test_validate_create_only_ever_raises_request_invalid_whatever_the_webhook_url(
    tail: str, head: str
) -> None:
    try:
        validate_create(with_webhook(head + tail))
    except RequestInvalidError as exc:
        assert [v.field for v in exc.violations] == ["webhook.url"]


def test_validate_redeliver() -> None:
    redeliver = task_service_pb2.RedeliverWebhookRequest
    delivery = "msg_" + "0123456789abcdef" * 2
    assert validation.validate_redeliver(redeliver(delivery_id=delivery)) is None
    assert validation.validate_redeliver(redeliver(since=Timestamp(seconds=2, nanos=5000))) == 2_000_005
    for request, field in [
        (redeliver(), "delivery_id"),
        (redeliver(delivery_id=delivery, since=Timestamp(seconds=1)), "delivery_id"),
        (redeliver(delivery_id="x" * 5000), "delivery_id"),
        (redeliver(delivery_id=delivery + "\n"), "delivery_id"),
        (redeliver(delivery_id=TASK_ID), "delivery_id"),
        (redeliver(since=Timestamp(seconds=10**12)), "since"),
        (redeliver(since=Timestamp(seconds=-(10**15))), "since"),
        (redeliver(since=Timestamp(seconds=1, nanos=-5)), "since"),
        (redeliver(since=Timestamp(seconds=1, nanos=10**9)), "since"),
    ]:
        with pytest.raises(RequestInvalidError) as caught:
            validation.validate_redeliver(request)
        assert [v.field for v in caught.value.violations] == [field], request


def test_a_batch_may_repeat_a_request_but_not_reuse_its_request_id_for_another() -> None:
    # The second request answered the first's task and was dropped without a word.
    first = seed_image()
    first.request_id = "sheet-1"
    same = task_service_pb2.CreateTaskRequest()
    same.CopyFrom(first)
    validation.validate_batch([first, same])  # the same request twice: one task, answered twice
    other = seed_costume()
    other.request_id = "sheet-1"
    with pytest.raises(RequestInvalidError) as caught:
        validation.validate_batch([first, same, other])
    assert [v.field for v in caught.value.violations] == ["requests[2].request_id"]
    assert "requests[0]" in caught.value.violations[0].description
