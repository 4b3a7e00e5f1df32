"""Run a service unit's command under the unit's own sandbox, as systemd would,
for machines with no systemd as init (CI runs in containers).

usage: unit_sandbox.py UNIT [--bind SRC:DST]... [--user-run UID:DIR] [-- COMMAND...]

Run as root. The process enters a new mount namespace (and a new UTS
namespace for ProtectHostname=), gets its own /run (a tmpfs: the pidfile of a
daemon in here never meets one outside), then applies every setting of the
unit's [Service] section: the mounts of ProtectSystem=, ProtectHome=,
ReadWritePaths=, PrivateTmp=, PrivateDevices=, ProtectKernelTunables= and
ProtectControlGroups=, a seccomp filter for SystemCallFilter= and the
Restrict*= settings, the umask, and finally execs the unit's ExecStart= (or
COMMAND) through setpriv with the unit's capability bounding set and
no_new_privs, with the unit's environment only.

--bind SRC:DST bind-mounts a file or directory before the sandbox is built
(a test's own hosts file, say). --user-run UID:DIR puts DIR at /run/user/UID,
where a user's session bus lives.

The emulation refuses a setting it does not know, so that the unit can gain
no restriction that the end-to-end test would not apply. Where it cannot be
exact it is stricter than systemd, never looser.
"""
import ctypes
import errno
import os
import resource
import shlex
import socket
import stat
import subprocess
import sys

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, AT_RECURSIVE, SYS_MOUNT_SETATTR = 0x1, 0x8000, 442     # mount_setattr: same number on every arch
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
AF_MAX = 46
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# systemd's limits for services (DefaultLimitMEMLOCK=, DefaultLimitNOFILE=)
SYSTEMD_LIMITS = {"RLIMIT_MEMLOCK": (8 << 20, 8 << 20), "RLIMIT_NOFILE": (1024, 524288)}

# settings that are not a restriction: nothing to emulate
NOT_SANDBOXING = {"Type", "ExecStart", "Environment", "Restart", "RestartSec", "KillMode", "TimeoutStopSec"}
# what systemd takes out of the bounding set for some settings
DROPPED_BY = {"ProtectClock": {"CAP_SYS_TIME", "CAP_WAKE_ALARM"}, "PrivateDevices": {"CAP_MKNOD", "CAP_SYS_RAWIO"},
              "ProtectKernelModules": {"CAP_SYS_MODULE"}, "ProtectKernelLogs": {"CAP_SYSLOG"}}
KERNEL_TUNABLES = ("/proc/sys", "/proc/sysrq-trigger", "/proc/latency_stats", "/proc/acpi", "/proc/timer_stats",
                   "/proc/fs", "/proc/irq", "/proc/mtrr", "/proc/scsi", "/proc/asound", "/proc/bus", "/sys")
# hidden by ProtectKernelTunables= in newer systemd (256), and always here: the stricter case
KERNEL_SECRETS = ("/proc/kallsyms", "/proc/kcore")
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result, what):
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     data and data.encode()), f"mount {target}")


def set_read_only(path, read_only):
    """Make the mount tree at path read-only or writable, keeping its other flags."""
    if path != "/":         # (a mount over / would not be seen from this process's root)
        mount(path, path, None, MS_BIND | MS_REC)      # a mount of its own, so that only this tree changes
    attr = MountAttr(MOUNT_ATTR_RDONLY if read_only else 0, 0 if read_only else MOUNT_ATTR_RDONLY, 0, 0)
    check(libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                       ctypes.sizeof(attr)), f"mount_setattr {path}")


def parse_unit(path):
    """Each section's settings: section -> name -> list of values, in order."""
    sections, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = sections.setdefault(line.strip("[]"), {})
            else:
                name, _, value = line.partition("=")
                section.setdefault(name, []).append(value)
    return sections


def words(settings, name):
    return [w.replace("%%", "%") for value in settings.get(name, []) for w in shlex.split(value)]


def yes(settings, name):
    return settings.get(name, ["no"])[-1] in ("yes", "true", "on", "1")


def private_devices():
    """A /dev with only the pseudo devices, as PrivateDevices= makes it."""
    staging = "/run/.sandbox-dev"
    os.makedirs(staging)
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755")
    for name in DEVICES:
        st = os.stat(f"/dev/{name}")
        os.mknod(f"{staging}/{name}", stat.S_IMODE(st.st_mode) | stat.S_IFCHR, st.st_rdev)
    for name in ("pts", "shm", "mqueue"):
        if os.path.isdir(f"/dev/{name}"):
            os.mkdir(f"{staging}/{name}")
            mount(f"/dev/{name}", f"{staging}/{name}", None, MS_BIND | MS_REC)
    os.symlink("pts/ptmx", f"{staging}/ptmx")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{staging}/{name}")
    os.symlink("/proc/self/fd", f"{staging}/fd")
    mount(staging, "/dev", None, MS_BIND | MS_REC)
    check(libc.umount2(staging.encode(), MNT_DETACH), f"umount {staging}")
    os.rmdir(staging)


def build_mounts(settings, wanted, binds, user_run):
    check(libc.unshare(CLONE_NEWNS | (CLONE_NEWUTS if yes(settings, "ProtectHostname") else 0)), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    for source, target in binds:
        mount(source, target, None, MS_BIND)
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")       # this machine's own /run
    if user_run:
        uid, directory = user_run
        os.makedirs(f"/run/user/{uid}")
        mount(directory, f"/run/user/{uid}", None, MS_BIND)
    if "sys-kernel-tracing.mount" in wanted and not os.path.isdir("/sys/kernel/tracing/events"):
        mount("nodev", "/sys/kernel/tracing", "tracefs", 0)     # as systemd does before it starts the unit
    if yes(settings, "PrivateTmp"):
        for path in ("/tmp", "/var/tmp"):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    if yes(settings, "PrivateDevices"):
        private_devices()
    # systemd applies its mounts shallowest path first: a deeper one wins
    modes = []
    protect = settings.get("ProtectSystem", ["no"])[-1]
    if protect == "strict":
        modes += [("/", True), ("/proc", False), ("/sys", False), ("/dev", False)]
        modes += [(p, False) for p in ("/tmp", "/var/tmp") if yes(settings, "PrivateTmp")]
    elif protect not in ("no", "false"):
        raise SystemExit(f"unit_sandbox: ProtectSystem={protect} is not emulated")
    home = settings.get("ProtectHome", ["no"])[-1]
    if home == "read-only":
        modes += [(p, True) for p in ("/home", "/root", "/run/user") if os.path.isdir(p)]
    elif home not in ("no", "false"):
        raise SystemExit(f"unit_sandbox: ProtectHome={home} is not emulated")
    hidden = []
    if yes(settings, "ProtectKernelTunables"):
        modes += [(p, True) for p in KERNEL_TUNABLES if os.path.exists(p)]
        hidden += KERNEL_SECRETS
    if yes(settings, "ProtectKernelLogs"):
        hidden += ["/proc/kmsg", "/dev/kmsg"]
    inaccessible = "/run/.sandbox-inaccessible"       # as systemd's: empty, mode 0000
    os.close(os.open(inaccessible, os.O_CREAT | os.O_WRONLY, 0))
    for path in hidden:
        if os.path.exists(path):
            mount(inaccessible, path, None, MS_BIND)
    if yes(settings, "ProtectControlGroups"):
        modes.append(("/sys/fs/cgroup", True))
    for path in words(settings, "ReadWritePaths"):
        optional, path = path.startswith("-"), path.lstrip("-")
        if not os.path.exists(path):
            if optional:
                continue
            raise SystemExit(f"unit_sandbox: ReadWritePaths: {path} does not exist (systemd fails with 226/NAMESPACE)")
        modes.append((path, False))
    for path, read_only in sorted(modes, key=lambda m: (m[0].rstrip("/").count("/"), m[0])):
        set_read_only(path, read_only)


def syscall_group(name):
    """The system calls of a systemd group (@name), or the name itself."""
    if not name.startswith("@"):
        return [name]
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", name], check=True,
                         capture_output=True, text=True).stdout
    calls = []
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            calls += syscall_group(line)
    return calls


def seccomp_filter(settings):
    """One filter for every setting systemd implements with seccomp."""
    import seccomp
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)       # native architecture only: others are killed

    def deny(action, call, *args):
        try:
            f.add_rule(action, call, *args)
        except (ValueError, RuntimeError, OSError):
            pass                # no such system call on this architecture

    number = settings.get("SystemCallErrorNumber", [None])[-1]
    action = seccomp.ERRNO(getattr(errno, number)) if number else seccomp.KILL_PROCESS
    for value in settings.get("SystemCallFilter", []):
        if not value.startswith("~"):
            raise SystemExit("unit_sandbox: only deny lists (SystemCallFilter=~...) are emulated")
        for group in value[1:].split():
            for call in syscall_group(group):
                deny(action, call)
    if yes(settings, "ProtectClock"):
        for call in syscall_group("@clock"):
            deny(seccomp.ERRNO(errno.EPERM), call)
    if yes(settings, "PrivateDevices"):
        for call in syscall_group("@raw-io"):
            deny(seccomp.ERRNO(errno.EPERM), call)
    if yes(settings, "ProtectKernelLogs"):
        deny(seccomp.ERRNO(errno.EPERM), "syslog")
    families = words(settings, "RestrictAddressFamilies")
    if families:
        allowed = {getattr(socket, name) for name in families}
        for family in range(AF_MAX):
            if family not in allowed:
                deny(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
        deny(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GE, AF_MAX))
    if yes(settings, "RestrictNamespaces"):
        for flag in NAMESPACE_FLAGS:
            for call in ("unshare", "clone"):
                deny(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        deny(seccomp.ERRNO(errno.EPERM), "setns")
        deny(seccomp.ERRNO(errno.ENOSYS), "clone3")     # its flags are out of reach: glibc falls back to clone
    if yes(settings, "LockPersonality"):              # stricter: only the query is left
        deny(seccomp.ERRNO(errno.EPERM), "personality", seccomp.Arg(0, seccomp.NE, 0xffffffff))
    if yes(settings, "RestrictRealtime"):
        for policy in (1, 2, 6):                      # SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
            deny(seccomp.ERRNO(errno.EPERM), "sched_setscheduler", seccomp.Arg(1, seccomp.MASKED_EQ, 0xff, policy))
    if yes(settings, "RestrictSUIDSGID"):
        for bit in (stat.S_ISUID, stat.S_ISGID):
            for call, mode_arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("mkdir", 1), ("mkdirat", 2),
                                   ("mknod", 1), ("mknodat", 2), ("creat", 1)):
                deny(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(mode_arg, seccomp.MASKED_EQ, bit, bit))
            for call, flags_arg in (("open", 1), ("openat", 2)):
                deny(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(flags_arg, seccomp.MASKED_EQ, os.O_CREAT, os.O_CREAT),
                     seccomp.Arg(flags_arg + 1, seccomp.MASKED_EQ, bit, bit))
    if settings.get("SystemCallArchitectures", ["native"])[-1] != "native":
        raise SystemExit("unit_sandbox: only SystemCallArchitectures=native is emulated")
    return f


# settings emulated above (PrivateMounts= needs nothing more: the sandbox's
# mount namespace is private already)
EMULATED = {"CapabilityBoundingSet", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "ReadWritePaths",
            "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectKernelTunables", "ProtectKernelLogs",
            "ProtectControlGroups", "ProtectClock", "ProtectHostname", "RestrictNamespaces", "LockPersonality",
            "RestrictRealtime", "RestrictSUIDSGID", "SystemCallArchitectures", "SystemCallFilter",
            "SystemCallErrorNumber", "RestrictAddressFamilies", "UMask"}


def bounding_set(settings):
    caps = set(words(settings, "CapabilityBoundingSet"))
    for name, dropped in DROPPED_BY.items():
        if yes(settings, name):
            caps -= dropped
    return "-all" + "".join(f",+{cap[4:].lower()}" for cap in sorted(caps))


def main(argv):
    unit, binds, user_run, command = argv[0], [], None, None
    args = argv[1:]
    while args:
        arg = args.pop(0)
        if arg == "--bind":
            binds.append(tuple(args.pop(0).split(":", 1)))
        elif arg == "--user-run":
            uid, directory = args.pop(0).split(":", 1)
            user_run = (int(uid), directory)
        elif arg == "--":
            command = args
            break
        else:
            raise SystemExit(f"unit_sandbox: unknown argument {arg}")
    sections = parse_unit(unit)
    settings = sections.get("Service", {})
    wanted = words(sections.get("Unit", {}), "Wants") + words(sections.get("Unit", {}), "Requires")
    unknown = set(settings) - EMULATED - NOT_SANDBOXING
    if unknown:
        raise SystemExit(f"unit_sandbox: not emulated: {', '.join(sorted(unknown))}")
    env = {"PATH": SYSTEMD_PATH}
    for value in settings.get("Environment", []):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            env[key] = val.replace("%%", "%")
    command = command or words(settings, "ExecStart")
    build_mounts(settings, wanted, binds, user_run)
    filter_ = seccomp_filter(settings)
    os.chdir("/")
    os.umask(int(settings.get("UMask", ["0022"])[-1], 8))
    for name, (soft, hard) in SYSTEMD_LIMITS.items():     # (no higher than this machine lets them be)
        ceiling = resource.getrlimit(getattr(resource, name))[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(getattr(resource, name), (soft, hard))
    wrapper = ["setpriv", f"--bounding-set={bounding_set(settings)}"]
    if yes(settings, "NoNewPrivileges"):
        wrapper.append("--no-new-privs")
    sys.stdout.flush()
    filter_.load()
    os.execvpe(wrapper[0], wrapper + ["--"] + command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
