//! The integer model: int8 weights, int32 biases, 8-bit activations, fixed-point requantization.

use burn_qat_core::{QParams, reference};

use crate::kernels;
use crate::requant::FixedMultiplier;

/// Quantization of an activation tensor: `real = scale * (q - zero_point)`, `q` in
/// `[qmin, qmax]` (sub-8-bit grids are kept in 8-bit containers with their narrower range).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ActQ {
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero_point: i32,
    /// Smallest integer.
    pub qmin: i32,
    /// Largest integer.
    pub qmax: i32,
}

impl ActQ {
    /// Bits of the grid: `ceil(log2(qmax - qmin + 1))` (8 for a full int8 grid; fewer for a
    /// sub-8-bit grid kept in an int8 container).
    pub fn bits(&self) -> u32 {
        let levels = (self.qmax - self.qmin + 1).max(1) as u32;
        levels.next_power_of_two().trailing_zeros()
    }

    pub(crate) fn qparams(&self) -> QParams {
        QParams {
            scale: self.scale,
            zero_point: self.zero_point,
        }
    }
}

/// What a Conv/Linear layer produces.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Output {
    /// 8-bit activations: `clamp(requant[c](acc) + zero_point, lo, hi)`; the clamp is the
    /// fused activation (ReLU: `lo = zero_point`).
    Quantized {
        /// The output's quantization.
        act: ActQ,
        /// Per output channel, `s_in * s_w[c] / s_out` in fixed point.
        requant: Vec<FixedMultiplier>,
        /// Lower clamp.
        lo: i32,
        /// Upper clamp.
        hi: i32,
    },
    /// Float logits (the model's last layer): `acc * scale[c]`, then `activation` bounds.
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
    /// The output's quantization, `None` for float logits.
    pub fn act(&self) -> Option<ActQ> {
        match self {
            Output::Quantized { act, .. } => Some(*act),
            Output::Float { .. } => None,
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
    /// Groups.
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
    /// Bits of the weight grid (values in `[-(2^(b-1) - 1), 2^(b-1) - 1]` for narrow grids),
    /// stored in `i8`.
    pub weight_bits: u32,
    /// Per output channel weight scale.
    pub weight_scale: Vec<f32>,
    /// Per output channel, scale `s_in * s_w[c]`, zero point 0.
    pub bias: Vec<i32>,
    /// Input quantization.
    pub input: ActQ,
    /// Output.
    pub output: Output,
    /// `weight` laid out for the GEMM kernel, on first use (leave it `Default`).
    #[serde(skip)]
    pub packed: PackedWeights,
}

/// An integer fully connected layer, weight `[in, out]` as Burn's `Linear`.
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
    /// Input quantization.
    pub input: ActQ,
    /// Output.
    pub output: Output,
    /// `weight` laid out for the GEMM kernel, on first use (leave it `Default`).
    #[serde(skip)]
    pub packed: PackedWeights,
}

/// A layer's weights laid out for the GEMM kernel of this machine, built on the first forward
/// and kept: not saved, not compared, not cloned (a clone packs again on its first forward).
/// Build a layer with `PackedWeights::default()`; after changing a layer's `weight`, reset it
/// to `PackedWeights::default()` so that the next forward packs the new values.
#[derive(Default)]
pub struct PackedWeights(pub(crate) std::sync::OnceLock<kernels::Packed>);

impl Clone for PackedWeights {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for PackedWeights {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.0.get().is_some() {
            "packed"
        } else {
            "not packed yet"
        };
        write!(f, "PackedWeights({state})")
    }
}

/// One layer of an [`IntegerModel`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum IntLayer {
    /// Float input to 8-bit.
    Quantize(ActQ),
    /// Integer convolution.
    Conv2d(IntConv2d),
    /// Integer fully connected layer.
    Linear(IntLinear),
    /// Max pooling on integers (quantization unchanged).
    MaxPool2d {
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
    },
    /// Average pooling on integers, output on the input's grid (TFLite's AVERAGE_POOL_2D):
    /// `round_half_even(sum(q - zp) / count) + zp`.
    AvgPool2d {
        /// `[kh, kw]`.
        kernel: [usize; 2],
        /// `[sh, sw]`.
        stride: [usize; 2],
    },
    /// `max(q, lo)`, `min(q, hi)`: ReLU/ReLU6 on quantized values.
    Clamp {
        /// Lower bound.
        lo: i32,
        /// Upper bound.
        hi: i32,
    },
    /// `[n, c, h, w]` to `[n, c * h * w]`.
    Flatten,
    /// A residual block: `add(x, body(x))`.
    Residual {
        /// The branch, run on a copy of the input.
        body: Vec<IntLayer>,
        /// The add.
        add: IntAdd,
    },
}

/// Integer addition of two quantized tensors into a third quantization, with a fused clamp:
/// `q = round((qa - zpa) * ma / 2^shift + (qb - zpb) * mb / 2^shift) + zp_out`, where
/// `ma = s_a / s_out * 2^shift` (and `mb`) are integers; with `shift = 40` the rounding
/// equals the fake-quant model's except on exact ties.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntAdd {
    /// Quantization of the block input.
    pub a: ActQ,
    /// Quantization of the body output.
    pub b: ActQ,
    /// Output quantization.
    pub out: ActQ,
    /// `s_a / s_out` in fixed point.
    pub ma: i64,
    /// `s_b / s_out` in fixed point.
    pub mb: i64,
    /// Fixed-point shift.
    pub shift: u32,
    /// Lower clamp (the fused activation).
    pub lo: i32,
    /// Upper clamp.
    pub hi: i32,
}

impl IntAdd {
    /// Adds `a` and `b`, elementwise.
    pub fn apply(&self, a: &[i8], b: &[i8]) -> Vec<i8> {
        let half = 1i128 << (self.shift - 1);
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let t = (*x as i128 - self.a.zero_point as i128) * self.ma as i128
                    + (*y as i128 - self.b.zero_point as i128) * self.mb as i128;
                let floor = t >> self.shift;
                let rem = t - (floor << self.shift);
                let r = if rem > half || (rem == half && floor & 1 == 1) {
                    floor + 1
                } else {
                    floor
                };
                ((r as i64).saturating_add(self.out.zero_point as i64))
                    .clamp(self.lo as i64, self.hi as i64) as i8
            })
            .collect()
    }
}

/// A tensor flowing through the integer model.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// 8-bit values with their quantization, and the shape.
    Int {
        /// Values (`i8` containers).
        data: Vec<i8>,
        /// Shape, batch first.
        shape: Vec<usize>,
        /// Quantization.
        q: ActQ,
    },
    /// Float values (model input or logits).
    Float {
        /// Values.
        data: Vec<f32>,
        /// Shape, batch first.
        shape: Vec<usize>,
    },
}

/// An integer model: the layers in order, and the input shape `[c, h, w]` (without batch).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IntegerModel {
    /// Input shape without the batch dimension.
    pub input_shape: Vec<usize>,
    /// Layers.
    pub layers: Vec<IntLayer>,
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
    /// The model's layers disagree (see [`crate::format::validate`]).
    #[error("model: {0}")]
    Model(String),
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
    if kernel == 0 || stride == 0 {
        return None;
    }
    (input + pad)
        .checked_sub(dilation * (kernel - 1) + 1)
        .map(|v| v / stride + 1)
}

impl IntLayer {
    /// The layer's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            IntLayer::Quantize(_) => "Quantize",
            IntLayer::Conv2d(_) => "Conv2d",
            IntLayer::Linear(_) => "Linear",
            IntLayer::MaxPool2d { .. } => "MaxPool2d",
            IntLayer::AvgPool2d { .. } => "AvgPool2d",
            IntLayer::Clamp { .. } => "Clamp",
            IntLayer::Flatten => "Flatten",
            IntLayer::Residual { .. } => "Residual",
        }
    }

    /// The shape this layer produces from `input` (both without the batch dimension), or `None`
    /// if it does not accept that input. A convolution takes `[c, h, w]`, or `[c, length]` when its
    /// kernel height is 1 and it has no vertical padding (a 1-D convolution); a residual body must
    /// preserve the shape. The single place where shapes are propagated: the converter, the file
    /// check, the kernels and the ONNX writer all use it.
    pub fn output_shape(&self, input: &[usize]) -> Option<Vec<usize>> {
        match self {
            IntLayer::Quantize(_) | IntLayer::Clamp { .. } => Some(input.to_vec()),
            IntLayer::Flatten => Some(vec![input.iter().product()]),
            IntLayer::Conv2d(c) if input.first() == Some(&c.in_channels) => match input.len() {
                2 if c.kernel[0] == 1 && c.padding[0] + c.padding[1] == 0 => {
                    let pad = c.padding[2] + c.padding[3];
                    let len =
                        conv_output_len(input[1], pad, c.dilation[1], c.kernel[1], c.stride[1])?;
                    Some(vec![c.out_channels, len])
                }
                3 => {
                    let (ph, pw) = (c.padding[0] + c.padding[1], c.padding[2] + c.padding[3]);
                    let h = conv_output_len(input[1], ph, c.dilation[0], c.kernel[0], c.stride[0])?;
                    let w = conv_output_len(input[2], pw, c.dilation[1], c.kernel[1], c.stride[1])?;
                    Some(vec![c.out_channels, h, w])
                }
                _ => None,
            },
            IntLayer::Linear(l) if input == [l.in_features] => Some(vec![l.out_features]),
            IntLayer::MaxPool2d { kernel, stride } | IntLayer::AvgPool2d { kernel, stride }
                if input.len() == 3 =>
            {
                let h = conv_output_len(input[1], 0, 1, kernel[0], stride[0])?;
                let w = conv_output_len(input[2], 0, 1, kernel[1], stride[1])?;
                Some(vec![input[0], h, w])
            }
            IntLayer::Residual { body, .. } => {
                let out = body
                    .iter()
                    .try_fold(input.to_vec(), |shape, l| l.output_shape(&shape))?;
                (out == input).then_some(out)
            }
            _ => None,
        }
    }
}

impl IntegerModel {
    /// Runs the model on a batch of float inputs `[n, ..input_shape]`, returning the float
    /// outputs (dequantized if the last layer is quantized) and their shape. Integer arithmetic
    /// only between the input quantization and the output; images run in parallel on Rayon's
    /// thread pool.
    ///
    /// # Errors
    ///
    /// [`RunError::Input`] if `input.len()` is not a whole batch; [`RunError::Model`] if the
    /// layers' sizes disagree (a model edited by hand).
    pub fn forward(&self, input: &[f32]) -> Result<(Vec<f32>, Vec<usize>), RunError> {
        self.run(input, false).map(to_float)
    }

    /// Like [`forward`](Self::forward), with the slow scalar reference kernels (nested loops).
    pub fn forward_reference(&self, input: &[f32]) -> Result<(Vec<f32>, Vec<usize>), RunError> {
        self.run(input, true).map(to_float)
    }

    /// Runs the model and returns the raw integer output of the last layer with its shape and
    /// quantization, or `None` if the model ends in float.
    pub fn forward_int(
        &self,
        input: &[f32],
    ) -> Result<Option<(Vec<i8>, Vec<usize>, ActQ)>, RunError> {
        Ok(match self.run(input, false)? {
            Values::Int { data, shape, q } => Some((data, shape, q)),
            Values::Float { .. } => None,
        })
    }

    fn run(&self, input: &[f32], reference_kernels: bool) -> Result<Values, RunError> {
        crate::format::validate(self).map_err(|e| RunError::Model(e.to_string()))?;
        let item: usize = self.input_shape.iter().product();
        if input.len() % item != 0 {
            return Err(RunError::Input {
                len: input.len(),
                input_shape: self.input_shape.clone(),
            });
        }
        let mut shape = vec![input.len() / item];
        shape.extend(&self.input_shape);
        let mut v = Values::Float {
            data: input.to_vec(),
            shape,
        };
        if reference_kernels {
            for layer in &self.layers {
                v = run_layer(layer, v, true);
            }
            return Ok(v);
        }
        // On a pool thread, so that the kernels' parallel loops split without a hand-off per
        // layer.
        Ok(rayon::scope(move |_| {
            for layer in &self.layers {
                v = run_layer(layer, v, false);
            }
            v
        }))
    }

    /// One line per weighted layer and per quantized activation: its bit width and the range
    /// its values use in their 8-bit container (for weights, the values present; for
    /// activations, the grid), e.g.
    /// `layers.1 Conv2d: weights 4-bit in int8 (values -7..=7), output 4-bit in int8 [-128, -113]`.
    pub fn precision(&self) -> Vec<String> {
        fn weight_range(w: &[i8]) -> (i8, i8) {
            (
                w.iter().copied().min().unwrap_or(0),
                w.iter().copied().max().unwrap_or(0),
            )
        }
        fn act(q: &ActQ) -> String {
            format!("{}-bit in int8 [{}, {}]", q.bits(), q.qmin, q.qmax)
        }
        fn output(o: &Output) -> String {
            match o {
                Output::Quantized { act: q, .. } => act(q),
                Output::Float { .. } => "float".into(),
            }
        }
        fn walk(layers: &[IntLayer], prefix: &str, out: &mut Vec<String>) {
            for (i, layer) in layers.iter().enumerate() {
                let path = format!("{prefix}.{i}");
                match layer {
                    IntLayer::Quantize(q) => out.push(format!("{path} Quantize: {}", act(q))),
                    IntLayer::Conv2d(IntConv2d {
                        weight,
                        weight_bits,
                        output: o,
                        ..
                    })
                    | IntLayer::Linear(IntLinear {
                        weight,
                        weight_bits,
                        output: o,
                        ..
                    }) => {
                        let (lo, hi) = weight_range(weight);
                        out.push(format!(
                            "{path} {}: weights {weight_bits}-bit in int8 (values {lo}..={hi}), output {}",
                            layer.kind(),
                            output(o)
                        ));
                    }
                    IntLayer::Residual { body, add } => {
                        walk(body, &format!("{path}.body"), out);
                        out.push(format!("{path} Add: output {}", act(&add.out)));
                    }
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.layers, "layers", &mut out);
        out
    }

    /// Bytes of parameters: int8 weights, int32 biases, f32 scales.
    pub fn parameter_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                IntLayer::Conv2d(c) => c.weight.len() + 4 * c.bias.len() + 4 * c.weight_scale.len(),
                IntLayer::Linear(c) => c.weight.len() + 4 * c.bias.len() + 4 * c.weight_scale.len(),
                IntLayer::Residual { body, .. } => IntegerModel {
                    input_shape: vec![],
                    layers: body.clone(),
                }
                .parameter_bytes(),
                _ => 0,
            })
            .sum()
    }
}

fn to_float(v: Values) -> (Vec<f32>, Vec<usize>) {
    match v {
        Values::Float { data, shape } => (data, shape),
        Values::Int { data, shape, q } => (
            data.iter()
                .map(|x| reference::dequantize(*x as i32, q.qparams()))
                .collect(),
            shape,
        ),
    }
}

fn run_layer(layer: &IntLayer, v: Values, reference_kernels: bool) -> Values {
    match (layer, v) {
        (IntLayer::Quantize(q), Values::Float { data, shape }) => {
            let spec = burn_qat_core::QuantSpec::int8_act_per_tensor_asymmetric();
            let data = data
                .iter()
                .map(|x| reference::quantize(*x, q.qparams(), &spec).clamp(q.qmin, q.qmax) as i8)
                .collect();
            Values::Int { data, shape, q: *q }
        }
        (IntLayer::Quantize(_), v @ Values::Int { .. }) => v,
        (IntLayer::Conv2d(c), Values::Int { data, shape, .. }) => {
            if reference_kernels {
                kernels::conv2d_reference(c, &data, &shape)
            } else {
                kernels::conv2d(c, &data, &shape)
            }
        }
        (IntLayer::Linear(l), Values::Int { data, shape, .. }) => {
            if reference_kernels {
                kernels::linear_reference(l, &data, &shape)
            } else {
                kernels::linear(l, &data, &shape)
            }
        }
        (IntLayer::MaxPool2d { kernel, stride }, Values::Int { data, shape, q }) => {
            let (data, shape) = kernels::max_pool2d(&data, &shape, *kernel, *stride);
            Values::Int { data, shape, q }
        }
        (IntLayer::AvgPool2d { kernel, stride }, Values::Int { data, shape, q }) => {
            let (data, shape) = kernels::avg_pool2d(&data, &shape, *kernel, *stride, q.zero_point);
            Values::Int { data, shape, q }
        }
        (IntLayer::Clamp { lo, hi }, Values::Int { data, shape, q }) => {
            let data = data
                .iter()
                .map(|x| (*x as i32).clamp(*lo, *hi) as i8)
                .collect();
            Values::Int { data, shape, q }
        }
        (IntLayer::Flatten, Values::Int { data, shape, q }) => {
            let n = shape[0];
            let rest = shape[1..].iter().product();
            Values::Int {
                data,
                shape: vec![n, rest],
                q,
            }
        }
        (IntLayer::Residual { body, add }, Values::Int { data, shape, q }) => {
            let mut v = Values::Int {
                data: data.clone(),
                shape: shape.clone(),
                q,
            };
            for layer in body {
                v = run_layer(layer, v, reference_kernels);
            }
            match v {
                Values::Int { data: branch, .. } => Values::Int {
                    data: add.apply(&data, &branch),
                    shape,
                    q: add.out,
                },
                Values::Float { .. } => {
                    panic!(
                        "a residual body ends in float: the conversion guarantees this cannot happen"
                    )
                }
            }
        }
        (IntLayer::Flatten, Values::Float { data, shape }) => {
            let n = shape[0];
            let rest = shape[1..].iter().product();
            Values::Float {
                data,
                shape: vec![n, rest],
            }
        }
        (layer, _) => {
            panic!(
                "integer model: {layer:?} received float values: the conversion guarantees this cannot happen"
            )
        }
    }
}
