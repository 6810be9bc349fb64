//! The two architectures for which tfmot numbers exist, as [`Sequential`] models so that QAT can
//! discover and fuse their Conv -> BatchNorm -> ReLU chains.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNormConfig, LinearConfig, Relu};
use burn::prelude::*;
use burn_qat::transform::{Activation, FusedConfig, Residual, SeqLayer, Sequential};
use burn_qat::{FakeQuantConfig, Observer, QatError, QuantSpec};
use serde::{Deserialize, Serialize};

/// Which model to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// tfmot's tutorial model: Conv2D(12, 3x3, relu) -> MaxPool(2x2) -> Flatten -> Dense(10).
    Tutorial,
    /// Conv(32, 3x3) -> BN -> ReLU -> Conv(64, 3x3) -> BN -> ReLU -> MaxPool(2x2) -> Flatten ->
    /// Dense(128, relu) -> Dense(10).
    Bn,
    /// A small residual CNN: Conv(16, 3x3) -> BN -> ReLU -> MaxPool(2x2) ->
    /// [Conv(16, 3x3, pad 1) -> BN -> ReLU -> Conv(16, 3x3, pad 1) -> BN] + Add -> ReLU ->
    /// MaxPool(2x2) -> Flatten -> Dense(10).
    Residual,
}

impl ModelKind {
    /// The float model, freshly initialized on `device`.
    pub fn init(&self, device: &Device) -> Sequential {
        let pool = || SeqLayer::MaxPool2d(MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init());
        match self {
            ModelKind::Tutorial => Sequential::new(vec![
                SeqLayer::Conv2d(Conv2dConfig::new([1, 12], [3, 3]).init(device)),
                SeqLayer::Relu(Relu::new()),
                pool(),
                SeqLayer::Flatten(Default::default()),
                SeqLayer::Linear(LinearConfig::new(12 * 13 * 13, 10).init(device)),
            ]),
            ModelKind::Bn => Sequential::new(vec![
                SeqLayer::Conv2d(Conv2dConfig::new([1, 32], [3, 3]).init(device)),
                SeqLayer::BatchNorm(BatchNormConfig::new(32).init(device)),
                SeqLayer::Relu(Relu::new()),
                SeqLayer::Conv2d(Conv2dConfig::new([32, 64], [3, 3]).init(device)),
                SeqLayer::BatchNorm(BatchNormConfig::new(64).init(device)),
                SeqLayer::Relu(Relu::new()),
                pool(),
                SeqLayer::Flatten(Default::default()),
                SeqLayer::Linear(LinearConfig::new(64 * 12 * 12, 128).init(device)),
                SeqLayer::Relu(Relu::new()),
                SeqLayer::Linear(LinearConfig::new(128, 10).init(device)),
            ]),
            ModelKind::Residual => {
                let conv = |i, o| {
                    SeqLayer::Conv2d(
                        Conv2dConfig::new([i, o], [3, 3])
                            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                            .init(device),
                    )
                };
                let body = Sequential::new(vec![
                    conv(16, 16),
                    SeqLayer::BatchNorm(BatchNormConfig::new(16).init(device)),
                    SeqLayer::Relu(Relu::new()),
                    conv(16, 16),
                    SeqLayer::BatchNorm(BatchNormConfig::new(16).init(device)),
                ]);
                Sequential::new(vec![
                    SeqLayer::Conv2d(Conv2dConfig::new([1, 16], [3, 3]).init(device)),
                    SeqLayer::BatchNorm(BatchNormConfig::new(16).init(device)),
                    SeqLayer::Relu(Relu::new()),
                    pool(),
                    SeqLayer::Residual(Residual::new(body, Activation::Relu)),
                    pool(),
                    SeqLayer::Flatten(Default::default()),
                    SeqLayer::Linear(LinearConfig::new(16 * 6 * 6, 10).init(device)),
                ])
            }
        }
    }

    /// The default schedule for this model, as measured with tfmot:
    /// `(float epochs, QAT epochs, batch size)`.
    pub fn schedule(&self) -> (usize, usize, usize) {
        match self {
            ModelKind::Tutorial => (1, 1, 32),
            ModelKind::Bn | ModelKind::Residual => (2, 1, 128),
        }
    }

    /// tfmot 0.7.5 / TF 2.15 QAT test accuracy for the default schedule.
    pub fn tfmot_qat_accuracy(&self) -> f64 {
        match self {
            ModelKind::Tutorial => 0.974,
            ModelKind::Bn => 0.9820,
            ModelKind::Residual => f64::NAN,
        }
    }
}

/// Prepares a trained float model for W8A8 QAT with the public burn-qat API: every
/// Conv/Linear -> BatchNorm -> ReLU chain fused (BatchNorm folded into 8-bit per-channel
/// symmetric weights, 8-bit asymmetric per-tensor activations after each fused activation, EMA
/// observers with tfmot's decay 0.999) and the input quantized.
pub fn prepare_qat(
    model: Sequential,
    weight_bits: u32,
    act_bits: u32,
    device: &Device,
) -> Result<Sequential, QatError> {
    let act = FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(act_bits))
        .with_observer(Observer::MovingAverage { decay: 0.999 });
    let config = FusedConfig::new()
        .with_weight(Some(QuantSpec::weight_per_channel_symmetric(
            weight_bits,
            0,
        )))
        .with_output(Some(act.clone()));
    let mut fused = model.fuse(&config)?;
    fused
        .layers
        .insert(0, SeqLayer::FakeQuant(act.init(device)?));
    Ok(fused)
}

/// Number of float parameters.
pub fn num_params(model: &Sequential) -> usize {
    use burn::module::Module;
    model.num_params()
}
