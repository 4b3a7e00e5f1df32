"""What is new (section 15): registrable domains, each program's baseline,
the two rules (a settled program's new destination; an hour far above the
busiest), the baseline built from a log, and the primary telling of it."""
import random
import time

import picosnitch
from test_primary import conn, primary

DAY, HOUR = picosnitch.DAY, picosnitch.HOUR
T0 = picosnitch.local_seconds("2026-11-02 00:00:00")    # (a Monday, local wall-clock seconds)
MB = 1_000_000


def text(t):
    return time.strftime(picosnitch.TIME_FORMAT, time.gmtime(t))


def test_registrable_domains_follow_the_public_suffix_list():
    suffixes, why = picosnitch.PublicSuffixes.load()
    assert why == ""
    cases = {"www.example.co.uk": "example.co.uk", "a.b.example.com": "example.com", "example.com.": "example.com",
             "EXAMPLE.org": "example.org", "s3.amazonaws.com": "s3.amazonaws.com",
             "x.y.ck": "x.y.ck", "www.ck": "www.ck", "a.www.ck": "www.ck",      # (*.ck, and its exception !www.ck)
             "co.uk": "co.uk", "localhost": "localhost", "printer.lan": "printer.lan",
             "xn--85x722f.xn--55qx5d.cn": "xn--85x722f.xn--55qx5d.cn",         # (食狮.公司.cn, as DNS carries it)
             "192.0.2.1": "", "2001:db8::1": "", "": "", "a..b": "a..b"}
    assert {d: suffixes.registrable(d) for d in cases} == cases


def test_without_the_list_the_last_two_labels_are_taken_and_the_reason_is_said(tmp_path):
    suffixes, why = picosnitch.PublicSuffixes.load(str(tmp_path / "missing.dat"))
    assert "missing.dat" in why and "publicsuffix" in why
    assert suffixes.registrable("www.example.co.uk") == "co.uk"


def test_a_served_connection_has_one_remote_port_for_all_its_clients():
    client = ("port", "32768-65535")
    assert picosnitch.destinations("example.org", "DE", 40000, 443) == \
        [("domain", "example.org"), ("country", "DE"), ("port", "443")]
    assert picosnitch.destinations("", "", 22, 51234) == [client]   # (sshd, a client's port)
    assert picosnitch.destinations("", "", 41000, 51234) == [("port", "51234")]    # (both ephemeral: one made)
    assert picosnitch.destinations("", "", 40000, None) == []
    assert picosnitch.destinations("", "", 22, 63211) == [client]   # (a Mac's or a Windows client's port)
    assert picosnitch.destinations("", "", 45000, 63211) == [("port", "63211")]


def test_a_windows_sightings_are_its_connections_added_one_by_one(tmp_path):
    """Primary.sight sums connections that tell the same before it adds
    them: each program's bytes and destinations, and the first connection
    that reached each destination, are what adding them one by one gives,
    for served and made connections, names and none, and runs (which are
    no connection)."""
    rng = random.Random(5)
    p = primary(tmp_path, geoip_lookup=False)
    procs = [conn(f"/usr/bin/p{i}", f"p{i}", i).proc for i in range(3)]
    logged = []
    for i in range(600):
        c = conn("", "", 0, rport=rng.choice([443, 53, rng.randint(32768, 65535), -1, 8080]),
                 raddr=rng.choice(["192.0.2.1", "198.51.100.7", "2001:db8::1"]),
                 domain=rng.choice(["", "a.example.org", "b.example.com"]))
        c.proc, c.lport = rng.choice(procs), rng.choice([22, 40000, 50000, 7400])
        c.send, c.recv = rng.randint(0, 1000), rng.randint(0, 1000)
        logged.append((c, rng.choice(["aa" * 32, ""]) if c.proc is procs[0] else "", rng.choice(["", "x.example"])))
    one_by_one = {}
    for c, sha, domain in logged:
        if c.rport == -1 or not (sha or c.proc.exe):
            continue
        s = one_by_one.setdefault(sha or c.proc.exe, picosnitch.Sighting(sha or c.proc.exe, c.proc.exe, c.proc.name,
                                                                          sha))
        served = picosnitch.is_served(c.lport, c.rport)
        dests = picosnitch.destinations(p.suffixes.registrable(c.domain) if c.domain else "", "", c.lport, c.rport,
                                        "" if c.domain else picosnitch.address_network(c.raddr))
        assert served == (("port", picosnitch.CLIENT_PORT) in dests)
        s.add(c.send, c.recv, dests, domain, c.raddr, c.rport, "")
    seen = lambda sightings: [(s.ident, s.exe, s.name, s.sha256, s.send, s.recv, s.dests) for s in sightings]
    assert seen(p.sight(logged)) == seen(one_by_one.values())
    assert sum(len(s.dests) for s in one_by_one.values()) > 30


def test_a_connection_made_from_a_bound_port_to_look_served_is_still_new_once(tmp_path):
    """A program may bind a local port outside the ephemeral range before
    it connects (any account may, above 1023): its remote port is then
    taken for a client's. A settled program's first such connection is
    told of all the same."""
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=1)
    home = picosnitch.destinations("backup.example", "", 40000, 443)
    for day in range(3):
        assert b.observe(T0 + day * DAY, text(T0 + day * DAY), [sighting(dests=home)], c) == []
    t = T0 + 3 * DAY
    sneaky = picosnitch.destinations("", "", 61000, 50000)             # (bound 61000, connected to port 50000)
    events = b.observe(t, text(t), [sighting(dests=sneaky)], c)
    assert [(e[1], e[5]) for e in events] == [("port", "32768-65535")]
    assert "a client's remote port (32768-65535: a connection that looks served)" in events[0][-1]
    sshd = [sighting("bb" * 32, "/usr/sbin/sshd", "sshd", dests=picosnitch.destinations("", "", 22, p))
            for p in (51234, 63211)]
    for day in range(6):            # (a server learns its clients' port once, and settles)
        assert b.observe(T0 + day * DAY, text(T0 + day * DAY), [sshd[day % 2]], c) == []


def sighting(ident="aa" * 32, exe="/usr/bin/backup", name="backup", send=1000, recv=2000, dests=()):
    s = picosnitch.Sighting(ident, exe, name, ident if len(ident) == 64 else "")
    s.add(send, recv, list(dests), "", "192.0.2.1", 443, "")
    return s


def config(**settings):
    return picosnitch.Config(**settings)


def test_a_settled_program_is_told_of_a_new_destination_and_is_unsettled_by_it(tmp_path):
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=7)
    home = [("domain", "backup.example"), ("port", "443")]
    assert b.observe(T0, text(T0), [sighting(dests=home)], c) == []         # (new: told of as a new program)
    for day in range(1, 7):         # six days of use after the day it grew
        assert b.observe(T0 + day * DAY, text(T0 + day * DAY), [sighting(dests=home)], c) == []
    early = T0 + 6 * DAY + HOUR
    assert b.observe(early, text(early), [sighting(dests=[("port", "8443")])], c) == []    # not settled yet
    for day in range(7, 14):        # seven days of use after the 6th
        assert b.observe(T0 + day * DAY, text(T0 + day * DAY), [sighting(dests=home)], c) == []
    later = T0 + 14 * DAY + 5
    events = b.observe(later, text(later), [sighting(dests=home + [("domain", "new.example"), ("country", "NL")])], c)
    assert [(e[1], e[5], e[0]) for e in events] == [("domain", "new.example", text(later)),
                                                    ("country", "NL", text(later))]
    assert "New destination for backup (/usr/bin/backup): the domain new.example" in events[0][-1]
    assert all("nothing new in 8 days of use" in e[-1] for e in events)       # (settled since the 13th)
    again = later + DAY
    assert b.observe(again, text(again), [sighting(dests=[("domain", "other.example")])], c) == []   # unsettled


def test_a_browser_reaching_new_domains_every_day_is_never_told_of(tmp_path):
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config()
    told = []
    for day in range(60):
        for visit in range(20):
            t = T0 + day * DAY + visit * 600
            dests = [("domain", f"site{day}-{visit % 3}.example"), ("domain", "search.example"), ("port", "443")]
            told += b.observe(t, text(t), [sighting("bb" * 32, "/usr/lib/browser", "browser", dests=dests)], c)
    assert told == []


def test_days_without_use_do_not_settle_a_program(tmp_path):
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=2)
    b.observe(T0, text(T0), [sighting(dests=[("port", "443")])], c)
    t = T0 + 30 * DAY           # a month without use is one day of use
    assert b.observe(t, text(t), [sighting(dests=[("port", "22")])], c) == []


def test_the_hours_volume_rule_at_its_threshold(tmp_path):
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_volume_factor=10, novelty_volume_minimum_mb=100)
    b.observe(T0, text(T0), [sighting(send=15 * MB, recv=0)], c)
    b.observe(T0 + 60, text(T0 + 60), [sighting(send=5 * MB, recv=0)], c)       # busiest hour: 20 MB sent
    t = T0 + HOUR
    assert b.observe(t, text(t), [sighting(send=200 * MB - 1, recv=0)], c) == []
    events = b.observe(t + 10, text(t + 10), [sighting(send=1, recv=0)], c)      # 200 MB: 10 times the busiest
    assert [(e[1], e[5], e[10], e[11]) for e in events] == [("volume", "sent", 200 * MB, 0)]
    assert events[0][-1] == "backup (/usr/bin/backup) sent 200.0 MB this hour, 10 times its busiest hour before " \
                            "(20.0 MB)"
    assert b.observe(t + 20, text(t + 20), [sighting(send=500 * MB, recv=0)], c) == []     # once an hour
    t = T0 + 3 * HOUR           # the busiest hour is 700 MB now
    assert b.observe(t, text(t), [sighting(send=6999 * MB, recv=0)], c) == []
    small = picosnitch.Baseline(str(tmp_path / "c.db"))
    small.observe(T0, text(T0), [sighting(send=MB, recv=MB)], c)
    t = T0 + HOUR               # ten times 1 MB, but under the minimum; then the minimum
    assert small.observe(t, text(t), [sighting(send=99 * MB, recv=0)], c) == []
    assert [e[5] for e in small.observe(t + 1, text(t + 1), [sighting(send=MB, recv=0)], c)] == ["sent"]


def test_a_new_version_goes_on_from_the_old_ones_baseline(tmp_path):
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=1)
    b.observe(T0, text(T0), [sighting("aa" * 32, dests=[("port", "443")])], c)
    b.observe(T0 + DAY, text(T0 + DAY), [sighting("aa" * 32, dests=[("port", "443")])], c)
    t = T0 + 2 * DAY            # updated: a new sha256 of the same executable, settled as it was
    assert b.observe(t, text(t), [sighting("cc" * 32, dests=[("port", "443")])], c) == []
    assert [e[5] for e in b.observe(t + 60, text(t + 60), [sighting("cc" * 32, dests=[("port", "22")])], c)] == \
        ["22"]


def test_a_new_version_of_a_settled_program_is_told_of_what_its_first_window_reaches(tmp_path):
    """The window a new sha256 is first seen in (an update, or a replaced
    binary) is judged by the old version's baseline, as the windows after it."""
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=1)
    b.observe(T0, text(T0), [sighting("aa" * 32, dests=[("port", "443")])], c)
    b.observe(T0 + DAY, text(T0 + DAY), [sighting("aa" * 32, dests=[("port", "443")])], c)
    t = T0 + 2 * DAY
    events = b.observe(t, text(t), [sighting("cc" * 32, dests=[("port", "443"), ("domain", "evil.example")])], c)
    assert [(e[1], e[5]) for e in events] == [("domain", "evil.example")]
    assert "it had reached nothing new in 2 days of use" in events[0][-1]


def test_quiet_observing_learns_and_tells_nothing(tmp_path):
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=0)
    b.observe(T0, text(T0), [sighting(dests=[("port", "443")])], c)
    assert b.observe(T0 + 60, text(T0 + 60), [sighting(dests=[("port", "22")])], c, quiet=True) == []
    assert b.observe(T0 + 120, text(T0 + 120), [sighting(dests=[("port", "22")])], c) == []
    assert [e[5] for e in b.observe(T0 + 180, text(T0 + 180), [sighting(dests=[("port", "25")])], c)] == ["25"]


def log_rows(days):
    """(window time, conns) of a small history: a daemon, a browser, a server."""
    windows = []
    for day in range(days):
        for hour in (9, 14):
            t = T0 + day * DAY + hour * HOUR
            conns = [conn("/usr/bin/backupd", "backupd", 7, rport=443, raddr="192.0.2.1",
                          domain="api.backup.example"),
                     conn("/usr/lib/browser", "browser", 8, rport=443, raddr=f"198.51.100.{day}",
                          domain=f"www.site{day}.example.com"),
                     picosnitch.dataclasses.replace(conn("/usr/sbin/sshd", "sshd", 9, rport=40000 + day, raddr="10.0.0.5"),
                                                    lport=22)]
            windows.append((text(t), conns))
    return windows


def test_the_baseline_built_from_a_log_is_the_one_kept_as_it_was_written(tmp_path):
    """A log written with the baseline kept, window by window, and the same
    log's baseline built afterwards from its rows, hold the same."""
    live = primary(tmp_path / "live", geoip_lookup=False)
    for seq, (contime, conns) in enumerate(log_rows(12), 1):
        live.window(seq, contime, conns)
    live.baseline_ready()
    kept = baseline_contents(live.baseline)
    live.close()
    db = tmp_path / "live" / "state" / "snitch.db"
    suffixes = picosnitch.PublicSuffixes.load()[0]
    programs, seconds = picosnitch.build_baseline(str(db), str(tmp_path / "built.db"), 10 ** 9, suffixes,
                                                  lambda addr: "")
    built = baseline_contents(picosnitch.Baseline(str(tmp_path / "built.db")))
    assert programs == 3 and seconds >= 0
    # (a log does not say whether a row's name was looked up or a reverse one: the build takes every
    # address's network in; as written, only those of addresses reached with no name were)
    networks = lambda seen: {ident: {d for d in values if d[0] != "network"} for ident, values in seen.items()}
    assert built["programs"] == kept["programs"] and networks(built["seen"]) == networks(kept["seen"])
    assert all(kept["seen"].get(ident, set()) <= values for ident, values in built["seen"].items())
    assert built["seen"]["%064x" % 7] == {("port", "443"), ("domain", "backup.example"), ("network", "192.0.2.0/24")}
    assert kept["seen"]["%064x" % 7] == {("port", "443"), ("domain", "backup.example")}
    # (sshd: its remote ports are its clients', and it was reached with no name)
    assert built["seen"]["%064x" % 9] == kept["seen"]["%064x" % 9] == {("port", "32768-65535"),
                                                                       ("network", "10.0.0.0/24")}
    assert built["programs"]["%064x" % 7][:3] == (0 + 0, 11, 11)     # (grew on day 0; 11 days of use since)


def baseline_contents(baseline):
    programs = {row[0]: row[3:12] for row in baseline.con.execute("SELECT * FROM programs")}
    programs = {ident: (p[0] - T0 // DAY, p[1], p[2] - T0 // DAY, *p[3:]) for ident, p in programs.items()}
    seen = {}
    for ident, kind, value, _ in baseline.con.execute("SELECT * FROM seen"):
        seen.setdefault(ident, set()).add((kind, value))
    return {"programs": programs, "seen": seen}


def test_the_primary_tells_of_a_settled_programs_new_destination_and_logs_it(tmp_path):
    p = primary(tmp_path, geoip_lookup=False, novelty_settle_days=1)
    for seq, day in enumerate(range(3), 1):
        p.window(seq, text(T0 + day * DAY), [conn("/usr/bin/backupd", "backupd", 7, domain="api.backup.example")])
    deadline = time.monotonic() + 30        # (windows until the baseline is built are taken in quietly)
    while p.baseline_ready() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    t = T0 + 3 * DAY
    p.window(4, text(t), [conn("/usr/bin/backupd", "backupd", 7, raddr="203.0.113.9", domain="upload.evil-cdn.net",
                               rport=8443)])
    told = [r for r in p.reports.read() if isinstance(r, picosnitch.Novelty)]
    assert [(r.kind, r.exe) for r in told] == [("program", "/usr/bin/backupd"), ("domain", "/usr/bin/backupd"),
                                               ("port", "/usr/bin/backupd")]
    assert "the domain evil-cdn.net (as upload.evil-cdn.net), via 203.0.113.9 port 8443" in told[1].text
    p.close()
    con = picosnitch.sqlite3.connect(str(tmp_path / "state" / "snitch.db"))
    logged = con.execute("SELECT t, kind, exe, value, domain, raddr, rport, send, recv FROM novelty ORDER BY id").fetchall()
    assert logged == [(T0, "program", "/usr/bin/backupd", "/usr/bin/backupd", "api.backup.example", "192.0.2.1", 443,
                       10, 20),
                      (t, "domain", "/usr/bin/backupd", "evil-cdn.net", "upload.evil-cdn.net", "203.0.113.9",
                       8443, 10, 20),
                      (t, "port", "/usr/bin/backupd", "8443", "upload.evil-cdn.net", "203.0.113.9", 8443, 10, 20)]


def test_a_primary_builds_the_baseline_of_an_existing_log_first(tmp_path):
    """A log written without a baseline (an older picosnitch's): the first
    start builds it from the log, and then a settled program is told of."""
    first = primary(tmp_path, geoip_lookup=False, novelty_settle_days=1)
    for seq, (contime, conns) in enumerate(log_rows(5), 1):
        first.window(seq, contime, conns)
    first.close()
    (tmp_path / "state" / "private" / "baseline.db").unlink()
    p = primary(tmp_path, geoip_lookup=False, novelty_settle_days=1, run_id="second")
    t = T0 + 6 * DAY
    p.window(1, text(t), [conn("/usr/bin/backupd", "backupd", 7, domain="api.backup.example")])   # (while it builds)
    deadline = time.monotonic() + 30
    while p.baseline_ready() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.window(2, text(t + 60), [conn("/usr/bin/backupd", "backupd", 7, rport=25)])
    told = [(r.kind, r.text) for r in p.reports.read() if isinstance(r, picosnitch.Novelty)]
    assert [kind for kind, _ in told] == ["port"] and "remote port 25" in told[0][1]
    p.close()


def test_a_log_of_version_4_gains_the_novelty_table_and_keeps_its_rows(tmp_path):
    path = str(tmp_path / "snitch.db")
    log = picosnitch.Log.open(path)
    log.insert([picosnitch.conn_row(conn("/usr/bin/curl", "curl", 7), text(T0), "", "", "", "", picosnitch.Config())])
    log.con.execute("DROP TABLE novelty")
    log.con.execute("PRAGMA user_version = 4")
    log.close()
    log = picosnitch.Log.open(path)
    novel = (text(T0 + 60), "port", "/usr/bin/curl", "curl", "", "22", "", "192.0.2.1", 22, "", 1, 2, "t")
    log.insert([], novelty=[novel])
    assert log.con.execute("PRAGMA user_version").fetchone()[0] == picosnitch.SCHEMA_VERSION == 5
    assert log.con.execute("SELECT t, kind, value FROM novelty").fetchall() == [(T0 + 60, "port", "22")]
    log.close()
    assert [r["exe"] for r in picosnitch.db_rows(path)] == ["/usr/bin/curl"]


def test_retention_deletes_old_novelty_rows_with_the_old_rows(tmp_path):
    log = picosnitch.Log.open(str(tmp_path / "snitch.db"))
    novel = lambda t: (text(t), "port", "/usr/bin/curl", "curl", "", "22", "", "", 22, "", 1, 2, "t")
    log.insert([], novelty=[novel(T0), novel(T0 + 40 * DAY)])
    assert log.prune(30, T0 + 41 * DAY) == 0
    assert log.con.execute("SELECT t FROM novelty").fetchall() == [(T0 + 40 * DAY,)]
    log.close()


def test_windows_kept_while_the_baseline_is_built_are_bounded_by_their_destinations(tmp_path, monkeypatch):
    """One program reaching thousands of ports a window is one sighting: the
    queue counts its destinations too, or it would grow without bound."""
    monkeypatch.setattr(picosnitch, "NOVELTY_QUEUE", 1000)
    p = primary(tmp_path, geoip_lookup=False)
    try:
        for w in range(3):
            s = sighting("cc" * 32, "/home/u/.x", "x", dests=[("port", str(port)) for port in range(1, 601)])
            p.wait_for_baseline(T0 + w * 60, text(T0 + w * 60), [s])
        assert len(p.waiting) == 1 and p.waiting_dropped == 2 and p.waiting_size == 601
    finally:
        p.close()


def test_an_address_reached_with_no_name_is_a_new_network_and_a_reverse_name_is_no_domain(tmp_path):
    """A settled program reaching a new server by its address, in a known
    country and on a known port, is told of its network; a reverse name under
    a known domain (its owner's choice) does not pass for that domain."""
    p = primary(tmp_path, geoip_lookup=False, novelty_settle_days=1)
    for seq, day in enumerate(range(3), 1):
        p.window(seq, text(T0 + day * DAY), [conn("/usr/bin/backupd", "backupd", 7, domain="api.backup.example")])
    p.names.resolve = lambda addrs, budget: {a: "x.backup.example" for a in addrs}      # (a reverse name)
    p.window(4, text(T0 + 3 * DAY), [conn("/usr/bin/backupd", "backupd", 7, raddr="203.0.113.50")])
    told = [r for r in p.reports.read() if isinstance(r, picosnitch.Novelty) and r.kind != "program"]
    assert [(r.kind, r.text.split(": ", 1)[1]) for r in told] == \
        [("network", "the network 203.0.113.0/24 (an address reached with no name looked up), via x.backup.example, "
                     "203.0.113.50 port 443; it had reached nothing new in 3 days of use")]
    assert picosnitch.address_network("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert picosnitch.address_network("::ffff:198.51.100.7") == "198.51.100.0/24"
    assert picosnitch.address_network("") == picosnitch.address_network("x") == ""
    p.close()


def test_a_program_cannot_grow_its_baseline_without_end(tmp_path, monkeypatch):
    monkeypatch.setattr(picosnitch, "SEEN_MOST", 5)
    b, c = picosnitch.Baseline(str(tmp_path / "b.db")), config(novelty_settle_days=0)
    b.observe(T0, text(T0), [sighting(dests=[("port", "443")])], c)
    for i in range(20):
        t = T0 + 60 * (i + 1)
        assert [e[5] for e in b.observe(t, text(t), [sighting(dests=[("port", str(1000 + i))])], c)] == [str(1000 + i)]
    assert b.con.execute("SELECT count(*) FROM seen WHERE kind = 'port'").fetchone()[0] == 5
    t = T0 + 3 * DAY            # (kept: not new again; past the bound: new each time)
    assert b.observe(t, text(t), [sighting(dests=[("port", "1000")])], c) == []
    assert [e[5] for e in b.observe(t + 60, text(t + 60), [sighting(dests=[("port", "1019")])], c)] == ["1019"]


def test_a_flood_of_news_from_one_program_is_told_in_a_few_lines_and_logged_whole(tmp_path):
    p = primary(tmp_path, geoip_lookup=False, novelty_settle_days=0)
    p.window(1, text(T0), [conn("/usr/bin/scan", "scan", 7, rport=1)])
    p.window(2, text(T0 + 60), [conn("/usr/bin/scan", "scan", 7, rport=1 + i) for i in range(1, 41)] +
             [conn("/usr/bin/backupd", "backupd", 8, rport=443)])
    told = [r for r in p.reports.read() if isinstance(r, picosnitch.Novelty)]
    scan = [r.text for r in told if r.exe == "/usr/bin/scan" and r.kind != "program"]
    assert len(scan) == picosnitch.NOVELTY_TOLD + 1
    assert scan[-1] == f"scan (/usr/bin/scan) had {40 - picosnitch.NOVELTY_TOLD} more things new in this window: " \
                       "snitch.db's novelty table has each"
    assert [r.kind for r in told if r.exe == "/usr/bin/backupd"] == ["program"]
    p.close()
    con = picosnitch.sqlite3.connect(str(tmp_path / "state" / "snitch.db"))
    assert con.execute("SELECT count(*) FROM novelty WHERE exe = '/usr/bin/scan' AND kind = 'port'").fetchone()[0] == 40
