"""The BPF program text: both capture modes pass the verifier; events decode."""
import ctypes
import ipaddress
import os
import random

import pytest

import picosnitch
from conftest import need_root


@pytest.fixture(scope="module")
def btf():
    return picosnitch.BTF.from_file()


def load(btf, mode):
    need_root()
    picosnitch.ensure_tracefs(print)
    headers, _ = picosnitch.find_kernel_headers(os.uname().release)
    return picosnitch.compile_program(picosnitch.bpf_text(btf, mode), headers)


def test_kprobe_fallback_passes_the_verifier(btf):
    """This kernel has no kprobes to attach to, but the programs must load."""
    from bcc import BPF
    bpf = load(btf, "kprobe")
    try:
        for _, entry, ret in picosnitch.KPROBE_HOOKS:
            assert bpf.load_func(entry.encode(), BPF.KPROBE).fd >= 0
            assert bpf.load_func(ret.encode(), BPF.KPROBE).fd >= 0
        assert "sock_send_length" not in picosnitch.bpf_text(btf, "kprobe")
    finally:
        bpf.cleanup()


def attached(kernel):
    """(tracepoints, cgroup attach types, uprobes) the kernel's links hold."""
    info = [open(f"/proc/self/fdinfo/{fd}").read() for fd in kernel.links]
    fields = [dict(line.split(":", 1) for line in text.splitlines() if ":" in line) for text in info]
    tracepoints = {f["tp_name"].strip() for f in fields if "tp_name" in f}
    cgroups = {int(f["attach_type"]) for f in fields if f.get("link_type", "").strip() == "cgroup"}
    uprobes = [fd for fd in kernel.links if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]"]
    return tracepoints, cgroups, len(uprobes)


COMMON_TRACEPOINTS = {"sched_process_exec", "sched_process_fork", "sched_process_exit", "inet_sock_set_state",
                      "tcp_rcv_space_adjust", "sk_data_ready"}


def test_tracepoint_mode_attaches_every_hook():
    """The loader attaches the hooks only once the perf buffers are in place:
    typed tracepoints on the socket calls, cgroup hooks for unconnected UDP
    sends; the route lookup hooks (which run for every packet) are loaded,
    for the reader to attach on demand."""
    need_root()
    kernel = picosnitch.Kernel.load(8)
    try:
        assert kernel.mode == "tracepoint", kernel.notes
        tracepoints, cgroups, uprobes = attached(kernel)
        assert tracepoints == COMMON_TRACEPOINTS | {"sock_send_length", "sock_recv_length"}
        assert cgroups == {picosnitch.BPF_CGROUP_UDP4_SENDMSG, picosnitch.BPF_CGROUP_UDP6_SENDMSG}
        assert uprobes == 2           # getaddrinfo, entry and return
        assert set(kernel.routes) == {"fib_table_lookup", "fib6_table_lookup"}
        # no system call tracepoints: they would slow every system call of every process
        text = picosnitch.bpf_text(picosnitch.BTF.from_file(), "tracepoint")
        assert "TRACEPOINT_PROBE(syscalls" not in text and "sys_enter" not in text
    finally:
        kernel.close()


def test_route_hooks_are_attached_on_demand_and_detached_when_idle():
    """The kernel asks for the route hooks once (an unconnected ICMP or raw
    send); the reader attaches them, and detaches them once no send has
    needed them for ROUTE_HOLD_SECONDS."""
    need_root()
    kernel = picosnitch.Kernel.load(8)
    try:
        capture = picosnitch.Capture(kernel, lambda event: None)
        assert capture.route_use.lookup(0).value == 0 and not capture.route_links
        capture.attach_routes()
        names = {open(f"/proc/self/fdinfo/{fd}").read().split("tp_name:")[1].split()[0] for fd in capture.route_links}
        assert names == {"fib_table_lookup", "fib6_table_lookup"}
        assert capture.route_use.lookup(0).value == 2
        capture.idle_routes()                           # just attached: stays
        assert len(capture.route_links) == 2
        count, _ = capture.route_seen
        capture.route_use.update(1, count + 1)          # a send needed them: the hold starts again
        capture.route_seen = (count, 0.0)
        capture.idle_routes()
        assert len(capture.route_links) == 2
        capture.route_seen = (count + 1, capture.route_seen[1] - picosnitch.ROUTE_HOLD_SECONDS - 1)
        capture.idle_routes()
        assert capture.route_links == [] and capture.route_use.lookup(0).value == 0
    finally:
        kernel.close()


def test_a_window_sums_its_slots_and_its_hash_entries():
    """Reading a window: the hash map's entries and the slots taken in that
    window, one key's slots summed; a slot left from an older window is not
    counted again; its merged connections beside them. It is near full once
    half its room is taken."""
    need_root()
    kernel = picosnitch.Kernel.load(8, conns=512)
    try:
        capture = picosnitch.Capture(kernel, lambda event: None)
        a, b = picosnitch.ConnKeyT(sk=1, pid=10, lport=1000), picosnitch.ConnKeyT(sk=2, pid=20, lport=2000)
        window = capture.number + 7                 # (a number the kernel has not used)
        epoch = 1 - capture.epoch                   # (the set the kernel is not filling)
        slots = [picosnitch.SlotT(key=a, window=window, send=5, recv=1),
                 picosnitch.SlotT(key=a, window=window, send=7, recv=0),
                 picosnitch.SlotT(key=b, window=window - 2, send=100, recv=100)]
        for i, slot in enumerate(slots):
            capture.slots.update(epoch * 512 + i, slot)     # (its half of the array)
        capture.taken.update(epoch, len(slots))
        capture.maps[epoch].update(a, picosnitch.ConnValT(1, 2))
        merged = picosnitch.ConnKeyT(pid=30, exe=3)
        capture.merged[epoch].update(merged, picosnitch.MergedT(10, 20, 3))
        read = capture.read(epoch, window)
        got = {(picosnitch.as_key(k).sk, picosnitch.as_key(k).pid): (v.send, v.recv) for k, v in read.entries}
        assert read.number == window and got == {(1, 10): (13, 3)}
        assert [(k.pid, v.send, v.recv, v.conns) for k, v in read.merged] == [(30, 10, 20, 3)]
        capture.clear(epoch)
        assert capture.merged[epoch].read_all() == [] and capture.maps[epoch].read_all() == []
        assert kernel.conns == 512 and not capture.near_full()
        capture.entered.update(capture.epoch, 256)
        assert capture.near_full()
    finally:
        kernel.close()


def test_raw_tracepoint_mode_attaches_route_lookups_instead():
    """Where the kernel refuses typed tracepoints or cgroup hooks, the socket
    calls are raw tracepoints and sends name their peers by route lookups."""
    need_root()
    kernel = picosnitch.Kernel.load(8, "raw-tracepoint")
    try:
        assert kernel.mode == "raw-tracepoint"
        tracepoints, cgroups, uprobes = attached(kernel)
        assert tracepoints == COMMON_TRACEPOINTS | {"sock_send_length", "sock_recv_length", "fib_table_lookup",
                                                    "fib6_table_lookup"}
        assert cgroups == set() and uprobes == 2
    finally:
        kernel.close()


def test_c_structs_match_ctypes():
    text = picosnitch.c_struct(picosnitch.ExecT, "exec_t")
    assert "u16 depth;" in text and "char path[32][64];" in text
    assert ctypes.sizeof(picosnitch.ConnKeyT) == 72
    assert "u8 raddr[16];" in picosnitch.c_struct(picosnitch.ConnKeyT, "conn_key_t")


def test_a_key_is_read_in_one_step_as_its_fields():
    """CONN_KEY and SLOT, made from ConnKeyT's and SlotT's fields, read them as their attributes say."""
    key = picosnitch.ConnKeyT(sk=1 << 60, exe=2, prot=3, pid=4, uid=5, rport=6, lport=65535, family=10, pad=7)
    key.raddr[:] = range(16)
    key.laddr[:] = range(16, 32)
    assert picosnitch.CONN_KEY.unpack_from(key) == (1 << 60, 2, 3, 4, 5, bytes(range(16)), bytes(range(16, 32)),
                                                   6, 65535, 10, 7)
    slot = picosnitch.SlotT(key=key, window=8, send=9, recv=1 << 63)
    assert picosnitch.SLOT.unpack_from(slot) == (bytes(key), 8, 9, 1 << 63)

    class Padded(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint8), ("b", ctypes.c_uint64)]
    with pytest.raises(ValueError, match="padding"):
        picosnitch.struct_of(Padded)


def test_exec_event_decodes_to_a_path():
    ex = picosnitch.ExecT()
    ex.leaf = b"prog"                 # the file's own name, whole; then its directories, up to the root
    for i, part in enumerate([b"", b"bin", b"usr"], 1):        # ('' is a mount crossing)
        ex.path[i].value = part
    ex.depth, ex.complete, ex.nlink = 4, picosnitch.EXEC_ROOT, 1
    assert picosnitch.exec_path(ex) == ("/usr/bin/prog", True, False)
    ex.nlink = 0                      # deleted before it ran: not on disk
    assert picosnitch.exec_path(ex) == ("/usr/bin/prog (deleted)", False, False)
    ex.complete = 0
    assert picosnitch.exec_path(ex) == ("", True, False)
    ex.complete = picosnitch.EXEC_ROOT | picosnitch.EXEC_NAME_CUT       # a name filled its slot
    assert picosnitch.exec_path(ex) == ("/usr/bin/prog (deleted)", False, True)
    ex.leaf, ex.depth, ex.complete = b"memfd:payload", 1, picosnitch.EXEC_NO_DIR   # in no directory: a memfd
    assert picosnitch.exec_path(ex) == ("/memfd:payload (deleted)", False, False)


def test_event_decoder_reads_header_and_payload():
    hdr = picosnitch.EventHdrT(kind=picosnitch.EVENT_KINDS["CONN"][0])
    hdr.proc.pid, hdr.proc.comm = 42, b"curl"
    conn = picosnitch.ConnT()
    conn.key.pid, conn.key.sk = 42, 0xffff0001
    conn.key.family, conn.info.proto, conn.key.lport, conn.key.rport = picosnitch.AF_INET, 6, 5000, 443
    conn.key.raddr[:4] = [10, 0, 0, 1]
    name, h, payload = picosnitch.decode_event(bytes(hdr) + bytes(conn))
    assert (name, h.proc.pid, h.proc.comm, payload.key.sk, payload.key.rport) == ("CONN", 42, b"curl", 0xffff0001, 443)
    assert picosnitch.format_addr(payload.key.family, bytes(payload.key.raddr)) == "10.0.0.1"


def test_addresses_and_protocols_format():
    v6 = bytes.fromhex("00000000000000000000ffff7f000001")
    assert picosnitch.format_addr(picosnitch.AF_INET6, v6) == "127.0.0.1"
    assert picosnitch.format_addr(picosnitch.AF_INET6, bytes(15) + b"\x01") == "::1"
    assert picosnitch.format_addr(picosnitch.AF_PACKET, bytes(16)) == ""
    rng = random.Random(5)
    shapes = [lambda: bytes(rng.choice((0, 0, 1, 255)) for _ in range(16)),        # runs of zeros, ties among them
              lambda: bytes(12) + rng.randbytes(4), lambda: bytes(10) + rng.randbytes(6),
              lambda: bytes(rng.choice((0, 1)) for _ in range(16)), lambda: rng.randbytes(16)]
    for raw in [rng.choice(shapes)() for _ in range(20000)] + [bytes(16), bytes(11) + b"\x01" + bytes(4)]:
        assert picosnitch.format_addr(picosnitch.AF_INET6, raw) == \
            str(ipaddress.IPv6Address(raw).ipv4_mapped or ipaddress.IPv6Address(raw)), raw.hex()
        assert picosnitch.format_addr(picosnitch.AF_INET, raw) == str(ipaddress.IPv4Address(raw[:4]))
    assert [picosnitch.proto_name(f, p) for f, p in [(2, 6), (10, 17), (2, 253), (17, 768), (2, 1)]] == \
        ["tcp", "udp", "raw253", "packet", "icmp"]


def test_kernel_headers_are_found_and_merged(tmp_path):
    modules = tmp_path / "modules"
    for version, generated in [("5.10.0-9-amd64", True), ("6.1.0-56-amd64", True), ("6.5.0-1", False)]:
        build = tmp_path / f"build-{version}"
        (build / "include" / "linux").mkdir(parents=True)
        if generated:
            (build / "include" / "generated").mkdir()
            (build / "include" / "generated" / "autoconf.h").write_text("")
        source = tmp_path / f"source-{version}"
        (source / "include" / "linux").mkdir(parents=True)
        (source / "include" / "linux" / "kconfig.h").write_text("")
        (modules / version).mkdir(parents=True)
        os.symlink(build, modules / version / "build")
        os.symlink(source, modules / version / "source")
    dirs, note = picosnitch.find_kernel_headers("6.18.0-test", str(modules))
    assert dirs == [str(tmp_path / "build-6.1.0-56-amd64"), str(tmp_path / "source-6.1.0-56-amd64")]
    assert "compiling with those of 6.1.0-56-amd64" in note
    assert picosnitch.find_kernel_headers("6.1.0-56-amd64", str(modules))[0] is None
    merged = tmp_path / "merged"
    picosnitch.merge_tree(dirs, str(merged))
    assert (merged / "include" / "generated" / "autoconf.h").exists()
    assert (merged / "include" / "linux" / "kconfig.h").exists()
    with pytest.raises(picosnitch.PicosnitchError, match="no kernel headers found"):
        picosnitch.find_kernel_headers("6.18.0-test", str(tmp_path / "empty"))
