//! The scalar reference: slow, obviously right, one `f32` at a time.
//!
//! Every tensor path of burn-qat is tested against these functions. They use the same `f32`
//! operations in the same order as the tensor path (`x / scale`, round, `+ zero_point`, clamp,
//! `(q - zero_point) * scale`), so on a backend with IEEE division the results are bit-equal.
//!
//! Every output saturates at `+-f32::MAX`: a grid whose end lies beyond the largest `f32` (a
//! scale of `f32::MAX / 15` times 15 steps rounds past it) gives `+-f32::MAX` there, never an
//! infinity, so finite inputs and finite parameters always give finite outputs. NaN inputs stay
//! NaN. The learned ranges ([`fake_quant_lsq`], [`fake_quant_pact`], [`fake_quant_min_max`])
//! repair parameters an optimizer drove to NaN or infinity: an LSQ step counts as
//! [`MIN_SCALE`], an LSQ+ offset, a PACT `alpha` and a trainable `min`/`max` as 0.
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

use crate::{MIN_SCALE, QParams, QuantSpec, RoundingMode, qparams_from_range};

/// `y` clamped to `[-f32::MAX, f32::MAX]`, NaN kept: how every output saturates at the edge of
/// `f32` instead of overflowing to an infinity.
pub fn saturate(y: f32) -> f32 {
    y.clamp(-f32::MAX, f32::MAX)
}

/// Rounds half to even (`0.5 -> 0`, `1.5 -> 2`, `-2.5 -> -2`), like `f32::round_ties_even`.
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// A conv or linear layer's bias in steps of its int32 accumulator:
/// `round_half_even(bias / (input_scale * weight_scale))`, in `f32`.
///
/// The integer model adds this to `sum (q_in - z_in) * q_w`, whose unit is
/// `input_scale * weight_scale`; the QAT graph adds `bias_steps(..) * (input_scale *
/// weight_scale)` instead of the float bias, so both compute the same sum. Both call this
/// function, so they round the same way. The caller checks the result fits in `i32`.
///
/// ```
/// use burn_qat_core::reference::bias_steps;
///
/// // 0.3 in units of 0.5 * 0.25 = 0.125 is 2.4 steps: 2.
/// assert_eq!(bias_steps(0.3, 0.5, 0.25), 2.0);
/// // 2.5 steps round to even.
/// assert_eq!(bias_steps(0.3125, 0.5, 0.25), 2.0);
/// assert_eq!(bias_steps(-0.4375, 0.5, 0.25), -4.0);
/// ```
pub fn bias_steps(bias: f32, input_scale: f32, weight_scale: f32) -> f32 {
    (bias / (input_scale * weight_scale)).round_ties_even()
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

/// `scale * (q - zero_point)`, saturated at `+-f32::MAX`.
pub fn dequantize(q: i32, qp: QParams) -> f32 {
    // In i64: no overflow for any pair of i32 (the value is the same where i32 held it).
    saturate((i64::from(q) - i64::from(qp.zero_point)) as f32 * qp.scale)
}

/// Quantize then dequantize: the value the forward pass of fake quantization produces,
/// `(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`, saturated at
/// `+-f32::MAX` (a grid end beyond the largest `f32` gives `+-f32::MAX`).
pub fn fake_quant(x: f32, qp: QParams, spec: &QuantSpec) -> f32 {
    let q = quantize_unclamped(x, qp, spec).clamp(spec.qmin() as f32, spec.qmax() as f32);
    saturate((q - qp.zero_point as f32) * qp.scale)
}

/// `v`, or 0 where it is NaN or infinite: how a learned offset, PACT `alpha` or trainable
/// `min`/`max` that an optimizer broke is repaired.
pub fn finite_or_zero(v: f32) -> f32 {
    if v.is_finite() { v } else { 0.0 }
}

/// The step an LSQ parameter stands for: `max(|step|, MIN_SCALE)`, and [`MIN_SCALE`] for a
/// step an optimizer drove to NaN or infinity (the scalar twin of
/// [`tensor::lsq_step`](crate::tensor::lsq_step)).
pub fn lsq_step(step: f32) -> f32 {
    if step.is_finite() {
        step.abs().max(MIN_SCALE)
    } else {
        MIN_SCALE
    }
}

/// LSQ / LSQ+ forward (the scalar twin of
/// [`tensor::fake_quant_lsq`](crate::tensor::fake_quant_lsq) with a gradient factor of 1):
/// `round(clamp((x - o) / s, qmin, qmax)) * s + o` (half to even), `s = `[`lsq_step`]`(step)`,
/// `o = `[`finite_or_zero`]`(offset)` (0 for LSQ), saturated at `+-f32::MAX`.
pub fn fake_quant_lsq(x: f32, step: f32, offset: f32, spec: &QuantSpec) -> f32 {
    let s = lsq_step(step);
    let o = finite_or_zero(offset);
    let v = ((x - o) / s).clamp(spec.qmin() as f32, spec.qmax() as f32);
    saturate(round_half_even(v) * s + o)
}

/// `x` clipped to `[lo, hi]` as the tensor paths clip: `lo` where `x < lo`, then `hi` where
/// `hi` is below that (NaN stays NaN; `hi` wins when `lo > hi`).
pub fn clip(x: f32, lo: f32, hi: f32) -> f32 {
    let t = if x < lo { lo } else { x };
    if hi < t { hi } else { t }
}

/// PACT's grid for `spec`: unsigned, asymmetric, not narrow, per tensor (0.0 is grid point 0).
pub fn pact_spec(spec: &QuantSpec) -> QuantSpec {
    spec.with_signed(false)
        .with_symmetric(false)
        .with_narrow_range(false)
        .with_granularity(crate::Granularity::PerTensor)
}

/// PACT's step for a clipping level `alpha`: `max(alpha / qmax, MIN_SCALE)` on
/// [`pact_spec`]'s grid, `alpha` repaired by [`finite_or_zero`].
pub fn pact_scale(alpha: f32, spec: &QuantSpec) -> f32 {
    let qmax = pact_spec(spec).qmax().max(1) as f32;
    (finite_or_zero(alpha) / qmax).max(MIN_SCALE)
}

/// PACT forward (the scalar twin of
/// [`tensor::fake_quant_pact`](crate::tensor::fake_quant_pact)): `t = clip(x, 0, alpha)`
/// fake-quantized on [`pact_spec`]'s grid with step [`pact_scale`] and zero point 0, written
/// `t + (q - t)` as the straight-through forms compute it.
pub fn fake_quant_pact(x: f32, alpha: f32, spec: &QuantSpec) -> f32 {
    let t = clip(x, 0.0, finite_or_zero(alpha));
    let qp = QParams {
        scale: pact_scale(alpha, spec),
        zero_point: 0,
    };
    let q = fake_quant(t, qp, &pact_spec(spec));
    t + (q - t)
}

/// Trainable min/max forward (the scalar twin of
/// [`tensor::fake_quant_min_max`](crate::tensor::fake_quant_min_max)): `t = clip(x, min, max)`
/// (bounds repaired by [`finite_or_zero`]) fake-quantized on the grid of
/// [`qparams_from_range`]`(min, max)`, written `t + (q - t)`.
pub fn fake_quant_min_max(x: f32, min: f32, max: f32, spec: &QuantSpec) -> f32 {
    let t = clip(x, finite_or_zero(min), finite_or_zero(max));
    let q = fake_quant(t, qparams_from_range(min, max, spec), spec);
    t + (q - t)
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

    /// A grid end beyond the largest f32 saturates (issue 33: ranges at `+-f32::MAX` gave
    /// `+-inf`).
    #[test]
    fn outputs_saturate_at_f32_max() {
        let u4 = QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4);
        let qp = qparams_from_range(-f32::MAX, 1e-45, &u4);
        assert_eq!(fake_quant(-f32::MAX, qp, &u4), -f32::MAX);
        // [-f32::MAX, f32::MAX] on 2 unsigned bits: step 2.27e38, zero point 2, so grid point 0
        // is -4.5e38.
        let u2 = u4.with_bits(2);
        let qp = qparams_from_range(-f32::MAX, f32::MAX, &u2);
        assert_eq!(qp.zero_point, 2, "{qp:?}");
        assert!(
            -2.0 * qp.scale == f32::NEG_INFINITY,
            "the product overflows: {qp:?}"
        );
        assert_eq!(fake_quant(-f32::MAX, qp, &u2), -f32::MAX);
        assert_eq!(dequantize(0, qp), -f32::MAX);
        assert_eq!(dequantize(i32::MIN, qp), -f32::MAX);
        assert!(fake_quant(f32::NAN, qp, &u2).is_nan());
        // LSQ+ with a step whose grid top overflows and a huge offset.
        let s8 = QuantSpec::int8_act_per_tensor_asymmetric();
        assert_eq!(fake_quant_lsq(f32::MAX, 3e38, 1e38, &s8), f32::MAX);
        assert_eq!(fake_quant_lsq(-f32::MAX, 3e38, -1e38, &s8), -f32::MAX);
        assert_eq!(fake_quant_lsq(f32::MAX, 3e38, 3e38, &s8), 3e38);
        // PACT and min/max at the top of f32.
        assert_eq!(fake_quant_pact(f32::MAX, f32::MAX, &u4), f32::MAX);
        assert_eq!(
            fake_quant_min_max(-f32::MAX, -f32::MAX, 1e-45, &u4),
            -f32::MAX
        );
    }

    /// Parameters an optimizer broke count as MIN_SCALE (step) or 0 (offset, alpha, min, max).
    #[test]
    fn broken_learned_parameters_are_repaired() {
        let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(4);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(lsq_step(bad), MIN_SCALE);
            assert_eq!(fake_quant_lsq(0.75, 0.25, bad, &spec), 0.75);
            assert_eq!(fake_quant_lsq(1.0, bad, 0.0, &spec), 7.0 * MIN_SCALE);
            assert_eq!(fake_quant_pact(0.5, bad, &spec), 0.0);
            assert_eq!(
                fake_quant_min_max(0.5, bad, 1.0, &spec),
                fake_quant_min_max(0.5, 0.0, 1.0, &spec)
            );
            assert_eq!(fake_quant_min_max(0.5, -1.0, bad, &spec), 0.0);
        }
        assert_eq!(lsq_step(-0.5), 0.5);
        assert_eq!(lsq_step(0.0), MIN_SCALE);
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
