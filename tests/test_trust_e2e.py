"""Nothing a user controls can steer root (privileges, the state directory, the
supervisor and the terminal viewer): what
acts on the user's settings and files runs as that user, and what writes
picosnitch's records runs as picosnitch's account, with no capabilities.
Each case runs picosnitch for a real throwaway user, as `sudo picosnitch`
would, and plants what a hostile user would."""
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

import picosnitch
from conftest import (PEER_PORT, PYTHON, SCRIPT, Daemon, as_user, new_state, notifications, scratch_directory,
                      sha256_file, told_of, unique_c_sender, wait_for)
from http_services import API_KEY, FakeVirusTotal
from sqlservers import PasswordTrap

CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE = 1 << 2, 1 << 19


def status_of(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.fixture
def root_only():
    """A directory only root can enter, for files the user must never reach."""
    yield from scratch_directory("ps-root-only-", 0o700)


def secret_file(directory, name, content=None):
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content if content is not None else os.urandom(64))
    os.chmod(path, 0o600)
    return path


def fingerprint(path):
    st = os.lstat(path)
    content = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else sorted(os.listdir(path))
    return st.st_uid, st.st_gid, st.st_mode, content


def plant_link(user, target, link):
    subprocess.run(["ln", "-s", target, link], check=True, preexec_fn=as_user(user))


def run_cli(user, *args, timeout=60):
    """picosnitch as under sudo for the user, with a state directory of its own (a first start)."""
    env = dict(os.environ, SUDO_USER=user.pw_name, STATE_DIRECTORY=new_state())
    return subprocess.run([PYTHON, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_each_process_runs_with_only_what_it_needs(user_home, user_session_bus, peers):
    """Reader and monitor: root with CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE
    only (to open any process's executable). Primary and notifier:
    picosnitch's account; desktop: the user; all three with no capabilities
    at all. None can gain privileges again."""
    daemon = Daemon(user=user_home, env={"DBUS_SESSION_BUS_ADDRESS": user_session_bus[0]}).start()
    account = pwd.getpwnam(picosnitch.ACCOUNT)
    try:
        with open(picosnitch.STATUSFILE) as f:
            children = json.load(f)["children"]
        expected = {"reader": ("0", CAP_DAC_READ_SEARCH | CAP_SYS_PTRACE),
                    "monitor": ("0", CAP_DAC_READ_SEARCH | CAP_SYS_PTRACE),
                    "primary": (str(account.pw_uid), 0), "notifier": (str(account.pw_uid), 0),
                    "desktop": (str(user_home.pw_uid), 0)}
        confined = lambda status, uid, caps: (status["Uid"].split() == [uid] * 4 and status["NoNewPrivs"] == "1" and
                                              all(int(status[f], 16) == caps for f in ("CapEff", "CapPrm", "CapBnd")))
        for name, (uid, caps) in expected.items():     # (a process may still be dropping them as it starts)
            assert wait_for(lambda: confined(status_of(children[name]), uid, caps), 10), (name, status_of(children[name]))
        subprocess.run([PYTHON, "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                        f".sendto(b'x', ('127.0.0.1', {PEER_PORT}))"], check=True)
        assert wait_for(lambda: os.path.exists(daemon.path("snitch.db")) and daemon.rows())
        # the settings are the user's, and private; the records are the account's, and the user may read them
        st = os.stat(daemon.path("config.json"))
        assert (st.st_uid, st.st_mode & 0o777) == (user_home.pw_uid, 0o600)
        for name in ("snitch.db", "record.json", "exe.log"):
            st = os.stat(daemon.path(name))
            assert (st.st_uid, st.st_mode & 0o777) == (account.pw_uid, 0o640), name
            assert f"user:{user_home.pw_name}:r--" in acl(daemon.path(name)), name
            assert os.readlink(os.path.join(daemon.dir, name)) == daemon.path(name)
        st = os.stat(daemon.private(""))
        assert (st.st_uid, st.st_mode & 0o777) == (account.pw_uid, 0o700) and f"user:{user_home.pw_name}" not in acl(daemon.private(""))
    finally:
        assert daemon.stop() == 0


def acl(path):
    return subprocess.run(["getfacl", "-cp", path], capture_output=True, text=True, check=True).stdout


def test_links_the_user_plants_change_nothing_of_roots_files(user_home, user_session_bus, peers, exe_dir, root_only):
    """The user made the names of the logs, the database and the record in
    ~/.config/picosnitch/ links to root-only files. picosnitch never writes
    there (it writes its state directory, as its account): they stay as they
    were (owner, mode, content), and picosnitch records and notifies."""
    targets = {name: secret_file(root_only, name) for name in ("error.log", "snitch.db", "exe.log", "record.json")}
    before = {name: fingerprint(path) for name, path in targets.items()}
    daemon = Daemon(user=user_home, env={"DBUS_SESSION_BUS_ADDRESS": user_session_bus[0]})
    for name, target in targets.items():
        plant_link(user_home, target, os.path.join(daemon.dir, name))
    daemon.start()
    try:
        exe = unique_c_sender(exe_dir)
        subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "100"], check=True)
        said = lambda: " ".join(n["body"] for n in notifications(user_session_bus[1]))
        first = f"First network connection detected for {os.path.basename(exe)}"
        assert wait_for(lambda: told_of(user_session_bus[1], first, daemon.read("exe.log")))
        assert [r["send"] for r in daemon.wait_rows(exe=exe)] == [100]
        assert "cannot be written" not in said()
    finally:
        assert daemon.stop() == 0
    assert {name: fingerprint(path) for name, path in targets.items()} == before
    assert all(os.readlink(os.path.join(daemon.dir, name)) == target for name, target in targets.items())


def test_a_linked_config_is_read_as_the_user(user_home, root_only):
    target = secret_file(root_only, "config.json", b'{"DB write limit (seconds)": 1}')
    before = fingerprint(target)
    directory = os.path.join(user_home.pw_dir, ".config", "picosnitch")
    subprocess.run(["mkdir", "-p", directory], check=True, preexec_fn=as_user(user_home))
    plant_link(user_home, target, os.path.join(directory, "config.json"))
    out = run_cli(user_home, "start-no-daemon")
    assert out.returncode == 1
    assert f"cannot read {directory}/config.json: Permission denied" in out.stderr
    assert fingerprint(target) == before


def test_a_linked_config_directory_is_refused(user_home, root_only):
    before = fingerprint(root_only)
    config = os.path.join(user_home.pw_dir, ".config")
    subprocess.run(["mkdir", "-p", config], check=True, preexec_fn=as_user(user_home))
    plant_link(user_home, root_only, os.path.join(config, "picosnitch"))
    out = run_cli(user_home, "start-no-daemon")
    assert out.returncode == 1
    assert f"{config}/picosnitch is a symbolic link; picosnitch refuses to use it" in out.stderr
    assert fingerprint(root_only) == before


def test_the_sql_copy_never_sends_a_password_the_user_cannot_read(user_home, root_only, peers, exe_dir):
    """"DB sql server" names the user's own server and a root-only passfile:
    the client runs as the user and has no password to send. The same trap
    does get a password when the passfile is readable (as root here)."""
    trap = PasswordTrap()
    try:
        passfile = secret_file(root_only, "pgpass", f"127.0.0.1:{trap.port}:logs:snitch:root-secret-4711\n".encode())
        settings = {"client": "psycopg2", "host": "127.0.0.1", "port": trap.port, "user": "snitch",
                    "dbname": "logs", "passfile": passfile, "connect_timeout": 5}
        daemon = Daemon(user=user_home, config={"DB sql server": settings, "Desktop notifications": False}).start()
        try:
            exe = unique_c_sender(exe_dir)
            subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "100"], check=True)
            assert wait_for(lambda: "could not write to the SQL server (psycopg2)" in daemon.read("error.log"))
            assert wait_for(lambda: len(trap.startups) >= 1)
        finally:
            assert daemon.stop() == 0
        assert {s[b"user"] for s in trap.startups} == {b"snitch"} and trap.passwords == []
        import psycopg2
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(**{k: v for k, v in settings.items() if k != "client"})
        assert trap.passwords == ["root-secret-4711"]         # the trap does catch a readable one
    finally:
        trap.close()


def test_the_sql_copy_sends_the_password_of_the_users_own_passfile(user_home, peers, exe_dir):
    """A passfile the user can read (named with ~) is read as the user and
    kept in the private part for picosnitch's account, which sends it."""
    trap = PasswordTrap()
    try:
        home_passfile = os.path.join(user_home.pw_dir, ".pgpass")
        subprocess.run(["sh", "-c", f"umask 077 && echo '127.0.0.1:{trap.port}:logs:snitch:user-secret-815' "
                                    f"> {home_passfile}"], check=True, preexec_fn=as_user(user_home))
        settings = {"client": "psycopg2", "host": "127.0.0.1", "port": trap.port, "user": "snitch",
                    "dbname": "logs", "passfile": "~/.pgpass", "connect_timeout": 5}
        daemon = Daemon(user=user_home, config={"DB sql server": settings, "Desktop notifications": False}).start()
        try:
            exe = unique_c_sender(exe_dir)
            subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "100"], check=True)
            assert wait_for(lambda: trap.passwords), daemon.read("error.log")
        finally:
            assert daemon.stop() == 0
        assert set(trap.passwords) == {"user-secret-815"}
        kept = os.stat(daemon.private("sql-passfile"))
        assert (kept.st_uid, kept.st_mode & 0o777) == (pwd.getpwnam(picosnitch.ACCOUNT).pw_uid, 0o600)
        assert "user-secret-815" not in daemon.read("error.log")
    finally:
        trap.close()


def test_virustotal_uploads_only_what_everyone_can_read(user_home, root_only, peers, exe_dir):
    """Uploads run as picosnitch's account, which reads only what every user can."""
    vt = FakeVirusTotal()
    try:
        hidden = os.path.join(root_only, "hidden-sender")
        shutil.copy2(unique_c_sender(exe_dir), hidden)
        os.chmod(hidden, 0o700)
        visible = unique_c_sender(exe_dir)
        config = {"VT API key": API_KEY, "VT API address": vt.base, "VT file upload": True,
                  "VT request limit (seconds)": 0, "Desktop notifications": False}
        daemon = Daemon(user=user_home, config=config).start()
        try:
            for exe in (hidden, visible):
                subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "100"], check=True)
            verdict = lambda exe: json.loads(daemon.read("record.json") or "{}").get("SHA256", {}).get(exe, {})
            assert wait_for(lambda: verdict(hidden).get(sha256_file(hidden), "").startswith("VirusTotal: not known"))
            assert wait_for(lambda: sha256_file(visible) in vt.uploads)
        finally:
            assert daemon.stop() == 0
        assert verdict(hidden) == {sha256_file(hidden): "VirusTotal: not known, not uploaded "
                                                         "(Permission denied: picosnitch's account cannot read it)"}
        assert sha256_file(visible) in vt.uploads and sha256_file(hidden) not in vt.uploads
    finally:
        vt.close()


def test_status_run_by_a_user_sees_the_daemon(user_home, peers):
    daemon = Daemon(user=user_home, config={"Desktop notifications": False}).start()
    try:
        out = subprocess.run([PYTHON, SCRIPT, "status"], capture_output=True, text=True, preexec_fn=as_user(user_home),
                             env=dict(os.environ, HOME=user_home.pw_dir))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"picosnitch is running (pid {daemon.proc.pid})" in out.stdout
        assert "capture mode: tracepoint" in out.stdout
    finally:
        assert daemon.stop() == 0


def test_view_under_sudo_reads_the_log_as_the_user(user_home, root_only):
    """`sudo picosnitch view`: the viewer becomes the user before it opens
    anything, so a log the user may not read shows nothing of it."""
    from test_view import Tmux, row
    secret = os.path.join(root_only, "snitch.db")
    log = picosnitch.Log.open(secret)
    log.insert([row(picosnitch.now_text(), "/usr/bin/root-secret", 1, 2)])
    log.close(readable=True)
    directory = os.path.join(user_home.pw_dir, ".config", "picosnitch")
    subprocess.run(["mkdir", "-p", directory], check=True, preexec_fn=as_user(user_home))
    subprocess.run(["sh", "-c", f"echo '{{\"GeoIP lookup\": false}}' > {directory}/config.json"],
                   check=True, preexec_fn=as_user(user_home))
    t = Tmux(f"cd / && SUDO_USER={user_home.pw_name} STATE_DIRECTORY={root_only} {PYTHON} {SCRIPT} view", width=200)
    try:
        screen = t.wait(lambda s: "view exited with status" in s or "by executable" in s)
        shell = int(t.tmux("list-panes", "-t", "view", "-F", "#{pane_pid}").strip())
        viewer = subprocess.run(["pgrep", "-P", str(shell), "-f", "picosnitch"], capture_output=True, text=True)
        assert viewer.stdout.split(), screen
        assert status_of(int(viewer.stdout.split()[0]))["Uid"].split() == [str(user_home.pw_uid)] * 4
        assert "snitch.db: Permission denied" in screen and "root-secret" not in screen
    finally:
        t.close()


def test_the_systemd_unit_runs_none_of_the_users_python_code(user_home):
    """The service's python ignores the user's site directory (and its .pth
    files, which python runs at start) even where HOME names the user's home."""
    marker = os.path.join(tempfile.mkdtemp(prefix="ps-pth-"), "ran")
    site = os.path.join(user_home.pw_dir, ".local", "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                        "site-packages")
    subprocess.run(["mkdir", "-p", site], check=True, preexec_fn=as_user(user_home))
    subprocess.run(["sh", "-c", f"echo 'import os; open(\"{marker}\", \"w\").close()' > {site}/zz-user.pth"],
                   check=True, preexec_fn=as_user(user_home))
    unit = picosnitch.systemd_unit(f"{PYTHON} -I {SCRIPT}", {"SUDO_USER": user_home.pw_name})
    env = dict(line[len('Environment="'):-1].split("=", 1) for line in unit.splitlines()
               if line.startswith("Environment="))
    command = next(line[len("ExecStart="):] for line in unit.splitlines() if line.startswith("ExecStart="))
    command = command.replace(" start-no-daemon", " version").split()
    os.chmod(os.path.dirname(marker), 0o777)
    try:
        out = subprocess.run(command, env=dict(env, HOME=user_home.pw_dir), capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("picosnitch ")
        assert not os.path.exists(marker)
        subprocess.run([PYTHON, "-c", "pass"], env=dict(HOME=user_home.pw_dir), check=True)    # the trap works
        assert os.path.exists(marker)
    finally:
        os.unlink(f"{site}/zz-user.pth")      # (the user's other programs run it too)
        shutil.rmtree(os.path.dirname(marker), ignore_errors=True)


def test_the_user_cannot_silence_the_daemon_with_signals(user_home, peers, exe_dir):
    """The primary and the notifier are picosnitch's account's: the user's
    signals cannot reach them. The desktop process is the user's: a
    real-time signal kills it, SIGSTOP would hold it. The root supervisor
    records both, restarts it at once, and logging goes on; `stop` works."""
    daemon = Daemon(user=user_home, config={"Desktop notifications": False}).start()
    try:
        user_kill = lambda sig, pid: subprocess.run(["kill", "-s", sig, str(pid)], capture_output=True, text=True,
                                                    preexec_fn=as_user(user_home))
        children = lambda: json.load(open(picosnitch.STATUSFILE))["children"]
        for name in ("primary", "notifier", "reader", "monitor"):
            refused = user_kill("KILL", children()[name])
            assert refused.returncode != 0 and "Operation not permitted" in refused.stderr, name
        user_kill("40", children()["desktop"])
        assert wait_for(lambda: "the desktop process died (killed by signal 40); restarting it" in daemon.read("error.log"))
        assert wait_for(lambda: (pid := children()["desktop"]) and user_kill("STOP", pid).returncode == 0)
        assert wait_for(lambda: f"the desktop process was stopped for {picosnitch.STOPPED_LIMIT_REACH:.0f}s; killing it"
                        in daemon.read("error.log"), picosnitch.STOPPED_LIMIT_REACH + 20)
        exe = unique_c_sender(exe_dir)
        subprocess.run([exe, "127.0.0.1", str(PEER_PORT), "432"], check=True)
        assert [r["send"] for r in daemon.wait_rows(exe=exe)] == [432]
    finally:
        assert daemon.stop() == 0
