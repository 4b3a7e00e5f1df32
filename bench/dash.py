#!/usr/bin/env python3
"""The web UI at scale: `picosnitch dash` on a realistic log of millions of
rows (bench/loggen.py, as bench/log.py makes them), driven in headless
Chromium (Debian's chromium and chromium-driver, through selenium).

It reports the time until the first page is complete (chart and table
drawn), and for each interaction (grouping, range, history, a filter by a
click in the table, an exclusion, removing a filter, zoom, the drill-down,
units, smoothing, theme): the server's time (from the request to the first
byte of its answer, as the browser's resource timing sees it on loopback)
and the time until the page was drawn again.

usage: sudo /usr/bin/python3 bench/dash.py [--rows 10000000] [--keep DIR] [--report FILE]
"""
import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import loggen  # noqa: E402
import machine  # noqa: E402

PYTHON = "/usr/bin/python3"
SCRIPT = os.path.join(os.path.dirname(HERE), "picosnitch.py")
PORT = 5180
TARGETS = {"first": 2000, "server": 500, "page": 1000}      # ms

# the state of the page's requests, read in the browser
PENDING = """
const calls = performance.getEntriesByType('resource').filter(e => e.name.includes('_dash-update-component'));
return [calls.length, calls.filter(e => e.responseEnd === 0).length,
        document.querySelectorAll('[data-dash-is-loading="true"]').length];
"""
SERVER_TIMES = """
const calls = performance.getEntriesByType('resource').filter(e => e.name.includes('_dash-update-component'));
return calls.slice(arguments[0]).map(e => e.responseStart - e.requestStart);
"""
# the time of the page's last change, from now on (the chart and the table are
# drawn when their nodes change)
WATCH = """
if (!window.psWatch) {
    window.psWatch = new MutationObserver(() => { window.psLastChange = performance.now(); });
    window.psWatch.observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}
window.psLastChange = performance.now();
return window.psLastChange;
"""
# which plotly.js the page loaded: the basic bundle (README, The web UI) or Plotly's full one
PLOTLY_LOADED = "return performance.getEntriesByType('resource').map(e => e.name.split('?')[0].split('/').pop())" \
                ".filter(n => n.startsWith('plotly'));"
FRAMES = "const done = arguments[arguments.length - 1]; requestAnimationFrame(() => requestAnimationFrame(() => " \
         "done(performance.now())));"


def browser(width=1600, height=1100):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}",
                 # Chromium looks some of its servers up even so: nothing but loopback resolves
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                 "--proxy-server=127.0.0.1:9",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='ps-bench-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


class Page:
    """The dash page in Chromium, and how long each interaction takes."""

    def __init__(self, driver):
        self.d = driver

    def settled(self, calls_before, timeout=60.0) -> int:
        """Wait until new callbacks came back and nothing is loading; the number of calls."""
        deadline, quiet_since = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            calls, open_calls, loading = self.d.execute_script(PENDING)
            if calls > calls_before and not open_calls and not loading:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.15:       # no further callback followed
                    return calls
            else:
                quiet_since = None
            time.sleep(0.01)
        raise TimeoutError("the page did not settle")

    def first(self, url: str) -> float:
        """ms from navigation to a complete page (chart and table drawn)."""
        self.d.get(url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = self.d.execute_script("return document.querySelectorAll('#graph .scatterlayer .trace').length > 0 "
                                          "&& document.querySelectorAll('#table td').length > 0")
            if ready:
                break
            time.sleep(0.02)
        self.settled(0)
        return self.d.execute_async_script(FRAMES) - 150      # (less the quiet time settled waits for)

    def interact(self, action) -> typing.Tuple[float, float, int]:
        """(server ms, page ms, calls) of one interaction: the slowest of its
        calls to the server, and from the action until the last change of the
        page it led to."""
        calls = self.d.execute_script(PENDING)[0]
        began = self.d.execute_script(WATCH)
        action(self.d)
        after = self.settled(calls)
        drawn = self.d.execute_script("return window.psLastChange;")
        server = max(self.d.execute_script(SERVER_TIMES, calls), default=0.0)
        return server, drawn - began, after - calls


def choose(control: str, label: str):
    """Pick an option of a dropdown by its label."""
    def act(d):
        from selenium.webdriver.common.by import By
        d.find_element(By.ID, control).click()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [o for o in d.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option")
                     if o.get_attribute("textContent").strip() == label]
            if found:       # (in a list that may need scrolling first)
                d.execute_script("arguments[0].scrollIntoView({block: 'nearest'}); arguments[0].click();", found[0])
                return
            time.sleep(0.02)
        raise LookupError(f"{control}: no option {label}")
    return act


def click(selector: str, index: int = 0):
    def act(d):
        from selenium.webdriver.common.by import By
        d.find_elements(By.CSS_SELECTOR, selector)[index].click()
    return act


ZOOM = """
const graph = document.getElementById('graph').querySelector('.js-plotly-plot');
const x = graph.layout.xaxis.range;
const a = new Date(x[0]).getTime(), b = new Date(x[1]).getTime();
const t = v => new Date(v).toISOString().slice(0, 19).replace('T', ' ');
Plotly.relayout(graph, {'xaxis.range[0]': t(a + (b - a) * 0.4), 'xaxis.range[1]': t(a + (b - a) * 0.6)});
"""


def exclusion(d):
    """≠ and the first value offered, then "add filter" (the click measured is the last)."""
    from selenium.webdriver.common.by import By
    d.find_element(By.CSS_SELECTOR, "#add-mode input[value='!']").click()
    d.find_element(By.ID, "add-value").click()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        options = d.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option")
        if options:
            d.execute_script("arguments[0].click();", options[0])
            break
        time.sleep(0.02)
    d.find_element(By.ID, "add-filter").click()


SESSION = [
    ("group: domain", choose("group", "domain")), ("group: remote address", choose("group", "remote address")),
    ("group: local port", choose("group", "local port")), ("group: user", choose("group", "user")),
    ("group: executable", choose("group", "executable")),
    ("range: 1w", choose("range", "1w")), ("range: 30d", choose("range", "30d")), ("range: all", choose("range", "all")),
    ("range: 1h", choose("range", "1h")), ("range: 1d", choose("range", "1d")),
    ("older", click("#older")), ("older", click("#older")), ("newer", click("#newer")),
    ("filter: click an entry", click("#table td[data-dash-column=entry]")),
    ("group: domain (filtered)", choose("group", "domain")),
    ("exclusion", exclusion), ("remove a filter", click("#chips button", 1)),
    ("remove a filter", click("#chips button", 0)), ("group: executable", choose("group", "executable")),
    ("zoom", lambda d: d.execute_script(ZOOM)),
    ("drill-down", click("#table td[data-dash-column=details]")), ("close the drill-down", click("#detail button")),
    ("range: 30d", choose("range", "30d")), ("drill-down (30d)", click("#table td[data-dash-column=details]")),
    ("close the drill-down", click("#detail button")),
    ("units: bits", click("#units input[value=bits]")), ("smooth", click("#smooth input")),
    ("theme: dark", click("#theme input[value=dark]")),
]


def serve(home: str):
    """picosnitch dash on the log in home's state directory: the process and
    the address it printed (with its token)."""
    proc = subprocess.Popen([PYTHON, SCRIPT, "dash"], env=dict(os.environ, HOME=home, PORT=str(PORT),
                                                              STATE_DIRECTORY=os.path.join(home, "state")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    found = re.search(r" on (http://\S+\?token=\S+) ", line)
    if not found:
        raise RuntimeError(f"picosnitch dash did not start: {line}{proc.stderr.read()}")
    return proc, found.group(1)


def make_home(log: str) -> str:
    home = tempfile.mkdtemp(prefix="ps-bench-dash-")
    directory = os.path.join(home, ".config", "picosnitch")
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write('{"GeoIP lookup": false}')
    os.makedirs(os.path.join(home, "state"))
    os.symlink(log, os.path.join(home, "state", "snitch.db"))
    return home


def run(log: str, rows: int):
    home = make_home(log)
    (server, address), d = serve(home), browser()
    try:
        page = Page(d)
        first = page.first(address)         # (as a user opens it: with the token, which sets a cookie, then the page)
        bundle = ", ".join(d.execute_script(PLOTLY_LOADED)) or "none"
        results = []
        for name, action in SESSION:
            results.append((name, *page.interact(action)))
            print(f"  {name}: server {results[-1][1]:.0f} ms, page {results[-1][2]:.0f} ms", flush=True)
        reload_first = page.first(d.current_url)
    finally:
        d.quit()
        server.send_signal(signal.SIGINT)
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    return first, reload_first, results, bundle


def report(rows: int, first: float, reload_first: float, results, bundle: str) -> list:
    lines = [f"## {rows:,} rows", "",
             f"- first page complete: **{first:.0f} ms** (target ≤ {TARGETS['first']}); the last view reloaded "
             f"from its address: {reload_first:.0f} ms; the page's plotly.js: {bundle}", "",
             "| interaction | server ms | page ms | calls |", "|---|---|---|---|"]
    lines += [f"| {name} | {server:.0f} | {page:.0f} | {calls} |" for name, server, page, calls in results]
    worst_server = max(results, key=lambda r: r[1])
    worst_page = max(results, key=lambda r: r[2])
    met = sum(1 for _, s, p, _ in results if s <= TARGETS["server"] and p <= TARGETS["page"])
    lines += ["", f"- {met} of {len(results)} interactions within {TARGETS['server']} ms in the server and "
                  f"{TARGETS['page']} ms to the page; slowest in the server: {worst_server[0]} "
                  f"({worst_server[1]:.0f} ms); slowest to the page: {worst_page[0]} ({worst_page[2]:.0f} ms)", ""]
    summary = (f"{rows:,} rows: first page {first:.0f} ms; server max {worst_server[1]:.0f} ms "
               f"({worst_server[0]}); page max {worst_page[2]:.0f} ms ({worst_page[0]}); "
               f"{met}/{len(results)} interactions within targets")
    return lines, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10000000", help="sizes of the generated logs, comma separated")
    parser.add_argument("--keep", help="keep (and reuse) the generated logs in this directory (as bench/log.py)")
    parser.add_argument("--report", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    workdir = args.keep or tempfile.mkdtemp(prefix="ps-bench-dash-")
    os.makedirs(workdir, exist_ok=True)
    out = [f"# picosnitch dash at scale ({datetime.date.today()}, kernel {os.uname().release}, "
           f"{subprocess.run(['/usr/bin/chromium', '--version'], capture_output=True, text=True).stdout.strip()})", "",
           *machine.describe(), ""]
    summaries = []
    try:
        for rows in [int(r) for r in args.rows.split(",")]:
            log = loggen.kept_log(workdir, rows)
            first, reload_first, results, bundle = run(log, rows)
            lines, summary = report(rows, first, reload_first, results, bundle)
            out += lines
            summaries.append(summary)
            print("\n".join(lines), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out += ["Summary: " + "; ".join(summaries) + f"; on {machine.summary()}"]
    print(out[-1])
    if args.report:
        with open(args.report, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
