"""Mutes against a running daemon: `picosnitch mute` asks the notifier over
its control socket, the change is in exe.log and on the desktop with who
asked, the user's copy of the mutes is written, bad requests and other
accounts are told no, and the event stream still works beside it."""
import json
import os
import subprocess

import pytest

import picosnitch
from conftest import PYTHON, SCRIPT, Daemon, as_user, notifications, wait_for

EVENTS = "/run/picosnitch/events.sock"


@pytest.fixture
def daemon(tmp_path, session_bus):
    d = Daemon(home=str(tmp_path), env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]},
               config={"Desktop notifications": False}).start()
    wait_for(lambda: os.path.exists(picosnitch.CONTROL_SOCKET), timeout=20)
    yield d
    d.stop()
    d.remove_state()


def mute(*args, **kw):
    return subprocess.run([PYTHON, SCRIPT, "mute", *args], capture_output=True, text=True, timeout=30, **kw)


def test_mute_is_logged_and_shown_with_who_asked_and_the_stream_goes_on(daemon, session_bus, throwaway_user):
    done = mute("/usr/bin/ps-muted\x1b[2J", "destination", "volume")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "/usr/bin/ps-muted\\x1b[2J: muted for destination, volume\n"
    assert json.load(open(daemon.path(picosnitch.MUTES_NAME))) == \
        {"mutes": {"/usr/bin/ps-muted\x1b[2J": ["destination", "volume"]}}
    assert picosnitch.read_mutes(daemon.state) == {"/usr/bin/ps-muted\x1b[2J": ["destination", "volume"]}
    said = "notices of destination, volume muted for /usr/bin/ps-muted\\x1b[2J by uid 0, pid "
    assert wait_for(lambda: said in daemon.read("exe.log"))
    # (picosnitch's account may not read another account's /proc/PID/exe: the command line it is)
    asker = daemon.read("exe.log").split(said)[1].splitlines()[0]
    assert f"(command line: {PYTHON} {SCRIPT} mute /usr/bin/ps-muted\\x1b[2J destination volume)" in asker
    # shown though "Desktop notifications" is off: a program that mutes itself is seen
    assert wait_for(lambda: any(said in n["body"] for n in notifications(session_bus[1])))
    done = mute("--undo", "/usr/bin/ps-muted\x1b[2J")
    assert done.returncode == 0 and done.stdout.endswith(": nothing muted\n")
    assert picosnitch.read_mutes(daemon.state) == {}
    for args, error in ((["ps-relative"], "absolute path"), (["/x", "everything"], "unknown kind 'everything'"),
                        ([], "name the program")):
        done = mute(*args)
        assert done.returncode == 1 and error in done.stderr and done.stdout == ""
    refused = mute("/x", preexec_fn=as_user(throwaway_user), cwd="/")
    assert refused.returncode == 1 and "picosnitch refused: only root and root may ask" in refused.stderr
    events = subprocess.Popen([PYTHON, SCRIPT, "events"], stdout=subprocess.PIPE)
    try:
        lines = [json.loads(events.stdout.readline()) for _ in range(2)]
        assert [line["type"] for line in lines] == ["hello", "tick"]
    finally:
        events.kill()
        events.wait()


def test_mute_says_when_picosnitch_is_not_running():
    assert not os.path.exists(picosnitch.CONTROL_SOCKET)       # (no daemon runs beside this test)
    done = mute("/usr/bin/foo")
    assert done.returncode == 1 and "picosnitch is not running" in done.stderr
