//! Property tests: the tensor paths against the scalar reference, on every backend, over random
//! specs and inputs.
//!
//! Tolerances have a reason each: a backend may divide with a few ULP of error (WGSL allows 2.5
//! ULP), which can move a value that sits on a rounding tie or on the edge of the range by one
//! step. Away from ties and edges results must be bit-equal.

use burn::prelude::*;
use burn_qat::core::{reference, tensor};
use burn_qat::{Granularity, QParams, QuantSpec, RoundingMode, qparams_from_range};
use burn_qat_tests::{Backend, backends, cases, values};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// How close (relative) to a tie or an edge a value must be for a one-step difference to be
/// accepted: a few ULP of f32 division.
const TIE_WINDOW: f32 = 1e-5;

fn spec_strategy(rank: usize) -> impl Strategy<Value = QuantSpec> {
    (
        2u32..=16,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..=rank,
    )
        .prop_map(
            move |(bits, signed, symmetric, narrow, tf, axis)| QuantSpec {
                bits,
                signed,
                symmetric,
                narrow_range: narrow,
                granularity: if axis == rank {
                    Granularity::PerTensor
                } else {
                    Granularity::PerChannel { axis }
                },
                rounding: if tf {
                    RoundingMode::TfHalfUp
                } else {
                    RoundingMode::HalfToEven
                },
            },
        )
}

/// `[rows, cols]` and values: mostly random, some exact half-steps (ties), some non-finite.
fn input_strategy() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (1usize..6, 1usize..6, -4i32..4).prop_flat_map(|(r, c, exp)| {
        let mag = 10f32.powi(exp);
        let value = prop_oneof![
            8 => (-1.0f32..1.0).prop_map(move |v| v * mag),
            2 => (-40i32..40).prop_map(move |k| k as f32 * 0.5 * mag / 16.0),
            1 => Just(0.0f32),
        ];
        (Just(r), Just(c), proptest::collection::vec(value, r * c))
    })
}

fn near_half(v: f32) -> bool {
    ((v - v.floor()) - 0.5).abs() <= TIE_WINDOW * v.abs().max(1.0)
}

fn host_range(x: &[f32], rows: usize, cols: usize, g: Granularity) -> Vec<(f32, f32)> {
    let channels = match g {
        Granularity::PerTensor => 1,
        Granularity::PerChannel { axis: 0 } => rows,
        Granularity::PerChannel { .. } => cols,
    };
    let mut out = vec![(0.0f32, 0.0f32); channels];
    for r in 0..rows {
        for c in 0..cols {
            let v = x[r * cols + c];
            if !v.is_finite() {
                continue;
            }
            let ch = match g {
                Granularity::PerTensor => 0,
                Granularity::PerChannel { axis: 0 } => r,
                Granularity::PerChannel { .. } => c,
            };
            out[ch].0 = out[ch].0.min(v);
            out[ch].1 = out[ch].1.max(v);
        }
    }
    out
}

fn check(
    b: &Backend,
    spec: QuantSpec,
    rows: usize,
    cols: usize,
    x: &[f32],
) -> Result<(), TestCaseError> {
    let device = b.device.clone().autodiff();
    let t = Tensor::<1>::from_floats(x, &device)
        .reshape([rows, cols])
        .require_grad();
    let (min, max) = tensor::min_max(t.clone(), spec.granularity);
    let (scale, zp) = tensor::qparams(min, max, &spec);
    let qps = tensor::to_qparams(&scale, &zp);

    // 1. Quantization parameters equal the scalar ones (zero point +-1 on a rounding tie).
    let ranges = host_range(x, rows, cols, spec.granularity);
    prop_assert_eq!(qps.len(), ranges.len());
    for (qp, (lo, hi)) in qps.iter().zip(&ranges) {
        let want = qparams_from_range(*lo, *hi, &spec);
        let rel = (qp.scale - want.scale).abs() / want.scale;
        prop_assert!(
            rel <= 4.0 * f32::EPSILON,
            "{}: scale {} vs reference {}",
            b.name,
            qp.scale,
            want.scale
        );
        let tie = near_half(*lo / want.scale);
        prop_assert!(
            qp.zero_point == want.zero_point
                || (tie && (qp.zero_point - want.zero_point).abs() == 1),
            "{}: zero point {} vs reference {} for [{lo}, {hi}]",
            b.name,
            qp.zero_point,
            want.zero_point
        );
    }

    // 2. Forward and gradient, against the reference with the same parameters.
    let y = tensor::fake_quant(t.clone(), scale, zp, &spec);
    let got = values(y.clone());
    let grads = y.sum().backward();
    let grad = values(t.grad(&grads).expect("gradient"));
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let ch = match spec.granularity {
                Granularity::PerTensor => 0,
                Granularity::PerChannel { axis: 0 } => r,
                Granularity::PerChannel { .. } => c,
            };
            let qp: QParams = qps[ch];
            let xi = x[i];
            let want = reference::fake_quant(xi, qp, &spec);
            let v = xi / qp.scale;
            prop_assert!(
                got[i] == want || (near_half(v) && (got[i] - want).abs() <= qp.scale * 1.0001),
                "{}: fake_quant({xi}) = {} but reference gives {} (qp {:?}, spec {:?})",
                b.name,
                got[i],
                want,
                qp,
                spec
            );
            let want_grad = reference::fake_quant_grad(xi, qp, &spec);
            let on_bound = (v + qp.zero_point as f32 - spec.qmin() as f32).abs()
                <= TIE_WINDOW * v.abs().max(1.0)
                || (v + qp.zero_point as f32 - spec.qmax() as f32).abs()
                    <= TIE_WINDOW * v.abs().max(1.0);
            prop_assert!(
                grad[i] == want_grad || on_bound,
                "{}: gradient at {xi} is {} but reference gives {want_grad}",
                b.name,
                grad[i]
            );
        }
    }
    Ok(())
}

#[test]
fn tensor_fake_quant_matches_scalar_reference() {
    for b in backends() {
        let mut runner = TestRunner::new(Config {
            cases: cases(&b, 256),
            ..Config::default()
        });
        runner
            .run(
                &(spec_strategy(2), input_strategy()),
                |(spec, (rows, cols, x))| check(&b, spec, rows, cols, &x),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", b.name));
    }
}

#[test]
fn scalar_qparams_path_matches_reference() {
    for b in backends() {
        let mut runner = TestRunner::new(Config {
            cases: cases(&b, 128),
            ..Config::default()
        });
        runner
            .run(
                &(
                    spec_strategy(0),
                    input_strategy(),
                    -5.0f32..5.0,
                    0.0f32..5.0,
                ),
                |(spec, (_, _, x), lo, hi)| {
                    let qp = qparams_from_range(lo, hi, &spec);
                    let got = values(tensor::fake_quant_per_tensor(
                        Tensor::<1>::from_floats(x.as_slice(), &b.device),
                        qp,
                        &spec,
                    ));
                    for (xi, gi) in x.iter().zip(got) {
                        let want = reference::fake_quant(*xi, qp, &spec);
                        let v = xi / qp.scale;
                        prop_assert!(
                            gi == want || (near_half(v) && (gi - want).abs() <= qp.scale * 1.0001),
                            "{}: {xi} -> {gi}, reference {want}",
                            b.name
                        );
                    }
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{}: {e}", b.name));
    }
}

/// Edge case, always run: values exactly on both ends of an unsigned symmetric grid (the range
/// `[-1, 1]` maps -1 and 1 onto qmin + 1 and qmax).
#[test]
fn ends_of_unsigned_symmetric_grid() {
    let spec = QuantSpec::int8_weight_per_tensor_symmetric().with_signed(false);
    for b in backends() {
        check(&b, spec, 1, 3, &[-1.0, 0.0, 1.0]).unwrap();
    }
}
