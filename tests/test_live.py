"""The live view's parts, in-process: the reader's extra reading of the
window's counts (section 10), the event stream's readers and lines (section
17), what the viewers keep of it (section 21) and `top` (section 23)."""
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import types

import picosnitch
from conftest import as_user

WINDOW = picosnitch.Window


def key(sk, rport=443, pid=None):
    k = picosnitch.ConnKeyT(sk=sk, exe=77, prot=0, pid=pid or os.getpid(), uid=0, rport=rport, lport=40000 + sk,
                            family=picosnitch.AF_INET)
    k.raddr[:4] = [192, 0, 2, 10]
    k.laddr[:4] = [10, 0, 0, 2]
    return k


def val(send, recv=0):
    return picosnitch.ConnValT(send, recv)


class Capture:
    """The window being filled, as LiveReading reads it."""

    def __init__(self, number, entries):
        self.window = WINDOW(number, entries, [])

    def poll(self, timeout_ms):
        pass

    def peek(self):
        return self.window


def reading():
    ours, theirs = picosnitch.Channel.pair()
    live = picosnitch.LiveReading(ours)
    theirs.send(picosnitch.Listening(1))
    assert live.listen()
    return live, theirs


def ticked(live, theirs, capture, tracker):
    live.tick(capture, tracker)
    return theirs.recv(0.5)


def test_ticks_add_up_to_what_the_window_logs_across_its_close():
    tracker = picosnitch.Tracker(0, lambda notice: None)
    live, theirs = reading()
    capture = Capture(5, [(key(1), val(100))])
    assert ticked(live, theirs, capture, tracker) is None           # the first reading is a baseline
    capture.window = WINDOW(5, [(key(1), val(300, 7)), (key(2), val(50))], [])
    tick = ticked(live, theirs, capture, tracker)
    assert [(c.lport, c.send, c.recv) for c in tick.conns] == [(40002, 50, 0), (40001, 200, 7)]    # (new first)
    assert [tick.conns[i].lport for i in tick.new] == [40002]       # (the other was there before)
    closed = WINDOW(5, [(key(1), val(350, 7)), (key(2), val(80))], [])
    live.closed(closed)                                              # its closing read: 50 and 30 more
    capture.window = WINDOW(6, [(key(1), val(10))], [])
    tick = ticked(live, theirs, capture, tracker)
    assert sorted((c.lport, c.send) for c in tick.conns) == [(40001, 60), (40002, 30)] and tick.new == []
    assert picosnitch.LiveReading.moved(capture.window, live.told, live.known) == []


def test_a_tick_the_stream_cannot_take_is_carried_by_the_next():
    tracker = picosnitch.Tracker(0, lambda notice: None)
    live, theirs = reading()
    capture = Capture(1, [(key(1), val(0))])
    live.tick(capture, tracker)
    channel, live.channel = live.channel, types.SimpleNamespace(send=lambda message, block=True: False)   # (full)
    capture.window = WINDOW(1, [(key(1), val(1000))], [])
    live.tick(capture, tracker)
    live.channel, capture.window = channel, WINDOW(1, [(key(1), val(1500))], [])
    tick = ticked(live, theirs, capture, tracker)
    assert [c.send for c in tick.conns] == [1500]


def test_past_its_limit_a_tick_sums_a_programs_other_connections_in_one_row():
    """(The keys as a window's maps are read: bytes.)"""
    tracker = picosnitch.Tracker(0, lambda notice: None)
    live, theirs = reading()
    capture = Capture(1, [])
    live.tick(capture, tracker)
    live.limit = 2
    capture.window = WINDOW(1, [(bytes(key(i)), val(100 * i)) for i in range(1, 6)], [])
    tick = ticked(live, theirs, capture, tracker)
    rows = [(c.lport, c.raddr, c.send) for c in tick.conns]
    assert rows[:2] == [(40005, "192.0.2.10", 500), (40004, "192.0.2.10", 400)]
    assert rows[2:] == [(picosnitch.MERGED_PORT, picosnitch.merged_text(3), 600)]
    capture.window = WINDOW(1, [(key(i), val(200 * i)) for i in range(1, 6)] + [(key(9), val(1))], [])
    tick = ticked(live, theirs, capture, tracker)           # (a new connection has a row of its own first)
    assert [(c.lport, c.send) for c in tick.conns][:2] == [(40009, 1), (40005, 500)] and tick.new == [0]


def test_a_reader_that_does_not_read_loses_its_own_lines_and_is_told_how_many(monkeypatch):
    monkeypatch.setattr(picosnitch, "STREAM_QUEUE", 1000)
    a, b = socket.socketpair()
    reader = picosnitch.StreamReader(a)
    line = picosnitch.stream_line("tick", 1.0, conns=[], exited=[])
    for _ in range(1000 // len(line) + 5):
        reader.put(line)
    assert len(reader.queue) <= 1000 and reader.lost == 5
    assert reader.flush()
    b.recv(1 << 20)
    reader.put(line)
    lines = [json.loads(x) for x in reader.queue.decode().splitlines()]
    assert [x["type"] for x in lines] == ["lost", "tick"] and lines[0]["lines"] == 5


def stream(directory, uid):
    os.makedirs(os.path.join(directory, picosnitch.PRIVATE_NAME), exist_ok=True)
    ours, theirs = picosnitch.Channel.pair()
    rt = types.SimpleNamespace(user=picosnitch.User("someone", uid, uid, "/"),
                               private=os.path.join(directory, picosnitch.PRIVATE_NAME),
                               config=types.SimpleNamespace(db_write_limit_seconds=10), live_rx=ours,
                               reporter=picosnitch.Reporter(), stopping=lambda: False)
    return picosnitch.Stream(rt, os.path.join(directory, "events.sock")), theirs


def test_only_root_and_the_user_read_the_stream_and_readers_are_counted(throwaway_user, monkeypatch):
    monkeypatch.setattr(picosnitch, "STREAM_READERS", 1)
    directory = tempfile.mkdtemp(prefix="ps-live-")
    os.chmod(directory, 0o755)                  # (the other account may reach the socket)
    server, reader_process = stream(directory, throwaway_user.pw_uid + 1)
    try:
        client = socket.socket(socket.AF_UNIX)
        client.connect(server.path)             # root
        server.accept()
        assert reader_process.recv(1) == picosnitch.Listening(1)
        server.readers[next(iter(server.readers))].flush()
        assert json.loads(client.makefile().readline())["type"] == "hello"
        second = socket.socket(socket.AF_UNIX)
        second.connect(server.path)
        server.accept()
        assert "1 readers already" in json.loads(second.makefile().readline())["reason"]
        other = subprocess.Popen([sys.executable, "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); "
                                  "s.connect(sys.argv[1]); print(s.makefile().readline(), end='')", server.path],
                                 stdout=subprocess.PIPE, text=True, preexec_fn=as_user(throwaway_user))
        select.select([server.listener], [], [], 10)
        server.accept()
        refused = json.loads(other.communicate(timeout=10)[0])
        assert refused["type"] == "refused" and "only root and someone" in refused["reason"]
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


def conn_event(exe="/usr/bin/curl", name="curl", pid=7, send=0, recv=0, raddr="192.0.2.10", rport=443, **more):
    return {"exe": exe, "name": name, "pid": pid, "cmdline": name, "uid": 1000, "parent": {"pid": 1, "exe": "", "name": ""},
            "proto": "tcp", "laddr": "10.0.0.2", "lport": 40000, "raddr": raddr, "rport": rport, "domain": "",
            "send": send, "recv": recv, **more}


def test_a_tick_tells_of_new_connections_and_programs_with_what_the_record_knows(tmp_path):
    os.makedirs(tmp_path / picosnitch.PRIVATE_NAME)
    with open(tmp_path / picosnitch.PRIVATE_NAME / picosnitch.RECORD_NAME, "w") as f:
        json.dump({"Executables": {"/usr/bin/curl": ["curl"]}}, f)     # (known before the stream started)
    server, _ = stream(str(tmp_path), 1000)
    try:
        proc = lambda exe: picosnitch.ProcInfo(7, exe, os.path.basename(exe), "", 1, 2)
        conn = lambda exe: picosnitch.Conn(proc(exe), picosnitch.NO_PROC, picosnitch.NO_PROC, 1000, "tcp", 40000,
                                           443, "10.0.0.2", "192.0.2.10", "", 5, 0)
        tick = picosnitch.LiveTick(2.0, [conn("/usr/bin/curl"), conn("/tmp/x\x1b[2J")], [0, 1], [])
        lines = [json.loads(x) for x in server.tick_lines(tick)]
        assert [(x["type"], x.get("exe"), x.get("new")) for x in lines] == [
            ("tick", None, None), ("connection", "/usr/bin/curl", False), ("executable", "/usr/bin/curl", False),
            ("connection", "/tmp/x\x1b[2J", True), ("executable", "/tmp/x\x1b[2J", True)]
        assert all(b.isascii() and b"\x1b" not in b for b in server.tick_lines(tick))      # (escaped as \\u001b)
        assert "cmdline" not in lines[0]["conns"][0] and "cmdline" in lines[1]      # (a command: once)
        assert [json.loads(x)["type"] for x in server.tick_lines(tick)] == ["tick", "connection", "connection"]
    finally:
        server.close()


def state():
    return picosnitch.LiveState(picosnitch.Labels(None))


def test_rates_are_the_last_ticks_and_totals_everything_since_the_start():
    live = state()
    for t, n in ((1.0, 1000), (2.0, 3000), (3.0, 5000)):
        live.take({"type": "tick", "time": t, "conns": [conn_event(send=n)], "exited": []})
    [entry] = live.sorted_flows("program", 0)
    assert (entry.sent, entry.send_rate) == (9000, (3000 + 5000) / picosnitch.LIVE_RATE_SECONDS)
    assert entry.label == "curl (/usr/bin/curl)" and not entry.new and not entry.gone
    assert [c.label for c in entry.children] == ["192.0.2.10:443 tcp"]
    live.take({"type": "tick", "time": 4.0, "conns": [], "exited": [7]})
    [entry] = live.sorted_flows("program", 0)
    assert entry.gone and entry.send_rate == 5000 / picosnitch.LIVE_RATE_SECONDS
    assert list(live.history)[-2:] == [(3.0, 5000, 0), (4.0, 0, 0)]


def test_groupings_sorting_and_the_filter():
    live = state()
    live.take({"type": "connection", "time": 1.0, "new": True, **conn_event(exe="/opt/new", name="new")})
    live.take({"type": "tick", "time": 1.0, "exited": [], "conns": [
        conn_event(send=100, recv=900), conn_event(exe="/opt/new", name="new", pid=8, send=500, raddr="192.0.2.20"),
        conn_event(send=50, rport=80)]})
    assert [f.label for f in live.sorted_flows("program", 0)] == ["curl (/usr/bin/curl)", "new (/opt/new)"]
    assert [f.label for f in live.sorted_flows("program", 1)] == ["new (/opt/new)", "curl (/usr/bin/curl)"]
    assert [f.new for f in live.sorted_flows("program", 1)] == [True, False]
    assert [f.label for f in live.sorted_flows("host", 0)] == ["192.0.2.10", "192.0.2.20"]
    assert len(live.sorted_flows("connection", 0)) == 3
    assert [f.label for f in live.sorted_flows("program", 0, "NEW")] == ["new (/opt/new)"]
    assert [(f.sent, f.received) for f in live.sorted_flows("uid", 0)] == [(650, 900)]


def test_top_keys_and_screen_at_80_by_24():
    top = picosnitch.Top(picosnitch.Labels(None))
    top.take([{"type": "tick", "time": 1.0, "exited": [], "conns": [
        conn_event(exe="/tmp/evil\x1b[31m", name="evil\u202e", send=2000), conn_event(send=1000)]}])
    screen = [text for text, _ in top.screen(24, 80)]
    assert len(screen) == 24 and all(len(line) == 80 for line in screen)
    assert "by program (1/4)" in screen[0] and "sort: total" in screen[0]
    evil = next(line for line in screen if "evil" in line)
    assert "\\x1b[31m" in evil and "\x1b" not in evil and "\u202e" not in evil
    for keys, seen in ((["KEY_RIGHT"], "by connection"), (["s"], "sort: sent"), (["p"], "PAUSED"), (["u"], " B ·")):
        for k in keys:
            assert top.press(k)
        assert seen in top.screen(24, 80)[0][0]
    frozen = top.screen(24, 80)[1:]
    top.take([{"type": "tick", "time": 2.0, "exited": [], "conns": [conn_event(send=5)]}])
    assert top.live.now == 2.0 and top.screen(24, 80)[1:] == frozen     # paused: taken in, not shown yet
    top.press("p")
    assert top.screen(24, 80)[1:] != frozen
    for k in "/curl":
        top.press(k)
    top.press("\n")
    body = [text for text, _ in top.screen(24, 80)[3:-1] if text.strip()]
    assert body and all("curl" in line for line in body) and "filter: curl" in top.screen(24, 80)[1][0]
    top.press("?")
    assert "keys of picosnitch top" in top.screen(24, 80)[0][0]
    assert top.press("x") and not top.help and not top.press("q")


def test_a_connection_idle_for_long_is_folded_into_its_programs_earlier_ones():
    live = state()
    live.take({"type": "tick", "time": 1.0, "exited": [], "conns": [conn_event(send=300), conn_event(send=5, rport=80)]})
    for t in range(2, 700):
        live.take({"type": "tick", "time": float(t), "exited": [], "conns": [conn_event(send=1, rport=80)]})
    [entry] = live.sorted_flows("program", 0)
    assert entry.sent == 300 + 5 + 698 and len(live.conns) == 2
    assert sorted(c.label for c in entry.children) == ["192.0.2.10:80 tcp", "earlier connections"]


def test_the_notifier_logs_every_report_while_its_stream_readers_take_nothing(tmp_path):
    """The notifier serves the stream in its own loop: readers that never
    read lose their lines, and no report waits for them."""
    from conftest import runtime
    os.chmod(tmp_path, 0o755)
    rt = runtime(picosnitch.Config(desktop_notifications=False), tmp_path)
    loop = picosnitch.NotifierLoop(rt, str(tmp_path / "events.sock"), str(tmp_path / "control.sock"))
    try:
        stuck = []
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(loop.paths["stream"])
            stuck.append(s)
        reading = socket.socket(socket.AF_UNIX)
        reading.connect(loop.paths["stream"])
        while len(loop.stream.readers) < 4:
            loop.stream.step(select.select([loop.stream.listener], [], [], 5)[0], [])
        assert rt.live_tx.recv(1) == picosnitch.Listening(1)        # (told once there is one)
        text = "x" * 2000
        sent = 0
        while sent < 3000:          # (in rounds the channel holds)
            for _ in range(200):
                rt.reporter.exe(f"{sent} {text}")
                sent += 1
            rt.stopping = lambda: True          # (run until every report waiting is taken)
            loop.run()
        log = open(os.path.join(rt.state, "exe.log")).read().splitlines()
        assert len(log) == 3000 and log[-1].endswith(f"2999 {text}")
        assert all(r.lost > 0 for r in loop.stream.readers.values())      # (their 4 MB were full)
        got = reading.recv(1 << 16).decode().splitlines()
        assert json.loads(got[0])["type"] == "hello" and json.loads(got[1])["type"] == "report"
    finally:
        loop.close()


def test_what_is_new_reaches_a_stream_reader_through_the_notifiers_loop(tmp_path):
    """A Novelty goes to exe.log and, as a novelty line, to a reader (its
    own fields, kind among them, beside the line's type)."""
    from conftest import runtime
    os.chmod(tmp_path, 0o755)
    rt = runtime(picosnitch.Config(desktop_notifications=False), tmp_path)
    loop = picosnitch.NotifierLoop(rt, str(tmp_path / "events.sock"), str(tmp_path / "control.sock"))
    try:
        reading = socket.socket(socket.AF_UNIX)
        reading.connect(loop.paths["stream"])
        while not loop.stream.readers:
            loop.stream.step(select.select([loop.stream.listener], [], [], 5)[0], [])
        rt.reporter.novelty("port", "/usr/bin/evil\x1b[2J", "evil", "New destination for evil: remote port 25")
        rt.stopping = lambda: True
        loop.run()
        lines = [json.loads(line) for line in reading.recv(1 << 16).decode().splitlines()]
        assert [(line["type"], line.get("kind"), line.get("exe")) for line in lines] == \
            [("hello", None, None), ("novelty", "port", "/usr/bin/evil\x1b[2J")]
        assert open(os.path.join(rt.state, "exe.log")).read().endswith("New destination for evil: remote port 25\n")
    finally:
        loop.close()
