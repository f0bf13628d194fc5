"""Hostile inputs for the service fuzzers (tests/test_fuzz_services.py): hypothesis strategies
that build any protobuf message from its descriptor with values chosen to hurt (boundaries of
every integer type, NaN and infinities, 10,000-character and NUL-bearing strings, refs past
uint32, JSON nested 50,000 deep, unknown enum numbers, long repeated fields), mixed with
plausible values (a real tenant, ref, digest, adapter config and weights) so that a case gets
past the first check and into the code behind it; raw request bytes (random, and real messages
truncated or with bytes flipped); and hostile JSON bodies for the HTTP routes.

The fuzzers assert what no input may cause: INTERNAL or UNKNOWN (a bug that escaped a
handler), a call that outlives its deadline (a hang), a dead process, or an HTTP 500."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from hypothesis import strategies as st

DEEP_JSON = '{"a":' * 50_000 + "1" + "}" * 50_000
HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "../../../etc/passwd",
    "/",
    "@",
    "t/x@",
    "t/x@0",
    "t/x@-1",
    "t/x@4294967296",
    "t/x@99999999999999999999999",
    "t/x@1@2",
    "t//x",
    "T/X",
    "a" * 10_000,
    "é🙂\u202e\u200b",
    "%s%n%x",
    "' OR 1=1 --",
    "{}",
    "[]",
    "null",
    "NaN",
    "-1",
    "1e309",
    '{"r": 1e309, "lora_alpha": NaN}',
    DEEP_JSON,
]
HOSTILE_FLOATS = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    1e308,
    -1e308,
    5e-324,
    3.5e38,
    -1.0,
    0.5,
    1.0,
    2.0,
    1e6,
]
_INT_RANGE = {
    _d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    _d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_BOUNDARIES = [0, 1, 2, 3, 7, 8, 16, 64, 255, 256, 4096, 65536, 2**31 - 1, 2**32, 2**53, 2**63 - 1]
_FLOAT_TYPES = (_d.FieldDescriptor.TYPE_FLOAT, _d.FieldDescriptor.TYPE_DOUBLE)


@dataclass
class Plausible:
    """Values a real caller would send: what the fuzzer mixes in to get past the first check."""

    strings: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=lambda: [0, 1, 5, 17, 100])


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for b in _BOUNDARIES for v in (b, -b, b - 1, -b - 1) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def _scalar(f: _d.FieldDescriptor, p: Plausible) -> st.SearchStrategy:
    t = f.type
    if t in _INT_RANGE:
        lo, hi = _INT_RANGE[t]
        if "token" in f.name:
            return st.one_of(st.sampled_from(p.token_ids), _ints(lo, hi))
        return _ints(lo, hi)
    if t in _FLOAT_TYPES:
        return st.one_of(st.sampled_from(HOSTILE_FLOATS), st.floats(allow_nan=True))
    if t == _d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == _d.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return st.sampled_from(known + [-1, 99, 2**31 - 1])
    if t == _d.FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.sampled_from(HOSTILE_STRINGS),
            st.sampled_from(p.strings or [""]),
            st.text(max_size=40),
        )
    if t == _d.FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.sampled_from([b"", b"\x00" * 64, b"\xff" * 3]),
            st.sampled_from(p.blobs or [b""]),
            st.binary(max_size=256),
        )
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def _values(f: _d.FieldDescriptor, p: Plausible, depth: int) -> st.SearchStrategy:
    """What one (non-map) field may be set to: a value, or a list of them if repeated."""
    one = messages(f.message_type, p, depth + 1) if f.message_type else _scalar(f, p)
    if not f.is_repeated:
        return one
    lists = [st.lists(one, max_size=4)]
    if not f.message_type:  # long repeated scalars: token lists past the context, and such
        lists.append(st.lists(one, min_size=200, max_size=5000))
    return st.one_of(*lists)


def _set(msg, f: _d.FieldDescriptor, value) -> None:
    try:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            target = getattr(msg, f.name)
            vf = f.message_type.fields_by_name["value"]
            for k, v in value:
                if vf.message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif f.is_repeated:
            target = getattr(msg, f.name)
            if f.message_type is not None:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif f.message_type is not None:
            getattr(msg, f.name).CopyFrom(value)
        else:
            setattr(msg, f.name, value)
    except (TypeError, ValueError, OverflowError):
        pass  # a value this field's type cannot hold in Python (the raw-bytes cases cover it)


def messages(desc: _d.Descriptor, p: Plausible, depth: int = 0) -> st.SearchStrategy:
    """Any message of this type: each field unset or set to a hostile or plausible value."""
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.builds(cls)
    fields = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            kf = f.message_type.fields_by_name["key"]
            vf = f.message_type.fields_by_name["value"]
            vs = messages(vf.message_type, p, depth + 1) if vf.message_type else _scalar(vf, p)
            fields[f.name] = st.lists(st.tuples(_scalar(kf, p), vs), max_size=4)
        else:
            fields[f.name] = st.deferred(lambda f=f: _values(f, p, depth))

    def build(values: dict):
        msg = cls()
        for name, v in values.items():
            _set(msg, desc.fields_by_name[name], v)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


@st.composite
def raw_requests(draw, desc: _d.Descriptor, p: Plausible) -> bytes:
    """Request bytes as a broken or hostile client sends them: random bytes, a real message
    cut short, a real message with bytes flipped, or a field number and wire type it lacks."""
    kind = draw(st.sampled_from(["random", "truncated", "flipped", "unknown_field"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    data = draw(messages(desc, p)).SerializeToString()
    if kind == "truncated" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped" and data:
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)
    # Field 2047, wire type 2 (length-delimited) of 3 bytes, then the message.
    return b"\xfa\x7f\x03abc" + data


# -- HTTP -----------------------------------------------------------------------------------

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**400]),
    st.integers(),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(HOSTILE_STRINGS[:-1]),
    st.text(max_size=30),
)
json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def http_bodies(fields: dict[str, list]) -> st.SearchStrategy[bytes]:
    """Bodies for a JSON route: objects whose keys are the route's own (with plausible or
    hostile values), any JSON at all, JSON that Python's parser accepts but is not strict
    (NaN, Infinity, 1e999), nesting 50,000 deep, invalid UTF-8, or nothing."""
    import json

    keyed = st.fixed_dictionaries(
        {},
        optional={
            k: st.one_of(st.sampled_from(vs), json_values) if vs else json_values
            for k, vs in fields.items()
        },
    )

    def dump(v) -> bytes:
        return json.dumps(v).encode()

    return st.one_of(
        keyed.map(dump),
        keyed.map(dump),
        json_values.map(dump),
        st.sampled_from(
            [
                b"",
                b"{",
                b"null",
                b"[]",
                b'{"max_tokens": NaN, "temperature": Infinity}',
                b'{"max_tokens": 1e999}',
                b'{"prompt": "\xff\xfe"}',
                b'{"\\ud800": "\\udfff"}',
                DEEP_JSON.encode(),
                b"[" * 100_000,
            ]
        ),
        st.binary(max_size=256),
    )


def _paths(desc: _d.Descriptor, prefix: tuple = (), depth: int = 0):
    """Every field path of a message type, nested messages to depth 2 (map fields excluded)."""
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            continue
        yield prefix + (f,)
        if f.message_type is not None and not f.is_repeated and depth < 2:
            yield from _paths(f.message_type, prefix + (f,), depth + 1)


@st.composite
def mutated(draw, seed, p: Plausible):
    """A valid request (seed) with one to three fields, at any depth, replaced by a hostile or
    plausible value: the cases that get furthest into a handler before something is wrong."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    paths = list(_paths(seed.DESCRIPTOR))
    for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3)):
        target = msg
        for f in path[:-1]:
            target = getattr(target, f.name)
        f = path[-1]
        target.ClearField(f.name)
        _set(target, f, draw(_values(f, p, 1)))
    return msg
