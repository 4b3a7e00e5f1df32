"""Out of the user's reach (notifications, the primary, the state directory and the supervisor): a program running as
the user picosnitch works for tries to silence it, pre-approve itself, erase
its traces and quietly reconfigure it, and another local account tries to
read the log, on real BPF, a real session bus and real throwaway users.
What such a program may do is in bench/reach.py, which measures it."""
import json
import os
import pwd
import re
import sqlite3
import subprocess
import time
import urllib.request

import pytest

import picosnitch
from conftest import (PYTHON, SCRIPT, SYSTEM_PYTHON, Daemon, as_user, bench_reach, dash_started, free_share,
                      notifications, scratch_directory, told_of, wait_for)

KILLING = 60            # seconds the program of the user kills picosnitch's processes of its uid


@pytest.fixture
def user_programs(user_home):
    """A directory for the user's programs with no "picosnitch" in its path
    (the killing program kills whatever names it)."""
    yield from scratch_directory("ps-reach-", 0o755)


def new_program(directory):
    """A program of its own name and sha256 (bench/reach.py's)."""
    return bench_reach.unique_program(directory, SYSTEM_PYTHON)


def user_run(user, *cmd, **kw):
    return subprocess.run(cmd, preexec_fn=as_user(user), cwd="/", capture_output=True, text=True,
                          env={"HOME": user.pw_dir, "PATH": "/usr/bin:/bin"}, **kw)


def user_popen(user, *cmd, **kw):
    return subprocess.Popen(cmd, preexec_fn=as_user(user), cwd="/", stdout=subprocess.PIPE, text=True,
                            env={"HOME": user.pw_dir, "PATH": "/usr/bin:/bin"}, **kw)


def sent(daemon, exe):
    return sum(r["send"] for r in daemon.rows(exe=exe))


def said(bus, text, after=0.0):
    """The notices whose body has text, shown after a time."""
    return [n for n in notifications(bus[1]) if text in n["body"] and n["time"] >= after]


def test_a_program_that_kills_in_a_loop_neither_silences_nor_loses(user_home, user_session_bus, user_programs):
    """It kills every process of its uid that names picosnitch, every 50 ms,
    for 60 s, while a new program of its own sends 300,000 bytes: the row is
    written meanwhile, the notice comes once the killing stops (with the time
    of the connection), each death is on record with its time, and a stop
    5 s after the killing, then a start, lose nothing."""
    daemon = Daemon(user=user_home, env={"DBUS_SESSION_BUS_ADDRESS": user_session_bus[0]}).start()
    killer = None
    try:
        exe = new_program(user_programs)
        # (the sender starts before the killing, and waits for a line to send: between its fork and its
        # exec it has this process's command line, which names picosnitch, and would be killed)
        sender = user_popen(user_home, exe, "-c", "import sys; sys.stdin.readline()\n" + bench_reach.SENDER,
                            str(bench_reach.TOTAL), str(bench_reach.DATAGRAMS), str(KILLING - 15),
                            stdin=subprocess.PIPE)
        killer = user_popen(user_home, SYSTEM_PYTHON, "-c", bench_reach.KILLER, str(KILLING))
        time.sleep(2)
        sender.stdin.write("go\n")
        sender.stdin.close()
        first = float(sender.stdout.readline())
        assert wait_for(lambda: sent(daemon, exe) > 0, 15)
        row = time.time()
        kills = int(killer.communicate(timeout=KILLING + 30)[0].split()[0])
        ended = time.time()
        sender.wait(30)
        assert row - first <= 10 and row < ended and kills >= 100, (row - first, kills)
        assert wait_for(lambda: told_of(user_session_bus[1], exe, daemon.read("exe.log")), 15), \
            "no notice once the killing stopped"
        notice = told_of(user_session_bus[1], exe, daemon.read("exe.log"))[0]
        assert notice["time"] - ended <= 15
        shown_at = re.search(r"\(at (?:\d{4}-\d\d-\d\d )?(\d\d):(\d\d):(\d\d)\)$", notice["body"])   # (a date past midnight)
        assert shown_at, notice["body"]
        connection = time.localtime(first)
        assert abs((int(shown_at[1]) * 3600 + int(shown_at[2]) * 60 + int(shown_at[3]))
                   - (connection.tm_hour * 3600 + connection.tm_min * 60 + connection.tm_sec)) % 86400 <= 5
        assert wait_for(lambda: said(user_session_bus, "was kept from running"), 15)
        # each death on record with its own time (up to 60 a minute, then counted), and all in the summary
        deaths = [line for line in daemon.read("error.log").splitlines()
                  if "the desktop process died (killed by SIGKILL)" in line]
        times = {line[:19] for line in deaths}
        assert len(deaths) >= 20 and len(times) >= 3, deaths[:3]
        summary = re.search(r"was kept from running from (\S+ \S+) to (\S+ \S+) \((\d+) s; (\d+) times killed",
                            daemon.read("error.log"))
        assert summary, daemon.read("error.log")[-2000:]
        assert int(summary[3]) >= KILLING - 15 and len(deaths) <= int(summary[4]) <= kills, (summary[0], kills)
        time.sleep(max(0.0, ended + 5 - time.time()))
        assert daemon.stop() == 0
        daemon.start()
        assert wait_for(lambda: sent(daemon, exe) == bench_reach.TOTAL, 20), sent(daemon, exe)
    finally:
        if killer is not None and killer.poll() is None:      # (it would kill the next tests' helpers)
            killer.kill()
            killer.wait()
        assert daemon.stop() == 0


def test_picosnitch_leaves_a_cgroup_the_user_may_manage(user_home):
    """Started from a user's session, picosnitch sits in the cgroup the user
    manages (systemd delegates it), where the user could freeze or kill it:
    it moves to a cgroup of root's before it starts anything."""
    mount = picosnitch.cgroup2_mount()
    assert mount, "no cgroup v2 hierarchy"
    delegated = os.path.join(mount, f"ps-user-{os.getpid()}")
    os.mkdir(delegated)
    for name in ("", "cgroup.procs"):
        os.chown(os.path.join(delegated, name), user_home.pw_uid, user_home.pw_gid)
    enter = ["sh", "-c", f'echo $$ > {delegated}/cgroup.procs && exec "$@"', "sh"]
    daemon = Daemon(user=user_home, config={"Desktop notifications": False}, wrap=enter)
    try:
        daemon.start()
        pids = [daemon.proc.pid, *json.load(open(picosnitch.STATUSFILE))["children"].values()]
        for pid in pids:
            assert open(f"/proc/{pid}/cgroup").read().splitlines()[-1] == f"0::/{picosnitch.CGROUP_NAME}", pid
        assert os.stat(os.path.join(mount, picosnitch.CGROUP_NAME)).st_uid == 0
    finally:
        daemon.stop()
        os.rmdir(delegated)


def test_a_record_the_user_edits_preapproves_nothing(user_home, user_session_bus, user_programs):
    daemon = Daemon(user=user_home, env={"DBUS_SESSION_BUS_ADDRESS": user_session_bus[0]}).start()
    try:
        daemon.stop()
        exe = new_program(user_programs)
        record = os.path.join(daemon.dir, "record.json")
        refused = user_run(user_home, SYSTEM_PYTHON, "-c", "import sys; open(sys.argv[1], 'a')", daemon.path("record.json"))
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        edit = user_run(user_home, SYSTEM_PYTHON, "-c", bench_reach.PREAPPROVE, record, exe,
                        bench_reach.sha256_of(exe))
        assert edit.stdout.strip() == "replaced", edit.stderr          # (the link, by a file of the user's)
        started = time.time()
        daemon.start()
        user_run(user_home, exe, "-c", bench_reach.SENDER, "1000", "1", "0", check=True)
        assert wait_for(lambda: told_of(user_session_bus[1], f"First network connection detected for "
                                f"{os.path.basename(exe)} ({exe})", daemon.read("exe.log"), started), 20), \
            daemon.read("error.log") + "\n".join(daemon.lines)
        assert wait_for(lambda: exe in json.load(open(daemon.private("record.json")))["Executables"])
    finally:
        daemon.stop()


ATTEMPTS = r"""
import json, os, sys
state = sys.argv[1]
def replace(path):
    other = os.path.join(os.path.dirname(path), ".planted")
    open(other, "w").close()
    os.replace(other, path)
acts = {"write": lambda p: open(p, "a").write("x"), "truncate": lambda p: os.truncate(p, 0), "replace": replace,
        "delete": os.unlink, "chmod": lambda p: os.chmod(p, 0o666), "rename": lambda p: os.rename(p, p + ".x")}
done = {}
for name in sorted(os.listdir(state)) + ["private/record.json", "private/settings.json", "new-file"]:
    for what, act in acts.items():
        try:
            act(os.path.join(state, name))
            done[f"{what} {name}"] = "done"
        except OSError as e:
            done[f"{what} {name}"] = e.strerror
print(json.dumps(done))
"""


def test_the_user_can_change_no_file_of_the_state(user_home, user_programs):
    """Write, truncate, replace, delete, chmod, rename: each refused for
    every file picosnitch keeps, and the log reads back as it was."""
    daemon = Daemon(user=user_home, config={"Desktop notifications": False}).start()
    try:
        exe = new_program(user_programs)
        user_run(user_home, exe, "-c", bench_reach.SENDER, "2345", "1", "0", check=True)
        assert wait_for(lambda: sent(daemon, exe) == 2345, 20)
        before = picosnitch.db_rows(daemon.path("snitch.db"))
        out = user_run(user_home, SYSTEM_PYTHON, "-c", ATTEMPTS, daemon.state)
        done = json.loads(out.stdout)
        assert {"snitch.db", "snitch.db-wal", "record.json", "exe.log"} <= {key.split(" ", 1)[1] for key in done}
        assert [key for key, result in done.items() if result == "done"] == [], done
        deleted = user_run(user_home, SYSTEM_PYTHON, "-c", "import sqlite3, sys; con = sqlite3.connect(sys.argv[1]); "
                           "con.execute('DELETE FROM conns'); con.commit()", daemon.path("snitch.db"))
        assert deleted.returncode != 0 and "readonly" in deleted.stderr
        assert picosnitch.db_rows(daemon.path("snitch.db")) == before
    finally:
        assert daemon.stop() == 0


def test_a_weakening_change_of_settings_is_told_at_the_next_start(user_home, user_session_bus, user_programs):
    daemon = Daemon(user=user_home, env={"DBUS_SESSION_BUS_ADDRESS": user_session_bus[0]}).start()
    try:
        daemon.stop()
        exe = new_program(user_programs)
        sha = bench_reach.sha256_of(exe)
        user_run(user_home, SYSTEM_PYTHON, "-c", bench_reach.RECONFIGURE, daemon.path("config.json"), sha, check=True)
        started = time.time()
        daemon.start()
        for change in ('"Desktop notifications" turned off', f'"Log ignore" gained "{sha}"'):
            assert wait_for(lambda: said(user_session_bus, f"a change of settings weakens monitoring: {change}",
                                         started), 15), change
            assert change in daemon.read("error.log")
        status = subprocess.run([PYTHON, SCRIPT, "status"], capture_output=True, text=True,
                                preexec_fn=as_user(user_home), env=dict(os.environ, HOME=user_home.pw_dir))
        assert "warnings at the start: 2 (in error.log" in status.stdout and sha not in status.stdout
        user_run(user_home, exe, "-c", bench_reach.SENDER, "1000", "1", "0", check=True)
        time.sleep(3)
        assert not said(user_session_bus, exe, started)          # (the settings do apply)
        daemon.stop()
        daemon.start()                                           # told once: nothing changed since
        time.sleep(3)
        assert len(said(user_session_bus, "weakens monitoring", started)) == 2
    finally:
        daemon.stop()


def test_a_config_json_the_user_breaks_does_not_keep_picosnitch_from_starting(user_home):
    """Bad JSON, or a FIFO no one writes (reading it would wait forever):
    each is reported, and picosnitch starts with the settings of its last start."""
    daemon = Daemon(user=user_home, config={"Desktop notifications": False}).start()
    try:
        daemon.stop()
        user_run(user_home, SYSTEM_PYTHON, "-c", "import sys; open(sys.argv[1], 'w').write('{nope')",
                 daemon.path("config.json"), check=True)
        daemon.start()
        assert "config.json: invalid JSON at line 1 column 2" in daemon.read("error.log")
        assert "picosnitch runs with the settings of its last start" in daemon.read("error.log")
        daemon.stop()
        user_run(user_home, "sh", "-c", f"rm {daemon.path('config.json')} && mkfifo {daemon.path('config.json')}",
                 check=True)
        daemon.start(timeout=60)
        assert "config.json: not a regular file; picosnitch runs with the settings of its last start" in \
            daemon.read("error.log")
    finally:
        daemon.stop()


FETCH = bench_reach.FETCH


def fetch_as(user, url):
    out = subprocess.run([SYSTEM_PYTHON, "-c", FETCH, url], capture_output=True, text=True, cwd="/",
                         preexec_fn=as_user(user), env={"PATH": "/usr/bin:/bin", "no_proxy": "*"})
    head, _, body = out.stdout.partition("\n")
    return head, body


def test_another_account_gets_nothing_from_dash(user_home, user_programs):
    """picosnitch dash on loopback, run by the user: another local account,
    without the token, gets 403 and no data; the address it printed works."""
    daemon = Daemon(user=user_home, config={"Desktop notifications": False}).start()
    try:
        exe = new_program(user_programs)
        user_run(user_home, exe, "-c", bench_reach.SENDER, "1000", "1", "0", check=True)
        assert wait_for(lambda: sent(daemon, exe) == 1000, 20)
    finally:
        daemon.stop()
    port = 5180 + os.getpid() % 10
    proc, address, line = dash_started([PYTHON, SCRIPT, "dash"], preexec_fn=as_user(user_home), cwd="/",
                                       env=dict(os.environ, HOME=user_home.pw_dir, STATE_DIRECTORY=daemon.state,
                                                HOST="127.0.0.1", PORT=str(port)))
    nobody = pwd.getpwnam("nobody")
    try:
        assert address, line
        base = f"http://127.0.0.1:{port}"
        for path in ("/", "/_dash-layout", "/_dash-dependencies"):
            code, body = fetch_as(nobody, base + path)
            assert code == "403" and os.path.basename(exe) not in body and "connections" not in body, (path, body)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        with opener.open(address, timeout=10) as answer:       # (its cookie, then the page)
            assert answer.status == 200 and b"<title>picosnitch</title>" in answer.read()
    finally:
        proc.terminate()
        proc.wait(30)


def legacy_logs(directory, layout, user):
    """An older picosnitch's files in ~/.config/picosnitch/, the user's: a
    log in `layout` ("v4": this picosnitch's, "1.0.3": upstream's), record
    and history. The rows as DB_COLUMNS tuples."""
    rows = [(f"2026-11-{1 + i % 28:02d} 10:{i % 60:02d}:00", 100 + i, 200 + i, f"/usr/bin/old{i % 7}", f"old{i % 7}",
             f"old{i % 7} --run {i}", f"{i % 7:064x}", "/bin/sh", "sh", "sh -c old", "cd" * 32, 1000, 40000 + i % 999,
             443, "10.0.0.2", f"10.0.{i % 250}.1", f"old{i % 13}.example") for i in range(5000)]
    db = os.path.join(directory, "snitch.db")
    if layout == "1.0.3":
        con = sqlite3.connect(db)
        con.execute(UPSTREAM_1_0_3)
        con.executemany(f"INSERT INTO connections VALUES ({','.join('?' * 17)})", rows)
        con.commit()
        con.close()
    else:
        rows = [r + ("udp", "/sbin/init", "init", "init", "ef" * 32) for r in rows]
        log = picosnitch.Log.open(db)
        log.insert(rows)
        log.close()
    record = {"Executables": {"/usr/bin/old0": ["old0"]}, "Names": {"old0": ["/usr/bin/old0"]},
              "Parent Executables": {}, "Parent Names": {}, "SHA256": {"/usr/bin/old0": {f"{0:064x}": "x"}}}
    with open(os.path.join(directory, "record.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(directory, "exe.log"), "w") as f:
        f.write("2026-11-01 10:00:00 First network connection detected for old0 (/usr/bin/old0)\n")
    for name in os.listdir(directory):
        os.chown(os.path.join(directory, name), user.pw_uid, user.pw_gid)
    return rows


UPSTREAM_1_0_3 = ("CREATE TABLE connections (contime text, send integer, recv integer, exe text, name text, "
                  "cmdline text, sha256 text, pexe text, pname text, pcmdline text, psha256 text, uid integer, "
                  "lport integer, rport integer, laddr text, raddr text, domain text)")


def read_back(daemon, width):
    """The old rows, through the connections view, as a user reads them."""
    con = sqlite3.connect(f"file:{daemon.path('snitch.db')}?mode=ro", uri=True, timeout=10)
    try:
        found = con.execute(f"SELECT {', '.join(picosnitch.DB_COLUMNS[:width])} FROM connections "
                            "WHERE exe LIKE '/usr/bin/old%'").fetchall()
    finally:
        con.close()
    return sorted(found)


def compact(db):
    """Whether the log has no old table left and fewer than 5% of its pages free."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        if con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (picosnitch.LEGACY_TABLE,)).fetchone():
            return False
    finally:
        con.close()
    return free_share(db) < 0.05


@pytest.mark.parametrize("layout", ["v4", "1.0.3"])
def test_an_old_log_moves_over_once_and_whole_even_after_a_stop_halfway(user_home, layout):
    """The files an older picosnitch kept in ~/.config/picosnitch/ move to
    the state directory once: every row reads back equal; a copy a stop cut
    short is made again; the old names become links; a second start moves
    and counts nothing twice."""
    daemon = Daemon(user=user_home, config={"Desktop notifications": False})
    rows = legacy_logs(daemon.dir, layout, user_home)
    width = len(rows[0])
    daemon.plant(os.path.join(daemon.state, ".moving-snitch.db"), b"SQLite format 3\0 cut short by a stop")
    daemon.start()
    try:
        assert wait_for(lambda: read_back(daemon, width) == sorted(rows), 60)
        assert wait_for(lambda: compact(daemon.path("snitch.db")), 60)      # (the old table's space given back)
        assert read_back(daemon, width) == sorted(rows)
    finally:
        assert daemon.stop() == 0
    assert not os.path.exists(os.path.join(daemon.state, ".moving-snitch.db"))
    assert not os.path.exists(daemon.path("snitch.db") + picosnitch.COMPACT_SUFFIX)
    for name in ("snitch.db", "record.json", "exe.log"):
        assert os.readlink(os.path.join(daemon.dir, name)) == daemon.path(name)
    # the user could write the old record: it is kept, but decides nothing
    assert "/usr/bin/old0" in json.load(open(daemon.private(picosnitch.IMPORTED_NAME)))["Executables"]
    assert "/usr/bin/old0" not in json.load(open(daemon.private("record.json")))["Executables"]
    assert daemon.read("exe.log").startswith("2026-11-01 10:00:00 First network connection detected for old0")
    daemon.start()
    try:
        assert read_back(daemon, width) == sorted(rows)
    finally:
        assert daemon.stop() == 0
    assert read_back(daemon, width) == sorted(rows)
