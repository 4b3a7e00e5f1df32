"""Every byte under its own connection, and every program under its own name
(the BPF program text and the reader): reused socket memory, rewritten and fileless
executables, hidden launchers, and senders racing the start."""
import json
import os
import signal
import subprocess
import uuid

import pytest

import picosnitch
from conftest import (HERE, PEER_PORT, PYTHON, REPORT, Daemon, need_root, notifications, sha256_file, unique_c_sender,
                      unique_python, wait_for)

MEMFD_LAUNCHER = """
import os, sys
name, program, *argv = sys.argv[1:]
fd = os.memfd_create(name, 0)
os.write(fd, open(program, "rb").read())
os.execve(fd, [name, *argv], {})
"""

# L forks I, I forks G and exits, G waits until it is adopted, then runs the sender
DOUBLE_FORK = """
import os, sys, time
sender, *argv = sys.argv[1:]
if os.fork() == 0:
    intermediate = os.getpid()
    if os.fork() == 0:
        while os.getppid() == intermediate:
            time.sleep(0.01)
        os.execv(sender, [sender, *argv])
    os._exit(0)
os.wait()
time.sleep(1)
"""

PLAIN_LAUNCH = """
import os, sys
sender, *argv = sys.argv[1:]
if os.fork() == 0:
    os.execv(sender, [sender, *argv])
os.wait()
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, peers, session_bus):
    need_root()
    d = Daemon(str(tmp_path_factory.mktemp("home")), env={"DBUS_SESSION_BUS_ADDRESS": session_bus[0]}).start()
    yield d
    assert d.stop() == 0


def children():
    with open(picosnitch.STATUSFILE) as f:
        return json.load(f)["children"]


def test_reused_socket_memory_never_merges_connections(daemon, exe_dir):
    """144 uploads one after the other from one process, to 127.0.0.1 and
    127.0.0.2 in turn: each is logged under its own address and port, with
    its own bytes."""
    exe = unique_python(exe_dir)
    out = subprocess.run([exe, os.path.join(exe_dir, "traffic.py"), "tcp-alternate", "-", str(PEER_PORT), "144"],
                         capture_output=True, text=True, check=True)
    uploads = json.loads(out.stdout)
    expected = {(u["raddr"], u["lport"]): u["sent"] for u in uploads}
    local = {(u["raddr"], u["lport"]): u["laddr"] for u in uploads}
    assert len(expected) == 144
    total = sum(expected.values())
    assert wait_for(lambda: sum(r["send"] for r in daemon.rows(exe=exe)) == total)
    logged = {}
    for r in daemon.rows(exe=exe):
        assert (r["proto"], r["rport"], r["laddr"]) == ("tcp", PEER_PORT, local[(r["raddr"], r["lport"])])
        logged[(r["raddr"], r["lport"])] = logged.get((r["raddr"], r["lport"]), 0) + r["send"]
    by_address = {a: sum(v for (addr, _), v in logged.items() if addr == a) for a in ("127.0.0.1", "127.0.0.2")}
    REPORT.append(f"socket reuse, 144 uploads: expected per address "
                  f"{ {a: sum(v for (x, _), v in expected.items() if x == a) for a in by_address} }, logged {by_address}")
    assert logged == expected


def rewrite(path):
    """Change the program in place (same inode, same size, new content): its
    tag, whose first 8 characters are in its name."""
    tag = os.path.basename(path)[3:].encode()
    with open(path, "r+b") as f:
        at = f.read().index(tag)
        f.seek(at)
        f.write(b"rewritten"[:len(tag)])


def test_a_rewrite_right_after_the_run_never_logs_the_new_content(daemon, exe_dir):
    """The monitor is held while the program runs and is rewritten: the hash
    logged is never that of the new content; the change is an error naming
    the executable."""
    exe = unique_c_sender(exe_dir)
    ran = sha256_file(exe)
    monitor = children()["monitor"]
    os.kill(monitor, signal.SIGSTOP)
    try:
        subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "321"], check=True)
        rewrite(exe)
    finally:
        os.kill(monitor, signal.SIGCONT)
    rows = daemon.wait_rows(exe=exe)
    assert [(r["send"], r["sha256"]) for r in rows] == [(321, "")]
    assert wait_for(lambda: f"could not hash {exe}" in daemon.read("error.log"))
    assert f"{exe} was changed (written, moved, deleted or given another mode) after it ran" in daemon.read("error.log")
    assert sha256_file(exe) not in daemon.read("record.json") and ran not in daemon.read("record.json")


def test_a_rewrite_after_an_unhindered_run_keeps_the_hash_of_what_ran(daemon, exe_dir):
    exe = unique_c_sender(exe_dir)
    ran = sha256_file(exe)
    subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "123"], check=True)
    rewrite(exe)
    rows = daemon.wait_rows(exe=exe)
    assert [r["send"] for r in rows] == [123]
    assert rows[0]["sha256"] in (ran, "") and rows[0]["sha256"] != sha256_file(exe)
    if rows[0]["sha256"] == "":       # the monitor was slower than the rewrite: it says so
        assert f"could not hash {exe}" in daemon.read("error.log")
    REPORT.append(f"rewrite after an unhindered run: logged {'the hash of what ran' if rows[0]['sha256'] else 'no hash, with an error'}")


def test_a_process_that_replaces_its_executable_stays_under_what_it_ran(daemon, exe_dir):
    """The program makes /proc/PID/exe name another executable (prctl
    PR_SET_MM_EXE_FILE) before it sends: its bytes, hash and name are those
    of what it ran, and the swap is an error naming both."""
    exe, library = unique_c_sender(exe_dir), os.path.join(exe_dir, "exe_swap.so")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wl,-z,now", "-o", library, os.path.join(HERE, "exe_swap.c")], check=True)
    decoy = os.path.realpath("/usr/bin/env")
    env = dict(os.environ, LD_PRELOAD=library, SWAP_TO=decoy, SWAP_PORT=str(PEER_PORT), SWAP_BYTES="2345")
    subprocess.run([exe, "unused"], env=env, check=True)
    rows = daemon.wait_rows(exe=exe)
    assert [(r["send"], r["sha256"]) for r in rows] == [(2345, sha256_file(exe))]
    assert not [r for r in daemon.rows(exe=decoy) if r["send"] == 2345]
    assert wait_for(lambda: f"({exe}) replaced its executable without running another (prctl PR_SET_MM), so "
                            f"/proc/" in daemon.read("error.log"))
    assert f"/exe names {decoy}: its traffic stays logged under the executable it ran" in daemon.read("error.log")


def run_from_memory(exe_dir, name, program, *argv):
    launcher = os.path.join(exe_dir, "memfd_launcher.py")
    with open(launcher, "w") as f:
        f.write(MEMFD_LAUNCHER)
    subprocess.run([PYTHON, launcher, name, program, *argv], check=True)


def test_fileless_programs_are_named_as_the_kernel_names_them(daemon, exe_dir, session_bus):
    """A memfd is gone with its process: the reader opens it while the program
    runs (here for a tenth of a second after its send)."""
    name = "psmem" + uuid.uuid4().hex[:8]
    first, second = unique_c_sender(exe_dir), unique_c_sender(exe_dir)
    run_from_memory(exe_dir, name, first, "127.0.0.1", str(PEER_PORT), "77", "100")
    exe = f"/memfd:{name} (deleted)"
    rows = daemon.wait_rows(exe=exe)
    assert [(r["send"], r["sha256"], r["raddr"]) for r in rows] == [(77, sha256_file(first), "127.0.0.1")]
    # (each line of a notice: one may tell of what else was new within seconds)
    said = lambda: [line for n in notifications(session_bus[1]) for line in n["body"].splitlines() if exe in line]
    assert wait_for(lambda: said())
    assert said()[0].startswith("First network connection detected for ") and "it runs from memory" in said()[0]
    run_from_memory(exe_dir, name, second, "127.0.0.1", str(PEER_PORT), "88", "100")    # same name, other content
    assert wait_for(lambda: len(said()) == 2)
    assert said()[1] == f"New sha256 for {rows[0]['name']} ({exe}): {sha256_file(second)}; it runs from memory, " \
                        "not from a file on disk"
    record = json.loads(daemon.read("record.json"))
    assert set(record["SHA256"][exe]) == {sha256_file(first), sha256_file(second)}


def test_a_double_fork_still_names_the_launcher(daemon, exe_dir):
    launcher, sender = unique_python(exe_dir), unique_c_sender(exe_dir)
    script = os.path.join(exe_dir, "double_fork.py")
    with open(script, "w") as f:
        f.write(DOUBLE_FORK)
    subprocess.run([launcher, script, sender, "127.0.0.1", str(PEER_PORT), "55"], check=True)
    rows = daemon.wait_rows(exe=sender)
    assert [(r["send"], r["pexe"], r["psha256"], r["gpexe"]) for r in rows] == \
        [(55, launcher, sha256_file(launcher), launcher)]


def test_the_grandparent_is_logged(daemon, exe_dir):
    launcher, sender = unique_python(exe_dir), unique_c_sender(exe_dir)
    script = os.path.join(exe_dir, "plain_launch.py")
    with open(script, "w") as f:
        f.write(PLAIN_LAUNCH)
    subprocess.run([launcher, script, sender, "127.0.0.1", str(PEER_PORT), "66"], check=True)
    rows = daemon.wait_rows(exe=sender)
    me = os.readlink("/proc/self/exe")
    assert [(r["pexe"], r["gpexe"], r["gpname"], r["gpsha256"]) for r in rows] == \
        [(launcher, me, open("/proc/self/comm").read().strip(), sha256_file(me))]
