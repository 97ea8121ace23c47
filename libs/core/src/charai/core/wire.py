"""Protobuf wire framing of repeated message fields, from elements already serialized.

On the wire a repeated message field is nothing but its elements, each written as (tag, length,
bytes), one after the other. The hot paths that already hold every element encoded (task_store's
event publisher; the gateway's watch streams, whose per-event responses are encoded once and
shared by every stream) build the outer message by concatenation instead of copying each element
into a new message and encoding everything a second time.
"""

from __future__ import annotations

_LEN = 2  # wire type of length-delimited fields (strings, bytes, messages)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def message_field(field_number: int, encoded: bytes) -> bytes:
    """One element of message field ``field_number`` whose serialized form is ``encoded``:
    concatenations of these are the serialized outer message."""
    return _varint(field_number << 3 | _LEN) + _varint(len(encoded)) + encoded


def tag_byte(field_number: int) -> int:
    """The one-byte tag of length-delimited field ``field_number`` (1 to 15)."""
    if not 1 <= field_number <= 15:
        raise ValueError("one-byte tags are for field numbers 1 to 15")
    return field_number << 3 | _LEN


def move_field(encoded: bytes, source: int, target: int) -> bytes:
    """``encoded``, a message whose only content is message field ``source`` (1 to 15), as field
    ``target`` (1 to 15) instead: the same bytes with their first byte, the tag, replaced. The
    length and the element stay as they are, so this is a copy, not a re-encode."""
    if not encoded or encoded[0] != tag_byte(source):
        raise ValueError(f"not a message holding only field {source}")
    return bytes((tag_byte(target),)) + encoded[1:]
