"""Events in batches, without I/O: the wire framing that builds a bus batch and a packed stream
message from bytes already encoded, the publisher's split at its limits, the packing of a watch
stream's ready events, and the hub reading both forms of bus message.

What is checked: the concatenated bytes are exactly what protobuf decodes as the outer message;
splits keep the order and the limits (a lone oversized element still goes); a client that did not
opt in gets the shared per-event bytes untouched; a batch message reaches the watchers as its
envelopes, in order, each as one shared LiveEvent.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from charai.core import wire
from charai.core.topology import Topology
from charai.gateway.events import EventHub, Watcher
from charai.gateway.follow import MAX_MESSAGE_BYTES, pack
from charai.store.v1 import store_service_pb2 as spb
from charai.task_store.dispatch import event_batches
from charai.tasks.v1 import task_pb2, task_service_pb2


def event(sequence: int, note: str = "") -> task_pb2.TaskEvent:
    task = task_pb2.Task(id=f"task_{sequence:032x}", stage=note, metadata={"characterId": "c"})
    return task_pb2.TaskEvent(sequence=sequence, type=task_pb2.TASK_EVENT_TYPE_PROGRESS, task=task)


def envelope(sequence: int, note: str = "") -> spb.EventEnvelope:
    return spb.EventEnvelope(tenant="t", event=event(sequence, note))


def item(sequence: int, note: str = "") -> tuple[int, bytes]:
    """A stream item as the gateway makes it: a response holding only ``event``."""
    return task_pb2.TASK_EVENT_TYPE_PROGRESS, task_service_pb2.WatchTasksResponse(
        event=event(sequence, note)
    ).SerializeToString()


def test_message_fields_concatenate_into_the_outer_message() -> None:
    envelopes = [envelope(n, "x" * (n * 70)) for n in range(1, 5)]  # lengths over one varint byte
    data = b"".join(wire.message_field(1, e.SerializeToString()) for e in envelopes)
    assert spb.EventBatch.FromString(data) == spb.EventBatch(envelopes=envelopes)


def test_move_field_turns_event_into_events() -> None:
    single = task_service_pb2.WatchTaskResponse(event=event(3)).SerializeToString()
    moved = task_service_pb2.WatchTaskResponse.FromString(wire.move_field(single, 1, 2))
    assert not moved.HasField("event") and list(moved.events) == [event(3)]
    with pytest.raises(ValueError):
        wire.move_field(moved.SerializeToString(), 1, 2)  # not a message holding only field 1


def test_event_batches_split_at_the_count_and_the_size_in_order() -> None:
    envelopes = [envelope(n) for n in range(1, 11)]
    by_count = list(event_batches(envelopes, max_envelopes=4))
    assert [len(chunk) for _, chunk in by_count] == [4, 4, 2]
    decoded = [e for data, _ in by_count for e in spb.EventBatch.FromString(data).envelopes]
    assert decoded == envelopes
    big = [envelope(n, "y" * 1000) for n in range(1, 6)]
    one = len(wire.message_field(1, big[0].SerializeToString()))
    by_size = list(event_batches(big, max_bytes=2 * one))
    assert [len(chunk) for _, chunk in by_size] == [2, 2, 1]
    assert all(len(data) <= 2 * one for data, _ in by_size)
    alone = list(event_batches(big[:2], max_bytes=10))  # each larger than the limit: one per message
    assert [len(chunk) for _, chunk in alone] == [1, 1]


def test_pack_without_opt_in_sends_the_shared_bytes_one_by_one() -> None:
    items = [item(n) for n in range(1, 4)]
    for max_events in (0, 1):
        sent = list(pack(items, max_events))
        assert len(sent) == 3 and all(a is b for a, (_, b) in zip(sent, items, strict=True))


def test_pack_opted_in_groups_up_to_the_limit_and_a_lone_event_keeps_its_form() -> None:
    items = [item(n) for n in range(1, 6)]
    sent = list(pack(items, 2))
    decoded = [task_service_pb2.WatchTasksResponse.FromString(m) for m in sent]
    assert [len(m.events) for m in decoded] == [2, 2, 0]
    assert not decoded[0].HasField("event") and decoded[2].event.sequence == 5
    assert sent[2] is items[4][1]
    flat = [e.sequence for m in decoded for e in (list(m.events) or [m.event])]
    assert flat == [1, 2, 3, 4, 5]


def test_pack_keeps_a_message_under_the_size_limit() -> None:
    note = "z" * (MAX_MESSAGE_BYTES // 3)
    items = [item(n, note) for n in range(1, 6)]
    sent = list(pack(items, 100))
    assert [len(task_service_pb2.WatchTasksResponse.FromString(m).events) for m in sent] == [2, 2, 0]
    assert all(len(m) <= MAX_MESSAGE_BYTES for m in sent)


@dataclass
class FakeMsg:
    data: bytes
    subject: str


async def test_the_hub_routes_a_batch_in_order_and_still_reads_a_single_envelope() -> None:
    topology = Topology()
    hub = EventHub(None, topology)  # type: ignore[arg-type]  # _on_msg is fed directly
    a, b = (
        Watcher(tenant="t", metadata={"characterId": "c"}),
        Watcher(tenant="t", metadata={"characterId": "c"}),
    )
    hub.add(a)
    hub.add(b)
    batch = spb.EventBatch(envelopes=[envelope(n) for n in range(1, 4)])
    await hub._on_msg(FakeMsg(batch.SerializeToString(), topology.events_subject))  # type: ignore[arg-type]
    # A task_store of an earlier release: one envelope on the task's own subject.
    await hub._on_msg(FakeMsg(envelope(4).SerializeToString(), "charai.events.0123abcd.task_x"))  # type: ignore[arg-type]
    got_a, got_b = await a.take(1.0), await b.take(1.0)
    assert [live.env.event.sequence for live in got_a if live] == [1, 2, 3, 4]
    assert all(x is y for x, y in zip(got_a, got_b, strict=True))  # one LiveEvent per envelope, shared
    await hub._on_msg(FakeMsg(b"\xff garbage", topology.events_subject))  # type: ignore[arg-type]
    assert not a.inbox
