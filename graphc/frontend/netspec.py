"""Build Caffe nets in Python, the way pycaffe's ``caffe.NetSpec`` does.

    from graphc.frontend.netspec import NetSpec, L, P, TRAIN

    n = NetSpec("LeNet")
    n.data = L.Input(shape=dict(dim=[64, 1, 28, 28]))
    n.conv1 = L.Convolution(n.data, num_output=20, kernel_size=5,
                            param=[dict(lr_mult=1), dict(lr_mult=2)],
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, pool="MAX", kernel_size=2, stride=2)   # or P.Pooling.MAX
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    n.a, n.b = L.Slice(n.relu1, ntop=2, slice_point=[10])
    n["odd/name"] = L.Softmax(n.a)          # names that are not Python identifiers
    print(n.to_prototxt())

Naming follows pycaffe: the attribute a top is assigned to becomes the top's blob name
and, for a layer's first top, the layer's name.  An in-place layer (``in_place=True``)
writes its bottoms back as its tops, so its top keeps the bottom's blob name while the
layer takes the attribute name.  Layers and tops never assigned to a name get automatic
names ``<Type><k>``.  Layers come out in dependency order: each assigned top in the order
of assignment, after the layers it depends on.

Keyword arguments: ``ntop``, ``in_place`` and ``name`` (an explicit layer name) belong to
the builder; a LayerParameter field (``param``, ``include``, ``exclude``, ``loss_weight``,
``propagate_down``, ``phase``, ``transform_param``, ``loss_param``, any ``*_param``) goes
to the layer; every other keyword is a field of the layer type's parameter message
(``convolution_param`` for Convolution and Deconvolution, ``softmax_param`` for
SoftmaxWithLoss, ...).  Values: a dict for a message, a list for a repeated field (a
single value or dict is taken as a list of one), an enum as its name (``"MAX"``) or
number (``P.Pooling.MAX``).  A field the message does not have is a GraphcError naming
the layer, the field and the message.
"""
from __future__ import annotations

import difflib
import operator
from collections import Counter, OrderedDict

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import GraphcError
from . import caffe_pb2

__all__ = ["NetSpec", "L", "P", "TRAIN", "TEST", "Top", "Function", "to_proto",
           "param_field_for"]

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST

# Keyword arguments the builder itself consumes.
_BUILDER_KWARGS = ("ntop", "in_place", "name")
# LayerParameter fields the builder sets from the graph; a keyword for them is an error.
_STRUCTURAL = ("type", "bottom", "top")

# Layer types whose parameter message is not named after the type.
_PARAM_FIELD_EXCEPTIONS = {
    "Deconvolution": "convolution_param",
    "Im2col": "convolution_param",
    "SoftmaxWithLoss": "softmax_param",
    "RNN": "recurrent_param",
    "LSTM": "recurrent_param",
    "EuclideanLoss": "loss_param",
    "SigmoidCrossEntropyLoss": "loss_param",
    "MultinomialLogisticLoss": "loss_param",
}


def _derived_param_fields() -> dict[str, str]:
    """Layer type -> LayerParameter field, derived from the schema as pycaffe does: the
    field ``foo_param`` of message type ``FooParameter`` belongs to layer type ``Foo``."""
    out = {}
    for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if f.message_type is None or not f.name.endswith("_param"):
            continue
        if f.name in ("transform_param", "loss_param"):
            continue
        msg = f.message_type.name
        if msg.endswith("Parameter"):
            out[msg[: -len("Parameter")]] = f.name
    return out


_PARAM_FIELDS = {**_derived_param_fields(), **_PARAM_FIELD_EXCEPTIONS}
_LAYER_FIELDS = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name


def param_field_for(layer_type: str) -> str | None:
    """The LayerParameter field holding ``layer_type``'s parameters (None if it has none)."""
    return _PARAM_FIELDS.get(layer_type)


# ---------------------------------------------------------------- filling messages

class _Ctx:
    """Where a value is being written, for error messages."""

    def __init__(self, layer: str | None, layer_type: str):
        self.layer = layer
        self.layer_type = layer_type
        field = param_field_for(layer_type)
        # the layer type's own parameter message (for the loss_param/transform_param hint)
        self.type_param = _LAYER_FIELDS[field].message_type if field else None

    def error(self, message: str, hint: str | None = None) -> GraphcError:
        return GraphcError(message, layer=self.layer, layer_type=self.layer_type, hint=hint)


def _unknown_field(ctx: _Ctx, msg: Message, key: str) -> GraphcError:
    names = [f.name for f in msg.DESCRIPTOR.fields]
    close = difflib.get_close_matches(key, names, n=3)
    hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f"{msg.DESCRIPTOR.name} has: {', '.join(names) or '(no fields)'}")
    if msg.DESCRIPTOR is ctx.type_param:
        for other in ("loss_param", "transform_param"):
            sub = _LAYER_FIELDS[other].message_type
            if key in sub.fields_by_name:
                hint = f"{key} is a field of {sub.name}: pass {other}=dict({key}=...)"
    return ctx.error(f"unknown field '{key}' in {msg.DESCRIPTOR.name}", hint=hint)


def _as_int(value) -> int | None:
    """``value`` as a Python int if it is an integer (numpy integers too), else None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _scalar(ctx: _Ctx, msg: Message, fd: FieldDescriptor, value):
    """Check and convert one scalar value for field ``fd``."""
    where = f"{msg.DESCRIPTOR.name}.{fd.name}"
    if fd.type == FieldDescriptor.TYPE_ENUM:
        enum = fd.enum_type
        if isinstance(value, str):
            ev = enum.values_by_name.get(value)
            if ev is None:
                raise ctx.error(f"{where}: '{value}' is not a value of enum {enum.name}",
                                hint="use one of " + ", ".join(v.name for v in enum.values))
            return ev.number
        number = None if isinstance(value, bool) else _as_int(value)
        if number not in enum.values_by_number:
            raise ctx.error(f"{where}: {value!r} is not a value of enum {enum.name}",
                            hint="use one of " + ", ".join(v.name for v in enum.values))
        return number
    if fd.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise ctx.error(f"{where} expects true or false, got {value!r}",
                            hint="pass True or False")
        return value
    if fd.cpp_type in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        if isinstance(value, (bool, str)):
            raise ctx.error(f"{where} expects a number, got {value!r}")
        try:
            return float(value)              # int, float, numpy scalars
        except (TypeError, ValueError):
            raise ctx.error(f"{where} expects a number, got {value!r}") from None
    if fd.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
                       FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64):
        if isinstance(value, bool):
            raise ctx.error(f"{where} expects an integer, got {value!r}")
        v = _as_int(value)
        if v is None:
            raise ctx.error(f"{where} expects an integer, got {value!r}")
        unsigned = fd.cpp_type in (FieldDescriptor.CPPTYPE_UINT32,
                                   FieldDescriptor.CPPTYPE_UINT64)
        bits = 64 if fd.cpp_type in (FieldDescriptor.CPPTYPE_INT64,
                                     FieldDescriptor.CPPTYPE_UINT64) else 32
        lo, hi = (0, 2 ** bits - 1) if unsigned else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
        if not lo <= v <= hi:
            raise ctx.error(f"{where} = {v} is out of range [{lo}, {hi}]")
        return v
    if fd.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise ctx.error(f"{where} expects a string, got {value!r}")
        return value
    if fd.type == FieldDescriptor.TYPE_BYTES:
        if not isinstance(value, (bytes, bytearray)):
            raise ctx.error(f"{where} expects bytes, got {value!r}")
        return bytes(value)
    raise ctx.error(f"{where}: unsupported field type {fd.type}")


def _fill_message(ctx: _Ctx, msg: Message, value) -> None:
    """Fill submessage ``msg`` from a dict (or copy a message of the same type)."""
    if isinstance(value, Message):
        if value.DESCRIPTOR is not msg.DESCRIPTOR:
            raise ctx.error(f"expected a {msg.DESCRIPTOR.name}, got a {value.DESCRIPTOR.name}")
        msg.MergeFrom(value)
        msg.SetInParent()
        return
    if not isinstance(value, dict):
        raise ctx.error(f"{msg.DESCRIPTOR.name} expects a dict of its fields, got {value!r}",
                        hint=f"write dict(...) with fields of {msg.DESCRIPTOR.name}")
    msg.SetInParent()               # an empty dict still marks the message present
    for k, v in value.items():
        assign(msg, k, v, ctx)


def assign(msg: Message, key: str, value, ctx: _Ctx | None = None) -> None:
    """Set field ``key`` of ``msg`` from a Python value (dicts for messages, lists for
    repeated fields, enum names or numbers).  Repeated fields are appended to."""
    ctx = ctx or _Ctx(None, msg.DESCRIPTOR.name)
    fd = msg.DESCRIPTOR.fields_by_name.get(key)
    if fd is None:
        raise _unknown_field(ctx, msg, key)
    if fd.is_repeated:
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        container = getattr(msg, key)
        for v in values:
            if fd.message_type is not None:
                _fill_message(ctx, container.add(), v)
            else:
                container.append(_scalar(ctx, msg, fd, v))
    elif fd.message_type is not None:
        _fill_message(ctx, getattr(msg, key), value)
    else:
        if isinstance(value, (list, tuple)):
            raise ctx.error(f"{msg.DESCRIPTOR.name}.{key} takes one value, got {value!r}")
        setattr(msg, key, _scalar(ctx, msg, fd, value))


# ---------------------------------------------------------------- graph building

class Top:
    """One output blob of a layer (``fn``'s ``n``-th top)."""

    __slots__ = ("fn", "n")

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self):
        """A NetParameter with this top and everything it depends on (auto-named)."""
        return to_proto(self)

    def __repr__(self):
        return f"<Top {self.n} of {self.fn.type_name}>"


class Function:
    """One layer: its type, bottoms (Tops), and keyword parameters."""

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        params = dict(params)
        self.ntop = params.pop("ntop", 1)
        self.in_place = params.pop("in_place", False)
        self.name = params.pop("name", None)
        self.params = params
        self._proto = None
        ctx = _Ctx(self.name, type_name)
        for i, inp in enumerate(inputs):
            if isinstance(inp, tuple) and inp and all(isinstance(t, Top) for t in inp):
                raise ctx.error(f"bottom {i} is a tuple of {len(inp)} tops",
                                hint="a layer with ntop > 1 returns a tuple: unpack it "
                                     "(n.a, n.b = L.Slice(..., ntop=2)) and pass one top")
            if not isinstance(inp, Top):
                raise ctx.error(f"bottom {i} is {inp!r}, not a top made by the builder",
                                hint="pass the result of an L.<Type>(...) call, e.g. n.data")
        self.inputs = tuple(inputs)
        if isinstance(self.ntop, bool) or not isinstance(self.ntop, int) or self.ntop < 0:
            raise ctx.error(f"ntop must be a non-negative integer, got {self.ntop!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ctx.error(f"name must be a string, got {self.name!r}")
        if self.in_place and self.ntop != len(self.inputs):
            raise ctx.error(f"in_place needs as many tops as bottoms, got {self.ntop} top(s) "
                            f"and {len(self.inputs)} bottom(s)",
                            hint="drop in_place=True, or set ntop to the number of bottoms")
        self.tops = tuple(Top(self, i) for i in range(self.ntop))

    def layer_params(self, layer_name: str | None = None):
        """The LayerParameter holding this layer's keyword parameters (built once; a bad
        keyword raises GraphcError naming ``layer_name``)."""
        if self._proto is None:
            ctx = _Ctx(self.name or layer_name, self.type_name)
            layer = caffe_pb2.LayerParameter()
            for key, value in self.params.items():
                if key in _STRUCTURAL:
                    raise ctx.error(f"'{key}' cannot be given as a keyword",
                                    hint="the builder sets type, bottoms and tops: pass bottoms "
                                         "as positional arguments, name tops by assignment")
                if key in _LAYER_FIELDS:
                    assign(layer, key, value, ctx)
                    continue
                field = param_field_for(self.type_name)
                if field is None:
                    raise ctx.error(f"'{key}' is not a LayerParameter field, and layer type "
                                    f"'{self.type_name}' has no parameter message",
                                    hint="remove it, or pass the right *_param=dict(...)")
                assign(getattr(layer, field), key, value, ctx)
            self._proto = layer
        return self._proto

    def _name(self, names: dict, autonames: Counter) -> str:
        """The layer name: pycaffe names a layer after its first top."""
        if self.name is not None:
            return self.name
        if self not in names:
            if self.ntop > 0:
                names[self] = _top_name(self.tops[0], names, autonames)
            else:
                autonames[self.type_name] += 1
                names[self] = f"{self.type_name}{autonames[self.type_name]}"
        return names[self]

    def _emit(self, layers: "OrderedDict[Function, object]", names: dict,
              autonames: Counter) -> None:
        """Append this layer's LayerParameter to ``layers``; the layers it depends on
        must be there already."""
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(layers[inp.fn].top[inp.n] for inp in self.inputs)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            layer.top.extend(_top_name(t, names, autonames) for t in self.tops)
        layer.name = self._name(names, autonames)
        layer.MergeFrom(self.layer_params(layer.name))
        layers[self] = layer


def _top_name(top: Top, names: dict, autonames: Counter) -> str:
    if top not in names:
        autonames[top.fn.type_name] += 1
        names[top] = f"{top.fn.type_name}{autonames[top.fn.type_name]}"
    return names[top]


def _emit_all(roots, layers, names, autonames) -> None:
    """Emit every layer ``roots`` depend on, inputs first, without recursion."""
    for root in roots:
        fn = root.fn if isinstance(root, Top) else root
        stack = [(fn, False)]
        while stack:
            f, ready = stack.pop()
            if f in layers:
                continue
            if ready:
                f._emit(layers, names, autonames)
                continue
            stack.append((f, True))
            for inp in reversed(f.inputs):
                if inp.fn not in layers:
                    stack.append((inp.fn, False))


def to_proto(*tops) -> "caffe_pb2.NetParameter":
    """A NetParameter holding ``tops`` and everything they depend on, all auto-named."""
    layers: OrderedDict = OrderedDict()
    _emit_all(tops, layers, {}, Counter())
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class _Layers:
    """``L.Convolution(bottom, ..., num_output=20)`` makes a Convolution layer and returns
    its top (a tuple of tops when ntop > 1, the layer itself when ntop == 0)."""

    def __getattr__(self, type_name: str):
        if type_name.startswith("__"):
            raise AttributeError(type_name)

        def make(*args, **kwargs):
            fn = Function(type_name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        make.__name__ = type_name
        return make


class _Params:
    """``P.Pooling.MAX``: enum constants of ``PoolingParameter`` (any ``<X>Parameter``)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(caffe_pb2, name + "Parameter")
        except AttributeError:
            raise AttributeError(f"caffe_pb2 has no message {name}Parameter") from None


L = _Layers()
P = _Params()


class NetSpec:
    """A net under construction: assign tops as attributes (``n.conv1 = L.Convolution(...)``)
    or items (``n["conv1/7x7_s2"] = ...``), then call ``to_proto()``."""

    def __init__(self, name: str | None = None):
        self.__dict__["_tops"] = OrderedDict()
        self.__dict__["_name"] = name

    # -- tops as attributes and items
    def __setattr__(self, name: str, value) -> None:
        if hasattr(type(self), name):
            raise GraphcError(f"'{name}' is a NetSpec method and cannot name a top",
                              hint=f"assign it as an item: n[{name!r}] = ...")
        self[name] = value

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.__dict__["_tops"][name]
        except KeyError:
            raise AttributeError(f"the net has no top named '{name}'") from None

    def __setitem__(self, name: str, value) -> None:
        if not isinstance(name, str) or not name:
            raise GraphcError(f"a top name must be a non-empty string, got {name!r}")
        if isinstance(value, tuple):
            raise GraphcError(f"'{name}' is assigned a tuple of {len(value)} tops",
                              hint=f"unpack the layer's tops into {len(value)} names, "
                                   f"e.g. n.a, n.b = L.Slice(..., ntop=2)")
        if not isinstance(value, (Top, Function)):
            raise GraphcError(f"'{name}' must be assigned a top made by L.<Type>(...), "
                              f"got {value!r}")
        fn = value.fn if isinstance(value, Top) else value
        fn.layer_params(name)           # check the keywords now, naming the layer
        self._tops[name] = value

    def __getitem__(self, name: str):
        return self._tops[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tops

    @property
    def tops(self) -> "OrderedDict[str, Top]":
        """The named tops, in assignment order."""
        return self._tops

    # -- output
    def to_proto(self) -> "caffe_pb2.NetParameter":
        names: dict = {}
        for k, v in self._tops.items():
            if v in names:
                raise GraphcError(f"one top is assigned to two names, '{names[v]}' and '{k}'",
                                  hint="a Caffe blob has one name: assign each top once")
            names[v] = k
        layers: OrderedDict = OrderedDict()
        _emit_all(self._tops.values(), layers, names, Counter())
        net = caffe_pb2.NetParameter()
        if self._name:
            net.name = self._name
        net.layer.extend(layers.values())
        return net

    def to_prototxt(self) -> str:
        return text_format.MessageToString(self.to_proto())

    def to_graph(self, phase: str = "test", **kwargs):
        """Lower the net to a graphc IR Graph for ``phase`` ("train" or "test"); keyword
        arguments go to ``graphc.frontend.lower.lower`` (level, stages, input_shapes,
        batch).  Errors name the layer and the file "<netspec>"."""
        from .lower import lower            # imported here: lowering pulls in every op
        from .prototxt import NetSource
        return lower(NetSource(self.to_proto(), "<netspec>"), phase, **kwargs)
