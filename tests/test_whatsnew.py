"""What is new (the novelty events) as the viewers show it: the query both
ask (section 21), `view`'s what's-new list in process and in tmux, with
mutes asked of the daemon (a stand-in that says it is not running) and read
from mutes.json. Dash's what's-new page is tested in a browser in
test_dash_browser.py, against the log built here."""
import datetime
import json
import os
import sqlite3

import pytest

import picosnitch
import test_view
from test_view import CAPTURES, NOBODY, body, row, view

home = test_view.home         # (a fixture: a home of user nobody with its state directory)

HOSTILE_EXE = "/tmp/\u202egpj.exe\x1b[31m"
HOSTILE_DOMAIN = "evil\nexample.org<b>x</b>"


def ago(**delta):
    return (datetime.datetime.now() - datetime.timedelta(**delta)).strftime(picosnitch.TIME_FORMAT)


def event(when, kind, exe, value, name="", sha256="", domain=None, raddr=None, rport=None, country=None, send=0,
          recv=0):
    """A novelty row as Log.insert takes it (NOVELTY_COLUMNS, the time as the window's text)."""
    name = name or os.path.basename(exe)
    text = f"{kind}: {value} for {name} ({exe})"
    return (when, kind, exe, name, sha256 or "ab" * 32, value, domain, raddr, rport,
            country, send, recv, text)


def sample_events():
    """The events of the sample log, newest first, with their ages."""
    return [event(ago(minutes=5), "domain", "/usr/bin/curl", "example.org", domain="www.example.org",
                  raddr="192.0.2.10", rport=443, country="DE", send=3000, recv=50000),
            event(ago(minutes=10), "country", "/usr/bin/curl", "FR", domain="cdn.example.net", raddr="192.0.2.33",
                  rport=443, country="FR", send=1000, recv=1000),
            event(ago(minutes=30), "domain", HOSTILE_EXE, HOSTILE_DOMAIN, name="x\x1b]0;t\x07",
                  raddr="192.0.2.66", rport=443, send=7, recv=7),
            event(ago(hours=1), "volume", "/usr/bin/apt", "received", send=500, recv=900_000_000),
            event(ago(hours=2), "port", "/usr/bin/ssh", "2222", raddr="192.0.2.22", rport=2222, send=10, recv=20),
            event(ago(hours=3), "hash", "/usr/bin/curl", "cd" * 32, sha256="cd" * 32),
            event(ago(days=1), "name", "/usr/bin/ssh", "ssh-agent", name="ssh-agent"),
            event(ago(days=2), "program", "/usr/bin/apt", "/usr/bin/apt", name="apt")]


def sample_rows():
    return [row(ago(minutes=5), "/usr/bin/curl", 3000, 50000), row(ago(hours=1), "/usr/bin/apt", 500, 900000),
            row(ago(hours=2), "/usr/bin/ssh", 10, 20, rport=2222)]


def write_log(path, rows, events):
    """snitch.db at path with rows and novelty events, as a stopped picosnitch leaves it."""
    log = picosnitch.Log.open(str(path))
    log.insert(rows, ("", 0), novelty=events)
    log.close(readable=True)
    return str(path)


def older_layout(path):
    """Make the log at path one of version 4: no novelty table."""
    con = sqlite3.connect(str(path))
    con.execute("DROP TABLE novelty")
    con.execute("PRAGMA user_version = 4")
    con.commit()
    con.close()


@pytest.fixture
def sample(tmp_path):
    return write_log(tmp_path / "snitch.db", sample_rows(), sample_events())


def query(path):
    q = picosnitch.LogQuery(path)
    q.refresh()
    return q


# -- the query -----------------------------------------------------------------

def test_the_query_lists_the_newest_first_with_counts_per_kind(sample):
    q = query(sample)
    found = q.novelty()
    assert [e["kind"] for e in found.events] == ["domain", "country", "domain", "volume", "port", "hash", "name",
                                                 "program"]
    assert found.events[0]["exe"] == "/usr/bin/curl" and found.events[0]["country"] == "DE"
    assert found.events[0]["send"] == 3000 and found.events[0]["rport"] == 443
    assert found.events[2]["exe"] == HOSTILE_EXE and found.events[2]["value"] == HOSTILE_DOMAIN    # exact, as text
    assert isinstance(found.events[0]["t"], int)
    assert found.counts == {"domain": 2, "country": 1, "volume": 1, "port": 1, "hash": 1, "name": 1, "program": 1}
    assert found.programs == ["/usr/bin/curl", HOSTILE_EXE, "/usr/bin/apt", "/usr/bin/ssh"]
    assert found.missing == ""
    q.close()


def test_the_query_filters_by_kind_group_program_and_time(sample):
    q = query(sample)
    destination = q.novelty(picosnitch.NOVELTY_GROUPS["destination"])
    assert [e["kind"] for e in destination.events] == ["domain", "country", "domain", "port"]
    assert destination.counts["hash"] == 1          # (counts are of every kind)
    curl = q.novelty(exe="/usr/bin/curl")
    assert [e["kind"] for e in curl.events] == ["domain", "country", "hash"]
    assert curl.counts == {"domain": 1, "country": 1, "hash": 1} and len(curl.programs) == 4
    assert [e["kind"] for e in q.novelty(("program",), "/usr/bin/apt").events] == ["program"]
    now = picosnitch.now_seconds()
    recent = q.novelty(start=now - 3600 + 60, end=now + 1)
    assert [e["kind"] for e in recent.events] == ["domain", "country", "domain"]
    assert recent.programs == ["/usr/bin/curl", HOSTILE_EXE]
    assert [e["kind"] for e in q.novelty(limit=2).events] == ["domain", "country"]
    q.close()


def test_a_log_without_a_novelty_table_lists_nothing_and_says_why(tmp_path):
    path = write_log(tmp_path / "snitch.db", sample_rows(), [])
    older_layout(path)
    q = query(path)
    found = q.novelty()
    assert found.events == [] and found.counts == {} and found.programs == []
    assert "older layout (version 4)" in found.missing
    q.close()


def test_how_events_and_mutes_are_shown():
    events = {e[1] + e[5][:3]: dict(zip(picosnitch.NOVELTY_COLUMNS, e)) for e in sample_events()}
    assert picosnitch.novelty_what(events["domainexa"]) == "example.org (www.example.org)"
    assert picosnitch.novelty_what(events["countryFR"]) == "FR via cdn.example.net"
    assert picosnitch.novelty_what(events["port222"]) == "port 2222 via 192.0.2.22"
    assert picosnitch.novelty_what(events["program/us"]) == "first connection, as apt"
    assert picosnitch.novelty_what(events["hashcdc"]) == "sha256 " + "cd" * 32
    assert picosnitch.novelty_what(events["domainevi"]) == "evil\\x0aexample.org<b>x</b> (192.0.2.66)"
    assert picosnitch.novelty_destination(events["domainexa"]) == "www.example.org 192.0.2.10:443"
    assert picosnitch.novelty_bytes(events["volumerec"]) == 900_000_000
    assert picosnitch.novelty_bytes(events["domainexa"]) == 53000
    assert [picosnitch.mute_group(k) for k in picosnitch.NOVELTY_KINDS] == \
        [None, "name", "hash", "destination", "destination", "destination", "destination", "volume"]
    assert picosnitch.muted_groups(["domain", "network", "country", "port", "hash"]) == ["destination", "hash"]
    assert picosnitch.muted_groups(["destination", "volume"]) == ["destination", "volume"]
    assert picosnitch.muted_groups(["all"]) == ["all"] and picosnitch.muted_kinds(["domain"]) == {"domain"}
    said = picosnitch.change_mute("/usr/bin/curl", "destination", True)
    assert said.startswith("picosnitch is not running")


def test_mutes_are_read_from_the_state_directory(tmp_path):
    assert picosnitch.read_mutes(str(tmp_path)) == {}
    (tmp_path / picosnitch.MUTES_NAME).write_text(json.dumps({"mutes": {"/usr/bin/curl": ["destination"]}}))
    assert picosnitch.read_mutes(str(tmp_path)) == {"/usr/bin/curl": ["destination"]}
    assert picosnitch.mutes_or_why(str(tmp_path)) == ({"/usr/bin/curl": ["destination"]}, "")
    (tmp_path / picosnitch.MUTES_NAME).write_text("{not json")
    mutes, why = picosnitch.mutes_or_why(str(tmp_path))
    assert mutes == {} and why.startswith(f"{tmp_path / picosnitch.MUTES_NAME} cannot be read")


# -- view's what's new, in process ------------------------------------------------

def screen(viewer, height=24, width=80):
    lines = viewer.screen(height, width)
    assert len(lines) == height and all(len(text) == width for text, _ in lines)
    return [text.rstrip() for text, _ in lines]


def entries(lines):
    """The event lines: between the column header and the detail line."""
    return [line for line in lines[4:-2] if line]


def test_whats_new_in_view_at_80_by_24(sample, tmp_path):
    (tmp_path / picosnitch.MUTES_NAME).write_text(json.dumps({"mutes": {"/usr/bin/ssh": ["destination"]}}))
    viewer = picosnitch.Viewer(sample, None)
    try:
        assert screen(viewer)[-1].startswith("←→ view") and " n new " in screen(viewer)[-1]
        viewer.press("whatsnew", 18)
        lines = screen(viewer)
        assert lines[0] == "what's new · kind: all (1/6) · all time · bytes"
        assert lines[1].startswith("program: any")
        assert lines[2] == "program 1 · name 1 · hash 1 · domain 2 · country 1 · port 1 · volume 1"
        assert lines[3].split() == ["time", "kind", "bytes", "program", "what", "is", "new"]
        shown = entries(lines)
        assert [line.split()[2] for line in shown] == ["domain", "country", "domain", "volume", "port", "hash",
                                                       "name", "program"]
        assert "53.0 kB" in shown[0] and "/usr/bin/curl" in shown[0] and "example.org (www.example" in shown[0]
        assert "900.0 MB" in shown[3] and "received far more" in shown[3]
        assert " M /usr/bin/ssh" in shown[4] and " M " not in shown[6]      # (ssh's destinations are muted)
        assert lines[-2].endswith("domain: example.org for curl (/usr/bin/curl)")
        assert lines[-1].startswith("k/K kind")
        # hostile names: escaped, never a control, a bidi override or a line break on the screen
        hostile = shown[2]
        assert "/tmp/\\u202egpj.exe\\x1b[" in hostile and "evil\\x0aexample.org<b>x<" in hostile
        assert not any(picosnitch.acts(ch) for line in lines for ch in line)
        viewer.press("down", 18)
        viewer.press("down", 18)
        assert "x\\x1b]0;t\\x07" in screen(viewer)[-2]
    finally:
        viewer.close()


def test_whats_new_keys_filter_kind_program_and_ask_for_mutes(sample):
    viewer = picosnitch.Viewer(sample, None)
    try:
        viewer.press("whatsnew", 18)
        viewer.press("kind_next", 18)
        assert [line.split()[2] for line in entries(screen(viewer))] == ["program"]
        viewer.press("kind_next", 18)
        lines = screen(viewer)
        assert lines[0].startswith("what's new · kind: destination (3/6)")
        assert [line.split()[2] for line in entries(lines)] == ["domain", "country", "domain", "port"]
        viewer.press("kind_prev", 18)
        viewer.press("kind_prev", 18)
        viewer.press("filter", 18)                  # the selected event's program: curl
        lines = screen(viewer)
        assert lines[1] == "program: /usr/bin/curl" and lines[2] == "hash 1 · domain 1 · country 1"
        assert [line.split()[2] for line in entries(lines)] == ["domain", "country", "hash"]
        viewer.press("mute", 18)                    # the stand-in: the daemon is not there
        lines = screen(viewer)
        assert lines[-2].startswith("picosnitch is not running")
        viewer.press("end", 18)
        viewer.press("mute", 18)
        assert screen(viewer)[-1].startswith("k/K kind") is False
        viewer.press("undo", 18)
        assert screen(viewer)[1].startswith("program: any") and len(entries(screen(viewer))) == 8
        viewer.press("end", 18)                     # a new program: muted only with everything
        viewer.press("unmute", 18)
        assert "M mutes everything new" in screen(viewer)[-1]
        viewer.press("range_next", 18)              # a minute: nothing new
        assert screen(viewer)[2] == "nothing new in this range" and entries(screen(viewer)) == []
        viewer.press("range_prev", 18)
        viewer.press("whatsnew", 18)
        assert screen(viewer)[0].startswith("by executable")
        viewer.press("mute", 18)
        assert "a key of what's new" in screen(viewer)[-1]
        viewer.press("help", 18)
        assert screen(viewer)[0] == "keys of picosnitch view (any key goes back)"
        assert any(line.startswith("  n ") for line in screen(viewer))
        viewer.press("down", 18)
        assert screen(viewer)[0].startswith("by executable")
    finally:
        viewer.close()


def test_whats_new_of_an_older_log_says_why_it_is_empty(tmp_path):
    path = write_log(tmp_path / "snitch.db", sample_rows(), [])
    older_layout(path)
    viewer = picosnitch.Viewer(path, None)
    try:
        viewer.press("whatsnew", 18)
        lines = screen(viewer)
        assert lines[2] == "nothing new in this range"
        assert lines[4].startswith("nothing new can be listed: this log is in an older layout")
        assert "version 4" in " ".join(lines)
        viewer.press("mute", 18)
        assert screen(viewer)[-1] == "no event selected"
    finally:
        viewer.close()


# -- view's what's new in tmux ---------------------------------------------------

def test_whats_new_in_view_in_tmux(home):
    path = write_log(home / "state" / "snitch.db", sample_rows(), sample_events())
    (home / "state" / picosnitch.MUTES_NAME).write_text(json.dumps({"mutes": {"/usr/bin/ssh": ["all"]}}))
    for name in os.listdir(home / "state"):
        os.chown(os.path.join(home / "state", name), NOBODY, NOBODY)
    assert path
    t = view(home)
    try:
        t.wait("by executable (1/11)")
        s = t.press("n", "what's new · kind: all (1/6)")
        lines = s.splitlines()
        assert all(len(line) <= 80 for line in lines) and len(lines) == 24
        assert "\u202e" not in s and "\x1b" not in s and "/tmp/\\u202egpj.exe" in s
        CAPTURES.mkdir(parents=True, exist_ok=True)
        (CAPTURES / "view-whatsnew.txt").write_text(s)
        assert " M /usr/bin/ssh" in s
        s = t.press("k", "kind: program (2/6)")
        s = t.press("K", "kind: all (1/6)")
        s = t.press("down", lambda s: True)
        s = t.press("enter", "program: /usr/bin/curl")
        assert [line.split()[2] for line in body(s)[1:-1]] == ["domain", "country", "hash"]
        s = t.press("m", "picosnitch is not running")
        s = t.press("BSpace", "program: any")
        s = t.press("?", "keys of picosnitch view")
        s = t.press("space", "what's new · kind: all")
        s = t.press("n", "by executable (1/11)")
        t.press("q", "view exited with status 0")
    finally:
        t.close()


# -- dash's what's new, without a browser (test_dash_browser.py drives it in one) --

def test_dash_keeps_whats_new_in_the_address_and_shows_names_escaped(sample):
    state = picosnitch.DashState(view="new", kinds="destination", program=HOSTILE_EXE)
    address = picosnitch.dash_query(state)
    assert "v=new" in address and "k=destination" in address
    assert picosnitch.dash_state(address) == (state, [])
    assert picosnitch.dash_state("?v=new&k=nonsense")[1] == ["k=nonsense"]
    q = query(sample)
    rows, tips = picosnitch.dash_new_rows(q.novelty(), {"/usr/bin/ssh": ["all"]}, "bytes")
    hostile = rows[2]
    assert hostile["program"] == "/tmp/\\u202egpj.exe\\x1b[31m" and tips[2]["program"]["value"] == hostile["program"]
    assert hostile["what"] == "evil\\x0aexample.org<b>x</b> (192.0.2.66)"
    assert [r["muted"] for r in rows] == ["", "", "", "", "muted", "", "muted", ""]
    assert (rows[5]["sent"], rows[5]["received"]) == ("", "")         # (a new hash: no connection)
    shown = [v for r in rows for c, v in r.items() if c != "key"]      # (key: the exact name, for the address)
    assert not any(picosnitch.acts(ch) for v in shown if isinstance(v, str) for ch in v)
    q.close()
