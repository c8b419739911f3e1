"""A small ONNX graph builder: nodes, initializers (inline or streamed to an external data
file), cached constants, opset-aware helpers and sub-graphs (Scan bodies).

Every name is made unique by one counter shared with the sub-graphs, so a body can never shadow
a name of its parent graph."""
from __future__ import annotations

import itertools
import os

import numpy as np
from onnx import GraphProto, TensorProto, helper

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL


class ExternalData:
    """Streams initializers into one data file next to the model (ONNX external data), so a
    model over the 2 GB protobuf limit is never held as one message."""

    def __init__(self, path: str, location: str, align: int = 4096, min_bytes: int = 1024):
        self.path = path
        self.location = location
        self.align = align
        self.min_bytes = min_bytes
        self.f = open(path, "wb")
        self.offset = 0

    def add(self, name: str, arr: np.ndarray, t: TensorProto | None = None) -> TensorProto:
        pad = (-self.offset) % self.align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        t = t if t is not None else TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        self.f.write(memoryview(np.asarray(arr, order="C").reshape(-1)).cast("B"))
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL
        self.offset += arr.nbytes
        return t

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()

    @property
    def bytes(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else self.offset


class GraphBuilder:
    def __init__(self, opset: int, counter=None, external: ExternalData | None = None, domains: dict | None = None,
                 proto: GraphProto | None = None):
        """``proto``: the GraphProto to fill in place (e.g. ``model.graph``), so that large
        initializers are never copied from one message into another."""
        self.opset = opset
        self.proto = proto if proto is not None else GraphProto()
        self._counter = counter if counter is not None else itertools.count()
        self.external = external
        self.domains = domains if domains is not None else {"": opset}
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._consts: dict = {}
        self._init_names: set = set()
        self.hints: list = []
        self.init_bytes = 0
        self._reshaped: dict = {}     # output of a Reshape -> (its input, its constant shape)
        self._named: set = set()      # values renamed to graph outputs by name_output

    # ------------------------------------------------------------------------------- names
    def fresh(self, hint: str = "t") -> str:
        return f"{hint}_{next(self._counter)}"

    def use_domain(self, domain: str, version: int) -> None:
        """Declare a custom operator domain (e.g. 'com.microsoft') the graph uses."""
        self.domains[domain] = max(version, self.domains.get(domain, 0))

    # ------------------------------------------------------------------------------- nodes
    def op(self, op_type: str, *inputs, n_out: int = 1, hint: str | None = None, domain: str = "",
           out: str | None = None, **attrs):
        """Append a node; returns its output name (a list when n_out > 1). ``out`` names the
        (single) output explicitly, e.g. a graph output."""
        outs = [out] if out is not None else [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        ins = ["" if i is None else i for i in inputs]
        node = helper.make_node(op_type, ins, outs, name=self.fresh("n_" + op_type), domain=domain or None, **attrs)
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    # ------------------------------------------------------------------------ initializers
    def tensor(self, arr: np.ndarray, name: str | None = None, hint: str = "w") -> str:
        """Add an initializer (streamed to the external data file when there is one and the
        tensor is not tiny); returns its name."""
        arr = np.asarray(arr, order="C")
        name = name or self.fresh(hint)
        if name in self._init_names:
            name = self.fresh(name)
        self._init_names.add(name)
        t = self.proto.initializer.add()
        if self.external is not None and arr.nbytes >= self.external.min_bytes:
            self.external.add(name, arr, t)
        else:
            t.name = name
            t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            t.dims.extend(arr.shape)
            t.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        self.init_bytes += arr.nbytes
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small constant, shared by every use of the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(arr, hint="c")
        return self._consts[key]

    def i64(self, *values) -> str:
        return self.const(list(values), np.int64)

    # ---------------------------------------------------------------------------- helpers
    def reduce(self, op_type: str, x: str, axes, keepdims: bool = True) -> str:
        """Reduce* with axes as an attribute (opset < 18) or an input (>= 18; ReduceSum >= 13)."""
        axes = [int(a) for a in axes]
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.i64(*axes), keepdims=int(keepdims))
        return self.op(op_type, x, axes=axes, keepdims=int(keepdims))

    def unsqueeze(self, x: str, *axes) -> str:
        return self.op("Unsqueeze", x, self.i64(*axes))

    def squeeze(self, x: str, *axes) -> str:
        return self.op("Squeeze", x, self.i64(*axes))

    def reshape(self, x: str, shape) -> str:
        """Reshape; a reshape of a reshape reads the first one's input instead (one node per
        chain at run time; the bypassed node is pruned if nothing else reads it). Only where the
        result cannot differ: no 0 (copy a dim) in the new shape past the first axis, and a 0
        there only if the first reshape kept that axis too."""
        if isinstance(shape, str):
            return self.op("Reshape", x, shape)
        shape = tuple(int(d) for d in shape)
        if x in self._reshaped:
            src, inner = self._reshaped[x]
            if 0 not in shape[1:] and (shape[0] != 0 or inner[0] == 0):
                x = src
        out = self.op("Reshape", x, self.i64(*shape))
        self._reshaped[out] = (x, shape)
        return out

    def slice(self, x: str, starts, ends, axes, steps=None) -> str:
        def as_in(v):
            return v if isinstance(v, str) else self.i64(*v)
        args = [x, as_in(starts), as_in(ends), as_in(axes)]
        if steps is not None:
            args.append(as_in(steps))
        return self.op("Slice", *args)

    def split(self, x: str, sizes, axis: int) -> list[str]:
        outs = self.op("Split", x, self.i64(*sizes), n_out=len(sizes), axis=axis)
        return outs if isinstance(outs, list) else [outs]

    def concat(self, xs, axis: int) -> str:
        return xs[0] if len(xs) == 1 else self.op("Concat", *xs, axis=axis)

    def name_output(self, x: str, name: str) -> None:
        """Make the value ``x`` the graph output ``name``: its producing node writes ``name``
        directly and its readers read it (no Identity copy). A graph input, a value that already
        is an output, or one a sub-graph (Scan/Loop body) reads by name gets an Identity."""
        producer = next((n for n in reversed(self.nodes) if x in n.output), None)
        read_in_body = any(x in _names_read(n) for n in self.nodes
                           if any(a.type in (a.GRAPH, a.GRAPHS) for a in n.attribute))
        if producer is None or x in self._named or read_in_body:
            self.op("Identity", x, out=name)
            return
        self._named.add(name)
        for n in self.nodes:
            for field in (n.input, n.output):
                for j, v in enumerate(field):
                    if v == x:
                        field[j] = name
        for h in self.hints:
            if h.name == x:
                h.name = name

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def hint(self, x: str, dims, elem_type: int = FLOAT) -> str:
        """Declare the (symbolic) shape of an intermediate value whose shape ONNX inference cannot
        derive (Reshape/Pad/Slice/Scan with computed sizes). onnxruntime plans buffer reuse by
        comparing shapes; without these its planner is quadratic in such values. A symbol must
        mean the same size everywhere (a wrong hint is caught by onnxruntime at run time)."""
        self.hints.append(helper.make_tensor_value_info(x, elem_type, list(dims)))
        return x

    # --------------------------------------------------------------------------- sub-graphs
    def sub(self) -> "GraphBuilder":
        """A builder for a body graph (Scan/Loop); shares names, opsets and external data."""
        return GraphBuilder(self.opset, self._counter, self.external, self.domains)

    def graph(self, name: str, inputs, outputs, doc: str = "") -> GraphProto:
        """Fill and return the GraphProto (initializers are already in it)."""
        g = self.proto
        g.name = name
        g.doc_string = doc
        g.node.extend(_live_nodes(self.nodes, {o.name for o in outputs}))
        g.input.extend(inputs)
        g.output.extend(outputs)
        g.value_info.extend(self.hints)
        return g


def _names_read(node) -> set:
    """Every value a node reads, its sub-graphs' reads of outer values included."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for body in ([a.g] if a.type == a.GRAPH else list(a.graphs)):
            for n in body.node:
                names |= _names_read(n)
    return names


def _live_nodes(nodes: list, outputs: set) -> list:
    """The nodes that contribute to ``outputs`` (in their order): a node none of whose outputs is
    read (e.g. a reshape bypassed by GraphBuilder.reshape) is dropped."""
    live = [True] * len(nodes)
    needed = set(outputs)
    for i in range(len(nodes) - 1, -1, -1):
        if any(o in needed for o in nodes[i].output):
            needed |= _names_read(nodes[i])
        else:
            live[i] = False
    return [n for n, keep in zip(nodes, live) if keep]


def value_info(name: str, elem_type: int, shape) -> object:
    return helper.make_tensor_value_info(name, elem_type, shape)
