#!/usr/bin/python3
"""picosnitch benchmark: what each monitor sees of 24 traffic scenarios, and what it costs.

usage: sudo /usr/bin/python3 bench/run.py [--trials N] [--scenarios s01,s04] [--tools picosnitch,nethogs]
                                          [--smoke] [--report PATH] [--sustain SECONDS]
       /usr/bin/python3 bench/run.py --novelty-only [--report PATH]

Traffic goes only to a peer in a private network namespace (over veth) and
over loopback. References: application bytes counted by the generators
(bench/gen.c) and wire bytes from nftables counters in the peer namespace.
See bench/README.md.
"""
import argparse
import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
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

PYTHON = "/usr/bin/python3"
NOVELTY_PYTHON = "/opt/picosnitch/bin/python3"
PICOSNITCH = os.path.join(ROOT, "picosnitch.py")
PEER_NS, CT_NS = "psbench-peer", "psbench-ct"
HOST_IF, PEER_IF, CT_IF, CT_PEER_IF = "psb0", "psb1", "psc0", "psc1"
HOST_V4, PEER_V4, HOST_V6, PEER_V6 = "10.233.0.1", "10.233.0.2", "fd33:b::1", "fd33:b::2"
CT_V4, CT_PEER_V4 = "10.234.0.1", "10.234.0.2"
PORT = 9100
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Scenario:
    def __init__(self, sid, title, mode, nbytes, where="v4"):
        self.sid, self.title, self.mode, self.nbytes, self.where = sid, title, mode, nbytes, where


SCENARIOS = [
    Scenario("s01", "TCP bulk download", "tcp-down", 50_000_000),
    Scenario("s02", "TCP bulk upload", "tcp-up", 50_000_000),
    Scenario("s03", "TCP full duplex", "tcp-duplex", 20_000_000),
    Scenario("s04", "UDP bulk both ways", "udp", 3_000_000),
    Scenario("s05", "ICMP echo flood with payload", "icmp", 1_000_000),
    Scenario("s06", "UDP to port 443", "udp443", 3_000_000),
    Scenario("s07", "IPv6 TCP", "tcp-up", 30_000_000, "v6"),
    Scenario("s08", "SCTP", "sctp", 10_000_000),
    Scenario("s09", "small-packet UDP to port 53 flood", "udp53", 2_000_000),
    Scenario("s10", "raw IP socket, protocol 253", "raw253", 1_000_000),
    Scenario("s11", "many short-lived processes", "short", 50_000),
    Scenario("s12", "AF_PACKET raw frame injection", "packet", 1_000_000),
    Scenario("s13", "io_uring send", "uring-send", 20_000_000),
    Scenario("s14", "sendfile() upload", "sendfile", 30_000_000),
    Scenario("s15", "sendmmsg UDP", "sendmmsg", 3_200_000),
    Scenario("s16", "loopback-only transfer", "tcp-up", 50_000_000, "loopback"),
    Scenario("s17", "own mount, PID and network namespaces, private root", "tcp-up", 10_000_000, "container"),
    Scenario("s18", "low-and-slow drip upload", "drip", 60),
    Scenario("s19", "many small TCP connections", "many-tcp", 30_000),
    Scenario("s20", "high-rate parallel burst", "burst", 80_000_000),
    Scenario("s21", "io_uring receive", "uring-recv", 20_000_000),
    Scenario("s22", "splice() download", "splice", 20_000_000),
    Scenario("s23", "recvmmsg UDP", "recvmmsg", 1_000_000),
    Scenario("s24", "IPv6 UDP download", "udp-down", 1_000_000, "v6"),
]
SMOKE = ["s01", "s04", "s11", "s15"]
HOSTS = {"v4": PEER_V4, "v6": PEER_V6, "loopback": "127.0.0.1", "container": CT_PEER_V4}


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def say(message):
    print(f"bench: {message}", flush=True)


###############################################################################
# network: peer namespace, container namespace, nftables counters
###############################################################################

class Network:
    """veth to a peer namespace (IPv4 and IPv6), a second namespace for the
    container scenario, and nftables byte counters where the peer receives."""

    def __enter__(self):
        self.down()
        steps = [
            ["ip", "netns", "add", PEER_NS], ["ip", "netns", "add", CT_NS],
            ["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF, "netns", PEER_NS],
            ["ip", "addr", "add", f"{HOST_V4}/24", "dev", HOST_IF],
            ["ip", "-6", "addr", "add", f"{HOST_V6}/64", "dev", HOST_IF, "nodad"],
            ["ip", "link", "set", HOST_IF, "up"],
            ["ip", "-n", PEER_NS, "addr", "add", f"{PEER_V4}/24", "dev", PEER_IF],
            ["ip", "-n", PEER_NS, "-6", "addr", "add", f"{PEER_V6}/64", "dev", PEER_IF, "nodad"],
            ["ip", "-n", PEER_NS, "link", "set", PEER_IF, "up"], ["ip", "-n", PEER_NS, "link", "set", "lo", "up"],
            ["ip", "-n", CT_NS, "link", "add", CT_IF, "type", "veth", "peer", "name", CT_PEER_IF, "netns", PEER_NS],
            ["ip", "-n", CT_NS, "addr", "add", f"{CT_V4}/24", "dev", CT_IF],
            ["ip", "-n", CT_NS, "link", "set", CT_IF, "up"], ["ip", "-n", CT_NS, "link", "set", "lo", "up"],
            ["ip", "-n", PEER_NS, "addr", "add", f"{CT_PEER_V4}/24", "dev", CT_PEER_IF],
            ["ip", "-n", PEER_NS, "link", "set", CT_PEER_IF, "up"],
        ]
        for step in steps:
            sh(*step)
        sh("ip", "netns", "exec", PEER_NS, "nft", "-f", "-", input=(
            "table inet bench {\n chain input {\n type filter hook input priority 0;\n counter\n"
            " udp dport 9 drop\n }\n"
            " chain output {\n type filter hook output priority 0;\n counter\n }\n}\n"))
        sh("nft", "-f", "-", input=(
            "table inet psbench {\n chain input {\n type filter hook input priority 0;\n"
            " iifname \"lo\" counter\n }\n}\n"))
        return self

    def down(self):
        for ns in (PEER_NS, CT_NS):
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", HOST_IF, check=False)
        sh("nft", "delete", "table", "inet", "psbench", check=False)

    def __exit__(self, *exc):
        self.down()

    @staticmethod
    def wire_bytes():
        """Bytes the peer received and sent (IP packets), and bytes into loopback."""
        def counted(table, *prefix):
            out = json.loads(sh(*prefix, "nft", "-j", "list", "table", "inet", table).stdout)
            return sum(e["counter"]["bytes"] for item in out["nftables"] if "rule" in item
                       for e in item["rule"]["expr"] if "counter" in e)
        return counted("bench", "ip", "netns", "exec", PEER_NS), counted("psbench")


def start_peer(prefix, services):
    proc = subprocess.Popen(prefix + [PYTHON, os.path.join(HERE, "peer.py"), str(PORT), services],
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("bench: the peer did not start")
    return proc


###############################################################################
# footprint: CPU and PSS of a process tree, sampled
###############################################################################

def process_tree(root):
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def pss_of(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return int(re.search(r"^Pss:\s+(\d+)", f.read(), re.M).group(1)) * 1024


def cpu_ticks_and_pss(pids):
    ticks = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            pss += pss_of(pid)
        except (OSError, AttributeError):
            pass
    return ticks, pss


class Sampler(threading.Thread):
    """CPU % of one core and PSS of each tool's process tree, every half second;
    and the PSS of each of its processes, for a tool that names them."""

    def __init__(self, tools):
        super().__init__(daemon=True)
        self.tools, self.samples, self.stop = tools, collections.defaultdict(list), threading.Event()
        self.parts = collections.defaultdict(lambda: collections.defaultdict(list))

    def run(self):
        last = {}
        while not self.stop.wait(0.5):
            now = time.monotonic()
            for tool in self.tools:
                if not tool.pid():
                    continue
                ticks, pss = cpu_ticks_and_pss(process_tree(tool.pid()))
                for role, pid in getattr(tool, "processes", dict)().items():
                    with contextlib.suppress(OSError, AttributeError):
                        self.parts[tool.name][role].append(pss_of(pid))
                if tool.name in last:
                    then, before = last[tool.name]
                    cpu = max(0, ticks - before) / CLK_TCK / (now - then) * 100
                    self.samples[tool.name].append((cpu, pss))
                last[tool.name] = (now, ticks)

    def summary(self, name):
        data = self.samples.get(name, [])
        if not data:
            return None
        cpus = sorted(c for c, _ in data)
        pss = [p for _, p in data]
        steady = lambda values: statistics.median(values[len(values) // 4:] or values)
        return {"cpu_mean": statistics.mean(cpus), "cpu_p95": cpus[int(0.95 * (len(cpus) - 1))],
                "pss_steady": steady(pss), "pss_max": max(pss), "samples": len(data),
                "parts": {role: (steady(values), max(values)) for role, values in self.parts[name].items()}}


###############################################################################
# tools under test
###############################################################################

def private_resolver(cmd, directory, names=None):
    """cmd in its own mount namespace whose /etc/hosts holds `names` (address:
    name) and whose resolver asks only 127.0.0.1, so that picosnitch's reverse
    lookups never leave the machine."""
    hosts, resolv = os.path.join(directory, "hosts"), os.path.join(directory, "resolv.conf")
    with open(hosts, "w") as f:
        f.write("127.0.0.1 localhost\n::1 localhost\n")
        f.writelines(f"{addr} {name}\n" for addr, name in (names or {}).items())
    with open(resolv, "w") as f:
        f.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", hosts, resolv, *cmd]


class Picosnitch:
    """picosnitch start-no-daemon; results from snitch.db rows by executable."""
    name, layer = "picosnitch", "socket"

    def __init__(self, workdir, config=None):
        self.config = {"DB write limit (seconds)": 1, "Desktop notifications": False, "GeoIP lookup": False,
                       **(config or {})}
        self.home = os.path.join(workdir, "picosnitch-home")
        self.dir = os.path.join(self.home, ".config", "picosnitch")
        self.state = os.path.join(workdir, "picosnitch-state")      # (its account passes through workdir)
        os.makedirs(workdir, exist_ok=True)
        os.chmod(workdir, 0o755)
        self.proc = None
        self.start_seconds = None

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(self.config, f)
        env = dict(os.environ, HOME=self.home, STATE_DIRECTORY=self.state)
        env.pop("SUDO_USER", None)
        started = time.monotonic()
        self.proc = subprocess.Popen(private_resolver([PYTHON, PICOSNITCH, "start-no-daemon"], self.home), env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in self.proc.stdout:
            if "capturing" in line:
                self.start_seconds = time.monotonic() - started
                break
        else:
            raise SystemExit("bench: picosnitch did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)

    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def processes(self):
        """Its processes by role, from the status file the supervisor writes."""
        try:
            with open("/run/picosnitch.status") as f:
                status = json.load(f)
        except (OSError, ValueError):
            return {}
        return {"supervisor": status["pid"], **status["children"]} if status.get("pid") == self.pid() else {}

    settle_seconds = 3     # two write windows and the write

    def result(self, exe, comm, peer, since):
        db = os.path.join(self.state, "snitch.db")
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT SUM(send) + SUM(recv), COUNT(*) FROM connections WHERE exe = ?", (exe,)).fetchone()
            if rows[1]:
                return "PASS", rows[0]
            other = con.execute("SELECT SUM(send) + SUM(recv), COUNT(*), GROUP_CONCAT(DISTINCT exe || ' ' || name) "
                                "FROM connections WHERE raddr = ? AND contime >= ? AND (exe IS NULL OR exe != ?)",
                                (peer, since, exe)).fetchone()
            return ("PARTIAL", other[0], f"logged as: {other[2]}") if other[1] else ("FAIL", 0)
        finally:
            con.close()

    def errors(self):
        path = os.path.join(self.state, "error.log")
        return open(path).read() if os.path.exists(path) else ""


class LineTool:
    """A tool whose standard output is read line by line into totals by name."""
    cmd: list = []

    def __init__(self, workdir):
        self.proc, self.totals, self.lock = None, collections.defaultdict(int), threading.Lock()

    def start(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self.pump, daemon=True).start()
        time.sleep(self.warmup)

    def pump(self):
        for line in self.proc.stdout:
            with self.lock:
                self.parse(line)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    settle_seconds = 2.5   # two refreshes


class Bpftrace(LineTool):
    """bpftrace on the sock tracepoints, totals by command name (the best case on this kernel)."""
    name, layer, warmup = "bpftrace", "socket", 8
    SCRIPT = ("tracepoint:sock:sock_send_length /args->ret > 0 && args->family != 1 && args->family != 16/ "
              "{ @b[comm] = sum(args->ret); } "
              "tracepoint:sock:sock_recv_length /args->ret > 0 && args->family != 1 && args->family != 16 "
              "&& !(args->flags & 2)/ { @b[comm] = sum(args->ret); } "
              "interval:s:1 { print(@b); clear(@b); }")
    cmd = ["bpftrace", "-e", SCRIPT]

    def start(self):
        # bpftrace finds tracepoints through tracefs, which nothing may have mounted
        # (picosnitch mounts it for itself, in its own mount namespace here)
        with open("/proc/self/mounts") as f:
            if not any(line.split()[2] == "tracefs" for line in f):
                subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"], check=True)
        super().start()

    def parse(self, line):
        m = re.match(r"@b\[(.*)\]: (\d+)", line.strip())
        if m:
            self.totals[m.group(1)] += int(m.group(2))

    def result(self, exe, comm, peer, since):
        with self.lock:
            total = self.totals.get(comm, 0)
        return ("PASS", total) if total else ("FAIL", 0)


class Nethogs(LineTool):
    """nethogs in trace mode on the veth and loopback, totals in bytes by program."""
    name, layer, warmup = "nethogs", "packet", 3
    cmd = ["nethogs", "-t", "-v", "2", "-d", "1", HOST_IF, "lo"]

    def parse(self, line):
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 3:
            program = parts[0].rsplit("/", 2)[0]
            try:
                self.totals[program] = max(self.totals[program], int(float(parts[1]) + float(parts[2])))
            except ValueError:
                pass

    def result(self, exe, comm, peer, since):
        with self.lock:
            total = sum(v for k, v in self.totals.items() if k.split(" ")[0] == exe)
            unknown = sum(v for k, v in self.totals.items() if k.startswith("unknown"))
        if total:
            return "PASS", total
        return ("PARTIAL", 0) if unknown else ("FAIL", 0)


class Opensnitch(LineTool):
    """opensnitchd in its /proc mode (detection only): with no UI it applies a rule
    that allows and logs every new connection, '✔ EXE -> ADDR:PORT (rule)'."""
    name, layer, warmup = "opensnitch", "detection", 5
    RULE = {"created": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z", "name": "000-bench-log-all",
            "enabled": True, "precedence": False, "action": "allow", "duration": "always",
            "operator": {"type": "simple", "operand": "true", "sensitive": False, "data": "", "list": []}}
    LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\].*✔ (\S+) -> (\S+):(\d+) ")
    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self, workdir):
        super().__init__(workdir)
        self.rules = os.path.join(workdir, "opensnitch-rules")
        os.makedirs(self.rules, exist_ok=True)
        with open(os.path.join(self.rules, "000-bench-log-all.json"), "w") as f:
            json.dump(self.RULE, f)
        self.cmd = ["opensnitchd", "-debug", "-process-monitor-method", "proc", "-rules-path", self.rules,
                    "-ui-socket", f"unix://{workdir}/opensnitch-no-ui.sock"]
        self.seen = []          # (local time, exe, address, port) of every connection it judged
        self.tables = set()

    def start(self):
        # opensnitch adds iptables(-nft) tables to the host's ruleset: note the
        # ones there before, to remove only its own afterwards
        self.tables = set(nft_tables())
        super().start()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for family, table in set(nft_tables()) - self.tables:
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True)

    def parse(self, line):
        m = self.LINE.search(self.ANSI.sub("", line))
        if m:
            self.seen.append(m.groups())

    def result(self, exe, comm, peer, since):
        with self.lock:
            to_peer = [s[1] for s in self.seen if s[2] == peer and s[0] >= since]
        if exe in to_peer:
            return "PASS", 0
        return ("PARTIAL", 0, "seen as: " + ", ".join(sorted(set(to_peer)))) if to_peer else ("FAIL", 0)


def nft_tables():
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return [tuple(line.split()[1:3]) for line in out.splitlines() if line.startswith("table ")]


TOOLS = {"picosnitch": Picosnitch, "bpftrace": Bpftrace, "nethogs": Nethogs, "opensnitch": Opensnitch}


###############################################################################
# scenarios and scoring
###############################################################################

def copy_generator(gen, workdir, sid, trial):
    name = f"b{sid}t{trial}{uuid.uuid4().hex[:4]}"
    path = os.path.join(workdir, "exe", name)
    shutil.copy2(gen, path)
    return path, name[:15]


def container_command(gen, workdir, scenario):
    """unshare: own mount and PID namespaces with a private root, in the container network namespace."""
    root = os.path.join(workdir, f"ct-{uuid.uuid4().hex[:6]}")
    os.makedirs(root)
    exe = os.path.join(root, "gen")
    shutil.copy2(gen + "-static", exe)
    cmd = ["ip", "netns", "exec", CT_NS, "unshare", "--mount", "--pid", "--fork", f"--root={root}",
           "/gen", scenario.mode, HOSTS["container"], str(PORT), str(scenario.nbytes)]
    return cmd, exe


def run_scenario(scenario, gen, workdir, trial, tools):
    if scenario.where == "container":
        cmd, exe = container_command(gen, workdir, scenario)
        comm = "gen"
    else:
        exe, comm = copy_generator(gen, workdir, scenario.sid, trial)
        cmd = [exe, scenario.mode, HOSTS[scenario.where], str(PORT), str(scenario.nbytes)]
    env = dict(os.environ, BENCH_IFNAME=HOST_IF, BENCH_SRC=HOST_V4)
    since = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    wire_before = Network.wire_bytes()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode == 3:
        return {"status": "unsupported", "why": f"{scenario.mode} is not supported by this kernel"}
    if out.returncode != 0:
        return {"status": "error", "why": (out.stderr or out.stdout).strip()[-200:]}
    app = json.loads(out.stdout.strip().splitlines()[-1])
    time.sleep(max(tool.settle_seconds for tool in tools))
    wire_after = Network.wire_bytes()
    wire = wire_after[1] - wire_before[1] if scenario.where == "loopback" else wire_after[0] - wire_before[0]
    result = {"status": "ran", "app": app["sent"] + app["received"], "wire": wire, "tools": {}}
    for tool in tools:
        detection, counted, *note = tool.result(exe, comm, HOSTS[scenario.where], since)
        reference = {"socket": result["app"], "packet": wire}.get(tool.layer)
        counts = reference is not None      # a detection-only tool counts no bytes
        result["tools"][tool.name] = {"detection": detection, "bytes": counted or 0, "note": " ".join(note),
                                      "bandwidth": bandwidth_verdict(detection, counted or 0, reference) if counts else "n/a",
                                      "error_pct": error_pct(counted or 0, reference) if counts else None}
    return result


def error_pct(counted, reference):
    return None if not reference else (counted - reference) / reference * 100


def bandwidth_verdict(detection, counted, reference):
    if detection == "FAIL" or not reference:
        return "FAIL"
    error = abs(counted - reference) / reference
    return "PASS" if error <= 0.10 else "PARTIAL" if error <= 0.25 else "FAIL"


RANK = {"PASS": 0, "PARTIAL": 1, "FAIL": 2, "n/a": 3}


def cell(verdicts):
    """The most common verdict, ties toward the worse; '*' where trials disagreed."""
    counts = collections.Counter(verdicts)
    best = max(counts.values())
    verdict = max((v for v, n in counts.items() if n == best), key=RANK.get)
    return verdict + ("*" if len(counts) > 1 else "")


###############################################################################
# overhead: throughput with and without picosnitch, sustained rate, start time
###############################################################################

# overhead loops: mode -> (what it measures, unit, target host)
LOOPS = {
    "udp-loop": ("1-byte UDP send() on a connected socket", "calls/s", PEER_V4),
    "udp-sendto-loop": ("1-byte UDP sendto() on an unconnected socket", "calls/s", PEER_V4),
    "tcp-loop": ("bulk TCP over loopback", "bytes/s", "127.0.0.1"),
}


def loop_rate(gen, mode, millis):
    out = subprocess.run([gen, mode, LOOPS[mode][2], str(PORT), str(millis)], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    return (data["calls"] if LOOPS[mode][1] == "calls/s" else data["sent"]) / data["seconds"]


def overhead(gen, workdir, pairs, millis):
    """Alternate runs without and with picosnitch; ratios of the medians."""
    rates = {mode: {"off": [], "on": []} for mode in LOOPS}
    tool = Picosnitch(workdir)
    for _ in range(pairs):
        for state in ("off", "on"):
            if state == "on":
                tool.start()
            for mode in rates:
                rates[mode][state].append(loop_rate(gen, mode, millis))
            if state == "on":
                tool.stop()
    # the machine drifts over minutes: each run is compared with the one just before it
    return {mode: {"off": statistics.median(r["off"]), "on": statistics.median(r["on"]),
                   "ratio": statistics.median(on / off for off, on in zip(r["off"], r["on"]))}
            for mode, r in rates.items()}


# empty programs where picosnitch's run on a send: the tracepoint, and the
# cgroup UDP sendmsg hooks (which allow the send)
EMPTY_PROGRAM = "RAW_TRACEPOINT_PROBE(sock_send_length) { return 0; }\n" + "".join(
    f"int empty_{function}(struct bpf_sock_addr *ctx) {{ return 1; }}\n" for function in ("udp4", "udp6"))


def hook_kind(name):
    """'cgroup' for a cgroup sendmsg hook's program name, else 'tracepoint'."""
    return "cgroup" if name.startswith(("cg__", "empty_udp")) else "tracepoint"


def floor(gen, pairs, millis):
    """The same UDP loops with only empty BPF programs where picosnitch's run:
    what hooks on the same calls cost on this machine, before they do
    anything. Returns the throughput ratios by loop and {hook kind: ns per run}."""
    sys.path.insert(0, ROOT)
    import picosnitch
    from bcc import BPF
    btf = picosnitch.BTF.from_file()
    headers, _ = picosnitch.find_kernel_headers(os.uname().release)
    text = picosnitch.bpf_prelude(btf) + EMPTY_PROGRAM
    cgroup = picosnitch.cgroup2_root()
    ratios, ns = collections.defaultdict(list), collections.defaultdict(list)
    with KernelStats():
        for _ in range(pairs):
            for mode in ("udp-loop", "udp-sendto-loop"):
                off = loop_rate(gen, mode, millis)
                existing = set(bpf_programs())
                bpf = picosnitch.compile_program(text, headers)        # (the tracepoint attached as it loads)
                links = [picosnitch.attach_cgroup_hook(bpf.load_func(f"empty_{function}".encode(), BPF.CGROUP_SOCK_ADDR,
                                                                     attach_type=kind).fd, kind, cgroup, function)
                         for function, kind in (("udp4", picosnitch.BPF_CGROUP_UDP4_SENDMSG),
                                                ("udp6", picosnitch.BPF_CGROUP_UDP6_SENDMSG))]
                empty = [pid for pid in bpf_programs() if pid not in existing]
                try:
                    rate, used = KernelStats.during(lambda: loop_rate(gen, mode, millis), empty)
                finally:
                    for fd in links:
                        os.close(fd)
                    bpf.cleanup()
                ratios[mode].append(rate / off)
                for name, (t, n) in used.items():
                    ns[hook_kind(name)].append(t / n)
    return ({mode: statistics.median(r) for mode, r in ratios.items()},
            {kind: statistics.median(v) for kind, v in ns.items()})


# the loops whose cost per call the kernel measures: (mode, address family, target host)
COST_LOOPS = [("udp-loop", "IPv4", PEER_V4), ("udp-sendto-loop", "IPv4", PEER_V4),
              ("udp-loop", "IPv6", PEER_V6), ("udp-sendto-loop", "IPv6", PEER_V6)]
BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


def bpf_programs():
    """{program id: (name, run time ns, runs)} of every loaded BPF program."""
    out = json.loads(sh("/usr/sbin/bpftool", "-j", "prog", "show").stdout)
    return {p["id"]: (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in out}


class KernelStats:
    """The kernel's own accounting of BPF programs (bpf_stats_enabled), on
    while in use and set back as it was afterwards."""

    def __enter__(self):
        with open(BPF_STATS) as f:
            self.before = f.read().strip()
        with open(BPF_STATS, "w") as f:
            f.write("1")
        return self

    def __exit__(self, *exc):
        with open(BPF_STATS, "w") as f:
            f.write(self.before)

    @staticmethod
    def during(run, programs):
        """run()'s result, and {name: (ns per run, runs)} of the programs (ids) while it ran."""
        before = bpf_programs()
        result = run()
        after = bpf_programs()
        used = {}
        for pid in programs:
            if pid in before and pid in after:
                name, ns, n = after[pid]
                ns, n = ns - before[pid][1], n - before[pid][2]
                if n:
                    used[name] = (ns, n)
        return result, used


def per_call_cost(gen, workdir, millis, reps):
    """Each picosnitch program's ns per run and the total ns per send call, in
    the kernel's own accounting, for each 1-byte send loop: medians of reps
    runs, the loops taken in turn."""
    existing = set(bpf_programs())
    tool = Picosnitch(workdir + "/cost")
    tool.start()
    runs = collections.defaultdict(list)
    try:
        ours = [pid for pid in bpf_programs() if pid not in existing]
        with KernelStats():
            for _ in range(reps):
                for mode, family, target in COST_LOOPS:
                    run = lambda: json.loads(sh(gen, mode, target, str(PORT), str(millis)).stdout)
                    runs[(mode, family)].append(KernelStats.during(run, ours))
    finally:
        tool.stop()
    out = {}
    for loop, samples in runs.items():
        names = {name for _, used in samples for name in used}
        programs = {}
        for name in names:
            per_run = [used[name][0] / used[name][1] for _, used in samples if name in used]
            per_call = [used.get(name, (0, 0))[1] / result["calls"] for result, used in samples]
            programs[name] = (statistics.median(per_run), statistics.median(per_call))
        out[loop] = {"calls": statistics.median(r["calls"] for r, _ in samples),
                     "rate": statistics.median(r["calls"] / r["seconds"] for r, _ in samples),
                     "programs": programs,
                     "per_call": statistics.median(sum(ns for ns, _ in used.values()) / r["calls"] for r, used in samples),
                     "spread": [sum(ns for ns, _ in used.values()) / r["calls"] for r, used in samples]}
    return out


def sustained(gen, workdir, seconds):
    """The highest send-call rate this machine makes, for `seconds`, under picosnitch."""
    tool = Picosnitch(workdir + "/sustained")
    tool.start()
    try:
        rate = loop_rate(gen, "udp-loop", seconds * 1000)
        time.sleep(3)
        errors = tool.errors()
    finally:
        tool.stop()
    lost = sum(int(n) for n in re.findall(r"lost (\d+) events", errors))
    full = errors.count("connections were merged") + errors.count("every map of the window was full")
    return {"rate": rate, "seconds": seconds, "lost_events": lost, "full_maps": full, "start_seconds": tool.start_seconds}


# connection churn: (protocol, programs at once, connections a second each, or 0: as fast as it can)
CHURN_RUNS = [("tcp", 1, 0), ("tcp", 50, 0), ("udp", 1, 0), ("udp", 50, 0), ("tcp", 1, 10_000)]
CHURN_BYTES = 5
CHURN_PORT = 21400        # (below the local port range: no connection's TIME_WAIT holds it)


def build_churn(workdir, programs, run):
    """tests/churn.c built `programs` times, each with a tag of its own (a program of its own)."""
    paths = []
    for i in range(programs):
        path = os.path.join(workdir, f"churn{run}-{i:02d}")
        sh("gcc", "-O2", f'-DTAG="churn{i:02d}-{time.time_ns()}"', "-o", path, os.path.join(ROOT, "tests", "churn.c"))
        paths.append(path)
    return paths


def db_bytes(state):
    return sum(os.path.getsize(os.path.join(state, name)) for name in ("snitch.db", "snitch.db-wal")
               if os.path.exists(os.path.join(state, name)))


def churn(workdir, seconds, runs=CHURN_RUNS, write_limit=10):
    """Short connections (TCP: connect, write, close; UDP: a socket that sends
    once) from one program and from 50 at once, for `seconds`, under
    picosnitch with a write limit of `write_limit` (10 s, the default): the rates, each program's
    logged bytes against what it sent, rows, lost events, merged
    connections, picosnitch's CPU and the log's growth."""
    os.makedirs(workdir + "/churn-exe", exist_ok=True)
    tool = Picosnitch(workdir + "/churn", {"DB write limit (seconds)": write_limit})
    tool.start()
    out = []
    try:
        for run, (proto, count, rate) in enumerate(runs):
            say(f"churn: {proto}, {count} programs" + (f", {rate:,}/s" if rate else ", as fast as they can"))
            programs = build_churn(workdir + "/churn-exe", count, run)
            errors_before, size_before = tool.errors(), db_bytes(tool.state)
            roles = tool.processes()
            ticks_before = {role: cpu_ticks_and_pss([pid])[0] for role, pid in roles.items()}
            started = time.monotonic()
            procs = [subprocess.Popen([exe, proto, str(CHURN_PORT + i), "1000000000", str(CHURN_BYTES), str(seconds),
                                       str(rate)], stdout=subprocess.PIPE, text=True)
                     for i, exe in enumerate(programs)]
            did = [json.loads(p.communicate()[0]) for p in procs]
            took = time.monotonic() - started
            logged, behind = churn_settled(tool.state, programs, settle=3 * write_limit)
            # (the CPU of the whole work, what was written after the programs ended too, over their time)
            ticks = {role: cpu_ticks_and_pss([pid])[0] - ticks_before[role] for role, pid in roles.items()}
            errors = tool.errors()[len(errors_before):]
            out.append({
                "proto": proto, "programs": count, "paced": rate, "seconds": took, "write_limit": write_limit,
                "connections": sum(d["connections"] for d in did),
                "sent": [d["sent"] for d in did], "received": [max(d["received"], 0) for d in did],
                "logged": logged, "rows": sum(r for _, _, r, _ in logged),
                "merged": sum(m for _, _, _, m in logged),
                "lost": sum(int(n) for n in re.findall(r"lost (\d+) events", errors)),
                "uncounted": errors.count("every map of the window was full"),
                "cpu": sum(ticks.values()) / CLK_TCK / took * 100,
                "cpu_by_role": {role: t / CLK_TCK / took * 100 for role, t in ticks.items()},
                "behind": behind,
                "growth": (db_bytes(tool.state) - size_before) / took * 60})
    finally:
        tool.stop()
    return out


def churn_settled(state, exes, settle, most=300):
    """What churn_logged says once it has not changed for `settle` seconds
    (or after `most` seconds), and how many seconds it took to settle."""
    started, last, since = time.monotonic(), None, time.monotonic()
    while time.monotonic() - started < most:
        time.sleep(2)
        logged = churn_logged(state, exes)
        if logged != last:
            last, since = logged, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return last, since - started


def churn_logged(state, exes):
    """(sent, received, rows, merged connections) logged for each program."""
    con = sqlite3.connect(f"file:{os.path.join(state, 'snitch.db')}?mode=ro", uri=True)
    try:
        out = []
        for exe in exes:
            send, recv, rows = con.execute("SELECT coalesce(sum(send), 0), coalesce(sum(recv), 0), count(*) "
                                           "FROM connections WHERE exe = ?", (exe,)).fetchone()
            merged = sum(int(r[0].split()[0]) for r in con.execute(
                "SELECT raddr FROM connections WHERE exe = ? AND lport = -2", (exe,)))
            out.append((send, recv, rows, merged))
        return out
    finally:
        con.close()


def churn_error_pct(run):
    """The worst per-program error, in % of what it sent (and received)."""
    return max((churn_program_pct(run, i) for i in range(len(run["sent"]))), default=0.0)


def churn_program_pct(run, i):
    """How far program i of a run logged off what it sent (and its listener read), in %."""
    send, recv = run["logged"][i][:2]
    return max((abs(counted - reference) / reference * 100 for counted, reference in
                ((send, run["sent"][i]), (recv, run["received"][i])) if reference), default=0.0)


def churn_table(runs):
    lines = ["## Connection churn", "",
             f"Write limit: {runs[0]['write_limit']} s. "
             f"Each connection moves {CHURN_BYTES} bytes (TCP: connect, write, close, to a listener of the same "
             "program; UDP: a socket that sends once and is closed). Bytes: the worst program's logged bytes "
             "against what it sent (and, TCP, what its listener read). CPU: picosnitch's whole process tree "
             "from the programs' start until every row was written (what was written after they ended "
             "included), over the time the programs ran. Growth: snitch.db and its WAL.", "",
             "| loop | connections/s | bytes, worst program | rows | merged connections | lost events "
             "| uncounted windows | picosnitch CPU (% of a core): all (reader, primary, monitor) "
             "| written, after the programs ended | log growth per minute |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        pace = f"paced at {r['paced']:,}/s" if r["paced"] else "as fast as they can"
        lines.append(f"| {r['proto'].upper()}, {r['programs']} program{'s' if r['programs'] > 1 else ''}, {pace} "
                     f"| {r['connections'] / r['seconds']:,.0f} | {churn_error_pct(r):.3f}% off "
                     f"| {r['rows']:,} | {r['merged']:,} | {r['lost']:,} | {r['uncounted']} | {r['cpu']:.1f} ("
                     + ", ".join(f"{r['cpu_by_role'].get(role, 0):.1f}" for role in ("reader", "primary", "monitor"))
                     + f") | {r['behind']:.0f} s | {r['growth'] / 1e6:.2f} MB |")
    off = [(r, i) for r in runs for i in range(len(r["sent"])) if churn_program_pct(r, i) > 1]
    if off:
        lines += ["", "Programs more than 1% off (sent and received as the program counted them; logged: "
                      "sent, received, rows, merged connections):", ""]
        lines += [f"- {r['proto'].upper()} × {r['programs']}, program {i}: sent {r['sent'][i]:,}, received "
                  f"{r['received'][i]:,}; logged {', '.join(f'{n:,}' for n in r['logged'][i])}" for r, i in off]
    return lines


def churn_targets(runs):
    rows = [("churn: per-program bytes within 1% of what was sent, every run",
             f"worst {max(churn_error_pct(r) for r in runs):.3f}%", all(churn_error_pct(r) <= 1 for r in runs))]
    for r in runs:
        if r["paced"]:
            rate = r["connections"] / r["seconds"]
            rows += [(f"churn at {r['paced']:,} new connections/s: 0 lost events", f"{r['lost']} at {rate:,.0f}/s",
                      r["lost"] == 0),
                     (f"churn at {r['paced']:,} new connections/s: picosnitch's CPU ≤ 25% of a core",
                      f"{r['cpu']:.1f}%", r["cpu"] <= 25)]
    return rows


# the live event stream: what its readers cost the daemon, how soon a new
# sender is told of, and whether its ticks add up to what the log keeps
LIVE_READERS = 3            # as `top` and two `events`
LIVE_PORT = 21430           # (below the local port range)
LIVE_PROBES = 5             # one-datagram senders, each timed from its datagram to the first tick naming it
LIVE_EVENTS = "/run/picosnitch/events.sock"


class LiveSink:
    """A UDP socket on LIVE_PORT: when the first datagram from each port came."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", LIVE_PORT))
        self.sock.settimeout(0.2)
        self.first, self.stopping = {}, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopping:
            with contextlib.suppress(socket.timeout):
                _, (_, port) = self.sock.recvfrom(65536)
                self.first.setdefault(port, time.time())

    def close(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


class LiveListener:
    """A reader of the stream that parses every line (as `top` does): the
    bytes each executable sent by its ticks, and when a tick first named it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(LIVE_EVENTS)
        self.sent, self.first, self.lines = collections.Counter(), {}, 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        for line in self.sock.makefile("rb"):
            event = json.loads(line)
            self.lines += 1
            for c in event.get("conns", []) if event["type"] == "tick" else []:
                self.sent[c["exe"]] += c["send"]
                self.first.setdefault(c["exe"], time.time())

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.sock.close()


def live_sender(workdir, *steps):
    """A program of its own (a copy of python) running tests/live_sender.py to LIVE_PORT."""
    exe = os.path.join(workdir, "live" + uuid.uuid4().hex[:8])
    shutil.copy2(os.path.realpath(PYTHON), exe)
    with open(exe, "ab") as f:
        f.write(uuid.uuid4().bytes)
    cmd = [exe, os.path.join(ROOT, "tests", "live_sender.py"), str(LIVE_PORT), "1000", *map(str, steps)]
    return exe, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def live(workdir, seconds):
    """A steady sender (200 datagrams of 1000 bytes a second) for `seconds`,
    under picosnitch with its default 10-s window, first with no reader of
    the stream, then with LIVE_READERS; with them, LIVE_PROBES new
    programs that each send one datagram. Figures: the daemon's CPU in each
    run, the delay from a probe's datagram to the first tick naming it, and
    the steady sender's bytes by the ticks against snitch.db."""
    os.makedirs(workdir + "/live-exe", mode=0o755, exist_ok=True)
    tool = Picosnitch(workdir + "/live", {"DB write limit (seconds)": 10})
    tool.start()
    sink, out = LiveSink(), {"seconds": seconds, "readers": LIVE_READERS}
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(LIVE_EVENTS) and time.monotonic() < deadline:
            time.sleep(0.1)
        for readers in (0, LIVE_READERS):
            say(f"live: a steady sender for {seconds} s, {readers} readers of the stream")
            listeners = [LiveListener() for _ in range(readers)]
            time.sleep(2)           # (the reader process has taken its baseline)
            roles = tool.processes()
            before = {role: cpu_ticks_and_pss([pid])[0] for role, pid in roles.items()}
            started = time.monotonic()
            exe, steady = live_sender(workdir + "/live-exe", 200, seconds)
            probes = []
            for _ in range(LIVE_PROBES if readers else 0):
                time.sleep(seconds / (LIVE_PROBES + 1))
                probe, proc = live_sender(workdir + "/live-exe", 100, 0.01)      # (one datagram)
                probes.append((probe, json.loads(proc.communicate()[0])["lport"]))
            sent = json.loads(steady.communicate()[0])["sent"]
            took = time.monotonic() - started
            ticks = {role: cpu_ticks_and_pss([pid])[0] - before[role] for role, pid in roles.items()}
            run = {"cpu": sum(ticks.values()) / CLK_TCK / took * 100,
                   "cpu_by_role": {role: t / CLK_TCK / took * 100 for role, t in ticks.items()}}
            if readers:
                time.sleep(3)       # (the last ticks)
                logged = churn_settled(tool.state, [exe], settle=20)[0][0][0]
                run.update({"sent": sent, "logged": logged, "told": [lst.sent[exe] for lst in listeners],
                            "delays": [lst.first[p] - sink.first[port] for p, port in probes for lst in listeners
                                       if p in lst.first and port in sink.first],
                            "probes": len(probes) * len(listeners)})
            for listener in listeners:
                listener.close()
            out[readers] = run
    finally:
        sink.close()
        tool.stop()
    return out


def live_table(lived):
    on, off = lived[lived["readers"]], lived[0]
    delays = sorted(on["delays"])
    told = max(abs(t - on["logged"]) / on["logged"] * 100 for t in on["told"])
    return ["## Live event stream", "",
            f"A steady sender (200 datagrams of 1000 bytes a second) for {lived['seconds']} s, with the default "
            f"10-s window; first with no reader of the stream, then with {lived['readers']} readers that parse "
            f"every line (as `top` and two `events` do), while {LIVE_PROBES} new programs each send one datagram. "
            "CPU: picosnitch's whole process tree. Delay: from a probe's datagram reaching its socket to the "
            "first tick naming it reaching a reader. The BPF program is the same with or without readers: "
            "the stream adds nothing to the cost of a send call.", "",
            "| | no readers | with readers |", "|---|---|---|",
            f"| picosnitch CPU (% of a core): all | {off['cpu']:.2f} | {on['cpu']:.2f} |",
            "| reader, primary, notifier | " + ", ".join(f"{off['cpu_by_role'].get(r, 0):.2f}" for r in
                                                     ("reader", "primary", "notifier")) + " | "
            + ", ".join(f"{on['cpu_by_role'].get(r, 0):.2f}" for r in ("reader", "primary", "notifier")) + " |",
            f"| delay to the first tick naming a new sender: median, most ({len(delays)} of {on['probes']}) | | "
            f"{statistics.median(delays):.2f} s, {max(delays):.2f} s |" if delays else "| delay | | none seen |",
            f"| the steady sender's bytes by the ticks against snitch.db ({on['logged']:,} bytes) | | "
            f"{told:.3f}% off, worst reader |"]


def live_targets(lived):
    on = lived[lived["readers"]]
    delays = on["delays"]
    told = max(abs(t - on["logged"]) / on["logged"] * 100 for t in on["told"])
    return [("live: a new sender is told of within 2 s of its first packet",
             f"most {max(delays):.2f} s ({len(delays)} of {on['probes']})" if delays else "none seen",
             bool(delays) and len(delays) == on["probes"] and max(delays) <= 2),
            (f"live: picosnitch's CPU ≤ 1% of a core with {lived['readers']} readers", f"{on['cpu']:.2f}%",
             on["cpu"] <= 1),
            ("live: the ticks add up to what snitch.db logs, within 1%", f"{told:.3f}%", told <= 1)]


###############################################################################
# report
###############################################################################

def versions():
    def first_line(*cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"
    bcc = first_line("dpkg-query", "-W", "-f", "${Version}", "python3-bpfcc")
    return {"picosnitch": first_line(PYTHON, PICOSNITCH, "version"), "bcc (python3-bpfcc)": bcc,
            "bpftrace": first_line("bpftrace", "--version"), "nethogs": first_line("nethogs", "-V"),
            "opensnitch": first_line("opensnitchd", "-version")}


def mb(n):
    return f"{n / 1e6:.1f} MB"


def cost_table(cost, floors):
    """Per-call cost in the kernel's own accounting, by loop and program."""
    names = sorted({name for c in cost.values() for name, (_, per_call) in c["programs"].items() if per_call >= 0.01})
    floor_note = (" Empty programs in the same places take " + ", ".join(
        f"{ns:.0f} ns per run on the {kind}" for kind, ns in sorted(floors.items())) + " in the same session: the floor "
        "column is what they would cost on the same calls, before doing anything." if floors else "")
    lines = ["## Cost per send call (the kernel's own accounting: bpf_stats_enabled, run_time_ns / run_cnt)", "",
             "Each cell: ns per run of the program, and its runs per send call (programs that run on fewer than "
             "1 call in 100 are left out of the columns, not the total). The total is the time of all picosnitch "
             "programs over the loop divided by its send calls: the median of the runs, whose spread follows."
             + floor_note, "",
             "| loop | calls/s | " + " | ".join(names) + " | total ns per call | runs | floor |",
             "|---|---|" + "---|" * len(names) + "---|---|---|"]
    for (mode, family), c in cost.items():
        cells = [f"{c['programs'][n][0]:.0f} ({c['programs'][n][1]:.2f})" if n in c["programs"] else "–" for n in names]
        floor_ns = sum(floors.get(hook_kind(name), 0) * per_call for name, (_, per_call) in c["programs"].items())
        floor_cell = f"{floor_ns:.0f}" if floors else "–"
        spread = ", ".join(f"{x:.0f}" for x in c["spread"])
        lines.append(f"| {LOOPS[mode][0]}, {family} | {c['rate']:,.0f} | " + " | ".join(cells)
                     + f" | {c['per_call']:.0f} | {spread} | {floor_cell} |")
    return lines


def above_floor(cost, floors):
    """{(loop, program): ns per run above the empty program in its place}, for
    the programs that run on every call."""
    return {((mode, family), name): ns - floors[hook_kind(name)]
            for (mode, family), c in cost.items() for name, (ns, per_call) in c["programs"].items()
            if per_call >= 0.5 and hook_kind(name) in floors}


def targets_table(results, samples, over, sust, empty, cost=None, floors=None, churned=None, lived=None):
    """The targets of the benchmark, what was measured, and why where missed."""
    ran = {sid: [t for t in trials if t["status"] == "ran"] for sid, trials in results.items()}
    not_run = [f"{sid}: {trials[0].get('why')}" for sid, trials in results.items() if not ran[sid]]
    detected = sum(1 for t in ran.values() if t and cell([x["tools"]["picosnitch"]["detection"] for x in t]) == "PASS")
    exact = sum(1 for t in ran.values() if t and all(x["tools"]["picosnitch"]["error_pct"] is not None
                                                     and abs(x["tools"]["picosnitch"]["error_pct"]) <= 1 for x in t))
    unrun = "; not run: " + ", ".join(not_run) if not_run else ""
    rows = [("detection in every scenario", f"{detected}/{len(results)}{unrun}", detected == len(results)),
            ("bandwidth in every scenario, every count within ±1% of application bytes",
             f"{exact}/{len(results)}{unrun}", exact == len(results))]
    s = samples.get("picosnitch")
    if s:
        rows += [("CPU mean ≤ 1% of a core", f"{s['cpu_mean']:.2f}%", s["cpu_mean"] <= 1),
                 ("steady PSS ≤ 60 MB", mb(s["pss_steady"]), s["pss_steady"] <= 60e6)]
    if sust:
        rows.append(("zero lost events in the sustained run", f"{sust['lost_events']} at {sust['rate']:,.0f} calls/s",
                     sust["lost_events"] == 0 and sust["full_maps"] == 0))
    for ((mode, family), name), ns in above_floor(cost or {}, floors or {}).items():
        rows.append((f"{LOOPS[mode][0]}, {family}: {name} at most 30 ns above the empty program in its place",
                     f"{ns:+.0f} ns", ns <= 30))
    for mode, ratio in (over or {}).items():
        if mode in empty:
            rows.append((f"{LOOPS[mode][0]}: throughput ratio within 0.03 of empty programs' in the same "
                         f"places", f"{ratio['ratio']:.3f} (empty programs: {empty[mode]:.3f})",
                         ratio["ratio"] >= empty[mode] - 0.03))
        else:
            rows.append((f"{LOOPS[mode][0]} ≥ 0.97", f"{ratio['ratio']:.3f}", ratio["ratio"] >= 0.97))
    rows += churn_targets(churned) if churned else []
    rows += live_targets(lived) if lived else []
    lines = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in rows]
    return lines


def report(args, results, samples, over, sust, tools, empty=None, cost=None, floors=None, churned=None, lived=None):
    lines = [f"# picosnitch benchmark, {datetime.date.today()}", "", *machine.describe(),
             f"- trials per scenario: {args.trials}; cells show the most common verdict (ties toward the worse),"
             " `*` where trials disagreed",
             "- references: application bytes counted by the generators (socket-level tools), wire bytes from "
             "nftables in the peer namespace (packet-capture tools)", ""]
    lines += ["| tool | version |", "|---|---|"] + [f"| {k} | {v} |" for k, v in versions().items()] + [""]
    lines += scenario_table(results, tools) + [""] + footprint_table(samples, tools) + [""]
    if over:
        rate = lambda mode, v: f"{v:,.0f} calls/s" if LOOPS[mode][1] == "calls/s" else f"{mb(v)}/s"
        lines += [f"## Overhead ({args.pairs} alternate runs without and with picosnitch, same session)", "",
                  "Rates are medians; the ratio is the median of each run with picosnitch over the run just "
                  "before it without.", "", "| loop | without | with picosnitch | ratio |", "|---|---|---|---|"]
        lines += [f"| {LOOPS[m][0]} | {rate(m, r['off'])} | {rate(m, r['on'])} | {r['ratio']:.3f} |"
                  for m, r in over.items()] + [""]
    if sust:
        lines += [f"Sustained: {sust['rate']:,.0f} sendto calls/s (the most this machine generated) for "
                  f"{sust['seconds']} s under picosnitch: {sust['lost_events']} lost events, "
                  f"{sust['full_maps']} full-map reports. Start to capturing: {sust['start_seconds']:.1f} s.", ""]
    if cost:
        lines += cost_table(cost, floors or {}) + [""]
    if churned:
        lines += churn_table(churned) + [""]
    if lived:
        lines += live_table(lived) + [""]
    lines += targets_table(results, samples, over, sust, empty or {}, cost, floors, churned, lived) + [""]
    summary = summary_line(results, samples, over, sust, cost, churned) + f"; on {machine.summary()}"
    lines += ["## Summary", "", summary, ""]
    return "\n".join(lines), summary


def scenario_table(results, tools):
    head = "| scenario | app bytes | wire bytes | " + " | ".join(f"{t} detection | {t} bandwidth" for t in tools) + " |"
    lines = ["## Scenarios", "", head, "|" + "---|" * (3 + 2 * len(tools))]
    for scenario in SCENARIOS:
        trials = results.get(scenario.sid)
        if not trials:
            continue
        ran = [t for t in trials if t["status"] == "ran"]
        if not ran:
            why = trials[0].get("why", trials[0]["status"])
            lines.append(f"| {scenario.sid} {scenario.title} | n/a | n/a | " + " | ".join(["n/a"] * 2 * len(tools))
                         + f" |  <!-- {why} -->")
            continue
        cells = []
        for tool in tools:
            det = cell([t["tools"][tool]["detection"] for t in ran])
            bw = cell([t["tools"][tool]["bandwidth"] for t in ran])
            errs = [t["tools"][tool]["error_pct"] for t in ran if t["tools"][tool]["error_pct"] is not None]
            worst = max(errs, key=abs) if errs else None
            cells += [det, bw + (f" ({worst:+.2f}%)" if worst is not None else "")]
        lines.append(f"| {scenario.sid} {scenario.title} | {ran[0]['app']:,} | {ran[0]['wire']:,} | "
                     + " | ".join(cells) + " |")
    notes = [f"- {s.sid}: {results[s.sid][0].get('why')}" for s in SCENARIOS
             if s.sid in results and results[s.sid][0]["status"] != "ran"]
    notes += [f"- {sid} trial {i}, {tool}: {r['detection']}, {r['note']}" for sid, trials in results.items()
              for i, trial in enumerate(trials, 1) for tool, r in trial.get("tools", {}).items() if r.get("note")]
    return lines + ([""] + notes if notes else [])


def footprint_table(samples, tools):
    lines = ["## Footprint (each tool's whole process tree, sampled every 0.5 s through its session)", "",
             "| tool | CPU mean (% of a core) | CPU p95 | PSS steady | PSS max |", "|---|---|---|---|---|"]
    for tool in tools:
        s = samples.get(tool)
        if s:
            lines.append(f"| {tool} | {s['cpu_mean']:.2f} | {s['cpu_p95']:.2f} | {mb(s['pss_steady'])} | {mb(s['pss_max'])} |")
    for tool in tools:
        parts = (samples.get(tool) or {}).get("parts")
        if parts:
            lines += ["", f"{tool}'s processes (PSS, steady and max):", "",
                      "| process | PSS steady | PSS max |", "|---|---|---|"]
            lines += [f"| {role} | {mb(steady)} | {mb(top)} |" for role, (steady, top) in parts.items()]
    return lines


def summary_line(results, samples, over, sust, cost=None, churned=None):
    ran = [t for trials in results.values() for t in trials[:1] if t["status"] == "ran"]
    cells = [(cell([t["tools"]["picosnitch"]["detection"] for t in trials if t["status"] == "ran"]),
              cell([t["tools"]["picosnitch"]["bandwidth"] for t in trials if t["status"] == "ran"]),
              [t["tools"]["picosnitch"]["error_pct"] for t in trials if t["status"] == "ran"])
             for trials in results.values() if any(t["status"] == "ran" for t in trials)]
    within = sum(1 for _, _, errs in cells if errs and all(e is not None and abs(e) <= 1 for e in errs))
    parts = [f"picosnitch: detection {sum(c[0].startswith('PASS') for c in cells)}/{len(results)}",
             f"bandwidth {sum(c[1].startswith('PASS') for c in cells)}/{len(results)} "
             f"({within} within ±1% of application bytes, {len(results) - len(ran)} not run)"]
    s = samples.get("picosnitch")
    if s:
        parts.append(f"CPU mean {s['cpu_mean']:.2f}% p95 {s['cpu_p95']:.2f}%, PSS {mb(s['pss_steady'])}")
    if over:
        parts.append(f"throughput ratio UDP send {over['udp-loop']['ratio']:.3f}, UDP sendto "
                     f"{over['udp-sendto-loop']['ratio']:.3f}, TCP {over['tcp-loop']['ratio']:.3f}")
    if sust:
        parts.append(f"lost events {sust['lost_events']} at {sust['rate']:,.0f} calls/s, start {sust['start_seconds']:.1f} s")
    if cost:
        parts.append("ns per send call " + ", ".join(f"{'send' if m == 'udp-loop' else 'sendto'} {f} {c['per_call']:.0f}"
                                                   for (m, f), c in cost.items()))
    if churned:
        parts.append("churn " + ", ".join(f"{r['proto']}×{r['programs']} {r['connections'] / r['seconds']:,.0f}/s "
                                          f"{churn_error_pct(r):.2f}% off, {r['lost']} lost, CPU {r['cpu']:.0f}%"
                                          for r in churned))
    return "; ".join(parts)


###############################################################################
# main
###############################################################################

def build_generator(workdir):
    gen = os.path.join(workdir, "gen")
    src = os.path.join(HERE, "gen.c")
    sh("gcc", "-O2", "-o", gen, src, "-luring", "-lpthread")
    sh("gcc", "-O2", "-static", "-o", gen + "-static", src, "-luring", "-lpthread")
    return gen


def parse_args(argv):
    p = argparse.ArgumentParser(description="picosnitch benchmark")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--scenarios", default=",".join(s.sid for s in SCENARIOS))
    p.add_argument("--tools", default="picosnitch,bpftrace,nethogs,opensnitch")
    p.add_argument("--smoke", action="store_true", help=f"{','.join(SMOKE)}, one trial, picosnitch only, short loops")
    p.add_argument("--report", default=None, help="where to write the scorecard (default bench/reports/DATE-KERNEL.md)")
    p.add_argument("--sustain", type=int, default=30, help="seconds of the sustained send-rate run")
    p.add_argument("--pairs", type=int, default=3, help="alternate without/with runs per overhead loop")
    p.add_argument("--cost-only", action="store_true",
                   help="only the cost per send call and the throughput ratios (no scenarios, no peers' tools)")
    p.add_argument("--churn", type=int, default=60, help="seconds of each connection-churn run (0: none)")
    p.add_argument("--churn-only", action="store_true", help="only the connection-churn runs")
    p.add_argument("--churn-runs", default="", help="the churn runs to make, as PROTO:PROGRAMS:RATE (RATE 0: as fast "
                                                    "as they can), comma separated (default: all of CHURN_RUNS)")
    p.add_argument("--live", type=int, default=30, help="seconds of each live-stream run (0: none)")
    p.add_argument("--live-only", action="store_true", help="only the live-stream runs")
    p.add_argument("--novelty-only", action="store_true",
                   help="only the novelty rules on a realistic desktop month (bench/novelty.py; no root needed)")
    args = p.parse_args(argv)
    try:
        args.churn_runs = [(proto, int(n), int(rate)) for proto, n, rate in
                           (run.split(":") for run in args.churn_runs.split(",") if run)] or CHURN_RUNS
    except ValueError:
        p.error(f"--churn-runs: not PROTO:PROGRAMS:RATE, ...: {args.churn_runs!r}")
    if args.smoke:
        args.trials, args.scenarios, args.tools, args.sustain, args.pairs = 1, ",".join(SMOKE), "picosnitch", 3, 1
        args.churn = min(args.churn, 3)       # (one run, TCP from one program, with a 1-s write limit)
        args.live = min(args.live, 6)
    kind = "churn-" if args.churn_only else "cost-" if args.cost_only else "live-" if args.live_only else \
        "novelty-" if args.novelty_only else ""
    if args.live_only:
        args.churn, args.churn_only = 0, True           # (no scenario, cost or overhead loop either)
    args.report = args.report or os.path.join(HERE, "reports", f"{kind}{datetime.date.today()}-{os.uname().release}.md")
    return args


def run_tools(args, gen, workdir, results):
    tools = [TOOLS[name](workdir) for name in args.tools.split(",")]
    for tool in tools:
        tool.start()
    sampler = Sampler(tools)
    sampler.start()
    try:
        for scenario in [s for s in SCENARIOS if s.sid in args.scenarios.split(",")]:
            for trial in range(1, args.trials + 1):
                result = run_scenario(scenario, gen, workdir, trial, tools)
                results.setdefault(scenario.sid, []).append(result)
                brief = {t: (r["detection"], r["bytes"]) for t, r in result.get("tools", {}).items()}
                say(f"{scenario.sid} trial {trial}: {result['status']} app={result.get('app')} "
                    f"wire={result.get('wire')} {brief or result.get('why', '')}")
                if result["status"] == "unsupported":
                    break
    finally:
        sampler.stop.set()
        for tool in tools:
            tool.stop()
    return {t.name: sampler.summary(t.name) for t in tools}, [t.name for t in tools]


def novelty_only(args):
    """bench/novelty.py, in picosnitch's environment when there is one (it
    reads GeoIP databases with geoip2)."""
    python = NOVELTY_PYTHON if os.path.exists(NOVELTY_PYTHON) else sys.executable
    return subprocess.run([python, os.path.join(HERE, "novelty.py"), "--report", args.report]).returncode


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.novelty_only:
        return novelty_only(args)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (BPF, network namespaces)")
    workdir = tempfile.mkdtemp(prefix="psbench-")
    os.chmod(workdir, 0o755)          # (picosnitch's account passes through it to its state directory)
    os.makedirs(os.path.join(workdir, "exe"))
    results = {}
    try:
        gen = build_generator(workdir)
        with Network():
            peers = [start_peer(["ip", "netns", "exec", PEER_NS], "all"), start_peer([], "basic")]
            millis = 3000 if not args.smoke else 1000
            samples, tools, sust, cost, over, empty, floors, churned, lived = {}, [], None, None, None, None, None, None, None
            try:
                if not (args.cost_only or args.churn_only):
                    samples, tools = run_tools(args, gen, workdir, results)
                if not args.churn_only:
                    say("cost per send call, in the kernel's own accounting")
                    cost = per_call_cost(gen, workdir, millis, args.pairs)
                    say("overhead loops")
                    over = overhead(gen, workdir + "/overhead", args.pairs, millis)
                if not (args.cost_only or args.churn_only):
                    say("sustained send rate")
                    sust = sustained(gen, workdir, args.sustain)
                if not args.churn_only:
                    say("cost of an empty program on the send path")
                    empty, floors = floor(gen, args.pairs, millis)
                if args.churn and not args.cost_only:
                    say("connection churn")
                    churned = churn(workdir, args.churn, *((CHURN_RUNS[:1], 1) if args.smoke else (args.churn_runs,)))
                if args.live and not args.cost_only and (args.live_only or not args.churn_only):
                    say("live event stream")
                    lived = live(workdir, args.live)
            finally:
                for peer in peers:
                    peer.kill()
        text, summary = report(args, results, samples, over, sust, tools, empty, cost, floors, churned, lived)
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            f.write(text)
        say(f"scorecard: {args.report}")
        print(summary)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
