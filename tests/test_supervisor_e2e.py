"""The supervisor: a dead process is reported and restarted, and capture goes on."""
import json
import os
import signal
import subprocess
import time

import picosnitch
from conftest import PEER_PORT, PEER_V4, PYTHON, SCRIPT, Daemon, need_root, sha256_file, unique_python


def children():
    with open(picosnitch.STATUSFILE) as f:
        return json.load(f)["children"]


def test_killed_monitor_is_reported_and_restarted(tmp_path, peers, exe_dir):
    need_root()
    daemon = Daemon(str(tmp_path)).start()
    try:
        status = subprocess.run([PYTHON, SCRIPT, "status"], capture_output=True, text=True)
        assert status.returncode == 0
        assert "capture mode: tracepoint (sock:sock_send_length, sock:sock_recv_length)" in status.stdout
        before = children()
        assert set(before) == {"reader", "monitor", "primary", "notifier"}
        os.kill(before["monitor"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while children()["monitor"] == before["monitor"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert children()["monitor"] != before["monitor"]
        assert "the monitor process died (exit code -9); restarting it" in daemon.read("error.log")
        exe = unique_python(exe_dir)
        subprocess.run([exe, os.path.join(exe_dir, "traffic.py"), "udp", PEER_V4, str(PEER_PORT), "4000"],
                       check=True, capture_output=True)
        rows = daemon.wait_rows(exe=exe)
        assert sum(r["send"] for r in rows) == 4000
        assert {r["sha256"] for r in rows} == {sha256_file(exe)}
    finally:
        assert daemon.stop() == 0
    assert not os.path.exists(picosnitch.PIDFILE)
