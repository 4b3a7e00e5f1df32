"""How picosnitch.py is laid out: numbered sections in dependency order, so
that it reads from top to bottom. No top-level name refers to one defined
in a later section (a name bound inside the code that refers to it, such as
a local variable or a parameter, is that code's own)."""
import ast
import os
import re

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "picosnitch.py")
HEADING = re.compile(r"^# (\d+)\. (.+)$")


def sections(lines):
    """[(first line, number, title)] of the sections, each heading under a line of #."""
    return [(i + 1, int(m[1]), m[2]) for i, line in enumerate(lines)
            if (m := HEADING.match(line)) and i > 0 and lines[i - 1].startswith("#####")]


def bound(node):
    """The names a piece of code binds for itself."""
    names = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
    return names


def top_level_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
        node, (ast.AnnAssign, ast.AugAssign)) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def test_the_table_of_contents_lists_the_sections_in_order():
    """Section 1 is the docstring, whose table of contents names every other
    section as its heading does."""
    with open(SOURCE) as f:
        text = f.read()
    listed = re.findall(r"^ +(\d+)\. (.+)$", text.split('"""')[1], re.M)
    headings = [(number, title) for _, number, title in sections(text.splitlines())]
    assert [(int(n), t) for n, t in listed] == [(1, "header (this docstring)")] + headings
    assert [n for n, _ in headings] == list(range(2, len(headings) + 2)) and len(headings) > 10


def later_references(text):
    """Each place where a top-level name refers to one of a later section."""
    found = sections(text.splitlines())
    section_of = lambda line: max((number for start, number, _ in found if start <= line), default=1)
    tree = ast.parse(text)
    defined = {}
    for node in tree.body:
        for name in top_level_names(node):
            defined.setdefault(name, section_of(node.lineno))
    later = []
    for node in tree.body:
        here, own = section_of(node.lineno), bound(node)
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in own \
                    and defined.get(n.id, 0) > here:
                later.append(f"line {n.lineno} (section {here}) refers to {n.id} (section {defined[n.id]})")
    return later


def test_no_top_level_name_refers_to_a_later_section():
    with open(SOURCE) as f:
        assert later_references(f.read()) == []


def test_the_check_finds_a_reference_to_a_later_section():
    text = ("#####\n# 2. first\n#####\ndef early(late_too):\n    return late(late_too)\n\n\n"
            "#####\n# 3. second\n#####\ndef late(x):\n    return x\n\n\ndef late_too():\n    return late(1)\n")
    assert later_references(text) == ["line 5 (section 2) refers to late (section 3)"]
