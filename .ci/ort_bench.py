"""Times onnxruntime on every `*.onnx` in a directory, at two batch sizes (default 1 and 256),
with a given number of intra-op threads and all graph optimizations; prints `name seconds_a
seconds_b` (median over about `seconds` each, default 3). The input is the file's input shape
at that batch, filled with `(i % 255) / 255` as the bench fills its own. Called by
`examples/mnist/benches/vs_ort.rs`: `ort_bench.py DIR THREADS [SECONDS [BATCH_A,BATCH_B]]`."""
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort

directory, threads = pathlib.Path(sys.argv[1]), int(sys.argv[2])
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
batches = [int(b) for b in sys.argv[4].split(",")] if len(sys.argv) > 4 else [1, 256]
for path in sorted(directory.glob("*.onnx")):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    item = [int(d) for d in session.get_inputs()[0].shape[1:]]
    medians = []
    for batch in batches:
        shape = [batch] + item
        x = (np.arange(int(np.prod(shape))) % 255).astype(np.float32).reshape(shape) / 255.0
        session.run(None, {name: x})
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 5:
            t = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t)
        medians.append(sorted(times)[len(times) // 2])
    print(path.stem, *medians)
