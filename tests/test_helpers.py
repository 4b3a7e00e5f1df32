"""The primary's helpers: reverse names, VirusTotal against a
local server speaking its v3 API, GeoIP with a database built here and its
monthly download from a local server."""
import datetime
import gzip
import hashlib
import os
import time

import pytest

import mmdb
import picosnitch
from conftest import Reports, wait_for
from http_services import API_KEY, FLAG_MARK, FakeVirusTotal, FileServer, stats





def test_reverse_names_come_from_the_hosts_file_and_are_cached():
    names = picosnitch.ReverseNames()
    try:
        assert names.resolve(["127.0.0.1"], 5.0) == {"127.0.0.1": "localhost"}
        assert names.cache["127.0.0.1"][0] == "localhost"
        began = time.monotonic()
        assert names.resolve(["127.0.0.1"], 5.0) == {"127.0.0.1": "localhost"}
        assert time.monotonic() - began < 0.05 and not names.pending
    finally:
        names.close()


def test_reverse_names_wait_no_longer_than_the_budget():
    names = picosnitch.ReverseNames()
    release = []
    names.lookup = lambda addr: wait_for(lambda: release, 10) and "late.example"
    try:
        began = time.monotonic()
        assert names.resolve(["192.0.2.1"], 0.2) == {}
        assert time.monotonic() - began < 1.0
        release.append(1)
        assert wait_for(lambda: names.resolve(["192.0.2.1"], 0.1) == {"192.0.2.1": "late.example"})
    finally:
        names.close()


@pytest.fixture
def vt():
    server = FakeVirusTotal()
    yield server
    server.close()


def make_vt(tmp_path, vt, **settings):
    config = picosnitch.Config(vt_api_key=settings.pop("key", API_KEY), vt_api_address=vt.base,
                               vt_request_limit_seconds=settings.pop("limit", 0), **settings)
    reports = Reports()
    client = picosnitch.VirusTotal(config, reports.reporter)
    client.reports = reports
    return client


def collect(client, n, timeout=30):
    found = []
    wait_for(lambda: found.extend(client.results()) or len(found) >= n, timeout)
    return found


def test_known_hashes_get_verdicts_and_flags(tmp_path, vt):
    clean, bad = "11" * 32, "22" * 32
    vt.known = {clean: stats(harmless=3, undetected=60), bad: stats(malicious=4, suspicious=1)}
    client = make_vt(tmp_path, vt)
    client.ask("/usr/bin/clean", clean)
    client.ask("/usr/bin/bad", bad)
    client.ask("/usr/bin/clean", clean)           # asked once only
    found = collect(client, 2)
    assert sorted(found) == [("/usr/bin/bad", bad, "VirusTotal: 4 malicious, 1 suspicious, 0 harmless, 70 undetected", True),
                             ("/usr/bin/clean", clean, "VirusTotal: 0 malicious, 0 suspicious, 3 harmless, 60 undetected", False)]
    assert [r[2] for r in vt.server.requests] == [f"/api/v3/files/{clean}", f"/api/v3/files/{bad}"]
    assert all(r[3].get("x-apikey") == API_KEY for r in vt.server.requests)


def test_unknown_file_is_uploaded_only_when_allowed(tmp_path, vt):
    exe = tmp_path / "dropper"
    exe.write_bytes(b"\x7fELF" + FLAG_MARK + os.urandom(16))
    sha = hashlib.sha256(exe.read_bytes()).hexdigest()
    client = make_vt(tmp_path, vt)
    client.ask(str(exe), sha)
    assert collect(client, 1) == [(str(exe), sha, "VirusTotal: not known (file upload is off)", False)]
    assert not any(r[1] == "POST" for r in vt.server.requests)
    client = make_vt(tmp_path, vt, vt_file_upload=True)
    client.ask(str(exe), sha)
    found = collect(client, 2)
    assert found == [(str(exe), sha, picosnitch.VT_PENDING, False),
                     (str(exe), sha, "VirusTotal: 5 malicious, 0 suspicious, 0 harmless, 70 undetected", True)]
    assert vt.uploads[sha] == exe.read_bytes()


def test_a_changed_file_is_not_uploaded(tmp_path, vt):
    exe = tmp_path / "changed"
    exe.write_bytes(b"now")
    client = make_vt(tmp_path, vt, vt_file_upload=True)
    client.ask(str(exe), "33" * 32)
    assert collect(client, 1) == [(str(exe), "33" * 32, "VirusTotal: not known, not uploaded (the file has changed)", False)]
    assert vt.uploads == {}


def test_requests_respect_the_limit(tmp_path, vt):
    client = make_vt(tmp_path, vt, limit=0.4)
    for i in range(4):
        client.ask(f"/bin/x{i}", f"{i:02d}" * 32)
    collect(client, 4)
    times = [r[0] for r in vt.server.requests]
    assert len(times) == 4
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.39


def test_a_refused_key_is_reported_once_and_never_logged(tmp_path, vt):
    client = make_vt(tmp_path, vt, key="wrong-key-abcdef")
    client.ask("/bin/a", "44" * 32)
    client.ask("/bin/b", "55" * 32)
    assert wait_for(lambda: client.reports.errors())
    time.sleep(0.5)
    log = client.reports.text()
    assert log.count("VirusTotal refused the API key (HTTP 401)") == 1
    assert "wrong-key-abcdef" not in log and client.results() == []


def test_geoip_countries_from_a_database(tmp_path):
    path = tmp_path / picosnitch.GEOIP_NAME
    path.write_bytes(mmdb.build({"10.231.0.0/24": "DE", "fd31:5e::/64": "JP"}))
    said = []
    geo = picosnitch.GeoIP(str(path), said.append)
    assert [geo.country(a) for a in ("10.231.0.2", "fd31:5e::2", "192.0.2.1", "", "not an address")] == \
        ["DE", "JP", "", "", ""]
    assert said == []


def test_geoip_without_a_database_reports_once(tmp_path):
    said = []
    geo = picosnitch.GeoIP(str(tmp_path / "missing.mmdb"), said.append)
    assert [geo.country(a) for a in ("10.231.0.2", "fd31:5e::2")] == ["", ""]
    assert said == ["no GeoIP database yet; countries are not shown"]


def test_geoip_download_takes_this_month_or_the_last(tmp_path):
    raw = mmdb.build({"10.231.0.0/24": "DE"})
    files = FileServer({"/dbip-country-lite-2026-10.mmdb.gz": gzip.compress(raw), "/broken-2026-11.mmdb.gz": b"junk"})
    try:
        path = str(tmp_path / picosnitch.GEOIP_NAME)
        url = picosnitch.geoip_download(files.base + "/dbip-country-lite-{year}-{month}.mmdb.gz", path,
                                        datetime.date(2026, 11, 21))
        assert url.endswith("/dbip-country-lite-2026-10.mmdb.gz")
        assert picosnitch.GeoIP(path, print).country("10.231.0.9") == "DE"
        assert os.stat(path).st_mode & 0o777 == 0o640        # (the user reads it through the state's ACL)
        assert not picosnitch.geoip_stale(path, time.time())
        assert picosnitch.geoip_stale(path, time.time() + 32 * 24 * 3600)
        with pytest.raises(picosnitch.PicosnitchError, match="could not download the GeoIP database: .*broken-2026-11"):
            picosnitch.geoip_download(files.base + "/broken-{year}-{month}.mmdb.gz", path, datetime.date(2026, 11, 2))
        assert picosnitch.GeoIP(path, print).country("10.231.0.9") == "DE"     # the good file was kept
    finally:
        files.close()


def test_a_geoip_download_that_unpacks_too_big_is_refused(tmp_path, monkeypatch):
    """The address is a setting: a file that unpacks to more than a country
    database can be (a gzip bomb) is refused before it is all in memory."""
    monkeypatch.setattr(picosnitch, "GEOIP_MAX", 1 << 20)
    files = FileServer({"/bomb-2026-11.mmdb.gz": gzip.compress(b"\0" * (2 << 20)),
                        "/big-2026-11.mmdb": os.urandom((1 << 20) + 1)})
    try:
        path = str(tmp_path / picosnitch.GEOIP_NAME)
        for name in ("bomb-{year}-{month}.mmdb.gz", "big-{year}-{month}.mmdb"):
            with pytest.raises(picosnitch.PicosnitchError, match="ValueError: more than 1 MB"):
                picosnitch.geoip_download(f"{files.base}/{name}", path, datetime.date(2026, 11, 21))
        assert os.listdir(tmp_path) == []
    finally:
        files.close()
