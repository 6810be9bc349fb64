//! The scalar reference: slow, obviously right, one `f32` at a time.
//!
//! Every tensor path of burn-qat is tested against these functions. They use the same `f32`
//! operations in the same order as the tensor path (`x / scale`, round, `+ zero_point`, clamp,
//! `(q - zero_point) * scale`), so on a backend with IEEE division the results are bit-equal.
//!
//! ```
//! use burn_qat_core::{QParams, QuantSpec, reference};
//!
//! let spec = QuantSpec::int8_act_per_tensor_asymmetric();
//! let qp = QParams { scale: 1.0, zero_point: 1 };
//! // 2.5 rounds to 2 (half to even) and the zero point is added after rounding.
//! assert_eq!(reference::quantize(2.5, qp, &spec), 3);
//! assert_eq!(reference::quantize(-2.5, qp, &spec), -1);
//! assert_eq!(reference::quantize(3.5, qp, &spec), 5);
//! assert_eq!(reference::fake_quant(2.5, qp, &spec), 2.0);
//! assert_eq!(reference::fake_quant(1000.0, qp, &spec), 126.0); // clipped at qmax = 127
//! ```

use crate::{QParams, QuantSpec, RoundingMode};

/// Rounds half to even (`0.5 -> 0`, `1.5 -> 2`, `-2.5 -> -2`), like `f32::round_ties_even`.
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Rounds half away from zero (`0.5 -> 1`, `-0.5 -> -1`), like C's `std::round`.
pub fn round_half_away(x: f32) -> f32 {
    x.round()
}

/// Rounds half up (`0.5 -> 1`, `-0.5 -> 0`), `floor(x + 0.5)` as in TF's fake-quant kernels.
pub fn round_half_up(x: f32) -> f32 {
    (x + 0.5).floor()
}

/// Rounds `x / scale` by the spec's rounding mode and adds the zero point, without clamping.
/// This is the value whose position inside or outside `[qmin, qmax]` decides the gradient.
pub fn quantize_unclamped(x: f32, qp: QParams, spec: &QuantSpec) -> f32 {
    let v = x / qp.scale;
    let r = match spec.rounding {
        RoundingMode::HalfToEven => round_half_even(v),
        RoundingMode::TfHalfUp => round_half_up(v),
    };
    r + qp.zero_point as f32
}

/// `clamp(round(x / scale) + zero_point, qmin, qmax)`. NaN quantizes to the zero point
/// (real 0.0); infinities saturate.
pub fn quantize(x: f32, qp: QParams, spec: &QuantSpec) -> i32 {
    let q = quantize_unclamped(x, qp, spec);
    if q.is_nan() {
        return qp.zero_point;
    }
    q.clamp(spec.qmin() as f32, spec.qmax() as f32) as i32
}

/// `scale * (q - zero_point)`.
pub fn dequantize(q: i32, qp: QParams) -> f32 {
    (q - qp.zero_point) as f32 * qp.scale
}

/// Quantize then dequantize: the value the forward pass of fake quantization produces.
pub fn fake_quant(x: f32, qp: QParams, spec: &QuantSpec) -> f32 {
    let q = quantize_unclamped(x, qp, spec).clamp(spec.qmin() as f32, spec.qmax() as f32);
    (q - qp.zero_point as f32) * qp.scale
}

/// The clipped straight-through estimator: `d fake_quant(x) / dx` is 1 where `x` lies inside
/// the representable range `[scale * (qmin - zp), scale * (qmax - zp)]`, 0 outside (TF's
/// `FakeQuantWithMinMaxVarsGradient`). Tested as `qmin <= x / scale + zp <= qmax`, the same
/// `f32` operations as the tensor path.
pub fn fake_quant_grad(x: f32, qp: QParams, spec: &QuantSpec) -> f32 {
    let v = x / qp.scale + qp.zero_point as f32;
    if v >= spec.qmin() as f32 && v <= spec.qmax() as f32 {
        1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qparams_from_range;

    #[test]
    fn ties() {
        let spec = QuantSpec::default();
        let qp = QParams {
            scale: 1.0,
            zero_point: 0,
        };
        let got: Vec<f32> = [2.5, -2.5, 3.5, -3.5, 0.5, -0.5]
            .map(|x| fake_quant(x, qp, &spec))
            .into();
        assert_eq!(got, vec![2.0, -2.0, 4.0, -4.0, 0.0, -0.0]);
        let tf = spec.with_rounding(RoundingMode::TfHalfUp);
        let got: Vec<f32> = [2.5, -2.5, 3.5, -3.5, 0.5, -0.5]
            .map(|x| fake_quant(x, qp, &tf))
            .into();
        assert_eq!(got, vec![3.0, -2.0, 4.0, -3.0, 1.0, 0.0]);
        // Odd zero point: the zero point is added after rounding.
        let qp3 = QParams {
            scale: 1.0,
            zero_point: 3,
        };
        assert_eq!(quantize(2.5, qp3, &spec), 5);
        assert_eq!(quantize(3.5, qp3, &spec), 7);
        assert_eq!(quantize(-2.5, qp3, &spec), 1);
    }

    /// TF `fake_quant_ops_test.py`, 8 bits, range [-0.125, 63.625] nudged to [-0.25, 63.5]:
    /// inputs and expected outputs of `FakeQuantWithMinMaxArgs`.
    #[test]
    fn tf_forward_golden() {
        let spec =
            QuantSpec::uint8_act_per_tensor_asymmetric().with_rounding(RoundingMode::TfHalfUp);
        let qp = qparams_from_range(-0.125, 63.625, &spec);
        let inputs = [-0.26, -0.25, -0.24, 0.0, 0.1, 0.125, 0.26, 63.5, 63.6, 64.0];
        let expected = [-0.25, -0.25, -0.25, 0.0, 0.0, 0.25, 0.25, 63.5, 63.5, 63.5];
        let expected_grad = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        for ((x, y), g) in inputs.iter().zip(expected).zip(expected_grad) {
            assert_eq!(fake_quant(*x, qp, &spec), y, "x = {x}");
            assert_eq!(fake_quant_grad(*x, qp, &spec), g, "grad at x = {x}");
        }
    }

    #[test]
    fn nan_and_inf() {
        let spec = QuantSpec::default();
        let qp = QParams {
            scale: 0.5,
            zero_point: 2,
        };
        assert_eq!(quantize(f32::NAN, qp, &spec), 2);
        assert_eq!(quantize(f32::INFINITY, qp, &spec), 127);
        assert_eq!(quantize(f32::NEG_INFINITY, qp, &spec), -128);
        assert_eq!(fake_quant(f32::INFINITY, qp, &spec), 62.5);
    }

    #[test]
    fn quantize_dequantize_agree_with_fake_quant() {
        let spec = QuantSpec::default().with_bits(5);
        let qp = qparams_from_range(-1.3, 2.9, &spec);
        for i in -400..400 {
            let x = i as f32 * 0.01;
            assert_eq!(
                dequantize(quantize(x, qp, &spec), qp),
                fake_quant(x, qp, &spec),
                "{x}"
            );
        }
    }
}
