"""config.json: defaults, creation, and refusal of bad files without touching them."""
import json
import os
import subprocess

import pytest

import picosnitch
from conftest import PYTHON, SCRIPT, new_state

SPEC_DEFAULTS = {
    "Connections per window": None,         # (picosnitch's own: the kernel's room for each window)
    "DB retention (days)": 30, "DB sql log": True, "DB sql server": {}, "DB text log": False,
    "DB write limit (seconds)": 10, "Dash scroll zoom": True, "Dash theme": "",
    "Desktop notifications": True, "Every exe (not just conns)": False, "GeoIP lookup": True,
    "Log addresses": True, "Log commands": True, "Log ignore": [], "Log ports": True,
    "Novelty settle days": 7, "Novelty volume factor": 5, "Novelty volume minimum (MB)": 100,   # (picosnitch's own)
    "Perf ring buffer (pages)": 256, "Set RLIMIT_NOFILE": None, "Set st_dev mask": None,
    "VT API key": "", "VT file upload": False, "VT request limit (seconds)": 15,
    "VT API address": "https://www.virustotal.com/api/v3",
    "GeoIP download address": "https://download.db-ip.com/free/dbip-country-lite-{year}-{month}.mmdb.gz",
}


def test_created_with_every_key_and_default(tmp_path):
    picosnitch.check_directory(str(tmp_path / "ps"), os.getuid())
    config = picosnitch.load_config(str(tmp_path / "ps"))
    with open(tmp_path / "ps" / "config.json") as f:
        assert json.load(f) == SPEC_DEFAULTS
    assert config == picosnitch.Config()
    assert os.stat(tmp_path / "ps" / "config.json").st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "ps").st_mode & 0o777 == 0o700


def test_values_become_typed_attributes():
    config = picosnitch.parse_config(json.dumps({"DB write limit (seconds)": 2.5, "Log ignore": [53, "org.example"],
                                                 "Set st_dev mask": 0}))
    assert (config.db_write_limit_seconds, config.log_ignore, config.set_st_dev_mask) == (2.5, [53, "org.example"], 0)
    assert config.db_retention_days == 30


BAD = [
    ('{"DB retention (days)": 30,\n "Log ports": true,,\n}', "line 2"),
    ('{"DB retention days": 30}', "unknown key 'DB retention days'"),
    ('{"Log ports": "yes"}', "'Log ports' must be true or false, found \"yes\""),
    ('{"DB retention (days)": true}', "'DB retention (days)' must be a whole number of days >= 0, found true"),
    ('{"Perf ring buffer (pages)": 100}', "'Perf ring buffer (pages)' must be a power of two up to 4096, found 100"),
    ('{"Perf ring buffer (pages)": 8192}', "'Perf ring buffer (pages)' must be a power of two up to 4096, found 8192"),
    ('{"Connections per window": 100}', "'Connections per window' must be a whole number from 256 to 4194304 or null"),
    ('{"Set RLIMIT_NOFILE": 4194304}', "'Set RLIMIT_NOFILE' must be a whole number from 1 to 1048576 or null"),
    ('{"DB write limit (seconds)": 0}', "'DB write limit (seconds)' must be a number of seconds from 0.1 to 3600"),
    ('{"Log ignore": [1.5]}', "'Log ignore' entry 1.5 is not a port (0-65535), sha256 hash, IP subnet or domain"),
    ('{"Log ignore": [70000]}', "'Log ignore' entry 70000 is not a port"),
    ('{"Log ignore": ["10.0.0.0/33"]}', "'Log ignore' entry \"10.0.0.0/33\" is not a port, sha256 hash, IP subnet"),
    ('{"Log ignore": ["not a domain!"]}', "'Log ignore' entry \"not a domain!\" is not a port"),
    ('{"Log ignore": ["53"]}', "'Log ignore' entry \"53\": write ports as numbers, without quotes"),
    ('{"Log ignore": ["10.1.2"]}', "'Log ignore' entry \"10.1.2\" is not a port"),
    ('{"DB sql server": {"host": "db"}}', "'DB sql server' needs \"client\": one of mariadb, psycopg, psycopg2, pymysql"),
    ('{"DB sql server": {"client": "pymysql", "table_name": "x; DROP TABLE y"}}',
     "table_name must be a plain SQL identifier (letters, digits, _), found \"x; DROP TABLE y\""),
    ('{"VT API address": "ftp://vt"}', "'VT API address' must be an http(s) address"),
    ('{"GeoIP download address": "https://x/{day}.mmdb"}', "'GeoIP download address' must be an http(s) address, where"),
    ('[1, 2]', "expected a JSON object of settings, found list"),
]


def test_ignore_rules_match_ports_hashes_domains_and_subnets():
    sha = "ab" * 32
    rules = picosnitch.ignore_rules([53, sha.upper(), "org.example", "10.1.0.0/16", "fd00::/8", "192.0.2.7"])
    match = lambda lport=40000, rport=443, sha="", domain="", raddr="": rules.match(lport, rport, sha, domain, raddr)
    assert match(rport=53) and match(lport=53) and not match()
    assert match(sha=sha) and not match(sha="cd" * 32)
    assert match(domain="example.org") and match(domain="www.EXAMPLE.org.") and not match(domain="badexample.org")
    assert match(raddr="10.1.200.3") and match(raddr="fd12::1") and match(raddr="192.0.2.7")
    assert not match(raddr="10.2.0.1") and not match(raddr="192.0.2.8") and not match(raddr="fe80::1")


@pytest.mark.parametrize("text,message", BAD)
def test_bad_config_is_refused_with_a_message(text, message):
    with pytest.raises(picosnitch.PicosnitchError) as e:
        picosnitch.parse_config(text)
    assert message in str(e.value)


@pytest.mark.parametrize("text,message", BAD + [(b"\xff\xfe{}", "not UTF-8 text")])
def test_daemon_refuses_bad_config_and_leaves_it_unchanged(tmp_path, text, message):
    if os.geteuid() != 0:
        pytest.skip("start-no-daemon needs root")
    directory = tmp_path / ".config" / "picosnitch"
    directory.mkdir(parents=True)
    raw = text if isinstance(text, bytes) else text.encode()
    (directory / "config.json").write_bytes(raw)
    before = os.stat(directory / "config.json")
    out = subprocess.run([PYTHON, SCRIPT, "start-no-daemon"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HOME=str(tmp_path), STATE_DIRECTORY=new_state()))     # (a first start)
    assert out.returncode == 1
    assert message in out.stderr and "config.json" in out.stderr
    assert (directory / "config.json").read_bytes() == raw
    assert os.stat(directory / "config.json").st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(directory)) == ["config.json"]


def test_the_readme_lists_every_setting_as_the_table_says():
    readme = open(os.path.join(os.path.dirname(SCRIPT), "README.md")).read()
    assert picosnitch.settings_text() in readme


def test_the_sql_client_takes_only_where_and_who_and_tls():
    """A parameter that loads a plugin or reads an option file would run
    with the rights of picosnitch's account: refused, by name."""
    for client, key in [("mariadb", "plugin_dir"), ("mariadb", "default_file"), ("pymysql", "read_default_file"),
                        ("pymysql", "local_infile"), ("psycopg2", "service"), ("psycopg", "options")]:
        with pytest.raises(picosnitch.PicosnitchError, match=f"'DB sql server' does not take '{key}' for {client}"):
            picosnitch.parse_config(json.dumps({"DB sql server": {"client": client, "host": "db", key: "x"}}))
    picosnitch.parse_config(json.dumps({"DB sql server": {"client": "psycopg2", "host": "db", "port": 5432,
                                                           "passfile": "~/.pgpass", "sslmode": "verify-full"}}))


def test_numbers_json_does_not_have_are_refused():
    for text in ('{"DB write limit (seconds)": Infinity}', '{"DB write limit (seconds)": NaN}',
                 '{"DB retention (days)": -Infinity}'):
        with pytest.raises(picosnitch.PicosnitchError, match="is not a number JSON has"):
            picosnitch.parse_config(text)
    with pytest.raises(picosnitch.PicosnitchError, match="from 0.1 to 3600"):
        picosnitch.parse_config('{"DB write limit (seconds)": 1e9}')


def test_one_loader_for_every_reader_of_the_settings(tmp_path):
    """The viewers read config.json as the daemon does, but never make it:
    bad UTF-8 is the same clear error for both."""
    directory = tmp_path / "ps"
    directory.mkdir()
    assert picosnitch.load_config(str(directory), create=False) == picosnitch.Config()
    assert not (directory / "config.json").exists()
    (directory / "config.json").write_bytes(b'{"DB retention (days)": 3, "x": "\xff"}')
    for create in (True, False):
        with pytest.raises(picosnitch.PicosnitchError, match=r"config.json: not UTF-8 text \(byte 33\)"):
            picosnitch.load_config(str(directory), create=create)


def test_settings_are_typed_as_the_table_says():
    fields = {f.name: f.type for f in picosnitch.dataclasses.fields(picosnitch.Config)}
    assert fields["db_retention_days"] is int and fields["db_write_limit_seconds"] is float
    assert fields["set_rlimit_nofile"] == picosnitch.typing.Optional[int] and fields["log_ignore"] is list
    assert len(fields) == len(picosnitch.SETTINGS)
