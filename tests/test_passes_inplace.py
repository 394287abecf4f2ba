"""inplace and concat-slices: which nodes may overwrite an input, which Concats can be
written in place by their producers."""
import pytest

from graphc.errors import GraphcError
from graphc.ir import parse_graph, verify
from graphc.passes import PASSES
from graphc.passes.alias import alias_parents, root_of

from test_passes_common import check_text

R = "{negative_slope=0.0}"
SUM = '{operation="SUM", coeff=[1.0, 1.0], stable_prod_grad=true}'

IN = f'''graph "ip" {{
  input %x: f32[2,3]
  %a: f32[2,3] = TanH(%x) name="a"
  %a~r: f32[2,3] = ReLU(%a) {R} name="r" blobs=["a"]
  %b: f32[2,3] = Sigmoid(%a~r) name="b"
  %c: f32[2,3] = Eltwise(%a~r, %b) {SUM} name="c"
  %d: f32[2,3] = Softmax(%c) {{axis=1}} name="d"
  %e: f32[2,3] = AbsVal(%d) name="e"
  %f: f32[2,3] = Eltwise(%d, %e) {SUM} name="f"
  output %e, %f
}}
'''

OUT = f'''graph "ip" {{
  input %x: f32[2,3]
  %a: f32[2,3] = TanH(%x) name="a"
  %a~r: f32[2,3] = ReLU(%a) {{negative_slope=0.0, inplace=0}} name="r" blobs=["a"]
  %b: f32[2,3] = Sigmoid(%a~r) name="b"
  %c: f32[2,3] = Eltwise(%a~r, %b) {{operation="SUM", coeff=[1.0, 1.0], stable_prod_grad=true, inplace=0}} name="c"
  %d: f32[2,3] = Softmax(%c) {{axis=1}} name="d"
  %e: f32[2,3] = AbsVal(%d) name="e"
  %f: f32[2,3] = Eltwise(%d, %e) {{operation="SUM", coeff=[1.0, 1.0], stable_prod_grad=true, inplace=0}} name="f"
  output %e, %f
}}
'''


def test_inplace_marks(rng):
    # a: %x is a graph input; r: %a's last read; b: %a~r is read later by c; c: its
    # bottom 0's last read; d: Softmax is not elementwise; e: %d is read later by f;
    # f: bottom 0 (%d) is read for the last time, bottom 1 (%e) is a graph output
    check_text("inplace", IN, OUT, rng)


def test_inplace_chain_shares_one_buffer():
    out = PASSES["inplace"](verify(parse_graph(IN)))
    parents = alias_parents(out)
    assert root_of("c", parents) == ("a", 0)
    assert root_of("a~r", parents) == ("a", 0)
    assert root_of("f", parents) == ("d", 0)


VIEW = f'''graph "v" {{
  input %x: f32[2,3]
  %a: f32[2,3] = TanH(%x) name="a"
  %v: f32[6] = Reshape(%a) {{shape=[6], axis=0, num_axes=-1}} name="v"
  %b: f32[2,3] = ReLU(%a) {R} name="b"
  %c: f32[6] = AbsVal(%v) name="c"
  output %b, %c
}}
'''


def test_no_inplace_over_a_buffer_a_view_still_reads():
    # %v is %a's memory and is read after b, so b must not overwrite %a; c may overwrite %v
    out = PASSES["inplace"](verify(parse_graph(VIEW)))
    assert "inplace" not in out.node("b").attrs
    assert out.node("c").attrs["inplace"] == 0


def test_conflicting_aliases_are_an_error():
    text = f'''graph "bad" {{
  input %x: f32[1,2]
  %a: f32[1,2] = TanH(%x) name="a"
  %b: f32[1,2] = ReLU(%a) {{negative_slope=0.0, inplace=0}} name="b"
  %y: f32[1,2] = TanH(%x) name="y"
  %c: f32[1,4] = Concat(%b, %y) {{axis=1, by_slices=true}} name="c"
  output %c
}}
'''
    with pytest.raises(GraphcError, match="share memory with both"):
        alias_parents(verify(parse_graph(text)))


CONCAT = f'''graph "cat" {{
  input %x: f32[B,2,3,3]
  %a: f32[B,2,3,3] = TanH(%x) name="a"
  %b: f32[B,2,3,3] = ReLU(%x) {R} name="b"
  %c: f32[B,4,3,3] = Concat(%a, %b) {{axis=1}} name="c"
  %d: f32[B,4,3,3] = Sigmoid(%c) name="d"
  output %d
}}
'''


def test_concat_by_slices_at_batch_1(rng):
    text = CONCAT.replace("B", "1")
    want = text.replace("{axis=1}", "{axis=1, by_slices=true}")
    g, out = check_text("concat-slices", text, want, rng)
    after = PASSES["inplace"](out)
    # producers of slices never overwrite their input; the Concat's reader may
    assert "inplace" not in after.node("a").attrs and "inplace" not in after.node("b").attrs
    assert after.node("d").attrs["inplace"] == 0
    parents = alias_parents(after)
    assert root_of("b", parents) == ("c", 2 * 9 * 4)
    assert root_of("d", parents) == ("c", 0)


def test_concat_not_by_slices_at_batch_2_on_axis_1():
    text = CONCAT.replace("B", "2")
    check_text("concat-slices", text, text)


def test_concat_by_slices_on_axis_0_at_any_batch():
    text = (CONCAT.replace("f32[B,4,3,3]", "f32[4,2,3,3]").replace("B", "2")
            .replace("{axis=1}", "{axis=0}"))
    out = PASSES["concat-slices"](verify(parse_graph(text)))
    assert out.node("c").attrs["by_slices"] is True


@pytest.mark.parametrize("change", [
    ("Concat(%a, %b)", "Concat(%a, %x)"),                          # a graph input
    ("output %d", "output %d, %a"),                                # a graph output
    ("Concat(%a, %b)", "Concat(%a, %a)"),                          # read twice
    ('%b: f32[1,2,3,3] = ReLU(%x) {negative_slope=0.0} name="b"',  # already in place
     '%b: f32[1,2,3,3] = ReLU(%a) {negative_slope=0.0, inplace=0} name="b"'),
])
def test_concat_not_by_slices(change):
    text = CONCAT.replace("B", "1").replace(*change)
    out = PASSES["concat-slices"](verify(parse_graph(text)))
    assert "by_slices" not in out.node("c").attrs
