"""The machine a benchmark ran on, for the top of its report: the CPU, its
microcode, the kernel, the speculation mitigations, the BPF JIT and the
memory. The figures depend on each of them: the mitigations change the cost
of every system call, and the JIT's hardening that of every BPF program run.

Everything is read from /proc and /sys, when asked; what cannot be read is
"unknown".

usage: python3 bench/machine.py      prints the description
"""
import os

VULNERABILITIES = "/sys/devices/system/cpu/vulnerabilities"
JIT_ENABLE = {"0": "off", "1": "on", "2": "on, with debug output"}
JIT_HARDEN = {"0": "off", "1": "for unprivileged programs", "2": "for all programs"}


def first_line(path):
    """The first line of a file, stripped, or None when it cannot be read."""
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def cpuinfo(key):
    """The distinct values of a field of /proc/cpuinfo, in order ("unknown"
    when no CPU has it)."""
    values = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key and value.strip() not in values:
                    values.append(value.strip())
    except OSError:
        pass
    return " / ".join(values) or "unknown"


def cpus_online():
    """The number of CPUs online (/sys/devices/system/cpu/online: "0-3,6")."""
    count = 0
    try:
        for part in first_line("/sys/devices/system/cpu/online").split(","):
            low, _, high = part.partition("-")
            count += int(high or low) - int(low) + 1
    except (AttributeError, ValueError):
        return "unknown"
    return count


def memory():
    """MemTotal from /proc/meminfo, in GiB and as the kernel gives it."""
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return "unknown"
    return f"{kb / 2**20:.1f} GiB (MemTotal {kb:,} kB)"


def mitigations():
    """Each file of /sys/devices/system/cpu/vulnerabilities and its line,
    sorted by name; None when the directory cannot be read."""
    try:
        names = sorted(os.listdir(VULNERABILITIES))
    except OSError:
        return None
    return [(name, first_line(os.path.join(VULNERABILITIES, name)) or "unknown") for name in names]


def jit(name, meanings):
    """A BPF JIT setting from /proc/sys/net/core: its value and what it means."""
    value = first_line(f"/proc/sys/net/core/{name}")
    if value is None:
        return f"{name} unknown"
    return f"{name} {value}" + (f" ({meanings[value]})" if value in meanings else "")


def describe():
    """The machine as markdown list items, to go under a report's title."""
    uname = os.uname()
    lines = [f"- CPU: {cpuinfo('model name')}, {cpus_online()} online; microcode {cpuinfo('microcode')}",
             f"- kernel: {uname.release} ({uname.version})",
             f"- BPF JIT: {jit('bpf_jit_enable', JIT_ENABLE)}; {jit('bpf_jit_harden', JIT_HARDEN)}",
             f"- memory: {memory()}"]
    found = mitigations()
    if found is None:
        lines.append(f"- speculation mitigations: unknown (no {VULNERABILITIES})")
    else:
        lines.append(f"- speculation mitigations ({VULNERABILITIES}):")
        lines += [f"  - {name}: {line}" for name, line in found]
    return lines


def summary():
    """The machine in one line: CPU, microcode, CPUs online, kernel."""
    return (f"{cpuinfo('model name')} (microcode {cpuinfo('microcode')}), {cpus_online()} CPUs, "
            f"kernel {os.uname().release}")


if __name__ == "__main__":
    print("\n".join(describe()))
