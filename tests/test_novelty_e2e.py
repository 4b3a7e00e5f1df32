"""What is new, against a running daemon with real BPF and real traffic, a
day of use compressed into seconds ("Novelty settle days": 0): a uniquely
built program talks to one port, is settled, then talks to another; the
notification names the new destination, and snitch.db and exe.log have
it; a muted program's is logged, but raises no notification."""
import os
import re
import sqlite3
import subprocess

import pytest

from conftest import PYTHON, SCRIPT, Daemon, notifications, unique_c_sender, wait_for

PORTS = (21431, 21432)       # (below the ephemeral ports: destinations, not a client's ports)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, session_bus):
    d = Daemon(str(tmp_path_factory.mktemp("home")), config={"Novelty settle days": 0},
               env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]}).start()
    yield d
    assert d.stop() == 0
    d.remove_state()


def settle(daemon, exe):
    """exe's first connection, then the same destination again in a later window."""
    send(exe, PORTS[0], 100)
    assert wait_for(lambda: len(daemon.rows(exe=exe)) == 1, 20)
    assert wait_for(lambda: f"First network connection detected for {os.path.basename(exe)} ({exe})"
                    in daemon.read("exe.log"), 15)
    send(exe, PORTS[0], 200)
    assert wait_for(lambda: len(daemon.rows(exe=exe)) == 2, 20)


def send(exe, port, nbytes=100):
    subprocess.run([exe, "127.0.0.1", str(port), str(nbytes)], check=True)


def logged(daemon, exe):
    con = sqlite3.connect(f"file:{daemon.path('snitch.db')}?mode=ro", uri=True)
    try:
        return con.execute("SELECT kind, value, rport, send FROM novelty WHERE exe = ? ORDER BY id", (exe,)).fetchall()
    finally:
        con.close()


def test_a_settled_program_reaching_a_new_port_is_told_of(daemon, session_bus, exe_dir):
    exe = unique_c_sender(exe_dir)
    name = os.path.basename(exe)
    settle(daemon, exe)
    send(exe, PORTS[1], 300)
    told = re.compile(re.escape(f"New destination for {name} ({exe}): remote port {PORTS[1]}, via ") +
                      r"(\S+, )?" + re.escape("127.0.0.1; it had reached nothing new in 0 days of use"))   # (localhost)
    # (alone, or with the first connection in one grouped notice: named either way)
    assert wait_for(lambda: [n for n in notifications(session_bus[1]) if told.search(n["body"])], 20)
    assert told.search(daemon.read("exe.log"))
    assert f"remote port {PORTS[0]}" not in daemon.read("exe.log")
    assert logged(daemon, exe) == [("program", exe, PORTS[0], 100), ("port", str(PORTS[1]), PORTS[1], 300)]


def test_a_muted_program_reaching_a_new_port_raises_no_notification(daemon, session_bus, exe_dir):
    exe = unique_c_sender(exe_dir)
    settle(daemon, exe)
    muted = subprocess.run([PYTHON, SCRIPT, "mute", exe, "destination"], capture_output=True, text=True, timeout=30)
    assert muted.returncode == 0 and muted.stdout == f"{exe}: muted for destination\n", muted.stderr
    send(exe, PORTS[1], 300)
    told = f"New destination for {os.path.basename(exe)} ({exe}): remote port {PORTS[1]}"
    assert wait_for(lambda: told in daemon.read("exe.log"), 20)
    line = next(line for line in daemon.read("exe.log").splitlines() if told in line)
    assert line.endswith(" (muted)")
    assert logged(daemon, exe)[-1] == ("port", str(PORTS[1]), PORTS[1], 300)
    mute_notice = f"muted for {exe}"
    assert wait_for(lambda: [n for n in notifications(session_bus[1]) if exe in n["body"] and "muted" in n["body"]],
                    10), mute_notice
    wait_for(lambda: False, 5)          # (a notice would have come within the notifier's 3-s grouping)
    assert not [n for n in notifications(session_bus[1]) if told in n["body"]]
