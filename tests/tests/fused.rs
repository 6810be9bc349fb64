//! The fused fake-quant kernels against the composed tensor ops they replace, on every backend
//! that has them (flex, ndarray, wgpu): values and the input gradient bit-equal, learned-range
//! gradients equal up to summation order, observers' ranges bit-equal. A backend without fused
//! kernels would be skipped by name: it runs the composed ops, which `properties.rs` tests.

use burn::prelude::*;
use burn_qat::core::{fused, tensor};
use burn_qat::{Granularity, QuantSpec, RoundingMode};
use burn_qat_tests::{Backend, backends, cases, skip, values};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The fused-capable backends; the others are skipped by name.
fn fused_backends(test: &str) -> Vec<Backend> {
    backends()
        .into_iter()
        .filter(|b| {
            let ok = fused::has_kernels(&b.device);
            if !ok {
                skip(
                    test,
                    b.name,
                    "no fused kernels on this backend (composed ops run)",
                );
            }
            ok
        })
        .collect()
}

/// `f` run twice on `device`: with the fused kernels, then with the composed ops. Asserts that
/// the first run takes the fused path and the second does not, so that a comparison of the two
/// cannot quietly compare the composed ops with themselves.
fn both<T>(device: &Device, f: impl Fn() -> T) -> (T, T) {
    let probe = Tensor::<1>::zeros([1], device);
    assert!(
        fused::available(&probe),
        "fused kernels expected on {device:?}"
    );
    let fast = f();
    fused::set_enabled(false);
    assert!(!fused::available(&probe));
    let slow = f();
    fused::set_enabled(true);
    (fast, slow)
}

/// Runs a property test on backend `b` (`cpu_cases` cases on CPU backends).
fn check<S: Strategy>(
    b: &Backend,
    cpu_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases: cases(b, cpu_cases),
        ..Config::default()
    });
    runner
        .run(&strategy, test)
        .unwrap_or_else(|e| panic!("{}: {e}", b.name));
}

fn spec_strategy() -> impl Strategy<Value = QuantSpec> {
    (
        2u32..=16,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0usize..4,
    )
        .prop_map(|(bits, signed, symmetric, tf, axis)| QuantSpec {
            bits,
            signed,
            symmetric,
            narrow_range: false,
            granularity: if axis == 3 {
                Granularity::PerTensor
            } else {
                Granularity::PerChannel { axis }
            },
            rounding: if tf {
                RoundingMode::TfHalfUp
            } else {
                RoundingMode::HalfToEven
            },
        })
}

/// A `[a, b, c]` tensor's values: random, exact half steps (ties), zeros and non-finite values.
fn input_strategy() -> impl Strategy<Value = ([usize; 3], Vec<f32>)> {
    (1usize..5, 1usize..6, 1usize..7, -3i32..3).prop_flat_map(|(a, b, c, exp)| {
        let mag = 10f32.powi(exp);
        let value = prop_oneof![
            8 => (-1.0f32..1.0).prop_map(move |v| v * mag),
            2 => (-40i32..40).prop_map(move |k| k as f32 * 0.5 * mag / 16.0),
            1 => Just(0.0f32),
            1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ];
        (Just([a, b, c]), proptest::collection::vec(value, a * b * c))
    })
}

fn bits(v: &[f32]) -> Vec<u32> {
    // NaN payloads may differ between implementations; every NaN compares as one value.
    v.iter()
        .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
        .collect()
}

/// The upstream gradient of element `i` in the LSQ and clip tests (non-uniform, so that a
/// gradient applied to the wrong element shows).
fn upstream(i: usize) -> f32 {
    0.5 + (i % 7) as f32
}

/// `sum(y * w)` with `w[i] = weight(i)` over `y`'s elements in row-major order.
fn weighted<const D: usize>(y: Tensor<D>, weight: impl Fn(usize) -> f32) -> Tensor<1> {
    let (dims, device) = (y.dims(), y.device());
    let w: Vec<f32> = (0..dims.iter().product()).map(weight).collect();
    (y * Tensor::<1>::from_floats(w.as_slice(), &device).reshape(dims)).sum()
}

/// Values, input gradient and observed range of one path.
fn run_fake_quant(
    device: &Device,
    spec: &QuantSpec,
    dims: [usize; 3],
    x: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = Tensor::<1>::from_floats(x, device)
        .reshape(dims)
        .require_grad();
    let (min, max) = tensor::min_max(t.clone(), spec.granularity);
    let (scale, zp) = tensor::qparams(min.clone(), max.clone(), spec);
    let y = tensor::fake_quant(t.clone(), scale, zp, spec);
    let out = values(y.clone());
    // A non-uniform upstream gradient, so that a mask applied to the wrong element shows.
    let grads = weighted(y, |i| 1.0 + i as f32).backward();
    let grad = values(t.grad(&grads).expect("gradient"));
    let mut range = values(min);
    range.extend(values(max));
    (out, grad, range)
}

#[test]
fn fused_fake_quant_equals_composed_bit_for_bit() {
    for b in fused_backends("fused_fake_quant_equals_composed_bit_for_bit") {
        let device = b.device.clone().autodiff();
        check(
            &b,
            384,
            (spec_strategy(), input_strategy()),
            |(spec, (dims, x))| {
                let (fast, slow) = both(&device, || run_fake_quant(&device, &spec, dims, &x));
                prop_assert_eq!(
                    bits(&fast.0),
                    bits(&slow.0),
                    "{}: values, {:?}",
                    b.name,
                    spec
                );
                prop_assert_eq!(
                    bits(&fast.1),
                    bits(&slow.1),
                    "{}: gradient, {:?}",
                    b.name,
                    spec
                );
                prop_assert_eq!(
                    bits(&fast.2),
                    bits(&slow.2),
                    "{}: range, {:?}",
                    b.name,
                    spec
                );
                Ok(())
            },
        );
    }
}

#[test]
fn fused_per_tensor_scalar_path_equals_composed() {
    for b in fused_backends("fused_per_tensor_scalar_path_equals_composed") {
        let device = b.device.clone().autodiff();
        let strategy = (spec_strategy(), input_strategy(), -5.0f32..0.0, 0.0f32..5.0);
        check(&b, 128, strategy, |(spec, (dims, x), lo, hi)| {
            let spec = spec.with_granularity(Granularity::PerTensor);
            let qp = burn_qat::qparams_from_range(lo, hi, &spec);
            let (fast, slow) = both(&device, || {
                let t = Tensor::<1>::from_floats(x.as_slice(), &device)
                    .reshape(dims)
                    .require_grad();
                let y = tensor::fake_quant_per_tensor(t.clone(), qp, &spec);
                let grads = y.clone().sum().backward();
                (values(y), values(t.grad(&grads).expect("gradient")))
            });
            prop_assert_eq!(bits(&fast.0), bits(&slow.0));
            prop_assert_eq!(bits(&fast.1), bits(&slow.1));
            Ok(())
        });
    }
}

/// The LSQ (or LSQ+ with `plus`) output and the gradients of `x`, the steps and the offsets
/// (`None` for LSQ) under a non-uniform upstream gradient; steps per channel from `step`.
fn run_lsq(
    device: &Device,
    spec: &QuantSpec,
    dims: [usize; 3],
    x: &[f32],
    (plus, step, off): (bool, f32, f32),
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    let channels = spec.axis().map_or(1, |a| dims[a]);
    let t = Tensor::<1>::from_floats(x, device)
        .reshape(dims)
        .require_grad();
    let steps: Vec<f32> = (0..channels)
        .map(|c| step * (1.0 + (c % 5) as f32 * 0.37))
        .collect();
    let s = Tensor::<1>::from_floats(steps.as_slice(), device).require_grad();
    let o = Tensor::<1>::from_floats(vec![off; channels].as_slice(), device).require_grad();
    let factor = tensor::lsq_grad_factor(x.len() / channels, spec.qmax());
    let y = tensor::fake_quant_lsq(t.clone(), s.clone(), plus.then(|| o.clone()), spec, factor);
    let grads = weighted(y.clone(), upstream).backward();
    (
        values(y),
        values(t.grad(&grads).expect("x gradient")),
        values(s.grad(&grads).expect("step gradient")),
        o.grad(&grads).map(values),
    )
}

/// Fused and composed LSQ agree: values bit-equal; the gradient of `x` equal up to rounding
/// (autodiff computes `(g * s) / s`, the fused backward passes `g`) and zero at the same
/// places; the step and offset gradients within a few ULP of the terms autodiff sums
/// (`g * round(v) + g * s * (-x / s^2)`, of the size of `g * v`, which cancel), where the fused
/// backward sums `g * (round(v) - v)` directly, in f64.
fn lsq_agrees(
    device: &Device,
    spec: &QuantSpec,
    dims: [usize; 3],
    x: &[f32],
    params: (bool, f32, f32),
) -> Result<(), TestCaseError> {
    let (fast, slow) = both(device, || run_lsq(device, spec, dims, x, params));
    // `round(v) * s + 0` is +0 where `round(v)` is -0; a GPU compiler may simplify the composed
    // form's `v + (round(v) - v)` to `round(v)` and keep the -0: zeros compare by value.
    let zeros_by_value = |v: &[f32]| {
        bits(v)
            .into_iter()
            .map(|b| if b == (-0.0f32).to_bits() { 0 } else { b })
            .collect::<Vec<_>>()
    };
    prop_assert_eq!(zeros_by_value(&fast.0), zeros_by_value(&slow.0), "values");
    for (p, q) in fast.1.iter().zip(&slow.1) {
        prop_assert!(
            (p - q).abs() <= 4.0 * f32::EPSILON * q.abs() && (*p == 0.0) == (*q == 0.0),
            "x gradient: fused {p}, composed {q}"
        );
    }
    let (_, step, off) = params;
    let channels = spec.axis().map_or(1, |a| dims[a]);
    let factor = tensor::lsq_grad_factor(x.len() / channels, spec.qmax());
    let terms: f32 = x
        .iter()
        .enumerate()
        .map(|(i, v)| upstream(i) * ((v.abs() + off.abs()) / step + 1.0))
        .sum();
    let tol = 16.0 * f32::EPSILON * factor * terms;
    let close = |a: &[f32], b: &[f32], what: &str| -> Result<(), TestCaseError> {
        prop_assert_eq!(a.len(), b.len());
        for (p, q) in a.iter().zip(b) {
            prop_assert!(
                (p - q).abs() <= tol,
                "{what}: fused {p}, composed {q}, tolerance {tol}"
            );
        }
        Ok(())
    };
    close(&fast.2, &slow.2, "step gradient")?;
    match (&fast.3, &slow.3) {
        (Some(f), Some(s)) => close(f, s, "offset gradient"),
        (None, None) => Ok(()),
        (f, s) => Err(TestCaseError::fail(format!(
            "offset gradient fused {f:?}, composed {s:?}"
        ))),
    }
}

/// Fused LSQ+ on a large tensor against the step and offset gradients summed in f64 on the host
/// (autodiff's f32 sums over tens of thousands of terms drift by more than the per-term
/// tolerance of [`lsq_agrees`]), and its values and `x` gradient against the composed ops.
fn lsq_matches_f64_reference(
    b: &Backend,
    device: &Device,
    spec: &QuantSpec,
    dims: [usize; 3],
    x: &[f32],
) {
    let (plus, step, off) = (true, 0.02f32, 0.1f32);
    let (fast, slow) = both(device, || run_lsq(device, spec, dims, x, (plus, step, off)));
    assert_eq!(
        bits(&fast.0),
        bits(&slow.0),
        "{}: LSQ+ values {spec:?}",
        b.name
    );
    let axis = spec.axis().expect("per channel");
    let channels = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let factor = tensor::lsq_grad_factor(x.len() / channels, spec.qmax()) as f64;
    let (qmin, qmax) = (spec.qmin() as f32, spec.qmax() as f32);
    let (mut ds, mut doff, mut mass) = (
        vec![0f64; channels],
        vec![0f64; channels],
        vec![0f64; channels],
    );
    for (i, &xi) in x.iter().enumerate() {
        let c = (i / inner) % channels;
        let s = step * (1.0 + (c % 5) as f32 * 0.37);
        let g = upstream(i);
        let v = (xi - off) / s;
        let inside = v >= qmin && v <= qmax;
        let dv = if inside {
            v.round_ties_even() - v
        } else if v < qmin {
            qmin
        } else {
            qmax
        };
        ds[c] += f64::from(g * dv);
        doff[c] += if inside { 0.0 } else { f64::from(g) };
        mass[c] += f64::from(g) * (f64::from(v.abs()) + 1.0);
        let want = if inside { g } else { 0.0 };
        assert_eq!(fast.1[i], want, "{}: x gradient at {i}", b.name);
    }
    let offsets = fast.3.expect("offset gradient");
    for c in 0..channels {
        // Both kernels sum in f32 lanes: on the CPU each of 16 lanes adds at most 64 terms
        // before its sum joins an f64 total (at most 64 roundings: 4e-6 of the mass); the
        // CubeCL ones (wgpu) reduce in f32 (GPUs have no fast f64), each lane adding a run of
        // terms before the lanes are combined: measured 2e-5 of the sum on lavapipe. Bounded
        // here by 1e-5 of the terms' mass (~100 roundings).
        let per_term = 1e-5;
        let tol = per_term * factor * mass[c];
        let (got_s, got_o) = (f64::from(fast.2[c]), f64::from(offsets[c]));
        // The f64 sums are rounded to f32 once: a relative 2^-24 plus the summation order.
        let f32_round = |v: f64| v.abs() * 1.2e-7;
        assert!(
            (got_s - factor * ds[c]).abs() <= tol + f32_round(factor * ds[c]),
            "{}: step gradient {c}: {got_s} vs {}",
            b.name,
            factor * ds[c]
        );
        assert!(
            (got_o - factor * doff[c]).abs() <= tol + f32_round(factor * doff[c]),
            "{}: offset gradient {c}: {got_o} vs {}",
            b.name,
            factor * doff[c]
        );
    }
}

/// LSQ and LSQ+ on random specs and inputs (see [`lsq_agrees`]).
#[test]
fn fused_lsq_equals_composed() {
    for b in fused_backends("fused_lsq_equals_composed") {
        let device = b.device.clone().autodiff();
        let strategy = (
            spec_strategy(),
            input_strategy(),
            (any::<bool>(), 0.001f32..0.5, -0.3f32..0.3),
        );
        check(&b, 256, strategy, |(spec, (dims, x), params)| {
            let spec = spec.with_rounding(RoundingMode::HalfToEven);
            let x: Vec<f32> = x
                .into_iter()
                .map(|v| if v.is_finite() { v } else { 0.0 })
                .collect();
            lsq_agrees(&device, &spec, dims, &x, params)
        });
    }
}

/// Inputs above the parallel threshold: split across threads, same bits as the composed ops.
#[test]
fn large_tensors_split_across_threads_equal_composed() {
    for b in fused_backends("large_tensors_split_across_threads_equal_composed") {
        let device = b.device.clone().autodiff();
        let n = 3 * fused::cpu::PARALLEL_MIN + 77;
        let mut next = burn_qat_tests::uniform(7);
        let x: Vec<f32> = (0..n).map(|_| next() * 6.0 - 3.0).collect();
        // Per tensor; long runs per channel (axis 0); a period of short runs (axis 1, runs of 2);
        // one channel per element (axis 2).
        for (spec, dims) in [
            (QuantSpec::int8_act_per_tensor_asymmetric(), [1, n, 1]),
            (
                QuantSpec::int8_weight_per_channel_symmetric(0),
                [4, n / 4, 1],
            ),
            (
                QuantSpec::int8_weight_per_channel_symmetric(1).with_bits(4),
                [n / 200, 100, 2],
            ),
            (
                QuantSpec::int8_weight_per_channel_symmetric(2),
                [n / 300, 1, 300],
            ),
        ] {
            let xs: Vec<f32> = x[..dims.iter().product()].to_vec();
            assert!(xs.len() > fused::cpu::PARALLEL_MIN);
            let (fast, slow) = both(&device, || run_fake_quant(&device, &spec, dims, &xs));
            assert_eq!(bits(&fast.0), bits(&slow.0), "{}: values {spec:?}", b.name);
            assert_eq!(
                bits(&fast.1),
                bits(&slow.1),
                "{}: gradient {spec:?}",
                b.name
            );
            assert_eq!(bits(&fast.2), bits(&slow.2), "{}: range {spec:?}", b.name);
            if spec.axis().is_some() {
                lsq_matches_f64_reference(&b, &device, &spec, dims, &xs);
            }
        }
    }
}

/// Values and the gradients of `z`, `divisor` and `bias` of BatchNorm folding's rescaling
/// `z / divisor + bias` along `axis` of a `dims` tensor.
fn run_divide_add(
    device: &Device,
    dims: [usize; 3],
    axis: usize,
    z: &[f32],
    d: &[f32],
    b: &[f32],
) -> [Vec<f32>; 4] {
    let zt = Tensor::<1>::from_floats(z, device)
        .reshape(dims)
        .require_grad();
    let dt = Tensor::<1>::from_floats(d, device).require_grad();
    let bt = Tensor::<1>::from_floats(b, device).require_grad();
    let y = tensor::divide_add_channels(zt.clone(), dt.clone(), Some(bt.clone()), axis);
    let out = values(y.clone());
    let grads = weighted(y, upstream).backward();
    let g = |t: &Tensor<1>| values(t.grad(&grads).expect("gradient"));
    let dz = values(zt.grad(&grads).expect("gradient"));
    [out, dz, g(&dt), g(&bt)]
}

/// Per-channel sums against the `f64` sums of the same terms: within `1e-5` of the sum of the
/// terms' magnitudes (summation order differs; the fused sums are the more exact ones).
fn close_sums(name: &str, fast: &[f32], slow: &[f32], magnitudes: &[f64]) {
    assert_eq!(fast.len(), slow.len(), "{name}: lengths");
    for (c, ((f, s), m)) in fast.iter().zip(slow).zip(magnitudes).enumerate() {
        let tol = 1e-5 * m.max(1e-30);
        assert!(
            (f64::from(*f) - f64::from(*s)).abs() <= tol,
            "{name}: channel {c}: fused {f} vs composed {s} (tolerance {tol})"
        );
    }
}

/// BatchNorm folding's `z / divisor + bias` (the folded layer's output turned back in
/// training): fused values and `z`'s gradient bit-equal to the composed divide and add, the
/// divisor's and bias's gradients (per-channel sums) equal up to summation order, per channel
/// along every axis, the large case split across threads.
#[test]
fn fused_divide_add_equals_composed() {
    for b in fused_backends("fused_divide_add_equals_composed") {
        let device = b.device.clone().autodiff();
        let one = |dims: [usize; 3], axis: usize, z: &[f32], d: &[f32], bias: &[f32]| {
            let (fast, slow) = both(&device, || run_divide_add(&device, dims, axis, z, d, bias));
            assert_eq!(
                bits(&fast[0]),
                bits(&slow[0]),
                "{}: values {dims:?} axis {axis}",
                b.name
            );
            assert_eq!(
                bits(&fast[1]),
                bits(&slow[1]),
                "{}: dz {dims:?} axis {axis}",
                b.name
            );
            // Magnitudes of the summed terms, per channel.
            let c = dims[axis];
            let inner: usize = dims[axis + 1..].iter().product();
            let (mut mz, mut mg) = (vec![0.0f64; c], vec![0.0f64; c]);
            for (i, &zv) in z.iter().enumerate() {
                let ch = (i / inner) % c;
                let g = f64::from(upstream(i));
                mz[ch] += (g * f64::from(zv)).abs() / f64::from(d[ch] * d[ch]);
                mg[ch] += g;
            }
            close_sums(&format!("{}: d(divisor)", b.name), &fast[2], &slow[2], &mz);
            close_sums(&format!("{}: d(bias)", b.name), &fast[3], &slow[3], &mg);
            // And against the formulas: -sum(g z) / d^2 and sum(g), in f64.
            let (mut gz, mut gs) = (vec![0.0f64; c], vec![0.0f64; c]);
            for (i, &zv) in z.iter().enumerate() {
                let ch = (i / inner) % c;
                gz[ch] += f64::from(upstream(i)) * f64::from(zv);
                gs[ch] += f64::from(upstream(i));
            }
            let want_d: Vec<f32> = gz
                .iter()
                .zip(d)
                .map(|(s, &d)| (-s / f64::from(d * d)) as f32)
                .collect();
            let want_b: Vec<f32> = gs.iter().map(|&s| s as f32).collect();
            close_sums(
                &format!("{}: d(divisor) formula", b.name),
                &fast[2],
                &want_d,
                &mz,
            );
            close_sums(
                &format!("{}: d(bias) formula", b.name),
                &fast[3],
                &want_b,
                &mg,
            );
        };
        let strategy =
            (1usize..5, 1usize..6, 1usize..80, 0usize..3).prop_flat_map(|(a, c, w, axis)| {
                let dims = [a, c, w];
                let n = a * c * w;
                (
                    Just(dims),
                    Just(axis),
                    proptest::collection::vec(-4.0f32..4.0, n),
                    proptest::collection::vec(
                        prop_oneof![0.05f32..3.0, -3.0f32..-0.05],
                        dims[axis],
                    ),
                    proptest::collection::vec(-1.0f32..1.0, dims[axis]),
                )
            });
        check(&b, 128, strategy, |(dims, axis, z, d, bias)| {
            one(dims, axis, &z, &d, &bias);
            Ok(())
        });
        // Above the parallel threshold: a conv output [n, C, h*w] with runs of 676.
        let n = 2 * fused::cpu::PARALLEL_MIN / (3 * 676) + 1;
        let mut next = burn_qat_tests::uniform(11);
        let z: Vec<f32> = (0..n * 3 * 676).map(|_| next() * 6.0 - 3.0).collect();
        one([n, 3, 676], 1, &z, &[0.7, -1.3, 2.0], &[0.1, 0.0, -0.2]);
    }
}

/// Golden values on ties through the fused path: half to even (`0.5 -> 0`, `2.5 -> 2`) and TF's
/// half up (`0.5 -> 1`, `-0.5 -> 0`); a kernel that mixed up the two modes fails here.
#[test]
fn rounding_modes_differ_on_ties_through_the_fused_path() {
    for b in fused_backends("rounding_modes_differ_on_ties_through_the_fused_path") {
        let x = Tensor::<1>::from_floats([0.5, 1.5, 2.5, -0.5, -2.5], &b.device);
        let qp = burn_qat::QParams {
            scale: 1.0,
            zero_point: 0,
        };
        let even = QuantSpec::default();
        let up = even.with_rounding(RoundingMode::TfHalfUp);
        assert_eq!(
            values(tensor::fake_quant_per_tensor(x.clone(), qp, &even)),
            vec![0.0, 2.0, 2.0, -0.0, -2.0]
        );
        assert_eq!(
            values(tensor::fake_quant_per_tensor(x, qp, &up)),
            vec![1.0, 2.0, 3.0, 0.0, -2.0]
        );
    }
}

/// PACT (`pact`) or trainable min/max: the output and the gradients of `x` and of the clips
/// (`[alpha]`, or `[min, max]`) under a non-uniform upstream gradient.
fn run_clip(
    device: &Device,
    spec: &QuantSpec,
    dims: [usize; 3],
    x: &[f32],
    (pact, lo, hi): (bool, f32, f32),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let t = Tensor::<1>::from_floats(x, device)
        .reshape(dims)
        .require_grad();
    let lo = Tensor::<1>::from_floats([lo], device).require_grad();
    let hi = Tensor::<1>::from_floats([hi], device).require_grad();
    let y = if pact {
        tensor::fake_quant_pact(t.clone(), hi.clone(), spec)
    } else {
        tensor::fake_quant_min_max(t.clone(), lo.clone(), hi.clone(), spec)
    };
    let grads = weighted(y.clone(), upstream).backward();
    let mut clips = if pact {
        vec![]
    } else {
        values(lo.grad(&grads).expect("min gradient"))
    };
    clips.extend(values(hi.grad(&grads).expect("max gradient")));
    (
        values(y),
        values(t.grad(&grads).expect("x gradient")),
        clips,
    )
}

/// Fused PACT and trainable min/max against the composed ops: values and the gradient of `x`
/// bit-equal (both pass `grad` or 0), the clips' gradients equal up to summation order (the
/// fused backward sums in f64, autodiff in f32).
#[test]
fn fused_pact_and_min_max_equal_composed() {
    for b in fused_backends("fused_pact_and_min_max_equal_composed") {
        let device = b.device.clone().autodiff();
        // Clips on the lattice of `input_strategy`'s ties too, so that `x == lo` and `x == hi`
        // occur and the tie rules (the gradient goes to `x`) are exercised.
        let clip = |lo: i32, hi: i32| {
            prop_oneof![
                (lo as f32 * 0.5..hi as f32 * 0.5),
                (lo * 8..hi * 8).prop_map(|k| k as f32 * 0.5 / 16.0),
            ]
        };
        let strategy = (
            spec_strategy(),
            input_strategy(),
            (any::<bool>(), clip(-4, 1), clip(-1, 4)),
        );
        check(&b, 256, strategy, |(spec, (dims, x), params)| {
            let spec = spec.with_granularity(Granularity::PerTensor);
            let (fast, slow) = both(&device, || run_clip(&device, &spec, dims, &x, params));
            prop_assert_eq!(
                bits(&fast.0),
                bits(&slow.0),
                "values {:?} {:?}",
                spec,
                params
            );
            prop_assert_eq!(bits(&fast.1), bits(&slow.1), "x gradient {:?}", params);
            let mass: f32 = (0..x.len()).map(upstream).sum();
            let tol = 4.0 * f32::EPSILON * mass;
            prop_assert_eq!(fast.2.len(), slow.2.len());
            for (p, q) in fast.2.iter().zip(&slow.2) {
                prop_assert!(
                    (p - q).abs() <= tol,
                    "clip gradient: fused {p}, composed {q} ({:?})",
                    params
                );
            }
            Ok(())
        });
    }
}

/// Golden PACT values and gradients through the fused path: alpha 1 on 2 bits (scale 1/3),
/// `x` below 0, inside, on a tie and above alpha.
#[test]
fn pact_golden_through_the_fused_path() {
    for b in fused_backends("pact_golden_through_the_fused_path") {
        let device = b.device.clone().autodiff();
        // Below 0, inside, on a rounding tie, above alpha, and on both clips exactly (a tie
        // sends the gradient to `x`, as Burn's clamp_min and min_pair do).
        let x = Tensor::<1>::from_floats([-0.5, 0.2, 0.5, 2.0, 0.0, 1.0], &device).require_grad();
        let alpha = Tensor::<1>::from_floats([1.0], &device).require_grad();
        let spec = QuantSpec::default().with_bits(2);
        assert!(fused::available(&x));
        let y = tensor::fake_quant_pact(x.clone(), alpha.clone(), &spec);
        let got = values(y.clone());
        let third = 1.0f32 / 3.0;
        // 0.2 / (1/3) = 0.6 -> 1; 0.5 / (1/3) = 1.5 -> 2 (half to even).
        let want = [0.0, third, 2.0 * third, 1.0, 0.0, 1.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{}: {got:?} vs {want:?}", b.name);
        }
        let grads = (y * Tensor::from_floats([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], &device))
            .sum()
            .backward();
        assert_eq!(
            values(x.grad(&grads).unwrap()),
            vec![0.0, 2.0, 4.0, 0.0, 16.0, 32.0]
        );
        assert_eq!(values(alpha.grad(&grads).unwrap()), vec![8.0]);
    }
}

/// On Burn's graph-capture device each fused op is recorded as one marked op carrying its grid
/// (no round/clamp primitives): fake-quant, LSQ, PACT and observers' min/max.
#[test]
fn each_fused_op_is_one_marked_op_in_a_capture_trace() {
    use burn::backend::Capture;
    use burn::backend::ir::{OperationIr, ScalarIr};
    use fused::capture::ids;

    let device = Device::capture();
    assert!(fused::has_kernels(&device));
    let id = |t: &Tensor<2>| t.clone().try_into_primitive::<Capture>().unwrap().id();
    let captured = device
        .capture_scope(|scope| {
            let x = Tensor::<2>::from_data(TensorData::zeros::<f32, _>([2, 3]), &device);
            let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(6);
            let one = |v: f32| Tensor::<1>::from_floats([v], &device);
            let y = tensor::fake_quant(x.clone(), one(0.1), one(-3.0), &spec);
            let y = tensor::fake_quant_lsq(y, one(0.2), None, &spec, 1.0);
            let y = tensor::fake_quant_pact(y, one(2.0), &spec);
            let (lo, _) = tensor::min_max(y.clone(), Granularity::PerTensor);
            let y = y + lo.reshape([1, 1]);
            let y = tensor::divide_add_channels(y, one(2.0).repeat_dim(0, 3), None, 1);
            let (xi, yi) = (id(&x), id(&y));
            scope.complete([xi], [yi])
        })
        .expect("capture");
    let ops = &captured.graph.operations;
    let marked: Vec<_> = ops
        .iter()
        .filter_map(|op| match op {
            OperationIr::Custom(c) => Some(c),
            _ => None,
        })
        .collect();
    let names: Vec<&str> = marked.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        names,
        vec![
            ids::FAKE_QUANT,
            ids::LSQ,
            ids::CLIP_FAKE_QUANT,
            ids::MIN_MAX,
            ids::DIVIDE_ADD
        ],
        "{ops:?}"
    );
    // 6 bits, signed: [-32, 31]; per tensor (axis 0), half to even.
    assert_eq!(
        marked[0].scalars,
        vec![
            ScalarIr::UInt(0),
            ScalarIr::Float(-32.0),
            ScalarIr::Float(31.0),
            ScalarIr::Bool(false)
        ]
    );
    assert_eq!(marked[0].inputs.len(), 3);
    // PACT: the unsigned 6-bit grid [0, 63].
    assert_eq!(
        marked[2].scalars[..2],
        [ScalarIr::Float(0.0), ScalarIr::Float(63.0)]
    );
    // No primitive of the composed fake-quant ran on `x`: of the unmarked ops, only the final
    // add writes a tensor of x's shape (the rest is grid arithmetic on `[1]` tensors).
    let full: Vec<_> = ops
        .iter()
        .filter(|op| !matches!(op, OperationIr::Custom(_) | OperationIr::Init(_)))
        .filter(|op| op.outputs().any(|t| t.shape.as_slice() == [2, 3]))
        .collect();
    assert_eq!(full.len(), 1, "{full:?}");
}

mod already_quantized {
    use super::*;
    use burn::nn::{Linear, LinearConfig, Relu};
    use burn_qat::graph::{self, QatGraph};
    use burn_qat::model::{QatConfig, quantize};
    use burn_qat::nn::{FakeQuant, FakeQuantConfig, LearnedFakeQuantConfig, LearnedRange};

    /// A user's model with a burn-qat activation quantizer inside its forward.
    #[derive(Module, Debug)]
    struct WithQuantizer {
        fc1: Linear,
        act: FakeQuant,
        relu: Relu,
        fc2: Linear,
    }

    impl WithQuantizer {
        fn forward(&self, x: Tensor<2>) -> Tensor<2> {
            self.fc2
                .forward(self.relu.forward(self.act.forward(self.fc1.forward(x))))
        }
    }

    #[derive(Module, Debug)]
    struct Plain {
        fc1: Linear,
        relu: Relu,
        fc2: Linear,
    }

    impl Plain {
        fn forward(&self, x: Tensor<2>) -> Tensor<2> {
            self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
        }
    }

    fn input(device: &Device) -> Tensor<2> {
        let mut next = burn_qat_tests::uniform(3);
        let v: Vec<f32> = (0..5 * 6).map(|_| next() * 4.0 - 2.0).collect();
        Tensor::<1>::from_floats(v.as_slice(), device).reshape([5, 6])
    }

    fn run(g: &QatGraph, x: Tensor<2>) -> Vec<f32> {
        values(g.valid().forward::<2, 2>(x))
    }

    /// Graph mode reads through a marked activation quantizer: the float graph is the model
    /// without it, and the quantizer's grid arithmetic (recorded on its range) is not lifted.
    #[test]
    fn graph_mode_reads_through_a_marked_activation_quantizer() {
        let device = Device::flex();
        let model = WithQuantizer {
            fc1: LinearConfig::new(6, 8).init(&device),
            act: FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric())
                .init(&device)
                .unwrap()
                .set_range(&[-1.0], &[1.0])
                .unwrap(),
            relu: Relu::new(),
            fc2: LinearConfig::new(8, 3).init(&device),
        };
        let float = graph::build(&model, &[1, 6], |m: &WithQuantizer, x| m.forward(x))
            .expect("a model holding a FakeQuant lifts");
        let x = input(&device);
        let want = values(
            model
                .fc2
                .forward(model.relu.forward(model.fc1.forward(x.clone()))),
        );
        assert_eq!(
            run(&float, x),
            want,
            "the float graph is the model without its quantizer"
        );
        graph::prepare(
            &model,
            &[1, 6],
            |m: &WithQuantizer, x| m.forward(x),
            &QatConfig::new(),
        )
        .expect("prepare");
    }

    /// A model wrapped by `quantize` (weight fake-quant as reparameterizations, recorded as
    /// marked ops) prepares to the same QAT graph as the float model, and the trained weights
    /// write back into the quantized model's type.
    #[test]
    fn a_quantized_model_prepares_as_its_float_model() {
        let device = Device::flex();
        let plain = Plain {
            fc1: LinearConfig::new(6, 8).init(&device),
            relu: Relu::new(),
            fc2: LinearConfig::new(8, 3).init(&device),
        };
        let config = QatConfig::new();
        let quantized = quantize(plain.clone(), &config).unwrap();
        let forward = |m: &Plain, x: Tensor<2>| m.forward(x);
        let from_float = graph::prepare(&plain, &[1, 6], forward, &config).unwrap();
        let from_quantized = graph::prepare(&quantized, &[1, 6], forward, &config)
            .expect("a quantize()d model prepares");
        let x = input(&device);
        assert_eq!(run(&from_quantized, x.clone()), run(&from_float, x));
        let back: Plain = from_quantized.write_back(quantized).expect("write back");
        let _ = back.forward(input(&device));
    }

    /// A learned clip (PACT) is part of what the model computes: refused with its name and
    /// what to do, not lifted as if it were not there.
    #[test]
    fn a_marked_pact_clip_is_refused_with_its_name() {
        #[derive(Module, Debug)]
        struct WithPact {
            fc: Linear,
            act: burn_qat::nn::LearnedFakeQuant,
        }
        let device = Device::flex();
        let act = LearnedFakeQuantConfig::new(QuantSpec::default(), LearnedRange::Pact)
            .init(&device)
            .unwrap();
        let act = act.observer.clone().set_range(&[0.0], &[2.0]).map(|o| {
            let mut a = act;
            a.observer = o;
            a.start_learning()
        });
        let model = WithPact {
            fc: LinearConfig::new(6, 3).init(&device),
            act: act.unwrap(),
        };
        let err = graph::build(&model, &[1, 6], |m: &WithPact, x: Tensor<2>| {
            m.act.forward(m.fc.forward(x))
        })
        .expect_err("a PACT clip in the traced forward is refused")
        .to_string();
        assert!(
            err.contains(fused::capture::ids::CLIP_FAKE_QUANT)
                && err.contains("trace the float model")
                && err.contains("in `act"),
            "{err}"
        );
    }
}
