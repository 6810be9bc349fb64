//! The integer model as plain data: a DAG of integer ops (int8 weights, int32 biases, 8-bit
//! activations, fixed-point requantization), each node with its explicit inputs, its shape
//! (batch symbolic) and the grid of its output. Running it is [`IntegerModel::forward`]; its invariants
//! are [`IntegerModel::validate`].

pub use crate::grid::{Dim, Grid};

use crate::requant::FixedMultiplier;

/// What a Conv/Linear node produces.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Output {
    /// 8-bit activations: `clamp(requant[c](acc) + zero_point, lo, hi)`; the clamp is the
    /// fused activation (ReLU: `lo = zero_point`).
    Quantized {
        /// The output's grid.
        grid: Grid,
        /// Per output channel, `s_in * s_w[c] / s_out` in fixed point.
        requant: Vec<FixedMultiplier>,
        /// Lower clamp.
        lo: i32,
        /// Upper clamp.
        hi: i32,
    },
    /// Float output (a last layer whose output is not quantized): `acc * scale[c]`, then the
    /// fused activation's bounds.
    Float {
        /// Per output channel, `s_in * s_w[c]`.
        scale: Vec<f32>,
        /// Lower bound of the fused activation (`-inf` for none).
        lo: f32,
        /// Upper bound of the fused activation (`inf` for none).
        hi: f32,
    },
}

impl Output {
    /// The output's grid, `None` for a float output.
    pub fn grid(&self) -> Option<Grid> {
        match self {
            Output::Quantized { grid, .. } => Some(*grid),
            Output::Float { .. } => None,
        }
    }

    /// Number of per-channel multipliers or scales.
    pub fn channels(&self) -> usize {
        match self {
            Output::Quantized { requant, .. } => requant.len(),
            Output::Float { scale, .. } => scale.len(),
        }
    }
}

/// An integer 2-D convolution (NCHW); a 1-D convolution is one with `kernel[0] == 1` run on
/// `[n, c, length]` inputs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntConv2d {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Groups (`groups == in_channels == out_channels`: depthwise).
    pub groups: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[dh, dw]`.
    pub dilation: [usize; 2],
    /// `[top, bottom, left, right]`.
    pub padding: [usize; 4],
    /// `[out, in / groups, kh, kw]`, symmetric (zero point 0).
    pub weight: Vec<i8>,
    /// Bits of the weight grid (values in `[-(2^(b-1) - 1), 2^(b-1) - 1]`), stored in `i8`.
    pub weight_bits: u32,
    /// Per output channel weight scale.
    pub weight_scale: Vec<f32>,
    /// Per output channel, scale `s_in * s_w[c]`, zero point 0.
    pub bias: Vec<i32>,
    /// Input grid.
    pub input: Grid,
    /// Output.
    pub output: Output,
}

impl IntConv2d {
    /// Whether this is a depthwise convolution (one input channel per group, one output
    /// channel per group).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }
}

/// An integer fully connected layer on the last axis, weight `[in, out]` as Burn's `Linear`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntLinear {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// `[in, out]`, symmetric.
    pub weight: Vec<i8>,
    /// Bits of the weight grid, stored in `i8`.
    pub weight_bits: u32,
    /// Per output feature weight scale.
    pub weight_scale: Vec<f32>,
    /// Scale `s_in * s_w[c]`.
    pub bias: Vec<i32>,
    /// Input grid.
    pub input: Grid,
    /// Output.
    pub output: Output,
}

/// Integer addition (or subtraction, with `mb < 0`) of two quantized tensors into a third grid,
/// with a fused clamp: `q = round((qa - zpa) * ma / 2^shift + (qb - zpb) * mb / 2^shift) + zp_out`,
/// where `ma = s_a / s_out * 2^shift` (and `mb`) are integers; with `shift = 40` the rounding
/// equals the fake-quant model's except on exact ties. Inputs broadcast as NumPy does.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntAdd {
    /// Grid of the first input.
    pub a: Grid,
    /// Grid of the second input.
    pub b: Grid,
    /// Output grid.
    pub out: Grid,
    /// `s_a / s_out` in fixed point.
    pub ma: i64,
    /// `± s_b / s_out` in fixed point (negative for a subtraction).
    pub mb: i64,
    /// Fixed-point shift.
    pub shift: u32,
    /// Lower clamp (the fused activation).
    pub lo: i32,
    /// Upper clamp.
    pub hi: i32,
}

impl IntAdd {
    /// One output value from one value of each input.
    #[inline]
    pub fn apply(&self, x: i8, y: i8) -> i8 {
        let t = (x as i128 - self.a.zero_point as i128) * self.ma as i128
            + (y as i128 - self.b.zero_point as i128) * self.mb as i128;
        let r = crate::requant::round_shift_i128(t, self.shift);
        ((r as i64).saturating_add(self.out.zero_point as i64))
            .clamp(self.lo as i64, self.hi as i64) as i8
    }
}

/// Integer multiplication of two quantized tensors:
/// `q = clamp(round((qa - zpa) * (qb - zpb) * s_a * s_b / s_out) + zp_out, lo, hi)`, inputs
/// broadcast as NumPy does.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntMul {
    /// Grid of the first input.
    pub a: Grid,
    /// Grid of the second input.
    pub b: Grid,
    /// Output grid.
    pub out: Grid,
    /// `s_a * s_b / s_out` in fixed point.
    pub multiplier: FixedMultiplier,
    /// Lower clamp.
    pub lo: i32,
    /// Upper clamp.
    pub hi: i32,
}

impl IntMul {
    /// One output value from one value of each input.
    #[inline]
    pub fn apply(&self, x: i8, y: i8) -> i8 {
        let p = (x as i32 - self.a.zero_point) * (y as i32 - self.b.zero_point);
        (self.multiplier.apply(p).saturating_add(self.out.zero_point)).clamp(self.lo, self.hi) as i8
    }
}

/// Integer matrix product of two quantized tensors (attention's `Q Kᵀ` and `attn V`): per
/// matrix of the leading axes, `q[m, n] = clamp(round(sum_k (qa[m, k] - zpa) * (qb[k, n] - zpb)
/// * s_a * s_b / s_out) + zp_out, lo, hi)`, the sum exact in `i32` (inner length at most
/// [`MAX_INNER`](IntMatMul::MAX_INNER)); `[.., M, K] x [.., K, N] -> [.., M, N]`, leading axes
/// equal or 1 in either (broadcast as Burn's `matmul`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntMatMul {
    /// Grid of the left input.
    pub a: Grid,
    /// Grid of the right input.
    pub b: Grid,
    /// Output grid.
    pub out: Grid,
    /// `s_a * s_b / s_out` in fixed point.
    pub multiplier: FixedMultiplier,
    /// Lower clamp.
    pub lo: i32,
    /// Upper clamp.
    pub hi: i32,
}

impl IntMatMul {
    /// The longest inner axis: `K * 255 * 255` stays within `i32`.
    pub const MAX_INNER: usize = 32_768;

    /// One output value from its exact integer sum.
    #[inline]
    pub fn finish(&self, acc: i32) -> i8 {
        (self
            .multiplier
            .apply(acc)
            .saturating_add(self.out.zero_point))
        .clamp(self.lo, self.hi) as i8
    }
}

/// A 256-entry lookup table on 8-bit values: `out = table[q + 128]`. Elementwise float
/// functions (GELU, sigmoid, tanh, SiLU, hard-swish, exp, scalar arithmetic, requantization
/// to another grid) are tables built from the float function on the 256 input values, as int8
/// runtimes do; `function` names it (for plans and the ONNX writer).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Lut {
    /// What the table computes, e.g. `Gelu` or `Requantize`.
    pub function: String,
    /// Input grid.
    pub input: Grid,
    /// Output grid.
    pub output: Grid,
    /// 256 values, indexed by `q + 128`.
    pub table: Vec<i8>,
}

impl Lut {
    /// The table entry of `q`.
    #[inline]
    pub fn apply(&self, q: i8) -> i8 {
        self.table[(q as i32 + 128) as usize]
    }
}

/// Window geometry of a pooling op on `[n, c, h, w]` (a 1-D pool has height 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// `[sh, sw]`.
    pub stride: [usize; 2],
    /// `[top, bottom, left, right]`.
    pub padding: [usize; 4],
    /// `[dh, dw]`.
    pub dilation: [usize; 2],
}

/// One integer op.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum IntOp {
    /// The model's float input (node 0, no inputs).
    Input,
    /// Float to 8-bit on `grid`, rounding half to even.
    Quantize(Grid),
    /// Integer convolution.
    Conv2d(IntConv2d),
    /// Integer fully connected layer on the last axis.
    Linear(IntLinear),
    /// Integer add or subtract with a fused clamp.
    Add(IntAdd),
    /// Integer multiply.
    Mul(IntMul),
    /// Concatenation along `axis`; each input first mapped to the output grid by its table
    /// (`None`: already on it).
    Concat {
        /// Axis (batch included).
        axis: usize,
        /// Per input, its requantization table.
        requantize: Vec<Option<Lut>>,
    },
    /// Max pooling on integers (grid unchanged; padding never wins).
    MaxPool(Window),
    /// Average pooling: `round(sum(q - zp_in) * s_in / (count * s_out)) + zp_out`.
    AvgPool {
        /// Window.
        window: Window,
        /// Whether padded positions count in the divisor.
        count_include_pad: bool,
        /// Input grid.
        input: Grid,
    },
    /// Adaptive average pooling to `output` (`[1, out]` for 1-D), windows as PyTorch's.
    AdaptiveAvgPool {
        /// Output `[h, w]`.
        output: [usize; 2],
        /// Input grid.
        input: Grid,
    },
    /// Mean (or sum) along `axis`, requantized to the node's grid.
    Reduce {
        /// Axis (batch included).
        axis: usize,
        /// Mean (true) or sum.
        mean: bool,
        /// Input grid.
        input: Grid,
    },
    /// An elementwise function as a lookup table.
    Lut(Lut),
    /// A per-channel elementwise function (a BatchNorm that follows no conv/linear, with its
    /// activation) as one 256-entry table per channel along axis 1: `table[c * 256 + q + 128]`.
    ChannelLut {
        /// The tables, `channels * 256` entries.
        lut: Lut,
        /// Channels (axis 1).
        channels: usize,
    },
    /// Same values, the node's shape.
    Reshape,
    /// Axes permuted: output axis `i` is input axis `perm[i]`.
    Permute {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// The entries `indices` of axis `axis`, in that order: Burn's `Tensor::select` with
    /// constant indices and `Tensor::slice` with a step (ONNX `Gather`). Moves values, keeps
    /// the input's grid.
    Select {
        /// The axis: axis 0, the batch, is refused. (A file that first permutes the batch axis
        /// elsewhere gets what it asks for; shapes are checked at every batch size before a
        /// kernel runs, so nothing reads out of bounds.)
        axis: usize,
        /// The entries picked, each below the axis' size.
        indices: Vec<usize>,
    },
    /// (Last: variants are numbered in files, in order.)
    ///
    /// Bilinear resizing of `[n, c, h, w]` planes to `size`, as Burn's `interpolate` computes
    /// it (four neighbours weighted in `f32` from the dequantized input, half-pixel centres or
    /// `align_corners`), requantized to the node's grid.
    Bilinear {
        /// Output `[h, w]`.
        size: [usize; 2],
        /// Burn's `align_corners`: corner pixels' centres aligned (else half-pixel centres).
        align_corners: bool,
        /// Input grid.
        input: Grid,
    },
    /// Matrix product of two quantized tensors.
    MatMul(IntMatMul),
    /// Softmax along `axis` on the integer grid: per row, the exponential of each value's
    /// distance below the row's maximum from a table (`table[d] = round(exp(-s_in * d) * 2^24)`
    /// for `d = max - q`), their sum exact in `u64`, each value `table[d] / sum` quantized to
    /// the output grid (`round_half_even(table[d] / (sum * s_out)) + zp_out`, clamped).
    Softmax(IntSoftmax),
    /// Layer normalization over the last axis, a float island that reads and writes 8-bit
    /// values (see [`IntLayerNorm`]).
    LayerNorm(IntLayerNorm),
    /// A tensor of 8-bit values on the node's grid, the same at every batch size (a trained
    /// parameter the forward computes with as data, a position embedding): no input, a shape
    /// without a batch axis, as many values as the shape holds.
    Constant {
        /// The values, row-major.
        values: Vec<i8>,
    },
}

/// Layer normalization over the last axis: per row of the dequantized input, `y = (x - mean)
/// / sqrt(var + epsilon) * gamma + beta` in `f32` in Burn's order of operations (mean, centred
/// values, mean of their squares, `sqrt`, divide, scale, shift), quantized onto `output`.
/// A float island, as onnxruntime runs `LayerNormalization` between `DequantizeLinear` and
/// `QuantizeLinear`: the QAT graph computes LayerNorm in float, and integer statistics with a
/// fixed-point inverse square root (I-BERT) would move outputs off the QAT graph's grid.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntLayerNorm {
    /// Input grid.
    pub input: Grid,
    /// Output grid.
    pub output: Grid,
    /// Scale, one per feature.
    pub gamma: Vec<f32>,
    /// Shift, one per feature (zeros when the layer has none).
    pub beta: Vec<f32>,
    /// Added to the variance.
    pub epsilon: f64,
}

/// Softmax along one axis, on 8-bit values (see [`IntOp::Softmax`]).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntSoftmax {
    /// The axis (not the batch axis).
    pub axis: usize,
    /// Input grid.
    pub input: Grid,
    /// Output grid.
    pub output: Grid,
    /// `round(exp(-s_in * d) * 2^24)` for `d` in `0..256`.
    pub table: Vec<u32>,
}

impl IntSoftmax {
    /// Fixed-point bits of the table: `table[0] == 1 << ONE_BITS`.
    pub const ONE_BITS: u32 = 24;

    /// The table for an input grid of scale `scale`.
    pub fn table_for(scale: f32) -> Vec<u32> {
        (0..256)
            .map(|d| {
                ((-(scale as f64) * d as f64).exp() * (1u64 << Self::ONE_BITS) as f64).round()
                    as u32
            })
            .collect()
    }
}

impl IntOp {
    /// The op's name, for messages and plans.
    pub fn kind(&self) -> &'static str {
        match self {
            IntOp::Input => "Input",
            IntOp::Quantize(_) => "Quantize",
            IntOp::Conv2d(c) if c.is_depthwise() => "DepthwiseConv2d",
            IntOp::Conv2d(_) => "Conv2d",
            IntOp::Linear(_) => "Linear",
            IntOp::Add(a) if a.mb < 0 => "Sub",
            IntOp::Add(_) => "Add",
            IntOp::Mul(_) => "Mul",
            IntOp::Concat { .. } => "Concat",
            IntOp::MaxPool(_) => "MaxPool",
            IntOp::AvgPool { .. } => "AvgPool",
            IntOp::AdaptiveAvgPool { .. } => "AdaptiveAvgPool",
            IntOp::Bilinear { .. } => "Bilinear",
            IntOp::Reduce { mean: true, .. } => "Mean",
            IntOp::Reduce { .. } => "Sum",
            IntOp::Lut(_) => "Lut",
            IntOp::ChannelLut { .. } => "ChannelLut",
            IntOp::Reshape => "Reshape",
            IntOp::Permute { .. } => "Permute",
            IntOp::Select { .. } => "Select",
            IntOp::MatMul(_) => "MatMul",
            IntOp::Softmax(_) => "Softmax",
            IntOp::LayerNorm(_) => "LayerNorm",
            IntOp::Constant { .. } => "Constant",
        }
    }
}

/// One node of an [`IntegerModel`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntNode {
    /// The QAT graph node it came from (the user's module path).
    pub name: String,
    /// What it computes.
    pub op: IntOp,
    /// The nodes it reads, all earlier.
    pub inputs: Vec<usize>,
    /// Its output shape; `Dim::Batch(k)` is `k` times the batch size.
    pub shape: Vec<Dim>,
    /// Its output grid; `None` for float values (the input, a float last layer).
    pub grid: Option<Grid>,
}

/// An integer model: nodes in execution order (the float inputs first, one
/// [`IntOp::Input`] each, in argument order), and the output nodes.
/// Plain data (saved by [`crate::format`], written to ONNX by `burn-qat-onnx`), plus a cache of
/// weights packed for this machine's kernels that is filled on the first forward and never
/// saved, and the [`Budget`](crate::budget::Budget) it is validated against (a setting, not
/// saved; two models are equal when their nodes and outputs are).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IntegerModel {
    /// Nodes, each reading only earlier ones.
    pub nodes: Vec<IntNode>,
    /// The nodes whose values the model returns, in order (dequantized if they are
    /// integers).
    pub outputs: Vec<usize>,
    #[serde(skip)]
    pub(crate) cache: crate::run::WeightCache,
    #[serde(skip)]
    pub(crate) budget: crate::budget::Budget,
}

impl PartialEq for IntegerModel {
    fn eq(&self, other: &Self) -> bool {
        self.nodes == other.nodes && self.outputs == other.outputs
    }
}

/// Why an integer model is inconsistent (a file edited by hand, a model built by hand).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("integer model node {node} ({name}): {what}")]
pub struct ModelError {
    /// Node index.
    pub node: usize,
    /// Node name.
    pub name: String,
    /// What is wrong.
    pub what: String,
}

/// Why [`IntegerModel::forward`] could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// The input is not a whole batch.
    #[error("input: {len} values is not a whole batch of {input_shape:?}")]
    Input {
        /// Values given.
        len: usize,
        /// The model's input shape (one item).
        input_shape: Vec<usize>,
    },
    /// The model is inconsistent.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Inputs given in another count than the model's, or of different batch sizes.
    #[error("inputs: {given}; the model takes {expected} (the same batch size for each)")]
    Inputs {
        /// What was given.
        given: String,
        /// The model's inputs: count and item shapes.
        expected: String,
    },
    /// A call that returns one output on a model of several.
    #[error("the model returns {count} outputs: use forward_many / run_many")]
    Outputs {
        /// How many outputs the model has.
        count: usize,
    },
}

/// Output length of a convolution or pooling window along one axis, `None` if the window does
/// not fit: `(input + pad - dilation * (kernel - 1) - 1) / stride + 1`.
pub fn conv_output_len(
    input: usize,
    pad: usize,
    dilation: usize,
    kernel: usize,
    stride: usize,
) -> Option<usize> {
    if kernel == 0 || stride == 0 || dilation == 0 {
        return None;
    }
    let span = dilation.checked_mul(kernel - 1)?.checked_add(1)?;
    input
        .checked_add(pad)?
        .checked_sub(span)
        .map(|v| v / stride + 1)
}

/// The largest tensor (values per batch item) a model may declare: 2^31, so that sizes and
/// offsets computed from shapes stay far from overflowing, whatever the
/// [`Budget`](crate::budget::Budget) (which bounds memory much lower by default).
pub const MAX_ITEM_VALUES: usize = 1 << 31;

/// [`Grid::bits`] in wide arithmetic: `plan` and `precision` describe models that were not
/// validated too (a grid from a file may hold any `i32`).
fn bits(g: &Grid) -> u32 {
    let levels = (i64::from(g.qmax) - i64::from(g.qmin) + 1).max(1) as u64;
    levels.next_power_of_two().trailing_zeros()
}

impl IntegerModel {
    /// A model from its nodes (node 0 the [`IntOp::Input`]) and its output node, with the
    /// default [`Budget`](crate::budget::Budget). Check it with [`validate`](Self::validate)
    /// (every run does).
    pub fn new(nodes: Vec<IntNode>, output: usize) -> Self {
        Self::with_outputs(nodes, vec![output])
    }

    /// A model of several inputs (the leading [`IntOp::Input`] nodes) or outputs.
    pub fn with_outputs(nodes: Vec<IntNode>, outputs: Vec<usize>) -> Self {
        Self {
            nodes,
            outputs,
            cache: Default::default(),
            budget: Default::default(),
        }
    }

    /// The input nodes, in argument order (the leading [`IntOp::Input`] nodes).
    pub fn inputs(&self) -> std::ops::Range<usize> {
        0..self
            .nodes
            .iter()
            .take_while(|n| matches!(n.op, IntOp::Input))
            .count()
    }

    /// The input shape of one item (batch axis removed) of the first input.
    pub fn input_shape(&self) -> Vec<usize> {
        self.input_shapes().into_iter().next().unwrap_or_default()
    }

    /// The input shape of one item (batch axis removed) of every input, in argument order.
    pub fn input_shapes(&self) -> Vec<Vec<usize>> {
        self.inputs()
            .map(|i| {
                self.nodes[i]
                    .shape
                    .iter()
                    .filter_map(|d| match d {
                        Dim::Fixed(v) => Some(*v),
                        Dim::Batch(_) => None,
                    })
                    .collect()
            })
            .collect()
    }

    /// One line per weighted node and per quantizing node: its bit width and the range its
    /// values use in their 8-bit container (for weights, the values present; for activations,
    /// the grid), e.g.
    /// `conv1 Conv2d: weights 4-bit in int8 (values -7..=7), output 4-bit in int8 [-128, -113]`.
    pub fn precision(&self) -> Vec<String> {
        fn grid(g: Option<Grid>) -> String {
            match g {
                Some(q) => format!("{}-bit in int8 [{}, {}]", bits(&q), q.qmin, q.qmax),
                None => "float".into(),
            }
        }
        let mut out = Vec::new();
        for n in &self.nodes {
            let weights = match &n.op {
                IntOp::Conv2d(IntConv2d {
                    weight,
                    weight_bits,
                    ..
                })
                | IntOp::Linear(IntLinear {
                    weight,
                    weight_bits,
                    ..
                }) => Some((weight, weight_bits)),
                _ => None,
            };
            match weights {
                Some((w, bits)) => {
                    let lo = w.iter().copied().min().unwrap_or(0);
                    let hi = w.iter().copied().max().unwrap_or(0);
                    out.push(format!(
                        "{} {}: weights {bits}-bit in int8 (values {lo}..={hi}), output {}",
                        n.name,
                        n.op.kind(),
                        grid(n.grid)
                    ));
                }
                None if !matches!(
                    n.op,
                    IntOp::Input
                        | IntOp::Reshape
                        | IntOp::Permute { .. }
                        | IntOp::Select { .. }
                        | IntOp::MaxPool(_)
                ) =>
                {
                    out.push(format!(
                        "{} {}: output {}",
                        n.name,
                        n.op.kind(),
                        grid(n.grid)
                    ))
                }
                None => {}
            }
        }
        out
    }

    /// Bytes of parameters: int8 weights, int32 biases, f32 scales, lookup tables.
    pub fn parameter_bytes(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| match &n.op {
                IntOp::Conv2d(c) => c.weight.len() + 4 * c.bias.len() + 4 * c.weight_scale.len(),
                IntOp::Linear(c) => c.weight.len() + 4 * c.bias.len() + 4 * c.weight_scale.len(),
                IntOp::Lut(l) | IntOp::ChannelLut { lut: l, .. } => l.table.len(),
                IntOp::Concat { requantize, .. } => {
                    requantize.iter().flatten().map(|l| l.table.len()).sum()
                }
                _ => 0,
            })
            .sum()
    }

    /// A table of the nodes: index, op, inputs, shape, grid.
    pub fn plan(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let shape: Vec<String> = n.shape.iter().map(|d| d.to_string()).collect();
            let grid = match n.grid {
                Some(g) => format!("{}-bit s={:.4e} zp={}", bits(&g), g.scale, g.zero_point),
                None => "float".into(),
            };
            s.push_str(&format!(
                "%{i:<3} {:<16} {:<24} <- {:?}  [{}]  {grid}\n",
                n.op.kind(),
                n.name,
                n.inputs,
                shape.join(", ")
            ));
        }
        let outputs: Vec<String> = self.outputs.iter().map(|o| format!("%{o}")).collect();
        s.push_str(&format!(
            "output{}: {}\n",
            if outputs.len() == 1 { "" } else { "s" },
            outputs.join(", ")
        ));
        s
    }
}
