"""The notifier's novelty events, in-process (sections 13, 17 and 21): each
is logged, and shown grouped (one notice for a burst) unless muted; the
mutes, their files, and the control socket that changes them, with its
refusals and its answers to bad requests."""
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import picosnitch
from conftest import as_user, runtime


class Clock:
    """time.monotonic, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(picosnitch.time, "monotonic", c)
    return c


def notifier(tmp_path, **settings):
    rt = runtime(picosnitch.Config(**settings), tmp_path)
    return picosnitch.Notifier(rt)


def novelty(kind="program", i=0, when=None):
    exe = f"/opt/p{i}"
    text = {"program": f"First network connection detected for p{i} ({exe})",
            "domain": f"p{i} ({exe}) reached a new domain: d{i}.example"}.get(kind, f"{kind} of p{i} is new")
    return picosnitch.Novelty(kind, exe, f"p{i}", text, when or time.time())


def bodies(n):
    return [notice.body for notice in n.outbox.values()]


def exe_log(n):
    return open(os.path.join(n.rt.state, "exe.log")).read().splitlines()


def test_a_burst_is_one_notice_and_events_apart_are_two(tmp_path, clock):
    n = notifier(tmp_path)
    for i in range(12):                 # 12 events in 2 s
        clock.now += 2 / 11 if i else 0
        n.novelty(novelty(i=i))
        n.show_group()
    clock.now += picosnitch.NOVELTY_GROUP_SECONDS - 0.1
    n.show_group()
    assert bodies(n) == []              # (not quiet for long enough yet)
    clock.now += 0.2
    n.show_group()
    assert bodies(n) == ["12 new programs, the first: p0 (/opt/p0)"]
    assert len(exe_log(n)) == 12 and exe_log(n)[-1].endswith("First network connection detected for p11 (/opt/p11)")
    n.novelty(novelty(i=20))
    clock.now += 5
    n.show_group()
    n.novelty(novelty(i=21))
    clock.now += 5
    n.show_group()
    assert bodies(n)[1:] == ["First network connection detected for p20 (/opt/p20)",
                             "First network connection detected for p21 (/opt/p21)"]


def test_a_group_of_kinds_says_how_many_of_each_and_a_steady_trickle_is_shown_within_30_s(tmp_path, clock):
    n = notifier(tmp_path)
    kinds = ["program"] * 5 + ["domain", "port"]
    for i, kind in enumerate(kinds):
        n.novelty(novelty(kind, i))
    clock.now += picosnitch.NOVELTY_GROUP_SECONDS
    n.show_group()
    assert bodies(n)[0].splitlines()[:2] == ["7 things are new: 5 programs, 2 destinations; the first of each:",
                                             "First network connection detected for p0 (/opt/p0)"]
    assert len(bodies(n)[0].splitlines()) == 3 and "p5" in bodies(n)[0].splitlines()[2]
    for i in range(20):                 # one every 2 s: never quiet for 3 s
        n.novelty(novelty(i=i))
        clock.now += 2
        n.show_group()
    assert bodies(n)[1] == "15 new programs, the first: p0 (/opt/p0)"      # (at 30 s)


def test_names_in_a_notice_are_shown_escaped(tmp_path, clock):
    n = notifier(tmp_path)
    evil = picosnitch.Novelty("name", "/tmp/x\x1b[2J", "x\u202e", "x\u202e (/tmp/x\x1b[2J) has a new name", time.time())
    n.novelty(evil)
    n.novelty(evil)
    n.show_group(now=True)
    assert bodies(n) == ["x\\u202e (/tmp/x\\x1b[2J) has a new name\nx\\u202e (/tmp/x\\x1b[2J) has a new name"]
    for _ in range(4):
        n.novelty(evil)
    n.show_group(now=True)
    assert bodies(n)[1] == "4 new names, the first: x\\u202e (/tmp/x\\x1b[2J)"
    assert "\x1b" not in open(os.path.join(n.rt.state, "exe.log")).read()


def test_a_stop_keeps_the_pending_group_with_the_notices(tmp_path, clock):
    n = notifier(tmp_path)
    n.novelty(novelty(i=1))
    n.novelty(novelty(i=2))
    n.rt.stopping = lambda: True
    loop = picosnitch.NotifierLoop.__new__(picosnitch.NotifierLoop)    # (the loop without its sockets)
    loop.rt, loop.notifier, loop.served = n.rt, n, {"stream": None, "control": None}
    loop.retry_at = {"stream": float("inf"), "control": float("inf")}
    loop.run()
    kept = json.load(open(os.path.join(n.rt.private, picosnitch.OUTBOX_NAME)))
    both = "First network connection detected for p1 (/opt/p1)\nFirst network connection detected for p2 (/opt/p2)"
    assert [body for _, _, body in kept] == [both]
    again = picosnitch.Notifier(n.rt)
    assert bodies(again) == [both]


def test_notifications_off_logs_novelty_and_shows_nothing(tmp_path, clock):
    n = notifier(tmp_path, desktop_notifications=False)
    n.novelty(novelty(i=1))
    n.show_group(now=True)
    assert bodies(n) == [] and len(exe_log(n)) == 1


def test_a_mute_is_kept_in_both_files_applied_logged_and_shown_with_who_asked(tmp_path, clock):
    n = notifier(tmp_path, desktop_notifications=False)
    published = []
    n.logged = lambda kind, when, fields: published.append((kind, fields))
    assert n.mute("/opt/p1", ["destination", "volume"], True, "uid 1000, pid 42 (/usr/bin/evil)") == \
        ["destination", "volume"]
    for path, mode in ((n.mutes.paths[0], 0o600), (n.mutes.paths[1], 0o640)):
        assert json.load(open(path)) == {"mutes": {"/opt/p1": ["destination", "volume"]}}
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert picosnitch.read_mutes(n.rt.state) == {"/opt/p1": ["destination", "volume"]}
    said = "notices of destination, volume muted for /opt/p1 by uid 1000, pid 42 (/usr/bin/evil); " \
           "muted for it now: destination, volume"
    assert exe_log(n)[-1].endswith(said) and bodies(n) == [said]       # (shown though notifications are off)
    n.rt.config.desktop_notifications = True
    n.novelty(novelty("domain", 1))
    n.novelty(novelty("program", 1))
    n.show_group(now=True)
    assert exe_log(n)[-2].endswith("reached a new domain: d1.example (muted)")
    assert bodies(n)[-1] == "First network connection detected for p1 (/opt/p1)"
    assert ("novelty", {"kind": "domain", "exe": "/opt/p1", "name": "p1", "text": novelty("domain", 1).text,
                        "muted": True}) in published
    assert n.mute("/opt/p1", ["volume"], False, "uid 0, pid 7 (/usr/bin/x)") == ["destination"]
    assert picosnitch.Notifier(n.rt).mutes.by_exe == {"/opt/p1": ["destination"]}      # (read at a start)
    assert n.mute("/opt/p1", ["all"], False, "uid 0, pid 7 (/usr/bin/x)") == []
    assert picosnitch.read_mutes(n.rt.state) == {}


def test_changes_of_mutes_are_bounded_a_minute(tmp_path, clock):
    """Each change is a notice: a program asking in a loop cannot bury the others."""
    n = notifier(tmp_path)
    for i in range(picosnitch.MUTE_CHANGES):
        n.mute("/opt/p1", ["volume"], i % 2 == 0, "me")
    with pytest.raises(ValueError, match="changed 20 times in the last minute"):
        n.mute("/opt/p1", ["volume"], True, "me")
    assert len(bodies(n)) == picosnitch.MUTE_CHANGES


def test_a_program_using_up_the_changes_of_a_minute_cannot_keep_root_from_unmuting(tmp_path, clock):
    n = notifier(tmp_path)
    n.mute("/home/u/evil", ["all"], True, "uid 1000, pid 42 (command line: evil)")
    for i in range(picosnitch.MUTE_CHANGES - 1):
        n.mute(f"/tmp/decoy{i}", ["volume"], True, "uid 1000, pid 42 (command line: evil)")
    with pytest.raises(ValueError, match="as root"):
        n.mute("/home/u/evil", ["all"], False, "uid 1000, pid 43 (command line: picosnitch mute)")
    assert n.mute("/home/u/evil", ["all"], False, "uid 0, pid 44 (command line: picosnitch mute)", root=True) == []
    assert "/home/u/evil" not in n.mutes.by_exe
    assert bodies(n)[-1].startswith("notices of all unmuted for /home/u/evil by uid 0, pid 44")


def test_the_number_of_muted_programs_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(picosnitch, "MUTED_PROGRAMS", 2)
    n = notifier(tmp_path)
    n.mute("/a", ["all"], True, "me")
    n.mute("/b", ["all"], True, "me")
    with pytest.raises(ValueError, match="2 programs have mutes already"):
        n.mute("/c", ["all"], True, "me")
    assert n.mute("/b", ["hash"], True, "me") == ["all", "hash"]        # (one muted already may change)


# -- the control socket ---------------------------------------------------------

@pytest.fixture
def control(tmp_path):
    directory = tempfile.mkdtemp(prefix="ps-control-")      # (another account may reach the socket)
    os.chmod(directory, 0o755)
    n = notifier(tmp_path)
    server = picosnitch.Control(n.rt, n.mute, os.path.join(directory, "control.sock"))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            reads, writes = server.waiting()
            ready, writable, _ = select.select(reads, writes, [], 0.05)
            server.step(ready, writable)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server, n
    stop.set()
    thread.join()
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


def ask(path, data, user=None):
    """What the control socket answers to data (raw bytes), as a JSON object;
    as another account if one is named."""
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "data = sys.stdin.buffer.read()\ntry: s.sendall(data)\nexcept OSError: pass\n"
            "print(s.makefile().readline(), end='')")
    done = subprocess.run([sys.executable, "-c", code, path], input=data, capture_output=True, timeout=20,
                          preexec_fn=as_user(user) if user else None)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_client_mutes_and_unmutes_and_who_asked_is_told(control):
    server, n = control
    assert picosnitch.request_mute("/usr/bin/foo", ["destination"], True, server.path) == ["destination"]
    assert picosnitch.request_mute("/usr/bin/foo", ["hash", "name"], True, server.path) == \
        ["destination", "hash", "name"]
    assert picosnitch.request_mute("/usr/bin/foo", ["destination"], False, server.path) == ["hash", "name"]
    assert f"pid {os.getpid()} ({os.path.realpath(sys.executable)})" in exe_log(n)[0]
    assert all(f"by uid {os.getuid()}, " in line for line in exe_log(n))


def test_another_account_is_refused(control, throwaway_user):
    server, n = control
    answer = ask(server.path, b'{"v": 1, "type": "mute", "exe": "/x", "kinds": ["all"], "mute": true}\n',
                 throwaway_user)
    assert answer["type"] == "refused" and "may ask picosnitch for mutes" in answer["reason"]
    assert n.mutes.by_exe == {}


@pytest.mark.parametrize("request_, error", [
    (b"mute everything\n", "not JSON"),
    (b'{"v": 1, "type": "mute", "exe": "/x", "kinds": ["everything"], "mute": true}\n', "unknown kind 'everything'"),
    (b'{"v": 1, "type": "mute", "exe": "x", "kinds": ["all"], "mute": true}\n', "absolute path"),
    (b'{"v": 1, "type": "mute", "exe": 5, "kinds": ["all"]}\n', "absolute path"),
    (b'{"v": 1, "type": "mute", "exe": "/x", "kinds": []}\n', "one or more of"),
    (b'{"v": 1, "type": "mute", "exe": "/x", "kinds": ["all"], "mute": "yes"}\n', "true or false"),
    (b'{"v": 2, "type": "shell"}\n', '{"v": 1, "type": "mute", ...}'),
    (b'{"v": 1, "type": "mute", "exe": "/' + b"x" * (70 << 10) + b'"}\n', "longer than 65536 bytes"),
], ids=["not JSON", "unknown kind", "relative exe", "exe not a string", "no kinds", "mute not a bool",
        "not a mute", "too long"])
def test_bad_requests_get_an_error_naming_the_problem(control, request_, error):
    server, n = control
    answer = ask(server.path, request_)
    assert answer["type"] == "error" and error in answer["text"]
    assert n.mutes.by_exe == {}


def test_a_client_that_sends_nothing_holds_nothing(control, monkeypatch):
    server, n = control
    monkeypatch.setattr(picosnitch, "CONTROL_SECONDS", 0.5)
    idle = [socket.socket(socket.AF_UNIX) for _ in range(picosnitch.CONTROL_CLIENTS)]
    for s in idle:
        s.connect(server.path)
    time.sleep(0.2)
    busy = ask(server.path, b"{}\n")
    assert busy["type"] == "error" and "requests already" in busy["text"]
    for s in idle:                      # (each is told, then closed, once its time is up)
        s.settimeout(10)
        assert "no whole request" in json.loads(s.makefile().readline())["text"]
    assert picosnitch.request_mute("/x", ["all"], True, server.path) == ["all"]


def test_the_client_says_when_picosnitch_is_not_running(tmp_path):
    with pytest.raises(picosnitch.PicosnitchError, match="picosnitch is not running"):
        picosnitch.request_mute("/x", ["all"], True, str(tmp_path / "control.sock"))
    with pytest.raises(picosnitch.PicosnitchError, match="unknown kind"):
        picosnitch.mute_answer(b'{"v":1,"type":"error","text":"unknown kind \'x\'"}')
    assert picosnitch.read_mutes(str(tmp_path)) == {}
