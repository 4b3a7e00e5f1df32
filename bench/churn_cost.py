#!/usr/bin/env python3
"""Connection churn, in-process: what one window of a churning program costs
picosnitch's processes, per row, stage by stage, without a daemon or a
kernel program.

The window is one program's connections to a listener that the same
executable forked (tests/churn.c's TCP run): a client row for each, with a
local port of its own and the listener's port as remote port, and a server
row, the other way round. Each stage is timed on that window, its best of
--repeat runs (and the median), in microseconds a row of the CPU time of
the thread that runs it (what picosnitch's share of a core is made of; a
machine busy meanwhile changes it less than the time a stage takes):

1. the reader: Tracker.conns, from the kernel's keys and values, as read from
   its maps, to Conn rows;
2. the reader: encode_message of the window's Batch messages (as
   WindowSender cuts them), and the primary: decode_message of them;
3. the primary: Log.encode and Log.insert, into a log that holds --earlier
   rows of the same shape (over the 20 hours before), kept in --keep;
4. the primary: Primary.window, all of it (hashes from a thread that answers
   for the monitor, record.json, the log), on a copy of that log.

usage: /opt/picosnitch/bin/python3 bench/churn_cost.py [--conns 5000] [--earlier 1000000] [--keep DIR]
"""
import argparse
import os
import pwd
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import picosnitch as ps  # noqa: E402

EXE = "/tmp/churn-tcp-a"
CLIENT = ps.ProcInfo(4000, EXE, "churn-tcp-a", EXE + " tcp 127.0.0.1 7400 0", 64769, 777, 1_700_000_000_000,
                     (4000, 99), True)
SERVER = ps.ProcInfo(4001, EXE, "churn-tcp-a", EXE + " tcp 127.0.0.1 7400 0", 64769, 777, 1_700_000_000_000,
                     (4000, 99), True)
SHELL = ps.ProcInfo(3000, "/usr/bin/bash", "bash", "bash", 64769, 555, 0, (3000, 0), True)
INIT = ps.ProcInfo(1, "/usr/lib/systemd/systemd", "systemd", "/sbin/init", 64769, 2, 0, (1, 0), True)
PORT = 7400
CONTIME = "2026-12-06 15:00:00"


def conns(n, start=0):
    """A window of n connections: a client row and a server row each."""
    out = []
    for i in range(n):
        port = 32768 + (start + i) % 28000
        out.append(ps.Conn(CLIENT, SHELL, INIT, 1000, "tcp", port, PORT, "127.0.0.1", "127.0.0.1", "", 5, 0))
        out.append(ps.Conn(SERVER, CLIENT, SHELL, 1000, "tcp", PORT, port, "127.0.0.1", "127.0.0.1", "", 0, 5))
    return out


def rows_of(window, contime):
    config = ps.Config()
    return [ps.conn_row(c, contime, "ab" * 32, "cd" * 32, "ef" * 32, c.domain, config) for c in window]


def timed(run, repeat):
    """The best and the median of repeat runs, in seconds."""
    times = []
    for _ in range(repeat):
        began = time.thread_time()
        run()
        times.append(time.thread_time() - began)
    return min(times), statistics.median(times)


def say(label, seconds, rows):
    print(f"{label:44s} {seconds[0] / rows * 1e6:7.2f} us a row (median {seconds[1] / rows * 1e6:.2f})")


def tracker_stage(n, repeat):
    tracker = ps.Tracker(0xFFFFFFFF, lambda notice: None)
    hdr = ps.EventHdrT(kind=ps.EVENT_KINDS["CONN"][0], time=1)
    for proc, lineage in ((CLIENT, (SHELL, INIT)), (SERVER, (CLIENT, SHELL))):
        tracker.procs[proc.pid] = ps.dataclasses.replace(proc, dev=ps.kernel_dev_to_user(0))
        tracker.lineage[proc.pid] = lineage
        announced = ps.ConnT()
        announced.key.pid, announced.key.exe, announced.key.prot, announced.key.family = proc.pid, 0xabc, 0xff01, 2
        announced.key.sk, announced.info.ino, announced.info.proto = 1, proc.ino, 6
        hdr.proc.pid, hdr.proc.ino = proc.pid, proc.ino
        tracker.handle(("CONN", hdr, announced))
    entries = []
    for i in range(n):
        for pid, lport, rport in ((CLIENT.pid, 32768 + i, PORT), (SERVER.pid, PORT, 32768 + i)):
            key = ps.ConnKeyT(sk=0xffff000000 + i, exe=0xabc, prot=0xff01, pid=pid, uid=1000, rport=rport,
                              lport=lport, family=ps.AF_INET)
            key.raddr[:4] = key.laddr[:4] = [127, 0, 0, 1]
            entries.append((key, ps.ConnValT(5, 0)))
    say("reader: Tracker.conns", timed(lambda: tracker.conns(entries), repeat), len(entries))


def message_stage(n, repeat):
    window = conns(n)
    part = ps.WindowSender.PART
    batches = [ps.Batch(1, i // part, False, CONTIME, window[i:i + part]) for i in range(0, len(window), part)]
    data = [ps.encode_message(b) for b in batches]
    say("reader: encode_message (Batch)", timed(lambda: [ps.encode_message(b) for b in batches], repeat), len(window))
    say("primary: decode_message (Batch)", timed(lambda: [ps.decode_message(d) for d in data], repeat), len(window))
    print(f"{'  bytes a row':44s} {sum(len(d) for d in data) / len(window):7.1f}")
    assert [c for d in data for c in ps.decode_message(d).conns] == window


def earlier_log(keep, n, earlier):
    """The log of earlier windows of the same shape, made once (Log.insert) and kept."""
    path = os.path.join(keep, f"churn-{n}-{earlier}.db")
    if not os.path.exists(path):
        log = ps.Log.open(path + ".part")
        start, windows = ps.local_seconds("2026-12-05 19:00:00"), max(1, earlier // (2 * n))
        for w in range(windows):
            log.insert(rows_of(conns(n, w * n), time.strftime(ps.TIME_FORMAT, time.gmtime(start + w * 72000 // windows))))
        log.close()
        os.rename(path + ".part", path)
    return path


def storage_stage(n, repeat, base, tmp):
    path = os.path.join(tmp, "snitch.db")
    shutil.copy(base, path)
    windows = [rows_of(conns(n, 7777 + w * n), CONTIME) for w in range(repeat)]
    log = ps.Log.open(path)
    log.insert(windows[0][:10])         # (its processes and strings known, as in a running primary)
    encoding, inserting = [], []
    for rows in windows:
        began = time.thread_time()
        with log.con:
            [log.encode(r) for r in rows]
        encoding.append(time.thread_time() - began)
        began = time.thread_time()
        log.insert(rows)
        inserting.append(time.thread_time() - began)
    log.close()
    say("primary: Log.encode", (min(encoding), statistics.median(encoding)), len(windows[0]))
    say("primary: Log.insert", (min(inserting), statistics.median(inserting)), len(windows[0]))


def primary_stage(n, repeat, base, tmp):
    me = pwd.getpwuid(os.getuid())
    user = ps.User(me.pw_name, me.pw_uid, me.pw_gid, tmp)
    state = os.path.join(tmp, "state")
    os.makedirs(os.path.join(state, ps.PRIVATE_NAME))
    shutil.copy(base, os.path.join(state, ps.DB_NAME))
    rt = ps.make_runtime(ps.Setup(ps.Config(geoip_lookup=False), user, user, state, []), {})
    sent, reports = ps.Channel.pair()       # (read by nobody: a full channel drops reports, and counts them)
    rt.reporter = ps.Reporter(sent)
    rt.hash_primary, monitor = ps.Channel.pair()

    def answer():
        while True:
            try:
                request = monitor.recv()
            except (EOFError, ValueError, OSError):
                return
            monitor.send(ps.HashAnswer(request.id, [["ab" * 32, ""] for _ in request.procs]))
    threading.Thread(target=answer, daemon=True).start()
    primary = ps.Primary(rt)
    windows = [conns(n, 9999 + w * n) for w in range(repeat + 1)]
    primary.window(1, CONTIME, windows[0][:10])
    times = []
    for w, window in enumerate(windows[1:], 2):
        began = time.thread_time()
        primary.window(w, CONTIME, window)
        times.append(time.thread_time() - began)
    say("primary: Primary.window (all of it)", (min(times), statistics.median(times)), len(windows[0]))
    primary.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=5000, help="connections a window (two rows each)")
    parser.add_argument("--earlier", type=int, default=1_000_000, help="rows in the log before the window")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each stage")
    parser.add_argument("--keep", default=os.path.join(tempfile.gettempdir(), "picosnitch-churn-cost"),
                        help="where the log of earlier rows is kept between runs")
    args = parser.parse_args(argv)
    os.makedirs(args.keep, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="churn-cost.")
    try:
        tracker_stage(args.conns, args.repeat)
        message_stage(args.conns, args.repeat)
        base = earlier_log(args.keep, args.conns, args.earlier)
        storage_stage(args.conns, args.repeat, base, tmp)
        primary_stage(args.conns, args.repeat, base, tmp)
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
