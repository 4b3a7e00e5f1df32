"""Realistic connection logs for the benchmark of the log (bench/log.py) and
the web UI: a desktop's programs over 30 days, with long-tailed use.

- 600 executables, each with a few command lines of 50 to 300 characters, a
  sha256 that sometimes changes (an update), one of 40 parents and one of 8
  grandparents;
- 5,000 domains, each with 1 to 4 addresses, a third of them IPv6; each
  program talks to its own long-tailed set of them;
- connections from ephemeral local ports, mostly TCP to 443, some UDP (DNS,
  QUIC); each lasts a few write windows of 10 s, one row per window, with
  log-normal bytes; more of them by day than by night.

Rows are written through picosnitch's storage (Log), in the compact layout,
or as one of the older layouts (this project's text table, upstream
picosnitch 1.0.3's) for the migration."""
import math
import os
import random
import sqlite3
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import picosnitch  # noqa: E402

WINDOW = 10
DAYS = 30
WORDS = ["--profile", "default", "--enable-features=WebRTCPipeWireCapturer", "--type=renderer", "--lang=en-US",
         "--user-data-dir=/home/alice/.config/app", "-c", "/etc/app/config.toml", "--no-sandbox", "--field-trial",
         "--disable-gpu-compositing", "--log-level=2", "https://example.org/some/long/path?query=1", "--verbose"]


def pareto(n, rng, alpha=1.2):
    return min(int(rng.paretovariate(alpha)) - 1, n - 1)


class World:
    """The programs, parents, domains and addresses a log is made of."""

    def __init__(self, seed=7, exes=600, domains=5000):
        rng = self.rng = random.Random(seed)
        hexa = lambda: "".join(rng.choice("0123456789abcdef") for _ in range(64))
        self.grandparents = [(f"/usr/lib/systemd/gp{i}", f"gp{i}", f"/usr/lib/systemd/gp{i} --user", hexa())
                             for i in range(8)]
        self.parents = [(f"/usr/bin/parent{i}", f"parent{i}", f"/usr/bin/parent{i} --session " + "x" * rng.randint(20, 80),
                         hexa()) for i in range(40)]
        self.programs = []
        for i in range(exes):
            name = f"program-{i}"
            exe = f"/usr/{rng.choice(['bin', 'lib/' + name, 'libexec'])}/{name}"
            cmdlines = []
            for _ in range(rng.randint(1, 4)):
                line = exe
                target = rng.randint(50, 300)
                while len(line) < target:
                    line += " " + rng.choice(WORDS)
                cmdlines.append(line[:target])
            shas = [hexa() for _ in range(rng.randint(1, 3))]
            self.programs.append((exe, name, cmdlines, shas, rng.randrange(40), rng.randrange(8),
                                  0 if i % 7 == 0 else 1000))
        self.domains = []
        for i in range(domains):
            addrs = []
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.33:
                    addrs.append(f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(65536):x}")
                else:
                    addrs.append(f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
            self.domains.append((f"host{i}.service{i % 311}.example.{rng.choice(['com', 'org', 'net', 'io'])}", addrs))
        # each program talks to a long-tailed set of domains, offset so that programs differ
        self.offsets = [rng.randrange(domains) for _ in range(exes)]

    def connection(self, rng):
        """One connection's fixed part: a row template and its length in windows."""
        p = pareto(len(self.programs), rng, 1.1)
        exe, name, cmdlines, shas, parent, gp, uid = self.programs[p]
        d = (self.offsets[p] + pareto(len(self.domains), rng, 1.05)) % len(self.domains)
        domain, addrs = self.domains[d]
        raddr = rng.choice(addrs)
        proto, rport = ("udp", rng.choice((53, 443))) if rng.random() < 0.15 else ("tcp", rng.choice((443, 443, 443, 80, 22)))
        laddr = "2001:db8:1::20" if ":" in raddr else "192.168.1.20"
        sha = shas[min(int(rng.expovariate(1.5)), len(shas) - 1)]
        template = [exe, name, rng.choice(cmdlines), sha, *self.parents[parent], uid, rng.randint(32768, 60999),
                    rport, laddr, raddr, domain, proto, *self.grandparents[gp]]
        return template, 1 + int(rng.expovariate(1 / 2.5))


def rows(world, n, days=DAYS, end=None):
    """n rows (DB_COLUMNS order), oldest first, over days up to end (local seconds)."""
    rng = world.rng
    end = end if end is not None else picosnitch.now_seconds()
    windows = days * 86400 // WINDOW
    start = end - windows * WINDOW
    weights = [0.3 + math.sin(math.pi * h / 24) ** 2 for h in range(24)]      # busier by day
    hour_weight = sum(weights) / 24
    per_window = n / windows
    live, made, carry = [], 0, 0.0
    for w in range(windows):
        t = start + w * WINDOW
        carry += per_window * weights[(t // 3600) % 24] / hour_weight
        count = int(carry)
        carry -= count
        contime = time.strftime(picosnitch.TIME_FORMAT, time.gmtime(t))
        while len(live) < count:
            live.append(world.connection(rng))
        batch, keep = live[:count], live[count:]
        for template, left in batch:
            send, recv = int(rng.lognormvariate(7, 2)), int(rng.lognormvariate(8, 2.5))
            yield (contime, send, recv, *template)
            made += 1
            if made >= n:
                return
        live = keep + [(tpl, left - 1) for tpl, left in batch if left > 1]


def remove_log(path):
    """A log and its WAL files (a WAL left beside another file would be read as its own)."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)


STALE = 1800        # seconds after which a kept log no longer ends about now


def kept_log(directory, n):
    """The generated log of n rows in directory, written there the first time,
    and again once it no longer ends about now (the viewers' ranges count back
    from now)."""
    path = os.path.join(directory, f"log-{n}.db")
    if os.path.exists(path):
        query = picosnitch.LogQuery(path)
        query.refresh()
        last = query.span()[1]
        query.close()
        if last is None or last < picosnitch.now_seconds() - STALE:
            print(f"{path} ends more than {STALE // 60} minutes ago: it is generated again", flush=True)
            remove_log(path)
    if not os.path.exists(path):
        began = time.perf_counter()
        write_v2(path, n)
        print(f"generated {n:,} rows in {time.perf_counter() - began:.0f} s", flush=True)
    return path


def write_v2(path, n, seed=7, days=DAYS, batch=100_000):
    """A log in the compact layout; returns how many rows."""
    world, log, chunk, made = World(seed), picosnitch.Log.open(path, timeout=30), [], 0
    for row in rows(world, n, days):
        chunk.append(row)
        if len(chunk) >= batch:
            log.insert(chunk)
            made += len(chunk)
            chunk = []
    if chunk:
        log.insert(chunk)
        made += len(chunk)
    log.close()
    return made


# the older layouts: this project's text table (18 columns), upstream 1.0.3's (17)
LEGACY = {
    "v1": ("CREATE TABLE connections (contime TEXT NOT NULL, send INTEGER NOT NULL, recv INTEGER NOT NULL, "
           "exe TEXT, name TEXT, cmdline TEXT, sha256 TEXT, pexe TEXT, pname TEXT, pcmdline TEXT, psha256 TEXT, "
           "uid INTEGER, lport INTEGER, rport INTEGER, laddr TEXT, raddr TEXT, domain TEXT, proto TEXT);"
           "CREATE INDEX connections_contime ON connections (contime);"
           "CREATE INDEX connections_exe ON connections (exe, contime);"
           "CREATE INDEX connections_sha256 ON connections (sha256, contime);", 18),
    "upstream-1.0.3": ("CREATE TABLE connections (contime text, send integer, recv integer, exe text, name text, "
                       "cmdline text, sha256 text, pexe text, pname text, pcmdline text, psha256 text, uid integer, "
                       "lport integer, rport integer, laddr text, raddr text, domain text)", 17),
}


def write_legacy(path, n, layout, seed=7, days=DAYS):
    """A log in an older layout (rollback journal, as those were)."""
    schema, width = LEGACY[layout]
    con = sqlite3.connect(path)
    con.executescript(schema)
    chunk, made = [], 0
    for row in rows(World(seed), n, days):
        chunk.append(row[:width])
        if len(chunk) >= 100_000:
            con.executemany(f"INSERT INTO connections VALUES ({','.join('?' * width)})", chunk)
            made += len(chunk)
            chunk = []
    con.executemany(f"INSERT INTO connections VALUES ({','.join('?' * width)})", chunk)
    con.commit()
    con.close()
    return made + len(chunk)


if __name__ == "__main__":
    began = time.perf_counter()
    count = write_v2(sys.argv[1], int(sys.argv[2]))
    print(f"{count} rows in {time.perf_counter() - began:.1f} s, {os.path.getsize(sys.argv[1]) / count:.0f} bytes a row")
