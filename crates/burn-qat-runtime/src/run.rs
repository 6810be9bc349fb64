//! Running an [`IntegerModel`]: a [`Plan`] compiled once per batch size (node order, the
//! conv + max-pool fusion, buffer reuse, shapes checked once) and reused by every call, the
//! buffers it runs in, and the weight cache.
//!
//! A [`Session`] keeps its plans and buffers: after the first call at a batch size, a call at
//! that batch size allocates nothing (the kernels' per-thread buffers are sized on the first
//! call too, see `kernels::equalize_scratch`). [`IntegerModel::forward`] runs on a session
//! kept in the model's cache, copying the output out.

use std::sync::{Mutex, OnceLock};

use crate::kernels::{self, Packed};
use crate::model::{Grid, IntOp, IntegerModel, ModelError, Output, RunError};
use crate::ops;
use crate::validate::infer;

/// A tensor flowing through the integer model (what the [`kernels`](crate::kernels) return).
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// 8-bit values on a grid.
    Int {
        /// Values, row-major.
        data: Vec<i8>,
        /// Shape, batch first.
        shape: Vec<usize>,
        /// Their grid.
        grid: Grid,
    },
    /// Float values (model input, a float last layer).
    Float {
        /// Values, row-major.
        data: Vec<f32>,
        /// Shape, batch first.
        shape: Vec<usize>,
    },
}

impl Values {
    /// The shape, batch first.
    pub fn shape(&self) -> &[usize] {
        match self {
            Values::Int { shape, .. } | Values::Float { shape, .. } => shape,
        }
    }
}

/// What a model learns about itself on its first forward: that it is valid, and its weights
/// laid out for this machine's GEMM kernels (one slot per node, filled on first use). Kept
/// beside the model's data, never saved or compared; a clone starts empty. After editing a
/// model's nodes in place, call [`IntegerModel::clear_cache`].
#[derive(Default)]
pub struct WeightCache(
    OnceLock<Vec<OnceLock<Packed>>>,
    OnceLock<Result<(), ModelError>>,
    /// The plans and buffers of `forward` (another thread's call meanwhile uses its own).
    Mutex<State>,
);

impl WeightCache {
    /// Forgets the validation (kept: the packed weights).
    pub(crate) fn forget_validation(&mut self) {
        self.1 = OnceLock::new();
    }

    fn slot(&self, node: usize, nodes: usize) -> &OnceLock<Packed> {
        &self
            .0
            .get_or_init(|| (0..nodes).map(|_| OnceLock::new()).collect())[node]
    }
}

impl Clone for WeightCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for WeightCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self
            .0
            .get()
            .map_or(0, |v| v.iter().filter(|s| s.get().is_some()).count());
        write!(f, "WeightCache({packed} nodes packed)")
    }
}

/// A buffer of node `node` that could not be allocated at batch size `batch`, as its error.
fn out_of_memory(
    model: &IntegerModel,
    node: usize,
    batch: usize,
    e: kernels::OutOfMemory,
) -> RunError {
    err(
        model,
        node,
        format!(
            "{e} at batch size {batch}: values grow with the batch (a smaller batch needs \
             less), the rest stays within the model's budget of {} bytes",
            model.budget.max_memory_bytes
        ),
    )
}

fn err(model: &IntegerModel, node: usize, what: String) -> RunError {
    RunError::Model(ModelError {
        node,
        name: model
            .nodes
            .get(node)
            .map_or_else(String::new, |n| n.name.clone()),
        what,
    })
}

/// Where a node's values live while the model runs: one of the session's `i8` or `f32`
/// buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    float: bool,
    index: usize,
}

/// What a step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The node's own kernel.
    Node,
    /// A convolution and the max pooling `pool` right after it, its only reader, at once
    /// (`kernels::conv2d_max_pool`); the output is the pooling's.
    ConvMaxPool { pool: usize },
    /// A reshape of a value nobody reads after it: the same buffer, a new shape.
    Move,
}

/// One step of a plan: a node (or a fused pair), its inputs' and output's buffers.
#[derive(Clone, Debug)]
struct Step {
    node: usize,
    kind: Kind,
    inputs: Vec<Slot>,
    out: Slot,
}

/// How an [`IntegerModel`] runs at one batch size, worked out once: every node's shape
/// (checked against its inputs' by the rule of [`validate`](IntegerModel::validate)), the
/// steps in order with the fusions taken (a convolution with the max pooling that alone reads
/// it; a reshape of a dead value in place), and the buffer of each value, reused as soon as
/// its last reader has run (`i8` and `f32` buffers apart).
///
/// ```
/// use burn_qat_runtime::model::{Dim, Grid, IntNode, IntOp, IntegerModel};
///
/// let g = Grid { scale: 0.1, zero_point: 0, qmin: -128, qmax: 127 };
/// let node = |name: &str, op, inputs, grid| IntNode {
///     name: name.into(), op, inputs, shape: vec![Dim::Batch(1), Dim::Fixed(4)], grid,
/// };
/// let model = IntegerModel::new(
///     vec![
///         node("x", IntOp::Input, vec![], None),
///         node("q", IntOp::Quantize(g), vec![0], Some(g)),
///         node("r", IntOp::Reshape, vec![1], Some(g)),
///     ],
///     2,
/// );
/// let plan = model.plan_for(3).unwrap();
/// assert_eq!(plan.batch(), 3);
/// assert_eq!(plan.output_shape(), &[3, 4]);
/// assert_eq!(plan.buffers(), (1, 1)); // one i8 buffer (the reshape moves it), one f32
/// ```
#[derive(Clone, Debug)]
pub struct Plan {
    batch: usize,
    shapes: Vec<Vec<usize>>,
    steps: Vec<Step>,
    ints: usize,
    floats: usize,
    outputs: Vec<Slot>,
    output_nodes: Vec<usize>,
    /// Whether a call has run and the kernels' per-thread buffers were evened out after it.
    warm: bool,
}

impl Plan {
    /// The batch size it runs.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The (first) output's shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.shapes[self.output_nodes[0]]
    }

    /// Every output's shape, in order.
    pub fn output_shapes(&self) -> Vec<&[usize]> {
        self.output_nodes
            .iter()
            .map(|&o| &self.shapes[o][..])
            .collect()
    }

    /// How many `i8` and `f32` buffers the steps share.
    pub fn buffers(&self) -> (usize, usize) {
        (self.ints, self.floats)
    }

    /// How many steps run (nodes, less the fused and moved ones).
    pub fn steps(&self) -> usize {
        self.steps.iter().filter(|s| s.kind != Kind::Move).count()
    }

    fn new(model: &IntegerModel, batch: usize, reference: bool) -> Result<Plan, RunError> {
        let n = model.nodes.len();
        let shapes: Vec<Vec<usize>> = model
            .nodes
            .iter()
            .map(|node| node.shape.iter().map(|d| d.at(batch)).collect())
            .collect();
        let mut last_use = vec![0; n];
        let mut readers = vec![0usize; n];
        for (i, node) in model.nodes.iter().enumerate() {
            let ins: Vec<Vec<usize>> = node.inputs.iter().map(|j| shapes[*j].clone()).collect();
            check_shape(model, i, &ins, &shapes[i])?;
            for j in &node.inputs {
                last_use[*j] = i;
                readers[*j] += 1;
            }
        }
        for &o in &model.outputs {
            last_use[o] = usize::MAX;
        }
        let mut float = vec![false; n];
        let mut slots: Vec<Option<Slot>> = vec![None; n];
        let (mut free_int, mut free_float) = (Vec::new(), Vec::new());
        let (mut ints, mut floats) = (0, 0);
        let mut steps = Vec::with_capacity(n);
        let mut skip = None;
        for (i, node) in model.nodes.iter().enumerate() {
            if skip == Some(i) {
                continue;
            }
            let inputs = node
                .inputs
                .iter()
                .map(|j| {
                    slots[*j].ok_or_else(|| err(model, i, "its input was not computed".into()))
                })
                .collect::<Result<Vec<Slot>, RunError>>()?;
            float[i] = value_is_float(model, i, &inputs)?;
            let pool = (!reference)
                .then(|| pool_after(model, i, &readers))
                .flatten();
            let (kind, out) = if matches!(node.op, IntOp::Reshape) && last_use[node.inputs[0]] == i
            {
                (Kind::Move, inputs[0])
            } else {
                let free = if float[i] {
                    &mut free_float
                } else {
                    &mut free_int
                };
                let count = if float[i] { &mut floats } else { &mut ints };
                let index = free.pop().unwrap_or_else(|| {
                    *count += 1;
                    *count - 1
                });
                let kind = match pool {
                    Some(pool) => Kind::ConvMaxPool { pool },
                    None => Kind::Node,
                };
                (
                    kind,
                    Slot {
                        float: float[i],
                        index,
                    },
                )
            };
            let at = match kind {
                Kind::ConvMaxPool { pool } => {
                    skip = Some(pool);
                    pool
                }
                _ => i,
            };
            slots[at] = Some(out);
            if kind != Kind::Move {
                // Each input read for the last time frees its buffer once (after the output
                // took one: a step never writes over what it reads).
                for (k, (j, slot)) in node.inputs.iter().zip(&inputs).enumerate() {
                    if last_use[*j] == i && !node.inputs[..k].contains(j) {
                        let free = if slot.float {
                            &mut free_float
                        } else {
                            &mut free_int
                        };
                        free.push(slot.index);
                    }
                }
            }
            steps.push(Step {
                node: i,
                kind,
                inputs,
                out,
            });
        }
        let outputs = model
            .outputs
            .iter()
            .map(|&o| slots[o].ok_or_else(|| err(model, o, "the output is not computed".into())))
            .collect::<Result<Vec<Slot>, RunError>>()?;
        Ok(Plan {
            batch,
            shapes,
            steps,
            ints,
            floats,
            outputs,
            output_nodes: model.outputs.clone(),
            warm: false,
        })
    }
}

/// Whether node `i` produces floats (its inputs' buffers `inputs` say what it reads).
fn value_is_float(model: &IntegerModel, i: usize, inputs: &[Slot]) -> Result<bool, RunError> {
    let op = &model.nodes[i].op;
    let wants_int = |k: usize| -> Result<(), RunError> {
        match inputs.get(k) {
            Some(s) if !s.float => Ok(()),
            _ => Err(err(model, i, format!("input {k} is not an integer tensor"))),
        }
    };
    Ok(match op {
        IntOp::Input => true,
        IntOp::Quantize(_) => {
            if !inputs.first().is_some_and(|s| s.float) {
                return Err(err(model, i, "quantizes a non-float tensor".into()));
            }
            false
        }
        IntOp::Reshape | IntOp::Permute { .. } | IntOp::Select { .. } => {
            inputs
                .first()
                .ok_or_else(|| err(model, i, "its input was not computed".into()))?
                .float
        }
        IntOp::Conv2d(c) => {
            wants_int(0)?;
            matches!(c.output, Output::Float { .. })
        }
        IntOp::Linear(l) => {
            wants_int(0)?;
            matches!(l.output, Output::Float { .. })
        }
        _ => {
            for k in 0..inputs.len() {
                wants_int(k)?;
            }
            if model.nodes[i].grid.is_none() {
                return Err(err(model, i, "has no output grid".into()));
            }
            false
        }
    })
}

/// The shape rule of `validate` for node `i`: its inputs' shapes `ins` give `shape`.
fn check_shape(
    model: &IntegerModel,
    i: usize,
    ins: &[Vec<usize>],
    shape: &[usize],
) -> Result<(), RunError> {
    match infer(&model.nodes[i].op, ins, shape) {
        Ok(got) if got == shape => Ok(()),
        Ok(got) => Err(err(
            model,
            i,
            format!("computes {got:?}, declares {shape:?}"),
        )),
        Err(e) => Err(err(model, i, e)),
    }
}

/// Node `i + 1` when node `i` is a convolution with a quantized output (not the model's
/// output) whose one reader is node `i + 1`, a max pooling the row-wise kernel runs
/// (`ops::row_wise`: no dilation, no padding but ceil mode's at the end) (`readers`: per
/// node, how many inputs name it).
fn pool_after(model: &IntegerModel, i: usize, readers: &[usize]) -> Option<usize> {
    let IntOp::Conv2d(c) = &model.nodes[i].op else {
        return None;
    };
    let next = model.nodes.get(i + 1)?;
    let IntOp::MaxPool(w) = &next.op else {
        return None;
    };
    let only_reader = next.inputs == [i] && readers[i] == 1 && !model.outputs.contains(&i);
    (only_reader && ops::row_wise(w) && c.output.grid().is_some()).then_some(i + 1)
}

/// A session's plans (one per batch size met) and the buffers they run in, without the model.
#[derive(Default)]
struct State {
    plans: Vec<Plan>,
    /// The plan of the last call.
    last: usize,
    /// Values in one batch item of each input.
    items: Option<Vec<usize>>,
    reference: bool,
    ints: Vec<Vec<i8>>,
    floats: Vec<Vec<f32>>,
    acc: Vec<i32>,
    /// The dequantized outputs of the last call (one buffer per output).
    out: Vec<Vec<f32>>,
}

/// Runs an [`IntegerModel`] again and again: keeps a [`Plan`] per batch size and the buffers
/// the plans run in, so that after the first call at a batch size a call allocates nothing.
///
/// ```
/// use burn_qat_runtime::model::{Dim, Grid, IntNode, IntOp, IntegerModel, Lut};
///
/// let g = Grid { scale: 0.5, zero_point: 0, qmin: -128, qmax: 127 };
/// let table = (0..256).map(|i| (i as i32 - 128).max(0) as i8).collect();
/// let relu = Lut { function: "Relu".into(), input: g, output: g, table };
/// let node = |name: &str, op, inputs, grid| IntNode {
///     name: name.into(), op, inputs, shape: vec![Dim::Batch(1), Dim::Fixed(2)], grid,
/// };
/// let model = IntegerModel::new(
///     vec![
///         node("x", IntOp::Input, vec![], None),
///         node("q", IntOp::Quantize(g), vec![0], Some(g)),
///         node("relu", IntOp::Lut(relu), vec![1], Some(g)),
///     ],
///     2,
/// );
/// let mut session = model.session();
/// let (y, shape) = session.run(&[1.0, -2.0, 3.0, 0.25]).unwrap();
/// assert_eq!((y, shape), (&[1.0, 0.0, 3.0, 0.0][..], &[2, 2][..]));
/// ```
pub struct Session<'m> {
    model: &'m IntegerModel,
    state: State,
}

impl<'m> Session<'m> {
    /// Runs the model on a batch of float inputs (`[n, ..input_shape]` row-major, `n` inferred
    /// from the length) and returns the float outputs (dequantized if the output is
    /// quantized) and their shape, borrowed from the session until the next call.
    ///
    /// # Errors
    ///
    /// As [`IntegerModel::forward`].
    pub fn run(&mut self, input: &[f32]) -> Result<(&[f32], &[usize]), RunError> {
        self.model.one_output()?;
        self.state.run(self.model, &[input])?;
        self.state.dequantize(self.model);
        Ok(self.state.float_output(self.model, 0))
    }

    /// [`run`](Self::run) for a model of several inputs or outputs: one slice per input (each
    /// `[n, ..its item shape]`, the same `n`), one `(values, shape)` per output.
    ///
    /// # Errors
    ///
    /// As [`IntegerModel::forward_many`].
    pub fn run_many(&mut self, inputs: &[&[f32]]) -> Result<Vec<(&[f32], &[usize])>, RunError> {
        self.state.run(self.model, inputs)?;
        self.state.dequantize(self.model);
        Ok((0..self.model.outputs.len())
            .map(|k| self.state.float_output(self.model, k))
            .collect())
    }

    /// Like [`run`](Self::run), returning the raw integer output with its shape and grid, or
    /// `None` if the model's output is float.
    ///
    /// # Errors
    ///
    /// As [`IntegerModel::forward`].
    pub fn run_int(&mut self, input: &[f32]) -> Result<Option<(&[i8], &[usize], Grid)>, RunError> {
        self.model.one_output()?;
        self.state.run(self.model, &[input])?;
        Ok(self.state.int_output(self.model, 0))
    }

    /// The plan for batch size `batch`, compiled now if it is new.
    ///
    /// # Errors
    ///
    /// [`RunError::Model`] if the model is inconsistent at this batch size.
    pub fn plan(&mut self, batch: usize) -> Result<&Plan, RunError> {
        let at = self.state.plan(self.model, batch)?;
        Ok(&self.state.plans[at])
    }
}

impl State {
    /// The index of the plan for `batch`, compiled if new.
    fn plan(&mut self, model: &IntegerModel, batch: usize) -> Result<usize, RunError> {
        model.cache.1.get_or_init(|| model.validate()).clone()?;
        if let Some(at) = self.plans.iter().position(|p| p.batch == batch) {
            return Ok(at);
        }
        let plan = Plan::new(model, batch, self.reference)?;
        if self.ints.len() < plan.ints {
            self.ints.resize_with(plan.ints, Vec::new);
        }
        if self.floats.len() < plan.floats {
            self.floats.resize_with(plan.floats, Vec::new);
        }
        self.plans.push(plan);
        Ok(self.plans.len() - 1)
    }

    /// Runs `inputs` (the plan that ran is `self.last`).
    fn run(&mut self, model: &IntegerModel, inputs: &[&[f32]]) -> Result<(), RunError> {
        let items = self.items.get_or_insert_with(|| {
            model
                .input_shapes()
                .iter()
                .map(|s| s.iter().product())
                .collect()
        });
        if inputs.len() != items.len() {
            return Err(RunError::Inputs {
                given: format!("{} slices", inputs.len()),
                expected: format!("{} inputs of {:?}", items.len(), model.input_shapes()),
            });
        }
        let whole = |k: usize| items[k] > 0 && inputs[k].len().is_multiple_of(items[k]);
        if let Some(k) = (0..items.len()).find(|&k| !whole(k)) {
            if items.len() == 1 {
                return Err(RunError::Input {
                    len: inputs[0].len(),
                    input_shape: model.input_shape(),
                });
            }
            return Err(RunError::Inputs {
                given: format!("{} values for input {k}", inputs[k].len()),
                expected: format!("{} inputs of {:?}", items.len(), model.input_shapes()),
            });
        }
        let batch = inputs[0].len() / items[0];
        if (1..items.len()).any(|k| inputs[k].len() / items[k] != batch) {
            let lens: Vec<usize> = inputs.iter().map(|x| x.len()).collect();
            return Err(RunError::Inputs {
                given: format!("{lens:?} values (batch sizes differ)"),
                expected: format!("{} inputs of {:?}", items.len(), model.input_shapes()),
            });
        }
        let at = self.plan(model, batch)?;
        self.last = at;
        let plan = &self.plans[at];
        let mut buffers = Buffers {
            ints: &mut self.ints,
            floats: &mut self.floats,
            acc: &mut self.acc,
        };
        for step in &plan.steps {
            buffers.step(model, plan, step, inputs, self.reference)?;
        }
        if !plan.warm && !self.reference {
            kernels::equalize_scratch();
            self.plans[at].warm = true;
        }
        Ok(())
    }

    /// Output `k` of the last call as 8-bit values with their grid (the plan checked that a
    /// quantized output has one), `None` if it is float.
    fn int_output(&self, model: &IntegerModel, k: usize) -> Option<(&[i8], &[usize], Grid)> {
        let plan = &self.plans[self.last];
        let node = plan.output_nodes[k];
        let grid = model.nodes[node].grid?;
        let slot = plan.outputs[k];
        (!slot.float).then(|| (&self.ints[slot.index][..], &plan.shapes[node][..], grid))
    }

    /// Dequantizes the quantized outputs of the last call into `out`.
    fn dequantize(&mut self, model: &IntegerModel) {
        let plan = &self.plans[self.last];
        self.out.resize_with(plan.outputs.len(), Vec::new);
        for (k, slot) in plan.outputs.iter().enumerate() {
            if slot.float {
                continue;
            }
            let grid = model.nodes[plan.output_nodes[k]].grid;
            let out = &mut self.out[k];
            out.clear();
            out.extend(
                self.ints[slot.index]
                    .iter()
                    .map(|q| grid.map_or(*q as f32, |g| g.dequantize(*q as i32))),
            );
        }
    }

    /// Output `k` of the last call as floats (after [`dequantize`](Self::dequantize)).
    fn float_output(&self, _model: &IntegerModel, k: usize) -> (&[f32], &[usize]) {
        let plan = &self.plans[self.last];
        let slot = plan.outputs[k];
        let shape = &plan.shapes[plan.output_nodes[k]][..];
        if slot.float {
            (&self.floats[slot.index], shape)
        } else {
            (&self.out[k], shape)
        }
    }
}

/// The buffers a plan's steps read and write.
struct Buffers<'a> {
    ints: &'a mut [Vec<i8>],
    floats: &'a mut [Vec<f32>],
    acc: &'a mut Vec<i32>,
}

impl Buffers<'_> {
    /// Runs one step: its output buffer is taken out while the kernel writes it (no step
    /// reads its own output buffer) and put back.
    fn step(
        &mut self,
        model: &IntegerModel,
        plan: &Plan,
        step: &Step,
        inputs: &[&[f32]],
        reference: bool,
    ) -> Result<(), RunError> {
        if step.kind == Kind::Move {
            return Ok(());
        }
        let i = step.node;
        let result = if step.out.float {
            let mut out = std::mem::take(&mut self.floats[step.out.index]);
            let r = self.float_step(model, plan, step, inputs, reference, &mut out);
            self.floats[step.out.index] = out;
            r
        } else {
            let mut out = std::mem::take(&mut self.ints[step.out.index]);
            let r = self.int_step(model, plan, step, reference, &mut out);
            self.ints[step.out.index] = out;
            r
        };
        result.map_err(|e| out_of_memory(model, i, plan.batch, e))
    }

    fn int(&self, slot: Slot) -> &[i8] {
        &self.ints[slot.index]
    }

    fn float(&self, slot: Slot) -> &[f32] {
        &self.floats[slot.index]
    }

    /// A step whose output is floats: the input, a float conv/linear, a reshape or permute of
    /// floats.
    fn float_step(
        &mut self,
        model: &IntegerModel,
        plan: &Plan,
        step: &Step,
        inputs: &[&[f32]],
        reference: bool,
        out: &mut Vec<f32>,
    ) -> Result<(), kernels::OutOfMemory> {
        let node = &model.nodes[step.node];
        let in_shape = |k: usize| &plan.shapes[node.inputs[k]][..];
        let slot = || model.cache.slot(step.node, model.nodes.len());
        match &node.op {
            IntOp::Input => {
                // The inputs are the leading nodes, in argument order.
                out.clear();
                out.extend_from_slice(inputs[step.node]);
            }
            IntOp::Conv2d(c) if reference => {
                *out = float_values(kernels::conv2d_reference(
                    c,
                    self.int(step.inputs[0]),
                    in_shape(0),
                )?);
            }
            IntOp::Conv2d(c) => kernels::conv2d_into(
                c,
                slot(),
                &self.ints[step.inputs[0].index],
                in_shape(0),
                out,
            )?,
            IntOp::Linear(l) if reference => {
                *out = float_values(kernels::linear_reference(
                    l,
                    self.int(step.inputs[0]),
                    in_shape(0),
                )?);
            }
            IntOp::Linear(l) => {
                let x = &self.ints[step.inputs[0].index];
                kernels::linear_into(l, slot(), x, self.acc, out)?
            }
            IntOp::Reshape => {
                out.clear();
                out.extend_from_slice(self.float(step.inputs[0]));
            }
            IntOp::Permute { perm } => {
                ops::permute(perm, self.float(step.inputs[0]), in_shape(0), out)
            }
            IntOp::Select { axis, indices } => {
                ops::select(*axis, indices, self.float(step.inputs[0]), in_shape(0), out)
            }
            _ => unreachable!("the plan gives float buffers to float values only"),
        }
        Ok(())
    }

    /// A step whose output is 8-bit.
    fn int_step(
        &mut self,
        model: &IntegerModel,
        plan: &Plan,
        step: &Step,
        reference: bool,
        out: &mut Vec<i8>,
    ) -> Result<(), kernels::OutOfMemory> {
        let node = &model.nodes[step.node];
        let shape = &plan.shapes[step.node][..];
        let in_shape = |k: usize| &plan.shapes[node.inputs[k]][..];
        let x = |k: usize| &self.ints[step.inputs[k].index][..];
        let slot = || model.cache.slot(step.node, model.nodes.len());
        // Output grids are checked by the plan (`value_is_float`).
        let grid = node.grid.unwrap_or(Grid {
            scale: 1.0,
            zero_point: 0,
            qmin: -128,
            qmax: 127,
        });
        match (&node.op, step.kind) {
            (IntOp::Conv2d(c), Kind::ConvMaxPool { pool }) => {
                let IntOp::MaxPool(w) = &model.nodes[pool].op else {
                    unreachable!("the plan fuses a max pooling")
                };
                kernels::conv2d_max_pool_into(c, slot(), x(0), in_shape(0), w, out)?
            }
            (IntOp::Quantize(g), _) => ops::quantize(g, self.float(step.inputs[0]), out),
            (IntOp::Conv2d(c), _) if reference => {
                *out = int_values(kernels::conv2d_reference(c, x(0), in_shape(0))?)
            }
            (IntOp::Conv2d(c), _) => kernels::conv2d_into(c, slot(), x(0), in_shape(0), out)?,
            (IntOp::Linear(l), _) if reference => {
                *out = int_values(kernels::linear_reference(l, x(0), in_shape(0))?)
            }
            (IntOp::Linear(l), _) => kernels::linear_into(l, slot(), x(0), self.acc, out)?,
            (IntOp::Add(a), _) if reference => {
                ops::add(a, x(0), in_shape(0), x(1), in_shape(1), shape, out)
            }
            (IntOp::Mul(m), _) if reference => {
                ops::mul(m, x(0), in_shape(0), x(1), in_shape(1), shape, out)
            }
            (IntOp::MatMul(m), _) => ops::matmul(m, x(0), in_shape(0), x(1), in_shape(1), out),
            (IntOp::Softmax(s), _) => ops::softmax(s, x(0), in_shape(0), out),
            (IntOp::LayerNorm(l), _) => ops::layer_norm(l, x(0), in_shape(0), out),
            (IntOp::Constant { values }, _) => {
                out.clear();
                out.extend_from_slice(values);
            }
            (IntOp::Add(a), _) => {
                let table = pair_table(slot(), |x, y| a.apply(x, y));
                ops::binary_lookup(table, x(0), in_shape(0), x(1), in_shape(1), shape, out)
            }
            (IntOp::Mul(m), _) => {
                let table = pair_table(slot(), |x, y| m.apply(x, y));
                ops::binary_lookup(table, x(0), in_shape(0), x(1), in_shape(1), shape, out)
            }
            (IntOp::Concat { axis, requantize }, _) => {
                let part = |k: usize| {
                    (
                        x(k),
                        in_shape(k),
                        requantize.get(k).and_then(|t| t.as_ref()),
                    )
                };
                ops::concat(*axis, node.inputs.len(), part, out)
            }
            (IntOp::MaxPool(w), _) => ops::max_pool(w, x(0), in_shape(0), out),
            (
                IntOp::AvgPool {
                    window,
                    count_include_pad,
                    input: g_in,
                },
                _,
            ) => ops::avg_pool(
                window,
                *count_include_pad,
                g_in,
                &grid,
                x(0),
                in_shape(0),
                out,
            ),
            (
                IntOp::AdaptiveAvgPool {
                    output,
                    input: g_in,
                },
                _,
            ) => ops::adaptive_avg_pool(*output, g_in, &grid, x(0), in_shape(0), out),
            (
                IntOp::Bilinear {
                    size,
                    align_corners,
                    input: g_in,
                },
                _,
            ) => ops::bilinear(*size, *align_corners, g_in, &grid, x(0), in_shape(0), out),
            (
                IntOp::Reduce {
                    axis,
                    mean,
                    input: g_in,
                },
                _,
            ) => ops::reduce(*axis, *mean, g_in, &grid, x(0), in_shape(0), out),
            (IntOp::Lut(t), _) => ops::lut(t, x(0), out),
            (IntOp::ChannelLut { lut, channels }, _) => {
                ops::channel_lut(lut, *channels, x(0), in_shape(0), out)
            }
            (IntOp::Reshape, _) => {
                out.clear();
                out.extend_from_slice(x(0));
            }
            (IntOp::Permute { perm }, _) => ops::permute(perm, x(0), in_shape(0), out),
            (IntOp::Select { axis, indices }, _) => {
                ops::select(*axis, indices, x(0), in_shape(0), out)
            }
            (IntOp::Input, _) => unreachable!("the input is float"),
        }
        Ok(())
    }
}

/// The data of a reference kernel's float values.
fn float_values(v: Values) -> Vec<f32> {
    match v {
        Values::Float { data, .. } => data,
        Values::Int { .. } => unreachable!("a float output gives float values"),
    }
}

/// The data of a reference kernel's 8-bit values.
fn int_values(v: Values) -> Vec<i8> {
    match v {
        Values::Int { data, .. } => data,
        Values::Float { .. } => unreachable!("a quantized output gives 8-bit values"),
    }
}

impl IntegerModel {
    /// Runs the model on a batch of float inputs (`[n, ..input_shape]` row-major, `n` inferred
    /// from the length), returning the float outputs (dequantized if the output node is
    /// quantized) and their shape. Integer arithmetic only between the input quantization and
    /// the output. Runs on a [`Session`] kept beside the model (its plans and buffers reused
    /// from call to call); [`session`](Self::session) gives one of your own, which returns
    /// the output without copying it.
    ///
    /// # Errors
    ///
    /// [`RunError::Input`] if `input.len()` is not a whole batch; [`RunError::Model`] if the
    /// model is inconsistent (see [`validate`](Self::validate)) or a buffer cannot be
    /// allocated.
    pub fn forward(&self, input: &[f32]) -> Result<(Vec<f32>, Vec<usize>), RunError> {
        self.one_output()?;
        Ok(self.forward_many(&[input])?.swap_remove(0))
    }

    /// [`forward`](Self::forward) for a model of several inputs or outputs: one slice per
    /// input (each `[n, ..its item shape]` row-major, the same `n` for all), one
    /// `(values, shape)` per output, in order.
    ///
    /// # Errors
    ///
    /// [`RunError::Inputs`] for another count of inputs or different batch sizes, else as
    /// [`forward`](Self::forward).
    pub fn forward_many(&self, inputs: &[&[f32]]) -> Result<Vec<(Vec<f32>, Vec<usize>)>, RunError> {
        self.with_state(false, |state| Self::outputs_of(self, state, inputs))
    }

    fn outputs_of(
        model: &IntegerModel,
        state: &mut State,
        inputs: &[&[f32]],
    ) -> Result<Vec<(Vec<f32>, Vec<usize>)>, RunError> {
        state.run(model, inputs)?;
        state.dequantize(model);
        Ok((0..model.outputs.len())
            .map(|k| {
                let (data, shape) = state.float_output(model, k);
                (data.to_vec(), shape.to_vec())
            })
            .collect())
    }

    /// A call that returns one output refuses a model of several.
    fn one_output(&self) -> Result<(), RunError> {
        match self.outputs.len() {
            1 => Ok(()),
            count => Err(RunError::Outputs { count }),
        }
    }

    /// Like [`forward`](Self::forward), with the slow scalar reference kernels for
    /// convolutions, linear layers and two-input ops (nested loops, no fusion).
    pub fn forward_reference(&self, input: &[f32]) -> Result<(Vec<f32>, Vec<usize>), RunError> {
        self.one_output()?;
        Ok(self.forward_reference_many(&[input])?.swap_remove(0))
    }

    /// [`forward_reference`](Self::forward_reference) for several inputs or outputs.
    pub fn forward_reference_many(
        &self,
        inputs: &[&[f32]],
    ) -> Result<Vec<(Vec<f32>, Vec<usize>)>, RunError> {
        self.with_state(true, |state| Self::outputs_of(self, state, inputs))
    }

    /// Runs the model and returns the raw integer output with its shape and grid, or `None`
    /// if the model's output is float.
    pub fn forward_int(
        &self,
        input: &[f32],
    ) -> Result<Option<(Vec<i8>, Vec<usize>, Grid)>, RunError> {
        self.one_output()?;
        Ok(self.forward_int_many(&[input])?.swap_remove(0))
    }

    /// [`forward_int`](Self::forward_int) for several inputs or outputs: per output, its raw
    /// integer values, shape and grid, or `None` for a float output.
    pub fn forward_int_many(
        &self,
        inputs: &[&[f32]],
    ) -> Result<Vec<Option<(Vec<i8>, Vec<usize>, Grid)>>, RunError> {
        self.with_state(false, |state| {
            state.run(self, inputs)?;
            Ok((0..self.outputs.len())
                .map(|k| {
                    state
                        .int_output(self, k)
                        .map(|(data, shape, grid)| (data.to_vec(), shape.to_vec(), grid))
                })
                .collect())
        })
    }

    /// A [`Session`] of its own: plans and buffers kept from call to call, the output
    /// borrowed instead of copied.
    pub fn session(&self) -> Session<'_> {
        Session {
            model: self,
            state: State::default(),
        }
    }

    /// The [`Plan`] at batch size `batch` (a fresh one; a [`Session`] keeps its own).
    ///
    /// # Errors
    ///
    /// [`RunError::Model`] if the model is inconsistent at this batch size.
    pub fn plan_for(&self, batch: usize) -> Result<Plan, RunError> {
        self.cache.1.get_or_init(|| self.validate()).clone()?;
        Plan::new(self, batch, false)
    }

    /// Forgets the packed weights, the validation and the plans (after editing nodes in
    /// place).
    pub fn clear_cache(&mut self) {
        self.cache = WeightCache::default();
    }

    /// Runs `f` on the session state kept in the cache (fast path), or on a fresh one while
    /// another thread uses it or for the reference kernels.
    fn with_state<R>(&self, reference: bool, f: impl FnOnce(&mut State) -> R) -> R {
        if !reference && let Ok(mut state) = self.cache.2.try_lock() {
            return f(&mut state);
        }
        f(&mut State {
            reference,
            ..State::default()
        })
    }
}

/// The node's table of every output of a two-input op (kept by the weight cache).
fn pair_table(slot: &OnceLock<Packed>, f: impl Fn(i8, i8) -> i8) -> &[i8] {
    let Packed::Table(table) = slot.get_or_init(|| Packed::Table(ops::pair_table(f))) else {
        unreachable!("a two-input op keeps its table as Packed::Table")
    };
    table
}
