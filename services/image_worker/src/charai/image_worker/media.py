"""Checks that bytes a provider handed back really are an image we are willing to store.

Why: a provider (or whatever answers in its place) can send an HTML error page, a truncated
file, a GIF, or a decompression bomb with a ``200``. charai stores media under its own URL and
serves it to browsers, so nothing but a complete PNG, JPEG or WebP of sane size may pass.
Pure: bytes in, facts or an exception out; no I/O.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096
"""Largest image accepted. Zhipu's largest size is 2048x2048 (2**22 px); four times that leaves
room for other providers while keeping a decoded image far below Pillow's own bomb limit."""

_FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
}
"""Pillow format name -> (content type, file extension) for every format we accept."""


class ImageRejectedError(ValueError):
    """The bytes are not an acceptable image; the message says why (it reaches the task's error)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageInfo:
    """What a validated image is.

    Attributes:
        format: Pillow's format name: ``PNG``, ``JPEG`` or ``WEBP``.
        content_type: MIME type to store and serve it with.
        extension: File extension for the media key, without the dot.
        width: Pixel width.
        height: Pixel height.
    """

    format: str
    content_type: str
    extension: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """The accepted format the magic bytes announce, or ``None``.

    Checked before Pillow sees the data so that only three small, well-audited decoders are
    ever reached, whatever the bytes claim to be.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe(data: bytes) -> str:
    """A short hint of what the bytes are instead, for the error message."""
    head = data[:16].lstrip()
    if not head:
        return "empty or blank"
    if head[:1] in (b"{", b"["):
        return "looks like JSON"
    if head[:1] == b"<":
        return "looks like HTML/XML"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "a GIF"
    return f"starts with {data[:8].hex()}"


def inspect_image(data: bytes) -> ImageInfo:
    """Validates ``data`` as a complete PNG, JPEG or WebP image and reads its size.

    The header is parsed first (cheap) so the pixel cap is enforced before anything is decoded;
    then ``verify()`` checks the PNG chunk CRCs, and the pixels are decoded once so a truncated
    or corrupt file is caught here rather than in a browser (a few milliseconds per megapixel;
    callers run this in a thread).

    Args:
        data: The bytes the provider returned.

    Returns:
        The image's format, content type, extension and dimensions.

    Raises:
        ImageRejectedError: If the bytes are not an accepted, complete image of sane size.
    """
    if not data:
        raise ImageRejectedError("the image is empty")
    sniffed = sniff_format(data)
    if sniffed is None:
        raise ImageRejectedError(f"not a PNG, JPEG or WebP image ({_describe(data)})")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice its limit; make that a refusal too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(_FORMATS)) as image:
                fmt = str(image.format or "")
                width, height = image.size
                if fmt != sniffed:
                    raise ImageRejectedError(
                        f"the magic bytes say {sniffed} but the data is {fmt or 'unknown'}"
                    )
                if width < 1 or height < 1:
                    raise ImageRejectedError(f"the image has no pixels ({width}x{height})")
                if width * height > MAX_PIXELS:
                    raise ImageRejectedError(f"the image is too large ({width}x{height} pixels)")
                image.verify()
            # verify() leaves the image unusable, and checks only chunk CRCs (PNG) or nothing
            # (JPEG, WebP): decode once more, fully, so short or broken pixel data is caught.
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                image.load()
    except ImageRejectedError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejectedError("the image has too many pixels") from None
    except UnidentifiedImageError:
        raise ImageRejectedError(f"the {sniffed} data cannot be read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncation and corruption through all of these.
        raise ImageRejectedError(f"the {sniffed} data is corrupt or truncated ({str(exc)[:200]})") from None
    content_type, extension = _FORMATS[fmt]
    return ImageInfo(fmt, content_type, extension, width, height)
