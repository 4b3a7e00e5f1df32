"""The packages, built as a distribution or a user builds them, from a clean
clone of HEAD (what is not committed is not in them):

- the .deb with dpkg-buildpackage, checked by lintian, installed with apt
  and run (version, status and view of a daemon it captured with, dash when
  there is one), then purged;
- the .rpm with rpmbuild (Debian's rpm, --nodeps), from the sdist;
- the wheel and the sdist with `python3 -m build`, checked by twine, the
  wheel installed in a venv that sees the system's bcc.

Each package carries picosnitch's own service unit (the supervisor's section)."""
import contextlib
import email.parser
import glob
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tarfile
import time
import urllib.request
import zipfile

import packaging.requirements
import pytest

from conftest import (PYTHON, ROOT, SYSTEM_PYTHON, bench_run, dash_started, need_root, new_state, unique_c_sender,
                      wait_capturing, wait_for)

MAX_EXPOSURE = 5.0
PACKAGED_FILES = ("picosnitch.py", "setup.py", "MANIFEST.in", "picosnitch.spec", "debian")
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-y", "-q"]


def run(*cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def uncommitted():
    """A note for failures: the packages are built from HEAD only."""
    out = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", *PACKAGED_FILES],
                         capture_output=True, text=True).stdout
    return f"\n(not committed, so not built: {' '.join(out.split())})" if out.strip() else ""


def clone(where):
    path = os.path.join(where, "picosnitch")
    run("git", "clone", "--quiet", ROOT, path)
    return path


def packaged_unit(source):
    """The unit picosnitch.py of this source puts in the packages."""
    return run(PYTHON, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import picosnitch; "
                             "sys.stdout.write(picosnitch.packaged_unit())", source)


def judge_unit(path):
    """systemd-analyze's verdicts on a unit: its exposure, and verify's complaints."""
    out = run("systemd-analyze", "security", "--offline=yes", "--no-pager", path)
    exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
    verify = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
    return exposure, verify.stdout + verify.stderr


def in_private_root(command):
    """command as root in a mount namespace with its own /run, /root, /var/lib
    and /etc/systemd/system (tmpfs): nothing it writes there outlives it."""
    script = ('for d in /run /root /var/lib /etc/systemd/system; do mount -t tmpfs none "$d" || exit 1; done; '
              'exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command]


def as_packaged(environ):
    """The environment of root's `picosnitch systemd` for a unit like the
    packaged one: for root, with the state directory where it is by default."""
    return dict({k: v for k, v in environ.items() if k != "STATE_DIRECTORY"}, SUDO_USER="root", HOME="/root")


# the .deb

@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    need_root()
    where = str(tmp_path_factory.mktemp("deb"))
    source = clone(where)
    started = time.monotonic()
    out = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:] + uncommitted()
    debs = glob.glob(os.path.join(where, "picosnitch_*_all.deb"))
    assert len(debs) == 1, os.listdir(where)
    print(f"built {os.path.basename(debs[0])} ({os.path.getsize(debs[0])} bytes) in {time.monotonic() - started:.1f}s")
    return debs[0], source


def test_the_deb_builds_clean_of_lintian_errors(deb):
    path, _ = deb
    out = subprocess.run(["lintian", "--fail-on", "error", path], capture_output=True, text=True)
    errors = [line for line in out.stdout.splitlines() if line.startswith("E:")]
    assert out.returncode == 0 and errors == [], out.stdout + out.stderr


def test_the_deb_depends_on_bcc_dbus_and_kernel_headers(deb):
    path, _ = deb
    fields = {name: run("dpkg-deb", "-f", path, name).strip() for name in ("Architecture", "Depends")}
    assert fields["Architecture"] == "all"
    depends = {alternative.strip().split()[0] for alternative in re.split(r"[,|]", fields["Depends"])}
    # as the README's set-up installs them: headers of any version will do
    assert {"python3-bpfcc", "python3-dbus", "python3-requests", "python3-geoip2", "linux-headers-generic"} <= depends
    # Debian's kernel headers meta-packages provide linux-headers-generic (Ubuntu has it as a package)
    provides = run("apt-cache", "show", f"linux-headers-{run('dpkg', '--print-architecture').strip()}")
    assert re.search(r"^Provides:.*\blinux-headers-generic\b", provides, re.M)


@pytest.fixture(scope="class")
def installed_deb(deb):
    """The .deb installed with apt, and purged after the tests of the class
    (the machine is left as it was, and the wheel's venv does not find this
    picosnitch among the system's packages)."""
    path, source = deb
    state = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", "picosnitch"], capture_output=True, text=True)
    assert "installed" not in state.stdout.split(), "a picosnitch package is installed already: this test replaces it"
    try:
        run(*APT, "install", "--no-install-recommends", path, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        yield source
    finally:
        run(*APT, "purge", "picosnitch", env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    assert not os.path.exists("/usr/bin/picosnitch")


@pytest.fixture(scope="class")
def installed_daemon(installed_deb, tmp_path_factory):
    """The installed package's daemon, for root with a home of its own, in a
    mount namespace with its own /run, while one new program sends a datagram."""
    home = str(tmp_path_factory.mktemp("deb-home"))
    directory = os.path.join(home, ".config", "picosnitch")
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"DB write limit (seconds)": 1, "GeoIP lookup": False, "Desktop notifications": False}, f)
    resolver, state = str(tmp_path_factory.mktemp("deb-resolver")), new_state()
    cmd = bench_run.private_resolver(["sh", "-c", 'mount -t tmpfs none /run && exec "$@"', "sh",
                                      "/usr/bin/picosnitch", "start-no-daemon"], resolver)
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    proc = subprocess.Popen(cmd, cwd="/", env=dict(env, HOME=home, STATE_DIRECTORY=state), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    wait_capturing(proc, lines, 120, "the installed picosnitch did not start")
    try:
        yield proc, home, state, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(90)


def sent_by(state, exe):
    """Bytes snitch.db has logged as sent by exe (0 before it exists)."""
    db = os.path.join(state, "snitch.db")
    if not os.path.exists(db):
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
            return con.execute("SELECT sum(send) FROM connections WHERE exe = ?", (exe,)).fetchone()[0] or 0
    except sqlite3.Error:
        return 0


class TestTheInstalledDeb:
    """apt install of the .deb, and what runs from it."""

    def test_the_installed_deb_ships_the_command_the_module_and_the_unit(self, installed_deb):
        files = run("dpkg", "-L", "picosnitch").split()
        for path in ("/usr/bin/picosnitch", "/usr/lib/python3/dist-packages/picosnitch.py",
                     "/lib/systemd/system/picosnitch.service"):
            assert path in files
        out = run(SYSTEM_PYTHON, "-I", "-c", "import picosnitch; print(picosnitch.__file__)", cwd="/")
        assert out.strip() == "/usr/lib/python3/dist-packages/picosnitch.py"
        out = run("/usr/bin/picosnitch", "version", cwd="/")
        version = run(PYTHON, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import picosnitch; "
                                    "print(picosnitch.VERSION)", installed_deb).strip()
        assert out.startswith(f"picosnitch {version} ")

    def test_the_deb_unit_is_the_one_picosnitch_systemd_writes(self, installed_deb):
        """`sudo picosnitch systemd` by root writes the packaged unit, byte for
        byte; systemd-analyze finds nothing wrong with it."""
        shipped = open("/lib/systemd/system/picosnitch.service").read()
        assert shipped == packaged_unit(installed_deb)
        out = run(*in_private_root(["sh", "-c", "/usr/bin/picosnitch systemd >&2 && "
                                                "cat /etc/systemd/system/picosnitch.service"]),
                  env=as_packaged(os.environ))
        assert out == shipped
        exposure, complaints = judge_unit("/lib/systemd/system/picosnitch.service")
        assert exposure <= MAX_EXPOSURE and complaints == ""

    def test_the_installed_daemon_captures_and_status_sees_it(self, installed_daemon, exe_dir):
        proc, _, state, lines = installed_daemon
        out = run("nsenter", "-t", str(proc.pid), "-m", "--", "/usr/bin/picosnitch", "status")
        assert f"picosnitch is running (pid {proc.pid})" in out and "capture mode:" in out
        exe = unique_c_sender(exe_dir)
        run(exe, "127.0.0.1", "9", "321")
        assert wait_for(lambda: sent_by(state, exe) == 321, 30), lines

    def test_the_installed_view_shows_the_log(self, installed_daemon, exe_dir):
        from test_view import Tmux
        _, home, state, lines = installed_daemon
        exe = unique_c_sender(exe_dir)
        run(exe, "127.0.0.1", "9", "100")
        assert wait_for(lambda: sent_by(state, exe) == 100, 30), lines
        t = Tmux(f"cd / && HOME={home} STATE_DIRECTORY={state} /usr/bin/picosnitch view", width=160)
        try:
            assert "by executable" in t.wait(os.path.basename(exe))
            t.tmux("send-keys", "-t", "view", "q")
            assert "view exited with status 0" in t.wait("view exited with status")
        finally:
            t.close()

    def test_the_installed_dash_says_what_it_needs_and_serves_its_page(self, installed_daemon):
        """Debian packages no Dash: the package's `picosnitch dash` says so in
        one line; with Dash from picosnitch's environment (/opt/picosnitch,
        where the README's set-up puts it) the package's module serves the page."""
        _, home, state, _ = installed_daemon
        bare = subprocess.run(["/usr/bin/picosnitch", "dash"], cwd="/", capture_output=True, text=True,
                              env=dict(os.environ, HOME=home, STATE_DIRECTORY=state), timeout=60)
        assert bare.returncode == 1 and "needs Dash and Plotly" in bare.stderr and "Traceback" not in bare.stderr
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        packaged = ("import importlib.util, sys; path = '/usr/lib/python3/dist-packages/picosnitch.py'; "
                    "spec = importlib.util.spec_from_file_location('picosnitch', path); "
                    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
                    "sys.exit(module.main(['dash']))")
        proc, address, line = dash_started([PYTHON, "-I", "-c", packaged], cwd="/",
                                           env=dict(os.environ, HOME=home, STATE_DIRECTORY=state, HOST="127.0.0.1",
                                                    PORT=str(port)))

        def page(url):
            """The page, as a browser gets it: the token's cookie, then the page it leads to."""
            try:
                with urllib.request.build_opener(urllib.request.HTTPCookieProcessor()).open(url, timeout=5) as r:
                    return r.status == 200 and b"<html" in r.read().lower()
            except OSError:
                return False
        try:
            assert address and address.startswith(f"http://127.0.0.1:{port}/?token="), line
            assert wait_for(lambda: page(address) or proc.poll() is not None, 90) and page(address), proc.poll()
        finally:
            proc.terminate()
            out = proc.communicate(timeout=30)[0]
        assert "Traceback" not in out, out


# the wheel and the sdist

@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    where = str(tmp_path_factory.mktemp("dist"))
    source = clone(where)
    out = os.path.join(where, "dist")
    started = time.monotonic()
    run(SYSTEM_PYTHON, "-m", "build", "--no-isolation", "--outdir", out, source)
    wheel, = glob.glob(os.path.join(out, "picosnitch-*-py3-none-any.whl"))
    sdist, = glob.glob(os.path.join(out, "picosnitch-*.tar.gz"))
    print(f"built {os.path.basename(wheel)} ({os.path.getsize(wheel)} bytes) and {os.path.basename(sdist)} "
          f"({os.path.getsize(sdist)} bytes) in {time.monotonic() - started:.1f}s")
    return wheel, sdist, source


def test_twine_passes_the_wheel_and_the_sdist(dists):
    wheel, sdist, _ = dists
    out = run("twine", "check", "--strict", wheel, sdist)
    assert out.count("PASSED") == 2, out


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def test_the_extras_are_those_the_readme_names(dists):
    wheel, _, source = dists
    meta = wheel_metadata(wheel)
    extras = set(meta.get_all("Provides-Extra"))
    readme = open(os.path.join(source, "README.md")).read()
    paragraph = re.search(r"^ *Extras: (.*?)\n\n", readme, re.M | re.S)
    assert paragraph, "the README's set-up names no extras"
    assert set(re.findall(r"`([a-z]+)`", paragraph.group(1))) == extras
    requires = {}
    for line in meta.get_all("Requires-Dist"):
        requirement = packaging.requirements.Requirement(line)
        extra = re.fullmatch(r"extra == [\"'](\w+)[\"']", str(requirement.marker)).group(1)
        requires.setdefault(extra, set()).add(f"{requirement.name}{requirement.specifier}")
    assert requires["dash"] == {"dash==4.4.1", "plotly==7.1.0", "dash-bootstrap-components==2.0.4"}
    assert set().union(*requires.values()) == requires["full"]        # full: all of them
    assert not any(r.split("==")[0] == "bcc" for r in requires["full"])     # PyPI's bcc is another project


def test_the_sdist_carries_what_rpmbuild_needs(dists):
    _, sdist, _ = dists
    top = os.path.basename(sdist)[:-len(".tar.gz")]
    with tarfile.open(sdist) as t:
        names = set(t.getnames())
    assert {f"{top}/{name}" for name in ("picosnitch.py", "setup.py", "README.md", "LICENSE", "picosnitch.spec")} <= names


def test_the_wheel_runs_from_a_venv_that_sees_the_systems_bcc(dists, tmp_path):
    wheel, _, source = dists
    venv = str(tmp_path / "venv")
    run(SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv)
    run(f"{venv}/bin/pip", "install", "--quiet", "--no-index", wheel)
    out = run(f"{venv}/bin/python", "-c", "import bcc, picosnitch; print(picosnitch.__file__)", cwd="/")
    assert out.strip().startswith(venv)
    assert run(f"{venv}/bin/picosnitch", "version", cwd="/").startswith("picosnitch ")
    # the unit `picosnitch systemd` writes from the venv, and its command as the service runs it
    unit = run(*in_private_root(["sh", "-c", f"{venv}/bin/picosnitch systemd >&2 && "
                                            "cat /etc/systemd/system/picosnitch.service"]),
               env=as_packaged(os.environ))
    command = re.search(r"^ExecStart=(.*) start-no-daemon$", unit, re.M).group(1)
    assert command == f"{venv}/bin/python3 -I {venv}/bin/picosnitch"
    assert run(*command.split(), "version", cwd="/", env={"PATH": "/usr/bin:/bin"}).startswith("picosnitch ")


# the .rpm

def test_the_rpm_builds_with_the_command_the_module_and_the_unit(dists, tmp_path):
    _, sdist, source = dists
    top = str(tmp_path / "rpmbuild")
    os.makedirs(os.path.join(top, "SOURCES"))
    shutil.copy(sdist, os.path.join(top, "SOURCES"))
    started = time.monotonic()
    out = subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "-bb", "--nodeps",
                          os.path.join(source, "picosnitch.spec")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:] + uncommitted()
    rpm, = glob.glob(os.path.join(top, "RPMS", "noarch", "picosnitch-*.noarch.rpm"))
    print(f"built {os.path.basename(rpm)} ({os.path.getsize(rpm)} bytes) in {time.monotonic() - started:.1f}s")
    files = run("rpm", "-qlp", rpm).split()
    sitelib = next(f for f in files if f.endswith("-packages/picosnitch.py"))
    assert re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/picosnitch\.py", sitelib)
    assert {"/usr/bin/picosnitch", "/usr/lib/systemd/system/picosnitch.service"} <= set(files)
    assert any(f.endswith("/LICENSE") for f in files)
    requires = run("rpm", "-qp", "--requires", rpm).split()
    assert {"python3-bcc", "python3-dbus", "kernel-devel"} <= set(requires)
    # the unit and the module are the source's own
    unpacked = str(tmp_path / "unpacked")
    os.makedirs(unpacked)
    run("sh", "-c", f"rpm2cpio '{rpm}' | cpio -idm --quiet", cwd=unpacked)
    assert open(unpacked + "/usr/lib/systemd/system/picosnitch.service").read() == packaged_unit(source)
    assert open(unpacked + sitelib, "rb").read() == open(os.path.join(source, "picosnitch.py"), "rb").read()
