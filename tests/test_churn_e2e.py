"""Connection churn, on real BPF: a program that opens connections faster
than a window has room for still has every byte logged. The window maps
are made small ("Connections per window"), so that the windows end early
and the rest of the connections are merged into rows that say so."""
import json
import os
import re
import subprocess
import time
import uuid

import pytest

import picosnitch
from conftest import HERE, PYTHON, SCRIPT, Daemon, need_root, run

ROOM = 1024
CONNECTIONS = 200_000


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, session_bus):
    need_root()
    d = Daemon(str(tmp_path_factory.mktemp("home")), config={"Connections per window": ROOM},
               env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]})
    d.start()
    yield d
    assert d.stop() == 0


def churner(exe_dir):
    """churn.c built with a unique tag (so, a program of its own)."""
    tag = uuid.uuid4().hex
    path = os.path.join(exe_dir, "psc" + tag[:8])
    run("gcc", "-O2", f'-DTAG="{tag}"', "-o", path, os.path.join(HERE, "churn.c"))
    return path


def churn(exe, mode, port):
    out = subprocess.run([exe, mode, str(port), str(CONNECTIONS), "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def merged_count(row):
    found = re.fullmatch(r"(\d+) connections merged", row["raddr"])
    assert found, row
    return int(found.group(1))


def test_the_status_shows_the_room_of_a_window(daemon):
    out = subprocess.run([PYTHON, SCRIPT, "status"], capture_output=True, text=True)
    assert f"room for {ROOM} connections a window" in out.stdout


@pytest.mark.parametrize("mode,port", [("tcp", 21311), ("udp", 21312)])    # (below the local port range)
def test_every_byte_of_a_churning_program_is_logged(daemon, exe_dir, mode, port):
    exe = churner(exe_dir)
    did = churn(exe, mode, port)
    assert did["connections"] == CONNECTIONS and did["sent"] == 5 * CONNECTIONS
    rows = daemon.wait_rows(timeout=60, settle=3, exe=exe)
    sent, received = sum(r["send"] for r in rows), sum(r["recv"] for r in rows)
    assert (sent, received) == (did["sent"], max(did["received"], 0)), (len(rows), daemon.read("error.log")[-3000:])
    merged = [r for r in rows if r["lport"] == picosnitch.MERGED_PORT]
    assert merged and all(r["rport"] == picosnitch.MERGED_PORT and r["laddr"] == "" for r in merged)
    # the reports of the windows that merged say what the rows have: the connections and bytes of each (the
    # notifier writes them as they come, maybe after the rows)
    number = lambda text: int(text.replace(",", ""))
    expected = sorted((merged_count(r), r["send"], r["recv"]) for r in merged)
    deadline = time.monotonic() + 20
    while True:
        errors = daemon.read("error.log")
        reported = re.findall(re.escape(exe) + r" \(pid \d+, " + mode + r"\): (\d+) connections merged, "
                              r"([\d,]+) bytes sent, ([\d,]+) received", errors)
        found = sorted((int(n), number(s), number(r)) for n, s, r in reported)
        if found == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found == expected
    assert not re.search(r"lost \d+ events from the kernel", errors)
