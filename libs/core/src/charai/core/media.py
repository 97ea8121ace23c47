"""The media store (a JetStream object-store bucket) and capability URLs for its objects."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

log = structlog.get_logger("media")

MEDIA_URL_PREFIX = "charai-media:"
CONTENT_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "pcm": "audio/L16;rate=24000;channels=1",
}
_KEY = re.compile(r"task_[0-9a-f]{32}\.(png|jpg|webp|wav|mp3|pcm)")


def media_key(task_id: str, extension: str) -> str:
    """Keys are built by the server from the task id only: no client input reaches a storage path."""
    key = f"{task_id}.{extension}"
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a media key: {key!r}")
    return key


def valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))


def content_type_of(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")


class MediaUnavailableError(Exception):
    """An object's chunks are stored but did not arrive within ``chunk_wait``: try again later."""


class MediaStore:
    """Puts and gets whole objects in the media bucket.

    ``js`` and ``bucket_name`` (the bucket's JetStream context and name) let :meth:`put` write
    an object known to be new in two publishes sent back to back (see there); without them
    every put is nats-py's.
    """

    def __init__(self, bucket: Any, js: Any = None, bucket_name: str = "", chunk_wait: float = 5.0) -> None:
        self._bucket = bucket
        self._js = js
        self._name = bucket_name
        self._chunk_wait = chunk_wait
        self._publisher: Any = None

    async def put(self, key: str, data: bytes, *, new: bool = False) -> None:
        """Stores ``data`` as ``key``, replacing the object of that name.

        ``new``: the caller knows nothing was stored as ``key`` before (a worker's first attempt
        of a task writes the task's key first). nats-py's put first reads the object it replaces
        (to delete that object's chunks afterwards): a JetStream request of its own, a third of
        a put's CPU on each side. A new object is written as nats-py writes it (its chunks on a
        fresh subject, then its meta message, which ``get`` and ``delete`` read) without that
        read and without copying ``data`` into a chunk buffer.
        """
        if not new or self._js is None:
            await self._bucket.put(key, data)
            return
        if self._publisher is None:
            from charai.core.natsconn import AckedPublisher

            self._publisher = AckedPublisher.of(self._js)
        await put_new_object(self._js, self._publisher, self._name, key, data)

    async def get(self, key: str) -> bytes | None:
        """The object's bytes; None when there is none, it was deleted, or its chunks are gone.

        With ``js`` and ``bucket_name``, each chunk is awaited for at most ``chunk_wait``
        seconds, and the chunks' subscription always ends: an object whose chunks were purged
        after its meta message was read (a delete racing a download) or never stored answers
        None; one whose chunks are stored but do not come raises :class:`MediaUnavailableError`.
        nats-py's get (used without them) would wait for those chunks forever, holding its
        subscription, and never answer the download."""
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        if self._js is None:
            try:
                result = await self._bucket.get(key)
            except (NotFoundError, ObjectNotFoundError):
                return None
            if result.info is not None and getattr(result.info, "deleted", False):
                return None
            return bytes(result.data or b"")
        try:
            info = await self._bucket.get_info(key)
        except (NotFoundError, ObjectNotFoundError):
            return None
        if getattr(info, "deleted", False):
            return None
        return await self._read_chunks(key, info)

    async def _read_chunks(self, key: str, info: Any) -> bytes | None:
        import nats.errors
        from nats.js import object_store as obj

        if not info.size:
            return b""
        subject = obj.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=self._name, obj=info.nuid)
        # The stream named: no request to look it up by subject.
        sub = await self._js.subscribe(subject, stream=self._stream(), ordered_consumer=True)
        data = bytearray()
        try:
            while len(data) < info.size:
                data += (await sub.next_msg(timeout=self._chunk_wait)).data
        except nats.errors.TimeoutError:
            if await self._stored(subject):  # there, but slow to come (NATS busy or restarting)
                raise MediaUnavailableError(f"the chunks of {key} did not arrive") from None
            log.warning("media_chunks_missing", key=key, size=info.size, read=len(data))
            return None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        expected = info.digest.split("=", 1)[-1]
        if (
            len(data) != info.size
            or base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode() != expected
        ):
            log.warning("media_digest_mismatch", key=key, size=info.size, read=len(data))
            return None
        return bytes(data)

    def _stream(self) -> str:
        from nats.js import object_store as obj

        return str(obj.OBJ_STREAM_TEMPLATE.format(bucket=self._name))

    async def _stored(self, subject: str) -> int:
        """Messages the bucket's stream holds on ``subject``."""
        info = await self._js.stream_info(self._stream(), subject)
        return int((info.state.subjects or {}).get(subject, 0))

    async def delete(self, key: str) -> None:
        """Removes the object; one already gone is no error (deleting twice is deleting once)."""
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        with contextlib.suppress(NotFoundError, ObjectNotFoundError):
            await self._bucket.delete(key)


@functools.cache
def _nuid() -> Any:
    """One NUID generator for the process (seeding one costs more than the ids it makes)."""
    from nats.nuid import NUID

    return NUID()


#: How long a new object's publishes wait for JetStream's acknowledgements: this much per message
#: (what nats-py's ``publish`` waits for each), for all of them together, so a put of many chunks
#: waits no less than it did one publish at a time.
PUT_ACK_TIMEOUT = 5.0


async def put_new_object(js: Any, publisher: Any, bucket: str, key: str, data: bytes) -> None:
    """Writes object ``key`` of ``bucket`` in the object store's format (nats.js.object_store:
    chunk messages on ``$O.<bucket>.C.<nuid>``, then the object's info as a roll-up on
    ``$O.<bucket>.M.<base64url name>``), for a name with no object yet: nothing is read or
    deleted.

    The chunks and the meta message leave back to back on the one connection (``publisher``, a
    :class:`charai.core.natsconn.AckedPublisher` of the connection ``js`` uses), and then every
    acknowledgement is awaited (``PUT_ACK_TIMEOUT`` per message, for all together): JetStream
    stores one connection's messages to a stream in the order they were sent, so the meta
    message, which makes the object visible, is still stored after every chunk, without a round
    trip to the server between them (one per object of up to 128 KiB; ``bench.media_put``). A chunk
    that fits in one message is published as it is, not copied. If any publish fails or is not
    acknowledged in time, the chunks and the meta message are purged (a refused chunk may be
    followed by a stored one and a stored meta message; when a publish was refused, the purge
    waits for the others' answers first, so it cannot overtake a message still being stored) and
    the error is raised."""
    from nats.js import api
    from nats.js import object_store as obj
    from nats.js.kv import MSG_ROLLUP_SUBJECT

    nuid = _nuid().next().decode()
    chunk_subject = obj.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid)
    meta_subject = obj.OBJ_META_PRE_TEMPLATE.format(
        bucket=bucket, obj=base64.urlsafe_b64encode(key.encode()).decode()
    )
    size = obj.OBJ_DEFAULT_CHUNK_SIZE
    view = memoryview(data)
    pieces = (
        [data] if 0 < len(data) <= size else [bytes(view[i : i + size]) for i in range(0, len(data), size)]
    )
    info = api.ObjectInfo(
        name=key,
        bucket=bucket,
        nuid=nuid,
        size=len(data),
        chunks=len(pieces),
        mtime=datetime.now(UTC).isoformat(),
        digest=obj.OBJ_DIGEST_TEMPLATE.format(
            digest=base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
        ),
        options=api.ObjectMetaOptions(max_chunk_size=size),
    )
    acks: list[asyncio.Future[Any]] = []
    try:
        # Each publish returns once its message is queued on the connection, in this order.
        for piece in pieces:
            acks.append(await publisher.publish(chunk_subject, piece))
        meta = json.dumps(info.as_dict()).encode()
        acks.append(
            await publisher.publish(meta_subject, meta, headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT})
        )
        async with asyncio.timeout(PUT_ACK_TIMEOUT * len(acks)):
            await asyncio.gather(*acks)
    except BaseException as exc:
        pending = [ack for ack in acks if not ack.done()]
        if pending and isinstance(exc, Exception) and not isinstance(exc, TimeoutError):
            # A message was refused while NATS answers: wait until the others are stored or
            # refused too (the meta message after a chunk that did not fit may still be on its
            # way into the stream), or the purge below can overtake one and leave it behind.
            await asyncio.wait(pending, timeout=PUT_ACK_TIMEOUT)
        for ack in acks:
            ack.cancel()  # frees its place among nats-py's pending publishes
            if ack.done() and not ack.cancelled():
                ack.exception()  # retrieved: the error raised is the first one
        stream = obj.OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        for subject in (meta_subject, chunk_subject):
            with contextlib.suppress(Exception):
                await js.purge_stream(stream, subject=subject)
        raise


def media_keys(task: Any) -> list[str]:
    """The media objects a task's result points to (``charai-media:<key>`` references)."""
    refs = []
    if task.HasField("image_result"):
        refs.append(task.image_result.image_url)
    if task.HasField("tts_result"):
        refs.append(task.tts_result.audio_url)
    return [r[len(MEDIA_URL_PREFIX) :] for r in refs if r.startswith(MEDIA_URL_PREFIX)]


class UrlSigner:
    """Signs media URLs: ``/media/{key}?sig=…`` (``&exp=…`` when URLs expire); HMAC-SHA256 over
    key and expiry.

    Several secrets: the first signs, every one verifies, so rotating in a new secret keeps the
    URLs signed with the old ones working for as long as the old secret stays listed (removing a
    secret revokes every URL it signed). ``ttl_seconds`` 0: URLs never expire (apps store them,
    as the seed stores ``result.imageUrl``); they stop working only when the task is deleted
    (404) or their secret is removed.
    """

    def __init__(self, secret: bytes | Sequence[bytes], ttl_seconds: int) -> None:
        keys = [secret] if isinstance(secret, bytes) else list(secret)
        if not keys:
            raise ValueError("media URLs need at least one signing secret")
        self._secrets = keys
        self._ttl = ttl_seconds

    @staticmethod
    def _sig(secret: bytes, key: str, exp: int) -> str:
        mac = hmac.new(secret, f"{key}\n{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:20]).decode().rstrip("=")

    def sign(self, base_url: str, key: str, now: float | None = None) -> str:
        base = f"{base_url.rstrip('/')}/media/{key}"
        if self._ttl <= 0:
            return f"{base}?sig={self._sig(self._secrets[0], key, 0)}"
        exp = int((time.time() if now is None else now) + self._ttl)
        # Round the expiry up to a step so repeated reads of a task give the same URL (browsers
        # cache it): a tenth of the TTL, at most an hour, so a URL outlives its TTL by at most
        # that (a 60 s TTL: 6 s; it was an hour whatever the TTL).
        step = min(3600, max(1, self._ttl // 10))
        exp += step - exp % step
        return f"{base}?exp={exp}&sig={self._sig(self._secrets[0], key, exp)}"

    def verify(self, key: str, exp: str, sig: str, now: float | None = None) -> bool:
        """Whether ``sig`` signs ``key`` until ``exp`` ("" for a URL that never expires)."""
        if exp == "":
            expires = 0
        elif exp.isascii() and exp.isdigit() and len(exp) <= 12 and int(exp) > 0:
            expires = int(exp)
            if expires < (time.time() if now is None else now):
                return False
        else:
            return False
        return any(hmac.compare_digest(self._sig(secret, key, expires), sig) for secret in self._secrets)
