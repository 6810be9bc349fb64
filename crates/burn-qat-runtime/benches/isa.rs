//! The integer kernels on every instruction set this machine runs, same process, against
//! AVX-512 VNNI (or the fastest one present): layers typical of the example models (3x3 conv
//! 32 -> 64 on 14 x 14, 1x1 conv 64 -> 128 on 14 x 14, depthwise 3x3 on 64 channels of
//! 14 x 14, linear 512 -> 10) at batch 1 and 64, requantization included. Weights are 8-bit
//! (`-127..=127`, so AVX2 widens); `avx2 narrow` reruns AVX2 on 7-bit weights (`-63..=63`),
//! where `vpmaddubsw` is exact. Prints one table of milliseconds and ratios.
//!
//! ```sh
//! cargo bench -p burn-qat-runtime --bench isa
//! RAYON_NUM_THREADS=1 cargo bench -p burn-qat-runtime --bench isa   # one thread
//! ```

use std::sync::OnceLock;
use std::time::Duration;

use burn_qat_runtime::kernels::{self, Isa};
use burn_qat_runtime::requant::FixedMultiplier;
use burn_qat_runtime::{Grid, IntConv2d, IntLinear, Output};
use criterion::{Criterion, criterion_group, criterion_main};

#[path = "../../burn-qat/benches/common/mod.rs"]
mod common;
use common::{mean, timed};

fn grid() -> Grid {
    Grid {
        scale: 0.05,
        zero_point: -3,
        qmin: -128,
        qmax: 127,
    }
}

fn quantized(channels: usize) -> Output {
    Output::Quantized {
        grid: grid(),
        requant: vec![FixedMultiplier::new(0.004); channels],
        lo: grid().zero_point,
        hi: 127,
    }
}

/// `n` weights spread over `-limit..=limit` (every value taken, `±limit` included).
fn weights(n: usize, limit: i32) -> Vec<i8> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % (2 * limit as usize + 1)) as i32 - limit)
        .map(|v| v as i8)
        .collect()
}

enum Layer {
    Conv(IntConv2d, [usize; 3]),
    Linear(IntLinear),
}

impl Layer {
    fn conv(cin: usize, cout: usize, groups: usize, k: usize, side: usize, limit: i32) -> Self {
        Layer::Conv(
            IntConv2d {
                in_channels: cin,
                out_channels: cout,
                groups,
                kernel: [k, k],
                stride: [1, 1],
                dilation: [1, 1],
                padding: [k / 2; 4],
                weight: weights(cout * cin / groups * k * k, limit),
                weight_bits: 8,
                weight_scale: vec![0.01; cout],
                bias: (0..cout as i32).map(|i| i * 11 - 300).collect(),
                input: grid(),
                output: quantized(cout),
            },
            [cin, side, side],
        )
    }

    fn linear(inp: usize, out: usize, limit: i32) -> Self {
        Layer::Linear(IntLinear {
            in_features: inp,
            out_features: out,
            weight: weights(inp * out, limit),
            weight_bits: 8,
            weight_scale: vec![0.01; out],
            bias: (0..out as i32).map(|i| i * 7 - 30).collect(),
            input: grid(),
            output: quantized(out),
        })
    }

    fn shape(&self, batch: usize) -> Vec<usize> {
        match self {
            Layer::Conv(_, [c, h, w]) => vec![batch, *c, *h, *w],
            Layer::Linear(l) => vec![batch, l.in_features],
        }
    }

    fn run(&self, cache: &OnceLock<kernels::Packed>, x: &[i8], shape: &[usize]) {
        match self {
            Layer::Conv(c, _) => drop(kernels::conv2d(c, cache, x, shape)),
            Layer::Linear(l) => drop(kernels::linear(l, cache, x, shape)),
        }
    }

    fn check(&self, x: &[i8], shape: &[usize]) {
        let cache = OnceLock::new();
        match self {
            Layer::Conv(c, _) => assert_eq!(
                kernels::conv2d(c, &cache, x, shape),
                kernels::conv2d_reference(c, x, shape)
            ),
            Layer::Linear(l) => assert_eq!(
                kernels::linear(l, &cache, x, shape),
                kernels::linear_reference(l, x, shape)
            ),
        }
    }
}

fn bench(c: &mut Criterion) {
    let available = kernels::available();
    let baseline = available[0];
    for (isa, why) in kernels::unavailable() {
        println!("SKIPPED {isa}: {why}");
    }
    let layers = |limit: i32| {
        [
            ("conv3x3_32to64_14x14", Layer::conv(32, 64, 1, 3, 14, limit)),
            (
                "conv1x1_64to128_14x14",
                Layer::conv(64, 128, 1, 1, 14, limit),
            ),
            (
                "depthwise3x3_64_14x14",
                Layer::conv(64, 64, 64, 3, 14, limit),
            ),
            ("linear_512to10", Layer::linear(512, 10, limit)),
        ]
    };
    // Per row: (name, [(variant, seconds)]).
    let mut table: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    for batch in [1usize, 64] {
        for ((name, layer), (_, narrow)) in layers(127).into_iter().zip(layers(63)) {
            let shape = layer.shape(batch);
            let x: Vec<i8> = (0..shape.iter().product::<usize>())
                .map(|i| (i * 31 % 251) as u8 as i8)
                .collect();
            let name = format!("{name}_batch_{batch}");
            let mut g = c.benchmark_group(&name);
            g.sample_size(10)
                .measurement_time(Duration::from_secs(1))
                .warm_up_time(Duration::from_millis(300));
            let mut variants: Vec<(String, Isa, &Layer)> = available
                .iter()
                .map(|i| (i.name().to_string(), *i, &layer))
                .collect();
            if available.contains(&Isa::Avx2) {
                variants.push(("avx2 narrow".to_string(), Isa::Avx2, &narrow));
            }
            let mut row = Vec::new();
            for (variant, isa, layer) in variants {
                let check = kernels::force_isa(isa).unwrap();
                layer.check(&x, &shape);
                drop(check);
                let cache = OnceLock::new();
                let key = format!("{name}/{variant}");
                g.bench_function(variant.replace(' ', "_"), |b| {
                    b.iter_custom(|n| {
                        let _isa = kernels::force_isa(isa).unwrap();
                        timed(&key, n, || layer.run(&cache, &x, &shape))
                    })
                });
                // Missing when criterion's filter left it out.
                if let Some(t) = mean(&key) {
                    row.push((variant, t));
                }
            }
            g.finish();
            table.push((name, row));
        }
    }
    println!(
        "\nms per call, {} threads; ratio = time / {baseline} time (same process)",
        kernels::threads()
    );
    for (name, row) in table.iter().filter(|(_, row)| !row.is_empty()) {
        let base = row
            .iter()
            .find(|(v, _)| v == baseline.name())
            .map(|(_, t)| *t)
            .unwrap_or(f64::NAN);
        let cells: Vec<String> = row
            .iter()
            .map(|(v, t)| format!("{v} {:.4} ms ({:.2}x)", t * 1e3, t / base))
            .collect();
        println!("RATIO {name}: {}", cells.join(" | "));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
