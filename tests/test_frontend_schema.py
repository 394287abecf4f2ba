"""graphc's own caffe.proto: in sync with the committed caffe_pb2.py and wire-compatible
with BVLC Caffe (field numbers checked on hand-encoded bytes and on real Caffe files)."""
from pathlib import Path

import pytest
from google.protobuf import text_format

from graphc.frontend import caffe_pb2 as pb

FRONTEND = Path(pb.__file__).resolve().parent


def test_committed_pb2_matches_proto():
    pytest.importorskip("grpc_tools")
    from graphc.frontend import gen_proto
    assert gen_proto.generate() == (FRONTEND / "caffe_pb2.py").read_text(), \
        "caffe_pb2.py is stale: run python -m graphc.frontend.gen_proto"


# (message, field, number) as in BVLC Caffe's caffe.proto
FIELD_NUMBERS = [
    ("BlobProto", "shape", 7), ("BlobProto", "data", 5), ("BlobProto", "double_data", 8),
    ("BlobProto", "num", 1), ("BlobProto", "width", 4),
    ("NetParameter", "layer", 100), ("NetParameter", "layers", 2),
    ("NetParameter", "input_shape", 8), ("NetParameter", "input_dim", 4),
    ("NetParameter", "state", 6),
    ("SolverParameter", "type", 40), ("SolverParameter", "solver_type", 30),
    ("SolverParameter", "momentum2", 39), ("SolverParameter", "rms_decay", 38),
    ("SolverParameter", "delta", 31), ("SolverParameter", "iter_size", 36),
    ("SolverParameter", "clip_gradients", 35), ("SolverParameter", "stepvalue", 34),
    ("SolverParameter", "snapshot_format", 37), ("SolverParameter", "weights", 42),
    ("SolverParameter", "layer_wise_reduce", 41), ("SolverParameter", "test_net_param", 22),
    ("SolverState", "current_step", 4),
    ("LayerParameter", "phase", 10), ("LayerParameter", "propagate_down", 11),
    ("LayerParameter", "transform_param", 100), ("LayerParameter", "loss_param", 101),
    ("LayerParameter", "convolution_param", 106), ("LayerParameter", "batch_norm_param", 139),
    ("LayerParameter", "input_param", 143), ("LayerParameter", "crop_param", 144),
    ("LayerParameter", "recurrent_param", 146), ("LayerParameter", "window_data_param", 129),
    ("ConvolutionParameter", "dilation", 18), ("ConvolutionParameter", "axis", 16),
    ("ConvolutionParameter", "force_nd_im2col", 17), ("ConvolutionParameter", "stride", 6),
    ("PoolingParameter", "round_mode", 13), ("PoolingParameter", "global_pooling", 12),
    ("PoolingParameter", "pad", 4), ("PoolingParameter", "kernel_size", 2),
    ("LRNParameter", "k", 5), ("SliceParameter", "axis", 3), ("ConcatParameter", "axis", 2),
    ("V1LayerParameter", "blobs_lr", 7), ("V1LayerParameter", "include", 32),
    ("V1LayerParameter", "param", 1001), ("V1LayerParameter", "transform_param", 36),
    ("V1LayerParameter", "loss_param", 42), ("V1LayerParameter", "layer", 1),
    ("V0LayerParameter", "k", 22), ("V0LayerParameter", "blobs", 50),
    ("V0LayerParameter", "hdf5_output_param", 1001),
]


@pytest.mark.parametrize("msg,name,number", FIELD_NUMBERS)
def test_field_numbers(msg, name, number):
    assert getattr(pb, msg).DESCRIPTOR.fields_by_name[name].number == number


def test_enum_values():
    assert pb.PoolingParameter.CEIL == 0 and pb.PoolingParameter.FLOOR == 1
    assert pb.TRAIN == 0 and pb.TEST == 1
    assert pb.LossParameter.NONE == 3
    v1 = pb.V1LayerParameter
    assert (v1.ABSVAL, v1.DECONVOLUTION, v1.DUMMY_DATA, v1.THRESHOLD, v1.SILENCE) == \
        (35, 39, 32, 31, 36)
    assert pb.SolverParameter.ADAM == 5 and pb.ReductionParameter.MEAN == 4
    assert pb.HingeLossParameter.L1 == 1


def test_hand_encoded_wire_bytes():
    # NetParameter{ layer(100) { name(1): "c" blobs(7) { data(5) packed [1.0, -2.0]
    #                                               shape(7) { dim(1) packed [2] } } } }
    # (fields in number order, as every protobuf serializer writes them)
    import struct
    dims = b"\x0a\x01\x02"                      # BlobShape.dim packed: [2]
    floats = struct.pack("<2f", 1.0, -2.0)
    blob = b"\x2a" + bytes([len(floats)]) + floats + b"\x3a" + bytes([len(dims)]) + dims
    layer = b"\x0a\x01c" + b"\x3a" + bytes([len(blob)]) + blob
    data = b"\xa2\x06" + bytes([len(layer)]) + layer
    net = pb.NetParameter.FromString(data)
    assert net.layer[0].name == "c"
    assert list(net.layer[0].blobs[0].shape.dim) == [2]
    assert list(net.layer[0].blobs[0].data) == [1.0, -2.0]
    assert net.SerializeToString() == data


def test_all_fields_round_trip_text():
    text = """
    name: "t" force_backward: true state { phase: TRAIN level: 2 stage: "a" }
    layer { name: "p" type: "Pooling" bottom: "x" top: "y"
            pooling_param { pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR } }
    layers { name: "c" type: CONVOLUTION blobs_lr: 1 weight_decay: 0
             convolution_param { num_output: 4 kernel_size: 3 engine: CAFFE } }
    """
    net = text_format.Parse(text, pb.NetParameter())
    assert net.layer[0].pooling_param.round_mode == pb.PoolingParameter.FLOOR
    again = text_format.Parse(text_format.MessageToString(net), pb.NetParameter())
    assert again == net


def _text_files(shared):
    files = sorted((shared / "zoo").glob("*.prototxt"))
    files += sorted((shared / "golden").glob("*/*.prototxt"))
    return files


def test_parses_zoo_and_golden_text(shared_dir):
    files = _text_files(shared_dir)
    assert len(files) > 10
    for f in files:
        msg = pb.SolverParameter() if "solver" in f.name else pb.NetParameter()
        text_format.Parse(f.read_text(), msg)
        assert msg.ListFields(), f


def test_parses_golden_binaries(shared_dir):
    models = sorted((shared_dir / "golden").glob("*/*.caffemodel"))
    assert models
    for f in models:
        net = pb.NetParameter.FromString(f.read_bytes())
        assert any(layer.blobs for layer in net.layer), f
    for f in sorted((shared_dir / "golden").glob("*/*.solverstate")):
        state = pb.SolverState.FromString(f.read_bytes())
        assert state.iter > 0 and state.learned_net.endswith(".caffemodel")


def test_every_caffe_message_is_present():
    names = """BlobShape BlobProto BlobProtoVector Datum FillerParameter NetParameter
    SolverParameter SolverState NetState NetStateRule ParamSpec LayerParameter
    TransformationParameter LossParameter AccuracyParameter ArgMaxParameter ClipParameter
    ConcatParameter BatchNormParameter BiasParameter ContrastiveLossParameter
    ConvolutionParameter CropParameter DataParameter DropoutParameter DummyDataParameter
    EltwiseParameter ELUParameter EmbedParameter ExpParameter FlattenParameter
    HDF5DataParameter HDF5OutputParameter HingeLossParameter ImageDataParameter
    InfogainLossParameter InnerProductParameter InputParameter LogParameter LRNParameter
    MemoryDataParameter MVNParameter ParameterParameter PoolingParameter PowerParameter
    PReLUParameter PythonParameter RecurrentParameter ReductionParameter ReLUParameter
    ReshapeParameter ScaleParameter SigmoidParameter SoftmaxParameter SPPParameter
    SliceParameter SwishParameter TanHParameter ThresholdParameter TileParameter
    WindowDataParameter V1LayerParameter V0LayerParameter""".split()
    layer_fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    param_types = {f.message_type.name for f in layer_fields.values() if f.message_type}
    for n in names:
        assert n in pb.DESCRIPTOR.message_types_by_name, n
        if n.endswith("Parameter") and not n.startswith(("V0", "V1", "Net", "Solver",
                                                          "Layer", "Filler")):
            assert n in param_types, f"LayerParameter has no field of type {n}"
