"""Section 15, the primary: one window through every sink, with the monitor's
side of the hash pipe answered by a thread."""
import json
import multiprocessing
import os
import threading
import time

import picosnitch
from http_services import API_KEY, FakeVirusTotal, stats

OWNER = (os.getuid(), os.getgid())


def conn(exe, name, ino, rport=443, raddr="192.0.2.1", domain=""):
    proc = picosnitch.ProcInfo(100 + ino, exe, name, f"{name} -x", 1, ino)
    parent = picosnitch.ProcInfo(1, "/sbin/init", "init", "init", 1, 99)
    return picosnitch.Conn(proc, parent, 1000, "tcp", 40000, rport, "10.0.0.2", raddr, domain, 10, 20)


def primary(tmp_path, **settings):
    config = picosnitch.Config(**settings)
    rt = picosnitch.Runtime(config, str(tmp_path), OWNER, -1, "", picosnitch.Reporter(str(tmp_path), OWNER))
    rt.hash_primary, monitor = multiprocessing.Pipe()

    def answer():
        while True:
            try:
                wanted = monitor.recv()
            except EOFError:
                return
            monitor.send({(dev, ino): (f"{ino:064x}", "") for _, dev, ino, _ in wanted})
    threading.Thread(target=answer, daemon=True).start()
    return picosnitch.Primary(rt)


def test_a_window_reaches_every_sink_and_skips_ignored_rows(tmp_path):
    vt = FakeVirusTotal()
    vt.known[f"{7:064x}"] = stats(malicious=1)
    try:
        p = primary(tmp_path, db_text_log=True, log_ignore=[53, "org.example.ignored"], vt_api_key=API_KEY,
                    vt_api_address=vt.base, vt_request_limit_seconds=0, geoip_lookup=False)
        conns = [conn("/usr/bin/curl", "curl", 7), conn("/usr/bin/dig", "dig", 8, rport=53),
                 conn("/usr/bin/wget", "wget", 9, domain="www.ignored.example.org"),
                 conn("", "gone", 10)]                   # an executable whose path is unknown
        p.window(conns)
        rows = picosnitch.db_rows(str(tmp_path / "snitch.db"))
        assert [(r["exe"], r["name"], r["sha256"]) for r in rows] == [("/usr/bin/curl", "curl", f"{7:064x}"),
                                                                       ("", "gone", f"{10:064x}")]
        lines = (tmp_path / "conn.log").read_text().splitlines()
        assert lines == [picosnitch.text_log_line(tuple(r[c] for c in picosnitch.DB_COLUMNS)) for r in rows]
        record = json.loads((tmp_path / "record.json").read_text())
        assert set(record["Executables"]) == {"/usr/bin/curl", "/usr/bin/dig", "/usr/bin/wget"}
        deadline = time.monotonic() + 20
        while "malicious" not in json.dumps(record) and time.monotonic() < deadline:
            time.sleep(0.2)
            p.window([])                                  # verdicts are applied at window ends
            record = json.loads((tmp_path / "record.json").read_text())
        assert record["SHA256"]["/usr/bin/curl"][f"{7:064x}"].startswith("VirusTotal: 1 malicious")
        assert "VirusTotal flags /usr/bin/curl" in (tmp_path / "exe.log").read_text()
        p.close()
    finally:
        vt.close()
