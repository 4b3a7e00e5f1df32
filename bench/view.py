#!/usr/bin/env python3
"""How fast `picosnitch view` answers on a big log.

Generates a snitch.db of ROWS rows (default one million over 30 days) the
way the daemon writes them (one row per connection per 10 s window, shared
contime, a few hundred programs and thousands of domains with long-tailed
use), then:

1. times each key press of a scripted session inside the viewer: the key's
   action and the drawing of an 80x24 screen (Viewer.press + Viewer.screen,
   everything but the terminal's own output);
2. runs `picosnitch view` in tmux on the same file and times, for some keys,
   how long until the screen has changed (this includes tmux's polling);
3. prints the query plans of the viewer's SQL (both use the rowid key).

usage: /usr/bin/python3 bench/view.py [--rows N] [--db PATH] [--report FILE]
"""
import argparse
import datetime
import os
import random
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import picosnitch  # noqa: E402

PYTHON = "/usr/bin/python3"
WINDOW = 10

# the scripted session: (key name for the report, Viewer action)
SESSION = ([("start", None)] + [("down", "down")] * 3 + [("pgdn", "page_down"), ("end", "end"), ("home", "home")]
           + [("right", "view_next")] * 11 + [("left", "view_prev")] * 2
           + [("f", "filter"), ("right", "view_next"), ("f", "filter"), ("e", "exclude"), ("right", "view_next")]
           + [("t", "range_next")] * 7 + [("T", "range_prev")] * 2 + [("h", "older")] * 3 + [("H", "newer")] * 2
           + [("u", "unit_next")] * 3 + [("U", "unit_prev")]
           + [("backspace", "undo"), ("E", "clear_excludes"), ("F", "clear_filters"), ("r", "refresh")]
           + [("left", "view_prev")] * 3 + [("space", "filter"), ("t", "range_next"), ("backspace", "undo")])


def pareto(n, alpha=1.1):
    return min(int(random.paretovariate(alpha)) - 1, n - 1)


def generate(path, rows):
    """rows rows as the primary writes them, newest last, over 30 days for a
    million rows (fewer days for fewer rows: about 4 rows a window)."""
    days = max(1, min(30, rows // 33000))
    random.seed(7)
    con = picosnitch.db_open(path)
    exes = [f"/usr/bin/program-{i}" for i in range(400)]
    domains = [f"host{i}.service{i % 97}.example" for i in range(6000)]
    windows = max(1, days * 86400 // WINDOW)
    per_window = rows / windows
    start = datetime.datetime.now() - datetime.timedelta(days=days)
    live, batch, written = [], [], 0
    for w in range(windows):
        contime = (start + datetime.timedelta(seconds=w * WINDOW)).strftime(picosnitch.TIME_FORMAT)
        count = int(per_window * (w + 1)) - int(per_window * w)
        while len(live) < count * 2:      # connections live for a few windows
            e, d = pareto(len(exes)), pareto(len(domains))
            live.append((exes[e], e, domains[d], d, random.randint(32768, 60999), random.choice((443, 443, 80, 53, 22))))
        for exe, e, domain, d, lport, rport in random.sample(live, count):
            name = os.path.basename(exe)
            batch.append((contime, random.randint(40, 2 * 10 ** 5), random.randint(40, 3 * 10 ** 6), exe, name,
                          f"{name} --profile default", f"{e:064x}", "/usr/lib/systemd/systemd", "systemd",
                          "/sbin/init", "f" * 64, 1000 if e % 3 else 0, lport, rport, "192.168.1.20",
                          f"10.{d % 200}.{d // 200 % 250}.{e % 250}", domain, "tcp", "/usr/bin/login", "login",
                          "login -p", "e" * 64))
        live = live[max(1, count // 2):]
        written += count
        if len(batch) >= 50000 or w == windows - 1:
            picosnitch.db_insert(con, batch)
            batch = []
    con.close()
    return written


def model_session(path):
    """Seconds per key press inside the viewer, and the time to read the log."""
    import numpy
    began = time.perf_counter()
    viewer = picosnitch.Viewer(path, None, numpy)
    load = time.perf_counter() - began
    times = []
    for key, action in SESSION:
        began = time.perf_counter()
        viewer.press(action, 20)
        viewer.screen(24, 80)
        times.append((key, time.perf_counter() - began))
    return load, times, len(viewer.log), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Tmux:
    def __init__(self, command):
        self.socket = f"psvb{uuid.uuid4().hex[:8]}"
        self.run("new-session", "-d", "-s", "v", "-x", "80", "-y", "24", command + "; sleep 600")

    def run(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def screen(self):
        return self.run("capture-pane", "-p", "-e", "-t", "v")     # -e: highlights too

    def until(self, test, timeout=300):
        began = time.perf_counter()
        while time.perf_counter() - began < timeout:
            s = self.screen()
            if test(s):
                return time.perf_counter() - began, s
            time.sleep(0.005)
        raise RuntimeError("the viewer did not answer:\n" + self.screen())

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def tmux_session(home):
    """picosnitch view in tmux: seconds to the first screen, then per key until the
    screen changed (keys chosen to change it; r, which may not, is timed above)."""
    t = Tmux(f"HOME={home} {PYTHON} {os.path.join(os.path.dirname(HERE), 'picosnitch.py')} view")
    try:
        first, screen = t.until(lambda s: "by executable (1/11)" in s)
        results = []
        for key, name in [("Down", "down"), ("End", "end"), ("Home", "home"), ("Right", "right"), ("f", "f"),
                          ("t", "t"), ("t", "t"), ("h", "h"), ("u", "u"), ("BSpace", "backspace"),
                          ("Left", "left"), ("T", "T")]:
            before = t.screen()
            t.run("send-keys", "-t", "v", key)
            took, _ = t.until(lambda s: s != before, timeout=30)
            results.append((name, took))
            time.sleep(0.05)
        return first, results
    finally:
        t.close()


def plans(path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    queries = ["SELECT (SELECT MIN(rowid) FROM connections), (SELECT MAX(rowid) FROM connections)",
               f"SELECT rowid, contime, send, recv, {', '.join(picosnitch.VIEW_DB_COLUMNS)} FROM connections "
               "WHERE rowid > 900000 ORDER BY rowid"]
    out = []
    for q in queries:
        out.append((q, [row[-1] for row in con.execute("EXPLAIN QUERY PLAN " + q)]))
    con.close()
    return out


def report(args, rows, load, times, loaded, rss, first, keys, query_plans):
    by_key = {}
    for key, seconds in times[1:]:
        by_key.setdefault(key, []).append(seconds * 1000)
    every = [ms for values in by_key.values() for ms in values]
    lines = [f"# picosnitch view on {rows:,} rows ({datetime.date.today()}, kernel {os.uname().release})", "",
             f"- reading the log at start: {load:.1f} s ({loaded:,} rows), peak RSS {rss:.0f} MB",
             f"- key presses inside the viewer (action + 80x24 screen): {len(every)} presses, "
             f"median {statistics.median(every):.1f} ms, max {max(every):.1f} ms", "",
             "| key | presses | median ms | max ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {len(v)} | {statistics.median(v):.1f} | {max(v):.1f} |" for k, v in by_key.items()]
    lines += ["", f"- in tmux: first screen after {first:.1f} s; until the screen changed after a key (tmux polling included):", "",
              "| key | ms |", "|---|---|"] + [f"| {k} | {s * 1000:.0f} |" for k, s in keys]
    lines += ["", "Query plans:", ""] + [f"- `{q[:60]}…`: {'; '.join(p)}" for q, p in query_plans]
    worst = max(max(every), max(s * 1000 for _, s in keys))
    summary = (f"view: {rows:,} rows, start {load:.1f} s, key press median {statistics.median(every):.1f} ms, "
               f"max {max(every):.1f} ms in the viewer, max {max(s for _, s in keys) * 1000:.0f} ms in tmux; "
               f"target 200 ms {'met' if worst < 200 else 'MISSED'}")
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="use (or create) this snitch.db instead of a temporary one")
    parser.add_argument("--report", help="also write the figures to this markdown file")
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="psview-")
    os.makedirs(os.path.join(home, ".config", "picosnitch"))
    with open(os.path.join(home, ".config", "picosnitch", "config.json"), "w") as f:
        f.write('{"GeoIP lookup": false}')
    path = os.path.join(home, ".config", "picosnitch", "snitch.db")
    if args.db and os.path.exists(args.db):
        os.symlink(os.path.abspath(args.db), path)
        rows = picosnitch.db_rowid_range(picosnitch.db_open_readonly(path))[1]
    else:
        began = time.perf_counter()
        rows = generate(path, args.rows)
        print(f"generated {rows:,} rows in {time.perf_counter() - began:.0f} s", flush=True)
        if args.db:
            os.rename(path, args.db)
            os.symlink(os.path.abspath(args.db), path)
    load, times, loaded, rss = model_session(path)
    first, keys = tmux_session(home)
    report(args, rows, load, times, loaded, rss, first, keys, plans(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
