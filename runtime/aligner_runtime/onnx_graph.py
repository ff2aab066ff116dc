"""A minimal reader of ONNX model files, for the run-time, which does not depend on the ``onnx`` package (§2).

It walks the protobuf wire format over a memory map and skips the weights by length, so a large inline model costs one
pass over its headers. It reads what loading needs: the metadata, the graph's inputs and outputs, every node's name,
op type, domain, inputs and outputs, the attributes of the steering nodes (and of the ``Constant`` nodes of inlined
steering bodies), and the byte span of each model-local function. Anything malformed is a ``ValueError``; the
callers turn it into one :class:`~aligner_runtime.errors.AlignerError` (issue 14: no traceback from any input).

Field numbers from onnx.proto3: ModelProto.graph 7, .metadata_props 14, .functions 25; GraphProto.node 1, .input 11,
.output 12; NodeProto.input 1, .output 2, .name 3, .op_type 4, .attribute 5, .domain 7; ValueInfoProto.name 1;
StringStringEntryProto.key 1, .value 2; AttributeProto.name 1, .f 2, .i 3, .t 5, .floats 7, .ints 8, .type 20;
TensorProto.dims 1, .data_type 2, .float_data 4, .int64_data 7, .raw_data 9; FunctionProto.name 1, .domain 10,
.overload 13.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract import DOMAIN, STEER_PREFIX, parse_node_name
from .errors import AlignerError

MAX_DEPTH = 8  # messages nest at most this deep in what we read (Model > Graph > Node > Attribute > Tensor)
_TENSOR_FLOAT, _TENSOR_INT64 = 1, 7  # TensorProto.DataType
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")  # ONNX Runtime's weight-only quantized operators


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(buf, start: int, end: int):
    """Yields ``(field_number, wire_type, value)``; length-delimited values are ``(offset, end)`` pairs, fixed-width
    values are their offset."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:  # no message has a field 0: a zeroed or foreign file stops here, not after a walk over it
            raise ValueError("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _string(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


@dataclass
class Attribute:
    """A numeric node attribute: ``tag`` is ``f`` (float32 values) or ``i`` (int64 values); other kinds are None."""

    name: str
    tag: str | None
    values: np.ndarray | None
    text: str | None = None  # a string attribute (``plugin_version``), for ``aligner-export inspect``


@dataclass
class Node:
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Attribute] = field(default_factory=dict)
    # sha256 of the NodeProto bytes as they lie in the file (steering nodes only): every attribute, the overload
    # and the rest, for the integrity digest of the steering nodes
    digest: str | None = None

    @property
    def is_steering(self) -> bool:
        """A steering node (function or inlined body) or one of the shared helper nodes ``/model/steer/*``."""
        return parse_node_name(self.name) is not None or self.domain == DOMAIN or self.name.startswith(STEER_PREFIX)


@dataclass
class GraphSummary:
    """What the run-time needs to know about ``model.onnx`` without loading it."""

    metadata: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    # (domain, name) -> sha256 of the FunctionProto bytes as they lie in the file.
    functions: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def steer_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.is_steering]

    def steer_layers(self, op_type: str) -> set[int]:
        return {parsed[0] for n in self.nodes
                if (parsed := parse_node_name(n.name)) is not None and parsed[1] == op_type}


def _tensor(buf, span) -> tuple[str | None, np.ndarray | None]:
    dims, dtype, raw, floats, ints = [], None, None, [], []
    for n, w, v in fields(buf, *span):
        if n == 1:
            if w == 0:
                dims.append(v)
            elif w == 2:
                pos = v[0]
                while pos < v[1]:
                    d, pos = _varint(buf, pos, v[1])
                    dims.append(d)
        elif n == 2 and w == 0:
            dtype = v
        elif n == 9 and w == 2:
            raw = bytes(buf[v[0]:v[1]])
        elif n == 4:
            if w == 2:
                floats.append(np.frombuffer(bytes(buf[v[0]:v[1]]), dtype="<f4"))
            elif w == 5:
                floats.append(np.frombuffer(bytes(buf[v:v + 4]), dtype="<f4"))
        elif n == 7:
            if w == 0:
                ints.append(np.array([v - (1 << 64) if v >= 1 << 63 else v], np.int64))
            elif w == 2:
                pos, items = v[0], []
                while pos < v[1]:
                    item, pos = _varint(buf, pos, v[1])
                    items.append(item - (1 << 64) if item >= 1 << 63 else item)
                ints.append(np.array(items, np.int64))
    count = 1
    for d in dims:  # each value takes at least one byte of the file, so a larger count is malformed
        count *= d
        if count > len(buf):
            raise ValueError(f"tensor attribute dims {dims[:8]} exceed the size of the file")
    if dtype == _TENSOR_FLOAT:
        values = np.frombuffer(raw, dtype="<f4") if raw is not None else \
            (np.concatenate(floats) if floats else np.zeros(0, np.float32))
        tag = "f"
    elif dtype == _TENSOR_INT64:
        values = np.frombuffer(raw, dtype="<i8") if raw is not None else \
            (np.concatenate(ints) if ints else np.zeros(0, np.int64))
        tag = "i"
    else:
        return None, None
    if values.size != count:
        raise ValueError(f"tensor attribute holds {values.size} values for dims {dims[:8]}")
    return tag, values.reshape(-1)


def _attribute(buf, span) -> Attribute:
    name, tag, values, text = "", None, None, None
    for n, w, v in fields(buf, *span):
        if n == 1 and w == 2:
            name = _string(buf, v)
        elif n == 4 and w == 2 and v[1] - v[0] <= 256:
            text = _string(buf, v)
        elif n == 2 and w == 5:
            tag, values = "f", np.frombuffer(bytes(buf[v:v + 4]), dtype="<f4").copy()
        elif n == 3 and w == 0:
            tag, values = "i", np.array([v - (1 << 64) if v >= 1 << 63 else v], np.int64)
        elif n == 5 and w == 2:
            tag, values = _tensor(buf, v)
    return Attribute(name, tag, values, text)


def _node(buf, span) -> Node:
    node = Node("", "", "", [], [])
    attribute_spans = []
    for n, w, v in fields(buf, *span):
        if w != 2:
            continue
        if n == 1:
            node.inputs.append(_string(buf, v))
        elif n == 2:
            node.outputs.append(_string(buf, v))
        elif n == 3:
            node.name = _string(buf, v)
        elif n == 4:
            node.op_type = _string(buf, v)
        elif n == 7:
            node.domain = _string(buf, v)
        elif n == 5:
            attribute_spans.append(v)
    # Attributes are read only where integrity needs them (steering nodes and the Constants of inlined bodies) and
    # for the weight format ``aligner-export inspect`` reports (the quantized operators' bits and block size).
    if node.is_steering or node.op_type in QUANTIZED_OPS:
        for attribute_span in attribute_spans:
            attribute = _attribute(buf, attribute_span)
            node.attributes[attribute.name] = attribute
    if node.is_steering:
        node.digest = hashlib.sha256(bytes(buf[span[0]:span[1]])).hexdigest()
    return node


def summarise(buf) -> GraphSummary:
    summary = GraphSummary()
    function_keys = set()
    graph_span = None
    for number, wire, value in fields(buf, 0, len(buf)):
        if number == 7 and wire == 2:
            graph_span = value
        elif number == 14 and wire == 2:
            key = val = ""
            for n, w, v in fields(buf, *value):
                if n == 1 and w == 2:
                    key = _string(buf, v)
                elif n == 2 and w == 2:
                    val = _string(buf, v)
            summary.metadata[key] = val
        elif number == 25 and wire == 2:
            name = domain = overload = ""
            for n, w, v in fields(buf, *value):
                if n == 1 and w == 2:
                    name = _string(buf, v)
                elif n == 10 and w == 2:
                    domain = _string(buf, v)
                elif n == 13 and w == 2:
                    overload = _string(buf, v)
            # Two bodies under one (domain, name, overload) leave it to the runtime which one runs, and the digest
            # would see only one of them.
            if (domain, name, overload) in function_keys:
                raise ValueError(f"two model-local functions are named {domain}:{name}"
                                 + (f" (overload {overload})" if overload else ""))
            function_keys.add((domain, name, overload))
            if overload:
                continue  # not what a node without an overload calls (naming one changes that node's digest)
            summary.functions[(domain, name)] = hashlib.sha256(bytes(buf[value[0]:value[1]])).hexdigest()
    if graph_span is None:
        raise ValueError("no graph in the model")
    for number, wire, value in fields(buf, *graph_span):
        if wire != 2:
            continue
        if number in (11, 12):
            name = next((_string(buf, v) for n, w, v in fields(buf, *value) if n == 1 and w == 2), "")
            (summary.inputs if number == 11 else summary.outputs).append(name)
        elif number == 1:
            summary.nodes.append(_node(buf, value))
    return summary


def read_graph_summary(path: str | Path) -> GraphSummary:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                raise ValueError("the file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return summarise(buf)
    except (OSError, ValueError, IndexError, struct.error, OverflowError, MemoryError) as exc:
        detail = str(exc)[:160]
        raise AlignerError(f"cannot read the ONNX graph {path}: "
                           f"{detail if detail.isprintable() else repr(detail)}") from None
