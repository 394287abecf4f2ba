"""Reading Caffe text definitions (.prototxt): nets and solvers.

``read_net`` parses a net, applies Caffe's upgrades (V0/V1 layers, legacy inputs, see
``upgrade.py``) and remembers the source line of every layer so later errors can say
"net.prototxt:42".  ``filter_net`` applies the include/exclude rules for a phase the way
Caffe's Net::FilterNet does.  Nothing here resolves file paths or checks layer semantics.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from google.protobuf import text_format
from google.protobuf.message import Message

from graphc.errors import FileFormatError, GraphcError
from graphc.frontend import caffe_pb2 as pb
from graphc.frontend.upgrade import UpgradeError, upgrade_net, upgrade_solver

__all__ = ["NetSource", "read_net", "parse_net_text", "filter_net", "state_meets_rule",
           "read_solver", "parse_solver_text", "parse_text", "to_text", "phase_value"]


@dataclass
class NetSource:
    """A parsed and upgraded net definition.

    ``layer_lines[i]`` is the 1-based line in ``filename`` where ``net.layer[i]`` starts
    (for an Input layer made from legacy ``input:`` fields, the first such field); 0 if
    unknown (e.g. a net built in memory).
    """
    net: pb.NetParameter
    filename: str = "<net>"
    layer_lines: list[int] = field(default_factory=list)

    def where(self, i: int) -> str:
        """"file:line" of layer ``i`` (just "file" when the line is unknown)."""
        line = self.layer_lines[i] if 0 <= i < len(self.layer_lines) else 0
        return f"{self.filename}:{line}" if line else self.filename


# ---------------------------------------------------------------- nets

def read_net(path) -> NetSource:
    """Read a net .prototxt, upgrade it as Caffe does, and record layer lines."""
    return parse_net_text(_read_text(path), str(path))


def parse_net_text(text: str, filename: str = "<string>") -> NetSource:
    """Parse net definition ``text``; ``filename`` is used in error messages."""
    raw = parse_text(text, pb.NetParameter(), filename)
    entries = _top_level_fields(text)
    lines = {"layer": [], "layers": [], "input": []}
    for name, line in entries:
        key = "input" if name in ("input", "input_shape", "input_dim") else name
        if key in lines:
            lines[key].append(line)
    try:
        net, origins = upgrade_net(raw)
    except UpgradeError as e:
        line = 0
        if e.origin is not None:
            kind, k = e.origin
            line = lines[kind][k] if k < len(lines[kind]) else 0
        raise e.located(where=f"{filename}:{line}" if line else filename)
    layer_lines = []
    for kind, k in origins:
        src = lines[kind]
        layer_lines.append(src[k] if k < len(src) else 0)
    return NetSource(net, filename, layer_lines)


# ---------------------------------------------------------------- filtering

def phase_value(phase) -> int:
    """"train"/"test" (any case) or caffe_pb2.TRAIN/TEST -> caffe_pb2.Phase value."""
    if isinstance(phase, str):
        key = phase.upper()
        if key in ("TRAIN", "TEST"):
            return pb.Phase.Value(key)
    elif phase in (pb.TRAIN, pb.TEST):
        return int(phase)
    raise GraphcError(f"unknown phase {phase!r}", hint="use 'train' or 'test'")


def state_meets_rule(state: pb.NetState, rule: pb.NetStateRule) -> bool:
    """Caffe's Net::StateMeetsRule: every condition set in ``rule`` must hold: the phase
    matches, min_level <= level <= max_level, the state has ALL ``stage``s and NONE of the
    ``not_stage``s."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(net, phase=None, level: int | None = None,
               stages: Iterable[str] = ()) -> tuple[pb.NetParameter, list[int]]:
    """Keep the layers that Caffe's Net::FilterNet keeps; return (net, kept indices).

    ``net`` is a NetParameter or a NetSource (then errors carry the layer's line).  The
    state starts from ``net.state`` (Caffe's defaults: phase TEST, level 0, no stages); a
    given ``phase`` or ``level`` replaces its phase or level and ``stages`` are added to its
    stages, as Caffe's Net(param_file, phase, level, stages) constructor does.  The returned
    net carries that state.

    A layer without include rules is kept unless the state meets one of its exclude rules;
    a layer with include rules is kept only if the state meets at least one of them.
    """
    source = net if isinstance(net, NetSource) else None
    param = source.net if source else net
    state = pb.NetState()
    state.CopyFrom(param.state)
    if phase is not None:
        state.phase = phase_value(phase)
    if level is not None:
        state.level = int(level)
    state.stage.extend([stages] if isinstance(stages, str) else stages)

    out = pb.NetParameter()
    out.CopyFrom(param)
    out.ClearField("layer")
    out.state.CopyFrom(state)
    kept = []
    for i, layer in enumerate(param.layer):
        if layer.include and layer.exclude:
            raise GraphcError(
                "the layer has both include and exclude rules",
                where=source.where(i) if source else None, layer=layer.name,
                layer_type=layer.type,
                hint="specify either include { } rules or exclude { } rules, not both")
        if layer.include:
            keep = any(state_meets_rule(state, r) for r in layer.include)
        else:
            keep = not any(state_meets_rule(state, r) for r in layer.exclude)
        if keep:
            out.layer.add().CopyFrom(layer)
            kept.append(i)
    return out, kept


# ---------------------------------------------------------------- solvers

def read_solver(path) -> pb.SolverParameter:
    """Read a solver .prototxt and apply Caffe's solver upgrades (solver_type -> type).
    Paths inside it (net, snapshot_prefix, ...) are left as written."""
    return parse_solver_text(_read_text(path), str(path))


def parse_solver_text(text: str, filename: str = "<string>") -> pb.SolverParameter:
    solver = parse_text(text, pb.SolverParameter(), filename)
    try:
        return upgrade_solver(solver)
    except UpgradeError as e:
        line = next((ln for name, ln in _top_level_fields(text) if name == "solver_type"), 0)
        raise e.located(where=f"{filename}:{line}" if line else filename)


# ---------------------------------------------------------------- text

def to_text(message: Message) -> str:
    """Prototxt text of ``message`` (floats printed so they read back exactly)."""
    return text_format.MessageToString(message, as_utf8=True)


def parse_text(text: str, message: Message, filename: str = "<string>") -> Message:
    """Parse prototxt ``text`` into ``message``; syntax and schema errors become
    FileFormatError with where="file:line", naming the field and what to change."""
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise _parse_error(e, text, filename) from None
    return message


def _read_text(path) -> str:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileFormatError(f"cannot read the file: {e.strerror or e}", where=str(path),
                              hint="check the path") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not _CONTROL_BYTES.search(data[:65536]):
        # not UTF-8 (e.g. a Latin-1 comment): Caffe reads bytes; keep going with U+FFFD
        return data.decode("utf-8", errors="replace")
    raise FileFormatError(
        "this looks like a binary file (a .caffemodel, .solverstate, .binaryproto or HDF5 "
        "file?), not a text .prototxt", where=str(path),
        hint="pass the text .prototxt definition here; trained weights (.caffemodel) are "
             "given separately (--weights)")


# bytes that never occur in a text file (all control characters except \t \n \v \f \r)
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_PREFIX = re.compile(r"^\d+:\d+ : ")
_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "?([\w.\[\]]+)"?')
_NO_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named "?([\w-]+)"?')
_MULTIPLE = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields')
_FIELD_BEFORE = re.compile(r"([A-Za-z_]\w*)\s*:?\s*$")


def _parse_error(e: text_format.ParseError, text: str, filename: str) -> FileFormatError:
    line, col = e.GetLine(), e.GetColumn()
    msg = _PREFIX.sub("", str(e))
    msg = re.sub(r"^'.*?': ", "", msg) if msg.startswith("'") else msg
    msg = msg.rstrip(".")
    where = f"{filename}:{line}" if line else filename
    source_line = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
    value_field = None
    if col:
        m = _FIELD_BEFORE.search(source_line[:col - 1].rstrip())
        value_field = m.group(1) if m else None
    hint = "check the syntax at this point of the file"

    if m := _NO_FIELD.search(msg):
        mtype, name = m.group(1), m.group(2)
        msg = f"unknown field '{name}' in a {_short(mtype)}"
        hint = _unknown_field_hint(mtype, name)
    elif m := _NO_ENUM.search(msg):
        enum = pb.DESCRIPTOR.pool.FindEnumTypeByName(m.group(1))
        values = ", ".join(v.name for v in enum.values)
        what = f"field '{value_field}'" if value_field else "this field"
        msg = f"{what} has no value '{m.group(2)}' ({_short(m.group(1))})"
        hint = f"use one of: {values}"
    elif m := _MULTIPLE.search(msg):
        msg = f"field '{m.group(2)}' is given more than once in a {_short(m.group(1))}"
        hint = f"'{m.group(2)}' takes a single value; keep one"
    elif msg.startswith("Couldn't parse") or msg.startswith("Value out of range") \
            or msg.startswith("Invalid value"):
        what = f"field '{value_field}'" if value_field else "this field"
        msg = f"bad value for {what}: {msg}"
        if "integer" in msg:
            hint = "this field takes a whole number (no decimal point)"
        elif "out of range" in msg:
            hint = "this field takes a non-negative number that fits in 32 bits" \
                if "-" in msg else "the number is too large for this field"
        elif "bool" in msg:
            hint = "this field takes true or false"
        elif "float" in msg or "double" in msg:
            hint = "this field takes a number"
        else:
            hint = "check the value's type against caffe.proto"
    elif "missing ending quote" in msg:
        hint = "close the string with a matching quote on the same line"
    elif msg.startswith("Expected"):
        hint = ("check that every '{' has a matching '}' and that each field name is "
                "followed by ':' and a value, or by '{'")
        unclosed = _unclosed_brace_line(text)
        if unclosed:
            hint = f"the '{{' opened on line {unclosed} is never closed; add the missing '}}'"
    if col:
        msg = f"column {col}: {msg}"
    return FileFormatError(msg, where=where, hint=hint)


def _short(full_name: str) -> str:
    return full_name.split(".", 1)[1] if full_name.startswith("caffe.") else full_name


def _unknown_field_hint(mtype: str, name: str) -> str:
    desc = pb.DESCRIPTOR.pool.FindMessageTypeByName(mtype)
    if mtype == "caffe.NetParameter" and name in pb.SolverParameter.DESCRIPTOR.fields_by_name \
            and name not in ("debug_info", "name"):
        return "this looks like a solver definition; pass it as the solver, not as the net"
    if mtype == "caffe.SolverParameter" and name in pb.NetParameter.DESCRIPTOR.fields_by_name:
        return "this looks like a net definition; the solver's 'net:' field should name it"
    if mtype == "caffe.NetParameter" and name in pb.LayerParameter.DESCRIPTOR.fields_by_name:
        return f"'{name}' belongs inside a layer {{ }} block"
    close = difflib.get_close_matches(name, list(desc.fields_by_name), n=3, cutoff=0.8)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return f"remove it or fix its spelling; {_short(mtype)} has the fields " \
           + ", ".join(sorted(desc.fields_by_name))


# ---------------------------------------------------------------- line numbers

_TOKEN = re.compile(r"""
    \#[^\n]*                                  # comment
  | "(?:\\.|[^"\\\n])*"? | '(?:\\.|[^'\\\n])*'?   # string
  | [A-Za-z_][\w.]*                           # identifier
  | [-+]?[\w.]+                               # number
  | \n
  | \S
""", re.VERBOSE)


def _top_level_fields(text: str) -> list[tuple[str, int]]:
    """(field name, 1-based line) for each top-level field occurrence, in order.

    Tracks nesting through ``{ }`` / ``< >`` and skips comments and strings.  Each element
    of a list of messages (``layer [ {...}, {...} ]``) counts as one occurrence.
    """
    out: list[tuple[str, int]] = []
    line = 1
    depth = 0
    state = "name"  # name | after_name | after_colon | list
    current = None
    name_line = 0
    scalar_seen = False
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
            continue
        if tok[0] == "#":
            continue
        if depth > 0:
            if tok in ("{", "<"):
                depth += 1
            elif tok in ("}", ">"):
                depth -= 1
            continue
        if state == "list":
            if tok in ("{", "<"):
                out.append((current, line))
                depth = 1
            elif tok == "]":
                state = "name"
            elif tok != "," and not scalar_seen:  # a list of scalars counts once
                out.append((current, line))
                scalar_seen = True
            continue
        if state == "name":
            if tok[0].isalpha() or tok[0] == "_":
                current, state = tok, "after_name"
                name_line = line
            continue
        if tok in ("{", "<"):
            out.append((current, name_line))
            depth, state = 1, "name"
        elif tok == ":" and state == "after_name":
            state = "after_colon"
        elif tok == "[":
            state, scalar_seen = "list", False
        else:  # a scalar value
            out.append((current, name_line))
            state = "name"
    return out


def _unclosed_brace_line(text: str) -> int:
    """Line of the outermost '{' (or '<') left open at the end of ``text``; 0 if none."""
    stack = []
    line = 1
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok == "\n":
            line += 1
        elif tok in ("{", "<"):
            stack.append(line)
        elif tok in ("}", ">") and stack:
            stack.pop()
    return stack[0] if stack else 0
