"""`picosnitch view` (the terminal viewer) driven in tmux: keys sent with send-keys,
the screen read with capture-pane after each, against a generated snitch.db
and against one written by a running daemon."""
import datetime
import os
import pathlib
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid

import pytest

import loggen
import mmdb
import picosnitch
from conftest import PEER_V4, PYTHON, SCRIPT, Daemon, need_root, unique_python
from test_log_e2e import traffic

NOBODY = 65534
NO_GEOIP = "no GeoIP database yet; countries are not shown"
KEY_NAMES = {"down": "Down", "up": "Up", "left": "Left", "right": "Right", "enter": "Enter", "space": "Space",
             "backspace": "BSpace", "home": "Home", "end": "End", "pgdn": "NPage", "pgup": "PPage"}


class Tmux:
    """A private tmux server running one command in an 80x24 window."""

    def __init__(self, command, width=80, height=24):
        self.socket = f"pst{uuid.uuid4().hex[:8]}"
        # keep the pane after the program ends, so that its last words can be read
        shell = f"{command}; echo \"view exited with status $?\"; sleep 600"
        self.tmux("new-session", "-d", "-s", "view", "-x", str(width), "-y", str(height), shell)
        self.last = ""

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "view")

    def wait(self, text, timeout=60):
        """The screen once it shows text (a string, or a predicate on the screen)
        and stays the same for a moment."""
        test = text if callable(text) else (lambda s: text in s)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.last = self.screen()
            if test(self.last):
                time.sleep(0.15)            # and once the drawing has settled
                if self.screen() == self.last:
                    return self.last
                continue
            if "view exited with status" in self.last:
                break
            time.sleep(0.1)
        raise AssertionError(f"screen never showed {text!r}:\n{self.last}")

    def press(self, key, then):
        """Send one key and wait for the screen to show `then`."""
        self.tmux("send-keys", "-t", "view", KEY_NAMES.get(key, key))
        return self.wait(then)

    def resize(self, width, height):
        self.tmux("resize-window", "-t", "view", "-x", str(width), "-y", str(height))

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def body(screen):
    """The entry lines: between the column header and the help line."""
    lines = screen.splitlines()
    return [line.rstrip() for line in lines[3:-1] if line.strip()]


def row(contime, exe, send, recv, domain="example.org", raddr="192.0.2.10", rport=443, uid=0):
    name = os.path.basename(exe)
    return (contime, send, recv, exe, name, f"{name} --flag", "ab" * 32, "/usr/bin/bash", "bash", "bash",
            "cd" * 32, uid, 40000, rport, "10.0.0.2", raddr, domain, "tcp", "/usr/bin/login", "login", "login",
            "ef" * 32)


def at(**delta):
    return (datetime.datetime.now() - datetime.timedelta(**delta)).strftime(picosnitch.TIME_FORMAT)


CAPTURES = pathlib.Path("/var/tmp/picosnitch-captures")


@pytest.fixture
def home():
    """A home of user nobody (outside pytest's private temporary directory),
    with its settings, and beside them a state directory nobody may read."""
    home = pathlib.Path(tempfile.mkdtemp(prefix="ps-view-"))
    directory = home / ".config" / "picosnitch"
    directory.mkdir(parents=True)
    (home / "state").mkdir()
    (directory / "config.json").write_text('{"GeoIP lookup": false}')
    for path in (home, home / ".config", directory, directory / "config.json", home / "state"):
        os.chown(path, NOBODY, NOBODY)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def make_db(home, rows, raw=()):
    """snitch.db in home's state directory with rows (through picosnitch's
    storage) and raw SQL inserts (into the connections view, as a script
    would), left as a stopped picosnitch leaves it."""
    path = str(home / "state" / "snitch.db")
    log = picosnitch.Log.open(path)
    log.insert(rows)
    for sql, params in raw:
        with log.con:
            log.con.execute(sql, params)
    log.close(readable=True)
    for name in os.listdir(os.path.dirname(path)):
        os.chown(os.path.join(os.path.dirname(path), name), NOBODY, NOBODY)
    return path


def make_old_db(home, rows):
    """snitch.db in the layout of picosnitch 1.0.3, as a log not yet opened by
    this version is (no WAL: a writer's lock keeps readers out)."""
    path = str(home / "state" / "snitch.db")
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE connections (contime text, send integer, recv integer, exe text, name text, "
                "cmdline text, sha256 text, pexe text, pname text, pcmdline text, psha256 text, uid integer, "
                "lport integer, rport integer, laddr text, raddr text, domain text)")
    con.executemany(f"INSERT INTO connections VALUES ({','.join('?' * 17)})", [r[:17] for r in rows])
    con.commit()
    con.close()
    os.chown(path, NOBODY, NOBODY)
    return path


def view(home, user=NOBODY, width=80, height=24):
    """picosnitch view as user nobody (it needs no root) with HOME and the state directory set."""
    need_root()
    command = (f"cd / && HOME={home} STATE_DIRECTORY={home}/state setpriv --reuid={user} --regid={user} "
               f"--clear-groups {PYTHON} {SCRIPT} view")
    return Tmux(command, width, height)


@pytest.fixture
def sample(home):
    rows = [row(at(seconds=5), "/usr/bin/curl", 3000, 50000),
            row(at(seconds=20), "/usr/bin/ssh", 10000, 2000, domain="git.example.org", raddr="192.0.2.22", rport=22),
            row(at(hours=2), "/usr/bin/curl", 1000, 1000, domain="cdn.example.net", raddr="192.0.2.33"),
            row(at(days=3), "/usr/bin/apt", 500, 900000, domain="deb.example.org", raddr="192.0.2.44", rport=80),
            row(at(days=40), "/usr/bin/old", 7, 7)]
    long_name = "/opt/" + "very-long-directory-name/" * 12 + "tool"
    odd = ("INSERT INTO connections (contime, send, recv, exe, name, uid, lport, rport, raddr, domain) "
           "VALUES (?, 1, 2, CAST(? AS TEXT), CAST(? AS TEXT), 0, NULL, NULL, '', '')")
    raw = [(odd, (at(seconds=30), b"/opt/bad\xffname\x1b[31m", b"bad\xff")),
           (odd, (at(seconds=30), long_name.encode(), b"long"))]
    make_db(home, rows, raw)
    return long_name


def test_keys_change_what_is_shown(sample, home):
    t = view(home)
    try:
        s = t.wait("by executable (1/11)")
        assert "all time" in s and "filters: none" in s
        entries = body(s)
        assert [e.split()[-1] for e in entries[:4]] == ["/usr/bin/apt", "/usr/bin/curl", "/usr/bin/ssh", "/usr/bin/old"]
        assert "900.0 kB" in entries[0] and "4.0 kB" in entries[1] and "51.0 kB" in entries[1]
        assert any("/opt/bad" in e for e in entries) and any("very-long-directory-name" in e for e in entries)
        assert all(len(line) <= 80 for line in s.splitlines())
        assert "q" in s.splitlines()[-1] and "filter" in s.splitlines()[-1]     # the help line

        t.press("down", lambda s: True)
        s = t.press("space", "by name (2/11)")
        assert "filters: executable = /usr/bin/curl" in s
        assert [e.split()[-1] for e in body(s)] == ["curl"]
        s = t.press("right", "by sha256 (3/11)")
        s = t.press("right", "by parent executable (4/11)")
        s = t.press("right", "by parent name (5/11)")
        s = t.press("right", "by domain (6/11)")
        assert [e.split()[-1] for e in body(s)] == ["example.org", "cdn.example.net"]
        s = t.press("f", "filters: executable = /usr/bin/curl > domain = example.org")
        assert "by remote address (7/11)" in s and [e.split()[-1] for e in body(s)] == ["192.0.2.10"]
        s = t.press("backspace", lambda s: "> domain" not in s)
        assert "filters: executable = /usr/bin/curl" in s
        s = t.press("F", "filters: none")

        s = t.press("home", "by remote address")
        s = t.press("e", "filters: remote address ≠ 192.0.2.44")
        assert "192.0.2.44" not in "\n".join(body(s)) and "by remote address (7/11)" in s
        s = t.press("E", "filters: none")
        assert "192.0.2.44" in "\n".join(body(s))
    finally:
        t.close()


def test_a_name_that_would_act_shows_escaped(home):
    """A right-to-left override (U+202E) or an escape sequence in a name
    neither reorders nor recolours the screen: each is shown escaped, as in
    the logs and in dash (a character that acts in any other text is a '?')."""
    make_db(home, [row(at(seconds=5), "/tmp/\u202egpj.exe", 3000, 50), row(at(seconds=6), "/tmp/a\x1b[31mb", 2000, 50)])
    t = view(home)
    try:
        s = t.wait("by executable (1/11)")
        assert [e.split()[-1] for e in body(s)] == ["/tmp/\\u202egpj.exe", "/tmp/a\\x1b[31mb"]
        assert "\u202e" not in s and "\x1b" not in s          # (and "[31m" shows as text: it did not act)
    finally:
        t.close()


def test_time_ranges_history_and_units(sample, home):
    t = view(home)
    try:
        t.wait("by executable (1/11)")
        s = t.press("t", "· minute ")
        assert sorted(e.split()[-1] for e in body(s) if "/usr/bin" in e) == ["/usr/bin/curl", "/usr/bin/ssh"]
        s = t.press("t", "· hour ")
        s = t.press("t", "· day ")
        assert "/usr/bin/apt" not in s and "/usr/bin/curl" in s
        s = t.press("h", "(-1)")
        assert body(s) == []            # nothing happened between two days and one day ago
        s = t.press("h", "(-2)")
        s = t.press("h", "(-3)")
        assert "/usr/bin/apt" in s and "/usr/bin/ssh" not in s
        s = t.press("H", "(-2)")
        s = t.press("T", "· hour ")
        assert "(-" not in s.splitlines()[0]
        s = t.press("T", "· minute ")
        s = t.press("T", "· all time")
        s = t.press("u", "· B")
        assert "900000 B" in s and "500 B" in s
        s = t.press("u", "· kB")
        assert "900.0 kB" in s
        s = t.press("U", "· B")
        s = t.press("U", "· bytes")
        s = t.press("U", "· Gb")
        s = t.press("U", "· Mb")
        assert "7.2 Mb" in s            # 900000 bytes received by apt, in megabits
    finally:
        t.close()


def test_views_cover_every_grouping(sample, home):
    t = view(home)
    try:
        t.wait("by executable (1/11)")
        expected = ["name", "sha256", "parent executable", "parent name", "domain", "remote address",
                    "local port", "remote port", "user", "time", "executable"]
        for i, title in enumerate(expected):
            s = t.press("right", f"by {title} ({(i + 1) % 11 + 1}/11)")
            assert body(s), title
        s = t.press("left", "by time (11/11)")
        assert all(e.split()[-1][:4].isdigit() for e in body(s))
        s = t.press("left", "by user (10/11)")
        assert "root (0)" in s
        s = t.press("left", "by remote port (9/11)")
        assert "(not logged)" in s and any(e.endswith(" 443") for e in body(s))
        s = t.press("left", "by local port (8/11)")       # (the clients' high ports: one entry)
        assert any(e.endswith(" 32768-65535 (clients' ports, together)") for e in body(s))
        assert not any(e.endswith(" 40000") for e in body(s))
        CAPTURES.mkdir(parents=True, exist_ok=True)
        (CAPTURES / "view-local-ports.txt").write_text(s)
    finally:
        t.close()


@pytest.mark.parametrize("database", [True, False])
def test_remote_addresses_with_their_country(sample, home, database):
    (home / ".config" / "picosnitch" / "config.json").write_text('{"GeoIP lookup": true}')
    if database:
        (home / "state" / picosnitch.GEOIP_NAME).write_bytes(mmdb.build({"192.0.2.0/28": "DE", "192.0.2.32/27": "FR"}))
        os.chown(home / "state" / picosnitch.GEOIP_NAME, NOBODY, NOBODY)
    t = view(home)
    try:
        s = t.wait("by executable (1/11)")
        # reported once, whole, in place of the help line
        assert (s.splitlines()[-1].strip() == NO_GEOIP) != database
        for _ in range(6):
            s = t.press("right", lambda s: True)
        s = t.wait("by remote address (7/11)")
        assert NO_GEOIP not in s and "filter" in s.splitlines()[-1]
        if database:
            assert "192.0.2.10 (DE)" in s and "192.0.2.33 (FR)" in s and "192.0.2.44 (FR)" in s
            assert "192.0.2.22 (" not in s
        else:
            assert "192.0.2.10" in s and "(DE)" not in s
    finally:
        t.close()


def test_what_is_wrong_with_the_geoip_database_is_one_short_line(tmp_path):
    """Said in the viewers' one line (view's last row, 80 columns at least),
    as text: no path, no Python repr."""
    said = []
    (tmp_path / "damaged.mmdb").write_bytes(b"not a country database\n")
    for name in ("missing.mmdb", "damaged.mmdb"):
        assert picosnitch.GeoIP(str(tmp_path / name), said.append).country("192.0.2.1") == ""
    assert said == [NO_GEOIP, "the GeoIP database is damaged; countries are not shown"]
    assert all(len(line) <= 80 for line in said)


def test_moves_and_resize_never_break_the_screen(home):
    rows = [row(at(seconds=i), f"/usr/bin/prog{i:03d}", 1000 - i, 0) for i in range(200)]
    make_db(home, rows)
    t = view(home)
    try:
        s = t.wait("by executable (1/11)")
        assert body(s)[0].endswith("/usr/bin/prog000") and len(body(s)) == 20
        s = t.press("pgdn", lambda s: "/usr/bin/prog020" in s)
        s = t.press("end", "/usr/bin/prog199")
        s = t.press("home", "/usr/bin/prog000")
        t.resize(120, 40)
        s = t.wait(lambda s: len(s.splitlines()) == 40 and len(body(s)) == 36)
        t.resize(30, 6)
        s = t.wait(lambda s: len(body(s)) == 2)
        t.resize(10, 3)
        s = t.wait("terminal t")
        t.resize(80, 24)
        s = t.wait(lambda s: len(body(s)) == 20)
        s = t.press("q", "view exited with status 0")
    finally:
        t.close()


@pytest.mark.parametrize("case", ["missing", "empty", "locked"])
def test_a_missing_empty_or_locked_database_gives_a_message(home, case):
    path = home / "state" / "snitch.db"
    messages = {"missing": "no connection log at", "empty": "has no connections yet", "locked": "is locked by a writer"}
    holder = None
    if case == "empty":
        make_db(home, [])
    if case == "locked":
        make_old_db(home, [row(at(seconds=1), "/usr/bin/curl", 1, 1)])
    if case == "locked":
        holder = sqlite3.connect(str(path))
        holder.execute("BEGIN EXCLUSIVE")
    t = view(home)
    try:
        s = t.wait(messages[case])
        assert "Traceback" not in s
        if holder is not None:
            holder.rollback()
            holder.close()
            holder = None
            s = t.press("r", "/usr/bin/curl")
            assert messages[case] not in s
        s = t.press("q", "view exited with status 0")
    finally:
        if holder is not None:
            holder.close()
        t.close()


def test_unreadable_database_is_a_message_not_a_traceback(home):
    path = make_db(home, [row(at(seconds=1), "/usr/bin/curl", 1, 1)])
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)
    t = view(home)
    try:
        s = t.wait("cannot read")
        assert "Traceback" not in s
    finally:
        t.close()


def test_viewing_a_log_written_by_the_daemon(tmp_path, peers, exe_dir):
    need_root()
    d = Daemon(str(tmp_path)).start()
    t = None
    try:
        first = unique_python(exe_dir)
        traffic(first, "tcp-up", PEER_V4, 123456)
        assert d.wait_rows(exe=first)
        t = Tmux(f"cd / && HOME={tmp_path} STATE_DIRECTORY={d.state} {PYTHON} {SCRIPT} view")
        s = t.wait(f"{first}")
        line = next(e for e in body(s) if e.endswith(first))
        assert "123.5 kB" in line          # 123456 bytes and the request line "up 123456\n"
        second = unique_python(exe_dir)
        traffic(second, "tcp-up", PEER_V4, 2000)
        assert d.wait_rows(exe=second)
        assert second not in t.screen()
        s = t.press("r", second)
        s = t.press("right", "by name (2/11)")
        assert os.path.basename(second) in s
    finally:
        if t is not None:
            t.close()
        assert d.stop() == 0
    shutil.rmtree(tmp_path / ".config", ignore_errors=True)


def test_amounts_text_fitting_and_times():
    units = {name: (name, div, bits) for name, div, bits in picosnitch.UNITS}
    assert picosnitch.format_amount(999, units["bytes"]) == "999 B"
    assert picosnitch.format_amount(999_949, units["bytes"]) == "999.9 kB"
    assert picosnitch.format_amount(999_999, units["bytes"]) == "1.0 MB"           # not 1000.0 kB
    assert picosnitch.format_amount(1_500_000, units["bytes"]) == "1.5 MB"
    assert picosnitch.format_amount(1_500_000, units["bits"]) == "12.0 Mb"
    assert picosnitch.format_amount(1_500_000, units["kB"]) == "1500.0 kB"
    assert picosnitch.format_amount(3, units["b"]) == "24 b"
    assert picosnitch.fit("ab\x1b[1m\x00c", 8) == "ab?[1m?c"
    assert picosnitch.fit("数据库名", 5) == "数据 " and picosnitch.fit("x" * 30, 4) == "xxxx"
    assert picosnitch.local_seconds(b"1970-01-02 00:00:01") == 86401
    assert picosnitch.local_seconds("2026-02-30 10:00:00") == "2026-02-30 10:00:00"      # no such day: kept as text
    assert picosnitch.local_seconds(b"yesterday") == b"yesterday" and picosnitch.local_seconds(None) is None


def test_the_viewer_in_process_asks_the_log_for_each_screen(tmp_path):
    """The viewer's state and screen without a terminal: each key that changes
    what is shown asks the query layer again; moves and units do not."""
    path = str(tmp_path / "snitch.db")
    log = picosnitch.Log.open(path)
    log.insert([row(at(seconds=5), "/usr/bin/curl", 3000, 50000), row(at(hours=2), "/usr/bin/curl", 1000, 1000),
                row(at(days=3), "/usr/bin/apt", 500, 900000, domain="deb.example.org")])
    log.close()
    viewer = picosnitch.Viewer(path, None)
    asked = []
    real = picosnitch.LogQuery.totals
    picosnitch.LogQuery.totals = lambda self, *a, **kw: asked.append(a) or real(self, *a, **kw)
    try:
        lines = [text for text, _ in viewer.screen(8, 60)]
        assert lines[0].startswith("by executable (1/11) · all time · bytes")
        assert [line.split()[-1] for line in lines[3:5]] == ["/usr/bin/apt", "/usr/bin/curl"]
        assert "4.0 kB" in lines[4] and "51.0 kB" in lines[4]
        viewer.press("down", 4)
        viewer.press("unit_next", 4)
        viewer.screen(8, 60)
        assert len(asked) == 1                      # neither a move nor a unit asks again
        viewer.press("filter", 4)                   # curl, then by name
        lines = [text for text, _ in viewer.screen(8, 60)]
        assert lines[1].startswith("filters: executable = /usr/bin/curl") and lines[3].split()[-1] == "curl"
        viewer.press("range_next", 4)               # minute: only the newest row
        lines = [text for text, _ in viewer.screen(8, 60)]
        assert "3000 B" in lines[3] and "50000 B" in lines[3]
        assert len(asked) == 3
    finally:
        picosnitch.LogQuery.totals = real
        viewer.close()


def test_while_an_older_log_moves_over_the_viewer_says_how_far(tmp_path):
    """The heading says "moving: N%" while an older log is moved over; a
    compact copy put in the log's place is read from the next refresh on."""
    path = str(tmp_path / "snitch.db")
    loggen.write_legacy(path, 4000, "v1", seed=2, days=2)
    log = picosnitch.Log.open(path)
    while log.meta()["migrated"] < 2000:
        log.migrate(1000)
    viewer = picosnitch.Viewer(path, None)
    assert viewer.screen(8, 120)[0][0].rstrip().endswith(" · bytes · moving: 50%")
    while log.migrate() is not None:
        pass
    viewer.press("refresh", 4)
    assert viewer.screen(8, 120)[0][0].rstrip().endswith(" · bytes")
    copy = picosnitch.compact_copy(path)
    log.insert([row(at(seconds=5), "/usr/bin/late", 3 << 40, 50000)])     # (the first entry)
    picosnitch.catch_up(copy, path)
    assert log.checkpointed()
    log.close()
    picosnitch.replace_log(copy, path)
    viewer.press("refresh", 4)
    screen = "\n".join(text for text, _ in viewer.screen(40, 120))
    assert "/usr/bin/late" in screen, screen
    viewer.close()
