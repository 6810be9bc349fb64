//! Accuracy against bit width: the `bn` model trained once in float, then fine-tuned with QAT
//! at each bit width (weights and activations), with observer ranges and with LSQ, evaluated as
//! the QAT model and as the converted integer model. Written as JSON, a Markdown table and a
//! PNG plot.

use std::path::Path;

use burn::module::Module;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrSchedulerConfig;
use burn::prelude::*;
use burn_qat::nn::learned::range_params;
use burn_qat::nn::{LearnedRange, start_learning};
use burn_qat::transform::{FusedConfig, SeqLayer, Sequential};
use burn_qat::{FakeQuantConfig, Observer, QatError, QuantSpec};
use serde::{Deserialize, Serialize};

use crate::data::{Mnist, SIDE, Split};
use crate::evaluate_int8;
use crate::model::Classifier;
use crate::training::{adam, evaluate, train_epoch};

/// How the quantization ranges are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Ranges {
    /// Observers: per-channel weight min/max, moving-average activation min/max (tfmot).
    Observers,
    /// LSQ: learned per-channel weight steps and activation steps (unsigned grids after ReLU),
    /// initialized from the observers after a short observe phase.
    Lsq,
}

/// The sweep's settings.
#[derive(Clone, Debug)]
pub struct SweepConfig {
    /// Backend name.
    pub device: String,
    /// Seed of initialization and shuffling.
    pub seed: u64,
    /// Bit widths (weights and activations of the middle layers).
    pub bits: Vec<u32>,
    /// Range methods.
    pub ranges: Vec<Ranges>,
    /// Keep the first layer's weights, the input and the logits layer at 8 bits (the LSQ and
    /// PACT papers' convention).
    pub ends_8bit: bool,
    /// Float epochs (once).
    pub epochs_float: usize,
    /// QAT epochs per configuration.
    pub epochs_qat: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Adam learning rate of the weights.
    pub learning_rate: f64,
    /// Adam learning rate of the learned ranges (LSQ steps).
    pub range_learning_rate: f64,
    /// Batches of observation before LSQ starts learning.
    pub observe_batches: usize,
    /// Use at most this many training images.
    pub train_limit: Option<usize>,
    /// Use at most this many test images.
    pub test_limit: Option<usize>,
}

/// One configuration's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepRow {
    /// Range method.
    pub ranges: Ranges,
    /// Bits of weights and activations.
    pub bits: u32,
    /// QAT model test accuracy.
    pub qat_test_acc: f64,
    /// Integer model test accuracy.
    pub int_test_acc: f64,
}

/// The sweep's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepReport {
    /// Float test accuracy of the shared starting model.
    pub float_test_acc: f64,
    /// The settings, in words.
    pub setup: String,
    /// One row per (method, bits).
    pub rows: Vec<SweepRow>,
}

/// The `bn` model prepared for QAT at `bits` with `ranges`.
pub fn prepare(
    float: Sequential,
    ranges: Ranges,
    bits: u32,
    ends_8bit: bool,
    device: &Device,
) -> Result<Sequential, QatError> {
    let layers = float.layers.len();
    let last = format!("layers.{}", layers - 1);
    let mut fused = float.fuse_by(|path| {
        let end = ends_8bit && (path == "layers.0" || path == last);
        let wbits = if end { 8 } else { bits };
        let weight = QuantSpec::weight_per_channel_symmetric(wbits, 0);
        let observer = Observer::MovingAverage { decay: 0.999 };
        match ranges {
            Ranges::Observers => FusedConfig::new()
                .with_weight(Some(weight))
                .with_output(Some(
                    FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(bits))
                        .with_observer(observer),
                )),
            Ranges::Lsq => FusedConfig::new()
                .with_weight(Some(weight))
                .with_learned_weight(true)
                .with_output(Some(
                    FakeQuantConfig::new(
                        QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(bits),
                    )
                    .with_observer(observer),
                ))
                .with_learned_output(Some(LearnedRange::Lsq)),
        }
    })?;
    let input_bits = if ends_8bit { 8 } else { bits };
    fused.layers.insert(
        0,
        SeqLayer::FakeQuant(
            FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(input_bits))
                .with_observer(Observer::MovingAverage { decay: 0.999 })
                .init(device)?,
        ),
    );
    Ok(fused)
}

/// A copy of `model` that shares no state with it (Burn's `RunningState` buffers are shared by
/// clones, so each configuration starts from a fresh model loaded with the trained values).
fn fresh_copy(model: &Sequential, device: &Device) -> Sequential {
    bn_sequential(device).load_record(model.clone().into_record())
}

/// The `bn` architecture (`model::BnNet`) as burn-qat's `Sequential`, whose per-layer fusion
/// (`fuse_by`) the sweep uses to keep the first and last layers at 8 bits.
pub fn bn_sequential(device: &Device) -> Sequential {
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::nn::{BatchNormConfig, LinearConfig, Relu};
    Sequential::new(vec![
        SeqLayer::Conv2d(Conv2dConfig::new([1, 32], [3, 3]).init(device)),
        SeqLayer::BatchNorm(BatchNormConfig::new(32).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Conv2d(Conv2dConfig::new([32, 64], [3, 3]).init(device)),
        SeqLayer::BatchNorm(BatchNormConfig::new(64).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::MaxPool2d(MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(64 * 12 * 12, 128).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Linear(LinearConfig::new(128, 10).init(device)),
    ])
}

impl Classifier for Sequential {
    fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward(x)
    }
}

/// Runs the sweep.
pub fn sweep(
    config: &SweepConfig,
    data: &Mnist,
) -> Result<SweepReport, Box<dyn std::error::Error>> {
    let device = burn_qat::backend::device(&config.device)?.autodiff();
    device.seed(config.seed);
    let limit = |split: &Split, n: Option<usize>| match n {
        Some(n) => split.take(n),
        None => split.clone(),
    };
    let train = limit(&data.train, config.train_limit);
    let test = limit(&data.test, config.test_limit);
    let eval_device = device.clone().inner();

    let mut float = bn_sequential(&device);
    let mut optim = adam();
    for epoch in 0..config.epochs_float {
        let (m, stats) = train_epoch(
            float,
            &mut optim,
            &train,
            config.batch_size,
            config.learning_rate,
            config.seed + epoch as u64,
            &device,
            &format!("float {}/{}", epoch + 1, config.epochs_float),
        );
        float = m;
        println!("float epoch {}: loss {:.4}", epoch + 1, stats.loss);
    }
    let float_acc = evaluate(&float.valid(), &test, &eval_device);
    println!("float test accuracy {:.2}%", float_acc * 100.0);

    let mut rows = Vec::new();
    for &bits in &config.bits {
        for &ranges in &config.ranges {
            device.seed(config.seed + 7);
            let mut qat = prepare(
                fresh_copy(&float, &device),
                ranges,
                bits,
                config.ends_8bit,
                &device,
            )?;
            let mut optim = adam();
            let label =
                |e: usize| format!("{ranges:?} W{bits}A{bits} {}/{}", e + 1, config.epochs_qat);
            if ranges == Ranges::Lsq {
                // Observe phase: a few QAT steps with observer ranges, then the hand-off.
                let observe = train.take(config.observe_batches * config.batch_size);
                let (m, _) = train_epoch(
                    qat,
                    &mut optim,
                    &observe,
                    config.batch_size,
                    config.learning_rate,
                    config.seed + 500,
                    &device,
                    "observe",
                );
                qat = start_learning(m);
            }
            let lr =
                ModuleLrSchedulerConfig::new(LrSchedulerConfig::Constant(config.learning_rate))
                    .with_group(
                        range_params(&qat),
                        LrSchedulerConfig::Constant(config.range_learning_rate),
                    )
                    .init()?
                    .step();
            for epoch in 0..config.epochs_qat {
                let (m, stats) = train_epoch(
                    qat,
                    &mut optim,
                    &train,
                    config.batch_size,
                    lr.clone(),
                    config.seed + 1000 + epoch as u64,
                    &device,
                    &label(epoch),
                );
                qat = m;
                println!("{} loss {:.4}", label(epoch), stats.loss);
            }
            let eval = qat.valid();
            let qat_acc = evaluate(&eval, &test, &eval_device);
            let int = burn_qat::export::convert(&burn_qat::graph::from_sequential(
                &eval,
                &[1, 1, SIDE, SIDE],
            )?)?;
            let int_acc = evaluate_int8(&int, &test)?;
            println!(
                "{ranges:?} W{bits}A{bits}: QAT {:.2}%, integer {:.2}%",
                qat_acc * 100.0,
                int_acc * 100.0
            );
            rows.push(SweepRow {
                ranges,
                bits,
                qat_test_acc: qat_acc,
                int_test_acc: int_acc,
            });
        }
    }
    let setup = format!(
        "bn model, {} float epoch(s) once, then {} QAT epoch(s) per row; {} train / {} test \
         images; batch {}, Adam lr {} (LSQ steps {}); {}",
        config.epochs_float,
        config.epochs_qat,
        train.len(),
        test.len(),
        config.batch_size,
        config.learning_rate,
        config.range_learning_rate,
        if config.ends_8bit {
            "input, first-layer weights and last layer at 8 bits"
        } else {
            "every layer at the given bits"
        }
    );
    Ok(SweepReport {
        float_test_acc: float_acc,
        setup,
        rows,
    })
}

/// The Markdown table: one row per bit width, QAT and integer accuracy per method, and the
/// difference to float.
pub fn markdown(r: &SweepReport) -> String {
    let mut bits: Vec<u32> = r.rows.iter().map(|row| row.bits).collect();
    bits.dedup();
    let mut s = format!(
        "float: {:.2}% ({})\n\n| bits (W/A) | observers QAT | observers int | LSQ QAT | LSQ int |\n|---|---|---|---|---|\n",
        r.float_test_acc * 100.0,
        r.setup
    );
    let cell = |b: u32, m: Ranges, int: bool| {
        r.rows
            .iter()
            .find(|row| row.bits == b && row.ranges == m)
            .map_or("n/a".to_string(), |row| {
                let v = if int {
                    row.int_test_acc
                } else {
                    row.qat_test_acc
                };
                format!("{:.2}% ({:+.2})", v * 100.0, (v - r.float_test_acc) * 100.0)
            })
    };
    for b in bits {
        s += &format!(
            "| W{b}A{b} | {} | {} | {} | {} |\n",
            cell(b, Ranges::Observers, false),
            cell(b, Ranges::Observers, true),
            cell(b, Ranges::Lsq, false),
            cell(b, Ranges::Lsq, true)
        );
    }
    s
}

/// Writes `bits.json`, `bits.md` and `bits.png` (integer-model accuracy against bit width, one
/// line per method, the float accuracy as a reference line) into `dir`.
pub fn write(
    r: &SweepReport,
    dir: &Path,
    font: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bits.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("bits.md"), markdown(r))?;
    crate::plot::accuracy_vs_bits(r, &dir.join("bits.png"), font)?;
    Ok(())
}
