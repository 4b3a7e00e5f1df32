#!/usr/bin/env python3
"""The log at scale: how picosnitch's connection log stores, moves over,
answers and prunes millions of rows, and how `picosnitch view` answers on it.

For each size asked (default 1M and 10M rows), a realistic log is generated
(bench/loggen.py: 600 programs with 50-300 character command lines and
their hashes, parents and grandparents, 5,000 domains over IPv4 and IPv6,
ephemeral ports, long-tailed use over 30 days), then:

1. bytes per row on disk, and per table;
2. the primary's cost per window (inserting one window's rows);
3. the query layer: totals by each of the viewer's columns, under chains of
   filters and exclusions, over each time range;
4. `picosnitch view` in tmux: time to the first screen, each key until the
   screen changed, and the viewer's peak RSS; also each key inside the
   viewer (its action and an 80x24 screen, without the terminal);
5. retention: the time to prune a day, and the longest write lock it held;
6. migration from the older layouts (this project's text table and upstream
   picosnitch 1.0.3's), for each of --migrate-rows: the time until capture
   can write again after opening, the rate of moving the rows over, the
   viewer's keys meanwhile, the size on disk before and after the log gives
   the old table's space back, the free pages left, and the longest lock of
   each; and the layout's floor, what the steps any migration must take cost
   on their own.

usage: sudo /usr/bin/python3 bench/log.py [--rows 1000000,10000000] [--migrate-rows 1000000,10000000]
                                          [--keep DIR] [--report FILE]
"""
import argparse
import datetime
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import loggen  # noqa: E402
import machine  # noqa: E402
import picosnitch  # noqa: E402

PYTHON = "/usr/bin/python3"
SCRIPT = os.path.join(os.path.dirname(HERE), "picosnitch.py")
VIEW_COLUMNS = [c for _, c in picosnitch.VIEWS]

# the scripted session inside the viewer: (key name for the report, Viewer action)
SESSION = ([("start", None)] + [("down", "down")] * 3 + [("pgdn", "page_down"), ("end", "end"), ("home", "home")]
           + [("right", "view_next")] * 11 + [("left", "view_prev")] * 2
           + [("f", "filter"), ("right", "view_next"), ("f", "filter"), ("e", "exclude"), ("right", "view_next")]
           + [("t", "range_next")] * 7 + [("T", "range_prev")] * 2 + [("h", "older")] * 3 + [("H", "newer")] * 2
           + [("u", "unit_next")] * 3 + [("U", "unit_prev")]
           + [("backspace", "undo"), ("E", "clear_excludes"), ("F", "clear_filters"), ("r", "refresh")]
           + [("left", "view_prev")] * 3 + [("space", "filter"), ("t", "range_next"), ("backspace", "undo")])
# keys sent in tmux, each changing the screen: every view, then filters, ranges, history
TMUX_KEYS = ([("Right", "right")] * 10 + [("Right", "right"), ("Down", "down"), ("f", "f"), ("Right", "right"),
             ("e", "e"), ("t", "t"), ("t", "t"), ("t", "t"), ("h", "h"), ("H", "H"), ("T", "T"), ("u", "u"),
             ("BSpace", "backspace"), ("F", "F"), ("Left", "left"), ("End", "end"), ("Home", "home")])


def ms(seconds):
    return f"{seconds * 1000:.0f}"


def disk(path):
    """Bytes on disk of a log (with its WAL), and per table and index where SQLite can tell."""
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    try:
        tables = con.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
    except sqlite3.OperationalError:
        tables = []
    con.close()
    size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    return size, tables


def window_cost(path, rows_per_window, windows=40):
    """Seconds to write one window (median, max) into the log, as the primary does."""
    world = loggen.World(11)
    source = loggen.rows(world, rows_per_window * windows * 2, days=1)
    log = picosnitch.Log.open(path, timeout=30)
    times = []
    for _ in range(windows):
        batch = [next(source) for _ in range(rows_per_window)]
        began = time.perf_counter()
        log.insert(batch, ("bench", len(times)))
        times.append(time.perf_counter() - began)
    log.close()
    return statistics.median(times), max(times)


def query_times(path):
    """Seconds of LogQuery.totals for each viewer column, filter chain and range."""
    query = picosnitch.LogQuery(path)
    query.refresh()
    now = picosnitch.now_seconds()
    exe = query.totals("exe")[0][0]
    domain = query.totals("domain", [picosnitch.Filter("exe", exe)])[0][0]
    chains = {"no filter": [], "exe =": [picosnitch.Filter("exe", exe)],
              "exe =, domain ≠": [picosnitch.Filter("exe", exe), picosnitch.Filter("domain", domain, True)]}
    ranges = {"all": (None, None), "month": (now - 30 * 86400, now + 1), "week": (now - 7 * 86400, now + 1),
              "day": (now - 86400, now + 1), "hour": (now - 3600, now + 1)}
    results = {}
    for chain_name, chain in chains.items():
        for range_name, (start, end) in ranges.items():
            for column in VIEW_COLUMNS:
                bucket = picosnitch.TIME_BUCKETS[range_name][0]
                began = time.perf_counter()
                query.totals(column, chain, start, end, bucket)
                results[(chain_name, range_name, column)] = time.perf_counter() - began
    query.close()
    return results, port_floor(path, exe.decode() if isinstance(exe, bytes) else exe)


def port_floor(path, exe):
    """The floor of totals by local port over the week: seconds and rows to
    group the whole days' local-port totals alone (the range's partial days
    at either end come on top), of all processes and of exe's."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    now, day = picosnitch.now_seconds(), picosnitch.DAY
    span = (-(-(now - 7 * day) // day) * day, now // day * day)
    out = []
    for procs, params in (("= 0", ()), ("IN (SELECT id FROM procs WHERE exe = ?)", (exe,))):
        began = time.perf_counter()
        groups = con.execute(f"SELECT lport, sum(send), sum(recv), sum(rows) FROM ports WHERE level = {day} AND "
                             f"b >= ? AND b < ? AND proc {procs} GROUP BY lport", span + params).fetchall()
        took = time.perf_counter() - began
        rows = con.execute(f"SELECT count(*) FROM ports WHERE level = {day} AND b >= ? AND b < ? AND proc {procs}",
                           span + params).fetchone()[0]
        out.append((took, rows, len(groups)))
    con.close()
    return out


class Tmux:
    def __init__(self, command):
        self.socket = f"pslb{uuid.uuid4().hex[:8]}"
        self.run("new-session", "-d", "-s", "v", "-x", "80", "-y", "24", command + "; sleep 600")

    def run(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def screen(self):
        return self.run("capture-pane", "-p", "-e", "-t", "v")     # -e: highlights too

    def until(self, test, timeout=120):
        began = time.perf_counter()
        while time.perf_counter() - began < timeout:
            s = self.screen()
            if test(s):
                return time.perf_counter() - began, s
            time.sleep(0.003)
        raise RuntimeError("the viewer did not answer:\n" + self.screen())

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def tmux_session(home, rss_file):
    """picosnitch view in tmux: seconds to the first screen, then per key until
    the screen changed; the viewer's peak RSS (MB) once it quit."""
    measure = (f"import resource, subprocess, sys; subprocess.call(sys.argv[1:]); "
               f"open('{rss_file}', 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))")
    t = Tmux(f"HOME={home} STATE_DIRECTORY={home}/state {PYTHON} -c \"{measure}\" {PYTHON} {SCRIPT} view")
    try:
        first, screen = t.until(lambda s: "by executable (1/11)" in s and "sent" in s)
        results = []
        for key, name in TMUX_KEYS:
            before = t.screen()
            t.run("send-keys", "-t", "v", key)
            took, _ = t.until(lambda s: s != before, timeout=60)
            results.append((name, took))
            time.sleep(0.05)
        t.run("send-keys", "-t", "v", "q")
        deadline = time.monotonic() + 30
        while not os.path.exists(rss_file) and time.monotonic() < deadline:
            time.sleep(0.1)
        rss = int(open(rss_file).read()) / 1024 if os.path.exists(rss_file) else float("nan")
        return first, results, rss
    finally:
        t.close()


def model_session(path):
    """Seconds per key press inside the viewer (action and screen)."""
    began = time.perf_counter()
    viewer = picosnitch.Viewer(path, None)
    viewer.screen(24, 80)
    first = time.perf_counter() - began
    times = []
    for key, action in SESSION[1:]:
        began = time.perf_counter()
        viewer.press(action, 20)
        viewer.screen(24, 80)
        times.append((key, time.perf_counter() - began))
    viewer.close()
    return first, times


def copy_log(path, copy):
    """A copy of a log, on disk before anything is timed: the first commit's
    sync would otherwise wait for the whole copy to be written out."""
    loggen.remove_log(copy)
    shutil.copy(path, copy)
    os.sync()


def prune_cost(path, workdir):
    """Prune the two oldest days (the first is a part of one) of a copy of the
    log, 0.2 s at a time (as the primary does between windows): total seconds,
    longest call, calls, rows gone."""
    copy = os.path.join(workdir, "prune.db")
    copy_log(path, copy)
    query = picosnitch.LogQuery(copy)
    query.refresh()
    low, high = query.span()
    before = query.count()
    days = (high - low) // 86400 - 1      # keep all but the two oldest days
    log = picosnitch.Log.open(copy, timeout=30)
    calls, began = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        n = log.prune(days, high)
        calls.append(time.perf_counter() - t0)
        if n is not None:
            break
    total = time.perf_counter() - began
    log.close()
    gone = before - query.count()
    query.close()
    loggen.remove_log(copy)
    return total, max(calls), len(calls), gone


class KeysMeanwhile(threading.Thread):
    """The viewer's keys (SESSION, over and over) while the log is moved
    over: seconds per key, and whether its heading said how far the move had
    got (at each key)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.times, self.said, self.done = path, [], [], threading.Event()

    def run(self):
        viewer = picosnitch.Viewer(self.path, None)
        while not self.done.is_set():
            for key, action in SESSION[1:]:
                if self.done.is_set():
                    break
                began = time.perf_counter()
                viewer.press(action, 20)
                heading = viewer.screen(24, 80)[0][0]
                self.times.append(time.perf_counter() - began)
                self.said.append(" · moving: " in heading or bool(viewer.problem))
        viewer.close()

    def stop(self):
        self.done.set()
        self.join()


class Moved(typing.NamedTuple):
    opened: float           # seconds until capture writes again
    moved: int              # rows moved over
    took: float             # seconds to move them
    longest: float          # the longest step (each holds the write lock through)
    keys: list              # seconds per viewer key meanwhile
    said: list              # whether the viewer said "moving: N%" at each key
    before: int             # bytes on disk once moved, before the space is given back
    copying: float          # seconds to make the compact copy (writers go on)
    lock: float             # seconds the primary holds the log to put the copy in its place
    after: int              # bytes on disk after
    free: float             # the share of free pages left
    rows: int               # rows in the log after
    floor: list             # migration_floor


def migration(workdir, rows, layout):
    """An older log of rows rows, moved over as the primary does it, with the
    viewer's keys pressed meanwhile, then its space given back (Moved)."""
    path, floor_path = (os.path.join(workdir, f"{name}-{layout}.db") for name in ("old", "floor"))
    loggen.write_legacy(path, rows, layout)
    shutil.copy(path, floor_path)
    os.sync()           # (see copy_log)
    window = lambda: [next(loggen.rows(loggen.World(2), 1, days=1))]
    began = time.perf_counter()
    log = picosnitch.Log.open(path)
    log.insert(window())      # capture writes at once
    opened = time.perf_counter() - began
    keys = KeysMeanwhile(path)
    keys.start()
    began = time.perf_counter()
    moved, longest = 0, 0.0
    while True:
        step = time.perf_counter()
        n = log.migrate()
        longest = max(longest, time.perf_counter() - step)
        if n is None:
            break
        moved += n
    took = time.perf_counter() - began
    keys.stop()
    before = os.path.getsize(path)
    began = time.perf_counter()
    copy = picosnitch.compact_copy(path)
    copying = time.perf_counter() - began
    log.insert(window())      # a window written meanwhile
    began = time.perf_counter()             # (as the primary does it, between two windows)
    assert log.checkpointed()
    picosnitch.catch_up(copy, path)
    held = picosnitch.hold_files(path)
    log.close()
    picosnitch.replace_log(copy, path)
    lock = time.perf_counter() - began
    picosnitch.close_all(held)               # (the old files' space, freed where it holds the primary back in nothing)
    con = sqlite3.connect(path)
    free = con.execute("PRAGMA freelist_count").fetchone()[0] / con.execute("PRAGMA page_count").fetchone()[0]
    count = con.execute("SELECT count(*) FROM conns").fetchone()[0]
    con.close()
    after = os.path.getsize(path)
    floor = migration_floor(floor_path, path)
    loggen.remove_log(path)
    loggen.remove_log(floor_path)
    return Moved(opened, moved, took, longest, keys.times, keys.said, before, copying, lock, after, free, count, floor)


def migration_floor(old_path, migrated_path):
    """What the layout costs to build whatever the migration does, in
    seconds: storing each distinct process and string once (without
    looking up any row's); copying the old rows into conns with their
    times converted but no string interned; grouping the moved rows by the
    hour, by the keys of the rollups and of the ports (the two rollups no
    other is made from); summing those into day totals and the day totals
    into the whole log's (the ports' also over every process); and freeing
    the old table's pages."""
    last, (interned, copied, freed) = old_table_floor(old_path)
    grouped, summed = rollups_floor(migrated_path, last)
    return interned, copied, grouped, summed, freed


def old_table_floor(old_path):
    """The last old rowid, and the seconds of interning, copying and freeing
    (migration_floor) on the old log at old_path."""
    log = picosnitch.Log.open(old_path, timeout=30)      # (the old table renamed, conns empty)
    con, table = log.con, picosnitch.LEGACY_TABLE
    last = con.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
    legacy = [row[1] for row in con.execute(f"PRAGMA table_info({table})")]
    columns = ", ".join(picosnitch.CONNS_COLUMNS)
    copy = (f"INSERT INTO conns (id, {columns}) SELECT rowid, CAST(strftime('%s', contime) AS INTEGER), send, recv, "
            f"0, 0, 0, uid, lport, rport, 0, 0, 0, 0 FROM {table} WHERE rowid > ? AND rowid <= ?")
    seconds = []
    for step in (lambda done: log.intern_old(legacy, done, picosnitch.MIGRATE_BATCH),
                 lambda done: con.execute(copy, (done, done + picosnitch.MIGRATE_BATCH))):
        began = time.perf_counter()
        for done in range(0, last, picosnitch.MIGRATE_BATCH):
            with con:
                step(done)
        seconds.append(time.perf_counter() - began)
    began = time.perf_counter()
    with log.unzeroed(), con:
        con.execute(f"DROP TABLE {table}")
    seconds.append(time.perf_counter() - began)
    log.close()
    return last, seconds


def rollups_floor(migrated_path, last):
    """The seconds of grouping the rows up to id last by the hour, and of
    summing those into days and the whole log (migration_floor)."""
    con = sqlite3.connect(migrated_path)
    grouped = summed = 0.0
    day, whole = picosnitch.DAY, picosnitch.ALL_TIME
    for name in ("rollups", "ports"):
        statement = next(s for s in picosnitch.ROLL_STATEMENTS[picosnitch.HOUR] if s.split()[2] == name)
        keys = picosnitch.ROLLUPS[name]
        began = time.perf_counter()
        con.execute(f"CREATE TEMP TABLE {name} (level, b, {', '.join(keys)}, send, recv, rows)")
        con.execute(f"INSERT INTO temp.{name} {statement[statement.index('SELECT'):statement.index(' ON CONFLICT')]}",
                    (0, last))
        grouped += time.perf_counter() - began
        began = time.perf_counter()     # (the day totals from the hours, the whole log's from the days)
        variants = [keys] + ([("0",) + keys[1:]] if name == "ports" else [])
        for level, source, to in ((day, picosnitch.HOUR, f"CASE WHEN b >= 0 THEN b / {day} * {day} ELSE b END"),
                                  (whole, day, "CASE WHEN b >= 0 THEN 0 ELSE b END")):
            for values in variants:
                con.execute(f"INSERT INTO temp.{name} SELECT {level}, {to}, {', '.join(values)}, sum(send), "
                            f"sum(recv), sum(rows) FROM temp.{name} WHERE level = {source} "
                            f"GROUP BY 2{''.join(', ' + v for v in values if v != '0')}")
        summed += time.perf_counter() - began
    con.close()
    return grouped, summed


def report_lines(size, rows, disk_size, tables, window, queries, floor, tmux, model, prune):
    first, keys, rss = tmux
    lines = [f"## {rows:,} rows", "",
             f"- on disk: {disk_size / 1e6:.0f} MB, **{disk_size / rows:.0f} bytes a row** (target ≤ 100)"]
    if tables:
        lines.append("- by table and index: " + ", ".join(f"{n} {s / 1e6:.0f} MB" for n, s in tables[:8]))
    lines += [f"- the primary's cost per window: {window[0][0] * 1000:.1f} ms median, {window[0][1] * 1000:.1f} ms max "
              f"for {window[0][2]} rows; {window[1][0] * 1000:.1f} ms median, {window[1][1] * 1000:.1f} ms max for "
              f"{window[1][2]} rows",
              f"- retention: pruning the two oldest days ({prune[3]:,} rows) took {prune[0]:.1f} s in {prune[2]} calls; "
              f"the longest call "
              f"(the longest write lock) {ms(prune[1])} ms", ""]
    keyed = [s for _, s in keys]
    lines += [f"- `picosnitch view` in tmux: **first screen after {first:.2f} s**, keys until the screen changed "
              f"(tmux polling included): median {ms(statistics.median(keyed))} ms, **max {ms(max(keyed))} ms**; "
              f"**peak RSS {rss:.0f} MB**", "",
              "| key (tmux) | ms |", "|---|---|"] + [f"| {k} | {ms(s)} |" for k, s in keys]
    by_key = {}
    for key, seconds in model[1]:
        by_key.setdefault(key, []).append(seconds)
    every = [s for values in by_key.values() for s in values]
    lines += ["", f"- inside the viewer (action and an 80x24 screen): first screen {ms(model[0])} ms; "
              f"{len(every)} presses, median {ms(statistics.median(every))} ms, max {ms(max(every))} ms", "",
              "| key | presses | median ms | max ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {len(v)} | {ms(statistics.median(v))} | {ms(max(v))} |" for k, v in by_key.items()]
    ranges = ["all", "month", "week", "day", "hour"]
    lines += ["", "Totals by each viewer column (ms), by filter chain and range:", ""]
    for chain in dict.fromkeys(c for c, _, _ in queries):
        lines += [f"*{chain}*", "", "| range | " + " | ".join(VIEW_COLUMNS) + " |",
                  "|---|" + "---|" * len(VIEW_COLUMNS)]
        for r in ranges:
            lines.append(f"| {r} | " + " | ".join(ms(queries[(chain, r, c)]) for c in VIEW_COLUMNS) + " |")
        lines.append("")
    slow = sorted(((s, k) for k, s in queries.items()), reverse=True)
    over = [(s, k) for s, k in slow if s > 0.2]
    lines.append(f"- {len(queries) - len(over)} of {len(queries)} queries within 200 ms; the slowest: "
                 + "; ".join(f"{k[2]} under '{k[0]}' over {k[1]}: {ms(s)} ms" for s, k in slow[:5]))
    lines.append("- the floor of totals by local port over the week, grouping the whole days' local-port totals "
                 "alone (the partial days at either end come on top): "
                 + "; ".join(f"{who}, {rows:,} totals into {groups:,} ports: {ms(took)} ms"
                             for who, (took, rows, groups) in zip(("all processes", "the first program's"), floor)))
    return lines, {"bytes": disk_size / rows, "first": first, "key_max": max(keyed), "rss": rss,
                   "queries_over": len(over), "queries": len(queries), "query_max": slow[0][0]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000,10000000", help="sizes of the generated logs, comma separated")
    parser.add_argument("--migrate-rows", default="1000000", help="sizes of the older logs moved over, comma "
                                                                   "separated")
    parser.add_argument("--keep", help="keep (and reuse) the generated logs in this directory")
    parser.add_argument("--report", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="pslog-")
    keep = args.keep or workdir
    os.makedirs(keep, exist_ok=True)
    lines = [f"# picosnitch's log at scale ({datetime.date.today()}, kernel {os.uname().release}, "
             f"SQLite {sqlite3.sqlite_version})", "", *machine.describe(), ""]
    summary = []
    try:
        for size in [int(s) for s in args.rows.split(",")]:
            path = loggen.kept_log(keep, size)
            rows = picosnitch.LogQuery(path)
            rows.refresh()
            count = rows.count()
            rows.close()
            disk_size, tables = disk(path)
            home = os.path.join(workdir, f"home-{size}")
            directory = os.path.join(home, ".config", "picosnitch")
            os.makedirs(directory)
            with open(os.path.join(directory, "config.json"), "w") as f:
                f.write('{"GeoIP lookup": false}')
            os.makedirs(os.path.join(home, "state"))          # (the viewer's state directory: STATE_DIRECTORY)
            os.symlink(path, os.path.join(home, "state", "snitch.db"))
            tmux = tmux_session(home, os.path.join(workdir, f"rss-{size}"))
            model = model_session(path)
            queries, port_floors = query_times(path)
            prune = prune_cost(path, workdir)
            copy = os.path.join(workdir, "window.db")
            copy_log(path, copy)
            window = [(*window_cost(copy, n), n) for n in (40, 400)]
            loggen.remove_log(copy)
            section, figures = report_lines(size, count, disk_size, tables, window, queries, port_floors, tmux, model,
                                            prune)
            lines += section + [""]
            summary.append(f"{count:,} rows: {figures['bytes']:.0f} B/row, first screen {figures['first']:.2f} s, "
                           f"keys max {ms(figures['key_max'])} ms, RSS {figures['rss']:.0f} MB, "
                           f"{figures['queries'] - figures['queries_over']}/{figures['queries']} queries ≤ 200 ms "
                           f"(max {ms(figures['query_max'])} ms)")
            print(summary[-1], flush=True)
        lines += ["## Migration", "", "The viewer's keys (its action and an 80x24 screen) are pressed over and over "
                  "while the rows move; then the log gives the old table's space back: a compact copy is made "
                  "while windows go on, and put in the log's place between two windows.", "",
                  "| layout | rows | until capture writes (s) | rows moved per second | longest step, the longest "
                  "write lock (s) | keys meanwhile: median / max ms | keys whose screen said \"moving: N%\" | "
                  "bytes a row once moved | compact copy (s, writers go on) | the longest lock giving space "
                  "back (s) | bytes a row after | free pages after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        floors = []
        for size in [int(s) for s in args.migrate_rows.split(",")]:
            for layout in loggen.LEGACY:
                m = migration(workdir, size, layout)
                lines.append(f"| {layout} | {m.moved:,} | {m.opened:.2f} | {m.moved / m.took:,.0f} | {m.longest:.2f} | "
                             f"{ms(statistics.median(m.keys))} / {ms(max(m.keys))} | {sum(m.said)} of "
                             f"{len(m.said)} | {m.before / m.rows:.0f} | {m.copying:.1f} | {m.lock:.2f} | "
                             f"{m.after / m.rows:.0f} | {m.free:.1%} |")
                floors.append((layout, m.moved, m.floor))
                summary.append(f"migration of {m.moved:,} rows from {layout}: {m.moved / m.took:,.0f} rows/s, capture "
                               f"after {m.opened:.2f} s, keys meanwhile max {ms(max(m.keys))} ms, "
                               f"{m.after / m.rows:.0f} B/row after (was {m.before / m.rows:.0f}), longest lock "
                               f"{max(m.longest, m.lock):.2f} s")
                print(summary[-1], flush=True)
        lines += ["", "The layout's floor: what the steps any migration to it must take cost on their own "
                  "(seconds)", "",
                  "| layout | storing the distinct processes and strings | copying the rows into conns (no ids "
                  "looked up) | grouping them by the hour, by the rollups' and ports' keys | day and whole-log "
                  "totals from those | freeing the old table | together | rows per second at most |",
                  "|---|---|---|---|---|---|---|---|"]
        for layout, moved, steps in floors:
            lines.append(f"| {layout} | " + " | ".join(f"{s:.3f}" for s in steps) + f" | {sum(steps):.3f} | "
                         f"{moved / sum(steps):,.0f} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(lines) + "\n\nSummary: " + "; ".join(summary) + "\n"
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    print(text)
    print("log: " + "; ".join(summary) + f"; on {machine.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
