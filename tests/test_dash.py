"""The web UI, without a browser: the view kept in the address,
the chart's buckets, the chart, table and drill-down data checked against
sums computed from the rows, the request guard through Flask's test
client, and `picosnitch dash` itself over real HTTP (the loopback-only
binding, a foreign Host header, the token on loopback and off it). The
live tab: its tables, chart and feed from a LiveState fed known events,
and the thread that follows a real Unix socket serving the stream's
lines, as it ends and comes back."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

import loggen
import picosnitch
from conftest import PYTHON, SCRIPT
from test_log import NOW, brute, value

F = picosnitch.Filter


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    """A realistic log of 3 days up to NOW, with some rows whose ports were not logged."""
    path = str(tmp_path_factory.mktemp("dash") / "snitch.db")
    log = picosnitch.Log.open(path)
    log.insert(list(loggen.rows(loggen.World(5, exes=40, domains=150), 4000, 3, end=NOW)))
    log.insert([(picosnitch.time.strftime(picosnitch.TIME_FORMAT, picosnitch.time.gmtime(NOW - 50 * i)), 7, 9,
                 "/opt/odd name", "odd", "", "", "", "", "", "", None, None, None, "", "", "", "udp", "", "", "",
                 "") for i in range(3)])
    log.close()
    return path


@pytest.fixture(scope="module")
def query(log_path):
    q = picosnitch.LogQuery(log_path)
    q.refresh()
    yield q
    q.close()


@pytest.fixture(scope="module")
def rows(log_path):
    return picosnitch.db_rows(log_path)


def test_the_address_keeps_the_whole_view():
    state = picosnitch.DashState(group="raddr", range="custom", start=NOW - 7200, end=NOW, units="bits", smooth=True,
                                 refresh=15, theme="dark", detail="/usr/bin/curl", view="live",
                                 filters=[("exe", "/usr/bin/a b&c=d", False), ("lport", None, True), ("uid", 1000, False),
                                          ("exe", b"/opt/bad\xffname", True), ("domain", "", False)])
    query = picosnitch.dash_query(state)
    assert query.startswith("?") and " " not in query and "\xff" not in query
    assert picosnitch.dash_state(query) == (state, [])
    assert picosnitch.dash_query(picosnitch.DashState()) == ""
    preset = picosnitch.DashState(range="1w", offset=3)
    assert picosnitch.dash_state(picosnitch.dash_query(preset)) == (preset, [])


def test_an_address_with_parts_it_does_not_understand_keeps_the_rest():
    state, problems = picosnitch.dash_state("?g=nonsense&r=1h&f=exe=zzz&f=nocolumn=s1&o=-2&u=bits&t=pink&x=1")
    assert (state.group, state.range, state.units, state.filters, state.offset) == ("exe", "1h", "bits", [], 0)
    assert problems == ["g=nonsense", "f=exe=zzz", "f=nocolumn=s1", "o=-2", "t=pink", "x=1"]
    state, problems = picosnitch.dash_state("?from=2026-11-29T10:00:00&to=2026-11-29T09:00:00")
    assert state.range == picosnitch.DASH_DEFAULT_RANGE and problems == ["from/to: not a time range"]


def test_time_ranges_and_buckets_keep_the_chart_small():
    for name, seconds in picosnitch.DASH_RANGES:
        state = picosnitch.DashState(range=name)
        start, end = picosnitch.dash_span(state, NOW)
        if not seconds:
            assert (start, end) == (None, None)
            continue
        assert (start, end) == (NOW + 1 - seconds, NOW + 1)
        bucket = picosnitch.dash_bucket(start, end - 1)
        assert seconds / bucket <= picosnitch.DASH_POINTS, name
        assert seconds <= picosnitch.DASH_ROWS_SPAN or bucket % 3600 == 0, name      # longer ranges: the rollups
    older = picosnitch.DashState(range="1h", offset=2)
    assert picosnitch.dash_span(older, NOW) == (NOW + 1 - 3 * 3600, NOW + 1 - 2 * 3600)
    assert picosnitch.dash_bucket(0, 10 * 365 * 86400) == 28 * 86400           # 131 points
    assert picosnitch.dash_bucket(0, 500 * 365 * 86400) == picosnitch.DASH_BUCKETS[-1]


@pytest.mark.parametrize("group", ["exe", "domain", "raddr", "lport", "uid"])
def test_the_chart_and_the_table_hold_exactly_what_the_rows_say(query, rows, group):
    exe = max(brute(rows, "exe").items(), key=lambda kv: kv[1][2])[0]
    for filters, rng in [([], "1d"), ([("exe", exe, False)], "1w"), ([("lport", None, True)], "all"),
                         ([("exe", exe, True)], "6h")]:
        state = picosnitch.DashState(group=group, filters=filters, range=rng)
        start, end = picosnitch.dash_span(state, NOW)
        chain = [F(c, v, x) for c, v, x in filters]
        expected = brute(rows, group, chain, start, end)
        data = picosnitch.dash_data(query, state, NOW)
        assert {value(v): (s, r, n) for v, s, r, n in data["entries"]} == expected
        bucket = data["bucket"]
        per_time = brute(rows, "time", chain, start, end, bucket)
        top = [v for v, *_ in data["entries"][:picosnitch.DASH_TRACES]]
        charted = {t: [0, 0] for t in per_time}
        for key in top:
            mine = brute(rows, "time", [*chain, F(group, key)], start, end, bucket)
            assert {t: [s, r] for t, (s, r, n) in mine.items()} == data["series"].get(key, {}), (group, key)
            for t, (s, r, n) in mine.items():
                charted[t][0] += s
                charted[t][1] += r
        if len(data["entries"]) > picosnitch.DASH_TRACES:       # the others: all but the charted entries
            assert {t: v for t, v in data["others"].items() if v != [0, 0]} == \
                {t: [s - charted[t][0], r - charted[t][1]] for t, (s, r, n) in per_time.items()
                 if [s - charted[t][0], r - charted[t][1]] != [0, 0]}

        labels = picosnitch.Labels(None)
        figure = picosnitch.dash_figure(data, state, labels)
        sent = [t for t in figure["data"] if t["yaxis"] == "y"]
        assert len(sent) == min(len(data["entries"]), picosnitch.DASH_TRACES) + bool(data["others"])
        assert len(sent[0]["x"]) <= picosnitch.DASH_POINTS + 1
        for trace, (key, s, r, n) in zip(sent, data["entries"][:picosnitch.DASH_TRACES]):
            assert trace["meta"] == labels.text(group, key) and sum(trace["customdata"]) == s
        columns, table, tips = picosnitch.dash_table_rows(data, state, labels)
        assert [(r["entry"], r["sent"], r["received"], r["rows"]) for r in table] == \
            [(labels.text(group, v), s, r, n) for v, s, r, n in data["entries"][:picosnitch.DASH_TABLE_ROWS]]
        assert all(picosnitch.decode_value(r["key"]) == value(v) for r, (v, *_) in zip(table, data["entries"]))
        assert tips[0]["sent"]["value"] == f"{table[0]['sent']:,} bytes"


def test_bits_and_smoothing_change_the_picture_not_the_amounts(query):
    state = picosnitch.DashState(range="1w", units="bits", smooth=True)
    data = picosnitch.dash_data(query, state, NOW)
    figure = picosnitch.dash_figure(data, state, picosnitch.Labels(None))
    trace = figure["data"][0]
    sent = data["entries"][0][1]
    assert sum(trace["customdata"]) == 8 * sent and trace["y"] != trace["customdata"]
    assert abs(sum(trace["y"]) - sum(trace["customdata"])) < 0.25 * sum(trace["customdata"])
    assert "bits" in figure["layout"]["yaxis"]["title"]["text"] and "%{customdata:,} bits" in trace["hovertemplate"]
    _, table, tips = picosnitch.dash_table_rows(data, state, picosnitch.Labels(None))
    assert table[0]["sent"] == 8 * sent and tips[0]["sent"]["value"] == f"{8 * sent:,} bits"


def test_the_drill_down_of_one_executable(query, rows, tmp_path):
    exe = max(brute(rows, "exe").items(), key=lambda kv: kv[1][2])[0]
    mine = [r for r in rows if r["exe"] == exe]
    shas = sorted({r["sha256"] for r in mine})
    record = {"Executables": {exe: ["one", "two"]}, "SHA256": {exe: {shas[0]: "VirusTotal: 0 of 70 engines"}}}
    state = picosnitch.DashState(range="all")
    found = picosnitch.dash_detail(query, record, exe, state, NOW, picosnitch.Labels(None))
    times = sorted(picosnitch.local_seconds(r["contime"]) for r in mine)
    text = lambda t: picosnitch.time.strftime(picosnitch.TIME_FORMAT, picosnitch.time.gmtime(t))
    assert (found["exe"], found["names"], found["first"], found["last"]) == (exe, ["one", "two"], text(times[0]),
                                                                          text(times[-1]))
    assert found["hashes"][0][:2] == (shas[0], "VirusTotal: 0 of 70 engines")
    assert {h[0] for h in found["hashes"]} == set(shas) and all(h[1] == "" for h in found["hashes"][1:])
    parents = brute(rows, "pexe", [F("exe", exe)])
    assert [(p, s, r) for p, s, r in found["parents"]] == \
        sorted(((p, s, r) for p, (s, r, n) in parents.items()), key=lambda x: -(x[1] + x[2]))[:len(found["parents"])]
    newest = sorted(mine, key=lambda r: r["contime"], reverse=True)[:picosnitch.DASH_DETAIL_ROWS]
    assert [c["time"] for c in found["latest"]] == [r["contime"] for r in newest]
    assert picosnitch.read_record(str(tmp_path / "none.json")) == ({s: {} for s in picosnitch.RECORD_SECTIONS}, "")
    (tmp_path / "bad.json").write_text('{"SHA256": []}')
    assert "could not be read" in picosnitch.read_record(str(tmp_path / "bad.json"))[1]
    assert (tmp_path / "bad.json").read_text() == '{"SHA256": []}'       # left as it is


def test_the_filter_bar_offers_the_largest_values_or_those_typed():
    entries = [(40000 + i, 1000 - i, 0, 1) for i in range(picosnitch.DASH_OPTIONS + 30)]
    labels = picosnitch.Labels(None)
    values = lambda offered: [o["value"] for o in offered]
    largest = picosnitch.dash_options("lport", entries, labels)
    assert values(largest) == [f"i{40000 + i}" for i in range(picosnitch.DASH_OPTIONS)]
    assert values(picosnitch.dash_options("lport", entries, labels, "4007")) == ["i40070", "i40071", "i40072",
                                                                                  "i40073", "i40074", "i40075",
                                                                                  "i40076", "i40077", "i40078",
                                                                                  "i40079"]
    last = f"i{40000 + len(entries) - 1}"      # chosen earlier: still offered, whatever is typed
    assert values(picosnitch.dash_options("lport", entries, labels, "40001", last)) == ["i40001", last]
    assert values(picosnitch.dash_options("lport", entries, labels, "no such port")) == []


def test_addresses_are_labelled_with_their_place():
    labels = picosnitch.Labels(None)
    assert [labels.text("raddr", a) for a in ("10.1.2.3", "192.168.0.9", "fd00::1", "::ffff:172.16.0.1", "8.8.8.8",
                                               "192.0.2.7", "")] == \
        ["10.1.2.3 (private)", "192.168.0.9 (private)", "fd00::1 (private)", "::ffff:172.16.0.1 (private)", "8.8.8.8",
         "192.0.2.7", "(none)"]
    assert labels.text("uid", 0) == "root (0)" and labels.text("lport", None) == "(not logged)"


def guarded_app(tmp_path, host, port, token="", geoip=False):
    (tmp_path / "config.json").write_text(json.dumps({"GeoIP lookup": geoip}))
    return picosnitch.dash_app(str(tmp_path), picosnitch.load_config(str(tmp_path), create=False),
                               picosnitch.DashGuard(host, port, token))


def test_the_guard_answers_only_for_the_address_served(tmp_path):
    client = guarded_app(tmp_path, "127.0.0.1", 5100).server.test_client()
    for host in ("localhost:5100", "127.0.0.1:5100", "[::1]:5100", "LOCALHOST:5100"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:5100", "localhost:5101", "127.0.0.1", "attacker.localhost.example.org:5100"):
        answer = client.get("/", headers={"Host": host})
        assert answer.status_code == 403 and b"answers only for" in answer.data, host
    assert client.post("/_dash-update-component", headers={"Host": "rebound.example:5100"}, json={}).status_code == 403


def test_the_plotly_basic_bundle_is_used_only_when_it_is_the_one_expected(tmp_path, monkeypatch):
    bundle = b"/* a plotly.js basic bundle */"
    monkeypatch.setattr(picosnitch, "DASH_PLOTLY_BASIC", ("9.8.7", picosnitch.hashlib.sha256(bundle).hexdigest()))
    missing, other, right = (str(tmp_path / name) for name in ("missing.js", "other.js", "right.js"))
    (tmp_path / "other.js").write_bytes(bundle + b"alert(1)")
    (tmp_path / "right.js").write_bytes(bundle)
    assert picosnitch.dash_plotly_basic([missing, other, right], "9.8.7") == bundle
    assert picosnitch.dash_plotly_basic([missing, other], "9.8.7") is None
    assert picosnitch.dash_plotly_basic([right], "9.8.8") is None       # Plotly's own is of another release

    # served, guarded, and run before Dash's scripts: dcc.Graph draws with it
    monkeypatch.setattr(picosnitch, "DASH_PLOTLY_PATHS", [missing, right])
    from plotly.offline import get_plotlyjs_version
    monkeypatch.setattr(picosnitch, "DASH_PLOTLY_BASIC", (get_plotlyjs_version(), picosnitch.DASH_PLOTLY_BASIC[1]))
    client = guarded_app(tmp_path, "127.0.0.1", 5100).server.test_client()
    page = client.get("/", headers={"Host": "localhost:5100"}).data.decode()
    url = f"/_picosnitch/plotly-basic-{get_plotlyjs_version()}.min.js"
    assert page.index(f'<script src="{url}"></script>') < page.index("/_dash-component-suites/")
    assert client.get(url, headers={"Host": "localhost:5100"}).data == bundle
    assert client.get(url, headers={"Host": "evil.example:5100"}).status_code == 403
    monkeypatch.setattr(picosnitch, "DASH_PLOTLY_PATHS", [other])
    page = guarded_app(tmp_path, "127.0.0.1", 5100).server.test_client().get("/", headers={"Host": "localhost:5100"})
    assert b"plotly-basic" not in page.data and b"<!--plotly-->" not in page.data


def test_off_loopback_every_request_needs_the_token(tmp_path):
    app = guarded_app(tmp_path, "0.0.0.0", 5100, "s3cret-token")
    client = app.server.test_client()
    assert client.get("/", headers={"Host": "192.0.2.1:5100"}).status_code == 403
    assert client.get("/?token=wrong", headers={"Host": "192.0.2.1:5100"}).status_code == 403
    given = client.get("/?g=domain&token=s3cret-token", headers={"Host": "192.0.2.1:5100"})
    prefix = given.headers["Location"][:-len("?g=domain")]
    assert given.status_code == 302 and re.fullmatch(r"/[A-Za-z0-9_-]{20,}/", prefix), given.headers["Location"]
    cookie = given.headers["Set-Cookie"]
    assert cookie.startswith(f"{picosnitch.DASH_COOKIE}=s3cret-token") and "HttpOnly" in cookie and \
        "SameSite=Strict" in cookie and f"Path={prefix}" in cookie        # (sent to that path only)
    page = client.get(prefix, headers={"Host": "192.0.2.1:5100"})       # the cookie is kept
    assert page.status_code == 200 and page.headers["Referrer-Policy"] == "no-referrer"
    assert client.get("/", headers={"Host": "192.0.2.1:5100"}).status_code == 403          # (outside the path)
    stranger = app.server.test_client()
    assert stranger.get(f"{prefix}_dash-layout", headers={"Host": "192.0.2.1:5100"}).status_code == 403


class Served:
    """`picosnitch dash` as a process, until close()."""

    def __init__(self, home, **env):
        self.proc = subprocess.Popen([PYTHON, SCRIPT, "dash"], env=dict(os.environ, HOME=str(home), **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.line = self.proc.stdout.readline()

    def close(self):
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(20)


def listening(port):
    """The local addresses listening on a TCP port (from /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hexport = local.rsplit(":", 1)
                if state == "0A" and int(hexport, 16) == port:
                    found.add(address)
    return found


def get(port, path="/", host=None, address="127.0.0.1", headers=None):
    con = http.client.HTTPConnection(address, port, timeout=10)
    con.request("GET", path, headers={"Host": host or f"localhost:{port}", **(headers or {})})
    answer = con.getresponse()
    return answer.status, dict(answer.getheaders()), answer.read()


def test_picosnitch_dash_serves_loopback_only_by_default_and_asks_for_its_token(tmp_path, log_path):
    """Every local account reaches loopback: the token is asked there too."""
    home = tmp_path / "home"
    (home / ".config" / "picosnitch").mkdir(parents=True)
    (home / ".config" / "picosnitch" / "config.json").write_text('{"GeoIP lookup": false}')
    (tmp_path / "state").mkdir()
    os.link(log_path, tmp_path / "state" / "snitch.db")
    served = Served(home, PORT="5191", STATE_DIRECTORY=str(tmp_path / "state"))
    try:
        found = re.fullmatch(rf"picosnitch dash: serving {tmp_path}/state/snitch\.db on http://127\.0\.0\.1:5191/"
                             r"\?token=([A-Za-z0-9_-]{40,}) \(open that address: it sets a cookie; Ctrl-C stops it\)\n",
                             served.line)
        assert found, served.line
        assert listening(5191) == {"0100007F"}                  # 127.0.0.1 and nothing else
        status, _, body = get(5191)
        assert status == 403 and b"needs its token" in body and b"<title>" not in body
        status, headers, _ = get(5191, f"/?token={found.group(1)}")
        assert status == 302
        prefix, cookie = headers["Location"], {"Cookie": headers["Set-Cookie"].split(";")[0]}
        status, _, body = get(5191, prefix, headers=cookie)
        assert status == 200 and b"<title>picosnitch</title>" in body
        status, _, body = get(5191, prefix, host="evil.example:5191", headers=cookie)
        assert status == 403
        status, _, body = get(5191, f"{prefix}_dash-layout", headers=cookie)
        assert status == 200 and b'"id":"graph"' in body.replace(b" ", b"")
        assert get(5191, f"{prefix}_dash-layout")[0] == 403 and get(5191, "/_dash-layout", headers=cookie)[0] == 403
    finally:
        assert served.close() == 0


def test_off_loopback_the_token_is_printed_and_required(tmp_path):
    served = Served(tmp_path, HOST="0.0.0.0", PORT="5192")
    try:
        found = re.search(r"on http://0\.0\.0\.0:5192/\?token=([A-Za-z0-9_-]{40,}) ", served.line)
        assert found, served.line
        token = found.group(1)
        assert listening(5192) == {"00000000"}
        assert get(5192, host="192.0.2.1:5192")[0] == 403
        status, headers, _ = get(5192, f"/?token={token}", host="192.0.2.1:5192")
        prefix = headers["Location"]
        assert status == 302 and re.fullmatch(r"/[A-Za-z0-9_-]{20,}/", prefix)
        cookie = headers["Set-Cookie"].split(";")[0]
        assert get(5192, prefix, host="192.0.2.1:5192", headers={"Cookie": cookie})[0] == 200
        assert get(5192, prefix, host="192.0.2.1:5192", headers={"Cookie": cookie[:-2] + "xx"})[0] == 403
    finally:
        assert served.close() == 0


def test_a_bad_port_is_named():
    out = subprocess.run([PYTHON, SCRIPT, "dash"], env=dict(os.environ, HOME="/nonexistent", PORT="70000"),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "PORT must be a port number (1-65535), found '70000'" in out.stderr


def page_message(client):
    """The message line of the page as its first answer has it."""
    layout = json.loads(client.get("/_dash-dependencies", headers={"Host": "localhost:5100"}).data)
    update = next(d for d in layout if d["output"].startswith("..url.search"))
    inputs = [{"id": i["id"], "property": i["property"], "value": None} if not isinstance(i["id"], dict) else
              [] for i in update["inputs"]]
    state = [{"id": s["id"], "property": s["property"], "value": None} for s in update["state"]]
    body = {"output": update["output"], "outputs": [
        {"id": o.split(".")[0], "property": o.split(".")[1]} for o in update["output"].strip(".").split("...")],
        "inputs": inputs, "state": state, "changedPropIds": []}
    answer = client.post("/_dash-update-component", json=body, headers={"Host": "localhost:5100"})
    assert answer.status_code == 200, answer.data[:500]
    return json.loads(answer.data)["response"]["message"]["children"]


def test_the_page_says_what_is_wrong_with_a_missing_log(tmp_path):
    client = guarded_app(tmp_path, "127.0.0.1", 5100).server.test_client()
    assert page_message(client) == f"no connection log at {tmp_path}/snitch.db yet (is picosnitch running?)"


def test_without_a_geoip_database_the_page_says_so_in_one_short_sentence(tmp_path):
    client = guarded_app(tmp_path, "127.0.0.1", 5100, geoip=True).server.test_client()
    assert page_message(client).split(" · ") == [
        f"no connection log at {tmp_path}/snitch.db yet (is picosnitch running?)",
        "no GeoIP database yet; countries are not shown"]


def test_a_zoom_of_the_chart_is_a_time_range():
    assert picosnitch.dash_zoom({"xaxis.range[0]": "2026-11-29 10:00:00.5", "xaxis.range[1]": "2026-11-29 11:30:00"}) \
        == (picosnitch.dash_time("2026-11-29T10:00:00"), picosnitch.dash_time("2026-11-29T11:30:00") + 1)
    assert picosnitch.dash_zoom({"xaxis.range": ["2026-11-29 10:00", "2026-11-29 10:05"]}) is not None
    for other in ({"autosize": True}, {"xaxis.autorange": True}, None, {"xaxis.range": ["x", "y"]},
                  {"xaxis.range[0]": "2026-11-29 11:00:00", "xaxis.range[1]": "2026-11-29 10:00:00"}):
        assert picosnitch.dash_zoom(other) is None, other


def test_what_each_control_of_the_page_does_to_the_view():
    inputs = {"group": "domain", "range": "1d", "units": "bits", "smooth": ["smooth"], "refresh": 5, "theme": "dark",
              "start": None, "end": None, "add_column": "exe", "add_value": "s/usr/bin/curl", "add_mode": "!",
              "rows": [{"id": 0, "key": "sexample.com"}]}
    state = picosnitch.DashState()
    picosnitch.dash_change(state, "tick", 1, dict(inputs, group="raddr"))     # a refresh: the address alone counts
    assert state == picosnitch.DashState()
    picosnitch.dash_change(state, "add-filter", 1, inputs)
    assert (state.group, state.units, state.smooth, state.refresh, state.theme) == ("domain", "bits", True, 5, "dark")
    assert state.filters == [("exe", "/usr/bin/curl", True)]
    picosnitch.dash_change(state, "table", {"row_id": 0, "column_id": "domain"}, inputs)
    picosnitch.dash_change(state, "table", {"row_id": 0, "column_id": "details"}, inputs)
    assert state.filters[1] == ("domain", "example.com", False) and state.detail == "example.com"
    picosnitch.dash_change(state, {"type": "unfilter", "index": 0}, 1, inputs)
    picosnitch.dash_change(state, {"type": "close-detail", "index": 0}, 1, inputs)
    assert state.filters == [("domain", "example.com", False)] and state.detail is None
    picosnitch.dash_change(state, "older", 1, inputs)
    picosnitch.dash_change(state, "older", 1, inputs)
    picosnitch.dash_change(state, "newer", 1, inputs)
    assert state.offset == 1
    picosnitch.dash_change(state, "apply-range", 1, dict(inputs, start="2026-11-29T10:00:00", end="2026-11-29T10:59:59"))
    start = picosnitch.dash_time("2026-11-29T10:00:00")
    assert (state.range, state.start, state.end, state.offset) == ("custom", start, start + 3600, 0)
    picosnitch.dash_change(state, "newer", 1, dict(inputs, range="custom"))
    assert (state.start, state.end) == (start + 3600, start + 7200)
    shown = picosnitch.dash_control_values(state, start)
    assert [shown["from"], shown["to"]] == ["2026-11-29T11:00:00", "2026-11-29T11:59:59"]
    picosnitch.dash_change(state, "apply-range", 1, dict(inputs, range="custom", start="2026-11-29T10:00:00",
                                                         end="2026-11-29T09:00:00"))      # backwards: nothing
    assert state.start == start + 3600
    picosnitch.dash_change(state, "group", "1w", dict(inputs, range="1w"))
    assert (state.range, state.start, state.end) == ("1w", None, None)


# -- the live tab ------------------------------------------------------------------

T0 = 1_800_000_000.0


def conn(exe, name, pid, send, recv, raddr="192.0.2.1", rport=443, proto="tcp"):
    return {"exe": exe, "name": name, "pid": pid, "uid": 1000, "proto": proto, "laddr": "10.0.0.2", "lport": 40000,
            "raddr": raddr, "rport": rport, "domain": "", "send": send, "recv": recv}


HOSTILE = "/tmp/evil\x1b[31m\u202ename"       # (an escape sequence, a bidirectional control)
LIVE_EVENTS = [
    {"type": "hello", "time": T0},
    {"type": "executable", "time": T0, "exe": HOSTILE, "name": "evil", "pid": 7, "uid": 1000, "new": True},
    {"type": "tick", "time": T0 + 1, "conns": [conn("/usr/bin/curl", "curl", 5, 1000, 50_000),
                                               conn(HOSTILE, "evil", 7, 300, 0, "192.0.2.9", 53, "udp")],
     "exited": []},
    {"type": "tick", "time": T0 + 2, "conns": [conn("/usr/bin/curl", "curl", 5, 3000, 10_000),
                                               conn("/usr/bin/curl", "curl", 5, 10, 0, "192.0.2.2", 80)],
     "exited": [7]},
    {"type": "report", "time": T0 + 2.5, "log": "error.log", "text": "a problem with " + HOSTILE},
]


def fed_live():
    live = picosnitch.LiveState(picosnitch.Labels(None))
    for event in LIVE_EVENTS:
        live.take(json.loads(json.dumps(event)))
    return live


def test_the_live_tables_show_rates_totals_and_the_connections_of_the_program_chosen():
    live = fed_live()
    tables = picosnitch.dash_live_tables(live, 0, "", "/usr/bin/curl", "bytes")
    rows = {r["id"]: r for r in tables["rows"]}
    curl, evil = rows["/usr/bin/curl"], rows[HOSTILE]
    assert [r["id"] for r in tables["rows"]] == ["/usr/bin/curl", HOSTILE]       # the busiest first
    assert (curl["sent_bytes"], curl["received_bytes"], curl["mark"]) == (4010, 60_000, "")
    assert (curl["up"], curl["down"], curl["sent"]) == ("2.0 kB/s", "30.0 kB/s", "4.0 kB")     # (2 s of ticks)
    assert (evil["sent_bytes"], evil["mark"]) == (300, "NEW")    # new wins over gone: it says more
    assert evil["program"] == picosnitch.shown(f"evil ({HOSTILE})") and "\x1b" not in evil["program"]
    assert tables["tips"][0]["received"]["value"] == "60,000 bytes"
    assert tables["chosen_row"] == 0 and tables["heading"] == "connections of curl (/usr/bin/curl)"
    assert sorted((c["connection"], c["sent_bytes"]) for c in tables["connections"]) == \
        [("192.0.2.1:443 tcp", 4000), ("192.0.2.2:80 tcp", 10)]
    bits = picosnitch.dash_live_tables(live, 1, "evil", None, "bits")
    assert [r["sent"] for r in bits["rows"]] == ["2.4 kb"] and bits["connections"] == [] and bits["heading"] == ""
    assert picosnitch.dash_live_tables(live, 0, "", "/gone", "bytes")["heading"] == \
        "the program chosen is not listed now"


def test_the_live_chart_follows_the_last_minutes_and_the_feed_is_newest_first():
    live = fed_live()
    figure = picosnitch.dash_live_figure(live, picosnitch.DashState(), "")
    sent = [t for t in figure["data"] if t["yaxis"] == "y"]
    assert [t["name"] for t in sent] == ["all programs", "curl (/usr/bin/curl)",
                                         picosnitch.html.escape(picosnitch.shorten(picosnitch.shown(
                                             f"evil ({HOSTILE})")), quote=False)]
    assert sent[0]["y"] == [1300, 3010] and sent[1]["y"] == [1000, 3010] and sent[2]["y"] == [300, 0]
    assert figure["layout"]["xaxis"]["range"] == [picosnitch.dash_live_time(T0 + 2 - 60),      # (a minute at least)
                                                  picosnitch.dash_live_time(T0 + 2)]
    longer = picosnitch.LiveState(picosnitch.Labels(None))
    for t in range(400):
        longer.take({"type": "tick", "time": T0 + t, "conns": [], "exited": []})
    assert picosnitch.dash_live_figure(longer, picosnitch.DashState(), "")["layout"]["xaxis"]["range"][0] == \
        picosnitch.dash_live_time(T0 + 400 - picosnitch.LIVE_HISTORY)      # (what is kept: the last 300 ticks)
    assert "annotations" not in figure["layout"]
    only = picosnitch.dash_live_figure(live, picosnitch.DashState(), "", "CURL")
    assert [t["name"] for t in only["data"] if t["yaxis"] == "y"] == ["all programs", "curl (/usr/bin/curl)"]
    bits = picosnitch.dash_live_figure(live, picosnitch.DashState(units="bits"), "")
    assert bits["data"][0]["y"] == [10400, 24080] and "bits/s" in bits["layout"]["yaxis"]["title"]["text"]
    waiting = picosnitch.dash_live_figure(picosnitch.LiveState(picosnitch.Labels(None)), picosnitch.DashState(),
                                          "picosnitch is not running <b>")
    assert waiting["layout"]["annotations"][0]["text"] == "picosnitch is not running &lt;b&gt;"

    feed = picosnitch.dash_live_feed(live)
    assert [kind for _, kind, _ in feed] == ["error.log", "new program"]
    assert feed[0][2] == picosnitch.shown("a problem with " + HOSTILE) and "\u202e" not in feed[0][2]
    assert picosnitch.dash_live_status(live, "connected since 10:00:00").startswith(
        "connected since 10:00:00 · latest tick ")


def test_the_feed_leaves_out_the_connections_of_dash_and_of_its_page():
    own = lambda **event: picosnitch.dash_own_connection({"type": "connection", **event}, 4242, 5100)
    assert own(pid=4242, raddr="192.0.2.1", rport=443) and own(pid=1, raddr="127.0.0.1", rport=5100)
    assert own(pid=1, raddr="::1", rport=5100)
    assert not own(pid=1, raddr="192.0.2.1", rport=5100) and not own(pid=1, raddr="127.0.0.1", rport=5101)
    assert not picosnitch.dash_own_connection({"type": "executable", "pid": 4242}, 4242, 5100)


def serve_stream(path, lines):
    """A stream at path that sends lines to its first reader, then waits
    for the test to close it; (listener, the reader's end)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accepted = []

    def serve():
        sock, _ = listener.accept()
        sock.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        accepted.append(sock)
    threading.Thread(target=serve, daemon=True).start()
    return listener, accepted


def wait(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_live_thread_follows_the_stream_as_it_ends_and_comes_back(tmp_path, monkeypatch):
    monkeypatch.setattr(picosnitch, "DASH_LIVE_RETRY", 0.05)
    path = str(tmp_path / "events.sock")
    follower = picosnitch.DashLive(picosnitch.Labels(None), path)
    follower.start()
    wait(lambda: follower.status.startswith("picosnitch is not running"))
    listener, accepted = serve_stream(path, LIVE_EVENTS[:3])
    wait(lambda: follower.live.now == T0 + 1)
    assert follower.status.startswith("connected since ") and follower.taken >= 3
    accepted[0].close()
    listener.close()
    os.unlink(path)
    wait(lambda: follower.status.startswith("picosnitch is not running"))
    listener, accepted = serve_stream(path, [LIVE_EVENTS[3]])
    wait(lambda: follower.live.now == T0 + 2)
    with follower.lock:      # (totals since dash started: the earlier connection's too)
        curl = follower.live.sorted_flows("program", 0)[0]
    assert (curl.label, curl.sent) == ("curl (/usr/bin/curl)", 4010)
    accepted[0].sendall(b'{"type": "refused", "reason": "only root and someone may read it"}\n')
    wait(lambda: "refused this reader: only root and someone" in follower.status)
    listener.close()
