"""The primary process: one window through every sink, with the monitor's
side of the hash pipe answered by a thread."""
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import loggen
import picosnitch
from conftest import Reports, free_share, runtime
from http_services import API_KEY, FakeVirusTotal, stats


def conn(exe, name, ino, rport=443, raddr="192.0.2.1", domain=""):
    proc = picosnitch.ProcInfo(100 + ino, exe, name, f"{name} -x", 1, ino)
    parent = picosnitch.ProcInfo(1, "/sbin/init", "init", "init", 1, 99)
    return picosnitch.Conn(proc, parent, picosnitch.NO_PROC, 1000, "tcp", 40000, rport, "10.0.0.2", raddr, domain,
                           10, 20)


def primary(tmp_path, run_id="test-run", **settings):
    """A Primary whose state directory is tmp_path/state, with the monitor's side of the
    hash channel answered by a thread (the hash of inode n is n in hex)."""
    reports = Reports()
    rt = runtime(picosnitch.Config(**settings), tmp_path, reports.reporter, run_id=run_id)
    rt.hash_primary, monitor = picosnitch.Channel.pair()

    def answer():
        while True:
            try:
                request = monitor.recv()
            except (EOFError, ValueError):        # the primary is gone
                return
            monitor.send(picosnitch.HashAnswer(request.id, [[f"{ino:064x}", ""] for _, _, ino, *_ in request.procs]))
    threading.Thread(target=answer, daemon=True).start()
    p = picosnitch.Primary(rt)
    p.reports = reports
    return p


def test_a_window_reaches_every_sink_and_skips_ignored_rows(tmp_path):
    vt = FakeVirusTotal()
    vt.known[f"{7:064x}"] = stats(malicious=1)
    try:
        p = primary(tmp_path, db_text_log=True, log_ignore=[53, "org.example.ignored"], vt_api_key=API_KEY,
                    vt_api_address=vt.base, vt_request_limit_seconds=0, geoip_lookup=False)
        conns = [conn("/usr/bin/curl", "curl", 7), conn("/usr/bin/dig", "dig", 8, rport=53),
                 conn("/usr/bin/wget", "wget", 9, domain="www.ignored.example.org"),
                 conn("", "gone", 10)]                   # an executable whose path is unknown
        p.window(1, picosnitch.now_text(), conns)
        directory = tmp_path / "state"
        rows = picosnitch.db_rows(str(directory / "snitch.db"))
        assert [(r["exe"], r["name"], r["sha256"]) for r in rows] == [("/usr/bin/curl", "curl", f"{7:064x}"),
                                                                       ("", "gone", f"{10:064x}")]
        lines = (directory / "conn.log").read_text().splitlines()
        assert lines == [picosnitch.text_log_line(tuple(r[c] for c in picosnitch.DB_COLUMNS)) for r in rows]
        record = json.loads((directory / "record.json").read_text())
        assert set(record["Executables"]) == {"/usr/bin/curl", "/usr/bin/dig", "/usr/bin/wget"}
        deadline = time.monotonic() + 20
        while "malicious" not in json.dumps(record) and time.monotonic() < deadline:
            time.sleep(0.2)
            p.window(2, picosnitch.now_text(), [])       # verdicts are applied at window ends
            record = json.loads((directory / "record.json").read_text())
        assert record["SHA256"]["/usr/bin/curl"][f"{7:064x}"].startswith("VirusTotal: 1 malicious")
        assert any(r.kind == "exe" and "VirusTotal flags /usr/bin/curl" in r.text for r in p.reports.read())
        p.close()
    finally:
        vt.close()


def test_a_program_of_many_connections_is_noted_once_and_each_row_ignored_or_kept(tmp_path):
    """A window's connections share their processes (the same objects): the
    program is hashed and noted once, each row keeps its hashes, and "Log
    ignore" still decides row by row."""
    p = primary(tmp_path, log_ignore=[53], geoip_lookup=False)
    first = conn("/usr/bin/churn", "churn", 7)
    conns = [first] + [picosnitch.dataclasses.replace(first, lport=40001 + i, rport=53 if i % 3 == 0 else 443)
                       for i in range(29)]
    conns.append(picosnitch.dataclasses.replace(first, proc=picosnitch.dataclasses.replace(first.proc, name="churn2")))
    p.window(1, picosnitch.now_text(), conns)
    rows = picosnitch.db_rows(str(tmp_path / "state" / "snitch.db"))
    assert sorted(r["lport"] for r in rows) == sorted(c.lport for c in conns if c.rport != 53)
    assert {(r["name"], r["sha256"], r["psha256"], r["gpsha256"]) for r in rows} == \
        {(name, f"{7:064x}", f"{99:064x}", "") for name in ("churn", "churn2")}
    assert [(r.kind, r.text) for r in p.reports.read() if isinstance(r, picosnitch.Novelty)] == \
        [("program", "First network connection detected for churn (/usr/bin/churn)"),
         ("name", "/usr/bin/churn is running as a new name: churn2")]
    p.close()


def test_a_locked_database_keeps_windows_in_memory_and_is_reported_once(tmp_path):
    p = primary(tmp_path, geoip_lookup=False)
    db = str(tmp_path / "state" / "snitch.db")
    p.window(1, picosnitch.now_text(), [conn("/usr/bin/curl", "curl", 7)])
    lock = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys; con = sqlite3.connect(sys.argv[1]); "
                             "con.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", db],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert lock.stdout.readline() == "locked\n"
        for seq in (2, 3):
            p.window(seq, picosnitch.now_text(), [conn("/usr/bin/wget", "wget", 8)])
        assert p.pending[picosnitch.DB_NAME].size == 2
    finally:
        lock.communicate("")
    errors = p.reports.errors()
    assert len(errors) == 1 and errors[0].startswith("snitch.db cannot be written (database is locked) (locked by "
                                                     f"pid {lock.pid}, python3, uid {os.getuid()})")
    assert p.flush()
    assert [r["exe"] for r in picosnitch.db_rows(db)] == ["/usr/bin/curl", "/usr/bin/wget", "/usr/bin/wget"]
    assert picosnitch.Log(sqlite3.connect(db)).written() == ("test-run", 3)
    p.close()


def test_what_waits_is_bounded_and_what_was_dropped_is_reported(monkeypatch):
    monkeypatch.setattr(picosnitch, "PENDING_ROWS", 5)
    reports = Reports()
    log = picosnitch.PendingLog("snitch.db", reports.reporter)
    for window in range(4):
        log.add(window, 2)
    assert (log.size, log.dropped, [item for item, _ in log.items]) == (4, 4, [2, 3])

    def locked(_):
        raise sqlite3.OperationalError("database is locked")
    assert not log.flush(locked)
    assert reports.errors() == ["snitch.db cannot be written (database is locked); rows wait in memory (up to 5) "
                                "and are written when it can be", "4 rows for snitch.db were dropped: they waited too long"]
    written = []
    assert log.flush(written.append) and written == [2, 3] and log.size == 0


def test_a_record_changed_by_someone_else_is_reported_and_not_trusted(tmp_path):
    """Whether to notify is decided by the record in the private part: an
    executable written into the user's copy, record.json, is still new."""
    p = primary(tmp_path, geoip_lookup=False)
    p.window(1, picosnitch.now_text(), [conn("/usr/bin/curl", "curl", 7)])
    p.close()
    public = tmp_path / "state" / "record.json"
    record = json.loads(public.read_text())
    record["Executables"]["/tmp/evil"] = ["evil"]
    record["Names"]["evil"] = ["/tmp/evil"]
    record["SHA256"]["/tmp/evil"] = {f"{9:064x}": picosnitch.VT_UNCHECKED}
    public.write_text(json.dumps(record))
    p = primary(tmp_path, geoip_lookup=False)
    errors = p.reports.errors()
    assert len(errors) == 1 and f"{public} is not the record picosnitch wrote" in errors[0]
    assert "/tmp/evil" not in json.loads(public.read_text())["Executables"]        # written over
    p.window(2, picosnitch.now_text(), [conn("/tmp/evil", "evil", 9)])
    said = [r.text for r in p.reports.read() if isinstance(r, picosnitch.Novelty)]
    assert said == ["First network connection detected for evil (/tmp/evil)"]
    p.close()


def test_rows_a_stop_could_not_write_are_written_at_the_next_start(tmp_path):
    p = primary(tmp_path, geoip_lookup=False, db_text_log=True)
    db = str(tmp_path / "state" / "snitch.db")
    p.window(1, picosnitch.now_text(), [conn("/usr/bin/curl", "curl", 7)])
    lock = sqlite3.connect(db)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        p.window(2, picosnitch.now_text(), [conn("/usr/bin/wget", "wget", 8), conn("/usr/bin/dig", "dig", 9)])
        p.close()
    finally:
        lock.rollback()
        lock.close()
    assert any("2 rows it could not write yet; they are kept" in e for e in p.reports.errors())
    assert os.path.exists(tmp_path / "state" / picosnitch.PRIVATE_NAME / picosnitch.SPOOL_NAME)
    p = primary(tmp_path, "next-run", geoip_lookup=False, db_text_log=True)
    assert p.last_seq == 0 and p.flush()
    assert sorted(r["exe"] for r in picosnitch.db_rows(db)) == ["/usr/bin/curl", "/usr/bin/dig", "/usr/bin/wget"]
    assert len((tmp_path / "state" / "conn.log").read_text().splitlines()) == 3
    assert picosnitch.Log(sqlite3.connect(db)).written() == ("test-run", 1)     # (the kept rows mark no window)
    assert not os.path.exists(tmp_path / "state" / picosnitch.PRIVATE_NAME / picosnitch.SPOOL_NAME)
    p.close()


def test_a_stopped_log_is_left_readable_without_its_wal(tmp_path):
    """The user reads the log but cannot write its directory: after a stop it
    needs no -wal or -shm file to be opened."""
    p = primary(tmp_path, geoip_lookup=False)
    p.window(1, picosnitch.now_text(), [conn("/usr/bin/curl", "curl", 7)])
    p.close()
    db = tmp_path / "state" / "snitch.db"
    assert not os.path.exists(f"{db}-wal")
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("delete",)
    p = primary(tmp_path, geoip_lookup=False)
    p.window(2, picosnitch.now_text(), [conn("/usr/bin/wget", "wget", 8)])
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    p.close()


def windows_until(p, done, seq, timeout=60):
    """Windows (empty ones) until done() or timeout seconds; the next seq."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        p.window(seq, picosnitch.now_text(), [])
        seq += 1
        time.sleep(0.05)
    assert done()
    return seq


def test_a_moved_log_is_put_compact_in_its_place_between_windows_unless_a_reader_holds_it(tmp_path, monkeypatch,
                                                                                           capsys):
    """An older log is moved over by the primary's thread, then copied
    compact and swapped in between two windows, rows written meanwhile and
    all. A reader that keeps its snapshot of the WAL holds the swap back for
    COMPACT_HELD windows only: then it is given up and said, with nothing
    lost, until the next start or retention."""
    monkeypatch.setattr(picosnitch, "COMPACT_HELD", 3)
    db = tmp_path / "state" / "snitch.db"
    db.parent.mkdir()
    loggen.write_legacy(str(db), 20000, "v1", seed=9, days=3)
    old = len(picosnitch.db_rows(str(db)))
    p = primary(tmp_path, geoip_lookup=False)
    p.window(1, picosnitch.now_text(), [conn("/usr/bin/curl", "curl", 7)])
    seq = windows_until(p, lambda: p.migration is not None and not p.migration.is_alive() and p.compacting, 2)
    reader = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys; con = sqlite3.connect(sys.argv[1]); "
                               "con.execute('BEGIN'); con.execute('SELECT count(*) FROM conns').fetchone(); "
                               "print('reading', flush=True); sys.stdin.read()", str(db)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "reading\n"
        p.window(seq, picosnitch.now_text(), [conn("/usr/bin/wget", "wget", 8)])
        seq = windows_until(p, lambda: p.compacting is None, seq + 1)
    finally:
        reader.communicate("")
    errors = p.reports.errors()
    assert len(errors) == 1 and errors[0].startswith("free pages could not be given back (readers held the log's "
                                                     f"WAL through 3 windows (locked by pid {reader.pid}, python3")
    assert errors[0].endswith("); snitch.db keeps its size, with nothing lost")
    rows = picosnitch.db_rows(str(db))
    assert free_share(db) > 0.5 and len(rows) == old + 2 and not os.path.exists(f"{db}.compact")
    p.close()

    p = primary(tmp_path, geoip_lookup=False)       # the next start gives the space back
    p.window(1, picosnitch.now_text(), [conn("/usr/bin/ssh", "ssh", 9)])
    windows_until(p, lambda: free_share(db) < 0.05, 2)
    assert picosnitch.db_rows(str(db))[:old + 2] == rows and len(picosnitch.db_rows(str(db))) == old + 3
    assert "picosnitch: snitch.db gave back " in capsys.readouterr().out and not p.reports.errors()
    p.close()
