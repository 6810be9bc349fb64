//! A [`QuantSpec`] as six floats, so quantizers can record their spec with the model and tools
//! (summaries, converters) can read it back from any module tree.

use burn_qat_core::{Granularity, QuantSpec, RoundingMode};

/// `[bits, signed, symmetric, narrow_range, axis or -1, rounding (0 half-even, 1 TF half-up)]`.
///
/// ```
/// use burn_qat_core::QuantSpec;
/// use burn_qat_nn::{decode_spec, encode_spec};
///
/// let spec = QuantSpec::int4_weight_per_channel_symmetric(1);
/// assert_eq!(encode_spec(&spec), [4.0, 1.0, 1.0, 1.0, 1.0, 0.0]);
/// assert_eq!(decode_spec(&encode_spec(&spec)), Some(spec));
/// ```
pub fn encode_spec(spec: &QuantSpec) -> [f32; 6] {
    [
        spec.bits as f32,
        f32::from(spec.signed),
        f32::from(spec.symmetric),
        f32::from(spec.narrow_range),
        spec.axis().map_or(-1.0, |a| a as f32),
        match spec.rounding {
            RoundingMode::HalfToEven => 0.0,
            RoundingMode::TfHalfUp => 1.0,
        },
    ]
}

/// The inverse of [`encode_spec`]; `None` if `code` is not a valid encoding.
pub fn decode_spec(code: &[f32]) -> Option<QuantSpec> {
    let [bits, signed, symmetric, narrow, axis, rounding] = <[f32; 6]>::try_from(code).ok()?;
    let spec = QuantSpec {
        bits: bits as u32,
        signed: signed > 0.5,
        symmetric: symmetric > 0.5,
        narrow_range: narrow > 0.5,
        granularity: if axis < 0.0 {
            Granularity::PerTensor
        } else {
            Granularity::PerChannel {
                axis: axis as usize,
            }
        },
        rounding: if rounding > 0.5 {
            RoundingMode::TfHalfUp
        } else {
            RoundingMode::HalfToEven
        },
    };
    spec.validate().ok()?;
    Some(spec)
}
