"""Caffe's upgrades of old net and solver definitions (``upgrade_proto.cpp`` semantics).

Caffe upgrades every NetParameter it reads, text or binary, in this order:

1. V0 -> V1: ``layers { layer { type: "conv" ... } }`` (the first Caffe releases).  Separate
   ``padding`` layers are folded into the conv/pool layer they feed.
2. Data transformation: a V1 DATA / IMAGE_DATA / WINDOW_DATA layer's ``scale``,
   ``mean_file``, ``crop_size`` and ``mirror`` move from its ``*_data_param`` into
   ``transform_param``.
3. V1 -> V2: ``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 ... }`` becomes
   ``layer { type: "Convolution" param { lr_mult: 1 decay_mult: 1 } ... }``.
4. Net inputs: top-level ``input`` with ``input_shape`` or ``input_dim`` (4 numbers per input,
   N C H W) becomes an ``Input`` layer named "input" at the front of the net.  Inputs without
   any shape (old binary .caffemodel files) are simply dropped.
5. BatchNorm: a BatchNorm layer with exactly three ``param`` entries gets lr_mult and
   decay_mult 0 on all three (its blobs are statistics, not learned).

``upgrade_net`` also reports where each resulting layer came from, so a caller can keep
pointing at the right line of the original file.
"""
from __future__ import annotations

import warnings

from graphc.errors import GraphcError
from graphc.frontend import caffe_pb2 as pb

V1 = pb.V1LayerParameter

#: V1LayerParameter.LayerType -> LayerParameter.type string
V1_TYPE_NAMES = {
    V1.NONE: "",
    V1.ABSVAL: "AbsVal",
    V1.ACCURACY: "Accuracy",
    V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL",
    V1.CONCAT: "Concat",
    V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution",
    V1.DECONVOLUTION: "Deconvolution",
    V1.DATA: "Data",
    V1.DROPOUT: "Dropout",
    V1.DUMMY_DATA: "DummyData",
    V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise",
    V1.EXP: "Exp",
    V1.FLATTEN: "Flatten",
    V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output",
    V1.HINGE_LOSS: "HingeLoss",
    V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData",
    V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct",
    V1.LRN: "LRN",
    V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN",
    V1.POOLING: "Pooling",
    V1.POWER: "Power",
    V1.RELU: "ReLU",
    V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax",
    V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    V1.SPLIT: "Split",
    V1.SLICE: "Slice",
    V1.TANH: "TanH",
    V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

#: V0 type strings -> V1 enum
V0_TYPES = {
    "accuracy": V1.ACCURACY,
    "bnll": V1.BNLL,
    "concat": V1.CONCAT,
    "conv": V1.CONVOLUTION,
    "data": V1.DATA,
    "dropout": V1.DROPOUT,
    "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA,
    "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": V1.POOLING,
    "relu": V1.RELU,
    "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT,
    "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

#: *_param fields that exist in both V1LayerParameter and LayerParameter
_V1_PARAM_FIELDS = [f.name for f in V1.DESCRIPTOR.fields if f.name.endswith("_param")
                    and f.name in pb.LayerParameter.DESCRIPTOR.fields_by_name]

#: legacy solver_type enum -> solver type string
SOLVER_TYPE_NAMES = {
    pb.SolverParameter.SGD: "SGD",
    pb.SolverParameter.NESTEROV: "Nesterov",
    pb.SolverParameter.ADAGRAD: "AdaGrad",
    pb.SolverParameter.RMSPROP: "RMSProp",
    pb.SolverParameter.ADADELTA: "AdaDelta",
    pb.SolverParameter.ADAM: "Adam",
}


class UpgradeError(GraphcError):
    """An old-format definition that cannot be upgraded.  ``origin`` says which entry of
    the original net is at fault, as in upgrade_net's origins: ("layers", k), ("input", 0)
    or None."""

    def __init__(self, message, *, origin=None, **kw):
        super().__init__(message, **kw)
        self.origin = origin


# ---------------------------------------------------------------- net upgrades

def upgrade_net(net: pb.NetParameter) -> tuple[pb.NetParameter, list[tuple[str, int]]]:
    """Upgrade ``net`` like Caffe's UpgradeNetAsNeeded; return (new net, origins).

    ``origins[i]`` says where the upgraded ``layer[i]`` came from: ("layer", k) for
    ``net.layer[k]``, ("layers", k) for ``net.layers[k]`` (V0 or V1), ("input", 0) for the
    Input layer made from the legacy top-level input fields.  ``net`` is not modified.
    """
    out = pb.NetParameter()
    out.CopyFrom(net)
    if out.layer and out.layers:
        raise UpgradeError(
            "the net uses both 'layer' (current format) and 'layers' (V1 format) entries",
            origin=("layers", 0),
            hint="write every layer in one format: rename the 'layers { }' entries to "
                 "'layer { }' with string types, or the other way round")
    if out.layers:
        origins = [("layers", k) for k in range(len(out.layers))]
        if any(l.HasField("layer") for l in out.layers):
            origins = _upgrade_v0_net(out)
        _upgrade_data_transformation(out)
        v1 = list(out.layers)
        out.ClearField("layers")
        for v1_layer, origin in zip(v1, origins):
            upgrade_v1_layer(v1_layer, out.layer.add(), origin=origin)
    else:
        origins = [("layer", k) for k in range(len(out.layer))]
    if out.input or out.input_shape or out.input_dim:
        if _upgrade_input(out):
            origins.insert(0, ("input", 0))
    _upgrade_batch_norm(out)
    return out, origins


def upgrade_v1_layer(v1: pb.V1LayerParameter, layer: pb.LayerParameter, origin=None) -> None:
    """Fill ``layer`` from V1 layer ``v1`` (Caffe's UpgradeV1LayerParameter)."""
    if v1.HasField("layer"):
        raise UpgradeError("V0 'layer' inside a V1 layer that was not upgraded",
                           origin=origin, layer=v1.name)
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        layer.type = V1_TYPE_NAMES[v1.type]
    layer.blobs.extend(v1.blobs)

    def param(i):
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        param(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        param(i).share_mode = pb.ParamSpec.STRICT if mode == V1.STRICT \
            else pb.ParamSpec.PERMISSIVE
    for i, lr in enumerate(v1.blobs_lr):
        param(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        param(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for field in _V1_PARAM_FIELDS:
        if v1.HasField(field):
            getattr(layer, field).CopyFrom(getattr(v1, field))


def _upgrade_data_transformation(net: pb.NetParameter) -> None:
    """Move V1 data layers' scale/mean_file/crop_size/mirror into transform_param."""
    which = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
             V1.WINDOW_DATA: "window_data_param"}
    for layer in net.layers:
        field = which.get(layer.type)
        if field is None or not layer.HasField(field):
            continue
        src = getattr(layer, field)
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if src.HasField(name):
                setattr(layer.transform_param, name, getattr(src, name))
                src.ClearField(name)


def _upgrade_input(net: pb.NetParameter) -> bool:
    """Turn legacy net inputs into an Input layer in front; True if a layer was added."""
    inputs, shapes, dims = list(net.input), list(net.input_shape), list(net.input_dim)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
    if not shapes and not dims:
        return False  # inputs without shapes: a legacy .caffemodel; Caffe drops them
    if shapes and len(shapes) != len(inputs):
        raise UpgradeError(
            f"{len(inputs)} net input(s) but {len(shapes)} input_shape entries",
            origin=("input", 0),
            hint="give one 'input_shape { dim: ... }' per 'input:'")
    if not shapes and len(dims) != 4 * len(inputs):
        raise UpgradeError(
            f"{len(inputs)} net input(s) need {4 * len(inputs)} input_dim values "
            f"(N, C, H, W each), got {len(dims)}", origin=("input", 0),
            hint="give four 'input_dim:' lines per 'input:', or use 'input_shape { dim: ... }'")
    layer = pb.LayerParameter(name="input", type="Input")
    for i, name in enumerate(inputs):
        layer.top.append(name)
        shape = layer.input_param.shape.add()
        if shapes:
            shape.CopyFrom(shapes[i])
        else:
            shape.dim.extend(dims[4 * i:4 * i + 4])
    rest = list(net.layer)
    net.ClearField("layer")
    net.layer.append(layer)
    net.layer.extend(rest)
    return True


def _upgrade_batch_norm(net: pb.NetParameter) -> None:
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for p in layer.param:
                p.lr_mult = 0.0
                p.decay_mult = 0.0


# ---------------------------------------------------------------- V0

def _upgrade_v0_net(net: pb.NetParameter) -> list[tuple[str, int]]:
    """Replace V0 ``layers`` in ``net`` by V1 layers in place; return their origins."""
    kept, origins = _fold_padding_layers(net)
    net.ClearField("layers")
    for v0_conn, origin in zip(kept, origins):
        upgrade_v0_layer(v0_conn, net.layers.add(), origin=origin)
    return origins


def _fold_padding_layers(net: pb.NetParameter):
    """Drop V0 "padding" layers, setting their pad on the conv/pool layer they feed."""
    last_top = {name: -1 for name in net.input}
    kept: list[pb.V1LayerParameter] = []
    origins: list[tuple[str, int]] = []
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        if v0.type != "padding":
            kept.append(pb.V1LayerParameter())
            kept[-1].CopyFrom(conn)
            origins.append(("layers", i))
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise UpgradeError(f"input blob '{blob}' is not produced by any earlier layer "
                                   "or net input", origin=("layers", i), layer=v0.name,
                                   hint="check the layer order and blob names")
            src = last_top[blob]
            if src == -1 or net.layers[src].layer.type != "padding":
                continue
            pad_conn = net.layers[src]
            if v0.type not in ("conv", "pool") or len(conn.bottom) != 1 or \
                    len(pad_conn.bottom) != 1 or len(pad_conn.top) != 1:
                raise UpgradeError("a V0 padding layer may only feed a single-input conv or "
                                   f"pool layer; it feeds '{v0.name}' (type '{v0.type}')",
                                   origin=("layers", i), layer=v0.name)
            kept[-1].layer.pad = pad_conn.layer.pad
            kept[-1].bottom[j] = pad_conn.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return kept, origins


def upgrade_v0_layer(conn: pb.V1LayerParameter, out: pb.V1LayerParameter, origin=None) -> None:
    """Fill V1 layer ``out`` from V0 connection ``conn`` (Caffe's UpgradeV0LayerParameter).

    Caffe logs and drops a V0 field that does not apply to the layer's type and carries on;
    graphc does the same but with a Python warning.
    """
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return
    v0 = conn.layer
    t = v0.type
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if t not in V0_TYPES:
            raise UpgradeError(f"unknown V0 layer type '{t}'", origin=origin, layer=v0.name,
                               hint="known V0 types: " + ", ".join(sorted(V0_TYPES)))
        out.type = V0_TYPES[t]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)

    def drop(field):
        warnings.warn(f"V0 layer '{v0.name}' (type '{t}'): field '{field}' does not apply "
                      "to this type and is ignored (as Caffe does)", stacklevel=3)

    def to(field, targets):
        """Copy v0.<field> to where ``targets[type]`` = (param message, field) says."""
        if not v0.HasField(field):
            return
        if t not in targets:
            drop(field)
            return
        msg_name, attr = targets[t]
        _assign(getattr(out, msg_name), attr, getattr(v0, field))

    def conv_ip(attr):
        return {"conv": ("convolution_param", attr), "innerproduct": ("inner_product_param", attr)}

    def conv_pool(attr):
        return {"conv": ("convolution_param", attr), "pool": ("pooling_param", attr)}

    to("num_output", conv_ip("num_output"))
    to("biasterm", conv_ip("bias_term"))
    to("weight_filler", conv_ip("weight_filler"))
    to("bias_filler", conv_ip("bias_filler"))
    # conv: repeated pad/kernel_size/stride; pool: scalars
    to("pad", conv_pool("pad"))
    to("kernelsize", conv_pool("kernel_size"))
    to("group", {"conv": ("convolution_param", "group")})
    to("stride", conv_pool("stride"))
    if v0.HasField("pool"):
        if t == "pool":
            out.pooling_param.pool = v0.pool  # same numbering MAX/AVE/STOCHASTIC
        else:
            drop("pool")
    to("dropout_ratio", {"dropout": ("dropout_param", "dropout_ratio")})
    for f in ("local_size", "alpha", "beta", "k"):
        to(f, {"lrn": ("lrn_param", f)})
    to("source", {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
                  "images": ("image_data_param", "source"),
                  "window_data": ("window_data_param", "source"),
                  "infogain_loss": ("infogain_loss_param", "source")})
    # transformation fields go to transform_param whatever the type
    for v0f, f in (("scale", "scale"), ("meanfile", "mean_file"), ("cropsize", "crop_size"),
                   ("mirror", "mirror")):
        if v0.HasField(v0f):
            setattr(out.transform_param, f, getattr(v0, v0f))
    to("batchsize", {"data": ("data_param", "batch_size"),
                     "hdf5_data": ("hdf5_data_param", "batch_size"),
                     "images": ("image_data_param", "batch_size"),
                     "window_data": ("window_data_param", "batch_size")})
    to("rand_skip", {"data": ("data_param", "rand_skip"),
                     "images": ("image_data_param", "rand_skip")})
    to("shuffle_images", {"images": ("image_data_param", "shuffle")})
    to("new_height", {"images": ("image_data_param", "new_height")})
    to("new_width", {"images": ("image_data_param", "new_width")})
    to("concat_dim", {"concat": ("concat_param", "concat_dim")})
    for v0f, f in (("det_fg_threshold", "fg_threshold"), ("det_bg_threshold", "bg_threshold"),
                   ("det_fg_fraction", "fg_fraction"), ("det_context_pad", "context_pad"),
                   ("det_crop_mode", "crop_mode")):
        to(v0f, {"window_data": ("window_data_param", f)})
    if v0.HasField("hdf5_output_param"):
        if t == "hdf5_output":
            out.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            drop("hdf5_output_param")


def _assign(msg, attr, value) -> None:
    """msg.attr = value for a scalar, append for a repeated scalar, copy for a message."""
    fd = msg.DESCRIPTOR.fields_by_name[attr]
    if fd.message_type is not None:
        getattr(msg, attr).CopyFrom(value)
    elif fd.is_repeated:
        getattr(msg, attr).append(value)
    else:
        setattr(msg, attr, value)


# ---------------------------------------------------------------- solver

def upgrade_solver(solver: pb.SolverParameter) -> pb.SolverParameter:
    """Caffe's UpgradeSolverAsNeeded: the legacy ``solver_type`` enum becomes ``type``."""
    out = pb.SolverParameter()
    out.CopyFrom(solver)
    if out.HasField("solver_type"):
        if out.HasField("type"):
            raise UpgradeError(
                "the solver sets both 'solver_type' (old enum) and 'type' (string)",
                hint="keep only 'type', e.g. type: \"Adam\"")
        out.type = SOLVER_TYPE_NAMES[out.solver_type]
        out.ClearField("solver_type")
    return out
