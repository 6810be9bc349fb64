//! Conversion of a trained [`QatGraph`] into an [`IntegerModel`]: one small function per
//! integer op, each built from its QAT twin (PyTorch's `from_float`), walking the graph once.
//!
//! Patterns (the graph as `prepare` leaves it): an op that computes new values (conv/linear
//! with its folded BatchNorm and fused activation, add, sub, mul, concat, average pooling,
//! mean, elementwise functions) is followed by optional ReLU/clamps (a chain of them is one
//! clamp, [`Activation::then`]) and its activation fake-quantizer, whose grid becomes the
//! integer op's output grid; max pooling (ceil mode included), reshape and permute keep their
//! input's grid; a fake-quantizer on the float input becomes `Quantize`.

use burn::module::Module;
use burn::nn::{BatchNorm, PaddingConfig1d, PaddingConfig2d};
use burn::prelude::*;
use burn_qat_core::{QParams, QuantSpec, reference};
use burn_qat_graph::{Dim, GraphLayer, GridRole, LayerKind, Node, Op, QatGraph, apply_unary};
use burn_qat_nn::{ActQuant, WeightFakeQuant};
use burn_qat_transform::{Activation, Fusable, Fused, fold};
use thiserror::Error;

use burn_qat_runtime::requant::FixedMultiplier;
use burn_qat_runtime::{
    Grid, IntAdd, IntConv2d, IntLayerNorm, IntLinear, IntMatMul, IntMul, IntNode, IntOp,
    IntSoftmax, IntegerModel, Lut, Output, Window,
};

/// The integer grid of a per-tensor quantized tensor with quantization parameters `qp` from
/// `spec`, in the runtime's 8-bit container (unsigned grids move down by 128, zero point
/// included).
///
/// ```
/// use burn_qat_core::{QParams, QuantSpec};
/// use burn_qat_export::grid_from_spec;
///
/// let spec = QuantSpec::int8_act_per_tensor_asymmetric();
/// let g = grid_from_spec(&spec, QParams { scale: 0.5, zero_point: -10 });
/// assert_eq!((g.qmin, g.qmax, g.bits()), (-128, 127, 8));
/// assert_eq!(g.dequantize(-6), 2.0);
/// ```
pub fn grid_from_spec(spec: &QuantSpec, qp: QParams) -> Grid {
    let shift = if spec.signed { 0 } else { 128 };
    Grid {
        scale: qp.scale,
        zero_point: qp.zero_point - shift,
        qmin: spec.qmin() - shift,
        qmax: spec.qmax() - shift,
    }
}

/// The runtime's form of a recorded dimension.
fn int_dim(d: Dim) -> burn_qat_runtime::Dim {
    match d {
        Dim::Fixed(n) => burn_qat_runtime::Dim::Fixed(n),
        Dim::Batch(k) => burn_qat_runtime::Dim::Batch(k),
    }
}

/// Why a model cannot become an integer model; each names the graph node (the user's module
/// path) and says what to do.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum ExportError {
    /// An op or layer with no integer implementation, or not quantized where it must be.
    #[error("`{path}` ({kind}) cannot be converted to integers: {hint}")]
    Unsupported {
        /// Graph node name (module path), e.g. `layer1.0.conv1`.
        path: String,
        /// The op or layer kind.
        kind: String,
        /// What to do.
        hint: String,
    },
    /// A value that the integer format cannot represent.
    #[error("`{path}`: {what}")]
    NotRepresentable {
        /// Graph node name.
        path: String,
        /// What overflowed.
        what: String,
    },
}

fn unsupported(node: &Node, kind: impl Into<String>, hint: impl Into<String>) -> ExportError {
    ExportError::Unsupported {
        path: node.name.clone(),
        kind: kind.into(),
        hint: hint.into(),
    }
}

/// An activation fake-quantizer as the integer model sees it: its grid in the 8-bit container,
/// and its spec and parameters (for its rounding, when tables are built).
#[derive(Clone, Copy)]
struct Quantizer {
    grid: Grid,
    spec: QuantSpec,
    qp: QParams,
}

/// The [`Quantizer`] of an activation fake-quantizer; errors name `node`.
fn grid_of(q: &ActQuant, node: &Node) -> Result<Quantizer, ExportError> {
    let configured = q.spec();
    if configured.axis().is_some() {
        return Err(unsupported(
            node,
            "per-channel activation quantizer",
            "activations must be quantized per tensor",
        ));
    }
    if configured.bits > 8 {
        return Err(unsupported(
            node,
            format!("{}-bit activation quantizer", configured.bits),
            "the integer model keeps activations in 8-bit containers: use at most 8 bits",
        ));
    }
    if !q.observer().is_enabled() {
        return Err(unsupported(
            node,
            "disabled activation quantizer",
            "enable fake quantization (switches::set_fake_quant_enabled) and train before converting: the integer model must compute what the QAT model computes",
        ));
    }
    let Some((spec, qps)) = q.grid() else {
        return Err(unsupported(
            node,
            "activation quantizer",
            "its observer has seen no data: train (or calibrate) before converting",
        ));
    };
    Ok(Quantizer {
        grid: grid_from_spec(&spec, qps[0]),
        spec,
        qp: qps[0],
    })
}

/// A float `[lo, hi]` clamp on the grid of `g` as integers (ReLU: `lo = zero_point`).
fn clamp_bounds(activation: Activation, g: &Grid) -> (i32, i32) {
    match activation {
        Activation::Identity => (g.qmin, g.qmax),
        Activation::Relu => (g.zero_point.max(g.qmin), g.qmax),
        Activation::Relu6 => (g.zero_point.max(g.qmin), g.quantize(6.0)),
        Activation::Clamp { min, max } => (g.quantize(min), g.quantize(max)),
    }
}

/// What follows a computing node: the ReLU/clamp nodes fused after it (a chain, each the only
/// reader of the one before), what they compute together, and the quantizer of the result
/// (node indices).
struct Tail {
    activations: Vec<usize>,
    activation: Activation,
    quant: Option<usize>,
    /// `quant` is the quantizer of the concat that alone reads this node (`graph::prepare`
    /// quantizes such outputs on the concat's grid only): the node requantizes onto that grid,
    /// the concat computes the quantizer.
    borrowed: bool,
}

struct Converter<'a> {
    graph: &'a QatGraph,
    users: Vec<Vec<usize>>,
    device: Device,
    nodes: Vec<IntNode>,
    /// Graph node to integer node.
    map: Vec<Option<usize>>,
}

impl<'a> Converter<'a> {
    fn gnode(&self, i: usize) -> &'a Node {
        &self.graph.program.nodes[i]
    }

    fn quant_layer(&self, i: usize) -> Option<&'a ActQuant> {
        match self.gnode(i).op {
            Op::Layer {
                index,
                kind: LayerKind::Quant,
            } => match &self.graph.layers[index] {
                GraphLayer::Quant(q) => Some(q),
                _ => None,
            },
            _ => None,
        }
    }

    fn tail(&self, i: usize) -> Tail {
        let single = |j: usize| {
            (self.users[j].len() == 1 && !self.graph.program.outputs.contains(&j))
                .then(|| self.users[j][0])
        };
        let mut at = i;
        let mut activations = Vec::new();
        let mut activation = Activation::Identity;
        // A chain of clamps is one clamp (`graph::prepare` composes them already; a graph
        // built otherwise may hold several).
        while let Some(u) = single(at)
            && self.gnode(u).op.grid_role() == GridRole::FusableActivation
            && let Some(a) = self.gnode(u).op.activation()
        {
            activations.push(u);
            activation = activation.then(a);
            at = u;
        }
        let quant_after = |j: usize| single(j).filter(|u| self.quant_layer(*u).is_some());
        let (quant, borrowed) = match quant_after(at) {
            Some(q) => (Some(q), false),
            None => {
                let concat = single(at)
                    .filter(|&c| matches!(self.gnode(c).op, Op::Concat { .. }))
                    .and_then(quant_after);
                (concat, concat.is_some())
            }
        };
        Tail {
            activations,
            activation,
            quant,
            borrowed,
        }
    }

    /// The integer node of graph node `j` and its grid (`None`: float).
    fn input(&self, i: usize, k: usize) -> (usize, Option<Grid>) {
        let j = self.gnode(i).inputs[k];
        let m = self.map[j].expect("inputs are converted first");
        (m, self.nodes[m].grid)
    }

    fn int_input(&self, i: usize, k: usize) -> Result<(usize, Grid), ExportError> {
        match self.input(i, k) {
            (m, Some(g)) => Ok((m, g)),
            (_, None) => Err(unsupported(
                self.gnode(i),
                self.gnode(i).op.call(),
                format!(
                    "its input `{}` is float: quantize it (do not skip the layer before, keep activation quantization enabled)",
                    self.gnode(self.gnode(i).inputs[k]).name
                ),
            )),
        }
    }

    fn push(&mut self, i: usize, op: IntOp, inputs: Vec<usize>, grid: Option<Grid>) -> usize {
        let node = self.gnode(i);
        self.nodes.push(IntNode {
            name: node.name.clone(),
            op,
            inputs,
            shape: node.shape.iter().copied().map(int_dim).collect(),
            grid,
        });
        let m = self.nodes.len() - 1;
        self.map[i] = Some(m);
        m
    }

    /// The quantizer after node `i` (required), with the fused activations before it (one
    /// clamp).
    fn required_tail(&self, i: usize) -> Result<(Activation, Quantizer), ExportError> {
        let t = self.tail(i);
        let node = self.gnode(i);
        let Some(q) = t.quant else {
            return Err(unsupported(
                node,
                node.op.call(),
                "its output has no activation quantizer (skipped layer or activations disabled for it): the integer model quantizes every computed tensor",
            ));
        };
        let quantizer = grid_of(self.quant_layer(q).expect("checked by tail"), self.gnode(q))?;
        Ok((t.activation, quantizer))
    }

    /// Maps the activations and quantizer after graph node `i` to integer node `n`.
    fn emit_cover(&mut self, i: usize, n: usize) {
        let t = self.tail(i);
        let own = t.quant.filter(|_| !t.borrowed);
        for j in t.activations.into_iter().chain(own) {
            self.map[j] = Some(n);
        }
    }

    /// Pushes the integer node of graph node `i` and maps the activation and quantizer after
    /// `i` (which it computes too) to it.
    fn emit(&mut self, i: usize, op: IntOp, inputs: Vec<usize>, grid: Option<Grid>) -> usize {
        let n = self.push(i, op, inputs, grid);
        self.emit_cover(i, n);
        n
    }

    /// Ends graph node `i`, computed by integer node `n` on the grid of `out`: the activation
    /// fused after it as a table on that grid (if any), then the activations and quantizer after
    /// `i` map to the last node.
    fn finish_on_grid(
        &mut self,
        i: usize,
        mut n: usize,
        activation: Activation,
        out: &Quantizer,
    ) -> Result<(), ExportError> {
        if activation != Activation::Identity {
            let name = format!("{activation:?}");
            let lut = self.table(i, &name, out.grid, out, |x| activation.forward(x))?;
            n = self.push(i, IntOp::Lut(lut), vec![n], Some(out.grid));
        }
        self.emit_cover(i, n);
        Ok(())
    }

    /// Converts graph node `i` (and the activations and quantizer it absorbs): one converter
    /// per op family.
    fn convert_node(&mut self, i: usize) -> Result<(), ExportError> {
        let node = self.gnode(i);
        match &node.op {
            Op::Input => self.input_from_float(i),
            Op::Layer { index, .. } => self.layer_from_float(i, *index),
            Op::Add | Op::Sub | Op::Mul | Op::MatMul => self.binary_from_float(i),
            Op::Concat { axis } => self.concat_from_float(i, *axis),
            Op::Softmax { axis } => self.softmax_from_float(i, *axis),
            op if op.is_unary() => self.lut_from_float(i),
            Op::MaxPool1d { .. }
            | Op::MaxPool2d { .. }
            | Op::AvgPool1d { .. }
            | Op::AvgPool2d { .. } => self.pool_from_float(i),
            Op::AdaptiveAvgPool1d { output } => self.adaptive_pool_from_float(i, [1, *output]),
            Op::AdaptiveAvgPool2d { output } => self.adaptive_pool_from_float(i, *output),
            Op::Bilinear {
                size,
                align_corners,
            } => self.bilinear_from_float(i, *size, *align_corners),
            Op::MeanDim { axis } => self.reduce_from_float(i, *axis, true),
            Op::SumDim { axis } => self.reduce_from_float(i, *axis, false),
            Op::Reshape { .. } => self.layout_from_float(i, IntOp::Reshape),
            Op::SwapDims { a, b } => {
                let mut perm: Vec<usize> = (0..node.shape.len()).collect();
                perm.swap(*a, *b);
                self.layout_from_float(i, IntOp::Permute { perm })
            }
            Op::Permute { axes } => {
                self.layout_from_float(i, IntOp::Permute { perm: axes.clone() })
            }
            Op::Select { axis, indices } => self.layout_from_float(
                i,
                IntOp::Select {
                    axis: *axis,
                    indices: indices.clone(),
                },
            ),
            op => Err(unsupported(
                node,
                op.call(),
                op.integer_refusal().unwrap_or("no integer kernel"),
            )),
        }
    }

    /// Max and average pooling, 1-D (on the window's second axis) and 2-D.
    fn pool_from_float(&mut self, i: usize) -> Result<(), ExportError> {
        match self.gnode(i).op {
            Op::MaxPool1d {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => {
                let w = window_1d(kernel, stride, padding, dilation);
                self.max_pool_from_float(i, w, ceil_mode)
            }
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => {
                let w = window_2d(kernel, stride, padding, dilation);
                self.max_pool_from_float(i, w, ceil_mode)
            }
            Op::AvgPool1d {
                kernel,
                stride,
                padding,
                count_include_pad,
                ceil_mode,
            } => {
                let w = window_1d(kernel, stride, padding, 1);
                self.avg_pool_from_float(i, w, count_include_pad, ceil_mode)
            }
            Op::AvgPool2d {
                kernel,
                stride,
                padding,
                count_include_pad,
                ceil_mode,
            } => {
                let w = window_2d(kernel, stride, padding, [1, 1]);
                self.avg_pool_from_float(i, w, count_include_pad, ceil_mode)
            }
            _ => unreachable!("convert_node calls pool_from_float on pooling ops"),
        }
    }

    /// The model's float input.
    fn input_from_float(&mut self, i: usize) -> Result<(), ExportError> {
        self.push(i, IntOp::Input, vec![], None);
        Ok(())
    }

    /// A layer node: a fake-quantizer, a conv/linear with its folded BatchNorm and fused
    /// activation, or a BatchNorm on its own.
    fn layer_from_float(&mut self, i: usize, index: usize) -> Result<(), ExportError> {
        let node = self.gnode(i);
        match &self.graph.layers[index] {
            GraphLayer::Quant(q) => self.quantize_from_float(i, q),
            GraphLayer::Conv2d(f) => {
                let (geometry, padding) = conv2d_geometry(f, node)?;
                self.conv_from_float(i, f, f.layer.groups, geometry, padding)
            }
            GraphLayer::Conv1d(f) => {
                let (geometry, padding) = conv1d_geometry(f, node)?;
                self.conv_from_float(i, f, f.layer.groups, geometry, padding)
            }
            GraphLayer::Linear(f) => self.linear_from_float(i, f),
            GraphLayer::BatchNorm(bn) => self.batch_norm_from_float(i, bn),
            GraphLayer::LayerNorm(ln) => self.layer_norm_from_float(i, ln),
            GraphLayer::Param(p) => self.param_from_float(i, p),
        }
    }

    /// A parameter read as data: its values (through an activation fused after it) on the grid
    /// of the quantizer after it, a constant of the integer model.
    fn param_from_float(
        &mut self,
        i: usize,
        p: &burn_qat_graph::GraphParam,
    ) -> Result<(), ExportError> {
        let (activation, out) = self.required_tail(i)?;
        let flat = p.flat();
        let len = flat.dims()[0];
        let values = self.quantized(i, "parameter", activation.forward(flat), len, &out)?;
        let n = self.push(i, IntOp::Constant { values }, vec![], Some(out.grid));
        self.emit_cover(i, n);
        Ok(())
    }

    /// A LayerNorm: a float island on the integer grids (see [`IntLayerNorm`]), onto the grid
    /// of the quantizer after it (an activation after it by a table on that grid).
    fn layer_norm_from_float(
        &mut self,
        i: usize,
        ln: &burn_qat_graph::GraphLayerNorm,
    ) -> Result<(), ExportError> {
        let (m, input) = self.int_input(i, 0)?;
        let (activation, out) = self.required_tail(i)?;
        let node = self.gnode(i);
        let gamma = finite_weights(ln.norm.gamma.val(), node)?;
        let beta = match &ln.norm.beta {
            Some(b) => finite_weights(b.val(), node)?,
            None => vec![0.0; gamma.len()],
        };
        let op = IntOp::LayerNorm(IntLayerNorm {
            input,
            output: out.grid,
            gamma,
            beta,
            epsilon: ln.epsilon,
        });
        let n = self.push(i, op, vec![m], Some(out.grid));
        self.finish_on_grid(i, n, activation, &out)
    }

    /// Reshape and permute: the same integers in another layout, on their input's grid.
    fn layout_from_float(&mut self, i: usize, op: IntOp) -> Result<(), ExportError> {
        let (m, g) = self.input(i, 0);
        self.push(i, op, vec![m], g);
        Ok(())
    }

    /// `Quantize` of the float input, or a requantization of an integer tensor.
    fn quantize_from_float(&mut self, i: usize, q: &ActQuant) -> Result<(), ExportError> {
        let out = grid_of(q, self.gnode(i))?;
        match self.input(i, 0) {
            (m, None) => {
                self.push(i, IntOp::Quantize(out.grid), vec![m], Some(out.grid));
            }
            (m, Some(g)) if g == out.grid => self.map[i] = Some(m),
            (m, Some(g)) => {
                let lut = self.table(i, "Requantize", g, &out, |x| x)?;
                self.push(i, IntOp::Lut(lut), vec![m], Some(out.grid));
            }
        }
        Ok(())
    }

    /// A 256-entry table: `quantize(f(dequantize(q)))` with the output quantizer's own
    /// rounding, `f` evaluated with the graph's Burn ops on the graph's device.
    fn table(
        &self,
        i: usize,
        function: &str,
        input: Grid,
        out: &Quantizer,
        f: impl FnOnce(Tensor<1>) -> Tensor<1>,
    ) -> Result<Lut, ExportError> {
        let xs: Vec<f32> = (-128..=127).map(|q| input.dequantize(q)).collect();
        let x = Tensor::<1>::from_floats(xs.as_slice(), &self.device);
        Ok(Lut {
            function: function.into(),
            input,
            output: out.grid,
            table: self.quantized(i, function, f(x), 256, out)?,
        })
    }

    /// `values` (a tensor of `expected` values) quantized by `out`, with its own rounding, in
    /// its 8-bit container.
    fn quantized<const D: usize>(
        &self,
        i: usize,
        function: &str,
        values: Tensor<D>,
        expected: usize,
        out: &Quantizer,
    ) -> Result<Vec<i8>, ExportError> {
        let ys: Vec<f32> = values
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        if ys.len() != expected {
            return Err(ExportError::NotRepresentable {
                path: self.gnode(i).name.clone(),
                what: format!(
                    "its {function} table came back with {} of {expected} values",
                    ys.len()
                ),
            });
        }
        let shift = if out.spec.signed { 0 } else { 128 };
        Ok(ys
            .iter()
            .map(|y| {
                (reference::quantize(*y, out.qp, &out.spec) - shift)
                    .clamp(out.grid.qmin, out.grid.qmax) as i8
            })
            .collect())
    }

    /// A BatchNorm that follows no conv/linear (after a concat or an add, say): in evaluation a
    /// per-channel affine map, so on 8-bit input one table per channel, built by running the
    /// graph's BatchNorm (running statistics) and its fused activation on the 256 values.
    fn batch_norm_from_float(&mut self, i: usize, bn: &BatchNorm) -> Result<(), ExportError> {
        let (m, input) = self.int_input(i, 0)?;
        let (activation, out) = self.required_tail(i)?;
        let channels = bn.gamma.val().dims()[0];
        // x[q, c, 0] = dequantize(q) for every channel.
        let xs: Vec<f32> = (-128..=127)
            .flat_map(|q| std::iter::repeat_n(input.dequantize(q), channels))
            .collect();
        let x = Tensor::<1>::from_floats(xs.as_slice(), &self.device).reshape([256, channels, 1]);
        let y = activation.forward(bn.forward(x));
        // Channel-major: table[c * 256 + q + 128].
        let y = y.reshape([256, channels]).transpose();
        let lut = Lut {
            function: "BatchNorm".into(),
            input,
            output: out.grid,
            table: self.quantized(i, "BatchNorm", y, 256 * channels, &out)?,
        };
        self.emit(
            i,
            IntOp::ChannelLut { lut, channels },
            vec![m],
            Some(out.grid),
        );
        Ok(())
    }

    fn lut_from_float(&mut self, i: usize) -> Result<(), ExportError> {
        let op = self.gnode(i).op.clone();
        let (m, g_in) = self.int_input(i, 0)?;
        let (activation, out) = self.required_tail(i)?;
        let lut = self.table(i, &op.name(), g_in, &out, |x| {
            activation.forward(apply_unary(&op, x).expect("a unary op"))
        })?;
        self.emit(i, IntOp::Lut(lut), vec![m], Some(out.grid));
        Ok(())
    }

    fn binary_from_float(&mut self, i: usize) -> Result<(), ExportError> {
        let node = self.gnode(i);
        let (ma, a) = self.int_input(i, 0)?;
        let (mb, b) = self.int_input(i, 1)?;
        let (activation, Quantizer { grid: out, .. }) = self.required_tail(i)?;
        let (lo, hi) = clamp_bounds(activation, &out);
        let multiplier = FixedMultiplier::new(a.scale as f64 * b.scale as f64 / out.scale as f64);
        let op = match node.op {
            Op::MatMul => IntOp::MatMul(IntMatMul {
                a,
                b,
                out,
                multiplier,
                lo,
                hi,
            }),
            Op::Mul => IntOp::Mul(IntMul {
                a,
                b,
                out,
                multiplier,
                lo,
                hi,
            }),
            _ => {
                const SHIFT: u32 = 40;
                let fixed = |s: f32| {
                    let m = (s as f64 / out.scale as f64 * (1u64 << SHIFT) as f64).round();
                    if m.abs() < (1u64 << 62) as f64 / 512.0 {
                        Ok(m as i64)
                    } else {
                        Err(ExportError::NotRepresentable {
                            path: node.name.clone(),
                            what: format!(
                                "add input scale {s} is {} times its output scale",
                                s / out.scale
                            ),
                        })
                    }
                };
                let sign = if node.op == Op::Sub { -1 } else { 1 };
                IntOp::Add(IntAdd {
                    a,
                    b,
                    out,
                    ma: fixed(a.scale)?,
                    mb: sign * fixed(b.scale)?,
                    shift: SHIFT,
                    lo,
                    hi,
                })
            }
        };
        self.emit(i, op, vec![ma, mb], Some(out));
        Ok(())
    }

    /// Softmax on the integer grid: the exponential of each value's distance below its row's
    /// maximum by table, normalized onto the grid of the quantizer after it (an activation
    /// after it is applied on that grid by a table).
    fn softmax_from_float(&mut self, i: usize, axis: usize) -> Result<(), ExportError> {
        let (m, input) = self.int_input(i, 0)?;
        let (activation, out) = self.required_tail(i)?;
        let op = IntOp::Softmax(IntSoftmax {
            axis,
            input,
            output: out.grid,
            table: IntSoftmax::table_for(input.scale),
        });
        let n = self.push(i, op, vec![m], Some(out.grid));
        self.finish_on_grid(i, n, activation, &out)
    }

    /// Bilinear resizing onto the grid of the quantizer after it (an activation after it is
    /// applied on that grid by a table, as after a concatenation).
    fn bilinear_from_float(
        &mut self,
        i: usize,
        size: [usize; 2],
        align_corners: bool,
    ) -> Result<(), ExportError> {
        let (m, input) = self.int_input(i, 0)?;
        let (activation, out) = self.required_tail(i)?;
        if activation != Activation::Identity {
            return Err(unsupported(
                self.gnode(i),
                self.gnode(i).op.call(),
                "an activation right after a bilinear resize: quantize between them (graph::prepare \
                 does), or apply it before the resize",
            ));
        }
        let op = IntOp::Bilinear {
            size,
            align_corners,
            input,
        };
        self.emit(i, op, vec![m], Some(out.grid));
        Ok(())
    }

    fn concat_from_float(&mut self, i: usize, axis: usize) -> Result<(), ExportError> {
        let (activation, out) = self.required_tail(i)?;
        let mut inputs = Vec::new();
        let mut requantize = Vec::new();
        for k in 0..self.gnode(i).inputs.len() {
            let (m, g) = self.int_input(i, k)?;
            inputs.push(m);
            requantize.push(if g == out.grid && activation == Activation::Identity {
                None
            } else {
                Some(self.table(i, "Requantize", g, &out, |x| activation.forward(x))?)
            });
        }
        self.emit(
            i,
            IntOp::Concat { axis, requantize },
            inputs,
            Some(out.grid),
        );
        Ok(())
    }

    fn max_pool_from_float(
        &mut self,
        i: usize,
        window: Window,
        ceil_mode: bool,
    ) -> Result<(), ExportError> {
        let (m, g) = self.int_input(i, 0)?;
        let window = if ceil_mode {
            self.ceil_window(i, window)?
        } else {
            window
        };
        self.push(i, IntOp::MaxPool(window), vec![m], Some(g));
        Ok(())
    }

    /// Max pooling in ceil mode as the same window with more end padding. Ceil mode lets the
    /// last window of an axis run past the input (Burn, PyTorch and ONNX keep it when it starts
    /// inside the input or its begin padding) and takes the max over the part inside; the
    /// integer max pool never picks a padded position, so padding the end until the floor-mode
    /// size formula gives the recorded output size computes exactly that, for the traced input
    /// size (the integer model's input size is fixed but for the batch).
    fn ceil_window(&self, i: usize, mut w: Window) -> Result<Window, ExportError> {
        let node = self.gnode(i);
        let input = &self.gnode(node.inputs[0]).shape;
        let refuse = |why: String| {
            Err(unsupported(
                node,
                node.op.call(),
                format!("{why}: use ceil_mode false, or pad the input explicitly"),
            ))
        };
        // (shape axis, window axis): a 1-D pooling runs on the window's second axis.
        let axes: &[(usize, usize)] = match node.shape.len() {
            3 => &[(2, 1)],
            4 => &[(2, 0), (3, 1)],
            r => return refuse(format!("a rank-{r} output")),
        };
        for &(d, a) in axes {
            let (Some(Dim::Fixed(n)), Some(Dim::Fixed(out))) = (input.get(d), node.shape.get(d))
            else {
                return refuse(format!(
                    "input {input:?} and output {:?} sizes along axis {d} are not fixed",
                    node.shape
                ));
            };
            let (n, out) = (*n, *out);
            let span = w.dilation[a] * w.kernel[a].saturating_sub(1) + 1;
            let begin = w.padding[2 * a];
            let last_start = out.saturating_sub(1) * w.stride[a];
            if out == 0 || last_start >= begin + n {
                return refuse(format!(
                    "its last window along axis {d} starts past the input ({out} outputs of {n} values)"
                ));
            }
            // The last window ends at `last_start + span` in padded coordinates.
            let padded = begin + n + w.padding[2 * a + 1];
            w.padding[2 * a + 1] += (last_start + span).saturating_sub(padded);
        }
        let batch_one: Vec<usize> = input.iter().map(|d| d.at(1)).collect();
        let want: Vec<usize> = node.shape.iter().map(|d| d.at(1)).collect();
        match burn_qat_runtime::ops::pool_shape(&w, &batch_one) {
            Some(got) if got == want => Ok(w),
            got => refuse(format!(
                "the window {w:?} gives {got:?} on {batch_one:?}, the graph records {want:?}"
            )),
        }
    }

    fn avg_pool_from_float(
        &mut self,
        i: usize,
        window: Window,
        count_include_pad: bool,
        ceil_mode: bool,
    ) -> Result<(), ExportError> {
        if ceil_mode {
            return Err(unsupported(
                self.gnode(i),
                self.gnode(i).op.call(),
                "use ceil_mode false",
            ));
        }
        self.averaging_from_float(i, true, |input| IntOp::AvgPool {
            window,
            count_include_pad,
            input,
        })
    }

    /// Adaptive average pooling to `output` (`[1, n]` for 1-D).
    fn adaptive_pool_from_float(
        &mut self,
        i: usize,
        output: [usize; 2],
    ) -> Result<(), ExportError> {
        self.averaging_from_float(i, true, |input| IntOp::AdaptiveAvgPool { output, input })
    }

    /// Mean (or sum) along `axis`.
    fn reduce_from_float(&mut self, i: usize, axis: usize, mean: bool) -> Result<(), ExportError> {
        self.averaging_from_float(i, mean, |input| IntOp::Reduce { axis, mean, input })
    }

    /// Average pooling, adaptive pooling and reductions: an integer sum requantized to the
    /// quantizer after them, then the fused activation as a table on that grid. An average
    /// (`mean`) with no quantizer after it keeps its input's grid, as TFLite's AVERAGE_POOL_2D
    /// (a lowered `Sequential` pools that way); a sum needs its own grid.
    fn averaging_from_float(
        &mut self,
        i: usize,
        mean: bool,
        op: impl FnOnce(Grid) -> IntOp,
    ) -> Result<(), ExportError> {
        let (m, g_in) = self.int_input(i, 0)?;
        if mean && self.tail(i).quant.is_none() && !self.graph.program.outputs.contains(&i) {
            self.push(i, op(g_in), vec![m], Some(g_in));
            return Ok(());
        }
        let (activation, out) = self.required_tail(i)?;
        let n = self.push(i, op(g_in), vec![m], Some(out.grid));
        self.finish_on_grid(i, n, activation, &out)
    }

    /// The parts every conv/linear node shares: its input, the folded and quantized weights,
    /// and its output.
    fn affine_from_float<L, const DI: usize, const DW: usize>(
        &self,
        i: usize,
        f: &Fused<L>,
    ) -> Result<(usize, Grid, Affine, Output), ExportError>
    where
        L: Fusable<DI, DW>,
    {
        let (m, input) = self.int_input(i, 0)?;
        let affine = quantize_affine(f, &input, self.gnode(i))?;
        let output = self.output_of(i, f.activation, &input, &affine.weight_scale)?;
        Ok((m, input, affine, output))
    }

    fn conv_from_float<L, const DI: usize, const DW: usize>(
        &mut self,
        i: usize,
        f: &Fused<L>,
        groups: usize,
        (stride, dilation): ([usize; 2], [usize; 2]),
        padding: [usize; 4],
    ) -> Result<(), ExportError>
    where
        L: Fusable<DI, DW>,
    {
        let (m, input, a, output) = self.affine_from_float(i, f)?;
        let kernel = match a.dims[..] {
            [_, _, k] => [1, k],
            [_, _, kh, kw] => [kh, kw],
            _ => unreachable!("conv weights have rank 3 or 4"),
        };
        let grid = output.grid();
        let conv = IntConv2d {
            in_channels: a.dims[1] * groups,
            out_channels: a.dims[0],
            groups,
            kernel,
            stride,
            dilation,
            padding,
            weight: a.weight,
            weight_bits: a.weight_bits,
            weight_scale: a.weight_scale,
            bias: a.bias,
            input,
            output,
        };
        self.emit(i, IntOp::Conv2d(conv), vec![m], grid);
        Ok(())
    }

    fn linear_from_float(
        &mut self,
        i: usize,
        f: &Fused<burn::nn::Linear>,
    ) -> Result<(), ExportError> {
        let (m, input, a, output) = self.affine_from_float(i, f)?;
        let grid = output.grid();
        let linear = IntLinear {
            in_features: a.dims[0],
            out_features: a.dims[1],
            weight: a.weight,
            weight_bits: a.weight_bits,
            weight_scale: a.weight_scale,
            bias: a.bias,
            input,
            output,
        };
        self.emit(i, IntOp::Linear(linear), vec![m], grid);
        Ok(())
    }

    /// A conv/linear output: requantized to the quantizer after it, or float if it is the
    /// model's output and has none.
    fn output_of(
        &self,
        i: usize,
        activation: Activation,
        input: &Grid,
        weight_scale: &[f32],
    ) -> Result<Output, ExportError> {
        if self.tail(i).quant.is_none() && self.graph.program.outputs.contains(&i) {
            let (lo, hi) = activation.bounds();
            return Ok(Output::Float {
                scale: weight_scale.iter().map(|sw| input.scale * sw).collect(),
                lo,
                hi,
            });
        }
        // The layer's fused activation, then the clamps after it: one clamp.
        let (after, Quantizer { grid, .. }) = self.required_tail(i)?;
        let (lo, hi) = clamp_bounds(activation.then(after), &grid);
        Ok(Output::Quantized {
            grid,
            requant: weight_scale
                .iter()
                .map(|sw| FixedMultiplier::new(input.scale as f64 * *sw as f64 / grid.scale as f64))
                .collect(),
            lo,
            hi,
        })
    }
}

/// The window of a 1-D pooling, on the second axis of a 2-D one.
fn window_1d(kernel: usize, stride: usize, padding: usize, dilation: usize) -> Window {
    Window {
        kernel: [1, kernel],
        stride: [1, stride],
        padding: [0, 0, padding, padding],
        dilation: [1, dilation],
    }
}

/// The window of a 2-D pooling with symmetric `[h, w]` padding.
fn window_2d(
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
) -> Window {
    Window {
        kernel,
        stride,
        padding: [padding[0], padding[0], padding[1], padding[1]],
        dilation,
    }
}

/// Stride and dilation, and padding `[top, bottom, left, right]`, of a 1-D convolution as a
/// 2-D one with a kernel of height 1.
fn conv1d_geometry(
    f: &burn_qat_transform::FusedConv1d,
    node: &Node,
) -> Result<(([usize; 2], [usize; 2]), [usize; 4]), ExportError> {
    let (left, right) = match f.layer.padding {
        PaddingConfig1d::Valid => (0, 0),
        PaddingConfig1d::Explicit(l, r) => (l, r),
        _ => {
            return Err(unsupported(
                node,
                "Conv1d with Same padding",
                "use PaddingConfig1d::Explicit",
            ));
        }
    };
    Ok((
        ([1, f.layer.stride], [1, f.layer.dilation]),
        [0, 0, left, right],
    ))
}

/// Stride and dilation, and padding `[top, bottom, left, right]`, of a 2-D convolution.
fn conv2d_geometry(
    f: &burn_qat_transform::FusedConv2d,
    node: &Node,
) -> Result<(([usize; 2], [usize; 2]), [usize; 4]), ExportError> {
    let conv = &f.layer;
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, bottom, left, right],
        _ => {
            return Err(unsupported(
                node,
                "Conv2d with Same padding",
                "use PaddingConfig2d::Explicit",
            ));
        }
    };
    Ok((
        (
            [conv.stride[0], conv.stride[1]],
            [conv.dilation[0], conv.dilation[1]],
        ),
        padding,
    ))
}

struct Affine {
    /// Weight shape.
    dims: Vec<usize>,
    weight: Vec<i8>,
    weight_bits: u32,
    weight_scale: Vec<f32>,
    bias: Vec<i32>,
}

/// Folded, quantized weights (output channel along `L::WEIGHT_AXIS`) and int32 bias with
/// scale `s_in * s_w`.
fn quantize_affine<L, const DI: usize, const DW: usize>(
    f: &Fused<L>,
    input: &Grid,
    node: &Node,
) -> Result<Affine, ExportError>
where
    L: Fusable<DI, DW>,
{
    let wq = weight_quantizer(f, node)?;
    let spec: QuantSpec = wq.spec;
    let (w, b) = match &f.bn {
        Some(bn) => {
            let (w, b) = fold::fold_params(f.layer.weight(), f.layer.bias(), bn, L::WEIGHT_AXIS);
            (w, Some(b))
        }
        None => (f.layer.weight(), f.layer.bias()),
    };
    let dims = w.dims().to_vec();
    let qps: Vec<QParams> = wq.qparams_for(w.clone());
    let values = finite_weights(w, node)?;
    let channels = dims[L::WEIGHT_AXIS];
    let after: usize = dims[L::WEIGHT_AXIS + 1..].iter().product();
    let channel_of = |i: usize| {
        if qps.len() == 1 {
            0
        } else {
            (i / after) % channels
        }
    };
    let weight: Vec<i8> = values
        .iter()
        .enumerate()
        .map(|(i, v)| reference::quantize(*v, qps[channel_of(i)], &spec) as i8)
        .collect();
    let weight_scale: Vec<f32> = (0..channels)
        .map(|c| qps[if qps.len() == 1 { 0 } else { c }].scale)
        .collect();
    let bias_f: Vec<f32> = match b {
        Some(b) => b
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default(),
        None => vec![0.0; channels],
    };
    let bias = quantize_bias(&bias_f, input, &weight_scale, node)?;
    accumulator_ok(&weight, |i| (i / after) % channels, &bias, input, node)?;
    Ok(Affine {
        dims,
        weight,
        weight_bits: spec.bits,
        weight_scale,
        bias,
    })
}

/// The layer's weight fake-quantizer: enabled, signed, symmetric, at most 8 bits.
fn weight_quantizer<'f, L, const DI: usize, const DW: usize>(
    f: &'f Fused<L>,
    node: &Node,
) -> Result<&'f WeightFakeQuant, ExportError>
where
    L: Fusable<DI, DW>,
{
    let Some(wq) = f.weight_quant.as_ref().filter(|w| w.is_enabled()) else {
        return Err(unsupported(
            node,
            "layer with float weights",
            "quantize its weights (do not skip it in QatConfig; keep weight fake-quant enabled)",
        ));
    };
    let spec = wq.spec;
    if spec.bits > 8 || !spec.symmetric || !spec.signed {
        return Err(unsupported(
            node,
            format!(
                "{}-bit weights (symmetric: {}, signed: {})",
                spec.bits, spec.symmetric, spec.signed
            ),
            "the integer model takes signed symmetric weights of at most 8 bits",
        ));
    }
    Ok(wq)
}

/// The (folded) weight's values, all finite.
fn finite_weights<const D: usize>(w: Tensor<D>, node: &Node) -> Result<Vec<f32>, ExportError> {
    let values = w
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(ExportError::NotRepresentable {
            path: node.name.clone(),
            what: format!(
                "weight {i} (after BatchNorm folding) is {v}: weights must be finite (did training diverge?)"
            ),
        });
    }
    Ok(values)
}

/// The float bias of each channel in units of `s_in * s_w[c]`, rounded half to even, in int32
/// ([`reference::bias_steps`], which the QAT graph's forward emulates).
fn quantize_bias(
    bias_f: &[f32],
    input: &Grid,
    weight_scale: &[f32],
    node: &Node,
) -> Result<Vec<i32>, ExportError> {
    let mut bias = Vec::with_capacity(weight_scale.len());
    for c in 0..weight_scale.len() {
        if !bias_f[c].is_finite() {
            return Err(ExportError::NotRepresentable {
                path: node.name.clone(),
                what: format!(
                    "bias of channel {c} (after BatchNorm folding) is {}: biases must be finite (did training diverge?)",
                    bias_f[c]
                ),
            });
        }
        // In f32, by the function the QAT graph's forward uses (the same steps exactly).
        let s = input.scale * weight_scale[c];
        let q = reference::bias_steps(bias_f[c], input.scale, weight_scale[c]);
        if !q.is_finite() || q.abs() >= i32::MAX as f32 {
            return Err(ExportError::NotRepresentable {
                path: node.name.clone(),
                what: format!(
                    "bias {} of channel {c} is {q:.3e} in units of s_in * s_w = {s:.3e}: it overflows int32",
                    bias_f[c]
                ),
            });
        }
        bias.push(q as i32);
    }
    Ok(bias)
}

/// The int32 accumulator of the quantized layer cannot overflow on the input grid
/// ([`burn_qat_runtime::accumulator_bound`]).
fn accumulator_ok(
    weight: &[i8],
    channel_of: impl Fn(usize) -> usize,
    bias: &[i32],
    input: &Grid,
    node: &Node,
) -> Result<(), ExportError> {
    let bound = burn_qat_runtime::accumulator_bound(weight, channel_of, bias, input);
    if bound > i32::MAX as i64 {
        return Err(ExportError::NotRepresentable {
            path: node.name.clone(),
            what: format!(
                "its int32 accumulator can reach {bound} (bias plus the largest sum of products over the input grid), \
                 above {}: a bias far larger than the weights' range (in units of s_in * s_w) would wrap around; \
                 give the weights a wider range or the bias a smaller one",
                i32::MAX
            ),
        });
    }
    Ok(())
}

/// Converts a trained QAT graph (from `burn_qat::graph::prepare`, or a `Sequential` lowered
/// with `burn_qat::graph::from_sequential`) into an integer model; the input shape is the
/// traced one (any batch size runs). Pass `graph.valid()` (converting never trains, and the
/// lookup tables are evaluated on the graph's device without recording gradients).
///
/// Integer ops: conv (depthwise included) and linear with folded BatchNorm and fused
/// ReLU/ReLU6/clamp (several in a row composed into one), add/sub with fixed-point rescaling of
/// both inputs, mul, matmul of two activations (exact `i32` sums), softmax (table and exact
/// sums), LayerNorm (a float island on the integer grids), concat (requantized to the output grid), max pooling (ceil mode
/// included)/average (not in ceil mode)/adaptive-average pooling, mean/sum along an
/// axis, every elementwise activation as a 256-entry table (GELU, sigmoid, tanh, SiLU,
/// hard-swish, leaky ReLU, exp, abs, scalar arithmetic), a BatchNorm that follows no conv/linear
/// (one table per channel), reshape/flatten/permute.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig, Relu};
/// use burn::prelude::*;
/// use burn_qat::graph;
/// use burn_qat::model::QatConfig;
///
/// #[derive(Module, Debug)]
/// struct Mlp { fc1: Linear, relu: Relu, fc2: Linear }
///
/// let device = Device::flex().autodiff();
/// let model = Mlp { fc1: LinearConfig::new(4, 8).init(&device), relu: Relu::new(), fc2: LinearConfig::new(8, 3).init(&device) };
/// let run = |m: &Mlp, x: Tensor<2>| m.fc2.forward(m.relu.forward(m.fc1.forward(x)));
/// let qat = graph::prepare(&model, &[1, 4], run, &QatConfig::new()).unwrap();
/// let _ = qat.forward::<2, 2>(Tensor::ones([8, 4], &device)); // calibrates the quantizers
/// let int8 = burn_qat_export::convert(&qat.valid()).unwrap();
/// let (out, shape) = int8.forward(&[1.0; 4]).unwrap();
/// assert_eq!(shape, vec![1, 3]);
/// # let _ = out;
/// ```
///
/// # Errors
///
/// [`ExportError`] naming the node (the user's module path): an op with no integer kernel
/// (division of two tensors: `graph::prepare` refuses it up front unless it comes after the end
/// of the integer model), a tensor that is not quantized (a skipped layer, activations
/// disabled), a quantizer that has seen no data, weights wider than 8 bits.
///
/// A graph prepared with `QatConfig::with_integer_until` converts up to that node: the
/// integer model returns its value, and the float tail after it stays in your code (see
/// [`convert_until`]).
pub fn convert(graph: &QatGraph) -> Result<IntegerModel, ExportError> {
    match graph.program.integer_end {
        Some(end) => {
            let mut cut = graph.clone();
            cut.program.outputs = vec![end];
            convert_program(&cut)
        }
        None => convert_program(graph),
    }
}

/// Converts the part of `graph` that computes the output of the layer (or op) named `until`,
/// with the activations fused after it and its quantizer (for a float tail declared before
/// training, use `QatConfig::with_integer_until` and [`convert`]; this cuts any prepared
/// graph, e.g. to compare a hidden layer): the integer model ends there, its
/// output is that tensor (dequantized by [`IntegerModel::forward`]; the ONNX file ends with a
/// `DequantizeLinear` when it is quantized), and the rest of the forward (a detection head's box decoding, score
/// thresholds, a softmax) stays float, in the user's own code, applied to that output. What
/// comes after the cut is not converted, so it may use ops the integer model has no kernel
/// for.
///
/// `until` is a node as [`QatGraph::plan`] prints it: a layer's module path (`head.cls`),
/// `<nearest layer>/<op>` for a parameter-free op, or `%index` where several nodes share a
/// name.
///
/// ```
/// use burn::nn::{Linear, LinearConfig, Relu};
/// use burn::prelude::*;
/// use burn_qat::graph;
/// use burn_qat::model::QatConfig;
///
/// #[derive(Module, Debug)]
/// struct Net { fc1: Linear, relu: Relu, fc2: Linear }
///
/// let device = Device::flex().autodiff();
/// let model = Net { fc1: LinearConfig::new(4, 8).init(&device), relu: Relu::new(), fc2: LinearConfig::new(8, 3).init(&device) };
/// // A float tail the integer model has no kernel for: a division of two tensors.
/// let run = |m: &Net, x: Tensor<2>| {
///     let y = m.fc2.forward(m.relu.forward(m.fc1.forward(x)));
///     y.clone() / (y.exp() + 1.0)
/// };
/// // Undeclared, it is refused before training (it could not deploy).
/// assert!(graph::prepare(&model, &[1, 4], run, &QatConfig::new()).is_err());
/// let config = QatConfig::new().with_integer_until("fc2");
/// let qat = graph::prepare(&model, &[1, 4], run, &config).unwrap();
/// let _ = qat.forward::<2, 2>(Tensor::ones([8, 4], &device)); // calibrates; the tail is float
/// let int8 = burn_qat_export::convert(&qat.valid()).unwrap(); // ends at fc2
/// let (logits, shape) = int8.forward(&[1.0; 4]).unwrap(); // fc2's quantized output
/// assert_eq!(shape, vec![1, 3]);
/// // An earlier end, to look at a hidden layer (fc1 with its fused ReLU and quantizer):
/// let hidden = burn_qat_export::convert_until(&qat.valid(), "fc1").unwrap();
/// assert_eq!(hidden.forward(&[1.0; 4]).unwrap().1, vec![1, 8]);
/// # let _ = logits;
/// ```
///
/// # Errors
///
/// No node named `until` (the error lists names), several (the error gives their indices), or
/// what [`convert`] refuses in the part before the cut.
pub fn convert_until(graph: &QatGraph, until: &str) -> Result<IntegerModel, ExportError> {
    let mut cut = graph.valid();
    let nodes = &cut.program.nodes;
    let refuse = |hint: String| ExportError::Unsupported {
        path: until.into(),
        kind: "integer model output".into(),
        hint,
    };
    let hits: Vec<usize> = match until.strip_prefix('%').map(str::parse::<usize>) {
        Some(Ok(i)) if i < nodes.len() => vec![i],
        Some(_) => {
            return Err(refuse(format!(
                "no node %{}: the graph has %0 to %{}",
                &until[1..],
                nodes.len() - 1
            )));
        }
        None => (0..nodes.len())
            .filter(|&i| nodes[i].name == until)
            .collect(),
    };
    let mut k = match hits[..] {
        [k] => k,
        [] => {
            let mut names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            names.dedup();
            let shown = names.len().min(24);
            let more = if names.len() > shown { ", ..." } else { "" };
            return Err(refuse(format!(
                "no node has this name; the graph's nodes are {:?}{more} (`QatGraph::plan` lists them all)",
                &names[..shown]
            )));
        }
        _ => {
            let at: Vec<String> = hits.iter().map(|i| format!("%{i}")).collect();
            return Err(refuse(format!(
                "{} nodes have this name ({}): name one by its index as `QatGraph::plan` prints it",
                hits.len(),
                at.join(", ")
            )));
        }
    };
    // The activations fused after it, then its quantizer, belong to it.
    let users = cut.program.consumers();
    while let [u] = users[k][..] {
        match &nodes[u].op {
            Op::Layer {
                kind: LayerKind::Quant,
                ..
            } => {
                k = u;
                break;
            }
            op if op.grid_role() == GridRole::FusableActivation => k = u,
            _ => break,
        }
    }
    cut.program.outputs = vec![k];
    convert_program(&cut)
}

/// [`convert`] of the inputs and the nodes the graph's outputs read.
fn convert_program(graph: &QatGraph) -> Result<IntegerModel, ExportError> {
    let graph = graph.valid();
    let mut c = Converter {
        graph: &graph,
        users: graph.program.consumers(),
        device: burn_qat_graph::model_device(&graph),
        nodes: Vec::new(),
        map: vec![None; graph.program.nodes.len()],
    };
    // The inputs (all of them: they are the model's arguments), then only what the outputs
    // read: a float tail cut off by `convert_until` is not converted.
    let mut live = graph.program.live();
    for i in graph.program.inputs() {
        live[i] = true;
    }
    for (i, live) in live.into_iter().enumerate() {
        if live && c.map[i].is_none() {
            c.convert_node(i)?;
        }
    }
    if !c.nodes.iter().any(|n| matches!(n.op, IntOp::Quantize(_))) {
        return Err(ExportError::Unsupported {
            path: "input".into(),
            kind: "model input".into(),
            hint: "the input is never quantized: start the model with a FakeQuant of its input (graph::prepare places one)".into(),
        });
    }
    let outputs = graph
        .program
        .outputs
        .iter()
        .map(|&o| c.map[o].expect("every node is converted"))
        .collect();
    let model = IntegerModel::with_outputs(c.nodes, outputs);
    // Consistency only: the budget is for files; a converted model that needs more than the
    // default is refused by `forward` with a message saying how to raise it.
    model.cost().map_err(|e| ExportError::Unsupported {
        path: e.name.clone(),
        kind: "converted node".into(),
        hint: format!("the converted model is inconsistent ({e}); please report this"),
    })?;
    Ok(model)
}
