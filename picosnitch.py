#!/usr/bin/env python3
# picosnitch: see which programs use the network, and be told when something new does.
# Copyright (C) 2020-2026 picosnitch contributors
# SPDX-License-Identifier: GPL-3.0-or-later
"""picosnitch: per-program network monitor for Linux, built on BPF.

It notifies the desktop user when a program connects for the first time or
when a known program's executable changes (new sha256), and logs every
connection with the bytes sent and received, the executable and its hash,
its parent and its hash, the user, ports, addresses and domain.

Processes (all started by the supervisor, which restarts one that dies)::

    kernel (BPF: sock send/recv tracepoints, sched exec/fork/exit, syscalls,
      |     getaddrinfo uprobe; bytes are summed per connection in maps)
      v
    reader --exec notices--> monitor (FD cache by device+inode, sha256,
      |                        ^      fanotify re-hash on modification)
      | window batches         | hash requests / results
      v                        v
    primary -> snitch.db, record.json, exe.log, error.log
      |
      v
    notifier -> org.freedesktop.Notifications on the user's session bus

Table of contents (each numbered section uses only the ones above it):
     1. header (this docstring)
     2. imports
     3. constants and paths
     4. small utilities
     5. types shared by the kernel program and the processes
     6. configuration
     7. storage (all SQL lives here)
     8. BTF reader and the BPF program text
     9. BPF reader process
    10. hashing, FD cache and fanotify
    11. monitor process
    12. notifications
    13. primary process
    14. supervisor, daemon and systemd unit
    15. command line

Usage: picosnitch start|stop|restart|status|start-no-daemon|systemd|version|help
"""

###############################################################################
# 2. imports
###############################################################################
# Heavy or optional dependencies (bcc, dbus, psutil) are imported inside the
# section that needs them, so that importing this module has no side effects.

import collections
import ctypes
import ctypes.util
import dataclasses
import datetime
import errno
import hashlib
import ipaddress
import json
import multiprocessing
import multiprocessing.connection
import os
import pwd
import select
import shutil
import signal
import socket
import sqlite3
import string
import struct
import sys
import tempfile
import time
import typing

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
ERROR_LOG_NAME = "error.log"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

# socket families and protocols, for decoding what the kernel reports
AF_INET, AF_INET6, AF_PACKET = 2, 10, 17
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp",
               255: "raw", 262: "mptcp"}

# how long a stop may take before the supervisor gives up waiting
STOP_TIMEOUT = 30.0


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


def format_addr(family: int, raw: bytes) -> str:
    """Text form of an address from a 16-byte kernel field ('' when none)."""
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == AF_INET6:
        addr = ipaddress.IPv6Address(raw[:16])
        return str(addr.ipv4_mapped or addr)
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


def user_identity(environ: typing.Mapping[str, str] = os.environ) -> typing.Tuple[int, int, str]:
    """(uid, gid, home) of the user picosnitch works for: SUDO_USER under sudo."""
    name = environ.get("SUDO_USER")
    if name:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid, entry.pw_dir
    uid = os.getuid()
    try:
        entry = pwd.getpwuid(uid)
        return uid, entry.pw_gid, environ.get("HOME") or entry.pw_dir
    except KeyError:
        return uid, os.getgid(), environ.get("HOME", "/root")


def config_dir(environ: typing.Mapping[str, str] = os.environ) -> str:
    return os.path.join(user_identity(environ)[2], ".config", "picosnitch")


def make_private(path: str, owner: typing.Tuple[int, int], mode: int = 0o600) -> None:
    """Give a file or directory to the user and make it readable by them only."""
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, *owner)


def write_atomic(path: str, data: bytes, owner: typing.Tuple[int, int]) -> None:
    """Replace a file with new content: temp file, fsync, rename."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        make_private(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_line(path: str, line: str, owner: typing.Tuple[int, int]) -> None:
    """Append one line to a log file, created private to the user, and fsync."""
    created = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.rstrip("\n").encode("utf-8", "replace") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        make_private(path, owner)


def read_proc_text(pid: int, name: str) -> str:
    """A /proc/PID file as text ('' when the process is gone)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def cmdline_text(raw: bytes) -> str:
    """argv as one line: NUL separators become spaces."""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


###############################################################################
# 5. types shared by the kernel program and the processes
###############################################################################
# The ctypes structures below are the single definition of what the BPF
# program and user space exchange: c_struct() renders them as C for the
# program text, and the reader decodes events with them.

PATH_DEPTH = 32      # directory levels of an executable's path sent at exec
NAME_LEN = 64        # bytes of each path component (longer ones: path unknown)
ARGS_LEN = 256       # bytes of argv sent at exec
DNS_ADDRS = 8        # addresses per getaddrinfo answer


class ProcT(ctypes.Structure):
    """A process image: who it is, what it runs, and its parent."""
    _fields_ = [("pid", ctypes.c_uint32), ("ppid", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("dev", ctypes.c_uint32),
                ("pdev", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("ino", ctypes.c_uint64), ("pino", ctypes.c_uint64),
                ("comm", ctypes.c_char * 16)]


class ConnKeyT(ctypes.Structure):
    """One connection, the key under which the kernel sums its bytes."""
    _fields_ = [("pid", ctypes.c_uint32), ("uid", ctypes.c_uint32),
                ("dev", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("ino", ctypes.c_uint64),
                ("family", ctypes.c_uint16), ("proto", ctypes.c_uint16),
                ("lport", ctypes.c_uint16), ("rport", ctypes.c_uint16),
                ("laddr", ctypes.c_uint8 * 16), ("raddr", ctypes.c_uint8 * 16)]


class ConnValT(ctypes.Structure):
    _fields_ = [("send", ctypes.c_uint64), ("recv", ctypes.c_uint64)]


class EventHdrT(ctypes.Structure):
    """Starts every event; kind selects the payload that follows."""
    _fields_ = [("kind", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("proc", ProcT)]


class ExecT(ctypes.Structure):
    """argv (args_len bytes) and the executable's path, leaf first (depth
    slots, empty ones where the walk crossed a mount; complete when it
    reached the root)."""
    _fields_ = [("depth", ctypes.c_uint16), ("complete", ctypes.c_uint16),
                ("args_len", ctypes.c_uint32), ("args", ctypes.c_char * ARGS_LEN),
                ("path", (ctypes.c_char * NAME_LEN) * PATH_DEPTH)]


class DnsT(ctypes.Structure):
    """A getaddrinfo answer: the name asked and up to DNS_ADDRS addresses."""
    _fields_ = [("count", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("families", ctypes.c_uint16 * DNS_ADDRS),
                ("addrs", (ctypes.c_uint8 * 16) * DNS_ADDRS),
                ("host", ctypes.c_char * 128)]


class EmptyT(ctypes.Structure):
    _fields_: typing.List[typing.Any] = []


# event kinds: (number, payload type); the C program gets EV_<NAME> defines
EVENT_KINDS = {"EXEC": (1, ExecT), "FORK": (2, EmptyT), "EXIT": (3, EmptyT),
               "CONN": (4, ConnKeyT), "DNS": (5, DnsT)}

# counters the kernel keeps in the stats array (index: meaning)
STATS = {"MAP_FULL": "connection map full: traffic not attributed",
         "BYTES_UNCOUNTED": "bytes not counted because a map was full",
         "CALLS_FULL": "syscall table full: peer addresses missed"}

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


STRUCT_NAMES = {ProcT: "proc_t", ConnKeyT: "conn_key_t", ConnValT: "conn_val_t",
                EventHdrT: "event_hdr_t", ExecT: "exec_t", DnsT: "dns_t"}


@dataclasses.dataclass
class ProcInfo:
    """What user space knows of a process image (exe is '' when unknown)."""
    pid: int
    exe: str
    name: str
    cmdline: str
    dev: int          # st_dev of the executable, as stat() reports it
    ino: int


@dataclasses.dataclass
class Conn:
    """One connection's traffic in one write window, as the reader sends it."""
    proc: ProcInfo
    parent: ProcInfo
    uid: int
    proto: str
    lport: int
    rport: int
    laddr: str
    raddr: str
    domain: str
    send: int
    recv: int


###############################################################################
# 6. configuration
###############################################################################

@dataclasses.dataclass
class Config:
    """config.json as typed attributes; KEYS maps each JSON key to one."""
    db_retention_days: int = 30
    db_sql_log: bool = True
    db_sql_server: dict = dataclasses.field(default_factory=dict)
    db_text_log: bool = False
    db_write_limit_seconds: float = 10
    dash_scroll_zoom: bool = True
    dash_theme: str = ""
    desktop_notifications: bool = True
    every_exe: bool = False
    geoip_lookup: bool = True
    log_addresses: bool = True
    log_commands: bool = True
    log_ignore: list = dataclasses.field(default_factory=list)
    log_ports: bool = True
    perf_ring_buffer_pages: int = 256
    set_rlimit_nofile: typing.Optional[int] = None
    set_st_dev_mask: typing.Optional[int] = None
    vt_api_key: str = ""
    vt_file_upload: bool = False
    vt_request_limit_seconds: float = 15


# JSON key -> (attribute, accepted types, description of what is expected)
CONFIG_KEYS = {
    "DB retention (days)": ("db_retention_days", (int,), "a whole number of days >= 0"),
    "DB sql log": ("db_sql_log", (bool,), "true or false"),
    "DB sql server": ("db_sql_server", (dict,), "an object of connection settings"),
    "DB text log": ("db_text_log", (bool,), "true or false"),
    "DB write limit (seconds)": ("db_write_limit_seconds", (int, float), "a number of seconds > 0"),
    "Dash scroll zoom": ("dash_scroll_zoom", (bool,), "true or false"),
    "Dash theme": ("dash_theme", (str,), "a bootswatch theme name or \"\""),
    "Desktop notifications": ("desktop_notifications", (bool,), "true or false"),
    "Every exe (not just conns)": ("every_exe", (bool,), "true or false"),
    "GeoIP lookup": ("geoip_lookup", (bool,), "true or false"),
    "Log addresses": ("log_addresses", (bool,), "true or false"),
    "Log commands": ("log_commands", (bool,), "true or false"),
    "Log ignore": ("log_ignore", (list,), "a list of ports, hashes, domains or subnets"),
    "Log ports": ("log_ports", (bool,), "true or false"),
    "Perf ring buffer (pages)": ("perf_ring_buffer_pages", (int,), "a power of two"),
    "Set RLIMIT_NOFILE": ("set_rlimit_nofile", (int, type(None)), "a whole number or null"),
    "Set st_dev mask": ("set_st_dev_mask", (int, type(None)), "a whole number >= 0 or null"),
    "VT API key": ("vt_api_key", (str,), "a string"),
    "VT file upload": ("vt_file_upload", (bool,), "true or false"),
    "VT request limit (seconds)": ("vt_request_limit_seconds", (int, float), "a number of seconds >= 0"),
}

# checks beyond the type: attribute -> predicate on the value
CONFIG_RANGES = {
    "db_retention_days": lambda v: v >= 0,
    "db_write_limit_seconds": lambda v: v > 0,
    "perf_ring_buffer_pages": is_power_of_two,
    "set_rlimit_nofile": lambda v: v is None or v > 0,
    "set_st_dev_mask": lambda v: v is None or v >= 0,
    "vt_request_limit_seconds": lambda v: v >= 0,
}


def config_to_json(config: Config) -> str:
    values = {key: getattr(config, attr) for key, (attr, _, _) in CONFIG_KEYS.items()}
    return json.dumps(values, indent=2) + "\n"


def parse_config(text: str, source: str = CONFIG_NAME) -> Config:
    """Validate config.json text; PicosnitchError names the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PicosnitchError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(data, dict):
        raise PicosnitchError(f"{source}: expected a JSON object of settings, found {type(data).__name__}")
    config = Config()
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise PicosnitchError(f"{source}: unknown key {key!r} (known keys: {', '.join(CONFIG_KEYS)})")
        attr, types, expected = CONFIG_KEYS[key]
        # bool is an int in Python: accept it only where a bool is expected
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok or not CONFIG_RANGES.get(attr, lambda v: True)(value):
            raise PicosnitchError(f"{source}: {key!r} must be {expected}, found {json.dumps(value)}")
        setattr(config, attr, value)
    for item in config.log_ignore:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise PicosnitchError(f"{source}: 'Log ignore' entries must be ports (int) or strings, found {json.dumps(item)}")
    return config


def load_config(directory: str, owner: typing.Tuple[int, int]) -> Config:
    """Read config.json, creating it with the defaults when missing.

    An existing file is never rewritten: a bad one is refused as it is.
    """
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        make_private(directory, owner, 0o700)
        write_atomic(path, config_to_json(Config()).encode(), owner)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicosnitchError(f"{path}: not UTF-8 text (byte {e.start})")
    return parse_config(text, path)


###############################################################################
# 7. storage (all SQL lives here)
###############################################################################

DB_COLUMNS = ["contime", "send", "recv", "exe", "name", "cmdline", "sha256",
              "pexe", "pname", "pcmdline", "psha256", "uid", "lport", "rport",
              "laddr", "raddr", "domain", "proto"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (
    contime TEXT NOT NULL, send INTEGER NOT NULL, recv INTEGER NOT NULL,
    exe TEXT, name TEXT, cmdline TEXT, sha256 TEXT,
    pexe TEXT, pname TEXT, pcmdline TEXT, psha256 TEXT,
    uid INTEGER, lport INTEGER, rport INTEGER, laddr TEXT, raddr TEXT,
    domain TEXT, proto TEXT);
CREATE INDEX IF NOT EXISTS connections_contime ON connections (contime);
CREATE INDEX IF NOT EXISTS connections_exe ON connections (exe, contime);
CREATE INDEX IF NOT EXISTS connections_sha256 ON connections (sha256, contime);
"""


def db_open(path: str, owner: typing.Tuple[int, int]) -> sqlite3.Connection:
    """Open (creating) snitch.db with its schema."""
    created = not os.path.exists(path)
    con = sqlite3.connect(path, timeout=30)
    con.executescript(SCHEMA)
    con.commit()
    if created:
        make_private(path, owner)
    return con


def db_insert(con: sqlite3.Connection, rows: typing.Sequence[tuple]) -> None:
    """Insert rows in DB_COLUMNS order, in one transaction."""
    marks = ",".join("?" * len(DB_COLUMNS))
    with con:
        con.executemany(f"INSERT INTO connections ({','.join(DB_COLUMNS)}) VALUES ({marks})", rows)


def db_prune(con: sqlite3.Connection, days: int) -> int:
    """Delete rows older than the retention; returns how many."""
    cutoff = (datetime.datetime.now() - datetime.timedelta(days=days)).strftime(TIME_FORMAT)
    with con:
        return con.execute("DELETE FROM connections WHERE contime < ?", (cutoff,)).rowcount


def db_rows(path: str) -> typing.List[dict]:
    """Every row of a snitch.db as dicts (for tests and scripts)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM connections ORDER BY rowid")]
    finally:
        con.close()


RECORD_SECTIONS = ("Executables", "Names", "Parent Executables", "Parent Names", "SHA256")


def load_record(path: str) -> dict:
    """record.json, or an empty record. A damaged file is kept aside, not lost."""
    empty = {section: {} for section in RECORD_SECTIONS}
    if not os.path.exists(path):
        return empty
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        aside = f"{path}.damaged-{int(time.time())}"
        os.rename(path, aside)
        raise PicosnitchError(f"{path} could not be read ({e}); it was moved to {aside} and a new record started")
    for section in RECORD_SECTIONS:
        data.setdefault(section, {})
    return data


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

    def has_raw_tracepoint(self, name: str) -> bool:
        """Raw tracepoints show up in BTF as the typedef btf_trace_<name>."""
        want = f"btf_trace_{name}"
        return any(t[0] == 8 and t[1] and self.name(t[1]) == want for t in self.types)


class Field(typing.NamedTuple):
    offset: int
    size: int
    shift: int
    bits: int


# macro name -> kernel field; each becomes OFF_<NAME> and a reader F_<NAME>(p)
KERNEL_FIELDS = {
    "TASK_PID": "task_struct.pid",
    "TASK_TGID": "task_struct.tgid",
    "TASK_REAL_PARENT": "task_struct.real_parent",
    "TASK_MM": "task_struct.mm",
    "TASK_COMM": "task_struct.comm",
    "MM_EXE_FILE": "mm_struct.exe_file",
    "MM_ARG_START": "mm_struct.arg_start",
    "MM_ARG_END": "mm_struct.arg_end",
    "FILE_INODE": "file.f_inode",
    "FILE_MNT": "file.f_path.mnt",
    "FILE_DENTRY": "file.f_path.dentry",
    "INODE_INO": "inode.i_ino",
    "INODE_SB": "inode.i_sb",
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
    "SK_V6_DADDR": "sock_common.skc_v6_daddr",
    "SK_V6_RCV_SADDR": "sock_common.skc_v6_rcv_saddr",
    "SOCK_PROTOCOL": "sock.sk_protocol",
    "SOCKET_SK": "socket.sk",
}


def offset_defines(btf: BTF) -> str:
    """#defines for every KERNEL_FIELDS entry: OFF_X and a typed reader F_X(p)."""
    lines = []
    for macro, path in KERNEL_FIELDS.items():
        f = btf.field(path)
        lines.append(f"#define OFF_{macro} {f.offset}")
        if f.bits:
            lines.append(f"#define F_{macro}(p) ((read_u32((p), {f.offset}) >> {f.shift}) & {(1 << f.bits) - 1})")
        elif f.size in (1, 2, 4, 8):
            lines.append(f"#define F_{macro}(p) read_u{8 * f.size}((p), {f.offset})")
    return "\n".join(lines)


# The BPF program. $NAMES are filled by bpf_text(), in one place.
BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>

#define PS_AF_UNIX 1
#define PS_AF_INET 2
#define PS_AF_INET6 10
#define PS_AF_NETLINK 16
#define PS_MSG_PEEK 2
#define PS_TCP 6
#define DIR_SEND 0
#define DIR_RECV 1
#define PATH_DEPTH $PATH_DEPTH
#define NAME_LEN $NAME_LEN
#define ARGS_LEN $ARGS_LEN
#define DNS_ADDRS $DNS_ADDRS
#define MMSG_MAX 8
#define MMSGHDR_SIZE 64
#define MMSG_LEN_OFF 56
$EVENT_KINDS
$STAT_INDEXES
$CALL_KINDS

static __always_inline u64 read_u64(void *p, long off) { u64 v = 0; bpf_probe_read_kernel(&v, 8, p + off); return v; }
static __always_inline u32 read_u32(void *p, long off) { u32 v = 0; bpf_probe_read_kernel(&v, 4, p + off); return v; }
static __always_inline u16 read_u16(void *p, long off) { u16 v = 0; bpf_probe_read_kernel(&v, 2, p + off); return v; }
static __always_inline u8 read_u8(void *p, long off) { u8 v = 0; bpf_probe_read_kernel(&v, 1, p + off); return v; }
#define read_ptr(p, field) ((void *)F_##field(p))
$OFFSETS

$STRUCTS
struct conn_event_t { struct event_hdr_t hdr; struct conn_key_t key; };
struct exec_event_t { struct event_hdr_t hdr; struct exec_t exec; };
struct dns_event_t { struct event_hdr_t hdr; struct dns_t dns; };

/* a send or receive system call in progress on a thread */
struct call_t {
    u32 kind;
    u32 index;           /* sendmmsg: message being sent */
    u64 uptr;            /* user sockaddr, msghdr or mmsghdr vector */
    u64 bytes;           /* receive bytes waiting for the peer address */
    struct conn_key_t key;
};
struct gai_t { u64 host; u64 res; };

BPF_PERF_OUTPUT(events);
BPF_ARRAY(epoch, u32, 1);
BPF_HASH(conns0, struct conn_key_t, struct conn_val_t, $MAX_CONNS);
BPF_HASH(conns1, struct conn_key_t, struct conn_val_t, $MAX_CONNS);
BPF_HASH(calls, u64, struct call_t, $MAX_CALLS);
BPF_HASH(gai, u64, struct gai_t, 1024);
BPF_ARRAY(stats, u64, $N_STATS);
BPF_PERCPU_ARRAY(scratch, struct exec_event_t, 1);

static __always_inline void stat_add(u32 index, u64 n) {
    u64 *v = stats.lookup(&index);
    if (v) __sync_fetch_and_add(v, n);
}

static __always_inline u16 swap16(u16 v) { return (v >> 8) | (v << 8); }

/* device and inode of a task's executable (0 for kernel threads) */
static __always_inline void exe_id(void *task, u32 *dev, u64 *ino) {
    void *mm = read_ptr(task, TASK_MM);
    if (!mm) return;
    void *file = read_ptr(mm, MM_EXE_FILE);
    if (!file) return;
    void *inode = read_ptr(file, FILE_INODE);
    *ino = F_INODE_INO(inode);
    *dev = F_SB_DEV(read_ptr(inode, INODE_SB));
}

static __always_inline void fill_proc(void *task, struct proc_t *p) {
    void *parent = read_ptr(task, TASK_REAL_PARENT);
    p->pid = F_TASK_TGID(task);
    p->ppid = F_TASK_TGID(parent);
    p->uid = bpf_get_current_uid_gid();
    exe_id(task, &p->dev, &p->ino);
    exe_id(parent, &p->pdev, &p->pino);
    bpf_probe_read_kernel_str(p->comm, sizeof(p->comm), task + OFF_TASK_COMM);
}

static __always_inline void emit_proc(void *ctx, u32 kind, void *task) {
    struct event_hdr_t hdr = {};
    hdr.kind = kind;
    fill_proc(task, &hdr.proc);
    events.perf_submit(ctx, &hdr, sizeof(hdr));
}

/* ---- connections: bytes summed per key in the map of the current window ---- */

static __always_inline void emit_conn(void *ctx, struct conn_key_t *key) {
    struct conn_event_t ev = {};
    ev.hdr.kind = EV_CONN;
    fill_proc((void *)bpf_get_current_task(), &ev.hdr.proc);
    ev.key = *key;
    events.perf_submit(ctx, &ev, sizeof(ev));
}

static __always_inline int account(void *ctx, struct conn_key_t *key, int dir, u64 bytes) {
    u32 zero = 0;
    u32 *ep = epoch.lookup(&zero);
    u32 e = ep ? *ep : 0;
    struct conn_val_t *v = e ? conns1.lookup(key) : conns0.lookup(key);
    if (!v) {
        struct conn_val_t init = {};
        int err = e ? conns1.insert(key, &init) : conns0.insert(key, &init);
        if (err == 0) emit_conn(ctx, key);
        v = e ? conns1.lookup(key) : conns0.lookup(key);
        if (!v) {
            stat_add(STAT_MAP_FULL, 1);
            stat_add(STAT_BYTES_UNCOUNTED, bytes);
            return 0;
        }
    }
    if (dir == DIR_SEND) __sync_fetch_and_add(&v->send, bytes);
    else __sync_fetch_and_add(&v->recv, bytes);
    return 0;
}

/* peer address from a user sockaddr (unconnected datagram and raw sockets) */
static __always_inline void read_user_peer(u64 uaddr, struct conn_key_t *key) {
    u16 family = 0, port = 0;
    if (!uaddr || bpf_probe_read_user(&family, 2, (void *)uaddr)) return;
    bpf_probe_read_user(&port, 2, (void *)(uaddr + 2));
    if (family == PS_AF_INET) {
        __builtin_memset(key->raddr, 0, 16);
        bpf_probe_read_user(key->raddr, 4, (void *)(uaddr + 4));
    } else if (family == PS_AF_INET6) {
        bpf_probe_read_user(key->raddr, 16, (void *)(uaddr + 8));
    } else {
        return;
    }
    key->rport = swap16(port);
}

static __always_inline u64 user_ptr(u64 uaddr) {
    u64 p = 0;
    bpf_probe_read_user(&p, 8, (void *)uaddr);
    return p;
}

/* the sockaddr a call names: sendto/recvfrom pass it, *msg calls point to it */
static __always_inline u64 call_name(struct call_t *c, u32 index) {
    if (c->kind == CALL_SENDTO || c->kind == CALL_RECVFROM) return c->uptr;
    if (c->kind == CALL_SENDMSG || c->kind == CALL_RECVMSG) return user_ptr(c->uptr);
    return user_ptr(c->uptr + (u64)index * MMSGHDR_SIZE);
}

static __always_inline int sock_key(void *sk, struct conn_key_t *key) {
    u16 family = F_SK_FAMILY(sk);
    if (family == PS_AF_UNIX || family == PS_AF_NETLINK) return -1;
    u64 id = bpf_get_current_pid_tgid();
    key->pid = id >> 32;
    key->uid = bpf_get_current_uid_gid();
    exe_id((void *)bpf_get_current_task(), &key->dev, &key->ino);
    key->family = family;
    key->proto = F_SOCK_PROTOCOL(sk);
    key->lport = F_SK_NUM(sk);
    key->rport = swap16(F_SK_DPORT(sk));
    if (family == PS_AF_INET) {
        bpf_probe_read_kernel(key->laddr, 4, sk + OFF_SK_RCV_SADDR);
        bpf_probe_read_kernel(key->raddr, 4, sk + OFF_SK_DADDR);
    } else if (family == PS_AF_INET6) {
        bpf_probe_read_kernel(key->laddr, 16, sk + OFF_SK_V6_RCV_SADDR);
        bpf_probe_read_kernel(key->raddr, 16, sk + OFF_SK_V6_DADDR);
    }
    return 0;
}

static __always_inline int has_peer(struct conn_key_t *key) {
    u64 *a = (u64 *)key->raddr;
    return a[0] || a[1];
}

/* a socket moved bytes: called by the tracepoints or the kprobe fallback */
static __always_inline int on_sock(void *ctx, void *sk, long ret, int flags, int dir) {
    if (ret <= 0 || !sk) return 0;
    if (dir == DIR_RECV && (flags & PS_MSG_PEEK)) return 0;
    struct conn_key_t key = {};
    if (sock_key(sk, &key)) return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct call_t *c = calls.lookup(&id);
    if (c && dir == DIR_SEND && c->kind <= CALL_SENDMMSG) {
        if (key.proto != PS_TCP) read_user_peer(call_name(c, c->index), &key);
        c->index++;
    } else if (c && dir == DIR_RECV && c->kind > CALL_SENDMMSG && !has_peer(&key)) {
        c->key = key;        /* the peer is known when the call returns */
        c->bytes += ret;
        return 0;
    }
    return account(ctx, &key, dir, ret);
}

static __always_inline int enter_call(u32 kind, u64 uptr) {
    u64 id = bpf_get_current_pid_tgid();
    struct call_t c = {};
    c.kind = kind;
    c.uptr = uptr;
    if (calls.update(&id, &c)) stat_add(STAT_CALLS_FULL, 1);
    return 0;
}

static __always_inline int exit_call(void *ctx, long ret) {
    u64 id = bpf_get_current_pid_tgid();
    struct call_t *c = calls.lookup(&id);
    if (!c) return 0;
    u64 left = c->bytes;
    u32 messages = c->kind == CALL_RECVMMSG ? (ret > 0 ? ret : 0) : 1;
    for (u32 i = 0; i < MMSG_MAX && left; i++) {
        if (i >= messages) break;
        u32 len = left;
        if (c->kind == CALL_RECVMMSG) {
            bpf_probe_read_user(&len, 4, (void *)(c->uptr + (u64)i * MMSGHDR_SIZE + MMSG_LEN_OFF));
            if (len > left || i + 1 == messages) len = left;
        }
        read_user_peer(call_name(c, i), &c->key);
        account(ctx, &c->key, DIR_RECV, len);
        left -= len;
    }
    if (left) account(ctx, &c->key, DIR_RECV, left);
    calls.delete(&id);
    return 0;
}

$SYSCALL_HOOKS

$SOCK_HOOKS

/* ---- processes ---- */

/* the executable's path, leaf first, walking dentries and mounts to the root;
   a step that crosses a mount leaves its slot empty */
static __always_inline void exe_path(void *task, struct exec_t *ex) {
    void *mm = read_ptr(task, TASK_MM);
    void *file = mm ? read_ptr(mm, MM_EXE_FILE) : 0;
    if (!file) return;
    void *dentry = read_ptr(file, FILE_DENTRY);
    void *vfsmnt = read_ptr(file, FILE_MNT);
    void *mnt = vfsmnt - OFF_MOUNT_MNT;
    for (int i = 0; i < PATH_DEPTH; i++) {
        void *root = read_ptr(vfsmnt, VFSMOUNT_ROOT);
        void *parent = read_ptr(dentry, DENTRY_PARENT);
        ex->depth = i;
        ex->path[i][0] = 0;
        if (dentry == root || dentry == parent) {
            void *mnt_parent = read_ptr(mnt, MOUNT_PARENT);
            if (dentry != root || mnt_parent == mnt) {
                ex->complete = 1;
                return;
            }
            dentry = read_ptr(mnt, MOUNT_MOUNTPOINT);
            mnt = mnt_parent;
            vfsmnt = mnt + OFF_MOUNT_MNT;
            continue;
        }
        bpf_probe_read_kernel_str(ex->path[i], NAME_LEN, read_ptr(dentry, DENTRY_NAME));
        dentry = parent;
    }
    ex->depth = PATH_DEPTH;
}

RAW_TRACEPOINT_PROBE(sched_process_exec) {
    u32 zero = 0;
    struct exec_event_t *ev = scratch.lookup(&zero);
    if (!ev) return 0;
    void *task = (void *)bpf_get_current_task();
    __builtin_memset(&ev->hdr, 0, sizeof(ev->hdr));   /* the rest has explicit lengths */
    ev->exec.complete = 0;
    ev->hdr.kind = EV_EXEC;
    fill_proc(task, &ev->hdr.proc);
    void *mm = read_ptr(task, TASK_MM);
    u64 start = F_MM_ARG_START(mm), len = F_MM_ARG_END(mm) - start;
    if (len > ARGS_LEN - 1) len = ARGS_LEN - 1;
    ev->exec.args_len = len & (ARGS_LEN - 1);
    bpf_probe_read_user(ev->exec.args, len & (ARGS_LEN - 1), (void *)start);
    exe_path(task, &ev->exec);
    events.perf_submit(ctx, ev, sizeof(*ev));
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_fork) {
    void *child = (void *)ctx->args[1];
    if (F_TASK_PID(child) == F_TASK_TGID(child)) emit_proc(ctx, EV_FORK, child);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit) {
    void *task = (void *)bpf_get_current_task();
    if (F_TASK_PID(task) == F_TASK_TGID(task)) emit_proc(ctx, EV_EXIT, task);
    return 0;
}

/* ---- domains: getaddrinfo(host, service, hints, res) answers ---- */

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
    fill_proc((void *)bpf_get_current_task(), &ev->hdr.proc);
    bpf_probe_read_user_str(ev->dns.host, sizeof(ev->dns.host), (void *)host);
    for (int i = 0; i < DNS_ADDRS && ai; i++) {
        struct conn_key_t k = {};
        read_user_peer(user_ptr(ai + 24), &k);      /* struct addrinfo: ai_addr */
        u16 family = 0;
        bpf_probe_read_user(&family, 2, (void *)user_ptr(ai + 24));
        ev->dns.families[i] = family;
        __builtin_memcpy(ev->dns.addrs[i], k.raddr, 16);
        ev->dns.count = i + 1;
        ai = user_ptr(ai + 40);                      /* ai_next */
    }
    events.perf_submit(ctx, ev, sizeof(*ev));
    return 0;
}
"""

# socket hooks: sock tracepoints (Linux >= 6.3), else kprobes on the send/receive path
SOCK_HOOKS = {
    "tracepoint": r"""
RAW_TRACEPOINT_PROBE(sock_send_length) {
    return on_sock(ctx, (void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], DIR_SEND);
}
RAW_TRACEPOINT_PROBE(sock_recv_length) {
    return on_sock(ctx, (void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2], DIR_RECV);
}
""",
    "kprobe": r"""
struct sockcall_t { u64 sock; u64 flags; };
BPF_HASH(sockcalls, u64, struct sockcall_t, $MAX_CALLS);
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

# system calls that name a peer: (syscall, call kind, argument with the address)
SYSCALL_HOOKS = [("sendto", "addr"), ("sendmsg", "msg"), ("sendmmsg", "mmsg"),
                 ("recvfrom", "addr"), ("recvmsg", "msg"), ("recvmmsg", "mmsg")]

MAX_CONNS = 32768


def syscall_hooks_text() -> str:
    """Entry and exit tracepoints for each of SYSCALL_HOOKS."""
    out = []
    for name, arg in SYSCALL_HOOKS:
        kind = f"CALL_{name.upper()}"
        out.append(f"TRACEPOINT_PROBE(syscalls, sys_enter_{name}) {{ return enter_call({kind}, (u64)args->{arg}); }}\n"
                   f"TRACEPOINT_PROBE(syscalls, sys_exit_{name}) {{ return exit_call(args, args->ret); }}")
    return "\n".join(out)


def bpf_text(btf: BTF, mode: str) -> str:
    """The complete C program for a capture mode ('tracepoint' or 'kprobe')."""
    defines = lambda prefix, names: "\n".join(f"#define {prefix}{n} {i}" for i, n in names)
    structs = "".join(c_struct(cls, name) for cls, name in STRUCT_NAMES.items())
    return string.Template(BPF_TEXT).substitute(
        PATH_DEPTH=PATH_DEPTH, NAME_LEN=NAME_LEN, ARGS_LEN=ARGS_LEN, DNS_ADDRS=DNS_ADDRS,
        EVENT_KINDS=defines("EV_", [(num, name) for name, (num, _) in EVENT_KINDS.items()]),
        STAT_INDEXES=defines("STAT_", enumerate(STATS)),
        CALL_KINDS=defines("CALL_", [(i, n.upper()) for i, (n, _) in enumerate(SYSCALL_HOOKS)]),
        OFFSETS=offset_defines(btf), STRUCTS=structs,
        MAX_CONNS=MAX_CONNS, MAX_CALLS=16384, N_STATS=len(STATS),
        SYSCALL_HOOKS=syscall_hooks_text(),
        SOCK_HOOKS=string.Template(SOCK_HOOKS[mode]).substitute(MAX_CALLS=16384))
