"""Shared fixtures: the picosnitch daemon, a peer in a network namespace, a
session bus with a notification service, and unique traffic executables."""
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "bench"))

import picosnitch  # noqa: E402
import reach as bench_reach  # noqa: E402
import run as bench_run  # noqa: E402
import sqlservers  # noqa: E402

# the python the tests run with: picosnitch's environment (tests/run.sh), which
# sees the system's bcc and has Dash; the distribution's own python beside it
PYTHON = sys.executable
SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = os.path.join(ROOT, "picosnitch.py")
PEER_PORT = 7310
NETNS = f"pstest{os.getpid()}"
HOST_V4, PEER_V4 = "10.231.0.1", "10.231.0.2"
HOST_V6, PEER_V6 = "fd31:5e::1", "fd31:5e::2"
PEER_NAMES = {PEER_V4: "peer4.picosnitch.test", PEER_V6: "peer6.picosnitch.test"}


REPORT = []   # lines for the end of the run: capture mode, bytes expected and logged


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("picosnitch capture report")
        for line in REPORT:
            terminalreporter.write_line(line)


def pytest_configure(config):
    # bcc 0.26 warns when given str instead of bytes by its own helpers
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:bcc")


class Reports:
    """A Reporter as picosnitch's processes have one, with the notifier's end
    of its channel read back here."""

    def __init__(self):
        tx, self.rx = picosnitch.Channel.pair()
        self.reporter = picosnitch.Reporter(tx)
        self.received = []

    def read(self):
        while True:
            message = self.rx.recv(0)
            if message is None:
                return self.received
            self.received.append(message)

    def errors(self):
        return [r.text for r in self.read() if r.kind == "error"]

    def text(self):
        return "\n".join(r.text + r.detail for r in self.read())


def runtime(config, home, reporter=None, environ=None, run_id="test-run"):
    """A Runtime for one process's parts tested in-process: the user and the
    account are whoever runs the tests, with home/state as the state
    directory (its private part made)."""
    me = picosnitch.User(pwd.getpwuid(os.getuid()).pw_name, os.getuid(), os.getgid(), str(home))
    state = os.path.join(str(home), "state")
    os.makedirs(os.path.join(state, picosnitch.PRIVATE_NAME), exist_ok=True)
    rt = picosnitch.make_runtime(picosnitch.Setup(config, me, me, state, []), environ or {})
    rt.run_id = run_id
    if reporter is not None:
        rt.reporter = reporter
    return rt


@pytest.fixture
def private_umask():
    """The umask of picosnitch's user-side processes, for one test."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def wait_for(predicate, timeout=30, step=0.1):
    """True once predicate() is, polling every step seconds; its last value after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def need_root():
    """Capture tests need root; in CI that is a failure, not a skip."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the capture tests must run as root in CI")
        pytest.skip("needs root (BPF, network namespaces)")


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def private_resolver(cmd, directory):
    """cmd with a hosts file naming the peer and no resolver beyond the machine
    (see bench/run.py)."""
    return bench_run.private_resolver(cmd, directory, PEER_NAMES)


def wait_capturing(proc, lines, timeout, failure):
    """Collect proc's output in lines until it says it is capturing; an
    AssertionError (failure, and the output) if it ends or takes longer than
    timeout, after stopping it."""
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "capturing" in line:
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(90)
            raise AssertionError(f"{failure}:\n" + "\n".join(lines))


STATES = []     # the state directories made for this run, removed at its end


def new_state():
    """A state directory of its own for a daemon under test, where
    picosnitch's checks accept one: in /var/tmp (sticky, root's), which the
    users of the tests can pass through (pytest's own temporary directories
    are root's alone). It is made when picosnitch starts."""
    STATES.append(tempfile.mkdtemp(prefix="ps-state-", dir="/var/tmp"))
    os.chmod(STATES[-1], 0o755)
    return os.path.join(STATES[-1], "state")


@pytest.fixture(scope="session", autouse=True)
def states_removed():
    yield
    for path in STATES:
        shutil.rmtree(path, ignore_errors=True)


def in_state(path):
    """A state directory's file, opened as picosnitch's account would leave
    it, for tests that plant one: the account's, 0640."""
    account = pwd.getpwnam(picosnitch.ACCOUNT)
    os.chown(path, account.pw_uid, account.pw_gid)
    os.chmod(path, 0o640)


# A run started in the background inherits SIGINT ignored, and so would every
# `picosnitch dash` it starts, which the tests stop as Ctrl-C does: Python's
# own handler here gives them SIGINT's default again.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Every picosnitch the tests start uses a state directory of the tests', never
# the machine's /var/lib/picosnitch: this one unless a test names another.
os.environ.setdefault("STATE_DIRECTORY", new_state())


class Daemon:
    """picosnitch start-no-daemon with its own HOME (as root), or for a user
    (as under sudo: their home, their files), with a state directory of its
    own, stopped with SIGTERM."""

    def __init__(self, home=None, config=None, env=None, user=None, state=None, wrap=()):
        self.home = user.pw_dir if user else home
        self.wrap = list(wrap)          # a command that runs the daemon's ("$@")
        self.state = state or new_state()
        self.dir = os.path.join(self.home, ".config", "picosnitch")
        os.makedirs(self.dir, exist_ok=True)
        settings = {"DB write limit (seconds)": 1, "GeoIP lookup": False}
        settings.update(config or {})
        with open(os.path.join(self.dir, "config.json"), "w") as f:
            json.dump(settings, f)
        self.env = dict(os.environ, HOME=self.home, STATE_DIRECTORY=self.state, **(env or {}))
        self.env.pop("SUDO_USER", None)
        if user:
            for path in (os.path.dirname(self.dir), self.dir, os.path.join(self.dir, "config.json")):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.env["SUDO_USER"] = user.pw_name
        self.lines = []
        self.proc = None

    def start(self, timeout=90):
        self.resolver = tempfile.mkdtemp(prefix="ps-resolver-")
        cmd = private_resolver(self.wrap + [PYTHON, SCRIPT, "start-no-daemon"], self.resolver)
        self.proc = subprocess.Popen(cmd, env=self.env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            wait_capturing(self.proc, self.lines, timeout, "picosnitch did not start")
        except AssertionError:
            shutil.rmtree(self.resolver, ignore_errors=True)
            raise
        return self

    def stop(self, timeout=60):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        shutil.rmtree(getattr(self, "resolver", ""), ignore_errors=True)
        return self.proc.returncode

    def path(self, name):
        """Where one of picosnitch's files is: config.json in the user's
        directory; what it records in its state directory."""
        if name == "config.json":
            return os.path.join(self.dir, name)
        return os.path.join(self.state, name)

    def private(self, name):
        return os.path.join(self.state, picosnitch.PRIVATE_NAME, name)

    def plant(self, path, data):
        """A file in the state directory (or its private part) before the
        start, as picosnitch's account would have left it."""
        account = pwd.getpwnam(picosnitch.ACCOUNT)
        for directory in (self.state, self.private("")):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chown(directory, account.pw_uid, account.pw_gid)
        with open(path, "wb") as f:
            f.write(data)
        in_state(path)

    def remove_state(self):
        shutil.rmtree(os.path.dirname(self.state), ignore_errors=True)

    def rows(self, **where):
        db = self.path("snitch.db")
        if not os.path.exists(db):
            return []
        try:
            rows = picosnitch.db_rows(db)
        except sqlite3.DatabaseError:        # (locked, or damaged and not yet moved aside)
            return []
        return [r for r in rows if all(r[k] == v for k, v in where.items())]

    def wait_rows(self, timeout=20, settle=2.5, **where):
        """Rows matching `where` once their byte counts stop changing."""
        deadline, last, stable_since = time.monotonic() + timeout, None, None
        while time.monotonic() < deadline:
            rows = self.rows(**where)
            totals = (len(rows), sum(r["send"] for r in rows), sum(r["recv"] for r in rows))
            if rows and totals == last:
                if time.monotonic() - stable_since >= settle:
                    return rows
            else:
                last, stable_since = totals, time.monotonic()
            time.sleep(0.3)
        return self.rows(**where)

    def read(self, name):
        path = self.path(name)
        return open(path, encoding="utf-8").read() if os.path.exists(path) else ""


def dash_started(cmd, **kw):
    """`picosnitch dash` started by cmd: the process, the address it printed
    (with its token; None if it printed none) and the line it printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    line = proc.stdout.readline()
    found = re.search(r" on (http://\S+\?token=[A-Za-z0-9_-]+) ", line)
    return proc, found.group(1) if found else None, line


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def remove_stale_namespaces():
    """Namespaces (and their veth pairs, which hold the test addresses) left
    by a run that was killed before it could remove them."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(r"^pstest(\d+)", listed, re.M):
        if int(name) != os.getpid() and b"pytest" not in read_bytes(f"/proc/{name}/cmdline"):
            subprocess.run(["ip", "link", "del", f"psv{int(name) % 10000}a"], capture_output=True)
            subprocess.run(["ip", "netns", "del", f"pstest{name}"], capture_output=True)


@pytest.fixture(scope="session")
def netns():
    """A peer in its own network namespace over a veth pair, IPv4 and IPv6."""
    need_root()
    remove_stale_namespaces()
    host_if, peer_if = f"psv{os.getpid() % 10000}a", f"psv{os.getpid() % 10000}b"
    cmds = [["ip", "netns", "add", NETNS],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if],
            ["ip", "link", "set", peer_if, "netns", NETNS],
            ["ip", "addr", "add", f"{HOST_V4}/24", "dev", host_if],
            ["ip", "-6", "addr", "add", f"{HOST_V6}/64", "dev", host_if, "nodad"],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "-n", NETNS, "addr", "add", f"{PEER_V4}/24", "dev", peer_if],
            ["ip", "-n", NETNS, "-6", "addr", "add", f"{PEER_V6}/64", "dev", peer_if, "nodad"],
            ["ip", "-n", NETNS, "link", "set", peer_if, "up"],
            ["ip", "-n", NETNS, "link", "set", "lo", "up"]]
    for cmd in cmds:
        run(*cmd)
    yield NETNS
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def start_peer(prefix):
    """The benchmark's peer server, TCP and UDP echo only (bench/peer.py)."""
    proc = subprocess.Popen(prefix + [PYTHON, os.path.join(ROOT, "bench", "peer.py"), str(PEER_PORT), "basic"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture(scope="session")
def peers(netns):
    """Peer servers: one inside the namespace, one on the host's loopback."""
    procs = [start_peer(["ip", "netns", "exec", netns]), start_peer([])]
    yield
    for proc in procs:
        proc.kill()
        proc.wait()


def scratch_directory(prefix, mode):
    """For a fixture: a directory of root's with that mode, outside pytest's
    private temporary directory (which no other user can enter), removed after."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, mode)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def recording_bus(base, user=None, capabilities="body"):
    """For a fixture: a real dbus-daemon session bus in base, with the
    recording notification service saying it has these capabilities; both
    run as user, if one is named (a session bus admits only its owner).
    Nothing of them names picosnitch in its command line (the service runs
    from a copy in base): a test's program of the user kills every process
    that does. Yields (address, record)."""
    need_root()
    preexec = as_user(user) if user else None
    address, record, service = f"unix:path={base}/bus", os.path.join(base, "notifications.jsonl"), \
        os.path.join(base, "notifications.py")
    shutil.copy(os.path.join(HERE, "notify_service.py"), service)
    open(record, "w").close()
    if user:
        for path in (base, record):
            os.chown(path, user.pw_uid, user.pw_gid)
    procs = [subprocess.Popen(["dbus-daemon", "--session", "--nofork", f"--address={address}", "--print-address"],
                              stdout=subprocess.PIPE, text=True, preexec_fn=preexec)]
    assert procs[0].stdout.readline().startswith("unix:")
    procs.append(subprocess.Popen([SYSTEM_PYTHON, service, address, record, capabilities], stdout=subprocess.PIPE,
                                  text=True, preexec_fn=preexec))
    assert procs[1].stdout.readline().strip() == "ready"
    yield address, record
    for proc in reversed(procs):
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def session_bus(tmp_path_factory):
    """A real dbus-daemon session bus with a recording notification service."""
    yield from recording_bus(str(tmp_path_factory.mktemp("bus")))


@pytest.fixture(scope="session")
def throwaway_user():
    """A real user, made for this run and removed after it, with a home of its own."""
    need_root()
    name = f"pst{os.getpid() % 100000}"
    home = tempfile.mkdtemp(prefix="ps-user-")
    run("useradd", "--home-dir", home, "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group", name)
    entry = pwd.getpwnam(name)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o700)
    yield entry
    subprocess.run(["userdel", name], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def as_user(entry):
    """preexec_fn for running a command as a user."""
    def switch():
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    return switch


@pytest.fixture
def user_home(throwaway_user):
    """The throwaway user's home, with no picosnitch directory in it yet."""
    shutil.rmtree(os.path.join(throwaway_user.pw_dir, ".config"), ignore_errors=True)
    return throwaway_user


@pytest.fixture(scope="session")
def user_session_bus(throwaway_user):
    """The throwaway user's own session bus, with the recording notification service."""
    for base in scratch_directory("ps-user-bus-", 0o700):
        yield from recording_bus(base, throwaway_user)


def served(kind):
    need_root()
    server = kind().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server (Debian's package) on 127.0.0.1:55432."""
    yield from served(sqlservers.Postgres)


@pytest.fixture(scope="session")
def mariadb():
    """A private MariaDB server (Debian's package) on 127.0.0.1:33306."""
    yield from served(sqlservers.MariaDB)


def notifications(record):
    """What the recording notification service got (nothing before its first notice)."""
    try:
        with open(record) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# a notice of several novelty events at once names only the first (the
# notifier groups what comes within seconds; exe.log has each one)
GROUPED = re.compile(r"\d+ (new [a-z ]+, the first: |things are new: )")


def told_of(record, text, log="", after=0.0):
    """The notices that tell of text: its own, or (when log, exe.log's
    content, has text) one of a group of events shown together."""
    return [n for n in notifications(record) if n["time"] >= after and
            (text in n["body"] or (text in log and GROUPED.match(n["body"])))]


@pytest.fixture(scope="session")
def exe_dir():
    """A directory user nobody can read, with the traffic generator in it."""
    path = tempfile.mkdtemp(prefix="picosnitch-test-")
    os.chmod(path, 0o755)
    shutil.copy(os.path.join(HERE, "traffic.py"), path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unique_python(exe_dir):
    """A copy of python with a unique name and, by appended bytes, a unique sha256."""
    name = "pst" + uuid.uuid4().hex[:8]
    path = os.path.join(exe_dir, name)
    shutil.copy2(os.path.realpath(PYTHON), path)
    with open(path, "ab") as f:
        f.write(uuid.uuid4().bytes)
    os.chmod(path, 0o755)
    return path


def unique_c_sender(exe_dir):
    """quick.c built with a unique tag: sends one datagram and exits."""
    tag = uuid.uuid4().hex
    path = os.path.join(exe_dir, "psq" + tag[:8])
    run("gcc", "-O2", f'-DTAG="{tag}"', "-o", path, os.path.join(HERE, "quick.c"))
    os.chmod(path, 0o755)
    return path


def tracefs_unmounted():
    """Unmount tracefs, and debugfs (which mounts tracefs again under it when
    asked), so that picosnitch has to mount tracefs itself."""
    for path in ("/sys/kernel/debug/tracing", "/sys/kernel/debug", "/sys/kernel/tracing"):
        subprocess.run(["umount", path], capture_output=True)
    with open("/proc/self/mounts") as f:
        return not any(line.split()[2] in ("tracefs", "debugfs") for line in f)


def free_share(db):
    """The share of a SQLite file's pages that are free."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("PRAGMA freelist_count").fetchone()[0] / con.execute("PRAGMA page_count").fetchone()[0]
    finally:
        con.close()
