//! [`QatGraph`]: the lifted model as a Burn module, and its forward.

use burn::backend::ops::{ActivationOps, FloatTensorOps, ModuleOps};
use burn::backend::{Dispatch, TensorMetadata};
use burn::module::{Module, Param};
use burn::nn::{BatchNorm, LayerNorm};
use burn::prelude::*;
use burn::tensor::DispatchTensor;
use burn::tensor::Shape;
use burn_qat_core::QatError;
use burn_qat_nn::ActQuant;
use burn_qat_transform::{FusedConv1d, FusedConv2d, FusedLinear};

use super::ir::{Dim, GridRole, LayerKind, Node, Op, Program};
use crate::io::GraphIo;

/// A module of a [`QatGraph`]: the layers that hold parameters or state.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum GraphLayer {
    /// `Conv1d`, with its BatchNorm, activation and weight fake-quant once prepared.
    Conv1d(FusedConv1d),
    /// `Conv2d`, with its BatchNorm, activation and weight fake-quant once prepared.
    Conv2d(FusedConv2d),
    /// `Linear`, with its BatchNorm, activation and weight fake-quant once prepared.
    Linear(FusedLinear),
    /// A BatchNorm that follows no conv or linear layer.
    BatchNorm(BatchNorm),
    /// An activation fake-quantizer (observed or learned range).
    Quant(ActQuant),
    /// Burn's `LayerNorm` on the last axis, with the user's parameters.
    LayerNorm(GraphLayerNorm),
    /// A parameter the forward reads as data (a position embedding added to the tokens).
    Param(GraphParam),
}

/// A user's parameter that the forward computes with as data (a learned position embedding,
/// a scale), of rank 1 to 4, with its `ParamId`: it trains and is written back.
#[derive(Module, Debug)]
#[allow(missing_docs)]
pub enum GraphParam {
    R1(Param<Tensor<1>>),
    R2(Param<Tensor<2>>),
    R3(Param<Tensor<3>>),
    R4(Param<Tensor<4>>),
}

impl GraphParam {
    /// Its value, as Burn's primitive.
    pub fn value(&self) -> DispatchTensor {
        match self {
            GraphParam::R1(p) => p.val().into_dispatch(),
            GraphParam::R2(p) => p.val().into_dispatch(),
            GraphParam::R3(p) => p.val().into_dispatch(),
            GraphParam::R4(p) => p.val().into_dispatch(),
        }
    }

    /// Its values, flattened (row-major).
    pub fn flat(&self) -> Tensor<1> {
        match self {
            GraphParam::R1(p) => p.val(),
            GraphParam::R2(p) => p.val().flatten(0, 1),
            GraphParam::R3(p) => p.val().flatten(0, 2),
            GraphParam::R4(p) => p.val().flatten(0, 3),
        }
    }

    /// Its `ParamId` and value (rank erased).
    pub fn id_value(&self) -> (burn::module::ParamId, DispatchTensor) {
        let id = match self {
            GraphParam::R1(p) => p.id,
            GraphParam::R2(p) => p.id,
            GraphParam::R3(p) => p.id,
            GraphParam::R4(p) => p.id,
        };
        (id, self.value())
    }
}

/// A user's `LayerNorm` in the graph: Burn's module (the user's `gamma` and `beta`, trained
/// and written back by `ParamId`) and its epsilon as recorded (Burn keeps it private).
#[derive(Module, Debug)]
pub struct GraphLayerNorm {
    /// Burn's module.
    pub norm: LayerNorm,
    /// Its epsilon.
    pub epsilon: f64,
}

fn describe_fused<L: Module>(f: &burn_qat_transform::Fused<L>) -> String {
    let mut parts = vec![match &f.weight_quant {
        Some(w) if w.is_enabled() => format!(
            "W{} {}{}",
            w.spec.bits,
            if w.spec.axis().is_some() {
                "per-channel"
            } else {
                "per-tensor"
            },
            if w.scale.is_some() { " LSQ" } else { "" }
        ),
        Some(_) => "W off".into(),
        None => "W float".into(),
    }];
    if f.bn.is_some() {
        parts.push(
            if f.is_bn_frozen() {
                "BN folded (frozen)"
            } else {
                "BN folded"
            }
            .into(),
        );
    }
    if f.activation != burn_qat_transform::Activation::Identity {
        parts.push(format!("{:?}", f.activation));
    }
    parts.join(", ")
}

impl GraphLayer {
    /// What the layer does now, for [`QatGraph::plan`].
    pub fn describe(&self) -> String {
        match self {
            GraphLayer::Conv1d(f) => describe_fused(f),
            GraphLayer::Conv2d(f) => describe_fused(f),
            GraphLayer::Linear(f) => describe_fused(f),
            GraphLayer::BatchNorm(_) => "BatchNorm (not folded)".into(),
            GraphLayer::LayerNorm(_) => "LayerNorm (float on the integer grids)".into(),
            GraphLayer::Param(_) => "parameter read as data".into(),
            GraphLayer::Quant(q) => {
                let spec = q.spec();
                let kind = if spec.symmetric { "sym" } else { "asym" };
                // The learned method and phase, read from the module (host state).
                let learned = match q {
                    ActQuant::Learned(l) if l.is_learning() => format!(" {:?} learning", l.method),
                    ActQuant::Learned(l) => format!(" {:?} observing", l.method),
                    _ => String::new(),
                };
                match q.observed_range() {
                    Some((lo, hi)) => format!(
                        "A{} {kind}{learned} [{:.4}, {:.4}]",
                        spec.bits, lo[0], hi[0]
                    ),
                    None => format!("A{} {kind}{learned} (not observed yet)", spec.bits),
                }
            }
        }
    }

    /// The kind of node that runs this layer.
    pub fn kind(&self) -> LayerKind {
        match self {
            GraphLayer::Conv1d(_) => LayerKind::Conv1d,
            GraphLayer::Conv2d(_) => LayerKind::Conv2d,
            GraphLayer::Linear(_) => LayerKind::Linear,
            GraphLayer::BatchNorm(_) => LayerKind::BatchNorm,
            GraphLayer::Quant(_) => LayerKind::Quant,
            GraphLayer::LayerNorm(_) => LayerKind::LayerNorm,
            GraphLayer::Param(_) => LayerKind::Param,
        }
    }
}

/// Any Burn model's forward as a graph of Burn modules: what [`trace`](super::trace) recorded,
/// lifted into layers you can train (`Fused` conv/linear layers holding the user's weights and
/// `ParamId`s, activation fake-quantizers, BatchNorms) and the parameter-free ops between them.
///
/// It is a Burn [`Module`]: optimizers, records (`save_file`/`load_file`), `valid()`,
/// `to_device`, burn-train's `Learner`, `burn_qat::switches` and
/// [`QatSchedule`](burn_qat_transform::QatSchedule) work on it as on any module. The structure
/// ([`program`](Self::program)) is not recorded: load a record into a graph prepared from the
/// same model with the same configuration (a record of another graph is refused by Burn's
/// path check).
///
/// [`forward`](Self::forward) takes and returns one tensor; a graph traced with several inputs
/// or outputs ([`trace_many`](crate::trace_many)) runs with
/// [`forward_many`](Self::forward_many), tuples in and out.
#[derive(Module, Debug)]
pub struct QatGraph {
    /// The modules, in the order the program first runs them.
    pub layers: Vec<GraphLayer>,
    /// The nodes and their connections (data, not recorded).
    #[module(skip)]
    pub program: Program,
}

macro_rules! by_rank {
    ($rank:expr, $x:expr, |$t:ident| $body:expr) => {
        match $rank {
            1 => {
                let $t = Tensor::<1>::from_dispatch($x);
                ($body).into_dispatch()
            }
            2 => {
                let $t = Tensor::<2>::from_dispatch($x);
                ($body).into_dispatch()
            }
            3 => {
                let $t = Tensor::<3>::from_dispatch($x);
                ($body).into_dispatch()
            }
            4 => {
                let $t = Tensor::<4>::from_dispatch($x);
                ($body).into_dispatch()
            }
            5 => {
                let $t = Tensor::<5>::from_dispatch($x);
                ($body).into_dispatch()
            }
            6 => {
                let $t = Tensor::<6>::from_dispatch($x);
                ($body).into_dispatch()
            }
            r => unreachable!("rank {r} is refused when the graph is built"),
        }
    };
}

/// The largest rank a graph value may have.
pub const MAX_RANK: usize = 6;

impl QatGraph {
    /// Runs the graph on `input` (any batch size).
    ///
    /// # Shapes
    ///
    /// - input: the traced input shape, any batch size (`[N, ...]`)
    /// - output: the traced output shape at that batch size
    ///
    /// # Panics
    ///
    /// If `DI`/`DO` are not the traced ranks or the input's non-batch sizes differ from the
    /// traced ones; [`try_forward`](Self::try_forward) returns these as errors.
    pub fn forward<const DI: usize, const DO: usize>(&self, input: Tensor<DI>) -> Tensor<DO> {
        self.try_forward(input).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`forward`](Self::forward), with a wrong rank or input size as an error.
    pub fn try_forward<const DI: usize, const DO: usize>(
        &self,
        input: Tensor<DI>,
    ) -> Result<Tensor<DO>, QatError> {
        self.try_forward_many(input)
    }

    /// Runs a graph of several inputs or outputs (traced with
    /// [`trace_many`](crate::trace_many)): the inputs as one tensor or a tuple, in the traced
    /// order, the outputs likewise.
    ///
    /// # Shapes
    ///
    /// - inputs: the traced input shapes, any batch size, the same for every input
    /// - outputs: the traced output shapes at that batch size
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward); [`try_forward_many`](Self::try_forward_many) returns
    /// these as errors.
    pub fn forward_many<I: GraphIo, O: GraphIo>(&self, inputs: I) -> O {
        self.try_forward_many(inputs)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`forward_many`](Self::forward_many), with a wrong count, rank or input size as an
    /// error.
    pub fn try_forward_many<I: GraphIo, O: GraphIo>(&self, inputs: I) -> Result<O, QatError> {
        let expected = self.program.input_shapes();
        let given = inputs.shapes();
        let many = expected.len() > 1;
        if given.len() != expected.len() {
            return Err(QatError::InvalidConfig {
                field: "QatGraph::forward inputs".into(),
                value: format!("{} tensors", given.len()),
                allowed: format!("{}, the inputs the traced forward takes", expected.len()),
            });
        }
        let batch = given[0][0];
        for (k, (shape, dims)) in expected.iter().zip(&given).enumerate() {
            let fits = shape.len() == dims.len()
                && shape
                    .iter()
                    .zip(dims.iter())
                    .all(|(d, &n)| matches!(d, Dim::Batch(1)) || d.at(batch) == n)
                && dims[0] == batch;
            if !fits {
                return Err(QatError::InvalidConfig {
                    field: if many {
                        format!("QatGraph::forward input {k}")
                    } else {
                        "QatGraph::forward input".into()
                    },
                    value: format!("shape {dims:?}"),
                    allowed: format!(
                        "the traced shape [{}] (N: any batch size{})",
                        shape_text(shape),
                        if many {
                            ", the same for every input"
                        } else {
                            ""
                        }
                    ),
                });
            }
        }
        let ranks: Vec<usize> = self
            .program
            .outputs
            .iter()
            .map(|&o| self.program.nodes[o].shape.len())
            .collect();
        if O::ranks() != ranks {
            let (field, value, allowed) = if ranks.len() == 1 && O::ranks().len() == 1 {
                (
                    "QatGraph::forward output rank",
                    O::ranks()[0].to_string(),
                    format!("{}, the rank the traced forward returns", ranks[0]),
                )
            } else {
                (
                    "QatGraph::forward output ranks",
                    format!("{:?}", O::ranks()),
                    format!("{ranks:?}, the ranks of what the traced forward returns"),
                )
            };
            return Err(QatError::InvalidConfig {
                field: field.into(),
                value,
                allowed,
            });
        }
        let out = self.run(inputs.into_parts(), batch);
        Ok(O::from_parts(out))
    }

    fn run(&self, inputs: Vec<DispatchTensor>, batch: usize) -> Vec<DispatchTensor> {
        let nodes = &self.program.nodes;
        let last = self.program.last_use();
        let device = Device::new(inputs[0].device());
        let mut values: Vec<Option<DispatchTensor>> = vec![None; nodes.len()];
        let count = inputs.len();
        for (k, x) in inputs.into_iter().enumerate() {
            values[k] = Some(x);
        }
        for (i, node) in nodes.iter().enumerate().skip(count) {
            let args: Vec<DispatchTensor> = node
                .inputs
                .iter()
                .map(|&j| {
                    if last[j] == i && node.inputs.iter().filter(|&&k| k == j).count() == 1 {
                        values[j].take()
                    } else {
                        values[j].clone()
                    }
                    .expect("a node reads a value computed before it")
                })
                .collect();
            values[i] = Some(match &node.op {
                Op::Constant { shape, values } => Dispatch::float_reshape(
                    Tensor::<1>::from_data(
                        TensorData::new(values.clone(), [values.len()]),
                        &device,
                    )
                    .into_dispatch(),
                    Shape::from(shape.clone()),
                ),
                _ => self.eval(node, args, batch),
            });
        }
        self.program
            .outputs
            .iter()
            .map(|&o| values[o].clone().expect("the outputs are computed"))
            .collect()
    }

    fn rank_of(&self, node: usize) -> usize {
        self.program.nodes[node].shape.len()
    }

    fn eval(&self, node: &Node, mut args: Vec<DispatchTensor>, batch: usize) -> DispatchTensor {
        let rank = node.inputs.first().map(|&j| self.rank_of(j)).unwrap_or(0);
        match &node.op {
            Op::Layer { index, .. } if node.inputs.is_empty() => match &self.layers[*index] {
                GraphLayer::Param(p) => p.value(),
                _ => unreachable!("only a parameter node reads no input"),
            },
            Op::Layer { index, .. } => {
                let x = args.swap_remove(0);
                // The integer model's bias in evaluation; training keeps the float bias (the
                // rounding moves it by under half an accumulator step, and reading the grids
                // back every step cost 5% of a small model's step).
                let scale = if Device::new(x.device()).is_autodiff() {
                    None
                } else {
                    self.input_scale(node)
                };
                self.eval_layer(&self.layers[*index], x, rank, scale)
            }
            op => eval_op(op, args, batch),
        }
    }

    /// The scale of the grid node `node`'s (first) input is on: that of the activation
    /// quantizer it comes from through ops that keep grids (max pooling, reshapes, selects), as
    /// the integer model sees it; `None` for a float input or a disabled quantizer.
    pub fn input_scale(&self, node: &Node) -> Option<f32> {
        let mut j = *node.inputs.first()?;
        loop {
            let value = &self.program.nodes[j];
            match &value.op {
                Op::Layer { index, .. } => {
                    let GraphLayer::Quant(q) = &self.layers[*index] else {
                        return None;
                    };
                    if !q.observer().is_enabled() {
                        return None;
                    }
                    let (_, qps) = q.grid()?;
                    return (qps.len() == 1).then(|| qps[0].scale);
                }
                op if op.grid_role() == GridRole::Inherit => j = *value.inputs.first()?,
                _ => return None,
            }
        }
    }

    /// A layer on its input `x` (of rank `rank`, on a grid of scale `input_scale`).
    fn eval_layer(
        &self,
        layer: &GraphLayer,
        x: DispatchTensor,
        rank: usize,
        input_scale: Option<f32>,
    ) -> DispatchTensor {
        match layer {
            GraphLayer::Conv1d(l) => l
                .forward_on_grid::<3, 3>(Tensor::from_dispatch(x), input_scale)
                .into_dispatch(),
            GraphLayer::Conv2d(l) => l
                .forward_on_grid::<4, 4>(Tensor::from_dispatch(x), input_scale)
                .into_dispatch(),
            GraphLayer::Linear(l) if rank == 2 => l
                .forward_on_grid::<2, 2>(Tensor::from_dispatch(x), input_scale)
                .into_dispatch(),
            GraphLayer::Linear(l) => {
                // Linear on the last axis of any rank: rows of every leading axis.
                let dims = x.shape().to_vec();
                let d_in = dims[rank - 1];
                let rows = dims[..rank - 1].iter().product::<usize>();
                let flat = Tensor::<2>::from_dispatch(Dispatch::float_reshape(
                    x,
                    Shape::from(vec![rows, d_in]),
                ));
                let y = l.forward_on_grid::<2, 2>(flat, input_scale);
                let mut out = dims;
                out[rank - 1] = y.dims()[1];
                Dispatch::float_reshape(y.into_dispatch(), Shape::from(out))
            }
            GraphLayer::BatchNorm(bn) => by_rank!(rank, x, |t| bn.forward(t)),
            GraphLayer::LayerNorm(ln) => by_rank!(rank, x, |t| ln.norm.forward(t)),
            GraphLayer::Param(p) => p.value(),
            GraphLayer::Quant(q) => by_rank!(rank, x, |t| q.forward(t)),
        }
    }

    /// The graph for inference: every conv/linear holds its BatchNorm-folded, fake-quantized
    /// weight and folded bias for good (`Fused::folded` on each layer), activation quantizers
    /// kept, with fewer ops; for evaluation, not for further training.
    ///
    /// Each layer bakes the integer model's bias for the grid in front of it; a layer called
    /// on inputs of different scales (one module called twice) stays unfolded. Its outputs
    /// equal this graph's in evaluation up to float rounding: a folded layer sums the float
    /// products of its baked weights, where this graph sums integer steps as the integer model
    /// does ([`Fused::forward_on_grid`](burn_qat_transform::Fused::forward_on_grid)), so a value
    /// near a rounding tie of the next quantizer can land one step away.
    pub fn folded(mut self) -> Self {
        // The input scales of each layer's calls.
        let mut scales: Vec<Vec<Option<f32>>> = vec![Vec::new(); self.layers.len()];
        for node in &self.program.nodes {
            if let Op::Layer { index, .. } = node.op {
                scales[index].push(self.input_scale(node));
            }
        }
        let one_scale = |calls: &[Option<f32>]| match calls {
            [first, rest @ ..] if rest.iter().all(|s| s == first) => Some(*first),
            _ => None,
        };
        self.layers = self
            .layers
            .into_iter()
            .zip(&scales)
            .map(|(layer, calls)| match (layer, one_scale(calls)) {
                (GraphLayer::Conv1d(f), Some(s)) => GraphLayer::Conv1d(f.folded_on_grid::<3, 3>(s)),
                (GraphLayer::Conv2d(f), Some(s)) => GraphLayer::Conv2d(f.folded_on_grid::<4, 4>(s)),
                (GraphLayer::Linear(f), Some(s)) => GraphLayer::Linear(f.folded_on_grid::<2, 2>(s)),
                (other, _) => other,
            })
            .collect();
        self
    }

    /// The nodes and their connections, one line per node, read from the model: op, inputs,
    /// output shape, the user's module path, and for layers what they do now (`W8 per-channel,
    /// BN folded, Relu`; `A8 asym [-1.2, 3.4]`).
    pub fn plan(&self) -> String {
        let lines = self.program.to_string();
        lines
            .lines()
            .enumerate()
            .map(|(i, line)| match self.program.nodes.get(i).map(|n| &n.op) {
                Some(Op::Layer { index, .. }) => {
                    format!("{line}  {}", self.layers[*index].describe())
                }
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Applies an elementwise op of one input (activations, scalar arithmetic, [`Op::is_unary`])
/// to `x` with the same Burn ops the graph's forward uses, so that a lookup table built from it
/// equals the graph; `None` for any other op.
pub fn apply_unary<const D: usize>(op: &Op, x: Tensor<D>) -> Option<Tensor<D>> {
    op.is_unary()
        .then(|| Tensor::from_dispatch(eval_op(op, vec![x.into_dispatch()], 1)))
}

/// The entries `indices` of axis `axis`, by Burn's own `select` (what the user's forward ran:
/// a strided slice gives other bits after a convolution on some backends).
fn select(x: DispatchTensor, axis: usize, indices: &[usize]) -> DispatchTensor {
    let device = Device::new(x.device());
    let n = indices.len();
    let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    let indices = Tensor::<1, Int>::from_data(TensorData::new(indices, [n]), &device);
    Dispatch::float_select(x, axis, indices.into_dispatch())
}

/// One parameter-free op on its arguments.
fn eval_op(op: &Op, mut args: Vec<DispatchTensor>, batch: usize) -> DispatchTensor {
    // `remove`, not `swap_remove`: a concatenation of three or more keeps its order.
    let x = args.remove(0);
    let second = || args[0].clone();
    match op {
        Op::Input => x,
        Op::Layer { .. } => unreachable!("layers run in QatGraph::eval"),
        Op::Constant { .. } => unreachable!("constants are made in QatGraph::run"),
        Op::Relu => Dispatch::relu(x),
        Op::Clamp { min, max } => clamp(x, *min, *max),
        Op::LeakyRelu { slope } => Dispatch::leaky_relu(x, (*slope).into()),
        Op::Gelu => Dispatch::gelu(x),
        Op::Sigmoid => Dispatch::sigmoid(x),
        Op::HardSigmoid { alpha, beta } => {
            Dispatch::hard_sigmoid(x, (*alpha).into(), (*beta).into())
        }
        Op::Silu => Dispatch::float_mul(x.clone(), Dispatch::sigmoid(x)),
        Op::HardSwish => Dispatch::float_mul(
            x.clone(),
            Dispatch::hard_sigmoid(x, (1.0f64 / 6.0).into(), 0.5f64.into()),
        ),
        Op::Tanh => Dispatch::float_tanh(x),
        Op::Exp => Dispatch::float_exp(x),
        Op::Abs => Dispatch::float_abs(x),
        Op::Softmax { axis } => Dispatch::softmax(x, *axis),
        Op::Add => Dispatch::float_add(x, second()),
        Op::Sub => Dispatch::float_sub(x, second()),
        Op::Mul => Dispatch::float_mul(x, second()),
        Op::Div => Dispatch::float_div(x, second()),
        Op::MatMul => Dispatch::float_matmul(x, second()),
        Op::AddScalar(c) => Dispatch::float_add_scalar(x, (*c).into()),
        Op::SubScalar(c) => Dispatch::float_sub_scalar(x, (*c).into()),
        Op::MulScalar(c) => Dispatch::float_mul_scalar(x, (*c).into()),
        Op::DivScalar(c) => Dispatch::float_div_scalar(x, (*c).into()),
        Op::Concat { axis } => {
            let mut all = vec![x];
            all.extend(args);
            Dispatch::float_cat(all, *axis)
        }
        Op::Reshape { shape } => Dispatch::float_reshape(
            x,
            Shape::from(shape.iter().map(|d| d.at(batch)).collect::<Vec<_>>()),
        ),
        Op::SwapDims { a, b } => Dispatch::float_swap_dims(x, *a, *b),
        Op::Permute { axes } => Dispatch::float_permute(x, axes),
        Op::Select { axis, indices } => select(x, *axis, indices),
        Op::MeanDim { axis } => Dispatch::float_mean_dim(x, *axis),
        Op::SumDim { axis } => Dispatch::float_sum_dim(x, *axis),
        Op::MaxPool1d {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } => Dispatch::max_pool1d(x, *kernel, *stride, *padding, *dilation, *ceil_mode),
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } => Dispatch::max_pool2d(x, *kernel, *stride, *padding, *dilation, *ceil_mode),
        Op::AvgPool1d {
            kernel,
            stride,
            padding,
            count_include_pad,
            ceil_mode,
        } => Dispatch::avg_pool1d(
            x,
            *kernel,
            *stride,
            *padding,
            *count_include_pad,
            *ceil_mode,
        ),
        Op::AvgPool2d {
            kernel,
            stride,
            padding,
            count_include_pad,
            ceil_mode,
        } => Dispatch::avg_pool2d(
            x,
            *kernel,
            *stride,
            *padding,
            *count_include_pad,
            *ceil_mode,
        ),
        Op::AdaptiveAvgPool1d { output } => Dispatch::adaptive_avg_pool1d(x, *output),
        Op::AdaptiveAvgPool2d { output } => Dispatch::adaptive_avg_pool2d(x, *output),
        Op::Bilinear {
            size,
            align_corners,
        } => {
            let mut options = burn::tensor::ops::InterpolateOptions::new(
                burn::tensor::ops::InterpolateMode::Bilinear,
            );
            options.align_corners = *align_corners;
            Dispatch::interpolate(x, *size, options)
        }
    }
}

/// A clamp from 0 runs as `relu` then `clamp_max`: one comparison and mask each way where
/// Burn's autodiff records `float_clamp` as two (see `Activation::forward`).
fn clamp(x: DispatchTensor, min: f64, max: f64) -> DispatchTensor {
    match (min.is_finite(), max.is_finite()) {
        (true, _) if min == 0.0 => clamp(Dispatch::relu(x), f64::NEG_INFINITY, max),
        (true, true) => Dispatch::float_clamp(x, min.into(), max.into()),
        (true, false) => Dispatch::float_clamp_min(x, min.into()),
        (false, true) => Dispatch::float_clamp_max(x, max.into()),
        (false, false) => x,
    }
}

pub(crate) fn shape_text(shape: &[Dim]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
