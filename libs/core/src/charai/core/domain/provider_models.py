"""What each provider dialect and model accepts: sizes, prompt and text lengths, qualities, image
and audio formats, voices, speeds.

Why one table: the gateway and task_store refuse a request the configured model cannot serve
(a clear INVALID_ARGUMENT naming the field, nothing stored), and the workers shape the provider
call by the same facts (which image models take ``response_format``). Facts from
``reference/zhipu-api.md`` and OpenAI's API reference. A model the table does not know (a
local OpenAI-compatible server's own name) gets the dialect's lenient rules: the server decides.
Pure data and lookups; no I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

ZHIPU = "zhipu"
OPENAI = "openai"
PROVIDERS = (ZHIPU, OPENAI)

#: (min side, max side, multiple of, max pixels) of a custom ``WxH`` size.
SizeRule = tuple[int, int, int, int]

GLM_IMAGE_RULE: SizeRule = (1024, 2048, 32, 2**22)
COGVIEW_RULE: SizeRule = (512, 2048, 16, 2**21)
#: Sizes a model of an OpenAI-compatible server the table does not know may be asked for.
OPEN_RULE: SizeRule = (256, 4096, 8, 4096 * 4096)

OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse"}
    | {"marin", "cedar"}
)
#: The voices of tts-1 and tts-1-hd (the newer voices are gpt-4o-mini-tts only).
OPENAI_TTS1_VOICES = frozenset({"alloy", "ash", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer"})
#: The audio formats charai delivers (``TtsPayload.response_format``), whatever the provider.
AUDIO_FORMATS = ("wav", "pcm", "mp3")
IMAGE_FILE_FORMATS = ("png", "jpeg", "webp")


@dataclasses.dataclass(frozen=True, slots=True)
class ImageModel:
    """What one image model accepts.

    Attributes:
        name: The model name sent to the provider.
        max_prompt_chars: Longest prompt.
        sizes: The only sizes accepted (OpenAI's models have a fixed list); empty: ``size_rule``.
        size_rule: Custom sizes accepted when ``sizes`` is empty.
        recommended: Sizes the docs recommend even where they fall outside ``size_rule``.
        qualities: Values of ``quality``; ``None``: any short word (passed through).
        output_formats: Values of ``output_format``; empty: the model has no choice.
        response_format: Whether the request may carry ``response_format`` (OpenAI's GPT image
            models refuse it and always answer ``b64_json``).
    """

    name: str
    max_prompt_chars: int
    sizes: tuple[str, ...] = ()
    size_rule: SizeRule = COGVIEW_RULE
    recommended: frozenset[tuple[int, int]] = frozenset()
    qualities: tuple[str, ...] | None = ()
    output_formats: tuple[str, ...] = ()
    response_format: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class TtsModel:
    """What one TTS model accepts.

    Attributes:
        name: The model name sent to the provider.
        max_text_chars: Longest ``input``.
        voices: Voices accepted; ``None``: any voice id (Zhipu's cloned voices, local servers).
        min_speed: Slowest ``speed``.
        max_speed: Fastest ``speed``.
        native_formats: The formats of ``AUDIO_FORMATS`` the provider produces itself; the
            worker converts to the others.
        native_volume: Whether the provider takes ``volume`` (else the worker applies the gain).
    """

    name: str
    max_text_chars: int
    voices: frozenset[str] | None = None
    min_speed: float = 0.5
    max_speed: float = 2.0
    native_formats: tuple[str, ...] = ("wav", "pcm")
    native_volume: bool = True


_ZHIPU_PROMPT = 4000
_IMAGE_MODELS: dict[tuple[str, str], ImageModel] = {
    (ZHIPU, "glm-image"): ImageModel(
        "glm-image",
        _ZHIPU_PROMPT,
        size_rule=GLM_IMAGE_RULE,
        recommended=frozenset({(1728, 960), (960, 1728)}),
        qualities=("hd",),
    ),
    (OPENAI, "dall-e-2"): ImageModel(
        "dall-e-2", 1000, sizes=("256x256", "512x512", "1024x1024"), qualities=("standard",)
    ),
    (OPENAI, "dall-e-3"): ImageModel(
        "dall-e-3", 4000, sizes=("1024x1024", "1792x1024", "1024x1792"), qualities=("standard", "hd")
    ),
}
_GPT_IMAGE = ImageModel(
    "gpt-image",
    32000,
    sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
    qualities=("low", "medium", "high", "auto"),
    output_formats=IMAGE_FILE_FORMATS,
    response_format=False,
)
_TTS_MODELS: dict[tuple[str, str], TtsModel] = {
    (OPENAI, "tts-1"): TtsModel("tts-1", 4096, OPENAI_TTS1_VOICES, 0.25, 4.0, AUDIO_FORMATS, False),
    (OPENAI, "tts-1-hd"): TtsModel("tts-1-hd", 4096, OPENAI_TTS1_VOICES, 0.25, 4.0, AUDIO_FORMATS, False),
    (OPENAI, "gpt-4o-mini-tts"): TtsModel(
        "gpt-4o-mini-tts", 4096, OPENAI_VOICES, 0.25, 4.0, AUDIO_FORMATS, False
    ),
}


def image_model(provider: str, name: str) -> ImageModel:
    """The rules of image model ``name`` on ``provider`` (lenient ones for a model not listed)."""
    known = _IMAGE_MODELS.get((provider, name))
    if known is not None:
        return known
    if provider == OPENAI:
        if name.startswith("gpt-image"):
            return dataclasses.replace(_GPT_IMAGE, name=name)
        return ImageModel(name, 4000, size_rule=OPEN_RULE, qualities=None, output_formats=IMAGE_FILE_FORMATS)
    # CogView models (and any other Zhipu model): the documented custom-size rule of the others.
    return ImageModel(name, _ZHIPU_PROMPT, size_rule=COGVIEW_RULE, qualities=("hd", "standard"))


def tts_model(provider: str, name: str) -> TtsModel:
    """The rules of TTS model ``name`` on ``provider`` (lenient ones for a model not listed)."""
    known = _TTS_MODELS.get((provider, name))
    if known is not None:
        return known
    if provider == OPENAI:
        return TtsModel(name, 4096, None, 0.25, 4.0, AUDIO_FORMATS, False)
    return TtsModel(name, 1024)  # GLM-TTS: input maxLength 1024, wav/pcm only, volume native


class _Configured(Protocol):
    """What :meth:`ProviderModels.of` reads: the common settings of any charai process."""

    @property
    def image_provider(self) -> str: ...
    @property
    def image_model(self) -> str: ...
    @property
    def tts_provider(self) -> str: ...
    @property
    def tts_model(self) -> str: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ProviderModels:
    """The configured providers and models (``CHARAI_IMAGE_PROVIDER``/``_MODEL``,
    ``CHARAI_TTS_PROVIDER``/``_MODEL``), whose limits requests are checked against."""

    image_provider: str = ZHIPU
    image_model: str = "glm-image"
    tts_provider: str = ZHIPU
    tts_model: str = "glm-tts"

    @property
    def image(self) -> ImageModel:
        return image_model(self.image_provider, self.image_model)

    @property
    def tts(self) -> TtsModel:
        return tts_model(self.tts_provider, self.tts_model)

    @classmethod
    def of(cls, settings: _Configured) -> ProviderModels:
        """The providers and models a settings object configures."""
        return cls(settings.image_provider, settings.image_model, settings.tts_provider, settings.tts_model)
