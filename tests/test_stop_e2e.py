"""A clean stop loses nothing: bytes counted in the kernel reach snitch.db."""
import json
import os
import signal
import subprocess

import picosnitch
from conftest import PEER_PORT, PEER_V4, REPORT, Daemon, need_root, unique_python


def test_sigterm_right_after_the_last_send_keeps_the_bytes(tmp_path, peers, exe_dir):
    need_root()
    daemon = Daemon(str(tmp_path), config={"DB write limit (seconds)": 60}).start()
    exe = unique_python(exe_dir)
    sizes = {"tcp-up": 3_000_000, "udp": 20_000}
    for mode, size in sizes.items():
        subprocess.run([exe, os.path.join(exe_dir, "traffic.py"), mode, PEER_V4, str(PEER_PORT), str(size)],
                       capture_output=True, check=True)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    rows = daemon.rows(exe=exe)
    by_proto = {p: sum(r["send"] for r in rows if r["proto"] == p) for p in ("tcp", "udp")}
    expected = {"tcp": 3_000_000 + len("up 3000000\n"), "udp": 20_000}
    REPORT.append(f"stop under traffic: expected send {expected}, logged {by_proto}")
    assert by_proto == expected
    # no session bus here: the notice of the first connection was logged, and kept over the stop to be shown
    # at the next start (whether the desktop process tried it first or not: it waits 3 s to group what is new)
    first = f"First network connection detected for {os.path.basename(exe)} ({exe})"
    assert first in daemon.read("exe.log")
    with open(daemon.private(picosnitch.OUTBOX_NAME)) as f:
        assert [body for _, _, body in json.load(f) if first in body.splitlines()]
