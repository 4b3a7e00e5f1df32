"""Capture on the running kernel: real BPF, real traffic, real session bus.

Each case runs a uniquely named and hashed copy of python as user nobody,
moving a known number of payload bytes, and checks its rows in snitch.db.
"""
import collections
import json
import os
import pwd
import subprocess
import time

import pytest

import picosnitch
from conftest import (PEER_PORT, PEER_V4, PEER_V6, REPORT, Daemon, need_root, notifications,
                      sha256_file, tracefs_unmounted, unique_c_sender, unique_python, wait_for)

NOBODY = 65534
PAYLOAD = {"tcp-up": 2_000_000, "tcp-down": 2_000_000, "udp": 50_000}
HOSTS = {("veth", 4): PEER_V4, ("veth", 6): PEER_V6, ("loopback", 4): "127.0.0.1", ("loopback", 6): "::1"}
CASES = [(mode, via, ip) for mode in PAYLOAD for via in ("veth", "loopback") for ip in (4, 6)]


def as_nobody():
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def traffic(exe, mode, host, nbytes, user=as_nobody):
    argv = [exe, os.path.join(os.path.dirname(exe), "traffic.py"), mode, host, str(PEER_PORT), str(nbytes)]
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=user, timeout=60)
    assert out.returncode == 0, out.stderr
    return argv, json.loads(out.stdout) if out.stdout.strip() else {}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, peers, session_bus):
    need_root()
    unmounted = tracefs_unmounted()
    d = Daemon(str(tmp_path_factory.mktemp("home")), env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]})
    d.start()
    d.tracefs_was_unmounted = unmounted
    yield d
    assert d.stop() == 0


def me():
    exe = os.readlink("/proc/self/exe")
    name = open("/proc/self/comm").read().strip()
    return exe, name, sha256_file(exe)


def test_starts_with_tracefs_unmounted(daemon):
    assert daemon.tracefs_was_unmounted, "tracefs could not be unmounted before the start"
    assert any("mounted tracefs at /sys/kernel/tracing" in line for line in daemon.lines)
    mode = [line for line in daemon.lines if "capturing, mode" in line]
    REPORT.append(mode[0].replace("picosnitch: capturing, mode", "capture mode:") if mode else "no capture mode")
    assert any("capturing, mode tracepoint" in line for line in daemon.lines)


@pytest.mark.parametrize("mode,via,ip", CASES, ids=[f"{m}-{v}-ipv{i}" for m, v, i in CASES])
def test_traffic_is_attributed_and_counted(daemon, exe_dir, mode, via, ip):
    exe = unique_python(exe_dir)
    host = HOSTS[(via, ip)]
    argv, out = traffic(exe, mode, host, PAYLOAD[mode])
    expected_sent = PAYLOAD[mode] + (len(f"up {PAYLOAD[mode]}\n") if mode == "tcp-up" else 0)
    expected_recv = PAYLOAD[mode] if mode in ("tcp-down", "udp") else 0
    if mode == "tcp-down":
        expected_sent = len(f"down {PAYLOAD[mode]}\n")
    assert (out["sent"], out["received"]) == (expected_sent, expected_recv)

    rows = daemon.wait_rows(exe=exe, lport=out["lport"])
    assert rows, f"no rows for {exe}; all rows: {daemon.rows()}"
    logged = (sum(r["send"] for r in rows), sum(r["recv"] for r in rows))
    REPORT.append(f"{mode:8} {via:8} ipv{ip}: expected send/recv {expected_sent}/{expected_recv}, "
                  f"logged {logged[0]}/{logged[1]}")
    assert logged == (expected_sent, expected_recv)

    pexe, pname, psha = me()
    proto = "tcp" if mode.startswith("tcp") else "udp"
    laddr = out["laddr"] if proto == "tcp" else ("0.0.0.0" if ip == 4 else "::")
    for r in rows:
        assert (r["name"], r["cmdline"], r["sha256"]) == (os.path.basename(exe), " ".join(argv), sha256_file(exe))
        assert (r["pexe"], r["pname"], r["psha256"]) == (pexe, pname, psha)
        assert (r["uid"], r["proto"], r["rport"], r["raddr"], r["laddr"]) == (NOBODY, proto, PEER_PORT, host, laddr)


# one UDP socket and one raw ICMP socket, both unconnected, each sending to
# several peers in turn: the peer is only in the calls
PEERS_SCRIPT = """
import json, socket, struct, sys, time
port, rounds, hosts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]

def echo(size, seq):
    body = struct.pack("!BBHHH", 8, 0, 0, 0x5053, seq) + b"p" * size
    total = sum(struct.unpack(f"!{len(body) // 2}H", body))
    total = (total >> 16) + (total & 0xffff)
    total += total >> 16
    return body[:2] + struct.pack("!H", ~total & 0xffff) + body[4:]

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
first = icmp.sendto(echo(10, 0), ("127.0.0.3", 0))
time.sleep(0.5)
sent = {host: [0, 0] for host in hosts}
for i in range(rounds):
    for n, host in enumerate(hosts):
        sent[host][0] += udp.sendto(b"u" * 100 * (n + 1), (host, port))
        sent[host][1] += icmp.sendto(echo(50 * (n + 1), i + 1), (host, 0))
print(json.dumps({"lport": udp.getsockname()[1], "first": first, "sent": sent}))
"""


def test_unconnected_sockets_log_each_peer(daemon, exe_dir):
    """Several peers on one unconnected UDP socket and on one raw ICMP
    socket: each peer's bytes under its own address. The first unconnected
    ICMP send asks for the route hooks (which name ICMP and raw peers in the
    tracepoint mode): its bytes are counted, its peer may be blank."""
    exe, script = unique_python(exe_dir), os.path.join(exe_dir, "peers.py")
    with open(script, "w") as f:
        f.write(PEERS_SCRIPT)
    hosts = ["127.0.0.1", PEER_V4]
    out = json.loads(subprocess.run([exe, script, str(PEER_PORT), "40", *hosts], capture_output=True, text=True,
                                    check=True, timeout=60).stdout)
    rows = daemon.wait_rows(exe=exe)
    logged = collections.Counter()
    for r in rows:
        logged[(r["proto"], r["raddr"])] += r["send"]
    for host in hosts:
        udp, icmp = out["sent"][host]
        REPORT.append(f"unconnected peers {host}: expected udp/icmp {udp}/{icmp}, "
                      f"logged {logged[('udp', host)]}/{logged[('icmp', host)]}")
        assert (logged[("udp", host)], logged[("icmp", host)]) == (udp, icmp), logged
    icmp_total = sum(r["send"] for r in rows if r["proto"] == "icmp")
    assert icmp_total == out["first"] + sum(icmp for _, icmp in out["sent"].values())
    assert all((r["rport"], r["lport"]) == (PEER_PORT, out["lport"]) for r in rows if r["proto"] == "udp")


def test_splice_download_is_counted(daemon, exe_dir):
    """splice() from a TCP socket never goes through recvmsg."""
    exe = unique_python(exe_dir)
    _, out = traffic(exe, "tcp-splice", PEER_V4, 3_000_000)
    assert out["received"] == 3_000_000
    rows = daemon.wait_rows(exe=exe, lport=out["lport"])
    logged = (sum(r["send"] for r in rows), sum(r["recv"] for r in rows))
    REPORT.append(f"tcp-splice veth ipv4: expected send/recv {out['sent']}/{out['received']}, "
                  f"logged {logged[0]}/{logged[1]}")
    assert logged == (out["sent"], out["received"])


def test_short_lived_process_is_attributed_and_hashed(daemon, exe_dir):
    exe = unique_c_sender(exe_dir)
    subprocess.run([exe, PEER_V4, str(PEER_PORT), "1234"], check=True)
    rows = daemon.wait_rows(exe=exe)
    assert [(r["send"], r["recv"], r["raddr"], r["rport"]) for r in rows] == [(1234, 0, PEER_V4, PEER_PORT)]
    assert rows[0]["sha256"] == sha256_file(exe)
    assert rows[0]["name"] == os.path.basename(exe)
    assert (rows[0]["pexe"], rows[0]["psha256"]) == (me()[0], me()[2])


def test_modified_executable_gets_new_hash_and_notification(daemon, exe_dir, session_bus):
    exe = unique_python(exe_dir)
    traffic(exe, "udp", PEER_V4, 2000)
    first = daemon.wait_rows(exe=exe)
    old_sha = sha256_file(exe)
    assert {r["sha256"] for r in first} == {old_sha}
    with open(exe, "ab") as f:
        f.write(b"modified")
    new_sha = sha256_file(exe)
    traffic(exe, "udp", PEER_V4, 3000)
    rows = daemon.wait_rows(exe=exe, sha256=new_sha)
    assert sum(r["send"] for r in rows) == 3000
    log = daemon.read("exe.log")
    assert f"New sha256 for {os.path.basename(exe)} ({exe}): {new_sha}" in log
    deadline = time.monotonic() + 10
    while not [n for n in notifications(session_bus[1]) if new_sha in n["body"]] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [n for n in notifications(session_bus[1]) if new_sha in n["body"]]


def test_new_program_notifies_exactly_once(daemon, exe_dir, session_bus):
    exe = unique_python(exe_dir)
    for _ in range(3):
        traffic(exe, "udp", PEER_V4, 1000)
    daemon.wait_rows(exe=exe)
    assert wait_for(lambda: [n for n in notifications(session_bus[1]) if exe in n["body"]], 15)
    time.sleep(picosnitch.NOVELTY_GROUP_SECONDS + 2)        # (by now, a second notice would have come)
    about = [n for n in notifications(session_bus[1]) if exe in n["body"]]
    assert len(about) == 1, about
    # (alone, or a line of a notice of what was new within seconds of it)
    assert f"First network connection detected for {os.path.basename(exe)} ({exe})" in about[0]["body"].splitlines()
    assert about[0]["app"] == "picosnitch"


def test_tcp_connect_without_payload_is_logged(daemon, exe_dir):
    exe = unique_python(exe_dir)
    code = "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2]))); print(s.getsockname()[1])"
    out = subprocess.run([exe, "-c", code, PEER_V4, str(PEER_PORT)],
                         capture_output=True, text=True, check=True)
    rows = daemon.wait_rows(exe=exe)
    assert [(r["send"], r["recv"], r["lport"], r["raddr"]) for r in rows] == [(0, 0, int(out.stdout), PEER_V4)]


def test_the_settings_are_the_users_and_the_records_picosnitchs(daemon):
    """config.json and its directory: the user's alone. What picosnitch
    records: its account's, no one else may write it, and no other account
    may read it (the user picosnitch works for reads it through an ACL)."""
    assert os.stat(daemon.path("config.json")).st_mode & 0o077 == 0
    assert os.stat(daemon.dir).st_mode & 0o077 == 0
    account = pwd.getpwnam(picosnitch.ACCOUNT).pw_uid
    for name in ("record.json", "snitch.db", "exe.log", picosnitch.PRIVATE_NAME):
        st = os.stat(daemon.path(name))
        assert st.st_uid == account and st.st_mode & 0o027 == 0, name
    assert os.stat(daemon.state).st_mode & 0o777 == 0o750
