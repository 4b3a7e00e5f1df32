"""The README's set-up (.ci/install-deps), as it leaves the machine: what
comes from PyPI is pinned and lives in picosnitch's own environment, the
distribution's python is left as Debian made it, and the `picosnitch`
command runs from that environment."""
import glob
import importlib.metadata
import os
import re
import shutil
import stat
import subprocess

from conftest import ROOT, SYSTEM_PYTHON

VENV = "/opt/picosnitch"
PINS = os.path.join(ROOT, ".ci", "pins")


def pinned():
    """{canonical name: version} of every package the lock files pin, each with its hashes."""
    found = {}
    for path in glob.glob(os.path.join(PINS, "*.txt")):
        text = open(path).read()
        entries = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", text, re.M)
        assert len(entries) == text.count("=="), f"{path}: an entry without its hashes"
        found.update((canonical(name), version) for name, version in entries)
    return found


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_nothing_is_installed_into_the_system_pythons_site_directories():
    """pip leaves a .dist-info (or .egg-info) beside whatever it installs."""
    for site in glob.glob("/usr/local/lib/python3*/dist-packages") + glob.glob("/usr/local/lib/python3*/site-packages"):
        installed = [n for n in os.listdir(site) if n.endswith((".dist-info", ".egg-info"))]
        assert installed == [], f"installed into {site}: {installed}"


def test_every_package_in_picosnitchs_environment_is_pinned_with_hashes():
    pins = pinned()
    assert {"dash", "plotly", "dash-bootstrap-components", "mariadb", "flask", "werkzeug"} <= set(pins)
    site, = glob.glob(os.path.join(VENV, "lib", "python3*", "site-packages"))
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=[site])}
    unpinned = {n: v for n, v in installed.items() if n not in ("pip", "picosnitch") and pins.get(n) != v}
    assert unpinned == {}, "installed at a version the lock files do not pin"
    assert set(pins) <= set(installed)


def test_the_environment_is_roots_and_sees_the_distributions_bcc():
    for path in (VENV, os.path.join(VENV, "bin"), *glob.glob(os.path.join(VENV, "lib", "python3*", "site-packages"))):
        st = os.stat(path)
        assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    assert "include-system-site-packages = true" in open(os.path.join(VENV, "pyvenv.cfg")).read()
    out = subprocess.run([os.path.join(VENV, "bin", "python3"), "-I", "-c",
                          "import bcc, dbus, dash, plotly, dash_bootstrap_components; print(bcc.__file__)"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("/usr/lib/python3/dist-packages/"), out.stderr


def test_the_picosnitch_command_runs_from_the_environment():
    assert os.path.realpath(shutil.which("picosnitch")) == os.path.join(VENV, "bin", "picosnitch")
    out = subprocess.run(["picosnitch", "version"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("picosnitch "), out.stderr


def test_debians_python_tools_still_work():
    """twine died on import when a newer importlib_metadata shadowed Debian's."""
    out = subprocess.run(["twine", "--version"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "twine version" in out.stdout, out.stderr
    out = subprocess.run([SYSTEM_PYTHON, "-c", "import importlib_metadata; print(importlib_metadata.__file__)"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("/usr/lib/python3/dist-packages/"), out.stderr
