"""TOML with line numbers: every key located, syntax errors named by file and line."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.sdk import ConfigError, ConfigTable
from agent.tomlmap import load_located, parse_located, scan_key_lines

TRICKY = '''\
# a comment with key = "value" and [table]
title = "x" # trailing comment
[a]
b.c = 1
"quoted key" = """
[not.a.table]
fake = 1 \\"""
"""
lit = \'\'\'
also = "not a key"
\'\'\'
arr = [
  1, # comment ]
  { x = 1, y = "a\\"b" },
]
[devices."lamp 1"]
unit = 3
[[pts]]
n = 1
[pts.sub]
z = 2
[[pts]]
n = 2
inl = { p = { q = 1 }, r = [1, 2] }
[ spaced . "dot.ted" ]
when = 1979-05-27 07:32:00Z
'''


def test_tricky_document_lines() -> None:
    lines = scan_key_lines(TRICKY)
    expected = {
        ("title",): 2,
        ("a",): 3,
        ("a", "b"): 4,
        ("a", "b", "c"): 4,
        ("a", "quoted key"): 5,
        ("a", "lit"): 9,
        ("a", "arr"): 12,
        ("a", "arr", 1, "x"): 14,
        ("a", "arr", 1, "y"): 14,
        ("devices", "lamp 1"): 16,
        ("devices", "lamp 1", "unit"): 17,
        ("pts", 0): 18,
        ("pts", 0, "n"): 19,
        ("pts", 0, "sub"): 20,
        ("pts", 0, "sub", "z"): 21,
        ("pts", 1): 22,
        ("pts", 1, "n"): 23,
        ("pts", 1, "inl", "p", "q"): 24,
        ("pts", 1, "inl", "r"): 24,
        ("spaced", "dot.ted"): 25,
        ("spaced", "dot.ted", "when"): 26,
    }
    for path, line in expected.items():
        assert lines.get(path) == line, path
    assert ("not",) not in lines
    assert ("a", "also") not in lines


def test_config_table_tree_and_locations(tmp_path: Path) -> None:
    path = tmp_path / "doc.toml"
    path.write_text(TRICKY, encoding="utf-8")
    root = load_located(path)
    assert root.file == str(path)
    assert root.line == 1
    assert dict(root.data) == tomllib.loads(TRICKY)
    lamp = root.table("devices").table("lamp 1")
    assert lamp.path == 'devices."lamp 1"'
    assert str(lamp.where("unit")) == f"{path}:17"
    second = root.children["pts[1]"]
    assert second.path == "pts[1]"
    assert second.where("n").line == 23
    assert root.children["pts[0]"].table("sub").where("z").line == 21
    # A key the table does not have points at the table itself.
    assert lamp.where("missing").line == 16
    error = lamp.error("unit", "expected something else")
    assert str(error) == f'{path}:17: devices."lamp 1".unit: expected something else'


def test_file_is_named_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.toml").write_text("x = 1\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_located("sub/c.toml").file == "sub/c.toml"
    assert load_located(Path("sub") / "c.toml").where("x").file == "sub/c.toml"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a = 1\nb = = 2\n", 2),
        ("a = 1\n[t]\nx = 1\n[t]\n", 4),
        ("a = 1\na = 2\n", 2),
        # "at end of document": the last line of the file.
        ('s = """\nunterminated\n', 2),
        ("a = [1,\n2,\n", 2),
        ("a = 1\nb = 2 x", 2),
    ],
)
def test_syntax_error_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_located(path)
    assert caught.value.where is not None
    assert caught.value.where.file == str(path)
    assert caught.value.where.line == line
    assert "invalid TOML" in caught.value.message
    assert "(at line" not in caught.value.message


def test_invalid_utf8_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_located(b'a = 1\nb = "\xff"\n', "x.toml")
    assert str(caught.value.where) == "x.toml:2"


def test_unreadable_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_located(tmp_path / "absent.toml")


# --------------------------------------------------------------------------------------------
# Property: generated documents, written in every style the scanner must follow.
# --------------------------------------------------------------------------------------------

BARE = re.compile(r"[A-Za-z0-9_-]+")
LITERAL = re.compile(r"[^'\x00-\x08\x0a-\x1f\x7f]*")
MULTI_LITERAL = re.compile(r"[^\x00-\x08\x0b-\x1f\x7f]*")

keys = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True),
    st.text(alphabet=" .=#[]{}\"'\\abé\t", max_size=5),
)
plain_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)
tricky_text = st.text(alphabet="ab =#[]{},\"'\\\n\t", max_size=20)
quotes_text = st.text(alphabet="\"'\\\na", max_size=12)
scalars = st.one_of(
    st.integers(-(10**6), 10**6),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    plain_text,
    tricky_text,
    quotes_text,
)
tables = st.recursive(
    st.dictionaries(keys, scalars | st.lists(scalars, max_size=3), max_size=4),
    lambda inner: st.dictionaries(
        keys,
        scalars | inner | st.lists(scalars, max_size=3) | st.lists(inner, min_size=1, max_size=2),
        max_size=4,
    ),
    max_leaves=16,
)


def toml_key(key: str) -> str:
    if BARE.fullmatch(key):
        return key
    if LITERAL.fullmatch(key) and "\\" in key:
        return "'" + key + "'"
    return '"' + _escape(key) + '"'


def _escape_multiline(text: str) -> str:
    """Raw newlines and quotes, escaping only what would end the string early."""
    out: list[str] = []
    quotes = 0
    for char in text:
        if char == '"' and quotes < 2:
            out.append(char)
            quotes += 1
            continue
        quotes = 0
        out.append("\n" if char == "\n" else _escape(char))
    return "".join(out)


def _escape(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return "".join(out)


class Writer:
    """A tiny TOML writer that picks a style for each value with hypothesis draws."""

    def __init__(self, draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
        self.draw = draw
        self.out: list[str] = []

    def scalar(self, value: Any, *, inline: bool) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, str):
            style = self.draw(st.sampled_from(["basic", "multi", "literal", "multi-literal"]))
            if style == "multi":
                # The newline right after the opening quotes is trimmed by TOML.
                return '"""\n' + _escape_multiline(value) + '"""'
            if style == "literal" and LITERAL.fullmatch(value):
                return "'" + value + "'"
            if style == "multi-literal" and MULTI_LITERAL.fullmatch(value) and "'''" not in value:
                return "'''\n" + value + "'''"
            return '"' + _escape(value) + '"'
        if isinstance(value, list):
            items = [self.value(v, inline=True) for v in value]
            if not inline and self.draw(st.booleans()):
                body = "".join(f"  {item}, # item\n" for item in items)
                return "[\n" + body + "]"
            return "[" + ", ".join(items) + "]"
        raise AssertionError(value)

    def value(self, value: Any, *, inline: bool) -> str:
        if isinstance(value, dict):
            inner = ", ".join(
                f"{toml_key(k)} = {self.value(v, inline=True)}" for k, v in value.items()
            )
            return "{ " + inner + " }" if inner else "{}"
        return self.scalar(value, inline=inline)

    def dotted(self, prefix: str, value: dict[str, Any]) -> None:
        if not value:
            self.out.append(f"{prefix} = {{}}")
        for key, item in value.items():
            name = f"{prefix}.{toml_key(key)}"
            if isinstance(item, dict):
                self.dotted(name, item)
            else:
                self.out.append(f"{name} = {self.value(item, inline=False)}")

    def table(self, path: list[str], data: dict[str, Any]) -> None:
        later: list[tuple[str, str, Any]] = []
        for key, value in data.items():
            is_table_list = isinstance(value, list) and value and isinstance(value[0], dict)
            if isinstance(value, dict):
                style = self.draw(st.sampled_from(["header", "inline", "dotted"]))
                if style == "header":
                    later.append(("header", key, value))
                elif style == "inline":
                    self.out.append(f"{toml_key(key)} = {self.value(value, inline=False)}")
                else:
                    self.dotted(toml_key(key), value)
            elif is_table_list and self.draw(st.booleans()):
                later.append(("array", key, value))
            else:
                self.out.append(f"{toml_key(key)} = {self.value(value, inline=False)}")
        for style, key, value in later:
            header = ".".join(toml_key(k) for k in [*path, key])
            if style == "header":
                self.out.append(f"[ {header} ]" if self.draw(st.booleans()) else f"[{header}]")
                self.table([*path, key], value)
            else:
                for element in value:
                    self.out.append(f"[[{header}]]")
                    self.table([*path, key], element)


def assert_located(table: ConfigTable, lines: list[str]) -> None:
    for key, value in table.data.items():
        assert key in table.key_lines, (table.path, key)
        line = lines[table.key_lines[key] - 1]
        pattern = r"(^|[\s.\[{,])" + re.escape(toml_key(key)) + r"\s*[=.\]]"
        assert re.search(pattern, line), (key, line)
        if isinstance(value, dict):
            assert_located(table.children[key], lines)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    assert_located(table.children[f"{key}[{index}]"], lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tables, choices=st.data())
def test_every_generated_key_is_located_on_its_line(data: dict[str, Any], choices: Any) -> None:
    writer = Writer(choices.draw)
    writer.table([], data)
    text = "\n".join(writer.out) + "\n"
    assert tomllib.loads(text) == data, text  # the writer itself is right
    assert_located(parse_located(text, "gen.toml"), text.split("\n"))
