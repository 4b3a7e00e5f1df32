"""The supervisor: a dead process is reported and restarted, and capture goes on."""
import json
import os
import signal
import subprocess
import time

import picosnitch
from conftest import PEER_PORT, PEER_V4, PYTHON, SCRIPT, Daemon, need_root, private_resolver, sha256_file, unique_python


def children():
    with open(picosnitch.STATUSFILE) as f:
        return json.load(f)["children"]


def test_killed_monitor_is_reported_and_restarted(tmp_path, peers, exe_dir):
    need_root()
    daemon = Daemon(str(tmp_path)).start()
    try:
        status = subprocess.run([PYTHON, SCRIPT, "status"], capture_output=True, text=True)
        assert status.returncode == 0
        assert "capture mode: tracepoint (sock:sock_send_length, sock:sock_recv_length" in status.stdout
        before = children()
        assert set(before) == {"reader", "monitor", "primary", "notifier", "desktop"}
        for pid in [picosnitch.read_pid(), *before.values()]:    # the module, not the script and its parse tree
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert f.read().split(b"\0")[:-1] == [PYTHON.encode(), b"-P", b"-c", picosnitch.MODULE_BOOT.encode(),
                                                       SCRIPT.encode(), b"start-no-daemon"]
        os.kill(before["monitor"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while children()["monitor"] == before["monitor"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert children()["monitor"] != before["monitor"]
        assert "the monitor process died (killed by SIGKILL); restarting it" in daemon.read("error.log")
        exe = unique_python(exe_dir)
        subprocess.run([exe, os.path.join(exe_dir, "traffic.py"), "udp", PEER_V4, str(PEER_PORT), "4000"],
                       check=True, capture_output=True)
        rows = daemon.wait_rows(exe=exe)
        assert sum(r["send"] for r in rows) == 4000
        assert {r["sha256"] for r in rows} == {sha256_file(exe)}
    finally:
        assert daemon.stop() == 0
    assert not os.path.exists(picosnitch.PIDFILE)


def test_daemon_start_status_restart_stop(tmp_path):
    need_root()
    env = dict(os.environ, HOME=str(tmp_path))
    env.pop("SUDO_USER", None)
    os.makedirs(tmp_path / ".config" / "picosnitch")
    (tmp_path / ".config" / "picosnitch" / "config.json").write_text('{"GeoIP lookup": false}')
    ps = lambda *args: subprocess.run(private_resolver([PYTHON, SCRIPT, *args], str(tmp_path)),
                                      capture_output=True, text=True, env=env, timeout=120)
    started = ps("start")
    assert started.returncode == 0, started.stderr
    assert "capturing, mode tracepoint" in started.stdout
    pid = picosnitch.read_pid()
    assert pid is not None and pid != os.getpid()
    assert ps("start").returncode == 1       # one instance at a time
    status = ps("status")
    assert status.returncode == 0 and f"picosnitch is running (pid {pid})" in status.stdout
    restarted = ps("restart")
    assert restarted.returncode == 0 and "capturing, mode tracepoint" in restarted.stdout, restarted.stderr
    assert not os.path.exists(f"/proc/{pid}")
    pid = picosnitch.read_pid()
    assert pid is not None
    stopped = ps("stop")
    assert stopped.returncode == 0 and "picosnitch stopped" in stopped.stdout
    assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(picosnitch.PIDFILE)
    assert ps("status").returncode == 3
    assert ps("stop").returncode == 1


def test_lost_events_are_reported(tmp_path, session_bus):
    """A one-page perf buffer cannot hold a burst of new connections and execs."""
    need_root()
    daemon = Daemon(str(tmp_path), config={"Perf ring buffer (pages)": 1},
                    env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]}).start()
    try:
        burst = ("import socket\n"
                 "for i in range(5000):\n"
                 "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "    s.sendto(b'x', ('127.0.0.1', 9))\n"
                 "    s.close()\n")
        senders = [subprocess.Popen([PYTHON, "-c", burst]) for _ in range(2)]
        subprocess.run(["sh", "-c", "seq 400 | xargs -P 16 -n 1 /bin/true"], check=True)
        for sender in senders:
            sender.wait()
        deadline = time.monotonic() + 15
        while "lost" not in daemon.read("error.log") and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        daemon.stop()
    assert "events from the kernel: raise \"Perf ring buffer (pages)\"" in daemon.read("error.log")
    from conftest import notifications
    assert any("lost" in n["body"] and n["summary"] == "picosnitch error" for n in notifications(session_bus[1]))
