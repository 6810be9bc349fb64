//! Integer inference against float inference of the same model (the MNIST `bn` CNN) on flex,
//! batch 1 and batch 256; prints the ratios. Both timed by criterion in this process.
//!
//! ```sh
//! cargo bench -p burn-qat -p mnist --all-features --bench int8   # reuses CI's release build
//! ```

use std::time::Duration;

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNormConfig, LinearConfig, Relu};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_qat::transform::{FusedConfig, SeqLayer, Sequential};
use burn_qat::{FakeQuantConfig, QuantSpec};
use criterion::{Criterion, criterion_group, criterion_main};

mod common;
use common::*;

fn bn_model(device: &Device) -> Sequential {
    let pool = MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init();
    Sequential::new(vec![
        SeqLayer::Conv2d(Conv2dConfig::new([1, 32], [3, 3]).init(device)),
        SeqLayer::BatchNorm(BatchNormConfig::new(32).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Conv2d(Conv2dConfig::new([32, 64], [3, 3]).init(device)),
        SeqLayer::BatchNorm(BatchNormConfig::new(64).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::MaxPool2d(pool),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(64 * 12 * 12, 128).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Linear(LinearConfig::new(128, 10).init(device)),
    ])
}

fn bench(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    device.seed(0);
    let float = bn_model(&device);
    let float_eval = float.valid();
    let act = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric());
    let mut qat = float
        .fuse(&FusedConfig::new().with_output(Some(act.clone())))
        .unwrap();
    qat.layers
        .insert(0, SeqLayer::FakeQuant(act.init(&device).unwrap()));
    for _ in 0..2 {
        let _ = qat.forward(Tensor::<4>::random(
            [32, 1, 28, 28],
            Distribution::Uniform(0.0, 1.0),
            &device,
        ));
    }
    let graph = burn_qat::graph::from_sequential(&qat.valid(), &[1, 1, 28, 28]).unwrap();
    let int = burn_qat::export::convert(&graph).unwrap();
    let plain = Device::flex();
    for batch in [1usize, 256] {
        let x = Tensor::<4>::random([batch, 1, 28, 28], Distribution::Uniform(0.0, 1.0), &plain);
        let host: Vec<f32> = x.to_data().convert::<f32>().try_to_vec().unwrap();
        let mut group = c.benchmark_group(format!("inference_bn_cnn/batch_{batch}"));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(4))
            .warm_up_time(Duration::from_secs(1));
        let kf = format!("float/{batch}");
        group.bench_function("float_flex", |b| {
            b.iter_custom(|iters| {
                timed(&kf, iters, || {
                    let y = float_eval.forward(x.clone());
                    let _ = y.into_data();
                })
            })
        });
        let ki = format!("int8/{batch}");
        group.bench_function("int8", |b| {
            b.iter_custom(|iters| timed(&ki, iters, || drop(int.forward(&host).unwrap())))
        });
        group.finish();
        let (f, i) = (mean(&kf).unwrap(), mean(&ki).unwrap());
        println!(
            "RATIO batch {batch}: float (flex) {:.3} ms / int8 {:.3} ms = int8 is {:.2}x faster",
            f * 1e3,
            i * 1e3,
            f / i
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
