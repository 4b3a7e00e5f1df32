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
from test_view import row

HOSTILE_EXE = "/tmp/\u202egpj.exe\x1b[31m"
HOSTILE_DOMAIN = "evil\nexample.org<b>x</b>"


def ago(**delta):
    return (datetime.datetime.now() - datetime.timedelta(**delta)).strftime(picosnitch.TIME_FORMAT)


def event(when, kind, exe, value, name="", sha256="", domain=None, raddr=None, rport=None, country=None, send=0,
          recv=0):
    """A novelty row as Log.insert takes it (NOVELTY_COLUMNS, the time as the window's text)."""
    text = f"{kind}: {value} for {name} ({exe})"
    return (when, kind, exe, name or os.path.basename(exe), sha256 or "ab" * 32, value, domain, raddr, rport,
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
        [None, "name", "hash", "destination", "destination", "destination", "volume"]
    assert picosnitch.muted_groups(["domain", "country", "port", "hash"]) == ["destination", "hash"]
    assert picosnitch.muted_groups(["destination", "volume"]) == ["destination", "volume"]
    assert picosnitch.muted_groups(["all"]) == ["all"] and picosnitch.muted_kinds(["domain"]) == {"domain"}
    said = picosnitch.change_mute("/usr/bin/curl", "destination", True)
    assert said.startswith("picosnitch is not running")


def test_mutes_are_read_from_the_state_directory(tmp_path):
    assert picosnitch.read_mutes(str(tmp_path)) == {}
    (tmp_path / picosnitch.MUTES_NAME).write_text(json.dumps({"/usr/bin/curl": ["domain", "country", "port"]}))
    assert picosnitch.read_mutes(str(tmp_path)) == {"/usr/bin/curl": ["domain", "country", "port"]}
    (tmp_path / picosnitch.MUTES_NAME).write_text("{not json")
    assert picosnitch.read_mutes(str(tmp_path)) == {}
