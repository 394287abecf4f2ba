"""Regenerate ``caffe_pb2.py`` from ``caffe.proto`` (both in graphc/frontend/).

``caffe_pb2.py`` is committed to the repository, so installing or running graphc never
needs a protobuf compiler.  After editing ``caffe.proto``, regenerate it with::

    pip install grpcio-tools        # ships protoc as a Python module
    python -m graphc.frontend.gen_proto

and commit both files.  ``tests/test_frontend_schema.py`` fails while the committed file
is out of date with the schema (it is skipped where grpcio-tools is not installed).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "caffe.proto"
TARGET = HERE / "caffe_pb2.py"


def generate() -> str:
    """Run protoc (from grpcio-tools) on caffe.proto; return the generated Python source."""
    try:
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("gen_proto needs grpcio-tools: pip install grpcio-tools") from e
    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out}", str(PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit status {rc})")
        return (Path(out) / "caffe_pb2.py").read_text()


def main() -> int:
    TARGET.write_text(generate())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
