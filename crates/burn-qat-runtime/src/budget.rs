//! What running a model may cost: the [`Budget`] that [`IntegerModel::validate`] holds a
//! model to (and so [`format::load`](crate::format::load) and every
//! [`forward`](IntegerModel::forward)), and the [`Cost`] it counts.
//!
//! A model file is data anyone can write, and a few bytes can ask for a lot: a convolution
//! padded by 2^24 builds an image of gigabytes, and every add or multiply node builds a 64 KiB
//! table of its 65,536 outputs on the first `forward`, so a 2 MB file of 30,000 adds would
//! take 2 GB. Validation therefore counts, per batch item, the work of every node (its
//! multiply-adds, values, tables and the buffers it builds) and the memory of a `forward` (the
//! model's nodes and parameters, the packed weights and tables it keeps, and the largest set
//! of values and working buffers alive at once), and refuses a model above its budget, naming
//! the node where the total crossed it. The default, [`Budget::DEFAULT`], admits about 8
//! ResNet-50s at 224 x 224 in work (a few seconds of one core at most) and 256 MiB of memory
//! (a ResNet-50 takes about 70 MiB: its weights twice, packed and as data, and its buffers);
//! a model from a trusted source that needs more gets a larger budget:
//!
//! ```
//! use burn_qat_runtime::budget::Budget;
//! use burn_qat_runtime::format;
//! use burn_qat_runtime::model::{Dim, Grid, IntAdd, IntNode, IntOp, IntegerModel};
//!
//! // input -> quantize -> 100 adds, each a 64 KiB table of its outputs.
//! let g = Grid { scale: 0.1, zero_point: 0, qmin: -128, qmax: 127 };
//! let shape = vec![Dim::Batch(1), Dim::Fixed(4)];
//! let node = |name: &str, op, inputs, grid| IntNode { name: name.into(), op, inputs, shape: shape.clone(), grid };
//! let mut nodes = vec![node("input", IntOp::Input, vec![], None), node("q", IntOp::Quantize(g), vec![0], Some(g))];
//! for k in 0..100 {
//!     let add = IntAdd { a: g, b: g, out: g, ma: 1 << 39, mb: 1 << 39, shift: 40, lo: -128, hi: 127 };
//!     nodes.push(node(&format!("add{k}"), IntOp::Add(add), vec![nodes.len() - 1, 1], Some(g)));
//! }
//! let model = IntegerModel::new(nodes, 101);
//! let cost = model.cost().unwrap();
//! assert!(cost.memory_bytes > 100 * 65_536);
//!
//! // A budget of 4 MiB refuses it, naming the node where the memory ran out and the limit.
//! let small = Budget::DEFAULT.with_max_memory_bytes(4 << 20);
//! let err = model.clone().with_budget(small).validate().unwrap_err();
//! assert!(err.name.starts_with("add") && err.what.contains("max_memory_bytes"), "{err}");
//! let bytes = format::to_bytes(&model);
//! assert!(format::from_bytes_with_budget(&bytes, small).is_err());
//!
//! // The default budget admits it; so does any budget above its cost.
//! assert!(format::from_bytes(&bytes).is_ok());
//! let fitted = Budget::DEFAULT.with_max_memory_bytes(cost.memory_bytes);
//! let loaded = format::from_bytes_with_budget(&bytes, fitted).unwrap();
//! assert_eq!(loaded.budget(), fitted);
//! assert_eq!(loaded.forward(&[0.1, 0.2, 0.3, 0.4]).unwrap().1, vec![1, 4]);
//! ```

use std::sync::OnceLock;

use crate::kernels::{self, Packed};
use crate::model::{Dim, IntNode, IntOp, IntegerModel, Output};
use crate::run::Values;

/// The most a model may cost per batch item: the limits of [`IntegerModel::validate`] that a
/// user can raise (the structural ones, such as `MAX_ITEM_VALUES`, stay).
///
/// Work is counted in units of about one multiply-add of the GEMM kernels (about 0.1 ns on
/// one core in a release build): a multiply-add or a byte of a buffer a convolution or linear
/// layer builds (padded image, im2col words) is 1; a value an elementwise op, a lookup, a copy
/// or a pooling window reads or writes is 16; a value computed in wide arithmetic (a float
/// quantization, an add or multiply evaluated directly, an entry of an add or multiply's
/// 65,536-entry table) or a generic pooling window read is 64; an averaged or reduced output
/// (requantized through a cached multiplier) is 256; a value whose index is computed axis by
/// axis (a permutation, a broadcast) adds 64 per axis; each node adds 8,192 for the runner's
/// own bookkeeping.
///
/// Memory counts the model's nodes and parameters, the packed weights and tables the weight
/// cache keeps, the largest set of values alive at once during a batch-1 `forward` and the
/// largest working buffers of a kernel (one thread's). Values grow with the batch; the rest
/// does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Budget {
    /// Work per batch item, in the units above.
    pub max_work: u64,
    /// Bytes of memory a batch-1 `forward` may use.
    pub max_memory_bytes: u64,
}

impl Budget {
    /// The default: 2^35 units of work (about 8 ResNet-50s at 224 x 224, a few seconds of one
    /// core at most) and 256 MiB of memory.
    pub const DEFAULT: Budget = Budget {
        max_work: 1 << 35,
        max_memory_bytes: 256 << 20,
    };

    /// No limit beyond the structural ones: for models from a trusted source whose cost is
    /// known (see [`IntegerModel::cost`]).
    pub const UNLIMITED: Budget = Budget {
        max_work: u64::MAX,
        max_memory_bytes: u64::MAX,
    };

    /// This budget with `max_work` units of work per batch item.
    pub const fn with_max_work(self, max_work: u64) -> Self {
        Self { max_work, ..self }
    }

    /// This budget with `max_memory_bytes` bytes of memory.
    pub const fn with_max_memory_bytes(self, max_memory_bytes: u64) -> Self {
        Self {
            max_memory_bytes,
            ..self
        }
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a model costs per batch item, as [`IntegerModel::validate`] counts it against a
/// [`Budget`] (see there for the units).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Units of work.
    pub work: u64,
    /// Bytes of memory of a batch-1 `forward`.
    pub memory_bytes: u64,
}

/// A multiply-add, or a byte of a buffer a convolution or linear layer builds.
const MAC: u64 = 1;
/// A value an elementwise op, lookup or copy reads or writes.
const VALUE: u64 = 16;
/// A value computed in wide arithmetic, a table entry, a generic window read.
const WIDE: u64 = 64;
/// An averaged or reduced output.
const SLOW: u64 = 256;
/// Per axis of a value whose index is computed axis by axis.
const AXIS: u64 = 64;
/// The runner's work per node.
const NODE: u64 = 1 << 13;
/// Entries of an add or multiply node's table ([`crate::ops::pair_table`]).
const TABLE: u64 = 1 << 16;

/// One node's share of the cost, at batch 1.
pub(crate) struct NodeCost {
    /// Its work.
    pub work: u64,
    /// Bytes of its output, alive until its last reader has run.
    pub output: u64,
    /// Bytes of the working buffers while it runs (besides its inputs and output).
    pub scratch: u64,
    /// Bytes kept as long as the model: the node and its parameters, its packed weights or
    /// table, the runner's and validation's state for it.
    pub kept: u64,
}

fn product(xs: &[u64]) -> u64 {
    xs.iter().fold(1u64, |p, x| p.saturating_mul(*x))
}

fn values(shape: &[usize]) -> u64 {
    shape.iter().fold(1u64, |p, d| p.saturating_mul(*d as u64))
}

/// Bytes of a node's parameters (what the file holds for it).
fn parameter_bytes(op: &IntOp) -> u64 {
    let u = |v: usize| v as u64;
    let output = |o: &Output| match o {
        Output::Quantized { requant, .. } => u(requant.len()) * 8,
        Output::Float { scale, .. } => u(scale.len()) * 4,
    };
    match op {
        IntOp::Conv2d(c) => {
            u(c.weight.len()) + 4 * u(c.bias.len() + c.weight_scale.len()) + output(&c.output)
        }
        IntOp::Linear(l) => {
            u(l.weight.len()) + 4 * u(l.bias.len() + l.weight_scale.len()) + output(&l.output)
        }
        IntOp::Lut(t) | IntOp::ChannelLut { lut: t, .. } => u(t.table.len() + t.function.len()),
        IntOp::Concat { requantize, .. } => {
            let tables: usize = requantize
                .iter()
                .flatten()
                .map(|t| t.table.len() + t.function.len())
                .sum();
            u(requantize.len() * std::mem::size_of::<Option<crate::model::Lut>>() + tables)
        }
        IntOp::Permute { perm } => 8 * u(perm.len()),
        IntOp::Select { indices, .. } => 8 * u(indices.len()),
        IntOp::Softmax(s) => 4 * u(s.table.len()),
        IntOp::LayerNorm(l) => 4 * u(l.gamma.len() + l.beta.len()),
        IntOp::Constant { values } => u(values.len()),
        _ => 0,
    }
}

/// The cost of `node` on inputs of shapes `ins` with output shape `out` (batch 1, checked by
/// `infer`); `is_output`: whether it is the model's output (dequantized at the end).
pub(crate) fn node_cost(
    node: &IntNode,
    ins: &[Vec<usize>],
    out: &[usize],
    is_output: bool,
) -> NodeCost {
    let v = values(out);
    let read: u64 = ins.iter().map(|s| values(s)).fold(0, u64::saturating_add);
    let rank = out.len() as u64;
    let element = if node.grid.is_some() { 1 } else { 4 };
    let mut work = NODE;
    let mut scratch = 0u64;
    let mut cache = 0u64;
    let per_value = |w: u64| v.saturating_mul(w);
    match &node.op {
        IntOp::Input
        | IntOp::Constant { .. }
        | IntOp::Reshape
        | IntOp::Lut(_)
        | IntOp::ChannelLut { .. } => {
            work = work.saturating_add(per_value(VALUE));
        }
        IntOp::Quantize(_) => work = work.saturating_add(per_value(WIDE)),
        IntOp::Conv2d(c) => {
            let taps = product(&[
                (c.in_channels / c.groups.max(1)) as u64,
                c.kernel[0] as u64,
                c.kernel[1] as u64,
            ]);
            let b = kernels::conv_buffers(c, &ins[0]);
            work = product(&[v, taps, MAC])
                .saturating_add(b.built)
                .saturating_add(b.packed)
                .saturating_add(per_value(VALUE))
                .saturating_add(work);
            scratch = b.scratch;
            cache = b.packed;
        }
        IntOp::Linear(l) => {
            let rows = v / (l.out_features.max(1) as u64);
            let b = kernels::linear_buffers(l, rows as usize);
            work = product(&[v, l.in_features as u64, MAC])
                .saturating_add(b.built)
                .saturating_add(b.packed)
                .saturating_add(per_value(VALUE))
                .saturating_add(work);
            scratch = b.scratch;
            cache = b.packed;
        }
        IntOp::Add(_) | IntOp::Mul(_) => {
            // Every value computed directly (the reference) or looked up, through the index
            // of each axis when the inputs broadcast; the table built once.
            let broadcast = ins.iter().any(|s| s.as_slice() != out);
            let index = if broadcast { rank * AXIS } else { 0 };
            work = per_value(WIDE + index)
                .saturating_add(TABLE * WIDE)
                .saturating_add(work);
            cache = TABLE + std::mem::size_of::<Packed>() as u64;
        }
        IntOp::Concat { requantize, .. } => {
            let mapped: u64 = ins
                .iter()
                .zip(requantize)
                .filter(|(_, t)| t.is_some())
                .map(|(s, _)| values(s))
                .fold(0, u64::saturating_add);
            work = per_value(VALUE)
                .saturating_add(mapped.saturating_mul(VALUE))
                .saturating_add(work);
            scratch = mapped;
        }
        IntOp::MaxPool(w) => {
            work = product(&[v, w.kernel[0] as u64, w.kernel[1] as u64, WIDE]).saturating_add(work);
        }
        IntOp::AvgPool { window: w, .. } => {
            work = product(&[v, w.kernel[0] as u64, w.kernel[1] as u64, WIDE])
                .saturating_add(per_value(SLOW))
                .saturating_add(work);
        }
        IntOp::LayerNorm(_) => {
            // Per value, float work: dequantize, two passes of statistics, normalize, quantize.
            work = per_value(SLOW + 4 * WIDE).saturating_add(work);
        }
        IntOp::Softmax(_) => {
            // Per value, a maximum, a table lookup, a sum and a division.
            work = per_value(SLOW + 3 * WIDE).saturating_add(work);
        }
        IntOp::MatMul(_) => {
            // Per output value, the inner axis of multiply-adds and one requantization.
            let inner = ins.first().and_then(|s| s.last()).copied().unwrap_or(0) as u64;
            work = product(&[v, inner, MAC])
                .saturating_add(per_value(WIDE))
                .saturating_add(work);
        }
        IntOp::Bilinear { .. } => {
            work = product(&[v, 4, WIDE])
                .saturating_add(per_value(SLOW))
                .saturating_add(work);
        }
        IntOp::AdaptiveAvgPool { .. } => {
            work = read
                .saturating_mul(VALUE)
                .saturating_add(per_value(SLOW))
                .saturating_add(work);
        }
        IntOp::Reduce { .. } => {
            work = read
                .saturating_mul(WIDE)
                .saturating_add(per_value(SLOW))
                .saturating_add(work);
        }
        IntOp::Permute { .. } => work = work.saturating_add(per_value(VALUE + rank * AXIS)),
        IntOp::Select { .. } => work = work.saturating_add(per_value(VALUE)),
    }
    if is_output {
        // Dequantized (or copied) to the caller's floats.
        work = work.saturating_add(per_value(VALUE));
        scratch = scratch.saturating_add(v.saturating_mul(4));
    }
    // The node in memory, what the runner and validation keep per node.
    let node_bytes = (std::mem::size_of::<IntNode>()
        + node.name.len()
        + 8 * node.inputs.len()
        + std::mem::size_of::<Dim>() * node.shape.len()) as u64;
    let runner = (std::mem::size_of::<Option<Values>>()
        + std::mem::size_of::<OnceLock<Packed>>()
        + std::mem::size_of::<Option<crate::model::Grid>>()
        + 2 * (24 + 8 * node.shape.len())
        + 24) as u64;
    NodeCost {
        work,
        output: v.saturating_mul(element),
        scratch,
        kept: node_bytes
            .saturating_add(parameter_bytes(&node.op))
            .saturating_add(runner)
            .saturating_add(cache),
    }
}

/// The smallest memory a model of `nodes` nodes takes once decoded: checked by the loader
/// before it decodes them.
pub(crate) fn decoded_bytes(nodes: u64) -> u64 {
    nodes.saturating_mul(std::mem::size_of::<IntNode>() as u64)
}

impl IntegerModel {
    /// This model with another budget (see [`Budget`]): for a model from a trusted source
    /// that needs more than the default, or a smaller budget for untrusted ones. Validation
    /// runs again on the next `forward`.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self.cache.forget_validation();
        self
    }

    /// The budget [`validate`](Self::validate) and `forward` hold this model to.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// What the model costs per batch item, as [`validate`](Self::validate) counts it against
    /// its budget (checked for consistency, not against the budget).
    ///
    /// # Errors
    ///
    /// The first inconsistency, as [`validate`](Self::validate) reports it.
    pub fn cost(&self) -> Result<Cost, crate::ModelError> {
        self.check(&Budget::UNLIMITED)
    }
}
