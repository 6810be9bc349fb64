//! Golden cases on every backend: ties, TF nudging, zero ranges, 2 and 16 bits.

use burn::prelude::*;
use burn_qat::core::{reference, tensor};
use burn_qat::{QParams, QuantSpec, RoundingMode, qparams_from_range};
use burn_qat_tests::{backends, values};

fn fq(x: &[f32], qp: QParams, spec: &QuantSpec, device: &Device) -> Vec<f32> {
    let t = Tensor::<1>::from_floats(x, device);
    let scale = Tensor::<1>::from_floats([qp.scale], device);
    let zp = Tensor::<1>::from_floats([qp.zero_point as f32], device);
    let a = values(tensor::fake_quant(t.clone(), scale, zp, spec));
    let b = values(tensor::fake_quant_per_tensor(t, qp, spec));
    assert_eq!(a, b, "tensor-qparams and scalar-qparams paths disagree");
    a
}

#[test]
fn ties_round_half_to_even_and_zero_point_added_after_rounding() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    for b in backends() {
        let got = fq(
            &[2.5, -2.5, 3.5, -3.5, 0.5, 1.5],
            QParams {
                scale: 1.0,
                zero_point: 0,
            },
            &spec,
            &b.device,
        );
        assert_eq!(got, vec![2.0, -2.0, 4.0, -4.0, 0.0, 2.0], "{}", b.name);
        // Odd zero point: q = round(x) + 3, so 2.5 -> 5 (not round(5.5) = 6), output 2.0.
        let got = fq(
            &[2.5, -2.5, 3.5],
            QParams {
                scale: 1.0,
                zero_point: 3,
            },
            &spec,
            &b.device,
        );
        assert_eq!(got, vec![2.0, -2.0, 4.0], "{}", b.name);
        // TF rounds half up.
        let tf = spec.with_rounding(RoundingMode::TfHalfUp);
        let got = fq(
            &[2.5, -2.5, 3.5, -0.5],
            QParams {
                scale: 1.0,
                zero_point: 3,
            },
            &tf,
            &b.device,
        );
        assert_eq!(got, vec![3.0, -2.0, 4.0, 0.0], "{}", b.name);
    }
}

/// `tensorflow/python/kernel_tests/quantization_ops/fake_quant_ops_test.py`: for each nudged
/// range, inputs just outside, on and inside the bounds, and the tie half a step above min.
#[test]
fn tf_fake_quant_with_min_max_vars_cases() {
    #[rustfmt::skip]
    let cases: &[(u32, bool, f32, f32, f32, f32, f32)] = &[
        // bits, narrow, min, max, nudged min, nudged max, step
        (8, false, -0.1, 63.65, 0.0, 63.75, 0.25),
        (8, false, -0.125, 63.625, -0.25, 63.5, 0.25),
        (8, true, -0.26, 126.74, -0.5, 126.5, 0.5),
        (4, false, -0.26, 7.24, -0.5, 7.0, 0.5),
        (4, true, -6.9, 0.1, -7.0, 0.0, 0.5),
    ];
    for b in backends() {
        for &(bits, narrow, min, max, nmin, nmax, step) in cases {
            let spec = QuantSpec::uint8_act_per_tensor_asymmetric()
                .with_bits(bits)
                .with_narrow_range(narrow)
                .with_rounding(RoundingMode::TfHalfUp);
            let qp = qparams_from_range(min, max, &spec);
            let x = [
                nmin - step,
                nmin - 0.01,
                nmin,
                nmin + step / 2.0,
                nmin + step / 2.0 + 0.01,
                nmax - 0.01,
                nmax,
                nmax + 0.01,
                nmax + step,
            ];
            let want = [
                nmin,
                nmin,
                nmin,
                nmin + step,
                nmin + step,
                nmax,
                nmax,
                nmax,
                nmax,
            ];
            let got = fq(&x, qp, &spec, &b.device);
            for i in 0..x.len() {
                assert!(
                    (got[i] - want[i]).abs() < 1e-5,
                    "{} {bits} bits narrow={narrow} [{min}, {max}]: x={} got {} want {}",
                    b.name,
                    x[i],
                    got[i],
                    want[i]
                );
            }
        }
    }
}

#[test]
fn zero_and_constant_ranges() {
    for b in backends() {
        for spec in [
            QuantSpec::int8_act_per_tensor_asymmetric(),
            QuantSpec::int8_weight_per_tensor_symmetric(),
        ] {
            let x = Tensor::<1>::zeros([5], &b.device);
            let (min, max) = tensor::min_max(x.clone(), spec.granularity);
            let (s, z) = tensor::qparams(min, max, &spec);
            let y = values(tensor::fake_quant(x, s.clone(), z, &spec));
            assert_eq!(y, vec![0.0; 5], "{}", b.name);
            assert!(values(s)[0] > 0.0, "{}: scale must stay positive", b.name);
            let c = Tensor::<1>::from_floats([3.0; 4], &b.device);
            let (min, max) = tensor::min_max(c.clone(), spec.granularity);
            let (s, z) = tensor::qparams(min, max, &spec);
            let y = values(tensor::fake_quant(c, s, z, &spec));
            for v in y {
                assert!(
                    (v - 3.0).abs() < 1e-6,
                    "{}: constant 3.0 came back as {v}",
                    b.name
                );
            }
        }
    }
}

#[test]
fn two_and_sixteen_bits() {
    for b in backends() {
        let s2 = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(2);
        let qp = qparams_from_range(-1.0, 2.0, &s2); // grid [-2, 1], scale 1, zp -1
        assert_eq!(
            qp,
            QParams {
                scale: 1.0,
                zero_point: -1
            }
        );
        let got = fq(&[-3.0, -1.0, -0.4, 0.6, 1.5, 2.0, 9.0], qp, &s2, &b.device);
        assert_eq!(got, vec![-1.0, -1.0, 0.0, 1.0, 2.0, 2.0, 2.0], "{}", b.name);

        let s16 = QuantSpec::int8_weight_per_tensor_symmetric().with_bits(16);
        let qp = qparams_from_range(-1.0, 1.0, &s16);
        let x: Vec<f32> = (0..50).map(|i| -1.0 + i as f32 * 0.0404).collect();
        let got = fq(&x, qp, &s16, &b.device);
        for (xi, gi) in x.iter().zip(got) {
            assert_eq!(gi, reference::fake_quant(*xi, qp, &s16), "{}", b.name);
            assert!((gi - xi).abs() <= qp.scale / 2.0 + 1e-7);
        }
    }
}

#[test]
fn per_channel_linear_and_conv_axes() {
    for b in backends() {
        // Linear weight [d_input=2, d_output=3]: channels along axis 1.
        let w = Tensor::<2>::from_floats([[0.1, -2.0, 0.02], [-0.3, 1.0, 0.01]], &b.device);
        let spec = QuantSpec::int8_weight_per_channel_symmetric(1);
        let (min, max) = tensor::min_max(w.clone(), spec.granularity);
        assert_eq!(values(min.clone()), vec![-0.3, -2.0, 0.0], "{}", b.name);
        assert_eq!(values(max.clone()), vec![0.1, 1.0, 0.02], "{}", b.name);
        let (s, z) = tensor::qparams(min, max, &spec);
        let scales = values(s.clone());
        let y = values(tensor::fake_quant(w.clone(), s, z, &spec));
        let x = values(w);
        for (i, (xi, yi)) in x.iter().zip(&y).enumerate() {
            let qp = QParams {
                scale: scales[i % 3],
                zero_point: 0,
            };
            assert_eq!(
                *yi,
                reference::fake_quant(*xi, qp, &spec),
                "{} element {i}",
                b.name
            );
        }
        // Conv2d weight [out=2, in=1, 1, 2]: channels along axis 0.
        let w = Tensor::<4>::from_floats([[[[1.27, -0.5]]], [[[0.0, 0.0]]]], &b.device);
        let spec = QuantSpec::int8_weight_per_channel_symmetric(0);
        let (min, max) = tensor::min_max(w.clone(), spec.granularity);
        let (s, z) = tensor::qparams(min, max, &spec);
        let sc = values(s.clone());
        assert!(
            (sc[0] - 0.01).abs() < 1e-9 && sc[1] == burn_qat::core::MIN_SCALE,
            "{}: {sc:?}",
            b.name
        );
        let y = values(tensor::fake_quant(w, s, z, &spec));
        assert_eq!(y, vec![1.27, -0.5, 0.0, 0.0], "{}", b.name);
    }
}

#[test]
fn non_finite_values_are_ignored_by_min_max() {
    for b in backends() {
        let x = Tensor::<1>::from_floats(
            [f32::NAN, 2.0, f32::NEG_INFINITY, -1.0, f32::INFINITY],
            &b.device,
        );
        let (min, max) = tensor::min_max(x, burn_qat::Granularity::PerTensor);
        assert_eq!(
            (values(min), values(max)),
            (vec![-1.0], vec![2.0]),
            "{}",
            b.name
        );
    }
}
