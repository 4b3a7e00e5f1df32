"""record.json, the logs, conn.log and the remote copy's tables (storage; snitch.db is in test_log.py)."""
import json
import os

import pytest

import picosnitch

def test_write_atomic_replaces_and_keeps_private(tmp_path):
    path = str(tmp_path / "record.json")
    picosnitch.write_atomic(path, b"one")
    picosnitch.write_atomic(path, b"two")
    assert open(path, "rb").read() == b"two"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["record.json"]


def test_append_lines_creates_a_log_only_its_owner_writes(tmp_path):
    """0640: who else reads it is for the directory's default ACL to say (test_state.py)."""
    path = str(tmp_path / "error.log")
    picosnitch.append_lines(path, ["first\n"])
    picosnitch.append_lines(path, ["second", "third"])
    assert open(path).read() == "first\nsecond\nthird\n"
    assert os.stat(path).st_mode & 0o777 == 0o640
    os.symlink(path, tmp_path / "link.log")
    with pytest.raises(OSError):
        picosnitch.append_lines(str(tmp_path / "link.log"), ["never through a link"])


def test_damaged_record_is_kept_aside(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("{not json")
    with pytest.raises(picosnitch.PicosnitchError, match="moved to"):
        picosnitch.load_record(str(path))
    aside = [p for p in os.listdir(tmp_path) if p.startswith("record.json.damaged-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).read_text() == "{not json"
    assert picosnitch.load_record(str(path)) == {s: {} for s in picosnitch.RECORD_SECTIONS}


def conn(exe="/usr/bin/curl", name="curl"):
    proc = picosnitch.ProcInfo(10, exe, name, f"{name} https://x", 1, 2)
    parent = picosnitch.ProcInfo(9, "/usr/bin/bash", "bash", "bash", 1, 3)
    grandparent = picosnitch.ProcInfo(8, "/usr/bin/login", "login", "login -p", 1, 4)
    return picosnitch.Conn(proc, parent, grandparent, 1000, "tcp", 40000, 443, "10.0.0.2", "10.0.0.1", "x.org", 5, 6)


def test_record_notes_new_executables_names_and_hashes():
    record = {s: {} for s in picosnitch.RECORD_SECTIONS}
    assert picosnitch.update_record(record, conn(), "aa") == \
        (True, [("program", "/usr/bin/curl", "First network connection detected for curl (/usr/bin/curl)")])
    assert picosnitch.update_record(record, conn(), "aa") == (False, [])
    assert picosnitch.update_record(record, conn(name="curl2"), "aa") == \
        (True, [("name", "curl2", "/usr/bin/curl is running as a new name: curl2")])
    assert picosnitch.update_record(record, conn(), "bb") == \
        (True, [("hash", "bb", "New sha256 for curl (/usr/bin/curl): bb")])
    assert record["Parent Executables"] == {"/usr/bin/bash": ["bash"]}
    assert list(record["SHA256"]["/usr/bin/curl"]) == ["aa", "bb"]
    json.dumps(record)


def test_log_switches_blank_fields():
    config = picosnitch.Config(log_addresses=False, log_commands=False, log_ports=False)
    r = dict(zip(picosnitch.DB_COLUMNS, picosnitch.conn_row(conn(), "t", "aa", "bb", "cc", "x.org", config)))
    assert (r["cmdline"], r["pcmdline"], r["laddr"], r["raddr"], r["lport"], r["rport"]) == ("", "", "", "", None, None)
    r = dict(zip(picosnitch.DB_COLUMNS, picosnitch.conn_row(conn(), "t", "aa", "bb", "cc", "x.org", picosnitch.Config())))
    assert (r["cmdline"], r["raddr"], r["rport"], r["sha256"], r["psha256"]) == ("curl https://x", "10.0.0.1", 443, "aa", "bb")


def test_text_log_line_has_the_spec_fields_in_order_and_strips_separators():
    c = conn(name="cu,rl")
    c.proc.cmdline = "curl\n-d a,b\0c\r"
    row = picosnitch.conn_row(c, "2026-11-21 10:00:00", "aa", "bb", "cc", "x.org", picosnitch.Config())
    line = picosnitch.text_log_line(row)
    assert line == ("2026-11-21 10:00:00,5,6,/usr/bin/curl,curl,curl-d abc,aa,/usr/bin/bash,bash,bash,bb,"
                    "1000,40000,443,10.0.0.2,10.0.0.1,x.org")
    config = picosnitch.Config(log_ports=False, log_addresses=False, log_commands=False)
    line = picosnitch.text_log_line(picosnitch.conn_row(conn(), "t", "", "", "", "", config))
    assert line == "t,5,6,/usr/bin/curl,curl,,,/usr/bin/bash,bash,,,1000,,,,,"
    assert len(picosnitch.TEXT_LOG_FIELDS) == 17


def test_row_queue_keeps_order_across_connections(tmp_path, private_umask):
    queue = picosnitch.RowQueue(str(tmp_path / "q.db"))
    con = queue.open()
    picosnitch.RowQueue.push(con, [("t1", 1), ("t1", 2)])
    picosnitch.RowQueue.push(con, [("t2", 3)])
    con.close()
    con = queue.open()
    assert picosnitch.RowQueue.count(con) == 3
    entry, rows = picosnitch.RowQueue.first(con)
    assert rows == [("t1", 1), ("t1", 2)]
    picosnitch.RowQueue.done(con, entry)
    assert picosnitch.RowQueue.first(con)[1] == [("t2", 3)]
    assert os.stat(tmp_path / "q.db").st_mode & 0o777 == 0o600


def test_remote_schema_uses_only_the_checked_table_name():
    db = picosnitch.RemoteDB({"client": "psycopg2", "table_name": "snitch_log"})
    assert db.schema().startswith("CREATE TABLE IF NOT EXISTS snitch_log (contime TIMESTAMP NOT NULL, send BIGINT")
    assert "uid BIGINT" in db.schema() and "lport INTEGER" in db.schema() and "domain TEXT" in db.schema()
    assert "DATETIME" in picosnitch.RemoteDB({"client": "pymysql"}).schema()
    secrets = picosnitch.sql_secrets({"client": "psycopg", "password": "hunter2", "host": "db", "passwd": "x9"})
    assert picosnitch.without_secrets("login hunter2 failed for x9 at db", secrets) == "login *** failed for *** at db"
