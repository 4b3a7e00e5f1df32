"""The one way to show a name (`shown`, in the small utilities), in-process, and each place
that uses it: the logs (notifications), conn.log (storage), the terminal
viewer's cells and the web UI's chart, table and export. The same end to end is in test_names_e2e.py."""
import csv
import io

import pytest

import picosnitch

ACTING = {"\x1b": "\\x1b", "\x07": "\\x07", "\n": "\\x0a", "\r": "\\x0d", "\t": "\\x09", "\x00": "\\x00",
          "\x7f": "\\x7f", "\x9b": "\\x9b", "\u202a": "\\u202a", "\u202e": "\\u202e", "\u2066": "\\u2066",
          "\u2069": "\\u2069", "\u200f": "\\u200f", "\u2028": "\\u2028", "\u2029": "\\u2029", "\ufeff": "\\ufeff"}


@pytest.mark.parametrize("ch,escape", ACTING.items())
def test_a_character_that_would_act_is_shown_escaped(ch, escape):
    assert picosnitch.acts(ch)
    assert picosnitch.shown(f"a{ch}b") == f"a{escape}b"


def test_what_shows_as_itself_is_left_alone_and_a_backslash_is_escaped():
    for text in ("/usr/bin/firefox-esr", "héllo wörld", "日本語 名前", "emoji 🙂", "a b", "<b>&amp;</b>"):
        assert picosnitch.shown(text) == text
    assert picosnitch.shown("a\\x1b") == "a\\\\x1b"         # can pass for no escape
    assert picosnitch.shown("a\x1b") != picosnitch.shown("a\\x1b")
    assert picosnitch.shown("\U000e0041") == "\\U000e0041"    # (a tag character, beyond 16 bits)


def test_conn_log_keeps_its_fields_and_escapes_the_rest():
    row = ("2026-12-06 10:00:00", 1, 2, "/tmp/a,b\nc\x1b[31m\u202eexe", "n", "", "", "", "", "", "", 0,
           1, 2, "", "", "x.example")
    line = picosnitch.text_log_line(row)
    assert line.split(",")[3] == "/tmp/abc\\x1b[31m\\u202eexe" and "\x1b" not in line


def test_the_terminal_viewer_shows_what_acts_as_a_mark():
    assert picosnitch.fit("\u202egpj.exe", 12) == "?gpj.exe    "
    assert picosnitch.fit("a\x1b[31mb", 8) == "a?[31mb "


def test_csv_cells_never_run_as_a_formula_and_keep_their_values():
    text = picosnitch.dash_csv(["executable", "sent (bytes)", "rows"],
                               [["=cmd|' /C calc'!A0", 10, 1], ["+1", 20, 2], ["-2+3", 30, 3], ["@SUM(A1)", 40, 4],
                                ["\tx", 50, 5], ["\rx", 60, 6], ["/usr/bin/a,\"b\"", 70, 7], ["-", 80, 8]])
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text[1:])))
    assert rows[0] == ["executable", "sent (bytes)", "rows"]
    assert [r[0] for r in rows[1:]] == ["'=cmd|' /C calc'!A0", "'+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx",
                                        '/usr/bin/a,"b"', "'-"]
    assert [r[1:] for r in rows[1:]] == [[str(10 * i), str(i)] for i in range(1, 9)]
    assert '"\'=cmd|\' /C calc\'!A0",10,1' in text                    # text quoted, numbers not


def test_the_chart_takes_names_as_literal_text_and_the_table_shows_them():
    labels = picosnitch.Labels(None)
    data = {"first": 0, "last": 60, "bucket": 60, "others": {}, "span": (0, 60),
            "entries": [("<b>bold</b> & <i>x<", 5, 6, 1), ("\u202egpj.exe", 1, 1, 1)],
            "series": {"<b>bold</b> & <i>x<": {0: [5, 6]}, "\u202egpj.exe": {0: [1, 1]}}}
    state = picosnitch.DashState()
    figure = picosnitch.dash_figure(data, state, labels)
    assert {t["name"] for t in figure["data"]} == {"&lt;b&gt;bold&lt;/b&gt; &amp; &lt;i&gt;x&lt;", "\\u202egpj.exe"}
    assert {t["meta"] for t in figure["data"]} == {"&lt;b&gt;bold&lt;/b&gt; &amp; &lt;i&gt;x&lt;", "\\u202egpj.exe"}
    _, rows, tips = picosnitch.dash_table_rows(data, state, labels)
    assert [r["entry"] for r in rows] == ["<b>bold</b> & <i>x<", "\\u202egpj.exe"]   # (the table shows text)
    assert labels.text("exe", "\u202egpj.exe", exact=True) == "\u202egpj.exe"
