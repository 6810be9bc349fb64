use serde::{Deserialize, Serialize};

use crate::QatError;

/// Whether one pair of quantization parameters covers the whole tensor or one pair per channel.
///
/// The axis is explicit because Burn's layouts differ from Keras': `Linear.weight` is
/// `[d_input, d_output]`, so its output channel is **axis 1**; `Conv1d/Conv2d.weight` is
/// `[channels_out, channels_in / groups, k...]`, so its output channel is **axis 0**.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Granularity {
    /// One scale and zero point for the whole tensor.
    #[default]
    PerTensor,
    /// One scale and zero point per index along `axis`.
    PerChannel {
        /// The channel axis.
        axis: usize,
    },
}

/// How a real value divided by the scale is rounded to the integer grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum RoundingMode {
    /// Round half to even (`2.5 -> 2`, `3.5 -> 4`), as ONNX `QuantizeLinear`, PyTorch and
    /// Burn's `Tensor::round` do. The zero point is chosen with the same rounding.
    #[default]
    HalfToEven,
    /// TensorFlow's `FakeQuantWithMinMaxVars`: values round half up (`floor(x + 0.5)`) and the
    /// zero point is "nudged" with `std::round` (half away from zero).
    TfHalfUp,
}

/// The integer grid a tensor is fake-quantized to.
///
/// A spec is plain data (it serializes with serde, so it can sit inside a Burn `Config`);
/// [`validate`](QuantSpec::validate) checks it and every constructor of a stateful quantizer
/// calls it.
///
/// | field | meaning |
/// |---|---|
/// | `bits` | 2..=16 |
/// | `signed` | grid `[-2^(b-1), 2^(b-1) - 1]` if true, `[0, 2^b - 1]` if false |
/// | `narrow_range` | drop the lowest value (`[-127, 127]` instead of `[-128, 127]`) |
/// | `symmetric` | range `[-m, m]` with `m = max(|min|, |max|)`; zero point 0 (signed) or the grid middle (unsigned) |
/// | `granularity` | per tensor or per channel along an axis |
/// | `rounding` | half to even (default) or TensorFlow's half up |
///
/// ```
/// use burn_qat_core::{Granularity, QuantSpec};
///
/// let w = QuantSpec::int8_weight_per_channel_symmetric(0);
/// assert_eq!((w.qmin(), w.qmax()), (-127, 127));
/// assert_eq!(w.granularity, Granularity::PerChannel { axis: 0 });
///
/// let a = QuantSpec::int8_act_per_tensor_asymmetric();
/// assert_eq!((a.qmin(), a.qmax()), (-128, 127));
///
/// let u4 = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(4).with_signed(false);
/// assert_eq!((u4.qmin(), u4.qmax()), (0, 15));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantSpec {
    /// Bit width, 2..=16.
    pub bits: u32,
    /// Signed (`i8`-like) or unsigned (`u8`-like) integer grid.
    pub signed: bool,
    /// Symmetric range around zero.
    pub symmetric: bool,
    /// Leave out the most negative grid value.
    pub narrow_range: bool,
    /// Per tensor or per channel.
    pub granularity: Granularity,
    /// Rounding of values and of the zero point.
    pub rounding: RoundingMode,
}

/// `8-bit signed symmetric narrow per-channel(axis 0)`: what summaries and module displays
/// print.
///
/// ```
/// use burn_qat_core::QuantSpec;
///
/// assert_eq!(
///     QuantSpec::int8_act_per_tensor_asymmetric().to_string(),
///     "8-bit signed asymmetric per-tensor"
/// );
/// ```
impl std::fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}-bit {} {}{}",
            self.bits,
            if self.signed { "signed" } else { "unsigned" },
            if self.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            if self.narrow_range { " narrow" } else { "" },
        )?;
        match self.axis() {
            Some(a) => write!(f, " per-channel(axis {a})")?,
            None => write!(f, " per-tensor")?,
        }
        if self.rounding == RoundingMode::TfHalfUp {
            write!(f, " tf-rounding")?;
        }
        Ok(())
    }
}

impl Default for QuantSpec {
    fn default() -> Self {
        Self::int8_act_per_tensor_asymmetric()
    }
}

impl QuantSpec {
    /// Smallest bit width accepted.
    pub const MIN_BITS: u32 = 2;
    /// Largest bit width accepted.
    pub const MAX_BITS: u32 = 16;

    /// 8-bit signed weights, symmetric, narrow range `[-127, 127]`, one scale per output
    /// channel along `axis` (0 for convolutions, 1 for Burn's `Linear`). tfmot's and PyTorch's
    /// default for weights.
    pub fn int8_weight_per_channel_symmetric(axis: usize) -> Self {
        Self::weight_per_channel_symmetric(8, axis)
    }

    /// 8-bit signed weights, symmetric, narrow range, one scale for the whole tensor.
    pub fn int8_weight_per_tensor_symmetric() -> Self {
        Self {
            bits: 8,
            signed: true,
            symmetric: true,
            narrow_range: true,
            granularity: Granularity::PerTensor,
            rounding: RoundingMode::HalfToEven,
        }
    }

    /// `bits`-bit signed symmetric narrow-range weights, per channel along `axis`
    /// (4 bits: `[-7, 7]`).
    pub fn weight_per_channel_symmetric(bits: u32, axis: usize) -> Self {
        Self::int8_weight_per_tensor_symmetric()
            .with_bits(bits)
            .with_granularity(Granularity::PerChannel { axis })
    }

    /// 4-bit signed weights, symmetric, narrow range `[-7, 7]`, per channel along `axis`.
    pub fn int4_weight_per_channel_symmetric(axis: usize) -> Self {
        Self::weight_per_channel_symmetric(4, axis)
    }

    /// 8-bit signed activations `[-128, 127]`, asymmetric (with a zero point), one scale for the
    /// whole tensor: tfmot's and ONNX's default for activations.
    pub fn int8_act_per_tensor_asymmetric() -> Self {
        Self {
            bits: 8,
            signed: true,
            symmetric: false,
            narrow_range: false,
            granularity: Granularity::PerTensor,
            rounding: RoundingMode::HalfToEven,
        }
    }

    /// 8-bit unsigned activations `[0, 255]`, asymmetric, per tensor (PyTorch's `quint8`).
    pub fn uint8_act_per_tensor_asymmetric() -> Self {
        Self::int8_act_per_tensor_asymmetric().with_signed(false)
    }

    /// `bits`-bit signed asymmetric activations, per tensor.
    pub fn act_per_tensor_asymmetric(bits: u32) -> Self {
        Self::int8_act_per_tensor_asymmetric().with_bits(bits)
    }

    /// Sets the bit width.
    pub fn with_bits(mut self, bits: u32) -> Self {
        self.bits = bits;
        self
    }
    /// Sets signedness of the grid.
    pub fn with_signed(mut self, signed: bool) -> Self {
        self.signed = signed;
        self
    }
    /// Sets symmetric or asymmetric ranges.
    pub fn with_symmetric(mut self, symmetric: bool) -> Self {
        self.symmetric = symmetric;
        self
    }
    /// Sets narrow range.
    pub fn with_narrow_range(mut self, narrow_range: bool) -> Self {
        self.narrow_range = narrow_range;
        self
    }
    /// Sets the granularity.
    pub fn with_granularity(mut self, granularity: Granularity) -> Self {
        self.granularity = granularity;
        self
    }
    /// Sets the rounding mode.
    pub fn with_rounding(mut self, rounding: RoundingMode) -> Self {
        self.rounding = rounding;
        self
    }

    /// The per-channel axis, if any.
    pub fn axis(&self) -> Option<usize> {
        match self.granularity {
            Granularity::PerTensor => None,
            Granularity::PerChannel { axis } => Some(axis),
        }
    }

    /// Smallest integer of the grid.
    ///
    /// Defined for any `bits` (clamped to 1..=31 so it cannot overflow); only meaningful for a
    /// spec that passes [`validate`](Self::validate).
    pub fn qmin(&self) -> i32 {
        let bits = self.bits.clamp(1, 31);
        let base = if self.signed {
            -(1i64 << (bits - 1))
        } else {
            0
        };
        (base + i64::from(self.narrow_range)) as i32
    }

    /// Largest integer of the grid.
    pub fn qmax(&self) -> i32 {
        let bits = self.bits.clamp(1, 31);
        let top = if self.signed {
            (1i64 << (bits - 1)) - 1
        } else {
            (1i64 << bits) - 1
        };
        top as i32
    }

    /// The zero point of a symmetric range: 0 on a signed grid, the grid's middle
    /// `(qmin + qmax + 1) / 2` on an unsigned one (computed in `i64`, so no `bits` overflows).
    ///
    /// ```
    /// use burn_qat_core::QuantSpec;
    ///
    /// let u8 = QuantSpec::int8_weight_per_tensor_symmetric().with_signed(false);
    /// assert_eq!(u8.symmetric_zero_point(), 128);
    /// assert_eq!(u8.with_signed(true).symmetric_zero_point(), 0);
    /// ```
    pub fn symmetric_zero_point(&self) -> i32 {
        if self.signed {
            0
        } else {
            ((i64::from(self.qmin()) + i64::from(self.qmax()) + 1) / 2) as i32
        }
    }

    /// Number of steps of the grid, `qmax - qmin`.
    pub fn steps(&self) -> i32 {
        self.qmax() - self.qmin()
    }

    /// Checks every field; the error names the field, the value and what is allowed.
    ///
    /// ```
    /// use burn_qat_core::QuantSpec;
    ///
    /// assert!(QuantSpec::int8_act_per_tensor_asymmetric().validate().is_ok());
    /// let err = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(17).validate().unwrap_err();
    /// assert!(err.to_string().contains("`bits` is 17, allowed: 2..=16"));
    /// ```
    pub fn validate(&self) -> Result<(), QatError> {
        if !(Self::MIN_BITS..=Self::MAX_BITS).contains(&self.bits) {
            return Err(QatError::InvalidSpec {
                field: "bits",
                value: self.bits.to_string(),
                allowed: format!("{}..={}", Self::MIN_BITS, Self::MAX_BITS),
            });
        }
        Ok(())
    }

    /// Checks the spec against a tensor of rank `rank` (the per-channel axis must exist).
    pub fn validate_for_rank(&self, rank: usize) -> Result<(), QatError> {
        self.validate()?;
        if let Some(axis) = self.axis()
            && axis >= rank
        {
            return Err(QatError::AxisOutOfRange {
                axis,
                rank,
                context: String::new(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids() {
        let s = QuantSpec::int8_act_per_tensor_asymmetric();
        assert_eq!((s.qmin(), s.qmax()), (-128, 127));
        assert_eq!((s.with_narrow_range(true).qmin()), -127);
        assert_eq!(
            (s.with_signed(false).qmin(), s.with_signed(false).qmax()),
            (0, 255)
        );
        assert_eq!((s.with_bits(2).qmin(), s.with_bits(2).qmax()), (-2, 1));
        assert_eq!(
            (s.with_bits(16).qmin(), s.with_bits(16).qmax()),
            (-32768, 32767)
        );
        let u16 = s.with_bits(16).with_signed(false);
        assert_eq!((u16.qmin(), u16.qmax()), (0, 65535));
        // Out-of-range bits never overflow.
        assert_eq!(s.with_bits(0).qmax(), 0);
        assert_eq!(s.with_bits(99).qmax(), (1 << 30) - 1);
    }

    #[test]
    fn bad_specs_name_field_value_and_allowed() {
        for bits in [0u32, 1, 17, 32] {
            let err = QuantSpec::default().with_bits(bits).validate().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid quantization spec: `bits` is {bits}, allowed: 2..=16")
            );
        }
        let err = QuantSpec::int8_weight_per_channel_symmetric(4)
            .validate_for_rank(2)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "per-channel axis 4 does not exist on a tensor of rank 2: use an axis in 0..2"
        );
    }

    #[test]
    fn serde_round_trip() {
        let s =
            QuantSpec::int4_weight_per_channel_symmetric(1).with_rounding(RoundingMode::TfHalfUp);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<QuantSpec>(&json).unwrap(), s);
    }
}
