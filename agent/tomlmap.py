"""TOML with line numbers: parse with :mod:`tomllib`, then locate every key with a line scanner.

``tomllib`` is the parser of record; it does not say where a key came from, so a small scanner
walks the same text and maps each key path to the line that defines it. The scanner only has
to agree with ``tomllib`` on documents ``tomllib`` accepts (it runs after a successful parse);
when it cannot place a key, :meth:`agent.sdk.ConfigTable.where` falls back to the line of the
enclosing table, which is still a useful place to point at.

Elements of arrays that are tables (``[[points]]`` headers or inline tables in an array) are
exposed as children named ``key[i]`` of the table holding the array, so they carry lines too.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from agent.sdk import ConfigError, ConfigTable, Where

__all__ = ["KeyPath", "load_located", "parse_located", "scan_key_lines"]

KeyPath = tuple[str | int, ...]
"""Keys from the document root; integers index arrays of tables."""

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_AT_LINE = re.compile(r"\s*\(at line (\d+), column \d+\)\s*$")
_AT_END = re.compile(r"\s*\(at end of document\)\s*$")
_HEX_ESCAPES = {"u": 4, "U": 8}
_SIMPLE_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_SCALAR_END = frozenset(",]}#\r\n")


def load_located(path: str | os.PathLike[str]) -> ConfigTable:
    """Parse the TOML file at ``path`` into a :class:`ConfigTable` that knows each key's line.

    ``file`` in the result (and in every error) is ``path`` as the caller spelled it. Raises
    :class:`ConfigError` for a file that is not UTF-8 or not TOML, and :class:`OSError` when the
    file cannot be read at all.
    """
    file = os.fspath(path)
    with open(path, "rb") as handle:
        raw = handle.read()
    return parse_located(raw, file)


def parse_located(source: str | bytes, file: str) -> ConfigTable:
    """Like :func:`load_located`, for text already in memory; ``file`` names it in messages."""
    if isinstance(source, bytes):
        try:
            text = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = source.count(b"\n", 0, exc.start) + 1
            raise ConfigError(
                Where(file, line), "expected UTF-8 text (TOML files are UTF-8)"
            ) from None
    else:
        text = source
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(exc, text, file) from None
    lines = scan_key_lines(text)
    return _build(data, file, (), "", line=1, lines=lines)


def scan_key_lines(text: str) -> dict[KeyPath, int]:
    """Map each key path of a valid TOML document to the (1-based) line that defines it.

    Tables defined only implicitly (``[a.b]`` defines ``a``; ``a.b = 1`` defines ``a``) get the
    line where they first appear. Best effort: a construct the scanner does not follow ends the
    scan, and the keys found so far are returned.
    """
    scanner = _Scanner(text)
    with contextlib.suppress(_ScanError):
        scanner.document()
    return scanner.lines


def line_count(text: str) -> int:
    """Number of lines of ``text`` as an editor shows them (at least 1)."""
    return max(1, text.count("\n") + (0 if text.endswith("\n") else 1))


def _syntax_error(exc: tomllib.TOMLDecodeError, text: str, file: str) -> ConfigError:
    message = str(exc)
    last = line_count(text)
    line = last
    if match := _AT_LINE.search(message):
        line = min(max(1, int(match.group(1))), last)
        message = message[: match.start()]
    elif match := _AT_END.search(message):
        message = message[: match.start()]
    return ConfigError(Where(file, line), f"invalid TOML: {message}")


def _build(
    data: Mapping[str, Any],
    file: str,
    key_path: KeyPath,
    dotted: str,
    *,
    line: int,
    lines: Mapping[KeyPath, int],
) -> ConfigTable:
    key_lines: dict[str, int] = {}
    children: dict[str, ConfigTable] = {}
    for key, value in data.items():
        path = (*key_path, key)
        key_line = lines.get(path)
        if key_line is not None:
            key_lines[key] = key_line
        here = key_line if key_line is not None else line
        name = _join(dotted, key)
        if isinstance(value, dict):
            children[key] = _build(value, file, path, name, line=here, lines=lines)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    item_line = lines.get((*path, index), here)
                    children[f"{key}[{index}]"] = _build(
                        item, file, (*path, index), f"{name}[{index}]", line=item_line, lines=lines
                    )
    return ConfigTable(
        data=data, file=file, path=dotted, line=line, key_lines=key_lines, children=children
    )


def _join(dotted: str, key: str) -> str:
    if not _BARE_KEY.fullmatch(key):
        key = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{dotted}.{key}" if dotted else key


class _ScanError(Exception):
    """The scanner met something it does not follow; keep what was found so far."""


class _Scanner:
    """A recursive-descent walk over TOML that records lines, not values."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        # Resolved path of each array of tables -> number of elements seen so far.
        self.arrays: dict[KeyPath, int] = {}

    # Characters ------------------------------------------------------------------------
    def peek(self, ahead: int = 0) -> str:
        index = self.pos + ahead
        return self.text[index] if index < len(self.text) else ""

    def advance(self, count: int = 1) -> None:
        end = min(self.pos + count, len(self.text))
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def expect(self, token: str) -> None:
        if not self.text.startswith(token, self.pos):
            raise _ScanError(f"expected {token!r} at line {self.line}")
        self.advance(len(token))

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t"):
            self.pos += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end

    def skip_blank(self) -> None:
        """Spaces, newlines and comments (between statements and inside arrays)."""
        while True:
            char = self.peek()
            if char in (" ", "\t", "\r", "\n"):
                self.advance()
            elif char == "#":
                self.skip_comment()
            else:
                return

    # Statements ------------------------------------------------------------------------
    def document(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_blank()
            if self.pos >= len(self.text):
                return
            line = self.line
            if self.text.startswith("[[", self.pos):
                self.advance(2)
                keys = self.key()
                self.skip_spaces()
                self.expect("]]")
                table = self.resolve_header(keys, line, array=True)
            elif self.peek() == "[":
                self.advance()
                keys = self.key()
                self.skip_spaces()
                self.expect("]")
                table = self.resolve_header(keys, line, array=False)
            else:
                self.key_value(table)
            self.skip_spaces()
            self.skip_comment()

    def resolve_header(self, keys: list[str], line: int, *, array: bool) -> KeyPath:
        path: KeyPath = ()
        for index, key in enumerate(keys):
            path = (*path, key)
            last = index == len(keys) - 1
            if last and array:
                self.lines.setdefault(path, line)
                count = self.arrays.get(path, 0)
                self.arrays[path] = count + 1
                path = (*path, count)
                self.lines[path] = line
            elif path in self.arrays:
                # A header below an array of tables extends its latest element.
                path = (*path, self.arrays[path] - 1)
            elif last:
                self.lines[path] = line
            else:
                self.lines.setdefault(path, line)
        return path

    def key_value(self, table: KeyPath) -> None:
        line = self.line
        keys = self.key()
        self.skip_spaces()
        self.expect("=")
        self.skip_spaces()
        path = table
        for key in keys[:-1]:
            path = (*path, key)
            self.lines.setdefault(path, line)
        path = (*path, keys[-1])
        self.lines[path] = line
        self.value(path)

    # Keys --------------------------------------------------------------------------------
    def key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self.skip_spaces()
            char = self.peek()
            if char == '"':
                keys.append(self.basic_string(decode=True))
            elif char == "'":
                keys.append(self.literal_string())
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if match is None:
                    raise _ScanError(f"expected a key at line {self.line}")
                keys.append(match.group())
                self.pos = match.end()
            self.skip_spaces()
            if self.peek() != ".":
                return keys
            self.advance()

    # Values ------------------------------------------------------------------------------
    def value(self, path: KeyPath) -> None:
        char = self.peek()
        if self.text.startswith('"""', self.pos):
            self.multiline_string('"')
        elif self.text.startswith("'''", self.pos):
            self.multiline_string("'")
        elif char == '"':
            self.basic_string(decode=False)
        elif char == "'":
            self.literal_string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.lines.setdefault(path, self.line)
            self.inline_table(path)
        else:
            start = self.pos
            while self.peek() and self.peek() not in _SCALAR_END:
                self.pos += 1
            if self.pos == start:
                raise _ScanError(f"expected a value at line {self.line}")

    def array(self, path: KeyPath) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip_blank()
            if self.peek() == "]":
                self.advance()
                return
            self.value((*path, index))
            index += 1
            self.skip_blank()
            if self.peek() == ",":
                self.advance()
            elif self.peek() != "]":
                raise _ScanError(f"expected ',' or ']' at line {self.line}")

    def inline_table(self, path: KeyPath) -> None:
        self.expect("{")
        self.skip_spaces()
        if self.peek() == "}":
            self.advance()
            return
        while True:
            self.key_value(path)
            self.skip_spaces()
            if self.peek() == ",":
                self.advance()
            elif self.peek() == "}":
                self.advance()
                return
            else:
                raise _ScanError(f"expected ',' or '}}' at line {self.line}")

    def multiline_string(self, quote: str) -> None:
        self.advance(3)
        while True:
            char = self.peek()
            if not char:
                raise _ScanError("unterminated multi-line string")
            if char == "\\" and quote == '"':
                self.advance(2)
            elif self.text.startswith(quote * 3, self.pos):
                # Up to two quotes may sit right before the closing delimiter: eat the run.
                while self.peek() == quote:
                    self.advance()
                return
            else:
                self.advance()

    def literal_string(self) -> str:
        self.advance()
        end = self.text.find("'", self.pos)
        newline = self.text.find("\n", self.pos)
        if end < 0 or 0 <= newline < end:
            raise _ScanError(f"unterminated string at line {self.line}")
        content = self.text[self.pos : end]
        self.pos = end + 1
        return content

    def basic_string(self, *, decode: bool) -> str:
        self.advance()
        parts: list[str] = []
        while True:
            char = self.peek()
            if char in ("", "\n"):
                raise _ScanError(f"unterminated string at line {self.line}")
            self.pos += 1
            if char == '"':
                return "".join(parts)
            if char != "\\":
                parts.append(char)
                continue
            escape = self.peek()
            self.pos += 1
            if escape in _SIMPLE_ESCAPES:
                parts.append(_SIMPLE_ESCAPES[escape])
            elif escape in _HEX_ESCAPES:
                width = _HEX_ESCAPES[escape]
                digits = self.text[self.pos : self.pos + width]
                self.pos += width
                if decode:
                    try:
                        parts.append(chr(int(digits, 16)))
                    except ValueError:
                        raise _ScanError(f"bad escape at line {self.line}") from None
            else:
                raise _ScanError(f"bad escape at line {self.line}")
