"""Regenerates tests/data/big/model.onnx: `Gather(table, rows)` over a
float32 table of 589,824 × 1024 (2.25 GiB) kept outside the graph in
`table.bin` (ONNX external data). Tests make `table.bin` a sparse file
with a few rows set, so a model of several gigabytes costs no download
and almost no disk until it is uploaded.

    python3 -m pip install onnx
    python3 tests/data/big/big.py tests/data/big/model.onnx
"""
import sys

import onnx
from onnx import TensorProto, helper

ROWS, WIDTH = 589_824, 1024

table = TensorProto()
table.name = "table"
table.data_type = TensorProto.FLOAT
table.dims.extend([ROWS, WIDTH])
table.data_location = TensorProto.EXTERNAL
for key, value in (("location", "table.bin"), ("offset", "0"), ("length", str(ROWS * WIDTH * 4))):
    entry = table.external_data.add()
    entry.key, entry.value = key, value

rows = helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])
out = helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["n", WIDTH])
node = helper.make_node("Gather", ["table", "rows"], ["vectors"], axis=0, name="lookup")
graph = helper.make_graph([node], "big", [rows], [out], initializer=[table])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="gigafactory-tests")
model.ir_version = 8
with open(sys.argv[1], "wb") as f:
    f.write(model.SerializeToString())
