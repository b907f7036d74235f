"""The hub's data structures in process: history bounds, queue policies, resume points."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from app.backends.memory import MemoryBackend
from app.config import SlowClientPolicy
from app.pipeline.hub import MESSAGE_OVERHEAD, History, PredictionHub, SensorFilter, Subscriber
from app.pipeline.wire import BATCH_MAX_ITEMS, Message, client_frames, text_frames


def messages(first: int, count: int, sensors: int = 3) -> list[Message]:
    return [
        Message(s, "prediction", f"s{s % sensors}", s % 10 == 0, f'{{"seq":{s}}}')
        for s in range(first, first + count)
    ]


def test_history_is_bounded_by_count_and_age() -> None:
    """History keeps at most max_frames messages, none older than max_age_s, found by seq."""
    h = History(max_frames=5000, max_age_s=10)
    for t in range(20):
        h.extend(messages(1 + t * 1000, 1000), now=float(t))
    assert len(h) == 5000 and h.oldest_seq == 15_001
    h.trim(now=27.5)
    assert h.oldest_seq == 18_001 and len(h) == 2000
    assert [m.seq for m in h.after(19_995)] == [19_996, 19_997, 19_998, 19_999, 20_000]
    assert h.after(0)[0].seq == 18_001 and h.after(20_000) == []


def test_drop_oldest_keeps_the_newest_and_counts_the_rest() -> None:
    """drop_oldest: the queue keeps the newest max_frames messages; dropped counts the others."""
    sub = Subscriber(SensorFilter(), max_frames=100, policy=SlowClientPolicy.drop_oldest)
    for first in range(1, 1001, 50):
        sub.push_many(messages(first, 50))
    taken = sub.take()
    assert [m.seq for m in taken] == list(range(901, 1001)) and sub.dropped == 900


def test_latest_per_sensor_keeps_one_message_per_sensor_in_seq_order() -> None:
    """latest_per_sensor: after overflow only each sensor's newest message, in seq order."""
    sub = Subscriber(SensorFilter(), max_frames=10, policy=SlowClientPolicy.latest_per_sensor)
    for first in range(1, 301, 7):
        sub.push_many(messages(first, 7, sensors=4))
    taken = sub.take()
    assert [m.seq for m in taken] == [298, 299, 300, 301]
    assert sub.dropped + len(taken) == 301
    sub.push_many(messages(302, 3))
    assert [m.seq for m in sub.take()] == [302, 303, 304]


def test_disconnect_policy_marks_the_subscriber_and_frees_its_queue() -> None:
    """disconnect: overflow marks the subscriber and queues nothing more."""
    sub = Subscriber(SensorFilter(), max_frames=10, policy=SlowClientPolicy.disconnect)
    sub.push_many(messages(1, 8))
    assert not sub.overflowed
    sub.push_many(messages(9, 8))
    sub.push_many(messages(17, 8))
    assert sub.overflowed and sub.queued == 0


def memory_hub(
    history_max_frames: int = 100, policy: SlowClientPolicy = SlowClientPolicy.drop_oldest
) -> PredictionHub:
    """A hub on the memory backend: 60 s of history, queues of 1,000 frames."""
    return PredictionHub(
        MemoryBackend(),
        history_max_frames=history_max_frames,
        history_max_age_s=60,
        subscriber_queue_frames=1000,
        policy=policy,
    )


@pytest.mark.parametrize("since", [0, 50, 99, 100, 150])
async def test_subscribe_resumes_without_duplicates_or_holes(since: int) -> None:
    """Replay plus live stream from any since: exactly the seqs after it, each once."""
    hub = memory_hub()
    async with hub:
        hub.dispatch(messages(1, 150))
        sub = hub.subscribe(SensorFilter(), since=since, epoch=hub.epoch)
        hub.dispatch(messages(151, 20))
        got = [m.seq for m in sub.replay] + [m.seq for m in sub.subscriber.take()]
    first_kept = 51
    if since + 1 < first_kept:
        assert sub.gap is not None and sub.gap["from_seq"] == since + 1
        assert sub.gap["to_seq"] == first_kept - 1
        assert got == list(range(first_kept, 171))
    else:
        assert sub.gap is None and got == list(range(since + 1, 171))


async def test_filters_are_applied_once_per_distinct_filter() -> None:
    """Subscribers with equal filters share one selection; each gets only what it wants."""
    hub = memory_hub(history_max_frames=10)
    async with hub:
        subs = [hub.subscribe(SensorFilter(["s1"])).subscriber for _ in range(3)]
        anomalies = hub.subscribe(SensorFilter([], anomalies_only=True)).subscriber
        hub.dispatch(messages(1, 30))
        await asyncio.sleep(0)
    assert all([m.seq for m in s.take()] == list(range(1, 31, 3)) for s in subs)
    assert [m.seq for m in anomalies.take()] == [10, 20, 30]


@pytest.mark.parametrize("frame_len", [60, 350, 2000])
def test_history_memory_stays_within_history_max_bytes(frame_len: int) -> None:
    """What the history holds, measured by tracemalloc (frames, structs, lists and all),
    stays within ``max_bytes`` (plus a little for the lists' spare room) however many
    messages went through it."""
    max_bytes = 4 * 2**20
    tracemalloc.start()
    try:
        history = History(max_frames=10**9, max_age_s=3600, max_bytes=max_bytes)
        base = tracemalloc.get_traced_memory()[0]
        seq, peak = 0, 0
        for _ in range(max_bytes * 3 // (256 * frame_len)):
            batch = []
            for _ in range(256):
                seq += 1
                batch.append(Message(seq, "prediction", "s", False, f"{seq:08d}".ljust(frame_len)))
            history.extend(batch, now=0.0)
            del batch
            peak = max(peak, tracemalloc.get_traced_memory()[0] - base)
    finally:
        tracemalloc.stop()
    assert len(history) > 0
    assert peak <= max_bytes * 1.25, (
        f"{peak / 2**20:.1f} MiB held for a {max_bytes >> 20} MiB bound"
    )


async def test_idle_subscribers_are_written_directly_and_nothing_overtakes_a_queue() -> None:
    """An idle subscriber gets each batch through its direct writer, encoded once for all
    subscribers of its filter and frame kind; once a write is refused the batch is queued,
    and later batches queue behind it until the relay is idle again."""
    hub = memory_hub()
    writes: dict[str, list[tuple[bytes, int]]] = {"a": [], "b": [], "batch": []}
    room = {"a": True, "b": True, "batch": True}

    def writer(name: str, sub: Subscriber) -> None:
        def direct(data: bytes, last_seq: int) -> bool:
            if room[name]:
                writes[name].append((data, last_seq))
            return room[name]

        sub.direct = direct

    async with hub:
        a = hub.subscribe(SensorFilter()).subscriber
        b = hub.subscribe(SensorFilter()).subscriber
        batch = hub.subscribe(SensorFilter(), batch=True).subscriber
        for name, sub in (("a", a), ("b", b), ("batch", batch)):
            writer(name, sub)
        hub.dispatch(messages(1, 3))
        room["b"] = False
        hub.dispatch(messages(4, 2))
        room["b"] = True
        hub.dispatch(messages(6, 2))  # b has a queue: its direct writer was withdrawn
    assert [seq for _, seq in writes["a"]] == [3, 5, 7] and a.queued == 0
    assert writes["a"][0][0] is writes["b"][0][0]  # encoded once
    assert writes["a"][0][0] == text_frames(m.frame for m in messages(1, 3))
    assert [seq for _, seq in writes["b"]] == [3] and b.direct is None
    assert [m.seq for m in b.take()] == [4, 5, 6, 7]
    assert (
        writes["batch"][0][0].startswith(b"\x81")
        and b'"type":"predictions"' in writes["batch"][0][0]
    )


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(1, 40), max_size=700), max_size=12),
    max_frames=st.integers(0, 1500),
    max_bytes=st.none() | st.integers(0, 20_000),
)
def test_history_keeps_the_newest_messages_within_count_and_size(
    batches: list[list[int]], max_frames: int, max_bytes: int | None
) -> None:
    """Whatever the batches, the history keeps exactly the longest run of newest messages
    within both bounds (through compactions of its lists)."""
    history = History(max_frames=max_frames, max_age_s=3600, max_bytes=max_bytes)
    sent: list[Message] = []
    for lengths in batches:
        batch = [
            Message(len(sent) + i + 1, "prediction", "s", False, "x" * n)
            for i, n in enumerate(lengths)
        ]
        sent += batch
        history.extend(batch, now=0.0)
        kept, size = 0, 0
        for message in reversed(sent):
            size += len(message.frame) + MESSAGE_OVERHEAD
            if kept == max_frames or (max_bytes is not None and size > max_bytes):
                break
            kept += 1
        assert [m.seq for m in history.after(0)] == [m.seq for m in sent[len(sent) - kept :]]
        assert len(history) == kept


@pytest.mark.parametrize("policy", list(SlowClientPolicy))
async def test_a_new_epoch_reaches_every_subscriber_as_a_gap_in_order(
    policy: SlowClientPolicy,
) -> None:
    """renumber: each subscriber, whatever its filter and policy, gets the epoch_changed gap
    after the old epoch's messages and before the new ones; the old history is dropped and a
    resume in the new epoch is served from its numbers."""
    hub = memory_hub(policy=policy)
    async with hub:
        old = hub.epoch
        subs = [hub.subscribe(SensorFilter(f)).subscriber for f in ([], ["s1"], ["nothing"])]
        hub.dispatch(messages(1, 30))
        hub.renumber("new-epoch", 25)
        hub.dispatch(messages(25, 5))
        resumed = hub.subscribe(SensorFilter(), since=26, epoch="new-epoch")
    assert hub.epoch == "new-epoch" and hub.latest_seq == 29
    for sub in subs:
        taken = sub.take()
        kinds = [m.kind for m in taken]
        assert kinds.count("gap") == 1
        at = kinds.index("gap")
        assert all(m.seq <= 30 for m in taken[:at]) and all(m.seq >= 25 for m in taken[at + 1 :])
        gap = json.loads(taken[at].frame)
        assert gap == {
            "type": "gap", "epoch": "new-epoch", "previous_epoch": old,
            "reason": "epoch_changed", "since": 30, "from_seq": 25,
        }  # fmt: skip
    assert resumed.gap is None and [m.seq for m in resumed.replay] == [27, 28, 29]


def test_batch_frames_split_runs_of_predictions_at_other_messages_and_at_the_size_cap() -> None:
    """``batch=true``: predictions go out in ``predictions`` frames of at most
    BATCH_MAX_ITEMS, a run ending at each model or alarm message, which goes out on its own
    in between; each frame names the seq of its last message."""
    cap = BATCH_MAX_ITEMS
    kinds = ["prediction"] * (cap + 3) + ["model", "alarm"] + ["prediction"] * 2 + ["model"]
    ms = [Message(seq, kind, "a", False, f'{{"n":{seq}}}') for seq, kind in enumerate(kinds, 1)]
    out = list(client_frames(ms, batch=True))
    assert [seq for _, seq in out] == [cap, cap + 3, cap + 4, cap + 5, cap + 7, cap + 8]
    first = json.loads(out[0][0])
    assert first["type"] == "predictions" and [x["n"] for x in first["items"]] == list(
        range(1, cap + 1)
    )
    assert [x["n"] for x in json.loads(out[1][0])["items"]] == [cap + 1, cap + 2, cap + 3]
    assert out[2][0] == ms[cap + 3].frame and out[3][0] == ms[cap + 4].frame
    assert [x["n"] for x in json.loads(out[4][0])["items"]] == [cap + 6, cap + 7]
    assert out[5][0] == ms[-1].frame
    assert list(client_frames([], batch=True)) == []
    assert list(client_frames(ms[:2], batch=False)) == [(ms[0].frame, 1), (ms[1].frame, 2)]
