"""Times onnxruntime on every `*.onnx` in a directory, batch 1 and 256, with a given number of
intra-op threads and all graph optimizations; prints `name seconds_batch1 seconds_batch256`
(median over about `seconds` each, default 3). Called by `examples/mnist/benches/vs_ort.rs`."""
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort

directory, threads = pathlib.Path(sys.argv[1]), int(sys.argv[2])
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
for path in sorted(directory.glob("*.onnx")):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    medians = []
    for batch in (1, 256):
        x = (np.arange(batch * 28 * 28) % 255).astype(np.float32).reshape(batch, 1, 28, 28) / 255.0
        session.run(None, {name: x})
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t)
        medians.append(sorted(times)[len(times) // 2])
    print(path.stem, medians[0], medians[1])
