"""Checks the ONNX files of the graph-mode test models in onnxruntime.

Usage: onnx_models.py DIR

DIR holds one folder per model (written by `cargo test --test graph` with BURN_QAT_ONNX_DIR):
model.onnx, input.npy and int8_out.npy (the burn-qat integer model's dequantized output), or
input_K.npy and int8_out_K.npy for a model of several inputs and outputs.

Per model: (a) onnx.checker full_check; (b) with all graph optimizations, the optimized graph
runs int8 kernels (QLinearConv / QGemm / QLinearMatMul / QLinearAdd / ...) and no float Conv,
Gemm or MatMul; (c) its outputs
are within 1 step of the output grid of the integer model's everywhere (float accumulation and
float requantization in onnxruntime can land on the other side of a rounding tie; the issue's
bar is 1 step), and the predictions (argmax) agree on every row but at most one.
"""

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

INT8_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
                "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu"}


def load_io(folder, sess):
    """The inputs by graph input name, and the integer model's outputs in order: `input.npy`
    and `int8_out.npy` for a model of one input and one output, else `input_K.npy` and
    `int8_out_K.npy`."""
    names = [i.name for i in sess.get_inputs()]
    if os.path.exists(os.path.join(folder, "input.npy")):
        feeds = {names[0]: np.load(os.path.join(folder, "input.npy"))}
        wants = [np.load(os.path.join(folder, "int8_out.npy"))]
    else:
        feeds = {n: np.load(os.path.join(folder, f"input_{k}.npy")) for k, n in enumerate(names)}
        wants = [np.load(os.path.join(folder, f"int8_out_{k}.npy"))
                 for k in range(len(sess.get_outputs()))]
    return feeds, wants


def check(folder):
    name = os.path.basename(folder)
    path = os.path.join(folder, "model.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    optimized = os.path.join(folder, "model.optimized.onnx")
    so.optimized_model_filepath = optimized
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds, wants = load_io(folder, sess)
    gots = sess.run(None, feeds)
    assert len(gots) == len(wants), f"{name}: {len(gots)} outputs, the integer model has {len(wants)}"
    ops = sorted({n.op_type for n in onnx.load(optimized).graph.node})
    kernels = INT8_KERNELS & set(ops)
    assert kernels, f"{name}: no int8 kernels in the optimized graph: {ops}"
    # Every convolution and matrix product runs on int8 kernels (uint8 activations, int8
    # weights): none is left in float.
    float_ops = {"Conv", "Gemm", "MatMul"} & set(ops)
    assert not float_ops, f"{name}: float {sorted(float_ops)} left in the optimized graph: {ops}"
    for k, (got, want) in enumerate(zip(gots, wants)):
        which = name if len(wants) == 1 else f"{name} output {k}"
        # The output grid's step: the smallest nonzero gap between distinct output values.
        levels = np.unique(want)
        step = float(np.min(np.diff(levels))) if len(levels) > 1 else 1.0
        close = float((np.abs(got - want) <= step + 1e-6).mean())
        worst = float(np.abs(got - want).max() / step)
        agree = int((got.argmax(1) == want.argmax(1)).sum())
        print(f"{which}: checker ok, int8 kernels {sorted(kernels)}, {close:.2%} of outputs within 1 step "
              f"(at most {worst:.2f}), predictions agree on {agree}/{len(want)}")
        assert close == 1.0, f"{which}: onnxruntime is more than 1 step from the integer model: {worst:.2f}"
        if k == 0:
            assert agree >= len(want) - 1, f"{which}: predictions disagree"
    # The same model written at opset 21 (LayerNormalization as one node there): valid, and
    # within 1 step of the integer model too.
    path21 = os.path.join(folder, "model.opset21.onnx")
    if os.path.exists(path21):
        onnx.checker.check_model(onnx.load(path21), full_check=True)
        sess21 = ort.InferenceSession(path21, providers=["CPUExecutionProvider"])
        for k, (got, want) in enumerate(zip(sess21.run(None, feeds), wants)):
            levels = np.unique(want)
            step = float(np.min(np.diff(levels))) if len(levels) > 1 else 1.0
            worst = float(np.abs(got - want).max() / step)
            assert worst <= 1.0 + 1e-4, f"{name} opset 21 output {k}: {worst:.2f} steps from the integer model"
        print(f"{name}: opset 21 within 1 step")


def main():
    root = sys.argv[1]
    folders = sorted(os.path.join(root, d) for d in os.listdir(root))
    assert len(folders) >= 18, f"expected the eighteen graph-mode test models in {root}, found {folders}"
    for folder in folders:
        check(folder)
    print("onnx models check: passed")


if __name__ == "__main__":
    main()
