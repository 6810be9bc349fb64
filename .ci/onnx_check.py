"""Validates an exported burn-qat ONNX model in onnxruntime, a runtime burn-qat did not write.

Usage: onnx_check.py OUT_DIR MNIST_DIR

OUT_DIR holds what `mnist --out OUT_DIR` wrote: report.json, model.onnx and int8_logits.npy
(the burn-qat integer model's logits on the first `test_images` MNIST test images).

Checks:
  (a) onnx.checker with full_check;
  (b) with graph optimizations disabled (float math on dequantized values), onnxruntime
      reproduces the integer model: predictions agree on >= 99.9% of images and logits within
      0.5% of their range. Not bit-exact: float accumulation and float requantization can land
      on the other side of a rounding tie than the int32 / fixed-point path, a 1-LSB change in
      an intermediate activation (seen: up to 8e-4 of the logit range, 100% agreement);
  (c) with all optimizations, the optimized graph runs int8 kernels (QLinearConv / QGemm /
      QLinearMatMul) and still agrees;
  (d) the test accuracy equals the integer model's within 0.05 points.
"""

import gzip
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def idx(path):
    for p in (path, path + ".gz"):
        if os.path.exists(p):
            data = gzip.open(p).read() if p.endswith(".gz") else open(p, "rb").read()
            return data
    raise SystemExit(f"missing {path}[.gz]")


def main():
    out, mnist = sys.argv[1], sys.argv[2]
    report = json.load(open(os.path.join(out, "report.json")))
    n = report["test_images"]
    images = np.frombuffer(idx(os.path.join(mnist, "t10k-images-idx3-ubyte")), dtype=np.uint8, offset=16)
    labels = np.frombuffer(idx(os.path.join(mnist, "t10k-labels-idx1-ubyte")), dtype=np.uint8, offset=8)
    x = (images.reshape(-1, 1, 28, 28)[:n].astype(np.float32) / np.float32(255.0))
    y = labels[:n].astype(np.int64)
    path = os.path.join(out, "model.onnx")
    int8 = np.load(os.path.join(out, "int8_logits.npy"))

    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    print(f"(a) onnx.checker full_check: ok (opset {model.opset_import[0].version}, {len(model.graph.node)} nodes)")

    def run(level, optimized=None):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        if optimized:
            so.optimized_model_filepath = optimized
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"input": x[i:i + 500]})[0] for i in range(0, n, 500)])

    def compare(name, logits):
        span = float(np.abs(int8).max())
        diff = float(np.abs(logits - int8).max())
        agree = float((logits.argmax(1) == int8.argmax(1)).mean())
        print(f"{name}: max |logit difference| {diff:.3g} ({diff / span:.2e} of the logit range), predictions agree {agree:.4%}")
        return diff / span, agree

    rel, agree = compare("(b) optimizations disabled", run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
    assert agree >= 0.999 and rel <= 5e-3, "onnxruntime (float QDQ path) disagrees with the integer model"

    optimized = os.path.join(out, "model.optimized.onnx")
    logits = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized)
    ops = sorted({node.op_type for node in onnx.load(optimized).graph.node})
    print(f"(c) optimized graph operators: {ops}")
    assert {"QLinearConv", "QGemm", "QLinearMatMul"} & set(ops), "no int8 kernels in the optimized graph"
    rel, agree = compare("(c) all optimizations", logits)
    assert agree >= 0.999 and rel <= 5e-3, "onnxruntime (int8 kernels) disagrees with the integer model"

    acc_ort = float((logits.argmax(1) == y).mean())
    acc_int = float((int8.argmax(1) == y).mean())
    print(f"(d) test accuracy: onnxruntime {acc_ort:.4%}, burn-qat integer model {acc_int:.4%} (report: {report['int8_test_acc']:.4%})")
    assert abs(acc_ort - acc_int) <= 0.0005, "accuracies differ by more than 0.05 points"
    print("onnx check: passed")


if __name__ == "__main__":
    main()
