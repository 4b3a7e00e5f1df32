"""Names a program chooses (shown, the reader, notifications and the web UI): on real BPF, with a
real session bus whose notification service takes markup, they are logged
whole and shown so that nothing in them acts, in the logs and on the
desktop; the database keeps their exact bytes."""
import os
import subprocess

import pytest

import picosnitch
from conftest import HERE, PEER_PORT, Daemon, notifications, recording_bus, scratch_directory, wait_for

MARKUP = "<b>bold</b> & <i>x<"
ESCAPES = "esc\x1b]2;PWNED-TITLE\x07\x1b[31mred"
BIDI = "\u202egpj.exe"


@pytest.fixture(scope="module")
def markup_bus(tmp_path_factory):
    """A session bus whose notification service says it takes body markup."""
    yield from recording_bus(str(tmp_path_factory.mktemp("markup-bus")), capabilities="body,body-markup")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, markup_bus, peers):
    d = Daemon(str(tmp_path_factory.mktemp("home")), env={"DBUS_SESSION_BUS_ADDRESS": markup_bus[0]}).start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def programs():
    yield from scratch_directory("ps-names-", 0o755)


def sender(path):
    """tests/quick.c built as path (its tag, and so its sha256, of its own)."""
    subprocess.run(["gcc", "-O2", f'-DTAG="{os.urandom(8).hex()}"', "-o", path, os.path.join(HERE, "quick.c")],
                   check=True)
    os.chmod(path, 0o755)
    return path


def send(exe, nbytes):
    subprocess.run([exe, "127.0.0.1", str(PEER_PORT), str(nbytes)], check=True)


def said(bus, text):
    return [n["body"] for n in notifications(bus[1]) if text in n["body"]]


def test_two_names_that_share_their_first_100_bytes_are_two_executables(daemon, markup_bus, programs):
    first, second = (sender(os.path.join(programs, "t" * 100 + tail)) for tail in ("A", "B"))
    send(first, 111)
    send(second, 222)
    assert [r["send"] for r in daemon.wait_rows(exe=first)] == [111]
    assert [r["send"] for r in daemon.wait_rows(exe=second)] == [222]
    for exe in (first, second):
        assert wait_for(lambda: said(markup_bus, f"First network connection detected for t"
                                                 f"{'t' * 14} ({exe})"), 15), exe
        assert exe in daemon.read("record.json")


def test_a_255_byte_name_and_a_4000_byte_path_are_logged_whole_or_marked_cut(daemon, programs):
    """The file's own name comes whole with the exec. A 4,000-byte path of
    199-byte directory names is read whole from the file caught at the exec
    (the program runs a moment); one whose program is gone before that is
    logged whole or marked cut, with an error naming it."""
    longest = sender(os.path.join(programs, "n" * 254 + "Z"))
    deep = programs
    while len(deep) < 4000 - 201:
        deep = os.path.join(deep, "d" * 199)
        os.mkdir(deep)
    lingering = sender(os.path.join(deep, "s" * (4000 - len(deep) - 1)))
    quick = sender(lingering[:-1] + "q")
    assert len(os.path.basename(longest)) == 255 and len(lingering) == len(quick) == 4000
    send(longest, 321)
    subprocess.run([lingering, "127.0.0.1", str(PEER_PORT), "432", "300"], check=True)
    for exe, nbytes in ((longest, 321), (lingering, 432)):
        assert [r["send"] for r in daemon.wait_rows(exe=exe)] == [nbytes], exe[:80]
    send(quick, 543)
    logged = lambda: [r["exe"] for r in daemon.rows() if r["send"] == 543]
    assert wait_for(logged, 20)
    exe = logged()[0]
    assert exe == quick or (exe.startswith(programs) and "…/" in exe and " (cut; device " in exe and
                            f"the path of {picosnitch.shown(exe)} " in daemon.read("error.log")), exe


def test_names_that_would_act_are_shown_escaped_and_kept_exact(daemon, markup_bus, programs):
    """The escape sequences and the markup of a file name are escaped in
    exe.log and in the notification (which, to a server that takes markup,
    has <, > and & escaped too); the database has the name as it is."""
    for name in (ESCAPES, MARKUP.replace("/", "|"), BIDI):
        exe = sender(os.path.join(programs, name))
        send(exe, 100)
        assert [r["send"] for r in daemon.wait_rows(exe=exe)] == [100]          # the exact bytes, in the log
        logged = picosnitch.shown(exe)
        assert wait_for(lambda: logged in daemon.read("exe.log")), logged
        assert "\x1b" not in daemon.read("exe.log") and "\x07" not in daemon.read("exe.log")
        assert "\u202e" not in daemon.read("exe.log")
        body = f"({picosnitch.html.escape(logged, quote=False)})"
        assert wait_for(lambda: said(markup_bus, body), 15), body
    assert "esc\\x1b]2;PWNED-TITLE\\x07\\x1b[31mred" in daemon.read("exe.log")
    assert "\\u202egpj.exe" in daemon.read("exe.log")
    assert said(markup_bus, "&lt;b&gt;bold&lt;|b&gt; &amp; &lt;i&gt;x&lt;")
    assert not [b for b in said(markup_bus, "bold") if "<b>" in b]
