//! A hand-written training loop (Adam, cross-entropy), evaluation and throughput.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::{SIDE, Split};
use crate::model::Classifier;

/// Deterministic shuffling (SplitMix64 + Fisher-Yates), independent of the backend.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx
}

/// A batch of images `[n, 1, 28, 28]` (pixels in `[0, 1]`) and labels.
pub fn batch(split: &Split, indices: &[usize], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let mut pixels = Vec::with_capacity(indices.len() * SIDE * SIDE);
    for &i in indices {
        pixels.extend(split.pixels(i..i + 1));
    }
    let labels: Vec<i64> = indices.iter().map(|&i| split.labels[i] as i64).collect();
    let x =
        Tensor::<1>::from_floats(pixels.as_slice(), device).reshape([indices.len(), 1, SIDE, SIDE]);
    (x, Tensor::<1, Int>::from_ints(labels.as_slice(), device))
}

/// What one epoch measured.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy.
    pub accuracy: f64,
    /// Training throughput, images per second.
    pub images_per_s: f64,
}

/// Trains `model` for one epoch over `split` in the order given by `seed`.
#[allow(clippy::too_many_arguments)] // the epoch's settings, each a plain value of the report
pub fn train_epoch<M: Classifier>(
    model: M,
    optim: &mut burn::optim::ModuleOptimizer,
    split: &Split,
    batch_size: usize,
    lr: impl Into<ModuleLearningRate> + Clone,
    seed: u64,
    device: &Device,
    label: &str,
) -> (M, EpochStats) {
    let order = permutation(split.len(), seed);
    let steps = order.len().div_ceil(batch_size);
    let bar = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut model = model;
    let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
    let start = Instant::now();
    for (step, chunk) in order.chunks(batch_size).enumerate() {
        let (x, y) = batch(split, chunk, device);
        let logits = model.logits(x);
        let hits = logits
            .clone()
            .argmax(1)
            .reshape([chunk.len()])
            .equal(y.clone())
            .int()
            .sum()
            .into_scalar::<i64>();
        let loss = loss_fn.forward(logits, y);
        let l = loss.clone().into_scalar::<f32>() as f64;
        loss_sum += l * chunk.len() as f64;
        correct += hits as usize;
        seen += chunk.len();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr.clone(), model, grads);
        if step % 10 == 0 {
            bar.set_message(format!(
                "loss {:.4} acc {:.2}%",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64
            ));
        }
        bar.inc(1);
    }
    let _ = device.sync();
    let secs = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    (
        model,
        EpochStats {
            loss: loss_sum / seen as f64,
            accuracy: correct as f64 / seen as f64,
            images_per_s: seen as f64 / secs,
        },
    )
}

/// A fresh Adam optimizer (Keras defaults: beta1 0.9, beta2 0.999, epsilon 1e-7).
pub fn adam() -> burn::optim::ModuleOptimizer {
    AdamConfig::new().with_epsilon(1e-7).init()
}

/// Accuracy of `model` (evaluated as given: call `valid()` first) over `split`.
pub fn evaluate<M: Classifier>(model: &M, split: &Split, device: &Device) -> f64 {
    let mut correct = 0usize;
    let all: Vec<usize> = (0..split.len()).collect();
    for chunk in all.chunks(1000) {
        let (x, y) = batch(split, chunk, device);
        let hits = model
            .logits(x)
            .argmax(1)
            .reshape([chunk.len()])
            .equal(y)
            .int()
            .sum()
            .into_scalar::<i64>();
        correct += hits as usize;
    }
    correct as f64 / split.len().max(1) as f64
}

/// Bytes of the float model's parameters (f32).
pub fn float_size_bytes<M: Module>(model: &M) -> usize {
    model.num_params() * 4
}
