"""Section 10 in-process: the Tracker fed with events as the kernel sends
them. Pids are beyond pid_max, so that /proc knows none of them."""
import picosnitch

BASE = 5_000_000      # above any pid_max: never a real process


def event(kind, pid, ppid=0, gppid=0, ino=0, pino=0, gpino=0, when=1, comm=b"x"):
    hdr = picosnitch.EventHdrT(kind=picosnitch.EVENT_KINDS[kind][0], time=when)
    p = hdr.proc
    p.pid, p.ppid, p.gppid, p.ino, p.pino, p.gpino, p.comm = pid, ppid, gppid, ino, pino, gpino, comm
    return hdr


def exec_event(tracker, pid, ppid, gppid, ino, pino, gpino, path, when=1):
    ex = picosnitch.ExecT()
    parts = [part.encode() for part in reversed(path.strip("/").split("/"))]
    for i, part in enumerate(parts):
        ex.path[i].value = part
    ex.depth, ex.complete, ex.nlink = len(parts), 1, 1
    tracker.handle(("EXEC", event("EXEC", pid, ppid, gppid, ino, pino, gpino, when, parts[0][:15]), ex))


def fork_event(tracker, pid, ppid, gppid, ino, pino, gpino):
    tracker.handle(("FORK", event("FORK", pid, ppid, gppid, ino, pino, gpino), picosnitch.EmptyT()))


def tracker():
    notices = []
    return picosnitch.Tracker(0xFFFFFFFF, notices.append), notices


def test_a_double_fork_keeps_the_launcher_as_parent():
    """L forks I, I forks G, I exits and G is adopted by pid 1, then execs S:
    S's parent is still L's image (in I), its grandparent L."""
    t, notices = tracker()
    launcher, intermediate, child = BASE + 1, BASE + 2, BASE + 3
    exec_event(t, launcher, BASE, 0, 11, 10, 0, "/opt/launcher")
    fork_event(t, intermediate, launcher, BASE, 11, 11, 10)
    fork_event(t, child, intermediate, launcher, 11, 11, 11)
    t.handle(("EXIT", event("EXIT", intermediate), picosnitch.EmptyT()))
    exec_event(t, child, 1, 0, 12, 99, 0, "/opt/sender", when=5)
    parent, grandparent = t.lineage[child]
    assert (parent.exe, parent.pid, grandparent.exe, grandparent.pid) == ("/opt/launcher", intermediate,
                                                                          "/opt/launcher", launcher)
    assert [n.exe for n in notices] == ["/opt/launcher", "/opt/sender"]
    assert notices[-1].exec_id == [child, 5]


def test_a_plain_launch_names_parent_and_grandparent_as_of_the_exec():
    t, _ = tracker()
    shell, launcher, child = BASE + 11, BASE + 12, BASE + 13
    exec_event(t, shell, BASE, 0, 21, 20, 0, "/bin/shell")
    exec_event(t, launcher, shell, BASE, 22, 21, 20, "/opt/launcher")
    fork_event(t, child, launcher, shell, 22, 22, 21)
    exec_event(t, child, launcher, shell, 23, 22, 21, "/opt/sender")
    parent, grandparent = t.lineage[child]
    assert (parent.exe, grandparent.exe) == ("/opt/launcher", "/bin/shell")
    exec_event(t, launcher, shell, BASE, 24, 21, 20, "/opt/other")      # the parent runs something else later
    assert t.lineage[child][0].exe == "/opt/launcher"


def key(pid, sk, raddr, rport, lport, family=picosnitch.AF_INET, prot=0xffff0006, exe=0xabc):
    k = picosnitch.ConnKeyT(sk=sk, exe=exe, prot=prot, pid=pid, uid=0, rport=rport, lport=lport, family=family)
    k.raddr[:4] = [int(x) for x in raddr.split(".")]
    k.laddr[:4] = [127, 0, 0, 1]
    return k


def conn_event(kind, k, proto=6, pid=0, ino=0):
    c = picosnitch.ConnT()
    c.key, c.info.proto, c.info.ino = k, proto, ino
    return (kind, event(kind, pid, ino=ino), c)


def test_one_socket_address_reused_is_two_connections():
    t, _ = tracker()
    pid = BASE + 21
    exec_event(t, pid, BASE, 0, 31, 30, 0, "/opt/client")
    first, second = key(pid, 0xffff1000, "10.0.0.1", 80, 40001), key(pid, 0xffff1000, "10.0.0.2", 80, 40002)
    for k in (first, second):
        t.handle(conn_event("CONN", k, pid=pid, ino=31))
    rows = [t.conn(k, picosnitch.ConnValT(n, 0)) for k, n in ((first, 100), (second, 200))]
    assert [(c.raddr, c.lport, c.send, c.proto, c.proc.exe) for c in rows] == \
        [("10.0.0.1", 40001, 100, "tcp", "/opt/client"), ("10.0.0.2", 40002, 200, "tcp", "/opt/client")]


def test_a_connect_is_opened_for_the_task_that_started_it():
    """CONNECT comes from the connecting task (port 0); OPEN, from wherever
    the answer arrived, carries the whole key: its context is the CONNECT's,
    whichever of the two was read first."""
    for connect_first in (True, False):
        t, _ = tracker()
        pid = BASE + 31
        exec_event(t, pid, BASE, 0, 41, 40, 0, "/opt/connector")
        started, opened = key(pid, 0xffff2000, "10.0.0.9", 443, 0), key(pid, 0xffff2000, "10.0.0.9", 443, 50123)
        events = [conn_event("CONNECT", started, pid=pid, ino=41), conn_event("OPEN", opened)]
        for e in events if connect_first else reversed(events):
            t.handle(e)
        c = t.conn(opened, picosnitch.ConnValT(0, 0))
        assert (c.proc.exe, c.lport, c.raddr, c.rport, c.proto) == ("/opt/connector", 50123, "10.0.0.9", 443, "tcp")


def test_a_key_whose_events_were_lost_keeps_its_addresses_and_is_reported():
    t, _ = tracker()
    gone = key(BASE + 41, 0xffff3000, "10.0.0.7", 53, 40404, prot=0xffff0011)
    t.handle(conn_event("CONN", key(BASE + 42, 0xffff3001, "10.0.0.8", 53, 1, prot=0xffff0011), proto=17))
    c = t.conn(gone, picosnitch.ConnValT(64, 0))
    assert (c.proc.exe, c.raddr, c.rport, c.lport, c.proto) == ("", "10.0.0.7", 53, 40404, "udp")
    assert t.take_unattributed() == [f"pid {BASE + 41} (unknown), 64 bytes"] and t.take_unattributed() == []


def test_exited_processes_are_forgotten_two_windows_on():
    t, _ = tracker()
    pid = BASE + 51
    exec_event(t, pid, BASE, 0, 51, 50, 0, "/opt/brief")
    t.handle(("EXIT", event("EXIT", pid), picosnitch.EmptyT()))
    t.end_window()
    assert pid in t.procs
    t.end_window()
    assert pid not in t.procs and pid not in t.lineage


def test_a_process_that_replaced_its_executable_is_reported_once_and_keeps_its_name():
    """The kernel names what the process ran, with EXE_REPLACED set: the
    connection is the exec'd program's, and one alert says so."""
    t, _ = tracker()
    pid = BASE + 41
    exec_event(t, pid, BASE, 0, 51, 50, 0, "/opt/malware")
    for sk in (0xffff3000, 0xffff3001):
        kind, hdr, c = conn_event("CONN", key(pid, sk, "10.0.0.9", 443, 40100), pid=pid, ino=51)
        hdr.proc.flags = picosnitch.EXE_REPLACED
        t.handle((kind, hdr, c))
    conn = t.conn(key(pid, 0xffff3000, "10.0.0.9", 443, 40100), picosnitch.ConnValT(send=5))
    assert conn.proc.exe == "/opt/malware"
    alerts = t.take_alerts()
    assert len(alerts) == 1 and alerts[0].startswith(f"pid {pid} (/opt/malware) replaced its executable without")
    assert t.take_alerts() == []
