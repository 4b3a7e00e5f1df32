"""The BPF reader process, in-process: the Tracker fed with events as the kernel sends
them. Pids are beyond pid_max, so that /proc knows none of them."""
import ctypes

import picosnitch

BASE = 5_000_000      # above any pid_max: never a real process


def event(kind, pid, ppid=0, gppid=0, ino=0, pino=0, gpino=0, when=1, comm=b"x"):
    hdr = picosnitch.EventHdrT(kind=picosnitch.EVENT_KINDS[kind][0], time=when)
    p = hdr.proc
    p.pid, p.ppid, p.gppid, p.ino, p.pino, p.gpino, p.comm = pid, ppid, gppid, ino, pino, gpino, comm
    return hdr


def exec_event(tracker, pid, ppid, gppid, ino, pino, gpino, path, when=1, args=b"", args_cut=False):
    """An exec as the kernel sends it: each name cut to its slot (and flagged
    so), argv cut to ARGS_LEN - 1 bytes (flagged if args_cut)."""
    ex = picosnitch.ExecT()
    parts = [part.encode() for part in reversed(path.strip("/").split("/"))]
    ex.complete = picosnitch.EXEC_ROOT
    ex.leaf = parts[0]                  # (whole)
    for i, part in enumerate(parts[1:], 1):
        ex.path[i].value = part[:picosnitch.NAME_LEN - 1]
        if len(part) >= picosnitch.NAME_LEN - 1:
            ex.complete |= picosnitch.EXEC_NAME_CUT
    ex.args_len = min(len(args), picosnitch.ARGS_LEN - 1)
    ctypes.memmove(ctypes.addressof(ex) + picosnitch.ExecT.args.offset, args, ex.args_len)
    ex.complete |= picosnitch.EXEC_ARGS_CUT if args_cut else 0
    ex.depth, ex.nlink = len(parts), 1
    tracker.handle(("EXEC", event("EXEC", pid, ppid, gppid, ino, pino, gpino, when, parts[0][:15]), ex))


def fork_event(tracker, pid, ppid, gppid, ino, pino, gpino):
    tracker.handle(("FORK", event("FORK", pid, ppid, gppid, ino, pino, gpino), picosnitch.EmptyT()))


def tracker(caught=None):
    """A Tracker, and the exec notices it sent; caught: exec id -> the whole
    path of the file caught for it (as the Catcher reads it)."""
    notices = []
    return picosnitch.Tracker(0xFFFFFFFF, notices.append, caught_path=lambda exec_id: (caught or {}).get(exec_id, "")), \
        notices


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


def test_one_announcement_names_every_key_of_its_process():
    """The kernel announces a process once a window, with its first key (a
    connect's, whose port is not chosen yet): its later keys, opened
    wherever the answer arrived, are its own by pid and executable."""
    t, _ = tracker()
    pid = BASE + 31
    exec_event(t, pid, BASE, 0, 41, 40, 0, "/opt/connector")
    started = key(pid, 0xffff2000, "10.0.0.9", 443, 0)
    t.handle(conn_event("CONN", started, pid=pid, ino=41))
    keys = [key(pid, 0xffff2000 + i, "10.0.0.9", 443, 50123 + i) for i in range(3)]
    rows = [t.conn(k, picosnitch.ConnValT(i, 0)) for i, k in enumerate(keys)]
    assert [(c.proc.exe, c.lport, c.raddr, c.rport, c.proto, c.send) for c in rows] == \
        [("/opt/connector", 50123 + i, "10.0.0.9", 443, "tcp", i) for i in range(3)]


def test_merged_connections_are_one_row_per_program_that_says_so():
    t, _ = tracker()
    pid = BASE + 36
    exec_event(t, pid, BASE, 0, 46, 45, 0, "/opt/churner")
    t.handle(conn_event("CONN", key(pid, 0xffff2100, "10.0.0.9", 80, 40000), pid=pid, ino=46))
    merged_key = picosnitch.ConnKeyT(exe=0xabc, pid=pid, uid=1000, prot=0xffff0006, family=picosnitch.AF_INET)
    window = picosnitch.Window(7, [], [(merged_key, picosnitch.MergedT(5000, 300, 1000))])
    rows = picosnitch.window_conns(t, window)
    assert [(c.proc.exe, c.uid, c.proto, c.lport, c.rport, c.laddr, c.raddr, c.domain, c.send, c.recv)
            for c in rows] == [("/opt/churner", 1000, "tcp", picosnitch.MERGED_PORT, picosnitch.MERGED_PORT, "",
                                "1000 connections merged", "", 5000, 300)]
    report = picosnitch.merged_report(window, 1024, rows)
    assert "window 7" in report and "(1,024" in report and "1,000 connections were merged" in report
    assert "/opt/churner (pid " in report and "5,000 bytes sent, 300 received" in report


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


def test_a_name_longer_than_its_slot_is_read_whole_or_marked_cut():
    """The file's own name comes whole; a directory's name fills its slot
    at NAME_LEN bytes. Two executables in directories whose names share
    their first 100 bytes: read whole from the file caught for their exec;
    when none was caught (and /proc knows nothing), marked cut, with their
    device and inode, so that neither can pass for the other, and reported."""
    first, second, third = BASE + 41, BASE + 42, BASE + 43
    path = {pid: f"/opt/{'t' * 100}{tail}/prog" for pid, tail in ((first, "A"), (second, "B"), (third, "C"))}
    t, notices = tracker({(first, 1): path[first], (second, 1): path[second]})
    for pid in (first, second, third):
        exec_event(t, pid, BASE, 0, pid - BASE, 40, 0, path[pid])
    assert [t.procs[pid].exe for pid in (first, second)] == [path[first], path[second]]
    cut = t.procs[third].exe
    assert cut == f"/opt/{'t' * (picosnitch.NAME_LEN - 1)}…/prog (cut; device 0, inode 43)"
    assert notices[-1].exe == cut
    assert t.take_alerts() == [f"the path of {cut} (pid {third}) has a name longer than the kernel's event keeps, "
                               "and the process was gone before picosnitch could read it whole"]
    exec_event(t, BASE + 44, BASE, 0, 44, 40, 0, f"/opt/{'n' * 255}")
    assert t.procs[BASE + 44].exe == f"/opt/{'n' * 255}" and t.take_alerts() == []       # (a file's own name: whole)


def test_a_command_line_longer_than_the_event_keeps_is_marked_cut():
    t, _ = tracker()
    args = b"prog\0" + b"x" * 400
    exec_event(t, BASE + 51, BASE, 0, 51, 40, 0, "/opt/prog", args=args, args_cut=True)
    cmdline = t.procs[BASE + 51].cmdline
    assert cmdline == f"prog {'x' * (picosnitch.ARGS_LEN - 6)}… (cut; {picosnitch.ARGS_LEN - 1} bytes of a longer " \
                      "command line)"


def test_a_window_goes_in_parts_that_fit_however_long_a_command_line():
    """A program with a command line of more than a message's worth (here of
    characters JSON escapes: six bytes each) keeps no other row from the log:
    the parts stay small enough to send, and only a row too big alone has its
    command line cut, marked, and said so."""
    ours, theirs = picosnitch.Channel.pair()
    sender = picosnitch.WindowSender(ours)
    plain = picosnitch.ProcInfo(1, "/usr/bin/curl", "curl", "curl x", 1, 2)
    long_ = picosnitch.ProcInfo(2, "/tmp/long", "long", "\x01" * 200_000, 1, 3)
    huge = picosnitch.ProcInfo(3, "/tmp/huge", "huge", "\x01" * 400_000, 1, 4)
    row = lambda p, port: picosnitch.Conn(p, plain, plain, 1000, "udp", port, 53, "10.0.0.2", "10.0.0.1", "", 5, 0)
    conns = [row(plain, i) for i in range(300)] + [row(long_, i) for i in range(3)] + [row(huge, 1)]
    parts = sender.parts(conns)
    assert [c.lport for part in parts for c in part] == [c.lport for c in conns]
    for i, part in enumerate(parts):
        batch = picosnitch.Batch(7, i, i == len(parts) - 1, "2026-12-06 10:00:00", part)
        assert len(picosnitch.encode_message(batch)) <= picosnitch.MESSAGE_MAX
    assert [c.proc.cmdline for part in parts for c in part if c.proc is long_] == [long_.cmdline] * 3
    [cut] = [c.proc.cmdline for part in parts for c in part if c.proc.exe == "/tmp/huge"]
    assert cut.startswith("\x01" * picosnitch.WindowSender.COMMAND_KEPT + "…") and "(cut; the first" in cut
    assert sender.take_cut() == ["pid 3 (/tmp/huge)"]
