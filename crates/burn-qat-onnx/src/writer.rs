use std::path::Path;

use burn_qat_runtime::model::{
    Dim, Grid, IntAdd, IntConv2d, IntLayerNorm, IntLinear, IntMatMul, IntMul, IntNode, IntOp,
    IntegerModel, Lut, Output, Window,
};
use prost::Message;
use thiserror::Error;

use crate::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

/// Export settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxOptions {
    /// The ONNX opset: 13 (default) or 21.
    pub opset: i64,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        Self { opset: 13 }
    }
}

/// Why a model cannot be exported.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// An unsupported option.
    #[error("invalid ONNX export option: `opset` is {0}, allowed: 13 or 21")]
    Opset(i64),
    /// The integer model is inconsistent (its nodes do not fit together).
    #[error("{0}")]
    Invalid(String),
    /// A node with no ONNX form, named.
    #[error("node `{node}` ({kind}) cannot be written to ONNX: {hint}")]
    Unsupported {
        /// Node name.
        node: String,
        /// Op kind.
        kind: String,
        /// Why, and what to do.
        hint: String,
    },
    /// Writing the file failed; nothing is left at the output path.
    #[error("writing {path}: {source}")]
    Io {
        /// The output path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

#[derive(Default)]
struct Graph {
    opset: i64,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    count: usize,
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

impl Graph {
    fn name(&mut self, base: &str) -> String {
        self.count += 1;
        format!("{base}_{}", self.count)
    }

    fn init(&mut self, base: &str, dtype: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        let name = self.name(base);
        self.inits.push(TensorProto {
            name: Some(name.clone()),
            data_type: Some(dtype as i32),
            dims: dims.iter().map(|d| *d as i64).collect(),
            raw_data: Some(raw),
            ..Default::default()
        });
        name
    }

    fn f32s(&mut self, base: &str, dims: &[usize], v: &[f32]) -> String {
        self.init(
            base,
            DataType::Float,
            dims,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn i8s(&mut self, base: &str, dims: &[usize], v: &[i8]) -> String {
        self.init(
            base,
            DataType::Int8,
            dims,
            v.iter().map(|x| *x as u8).collect(),
        )
    }

    /// Activation values as uint8 (`q + 128`): onnxruntime's CPU kernels take uint8
    /// activations with int8 weights (U8S8); with int8 activations it ran most convolutions and
    /// every residual add in float. The same real values: `scale * ((q + 128) - (z + 128))`.
    fn u8s(&mut self, base: &str, dims: &[usize], v: &[i8]) -> String {
        self.init(
            base,
            DataType::Uint8,
            dims,
            v.iter().map(|x| (i16::from(*x) + 128) as u8).collect(),
        )
    }

    fn i32s(&mut self, base: &str, dims: &[usize], v: &[i32]) -> String {
        self.init(
            base,
            DataType::Int32,
            dims,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>) -> String {
        let out = self.name(&op.to_lowercase());
        let name = self.name(op);
        self.nodes.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input: inputs,
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// Quantize then dequantize `x` with `q` (per tensor): the activation edge. A grid
    /// narrower than int8 (fewer bits) says so in the `QuantizeLinear` node's doc string.
    fn qdq(&mut self, x: String, q: &Grid) -> String {
        let s = self.f32s("scale", &[], &[q.scale]);
        let z = self.u8s("zero_point", &[], &[q.zero_point as i8]);
        let xq = self.node("QuantizeLinear", vec![x, s.clone(), z.clone()], vec![]);
        if (q.qmin, q.qmax) != (-128, 127)
            && let Some(node) = self.nodes.last_mut()
        {
            node.doc_string = Some(format!(
                "{}-bit values in a uint8 container: [{}, {}]",
                q.bits(),
                q.qmin + 128,
                q.qmax + 128
            ));
        }
        self.node("DequantizeLinear", vec![xq, s, z], vec![])
    }

    /// Per-channel dequantized weight and bias initializers.
    fn weights(
        &mut self,
        w: &[i8],
        dims: &[usize],
        scale: &[f32],
        bias: &[i32],
        input: &Grid,
        axis: i64,
    ) -> (String, String) {
        let c = scale.len();
        let wq = self.i8s("weight_q", dims, w);
        let ws = self.f32s("weight_scale", &[c], scale);
        let wz = self.i8s("weight_zero_point", &[c], &vec![0; c]);
        let wd = self.node(
            "DequantizeLinear",
            vec![wq, ws, wz],
            vec![attr_int("axis", axis)],
        );
        let bq = self.i32s("bias_q", &[c], bias);
        let bscale: Vec<f32> = scale.iter().map(|s| input.scale * s).collect();
        let bs = self.f32s("bias_scale", &[c], &bscale);
        let bz = self.i32s("bias_zero_point", &[c], &vec![0; c]);
        let bd = self.node(
            "DequantizeLinear",
            vec![bq, bs, bz],
            vec![attr_int("axis", 0)],
        );
        (wd, bd)
    }

    /// The fused activation as float bounds, then the output edge.
    fn finish(&mut self, y: String, output: &Output) -> String {
        match output {
            Output::Quantized {
                grid: act, lo, hi, ..
            } => {
                let y = self.clip_int(y, *lo, *hi, act);
                self.qdq(y, act)
            }
            Output::Float { lo, hi, .. } => {
                let lower = lo.is_finite().then_some(*lo);
                let upper = hi.is_finite().then_some(*hi);
                self.clip(y, lower, upper)
            }
        }
    }

    /// The integer clamp `[lo, hi]` on the grid of `act` as a float `Relu`/`Clip` (nothing where
    /// a bound is int8's own: `QuantizeLinear` saturates there; sub-8-bit grids are clipped).
    fn clip_int(&mut self, y: String, lo: i32, hi: i32, act: &Grid) -> String {
        let lower = (lo > -128).then(|| (lo - act.zero_point) as f32 * act.scale);
        let upper = (hi < 127).then(|| (hi - act.zero_point) as f32 * act.scale);
        self.clip(y, lower, upper)
    }

    fn clip(&mut self, y: String, lower: Option<f32>, upper: Option<f32>) -> String {
        match (lower, upper) {
            (None, None) => y,
            (Some(0.0), None) => self.node("Relu", vec![y], vec![]),
            (l, u) => {
                let l = self.f32s("clip_min", &[], &[l.unwrap_or(f32::MIN)]);
                let u = self.f32s("clip_max", &[], &[u.unwrap_or(f32::MAX)]);
                self.node("Clip", vec![y, l, u], vec![])
            }
        }
    }

    fn conv(&mut self, x: String, c: &IntConv2d, one_d: bool) -> String {
        let kin = c.in_channels / c.groups;
        let (dims, kernel, strides, pads, dilations): (
            Vec<usize>,
            Vec<i64>,
            Vec<i64>,
            Vec<i64>,
            Vec<i64>,
        ) = if one_d {
            (
                vec![c.out_channels, kin, c.kernel[1]],
                vec![c.kernel[1] as i64],
                vec![c.stride[1] as i64],
                vec![c.padding[2] as i64, c.padding[3] as i64],
                vec![c.dilation[1] as i64],
            )
        } else {
            (
                vec![c.out_channels, kin, c.kernel[0], c.kernel[1]],
                c.kernel.iter().map(|v| *v as i64).collect(),
                c.stride.iter().map(|v| *v as i64).collect(),
                // ONNX: [top, left, bottom, right]
                vec![
                    c.padding[0] as i64,
                    c.padding[2] as i64,
                    c.padding[1] as i64,
                    c.padding[3] as i64,
                ],
                c.dilation.iter().map(|v| *v as i64).collect(),
            )
        };
        let (w, b) = self.weights(&c.weight, &dims, &c.weight_scale, &c.bias, &c.input, 0);
        let y = self.node(
            "Conv",
            vec![x, w, b],
            vec![
                attr_ints("kernel_shape", &kernel),
                attr_ints("strides", &strides),
                attr_ints("pads", &pads),
                attr_ints("dilations", &dilations),
                attr_int("group", c.groups as i64),
            ],
        );
        self.finish(y, &c.output)
    }

    fn linear(&mut self, x: String, l: &IntLinear, rank: usize) -> String {
        let (w, b) = self.weights(
            &l.weight,
            &[l.in_features, l.out_features],
            &l.weight_scale,
            &l.bias,
            &l.input,
            1,
        );
        let y = if rank == 2 {
            self.node("Gemm", vec![x, w, b], vec![])
        } else {
            let y = self.node("MatMul", vec![x, w], vec![]);
            self.node("Add", vec![y, b], vec![])
        };
        self.finish(y, &l.output)
    }

    /// A lookup table on the int8 values of `x` (float, on `lut.input`'s grid): the index
    /// `round(x / scale) + zero_point + 128` (exact: `x` is on the grid; computed in float so that
    /// the producer's `QuantizeLinear -> DequantizeLinear` pair stays a standard QDQ unit that
    /// onnxruntime fuses into its int8 kernel), `Gather` from the table, dequantize on the
    /// output grid. Exactly the integer model's table, whatever function it holds.
    fn lut(&mut self, x: String, lut: &Lut) -> String {
        self.lut_per_channel(x, lut, None)
    }

    /// [`lut`](Self::lut) with one table per channel (axis 1 of a rank-`rank` input): the index
    /// moves by `256 * c` in channel `c`.
    fn lut_per_channel(
        &mut self,
        x: String,
        lut: &Lut,
        channels: Option<(usize, usize)>,
    ) -> String {
        let s = self.f32s("lut_scale", &[], &[lut.input.scale]);
        let v = self.node("Div", vec![x, s], vec![]);
        let r = self.node("Round", vec![v], vec![]);
        let base = (lut.input.zero_point + 128) as f32;
        let offset = match channels {
            None => self.f32s("lut_offset", &[], &[base]),
            Some((c, rank)) => {
                let mut dims = vec![1; rank];
                dims[1] = c;
                let offsets: Vec<f32> = (0..c).map(|k| base + 256.0 * k as f32).collect();
                self.f32s("lut_offset", &dims, &offsets)
            }
        };
        let shifted = self.node("Add", vec![r, offset], vec![]);
        let index = self.node(
            "Cast",
            vec![shifted],
            vec![attr_int("to", DataType::Int64 as i64)],
        );
        let table = self.u8s(
            &format!("lut_{}", lut.function.to_lowercase()),
            &[lut.table.len()],
            &lut.table,
        );
        let y = self.node("Gather", vec![table, index], vec![attr_int("axis", 0)]);
        if let Some(node) = self.nodes.last_mut() {
            node.doc_string = Some(format!(
                "{} as a 256-entry table on uint8 values",
                lut.function
            ));
        }
        let s = self.f32s("scale", &[], &[lut.output.scale]);
        let z = self.u8s("zero_point", &[], &[lut.output.zero_point as i8]);
        self.node("DequantizeLinear", vec![y, s, z], vec![])
    }

    fn pool(
        &mut self,
        op: &str,
        x: String,
        w: &Window,
        rank: usize,
        extra: Vec<AttributeProto>,
    ) -> String {
        let mut attrs = if rank == 3 {
            vec![
                attr_ints("kernel_shape", &[w.kernel[1] as i64]),
                attr_ints("strides", &[w.stride[1] as i64]),
                attr_ints("pads", &[w.padding[2] as i64, w.padding[3] as i64]),
            ]
        } else {
            vec![
                attr_ints("kernel_shape", &[w.kernel[0] as i64, w.kernel[1] as i64]),
                attr_ints("strides", &[w.stride[0] as i64, w.stride[1] as i64]),
                attr_ints(
                    "pads",
                    &[
                        w.padding[0] as i64,
                        w.padding[2] as i64,
                        w.padding[1] as i64,
                        w.padding[3] as i64,
                    ],
                ),
            ]
        };
        if w.dilation != [1, 1] {
            let d: Vec<i64> = if rank == 3 {
                vec![w.dilation[1] as i64]
            } else {
                w.dilation.iter().map(|v| *v as i64).collect()
            };
            attrs.push(attr_ints("dilations", &d));
        }
        attrs.extend(extra);
        self.node(op, vec![x], attrs)
    }

    fn reduce(&mut self, op: &str, x: String, axis: usize) -> String {
        // ReduceSum takes its axes as an input from opset 13, ReduceMean from opset 18.
        if op == "ReduceSum" || self.opset >= 18 {
            let axes = self.init(
                "axes",
                DataType::Int64,
                &[1],
                (axis as i64).to_le_bytes().to_vec(),
            );
            self.node(op, vec![x, axes], vec![attr_int("keepdims", 1)])
        } else {
            self.node(
                op,
                vec![x],
                vec![attr_ints("axes", &[axis as i64]), attr_int("keepdims", 1)],
            )
        }
    }
}

fn dim_text(d: &Dim) -> Option<usize> {
    match d {
        Dim::Fixed(v) => Some(*v),
        Dim::Batch(_) => None,
    }
}

/// The float name of every node's values (dequantized for integer nodes).
fn write_nodes(g: &mut Graph, model: &IntegerModel) -> Result<Vec<String>, OnnxError> {
    let mut names: Vec<String> = Vec::with_capacity(model.nodes.len());
    let inputs = input_names(model);
    for (i, node) in model.nodes.iter().enumerate() {
        if let Some(name) = inputs.get(i) {
            names.push(name.clone());
            continue;
        }
        let xs: Vec<String> = node.inputs.iter().map(|j| names[*j].clone()).collect();
        let first = node.inputs.first().map(|j| &model.nodes[*j]);
        let out = g.write_node(node, xs, first)?;
        names.push(out);
    }
    Ok(names)
}

/// The graph's input names, in order: `input` for a model of one input, else `input_0`,
/// `input_1`, ...
pub fn input_names(model: &IntegerModel) -> Vec<String> {
    let n = model.inputs().len();
    (0..n)
        .map(|k| {
            if n == 1 {
                "input".into()
            } else {
                format!("input_{k}")
            }
        })
        .collect()
}

/// The graph's output names, in order: `logits` for a model of one output, else `output_0`,
/// `output_1`, ...
pub fn output_names(model: &IntegerModel) -> Vec<String> {
    let n = model.outputs.len();
    (0..n)
        .map(|k| {
            if n == 1 {
                "logits".into()
            } else {
                format!("output_{k}")
            }
        })
        .collect()
}

/// Why `node` has no ONNX form.
fn unsupported(node: &IntNode, hint: &str) -> OnnxError {
    OnnxError::Unsupported {
        node: node.name.clone(),
        kind: node.op.kind().into(),
        hint: hint.into(),
    }
}

impl Graph {
    /// Writes `node`, reading the float values `xs` (its inputs'; `first` is its first input's
    /// node): one writer per op. Returns the float name of its values.
    fn write_node(
        &mut self,
        node: &IntNode,
        xs: Vec<String>,
        first: Option<&IntNode>,
    ) -> Result<String, OnnxError> {
        let x = || xs[0].clone();
        let rank = first.map_or(0, |n| n.shape.len());
        Ok(match &node.op {
            IntOp::Input => unreachable!("write_nodes names the inputs"),
            IntOp::Quantize(a) => self.quantize(x(), a),
            IntOp::Conv2d(c) => self.conv(x(), c, rank == 3),
            IntOp::Linear(l) => self.linear(x(), l, rank),
            IntOp::Add(a) => self.add(xs, a),
            IntOp::Mul(m) => self.mul(xs, m),
            IntOp::MatMul(m) => self.matmul(xs, m),
            IntOp::LayerNorm(l) => self.layer_norm(x(), l),
            IntOp::Constant { values } => {
                let g = node
                    .grid
                    .ok_or_else(|| unsupported(node, "a constant without a grid"))?;
                let dims: Vec<usize> = node.shape.iter().map(|d| d.at(1)).collect();
                let floats: Vec<f32> = values.iter().map(|q| g.dequantize(*q as i32)).collect();
                let y = self.f32s("constant", &dims, &floats);
                self.qdq(y, &g)
            }
            IntOp::Softmax(s) => {
                let y = self.node("Softmax", xs, vec![attr_int("axis", s.axis as i64)]);
                self.qdq(y, &s.output)
            }
            IntOp::Lut(t) => self.lut(x(), t),
            IntOp::ChannelLut { lut, channels } => {
                self.lut_per_channel(x(), lut, Some((*channels, rank)))
            }
            IntOp::Concat { axis, requantize } => self.concat(xs, *axis, requantize, node.grid),
            IntOp::MaxPool(w) => self.max_pool(x(), w, rank, node.grid),
            IntOp::AvgPool {
                window,
                count_include_pad,
                ..
            } => self.avg_pool(x(), window, *count_include_pad, rank, node.grid),
            IntOp::AdaptiveAvgPool { output, .. } => {
                let input = first.map_or(&[][..], |n| &n.shape);
                self.adaptive_avg_pool(x(), *output, input, node.grid)
                    .map_err(|hint| unsupported(node, hint))?
            }
            IntOp::Reduce { axis, mean, .. } => self.mean_or_sum(x(), *axis, *mean, node.grid),
            IntOp::Bilinear {
                size,
                align_corners,
                ..
            } => self.bilinear(x(), *size, *align_corners, node.grid),
            IntOp::Reshape => self
                .reshape(x(), &node.shape, first.and_then(|n| n.grid))
                .map_err(|hint| unsupported(node, hint))?,
            IntOp::Permute { perm } => self.permute(x(), perm, first.and_then(|n| n.grid)),
            IntOp::Select { axis, indices } => {
                self.select(x(), *axis, indices, first.and_then(|n| n.grid))
            }
        })
    }

    /// `y` on `grid` (quantized then dequantized), or `y` itself for float values.
    fn on_grid(&mut self, y: String, grid: Option<Grid>) -> String {
        match grid {
            Some(q) => self.qdq(y, &q),
            None => y,
        }
    }

    /// The float input clipped to the grid's range, quantized and dequantized.
    fn quantize(&mut self, x: String, a: &Grid) -> String {
        let y = self.clip_int(x, a.qmin, a.qmax, a);
        self.qdq(y, a)
    }

    /// Float `Add` (or `Sub`) of the two inputs, the fused clamp, the output grid.
    fn add(&mut self, xs: Vec<String>, a: &IntAdd) -> String {
        let op = if a.mb < 0 { "Sub" } else { "Add" };
        let y = self.node(op, xs, vec![]);
        let y = self.clip_int(y, a.lo, a.hi, &a.out);
        self.qdq(y, &a.out)
    }

    /// Float `Mul` of the two inputs, the fused clamp, the output grid.
    fn mul(&mut self, xs: Vec<String>, m: &IntMul) -> String {
        let y = self.node("Mul", xs, vec![]);
        let y = self.clip_int(y, m.lo, m.hi, &m.out);
        self.qdq(y, &m.out)
    }

    /// Layer normalization over the last axis in float, the output grid: `LayerNormalization`
    /// from opset 17, else its decomposition (which onnxruntime fuses back into one node).
    fn layer_norm(&mut self, x: String, l: &IntLayerNorm) -> String {
        let d = l.gamma.len();
        let gamma = self.f32s("ln_scale", &[d], &l.gamma);
        let beta = self.f32s("ln_bias", &[d], &l.beta);
        let y = if self.opset >= 17 {
            let attrs = vec![
                attr_int("axis", -1),
                AttributeProto {
                    name: Some("epsilon".into()),
                    r#type: Some(AttributeType::Float as i32),
                    f: Some(l.epsilon as f32),
                    ..Default::default()
                },
            ];
            self.node("LayerNormalization", vec![x, gamma, beta], attrs)
        } else {
            let mean_of = |g: &mut Self, v: String| {
                g.node(
                    "ReduceMean",
                    vec![v],
                    vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
                )
            };
            let mean = mean_of(self, x.clone());
            let centred = self.node("Sub", vec![x, mean], vec![]);
            let square = self.node("Mul", vec![centred.clone(), centred.clone()], vec![]);
            let var = mean_of(self, square);
            let eps = self.f32s("ln_epsilon", &[], &[l.epsilon as f32]);
            let var = self.node("Add", vec![var, eps], vec![]);
            let denom = self.node("Sqrt", vec![var], vec![]);
            let normalized = self.node("Div", vec![centred, denom], vec![]);
            let scaled = self.node("Mul", vec![normalized, gamma], vec![]);
            self.node("Add", vec![scaled, beta], vec![])
        };
        self.qdq(y, &l.output)
    }

    /// Float `MatMul` of the two inputs (dequantized), the clamp, the output grid: onnxruntime
    /// fuses `DequantizeLinear -> MatMul -> QuantizeLinear` into `QLinearMatMul`.
    fn matmul(&mut self, xs: Vec<String>, m: &IntMatMul) -> String {
        let y = self.node("MatMul", xs, vec![]);
        let y = self.clip_int(y, m.lo, m.hi, &m.out);
        self.qdq(y, &m.out)
    }

    /// Each input through its requantization table (if any), `Concat`, the output grid.
    fn concat(
        &mut self,
        xs: Vec<String>,
        axis: usize,
        requantize: &[Option<Lut>],
        grid: Option<Grid>,
    ) -> String {
        let mut parts = Vec::new();
        for (x, t) in xs.into_iter().zip(requantize) {
            parts.push(match t {
                Some(t) => self.lut(x, t),
                None => x,
            });
        }
        let y = self.node("Concat", parts, vec![attr_int("axis", axis as i64)]);
        self.on_grid(y, grid)
    }

    /// `MaxPool`, on the node's grid.
    fn max_pool(&mut self, x: String, w: &Window, rank: usize, grid: Option<Grid>) -> String {
        let y = self.pool("MaxPool", x, w, rank, vec![]);
        self.on_grid(y, grid)
    }

    /// `AveragePool`, requantized to the node's grid.
    fn avg_pool(
        &mut self,
        x: String,
        w: &Window,
        count_include_pad: bool,
        rank: usize,
        grid: Option<Grid>,
    ) -> String {
        let extra = vec![attr_int("count_include_pad", count_include_pad as i64)];
        let y = self.pool("AveragePool", x, w, rank, extra);
        self.on_grid(y, grid)
    }

    /// Adaptive pooling of an input of shape `input` as `GlobalAveragePool` (output 1) or an
    /// `AveragePool` whose windows tile the input; `Err`: why neither fits.
    fn adaptive_avg_pool(
        &mut self,
        x: String,
        output: [usize; 2],
        input: &[Dim],
        grid: Option<Grid>,
    ) -> Result<String, &'static str> {
        let rank = input.len();
        let (h, w) = if rank == 3 {
            (Some(1), dim_text(&input[2]))
        } else {
            (dim_text(&input[2]), dim_text(&input[3]))
        };
        let (Some(h), Some(w)) = (h, w) else {
            return Err("adaptive pooling over a batch-dependent axis");
        };
        let y = if output == [1, 1] {
            self.node("GlobalAveragePool", vec![x], vec![])
        } else if h % output[0] == 0 && w % output[1] == 0 {
            let (kh, kw) = (h / output[0], w / output[1]);
            let win = Window {
                kernel: [kh, kw],
                stride: [kh, kw],
                padding: [0; 4],
                dilation: [1, 1],
            };
            self.pool("AveragePool", x, &win, rank, vec![])
        } else {
            return Err(
                "ONNX has no adaptive pooling: the output size must divide the input size (or be 1)",
            );
        };
        Ok(self.on_grid(y, grid))
    }

    /// `Resize` (linear, `half_pixel` or `align_corners` coordinates) to `[N, C, size]`, its
    /// sizes made from the input's own shape (the batch is free), requantized to the node's
    /// grid.
    fn bilinear(
        &mut self,
        x: String,
        size: [usize; 2],
        align_corners: bool,
        grid: Option<Grid>,
    ) -> String {
        let shape = self.node("Shape", vec![x.clone()], vec![]);
        let i64s = |g: &mut Self, base: &str, v: &[i64]| {
            g.init(
                base,
                DataType::Int64,
                &[v.len()],
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        };
        let (start, end) = (i64s(self, "start", &[0]), i64s(self, "end", &[2]));
        let nc = self.node("Slice", vec![shape, start, end], vec![]);
        let hw = i64s(self, "size", &[size[0] as i64, size[1] as i64]);
        let sizes = self.node("Concat", vec![nc, hw], vec![attr_int("axis", 0)]);
        let mode = if align_corners {
            "align_corners"
        } else {
            "half_pixel"
        };
        let y = self.node(
            "Resize",
            vec![x, String::new(), String::new(), sizes],
            vec![
                attr_str("mode", "linear"),
                attr_str("coordinate_transformation_mode", mode),
            ],
        );
        self.on_grid(y, grid)
    }

    /// `ReduceMean` or `ReduceSum` along `axis`, requantized to the node's grid.
    fn mean_or_sum(&mut self, x: String, axis: usize, mean: bool, grid: Option<Grid>) -> String {
        let y = self.reduce(if mean { "ReduceMean" } else { "ReduceSum" }, x, axis);
        self.on_grid(y, grid)
    }

    /// `Reshape` to `shape` (its one batch-dependent axis as `-1`), on the input's grid;
    /// `Err`: several batch-dependent axes.
    fn reshape(
        &mut self,
        x: String,
        shape: &[Dim],
        grid: Option<Grid>,
    ) -> Result<String, &'static str> {
        let batch_dims = shape.iter().filter(|d| matches!(d, Dim::Batch(_))).count();
        if batch_dims > 1 {
            return Err("a reshape with several batch-dependent axes");
        }
        let target: Vec<i64> = shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(v) => *v as i64,
                Dim::Batch(_) => -1,
            })
            .collect();
        let s = self.init(
            "shape",
            DataType::Int64,
            &[target.len()],
            target.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let y = self.node("Reshape", vec![x, s], vec![]);
        Ok(self.on_grid(y, grid))
    }

    /// `Transpose` by `perm`, on the input's grid.
    fn permute(&mut self, x: String, perm: &[usize], grid: Option<Grid>) -> String {
        let p: Vec<i64> = perm.iter().map(|v| *v as i64).collect();
        let y = self.node("Transpose", vec![x], vec![attr_ints("perm", &p)]);
        self.on_grid(y, grid)
    }

    /// `Gather` of constant indices along `axis` (the values keep their grid).
    fn select(&mut self, x: String, axis: usize, indices: &[usize], grid: Option<Grid>) -> String {
        let i = self.init(
            "indices",
            DataType::Int64,
            &[indices.len()],
            indices
                .iter()
                .flat_map(|&v| (v as i64).to_le_bytes())
                .collect(),
        );
        let y = self.node("Gather", vec![x, i], vec![attr_int("axis", axis as i64)]);
        self.on_grid(y, grid)
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                None => tensor_shape_proto::dimension::Value::DimParam("N".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ONNX model (QDQ form) of `model`.
///
/// # Errors
///
/// An opset other than 13 or 21, an inconsistent model, or a node ONNX cannot express
/// (adaptive pooling whose output size does not divide its input).
pub fn to_model_proto(
    model: &IntegerModel,
    options: &OnnxOptions,
) -> Result<ModelProto, OnnxError> {
    if options.opset != 13 && options.opset != 21 {
        return Err(OnnxError::Opset(options.opset));
    }
    // Consistency only: the model's run budget is for `forward`, not for writing the file.
    model
        .cost()
        .map_err(|e| OnnxError::Invalid(e.to_string()))?;
    let mut g = Graph {
        opset: options.opset,
        ..Default::default()
    };
    let names = write_nodes(&mut g, model)?;
    let dims =
        |i: usize| -> Vec<Option<usize>> { model.nodes[i].shape.iter().map(dim_text).collect() };
    let outputs = output_names(model);
    for (k, (&o, name)) in model.outputs.iter().zip(&outputs).enumerate() {
        g.nodes.push(NodeProto {
            name: Some(if outputs.len() == 1 {
                "output".into()
            } else {
                format!("output.{k}")
            }),
            op_type: Some("Identity".into()),
            input: vec![names[o].clone()],
            output: vec![name.clone()],
            ..Default::default()
        });
    }
    let input_infos = input_names(model)
        .iter()
        .enumerate()
        .map(|(i, name)| value_info(name, &dims(i)))
        .collect();
    let output_infos = model
        .outputs
        .iter()
        .zip(&outputs)
        .map(|(&o, name)| value_info(name, &dims(o)))
        .collect();
    Ok(ModelProto {
        ir_version: Some(if options.opset >= 21 { 10 } else { 7 }),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(options.opset),
        }],
        producer_name: Some("burn-qat".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        metadata_props: vec![StringStringEntryProto {
            key: Some("burn_qat.precision".into()),
            value: Some(model.precision().join("\n")),
        }],
        graph: Some(GraphProto {
            name: Some("burn_qat_model".into()),
            node: g.nodes,
            initializer: g.inits,
            input: input_infos,
            output: output_infos,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Writes `model` as ONNX to `path` (through a temporary file: a failure leaves nothing
/// half-written at `path`).
pub fn save(model: &IntegerModel, path: &Path, options: &OnnxOptions) -> Result<(), OnnxError> {
    let bytes = to_model_proto(model, options)?.encode_to_vec();
    let io = |source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("onnx.part");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Decodes ONNX model bytes (to inspect an exported file).
pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}
