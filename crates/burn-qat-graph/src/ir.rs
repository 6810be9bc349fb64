//! The graph as plain data: nodes with explicit inputs, ops with their options, symbolic batch.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One dimension of a recorded shape: fixed, or a multiple of the batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Batch(1) => write!(f, "N"),
            Dim::Batch(k) => write!(f, "{k}N"),
        }
    }
}

/// The kind of layer a [`Op::Layer`] node runs (its module is in [`QatGraph::layers`](super::QatGraph)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// `Conv1d` (+ folded BatchNorm + fused activation).
    Conv1d,
    /// `Conv2d` (+ folded BatchNorm + fused activation).
    Conv2d,
    /// `Linear` (+ folded BatchNorm + fused activation), on the last axis of any rank.
    Linear,
    /// A BatchNorm that follows no conv/linear (kept as is).
    BatchNorm,
    /// An activation fake-quantizer.
    Quant,
    /// A `LayerNorm` (normalization over the last axis, the user's scale and shift).
    LayerNorm,
    /// A parameter the forward computes with as data (a position embedding), no input.
    Param,
}

/// What a node computes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input (the forward's arguments, in order, are the first nodes).
    Input,
    /// A module of the graph, at this index of [`QatGraph::layers`](super::QatGraph).
    Layer {
        /// Index into the graph's layers.
        index: usize,
        /// What that layer is.
        kind: LayerKind,
    },
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)` (ReLU6 is `[0, 6]`; one-sided clamps use infinities).
    Clamp {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// Leaky ReLU.
    LeakyRelu {
        /// Slope below zero.
        slope: f64,
    },
    /// GELU (erf form, Burn's `gelu`).
    Gelu,
    /// Logistic sigmoid.
    Sigmoid,
    /// `max(0, min(1, alpha * x + beta))`.
    HardSigmoid {
        /// Slope.
        alpha: f64,
        /// Offset.
        beta: f64,
    },
    /// `x * sigmoid(x)`.
    Silu,
    /// `x * hard_sigmoid(x, 1/6, 1/2)`.
    HardSwish,
    /// Hyperbolic tangent.
    Tanh,
    /// Exponential.
    Exp,
    /// Absolute value.
    Abs,
    /// Softmax along an axis.
    Softmax {
        /// The axis.
        axis: usize,
    },
    /// Element-wise sum of two tensors (broadcasting as recorded).
    Add,
    /// Element-wise difference.
    Sub,
    /// Element-wise product.
    Mul,
    /// Element-wise quotient.
    Div,
    /// Matrix product of two computed tensors (`Tensor::matmul` of two activations:
    /// attention's `Q Kᵀ` and `attn V`), leading axes broadcast.
    MatMul,
    /// `x + c`.
    AddScalar(f64),
    /// `x - c`.
    SubScalar(f64),
    /// `x * c`.
    MulScalar(f64),
    /// `x / c`.
    DivScalar(f64),
    /// Concatenation along an axis.
    Concat {
        /// The axis.
        axis: usize,
    },
    /// Reshape (flatten, squeeze, unsqueeze): the target shape with the batch symbolic.
    Reshape {
        /// Target shape.
        shape: Vec<Dim>,
    },
    /// Swaps two axes.
    SwapDims {
        /// First axis.
        a: usize,
        /// Second axis.
        b: usize,
    },
    /// Permutes the axes.
    Permute {
        /// New order.
        axes: Vec<usize>,
    },
    /// Mean along an axis (kept with length 1, as Burn's `mean_dim`).
    MeanDim {
        /// The axis.
        axis: usize,
    },
    /// Sum along an axis (kept with length 1).
    SumDim {
        /// The axis.
        axis: usize,
    },
    /// 1-D max pooling.
    MaxPool1d {
        /// Kernel, stride, padding, dilation.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Padding.
        padding: usize,
        /// Dilation.
        dilation: usize,
        /// Ceil mode.
        ceil_mode: bool,
    },
    /// 2-D max pooling.
    MaxPool2d {
        /// Kernel.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding.
        padding: [usize; 2],
        /// Dilation.
        dilation: [usize; 2],
        /// Ceil mode.
        ceil_mode: bool,
    },
    /// 1-D average pooling.
    AvgPool1d {
        /// Kernel.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Padding.
        padding: usize,
        /// Whether padding counts in the average.
        count_include_pad: bool,
        /// Ceil mode.
        ceil_mode: bool,
    },
    /// 2-D average pooling.
    AvgPool2d {
        /// Kernel.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding.
        padding: [usize; 2],
        /// Whether padding counts in the average.
        count_include_pad: bool,
        /// Ceil mode.
        ceil_mode: bool,
    },
    /// 1-D adaptive average pooling.
    AdaptiveAvgPool1d {
        /// Output length.
        output: usize,
    },
    /// 2-D adaptive average pooling.
    AdaptiveAvgPool2d {
        /// Output size.
        output: [usize; 2],
    },
    /// Bilinear resizing of `[N, C, H, W]` to `[N, C, size]` (`module::interpolate` with
    /// `InterpolateMode::Bilinear`): each output weighs four neighbours, so it gets a grid of
    /// its own.
    Bilinear {
        /// Output `[h, w]`.
        size: [usize; 2],
        /// Corner pixels' centres aligned (else half-pixel centres).
        align_corners: bool,
    },
    /// The entries `indices` of axis `axis` (not the batch axis), in that order:
    /// `Tensor::select` with constant indices, `Tensor::slice` (with a step) on one axis.
    Select {
        /// The axis.
        axis: usize,
        /// The entries picked.
        indices: Vec<usize>,
    },
    /// A tensor the forward computes from constants alone (a detection head's grid of cell
    /// coordinates, strides), folded when the forward is traced: no input, not trained.
    Constant {
        /// Its shape (no batch axis: the same at every batch size).
        shape: Vec<usize>,
        /// Its values, row-major.
        values: Vec<f32>,
    },
}

/// How an op treats the integer grid of its input, as TFLite and PyTorch FX place
/// fake-quantizers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridRole {
    /// Moves or selects values without changing them (max pooling, reshape, permute): the
    /// output keeps the input's grid, no fake-quant after it.
    Inherit,
    /// ReLU or a clamp: fused into the op before it when that op has no other consumer.
    FusableActivation,
    /// Computes new values: a fake-quant follows (after its fused activation, if any).
    Compute,
    /// Already a fake-quantizer, or the input.
    Quantized,
}

impl Op {
    /// How this op treats the grid of its input.
    pub fn grid_role(&self) -> GridRole {
        match self {
            Op::Input
            | Op::Layer {
                kind: LayerKind::Quant,
                ..
            } => GridRole::Quantized,
            Op::Reshape { .. }
            | Op::SwapDims { .. }
            | Op::Permute { .. }
            | Op::MaxPool1d { .. }
            | Op::MaxPool2d { .. }
            | Op::Select { .. } => GridRole::Inherit,
            Op::Relu | Op::Clamp { .. } => GridRole::FusableActivation,
            _ => GridRole::Compute,
        }
    }

    /// Why the integer model cannot compute this op, or `None` if it can: the one list that
    /// `graph::prepare` refuses up front and `export::convert` refuses.
    pub fn integer_refusal(&self) -> Option<&'static str> {
        match self {
            Op::Constant { .. } => Some(
                "a constant made in the forward has no integer form yet: keep it in a float tail \
                 (QatConfig::with_integer_until, naming the last node the integer model computes)",
            ),
            Op::Div => Some(
                "no integer kernel (division of two tensors): end the integer model before it \
                 (QatConfig::with_integer_until, naming the last node the integer model \
                 computes) and apply the rest to its float output",
            ),
            Op::AvgPool1d {
                ceil_mode: true, ..
            }
            | Op::AvgPool2d {
                ceil_mode: true, ..
            } => Some(
                "average pooling with ceil_mode does not convert to the integer model (its last \
                 windows average over fewer values): use ceil_mode false, or pad the input \
                 explicitly",
            ),
            _ => None,
        }
    }

    /// Whether the op is elementwise on one input (an activation or scalar arithmetic): on
    /// 8-bit values, a 256-entry lookup table.
    pub fn is_unary(&self) -> bool {
        matches!(
            self,
            Op::Relu
                | Op::Clamp { .. }
                | Op::LeakyRelu { .. }
                | Op::Gelu
                | Op::Sigmoid
                | Op::HardSigmoid { .. }
                | Op::Silu
                | Op::HardSwish
                | Op::Tanh
                | Op::Exp
                | Op::Abs
                | Op::AddScalar(_)
                | Op::SubScalar(_)
                | Op::MulScalar(_)
                | Op::DivScalar(_)
        )
    }

    /// The activation a ReLU/clamp node applies, as fused layers hold it, in its simplest
    /// variant ([`Activation::from_bounds`](burn_qat_transform::Activation::from_bounds): a
    /// `[0, 6]` clamp is `Relu6`, `clamp_min(0)` is `Relu`; an infinite clamp bound stays
    /// infinite); `None` for other ops.
    pub fn activation(&self) -> Option<burn_qat_transform::Activation> {
        use burn_qat_transform::Activation;
        match *self {
            Op::Relu => Some(Activation::Relu),
            Op::Clamp { min, max } => Some(Activation::from_bounds(min as f32, max as f32)),
            _ => None,
        }
    }

    /// The node op that applies `activation`: `Relu`, or a `Clamp` (`Identity` is the clamp
    /// to `[-inf, inf]`, which passes values through).
    pub fn from_activation(activation: burn_qat_transform::Activation) -> Op {
        use burn_qat_transform::Activation;
        match activation {
            Activation::Relu => Op::Relu,
            other => {
                let (min, max) = other.bounds();
                Op::Clamp {
                    min: min.into(),
                    max: max.into(),
                }
            }
        }
    }

    /// The Burn call the node comes from, in the words the user wrote it, for messages:
    /// `` `Conv2d` layer ``, `` `activation::softmax` ``, `` `a / b` (`Tensor::div`) ``,
    /// `` `module::avg_pool2d(ceil_mode)` ``.
    ///
    /// ```
    /// use burn_qat_graph::Op;
    ///
    /// assert_eq!(Op::Div.call(), "`a / b` (`Tensor::div` of two tensors)");
    /// assert_eq!(Op::Softmax { axis: 1 }.call(), "`activation::softmax`");
    /// ```
    pub fn call(&self) -> String {
        let pool = |name: &str, ceil: bool| {
            format!("`module::{name}{}`", if ceil { "(ceil_mode)" } else { "" })
        };
        match self {
            Op::Input => "the input".into(),
            Op::Layer { kind, .. } => format!("`{kind:?}` layer"),
            Op::Relu => "`activation::relu`".into(),
            Op::Clamp { .. } => "`Tensor::clamp`".into(),
            Op::LeakyRelu { .. } => "`activation::leaky_relu`".into(),
            Op::Gelu => "`activation::gelu`".into(),
            Op::Sigmoid => "`activation::sigmoid`".into(),
            Op::HardSigmoid { .. } => "`activation::hard_sigmoid`".into(),
            Op::Silu => "`activation::silu`".into(),
            Op::HardSwish => "`activation::hard_swish`".into(),
            Op::Tanh => "`Tensor::tanh`".into(),
            Op::Exp => "`Tensor::exp`".into(),
            Op::Abs => "`Tensor::abs`".into(),
            Op::Softmax { .. } => "`activation::softmax`".into(),
            Op::Add => "`a + b` (`Tensor::add` of two tensors)".into(),
            Op::Sub => "`a - b` (`Tensor::sub` of two tensors)".into(),
            Op::Mul => "`a * b` (`Tensor::mul` of two tensors)".into(),
            Op::Div => "`a / b` (`Tensor::div` of two tensors)".into(),
            Op::MatMul => "`Tensor::matmul` of two activations".into(),
            Op::AddScalar(_) => "`Tensor::add_scalar`".into(),
            Op::SubScalar(_) => "`Tensor::sub_scalar`".into(),
            Op::MulScalar(_) => "`Tensor::mul_scalar`".into(),
            Op::DivScalar(_) => "`Tensor::div_scalar`".into(),
            Op::Concat { .. } => "`Tensor::cat`".into(),
            Op::Reshape { .. } => "`Tensor::reshape`".into(),
            Op::SwapDims { .. } => "`Tensor::swap_dims`".into(),
            Op::Permute { .. } => "`Tensor::permute`".into(),
            Op::MeanDim { .. } => "`Tensor::mean_dim`".into(),
            Op::SumDim { .. } => "`Tensor::sum_dim`".into(),
            Op::MaxPool1d { ceil_mode, .. } => pool("max_pool1d", *ceil_mode),
            Op::MaxPool2d { ceil_mode, .. } => pool("max_pool2d", *ceil_mode),
            Op::AvgPool1d { ceil_mode, .. } => pool("avg_pool1d", *ceil_mode),
            Op::AvgPool2d { ceil_mode, .. } => pool("avg_pool2d", *ceil_mode),
            Op::AdaptiveAvgPool1d { .. } => "`module::adaptive_avg_pool1d`".into(),
            Op::AdaptiveAvgPool2d { .. } => "`module::adaptive_avg_pool2d`".into(),
            Op::Bilinear { .. } => "`module::interpolate` (mode Bilinear)".into(),
            // `slice` and nearest `interpolate` lift to selects too.
            Op::Select { .. } => "`Tensor::select` (or `slice`, nearest `interpolate`)".into(),
            Op::Constant { shape, .. } => {
                format!("a constant tensor of shape {shape:?} made in the forward")
            }
        }
    }

    /// A short name for plans and messages.
    pub fn name(&self) -> String {
        match self {
            Op::Layer { kind, .. } => format!("{kind:?}"),
            Op::Clamp { min, max } if *min == 0.0 && *max == 6.0 => "ReLU6".into(),
            Op::Clamp { min, max } => format!("Clamp[{min}, {max}]"),
            Op::Constant { shape, .. } => format!("Constant{shape:?}"),
            Op::Reshape { shape } => format!(
                "Reshape[{}]",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            other => {
                let s = format!("{other:?}");
                s.split([' ', '(', '{']).next().unwrap_or("").to_string()
            }
        }
    }
}

/// One node: an op, the nodes it reads, and the module path it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// What it computes.
    pub op: Op,
    /// The nodes whose outputs it reads, in order.
    pub inputs: Vec<usize>,
    /// The user's module path of the layer (for parameter-free ops: the nearest layer before
    /// it, with the op's name).
    pub name: String,
    /// Output shape, the batch symbolic.
    pub shape: Vec<Dim>,
}

/// The graph as data: nodes in execution order (every input precedes its reader), the input
/// nodes first (one [`Op::Input`] per argument of the traced forward, in argument order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The nodes whose values the forward returns, in order (one per returned tensor).
    pub outputs: Vec<usize>,
    /// Where the integer model ends, when it ends before the outputs
    /// (`QatConfig::with_integer_until`): the node whose value `export::convert` returns; the
    /// nodes after it are a float tail (no fake-quant) that stays in the user's code.
    #[serde(default)]
    pub integer_end: Option<usize>,
}

impl Program {
    /// The input nodes, in the order of the forward's arguments (they lead the node list).
    pub fn inputs(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .take_while(|&i| self.nodes[i].op == Op::Input)
            .collect()
    }

    /// Shape of the first input (the batch symbolic).
    pub fn input_shape(&self) -> &[Dim] {
        &self.nodes[0].shape
    }

    /// Shapes of every input, in argument order (the batch symbolic).
    pub fn input_shapes(&self) -> Vec<&[Dim]> {
        self.inputs()
            .into_iter()
            .map(|i| self.nodes[i].shape.as_slice())
            .collect()
    }

    /// The nodes the integer model returns: the integer end when one is set, else the outputs.
    pub fn ends(&self) -> Vec<usize> {
        match self.integer_end {
            Some(k) => vec![k],
            None => self.outputs.clone(),
        }
    }

    /// For each node, whether an output reads it (directly or through other nodes).
    pub fn live(&self) -> Vec<bool> {
        self.live_for_all(&self.outputs)
    }

    /// For each node, whether node `end` reads it (directly or through other nodes; `end`
    /// included).
    pub fn live_for(&self, end: usize) -> Vec<bool> {
        self.live_for_all(&[end])
    }

    /// For each node, whether one of `ends` reads it (directly or through other nodes; the
    /// ends included).
    pub fn live_for_all(&self, ends: &[usize]) -> Vec<bool> {
        let mut live = vec![false; self.nodes.len()];
        for &end in ends {
            live[end] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if live[i] {
                for &j in &self.nodes[i].inputs {
                    live[j] = true;
                }
            }
        }
        live
    }

    /// For each node, the nodes that read it.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut users = vec![vec![]; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &j in &n.inputs {
                users[j].push(i);
            }
        }
        users
    }

    /// For each node, the index of the last node that reads it (its value can be dropped
    /// after that); the outputs are kept to the end.
    pub fn last_use(&self) -> Vec<usize> {
        let mut last = vec![0; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &j in &n.inputs {
                last[j] = i;
            }
        }
        for &o in &self.outputs {
            last[o] = usize::MAX;
        }
        last
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nodes.iter().enumerate() {
            let inputs = n
                .inputs
                .iter()
                .map(|j| format!("%{j}"))
                .collect::<Vec<_>>()
                .join(", ");
            let shape = n
                .shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(
                f,
                "%{i:<3} = {:<22} ({inputs:<12}) [{shape}]  {}",
                n.op.name(),
                n.name
            )?;
        }
        let outputs = self
            .outputs
            .iter()
            .map(|o| format!("%{o}"))
            .collect::<Vec<_>>()
            .join(", ");
        write!(f, "return {outputs}")?;
        match self.integer_end {
            Some(k) => write!(
                f,
                "  (the integer model ends at %{k}; a float tail follows)"
            ),
            None => Ok(()),
        }
    }
}
