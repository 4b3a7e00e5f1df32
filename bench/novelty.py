#!/usr/bin/python3
"""What picosnitch's novelty rules (section 15) tell of a realistic desktop
month, whether they catch what they are for, and what they cost.

usage: /opt/picosnitch/bin/python3 bench/novelty.py [--days 30] [--rows 1000000,10000000] [--keep /var/tmp/pslogs]
                                                    [--report PATH] [--quick]

The month is generated (seeded) window by window, 10-s windows, and fed to
picosnitch's own Primary, in this process: its `window()` with the rows of
each window, a thread answering its hash requests as the monitor would (a
program's sha256 is that of its package version: an update replaces the
file, so a new inode and a new hash), the real public suffix list, and a
GeoIP database written here (tests/mmdb.py) that gives every /8 of IPv4, and
every /36 of 2001:db8::/32, a country by a fixed table: no download, no
network. Reverse lookups of unnamed addresses are answered with no name
(the resolver is not asked). Nothing is sent anywhere.

The desktop, of a user in Germany, on day and night (the machine stays on:
it backs up at night):

- a browser (firefox): visits while the user is at the desk (weekdays
  08:30-12:30, 13:30-18:00, some evenings; shorter weekends), one every
  minute and a half or so; 70% go to 60 regular sites (Zipf), the rest to a
  long tail of 2,500 sites, mostly new: new registrable domains every day.
  Each site loads its own hosts and a fixed set of 2 to 12 third parties
  (CDNs, fonts, analytics); CDN edges are in DE, NL, FR or AT, most others
  in the site's country (by its TLD, .com mostly US). TCP 443, QUIC (UDP
  443) to Google and Cloudflare, some port 80 (OCSP), a video now and then;
  push.services.mozilla.com while it is open. Updated once (day 13);
- a mail client (thunderbird: IMAP every 10 minutes, SMTP a few times a
  day, one update check a day) and a chat app (Signal, open day and night:
  a keep-alive every 30 s, attachments from its CDN; updated weekly, a new
  hash each time);
- updaters: apt (twice a day to deb.debian.org and security.debian.org,
  security updates some mornings, a point release of ~300 MB once), flatpak
  (its appstream daily, app updates weekly, a runtime of ~600 MB once),
  fwupdmgr (daily), gnome-software (ratings, daily);
- system daemons: systemd-timesyncd (NTP from debian.pool.ntp.org, a new
  server every few days, mostly in DE, sometimes a neighbour country),
  systemd-resolved (DNS to the router, with the browsing), NetworkManager's
  connectivity check (every 5 minutes, port 80), avahi (mDNS multicast),
  cupsd (a print job to the LAN printer a few times a week);
- dev tools on weekdays: git (github.com mostly, a new forge every week or
  so), ssh (github, a work server, a new host now and then), python3 (pip
  to PyPI, scripts to a few APIs, now and then a new one; it runs as
  "python3", "pip" and "pytest");
- a backup tool (restic): nightly at 02:00-02:30, an upload of about 40 MB
  (log-normal, sigma 0.4) to Backblaze B2 in NL; a check on Sundays that
  reads 500 MB back;
- rarely used programs: zoom (a weekly meeting), steam (installed on day
  21, a game of 3 GB), libreoffice (an update check when opened), curl;
- sshd: the user's Linux laptop or Mac logs in some evenings; its remote
  ports are those clients' ephemeral ports (the Mac's from 49152-65535, as
  macOS has them); an scp of a few hundred MB sometimes.

Held out (injected on the last days, never seen before): the backup tool
reaching its usual domain at an address in a new country (day 27), apt
reaching a new registrable domain (day 28), the backup uploading ten times
its usual (median) nightly upload (day 28), and a new sha256 of the backup
tool (day 29).

It reports: the novelty events and notifications (the notifier groups
events that come within 3 s into one; windows are 10 s apart, so one
notification per window with events) of each day; each anomaly, caught or
not; how many volume events each factor / minimum pair would have raised on
the month; the primary's added cost per 40-row window (building the
sightings and Baseline.observe) and its whole window with and without;
baseline.db's size per million rows; and build_baseline on the generated
logs of bench/loggen.py (1M and 10M rows, kept in --keep).
"""
import argparse
import collections
import datetime
import hashlib
import math
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]

import loggen  # noqa: E402
import machine  # noqa: E402
import mmdb  # noqa: E402
import picosnitch  # noqa: E402

DAY, HOUR, WINDOW, MB = picosnitch.DAY, picosnitch.HOUR, 10, 1_000_000
GROUP_SECONDS = 3           # the notifier's grouping of novelty events into one notification
TARGET_PER_DAY = 3
TARGET_COST_MS = 1.0
DEFAULT = picosnitch.Config()    # (the rule's defaults, as the report names them)
VOLUME_FACTORS = (3, 5, 10, 20)
VOLUME_MINIMA = (10, 50, 100, 500)
LAN, LAN6 = "192.168.1.", "fe80::"

# -- countries ----------------------------------------------------------------
# Every /8 of IPv4 but the private, loopback and documentation ones, and each
# /36 of 2001:db8::/32, is one country's: a fixed table, shuffled once.
COUNTRY_WEIGHTS = [("US", 70), ("DE", 16), ("NL", 10), ("GB", 10), ("FR", 9), ("CN", 9), ("JP", 8), ("RU", 7),
                   ("IE", 5), ("CA", 6), ("BR", 6), ("IN", 6), ("KR", 5), ("AU", 5), ("IT", 5), ("SG", 4), ("ES", 4),
                   ("AT", 3), ("CH", 3), ("SE", 3), ("PL", 3), ("CZ", 3), ("FI", 3), ("BE", 2), ("DK", 2), ("NO", 2)]
NO_COUNTRY = {0, 10, 100, 127, 169, 172, 192, 198, 203}


def country_table():
    """{first octet: country}, {/36 index of 2001:db8::/32: country}."""
    blocks = [b for b in range(1, 224) if b not in NO_COUNTRY]
    random.Random(20).shuffle(blocks)
    names = [c for c, w in COUNTRY_WEIGHTS for _ in range(w)]
    v4 = {b: names[i] if i < len(names) else "US" for i, b in enumerate(blocks)}
    v6 = {i: c for i, (c, _) in enumerate(COUNTRY_WEIGHTS[:16])}
    return v4, v6


V4_COUNTRY, V6_COUNTRY = country_table()
BLOCKS = collections.defaultdict(list)
for _block, _country in sorted(V4_COUNTRY.items()):
    BLOCKS[_country].append(_block)
V6_BLOCK = {c: i for i, c in V6_COUNTRY.items()}


def geoip_bytes():
    """The GeoIP database of that table (DB-IP's country lite layout)."""
    networks = {f"{b}.0.0.0/8": c for b, c in V4_COUNTRY.items()}
    networks.update({f"2001:db8:{i:x}000::/36": c for i, c in V6_COUNTRY.items()})
    return mmdb.build(networks)


def address(rng, country, v6=False):
    if v6 and country in V6_BLOCK:
        return f"2001:db8:{V6_BLOCK[country]:x}{rng.randrange(4096):03x}::{rng.randrange(1, 65536):x}"
    return f"{rng.choice(BLOCKS[country])}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def seeded(*parts):
    return random.Random(zlib.crc32("/".join(map(str, parts)).encode()))


EDGES = ("DE", "DE", "DE", "NL", "NL", "FR", "AT")        # a CDN's edges near the user
TLD_COUNTRY = {"de": "DE", "fr": "FR", "co.uk": "GB", "nl": "NL", "at": "AT", "ch": "CH", "jp": "JP", "ru": "RU",
               "com.br": "BR", "it": "IT", "es": "ES", "se": "SE", "pl": "PL", "eu": "DE", "io": "US", "com": "US",
               "org": "US", "net": "US", "dev": "US", "com.au": "AU", "ca": "CA", "cn": "CN", "in": "IN"}
CDN = {"cloudfront.net", "akamaihd.net", "fastly.net", "jsdelivr.net", "cloudflare.com", "gstatic.com",
       "googleapis.com", "googlevideo.com", "ytimg.com", "google.com", "youtube.com", "doubleclick.net",
       "googletagmanager.com", "google-analytics.com", "akamaized.net", "twimg.com", "fbcdn.net"}
HOST_COUNTRY = {"wikipedia.org": "NL", "wikimedia.org": "NL", "backblazeb2.com": "NL", "hetzner.com": "DE",
                "fastmail.com": "US", "signal.org": "US", "debian.org": "US", "flathub.org": "US",
                "ntp.org": None, "gnome.org": "US", "mozilla.org": "US", "mozilla.net": "US", "github.com": "US",
                "githubusercontent.com": "US", "pythonhosted.org": "US", "pypi.org": "US", "zoom.us": "US",
                "steampowered.com": "US", "steamcontent.com": "DE", "libreoffice.org": "DE", "fwupd.org": "US",
                "salsa.debian.org": "DE", "codeberg.org": "DE", "example-corp.de": "DE", "amazon.de": "IE",
                "spiegel.de": "DE"}


def site_country(host):
    labels = host.split(".")
    for n in (3, 2):
        if ".".join(labels[-n:]) in HOST_COUNTRY:
            return HOST_COUNTRY[".".join(labels[-n:])]
    if ".".join(labels[-2:]) in CDN:
        return seeded("edge", host).choice(EDGES)
    tld = ".".join(labels[-2:]) if ".".join(labels[-2:]) in TLD_COUNTRY else labels[-1]
    country = TLD_COUNTRY.get(tld, "US")
    return "US" if country == "US" or seeded("elsewhere", host).random() < 0.8 else seeded("c", host).choice(EDGES)


class Names:
    """Each host name's addresses: 1 to 4, fixed, in its country."""

    def __init__(self):
        self.known = {}

    def addresses(self, host):
        if host not in self.known:
            rng = seeded("addr", host)
            country = site_country(host)
            self.known[host] = [address(rng, country, v6=rng.random() < 0.3) for _ in range(rng.randint(1, 4))]
        return self.known[host]


# -- programs -----------------------------------------------------------------
def sha_of(exe, version):
    return hashlib.sha256(f"{exe} {version}".encode()).hexdigest()


class Program:
    """An executable, its updates (day -> version), parent and uid."""

    def __init__(self, key, exe, name, parent, updates=(), uid=1000):
        self.key, self.exe, self.name, self.parent, self.uid = key, exe, name, parent, uid
        self.updates = sorted(updates)      # [(local seconds, version)]

    def version(self, t):
        v = "1"
        for at, version in self.updates:
            if t >= at:
                v = version
        return v


class Desktop:
    """The month's plan: spans of connections bucketed into windows."""

    def __init__(self, start, days, seed=30):
        self.start, self.days, self.rng = start, days, random.Random(seed)
        self.windows = collections.defaultdict(dict)    # window index -> {conn key: [row fields]}
        self.names = Names()
        self.programs = {}
        self.injected = []          # (name, kind, t from, t to, exe, expected kinds)
        self.procs = {}             # (key, version, name) -> ProcInfo
        self.inodes = {}            # inode -> sha256
        self.sessions = {d: self.day_sessions(d) for d in range(days + 2)}

    # -- the shape of a day
    def weekday(self, day):
        return time.gmtime(self.start + day * DAY).tm_wday

    def day_sessions(self, day):
        rng = self.rng
        if self.weekday(day) < 5:
            blocks = [(8.5, 12.5), (13.5, 18.0)] + ([(20.0, 23.0)] if rng.random() < 0.6 else [])
        else:
            blocks = [(10.0, 13.0), (15.0, 18.0)] if rng.random() < 0.8 else [(11.0, 14.0)]
        t0 = self.start + day * DAY
        return [(t0 + int((a + rng.uniform(-0.4, 0.4)) * HOUR), t0 + int((b + rng.uniform(-0.4, 0.4)) * HOUR))
                for a, b in blocks]

    def in_session(self, t):
        return any(a <= t < b for a, b in self.sessions.get(int((t - self.start) // DAY), ()))

    def poisson(self, a, b, per_hour):
        """Times of a Poisson process between a and b."""
        t, found = a, []
        while True:
            t += self.rng.expovariate(per_hour / HOUR)
            if t >= b:
                return found
            found.append(t)

    # -- connections
    def add(self, program, t, host, rport, send, recv, windows=1, proto="tcp", addr=None, lport=None, name=None):
        """A connection from t over `windows` windows, its bytes spread over them."""
        rng = self.rng
        if addr is None:
            addr = rng.choice(self.names.addresses(host))
        if lport is None:
            lport = rng.randint(32768, 60999)
        first = int((t - self.start) // WINDOW)
        windows = max(1, int(windows))
        for w in range(first, first + windows):
            key = (program.key, name or program.name, proto, lport, addr, rport)
            row = self.windows[w].setdefault(key, [host or "", 0, 0])
            row[1] += int(send / windows)
            row[2] += int(recv / windows)

    def transfer(self, program, t, host, rport, send, recv, rate=5 * MB, **kw):
        """A transfer at about `rate` bytes a second."""
        self.add(program, t, host, rport, send, recv, windows=1 + (send + recv) / rate / WINDOW, **kw)

    def program(self, key, exe, name, parent, updates=(), uid=1000):
        p = self.programs[key] = Program(key, exe, name, parent, [(self.start + d * DAY + h * HOUR, v)
                                                                   for d, h, v in updates], uid)
        return p

    def proc(self, key, t, name):
        p = self.programs[key]
        version = p.version(t)
        found = self.procs.get((key, version, name))
        if found is None:
            ino = 1000 + len(self.inodes)
            self.inodes[ino] = sha_of(p.exe, version)
            parent = self.parent(p.parent)
            found = self.procs[(key, version, name)] = (picosnitch.ProcInfo(2000 + ino, p.exe, name, f"{name} --x", 1,
                                                                            ino), parent)
        return found

    def parent(self, exe):
        found = self.procs.get(("parent", exe))
        if found is None:
            ino = 1000 + len(self.inodes)
            self.inodes[ino] = sha_of(exe, "1")
            found = self.procs[("parent", exe)] = picosnitch.ProcInfo(1 if exe == "/usr/lib/systemd/systemd" else
                                                                      2000 + ino, exe, os.path.basename(exe)[:15],
                                                                      exe, 1, ino)
        return found

    def window_conns(self, w):
        """The window's Conn list (the reader's rows)."""
        t = self.start + w * WINDOW
        conns = []
        for (key, name, proto, lport, addr, rport), (host, send, recv) in self.windows[w].items():
            proc, parent = self.proc(key, t, name)
            laddr = "2001:db8:ffff::20" if ":" in addr and not addr.startswith("ff") else \
                "fe80::20" if ":" in addr else LAN + "20"
            conns.append(picosnitch.Conn(proc, parent, picosnitch.NO_PROC, self.programs[key].uid, proto, lport,
                                         rport, laddr, addr, host, max(send, 0), max(recv, 0)))
        return conns


SYSTEMD, SHELL = "/usr/lib/systemd/systemd", "/usr/bin/gnome-shell"
REGULAR = ["www.wikipedia.org", "github.com", "www.google.com", "www.youtube.com", "www.spiegel.de", "www.heise.de",
           "www.reddit.com", "stackoverflow.com", "news.ycombinator.com", "www.mozilla.org", "www.debian.org",
           "www.amazon.de", "lwn.net", "www.tagesschau.de", "www.zeit.de", "www.bbc.co.uk", "www.theguardian.com",
           "docs.python.org", "developer.mozilla.org", "www.golem.de", "www.netflix.com", "mail.google.com",
           "www.linkedin.com", "x.com", "www.twitch.tv", "www.dwd.de", "www.bahn.de", "www.dkb.de",
           "www.ebay.de", "www.kleinanzeigen.de", "www.openstreetmap.org", "www.arxiv.org", "www.nytimes.com",
           "www.imdb.com", "www.ikea.com", "www.idealo.de", "www.chefkoch.de", "www.leo.org", "www.deepl.com",
           "chat.openai.com", "www.notion.so", "www.figma.com", "gitlab.com", "pypi.org", "crates.io",
           "www.phoronix.com", "arstechnica.com", "www.theverge.com", "www.wetter.com", "www.kicker.de",
           "www.postbank.de", "www.paypal.com", "www.dropbox.com", "www.office.com", "web.whatsapp.com",
           "www.bild.de", "www.faz.net", "www.sueddeutsche.de", "www.duckduckgo.com", "www.wikimedia.org"]
THIRD = ["fonts.googleapis.com", "fonts.gstatic.com", "www.google-analytics.com", "www.googletagmanager.com",
         "ajax.googleapis.com", "cdn.jsdelivr.net", "cdnjs.cloudflare.com", "connect.facebook.net",
         "static.doubleclick.net", "securepubads.g.doubleclick.net", "a.akamaihd.net", "use.typekit.net",
         "js.stripe.com", "cdn.shopify.com", "www.recaptcha.net", "platform.twitter.com", "s3.amazonaws.com",
         "i.ytimg.com", "static.xx.fbcdn.net", "pbs.twimg.com", "cdn.cookielaw.org", "consent.cookiebot.com",
         "www.gstatic.com", "ocsp.digicert.com", "r3.o.lencr.org", "cdn.privacy-mgmt.com", "sdk.privacy-center.org",
         "assets.adobedtm.com", "script.hotjar.com", "widget.trustpilot.com", "cdn.optimizely.com",
         "static.cloudflareinsights.com", "bat.bing.com", "c.amazon-adsystem.com", "images-eu.ssl-images-amazon.com",
         "player.vimeo.com", "cdn.ampproject.org", "unpkg.com", "d2c8v52ll5s99u.cloudfront.net",
         "cdn.sstatic.net", "upload.wikimedia.org", "www.googleadservices.com"]
TAIL_TLDS = ["com"] * 50 + ["de"] * 15 + ["org"] * 8 + ["net"] * 5 + ["io"] * 4 + ["co.uk"] * 4 + ["fr"] * 3 + \
    ["nl"] * 2 + ["eu"] * 2 + ["ch", "at", "jp", "dev", "it", "es", "se", "pl", "ru", "com.au", "ca", "com.br"]
SYLLABLES = ["ka", "lo", "mi", "ra", "te", "sun", "vox", "net", "blo", "gra", "fi", "tech", "home", "shop", "bau",
             "wel", "ter", "kraft", "zen", "dat", "lab", "hub", "sky", "berg", "feld", "linu", "dev", "pix", "nova"]


def tail_sites(rng, n=2500):
    sites = set()
    while len(sites) < n:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) + rng.choice(["", "-", ""]) + \
            rng.choice(["", "blog", "news", "online", "24", "info"])
        sites.add(f"{rng.choice(['www.', '', 'www.'])}{word.strip('-')}.{rng.choice(TAIL_TLDS)}")
    return sorted(sites)


def plan_month(start, days, inject=True):
    """The desktop's month (and a day more, for the cost)."""
    d = Desktop(start, days)
    rng = d.rng
    prog = d.program
    ff = prog("firefox", "/usr/lib/firefox/firefox", "firefox", SHELL, [(13, 9.5, "2")])
    tb = prog("thunderbird", "/usr/lib/thunderbird/thunderbird", "thunderbird", SHELL, [(20, 9.2, "2")])
    sig = prog("signal", "/opt/Signal/signal-desktop", "signal-desktop", SHELL,
               [(day, 10.1, str(2 + i)) for i, day in enumerate(range(3, days + 1, 7))])
    apt = prog("apt", "/usr/lib/apt/methods/http", "http", "/usr/bin/apt-get", [(9, 6.6, "2")], uid=42)
    flatpak = prog("flatpak", "/usr/bin/flatpak", "flatpak", SYSTEMD)
    fwupd = prog("fwupd", "/usr/bin/fwupdmgr", "fwupdmgr", SYSTEMD, uid=0)
    gsw = prog("gnome-software", "/usr/bin/gnome-software", "gnome-software", SHELL)
    shell = prog("gnome-shell", SHELL, "gnome-shell", SYSTEMD, [(18, 6.7, "2")])
    ntp = prog("timesyncd", "/usr/lib/systemd/systemd-timesyncd", "systemd-timesyn", SYSTEMD, uid=997)
    dns = prog("resolved", "/usr/lib/systemd/systemd-resolved", "systemd-resolve", SYSTEMD, uid=996)
    nm = prog("nm", "/usr/sbin/NetworkManager", "NetworkManager", SYSTEMD, uid=0)
    avahi = prog("avahi", "/usr/sbin/avahi-daemon", "avahi-daemon", SYSTEMD, uid=105)
    cups = prog("cups", "/usr/sbin/cupsd", "cupsd", SYSTEMD, uid=0)
    git = prog("git", "/usr/lib/git-core/git-remote-http", "git-remote-http", "/usr/bin/git")
    ssh = prog("ssh", "/usr/bin/ssh", "ssh", "/usr/bin/git")
    py = prog("python", "/usr/bin/python3.11", "python3", "/usr/bin/bash", [(16, 6.5, "2")])
    restic = prog("restic", "/usr/bin/restic", "restic", SYSTEMD, uid=0)
    zoom = prog("zoom", "/opt/zoom/zoom", "zoom", SHELL)
    steam = prog("steam", "/home/alice/.local/share/Steam/ubuntu12_32/steam", "steam", SHELL)
    office = prog("office", "/usr/lib/libreoffice/program/soffice.bin", "soffice.bin", SHELL)
    curl = prog("curl", "/usr/bin/curl", "curl", "/usr/bin/bash")
    sshd = prog("sshd", "/usr/sbin/sshd", "sshd", "/usr/sbin/sshd", [(22, 6.4, "2")], uid=0)
    tail = tail_sites(random.Random(5))
    third_of = {s: seeded("third", s).sample(THIRD, seeded("n", s).randint(2, 12)) for s in REGULAR}
    zipf = [1 / (i + 1) for i in range(len(REGULAR))]
    end = start + days * DAY
    backups = []

    for day in range(days + 1):
        t0, weekday = start + day * DAY, d.weekday(day)
        sessions = d.sessions[day]
        # -- the browser: visits while the user is there
        for a, b in sessions:
            d.add(ff, a, "push.services.mozilla.com", 443, 2000, 3000, windows=(b - a) / WINDOW / 6)
            for w in range(int(a), int(b), 6 * WINDOW):
                d.add(ff, w, "push.services.mozilla.com", 443, 200, 300)
            d.add(ff, a + 30, "firefox.settings.services.mozilla.com", 443, 3000, 40_000)
            for t in d.poisson(a, b, 40):
                site = rng.choices(REGULAR, zipf)[0] if rng.random() < 0.7 else rng.choice(tail)
                thirds = third_of.get(site) or seeded("third", site).sample(THIRD, seeded("n", site).randint(2, 8))
                reg = site[4:] if site.startswith("www.") else site
                hosts = [site] + [f"{h}.{reg}" for h in rng.sample(["static", "cdn", "api", "img", "assets"],
                                                                   rng.randint(0, 2))]
                for host in hosts + thirds:
                    quic = any(host.endswith(x) for x in ("google.com", "gstatic.com", "googleapis.com",
                                                           "youtube.com", "cloudflare.com"))
                    port = 80 if host.startswith(("ocsp.", "r3.")) else 443
                    d.add(ff, t + rng.uniform(0, 8), host, port, int(rng.lognormvariate(8, 1)),
                          int(rng.lognormvariate(11.5, 1.5)), windows=1 + rng.expovariate(1 / 2),
                          proto="udp" if quic and rng.random() < 0.6 else "tcp")
                # (each name looked up through the resolver)
                d.add(dns, t, "", 53, 80 * len(hosts + thirds), 150 * len(hosts + thirds), addr=LAN + "1",
                      proto="udp")
            if rng.random() < 0.4:      # a video
                t = rng.uniform(a, b - 1800)
                host = f"rr{rng.randint(1, 6)}---sn-4g5e{rng.choice('dekl')}n7.googlevideo.com"
                d.add(ff, t, host, 443, 1_500_000, int(rng.uniform(400, 1200) * MB), windows=rng.uniform(60, 180),
                      proto="udp")
        # -- mail and chat
        for a, b in sessions:
            for t in range(int(a), int(b), 600):
                d.add(tb, t + rng.uniform(0, 60), "imap.fastmail.com", 993, 3000, int(rng.lognormvariate(9, 1.5)),
                      windows=rng.randint(1, 2))
            for t in d.poisson(a, b, 0.6):
                d.add(tb, t, "smtp.fastmail.com", 465, int(rng.lognormvariate(10, 1.5)), 4000)
        if sessions:
            d.add(tb, sessions[0][0] + 120, "aus5.mozilla.org", 443, 2000, 8000)
            d.add(ff, sessions[0][0] + 60, "aus5.mozilla.org", 443, 2000, 8000)
            d.add(ff, sessions[0][0] + 90, "safebrowsing.googleapis.com", 443, 3000, 90_000)
        for t in range(t0, t0 + DAY, 30):
            if rng.random() < 0.9:
                d.add(sig, t + rng.uniform(0, 10), "chat.signal.org", 443, 150, 150)
        for a, b in sessions:
            for t in d.poisson(a, b, 3):
                d.add(sig, t, rng.choice(["cdn.signal.org", "cdn2.signal.org"]), 443, 2000,
                      int(rng.lognormvariate(12, 1.5)))
        d.add(sig, t0 + rng.uniform(9, 11) * HOUR, "updates.signal.org", 443, 1000, 5000)
        if day >= 3 and (day - 3) % 7 == 0:
            d.transfer(sig, t0 + 10 * HOUR, "updates.signal.org", 443, 20_000, 110 * MB)
        # -- updaters
        for h in (rng.uniform(6, 7), rng.uniform(6, 18)):
            t = t0 + h * HOUR
            d.add(apt, t, "deb.debian.org", 80, 20_000, int(rng.uniform(0.3, 4) * MB), windows=2)
            d.add(apt, t + 2, "security.debian.org", 80, 8_000, int(rng.uniform(0.1, 1) * MB))
        if rng.random() < 0.35:
            d.transfer(apt, t0 + rng.uniform(6.2, 7) * HOUR, "security.debian.org", 80, 50_000,
                       int(rng.lognormvariate(math.log(25 * MB), 0.8)))
        if day == 17:
            d.transfer(apt, t0 + 6.3 * HOUR, "deb.debian.org", 80, 200_000, 310 * MB)
        if sessions:
            a = sessions[0][0]
            d.add(gsw, a + 300, "odrs.gnome.org", 443, 3000, 200_000)
            d.add(flatpak, a + 320, "dl.flathub.org", 443, 20_000, int(rng.uniform(2, 9) * MB), windows=2)
            d.add(fwupd, t0 + rng.uniform(0, 24) * HOUR, "cdn.fwupd.org", 443, 2000, 60_000)
            d.add(shell, a + 30, "extensions.gnome.org", 443, 2000, 12_000)
            if weekday == 2:
                d.transfer(flatpak, a + 600, "dl.flathub.org", 443, 100_000, int(rng.uniform(20, 150) * MB))
            if day == 12:
                d.transfer(flatpak, a + 700, "dl.flathub.org", 443, 300_000, 640 * MB)
        # -- system daemons
        if day % 3 == 0 or rng.random() < 0.1:
            server = address(rng, rng.choices(["DE", "NL", "AT", "CH", "FR", "CZ", "PL", "DK"],
                                              [60, 10, 7, 6, 6, 4, 3, 2])[0])
            d.ntp_server = (server, f"{rng.randint(0, 3)}.debian.pool.ntp.org")
        for t in range(t0, t0 + DAY, 2048):
            d.add(ntp, t, d.ntp_server[1], 123, 48, 48, addr=d.ntp_server[0], proto="udp")
        for t in range(t0, t0 + DAY, 300):
            d.add(nm, t + rng.uniform(0, 5), "nmcheck.gnome.org", 80, 300, 600)
        for t in range(t0, t0 + DAY, 75):
            if rng.random() < 0.5:
                d.add(avahi, t, "", 5353, 120, 400, addr="224.0.0.251", lport=5353, proto="udp")
                d.add(avahi, t, "", 5353, 120, 400, addr="ff02::fb", lport=5353, proto="udp")
        for t in range(t0, t0 + DAY, 900):      # (the daemons' own look-ups)
            d.add(dns, t + rng.uniform(0, 60), "", 53, 200, 400, addr=LAN + "1", proto="udp")
        for a, b in sessions:
            for t in d.poisson(a, b, 0.08):
                d.add(cups, t, "", 631, int(rng.uniform(0.2, 6) * MB), 20_000, addr=LAN + "30", windows=2)
        # -- dev tools, on weekdays
        if weekday < 5:
            forges = ["github.com"] * 8 + ["gitlab.com", "salsa.debian.org"]
            for a, b in sessions:
                for t in d.poisson(a, b, 0.8):
                    d.add(git, t, rng.choice(forges), 443, 20_000, int(rng.lognormvariate(12, 2)))
                for t in d.poisson(a, b, 0.5):
                    d.add(ssh, t, rng.choice(["github.com", "github.com", "build.example-corp.de"]), 22, 30_000,
                          80_000, windows=rng.randint(1, 30))
                for t in d.poisson(a, b, 0.4):
                    who = rng.choice(["pip", "python3", "python3", "pytest"])
                    if who == "pip":
                        d.add(py, t, "pypi.org", 443, 5000, 300_000, name=who)
                        d.add(py, t + 1, "files.pythonhosted.org", 443, 10_000, int(rng.lognormvariate(14, 1.5)),
                              name=who)
                    else:
                        d.add(py, t, rng.choice(["api.github.com", "api.github.com", "raw.githubusercontent.com",
                                                 "api.openweathermap.org"]), 443, 3000, 50_000, name=who)
            if rng.random() < 0.15:     # a new forge, host, or API now and then
                t = rng.uniform(*sessions[0])
                kind = rng.choice(["git", "ssh", "python"])
                new = f"{rng.choice(SYLLABLES)}{rng.choice(SYLLABLES)}.{rng.choice(['org', 'io', 'dev', 'de'])}"
                if kind == "git":
                    d.add(git, t, f"git.{new}", 443, 10_000, 2 * MB)
                elif kind == "ssh":
                    d.add(ssh, t, f"vps.{new}", 22, 20_000, 40_000, windows=10)
                else:
                    d.add(py, t, f"api.{new}", 443, 3000, 80_000, name="python3")
        # -- the backup, nightly, and its weekly check
        t = t0 + (2 + rng.uniform(0, 0.5)) * HOUR
        size = int(rng.lognormvariate(math.log(40 * MB), 0.4))
        backups.append(size)
        d.add(restic, t, "s3.eu-central-003.backblazeb2.com", 443, 20_000, int(rng.uniform(1, 4) * MB))
        d.transfer(restic, t + 20, "s3.eu-central-003.backblazeb2.com", 443, size, 200_000)
        if weekday == 6:
            d.transfer(restic, t0 + 4 * HOUR, "s3.eu-central-003.backblazeb2.com", 443, 100_000, 500 * MB,
                       rate=20 * MB)
        # -- rarely used programs
        if weekday == 1:
            a = t0 + 9.97 * HOUR
            d.add(zoom, a, "zoom.us", 443, 20_000, 2 * MB)
            media = f"zoom{rng.choice(['de', 'fr', 'nl', 'us'])}{rng.randint(1, 40)}mmr.zoom.us"
            d.add(zoom, a + 120, media, 8801, 300 * MB, 500 * MB, windows=360, proto="udp")
        if day == 21:
            a = sessions[0][0]
            d.add(steam, a, "store.steampowered.com", 443, 50_000, 12 * MB, windows=6)
            d.transfer(steam, a + HOUR, "cache4-fra1.steamcontent.com", 443, 2 * MB, 3200 * MB, rate=25 * MB)
        if day in (4, 15, 26) and sessions:
            d.add(office, sessions[0][0] + 1800, "update.libreoffice.org", 443, 1000, 4000)
        if rng.random() < 0.3 and sessions:
            d.add(curl, rng.uniform(*sessions[0]), rng.choice(["ifconfig.me", "wttr.in", "example.com",
                                                               f"{rng.choice(SYLLABLES)}.sh"]), 443, 500, 2000)
        # -- sshd: the laptop some evenings, a Mac now and then
        if rng.random() < 0.35:
            a = t0 + rng.uniform(19, 22) * HOUR
            mac = rng.random() < 0.5
            client = LAN + ("41" if mac else "40")
            port = rng.randint(49152, 65535) if mac else rng.randint(32768, 60999)
            big = rng.random() < 0.15
            d.add(sshd, a, "", port, 200_000, 30_000 + (int(rng.uniform(100, 800) * MB) if big else 0),
                  windows=rng.uniform(30, 360), addr=client, lport=22)
    d.backup_median = statistics.median(backups)
    if inject:
        inject_anomalies(d, start, days)
    d.end = end
    return d


def inject_anomalies(d, start, days):
    restic, apt = d.programs["restic"], d.programs["apt"]
    t = start + (days - 3) * DAY + 2.75 * HOUR            # a new country, the usual domain
    addr = address(seeded("anomaly"), "BR")
    d.add(restic, t, "s3.eu-central-003.backblazeb2.com", 443, 30 * MB, 100_000, addr=addr, windows=3)
    d.injected.append(("the backup tool reaches its usual domain at an address in a new country (BR)", "country",
                       t, t + 3 * WINDOW, restic.exe))
    t = start + (days - 2) * DAY + 6.85 * HOUR            # a new registrable domain, a country it knows
    addr = address(seeded("anomaly2"), "US")
    d.add(apt, t, "deb.debian-updates.top", 80, 10_000, 3 * MB, addr=addr)
    d.injected.append(("apt reaches a new registrable domain (debian-updates.top)", "domain", t, t + WINDOW, apt.exe))
    t = start + (days - 2) * DAY + 2.6 * HOUR            # ten times the usual upload
    size = max(int(10 * d.backup_median), 101 * MB)
    d.transfer(restic, t, "s3.eu-central-003.backblazeb2.com", 443, size, 300_000)
    d.upload = (t, size)
    d.injected.append((f"the backup tool uploads {size / MB:,.0f} MB, ten times its median nightly upload "
                       f"({d.backup_median / MB:.0f} MB)", "volume", t, (t // HOUR + 1) * HOUR, restic.exe))
    t = start + (days - 1) * DAY + 1.9 * HOUR             # a new sha256 of a known program
    restic.updates.append((t, "tampered"))
    d.add(restic, t, "s3.eu-central-003.backblazeb2.com", 443, 20_000, 100_000)
    d.injected.append(("a new sha256 of the backup tool", "hash", t, t + WINDOW, restic.exe))


# -- the primary, in this process -------------------------------------------------
class NoNames:
    """Reverse lookups answered with no name (the resolver is not asked)."""

    def resolve(self, addrs, budget):
        return {}

    def close(self):
        pass


def make_primary(home, inodes, **settings):
    """picosnitch's Primary with its state in home/state, the GeoIP database of
    COUNTRY_WEIGHTS there (never downloaded), and the monitor's side of the
    hash channel answered by a thread from `inodes` (inode -> sha256)."""
    import pwd
    me = picosnitch.User(pwd.getpwuid(os.getuid()).pw_name, os.getuid(), os.getgid(), home)
    state = os.path.join(home, "state")
    os.makedirs(os.path.join(state, picosnitch.PRIVATE_NAME), exist_ok=True)
    with open(os.path.join(state, picosnitch.GEOIP_NAME), "wb") as f:
        f.write(geoip_bytes())
    picosnitch.geoip_keeper = lambda *args: None        # (it would download a database)
    config = picosnitch.Config(**settings)
    rt = picosnitch.make_runtime(picosnitch.Setup(config, me, me, state, []), {})
    monitor = rt.hash_monitor

    def answer():
        while True:
            try:
                request = monitor.recv()
            except (EOFError, ValueError, OSError):
                return
            if isinstance(request, picosnitch.HashRequest):
                monitor.send(picosnitch.HashAnswer(request.id, [[inodes.get(ino, ""), ""]
                                                                 for _, _, ino, *_ in request.procs]))
    threading.Thread(target=answer, daemon=True).start()
    primary = picosnitch.Primary(rt)
    primary.names.close()
    primary.names = NoNames()
    return primary, rt


def drain(rt):
    """The reports the primary sent the notifier since the last call."""
    found = []
    while True:
        message = rt.report_rx.recv(0)
        if message is None:
            return found
        found.append(message)


def contime_of(t):
    return time.strftime(picosnitch.TIME_FORMAT, time.gmtime(t))


class Timed:
    """Primary.sight and Primary.novelty (what novelty adds to a window),
    timed, or switched off."""

    def __init__(self, primary):
        self.primary, self.sight, self.novelty = primary, primary.sight, primary.novelty
        self.spent = 0.0
        primary.sight, primary.novelty = self.timed_sight, self.timed_novelty
        self.on = True

    def timed_sight(self, *args):
        if not self.on:
            return []
        began = time.perf_counter()
        try:
            return self.sight(*args)
        finally:
            self.spent += time.perf_counter() - began

    def timed_novelty(self, *args):
        if not self.on:
            return []
        began = time.perf_counter()
        try:
            return self.novelty(*args)
        finally:
            self.spent += time.perf_counter() - began


def run_month(desktop, home, days, settle_days, say=print):
    """Every window of the month (windows with no row are not sent: they
    could tell nothing new) through Primary.window; what it told, when."""
    primary, rt = make_primary(home, desktop.inodes, db_retention_days=3650, novelty_settle_days=settle_days)
    timed = Timed(primary)
    told, errors, hourly, whole = [], [], collections.defaultdict(dict), []
    last = days * DAY // WINDOW
    seq, began = 0, time.monotonic()
    for w in sorted(k for k in desktop.windows if k < last):
        t = desktop.start + w * WINDOW
        conns = desktop.window_conns(w)
        seq += 1
        timed.spent = 0.0
        before = time.perf_counter()
        primary.window(seq, contime_of(t), conns)
        whole.append((len(conns), time.perf_counter() - before, timed.spent))
        for c in conns:
            sums = hourly[c.proc.exe].setdefault(t // HOUR * HOUR, [0, 0])
            sums[0] += c.send
            sums[1] += c.recv
        for message in drain(rt):
            if isinstance(message, picosnitch.Novelty):
                told.append((t, message.kind, message.exe, message.name, message.text))
            elif message.kind == "error":
                errors.append(message.text)
        if seq % 20000 == 0:
            say(f"  day {(t - desktop.start) / DAY:.1f}: {seq:,} windows in {time.monotonic() - began:.0f} s")
    primary.baseline_ready()
    return primary, rt, timed, {"told": told, "errors": errors, "hourly": hourly, "windows": whole, "seq": seq,
                                "seconds": time.monotonic() - began}


# -- what the month says --------------------------------------------------------
KINDS = ("program", "name", "hash", "domain", "country", "port", "volume")


def anomaly_results(desktop, told):
    """Each injected anomaly: (what, expected kind, caught, the events of its exe in its time)."""
    results = []
    for what, kind, a, b, exe in desktop.injected:
        found = [e for e in told if a <= e[0] <= b and e[2] == exe]
        results.append((what, kind, any(e[1] == kind for e in found), found))
    return results


def per_day(desktop, told, days, excluded):
    """[(day, weekday, {kind: events}, notifications)] without the anomalies' events."""
    rows = []
    for day in range(days):
        a, b = desktop.start + day * DAY, desktop.start + (day + 1) * DAY
        events = [e for e in told if a <= e[0] < b and e not in excluded]
        kinds = collections.Counter(e[1] for e in events)
        rows.append((day, time.strftime("%a", time.gmtime(a)), kinds, notifications(events)))
    return rows


def notifications(events):
    """The notifier's grouping: events within GROUP_SECONDS of the one before are one notification."""
    count, last = 0, None
    for t in sorted(e[0] for e in events):
        if last is None or t - last > GROUP_SECONDS:
            count += 1
        last = t
    return count


def volume_events(hourly, factor, minimum_mb):
    """The volume rule replayed on each executable's hours: {(exe, hour, direction)}."""
    found = set()
    for exe, hours in hourly.items():
        top, count = [0, 0], 0
        for hour in sorted(hours):
            for i, direction in enumerate(("sent", "received")):
                if count and hours[hour][i] >= max(factor * top[i], minimum_mb * MB, 1):
                    found.add((exe, hour, direction))
            top = [max(top[0], hours[hour][0]), max(top[1], hours[hour][1])]
            count += 1
    return found


def volume_table(desktop, hourly, told):
    """For each factor and minimum: volume events on the month (but the
    anomaly), and whether the tenfold upload is caught; and the check that
    the replay finds what the primary told at the default."""
    t, _ = desktop.upload
    anomaly = (desktop.programs["restic"].exe, t // HOUR * HOUR, "sent")
    table = {}
    for factor in VOLUME_FACTORS:
        for minimum in VOLUME_MINIMA:
            found = volume_events(hourly, factor, minimum)
            table[(factor, minimum)] = (found - {anomaly}, anomaly in found)
    config = picosnitch.Config()
    default = volume_events(hourly, config.novelty_volume_factor, config.novelty_volume_minimum_mb)
    real = {(e[2], e[0] // HOUR * HOUR, "sent" if " sent " in e[4] else "received") for e in told if e[1] == "volume"}
    return table, default == real, (default, real)


# -- the cost of a window -------------------------------------------------------------
def cost_windows(desktop, days, rows=40, count=300):
    """Windows of `rows` connections from the day after the month, by day:
    consecutive windows' rows put together."""
    first = days * DAY // WINDOW
    windows, current = [], []
    for w in sorted(k for k in desktop.windows if k >= first):
        if not desktop.in_session(desktop.start + w * WINDOW):
            continue
        current += desktop.window_conns(w)
        while len(current) >= rows:
            windows.append(current[:rows])
            current = current[rows:]
            if len(windows) >= count:
                return windows
    return windows


def measure_cost(primary, rt, timed, desktop, days, count):
    """Primary.window on 40-row windows, alternately with novelty (its added
    part timed) and without it, after the month."""
    windows = cost_windows(desktop, days, count=2 * count)
    windows = [windows[i % len(windows)] for i in range(2 * count)]     # (a day's desk hours, again if need be)
    t = desktop.start + days * DAY + 9 * HOUR
    added, with_, without = [], [], []
    seq = 10 ** 6
    for i, conns in enumerate(windows):
        timed.on = i % 2 == 0
        timed.spent = 0.0
        seq += 1
        began = time.perf_counter()
        primary.window(seq, contime_of(t + i * WINDOW), conns)
        took = time.perf_counter() - began
        (with_ if timed.on else without).append(took)
        if timed.on:
            added.append(timed.spent)
        drain(rt)
    timed.on = True
    return {"added": added, "with": with_, "without": without, "rows": len(windows[0]) if windows else 0}


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def ms(seconds):
    return f"{seconds * 1000:.2f}"


# -- the baseline's size, and its build from a log ---------------------------------------
def file_size(path):
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


def settled_programs(baseline, end_day, settle_days):
    """Each executable's newest baseline at the month's end: (exe, days of use
    since it last reached something new, settled, domains, countries, ports)."""
    found = {}
    for ident, exe, grown, days, used in baseline.con.execute(
            "SELECT ident, exe, grown, days, used FROM programs ORDER BY used, grown"):
        kinds = dict(baseline.con.execute("SELECT kind, count(*) FROM seen WHERE ident = ? GROUP BY kind", (ident,)))
        found[exe] = (exe, days, end_day - grown, days >= settle_days, kinds.get("domain", 0),
                      kinds.get("country", 0), kinds.get("port", 0))
    return sorted(found.values(), key=lambda p: (not p[3], p[0]))


def baseline_size(baseline):
    baseline.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    programs = baseline.con.execute("SELECT count(*) FROM programs").fetchone()[0]
    seen = baseline.con.execute("SELECT count(*) FROM seen").fetchone()[0]
    return file_size(baseline.path), programs, seen


def kept_log(keep, n):
    """bench/loggen.py's log of n rows in keep (the one bench/log.py keeps
    there, whenever it was made: the baseline does not care how old it is)."""
    path = os.path.join(keep, f"log-{n}.db")
    if not os.path.exists(path):
        began = time.perf_counter()
        loggen.write_v2(path + ".new", n)
        os.rename(path + ".new", path)
        print(f"generated {n:,} rows in {time.perf_counter() - began:.0f} s", flush=True)
    return path


def build_from(log_path, workdir, geoip_path):
    """build_baseline on a whole log, as a primary's first start does."""
    con = sqlite3.connect(f"file:{log_path}?mode=ro", uri=True)
    rows, through = con.execute("SELECT count(*), coalesce(max(id), 0) FROM conns").fetchone()
    procs = con.execute("SELECT count(DISTINCT coalesce(nullif(sha256, ''), exe)) FROM procs").fetchone()[0]
    con.close()
    out = os.path.join(workdir, "built-baseline.db")
    loggen.remove_log(out)
    suffixes, _ = picosnitch.PublicSuffixes.load()
    geoip = picosnitch.GeoIP(geoip_path, lambda _: None)
    programs, seconds = picosnitch.build_baseline(log_path, out, through, suffixes, geoip.country)
    b = picosnitch.Baseline(out)
    size, _, seen = baseline_size(b)
    b.close()
    loggen.remove_log(out)
    return {"rows": rows, "programs": programs, "idents": procs, "seconds": seconds, "size": size, "seen": seen}


# -- the report -----------------------------------------------------------------------
def verdict(ok):
    return "met" if ok else "NOT met"


def report(args, desktop, month, results, days_rows, table, replay_ok, cost, size, builds, log_rows, shared, settled):
    told, windows = month["told"], month["windows"]
    learning_days = args.settle_days
    learning = [r[3] for r in days_rows[:learning_days]] or [0]
    rest = [r[3] for r in days_rows[learning_days:]] or [0]
    caught = sum(1 for r in results if r[2])
    added_med, added_p95 = statistics.median(cost["added"]), quantile(cost["added"], 0.95)
    lines = [f"# picosnitch's novelty rules on a realistic desktop month ({datetime.date.today()}, kernel "
             f"{os.uname().release}, SQLite {sqlite3.sqlite_version})", "", *machine.describe(), ""]
    if shared:
        lines += [f"The machine was shared: other work ran beside this run (load average {shared}). The times "
                  "are those of a busy machine.", ""]
    lines += ["## The month", "",
              f"{args.days} days from {contime_of(desktop.start)[:10]}, in 10-s windows, generated by "
              "`bench/novelty.py` (seeded; its docstring tells the shape): a browser, a mail client, a chat app, "
              "updaters (apt, flatpak, fwupdmgr, gnome-software), system daemons (timesyncd, resolved, "
              "NetworkManager, avahi, cupsd), dev tools (git, ssh, python3), a nightly backup (restic), rarely "
              "used programs (zoom, steam, libreoffice, curl) and sshd serving a Linux laptop and a Mac. Each "
              "window's rows went through picosnitch's `Primary.window`, in this process, with its defaults "
              f"(volume factor and minimum) but {args.settle_days} settle days"
              f"{' (the default)' if args.settle_days == picosnitch.Config().novelty_settle_days else ''} and a "
              "retention of 10 years (the month lies in the past); hashes answered by a thread as the monitor would, the real public suffix list, a GeoIP "
              "database of a fixed table (each /8 one country's) and no reverse look-ups.", "",
              f"- rows: {log_rows:,} in {month['seq']:,} windows with rows (of {args.days * DAY // WINDOW:,}); "
              f"{len(desktop.programs)} programs, {len(desktop.inodes)} executables' versions (parents "
              f"included); {month['seconds']:.0f} s through the primary",
              f"- errors the primary reported: {len(month['errors'])}"
              + (f" (first: {month['errors'][0]})" if month["errors"] else ""), "",
              "## Notifications a day", "",
              "Novelty events by kind, and notifications: the notifier makes one of events that come within "
              f"{GROUP_SECONDS} s of each other; windows are 10 s apart, so each window with events is one. "
              f"The first {learning_days} days learn the baseline (every program is new). The held-out anomalies' "
              "events are not counted here (see below).", "",
              "| day | | " + " | ".join(KINDS) + " | notifications |", "|---|---|" + "---|" * (len(KINDS) + 1)]
    for day, weekday, kinds, count in days_rows:
        lines.append(f"| {day} | {weekday} | " + " | ".join(str(kinds.get(k, "")) for k in KINDS) + f" | {count} |")
    lines += ["", f"- learning (days 0-{learning_days - 1}): {sum(learning)} notifications, max {max(learning)} a "
                  f"day, median {statistics.median(learning):g}",
              f"- after (days {learning_days}-{args.days - 1}): {sum(rest)} notifications, max {max(rest)} a day, median "
              f"{statistics.median(rest):g}, mean {statistics.mean(rest):.2f}",
              "", "What was told after the learning days:", ""]
    for t, kind, exe, name, text in told:
        if t >= desktop.start + learning_days * DAY and not any(t == e[0] and text == e[4] for r in results for e in r[3]):
            lines.append(f"- {contime_of(t)} {kind}: {text}")
    lines += ["", "Each executable's baseline at the end of the month (its newest sha256): days of use since it "
              f"last reached something new (a program is settled after {args.settle_days}), the days since then, and what it has "
              "reached:", "", "| executable | days of use since new | days since | settled | domains | countries | "
              "remote ports |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {exe} | {days} | {since} | {'yes' if ok else 'no'} | {dom} | {cc} | {ports} |"
              for exe, days, since, ok, dom, cc, ports in settled]
    lines += ["", "## Held-out anomalies", "", "| anomaly | expected | caught | what was told |", "|---|---|---|---|"]
    for what, kind, ok, found in results:
        said = "; ".join(f"{e[1]}: {e[4]}" for e in found) or "nothing"
        lines.append(f"| {what} | {kind} | {'yes' if ok else 'no'} | {said} |")
    restic = desktop.programs["restic"].exe
    top = max((s for h, (s, _) in month["hourly"][restic].items() if h < desktop.upload[0] // HOUR * HOUR), default=0)
    lines += ["", f"The backup's nightly upload: median {desktop.backup_median / MB:.0f} MB; its busiest hour before "
                  f"the tenfold upload: {top / MB:.0f} MB sent, so the rule (\"factor\" times the busiest hour) "
                  f"asked for {max(DEFAULT.novelty_volume_factor * top, DEFAULT.novelty_volume_minimum_mb * MB) / MB:,.0f}"
                  " MB at the default; the upload was "
                  f"{desktop.upload[1] / MB:,.0f} MB ({desktop.upload[1] / max(top, 1):.1f} times the busiest "
                  "hour).", "",
              "## The volume rule's factor and minimum", "",
              "Volume events each pair would have raised on the month (the held-out upload not counted), replayed "
              "on each executable's hourly totals with the rule's own arithmetic, and whether the tenfold upload "
              "would be caught. The replay at the default finds exactly what the primary told: "
              f"{'yes' if replay_ok[0] else 'NO: ' + str(replay_ok[1])}.", "",
              "| factor \\ minimum | " + " | ".join(f"{m} MB" for m in VOLUME_MINIMA) + " |",
              "|---|" + "---|" * len(VOLUME_MINIMA)]
    for factor in VOLUME_FACTORS:
        cells = []
        for minimum in VOLUME_MINIMA:
            found, hit = table[(factor, minimum)]
            learnt = sum(1 for e in found if e[1] < desktop.start + learning_days * DAY)
            cells.append(f"{len(found)} ({learnt} learning){' · caught' if hit else ''}")
        lines.append(f"| {factor} | " + " | ".join(cells) + " |")
    factor, minimum = DEFAULT.novelty_volume_factor, DEFAULT.novelty_volume_minimum_mb
    lines += ["", f"At the default ({factor}, {minimum} MB), the month's volume events:", ""]
    found, _ = table[(factor, minimum)]
    for exe, hour, direction in sorted(found, key=lambda e: e[1]):
        lines.append(f"- {contime_of(hour)[:13]}h {exe} {direction} "
                     f"{month['hourly'][exe][hour][0 if direction == 'sent' else 1] / MB:,.0f} MB")
    lines += ["", "## Cost", "",
              f"Primary.window on {len(cost['with'])} + {len(cost['without'])} windows of {cost['rows']} rows from "
              "the day after the month (a weekday's desk hours, over again with later times when they run out), "
              "alternately with novelty and without it "
              "(Primary.sight and Primary.novelty replaced by nothing), against the month's baseline. The added "
              "cost is the time in Primary.sight (a sighting per program: registrable domain, country, "
              "destinations) and Primary.novelty (Baseline.observe, one transaction) of each window with it.", "",
              "| | median ms | p95 ms |", "|---|---|---|",
              f"| novelty's added cost per window | {ms(added_med)} | {ms(added_p95)} |",
              f"| Primary.window with novelty | {ms(statistics.median(cost['with']))} | "
              f"{ms(quantile(cost['with'], 0.95))} |",
              f"| Primary.window without | {ms(statistics.median(cost['without']))} | "
              f"{ms(quantile(cost['without'], 0.95))} |"]
    by_size = collections.defaultdict(list)
    for n, _, spent in windows:
        by_size[min(n, 80) // 10 * 10].append(spent)
    lines += ["", "Over the month's own windows, the added cost by the window's rows:", "",
              "| rows | windows | median ms | p95 ms |", "|---|---|---|---|"]
    for n in sorted(by_size):
        lines.append(f"| {n}-{n + 9}{'+' if n == 80 else ''} | {len(by_size[n]):,} | {ms(statistics.median(by_size[n]))} | "
                     f"{ms(quantile(by_size[n], 0.95))} |")
    b_size, b_programs, b_seen = size
    lines += ["", "## Size", "",
              f"baseline.db after the month: {b_size / 1e6:.2f} MB ({b_programs} programs, {b_seen:,} destinations "
              f"seen) for {log_rows:,} rows of log: {b_size / 1e6 / (log_rows / 1e6):.2f} MB per million rows. It "
              "grows with the programs and what they reach, not with the rows.", "",
              "## Building the baseline from a log", "",
              "build_baseline on bench/loggen.py's logs (600 executables, 5,000 domains, 30 days; the same GeoIP "
              "table), as the first start of a primary with an existing log does, in its thread:", "",
              "| rows | programs (sha256s) | seconds | baseline.db | per million rows | destinations |",
              "|---|---|---|---|---|---|"]
    for b in builds:
        lines.append(f"| {b['rows']:,} | {b['programs']:,} | {b['seconds']:.1f} | {b['size'] / 1e6:.1f} MB | "
                     f"{b['size'] / 1e6 / (b['rows'] / 1e6):.2f} MB | {b['seen']:,} |")
    rest_max = max(rest)
    targets = [("at most 3 notifications a day (after the learning days)", f"max {rest_max}, median "
                f"{statistics.median(rest):g}", rest_max <= TARGET_PER_DAY),
               ("every held-out anomaly caught", f"{caught} of {len(results)}", caught == len(results)),
               ("novelty's added cost per 40-row window under 1 ms (median)", f"{ms(added_med)} ms",
                added_med * 1000 < TARGET_COST_MS)]
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {what} | {got} | {verdict(ok)} |" for what, got, ok in targets]
    big = builds[-1] if builds else None
    summary = (f"novelty: {sum(rest)} notifications in {args.days - learning_days} days after learning (max {rest_max} a "
               f"day, target {TARGET_PER_DAY}); anomalies caught {caught}/{len(results)}; added cost "
               f"{ms(added_med)} ms median / {ms(added_p95)} ms p95 per {cost['rows']}-row window; baseline "
               f"{b_size / 1e6 / (log_rows / 1e6):.2f} MB per million rows"
               + (f"; built from {big['rows']:,} rows in {big['seconds']:.0f} s" if big else ""))
    return "\n".join(lines) + "\n\nSummary: " + summary + "\n", summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30, help="days of the month (at least the settle days and 3)")
    parser.add_argument("--settle-days", type=int, default=picosnitch.Config().novelty_settle_days,
                        help="\"Novelty settle days\" (default picosnitch's); also the days counted as learning")
    parser.add_argument("--rows", default="1000000,10000000", help="sizes of the logs to build a baseline from "
                                                                 "(bench/loggen.py; none: '')")
    parser.add_argument("--keep", default="/var/tmp/pslogs", help="where those logs are kept (and reused)")
    parser.add_argument("--cost-windows", type=int, default=300, help="40-row windows with novelty (as many without)")
    parser.add_argument("--report", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    if args.days < args.settle_days + 3:
        parser.error("--days: at least the settle days and 3 (the anomalies' days)")
    say = lambda text: print(text, flush=True)
    start = picosnitch.local_seconds(time.strftime("%Y-%m-%d 00:00:00", time.localtime())) - (args.days + 1) * DAY
    workdir = tempfile.mkdtemp(prefix="psnovelty-", dir="/var/tmp")
    try:
        began = time.monotonic()
        desktop = plan_month(start, args.days)
        say(f"planned {args.days} days in {time.monotonic() - began:.0f} s")
        primary, rt, timed, month = run_month(desktop, os.path.join(workdir, "home"), args.days, args.settle_days,
                                              say)
        log_rows = sqlite3.connect(os.path.join(rt.state, picosnitch.DB_NAME)).execute(
            "SELECT count(*) FROM conns").fetchone()[0]
        results = anomaly_results(desktop, month["told"])
        excluded = [e for r in results for e in r[3]]
        days_rows = per_day(desktop, month["told"], args.days, excluded)
        table, *replay = volume_table(desktop, month["hourly"], month["told"])
        size = baseline_size(primary.baseline)
        settled = settled_programs(primary.baseline, (start + args.days * DAY) // DAY, args.settle_days)
        say(f"month: {month['seq']:,} windows, {log_rows:,} rows in {month['seconds']:.0f} s; measuring the cost")
        cost = measure_cost(primary, rt, timed, desktop, args.days, args.cost_windows)
        primary.close()
        builds = []
        geoip = os.path.join(rt.state, picosnitch.GEOIP_NAME)
        for n in [int(s) for s in args.rows.split(",") if s]:
            os.makedirs(args.keep, exist_ok=True)
            builds.append(build_from(kept_log(args.keep, n), workdir, geoip))
            say(f"built the baseline of {builds[-1]['rows']:,} rows in {builds[-1]['seconds']:.1f} s")
        load = os.getloadavg()
        shared = f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end" if load[1] > 1.2 else ""
        text, summary = report(args, desktop, month, results, days_rows, table, replay, cost, size, builds,
                               log_rows, shared, settled)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        with open(args.report, "w") as f:
            f.write(text)
    print(text)
    print(summary + f"; on {machine.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
