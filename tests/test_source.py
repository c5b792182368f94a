"""Sources never die on a bad message: they count it by reason and go on."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from stream.frame import Frame
from stream.queues import BoundedQueue, Closed, LatestSlot
from stream.source import MemorySource, ZmqSource
from stream.wire import encode
from txmlive.ports import free_tcp_url


def _frame(seq: int, kind: str = "data") -> Frame:
    return Frame(seq=seq, t_ns=seq, kind=kind, image=np.full((4, 5), seq, np.uint16))


def test_memory_source_counts_bad_messages():
    items = [_frame(0), [b"junk"], encode(_frame(1)), [b"\x81\xa1v\x02", b""], _frame(2)]
    src = MemorySource(items, end=False)
    got = [src.recv(0.01) for _ in range(4)]
    assert [f.seq for f in got[:3]] == [0, 1, 2] and got[3] is None
    assert src.counters["received"] == 3
    assert src.counters["rejected"] == {"parts": 1, "version": 1}


@pytest.mark.parametrize("socket_type", ["pull", "sub"])
def test_zmq_source_over_loopback(socket_type):
    url = free_tcp_url()
    ctx = zmq.Context.instance()
    sender = ctx.socket(zmq.PUSH if socket_type == "pull" else zmq.PUB)
    sender.bind(url)
    src = ZmqSource(url, socket_type=socket_type, max_payload_bytes=1000)
    try:
        if socket_type == "sub":  # a SUB misses what was published before it subscribed
            for _ in range(200):
                sender.send_multipart(encode(_frame(99)))
                if src.recv(0.01) is not None:
                    break
            src.counters["received"] = 0
        big = Frame(seq=5, t_ns=0, kind="data", image=np.zeros((40, 40), np.uint16))
        for msg in (encode(_frame(1)), [b"\xc1", b""], encode(big), encode(_frame(2)),
                    [b"only-one-part"]):
            sender.send_multipart(msg)
        sender.send_multipart(encode(_frame(3, "end")))
        seqs = []
        while True:
            frame = src.recv(2.0)
            assert frame is not None, src.counters
            if frame.seq == 99:
                continue
            seqs.append(frame.seq)
            if frame.kind == "end":
                break
        assert seqs == [1, 2, 3]
        assert src.counters["rejected"] == {"msgpack": 1, "payload_size": 1, "parts": 1}
        assert src.counters["received"] == 3
    finally:
        src.close()
        sender.close(linger=0)


def test_bounded_queue_policies():
    q = BoundedQueue(2, "drop-oldest")
    for i in range(5):
        q.put(i)
    assert [q.get(0), q.get(0)] == [3, 4] and q.dropped == 3
    q = BoundedQueue(1, "block")
    q.put(1)
    stop = threading.Event()
    t = threading.Thread(target=q.put, args=(2, stop))
    t.start()
    t.join(0.2)
    assert t.is_alive(), "block policy must wait for room"
    assert q.get(0) == 1
    t.join(2)
    assert q.get(0) == 2 and q.dropped == 0
    q.close()
    with pytest.raises(Closed):
        q.get(0.01)
    with pytest.raises(ValueError, match="policy"):
        BoundedQueue(1, "sometimes")


def test_latest_slot_keeps_newest():
    slot = LatestSlot()
    assert slot.take(0) is None
    for i in range(3):
        slot.put(i)
    assert slot.take(0) == 2 and slot.replaced == 2 and slot.take(0) is None
