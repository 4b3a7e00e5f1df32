"""What is new, against a running daemon with real BPF and real traffic, a
day of use compressed into seconds ("Novelty settle days": 0): a uniquely
built program talks to one port, is settled, then talks to another; the
notification names the new destination, and snitch.db and exe.log have
it."""
import os
import sqlite3
import subprocess

import pytest

from conftest import Daemon, notifications, unique_c_sender, wait_for

PORTS = (21431, 21432)       # (below the ephemeral ports: destinations, not a client's ports)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, session_bus):
    d = Daemon(str(tmp_path_factory.mktemp("home")), config={"Novelty settle days": 0},
               env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]}).start()
    yield d
    assert d.stop() == 0
    d.remove_state()


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
    send(exe, PORTS[0], 100)
    assert wait_for(lambda: len(daemon.rows(exe=exe)) == 1, 20)
    assert wait_for(lambda: f"First network connection detected for {name} ({exe})" in daemon.read("exe.log"), 15)
    send(exe, PORTS[0], 200)            # (the same destination, in a later window: nothing new)
    assert wait_for(lambda: len(daemon.rows(exe=exe)) == 2, 20)
    send(exe, PORTS[1], 300)
    told = f"New destination for {name} ({exe}): remote port {PORTS[1]}, via 127.0.0.1"
    assert wait_for(lambda: [n for n in notifications(session_bus[1]) if told in n["body"]], 20)
    assert told in daemon.read("exe.log")
    assert f"remote port {PORTS[0]}" not in daemon.read("exe.log")
    assert logged(daemon, exe) == [("program", exe, PORTS[0], 100), ("port", str(PORTS[1]), PORTS[1], 300)]
