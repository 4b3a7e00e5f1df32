#!/usr/bin/env python3
# picosnitch: see which programs use the network, and be told when something new does.
# Copyright (C) 2020-2026 picosnitch contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""picosnitch: per-program network monitor for Linux, built on BPF.

It notifies the desktop user when a program connects for the first time,
when a known program's executable changes (new sha256), and when a settled
program reaches a new destination or moves far more in an hour than it
ever did; and logs every connection with the bytes sent and received, the
executable and its hash, its parent and its hash, the user, ports,
addresses and domain.

Processes (all started by the supervisor, which restarts one that dies)::

    kernel (BPF: sock send/recv tracepoints, TCP state and reads, route
      |     lookups, sched exec/fork/exit, getaddrinfo uprobe; bytes are
      |     summed per connection in maps, drained once per write window)
      v
    supervisor (root: loads the program, holds its maps and perf buffers)
      |
    reader --exec notices + files--> monitor (FD cache by device+inode,
      |  (opens and watches each   ^  sha256 at exec, fanotify)
      |   executable as it runs)   |
      |  both root, with CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE only
      |                            |
      | windows (acked)            | hash requests / answers
      v                            v
    primary (picosnitch's account, no capabilities) -> snitch.db, record.json,
      |       conn.log, remote SQL copy, VirusTotal, GeoIP (the state directory),
      |       each program's baseline (what is new, in the private directory)
      v
    notifier (picosnitch's account) -> error.log, exe.log, mutes, grouped
      |       notices of what is new; /run/picosnitch/control.sock (mutes); and
      |       /run/picosnitch/events.sock: the event stream, JSON lines for
      |       `top`, `events` and dash's live tab (its reports, and what the
      |       reader tells it each second while anyone listens: what every
      |       connection moved)
      v notices (shown ones acknowledged)
    desktop (the user) -> desktop notifications on the user's session bus

Messages between processes are JSON over SOCK_SEQPACKET pairs: no process
can make a root process run code or write a file. What picosnitch records
is out of the reach of the user it works for, whose programs it watches:
only the desktop process runs as that user.

Table of contents (each numbered section uses only the ones above it):
     1. header (this docstring)
     2. imports
     3. constants and paths
     4. small utilities
     5. types shared by the kernel program and the processes, messages, reporting
     6. configuration
     7. storage: the log, its layouts, and conn.log
     8. BTF reader and the BPF program text
     9. BPF loader, maps and perf buffers
    10. BPF reader process
    11. hashing, FD cache and fanotify
    12. monitor process
    13. notifications
    14. helpers of the primary: names, the remote copy and its queue, VirusTotal, GeoIP
    15. novelty: what each program has reached, and what is new
    16. primary process, and record.json
    17. the live event stream
    18. privileges: capabilities, and doing work as another account
    19. the state directory, picosnitch's account, and the move from ~/.config
    20. supervisor, daemon and systemd unit
    21. what the viewers share: the query layer, opening the log, labels, the live stream
    22. terminal viewer
    23. live table (top)
    24. web UI
    25. command line

Usage: picosnitch start|stop|restart|status|start-no-daemon|systemd|view|top|events|dash|mute [--undo] EXE [KIND ...]|ebpf [MODE]|version|help
"""

###############################################################################
# 2. imports
###############################################################################
# Heavy or optional dependencies (bcc, dbus, requests, geoip2, the SQL clients)
# are imported inside the section that needs them, so that importing this
# module has no side effects.

import calendar
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import datetime
import errno
import gc
import gzip
import hashlib
import hmac
import html
import io
import ipaddress
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import stat as stat_module
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import typing
import unicodedata
import urllib.parse

###############################################################################
# 3. constants and paths
###############################################################################

VERSION = "1.1.0"
PIDFILE = "/run/picosnitch.pid"
STATUSFILE = "/run/picosnitch.status"
BTF_PATH = "/sys/kernel/btf/vmlinux"
TRACEFS = "/sys/kernel/tracing"
SYSTEMD_UNIT = "/etc/systemd/system/picosnitch.service"
CONFIG_NAME = "config.json"
RECORD_NAME = "record.json"
DB_NAME = "snitch.db"
EXE_LOG_NAME = "exe.log"
CONN_LOG_NAME = "conn.log"
ERROR_LOG_NAME = "error.log"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# Where picosnitch keeps what it records: out of the reach of the user it
# works for (who may read it) and of every other account but root. Written
# only by ACCOUNT, an unprivileged system account of picosnitch's own.
# STATE_DIRECTORY (as systemd sets it for a unit) names another place.
STATE_DIR = "/var/lib/picosnitch"
ACCOUNT = "picosnitch"
PRIVATE_NAME = "private"              # inside it: what only ACCOUNT (and root) may read

# socket families and protocols, for decoding what the kernel reports
AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp",
               255: "raw", 262: "mptcp"}

# services picosnitch talks to (each can be changed in config.json)
VT_API_ADDRESS = "https://www.virustotal.com/api/v3"
GEOIP_DOWNLOAD_ADDRESS = "https://download.db-ip.com/free/dbip-country-lite-{year}-{month}.mmdb.gz"

# how long a stop may take before the supervisor gives up waiting
STOP_TIMEOUT = 30.0
# the cyclic collector's thresholds in picosnitch's processes: a window's
# rows are many short-lived objects, and few of them make cycles
GC_THRESHOLDS = (50_000, 20, 20)

# the live event stream (section 17): a socket in a directory only
# picosnitch's account may write
RUN_DIR = "/run/picosnitch"
EVENTS_SOCKET = os.path.join(RUN_DIR, "events.sock")
CONTROL_SOCKET = os.path.join(RUN_DIR, "control.sock")     # where the user's viewers ask for mutes

# what is new (section 15): the public suffix list (Debian's publicsuffix),
# each program's baseline (in the private directory), and the mutes (the
# private copy decides, the state directory's is the user's to read)
PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"
BASELINE_NAME = "baseline.db"
MUTES_NAME = "mutes.json"


###############################################################################
# 4. small utilities
###############################################################################
# Pure helpers used by several sections; defined first so that every later
# section may use them.

class PicosnitchError(Exception):
    """An error to show the user as it is (no traceback)."""


def now_text() -> str:
    """Local time as stored in snitch.db and the logs."""
    return time.strftime(TIME_FORMAT)


def kernel_dev_to_user(kdev: int) -> int:
    """Convert a kernel dev_t (major << 20 | minor) to what stat() reports."""
    return os.makedev(kdev >> 20, kdev & 0xFFFFF)


V4_MAPPED = bytes(10) + b"\xff\xff"     # the first 12 bytes of an IPv4 address mapped into IPv6


def format_addr(family: int, raw: bytes) -> str:
    """Text form of an address from a 16-byte kernel field ('' when none), as
    ipaddress writes it (an IPv4 address mapped into IPv6 as IPv4). inet_ntop
    writes the same at a quarter of the cost, but for the addresses whose first
    12 bytes are 0 (it writes ::a.b.c.d where ipaddress writes hex)."""
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4])
    if family == AF_INET6:
        if raw[:12] == V4_MAPPED:
            return socket.inet_ntop(AF_INET, raw[12:16])
        if not any(raw[:12]):
            return str(ipaddress.IPv6Address(raw[:16]))
        return socket.inet_ntop(AF_INET6, raw[:16])
    return ""


def proto_name(family: int, proto: int) -> str:
    """A short protocol name such as 'tcp', 'udp', 'raw253' or 'packet'."""
    if family == AF_PACKET:
        return "packet"
    if family not in (AF_INET, AF_INET6):
        return f"af{family}"
    return PROTO_NAMES.get(proto, f"raw{proto}")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class User(typing.NamedTuple):
    """The user picosnitch works for: their files, settings and session."""
    name: str
    uid: int
    gid: int
    home: str

    @property
    def directory(self) -> str:
        return os.path.join(self.home, ".config", "picosnitch")


def user_identity(environ: typing.Mapping[str, str] = os.environ) -> User:
    """SUDO_USER under sudo, else whoever runs picosnitch (with $HOME as home)."""
    name = environ.get("SUDO_USER")
    if name:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PicosnitchError(f"SUDO_USER names no user: {name!r}")
        return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    uid = os.getuid()
    try:
        entry = pwd.getpwuid(uid)
        return User(entry.pw_name, uid, entry.pw_gid, environ.get("HOME") or entry.pw_dir)
    except KeyError:
        return User(str(uid), uid, os.getgid(), environ.get("HOME", "/"))


def state_directory(environ: typing.Mapping[str, str] = os.environ) -> str:
    """Where picosnitch's records live: STATE_DIR, or the first path of
    STATE_DIRECTORY (systemd's list), which must be absolute."""
    path = environ.get("STATE_DIRECTORY", "").split(":")[0] or STATE_DIR
    if not os.path.isabs(path):
        raise PicosnitchError(f"STATE_DIRECTORY must be an absolute path, found {path!r}")
    return os.path.normpath(path)


# POSIX ACLs as the kernel takes them in system.posix_acl_* (linux/posix_acl_xattr.h):
# a version, then (tag, permissions, id) entries in tag order
ACL_ACCESS, ACL_DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_NO_ID = 0xFFFFFFFF


def posix_acl(owner: int, readers: typing.Dict[int, int]) -> bytes:
    """An ACL: the owner's permissions, those of each reader uid, none for
    the group and others (permissions as in a mode: 4 read, 2 write, 1 search)."""
    mask = 0
    for perm in readers.values():
        mask |= perm
    entries = ([(ACL_USER_OBJ, owner, ACL_NO_ID)] + [(ACL_USER, perm, uid) for uid, perm in sorted(readers.items())]
               + [(ACL_GROUP_OBJ, 0, ACL_NO_ID)] + ([(ACL_MASK, mask, ACL_NO_ID)] if readers else [])
               + [(ACL_OTHER, 0, ACL_NO_ID)])
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


def share_with(fd: int, readers: typing.Collection[int], directory: bool) -> None:
    """Let these uids read what fd is, and no one else: for a directory,
    also what is created in it from now on. The caller owns it. OSError
    (EOPNOTSUPP) where the file system has no ACLs."""
    os.setxattr(fd, ACL_ACCESS, posix_acl(7 if directory else 6, {uid: 5 if directory else 4 for uid in readers}))
    if directory:
        if not readers:
            with contextlib.suppress(OSError):
                os.removexattr(fd, ACL_DEFAULT)
        else:
            os.setxattr(fd, ACL_DEFAULT, posix_acl(6, {uid: 4 for uid in readers}))


def sync_directory(directory: str) -> None:
    """Make the names in a directory (a rename into it) last."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(path: str) -> typing.Optional[typing.Tuple[int, int]]:
    """(device, inode) of the file a path names now; None for no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace a file with new content: temp file, fsync, rename. The caller
    runs as the owner of the directory. mode 0640 lets the readers that the
    directory's default ACL names read it; 0600, no one else."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    sync_directory(directory)


def append_lines(path: str, lines: typing.Sequence[str]) -> None:
    """Append lines to a log file in one write and fsync. A new file is made
    0640: its directory's default ACL decides who else reads it."""
    data = b"".join(line.rstrip("\n").encode("utf-8", "replace") + b"\n" for line in lines)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        written = os.write(fd, data)
        if written != len(data):         # a full disk can cut a write short
            raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes written")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular(path: str, limit: int) -> bytes:
    """A regular file's content, at most limit bytes (following links; never
    waiting on a FIFO or a device). OSError, or ValueError naming what it is."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat_module.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, more than the {limit} it may have")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def one_line(message: str) -> str:
    """A message fit for a one-line log entry."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


# The one way to show a name, or text that holds names (paths, process names,
# command lines and domains come from the programs watched): a character that
# would act rather than show (control characters, C0, DEL and C1; format
# characters, among them the bidirectional controls; line and paragraph
# separators) is escaped, as \xNN or \uNNNN, and so is the backslash that
# starts an escape, so that what is shown can pass for nothing else. The
# terminal viewer, where each cell counts, shows such a character as '?'.

def acts(ch: str) -> bool:
    """Whether a character acts on what shows it (moves, recolours, reorders)
    rather than showing."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def escaped(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}"


def shown(text: str) -> str:
    """text with each character that acts, and each backslash, escaped."""
    if text.isprintable() and "\\" not in text:        # (the common case, at C speed)
        return text
    return "".join(escaped(ch) if ch == "\\" or acts(ch) else ch for ch in text)


def read_proc_text(pid: int, name: str) -> str:
    """A /proc/PID file as text ('' when the process is gone)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_proc_link(pid: int, name: str) -> str:
    """Where a /proc/PID link points ('' when the process is gone)."""
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return ""


def cmdline_text(raw: bytes) -> str:
    """argv as one line: NUL separators become spaces."""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim;
    other C libraries go without): compiling this module leaves about 12 MB
    free but resident, which every process forked after would keep."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)

###############################################################################
# 5. types shared by the kernel program and the processes, messages, reporting
###############################################################################
# The ctypes structures below are the single definition of what the BPF
# program and user space exchange: c_struct() renders them as C for the
# program text, and the reader decodes events with them. The messages after
# them are everything the processes say to each other.

PATH_DEPTH = 32      # directory levels of an executable's path sent at exec
NAME_LEN = 64        # bytes of each directory's name in a path sent (a longer one is flagged: EXEC_NAME_CUT)
LEAF_LEN = 260       # bytes of the file's own name sent: all of it (NAME_MAX is 255)
ARGS_LEN = 256       # bytes of argv sent at exec
DNS_ADDRS = 8        # addresses per getaddrinfo answer


class ProcT(ctypes.Structure):
    """A process image: who it is, what it runs, its parent and grandparent.
    The executable is the one the process was started with (its exec), even
    if the process replaced it since (flags: EXE_REPLACED)."""
    _fields_ = [("pid", ctypes.c_uint32), ("ppid", ctypes.c_uint32), ("gppid", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("dev", ctypes.c_uint32), ("pdev", ctypes.c_uint32),
                ("gpdev", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("ino", ctypes.c_uint64), ("pino", ctypes.c_uint64), ("gpino", ctypes.c_uint64),
                ("comm", ctypes.c_char * 16)]


class ConnKeyT(ctypes.Structure):
    """The key under which the kernel sums a connection's bytes, built on every
    send from one read of the socket: the socket and its protocol (struct
    proto), family, addresses and ports, so that a socket whose memory is
    reused, or which connects elsewhere, is a new key; the executable image
    (its struct file, new at each exec), process and user. Unconnected sockets
    have the peer of each datagram as remote address and port."""
    _fields_ = [("sk", ctypes.c_uint64), ("exe", ctypes.c_uint64), ("prot", ctypes.c_uint64),
                ("pid", ctypes.c_uint32), ("uid", ctypes.c_uint32),
                ("raddr", ctypes.c_uint8 * 16), ("laddr", ctypes.c_uint8 * 16),
                ("rport", ctypes.c_uint16), ("lport", ctypes.c_uint16),
                ("family", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class ConnInfoT(ctypes.Structure):
    """What the key does not say, sent once per process and window: the
    executable's device and inode, and the socket's protocol number."""
    _fields_ = [("ino", ctypes.c_uint64), ("dev", ctypes.c_uint32),
                ("proto", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class ConnT(ctypes.Structure):
    """A process's first connection in this window: its key and what it stands for."""
    _fields_ = [("key", ConnKeyT), ("info", ConnInfoT)]


class ConnValT(ctypes.Structure):
    _fields_ = [("send", ctypes.c_uint64), ("recv", ctypes.c_uint64)]


class MergedT(ctypes.Structure):
    """The bytes of a program's connections that found no room of their own
    in a window (keyed by its executable, process, user and protocol), and
    how many connections (distinct keys) they were."""
    _fields_ = [("send", ctypes.c_uint64), ("recv", ctypes.c_uint64), ("conns", ctypes.c_uint64)]


class EpochT(ctypes.Structure):
    """The window the kernel fills: which of the two sets of maps, and its
    number (8 bytes, read by the kernel in one load: the two always agree)."""
    _fields_ = [("epoch", ctypes.c_uint32), ("window", ctypes.c_uint32)]


class SlotT(ctypes.Structure):
    """A connection's bytes in one window, in the arrays of the typed
    tracepoints' fast path: its key, the window, the counts."""
    _fields_ = [("key", ConnKeyT), ("window", ctypes.c_uint64), ("send", ctypes.c_uint64), ("recv", ctypes.c_uint64)]


class EventHdrT(ctypes.Structure):
    """Starts every event; kind selects the payload that follows; time (ns since
    boot) orders events from different CPUs."""
    _fields_ = [("kind", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("time", ctypes.c_uint64),
                ("proc", ProcT)]


# ExecT.complete: what the walk of an executable's path found (bits)
EXEC_ROOT = 1        # it reached the root: the path is whole, but for cut names
EXEC_NO_DIR = 2      # the file is in no directory (a memfd): its one slot is its name
EXEC_NAME_CUT = 4    # a name filled its slot: it may be longer (user space reads it whole)
EXEC_ARGS_CUT = 8    # argv was longer than ARGS_LEN


class ExecT(ctypes.Structure):
    """argv (args_len bytes), the executable's change time and link count, and
    its path, leaf first (depth slots, empty ones where the walk crossed a
    mount; the first, the file's own name, in leaf, whole); complete holds
    the EXEC_* bits of what the walk found."""
    _fields_ = [("depth", ctypes.c_uint16), ("complete", ctypes.c_uint16),
                ("args_len", ctypes.c_uint32), ("ctime_sec", ctypes.c_uint64),
                ("ctime_nsec", ctypes.c_uint32), ("nlink", ctypes.c_uint32),
                ("args", ctypes.c_char * ARGS_LEN), ("leaf", ctypes.c_char * LEAF_LEN),
                ("path", (ctypes.c_char * NAME_LEN) * PATH_DEPTH)]


class DnsT(ctypes.Structure):
    """A getaddrinfo answer: the name asked and up to DNS_ADDRS addresses."""
    _fields_ = [("count", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("families", ctypes.c_uint16 * DNS_ADDRS),
                ("addrs", (ctypes.c_uint8 * 16) * DNS_ADDRS),
                ("host", ctypes.c_char * 128)]


class EmptyT(ctypes.Structure):
    _fields_: typing.List[typing.Any] = []


# event kinds: (number, payload type); the C program gets EV_<NAME> defines.
# CONN: a process's first key in a window (by the task that moved its bytes,
# or started its TCP connect): who it is, once a window; its other keys name
# it by pid and executable. ROUTE: the route hooks are wanted.
EVENT_KINDS = {"EXEC": (1, ExecT), "FORK": (2, EmptyT), "EXIT": (3, EmptyT),
               "CONN": (4, ConnT), "DNS": (5, DnsT), "ROUTE": (8, EmptyT)}

# counters the kernel keeps in the stats array (index: meaning)
STATS = {"MAP_FULL": "the map of merged connections was full too: traffic not attributed",
         "BYTES_UNCOUNTED": "bytes not counted because every map of the window was full",
         "EVENTS_UNSENT": "events the kernel could not hand over (perf buffer full or not ready)"}

_C_TYPES = {ctypes.c_uint8: "u8", ctypes.c_uint16: "u16", ctypes.c_uint32: "u32",
            ctypes.c_uint64: "u64", ctypes.c_char: "char"}


def c_struct(cls: type, name: str) -> str:
    """Render a ctypes structure as a C struct definition."""
    lines = []
    for field, ftype in cls._fields_:
        dims = ""
        while hasattr(ftype, "_length_"):
            dims += f"[{ftype._length_}]"
            ftype = ftype._type_
        ctype = _C_TYPES.get(ftype) or f"struct {STRUCT_NAMES[ftype]}"
        lines.append(f"    {ctype} {field}{dims};")
    return "struct %s {\n%s\n};\n" % (name, "\n".join(lines))


_STRUCT_CODES = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q",
                 ctypes.c_char: "s"}


def struct_of(cls: type) -> struct.Struct:
    """A ctypes structure as a struct.Struct of its fields, in order (a
    byte array, or a structure in it, as one bytes value): unpack_from()
    reads an instance in one step, where each attribute would be a step of
    its own."""
    codes = []
    for _, ftype in cls._fields_:
        if issubclass(ftype, ctypes.Structure):
            codes.append(f"{ctypes.sizeof(ftype)}s")
        elif hasattr(ftype, "_length_"):
            if ftype._type_ not in (ctypes.c_uint8, ctypes.c_char):
                raise ValueError(f"{cls.__name__}: only byte arrays can be read as bytes")
            codes.append(f"{ftype._length_}s")
        else:
            if ftype not in _STRUCT_CODES:
                raise ValueError(f"{cls.__name__}: no struct code for {ftype.__name__}")
            codes.append(_STRUCT_CODES[ftype])
    out = struct.Struct("=" + "".join(codes))
    if out.size != ctypes.sizeof(cls):
        raise ValueError(f"{cls.__name__} has padding between its fields: it cannot be read as {out.format}")
    return out


CONN_KEY, SLOT = struct_of(ConnKeyT), struct_of(SlotT)


STRUCT_NAMES = {ProcT: "proc_t", ConnKeyT: "conn_key_t", ConnValT: "conn_val_t", ConnInfoT: "conn_info_t",
                ConnT: "conn_t", EventHdrT: "event_hdr_t", ExecT: "exec_t", DnsT: "dns_t", EpochT: "epoch_t",
                SlotT: "slot_t", MergedT: "merged_t"}


@dataclasses.dataclass
class ProcInfo:
    """What user space knows of a process image (exe is '' when unknown).
    ctime is the executable's change time (ns) when it was executed, and
    exec_id (pid, kernel time) names that exec; both are 0 for a process
    that ran before picosnitch saw its exec. ondisk is False for a program
    that runs from no file on disk (a memfd, a deleted file)."""
    pid: int
    exe: str
    name: str
    cmdline: str
    dev: int          # st_dev of the executable, as stat() reports it
    ino: int
    ctime: int = 0
    exec_id: typing.Tuple[int, int] = (0, 0)
    ondisk: bool = True


NO_PROC = ProcInfo(0, "", "", "", 0, 0)


@dataclasses.dataclass
class Conn:
    """One connection's traffic in one write window, as the reader sends it."""
    proc: ProcInfo
    parent: ProcInfo
    grandparent: ProcInfo
    uid: int
    proto: str
    lport: int
    rport: int
    laddr: str
    raddr: str
    domain: str
    send: int
    recv: int


# -- messages between the processes ----------------------------------------
# Every message is one of these types. They travel as JSON (never pickle: the
# user's processes must not be able to make a root process run code) over
# SOCK_SEQPACKET pairs, one whole message per packet, so a process that dies
# mid-send cannot leave half a message behind for its successor.

class Ready(typing.NamedTuple):          # reader -> supervisor, supervisor -> `start`: capturing
    mode: str


class Failed(typing.NamedTuple):         # daemon -> `start`: it could not start, and why
    error: str


class Loaded(typing.NamedTuple):         # program loader -> supervisor: the descriptors sent along
    mode: str
    notes: typing.List[str]
    protos: typing.List[list]            # [address, protocol] of the kernel's struct proto objects
    routes: typing.List[str]             # the route tracepoints attached on demand
    error: str = ""                      # (and no descriptors)


class Answer(typing.NamedTuple):         # work done as another account -> who asked: its JSON result
    result: typing.Any
    error: str = ""                      # (and no result)


class ExecNotice(typing.NamedTuple):     # reader -> monitor: hash this now (its file sent along, if caught)
    pid: int
    dev: int
    ino: int
    exe: str
    ctime: int                           # the executable's change time at exec (ns)
    exec_id: typing.List[int]
    caught: int = 0                      # its change time when the reader opened it (0: not caught)
    alive: bool = False                  # the process still ran it then


class HashItem(typing.NamedTuple):
    """An executable a hash request asks for: the process that runs it, its
    file (device, inode), its path, its change time at exec, and the exec's
    identity."""
    pid: int
    dev: int
    ino: int
    exe: str
    ctime: int
    exec_id: typing.Tuple[int, int]

    @classmethod
    def checked(cls, item) -> "HashItem":
        """An item as it came ([pid, dev, ino, exe, ctime, exec_id]);
        ValueError for anything else."""
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63
        if not (isinstance(item, (list, tuple)) and len(item) == 6 and isinstance(item[5], (list, tuple))
                and len(item[5]) == 2):
            raise ValueError("not a request of the right shape")
        pid, dev, ino, exe, ctime, exec_id = item
        if not (all(integer(v) for v in (pid, dev, ino, ctime, *exec_id)) and pid > 0 and isinstance(exe, str)):
            raise ValueError("not a request of the right types")
        return cls(pid, dev, ino, exe, ctime, tuple(exec_id))


class HashRequest(typing.NamedTuple):    # primary -> monitor
    id: int
    procs: typing.List[HashItem]


class HashAnswer(typing.NamedTuple):     # monitor -> primary: [sha256, why not] per proc
    id: int
    results: typing.List[typing.List[str]]


class Batch(typing.NamedTuple):          # reader -> primary: part of one window
    seq: int                             # the window's number, counted in the kernel's epoch map
    part: int
    last: bool
    contime: str                         # local time of the window's end, as logged
    conns: typing.List[Conn]             # (sent as their processes and rows naming them: pack_conns)


class LiveTick(typing.NamedTuple):       # reader -> notifier: what each connection moved since the last tick
    time: float                          # when the kernel's counts were read (seconds since the epoch)
    conns: typing.List[Conn]             # send and recv: the bytes since the last tick (sent as pack_conns)
    new: typing.List[int]                # the indexes in conns of connections not told of before
    exited: typing.List[int]             # pids of processes told of before that have exited since


class Listening(typing.NamedTuple):      # notifier -> reader: how many readers the event stream has
    readers: int


class Hello(typing.NamedTuple):          # primary -> reader: started; resend after this
    seq: int


class Ack(typing.NamedTuple):            # primary -> reader: window seq is written
    seq: int


class Stop(typing.NamedTuple):           # reader -> primary: the last window was sent
    pass


class Report(typing.NamedTuple):         # any -> notifier: for error.log or exe.log
    kind: str                            # "error" or "exe"
    text: str
    detail: str                          # a traceback, written below the line
    time: float                          # when it happened (seconds since the epoch)
    notify: bool = True                  # also shown on the desktop (False: only logged)
    always: bool = False                 # shown even with "Desktop notifications" off


# What the primary finds new about a program (section 15). Each kind but
# "program" can be muted per executable, alone or as a group (MUTE_KINDS);
# "all" mutes every kind. A muted event is still logged.
NOVELTY_KINDS = ("program", "name", "hash", "domain", "network", "country", "port", "volume")
MUTE_KINDS = {"destination": ("domain", "network", "country", "port"), "volume": ("volume",), "hash": ("hash",),
              "name": ("name",), "all": NOVELTY_KINDS}


class Novelty(typing.NamedTuple):        # primary -> notifier: something new about a program (for exe.log)
    kind: str                            # one of NOVELTY_KINDS
    exe: str                             # the program (what mutes name)
    name: str
    text: str                            # what exe.log says (names whole: what shows it escapes them)
    time: float


class Notice(typing.NamedTuple):         # notifier -> desktop: show this
    id: int
    time: float                          # when what it tells of happened
    summary: str
    body: str


class Delivered(typing.NamedTuple):      # desktop -> notifier: shown (error ''), or why not
    id: int
    error: str


MESSAGES = {cls.__name__: cls for cls in (Ready, Failed, Loaded, Answer, ExecNotice, HashRequest, HashAnswer, Batch,
                                          LiveTick, Listening, Hello, Ack, Stop, Report, Novelty, Notice,
                                          Delivered)}
MESSAGE_BUFFER = 8 << 20       # bytes a channel may hold unread
MESSAGE_MAX = 2 << 20          # bytes of one message at most (the kernel carries up to about 4 MB)


_FIELD_NAMES: typing.Dict[type, typing.List[str]] = {}


def as_list(value) -> list:
    """A dataclass (or tuple) as the list of its fields, one level deep (JSON
    takes the next level the same way)."""
    if not dataclasses.is_dataclass(value):
        return list(value)
    names = _FIELD_NAMES.get(type(value))
    if names is None:
        names = _FIELD_NAMES[type(value)] = [f.name for f in dataclasses.fields(value)]
    return [getattr(value, name) for name in names]


def field_ok(value, kind) -> bool:
    """Whether a decoded field has the type its message (or a process in it) declares."""
    kind = typing.get_origin(kind) or kind
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind in (str, list):
        return isinstance(value, kind)
    return True


# a row of a Batch or LiveTick as it follows the message's JSON (pack_conns):
# the places of its process, parent and grandparent, its user, the place of
# its protocol's name, its ports, the places of its addresses and domain,
# its bytes sent and received
CONN_ROW = struct.Struct("=IIIqIqqIIIqq")
CONN_ROW_FIELDS = 12
CONN_ROW_PLACES = (0, 1, 2, 4, 7, 8, 9)      # (the fields of a row that are places)
CONN_ROW_NUMBERS = (3, 5, 6, 10, 11)         # (its user, ports and bytes)


def pack_conns(conns: typing.Sequence[Conn]) -> typing.Tuple[list, typing.Optional[bytes]]:
    """Connections as a Batch sends them: ([processes, strings, n], the n
    rows packed as CONN_ROW), each row naming its processes and strings by
    their places. The rows of a window share a few processes (the Tracker's
    objects, told apart by identity) and a few strings: each is sent, and
    decoded, once, and the rows go as numbers (JSON would write and parse
    every one). A row whose numbers CONN_ROW cannot hold sends them all in
    the JSON: ([processes, strings, rows], None)."""
    places: typing.Dict[int, int] = {}
    procs: typing.List[list] = []
    texts: typing.Dict[str, int] = {}

    def place(p: ProcInfo) -> int:
        places[id(p)] = len(procs)
        procs.append(as_list(p))
        return len(procs) - 1

    def text(value: str) -> int:
        return texts.setdefault(value, len(texts))
    rows = []
    for c in conns:
        p, pp, gp = id(c.proc), id(c.parent), id(c.grandparent)
        proto, laddr, raddr, domain = c.proto, c.laddr, c.raddr, c.domain
        rows.append((places[p] if p in places else place(c.proc), places[pp] if pp in places else place(c.parent),
                     places[gp] if gp in places else place(c.grandparent), c.uid,
                     texts[proto] if proto in texts else text(proto), c.lport, c.rport,
                     texts[laddr] if laddr in texts else text(laddr), texts[raddr] if raddr in texts else text(raddr),
                     texts[domain] if domain in texts else text(domain), c.send, c.recv))
    pack = CONN_ROW.pack
    try:
        return [procs, list(texts), len(rows)], b"".join([pack(*r) for r in rows])
    except struct.error:
        return [procs, list(texts), rows], None


def unpack_conns(packed: list, tail: typing.Optional[bytes]) -> typing.List[Conn]:
    """The connections pack_conns sent (tail: what followed the JSON's NUL,
    None without one); ValueError for anything else."""
    if len(packed) != 3 or not isinstance(packed[1], list):
        raise ValueError("not a list of processes, strings and rows")
    procs = []
    for p in packed[0]:
        info = ProcInfo(*p[:7], tuple(p[7]), *p[8:])
        for field, kind in ProcInfo.__annotations__.items():
            if not field_ok(getattr(info, field), kind):
                raise ValueError(f"ProcInfo.{field} is not a {getattr(kind, '__name__', kind)}")
        procs.append(info)
    texts = packed[1]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("a string sent is not one")
    rows = packed[2]
    if isinstance(rows, list):
        if tail is not None or not all(isinstance(r, list) and len(r) == CONN_ROW_FIELDS for r in rows):
            raise ValueError(f"rows are not lists of {CONN_ROW_FIELDS} values")
        for r in rows:
            if not all(type(r[i]) is int and r[i] >= 0 for i in CONN_ROW_PLACES):
                raise ValueError("a row names a process or string by what is no place")
            if not all(r[i] is None or type(r[i]) is int for i in CONN_ROW_NUMBERS):
                raise ValueError("a row's user, ports and bytes are not integers")
    elif type(rows) is int and tail is not None and len(tail) == rows * CONN_ROW.size:
        rows = CONN_ROW.iter_unpack(tail)
    else:
        raise ValueError(f"not {rows} rows of {CONN_ROW.size} bytes: {len(tail or b'')} bytes")
    try:
        return [Conn(procs[r[0]], procs[r[1]], procs[r[2]], r[3], texts[r[4]], r[5], r[6], texts[r[7]], texts[r[8]],
                     texts[r[9]], r[10], r[11]) for r in rows]
    except (IndexError, TypeError) as e:
        raise ValueError(f"a row names a process or string that was not sent ({e})")


def encode_message(message: typing.NamedTuple) -> bytes:
    """A message as JSON; a Batch's or LiveTick's rows follow it packed,
    after a NUL (which JSON text never holds)."""
    fields, tail = [*message], None
    if isinstance(message, (Batch, LiveTick)):
        fields[1 if isinstance(message, LiveTick) else -1], tail = pack_conns(message.conns)
    data = json.dumps([type(message).__name__, *fields], default=as_list).encode()
    if tail is not None:
        data += b"\0" + tail
    if len(data) > MESSAGE_MAX:
        raise ValueError(f"a {type(message).__name__} message of {len(data)} bytes is too big to send")
    return data


def decode_message(data: bytes) -> typing.NamedTuple:
    """A message from its JSON (and a Batch's or LiveTick's packed rows),
    each field of its declared type; ValueError for anything else (a message
    may come from a process a user controls)."""
    text, nul, tail = data.partition(b"\0")
    try:
        name, *fields = json.loads(text)
        cls = MESSAGES[name]
        message = cls(*fields)
        for field, kind in cls.__annotations__.items():
            if not field_ok(getattr(message, field), kind):
                raise ValueError(f"{name}.{field} is not a {getattr(kind, '__name__', kind)}")
        if isinstance(message, (Batch, LiveTick)):
            message = message._replace(conns=unpack_conns(message.conns, tail if nul else None))
        elif nul:
            raise ValueError(f"a {name} has nothing after its JSON")
        if isinstance(message, HashRequest):
            message = message._replace(procs=[HashItem.checked(p) for p in message.procs])
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
        raise ValueError(f"not a message: {type(e).__name__}: {e}")
    return message


class Channel:
    """One end of a SOCK_SEQPACKET pair carrying messages."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def pair(cls) -> typing.Tuple["Channel", "Channel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            try:        # root may go past net.core.wmem_max
                s.setsockopt(socket.SOL_SOCKET, 32, MESSAGE_BUFFER)     # SO_SNDBUFFORCE
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MESSAGE_BUFFER)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: typing.NamedTuple, block: bool = True, fds: typing.Sequence[int] = ()) -> bool:
        """Send a message (with descriptors for the peer); without block,
        False when the peer's queue is full."""
        data = encode_message(message)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
        try:
            self.sock.sendmsg([data], ancillary, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        return True

    def recv_with_fds(self, timeout: typing.Optional[float] = None, most: int = 16
                      ) -> typing.Tuple[typing.Optional[typing.NamedTuple], typing.List[int]]:
        """The next message and the descriptors sent with it (most: how many
        at most); (None, []) after timeout seconds without one. ValueError
        for a bad message (its descriptors closed), or none: the peer gone."""
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            return None, []
        peek = bytearray(1)
        size = self.sock.recv_into(peek, 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        data, ancillary, _, _ = self.sock.recvmsg(min(max(size, 1), MESSAGE_MAX), socket.CMSG_SPACE(most * 4))
        fds = [fd for level, kind, raw in ancillary if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
               for fd in struct.unpack(f"{len(raw) // 4}i", raw[:len(raw) // 4 * 4])]
        try:
            if not data or size > MESSAGE_MAX:
                raise ValueError(f"not a message: {size} bytes")
            return decode_message(data), fds
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise

    def recv(self, timeout: typing.Optional[float] = None) -> typing.Optional[typing.NamedTuple]:
        """The next message, or None after timeout seconds without one."""
        message, fds = self.recv_with_fds(timeout)
        for fd in fds:          # none is expected here
            os.close(fd)
        return message

    def close(self) -> None:
        self.sock.close()


class Reporter:
    """The one way to report: errors (for error.log) and news about
    executables (for exe.log) go to the notifier, which writes them and shows
    them as desktop notifications; information goes to standard output.
    Each report carries the time it happened. A failure that lasts is
    reported once, and again only after it has worked in between
    (failing/working)."""

    def __init__(self, channel: typing.Optional[Channel] = None):
        self.channel = channel
        self.down: typing.Set[str] = set()
        self.dropped = 0

    def error(self, message: str, detail: str = "", when: typing.Optional[float] = None, notify: bool = True,
              always: bool = False) -> None:
        """An error; `when` it happened (now if None); notify False: logged
        only; always: shown even with desktop notifications off. Names in it
        stay whole: what shows it escapes them (shown)."""
        print(f"picosnitch: error: {shown(message)}", file=sys.stderr, flush=True)
        self.send(Report("error", message, detail, time.time() if when is None else when, notify, always))

    def exe(self, message: str) -> None:
        self.send(Report("exe", message, "", time.time()))

    def novelty(self, kind: str, exe: str, name: str, text: str, when: typing.Optional[float] = None) -> None:
        """Something new about a program: for exe.log, and shown unless muted."""
        self.send(Novelty(kind, exe, name, text, time.time() if when is None else when))

    def info(self, message: str) -> None:
        print(f"picosnitch: {shown(message)}", flush=True)

    def failing(self, what: str, message: str) -> None:
        """Report message unless `what` is already known to be failing."""
        if what not in self.down:
            self.down.add(what)
            self.error(message)

    def working(self, what: str, message: str = "") -> None:
        """`what` works (again); say so if it had failed."""
        if what in self.down:
            self.down.discard(what)
            if message:
                self.info(message)

    def send(self, report: typing.Union[Report, Novelty]) -> None:
        """Never blocks: when the notifier cannot keep up, reports are counted
        as dropped, and the next one that gets through says how many."""
        if self.channel is None:
            return
        if self.dropped:
            report = report._replace(text=f"{report.text} ({self.dropped} earlier reports were dropped)")
        try:
            sent = self.channel.send(report, block=False)
        except OSError:
            sent = False
        self.dropped = 0 if sent else self.dropped + 1

###############################################################################
# 6. configuration
###############################################################################

class Setting(typing.NamedTuple):
    """One key of config.json: its attribute in Config, its default, the JSON
    types it accepts, what it must be (said when it is not), any further
    check, and a note for the README's list (settings_text)."""
    key: str
    attr: str
    default: typing.Any
    types: tuple
    expected: str
    check: typing.Optional[typing.Callable[[typing.Any], bool]] = None
    note: str = ""


def fills_year_month(template: str) -> bool:
    """Whether an address template takes {year} and {month} (and no other field)."""
    try:
        template.format(year="2026", month="01")
        return True
    except (KeyError, IndexError, ValueError):
        return False


def is_address(v: str) -> bool:
    return v.startswith(("http://", "https://"))


WINDOW_CONNS_MIN, WINDOW_CONNS_MAX = 256, 1 << 22     # "Connections per window"


SETTINGS = [
    Setting("Connections per window", "connections_per_window", None, (int, type(None)),
            f"a whole number from {WINDOW_CONNS_MIN} to {WINDOW_CONNS_MAX} or null",
            lambda v: v is None or WINDOW_CONNS_MIN <= v <= WINDOW_CONNS_MAX,
            "room in the kernel's maps for each window's connections; null: from memory and the write limit"),
    Setting("DB retention (days)", "db_retention_days", 30, (int,), "a whole number of days >= 0",
            lambda v: v >= 0, "rows older than this are deleted from snitch.db"),
    Setting("DB sql log", "db_sql_log", True, (bool,), "true or false", note="write snitch.db"),
    Setting("DB sql server", "db_sql_server", {}, (dict,), "an object of connection settings",
            note="also write to MariaDB/MySQL/PostgreSQL (below)"),
    Setting("DB text log", "db_text_log", False, (bool,), "true or false", note="also write conn.log"),
    Setting("DB write limit (seconds)", "db_write_limit_seconds", 10, (int, float),
            "a number of seconds from 0.1 to 3600", lambda v: 0.1 <= v <= 3600,
            "one row per connection per window of this length"),
    Setting("Dash scroll zoom", "dash_scroll_zoom", True, (bool,), "true or false",
            note="the web UI's graphs zoom with the mouse wheel"),
    Setting("Dash theme", "dash_theme", "", (str,), "a bootswatch theme name or \"\"",
            note="a bootswatch theme for the web UI"),
    Setting("Desktop notifications", "desktop_notifications", True, (bool,), "true or false"),
    Setting("Every exe (not just conns)", "every_exe", False, (bool,), "true or false",
            note="also log every program run, as a row with ports -1"),
    Setting("GeoIP lookup", "geoip_lookup", True, (bool,), "true or false",
            note="keep a country database for the viewers (below)"),
    Setting("Log addresses", "log_addresses", True, (bool,), "true or false",
            note="off: local and remote addresses are left empty"),
    Setting("Log commands", "log_commands", True, (bool,), "true or false", note="off: command lines are left empty"),
    Setting("Log ignore", "log_ignore", [], (list,), "a list of ports, hashes, domains or subnets",
            note="connections left out of the logs (below)"),
    Setting("Log ports", "log_ports", True, (bool,), "true or false", note="off: ports are left null"),
    Setting("Novelty settle days", "novelty_settle_days", 7, (int,), "a whole number of days >= 0",
            lambda v: v >= 0, "days of use without a new destination before one is told of (below)"),
    Setting("Novelty volume factor", "novelty_volume_factor", 5, (int, float), "a number >= 1",
            lambda v: v >= 1, "an hour this many times a program's busiest is told of (below)"),
    Setting("Novelty volume minimum (MB)", "novelty_volume_minimum_mb", 100, (int, float), "a number of MB >= 0",
            lambda v: v >= 0, "(and when it moves at least this much)"),
    # the user's config sets root's resources: kernel memory and open files are bounded
    Setting("Perf ring buffer (pages)", "perf_ring_buffer_pages", 256, (int,), "a power of two up to 4096",
            lambda v: is_power_of_two(v) and v <= 4096, "per CPU, up to 4096; raise it if events are lost"),
    Setting("Set RLIMIT_NOFILE", "set_rlimit_nofile", None, (int, type(None)),
            "a whole number from 1 to 1048576 or null", lambda v: v is None or 0 < v <= 1 << 20,
            "more open files (up to 1048576) for a bigger executable cache"),
    Setting("Set st_dev mask", "set_st_dev_mask", None, (int, type(None)), "a whole number >= 0 or null",
            lambda v: v is None or v >= 0, "0 turns the device check off (automatic when btrfs is mounted)"),
    Setting("VT API key", "vt_api_key", "", (str,), "a string", note="look up new sha256 hashes on VirusTotal when set"),
    Setting("VT file upload", "vt_file_upload", False, (bool,), "true or false",
            note="also upload executables VirusTotal does not know"),
    Setting("VT request limit (seconds)", "vt_request_limit_seconds", 15, (int, float), "a number of seconds >= 0",
            lambda v: v >= 0, "at most one VirusTotal request per this many seconds"),
    Setting("VT API address", "vt_api_address", VT_API_ADDRESS, (str,), "an http(s) address", is_address),
    Setting("GeoIP download address", "geoip_download_address", GEOIP_DOWNLOAD_ADDRESS, (str,),
            "an http(s) address, where {year} and {month} may be filled in",
            lambda v: is_address(v) and fills_year_month(v)),
]
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}

def setting_type(setting: Setting) -> typing.Any:
    """The type of a setting's attribute, from the JSON types it accepts (an
    int is a float where a float is accepted, as JSON has it)."""
    kinds = [t for t in setting.types if not (t is int and float in setting.types)]
    return typing.Union[tuple(kinds)] if len(kinds) > 1 else kinds[0]


# config.json as typed attributes, with the defaults (a fresh copy of each)
Config = dataclasses.make_dataclass("Config", [
    (setting.attr, setting_type(setting),
     dataclasses.field(default_factory=lambda d=setting.default: copy.deepcopy(d)))
    for setting in SETTINGS])
Config.__module__ = __name__


def settings_text() -> str:
    """The README's list of settings: each key with its default and note."""
    lines = []
    for setting in SETTINGS:
        head = f"{json.dumps(setting.key)}: {json.dumps(setting.default)}"
        lines.append(f"{head:<35} {setting.note}".rstrip() if setting.note else head)
    return "\n".join(lines) + "\n"


class IgnoreRules(typing.NamedTuple):
    """"Log ignore" compiled: connections matching any rule stay out of the logs."""
    ports: typing.FrozenSet[int] = frozenset()
    hashes: typing.FrozenSet[str] = frozenset()
    domains: typing.Tuple[str, ...] = ()     # forward notation, lower case: "example.org"
    networks: tuple = ()

    def match(self, lport: int, rport: int, sha: str, domain: str, raddr: str) -> bool:
        if lport in self.ports or rport in self.ports or (sha and sha in self.hashes):
            return True
        d = domain.lower().rstrip(".")
        if d and any(d == x or d.endswith("." + x) for x in self.domains):
            return True
        if raddr and self.networks:
            try:
                address = ipaddress.ip_address(raddr)
            except ValueError:
                return False
            return any(address in net for net in self.networks)
        return False


SHA256_TEXT = re.compile(r"[0-9a-fA-F]{64}")
DOMAIN_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def ignore_rules(entries: list, source: str = CONFIG_NAME) -> IgnoreRules:
    """Compile "Log ignore": ints are ports; strings are sha256 hashes, IP
    subnets or domains in reverse notation ("org.example" matches example.org
    and all its subdomains). Anything else is an error naming the entry."""
    ports, hashes, domains, networks = set(), set(), [], []
    for item in entries:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= 65535:
            ports.add(item)
        elif not isinstance(item, str):
            raise PicosnitchError(f"{source}: 'Log ignore' entry {json.dumps(item)} is not a port (0-65535), "
                                  "sha256 hash, IP subnet or domain")
        elif SHA256_TEXT.fullmatch(item):
            hashes.add(item.lower())
        elif ip_network(item):
            networks.append(ip_network(item))
        elif item.isdigit():
            raise PicosnitchError(f"{source}: 'Log ignore' entry {json.dumps(item)}: write ports as numbers, "
                                  "without quotes")
        elif item and all(DOMAIN_LABEL.fullmatch(label) for label in item.rstrip(".").split(".")) \
                and not item.split(".")[0].isdigit():        # a top-level domain is never a number
            domains.append(".".join(reversed(item.rstrip(".").lower().split("."))))
        else:
            raise PicosnitchError(f"{source}: 'Log ignore' entry {json.dumps(item)} is not a port, "
                                  "sha256 hash, IP subnet or domain in reverse notation (like \"org.example\")")
    return IgnoreRules(frozenset(ports), frozenset(hashes), tuple(domains), tuple(networks))


def ip_network(text: str):
    """An IPv4 or IPv6 network from "10.0.0.0/8", "fd00::/8" or one address; None if not one."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


SQL_CLIENTS = ("mariadb", "psycopg", "psycopg2", "pymysql")
SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# The connection parameters each client may be given: where the server is,
# who logs in, and TLS. Nothing else: a client's other parameters load
# plugins or read option files (mariadb's plugin_dir, default_file;
# PyMySQL's read_default_file), or let the server read files (local_infile),
# with the rights of picosnitch's account.
SQL_PARAMETERS = {
    "postgres": ("host", "hostaddr", "port", "dbname", "user", "password", "passfile", "connect_timeout",
                 "application_name", "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl"),
    "mysql": ("host", "port", "user", "password", "database", "connect_timeout", "read_timeout", "write_timeout",
              "ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert"),
}


def check_sql_server(settings: dict, source: str = CONFIG_NAME) -> None:
    """"DB sql server": {} (off) or a client name, an optional table name and
    that client's connection parameters."""
    if not settings:
        return
    if settings.get("client") not in SQL_CLIENTS:
        raise PicosnitchError(f"{source}: 'DB sql server' needs \"client\": one of {', '.join(SQL_CLIENTS)}"
                              f" (found {json.dumps(settings.get('client'))})")
    table = settings.get("table_name", "connections")
    if not isinstance(table, str) or not SQL_IDENTIFIER.fullmatch(table):
        raise PicosnitchError(f"{source}: 'DB sql server' table_name must be a plain SQL identifier "
                              f"(letters, digits, _), found {json.dumps(table)}")
    allowed = SQL_PARAMETERS["postgres" if settings["client"].startswith("psycopg") else "mysql"]
    for key, value in settings.items():
        if key not in ("client", "table_name") + allowed:
            raise PicosnitchError(f"{source}: 'DB sql server' does not take {key!r} for {settings['client']} "
                                  f"(it takes {', '.join(allowed)})")
        if not isinstance(value, (str, int, float, bool)):
            raise PicosnitchError(f"{source}: 'DB sql server' {key!r} must be a string, number or true/false")


def config_to_json(config: Config) -> str:
    values = {setting.key: getattr(config, setting.attr) for setting in SETTINGS}
    return json.dumps(values, indent=2) + "\n"


def parse_config(text: str, source: str = CONFIG_NAME) -> Config:
    """Validate config.json text; PicosnitchError names the problem."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a number JSON has")
    try:
        data = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise PicosnitchError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    except ValueError as e:
        raise PicosnitchError(f"{source}: invalid JSON: {e}")
    if not isinstance(data, dict):
        raise PicosnitchError(f"{source}: expected a JSON object of settings, found {type(data).__name__}")
    config = Config()
    for key, value in data.items():
        if key not in SETTINGS_BY_KEY:
            raise PicosnitchError(f"{source}: unknown key {key!r} (known keys: {', '.join(SETTINGS_BY_KEY)})")
        setting = SETTINGS_BY_KEY[key]
        # bool is an int in Python: accept it only where a bool is expected
        ok = isinstance(value, setting.types) and not (isinstance(value, bool) and bool not in setting.types)
        if not ok or not (setting.check is None or setting.check(value)):
            raise PicosnitchError(f"{source}: {key!r} must be {setting.expected}, found {json.dumps(value)}")
        setattr(config, setting.attr, value)
    ignore_rules(config.log_ignore, source)
    check_sql_server(config.db_sql_server, source)
    return config


# How a change of each setting bears on monitoring: "off" (a switch whose
# turning off means less is recorded or said), "more" / "less" (a number
# that weakens as it grows / shrinks), "added" (a list that weakens as it
# gains entries), "harmless"; any other change is reported as it is.
CHANGE_KINDS = {"desktop_notifications": "off", "db_sql_log": "off", "db_text_log": "off", "every_exe": "off",
                "log_addresses": "off", "log_commands": "off", "log_ports": "off", "geoip_lookup": "off",
                "log_ignore": "added", "db_retention_days": "less", "db_write_limit_seconds": "more",
                "perf_ring_buffer_pages": "less", "vt_request_limit_seconds": "more",
                "novelty_settle_days": "more", "novelty_volume_factor": "more", "novelty_volume_minimum_mb": "more",
                "dash_scroll_zoom": "harmless", "dash_theme": "harmless"}
SECRET_SETTINGS = ("db_sql_server", "vt_api_key")      # (their values are never repeated)


def weakened(before: Config, after: Config) -> typing.List[str]:
    """What a change of settings may take away from monitoring, one line
    each: a switch turned off, a number moved the weaker way, entries added
    to "Log ignore", and any other change of a setting that is not known to
    be harmless (the remote copy, VirusTotal, the device check, ...)."""
    changes = []
    for setting in SETTINGS:
        old, new = getattr(before, setting.attr), getattr(after, setting.attr)
        kind, name = CHANGE_KINDS.get(setting.attr, "other"), json.dumps(setting.key)
        if old == new or kind == "harmless":
            continue
        if kind == "off" and old and not new:
            changes.append(f"{name} turned off")
        elif kind == "added" and [e for e in new if e not in old]:
            changes.append(f"{name} gained {', '.join(json.dumps(e) for e in new if e not in old)}")
        elif (kind == "less" and new < old) or (kind == "more" and new > old):
            changes.append(f"{name} changed from {json.dumps(old)} to {json.dumps(new)}")
        elif kind == "other":
            changes.append(f"{name} changed" + ("" if setting.attr in SECRET_SETTINGS else
                                                f" from {json.dumps(old)} to {json.dumps(new)}"))
    return changes


def check_directory(directory: str, uid: int, create: bool = True) -> None:
    """The config directory must be the user's own real directory (made 0700
    when missing): picosnitch refuses a symbolic link there, so that no link
    can send its files elsewhere. Run as the user."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        if not create:
            raise PicosnitchError(f"{directory} does not exist")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    if stat_module.S_ISLNK(st.st_mode):
        raise PicosnitchError(f"{directory} is a symbolic link; picosnitch refuses to use it: make it a "
                              f"real directory owned by you")
    if not stat_module.S_ISDIR(st.st_mode):
        raise PicosnitchError(f"{directory} is not a directory")
    if st.st_uid != uid:
        raise PicosnitchError(f"{directory} belongs to uid {st.st_uid}, not to the user picosnitch works for "
                              f"(uid {uid})")
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)


CONFIG_MAX = 1 << 20        # bytes of config.json at most


def settings_file_text(path: str) -> str:
    """The text of a settings file (config.json, or the copy of the settings
    a start ran with): a regular file of at most CONFIG_MAX bytes, in UTF-8;
    PicosnitchError names what is wrong."""
    try:
        raw = read_regular(path, CONFIG_MAX)
    except OSError as e:
        raise PicosnitchError(f"cannot read {path}: {e.strerror}")
    except ValueError as e:
        raise PicosnitchError(f"cannot read {path}: {e}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicosnitchError(f"{path}: not UTF-8 text (byte {e.start})")


def read_config_text(directory: str, create: bool = True) -> str:
    """config.json's text, creating the file with the defaults when missing
    (or, without create, the defaults' text). Run as the user: the file is
    theirs, and so is what it can reach.

    An existing file is never rewritten: a bad one is refused as it is.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.lexists(path):
        if not create:
            return config_to_json(Config())
        write_atomic(path, config_to_json(Config()).encode())
    return settings_file_text(path)


def load_config(directory: str, create: bool = True) -> Config:
    """config.json parsed (see read_config_text); PicosnitchError names what is wrong."""
    return parse_config(read_config_text(directory, create), os.path.join(directory, CONFIG_NAME))


@dataclasses.dataclass
class Runtime:
    """What every process is given by the supervisor. Each process keeps only
    its own ends of the channels (ROLES in section 20 lists them)."""
    config: Config
    user: User                           # the user picosnitch works for (their session bus, their settings)
    account: User                        # picosnitch's own account, which writes the state directory
    state: str                           # the state directory (STATE_DIR)
    st_dev_mask: int
    bus_address: str
    run_id: str                          # names this run of the daemon
    reporter: Reporter = dataclasses.field(default_factory=Reporter)
    stopping: typing.Callable[[], bool] = lambda: False     # set by process_entry: SIGTERM came
    kernel: typing.Any = None            # the loaded BPF program (section 9): the reader's only
    exec_tx: typing.Optional[Channel] = None     # reader -> monitor: executables to open now
    exec_rx: typing.Optional[Channel] = None
    batch_tx: typing.Optional[Channel] = None    # reader -> primary: windows; primary -> reader: acks
    batch_rx: typing.Optional[Channel] = None
    hash_primary: typing.Optional[Channel] = None    # primary <-> monitor: hash requests
    hash_monitor: typing.Optional[Channel] = None
    ready_tx: typing.Optional[Channel] = None    # reader -> supervisor: capturing
    ready_rx: typing.Optional[Channel] = None
    report_tx: typing.Optional[Channel] = None   # everyone -> notifier: reports
    report_rx: typing.Optional[Channel] = None
    notice_tx: typing.Optional[Channel] = None   # notifier -> desktop: notices; desktop -> notifier: deliveries
    notice_rx: typing.Optional[Channel] = None
    live_tx: typing.Optional[Channel] = None     # reader -> notifier: ticks; notifier -> reader: how many listen
    live_rx: typing.Optional[Channel] = None

    @property
    def private(self) -> str:
        """What only the account (and root) may read, inside the state directory."""
        return os.path.join(self.state, PRIVATE_NAME)

    CHANNELS = ("exec_tx", "exec_rx", "batch_tx", "batch_rx", "hash_primary", "hash_monitor",
                "ready_tx", "ready_rx", "report_tx", "report_rx", "notice_tx", "notice_rx", "live_tx", "live_rx")

###############################################################################
# 7. storage: the log, its layouts, and conn.log
###############################################################################

_PROC_ATTRS = ("exe", "name", "cmdline", "sha256")


class Row(typing.NamedTuple):
    """A row of the log, as the connections view has it: one connection of
    one write window. A process is its executable, name, command line and
    sha256; the parent's columns start with p, the grandparent's with gp."""
    contime: typing.Any             # the window's local time, "YYYY-MM-DD HH:MM:SS" (any text a script wrote)
    send: int
    recv: int
    exe: str
    name: str
    cmdline: str
    sha256: str
    pexe: str
    pname: str
    pcmdline: str
    psha256: str
    uid: typing.Optional[int]
    lport: typing.Optional[int]
    rport: typing.Optional[int]
    laddr: str
    raddr: str
    domain: str
    proto: str
    gpexe: str = ""                 # (the remote copy has no grandparent: rows for it may end before)
    gpname: str = ""
    gpcmdline: str = ""
    gpsha256: str = ""


DB_COLUMNS = list(Row._fields)
# where a row has the process, its parent and its grandparent (each exe, name, cmdline, sha256)
PROC_PLACES = [slice(DB_COLUMNS.index(p + "exe"), DB_COLUMNS.index(p + "exe") + len(_PROC_ATTRS))
               for p in ("", "p", "gp")]
# where a row has its time, bytes, user and ports, and (ROW_STRS) the strings of CONNS_COLUMNS, in their order
ROW_TIME, ROW_SEND, ROW_RECV, ROW_UID, ROW_LPORT, ROW_RPORT = (DB_COLUMNS.index(c) for c in
                                                               ("contime", "send", "recv", "uid", "lport", "rport"))
ROW_STRS = [DB_COLUMNS.index(c) for c in ("laddr", "raddr", "domain", "proto")]
# the remote copy keeps the columns it has always had
REMOTE_COLUMNS = DB_COLUMNS[:DB_COLUMNS.index("proto") + 1]
SCHEMA_VERSION = 5
COMPACT_VERSION = 2         # the first version of the compact layout (which later ones extend)
DB_BUSY_TIMEOUT = 1.0       # seconds a write waits for a lock; then the rows wait in memory
HOUR, DAY = 3600, 86400
ALL_TIME = 1 << 40          # the rollup level of the whole log: one bucket
ROLLUP_LEVELS = (HOUR, DAY, ALL_TIME)
NOT_LOGGED = -1000          # a NULL uid or port, in the rollups (whose keys cannot be NULL)
INTEGER_KEYS = ("uid", "lport", "rport")
# Ports from HIGH_PORTS up are the ones clients take for a connection
# (Linux's ephemeral range 32768-60999, IANA's 49152-65535): each is one
# connection's, so the rollups keep them as one key, HIGH_PORTS_KEY, and the
# totals by port show them as one value. The rows keep every port.
HIGH_PORTS = 32768
HIGH_PORTS_KEY = -3000
HIGH_PORTS_TEXT = f"{HIGH_PORTS}-65535"
PORT_KEYS = ("lport", "rport")
NO_TIME = -1                # the bucket of rows whose time is no time (kept as text)
INTERN_CACHE = 200_000      # strings and processes remembered by id, per open log
PRUNE_BATCH = 20_000        # rows deleted per transaction
FORGET_BATCH = 1_000        # a day's totals taken out of the whole-log ones per transaction
SHRINK_FREE = 0.2           # a log whose free pages pass this share of its pages gives them back
SHRINK_MIN_PAGES = 256      # (when there are at least this many)
GIVE_BACK_STEP = 1024       # pages given back per transaction, by a log that can do it by itself
ROWS_A_STATEMENT = 500      # rows of a window inserted by one statement (13 values each: SQLite takes 32766)
ROLLUP_SEEKS = 1000         # buckets of a rollup named one by one (the keys after b then narrow each)

# The compact layout (version 2; version 3 adds the times and programs
# rollups; version 4's view tells a running migration of the rows written
# through it, so that they are not counted twice). Each distinct process
# (exe, name, cmdline, sha256) and each distinct string (address, domain,
# protocol) is stored once; a row of conns refers to them by id. Times are
# local wall-clock seconds (the local time read as if it were UTC), so that
# the text of every time reads back exactly as it was written, whatever the
# time zone does; a time that is not one keeps its text. The rollups add rows up per hour, per day and for
# the whole log: times by time alone, programs by process, parent,
# grandparent and user, rollups by every column but the local port, ports
# by process and local port (and, per day and for the whole log, by local
# port alone: process 0), each with the high ports as one (HIGH_PORTS_KEY;
# logs written before kept them one by one, and are read as if they had
# not). A question goes to the narrowest rollup that keeps its columns.
# NULL is a value like any other in procs and strs (their unique indexes
# map it to x'ff', which no text equals), so that every id is set. Version
# 5 adds novelty: what was new about a program (section 15), a row per
# event, in the window's transaction.
SCHEMA = """
CREATE TABLE IF NOT EXISTS procs (id INTEGER PRIMARY KEY, exe, name, cmdline, sha256);
CREATE UNIQUE INDEX IF NOT EXISTS procs_key ON procs (coalesce(exe, x'ff'), coalesce(name, x'ff'),
    coalesce(cmdline, x'ff'), coalesce(sha256, x'ff'));
CREATE INDEX IF NOT EXISTS procs_exe ON procs (exe);
CREATE INDEX IF NOT EXISTS procs_name ON procs (name);
CREATE INDEX IF NOT EXISTS procs_sha256 ON procs (sha256);
CREATE TABLE IF NOT EXISTS strs (id INTEGER PRIMARY KEY, value);
CREATE UNIQUE INDEX IF NOT EXISTS strs_key ON strs (coalesce(value, x'ff'));
CREATE TABLE IF NOT EXISTS conns (id INTEGER PRIMARY KEY AUTOINCREMENT, t, send INTEGER, recv INTEGER,
    proc INTEGER, parent INTEGER, gp INTEGER, uid INTEGER, lport INTEGER, rport INTEGER, laddr INTEGER,
    raddr INTEGER, domain INTEGER, proto INTEGER);
CREATE INDEX IF NOT EXISTS conns_t ON conns (t);
CREATE TABLE IF NOT EXISTS rollups (level INTEGER, b INTEGER, proc INTEGER, parent INTEGER, gp INTEGER,
    uid INTEGER, domain INTEGER, laddr INTEGER, raddr INTEGER, rport INTEGER, proto INTEGER, send INTEGER,
    recv INTEGER, rows INTEGER,
    PRIMARY KEY (level, b, proc, parent, gp, uid, domain, laddr, raddr, rport, proto)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ports (level INTEGER, b INTEGER, proc INTEGER, lport INTEGER, send INTEGER,
    recv INTEGER, rows INTEGER, PRIMARY KEY (level, b, proc, lport)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS times (level INTEGER, b INTEGER, send INTEGER, recv INTEGER, rows INTEGER,
    PRIMARY KEY (level, b)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS programs (level INTEGER, b INTEGER, proc INTEGER, parent INTEGER, gp INTEGER,
    uid INTEGER, send INTEGER, recv INTEGER, rows INTEGER,
    PRIMARY KEY (level, b, proc, parent, gp, uid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS novelty (id INTEGER PRIMARY KEY AUTOINCREMENT, t, kind TEXT, exe TEXT, name TEXT,
    sha256 TEXT, value TEXT, domain TEXT, raddr TEXT, rport INTEGER, country TEXT, send INTEGER, recv INTEGER,
    text TEXT);
CREATE INDEX IF NOT EXISTS novelty_t ON novelty (t);
"""
# a novelty row: when (the window's time), its kind (NOVELTY_KINDS), the
# program, what is new (a registrable domain, a country, a remote port as
# text, a name, a sha256, or for volume "sent" / "received"), the connection
# that showed it, the bytes (a destination's in that window; the hour's so
# far for volume) and what exe.log says
NOVELTY_COLUMNS = ("t", "kind", "exe", "name", "sha256", "value", "domain", "raddr", "rport", "country", "send",
                   "recv", "text")
# rollup table -> its key columns (after level and b), narrowest first
ROLLUPS = {"times": (), "programs": ("proc", "parent", "gp", "uid"),
           "rollups": ("proc", "parent", "gp", "uid", "domain", "laddr", "raddr", "rport", "proto"),
           "ports": ("proc", "lport")}
# version 3's rollups, from version 2's (in the same transaction as the upgrade)
ROLLUPS_V3 = [f"INSERT INTO {table} (level, b, {''.join(k + ', ' for k in keys)}send, recv, rows) SELECT level, b, "
              f"{''.join(k + ', ' for k in keys)}sum(send), sum(recv), sum(rows) FROM rollups "
              f"GROUP BY level, b{''.join(', ' + k for k in keys)}"
              for table, keys in (("times", ()), ("programs", ("proc", "parent", "gp", "uid")))]
ALL_PROCS_LEVELS = (DAY, ALL_TIME)     # where ports also has the total over every process (proc 0)
CONNS_COLUMNS = ("t", "send", "recv", "proc", "parent", "gp", "uid", "lport", "rport", "laddr", "raddr", "domain",
                 "proto")

# the columns of the connections view, from conns (c) and what it refers to
VIEW_SQL = {"contime": "CASE WHEN typeof(c.t) = 'integer' THEN strftime('%Y-%m-%d %H:%M:%S', c.t, 'unixepoch') "
                       "ELSE c.t END",
            "send": "c.send", "recv": "c.recv", "uid": "c.uid", "lport": "c.lport", "rport": "c.rport",
            "laddr": "la.value", "raddr": "ra.value", "domain": "d.value", "proto": "pr.value",
            **{a: f"p.{a}" for a in _PROC_ATTRS}, **{f"p{a}": f"pp.{a}" for a in _PROC_ATTRS},
            **{f"gp{a}": f"g.{a}" for a in _PROC_ATTRS}}
VIEW_FROM = ("conns c JOIN procs p ON p.id = c.proc JOIN procs pp ON pp.id = c.parent JOIN procs g ON g.id = c.gp "
             "JOIN strs la ON la.id = c.laddr JOIN strs ra ON ra.id = c.raddr JOIN strs d ON d.id = c.domain "
             "JOIN strs pr ON pr.id = c.proto")
LEGACY_TABLE = "connections_v1"


def port_key(column: str) -> str:
    """A port column with every high port as HIGH_PORTS_KEY (NULL stays NULL)."""
    return f"(CASE WHEN {column} >= {HIGH_PORTS} THEN {HIGH_PORTS_KEY} ELSE {column} END)"


def rollup_value(column: str) -> str:
    """A conns column as its rollups key (NULL integers become NOT_LOGGED,
    high ports HIGH_PORTS_KEY)."""
    if column in INTEGER_KEYS:
        return f"coalesce({port_key(column) if column in PORT_KEYS else column}, {NOT_LOGGED})"
    return column


def rollup_statements(where: str) -> typing.Dict[int, typing.List[str]]:
    """Statements adding the conns rows that match `where` to the rollups, by level."""
    out: typing.Dict[int, typing.List[str]] = {level: [] for level in ROLLUP_LEVELS}
    for table, keys in ROLLUPS.items():
        for level in ROLLUP_LEVELS:
            bucket = f"CASE WHEN typeof(t) = 'integer' THEN t / {level} * {level} ELSE {NO_TIME} END"
            variants = [keys] + ([("0",) + keys[1:]] if table == "ports" and level in ALL_PROCS_LEVELS else [])
            for values in variants:
                columns = [bucket] + [v if v == "0" else rollup_value(v) for v in values]
                out[level].append(f"INSERT INTO {table} (level, b, {''.join(k + ', ' for k in keys)}send, recv, rows) "
                                  f"SELECT {level}, {', '.join(columns)}, sum(send), sum(recv), count(*) FROM conns "
                                  f"WHERE {where} GROUP BY {', '.join(str(i + 2) for i in range(len(columns)))} "
                                  f"ON CONFLICT DO UPDATE SET send = send + excluded.send, "
                                  f"recv = recv + excluded.recv, rows = rows + excluded.rows")
    return out


ROLL_STATEMENTS = rollup_statements("id > ? AND id <= ?")     # (the rows first < id <= last)

# what a window's totals for each rollup are summed from, in this order: the
# rows, or the window's totals for a wider rollup that keeps its keys (fewer
# rows than the window's)
WINDOW_SOURCES = {"rollups": "conns", "ports": "conns", "programs": "rollups", "times": "programs"}


def window_statements() -> typing.List[typing.Tuple[str, str]]:
    """Statements adding the conns rows first < id <= last to the rollups
    (those with ? marks take first and last), each with the table whose
    hours it sums from the rows ('' for the others). The rows are summed by
    hour once per rollup, into a TEMP table, and every level is added from
    those hours (the day and the whole log hold whole hours): each key of a
    window is looked up once a level, not grouped from the rows again for
    each."""
    out = []
    for table, source in WINDOW_SOURCES.items():
        keys = ROLLUPS[table]
        columns, summed = "".join(k + ", " for k in keys), f"temp.window_{table}"
        out += [("", f"CREATE TEMP TABLE IF NOT EXISTS window_{table} (b, {columns}send, recv, rows)"),
                ("", f"DELETE FROM {summed}")]
        if source == "conns":
            bucket = f"CASE WHEN typeof(t) = 'integer' THEN t / {HOUR} * {HOUR} ELSE {NO_TIME} END"
            values = [bucket] + [rollup_value(k) for k in keys]
            out.append((table, f"INSERT INTO {summed} SELECT {', '.join(values)}, sum(send), sum(recv), count(*) "
                               f"FROM conns WHERE id > ? AND id <= ? GROUP BY "
                               f"{', '.join(str(i + 1) for i in range(len(values)))}"))
        else:
            out.append(("", f"INSERT INTO {summed} SELECT b, {columns}sum(send), sum(recv), sum(rows) "
                            f"FROM temp.window_{source} GROUP BY b{''.join(', ' + k for k in keys)}"))
        for level in ROLLUP_LEVELS:     # (an hour's bucket is NO_TIME, or a multiple of the hour)
            bucket = "b" if level == HOUR else f"CASE WHEN b = {NO_TIME} THEN b ELSE b / {level} * {level} END"
            variants = [keys] + ([("0",) + keys[1:]] if table == "ports" and level in ALL_PROCS_LEVELS else [])
            for values in variants:     # (a key met twice in one statement is added up by its upsert)
                out.append(("", f"INSERT INTO {table} (level, b, {columns}send, recv, rows) SELECT {level}, "
                                f"{bucket}, {''.join(v + ', ' for v in values)}send, recv, rows FROM {summed} "
                                f"WHERE true ON CONFLICT DO UPDATE SET send = send + excluded.send, "
                                f"recv = recv + excluded.recv, rows = rows + excluded.rows"))
    return out


WINDOW_STATEMENTS = window_statements()


def hour_of(t) -> int:
    """The hour bucket of a conns time, as window_statements() has it in SQL
    (whose division truncates toward zero)."""
    if not isinstance(t, int):
        return NO_TIME
    return t // HOUR * HOUR if t >= 0 else -(-t // HOUR * HOUR)


def window_sums(rows: typing.Iterable[tuple]) -> typing.Optional[typing.Dict[str, list]]:
    """What window_statements() sums from the rows (conns values, in
    CONNS_COLUMNS order) into its TEMP tables, summed here, as they are
    encoded, instead of read back and grouped: {table: [(b, keys..., send,
    recv, rows)]}. None for rows whose bytes are not integers, or whose user
    or ports are neither integers nor NULL, and for sums past SQLite's
    integers: the SQL, which reads them as stored, sums those (or fails)."""
    rollups: typing.Dict[tuple, list] = {}
    ports: typing.Dict[tuple, list] = {}
    hours: typing.Dict[typing.Any, int] = {}
    for t, send, recv, proc, parent, gp, uid, lport, rport, laddr, raddr, domain, proto in rows:
        if type(send) is not int or type(recv) is not int or not (uid is None or type(uid) is int) or \
                not (lport is None or type(lport) is int) or not (rport is None or type(rport) is int):
            return None
        b = hours.get(t)
        if b is None:
            b = hours[t] = hour_of(t)
        rport = NOT_LOGGED if rport is None else HIGH_PORTS_KEY if rport >= HIGH_PORTS else rport
        lport = NOT_LOGGED if lport is None else HIGH_PORTS_KEY if lport >= HIGH_PORTS else lport
        for totals, key in ((rollups, (b, proc, parent, gp, NOT_LOGGED if uid is None else uid, domain, laddr,
                                       raddr, rport, proto)), (ports, (b, proc, lport))):
            total = totals.get(key)
            if total is None:
                totals[key] = [send, recv, 1]
            else:
                total[0] += send
                total[1] += recv
                total[2] += 1
    if any(not -1 << 63 <= v < 1 << 63 for totals in (rollups, ports) for total in totals.values() for v in total):
        return None
    return {"rollups": [(*k, *v) for k, v in rollups.items()], "ports": [(*k, *v) for k, v in ports.items()]}


def add_to_rollups(con: sqlite3.Connection, first: int, last: int,
                   sums: typing.Optional[typing.Dict[str, list]] = None) -> None:
    """Add the conns rows first < id <= last to the rollups, in the caller's
    transaction (sums: their window_sums(), when the caller has them)."""
    for table, statement in WINDOW_STATEMENTS:
        if table and sums is not None:
            con.executemany(f"INSERT INTO temp.window_{table} VALUES "
                            f"({', '.join('?' * (len(ROLLUPS[table]) + 4))})", sums[table])
        else:
            con.execute(statement, (first, last) if "?" in statement else ())


# while older rows are rolled up, days with rows written since are told
# apart (roll_day): the earliest time of those rows (NO_TIME for a row whose
# time is no time) is kept, only while a migration runs
LIVE_FROM_UPDATE = "UPDATE meta SET value = min(value, {}) WHERE key = 'live_from'"


def insert_trigger() -> str:
    """INSERT INTO connections goes on working for scripts: the view takes it
    (and, while older rows are moved over, tells the migration of it)."""
    def match(prefix: str) -> str:
        return " AND ".join(f"coalesce({a}, x'ff') = coalesce(NEW.{prefix}{a}, x'ff')" for a in _PROC_ATTRS)
    prefixes, strs = ("", "p", "gp"), ("laddr", "raddr", "domain", "proto")
    statements = [f"INSERT OR IGNORE INTO procs (exe, name, cmdline, sha256) VALUES "
                  f"({', '.join(f'NEW.{p}{a}' for a in _PROC_ATTRS)})" for p in prefixes]
    statements += [f"INSERT OR IGNORE INTO strs (value) VALUES (NEW.{s})" for s in strs]
    proc_ids = ", ".join(f"(SELECT id FROM procs WHERE {match(p)})" for p in prefixes)
    str_ids = ", ".join(f"(SELECT id FROM strs WHERE coalesce(value, x'ff') = coalesce(NEW.{s}, x'ff'))" for s in strs)
    statements.append(
        "INSERT INTO conns (t, send, recv, proc, parent, gp, uid, lport, rport, laddr, raddr, domain, proto) VALUES ("
        "CASE WHEN strftime('%Y-%m-%d %H:%M:%S', strftime('%s', NEW.contime), 'unixepoch') = NEW.contime "
        "THEN CAST(strftime('%s', NEW.contime) AS INTEGER) ELSE NEW.contime END, "
        f"NEW.send, NEW.recv, {proc_ids}, NEW.uid, NEW.lport, NEW.rport, {str_ids})")
    statements.append(LIVE_FROM_UPDATE.format(
        f"(SELECT CASE WHEN typeof(t) = 'integer' THEN t ELSE {NO_TIME} END FROM conns WHERE id = last_insert_rowid())"))
    statements += [s for level in rollup_statements("id = last_insert_rowid()").values() for s in level]
    body = ";\n    ".join(statements)
    return f"CREATE TRIGGER IF NOT EXISTS connections_insert INSTEAD OF INSERT ON connections BEGIN\n    {body};\nEND"


def view_sql(legacy: typing.Optional[typing.Sequence[str]]) -> str:
    """The connections view; while an older log is moved over (legacy: its
    columns), its rows not moved yet come first, as they are."""
    v2 = f"SELECT {', '.join(f'{VIEW_SQL[c]} AS {c}' for c in DB_COLUMNS)} FROM {VIEW_FROM}"
    if legacy is None:
        return f"CREATE VIEW connections AS {v2}"
    old = ", ".join(c if c in legacy else f"NULL AS {c}" for c in DB_COLUMNS)
    return (f"CREATE VIEW connections AS SELECT {old} FROM {LEGACY_TABLE} WHERE rowid > "
            f"(SELECT value FROM meta WHERE key = 'migrated') UNION ALL {v2}")


def local_seconds(contime) -> typing.Union[int, str, bytes, None]:
    """'YYYY-MM-DD HH:MM:SS' as local wall-clock seconds (read as if UTC); a
    value that is not such a time comes back as it is."""
    t = contime.decode("ascii", "replace") if isinstance(contime, bytes) else contime
    try:
        if len(t) != 19 or t[4] + t[7] + t[10] + t[13] + t[16] != "-- ::":
            raise ValueError(t)
        seconds = calendar.timegm((int(t[0:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]), int(t[14:16]),
                                   int(t[17:19])))
        return seconds if time.strftime(TIME_FORMAT, time.gmtime(seconds)) == t else contime
    except (ValueError, TypeError, OverflowError):
        return contime


def now_seconds(clock: typing.Callable[[], float] = time.time) -> int:
    """The local wall-clock time now, in the log's seconds."""
    return calendar.timegm(time.localtime(clock()))


def move_aside(path: str) -> str:
    """Rename a damaged file (with SQLite's journal files) out of the way,
    keeping it for the user; returns where it went."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(path, aside)
    for suffix in ("-journal", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.rename(path + suffix, aside + suffix)
    return aside


# -- the move from the older layouts -------------------------------------------
# A log of this project's earlier text table, or of upstream picosnitch
# 1.0.3's, has its table renamed connections_v1 when it is opened
# (Log.upgrade), is read with the new rows meanwhile (view_sql, and the
# query layer's older rows) and is moved over by the primary's migration
# thread (migrate_log), a step at a time. The steps are all here, so that
# they can go in one piece one day.
#
# The old table's indexes go first, one per step (the rows are read by
# rowid). Old rows then move over in batches, in SQL: their strings
# interned, their times converted, their rowids kept, and only the hour
# rollups kept up (the query layer uses no other while a migration
# runs). Once every row is over, each old day gets its day and whole-log
# totals from its hour rollups, one day per transaction (from the day of
# the earliest row written since, whose hours have both, from the old
# rows themselves, an hour per transaction; a row written since without a
# time makes every day such a day). Last, the old rows are deleted,
# CLEAR_BATCH a step, and the empty table dropped: their pages are freed
# without being overwritten first, since every row of it is in conns
# (Debian's SQLite zeroes freed pages unless told not to, which takes ten
# times as long; dropping ten million rows at once held the log for two
# seconds, and took less time in all). Progress is kept with each step: a
# stop loses and repeats nothing.

MIGRATE_BATCH = 50_000      # old rows moved per transaction
CLEAR_BATCH = 250_000       # old rows deleted per transaction, once every one is moved over


class OldLayouts:
    """The steps of the move from an older layout, for Log (its connection
    is self.con, its interned ids self.procs and self.strs)."""

    con: sqlite3.Connection
    procs: typing.Dict[tuple, int]
    strs: typing.Dict[typing.Any, int]

    def migrating(self) -> bool:
        return self.con.execute("SELECT 1 FROM meta WHERE key = 'legacy_columns'").fetchone() is not None

    def meta(self) -> dict:
        return dict(self.con.execute("SELECT key, value FROM meta"))

    @contextlib.contextmanager
    def unzeroed(self) -> typing.Iterator[None]:
        """Pages freed meanwhile are not overwritten first."""
        before = self.con.execute("PRAGMA secure_delete").fetchone()[0]
        self.con.execute("PRAGMA secure_delete = 0")
        try:
            yield
        finally:
            self.con.execute(f"PRAGMA secure_delete = {int(before)}")

    def migrate(self, batch: int = MIGRATE_BATCH) -> typing.Optional[int]:
        """One step of the migration: how many old rows it moved (0 for a
        step that moved none); None when there is nothing left to do."""
        state = self.meta()
        if "legacy_columns" not in state:
            return None
        try:
            if state["migrated"] < state["legacy_last"]:
                index = self.con.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND "
                                         "sql IS NOT NULL", (LEGACY_TABLE,)).fetchone()
                if index:       # (whatever its name: a user may have made it)
                    with self.unzeroed(), self.con:
                        self.con.execute("DROP INDEX \"{}\"".format(index[0].replace('"', '""')))
                    return 0
                # (no further than the last old row: the rows after it were written since, and counted then)
                return self.move(json.loads(state["legacy_columns"]), state["migrated"],
                                 min(batch, state["legacy_last"] - state["migrated"]))
            rolled = state["rolled"]
            after = NO_TIME if rolled < NO_TIME else rolled + (DAY if rolled >= 0 else 1)
            hour = self.con.execute(f"SELECT min(b) FROM rollups WHERE level = {HOUR} AND b >= ?", (after,)).fetchone()[0]
            if hour is not None:
                day = hour if hour < 0 else hour // DAY * DAY
                self.con.execute("BEGIN IMMEDIATE")     # no window comes in between: live_from is final for it
                try:
                    live_from = self.con.execute("SELECT value FROM meta WHERE key = 'live_from'").fetchone()[0]
                    rolling = self.con.execute("SELECT value FROM meta WHERE key = 'rolling'").fetchone()
                    if day >= 0 and (rolling or day >= live_from // DAY * DAY):
                        self.roll_hour(day, rolling[0] + HOUR if rolling else day, state["legacy_last"])
                    else:
                        self.roll_day(day, day >= live_from // DAY * DAY, state["legacy_last"])
                        self.con.execute("UPDATE meta SET value = ? WHERE key = 'rolled'", (day,))
                    self.con.commit()
                except BaseException:
                    self.con.rollback()
                    raise
                return 0
            with self.unzeroed(), self.con:     # (the old rows go a batch a step: dropping them all takes seconds)
                if self.con.execute(f"DELETE FROM {LEGACY_TABLE} WHERE rowid IN (SELECT rowid FROM {LEGACY_TABLE} "
                                    f"ORDER BY rowid LIMIT {CLEAR_BATCH})").rowcount:
                    return 0
            with self.unzeroed(), self.con:
                self.con.execute("DROP VIEW connections")
                self.con.execute(view_sql(None))
                self.con.execute(insert_trigger())
                self.con.execute(f"DROP TABLE {LEGACY_TABLE}")
                self.con.execute("DELETE FROM meta WHERE key IN ('migrated', 'legacy_columns', 'legacy_last', "
                                 "'live_from', 'rolled', 'rolling')")
            return 0
        except sqlite3.Error:
            self.procs.clear()
            self.strs.clear()
            raise

    def intern_old(self, legacy: typing.List[str], done: int, batch: int) -> None:
        """Store the processes and strings of the old rows with done < rowid
        <= done + batch that are not stored yet, in the caller's transaction."""
        col = lambda c: f"l.{c}" if c in legacy else "NULL"
        params = (done, done + batch)
        for prefix in ("", "p", "gp"):
            self.con.execute(f"INSERT OR IGNORE INTO procs (exe, name, cmdline, sha256) SELECT DISTINCT "
                             f"{', '.join(col(prefix + a) for a in _PROC_ATTRS)} FROM {LEGACY_TABLE} l "
                             f"WHERE l.rowid > ? AND l.rowid <= ?", params)
        for column in ("laddr", "raddr", "domain", "proto"):
            self.con.execute(f"INSERT OR IGNORE INTO strs (value) SELECT DISTINCT {col(column)} "
                             f"FROM {LEGACY_TABLE} l WHERE l.rowid > ? AND l.rowid <= ?", params)

    def move(self, legacy: typing.List[str], done: int, batch: int) -> int:
        """Move the old rows with done < rowid <= done + batch."""
        col = lambda c: f"l.{c}" if c in legacy else "NULL"
        where, params = "l.rowid > ? AND l.rowid <= ?", (done, done + batch)
        with self.con:
            self.intern_old(legacy, done, batch)
            proc = lambda alias, prefix: (f"JOIN procs {alias} ON " + " AND ".join(
                f"coalesce({alias}.{a}, x'ff') = coalesce({col(prefix + a)}, x'ff')" for a in _PROC_ATTRS))
            text = lambda alias, c: f"JOIN strs {alias} ON coalesce({alias}.value, x'ff') = coalesce({col(c)}, x'ff')"
            seconds = "strftime('%s', l.contime)"
            moved = self.con.execute(
                f"INSERT INTO conns (id, {', '.join(CONNS_COLUMNS)}) SELECT l.rowid, "
                f"CASE WHEN strftime('%Y-%m-%d %H:%M:%S', {seconds}, 'unixepoch') = l.contime "
                f"THEN CAST({seconds} AS INTEGER) ELSE l.contime END, l.send, l.recv, p.id, pp.id, g.id, "
                f"{col('uid')}, {col('lport')}, {col('rport')}, la.id, ra.id, d.id, pr.id FROM {LEGACY_TABLE} l "
                f"{proc('p', '')} {proc('pp', 'p')} {proc('g', 'gp')} {text('la', 'laddr')} {text('ra', 'raddr')} "
                f"{text('d', 'domain')} {text('pr', 'proto')} WHERE {where} ORDER BY l.rowid", params).rowcount
            for statement in ROLL_STATEMENTS[HOUR]:
                self.con.execute(statement, params)
            self.con.execute("UPDATE meta SET value = ? WHERE key = 'migrated'", (done + batch,))
        return moved

    def roll_hour(self, day: int, start: int, legacy_last: int) -> None:
        """A day with rows written since (whose hour rollups hold both), an
        hour a step: the day and whole-log totals of the old rows of its
        next hour with any from start on, from the rows themselves (a busy
        day's old rows, summed at once, would hold the log for seconds); the
        day is rolled once no hour is left."""
        hour = self.con.execute(f"SELECT min(b) FROM rollups WHERE level = {HOUR} AND b >= ? AND b < ?",
                                (start, day + DAY)).fetchone()[0]
        if hour is None:
            self.con.execute("DELETE FROM meta WHERE key = 'rolling'")
            self.con.execute("UPDATE meta SET value = ? WHERE key = 'rolled'", (day,))
            return
        for level in (DAY, ALL_TIME):
            for statement in ROLL_STATEMENTS[level]:
                self.con.execute(statement.replace("WHERE id > ? AND id <= ?",     # (by conns_t, not by id)
                                                   "WHERE t >= ? AND t < ? AND +id > ? AND +id <= ?"),
                                 (hour, hour + HOUR, 0, legacy_last))
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('rolling', ?)", (hour,))

    def roll_day(self, day: int, mixed: bool, legacy_last: int) -> None:
        """The day and whole-log totals of the old rows of one day (day -1:
        the rows whose time is no time): from the day's hour rollups, or, for
        the rows without a time once rows were written since (mixed), from
        the old rows themselves (days with a time: roll_hour)."""
        if mixed:
            for level in (DAY, ALL_TIME):
                for statement in ROLL_STATEMENTS[level]:
                    self.con.execute(statement.replace("WHERE id > ? AND id <= ?",
                                                       "WHERE id > ? AND id <= ? AND typeof(t) <> 'integer'"),
                                     (0, legacy_last))
            return
        for table, keys in ROLLUPS.items():
            hours = f"level = {HOUR} AND b >= ? AND b < ?" if day >= 0 else f"level = {HOUR} AND b = {NO_TIME}"
            span = (day, day + DAY) if day >= 0 else ()
            for level in (DAY, ALL_TIME):
                bucket = NO_TIME if day < 0 else (day if level == DAY else 0)
                variants = [keys] + ([("0",) + keys[1:]] if table == "ports" and level in ALL_PROCS_LEVELS else [])
                for values in variants:      # (grouped by level, a constant, when there is no key)
                    self.con.execute(
                        f"INSERT INTO {table} (level, b, {''.join(k + ', ' for k in keys)}send, recv, rows) "
                        f"SELECT {level}, {bucket}, {''.join(v + ', ' for v in values)}sum(send), sum(recv), sum(rows) "
                        f"FROM {table} WHERE {hours} GROUP BY {', '.join(str(i + 3) for i in range(len(values))) or 'level'} "
                        f"ON CONFLICT DO UPDATE "
                        f"SET send = send + excluded.send, recv = recv + excluded.recv, rows = rows + excluded.rows", span)


class Log(OldLayouts):
    """snitch.db, as the primary writes it: rows go in with their strings
    and processes interned, and added to the rollups, in one transaction."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con
        self.procs: typing.Dict[tuple, int] = {}
        self.strs: typing.Dict[typing.Any, int] = {}
        self.times: typing.Dict[typing.Any, typing.Any] = {}
        self.longest_step = 0.0     # of pruning, in seconds

    @classmethod
    def open(cls, path: str, timeout: float = DB_BUSY_TIMEOUT) -> "Log":
        """Open (creating) snitch.db at version 2. An older log is renamed
        and moved over later, in the background (migrate); nothing here
        reads it. sqlite3.DatabaseError when the file is no database."""
        con = sqlite3.connect(path, timeout=timeout)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.OperationalError(f"it has layout version {version}, newer than this picosnitch's "
                                               f"({SCHEMA_VERSION}); it is left as it is")
            if not con.execute("SELECT 1 FROM sqlite_master").fetchone():
                con.execute("PRAGMA auto_vacuum = INCREMENTAL")     # (a new file: it can give pages back)
            con.execute("PRAGMA journal_mode = WAL")
            if version < SCHEMA_VERSION:
                con.execute("BEGIN IMMEDIATE")
                try:
                    cls.upgrade(con, version)
                    con.commit()
                except BaseException:
                    con.rollback()
                    raise
        except sqlite3.Error:
            con.close()
            raise
        return cls(con)

    @staticmethod
    def upgrade(con: sqlite3.Connection, version: int) -> None:
        """The current layout over whatever is there, in the caller's
        transaction: an older connections table becomes connections_v1, to be
        moved over; a compact layout gains what later versions add (and goes
        on moving older rows over if it was)."""
        legacy, renamed = None, False
        found = con.execute("SELECT type FROM sqlite_master WHERE name = 'connections'").fetchone()
        if found and found[0] == "table":
            con.execute(f"ALTER TABLE connections RENAME TO {LEGACY_TABLE}")
            legacy = [row[1] for row in con.execute(f"PRAGMA table_info({LEGACY_TABLE})")]
            renamed = True
        elif version >= COMPACT_VERSION:
            columns = con.execute("SELECT value FROM meta WHERE key = 'legacy_columns'").fetchone()
            legacy = json.loads(columns[0]) if columns else None
        for statement in SCHEMA.split(";"):
            if statement.strip():
                con.execute(statement)
        if version == COMPACT_VERSION:
            for statement in ROLLUPS_V3:
                con.execute(statement)
        if renamed:
            last = con.execute(f"SELECT max(rowid) FROM {LEGACY_TABLE}").fetchone()[0] or 0
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [("migrated", 0), ("legacy_columns", json.dumps(legacy)), ("legacy_last", last),
                             ("live_from", now_seconds()), ("rolled", NO_TIME - 1)])
            con.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('conns', ?)", (last,))
        con.execute("DROP VIEW IF EXISTS connections")      # (which drops its trigger too)
        con.execute(view_sql(legacy))
        con.execute(insert_trigger())
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- writing -------------------------------------------------------------
    def proc_id(self, attrs: tuple) -> int:
        found = self.procs.get(attrs)
        if found is None:
            self.con.execute("INSERT OR IGNORE INTO procs (exe, name, cmdline, sha256) VALUES (?, ?, ?, ?)", attrs)
            found = self.con.execute(
                "SELECT id FROM procs WHERE coalesce(exe, x'ff') = coalesce(?, x'ff') AND coalesce(name, x'ff') = "
                "coalesce(?, x'ff') AND coalesce(cmdline, x'ff') = coalesce(?, x'ff') AND coalesce(sha256, x'ff') = "
                "coalesce(?, x'ff')", attrs).fetchone()[0]
            self.procs[attrs] = found
        return found

    def str_id(self, value) -> int:
        found = self.strs.get(value)
        if found is None:
            self.con.execute("INSERT OR IGNORE INTO strs (value) VALUES (?)", (value,))
            found = self.con.execute("SELECT id FROM strs WHERE coalesce(value, x'ff') = coalesce(?, x'ff')",
                                     (value,)).fetchone()[0]
            self.strs[value] = found
        return found

    def encode(self, row: typing.Sequence) -> tuple:
        """A row (a Row, or its values in order) as conns values (CONNS_COLUMNS)."""
        r = row if isinstance(row, tuple) and len(row) == len(DB_COLUMNS) else Row(*row)
        t = self.times.get(r[ROW_TIME])
        if t is None:
            t = self.times[r[ROW_TIME]] = local_seconds(r[ROW_TIME])
        proc, s = self.procs.get, self.strs.get       # (found there for all but a window's first rows)
        p, pp, gp = r[PROC_PLACES[0]], r[PROC_PLACES[1]], r[PROC_PLACES[2]]      # (written out: once a row)
        la, ra, d, pr = r[ROW_STRS[0]], r[ROW_STRS[1]], r[ROW_STRS[2]], r[ROW_STRS[3]]
        return (t, r[ROW_SEND], r[ROW_RECV], proc(p) or self.proc_id(p), proc(pp) or self.proc_id(pp),
                proc(gp) or self.proc_id(gp), r[ROW_UID], r[ROW_LPORT], r[ROW_RPORT], s(la) or self.str_id(la),
                s(ra) or self.str_id(ra), s(d) or self.str_id(d), s(pr) or self.str_id(pr))

    def add(self, rows: typing.Sequence[tuple], ids: typing.Optional[typing.Sequence[int]] = None) -> None:
        """Insert encoded rows (with ids, for rows moved from an older log,
        in order) and add them to the rollups; the caller holds the
        transaction."""
        if not rows:
            return
        marks = ",".join("?" * len(CONNS_COLUMNS))
        if ids is None:
            first = self.con.execute("SELECT coalesce(max(id), 0) FROM conns").fetchone()[0]
            most = ROWS_A_STATEMENT if sqlite3.sqlite_version_info >= (3, 32) else 999 // len(CONNS_COLUMNS)
            for start in range(0, len(rows), most):     # (a statement each: fewer steps than a row each)
                chunk = rows[start:start + most]
                self.con.execute(f"INSERT INTO conns ({', '.join(CONNS_COLUMNS)}) VALUES "
                                 f"{', '.join([f'({marks})'] * len(chunk))}",
                                 list(itertools.chain.from_iterable(chunk)))
            last = self.con.execute("SELECT max(id) FROM conns").fetchone()[0]
        else:
            self.con.executemany(f"INSERT INTO conns (id, {', '.join(CONNS_COLUMNS)}) VALUES (?, {marks})",
                                 [(i, *r) for i, r in zip(ids, rows)])
            first, last = ids[0] - 1, ids[-1]
        add_to_rollups(self.con, first, last, window_sums(rows))

    def insert(self, rows: typing.Sequence[typing.Sequence], mark: typing.Tuple[str, int] = ("", 0),
               novelty: typing.Sequence[typing.Sequence] = ()) -> None:
        """Insert rows (each a Row, or its values in order), in one transaction with mark (the
        run and the window they came from), so that a window sent again after a
        crash is recognised as written, and with the window's novelty rows
        (NOVELTY_COLUMNS, the time as the window's text)."""
        if len(self.procs) + len(self.strs) > INTERN_CACHE:
            self.procs.clear()
            self.strs.clear()
        if len(self.times) > 4096:
            self.times.clear()
        try:
            with self.con:
                encoded = [self.encode(r) for r in rows]
                self.add(encoded)
                if encoded:
                    self.con.execute(LIVE_FROM_UPDATE.format("?"),
                                     (min(r[0] if isinstance(r[0], int) else NO_TIME for r in encoded),))
                if novelty:
                    self.con.executemany(f"INSERT INTO novelty ({', '.join(NOVELTY_COLUMNS)}) VALUES "
                                         f"({', '.join('?' * len(NOVELTY_COLUMNS))})",
                                         [(local_seconds(n[0]), *n[1:]) for n in novelty])
                if mark[0]:
                    self.con.execute("INSERT OR REPLACE INTO meta VALUES ('written', ?)", (json.dumps(mark),))
        except sqlite3.Error:
            self.procs.clear()          # ids handed out in a transaction that was rolled back
            self.strs.clear()
            raise

    def written(self) -> typing.Tuple[str, int]:
        """The mark of the last window written: (run, window)."""
        found = self.con.execute("SELECT value FROM meta WHERE key = 'written'").fetchone()
        try:
            run, seq = json.loads(found[0]) if found else ("", 0)
            return str(run), int(seq)
        except (ValueError, TypeError):
            return "", 0

    # -- retention -----------------------------------------------------------
    def prune(self, days: int, now: int, budget: float = 0.2) -> typing.Optional[int]:
        """Delete rows older than the retention, whole days of them, a batch
        per transaction, for at most budget seconds, then take those days out
        of the rollups, a bounded step per transaction (forget_step): no write
        lock is held long. How many rows went, or None when more is left for
        the next call."""
        cutoff, deleted, began = (now - days * DAY) // DAY * DAY, 0, time.monotonic()
        self.longest_step /= 2      # (what the last call saw, fading)

        def over() -> bool:         # (when the next step would take as long as the longest so far)
            nonlocal last
            took, last = time.monotonic() - last, time.monotonic()
            self.longest_step = max(self.longest_step, took)
            return last - began + self.longest_step > budget
        last = began
        while True:         # (a step at least, whatever the budget)
            with self.con:
                n = self.con.execute("DELETE FROM conns WHERE id IN (SELECT id FROM conns WHERE t < ? "
                                     "ORDER BY t LIMIT ?)", (cutoff, PRUNE_BATCH)).rowcount
            deleted += n
            if n < PRUNE_BATCH:
                with self.con:
                    self.con.execute("DELETE FROM novelty WHERE t < ?", (cutoff,))
                break
            if over():
                return None
        while self.forget_step(cutoff):
            if over():
                return None
        return deleted

    def forget_step(self, cutoff: int) -> bool:
        """One step of taking the days before cutoff out of the rollups: at
        most FORGET_BATCH of a day's totals (in the order of their keys)
        leave the whole-log totals, in one transaction with their deletion,
        so that none is taken out twice; then the hours, one per
        transaction. False when nothing is left."""
        for table, keys in ROLLUPS.items():
            key = ", ".join(keys)
            found = self.con.execute(f"SELECT b{', ' + key if keys else ''} FROM {table} WHERE level = {DAY} "
                                     f"AND b >= 0 AND b < ? ORDER BY b{', ' + key if keys else ''} LIMIT 1",
                                     (cutoff,)).fetchone()
            if found:
                day, span, params = found[0], "", list(found[1:])
                if keys:        # the keys from the first left to the one FORGET_BATCH rows further
                    marks = ", ".join("?" * len(keys))
                    bound = self.con.execute(f"SELECT {key} FROM {table} WHERE level = {DAY} AND b = ? AND "
                                             f"({key}) >= ({marks}) ORDER BY {key} LIMIT 1 OFFSET {FORGET_BATCH}",
                                             [day] + params).fetchone()
                    span = f" AND ({key}) >= ({marks})" + (f" AND ({key}) < ({marks})" if bound else "")
                    params += list(bound or ())
                with self.con:      # (key by key: each a lookup of the whole-log row)
                    totals = self.con.execute(f"SELECT send, recv, rows{''.join(', ' + k for k in keys)} FROM "
                                              f"{table} WHERE level = {DAY} AND b = ?{span}", [day] + params).fetchall()
                    self.con.executemany(f"UPDATE {table} SET send = send - ?, recv = recv - ?, rows = rows - ? "
                                         f"WHERE level = {ALL_TIME} AND b = 0{''.join(f' AND {k} = ?' for k in keys)}",
                                         totals)
                    self.con.executemany(f"DELETE FROM {table} WHERE level = {ALL_TIME} AND b = 0 AND rows <= 0"
                                         f"{''.join(f' AND {k} = ?' for k in keys)}", [t[3:] for t in totals])
                    self.con.execute(f"DELETE FROM {table} WHERE level = {DAY} AND b = ?{span}", [day] + params)
                return True
            hour = self.con.execute(f"SELECT b FROM {table} WHERE level = {HOUR} AND b >= 0 AND b < ? "
                                    f"ORDER BY b LIMIT 1", (cutoff,)).fetchone()
            if hour:
                with self.con:
                    self.con.execute(f"DELETE FROM {table} WHERE level = {HOUR} AND b = ?", hour)
                return True
        return False

    # -- giving free pages back --------------------------------------------------
    # A log made by this picosnitch gives pages back by itself (auto_vacuum
    # incremental): when retention has freed more than SHRINK_FREE of it, a
    # step of GIVE_BACK_STEP pages at a time, within the retention's budget;
    # fewer are left for the next days' rows to reuse. Any other log (one
    # whose old table was dropped by a migration, above all) is copied
    # compact (VACUUM INTO, which reads a snapshot: writers go on), brought
    # up to date and put in its place (catch_up, replace_log); the copy
    # gives pages back by itself from then on.
    def pages(self) -> typing.Tuple[int, int, int]:
        """(pages in the file, free pages among them, bytes a page)."""
        return tuple(self.con.execute(f"PRAGMA {name}").fetchone()[0]          # type: ignore[return-value]
                     for name in ("page_count", "freelist_count", "page_size"))

    def wasteful(self) -> bool:
        pages, free, _ = self.pages()
        return free >= SHRINK_MIN_PAGES and free > pages * SHRINK_FREE

    def incremental(self) -> bool:
        return self.con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2

    def give_back(self, budget: float = 0.2) -> bool:
        """Give free pages back, a step per transaction, for at most budget
        seconds (a step at least); True when what is left is within bounds."""
        began = time.monotonic()
        while self.wasteful():
            with self.con:
                self.con.execute(f"PRAGMA incremental_vacuum({GIVE_BACK_STEP})").fetchall()   # (a page a step)
            if time.monotonic() - began > budget:
                return False
        return True

    def copy_compact(self, path: str) -> None:
        """A compact copy of the log at path, one that gives pages back by
        itself, from a snapshot (writers go on meanwhile)."""
        self.con.execute("PRAGMA auto_vacuum = INCREMENTAL")      # (for the copy: this file keeps its own)
        self.con.execute("VACUUM INTO ?", (path,))

    def checkpointed(self) -> bool:
        """Everything in the file itself (synced), none of it left only in
        the WAL; False when a reader holds an older snapshot. The WAL file
        keeps its size: truncating a large one takes the kernel seconds."""
        return self.con.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0

    def close(self, readable: bool = False) -> None:
        """readable: leave the file in rollback-journal mode, so that the
        user, who may read it but not write its directory, can open it while
        picosnitch is stopped (a WAL file needs its -wal and -shm files, which
        go with the last connection). The next open goes back to WAL."""
        if readable:
            with contextlib.suppress(sqlite3.Error):        # (busy while a viewer reads: the -wal stays)
                self.con.execute("PRAGMA journal_mode = DELETE")
        self.con.close()


def catch_up(copy: str, path: str) -> int:
    """Bring a compact copy of the log at path (copy_compact) up to it, in
    one transaction: what was written since the copy was made. Rows only
    come meanwhile (retention waits), and ids only grow. The rows caught up."""
    con = sqlite3.connect(copy, timeout=DB_BUSY_TIMEOUT)
    try:
        con.execute("ATTACH DATABASE ? AS live", (path,))
        with con:
            for table in ("procs", "strs", "novelty"):
                con.execute(f"INSERT INTO main.{table} SELECT * FROM live.{table} WHERE id > "
                            f"(SELECT coalesce(max(id), 0) FROM main.{table})")
            first = con.execute("SELECT coalesce(max(id), 0) FROM main.conns").fetchone()[0]
            n = con.execute("INSERT INTO main.conns SELECT * FROM live.conns WHERE id > ?", (first,)).rowcount
            if n:
                add_to_rollups(con, first, first + n)
            con.execute("DELETE FROM main.meta")
            con.execute("INSERT INTO main.meta SELECT * FROM live.meta")
            con.execute("UPDATE main.sqlite_sequence SET seq = (SELECT seq FROM live.sqlite_sequence WHERE "
                        "name = 'conns') WHERE name = 'conns'")
        return n
    finally:
        con.close()


def hold_files(path: str) -> typing.List[int]:
    """Descriptors of the log and its -wal and -shm files, as they are: the
    kernel frees a file's space when the last is closed, which takes seconds
    for a large one; whoever replaces them closes these where that holds
    nothing back."""
    held = []
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            held.append(os.open(path + suffix, os.O_RDONLY | os.O_CLOEXEC))
    return held


def replace_log(copy: str, path: str) -> None:
    """Put a caught-up copy in the log's place. No connection of
    picosnitch's is open on the log, and its WAL is checkpointed: its -wal
    and -shm go first (a viewer that has them open goes on reading the old
    file until it opens the log again), then the copy takes its name in one
    rename. A stop at any point leaves one whole log."""
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
    os.rename(copy, path)
    sync_directory(os.path.dirname(path) or ".")


def close_all(fds: typing.Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def remove_copy(copy: str) -> None:
    """A compact copy that will not be used (with its journal)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy + suffix)


def db_rows(path: str) -> typing.List[dict]:
    """Every row of a snitch.db, through the connections view (for tests and scripts)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM connections")]
    finally:
        con.close()


# conn.log: the SPEC's fields are DB_COLUMNS up to domain, in that order
TEXT_LOG_FIELDS = DB_COLUMNS[:DB_COLUMNS.index("domain") + 1]
TEXT_LOG_STRIP = str.maketrans("", "", ",\n\r\0")


def text_log_line(row: typing.Sequence) -> str:
    """One conn.log line from a row (a Row, or its values in order, as far
    as its fields go): commas, newlines and NULs removed, names shown (what
    acts escaped)."""
    values = dict(zip(DB_COLUMNS, row))
    return ",".join("" if v is None else shown(str(v).translate(TEXT_LOG_STRIP))
                    for v in (values[field] for field in TEXT_LOG_FIELDS))


###############################################################################
# 8. BTF reader and the BPF program text
###############################################################################
# Every kernel structure offset the program uses is read from the running
# kernel's BTF; kernel headers only let bcc compile (their layouts may be
# another kernel's).

class BTF:
    """A minimal reader of the BTF type format: struct member offsets."""
    # kind -> (bytes after the common header, bytes per vlen item)
    EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8),
             14: (4, 0), 15: (0, 12), 17: (4, 0), 19: (0, 12)}
    STRUCT, UNION, PTR, ARRAY, INT, ENUM, ENUM64 = 4, 5, 2, 3, 1, 6, 19
    QUALIFIERS = {8, 9, 10, 11, 18}   # typedef, volatile, const, restrict, type tag

    def __init__(self, data: bytes):
        magic, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", data)
        if magic != 0xEB9F:
            raise PicosnitchError("not a little-endian BTF file")
        self.data = data
        self.str_base, self.str_end = hdr_len + str_off, hdr_len + str_off + str_len
        self.types: typing.List[typing.Tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
        self.structs: typing.Dict[str, int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_type = struct.unpack_from("<III", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            self.types.append((kind, name_off, info, size_type, pos + 12))
            if kind in (self.STRUCT, self.UNION) and name_off and vlen:
                self.structs.setdefault(self.name(name_off), len(self.types) - 1)
            fixed, per_item = self.EXTRA.get(kind, (0, 0))
            pos += 12 + fixed + per_item * vlen

    @classmethod
    def from_file(cls, path: str = BTF_PATH) -> "BTF":
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as e:
            raise PicosnitchError(f"kernel BTF is needed to read struct offsets: {path}: {e.strerror}")

    def name(self, off: int) -> str:
        end = self.data.index(b"\0", self.str_base + off)
        return self.data[self.str_base + off:end].decode()

    def resolve(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        while self.types[tid][0] in self.QUALIFIERS:
            tid = self.types[tid][3]
        return tid

    def size(self, tid: int) -> int:
        kind, _, _, size_type, extra = self.types[self.resolve(tid)]
        if kind == self.PTR:
            return 8
        if kind == self.ARRAY:
            elem, _, count = struct.unpack_from("<III", self.data, extra)
            return self.size(elem) * count
        return size_type

    def members(self, tid: int) -> typing.Iterator[typing.Tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        _, _, info, _, extra = self.types[tid]
        kind_flag = info >> 31
        for i in range(info & 0xFFFF):
            name_off, mtype, off = struct.unpack_from("<III", self.data, extra + 12 * i)
            bits, bitsize = (off & 0xFFFFFF, off >> 24) if kind_flag else (off, 0)
            yield self.name(name_off) if name_off else "", mtype, bits, bitsize

    def find_member(self, tid: int, name: str) -> typing.Optional[typing.Tuple[int, int, int]]:
        """(type id, bit offset, bitfield size), looking inside anonymous members."""
        for mname, mtype, bits, bitsize in self.members(tid):
            if mname == name:
                return mtype, bits, bitsize
            inner = self.resolve(mtype)
            if not mname and self.types[inner][0] in (self.STRUCT, self.UNION):
                found = self.find_member(inner, name)
                if found:
                    return found[0], bits + found[1], found[2]
        return None

    def field(self, path: str) -> "Field":
        """Offset and size of 'struct.member[.member...]'."""
        struct_name, *names = path.split(".")
        if struct_name not in self.structs:
            raise PicosnitchError(f"kernel BTF has no struct {struct_name}")
        tid, bits, bitsize = self.structs[struct_name], 0, 0
        for name in names:
            found = self.find_member(self.resolve(tid), name)
            if found is None:
                raise PicosnitchError(f"kernel BTF: struct {struct_name} has no member {path.split('.', 1)[1]}")
            tid, bits, bitsize = found[0], bits + found[1], found[2]
        return Field(bits // 8, self.size(tid), bits % 8 if bitsize else 0, bitsize)

    def tracepoint_type(self, name: str) -> int:
        """The type id of a tracepoint's typedef btf_trace_<name> (0 when there is none)."""
        want = f"btf_trace_{name}"
        return next((tid for tid, t in enumerate(self.types) if t[0] == 8 and t[1] and self.name(t[1]) == want), 0)

    def has_raw_tracepoint(self, name: str) -> bool:
        """Raw tracepoints show up in BTF as the typedef btf_trace_<name>."""
        return bool(self.tracepoint_type(name))


class Field(typing.NamedTuple):
    offset: int
    size: int
    shift: int
    bits: int


# macro name -> kernel field (or alternatives, newest kernel first); each
# becomes OFF_<NAME> and a reader F_<NAME>(p)
KERNEL_FIELDS = {
    "TASK_PID": "task_struct.pid",
    "TASK_TGID": "task_struct.tgid",
    "TASK_REAL_PARENT": "task_struct.real_parent",
    "TASK_MM": "task_struct.mm",
    "TASK_COMM": "task_struct.comm",
    "TASK_CRED": "task_struct.cred",
    "CRED_UID": "cred.uid.val",
    "MM_EXE_FILE": "mm_struct.exe_file",
    "MM_ARG_START": "mm_struct.arg_start",
    "MM_ARG_END": "mm_struct.arg_end",
    "FILE_INODE": "file.f_inode",
    "FILE_MNT": "file.f_path.mnt",
    "FILE_DENTRY": "file.f_path.dentry",
    "INODE_INO": "inode.i_ino",
    "INODE_SB": "inode.i_sb",
    "INODE_NLINK": "inode.i_nlink",
    "INODE_CTIME_SEC": ("inode.i_ctime_sec", "inode.__i_ctime.tv_sec", "inode.i_ctime.tv_sec"),
    "INODE_CTIME_NSEC": ("inode.i_ctime_nsec", "inode.__i_ctime.tv_nsec", "inode.i_ctime.tv_nsec"),
    "SB_DEV": "super_block.s_dev",
    "DENTRY_PARENT": "dentry.d_parent",
    "DENTRY_NAME": "dentry.d_name.name",
    "VFSMOUNT_ROOT": "vfsmount.mnt_root",
    "MOUNT_PARENT": "mount.mnt_parent",
    "MOUNT_MOUNTPOINT": "mount.mnt_mountpoint",
    "MOUNT_MNT": "mount.mnt",
    "SK_FAMILY": "sock_common.skc_family",
    "SK_DADDR": "sock_common.skc_daddr",
    "SK_RCV_SADDR": "sock_common.skc_rcv_saddr",
    "SK_DPORT": "sock_common.skc_dport",
    "SK_NUM": "sock_common.skc_num",
    "SK_PROT": "sock_common.skc_prot",
    "SK_NET": "sock_common.skc_net.net",
    "NET_INUM": "net.ns.inum",
    "NHC_DEV": "fib_nh_common.nhc_dev",
    "DEV_NET": "net_device.nd_net.net",
    "SK_V6_DADDR": "sock_common.skc_v6_daddr",
    "SK_V6_RCV_SADDR": "sock_common.skc_v6_rcv_saddr",
    "SOCK_PROTOCOL": "sock.sk_protocol",
    "SOCKET_SK": "socket.sk",
    "TCP_COPIED_SEQ": "tcp_sock.copied_seq",
    "TCP_RCV_NXT": "tcp_sock.rcv_nxt",
    "SOCK_SHUTDOWN": "sock.sk_shutdown",
    "FLOWI4_PROTO": "flowi4.__fl_common.flowic_proto",
    "FLOWI4_DADDR": "flowi4.daddr",
    "FLOWI4_DPORT": "flowi4.uli.ports.dport",
    "FLOWI4_SPORT": "flowi4.uli.ports.sport",
    "FLOWI6_PROTO": "flowi6.__fl_common.flowic_proto",
    "FLOWI6_DADDR": "flowi6.daddr",
    "FLOWI6_DPORT": "flowi6.uli.ports.dport",
    "FLOWI6_SPORT": "flowi6.uli.ports.sport",
    "SK_RECEIVE_QUEUE": "sock.sk_receive_queue",
    "SK_RECEIVE_QUEUE_PREV": "sock.sk_receive_queue.prev",
    "SKB_HEAD": "sk_buff.head",
    "SKB_NETWORK_HEADER": "sk_buff.network_header",
    "SKB_TRANSPORT_HEADER": "sk_buff.transport_header",
}


# fields read together on hot paths with one probe read: span -> its fields
# (each probe read costs about as much as a map lookup)
KERNEL_SPANS = {
    "SK": ("SK_DADDR", "SK_RCV_SADDR", "SK_DPORT", "SK_NUM", "SK_FAMILY", "SK_PROT", "SK_V6_DADDR",
           "SK_V6_RCV_SADDR"),
    "FLOW4": ("FLOWI4_PROTO", "FLOWI4_DADDR", "FLOWI4_DPORT", "FLOWI4_SPORT"),
    "FLOW6": ("FLOWI6_PROTO", "FLOWI6_DADDR", "FLOWI6_DPORT", "FLOWI6_SPORT"),
}
SPAN_MAX = 128


def kernel_field(btf: BTF, paths) -> "Field":
    """The first of a field's alternative paths that this kernel has."""
    paths = (paths,) if isinstance(paths, str) else paths
    for path in paths[:-1]:
        try:
            return btf.field(path)
        except PicosnitchError:
            continue
    return btf.field(paths[-1])


def offset_defines(btf: BTF) -> str:
    """#defines for every KERNEL_FIELDS entry: OFF_X, a typed reader F_X(p)
    and, for programs whose pointers the verifier knows the type of (typed
    tracepoints), a direct load D_X(p); for each span, its start and length
    (a multiple of 8: spans are read into u64 arrays, which keeps stack reads
    aligned), and S_X(buf) for its fields."""
    lines, fields = [], {macro: kernel_field(btf, path) for macro, path in KERNEL_FIELDS.items()}
    for macro, f in fields.items():
        lines.append(f"#define OFF_{macro} {f.offset}")
        if f.bits:
            lines.append(f"#define F_{macro}(p) ((read_u32((p), {f.offset}) >> {f.shift}) & {(1 << f.bits) - 1})")
        elif f.size in (1, 2, 4, 8):
            lines.append(f"#define F_{macro}(p) read_u{8 * f.size}((p), {f.offset})")
            lines.append(f"#define D_{macro}(p) (*(volatile u{8 * f.size} *)((u8 *)(p) + {f.offset}))")
    for span, members in KERNEL_SPANS.items():
        start = min(fields[m].offset for m in members) // 8 * 8
        length = (max(fields[m].offset + fields[m].size for m in members) - start + 7) // 8 * 8
        if length > SPAN_MAX or any(fields[m].bits for m in members):
            raise PicosnitchError(f"kernel BTF: the fields of {span} are not together ({length} bytes)")
        lines += [f"#define SPAN_{span}_START {start}", f"#define SPAN_{span}_LEN {length}"]
        for m in members:
            ctype = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}.get(fields[m].size)
            if ctype:
                lines.append(f"#define S_{m}(buf) (*({ctype} *)((u8 *)(buf) + {fields[m].offset - start}))")
            lines.append(f"#define SOFF_{m} {fields[m].offset - start}")
    return "\n".join(lines)


# Kernel memory readers and the BTF offsets: F_<FIELD>(p) reads a field,
# read_ptr(p, FIELD) follows a pointer field. Shared by the program below and
# by the offset self-check in the tests.
BPF_PRELUDE = r"""
static __always_inline u64 read_u64(void *p, long off) { u64 v = 0; bpf_probe_read_kernel(&v, 8, p + off); return v; }
static __always_inline u32 read_u32(void *p, long off) { u32 v = 0; bpf_probe_read_kernel(&v, 4, p + off); return v; }
static __always_inline u16 read_u16(void *p, long off) { u16 v = 0; bpf_probe_read_kernel(&v, 2, p + off); return v; }
static __always_inline u8 read_u8(void *p, long off) { u8 v = 0; bpf_probe_read_kernel(&v, 1, p + off); return v; }
#define read_ptr(p, field) ((void *)F_##field(p))
"""


def bpf_prelude(btf: BTF) -> str:
    return BPF_PRELUDE + offset_defines(btf) + "\n"


# The BPF program. $NAMES are filled by bpf_text(), in one place. Hooks are
# HOOK(tracepoint) functions, attached by name once the perf buffers are in
# place (CAPTURE_MODES), so that no event is sent before anyone can receive it.
BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>

#define PS_AF_UNIX 1
#define PS_AF_INET 2
#define PS_AF_INET6 10
#define PS_AF_NETLINK 16
#define PS_MSG_PEEK 2
#define PS_TCP 6
#define PS_IS_UDP(proto) ((proto) == 17 || (proto) == 136)   /* UDP, UDP-Lite: ports */
#define PS_TCP_ESTABLISHED 1
#define PS_TCP_SYN_SENT 2
#define PS_TCP_CLOSE 7
#define PS_RCV_SHUTDOWN 1
#define DIR_SEND 0
#define DIR_RECV 1
#define PATH_DEPTH $PATH_DEPTH
#define NAME_LEN $NAME_LEN
#define LEAF_LEN $LEAF_LEN
#define ARGS_LEN $ARGS_LEN
#define DNS_ADDRS $DNS_ADDRS
#define EXE_REPLACED $EXE_REPLACED
#define EXEC_ROOT $EXEC_ROOT
#define EXEC_NO_DIR $EXEC_NO_DIR
#define EXEC_NAME_CUT $EXEC_NAME_CUT
#define EXEC_ARGS_CUT $EXEC_ARGS_CUT
#define HOOK(event) int hook__##event(struct bpf_raw_tracepoint_args *ctx)
$EVENT_KINDS
$STAT_INDEXES
$PRELUDE
$STRUCTS
struct conn_event_t { struct event_hdr_t hdr; struct conn_t conn; };
struct exec_event_t { struct event_hdr_t hdr; struct exec_t exec; };
struct dns_event_t { struct event_hdr_t hdr; struct dns_t dns; };
/* the peer of a datagram on an unconnected socket: sent by a thread, queued on a socket */
struct peer_t { u8 addr[16]; u16 port; u16 pad[3]; };
/* a send in flight, as its thread, local port (UDP) and protocol name it; a
   flow that only route lookups name also carries its network namespace, so
   that lookups for packets handled in the same thread's context in another
   namespace (a veth peer's replies) never pass for it */
struct flow_t { u64 thread; u16 sport; u16 proto; u32 net; };
struct gai_t { u64 host; u64 res; };
/* who started a TCP connect whose local port is not chosen yet */
struct owner_t { u64 exe; u32 pid; u32 uid; };

BPF_PERF_OUTPUT(events);
BPF_ARRAY(epoch, struct epoch_t, 1);    /* the window being filled: which maps (epoch), its number */
BPF_HASH(conns0, struct conn_key_t, struct conn_val_t, $MAX_CONNS);
BPF_HASH(conns1, struct conn_key_t, struct conn_val_t, $MAX_CONNS);
/* connections of each window's hash map so far (the reader ends a window
   early when they near its size) */
BPF_ARRAY(nconns, u64, 2);
/* where the connections that find no room of their own go: one entry per
   process, user and protocol (a key with no socket, ports or addresses),
   counting their bytes and connections; merged_keys: the window in which a
   connection (its whole key) was last counted */
BPF_HASH(merged0, struct conn_key_t, struct merged_t, $MAX_MERGED);
BPF_HASH(merged1, struct conn_key_t, struct merged_t, $MAX_MERGED);
BPF_TABLE("lru_hash", struct conn_key_t, u32, merged_keys, $MAX_CONNS);
/* the process last announced (CONN event) in each slot, and in which window */
#define ANNOUNCE_BITS 12
struct announced_t { u64 exe; u32 pid; u32 window; };
BPF_ARRAY(announced, struct announced_t, 1 << ANNOUNCE_BITS);
/* the typed tracepoints' fast path: a window's connections in the slots of
   an array, its first half for epoch 0, its second for epoch 1
   (nslots[epoch] taken so far); the hash maps above take what does not fit.
   One array, so that every lookup in it names one map, which the verifier
   inlines: a lookup in one of two maps, chosen by the epoch, is an indirect
   call (about 55 ns a send where returns are costly, as with SRSO's) */
BPF_ARRAY(slots, struct slot_t, 2 * $MAX_SLOTS);
BPF_ARRAY(nslots, u64, 2);
static __always_inline struct slot_t *slot_at(u32 e, u32 at) {
    u32 i = (e ? $MAX_SLOTS : 0) + at;
    return at < $MAX_SLOTS ? slots.lookup(&i) : 0;
}
BPF_TABLE("lru_hash", u64, struct peer_t, recv_peers, $MAX_CONNS);     /* by socket */
BPF_TABLE("lru_hash", u64, u32, tcp_seq, $MAX_CONNS);
BPF_TABLE("lru_hash", u64, struct owner_t, connects, $MAX_CONNS);    /* by socket */
BPF_HASH(gai, u64, struct gai_t, 1024);
BPF_ARRAY(stats, u64, $N_STATS);
/* the typed tracepoint mode's route hooks, attached while unconnected sends
   that no cgroup hook names (ICMP, raw) go on: [0] 0 detached, 1 asked for,
   2 attached; [1] such sends so far */
BPF_ARRAY(route_use, u64, 2);
$PEER_STORE
BPF_PERCPU_ARRAY(scratch, struct exec_event_t, 1);
/* the executable each process was started with, recorded at its exec and
   inherited at fork: a process may replace /proc/PID/exe (prctl PR_SET_MM),
   but not what it ran */
struct exe_rec_t { u64 file; u64 ino; u32 dev; u32 pad; };
BPF_TABLE("lru_hash", u32, struct exe_rec_t, execd, $MAX_PROCS);
/* the executable image of the task last seen on a CPU, valid while the exec
   generation (bumped at every exec and fork) is unchanged */
struct exe_cache_t { u64 task; u64 gen; u64 exe; };
BPF_PERCPU_ARRAY(exe_cache, struct exe_cache_t, 1);
BPF_ARRAY(exec_gen, u64, 1);

static __always_inline void stat_add(u32 index, u64 n) {
    u64 *v = stats.lookup(&index);
    if (v) __sync_fetch_and_add(v, n);
}

/* hand an event to user space; one that cannot go is counted, never silent */
static __always_inline void submit(void *ctx, void *ev, u32 size) {
    if (events.perf_submit(ctx, ev, size) < 0) stat_add(STAT_EVENTS_UNSENT, 1);
}

static __always_inline u16 swap16(u16 v) { return (v >> 8) | (v << 8); }

static __always_inline void file_id(void *file, u32 *dev, u64 *ino) {
    void *inode = read_ptr(file, FILE_INODE);
    *ino = F_INODE_INO(inode);
    *dev = F_SB_DEV(read_ptr(inode, INODE_SB));
}

/* device and inode of the executable a task's process ran (0 for kernel
   threads); EXE_REPLACED when its exe_file is no longer that one */
static __always_inline u32 exe_id(void *task, u32 *dev, u64 *ino) {
    void *mm = read_ptr(task, TASK_MM);
    void *file = mm ? read_ptr(mm, MM_EXE_FILE) : 0;
    u32 tgid = F_TASK_TGID(task);
    struct exe_rec_t *rec = execd.lookup(&tgid);
    if (rec) {
        *dev = rec->dev;
        *ino = rec->ino;
        return rec->file != (u64)file ? EXE_REPLACED : 0;
    }
    if (file) file_id(file, dev, ino);   /* running since before picosnitch */
    return 0;
}

static __always_inline void fill_proc(void *task, struct proc_t *p) {
    void *parent = read_ptr(task, TASK_REAL_PARENT);
    void *grandparent = read_ptr(parent, TASK_REAL_PARENT);
    p->pid = F_TASK_TGID(task);
    p->ppid = F_TASK_TGID(parent);
    p->gppid = F_TASK_TGID(grandparent);
    p->uid = bpf_get_current_uid_gid();
    p->flags = exe_id(task, &p->dev, &p->ino);
    exe_id(parent, &p->pdev, &p->pino);
    exe_id(grandparent, &p->gpdev, &p->gpino);
    bpf_probe_read_kernel_str(p->comm, sizeof(p->comm), task + OFF_TASK_COMM);
}

static __always_inline void emit_proc(void *ctx, u32 kind, void *task) {
    struct event_hdr_t hdr = {};
    hdr.kind = kind;
    hdr.time = bpf_ktime_get_ns();
    fill_proc(task, &hdr.proc);
    submit(ctx, &hdr, sizeof(hdr));
}

/* ---- connections: bytes summed per key in the map of the current window ---- */

/* the socket's part of a key, from one read of the start of sock_common:
   protocol, family, addresses and ports; -1 for local IPC */
static __always_inline int sock_tuple(void *sk, struct conn_key_t *key) {
    u64 s[SPAN_SK_LEN / 8];
    bpf_probe_read_kernel(s, sizeof(s), sk + SPAN_SK_START);
    u16 family = S_SK_FAMILY(s);
    if (family == PS_AF_UNIX || family == PS_AF_NETLINK) return -1;
    key->sk = (u64)sk;
    key->prot = S_SK_PROT(s);
    key->family = family;
    key->lport = S_SK_NUM(s);
    key->rport = swap16(S_SK_DPORT(s));
    if (family == PS_AF_INET) {
        __builtin_memcpy(key->raddr, (u8 *)s + SOFF_SK_DADDR, 4);
        __builtin_memcpy(key->laddr, (u8 *)s + SOFF_SK_RCV_SADDR, 4);
    } else if (family == PS_AF_INET6) {
        __builtin_memcpy(key->raddr, (u8 *)s + SOFF_SK_V6_DADDR, 16);
        __builtin_memcpy(key->laddr, (u8 *)s + SOFF_SK_V6_RCV_SADDR, 16);
    }
    return 0;
}

/* who a key's process is, from the task it runs in: its first key of a
   window (announce) */
static __always_inline void emit_conn(void *ctx, struct conn_key_t *key) {
    struct conn_event_t ev = {};
    ev.hdr.kind = EV_CONN;
    ev.hdr.time = bpf_ktime_get_ns();
    ev.conn.key = *key;
    ev.conn.info.proto = key->sk ? F_SOCK_PROTOCOL((void *)key->sk) : 0;
    void *task = (void *)bpf_get_current_task();
    fill_proc(task, &ev.hdr.proc);
    exe_id(task, &ev.conn.info.dev, &ev.conn.info.ino);
    submit(ctx, &ev, sizeof(ev));
}

/* a key's process, announced once a window: a key of a process already
   announced in this window needs no event (a slot shared by two processes
   only costs an event more) */
static __always_inline void announce(void *ctx, struct conn_key_t *key, u32 window) {
    u32 at = (key->pid * 0x9E3779B97F4A7C15ULL) >> (64 - ANNOUNCE_BITS);     /* (exe may be a pointer: no math) */
    struct announced_t *a = announced.lookup(&at);
    if (a && a->exe == key->exe && a->pid == key->pid && a->window == window) return;
    if (a) {
        a->exe = key->exe;
        a->pid = key->pid;
        a->window = window;
    }
    emit_conn(ctx, key);
}

/* the window being filled: (maps, number) */
static __always_inline u64 window_state(void) {
    u32 zero = 0;
    struct epoch_t *ep = epoch.lookup(&zero);
    return ep ? *(volatile u64 *)ep : 0;
}

/* bytes of a key that found no room of their own: added to its process's
   entry of merged connections, the key counted once a window */
static __always_inline int merge(void *ctx, struct conn_key_t *key, int dir, u64 bytes, u32 e, u32 window,
                                 int announcing) {
    struct conn_key_t m = {};
    m.exe = key->exe;
    m.pid = key->pid;
    m.uid = key->uid;
    m.prot = key->prot;
    m.family = key->family;
    struct merged_t *v = e ? merged1.lookup(&m) : merged0.lookup(&m);
    if (!v) {
        struct merged_t init = {};
        if (e) merged1.insert(&m, &init);
        else merged0.insert(&m, &init);
        v = e ? merged1.lookup(&m) : merged0.lookup(&m);
        if (!v) {
            stat_add(STAT_MAP_FULL, 1);
            stat_add(STAT_BYTES_UNCOUNTED, bytes);
            return 0;
        }
    }
    u32 *seen = merged_keys.lookup(key);
    if (!seen || *seen != window) {
        merged_keys.update(key, &window);
        __sync_fetch_and_add(&v->conns, 1);
        if (announcing) announce(ctx, &m, window);
    }
    if (dir == DIR_SEND) __sync_fetch_and_add(&v->send, bytes);
    else __sync_fetch_and_add(&v->recv, bytes);
    return 0;
}

/* add bytes to the key's entry in the window's hash map; a new entry's
   process is announced if `announcing` (in the task that moved the bytes),
   and a key with no room goes to its process's merged entry */
static __always_inline int account(void *ctx, struct conn_key_t *key, int dir, u64 bytes, int announcing) {
    u64 state = window_state();
    u32 e = (u32)state, window = state >> 32;
    struct conn_val_t *v = e ? conns1.lookup(key) : conns0.lookup(key);
    if (!v) {
        struct conn_val_t init = {};
        int err = e ? conns1.insert(key, &init) : conns0.insert(key, &init);
        if (err == 0) {
            u64 *n = nconns.lookup(&e);
            if (n) __sync_fetch_and_add(n, 1);
            if (announcing) announce(ctx, key, window);
        }
        v = e ? conns1.lookup(key) : conns0.lookup(key);
        if (!v) return merge(ctx, key, dir, bytes, e, window, announcing);
    }
    if (dir == DIR_SEND) __sync_fetch_and_add(&v->send, bytes);
    else __sync_fetch_and_add(&v->recv, bytes);
    return 0;
}

static __always_inline void bump_exec_gen(void) {
    u32 zero = 0;
    u64 *gen = exec_gen.lookup(&zero);
    if (gen) __sync_fetch_and_add(gen, 1);
}

/* the current task's executable image (its struct file), cached per CPU */
static __always_inline u64 current_exe(void) {
    u32 zero = 0;
    u64 task = bpf_get_current_task();
    struct exe_cache_t *cache = exe_cache.lookup(&zero);
    u64 *gen = exec_gen.lookup(&zero);
    if (cache && gen && cache->task == task && cache->gen == *gen) return cache->exe;
    void *mm = read_ptr((void *)task, TASK_MM);
    u64 exe = mm ? (u64)read_ptr(mm, MM_EXE_FILE) : 0;
    if (cache && gen) {
        cache->task = task;
        cache->gen = *gen;
        cache->exe = exe;
    }
    return exe;
}

/* the key for the current task's traffic on a socket; -1 for local IPC */
static __always_inline int sock_key(void *sk, struct conn_key_t *key) {
    if (sock_tuple(sk, key)) return -1;
    key->exe = current_exe();
    key->pid = bpf_get_current_pid_tgid() >> 32;
    key->uid = bpf_get_current_uid_gid();
    return 0;
}

/* TCP receive bytes are the advance of copied_seq since the last look, so that
   recvmsg, splice and zero-copy reads all count, and none twice (the FIN takes
   one sequence number: not a byte); a socket without a baseline (older than
   picosnitch) starts one at its next recvmsg */
static __always_inline u64 tcp_consumed(void *sk, u64 fallback) {
    u64 id = (u64)sk;
    u32 seq = F_TCP_COPIED_SEQ(sk);
    u32 *last = tcp_seq.lookup(&id);
    if (!last) {
        if (fallback) tcp_seq.update(&id, &seq);
        return fallback;
    }
    u32 delta = seq - *last;
    *last = seq;
    if (delta && (F_SOCK_SHUTDOWN(sk) & PS_RCV_SHUTDOWN) && seq == F_TCP_RCV_NXT(sk)) delta--;
    return delta;
}

/* an unconnected socket: the peer of this datagram, as its send noted it, or
   as its receive queue had it */
static __always_inline void datagram_peer(void *ctx, void *sk, struct conn_key_t *key, u16 proto, int dir) {
    u64 sk_id = (u64)sk;
    struct flow_t flow = {this_thread(ctx), 0, proto};
    if (PS_IS_UDP(flow.proto)) flow.sport = key->lport;
    else flow.net = F_NET_INUM((void *)F_SK_NET(sk));
    struct peer_t noted, *peer = dir != DIR_SEND ? recv_peers.lookup(&sk_id) : noted_peer(&flow, &noted) ? &noted : 0;
    if (peer) {                                /* peers are noted as IPv6 (v4-mapped) */
        if (key->family == PS_AF_INET) __builtin_memcpy(key->raddr, &peer->addr[12], 4);
        else __builtin_memcpy(key->raddr, peer->addr, 16);
        key->rport = peer->port;
    }
}

/* a socket moved bytes: called by the raw tracepoints or the kprobe fallback */
static __always_inline int on_sock(void *ctx, void *sk, long ret, int flags, int dir) {
    if (ret <= 0 || !sk || (dir == DIR_RECV && (flags & PS_MSG_PEEK))) return 0;
    struct conn_key_t key = {};
    if (sock_key(sk, &key)) return 0;
    if (key.family != PS_AF_INET && key.family != PS_AF_INET6) return account(ctx, &key, dir, ret, 1);
    if (key.rport) {               /* connected: the socket knows its peer */
        if (dir == DIR_RECV && F_SOCK_PROTOCOL(sk) == PS_TCP) ret = tcp_consumed(sk, ret);
        return ret ? account(ctx, &key, dir, ret, 1) : 0;
    }
    datagram_peer(ctx, sk, &key, F_SOCK_PROTOCOL(sk), dir);
    return account(ctx, &key, dir, ret, 1);
}

/* route lookups name the destination of an unconnected send (IPv4, IPv6);
   noted by thread and flow, so that lookups for other packets handled in the
   same context (ICMP errors, input routes) do not overwrite it */
static __always_inline void note_send_peer(struct flow_t *id, struct peer_t *peer, u32 net) {
    if (!id->proto) return;                             /* input route: not a send */
    id->sport = PS_IS_UDP(id->proto) ? swap16(id->sport) : 0;
    id->net = PS_IS_UDP(id->proto) ? 0 : net;
    note_peer(id, peer);
}

HOOK(fib_table_lookup) {
    if ((int)ctx->args[3]) return 0;                    /* only the lookup that found the route */
    u64 f[SPAN_FLOW4_LEN / 8];
    bpf_probe_read_kernel(f, sizeof(f), (void *)ctx->args[1] + SPAN_FLOW4_START);
    struct flow_t id = {this_thread(ctx), S_FLOWI4_SPORT(f), S_FLOWI4_PROTO(f)};
    struct peer_t peer = {};
    peer.addr[10] = peer.addr[11] = 0xff;              /* as ::ffff:a.b.c.d */
    __builtin_memcpy(&peer.addr[12], (u8 *)f + SOFF_FLOWI4_DADDR, 4);
    peer.port = swap16(S_FLOWI4_DPORT(f));
    void *dev = (void *)F_NHC_DEV((void *)ctx->args[2]);
    note_send_peer(&id, &peer, dev ? F_NET_INUM((void *)F_DEV_NET(dev)) : 0);
    return 0;
}

HOOK(fib6_table_lookup) {
    u64 f[SPAN_FLOW6_LEN / 8];
    bpf_probe_read_kernel(f, sizeof(f), (void *)ctx->args[3] + SPAN_FLOW6_START);
    struct flow_t id = {this_thread(ctx), S_FLOWI6_SPORT(f), S_FLOWI6_PROTO(f)};
    struct peer_t peer = {};
    __builtin_memcpy(peer.addr, (u8 *)f + SOFF_FLOWI6_DADDR, 16);
    peer.port = swap16(S_FLOWI6_DPORT(f));
    note_send_peer(&id, &peer, F_NET_INUM((void *)ctx->args[0]));
    return 0;
}

/* a datagram queued on an unconnected socket (softirq): its sender, from the
   tail of the receive queue, is the peer of the socket's next receive */
HOOK(sk_data_ready) {
    void *sk = (void *)ctx->args[0];
    u64 span[SPAN_SK_LEN / 8];                          /* port and family in one read */
    bpf_probe_read_kernel(span, sizeof(span), sk + SPAN_SK_START);
    u16 family = S_SK_FAMILY(span);
    if (S_SK_DPORT(span) || (family != PS_AF_INET && family != PS_AF_INET6) || F_SOCK_PROTOCOL(sk) == PS_TCP)
        return 0;
    void *skb = read_ptr(sk, SK_RECEIVE_QUEUE_PREV);
    if (!skb || skb == sk + OFF_SK_RECEIVE_QUEUE) return 0;     /* empty queue */
    void *head = read_ptr(skb, SKB_HEAD);
    void *ip = head + F_SKB_NETWORK_HEADER(skb);
    void *l4 = head + F_SKB_TRANSPORT_HEADER(skb);
    u8 version = read_u8(ip, 0) >> 4, proto;
    struct peer_t peer = {};
    if (version == 4) {
        proto = read_u8(ip, 9);
        peer.addr[10] = peer.addr[11] = 0xff;
        bpf_probe_read_kernel(&peer.addr[12], 4, ip + 12);
    } else if (version == 6) {
        proto = read_u8(ip, 6);
        bpf_probe_read_kernel(peer.addr, 16, ip + 8);
    } else {
        return 0;
    }
    if (PS_IS_UDP(proto)) peer.port = swap16(read_u16(l4, 0));
    u64 id = (u64)sk;
    recv_peers.update(&id, &peer);
    return 0;
}

/* TCP state changes. A connect is a connection even if it never moves a byte,
   but at SYN_SENT its local port may not be chosen yet: the connecting task
   is noted (and its process announced), and when the connect is answered
   (ESTABLISHED) or refused (CLOSE), its key is complete and opened for that
   task. ESTABLISHED also starts the copied_seq baseline, CLOSE ends it. */
static __always_inline void open_connect(void *ctx, void *sk) {
    u64 sk_id = (u64)sk;
    struct owner_t *owner = connects.lookup(&sk_id);
    if (!owner) return;
    struct conn_key_t key = {};
    if (!sock_tuple(sk, &key)) {
        key.exe = owner->exe;
        key.pid = owner->pid;
        key.uid = owner->uid;
        account(ctx, &key, DIR_SEND, 0, 0);     /* (not in the task: announced at its connect) */
    }
    connects.delete(&sk_id);
}

HOOK(inet_sock_set_state) {
    void *sk = (void *)ctx->args[0];
    int old = (int)ctx->args[1], state = (int)ctx->args[2];
    u64 sk_id = (u64)sk;
    if (F_SOCK_PROTOCOL(sk) != PS_TCP) return 0;
    if (state == PS_TCP_SYN_SENT) {
        struct conn_key_t key = {};
        if (sock_key(sk, &key)) return 0;
        struct owner_t owner = {key.exe, key.pid, key.uid};
        connects.update(&sk_id, &owner);
        announce(ctx, &key, window_state() >> 32);
    } else if (state == PS_TCP_ESTABLISHED) {
        u32 seq = F_TCP_COPIED_SEQ(sk);
        tcp_seq.update(&sk_id, &seq);
        if (old == PS_TCP_SYN_SENT) open_connect(ctx, sk);
    } else if (state == PS_TCP_CLOSE) {
        tcp_seq.delete(&sk_id);
        if (old == PS_TCP_SYN_SENT) open_connect(ctx, sk);
    }
    return 0;
}

/* TCP reads that bypass sock_recvmsg (splice, zero-copy receive) */
HOOK(tcp_rcv_space_adjust) {
    void *sk = (void *)ctx->args[0];
    u64 bytes = tcp_consumed(sk, 0);
    struct conn_key_t key = {};
    if (bytes && !sock_key(sk, &key)) account(ctx, &key, DIR_RECV, bytes, 1);
    return 0;
}

$SOCK_HOOKS

/* ---- processes ---- */

/* the executable's path, leaf first, walking dentries and mounts to the root;
   a step that crosses a mount leaves its slot empty; a file in no directory
   (a memfd) is named by its own dentry. The file's own name goes whole into
   leaf; a directory's, in a slot of NAME_LEN bytes */
static __always_inline void path_name(struct exec_t *ex, int i, void *dentry) {
    void *name = read_ptr(dentry, DENTRY_NAME);
    if (i == 0)                 /* the file's own name: whole */
        bpf_probe_read_kernel_str(ex->leaf, LEAF_LEN, name);
    else if (bpf_probe_read_kernel_str(ex->path[i], NAME_LEN, name) >= NAME_LEN)
        ex->complete |= EXEC_NAME_CUT;      /* (a name of NAME_LEN - 1 bytes, or longer) */
}

static __always_inline void exe_path(void *file, struct exec_t *ex) {
    void *dentry = read_ptr(file, FILE_DENTRY);
    void *vfsmnt = read_ptr(file, FILE_MNT);
    void *mnt = vfsmnt - OFF_MOUNT_MNT;
    ex->leaf[0] = 0;
    for (int i = 0; i < PATH_DEPTH; i++) {
        void *root = read_ptr(vfsmnt, VFSMOUNT_ROOT);
        void *parent = read_ptr(dentry, DENTRY_PARENT);
        ex->depth = i;
        ex->path[i][0] = 0;
        if (dentry == parent && dentry != root) {
            path_name(ex, i, dentry);
            ex->depth = i + 1;
            ex->complete |= EXEC_NO_DIR;
            return;
        }
        if (dentry == root) {
            void *mnt_parent = read_ptr(mnt, MOUNT_PARENT);
            if (mnt_parent == mnt) {
                ex->complete |= EXEC_ROOT;
                return;
            }
            dentry = read_ptr(mnt, MOUNT_MOUNTPOINT);
            mnt = mnt_parent;
            vfsmnt = mnt + OFF_MOUNT_MNT;
            continue;
        }
        path_name(ex, i, dentry);
        dentry = parent;
    }
    ex->depth = PATH_DEPTH;
}

HOOK(sched_process_exec) {
    u32 zero = 0;
    struct exec_event_t *ev = scratch.lookup(&zero);
    if (!ev) return 0;
    void *task = (void *)bpf_get_current_task();
    bump_exec_gen();
    void *mm = read_ptr(task, TASK_MM);
    void *file = mm ? read_ptr(mm, MM_EXE_FILE) : 0;
    u32 tgid = F_TASK_TGID(task);
    struct exe_rec_t rec = {.file = (u64)file};
    if (file) file_id(file, &rec.dev, &rec.ino);
    execd.update(&tgid, &rec);
    __builtin_memset(&ev->hdr, 0, sizeof(ev->hdr));   /* the rest has explicit lengths */
    ev->exec.complete = 0;
    ev->exec.ctime_sec = ev->exec.ctime_nsec = ev->exec.nlink = 0;
    ev->hdr.kind = EV_EXEC;
    ev->hdr.time = bpf_ktime_get_ns();
    fill_proc(task, &ev->hdr.proc);
    u64 start = F_MM_ARG_START(mm), len = F_MM_ARG_END(mm) - start;
    if (len > ARGS_LEN - 1) {
        len = ARGS_LEN - 1;
        ev->exec.complete = EXEC_ARGS_CUT;
    }
    ev->exec.args_len = len & (ARGS_LEN - 1);
    bpf_probe_read_user(ev->exec.args, len & (ARGS_LEN - 1), (void *)start);
    if (file) {
        void *inode = read_ptr(file, FILE_INODE);
        ev->exec.ctime_sec = F_INODE_CTIME_SEC(inode);
        ev->exec.ctime_nsec = F_INODE_CTIME_NSEC(inode);
        ev->exec.nlink = F_INODE_NLINK(inode);
        exe_path(file, &ev->exec);
    }
    submit(ctx, ev, sizeof(*ev));
    return 0;
}

HOOK(sched_process_fork) {
    void *parent = (void *)ctx->args[0], *child = (void *)ctx->args[1];
    bump_exec_gen();            /* a new task may reuse a freed task's address */
    u32 ptgid = F_TASK_TGID(parent), tgid = F_TASK_TGID(child);
    if (F_TASK_PID(child) != tgid) return 0;     /* a thread */
    struct exe_rec_t *rec = execd.lookup(&ptgid);
    if (rec) {
        struct exe_rec_t copy = *rec;
        execd.update(&tgid, &copy);
    } else {
        execd.delete(&tgid);
    }
    emit_proc(ctx, EV_FORK, child);
    return 0;
}

HOOK(sched_process_exit) {
    void *task = (void *)bpf_get_current_task();
    if (F_TASK_PID(task) != F_TASK_TGID(task)) return 0;
    emit_proc(ctx, EV_EXIT, task);
    u32 tgid = F_TASK_TGID(task);
    execd.delete(&tgid);
    return 0;
}

/* ---- domains: getaddrinfo(host, service, hints, res) answers ---- */

static __always_inline u64 user_ptr(u64 uaddr) {
    u64 p = 0;
    bpf_probe_read_user(&p, 8, (void *)uaddr);
    return p;
}

int on_getaddrinfo(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct gai_t g = {PT_REGS_PARM1(ctx), PT_REGS_PARM4(ctx)};
    gai.update(&id, &g);
    return 0;
}

int on_getaddrinfo_return(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct gai_t *g = gai.lookup(&id);
    if (!g) return 0;
    u64 host = g->host, ai = user_ptr(g->res);
    gai.delete(&id);
    if (PT_REGS_RC(ctx) != 0 || !host) return 0;
    u32 zero = 0;
    struct exec_event_t *buf = scratch.lookup(&zero);
    if (!buf) return 0;
    struct dns_event_t *ev = (struct dns_event_t *)buf;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->hdr.kind = EV_DNS;
    ev->hdr.time = bpf_ktime_get_ns();
    fill_proc((void *)bpf_get_current_task(), &ev->hdr.proc);
    bpf_probe_read_user_str(ev->dns.host, sizeof(ev->dns.host), (void *)host);
    for (int i = 0; i < DNS_ADDRS && ai; i++) {
        u64 sa = user_ptr(ai + 24);                 /* struct addrinfo: ai_addr */
        u16 family = 0;
        bpf_probe_read_user(&family, 2, (void *)sa);
        ev->dns.families[i] = family;
        if (family == PS_AF_INET) bpf_probe_read_user(ev->dns.addrs[i], 4, (void *)(sa + 4));
        else if (family == PS_AF_INET6) bpf_probe_read_user(ev->dns.addrs[i], 16, (void *)(sa + 8));
        ev->dns.count = i + 1;
        ai = user_ptr(ai + 40);                      /* ai_next */
    }
    submit(ctx, ev, sizeof(*ev));
    return 0;
}
"""

# where a thread's cgroup hooks or route lookups note the destinations of its
# datagrams, for the send that follows: an array by thread and flow (typed
# tracepoints), the task's own storage (raw tracepoints: Linux >= 5.11, so
# always with the sock tracepoints), else a hash by thread and flow (kprobes)
PEER_STORES = {
    # notes in an array indexed by a hash of the thread and the flow: a cgroup
    # hook (or a route lookup) notes the peer in the send call that the sock
    # tracepoint then ends, with no helper beyond the thread's id; the thread
    # id guards a note, cleared while it is written and read again after it
    # is copied
    "thread": r"""
#define NOTE_BITS 14
/* the thread a hook runs in, named by its kernel stack without a helper call
   (one costs more than the rest of a cgroup hook where returns are costly,
   as with SRSO's): the address of ctx, on that stack for tracepoints and
   cgroup hooks, without its low STACK_BITS. A 64-bit kernel's stacks are at
   least 1 << STACK_BITS bytes and aligned to their size, so two live threads
   never share a name; a note is written and read in one send call, so a
   dead thread's name taken by a new one never matches its notes. (The
   address is stored and read back to be used as a number.) */
#define STACK_BITS 14
BPF_PERCPU_ARRAY(here, u64, 1);
static __always_inline u64 this_thread(void *ctx) {
    u32 zero = 0;
    u64 *at = here.lookup(&zero);
    if (!at) return 0;
    *(volatile u64 *)at = (u64)ctx;
    return *(volatile u64 *)at >> STACK_BITS;
}
struct thread_note_t { struct flow_t flow; struct peer_t peer; };
BPF_ARRAY(thread_notes, struct thread_note_t, 1 << NOTE_BITS);
static __always_inline u32 note_index(struct flow_t *id) {
    u64 h = id->thread ^ (u64)id->sport << 48 ^ (u64)id->proto << 32 ^ (u64)id->net << 16;
    return (h * 0x9E3779B97F4A7C15ULL) >> (64 - NOTE_BITS);
}
static __always_inline int noted_peer(struct flow_t *id, struct peer_t *out) {
    u32 at = note_index(id);
    struct thread_note_t *n = thread_notes.lookup(&at);
    u64 *want = (u64 *)id;
    if (!n || n->flow.thread != want[0] || *(u64 *)&n->flow.sport != want[1]) return 0;
    *out = n->peer;
    return __sync_fetch_and_add(&n->flow.thread, 0) == id->thread;   /* (not rewritten meanwhile) */
}
static __always_inline void note_peer(struct flow_t *id, struct peer_t *peer) {
    u32 at = note_index(id);
    struct thread_note_t *n = thread_notes.lookup(&at);
    if (!n) return;
    u64 *want = (u64 *)id, *was = (u64 *)&n->peer, *now = (u64 *)peer;
    if (n->flow.thread == want[0] && *(u64 *)&n->flow.sport == want[1]
        && was[0] == now[0] && was[1] == now[1] && was[2] == now[2]) return;   /* (noted already) */
    __sync_lock_test_and_set(&n->flow.thread, 0);
    *(u64 *)&n->flow.sport = want[1];
    n->peer = *peer;
    __sync_lock_test_and_set(&n->flow.thread, id->thread);
}
""",
    "task": r"""
#define PEER_SLOTS 8
static __always_inline u64 this_thread(void *ctx) { return 0; }    /* (the task's own storage names it) */
struct flow_note_t { u16 sport; u16 proto; u32 net; struct peer_t peer; };
struct send_notes_t { u32 next; u32 pad; struct flow_note_t slot[PEER_SLOTS]; };
BPF_TASK_STORAGE(send_notes, struct send_notes_t);
static __always_inline int noted_peer(struct flow_t *id, struct peer_t *out) {
    struct send_notes_t *n = send_notes.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!n) return 0;
    #pragma unroll
    for (int i = 0; i < PEER_SLOTS; i++)
        if (n->slot[i].sport == id->sport && n->slot[i].proto == id->proto && n->slot[i].net == id->net) {
            *out = n->slot[i].peer;
            return 1;
        }
    return 0;
}
/* the slot of this flow, else the oldest one */
static __always_inline void note_peer(struct flow_t *id, struct peer_t *peer) {
    struct send_notes_t *n = send_notes.task_storage_get(bpf_get_current_task_btf(), 0,
                                                         BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!n) return;
    u32 at = n->next;
    #pragma unroll
    for (int i = 0; i < PEER_SLOTS; i++)
        if (n->slot[i].sport == id->sport && n->slot[i].proto == id->proto && n->slot[i].net == id->net) at = i;
    if (at == n->next) n->next = (at + 1) % PEER_SLOTS;
    struct flow_note_t *slot = &n->slot[at % PEER_SLOTS];
    slot->sport = id->sport;
    slot->proto = id->proto;
    slot->net = id->net;
    __builtin_memcpy(slot->peer.addr, peer->addr, 16);
    slot->peer.port = peer->port;
}
""",
    "hash": r"""
BPF_TABLE("lru_hash", struct flow_t, struct peer_t, send_peers, $MAX_THREADS);
static __always_inline u64 this_thread(void *ctx) { return bpf_get_current_pid_tgid(); }
static __always_inline int noted_peer(struct flow_t *id, struct peer_t *out) {
    struct peer_t *noted = send_peers.lookup(id);
    if (noted) *out = *noted;
    return noted != 0;
}
static __always_inline void note_peer(struct flow_t *id, struct peer_t *peer) {
    struct peer_t *noted = send_peers.lookup(id);
    if (noted) {
        __builtin_memcpy(noted->addr, peer->addr, 16);
        noted->port = peer->port;
    } else {
        send_peers.update(id, peer);
    }
}
""",
}

# socket hooks: sock tracepoints (Linux >= 6.3), else kprobes on the send/receive path
SOCK_HOOKS = {
    # typed tracepoints (BTF): the socket and the task are pointers whose type
    # the verifier knows, read directly, with no helper call. A table by socket
    # remembers the slot each connection was last counted in; a send on a
    # known connection compares the socket and the task with that slot's key,
    # field by field, and adds. A new connection, or a change in any field,
    # takes a new slot. Unconnected UDP sends note their peer from cgroup
    # hooks, which run only for sends that carry an address; ICMP and raw
    # ones from route lookups, attached while such sends go on.
    "tracepoint": r"""
/* each socket's slot, in a table indexed by a hash of the socket's ports and
   remote IPv4 address (scalars: a pointer cannot be hashed): what a send
   finds there is checked against the slot's key, so that a stale or
   colliding entry only costs a new slot */
#define HELD_BITS 16
struct held_t { u64 sk; u64 slot; };        /* slot: window << 32 | index */
BPF_ARRAY(held, struct held_t, 1 << HELD_BITS);

static __always_inline void sock_tuple_btf(void *sk, struct conn_key_t *key) {
    u16 family = D_SK_FAMILY(sk);
    key->sk = (u64)sk;
    key->prot = D_SK_PROT(sk);
    key->family = family;
    key->lport = D_SK_NUM(sk);
    key->rport = swap16(D_SK_DPORT(sk));
    u32 *raddr = (u32 *)key->raddr, *laddr = (u32 *)key->laddr;
    if (family == PS_AF_INET) {
        raddr[0] = D_SK_DADDR(sk);
        laddr[0] = D_SK_RCV_SADDR(sk);
    } else if (family == PS_AF_INET6) {
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            raddr[i] = *(volatile u32 *)((u8 *)sk + OFF_SK_V6_DADDR + 4 * i);
            laddr[i] = *(volatile u32 *)((u8 *)sk + OFF_SK_V6_RCV_SADDR + 4 * i);
        }
    }
}

/* a key new to this socket (or to this window): a slot of its own, announced
   with an event; the hash map when every slot is taken */
static __always_inline int take_slot(void *ctx, struct held_t *held, struct conn_key_t *key, u32 e, u32 window,
                                     int dir, u64 bytes) {
    u64 *taken = nslots.lookup(&e);
    if (!taken) return account(ctx, key, dir, bytes, 1);
    u32 at = __sync_fetch_and_add(taken, 1);
    struct slot_t *slot = 0;
    slot = slot_at(e, at);
    if (!slot) return account(ctx, key, dir, bytes, 1);
    slot->key = *key;
    slot->send = dir == DIR_SEND ? bytes : 0;
    slot->recv = dir == DIR_SEND ? 0 : bytes;
    __sync_lock_test_and_set(&slot->window, (u64)window);     /* last, and ordered: the slot is ready */
    if (held) {
        held->sk = key->sk;
        held->slot = (u64)window << 32 | at;
    }
    announce(ctx, key, window);
    return 0;
}

/* the sending task as keys name it (executable, process, user), read directly */
struct ident_t { u64 exe; u32 pid; u32 uid; };
static __always_inline void task_ident(void *task, struct ident_t *id) {
    void *mm = (void *)D_TASK_MM(task);
    id->exe = mm ? D_MM_EXE_FILE(mm) : 0;
    id->pid = D_TASK_TGID(task);
    id->uid = D_CRED_UID((void *)D_TASK_CRED(task));
}

/* whether a slot's key is still this socket's connection, compared field by
   field with the socket and the task as they are now (nothing is built) */
static __always_inline int still(struct conn_key_t *k, void *sk, u16 family, struct peer_t *peer, void *task) {
    struct ident_t id;
    task_ident(task, &id);
    if (k->sk != (u64)sk || k->exe != id.exe || k->pid != id.pid || k->uid != id.uid) return 0;
    if (k->family != family || k->lport != D_SK_NUM(sk) || k->prot != D_SK_PROT(sk)) return 0;
    if (k->rport != (peer ? peer->port : swap16(D_SK_DPORT(sk)))) return 0;
    if (family == PS_AF_INET) {
        u32 raddr = peer ? ((u32 *)peer->addr)[3] : D_SK_DADDR(sk);
        return *(u32 *)k->raddr == raddr && *(u32 *)k->laddr == D_SK_RCV_SADDR(sk);
    }
    if (family == PS_AF_INET6) {
        u64 *ra = (u64 *)k->raddr, *la = (u64 *)k->laddr, *pa = peer ? (u64 *)peer->addr : 0;
        #pragma unroll
        for (int i = 0; i < 2; i++)
            if (ra[i] != (pa ? pa[i] : *(volatile u64 *)((u8 *)sk + OFF_SK_V6_DADDR + 8 * i))
                || la[i] != *(volatile u64 *)((u8 *)sk + OFF_SK_V6_RCV_SADDR + 8 * i)) return 0;
    }
    return 1;
}

/* the peer of an unconnected socket's datagram: as its send noted it (for
   this thread), or as its receive queue had it */
static __always_inline struct peer_t *datagram_peer_btf(void *ctx, void *sk, u16 proto, int dir,
                                                        struct peer_t *noted) {
    if (dir != DIR_SEND) {
        u64 sk_id = (u64)sk;
        return recv_peers.lookup(&sk_id);
    }
    struct flow_t flow = {this_thread(ctx), D_SK_NUM(sk), proto};
    if (!PS_IS_UDP(proto)) {
        flow.sport = 0;
        flow.net = D_NET_INUM((void *)D_SK_NET(sk));
    }
    return noted_peer(&flow, noted) ? noted : 0;
}

/* an unconnected send that no cgroup hook names (ICMP, raw): the route
   lookups name it, attached on demand (asked for once, with an event) */
static __always_inline void want_routes(void *ctx) {
    u32 zero = 0, one = 1;
    u64 *state = route_use.lookup(&zero), *count = route_use.lookup(&one);
    if (count) __sync_fetch_and_add(count, 1);
    if (state && !*state && !__sync_lock_test_and_set(state, 1))
        emit_proc(ctx, EV_ROUTE, (void *)bpf_get_current_task());
}

static __always_inline int on_sock_btf(void *ctx, void *sk, long ret, int flags, int dir) {
    if (ret <= 0 || (dir == DIR_RECV && (flags & PS_MSG_PEEK))) return 0;
    u16 family = D_SK_FAMILY(sk);
    if (family == PS_AF_UNIX || family == PS_AF_NETLINK) return 0;
    void *task = bpf_get_current_task_btf();     /* (once: a helper call costs more than all the rest) */
    struct peer_t noted, *peer = 0;
    if (family == PS_AF_INET || family == PS_AF_INET6) {
        u16 proto = D_SOCK_PROTOCOL(sk);
        if (!D_SK_DPORT(sk)) {
            peer = datagram_peer_btf(ctx, sk, proto, dir, &noted);
            if (dir == DIR_SEND && !PS_IS_UDP(proto)) want_routes(ctx);
        }
        else if (dir == DIR_RECV && proto == PS_TCP && !(ret = tcp_consumed(sk, ret))) return 0;
    }
    u64 tuple = (u64)D_SK_DADDR(sk) << 32 | (u32)D_SK_NUM(sk) << 16 | D_SK_DPORT(sk);
    u32 zero = 0, hi = (tuple * 0x9E3779B97F4A7C15ULL) >> (64 - HELD_BITS);
    struct epoch_t *ep = epoch.lookup(&zero);
    struct held_t *h = held.lookup(&hi);
    u64 state = ep ? *(volatile u64 *)ep : 0;     /* one load: the maps and the window number agree */
    u32 e = (u32)state, window = state >> 32;
    if (h && h->sk == (u64)sk) {
        u64 last = h->slot;
        u32 at = (u32)last;
        struct slot_t *slot = (last >> 32) != window ? 0 : slot_at(e, at);
        if (slot && slot->window == window && still(&slot->key, sk, family, peer, task)) {
            if (dir == DIR_SEND) __sync_fetch_and_add(&slot->send, ret);
            else __sync_fetch_and_add(&slot->recv, ret);
            return 0;
        }
    }
    struct conn_key_t key = {};
    sock_tuple_btf(sk, &key);
    struct ident_t id;
    task_ident(task, &id);
    key.exe = id.exe;
    key.pid = id.pid;
    key.uid = id.uid;
    if (peer) {                                   /* peers are noted as IPv6 (v4-mapped) */
        if (family == PS_AF_INET) __builtin_memcpy(key.raddr, &peer->addr[12], 4);
        else __builtin_memcpy(key.raddr, peer->addr, 16);
        key.rport = peer->port;
    }
    if (!ep) return account(ctx, &key, dir, ret, 1);
    return take_slot(ctx, h, &key, e, window, dir, ret);
}

int btf__sock_send_length(u64 *ctx) {
    return on_sock_btf(ctx, (void *)ctx[0], (int)ctx[1], (int)ctx[2], DIR_SEND);
}
int btf__sock_recv_length(u64 *ctx) {
    return on_sock_btf(ctx, (void *)ctx[0], (int)ctx[1], (int)ctx[2], DIR_RECV);
}

/* an unconnected UDP send names its peer: noted for the send's own thread
   (the socket's local port and protocol tell its sockets apart) */
static __always_inline int note_udp_peer(struct bpf_sock_addr *ctx, struct peer_t *peer) {
    struct bpf_sock *sk = ctx->sk;
    if (!sk) return 1;
    struct flow_t id = {this_thread(ctx), sk->src_port, ctx->protocol};
    note_peer(&id, peer);
    return 1;                       /* (a cgroup hook that allows the send) */
}
int cg__udp4_sendmsg(struct bpf_sock_addr *ctx) {
    struct peer_t peer = {};
    u32 ip = ctx->user_ip4;
    peer.addr[10] = peer.addr[11] = 0xff;               /* as ::ffff:a.b.c.d */
    __builtin_memcpy(&peer.addr[12], &ip, 4);
    peer.port = swap16(ctx->user_port);
    return note_udp_peer(ctx, &peer);
}
int cg__udp6_sendmsg(struct bpf_sock_addr *ctx) {
    struct peer_t peer = {};
    u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    __builtin_memcpy(peer.addr, ip, 16);
    peer.port = swap16(ctx->user_port);
    return note_udp_peer(ctx, &peer);
}
""",
    "raw-tracepoint": r"""
HOOK(sock_send_length) {
    return on_sock(ctx, (void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], DIR_SEND);
}
HOOK(sock_recv_length) {
    return on_sock(ctx, (void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], DIR_RECV);
}
""",
    "kprobe": r"""
struct sockcall_t { u64 sock; u64 flags; };
BPF_HASH(sockcalls, u64, struct sockcall_t, $MAX_THREADS);
static __always_inline int sock_enter(void *sock, u64 flags) {
    u64 id = bpf_get_current_pid_tgid();
    struct sockcall_t s = {(u64)sock, flags};
    sockcalls.update(&id, &s);
    return 0;
}
static __always_inline int sock_return(struct pt_regs *ctx, int dir) {
    u64 id = bpf_get_current_pid_tgid();
    struct sockcall_t *s = sockcalls.lookup(&id);
    if (!s) return 0;
    void *sk = read_ptr((void *)s->sock, SOCKET_SK);
    int flags = s->flags;
    sockcalls.delete(&id);
    return on_sock(ctx, sk, PT_REGS_RC(ctx), flags, dir);
}
int on_sock_sendmsg(struct pt_regs *ctx) { return sock_enter((void *)PT_REGS_PARM1(ctx), 0); }
int on_sock_sendmsg_return(struct pt_regs *ctx) { return sock_return(ctx, DIR_SEND); }
int on_sock_recvmsg(struct pt_regs *ctx) { return sock_enter((void *)PT_REGS_PARM1(ctx), PT_REGS_PARM3(ctx)); }
int on_sock_recvmsg_return(struct pt_regs *ctx) { return sock_return(ctx, DIR_RECV); }
""",
}

# the kprobe fallback's functions: (kernel function, entry program, return program)
KPROBE_HOOKS = [("sock_sendmsg", "on_sock_sendmsg", "on_sock_sendmsg_return"),
                ("sock_recvmsg", "on_sock_recvmsg", "on_sock_recvmsg_return")]

# raw tracepoints every mode attaches first (the getaddrinfo uprobes follow)
RAW_HOOKS_ALL = ["sched_process_exec", "sched_process_fork", "sched_process_exit", "inet_sock_set_state",
                 "tcp_rcv_space_adjust", "sk_data_ready"]
ROUTE_HOOKS = ["fib_table_lookup", "fib6_table_lookup"]     # where no cgroup hook names a send's peer
# the typed tracepoints (program, tracepoint) and cgroup hooks (program, attach type) of the modes that have them
TYPED_HOOKS = [("btf__sock_send_length", "sock_send_length"), ("btf__sock_recv_length", "sock_recv_length")]
BPF_CGROUP_UDP4_SENDMSG, BPF_CGROUP_UDP6_SENDMSG = 14, 15
CGROUP_HOOKS = [("cg__udp4_sendmsg", BPF_CGROUP_UDP4_SENDMSG), ("cg__udp6_sendmsg", BPF_CGROUP_UDP6_SENDMSG)]


class CaptureMode(typing.NamedTuple):
    """One way to capture: the program text it adds, and what the loader
    loads and attaches for it."""
    description: str                # (what `status` says)
    sock_hooks: str                 # its socket programs (SOCK_HOOKS)
    peer_store: str                 # where a send's peer waits (PEER_STORES)
    raw_hooks: typing.List[str]     # raw tracepoints beyond RAW_HOOKS_ALL, attached after them
    typed: bool                     # TYPED_HOOKS and CGROUP_HOOKS, with ROUTE_HOOKS attached on demand
    kprobes: typing.List[typing.Tuple[str, str, str]]      # (kernel function, entry program, return program)
    fallback: str                   # the mode to capture with where the kernel refuses this one's hooks


CAPTURE_MODES = {
    "tracepoint": CaptureMode(
        "tracepoint (sock:sock_send_length, sock:sock_recv_length, typed; cgroup UDP sendmsg hooks)",
        SOCK_HOOKS["tracepoint"], "thread", [], True, [], "raw-tracepoint"),
    "raw-tracepoint": CaptureMode(
        "raw tracepoint (sock:sock_send_length, sock:sock_recv_length; route lookups)",
        SOCK_HOOKS["raw-tracepoint"], "task", ["sock_send_length", "sock_recv_length"] + ROUTE_HOOKS, False, [], ""),
    "kprobe": CaptureMode(
        "kprobe fallback (sock_sendmsg, sock_recvmsg)",
        SOCK_HOOKS["kprobe"], "hash", ROUTE_HOOKS, False, KPROBE_HOOKS, ""),
}

MAX_MERGED = 16384     # processes (with user and protocol) whose connections are merged in a window
# each window's room for connections (the hash maps, the slots, and the maps
# by socket), unless "Connections per window" says: room for CONNS_A_SECOND
# new connections a second over the write limit, in powers of two from
# ROOM_LEAST, within 1/MEMORY_SHARE of the machine's memory (a window ends
# early when its maps near full)
CONN_ROOM_BYTES = 700
MEMORY_SHARE = 256
CONNS_A_SECOND = 2000
ROOM_LEAST = 16384


def memory_total(path: str = "/proc/meminfo") -> int:
    """The machine's memory in bytes (0 if unknown)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def window_capacity(setting: typing.Optional[int], write_limit: float, memory: int) -> int:
    """Connections a window has room for in the kernel's maps."""
    if setting:
        return setting
    room, most = ROOM_LEAST, memory // MEMORY_SHARE // CONN_ROOM_BYTES
    while room < CONNS_A_SECOND * write_limit and room * 2 <= most:
        room *= 2
    return room
MAX_THREADS = 16384    # threads with the destination of their last route lookup noted
MAX_PROCS = 65536      # processes whose executable is known from their exec
EXE_REPLACED = 1       # ProcT.flags: the process replaced its executable (prctl PR_SET_MM) since it ran it


def bpf_text(btf: BTF, mode: str, conns: int = ROOM_LEAST) -> str:
    """The complete C program for a capture mode (CAPTURE_MODES), with room
    for `conns` connections a window (window_capacity)."""
    defines = lambda prefix, names: "\n".join(f"#define {prefix}{n} {i}" for i, n in names)
    structs = "".join(c_struct(cls, name) for cls, name in STRUCT_NAMES.items())
    return string.Template(BPF_TEXT).substitute(
        PATH_DEPTH=PATH_DEPTH, NAME_LEN=NAME_LEN, LEAF_LEN=LEAF_LEN, ARGS_LEN=ARGS_LEN, DNS_ADDRS=DNS_ADDRS,
        EVENT_KINDS=defines("EV_", [(num, name) for name, (num, _) in EVENT_KINDS.items()]),
        STAT_INDEXES=defines("STAT_", enumerate(STATS)),
        PRELUDE=bpf_prelude(btf), STRUCTS=structs,
        MAX_CONNS=conns, MAX_SLOTS=conns, MAX_MERGED=MAX_MERGED, MAX_THREADS=MAX_THREADS, MAX_PROCS=MAX_PROCS,
        EXE_REPLACED=EXE_REPLACED, EXEC_ROOT=EXEC_ROOT, EXEC_NO_DIR=EXEC_NO_DIR, EXEC_NAME_CUT=EXEC_NAME_CUT,
        EXEC_ARGS_CUT=EXEC_ARGS_CUT,
        N_STATS=2 * len(STATS),
        SOCK_HOOKS=string.Template(CAPTURE_MODES[mode].sock_hooks).substitute(MAX_THREADS=MAX_THREADS,
                                                                              MAX_SLOTS=conns),
        PEER_STORE=string.Template(PEER_STORES[CAPTURE_MODES[mode].peer_store]).substitute(MAX_THREADS=MAX_THREADS))


###############################################################################
# 9. BPF loader, maps and perf buffers
###############################################################################
# A short-lived child compiles the program with bcc, sets up the perf buffers,
# attaches the hooks, and hands every descriptor to the supervisor, which
# holds them (and the mapped perf rings) for as long as picosnitch runs. Each
# reader it starts inherits them and uses bpf() directly: a reader that dies
# loses nothing the kernel has counted, and its successor goes on.

GRACE_SECONDS = 0.02      # after switching maps, for updates already under way
HIGH_WATER = 0.5          # a window ends early once it has taken this share of its room
SHORTEST_WINDOW = 0.5     # seconds: a window ends early no sooner than this
MERGES_SHOWN = 60         # seconds: windows that merged connections are shown once in this long (all logged)
ROUTE_HOLD_SECONDS = 300  # route hooks stay attached this long after the last send that needed them
DRAIN_BATCH = 4096        # connections read per bpf() call when draining a window
SLOT_BATCH = 512          # slots read per bpf() call (a window's slots are mostly few)


def ensure_tracefs(say: typing.Callable[[str], None]) -> None:
    """Mount tracefs when nothing provides it (attaching tracepoints needs it)."""
    if os.path.isdir(os.path.join(TRACEFS, "events")) or os.path.isdir("/sys/kernel/debug/tracing/events"):
        return
    if libc().mount(b"nodev", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        raise PicosnitchError(f"could not mount tracefs at {TRACEFS}: {os.strerror(ctypes.get_errno())}")
    say(f"mounted tracefs at {TRACEFS} (tracepoints need it)")


def version_key(release: str) -> typing.Tuple[int, ...]:
    return tuple(int(n) for n in "".join(c if c.isdigit() else " " for c in release).split()[:3])


def find_kernel_headers(release: str, modules: str = "/lib/modules") -> typing.Tuple[typing.Optional[typing.List[str]], str]:
    """Header directories for bcc: None when the running kernel's are installed.

    Otherwise the newest installed set (build dir, and its source dir where a
    distribution splits them); offsets come from BTF, so any set that
    compiles will do.
    """
    if os.path.exists(os.path.join(modules, release, "build", "include", "generated", "autoconf.h")):
        return None, f"kernel headers for {release}"
    found = []
    for name in os.listdir(modules) if os.path.isdir(modules) else []:
        build = os.path.join(modules, name, "build")
        if os.path.exists(os.path.join(build, "include", "generated", "autoconf.h")):
            source = os.path.join(modules, name, "source")
            dirs = [os.path.realpath(build)] + ([os.path.realpath(source)] if os.path.isdir(source) else [])
            found.append((version_key(name), name, dirs))
    if not found:
        raise PicosnitchError(f"no kernel headers found for bcc (kernel {release}): install your distribution's "
                              "kernel headers package (any version will do, e.g. linux-headers-amd64)")
    _, name, dirs = max(found)
    return dirs, f"no kernel headers for {release}; compiling with those of {name} (struct offsets come from BTF)"


def merge_tree(sources: typing.List[str], target: str) -> None:
    """A tree of symlinks that overlays several directories (first wins)."""
    os.makedirs(target, exist_ok=True)
    entries: typing.Dict[str, typing.List[str]] = {}
    for source in sources:
        for name in os.listdir(source):
            entries.setdefault(name, []).append(os.path.join(source, name))
    for name, paths in entries.items():
        if len(paths) > 1 and all(os.path.isdir(p) and not os.path.islink(p) for p in paths):
            merge_tree(paths, os.path.join(target, name))
        else:
            os.symlink(paths[0], os.path.join(target, name))


def compile_program(text: str, headers: typing.Optional[typing.List[str]]):
    """Compile and load the program with bcc, using substitute headers if given."""
    from bcc import BPF
    if headers is None:
        return BPF(text=text.encode())
    tree = tempfile.mkdtemp(prefix="picosnitch-headers-")
    try:
        merge_tree(headers, tree)
        os.environ["BCC_KERNEL_SOURCE"] = tree
        return BPF(text=text.encode())
    finally:
        os.environ.pop("BCC_KERNEL_SOURCE", None)
        shutil.rmtree(tree, ignore_errors=True)


def capture_mode(btf: BTF) -> str:
    """'tracepoint' where the kernel has sock:sock_send_length (>= 6.3), else
    'kprobe'; attach_program falls back as CAPTURE_MODES says (from
    'tracepoint' to 'raw-tracepoint') where the kernel refuses a mode's hooks."""
    return "tracepoint" if btf.has_raw_tracepoint("sock_send_length") else "kprobe"


# maps the reader uses, in the order their descriptors are handed over
READER_MAPS = ("events", "epoch", "stats", "conns0", "conns1", "slots", "nslots", "nconns", "merged0", "merged1",
               "route_use")
# struct proto of each protocol, for keys whose event was lost: symbol -> protocol
PROTO_SYMBOLS = {"tcp_prot": 6, "tcpv6_prot": 6, "udp_prot": 17, "udpv6_prot": 17, "udplite_prot": 136,
                 "udplitev6_prot": 136, "ping_prot": 1, "pingv6_prot": 58, "mptcp_prot": 262,
                 "mptcp_v6_prot": 262, "sctp_prot": 132, "sctpv6_prot": 132}


def cgroup2_root(mounts: str = "/proc/self/mounts") -> str:
    """Where the unified cgroup hierarchy is mounted ('' without one)."""
    with open(mounts) as f:
        for line in f:
            _, path, kind = line.split()[:3]
            if kind == "cgroup2":
                return path.replace("\\040", " ")
    return ""


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32), ("prog_btf_fd", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("func_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("reserved", ctypes.c_uint8 * 64)]


class _LinkAttr(ctypes.Structure):
    """BPF_LINK_CREATE's (prog_fd, target_fd, attach_type) or BPF_RAW_TRACEPOINT_OPEN's (name, prog_fd)."""
    _fields_ = [("a", ctypes.c_uint64), ("b", ctypes.c_uint32), ("c", ctypes.c_uint32), ("reserved", ctypes.c_uint8 * 48)]


BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN, BPF_LINK_CREATE = 5, 17, 28
BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP = 26, 23


def bpf_call(cmd: int, attr, what: str) -> int:
    """A bpf() system call that returns a descriptor; OSError names what failed."""
    fd = libc().syscall(syscall_numbers()[0], cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return fd


def attach_raw_tracepoint(tracepoint: str, prog: int) -> int:
    """Attach a loaded raw tracepoint program (a typed one, which names its
    tracepoint itself, with tracepoint ''): the link's descriptor."""
    name = ctypes.create_string_buffer(tracepoint.encode())
    attr = _LinkAttr(ctypes.addressof(name) if tracepoint else 0, prog)
    return bpf_call(BPF_RAW_TRACEPOINT_OPEN, attr, f"attaching {tracepoint or 'a typed tracepoint'}")


def load_typed_tracepoint(bpf, function: str, tracepoint: str, btf: BTF) -> int:
    """Load a function bcc compiled as a typed tracepoint program (the
    verifier types its arguments from the kernel's BTF): its descriptor."""
    insns = bpf.dump_func(function.encode())
    code, license_ = ctypes.create_string_buffer(insns), ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_TRACING, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                         license=ctypes.addressof(license_), log_level=0, prog_name=function.encode()[:15],
                         expected_attach_type=BPF_TRACE_RAW_TP, attach_btf_id=btf.tracepoint_type(tracepoint))
    try:
        return bpf_call(BPF_PROG_LOAD, attr, f"loading {function}")
    except OSError:         # again, with the verifier's log to say why
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return bpf_call(BPF_PROG_LOAD, attr, f"loading {function}")
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} ({one_line(log.value.decode(errors='replace')[-300:])})")


def attach_cgroup_hook(prog: int, attach_type: int, cgroup: str, function: str) -> int:
    """Attach a cgroup hook to the root of the cgroup hierarchy, as a link
    (detached when its last descriptor closes)."""
    target = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return bpf_call(BPF_LINK_CREATE, _LinkAttr(prog | target << 32, attach_type), f"attaching {function}")
    finally:
        os.close(target)


class TypedHooks:
    """The tracepoint mode's typed tracepoints and cgroup hooks, loaded (the
    kernel refuses with OSError, or PicosnitchError without cgroup2) and
    then attached as links."""

    def __init__(self, bpf, btf: BTF):
        from bcc import BPF
        self.cgroup = cgroup2_root()
        if not self.cgroup:
            raise PicosnitchError("no cgroup2 hierarchy is mounted (for the UDP sendmsg hooks)")
        self.typed: typing.List[int] = []     # (ours to close: the links hold them)
        try:
            for function, tracepoint in TYPED_HOOKS:
                self.typed.append(load_typed_tracepoint(bpf, function, tracepoint, btf))
            self.cgroups = [(bpf.load_func(function.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=kind).fd, kind, function)
                            for function, kind in CGROUP_HOOKS]
        except BaseException:
            self.close()
            raise

    def attach(self) -> typing.List[int]:
        links: typing.List[int] = []
        try:
            links += [attach_raw_tracepoint("", prog) for prog in self.typed]
            links += [attach_cgroup_hook(prog, kind, self.cgroup, function) for prog, kind, function in self.cgroups]
        except BaseException:
            for fd in links:
                os.close(fd)
            raise
        finally:
            self.close()
        return links

    def close(self) -> None:
        for fd in self.typed:
            os.close(fd)
        self.typed = []


def attach_program(notes: typing.List[str], perf_fds: typing.List[int], mode: str = "", conns: int = ROOM_LEAST):
    """Compile and load with bcc, put the perf events (already mapped by the
    supervisor) in the events map, load every program, then attach them all
    at once: no event is sent before it can be received, and none waits in
    the buffers while the verifier checks the next program. Returns (bcc
    object, mode, extra link fds, {route tracepoint: program fd} for the
    reader to attach on demand). The tracepoint mode falls back to raw
    tracepoints where the kernel refuses its typed tracepoints or cgroup
    hooks (the note says why)."""
    from bcc import BPF
    btf = BTF.from_file()
    mode = mode or capture_mode(btf)
    spec = CAPTURE_MODES[mode]
    ensure_tracefs(notes.append)
    headers, note = find_kernel_headers(os.uname().release)
    notes += [note] if note not in notes else []
    bpf = compile_program(bpf_text(btf, mode, conns), headers)
    events = BpfMap(bpf["events"].map_fd, ctypes.c_uint32, ctypes.c_uint32)
    for cpu, fd in zip(online_cpus(), perf_fds):
        events.update(cpu, fd)
    # windows count from 1, from the first byte on (the reader starts later)
    BpfMap(bpf["epoch"].map_fd, ctypes.c_uint32, EpochT).update(0, EpochT(0, 1))
    links: typing.List[int] = []
    routes: typing.Dict[str, int] = {}
    typed = None
    try:
        if spec.typed:
            typed = TypedHooks(bpf, btf)
            routes = {name: bpf.load_func(f"hook__{name}".encode(), BPF.RAW_TRACEPOINT).fd for name in ROUTE_HOOKS}
        for name in spec.raw_hooks + RAW_HOOKS_ALL:
            bpf.load_func(f"hook__{name}".encode(), BPF.RAW_TRACEPOINT)
        for function in [f for _, entry, ret in spec.kprobes for f in (entry, ret)]:
            bpf.load_func(function.encode(), BPF.KPROBE)
        # (all loaded: each attach is a system call; processes first, then traffic)
        for name in RAW_HOOKS_ALL + spec.raw_hooks:
            bpf.attach_raw_tracepoint(tp=name.encode(), fn_name=f"hook__{name}".encode())
        links = typed.attach() if typed else []
    except Exception as e:  # noqa: BLE001 - bcc raises plain Exception, the kernel OSError
        if not spec.fallback:
            raise
        notes.append(f"typed tracepoints or cgroup hooks refused ({e}): capturing with raw tracepoints")
        if typed:
            typed.close()
        bpf.cleanup()
        return attach_program(notes, perf_fds, spec.fallback, conns)
    for function, entry, ret in spec.kprobes:
        bpf.attach_kprobe(event=function.encode(), fn_name=entry.encode())
        bpf.attach_kretprobe(event=function.encode(), fn_name=ret.encode())
    try:
        bpf.attach_uprobe(name=b"c", sym=b"getaddrinfo", fn_name=b"on_getaddrinfo")
        bpf.attach_uretprobe(name=b"c", sym=b"getaddrinfo", fn_name=b"on_getaddrinfo_return")
    except Exception as e:  # noqa: BLE001 - bcc raises plain Exception
        notes.append(f"domains from getaddrinfo unavailable: {e}")
    return bpf, mode, links, routes


def attachment_fds(bpf) -> typing.List[int]:
    """Every descriptor that keeps a program attached."""
    fds = list(bpf.raw_tracepoint_fds.values()) + list(bpf.tracepoint_fds.values()) + list(bpf.uprobe_fds.values())
    return fds + [fd for per_event in bpf.kprobe_fds.values() for fd in per_event.values()]


def proto_addresses(path: str = "/proc/kallsyms") -> typing.Dict[int, int]:
    """Addresses of the kernel's struct proto objects -> protocol numbers
    ({} when the kernel hides its addresses)."""
    found = {}
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("_prot\n") or "_prot\t" in line:
                    address, _, name = line.split()[:3]
                    if name in PROTO_SYMBOLS and int(address, 16):
                        found[int(address, 16)] = PROTO_SYMBOLS[name]
    except OSError:
        pass
    return found


LOADED_FDS = 64       # descriptors the program loader hands over, at most


def load_in_child(perf_fds: typing.List[int], mode: str = "",
                  conns: int = ROOM_LEAST) -> typing.Tuple[Loaded, typing.List[int]]:
    """Compile and attach in a short-lived child, which hands the descriptors
    over and exits: bcc and LLVM never weigh on picosnitch while it runs.
    Returns what it loaded and the descriptors: READER_MAPS, the programs of
    the routes (attached on demand), then the attachments."""
    ours, theirs = Channel.pair()
    pid = os.fork()
    if pid == 0:
        ours.close()
        notes: typing.List[str] = []
        try:
            protos = [list(p) for p in proto_addresses().items()]      # (before events flow)
            bpf, chosen, links, routes = attach_program(notes, perf_fds, mode, conns)
            theirs.send(Loaded(chosen, notes, protos, list(routes)), fds=[bpf[name].map_fd for name in READER_MAPS]
                        + list(routes.values()) + attachment_fds(bpf) + links)
        except Exception as e:  # noqa: BLE001 - whatever failed is reported by the supervisor
            theirs.send(Loaded("", notes, [], [], str(e) or type(e).__name__))
        os._exit(0)     # no bcc clean-up: the supervisor's copies keep everything attached
    theirs.close()
    try:
        loaded, fds = ours.recv_with_fds(most=LOADED_FDS)
    except ValueError:
        loaded, fds = Loaded("", [], [], [], "the program loader died"), []
    finally:
        ours.close()
        os.waitpid(pid, 0)
    if loaded.error:
        for fd in fds:
            os.close(fd)
        raise PicosnitchError(f"loading the BPF program failed: {loaded.error}")
    return loaded, fds


SYSCALL_NUMBERS = {   # machine -> (bpf, perf_event_open)
    "x86_64": (321, 298), "aarch64": (280, 241), "riscv64": (280, 241), "ppc64le": (361, 319), "s390x": (351, 331),
}
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_LOOKUP_BATCH, BPF_MAP_LOOKUP_AND_DELETE_BATCH = 1, 2, 24, 25
BPF_MAP_DELETE_BATCH = 27


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def syscall_numbers() -> typing.Tuple[int, int]:
    machine = os.uname().machine
    if machine not in SYSCALL_NUMBERS:
        raise PicosnitchError(f"unsupported machine {machine}")
    return SYSCALL_NUMBERS[machine]


class BpfMap:
    """A BPF map by descriptor, through the bpf() system call."""

    def __init__(self, fd: int, key_type, value_type, capacity: int = 1):
        self.fd, self.key_type, self.value_type = fd, key_type, value_type
        self.libc, self.nr = libc(), syscall_numbers()[0]
        self.keys = (key_type * capacity)()
        self.values = (value_type * capacity)()

    def _call(self, cmd: int, attr) -> int:
        return self.libc.syscall(self.nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))

    def lookup(self, key):
        key, value = self.key_type(key), self.value_type()
        attr = _ElemAttr(self.fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0)
        if self._call(BPF_MAP_LOOKUP_ELEM, attr):
            raise OSError(ctypes.get_errno(), "bpf map lookup")
        return value

    def update(self, key, value) -> None:
        """Set key to value (each a number or an instance of the map's types)."""
        key = key if isinstance(key, self.key_type) else self.key_type(key)
        value = value if isinstance(value, self.value_type) else self.value_type(value)
        attr = _ElemAttr(self.fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0)
        if self._call(BPF_MAP_UPDATE_ELEM, attr):
            raise OSError(ctypes.get_errno(), "bpf map update")

    def read_all(self, delete: bool = False) -> typing.List[tuple]:
        """Every entry, in batches: [(key, value)]; deleted as read with delete."""
        keys, values = self.read_raw(delete)
        ks, vs = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        return [(self.key_type.from_buffer_copy(keys, i * ks), self.value_type.from_buffer_copy(values, i * vs))
                for i in range(len(keys) // ks)]

    def read_raw(self, delete: bool = False) -> typing.Tuple[bytes, bytes]:
        """Every entry, in batches, as bytes: (the keys one after the other,
        the values in the same order); deleted as read with delete."""
        keys, values, token, first = [], [], ctypes.c_uint64(), True
        ks, vs = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        cmd = BPF_MAP_LOOKUP_AND_DELETE_BATCH if delete else BPF_MAP_LOOKUP_BATCH
        while True:
            attr = _BatchAttr(0 if first else ctypes.addressof(token), ctypes.addressof(token),
                              ctypes.addressof(self.keys), ctypes.addressof(self.values), len(self.keys), self.fd, 0, 0)
            result, err = self._call(cmd, attr), ctypes.get_errno()
            keys.append(ctypes.string_at(ctypes.addressof(self.keys), attr.count * ks))
            values.append(ctypes.string_at(ctypes.addressof(self.values), attr.count * vs))
            if result:
                if err == errno.ENOENT:
                    return b"".join(keys), b"".join(values)
                raise OSError(err, "bpf map batch lookup")
            first = False

    def read_first(self, n: int, start: int = 0) -> bytes:
        """The values of n entries of an array from index start on, read in
        batches, one after the other (as bytes: struct_of() reads them)."""
        out: typing.List[bytes] = []
        size, got = ctypes.sizeof(self.value_type), 0
        token, first = ctypes.c_uint64(start - 1 if start else 0), not start     # (a batch goes on after its token)
        while got < n:
            attr = _BatchAttr(0 if first else ctypes.addressof(token), ctypes.addressof(token),
                              ctypes.addressof(self.keys), ctypes.addressof(self.values),
                              min(len(self.keys), n - got), self.fd, 0, 0)
            result, err = self._call(BPF_MAP_LOOKUP_BATCH, attr), ctypes.get_errno()
            out.append(ctypes.string_at(ctypes.addressof(self.values), attr.count * size))
            got += attr.count
            if result:
                if err == errno.ENOENT:
                    break
                raise OSError(err, "bpf map batch lookup")
            first = False
        return b"".join(out)[:n * size]

    def delete(self, keys: bytes) -> None:
        """Delete these keys, one after the other as read_raw() has them
        (those already gone are skipped), in batches."""
        ks = ctypes.sizeof(self.key_type)
        for start in range(0, len(keys), len(self.keys) * ks):
            chunk = keys[start:start + len(self.keys) * ks]
            ctypes.memmove(self.keys, chunk, len(chunk))
            attr = _BatchAttr(0, 0, ctypes.addressof(self.keys), 0, len(chunk) // ks, self.fd, 0, 0)
            if self._call(BPF_MAP_DELETE_BATCH, attr) and ctypes.get_errno() != errno.ENOENT:
                raise OSError(ctypes.get_errno(), "bpf map delete batch")


class _PerfAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32),
                ("bp_type", ctypes.c_uint32), ("config1", ctypes.c_uint64)]


PERF_TYPE_SOFTWARE, PERF_COUNT_SW_BPF_OUTPUT, PERF_SAMPLE_RAW = 1, 10, 1 << 10
PERF_FLAG_FD_CLOEXEC, PERF_EVENT_IOC_ENABLE = 8, 0x2400


def open_perf_events() -> typing.List[int]:
    """A BPF output perf event per CPU, enabled."""
    import fcntl
    nr, fds = syscall_numbers()[1], []
    for cpu in online_cpus():
        attr = _PerfAttr(PERF_TYPE_SOFTWARE, ctypes.sizeof(_PerfAttr), PERF_COUNT_SW_BPF_OUTPUT, 1,
                         PERF_SAMPLE_RAW, 0, 0, 1, 0, 0)
        fd = libc().syscall(nr, ctypes.byref(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
        if fd < 0:
            raise PicosnitchError(f"perf_event_open on cpu {cpu}: {os.strerror(ctypes.get_errno())}")
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
        fds.append(fd)
    return fds


class PerfBuffers:
    """The perf ring buffers of the per-CPU events. The supervisor maps them
    first and keeps them mapped, so that events wait in them while a reader
    restarts; each reader maps them again (remap), and reads on from the tail
    its predecessor left."""
    RECORD_SAMPLE, RECORD_LOST, DATA_HEAD = 9, 2, 1024

    def __init__(self, fds: typing.List[int], pages: int):
        import mmap
        self.fds, self.page, self.size = fds, mmap.PAGESIZE, pages * mmap.PAGESIZE
        self.lost, self.stale = 0, []
        self.rings = self.map()

    def map(self) -> list:
        import mmap
        self.poller = select.poll()
        rings = []
        for fd in self.fds:
            rings.append((fd, mmap.mmap(fd, self.page + self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)))
            self.poller.register(fd, select.POLLIN)
        return rings

    def remap(self) -> None:
        """Map the rings in a forked process. The kernel does not copy perf
        mappings into a child; the inherited mmap objects are kept, and never
        closed, because their addresses are not mapped here."""
        self.stale, self.rings = self.rings, self.map()

    def _read(self, ring, pos: int, n: int) -> bytes:
        start = self.page + pos % self.size
        end = start + n
        if end <= self.page + self.size:
            return ring[start:end]
        return ring[start:self.page + self.size] + ring[self.page:end - self.size]

    def poll(self, timeout_ms: int) -> typing.List[bytes]:
        """Wait up to timeout_ms for events; every record of every CPU's ring."""
        self.poller.poll(timeout_ms)
        records = []
        for _, ring in self.rings:
            head, tail = struct.unpack_from("<QQ", ring, self.DATA_HEAD)
            while tail < head:
                kind, _, size = struct.unpack("<IHH", self._read(ring, tail, 8))
                record = self._read(ring, tail, size)
                if kind == self.RECORD_SAMPLE:
                    raw_size = struct.unpack_from("<I", record, 8)[0]
                    records.append(record[12:12 + raw_size])
                elif kind == self.RECORD_LOST:
                    self.lost += struct.unpack_from("<Q", record, 16)[0]
                tail += size
            struct.pack_into("<Q", ring, self.DATA_HEAD + 8, tail)
        return records


class Kernel:
    """The loaded program as the supervisor holds it: map descriptors, the
    mapped perf rings, the attachments, and the struct proto addresses."""

    def __init__(self, perf: PerfBuffers, loaded: Loaded, fds: typing.List[int]):
        n, r = len(READER_MAPS), len(loaded.routes)
        self.perf, self.perf_fds = perf, [fd for fd, _ in perf.rings]
        self.mode, self.notes = loaded.mode, loaded.notes
        self.protos = {address: proto for address, proto in loaded.protos}
        self.maps = dict(zip(READER_MAPS, fds[:n]))
        self.conns = ROOM_LEAST           # (the room of each window, as loaded)
        self.routes = dict(zip(loaded.routes, fds[n:n + r]))
        self.links = fds[n + r:]

    @classmethod
    def load(cls, pages: int, mode: str = "", conns: int = ROOM_LEAST) -> "Kernel":
        """Open and map the perf buffers, then have the program loaded (in
        the mode this kernel allows, or in `mode`) with room for `conns`
        connections a window."""
        perf = PerfBuffers(open_perf_events(), pages)
        try:
            kernel = cls(perf, *load_in_child([fd for fd, _ in perf.rings], mode, conns))
            kernel.conns = conns
            return kernel
        except BaseException:
            for fd, ring in perf.rings:
                ring.close()
                os.close(fd)
            raise

    def fds(self) -> typing.List[int]:
        return list(self.maps.values()) + list(self.routes.values()) + self.perf_fds + self.links

    def close_fds(self) -> None:
        """Close the descriptors in a process that does not read the kernel
        (the mapped rings are not inherited: nothing else to release)."""
        for fd in self.fds():
            os.close(fd)

    def close(self) -> None:
        for _, ring in self.perf.rings:
            ring.close()
        self.close_fds()


def online_cpus() -> typing.List[int]:
    with open("/sys/devices/system/cpu/online") as f:
        spans = [part.split("-") for part in f.read().strip().split(",")]
    return [cpu for span in spans for cpu in range(int(span[0]), int(span[-1]) + 1)]


EVENT_TYPES = {num: (name, cls) for name, (num, cls) in EVENT_KINDS.items()}


class Window(typing.NamedTuple):
    """A window as the kernel counted it: its number, its connections, and
    its merged ones (those that found no room of their own)."""
    number: int
    entries: typing.List[typing.Tuple[typing.Union[bytes, ConnKeyT], ConnValT]]     # (a key as read: as_key())
    merged: typing.List[typing.Tuple[ConnKeyT, MergedT]] = []


def as_key(key: typing.Union[bytes, ConnKeyT]) -> ConnKeyT:
    """A connection's key, from its bytes as a window's map had them (a
    window's rows read them with CONN_KEY, in one step: few keys need this)."""
    return ConnKeyT.from_buffer_copy(key) if isinstance(key, bytes) else key


def decode_event(raw: bytes) -> typing.Tuple[str, EventHdrT, typing.Any]:
    """(kind name, header, payload) of one perf event record."""
    hdr = EventHdrT.from_buffer_copy(raw)
    name, cls = EVENT_TYPES[hdr.kind]
    payload = cls.from_buffer_copy(raw.ljust(ctypes.sizeof(EventHdrT) + ctypes.sizeof(cls), b"\0"),
                                   ctypes.sizeof(EventHdrT))
    return name, hdr, payload


class Capture:
    """The attached program, seen through its maps: poll events, close windows.

    The kernel fills one of two maps (and, with typed tracepoints, one of two
    arrays of slots); closing a window switches it to the other, and the
    closed map is read (not emptied) so that its window can be sent first:
    the reader empties it (clear) once the window is in the primary's
    channel, where it survives the reader. Slots are marked with their
    window and taken again from the start two windows later. A reader that
    starts after another died sends what that one left (leftover), under
    the same window number, which the primary recognises if it has the
    window. The route hooks the kernel asks for are attached here."""

    def __init__(self, kernel: Kernel, on_event, first=lambda events: None):
        self.mode, self.on_event, self.first, self.perf = kernel.mode, on_event, first, kernel.perf
        self.stats = BpfMap(kernel.maps["stats"], ctypes.c_uint32, ctypes.c_uint64)
        self.epoch_map = BpfMap(kernel.maps["epoch"], ctypes.c_uint32, EpochT)
        self.maps = [BpfMap(kernel.maps[name], ConnKeyT, ConnValT, DRAIN_BATCH) for name in ("conns0", "conns1")]
        self.merged = [BpfMap(kernel.maps[name], ConnKeyT, MergedT, DRAIN_BATCH) for name in ("merged0", "merged1")]
        self.slots = BpfMap(kernel.maps["slots"], ctypes.c_uint32, SlotT, SLOT_BATCH)
        self.taken = BpfMap(kernel.maps["nslots"], ctypes.c_uint32, ctypes.c_uint64)
        self.entered = BpfMap(kernel.maps["nconns"], ctypes.c_uint32, ctypes.c_uint64)
        self.room, self.typed = kernel.conns, CAPTURE_MODES[kernel.mode].typed
        self.merge_shown = -MERGES_SHOWN        # (when a merge was last shown as a notification)
        state = self.epoch_map.lookup(0)
        self.epoch, self.number = state.epoch, state.window      # (the loader starts windows at 1)
        # route hooks on demand: a reader that died took its attachments along
        self.route_use = BpfMap(kernel.maps["route_use"], ctypes.c_uint32, ctypes.c_uint64)
        self.route_progs, self.route_links, self.route_seen = kernel.routes, [], (0, 0.0)
        self.route_error = ""
        self.route_use.update(0, 0)
        self.unclear: typing.Dict[int, typing.Tuple[int, bytes, bytes]] = {}   # epoch -> (window, keys, merged keys)

    def poll(self, timeout_ms: int) -> None:
        """Hand new events over in the order they happened, across CPUs (an
        exec on one CPU comes before the connection it led to on another)."""
        events = [decode_event(raw) for raw in self.perf.poll(timeout_ms)]
        if any(name == "ROUTE" for name, _, _ in events):
            self.attach_routes()
            events = [event for event in events if event[0] != "ROUTE"]
        self.first(events)
        for event in sorted(events, key=lambda e: e[1].time):
            self.on_event(event)

    def attach_routes(self) -> None:
        """Attach the route hooks the kernel asked for (unconnected ICMP or raw
        sends go on); a refusal is reported, and not asked for again."""
        if self.route_links or not self.route_progs:
            return
        try:
            for tracepoint, prog in self.route_progs.items():
                self.route_links.append(attach_raw_tracepoint(tracepoint, prog))
        except OSError as e:
            self.detach_routes()
            self.route_error = (f"route hooks refused ({e.strerror}): unconnected ICMP and raw sends are "
                                "logged without their peer")
            return
        self.route_use.update(0, 2)
        self.route_seen = (self.route_use.lookup(1).value, time.monotonic())

    def detach_routes(self) -> None:
        for fd in self.route_links:
            os.close(fd)
        self.route_links = []

    def idle_routes(self) -> None:
        """Detach the route hooks once no send has needed them for a while."""
        if not self.route_links:
            return
        count, since = self.route_use.lookup(1).value, time.monotonic()
        if count != self.route_seen[0]:
            self.route_seen = (count, since)
        elif since - self.route_seen[1] > ROUTE_HOLD_SECONDS:
            self.detach_routes()
            self.route_use.update(0, 0)

    def read(self, epoch: int, number: int) -> "Window":
        """A closed window, whose keys read are cleared once it is sent (clear)."""
        keys, values = self.maps[epoch].read_raw()
        merged_keys, merged_values = self.merged[epoch].read_raw()
        self.unclear[epoch] = (number, keys, merged_keys)
        return self.contents(epoch, number, keys, values, merged_keys, merged_values)

    def peek(self) -> "Window":
        """The window being filled, as it stands (nothing is taken from it)."""
        return self.contents(self.epoch, self.number, *self.maps[self.epoch].read_raw(),
                             *self.merged[self.epoch].read_raw())

    def contents(self, epoch: int, number: int, keys: bytes, values: bytes, merged_keys: bytes,
                 merged_values: bytes) -> "Window":
        """A window's connections: those of its hash map (its keys and values,
        as read_raw() has them), and those of the slots taken in its window
        (one key may have several: summed); and its merged connections."""
        ks, vs, ms = CONN_KEY.size, ctypes.sizeof(ConnValT), ctypes.sizeof(MergedT)
        summed: typing.Dict[bytes, typing.Tuple[bytes, ConnValT]] = {}
        for i in range(len(keys) // ks):
            key = keys[i * ks:(i + 1) * ks]
            summed[key] = (key, ConnValT.from_buffer_copy(values, i * vs))
        merged = [(ConnKeyT.from_buffer_copy(merged_keys, i * ks), MergedT.from_buffer_copy(merged_values, i * ms))
                  for i in range(len(merged_keys) // ks)]
        taken = min(self.taken.lookup(epoch).value, self.room)
        for key, window, send, recv in SLOT.iter_unpack(self.slots.read_first(taken, epoch * self.room)):
            if window == number:
                found = summed.get(key)
                if found is None:
                    summed[key] = (key, ConnValT(send, recv))
                else:
                    found[1].send += send
                    found[1].recv += recv
        return Window(number, list(summed.values()), merged)

    def near_full(self) -> bool:
        """Whether the window being filled has taken HIGH_WATER of its room
        (its slots, or its hash map)."""
        used = self.entered.lookup(self.epoch).value
        if self.typed:
            used = max(used, self.taken.lookup(self.epoch).value)
        return used >= HIGH_WATER * self.room

    def leftover(self) -> "Window":
        """The window before the current one, if a reader that died left it."""
        self.poll(0)
        return self.read(self.epoch ^ 1, self.number - 1)

    def end_window(self, final: bool = False) -> typing.List["Window"]:
        """Switch the kernel to the other map and read the one just closed.
        Events already submitted are polled first, so every key read has had
        its context delivered. The final window also reads the other map."""
        self.idle_routes()
        self.clear(self.epoch ^ 1)                # about to be filled again
        self.taken.update(self.epoch ^ 1, 0)       # (its slots, from two windows ago, are read or sent)
        self.entered.update(self.epoch ^ 1, 0)
        closed = (self.epoch, self.number)
        self.number += 1
        self.epoch ^= 1
        self.epoch_map.update(0, EpochT(self.epoch, self.number))
        time.sleep(GRACE_SECONDS)
        self.poll(0)
        windows = [self.read(*closed)]
        if final:
            self.poll(0)
            windows.append(self.read(self.epoch, self.number))
        return windows

    def clear(self, epoch: int) -> None:
        """Delete what was read of a closed map (bytes added since stay for a later window)."""
        if epoch in self.unclear:
            _, keys, merged = self.unclear.pop(epoch)
            self.maps[epoch].delete(keys)
            self.merged[epoch].delete(merged)

    def clear_sent(self, sent: typing.Callable[[int], bool]) -> None:
        for epoch, (number, _, _) in list(self.unclear.items()):
            if sent(number):
                self.clear(epoch)

    def problems(self) -> typing.List[str]:
        """What was lost since the last call (events, full maps). The kernel
        keeps each counter at i and what readers have reported of it at
        i + len(STATS), so a new reader reports only what is new."""
        out = [self.route_error] if self.route_error else []
        self.route_error = ""
        if self.perf.lost:
            out.append(f"lost {self.perf.lost} events from the kernel: raise \"Perf ring buffer (pages)\"")
            self.perf.lost = 0
        for i, meaning in enumerate(STATS.values()):
            value, seen = self.stats.lookup(i).value, self.stats.lookup(i + len(STATS)).value
            if value > seen:
                out.append(f"{meaning} ({value - seen})")
                self.stats.update(i + len(STATS), value)
        return out


###############################################################################
# 10. BPF reader process
###############################################################################
# Polls events and, at the end of each write window, drains the connection map
# of that window into Conn rows for the primary. It runs as root with two
# capabilities left (CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, to open any
# process's executable through /proc/PID/exe the moment it runs) and never
# waits for another process: its messages go out from threads.

DOMAIN_CACHE = 8192       # (process, address) pairs remembered from getaddrinfo answers
ADDRESS_CACHE = 65536     # addresses remembered as text
MERGED_PORT = -2          # the ports of a row of merged connections (-1: a row of an exec)
WINDOWS_KEPT = 60         # windows the primary has not confirmed, kept to send again
EXEC_NOTICES_KEPT = 65536
CTIME_QUERIED = 1 << 31   # a flag the kernel keeps in the ctime's nanoseconds


def exec_path(ex: ExecT) -> typing.Tuple[str, bool, bool]:
    """The path sent with an exec event ('' when the walk was cut short),
    whether the file is on disk, and whether a name in it may be cut (one
    filled its slot). A memfd, or a file deleted before the exec, is named
    as the kernel names it in /proc/PID/exe: '/memfd:NAME (deleted)'."""
    cut = bool(ex.complete & EXEC_NAME_CUT)
    slots = [ex.leaf] + [ex.path[i].value for i in range(1, min(ex.depth, PATH_DEPTH))]
    parts = [raw.decode("utf-8", "replace") + ("…" if i and len(raw) >= NAME_LEN - 1 else "")    # (where it may be cut)
             for i, raw in enumerate(slots)]
    if ex.complete & EXEC_NO_DIR:
        return f"/{parts[-1] if parts else ''} (deleted)", False, cut
    if not ex.complete & EXEC_ROOT:
        return "", True, cut
    path = "/" + "/".join(p for p in reversed(parts) if p)
    return (path, True, cut) if ex.nlink else (f"{path} (deleted)", False, cut)


def merged_text(conns: int) -> str:
    """What a row of merged connections has for its remote address."""
    return f"{conns} connections merged"


def marked_cut(text: str, what: str) -> str:
    """A name that could not be had whole (with '…' where it was cut), marked
    so: it can pass for no whole one (what: the identity that keeps two such
    names apart)."""
    return f"{text} (cut; {what})"


def proc_from_proc_fs(pid: int, dev: int, ino: int, mask: int, comm: str) -> ProcInfo:
    """What /proc says of a process, if it still runs the executable the kernel reported."""
    exe, cmdline = "", ""
    try:
        st = os.stat(f"/proc/{pid}/exe")
        if (st.st_dev & mask, st.st_ino) == (dev & mask, ino):
            exe = os.readlink(f"/proc/{pid}/exe")
            cmdline = cmdline_text(read_proc_text(pid, "cmdline").encode())
    except OSError:
        pass
    return ProcInfo(pid, exe, comm, cmdline, dev, ino, ondisk=not exe.endswith(" (deleted)"))


class Context(typing.NamedTuple):
    """Who a process's keys belong to, resolved when its event arrived."""
    proc: ProcInfo
    parent: ProcInfo
    grandparent: ProcInfo
    window: int


class Tracker:
    """User-space view of processes, connections and domains, fed by events.

    A process's parent and grandparent are kept as they were when it ran its
    executable (or was forked): a program started through a double fork
    still names the program that launched it after pid 1 adopts it."""

    def __init__(self, mask: int, notify_exec: typing.Callable[[ExecNotice], None], every_exe: bool = False,
                 protos: typing.Optional[typing.Dict[int, int]] = None,
                 caught_path: typing.Callable[[tuple], str] = lambda exec_id: ""):
        self.mask, self.notify_exec, self.every_exe = mask, notify_exec, every_exe
        self.caught_path = caught_path         # the whole path of an exec's file, if it was caught
        self.runs: typing.List[Conn] = []     # executables run this window ("Every exe")
        self.procs: typing.Dict[int, ProcInfo] = {}
        self.lineage: typing.Dict[int, typing.Tuple[ProcInfo, ProcInfo]] = {}
        self.exited: typing.Dict[int, int] = {}
        self.contexts: typing.Dict[typing.Tuple[int, int], Context] = {}      # (pid, executable) -> who
        self.protos: typing.Dict[int, int] = dict(protos or {})      # struct proto address -> protocol
        self.domains: "collections.OrderedDict[typing.Tuple[int, str], str]" = collections.OrderedDict()
        self.addresses: typing.Dict[typing.Tuple[int, bytes], str] = {}     # (family, raw) -> as text
        self.unattributed: typing.List[str] = []
        self.replaced: typing.Dict[int, str] = {}      # pid -> what it ran, for processes that replaced it
        self.alerts: typing.List[str] = []
        self.window = 0
        self.handlers = {"EXEC": self.on_exec, "FORK": self.on_fork, "EXIT": self.on_exit, "CONN": self.on_conn,
                         "DNS": self.on_dns}

    def handle(self, event: typing.Tuple[str, EventHdrT, typing.Any]) -> None:
        name, hdr, payload = event
        self.handlers[name](hdr, payload)

    # -- processes ------------------------------------------------------------
    def on_exec(self, hdr: EventHdrT, ex: ExecT) -> None:
        p = hdr.proc
        dev = kernel_dev_to_user(p.dev)
        args = ctypes.string_at(ctypes.addressof(ex) + ExecT.args.offset, min(ex.args_len, ARGS_LEN))
        ctime = ex.ctime_sec * 10 ** 9 + (ex.ctime_nsec & ~CTIME_QUERIED)
        info = ProcInfo(p.pid, "", p.comm.decode("utf-8", "replace"), cmdline_text(args), dev, p.ino,
                        ctime, (p.pid, hdr.time))
        info = self.whole(info, ex)
        self.notify_exec(ExecNotice(p.pid, dev, p.ino, info.exe, ctime, list(info.exec_id)))
        forked = self.lineage.get(p.pid)
        if forked and forked[0].pid != p.ppid:       # adopted since its fork: keep who launched it
            parent, grandparent = forked
        else:
            parent, grandparent = self.parents(p)
        self.procs[p.pid] = info
        self.lineage[p.pid] = (parent, grandparent)
        self.exited.pop(p.pid, None)
        self.replaced.pop(p.pid, None)
        if self.every_exe:
            self.runs.append(Conn(info, parent, grandparent, p.uid, "", -1, -1, "", "", "", 0, 0))

    def whole(self, info: ProcInfo, ex: ExecT) -> ProcInfo:
        """An exec's path and command line, whole: when the kernel's walk was
        cut short, or a name or argv filled its slot, from the file caught
        for the exec (or /proc while the process runs it); what cannot be
        had whole is marked cut, and reported."""
        exe, ondisk, cut = exec_path(ex)
        found = None
        if cut or not exe:
            whole = self.caught_path(info.exec_id)
            found = proc_from_proc_fs(info.pid, info.dev, info.ino, self.mask, info.name)
            if whole or found.exe:
                exe = whole or found.exe
                ondisk = not exe.endswith(" (deleted)")
            elif exe:
                exe = marked_cut(exe, f"device {info.dev}, inode {info.ino}")
                self.alerts.append(f"the path of {exe} (pid {info.pid}) has a name longer than the kernel's event "
                                   "keeps, and the process was gone before picosnitch could read it whole")
        cmdline = info.cmdline
        if ex.complete & EXEC_ARGS_CUT:
            found = found or proc_from_proc_fs(info.pid, info.dev, info.ino, self.mask, info.name)
            cmdline = found.cmdline or marked_cut(cmdline + "…", f"{ARGS_LEN - 1} bytes of a longer command line")
        return dataclasses.replace(info, exe=exe, ondisk=ondisk, cmdline=cmdline)

    def on_fork(self, hdr: EventHdrT, _: EmptyT) -> None:
        p = hdr.proc
        forker = self.lookup(p.ppid, p.pdev, p.pino, "")
        known = self.lineage.get(p.ppid)
        self.lineage[p.pid] = (forker, known[0] if known else self.lookup(p.gppid, p.gpdev, p.gpino, ""))
        if forker.ino and (forker.dev, forker.ino) == (kernel_dev_to_user(p.dev), p.ino):
            self.procs[p.pid] = dataclasses.replace(forker, pid=p.pid)
        self.exited.pop(p.pid, None)

    def on_exit(self, hdr: EventHdrT, _: EmptyT) -> None:
        self.exited[hdr.proc.pid] = self.window

    def parents(self, p: ProcT) -> typing.Tuple[ProcInfo, ProcInfo]:
        """Parent and grandparent of a process as the kernel sees them now."""
        return self.lookup(p.ppid, p.pdev, p.pino, ""), self.lookup(p.gppid, p.gpdev, p.gpino, "")

    def lookup(self, pid: int, kdev: int, ino: int, comm: str) -> ProcInfo:
        """A process image by pid and the executable identity the kernel reported."""
        dev = kernel_dev_to_user(kdev)
        info = self.procs.get(pid)
        if info is None or (info.dev, info.ino) != (dev, ino):
            if pid == 0 or not ino:
                return ProcInfo(pid, "", comm, "", dev, ino)
            name = comm or read_proc_text(pid, "comm").strip()
            info = proc_from_proc_fs(pid, dev, ino, self.mask, name)
            if info.exe:            # running since before picosnitch saw it: hash it now
                info.exec_id = (pid, 0)
                self.notify_exec(ExecNotice(pid, dev, ino, info.exe, 0, [pid, 0]))
            self.procs[pid] = info
            self.lineage.pop(pid, None)
        return info

    def context(self, hdr: EventHdrT, conn: ConnT) -> Context:
        """Who moved a process's first bytes in a window (or started its connect), as of now."""
        p = hdr.proc
        proc = self.lookup(p.pid, conn.info.dev, conn.info.ino, p.comm.decode("utf-8", "replace"))
        if p.flags & EXE_REPLACED and p.pid not in self.replaced:
            self.replaced[p.pid] = proc.exe
            shown = read_proc_link(p.pid, "exe")
            self.alerts.append(f"pid {p.pid} ({proc.exe or proc.name}) replaced its executable without running "
                               f"another (prctl PR_SET_MM)" + (f", so /proc/{p.pid}/exe names {shown}" if shown else "")
                               + ": its traffic stays logged under the executable it ran")
        parent, grandparent = self.lineage.get(p.pid) or self.parents(p)
        if conn.key.sk:
            self.protos[conn.key.prot] = conn.info.proto
        return Context(proc, parent, grandparent, self.window)

    # -- connections ---------------------------------------------------------
    def on_conn(self, hdr: EventHdrT, conn: ConnT) -> None:
        self.contexts[(conn.key.pid, conn.key.exe)] = self.context(hdr, conn)

    def on_dns(self, hdr: EventHdrT, dns: DnsT) -> None:
        host = dns.host.decode("utf-8", "replace")
        if not host or ip_network(host.split("%")[0]):     # an address literal names nothing
            return
        for i in range(min(dns.count, DNS_ADDRS)):
            addr = format_addr(dns.families[i], bytes(dns.addrs[i]))
            for key in ((hdr.proc.pid, addr), (0, addr)):     # this process's answer, and anyone's
                if addr:
                    self.domains[key] = host
                    self.domains.move_to_end(key)
        while len(self.domains) > DOMAIN_CACHE:
            self.domains.popitem(last=False)

    def lost_context(self, key: ConnKeyT) -> Context:
        """What /proc still says of a connection whose event was lost."""
        try:
            st = os.stat(f"/proc/{key.pid}/exe")
            proc = proc_from_proc_fs(key.pid, st.st_dev, st.st_ino, self.mask, read_proc_text(key.pid, "comm").strip())
        except OSError:
            proc = self.procs.get(key.pid) or ProcInfo(key.pid, "", read_proc_text(key.pid, "comm").strip(), "", 0, 0)
        stat_fields = read_proc_text(key.pid, "stat").rsplit(")", 1)[-1].split()
        ppid = int(stat_fields[1]) if len(stat_fields) > 1 else 0
        parent = self.procs.get(ppid) or ProcInfo(ppid, "", "", "", 0, 0)
        parent, grandparent = self.lineage.get(key.pid) or (parent, NO_PROC)
        return Context(proc, parent, grandparent, self.window)

    def who(self, key: typing.Union[bytes, ConnKeyT]) -> typing.Tuple[Context, str]:
        """Who a key's process is (its announcement, else what /proc still
        says), and its protocol's name."""
        key = as_key(key)
        context = self.contexts.get((key.pid, key.exe))
        if context is None:
            context = self.lost_context(key)
            self.contexts[(key.pid, key.exe)] = context
        elif context.window != self.window:
            self.contexts[(key.pid, key.exe)] = context._replace(window=self.window)      # (still in use)
        proto = self.protos.get(key.prot, -1)
        return context, proto_name(key.family, proto) if proto >= 0 else "unknown"

    def whose(self, key: typing.Union[bytes, ConnKeyT], val) -> typing.Tuple[Context, str]:
        """who(), for a window's row: one of no known executable is reported."""
        key = as_key(key)
        context, proto = self.who(key)
        if not context.proc.exe:
            self.unattributed.append(f"pid {key.pid} ({context.proc.name or 'unknown'}), "
                                     f"{val.send + val.recv} bytes")
        return context, proto

    def conn(self, key: typing.Union[bytes, ConnKeyT], val: ConnValT,
             context: typing.Optional[typing.Tuple[Context, str]] = None) -> Conn:
        """A key's row (context: who(), when it is not a window's row)."""
        return self.conns([(key, val)], context)[0]

    def conns(self, entries: typing.List[typing.Tuple[typing.Union[bytes, ConnKeyT], ConnValT]],
              context: typing.Optional[typing.Tuple[Context, str]] = None) -> typing.List[Conn]:
        """A window's rows, a key's each (context: who() for all of them,
        when they are not a window's rows). Who a process is is found once
        (its keys share it), and each key is read in one step (CONN_KEY)."""
        out, found, unpack, domains = [], {}, CONN_KEY.unpack_from, self.domains
        addresses, address = self.addresses, self.address
        for key, val in entries:
            _, exe, prot, pid, uid, raddr, laddr, rport, lport, family, _ = unpack(key)
            who = context or found.get((pid, exe, prot, family))
            if who is None:
                who = found[(pid, exe, prot, family)] = self.who(key)
            if not who[0].proc.exe and not context:
                self.whose(key, val)        # (reported, a key each)
            proc = who[0]
            raddr = addresses.get((family, raddr)) or address(family, raddr)
            laddr = addresses.get((family, laddr)) or address(family, laddr)
            # (the name the process itself looked up for the address, else the latest anyone did)
            domain = (domains.get((pid, raddr)) or domains.get((0, raddr), "")) if domains else ""
            out.append(Conn(proc.proc, proc.parent, proc.grandparent, uid, who[1], lport, rport, laddr, raddr, domain,
                            val.send, val.recv))
        return out

    def address(self, family: int, raw: bytes) -> str:
        """format_addr(family, raw), remembered (a window's connections share a few addresses)."""
        found = self.addresses.get((family, raw))
        if found is None:
            if len(self.addresses) >= ADDRESS_CACHE:
                self.addresses.clear()
            found = self.addresses[(family, raw)] = format_addr(family, raw)
        return found

    def merged_conn(self, key: ConnKeyT, val: MergedT,
                    context: typing.Optional[typing.Tuple[Context, str]] = None) -> Conn:
        """A process's connections that found no room of their own in a
        window, as one row: ports MERGED_PORT, no local address, and the
        number of connections where the remote address would be."""
        context, proto = context or self.whose(key, val)
        return Conn(context.proc, context.parent, context.grandparent, key.uid, proto, MERGED_PORT, MERGED_PORT,
                    "", merged_text(val.conns), "", val.send, val.recv)

    def take_runs(self) -> typing.List[Conn]:
        runs, self.runs = self.runs, []
        return runs

    def take_unattributed(self) -> typing.List[str]:
        found, self.unattributed = self.unattributed, []
        return found

    def take_alerts(self) -> typing.List[str]:
        found, self.alerts = self.alerts, []
        return found

    def end_window(self) -> None:
        """Forget exited processes, and contexts, two windows on."""
        self.window += 1
        for pid in [pid for pid, w in self.exited.items() if w < self.window - 1]:
            self.procs.pop(pid, None)
            self.lineage.pop(pid, None)
            self.replaced.pop(pid, None)
            del self.exited[pid]
        for key in [k for k, v in self.contexts.items() if v.window < self.window - 1]:
            del self.contexts[key]


class Outbox:
    """Messages to one peer, sent from a thread so that the reader never waits
    for a slow or dead peer; a descriptor sent with one is closed here once
    it is sent. Beyond `limit` waiting, the oldest are dropped and counted
    (take_dropped)."""

    def __init__(self, channel: Channel, limit: int):
        self.channel, self.limit, self.dropped = channel, limit, 0
        self.queue: "collections.deque" = collections.deque()
        self.cond = threading.Condition()
        threading.Thread(target=self.run, name="outbox", daemon=True).start()

    def put(self, message: typing.NamedTuple, fd: int = -1) -> None:
        with self.cond:
            self.queue.append((message, fd))
            while len(self.queue) > self.limit:
                _, dropped_fd = self.queue.popleft()
                if dropped_fd >= 0:
                    os.close(dropped_fd)
                self.dropped += 1
            self.cond.notify()

    def take_dropped(self) -> int:
        with self.cond:
            dropped, self.dropped = self.dropped, 0
        return dropped

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                message, fd = self.queue.popleft()
            try:
                self.channel.send(message, fds=[fd] if fd >= 0 else ())
            except OSError:             # too many files in flight (ETOOMANYREFS), or worse: without it
                try:
                    self.channel.send(message)
                except (OSError, ValueError):
                    with self.cond:
                        self.dropped += 1
            except ValueError:
                with self.cond:
                    self.dropped += 1
            finally:
                if fd >= 0:
                    os.close(fd)


class Catcher:
    """Opens each executable as soon as the reader learns that it runs,
    before the process can exit (a program may run for a millisecond, and a
    memfd is gone with its process), and sends the file to the monitor with
    the notice, with its change time then (reading it makes the kernel give
    any later change a change time of its own) and whether the process
    still ran it (the kernel refuses writes to a running executable on disk,
    so it had not changed since the exec). This is why the reader keeps
    CAP_DAC_READ_SEARCH: the files may be any user's."""

    def __init__(self, outbox: Outbox, mask: int):
        self.outbox, self.mask = outbox, mask
        self.caught: typing.Dict[tuple, typing.Tuple[int, int, bool]] = {}    # exec -> (fd, ctime, alive)

    def first(self, events: list) -> None:
        """Catch the executables of a batch's execs before anything else is done with it."""
        for name, hdr, _ in events:
            if name == "EXEC":
                self.caught[(hdr.proc.pid, hdr.time)] = self.catch(hdr.proc.pid, kernel_dev_to_user(hdr.proc.dev),
                                                                   hdr.proc.ino)

    def catch(self, pid: int, dev: int, ino: int) -> typing.Tuple[int, int, bool]:
        try:
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1, 0, False
        try:
            st = os.fstat(fd)
            if (st.st_dev & self.mask, st.st_ino) == (dev & self.mask, ino) and stat_module.S_ISREG(st.st_mode):
                alive = os.stat(f"/proc/{pid}/exe").st_ino == ino
                return fd, st.st_ctime_ns, alive and st.st_nlink > 0
        except OSError:
            pass
        os.close(fd)
        return -1, 0, False

    def path(self, exec_id: tuple) -> str:
        """The whole path of the file caught for an exec (as the kernel names
        it in /proc/PID/exe), or '' if none was caught."""
        fd = self.caught.get(tuple(exec_id), (-1, 0, False))[0]
        try:
            return os.fsencode(os.readlink(f"/proc/self/fd/{fd}")).decode("utf-8", "replace") if fd >= 0 else ""
        except OSError:
            return ""

    def __call__(self, notice: ExecNotice) -> None:
        fd, ctime, alive = self.caught.pop(tuple(notice.exec_id), None) or self.catch(notice.pid, notice.dev, notice.ino)
        self.outbox.put(notice._replace(caught=ctime, alive=alive) if fd >= 0 else notice, fd)


class WindowSender:
    """Sends each window to the primary, in parts, from a thread, and keeps it
    until the primary confirms it (Ack). A primary that starts says which
    window it wrote last (Hello), and everything after that is sent again.
    At most WINDOWS_KEPT windows are kept; older ones are dropped and counted."""
    PART = 256      # connections per message (fewer where names are long: parts())
    COMMAND_KEPT = 32768    # characters of a command line kept in a row too big to send whole

    def __init__(self, channel: Channel):
        self.channel = channel
        self.windows: "collections.OrderedDict[int, typing.List[Batch]]" = collections.OrderedDict()
        self.todo: "collections.deque[Batch]" = collections.deque()
        self.cond = threading.Condition()
        self.dropped: typing.List[int] = []         # connections of each dropped window
        self.cut: typing.List[str] = []             # processes whose command line was cut to send their row
        self.stopped = False
        threading.Thread(target=self.send_loop, name="windows", daemon=True).start()
        threading.Thread(target=self.ack_loop, name="acks", daemon=True).start()

    @staticmethod
    def encoded_most(p: ProcInfo) -> int:
        """The most a process takes in a message (every character escaped)."""
        return 6 * (len(p.exe) + len(p.name) + len(p.cmdline)) + 200

    def fitted(self, c: Conn) -> Conn:
        """A row whose processes' names could pass MESSAGE_MAX alone, with their command lines cut (and said so)."""
        cut = lambda p: p if len(p.cmdline) <= self.COMMAND_KEPT else dataclasses.replace(p, cmdline=marked_cut(
            p.cmdline[:self.COMMAND_KEPT] + "…", f"the first {self.COMMAND_KEPT} characters of {len(p.cmdline)}"))
        self.cut.append(f"pid {c.proc.pid} ({c.proc.exe or c.proc.name})")
        return dataclasses.replace(c, proc=cut(c.proc), parent=cut(c.parent), grandparent=cut(c.grandparent))

    def parts(self, conns: typing.List[Conn]) -> typing.List[typing.List[Conn]]:
        """A window's connections in parts of PART at most, and of at most half
        MESSAGE_MAX by the most their names may take: a program's very long
        command line can keep no other row from the log."""
        out: typing.List[typing.List[Conn]] = [[]]
        size, seen = 0, set()       # (the ids of the processes the part names already)
        for c in conns:
            if id(c.proc) in seen and id(c.parent) in seen and id(c.grandparent) in seen:    # (mostly)
                new, cost = {}, 300
            else:
                new = {id(p): p for p in (c.proc, c.parent, c.grandparent) if id(p) not in seen}
                cost = 300 + sum(self.encoded_most(p) for p in new.values())
            if out[-1] and (len(out[-1]) >= self.PART or size + cost > MESSAGE_MAX // 2):
                out.append([])
                size, seen = 0, set()
                new = {id(p): p for p in (c.proc, c.parent, c.grandparent)}
                cost = 300 + sum(self.encoded_most(p) for p in new.values())
            if cost > MESSAGE_MAX - (64 << 10):
                c = self.fitted(c)
            out[-1].append(c)
            size += cost
            seen.update(new)
        return out

    def put(self, seq: int, conns: typing.List[Conn]) -> None:
        chunks = self.parts(conns)
        contime = now_text()
        parts = [Batch(seq, i, i == len(chunks) - 1, contime, chunk) for i, chunk in enumerate(chunks)]
        with self.cond:
            self.windows[seq] = parts
            self.todo.extend(parts)
            while len(self.windows) > WINDOWS_KEPT:
                old, lost = self.windows.popitem(last=False)
                self.dropped.append(sum(len(p.conns) for p in lost))
                self.todo = collections.deque(p for p in self.todo if getattr(p, "seq", None) != old)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.todo.append(Stop())
            self.cond.notify_all()

    def sent(self, seq: int) -> bool:
        """Whether every part of window seq has gone into the channel."""
        with self.cond:
            return seq in self.windows and all(p.seq != seq for p in self.todo if isinstance(p, Batch))

    def wait_sent(self, timeout: float) -> bool:
        """True once everything queued has gone into the channel."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.todo and time.monotonic() < deadline:
                self.cond.wait(0.1)
            return not self.todo

    def take_dropped(self) -> typing.List[int]:
        with self.cond:
            dropped, self.dropped = self.dropped, []
        return dropped

    def take_cut(self) -> typing.List[str]:
        cut, self.cut = self.cut, []
        return cut

    def send_loop(self) -> None:
        while True:
            with self.cond:
                while not self.todo:
                    self.cond.wait()
                message = self.todo[0]
            try:
                self.channel.send(message)
            except (OSError, ValueError):       # cannot go as it is: it is counted as dropped
                with self.cond:
                    self.dropped.append(len(getattr(message, "conns", ())))
            with self.cond:
                if self.todo and self.todo[0] is message:
                    self.todo.popleft()
                self.cond.notify_all()

    def ack_loop(self) -> None:
        while True:
            try:
                message = self.channel.recv()       # typed by decode_message: seq is an int
            except (ValueError, OSError):
                continue
            with self.cond:
                if isinstance(message, Ack):
                    for seq in [s for s in self.windows if s <= message.seq]:
                        del self.windows[seq]
                elif isinstance(message, Hello):       # a new primary: send again what it lacks
                    pending = [p for seq, parts in self.windows.items() if seq > message.seq for p in parts]
                    again = {id(p) for p in pending}
                    self.todo = collections.deque(pending + [p for p in self.todo if id(p) not in again])
                    self.cond.notify_all()


LIVE_SECONDS = 1.0        # how often the event stream is told what flowed, while it has readers
LIVE_CONNS = 500          # connections a tick tells of one by one (the rest: summed per program)
LIVE_UNTOLD = 65536       # connections of closed windows waiting for a tick the stream can take, at most
LIVE_COMMAND = 1024       # characters of a command line the stream is told (the log keeps it whole)


class LiveReading:
    """What the event stream (section 17) is told while it has readers: each
    LIVE_SECONDS, what every connection moved since the last tick. It is an
    extra reading of the maps of the window being filled, which takes
    nothing from them: a window's bytes stay the window's. What a window's
    closing read finds past its last tick goes with the next tick, so that
    the ticks of a window add up to what the window logs. A tick the stream
    cannot take now is not lost: the next one carries its bytes. The first
    reading after the stream gains a reader is only a baseline."""

    def __init__(self, channel: typing.Optional[Channel], reporter: typing.Optional["Reporter"] = None):
        self.channel, self.readers, self.due, self.limit = channel, 0, 0.0, LIVE_CONNS
        self.reporter = reporter or Reporter()
        self.window, self.baseline = -1, True          # the window whose counts told holds
        self.told: typing.Dict[bytes, typing.Tuple[int, int]] = {}     # key -> (send, recv) told of so far
        self.known: typing.Set[bytes] = set()          # keys told of (in this window or the last)
        self.closing: typing.List[tuple] = []          # a closed window's bytes not told of yet (moved())
        self.pids: typing.Set[int] = set()             # processes told of that had not exited

    def listen(self) -> bool:
        """Whether the stream has readers now (it says so when that changes)."""
        while self.channel is not None:
            try:
                message = self.channel.recv(0)
            except (ValueError, OSError):
                break
            if message is None:
                break
            if isinstance(message, Listening):
                if message.readers and not self.readers:
                    self.window, self.baseline, self.closing, self.due = -1, True, [], 0.0
                self.readers = message.readers
        return self.readers > 0

    @staticmethod
    def moved(window: "Window", told: typing.Dict[bytes, typing.Tuple[int, int]], known: typing.Set[bytes]
              ) -> typing.List[tuple]:
        """(key id, key, bytes sent, received since told, merged connections
        or 0) of each connection of a window that moved bytes or is new."""
        out = []
        for prefix, entries in ((b"", window.entries), (b"m", window.merged)):
            for key, value in entries:
                kid = prefix + bytes(key)
                send, recv = told.get(kid, (0, 0))
                if value.send != send or value.recv != recv or kid not in known:
                    out.append((kid, key, value.send - send, value.recv - recv, getattr(value, "conns", 0)))
        return out

    @staticmethod
    def combined(moved: typing.List[tuple]) -> typing.List[tuple]:
        """moved() entries with one per key (a key closing a window and going on in the next)."""
        out: typing.Dict[bytes, tuple] = {}
        for kid, key, send, recv, merged in moved:
            if kid in out:
                _, _, s, r, m = out[kid]
                send, recv, merged = send + s, recv + r, max(merged, m)
            out[kid] = (kid, key, send, recv, merged)
        return list(out.values())

    def closed(self, window: "Window") -> None:
        """A window closed: what its closing read found past the last tick waits for the next."""
        if window.number != self.window:
            return
        if self.readers:
            self.closing = self.combined(self.closing + self.moved(window, self.told, self.known))
            if len(self.closing) > LIVE_UNTOLD:         # (the stream takes nothing: start over when it does)
                self.closing, self.baseline = [], True
        self.known &= {prefix + bytes(k) for prefix, entries in ((b"", window.entries), (b"m", window.merged))
                       for k, _ in entries}          # (those that may go on in the next window)
        self.window, self.told = window.number + 1, {}

    def rows(self, moved: typing.List[tuple], tracker: "Tracker") -> typing.Tuple[typing.List[Conn], typing.List[int]]:
        """The rows of a tick, new connections first, then the largest; past
        self.limit, the rest of each program's are summed in one row that
        says how many they were."""
        moved = sorted(moved, key=lambda m: (m[0] in self.known, -(m[2] + m[3])))
        conns, new, rest = [], [], {}
        for kid, key, send, recv, merged in moved[:self.limit]:
            if merged:
                conns.append(tracker.merged_conn(key, MergedT(send, recv, merged), tracker.who(key)))
                continue
            if kid not in self.known:
                new.append(len(conns))
            conns.append(tracker.conn(key, ConnValT(send, recv), tracker.who(key)))
        for kid, key, send, recv, merged in moved[self.limit:]:
            key = as_key(key)
            group = (key.exe, key.uid, key.prot, key.family)
            first, s, r, n = rest.get(group, (key, 0, 0, 0))
            rest[group] = (first, s + send, r + recv, n + max(merged, 1))
        for key, send, recv, n in rest.values():
            conns.append(tracker.merged_conn(key, MergedT(send, recv, n), tracker.who(key)))
        told: typing.Dict[int, ProcInfo] = {}      # (a parent by its pid, exe and name only; a command cut)
        for c in conns:
            if id(c.proc) not in told:
                told[id(c.proc)] = c.proc if len(c.proc.cmdline) <= LIVE_COMMAND else dataclasses.replace(
                    c.proc, cmdline=marked_cut(c.proc.cmdline[:LIVE_COMMAND] + "…", "the log has it whole"))
            if id(c.parent) not in told:
                told[id(c.parent)] = dataclasses.replace(c.parent, cmdline="")
            c.proc, c.parent, c.grandparent = told[id(c.proc)], told[id(c.parent)], NO_PROC
        return conns, new

    def tick(self, capture: "Capture", tracker: "Tracker") -> None:
        """Tell the stream what moved since the last tick (its events polled first)."""
        self.due = time.monotonic() + LIVE_SECONDS
        capture.poll(0)
        window = capture.peek()
        capture.poll(0)             # (who made the keys that came while it was read)
        if window.number != self.window:
            self.window, self.told = window.number, {}
        moved = self.combined(self.closing + self.moved(window, self.told, self.known))
        if not self.baseline:
            conns, new = self.rows(moved, tracker)
            exited = [pid for pid in self.pids if pid in tracker.exited]
            try:
                if not self.channel.send(LiveTick(time.time(), conns, new, exited), block=False):
                    return
            except ValueError:          # (too big: fewer rows of their own; at one, start over)
                if self.limit == 1:
                    self.baseline, self.closing = True, []
                    self.reporter.error("a second of the live event stream was too big to send, even with one "
                                        "connection named; its readers miss that second's bytes", notify=False)
                self.limit = max(1, self.limit // 2)
                return
            except OSError:
                return
            self.limit = min(LIVE_CONNS, self.limit * 2)
            self.pids = (self.pids | {c.proc.pid for c in conns}) - set(exited)
        self.baseline, self.closing = False, []
        for prefix, entries in ((b"", window.entries), (b"m", window.merged)):
            for key, value in entries:
                self.told[prefix + bytes(key)] = (value.send, value.recv)
        self.known.update(m[0] for m in moved)


def reader_main(rt: Runtime, downtime: typing.Optional[typing.Tuple[float, float]] = None) -> None:
    """Process entry: poll and drain window by window. downtime is when the
    previous reader died and when this one was started, if it is a restart."""
    execs = Outbox(rt.exec_tx, EXEC_NOTICES_KEPT)
    windows = WindowSender(rt.batch_tx)
    catcher = Catcher(execs, rt.st_dev_mask)
    tracker = Tracker(rt.st_dev_mask, catcher, rt.config.every_exe, rt.kernel.protos, catcher.path)
    capture = Capture(rt.kernel, tracker.handle, catcher.first)
    stopping = rt.stopping
    leftover = capture.leftover()
    if leftover.entries or leftover.merged:
        windows.put(leftover.number, window_conns(tracker, leftover))
    rt.ready_tx.send(Ready(capture.mode))
    if downtime:
        lost = capture.problems()
        span = f"{time.strftime('%H:%M:%S', time.localtime(downtime[0]))} to " \
               f"{time.strftime('%H:%M:%S', time.localtime(downtime[1]))}"
        if lost:
            rt.reporter.error(f"while the reader was restarting ({span}): " + "; ".join(lost))
        else:
            rt.reporter.info(f"the reader restarted ({span}); the kernel kept counting, nothing was lost")
    window = rt.config.db_write_limit_seconds
    started = time.monotonic()
    live = LiveReading(rt.live_tx, rt.reporter)
    while not stopping():
        capture.poll(int(max(0.0, min(started + window - time.monotonic(), 0.1)) * 1000))
        capture.clear_sent(windows.sent)
        now = time.monotonic()
        if now >= started + window or (now >= started + SHORTEST_WINDOW and capture.near_full()):
            started = now if now < started + 2 * window else started + window      # (late: starts now)
            send_window(rt, capture, tracker, windows, execs, live, final=False)
        if live.listen() and time.monotonic() >= live.due:
            live.tick(capture, tracker)
    send_window(rt, capture, tracker, windows, execs, live, final=True)
    windows.stop()
    if windows.wait_sent(STOP_TIMEOUT):
        capture.clear_sent(lambda seq: True)
    else:
        rt.reporter.error("the primary did not take the last windows before the stop")


def window_conns(tracker: Tracker, window: Window) -> typing.List[Conn]:
    return tracker.conns(window.entries) + [tracker.merged_conn(k, v) for k, v in window.merged]


def merged_report(window: Window, room: int, conns: typing.List[Conn]) -> str:
    """What a window merged, by program: once a window, when it did."""
    merged = sorted((c for c in conns if c.lport == MERGED_PORT), key=lambda c: -(c.send + c.recv))
    total = sum(m.conns for _, m in window.merged)
    parts = [f"{c.proc.exe or c.proc.name} (pid {c.proc.pid}, {c.proto}): {c.raddr}, "
             f"{c.send:,} bytes sent, {c.recv:,} received" for c in merged[:5]]
    return (f"window {window.number}: more new connections than the kernel's maps have room for ({room:,}, "
            f"\"Connections per window\"): {total:,} connections were merged into one row per program, with "
            f"every byte: " + "; ".join(parts) + (f"; and {len(merged) - 5} more" if len(merged) > 5 else ""))


def send_window(rt: Runtime, capture: Capture, tracker: Tracker, windows: WindowSender, execs: Outbox,
                live: LiveReading, final: bool) -> None:
    closed = capture.end_window(final)
    for i, window in enumerate(closed):
        live.closed(window)
        conns = window_conns(tracker, window) + (tracker.take_runs() if i == len(closed) - 1 else [])
        windows.put(window.number, conns)
        if window.merged:           # (logged every window; shown at most once a MERGES_SHOWN)
            shown_now = time.monotonic() - capture.merge_shown >= MERGES_SHOWN
            capture.merge_shown = time.monotonic() if shown_now else capture.merge_shown
            rt.reporter.error(merged_report(window, capture.room, conns), notify=shown_now)
    tracker.end_window()
    problems = capture.problems() + tracker.take_alerts()
    unattributed = tracker.take_unattributed()
    if unattributed:
        problems.append(f"{len(unattributed)} connections could not be attributed to an executable (their "
                        f"processes had exited before picosnitch could identify them, and their events were "
                        f"lost): " + "; ".join(unattributed[:5]) + (" …" if len(unattributed) > 5 else ""))
    cut = windows.take_cut()
    if cut:
        problems.append(f"{len(cut)} rows were logged with command lines cut to their first "
                        f"{WindowSender.COMMAND_KEPT} characters (whole, they were too big to send): "
                        + "; ".join(cut[:5]) + (" …" if len(cut) > 5 else ""))
    dropped = windows.take_dropped()
    if dropped:
        problems.append(f"{len(dropped)} windows ({sum(dropped)} connections) were dropped: the primary "
                        f"did not take them")
    if execs.take_dropped():
        problems.append("exec notices were dropped: the monitor is not keeping up, so some executables are "
                        "hashed later, when they may be gone")
    for problem in problems:
        rt.reporter.error(problem)

###############################################################################
# 11. hashing, FD cache and fanotify
###############################################################################
# Executables are opened as early as possible (at exec), kept open in a cache
# keyed by (st_dev & mask, st_ino), and hashed at once. fanotify (in its
# file-handle mode, which needs no CAP_SYS_ADMIN) reports modifications of
# cached files. A hash is only kept as that of what ran when nothing can
# have changed the file between the exec and the hash (see Hasher).

HASH_CHUNK = 1 << 20
HASH_MAX = 2 << 30        # bytes: no executable that big is hashed (a sparse file could keep the monitor busy)


def sha256_fd(fd: int) -> str:
    """sha256 of an open file, read from offset 0 without moving its position."""
    digest, offset = hashlib.sha256(), 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


def st_dev_mask(config: Config) -> int:
    """The configured mask, else 0 when a btrfs filesystem is mounted (its
    inodes are not unique across subvolumes), else all 32 bits."""
    if config.set_st_dev_mask is not None:
        return config.set_st_dev_mask
    with open("/proc/self/mounts") as f:
        if any(line.split()[2] == "btrfs" for line in f if len(line.split()) > 2):
            return 0
    return 0xFFFFFFFF


def open_no_links(path: str) -> int:
    """An O_PATH descriptor of an absolute path, walked one component at a
    time without following any symbolic link: a user may swap a directory
    of the path for a link to where they could not go. OSError otherwise."""
    parts = path.split("/")
    if parts[0] or any(part in (".", "..") for part in parts):
        raise OSError(errno.EINVAL, "not a plain absolute path")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = [part for part in parts if part]
        for i, name in enumerate(names):
            last = i == len(names) - 1
            step = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY),
                           dir_fd=fd)
            os.close(fd)
            fd = step
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular(pathfd: int) -> int:
    """Open the regular file an O_PATH descriptor names, for reading, without
    side effects: whatever is there now (a FIFO, a device) is never opened for
    real. OSError if it is not a regular file. Closes pathfd."""
    try:
        if not stat_module.S_ISREG(os.fstat(pathfd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.open(f"/proc/self/fd/{pathfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(pathfd)


def open_verified(pid: int, dev: int, ino: int, exe: str, mask: int, ctime: int = 0) -> typing.Tuple[int, str]:
    """Open a process's executable and check it is the file the kernel reported.

    Tries /proc/PID/exe (the process may be gone), then the path the kernel
    reported at the exec, but only when the device is checked too (mask not
    0) and the change time of the exec is known, which the file must still
    have; no link is followed. Returns (fd, '') or (-1, why it failed); the
    reasons say nothing of what was found at the path."""
    reasons = []
    try:
        fd = open_regular(os.open(f"/proc/{int(pid)}/exe", os.O_PATH | os.O_CLOEXEC))
        st = os.fstat(fd)
        if (st.st_dev & mask, st.st_ino) == (dev & mask, ino):
            return fd, ""
        os.close(fd)
        reasons.append("its process runs another executable now")
    except OSError as e:
        reasons.append("its process had exited" if e.errno in (errno.ENOENT, errno.ESRCH) else
                       f"/proc/{int(pid)}/exe: {e.strerror}")
    if exe and mask and ctime:
        why = "the file at its path is gone or not the one that ran"
        try:
            fd = open_regular(open_no_links(exe))
            st = os.fstat(fd)
            if (st.st_dev & mask, st.st_ino, st.st_ctime_ns) == (dev & mask, ino, ctime):
                return fd, ""
            os.close(fd)
            if (st.st_dev & mask, st.st_ino) == (dev & mask, ino):      # the very file: it changed
                why = (f"{exe} was changed (written, moved, deleted or given another mode) after it ran, "
                       "before picosnitch could hash it")
        except OSError:
            pass
        reasons.append(why)
    return -1, "; ".join(reasons)


def runs(pid: int, dev: int, ino: int, mask: int) -> bool:
    """Whether process pid runs that executable now (the kernel then refuses
    every write to the file: it cannot have changed since the exec)."""
    return not not_running(pid, dev, ino, mask)


def not_running(pid: int, dev: int, ino: int, mask: int) -> str:
    """Why process pid is not seen running that executable ('' when it is)."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError):
        return "its process had exited before picosnitch could hash it"
    except OSError as e:
        return f"/proc/{pid}/exe: {e.strerror}"
    if (st.st_dev & mask, st.st_ino) != (dev & mask, ino):
        return "its process had exited before picosnitch could hash it (its pid now runs another executable)"
    return ""


class _FileHandle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint32), ("type", ctypes.c_int), ("handle", ctypes.c_ubyte * 128)]


class Fanotify:
    """fanotify marks on open executables, in file-handle mode; modified()
    reports the handles of modified ones (see handle())."""
    FAN_CLOEXEC, FAN_NONBLOCK, FAN_REPORT_FID, FAN_MARK_ADD, FAN_MARK_REMOVE = 0x1, 0x2, 0x200, 0x1, 0x2
    FAN_MODIFY, FAN_CLOSE_WRITE, FAN_Q_OVERFLOW, FAN_EVENT_INFO_TYPE_FID = 0x2, 0x8, 0x4000, 1
    AT_EMPTY_PATH = 0x1000
    METADATA = struct.Struct("<IBBHQii")
    OVERFLOW = ("overflow",)     # reported when events were dropped: everything may have changed

    def __init__(self):
        self.libc = libc()
        self.libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        self.fd = self.libc.fanotify_init(self.FAN_CLOEXEC | self.FAN_NONBLOCK | self.FAN_REPORT_FID,
                                          os.O_RDONLY | os.O_LARGEFILE)
        if self.fd < 0:
            raise PicosnitchError(f"fanotify_init failed: {os.strerror(ctypes.get_errno())}")

    def handle(self, fd: int) -> tuple:
        """What fanotify will report for this file: (fsid, handle type, handle)."""
        fh, mount_id = _FileHandle(128), ctypes.c_int()
        if self.libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), self.AT_EMPTY_PATH):
            raise OSError(ctypes.get_errno(), "name_to_handle_at")
        return os.fstatvfs(fd).f_fsid, fh.type, bytes(fh.handle[:fh.bytes])

    def _mark(self, action: int, fd: int) -> None:
        if self.libc.fanotify_mark(self.fd, action, self.FAN_MODIFY | self.FAN_CLOSE_WRITE, fd, None):
            raise OSError(ctypes.get_errno(), "fanotify_mark")

    def mark(self, fd: int) -> tuple:
        """Watch an open file; its handle."""
        self._mark(self.FAN_MARK_ADD, fd)
        return self.handle(fd)

    def unmark(self, fd: int) -> None:
        try:
            self._mark(self.FAN_MARK_REMOVE, fd)
        except OSError:
            pass

    def modified(self) -> typing.List[tuple]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos + self.METADATA.size <= len(data):
                length, _, _, meta_len, mask, _, _ = self.METADATA.unpack_from(data, pos)
                if mask & self.FAN_Q_OVERFLOW:
                    out.append(self.OVERFLOW)
                info = pos + meta_len
                while info + 4 <= pos + length:
                    kind, _, size = struct.unpack_from("<BBH", data, info)
                    if kind == self.FAN_EVENT_INFO_TYPE_FID and size >= 20:
                        fsid0, fsid1, nbytes, htype = struct.unpack_from("<IIIi", data, info + 4)
                        out.append((fsid0 | fsid1 << 32, htype, bytes(data[info + 20:info + 20 + nbytes])))
                    info += max(size, 4)
                pos += length


class CacheEntry:
    """An open executable: its descriptor, its fanotify handle (None when it
    could not be watched), and the sha256 of each content version hashed
    while nothing could change it, by the file's change time (ns)."""

    def __init__(self, fd: int, handle: typing.Optional[tuple]):
        self.fd, self.handle = fd, handle
        self.versions: typing.Dict[int, str] = {}


class FdCache:
    """Open executables by (st_dev & mask, st_ino)."""

    def __init__(self, mask: int, limit: int, fanotify: Fanotify):
        self.mask, self.limit, self.fanotify = mask, limit, fanotify
        self.entries: "collections.OrderedDict[tuple, CacheEntry]" = collections.OrderedDict()
        self.by_handle: typing.Dict[tuple, tuple] = {}

    def key(self, dev: int, ino: int) -> tuple:
        return (dev & self.mask, ino)

    def open(self, pid: int, dev: int, ino: int, exe: str, fd: int = -1,
             ctime: int = 0) -> typing.Tuple[typing.Optional[CacheEntry], str]:
        """The cache entry of an executable, opening and watching it if needed
        (or taking fd, the file as the reader caught it); (None, why) when it
        cannot be opened."""
        key = self.key(dev, ino)
        if fd >= 0:
            st = os.fstat(fd)
            if key in self.entries or (st.st_dev & self.mask, st.st_ino) != key:
                os.close(fd)
                fd = -1
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key], ""
        if fd < 0:
            fd, why = open_verified(pid, dev, ino, exe, self.mask, ctime)
            if fd < 0:
                return None, why
        try:
            handle = self.fanotify.mark(fd)
        except OSError:         # a filesystem without file handles: hashes are checked by change time only
            handle = None
        entry = self.entries[key] = CacheEntry(fd, handle)
        if handle is not None:
            self.by_handle[handle] = key
        while len(self.entries) > self.limit:
            self.forget(next(iter(self.entries)))
        return entry, ""

    def forget(self, key: tuple) -> None:
        entry = self.entries.pop(key)
        if entry.handle is not None:
            self.fanotify.unmark(entry.fd)
            self.by_handle.pop(entry.handle, None)
        os.close(entry.fd)

    def apply_changes(self) -> typing.Set[tuple]:
        """Forget the hashes of files fanotify saw modified (all of them after
        an overflow); the keys of those files."""
        changed = set()
        for handle in self.fanotify.modified():
            keys = list(self.entries) if handle == Fanotify.OVERFLOW else [self.by_handle.get(handle)]
            for key in keys:
                if key in self.entries:
                    self.entries[key].versions.clear()
                    changed.add(key)
        return changed


class Hasher:
    """sha256 of what a process executed, given only when nothing can have
    changed the file from the exec to the end of the hash:

    - from the exec to the moment the reader opened it (the catch, section
      10): the process still ran it then, or its change time was still the
      one the kernel saw at the exec;
    - from the catch to the end of the hash: its change time never moved
      (once read, the kernel gives any change a change time of its own),
      and fanotify saw no modification while it was hashed.

    Without a catch (the process was gone), the file is opened here, and its
    change time must be the one of the exec. Otherwise the answer is no hash
    and why, naming the executable. (A change made before the catch, in the
    same clock tick as the change before the exec, keeps the change time:
    the README lists this limit.)"""

    def __init__(self, cache: FdCache):
        self.cache = cache

    def hash(self, pid: int, dev: int, ino: int, exe: str, ctime: int, fd: int = -1, caught: int = 0,
             alive: bool = False) -> typing.Tuple[str, str]:
        name = exe or "the executable"
        entry, why = self.cache.open(pid, dev, ino, exe, fd, ctime)
        if entry is None:
            return "", why
        size = os.fstat(entry.fd).st_size
        if size > HASH_MAX:
            return "", f"{name} is {size / 2 ** 30:.1f} GiB, more than picosnitch hashes ({HASH_MAX >> 30} GiB)"
        key = self.cache.key(dev, ino)
        self.cache.apply_changes()
        now = os.fstat(entry.fd).st_ctime_ns
        if caught and not alive and ctime and caught != ctime:
            return "", f"{name} was changed after it ran, before picosnitch could open it"
        if (caught or ctime) and now != (caught or ctime):
            return "", (f"{name} was changed (written, moved, deleted or given another mode) after it ran, "
                        "before picosnitch could hash it")
        sha = entry.versions.get(now) or sha256_fd(entry.fd)
        if key in self.cache.apply_changes() or os.fstat(entry.fd).st_ctime_ns != now:
            return "", f"{name} was modified while picosnitch hashed it"
        entry.versions[now] = sha
        return sha, ""

###############################################################################
# 12. monitor process
###############################################################################
# Runs as root with two capabilities left: CAP_DAC_READ_SEARCH (to open any
# user's executables) and CAP_SYS_PTRACE (to open them through /proc/PID/exe).
# Hash requests come from the primary, which runs as the user: they are
# answered only for executables that processes run or ran, never by opening
# a path the request names.

EXEC_RESULTS = 65536      # hashes kept by exec, for the primary to ask for
INBOX_FILES = 256         # files of exec notices held while waiting to be hashed
HASH_REQUEST_MAX = 2048   # executables asked about in one hash request


def set_nofile(limit: typing.Optional[int]) -> int:
    """Apply "Set RLIMIT_NOFILE" and return how many executables to keep open."""
    import resource
    if limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    return max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64)


class Monitor:
    """Hashes each executable when it runs, and answers for it later. A thread
    takes the exec notices (and their files) off the channel at once, so that
    files never pile up in flight while a big executable is being hashed;
    beyond INBOX_FILES waiting, a notice's file is closed, and the process
    is opened again through /proc when its turn comes."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.fanotify = Fanotify()
        self.cache = FdCache(rt.st_dev_mask, set_nofile(rt.config.set_rlimit_nofile), self.fanotify)
        self.hasher = Hasher(self.cache)
        self.results: "collections.OrderedDict[tuple, typing.Tuple[str, str]]" = collections.OrderedDict()
        self.inbox: "collections.deque[typing.Tuple[ExecNotice, int]]" = collections.deque()
        self.lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if rt.exec_rx is not None:
            threading.Thread(target=self.receive, name="exec-notices", daemon=True).start()

    def receive(self) -> None:
        while True:
            try:
                message, fds = self.rt.exec_rx.recv_with_fds()
            except (ValueError, OSError):
                continue
            for fd in fds[1:] if isinstance(message, ExecNotice) else fds:
                os.close(fd)
            if not isinstance(message, ExecNotice):
                continue
            fd = fds[0] if fds else -1
            with self.lock:
                if fd >= 0 and sum(1 for _, f in self.inbox if f >= 0) >= INBOX_FILES:
                    os.close(fd)
                    fd = -1
                self.inbox.append((message, fd))
            try:
                os.write(self.wake_w, b"x")
            except BlockingIOError:
                pass

    def on_exec(self, n: ExecNotice, fd: int = -1) -> None:
        self.results[(*n.exec_id, n.dev, n.ino)] = self.hasher.hash(n.pid, n.dev, n.ino, n.exe, n.ctime, fd,
                                                                    n.caught, n.alive)
        while len(self.results) > EXEC_RESULTS:
            self.results.popitem(last=False)

    def answer(self, request: HashRequest) -> HashAnswer:
        """[sha256, why not] for each [pid, dev, ino, exe, ctime, exec_id] asked
        (at most HASH_REQUEST_MAX). Only a process that runs the file now is
        opened (through /proc/PID/exe): never a path the request names."""
        results = []
        for item in request.procs[:HASH_REQUEST_MAX]:
            try:
                p = HashItem.checked(item)
                found = self.results.get((*p.exec_id, p.dev, p.ino))
                if found is None:
                    why = not_running(p.pid, p.dev, p.ino, self.cache.mask)
                    found = ("", why) if why else self.hasher.hash(p.pid, p.dev, p.ino, "", p.ctime)
                results.append(list(found))
            except (ValueError, OSError) as e:
                results.append(["", f"not hashed ({e})"])
        return HashAnswer(request.id if isinstance(request.id, int) else 0, results)

    def run(self) -> None:
        hashes = self.rt.hash_monitor
        while not self.rt.stopping():
            ready = select.select([self.wake_r, hashes, self.fanotify.fd], [], [], 1)[0]
            self.cache.apply_changes()
            if self.wake_r in ready:
                while True:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        break
            while True:                                  # execs first: they race with changes
                with self.lock:
                    if not self.inbox:
                        break
                    notice, fd = self.inbox.popleft()
                self.on_exec(notice, fd)
            if hashes in ready:
                try:
                    message = hashes.recv()
                    if isinstance(message, HashRequest):
                        hashes.send(self.answer(message))
                    self.rt.reporter.working("hash-requests")
                except (ValueError, OSError) as e:
                    self.rt.reporter.failing("hash-requests", f"a hash request from the primary was refused ({e})")


def monitor_main(rt: Runtime) -> None:
    """Process entry: hash executables as they run, answer hash requests."""
    Monitor(rt).run()

###############################################################################
# 13. notifications
###############################################################################
# Every process reports through one Reporter; its reports go to the notifier,
# which runs as picosnitch's account: it writes error.log and exe.log in the
# state directory, each line dated when its report happened, and hands each
# report on as a notice to the desktop process. That one runs as the user (a
# session bus admits only its owner), so the user's programs can kill it: it
# only shows notices and says which it has shown. What it has not shown waits
# with the notifier, over a stop in the private directory, and is shown when
# it runs again, with the time it happened. When a log cannot be written (a
# full disk), the notification still goes out.

NOTIFY_RETRY_SECONDS = 30
NOTIFY_KEEP = 1000          # notices waiting to be shown, at most (older ones are counted, then dropped)
NOTICE_LATE = 6.0           # seconds after which a notice says when it happened (a group waits 3 s)
DESKTOP_ERROR_INTERVAL = 60.0   # seconds between two errors of the desktop process in error.log
DESKTOP_ERROR_LEN = 300     # characters of such an error logged
OUTBOX_NAME = "notices.json"        # (private) notices a stop left unshown
WARNINGS_NAME = "warnings.json"     # (private) what starts warned of, until the notifier logs it
REPORT_SUMMARIES = {"error": ("picosnitch error", ERROR_LOG_NAME), "exe": ("picosnitch", EXE_LOG_NAME)}

# What is new (Novelty, from the primary) is written to exe.log one event a
# line, and shown grouped, so that a burst (a new machine, an update) is one
# notice: a group is shown once NOVELTY_GROUP_SECONDS pass with no new event,
# or NOVELTY_GROUP_MOST after its first event at most.
NOVELTY_GROUP_SECONDS = 3.0
NOVELTY_GROUP_MOST = 30.0
NOVELTY_LISTED = 3          # events of a group told one by one, at most (a larger one is summed up)
NOVELTY_NOUNS = {"program": ("program", "programs"), "name": ("name", "names"), "hash": ("hash", "hashes"),
                 "domain": ("destination", "destinations"), "network": ("destination", "destinations"),
                 "country": ("destination", "destinations"),
                 "port": ("destination", "destinations"), "volume": ("traffic volume", "traffic volumes")}
# Mutes: per program (an executable's path), the MUTE_KINDS keys whose events
# are logged but not shown. The private copy decides; the state directory's
# copy is the user's to read. Any program running as the user may ask for a
# change (section 17), so each change is logged and shown, always.
MUTED_PROGRAMS = 10000     # programs with mutes, at most
MUTE_CHANGES = 20          # changes of mutes a minute, at most (each is a notice: a flood would bury the others)


def novelty_body(events: typing.Sequence[Novelty]) -> str:
    """What one notice says of a group of events: each one's text, a line
    each, up to NOVELTY_LISTED; else how many of which kind, and the first;
    of several kinds, a line with the first of each (a new destination is
    not hidden behind a burst of new programs)."""
    first = events[0]
    if len(events) <= NOVELTY_LISTED:
        return "\n".join(shown(e.text) for e in events)
    nouns = collections.Counter(NOVELTY_NOUNS.get(e.kind, ("thing", "things")) for e in events)
    if len(nouns) == 1:
        return f"{len(events)} new {next(iter(nouns))[1]}, the first: {shown(first.name)} ({shown(first.exe)})"
    firsts: typing.Dict[tuple, Novelty] = {}
    for e in events:
        firsts.setdefault(NOVELTY_NOUNS.get(e.kind, ("thing", "things")), e)
    counts = ", ".join(f"{n} {noun[n > 1]}" for noun, n in nouns.most_common())
    return "\n".join([f"{len(events)} things are new: {counts}; the first of each:"] +
                     [shown(e.text) for e in firsts.values()])


class Mutes:
    """The mutes the notifier keeps: {exe: [MUTE_KINDS keys, sorted]}, in
    the private directory (which decides) and, for the user to read, in the
    state directory ({"mutes": ...} in both)."""

    def __init__(self, private: str, state: str):
        self.paths = (os.path.join(private, MUTES_NAME), os.path.join(state, MUTES_NAME))
        self.by_exe: typing.Dict[str, typing.List[str]] = {}

    def load(self) -> str:
        """Read the private copy; '' or why it could not be (then none is muted)."""
        try:
            with open(self.paths[0], encoding="utf-8") as f:
                self.by_exe = mutes_checked(json.load(f))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            return f"{MUTES_NAME}: the mutes could not be read ({e}); none applies until one is set again"
        return ""

    def muted(self, exe: str, kind: str) -> bool:
        return any(kind in MUTE_KINDS[key] for key in self.by_exe.get(exe, ()))

    def change(self, exe: str, keys: typing.Sequence[str], mute: bool) -> typing.List[str]:
        """Mute (or unmute) these keys for exe, saved; the keys muted for it
        now. ValueError (nothing changed) when too many programs have mutes
        or the files cannot be written."""
        before, had = dict(self.by_exe), set(self.by_exe.get(exe, ()))
        now = sorted(had | set(keys) if mute else set() if "all" in keys else had - set(keys))  # (unmute all: every key)
        if now and exe not in self.by_exe and len(self.by_exe) >= MUTED_PROGRAMS:
            raise ValueError(f"{MUTED_PROGRAMS} programs have mutes already; unmute one first")
        if now:
            self.by_exe[exe] = now
        else:
            self.by_exe.pop(exe, None)
        try:
            data = json.dumps({"mutes": self.by_exe}, sort_keys=True).encode()
            write_atomic(self.paths[0], data)
            write_atomic(self.paths[1], data, 0o640)
        except OSError as e:
            self.by_exe = before
            raise ValueError(f"the mutes could not be saved ({e.strerror or e})")
        return now


def mutes_checked(data) -> typing.Dict[str, typing.List[str]]:
    """The mutes of a mutes.json's content; ValueError when it is not one."""
    mutes = data.get("mutes") if isinstance(data, dict) else None
    if not isinstance(mutes, dict):
        raise ValueError("not a mutes file")
    for exe, keys in mutes.items():
        if not (isinstance(keys, list) and all(isinstance(k, str) and k in MUTE_KINDS for k in keys)):
            raise ValueError(f"unknown mute kinds for {shown(exe)}")
    return {exe: sorted(set(keys)) for exe, keys in mutes.items() if keys}


def default_bus_address(uid: int, environ: typing.Mapping[str, str] = os.environ) -> str:
    return environ.get("DBUS_SESSION_BUS_ADDRESS") or f"unix:path=/run/user/{uid}/bus"


def dated(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.localtime(seconds))


def notice_body(notice: Notice, now: float) -> str:
    """What a notice says: its text, and when it happened if that was a while ago."""
    if now - notice.time < NOTICE_LATE:
        return notice.body
    same_day = time.localtime(now)[:3] == time.localtime(notice.time)[:3]
    return f"{notice.body} (at {time.strftime('%H:%M:%S', time.localtime(notice.time)) if same_day else dated(notice.time)})"


class DesktopNotifier:
    """org.freedesktop.Notifications on one bus, as the user; connects lazily,
    keeps what it could not show yet."""

    def __init__(self, address: str):
        self.address, self.iface, self.pending = address, None, collections.OrderedDict()
        self.markup = False             # the server takes the body as markup: <, > and & are escaped
        self.failed_at = 0.0
        self.last_error = ""

    def flush(self, shown: typing.Callable[[Notice], None]) -> str:
        """Show what is pending, telling `shown` of each; '' or the error that stopped it."""
        try:
            import dbus
        except ImportError as e:
            self.failed_at = time.monotonic()
            return f"desktop notifications need dbus-python ({e})"
        try:
            if self.iface is None:
                bus = dbus.bus.BusConnection(self.address)
                proxy = bus.get_object("org.freedesktop.Notifications", "/org/freedesktop/Notifications")
                self.iface = dbus.Interface(proxy, "org.freedesktop.Notifications")
                self.markup = "body-markup" in self.iface.GetCapabilities()
            while self.pending:
                notice = next(iter(self.pending.values()))
                body = notice_body(notice, time.time())
                self.iface.Notify("picosnitch", dbus.UInt32(0), "", notice.summary,
                                  html.escape(body, quote=False) if self.markup else body, [], {}, -1)
                del self.pending[notice.id]
                shown(notice)
            return ""
        except dbus.exceptions.DBusException as e:
            self.iface = None
            self.failed_at = time.monotonic()
            return e.get_dbus_message() or str(e)

    def due(self) -> bool:
        """Whether there is something to show now (failures wait before a retry)."""
        return bool(self.pending) and (self.iface is not None or time.monotonic() - self.failed_at >= NOTIFY_RETRY_SECONDS)


def desktop_main(rt: Runtime) -> None:
    """Process entry, as the user: show the notifier's notices on the user's
    session bus; say which were shown, and why none could be."""
    desktop, channel, seen = DesktopNotifier(rt.bus_address), rt.notice_rx, set()
    channel.send(Hello(0))                  # (started: the notifier sends again what waits)
    while not rt.stopping():
        try:
            message = channel.recv(0 if desktop.due() else 1)
        except ValueError:
            continue
        if isinstance(message, Notice) and message.id not in seen:
            seen.add(message.id)
            desktop.pending[message.id] = message
            continue
        if desktop.due():
            error = desktop.flush(lambda notice: channel.send(Delivered(notice.id, "")))
            if error and error != desktop.last_error:
                channel.send(Delivered(0, error))
            desktop.last_error = error


class Notifier:
    """The notifier process's state, as picosnitch's account: the logs it
    writes, and the notices not shown yet (the outbox, by id)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.unwritable: typing.Dict[str, str] = {}     # log name -> why it cannot be written
        self.outbox: "collections.OrderedDict[int, Notice]" = collections.OrderedDict()
        self.next_id, self.dropped = 1, 0
        self.quiet_until = 0.0          # (monotonic) no error of the desktop's logged before then
        # what it logs, as a line of the event stream (section 17 sets it: type, time, fields)
        self.logged: typing.Callable[[str, float, dict], None] = lambda kind, when, fields: None
        self.group: typing.List[Novelty] = []          # novelty waiting to be shown as one notice
        self.group_at = (0.0, 0.0)                     # (monotonic) its first event, its last
        self.mutes = Mutes(rt.private, rt.state)
        self.mute_times: typing.List[float] = []       # (monotonic) the changes of the last minute
        for notice in self.load_outbox():
            self.queue(notice.summary, notice.body, notice.time)
        for report in self.take_warnings():
            self.report(report)
        unread = self.mutes.load()
        if unread:
            self.report(Report("error", unread, "", time.time()))

    def outbox_path(self) -> str:
        return os.path.join(self.rt.private, OUTBOX_NAME)

    def take_warnings(self) -> typing.List[Report]:
        """What starts warned of and no notifier has logged yet: logged, and
        shown whatever the settings say of notifications (see keep_applied)."""
        path = os.path.join(self.rt.private, WARNINGS_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                kept = [Report("error", str(text), "", float(when), True, True) for when, text in json.load(f)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as e:
            kept = [Report("error", f"the warnings of a start could not be read ({e})", "", time.time(), True, True)]
        with contextlib.suppress(OSError):
            os.unlink(path)
        return kept

    def load_outbox(self) -> typing.List[Notice]:
        """The notices a stop left unshown (they are shown now, once)."""
        path = self.outbox_path()
        try:
            with open(path, encoding="utf-8") as f:
                saved = [Notice(0, float(t), str(summary), str(body)) for t, summary, body in json.load(f)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as e:
            self.write(ERROR_LOG_NAME, [f"{now_text()} {OUTBOX_NAME}: notices kept over the last stop could not "
                                        f"be read ({e}); they are lost"])
            saved = []
        with contextlib.suppress(OSError):
            os.unlink(path)
        return saved

    def save_outbox(self) -> None:
        if self.outbox:
            write_atomic(self.outbox_path(), json.dumps([[n.time, n.summary, n.body]
                                                          for n in self.outbox.values()]).encode())

    def write(self, name: str, lines: typing.List[str]) -> None:
        """Append to a log, each name in it shown (escaped); a failure is
        shown on the desktop once, until it works again."""
        try:
            append_lines(os.path.join(self.rt.state, name), [shown(line) for line in lines])
        except OSError as e:
            if name not in self.unwritable:
                self.unwritable[name] = e.strerror or str(e)
                self.queue("picosnitch error", f"{name} cannot be written ({self.unwritable[name]}); "
                                               "reports are shown here only until it can", time.time())
            return
        if self.unwritable.pop(name, None) is not None:
            self.write(ERROR_LOG_NAME, [f"{now_text()} {name} could not be written for a while; "
                                        "reports of that time were only shown as notifications"])

    def queue(self, summary: str, body: str, happened: float) -> None:
        """A notice for the desktop, kept until it says it has shown it."""
        notice = Notice(self.next_id, happened, summary, body)
        self.next_id += 1
        self.outbox[notice.id] = notice
        while len(self.outbox) > NOTIFY_KEEP:
            self.outbox.popitem(last=False)
            self.dropped += 1
        self.send(notice)

    def send(self, notice: Notice) -> None:
        with contextlib.suppress(OSError):          # (sent again when the desktop process starts)
            self.rt.notice_tx.send(notice, block=False)

    def report(self, report: Report) -> None:
        summary, log = REPORT_SUMMARIES.get(report.kind, REPORT_SUMMARIES["error"])
        detail = ["    " + line for line in report.detail.splitlines() if line.strip()]
        self.write(log, [f"{dated(report.time)} {report.text}"] + detail)
        self.logged("report", report.time, {"log": log, "text": report.text})
        if report.notify and (self.rt.config.desktop_notifications or report.always):
            self.queue(summary, shown(report.text), report.time)

    def novelty(self, event: Novelty) -> None:
        """Something new about a program: in exe.log and on the stream
        always; in the pending group unless muted or notifications are off."""
        muted = self.mutes.muted(event.exe, event.kind)
        self.write(EXE_LOG_NAME, [f"{dated(event.time)} {event.text}" + (" (muted)" if muted else "")])
        self.logged("novelty", event.time, {"kind": event.kind, "exe": event.exe, "name": event.name,
                                            "text": event.text, "muted": muted})
        if muted or not self.rt.config.desktop_notifications:
            return
        now = time.monotonic()
        self.group_at = (self.group_at[0] if self.group else now, now)
        self.group.append(event)

    def group_due(self) -> float:
        """Seconds until the pending group is to be shown (inf: none waits)."""
        if not self.group:
            return math.inf
        first, last = self.group_at
        return max(0.0, min(last + NOVELTY_GROUP_SECONDS, first + NOVELTY_GROUP_MOST) - time.monotonic())

    def show_group(self, now: bool = False) -> None:
        """The pending group as one notice, once it is due (now: at once, as at a stop)."""
        if self.group and (now or self.group_due() <= 0):
            group, self.group = self.group, []
            self.queue(REPORT_SUMMARIES["exe"][0], novelty_body(group), group[-1].time)   # (late: see NOTICE_LATE)

    def mute(self, exe: str, keys: typing.Sequence[str], mute: bool, asker: str,
             root: bool = False) -> typing.List[str]:
        """Change a program's mutes (ValueError: why not); logged and shown
        whatever the settings say, with who asked. The keys muted for it now.
        root: asked by root, whose changes the limit a minute never refuses
        (the user's programs, which share it, cannot keep the user from
        undoing a mute with sudo)."""
        clock = time.monotonic()
        self.mute_times = [t for t in self.mute_times if clock - t < 60]
        if len(self.mute_times) >= MUTE_CHANGES and not root:
            raise ValueError(f"mutes were changed {MUTE_CHANGES} times in the last minute; try again later, "
                             "or as root (sudo), whose changes are always taken")
        now = self.mutes.change(exe, keys, mute)
        self.mute_times.append(clock)
        what = "muted" if mute else "unmuted"
        self.report(Report("exe", f"notices of {', '.join(sorted(keys))} {what} for {exe} by {asker}; "
                                  f"muted for it now: {', '.join(now) or 'nothing'}", "", time.time(), True, True))
        return now

    def desktop_said(self, message: typing.NamedTuple) -> None:
        """A Hello (the desktop process started: everything waiting goes again) or a Delivered."""
        if isinstance(message, Hello):
            if self.dropped:
                self.queue("picosnitch error", f"{self.dropped} notifications were dropped while they could not "
                                               "be shown (they are in error.log and exe.log)", time.time())
                self.dropped = 0
            for notice in self.outbox.values():
                self.send(notice)
        elif isinstance(message, Delivered) and message.id:
            self.outbox.pop(message.id, None)
        elif isinstance(message, Delivered) and time.monotonic() >= self.quiet_until:
            self.quiet_until = time.monotonic() + DESKTOP_ERROR_INTERVAL       # (the user's bus writes this text)
            self.write(ERROR_LOG_NAME, [f"{now_text()} desktop notifications not delivered "
                                        f"({one_line(message.error)[:DESKTOP_ERROR_LEN]}); "
                                        f"{len(self.outbox)} kept for retry"])

    def waiting(self) -> typing.List[Channel]:
        """The channels it reads (its process's select() loop is in section 17)."""
        return [self.rt.report_rx, self.rt.notice_tx]

    def take(self, ready: typing.Collection) -> None:
        """One message from each of its channels that has one."""
        for channel in self.waiting():
            if channel not in ready:
                continue
            try:
                message = channel.recv(0)
            except ValueError:
                continue
            if channel is self.rt.report_rx and isinstance(message, Report):
                self.report(message)
            elif channel is self.rt.report_rx and isinstance(message, Novelty):
                self.novelty(message)
            elif channel is self.rt.notice_tx and message is not None:
                self.desktop_said(message)

    def drained(self) -> bool:
        """Whether no report waits (at a stop: then the outbox is saved)."""
        return not select.select([self.rt.report_rx], [], [], 0)[0]

###############################################################################
# 14. helpers of the primary: names, the remote copy and its queue, VirusTotal, GeoIP
###############################################################################
# Each runs in threads of the primary so that a slow resolver, SQL server or
# web service never holds up a write window.

NAME_TTL = (3600.0, 600.0)      # seconds a reverse name (found, not found) is kept
NAME_CACHE = 4096
NAME_PENDING = 256              # lookups in flight at most; more wait for a later window


class ReverseNames:
    """Reverse lookups (PTR or hosts file) for addresses no getaddrinfo named,
    cached, and waited for only up to a budget per window."""

    def __init__(self, workers: int = 4):
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="names")
        self.cache: "collections.OrderedDict[str, typing.Tuple[str, float]]" = collections.OrderedDict()
        self.pending: typing.Dict[str, concurrent.futures.Future] = {}

    @staticmethod
    def lookup(addr: str) -> str:
        try:
            return socket.gethostbyaddr(addr)[0]
        except (OSError, UnicodeError):
            return ""

    def resolve(self, addrs: typing.Iterable[str], budget: float) -> typing.Dict[str, str]:
        now, wanted = time.monotonic(), set(addrs)
        for addr in wanted:
            fresh = addr in self.cache and self.cache[addr][1] > now
            if not fresh and addr not in self.pending and len(self.pending) < NAME_PENDING:
                self.pending[addr] = self.pool.submit(self.lookup, addr)
        waiting = [self.pending[a] for a in wanted if a in self.pending]
        if waiting:
            concurrent.futures.wait(waiting, timeout=budget)
        for addr, future in list(self.pending.items()):
            if future.done():
                name = future.result()
                self.cache[addr] = (name, time.monotonic() + NAME_TTL[0 if name else 1])
                self.cache.move_to_end(addr)
                del self.pending[addr]
        while len(self.cache) > NAME_CACHE:
            self.cache.popitem(last=False)
        return {a: self.cache[a][0] for a in wanted if a in self.cache}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


RETRY_DELAYS = (1, 2, 4, 8, 15)     # seconds between attempts while the SQL server fails
# DB-API errors about the rows themselves: the server is up but will never take them
SQL_DATA_ERRORS = ("DataError", "IntegrityError")
REMOTE_QUEUE_NAME = "sql-server-queue.db"


# the remote copy: client module -> SQL dialect; dialect -> column types
SQL_DIALECTS = {"mariadb": "mysql", "pymysql": "mysql", "psycopg": "postgres", "psycopg2": "postgres"}
SQL_TYPES = {"mysql": {"contime": "DATETIME NOT NULL", "send": "BIGINT", "recv": "BIGINT", "uid": "BIGINT"},
             "postgres": {"contime": "TIMESTAMP NOT NULL", "send": "BIGINT", "recv": "BIGINT", "uid": "BIGINT"}}
SQL_INTEGERS = ("lport", "rport")      # uid is BIGINT: uids go up to 2**32 - 2
SQL_SECRET_KEYS = re.compile(r"pass|secret|token|key|dsn|conninfo", re.IGNORECASE)


def sql_secrets(settings: dict) -> typing.List[str]:
    """Values in the server settings that must never appear in a message."""
    return [str(v) for k, v in settings.items() if SQL_SECRET_KEYS.search(k) and str(v)]


def without_secrets(message: str, secrets: typing.Sequence[str]) -> str:
    for secret in secrets:
        message = message.replace(secret, "***")
    return message


class RemoteDB:
    """The remote copy of the connection log on MariaDB/MySQL or PostgreSQL.

    The table name was checked to be a plain identifier by the configuration;
    values always go through the client's parameters."""

    def __init__(self, settings: dict):
        self.client = settings["client"]
        self.table = settings.get("table_name", "connections")
        self.params = {k: v for k, v in settings.items() if k not in ("client", "table_name")}
        self.con = None

    def schema(self) -> str:
        types = SQL_TYPES[SQL_DIALECTS[self.client]]
        columns = ", ".join(f"{c} {types.get(c, 'INTEGER' if c in SQL_INTEGERS else 'TEXT')}" for c in REMOTE_COLUMNS)
        return f"CREATE TABLE IF NOT EXISTS {self.table} ({columns})"

    def connect(self) -> None:
        module = __import__(self.client)
        self.marks = ",".join(("?" if module.paramstyle == "qmark" else "%s") for _ in REMOTE_COLUMNS)
        refused = {"local_infile": False} if SQL_DIALECTS[self.client] == "mysql" else {}    # (no file goes to it)
        self.con = module.connect(**self.params, **refused)
        cur = self.con.cursor()
        cur.execute(self.schema())
        self.con.commit()

    def insert(self, rows: typing.Sequence[typing.Sequence]) -> None:
        """Insert rows (each a Row, or its values in order) in one transaction, connecting if needed."""
        if self.con is None:
            self.connect()
        stamp = lambda text: datetime.datetime.strptime(text, TIME_FORMAT)
        values = [tuple(stamp(r.contime) if c == "contime" else getattr(r, c) for c in REMOTE_COLUMNS)
                  for r in (Row(*row) for row in rows)]
        cur = self.con.cursor()
        cur.executemany(f"INSERT INTO {self.table} ({','.join(REMOTE_COLUMNS)}) VALUES ({self.marks})", values)
        self.con.commit()

    def close(self) -> None:
        con, self.con = self.con, None
        if con is not None:
            try:
                con.close()
            except Exception:
                pass


class RowQueue:
    """Rows waiting for the remote server, kept in SQLite so that none is lost
    when the server is away or picosnitch stops; first in, first out."""
    SCHEMA = "CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY AUTOINCREMENT, rows TEXT NOT NULL)"

    def __init__(self, path: str):
        self.path = path
        con = self.open()
        con.close()

    def open(self) -> sqlite3.Connection:
        """A connection for the calling thread (sqlite3 connections are per thread)."""
        con = sqlite3.connect(self.path, timeout=30)
        with con:
            con.execute(self.SCHEMA)
        return con

    @staticmethod
    def push(con: sqlite3.Connection, rows: typing.Sequence[tuple]) -> None:
        with con:
            con.execute("INSERT INTO pending (rows) VALUES (?)", (json.dumps(list(rows)),))

    @staticmethod
    def first(con: sqlite3.Connection) -> typing.Optional[typing.Tuple[int, typing.List[tuple]]]:
        found = con.execute("SELECT id, rows FROM pending ORDER BY id LIMIT 1").fetchone()
        return (found[0], [tuple(r) for r in json.loads(found[1])]) if found else None

    @staticmethod
    def done(con: sqlite3.Connection, entry: int) -> None:
        with con:
            con.execute("DELETE FROM pending WHERE id = ?", (entry,))

    @staticmethod
    def count(con: sqlite3.Connection) -> int:
        return sum(len(json.loads(r)) for (r,) in con.execute("SELECT rows FROM pending"))


class RemoteWriter:
    """Copies each window's rows to the SQL server from a thread. Rows wait in
    a RowQueue until the server has them, so a server that is down, slow or
    refusing never stalls the primary and loses nothing; a failure is reported
    once, and again only after the server has worked in between."""

    def __init__(self, settings: dict, directory: str, reporter: Reporter):
        self.db, self.reporter = RemoteDB(settings), reporter
        self.secrets = sql_secrets(settings)
        self.queue = RowQueue(os.path.join(directory, REMOTE_QUEUE_NAME))
        self.con = self.queue.open()
        self.wake, self.stopping = threading.Event(), False
        self.failures = 0
        self.thread = threading.Thread(target=self.run, name="sql-server", daemon=True)
        self.thread.start()

    def put(self, rows: typing.Sequence[tuple]) -> None:
        if rows:
            RowQueue.push(self.con, rows)
            self.wake.set()

    def run(self) -> None:
        con = self.queue.open()
        while True:
            entry = RowQueue.first(con)
            if entry is None:
                if self.stopping:
                    break
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            if self.send(*entry, con):
                continue
            if self.stopping:
                break
            self.wake.wait(RETRY_DELAYS[min(self.failures, len(RETRY_DELAYS)) - 1])
            self.wake.clear()
        con.close()

    def send(self, entry: int, rows: typing.List[tuple], con: sqlite3.Connection) -> bool:
        """One queued batch to the server: True when it is done with (written, or refused for its data)."""
        try:
            self.db.insert(rows)
        except Exception as e:
            self.db.close()
            message = without_secrets(f"{type(e).__name__}: {e}".strip(), self.secrets)
            if any(c.__name__ in SQL_DATA_ERRORS for c in type(e).__mro__):    # retrying would fail the same way
                self.reporter.error(f"the SQL server ({self.db.client}) refused {len(rows)} rows: {message}; "
                                    "they are left out there (snitch.db has them)")
                RowQueue.done(con, entry)
                return True
            self.failures += 1
            self.reporter.failing("sql-server", f"could not write to the SQL server ({self.db.client}): {message}; "
                                  "rows are kept and retried in order")
            return False
        RowQueue.done(con, entry)
        self.failures = 0
        self.reporter.working("sql-server", f"the SQL server ({self.db.client}) accepts rows again")
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Let queued rows go out for up to timeout; what remains stays queued for the next start."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)
        self.con.close()


VT_UNCHECKED = "VirusTotal not checked"
VT_PENDING = "VirusTotal: uploaded, analysis pending"
VT_UPLOAD_LIMIT = 32 * 1024 * 1024      # bigger files go to an upload address first
VT_ANALYSIS_CHECKS = 20


class VirusTotal:
    """Looks up new sha256 hashes (and uploads unknown files when allowed) from
    a thread, one request per "VT request limit (seconds)". Verdicts are
    collected by the primary with results(); the API key goes only in the
    request header."""

    def __init__(self, config: Config, reporter: Reporter):
        import requests
        self.http = requests.Session()
        self.http.headers["x-apikey"] = config.vt_api_key
        self.base = config.vt_api_address.rstrip("/")
        self.limit, self.upload = config.vt_request_limit_seconds, config.vt_file_upload
        self.reporter = reporter
        self.todo: "collections.deque[tuple]" = collections.deque()
        self.done: "collections.deque[tuple]" = collections.deque()
        self.asked: typing.Set[typing.Tuple[str, str]] = set()
        self.wake, self.next_at = threading.Event(), 0.0
        threading.Thread(target=self.run, name="virustotal", daemon=True).start()

    def ask(self, exe: str, sha: str) -> None:
        if (exe, sha) not in self.asked:
            self.asked.add((exe, sha))
            self.todo.append(("file", exe, sha))
            self.wake.set()

    def results(self) -> typing.List[typing.Tuple[str, str, str, bool]]:
        """(exe, sha256, verdict text, flagged) found since the last call."""
        found = []
        while self.done:
            found.append(self.done.popleft())
        return found

    def run(self) -> None:
        steps = {"file": self.check_file, "analysis": self.check_analysis}
        while True:
            if not self.todo:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            time.sleep(max(0.0, self.next_at - time.monotonic()))
            item = self.todo.popleft()
            try:
                steps[item[0]](*item[1:])
                self.reporter.working("virustotal")
            except Exception as e:
                self.todo.appendleft(item)
                self.next_at = time.monotonic() + max(self.limit, 60.0)
                self.reporter.failing("virustotal", f"VirusTotal look-up failed ({type(e).__name__}: {e}); "
                                                    "it is retried later")

    def request(self, method: str, url: str, **kw):
        self.next_at = time.monotonic() + self.limit
        response = self.http.request(method, url, timeout=60, **kw)
        if response.status_code in (401, 403):
            raise PicosnitchError(f"VirusTotal refused the API key (HTTP {response.status_code})")
        if response.status_code not in (200, 404):
            raise PicosnitchError(f"VirusTotal answered HTTP {response.status_code}")
        return response

    def check_file(self, exe: str, sha: str) -> None:
        response = self.request("GET", f"{self.base}/files/{sha}")
        if response.status_code == 200:
            self.verdict(exe, sha, response.json()["data"]["attributes"]["last_analysis_stats"])
        elif self.upload:
            self.send_file(exe, sha)
        else:
            self.done.append((exe, sha, "VirusTotal: not known (file upload is off)", False))

    def send_file(self, exe: str, sha: str) -> None:
        """Upload a file VirusTotal does not know. This runs as picosnitch's
        account: a file it cannot read (one that not every user can) is not
        uploaded."""
        try:
            with open(exe, "rb") as f:
                data = f.read()
        except OSError as e:
            data, why = b"", f"{e.strerror}: picosnitch's account cannot read it" if e.errno == errno.EACCES else e.strerror
        else:
            why = "" if hashlib.sha256(data).hexdigest() == sha else "the file has changed"
        if why:
            self.done.append((exe, sha, f"VirusTotal: not known, not uploaded ({why})", False))
            return
        url = f"{self.base}/files"
        if len(data) > VT_UPLOAD_LIMIT:
            url = self.request("GET", f"{self.base}/files/upload_url").json()["data"]
        analysis = self.request("POST", url, files={"file": (os.path.basename(exe), data)}).json()["data"]["id"]
        self.done.append((exe, sha, VT_PENDING, False))
        self.todo.append(("analysis", exe, sha, analysis, 0))

    def check_analysis(self, exe: str, sha: str, analysis: str, checks: int) -> None:
        attributes = self.request("GET", f"{self.base}/analyses/{analysis}").json()["data"]["attributes"]
        if attributes.get("status") == "completed":
            self.verdict(exe, sha, attributes["stats"])
        elif checks < VT_ANALYSIS_CHECKS:
            self.todo.append(("analysis", exe, sha, analysis, checks + 1))

    def verdict(self, exe: str, sha: str, stats: dict) -> None:
        counts = {k: int(stats.get(k, 0)) for k in ("malicious", "suspicious", "harmless", "undetected")}
        text = "VirusTotal: " + ", ".join(f"{n} {k}" for k, n in counts.items())
        self.done.append((exe, sha, text, counts["malicious"] + counts["suspicious"] > 0))


GEOIP_NAME = "dbip-country-lite.mmdb"
GEOIP_MAX_AGE = 31 * 24 * 3600      # refreshed monthly
GEOIP_CACHE = 65536


def geoip_stale(path: str, now: float) -> bool:
    return not os.path.exists(path) or now - os.stat(path).st_mtime > GEOIP_MAX_AGE


GEOIP_MAX = 256 << 20      # bytes of the country database (the download, and unpacked) at most


def bounded(chunks: typing.Iterable[bytes], limit: int) -> bytes:
    """The chunks joined; ValueError past limit bytes (the address is a setting)."""
    data = bytearray()
    for chunk in chunks:
        data += chunk
        if len(data) > limit:
            raise ValueError(f"more than {limit >> 20} MB")
    return bytes(data)


def geoip_download(template: str, path: str, today: datetime.date) -> str:
    """Fetch this month's (else last month's) country database to path; returns
    the address used. PicosnitchError says what went wrong."""
    import maxminddb
    import requests
    last_month = today.replace(day=1) - datetime.timedelta(days=1)
    problems = []
    for day in (today, last_month):
        url = template.format(year=f"{day.year:04d}", month=f"{day.month:02d}")
        try:
            with requests.get(url, timeout=120, stream=True) as response:
                response.raise_for_status()
                data = bounded(response.iter_content(1 << 20), GEOIP_MAX)
            if url.endswith(".gz"):
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as packed:
                    data = bounded(iter(lambda: packed.read(1 << 20), b""), GEOIP_MAX)
            write_atomic(path + ".new", data, 0o640)
            maxminddb.open_database(path + ".new").close()
        except Exception as e:
            problems.append(f"{url}: {type(e).__name__}: {e}")
            if os.path.exists(path + ".new"):
                os.unlink(path + ".new")
            continue
        os.replace(path + ".new", path)
        return url
    raise PicosnitchError("could not download the GeoIP database: " + "; ".join(problems))


def geoip_keeper(config: Config, directory: str, reporter: Reporter) -> None:
    """Thread body: keep the GeoIP database fresh, checking daily; one report per failure streak."""
    path = os.path.join(directory, GEOIP_NAME)
    try:
        for module in ("maxminddb", "requests"):       # maxminddb comes with geoip2
            __import__(module)
    except ImportError as e:
        reporter.error(f"\"GeoIP lookup\" needs geoip2 and requests ({e}); the country database is not kept")
        return
    while True:
        if geoip_stale(path, time.time()):
            try:
                url = geoip_download(config.geoip_download_address, path, datetime.date.today())
                reporter.info(f"GeoIP database updated from {url}")
                reporter.working("geoip")
            except PicosnitchError as e:
                reporter.failing("geoip", f"{e}; countries are not shown until it succeeds")
        time.sleep(3600 if "geoip" in reporter.down else 24 * 3600)


class GeoIP:
    """Country codes of addresses for the viewers, cached; without a database
    every country is '' and the reason is reported once, at opening."""

    def __init__(self, path: str, report: typing.Callable[[str], None]):
        self.reader, self.cache = None, {}
        try:
            import geoip2.database
            import maxminddb
        except ImportError:
            report("GeoIP lookup needs the geoip2 package; countries are not shown")
            return
        # (one short line: view shows it in its last row, dash in its message line)
        try:
            self.reader = geoip2.database.Reader(path)
        except FileNotFoundError:
            report("no GeoIP database yet; countries are not shown")
        except OSError as e:
            report(f"the GeoIP database cannot be read ({e.strerror or type(e).__name__}); countries are not shown")
        except (ValueError, maxminddb.InvalidDatabaseError):
            report("the GeoIP database is damaged; countries are not shown")

    def country(self, addr: str) -> str:
        if self.reader is None or not addr:
            return ""
        if addr not in self.cache:
            if len(self.cache) >= GEOIP_CACHE:
                self.cache.clear()
            try:
                found = self.reader.country(addr).country.iso_code or ""
            except Exception:      # not in the database, or not an address
                found = ""
            self.cache[addr] = found
            return found        # (not read back: dash's threads share the cache, and one may clear it)
        return self.cache.get(addr, "")


###############################################################################
# 15. novelty: what each program has reached, and what is new
###############################################################################
# Once a program is known, what it does can still be new. The primary keeps
# a baseline per program (its sha256, or its executable when it has none)
# in the private directory: the registrable domains (eTLD+1, from the public
# suffix list), countries and remote ports it has reached, the days it has
# used the network on, and its busiest hour. Two rules, each one a user can
# predict:
#   - a program is settled once it has used the network on "Novelty settle
#     days" days after the day it last reached something new; a settled
#     program that reaches a new domain, country or remote port is told of,
#     and is unsettled again (a browser, always somewhere new, never settles);
#   - an hour in which a program sends (or receives) at least "Novelty volume
#     factor" times its busiest hour so far, and at least "Novelty volume
#     minimum (MB)", is told of, once per hour and direction.
# A new executable of a known program starts from that program's baseline.
# The baseline is built from the log at the first start, by a thread, while
# windows go on (they are taken in once it is built).

NOVELTY_TOLD = 5            # novelty events of a program told one by one per window (the rest in a line)
NOVELTY_QUEUE = 100_000     # sightings and their destinations kept while the baseline is built (then the
                            # oldest windows are dropped): one program can reach thousands in a window
EPHEMERAL_PORTS = (32768, 60999)    # the kernel's default ip_local_port_range: a client's side of a connection
CLIENT_PORTS = (HIGH_PORTS, 65535)  # a remote client's side: Linux's range, or IANA's 49152-65535 (macOS, iOS, Windows)
BASELINE_SCHEMA = """
CREATE TABLE IF NOT EXISTS programs (ident TEXT PRIMARY KEY, exe TEXT, name TEXT, grown INTEGER, days INTEGER,
    used INTEGER, hours INTEGER, hour INTEGER, sent INTEGER, received INTEGER, top_sent INTEGER,
    top_received INTEGER, told TEXT);
CREATE INDEX IF NOT EXISTS programs_exe ON programs (exe);
CREATE TABLE IF NOT EXISTS seen (ident TEXT, kind TEXT, value TEXT, first INTEGER,
    PRIMARY KEY (ident, kind, value)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""
# programs: grown, the day it last reached something new; days, the days of
# use after that one; used, its last day of use; hours, its hours of use
# before `hour` (the current one), whose totals are sent and received; its
# busiest hour before it; told, the directions of `hour` already told of.
# Days and hours are of local wall-clock seconds, as the log's times.
PROGRAM_FIELDS = ("ident", "exe", "name", "grown", "days", "used", "hours", "hour", "sent", "received", "top_sent",
                  "top_received", "told")
DESTINATION_KINDS = ("domain", "network", "country", "port")
SEEN_MOST = 10_000          # destinations of one kind kept per program (past them, each is new: never settled)
VOLUME_DIRECTIONS = (("sent", "send"), ("received", "recv"))


class PublicSuffixes:
    """The public suffix list's rules, for the registrable domain of a name
    (the public suffix and one label more)."""

    def __init__(self, text: str = ""):
        self.rules, self.wildcards, self.exceptions = set(), set(), set()
        for line in text.splitlines():
            rule = line.strip().split(" ")[0].lower()
            if not rule or rule.startswith("//"):
                continue
            for form in {rule, ascii_domain(rule)}:
                if form.startswith("!"):
                    self.exceptions.add(form[1:])
                elif form.startswith("*."):
                    self.wildcards.add(form[2:])
                else:
                    self.rules.add(form)

    @classmethod
    def load(cls, path: str = PUBLIC_SUFFIX_LIST) -> typing.Tuple["PublicSuffixes", str]:
        """The list at path, and '' or why it could not be read (then every
        name's last two labels are its registrable domain)."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls(f.read()), ""
        except (OSError, UnicodeDecodeError) as e:
            return cls(), f"the public suffix list ({path}) cannot be read ({e}); a domain's last two labels " \
                          "are taken as its registrable domain (install Debian's publicsuffix)"

    def registrable(self, domain: str) -> str:
        """www.example.co.uk -> example.co.uk; a public suffix itself, or a
        name with an empty label, as it is; '' for no name or an address."""
        name = domain.strip().rstrip(".").lower()
        if not name or ip_network(name.split("%")[0]) is not None:
            return ""
        labels = name.split(".")
        if "" in labels:
            return name
        suffix = 1                  # (the default rule, "*")
        for i in range(len(labels)):
            rest = ".".join(labels[i:])
            if rest in self.exceptions:
                suffix = len(labels) - i - 1
                break
            if rest in self.rules or ".".join(labels[i + 1:]) in self.wildcards and i + 1 < len(labels):
                suffix = len(labels) - i
                break
        return name if suffix >= len(labels) else ".".join(labels[-suffix - 1:])


def ascii_domain(name: str) -> str:
    """A name in the ASCII form DNS answers carry (xn--...), or as it is."""
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


class Sighting:
    """What one window shows of one program: its bytes, and each
    destination (kind, value) with the first connection that reached it and
    the bytes of all that did."""
    __slots__ = ("ident", "exe", "name", "sha256", "send", "recv", "dests")

    def __init__(self, ident: str, exe: str, name: str, sha256: str):
        self.ident, self.exe, self.name, self.sha256 = ident, exe, name, sha256
        self.send = self.recv = 0
        self.dests: typing.Dict[typing.Tuple[str, str], list] = {}

    def add(self, send: int, recv: int, dests: typing.Sequence[typing.Tuple[str, str]], domain: str, raddr: str,
            rport: typing.Optional[int], country: str) -> None:
        self.send += send
        self.recv += recv
        for key in dests:
            found = self.dests.get(key)
            if found is None:
                self.dests[key] = [domain, raddr, rport, country, send, recv]
            else:
                found[4] += send
                found[5] += recv


CLIENT_PORT = HIGH_PORTS_TEXT       # the one remote port of served connections


def is_served(lport: int, rport: int, ephemeral: typing.Tuple[int, int] = EPHEMERAL_PORTS) -> bool:
    """Whether a connection looks served, not made: its remote port is a
    client's (in an ephemeral range: Linux's, or the one other systems use)
    and its local one is not (in this kernel's). Such a remote port is not a
    destination of its own (each client brings another): all of them are
    one, CLIENT_PORT. (A program can look served by binding a local port
    outside the ephemeral range before it connects: then its first such
    connection is still new.)"""
    return CLIENT_PORTS[0] <= rport <= CLIENT_PORTS[1] and not ephemeral[0] <= lport <= ephemeral[1]


def address_network(addr: str) -> str:
    """The network an address is in, as a destination: its /24 (IPv4) or /48
    (IPv6); '' for what is no address."""
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return ""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ipaddress.ip_network(f"{ip}/{24 if ip.version == 4 else 48}", strict=False))


def destinations(registrable: str, country: str, lport: typing.Optional[int],
                 rport: typing.Optional[int], network: str = "") -> typing.List[typing.Tuple[str, str]]:
    """The (kind, value) destinations of a connection: its registrable
    domain, or the network of an address reached with no name looked up (a
    reverse name is the address owner's to choose: it names nothing), its
    country, its remote port (CLIENT_PORT for a served one)."""
    found = []
    if registrable:
        found.append(("domain", registrable))
    if network:
        found.append(("network", network))
    if country:
        found.append(("country", country))
    if rport is not None and rport > 0:
        found.append(("port", CLIENT_PORT if lport is not None and is_served(lport, rport) else str(rport)))
    return found


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def destination_text(kind: str, s: Sighting, value: str, found: list, days: int) -> str:
    """What exe.log says of a new destination."""
    domain, raddr, rport, country = found[:4]
    where = {"domain": f"the domain {value}" + (f" (as {domain})" if domain and domain != value else ""),
             "network": f"the network {value} (an address reached with no name looked up)",
             "country": f"the country {value}",
             "port": f"remote port {value}" if value != CLIENT_PORT else
                     f"a client's remote port ({value}: a connection that looks served)"}[kind]
    address = f"{raddr} port {rport}" if raddr and rport is not None and kind != "port" else raddr
    via = ", ".join(x for x in (domain if kind != "domain" else "", address, country if kind != "country" else "")
                    if x)
    return f"New destination for {s.name} ({s.exe}): {where}" + (f", via {via}" if via else "") + \
        f"; it had reached nothing new in {days} days of use"


class Baseline:
    """The baselines, in the private directory (BASELINE_NAME): the
    primary's alone. observe() takes in a window and says what was new."""

    def __init__(self, path: str):
        self.path = path
        self.sizes: typing.Dict[typing.Tuple[str, str], int] = {}     # destinations kept per (program, kind)
        self.con = sqlite3.connect(path, timeout=DB_BUSY_TIMEOUT, isolation_level=None)
        try:
            self.con.execute("PRAGMA journal_mode = WAL")
            self.con.execute("PRAGMA synchronous = NORMAL")
            self.con.executescript(BASELINE_SCHEMA)
        except sqlite3.Error:
            self.con.close()
            raise

    def close(self) -> None:
        self.con.close()

    @classmethod
    def create_built(cls, path: str) -> None:
        """An empty baseline, marked built (when the log could not be read)."""
        baseline = cls(path)
        try:
            if baseline.meta("built") is None:
                baseline.set_meta("built", 0)
        finally:
            baseline.close()

    def meta(self, key: str, default=None):
        found = self.con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return found[0] if found else default

    def set_meta(self, key: str, value) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def program(self, ident: str) -> typing.Optional[dict]:
        found = self.con.execute(f"SELECT {', '.join(PROGRAM_FIELDS)} FROM programs WHERE ident = ?",
                                 (ident,)).fetchone()
        return dict(zip(PROGRAM_FIELDS, found)) if found else None

    def put_program(self, p: dict) -> None:
        self.con.execute(f"INSERT OR REPLACE INTO programs VALUES ({', '.join('?' * len(PROGRAM_FIELDS))})",
                         [p[f] for f in PROGRAM_FIELDS])

    def inherit(self, s: Sighting, day: int) -> dict:
        """A program's baseline when it is first seen: that of the same
        executable's last one (a new version goes on from the old one's), or a
        new one that grows today."""
        before = self.con.execute(f"SELECT {', '.join(PROGRAM_FIELDS)} FROM programs WHERE exe = ? AND ident != ? "
                                  "ORDER BY used DESC LIMIT 1", (s.exe, s.ident)).fetchone() if s.exe else None
        if before is None:
            return {"ident": s.ident, "exe": s.exe, "name": s.name, "grown": day, "days": 0, "used": day,
                    "hours": 0, "hour": None, "sent": 0, "received": 0, "top_sent": 0, "top_received": 0,
                    "told": ""}
        self.con.execute("INSERT OR IGNORE INTO seen SELECT ?, kind, value, first FROM seen WHERE ident = ?",
                         (s.ident, before[0]))
        return {**dict(zip(PROGRAM_FIELDS, before)), "ident": s.ident, "exe": s.exe, "name": s.name}

    def observe(self, t: int, contime: str, sightings: typing.Iterable[Sighting], config: Config,
                quiet: bool = False) -> typing.List[tuple]:
        """Take a window in (t: its local wall-clock seconds); the novelty
        rows (NOVELTY_COLUMNS) of what was new, none when quiet. One
        transaction."""
        events = []
        day, hour = t // DAY, t // HOUR * HOUR
        self.con.execute("BEGIN")
        try:
            for s in sightings:
                events += self.observe_program(s, day, hour, contime, config, quiet)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        return events

    def observe_program(self, s: Sighting, day: int, hour: int, contime: str, config: Config,
                        quiet: bool) -> typing.List[tuple]:
        p = self.program(s.ident) or self.inherit(s, day)
        known = p["hour"] is not None       # (it, or the version it goes on from, was seen before)
        if day > (p["used"] or 0):
            p["used"] = day
            if day > p["grown"]:
                p["days"] += 1
        days = p["days"]
        settled = known and days >= config.novelty_settle_days
        events = []
        for (kind, value), found in s.dests.items():
            if not self.con.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)",
                                    (s.ident, kind, value, hour)).rowcount:
                continue
            self.bound(s.ident, kind, value)
            if settled and not quiet:
                events.append((contime, kind, s.exe, s.name, s.sha256, value, *found,
                               destination_text(kind, s, value, found, days)))
            p["grown"], p["days"] = day, 0
        if quiet:
            self.count_volume(p, s, hour)
        else:
            events += self.volume(p, s, hour, contime, config)
        p["name"] = s.name
        self.put_program(p)
        return events

    def bound(self, ident: str, kind: str, value: str) -> None:
        """Keep at most SEEN_MOST destinations of a kind per program: a newly
        seen one past them is not kept (a program can reach endless ports or
        addresses, but cannot grow the baseline without end)."""
        key = (ident, kind)
        if key not in self.sizes:
            if len(self.sizes) > 4 * SEEN_MOST:
                self.sizes.clear()
            self.sizes[key] = self.con.execute("SELECT count(*) FROM seen WHERE ident = ? AND kind = ?",
                                               key).fetchone()[0]
        else:
            self.sizes[key] += 1
        if self.sizes[key] > SEEN_MOST:
            self.con.execute("DELETE FROM seen WHERE ident = ? AND kind = ? AND value = ?", (ident, kind, value))
            self.sizes[key] -= 1

    @staticmethod
    def count_volume(p: dict, s: Sighting, hour: int) -> None:
        """Add a window's bytes to the program's hour (a new hour closes the last)."""
        if p["hour"] != hour:
            if p["hour"] is not None:
                p["hours"] += 1
                p["top_sent"], p["top_received"] = max(p["top_sent"], p["sent"]), max(p["top_received"],
                                                                                         p["received"])
            p["hour"], p["sent"], p["received"], p["told"] = hour, 0, 0, ""
        p["sent"] += s.send
        p["received"] += s.recv

    def volume(self, p: dict, s: Sighting, hour: int, contime: str, config: Config) -> typing.List[tuple]:
        """The volume rule, on the program's hour with this window in."""
        self.count_volume(p, s, hour)
        events = []
        for direction, column in VOLUME_DIRECTIONS:
            so_far, top = p[direction], p["top_" + direction]
            if p["hours"] and direction not in p["told"] and \
                    so_far >= max(config.novelty_volume_factor * top, config.novelty_volume_minimum_mb * 1e6, 1):
                p["told"] += direction + " "
                times = f"{so_far / top:,.0f} times" if top else "far more than"
                text = (f"{s.name} ({s.exe}) {direction} {megabytes(so_far)} this hour, {times} its busiest hour "
                        f"before ({megabytes(top)})")
                sums = (so_far, 0) if column == "send" else (0, so_far)
                events.append((contime, "volume", s.exe, s.name, s.sha256, direction, "", "", None, "", *sums, text))
        return events


def waiting_cost(sightings: typing.Sequence[Sighting]) -> int:
    """What a window's sightings count against NOVELTY_QUEUE: each one and
    each of its destinations."""
    return sum(1 + len(s.dests) for s in sightings)


def served_flag(lport: str) -> str:
    """SQL: 1 where a row's local port is in the ephemeral range (see is_served)."""
    return f"coalesce({lport} BETWEEN {EPHEMERAL_PORTS[0]} AND {EPHEMERAL_PORTS[1]}, 0)"


def build_baseline(log_path: str, baseline_path: str, through: int, suffixes: PublicSuffixes,
                   country: typing.Callable[[str], str], log_ports: bool = True) -> typing.Tuple[int, float]:
    """The baselines from the log's rows up to id `through`, quietly (what
    they held is not news): the destinations each program reached, and its
    hours of use. Reads the log in two grouped passes. (programs, seconds)."""
    began = time.monotonic()
    log = sqlite3.connect(f"file:{log_path}?mode=ro", uri=True, timeout=60)
    baseline = Baseline(baseline_path)
    try:
        procs = {pid: (sha or exe or "", exe or "", name or "", sha or "")
                 for pid, exe, name, sha in log.execute("SELECT id, exe, name, sha256 FROM procs")}
        hours: typing.Dict[str, typing.Dict[int, list]] = {}
        names: typing.Dict[str, tuple] = {}
        for proc, hour, send, recv in log.execute(
                f"SELECT proc, t / {HOUR} * {HOUR}, sum(send), sum(recv) FROM conns WHERE id <= ? AND "
                "typeof(t) = 'integer' GROUP BY proc, 2", (through,)):
            ident, exe, name, _ = procs.get(proc, ("", "", "", ""))
            if ident:
                sums = hours.setdefault(ident, {}).setdefault(hour, [0, 0])
                sums[0], sums[1] = sums[0] + (send or 0), sums[1] + (recv or 0)
                if hour >= names.get(ident, (-1,))[0]:
                    names[ident] = (hour, exe, name)
        baseline.con.execute("BEGIN")
        for proc, domain, raddr, rport, eph, first in log.execute(
                f"SELECT c.proc, d.value, a.value, c.rport, {served_flag('c.lport')}, min(c.t) FROM conns c "
                "JOIN strs d ON d.id = c.domain JOIN strs a ON a.id = c.raddr WHERE c.id <= ? AND "
                "typeof(c.t) = 'integer' GROUP BY c.proc, c.domain, c.raddr, c.rport, 5", (through,)):
            ident = procs.get(proc, ("",))[0]
            if not ident:
                continue
            lport = EPHEMERAL_PORTS[0] if eph else 0
            # (a name may be a reverse one here: every address's network is taken in too)
            for kind, value in destinations(suffixes.registrable(domain or ""), country(raddr or ""), lport,
                                            rport if log_ports else None, address_network(raddr or "")):
                baseline.con.execute("INSERT INTO seen VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                                     "first = min(first, excluded.first)", (ident, kind, value, first // HOUR * HOUR))
        grown = dict(baseline.con.execute("SELECT ident, max(first) FROM seen GROUP BY ident"))
        for ident, used in hours.items():
            baseline.put_program(history_program(ident, names[ident][1:], used, grown.get(ident)))
        baseline.set_meta("built", through)
        baseline.con.execute("COMMIT")
        return len(hours), time.monotonic() - began
    finally:
        if baseline.con.in_transaction:
            baseline.con.execute("ROLLBACK")
        baseline.close()
        log.close()


def history_program(ident: str, named: tuple, hours: typing.Dict[int, list], grown: typing.Optional[int]) -> dict:
    """A program's baseline from its hours of use (hour -> [sent, received])
    and the hour its newest destination was first reached."""
    ordered = sorted(hours)
    last, before = ordered[-1], ordered[:-1]
    grown_day = (grown if grown is not None else ordered[0]) // DAY
    days = {hour // DAY for hour in ordered}
    return {"ident": ident, "exe": named[0], "name": named[1], "grown": grown_day,
            "days": sum(1 for d in days if d > grown_day), "used": last // DAY, "hours": len(before), "hour": last,
            "sent": hours[last][0], "received": hours[last][1],
            "top_sent": max((hours[h][0] for h in before), default=0),
            "top_received": max((hours[h][1] for h in before), default=0), "told": ""}


###############################################################################
# 16. primary process, and record.json
###############################################################################
# Receives each window's connections, has their executables hashed, writes
# snitch.db and record.json, and tells the user what is new. It runs as
# picosnitch's account, with no capabilities: everything it writes, reads or
# sends is within that account's rights. What it cannot write (a
# locked database, a full disk) waits in memory, up to PENDING_ROWS rows, and
# is written when it can be.

# -- record.json, as the primary reads it

RECORD_SECTIONS = ("Executables", "Names", "Parent Executables", "Parent Names", "SHA256")


def record_problem(data) -> str:
    """What is wrong with the shape of a record.json ('' if nothing)."""
    if not isinstance(data, dict):
        return f"expected an object, found {type(data).__name__}"
    for section in RECORD_SECTIONS:
        entries = data.get(section, {})
        if not isinstance(entries, dict):
            return f"{section!r} is not an object"
        for key, value in entries.items():
            if section != "SHA256" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                return f"{section!r} entry {key!r} is not a list of names"
            if section == "SHA256" and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                return f"{section!r} entry {key!r} is not an object of hashes"
    return ""


def load_record(path: str) -> dict:
    """record.json, or an empty record. A file that cannot be read as one is
    moved aside, not lost, and PicosnitchError says where it went."""
    empty = {section: {} for section in RECORD_SECTIONS}
    if not os.path.exists(path):
        return empty
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        problem = record_problem(data)
    except (ValueError, UnicodeDecodeError) as e:
        problem = str(e)
    if problem:
        aside = move_aside(path)
        raise PicosnitchError(f"{path} could not be read ({problem}); it was moved to {aside} "
                              "and a new record started")
    for section in RECORD_SECTIONS:
        data.setdefault(section, {})
    return data


HASH_RETRY = 5.0          # seconds before a hash request is sent again (the monitor may have restarted)
HASH_TIMEOUT = 120.0
PRUNE_INTERVAL = 24 * 3600
PENDING_ROWS = 200_000    # rows per log kept in memory while it cannot be written
RETRY_WRITES = 2.0        # seconds between attempts to write what waits


def conn_row(conn: Conn, contime: str, sha: str, psha: str, gpsha: str, domain: str, config: Config) -> Row:
    """A connection's row; the Log switches blank what is off."""
    p, pp, gp = conn.proc, conn.parent, conn.grandparent
    cmd, port, addr = config.log_commands, config.log_ports, config.log_addresses
    # (tuple.__new__: Row() would take a step more, once a row)
    return tuple.__new__(Row, (contime, conn.send, conn.recv, p.exe, p.name, p.cmdline if cmd else "", sha,
                               pp.exe, pp.name, pp.cmdline if cmd else "", psha, conn.uid, conn.lport if port else None,
                               conn.rport if port else None, conn.laddr if addr else "", conn.raddr if addr else "",
                               domain, conn.proto, gp.exe, gp.name, gp.cmdline if cmd else "", gpsha))


def record_add(section: dict, key: str, value: str) -> bool:
    """Add value to the list under key; True when it was not there."""
    values = section.setdefault(key, [])
    if value in values:
        return False
    values.append(value)
    return True


def update_record(record: dict, conn: Conn, sha: str, imported: typing.Optional[dict] = None
                  ) -> typing.Tuple[bool, typing.List[typing.Tuple[str, str, str]]]:
    """Note a connection in record.json: (whether it changed, what to tell
    the user: a (novelty kind, what is new, text) each). imported: the record
    an older picosnitch kept where the user's programs could write it; it
    decides nothing, and a first connection it knew says so."""
    exe, name = conn.proc.exe, conn.proc.name
    if not exe:
        return False, []
    messages = []
    first = "First network connection detected" if conn.rport != -1 else "First run seen"
    memory = "" if conn.proc.ondisk else "; it runs from memory, not from a file on disk"
    if exe not in record["Executables"]:
        old = "; the record of ~/.config had it, but programs of yours could write that one" \
            if exe in (imported or {}).get("Executables", {}) else ""
        messages.append(("program", exe, f"{first} for {name} ({exe}){memory}{old}"))
    elif name not in record["Executables"][exe]:
        messages.append(("name", name, f"{exe} is running as a new name: {name}{memory}"))
    changed = record_add(record["Executables"], exe, name)
    changed |= record_add(record["Names"], name, exe)
    if conn.parent.exe:
        changed |= record_add(record["Parent Executables"], conn.parent.exe, conn.parent.name)
        changed |= record_add(record["Parent Names"], conn.parent.name, conn.parent.exe)
    hashes = record["SHA256"].setdefault(exe, {})
    if sha and sha not in hashes:
        if hashes:
            messages.append(("hash", sha, f"New sha256 for {name} ({exe}): {sha}{memory}"))
        hashes[sha] = VT_UNCHECKED
        changed = True
    return changed, messages


def unchecked_hashes(record: dict) -> typing.List[typing.Tuple[str, str]]:
    """(exe, sha256) pairs that VirusTotal has not answered for yet."""
    return [(exe, sha) for exe, hashes in record["SHA256"].items()
            for sha, verdict in hashes.items() if verdict in (VT_UNCHECKED, VT_PENDING)]


SPOOL_NAME = "unwritten-rows.json"     # rows a stop found waiting for a log, written at the next start
IMPORTED_NAME = "imported-record.json"  # the record an older picosnitch kept in ~/.config (section 19)


def record_text(record: dict) -> bytes:
    return json.dumps(record, indent=2).encode()


def changed_outside(path: str, expected: bytes) -> str:
    """'' if the file at path holds what picosnitch wrote last, else what was
    found there (who owns it, when it was changed)."""
    try:
        with open(path, "rb") as f:
            if f.read() == expected:
                return ""
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        return "it was missing"
    except OSError as e:
        return f"it could not be read ({e.strerror})"
    return f"it was changed at {dated(st.st_mtime)} (owner uid {st.st_uid})"


MIGRATE_RETRY = 5.0       # seconds before a migration batch that failed is tried again


def migrate_log(path: str, reporter: Reporter) -> None:
    """Thread body: move an older log over to version 2, batch by batch, on
    a connection of its own; capture and the viewers go on meanwhile. A stop
    halfway loses nothing: the next start goes on where this one was."""
    began, moved = time.monotonic(), 0
    log = Log.open(path, timeout=MIGRATE_RETRY * 6)     # the windows' writes come first; it waits for them
    try:
        while True:
            try:
                n = log.migrate()
            except sqlite3.Error as e:
                reporter.failing("migration", f"moving the old rows of {DB_NAME} over failed ({e}); it is tried "
                                              "again")
                time.sleep(MIGRATE_RETRY)
                continue
            reporter.working("migration")
            if n is None:
                break
            moved += n
        if moved:
            reporter.info(f"{DB_NAME}: {moved} rows of the older layout moved over in "
                          f"{time.monotonic() - began:.0f} s")
    finally:
        log.close()


COMPACT_SUFFIX = ".compact"      # snitch.db's compact copy, while it is made beside it
COMPACT_MARGIN = 64 << 20         # bytes of the disk left free, beyond the copy's own
COMPACT_HELD = 60                 # windows readers may keep it from its place (retention waits meanwhile)


def compact_copy(path: str) -> str:
    """Thread body: a compact copy of the log beside it, caught up as far as
    it can be without holding the primary back; where it is.
    PicosnitchError when the disk has no room for it."""
    copy = path + COMPACT_SUFFIX
    remove_copy(copy)           # (one left by a stop while it was made)
    log = Log.open(path)
    try:
        pages, free, size = log.pages()
        needed, st = (pages - free) * size, os.statvfs(os.path.dirname(path))
        if st.f_bavail * st.f_frsize < needed + COMPACT_MARGIN:
            raise PicosnitchError(f"{DB_NAME} has {free * size / 1e6:.0f} MB of free pages to give back, but its "
                                  f"disk has {st.f_bavail * st.f_frsize / 1e6:.0f} MB free and a compact copy "
                                  f"needs {(needed + COMPACT_MARGIN) / 1e6:.0f} MB; it keeps its size, with "
                                  f"nothing lost, and is tried again after the next retention")
        log.copy_compact(copy)
        log.con.execute("PRAGMA wal_checkpoint(PASSIVE)")      # (what the primary's checkpoint is left to do)
    except BaseException:
        remove_copy(copy)
        raise
    finally:
        log.close()
    catch_up(copy, path)
    return copy


def in_background(name: str, body: typing.Callable[..., typing.Any], *args) -> concurrent.futures.Future:
    """body(*args) in a thread that a stop does not wait for; its result,
    or what it raised, in the future."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(body(*args))
        except BaseException as e:
            future.set_exception(e)
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def lock_holders(paths: typing.Sequence[str]) -> str:
    """Who else holds a lock on these files (POSIX and flock locks, from
    /proc/locks): ' (locked by pid N, NAME, uid U; ...)', or ''. A user who
    may read snitch.db may lock it, and so hold picosnitch's writes back."""
    inodes = set()
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            inodes.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    holders = set()
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:          # (a lock waited for)
                continue
            try:
                pid, (major, minor, ino) = int(fields[4]), fields[5].split(":")
                if (int(major, 16), int(minor, 16), int(ino)) in inodes and pid > 0 and pid != os.getpid():
                    holders.add(pid)
            except (IndexError, ValueError):
                continue
    said = [f"pid {pid}, {read_proc_text(pid, 'comm').strip() or '?'}, uid "
            f"{next((l.split()[1] for l in read_proc_text(pid, 'status').splitlines() if l.startswith('Uid:')), '?')}"
            for pid in sorted(holders)]
    return f" (locked by {'; '.join(said)})" if said else ""


class PendingLog:
    """What waits for one log that cannot be written now, bounded. `locks`
    names the files whose lockers a failure names."""

    def __init__(self, name: str, reporter: Reporter, locks: typing.Sequence[str] = ()):
        self.name, self.reporter, self.locks = name, reporter, locks
        self.items: "collections.deque" = collections.deque()
        self.size = self.dropped = 0

    def add(self, item, size: int) -> None:
        self.items.append((item, size))
        self.size += size
        while self.size > PENDING_ROWS and len(self.items) > 1:
            _, n = self.items.popleft()
            self.size -= n
            self.dropped += n

    def flush(self, write: typing.Callable[[typing.Any], None]) -> bool:
        """Write what waits, oldest first; False (reported once) if it still cannot be."""
        try:
            while self.items:
                write(self.items[0][0])
                self.size -= self.items.popleft()[1]
        except (OSError, sqlite3.Error) as e:
            who = lock_holders(self.locks) if "locked" in str(e) else ""
            self.reporter.failing(self.name, f"{self.name} cannot be written ({e}){who}; rows wait in memory "
                                             f"(up to {PENDING_ROWS}) and are written when it can be")
            if self.dropped:
                self.reporter.error(f"{self.dropped} rows for {self.name} were dropped: they waited too long")
                self.dropped = 0
            return False
        self.reporter.working(self.name, f"{self.name} is written again")
        return True


class Primary:
    """State of the primary process between windows, and where rows go."""

    def __init__(self, rt: Runtime):
        self.rt, self.config, self.reporter = rt, rt.config, rt.reporter
        self.record_path = os.path.join(rt.state, RECORD_NAME)
        self.record_dirty = False
        self.record = self.trusted_record()
        self.imported = self.imported_record()
        self.ignore = ignore_rules(self.config.log_ignore)
        self.names = ReverseNames()
        self.db_path = os.path.join(rt.state, DB_NAME)
        self.db: typing.Optional[Log] = None
        self.migration: typing.Optional[threading.Thread] = None
        self.compacting: typing.Optional[concurrent.futures.Future] = None     # its compact copy, being made
        self.held = 0                   # windows at which readers kept the compact copy from its place
        self.tidy = True                # free pages may wait to be given back
        self.pending = {name: PendingLog(name, self.reporter) for name in (DB_NAME, CONN_LOG_NAME, REMOTE_QUEUE_NAME)}
        self.pending[DB_NAME].locks = [self.db_path + suffix for suffix in ("", "-wal", "-shm")]
        self.unspool()
        self.last_seq = self.written_seq() if self.config.db_sql_log else 0
        self.remote = None
        if self.config.db_sql_server:
            self.remote = RemoteWriter(self.config.db_sql_server, rt.private, self.reporter)
        self.vt = None
        try:
            self.vt = VirusTotal(self.config, self.reporter) if self.config.vt_api_key else None
        except ImportError as e:
            self.reporter.error(f"VirusTotal look-ups need requests ({e}); hashes are not checked")
        for exe, sha in unchecked_hashes(self.record) if self.vt else []:
            self.vt.ask(exe, sha)
        if self.config.geoip_lookup:
            threading.Thread(target=geoip_keeper, args=(self.config, rt.state, self.reporter),
                             name="geoip", daemon=True).start()
        self.pruned_at = 0.0
        self.reported: typing.Set[tuple] = set()
        self.request_id = 0
        self.suffixes, why = PublicSuffixes.load()
        if why:
            self.reporter.error(why)
        self.derived: typing.Dict[tuple, str] = {}          # (registrable domains and networks: cached)
        self.geoip: typing.Optional[GeoIP] = None
        self.geoip_file: tuple = ()                         # (the database's stat when it was opened)
        self.baseline_path = os.path.join(rt.private, BASELINE_NAME)
        self.baseline: typing.Optional[Baseline] = None
        self.building: typing.Optional[concurrent.futures.Future] = None
        self.waiting: typing.List[tuple] = []               # windows sighted while the baseline is built
        self.waiting_size = self.waiting_dropped = 0

    # -- record.json ---------------------------------------------------------------
    def trusted_record(self) -> dict:
        """The record picosnitch keeps in its private directory. record.json
        beside it is the copy the user reads: a change to that copy made by
        anyone else is reported, and written over, never taken in."""
        path = os.path.join(self.rt.private, RECORD_NAME)
        try:
            record = load_record(path)
        except PicosnitchError as e:
            self.reporter.error(str(e))
            record = load_record(path)
        found = changed_outside(self.record_path, record_text(record)) if os.path.exists(path) else ""
        if found and found != "it was missing":
            self.reporter.error(f"{self.record_path} is not the record picosnitch wrote ({found}); that change is "
                                "not trusted: notifications are decided by picosnitch's own record, which is "
                                "written over it")
        if found or not os.path.exists(path):
            try:
                self.write_record(record)
            except OSError:
                self.record_dirty = True        # (flush says why, and tries again)
        return record

    def imported_record(self) -> dict:
        """The record an older picosnitch kept in ~/.config, if one was moved in (section 19)."""
        path = os.path.join(self.rt.private, IMPORTED_NAME)
        if not os.path.exists(path):
            return {}
        try:
            return load_record(path)
        except PicosnitchError as e:
            self.reporter.error(str(e))
            return {}

    def write_record(self, record: dict) -> None:
        """The private record, then the user's copy."""
        data = record_text(record)
        write_atomic(os.path.join(self.rt.private, RECORD_NAME), data)
        write_atomic(self.record_path, data, 0o640)

    # -- rows a stop could not write ---------------------------------------------
    def unspool(self) -> None:
        """Rows that waited for a log when picosnitch last stopped: they go first."""
        path = os.path.join(self.rt.private, SPOOL_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                spooled = json.load(f)
            for name, items in spooled.items():
                for item in items:      # (a window of the last run marks nothing written in this one)
                    self.pending[name].add(*([0, *item[1:3]], len(item[1])) if name == DB_NAME else (item, len(item)))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            self.reporter.error(f"rows kept over the last stop ({path}) could not be read ({e}); they are lost")
        os.unlink(path)

    def spool(self) -> int:
        """Keep what still waits for a log over the stop; how many rows."""
        waiting = {name: [item for item, _ in p.items] for name, p in self.pending.items() if p.items}
        if waiting:
            write_atomic(os.path.join(self.rt.private, SPOOL_NAME), json.dumps(waiting).encode())
        return sum(p.size for p in self.pending.values())

    # -- snitch.db ---------------------------------------------------------------
    def database(self) -> Log:
        """snitch.db, opened on first use; a file that is no database (or a
        damaged one) is moved aside and a new one started. An older layout
        is moved over by a thread, while windows go on being written."""
        if self.db is None:
            try:
                self.db = Log.open(self.db_path)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as e:
                aside = move_aside(self.db_path)
                self.reporter.error(f"{self.db_path} could not be read as a database ({e}); it was moved to "
                                    f"{aside} and a new one started")
                self.db = Log.open(self.db_path)
            if self.compacting is None:
                remove_copy(self.db_path + COMPACT_SUFFIX)  # (a stop while it was made)
            if self.db.migrating() and not self.migration:
                self.migration = threading.Thread(target=migrate_log, args=(self.db_path, self.reporter),
                                                  name="migration", daemon=True)
                self.migration.start()
        return self.db

    def written_seq(self) -> int:
        """The last window of this run already in snitch.db (after a restart of the primary)."""
        try:
            run, seq = self.database().written()
        except sqlite3.Error:
            return 0
        return seq if run == self.rt.run_id else 0

    def insert(self, item: tuple) -> None:
        """A window's item: (seq, rows, novelty rows)."""
        seq, rows, *novel = item
        try:
            self.database().insert(rows, (self.rt.run_id, seq) if seq else ("", 0), novel[0] if novel else ())
        except sqlite3.DatabaseError as e:
            if not isinstance(e, sqlite3.OperationalError):     # damaged since it was opened
                self.db.close()
                self.db = None
            raise

    # -- a window ----------------------------------------------------------------
    def hashes(self, conns: typing.List[Conn]) -> dict:
        """[sha256, why not] of every executable, parent and grandparent in a
        window, by (exec, device, inode), from the monitor. A request that
        gets no answer is sent again, for a monitor that was restarted."""
        wanted, found, procs = {}, {}, {}
        for c in conns:         # (a window's rows share a few processes, the same objects)
            procs[id(c.proc)], procs[id(c.parent)], procs[id(c.grandparent)] = c.proc, c.parent, c.grandparent
        for p in procs.values():
            key = (tuple(p.exec_id), p.dev, p.ino)
            if p.ino and key not in wanted and key not in found:
                try:
                    wanted[key] = HashItem.checked([p.pid, p.dev, p.ino, p.exe, p.ctime, list(p.exec_id)])
                except ValueError as e:
                    found[key] = ["", f"not hashed ({e})"]
        keys = list(wanted)
        deadline = time.monotonic() + HASH_TIMEOUT
        for start in range(0, len(keys), HASH_REQUEST_MAX):
            chunk = keys[start:start + HASH_REQUEST_MAX]
            found.update(zip(chunk, self.ask_monitor([wanted[k] for k in chunk], deadline)))
        return found

    def ask_monitor(self, procs: typing.List[HashItem], deadline: float) -> typing.List[list]:
        """The monitor's answers to one request, sent again after HASH_RETRY."""
        while time.monotonic() < deadline:
            self.request_id += 1
            self.rt.hash_primary.send(HashRequest(self.request_id, procs))
            retry = time.monotonic() + HASH_RETRY
            while time.monotonic() < retry:
                try:
                    answer = self.rt.hash_primary.recv(max(0.0, retry - time.monotonic()))
                except ValueError:
                    continue
                if isinstance(answer, HashAnswer) and answer.id == self.request_id:
                    return answer.results
        raise PicosnitchError(f"the monitor did not answer hash requests for {HASH_TIMEOUT:.0f}s; "
                              "this window is logged without hashes")

    def sha(self, hashes: dict, p: ProcInfo) -> str:
        sha, why = hashes.get((tuple(p.exec_id), p.dev, p.ino), ("", ""))
        if why and (p.dev, p.ino, why) not in self.reported:
            self.reported.add((p.dev, p.ino, why))
            self.reporter.error(f"could not hash {p.exe or p.name} (pid {p.pid}): {why}; it is logged without a hash")
        return sha

    def program(self, conn: Conn, hashes: dict, novel: typing.List[tuple], contime: str,
                domain: str) -> typing.Tuple[str, str, str]:
        """Note a connection's program in record.json (what to tell the user
        goes to novel, as novelty rows), and have VirusTotal check its hash:
        its sha256, its parent's and its grandparent's."""
        shas = tuple(self.sha(hashes, p) for p in (conn.proc, conn.parent, conn.grandparent))
        new, said = update_record(self.record, conn, shas[0], self.imported)
        self.record_dirty |= new
        raddr, rport = self.where(conn)
        for kind, value, text in said:
            novel.append((contime, kind, conn.proc.exe, conn.proc.name, shas[0], value, domain, raddr, rport,
                          self.country(conn.raddr), conn.send, conn.recv, text))
        if self.vt and shas[0] and self.record["SHA256"].get(conn.proc.exe, {}).get(shas[0]) == VT_UNCHECKED:
            self.vt.ask(conn.proc.exe, shas[0])
        return shas

    def window(self, seq: int, contime: str, conns: typing.List[Conn]) -> None:
        """Write one window's connections and tell the user what is new."""
        try:
            hashes = self.hashes(conns)
        except PicosnitchError as e:
            self.reporter.error(str(e))
            hashes = {}
        budget = min(0.5, self.config.db_write_limit_seconds / 4)
        names = self.names.resolve([c.raddr for c in conns if c.raddr and not c.domain], budget)
        self.open_geoip()
        rows, novel, logged = [], [], []
        programs: typing.Dict[tuple, typing.Tuple[str, str, str]] = {}
        ignoring = any(self.ignore)
        for conn in conns:
            domain = conn.domain or names.get(conn.raddr, "")
            # (a window's connections share a few processes, the same objects: each is noted once)
            who = (id(conn.proc), id(conn.parent), id(conn.grandparent), conn.rport == -1)
            shas = programs.get(who)
            if shas is None:
                shas = programs[who] = self.program(conn, hashes, novel, contime, domain)
            if not (ignoring and self.ignore.match(conn.lport, conn.rport, shas[0], domain, conn.raddr)):
                rows.append(conn_row(conn, contime, *shas, domain, self.config))
                logged.append((conn, shas[0], domain))
        novel += self.novelty(contime, self.sight(logged))
        self.write_rows(seq, rows, novel)
        self.record_dirty |= self.virustotal_results()
        self.flush()
        self.tell(novel)
        self.prune()

    # -- what is new (section 15) ------------------------------------------------
    def tell(self, novel: typing.List[tuple]) -> None:
        """Tell the notifier of a window's novelty rows: NOVELTY_TOLD a
        program at most, and one line for the rest (they are all in the
        log): a program that reaches thousands of new ports at once fills no
        channel, and buries no other program's news."""
        told: typing.Dict[str, list] = {}
        for row in novel:
            kind, exe, name, text = row[1], row[2], row[3], row[-1]
            held = told.setdefault(exe, [0, None, name])
            held[0] += 1
            if held[0] <= NOVELTY_TOLD:
                self.reporter.novelty(kind, exe, name, text)
            elif held[1] is None:
                held[1] = kind
        for exe, (n, kind, name) in told.items():
            if n > NOVELTY_TOLD:
                self.reporter.novelty(kind, exe, name, f"{name} ({exe}) had {n - NOVELTY_TOLD} more things new in "
                                                       f"this window: {DB_NAME}'s novelty table has each")

    def where(self, conn: Conn) -> typing.Tuple[str, typing.Optional[int]]:
        """A connection's remote address and port, as the log switches have them."""
        return conn.raddr if self.config.log_addresses else "", conn.rport if self.config.log_ports else None

    def open_geoip(self) -> None:
        """With "GeoIP lookup" on, the country database, opened again when the
        keeper has replaced it (once a window, not per connection)."""
        if not self.config.geoip_lookup:
            return
        path = os.path.join(self.rt.state, GEOIP_NAME)
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if (st.st_ino, st.st_mtime_ns) != self.geoip_file:
                self.geoip_file, self.geoip = (st.st_ino, st.st_mtime_ns), GeoIP(path, lambda _: None)

    def country(self, addr: str) -> str:
        """An address's country ('' without GeoIP, or for no address)."""
        return self.geoip.country(addr) if self.geoip is not None and addr else ""

    def sight(self, logged: typing.List[typing.Tuple[Conn, str, str]]) -> typing.List[Sighting]:
        """The sightings of a window's logged connections [(connection, its
        sha256, its domain)]: each program's bytes and destinations (a run
        with no connection is none). Connections that tell the same (one
        process, domain and address, and one remote port, or a served one's
        clients' ports) are summed first, and go in once, as the first of
        them with all their bytes: each destination still has the first
        connection that reached it. The destinations and countries are
        derived once a window from what they follow from."""
        same: typing.Dict[tuple, list] = {}
        for conn, sha, domain in logged:
            if conn.rport == -1:
                continue
            served = conn.lport is not None and conn.rport is not None and is_served(conn.lport, conn.rport)
            key = (id(conn.proc), sha, domain, conn.domain, conn.raddr, CLIENT_PORT if served else conn.rport)
            found = same.get(key)
            if found is None:
                same[key] = [conn, sha, domain, conn.send, conn.recv]
            else:
                found[3] += conn.send
                found[4] += conn.recv
        sightings: typing.Dict[str, Sighting] = {}
        derived: typing.Dict[tuple, tuple] = {}
        for conn, sha, domain, send, recv in same.values():
            p = conn.proc
            if not (sha or p.exe):
                continue
            s = sightings.get(sha or p.exe)
            if s is None:
                s = sightings[sha or p.exe] = Sighting(sha or p.exe, p.exe, p.name, sha)
            raddr, rport = self.where(conn)
            served = rport is not None and conn.lport is not None and is_served(conn.lport, rport)
            key = (conn.domain, conn.raddr, raddr, CLIENT_PORT if served else rport)
            found = derived.get(key)
            if found is None:
                # (a name the program looked up, or else the address's network: a reverse name is not one)
                name, network = (conn.domain, "") if conn.domain else ("", self.cached(address_network, raddr))
                country = self.country(conn.raddr)
                found = derived[key] = (destinations(self.cached(self.suffixes.registrable, name), country,
                                                     conn.lport, rport, network), country)
            s.add(send, recv, found[0], domain, raddr, rport, found[1])
        return list(sightings.values())

    def cached(self, how: typing.Callable[[str], str], text: str) -> str:
        """how(text), remembered (registrable domains and networks, per connection otherwise)."""
        key = (how.__name__, text)
        found = self.derived.get(key)
        if found is None:
            if len(self.derived) >= GEOIP_CACHE:
                self.derived.clear()
            found = self.derived[key] = how(text) if text else ""
        return found

    def novelty(self, contime: str, sightings: typing.List[Sighting]) -> typing.List[tuple]:
        """The novelty rows of a window's sightings; none while the baseline
        is built (they are taken in after it) or cannot be written."""
        t = local_seconds(contime)
        if not sightings or not isinstance(t, int):
            return []
        baseline = self.baseline_ready()
        if baseline is None:
            self.wait_for_baseline(t, contime, sightings)
            return []
        try:
            events = baseline.observe(t, contime, sightings, self.config)
            self.reporter.working("baseline", f"{BASELINE_NAME} is written again")
            return events
        except sqlite3.Error as e:
            self.reporter.failing("baseline", f"{self.baseline_path} cannot be written ({e}); destinations and "
                                              "volumes are not told of until it can")
            return []

    def wait_for_baseline(self, t: int, contime: str, sightings: typing.List[Sighting]) -> None:
        self.waiting.append((t, contime, sightings))
        self.waiting_size += waiting_cost(sightings)
        while self.waiting_size > NOVELTY_QUEUE:
            self.waiting_size -= waiting_cost(self.waiting.pop(0)[2])
            self.waiting_dropped += 1

    def baseline_ready(self) -> typing.Optional[Baseline]:
        """The baseline, once it is open and built: built from the log by a
        thread at the first start (after a migration of the log), then the
        windows that came meanwhile taken in, quietly."""
        if self.baseline is not None or (self.building is not None and not self.building.done()):
            return self.baseline
        if self.building is None:
            self.building = self.start_baseline()
            return None if self.building is not None else self.open_baseline()    # (None: not built yet)
        built, self.building = self.building, None
        try:
            programs, seconds = built.result()
            self.reporter.info(f"the baseline of {programs} programs was built from {DB_NAME} in {seconds:.1f} s")
        except (sqlite3.Error, OSError) as e:
            self.reporter.error(f"the baseline could not be built from {DB_NAME} ({e}); it starts from now")
            with contextlib.suppress(sqlite3.Error, OSError):
                Baseline.create_built(self.baseline_path)
        baseline = self.open_baseline()
        if baseline is not None:
            for t, contime, sightings in self.waiting:
                with contextlib.suppress(sqlite3.Error):
                    baseline.observe(t, contime, sightings, self.config, quiet=True)
            if self.waiting_dropped:
                self.reporter.error(f"{self.waiting_dropped} windows came while the baseline was built and could "
                                    "not all be kept; what only they reached is not in the baseline, and is "
                                    "new when it is reached again")
            self.waiting, self.waiting_size, self.waiting_dropped = [], 0, 0
        return baseline

    def open_baseline(self) -> typing.Optional[Baseline]:
        """The built baseline (a damaged file is moved aside: a new one is
        built next)."""
        try:
            self.baseline = Baseline(self.baseline_path)
            if self.baseline.meta("built") is None:
                self.baseline.close()
                self.baseline = None
        except sqlite3.DatabaseError as e:
            self.baseline = None
            if isinstance(e, sqlite3.OperationalError):
                self.reporter.failing("baseline", f"{self.baseline_path} cannot be opened ({e}); destinations and "
                                                  "volumes are not told of until it can")
            else:
                self.reporter.error(f"{self.baseline_path} could not be read ({e}); it was moved to "
                                    f"{move_aside(self.baseline_path)} and is built again from {DB_NAME}")
        return self.baseline

    def start_baseline(self) -> typing.Optional[concurrent.futures.Future]:
        """A thread building the baseline from the log, if it is not built
        (None when it is, or when the log is not there to build it from yet)."""
        try:
            with contextlib.closing(Baseline(self.baseline_path)) as baseline:
                if baseline.meta("built") is not None:
                    return None
        except sqlite3.DatabaseError:
            return None         # (open_baseline says why)
        try:
            log = self.database() if self.config.db_sql_log else None
            if log is not None and log.migrating():
                return None         # (tried again at each window, until the migration is over)
            through = log.con.execute("SELECT coalesce(max(id), 0) FROM conns").fetchone()[0] if log else 0
        except sqlite3.Error:
            return None             # (a log held locked: tried again at the next window)
        if not through:             # (nothing to build it from)
            Baseline.create_built(self.baseline_path)
            return None
        geoip = GeoIP(os.path.join(self.rt.state, GEOIP_NAME), lambda _: None) if self.config.geoip_lookup else None
        return in_background("baseline", build_baseline, self.db_path, self.baseline_path, through, self.suffixes,
                             geoip.country if geoip else lambda addr: "", self.config.log_ports)

    def write_rows(self, seq: int, rows: typing.List[tuple], novel: typing.List[tuple] = ()) -> None:
        if self.config.db_sql_log and (rows or novel or not self.pending[DB_NAME].items):
            self.pending[DB_NAME].add((seq, rows, list(novel)), len(rows))     # an empty window still marks seq written
        if rows and self.config.db_text_log:
            self.pending[CONN_LOG_NAME].add([text_log_line(r) for r in rows], len(rows))
        if rows and self.remote is not None:
            self.pending[REMOTE_QUEUE_NAME].add(rows, len(rows))

    def flush(self) -> bool:
        """Write everything that waits; True when nothing waits any more."""
        text_log = os.path.join(self.rt.state, CONN_LOG_NAME)
        done = self.pending[DB_NAME].flush(self.insert)
        done &= self.pending[CONN_LOG_NAME].flush(lambda lines: append_lines(text_log, lines))
        if self.remote is not None:
            done &= self.pending[REMOTE_QUEUE_NAME].flush(self.remote.put)
        if self.record_dirty:
            try:
                self.write_record(self.record)
                self.record_dirty = False
                self.reporter.working(RECORD_NAME, f"{RECORD_NAME} is written again")
            except OSError as e:
                self.reporter.failing(RECORD_NAME, f"{RECORD_NAME} cannot be written ({e}); it is kept in "
                                                   "memory and written when it can be")
        return done and not self.record_dirty

    def virustotal_results(self) -> bool:
        """Store verdicts in record.json and warn about flagged executables."""
        found = self.vt.results() if self.vt else []
        for exe, sha, verdict, flagged in found:
            self.record["SHA256"].setdefault(exe, {})[sha] = verdict
            if flagged:
                self.reporter.exe(f"VirusTotal flags {exe} (sha256 {sha}): {verdict}")
        return bool(found)

    def prune(self) -> None:
        """Delete what is past the retention, once a day, then give free
        pages back: a little at each window until it is done (no write lock
        is held long). Retention waits while a compact copy is made."""
        if not self.config.db_sql_log:
            return
        if self.compacting is not None:
            self.compacted()
            return
        try:
            log = self.database()
            if time.monotonic() - self.pruned_at > PRUNE_INTERVAL:
                if log.prune(self.config.db_retention_days, now_seconds()) is not None:
                    self.pruned_at, self.tidy = time.monotonic(), True
            elif self.tidy:
                self.tidy = not self.give_back(log)
            self.reporter.working("prune")
        except sqlite3.Error as e:
            self.reporter.failing("prune", f"old rows could not be deleted from {DB_NAME}, nor free pages given "
                                           f"back ({e}); it is tried again later")

    def give_back(self, log: Log) -> bool:
        """A step of giving free pages back; True when there is no more to do.
        A log that cannot do it by itself gets a compact copy, made by a
        thread once the migration is over."""
        if self.migration is not None and self.migration.is_alive():
            return False            # (its last step frees the old table)
        if log.incremental():
            return log.give_back()
        if log.wasteful():
            self.compacting = in_background("compact", compact_copy, self.db_path)
        return True

    def compacted(self) -> None:
        """Once the compact copy is made: caught up with the last windows
        and put in the log's place, between two windows (the primary is the
        log's only writer), or tried again at the next window while a reader
        holds a snapshot of the log's WAL (for COMPACT_HELD windows, then
        given up until the next retention, and said)."""
        if not self.compacting.done():
            return
        try:
            copy = self.compacting.result()
        except (PicosnitchError, sqlite3.Error, OSError) as e:
            self.compacting = None
            self.reporter.error(f"free pages could not be given back: {e}" if not isinstance(e, PicosnitchError)
                                else str(e))
            return
        try:
            log = self.database()
            if not log.checkpointed():
                self.held += 1
                if self.held < COMPACT_HELD:
                    return
                raise PicosnitchError(f"readers held the log's WAL through {COMPACT_HELD} windows"
                                      f"{lock_holders(self.pending[DB_NAME].locks)}")
            catch_up(copy, self.db_path)
            before, held = os.stat(self.db_path).st_size, hold_files(self.db_path)
            self.db = None
            log.close()                     # (which deletes the WAL file: held, its space is not freed yet)
            replace_log(copy, self.db_path)
            in_background("free", close_all, held)
            self.reporter.info(f"{DB_NAME} gave back {(before - os.stat(self.db_path).st_size) / 1e6:.0f} MB of "
                               f"free pages")
        except (PicosnitchError, sqlite3.Error, OSError) as e:
            remove_copy(copy)
            self.reporter.error(f"free pages could not be given back ({e}); {DB_NAME} keeps its size, with nothing "
                                f"lost")
        self.compacting, self.held = None, 0

    def close(self) -> None:
        if not self.flush():
            try:
                waiting = self.spool()
                self.reporter.error(f"picosnitch stopped with {waiting} rows it could not write yet; they are kept "
                                    "and written at the next start")
            except OSError as e:
                self.reporter.error(f"picosnitch stopped with rows it could not write, nor keep ({e}); they are lost")
        if self.remote is not None:
            self.remote.stop()
        if self.compacting is not None:         # (made again after the next start)
            remove_copy(self.db_path + COMPACT_SUFFIX)
        if self.db is not None:
            self.db.close(readable=True)
        if self.baseline is not None:
            self.baseline.close()
        self.names.close()


def primary_main(rt: Runtime) -> None:
    """Process entry: one window at a time until the reader says stop. Each
    window is confirmed to the reader once it is written (or waits in memory
    for a log that cannot be written now); a window the reader sends again
    after a restart of this process is recognised by its seq."""
    primary = Primary(rt)
    primary.prune()
    channel, parts = rt.batch_rx, {}
    channel.send(Hello(primary.last_seq))
    while True:
        waiting = any(p.items for p in primary.pending.values()) or primary.record_dirty
        message = channel.recv(RETRY_WRITES if waiting else None)
        if message is None:
            primary.flush()
            continue
        if isinstance(message, Stop):
            break
        if not isinstance(message, Batch):
            continue
        if message.seq <= primary.last_seq:         # written before a restart
            channel.send(Ack(message.seq))
            continue
        parts.setdefault(message.seq, {})[message.part] = message
        if message.last:
            for seq in sorted(s for s in parts if s <= message.seq):
                window = parts.pop(seq)
                conns = [c for i in sorted(window) for c in window[i].conns]
                primary.window(seq, window[max(window)].contime, conns)
                primary.last_seq = seq
            channel.send(Ack(message.seq))
    primary.close()

###############################################################################
# 17. the live event stream
###############################################################################
# While the log is written window by window, the event stream tells whoever
# listens what happens now, as newline-delimited JSON on a Unix socket
# (EVENTS_SOCKET): each second, what every connection moved (the reader's
# extra reading of the kernel's counts, LiveReading, section 10); the
# connections not seen before and the programs that make them, with whether
# the record knows them; and the reports written to error.log and exe.log.
# The notifier serves it: it runs as picosnitch's account, out of the user's
# reach, and sees every report already (a process of its own cost more
# memory than anything it did). One select() loop (notifier_main, at the end
# of this section) drives both, and no step of the stream waits: reader
# sockets are written without blocking, so no reader, slow or hostile, can
# delay a log line or a notice. Only root and the user picosnitch works for
# may read it: each reader's account is checked as it connects
# (SO_PEERCRED). The reader process never waits for the stream either. What
# a reader does not take waits for it up to STREAM_QUEUE bytes; past that
# its lines are dropped, and when it takes them again a "lost" line says
# how many. Nothing a reader sends is read.

STREAM_VERSION = 1
STREAM_READERS = 16        # readers at once (one more is told so, and that is logged)
STREAM_QUEUE = 4 << 20     # bytes waiting for one reader, at most
STREAM_RECORD_CHECK = 2.0  # seconds between looks at the record (is a program new to it?)
STREAM_NEW_SECONDS = 3600.0    # a program the record took in since is still new (its first window may be written first)
STREAM_FULL_REPORTS = 60.0     # seconds between two reports of readers turned away
STREAM_PROGRAMS = 65536    # programs remembered as told of (past it, they may be told of again)


def stream_line(line_type: str, when: float, /, **fields) -> bytes:
    """One line of the stream: JSON in ASCII (a name's every character
    escaped past ASCII, so that no terminal that prints it is acted on)."""
    return (json.dumps({"v": STREAM_VERSION, "type": line_type, "time": round(when, 3), **fields},
                       separators=(",", ":")) + "\n").encode()


def stream_process(p: ProcInfo) -> dict:
    return {"pid": p.pid, "exe": p.exe, "name": p.name}


def stream_conn(c: Conn, command: bool = False) -> dict:
    """A connection (and its bytes) as the stream says it (command: with its command line)."""
    return {**stream_process(c.proc), **({"cmdline": c.proc.cmdline} if command else {}), "uid": c.uid,
            "parent": stream_process(c.parent),
            "proto": c.proto, "laddr": c.laddr, "lport": c.lport, "raddr": c.raddr, "rport": c.rport,
            "domain": c.domain, "send": c.send, "recv": c.recv}


def peer_credentials(sock: socket.socket) -> typing.Tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket, as it connected."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def peer_uid(sock: socket.socket) -> int:
    """The account of the process at the other end of a Unix socket."""
    return peer_credentials(sock)[1]


def listening_socket(path: str) -> socket.socket:
    """A Unix stream socket at path (one left by a run before is replaced),
    that anyone may connect to: who may use it is decided by each
    connection's account."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def send_nowait(sock: socket.socket, data) -> typing.Optional[int]:
    """The bytes of data a socket takes now, never waiting (0: none yet);
    None when its peer is gone."""
    try:
        return sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        return None


class StreamReader:
    """One connected reader: the lines waiting for it, and how many it lost."""

    def __init__(self, sock: socket.socket):
        self.sock, self.queue, self.lost = sock, bytearray(), 0

    def put(self, line: bytes) -> None:
        if self.lost:
            note = stream_line("lost", time.time(), lines=self.lost)
            if len(self.queue) + len(note) + len(line) > STREAM_QUEUE:
                self.lost += 1
                return
            self.queue += note
            self.lost = 0
        if len(self.queue) + len(line) > STREAM_QUEUE:
            self.lost += 1
            return
        self.queue += line

    def flush(self) -> bool:
        """Send what it takes now; False when it is gone."""
        sent = send_nowait(self.sock, self.queue)
        if sent is None:
            return False
        del self.queue[:sent]
        return True

    def gone(self) -> bool:
        """Whether it hung up (what it sent is dropped unread)."""
        try:
            return not self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True


def events_directory(account: User) -> None:
    """RUN_DIR, for the stream's socket: made (as root) for picosnitch's
    account, which alone may write there; every account may look in."""
    os.makedirs(RUN_DIR, 0o755, exist_ok=True)
    st = os.lstat(RUN_DIR)
    if not stat_module.S_ISDIR(st.st_mode):
        raise PicosnitchError(f"{RUN_DIR} is not a directory; the event stream needs it")
    os.chmod(RUN_DIR, 0o755)        # (while root owns it: the service's sandbox leaves root no CAP_FOWNER)
    os.chown(RUN_DIR, account.uid, account.gid)


class Stream:
    """The event stream's state: its socket, readers, and what the record knows."""

    def __init__(self, rt: Runtime, path: str = EVENTS_SOCKET):
        self.rt, self.path = rt, path
        self.readers: typing.Dict[int, StreamReader] = {}       # by descriptor
        self.record: typing.Set[str] = set()                     # the executables record.json knows
        self.record_seen, self.record_checked = (0, 0), -STREAM_RECORD_CHECK
        self.recorded: typing.Dict[str, float] = {}             # executables it took in since, and when
        self.programs: typing.Set[typing.Tuple[str, str, int]] = set()      # told of as new executables
        self.full_reported = -STREAM_FULL_REPORTS
        self.listening, self.told_at = None, 0.0       # (what the reader process was last told, and when)
        self.is_new("")             # (what the record knows now is not new)
        self.listener = listening_socket(path)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.sock.close()
        self.readers.clear()
        self.tell_reader_process()          # (no one listens now: the reader process stops ticking)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def tell_reader_process(self, again: bool = False) -> None:
        """Say whether the stream has readers when that changes, and again
        each LIVE_SECONDS (again): a reader process started since, or a word
        the channel had no room for, is set right within a second."""
        listening = bool(self.readers)
        if listening != self.listening or (again and time.monotonic() >= self.told_at + LIVE_SECONDS):
            with contextlib.suppress(OSError, ValueError):
                if self.rt.live_rx.send(Listening(len(self.readers)), block=False):
                    self.listening, self.told_at = listening, time.monotonic()

    def accept(self) -> None:
        """A new reader: welcomed if its account may read and there is room, else told why not."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        uid, now = peer_uid(sock), time.time()
        refused = ""
        if uid not in (0, self.rt.user.uid):
            refused = f"only root and {self.rt.user.name} may read picosnitch's event stream"
        elif len(self.readers) >= STREAM_READERS:
            refused = f"the event stream has {STREAM_READERS} readers already"
            if time.monotonic() - self.full_reported >= STREAM_FULL_REPORTS:
                self.full_reported = time.monotonic()
                self.rt.reporter.error(f"a reader of the event stream (uid {uid}) was turned away: "
                                       f"{STREAM_READERS} were connected already", notify=False)
        if refused:
            with contextlib.suppress(OSError):
                sock.send(stream_line("refused", now, reason=refused), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            sock.close()
            return
        reader = self.readers[sock.fileno()] = StreamReader(sock)
        reader.put(stream_line("hello", now, version=VERSION, interval=LIVE_SECONDS,
                               window=self.rt.config.db_write_limit_seconds))
        self.tell_reader_process()

    def publish(self, lines: typing.List[bytes]) -> None:
        for reader in self.readers.values():
            for line in lines:
                reader.put(line)

    def is_new(self, exe: str) -> bool:
        """Whether the record does not know a program, or took it in within
        STREAM_NEW_SECONDS (looked at again every STREAM_RECORD_CHECK)."""
        now = time.monotonic()
        if now - self.record_checked >= STREAM_RECORD_CHECK:
            first, self.record_checked = self.record_checked < 0, now
            path = os.path.join(self.rt.private, RECORD_NAME)
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
                st = os.stat(path)
                if (st.st_mtime_ns, st.st_size) != self.record_seen:
                    with open(path, encoding="utf-8") as f:
                        record = set(json.load(f).get("Executables", {}))
                    self.recorded.update({e: now for e in record - self.record} if not first else {})
                    self.record, self.record_seen = record, (st.st_mtime_ns, st.st_size)
            self.recorded = {e: t for e, t in self.recorded.items() if now - t < STREAM_NEW_SECONDS}
        return bool(exe) and (exe not in self.record or exe in self.recorded)

    def tick_lines(self, tick: LiveTick) -> typing.List[bytes]:
        """A tick, then each new connection and each program not told of before."""
        lines = [stream_line("tick", tick.time, conns=[stream_conn(c) for c in tick.conns],
                             exited=[p for p in tick.exited if isinstance(p, int)])]
        for i in tick.new:
            if not (isinstance(i, int) and 0 <= i < len(tick.conns)):
                continue
            c = tick.conns[i]
            new = self.is_new(c.proc.exe)
            lines.append(stream_line("connection", tick.time, new=new, **stream_conn(c, command=True)))
            program = (c.proc.exe, c.proc.name, c.uid)
            if len(self.programs) >= STREAM_PROGRAMS:
                self.programs.clear()
            if program not in self.programs:
                self.programs.add(program)
                lines.append(stream_line("executable", tick.time, new=new, uid=c.uid, **stream_process(c.proc)))
        return lines

    def waiting(self) -> typing.Tuple[list, list]:
        """What it reads (its socket, the reader process's ticks, each
        reader, for its hang-up) and what it writes (readers with lines waiting)."""
        socks = [r.sock for r in self.readers.values()]
        return [self.listener, self.rt.live_rx] + socks, [r.sock for r in self.readers.values() if r.queue]

    def step(self, ready: typing.Collection, writable: typing.Collection) -> None:
        """What select() found ready, done without waiting: a new reader, a
        tick, a reader gone, lines sent as far as each reader takes them."""
        if self.listener in ready:
            self.accept()
        if self.rt.live_rx in ready:
            self.take()
        gone = [r for r in list(self.readers.values())
                if (r.sock in ready and r.gone()) or (r.sock in writable and not r.flush())]
        for reader in gone:
            del self.readers[reader.sock.fileno()]
            reader.sock.close()
        self.tell_reader_process(again=True)

    def take(self) -> None:
        try:
            message = self.rt.live_rx.recv(0)
        except ValueError:
            return
        if isinstance(message, LiveTick):
            self.publish(self.tick_lines(message))

    def logged(self, kind: str, when: float, fields: dict) -> None:
        """A line the notifier has logged (a report), for every reader."""
        if self.readers:
            self.publish([stream_line(kind, when, **fields)])


# -- the control socket: mutes asked for by the user's viewers and `picosnitch mute`
# A client sends one JSON line, {"v": 1, "type": "mute", "exe": PATH, "kinds":
# [MUTE_KINDS keys], "mute": true or false}, and gets one line back, then the
# socket closes: {"v": 1, "type": "mutes", "exe": PATH, "kinds": [the keys
# muted for it now]}, or {"v": 1, "type": "error", "text": WHY}. The same
# accounts as for the stream may ask; others are told "refused". Nothing
# waits for a client: what it sends is read as it comes, up to
# CONTROL_REQUEST bytes within CONTROL_SECONDS, and the answer is written
# without blocking.

CONTROL_CLIENTS = 8            # clients at once (one more is told so)
CONTROL_REQUEST = 64 << 10     # bytes of a request, at most
CONTROL_SECONDS = 5.0          # for a client to send its request and take the answer
CONTROL_ASKER = 200            # characters of an asker's command line told


def control_line(kind: str, **fields) -> bytes:
    return (json.dumps({"v": STREAM_VERSION, "type": kind, **fields}, separators=(",", ":")) + "\n").encode()


def mute_request(line: bytes) -> typing.Tuple[str, typing.List[str], bool]:
    """(exe, MUTE_KINDS keys, mute) of a request; ValueError naming what is wrong."""
    try:
        request = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueError("the request is not JSON")
    if not isinstance(request, dict) or request.get("v") != 1 or request.get("type") != "mute":
        raise ValueError('the request is not {"v": 1, "type": "mute", ...}')
    exe, kinds, mute = request.get("exe"), request.get("kinds"), request.get("mute", True)
    if not isinstance(exe, str) or not exe.startswith("/") or "\0" in exe or len(exe) > 4096:
        raise ValueError('"exe" must be an absolute path (a string of at most 4096 characters)')
    if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
        raise ValueError(f'"kinds" must be a list of one or more of: {", ".join(MUTE_KINDS)}')
    unknown = [k for k in kinds if k not in MUTE_KINDS]
    if unknown:
        raise ValueError(f"unknown kind {shown(unknown[0])[:100]!r} (one of: {', '.join(MUTE_KINDS)})")
    if not isinstance(mute, bool):
        raise ValueError('"mute" must be true or false')
    return exe, sorted(set(kinds)), mute


def asker_text(pid: int, uid: int) -> str:
    """Who asked, as the change's log line says: uid, pid and what /proc
    says it runs (its executable; when picosnitch's account may not read
    that, its command line, which the process itself may have set)."""
    exe = read_proc_link(pid, "exe")
    if exe:
        return f"uid {uid}, pid {pid} ({exe})"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = cmdline_text(f.read(CONTROL_ASKER * 4))[:CONTROL_ASKER]
    except OSError:
        command = ""
    return f"uid {uid}, pid {pid} (" + (f"command line: {command}" if command else "gone already") + ")"


class ControlClient:
    """One client of the control socket: what it sent so far, the answer
    waiting to be sent, and until when it may take."""

    def __init__(self, sock: socket.socket, pid: int, uid: int):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.request, self.answer = bytearray(), b""
        self.deadline = time.monotonic() + CONTROL_SECONDS

    def read(self) -> typing.Optional[bytes]:
        """Take what it sent; its request line once whole (or all it sent
        when it stopped sending), else None. ValueError when too long."""
        try:
            data = self.sock.recv(CONTROL_REQUEST + 1 - len(self.request), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        self.request += data
        if b"\n" in self.request or not data:
            return bytes(self.request.partition(b"\n")[0])
        if len(self.request) > CONTROL_REQUEST:
            raise ValueError(f"the request is longer than {CONTROL_REQUEST} bytes")
        return None

    def write(self) -> bool:
        """Send what it takes of the answer; whether all is sent (or it is gone)."""
        sent = send_nowait(self.sock, self.answer)
        if sent is None:
            return True
        self.answer = self.answer[sent:]
        return not self.answer


class Control:
    """The control socket's state: its listener and clients. Requests are
    answered by mute(exe, keys, mute, asker, root=...), which returns the
    keys muted now or raises ValueError."""

    def __init__(self, rt: Runtime, mute: typing.Callable[..., typing.List[str]],
                 path: str = CONTROL_SOCKET):
        self.rt, self.mute, self.path = rt, mute, path
        self.clients: typing.Dict[int, ControlClient] = {}      # by descriptor
        self.listener = listening_socket(path)

    def close(self) -> None:
        for client in self.clients.values():
            client.sock.close()
        self.clients.clear()
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def waiting(self) -> typing.Tuple[list, list]:
        clients = list(self.clients.values())
        return ([self.listener] + [c.sock for c in clients if not c.answer],
                [c.sock for c in clients if c.answer])

    def timeout(self) -> float:
        """Seconds until the first client's time is up (inf: no client)."""
        return max(0.0, min((c.deadline for c in self.clients.values()), default=math.inf) - time.monotonic())

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        pid, uid = peer_credentials(sock)
        refused = ""
        if uid not in (0, self.rt.user.uid):
            refused = control_line("refused", reason=f"only root and {self.rt.user.name} may ask picosnitch for mutes")
        elif len(self.clients) >= CONTROL_CLIENTS:
            refused = control_line("error", text=f"picosnitch is answering {CONTROL_CLIENTS} requests already; "
                                                 "ask again")
        if refused:
            with contextlib.suppress(OSError):
                sock.send(refused, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            sock.close()
            return
        self.clients[sock.fileno()] = ControlClient(sock, pid, uid)

    def answer(self, client: ControlClient, line: bytes) -> bytes:
        try:
            exe, keys, mute = mute_request(line)
            now = self.mute(exe, keys, mute, asker_text(client.pid, client.uid), root=client.uid == 0)
        except ValueError as e:
            return control_line("error", text=str(e))
        return control_line("mutes", exe=exe, kinds=now)

    def step(self, ready: typing.Collection, writable: typing.Collection) -> None:
        """What select() found ready, done without waiting; clients whose time is up are closed."""
        if self.listener in ready:
            self.accept()
        done = []
        for client in list(self.clients.values()):
            if client.sock in ready and not client.answer:
                try:
                    line = client.read()
                except ValueError as e:
                    line, client.answer = None, control_line("error", text=str(e))
                if line is not None:
                    client.answer = self.answer(client, line)
            if client.answer and client.write():
                done.append(client)
            elif time.monotonic() >= client.deadline:
                with contextlib.suppress(OSError):      # (a last word, if it takes it now)
                    client.sock.send(client.answer or control_line("error", text="no whole request in "
                                     f"{CONTROL_SECONDS:.0f}s"), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                done.append(client)
        for client in done:
            del self.clients[client.sock.fileno()]
            client.sock.close()


SERVE_RETRY = 60.0          # seconds before a socket that failed is served again


def open_served(rt: Runtime, what: str, make: typing.Callable[[], typing.Any], path: str) -> typing.Any:
    """The stream or the control socket (make()), or None when it cannot be
    served. Their directory is made by the supervisor, as root, which says
    why when it cannot be: a directory that is not the account's is left
    alone (and not told of twice)."""
    try:
        if os.stat(os.path.dirname(path)).st_uid != os.geteuid():
            return None
        return make()
    except OSError as e:
        rt.reporter.error(f"{what} cannot start ({e})", always=True)
        return None


class NotifierLoop:
    """The notifier process: the logs, notices and mutes (Notifier, section
    13), the event stream and the control socket, in one select() loop. A
    failure of either socket is reported and it is served again later: it
    never stops the logs."""

    def __init__(self, rt: Runtime, path: str = EVENTS_SOCKET, control: str = CONTROL_SOCKET):
        self.rt, self.notifier = rt, Notifier(rt)
        self.paths = {"stream": path, "control": control}
        self.served: typing.Dict[str, typing.Any] = {"stream": None, "control": None}
        self.retry_at = {"stream": 0.0, "control": 0.0}        # (monotonic) when to try to serve one again
        self.serve()

    @property
    def stream(self) -> typing.Optional[Stream]:
        return self.served["stream"]

    @property
    def control(self) -> typing.Optional[Control]:
        return self.served["control"]

    def serve(self) -> None:
        """Serve what is not served yet (at most once each SERVE_RETRY)."""
        makers = {"stream": ("the live event stream", lambda: Stream(self.rt, self.paths["stream"])),
                  "control": ("the control socket (mutes)",
                              lambda: Control(self.rt, self.notifier.mute, self.paths["control"]))}
        for name, (what, make) in makers.items():
            if self.served[name] is None and time.monotonic() >= self.retry_at[name]:
                self.retry_at[name] = time.monotonic() + SERVE_RETRY
                self.served[name] = open_served(self.rt, what, make, self.paths[name])
        self.notifier.logged = self.stream.logged if self.stream else lambda kind, when, fields: None

    def failed(self, name: str, e: Exception) -> None:
        self.rt.reporter.error(f"the {name} socket failed: {type(e).__name__}: {e}; it is served again "
                               f"in {SERVE_RETRY:.0f}s", traceback.format_exc())
        with contextlib.suppress(Exception):    # noqa: BLE001 - what is left of it goes
            self.served[name].close()
        self.served[name] = None
        self.notifier.logged = self.stream.logged if self.stream else lambda kind, when, fields: None

    def waiting(self) -> typing.Tuple[list, list, float]:
        """What select() waits for, and how long at most."""
        reads, writes = list(self.notifier.waiting()), []
        for part in self.served.values():
            if part is not None:
                r, w = part.waiting()
                reads, writes = reads + r, writes + w
        return reads, writes, min(1.0, self.notifier.group_due(), self.control.timeout() if self.control else 1.0)

    def run(self) -> None:
        while True:
            stopping = self.rt.stopping()
            reads, writes, timeout = self.waiting()
            ready, writable, _ = select.select(reads, writes, [], 0 if stopping else timeout)
            self.notifier.take(ready)
            for name, part in list(self.served.items()):
                if part is not None:
                    try:
                        part.step(ready, writable)
                    except Exception as e:      # noqa: BLE001 - the logs outlive the sockets
                        self.failed(name, e)
            self.notifier.show_group()
            if stopping and self.notifier.drained():
                self.notifier.show_group(now=True)          # (kept with the other notices over the stop)
                self.notifier.save_outbox()
                return
            self.serve()

    def close(self) -> None:
        for part in self.served.values():
            if part is not None:
                part.close()


def notifier_main(rt: Runtime) -> None:
    """Process entry, as picosnitch's account: write the logs, hand notices
    to the desktop, serve the event stream and the control socket."""
    loop = NotifierLoop(rt)
    try:
        loop.run()
    finally:
        loop.close()

###############################################################################
# 18. privileges: capabilities, and doing work as another account
###############################################################################
# Each process keeps only the privileges its work needs (ROLES, section 20),
# and what is done on someone's behalf is done with their rights: the user's
# settings and files are read as the user; picosnitch's state directory is
# written as picosnitch's account. run_as does a piece of work so, in a child.

# capability numbers (linux/capability.h) of those picosnitch keeps somewhere
CAPABILITIES = {"CAP_CHOWN": 0, "CAP_DAC_READ_SEARCH": 2, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_SYS_PTRACE": 19}
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 8, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
# no capabilities come back from being uid 0 or from an exec, and that is locked
SECUREBITS_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x40 | 0x80
CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def prctl(option: int, arg: int = 0) -> None:
    if libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)):
        raise OSError(ctypes.get_errno(), f"prctl({option})")


def capset(caps: typing.Set[int]) -> None:
    """Set the permitted and effective capabilities (no inheritable ones)."""
    data = (_CapData * 2)()
    for cap in caps:
        data[cap // 32].effective |= 1 << (cap % 32)
        data[cap // 32].permitted |= 1 << (cap % 32)
    if libc().capset(ctypes.byref(_CapHeader(CAPABILITY_VERSION_3, 0)), data):
        raise OSError(ctypes.get_errno(), "capset")


def set_capabilities(names: typing.Sequence[str]) -> None:
    """Keep only these capabilities: in the bounding set, permitted and
    effective (CAP_SETPCAP must be permitted, to shrink the bounding set)."""
    keep = {CAPABILITIES[name] for name in names}
    capset(keep | {CAPABILITIES["CAP_SETPCAP"]})
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)
    capset(keep)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def confine(caps: typing.Optional[typing.Sequence[str]], user: typing.Optional[User]) -> None:
    """Become what a role runs as: root with only `caps`, or (caps None)
    `user` (the user picosnitch works for, or picosnitch's account) with no
    capabilities. Neither can gain privileges again."""
    if os.geteuid() == 0:
        if caps is None and user.uid != 0:
            set_capabilities(["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"])
            try:
                groups = os.getgrouplist(user.name, user.gid)
            except (KeyError, OSError):
                groups = [user.gid]
            os.setgroups(groups)
            os.setresgid(user.gid, user.gid, user.gid)
            prctl(PR_SET_KEEPCAPS, 1)                      # only to empty the bounding set next
            os.setresuid(user.uid, user.uid, user.uid)
            set_capabilities([])
            prctl(PR_SET_KEEPCAPS, 0)
        else:
            prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED)
            set_capabilities(caps or [])
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)       # no one but root may look inside or take its descriptors


RUN_AS_TIMEOUT = 60.0      # seconds a piece of work done as another account may take
RUN_AS_FDS = 200           # descriptors it may hand over


def run_as(who: User, work: typing.Callable[[], typing.Any], with_fds: bool = False) -> typing.Any:
    """work() in a child process that is `who`, with no capabilities (when
    picosnitch runs as root; otherwise here), so that it reaches only what
    `who` can. Its JSON result, or its PicosnitchError raised here (also if
    it dies or takes longer than RUN_AS_TIMEOUT: a user may kill or stall a
    process of theirs). with_fds: work returns (result, descriptors it
    opened), and so does run_as, with the descriptors passed over."""
    if os.geteuid() != 0:
        return work()
    parent, child = Channel.pair()
    pid = os.fork()
    if pid == 0:
        try:                # (whatever happens, the child never returns into the caller's code)
            parent.close()
            fds = []
            try:
                os.umask(0o077)
                confine(None, who)
                result = work()
                if with_fds:
                    result, fds = result
                answer = Answer(result)
            except PicosnitchError as e:
                answer = Answer(None, str(e))
            except BaseException as e:  # noqa: BLE001 - the parent reports it
                answer = Answer(None, f"{type(e).__name__}: {e}")
            try:
                child.send(answer, fds=fds[:RUN_AS_FDS])
            except ValueError as e:     # (too big to send)
                child.send(Answer(None, str(e)))
        finally:
            os._exit(0)
    child.close()
    try:
        answer, fds = parent.recv_with_fds(RUN_AS_TIMEOUT, most=RUN_AS_FDS)
    except ValueError:
        answer, fds = Answer(None, f"the helper running as {who.name} died"), []
    finally:
        parent.close()
    if answer is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        answer = Answer(None, f"the helper running as {who.name} did not answer in {RUN_AS_TIMEOUT:.0f} s")
    os.waitpid(pid, 0)
    if answer.error:
        for fd in fds:
            os.close(fd)
        raise PicosnitchError(answer.error)
    return (answer.result, fds) if with_fds else answer.result


###############################################################################
# 19. the state directory, picosnitch's account, and the move from ~/.config
###############################################################################
# What picosnitch records lives in the state directory (STATE_DIR), which
# only picosnitch's account writes: not the user picosnitch works for, whose
# programs it watches, nor any other account but root. That user may read it
# all but its private part (an ACL names them), and finds it through links
# in ~/.config/picosnitch/, where config.json stays theirs. prepare() readies
# all that before a start:
#
# - root makes the directory, and its private part, the account's;
# - as the user: config.json is read, and the files an older picosnitch kept
#   in ~/.config/picosnitch/ are opened (what the user can open, no more);
# - as the account: the directory is shared with the user alone, those files
#   are copied in, once, when they fit (a stop halfway copies them again at
#   the next start), with nothing of the user's making left in the log and
#   the old record kept apart, deciding nothing; and the settings are
#   compared with those of the last start;
# - as the user: the old files, copied, make way for links to the new ones.
#
# A change of settings that may weaken monitoring is kept in the private
# part until the notifier has logged it, and shown whatever the new settings
# say about notifications. A config.json that cannot be used is reported
# too, and picosnitch runs with the settings of its last start: a program of
# the user cannot keep it from starting.

ACCOUNT_HOME = "/nonexistent"
MOVED_NAME = "moved.json"           # (private) what was moved in from ~/.config/picosnitch, once
APPLIED_NAME = "settings.json"      # (private) the settings the last start applied
# the files an older picosnitch kept in ~/.config/picosnitch/, and where each
# goes, in the state directory (the -wal before its database). Its record is
# the user's, not picosnitch's: it decides nothing (see IMPORTED_NAME).
LEGACY_FILES = {DB_NAME + "-wal": DB_NAME + "-wal", DB_NAME: DB_NAME, RECORD_NAME: f"{PRIVATE_NAME}/{IMPORTED_NAME}",
                EXE_LOG_NAME: EXE_LOG_NAME, ERROR_LOG_NAME: ERROR_LOG_NAME, CONN_LOG_NAME: CONN_LOG_NAME,
                GEOIP_NAME: GEOIP_NAME}
MOVE_ROOM = 64 << 20                # bytes the state's file system keeps free beyond what a move copies
# ~/.config/picosnitch/NAME links to the state directory's NAME
LINKED_FILES = (DB_NAME, RECORD_NAME, EXE_LOG_NAME, ERROR_LOG_NAME, CONN_LOG_NAME)
# connection settings of the remote copy that name a file: read as the user,
# kept in the private part for the account (libpq's, and MariaDB's / PyMySQL's)
SQL_FILE_KEYS = ("passfile", "sslcert", "sslkey", "sslrootcert", "sslcrl", "ssl_ca", "ssl_cert", "ssl_key")


class Setup(typing.NamedTuple):
    """What a start runs with (prepare's answer)."""
    config: Config                   # the settings, with the remote copy's files in the private part
    user: User
    account: User
    state: str
    warnings: typing.List[str]       # reported at the start, whatever the settings (and counted by status)


def service_account(create: bool = True) -> User:
    """picosnitch's own system account (created as systemd-sysusers would:
    no home, no shell, a group of its own)."""
    try:
        entry = pwd.getpwnam(ACCOUNT)
    except KeyError:
        if not create:
            raise PicosnitchError(f"there is no account named {ACCOUNT!r}")
        useradd = ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", ACCOUNT_HOME,
                   "--shell", "/usr/sbin/nologin", "--comment", "picosnitch", ACCOUNT]
        try:
            done = subprocess.run(useradd, capture_output=True, text=True, timeout=60)
            why = one_line(done.stderr) or f"exit code {done.returncode}"
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
        try:
            entry = pwd.getpwnam(ACCOUNT)
        except KeyError:
            raise PicosnitchError(f"picosnitch runs its writer as a system account named {ACCOUNT!r}, which could "
                                  f"not be created ({why}): create it with '{' '.join(useradd)}'")
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PicosnitchError(f"the account {ACCOUNT!r} is uid {entry.pw_uid}, gid {entry.pw_gid}: it must be an "
                              "unprivileged account of picosnitch's own")
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def check_ancestors(path: str) -> None:
    """Every directory above path is root's and only root may write it (or
    it is sticky, as /tmp is): no one else can swap a link in on the way.
    And others may pass through it, as picosnitch's account must."""
    parent = os.path.dirname(path)
    while True:
        st = os.lstat(parent)
        why = ("not a directory" if not stat_module.S_ISDIR(st.st_mode) else f"uid {st.st_uid}'s" if st.st_uid else
               "writable by others than root" if st.st_mode & 0o022 and not st.st_mode & stat_module.S_ISVTX else
               "closed to others (picosnitch's account must pass through it)" if not st.st_mode & 0o001 else "")
        if why:
            raise PicosnitchError(f"{path} cannot be picosnitch's state directory: {parent} is {why}")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def owned_directory(path: str, account: User, dir_fd: typing.Optional[int] = None) -> int:
    """A directory made (0700) or found, and given to the account if it was
    root's; its descriptor. Run as root, where no one else can plant a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        raise PicosnitchError(f"{path} cannot be picosnitch's state directory ({e.strerror})")
    st = os.fstat(fd)
    if st.st_uid not in (0, account.uid) or (st.st_uid == 0 and os.listdir(fd)):
        os.close(fd)
        raise PicosnitchError(f"{path} cannot be picosnitch's state directory: it belongs to uid {st.st_uid}"
                              + (" and is not empty" if st.st_uid == 0 else "") + f"; picosnitch takes only a "
                              f"directory of its own ({ACCOUNT!r}'s, or an empty one of root's)")
    if st.st_uid == 0:
        os.fchown(fd, account.uid, account.gid)
    return fd


def make_state_directory(path: str, account: User) -> None:
    """The state directory and its private part, the account's (as root)."""
    check_ancestors(path)
    try:
        fd = owned_directory(path, account)
    except OSError as e:
        raise PicosnitchError(f"cannot make {path} ({e.strerror}): 'sudo picosnitch systemd' makes it for a "
                              "service whose file system is read-only")
    try:
        os.close(owned_directory(PRIVATE_NAME, account, fd))
    finally:
        os.close(fd)


def share_state(state: str, readers: typing.Collection[int]) -> str:
    """The state directory and every file in it the account's, readable by
    `readers` (uids) and no one else; the private part the account's alone.
    As the account. '' or what could not be done."""
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in [None] + sorted(os.listdir(fd)):
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            entry = fd if name is None else os.open(name, flags, dir_fd=fd)
            try:
                st = os.fstat(entry)
                if st.st_uid != os.geteuid():
                    continue
                directory = stat_module.S_ISDIR(st.st_mode)
                os.fchmod(entry, 0o700 if name == PRIVATE_NAME else 0o750 if directory else 0o640)
                share_with(entry, () if name == PRIVATE_NAME else readers, directory)
            finally:
                if entry != fd:
                    os.close(entry)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
            return (f"the file system of {state} has no ACLs: only root can read what picosnitch records "
                    "(sudo picosnitch view)")
        raise
    finally:
        os.close(fd)
    return ""


def open_legacy(directory: str) -> typing.Tuple[typing.List[str], typing.List[int]]:
    """The files an older picosnitch kept in the user's directory, opened as
    the user: their own regular files, no links. (names, descriptors)"""
    names, fds = [], []
    for name in LEGACY_FILES:
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        st = os.fstat(fd)
        if stat_module.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
            names.append(name)
            fds.append(fd)
        else:
            os.close(fd)
    return names, fds


def copy_in(source: int, target: str) -> None:
    """A file's content (from its descriptor) to target, whole or not at all
    (a temporary file of a fixed name, which a stop halfway leaves to the
    next try), made 0640 (0600 in the private part, by its lack of ACLs)."""
    partial = os.path.join(os.path.dirname(target), f".moving-{os.path.basename(target)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        offset = 0
        while True:
            chunk = os.pread(source, 1 << 20, offset)
            if not chunk:
                break
            os.write(fd, chunk)
            offset += len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, target)


def move_in(state: str, files: typing.Dict[str, int], directory: str) -> typing.Tuple[dict, str]:
    """Copy the files of an older picosnitch (name -> descriptor) into the
    state directory, once, as the account: (what moved.json keeps of them:
    where they came from, when, and each one's size, time and inode; '' or
    why they could not be moved this time, to try again at the next start)."""
    marker = os.path.join(state, PRIVATE_NAME, MOVED_NAME)
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f), ""
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return {}, ""
    sizes = {name: os.fstat(fd).st_size for name, fd in files.items()}
    room = os.statvfs(state).f_bavail * os.statvfs(state).f_frsize
    if sum(sizes.values()) + MOVE_ROOM > room:
        return {}, (f"the files of an older picosnitch in {directory} ({sum(sizes.values()) >> 20} MB) do not fit "
                    f"in {state} ({room >> 20} MB free): they stay where they are, and are moved at a start with room")
    moved = {}
    try:
        for name in [n for n in LEGACY_FILES if n in files]:
            target = os.path.join(state, LEGACY_FILES[name])
            if not os.path.lexists(target):
                copy_in(files[name], target)
            st = os.fstat(files[name])
            moved[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
        untrusted = defuse_log(os.path.join(state, DB_NAME)) if DB_NAME in files else ""
    except (OSError, sqlite3.Error) as e:
        return {}, f"the files of an older picosnitch in {directory} could not be moved in ({e}); it is tried again"
    info = {"from": directory, "time": now_text(), "files": moved}
    write_atomic(marker, json.dumps(info).encode())
    return info, untrusted


def defuse_log(path: str) -> str:
    """An older picosnitch's log, copied from where its user could change it:
    no trigger, view or index of anyone's but picosnitch's is left in it (an
    open makes its own again), and one of a layout newer than this
    picosnitch's is set aside. '' or what was done that the user should know."""
    con = sqlite3.connect(path)
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            con.close()
            return f"the log moved in from ~/.config was put aside, as {move_aside(path)}: its layout is newer " \
                   "than this picosnitch's"
        ours = set(re.findall(r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)", SCHEMA))
        dropped = [(kind, name) for kind, name in con.execute("SELECT type, name FROM sqlite_master WHERE type IN "
                                                              "('trigger', 'view', 'index') AND sql IS NOT NULL")
                   if kind != "index" or name not in ours]
        with con:
            for kind, name in dropped:
                con.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
            if version >= COMPACT_VERSION:      # (so that the next open makes the view and its trigger again)
                con.execute(f"PRAGMA user_version = {min(version, SCHEMA_VERSION - 1)}")
    finally:
        con.close()
    Log.open(path).close(readable=True)     # (its view and the view's trigger, ours, at once)
    unknown = [name for kind, name in dropped if name not in ("connections", "connections_insert")]
    return f"the log moved in from ~/.config had schema objects picosnitch did not make; dropped: " \
           f"{', '.join(unknown)}" if unknown else ""


def link_state(directory: str, state: str, moved: dict) -> None:
    """As the user, in their directory: each old file moved in (the very one:
    size, time and inode as copied) makes way, and ~/.config/picosnitch/NAME
    links to the state directory's NAME where there is nothing by that name."""
    files = moved.get("files", {}) if moved.get("from") == directory else {}
    for name, kept in files.items():
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat_module.S_ISREG(st.st_mode) and [st.st_size, st.st_mtime_ns, st.st_ino] == kept:
                os.unlink(path)
    if DB_NAME in files:
        with contextlib.suppress(OSError):
            if stat_module.S_ISREG(os.lstat(os.path.join(directory, DB_NAME + "-shm")).st_mode):
                os.unlink(os.path.join(directory, DB_NAME + "-shm"))
    for name in LINKED_FILES:
        with contextlib.suppress(FileExistsError):
            os.symlink(os.path.join(state, name), os.path.join(directory, name))


def settle_settings(text: str, error: str, previous: typing.Optional[Config],
                    source: str = CONFIG_NAME) -> typing.Tuple[Config, typing.List[str]]:
    """The settings to run with, and what to report of them: config.json's
    (text, or the error that kept it from being read), with what it weakens
    since the last start (previous); or, when it cannot be used, the
    previous ones, if there are any. PicosnitchError when there are none."""
    try:
        if error:
            raise PicosnitchError(error)
        config = parse_config(text, source)
    except PicosnitchError as e:
        if previous is None:
            raise
        return previous, [f"{e}; picosnitch runs with the settings of its last start"]
    said = [f"a change of settings weakens monitoring: {change} (since the last start)"
            for change in (weakened(previous, config) if previous is not None else [])]
    return config, said


def applied_settings(state: str) -> typing.Optional[Config]:
    """The settings the last start ran with (as the account; None: no start yet)."""
    path = os.path.join(state, PRIVATE_NAME, APPLIED_NAME)
    try:
        return parse_config(settings_file_text(path), path)
    except PicosnitchError:
        return None


def read_sql_files(settings: dict, home: str) -> typing.Dict[str, str]:
    """The files the remote copy's settings name (~ is the user's home), read
    as the user (so none the user cannot read); text as latin-1, which keeps
    every byte."""
    found = {}
    for key in [k for k in SQL_FILE_KEYS if isinstance(settings.get(k), str)]:
        path = settings[key]
        try:
            found[key] = read_regular(os.path.join(home, path[2:]) if path.startswith("~/") else path,
                                      CONFIG_MAX).decode("latin-1")
        except (OSError, ValueError) as e:
            raise PicosnitchError(f"'DB sql server' {key} {settings[key]!r} cannot be read as you "
                                  f"({getattr(e, 'strerror', None) or e}): the remote copy goes on without it")
    return found


def keep_sql_files(state: str, found: typing.Dict[str, str]) -> typing.Dict[str, str]:
    """Those files kept in the private part, for the account: key -> their path there."""
    kept = {}
    for key, text in found.items():
        kept[key] = os.path.join(state, PRIVATE_NAME, f"sql-{key}")
        write_atomic(kept[key], text.encode("latin-1"))
    return kept


def sql_files(config: Config, user: User, account: User, state: str, warnings: typing.List[str]) -> Config:
    """The settings with the remote copy's files in the private part (a file
    the user cannot read is left out, and said so)."""
    if not any(key in config.db_sql_server for key in SQL_FILE_KEYS):
        return config
    settings = {k: v for k, v in config.db_sql_server.items() if k not in SQL_FILE_KEYS}
    try:
        found = run_as(user, lambda: read_sql_files(config.db_sql_server, user.home))
        settings.update(run_as(account, lambda: keep_sql_files(state, found)))
    except PicosnitchError as e:
        warnings.append(str(e))
    return dataclasses.replace(config, db_sql_server=settings)


def make_private(path: str) -> None:
    """A file of the user's (not a link) readable by them only: config.json
    may hold passwords and keys. As the user."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def user_side(user: User) -> typing.Tuple[typing.Tuple[str, str, typing.List[str]], typing.List[int]]:
    """As the user: config.json's text (or why it cannot be had) and the old
    files opened (open_legacy)."""
    try:
        check_directory(user.directory, user.uid)
        text, error = read_config_text(user.directory), ""
    except PicosnitchError as e:
        return ("", str(e), []), []
    make_private(os.path.join(user.directory, CONFIG_NAME))
    names, fds = open_legacy(user.directory)
    return (text, error, names), fds


def account_side(state: str, readers: typing.Collection[int], files: typing.Dict[str, int],
                 directory: str) -> typing.Tuple[typing.List[str], dict, str]:
    """As the account: the state directory shared (share_state), the old files
    moved in (move_in), and the settings of the last start ('' if none);
    with what to warn of."""
    previous = applied_settings(state)
    moved, moving = move_in(state, files, directory)
    warnings = [w for w in (share_state(state, readers), moving) if w]
    return warnings, moved, config_to_json(previous) if previous else ""


def keep_applied(state: str, config: Config, warnings: typing.List[str]) -> None:
    """As the account: the settings this start applies, and its warnings
    kept until the notifier has logged them (a start that goes no further,
    or an earlier one not logged yet, loses none)."""
    write_atomic(os.path.join(state, PRIVATE_NAME, APPLIED_NAME), config_to_json(config).encode())
    path = os.path.join(state, PRIVATE_NAME, WARNINGS_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
    except (OSError, ValueError):
        kept = []
    if warnings:
        write_atomic(path, json.dumps(kept + [[time.time(), w] for w in warnings]).encode())


def prepare(user: User, environ: typing.Mapping[str, str] = os.environ) -> Setup:
    """All a start needs before it loads the kernel program (this section's
    comment says what, and as whom). PicosnitchError says what is wrong."""
    account, state = service_account(), state_directory(environ)
    make_state_directory(state, account)
    try:            # (a program of the user may stall or kill the helper: that is a config.json that cannot be read)
        (text, error, names), fds = run_as(user, lambda: user_side(user), with_fds=True)
    except PicosnitchError as e:
        (text, error, names), fds = ("", f"{user.directory}/{CONFIG_NAME} could not be read as {user.name}: {e}",
                                     []), []
    readers = {user.uid, 0} - {account.uid}      # (root too: its viewers drop their capabilities)
    try:
        warned, moved, previous = run_as(account, lambda: account_side(state, readers, dict(zip(names, fds)),
                                                                       user.directory))
    finally:
        for fd in fds:
            os.close(fd)
    previous = parse_config(previous, APPLIED_NAME) if previous else None
    config, warnings = settle_settings(text, error, previous, os.path.join(user.directory, CONFIG_NAME))
    warnings = warned + warnings
    run_as(account, lambda: keep_applied(state, config, warnings))
    with contextlib.suppress(PicosnitchError):          # (only a convenience for the user)
        run_as(user, lambda: link_state(user.directory, state, moved))
    return Setup(sql_files(config, user, account, state, warnings), user, account, state, warnings)

###############################################################################
# 20. supervisor, daemon and systemd unit
###############################################################################
# The supervisor runs as root. It loads the BPF program (section 9), holds its
# descriptors, and starts each process through process_entry, which gives the
# process only its own channel ends and its own privileges (ROLES): the
# reader and the monitor stay root with the one or two capabilities they
# need; the primary and the notifier become picosnitch's account, out of the
# user's reach; only the desktop process, which shows notifications on the
# user's session bus, is the user. The supervisor itself never touches the
# user's files, nor writes in the state directory: its reports go to the
# notifier. It records what befalls the desktop process, with the time.

RESTART_LIMIT = 5          # deaths of one child within RESTART_WINDOW before restarts slow down
RESTART_WINDOW = 60.0
RESTART_DELAY_MAX = 60.0
READY_TIMEOUT = 120.0
STOPPED_LIMIT = 10.0       # seconds a child may stay stopped (SIGSTOP, ptrace) before it is killed and restarted
STOPPED_LIMIT_REACH = 2.0  # the same, for a process within the user's reach
REACH_RESTART_DELAY = 1.0  # the longest such a process waits for its restart (if it keeps failing on its own)
STEADY_SECONDS = 3.0       # how long such a process runs again before what befell it is summed up
DEATHS_RECORDED = 60       # deaths of one process recorded a minute, one line each (the others are counted)

class Role(typing.NamedTuple):
    """How one child process runs."""
    main: typing.Callable
    who: str                                           # "root", "account" (picosnitch's) or "user"
    caps: typing.Tuple[str, ...]                       # the capabilities root keeps (others have none)
    channels: typing.Tuple[str, ...]                   # the Runtime channel ends it keeps
    kernel: bool = False                               # keeps the BPF program's descriptors


ROLES = {
    "notifier": Role(notifier_main, "account", (), ("report_rx", "report_tx", "notice_tx", "live_rx")),
    "desktop": Role(desktop_main, "user", (), ("notice_rx",)),
    "monitor": Role(monitor_main, "root", ("CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"),
                    ("exec_rx", "hash_monitor", "report_tx")),
    "primary": Role(primary_main, "account", (), ("batch_rx", "hash_primary", "report_tx")),
    "reader": Role(reader_main, "root", ("CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"),
                   ("exec_tx", "batch_tx", "ready_tx", "report_tx", "live_tx"), kernel=True),
}
# the processes a program running as the user can kill: each death is
# recorded with its time, and the process is started again at once
WITHIN_REACH = ("desktop",)

def process_entry(name: str, rt: Runtime, args: tuple) -> None:
    """Run one child process: its signals (SIGTERM asks it to stop, SIGINT is
    the supervisor's), its own channel ends and privileges, and any exception
    it dies of reported with its traceback (error.log and a notification)."""
    role, asked = ROLES[name], []
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: asked.append(1))
    rt.stopping = lambda: bool(asked)
    os.umask(0o077)                 # (in the state directory, its default ACL decides who else may read)
    supervisor = os.getppid()
    try:
        for channel in Runtime.CHANNELS:
            if channel not in role.channels and getattr(rt, channel) is not None:
                getattr(rt, channel).close()
                setattr(rt, channel, None)
        if role.kernel:
            rt.kernel.perf.remap()          # as root: mapping the rings may need CAP_IPC_LOCK
        elif rt.kernel is not None:
            rt.kernel.close_fds()
            rt.kernel = None
        rt.reporter = Reporter(rt.report_tx)
        if role.who != "root":      # no controlling terminal to type into (TIOCSTI)
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
        confine(role.caps if role.who == "root" else None, {"account": rt.account, "user": rt.user}.get(role.who))
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)       # after confine: a change of user clears it
        if os.getppid() != supervisor:
            os._exit(0)
        gc.freeze()                     # (what start made is kept: collections look at what came since)
        gc.set_threshold(*GC_THRESHOLDS)
        role.main(rt, *args)
    except BaseException as e:      # noqa: BLE001 - whatever ends a process is reported, then it exits
        rt.reporter.error(f"the {name} process failed: {type(e).__name__}: {e}", traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def read_pid(path: str = PIDFILE) -> typing.Optional[int]:
    """The pid in the pidfile if that process is alive (a process of another
    user, such as root's daemon seen by a user, is alive too)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        return pid
    except OSError:
        return None
    return pid


def write_status(mode: str, started: str, children: typing.Dict[str, int], state: str, warnings: int,
                 conns: int) -> None:
    """/run/picosnitch.status: what `status` shows (capture mode, room for
    each window's connections, processes, where the state is, and how many
    warnings the start had: their words, which may quote the user's
    settings, are in error.log, not here, where every account may read)."""
    tmp = STATUSFILE + ".new"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "mode": mode, "description": CAPTURE_MODES[mode].description,
                   "conns": conns, "started": started, "children": children, "state": state,
                   "warnings": warnings}, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, STATUSFILE)


def make_runtime(setup: Setup, environ: typing.Mapping[str, str] = os.environ) -> Runtime:
    rt = Runtime(setup.config, setup.user, setup.account, setup.state, st_dev_mask(setup.config),
                 default_bus_address(setup.user.uid, environ), run_id=f"{os.getpid()}-{time.time_ns()}")
    rt.exec_tx, rt.exec_rx = Channel.pair()
    rt.batch_tx, rt.batch_rx = Channel.pair()
    rt.hash_primary, rt.hash_monitor = Channel.pair()
    rt.ready_tx, rt.ready_rx = Channel.pair()
    rt.report_tx, rt.report_rx = Channel.pair()
    rt.notice_tx, rt.notice_rx = Channel.pair()
    rt.live_tx, rt.live_rx = Channel.pair()
    rt.reporter = Reporter(rt.report_tx)
    return rt


def is_stopped(pid: int) -> bool:
    """Whether a process is stopped by a signal or a tracer (state T or t)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def death_cause(exitcode: typing.Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:          # real-time signals have no name
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}" + (", see the error before this one" if exitcode == 1 else "")


class Interference(typing.NamedTuple):
    """What befell a process within the user's reach since it last ran steadily."""
    first: float            # when it first died or was stopped (seconds since the epoch)
    last: float             # when it last did
    deaths: int
    stops: int

    def add(self, died: bool) -> "Interference":
        return self._replace(last=time.time(), deaths=self.deaths + died, stops=self.stops + (not died))

    def summary(self, name: str) -> str:
        what = " and ".join(f"{n} time{'s' if n > 1 else ''}" + (" killed" if kind == "deaths" else " stopped")
                            for kind, n in (("deaths", self.deaths), ("stops", self.stops)) if n)
        return (f"the {name} process, which runs as the user, was kept from running from {dated(self.first)} to "
                f"{dated(self.last)} ({self.last - self.first:.0f} s; {what}); it was restarted each time, and "
                "what could not be shown then follows, with the time it happened")


class Supervisor:
    """Starts the processes, restarts one that dies (a process out of the
    user's reach more and more slowly if it keeps dying, but never gives up
    on it; one within it at once, every time), and stops them in order: the
    reader first (it drains the kernel), then the primary once it has written
    the last window, then the others."""

    def __init__(self, rt: Runtime, warnings: typing.Sequence[str] = ()):
        self.rt = rt
        self.ctx = multiprocessing.get_context("fork")
        self.procs: typing.Dict[str, multiprocessing.Process] = {}
        self.deaths: typing.Dict[str, typing.List[float]] = collections.defaultdict(list)
        self.restart_at: typing.Dict[str, typing.Tuple[float, float]] = {}     # name -> (when, died at)
        self.stopped_since: typing.Dict[str, float] = {}
        self.interference: typing.Dict[str, Interference] = {}
        self.started_at: typing.Dict[str, float] = {}
        self.death_lines: typing.Dict[str, typing.List[float]] = collections.defaultdict(list)   # deaths recorded
        self.skipped: typing.Dict[str, typing.Tuple[int, float]] = {}     # name -> (count, since) only counted
        self.mode, self.started, self.warnings = "", now_text(), list(warnings)

    def write_status(self) -> None:
        if self.mode:
            write_status(self.mode, self.started, {name: p.pid for name, p in self.procs.items()}, self.rt.state,
                         len(self.warnings), self.rt.kernel.conns)

    def start(self, name: str, *args) -> None:
        release_free_memory()
        self.procs[name] = self.ctx.Process(target=process_entry, args=(name, self.rt, args),
                                            name=f"picosnitch-{name}", daemon=True)
        self.procs[name].start()
        self.started_at[name] = time.monotonic()

    def wait_ready(self, timeout: float) -> str:
        """The capture mode once the reader is polling the kernel."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.procs["reader"].is_alive():
            message = self.rt.ready_rx.recv(0.2)
            if isinstance(message, Ready):
                self.mode = message.mode
                self.write_status()
                return self.mode
        raise PicosnitchError("the BPF reader failed to start (see error.log)")

    def check(self) -> None:
        """Kill a child that stays stopped, report one that died and restart
        it, and say what befell those within the user's reach."""
        self.check_stopped()
        self.check_deaths()
        self.check_restarts()
        self.check_steady()

    def check_stopped(self) -> None:
        """A child stopped for too long (SIGSTOP, ptrace) is killed, and so restarted."""
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if name in self.restart_at or not proc.is_alive() or not is_stopped(proc.pid):
                self.stopped_since.pop(name, None)
                continue
            limit = STOPPED_LIMIT_REACH if name in WITHIN_REACH else STOPPED_LIMIT
            if now - self.stopped_since.setdefault(name, now) >= limit:
                self.stopped_since.pop(name)
                if name in WITHIN_REACH:
                    self.interference[name] = self.interference.get(name, Interference(time.time(), 0, 0, 0)).add(False)
                self.rt.reporter.error(f"the {name} process was stopped for {limit:.0f}s; killing it",
                                       notify=name not in WITHIN_REACH)
                proc.kill()
                proc.join(5)

    def check_deaths(self) -> None:
        """Each death reported, with the time it was seen; a restart planned:
        at once for a process within the user's reach (each is recorded,
        and one notice sums them up), later and later for one that keeps
        dying on its own."""
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if name in self.restart_at or proc.is_alive():
                continue
            died = time.time()
            self.deaths[name] = [t for t in self.deaths[name] if now - t < RESTART_WINDOW] + [now]
            delay, killed = 0.0, proc.exitcode is not None and proc.exitcode < 0
            if name in WITHIN_REACH:        # (one that fails on its own, a second; one that is killed, at once)
                self.interference[name] = self.interference.get(name, Interference(died, 0, 0, 0)).add(True)
                delay = 0.0 if killed or len(self.deaths[name]) <= RESTART_LIMIT else REACH_RESTART_DELAY
            elif len(self.deaths[name]) > RESTART_LIMIT:
                delay = min(RESTART_DELAY_MAX, 2.0 ** (len(self.deaths[name]) - RESTART_LIMIT))
            counted = self.counted(name, died)
            if counted is not None:
                self.rt.reporter.error(f"the {name} process died ({death_cause(proc.exitcode)}); "
                                       + (f"it keeps dying: restarting it in {delay:.0f}s" if delay else "restarting it")
                                       + counted, when=died, notify=name not in WITHIN_REACH)
            self.restart_at[name] = (now + delay, died)

    def counted(self, name: str, died: float) -> typing.Optional[str]:
        """A death gets a line of its own, up to DEATHS_RECORDED a minute for
        each process (the user may kill one in a loop): '', or what the line
        adds of the deaths only counted since the last one; None if this one
        is only counted (the summary of check_steady has them all)."""
        minute = [t for t in self.death_lines[name] if died - t < 60.0]
        if len(minute) < DEATHS_RECORDED:
            self.death_lines[name] = minute + [died]
            count, since = self.skipped.pop(name, (0, 0.0))
            return f" (and {count} more deaths since {dated(since)}, counted only)" if count else ""
        count, since = self.skipped.get(name, (0, died))
        self.skipped[name] = (count + 1, since)
        return None

    def check_restarts(self) -> None:
        now = time.monotonic()
        for name, (when, died) in list(self.restart_at.items()):
            if now >= when:
                del self.restart_at[name]
                if name == "reader":
                    self.start(name, (died, time.time()))
                    try:
                        self.wait_ready(READY_TIMEOUT)
                    except PicosnitchError as e:
                        self.rt.reporter.error(str(e))
                else:
                    self.start(name)
                self.write_status()

    def check_steady(self) -> None:
        """One notice for what befell a process within reach, once it has run
        for a while again: how long, from when to when, how many times."""
        for name, what in list(self.interference.items()):
            proc = self.procs.get(name)
            if name not in self.restart_at and proc is not None and proc.is_alive() and \
                    time.monotonic() - self.started_at[name] >= STEADY_SECONDS:
                del self.interference[name]
                self.rt.reporter.error(what.summary(name))

    def ensure(self, name: str) -> None:
        """Start a child now if it is dead or waiting for its restart."""
        proc = self.procs.get(name)
        if name in self.restart_at or (proc is not None and not proc.is_alive()):
            self.restart_at.pop(name, None)
            self.start(name)

    def stop(self) -> None:
        if "reader" in self.procs:
            self.ensure("primary")          # (the last windows go to a primary that runs)
        order = [("reader", True, STOP_TIMEOUT + 10), ("primary", False, STOP_TIMEOUT),
                 ("monitor", True, 5), ("notifier", True, 10), ("desktop", True, 5)]
        for name, terminate, timeout in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            if terminate and proc.is_alive():
                proc.terminate()
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)   # a stopped process could not stop
            proc.join(timeout)
            if proc.is_alive():
                self.rt.reporter.error(f"the {name} process did not stop in {timeout:.0f}s; killing it")
                proc.kill()
                proc.join(5)


CGROUP_NAME = "picosnitch"      # the cgroup picosnitch moves to, out of a user's delegated one
# limits a user may have lowered in the shell that started picosnitch (sudo
# keeps them): lifted for it, and so for every process it starts
LIFTED_LIMITS = ("RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_MEMLOCK")
NOFILE_AT_LEAST = (1024, 524288)


def cgroup2_mount() -> str:
    """Where the cgroup v2 hierarchy is mounted ('' if nowhere)."""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if after.split()[:1] == ["cgroup2"]:
                return before.split()[4]
    return ""


def delegated_cgroup(mount: str) -> str:
    """The path of this process's cgroup if anyone but root may manage it or
    a cgroup above it (a user's session delegates its subtree to the user,
    who can then freeze or kill what runs there), else ''."""
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        path = next((line.strip()[3:] for line in f if line.startswith("0::")), "")
        here = os.path.join(mount, path.lstrip("/"))
        while os.path.commonpath([here, mount]) == mount:
            for name in ("", "cgroup.procs", "cgroup.freeze", "cgroup.kill"):
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(os.path.join(here, name)).st_uid != 0:
                        return path
            if here == mount:
                break
            here = os.path.dirname(here)
    return ""


def out_of_reach() -> typing.List[str]:
    """Leave what a user may have set for the process that started
    picosnitch: a cgroup of theirs (for one of root's, CGROUP_NAME, at the
    top of the hierarchy), lowered resource limits, their time zone. As
    root, before any child starts. What could not be done, to warn of."""
    import resource
    os.environ.pop("TZ", None)          # (the logs' times are the machine's)
    time.tzset()
    for name in LIFTED_LIMITS:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(getattr(resource, name), (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NOFILE_AT_LEAST[0]), max(hard, NOFILE_AT_LEAST[1])))
    mount = cgroup2_mount()
    path = delegated_cgroup(mount) if mount else ""
    if not path:
        return []
    try:
        os.makedirs(os.path.join(mount, CGROUP_NAME), exist_ok=True)
        with open(os.path.join(mount, CGROUP_NAME, "cgroup.procs"), "w") as f:
            f.write("0")
    except OSError as e:
        return [f"picosnitch runs in the cgroup {path}, which a user may manage (it was started from that user's "
                f"session), and could not leave it ({e.strerror}): that user can freeze or kill it; run it as a "
                "service"]
    return []


def run_supervisor(setup: Setup, ready: typing.Callable[[str], None]) -> int:
    """Run picosnitch until SIGTERM or SIGINT; ready(mode) once capturing."""
    reach = out_of_reach()
    rt = make_runtime(setup)
    stop: typing.List[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    supervisor = Supervisor(rt, setup.warnings + reach)
    try:
        events_directory(rt.account)        # (before the notifier, which serves the stream there)
    except (OSError, PicosnitchError) as e:
        rt.reporter.error(f"the live event stream cannot start ({e}); `top`, `events` and dash's live "
                          "tab have nothing to show", always=True)
    supervisor.start("notifier")            # (it logs what prepare warned of: keep_applied)
    supervisor.start("desktop")
    for warning in reach:
        rt.reporter.error(warning, always=True)
    try:
        config = setup.config
        rt.kernel = Kernel.load(config.perf_ring_buffer_pages, conns=window_capacity(
            config.connections_per_window, config.db_write_limit_seconds, memory_total()))
        for note in rt.kernel.notes:
            rt.reporter.info(note)
        for name in ("reader", "monitor", "primary"):      # (the reader first: events wait in the buffers)
            supervisor.start(name)
        ready(supervisor.wait_ready(READY_TIMEOUT))
        while not stop:
            waits = [p.sentinel for n, p in supervisor.procs.items() if n not in supervisor.restart_at]
            multiprocessing.connection.wait(waits, timeout=0.5)
            if not stop:
                try:
                    supervisor.check()
                except Exception as e:      # noqa: BLE001 - the supervisor outlives any one check
                    rt.reporter.error(f"the supervisor could not check its processes: {type(e).__name__}: {e}",
                                      traceback.format_exc())
        return 0
    except PicosnitchError as e:
        rt.reporter.error(str(e))
        return 1
    finally:                        # whatever ends the supervisor, no child of it runs on
        supervisor.stop()
        if rt.kernel is not None:
            rt.kernel.close()


def claim_pidfile() -> None:
    running = read_pid()
    if running and running != os.getpid():
        raise PicosnitchError(f"already running (pid {running})")
    fd = os.open(PIDFILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o644)            # readable by `status` run by any user, whatever the umask
        f.write(f"{os.getpid()}\n")


def release_pidfile() -> None:
    for path in (PIDFILE, STATUSFILE):
        if os.path.exists(path) and (path != PIDFILE or read_pid() in (None, os.getpid())):
            os.unlink(path)


def run_foreground(setup: Setup) -> int:
    claim_pidfile()
    try:
        return run_supervisor(setup, lambda mode: print(
            f"picosnitch: capturing, mode {CAPTURE_MODES[mode].description}", flush=True))
    finally:
        release_pidfile()


def run_daemon(setup: Setup) -> int:
    """Double fork; the caller returns once the daemon captures (Ready) or
    could not start (Failed), as the daemon tells it on a channel."""
    ours, theirs = Channel.pair()
    if os.fork():
        theirs.close()
        try:
            answer = ours.recv()
        except ValueError:          # (it died before it could say)
            answer = Failed("the daemon failed to start (see error.log)")
        finally:
            ours.close()
        if isinstance(answer, Ready) and answer.mode in CAPTURE_MODES:
            print(f"picosnitch: capturing, mode {CAPTURE_MODES[answer.mode].description}")
            return 0
        print(f"picosnitch: {answer.error if isinstance(answer, Failed) else 'the daemon failed to start'}",
              file=sys.stderr)
        return 1
    ours.close()
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def tell(message: typing.NamedTuple) -> None:
        with contextlib.suppress(OSError):      # (no one listens any more)
            theirs.send(message)
    try:
        claim_pidfile()
        code = run_supervisor(setup, lambda mode: tell(Ready(mode)))
    except PicosnitchError as e:
        tell(Failed(str(e)))
        code = 1
    finally:
        release_pidfile()
    os._exit(code)


def stop_daemon() -> bool:
    """SIGTERM the running daemon and wait for it; False if none runs."""
    pid = read_pid()
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT * 3
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)
    return True


# The service unit's sandbox. The bounding set is what the supervisor needs;
# each process it starts keeps less (ROLES). The supervisor's loader needs
# CAP_SYS_ADMIN for the uprobe on getaddrinfo (the kernel's uprobe PMU asks
# for it) and for the cgroup hooks (network program types ask for it or
# CAP_NET_ADMIN); CAP_PERFMON is enough for everything else.
UNIT_CAPABILITIES = (
    "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN",     # load the program, open perf events, the uprobe, cgroup hooks
    "CAP_IPC_LOCK",                                # perf rings beyond the memlock limit
    "CAP_KILL",                                    # signal the processes that run as the user or the account
    "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP",     # make those processes the user or the account, shrink bounding sets
    "CAP_CHOWN",                                   # give a state directory root made to the account
    "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE",       # the reader and the monitor: open any process's executable
)
# system calls picosnitch never makes: whole groups, and from the groups it
# needs (@privileged for setuid, bpf and fanotify; @debug for perf_event_open)
# those that would let CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH reach into
# other processes or open files by handle
UNIT_DENIED_CALLS = ("@clock @cpu-emulation @module @mount @obsolete @raw-io @reboot @resources @swap "
                     "ptrace process_vm_readv process_vm_writev pidfd_getfd open_by_handle_at")
UNIT_SANDBOX = """\
# Only root can load BPF programs, so picosnitch runs as root, in this
# sandbox, with these capabilities: BPF and PERFMON load its program,
# SYS_ADMIN creates its uprobe on getaddrinfo and attaches its cgroup hooks
# (which name the peers of UDP sends), IPC_LOCK maps its perf rings;
# KILL, SETUID, SETGID and SETPCAP start and stop the processes that run as
# {user} or as picosnitch's account, with none; CHOWN gives the account its
# state directory; DAC_READ_SEARCH and SYS_PTRACE stay with the reader and
# the monitor, which open every executable that runs.
CapabilityBoundingSet={capabilities}
NoNewPrivileges=yes
# Writable: {state} (picosnitch's account writes it; `picosnitch systemd`
# makes it), {directory} (config.json and links, as {user}), and /run,
# where picosnitch.pid and picosnitch.status are made anew at each start.
# Everything else, kernel headers (bcc compiles with them) and executables
# included, is read-only.
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths=/run -{quoted_state} {quoted_directory}
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# Unix sockets for the session bus, IP for VirusTotal, GeoIP and SQL servers
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=~{denied_calls}
SystemCallErrorNumber=EPERM
UMask=0077
"""


def unit_escape(text: str) -> str:
    """A path or value as a unit file takes it: % starts a specifier there."""
    return text.replace("%", "%%")


def unit_quote(path: str) -> str:
    """A path in a list of paths (ReadWritePaths=), quoted: it may hold spaces."""
    return '"' + unit_escape(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(command: str, environ: typing.Mapping[str, str] = os.environ) -> str:
    """A service unit running `command start-no-daemon` for the invoking user,
    in the sandbox of UNIT_SANDBOX. It sets no HOME: root's python must not
    take the user's site directory (and its .pth files) from it. The user's
    home comes from SUDO_USER. The unit writes only the state directory and
    the user's directory, which must exist when it starts (cmd_systemd
    makes them, and picosnitch's account)."""
    user, state = user_identity(environ), state_directory(environ)
    env = {"DBUS_SESSION_BUS_ADDRESS": default_bus_address(user.uid, environ), "PYTHONNOUSERSITE": "1"}
    if environ.get("SUDO_USER"):
        env["SUDO_USER"] = environ["SUDO_USER"]
    if state != STATE_DIR:
        env["STATE_DIRECTORY"] = state
    sandbox = UNIT_SANDBOX.format(user=user.name, directory=user.directory, quoted_directory=unit_quote(user.directory),
                                  state=state, quoted_state=unit_quote(state),
                                  capabilities=" ".join(UNIT_CAPABILITIES), denied_calls=UNIT_DENIED_CALLS)
    return ("[Unit]\nDescription=picosnitch: notify about and log programs using the network\n"
            # tracefs must be there: the sandbox cannot mount it
            "Wants=sys-kernel-tracing.mount\nAfter=network.target sys-kernel-tracing.mount\n\n"
            "[Service]\nType=simple\n"
            + "".join(f'Environment="{unit_escape(k)}={unit_escape(v)}"\n' for k, v in env.items())
            + f"ExecStart={unit_escape(command)} start-no-daemon\n"
            "Restart=on-failure\nRestartSec=5\nKillMode=mixed\nTimeoutStopSec=120\n"
            + sandbox
            + "\n[Install]\nWantedBy=multi-user.target\n")


# The unit the .deb and the .rpm install: picosnitch for root, until
# `picosnitch systemd` writes one for the user in /etc/systemd/system.
PACKAGED_COMMAND = "/usr/bin/python3 -I /usr/bin/picosnitch"


def packaged_unit() -> str:
    return systemd_unit(PACKAGED_COMMAND, {"SUDO_USER": "root"})


def packaged_sysusers() -> str:
    """systemd-sysusers' line for picosnitch's account, which the packages
    create when they are installed (the unit's sandbox cannot)."""
    return f'u {ACCOUNT} - "picosnitch" {ACCOUNT_HOME} /usr/sbin/nologin\n'


def packaged_tmpfiles() -> str:
    """systemd-tmpfiles' line for the state directory, the account's."""
    return f"d {STATE_DIR} 0750 {ACCOUNT} {ACCOUNT} -\n"

###############################################################################
# 21. what the viewers share: the query layer, opening the log, labels, the live stream
###############################################################################
# `view` and `dash` read the same log through the query layer, first here.
# What else both need lives here too: how a log is opened and what is said
# when it cannot be read, how columns are named and values labelled, and how
# bytes are counted.

# -- the query layer: what the viewers (view, dash), the benchmark and the
# tests ask of a log. Totals come from the rollups: the whole-log one for all
# time, day ones for whole days, hour ones for whole hours, the rows
# themselves for the edges of a range and for what no rollup keeps. Rows are
# grouped by id and the ids turned into values afterwards; a range that
# covers most of the log is counted as the whole log minus what is outside.

class Filter(typing.NamedTuple):
    """Keep (or, with exclude, leave out) rows whose column is value, or one
    of the values of a tuple. For "time", value is the start of a bucket of
    `bucket` seconds."""
    column: str
    value: typing.Any
    exclude: bool = False
    bucket: int = 0


# column -> (conns/rollups column, what its id refers to: a process
# attribute, "str" for strs, None for a plain integer)
QUERY_COLUMNS = {
    **{a: ("proc", a) for a in _PROC_ATTRS}, **{f"p{a}": ("parent", a) for a in _PROC_ATTRS},
    **{f"gp{a}": ("gp", a) for a in _PROC_ATTRS},
    "uid": ("uid", None), "lport": ("lport", None), "rport": ("rport", None), "laddr": ("laddr", "str"),
    "raddr": ("raddr", "str"), "domain": ("domain", "str"), "proto": ("proto", "str"),
}


def param(value) -> str:
    """A placeholder for value: text read back as bytes (which may not be
    UTF-8) is compared as the text it is."""
    return "CAST(? AS TEXT)" if isinstance(value, bytes) else "?"


def is_high_port(f: Filter) -> bool:
    """Whether a filter names a high port of its own (which only the rows keep)."""
    values = f.value if isinstance(f.value, tuple) else (f.value,)
    return f.column in PORT_KEYS and any(isinstance(v, int) and v >= HIGH_PORTS for v in values)


def high_ports_apart(column: str, values: list, sql: str) -> typing.Tuple[list, typing.List[str]]:
    """A filter's values without the high ports' entry (HIGH_PORTS_KEY), and
    the test for that entry on sql (the column as a query names it), if asked."""
    if column not in PORT_KEYS or HIGH_PORTS_KEY not in values:
        return values, []
    return [v for v in values if v != HIGH_PORTS_KEY], [f"{port_key(sql)} = {HIGH_PORTS_KEY}"]


class Piece(typing.NamedTuple):
    """Part of a time range and where its totals come from: a rollup level,
    or the rows (level 0); start or end None: unbounded."""
    level: int
    start: typing.Optional[int]
    end: typing.Optional[int]


def split_range(start: typing.Optional[int], end: typing.Optional[int],
                levels: typing.Sequence[int] = (DAY, HOUR)) -> typing.List[Piece]:
    """[start, end) as whole days, whole hours and the rows at its edges."""
    pieces: typing.List[Piece] = []

    def cover(a: typing.Optional[int], b: typing.Optional[int], sizes: typing.Sequence[int]) -> None:
        if a is not None and b is not None and a >= b:
            return
        if not sizes:
            pieces.append(Piece(0, a, b))
            return
        size = sizes[0]
        first = None if a is None else -(-a // size) * size
        last = None if b is None else b // size * size
        if first is not None and last is not None and first >= last:
            cover(a, b, sizes[1:])
            return
        if first is not None:
            cover(a, first, sizes[1:])
        pieces.append(Piece(size, first, last))
        if last is not None:
            cover(last, b, sizes[1:])
    cover(start, end, list(levels))
    return pieces


# -- what is new: the novelty events (section 15), as both viewers list them
NOVELTY_ROWS = 500          # events listed at most (the newest)
# the kinds the viewers list what is new by: all of them, new programs, and
# each group that a mute takes
NOVELTY_GROUPS = {"all": NOVELTY_KINDS, "program": ("program",),
                  **{key: kinds for key, kinds in MUTE_KINDS.items() if key != "all"}}
NO_NOVELTY = ("nothing new can be listed: this log is in an older layout (version {version}), which keeps no "
              "record of what is new; picosnitch adds one when it next starts")


class NoveltyList(typing.NamedTuple):
    """The answer of LogQuery.novelty."""
    events: typing.List[dict]       # id and NOVELTY_COLUMNS (text as str), the newest first
    counts: typing.Dict[str, int]   # kind -> how many events, of any kind asked for
    programs: typing.List[str]      # the programs with events, the one with the latest first
    missing: str                    # why the log has no events to list ('' when it keeps them)


def text_of(value):
    """A value read back as bytes (see LogQuery), as text; others as they are."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class LogQuery:
    """Read-only questions to a snitch.db (version 2, or older while it is
    moved over: the old rows not moved yet are counted from the old table)."""

    def __init__(self, path: str):
        self.path = path
        self.file = file_identity(path)         # (first: a log put in its place meanwhile is opened again)
        self.con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1, check_same_thread=False)
        self.con.text_factory = bytes       # names that are not UTF-8 cannot fail a read
        self.legacy: typing.Optional[typing.List[str]] = None     # the columns of old rows not moved yet
        self.moved = 0                                             # the last old rowid moved over
        self.last_old = 0                                          # the last old rowid to move
        self.v2 = False                                            # the compact layout (version 2 or later)
        self.rollups: typing.List[str] = []                        # the rollup tables it has
        self.version = 0                                           # its layout version
        self.has_novelty = False                                   # whether it keeps what is new (version 5)

    def close(self) -> None:
        self.con.close()

    def replaced(self) -> bool:
        """Whether another file has taken the log's name since it was opened
        (a compact copy: see replace_log)."""
        return file_identity(self.path) != self.file

    def refresh(self) -> None:
        """Check the layout: whether old rows are still being moved over.
        sqlite3.Error when the log cannot be read (missing tables included)."""
        self.version = self.con.execute("PRAGMA user_version").fetchone()[0]
        self.v2 = self.version >= COMPACT_VERSION
        tables = {r[0].decode() for r in self.con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.rollups = [table for table in ROLLUPS if table in tables]      # (older versions have fewer)
        self.has_novelty = "novelty" in tables
        if not self.v2:
            if "connections" not in tables:
                raise sqlite3.OperationalError("no connections table")
            self.legacy, self.moved = self.columns("connections"), 0      # not opened by picosnitch 2 yet
            return
        found = {k.decode(): v for k, v in self.con.execute(
            "SELECT key, value FROM meta WHERE key IN ('migrated', 'legacy_columns', 'legacy_last')")}
        self.legacy = json.loads(found["legacy_columns"]) if "legacy_columns" in found else None
        self.moved, self.last_old = int(found.get("migrated") or 0), int(found.get("legacy_last") or 0)

    def moving(self) -> typing.Optional[int]:
        """How far the move from an older layout has got, in percent (100
        while its totals by day are made); None when no move runs."""
        if self.legacy is None:
            return None
        return min(100, self.moved * 100 // self.last_old) if self.v2 and self.last_old else 0

    def columns(self, table: str) -> typing.List[str]:
        return [r[1].decode() for r in self.con.execute(f"PRAGMA table_info({table})")]

    @property
    def legacy_table(self) -> str:
        return LEGACY_TABLE if self.v2 else "connections"

    # -- totals ------------------------------------------------------------------
    def totals(self, group: str, filters: typing.Sequence[Filter] = (), start: typing.Optional[int] = None,
               end: typing.Optional[int] = None, bucket: int = DAY) -> typing.List[tuple]:
        """(value, sent, received, rows) for each value of group among the rows
        in [start, end) (local seconds; None: unbounded) that pass every
        filter, largest first. group "time" gives buckets of `bucket` seconds."""
        sums = self.sums(group, filters, start, end, bucket) if self.v2 else {}
        if self.legacy is not None:
            self.add(sums, self.con.execute(*self._legacy(group, bucket, filters, start, end)))
        values = self.values(group, sums)
        if values:          # (ids and values of old rows may name the same thing)
            merged: typing.Dict[typing.Any, list] = {}
            self.add(merged, ((values.get(key, key), *total) for key, total in sums.items() if total[2] > 0))
        else:
            merged = {key: total for key, total in sums.items() if total[2] > 0}
        order = sorted(merged.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
        return [(value, send, recv, n) for value, (send, recv, n) in order]

    @staticmethod
    def add(sums: dict, rows: typing.Iterable, sign: int = 1) -> None:
        for value, send, recv, n in rows:
            total = sums.get(value)
            if total is None:
                sums[value] = [sign * (send or 0), sign * (recv or 0), sign * (n or 0)]
            else:
                total[0] += sign * (send or 0)
                total[1] += sign * (recv or 0)
                total[2] += sign * (n or 0)

    def table(self, columns: typing.Set[str], bucket_sizes: typing.Set[int],
              filters: typing.Sequence[Filter] = ()) -> str:
        """The rollup that keeps every column asked about ('': the rows; so
        for a high port of its own, which the rollups keep with the others)."""
        refs = {QUERY_COLUMNS[c][0] for c in columns if c != "time"}
        if any(size % HOUR for size in bucket_sizes) or any(is_high_port(f) for f in filters):
            return ""
        return next((table for table in self.rollups if refs <= set(ROLLUPS[table])), "")

    def sums(self, group: str, filters: typing.Sequence[Filter], start, end, bucket: int, split: str = "") -> dict:
        """{group key (an id, or a value): [sent, received, rows]} from version 2;
        with split (a column), the keys are (split key, group key)."""
        sizes = {bucket} if group == "time" else set()
        sizes |= {f.bucket for f in filters if f.column == "time"}
        table = self.table({group} | {f.column for f in filters} | ({split} if split else set()), sizes, filters)
        levels = [level for level in ((HOUR,) if self.legacy is not None else (DAY, HOUR))
                  if all(s % level == 0 for s in sizes)] if table else []
        sums: dict = {}
        if not table:
            self.add(sums, self.run(split, *self._piece("", Piece(0, start, end), group, bucket, filters, split)))
            return sums
        if start is None and end is None:          # (while a migration runs, only hours are complete)
            top = ALL_TIME if group != "time" and not sizes and self.legacy is None else levels[0]
            self.add(sums, self.run(split, *self._piece(table, Piece(top, None, None), group, bucket, filters, split)))
            return sums
        inside = split_range(start, end, levels)
        low, high = self.con.execute(f"SELECT (SELECT min(b) FROM {table} WHERE level = {DAY} AND b >= 0), "
                                     f"(SELECT max(b) FROM {table} WHERE level = {DAY})").fetchone()
        outside = []
        if group != "time" and not sizes and low is not None and self.legacy is None:   # maybe cheaper: all but the rest
            outside = (split_range(None, start, levels) if start is not None else []) + \
                      (split_range(end, None, levels) if end is not None else [])
            span = lambda ps: sum(max(0, min(p.end if p.end is not None else high + DAY, high + DAY) -
                                         max(p.start if p.start is not None else low, low)) // max(p.level, HOUR)
                                  for p in ps)
            if span(outside) < span(inside):
                self.add(sums, self.run(split, *self._piece(table, Piece(ALL_TIME, 0, None), group, bucket, filters,
                                                            split)))
                for piece in outside:
                    self.add(sums, self.run(split, *self._piece(table if piece.level else "", piece, group, bucket,
                                                                filters, split)), -1)
                return sums
        for piece in inside:
            self.add(sums, self.run(split, *self._piece(table if piece.level else "", piece, group, bucket, filters,
                                                        split)))
        return sums

    def run(self, split: str, sql: str, params: list, rebucket: int = 0) -> typing.Iterable[tuple]:
        """The rows of a totals query (with split, keyed by (split key, time));
        rebucket: the times are hours or days, to be put in buckets of this size."""
        rows = self.con.execute(sql, params)
        place = (lambda t: t // rebucket * rebucket if isinstance(t, int) else t) if rebucket else (lambda t: t)
        if split:
            return (((k, place(t)), *rest) for t, k, *rest in rows)
        return ((place(t), *rest) for t, *rest in rows) if rebucket else rows

    def _piece(self, table: str, piece: Piece, group: str, bucket: int,
               filters: typing.Sequence[Filter], split: str = "") -> typing.Tuple[str, list]:
        """The SQL for one piece: from a rollup table, or from conns (table '');
        with split, grouped by that column first."""
        rollup = bool(table)
        params: list = []
        where = []
        if rollup:
            where.append(f"s.level = {piece.level}")
            if piece.level == ALL_TIME:
                # (b IN, not a range: the index goes on to the keys after b)
                where.append("s.b = 0" if piece.start is not None else f"s.b IN ({NO_TIME}, 0)")
            elif piece.start is not None and piece.end is not None and \
                    (piece.end - piece.start) // piece.level <= ROLLUP_SEEKS:
                buckets = list(range(piece.start, piece.end, piece.level))
                where.append(f"s.b IN ({','.join('?' * len(buckets))})")
                params += buckets
            else:
                where.append("s.b >= ?" if piece.start is not None else "s.b >= 0")
                params += [piece.start] if piece.start is not None else []
                if piece.end is not None:
                    where.append("s.b < ?")
                    params.append(piece.end)
        else:
            if piece.start is not None:
                where.append("s.t >= ?")
                params.append(piece.start)
            if piece.end is not None:
                where.append("s.t < ?")
                params.append(piece.end)
            if piece.start is None and piece.end is None and group == "time":
                where.append("typeof(s.t) = 'integer'")
        where += [self._filter(f, rollup, params) for f in filters]
        if table == "ports" and piece.level in ALL_PROCS_LEVELS:      # the rows of processes, or their total
            by_process = any(QUERY_COLUMNS[c][0] == "proc" for c in [group, split] + [f.column for f in filters]
                             if c and c != "time")
            where.append("s.proc > 0" if by_process else "s.proc = 0")
        # (a rollup's times are grouped as they are, in the order of its key, which
        # needs no sorting, and put in buckets afterwards, by run)
        keys = [self._key(c, rollup, bucket) for c in [group] + ([split] if split else [])]
        rows = "s.rows" if rollup else "1"
        return (f"SELECT {', '.join(keys)}, sum(s.send), sum(s.recv), sum({rows}) FROM {table or 'conns'} s "
                f"WHERE {' AND '.join(where) or '1'} GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}",
                params, bucket if rollup and group == "time" else 0)

    @staticmethod
    def _key(column: str, rollup: bool, bucket: int) -> str:
        if column == "time":
            return "s.b" if rollup else f"(s.t / {bucket} * {bucket})"
        ref, kind = QUERY_COLUMNS[column]
        value = port_key(f"s.{ref}") if column in PORT_KEYS else f"s.{ref}"
        return f"NULLIF({value}, {NOT_LOGGED})" if rollup and kind is None else value

    @staticmethod
    def _filter(f: Filter, rollup: bool, params: list, alias: str = "s") -> str:
        """The condition of one filter on a rollup or on conns (as alias)."""
        negate = "NOT " if f.exclude else ""
        if f.column == "time":
            params += [f.value, f.value + f.bucket]
            t = f"{alias}.b" if rollup else f"{alias}.t"
            return f"{negate}({t} >= ? AND {t} < ?)"
        ref, kind = QUERY_COLUMNS[f.column]
        values = list(f.value) if isinstance(f.value, tuple) else [f.value]
        present = [v for v in values if v is not None]
        if kind is None:            # an integer column: NULL (not logged) is NOT_LOGGED in the rollups
            if rollup:
                present = [NOT_LOGGED if v is None else v for v in values]
            present, high = high_ports_apart(f.column, present, f"{alias}.{ref}")
            params += present
            tests = ([f"{alias}.{ref} IN ({','.join('?' * len(present))})"] if present else []) + \
                    ([f"{alias}.{ref} IS NULL"] if None in values and not rollup else []) + high
            return f"{negate}coalesce({' OR '.join(tests) or '0'}, 0)"     # (NULL IN (...) is NULL)
        table, attr = ("strs", "value") if kind == "str" else ("procs", kind)
        params += present
        tests = ([f"{attr} IN ({','.join(param(v) for v in present)})"] if present else []) + \
                ([f"{attr} IS NULL"] if None in values else [])
        return f"{alias}.{ref} {negate}IN (SELECT id FROM {table} WHERE {' OR '.join(tests) or '0'})"

    def values(self, group: str, sums: dict) -> dict:
        """What the ids among the keys of sums stand for (group is a process
        attribute or a string); a key that is no id of version 2 stays."""
        if group == "time" or QUERY_COLUMNS[group][1] is None or not self.v2:
            return {}
        kind = QUERY_COLUMNS[group][1]
        ids = [k for k in sums if isinstance(k, int)]
        table, attr = ("strs", "value") if kind == "str" else ("procs", kind)
        found = {}
        for i in range(0, len(ids), 900):
            chunk = ids[i:i + 900]
            found.update(self.con.execute(f"SELECT id, {attr} FROM {table} WHERE id IN ({','.join('?' * len(chunk))})",
                                          chunk).fetchall())
        return found

    def _legacy(self, group: str, bucket: int, filters: typing.Sequence[Filter], start, end,
                split: str = "") -> typing.Tuple[str, list]:
        """The same question to the old rows not moved over yet (text times);
        the keys are values, not ids."""
        where, params = self._legacy_where(filters, start, end)
        col = lambda c: c if c in (self.legacy or []) else "NULL"
        key = lambda c: f"CAST(strftime('%s', contime) AS INTEGER) / {bucket} * {bucket}" if c == "time" else \
            port_key(col(c)) if c in PORT_KEYS else col(c)
        if group == "time":
            where += " AND strftime('%s', contime) IS NOT NULL"
        keys = [key(c) for c in [group] + ([split] if split else [])]
        return (f"SELECT {', '.join(keys)}, sum(send), sum(recv), count(*) FROM {self.legacy_table} WHERE {where} "
                f"GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}", params)

    def _legacy_where(self, filters: typing.Sequence[Filter], start=None, end=None) -> typing.Tuple[str, list]:
        """The condition on the old rows not moved over yet, in [start, end) and passing filters."""
        have, params, where = self.legacy or [], [self.moved], ["rowid > ?"]
        col = lambda c: c if c in have else "NULL"
        text = lambda s: time.strftime(TIME_FORMAT, time.gmtime(s))
        if start is not None:
            where.append("contime >= ?")
            params.append(text(start))
        if end is not None:
            where.append("contime < ?")
            params.append(text(end))
        for f in filters:
            negate = "NOT " if f.exclude else ""
            if f.column == "time":
                params += [text(f.value), text(f.value + f.bucket)]
                where.append(f"{negate}(contime >= ? AND contime < ?)")
                continue
            values = list(f.value) if isinstance(f.value, tuple) else [f.value]
            present, high = high_ports_apart(f.column, [v for v in values if v is not None], col(f.column))
            params += present
            tests = ([f"{col(f.column)} IN ({','.join(param(v) for v in present)})"] if present else []) + \
                    ([f"{col(f.column)} IS NULL"] if None in values else []) + high
            where.append(f"{negate}coalesce({' OR '.join(tests) or '0'}, 0)")
        return " AND ".join(where), params

    def series(self, group: str, keys: typing.Sequence, filters: typing.Sequence[Filter] = (),
               start: typing.Optional[int] = None, end: typing.Optional[int] = None,
               bucket: int = HOUR) -> typing.Dict[typing.Any, typing.Dict[int, typing.List[int]]]:
        """For each of keys (values of group, as totals gives them): sent and
        received per time bucket among the rows in [start, end) that pass
        every filter, {value: {bucket start: [sent, received]}}."""
        if not keys:
            return {}
        chosen = [*filters, Filter(group, tuple(keys))]
        sums = self.sums("time", chosen, start, end, bucket, split=group) if self.v2 else {}
        if self.legacy is not None:
            sql, params = self._legacy("time", bucket, chosen, start, end, split=group)
            self.add(sums, self.run(group, sql, params))
        values = self.values(group, {k: None for k, _ in sums})
        out: typing.Dict[typing.Any, typing.Dict[int, typing.List[int]]] = {}
        for (key, t), (send, recv, n) in sums.items():
            if n > 0:
                cell = out.setdefault(values.get(key, key), {}).setdefault(t, [0, 0])
                cell[0] += send
                cell[1] += recv
        return out

    def hours(self, filters: typing.Sequence[Filter] = ()) -> typing.List[typing.Tuple[int, int]]:
        """(hour, rows) for each hour with rows passing filters, newest first."""
        sums = self.sums("time", filters, None, None, HOUR) if self.v2 else {}
        return sorted(((h, total[2]) for h, total in sums.items() if total[2] > 0 and h >= 0), reverse=True)

    def seen(self, filters: typing.Sequence[Filter] = ()) -> typing.Tuple[typing.Optional[int], typing.Optional[int]]:
        """The times of the first and the last row passing filters (local
        seconds), None when there is none: the hours from the rollups, then
        the rows of those two hours."""
        times = []
        hours = self.hours(filters)
        if hours:
            for hour, pick in ((hours[-1][0], "min"), (hours[0][0], "max")):
                params: list = [hour, hour + HOUR]
                where = " AND ".join(["s.t >= ? AND s.t < ?"] + [self._filter(f, False, params) for f in filters])
                times += [v for v in self.con.execute(f"SELECT {pick}(s.t) FROM conns s WHERE {where}", params).fetchone()
                          if v is not None]
        if self.legacy is not None:
            where, params = self._legacy_where(filters)
            old = self.con.execute(f"SELECT min(contime), max(contime) FROM {self.legacy_table} WHERE {where}",
                                   params).fetchone()
            times += [t for t in (local_seconds(v) for v in old if v is not None) if isinstance(t, int)]
        return (min(times), max(times)) if times else (None, None)

    def latest(self, filters: typing.Sequence[Filter] = (), n: int = 20) -> typing.List[dict]:
        """The newest n rows passing filters, newest first, with the columns of
        the connections view (rows whose time is no time are left out)."""
        since, count = None, 0
        for hour, rows in self.hours(filters):       # the hours that hold the newest n
            since, count = hour, count + rows
            if count >= n:
                break
        found: typing.List[dict] = []
        columns = ", ".join(f"{VIEW_SQL[c]} AS {c}" for c in DB_COLUMNS)
        if since is not None:
            params: list = [since]
            where = " AND ".join(["c.t >= ? AND typeof(c.t) = 'integer'"] +
                                 [self._filter(f, False, params, "c") for f in filters])
            cursor = self.con.execute(f"SELECT {columns} FROM {VIEW_FROM} WHERE {where} "
                                      f"ORDER BY c.t DESC, c.id DESC LIMIT ?", params + [n])
            found = [dict(zip(DB_COLUMNS, row)) for row in cursor]
        if self.legacy is not None and len(found) < n:
            where, params = self._legacy_where(filters)
            have = self.legacy or []
            cursor = self.con.execute(f"SELECT {', '.join(c if c in have else 'NULL' for c in DB_COLUMNS)} FROM "
                                      f"{self.legacy_table} WHERE {where} AND strftime('%s', contime) IS NOT NULL "
                                      f"ORDER BY contime DESC LIMIT ?", params + [n - len(found)])
            found += [dict(zip(DB_COLUMNS, row)) for row in cursor]
        return sorted(found, key=lambda r: r["contime"], reverse=True)

    # -- other questions ---------------------------------------------------------------
    def span(self) -> typing.Tuple[typing.Optional[int], typing.Optional[int]]:
        """The first and last time in the log (local seconds), None when empty."""
        # (integers sort before text: the index finds both ends at once)
        first = "SELECT t FROM conns WHERE typeof(t) = 'integer' ORDER BY t {} LIMIT 1"
        low, high = [(self.con.execute(first.format(order)).fetchone() or (None,))[0] if self.v2 else None
                     for order in ("ASC", "DESC")]
        if self.legacy is not None:
            old = self.con.execute(f"SELECT min(contime), max(contime) FROM {self.legacy_table} WHERE rowid > ?",
                                   (self.moved,)).fetchone()
            seconds = [s for s in (local_seconds(v) for v in old if v is not None) if isinstance(s, int)]
            low = min(([low] if low is not None else []) + seconds, default=None)
            high = max(([high] if high is not None else []) + seconds, default=None)
        return low, high

    def novelty(self, kinds: typing.Optional[typing.Sequence[str]] = None, exe: typing.Optional[str] = None,
                start: typing.Optional[int] = None, end: typing.Optional[int] = None,
                limit: int = NOVELTY_ROWS) -> "NoveltyList":
        """What was new (the novelty events) in [start, end), of kinds (None:
        all) and of the program exe (None: any), the newest `limit` first;
        with the count of each kind and the programs (whatever the kinds and
        exe asked for). A log of an older layout has none, and says why."""
        if not self.has_novelty:
            return NoveltyList([], {}, [], NO_NOVELTY.format(version=self.version))
        where, params = ["1"], []
        for test, value in (("t >= ?", start), ("t < ?", end)):
            if value is not None:
                where.append(test)
                params.append(value)
        in_time = " AND ".join(where)
        programs = [text_of(exe) for exe, in self.con.execute(
            f"SELECT exe FROM novelty WHERE {in_time} GROUP BY exe ORDER BY max(t) DESC, exe", params)]
        if exe is not None:
            where.append("exe = ?")
            params.append(exe)
        counts = {text_of(kind): n for kind, n in self.con.execute(
            f"SELECT kind, count(*) FROM novelty WHERE {' AND '.join(where)} GROUP BY kind", params)}
        if kinds is not None:
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params += list(kinds)
        columns = ("id",) + NOVELTY_COLUMNS
        # (a time that is no time, which only a hand-made row has, comes last)
        cursor = self.con.execute(f"SELECT {', '.join(columns)} FROM novelty WHERE {' AND '.join(where)} "
                                  "ORDER BY typeof(t) != 'integer', t DESC, id DESC LIMIT ?", params + [limit])
        events = [{c: text_of(v) for c, v in zip(columns, row)} for row in cursor]
        return NoveltyList(events, counts, programs, "")

    def has_rows(self) -> bool:
        if self.v2 and self.con.execute("SELECT EXISTS (SELECT 1 FROM conns)").fetchone()[0]:
            return True
        return self.legacy is not None and bool(self.con.execute(
            f"SELECT EXISTS (SELECT 1 FROM {self.legacy_table} WHERE rowid > ?)", (self.moved,)).fetchone()[0])

    def count(self) -> int:
        """How many rows the log has (from the whole-log rollup: no scan)."""
        n = 0
        if self.v2:
            n = self.con.execute("SELECT coalesce(sum(rows), 0) FROM rollups WHERE level = ?", (ALL_TIME,)).fetchone()[0]
        if self.legacy is not None:
            n += self.con.execute(f"SELECT count(*) FROM {self.legacy_table} WHERE rowid > ?",
                                  (self.moved,)).fetchone()[0]
        return n


COLUMN_NAMES = {"exe": "executable", "name": "name", "cmdline": "command line", "sha256": "sha256",
                "pexe": "parent executable", "pname": "parent name", "pcmdline": "parent command line",
                "psha256": "parent sha256", "gpexe": "grandparent executable", "gpname": "grandparent name",
                "gpcmdline": "grandparent command line", "gpsha256": "grandparent sha256", "uid": "user",
                "lport": "local port", "rport": "remote port", "laddr": "local address", "raddr": "remote address",
                "domain": "domain", "proto": "protocol", "time": "time"}
# byte units: (name, divisor or None for automatic, counted in bits)
UNITS = [("bytes", None, False), ("B", 1, False), ("kB", 1e3, False), ("MB", 1e6, False), ("GB", 1e9, False),
         ("bits", None, True), ("b", 1, True), ("kb", 1e3, True), ("Mb", 1e6, True), ("Gb", 1e9, True)]
AUTO_STEPS = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")]
# addresses that name no place: private, shared, loopback and link-local ones
LOCAL_NETWORKS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                     "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
                                                     "::1/128", "fc00::/7", "fe80::/10")]


def format_amount(n: int, unit: typing.Tuple[str, typing.Optional[float], bool]) -> str:
    name, divisor, bits = unit
    value, suffix = n * 8 if bits else n, "b" if bits else "B"
    if divisor is None:         # the largest step the value reaches once rounded (999,999 B is 1.0 MB)
        divisor, prefix = next((d, p) for d, p in AUTO_STEPS if value >= d or d == 1)
        if prefix and round(value / divisor, 1) >= 1000 and divisor < AUTO_STEPS[0][0]:
            divisor, prefix = next((d, p) for d, p in AUTO_STEPS if d == divisor * 1000)
        return f"{value / divisor:.1f} {prefix}{suffix}" if prefix else f"{value} {suffix}"
    return f"{value / divisor:.1f} {name}" if divisor > 1 else f"{value} {name}"


def is_local_address(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in LOCAL_NETWORKS if net.version == ip.version)


class Labels:
    """How the viewers show a value of a column: users by name, addresses with
    their country (or as private), what was not logged as such."""

    def __init__(self, geoip: typing.Optional["GeoIP"]):
        self.geoip = geoip
        self.users: typing.Dict[int, str] = {}

    def text(self, column: str, value, exact: bool = False) -> str:
        """A value as shown (exact: as it is, for an export)."""
        label = self.label(column, value)
        return label if exact else shown(label)

    def label(self, column: str, value) -> str:
        if value is None:
            return "(not logged)"
        if column == "uid":
            if value not in self.users:      # looked up once, not at every redraw
                try:
                    self.users[value] = f"{pwd.getpwuid(value).pw_name} ({value})"
                except (KeyError, TypeError, OverflowError):
                    self.users[value] = str(value)
            return self.users[value]
        if column in PORT_KEYS and value == HIGH_PORTS_KEY:
            return f"{HIGH_PORTS_TEXT} (clients' ports, together)"
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if column in ("raddr", "laddr") and value:
            place = self.place(value)
            return f"{value} ({place})" if place else value
        return str(value) if value != "" else "(none)"

    def place(self, addr: str) -> str:
        """The country of an address, "private" for one of a local network, or ''."""
        country = self.geoip.country(addr) if self.geoip is not None else ""
        return country or ("private" if is_local_address(addr) else "")


class LogReader:
    """snitch.db opened for reading, with what is wrong with it in words
    (problem): missing, unreadable, locked by a writer, or empty. `retry`
    ends the messages of problems that may go away."""

    def __init__(self, path: str, retry: str = ""):
        self.path, self.retry = path, retry
        self.log: typing.Optional[LogQuery] = None
        self.problem = ""

    def refresh(self) -> None:
        """Look at the log again: its layout, and whether it can be read at all."""
        self.problem = ""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            self.problem = f"no connection log at {self.path} yet (is picosnitch running?){self.retry}"
            return
        except OSError as e:
            self.problem = f"cannot read {self.path}: {e.strerror}" + (
                ": picosnitch's log is for the user it works for, and root" if e.errno == errno.EACCES else "")
            return
        self.ask(lambda: self.open().has_rows() or None, f"{self.path} has no connections yet{self.retry}")

    def open(self) -> LogQuery:
        """The log, its layout looked at again."""
        if self.log is not None and self.log.replaced():
            self.close()
        if self.log is None:
            self.log = LogQuery(self.path)
        self.log.refresh()
        return self.log

    def ask(self, question: typing.Callable[[], typing.Any], if_none: str = "") -> typing.Any:
        """The answer of question() on the log; a failure (or no answer, with
        if_none) becomes the problem, and the answer None."""
        try:
            answer = question()
        except sqlite3.OperationalError as e:
            busy = "locked" in str(e) or "busy" in str(e)
            self.problem = (f"{self.path} is locked by a writer{self.retry}" if busy
                            else f"cannot read {self.path}: {e}{self.retry}")
            self.close()
            return None
        except sqlite3.DatabaseError as e:
            self.problem = f"cannot read {self.path}: {e}"
            self.close()
            return None
        if answer is None and if_none:
            self.problem = if_none
        return answer

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def moving_note(percent: int) -> str:
    """What the viewers say while an older log is moved over."""
    return f"moving: {percent}% (the log is being moved to the compact layout; rows not moved yet are counted, " \
           "and answers may be slower until it is done)"


def viewer_geoip(directory: str, config: Config, said: typing.List[str]) -> typing.Optional["GeoIP"]:
    """The GeoIP database the primary keeps, if "GeoIP lookup" is on."""
    return GeoIP(os.path.join(directory, GEOIP_NAME), said.append) if config.geoip_lookup else None


# -- mutes, as `picosnitch mute`, `view` and `dash` ask for them and read them --
# The notifier keeps them (section 13) and answers on its control socket
# (section 17); its copy in the state directory is for reading here.

MUTE_ANSWER = 64 << 10      # bytes of an answer read, at most
MUTE_TIMEOUT = 10.0         # seconds to wait for the answer


def request_mute(exe: str, kinds: typing.Sequence[str], mute: bool = True,
                 path: str = CONTROL_SOCKET) -> typing.List[str]:
    """Ask the daemon to mute (or, mute False, unmute) these MUTE_KINDS keys
    for a program (its executable's absolute path); the keys muted for it
    now. PicosnitchError with the daemon's word when it says no, or why it
    could not be asked."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(MUTE_TIMEOUT)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise PicosnitchError(f"picosnitch is not running: there is no control socket at {path} "
                                  "(start it with 'sudo picosnitch start')")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):    # (refused: its answer is read next)
            sock.sendall(json.dumps({"v": 1, "type": "mute", "exe": exe, "kinds": list(kinds),
                                     "mute": mute}).encode() + b"\n")
        answer = b""
        while b"\n" not in answer and len(answer) < MUTE_ANSWER:
            data = sock.recv(MUTE_ANSWER - len(answer))
            if not data:
                break
            answer += data
    except socket.timeout:
        raise PicosnitchError(f"picosnitch did not answer in {MUTE_TIMEOUT:.0f}s")
    except OSError as e:
        raise PicosnitchError(f"the control socket at {path} cannot be used: {e.strerror or e}")
    finally:
        sock.close()
    return mute_answer(answer.partition(b"\n")[0])


def mute_answer(line: bytes) -> typing.List[str]:
    """The keys an answer of the control socket names; PicosnitchError for a refusal or an error."""
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise PicosnitchError("picosnitch's answer could not be read")
    if answer.get("type") == "refused":
        raise PicosnitchError(f"picosnitch refused: {shown(stream_str(answer.get('reason')))}")
    if answer.get("type") == "error":
        raise PicosnitchError(shown(stream_str(answer.get("text"))))
    kinds = answer.get("kinds")
    if answer.get("type") != "mutes" or not isinstance(kinds, list):
        raise PicosnitchError("picosnitch's answer could not be read")
    return [k for k in kinds if k in MUTE_KINDS]


def read_mutes(state: str) -> typing.Dict[str, typing.List[str]]:
    """The mutes as the state directory's copy says: {exe: [MUTE_KINDS keys,
    sorted]} ({} when there is none). PicosnitchError when it cannot be read."""
    path = os.path.join(state, MUTES_NAME)
    try:
        return mutes_checked(json.loads(read_regular(path, 16 << 20)))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise PicosnitchError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}")


# -- what is new, as both viewers show it: each event's time, what is new
# about the program and its bytes; which of its kinds are muted, and asking
# the daemon to mute or unmute a group of them (the only way the viewers do)

def novelty_time(event: dict) -> str:
    """An event's time (the window's local time), as text."""
    t = event["t"]
    return time.strftime(TIME_FORMAT, time.gmtime(t)) if isinstance(t, int) else shown(str(t))


def novelty_what(event: dict) -> str:
    """What was new about the program, with the connection that showed it, shown()."""
    kind, value = event["kind"], event["value"] or ""
    peer = event["domain"] or event["raddr"] or ""
    if kind == "domain":
        text = value + (f" ({peer})" if peer and peer != value else "")
    elif kind in ("country", "port"):
        text = ("port " if kind == "port" else "") + value + (f" via {peer}" if peer else "")
    elif kind == "volume":
        text = f"{value} far more in an hour than in its busiest hour before"
    elif kind == "program":
        text = f"first connection, as {event['name'] or '(no name)'}"
    else:                   # (a new name or sha256)
        text = f"{'sha256' if kind == 'hash' else kind} {value}"
    return shown(text)


def novelty_destination(event: dict) -> str:
    """The connection that showed an event: domain, address and port, shown() ('' for none)."""
    where = event["raddr"] or ""
    if where and event["rport"] is not None:
        where = f"[{where}]:{event['rport']}" if ":" in where else f"{where}:{event['rport']}"
    return shown(" ".join(p for p in (event["domain"], where) if p))


def novelty_bytes(event: dict) -> int:
    """The bytes an event tells of: a volume's in its direction (the hour's
    so far), the connection's (sent and received) otherwise."""
    send, recv = event["send"] or 0, event["recv"] or 0
    return (send if event["value"] == "sent" else recv) if event["kind"] == "volume" else send + recv


def mute_group(kind: str) -> typing.Optional[str]:
    """The group of MUTE_KINDS a kind is muted with alone (None: a new program, muted only with all)."""
    return next((key for key, kinds in MUTE_KINDS.items() if key != "all" and kind in kinds), None)


def muted_kinds(keys: typing.Iterable[str]) -> typing.Set[str]:
    """The kinds that keys mute (each a kind, or a group of MUTE_KINDS)."""
    return {kind for key in keys for kind in MUTE_KINDS.get(key, (key,)) if kind in NOVELTY_KINDS}


def muted_groups(keys: typing.Iterable[str]) -> typing.List[str]:
    """The groups of MUTE_KINDS that keys mute whole ("all" alone when they mute every kind)."""
    kinds = muted_kinds(keys)
    if set(NOVELTY_KINDS) <= kinds:
        return ["all"]
    return [key for key, group in MUTE_KINDS.items() if key != "all" and set(group) <= kinds]


def mutes_or_why(state: str) -> typing.Tuple[typing.Dict[str, typing.List[str]], str]:
    """The mutes (read_mutes), and '' or why they could not be read (then none are marked)."""
    try:
        return read_mutes(state), ""
    except PicosnitchError as e:
        return {}, str(e)


def change_mute(exe: str, group: str, mute: bool) -> str:
    """Ask the daemon to mute (or unmute) a group of MUTE_KINDS for exe; its
    answer, or why it could not be asked, in a line for the user."""
    try:
        now = request_mute(exe, [group], mute)
    except PicosnitchError as e:
        return str(e)
    done = f"{'muted' if mute else 'unmuted'} {group} for {shown(exe)}"
    return f"{done}; muted now: {', '.join(muted_groups(now)) or 'nothing'}"


# -- the live stream, as `top` and dash's live tab read it ---------------------
# Both connect to the daemon's event stream (section 17) and keep a LiveState:
# per connection and per program, the bytes of the last ticks (a rate is what
# the ticks of the last LIVE_RATE_SECONDS moved, per second) and in all since
# the viewer connected; programs new to the record, and those whose every
# process has exited; the totals of the last LIVE_HISTORY ticks, and a feed of
# new connections, programs and reports. Times are the daemon's ticks', so
# what is shown follows the stream, not the viewer's clock.

LIVE_RATE_SECONDS = 2.0
LIVE_HISTORY = 300          # ticks of totals kept (seconds), per program too
LIVE_FEED = 200             # new connections, programs and reports kept
LIVE_GONE_KEEP = 120.0      # seconds a program whose processes have all exited stays listed
LIVE_IDLE_KEEP = 600.0      # seconds a connection that moves nothing stays listed (then: in its program's "earlier")
LIVE_GROUPS = [("program", "program"), ("connection", "connection"), ("remote host", "host"), ("user", "uid")]
LIVE_SORTS = [("total", lambda r: r.send_rate + r.recv_rate, lambda r: r.sent + r.received),
              ("sent", lambda r: r.send_rate, lambda r: r.sent),
              ("received", lambda r: r.recv_rate, lambda r: r.received)]


def stream_connect(path: str = EVENTS_SOCKET) -> socket.socket:
    """A connection to the daemon's event stream; PicosnitchError says why there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise PicosnitchError(f"picosnitch is not running: there is no event stream at {path} "
                              "(start it with 'sudo picosnitch start')")
    except OSError as e:
        sock.close()
        raise PicosnitchError(f"the event stream at {path} cannot be opened: {e.strerror or e}")
    return sock


class StreamLines:
    """The events of a stream connection as they come (JSON objects). A
    refusal, or the end of the stream, is PicosnitchError."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def take(self, timeout: float = 0.0) -> typing.List[dict]:
        if not select.select([self.sock], [], [], timeout)[0]:
            return []
        try:
            data = self.sock.recv(1 << 20)
        except OSError as e:
            raise PicosnitchError(f"the event stream failed: {e.strerror or e}")
        if not data:
            raise PicosnitchError("the event stream ended: picosnitch stopped")
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        for event in events:
            if event.get("type") == "refused":
                raise PicosnitchError(f"the event stream refused this reader: {event.get('reason', '')}")
        return events


def stream_int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def stream_str(value) -> str:
    return value if isinstance(value, str) else ""


@dataclasses.dataclass
class LiveFlow:
    """A connection, or an entry of a grouping, as the live views show it."""
    key: tuple                       # a connection's; an entry's (grouping, program key or label)
    label: str                       # what names it (shown() when drawn)
    sent: int = 0
    received: int = 0
    send_rate: float = 0.0
    recv_rate: float = 0.0
    new: bool = False                # a program the record did not know
    gone: bool = False               # every process of it has exited
    children: typing.List["LiveFlow"] = dataclasses.field(default_factory=list)


class LiveState:
    """What the stream has said, since the viewer connected."""

    def __init__(self, labels: Labels):
        self.labels = labels
        self.now = 0.0                                    # the latest tick's time
        self.conns: typing.Dict[tuple, dict] = {}         # connection key -> what it is, totals, recent ticks
        self.programs: typing.Dict[str, dict] = {}        # program -> pids, uid, new, gone since
        self.history: typing.Deque[tuple] = collections.deque(maxlen=LIVE_HISTORY)   # (time, sent, received)
        self.program_history: typing.Dict[str, typing.Deque[tuple]] = {}
        self.feed: typing.Deque[tuple] = collections.deque(maxlen=LIVE_FEED)     # (time, kind, text)
        self.lost = 0                                     # lines the daemon dropped for this reader

    @staticmethod
    def program_of(event: dict) -> str:
        return stream_str(event.get("exe")) or f"({stream_str(event.get('name'))})"

    def take(self, event: dict) -> None:
        kind, when = event.get("type"), event.get("time")
        when = float(when) if isinstance(when, (int, float)) and not isinstance(when, bool) else self.now
        if kind == "tick":
            self.tick(when, [c for c in event.get("conns", []) if isinstance(c, dict)],
                      [p for p in event.get("exited", []) if isinstance(p, int)])
        elif kind == "connection":
            program = self.program(event)
            program["new"] = program["new"] or event.get("new") is True
            self.feed.append((when, "connection", f"{program['label']} → {self.peer(event)}"))
        elif kind == "executable":
            program = self.program(event)
            program["new"] = program["new"] or event.get("new") is True
            self.feed.append((when, "new program" if event.get("new") is True else "program", program["label"]))
        elif kind in ("report", "novelty"):
            self.feed.append((when, stream_str(event.get("log")) or "new", stream_str(event.get("text"))))
        elif kind == "lost":
            self.lost += stream_int(event.get("lines"))

    def program(self, event: dict) -> dict:
        key = self.program_of(event)
        if key not in self.programs:
            name, exe = stream_str(event.get("name")), stream_str(event.get("exe"))
            self.programs[key] = {"label": f"{name} ({exe})" if exe else f"{name} (no executable known)",
                                  "pids": set(), "uid": stream_int(event.get("uid")), "new": False, "gone": 0.0}
        return self.programs[key]

    def peer(self, c: dict) -> str:
        raddr, rport, domain = stream_str(c.get("raddr")), stream_int(c.get("rport")), stream_str(c.get("domain"))
        if rport < 0:               # (a row of merged connections says how many in raddr)
            return raddr
        place = self.labels.place(raddr) if raddr else ""
        where = f"[{raddr}]:{rport}" if ":" in raddr else f"{raddr}:{rport}"
        return where + (f" {domain}" if domain else "") + (f" ({place})" if place else "")

    def tick(self, when: float, conns: typing.List[dict], exited: typing.List[int]) -> None:
        self.now = when
        sent = received = 0
        moved: typing.Dict[str, typing.List[int]] = collections.defaultdict(lambda: [0, 0])
        for c in conns:
            key = tuple(c.get(k) if isinstance(c.get(k), (int, str)) else None for k in
                        ("exe", "name", "pid", "uid", "proto", "laddr", "lport", "raddr", "rport"))
            program = self.program(c)
            program["pids"].add(stream_int(c.get("pid")))
            program["gone"] = 0.0
            flow = self.conns.get(key)
            if flow is None:        # (named once: a peer's place is a lookup)
                flow = self.conns[key] = {"program": self.program_of(c), "peer": self.peer(c),
                                          "proto": stream_str(c.get("proto")), "uid": stream_int(c.get("uid")),
                                          "sent": 0, "received": 0, "recent": collections.deque()}
            send, recv = stream_int(c.get("send")), stream_int(c.get("recv"))
            flow["sent"] += send
            flow["received"] += recv
            flow["recent"].append((when, send, recv))
            flow["last"] = when
            moved[flow["program"]][0] += send
            moved[flow["program"]][1] += recv
            sent, received = sent + send, received + recv
        self.history.append((when, sent, received))
        for key, program in self.programs.items():
            history = self.program_history.setdefault(key, collections.deque(maxlen=LIVE_HISTORY))
            history.append((when, *moved.get(key, (0, 0))))
            program["pids"] -= set(exited)
            if not program["pids"] and not program["gone"] and exited:
                program["gone"] = when
        self.forget(when)

    def forget(self, when: float) -> None:
        """Ticks past the rate's span; programs gone for LIVE_GONE_KEEP, with their connections."""
        for flow in self.conns.values():
            while flow["recent"] and flow["recent"][0][0] <= when - LIVE_RATE_SECONDS:
                flow["recent"].popleft()
        old = {key for key, p in self.programs.items() if p["gone"] and p["gone"] <= when - LIVE_GONE_KEEP}
        for key in old:
            del self.programs[key]
            self.program_history.pop(key, None)
        self.conns = {k: f for k, f in self.conns.items() if f["program"] not in old}
        for key in [k for k, f in self.conns.items() if "last" in f and f["last"] <= when - LIVE_IDLE_KEEP]:
            flow = self.conns.pop(key)          # (its bytes stay in its program's totals)
            earlier = self.conns.setdefault((None, flow["program"]), {
                "program": flow["program"], "peer": "earlier connections", "proto": "", "uid": flow["uid"],
                "sent": 0, "received": 0, "recent": collections.deque()})
            earlier["sent"] += flow["sent"]
            earlier["received"] += flow["received"]

    def flows(self, group: str, text: str = "") -> typing.List[LiveFlow]:
        """The entries of a grouping (program, connection, host or uid), each
        with its rates and totals; a program's connections under it. text:
        only what names it (case aside)."""
        found: typing.Dict[tuple, LiveFlow] = {}
        for key, c in self.conns.items():
            program = self.programs.get(c["program"], {})
            label = {"program": program.get("label", c["program"]), "connection":
                     f"{program.get('label', c['program'])} → {c['peer']} {c['proto']}".rstrip(),
                     "host": c["peer"].rsplit(":", 1)[0] if ":" in c["peer"] else c["peer"],
                     "uid": self.labels.label("uid", c["uid"])}[group]
            send_rate = sum(s for _, s, _ in c["recent"]) / LIVE_RATE_SECONDS
            recv_rate = sum(r for _, _, r in c["recent"]) / LIVE_RATE_SECONDS
            if text and text.casefold() not in f"{label} {c['peer']} {program.get('label', '')}".casefold():
                continue
            ident = (group, c["program"] if group == "program" else label)
            entry = found.setdefault(ident, LiveFlow(
                ident, label, new=group in ("program", "connection") and program.get("new", False),
                gone=group in ("program", "connection") and bool(program.get("gone"))))
            entry.sent, entry.received = entry.sent + c["sent"], entry.received + c["received"]
            entry.send_rate, entry.recv_rate = entry.send_rate + send_rate, entry.recv_rate + recv_rate
            if group == "program":
                entry.children.append(LiveFlow(key, f"{c['peer']} {c['proto']}".rstrip(), c["sent"], c["received"],
                                               send_rate, recv_rate))
        return list(found.values())

    def sorted_flows(self, group: str, sort: int, text: str = "") -> typing.List[LiveFlow]:
        """flows(), the largest first by the sort's rate, then by its total."""
        _, rate, total = LIVE_SORTS[sort]
        entries = sorted(self.flows(group, text), key=lambda f: (-rate(f), -total(f), f.label))
        for entry in entries:
            entry.children.sort(key=lambda f: (-rate(f), -total(f), f.label))
        return entries

###############################################################################
# 22. terminal viewer
###############################################################################
# `picosnitch view`: snitch.db grouped by one column at a time, largest first,
# under a chain of filters, a time range and byte units. Each key that changes
# what is shown asks the query layer (section 21) for the totals: the log is
# never loaded, whatever its size; r asks again. n shows what is new instead
# (the novelty events of the time range), where m and x ask the daemon to
# mute or unmute a program; ? lists every key.

VIEWS = [("executable", "exe"), ("name", "name"), ("sha256", "sha256"), ("parent executable", "pexe"),
         ("parent name", "pname"), ("domain", "domain"), ("remote address", "raddr"), ("local port", "lport"),
         ("remote port", "rport"), ("user", "uid"), ("time", "time")]
TIME_RANGES = [("minute", 60), ("hour", 3600), ("day", 86400), ("week", 7 * 86400),
               ("month", 30 * 86400), ("year", 365 * 86400), ("all", 0)]
DEFAULT_RANGE = "all"
# the time view's bucket per range: (seconds, label format)
TIME_BUCKETS = {"minute": (1, "%Y-%m-%d %H:%M:%S"), "hour": (60, "%Y-%m-%d %H:%M"), "day": (3600, "%Y-%m-%d %H:00"),
                "week": (86400, "%Y-%m-%d"), "month": (86400, "%Y-%m-%d"), "year": (86400, "%Y-%m-%d"),
                "all": (86400, "%Y-%m-%d")}
HELP_LINE = "←→ view f filter e exclude ⌫/F/E unfilter t/T h/H time u/U units n new ? keys q"
NEW_HELP_LINE = "k/K kind ⏎ program ⌫ any m/M mute x/X unmute t/T h/H time n back ? keys q"
VIEW_KEYS_HELP = [
    ("← →", "the previous / next view (executable, name, sha256, …, time)"),
    ("↑ ↓ PgUp PgDn Home End", "move"), ("space enter f", "keep only the selected entry (then the next view)"),
    ("e", "leave out the selected entry"), ("⌫ F E", "remove the last filter / all filters / all exclusions"),
    ("t T", "the next / previous time range"), ("h H", "one range back in history / forward again"),
    ("u U", "the next / previous unit"), ("r", "read the log again"), ("n", "what's new, and back"),
    ("?", "these keys (any key goes back)"), ("q", "quit")]
NEW_KEYS_HELP = [
    ("k K", "the next / previous kind (all, program, destination, …)"),
    ("enter space f", "only the selected event's program"), ("⌫ F", "every program again"),
    ("m M", "mute the program for the selected event's kind / for all"),
    ("x X", "unmute it for that kind / for all"), ("t T h H u U r", "as above"),
    ("n", "back to the totals")]
NEW_MARK = "M"              # in the column between the bytes and the program: the event's kind is muted for it


def char_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 0 if unicodedata.combining(ch) else 1


def fit(text: str, width: int) -> str:
    """text made printable (a character that acts, such as a control or a
    bidirectional one, becomes '?') and cut to width columns."""
    out, used = [], 0
    for ch in text:
        ch = "?" if acts(ch) else ch
        w = char_width(ch)
        if used + w > width:
            break
        out.append(ch)
        used += w
    return "".join(out) + " " * (width - used)


def wrap(text: str, width: int) -> typing.List[str]:
    """text in lines of at most width characters, broken between words (a word longer than a line is cut)."""
    lines: typing.List[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word[:width])
    return lines


@dataclasses.dataclass
class ViewFilter:
    column: str
    value: typing.Any
    exclude: bool
    label: str
    bucket: int = 0      # for time: the bucket size the value starts

    def query(self) -> Filter:
        return Filter(self.column, self.value, self.exclude, self.bucket)


class NoveltyView:
    """`view`'s what's new: the novelty events of the time range, newest
    first, of a group of kinds (NOVELTY_GROUPS) and maybe of one program,
    each marked when its kind is muted for its program (as mutes.json in the
    state directory says)."""

    def __init__(self, state: str):
        self.state = state
        self.group = 0                                 # of NOVELTY_GROUPS
        self.exe: typing.Optional[str] = None          # the program listed alone
        self.cursor = self.top = 0
        self.found = NoveltyList([], {}, [], "")
        self.mutes: typing.Dict[str, list] = {}
        self.mutes_problem = ""                         # (why mutes.json could not be read)
        self.computed: typing.Optional[tuple] = None

    def current(self, reader: LogReader, span: tuple, asked: tuple) -> NoveltyList:
        """The events to list; asked: what else they depend on (the range, and r)."""
        key = (self.group, self.exe, asked)
        if key != self.computed and not reader.problem:
            kinds = list(NOVELTY_GROUPS.values())[self.group]
            self.found = reader.ask(lambda: reader.log.novelty(kinds, self.exe, *span)) or NoveltyList([], {}, [], "")
            self.mutes, self.mutes_problem = mutes_or_why(self.state)
            self.computed = key
            self.cursor = min(self.cursor, max(len(self.found.events) - 1, 0))
        return self.found

    def selected(self) -> typing.Optional[dict]:
        events = self.found.events
        return events[self.cursor] if events else None

    def muted(self, exe: str) -> typing.List[str]:
        """The groups muted for a program."""
        return muted_groups(self.mutes.get(exe, []))

    def step_group(self, step: int) -> None:
        self.group = (self.group + step) % len(NOVELTY_GROUPS)
        self.cursor = self.top = 0

    def keep_program(self, exe: typing.Optional[str]) -> None:
        self.exe, self.cursor, self.top = exe, 0, 0

    def mute(self, group: typing.Optional[str], mute: bool) -> str:
        """Ask the daemon to mute (or unmute) a group for the selected event's
        program (group None: its event's kind's); what to say."""
        event = self.selected()
        if event is None:
            return "no event selected"
        group = group or mute_group(event["kind"])
        if group is None:
            return "a new program is told of once; M mutes everything new about it, X unmutes it"
        said = change_mute(event["exe"], group, mute)
        self.mutes, self.mutes_problem = mutes_or_why(self.state)
        return said

    def screen(self, height: int, width: int, heading: str, unit: tuple, problem: str,
               status: str) -> typing.List[typing.Tuple[str, bool]]:
        """The lines to show (as Viewer.screen)."""
        found, rows = self.found, height - 6
        events = [] if problem else found.events
        self.top = min(max(self.top, self.cursor - rows + 1), self.cursor)
        group = list(NOVELTY_GROUPS)[self.group]
        program = f"program: {shown(self.exe)}" if self.exe is not None else "program: any (enter: the selected one's)"
        muted = self.muted(self.exe) if self.exe is not None else []
        counts = " · ".join(f"{kind} {found.counts[kind]}" for kind in NOVELTY_KINDS if found.counts.get(kind))
        lines = [(fit(f"what's new · kind: {group} ({self.group + 1}/{len(NOVELTY_GROUPS)}) · {heading}", width), True),
                 (fit(program + (f" · muted: {', '.join(muted)}" if muted else ""), width), False),
                 (fit(counts or "nothing new in this range", width), False)]
        name_width = max(12, (width - 33) // 2)
        lines.append((fit(f"{'time':<11} {'kind':<7} {'bytes':>9}   {'program':<{name_width}} what is new",
                          width), False))
        for i in range(self.top, min(self.top + rows, len(events))):
            lines.append((fit(self.line(events[i], unit, name_width), width), i == self.cursor))
        note = problem or found.missing or self.mutes_problem
        for text in wrap(note, width) if note else []:
            lines.append((fit(text, width), False))
        lines = lines[:height - 2]
        lines += [(" " * width, False)] * (height - 2 - len(lines))
        event = self.selected() if events else None
        detail = "" if event is None else f"{novelty_time(event)} {shown(event['text'] or '')}"
        said = wrap(status, width) if status else [NEW_HELP_LINE]
        if len(said) > 1:            # (a long answer of the daemon takes the detail's line too)
            detail, said = said[0], [" ".join(said[1:])]
        lines.append((fit(detail, width), False))
        lines.append((fit(said[0], width), True))
        return lines

    def line(self, event: dict, unit: tuple, name_width: int) -> str:
        t = event["t"]
        when = time.strftime("%m-%d %H:%M", time.gmtime(t)) if isinstance(t, int) else shown(str(t))
        mark = NEW_MARK if event["kind"] in muted_kinds(self.mutes.get(event["exe"], [])) else " "
        amount = format_amount(novelty_bytes(event), unit) if novelty_bytes(event) else ""   # (none: no connection)
        return f"{when:<11} {event['kind']:<7} {amount:>9} {mark} {fit(shown(event['exe'] or ''), name_width)} " \
               f"{novelty_what(event)}"


class Viewer:
    """The state of `picosnitch view` and what a key press does to it. screen()
    gives the lines to draw; curses only draws them."""

    def __init__(self, path: str, geoip: typing.Optional["GeoIP"], clock=time.time):
        self.reader, self.labels, self.clock = LogReader(path, "; r retries"), Labels(geoip), clock
        self.view, self.range, self.offset, self.unit = 0, [r[0] for r in TIME_RANGES].index(DEFAULT_RANGE), 0, 0
        self.filters: typing.List[ViewFilter] = []
        self.cursor = self.top = 0
        self.message = ""
        self.entries: typing.List[tuple] = []
        self.computed: typing.Optional[tuple] = None
        self.generation = 0           # bumped by r: ask again
        self.shown = (0, 0)           # the time span the entries were computed for
        self.new = NoveltyView(os.path.dirname(path))
        self.showing_new = False      # what's new is shown (n), not the totals
        self.help = False             # the keys are shown (?)
        self.refresh()

    # -- data ---------------------------------------------------------------
    @property
    def problem(self) -> str:
        """What is wrong with the log, shown instead of entries."""
        return self.reader.problem

    def refresh(self) -> None:
        """Ask again from now on; a missing, empty or locked database becomes a message."""
        self.computed, self.generation = None, self.generation + 1
        self.reader.refresh()

    def close(self) -> None:
        self.reader.close()

    def span(self) -> typing.Tuple[typing.Optional[int], typing.Optional[int]]:
        """[start, end) of the time range in snitch.db's clock (local time as seconds)."""
        seconds = TIME_RANGES[self.range][1]
        if not seconds:
            return None, None
        end = now_seconds(self.clock) + 1 - self.offset * seconds
        return end - seconds, end

    def current(self) -> typing.List[tuple]:
        """(value, sent, received, rows) of the entries to show."""
        key = (self.view, self.range, self.offset, tuple(dataclasses.astuple(f) for f in self.filters),
               self.generation)
        if key != self.computed and not self.problem:
            start, end = self.span()
            self.shown = (start or 0, end or 0)
            entries = self.reader.ask(lambda: self.reader.log.totals(
                VIEWS[self.view][1], [f.query() for f in self.filters], start, end, self.bucket()[0]))
            self.entries = entries or []
            self.computed = key
            self.cursor = min(self.cursor, max(len(self.entries) - 1, 0))
        return [] if self.problem else self.entries

    def novelty(self) -> NoveltyList:
        """What's new in the time range."""
        asked = (self.range, self.offset, self.generation)
        if (self.new.group, self.new.exe, asked) != self.new.computed and not self.problem:
            self.shown = tuple(t or 0 for t in self.span())
        return self.new.current(self.reader, self.span(), asked)

    def bucket(self) -> typing.Tuple[int, str]:
        return TIME_BUCKETS[TIME_RANGES[self.range][0]]

    def label(self, column: str, value) -> str:
        if column == "time":
            return time.strftime(self.bucket()[1], time.gmtime(value))
        return self.labels.text(column, value)

    # -- keys ---------------------------------------------------------------
    def press(self, action: typing.Optional[str], page: int) -> None:
        """Apply one key's action; page is how many entries fit on screen."""
        self.message = ""
        if self.help or action is None:
            self.help = False
            return
        moves = {"up": -1, "down": 1, "page_up": -page, "page_down": page, "home": -10 ** 12, "end": 10 ** 12}
        if action in moves and self.showing_new:
            last = len(self.novelty().events) - 1
            self.new.cursor = max(0, min(self.new.cursor + moves[action], last))
        elif action in moves:
            self.cursor = max(0, min(self.cursor + moves[action], len(self.current()) - 1))
        elif action in NEW_ACTIONS and not self.showing_new:
            self.message = f"{action.replace('_', ' ')}: a key of what's new (n shows it)"
        else:
            getattr(self, "do_" + action)()

    def do_help(self) -> None:
        self.help = True

    def do_whatsnew(self) -> None:
        self.showing_new = not self.showing_new

    def do_kind_next(self) -> None:
        self.new.step_group(1)

    def do_kind_prev(self) -> None:
        self.new.step_group(-1)

    def do_mute(self) -> None:
        self.message = self.new.mute(None, True)

    def do_mute_all(self) -> None:
        self.message = self.new.mute("all", True)

    def do_unmute(self) -> None:
        self.message = self.new.mute(None, False)

    def do_unmute_all(self) -> None:
        self.message = self.new.mute("all", False)

    def do_filter(self, exclude: bool = False) -> None:
        if self.showing_new:
            event = self.new.selected()
            if exclude:
                self.message = "e: not in what's new (enter keeps one program, ⌫ every one)"
            elif event is not None:
                self.new.keep_program(event["exe"])
            return
        entries = self.current()
        if not entries:
            return
        column = VIEWS[self.view][1]
        value = entries[self.cursor][0]
        label = f"{VIEWS[self.view][0]} {'≠' if exclude else '='} {self.label(column, value)}"
        self.filters.append(ViewFilter(column, value, exclude, label, self.bucket()[0] if column == "time" else 0))
        if not exclude:
            self.step_view(1)
        self.cursor = self.top = 0

    def do_exclude(self) -> None:
        self.do_filter(exclude=True)

    def do_undo(self) -> None:
        if self.showing_new:
            self.new.keep_program(None)
        elif self.filters:
            self.filters.pop()
            self.cursor = self.top = 0

    def do_clear_filters(self) -> None:
        if self.showing_new:
            self.new.keep_program(None)
            return
        self.filters = [f for f in self.filters if f.exclude]
        self.cursor = self.top = 0

    def do_clear_excludes(self) -> None:
        self.filters = [f for f in self.filters if not f.exclude]
        self.cursor = self.top = 0

    def step_view(self, step: int) -> None:
        self.showing_new = False        # (← → go back to the totals, as n does)
        self.view = (self.view + step) % len(VIEWS)
        self.cursor = self.top = 0

    def do_view_next(self) -> None:
        self.step_view(1)

    def do_view_prev(self) -> None:
        self.step_view(-1)

    def step_range(self, step: int) -> None:
        self.range = (self.range + step) % len(TIME_RANGES)
        self.offset, self.cursor, self.top = 0, 0, 0
        self.new.cursor = self.new.top = 0

    def do_range_next(self) -> None:
        self.step_range(1)

    def do_range_prev(self) -> None:
        self.step_range(-1)

    def do_older(self) -> None:
        if TIME_RANGES[self.range][1]:
            self.offset += 1
            self.cursor = self.top = self.new.cursor = self.new.top = 0

    def do_newer(self) -> None:
        if self.offset:
            self.offset -= 1
            self.cursor = self.top = self.new.cursor = self.new.top = 0

    def do_unit_next(self) -> None:
        self.unit = (self.unit + 1) % len(UNITS)

    def do_unit_prev(self) -> None:
        self.unit = (self.unit - 1) % len(UNITS)

    def do_refresh(self) -> None:
        self.close()
        self.refresh()

    # -- screen -------------------------------------------------------------
    def when(self, computed: bool) -> str:
        """The time range, as the heading says it (computed: as asked, not as now)."""
        name, seconds = TIME_RANGES[self.range]
        if not seconds:
            return "all time"
        start, end = self.shown if computed else self.span()
        fmt = lambda t: time.strftime("%m-%d %H:%M", time.gmtime(t))
        return f"{name} {fmt(start)} to {fmt(end - 1)}" + (f" (-{self.offset})" if self.offset else "")

    def heading(self) -> str:
        moving = self.reader.log.moving() if self.reader.log is not None and not self.problem else None
        return f"by {VIEWS[self.view][0]} ({self.view + 1}/{len(VIEWS)}) · {self.when(bool(self.computed))} · " \
               f"{UNITS[self.unit][0]}" + (f" · moving: {moving}%" if moving is not None else "")

    def help_screen(self, height: int, width: int) -> typing.List[typing.Tuple[str, bool]]:
        """Every key, of the totals and of what's new."""
        rows = [(fit("keys of picosnitch view (any key goes back)", width), True)]
        rows += [(fit(f"  {keys:<14} {what}", width), False) for keys, what in VIEW_KEYS_HELP]
        rows += [(fit("in what's new (n):", width), False)]
        rows += [(fit(f"  {keys:<14} {what}", width), False) for keys, what in NEW_KEYS_HELP]
        return rows[:height] + [(" " * width, False)] * (height - len(rows))

    def screen(self, height: int, width: int) -> typing.List[typing.Tuple[str, bool]]:
        """The lines to show, each (text exactly width columns, highlighted)."""
        if height < (7 if self.showing_new or self.help else 5) or width < 20:
            return [(fit("terminal too small", width), False)][:height]
        if self.help:
            return self.help_screen(height, width)
        if self.showing_new:
            self.novelty()
            return self.new.screen(height, width, f"{self.when(True)} · {UNITS[self.unit][0]}", UNITS[self.unit],
                                   self.problem, self.message)
        entries = self.current()
        rows = height - 4
        self.top = min(max(self.top, self.cursor - rows + 1), self.cursor)
        chain = " > ".join(f.label for f in self.filters) or "none"
        unit, column = UNITS[self.unit], VIEWS[self.view][1]
        shown = [(i, format_amount(entries[i][1], unit), format_amount(entries[i][2], unit))
                 for i in range(self.top, min(self.top + rows, len(entries)))]
        w = max([9] + [max(len(a), len(b)) for _, a, b in shown])
        lines = [(fit(self.heading(), width), True), (fit(f"filters: {chain}", width), False),
                 (fit(f"{'sent':>{w}} {'received':>{w}}  {VIEWS[self.view][0]}", width), False)]
        for i, sent, received in shown:
            text = f"{sent:>{w}} {received:>{w}}  {self.label(column, entries[i][0])}"
            lines.append((fit(text, width), i == self.cursor))
        if self.problem:
            lines.append((fit(self.problem, width), False))
        lines += [(" " * width, False)] * (height - 1 - len(lines))
        lines.append((fit(self.message or HELP_LINE, width), True))
        return lines


# keys of the viewer -> actions of Viewer.press
VIEW_KEYS = {" ": "filter", "\n": "filter", "\r": "filter", "f": "filter", "e": "exclude",
             "\x7f": "undo", "\b": "undo", "F": "clear_filters", "E": "clear_excludes",
             "t": "range_next", "T": "range_prev", "h": "older", "H": "newer",
             "u": "unit_next", "U": "unit_prev", "r": "refresh", "?": "help", "n": "whatsnew",
             "k": "kind_next", "K": "kind_prev", "m": "mute", "M": "mute_all", "x": "unmute", "X": "unmute_all"}
# the actions of what's new alone
NEW_ACTIONS = {"kind_next", "kind_prev", "mute", "mute_all", "unmute", "unmute_all"}
CURSES_KEYS = {"KEY_ENTER": "filter", "KEY_BACKSPACE": "undo", "KEY_UP": "up", "KEY_DOWN": "down",
               "KEY_PPAGE": "page_up", "KEY_NPAGE": "page_down", "KEY_HOME": "home", "KEY_END": "end",
               "KEY_LEFT": "view_prev", "KEY_RIGHT": "view_next"}


def view_loop(stdscr, viewer: Viewer) -> None:
    """Draw, wait for a key, apply it; q quits, a resize redraws."""
    import curses
    keys = {**VIEW_KEYS, **{getattr(curses, name): action for name, action in CURSES_KEYS.items()}}
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    stdscr.keypad(True)
    while True:
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, (text, highlight) in enumerate(viewer.screen(height, width)):
            try:
                stdscr.addstr(y, 0, text, curses.A_REVERSE if highlight else curses.A_NORMAL)
            except curses.error:      # the bottom-right cell cannot be written; the rest is drawn
                pass
        stdscr.refresh()
        key = stdscr.get_wch()
        if key in ("q", "Q"):
            return
        if key == curses.KEY_RESIZE:
            curses.update_lines_cols()
            continue
        viewer.press(keys.get(key), max(height - 4, 1))


def run_viewer(state: str, config_dir: str) -> int:
    """View the log in the state directory, with the user's settings."""
    import curses
    said: typing.List[str] = []
    viewer = Viewer(os.path.join(state, DB_NAME), viewer_geoip(state, load_config(config_dir, create=False), said))
    viewer.message = said[0] if said else ""
    try:
        curses.wrapper(view_loop, viewer)
    finally:
        viewer.close()
    return 0

###############################################################################
# 23. live table (top)
###############################################################################
# `picosnitch top`: what uses the network now, from the event stream (the
# LiveState of section 21), redrawn as ticks come. Per program its rates and
# its totals since `top` started, its connections under it; grouped instead
# by connection, remote host or user. Where a key means what it does in
# `view`, it is the same key. Top's state and keys are here; curses only
# draws the lines screen() gives.

TOP_KEYS_HELP = [("← →", "group by program, connection, remote host, user"), ("s S", "sort by total, sent, received"),
                 ("/", "filter: type, then Enter (Esc drops it)"), ("⌫", "remove the filter"),
                 ("p", "pause (the stream is still read: nothing is missed)"), ("↑ ↓ PgUp PgDn Home End", "move"),
                 ("u U", "units"), ("?", "these keys"), ("q", "quit")]
TOP_HELP_LINE = "←→ group s sort / filter p pause u units ? keys q"
TOP_CHILDREN = 3            # a program's connections listed under it (the largest)


class Top:
    """The state of `picosnitch top` and what a key press does to it."""

    def __init__(self, labels: Labels):
        self.live = LiveState(labels)
        self.group, self.sort, self.unit, self.cursor, self.first = 0, 0, 0, 0, 0
        self.filter, self.typing, self.help = "", False, False
        self.paused: typing.Optional[typing.List[typing.Tuple[str, str]]] = None     # the lines shown when paused
        self.ended = ""                          # why the stream ended

    def take(self, events: typing.List[dict]) -> None:
        """Events from the stream (taken in while paused too: only the display stands still)."""
        for event in events:
            self.live.take(event)

    def press(self, key) -> bool:
        """Apply one key; False to quit."""
        if self.typing:
            if key in ("\n", "\r", "KEY_ENTER"):
                self.typing = False
            elif key == "\x1b":
                self.typing, self.filter = False, ""
            elif key in ("\x7f", "\b", "KEY_BACKSPACE"):
                self.filter = self.filter[:-1]
            elif isinstance(key, str) and len(key) == 1 and key.isprintable():
                self.filter += key
            self.cursor = self.first = 0
            return True
        if key in ("q", "Q"):
            return False
        if self.help:
            self.help = False
            return True
        moves = {"KEY_UP": -1, "KEY_DOWN": 1, "KEY_PPAGE": -10, "KEY_NPAGE": 10, "KEY_HOME": -10 ** 9,
                 "KEY_END": 10 ** 9}
        if key in moves:
            self.cursor = max(0, self.cursor + moves[key])
        elif key in ("KEY_LEFT", "KEY_RIGHT"):
            self.group = (self.group + (1 if key == "KEY_RIGHT" else -1)) % len(LIVE_GROUPS)
            self.cursor = self.first = 0
        elif key in ("s", "S"):
            self.sort = (self.sort + (1 if key == "s" else -1)) % len(LIVE_SORTS)
        elif key in ("u", "U"):
            self.unit = (self.unit + (1 if key == "u" else -1)) % len(UNITS)
        elif key == "/":
            self.typing, self.filter = True, ""
        elif key in ("\x7f", "\b", "KEY_BACKSPACE"):
            self.filter = ""
        elif key == "p":
            self.paused = None if self.paused is not None else self.lines()
        elif key == "?":
            self.help = True
        return True

    def heading(self) -> str:
        group, sort = LIVE_GROUPS[self.group][0], LIVE_SORTS[self.sort][0]
        state = "PAUSED" if self.paused is not None else time.strftime("%H:%M:%S", time.localtime(self.live.now)) \
            if self.live.now else "waiting for the first tick"
        return f"picosnitch top · by {group} ({self.group + 1}/{len(LIVE_GROUPS)}) · sort: {sort} · " \
               f"{UNITS[self.unit][0]} · {state}"

    def lines(self) -> typing.List[typing.Tuple[str, str]]:
        """(text, style) of each entry row, children indented under programs."""
        unit, out = UNITS[self.unit], []
        amount = lambda n: format_amount(int(n), unit)
        for entry in self.live.sorted_flows(LIVE_GROUPS[self.group][1], self.sort, self.filter):
            mark = ("NEW " if entry.new else "") + ("gone " if entry.gone else "")
            style = "gone" if entry.gone else "new" if entry.new else ""
            out.append((f"{amount(entry.send_rate) + '/s':>11} {amount(entry.recv_rate) + '/s':>11} "
                        f"{amount(entry.sent):>10} {amount(entry.received):>10}  {mark}{shown(entry.label)}", style))
            for child in entry.children[:TOP_CHILDREN]:
                out.append((f"{amount(child.send_rate) + '/s':>11} {amount(child.recv_rate) + '/s':>11} "
                            f"{amount(child.sent):>10} {amount(child.received):>10}    └ {shown(child.label)}",
                            "child"))
            if len(entry.children) > TOP_CHILDREN:
                out.append((f"{'':>46}    └ and {len(entry.children) - TOP_CHILDREN} more connections", "child"))
        return out

    def screen(self, height: int, width: int) -> typing.List[typing.Tuple[str, str]]:
        """The lines to show, each (text exactly width columns, style)."""
        if height < 5 or width < 40:
            return [(fit("terminal too small", width), "")][:height]
        if self.help:
            rows = [(fit("keys of picosnitch top (any key goes back)", width), "bar")]
            rows += [(fit(f"  {keys:<24} {what}", width), "") for keys, what in TOP_KEYS_HELP]
            return rows + [(" " * width, "")] * (height - len(rows))
        rows = self.paused if self.paused is not None else self.lines()
        room = height - 4
        self.cursor = min(self.cursor, max(len(rows) - 1, 0))
        self.first = min(max(self.first, self.cursor - room + 1), self.cursor)
        shown_filter = f"filter: {self.filter}" + ("▏" if self.typing else "") if self.typing or self.filter \
            else "filter: none (/ to type one)"
        out = [(fit(self.heading(), width), "bar"), (fit(shown_filter, width), ""),
               (fit(f"{'up':>11} {'down':>11} {'sent':>10} {'received':>10}  {LIVE_GROUPS[self.group][0]}", width), "")]
        for i in range(self.first, min(self.first + room, len(rows))):
            text, style = rows[i]
            out.append((fit(text, width), "cursor" if i == self.cursor else style))
        if not rows:
            out.append((fit("nothing has moved since top started" if self.live.now else
                            "waiting for picosnitch's first tick…", width), ""))
        out += [(" " * width, "")] * (height - 1 - len(out))
        notes = [self.ended] + ([f"the daemon dropped {self.live.lost} lines top did not take in time"]
                                if self.live.lost else [])
        out.append((fit(" · ".join(n for n in notes if n) or TOP_HELP_LINE, width), "bar"))
        return out


def top_loop(stdscr, top: Top, lines: StreamLines) -> None:
    """Read the stream, draw, apply keys; a resize redraws."""
    import curses
    styles = {"bar": curses.A_REVERSE, "cursor": curses.A_REVERSE, "new": curses.A_BOLD, "gone": curses.A_DIM,
              "child": curses.A_NORMAL, "": curses.A_NORMAL}
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    stdscr.keypad(True)
    stdscr.timeout(250)
    while True:
        if not top.ended:
            try:
                top.take(lines.take(0))
            except PicosnitchError as e:
                top.ended = str(e)
        height, width = stdscr.getmaxyx()
        stdscr.erase()
        for y, (text, style) in enumerate(top.screen(height, width)):
            with contextlib.suppress(curses.error):       # (the bottom-right cell cannot be written)
                stdscr.addstr(y, 0, text, styles.get(style, curses.A_NORMAL))
        stdscr.refresh()
        try:
            key = stdscr.get_wch()
        except curses.error:        # (no key within the timeout)
            continue
        if key == curses.KEY_RESIZE:
            curses.update_lines_cols()
            continue
        if isinstance(key, int):
            key = curses.keyname(key).decode("ascii", "replace")
        if not top.press(key):
            return


def run_top(state: str, config_dir: str) -> int:
    """The live table, from the daemon's event stream."""
    import curses
    lines = StreamLines(stream_connect())
    said: typing.List[str] = []
    top = Top(Labels(viewer_geoip(state, load_config(config_dir, create=False), said)))
    top.take(lines.take(2.0))           # (the hello, or a refusal said before curses starts)
    curses.wrapper(top_loop, top, lines)
    return 0


def run_events(out: typing.BinaryIO) -> int:
    """Copy the event stream to out, line by line, until it ends or out is closed."""
    sock = stream_connect()
    lines = StreamLines(sock)
    try:
        for event in lines.take(5.0):       # (a refusal is said as an error)
            out.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
        out.write(lines.buffer)
        out.flush()
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return 0
            out.write(data)
            out.flush()
    except BrokenPipeError:         # (`picosnitch events | head`)
        return 0
    finally:
        sock.close()

###############################################################################
# 24. web UI
###############################################################################
# `picosnitch dash`: bytes sent and received over time, one trace per entry
# of a grouping, a totals table and a drill-down per executable, under a
# filter chain and a time range, as in `view`. Every interaction asks the
# query layer (section 21) again; nothing is loaded whole. Its live tab
# shows what `top` shows, from the event stream (the LiveState of section
# 20), which a thread of the server follows from start to end; its
# what's-new page lists the novelty events as `view` does, and asks the
# daemon for mutes (section 21). The whole view is in the page's address, so a reload, a bookmark or the browser's
# history shows it again. The server answers only requests for the address it
# serves (no DNS rebinding), and off loopback only those with its token.
# Dash and Plotly are imported here only, when the command runs; the page's
# data (figures, rows) are plain values, built by functions of their own.

DASH_HOST, DASH_PORT = "127.0.0.1", 5100
DASH_GROUPS = ["exe", "name", "cmdline", "sha256", "pexe", "pname", "pcmdline", "psha256", "uid", "lport", "rport",
               "laddr", "raddr", "domain", "proto"]
DASH_RANGES = [("5m", 300), ("15m", 900), ("1h", HOUR), ("6h", 6 * HOUR), ("1d", DAY), ("1w", 7 * DAY),
               ("30d", 30 * DAY), ("1y", 365 * DAY), ("all", 0)]
DASH_DEFAULT_RANGE = "1d"
DASH_REFRESH = [(0, "off"), (5, "5 s"), (15, "15 s"), (60, "1 min")]
# chart buckets (seconds): the smallest that keeps a trace within DASH_POINTS;
# ranges longer than DASH_ROWS_SPAN take whole hours, which the rollups keep
DASH_BUCKETS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR,
                DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY, 91 * DAY, 364 * DAY]
DASH_POINTS = 180          # (with 11 traces above and below: fewer than 4,000 points in all)
DASH_ROWS_SPAN = 6 * HOUR
DASH_TRACES = 10           # entries charted one by one; the rest are one trace, "others"
DASH_TABLE_ROWS = 500      # entries sent to the table (the largest)
DASH_OPTIONS = 50          # values offered for a new filter: the largest, or the largest that match what is typed
DASH_DETAIL_ROWS = 15
DASH_REUSE = 10            # seconds for which the same view's data are reused (a write window)
DASH_SMOOTH = 5            # buckets in the moving average of "smooth"
DASH_COOKIE = "picosnitch_token"
DASH_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#aaaaaa"]
DASH_THEMES = {"light": {"paper": "#ffffff", "plot": "#ffffff", "text": "#222222", "grid": "#e6e6e6"},
               "dark": {"paper": "#1e1f24", "plot": "#1e1f24", "text": "#e4e4e4", "grid": "#3a3c44"}}
DASH_LABEL = 48            # characters of a label shown in a legend; the whole on hover
# the tables' cells; a name takes the width the amounts leave it, cut short (whole on hover)
DASH_CELL = {"maxWidth": "280px", "overflow": "hidden", "textOverflow": "ellipsis",
             "fontFamily": "system-ui, sans-serif", "fontSize": "13px"}
DASH_NAME_CELL = {"textAlign": "left", "width": "100%", "minWidth": "120px", "maxWidth": 0}
# a click filters, opens the details or chooses: no cell stays marked
DASH_UNMARKED = [{"selector": "td.cell--selected, td.focused",
                  "rule": "background-color: inherit !important; border-color: inherit !important;"}]
# plotly.js's basic bundle (scatter, bar and pie: all the page draws) is a
# quarter of the full one that Plotly ships, and the browser runs it in about
# a second less. .ci/install-deps puts this release of it in one of
# DASH_PLOTLY_PATHS; the page uses it when its sha256 is this one and Plotly's
# own plotly.js is the same version, and Plotly's full bundle otherwise.
DASH_PLOTLY_BASIC = ("4.1.1", "99784e3abfb07b142a15e521a439e6d9addceadb3f79553fd24c72774f0649ba")
DASH_PLOTLY_PATHS = ["/usr/share/picosnitch/plotly-basic.min.js", "/usr/local/share/picosnitch/plotly-basic.min.js"]
DASH_VIEWS = ["history", "live", "new"]
DASH_VIEW_NAMES = {"history": "history", "live": "live", "new": "what's new"}
# the live tab: the page asks once a second while the tab is shown (and the
# browser's tab is visible), and is told nothing when no event came meanwhile
DASH_LIVE_REFRESH = 1000   # ms between the page's questions
DASH_LIVE_RETRY = 2.0      # seconds between attempts to reach the event stream
DASH_LIVE_WAIT = 60.0      # seconds the stream's thread waits for lines at a time
DASH_LIVE_SPAN = 60        # seconds the chart spans at least (LIVE_HISTORY at most)
DASH_LIVE_TRACES = 5       # programs charted one by one, beside all of them together
DASH_LIVE_ROWS = 200       # programs listed at most (the busiest)
DASH_LIVE_FEED = 100       # entries of the feed shown (the newest)


@dataclasses.dataclass
class DashState:
    """What the page shows; it lives in the page's address (dash_query)."""
    group: str = "exe"
    filters: typing.List[typing.Tuple[str, typing.Any, bool]] = dataclasses.field(default_factory=list)
    range: str = DASH_DEFAULT_RANGE     # a preset of DASH_RANGES, or "custom"
    start: typing.Optional[int] = None  # of a custom range: [start, end) in the log's seconds
    end: typing.Optional[int] = None
    offset: int = 0                     # presets: how many of their lengths back in history
    units: str = "bytes"                # or "bits"
    smooth: bool = False
    detail: typing.Any = None           # the executable drilled into
    refresh: int = 0                    # seconds between refreshes; 0: off
    theme: str = "light"
    view: str = "history"               # or "live": the live tab; "new": what's new
    kinds: str = "all"                  # what's new: the kinds listed (a key of NOVELTY_GROUPS)
    program: typing.Any = None          # what's new: the program listed alone, and detailed


def encode_value(value) -> str:
    """A logged value as text for the address: n (NULL), i (integer), s (text) or x (bytes that are not UTF-8)."""
    if value is None:
        return "n"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, bytes):
        try:
            return "s" + value.decode("utf-8")
        except UnicodeDecodeError:
            return "x" + value.hex()
    return f"s{value}"


def decode_value(token: str):
    """encode_value reversed; ValueError for text that is not one."""
    kind, rest = token[:1], token[1:]
    if kind == "n" and not rest:
        return None
    if kind == "i":
        return int(rest)
    if kind == "x":
        return bytes.fromhex(rest)
    if kind == "s":
        return rest
    raise ValueError(f"not a value: {token!r}")


CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def dash_csv(header: typing.Sequence[str], rows: typing.Sequence[typing.Sequence]) -> str:
    """A table as CSV for a spreadsheet (with a byte order mark), its values
    exact, but no text cell can run as a formula: one that starts with =, +,
    -, @, a tab or a carriage return starts with ' instead, as OWASP
    recommends; text is quoted, numbers are not."""
    import csv
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["'" + v if isinstance(v, str) and v.startswith(CSV_FORMULA_STARTS) else v for v in row])
    return "\ufeff" + out.getvalue()


def dash_time_text(t: typing.Optional[int]) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) if t is not None else ""


def dash_time(text: str) -> typing.Optional[int]:
    """A time of the address or the from/to fields (YYYY-MM-DDTHH:MM[:SS], local) in the log's seconds."""
    text = (text or "").strip().replace("T", " ")
    seconds = local_seconds(text + ":00" if len(text) == 16 else text)
    return seconds if isinstance(seconds, int) else None


def dash_query(state: DashState) -> str:
    """The page's address (its query string) for a state; dash_state reads it back."""
    defaults = DashState()
    pairs = [("g", state.group)] if state.group != defaults.group else []
    pairs += [("f", f"{column}{'!' if exclude else '='}{encode_value(value)}") for column, value, exclude in state.filters]
    if state.range == "custom":         # (to: the last second in the range, as the page's field shows it)
        pairs += [("from", dash_time_text(state.start)), ("to", dash_time_text(state.end - 1))]
    elif state.range != defaults.range:
        pairs.append(("r", state.range))
    pairs += [("o", str(state.offset))] if state.offset and state.range != "custom" else []
    pairs += [("u", state.units)] if state.units != defaults.units else []
    pairs += [("s", "1")] if state.smooth else []
    pairs += [("d", encode_value(state.detail))] if state.detail is not None else []
    pairs += [("a", str(state.refresh))] if state.refresh else []
    pairs += [("t", state.theme)] if state.theme != defaults.theme else []
    pairs += [("v", state.view)] if state.view != defaults.view else []
    pairs += [("k", state.kinds)] if state.kinds != defaults.kinds else []
    pairs += [("p", encode_value(state.program))] if state.program is not None else []
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


def dash_state(query: str) -> typing.Tuple[DashState, typing.List[str]]:
    """The state an address asks for, and what in it was not understood (and left out)."""
    state, problems = DashState(), []
    ranges, groups = dict(DASH_RANGES), set(DASH_GROUPS)
    for key, text in urllib.parse.parse_qsl((query or "").lstrip("?"), keep_blank_values=True):
        try:
            if key == "g" and text in groups:
                state.group = text
            elif key == "f":
                found = re.match(r"([a-z0-9]+)([=!])(.*)\Z", text, re.S)
                if not found or found.group(1) not in QUERY_COLUMNS:
                    raise ValueError(text)
                state.filters.append((found.group(1), decode_value(found.group(3)), found.group(2) == "!"))
            elif key == "r" and text in ranges:
                state.range = text
            elif key in ("from", "to") and dash_time(text) is not None:
                state.range = "custom"
                if key == "from":
                    state.start = dash_time(text)
                else:
                    state.end = dash_time(text) + 1
            elif key == "o" and int(text) >= 0:
                state.offset = int(text)
            elif key == "u" and text in ("bytes", "bits"):
                state.units = text
            elif key == "s" and text in ("0", "1"):
                state.smooth = text == "1"
            elif key == "d":
                state.detail = decode_value(text)
            elif key == "a" and int(text) in dict(DASH_REFRESH):
                state.refresh = int(text)
            elif key == "t" and text in DASH_THEMES:
                state.theme = text
            elif key == "v" and text in DASH_VIEWS:
                state.view = text
            elif key == "k" and text in NOVELTY_GROUPS:
                state.kinds = text
            elif key == "p":
                state.program = decode_value(text)
            else:
                raise ValueError(text)
        except ValueError:
            problems.append(f"{key}={text}")
    if state.range == "custom" and (state.start is None or state.end is None or state.start >= state.end):
        problems.append("from/to: not a time range")
        state.range, state.start, state.end = DASH_DEFAULT_RANGE, None, None
    return state, problems


def dash_span(state: DashState, now: int) -> typing.Tuple[typing.Optional[int], typing.Optional[int]]:
    """[start, end) of the state's time range in the log's seconds (None: unbounded)."""
    if state.range == "custom":
        return state.start, state.end
    seconds = dict(DASH_RANGES)[state.range]
    if not seconds:
        return None, None
    end = now + 1 - state.offset * seconds
    return end - seconds, end


def dash_bucket(first: int, last: int) -> int:
    """The chart's time bucket for times from first to last (see DASH_BUCKETS)."""
    span = max(last - first + 1, 1)
    for bucket in DASH_BUCKETS:
        if (span <= DASH_ROWS_SPAN or bucket % HOUR == 0) and span / bucket <= DASH_POINTS:
            return bucket
    return DASH_BUCKETS[-1]


def dash_data(log: LogQuery, state: DashState, now: int) -> dict:
    """What the chart and the table show: every entry of the grouping with
    its totals (largest first), and per time bucket the sent and received
    bytes of the largest DASH_TRACES entries and of all the others."""
    start, end = dash_span(state, now)
    first, last = (start, end - 1) if start is not None and end is not None else log.span()
    if first is None or last is None:
        return dash_nothing(state, now)
    first, last = (start if start is not None else first), (end - 1 if end is not None else last)
    bucket = dash_bucket(first, last)
    filters = [Filter(column, value, exclude) for column, value, exclude in state.filters]
    entries = log.totals(state.group, filters, start, end)
    top = [entry[0] for entry in entries[:DASH_TRACES]]
    series = log.series(state.group, top, filters, start, end, bucket)
    others: typing.Dict[int, typing.List[int]] = {}
    if len(entries) > DASH_TRACES:
        for t, send, recv, _ in log.totals("time", filters, start, end, bucket):
            charted = [series.get(key, {}).get(t, [0, 0]) for key in top]
            others[t] = [send - sum(c[0] for c in charted), recv - sum(c[1] for c in charted)]
    return {"entries": entries, "series": series, "others": others, "bucket": bucket,
            "first": first // bucket * bucket, "last": last // bucket * bucket, "span": (first, last)}


def dash_zoom(relayout) -> typing.Optional[typing.Tuple[int, int]]:
    """The time range [start, end) a zoom of the chart shows (Plotly's
    relayoutData), or None for anything else it reports."""
    if not isinstance(relayout, dict):
        return None
    zoomed = relayout.get("xaxis.range") or [relayout.get(f"xaxis.range[{i}]") for i in (0, 1)]
    if not isinstance(zoomed, (list, tuple)) or len(zoomed) != 2:
        return None
    start, end = (dash_time(str(t)[:19]) if t else None for t in zoomed)
    return (start, end + 1) if start is not None and end is not None and start < end else None


def dash_nothing(state: DashState, now: int) -> dict:
    """dash_data of a log with nothing to show: the range, with no entries (a day for all of it)."""
    start, end = dash_span(state, now)
    first, last = (start, end - 1) if start is not None and end is not None else (now - DAY + 1, now)
    return {"entries": [], "series": {}, "others": {}, "bucket": HOUR, "first": first, "last": last,
            "span": (first, last)}


def smoothed(values: typing.List[float], width: int = DASH_SMOOTH) -> typing.List[float]:
    """A centred moving average (shorter at the ends)."""
    half, out = width // 2, []
    for i in range(len(values)):
        window = values[max(0, i - half):i + half + 1]
        out.append(sum(window) / len(window))
    return out


def shorten(text: str, width: int = DASH_LABEL) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def dash_figure(data: dict, state: DashState, labels: Labels, empty: str = "no connections in this range") -> dict:
    """The chart as a Plotly figure: sent above, received below, one trace per
    entry (the same colour in both), exact amounts on hover; over the whole
    range, and with `empty` written on it when there is nothing to draw."""
    colors, theme = DASH_COLORS, DASH_THEMES[state.theme]
    factor, unit = (8, "bits") if state.units == "bits" else (1, "bytes")
    times = list(range(data["first"], data["last"] + 1, data["bucket"]))
    x = [time.strftime(TIME_FORMAT, time.gmtime(t)) for t in times]
    traces = [(labels.text(state.group, key), data["series"].get(key, {})) for key, *_ in data["entries"][:DASH_TRACES]]
    if data["others"]:
        traces.append((f"(all {len(data['entries']) - DASH_TRACES} others)", data["others"]))
    figure_data = []
    for i, (label, series) in enumerate(traces):
        for direction, axis in ((0, "y"), (1, "y2")):
            exact = [series.get(t, [0, 0])[direction] * factor for t in times]
            y = smoothed(exact) if state.smooth else exact
            figure_data.append({       # (Plotly reads names as markup: they go as literal text)
                "type": "scatter", "mode": "lines", "x": x, "y": y, "yaxis": axis,
                "name": html.escape(shorten(label), quote=False), "legendgroup": str(i),
                "showlegend": direction == 0, "meta": html.escape(label, quote=False), "customdata": exact,
                "line": {"color": colors[i % len(colors)], "width": 1.5},
                "hovertemplate": f"%{{meta}}<br>%{{x}}<br>{'sent' if direction == 0 else 'received'} "
                                 f"%{{customdata:,}} {unit}<extra></extra>"})
    axis = {"gridcolor": theme["grid"], "zerolinecolor": theme["grid"], "rangemode": "tozero"}
    bucket = data["bucket"]
    per = f"{bucket // DAY} d" if bucket % DAY == 0 else f"{bucket // HOUR} h" if bucket % HOUR == 0 else \
        f"{bucket // 60} min" if bucket % 60 == 0 else f"{bucket} s"
    layout = {
        "paper_bgcolor": theme["paper"], "plot_bgcolor": theme["plot"], "font": {"color": theme["text"]},
        "margin": {"l": 60, "r": 10, "t": 30, "b": 40}, "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.12}, "uirevision": dash_query(dataclasses.replace(state, refresh=0)),
        "xaxis": {**axis, "type": "date", "anchor": "y2"},
        "yaxis": {**axis, "domain": [0.54, 1], "title": {"text": f"sent ({unit} per {per})"}},
        "yaxis2": {**axis, "domain": [0, 0.46], "title": {"text": f"received ({unit} per {per})"}},
        "dragmode": "zoom",
    }
    if not traces:      # (blank lines keep both axes, over the whole range)
        ends = [time.strftime(TIME_FORMAT, time.gmtime(t)) for t in data.get("span", (data["first"], data["last"]))]
        layout["xaxis"]["range"] = ends
        figure_data = [{"type": "scatter", "mode": "lines", "x": ends, "y": [0, 0], "yaxis": axis,
                        "hoverinfo": "skip", "showlegend": False, "line": {"width": 0}} for axis in ("y", "y2")]
        layout["annotations"] = [{"text": empty, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5,
                                  "y": 0.77, "font": {"size": 15}}]
    return {"data": figure_data, "layout": layout}


def dash_table_rows(data: dict, state: DashState, labels: Labels) -> typing.Tuple[list, list, list]:
    """The totals table: columns, rows (the largest DASH_TABLE_ROWS) and their
    tooltips (the whole label, exact amounts)."""
    factor = 8 if state.units == "bits" else 1
    amount = {"type": "numeric", "format": {"specifier": ".3~s"}}      # 1.5M, exact on hover
    columns = [{"name": COLUMN_NAMES[state.group], "id": "entry"},
               {"name": f"sent ({state.units})", "id": "sent", **amount},
               {"name": f"received ({state.units})", "id": "received", **amount},
               {"name": "rows", "id": "rows", "type": "numeric", "format": {"specifier": ","}}]
    if state.group == "exe":
        columns.append({"name": "", "id": "details"})
    rows, tips, unit = [], [], "bits" if factor == 8 else "bytes"
    for i, (value, send, recv, n) in enumerate(data["entries"][:DASH_TABLE_ROWS]):
        label = labels.text(state.group, value)
        rows.append({"id": i, "entry": label, "sent": send * factor, "received": recv * factor, "rows": n,
                     "key": encode_value(value), **({"details": "details"} if state.group == "exe" else {})})
        tips.append({"entry": {"value": label, "type": "text"},
                     "sent": {"value": f"{send * factor:,} {unit}", "type": "text"},
                     "received": {"value": f"{recv * factor:,} {unit}", "type": "text"}})
    return columns, rows, tips


def dash_table_colors(theme: str) -> typing.Tuple[dict, dict]:
    """The style of a table's header, and of its cells, in a theme."""
    colors = DASH_THEMES[theme]
    return ({"backgroundColor": colors["grid"], "color": colors["text"], "fontWeight": "600"},
            {"backgroundColor": colors["paper"], "color": colors["text"]})


def dash_options(column: str, entries: typing.Sequence[tuple], labels: Labels, typed: str = "",
                 chosen: typing.Optional[str] = None) -> typing.List[dict]:
    """The filter bar's values of a column, from its entries (largest first):
    the DASH_OPTIONS largest whose label has the text typed, with the one
    chosen (as encode_value gives it) kept."""
    offered, typed, kept = [], (typed or "").casefold(), chosen is None
    for value, *_ in entries:
        if len(offered) >= DASH_OPTIONS and kept:
            break
        text, token = labels.text(column, value), encode_value(value)
        if (typed in text.casefold() and len(offered) < DASH_OPTIONS) or token == chosen:
            offered.append({"label": shorten(text, 90), "value": token})
            kept = kept or token == chosen
    return offered


def read_record(path: str) -> typing.Tuple[dict, str]:
    """record.json as it is (the viewers never move it aside), and a problem ('' if none)."""
    empty = {section: {} for section in RECORD_SECTIONS}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return empty, ""
    except (OSError, ValueError) as e:
        return empty, f"{path} could not be read ({e})"
    problem = record_problem(data)
    return ({**empty, **data}, "") if not problem else (empty, f"{path} could not be read ({problem})")


def dash_detail(log: LogQuery, record: dict, exe, state: DashState, now: int, labels: Labels) -> dict:
    """The drill-down of one executable: its names and hashes (with
    VirusTotal's verdicts) from record.json; first and last seen, over the
    whole log; its parents, domains and addresses in the range; its latest
    connections."""
    start, end = dash_span(state, now)
    mine = [Filter("exe", exe)]
    text = exe.decode("utf-8", "replace") if isinstance(exe, bytes) else str(exe)
    first, last = log.seen(mine)
    shown = lambda t: time.strftime(TIME_FORMAT, time.gmtime(t)) if t is not None else "never"
    top = lambda column: [(labels.text(column, value), send, recv) for value, send, recv, _ in
                          log.totals(column, mine, start, end)[:DASH_DETAIL_ROWS]]
    hashes = record.get("SHA256", {}).get(text, {})
    logged = {labels.text("sha256", v): (s, r) for v, s, r, _ in log.totals("sha256", mine, start, end)}
    latest = []
    for row in log.latest(mine, DASH_DETAIL_ROWS):
        value = lambda c: labels.text(c, row[c])
        latest.append({"time": value("contime"), "name": value("name"), "proto": value("proto"),
                       "local": f"{value('laddr')} {value('lport')}", "remote": f"{value('raddr')} {value('rport')}",
                       "domain": value("domain"), "sent": row["send"] or 0, "received": row["recv"] or 0,
                       "sha256": value("sha256")})
    return {"exe": text, "names": list(record.get("Executables", {}).get(text, [])),
            "hashes": [(sha, verdict, logged.get(sha)) for sha, verdict in hashes.items()] +
                      [(sha, "", amounts) for sha, amounts in logged.items() if sha not in hashes],
            "first": shown(first), "last": shown(last), "parents": top("pexe"), "domains": top("domain"),
            "addresses": top("raddr"), "latest": latest}


def dash_hosts(host: str, port: int) -> typing.Optional[typing.Set[str]]:
    """The Host headers that name the address served (None: any, for a
    server on every address, which the token then guards)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    named = f"[{host}]" if ":" in host else host
    hosts = {f"{named}:{port}".lower()}
    if is_loopback_host(host):
        hosts |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    if port == 80:
        hosts |= {h.rsplit(":", 1)[0] for h in hosts}
    return hosts


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dash_address(environ: typing.Mapping[str, str] = os.environ) -> typing.Tuple[str, int]:
    """HOST and PORT, checked."""
    host = environ.get("HOST", "").strip() or DASH_HOST
    text = environ.get("PORT", "").strip() or str(DASH_PORT)
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PicosnitchError(f"PORT must be a port number (1-65535), found {text!r}")
    return host, int(text)


class DashGuard:
    """Checks each request before Dash sees it: its Host header must name the
    address served, and it must carry the token (on loopback too, which
    every local account reaches): once in the address (?token=...), which
    sets a cookie, then in that cookie. Without it: 403, and no data.

    A browser sends a cookie for localhost to every port of it, where
    another local account may listen: so the page lives under a secret
    path (prefix), the cookie is sent only there, and no address leaves
    the page in a Referer header."""

    def __init__(self, host: str, port: int, token: str = ""):
        self.hosts, self.token, self.port = dash_hosts(host, port), token, port
        self.prefix = f"/{secrets.token_urlsafe(16)}/" if token else "/"

    def check(self):
        from flask import make_response, redirect, request
        text = {"Content-Type": "text/plain; charset=utf-8"}
        if self.hosts is not None and request.host.lower() not in self.hosts:
            return make_response(f"picosnitch dash answers only for {', '.join(sorted(self.hosts))}\n", 403, text)
        if not self.token:
            return None
        given = request.args.get("token")
        if given is not None and hmac.compare_digest(given.encode(), self.token.encode()):
            # (the rest of the address as it was: it holds the view)
            rest = "&".join(p for p in request.query_string.decode("ascii", "replace").split("&")
                            if p and not p.startswith("token="))
            answer = redirect(self.prefix + ("?" + rest if rest else ""))
            answer.set_cookie(DASH_COOKIE, self.token, path=self.prefix, httponly=True, samesite="Strict")
            return answer
        if not request.path.startswith(self.prefix) or \
                not hmac.compare_digest(request.cookies.get(DASH_COOKIE, "").encode(), self.token.encode()):
            return make_response("picosnitch dash needs its token: open the address it printed when it started\n",
                                 403, text)
        return None

    @staticmethod
    def seal(answer):
        """Every answer: no Referer from the page (its address holds the secret path)."""
        answer.headers["Referrer-Policy"] = "no-referrer"
        return answer


DASH_CSS = """
body { margin: 0; font-family: system-ui, sans-serif; font-size: 14px; }
#root { min-height: 100vh; padding: 8px 14px; box-sizing: border-box; }
.ps-light { background: #ffffff; color: #222222; }
.ps-dark { background: #1e1f24; color: #e4e4e4; }
.ps-bar, .ps-filters { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; margin-bottom: 8px; }
.ps-title { font-weight: 600; font-size: 18px; margin-right: 8px; }
.ps-bar .dash-dropdown, .ps-filters .dash-dropdown { min-width: 150px; }
#group { min-width: 190px; } #add-value { min-width: 320px; }
.ps-bar .dash-input-container { flex: 0 0 236px; width: 236px; }
html, body { overflow-x: hidden; }
.ps-dark .dash-dropdown-placeholder { color: #a8adb8; }
.ps-dark input[type=datetime-local] { color-scheme: dark; }
.ps-dark label, .ps-dark .dash-options-list-option-text { color: inherit; }
.ps-chip { display: inline-flex; align-items: center; gap: 4px; padding: 2px 4px 2px 8px; margin-right: 4px;
           border-radius: 12px; border: 1px solid #888888; max-width: 420px; }
.ps-chip span { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.ps-chip button { border: none; background: transparent; color: inherit; cursor: pointer; font-size: 14px; }
.ps-message { min-height: 1.2em; margin: 4px 0; color: #b35900; }
.ps-table-bar { display: flex; align-items: center; justify-content: space-between; gap: 8px; }
.ps-main { display: flex; gap: 12px; align-items: flex-start; }
.ps-main > .ps-chart { flex: 3 1 0; min-width: 0; height: 520px; }
.ps-main > .ps-side { flex: 2 1 0; min-width: 0; }
/* narrower than the table beside the chart needs: one below the other, the chart taller for its legend */
@media (max-width: 1249px) {
    .ps-main { flex-direction: column; align-items: stretch; }
    .ps-main > .ps-chart, .ps-main > .ps-side { flex: none; width: 100%; }
    .ps-main > .ps-chart { height: 780px; }
}
.ps-detail { margin-bottom: 12px; }
.ps-detail table { border-collapse: collapse; margin-bottom: 10px; }
.ps-detail td, .ps-detail th { padding: 2px 8px; text-align: left; border-bottom: 1px solid #8884; }
.ps-detail h3 { margin: 12px 0 4px; font-size: 15px; }
.ps-dark input, .ps-dark button { background: #2b2d35; color: #e4e4e4; border: 1px solid #555555; }
button { cursor: pointer; }
/* the view shown: history, live or what's new */
.ps-bar .ps-history { display: contents; }
.ps-view-live .ps-history, .ps-view-history .ps-live, .ps-view-new .ps-history, .ps-view-new .ps-live,
.ps-view-history .ps-new, .ps-view-live .ps-new { display: none !important; }
.ps-new-left { flex: 3 1 0; min-width: 0; }
.ps-new .ps-detail p { margin: 4px 0; overflow-wrap: anywhere; }
@media (max-width: 1249px) { .ps-new-left { flex: none; width: 100%; } }
.ps-tabs label { padding: 3px 10px; border: 1px solid #888888; border-radius: 12px; margin-right: 2px; }
.ps-tabs input { display: none; }
.ps-tabs label:has(input:checked) { background: #1f77b4; border-color: #1f77b4; }
.ps-tabs label:has(input:checked), .ps-tabs label:has(input:checked) * { color: #ffffff !important; }
.ps-live .dash-input-container { flex: 0 0 320px; width: 320px; }
.ps-dark { color-scheme: dark; }
.ps-live-status { color: #666666; }
.ps-dark .ps-live-status { color: #a8adb8; }
.ps-live-left { flex: 3 1 0; min-width: 0; }
.ps-live-chart { height: 420px; }
.ps-live h3 { margin: 10px 0 4px; font-size: 15px; }
.ps-note { margin-bottom: 4px; }
.ps-feed { max-height: 300px; overflow-y: auto; font-size: 13px; border-top: 1px solid #8884; }
.ps-feed div { padding: 2px 0; border-bottom: 1px solid #8882; overflow-wrap: anywhere; }
.ps-feed .ps-when { color: #888888; margin-right: 8px; font-variant-numeric: tabular-nums; }
.ps-feed .ps-kind { display: inline-block; min-width: 92px; margin-right: 8px; font-weight: 600; }
.ps-feed .ps-new-program .ps-kind, .ps-feed .ps-error-log .ps-kind { color: #d62728; }
@media (max-width: 1249px) { .ps-live-left { flex: none; width: 100%; } }
"""

DASH_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>""" + DASH_CSS + """</style></head>
<body>{%app_entry%}<footer>{%config%}<!--plotly-->{%scripts%}{%renderer%}</footer></body>
</html>"""


def dash_plotly_basic(paths: typing.List[str], plotly_version: str) -> typing.Optional[bytes]:
    """The plotly.js basic bundle of DASH_PLOTLY_BASIC from the first of paths
    that holds it, if Plotly's own plotly.js is of its version; else None."""
    version, sha256 = DASH_PLOTLY_BASIC
    if plotly_version != version:
        return None
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
    return None


def dash_change(state: DashState, trigger, value, inputs: dict) -> None:
    """What the page asks of the state: the settings its controls show
    (which may be ahead of the address, when an answer is still on its
    way), then what the control that fired does. The address alone
    counts when it fired itself (back, forward, a zoom) or for a refresh."""
    kind = trigger.get("type") if isinstance(trigger, dict) else trigger
    if kind not in (None, "url", "tick"):
        state.group = inputs["group"] if inputs["group"] in DASH_GROUPS else state.group
        state.units = inputs["units"] if inputs["units"] in ("bytes", "bits") else state.units
        state.smooth = bool(inputs["smooth"])
        state.refresh = inputs["refresh"] if inputs["refresh"] in dict(DASH_REFRESH) else state.refresh
        state.theme = inputs["theme"] if inputs["theme"] in DASH_THEMES else state.theme
        state.view = inputs["view"] if inputs.get("view") in DASH_VIEWS else state.view
        if inputs["range"] in dict(DASH_RANGES) and inputs["range"] != state.range:
            state.range, state.offset, state.start, state.end = inputs["range"], 0, None, None
    if kind in ("older", "newer") and value:
        step = 1 if kind == "older" else -1
        if state.range == "custom":
            length = state.end - state.start
            state.start, state.end = state.start - step * length, state.end - step * length
        elif dict(DASH_RANGES)[state.range]:
            state.offset = max(0, state.offset + step)
    elif kind == "apply-range" and value:      # (to is the last second shown: the range ends after it)
        start, last = dash_time(inputs["start"]), dash_time(inputs["end"])
        if start is not None and last is not None and start <= last:
            state.range, state.start, state.end, state.offset = "custom", start, last + 1, 0
    elif kind == "unfilter" and value and trigger["index"] < len(state.filters):
        del state.filters[trigger["index"]]
    elif kind == "add-filter" and value and inputs["add_value"] is not None and inputs["add_column"] in QUERY_COLUMNS:
        state.filters.append((inputs["add_column"], decode_value(inputs["add_value"]), inputs["add_mode"] == "!"))
    elif kind == "table" and value and inputs["rows"]:
        row = next((r for r in inputs["rows"] if r["id"] == value.get("row_id")), None)
        if row is not None and value.get("column_id") == "details":
            state.detail = decode_value(row["key"])
        elif row is not None:
            state.filters.append((state.group, decode_value(row["key"]), False))
    elif kind == "close-detail" and value:
        state.detail = None


def dash_control_values(state: DashState, now: int) -> dict:
    """What the page's controls show for state, by the control's id."""
    start, end = dash_span(state, now)
    return {"group": state.group, "range": state.range, "units": state.units,
            "smooth": ["smooth"] if state.smooth else [], "refresh": state.refresh, "theme": state.theme,
            "view": state.view, "from": dash_time_text(start), "to": dash_time_text(end - 1 if end is not None else None)}


def dash_layout(config: Config):
    """The page: the toolbar, the filter chain, the message and details, the
    chart and the totals table; the live tab (the callbacks of dash_app fill
    them). The root's class says which view is shown."""
    from dash import dcc, html
    option = lambda pairs: [{"label": label, "value": value} for value, label in pairs]
    columns = [(c, COLUMN_NAMES[c]) for c in DASH_GROUPS]
    return html.Div(id="root", className="ps-light ps-view-history", children=[
        dcc.Location(id="url", refresh=False),
        dcc.Store(id="zoom"),
        dcc.Interval(id="tick", interval=60_000, disabled=True),
        html.Div(className="ps-bar", children=[
            html.Span("picosnitch", className="ps-title"),
            dcc.RadioItems(id="view", options=option([(v, DASH_VIEW_NAMES[v]) for v in DASH_VIEWS]),
                           value="history", inline=True, className="ps-tabs"),
            html.Div(className="ps-history", children=dash_history_controls(option, columns)),
            dcc.RadioItems(id="units", options=["bytes", "bits"], value="bytes", inline=True),
            dcc.RadioItems(id="theme", options=list(DASH_THEMES), value="light", inline=True)]),
        html.Div(className="ps-history", children=dash_history_view(config, option, columns)),
        html.Div(className="ps-live", children=dash_live_view()),
        html.Div(className="ps-new", children=dash_new_view())])


def dash_history_controls(option: typing.Callable, columns: list) -> list:
    """The toolbar's controls of the history view."""
    from dash import dcc, html
    return [html.Label("group by"),
            dcc.Dropdown(id="group", options=option(columns), value="exe", clearable=False),
            html.Label("range"),
            dcc.Dropdown(id="range", options=option([(n, n) for n, _ in DASH_RANGES] + [("custom", "custom")]),
                         value=DASH_DEFAULT_RANGE, clearable=False),
            html.Button("◀", id="older", title="older"), html.Button("▶", id="newer", title="newer"),
            dcc.Input(id="from", type="datetime-local", step=1),
            dcc.Input(id="to", type="datetime-local", step=1),
            html.Button("apply", id="apply-range", title="show this time range"),
            dcc.Checklist(id="smooth", options=[{"label": "smooth", "value": "smooth"}], value=[], inline=True),
            dcc.Dropdown(id="refresh", options=option([(s, f"refresh {label}") for s, label in DASH_REFRESH]),
                         value=0, clearable=False)]


def dash_history_view(config: Config, option: typing.Callable, columns: list) -> list:
    """The history view below the toolbar: the filter chain, the message and
    details, the chart and the totals table."""
    from dash import dash_table, dcc, html
    return [
        html.Div(className="ps-filters", children=[
            html.Span("filters:"), html.Span(id="chips"),
            dcc.Dropdown(id="add-column", options=option(columns), value="exe", clearable=False),
            dcc.RadioItems(id="add-mode", options=option([("=", "="), ("!", "≠")]), value="=", inline=True),
            dcc.Dropdown(id="add-value", options=[], placeholder="a value in this range (type to search)…"),
            html.Button("add filter", id="add-filter")]),
        html.Div(id="message", className="ps-message"),
        html.Div(id="detail", className="ps-detail"),
        html.Div(className="ps-main", children=[
            html.Div(className="ps-chart", children=[dcc.Graph(
                id="graph", responsive=True,
                config={"scrollZoom": bool(config.dash_scroll_zoom), "displaylogo": False})]),
            html.Div(className="ps-side", children=[
                html.Div(className="ps-table-bar", children=[
                    html.Div(id="table-note"),
                    html.Button("Export", id="export", className="export",
                                title="the table as CSV (a cell that could run as a formula starts with ')"),
                    dcc.Download(id="download")]),
                dash_table.DataTable(
                    id="table", sort_action="native", page_size=25, tooltip_delay=300, tooltip_duration=None,
                    style_table={"overflowX": "auto"}, style_cell=DASH_CELL,
                    # (the entries take the width the amounts leave them, cut short: whole on hover)
                    style_cell_conditional=[{"if": {"column_id": "entry"}, **DASH_NAME_CELL},
                                            {"if": {"column_id": "details"}, "cursor": "pointer",
                                             "textDecoration": "underline", "minWidth": "64px"}],
                    css=DASH_UNMARKED)])])]


def dash_live_view() -> list:
    """The live tab: its status line, sort and filter; the chart of the last
    minutes and the feed beside the programs' table and the connections of
    the one clicked (the callbacks of dash_app fill them)."""
    from dash import dash_table, dcc, html
    amounts = [{"name": name, "id": column} for column, name in
               (("up", "up"), ("down", "down"), ("sent", "sent"), ("received", "received"))]
    table = lambda table_id, first, name: dash_table.DataTable(
        id=table_id, columns=[{"name": name, "id": first}] + ([{"name": "", "id": "mark"}] if first == "program"
                                                             else []) + amounts,
        data=[], page_action="none", tooltip_delay=300, tooltip_duration=None, style_cell=DASH_CELL,
        style_table={"overflowX": "auto", "maxHeight": "460px", "overflowY": "auto"},
        style_cell_conditional=[{"if": {"column_id": first}, **DASH_NAME_CELL},
                                {"if": {"column_id": "mark"}, "minWidth": "44px", "fontWeight": "600"}],
        css=DASH_UNMARKED)
    return [
        dcc.Interval(id="live-tick", interval=DASH_LIVE_REFRESH, disabled=True),
        dcc.Store(id="live-pulse"), dcc.Store(id="live-seen"), dcc.Store(id="live-chosen"),
        html.Div(className="ps-filters", children=[
            html.Label("sort by"),
            dcc.RadioItems(id="live-sort", options=[{"label": name, "value": i} for i, (name, *_) in
                                                    enumerate(LIVE_SORTS)], value=0, inline=True),
            dcc.Input(id="live-filter", type="search", debounce=True, placeholder="filter: text in a name or address"),
            html.Span(id="live-status", className="ps-live-status")]),
        html.Div(className="ps-main", children=[
            html.Div(className="ps-live-left", children=[
                html.Div(className="ps-live-chart", children=[dcc.Graph(
                    id="live-graph", responsive=True, config={"displayModeBar": False})]),
                html.H3("new connections, programs, and reports"),
                html.Div(id="live-feed", className="ps-feed")]),
            html.Div(className="ps-side", children=[
                html.Div("programs since dash started (click one for its connections)", className="ps-note"),
                table("live-table", "program", "program"),
                html.Div(id="live-conns-box", hidden=True, children=[
                    html.H3([html.Span(id="live-conns-heading"), " ",
                             html.Button("close", id="live-close")]),
                    table("live-conns", "connection", "connection")])])])]


def dash_detail_view(found: dict) -> list:
    """The drill-down for one executable, from dash_detail's answer."""
    from dash import html

    def table(head: typing.List[str], rows: typing.List[typing.Sequence]) -> html.Table:
        return html.Table([html.Tr([html.Th(h) for h in head])] +
                          [html.Tr([html.Td(str(c), title=str(c)) for c in row]) for row in rows])
    amount = lambda n: format_amount(n, UNITS[0])
    return [
        html.H2(["details: ", html.Code(found["exe"]), " ",
                 html.Button("close", id={"type": "close-detail", "index": 0})]),
        html.P(f"first seen {found['first']} · last seen {found['last']} · names: "
               f"{', '.join(found['names']) or '(none recorded)'}"),
        html.H3("sha256 (VirusTotal)"),
        table(["sha256", "verdict", "sent", "received"],
              [(sha, verdict or "(not in record.json)", amount(a[0]) if a else "", amount(a[1]) if a else "")
               for sha, verdict, a in found["hashes"]]),
        html.H3("parents in this range"),
        table(["parent executable", "sent", "received"], [(p, amount(s), amount(r)) for p, s, r in found["parents"]]),
        html.H3("domains in this range"),
        table(["domain", "sent", "received"], [(d, amount(s), amount(r)) for d, s, r in found["domains"]]),
        html.H3("remote addresses in this range"),
        table(["address", "sent", "received"], [(a, amount(s), amount(r)) for a, s, r in found["addresses"]]),
        html.H3("latest connections"),
        table(["time", "name", "protocol", "local", "remote", "domain", "sent", "received", "sha256"],
              [(c["time"], c["name"], c["proto"], c["local"], c["remote"], c["domain"], amount(c["sent"]),
                amount(c["received"]), shorten(c["sha256"], 16)) for c in found["latest"]])]


# -- the live tab ----------------------------------------------------------------

class DashLive:
    """The event stream as the live tab reads it: a thread follows the stream
    (connecting again whenever the daemon stops and starts) into a LiveState,
    under a lock the page's callbacks take too, and says in one line how it
    stands. taken counts the events taken: a page that saw as many has
    nothing new to show. The page's own questions, each a new connection to
    port, are left out of the feed (which they would fill)."""

    def __init__(self, labels: Labels, path: str = EVENTS_SOCKET, port: int = 0):
        self.live, self.path, self.port = LiveState(labels), path, port
        self.lock = threading.Lock()
        self.status = "not following the event stream"
        self.taken = 0

    def start(self) -> None:
        threading.Thread(target=self.follow, name="picosnitch-live", daemon=True).start()

    def follow(self) -> None:
        while True:
            self.read_stream()
            time.sleep(DASH_LIVE_RETRY)

    def read_stream(self) -> None:
        """Take the events of one connection until it ends; status says why it did."""
        try:
            sock = stream_connect(self.path)
        except PicosnitchError as e:
            self.say(str(e))
            return
        try:
            lines = StreamLines(sock)
            self.say(f"connected since {time.strftime('%H:%M:%S')}")
            while True:
                events = [e for e in lines.take(DASH_LIVE_WAIT)
                          if not dash_own_connection(e, os.getpid(), self.port)]
                with self.lock:
                    for event in events:
                        self.live.take(event)
                    self.taken += len(events)
        except PicosnitchError as e:
            self.say(str(e))
        finally:
            sock.close()

    def say(self, status: str) -> None:
        with self.lock:
            self.status, self.taken = status, self.taken + 1     # (a new status is news to the page)


def dash_own_connection(event: dict, pid: int, port: int) -> bool:
    """Whether an event is a new connection of dash's own (the server's, as
    process pid) or of a browser to it on loopback."""
    return event.get("type") == "connection" and (event.get("pid") == pid or (
        port > 0 and event.get("rport") == port and is_loopback_host(stream_str(event.get("raddr")))))


def dash_live_status(live: LiveState, status: str) -> str:
    """The live tab's status line: the stream's, the latest tick, lines lost."""
    notes = [status] + ([f"latest tick {time.strftime('%H:%M:%S', time.localtime(live.now))}"] if live.now else [])
    notes += [f"the daemon dropped {live.lost} lines dash did not take in time"] if live.lost else []
    return " · ".join(notes)


def dash_live_tables(live: LiveState, sort: int, text: str, chosen: typing.Optional[str], units: str) -> dict:
    """The live tab's tables: per program (the busiest first by the sort) its
    rates, its totals since dash started and whether it is new or gone, with
    the exact totals beside; the connections of the program chosen (by its
    key), if it is listed. Names are shown()."""
    unit = UNITS[5] if units == "bits" else UNITS[0]
    amounts = lambda f: {"up": format_amount(round(f.send_rate), unit) + "/s",
                         "down": format_amount(round(f.recv_rate), unit) + "/s",
                         "sent": format_amount(f.sent, unit), "received": format_amount(f.received, unit),
                         "sent_bytes": f.sent, "received_bytes": f.received}
    rows, tips, chosen_row, connections = [], [], None, []
    for i, flow in enumerate(live.sorted_flows("program", sort, text)[:DASH_LIVE_ROWS]):
        key = flow.key[1]
        label = shown(flow.label)
        rows.append({"id": key, "program": label, "mark": "NEW" if flow.new else "gone" if flow.gone else "",
                     **amounts(flow)})
        tips.append({"program": {"value": label, "type": "text"},
                     "sent": {"value": f"{flow.sent:,} bytes", "type": "text"},
                     "received": {"value": f"{flow.received:,} bytes", "type": "text"}})
        if key == chosen:
            chosen_row = i
            connections = [{"id": j, "connection": shown(c.label), **amounts(c)} for j, c in enumerate(flow.children)]
    heading = "" if chosen is None else f"connections of {rows[chosen_row]['program']}" if chosen_row is not None \
        else "the program chosen is not listed now"
    return {"rows": rows, "tips": tips, "chosen_row": chosen_row, "heading": heading, "connections": connections}


def dash_live_time(t: float) -> str:
    """A tick's time as the chart's axis takes it (local, to the millisecond)."""
    return time.strftime(TIME_FORMAT, time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def dash_live_figure(live: LiveState, state: DashState, empty: str, text: str = "") -> dict:
    """The last minutes (see DASH_LIVE_SPAN) as a Plotly figure: bytes per second
    sent above and received below, all programs together and the
    DASH_LIVE_TRACES that moved the most in that time (of those whose name
    has the text), one trace each (the same colour in both); `empty`
    written on it before the first tick."""
    theme, (factor, unit) = DASH_THEMES[state.theme], (8, "bits") if state.units == "bits" else (1, "bytes")
    label = lambda key: live.programs[key]["label"] if key in live.programs else key
    moved = {key: sum(s + r for _, s, r in history) for key, history in live.program_history.items()
             if text.casefold() in label(key).casefold()}
    busiest = sorted((k for k, n in moved.items() if n), key=lambda k: (-moved[k], k))[:DASH_LIVE_TRACES]
    traces = [("all programs", live.history, theme["text"])] + [
        (label(k), live.program_history[k], DASH_COLORS[i]) for i, k in enumerate(busiest)]
    figure_data = []
    for i, (name, history, color) in enumerate(traces):
        x = [dash_live_time(t) for t, _, _ in history]
        for direction, axis in ((1, "y"), (2, "y2")):
            figure_data.append({       # (Plotly reads names as markup: they go as literal text)
                "type": "scatter", "mode": "lines", "x": x, "y": [tick[direction] * factor for tick in history],
                "yaxis": axis, "name": html.escape(shorten(shown(name)), quote=False), "legendgroup": str(i),
                "showlegend": direction == 1, "meta": html.escape(shown(name), quote=False),
                "line": {"color": color, "width": 2.5 if i == 0 else 1.5},
                "hovertemplate": f"%{{meta}}<br>%{{x|%H:%M:%S}}<br>{'sent' if direction == 1 else 'received'} "
                                 f"%{{y:,}} {unit}/s<extra></extra>"})
    end = live.now or time.time()
    # (the last minute at least, then all that is kept: a page opened just now is not one thin line at the edge)
    start = max(end - LIVE_HISTORY, min(live.history[0][0] if live.history else end, end - DASH_LIVE_SPAN))
    axis = {"gridcolor": theme["grid"], "zerolinecolor": theme["grid"], "rangemode": "tozero", "fixedrange": True}
    layout = {
        "paper_bgcolor": theme["paper"], "plot_bgcolor": theme["plot"], "font": {"color": theme["text"]},
        "margin": {"l": 60, "r": 10, "t": 20, "b": 40}, "hovermode": "closest", "dragmode": False,
        "legend": {"orientation": "h", "y": -0.12}, "uirevision": "live",
        "xaxis": {**axis, "type": "date", "anchor": "y2",
                  "range": [dash_live_time(start), dash_live_time(end)]},
        "yaxis": {**axis, "domain": [0.54, 1], "title": {"text": f"sent ({unit}/s)"}},
        "yaxis2": {**axis, "domain": [0, 0.46], "title": {"text": f"received ({unit}/s)"}}}
    if not live.now:
        layout["annotations"] = [{"text": html.escape(empty, quote=False), "showarrow": False, "xref": "paper",
                                  "yref": "paper", "x": 0.5, "y": 0.77, "font": {"size": 15}}]
    return {"data": figure_data, "layout": layout}


def dash_live_feed(live: LiveState) -> typing.List[typing.Tuple[str, str, str]]:
    """The feed, newest first: (time, kind, text shown())."""
    newest = list(live.feed)[-DASH_LIVE_FEED:][::-1]
    return [(time.strftime("%H:%M:%S", time.localtime(t)), kind, shown(text)) for t, kind, text in newest]


def dash_server(config: Config, guard: DashGuard):
    """A Dash application with no layout yet: the theme of "Dash theme", the
    guard before every request, and plotly.js's basic bundle when it is there."""
    import dash
    stylesheets = []
    if config.dash_theme:
        try:
            import dash_bootstrap_components as dbc
            stylesheets.append(getattr(dbc.themes, config.dash_theme.upper()))
        except (ImportError, AttributeError):
            pass        # the plain look
    from plotly.offline import get_plotlyjs_version
    basic = dash_plotly_basic(DASH_PLOTLY_PATHS, get_plotlyjs_version())
    basic_url = f"{guard.prefix}_picosnitch/plotly-basic-{DASH_PLOTLY_BASIC[0]}.min.js"
    # (run before Dash's scripts, it is the Plotly that dcc.Graph finds and uses)
    page = DASH_PAGE.replace("<!--plotly-->", f'<script src="{basic_url}"></script>' if basic else "")
    app = dash.Dash("picosnitch", title="picosnitch", update_title=None, serve_locally=True, compress=False,
                    external_stylesheets=stylesheets, index_string=page, enable_mcp=False,
                    assets_folder=os.path.join(os.devnull, "assets"), include_assets_files=False,
                    url_base_pathname=guard.prefix)
    app.server.before_request(guard.check)
    app.server.after_request(guard.seal)
    if basic:
        import flask
        app.server.add_url_rule(basic_url, "plotly_basic", lambda: flask.Response(
            basic, mimetype="text/javascript", headers={"Cache-Control": "public, max-age=31536000, immutable"}))
    return app


def dash_page_wiring() -> dict:
    """The page's main callback, by name: what it fills (the address, the
    controls, what is shown), what changes start it, and what it reads."""
    from dash import ALL, Input, Output, State
    controls = {name: Output(name, "value") for name in ("group", "range", "units", "smooth", "refresh", "theme",
                                                           "view", "from", "to")}
    shown = {"chips": Output("chips", "children"), "figure": Output("graph", "figure"),
             "columns": Output("table", "columns"), "rows": Output("table", "data"),
             "tips": Output("table", "tooltip_data"), "active": Output("table", "active_cell"),
             "header": Output("table", "style_header"), "cells": Output("table", "style_data"),
             "note": Output("table-note", "children"), "detail": Output("detail", "children"),
             "message": Output("message", "children"), "interval": Output("tick", "interval"),
             "still": Output("tick", "disabled"), "theme_class": Output("root", "className"),
             "offered": Output("add-value", "options"), "live_still": Output("live-tick", "disabled")}
    return {"output": {"search": Output("url", "search"), **controls, **shown},
            "inputs": {"search": Input("url", "search"), "group": Input("group", "value"),
                       "range_": Input("range", "value"), "older": Input("older", "n_clicks"),
                       "newer": Input("newer", "n_clicks"), "apply": Input("apply-range", "n_clicks"),
                       "units": Input("units", "value"), "smooth": Input("smooth", "value"),
                       "refresh": Input("refresh", "value"), "theme": Input("theme", "value"),
                       "view": Input("view", "value"), "unfilter": Input({"type": "unfilter", "index": ALL}, "n_clicks"),
                       "add": Input("add-filter", "n_clicks"), "active": Input("table", "active_cell"),
                       "close": Input({"type": "close-detail", "index": ALL}, "n_clicks"),
                       "tick": Input("tick", "n_intervals")},
            "state": {"start_text": State("from", "value"), "end_text": State("to", "value"),
                      "add_column": State("add-column", "value"), "add_value": State("add-value", "value"),
                      "add_mode": State("add-mode", "value"), "rows": State("table", "data")}}


def dash_live_wiring() -> dict:
    """The live tab's callback, by name: what it fills, what starts it
    (a second passed, a control of the tab, the address), what it reads."""
    from dash import Input, Output, State
    return {"output": {"seen": Output("live-seen", "data"), "chosen": Output("live-chosen", "data"),
                       "status": Output("live-status", "children"), "rows": Output("live-table", "data"),
                       "tips": Output("live-table", "tooltip_data"),
                       "marked": Output("live-table", "style_data_conditional"),
                       "header": Output("live-table", "style_header"), "cells": Output("live-table", "style_data"),
                       "active": Output("live-table", "active_cell"),
                       "heading": Output("live-conns-heading", "children"),
                       "connections": Output("live-conns", "data"),
                       "conns_header": Output("live-conns", "style_header"),
                       "conns_cells": Output("live-conns", "style_data"),
                       "conns_hidden": Output("live-conns-box", "hidden"),
                       "figure": Output("live-graph", "figure"), "feed": Output("live-feed", "children")},
            "inputs": {"pulse": Input("live-pulse", "data"), "sort": Input("live-sort", "value"),
                       "text": Input("live-filter", "value"), "active": Input("live-table", "active_cell"),
                       "close": Input("live-close", "n_clicks"), "search": Input("url", "search")},
            "state": {"seen": State("live-seen", "data"), "chosen": State("live-chosen", "data")}}


def dash_live_callbacks(app, live: DashLive) -> None:
    """The live tab's callbacks: the page asks once a second while the tab is
    shown (and the browser's tab too), and after each change of its controls."""
    from dash import ctx, html
    from dash.exceptions import PreventUpdate
    from dash.dependencies import Input, Output

    # (a browser's tab that is not shown asks nothing)
    app.clientside_callback(
        "function (n) { return document.hidden ? window.dash_clientside.no_update : n; }",
        Output("live-pulse", "data"), Input("live-tick", "n_intervals"), prevent_initial_call=True)

    @app.callback(**dash_live_wiring())
    def live_update(pulse, sort, text, active, close, search, seen, chosen):
        """The live tab, when a second has passed (and something came since
        the page last asked) or a control of it changed."""
        state, _ = dash_state(search)
        trigger = ctx.triggered_id
        if state.view != "live":
            raise PreventUpdate
        if trigger == "live-table" and isinstance(active, dict) and isinstance(active.get("row_id"), str):
            chosen = active["row_id"]
        elif trigger == "live-close":
            chosen = None
        with live.lock:
            if trigger == "live-pulse" and seen == live.taken:
                raise PreventUpdate
            taken, status = live.taken, dash_live_status(live.live, live.status)
            tables = dash_live_tables(live.live, sort if sort in range(len(LIVE_SORTS)) else 0, text or "",
                                      chosen, state.units)
            figure = dash_live_figure(live.live, state, live.status if not live.live.now else "", text or "")
            feed = dash_live_feed(live.live)
        header, cells = dash_table_colors(state.theme)
        marked = [{"if": {"filter_query": '{mark} = "NEW"'}, "fontWeight": "600", "color": DASH_COLORS[3]},
                  {"if": {"filter_query": '{mark} = "gone"'}, "opacity": 0.55}]
        if tables["chosen_row"] is not None:
            marked.append({"if": {"row_index": tables["chosen_row"]},
                           "backgroundColor": DASH_THEMES[state.theme]["grid"]})
        kind_class = lambda kind: "ps-" + re.sub(r"[^a-z]+", "-", kind.lower())
        # (no cell stays active: a click on the same program, once closed, opens it again)
        return {"seen": taken, "chosen": chosen, "status": status, "rows": tables["rows"], "tips": tables["tips"],
                "active": None,
                "marked": marked, "header": header, "cells": cells, "heading": tables["heading"],
                "connections": tables["connections"], "conns_header": header, "conns_cells": cells,
                "conns_hidden": chosen is None, "figure": figure,
                "feed": [html.Div(className=kind_class(kind), children=[
                    html.Span(when, className="ps-when"), html.Span(kind, className="ps-kind"), html.Span(what)])
                    for when, kind, what in feed] or [html.Div("nothing yet")]}


# -- what's new ------------------------------------------------------------------
# The novelty events as `view` lists them (LogQuery.novelty), newest first,
# by kind group and program, both in the address (k, p); a click on an event
# keeps its program and details it: its names and hashes, its totals, what
# is new about it, its mutes (asked of the daemon with the buttons), and a
# link to its history.

DASH_NEW_COLUMNS = [("time", "time"), ("kind", "kind"), ("program", "program"), ("what", "what is new"),
                    ("destination", "destination"), ("country", "country"), ("sent", "sent"),
                    ("received", "received"), ("muted", "muted")]


def dash_new_view() -> list:
    """What's new: kind and program, the message line, the events' table and
    beside it the program chosen (the callbacks of dash_new_callbacks fill them)."""
    from dash import dash_table, dcc, html
    return [
        html.Div(className="ps-filters", children=[
            html.Label("kind"),
            dcc.RadioItems(id="new-kind", options=list(NOVELTY_GROUPS), value="all", inline=True),
            html.Label("program"),
            dcc.Dropdown(id="new-program", options=[], placeholder="any program", style={"minWidth": "320px"})]),
        html.Div(id="new-message", className="ps-message"),
        html.Div(className="ps-main", children=[
            html.Div(className="ps-new-left", children=[
                html.Div(id="new-counts", className="ps-note"),
                dash_table.DataTable(
                    id="new-table", columns=[{"name": name, "id": column} for column, name in DASH_NEW_COLUMNS],
                    data=[], page_size=25, tooltip_delay=300, tooltip_duration=None, style_cell=DASH_CELL,
                    style_table={"overflowX": "auto"}, css=DASH_UNMARKED,
                    # (what is new takes the width the rest leave it, cut short: whole on hover)
                    style_cell_conditional=[{"if": {"column_id": c}, "textAlign": "left"}
                                            for c in ("time", "kind", "program", "destination")] +
                                           [{"if": {"column_id": "what"}, **DASH_NAME_CELL},
                                            {"if": {"column_id": "program"}, "cursor": "pointer", "maxWidth": "220px"},
                                            {"if": {"column_id": "destination"}, "maxWidth": "200px"}])]),
            html.Div(id="new-program-box", className="ps-side ps-detail", hidden=True, children=[
                html.H3(["program: ", html.Code(id="new-program-name")]),
                html.Div(id="new-program-detail"),
                html.Div(className="ps-filters", children=[
                    dcc.RadioItems(id="new-mute-group", options=[k for k in MUTE_KINDS], value="destination",
                                   inline=True),
                    html.Button("mute", id="new-mute", title="ask picosnitch not to tell of these kinds for it"),
                    html.Button("unmute", id="new-unmute", title="ask picosnitch to tell of them again")]),
                html.Div(id="new-mute-said", className="ps-message"),
                dcc.Link("its history →", id="new-history", href="")])])]


def dash_new_rows(found: NoveltyList, mutes: dict, units: str) -> typing.Tuple[list, list]:
    """The events' table: its rows (every name shown()) and their tooltips."""
    unit = UNITS[5] if units == "bits" else UNITS[0]
    rows, tips = [], []
    for event in found.events:
        muted = event["kind"] in muted_kinds(mutes.get(event["exe"], []))
        program, what = shown(event["exe"] or ""), novelty_what(event)
        rows.append({"id": event["id"], "key": encode_value(event["exe"]), "time": novelty_time(event),
                     "kind": event["kind"], "program": program, "what": what,
                     "destination": novelty_destination(event), "country": shown(event["country"] or ""),
                     **({"sent": format_amount(event["send"] or 0, unit), "received": format_amount(event["recv"] or 0, unit)}
                        if event["send"] or event["recv"] else {"sent": "", "received": ""}),   # (none: no connection)
                     "muted": "muted" if muted else ""})
        tips.append({"program": {"value": program, "type": "text"}, "what": {"value": what, "type": "text"},
                     "destination": {"value": rows[-1]["destination"], "type": "text"},
                     "time": {"value": shown(event["text"] or ""), "type": "text"}})
    return rows, tips


def dash_new_program(log: LogQuery, record: dict, exe: str, found: NoveltyList, mutes: dict) -> dict:
    """What the page says of one program: its names and hashes (with
    VirusTotal's verdicts) from record.json, its totals and first and last
    connection over the whole log, what was new about it and its mutes."""
    mine = [Filter("exe", exe)]
    totals = log.totals("exe", mine)
    first, last = log.seen(mine)
    when = lambda t: time.strftime(TIME_FORMAT, time.gmtime(t)) if t is not None else "never"
    hashes = record.get("SHA256", {}).get(exe, {})
    return {"exe": shown(exe), "names": [shown(n) for n in record.get("Executables", {}).get(exe, [])],
            "hashes": [(shown(sha), shown(str(verdict))) for sha, verdict in hashes.items()],
            "sent": totals[0][1] if totals else 0, "received": totals[0][2] if totals else 0,
            "rows": totals[0][3] if totals else 0, "first": when(first), "last": when(last),
            "counts": {kind: found.counts[kind] for kind in NOVELTY_KINDS if found.counts.get(kind)},
            "muted": muted_groups(mutes.get(exe, []))}


def dash_new_program_view(found: dict) -> list:
    """The program's details, from dash_new_program's answer."""
    from dash import html
    amount = lambda n: format_amount(n, UNITS[0])
    new = " · ".join(f"{kind} {n}" for kind, n in found["counts"].items()) or "nothing"
    return [html.P(f"names: {', '.join(found['names']) or '(none recorded)'}"),
            html.P(f"sent {amount(found['sent'])} · received {amount(found['received'])} in {found['rows']:,} "
                   f"{'row' if found['rows'] == 1 else 'rows'} · first seen {found['first']} · last seen {found['last']}"),
            html.P(f"new about it: {new}"),
            html.P(f"muted: {', '.join(found['muted']) or 'nothing'}"),
            html.Table([html.Tr([html.Th("sha256"), html.Th("VirusTotal")])] +
                       [html.Tr([html.Td(shorten(sha, 24), title=sha), html.Td(verdict)])
                        for sha, verdict in found["hashes"]]) if found["hashes"] else html.P("no sha256 recorded")]


def dash_new_wiring() -> dict:
    """What's new's callback, by name: what it fills, what starts it (the
    address, the mute buttons), what it reads."""
    from dash import Input, Output, State
    return {"output": {"kind": Output("new-kind", "value"), "program": Output("new-program", "value"),
                       "offered": Output("new-program", "options"), "counts": Output("new-counts", "children"),
                       "rows": Output("new-table", "data"), "tips": Output("new-table", "tooltip_data"),
                       "active": Output("new-table", "active_cell"), "header": Output("new-table", "style_header"),
                       "cells": Output("new-table", "style_data"), "message": Output("new-message", "children"),
                       "hidden": Output("new-program-box", "hidden"), "name": Output("new-program-name", "children"),
                       "detail": Output("new-program-detail", "children"), "said": Output("new-mute-said", "children"),
                       "history": Output("new-history", "href")},
            "inputs": {"search": Input("url", "search"), "mute": Input("new-mute", "n_clicks"),
                       "unmute": Input("new-unmute", "n_clicks")},
            "state": {"group": State("new-mute-group", "value")}}


def dash_new_choice(state: DashState, trigger, kinds, program, active, rows) -> None:
    """What a control of what's new asks of the state: a kind, a program, or
    (a click on an event) its program."""
    if trigger == "new-kind" and kinds in NOVELTY_GROUPS:
        state.kinds = kinds
    elif trigger == "new-program":
        state.program = decode_value(program) if program else None
    elif trigger == "new-table" and isinstance(active, dict):
        row = next((r for r in rows or [] if r["id"] == active.get("row_id")), None)
        if row is not None:
            state.program = decode_value(row["key"])


def dash_new_callbacks(app, reader: typing.Callable[[], LogReader], directory: str) -> None:
    """What's new's callbacks: a choice goes to the address; the address (or
    a mute button) fills the page."""
    from dash import Input, Output, State, ctx, no_update
    from dash.exceptions import PreventUpdate

    @app.callback(Output("url", "search", allow_duplicate=True), Input("new-kind", "value"),
                  Input("new-program", "value"), Input("new-table", "active_cell"), State("new-table", "data"),
                  State("url", "search"), prevent_initial_call=True)
    def choose(kinds, program, active, rows, search):
        state, _ = dash_state(search)
        if state.view != "new":
            raise PreventUpdate
        try:
            dash_new_choice(state, ctx.triggered_id, kinds, program, active, rows)
        except ValueError:          # (a value from the page that is not one)
            raise PreventUpdate
        if dash_query(state) == (search or ""):
            raise PreventUpdate     # (the controls shown again after a change of the address)
        return dash_query(state)

    @app.callback(**dash_new_wiring())
    def render(search, mute, unmute, group):
        state, problems = dash_state(search)
        if state.view != "new":
            raise PreventUpdate
        exe = text_of(state.program) if state.program is not None else None
        said = ""
        if ctx.triggered_id in ("new-mute", "new-unmute") and exe is not None and group in MUTE_KINDS:
            said = change_mute(exe, group, ctx.triggered_id == "new-mute")
        log = reader()
        log.refresh()
        found = None if log.problem else log.ask(lambda: log.log.novelty(NOVELTY_GROUPS[state.kinds], exe))
        found = found or NoveltyList([], {}, [], "")
        mutes, unread = mutes_or_why(directory)
        notes = [f"not understood in the address, and left out: {', '.join(problems)}"] if problems else []
        notes += [n for n in (log.problem, found.missing, unread) if n]
        rows, tips = dash_new_rows(found, mutes, state.units)
        detail = None
        if exe is not None and not log.problem:
            record, problem = read_record(os.path.join(directory, RECORD_NAME))
            notes += [problem] if problem else []
            detail = log.ask(lambda: dash_new_program(log.log, record, exe, found, mutes))
        header, cells = dash_table_colors(state.theme)
        total = sum(found.counts.values())
        counts = " · ".join(f"{kind} {found.counts[kind]}" for kind in NOVELTY_KINDS if found.counts.get(kind))
        history = dataclasses.replace(DashState(), range="all", units=state.units, theme=state.theme,
                                      filters=[("exe", exe, False)], detail=exe)
        return {"kind": state.kinds, "program": encode_value(exe) if exe is not None else None,
                "offered": [{"label": shorten(shown(p), 90), "value": encode_value(p)} for p in found.programs],
                "counts": f"{total} {'event' if total == 1 else 'events'}" + (f": {counts}" if counts else "") +
                          (f"; the newest {NOVELTY_ROWS} listed" if len(rows) >= NOVELTY_ROWS else ""),
                "rows": rows, "tips": tips, "active": None, "header": header, "cells": cells,
                "message": " · ".join(notes), "hidden": detail is None,
                "name": shown(exe) if exe is not None else "",
                "detail": dash_new_program_view(detail) if detail else [], "said": said,
                "history": dash_query(history) if exe is not None else no_update}


def dash_app(directory: str, config: Config, guard: DashGuard, stream: str = ""):
    """The Dash application for the log in a state directory (see dash_state
    for its view); its live tab follows the event stream at the path stream
    ('': none)."""
    from dash import Input, Output, State, ctx, html, no_update
    from dash.exceptions import PreventUpdate
    app = dash_server(config, guard)
    said: typing.List[str] = []
    labels = Labels(viewer_geoip(directory, config, said))
    record_path, db_path = os.path.join(directory, RECORD_NAME), os.path.join(directory, DB_NAME)
    local = threading.local()       # a reader of the log for each of the server's threads

    def reader() -> LogReader:
        if getattr(local, "reader", None) is None:
            local.reader = LogReader(db_path)
        return local.reader

    app.layout = dash_layout(config)
    live = DashLive(labels, stream, guard.port)
    if stream:
        live.start()

    @app.callback(**dash_page_wiring())
    def update(search, group, range_, units, smooth, refresh, theme, view, start_text, end_text, add_column,
               add_value, add_mode, rows, **_clicked):
        """The page after any change: the address, the controls and what is
        shown (which change it was: ctx.triggered_id)."""
        state, problems = dash_state(search)
        now = now_seconds()
        inputs = {"group": group, "range": range_, "units": units, "smooth": smooth, "refresh": refresh,
                  "theme": theme, "view": view, "start": start_text, "end": end_text, "add_column": add_column,
                  "add_value": add_value, "add_mode": add_mode, "rows": rows}
        try:
            dash_change(state, ctx.triggered_id, ctx.triggered[0]["value"] if ctx.triggered else None, inputs)
        except ValueError as e:         # a value from the page that is not one
            problems.append(str(e))
        return {**render(state, problems, now, add_column), "search": dash_query(state),
                **dash_control_values(state, now)}

    def render(state: DashState, problems: typing.List[str], now: int, add_column: str) -> dict:
        shows = {"theme_class": f"ps-{state.theme} ps-view-{state.view}", "live_still": state.view != "live"}
        if state.view != "history":     # (the history is asked again when it is shown)
            outputs = dash_page_wiring()["output"]
            return {**{name: no_update for name in outputs}, **shows, "interval": 60_000, "still": True}
        chips = [html.Span(className="ps-chip", children=[
            html.Span(f"{COLUMN_NAMES[column]} {'≠' if exclude else '='} {labels.text(column, value)}",
                      title=labels.text(column, value)),
            html.Button("×", id={"type": "unfilter", "index": i}, title="remove this filter")])
            for i, (column, value, exclude) in enumerate(state.filters)] or [html.Span("none")]
        notes = [f"not understood in the address, and left out: {', '.join(problems)}"] if problems else []
        notes += said
        log = reader()
        log.refresh()
        data = None if log.problem else log.ask(lambda: cached_data(log.log, state, now))
        if log.problem:
            notes.insert(0, log.problem)
        elif log.log is not None and log.log.moving() is not None:
            notes.append(moving_note(log.log.moving()))
        data = data or dash_nothing(state, now)
        columns, rows, tips = dash_table_rows(data, state, labels)
        count = len(data["entries"])
        note = f"{count} {'entry' if count == 1 else 'entries'}" + \
            (f", the largest {DASH_TABLE_ROWS} shown" if count > DASH_TABLE_ROWS else "")
        detail = []
        if state.detail is not None and not log.problem:
            record, problem = read_record(record_path)
            notes += [problem] if problem else []
            found = log.ask(lambda: dash_detail(log.log, record, state.detail, state, now, labels))
            detail = dash_detail_view(found) if found else []
        header, cells = dash_table_colors(state.theme)
        offered = options(add_column, state, now, data["entries"] if add_column == state.group else None)
        empty = "no data: see the message above" if log.problem else "no connections in this range"
        return {"chips": chips, "figure": dash_figure(data, state, labels, empty), "columns": columns, "rows": rows,
                "tips": tips, "active": None, "header": header, "cells": cells, "note": note, "detail": detail,
                "message": " · ".join(notes), "interval": max(state.refresh, 1) * 1000, "still": not state.refresh,
                "offered": offered, **shows}

    # (what the chart reports of itself when drawn goes no further than the page)
    app.clientside_callback(
        """function (r) { return r && (r['xaxis.range'] || r['xaxis.range[0]'] !== undefined)
                          ? r : window.dash_clientside.no_update; }""",
        Output("zoom", "data"), Input("graph", "relayoutData"), prevent_initial_call=True)

    @app.callback(Output("url", "search", allow_duplicate=True), Input("zoom", "data"),
                  State("url", "search"), prevent_initial_call=True)
    def zoom(relayout, search):
        """A zoom of the chart becomes the time range (which the address
        carries to update); what else the chart reports changes nothing."""
        zoomed = dash_zoom(relayout)
        if zoomed is None:
            raise PreventUpdate
        state, _ = dash_state(search)
        state.range, (state.start, state.end), state.offset = "custom", zoomed, 0
        return dash_query(state)

    recent: "collections.OrderedDict[tuple, dict]" = collections.OrderedDict()
    recent_lock = threading.Lock()

    def cached_data(log: LogQuery, state: DashState, now: int) -> dict:
        """dash_data, kept for the rest of the write window: what only changes
        how it is shown (units, theme, smoothing, the drill-down) asks nothing
        again. An automatic refresh always asks again."""
        shown = dataclasses.replace(state, units="bytes", smooth=False, detail=None, refresh=0, theme="light")
        key = (dash_query(shown), now // DASH_REUSE)
        with recent_lock:
            found = recent.get(key) if ctx.triggered_id != "tick" else None
        if found is None:
            found = dash_data(log, state, now)
            with recent_lock:
                recent[key] = found
                while len(recent) > 8:
                    recent.popitem(last=False)
        return found

    def options(column: str, state: DashState, now: int, entries: typing.Optional[list] = None,
                typed: str = "", chosen: typing.Optional[str] = None) -> list:
        """The values the new filter's column has in the range, under the
        current filters (the entries shown, when it is the grouping's
        column): the largest, or the largest whose label has the text typed,
        with the one chosen kept."""
        if column not in QUERY_COLUMNS:
            return []
        if entries is None:
            log = reader()
            log.refresh()
            start, end = dash_span(state, now)
            filters = [Filter(c, v, x) for c, v, x in state.filters]
            entries = (None if log.problem else log.ask(lambda: log.log.totals(column, filters, start, end))) or []
        return dash_options(column, entries, labels, typed, chosen)

    @app.callback(Output("add-value", "options", allow_duplicate=True), Input("add-column", "value"),
                  Input("add-value", "search_value"), State("add-value", "value"), State("url", "search"),
                  prevent_initial_call=True)
    def values(column, typed, chosen, search):
        if ctx.triggered_id == "add-value" and not typed:
            raise PreventUpdate         # (a choice clears what was typed: the options stay)
        return options(column, dash_state(search)[0], now_seconds(), typed=typed or "", chosen=chosen)

    @app.callback(Output("download", "data"), Input("export", "n_clicks"), State("table", "derived_virtual_data"),
                  State("table", "columns"), State("url", "search"), prevent_initial_call=True)
    def export(_, rows, columns, search):
        """The table as CSV, in the order shown, with the values exact."""
        group, kept = dash_state(search)[0].group, [c for c in columns or [] if c["id"] != "details"]
        cell = lambda row, column: (labels.text(group, decode_value(row["key"]), exact=True) if column == "entry"
                                    else row[column])
        return {"content": dash_csv([c["name"] for c in kept], [[cell(r, c["id"]) for c in kept] for r in rows or []]),
                "filename": "picosnitch.csv"}

    dash_live_callbacks(app, live)
    dash_new_callbacks(app, reader, directory)
    return app


def run_dash(state: str, config_dir: str, host: str, port: int) -> int:
    """Serve the web UI for the log in the state directory, with the user's
    settings, until Ctrl-C. It asks for its token on loopback too: other
    local accounts reach loopback."""
    import logging
    try:
        from werkzeug.serving import make_server
        config = load_config(config_dir, create=False)      # (the viewers write nothing)
        token = secrets.token_urlsafe(32)
        app = dash_app(state, config, DashGuard(host, port, token), EVENTS_SOCKET)
    except ImportError as e:
        raise PicosnitchError(f"picosnitch dash needs Dash and Plotly ({e}): install them with "
                              f"pip install 'picosnitch[dash]', or run .ci/install-deps")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)      # no line per request
    try:
        server = make_server(host, port, app.server, threaded=True)
    except OSError as e:
        raise PicosnitchError(f"cannot serve on {host}:{port}: {e.strerror or e}")
    named = f"[{host}]" if ":" in host else host
    address = f"http://{named}:{port}/"         # (the address bound: localhost may name another)
    print(f"picosnitch dash: serving {os.path.join(state, DB_NAME)} on {address}?token={token} "
          "(open that address: it sets a cookie; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

###############################################################################
# 25. command line
###############################################################################

USAGE = """usage: picosnitch <command>

commands:
  start            start the daemon (needs root)
  stop             stop the daemon (needs root)
  restart          restart the daemon (needs root)
  status           show whether the daemon runs and how it captures
  start-no-daemon  run in the foreground; SIGINT or SIGTERM stop it cleanly (needs root)
  systemd          write a systemd service unit for picosnitch (needs root)
  view             browse the connection log in the terminal
  top              what uses the network now, live, in the terminal
  events           print the daemon's live event stream (JSON lines) until it ends
  dash             serve the web UI on http://localhost:5100 (HOST and PORT change the address)
  mute [--undo] EXE [KIND ...]
                   do not show what is new about the program EXE (its path) as notifications, for
                   KIND: destination, volume, hash, name or all (the default); --undo shows it again.
                   It is still logged in exe.log, and each change is logged and shown, with who asked
  ebpf [MODE]      print the BPF program as it would be compiled on this kernel, for the capture
                   mode picosnitch would choose, or MODE (tracepoint, raw-tracepoint or kprobe)
  version          show the version
  help             show this help

files: ~/.config/picosnitch/config.json (settings), and links there to what picosnitch records in
       /var/lib/picosnitch/ (record.json, snitch.db, exe.log, error.log, conn.log)
"""


def require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise PicosnitchError(f"'{command}' needs root: run it as 'sudo picosnitch {command}'")


def prepared(environ: typing.Mapping[str, str] = os.environ) -> Setup:
    """prepare() for the user picosnitch works for, its warnings said here too."""
    setup = prepare(user_identity(environ), environ)
    for warning in setup.warnings:
        print(f"picosnitch: warning: {shown(warning)}", file=sys.stderr, flush=True)
    return setup


def refuse_if_running() -> None:
    """PicosnitchError if picosnitch runs: a start would go no further than
    preparing (and what it warned of would be said only here)."""
    running = read_pid()
    if running:
        raise PicosnitchError(f"already running (pid {running})")


def cmd_start(_: str) -> int:
    refuse_if_running()
    return run_daemon(prepared())


def cmd_stop(_: str) -> int:
    if not stop_daemon():
        print("picosnitch is not running", file=sys.stderr)
        return 1
    print("picosnitch stopped")
    return 0


def cmd_restart(command: str) -> int:
    setup = prepared()          # (what cannot start does not stop what runs)
    stop_daemon()
    return run_daemon(setup)


def cmd_start_no_daemon(_: str) -> int:
    refuse_if_running()
    return run_foreground(prepare(user_identity()))


def cmd_status(_: str) -> int:
    pid = read_pid()
    if pid is None:
        print("picosnitch is not running")
        return 3
    try:
        with open(STATUSFILE) as f:
            status = json.load(f)
        print(f"picosnitch is running (pid {pid}) since {status['started']}\n"
              f"capture mode: {status['description']}\n"
              f"room for {status.get('conns', '?')} connections a window in the kernel's maps "
              f"(\"Connections per window\"; beyond it, a program's connections are merged)\n"
              f"state: {status.get('state', '?')}")
        if status.get("warnings"):
            print(f"warnings at the start: {status['warnings']} (in error.log, and shown as notifications)")
    except (OSError, ValueError, KeyError):
        print(f"picosnitch is running (pid {pid}), not capturing yet")
    return 0


def cmd_systemd(_: str) -> int:
    # The unit may write only the state directory and the user's directory,
    # and cannot make picosnitch's account: all made here (a config.json
    # that cannot be used is refused now, too).
    prepared()
    # -I: root's python reads no PYTHON* variables and no user site directory
    unit = systemd_unit(f"{sys.executable} -I {os.path.realpath(sys.argv[0])}")
    os.makedirs(os.path.dirname(SYSTEMD_UNIT), exist_ok=True)
    with open(SYSTEMD_UNIT, "w") as f:
        f.write(unit)
    print(f"wrote {SYSTEMD_UNIT}\nenable and start it with: systemctl daemon-reload && systemctl enable --now picosnitch")
    return 0


def cmd_view(_: str) -> int:
    user, state = user_identity(), state_directory()
    if os.geteuid() == 0:           # under sudo: the files are read as the user
        confine(None, user)
    return run_viewer(state, user.directory)


def cmd_top(_: str) -> int:
    user, state = user_identity(), state_directory()
    if os.geteuid() == 0:           # under sudo: the files are read as the user
        confine(None, user)
    return run_top(state, user.directory)


def cmd_events(_: str) -> int:
    return run_events(sys.stdout.buffer)


def cmd_mute(_: str, *args: str) -> int:
    """`picosnitch mute [--undo] EXE [KIND ...]`: what the daemon says mutes the program now."""
    undo = args[:1] == ("--undo",)
    args = args[1:] if undo else args
    if not args:
        raise PicosnitchError("mute: name the program (its executable's path): "
                              "picosnitch mute [--undo] EXE [KIND ...]")
    exe, kinds = args[0], list(args[1:]) or ["all"]
    now = request_mute(exe, kinds, not undo)
    print(f"{shown(exe)}: muted for {', '.join(now)}" if now else f"{shown(exe)}: nothing muted")
    return 0


def cmd_dash(_: str) -> int:
    user, state = user_identity(), state_directory()
    host, port = dash_address()
    if os.geteuid() == 0:           # under sudo: the files are read as the user
        confine(None, user)
    for key in [k for k in os.environ if k.startswith("DASH_")]:
        del os.environ[key]         # Dash reads settings (debug, extra endpoints) from these
    return run_dash(state, user.directory, host, port)


def cmd_ebpf(_: str, mode: str = "") -> int:
    chosen = mode or capture_mode(BTF.from_file())
    if chosen not in CAPTURE_MODES:
        raise PicosnitchError(f"unknown capture mode: {shown(chosen)} (one of: {', '.join(CAPTURE_MODES)})")
    print(f"picosnitch: the BPF program of capture mode {chosen}: {CAPTURE_MODES[chosen].description}",
          file=sys.stderr)
    sys.stdout.write(bpf_text(BTF.from_file(), chosen))
    return 0


def cmd_version(_: str) -> int:
    print(f"picosnitch {VERSION} (python {sys.version.split()[0]}, kernel {os.uname().release})")
    return 0


def cmd_help(_: str) -> int:
    print(USAGE, end="")
    return 0


# command -> (handler, needs root)
COMMANDS = {
    "start": (cmd_start, True), "stop": (cmd_stop, True), "restart": (cmd_restart, True),
    "status": (cmd_status, False), "start-no-daemon": (cmd_start_no_daemon, True),
    "systemd": (cmd_systemd, True), "view": (cmd_view, False), "top": (cmd_top, False),
    "events": (cmd_events, False), "dash": (cmd_dash, False), "mute": (cmd_mute, False),
    "ebpf": (cmd_ebpf, False), "version": (cmd_version, False), "help": (cmd_help, False),
    "--help": (cmd_help, False), "-h": (cmd_help, False),
}
TAKES_ARGUMENTS = {"ebpf": 1, "mute": math.inf}       # command -> how many arguments at most (others: none)


def main(argv: typing.Optional[typing.List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS or len(argv) > 1 + TAKES_ARGUMENTS.get(argv[0], 0):
        print(USAGE, end="", file=sys.stderr)
        if argv:
            print(f"\npicosnitch: unknown command: {shown(' '.join(argv))}", file=sys.stderr)
        return 2
    handler, needs_root = COMMANDS[argv[0]]
    try:
        if needs_root:
            require_root(argv[0])
        return handler(*argv)
    except PicosnitchError as e:
        print(f"picosnitch: {e}", file=sys.stderr)
        return 1


# Run as a script, Python keeps the script's parse tree (about 18 MB for this
# one) until the script ends, in every process forked from it. So a command
# whose processes live on starts over (the same process, exec of the same
# interpreter binary) as `python3 [its options] -P -c MODULE_BOOT PATH
# COMMAND`: compile() frees the tree once done. -P (Python 3.11) keeps the
# working directory out of sys.path. Only a source file is run again by its
# path (not a script read from a pipe, a directory or bytecode), and not
# after a `--` among the options, which would make -P the script.
LONG_RUNNING = ("start", "restart", "start-no-daemon", "dash")
MODULE_BOOT = "import sys; exec(compile(__import__('pathlib').Path(sys.argv[1]).read_bytes(), sys.argv[1], 'exec'))"


def run_as_module() -> None:
    orig, script = getattr(sys, "orig_argv", []), os.path.abspath(sys.argv[0])
    options = orig[1:len(orig) - len(sys.argv)]
    if (sys.version_info >= (3, 11) and orig[len(orig) - len(sys.argv):] == sys.argv and "--" not in options
            and type(globals().get("__loader__")).__name__ == "SourceFileLoader" and os.path.isfile(script)):
        running = os.path.realpath("/proc/self/exe")       # (sys.executable may be found on PATH)
        binary = sys.executable if os.path.realpath(sys.executable or "/") == running else running
        os.execv(binary, [orig[0], *options, "-P", "-c", MODULE_BOOT, script, *sys.argv[1:]])


if __name__ == "__main__":
    if sys.argv[0] == "-c" and MODULE_BOOT in getattr(sys, "orig_argv", ()):   # started over by run_as_module
        del sys.argv[0]
    elif sys.argv[1:] and sys.argv[1:] == sys.argv[1:2] and sys.argv[1] in LONG_RUNNING:
        run_as_module()
    sys.exit(main())
