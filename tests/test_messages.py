"""The messages between the processes, their channels, and the
Reporter."""
import os
import pickle
import time

import pytest

import picosnitch

PROC = picosnitch.ProcInfo(7, "/usr/bin/curl", "curl", "curl -s x", 64769, 1234, 1_700_000_000_123, (7, 99), True)


def test_every_message_type_goes_through_a_channel_unchanged():
    conn = picosnitch.Conn(PROC, picosnitch.NO_PROC, PROC, 1000, "tcp", 40000, 443, "10.0.0.2", "10.0.0.1",
                           "example.org", 5, 6)
    messages = [picosnitch.Ready("tracepoint"),
                picosnitch.ExecNotice(7, 64769, 1234, "/usr/bin/curl", 5, [7, 99], 5, True),
                picosnitch.HashRequest(3, [picosnitch.HashItem(7, 64769, 1234, "/usr/bin/curl", 5, (7, 99))]),
                picosnitch.HashAnswer(3, [["ab" * 32, ""]]), picosnitch.Batch(12, 0, True, "2026-11-29 10:00:00", [conn]),
                picosnitch.LiveTick(1_765_000_000.25, [conn], [0], [7]), picosnitch.Listening(2),
                picosnitch.Hello(11), picosnitch.Ack(12), picosnitch.Stop(),
                picosnitch.Report("error", "x", "tb", 1_765_000_000.5, False, True),
                picosnitch.Novelty("domain", "/usr/bin/curl", "curl", "curl reached example.org", 1_765_000_000.5),
                picosnitch.Notice(4, 1_765_000_000.5, "picosnitch", "body"), picosnitch.Delivered(4, ""),
                picosnitch.Failed("already running (pid 7)"),
                picosnitch.Loaded("tracepoint", ["a note"], [[0xffffffff81000000, 6]], ["fib_table_lookup"]),
                picosnitch.Answer({"text": "x", "files": ["snitch.db"]}), picosnitch.Answer(None, "refused")]
    assert set(type(m) for m in messages) == set(picosnitch.MESSAGES.values())
    a, b = picosnitch.Channel.pair()
    for message in messages:
        a.send(message)
        got = b.recv(1)
        assert got == message and type(got) is type(message)
    assert b.recv(0.05) is None


def test_what_is_not_a_message_is_refused():
    for data in [b"not json", b'["NoSuchMessage"]', b'["Ack", 1, 2]', b'{"Ack": 1}',
                 pickle.dumps(picosnitch.Ack(1))]:
        with pytest.raises(ValueError):
            picosnitch.decode_message(data)


def test_a_batch_sends_each_process_and_string_once_and_its_rows_as_numbers():
    parent = picosnitch.ProcInfo(6, "/usr/bin/bash", "bash", "bash", 64769, 99)
    conns = [picosnitch.Conn(PROC, parent, picosnitch.NO_PROC, 1000, "tcp", 40000 + i, 443, "10.0.0.2", "10.0.0.1",
                             "", i, 0) for i in range(100)]
    data = picosnitch.encode_message(picosnitch.Batch(3, 0, True, "2026-11-29 10:00:00", conns))
    text, tail = data.split(b"\0", 1)
    head = picosnitch.json.loads(text)
    procs, texts, n = head[-1]
    assert len(procs) == 3 and texts == ["tcp", "10.0.0.2", "10.0.0.1", ""] and n == 100
    rows = list(picosnitch.CONN_ROW.iter_unpack(tail))
    assert len(tail) == 100 * picosnitch.CONN_ROW.size and rows[0][:3] == (0, 1, 2)
    assert rows[99] == (0, 1, 2, 1000, 0, 40099, 443, 1, 2, 3, 99, 0)
    got = picosnitch.decode_message(data)
    assert got.conns == conns and got.conns[0].proc.exec_id == (7, 99)
    assert got.conns[0].proc is got.conns[99].proc         # (decoded once)
    # numbers the packed rows cannot hold go in the JSON, every row there
    odd = conns[:2] + [picosnitch.dataclasses.replace(conns[2], uid=None, send=1 << 70)]
    data = picosnitch.encode_message(picosnitch.Batch(3, 0, True, "t", odd))
    assert b"\0" not in data and picosnitch.decode_message(data).conns == odd
    json_rows = picosnitch.json.loads(data)[-1][2]
    packed = lambda *row: picosnitch.CONN_ROW.pack(*row)
    for bad, after, why in [
            ([procs, texts, 101], tail, "not 101 rows"),
            ([procs, texts, 100], tail[:-1], "not 100 rows"),
            ([procs, texts, 1], packed(0, 1, 3, *rows[0][3:]), "process or string that was not sent"),
            ([procs, texts, 1], packed(*rows[0][:9], 4, *rows[0][10:]), "process or string that was not sent"),
            ([procs, texts, [[0, 1, -1] + json_rows[0][3:]]], None, "no place"),
            ([procs, texts, [[0, True] + json_rows[0][2:]]], None, "no place"),
            ([procs, texts, [json_rows[0][:10] + [float("nan"), 0]]], None, "not integers"),
            ([procs, texts, [json_rows[0][:3] + ["1000"] + json_rows[0][4:]]], None, "not integers"),
            ([procs, texts, 0], None, "not 0 rows"),
            ([procs, texts, [json_rows[0][:-1]]], None, "lists of 12"),
            ([procs, texts, json_rows], tail, "lists of 12"),
            ([procs, [1], 100], tail, "a string sent is not one"),
            ([[["7"] + procs[0][1:]] + procs[1:], texts, 100], tail, "ProcInfo.pid is not"),
            ([procs, texts], tail, "not a list of processes, strings and rows")]:
        with pytest.raises(ValueError, match=why):
            picosnitch.decode_message(picosnitch.json.dumps(head[:-1] + [bad]).encode() +
                                      (b"" if after is None else b"\0" + after))
    empty = picosnitch.encode_message(picosnitch.Batch(3, 0, True, "t", []))
    assert empty.endswith(b"\0") and picosnitch.decode_message(empty).conns == []
    for after in (tail, b""):
        with pytest.raises(ValueError, match="nothing after"):
            picosnitch.decode_message(picosnitch.encode_message(picosnitch.Ack(1)) + b"\0" + after)


def test_big_messages_arrive_whole_and_descriptors_go_with_them(tmp_path):
    a, b = picosnitch.Channel.pair()
    report = picosnitch.Report("error", "x" * 1_500_000, "", 0.0)
    path = tmp_path / "file"
    path.write_bytes(b"content")
    fd = os.open(path, os.O_RDONLY)
    a.send(report, fds=[fd])
    os.close(fd)
    got, fds = b.recv_with_fds(1)
    assert got == report and len(fds) == 1 and os.read(fds[0], 100) == b"content"
    os.close(fds[0])


def test_the_reporter_never_waits_and_says_what_it_dropped():
    a, b = picosnitch.Channel.pair()
    reporter = picosnitch.Reporter(a)
    began = time.monotonic()
    for i in range(100000):                  # until the channel is full: nobody reads it
        reporter.send(picosnitch.Report("error", f"report {i} " + "x" * 1000, "", 0.0))
        if reporter.dropped >= 10:
            break
    assert time.monotonic() - began < 10 and reporter.dropped == 10
    dropped = reporter.dropped
    while b.recv(0) is not None:
        pass
    reporter.error("after")
    assert b.recv(1).text == f"after ({dropped} earlier reports were dropped)"


def test_a_lasting_failure_is_reported_once_until_it_works_again(capsys):
    a, b = picosnitch.Channel.pair()
    reporter = picosnitch.Reporter(a)
    for _ in range(3):
        reporter.failing("db", "the database cannot be written")
    reporter.working("db", "the database is written again")
    reporter.failing("db", "the database cannot be written")
    texts = []
    while (m := b.recv(0)) is not None:
        texts.append(m.text)
    assert texts == ["the database cannot be written"] * 2
    assert "picosnitch: the database is written again" in capsys.readouterr().out


def test_a_report_carries_the_time_it_happened():
    a, b = picosnitch.Channel.pair()
    reporter = picosnitch.Reporter(a)
    before = time.time()
    reporter.error("now")
    reporter.error("then", when=1_700_000_000.25, notify=False)
    now, then = b.recv(1), b.recv(1)
    assert before <= now.time <= time.time() and now.notify and not now.always
    assert then.time == 1_700_000_000.25 and not then.notify


def test_what_a_hostile_peer_sends_is_refused_without_harm():
    """The desktop process runs as the user: whatever arrives from a process is checked."""
    a, b = picosnitch.Channel.pair()
    with pytest.raises(ValueError):
        a.send(picosnitch.Report("error", "x" * 3_000_000, "", 0.0))          # too big to send
    for raw in [b"", b"[" * 100_000, b'["Ack", "7"]', b'["Hello", true]', b'["HashRequest", 1, 5]',
                b'["Batch", 1, 0, true, "t", [[1, 2]]]', b'["Delivered", 1.5, ""]', b'["Report", "error", "x", "", NaN]',
                b'["Notice", 1, "now", "s", "b"]', b" " * (picosnitch.MESSAGE_MAX + 10)]:
        a.sock.send(raw)
        with pytest.raises(ValueError):
            b.recv(1)
    a.send(picosnitch.Ack(3))
    assert b.recv(1) == picosnitch.Ack(3)        # and the channel still works


def test_a_hash_request_is_checked_item_by_item_when_it_is_decoded():
    good = [7, 64769, 1234, "/usr/bin/curl", 5, [7, 99]]
    decoded = picosnitch.decode_message(picosnitch.json.dumps(["HashRequest", 1, [good]]).encode())
    assert decoded.procs == [picosnitch.HashItem(7, 64769, 1234, "/usr/bin/curl", 5, (7, 99))]
    assert decoded.procs[0].exec_id == (7, 99)
    for bad in (good[:5], good[:5] + [[7]], [0] + good[1:], [7, -1] + good[2:], [7, True] + good[2:],
                good[:3] + [None] + good[4:], "x"):
        with pytest.raises(ValueError):
            picosnitch.decode_message(picosnitch.json.dumps(["HashRequest", 1, [good, bad]]).encode())
