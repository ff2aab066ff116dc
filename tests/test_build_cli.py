"""``aligner-export build`` / ``compare`` without TensorRT, and the parts of the engine builder that need no GPU:
profile shapes and the graph rewrite that hands the steering nodes to the plugins (docs/architecture.md §5, §7)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from aligner_export.commands import cli
from aligner_export.tensorrt import build as trt_build
from aligner_runtime.errors import AlignerError


@pytest.fixture
def no_tensorrt(monkeypatch):
    # A None entry makes `import tensorrt` raise ImportError, whether or not TensorRT is installed here.
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.mark.parametrize("argv", [
    ["build", "--model", "EXPORT", "--plugins", "libaligner_trt_plugins.so", "-o", "ENGINE"],
    ["compare", "--model", "EXPORT", "--engine", "ENGINE"],
])
def test_without_tensorrt_one_line_exit_2(no_tensorrt, tmp_path, capsys, argv):
    argv = [a.replace("EXPORT", str(tmp_path / "export")).replace("ENGINE", str(tmp_path / "model.engine"))
            for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "TensorRT is not installed here" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_profiles_prefill_and_decode_shapes():
    profiles = trt_build.Profiles(max_batch=4, opt_batch=2, max_prompt=64, opt_prompt=16, max_context=256)
    profiles.check()
    assert profiles.ranges("input_ids", (-1, -1), decode=False) == ((1, 1), (2, 16), (4, 64))
    assert profiles.ranges("input_ids", (-1, -1), decode=True) == ((1, 1), (2, 1), (4, 1))
    # attention_mask covers past + S; the prefill profile still admits a second turn over a short past.
    assert profiles.ranges("attention_mask", (-1, -1), decode=False) == ((1, 1), (2, 16), (4, 256))
    assert profiles.ranges("attention_mask", (-1, -1), decode=True) == ((1, 1), (2, 129), (4, 256))
    assert profiles.ranges("past_key_values.3.key", (-1, 3, -1, 64), decode=True) == \
        ((1, 3, 0, 64), (2, 3, 128, 64), (4, 3, 255, 64))
    assert profiles.ranges("steer_gate_in", (-1,), decode=False) == ((1,), (2,), (4,))
    # A vision-language export's language model takes inputs_embeds [batch, sequence, hidden] (issue 6).
    assert profiles.ranges("inputs_embeds", (-1, -1, 64), decode=False) == ((1, 1, 64), (2, 16, 64), (4, 64, 64))
    assert profiles.ranges("inputs_embeds", (-1, -1, 64), decode=True) == ((1, 1, 64), (2, 1, 64), (4, 1, 64))
    with pytest.raises(AlignerError, match="expected \\[batch, sequence, hidden\\]"):
        profiles.ranges("inputs_embeds", (-1, -1, -1), decode=False)


def test_profiles_reject_bad_options():
    with pytest.raises(AlignerError, match="--max-context"):
        trt_build.Profiles(max_prompt=512, max_context=256).check()
    with pytest.raises(AlignerError, match="--opt-batch"):
        trt_build.Profiles(max_batch=1, opt_batch=2).check()
    with pytest.raises(AlignerError, match="not part of the steered decoder interface"):
        trt_build.Profiles().ranges("pixel_values", (-1, 3, 224, 224), decode=False)


def test_plugin_model_drops_only_the_steering_functions(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from aligner_export.graph import onnx_ops

    H = 6
    gate_node = onnx_ops.make_steer_gate_node("hidden", "attention_mask", "gate_in", "gate", "score",
                                              np.ones(H, np.float32) / np.sqrt(H), 0.0,
                                              name="/model/layers.1/steer/SteerGate")
    shift_node = onnx_ops.make_steer_shift_node("hidden", "gate", "out", np.ones(H, np.float32),
                                                name="/model/layers.1/steer/SteerShift")
    other = helper.make_function("example.other", "Keep", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                 [helper.make_opsetid("", 18)])
    graph = helper.make_graph(
        [gate_node, shift_node], "g",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["B", "S", H]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("gate_in", TensorProto.FLOAT, ["B"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", H]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(onnx_ops.DOMAIN, 1)],
                              functions=[*onnx_ops.function_protos(18), other])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))

    blob, nodes = trt_build.plugin_model_bytes(path)
    rewritten = onnx.load_from_string(blob)
    assert nodes == ["/model/layers.1/steer/SteerGate", "/model/layers.1/steer/SteerShift"]
    assert [f.name for f in rewritten.functions] == ["Keep"]
    # The nodes keep the attributes TensorRT's ONNX parser turns into plugin fields.
    attrs = {a.name: a for a in rewritten.graph.node[0].attribute}
    assert attrs["direction"].type == onnx.AttributeProto.TENSOR and attrs["bias"].type == onnx.AttributeProto.FLOAT
    assert helper.get_attribute_value(attrs["plugin_namespace"]) == b"inferaligner"
    assert helper.get_attribute_value(attrs["plugin_version"]) == b"1"
