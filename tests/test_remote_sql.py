"""The remote copy of the log (RemoteWriter, among the primary's helpers) against real
PostgreSQL and MariaDB servers, through each of the four clients: rows arrive
in order, and a server that is down, paused or refusing loses nothing, stalls
nothing and is reported once, without the password."""
import subprocess
import time

import pytest

import picosnitch
from conftest import Reports, wait_for
from sqlservers import PASSWORD

CLIENTS = [("postgres", "psycopg"), ("postgres", "psycopg2"), ("mariadb", "mariadb"), ("mariadb", "pymysql")]


def rows(tag, n, start=0):
    return [(f"2026-11-21 10:00:{(start + i) % 60:02d}", start + i, 2 * (start + i), f"/opt/{tag}", tag, f"{tag} --x",
             "ab" * 32, "/bin/sh", "sh", "sh -c", "cd" * 32, 1000, 40000 + i, 443, "10.0.0.1", "10.0.0.2",
             "example.org", "tcp") for i in range(n)]


def remote_sends(server, table):
    try:
        return [int(r[0]) for r in server.query(f"SELECT send FROM {table} ORDER BY send")]
    except subprocess.CalledProcessError:     # no table yet
        return []




@pytest.fixture(params=CLIENTS, ids=[c for _, c in CLIENTS])
def server_client(request):
    server = request.getfixturevalue(request.param[0])
    return server, request.param[1]


def writer(tmp_path, settings):
    reports = Reports()
    w = picosnitch.RemoteWriter(settings, str(tmp_path), reports.reporter)
    w.reports = reports
    return w


def errors(w):
    return w.reports.errors()


def test_rows_arrive_in_order_in_the_named_table(tmp_path, server_client):
    server, client = server_client
    table = f"order_{client}"
    w = writer(tmp_path, server.settings(client, table_name=table))
    for start in range(0, 30, 10):
        w.put(rows(client, 10, start))
    assert wait_for(lambda: remote_sends(server, table) == list(range(30)))
    w.stop()
    got = server.query(f"SELECT contime, exe, cmdline, uid, lport, raddr, domain, proto FROM {table} WHERE send = 3")
    assert got == [["2026-11-21 10:00:03", f"/opt/{client}", f"{client} --x", "1000", "40003", "10.0.0.2",
                    "example.org", "tcp"]]
    assert errors(w) == []


def test_a_stopped_server_loses_nothing_and_is_reported_once(tmp_path, server_client):
    server, client = server_client
    table = f"down_{client}"
    w = writer(tmp_path, server.settings(client, table_name=table))
    w.put(rows(client, 5))
    assert wait_for(lambda: len(remote_sends(server, table)) == 5)
    server.stop()
    try:
        for start in range(5, 25, 5):     # four windows while the server is away
            w.put(rows(client, 5, start))
            time.sleep(1.5)
        assert len(errors(w)) == 1
        assert f"could not write to the SQL server ({client})" in errors(w)[0]
        assert PASSWORD not in w.reports.text()
    finally:
        server.start()
    assert wait_for(lambda: remote_sends(server, table) == list(range(25)))
    w.stop()
    assert len(errors(w)) == 1


def test_a_paused_server_never_stalls_the_caller(tmp_path, server_client):
    server, client = server_client
    table = f"paused_{client}"
    w = writer(tmp_path, server.settings(client, table_name=table))
    w.put(rows(client, 1))
    assert wait_for(lambda: len(remote_sends(server, table)) == 1)
    server.pause()
    try:
        began = time.monotonic()
        for start in range(1, 41, 10):
            w.put(rows(client, 10, start))
        blocked = time.monotonic() - began
    finally:
        server.resume()
    assert blocked < 5, f"put() waited {blocked:.1f} s on a paused server"
    assert wait_for(lambda: remote_sends(server, table) == list(range(41)))
    w.stop()


def test_refused_login_keeps_rows_for_the_next_start(tmp_path, server_client):
    server, client = server_client
    table = f"refused_{client}"
    settings = server.settings(client, table_name=table)
    bad = dict(settings, password="wrong-" + PASSWORD)
    w = writer(tmp_path, bad)
    w.put(rows(client, 3))
    w.put(rows(client, 3, 3))
    assert wait_for(lambda: len(errors(w)) == 1, 30)
    w.stop(timeout=2)
    log = w.reports.text()
    assert PASSWORD not in log and "wrong-" not in log
    queue = picosnitch.RowQueue(str(tmp_path / picosnitch.REMOTE_QUEUE_NAME))
    assert picosnitch.RowQueue.count(queue.open()) == 6
    w = writer(tmp_path, settings)      # fixed settings, next start: the kept rows go out first
    w.put(rows(client, 2, 6))
    assert wait_for(lambda: remote_sends(server, table) == list(range(8)))
    w.stop()
    assert picosnitch.RowQueue.count(queue.open()) == 0


def test_rows_the_server_refuses_are_left_out_without_holding_up_the_rest(tmp_path, server_client):
    server, client = server_client
    table = f"refused_rows_{client}"
    w = writer(tmp_path, server.settings(client, table_name=table))
    bad = [rows(client, 1, 5)[0][:12] + (10 ** 12,) + rows(client, 1, 5)[0][13:]]     # lport out of range
    w.put(rows(client, 2))
    w.put(bad)
    w.put(rows(client, 2, 2))
    assert wait_for(lambda: remote_sends(server, table) == [0, 1, 2, 3])
    w.stop()
    assert len(errors(w)) == 1 and f"the SQL server ({client}) refused 1 rows" in errors(w)[0]
