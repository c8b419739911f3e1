"""The ONNX graph builder's rewrites: reshape chains, dead-node pruning, naming a value as a
graph output. Each is checked for structure and for equal results in onnxruntime."""
import numpy as np
import onnxruntime as ort
from onnx import helper

from rwkvtools.export.graph import FLOAT, GraphBuilder, value_info


def build(g: GraphBuilder, inputs, outputs):
    proto = g.graph("t", inputs, outputs)
    m = helper.make_model(proto, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return m, ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


def test_reshape_of_a_reshape_reads_the_first_input_when_that_cannot_change_the_result():
    g = GraphBuilder(17)
    a = g.reshape("x", (0, 4, 6))             # (B, 24) -> (B, 4, 6)
    b = g.reshape(a, (0, 2, 12))              # collapses: 0 only at axis 0, kept by the first
    c = g.reshape(a, (0, 0, 3, 2))            # 0 past axis 0 copies a dim of a: must read a
    d = g.reshape(g.reshape("x", (-1, 12)), (0, 12))  # the first changed axis 0: must not collapse
    g.op("Identity", b, out="b")
    g.op("Identity", c, out="c")
    g.op("Identity", d, out="d")
    m, sess = build(g, [value_info("x", FLOAT, ["batch", 24])],
                    [value_info(n, FLOAT, None) for n in "bcd"])
    readers = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "Reshape"}
    assert readers[b] == "x" and readers[c] == a and readers[a] == "x"
    assert readers[d] != "x"
    x = np.arange(3 * 24, dtype=np.float32).reshape(3, 24)
    rb, rc, rd = sess.run(None, {"x": x})
    assert np.array_equal(rb, x.reshape(3, 2, 12)) and np.array_equal(rc, x.reshape(3, 4, 3, 2))
    assert np.array_equal(rd, x.reshape(6, 12))


def test_nodes_nothing_reads_are_pruned_and_subgraph_reads_keep_their_producers():
    g = GraphBuilder(17)
    g.op("Exp", "x")                                          # read by nothing: pruned
    kept = g.reshape(g.reshape("x", (0, 2, 2)), (0, 4))       # the inner reshape is bypassed: pruned
    outer = g.op("Neg", "x")                                  # read only inside the Loop body
    b = g.sub()
    i, c, s = b.fresh("i"), b.fresh("c"), b.fresh("s")
    body = b.graph("body", [value_info(i, 7, []), value_info(c, 9, []), value_info(s, FLOAT, ["batch", 4])],
                   [value_info(b.op("Identity", c), 9, []), value_info(b.op("Add", s, outer), FLOAT, ["batch", 4])])
    loop = g.op("Loop", g.const(2, np.int64), g.const(True, np.bool_), kept, body=body)
    g.op("Identity", loop, out="y")
    m, sess = build(g, [value_info("x", FLOAT, ["batch", 4])], [value_info("y", FLOAT, None)])
    ops = [n.op_type for n in m.graph.node]
    assert "Exp" not in ops and ops.count("Reshape") == 1 and "Neg" in ops
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    assert np.allclose(sess.run(None, {"x": x})[0], x - 2 * x)


def test_name_output_renames_the_producer_and_its_readers_without_a_copy():
    g = GraphBuilder(17)
    s = g.op("Add", "x", g.const(1.0))
    r = g.op("Mul", s, g.const(2.0))                          # s is also read inside the graph
    g.name_output(s, "state_out")
    g.name_output("x", "echo")                                # a graph input: an Identity
    g.op("Identity", r, out="r")
    m, sess = build(g, [value_info("x", FLOAT, [3])],
                    [value_info(n, FLOAT, None) for n in ("state_out", "echo", "r")])
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Identity") == 2 and s not in {v for n in m.graph.node for v in (*n.input, *n.output)}
    x = np.array([1.0, 2.0, 3.0], np.float32)
    so, echo, rr = sess.run(None, {"x": x})
    assert np.array_equal(so, x + 1) and np.array_equal(echo, x) and np.array_equal(rr, (x + 1) * 2)


def test_name_output_copies_a_value_a_subgraph_reads_by_name():
    g = GraphBuilder(17)
    outer = g.op("Neg", "x")
    b = g.sub()
    i, c, s = b.fresh("i"), b.fresh("c"), b.fresh("s")
    body = b.graph("body", [value_info(i, 7, []), value_info(c, 9, []), value_info(s, FLOAT, [3])],
                   [value_info(b.op("Identity", c), 9, []), value_info(b.op("Add", s, outer), FLOAT, [3])])
    loop = g.op("Loop", g.const(2, np.int64), g.const(True, np.bool_), "x", body=body)
    g.name_output(outer, "neg")                               # the body reads `outer`: keep it, copy
    g.op("Identity", loop, out="y")
    m, sess = build(g, [value_info("x", FLOAT, [3])], [value_info("neg", FLOAT, None), value_info("y", FLOAT, None)])
    assert any(n.op_type == "Identity" and list(n.input) == [outer] for n in m.graph.node)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    neg, y = sess.run(None, {"x": x})
    assert np.array_equal(neg, -x) and np.allclose(y, x - 2 * x)



def test_name_output_twice_keeps_both_outputs():
    """A value already named as a graph output and named again gets a copy: both outputs stay."""
    g = GraphBuilder(17)
    s = g.op("Add", "x", g.const(1.0))
    g.name_output(s, "a")
    g.name_output("a", "b")
    m, sess = build(g, [value_info("x", FLOAT, [3])], [value_info(n, FLOAT, None) for n in ("a", "b")])
    x = np.array([1.0, 2.0, 3.0], np.float32)
    a, b = sess.run(None, {"x": x})
    assert np.array_equal(a, x + 1) and np.array_equal(b, x + 1)


def test_initializers_asked_for_under_one_name_get_distinct_names():
    g = GraphBuilder(17)
    w1 = g.tensor(np.full(3, 2.0, np.float32), name="w")
    w2 = g.tensor(np.full(3, 5.0, np.float32), name="w")
    assert w1 == "w" and w2 != "w"
    g.op("Add", g.op("Mul", "x", w1), w2, out="y")
    m, sess = build(g, [value_info("x", FLOAT, [3])], [value_info("y", FLOAT, None)])
    assert len({t.name for t in m.graph.initializer}) == len(m.graph.initializer) == 2
    x = np.array([1.0, 2.0, 3.0], np.float32)
    assert np.array_equal(sess.run(None, {"x": x})[0], 2 * x + 5)
