//! [`Grid`]: one quantized tensor's integer grid, as every layer above core writes it.

use crate::{QParams, QuantSpec, reference};

/// The integer grid of a per-tensor quantized activation in an 8-bit container:
/// `real = scale * (q - zero_point)`, `q` in `[qmin, qmax]`. Sub-8-bit grids keep their
/// narrower `[qmin, qmax]`; unsigned grids are stored shifted down by 128 (zero point
/// included), as int8 runtimes store uint8 tensors as int8. The same type is used by the
/// integer model, its file and the ONNX writer.
///
/// ```
/// use burn_qat_core::{Grid, QParams, QuantSpec};
///
/// let spec = QuantSpec::int8_act_per_tensor_asymmetric();
/// let g = Grid::from_spec(&spec, QParams { scale: 0.5, zero_point: -10 });
/// assert_eq!((g.qmin, g.qmax, g.bits()), (-128, 127, 8));
/// assert_eq!(g.dequantize(-6), 2.0);
/// assert_eq!(g.quantize(2.2), -6);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Grid {
    /// Scale.
    pub scale: f32,
    /// Zero point (in the container's range).
    pub zero_point: i32,
    /// Smallest integer.
    pub qmin: i32,
    /// Largest integer.
    pub qmax: i32,
}

impl Grid {
    /// The container form of a per-tensor grid with quantization parameters `qp` from `spec`
    /// (unsigned grids move down by 128).
    pub fn from_spec(spec: &QuantSpec, qp: QParams) -> Self {
        let shift = if spec.signed { 0 } else { 128 };
        Self {
            scale: qp.scale,
            zero_point: qp.zero_point - shift,
            qmin: spec.qmin() - shift,
            qmax: spec.qmax() - shift,
        }
    }

    /// Bits of the grid: `ceil(log2(qmax - qmin + 1))` (8 for a full int8 grid).
    pub fn bits(&self) -> u32 {
        let levels = (self.qmax - self.qmin + 1).max(1) as u32;
        levels.next_power_of_two().trailing_zeros()
    }

    /// `scale` and `zero_point`.
    pub fn qparams(&self) -> QParams {
        QParams {
            scale: self.scale,
            zero_point: self.zero_point,
        }
    }

    /// `clamp(round_half_even(x / scale) + zero_point, qmin, qmax)` (NaN to the zero point).
    pub fn quantize(&self, x: f32) -> i32 {
        let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(16);
        reference::quantize(x, self.qparams(), &spec).clamp(self.qmin, self.qmax)
    }

    /// `scale * (q - zero_point)`.
    pub fn dequantize(&self, q: i32) -> f32 {
        reference::dequantize(q, self.qparams())
    }

    /// Whether the grid is usable: positive finite scale, `qmin <= zero_point <= qmax` within
    /// an 8-bit container (the zero point may lie outside for ranges that exclude zero, so
    /// only the bounds are checked).
    pub fn is_valid(&self) -> bool {
        self.scale.is_finite()
            && self.scale > 0.0
            && -128 <= self.qmin
            && self.qmin < self.qmax
            && self.qmax <= 127
            && (self.qmin..=self.qmax).contains(&self.zero_point)
    }
}
