"""An ONNX file's inputs and external-data references, read straight from its protobuf wire format,
and the input shapes a user gives to fix its dynamic dimensions.

No onnx import: this runs in the web process and the CLI, so a damaged file, a dynamic dimension
left unfixed or weights that point outside the upload are refused before a model row exists. The
import job checks the same things again with the real libraries (services/engine/imported.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from services.errors import UserError

ELEM_TYPES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
              9: "bool", 10: "float16", 11: "double", 12: "uint32", 13: "uint64", 16: "bfloat16"}


class _NotProtobuf(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _NotProtobuf
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of one message; value is an int or a (start, end) slice."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _NotProtobuf
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = (pos, pos + 8), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = (pos, pos + 4), pos + 4
        else:
            raise _NotProtobuf
        if pos > end:
            raise _NotProtobuf
        yield number, wire, value


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class OnnxInput:
    name: str
    elem_type: str
    dims: list | None  # int for a fixed size, str (its name) or None for a dynamic one; None when undeclared


@dataclass
class OnnxSummary:
    inputs: list[OnnxInput]
    external: list[tuple[str, str]]  # (tensor name, location) of weights kept in another file


def _tensor_summary(buf, span) -> tuple[str, str | None]:
    name, location, external = "", None, False
    for number, wire, value in _fields(buf, *span):
        if number == 8 and wire == 2:
            name = _text(buf, value)
        elif number == 14 and wire == 0:  # data_location: EXTERNAL = 1
            external = value == 1
        elif number == 13 and wire == 2:  # external_data: key/value entries
            key = val = None
            for n, w, v in _fields(buf, *value):
                if n == 1 and w == 2:
                    key = _text(buf, v)
                elif n == 2 and w == 2:
                    val = _text(buf, v)
            if key == "location":
                location = val
    return name, (location or "") if external else None


def _value_info(buf, span) -> OnnxInput:
    name, elem, dims, kind = "", "", None, None
    for number, wire, value in _fields(buf, *span):
        if number == 1 and wire == 2:
            name = _text(buf, value)
        elif number == 2 and wire == 2:
            for n, w, v in _fields(buf, *value):
                if n == 1 and w == 2:
                    kind = "tensor"
                    for tn, tw, tv in _fields(buf, *v):
                        if tn == 1 and tw == 0:
                            elem = ELEM_TYPES.get(tv, f"type {tv}")
                        elif tn == 2 and tw == 2:
                            dims = []
                            for dn, dw, dv in _fields(buf, *tv):
                                if dn == 1 and dw == 2:
                                    dim = None
                                    for fn, fw, fv in _fields(buf, *dv):
                                        if fn == 1 and fw == 0:
                                            dim = _signed(fv)
                                        elif fn == 2 and fw == 2:
                                            dim = _text(buf, fv)
                                    dims.append(dim)
                elif n in (4, 5, 8, 9) and kind is None:
                    kind = {4: "sequence", 5: "map", 8: "optional", 9: "sparse tensor"}[n]
    if kind != "tensor":
        raise UserError(f"The model's input {name!r} is a {kind or 'value of unknown type'}; only tensor inputs "
                        f"are supported.", field="file")
    return OnnxInput(name, elem, dims)


def read_onnx_summary(data, filename: str) -> OnnxSummary:
    """The graph's real inputs (initializers excluded) and external-data references, without onnx."""
    buf = memoryview(data)
    not_onnx = UserError(f"{filename} is not a valid ONNX model: it is truncated, damaged or not ONNX at all.",
                         field="file")
    try:
        top = {}
        for number, wire, value in _fields(buf, 0, len(buf)):
            top.setdefault((number, wire), value)
        if (1, 0) not in top or (7, 2) not in top:  # ir_version and graph
            raise not_onnx
        inputs, initializers, external = [], set(), []
        for number, wire, value in _fields(buf, *top[(7, 2)]):
            if number == 11 and wire == 2:
                inputs.append(_value_info(buf, value))
            elif number == 5 and wire == 2:
                name, location = _tensor_summary(buf, value)
                initializers.add(name)
                if location is not None:
                    external.append((name, location))
    except _NotProtobuf:
        raise not_onnx from None
    return OnnxSummary([i for i in inputs if i.name not in initializers], external)


def check_external_locations(summary: OnnxSummary, onnx_name: str, files: set[str] | None) -> None:
    """Weights in another file must sit beside the model, inside the upload; files=None: a lone .onnx file."""
    folder = PurePosixPath(onnx_name).parent
    for tensor, location in summary.external:
        where = location.replace("\\", "/")
        parts = PurePosixPath(where).parts
        if not where or where.startswith("/") or re.match(r"^[A-Za-z]:", where) or ".." in parts:
            raise UserError(f"The ONNX model's weights point outside its folder ({location!r} for {tensor}); "
                            f"external data must sit beside the model, so it was refused.", field="file")
        if files is None:
            raise UserError(f"The ONNX model keeps its weights in a separate file ({location}); upload the .onnx "
                            f"file and that file together in a zip.", field="file")
        if str(folder / where) not in files:
            raise UserError(f"The ONNX model's weights file {location} is not in the upload.", field="file")


# ---- input shapes --------------------------------------------------------------------------

def parse_input_shapes(items) -> dict[str, list]:
    """'NAME=D1,D2,…' strings (or a dict) -> {name: [dims]}. The first dimension may be a word
    such as 'batch' (it is the batch axis); the others are positive whole numbers."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [line for line in re.split(r"[\n;]", items) if line.strip()]
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            name, sep, dims = str(item).partition("=")
            if not sep or not name.strip() or not dims.strip():
                raise UserError(f"Input shape {item!r} must look like NAME=D1,D2,… (for example "
                                f"input=1,3,224,224).", field="input_shapes")
            pairs.append((name.strip(), dims.split(",")))
    shapes = {}
    for name, dims in pairs:
        clean = []
        for index, dim in enumerate(dims):
            text = str(dim).strip()
            if re.fullmatch(r"\d+", text) and int(text) > 0:
                clean.append(int(text))
            elif index == 0 and re.fullmatch(r"[A-Za-z_?][\w?]*", text):
                clean.append(text)
            else:
                raise UserError(f"Input shape for {name!r}: {text!r} is not a size; sizes are positive whole "
                                f"numbers (only the first, the batch, may be a name such as 'batch').",
                                field="input_shapes")
        if name in shapes:
            raise UserError(f"Input shape for {name!r} is given twice.", field="input_shapes")
        shapes[name] = clean
    return shapes


def resolve_shapes(inputs: list[OnnxInput], given: dict[str, list]) -> dict[str, dict]:
    """Per input: its element type, whether its batch (first) dimension is dynamic, and the shape of
    one sample. A dynamic dimension after the first must be fixed by `given`, else refused by name."""
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise UserError(f"The model has no input {name!r}; its inputs are {', '.join(names)}.",
                            field="input_shapes")
    out = {}
    for item in inputs:
        dims = item.dims
        wanted = given.get(item.name)
        if dims is None:  # the graph does not declare a shape: the user's is the shape
            if wanted is None:
                raise UserError(f"The model's input {item.name!r} declares no shape; give it with --input-shape "
                                f"{item.name}=batch,… (on the Models page: the input shapes field).",
                                field="input_shapes")
            dims = [None] * len(wanted)
        if not dims:
            raise UserError(f"The model's input {item.name!r} is a scalar; only inputs with a batch dimension "
                            f"are supported.", field="input_shapes")
        if wanted is not None and len(wanted) != len(dims):
            raise UserError(f"The model's input {item.name!r} has {len(dims)} dimensions; the input shape given "
                            f"for it has {len(wanted)}.", field="input_shapes")
        sample = []
        for index, dim in enumerate(dims):
            value = wanted[index] if wanted is not None else None
            if index == 0:
                continue
            if isinstance(dim, int) and dim > 0:
                if isinstance(value, int) and value != dim:
                    raise UserError(f"The model's input {item.name!r} has size {dim} at dimension {index + 1}; "
                                    f"the input shape given for it says {value}.", field="input_shapes")
                sample.append(dim)
            elif isinstance(value, int):
                sample.append(value)
            else:
                label = f"'{dim}'" if isinstance(dim, str) and dim else "(unnamed)"
                example = ",".join(["batch"] + [str(d) if isinstance(d, int) and d > 0 else "N" for d in dims[1:]])
                raise UserError(f"The model's input {item.name!r} has a dynamic dimension {label} (dimension "
                                f"{index + 1} of {len(dims)}) that no input shape fixes; give its size with "
                                f"--input-shape {item.name}={example} (on the Models page: the input shapes field).",
                                field="input_shapes")
        first = dims[0]
        batch = first if isinstance(first, int) and first > 0 else "dynamic"
        out[item.name] = {"dtype": item.elem_type, "batch": batch, "sample_shape": sample}
    return out


def read_first_output(data) -> dict | None:
    """The name and declared dims of an ONNX graph's first output, from the wire format (None when
    unreadable: the import job reads it again with ONNX Runtime)."""
    buf = memoryview(data)
    try:
        graph = next((value for number, wire, value in _fields(buf, 0, len(buf)) if number == 7 and wire == 2), None)
        if graph is None:
            return None
        for number, wire, value in _fields(buf, *graph):
            if number == 12 and wire == 2:
                output = _value_info(buf, value)
                return {"name": output.name, "dims": output.dims}
    except (_NotProtobuf, UserError):
        return None
    return None
