//! Fake-quant forward+backward on a 4M-element tensor against the same tensor through one plain
//! elementwise op (forward+backward), on every backend compiled in. Prints the ratio of the two
//! mean times, both measured by criterion in this process.
//!
//! ```sh
//! cargo bench -p burn-qat --features ndarray,wgpu --bench fake_quant
//! ```

use std::time::{Duration, Instant};

use burn::prelude::*;
use burn_qat::core::{qparams_from_range, tensor};
use burn_qat::{QuantSpec, backend};
use criterion::{Criterion, criterion_group, criterion_main};

mod common;
use common::*;

const SHAPE: [usize; 2] = [2048, 2048]; // 4,194,304 elements

fn step(x: &Tensor<2>, device: &Device, op: &dyn Fn(Tensor<2>) -> Tensor<2>) {
    let x = x.clone().require_grad();
    let grads = op(x.clone()).sum().backward();
    let g = x.grad(&grads).expect("gradient");
    drop(g);
    device.sync().expect("sync");
}

fn bench(c: &mut Criterion) {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    let qp = qparams_from_range(-3.0, 3.0, &spec);
    let per_channel = QuantSpec::int8_weight_per_channel_symmetric(1);
    for name in backend::enabled() {
        let device = backend::device(name).unwrap().autodiff();
        let x = Tensor::<2>::random(SHAPE, burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let (min, max) = tensor::min_max(x.clone(), per_channel.granularity);
        let (scale, zp) = tensor::qparams(min, max, &per_channel);
        let ops: Vec<(&str, Box<dyn Fn(Tensor<2>) -> Tensor<2>>)> = vec![
            ("elementwise_mul", Box::new(|x| x * 1.5)),
            (
                "fake_quant_per_tensor",
                Box::new(move |x| tensor::fake_quant_per_tensor(x, qp, &spec)),
            ),
            (
                "fake_quant_per_channel",
                Box::new({
                    let (scale, zp) = (scale.clone(), zp.clone());
                    move |x| tensor::fake_quant(x, scale.clone(), zp.clone(), &per_channel)
                }),
            ),
            // The composed tensor ops the fused kernels replace (the reference), same input.
            (
                "fake_quant_per_channel_composed",
                Box::new(move |x| {
                    tensor::fake_quant_composed(x, scale.clone(), zp.clone(), &per_channel)
                }),
            ),
            (
                "lsq_per_channel",
                Box::new(move |x| {
                    let step = Tensor::<1>::full([SHAPE[1]], 0.02, &x.device()).require_grad();
                    tensor::fake_quant_lsq(x, step, None, &per_channel, 1e-3)
                }),
            ),
            (
                "pact",
                Box::new(move |x| {
                    let alpha = Tensor::<1>::from_floats([2.0], &x.device()).require_grad();
                    tensor::fake_quant_pact(x, alpha, &spec)
                }),
            ),
        ];
        let mut group = c.benchmark_group(format!("fwd_bwd_4M/{name}"));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1));
        for (label, op) in &ops {
            let key = format!("{name}/{label}");
            group.bench_function(*label, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        step(&x, &device, op.as_ref());
                    }
                    let elapsed = start.elapsed();
                    record(&key, elapsed, iters);
                    elapsed
                })
            });
        }
        group.finish();
        // A criterion filter may have skipped some: ratios only for what ran.
        let Some(base) = mean(&format!("{name}/elementwise_mul")) else {
            continue;
        };
        for (label, _) in ops.iter().skip(1) {
            let Some(t) = mean(&format!("{name}/{label}")) else {
                continue;
            };
            println!(
                "RATIO {name}: {label} fwd+bwd {:.2} ms / elementwise_mul fwd+bwd {:.2} ms = {:.2}x",
                t * 1e3,
                base * 1e3,
                t / base
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
