//! The example's models, written as a Burn user writes them: plain structs with a `forward`,
//! no burn-qat types inside. QAT reaches them through graph mode ([`prepare_qat`]).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use burn::tensor::activation::{relu, relu6};
use burn_qat::graph::{self, QatGraph};
use burn_qat::model::{ActivationQuant, QatConfig, WeightQuant};
use burn_qat::{Observer, QatError};
use serde::{Deserialize, Serialize};

use crate::data::SIDE;

/// A model that classifies `[n, 1, 28, 28]` images into 10 logits.
pub trait Classifier: Module + Sized {
    /// Logits `[n, 10]`.
    fn logits(&self, x: Tensor<4>) -> Tensor<2>;
}

impl Classifier for QatGraph {
    fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward(x)
    }
}

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
    /// MobileNet-v2 style: Conv(16, 3x3, stride 2) -> BN -> ReLU6 -> inverted residual
    /// (1x1 expand x4, 3x3 depthwise, ReLU6, linear 1x1 bottleneck, + input) -> inverted
    /// residual to 24 channels (stride 2, no shortcut) -> 1x1 Conv(96) -> BN -> ReLU6 -> global
    /// average pool -> Dense(10).
    Mobile,
    /// ResNet style: bias-free Conv(16, 3x3, stride 2) -> BN -> ReLU -> basic block (16) ->
    /// basic block to 32 channels, stride 2, with a 1x1 stride-2 projection shortcut -> global
    /// average pool -> Dense(10).
    Resnet,
}

impl ModelKind {
    /// The default schedule for this model, as measured with tfmot:
    /// `(float epochs, QAT epochs, batch size)`.
    pub fn schedule(&self) -> (usize, usize, usize) {
        match self {
            ModelKind::Tutorial => (1, 1, 32),
            ModelKind::Bn | ModelKind::Residual => (2, 1, 128),
            // Not measured with tfmot; the small global-pooling nets learn faster in small batches.
            ModelKind::Mobile | ModelKind::Resnet => (2, 1, 32),
        }
    }

    /// tfmot 0.7.5 / TF 2.15 QAT test accuracy for the default schedule (NaN: not measured).
    pub fn tfmot_qat_accuracy(&self) -> f64 {
        match self {
            ModelKind::Tutorial => 0.974,
            ModelKind::Bn => 0.9820,
            _ => f64::NAN,
        }
    }
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> Conv2dConfig {
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
}

fn pool2() -> MaxPool2d {
    MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init()
}

fn global_pool() -> AdaptiveAvgPool2d {
    AdaptiveAvgPool2dConfig::new([1, 1]).init()
}

/// tfmot's tutorial model.
#[derive(Module, Debug)]
pub struct Tutorial {
    conv: Conv2d,
    pool: MaxPool2d,
    fc: Linear,
}

impl Tutorial {
    /// A fresh model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([1, 12], [3, 3]).init(device),
            pool: pool2(),
            fc: LinearConfig::new(12 * 13 * 13, 10).init(device),
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, 1, 28, 28]`
    /// - output: `[n, 10]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.conv.forward(x)));
        self.fc.forward(x.flatten(1, 3))
    }
}

/// Two conv blocks with BatchNorm and a two-layer head.
#[derive(Module, Debug)]
pub struct BnNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    relu: Relu,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl BnNet {
    /// A fresh model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            conv1: Conv2dConfig::new([1, 32], [3, 3]).init(device),
            bn1: BatchNormConfig::new(32).init(device),
            conv2: Conv2dConfig::new([32, 64], [3, 3]).init(device),
            bn2: BatchNormConfig::new(64).init(device),
            relu: Relu::new(),
            pool: pool2(),
            fc1: LinearConfig::new(64 * 12 * 12, 128).init(device),
            fc2: LinearConfig::new(128, 10).init(device),
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, 1, 28, 28]`
    /// - output: `[n, 10]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.relu.forward(self.bn1.forward(self.conv1.forward(x)));
        let x = self.relu.forward(self.bn2.forward(self.conv2.forward(x)));
        let x = self.pool.forward(x).flatten(1, 3);
        self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
    }
}

/// A CNN with one residual block.
#[derive(Module, Debug)]
pub struct ResidualNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    pool: MaxPool2d,
    fc: Linear,
}

impl ResidualNet {
    /// A fresh model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            stem: Conv2dConfig::new([1, 16], [3, 3]).init(device),
            stem_bn: BatchNormConfig::new(16).init(device),
            conv1: conv(16, 16, 3, 1, 1).init(device),
            bn1: BatchNormConfig::new(16).init(device),
            conv2: conv(16, 16, 3, 1, 1).init(device),
            bn2: BatchNormConfig::new(16).init(device),
            pool: pool2(),
            fc: LinearConfig::new(16 * 6 * 6, 10).init(device),
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, 1, 28, 28]`
    /// - output: `[n, 10]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self
            .pool
            .forward(relu(self.stem_bn.forward(self.stem.forward(x))));
        let y = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let y = self.bn2.forward(self.conv2.forward(y));
        let x = self.pool.forward(relu(x + y));
        self.fc.forward(x.flatten(1, 3))
    }
}

/// A MobileNet-v2 inverted residual: 1x1 expand, 3x3 depthwise, ReLU6, linear 1x1 projection,
/// and the input added when the shape allows.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    expand: Conv2d,
    expand_bn: BatchNorm,
    depthwise: Conv2d,
    depthwise_bn: BatchNorm,
    project: Conv2d,
    project_bn: BatchNorm,
    shortcut: bool,
}

impl InvertedResidual {
    /// `cin` to `cout` channels, expanded `expand` times, with `stride`.
    pub fn new(cin: usize, cout: usize, expand: usize, stride: usize, device: &Device) -> Self {
        let hidden = cin * expand;
        Self {
            expand: conv(cin, hidden, 1, 1, 0).with_bias(false).init(device),
            expand_bn: BatchNormConfig::new(hidden).init(device),
            depthwise: conv(hidden, hidden, 3, stride, 1)
                .with_groups(hidden)
                .with_bias(false)
                .init(device),
            depthwise_bn: BatchNormConfig::new(hidden).init(device),
            project: conv(hidden, cout, 1, 1, 0).with_bias(false).init(device),
            project_bn: BatchNormConfig::new(cout).init(device),
            shortcut: stride == 1 && cin == cout,
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, cin, h, w]`
    /// - output: `[n, cout, h / stride, w / stride]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = relu6(self.expand_bn.forward(self.expand.forward(x.clone())));
        let y = relu6(self.depthwise_bn.forward(self.depthwise.forward(y)));
        let y = self.project_bn.forward(self.project.forward(y));
        if self.shortcut { x + y } else { y }
    }
}

/// A small MobileNet-v2.
#[derive(Module, Debug)]
pub struct MobileNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    block1: InvertedResidual,
    block2: InvertedResidual,
    head: Conv2d,
    head_bn: BatchNorm,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl MobileNet {
    /// A fresh model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            stem: conv(1, 16, 3, 2, 1).with_bias(false).init(device),
            stem_bn: BatchNormConfig::new(16).init(device),
            block1: InvertedResidual::new(16, 16, 4, 1, device),
            block2: InvertedResidual::new(16, 24, 4, 2, device),
            head: conv(24, 96, 1, 1, 0).with_bias(false).init(device),
            head_bn: BatchNormConfig::new(96).init(device),
            pool: global_pool(),
            fc: LinearConfig::new(96, 10).init(device),
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, 1, 28, 28]`
    /// - output: `[n, 10]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = relu6(self.stem_bn.forward(self.stem.forward(x)));
        let x = self.block2.forward(self.block1.forward(x));
        let x = relu6(self.head_bn.forward(self.head.forward(x)));
        self.fc.forward(self.pool.forward(x).flatten(1, 3))
    }
}

/// A ResNet projection shortcut: 1x1 conv (bias-free) and BatchNorm.
#[derive(Module, Debug)]
pub struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

/// A ResNet basic block with bias-free convs and an optional 1x1 projection shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Downsample>,
}

impl BasicBlock {
    /// `cin` to `cout` channels with `stride` (a projection shortcut when either changes).
    pub fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: conv(cin, cout, 3, stride, 1).with_bias(false).init(device),
            bn1: BatchNormConfig::new(cout).init(device),
            conv2: conv(cout, cout, 3, 1, 1).with_bias(false).init(device),
            bn2: BatchNormConfig::new(cout).init(device),
            downsample: (stride != 1 || cin != cout).then(|| Downsample {
                conv: conv(cin, cout, 1, stride, 0).with_bias(false).init(device),
                bn: BatchNormConfig::new(cout).init(device),
            }),
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, cin, h, w]`
    /// - output: `[n, cout, h / stride, w / stride]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let y = self.bn2.forward(self.conv2.forward(y));
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x)),
            None => x,
        };
        relu(y + identity)
    }
}

/// A small ResNet.
#[derive(Module, Debug)]
pub struct ResNet {
    stem: Conv2d,
    stem_bn: BatchNorm,
    layer1: BasicBlock,
    layer2: BasicBlock,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet {
    /// A fresh model on `device`.
    pub fn new(device: &Device) -> Self {
        Self {
            stem: conv(1, 16, 3, 2, 1).with_bias(false).init(device),
            stem_bn: BatchNormConfig::new(16).init(device),
            layer1: BasicBlock::new(16, 16, 1, device),
            layer2: BasicBlock::new(16, 32, 2, device),
            pool: global_pool(),
            fc: LinearConfig::new(32, 10).init(device),
        }
    }

    /// # Shapes
    ///
    /// - x: `[n, 1, 28, 28]`
    /// - output: `[n, 10]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = relu(self.stem_bn.forward(self.stem.forward(x)));
        let x = self.layer2.forward(self.layer1.forward(x));
        self.fc.forward(self.pool.forward(x).flatten(1, 3))
    }
}

macro_rules! classifier {
    ($($ty:ident),*) => {$(
        impl Classifier for $ty {
            fn logits(&self, x: Tensor<4>) -> Tensor<2> {
                self.forward(x)
            }
        }
    )*};
}
classifier!(Tutorial, BnNet, ResidualNet, MobileNet, ResNet);

/// The QAT settings of the example: weights `weight_bits` symmetric per output channel,
/// activations `act_bits` asymmetric per tensor with EMA observers (tfmot's decay 0.999), float
/// logits (8-bit logits tie).
pub fn qat_config(weight_bits: u32, act_bits: u32) -> QatConfig {
    QatConfig::new()
        .with_float_output(true)
        .with_default(WeightQuant::per_channel_bits(weight_bits))
        .with_activations(
            ActivationQuant::bits(act_bits).with_observer(Observer::MovingAverage { decay: 0.999 }),
        )
}

/// Prepares a trained float model for QAT with graph mode: its forward is traced, every
/// Conv/Linear -> BatchNorm -> ReLU chain fused (BatchNorm folded), weights and activations
/// fake-quantized as [`qat_config`] says, the input quantized.
pub fn prepare_qat<M: Classifier>(
    model: &M,
    weight_bits: u32,
    act_bits: u32,
) -> Result<QatGraph, QatError> {
    graph::prepare(
        model,
        &[1, 1, SIDE, SIDE],
        |m: &M, x: Tensor<4>| m.logits(x),
        &qat_config(weight_bits, act_bits),
    )
}
