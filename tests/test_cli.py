"""The command line: commands, help, root checks."""
import os
import shutil
import subprocess

import pytest

import picosnitch
from conftest import PYTHON, SCRIPT

NOBODY = 65534


def cli(*args, user=None, env=None, cwd=None):
    preexec = (lambda: (os.setgid(NOBODY), os.setuid(NOBODY))) if user == "nobody" else None
    return subprocess.run([PYTHON, SCRIPT, *args], capture_output=True, text=True, preexec_fn=preexec,
                          env=env or dict(os.environ, HOME="/nonexistent"), cwd=cwd, timeout=60)


@pytest.mark.parametrize("command", ["start", "stop", "restart", "start-no-daemon", "systemd"])
def test_commands_needing_root_say_so(command):
    if os.geteuid() != 0:
        pytest.skip("switching to nobody needs root")
    out = cli(command, user="nobody")
    assert out.returncode == 1
    assert f"'{command}' needs root: run it as 'sudo picosnitch {command}'" in out.stderr


def test_version_and_help():
    out = cli("version")
    assert out.returncode == 0 and out.stdout.startswith(f"picosnitch {picosnitch.VERSION}")
    out = cli("help")
    assert out.returncode == 0
    for command in ("start", "stop", "restart", "status", "start-no-daemon", "systemd", "version", "help"):
        assert f"  {command} " in out.stdout


def test_unknown_command_is_an_error():
    out = cli("frobnicate")
    assert out.returncode == 2 and "unknown command: frobnicate" in out.stderr
    assert cli().returncode == 2


def test_status_when_not_running():
    if picosnitch.read_pid() is not None:
        pytest.skip("a picosnitch daemon is running on this machine")
    out = cli("status")
    assert (out.returncode, out.stdout.strip()) == (3, "picosnitch is not running")


def test_long_running_commands_start_over_as_the_module(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execv", lambda path, args: calls.append((path, args)))
    monkeypatch.setattr(picosnitch.sys, "executable", PYTHON)
    monkeypatch.setattr(picosnitch.sys, "argv", [os.path.relpath(SCRIPT), "start"])
    monkeypatch.setattr(picosnitch.sys, "orig_argv", ["python3", "-I", "-X", "dev", os.path.relpath(SCRIPT), "start"])
    picosnitch.run_as_module()
    assert calls == [(PYTHON, ["python3", "-I", "-X", "dev", "-P", "-c", picosnitch.MODULE_BOOT, SCRIPT, "start"])]
    monkeypatch.setattr(picosnitch.sys, "executable", "/tmp/python3")     # found on PATH, not the one running
    picosnitch.run_as_module()
    assert calls[1][0] == os.path.realpath("/proc/self/exe") and calls[1][1] == calls[0][1]
    for orig, argv in ((["python3", "-m", "picosnitch", "start"], [SCRIPT, "start"]),     # not the script
                       (["python3", "--", SCRIPT, "start"], [SCRIPT, "start"]),           # -P would be the script
                       (["python3", "/dev/stdin", "start"], ["/dev/stdin", "start"])):    # read once already
        monkeypatch.setattr(picosnitch.sys, "orig_argv", orig)
        monkeypatch.setattr(picosnitch.sys, "argv", argv)
        picosnitch.run_as_module()
    assert len(calls) == 2


def test_the_module_started_over_takes_nothing_from_the_working_directory(tmp_path):
    """`python3 -c` puts the working directory first in sys.path: a module
    there named like one picosnitch imports would run as root. (A broken
    config.json stops start-no-daemon right after the imports.)"""
    if os.geteuid() != 0:
        pytest.skip("start-no-daemon needs root")
    marker, config = tmp_path / "imported", tmp_path / ".config" / "picosnitch" / "config.json"
    (tmp_path / "calendar.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config.parent.mkdir(parents=True)
    config.write_text("{")
    out = cli("start-no-daemon", env=dict(os.environ, HOME=str(tmp_path)), cwd=tmp_path)
    assert out.returncode == 1 and f"{config}: invalid JSON at line 1" in out.stderr
    assert not marker.exists()
    out = subprocess.run([PYTHON, "-P", "-c", picosnitch.MODULE_BOOT, SCRIPT, "version"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(f"picosnitch {picosnitch.VERSION}")
    assert not marker.exists()


def test_systemd_unit_runs_start_no_daemon_for_the_sudo_user():
    unit = picosnitch.systemd_unit("/usr/bin/python3 /opt/picosnitch.py",
                                   {"SUDO_USER": "root", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/x"})
    assert "ExecStart=/usr/bin/python3 /opt/picosnitch.py start-no-daemon\n" in unit
    assert 'Environment="SUDO_USER=root"' in unit and 'Environment="PYTHONNOUSERSITE=1"' in unit
    assert "HOME=" not in unit          # root's python would take the user's site directory from it
    assert 'Environment="DBUS_SESSION_BUS_ADDRESS=unix:path=/x"' in unit
    assert "KillMode=mixed" in unit and "WantedBy=multi-user.target" in unit


def test_importing_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); sys.path.insert(0, sys.argv[1]); import picosnitch; "
            "assert dict(os.environ) == before; assert 'bcc' not in sys.modules; assert 'dbus' not in sys.modules")
    subprocess.run([PYTHON, "-c", code, os.path.dirname(SCRIPT)], check=True)


def test_systemd_command_writes_the_unit():
    if os.geteuid() != 0:
        pytest.skip("writes /etc/systemd/system")
    path = picosnitch.SYSTEMD_UNIT
    before = open(path).read() if os.path.exists(path) else None
    directory = picosnitch.user_identity({"SUDO_USER": "root"}).directory
    made = not os.path.exists(directory)
    try:
        out = cli("systemd", env=dict(os.environ, HOME="/root", SUDO_USER="root"))
        assert out.returncode == 0 and f"wrote {path}" in out.stdout
        unit = open(path).read()
        assert f"ExecStart={PYTHON} -I {SCRIPT} start-no-daemon\n" in unit
        assert 'Environment="SUDO_USER=root"' in unit
        # the directories the unit lets picosnitch write exist (the unit would not start otherwise)
        state = os.environ["STATE_DIRECTORY"]
        assert f'ReadWritePaths=/run -"{state}" "{directory}"\n' in unit and os.path.isdir(directory)
        assert f'Environment="STATE_DIRECTORY={state}"' in unit and os.path.isdir(state)
    finally:
        if before is None:
            os.unlink(path)
        else:
            open(path, "w").write(before)
        if made:
            shutil.rmtree(directory, ignore_errors=True)


def test_ebpf_prints_the_program_of_the_mode_it_would_choose_or_the_one_named():
    """As the user, without root: the text compile_program is given, and
    nothing else on stdout; a mode it does not know is an error that names it."""
    btf = picosnitch.BTF.from_file()
    out = cli("ebpf", user="nobody")
    chosen = picosnitch.capture_mode(btf)
    assert out.returncode == 0 and out.stdout == picosnitch.bpf_text(btf, chosen)
    assert f"capture mode {chosen}: {picosnitch.CAPTURE_MODES[chosen].description}" in out.stderr
    for mode, spec in picosnitch.CAPTURE_MODES.items():
        out = cli("ebpf", mode, user="nobody")
        assert out.returncode == 0 and out.stdout == picosnitch.bpf_text(btf, mode)
        for _, entry, ret in spec.kprobes:
            assert f"int {entry}(" in out.stdout and f"int {ret}(" in out.stdout
    out = cli("ebpf", "fentry\x1b[31m", user="nobody")
    assert out.returncode == 1 and out.stdout == ""
    assert "unknown capture mode: fentry\\x1b[31m (one of: tracepoint, raw-tracepoint, kprobe)" in out.stderr
    assert cli("ebpf", "kprobe", "tracepoint").returncode == 2 and cli("version", "x").returncode == 2

