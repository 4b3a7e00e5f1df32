"""Storage, the log at scale: the compact layout (version 2), the
connections view, rollups and retention, migrations from the older layouts,
and the query layer, checked against sums computed from the rows themselves."""
import os
import random
import sqlite3

import pytest

import loggen
import picosnitch
from conftest import free_share

NOW = 1_795_000_000 // 86400 * 86400 + 13 * 3600 + 1234     # a fixed "now", in the log's seconds


def text(t):
    return picosnitch.time.strftime(picosnitch.TIME_FORMAT, picosnitch.time.gmtime(t))


def make_log(path, n=3000, days=3, seed=3):
    log = picosnitch.Log.open(path)
    rows = list(loggen.rows(loggen.World(seed, exes=40, domains=120), n, days, end=NOW))
    log.insert(rows)
    log.close()
    return rows


def value(v):
    return v.decode() if isinstance(v, bytes) else v


def port_key(port):
    """A port as the totals by port have it: the high ones together."""
    return picosnitch.HIGH_PORTS_KEY if isinstance(port, int) and port >= picosnitch.HIGH_PORTS else port


def brute(rows, group, filters=(), start=None, end=None, bucket=86400):
    """What totals() must answer, computed from the rows of the view."""
    out = {}
    for r in rows:
        t = picosnitch.local_seconds(r["contime"])
        if (start is not None or end is not None) and not isinstance(t, int):
            continue
        if (start is not None and t < start) or (end is not None and t >= end):
            continue
        keep = True
        for f in filters:
            if f.column == "time":
                match = isinstance(t, int) and f.value <= t < f.value + f.bucket
            elif f.column in picosnitch.PORT_KEYS and f.value == picosnitch.HIGH_PORTS_KEY:
                match = port_key(r[f.column]) == picosnitch.HIGH_PORTS_KEY
            else:
                match = r[f.column] == value(f.value)
            keep &= match != f.exclude
        if not keep:
            continue
        if group == "time":
            if not isinstance(t, int):
                continue
            key = t // bucket * bucket
        else:
            key = port_key(r[group]) if group in picosnitch.PORT_KEYS else r[group]
        total = out.setdefault(key, [0, 0, 0])
        total[0] += r["send"]
        total[1] += r["recv"]
        total[2] += 1
    return {k: tuple(v) for k, v in out.items()}


def answer(query, *args, **kw):
    return {value(v): (s, r, n) for v, s, r, n in query.totals(*args, **kw)}


def test_the_layout_and_its_view(tmp_path, private_umask):
    path = str(tmp_path / "snitch.db")
    log = picosnitch.Log.open(path)
    con = log.con
    assert con.execute("PRAGMA user_version").fetchone()[0] == picosnitch.SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[1] for r in con.execute("PRAGMA table_info(connections)")] == picosnitch.DB_COLUMNS
    assert os.stat(path).st_mode & 0o777 == 0o600
    log.close()


def test_rows_read_back_exactly_as_written(tmp_path):
    path = str(tmp_path / "snitch.db")
    log = picosnitch.Log.open(path)
    base = ["2026-11-21 10:00:00", 10, 20, "/usr/bin/curl", "curl", "curl -s x", "ab" * 32, "/bin/sh", "sh", "sh -c",
            "cd" * 32, 1000, 40000, 443, "10.0.0.2", "10.0.0.1", "example.org", "tcp", "/sbin/init", "init", "init",
            "ef" * 32]
    odd = list(base)
    odd[0], odd[5], odd[11], odd[12], odd[13], odd[16] = "not a time", None, None, None, None, ""
    unicode = list(base)
    unicode[3], unicode[4] = "/opt/数据/" + "x" * 400, "数据"
    rows = [tuple(base), tuple(odd), tuple(unicode)]
    log.insert(rows)
    # scripts may go on inserting into the view; a name that is not UTF-8 keeps its bytes
    log.con.execute("INSERT INTO connections (contime, send, recv, exe, name) VALUES (?, 1, 2, CAST(? AS TEXT), ?)",
                    ("2026-11-21 10:00:05", b"/opt/bad\xffname", "bad"))
    log.con.commit()
    log.close()
    con = sqlite3.connect(path)
    con.text_factory = bytes
    got = con.execute(f"SELECT {', '.join(picosnitch.DB_COLUMNS)} FROM connections").fetchall()
    encode = lambda r: tuple(v.encode() if isinstance(v, str) else v for v in r)
    assert got[:3] == [encode(r) for r in rows]
    assert got[3][:5] == (b"2026-11-21 10:00:05", 1, 2, b"/opt/bad\xffname", b"bad")
    query = picosnitch.LogQuery(path)
    query.refresh()
    assert {v for v, *_ in query.totals("exe")} == {b"/usr/bin/curl", unicode[3].encode(), b"/opt/bad\xffname"}
    assert query.totals("exe", [picosnitch.Filter("exe", b"/opt/bad\xffname")]) == [(b"/opt/bad\xffname", 1, 2, 1)]
    assert query.count() == 4


def rollup_tables(con):
    return {table: con.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4, 5").fetchall()
            for table in picosnitch.ROLLUPS}


def test_a_windows_rollups_are_its_rows_grouped_at_every_level(tmp_path, monkeypatch):
    """A window's rows are summed once per rollup and its levels added from
    those hours: the totals are those of the rows grouped at each level
    (ROLL_STATEMENTS), for windows across hours and days, times that are no
    time, NULL ports and users, a local port two processes share, times
    before 1970 (SQL's division truncates), and high ports, which are one
    key. Log.insert sums a window as it encodes it (window_sums); a window
    with a port as text is summed by the SQL, as stored. Rows go in
    ROWS_A_STATEMENT a statement (here 7: a window takes several, and a
    part)."""
    monkeypatch.setattr(picosnitch, "ROWS_A_STATEMENT", 7)
    rng = random.Random(7)
    rows = list(loggen.rows(loggen.World(5, exes=6, domains=20), 1500, 3, end=NOW))
    for i in range(0, len(rows), 7):
        r = list(rows[i])
        r[0] = "not a time" if i % 2 else r[0]
        r[11 + i % 3] = None
        rows[i] = tuple(r)
    for i in range(40):     # (two programs on one port, across midnight)
        rows.append((text(NOW - NOW % 86400 - 30 + i), i, 2 * i, f"/opt/p{i % 2}", "p", "", "", "", "", "", "",
                     1000, 7400, 50000 + i, "127.0.0.1", "127.0.0.1", "", "tcp"))
    for i in range(30):     # (before 1970, on both sides of an hour)
        rows.append((f"1969-12-31 {22 + i % 2}:{i:02d}:00", i, 1, "/opt/old", "old", "", "", "", "", "", "",
                     1000, 80, 40000 + i, "10.0.0.1", "10.0.0.2", "", "tcp"))
    rng.shuffle(rows)
    rows.insert(301, rows[301][:12] + ("8080", "40000") + rows[301][14:])     # (its window is summed by the SQL)
    assert picosnitch.window_sums([(0, 1, 1, 1, 1, 1, 0, "8080", 1, 1, 1, 1, 1)]) is None
    windowed, grouped = picosnitch.Log.open(str(tmp_path / "a.db")), picosnitch.Log.open(str(tmp_path / "b.db"))
    for start in range(0, len(rows), 300):
        windowed.insert(rows[start:start + 300])
        with grouped.con:
            encoded = [grouped.encode(r) for r in rows[start:start + 300]]
            grouped.con.executemany(f"INSERT INTO conns ({', '.join(picosnitch.CONNS_COLUMNS)}) VALUES "
                                    f"({', '.join('?' * len(picosnitch.CONNS_COLUMNS))})", encoded)
            for statements in picosnitch.ROLL_STATEMENTS.values():
                for statement in statements:
                    grouped.con.execute(statement, (start, start + len(encoded)))
    assert rollup_tables(windowed.con) == rollup_tables(grouped.con)
    columns = ", ".join(picosnitch.CONNS_COLUMNS)
    assert windowed.con.execute(f"SELECT id, {columns} FROM conns ORDER BY id").fetchall() == \
        grouped.con.execute(f"SELECT id, {columns} FROM conns ORDER BY id").fetchall()
    tables = rollup_tables(windowed.con)
    assert len(tables["ports"]) > 500 and {r[3] for r in tables["ports"]} >= {7400, picosnitch.HIGH_PORTS_KEY}
    # (the high ports, a client's each, are one key: the rollups do not grow with connections)
    assert max(r[3] for r in tables["ports"]) < picosnitch.HIGH_PORTS
    assert max(r[9] for r in tables["rollups"]) < picosnitch.HIGH_PORTS
    windowed.close()
    grouped.close()


def test_odd_values_are_summed_by_the_sql_as_stored(tmp_path):
    """window_sums() leaves to the SQL the rows whose bytes are not
    integers, or whose user or ports are neither integers nor NULL, and
    sums past SQLite's integers (which the SQL refuses, as before)."""
    row = lambda send=5, uid=1000, lport=80: (0, send, 1, 1, 1, 1, uid, lport, 40000, 1, 1, 1, 1)
    assert picosnitch.window_sums([row(), row(uid=None, lport=None)]) is not None
    for odd in ([row(), row(send="6")], [row(uid=float("nan"))], [row(lport=True)], [row(1 << 62), row(1 << 62)]):
        assert picosnitch.window_sums(odd) is None
    rows = [(text(NOW), send, 0, "/opt/p", "p", "", "", "", "", "", "", 1000, 7400, 40000, "127.0.0.1", "127.0.0.1",
             "", "tcp") for send in ("5", "6", 7)]
    log = picosnitch.Log.open(str(tmp_path / "a.db"))
    log.insert(rows)
    totals = log.con.execute("SELECT send, rows FROM ports WHERE level = ? AND proc > 0", (picosnitch.ALL_TIME,))
    assert totals.fetchall() == [(18, 3)]
    log.close()


def test_rollups_that_kept_each_high_port_are_read_as_if_they_kept_them_as_one(tmp_path, monkeypatch):
    """A log whose rollups were written with every port a key of its own
    (before the high ports were one), and windows added since, answers
    totals and filters by port as the rows say."""
    path = str(tmp_path / "snitch.db")
    make_log(path)
    log = picosnitch.Log.open(path)
    exact = lambda column: f"coalesce({column}, {picosnitch.NOT_LOGGED})" if column in picosnitch.INTEGER_KEYS \
        else column
    monkeypatch.setattr(picosnitch, "rollup_value", exact)
    with log.con:
        for table in picosnitch.ROLLUPS:
            log.con.execute(f"DELETE FROM {table}")
        for statements in picosnitch.rollup_statements("id > ? AND id <= ?").values():
            for statement in statements:
                log.con.execute(statement, (0, 10 ** 9))
    assert log.con.execute("SELECT count(*) FROM ports WHERE lport >= ?", (picosnitch.HIGH_PORTS,)).fetchone()[0]
    monkeypatch.undo()
    log.insert([(text(NOW - 10 - i), 7, 9, "/usr/bin/late", "late", "", "", "", "", "", "", 1000, 40000 + i, 443,
                 "10.0.0.2", "192.0.2.9", "late.example", "tcp") for i in range(20)])
    log.close()
    rows = picosnitch.db_rows(path)
    query = picosnitch.LogQuery(path)
    query.refresh()
    for group in ("lport", "rport", "exe"):
        for chain in ([], [picosnitch.Filter("lport", picosnitch.HIGH_PORTS_KEY)],
                      [picosnitch.Filter("lport", picosnitch.HIGH_PORTS_KEY, True)],
                      [picosnitch.Filter("lport", 40003)]):
            for start, end in ((None, None), (NOW - 86400, NOW + 1), (NOW - 2 * 86400 - 1800, NOW - 3600 + 17)):
                assert answer(query, group, chain, start, end) == brute(rows, group, chain, start, end), \
                    (group, chain, start, end)
    assert answer(query, "exe", [picosnitch.Filter("lport", 40003)]) == {"/usr/bin/late": (7, 9, 1)}
    query.close()


GROUPS = ["exe", "name", "cmdline", "sha256", "pexe", "pname", "gpexe", "domain", "raddr", "laddr", "lport", "rport",
          "uid", "proto", "time"]


def made_log(tmp_path, change):
    """A generated log, changed by change(path): its path, its rows, and the
    query layer reading it."""
    path = str(tmp_path / "snitch.db")
    make_log(path)
    change(path)
    query = picosnitch.LogQuery(path)
    query.refresh()
    return path, picosnitch.db_rows(path), query


@pytest.mark.parametrize("seeks", ["buckets named", "buckets as a range"])
def test_totals_match_the_rows_for_every_column_filter_and_range(tmp_path, monkeypatch, seeks):
    if seeks == "buckets as a range":
        monkeypatch.setattr(picosnitch, "ROLLUP_SEEKS", 0)
    path, rows, query = made_log(tmp_path, with_unlogged_ports)
    exe = max(brute(rows, "exe").items(), key=lambda kv: kv[1][2])[0]
    domain = max(brute(rows, "domain", [picosnitch.Filter("exe", exe)]).items(), key=lambda kv: kv[1][2])[0]
    lport = rows[0]["lport"]
    chains = [[], [picosnitch.Filter("exe", exe)], [picosnitch.Filter("exe", exe), picosnitch.Filter("domain", domain, True)],
              [picosnitch.Filter("lport", lport, True)], [picosnitch.Filter("uid", 0)],
              [picosnitch.Filter("lport", picosnitch.HIGH_PORTS_KEY)],
              [picosnitch.Filter("rport", picosnitch.HIGH_PORTS_KEY, True), picosnitch.Filter("rport", 443, True)],
              [picosnitch.Filter("time", (NOW - 86400) // 3600 * 3600, False, 3600)],
              [picosnitch.Filter("time", (NOW - 86400) // 86400 * 86400, True, 86400)]]
    ranges = [(None, None), (NOW - 3600, NOW + 1), (NOW - 86400, NOW + 1), (NOW - 7 * 86400, NOW + 1),
              (NOW - 2 * 86400 - 1800, NOW - 3600 + 17), (NOW - 2 * 86400 - 61, NOW - 1 - 2 * 86400 + 3 * 3600)]
    checked = 0
    for group in GROUPS:
        for chain in chains:
            for start, end in ranges:
                for bucket in ([60, 3600, 86400] if group == "time" else [86400]):
                    if group == "time" and bucket < 3600 and start is None:
                        continue
                    expected = brute(rows, group, chain, start, end, bucket)
                    assert answer(query, group, chain, start, end, bucket) == expected, (group, chain, start, end, bucket)
                    checked += 1
    assert checked > 600


def test_totals_match_the_rows_for_random_filter_chains_and_ranges(tmp_path):
    """Chains of up to three filters and exclusions on any column (a value
    the rows have, NULL, or the high ports), over ranges that start and end anywhere."""
    path, rows, query = made_log(tmp_path, with_unlogged_ports)
    rng = random.Random(5)
    columns = [c for c in GROUPS if c != "time"]
    for case in range(300):
        chain = []
        for _ in range(rng.randrange(4)):
            column = rng.choice(columns + ["time"])
            if column == "time":
                size = rng.choice([3600, 86400])
                chain.append(picosnitch.Filter("time", (NOW - rng.randrange(3 * 86400)) // size * size,
                                               rng.random() < 0.5, size))
            else:       # (the ports and user of some rows were not logged: NULL; the high ports are one value)
                chosen = None if column in ("uid", "lport", "rport") and rng.random() < 0.2 else rng.choice(rows)[column]
                if column in picosnitch.PORT_KEYS and rng.random() < 0.3:
                    chosen = picosnitch.HIGH_PORTS_KEY
                chain.append(picosnitch.Filter(column, chosen, rng.random() < 0.4))
        start = rng.choice([None, NOW - rng.randrange(4 * 86400)])
        end = rng.choice([None, NOW + 1 - rng.randrange(2 * 86400)])
        group = rng.choice(GROUPS)
        bucket = rng.choice([60, 3600, 86400]) if group == "time" and start is not None else 86400
        expected = brute(rows, group, chain, start, end, bucket)
        assert answer(query, group, chain, start, end, bucket) == expected, (case, group, chain, start, end, bucket)


def with_unlogged_ports(path):
    """Rows whose ports and user were not logged (NULL), beside the others."""
    log = picosnitch.Log.open(path)
    log.insert([(text(NOW - 100 * i), 10 + i, 20 + i, "/usr/bin/quiet", "quiet", "", "", "", "", "", "", None, None,
                 None, "", "", "", "udp", "", "", "", "") for i in range(5)])
    log.close()


def test_series_first_and_last_and_latest_match_the_rows(tmp_path):
    path, rows, query = made_log(tmp_path, with_unlogged_ports)
    ranked = sorted(brute(rows, "exe").items(), key=lambda kv: -kv[1][2])
    keys = [k for k, _ in ranked[:4]] + ["/usr/bin/quiet", "/usr/bin/none-such"]
    chains = [[], [picosnitch.Filter("lport", rows[0]["lport"], True)], [picosnitch.Filter("uid", 0)],
              [picosnitch.Filter("domain", rows[0]["domain"], True)]]
    ranges = [(None, None), (NOW - 3600, NOW + 1), (NOW - 2 * 86400 - 1800, NOW - 3600 + 17)]
    for chain in chains:
        for start, end in ranges:
            for bucket in (60, 3600, 86400):
                if bucket < 3600 and start is None:
                    continue
                expected = {}
                for key in keys:
                    per = brute(rows, "time", [*chain, picosnitch.Filter("exe", key)], start, end, bucket)
                    if per:
                        expected[key] = {t: [s, r] for t, (s, r, n) in per.items()}
                got = {value(k): v for k, v in query.series("exe", keys, chain, start, end, bucket).items()}
                assert got == expected, (chain, start, end, bucket)
    for key in keys:
        times = [picosnitch.local_seconds(r["contime"]) for r in rows if r["exe"] == key]
        times = [t for t in times if isinstance(t, int)]
        assert query.seen([picosnitch.Filter("exe", key)]) == ((min(times), max(times)) if times else (None, None))
        newest = sorted((r for r in rows if r["exe"] == key), key=lambda r: r["contime"], reverse=True)[:7]
        latest = query.latest([picosnitch.Filter("exe", key)], 7)
        assert [r["contime"] for r in latest] == [r["contime"].encode() for r in newest]
        assert all(r["exe"] == key.encode() for r in latest)
    excluded = [r for r in rows if r["lport"] != rows[0]["lport"]]
    assert len(query.latest([picosnitch.Filter("lport", rows[0]["lport"], True)], 10 ** 6)) == len(excluded)


@pytest.mark.parametrize("step", ["at once", "a step per call"])
def test_retention_keeps_whole_days_and_the_totals_right(tmp_path, monkeypatch, step):
    path = str(tmp_path / "snitch.db")
    make_log(path, n=4000, days=5)
    log = picosnitch.Log.open(path)
    if step == "at once":
        assert log.prune(2, NOW, budget=10) > 0
    else:       # the rows and the rollups leave in small steps, each call stopping after one
        monkeypatch.setattr(picosnitch, "PRUNE_BATCH", 50)
        monkeypatch.setattr(picosnitch, "FORGET_BATCH", 7)
        calls = 1
        while log.prune(2, NOW, budget=0) is None:
            calls += 1
        assert calls > 100
    log.close()
    rows = picosnitch.db_rows(path)
    cutoff = (NOW - 2 * 86400) // 86400 * 86400
    assert min(picosnitch.local_seconds(r["contime"]) for r in rows) >= cutoff
    query = picosnitch.LogQuery(path)
    query.refresh()
    for group in ("exe", "domain", "lport", "time"):
        assert answer(query, group) == brute(rows, group)
    assert query.count() == len(rows)
    for table in picosnitch.ROLLUPS:
        assert query.con.execute(f"SELECT count(*) FROM {table} WHERE level < ? AND b < ?",
                                 (picosnitch.ALL_TIME, cutoff)).fetchone()[0] == 0
        assert query.con.execute(f"SELECT count(*) FROM {table} WHERE rows <= 0").fetchone()[0] == 0


@pytest.mark.parametrize("layout", ["v1", "upstream-1.0.3"])
def test_an_older_log_is_moved_over_and_reads_back_exactly(tmp_path, layout):
    path = str(tmp_path / "snitch.db")
    loggen.write_legacy(path, 3000, layout, seed=4, days=2)
    con = sqlite3.connect(path)
    con.execute("INSERT INTO connections (contime, send, recv, exe) VALUES ('not a time', 1, 2, NULL)")
    con.execute('CREATE INDEX "a user\'s ""own"" index" ON connections (send)')
    con.commit()
    width = loggen.LEGACY[layout][1]
    original = con.execute("SELECT * FROM connections ORDER BY rowid").fetchall()
    con.close()

    # before picosnitch 2 opens it, the query layer reads the old table
    query = picosnitch.LogQuery(path)
    query.refresh()
    assert answer(query, "exe") == brute([dict(zip(picosnitch.DB_COLUMNS, r)) for r in original], "exe")
    query.close()

    log = picosnitch.Log.open(path)       # capture goes on at once; nothing is read yet
    assert log.migrating()
    log.insert([("2026-11-29 10:00:00", 5, 6, "/usr/bin/new", "new", "new", "", "", "", "", "", 0, 1, 2, "", "", "",
                 "udp", "", "", "", "")])
    indexes = 4 if layout == "v1" else 1     # the old table's indexes go first, a step each
    assert [log.migrate(1000) for _ in range(indexes)] == [0] * indexes
    assert log.con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = ?",
                           (picosnitch.LEGACY_TABLE,)).fetchone() == (0,)
    assert log.migrate(1000) == 1000 and log.migrate(700) == 700
    log.close()                            # a stop halfway: the view still has every row, once
    halfway = picosnitch.db_rows(path)
    old_part = [tuple(r[c] for c in picosnitch.DB_COLUMNS[:width]) for r in halfway if r["exe"] != "/usr/bin/new"]
    assert sorted(old_part, key=repr) == sorted(original, key=repr) and len(halfway) == len(original) + 1
    query = picosnitch.LogQuery(path)
    query.refresh()
    assert query.legacy is not None and query.moved > 0
    assert answer(query, "exe") == brute(halfway, "exe") and answer(query, "time", bucket=3600) == \
        brute(halfway, "time", bucket=3600)
    query.close()

    log = picosnitch.Log.open(path)        # the next start goes on
    while log.migrate(500) is not None:
        pass
    assert not log.migrating()
    log.close()
    after = picosnitch.db_rows(path)
    assert [tuple(r[c] for c in picosnitch.DB_COLUMNS[:width]) for r in after if r["exe"] != "/usr/bin/new"] == original
    assert len(after) == len(original) + 1
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (picosnitch.LEGACY_TABLE,)).fetchone() == (0,)
    con.close()
    query = picosnitch.LogQuery(path)
    query.refresh()
    for group in ("exe", "domain", "lport", "uid"):
        assert answer(query, group) == brute(after, group)
    week = (NOW - 7 * 86400, NOW + 1)
    for group, bucket in (("time", 86400), ("exe", 86400), ("lport", 86400), ("time", 3600)):
        assert answer(query, group, [], *week, bucket=bucket) == brute(after, group, [], *week, bucket=bucket)


def test_rows_written_during_a_migration_are_counted_once(tmp_path):
    """Rows the primary writes, and rows scripts write through the view, in a
    day not rolled up yet or without a time, count once in every total."""
    path = str(tmp_path / "snitch.db")
    loggen.write_legacy(path, 3000, "v1", seed=5, days=3)
    log = picosnitch.Log.open(path)
    first, old = log.con.execute(f"SELECT min(contime), count(*) FROM {picosnitch.LEGACY_TABLE}").fetchone()
    row = ("2026-11-29 10:00:00", 5, 6, "/usr/bin/new", "new", "new", "", "", "", "", "", 0, 1, 2, "", "", "", "udp",
           "", "", "", "")
    log.insert([row, ("not a time",) + row[1:]])
    while log.meta()["migrated"] < log.meta()["legacy_last"]:      # every row over; no day rolled up yet
        log.migrate(700)
    for contime in (first, "still not a time"):
        log.con.execute("INSERT INTO connections (contime, send, recv, exe, lport) VALUES (?, 7, 8, '/usr/bin/script', "
                        "9)", (contime,))
    log.con.commit()
    while log.migrate(700) is not None:
        pass
    log.close()
    rows = picosnitch.db_rows(path)
    assert len(rows) == old + 4
    query = picosnitch.LogQuery(path)
    query.refresh()
    assert answer(query, "exe")["/usr/bin/script"] == (14, 16, 2)
    for group, bucket in (("exe", 86400), ("lport", 86400), ("time", 86400), ("time", 3600)):
        assert answer(query, group, bucket=bucket) == brute(rows, group, bucket=bucket)
    start = picosnitch.local_seconds(first) + 1800      # (a partial hour, hours, a whole day, hours)
    for group in ("exe", "lport"):
        assert answer(query, group, [], start, start + 2 * 86400) == brute(rows, group, [], start, start + 2 * 86400)


def as_version_2(path):
    """The log as version 2 left it: without the times and programs rollups."""
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE times; DROP TABLE programs; PRAGMA user_version = 2;")
    con.close()


def test_a_version_2_log_gains_the_narrow_rollups(tmp_path):
    path, rows, query = made_log(tmp_path, as_version_2)     # (the query reads it before picosnitch opens it)
    assert query.rollups == ["rollups", "ports"]
    assert answer(query, "exe") == brute(rows, "exe") and answer(query, "time", bucket=3600) == \
        brute(rows, "time", bucket=3600)
    query.close()
    picosnitch.Log.open(path).close()
    query = picosnitch.LogQuery(path)
    query.refresh()
    assert query.rollups == list(picosnitch.ROLLUPS)
    week = (NOW - 7 * 86400, NOW + 1)
    for group, bucket in (("time", 3600), ("time", 86400), ("exe", 86400), ("uid", 86400), ("pexe", 86400)):
        assert answer(query, group, bucket=bucket) == brute(rows, group, bucket=bucket)
        assert answer(query, group, [], *week, bucket=bucket) == brute(rows, group, [], *week, bucket=bucket)


def test_a_version_2_log_halfway_through_a_migration_goes_on(tmp_path):
    path = str(tmp_path / "snitch.db")
    loggen.write_legacy(path, 2000, "v1", seed=8, days=2)
    original = picosnitch.db_rows(path)
    log = picosnitch.Log.open(path)
    assert [log.migrate(700) for _ in range(4)] == [0, 0, 0, 700]       # (its three indexes first)
    log.close()
    as_version_2(path)
    log = picosnitch.Log.open(path)
    assert log.migrating() and len(picosnitch.db_rows(path)) == len(original)
    while log.migrate(500) is not None:
        pass
    log.close()
    rows = picosnitch.db_rows(path)
    assert sorted(map(repr, (tuple(r.values())[:17] for r in rows))) == \
        sorted(map(repr, (tuple(r.values())[:17] for r in original)))
    query = picosnitch.LogQuery(path)
    query.refresh()
    for group in ("exe", "time", "uid"):
        assert answer(query, group, bucket=3600) == brute(rows, group, bucket=3600)


# -- giving free pages back ---------------------------------------------------------

def moved_over(path, n, layout):
    """An older log of n rows, moved over whole; the log, still open."""
    loggen.write_legacy(path, n, layout, seed=6, days=4)
    log = picosnitch.Log.open(path)
    while log.migrate(5000) is not None:
        pass
    return log


LATE = [(f"2026-12-01 10:00:0{i}", 5 + i, 6, "/usr/bin/late", "late", "late --now", "ab" * 32, "", "", "", "", 0,
         1, 2, "", "", "", "udp", "", "", "", "") for i in range(3)]


@pytest.mark.parametrize("layout", ["v1", "upstream-1.0.3"])
def test_a_moved_log_gives_its_space_back_and_reads_back_equal(tmp_path, monkeypatch, layout):
    """The old table leaves most of the file free; a compact copy, made while
    windows go on and caught up with them, takes its place: fewer than 5% of
    its pages are free, every row and every total is the same, and it gives
    what retention frees back by itself (in steps made small for a small log)."""
    monkeypatch.setattr(picosnitch, "SHRINK_MIN_PAGES", 64)
    monkeypatch.setattr(picosnitch, "GIVE_BACK_STEP", 64)
    path = str(tmp_path / "snitch.db")
    log = moved_over(path, 20000, layout)
    assert log.wasteful() and not log.incremental() and free_share(path) > 0.5
    size, old = os.path.getsize(path), len(picosnitch.db_rows(path))
    copy = picosnitch.compact_copy(path)
    log.insert(LATE[:2])                            # windows written while the copy was made
    assert picosnitch.catch_up(copy, path) == 2
    log.insert(LATE[2:])
    rows = picosnitch.db_rows(path)
    assert picosnitch.catch_up(copy, path) == 1     # (and the last one, by the primary, before the swap)
    assert log.checkpointed()
    log.close()
    picosnitch.replace_log(copy, path)
    assert not os.path.exists(copy) and not os.path.exists(path + "-wal")
    assert picosnitch.db_rows(path) == rows and len(rows) == old + 3
    assert free_share(path) < 0.05 and os.path.getsize(path) < size / 3
    query = picosnitch.LogQuery(path)
    query.refresh()
    for group, bucket in (("exe", 86400), ("domain", 86400), ("lport", 86400), ("time", 3600), ("time", 86400)):
        assert answer(query, group, bucket=bucket) == brute(rows, group, bucket=bucket)
    query.close()

    log = picosnitch.Log.open(path)
    assert log.incremental() and not log.wasteful()
    log.insert(LATE[:1])                            # (the next windows go on: ids and rollups continue)
    assert picosnitch.db_rows(path)[-1]["contime"] == LATE[0][0] and len(picosnitch.db_rows(path)) == old + 4
    while log.prune(1, picosnitch.now_seconds()) is None:
        pass
    assert log.wasteful()
    steps = 1
    while not log.give_back(budget=0):
        steps += 1
    assert not log.wasteful() and steps > 1
    log.close()


def test_a_new_log_gives_pages_back_by_itself(tmp_path):
    path = str(tmp_path / "snitch.db")
    make_log(path)
    log = picosnitch.Log.open(path)
    assert log.incremental()
    log.close()


def test_a_stop_while_the_compact_copy_is_made_or_put_in_place_loses_nothing(tmp_path):
    """A copy cut short is removed and made again; a stop between the old
    log's WAL going and the copy taking its name leaves the old log whole."""
    path = str(tmp_path / "snitch.db")
    log = moved_over(path, 5000, "v1")
    copy = path + picosnitch.COMPACT_SUFFIX
    with open(copy, "wb") as f:
        f.write(b"SQLite format 3\0 cut short by a stop")
    made = picosnitch.compact_copy(path)
    assert made == copy and picosnitch.db_rows(copy) == picosnitch.db_rows(path)
    log.insert(LATE)                                # (in the WAL only, until a checkpoint)
    rows = picosnitch.db_rows(path)
    assert os.path.getsize(path + "-wal") > 0
    assert log.checkpointed()                       # (every row in the file itself: the WAL may go)
    log.close()
    for suffix in ("-wal", "-shm"):                 # replace_log's first step, then a stop
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    assert picosnitch.db_rows(path) == rows
    picosnitch.remove_copy(copy)
    copy = picosnitch.compact_copy(path)            # the next start makes it again
    picosnitch.replace_log(copy, path)
    assert picosnitch.db_rows(path) == rows and free_share(path) < 0.05


def test_a_compact_copy_needs_room_on_the_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "snitch.db")
    moved_over(path, 5000, "v1").close()
    size = os.path.getsize(path)
    full = os.statvfs_result((4096, 4096, 1 << 20, 0, 10, 1 << 20, 1000, 1000, 0, 255))     # (40 kB free)
    monkeypatch.setattr(picosnitch.os, "statvfs", lambda p: full)
    with pytest.raises(picosnitch.PicosnitchError, match=r"snitch.db has \d+ MB of free pages to give back, but its "
                                                         r"disk has 0 MB free"):
        picosnitch.compact_copy(path)
    assert os.path.getsize(path) == size and not os.path.exists(path + picosnitch.COMPACT_SUFFIX)


def test_the_old_rows_go_a_batch_a_step_and_a_stop_among_them_loses_nothing(tmp_path, monkeypatch):
    """After the rows are over and rolled up, the old table is emptied a
    batch per step (dropping a big one at once holds the log for seconds),
    then dropped; a stop in between goes on where it was."""
    monkeypatch.setattr(picosnitch, "CLEAR_BATCH", 1000)
    path = str(tmp_path / "snitch.db")
    loggen.write_legacy(path, 3500, "v1", seed=11, days=2)
    log = picosnitch.Log.open(path)
    log.insert(LATE)
    expected = picosnitch.db_rows(path)
    old_rows = lambda: log.con.execute(f"SELECT count(*) FROM {picosnitch.LEGACY_TABLE}").fetchone()[0]
    gone, stopped = [], False
    while log.migrating():
        before = old_rows()
        log.migrate(700)
        if log.migrating() and old_rows() < before:
            gone.append(before - old_rows())
            if len(gone) == 2 and not stopped:
                log.close()                         # a stop between two batches
                log, stopped = picosnitch.Log.open(path), True
    assert gone[:3] == [1000, 1000, 1000] and sum(gone) == len(expected) - len(LATE) and stopped
    assert picosnitch.db_rows(path) == expected
    query = picosnitch.LogQuery(path)
    query.refresh()
    assert answer(query, "exe") == brute(expected, "exe") and answer(query, "time", bucket=3600) == \
        brute(expected, "time", bucket=3600)
    query.close()
    log.close()
