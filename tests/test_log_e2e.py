"""What the daemon logs around the capture, end to end: domains (getaddrinfo
and reverse lookups), "Log ignore", "Every exe", conn.log, the Log switches,
the remote copy on a real PostgreSQL server, VirusTotal (a local server
speaking its API) and the GeoIP download (a local file server). The Log
switches are in test_log_switches_e2e.py (they need a daemon of their own)."""
import gzip
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import pytest

import mmdb
import picosnitch
from conftest import (PEER_NAMES, PEER_PORT, PEER_V4, PEER_V6, Daemon, bench_run, need_root, notifications,
                      sha256_file, unique_python, wait_for)
from http_services import API_KEY, FakeVirusTotal, FileServer, stats

IGNORED_PORT = 7399
# loopback addresses named only by the clients' own hosts files (getaddrinfo
# answers apply to the address for every process, so each test has its own)
NAMED, IGNORED_NAMED = "127.0.0.3", "127.0.0.4"


def traffic(exe, mode, host, nbytes, names=None, port=PEER_PORT):
    """traffic.py run by exe as root; with names, in a mount namespace whose
    /etc/hosts has them, so that getaddrinfo answers from it."""
    argv = [exe, os.path.join(os.path.dirname(exe), "traffic.py"), mode, host, str(port), str(nbytes)]
    home = tempfile.mkdtemp(prefix="ps-hosts-")
    if names:
        argv = bench_run.private_resolver(argv, home, names)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if out.stdout.strip() else {}




@pytest.fixture(scope="module")
def services():
    vt, files = FakeVirusTotal(), FileServer({})
    yield vt, files
    vt.close()
    files.close()


@pytest.fixture(scope="module")
def ignored_python(exe_dir):
    return unique_python(exe_dir)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, peers, session_bus, postgres, services, ignored_python):
    need_root()
    vt, files = services
    month = time.strftime("%Y-%m")
    files.files[f"/dbip-{month}.mmdb.gz"] = gzip.compress(mmdb.build({"10.231.0.0/24": "DE", "fd31:5e::/64": "JP"}))
    config = {"Every exe (not just conns)": True, "DB text log": True,
              "Log ignore": [IGNORED_PORT, sha256_file(ignored_python), "test.picosnitch.ign", "::1/128"],
              "DB sql server": postgres.settings("psycopg2", table_name="daemon_log"),
              "VT API key": API_KEY, "VT API address": vt.base, "VT request limit (seconds)": 0,
              "GeoIP lookup": True, "GeoIP download address": files.base + "/dbip-{year}-{month}.mmdb.gz"}
    d = Daemon(str(tmp_path_factory.mktemp("home")), config=config,
               env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]}).start()
    yield d
    assert d.stop() == 0


def record(daemon):
    return json.loads(daemon.read("record.json") or "{}")


def test_domain_from_getaddrinfo(daemon, exe_dir):
    exe = unique_python(exe_dir)
    out = traffic(exe, "tcp-up", "fwd.picosnitch.test", 1000, names={NAMED: "fwd.picosnitch.test"})
    rows = daemon.wait_rows(exe=exe, lport=out["lport"])
    assert rows and {(r["raddr"], r["domain"]) for r in rows} == {(NAMED, "fwd.picosnitch.test")}


@pytest.mark.parametrize("host", [PEER_V6, "127.0.0.1"])
def test_domain_from_a_reverse_lookup(daemon, exe_dir, host):
    """Addresses no getaddrinfo named: the daemon's hosts file names them."""
    exe = unique_python(exe_dir)
    out = traffic(exe, "tcp-up", host, 1000)
    rows = daemon.wait_rows(exe=exe, lport=out["lport"])
    expected = PEER_NAMES.get(host, "localhost")
    assert rows and {(r["raddr"], r["domain"]) for r in rows} == {(host, expected)}


def test_ignored_connections_stay_out_of_every_log_but_not_the_record(daemon, exe_dir, ignored_python, postgres):
    cases = {"port": (unique_python(exe_dir), "udp-exit", "127.0.0.1", IGNORED_PORT, None),
             "subnet": (unique_python(exe_dir), "tcp-up", "::1", PEER_PORT, None),
             "hash": (ignored_python, "tcp-up", PEER_V4, PEER_PORT, None),
             "domain": (unique_python(exe_dir), "tcp-up", "a.b.ign.picosnitch.test", PEER_PORT,
                        {IGNORED_NAMED: "a.b.ign.picosnitch.test"}),
             "kept": (unique_python(exe_dir), "tcp-up", PEER_V4, PEER_PORT, None)}
    for exe, mode, host, port, names in cases.values():
        traffic(exe, mode, host, 500, names=names, port=port)
    kept = cases["kept"][0]
    assert daemon.wait_rows(exe=kept)
    assert wait_for(lambda: all(exe in record(daemon)["Executables"] for exe, *_ in cases.values()))
    conn_log = [line.split(",") for line in daemon.read("conn.log").splitlines()]
    remote = [r[0] for r in postgres.query("SELECT exe FROM daemon_log WHERE rport <> -1")]
    for why, (exe, *_) in cases.items():
        if why != "kept":
            assert [r for r in daemon.rows(exe=exe) if r["rport"] != -1] == [], why
            assert [f for f in conn_log if f[3] == exe and f[13] != "-1"] == [], why
            assert exe not in remote, why
    assert wait_for(lambda: kept in [r[0] for r in postgres.query("SELECT exe FROM daemon_log")])


def test_every_exe_is_recorded_with_port_minus_one(daemon, exe_dir):
    exe = unique_python(exe_dir)
    subprocess.run([exe, "-c", "pass"], check=True)
    rows = daemon.wait_rows(exe=exe)
    assert [(r["send"], r["recv"], r["lport"], r["rport"], r["sha256"]) for r in rows] == \
        [(0, 0, -1, -1, sha256_file(exe))]
    assert exe in record(daemon)["Executables"]
    assert f"First run seen for {os.path.basename(exe)} ({exe})" in daemon.read("exe.log")


def test_an_executable_gone_before_it_could_be_opened_is_recorded_and_reported(daemon):
    """The reader (which opens each executable as it runs) is paused while a
    program runs from a tmpfs that exists only in its own mount namespace,
    and which is gone when the reader resumes."""
    with open(picosnitch.STATUSFILE) as f:
        monitor = json.load(f)["children"]["reader"]
    mount = tempfile.mkdtemp(prefix="ps-gone-")
    name = "psgone" + uuid.uuid4().hex[:8]
    script = f'mount -t tmpfs none {mount} && cp /usr/bin/true {mount}/{name} && {mount}/{name}'
    os.kill(monitor, signal.SIGSTOP)
    try:
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], check=True)
    finally:
        os.kill(monitor, signal.SIGCONT)
        shutil.rmtree(mount, ignore_errors=True)
    assert wait_for(lambda: daemon.rows(name=name))
    rows = daemon.rows(name=name)
    assert [(r["exe"], r["sha256"], r["rport"]) for r in rows] == [(f"{mount}/{name}", "", -1)]
    assert wait_for(lambda: f"could not hash {mount}/{name}" in daemon.read("error.log"))


def test_text_log_matches_the_database(daemon, exe_dir):
    exe = unique_python(exe_dir)
    out = traffic(exe, "tcp-up", PEER_V4, 4321)
    rows = daemon.wait_rows(exe=exe, lport=out["lport"])
    expected = {picosnitch.text_log_line(tuple(r[c] for c in picosnitch.DB_COLUMNS)) for r in rows}
    lines = [line for line in daemon.read("conn.log").splitlines() if f",{exe}," in line and f",{out['lport']}," in line]
    assert set(lines) == expected and len(lines) == len(rows)
    fields = lines[0].split(",")
    assert len(fields) == 17 and fields[3] == exe and fields[13] == str(PEER_PORT) and fields[16] == PEER_NAMES[PEER_V4]


def test_remote_copy_has_the_same_rows(daemon, exe_dir, postgres):
    exe = unique_python(exe_dir)
    out = traffic(exe, "tcp-up", PEER_V4, 7777)
    rows = daemon.wait_rows(exe=exe, lport=out["lport"])
    query = f"SELECT send, recv, sha256, raddr, domain FROM daemon_log WHERE exe = '{exe}' AND lport = {out['lport']}"
    expected = sorted([str(r["send"]), str(r["recv"]), r["sha256"], r["raddr"], r["domain"]] for r in rows)
    assert wait_for(lambda: sorted(postgres.query(query)) == expected), (postgres.query(query), expected)


def test_virustotal_verdicts_are_stored_and_flags_notified(daemon, exe_dir, services, session_bus):
    vt = services[0]
    exe = unique_python(exe_dir)
    sha = sha256_file(exe)
    vt.known[sha] = stats(malicious=2, suspicious=1)
    traffic(exe, "tcp-up", PEER_V4, 100)
    verdict = "VirusTotal: 2 malicious, 1 suspicious, 0 harmless, 70 undetected"
    assert wait_for(lambda: record(daemon).get("SHA256", {}).get(exe, {}).get(sha) == verdict)
    flagged = f"VirusTotal flags {exe} (sha256 {sha}): {verdict}"
    assert wait_for(lambda: [n for n in notifications(session_bus[1]) if n["body"] == flagged])
    assert flagged in daemon.read("exe.log")
    assert all(API_KEY not in daemon.read(name) for name in ("error.log", "exe.log"))
    assert all(r[3].get("x-apikey") == API_KEY for r in vt.server.requests)


def test_geoip_database_is_downloaded_into_the_state_directory(daemon):
    path = daemon.path(picosnitch.GEOIP_NAME)
    assert wait_for(lambda: os.path.exists(path))
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert picosnitch.GeoIP(path, print).country(PEER_V6) == "JP"
