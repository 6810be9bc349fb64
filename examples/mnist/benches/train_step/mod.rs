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

/// A model that takes one training step per call (its optimizer state inside).
#[allow(dead_code)] // used by `qat_step`, not by `graph`
pub fn stepper<M: Classifier + 'static>(
    model: M,
    x: &Tensor<4>,
    y: &Tensor<1, Int>,
) -> Box<dyn FnMut()> {
    let (x, y) = (x.clone(), y.clone());
    let mut optim = AdamConfig::new().init();
    let mut model = Some(model);
    Box::new(move || model = Some(step(model.take().expect("model"), &mut optim, &x, &y)))
}

/// Step times of several models taken in turn, `steps` steps of each per round, so that a
/// change in the machine's load between criterion's separate runs cannot show as a ratio.
/// Returns, for every model after the first, its per-round ratios to the first, sorted (the
/// median in the middle).
#[allow(dead_code)] // used by `qat_step`, not by `graph`
pub fn alternating_ratios(
    models: &mut [Box<dyn FnMut()>],
    rounds: usize,
    steps: usize,
) -> Vec<Vec<f64>> {
    // One untimed step each: first-call allocations and Adam's state.
    models.iter_mut().for_each(|m| m());
    let mut ratios = vec![Vec::with_capacity(rounds); models.len().saturating_sub(1)];
    for _ in 0..rounds {
        let times: Vec<f64> = models
            .iter_mut()
            .map(|m| {
                let start = std::time::Instant::now();
                (0..steps).for_each(|_| m());
                start.elapsed().as_secs_f64()
            })
            .collect();
        for (r, t) in ratios.iter_mut().zip(&times[1..]) {
            r.push(t / times[0]);
        }
    }
    ratios.iter_mut().for_each(|r| r.sort_by(f64::total_cmp));
    ratios
}
