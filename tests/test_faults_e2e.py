"""Nothing lost without a word, on a bad day (storage, the reader, notifications, the primary, the state
directory and the supervisor):
a locked database, a full disk, killed processes, damaged files, an old
database layout, and senders racing the start."""
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time

import pytest

import picosnitch
from conftest import (PEER_PORT, PYTHON, REPORT, SCRIPT, Daemon, need_root, notifications, runtime, sha256_file,
                      unique_c_sender, unique_python, wait_for)

UPSTREAM_1_0_3 = ("CREATE TABLE connections (contime text, send integer, recv integer, exe text, name text, "
                  "cmdline text, sha256 text, pexe text, pname text, pcmdline text, psha256 text, uid integer, "
                  "lport integer, rport integer, laddr text, raddr text, domain text)")


def children():
    with open(picosnitch.STATUSFILE) as f:
        return json.load(f)["children"]


def udp(exe, exe_dir, nbytes, mode="udp", chunk=1000):
    out = subprocess.run([exe, os.path.join(exe_dir, "traffic.py"), mode, "127.0.0.1", str(PEER_PORT), str(nbytes),
                          str(chunk)], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def logged(daemon, exe):
    rows = daemon.rows(exe=exe)
    return sum(r["send"] for r in rows), sum(r["recv"] for r in rows)


@pytest.mark.parametrize("child", ["reader", "monitor", "primary", "notifier", "desktop"])
def test_a_killed_process_loses_no_byte(tmp_path, peers, exe_dir, child):
    """kill -9 of each process while a program sends and receives 100
    datagrams a second: every byte is logged, and the death is reported."""
    need_root()
    daemon = Daemon(str(tmp_path), config={"Desktop notifications": False}).start()
    try:
        exe = unique_python(exe_dir)
        result = {}
        sender = threading.Thread(target=lambda: result.update(udp(exe, exe_dir, 400, "udp-steady")))
        sender.start()
        time.sleep(1.5)
        victim = children()[child]
        os.kill(victim, signal.SIGKILL)
        sender.join()
        expected = (result["sent"], result["received"])
        assert expected == (400_000, 400_000)
        assert wait_for(lambda: logged(daemon, exe) == expected, 30), logged(daemon, exe)
        assert wait_for(lambda: children()[child] != victim)
        assert wait_for(lambda: f"the {child} process died (killed by SIGKILL); restarting it" in daemon.read("error.log"))
        if child == "reader":
            assert any("the reader restarted" in line for line in daemon.lines) or \
                "while the reader was restarting" in daemon.read("error.log")
        REPORT.append(f"kill -9 of the {child}: expected send/recv {expected}, logged {logged(daemon, exe)}")
    finally:
        assert daemon.stop() == 0


def test_a_database_locked_for_35_seconds_loses_nothing(tmp_path, peers, exe_dir):
    need_root()
    daemon = Daemon(str(tmp_path), config={"Desktop notifications": False}).start()
    try:
        before = unique_python(exe_dir)
        udp(before, exe_dir, 3000)
        assert wait_for(lambda: logged(daemon, before)[0] == 3000)
        lock = sqlite3.connect(daemon.path("snitch.db"), timeout=5)
        lock.execute("BEGIN EXCLUSIVE")
        during = [unique_python(exe_dir) for _ in range(3)]
        try:
            for exe in during:          # over 30 seconds of the lock
                udp(exe, exe_dir, 5000)
                time.sleep(10)
            time.sleep(5)
        finally:
            lock.rollback()
            lock.close()
        for exe in during:
            assert wait_for(lambda: logged(daemon, exe) == (5000, 5000), 20), (exe, logged(daemon, exe))
        errors = [line for line in daemon.read("error.log").splitlines() if "snitch.db cannot be written" in line]
        assert len(errors) == 1 and "database is locked" in errors[0]
        assert wait_for(lambda: any("snitch.db is written again" in line for line in daemon.lines))
    finally:
        assert daemon.stop() == 0


def test_a_full_disk_keeps_capturing_notifies_and_resumes(peers, exe_dir, session_bus):
    """The state directory is on a small tmpfs that fills up: capture goes
    on, the user is told on the desktop (error.log cannot take it), and when
    space returns the waiting rows are written. SIGTERM stops it all along."""
    need_root()
    home = tempfile.mkdtemp(prefix="ps-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", home], check=True)
    try:
        daemon = Daemon(home, env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]},
                        state=os.path.join(home, "state")).start()
        try:
            first = unique_python(exe_dir)
            udp(first, exe_dir, 2000)
            assert wait_for(lambda: logged(daemon, first)[0] == 2000)
            filler = os.path.join(home, "filler")
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
            assert os.statvfs(home).f_bavail == 0
            during = unique_python(exe_dir)
            udp(during, exe_dir, 7000)
            said = lambda: " ".join(n["body"] for n in notifications(session_bus[1]))
            assert wait_for(lambda: "No space left on device" in said() and "cannot be written" in said())
            status = subprocess.run([PYTHON, SCRIPT, "status"], capture_output=True, text=True)
            assert status.returncode == 0 and "picosnitch is running" in status.stdout
            assert logged(daemon, during) == (0, 0)
            os.unlink(filler)
            assert wait_for(lambda: logged(daemon, during) == (7000, 7000), 30), logged(daemon, during)
            after = unique_python(exe_dir)
            udp(after, exe_dir, 1000)
            assert wait_for(lambda: logged(daemon, after) == (1000, 1000))
            REPORT.append(f"full disk: {logged(daemon, during)[0]} of 7000 bytes sent while it was full are logged")
        finally:
            assert daemon.stop(timeout=60) == 0
    finally:
        subprocess.run(["umount", home])
        os.rmdir(home)


def test_damaged_files_are_moved_aside_and_new_ones_started(tmp_path, peers, exe_dir):
    need_root()
    daemon = Daemon(str(tmp_path), config={"Desktop notifications": False})
    garbage = os.urandom(8192)
    daemon.plant(daemon.path("snitch.db"), garbage)
    daemon.plant(daemon.private("record.json"), b'{"Executables": ["not", "an", "object"]}')
    daemon.start()
    try:
        exe = unique_python(exe_dir)
        udp(exe, exe_dir, 1500)
        assert wait_for(lambda: logged(daemon, exe) == (1500, 1500))
        assert wait_for(lambda: exe in json.loads(daemon.read("record.json") or "{}").get("Executables", {}))
    finally:
        assert daemon.stop() == 0
    aside = {name.split(".damaged-")[0]: os.path.join(directory, name) for directory in (daemon.state, daemon.private(""))
             for name in os.listdir(directory) if ".damaged-" in name}
    assert set(aside) == {"snitch.db", "record.json"}
    assert open(aside["snitch.db"], "rb").read() == garbage
    assert json.load(open(aside["record.json"])) == {"Executables": ["not", "an", "object"]}
    log = daemon.read("error.log")
    assert f"{daemon.path('snitch.db')} could not be read as a database" in log
    assert f"moved to {daemon.state}/snitch.db.damaged-" in log
    assert f"{daemon.private('record.json')} could not be read ('Executables' is not an object)" in log
    assert "process died" not in log


def test_an_upstream_1_0_3_log_gains_the_new_columns_and_keeps_its_rows(tmp_path, peers, exe_dir):
    """Upstream kept it in ~/.config/picosnitch/: it is moved to the state
    directory, and the old name links to it."""
    need_root()
    daemon = Daemon(str(tmp_path), config={"Desktop notifications": False})
    old_rows = [("2026-10-01 10:00:0%d" % i, 10 * i, 20 * i, "/usr/bin/old", "old", "old -x", "ab" * 32, "/bin/sh",
                 "sh", "sh -c old", "cd" * 32, 1000, 40000 + i, 443, "10.0.0.2", "10.0.0.1", "old.example")
                for i in range(3)]
    con = sqlite3.connect(os.path.join(daemon.dir, "snitch.db"))
    con.execute(UPSTREAM_1_0_3)
    con.executemany(f"INSERT INTO connections VALUES ({','.join('?' * 17)})", old_rows)
    con.commit()
    con.close()
    daemon.start()
    try:
        exe = unique_python(exe_dir)
        udp(exe, exe_dir, 1200)
        rows = daemon.wait_rows(exe=exe)
        assert sum(r["send"] for r in rows) == 1200 and {r["proto"] for r in rows} == {"udp"}
        assert rows[0]["gpexe"] != "" or rows[0]["gpname"] != ""
    finally:
        assert daemon.stop() == 0
    con = sqlite3.connect(daemon.path("snitch.db"))
    again = con.execute("SELECT contime, send, recv, exe, name, cmdline, sha256, pexe, pname, pcmdline, psha256, uid, "
                        "lport, rport, laddr, raddr, domain FROM connections WHERE exe = '/usr/bin/old' "
                        "ORDER BY rowid").fetchall()
    assert again == old_rows
    assert "died" not in daemon.read("error.log")
    assert os.readlink(os.path.join(daemon.dir, "snitch.db")) == daemon.path("snitch.db")


def test_senders_racing_the_start_are_logged_or_reported(tmp_path, peers, exe_dir):
    """Short-lived senders run while picosnitch starts: a row without an
    executable only ever comes with an error that says why."""
    need_root()
    sender = unique_c_sender(exe_dir)
    stop = threading.Event()

    def senders():
        while not stop.is_set():
            subprocess.run([sender, "127.0.0.1", str(PEER_PORT), "10"])
    thread = threading.Thread(target=senders, daemon=True)
    thread.start()
    daemon = Daemon(str(tmp_path), config={"Desktop notifications": False})
    try:
        daemon.start()
        time.sleep(2)
        stop.set()
        thread.join()
        assert wait_for(lambda: daemon.rows(exe=sender))
        time.sleep(2)
    finally:
        stop.set()
        assert daemon.stop() == 0
    rows = [r for r in daemon.rows() if r["rport"] == PEER_PORT and r["raddr"] == "127.0.0.1" and r["proto"] != "tcp"]
    assert rows and all(r["send"] % 10 == 0 and r["lport"] > 0 and r["proto"] in ("udp", "unknown") for r in rows)
    unknown = [r for r in rows if not r["exe"]]
    assert {r["sha256"] for r in rows if r["exe"] == sender} == {sha256_file(sender)}
    assert not unknown or "could not be attributed to an executable" in daemon.read("error.log")
    REPORT.append(f"senders racing the start: {len(rows)} rows, {len(unknown)} without an executable (reported)")


def explode(rt):
    raise ZeroDivisionError("boom from the test")


def test_a_process_that_dies_of_an_exception_reports_its_traceback(tmp_path, monkeypatch):
    """The one entry wrapper of every child: the exception and its traceback
    go to the notifier, which writes them to error.log."""
    need_root()
    monkeypatch.setitem(picosnitch.ROLES, "primary", picosnitch.ROLES["primary"]._replace(main=explode))
    rt = runtime(picosnitch.Config(desktop_notifications=False), tmp_path)
    proc = multiprocessing.get_context("fork").Process(target=picosnitch.process_entry, args=("primary", rt, ()))
    proc.start()
    proc.join(20)
    assert proc.exitcode == 1
    report = rt.report_rx.recv(5)
    assert (report.kind, report.text) == ("error", "the primary process failed: ZeroDivisionError: boom from the test")
    assert report.detail.startswith("Traceback") and "in explode" in report.detail
    picosnitch.Notifier(rt).report(report)
    log = open(os.path.join(rt.state, "error.log")).read().splitlines()
    assert log[0] == f"{picosnitch.dated(report.time)} {report.text}"
    assert log[1] == "    Traceback (most recent call last):" and log[-1] == "    ZeroDivisionError: boom from the test"


def shown(rt, address):
    """What the notifier handed to the desktop process, shown on the bus at address as the desktop process does."""
    desktop = picosnitch.DesktopNotifier(address)
    while (notice := rt.notice_rx.recv(0.5)) is not None:
        desktop.pending[notice.id] = notice
    delivered = []
    assert desktop.flush(delivered.append) == ""
    return delivered


def test_reports_reach_the_desktop_when_error_log_cannot_be_written(tmp_path, session_bus):
    rt = runtime(picosnitch.Config(), tmp_path, environ={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]})
    os.makedirs(os.path.join(rt.state, "error.log"))        # a directory: the log cannot be written
    notifier = picosnitch.Notifier(rt)
    notifier.report(picosnitch.Report("error", "a test report that has nowhere to be written", "", time.time()))
    delivered = shown(rt, session_bus[0])
    bodies = [n["body"] for n in notifications(session_bus[1])]
    assert "a test report that has nowhere to be written" in bodies
    assert any(b.startswith("error.log cannot be written (Is a directory)") for b in bodies)
    for notice in delivered:
        notifier.desktop_said(picosnitch.Delivered(notice.id, ""))
    assert not notifier.outbox
