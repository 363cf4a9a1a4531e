"""The sans-I/O NBD core: handshakes and transmission between the two sides in memory, whole
and one byte at a time, hostile bytes, and hypothesis properties. No sockets here."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblock.nbd import protocol as P
from vblock.nbd.protocol import (
    CLOSED,
    NEED_DATA,
    ClientConnection,
    Cmd,
    Command,
    Disconnect,
    Export,
    LocalProtocolError,
    Opt,
    ProtocolError,
    Ready,
    Refused,
    RemoteProtocolError,
    Reply,
    ServerConnection,
    State,
)

EXPORT = Export("disk", 1 << 20, description="a test disk")


def pump(src_bytes, dst, bytewise=False):
    """Feed ``src_bytes`` to ``dst`` (all at once or one byte at a time); return the events."""
    events = []
    chunks = [src_bytes[i : i + 1] for i in range(len(src_bytes))] if bytewise else [src_bytes]
    for c in chunks:
        if c:
            dst.receive_data(c)
        while True:
            ev = dst.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                if ev is CLOSED:
                    events.append(ev)
                break
            events.append(ev)
    return events


def handshake(bytewise=False, export="disk", exports=(EXPORT,), structured=True):
    s = ServerConnection(exports)
    c = ClientConnection(export, structured=structured)
    sev, cev = [], []
    for _ in range(10):
        cev += pump(s.data_to_send(), c, bytewise)
        sev += pump(c.data_to_send(), s, bytewise)
        if (
            s.state is not State.OPTIONS
            and c.state is not State.OPTIONS
            and c.state is not State.GREETING
        ):
            break
    return s, c, sev, cev


def flat(bufs):
    return b"".join(bytes(b) for b in bufs)


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_handshake_reaches_transmission_with_base_allocation(bytewise):
    s, c, sev, cev = handshake(bytewise)
    assert [type(e) for e in sev] == [Ready] and [type(e) for e in cev] == [Ready]
    assert s.state is c.state is State.TRANSMISSION
    assert c.structured and s.structured
    assert c.contexts == {1: "base:allocation"} and s.contexts == {1: "base:allocation"}
    ready = cev[0]
    assert (
        ready.export.size == 1 << 20 and ready.flags & P.TF_SEND_DF and ready.flags & P.TF_SEND_TRIM
    )
    assert not ready.flags & P.TF_READ_ONLY


def test_handshake_without_structured_replies_uses_simple_ones():
    s, c, _, cev = handshake(structured=False)
    assert not c.structured and not s.structured and c.contexts == {}
    assert not cev[0].flags & P.TF_SEND_DF


def test_unknown_export_is_refused_with_err_unknown():
    s, c, sev, cev = handshake(export="nope")
    assert sev == [CLOSED]  # the client ABORTs after the refusal
    (ref,) = [e for e in cev if e is not CLOSED]
    assert isinstance(ref, Refused) and ref.reply_type == P.ERR_UNKNOWN and "nope" in ref.message
    assert c.state is State.CLOSED


def test_default_export_name_reaches_the_only_export():
    _, c, _, cev = handshake(export="")
    assert isinstance(cev[0], Ready) and cev[0].export.size == EXPORT.size


def server_in_options():
    s = ServerConnection([EXPORT])
    s.data_to_send()
    s.receive_data(struct.pack(">I", 3))
    assert s.next_event() is NEED_DATA
    return s


def option_replies(s, option, data=b""):
    s.receive_data(P.encode_option(option, data))
    ev = s.next_event()
    out = s.data_to_send()
    replies = []
    pos = 0
    while pos < len(out):
        magic, opt, rtype, n = struct.unpack_from(">QIII", out, pos)
        assert magic == P.OPT_REPLY_MAGIC and opt == option
        replies.append((rtype, out[pos + 20 : pos + 20 + n]))
        pos += 20 + n
    return ev, replies


def test_unknown_option_is_err_unsup_and_its_data_skipped():
    s = server_in_options()
    ev, replies = option_replies(s, 99, b"abc")
    assert ev is NEED_DATA and replies[0][0] == P.ERR_UNSUP
    ev, replies = option_replies(s, Opt.LIST)
    assert [r[0] for r in replies] == [P.REP_SERVER, P.REP_ACK]
    assert replies[0][1] == struct.pack(">I", 4) + b"disk" + b"a test disk"


def test_starttls_is_refused_by_policy():
    _, replies = option_replies(server_in_options(), Opt.STARTTLS)
    assert replies == [(P.ERR_POLICY, b"TLS is not supported by this server")]


def test_set_meta_context_before_structured_replies_is_invalid():
    _, replies = option_replies(
        server_in_options(),
        Opt.SET_META_CONTEXT,
        P.encode_meta_request("disk", ["base:allocation"]),
    )
    assert replies[0][0] == P.ERR_INVALID


def test_structured_reply_twice_is_invalid():
    s = server_in_options()
    assert option_replies(s, Opt.STRUCTURED_REPLY)[1] == [(P.REP_ACK, b"")]
    assert option_replies(s, Opt.STRUCTURED_REPLY)[1][0][0] == P.ERR_INVALID


def test_go_with_inconsistent_lengths_is_invalid():
    _, replies = option_replies(server_in_options(), Opt.GO, struct.pack(">I", 50) + b"disk")
    assert replies[0][0] == P.ERR_INVALID and b"inconsistent lengths" in replies[0][1]


def test_abort_is_acknowledged_then_closed():
    s = server_in_options()
    ev, replies = option_replies(s, Opt.ABORT)
    assert ev is CLOSED and replies == [(P.REP_ACK, b"")] and s.state is State.CLOSED


def test_export_name_sends_size_flags_and_zero_padding():
    s = ServerConnection([EXPORT])
    s.data_to_send()
    s.receive_data(struct.pack(">I", 1) + P.encode_option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(s.next_event(), Ready)
    out = s.data_to_send()
    assert len(out) == 10 + 124 and struct.unpack_from(">Q", out)[0] == EXPORT.size


def test_unknown_client_flags_and_bad_option_magic_drop_the_connection():
    s = ServerConnection([EXPORT])
    s.receive_data(struct.pack(">I", 7))
    with pytest.raises(RemoteProtocolError, match="unknown client flags"):
        s.next_event()
    assert s.state is State.ERROR
    s = server_in_options()
    s.receive_data(b"X" * 16)
    with pytest.raises(RemoteProtocolError, match="bad option magic"):
        s.next_event()


def test_oversized_option_drops_the_connection():
    s = server_in_options()
    s.receive_data(struct.pack(">QII", P.IHAVEOPT, Opt.GO, 64 << 20))
    with pytest.raises(RemoteProtocolError, match="limit"):
        s.next_event()


# -- transmission ----------------------------------------------------------------------------------
def transmitting(structured=True, export=EXPORT):
    s, c, _, cev = handshake(exports=(export,), export=export.name, structured=structured)
    assert isinstance(cev[0], Ready)
    return s, c


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_read_write_round_trip_out_of_order(structured, bytewise):
    s, c = transmitting(structured)
    buf1, buf2 = bytearray(5), bytearray(3)
    wire = flat(
        c.request(Cmd.READ, 1, 100, 5, buffer=buf1)
        + c.request(Cmd.READ, 2, 7, 3, buffer=buf2)
        + c.request(Cmd.WRITE, 3, 9, 4, data=b"wxyz")
        + c.request(Cmd.FLUSH, 4)
    )
    cmds = pump(wire, s, bytewise)
    assert [(e.kind, e.cookie, e.offset, e.length, e.error) for e in cmds] == [
        (Cmd.READ, 1, 100, 5, 0),
        (Cmd.READ, 2, 7, 3, 0),
        (Cmd.WRITE, 3, 9, 4, 0),
        (Cmd.FLUSH, 4, 0, 0, 0),
    ]
    assert bytes(cmds[2].data) == b"wxyz"
    replies = flat(
        s.reply(cmds[3])
        + s.reply(cmds[2])
        + s.reply_read(cmds[1], b"abc")
        + s.reply_read(cmds[0], memoryview(b"hello"))
    )
    evs = pump(replies, c, bytewise)
    assert [(e.cookie, e.error) for e in evs] == [(4, 0), (3, 0), (2, 0), (1, 0)]
    assert bytes(buf1) == b"hello" and bytes(buf2) == b"abc" and c.in_flight == 0


def test_read_chunks_in_any_order_with_a_hole():
    s, c = transmitting()
    buf = bytearray(b"\xff" * 10)
    c.request(Cmd.READ, 7, 100, 10, buffer=buf)
    wire = (
        P.encode_chunk(7, P.CHUNK_OFFSET_DATA, struct.pack(">Q", 106) + b"4567", done=False)
        + P.encode_chunk(7, P.CHUNK_OFFSET_HOLE, struct.pack(">QI", 102, 4), done=False)
        + P.encode_chunk(7, P.CHUNK_OFFSET_DATA, struct.pack(">Q", 100) + b"01", done=True)
    )
    (ev,) = pump(wire, c, bytewise=True)
    assert ev == Reply(7, Cmd.READ) and bytes(buf) == b"01\0\0\0\0" + b"4567"


def test_read_chunk_outside_the_request_is_a_protocol_error():
    _, c = transmitting()
    c.request(Cmd.READ, 7, 100, 10, buffer=bytearray(10))
    with pytest.raises(RemoteProtocolError, match="outside the request"):
        pump(P.encode_chunk(7, P.CHUNK_OFFSET_DATA, struct.pack(">Q", 105) + b"x" * 6), c)
    assert c.state is State.ERROR


def test_error_chunk_reaches_the_request_with_its_message():
    s, c = transmitting()
    c.request(Cmd.READ, 9, 0, 4, buffer=bytearray(4))
    cmd = pump(flat(c.request(Cmd.WRITE, 10, 0, 1, data=b"x")), s)[0]
    (ev,) = pump(P.encode_error_chunk(9, P.NBD_EIO, "disk on fire"), c)
    assert (ev.cookie, ev.error, ev.message) == (9, P.NBD_EIO, "disk on fire")
    (ev,) = pump(flat(s.reply(cmd, P.NBD_ENOSPC, "full")), c)
    assert (ev.cookie, ev.error, ev.message) == (10, P.NBD_ENOSPC, "full")


def test_simple_reply_error_to_a_read_carries_no_data():
    s, c = transmitting(structured=False)
    buf = bytearray(b"keep")
    cmd = pump(flat(c.request(Cmd.READ, 1, 0, 4, buffer=buf)), s)[0]
    wire = flat(s.reply(cmd, P.NBD_EIO)) + P.encode_simple_reply(2)[:3]
    (ev,) = pump(wire, c)
    assert ev.error == P.NBD_EIO and bytes(buf) == b"keep"


def test_block_status_merges_neighbours_and_honours_req_one():
    s, c = transmitting()
    cmd = pump(flat(c.request(Cmd.BLOCK_STATUS, 5, 0, 8192)), s)[0]
    assert cmd.error == 0
    (ev,) = pump(flat(s.reply_block_status(cmd, [(4096, 0), (2048, 3), (2048, 3), (512, 0)])), c)
    assert ev.extents == {1: ((4096, 0), (4096, 3))}
    cmd = pump(flat(c.request(Cmd.BLOCK_STATUS, 6, 0, 1024, flags=P.CMD_FLAG_REQ_ONE)), s)[0]
    (ev,) = pump(flat(s.reply_block_status(cmd, [(4096, 0), (2048, 3)])), c)
    assert ev.extents == {1: ((1024, 0),)}


@pytest.mark.parametrize(
    "kind,flags,offset,length,error,text",
    [
        (99, 0, 0, 0, P.NBD_EINVAL, "invalid request type"),
        (Cmd.READ, P.CMD_FLAG_FAST_ZERO, 0, 1, P.NBD_EINVAL, "unsupported flags"),
        (Cmd.READ, 0, (1 << 20) - 512, 1024, P.NBD_EINVAL, "past the end"),
        (Cmd.READ, 0, (1 << 64) - 1, 2, P.NBD_EINVAL, "past the end"),
        (Cmd.TRIM, 0, 1 << 20, 1, P.NBD_ENOSPC, "past the end"),
        (Cmd.READ, 0, 0, (32 << 20) + 1, P.NBD_EINVAL, "over the maximum"),
    ],
    ids=["unknown", "flags", "past-end", "u64-overflow", "trim-past-end", "too-long"],
)
def test_requests_that_cannot_be_served_carry_their_error(kind, flags, offset, length, error, text):
    s, _ = transmitting(export=Export("disk", 1 << 20, max_payload=32 << 20))
    s.receive_data(P.encode_request(kind, 42, offset, length, flags))
    ev = s.next_event()
    assert (ev.cookie, ev.error) == (42, error) and text in ev.message and not ev.fatal
    assert s.next_event() is NEED_DATA and s.state is State.TRANSMISSION


def test_oversize_write_is_answered_then_fatal():
    s, _ = transmitting()
    s.receive_data(P.encode_request(Cmd.WRITE, 1, 0, (32 << 20) + 1))
    ev = s.next_event()
    assert ev.error == P.NBD_EINVAL and ev.fatal and s.state is State.ERROR


def test_writes_on_a_read_only_export_are_eperm():
    s, _ = transmitting(export=Export("disk", 4096, read_only=True))
    s.receive_data(P.encode_request(Cmd.WRITE, 1, 0, 2) + b"xy")
    assert s.next_event().error == P.NBD_EPERM


def test_bad_request_magic_drops_the_connection():
    s, _ = transmitting()
    s.receive_data(b"\0" * 28)
    with pytest.raises(RemoteProtocolError, match="bad request magic"):
        s.next_event()


def test_disc_then_eof_closes():
    s, c = transmitting()
    evs = pump(flat(c.request(Cmd.DISC, 0)), s)
    assert evs == [Disconnect()] and s.state is State.DISCONNECTING
    s.receive_data(b"")
    assert s.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.READ, 1, 0, 1, buffer=bytearray(1))


def test_eof_mid_write_payload_closes_without_a_command():
    s, _ = transmitting()
    s.receive_data(P.encode_request(Cmd.WRITE, 1, 0, 100) + b"x" * 50)
    assert s.next_event() is NEED_DATA
    s.receive_data(b"")
    assert s.next_event() is CLOSED


def test_protocol_error_is_not_raised_directly():
    with pytest.raises(TypeError):
        raise ProtocolError("x")


# -- properties ------------------------------------------------------------------------------------
@given(
    kind=st.sampled_from(
        [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS]
    ),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0xFFFF),
)
def test_request_header_round_trips(kind, cookie, offset, length, flags):
    s, _ = transmitting()
    s.receive_data(P.encode_request(kind, cookie, offset, length, flags))
    if kind == Cmd.WRITE and length and length <= EXPORT.max_payload:
        s.receive_data(bytes(length))
    ev = s.next_event()
    assert isinstance(ev, Command)
    assert (ev.kind, ev.cookie, ev.offset, ev.length, ev.flags) == (
        kind,
        cookie,
        offset,
        length,
        flags,
    )
    fits = offset + length <= EXPORT.size and not flags & ~P._VALID_FLAGS[kind]
    if kind == Cmd.FLUSH:
        fits = not flags & ~P._VALID_FLAGS[kind]
    if ev.error == 0:
        assert fits


@given(
    cookie=st.integers(0, 2**64 - 1),
    error=st.sampled_from([1, 5, 12, 22, 28, 75, 95, 108]),
    message=st.text(max_size=40),
)
def test_error_chunk_round_trips(cookie, error, message):
    _, c = transmitting()
    c.request(Cmd.FLUSH, cookie)
    (ev,) = pump(P.encode_error_chunk(cookie, error, message), c)
    assert (ev.cookie, ev.error, ev.message) == (cookie, error, message)


@given(
    extents=st.lists(
        st.tuples(st.integers(1, 2**32 - 1), st.sampled_from([0, 1, 2, 3])), min_size=1, max_size=20
    )
)
def test_block_status_round_trips_after_merging(extents):
    s, c = transmitting()
    cmd = pump(flat(c.request(Cmd.BLOCK_STATUS, 1, 0, 4096)), s)[0]
    (ev,) = pump(flat(s.reply_block_status(cmd, extents)), c)
    got = ev.extents[1]
    assert all(a[1] != b[1] for a, b in zip(got, got[1:]))
    assert sum(n for n, _ in got) == min(4096, sum(n for n, _ in extents))


@settings(max_examples=300)
@given(data=st.binary(max_size=200), split=st.integers(0, 200))
def test_server_handshake_takes_any_bytes_to_a_legal_state(data, split):
    """Whatever the client sends, the server either moves along its table or refuses with
    RemoteProtocolError (then ERROR); nothing else escapes."""
    s = ServerConnection([EXPORT])
    s.data_to_send()
    for part in (data[:split], data[split:], b""):
        s.receive_data(part)
        try:
            while True:
                before = s.state
                ev = s.next_event()
                assert s.state in P.SERVER_TRANSITIONS
                assert s.state is before or s.state in P.SERVER_TRANSITIONS[before].values()
                if ev is NEED_DATA or ev is CLOSED:
                    break
        except RemoteProtocolError:
            assert s.state is State.ERROR
            return


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_server_transmission_takes_any_bytes_to_a_legal_state(data):
    s, _ = transmitting()
    s.receive_data(data)
    try:
        while True:
            ev = s.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                break
            assert isinstance(ev, (Command, Disconnect))
            if isinstance(ev, Command) and ev.fatal:
                assert s.state is State.ERROR
                break
    except RemoteProtocolError:
        assert s.state is State.ERROR


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_client_transmission_takes_any_bytes_to_a_legal_state(data):
    _, c = transmitting()
    c.request(Cmd.READ, 1, 0, 16, buffer=bytearray(16))
    c.request(Cmd.BLOCK_STATUS, 2, 0, 16)
    c.receive_data(data)
    try:
        while c.next_event() not in (NEED_DATA, CLOSED):
            pass
    except RemoteProtocolError:
        assert c.state is State.ERROR


@pytest.mark.parametrize(
    "table", [P.SERVER_TRANSITIONS, P.CLIENT_TRANSITIONS], ids=["server", "client"]
)
def test_every_state_has_a_row_and_every_target_is_a_state(table):
    assert set(table) == set(State)
    for row in table.values():
        assert set(row.values()) <= set(State)


def test_illegal_transition_names_role_state_and_event():
    with pytest.raises(LocalProtocolError, match="server: 'go' is illegal in state TRANSMISSION"):
        P._move("server", P.SERVER_TRANSITIONS, State.TRANSMISSION, "go")


@given(err=st.integers(0, 200))
def test_errno_mapping_round_trips_for_protocol_values(err):
    if err in P._TO_HOST:
        assert P.nbd_errno(P.host_errno(err)) == err
    else:
        assert P.host_errno(err) == 22
