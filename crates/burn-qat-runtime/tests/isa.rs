//! Every instruction set this machine runs gives the bits of the portable kernels and of the
//! scalar reference: convolutions (shapes, strides, paddings, dilations, groups, depthwise),
//! linear layers, fused convolution + max pooling and requantization, over weights that make
//! AVX2's `vpmaddubsw` exact and weights that would saturate it (`-128`, `127`), quantized and
//! float outputs, several batch sizes. An instruction set the machine lacks is skipped by name,
//! with the reason, on stderr (uncaptured).
//!
//! ```sh
//! cargo test -p burn-qat-runtime --test isa
//! ```

use std::io::Write;
use std::sync::{Once, OnceLock};

use burn_qat_runtime::kernels::{self, Isa};
use burn_qat_runtime::requant::FixedMultiplier;
use burn_qat_runtime::{Grid, IntConv2d, IntLinear, Output, Values, Window};
use proptest::prelude::*;

/// The instruction sets to compare, the portable one first; the others are reported once per
/// process, by name, with the reason (written to stderr directly: the test harness does not
/// capture it).
fn isas() -> Vec<Isa> {
    static REPORT: Once = Once::new();
    REPORT.call_once(|| {
        let mut err = std::io::stderr().lock();
        let run: Vec<&str> = kernels::available().iter().map(|i| i.name()).collect();
        let _ = writeln!(err, "isa tests: running on {}", run.join(", "));
        for (isa, why) in kernels::unavailable() {
            let _ = writeln!(err, "isa tests: SKIPPED {isa}: {why}");
        }
    });
    let mut all = kernels::available();
    all.retain(|i| *i != Isa::Portable);
    all.insert(0, Isa::Portable);
    all
}

/// `f` under every instruction set (each forced while it runs), paired with its name.
fn per_isa<T>(mut f: impl FnMut() -> T) -> Vec<(Isa, T)> {
    isas()
        .into_iter()
        .map(|isa| {
            let _guard = kernels::force_isa(isa).expect("listed as available");
            (isa, f())
        })
        .collect()
}

fn grid(zero_point: i32) -> Grid {
    Grid {
        scale: 0.05,
        zero_point,
        qmin: -128,
        qmax: 127,
    }
}

/// A quantized output (per-channel multipliers, a clamp) or a float one.
fn output(channels: usize, float: bool, seed: u64) -> Output {
    if float {
        Output::Float {
            scale: (0..channels)
                .map(|c| 1e-3 * (1 + (c as u64 + seed) % 7) as f32)
                .collect(),
            lo: if seed.is_multiple_of(2) {
                f32::NEG_INFINITY
            } else {
                -3.0
            },
            hi: if seed.is_multiple_of(3) {
                f32::INFINITY
            } else {
                5.0
            },
        }
    } else {
        let zp = (seed % 21) as i32 - 10;
        Output::Quantized {
            grid: grid(zp),
            requant: (0..channels)
                .map(|c| FixedMultiplier::new(1e-4 * (1 + (c as u64 * 7 + seed) % 50) as f64))
                .collect(),
            lo: if seed.is_multiple_of(2) { -128 } else { zp },
            hi: 127,
        }
    }
}

/// Weights of one of three kinds: full range with `-128` and `127` frequent (AVX2 must widen),
/// small (`vpmaddubsw` is exact), or sparse extremes.
fn weights(len: usize) -> impl Strategy<Value = Vec<i8>> {
    prop_oneof![
        proptest::collection::vec(
            prop_oneof![Just(-128i8), Just(127i8), Just(-127i8), any::<i8>()],
            len
        ),
        proptest::collection::vec(-9i8..=9, len),
        proptest::collection::vec(
            prop_oneof![4 => Just(0i8), 1 => Just(-128i8), 1 => Just(127i8), 1 => Just(64i8)],
            len
        ),
    ]
}

/// Inputs with the extremes (`u8` 0 and 255 after the shift) frequent.
fn inputs(len: usize) -> impl Strategy<Value = Vec<i8>> {
    proptest::collection::vec(prop_oneof![Just(127i8), Just(-128i8), any::<i8>()], len)
}

#[derive(Clone, Debug)]
struct ConvCase {
    conv: IntConv2d,
    shape: Vec<usize>,
    x: Vec<i8>,
}

/// Convolutions: groups (depthwise among them), kernels, strides, dilations, asymmetric
/// padding, 1-D and 2-D inputs, batches of 1 to 3.
fn conv_case() -> impl Strategy<Value = ConvCase> {
    let (c, extra, batch) = if SMALL { (3, 4, 2) } else { (8, 9, 3) };
    (
        (1usize..=3, 1usize..=c, 1usize..=c + 2, 0usize..3),
        (
            [1usize..=5, 1usize..=5],
            [1usize..=3, 1usize..=3],
            [1usize..=3, 1usize..=3],
        ),
        (
            [0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2],
            [0usize..extra - 3, 0usize..extra],
        ),
        (1usize..=batch, any::<bool>(), any::<u64>(), any::<bool>()),
    )
        .prop_flat_map(
            |((groups, cin_g, cout_g, kind), kernel, pads, (batch, float, seed, one_d))| {
                let (kernel, stride, dilation) = kernel;
                let (padding, extra) = pads;
                // Kind 0: depthwise; otherwise grouped.
                let (groups, cin_g, cout_g) = if kind == 0 {
                    (groups + cin_g, 1, 1)
                } else {
                    (groups, cin_g, cout_g)
                };
                let kernel = if one_d { [1, kernel[1]] } else { kernel };
                let padding = if one_d {
                    [0, 0, padding[2], padding[3]]
                } else {
                    padding
                };
                let side = |k: usize, d: usize, pad: usize, extra: usize| {
                    (d * (k - 1) + 1).saturating_sub(pad).max(1) + extra
                };
                let h = if one_d {
                    1
                } else {
                    side(kernel[0], dilation[0], padding[0] + padding[1], extra[0])
                };
                let w = side(kernel[1], dilation[1], padding[2] + padding[3], extra[1]);
                let (cin, cout) = (groups * cin_g, groups * cout_g);
                let shape = if one_d {
                    vec![batch, cin, w]
                } else {
                    vec![batch, cin, h, w]
                };
                let len: usize = shape.iter().product();
                (
                    weights(cout * cin_g * kernel[0] * kernel[1]),
                    proptest::collection::vec(-5000i32..5000, cout),
                    inputs(len),
                    -128i32..=127,
                )
                    .prop_map(move |(weight, bias, x, zp)| ConvCase {
                        conv: IntConv2d {
                            in_channels: cin,
                            out_channels: cout,
                            groups,
                            kernel,
                            stride,
                            dilation,
                            padding,
                            weight,
                            weight_bits: 8,
                            weight_scale: vec![0.01; cout],
                            bias,
                            input: grid(zp),
                            output: output(cout, float, seed),
                        },
                        shape: shape.clone(),
                        x,
                    })
            },
        )
}

/// The layer's output under every instruction set: all equal the reference (the first pass
/// also packs the weights that the others reuse).
fn conv_everywhere(case: &ConvCase) -> Result<(), TestCaseError> {
    let ConvCase { conv, shape, x } = case;
    let reference = kernels::conv2d_reference(conv, x, shape).unwrap();
    let cache = OnceLock::new();
    for (isa, got) in per_isa(|| {
        let fresh = OnceLock::new();
        (
            kernels::conv2d(conv, &cache, x, shape).unwrap(),
            kernels::conv2d(conv, &fresh, x, shape).unwrap(),
        )
    }) {
        prop_assert_eq!(&got.0, &reference, "{} (packed earlier)", isa);
        prop_assert_eq!(&got.1, &reference, "{} (packed now)", isa);
    }
    Ok(())
}

/// Whether sizes shrink: Miri interprets every operation (and every generated value).
const SMALL: bool = cfg!(miri);

/// `PROPTEST_CASES` when set (CI's Miri run asks for a few), else `default`.
/// A square convolution with 8-bit weights `w`, scale 0.01, a spread of biases, input zero
/// point -7 and a quantized output (tests override fields with `..conv(..)`).
fn conv(
    cin: usize,
    cout: usize,
    groups: usize,
    k: usize,
    s: usize,
    p: usize,
    w: Vec<i8>,
) -> IntConv2d {
    IntConv2d {
        in_channels: cin,
        out_channels: cout,
        groups,
        kernel: [k, k],
        stride: [s, s],
        dilation: [1, 1],
        padding: [p; 4],
        weight: w,
        weight_bits: 8,
        weight_scale: vec![0.01; cout],
        bias: (0..cout as i32).map(|i| i * 37 - 900).collect(),
        input: grid(-7),
        output: output(cout, false, 3),
    }
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]

    #[test]
    fn convolutions_equal_the_reference_on_every_isa(case in conv_case()) {
        conv_everywhere(&case)?;
    }

    #[test]
    fn linear_layers_equal_the_reference_on_every_isa(
        (l, x, rows) in (
            1usize..=if SMALL { 24 } else { 300 },
            1usize..=if SMALL { 12 } else { 40 },
            1usize..=if SMALL { 3 } else { 20 },
            any::<bool>(),
            any::<u64>(),
        )
            .prop_flat_map(|(inp, out, rows, float, seed)| {
                (
                    weights(inp * out),
                    proptest::collection::vec(-20_000i32..20_000, out),
                    inputs(rows * inp),
                    -128i32..=127,
                )
                    .prop_map(move |(weight, bias, x, zp)| {
                        let l = IntLinear {
                            in_features: inp,
                            out_features: out,
                            weight,
                            weight_bits: 8,
                            weight_scale: vec![0.01; out],
                            bias,
                            input: grid(zp),
                            output: output(out, float, seed),
                        };
                        (l, x, rows)
                    })
            })
    ) {
        let shape = [rows, l.in_features];
        let reference = kernels::linear_reference(&l, &x, &shape).unwrap();
        let cache = OnceLock::new();
        for (isa, got) in per_isa(|| kernels::linear(&l, &cache, &x, &shape).unwrap()) {
            prop_assert_eq!(&got, &reference, "{}", isa);
        }
    }

    #[test]
    fn requantization_equals_apply_on_every_isa(
        m in prop_oneof![1e-9f64..4.0, 1e-5f64..1e-1, 1e-12f64..1e-9, 1e9f64..1e12],
        acc in proptest::collection::vec(
            prop_oneof![any::<i32>(), -5000i32..5000, Just(i32::MIN), Just(i32::MAX)],
            0..150,
        ),
        zp in -128i32..128,
        (lo, hi) in (-128i32..=127, -128i32..=127),
    ) {
        let f = FixedMultiplier::new(m);
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        let want: Vec<i8> = acc
            .iter()
            .map(|a| f.apply(*a).saturating_add(zp).clamp(lo, hi) as i8)
            .collect();
        for (isa, got) in per_isa(|| {
            let mut out = vec![0i8; acc.len()];
            f.requantize(&acc, zp, lo, hi, &mut out);
            out
        }) {
            prop_assert_eq!(&got, &want, "{}", isa);
        }
    }
}

/// Multipliers that are short binary fractions make exact ties: every instruction set rounds
/// them half to even, as `apply` does.
#[test]
fn requantization_ties_round_half_to_even_on_every_isa() {
    let span = if cfg!(miri) { 300 } else { 5000 };
    let acc: Vec<i32> = (-span..span).chain([i32::MIN, i32::MAX, -1, 1]).collect();
    for m in [
        0.5,
        0.25,
        0.125,
        0.375,
        0.1875,
        1.0 / 1024.0,
        3.0 / 4096.0,
        1.5,
        3.0,
    ] {
        let f = FixedMultiplier::new(m);
        for zp in [-128, -3, 0, 5, 127] {
            let want: Vec<i8> = acc
                .iter()
                .map(|a| f.apply(*a).saturating_add(zp).clamp(-128, 127) as i8)
                .collect();
            for (isa, got) in per_isa(|| {
                let mut out = vec![0i8; acc.len()];
                f.requantize(&acc, zp, -128, 127, &mut out);
                out
            }) {
                assert_eq!(got, want, "{isa}: m {m} zp {zp}");
            }
        }
    }
}

/// Layers at the sizes of the example models and past the AVX2 kernel's reduction block
/// (`k4 > 256` words), single rows, many rows, and a depthwise stack of strides: every
/// instruction set against the reference.
#[test]
#[cfg_attr(miri, ignore = "millions of multiply-adds: too slow interpreted")]
fn large_and_typical_layers_equal_the_reference_on_every_isa() {
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut bytes = |n: usize| (0..n).map(|_| next() as u8 as i8).collect::<Vec<i8>>();
    let cases = [
        // 3x3 conv 32 -> 64 on 14 x 14, channel words.
        (
            conv(32, 64, 1, 3, 1, 1, bytes(64 * 32 * 9)),
            vec![2, 32, 14, 14],
        ),
        // k4 = 128 * 9 / 4 = 288 words: two reduction blocks on AVX2.
        (
            conv(128, 12, 1, 3, 1, 1, bytes(12 * 128 * 9)),
            vec![1, 128, 6, 6],
        ),
        // Tap words (stride 2), k4 = 72 * 9 / 4 = 162.
        (
            conv(72, 9, 1, 3, 2, 0, bytes(9 * 72 * 9)),
            vec![1, 72, 9, 9],
        ),
        // One output channel: single-row tiles.
        (conv(16, 1, 1, 3, 1, 1, bytes(16 * 9)), vec![1, 16, 20, 20]),
        // 1x1 conv 64 -> 128.
        (
            conv(64, 128, 1, 1, 1, 0, bytes(128 * 64)),
            vec![1, 64, 7, 7],
        ),
        // Depthwise, MobileNet style, strides 1 and 2.
        (
            conv(48, 48, 48, 3, 1, 1, bytes(48 * 9)),
            vec![2, 48, 19, 19],
        ),
        (
            conv(40, 40, 40, 3, 2, 1, bytes(40 * 9)),
            vec![1, 40, 23, 23],
        ),
        (conv(8, 8, 8, 5, 3, 2, bytes(8 * 25)), vec![1, 8, 31, 31]),
    ];
    for (c, shape) in &cases {
        let x = bytes(shape.iter().product());
        conv_everywhere(&ConvCase {
            conv: c.clone(),
            shape: shape.clone(),
            x,
        })
        .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
    }
    for (inp, out, rows) in [(512, 10, 1), (512, 10, 64), (1100, 33, 5), (128, 128, 3)] {
        let l = IntLinear {
            in_features: inp,
            out_features: out,
            weight: bytes(inp * out),
            weight_bits: 8,
            weight_scale: vec![0.01; out],
            bias: (0..out as i32).map(|i| 500 - i * 31).collect(),
            input: grid(11),
            output: output(out, rows == 5, 4),
        };
        let x = bytes(rows * inp);
        let shape = [rows, inp];
        let reference = kernels::linear_reference(&l, &x, &shape).unwrap();
        let cache = OnceLock::new();
        for (isa, got) in per_isa(|| kernels::linear(&l, &cache, &x, &shape).unwrap()) {
            assert_eq!(got, reference, "{isa}: linear {inp} -> {out}, {rows} rows");
        }
    }
}

/// Weight pairs at `vpmaddubsw`'s limit: `|w0| + |w1| = 128` fits (`255 * 128` in `i16`),
/// `129` would saturate on inputs of 255 and must take the widening path; both exact.
#[test]
fn weight_pairs_at_the_i16_limit_are_exact_on_every_isa() {
    let pairs = [
        [64i8, -64],
        [127, 2],
        [-128, 0],
        [127, 1],
        [-128, -1],
        [-128, -128],
    ];
    for pair in &pairs[..if SMALL { 2 } else { pairs.len() }] {
        let (cin, cout) = (8, 5);
        let weight: Vec<i8> = (0..cout * cin * 9).map(|i| pair[i % 2]).collect();
        let c = IntConv2d {
            bias: vec![3; cout],
            input: grid(0),
            output: output(cout, true, 1),
            ..conv(cin, cout, 1, 3, 1, 1, weight)
        };
        // Inputs of 127 are 255 as `u8`; some -128 (0) for contrast.
        let side = if SMALL { 5 } else { 9 };
        let shape = vec![1, cin, side, side];
        let x: Vec<i8> = (0..cin * side * side)
            .map(|i| if i % 17 == 0 { -128 } else { 127 })
            .collect();
        conv_everywhere(&ConvCase {
            conv: c.clone(),
            shape,
            x: x.clone(),
        })
        .unwrap_or_else(|e| panic!("{pair:?}: {e}"));
        // The same weights as a depthwise layer and as a linear layer.
        let dw = IntConv2d {
            in_channels: cin,
            out_channels: cin,
            groups: cin,
            weight: (0..cin * 9).map(|i| pair[i % 2]).collect(),
            weight_scale: vec![0.01; cin],
            bias: vec![3; cin],
            output: output(cin, true, 1),
            ..c
        };
        conv_everywhere(&ConvCase {
            conv: dw,
            shape: vec![1, cin, side, side],
            x: x.clone(),
        })
        .unwrap_or_else(|e| panic!("depthwise {pair:?}: {e}"));
        let l = IntLinear {
            in_features: 72,
            out_features: 3,
            weight: (0..72 * 3).map(|i| pair[(i / 3) % 2]).collect(),
            weight_bits: 8,
            weight_scale: vec![0.01; 3],
            bias: vec![0; 3],
            input: grid(0),
            output: output(3, true, 1),
        };
        let reference = kernels::linear_reference(&l, &x[..144], &[2, 72]).unwrap();
        for (isa, got) in
            per_isa(|| kernels::linear(&l, &OnceLock::new(), &x[..144], &[2, 72]).unwrap())
        {
            assert_eq!(got, reference, "{isa}: linear {pair:?}");
        }
    }
}

/// Convolution fused with 2 x 2 max pooling (the AVX2 pair max among its loops): the same bits
/// on every instruction set.
#[test]
#[cfg_attr(miri, ignore = "millions of multiply-adds: too slow interpreted")]
fn fused_conv_max_pool_is_the_same_on_every_isa() {
    let (cin, cout) = (6, 10);
    let weight = (0..cout * cin * 9)
        .map(|i| (i * 89 % 255) as u8 as i8)
        .collect();
    let c = IntConv2d {
        bias: (0..cout as i32).map(|i| i * 100 - 400).collect(),
        input: grid(4),
        output: output(cout, false, 2),
        ..conv(cin, cout, 1, 3, 1, 0, weight)
    };
    let pool = Window {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
        dilation: [1, 1],
    };
    for side in [12usize, 37] {
        let shape = [3, cin, side, side];
        let x: Vec<i8> = (0..shape.iter().product::<usize>())
            .map(|i| (i * 31 % 251) as u8 as i8)
            .collect();
        let runs =
            per_isa(|| kernels::conv2d_max_pool(&c, &OnceLock::new(), &x, &shape, &pool).unwrap());
        let portable: &Values = &runs[0].1;
        for (isa, got) in &runs {
            assert_eq!(got, portable, "{isa}: side {side}");
        }
    }
}

/// The environment variable's values: names, `auto`, and the errors for the others.
#[test]
fn isa_names_parse_and_unknown_ones_say_what_is_allowed() {
    for isa in Isa::ALL {
        assert_eq!(isa.name().parse::<Isa>(), Ok(isa));
    }
    let err = "avx3".parse::<Isa>().unwrap_err().to_string();
    assert!(
        err.contains("avx3") && err.contains("avx2") && err.contains("portable"),
        "{err}"
    );
    for (isa, why) in kernels::unavailable() {
        assert!(kernels::set_isa(isa).is_err());
        assert!(why.to_string().contains(isa.name()), "{why}");
    }
    assert!(kernels::available().contains(&kernels::isa()));
}
