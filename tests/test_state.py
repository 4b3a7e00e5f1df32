"""The state directory, in-process: who may read it, the move of
an older picosnitch's files (cut short, then done), the links left in their
place, and the settings a start runs with (the configuration's weakened among them).
The same end to end, with real users, is in test_reach_e2e.py."""
import json
import os
import sqlite3
import struct
import subprocess

import pytest

import picosnitch


def test_an_acl_names_the_owner_one_reader_and_no_one_else():
    raw = picosnitch.posix_acl(6, {1000: 4})
    version, = struct.unpack_from("<I", raw)
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    none = picosnitch.ACL_NO_ID
    assert version == 2 and entries == [(picosnitch.ACL_USER_OBJ, 6, none), (picosnitch.ACL_USER, 4, 1000),
                                        (picosnitch.ACL_GROUP_OBJ, 0, none), (picosnitch.ACL_MASK, 4, none),
                                        (picosnitch.ACL_OTHER, 0, none)]
    assert len(picosnitch.posix_acl(7, {})) == 4 + 3 * 8          # no reader: no mask either


def test_a_shared_directory_is_read_by_its_reader_and_what_is_made_in_it_too(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    picosnitch.share_with(fd, {4321}, True)
    os.close(fd)
    picosnitch.append_lines(str(directory / "exe.log"), ["a line"])
    picosnitch.write_atomic(str(directory / "record.json"), b"{}", 0o640)
    sqlite3.connect(directory / "snitch.db").execute("CREATE TABLE t (x)")
    for name in ("", "exe.log", "record.json", "snitch.db"):
        acl = subprocess.run(["getfacl", "-cpn", str(directory / name)], capture_output=True, text=True).stdout
        assert "user:4321:r" in acl and "other::---" in acl and "group::---" in acl, (name, acl)
        assert "mask::r" in acl, (name, acl)


def test_a_state_directory_must_sit_where_only_root_can_change_the_way(tmp_path):
    picosnitch.check_ancestors("/var/lib/picosnitch")
    picosnitch.check_ancestors("/var/tmp/state")           # (sticky: no one can swap another's entry)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)           # writable by anyone, not sticky: a link could be swapped in
    with pytest.raises(picosnitch.PicosnitchError, match="writable by others than root"):
        picosnitch.check_ancestors(str(open_dir / "state"))
    os.chown(open_dir, 65534, 65534)
    os.chmod(open_dir, 0o755)
    with pytest.raises(picosnitch.PicosnitchError, match="uid 65534's"):
        picosnitch.check_ancestors(str(open_dir / "state"))


def legacy(tmp_path):
    """An older picosnitch's directory, with a log that has a -wal, and the
    files open as open_legacy opens them."""
    directory = tmp_path / "home"
    directory.mkdir()
    con = sqlite3.connect(directory / "snitch.db")
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50_000)])
    con.commit()                    # (the rows are in the -wal while this connection is open)
    (directory / "record.json").write_text('{"Executables": {}}')
    (directory / "exe.log").write_text("2026-11-01 10:00:00 a line\n")
    os.symlink("/etc/shadow", directory / "conn.log")          # a link is never opened
    names, fds = picosnitch.open_legacy(str(directory))
    return directory, dict(zip(names, fds)), con


def state_dir(tmp_path):
    state = tmp_path / "state"
    (state / picosnitch.PRIVATE_NAME).mkdir(parents=True)
    return state


def test_the_move_copies_once_and_a_copy_cut_short_is_made_again(tmp_path, monkeypatch):
    directory, files, con = legacy(tmp_path)
    state = state_dir(tmp_path)
    assert set(files) == {"snitch.db", "snitch.db-wal", "record.json", "exe.log"}
    pread, calls = os.pread, []

    def cut_short(fd, size, offset):       # the second read of the copy of the -wal fails: a stop
        calls.append(fd)
        if fd == files["snitch.db-wal"] and calls.count(fd) == 2:
            raise KeyboardInterrupt
        return pread(fd, size, offset)
    monkeypatch.setattr(os, "pread", cut_short)
    with pytest.raises(KeyboardInterrupt):
        picosnitch.move_in(str(state), files, str(directory))
    assert (state / ".moving-snitch.db-wal").stat().st_size > 0
    assert not (state / "snitch.db-wal").exists() and not (state / "snitch.db").exists()
    assert not (state / picosnitch.PRIVATE_NAME / picosnitch.MOVED_NAME).exists()
    monkeypatch.setattr(os, "pread", pread)
    moved, why = picosnitch.move_in(str(state), files, str(directory))
    assert set(moved["files"]) == set(files) and moved["from"] == str(directory) and why == ""
    assert not (state / ".moving-snitch.db-wal").exists()
    assert (state / picosnitch.PRIVATE_NAME / picosnitch.IMPORTED_NAME).read_text() == '{"Executables": {}}'
    assert (state / "exe.log").read_text() == "2026-11-01 10:00:00 a line\n"
    assert sqlite3.connect(state / "snitch.db").execute("SELECT count(*), sum(x) FROM t").fetchone() == \
        (50_000, sum(range(50_000)))
    (directory / "exe.log").write_text("changed since\n")
    assert picosnitch.move_in(str(state), files, str(directory)) == (moved, "")        # once
    assert (state / "exe.log").read_text() == "2026-11-01 10:00:00 a line\n"
    con.close()


def test_what_was_moved_makes_way_for_links_and_nothing_else_does(tmp_path):
    directory, files, con = legacy(tmp_path)
    con.close()                     # (the -wal goes into the database: the old files change)
    names, fds = picosnitch.open_legacy(str(directory))
    state = state_dir(tmp_path)
    moved, _ = picosnitch.move_in(str(state), dict(zip(names, fds)), str(directory))
    (directory / "error.log").write_text("the user's own file, never moved\n")
    picosnitch.link_state(str(directory), str(state), moved)
    for name in ("snitch.db", "record.json", "exe.log"):
        assert os.readlink(directory / name) == str(state / name)
    assert (directory / "error.log").read_text() == "the user's own file, never moved\n"
    assert os.readlink(directory / "conn.log") == "/etc/shadow"              # the user's own link stays
    assert not (directory / "snitch.db-wal").exists() and not (directory / "snitch.db-shm").exists()
    assert sorted(os.listdir(directory)) == ["conn.log", "error.log", "exe.log", "record.json", "snitch.db"]


def test_the_settings_a_start_runs_with_and_what_it_says_of_them():
    before = picosnitch.Config(log_ignore=[53], db_text_log=True, db_sql_server={"client": "pymysql", "host": "a"})
    text = json.dumps({"Log ignore": [53, 443, "com.example"], "DB text log": False, "DB retention (days)": 7,
                       "DB sql server": {"client": "pymysql", "host": "b"}})
    config, said = picosnitch.settle_settings(text, "", before)
    assert config.log_ignore == [53, 443, "com.example"] and said == [
        f"a change of settings weakens monitoring: {change} (since the last start)" for change in (
            '"DB retention (days)" changed from 30 to 7', '"DB sql server" changed', '"DB text log" turned off',
            '"Log ignore" gained 443, "com.example"')]
    assert picosnitch.settle_settings(text, "", config) == (config, [])          # said once
    assert picosnitch.settle_settings(text, "", None) == (config, [])            # a first start
    stronger = json.loads(picosnitch.config_to_json(config))
    stronger.update({"Every exe (not just conns)": True, "Log ignore": [53], "DB retention (days)": 60,
                     "DB write limit (seconds)": 5, "Perf ring buffer (pages)": 512, "Dash theme": "darkly"})
    assert picosnitch.settle_settings(json.dumps(stronger), "", config)[1] == []
    weaker = dict(stronger, **{"VT API key": "k" * 64, "Set st_dev mask": 0, "GeoIP lookup": False,
                               "DB write limit (seconds)": 600})
    assert [line.split(": ", 1)[1] for line in picosnitch.settle_settings(json.dumps(weaker), "", config)[1]] == [
        f"{change} (since the last start)" for change in (
            '"DB write limit (seconds)" changed from 10 to 600', '"GeoIP lookup" turned off',
            '"Set st_dev mask" changed from null to 0', '"VT API key" changed')]     # (a secret is not repeated)
    assert picosnitch.weakened(picosnitch.Config(), picosnitch.Config(desktop_notifications=False)) == \
        ['"Desktop notifications" turned off']


def test_settings_that_cannot_be_used_leave_the_last_ones_in_force():
    last = picosnitch.Config(db_write_limit_seconds=3)
    config, said = picosnitch.settle_settings("{nope", "", last, "/home/u/.config/picosnitch/config.json")
    assert config == last and said == ["/home/u/.config/picosnitch/config.json: invalid JSON at line 1 column 2: "
                                       "Expecting property name enclosed in double quotes; picosnitch runs with the "
                                       "settings of its last start"]
    config, said = picosnitch.settle_settings("", "/home/u/.config/picosnitch is a symbolic link", last)
    assert config == last and said[0].startswith("/home/u/.config/picosnitch is a symbolic link; ")
    with pytest.raises(picosnitch.PicosnitchError, match="unknown key 'nope'"):
        picosnitch.settle_settings('{"nope": 1}', "", None)        # a first start: nothing to fall back on


def test_a_late_notice_says_when_it_happened_and_a_summary_says_what_befell():
    happened = 1_765_000_000.0
    notice = picosnitch.Notice(1, happened, "picosnitch", "First network connection detected for x (/x)")
    assert picosnitch.notice_body(notice, happened + 1) == notice.body
    late = picosnitch.notice_body(notice, happened + 60)
    assert late == f"{notice.body} (at {picosnitch.time.strftime('%H:%M:%S', picosnitch.time.localtime(happened))})"
    assert picosnitch.notice_body(notice, happened + 3 * 86400).endswith(f"(at {picosnitch.dated(happened)})")
    what = picosnitch.Interference(happened, happened + 61, 300, 1)
    assert what.summary("desktop") == (
        f"the desktop process, which runs as the user, was kept from running from {picosnitch.dated(happened)} to "
        f"{picosnitch.dated(happened + 61)} (61 s; 300 times killed and 1 time stopped); it was restarted each time, "
        "and what could not be shown then follows, with the time it happened")


def test_an_old_log_keeps_no_trigger_view_or_index_of_anyone_else(tmp_path):
    """A log copied from where its user could change it: what would hide
    rows from now on (a trigger), a view, an index not picosnitch's, goes;
    the next open makes the view and its trigger again."""
    path = str(tmp_path / "snitch.db")
    log = picosnitch.Log.open(path)
    log.insert([("2026-11-01 10:00:00", 1, 2, "/usr/bin/old", "old", "", "", "", "", "", "", 0, 1, 2, "", "", "",
                 "udp", "", "", "", "")])
    with log.con:
        log.con.execute("CREATE TRIGGER hide BEFORE INSERT ON conns WHEN (SELECT exe FROM procs WHERE id = NEW.proc) "
                        "LIKE '/tmp/evil%' BEGIN SELECT RAISE(IGNORE); END")
        log.con.execute("CREATE VIEW mine AS SELECT 1")
        log.con.execute("CREATE UNIQUE INDEX one_row_a_proc ON conns (proc)")
    log.close()
    said = picosnitch.defuse_log(path)
    assert said.startswith("the log moved in from ~/.config had schema objects picosnitch did not make; dropped: ")
    assert sorted(said.split(": ")[-1].split(", ")) == ["hide", "mine", "one_row_a_proc"]
    log = picosnitch.Log.open(path)
    log.insert([("2026-11-01 10:00:01", 3, 4, "/tmp/evil", "evil", "", "", "", "", "", "", 0, 1, 2, "", "", "", "udp",
                 "", "", "", ""), ("2026-11-01 10:00:02", 5, 6, "/usr/bin/old", "old", "", "", "", "", "", "", 0, 1, 2,
                                   "", "", "", "udp", "", "", "", "")])
    log.close()
    assert sorted(r["exe"] for r in picosnitch.db_rows(path)) == ["/tmp/evil", "/usr/bin/old", "/usr/bin/old"]
    con = sqlite3.connect(path)
    assert {n for n, in con.execute("SELECT name FROM sqlite_master WHERE type IN ('trigger', 'view')")} == \
        {"connections", "connections_insert"}
    con.execute(f"PRAGMA user_version = {picosnitch.SCHEMA_VERSION + 1}")
    con.close()
    assert "put aside" in picosnitch.defuse_log(path) and not os.path.exists(path)


def test_a_move_that_does_not_fit_waits_for_room(tmp_path, monkeypatch):
    directory, files, con = legacy(tmp_path)
    state = state_dir(tmp_path)
    monkeypatch.setattr(picosnitch, "MOVE_ROOM", 1 << 62)
    moved, why = picosnitch.move_in(str(state), files, str(directory))
    assert moved == {} and "do not fit" in why and os.listdir(state) == [picosnitch.PRIVATE_NAME]
    monkeypatch.setattr(picosnitch, "MOVE_ROOM", 0)
    moved, why = picosnitch.move_in(str(state), files, str(directory))
    assert set(moved["files"]) == set(files) and why == ""
    con.close()


def test_a_fifo_a_device_or_a_huge_file_is_no_config(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file"):
        picosnitch.read_regular(str(tmp_path / "fifo"), 100)         # (without waiting for a writer)
    with pytest.raises(ValueError, match="not a regular file"):
        picosnitch.read_regular("/dev/zero", 100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match="101 bytes, more than the 100"):
        picosnitch.read_regular(str(tmp_path / "big"), 100)
    assert picosnitch.read_regular(str(tmp_path / "big"), 101) == b"x" * 101


def test_work_as_another_account_that_stalls_or_dies_is_an_error(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("run_as changes accounts as root only")
    nobody = picosnitch.User("nobody", 65534, 65534, "/nonexistent")
    monkeypatch.setattr(picosnitch, "RUN_AS_TIMEOUT", 1.0)
    with pytest.raises(picosnitch.PicosnitchError, match="the helper running as nobody did not answer in 1 s"):
        picosnitch.run_as(nobody, lambda: picosnitch.time.sleep(30))
    with pytest.raises(picosnitch.PicosnitchError, match="the helper running as nobody died"):
        picosnitch.run_as(nobody, lambda: os.kill(os.getpid(), 9))
    assert picosnitch.run_as(nobody, os.getuid) == 65534


def test_only_an_empty_directory_of_roots_is_taken_for_the_state(tmp_path):
    account = picosnitch.User("nobody", 65534, 65534, "/nonexistent")
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("of root's")
    with pytest.raises(picosnitch.PicosnitchError, match="it belongs to uid 0 and is not empty"):
        picosnitch.owned_directory(str(full), account)
    assert os.stat(full).st_uid == 0
    os.close(picosnitch.owned_directory(str(tmp_path / "new"), account))
    assert os.stat(tmp_path / "new").st_uid == 65534
