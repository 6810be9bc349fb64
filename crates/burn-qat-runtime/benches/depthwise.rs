//! MobileNet-v2's depthwise layers (3x3, batch 1 and 8) on the direct depthwise kernel of every
//! instruction set this machine runs (AVX-512 VNNI + VBMI, AVX-VNNI, AVX2, NEON with and without
//! the dot product, portable), same process; prints the times and their ratios to the fastest
//! instruction set.
//!
//! ```sh
//! cargo bench -p burn-qat-runtime --bench depthwise
//! ```

use std::sync::OnceLock;
use std::time::Duration;

use burn_qat_runtime::kernels;
use burn_qat_runtime::requant::FixedMultiplier;
use burn_qat_runtime::{Grid, IntConv2d, Output};
use criterion::{Criterion, criterion_group, criterion_main};

#[path = "../../burn-qat/benches/common/mod.rs"]
mod common;
use common::{mean, timed};

fn layer(c: usize, stride: usize) -> IntConv2d {
    let grid = Grid {
        scale: 0.05,
        zero_point: -3,
        qmin: -128,
        qmax: 127,
    };
    IntConv2d {
        in_channels: c,
        out_channels: c,
        groups: c,
        kernel: [3, 3],
        stride: [stride, stride],
        dilation: [1, 1],
        padding: [1, 1, 1, 1],
        weight: (0..c * 9)
            .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
            .collect(),
        weight_bits: 8,
        weight_scale: vec![0.01; c],
        bias: (0..c).map(|i| i as i32 * 11 - 300).collect(),
        input: grid,
        output: Output::Quantized {
            grid,
            requant: vec![FixedMultiplier::new(0.01); c],
            lo: grid.zero_point,
            hi: 127,
        },
    }
}

fn bench(c: &mut Criterion) {
    // (channels, input side, stride): MobileNet-v2 at 224 x 224.
    let layers = [
        (32, 112, 1),
        (96, 112, 2),
        (144, 56, 1),
        (192, 28, 1),
        (384, 14, 1),
        (960, 7, 1),
    ];
    for batch in [1usize, 8] {
        for (ch, side, stride) in layers {
            let conv = layer(ch, stride);
            let shape = [batch, ch, side, side];
            let x: Vec<i8> = (0..shape.iter().product::<usize>())
                .map(|i| (i * 31 % 251) as i8)
                .collect();
            let cache = OnceLock::new();
            let name = format!("depthwise_{ch}x{side}x{side}_s{stride}_batch_{batch}");
            let mut g = c.benchmark_group(&name);
            g.sample_size(10)
                .measurement_time(Duration::from_secs(2))
                .warm_up_time(Duration::from_millis(500));
            for isa in kernels::available() {
                let guard = kernels::force_isa(isa).unwrap();
                assert_eq!(
                    kernels::conv2d(&conv, &cache, &x, &shape),
                    kernels::conv2d_reference(&conv, &x, &shape),
                    "{isa}"
                );
                drop(guard);
                let key = format!("{name}/{isa}");
                g.bench_function(isa.name(), |b| {
                    b.iter_custom(|n| {
                        let _isa = kernels::force_isa(isa).unwrap();
                        timed(&key, n, || drop(kernels::conv2d(&conv, &cache, &x, &shape)))
                    })
                });
            }
            g.finish();
            let base = kernels::best();
            let tb = mean(&format!("{name}/{base}")).unwrap();
            let cells: Vec<String> = kernels::available()
                .iter()
                .map(|isa| {
                    let t = mean(&format!("{name}/{isa}")).unwrap();
                    format!("{isa} {:.3} ms ({:.2}x)", t * 1e3, t / tb)
                })
                .collect();
            println!(
                "RATIO {name}: {} (ratio: time / {base} time)",
                cells.join(" | ")
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
