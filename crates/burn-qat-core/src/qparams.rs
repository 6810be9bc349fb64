use serde::{Deserialize, Serialize};

use crate::reference::{round_half_away, round_half_even};
use crate::{QuantSpec, RoundingMode};

/// The smallest scale ever produced, as in PyTorch (`torch.finfo(float32).eps`): a constant or
/// all-zero tensor gets this scale instead of dividing by zero.
pub const MIN_SCALE: f32 = f32::EPSILON;

/// An affine quantization: `real = scale * (q - zero_point)`.
///
/// `scale` is never a reciprocal and never zero; `zero_point` lies in `[qmin, qmax]` of the
/// spec it was made for, so real 0.0 is represented exactly.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    /// Real value of one integer step.
    pub scale: f32,
    /// The integer that represents real 0.0.
    pub zero_point: i32,
}

impl QParams {
    /// The real range the grid covers, `[scale * (qmin - zp), scale * (qmax - zp)]`, computed in
    /// `f64` and saturated to `+-f32::MAX` (a grid whose ends lie past it).
    pub fn range(&self, spec: &QuantSpec) -> (f32, f32) {
        let end = |q: i32| {
            let steps = i64::from(q) - i64::from(self.zero_point);
            let real = steps as f64 * f64::from(self.scale);
            real.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32
        };
        (end(spec.qmin()), end(spec.qmax()))
    }
}

/// Chooses the quantization parameters for an observed range `[min, max]`.
///
/// - The range is first widened to contain 0 (`min <= 0 <= max`); non-finite bounds count as 0.
/// - Asymmetric: `scale = (max - min) / (qmax - qmin)` and
///   `zero_point = qmin - round(min / scale)`, clamped to the grid (TF calls this "nudging":
///   the range moves slightly so that 0.0 falls on an integer).
/// - Symmetric: the range becomes `[-m, m]` with `m = max(-min, max)`, `scale = 2m / (qmax - qmin)`
///   and the zero point is 0 on a signed grid, `(qmin + qmax + 1) / 2` on an unsigned one.
/// - `scale` is at least [`MIN_SCALE`]: a constant or all-zero tensor does not divide by zero.
///
/// The rounding of the zero point follows [`RoundingMode`]: half to even, or half away from
/// zero for TF's `Nudge`.
///
/// ```
/// use burn_qat_core::{QuantSpec, RoundingMode, qparams_from_range};
///
/// // TF's "nudged up" case: [-0.125, 63.625] on an 8-bit unsigned grid.
/// let tf = QuantSpec::uint8_act_per_tensor_asymmetric().with_rounding(RoundingMode::TfHalfUp);
/// let qp = qparams_from_range(-0.125, 63.625, &tf);
/// assert_eq!((qp.scale, qp.zero_point), (0.25, 1));
/// assert_eq!(qp.range(&tf), (-0.25, 63.5));
///
/// // Symmetric narrow int8 weights: scale = max|w| / 127.
/// let w = QuantSpec::int8_weight_per_tensor_symmetric();
/// let qp = qparams_from_range(-0.5, 1.27, &w);
/// assert_eq!((qp.scale, qp.zero_point), (0.01, 0));
///
/// // An all-zero tensor.
/// assert_eq!(qparams_from_range(0.0, 0.0, &w).scale, burn_qat_core::MIN_SCALE);
/// ```
pub fn qparams_from_range(min: f32, max: f32, spec: &QuantSpec) -> QParams {
    let min = if min.is_finite() { min.min(0.0) } else { 0.0 };
    let max = if max.is_finite() { max.max(0.0) } else { 0.0 };
    let (qmin, qmax) = (spec.qmin(), spec.qmax());
    let steps = (qmax - qmin) as f32;
    if spec.symmetric {
        let m = (-min).max(max);
        // m / (steps / 2) is 2m / steps exactly, without overflow above f32::MAX / 2.
        let scale = clamp_scale(m / (steps / 2.0));
        let zero_point = spec.symmetric_zero_point();
        return QParams { scale, zero_point };
    }
    let wide = max - min;
    // A range wider than f32::MAX: max / steps - min / steps is the representable step.
    let scale = clamp_scale(if wide.is_finite() {
        wide / steps
    } else {
        max / steps - min / steps
    });
    let ratio = min / scale;
    let rounded = match spec.rounding {
        RoundingMode::HalfToEven => round_half_even(ratio),
        RoundingMode::TfHalfUp => -round_half_away(-ratio),
    };
    // qmin - rounded, computed in f32 and clamped before the cast (no overflow for tiny scales).
    let zero_point = (qmin as f32 - rounded).clamp(qmin as f32, qmax as f32) as i32;
    QParams { scale, zero_point }
}

fn clamp_scale(scale: f32) -> f32 {
    if scale.is_finite() {
        scale.max(MIN_SCALE)
    } else {
        f32::MAX
    }
}

/// One step of an exponential moving average, `old * decay + new * (1 - decay)`, as tfmot's
/// `MovingAverageQuantizer` (decay 0.999) and PyTorch's `MovingAverageMinMaxObserver`
/// (`averaging_constant = 1 - decay`) do.
///
/// ```
/// assert_eq!(burn_qat_core::ema(1.0, 3.0, 0.75), 1.5);
/// ```
pub fn ema(old: f32, new: f32, decay: f32) -> f32 {
    old * decay + new * (1.0 - decay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tf() -> QuantSpec {
        QuantSpec::uint8_act_per_tensor_asymmetric().with_rounding(RoundingMode::TfHalfUp)
    }

    /// TF `fake_quant_ops_test.py` (`testWithArgs*`): (bits, narrow, min, max) ->
    /// (nudged min, nudged max, step).
    #[test]
    fn tf_nudging_golden_cases() {
        #[rustfmt::skip]
        let cases: &[(u32, bool, f32, f32, f32, f32, f32)] = &[
            (8, false, 0.0, 255.0 / 4.0, 0.0, 63.75, 0.25),
            (8, false, -0.1, 63.65, 0.0, 63.75, 0.25),          // nudged down
            (8, false, -0.125, 63.625, -0.25, 63.5, 0.25),      // nudged up
            (8, false, -63.65, 0.1, -63.75, 0.0, 0.25),         // zero point is 255
            (8, true, 0.0, 127.0, 0.0, 127.0, 0.5),
            (8, true, -0.1, 126.9, 0.0, 127.0, 0.5),
            (8, true, -0.26, 126.74, -0.5, 126.5, 0.5),
            (8, true, -126.9, 0.1, -127.0, 0.0, 0.5),
            (4, false, 0.0, 7.5, 0.0, 7.5, 0.5),
            (4, false, -0.1, 7.4, 0.0, 7.5, 0.5),
            (4, false, -0.26, 7.24, -0.5, 7.0, 0.5),
            (4, false, -7.4, 0.1, -7.5, 0.0, 0.5),
            (4, true, 0.0, 7.0, 0.0, 7.0, 0.5),
            (4, true, -0.1, 6.9, 0.0, 7.0, 0.5),
            (4, true, -0.26, 6.74, -0.5, 6.5, 0.5),
            (4, true, -6.9, 0.1, -7.0, 0.0, 0.5),
        ];
        for &(bits, narrow, min, max, nmin, nmax, step) in cases {
            let spec = tf().with_bits(bits).with_narrow_range(narrow);
            let qp = qparams_from_range(min, max, &spec);
            let (lo, hi) = qp.range(&spec);
            assert!(
                (qp.scale - step).abs() < 1e-6,
                "{bits} {narrow} [{min},{max}]: scale {}",
                qp.scale
            );
            assert!(
                (lo - nmin).abs() < 1e-4 && (hi - nmax).abs() < 1e-4,
                "{bits} bits narrow={narrow} [{min}, {max}]: got [{lo}, {hi}], TF gives [{nmin}, {nmax}]"
            );
        }
    }

    #[test]
    fn half_even_zero_point_differs_from_tf_on_ties() {
        // min/scale = -0.5 exactly: TF nudges the zero point up to 1, half-to-even keeps 0.
        let spec = QuantSpec::uint8_act_per_tensor_asymmetric();
        assert_eq!(qparams_from_range(-0.125, 63.625, &spec).zero_point, 0);
        assert_eq!(qparams_from_range(-0.125, 63.625, &tf()).zero_point, 1);
        // -1.5 -> -2 under half-to-even: zero point 2.
        assert_eq!(qparams_from_range(-0.375, 63.375, &spec).zero_point, 2);
    }

    #[test]
    fn symmetric_grids() {
        let s = QuantSpec::int8_weight_per_tensor_symmetric();
        assert_eq!(
            qparams_from_range(-2.54, 1.0, &s),
            QParams {
                scale: 0.02,
                zero_point: 0
            }
        );
        let full = s.with_narrow_range(false);
        assert_eq!(
            qparams_from_range(-1.0, 2.55, &full),
            QParams {
                scale: 0.02,
                zero_point: 0
            }
        );
        let u = s.with_signed(false);
        assert_eq!(qparams_from_range(-1.0, 1.0, &u).zero_point, 128);
        assert_eq!(
            qparams_from_range(-1.0, 1.0, &u.with_narrow_range(false)).zero_point,
            128
        );
        let u4 = u.with_bits(4).with_narrow_range(false);
        assert_eq!(qparams_from_range(-1.0, 1.0, &u4).zero_point, 8);
    }

    #[test]
    fn degenerate_ranges_do_not_divide_by_zero() {
        for spec in [
            QuantSpec::default(),
            QuantSpec::int8_weight_per_tensor_symmetric(),
        ] {
            for (lo, hi) in [
                (0.0, 0.0),
                (3.0, 3.0),
                (-2.0, -2.0),
                (f32::NAN, f32::NAN),
                (f32::NEG_INFINITY, f32::INFINITY),
                (1e-30, 1e-30),
            ] {
                let qp = qparams_from_range(lo, hi, &spec);
                assert!(
                    qp.scale.is_finite() && qp.scale >= MIN_SCALE,
                    "{lo} {hi}: {qp:?}"
                );
                assert!((spec.qmin()..=spec.qmax()).contains(&qp.zero_point));
            }
        }
        // A constant positive tensor: range [0, 3].
        let qp = qparams_from_range(3.0, 3.0, &QuantSpec::default());
        assert_eq!((qp.scale, qp.zero_point), (3.0 / 255.0, -128));
    }

    /// Specs that skipped `validate` (bits clamped to 31 by `qmin`/`qmax`) do not overflow: the
    /// unsigned symmetric grid's middle was `(qmin + qmax + 1) / 2` in i32.
    #[test]
    fn unvalidated_wide_specs_do_not_overflow() {
        for bits in [17, 30, 31, 32, 99] {
            for signed in [false, true] {
                for symmetric in [false, true] {
                    let spec = QuantSpec::default()
                        .with_bits(bits)
                        .with_signed(signed)
                        .with_symmetric(symmetric);
                    let qp = qparams_from_range(-1.0, 3.0, &spec);
                    assert!(qp.scale.is_finite() && qp.scale > 0.0, "{spec}: {qp:?}");
                    assert!(
                        (spec.qmin()..=spec.qmax()).contains(&qp.zero_point),
                        "{spec}: {qp:?}"
                    );
                }
            }
        }
        let u31 = QuantSpec::default()
            .with_bits(31)
            .with_signed(false)
            .with_symmetric(true);
        assert_eq!(qparams_from_range(-1.0, 1.0, &u31).zero_point, 1 << 30);
    }

    #[test]
    fn range_saturates_past_f32_max() {
        let spec = QuantSpec::default().with_signed(false).with_bits(2);
        let qp = qparams_from_range(-f32::MAX, f32::MAX, &spec);
        let (lo, hi) = qp.range(&spec);
        assert!(lo.is_finite() && hi.is_finite(), "{qp:?}: [{lo}, {hi}]");
        let wild = QParams {
            scale: f32::MAX,
            zero_point: i32::MIN,
        };
        assert_eq!(wild.range(&spec), (f32::MAX, f32::MAX));
    }

    #[test]
    fn two_and_sixteen_bits() {
        let s2 = QuantSpec::default().with_bits(2);
        let qp = qparams_from_range(-1.0, 2.0, &s2);
        assert_eq!((qp.scale, qp.zero_point), (1.0, -1));
        let s16 = QuantSpec::default().with_bits(16);
        let qp = qparams_from_range(-1.0, 1.0, &s16);
        assert_eq!(qp.scale, 2.0 / 65535.0);
        // -32768 - round(-1 / scale): -1 / scale is -32767.5 up to f32 rounding of the scale.
        assert!(qp.zero_point == 0 || qp.zero_point == -1, "{qp:?}");
    }
}
