"""Hashing through cached file descriptors, identity checks, and fanotify re-hashing."""
import hashlib
import os
import time

import pytest

import picosnitch
from conftest import need_root


@pytest.fixture
def cache():
    need_root()
    fan = picosnitch.Fanotify()
    yield picosnitch.FdCache(0xFFFFFFFF, 64, fan), fan
    os.close(fan.fd)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_hash_is_read_through_the_cached_fd(tmp_path, cache):
    fdcache, _ = cache
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"binary one")
    assert fdcache.sha256(999999999, dev, ino, path) == (hashlib.sha256(b"binary one").hexdigest(), "")
    os.rename(path, path + ".moved")     # the cache holds the file open: the path is no longer needed
    assert fdcache.sha256(999999999, dev, ino, "")[0] == hashlib.sha256(b"binary one").hexdigest()


def test_modification_is_seen_by_fanotify(tmp_path, cache):
    fdcache, fan = cache
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"version 1")
    assert fdcache.sha256(0, dev, ino, path)[0] == hashlib.sha256(b"version 1").hexdigest()
    with open(path, "ab") as f:
        f.write(b" and 2")
    deadline = time.monotonic() + 5
    modified = []
    while (dev, ino) not in modified and time.monotonic() < deadline:
        modified += fan.modified()
        time.sleep(0.05)
    assert (dev, ino) in modified
    fdcache.invalidate(dev, ino)
    assert fdcache.sha256(0, dev, ino, path)[0] == hashlib.sha256(b"version 1 and 2").hexdigest()


def test_a_different_file_at_the_path_is_an_error(tmp_path, cache):
    fdcache, _ = cache
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"original")
    write(path + ".new", b"impostor")
    os.rename(path + ".new", path)     # another inode now has the path
    sha, why = fdcache.sha256(0, dev, ino, path)
    assert sha == "" and f"not the executable the kernel reported (device {dev:#x} inode {ino})" in why


def test_the_device_check_honours_the_mask(tmp_path):
    path = str(tmp_path / "prog")
    dev, ino = write(path, b"x")
    fd, why = picosnitch.open_verified(0, dev + 1, ino, path, 0)
    assert fd >= 0 and why == ""
    os.close(fd)
    assert picosnitch.open_verified(0, dev + 1, ino, path, 0xFFFFFFFF)[0] == -1


def test_st_dev_mask_setting():
    assert picosnitch.st_dev_mask(picosnitch.Config(set_st_dev_mask=0)) == 0
    btrfs = any(line.split()[2] == "btrfs" for line in open("/proc/self/mounts") if len(line.split()) > 2)
    assert picosnitch.st_dev_mask(picosnitch.Config()) == (0 if btrfs else 0xFFFFFFFF)


def test_cache_is_bounded(tmp_path, cache):
    _, fan = cache
    small = picosnitch.FdCache(0xFFFFFFFF, 3, fan)
    for i in range(5):
        path = str(tmp_path / f"p{i}")
        dev, ino = write(path, str(i).encode())
        assert small.open(0, dev, ino, path) == ""
    assert len(small.entries) == 3


def test_overflow_forgets_every_hash(tmp_path, cache):
    fdcache, _ = cache
    paths = [str(tmp_path / name) for name in ("a", "b")]
    ids = [write(path, path.encode()) for path in paths]
    for (dev, ino), path in zip(ids, paths):
        fdcache.sha256(0, dev, ino, path)
    fdcache.invalidate(*picosnitch.Fanotify.OVERFLOW)
    assert all(entry[1] is None for entry in fdcache.entries.values())
