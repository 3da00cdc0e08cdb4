"""``lampyre opcua browse``: show an OPC UA server's address space, and write a device profile
for the variables and methods a technician picks.

The tool connects exactly as the driver does (:func:`drivers.opcua.session.open_client`: the
same security policies, client certificate, server trust list and user identity), either with
the keys of an OPC UA bus of a gateway configuration (``--config FILE --bus ID``) or with
options of the same meaning. It never connects to a server whose certificate is not trusted.

The address space is walked breadth-first, one level at a time: one Browse request for every
node of the level and one Read request for every attribute wanted at that level (both cut into
requests of ``max_items_per_request`` operations, the bus key, which servers' per-request limits
call for). A server of a few thousand nodes is therefore browsed in a few dozen round trips.

asyncua is imported only when a server is browsed: this module's parser is built every time the
``lampyre`` command line starts, and importing asyncua costs most of a second.

Exit status: 0 done; 1 the session could not be opened or was lost; 2 usage error (bad options,
a configuration or bus that cannot be used, a ``--root`` that is not on the server, a
``--select`` that matches nothing, an ``--out`` file that already exists).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import fnmatch
import json
import logging
import math
import re
import sys
import tomllib
import unicodedata
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TextIO

from agent.sdk import (
    ConfigError,
    ConfigTable,
    LampyreError,
    PointSpec,
    create_file_atomically,
)

if TYPE_CHECKING:
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.ua.attribute_ids import AttributeIds

    from .settings import BusSettings

__all__ = [
    "DEFAULT_DEPTH",
    "BrowseResult",
    "BrowsedNode",
    "MethodArgument",
    "Profile",
    "UsageError",
    "add_parser",
    "browse_server",
    "check_profile_points",
    "generate_profile",
    "path_matcher",
    "point_names",
    "select_nodes",
    "snake_case",
    "tree_as_json",
    "tree_as_text",
]

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

DEFAULT_DEPTH: Final = 6
"""Levels shown below the root: Objects/Vendor/Machine/Unit/Group/Variable/Property."""
POLICY_CHOICES: Final = ("Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss", "None")
"""The driver's security policies (``drivers.opcua.settings.POLICIES``, which imports asyncua:
repeated here so that building the parser stays cheap; a test keeps the two equal)."""
MODE_CHOICES: Final = ("SignAndEncrypt", "Sign")
STANDALONE_BUS_ID: Final = "browse"
"""The bus id in messages when the connection comes from options, not from a configuration."""
MAX_POINT_NAME_CHARS: Final = 64
VALUE_TEXT_CHARS: Final = 60
"""A value shown in the tree or in a profile comment is cut after this many characters."""
NAME_COLUMN_MAX: Final = 44
NODE_ID_COLUMN_MAX: Final = 48
TYPE_COLUMN_MAX: Final = 16
"""Columns are aligned up to these widths; a longer cell pushes the rest of its line."""
MAX_PATH_DEPTH: Final = 32
"""How far up from a ``--root`` node id its browse path from Objects is looked for."""

_Holder = Literal["inputs", "outputs", "unit"]
"""What a property read for its parent holds: method arguments or a variable's unit."""
_NODE_ID_PREFIX = re.compile(r"(?:ns|nsu|i|s|g|b)=")
"""How a ``--root`` or ``--select`` that is a node id (not a browse path) begins."""
_ARGUMENT_HOLDERS: Final[dict[str, _Holder]] = {
    "InputArguments": "inputs",
    "OutputArguments": "outputs",
}
"""A method's standard properties that hold its arguments."""
_ENGINEERING_UNITS: Final = "EngineeringUnits"
_ABSTRACT_TYPES: Final = frozenset({"BaseDataType", "Number", "Integer", "UInteger"})
"""Data types that say little: the tree adds the type of the value actually seen."""
_SCALAR_TYPES: Final = frozenset(
    {
        "Boolean", "SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64",
        "Float", "Double", "String", "DateTime", "LocalizedText", "StatusCode",
    }
)  # fmt: skip
"""Value types the driver turns into readings (a number, a boolean or a text)."""
_FLOAT_TYPES: Final = frozenset({"Float", "Double"})
_INTEGER_TYPES: Final = frozenset(
    {"SByte", "Byte", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64"}
)


class UsageError(LampyreError):
    """The command line (or what it points at) cannot be used; exit status 2."""


# --------------------------------------------------------------------------------------------
# What a browse finds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MethodArgument:
    """One input or output argument of a method."""

    name: str
    data_type: str
    is_array: bool = False

    def __str__(self) -> str:
        return f"{self.name}: {self.data_type}{'[]' if self.is_array else ''}"


@dataclass(eq=False)
class BrowsedNode:
    """One node of the address space as browsed, with the attributes read for it."""

    node_id: str
    """``ns=2;s=Cabinet.DoorOpen``: the server's form, tied to its namespace table."""
    node_id_uri: str
    """``nsu=urn:...;s=Cabinet.DoorOpen``: the same node by namespace URI, which survives a
    change of namespace index (namespace 0 and unknown indexes keep the ``ns=`` form)."""
    browse_name: str
    """The qualified browse name, ``2:DoorOpen``."""
    name: str
    """The browse name's text (its display name or identifier when the server gives none)."""
    node_class: str
    """``Object``, ``Variable``, ``Method``, ``View``, ``ObjectType``…"""
    path: str
    """Names from the Objects folder (or from a root given by node id), joined by ``/``."""
    parent: BrowsedNode | None = field(default=None, repr=False)
    is_property: bool = False
    """Reached through HasProperty: metadata of its parent rather than a quantity."""
    children: list[BrowsedNode] = field(default_factory=list, repr=False)
    expanded: bool = False
    """Its children were browsed (False at the depth limit)."""
    same_as: BrowsedNode | None = field(default=None, repr=False)
    """Set when the node was already shown elsewhere in the tree (address spaces are graphs)."""
    error: str | None = None
    """Why its children could not be browsed."""
    # Variables
    data_type: str | None = None
    data_type_id: str | None = None
    value: Any = None
    status: str | None = None
    """Status name of the value read (``Good``, ``BadWaitingForInitialData``…); None: not read."""
    variant_type: str | None = None
    access: str | None = None
    """From UserAccessLevel (what this session's user may do): ``r``, ``rw``, ``w`` or ``-``."""
    writable: bool = False
    is_array: bool = False
    unit: str | None = None
    """The EngineeringUnits property's display name, when the variable has one."""
    # Methods
    inputs: list[MethodArgument] | None = None
    outputs: list[MethodArgument] | None = None

    def walk(self) -> Iterator[BrowsedNode]:
        """This node and its descendants, in tree order (each node once)."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True, slots=True)
class BrowseResult:
    """What one browse found: the server, its namespace table and the tree."""

    endpoint: str
    policy: str
    mode: str
    namespaces: tuple[str, ...]
    root: BrowsedNode
    depth: int


# --------------------------------------------------------------------------------------------
# Point names, selection, profile
# --------------------------------------------------------------------------------------------


def snake_case(text: str) -> str:
    """``DimLevel`` → ``dim_level``, ``HTTPStatus`` → ``http_status``, ``Phase L1`` →
    ``phase_l1``; accents are dropped and other characters become ``_``. May be empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", ascii_text)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", spaced)
    return re.sub(r"[^A-Za-z0-9]+", "_", spaced).strip("_").lower()


def _name_from(segments: Sequence[str]) -> str:
    joined = "_".join(part for part in map(snake_case, segments) if part) or "point"
    if not joined[0].isalpha():
        joined = f"point_{joined}"
    return joined[:MAX_POINT_NAME_CHARS].rstrip("_")


def point_names(paths: Sequence[Sequence[str]]) -> list[str]:
    """Profile point names for browse paths (lists of browse names), in the same order.

    The leading names shared by every path are left out (``Cabinet/Circuit1/DimLevel`` and
    ``Cabinet/Circuit2/DimLevel`` give ``circuit1_dim_level`` and ``circuit2_dim_level``); each
    name is lower snake case, starts with a letter (the profile rule ``[a-z][a-z0-9_]*``), is at
    most :data:`MAX_POINT_NAME_CHARS` long, and is unique (``_2``, ``_3``… on a clash).
    """
    shared = 0
    if len(paths) > 1:
        shortest = min(len(p) for p in paths)
        while shared < shortest - 1 and all(p[shared] == paths[0][shared] for p in paths):
            shared += 1
    elif paths:
        shared = max(0, len(paths[0]) - 1)
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = _name_from(path[shared:])
        name, count = base, 1
        while name in taken:
            count += 1
            suffix = f"_{count}"
            name = base[: MAX_POINT_NAME_CHARS - len(suffix)].rstrip("_") + suffix
        taken.add(name)
        names.append(name)
    return names


def path_matcher(pattern: str) -> re.Pattern[str]:
    """A ``--select`` browse-path pattern as a regular expression: ``*`` and ``?`` stay within
    one name, ``**`` spans any number of names, ``[abc]`` is a character class."""
    out: list[str] = []
    text = pattern.strip("/")
    i = 0
    while i < len(text):
        char = text[i]
        if text.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (end := text.find("]", i + 2)) != -1:
            body = text[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            # Ranges (a-z) keep their meaning; what else is special inside a class is escaped.
            body = re.sub(r"([\\\]\[^&~|])", r"\\\1", body)
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _is_node_id(text: str) -> bool:
    return _NODE_ID_PREFIX.match(text.strip()) is not None


def _selectable(node: BrowsedNode) -> bool:
    if node.same_as is not None:
        return False
    if node.node_class == "Method":
        return True
    # Standard properties (EngineeringUnits, EURange…) describe their parent: not points.
    return node.node_class == "Variable" and not (
        node.is_property and node.browse_name.startswith("0:")
    )


def select_nodes(root: BrowsedNode, patterns: Sequence[str]) -> tuple[list[BrowsedNode], list[str]]:
    """The variables and methods under ``root`` that any pattern matches, in tree order, and
    the patterns that matched none. A pattern beginning like a node id (``ns=``, ``nsu=``,
    ``i=``, ``s=``…) is matched (``fnmatch``) against both forms of node ids, any other one
    against browse paths (:func:`path_matcher`)."""
    nodes = [n for n in root.walk() if _selectable(n)]
    chosen: dict[int, BrowsedNode] = {}
    unmatched: list[str] = []
    for pattern in patterns:
        if _is_node_id(pattern):
            text = pattern.strip()
            hits = [
                n
                for n in nodes
                if fnmatch.fnmatchcase(n.node_id, text) or fnmatch.fnmatchcase(n.node_id_uri, text)
            ]
        else:
            matcher = path_matcher(pattern)
            hits = [n for n in nodes if matcher.fullmatch(n.path)]
        if not hits:
            unmatched.append(pattern)
        for node in hits:
            chosen[id(node)] = node
    return [n for n in nodes if id(n) in chosen], unmatched


@dataclass(frozen=True, slots=True)
class Profile:
    """A generated profile: its TOML text, the point names with their nodes, and notes for the
    technician (what was left out or needs editing)."""

    text: str
    points: tuple[tuple[str, BrowsedNode], ...]
    notes: tuple[str, ...]


def _toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")  # a lone surrogate cannot be written as UTF-8
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _one_line(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]+", " ", text)


def _short(text: str) -> str:
    text = _one_line(text)
    return text if len(text) <= VALUE_TEXT_CHARS else text[: VALUE_TEXT_CHARS - 1] + "…"


def format_value(value: Any) -> str:
    """A value as a technician reads it: ``true``, ``230.4``, ``"text"``, ISO times."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bytes | bytearray):
        return f"0x{bytes(value).hex()}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    text = getattr(value, "Text", None)  # LocalizedText
    if isinstance(text, str):
        return json.dumps(text, ensure_ascii=False)
    return str(value)


def _role_hint(name: str, node: BrowsedNode) -> str | None:
    """A role the point's name suggests, offered as a comment: roles are the technician's call
    (and a profile has at most one point per role)."""
    numeric = (node.data_type or "") in _INTEGER_TYPES | _FLOAT_TYPES
    boolean = node.data_type == "Boolean"
    if numeric and node.writable and "dim" in name:
        return "dim_level"
    if numeric and "actual" in name and "level" in name:
        return "actual_level"
    if boolean and ("fail" in name or "fault" in name):
        return "lamp_failure"
    if boolean and node.writable and ("command" in name or "switch" in name):
        return "switch"
    if boolean and not node.writable and ("contactor" in name or "state" in name):
        return "switch_state"
    return None


def _placeholder(argument: MethodArgument) -> str:
    # A profile argument is a number, a boolean or a text: other types get a text to replace.
    if argument.is_array:
        return '""'
    if argument.data_type == "Boolean":
        return "false"
    if argument.data_type in _INTEGER_TYPES:
        return "0"
    if argument.data_type in _FLOAT_TYPES:
        return "0.0"
    return '""'


def _argument_text(argument: MethodArgument) -> str:
    return f"{argument.name} ({argument.data_type}{'[]' if argument.is_array else ''})"


def _usable_id(node: BrowsedNode, notes: list[str]) -> bool:
    # A profile node id may hold {name} placeholders for device parameters; a brace in the
    # server's own id would be read as one.
    if "{" in node.node_id_uri or "}" in node.node_id_uri:
        notes.append(f"{node.path}: left out, its node id {node.node_id} holds braces")
        return False
    return True


def _variable_lines(name: str, node: BrowsedNode, notes: list[str]) -> list[str] | None:
    data_type = node.data_type or "?"
    if node.is_array or (
        node.data_type not in _SCALAR_TYPES and node.variant_type not in _SCALAR_TYPES
    ):
        notes.append(
            f"{node.path}: left out, its value ({data_type}{'[]' if node.is_array else ''}) "
            "is not a single number, boolean or text"
        )
        return None
    if not _usable_id(node, notes):
        return None
    seen = (
        f"value seen: {_short(format_value(node.value))}"
        if node.status == "Good"
        else f"value not read ({node.status or 'no answer'})"
    )
    lines = [
        f"# {_one_line(node.path)}: {data_type}, {node.access or '?'}, {seen}",
        f"[points.{name}]",
        f"unit = {_toml_string(node.unit or '')}",
    ]
    if node.writable:
        lines.append("writable = true")
    role = _role_hint(name, node)
    if role is not None:
        lines.append(f'# role = "{role}"  (if this is what the point means)')
    lines.append(f"node = {_toml_string(node.node_id_uri)}")
    return lines


def _method_lines(name: str, node: BrowsedNode, notes: list[str]) -> list[str] | None:
    owner = node.parent
    inputs = node.inputs or []
    signature = f"({', '.join(map(str, inputs))}) -> ({', '.join(map(str, node.outputs or []))})"
    if owner is None or owner.node_class not in ("Object", "ObjectType"):
        notes.append(f"{node.path}: left out, the object that owns the method was not browsed")
        return None
    if not inputs:
        notes.append(
            f"{node.path}: left out, the method takes no input argument to carry a command's value"
        )
        return None
    if not (_usable_id(node, notes) and _usable_id(owner, notes)):
        return None
    lines = [
        f"# {_one_line(node.path)}: method {_one_line(node.name)}{_one_line(signature)}",
    ]
    if len(inputs) > 1:
        others = ", ".join(a.name for a in inputs[:-1])
        lines.append(
            f'# {len(inputs)} input arguments: "$value" (what a command writes) stands for'
        )
        lines.append("# the last one; the others are placeholders: set them.")
        notes.append(
            f'{node.path}: "$value" stands for the last input argument ({inputs[-1].name}); '
            f"set the placeholder value of {others} in the profile"
        )
    lines += [
        f"[points.{name}]",
        "writable = true",
        '# read_back = "POINT"  (the point that shows what the method did, for the ack)',
        f"method = {_toml_string(node.node_id_uri)}",
        f"object = {_toml_string(owner.node_id_uri)}",
    ]
    if len(inputs) == 1:
        lines.append('arguments = ["$value"]')
    else:
        lines.append("arguments = [")
        for argument in inputs[:-1]:
            lines.append(
                f"    {_placeholder(argument)},  # {_one_line(_argument_text(argument))}: "
                "placeholder, set it"
            )
        last = _one_line(_argument_text(inputs[-1]))
        lines.append(f'    "$value",  # {last}: the value a command writes')
        lines.append("]")
    return lines


def generate_profile(
    name: str,
    nodes: Sequence[BrowsedNode],
    *,
    endpoint: str,
    selections: Sequence[str],
    now: dt.datetime | None = None,
) -> Profile:
    """A Lampyre device profile (TOML) for the ``opcua`` driver with one point per node.

    Variables give ``node = "nsu=…"`` points, ``writable = true`` when this session's user may
    write them, their unit when the server states one; methods give method points
    (``method``, ``object``, ``arguments`` with ``"$value"``). Nodes that cannot be points are
    left out with a note (a profile with no point at all cannot be loaded: check
    ``points``).
    """
    notes: list[str] = []
    names = point_names([n.path.split("/") for n in nodes])
    blocks: list[list[str]] = []
    kept: list[tuple[str, BrowsedNode]] = []
    for point, node in zip(names, nodes, strict=True):
        if node.node_class == "Method":
            block = _method_lines(point, node, notes)
        else:
            block = _variable_lines(point, node, notes)
        if block is not None:
            blocks.append(block)
            kept.append((point, node))
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"# Generated by lampyre opcua browse from {_one_line(endpoint)} on {stamp},",
        f"# selecting {_one_line(', '.join(selections))}.",
        "# Check the units, give roles where they apply, and make writable only what commands",
        "# should change.",
        "[profile]",
        f"name = {_toml_string(name)}",
        'driver = "opcua"',
        f"description = {_toml_string(f'OPC UA server at {endpoint} (generated {stamp})')}",
    ]
    text = "\n\n".join("\n".join(b) for b in [head, *blocks]) + "\n"
    return Profile(text, tuple(kept), tuple(notes))


def check_profile_points(profile: Profile, file: str) -> None:
    """Parse the generated text back and run every point through the driver's point-key
    validation (:func:`drivers.opcua.settings.parse_point`): a generated profile that the
    driver would refuse is a bug here, caught before anything is written."""
    from agent.config import POINT_SPEC

    from .settings import parse_point

    data = tomllib.loads(profile.text)
    core = POINT_SPEC.names()
    for name, raw in data["points"].items():
        options = ConfigTable(
            data={k: v for k, v in raw.items() if k not in core}, file=file, path=f"points.{name}"
        )
        parse_point(
            PointSpec(
                name=name,
                unit=raw.get("unit", ""),
                writable=raw.get("writable", False),
                role=None,
                options=options,
            )
        )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _type_text(node: BrowsedNode) -> str:
    data_type = node.data_type or "?"
    if node.data_type in _ABSTRACT_TYPES and node.variant_type:
        data_type += f" ({node.variant_type})"
    return data_type + ("[]" if node.is_array else "")


def _details(node: BrowsedNode, type_width: int) -> str:
    if node.same_as is not None:
        return f"(same node as {node.same_as.path or node.same_as.name})"
    parts: list[str] = []
    if node.node_class == "Variable":
        parts.append(f"{_type_text(node):<{type_width}}  {node.access or '?':<2}")
        if node.status is not None:
            value = "" if node.value is None and node.status != "Good" else format_value(node.value)
            shown = f"= {_short(value)}" if value else ""
            if node.status != "Good":
                shown = f"{shown} ({node.status})".strip()
            parts.append(shown)
        if node.unit:
            parts.append(node.unit)
    elif node.node_class == "Method":
        inputs = ", ".join(map(str, node.inputs or []))
        outputs = ", ".join(map(str, node.outputs or []))
        parts.append(f"({inputs}) -> ({outputs})")
    if not node.expanded and node.node_class not in ("Variable", "Method"):
        parts.append("… (depth limit)")
    if node.error:
        parts.append(f"(children not browsed: {node.error})")
    return "  ".join(p for p in parts if p)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def tree_as_text(result: BrowseResult) -> str:
    """The tree, one node a line: name (indented), node id, node class, then for a variable
    its data type, access, value (and status when not Good), for a method its arguments."""
    nodes = list(result.root.walk())
    variables = [n for n in nodes if n.node_class == "Variable" and n.same_as is None]
    type_width = min(TYPE_COLUMN_MAX, max((len(_type_text(n)) for n in variables), default=0))
    rows: list[tuple[str, str, str, str]] = []

    def visit(node: BrowsedNode, level: int) -> None:
        details = _details(node, type_width)
        rows.append(("  " * level + node.name, node.node_id, node.node_class, details))
        for child in node.children:
            visit(child, level + 1)

    visit(result.root, 0)
    name_width = min(NAME_COLUMN_MAX, max(len(r[0]) for r in rows))
    id_width = min(NODE_ID_COLUMN_MAX, max(len(r[1]) for r in rows))
    class_width = max(len(r[2]) for r in rows)
    security = result.policy if result.policy == "None" else f"{result.policy}, {result.mode}"
    namespaces = ", ".join(f"{i} {uri}" for i, uri in enumerate(result.namespaces))
    lines = [f"Server {result.endpoint} ({security})", f"Namespaces: {namespaces}", ""]
    for name, node_id, node_class, details in rows:
        line = (
            f"{name:<{name_width}}  {node_id:<{id_width}}  {node_class:<{class_width}}  {details}"
        )
        lines.append(_one_line(line).rstrip())
    methods = sum(1 for n in nodes if n.node_class == "Method")
    lines.append("")
    lines.append(
        f"{_plural(len(nodes), 'node')} ({_plural(len(variables), 'variable')}, "
        f"{_plural(methods, 'method')}), {_plural(result.depth, 'level')} below "
        f"{result.root.path or result.root.name}"
    )
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, uuid.UUID):
        return str(value)
    text = getattr(value, "Text", None)
    if isinstance(text, str):
        return text
    return str(value)


def _node_json(node: BrowsedNode) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": node.name,
        "browse_name": node.browse_name,
        "path": node.path,
        "node_id": node.node_id,
        "node_id_uri": node.node_id_uri,
        "node_class": node.node_class,
    }
    if node.same_as is not None:
        out["same_as"] = node.same_as.path
        return out
    if node.node_class == "Variable":
        out.update(
            data_type=node.data_type,
            data_type_id=node.data_type_id,
            is_array=node.is_array,
            access=node.access,
            writable=node.writable,
            value=_json_value(node.value),
            status=node.status,
            unit=node.unit,
        )
        if node.is_property:
            out["is_property"] = True
    if node.node_class == "Method":
        for key, arguments in (("inputs", node.inputs), ("outputs", node.outputs)):
            out[key] = [
                {"name": a.name, "data_type": a.data_type, "is_array": a.is_array}
                for a in arguments or []
            ]
    if node.error:
        out["error"] = node.error
    out["expanded"] = node.expanded
    out["children"] = [_node_json(child) for child in node.children]
    return out


def tree_as_json(result: BrowseResult) -> str:
    """The same tree as JSON: ``{"endpoint", "security_policy", "security_mode",
    "namespaces", "depth", "root": {...node, "children": [...]}}``."""
    document = {
        "endpoint": result.endpoint,
        "security_policy": result.policy,
        "security_mode": result.mode,
        "namespaces": list(result.namespaces),
        "depth": result.depth,
        "root": _node_json(result.root),
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Browsing (asyncua)
# --------------------------------------------------------------------------------------------


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _status_name(data: ua.DataValue) -> str:
    code = data.StatusCode
    return "Good" if code is None else str(code.name)


def _good(data: ua.DataValue) -> bool:
    return data.StatusCode is None or bool(data.StatusCode.is_good())


class _Walker:
    """Breadth-first walk of one session's address space, batched per level."""

    def __init__(self, client: Client, namespaces: Sequence[str], batch: int) -> None:
        self.client = client
        self.namespaces = list(namespaces)
        self.batch = batch
        self.ids: dict[BrowsedNode, ua.NodeId] = {}
        """The asyncua node id of each node found (BrowsedNode hashes by identity)."""
        self.type_ids: dict[str, ua.NodeId] = {}

    # Node ids ------------------------------------------------------------------------------
    def local(self, expanded: ua.ExpandedNodeId | ua.NodeId) -> ua.NodeId | None:
        """A node id of this server with a namespace index (None for another server's node)."""
        from asyncua import ua

        index = expanded.NamespaceIndex
        uri = getattr(expanded, "NamespaceUri", None)
        if getattr(expanded, "ServerIndex", None):
            return None
        if uri:
            if uri not in self.namespaces:
                return None
            index = ua.Int16(self.namespaces.index(uri))
        return ua.NodeId(expanded.Identifier, index, expanded.NodeIdType)

    def uri_form(self, node_id: ua.NodeId) -> str:
        from asyncua import ua

        text: str = node_id.to_string()
        index = node_id.NamespaceIndex
        if index == 0 or index >= len(self.namespaces):
            return text
        uri = self.namespaces[index]
        if ";" in uri or not uri:
            return text  # would not parse back; keep the index form
        bare: str = ua.NodeId(node_id.Identifier, ua.Int16(0), node_id.NodeIdType).to_string()
        return f"nsu={uri};{bare}"

    def make_node(
        self,
        node_id: ua.NodeId,
        browse_name: ua.QualifiedName,
        display_name: ua.LocalizedText | None,
        node_class: ua.NodeClass,
        parent: BrowsedNode | None,
        *,
        path: str | None = None,
        is_property: bool = False,
    ) -> BrowsedNode:
        name = _display(browse_name, display_name, node_id)
        if path is None:
            path = f"{parent.path}/{name}" if parent is not None and parent.path else name
        node = BrowsedNode(
            node_id=node_id.to_string(),
            node_id_uri=self.uri_form(node_id),
            browse_name=f"{browse_name.NamespaceIndex}:{browse_name.Name or ''}",
            name=name,
            node_class=node_class.name,
            path=path,
            parent=parent,
            is_property=is_property,
        )
        self.ids[node] = node_id
        return node

    # Services, batched ---------------------------------------------------------------------
    async def browse(
        self, nodes: Sequence[ua.NodeId], *, inverse: bool = False
    ) -> list[list[ua.ReferenceDescription] | str]:
        """The hierarchical references of each node, to its children (to its parents with
        ``inverse``), or the status that says why they are unknown."""
        from asyncua import ua
        from asyncua.ua.object_ids import ObjectIds

        direction = ua.BrowseDirection.Inverse if inverse else ua.BrowseDirection.Forward
        results: list[list[ua.ReferenceDescription] | str] = []
        for chunk in _chunks(nodes, self.batch):
            params = ua.BrowseParameters()
            params.RequestedMaxReferencesPerNode = 0
            params.NodesToBrowse = [
                ua.BrowseDescription(
                    NodeId=node,
                    BrowseDirection=direction,
                    ReferenceTypeId=ua.NodeId(ua.Int32(ObjectIds.HierarchicalReferences)),
                    IncludeSubtypes=True,
                    NodeClassMask=0,
                    ResultMask=ua.BrowseResultMask.All,
                )
                for node in chunk
            ]
            answers = await self.client.uaclient.browse(params)
            # Servers may cut a long list of references: the rest comes with BrowseNext.
            pending: dict[int, bytes] = {}
            for answer in answers:
                if not answer.StatusCode.is_good():
                    results.append(answer.StatusCode.name)
                    continue
                results.append(list(answer.References))
                if answer.ContinuationPoint:
                    pending[len(results) - 1] = answer.ContinuationPoint
            while pending:
                more = ua.BrowseNextParameters()
                more.ReleaseContinuationPoints = False
                more.ContinuationPoints = list(pending.values())
                answers = await self.client.uaclient.browse_next(more)
                following: dict[int, bytes] = {}
                for position, answer in zip(list(pending), answers, strict=False):
                    found = results[position]
                    if isinstance(found, list) and answer.StatusCode.is_good():
                        found.extend(answer.References)
                        if answer.ContinuationPoint:
                            following[position] = answer.ContinuationPoint
                pending = following
        return results

    async def read(self, items: Sequence[tuple[ua.NodeId, AttributeIds]]) -> list[ua.DataValue]:
        from asyncua import ua

        values: list[ua.DataValue] = []
        for chunk in _chunks(items, self.batch):
            params = ua.ReadParameters()
            params.TimestampsToReturn = ua.TimestampsToReturn.Neither
            params.NodesToRead = [
                ua.ReadValueId(NodeId=node, AttributeId=attribute) for node, attribute in chunk
            ]
            values.extend(await self.client.uaclient.read(params))
        return values

    # The walk ------------------------------------------------------------------------------
    async def root_from_text(self, text: str | None) -> BrowsedNode:
        """The Objects folder, a node id, or a browse path under Objects."""
        from asyncua import ua
        from asyncua.ua.attribute_ids import AttributeIds
        from asyncua.ua.object_ids import ObjectIds

        objects = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder))
        if text is None:
            return self.make_node(
                objects, ua.QualifiedName("Objects", 0), None, ua.NodeClass.Object, None, path=""
            )
        if _is_node_id(text):
            from .settings import parse_node_id

            wanted = self.local(parse_node_id(text))
            if wanted is None:
                raise UsageError(f"--root {text}: the server has no namespace of that URI")
            answers = await self.read(
                [
                    (wanted, AttributeIds.BrowseName),
                    (wanted, AttributeIds.DisplayName),
                    (wanted, AttributeIds.NodeClass),
                ]
            )
            if not _good(answers[0]):
                raise UsageError(
                    f"--root {text}: no such node on the server ({_status_name(answers[0])})"
                )
            found = [a.Value.Value if a.Value is not None else None for a in answers]
            browse_name = found[0] if isinstance(found[0], ua.QualifiedName) else None
            browse_name = browse_name or ua.QualifiedName("", 0)
            display = found[1] if isinstance(found[1], ua.LocalizedText) else None
            name = _display(browse_name, display, wanted)
            path = await self.path_from_objects(wanted, name)
            return self.make_node(
                wanted,
                browse_name,
                display,
                ua.NodeClass(found[2]) if isinstance(found[2], int) else ua.NodeClass.Object,
                None,
                path=name if path is None else path,
            )
        from .settings import parse_browse_path

        current = self.make_node(
            objects, ua.QualifiedName("Objects", 0), None, ua.NodeClass.Object, None, path=""
        )
        for index, name in parse_browse_path(text):
            answer = await self.browse([self.ids[current]])
            references = answer[0] if isinstance(answer[0], list) else []
            match = next(
                (
                    r
                    for r in references
                    if _display(r.BrowseName, r.DisplayName, r.NodeId) == name
                    and (index is None or r.BrowseName.NamespaceIndex == index)
                ),
                None,
            )
            target = self.local(match.NodeId) if match is not None else None
            if match is None or target is None:
                names = ", ".join(
                    _display(r.BrowseName, r.DisplayName, r.NodeId) for r in references
                )
                where = current.path or "Objects"
                raise UsageError(
                    f"--root {text}: no {name!r} under {where} (there: {names or 'nothing'})"
                )
            current = self.make_node(
                target, match.BrowseName, match.DisplayName, match.NodeClass, current
            )
        current.parent = None
        return current

    async def path_from_objects(self, node_id: ua.NodeId, name: str) -> str | None:
        """The browse path from the Objects folder up to ``node_id``, following the first
        hierarchical parent at each step (one Browse per level); None when the node is not
        under Objects (then paths start at its own name)."""
        from asyncua import ua
        from asyncua.ua.object_ids import ObjectIds

        objects = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)).to_string()
        names = [name]
        current = node_id
        if node_id.to_string() == objects:
            return ""
        for _ in range(MAX_PATH_DEPTH):
            if current.to_string() == objects:
                return "/".join(reversed(names))
            (answer,) = await self.browse([current], inverse=True)
            parents = [] if isinstance(answer, str) else answer
            parents = [r for r in parents if self.local(r.NodeId) is not None]
            if not parents:
                return None
            parent = parents[0]
            parent_id = self.local(parent.NodeId)
            assert parent_id is not None
            if parent_id.to_string() != objects:
                names.append(_display(parent.BrowseName, parent.DisplayName, parent_id))
            current = parent_id
        return None

    async def walk(self, root: BrowsedNode, depth: int, *, show_all: bool) -> None:
        from asyncua import ua
        from asyncua.ua.object_ids import ObjectIds

        objects = ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)).to_string()
        has_property = ua.NodeId(ua.Int32(ObjectIds.HasProperty))
        seen: dict[str, BrowsedNode] = {root.node_id: root}
        frontier = [root]
        level = 0
        while frontier:
            # Methods and variables are browsed even at the depth limit: their argument and
            # EngineeringUnits properties belong on their own line.
            to_browse = [
                n for n in frontier if level < depth or n.node_class in ("Method", "Variable")
            ]
            answers = await self.browse([self.ids[n] for n in to_browse])
            holders: list[tuple[BrowsedNode, _Holder, ua.NodeId]] = []
            following: list[BrowsedNode] = []
            for node, answer in zip(to_browse, answers, strict=True):
                if isinstance(answer, str):
                    node.error = answer
                    continue
                node.expanded = level < depth and node.node_class != "Method"
                for ref in answer:
                    target = self.local(ref.NodeId)
                    if target is None:
                        continue
                    standard = ref.BrowseName.NamespaceIndex == 0
                    if node.node_class == "Method":
                        if standard and ref.BrowseName.Name in _ARGUMENT_HOLDERS:
                            holders.append((node, _ARGUMENT_HOLDERS[ref.BrowseName.Name], target))
                        continue
                    if (
                        node.node_class == "Variable"
                        and standard
                        and ref.BrowseName.Name == _ENGINEERING_UNITS
                    ):
                        holders.append((node, "unit", target))
                    if not node.expanded:
                        continue
                    if node.node_id == objects and standard and not show_all:
                        continue  # the Server object and the other standard folders
                    child = self.make_node(
                        target,
                        ref.BrowseName,
                        ref.DisplayName,
                        ref.NodeClass,
                        node,
                        is_property=ref.ReferenceTypeId == has_property,
                    )
                    node.children.append(child)
                    first = seen.get(child.node_id)
                    if first is not None:
                        child.same_as = first
                        continue
                    seen[child.node_id] = child
                    following.append(child)
            await self.read_level([n for n in frontier if n.node_class == "Variable"], holders)
            frontier = following
            level += 1
        await self.name_data_types(root)

    async def read_level(
        self,
        variables: Sequence[BrowsedNode],
        holders: Sequence[tuple[BrowsedNode, _Holder, ua.NodeId]],
    ) -> None:
        from asyncua import ua
        from asyncua.ua.attribute_ids import AttributeIds

        attributes = (
            AttributeIds.Value,
            AttributeIds.DataType,
            AttributeIds.UserAccessLevel,
            AttributeIds.AccessLevel,
            AttributeIds.ValueRank,
        )
        items = [(self.ids[n], a) for n in variables for a in attributes]
        items += [(node_id, AttributeIds.Value) for _, _, node_id in holders]
        if not items:
            return
        answers = iter(await self.read(items))
        for node in variables:
            value, data_type, user_access, access, rank = (next(answers) for _ in attributes)
            node.status = _status_name(value)
            if value.Value is not None:
                node.value = value.Value.Value
                node.variant_type = value.Value.VariantType.name
                node.is_array = bool(value.Value.is_array)
            if _good(data_type) and data_type.Value is not None:
                type_id = data_type.Value.Value
                node.data_type_id = type_id.to_string()
                self.type_ids[node.data_type_id] = type_id
            if _good(rank) and rank.Value is not None and rank.Value.Value is not None:
                node.is_array = node.is_array or rank.Value.Value >= 0
            bits = user_access if _good(user_access) else access
            if _good(bits) and bits.Value is not None:
                level = int(bits.Value.Value)
                readable = bool(level & (1 << ua.AccessLevel.CurrentRead))
                node.writable = bool(level & (1 << ua.AccessLevel.CurrentWrite))
                node.access = {
                    (True, True): "rw",
                    (True, False): "r",
                    (False, True): "w",
                    (False, False): "-",
                }[(readable, node.writable)]
        for owner, kind, _ in holders:
            answer = next(answers)
            content = answer.Value.Value if answer.Value is not None else None
            if kind == "unit":
                units = getattr(getattr(content, "DisplayName", None), "Text", None)
                owner.unit = units or None
                continue
            arguments: list[MethodArgument] = []
            for argument in content if isinstance(content, list) else []:
                type_id = argument.DataType
                self.type_ids[type_id.to_string()] = type_id
                arguments.append(
                    MethodArgument(
                        argument.Name or "?", type_id.to_string(), argument.ValueRank >= 0
                    )
                )
            if kind == "inputs":
                owner.inputs = arguments
            else:
                owner.outputs = arguments

    async def name_data_types(self, root: BrowsedNode) -> None:
        """Data type names for the ids read: standard ones from asyncua's table, the others
        (vendor structures and enumerations) by reading their BrowseName in one request."""
        from asyncua.ua.attribute_ids import AttributeIds
        from asyncua.ua.object_ids import ObjectIdNames

        names: dict[str, str] = {}
        unknown: list[tuple[str, ua.NodeId]] = []
        for text, type_id in self.type_ids.items():
            identifier = type_id.Identifier
            standard = (
                ObjectIdNames.get(identifier)
                if type_id.NamespaceIndex == 0 and isinstance(identifier, int)
                else None
            )
            if isinstance(standard, str):
                names[text] = standard
            else:
                unknown.append((text, type_id))
        if unknown:
            answers = await self.read([(t, AttributeIds.BrowseName) for _, t in unknown])
            for (text, _), answer in zip(unknown, answers, strict=True):
                if _good(answer) and answer.Value is not None:
                    names[text] = answer.Value.Value.Name

        def named(arguments: list[MethodArgument] | None) -> list[MethodArgument] | None:
            if arguments is None:
                return None
            return [
                MethodArgument(a.name, names.get(a.data_type, a.data_type), a.is_array)
                for a in arguments
            ]

        for node in root.walk():
            if node.data_type_id is not None:
                node.data_type = names.get(node.data_type_id, node.data_type_id)
            node.inputs, node.outputs = named(node.inputs), named(node.outputs)


def _display(browse_name: ua.QualifiedName, display: ua.LocalizedText | None, node_id: Any) -> str:
    """The browse name's text; a server that leaves it empty still gets a usable name (the
    display name, else the node id's identifier) so paths and patterns keep working."""
    if browse_name is not None and browse_name.Name:
        return str(browse_name.Name)
    text = getattr(display, "Text", None)
    if text:
        return str(text)
    return str(getattr(node_id, "Identifier", node_id))


async def browse_server(
    settings: BusSettings,
    *,
    bus_id: str,
    root: str | None,
    depth: int,
    show_all: bool,
) -> BrowseResult:
    """Open a session as ``settings`` say, walk the address space from ``root`` (None: the
    Objects folder) down ``depth`` levels, close. Raises ``SessionError`` (and its subclasses)
    when no session can be opened or it is lost, :class:`UsageError` for a root that is not
    on the server."""
    from asyncua.ua.uaerrors import UaError

    from .session import SessionError, close_client, open_client

    client = await open_client(settings, bus_id=bus_id, name="browse")
    try:
        walker = _Walker(client, await client.get_namespace_array(), settings.max_items_per_request)
        start = await walker.root_from_text(root)
        await walker.walk(start, depth, show_all=show_all)
        return BrowseResult(
            settings.endpoint,
            settings.policy,
            settings.mode,
            tuple(walker.namespaces),
            start,
            depth,
        )
    except (UaError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        log.debug("browsing %s failed", settings.endpoint, exc_info=True)
        raise SessionError(f"browsing {settings.endpoint} failed: {reason}") from None
    finally:
        await close_client(client)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``browse`` next to ``cert`` and ``trust``."""
    parser = commands.add_parser(
        "browse",
        help="show a server's address space; write a device profile from it",
        description="Connect to an OPC UA server the way the driver does (security, trust "
        "list, user) and show its address space under Objects as a tree: node ids, data "
        "types, access and current values, method arguments. With --profile and --select, "
        "write a Lampyre device profile for the variables and methods selected.",
    )
    parser.add_argument(
        "endpoint",
        nargs="?",
        metavar="ENDPOINT",
        help="opc.tcp://HOST:PORT/PATH (may be left out with --config, which gives it)",
    )
    connection = parser.add_argument_group(
        "connection", "with --config/--bus, options given here replace the bus table's keys"
    )
    connection.add_argument("--config", metavar="FILE", help="gateway configuration")
    connection.add_argument("--bus", metavar="ID", help="OPC UA bus of that configuration")
    connection.add_argument(
        "--policy",
        choices=POLICY_CHOICES,
        help='security policy (default Basic256Sha256; "None" only when written)',
    )
    connection.add_argument("--mode", choices=MODE_CHOICES, help="default SignAndEncrypt")
    connection.add_argument(
        "--cert", metavar="FILE", help="client certificate (lampyre opcua cert)"
    )
    connection.add_argument("--key", metavar="FILE", help="client private key (mode 0600)")
    connection.add_argument(
        "--trust-dir", metavar="DIR", help="trusted server certificates (lampyre opcua trust)"
    )
    connection.add_argument("--username", metavar="NAME", help="user name (with --password-file)")
    connection.add_argument(
        "--password-file", metavar="FILE", help="file (mode 0600) holding the password"
    )
    connection.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="trust and store the server certificate if the trust list is empty",
    )
    tree = parser.add_argument_group("tree")
    tree.add_argument(
        "--root",
        metavar="NODE",
        help="start here: a node id (ns=2;s=Cabinet, nsu=URI;s=Cabinet) or a browse path "
        "under Objects (Cabinet/Circuit1); default Objects",
    )
    tree.add_argument(
        "--depth",
        type=_depth,
        default=DEFAULT_DEPTH,
        metavar="N",
        help=f"levels below the root (default {DEFAULT_DEPTH})",
    )
    tree.add_argument(
        "--all",
        action="store_true",
        help="include the standard Server object (and the other namespace-0 folders) under Objects",
    )
    tree.add_argument("--json", action="store_true", help="print the tree as JSON")
    profile = parser.add_argument_group("profile")
    profile.add_argument("--profile", metavar="NAME", help="write a device profile of this name")
    profile.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="PATTERN",
        help="variables and methods to put in the profile: a browse path pattern "
        "(Cabinet/Circuit1/*, Cabinet/**) or a node id pattern (ns=2;s=Cabinet.*); repeatable",
    )
    profile.add_argument(
        "--out", metavar="FILE", help="write the profile there (never overwritten); default stdout"
    )
    parser.set_defaults(handler=handle)


def _depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


@dataclass(frozen=True, slots=True)
class _Request:
    """The connection the command line asks for."""

    settings: BusSettings
    bus_id: str
    standalone: bool


def _read_bus_table(path: Path, bus_id: str) -> dict[str, Any]:
    # The bus table alone, as `lampyre opcua cert` reads it: the tool must work while the rest
    # of the configuration (devices, the profile being written) is not finished.
    try:
        with path.open("rb") as file:
            root: dict[str, Any] = tomllib.load(file)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: {exc}") from None
    buses = root.get("buses")
    bus = buses.get(bus_id) if isinstance(buses, dict) else None
    if not isinstance(bus, dict):
        names = ", ".join(buses) if isinstance(buses, dict) else "none"
        raise UsageError(f"{path}: no bus {bus_id!r} (buses: {names})")
    if bus.get("driver") != "opcua":
        raise UsageError(f"bus {bus_id!r} uses the {bus.get('driver')!r} driver, not opcua")
    return {key: value for key, value in bus.items() if key != "driver"}


def _absolute(text: str) -> str:
    # Options are relative to the working directory; bus keys to the configuration's folder.
    return str(Path(text).expanduser().absolute())


def _connection(args: argparse.Namespace) -> _Request:
    from .settings import parse_bus

    standalone = not args.config
    if standalone:
        if args.bus:
            raise UsageError("--bus needs --config FILE")
        if not args.endpoint:
            raise UsageError(
                "give the server's ENDPOINT (opc.tcp://HOST:PORT/PATH) or --config FILE --bus ID"
            )
        if (args.policy or "Basic256Sha256") != "None" and not (
            args.cert and args.key and args.trust_dir
        ):
            raise UsageError(
                "a secure connection needs --cert FILE --key FILE --trust-dir DIR (create the "
                "client files with: lampyre opcua cert --out DIR), or --config FILE --bus ID"
            )
        keys: dict[str, Any] = {}
        bus_id = STANDALONE_BUS_ID
        file = "command line"
    else:
        if not args.bus:
            raise UsageError("--config needs --bus ID (the OPC UA bus to browse)")
        bus_id = args.bus
        file = args.config
        keys = _read_bus_table(Path(args.config), bus_id)
    if args.endpoint:
        keys["endpoint"] = args.endpoint
    if args.policy:
        keys["security_policy"] = args.policy
        if args.policy == "None":
            keys.pop("security_mode", None)
    if args.mode:
        keys["security_mode"] = args.mode
    for option, key in (
        ("cert", "certificate"),
        ("key", "private_key"),
        ("trust_dir", "trust_dir"),
    ):
        if getattr(args, option):
            keys[key] = _absolute(getattr(args, option))
    if args.username or args.password_file:
        if not (args.username and args.password_file):
            raise UsageError("--username and --password-file go together")
        for key in ("user_certificate", "user_private_key"):
            keys.pop(key, None)
        keys.update(
            identity="username", username=args.username, password_file=_absolute(args.password_file)
        )
    if args.trust_on_first_use:
        keys["trust_on_first_use"] = True
    table = ConfigTable(data=keys, file=file, path="" if standalone else f"buses.{bus_id}")
    try:
        settings = parse_bus(table, bus_id)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return _Request(settings, bus_id, standalone)


def _check_profile_options(args: argparse.Namespace) -> None:
    if args.profile is None:
        if args.select or args.out:
            raise UsageError("--select and --out go with --profile NAME")
        return
    from agent.config import PROFILE_NAME_PATTERN

    if not re.fullmatch(PROFILE_NAME_PATTERN, args.profile):
        raise UsageError(
            f"--profile {args.profile!r}: expected a profile name (letters, digits, '.', '_', '-')"
        )
    if not args.select:
        raise UsageError(
            "--profile needs at least one --select PATTERN (e.g. 'Cabinet/Circuit1/*')"
        )
    for pattern in args.select:
        if not _is_node_id(pattern):
            try:
                path_matcher(pattern)
            except re.error as exc:
                raise UsageError(f"--select {pattern!r}: {exc}") from None
    if args.json:
        raise UsageError("--json prints the tree; leave it out with --profile")
    if args.out:
        out = Path(args.out)
        if out.name != f"{args.profile}.toml":
            raise UsageError(
                f"--out {args.out}: a profile is found by its file name, which must be "
                f"{args.profile}.toml for --profile {args.profile}"
            )
        if out.exists() or out.is_symlink():
            raise UsageError(f"--out {args.out} already exists; it is never overwritten")
        if not out.parent.is_dir():
            raise UsageError(f"--out {args.out}: no folder {out.parent}")


def handle(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """Run ``lampyre opcua browse`` with parsed arguments; returns the exit status."""
    del stdin  # nothing is asked
    try:
        _check_profile_options(args)
        if args.root is not None:
            _check_root(args.root)
        request = _connection(args)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE)
    from .session import ClientFilesMissing, SessionError

    _quiet_library_warnings()
    try:
        result = asyncio.run(
            browse_server(
                request.settings,
                bus_id=request.bus_id,
                root=args.root,
                depth=args.depth,
                show_all=args.all,
            )
        )
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE)
    except ClientFilesMissing as exc:
        if request.standalone:
            return _fail(f"{exc} (or give other files with --cert/--key)", EXIT_FAILED)
        return _fail(exc, EXIT_FAILED)
    except SessionError as exc:
        return _fail(exc, EXIT_FAILED)
    if args.profile is None:
        print(tree_as_json(result) if args.json else tree_as_text(result))
        return EXIT_OK
    return _write_profile(args, result)


def _quiet_library_warnings() -> None:
    # Unless logging was set up by whoever runs this, Python prints warnings on stderr. asyncua
    # warns about what this tool reports better itself (a refused certificate, a session that
    # never opened) or what does not matter here; Lampyre's own warnings (a certificate
    # trusted on first use) still show.
    if not logging.getLogger().handlers:
        logging.getLogger("asyncua").setLevel(logging.ERROR)


def _check_root(text: str) -> None:
    from .settings import parse_browse_path, parse_node_id

    try:
        if _is_node_id(text):
            parse_node_id(text)
        else:
            parse_browse_path(text)
    except ValueError as exc:
        raise UsageError(f"--root {text!r}: {exc}") from None


def _fail(error: Exception | str, status: int) -> int:
    print(f"lampyre opcua browse: {error}", file=sys.stderr)
    return status


def _write_profile(args: argparse.Namespace, result: BrowseResult) -> int:
    nodes, unmatched = select_nodes(result.root, args.select)
    if unmatched:
        return _fail(
            f"--select {', '.join(unmatched)}: matched no variable or method (browse paths "
            f"start under {result.root.name}; {result.depth} levels were browsed, see --depth)",
            EXIT_USAGE,
        )
    profile = generate_profile(
        args.profile, nodes, endpoint=result.endpoint, selections=args.select
    )
    for note in profile.notes:
        print(f"note: {note}", file=sys.stderr)
    if not profile.points:
        return _fail(
            "none of the selected nodes can be a profile point; nothing written", EXIT_USAGE
        )
    try:
        check_profile_points(profile, args.out or f"{args.profile}.toml")
    except ConfigError as exc:
        # A bug of this generator, not of the server: say so rather than write a bad file.
        return _fail(f"internal error, the generated profile is refused: {exc}", EXIT_FAILED)
    if not args.out:
        sys.stdout.write(profile.text)
        return EXIT_OK
    try:
        create_file_atomically(Path(args.out), profile.text.encode("utf-8"), mode=0o644)
    except FileExistsError:
        return _fail(f"--out {args.out} already exists; it is never overwritten", EXIT_USAGE)
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror}", EXIT_FAILED)
    print(f"Profile {args.profile}: {len(profile.points)} points written to {args.out}")
    width = max(len(name) for name, _ in profile.points)
    path_width = max(len(_one_line(node.path)) for _, node in profile.points)
    for name, node in profile.points:
        kind = "method" if node.node_class == "Method" else (node.data_type or "?")
        flag = "writable" if node.writable or node.node_class == "Method" else ""
        line = f"  {name:<{width}}  {_one_line(node.path):<{path_width}}  {kind:<8}  {flag}"
        print(line.rstrip())
    return EXIT_OK
