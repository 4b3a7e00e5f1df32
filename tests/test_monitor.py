"""Hashing and the monitor process: hashing through cached file descriptors, identity
checks, fanotify in file-handle mode, and the rules that decide whether a
hash is that of the content a process executed."""
import hashlib
import os
import shutil
import subprocess
import time

import pytest

import picosnitch
from conftest import need_root, runtime, wait_for



@pytest.fixture
def cache():
    need_root()
    fan = picosnitch.Fanotify()
    yield picosnitch.FdCache(0xFFFFFFFF, 64, fan)
    os.close(fan.fd)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def ctime(path):
    return os.stat(path).st_ctime_ns


def sha(data):
    return hashlib.sha256(data).hexdigest()


def test_hash_is_read_through_the_cached_fd(tmp_path, cache):
    hasher = picosnitch.Hasher(cache)
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"binary one")
    assert hasher.hash(999999999, dev, ino, path, ctime(path)) == (sha(b"binary one"), "")
    os.rename(path, path + ".moved")     # the cache holds the file open: the path is no longer needed
    assert hasher.hash(999999999, dev, ino, "", 0) == (sha(b"binary one"), "")


def test_fanotify_reports_a_modification_by_file_handle(tmp_path, cache):
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"version 1")
    entry, why = cache.open(0, dev, ino, path, ctime=ctime(path))
    assert why == "" and entry.handle is not None
    entry.versions[ctime(path)] = sha(b"version 1")
    with open(path, "ab") as f:
        f.write(b" and 2")
    changed = set()
    assert wait_for(lambda: changed.update(cache.apply_changes()) or (dev, ino) in changed, 5)
    assert entry.versions == {}
    hasher = picosnitch.Hasher(cache)
    assert hasher.hash(0, dev, ino, path, ctime(path)) == (sha(b"version 1 and 2"), "")


def test_a_change_after_the_exec_is_an_error_naming_the_executable(tmp_path, cache):
    """The process is gone and the file's change time is not the one it had
    when the process ran: its content now is not what ran."""
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"what ran")
    at_exec = ctime(path)
    time.sleep(0.05)                 # a later clock tick
    with open(path, "r+b") as f:     # the same inode, rewritten
        f.write(b"what now")
    got, why = picosnitch.Hasher(cache).hash(999999999, dev, ino, path, at_exec)
    assert got == "" and f"{path} was changed (written, moved, deleted or given another mode) after it ran" in why


@pytest.fixture
def monitor(tmp_path):
    need_root()
    rt = runtime(picosnitch.Config(), tmp_path)
    rt.st_dev_mask = 0xFFFFFFFF
    m = picosnitch.Monitor(rt)
    yield m
    os.close(m.fanotify.fd)


def test_a_file_the_reader_caught_is_hashed_with_no_path(tmp_path, monitor):
    """The reader opens each executable as it runs and sends the file along;
    the monitor hashes that file, even when it is in no directory (a deleted
    file run through its descriptor, or a memfd)."""
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"caught")
    fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    changed = os.fstat(fd).st_ctime_ns
    exec_id = [999999999, 1]
    monitor.on_exec(picosnitch.ExecNotice(999999999, dev, ino, path, changed, exec_id, changed, False), fd)
    answer = monitor.answer(picosnitch.HashRequest(1, [[999999999, dev, ino, path, changed, exec_id]]))
    assert answer.results == [[sha(b"caught"), ""]]


def test_a_change_between_the_catch_and_the_hash_is_seen(tmp_path, monitor):
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"what ran")
    fd = os.open(path, os.O_RDONLY)
    at_exec = ctime(path)          # reading it makes the next change visible, even in the same clock tick
    with open(path, "r+b") as f:
        f.write(b"what now")
    monitor.on_exec(picosnitch.ExecNotice(999999999, dev, ino, path, at_exec, [999999999, 2], at_exec, False), fd)
    answer = monitor.answer(picosnitch.HashRequest(1, [[999999999, dev, ino, path, at_exec, [999999999, 2]]]))
    assert answer.results[0][0] == "" and f"{path} was changed (written, moved" in answer.results[0][1]


def test_a_running_process_is_hashed_through_proc(tmp_path, cache):
    """While a process runs a file, the kernel refuses writes to it; the file
    is opened through /proc/PID/exe, not by its path."""
    path = str(tmp_path / "sleeper")
    shutil.copy("/usr/bin/sleep", path)
    st = os.stat(path)
    proc = subprocess.Popen([path, "5"])
    try:
        assert wait_for(lambda: os.path.exists(f"/proc/{proc.pid}/exe") and
                        os.stat(f"/proc/{proc.pid}/exe").st_ino == st.st_ino, 5)
        with pytest.raises(OSError):
            open(path, "r+b")
        got, why = picosnitch.Hasher(cache).hash(proc.pid, st.st_dev, st.st_ino, "", st.st_ctime_ns)
        assert (got, why) == (picosnitch.sha256_fd(os.open(path, os.O_RDONLY)), "")
    finally:
        proc.kill()
        proc.wait()


def test_a_different_file_at_the_path_is_an_error(tmp_path, cache):
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"original")
    write(path + ".new", b"impostor")
    changed = ctime(path)
    os.rename(path + ".new", path)     # another inode now has the path
    got, why = picosnitch.Hasher(cache).hash(999999999, dev, ino, path, changed)
    assert got == "" and why == "its process had exited; the file at its path is gone or not the one that ran"


def test_a_fifo_at_the_path_is_never_opened(tmp_path):
    path = str(tmp_path / "prog")
    os.mkfifo(path)
    st = os.stat(path)
    began = time.monotonic()
    fd, why = picosnitch.open_verified(999999999, st.st_dev, st.st_ino, path, 0xFFFFFFFF, st.st_ctime_ns)
    assert fd == -1 and "not the one that ran" in why and time.monotonic() - began < 1


def test_no_link_on_the_path_is_followed(tmp_path):
    """A user may swap a directory on the path for a link to one they cannot
    enter: the walk refuses any link, even to the very file."""
    real = tmp_path / "real"
    real.mkdir()
    path = str(real / "prog")
    dev, ino = write(path, b"x")
    os.symlink(real, tmp_path / "link")
    assert picosnitch.open_verified(999999999, dev, ino, str(tmp_path / "link" / "prog"), 0xFFFFFFFF,
                                    ctime(path))[0] == -1
    fd, why = picosnitch.open_verified(999999999, dev, ino, path, 0xFFFFFFFF, ctime(path))
    assert fd >= 0 and why == ""
    os.close(fd)
    assert picosnitch.open_verified(999999999, dev, ino, path, 0xFFFFFFFF, 0)[0] == -1     # no change time: no path
    assert picosnitch.open_verified(999999999, dev, ino, path, 0, ctime(path))[0] == -1     # no device check: no path


def test_the_device_check_honours_the_mask():
    st = os.stat("/proc/self/exe")
    fd, why = picosnitch.open_verified(os.getpid(), st.st_dev + 1, st.st_ino, "", 0)
    assert fd >= 0 and why == ""
    os.close(fd)
    assert picosnitch.open_verified(os.getpid(), st.st_dev + 1, st.st_ino, "", 0xFFFFFFFF)[0] == -1


def test_st_dev_mask_setting():
    assert picosnitch.st_dev_mask(picosnitch.Config(set_st_dev_mask=0)) == 0
    btrfs = any(line.split()[2] == "btrfs" for line in open("/proc/self/mounts") if len(line.split()) > 2)
    assert picosnitch.st_dev_mask(picosnitch.Config()) == (0 if btrfs else 0xFFFFFFFF)


def test_cache_is_bounded(tmp_path, cache):
    small = picosnitch.FdCache(0xFFFFFFFF, 3, cache.fanotify)
    for i in range(5):
        path = str(tmp_path / f"p{i}")
        dev, ino = write(path, str(i).encode())
        assert small.open(0, dev, ino, path, ctime=ctime(path))[1] == ""
    assert len(small.entries) == 3 and len(small.by_handle) == 3


def test_overflow_forgets_every_hash(tmp_path, cache, monkeypatch):
    for name in ("a", "b"):
        path = str(tmp_path / name)
        dev, ino = write(path, path.encode())
        picosnitch.Hasher(cache).hash(0, dev, ino, path, ctime(path))
    assert all(entry.versions for entry in cache.entries.values())
    monkeypatch.setattr(cache.fanotify, "modified", lambda: [picosnitch.Fanotify.OVERFLOW])
    assert len(cache.apply_changes()) == 2
    assert all(not entry.versions for entry in cache.entries.values())


def test_hash_requests_never_open_a_path_they_name(tmp_path, monitor):
    """The primary runs as the user: a request it sends for a file no process
    runs is refused, whatever path it names."""
    path = str(tmp_path / "secret")
    dev, ino = write(path, b"root only")
    os.chmod(path, 0o600)
    answer = monitor.answer(picosnitch.HashRequest(1, [[os.getpid(), dev, ino, path, 0, [0, 0]], ["x", "y"],
                                                      ["../../etc", dev, ino, path, 0, [0, 0]],
                                                      [True, dev, ino, path, 0, [0, 0]], [0, dev, ino, path, 0, [0, 0]]]))
    assert answer.results[0][0] == "" and "its process had exited before picosnitch could hash it" in answer.results[0][1]
    assert all(r[0] == "" and r[1].startswith("not hashed") for r in answer.results[1:])
