//! The MNIST example's float training epoch (plain Burn structs, Adam, the example's own
//! `train_epoch`) on every CPU backend compiled in, in one process, backends in turn per model.
//!
//! ```sh
//! eval "$(tools/cpu-backends/setup-libtorch.sh ~/.cache/burn-qat/libtorch)"
//! cargo run --release --manifest-path tools/cpu-backends/Cargo.toml -- --data-dir DIR
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNormConfig, LinearConfig};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::relu;
use clap::Parser;
use mnist::data::Mnist;
use mnist::model::{BnNet, Classifier, Tutorial};
use mnist::training::{adam, evaluate, train_epoch};

/// Float training throughput of the example's models per CPU backend.
#[derive(Parser, Debug)]
struct Args {
    /// Directory with the MNIST IDX files (else $MNIST_DIR, then the cache directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Training images per epoch (the first N).
    #[arg(long, default_value_t = 60_000)]
    train_limit: usize,
    /// Comma-separated backends: flex, ndarray, libtorch.
    #[arg(long, default_value = "flex,ndarray,libtorch")]
    backends: String,
    /// Comma-separated models: tutorial (batch 32), bn (batch 128).
    #[arg(long, default_value = "tutorial,bn")]
    models: String,
    /// Instead of epochs: time the parts of one `bn` training step (batch 128) on each backend,
    /// each alone on the step's shapes (median of repeated runs).
    #[arg(long)]
    ops: bool,
}

// ndarray and LibTorch are deprecated in Burn 0.22 (flex and CubeCL replace them); measured here
// because a user may still pick them.
#[allow(deprecated)]
fn device(name: &str) -> Device {
    match name {
        "flex" => Device::flex(),
        "ndarray" => Device::ndarray(),
        "libtorch" => Device::libtorch(),
        other => panic!("unknown backend {other:?}: flex, ndarray or libtorch"),
    }
}

fn epoch<M: Classifier>(
    model: impl Fn(&Device) -> M,
    batch: usize,
    data: &Mnist,
    limit: usize,
    backend: &str,
) {
    let device = device(backend).autodiff();
    device.seed(42);
    let train = data.train.take(limit);
    let (trained, stats) = train_epoch(
        model(&device),
        &mut adam(),
        &train,
        batch,
        1e-3,
        42,
        &device,
        backend,
    );
    let acc = evaluate(&trained.valid(), &data.test, &device.clone().inner());
    println!(
        "RESULT {backend:>8} batch {batch:>3}: {:>8.0} images/s, train loss {:.4}, test accuracy {:.2}%",
        stats.images_per_s,
        stats.loss,
        100.0 * acc
    );
}

/// Median milliseconds of `reps` runs of `f` (after one untimed run).
fn median_ms(device: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let _ = device.sync();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            let _ = device.sync();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

/// The parts of one float training step of the `bn` model at batch 128, each timed alone.
fn ops(backend: &str) {
    let device = device(backend).autodiff();
    device.seed(42);
    let n = 128;
    let reps = 7;
    let rand =
        |dims: [usize; 4]| Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
    let x0 = rand([n, 1, 28, 28]);
    let x1 = rand([n, 32, 26, 26]);
    let x2 = rand([n, 64, 24, 24]);
    let conv1 = Conv2dConfig::new([1, 32], [3, 3]).init(&device);
    let conv2 = Conv2dConfig::new([32, 64], [3, 3]).init(&device);
    let bn2 = BatchNormConfig::new(64).init(&device);
    let fc1 = LinearConfig::new(64 * 12 * 12, 128).init(&device);
    let pool = MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
    let mut row = Vec::new();
    let mut put = |what: &str, ms: f64| row.push(format!("{what} {ms:.1}"));
    put(
        "conv1 fwd",
        median_ms(&device, reps, || drop(conv1.forward(x0.clone()))),
    );
    put(
        "conv2 fwd",
        median_ms(&device, reps, || drop(conv2.forward(x1.clone()))),
    );
    put(
        "conv1 fwd+bwd (weight grad)",
        median_ms(&device, reps, || {
            drop(conv1.forward(x0.clone()).sum().backward())
        }),
    );
    put(
        "conv2 fwd+bwd (input and weight grads)",
        median_ms(&device, reps, || {
            drop(conv2.forward(x1.clone().require_grad()).sum().backward())
        }),
    );
    put(
        "batchnorm fwd+bwd",
        median_ms(&device, reps, || {
            drop(bn2.forward(x2.clone().require_grad()).sum().backward())
        }),
    );
    put(
        "relu+maxpool fwd+bwd",
        median_ms(&device, reps, || {
            drop(
                pool.forward(relu(x2.clone().require_grad()))
                    .sum()
                    .backward(),
            )
        }),
    );
    let flat = Tensor::<2>::random([n, 64 * 12 * 12], Distribution::Normal(0.0, 1.0), &device);
    put(
        "fc1 fwd+bwd",
        median_ms(&device, reps, || {
            drop(fc1.forward(flat.clone().require_grad()).sum().backward())
        }),
    );
    // Adam alone: gradients computed outside the timed part.
    let data_x = Tensor::<4>::random([n, 1, 28, 28], Distribution::Uniform(0.0, 1.0), &device);
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 10).collect();
    let y = Tensor::<1, Int>::from_ints(labels.as_slice(), &device);
    let loss_of = |m: &BnNet| {
        CrossEntropyLossConfig::new()
            .init(&device)
            .forward(m.logits(data_x.clone()), y.clone())
    };
    let mut model = Some(BnNet::new(&device));
    let mut optim = adam();
    let mut adam_ms = Vec::new();
    let mut step_ms = Vec::new();
    for _ in 0..reps + 1 {
        let m = model.take().unwrap();
        let start = Instant::now();
        let grads = GradientsParams::from_grads(loss_of(&m).backward(), &m);
        let _ = device.sync();
        let mid = Instant::now();
        let m = optim.step(1e-3, m, grads);
        let _ = device.sync();
        adam_ms.push(mid.elapsed().as_secs_f64() * 1e3);
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
        model = Some(m);
    }
    let med = |mut v: Vec<f64>| {
        v.remove(0);
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    put("Adam step", med(adam_ms));
    put("whole step", med(step_ms));
    println!(
        "OPS {backend:>8} (ms, median of {reps}): {}",
        row.join(" | ")
    );
}

fn main() {
    let args = Args::parse();
    if args.ops {
        for backend in args.backends.split(',') {
            ops(backend);
        }
        return;
    }
    let data = Mnist::load(args.data_dir.as_deref()).unwrap_or_else(|e| panic!("{e}"));
    let backends: Vec<&str> = args.backends.split(',').collect();
    for model in args.models.split(',') {
        println!(
            "== {model}, one float epoch of {} images",
            args.train_limit.min(data.train.len())
        );
        for backend in &backends {
            match model {
                "tutorial" => epoch(Tutorial::new, 32, &data, args.train_limit, backend),
                "bn" => epoch(BnNet::new, 128, &data, args.train_limit, backend),
                other => panic!("unknown model {other:?}: tutorial or bn"),
            }
        }
    }
}
