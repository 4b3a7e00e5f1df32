#!/usr/bin/python3
"""What a program running as the desktop user can do to picosnitch.

usage: sudo /usr/bin/python3 bench/reach.py [--seconds 60] [--window 10] [--report PATH]
                                           [--picosnitch PATH] [--python PATH]

A throwaway user gets a session bus with a recording notification service,
and picosnitch runs for that user (as under sudo). Then a program of that
user tries, in turn, each of these, and the script reports what happened:

- silence: it kills, by pid, every process of its own uid whose command line
  names picosnitch, every 50 ms, for --seconds, while a new program of its
  own sends 300,000 bytes. Measured: the time from that program's first
  datagram to its row in the log (while the killing goes on), and to its
  "first network connection" notification after the killing stops; the
  deaths on record, and whether they carry the times they happened.
- silence, then a stop: picosnitch is stopped (SIGTERM) 5 s after the
  killing ends and started again; are the 300,000 bytes in the log?
- pre-approval: while picosnitch is stopped, it writes a new executable and
  its sha256 into record.json (replacing the file if it cannot write it),
  then runs it: is "first network connection" notified anyway?
- erasure: it deletes its rows from snitch.db, and tries to truncate,
  replace and delete each file of picosnitch's it can find.
- quiet reconfiguration: it adds its hash to "Log ignore" and turns
  notifications off; is the change notified at the next start?
- another local account (nobody) fetches `picosnitch dash` on loopback.

The user's programs only ever touch ~/.config/picosnitch/ (where the user
finds picosnitch's files, whatever they link to) and what `status` names.
Traffic goes to 127.0.0.1 only. The report says which machine it ran on.
"""
import argparse
import contextlib
import datetime
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import machine  # noqa: E402
import run as bench_run  # noqa: E402  (private_resolver)

TOTAL = 300_000         # bytes the new program sends
DATAGRAMS = 30          # in this many datagrams, spread over the killing

# The program that kills: every process of its uid whose command line names
# picosnitch, by pid, every 50 ms, until its time is up; it prints how many
# it killed, and when it stopped.
KILLER = r"""
import os, signal, sys, time
me, end, kills = os.getpid(), time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != me and os.stat(f"/proc/{pid}").st_uid == os.getuid():
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"picosnitch" in f.read():
                        os.kill(int(pid), signal.SIGKILL)
                        kills += 1
        except OSError:
            pass
    time.sleep(0.05)
print(kills, time.time())
"""

# The new program: DATAGRAMS datagrams, TOTAL bytes in all, over `seconds`;
# it prints the time of its first datagram.
SENDER = r"""
import socket, sys, time
total, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
size = total // count
for i in range(count):
    s.sendto(b"x" * (size if i < count - 1 else total - size * (count - 1)), ("127.0.0.1", 9))
    if i == 0:
        print(time.time(), flush=True)
    time.sleep(seconds / count)
"""


class User:
    """A throwaway user with a home and a session bus of its own, and the
    recording notification service on that bus."""

    def __init__(self, python):
        self.name = f"psr{os.getpid() % 100000}"
        self.base = tempfile.mkdtemp(prefix="psr-")       # no "picosnitch" in any path the killer sees
        os.chmod(self.base, 0o755)
        self.home = os.path.join(self.base, "home")
        os.mkdir(self.home)
        subprocess.run(["useradd", "--home-dir", self.home, "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--user-group", self.name], check=True)
        self.pw = pwd.getpwnam(self.name)
        os.chown(self.home, self.pw.pw_uid, self.pw.pw_gid)
        os.chmod(self.home, 0o700)
        self.dir = os.path.join(self.home, ".config", "picosnitch")
        bus_dir = os.path.join(self.base, "bus")
        os.mkdir(bus_dir)
        os.chown(bus_dir, self.pw.pw_uid, self.pw.pw_gid)
        self.bus = f"unix:path={bus_dir}/bus"
        self.record = os.path.join(bus_dir, "notifications.jsonl")
        service = os.path.join(bus_dir, "notifications.py")
        shutil.copy(os.path.join(ROOT, "tests", "notify_service.py"), service)
        self.procs = [self.popen(["dbus-daemon", "--session", "--nofork", f"--address={self.bus}",
                                  "--print-address"], stdout=subprocess.PIPE)]
        self.procs[0].stdout.readline()
        self.procs.append(self.popen([python, service, self.bus, self.record], stdout=subprocess.PIPE))
        assert self.procs[1].stdout.readline().strip() == b"ready"

    def become(self):
        os.setgroups([])
        os.setgid(self.pw.pw_gid)
        os.setuid(self.pw.pw_uid)

    def popen(self, cmd, env=None, **kw):
        return subprocess.Popen(cmd, preexec_fn=self.become, cwd="/",
                                env=dict({"HOME": self.home, "PATH": "/usr/bin:/bin"}, **(env or {})), **kw)

    def run(self, cmd, **kw):
        return subprocess.run(cmd, preexec_fn=self.become, cwd="/", capture_output=True, text=True,
                              env={"HOME": self.home, "PATH": "/usr/bin:/bin"}, **kw)

    def notifications(self):
        with contextlib.suppress(OSError), open(self.record) as f:
            return [json.loads(line) for line in f if line.strip()]
        return []

    def remove(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()
        subprocess.run(["pkill", "-KILL", "-u", self.name], capture_output=True)
        time.sleep(0.5)
        subprocess.run(["userdel", self.name], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


class Daemon:
    """picosnitch start-no-daemon for the user, with a state directory of its
    own (STATE_DIRECTORY), a private resolver, and its output kept."""

    def __init__(self, args, user, workdir):
        self.args, self.user = args, user
        self.state = os.path.join(workdir, "state")
        os.makedirs(self.state, exist_ok=True)
        os.chmod(workdir, 0o755)
        self.resolver = os.path.join(workdir, "resolver")
        os.makedirs(self.resolver, exist_ok=True)
        self.proc, self.lines = None, []

    def start(self):
        cmd = bench_run.private_resolver([self.args.python, self.args.picosnitch, "start-no-daemon"], self.resolver)
        env = dict(os.environ, SUDO_USER=self.user.name, DBUS_SESSION_BUS_ADDRESS=self.user.bus,
                   STATE_DIRECTORY=self.state)
        self.proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if "capturing" in line:
                    ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(120):
            raise SystemExit("picosnitch did not start:\n" + "\n".join(self.lines))

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)

    def log_path(self, name):
        """Where root finds one of picosnitch's files (the user's link to it, if any, is followed)."""
        return os.path.realpath(os.path.join(self.user.dir, name))

    def sent(self, exe):
        with contextlib.suppress(sqlite3.Error), \
                contextlib.closing(sqlite3.connect(f"file:{self.log_path('snitch.db')}?mode=ro", uri=True,
                                                   timeout=2)) as con:
            return con.execute("SELECT coalesce(sum(send), 0) FROM connections WHERE exe = ?", (exe,)).fetchone()[0]
        return 0

    def error_log(self):
        with contextlib.suppress(OSError), open(self.log_path("error.log"), encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
        return []


def unique_program(workdir, python):
    """A copy of python with a new name and sha256, runnable by the user."""
    path = os.path.join(workdir, "psr" + uuid.uuid4().hex[:8])
    shutil.copy2(os.path.realpath(python), path)
    with open(path, "ab") as f:
        f.write(uuid.uuid4().bytes)
    os.chmod(path, 0o755)
    return path


def wait_until(predicate, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def notified_at(user, exe, after=0.0):
    """The time the notification service got the first notice naming exe."""
    for n in user.notifications():
        if exe in n.get("body", "") and n.get("time", 0) >= after:
            return n.get("time")
    return None


def silence(args, user, daemon, workdir):
    """Kill loop while a new program sends; then a stop 5 s after it ends."""
    exe = unique_program(workdir, args.python)
    before = len(daemon.error_log())
    killer = user.popen([args.python, "-c", KILLER, str(args.seconds)], stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    sender = user.popen([exe, "-c", SENDER, str(TOTAL), str(DATAGRAMS), str(args.seconds - 10)],
                        stdout=subprocess.PIPE, text=True)
    first = float(sender.stdout.readline())
    row = wait_until(lambda: daemon.sent(exe) and time.time(), args.seconds + 30)
    kills, killing_ended = killer.communicate()[0].split()
    kills, killing_ended = int(kills), float(killing_ended)
    sender.wait()
    notice = wait_until(lambda: notified_at(user, exe), 60)
    time.sleep(max(0.0, killing_ended + 5 - time.time()))
    logged_before_stop = daemon.sent(exe)
    daemon.stop()
    daemon.start()
    logged = wait_until(lambda: daemon.sent(exe) >= TOTAL and daemon.sent(exe), args.window * 3) or daemon.sent(exe)
    records = [line for line in daemon.error_log()[before:] if "died" in line or "killed" in line or "stopped" in line]
    return {
        "kills": kills,
        "row_after_first_datagram": None if not row else row - first,
        "row_during_killing": bool(row and row < killing_ended),
        "notice_after_killing_ended": None if not notice else notice - killing_ended,
        "bytes_before_stop": logged_before_stop,
        "bytes_after_restart": logged,
        "death_records": len(records),
        "death_record_times": distinct_times(records),
        "killing_seconds": args.seconds,
    }


def distinct_times(lines):
    """How many different times (to the second) the lines are dated with."""
    return len({line[:19] for line in lines if line[:4].isdigit()})


def sha256_of(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


PREAPPROVE = r"""
import json, os, sys
path, exe, sha = sys.argv[1:]
try:
    with open(path) as f:
        record = json.load(f)
except (OSError, ValueError):
    record = {"Executables": {}, "Names": {}, "Parent Executables": {}, "Parent Names": {}, "SHA256": {}}
name = os.path.basename(exe)
record["Executables"][exe] = [name]
record["Names"][name] = [exe]
record["SHA256"][exe] = {sha: "VirusTotal not checked"}
try:
    with open(path, "w") as f:
        json.dump(record, f)
    print("written")
except OSError:
    os.replace(path, path + ".old") if os.path.lexists(path) else None
    with open(path, "w") as f:
        json.dump(record, f)
    print("replaced")
"""


def preapproval(args, user, daemon, workdir):
    exe = unique_program(workdir, args.python)
    daemon.stop()
    how = user.run([args.python, "-c", PREAPPROVE, os.path.join(user.dir, "record.json"), exe, sha256_of(exe)])
    daemon.start()
    started = time.time()
    user.run([exe, "-c", SENDER, "1000", "1", "0"])
    notice = wait_until(lambda: notified_at(user, exe, started), args.window * 3)
    return {"record_edit": (how.stdout.strip() or how.stderr.strip().splitlines()[-1:]),
            "notified": bool(notice)}


ERASE = r"""
import os, sqlite3, sys
directory, exe = sys.argv[1:]
directory = os.path.dirname(os.path.realpath(os.path.join(directory, "snitch.db")))   # (where the log is)
done, refused = {}, ""
try:
    con = sqlite3.connect(os.path.join(directory, "snitch.db"), timeout=5)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    deleted = 0
    for table in tables + ["connections"]:
        try:
            deleted += con.execute(f"DELETE FROM {table} WHERE exe = ?", (exe,)).rowcount
        except sqlite3.Error as e:
            refused = refused or ("" if "no such column" in str(e) else str(e))
    con.commit()
    done["delete rows"] = f"{deleted} deleted" + (f", refused ({refused})" if refused else "")
except sqlite3.Error as e:
    done["delete rows"] = f"refused ({e})"


def replace(path):
    other = os.path.join(os.path.dirname(path), ".planted")
    with open(other, "w"):
        pass
    os.replace(other, path)


for name in ("record.json", "exe.log", "error.log", "snitch.db"):
    path = os.path.realpath(os.path.join(directory, name))
    for what, act in (("truncate", lambda p: os.truncate(p, 0)), ("replace", replace), ("delete", os.unlink)):
        try:
            act(path)
            done[f"{what} {name}"] = "done"
        except OSError as e:
            done[f"{what} {name}"] = f"refused ({e.strerror})"
print(repr(done))
"""


def erasure(args, user, daemon, workdir, exe):
    out = user.run([args.python, "-c", ERASE, user.dir, exe])
    try:
        done = eval(out.stdout.strip(), {})      # a dict literal the script printed
    except SyntaxError:
        done = {"script": out.stderr.strip().splitlines()[-1:]}
    return {"attempts": done, "bytes_still_logged": daemon.sent(exe)}


RECONFIGURE = r"""
import json, sys
path, sha = sys.argv[1:]
with open(path) as f:
    config = json.load(f)
config["Log ignore"] = config.get("Log ignore", []) + [sha]
config["Desktop notifications"] = False
with open(path, "w") as f:
    json.dump(config, f)
"""


def reconfiguration(args, user, daemon, workdir):
    exe = unique_program(workdir, args.python)
    daemon.stop()
    started = time.time()
    user.run([args.python, "-c", RECONFIGURE, os.path.join(user.dir, "config.json"), sha256_of(exe)])
    daemon.start()
    notice = wait_until(lambda: [n for n in user.notifications()
                                 if n.get("time", 0) >= started and ("Log ignore" in n["body"] or
                                                                     "notifications" in n["body"].lower())],
                        args.window * 3)
    status = subprocess.run([args.python, args.picosnitch, "status"], capture_output=True, text=True).stdout
    return {"notified": bool(notice), "status_says": "Log ignore" in status or "warnings at the start" in status}


def dash_for_others(args, user, daemon, exe):
    port = 5190 + os.getpid() % 100
    proc = user.popen([args.dash_python, args.picosnitch, "dash"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True, env={"HOST": "127.0.0.1", "PORT": str(port), "STATE_DIRECTORY": daemon.state})
    try:
        address = f"http://127.0.0.1:{port}/"
        wait_until(lambda: fetch_as_nobody(args, address)[0] is not None, 60, 0.5)
        code, body = fetch_as_nobody(args, address)
        data = fetch_as_nobody(args, address + "_dash-layout")
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=20)
    return {"page": code, "layout": data[0]}


FETCH = r"""
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status); print(r.read().decode("utf-8", "replace"))
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode("utf-8", "replace"))
except OSError:
    print("none")
"""


def fetch_as_nobody(args, address):
    nobody = pwd.getpwnam("nobody")
    out = subprocess.run([args.python, "-c", FETCH, address], capture_output=True, text=True, cwd="/",
                         preexec_fn=lambda: (os.setgroups([]), os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)),
                         env={"PATH": "/usr/bin:/bin", "no_proxy": "*"})
    head, _, body = out.stdout.partition("\n")
    return (None if head in ("", "none") else int(head)), body


def report_text(args, results):
    s, p, e, r, d = (results[k] for k in ("silence", "preapproval", "erasure", "reconfiguration", "dash"))
    fmt = lambda v: "never" if v is None else f"{v:.1f} s"
    lines = [
        f"# picosnitch within a user's reach: {datetime.date.today()}",
        "",
        *machine.describe(),
        "",
        f"picosnitch: {args.picosnitch} ({args.label}). Write window {args.window} s; "
        f"killing for {s['killing_seconds']} s.",
        "",
        "| attempt | measured |",
        "|---|---|",
        f"| silence: new program's row in the log, from its first datagram | {fmt(s['row_after_first_datagram'])}"
        f" ({'while' if s['row_during_killing'] else 'not while'} the killing went on; {s['kills']} kills) |",
        f"| silence: its notification, after the killing ended | {fmt(s['notice_after_killing_ended'])} |",
        f"| silence: deaths on record (error.log) | {s['death_records']} lines, dated with "
        f"{s['death_record_times']} different seconds |",
        f"| silence, then a stop 5 s after: bytes logged of {TOTAL:,} | {s['bytes_before_stop']:,} before the stop, "
        f"{s['bytes_after_restart']:,} after the restart |",
        f"| pre-approval in record.json ({p['record_edit']}) | {'notified anyway' if p['notified'] else 'not notified'} |",
        f"| erasure | {'; '.join(f'{k}: {v}' for k, v in e['attempts'].items())}; "
        f"bytes still logged: {e['bytes_still_logged']:,} |",
        f"| quiet reconfiguration (hash in \"Log ignore\", notifications off) | "
        f"{'notified' if r['notified'] else 'not notified'} at the next start; status "
        f"{'says so' if r['status_says'] else 'says nothing'} |",
        f"| another account fetches dash on loopback | page: HTTP {d['page']}, layout: HTTP {d['layout']} |",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the killing goes on")
    parser.add_argument("--window", type=float, default=10.0, help='"DB write limit (seconds)"')
    parser.add_argument("--picosnitch", default=os.path.join(ROOT, "picosnitch.py"))
    parser.add_argument("--python", default="/usr/bin/python3")
    parser.add_argument("--dash-python", default="/opt/picosnitch/bin/python3")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--report", help="write the report here too")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/reach.py needs root (it creates a user and runs picosnitch)")
    workdir = tempfile.mkdtemp(prefix="psr-work-")
    user = User(args.python)
    daemon = Daemon(args, user, workdir)
    results = {}
    try:
        os.makedirs(user.dir)
        with open(os.path.join(user.dir, "config.json"), "w") as f:
            json.dump({"DB write limit (seconds)": args.window, "GeoIP lookup": False}, f)
        for path in (os.path.dirname(user.dir), user.dir, os.path.join(user.dir, "config.json")):
            os.chown(path, user.pw.pw_uid, user.pw.pw_gid)
        daemon.start()
        results["silence"] = silence(args, user, daemon, workdir)
        results["preapproval"] = preapproval(args, user, daemon, workdir)
        results["reconfiguration"] = reconfiguration(args, user, daemon, workdir)
        victim = unique_program(workdir, args.python)
        user.run([victim, "-c", SENDER, "5000", "1", "0"])
        wait_until(lambda: daemon.sent(victim), args.window * 3)
        results["dash"] = dash_for_others(args, user, daemon, victim)
        results["erasure"] = erasure(args, user, daemon, workdir, victim)
    finally:
        daemon.stop()
        user.remove()
        shutil.rmtree(workdir, ignore_errors=True)
    text = report_text(args, results)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
