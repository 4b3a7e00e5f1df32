"""The live view against a running daemon, real BPF and real traffic:
`picosnitch events` shows a uniquely named program's connection with its
exact bytes (which snitch.db logs too), a reader that never reads holds
nothing up, another account is refused, and `top` (driven in tmux) shows a
sender, its rate as it changes, its groupings, sorting, filter and pause,
and that it is gone once it exits. Captures of `top` are kept."""
import json
import os
import re
import shutil
import socket
import subprocess
import threading

import pytest

from conftest import HERE, PYTHON, SCRIPT, Daemon, as_user, unique_python, wait_for
from test_view import Tmux

SINK_PORT = 21421            # (below the ephemeral ports)
EVENTS = "/run/picosnitch/events.sock"
CAPTURES = "/var/tmp/picosnitch-captures"


class Sink:
    """A UDP socket that takes every datagram sent to SINK_PORT."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", SINK_PORT))
        self.sock.settimeout(0.5)
        self.received, self.stopped = 0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopped:
            try:
                self.received += len(self.sock.recv(65536))
            except socket.timeout:
                pass

    def close(self):
        self.stopped = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(home=str(tmp_path)).start()
    wait_for(lambda: os.path.exists(EVENTS), timeout=20)      # (the live process starts beside the reader)
    sink = Sink()
    yield d
    sink.close()
    d.stop()
    d.remove_state()


def sender(exe_dir, *steps, size=1000):
    """A uniquely named program sending datagrams at the paces given (rate, seconds, ...)."""
    exe = unique_python(exe_dir)
    shutil.copy(os.path.join(HERE, "live_sender.py"), exe_dir)
    cmd = [exe, os.path.join(exe_dir, "live_sender.py"), str(SINK_PORT), str(size), *map(str, steps)]
    return exe, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def stream_readers():
    """How many readers the event stream has accepted (its sockets of state
    connected in /proc/net/unix: accepted ones carry the stream's path)."""
    with open("/proc/net/unix") as f:
        return sum(1 for line in f if line.split()[-1] == EVENTS and line.split()[5] == "03")


def watching(readers):
    """A reader of the stream of its own, once the stream has `readers` and
    has said a tick: the reader process has taken its baseline (what moved
    before is not new), so what a sender does from now on is told whole."""
    assert wait_for(lambda: stream_readers() == readers - 1, timeout=30)
    watch = socket.socket(socket.AF_UNIX)
    watch.connect(EVENTS)
    lines = watch.makefile()
    while json.loads(lines.readline())["type"] != "tick":
        pass
    return watch


def events(command="events", **kw):
    return subprocess.Popen([PYTHON, SCRIPT, command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_events_show_a_programs_connection_with_its_exact_bytes(daemon, exe_dir):
    proc = events()
    lines = [json.loads(proc.stdout.readline())]
    while lines[-1]["type"] != "tick":          # (past the reader process's baseline)
        lines.append(json.loads(proc.stdout.readline()))
    exe, program = sender(exe_dir, 1, 1, size=6170)
    sent = json.loads(program.communicate(timeout=30)[0])["sent"]
    told = []
    while not (told and any(line["type"] == "connection" and line["exe"] == exe for line in lines)
               and any(line["type"] == "executable" and line["exe"] == exe for line in lines)):
        lines.append(json.loads(proc.stdout.readline()))
        told += [c for c in lines[-1].get("conns", []) if c["exe"] == exe]
    proc.stdout.close()                         # (as `head` does once it has its lines)
    assert proc.wait(timeout=20) == 0
    assert lines[0]["type"] == "hello" and lines[0]["v"] == 1
    assert sum(c["send"] for c in told) == sent == 6170 and len(told) == 1
    [connection] = [line for line in lines if line["type"] == "connection" and line["exe"] == exe]
    assert connection["new"] is True and connection["rport"] == SINK_PORT and connection["proto"] == "udp"
    assert connection["send"] == 6170 and connection["name"] == os.path.basename(exe)
    assert [line["new"] for line in lines if line["type"] == "executable" and line["exe"] == exe] == [True]
    rows = daemon.wait_rows(exe=exe)
    assert sum(r["send"] for r in rows) == sent


def test_a_reader_that_never_reads_holds_nothing_up(daemon, exe_dir):
    stuck = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    for s in stuck:
        s.connect(EVENTS)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader = events()
    watch = watching(5)
    exe, program = sender(exe_dir, 400, 4, size=1400)
    sent = json.loads(program.communicate(timeout=60)[0])["sent"]
    rows = daemon.wait_rows(exe=exe)
    assert sum(r["send"] for r in rows) == sent
    reader.terminate()
    out = reader.communicate(timeout=10)[0].decode()
    told = [c for line in out.splitlines() if '"tick"' in line for c in json.loads(line)["conns"] if c["exe"] == exe]
    assert sum(c["send"] for c in told) == sent        # (the reader that reads got every tick)
    for s in stuck + [watch]:
        s.close()


def test_another_account_is_refused(daemon, throwaway_user):
    proc = events(preexec_fn=as_user(throwaway_user), cwd="/")
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and out == b""
    assert b"refused this reader: only root and root may read picosnitch's event stream" in err


def top_line(screen, name):
    return next((line for line in screen.splitlines() if name in line), "")


def rate(line):
    """The upload rate in bytes a second of a line of top."""
    found = re.match(r"\s*([\d.]+) (k|M|G)?B/s", line)
    return float(found[1]) * {None: 1, "k": 1e3, "M": 1e6, "G": 1e9}[found[2]] if found else -1.0


def keep(screen, name):
    os.makedirs(CAPTURES, exist_ok=True)
    with open(os.path.join(CAPTURES, f"top-{name}.txt"), "w") as f:
        f.write(screen)


def test_top_shows_a_sender_its_rate_and_that_it_is_gone(daemon, exe_dir):
    tmux = Tmux(f"{PYTHON} {SCRIPT} top")
    try:
        tmux.wait("picosnitch top")
        watch = watching(2)
        exe, program = sender(exe_dir, 10, 8, 100, 8, size=1000)
        name = os.path.basename(exe)
        slow = tmux.wait(lambda s: 5e3 <= rate(top_line(s, name)) <= 20e3, timeout=30)
        keep(slow, "slow")
        assert "NEW" in top_line(slow, name)            # (a program the record did not know)
        fast = tmux.wait(lambda s: 50e3 <= rate(top_line(s, name)) <= 200e3, timeout=30)
        keep(fast, "fast")
        assert f"127.0.0.1:{SINK_PORT}" in fast
        tmux.press("right", "by connection")
        tmux.press("right", "by remote host")
        tmux.press("s", "sort: sent")
        tmux.press("/", "filter: ")
        for ch in name:
            tmux.tmux("send-keys", "-t", "view", "-l", ch)
        filtered = tmux.press("enter", lambda s: f"filter: {name}" in s and "127.0.0.1" in s)
        assert all("127.0.0.1" in line for line in filtered.splitlines()[3:-1] if line.strip())
        tmux.press("backspace", "filter: none")
        tmux.press("left", "by connection")
        tmux.press("left", "by program")
        paused = tmux.press("p", "PAUSED")
        keep(paused, "paused")
        tmux.press("p", lambda s: "PAUSED" not in s)
        program.communicate(timeout=30)
        gone = tmux.wait(lambda s: "gone" in top_line(s, name), timeout=30)
        keep(gone, "gone")
        tmux.press("?", "keys of picosnitch top")
        keep(tmux.last, "keys")
        tmux.press("q", "view exited with status 0")
        watch.close()
    finally:
        tmux.close()


def test_top_and_events_say_when_the_daemon_is_not_running():
    if os.path.exists(EVENTS):
        pytest.skip("a daemon runs")
    proc = events()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and b"picosnitch is not running: there is no event stream" in err
    proc = events("top")
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and b"picosnitch is not running" in err
