"""Pure tests of the provider dialects: settings, per-model validation, OpenAI error
classification, and the shape of the TTS request (no I/O, no event loop)."""

from __future__ import annotations

import array

import pytest
from charai.core import settings as core_settings
from charai.core.domain.errors import ErrorKind, classify_http, parse_retry_after
from charai.core.domain.provider_models import ProviderModels, image_model, tts_model
from charai.core.settings import CommonSettings
from charai.core.validation import RequestInvalidError, validate_batch, validate_create
from charai.tasks.v1 import task_pb2, task_service_pb2
from charai.tts_worker.audio import BadAudioError, apply_gain, pcm_to_wav
from charai.tts_worker.handler import INLINE_FINISH_BYTES, finish, finishes_inline, speech_request
from charai.worker.settings import ImageWorkerSettings, TtsWorkerSettings

OPENAI = ProviderModels("openai", "gpt-image-1", "openai", "gpt-4o-mini-tts")
ZHIPU = ProviderModels()


def image_request(**fields: object) -> task_service_pb2.CreateTaskRequest:
    values: dict[str, object] = {"character_id": "char_001", "prompt": "a knight"}
    values.update(fields)
    payload = task_pb2.ImagePayload(**values)  # type: ignore[arg-type]
    return task_service_pb2.CreateTaskRequest(type=task_pb2.TASK_TYPE_IMAGE_GENERATION, image=payload)


def tts_request(**fields: object) -> task_service_pb2.CreateTaskRequest:
    values: dict[str, object] = {"character_id": "char_001", "text": "hello", "voice_style": "alloy"}
    values.update(fields)
    payload = task_pb2.TtsPayload(**values)  # type: ignore[arg-type]
    return task_service_pb2.CreateTaskRequest(type=task_pb2.TASK_TYPE_TTS_GENERATION, tts=payload)


def violations(req: task_service_pb2.CreateTaskRequest, models: ProviderModels) -> dict[str, str]:
    with pytest.raises(RequestInvalidError) as info:
        validate_create(req, models)
    return {v.field: v.description for v in info.value.violations}


# --- settings -----------------------------------------------------------------------------------------


def test_providers_default_to_zhipu_and_openai_switches_model_and_base_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("IMAGE_PROVIDER", "TTS_PROVIDER", "IMAGE_MODEL", "TTS_MODEL", "IMAGE_API_BASE_URL"):
        monkeypatch.delenv(f"CHARAI_{name}", raising=False)
    monkeypatch.delenv("CHARAI_TTS_API_BASE_URL", raising=False)
    zhipu = ImageWorkerSettings()
    assert (zhipu.image_provider, zhipu.image_model, zhipu.tts_model) == ("zhipu", "glm-image", "glm-tts")
    assert zhipu.image_api_base_url == core_settings.ZHIPU_BASE_URL

    monkeypatch.setenv("CHARAI_IMAGE_PROVIDER", " OpenAI ")
    monkeypatch.setenv("CHARAI_TTS_PROVIDER", "openai")
    image, tts = ImageWorkerSettings(), TtsWorkerSettings()
    assert (image.image_provider, image.image_model) == ("openai", "gpt-image-1")
    assert image.image_api_base_url == "https://api.openai.com/v1"
    assert (tts.tts_provider, tts.tts_model) == ("openai", "gpt-4o-mini-tts")
    assert tts.tts_api_base_url == "https://api.openai.com/v1"

    monkeypatch.setenv("CHARAI_IMAGE_MODEL", "dall-e-3")
    monkeypatch.setenv("CHARAI_IMAGE_API_BASE_URL", "http://127.0.0.1:8000/v1")
    image = ImageWorkerSettings()
    assert (image.image_model, image.image_api_base_url) == ("dall-e-3", "http://127.0.0.1:8000/v1")
    assert ProviderModels.of(CommonSettings()) == ProviderModels(
        "openai", "dall-e-3", "openai", "gpt-4o-mini-tts"
    )


def test_an_unknown_provider_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHARAI_TTS_PROVIDER", "azure")
    with pytest.raises(SystemExit):
        core_settings.load(TtsWorkerSettings)
    err = capsys.readouterr().err
    assert "CHARAI_TTS_PROVIDER='azure'" in err
    assert "'zhipu' or 'openai'" in err


# --- validation per configured model -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "good", "bad"),
    [
        ("dall-e-2", ["256x256", "512x512", "1024x1024"], ["1792x1024", "auto", "768x768"]),
        ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"], ["512x512", "1536x1024", "auto"]),
        ("gpt-image-1", ["1024x1024", "1536x1024", "1024x1536", "auto"], ["1792x1024", "256x256"]),
    ],
)
def test_openai_image_sizes_follow_the_model(model: str, good: list[str], bad: list[str]) -> None:
    models = ProviderModels("openai", model)
    for size in good:
        validate_create(image_request(resolution=size), models)
    for size in bad:
        found = violations(image_request(resolution=size), models)
        assert model in found["image.resolution"]
        assert good[0] in found["image.resolution"]


def test_zhipu_sizes_are_unchanged() -> None:
    validate_create(image_request(resolution="1280x1280"), ZHIPU)
    assert "image.resolution" in violations(image_request(resolution="768x768"), ZHIPU)
    assert "image.resolution" in violations(image_request(resolution="auto"), ZHIPU)


@pytest.mark.parametrize(("model", "limit"), [("dall-e-2", 1000), ("dall-e-3", 4000), ("gpt-image-1", 32000)])
def test_prompt_length_follows_the_model(model: str, limit: int) -> None:
    models = ProviderModels("openai", model)
    validate_create(image_request(prompt="a" * limit), models)
    found = violations(image_request(prompt="a" * (limit + 1)), models)
    assert f"at most {limit} characters" in found["image.prompt"]


def test_quality_and_output_format_are_checked_per_model() -> None:
    gpt = ProviderModels("openai", "gpt-image-1")
    validate_create(image_request(quality="high", output_format="webp"), gpt)
    found = violations(image_request(quality="hd", output_format="gif"), gpt)
    assert "low, medium, high, auto" in found["image.quality"]
    assert "png, jpeg, webp" in found["image.output_format"]

    dalle3 = ProviderModels("openai", "dall-e-3")
    validate_create(image_request(quality="hd"), dalle3)
    found = violations(image_request(quality="high", output_format="png"), dalle3)
    assert "standard, hd" in found["image.quality"]
    assert "not supported by model dall-e-3" in found["image.output_format"]

    validate_create(image_request(quality="hd"), ZHIPU)
    found = violations(image_request(quality="standard", output_format="png"), ZHIPU)
    assert "glm-image" in found["image.quality"]
    assert "image.output_format" in found
    validate_create(image_request(quality="standard"), ProviderModels(image_model="cogview-4"))


def test_an_unknown_openai_compatible_model_gets_lenient_rules() -> None:
    local = ProviderModels("openai", "stable-diffusion-xl", "openai", "kokoro")
    validate_create(image_request(resolution="768x512", quality="anything-goes"), local)
    assert "image.resolution" in violations(image_request(resolution="100x100"), local)
    validate_create(tts_request(voice_style="af_bella", text="x" * 4096), local)


def test_tts_limits_follow_the_provider() -> None:
    validate_create(tts_request(text="a" * 4096, speed=4.0, response_format="mp3"), OPENAI)
    found = violations(tts_request(text="a" * 4097, voice_style="tongtong", speed=4.5), OPENAI)
    assert "at most 4096 characters" in found["tts.text"]
    assert "alloy" in found["tts.voice_style"] and "gpt-4o-mini-tts" in found["tts.voice_style"]
    assert found["tts.speed"] == "must be between 0.25 and 4"
    tts1 = ProviderModels(tts_provider="openai", tts_model="tts-1")
    assert "tts.voice_style" in violations(tts_request(voice_style="marin"), tts1)
    assert "tts.response_format" in violations(tts_request(response_format="opus"), OPENAI)

    # Zhipu as before: 1024 characters, any voice id (cloned voices), speed 0.5-2.
    validate_create(tts_request(voice_style="my_cloned_voice", text="a" * 1024), ZHIPU)
    found = violations(tts_request(text="a" * 1025, speed=0.25), ZHIPU)
    assert "at most 1024 characters" in found["tts.text"]
    assert "tts.speed" in found


def test_a_batch_is_checked_against_the_configured_models() -> None:
    with pytest.raises(RequestInvalidError) as info:
        validate_batch([image_request(resolution="1024x1024"), image_request(resolution="1280x1280")], OPENAI)
    assert [v.field for v in info.value.violations] == ["requests[1].image.resolution"]


def test_the_model_table_knows_which_image_models_take_response_format() -> None:
    assert image_model("openai", "dall-e-3").response_format
    assert not image_model("openai", "gpt-image-1").response_format
    assert not image_model("openai", "gpt-image-1-mini").response_format
    assert tts_model("zhipu", "glm-tts").native_formats == ("wav", "pcm")
    assert tts_model("openai", "tts-1").native_formats == ("wav", "pcm", "mp3")


# --- OpenAI error bodies (DESIGN.md section 4) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "error_type", "kind"),
    [
        (401, "invalid_api_key", "invalid_request_error", ErrorKind.PROVIDER_AUTH),
        (400, "invalid_api_key", "invalid_request_error", ErrorKind.PROVIDER_AUTH),
        (403, "unsupported_country_region_territory", "", ErrorKind.PROVIDER_AUTH),
        (429, "insufficient_quota", "insufficient_quota", ErrorKind.QUOTA_EXHAUSTED),
        (429, "", "insufficient_quota", ErrorKind.QUOTA_EXHAUSTED),
        (400, "billing_hard_limit_reached", "invalid_request_error", ErrorKind.QUOTA_EXHAUSTED),
        (429, "rate_limit_exceeded", "requests", ErrorKind.RATE_LIMITED),
        (400, "content_policy_violation", "invalid_request_error", ErrorKind.CONTENT_REJECTED),
        (400, "moderation_blocked", "image_generation_user_error", ErrorKind.CONTENT_REJECTED),
        (400, "unknown_parameter", "invalid_request_error", ErrorKind.INVALID_REQUEST),
        (404, "model_not_found", "invalid_request_error", ErrorKind.INVALID_REQUEST),
        (500, "", "server_error", ErrorKind.PROVIDER_UNAVAILABLE),
        (503, "", "", ErrorKind.PROVIDER_UNAVAILABLE),
    ],
)
def test_openai_error_bodies_are_classified(status: int, code: str, error_type: str, kind: ErrorKind) -> None:
    failure = classify_http(
        status, code, "the provider's words", error_type=error_type, key_setting="CHARAI_TTS_API_KEY"
    )
    assert failure.kind is kind
    if kind is ErrorKind.PROVIDER_AUTH:
        assert "CHARAI_TTS_API_KEY" in failure.message
    else:
        assert failure.message == "the provider's words"


def test_retry_after_ms_wins_over_retry_after() -> None:
    """OpenAI's SDK order: ``retry-after-ms`` first, then ``retry-after`` in seconds."""
    assert parse_retry_after("7", "1500") == 1.5
    assert parse_retry_after("7", "soon") == 7.0
    assert parse_retry_after(None, None) is None


def test_a_rate_limit_keeps_its_retry_after() -> None:
    failure = classify_http(429, "rate_limit_exceeded", "slow down", error_type="requests", retry_after=1.5)
    assert failure.kind is ErrorKind.RATE_LIMITED
    assert failure.retry_after == 1.5
    assert failure.retryable


# --- the TTS request per dialect --------------------------------------------------------------------


def tts_payload(**fields: object) -> task_pb2.TtsPayload:
    return task_pb2.TtsPayload(character_id="c", text="hello", **fields)  # type: ignore[arg-type]


def test_openai_speech_asks_for_the_wanted_format_and_never_sends_volume() -> None:
    for wanted in ("mp3", "wav", "pcm"):
        plan = speech_request("openai", "gpt-4o-mini-tts", tts_payload(speed=1.25), wanted)
        assert plan.asked == wanted
        assert plan.gain == 1.0
        assert plan.body == {
            "model": "gpt-4o-mini-tts",
            "input": "hello",
            "voice": "alloy",
            "response_format": wanted,
            "speed": 1.25,
        }
    plan = speech_request("openai", "tts-1", tts_payload(voice_style="nova", volume=1.0), "mp3")
    assert "volume" not in plan.body and plan.body["voice"] == "nova" and plan.asked == "mp3"


def test_openai_speech_with_a_volume_asks_wav_and_applies_the_gain_here() -> None:
    plan = speech_request("openai", "gpt-4o-mini-tts", tts_payload(volume=2.0), "mp3")
    assert (plan.asked, plan.gain) == ("wav", 2.0)
    assert "volume" not in plan.body and plan.body["response_format"] == "wav"
    samples = array.array("h", [0, 1000, -1000, 20000]).tobytes()
    encoded = finish(pcm_to_wav(samples), "audio/wav", plan, "pcm")
    assert array.array("h", encoded.data).tolist() == [0, 2000, -2000, 32767]


def test_only_a_copy_is_finished_on_the_event_loop() -> None:
    # WAV or PCM without gain is a header and a copy: done inline; MP3 encoding, a gain or a
    # clip over the inline size go to a thread.
    clip = pcm_to_wav(array.array("h", [0, 1, 2, 3]).tobytes())
    plain = speech_request("zhipu", "glm-tts", tts_payload(), "wav")
    assert finishes_inline(clip, plain, "wav") and finishes_inline(clip, plain, "pcm")
    assert not finishes_inline(clip, speech_request("zhipu", "glm-tts", tts_payload(), "mp3"), "mp3")
    loud = speech_request("openai", "gpt-4o-mini-tts", tts_payload(volume=2.0), "wav")
    assert not finishes_inline(clip, loud, "wav")
    assert not finishes_inline(b"\0" * (INLINE_FINISH_BYTES + 1), plain, "wav")


def test_zhipu_speech_is_unchanged() -> None:
    plan = speech_request("zhipu", "glm-tts", tts_payload(volume=2.0), "mp3")
    assert plan.asked == "wav" and plan.gain == 1.0
    assert plan.body["volume"] == 2.0 and plan.body["voice"] == "tongtong"
    assert speech_request("zhipu", "glm-tts", tts_payload(), "pcm").asked == "pcm"


def test_apply_gain_clips_and_refuses_half_samples() -> None:
    samples = array.array("h", [-32768, -20000, 0, 1, 20000, 32767]).tobytes()
    assert array.array("h", apply_gain(samples, 0.5)).tolist() == [-16384, -10000, 0, 0, 10000, 16384]
    assert array.array("h", apply_gain(samples, 3.0)).tolist() == [-32768, -32768, 0, 3, 32767, 32767]
    with pytest.raises(BadAudioError):
        apply_gain(b"\x00\x01\x02", 2.0)
    with pytest.raises(BadAudioError):
        apply_gain(samples, 0.0)
