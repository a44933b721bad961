"""Just enough of the protobuf wire format to rewrite one tensor and the metadata of an ONNX model.

Enrolment changes the rows of one initializer and a few ``metadata_props`` entries, and nothing
else. Doing that on the serialised bytes keeps the runtime free of the ``onnx`` package (and of
generated protobuf classes): every other field is copied byte for byte. Field numbers are
those of ``onnx.proto`` (ModelProto, GraphProto, TensorProto, StringStringEntryProto).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import PredictorError

__all__ = ["Field", "fields", "replace_initializer", "read_initializer", "metadata", "with_metadata"]

MODEL_GRAPH, MODEL_METADATA = 7, 14
GRAPH_INITIALIZER = 5
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_FLOAT_DATA, TENSOR_NAME, TENSOR_RAW_DATA, TENSOR_DATA_LOCATION = 1, 2, 4, 8, 9, 14
ENTRY_KEY, ENTRY_VALUE = 1, 2
FLOAT = 1  # TensorProto.DataType.FLOAT
VARINT, I64, LEN, I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Field:
    number: int
    wire: int
    start: int  # the key's first byte
    end: int  # one past the value's last byte
    value: int | bytes  # a varint or fixed-width number, or a LEN field's payload


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise PredictorError("the model file is not a valid ONNX protobuf (a truncated number); export it again")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> Iterator[Field]:
    """The top-level fields of one serialised message, in file order.

    Raises:
        PredictorError: the bytes are not a protobuf message.
    """
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == VARINT:
            value, pos = _varint(data, pos)
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            value, pos = int.from_bytes(data[pos : pos + width], "little"), pos + width
        elif wire == LEN:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        else:
            raise PredictorError(f"the model file is not a valid ONNX protobuf (wire type {wire}); export it again")
        if pos > len(data) or number == 0:
            raise PredictorError("the model file is not a valid ONNX protobuf (truncated); export it again")
        yield Field(number, wire, start, pos, value)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | LEN) + _encode_varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3 | VARINT) + _encode_varint(value)


def _only(data: bytes, number: int, what: str) -> Field:
    found = [f for f in fields(data) if f.number == number and f.wire == LEN]
    if len(found) != 1:
        raise PredictorError(f"the model file has {len(found)} {what}s, not one; export it again")
    return found[0]


def _tensor_name(tensor: bytes) -> str:
    for f in fields(tensor):
        if f.number == TENSOR_NAME and f.wire == LEN:
            return bytes(f.value).decode("utf-8", "replace")
    return ""


def read_initializer(model: bytes, name: str) -> np.ndarray | None:
    """The float initializer ``name`` of the model's graph as an array, or ``None`` without one.

    Raises:
        PredictorError: it is not a float tensor stored in the file.
    """
    graph = bytes(_only(model, MODEL_GRAPH, "graph").value)
    for f in fields(graph):
        if f.number == GRAPH_INITIALIZER and f.wire == LEN and _tensor_name(bytes(f.value)) == name:
            return _decode_tensor(bytes(f.value), name)
    return None


def _decode_tensor(tensor: bytes, name: str) -> np.ndarray:
    dims: list[int] = []
    raw, kind = None, None
    floats: list[float] = []
    for f in fields(tensor):
        if f.number == TENSOR_DIMS:
            if f.wire == LEN:  # packed
                payload, pos = bytes(f.value), 0
                while pos < len(payload):
                    dim, pos = _varint(payload, pos)
                    dims.append(dim)
            else:
                dims.append(int(f.value))
        elif f.number == TENSOR_DATA_TYPE:
            kind = f.value
        elif f.number == TENSOR_RAW_DATA:
            raw = bytes(f.value)
        elif f.number == TENSOR_FLOAT_DATA:
            packed = f.value if isinstance(f.value, bytes) else f.value.to_bytes(4, "little")  # packed, or one fixed32
            floats.extend(struct.unpack(f"<{len(packed) // 4}f", packed))
        elif f.number == TENSOR_DATA_LOCATION and f.value == 1:
            raise PredictorError(f"{name} is stored outside the model file (external data); enrol into a self-contained model")
    if kind != FLOAT:
        raise PredictorError(f"{name} in the model is not a float32 tensor (data type {kind!r}); export it again")
    array = np.frombuffer(raw, dtype="<f4") if raw is not None else np.asarray(floats, dtype=np.float32)
    if int(np.prod(dims)) != array.size:
        raise PredictorError(f"{name} in the model holds {array.size} numbers for a {dims} tensor; export it again")
    return array.astype(np.float32).reshape(dims)


def _encode_tensor(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype="<f4")
    out = b"".join(_varint_field(TENSOR_DIMS, d) for d in array.shape)
    out += _varint_field(TENSOR_DATA_TYPE, FLOAT)
    out += _len_field(TENSOR_NAME, name.encode("utf-8"))
    return out + _len_field(TENSOR_RAW_DATA, array.tobytes())


def _replace_field(data: bytes, old: Field, new_payload: bytes) -> bytes:
    return data[: old.start] + _len_field(old.number, new_payload) + data[old.end :]


def replace_initializer(model: bytes, name: str, array: np.ndarray) -> bytes:
    """``model`` with initializer ``name`` holding ``array`` (same name, float32); every other byte kept.

    Raises:
        PredictorError: the graph has no such initializer, or more than one.
    """
    graph_field = _only(model, MODEL_GRAPH, "graph")
    graph = bytes(graph_field.value)
    found = [f for f in fields(graph) if f.number == GRAPH_INITIALIZER and f.wire == LEN and _tensor_name(bytes(f.value)) == name]
    if len(found) != 1:
        raise PredictorError(f"the model has {len(found)} initializers named {name}, not one; export it again")
    graph = _replace_field(graph, found[0], _encode_tensor(name, array))
    return _replace_field(model, graph_field, graph)


def metadata(model: bytes) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (a later duplicate key wins, as ONNX Runtime reads them)."""
    props: dict[str, str] = {}
    for f in fields(model):
        if f.number == MODEL_METADATA and f.wire == LEN:
            entry = {g.number: bytes(g.value).decode("utf-8", "replace") for g in fields(bytes(f.value)) if g.wire == LEN}
            props[entry.get(ENTRY_KEY, "")] = entry.get(ENTRY_VALUE, "")
    return props


def with_metadata(model: bytes, props: dict[str, str]) -> bytes:
    """``model`` with its ``metadata_props`` replaced by ``props`` (in that order); nothing else changes."""
    kept = b"".join(model[f.start : f.end] for f in fields(model) if f.number != MODEL_METADATA)
    entries = b"".join(
        _len_field(MODEL_METADATA, _len_field(ENTRY_KEY, k.encode("utf-8")) + _len_field(ENTRY_VALUE, v.encode("utf-8"))) for k, v in props.items()
    )
    return kept + entries
