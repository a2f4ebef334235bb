"""Regenerates tests/data/tiny.onnx: one `Add(x, x)` per wasi-nn element
type the tract backend runs (FP16, FP32, FP64, U8, I32, I64), so a
function can `load` ONNX bytes and compute with every tensor type.

    python3 -m pip install onnx
    python3 tests/data/tiny.py tests/data/tiny.onnx
"""
import sys

import onnx
from onnx import TensorProto, helper

TYPES = {
    "fp16": TensorProto.FLOAT16,
    "fp32": TensorProto.FLOAT,
    "fp64": TensorProto.DOUBLE,
    "u8": TensorProto.UINT8,
    "i32": TensorProto.INT32,
    "i64": TensorProto.INT64,
}

inputs, outputs, nodes = [], [], []
for name, elem in TYPES.items():
    inputs.append(helper.make_tensor_value_info(f"x_{name}", elem, ["n"]))
    outputs.append(helper.make_tensor_value_info(f"y_{name}", elem, ["n"]))
    nodes.append(helper.make_node("Add", [f"x_{name}", f"x_{name}"], [f"y_{name}"], name=f"double_{name}"))
graph = helper.make_graph(nodes, "tiny", inputs, outputs)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gigafactory-tests")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
