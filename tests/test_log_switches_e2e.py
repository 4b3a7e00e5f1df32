"""The Log switches, end to end: with "Log addresses", "Log commands" and
"Log ports" off, snitch.db and conn.log leave those fields empty."""
from conftest import PEER_NAMES, PEER_V4, Daemon, need_root, sha256_file, unique_python
from test_log_e2e import traffic


def test_log_switches_blank_addresses_commands_and_ports(tmp_path, peers, exe_dir):
    need_root()
    config = {"Log addresses": False, "Log commands": False, "Log ports": False, "DB text log": True}
    d = Daemon(str(tmp_path), config=config).start()
    try:
        exe = unique_python(exe_dir)
        traffic(exe, "tcp-up", PEER_V4, 2500)
        rows = d.wait_rows(exe=exe)
        assert sum(r["send"] for r in rows) == 2500 + len("up 2500\n")
        for r in rows:
            assert (r["cmdline"], r["pcmdline"], r["laddr"], r["raddr"], r["lport"], r["rport"]) == \
                ("", "", "", "", None, None)
            assert r["domain"] == PEER_NAMES[PEER_V4] and r["sha256"] == sha256_file(exe)
        lines = [line.split(",") for line in d.read("conn.log").splitlines() if f",{exe}," in line]
        assert lines and all(f[5] == "" and f[9] == "" and f[12:16] == ["", "", "", ""] for f in lines)
    finally:
        assert d.stop() == 0
