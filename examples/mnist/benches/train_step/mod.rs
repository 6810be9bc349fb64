//! One timed training step, shared by the example's benches (`graph`, `qat_step`).

use std::cell::RefCell;
use std::time::Duration;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn_qat::core::fused;
use criterion::Criterion;
use mnist::model::Classifier;

use crate::common::timed;

/// One Adam step on `(x, y)`, waiting for the device.
pub fn step<M: Classifier>(
    model: M,
    optim: &mut burn::optim::ModuleOptimizer,
    x: &Tensor<4>,
    y: &Tensor<1, Int>,
) -> M {
    let logits = model.logits(x.clone());
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, y.clone());
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optim.step(1e-3, model, grads);
    let _ = x.device().sync();
    model
}

/// Benchmarks repeated steps of `model` as `{group}/{name}` (recorded for [`crate::common::mean`]),
/// with the fused fake-quant kernels on or off.
pub fn bench_step<M: Classifier>(
    c: &mut Criterion,
    group: &str,
    name: &str,
    model: M,
    fused_on: bool,
    x: &Tensor<4>,
    y: &Tensor<1, Int>,
) {
    let state = RefCell::new((Some(model), AdamConfig::new().init()));
    let key = format!("{group}/{name}");
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(2));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            fused::set_enabled(fused_on);
            let t = timed(&key, iters, || {
                let mut s = state.borrow_mut();
                let (m, optim) = &mut *s;
                *m = Some(step(m.take().expect("model"), optim, x, y));
            });
            fused::set_enabled(true);
            t
        })
    });
    g.finish();
}
