"""The sans-I/O core: codec (whole, byte by byte, with trailing bytes), fd attachment, errors and
the ring state table. No sockets here."""

from __future__ import annotations

import os

import pytest

from vblock.vhost_user import protocol as P
from vblock.vhost_user.protocol import (
    CLOSED,
    NEED_DATA,
    ConfigSpace,
    Connection,
    LocalProtocolError,
    MemRegion,
    ProtocolError,
    RemoteProtocolError,
    Req,
    RingState,
    VringAddr,
)

DEV_FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | 0x46
PF = (1 << P.PROTOCOL_F_MQ) | (1 << P.PROTOCOL_F_REPLY_ACK) | (1 << P.PROTOCOL_F_CONFIG)

# (request, value that encodes it, value the decoder returns)
CASES = [
    (Req.GET_FEATURES, None, None),
    (Req.SET_FEATURES, (1 << 32) | (1 << 30), (1 << 32) | (1 << 30)),
    (Req.SET_OWNER, None, None),
    (Req.SET_PROTOCOL_FEATURES, PF, PF),
    (Req.SET_VRING_NUM, (1, 128), (1, 128)),
    (Req.SET_VRING_BASE, (0, 7), (0, 7)),
    (
        Req.SET_VRING_ADDR,
        VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0),
        VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0),
    ),
    (Req.SET_VRING_ENABLE, (0, 1), (0, 1)),
    (Req.GET_CONFIG, ConfigSpace(0, 4, 0, b"\1\2\3\4"), ConfigSpace(0, 4, 0, b"\1\2\3\4")),
    (Req.SET_MEM_TABLE, (), ()),
]


def conn(num_queues=2):
    return Connection(num_queues, DEV_FEATURES, PF)


def msg(code, value=None, flags=P.VERSION):
    payload = P.encode_value(code, value) if value is not None else b""
    return P.encode(code, payload, flags)


@pytest.mark.parametrize("code,value,expect", CASES, ids=[c[0].name for c in CASES])
def test_decode_whole_bytewise_and_with_trailing(code, value, expect):
    data = msg(code, value)
    # whole
    c = conn()
    c.receive_data(data)
    ev = c.next_event()
    assert (ev.code, ev.value) == (code, expect)
    assert c.next_event() is NEED_DATA
    # one byte at a time: NEED_DATA until the last byte
    c = conn()
    for b in data[:-1]:
        c.receive_data(bytes([b]))
        assert c.next_event() is NEED_DATA
    c.receive_data(data[-1:])
    assert c.next_event().value == expect
    # with the start of the next message behind it
    c = conn()
    c.receive_data(data + msg(Req.GET_FEATURES)[:5])
    assert c.next_event().value == expect
    assert c.next_event() is NEED_DATA


def test_closed_after_whole_messages_and_error_inside_one():
    c = conn()
    c.receive_data(msg(Req.GET_FEATURES))
    c.receive_data(b"")
    assert c.next_event().code == Req.GET_FEATURES
    assert c.next_event() is CLOSED
    c = conn()
    c.receive_data(msg(Req.SET_FEATURES, 1 << 32)[:15])
    c.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed inside the payload"):
        c.next_event()


def test_fds_belong_to_the_message_they_came_with_even_when_glued():
    r, w = os.pipe()
    c = conn()
    # GET_FEATURES (no fds) glued in front of SET_VRING_CALL (one fd): one recvmsg, one fd
    c.receive_data(msg(Req.GET_FEATURES) + msg(Req.SET_VRING_CALL, 0), [r])
    assert c.next_event().fds == ()
    ev = c.next_event()
    assert ev.code == Req.SET_VRING_CALL and ev.fds == (r,)
    os.close(r)
    os.close(w)


def test_fds_on_a_request_that_takes_none_are_closed_and_stripped():
    r, w = os.pipe()
    c = conn()
    c.receive_data(msg(Req.GET_FEATURES), [os.dup(w), os.dup(w)])  # the connection owns these
    ev = c.next_event()
    assert ev.code == Req.GET_FEATURES and ev.fds == ()
    os.close(w)  # the connection closed both copies it was given: only ours was left
    assert os.read(r, 1) == b""
    os.close(r)


def test_partial_says_whether_a_message_is_half_received():
    c = conn()
    assert not c.partial
    data = msg(Req.GET_FEATURES) + msg(Req.SET_FEATURES, 1 << 32)
    c.receive_data(data[: len(data) - 3])
    assert c.next_event().code == Req.GET_FEATURES
    assert c.next_event() is NEED_DATA and c.partial and c.position == P.HEADER.size
    c.receive_data(data[len(data) - 3 :])
    assert c.next_event().code == Req.SET_FEATURES and not c.partial


def test_fds_with_a_message_split_over_reads():
    r, w = os.pipe()
    c = conn()
    data = msg(Req.SET_VRING_KICK, 1)
    c.receive_data(data[:4], [r])
    assert c.next_event() is NEED_DATA
    c.receive_data(data[4:])
    ev = c.next_event()
    assert ev.fds == (r,) and c.session.rings[1].state is RingState.STARTED
    os.close(r)
    os.close(w)


@pytest.mark.parametrize(
    "data,match",
    [
        (P.HEADER.pack(Req.GET_FEATURES, 0x2, 0), "version"),
        (P.HEADER.pack(Req.GET_FEATURES, P.VERSION | P.FLAG_REPLY, 0), "reply"),
        (P.HEADER.pack(Req.SET_FEATURES, P.VERSION, 5000), "payload of 5000"),
        (P.encode(Req.SET_FEATURES, b"\0" * 4), "expected 8"),
        (P.encode(Req.SET_VRING_NUM, P.vring_state.pack(2, 8)), "ring 2 out of"),
        (P.encode(Req.SET_VRING_NUM, P.vring_state.pack(0, 100)), "not a power of 2"),
        (P.encode(Req.SET_VRING_ENABLE, P.vring_state.pack(0, 2)), "not 0 or 1"),
        (P.encode(Req.SET_FEATURES, P.u64.pack(1 << 40)), "never offered"),
        (P.encode(Req.SET_PROTOCOL_FEATURES, P.u64.pack(1 << 12)), "never offered"),
        (P.encode(Req.SET_VRING_CALL, P.u64.pack(0)), "expected 1 fd"),
        (P.encode(Req.SET_VRING_CALL, P.u64.pack(0x200)), "reserved bits"),
        (P.encode(Req.SET_MEM_TABLE, P.mem_table_head.pack(9, 0)), "at most 8"),
        (P.encode(Req.SET_MEM_TABLE, P.mem_table_head.pack(1, 0)), "need 40 bytes"),
        (P.encode(Req.GET_CONFIG, P.config_head.pack(0, 300, 0)), "does not fit"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_remote_errors_name_the_request_and_end_the_connection(data, match):
    c = conn()
    c.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        c.next_event()
    with pytest.raises(LocalProtocolError):
        c.next_event()


def test_protocol_error_base_is_never_raised_itself():
    with pytest.raises(TypeError):
        ProtocolError("x")


def test_mem_table_fd_count_must_match_and_fds_are_closed_on_error():
    r, w = os.pipe()
    c = conn()
    region = MemRegion(0, 1 << 20, 0x7000_0000_0000, 0)
    c.receive_data(msg(Req.SET_MEM_TABLE, (region, region)), [r])
    with pytest.raises(RemoteProtocolError, match="2 regions but 1 fds"):
        c.next_event()
    with pytest.raises(OSError):
        os.fstat(r)  # closed by the connection
    os.close(w)


def test_unknown_requests_are_events_and_refused_as_the_protocol_says():
    c = conn()
    c.receive_data(P.encode(99, b"abc") + P.encode(99, b"", P.VERSION | P.FLAG_NEED_REPLY))
    ev = c.next_event()
    assert ev.known is False and ev.value == b"abc"
    assert c.refuse(ev) == b""  # no ack asked for: say nothing
    ev2 = c.next_event()
    assert c.refuse(ev2) == b""  # REPLY_ACK not negotiated yet: still nothing
    c.receive_data(
        msg(Req.SET_PROTOCOL_FEATURES, PF) + P.encode(99, b"", P.VERSION | P.FLAG_NEED_REPLY)
    )
    c.next_event()
    ev3 = c.next_event()
    assert c.refuse(ev3) == P.encode(99, P.u64.pack(1), P.VERSION | P.FLAG_REPLY)


def test_replies_and_acks():
    c = conn()
    c.receive_data(
        msg(Req.GET_FEATURES)
        + msg(Req.SET_PROTOCOL_FEATURES, PF)
        + msg(Req.SET_OWNER, None, P.VERSION | P.FLAG_NEED_REPLY)
        + msg(Req.GET_VRING_BASE, (1, 0))
    )
    ev = c.next_event()
    assert c.respond(ev, 0x1234) == P.encode(
        Req.GET_FEATURES, P.u64.pack(0x1234), P.VERSION | P.FLAG_REPLY
    )
    assert c.respond(c.next_event()) == b""  # SET_PROTOCOL_FEATURES: no reply
    assert c.respond(c.next_event()) == P.encode(
        Req.SET_OWNER, P.u64.pack(0), P.VERSION | P.FLAG_REPLY
    )
    ev = c.next_event()
    assert c.respond(ev, (1, 42)) == P.encode(
        Req.GET_VRING_BASE, P.vring_state.pack(1, 42), P.VERSION | P.FLAG_REPLY
    )
    assert c.session.rings[1].base == 42
    with pytest.raises(LocalProtocolError):
        c.respond(ev)  # a GET without a value


def _feed(c, data, fds=()):
    c.receive_data(data, list(fds))
    return c.next_event()


def test_ring_state_table_start_stop_and_illegal_moves():
    c = conn()
    _feed(c, msg(Req.SET_FEATURES, (1 << 32) | (1 << 30)))
    ring = c.session.rings[0]
    assert ring.state is RingState.STOPPED and not ring.runnable
    _feed(c, msg(Req.SET_VRING_NUM, (0, 64)))
    _feed(c, msg(Req.SET_VRING_BASE, (0, 3)))
    r, w = os.pipe()
    _feed(c, msg(Req.SET_VRING_KICK, 0), [r])
    assert ring.state is RingState.STARTED
    assert not ring.runnable  # F_PROTOCOL_FEATURES: wait for SET_VRING_ENABLE 1
    _feed(c, msg(Req.SET_VRING_ENABLE, (0, 1)))
    assert ring.runnable
    with pytest.raises(RemoteProtocolError, match="SET_VRING_BASE on ring 0 while started"):
        _feed(c, msg(Req.SET_VRING_BASE, (0, 0)))
    c = conn()
    _feed(c, msg(Req.SET_FEATURES, 1 << 32))
    _feed(c, msg(Req.SET_VRING_KICK, 0), [w])
    assert c.session.rings[0].runnable  # no F_PROTOCOL_FEATURES: running once started
    _feed(c, msg(Req.GET_VRING_BASE, (0, 0)))
    assert c.session.rings[0].state is RingState.STOPPED
    _feed(c, msg(Req.SET_VRING_BASE, (0, 9)))  # legal again once stopped
    assert c.session.rings[0].base == 9
    os.close(r)
    os.close(w)


def test_every_ring_transition_in_the_table_is_reachable_and_others_refused():
    for state in RingState:
        for code in (
            Req.SET_VRING_NUM,
            Req.SET_VRING_BASE,
            Req.SET_VRING_ADDR,
            Req.SET_VRING_KICK,
            Req.GET_VRING_BASE,
            Req.SET_VRING_CALL,
            Req.SET_VRING_ERR,
            Req.SET_VRING_ENABLE,
        ):
            ring = P.Ring(0, state=state)
            if (state, code) in P._RING_TRANSITIONS:
                assert P.Session._step(ring, code) is P._RING_TRANSITIONS[(state, code)]
            else:
                with pytest.raises(
                    RemoteProtocolError, match=f"{code.name} on ring 0 while {state.value}"
                ):
                    P.Session._step(ring, code)


def test_uva_translation_through_a_region():
    r = MemRegion(gpa=0xC0000, size=0x1000, uva=0x7F00_0000_0000, mmap_offset=0xC0000)
    assert r.uva_to_gpa(0x7F00_0000_0010, 16) == 0xC0010
    assert r.uva_to_gpa(0x7F00_0000_0FF8, 16) is None  # runs past the end
    assert r.uva_to_gpa(0x7EFF_FFFF_FFFF) is None
