//! Graph mode costs: (1) one QAT training step of the MNIST `bn` CNN as a `QatGraph` (the plain
//! struct `model::BnNet` through `graph::prepare`) against the same architecture as burn-qat's
//! `Sequential`, batch 32, flex, in this process; (2) tracing a ResNet-18 (ImageNet shapes,
//! 11.7 M parameters) with `graph::trace`, and preparing it with `graph::prepare`.
//!
//! ```sh
//! cargo bench -p burn-qat -p mnist --all-features --bench graph
//! ```

use std::time::Duration;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::relu;
use burn_qat::graph;
use burn_qat::model::QatConfig;
use burn_qat::transform::{FusedConfig, SeqLayer};
use burn_qat::{FakeQuantConfig, Observer, QuantSpec};
use criterion::{Criterion, criterion_group, criterion_main};
use mnist::bits::bn_sequential;
use mnist::model::{BnNet, prepare_qat};

#[path = "../../../crates/burn-qat/benches/common/mod.rs"]
mod common;
mod train_step;
use common::{mean, timed};
use train_step::bench_step;

fn qat_step(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    device.seed(0);
    let x = Tensor::<4>::random([32, 1, 28, 28], Distribution::Uniform(0.0, 1.0), &device);
    let y = Tensor::<1, Int>::from_ints([3i64; 32], &device);
    // The same W8A8 settings both ways: per-channel 8-bit weights, BatchNorm folded, ReLU fused,
    // 8-bit EMA-observed activations, input quantized, float logits.
    let act = FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(8))
        .with_observer(Observer::MovingAverage { decay: 0.999 });
    let mut seq = bn_sequential(&device)
        .fuse(
            &FusedConfig::new()
                .with_weight(Some(QuantSpec::weight_per_channel_symmetric(8, 0)))
                .with_output(Some(act.clone())),
        )
        .unwrap();
    seq.layers
        .insert(0, SeqLayer::FakeQuant(act.init(&device).unwrap()));
    if let Some(SeqLayer::FusedLinear(last)) = seq.layers.last_mut() {
        last.output = None;
    }
    let graph = prepare_qat(&BnNet::new(&device), 8, 8).unwrap();
    let group = "qat_step_bn_cnn_batch_32";
    bench_step(c, group, "sequential", seq, true, &x, &y);
    bench_step(c, group, "graph", graph, true, &x, &y);
    let (s, g) = (
        mean(&format!("{group}/sequential")).unwrap(),
        mean(&format!("{group}/graph")).unwrap(),
    );
    println!(
        "RATIO QAT step, batch 32: Sequential {:.1} ms, QatGraph {:.1} ms: graph / Sequential = {:.3}",
        s * 1e3,
        g * 1e3,
        g / s
    );
}

// ---------------------------------------------------------------- ResNet-18, as a user writes it

#[derive(Module, Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

#[derive(Module, Debug)]
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<Downsample>,
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
        .with_bias(false)
        .init(device)
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: conv(cin, cout, 3, stride, device),
            bn1: BatchNormConfig::new(cout).init(device),
            conv2: conv(cout, cout, 3, 1, device),
            bn2: BatchNormConfig::new(cout).init(device),
            downsample: (stride != 1 || cin != cout).then(|| Downsample {
                conv: conv(cin, cout, 1, stride, device),
                bn: BatchNormConfig::new(cout).init(device),
            }),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = relu(self.bn1.forward(self.conv1.forward(x.clone())));
        let y = self.bn2.forward(self.conv2.forward(y));
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(d.conv.forward(x)),
            None => x,
        };
        relu(y + identity)
    }
}

#[derive(Module, Debug)]
struct ResNet18 {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: MaxPool2d,
    layers: Vec<BasicBlock>,
    avgpool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet18 {
    fn new(device: &Device) -> Self {
        let mut layers = Vec::new();
        let mut cin = 64;
        for (cout, stride) in [(64, 1), (128, 2), (256, 2), (512, 2)] {
            layers.push(BasicBlock::new(cin, cout, stride, device));
            layers.push(BasicBlock::new(cout, cout, 1, device));
            cin = cout;
        }
        Self {
            conv1: conv(3, 64, 7, 2, device),
            bn1: BatchNormConfig::new(64).init(device),
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layers,
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(512, 1000).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self
            .maxpool
            .forward(relu(self.bn1.forward(self.conv1.forward(x))));
        let x = self.layers.iter().fold(x, |x, block| block.forward(x));
        self.fc.forward(self.avgpool.forward(x).flatten(1, 3))
    }
}

fn trace_resnet18(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let model = ResNet18::new(&device);
    let dims = [1, 3, 224, 224];
    let run = |m: &ResNet18, x: Tensor<4>| m.forward(x);
    let mut g = c.benchmark_group("resnet18");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(2));
    g.bench_function("trace", |b| {
        b.iter_custom(|iters| {
            timed("resnet18/trace", iters, || {
                let t = graph::trace(&model, &dims, run).unwrap();
                assert!(t.params.len() > 60);
            })
        })
    });
    g.bench_function("prepare", |b| {
        b.iter_custom(|iters| {
            timed("resnet18/prepare", iters, || {
                drop(graph::prepare(&model, &dims, run, &QatConfig::new()).unwrap())
            })
        })
    });
    g.finish();
    println!(
        "TRACE ResNet-18 (11.7 M parameters, [1, 3, 224, 224]): trace {:.0} ms, prepare {:.0} ms",
        mean("resnet18/trace").unwrap() * 1e3,
        mean("resnet18/prepare").unwrap() * 1e3
    );
}

criterion_group!(benches, qat_step, trace_resnet18);
criterion_main!(benches);
