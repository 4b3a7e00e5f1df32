"""Section 15, the primary: one window through every sink, with the monitor's
side of the hash pipe answered by a thread."""
import json
import multiprocessing
import os
import threading
import time

import picosnitch
from conftest import Reports
from http_services import API_KEY, FakeVirusTotal, stats


def conn(exe, name, ino, rport=443, raddr="192.0.2.1", domain=""):
    proc = picosnitch.ProcInfo(100 + ino, exe, name, f"{name} -x", 1, ino)
    parent = picosnitch.ProcInfo(1, "/sbin/init", "init", "init", 1, 99)
    return picosnitch.Conn(proc, parent, picosnitch.NO_PROC, 1000, "tcp", 40000, rport, "10.0.0.2", raddr, domain,
                           10, 20)


def primary(tmp_path, **settings):
    """A Primary whose directory is tmp_path, with the monitor's side of the
    hash channel answered by a thread (the hash of inode n is n in hex)."""
    config = picosnitch.Config(**settings)
    user = picosnitch.User("me", os.getuid(), os.getgid(), str(tmp_path))
    os.makedirs(user.directory)
    reports = Reports()
    rt = picosnitch.Runtime(config, user, -1, "", "test-run", reports.reporter)
    rt.hash_primary, monitor = picosnitch.Channel.pair()

    def answer():
        while True:
            try:
                request = monitor.recv()
            except EOFError:        # the primary is gone
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
        directory = tmp_path / ".config" / "picosnitch"
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
