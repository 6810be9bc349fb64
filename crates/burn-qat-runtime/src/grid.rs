//! [`Grid`]: one quantized tensor's integer grid, as the integer model, its file and the ONNX
//! writer store it.

/// The integer grid of a per-tensor quantized activation in an 8-bit container:
/// `real = scale * (q - zero_point)`, `q` in `[qmin, qmax]`. Sub-8-bit grids keep their
/// narrower `[qmin, qmax]`; unsigned grids are stored shifted down by 128 (zero point
/// included), as int8 runtimes store uint8 tensors as int8. The same type is used by the
/// integer model, its file and the ONNX writer.
///
/// ```
/// use burn_qat_runtime::Grid;
///
/// let g = Grid { scale: 0.5, zero_point: -10, qmin: -128, qmax: 127 };
/// assert_eq!(g.bits(), 8);
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
    /// Bits of the grid: `ceil(log2(qmax - qmin + 1))` (8 for a full int8 grid); 0 for an
    /// invalid grid whose `qmax` lies below `qmin`.
    pub fn bits(&self) -> u32 {
        let levels = (i64::from(self.qmax) - i64::from(self.qmin) + 1).max(1) as u64;
        levels.next_power_of_two().trailing_zeros()
    }

    /// `clamp(round_half_even(x / scale) + zero_point, qmin, qmax)` (NaN to the zero point):
    /// the same integer as `burn_qat_core::reference::quantize` on this grid.
    pub fn quantize(&self, x: f32) -> i32 {
        let q = (x / self.scale).round_ties_even() + self.zero_point as f32;
        if q.is_nan() {
            return self.zero_point;
        }
        q.clamp(self.qmin as f32, self.qmax as f32) as i32
    }

    /// `scale * (q - zero_point)`, saturated at `+-f32::MAX`.
    pub fn dequantize(&self, q: i32) -> f32 {
        // In i64: no overflow for any pair of i32.
        ((i64::from(q) - i64::from(self.zero_point)) as f32 * self.scale).clamp(-f32::MAX, f32::MAX)
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

/// One dimension of a node's shape: fixed, or a multiple of the batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// `k * batch`.
    Batch(usize),
}

impl Dim {
    /// The size at batch size `batch`.
    pub fn at(self, batch: usize) -> usize {
        match self {
            Dim::Fixed(n) => n,
            Dim::Batch(k) => k * batch,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Batch(1) => write!(f, "N"),
            Dim::Batch(k) => write!(f, "{k}N"),
        }
    }
}
