//! QAT on several devices: burn-train's `ExecutionStrategy::multi` runs one replica per device in
//! lockstep; the observers must end with the range one device observing each step's combined
//! batch would have.

use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::MseLoss;
use burn::nn::{Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::prelude::*;
use burn::train::metric::LossMetric;
use burn::train::{
    ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, RegressionOutput,
    SupervisedTraining, TrainOutput, TrainStep,
};
use burn_qat::{FakeQuant, FakeQuantConfig, Observer, QuantSpec};

/// Every batch a training step saw, by thread (one worker thread per device, new threads each
/// epoch), threads in the order they first trained.
#[derive(Clone, Debug, Default)]
struct Log(Arc<Mutex<Vec<(ThreadId, Vec<Vec<f32>>)>>>);

#[derive(Module, Debug)]
struct Probe {
    last: FakeQuant,
    ema: FakeQuant,
    running: FakeQuant,
    fc: Linear,
    #[module(skip)]
    log: Log,
}

const FEATURES: usize = 4;

impl Probe {
    fn new(device: &Device) -> Self {
        let fq = |observer| {
            FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric())
                .with_observer(observer)
                .init(device)
                .unwrap()
        };
        Self {
            last: fq(Observer::LastValue),
            ema: fq(Observer::MovingAverage { decay: 0.9 }),
            running: fq(Observer::RunningMinMax),
            fc: LinearConfig::new(FEATURES, 1).init(device),
            log: Log::default(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = self.last.forward(x.clone()) + self.ema.forward(x.clone());
        self.fc.forward(y + self.running.forward(x))
    }

    fn regress(&self, batch: Batch) -> RegressionOutput {
        let output = self.forward(batch.x);
        let loss = MseLoss::new().forward(
            output.clone(),
            batch.y.clone(),
            burn::nn::loss::Reduction::Mean,
        );
        RegressionOutput::new(loss, output, batch.y)
    }
}

impl TrainStep for Probe {
    type Input = Batch;
    type Output = RegressionOutput;
    fn step(&self, batch: Batch) -> TrainOutput<RegressionOutput> {
        let id = std::thread::current().id();
        let x = batch.x.clone().into_data().try_to_vec::<f32>().unwrap();
        let mut log = self.log.0.lock().unwrap();
        match log.iter_mut().find(|(t, _)| *t == id) {
            Some((_, batches)) => batches.push(x),
            None => log.push((id, vec![x])),
        }
        drop(log);
        let item = self.regress(batch);
        TrainOutput::new(self, item.loss.backward(), item)
    }
}

impl InferenceStep for Probe {
    type Input = Batch;
    type Output = RegressionOutput;
    fn step(&self, batch: Batch) -> RegressionOutput {
        self.regress(batch)
    }
}

#[derive(Clone, Debug)]
struct Batch {
    x: Tensor<2>,
    y: Tensor<2>,
}

#[derive(Clone)]
struct RowBatcher;

impl Batcher<[f32; FEATURES], Batch> for RowBatcher {
    fn batch(&self, items: Vec<[f32; FEATURES]>, device: &Device) -> Batch {
        let n = items.len();
        let xs: Vec<f32> = items.iter().flatten().copied().collect();
        Batch {
            x: Tensor::<1>::from_floats(xs.as_slice(), device).reshape([n, FEATURES]),
            y: Tensor::zeros([n, 1], device),
        }
    }
}

/// Rows whose extremes move around: each batch has its own range, and some extremes appear in
/// one replica's batch only.
fn rows(n: usize, seed: u64) -> Vec<[f32; FEATURES]> {
    let mut next = burn_qat_tests::uniform(seed);
    (0..n)
        .map(|i| {
            let spread = 1.0 + (i % 7) as f32 * (1.0 + (i % 3) as f32);
            std::array::from_fn(|_| next() * spread)
        })
        .collect()
}

fn range(fq: &FakeQuant) -> (f32, f32) {
    let (lo, hi) = fq.observed_range().expect("observed");
    (lo[0], hi[0])
}

/// Trains `Probe` at learning rate 0 on two flex devices for `epochs` epochs over `n` rows and
/// checks every observer against one device observing each step's combined batch.
fn run_two_devices(seed: u64, n: usize, epochs: usize) {
    let device = Device::flex().autodiff();
    let probe = Probe::new(&device);
    let log = probe.log.clone();
    let train = DataLoaderBuilder::new(RowBatcher)
        .batch_size(8)
        .build(InMemDataset::new(rows(n, seed)));
    let valid = DataLoaderBuilder::new(RowBatcher)
        .batch_size(16)
        .build(InMemDataset::new(rows(16, seed + 1)));
    let dir = tempfile::tempdir().unwrap();
    let devices = vec![Device::flex(), Device::flex()];
    let result = SupervisedTraining::new(dir.path(), train, valid)
        .metrics((LossMetric::new(),))
        .num_epochs(epochs)
        .with_training_strategy(
            ExecutionStrategy::multi(devices, MultiDeviceOptim::OptimMainDevice).into(),
        )
        .launch(Learner::new(probe, SgdConfig::new().init(), 0.0));
    let model = result.model;

    // The reference: one device, each step's batches concatenated.
    let log = log.0.lock().unwrap();
    assert_eq!(
        log.len(),
        2 * epochs,
        "one worker thread per device and epoch"
    );
    let reference = Probe::new(&device);
    let mut steps = 0;
    for epoch in log.chunks(2) {
        let per_thread: Vec<&Vec<Vec<f32>>> = epoch.iter().map(|(_, v)| v).collect();
        for k in 0..per_thread.iter().map(|v| v.len()).max().unwrap() {
            let combined: Vec<f32> = per_thread
                .iter()
                .filter_map(|v| v.get(k))
                .flatten()
                .copied()
                .collect();
            let rows = combined.len() / FEATURES;
            let x =
                Tensor::<1>::from_floats(combined.as_slice(), &device).reshape([rows, FEATURES]);
            let _ = reference.forward(x);
            steps += 1;
        }
    }
    let mut wrong = vec![];
    for (name, got, want) in [
        ("LastValue", &model.last, &reference.last),
        ("MovingAverage", &model.ema, &reference.ema),
        ("RunningMinMax", &model.running, &reference.running),
    ] {
        let (g, w) = (range(got), range(want));
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        if !(close(g.0, w.0) && close(g.1, w.1)) {
            wrong.push(format!(
                "{name} after {steps} steps on two devices: {g:?}, one device on the combined batches: {w:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "seed {seed}:\n{}", wrong.join("\n"));
}

#[test]
fn observers_see_every_replicas_batch() {
    run_two_devices(7, 160, 1);
}

/// 161 rows split 80 / 81: the second device has one more (one-row) batch, so each epoch ends
/// with a step of one replica; the next epoch's new worker threads start a new step.
#[test]
fn observers_see_every_replicas_batch_over_uneven_epochs() {
    run_two_devices(9, 161, 3);
}

/// The combination does not depend on which replica's thread comes first: 20 runs, other data.
#[test]
fn observers_see_every_replicas_batch_repeatedly() {
    for seed in 0..20 {
        run_two_devices(100 + seed, 160, 1);
    }
}
