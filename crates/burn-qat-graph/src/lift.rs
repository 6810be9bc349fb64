//! From a recorded op list to a [`QatGraph`] of Burn modules holding the user's parameters.

use std::collections::HashMap;

use burn::backend::capture::TensorId;
use burn::backend::ir::{
    ActivationOperationIr, AvgPool1dOpIr, AvgPool2dOpIr, BaseOperationIr, BatchNormOpIr,
    BinaryOpIr, Conv1dOpIr, Conv2dOpIr, CustomOpIr, FloatOperationIr, InterpolateModeIr,
    InterpolateOpIr, LayerNormOpIr, LinearOpIr, MaxPool1dOpIr, MaxPool2dOpIr, ModuleOperationIr,
    NumericOperationIr, OperationIr, ScalarIr, ScalarOpIr, SelectOpIr, ShapeOpIr, SliceOpIr,
    TensorIr,
};
use burn::module::{Param, RunningState};
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{BatchNorm, LayerNormConfig, Linear, PaddingConfig1d, PaddingConfig2d};
use burn::prelude::*;
use burn_qat_core::QatError;
use burn_qat_transform::FusedConfig;

use super::capture::Trace;
use super::ir::{Dim, LayerKind, Node, Op, Program};
use super::module::{GraphLayer, GraphLayerNorm, GraphParam, MAX_RANK, QatGraph};
use super::words::op_words;

/// Where a recorded tensor comes from.
#[derive(Clone, Debug)]
enum Src {
    /// The output of a graph node.
    Node(usize),
    /// A parameter value, possibly reshaped (the root parameter's recorded id).
    Param(TensorId),
}

use burn_qat_core::fused::capture::ids as capture_ids;

/// Marked ops the float graph reads through: fake quantization of the input (`x`, the first
/// input) on a grid, whose clamp is quantization, not part of the float computation.
fn is_pass_through(id: &str) -> bool {
    id == capture_ids::FAKE_QUANT || id == capture_ids::LSQ
}

/// Marked burn-qat ops the float graph cannot read through (a learned clip, an observer's
/// range read by the forward): refused by name.
fn is_refused_marked(op: &OperationIr) -> bool {
    matches!(op, OperationIr::Custom(c) if c.id.starts_with(capture_ids::PREFIX) && !is_pass_through(&c.id))
}

/// The module path of a parameter `op` is computed from (walking back through the ops that
/// made its inputs): where a marked quantizer lives, for messages.
fn param_near(trace: &Trace, op: &OperationIr) -> Option<String> {
    let made_by: HashMap<TensorId, &OperationIr> = trace
        .ops
        .iter()
        .flat_map(|o| o.outputs().map(move |t| (t.id, o)))
        .collect();
    let mut todo: Vec<TensorId> = op.inputs().map(|t| t.id).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        if let Some(p) = trace.params.get(&id) {
            return Some(p.module_path().to_string());
        }
        if let Some(o) = made_by.get(&id) {
            todo.extend(o.inputs().map(|t| t.id));
        }
    }
    None
}

/// Which recorded ops the output depends on. A pass-through quantizer depends on its `x` only,
/// so the arithmetic that made its grid (observers' min/max, scale and zero point from a
/// recorded range) is not live, and neither is anything else the output does not read.
fn live_ops(ops: &[OperationIr], outputs: &[TensorId]) -> Vec<bool> {
    let mut needed: std::collections::HashSet<TensorId> = outputs.iter().copied().collect();
    let mut live = vec![false; ops.len()];
    for (i, op) in ops.iter().enumerate().rev() {
        if !op.outputs().any(|t| needed.contains(&t.id)) {
            continue;
        }
        live[i] = true;
        match op {
            OperationIr::Custom(c) if is_pass_through(&c.id) => {
                if let Some(x) = c.inputs.first() {
                    needed.insert(x.id);
                }
            }
            _ => needed.extend(op.inputs().map(|t| t.id)),
        }
    }
    live
}

struct Lifter<'a> {
    trace: &'a Trace,
    device: Device,
    env: HashMap<TensorId, Src>,
    /// Values of tensors the forward computes from constants alone (folded at trace time).
    consts: HashMap<TensorId, TensorData>,
    /// Burn's IR interpreter on the CPU, for folding (made at the first constant op).
    interpreter: Option<burn_router::TensorInterpreter<burn::backend::Flex>>,
    nodes: Vec<Node>,
    layers: Vec<GraphLayer>,
    /// The module path of the last layer lifted (parameter-free ops are named after it).
    near: String,
    /// The module whose parameters the op being lifted reads, where that is known.
    inside: Option<String>,
    /// The index in the trace of the op being lifted.
    at: usize,
    /// The node of each parameter read as data.
    param_nodes: HashMap<TensorId, usize>,
    batch: (usize, usize),
}

fn scalar(s: &ScalarIr) -> f64 {
    match *s {
        ScalarIr::Float(f) => f,
        ScalarIr::Int(i) => i as f64,
        ScalarIr::UInt(u) => u as f64,
        ScalarIr::Bool(b) => f64::from(u8::from(b)),
    }
}

impl<'a> Lifter<'a> {
    fn err(&self, what: String, hint: &str) -> QatError {
        QatError::Graph {
            what,
            near: self.place(),
            hint: hint.into(),
        }
    }

    /// Where in the user's forward the op being lifted is: in the module whose parameters it
    /// reads, after the last layer lifted, or before the first layer (ops on the input).
    fn place(&self) -> String {
        if let Some(module) = &self.inside {
            return format!("in `{module}`");
        }
        if !self.near.is_empty() {
            return format!("after `{}`", self.near);
        }
        let next = self.trace.ops.iter().skip(self.at).find_map(|op| {
            op.inputs()
                .find_map(|t| self.trace.params.get(&t.id))
                .map(|p| p.module_path().to_string())
        });
        match next {
            Some(module) => format!("on the input, before `{module}` (the first layer)"),
            None => "on the input".into(),
        }
    }

    /// A recorded value that is data, not a parameter, or a folded constant.
    fn constant(&self, id: TensorId) -> Option<&TensorData> {
        // The input is recorded as data too; a node's value is computed from it.
        if self.trace.inputs.contains(&id)
            || self.trace.params.contains_key(&id)
            || self.env.contains_key(&id)
        {
            return None;
        }
        self.consts.get(&id).or_else(|| self.trace.values.get(&id))
    }

    /// Folds `a` if it computes from constants alone (no input, no parameter, no randomness):
    /// runs it with Burn's IR interpreter on the CPU and keeps its outputs' values. Returns
    /// whether it did. `b` (the same op at the other batch size) must make the same shapes.
    fn fold(&mut self, a: &OperationIr, b: &OperationIr) -> Result<bool, QatError> {
        let random = matches!(
            a,
            OperationIr::Float(_, FloatOperationIr::Random(_))
                | OperationIr::NumericInt(_, NumericOperationIr::IntRandom(_))
        );
        if matches!(
            a,
            OperationIr::Drop(_) | OperationIr::Init(_) | OperationIr::Custom(_)
        ) || random
            || !a.inputs().all(|t| self.constant(t.id).is_some())
        {
            return Ok(false);
        }
        let same_shapes = a
            .outputs()
            .zip(b.outputs())
            .all(|(x, y)| x.shape == y.shape);
        if !same_shapes {
            return Err(self.err(
                format!("{}, on a constant whose size depends on the batch", op_words(a)),
                "graph mode folds constants made in the forward; make them the same at every batch size",
            ));
        }
        let inputs: Vec<(TensorId, TensorData)> = a
            .inputs()
            .map(|t| (t.id, self.constant(t.id).cloned().expect("checked")))
            .collect();
        let interpreter = self.interpreter.get_or_insert_with(|| {
            burn_router::TensorInterpreter::new(burn::backend::flex::FlexDevice)
        });
        for (id, data) in inputs {
            interpreter.register_tensor_data_id(id, data);
        }
        interpreter.register_op(a.clone());
        let read: Vec<_> = a
            .outputs()
            .map(|out| {
                // Recorded as not yet computed; read as computed.
                let mut read = out.clone();
                read.status = burn::backend::ir::TensorStatus::ReadOnly;
                (out.id, ready(interpreter.read_tensor_async(read)))
            })
            .collect();
        for (id, data) in read {
            let data = data.map_err(|e| {
                self.err(
                    format!("{}, on constants: {e:?}", op_words(a)),
                    "graph mode could not fold this constant; compute it outside the forward",
                )
            })?;
            self.consts.insert(id, data);
        }
        Ok(true)
    }

    /// A node for each float constant `a` reads (the same tensors of `b` at the other batch
    /// size), once.
    fn constant_nodes(&mut self, a: &OperationIr, b: &OperationIr) -> Result<(), QatError> {
        for (x, y) in a.inputs().zip(b.inputs()) {
            if self.env.contains_key(&x.id) || !x.dtype.is_float() {
                continue;
            }
            let Some(data) = self.constant(x.id) else {
                continue;
            };
            let shape = data.shape().to_vec();
            let values = data
                .clone()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            self.push(Op::Constant { shape, values }, vec![], (x, y))?;
        }
        Ok(())
    }

    fn src(&self, t: &TensorIr) -> Result<Src, QatError> {
        if let Some(s) = self.env.get(&t.id) {
            return Ok(s.clone());
        }
        if self.trace.params.contains_key(&t.id) {
            return Ok(Src::Param(t.id));
        }
        if self.trace.values.contains_key(&t.id) {
            return Err(self.err(
                format!("a constant tensor of shape {:?} created in the forward", t.shape.as_slice()),
                "graph mode lifts parameters and the computation on the input; hold constants in a `Param` \
                 (frozen if it must not train) or compute them outside the forward",
            ));
        }
        Err(self.err(
            format!("a tensor of shape {:?} not computed from the input", t.shape.as_slice()),
            "the forward creates tensors (zeros, ones, random) the graph cannot lift; compute them from the input",
        ))
    }

    fn node_input(&mut self, t: &TensorIr, what: &str) -> Result<usize, QatError> {
        match self.src(t)? {
            Src::Node(i) => Ok(i),
            Src::Param(p) => self.param_node(p, what),
        }
    }

    /// A parameter the forward computes with as data (a position embedding added to the
    /// tokens): a node of its own that returns the trainable parameter, made once.
    fn param_node(&mut self, p: TensorId, what: &str) -> Result<usize, QatError> {
        if let Some(&i) = self.param_nodes.get(&p) {
            return Ok(i);
        }
        let shape = self.trace.values[&p].shape().to_vec();
        let value = match shape.len() {
            1 => GraphParam::R1(self.param::<1>(p)),
            2 => GraphParam::R2(self.param::<2>(p)),
            3 => GraphParam::R3(self.param::<3>(p)),
            4 => GraphParam::R4(self.param::<4>(p)),
            r => {
                return Err(self.err(
                    format!(
                        "{what} reads the parameter `{}` of rank {r} as data",
                        self.trace.params[&p].path
                    ),
                    "graph mode lifts parameters read as data (position embeddings) of rank 1 to 4",
                ));
            }
        };
        self.layers.push(GraphLayer::Param(value));
        self.nodes.push(Node {
            op: Op::Layer {
                index: self.layers.len() - 1,
                kind: LayerKind::Param,
            },
            inputs: vec![],
            name: self.trace.params[&p].path.clone(),
            shape: shape.into_iter().map(Dim::Fixed).collect(),
        });
        let i = self.nodes.len() - 1;
        self.param_nodes.insert(p, i);
        Ok(i)
    }

    fn param_root(&self, t: &TensorIr, what: &str) -> Result<TensorId, QatError> {
        match self.src(t)? {
            Src::Param(p) => Ok(p),
            Src::Node(_) => Err(self.err(
                format!("{what} computed from the input"),
                "graph mode lifts layers whose weights are parameters (Conv, Linear, BatchNorm); \
                 compute this weight outside the traced forward and hold it in a `Param`",
            )),
        }
    }

    fn dims(&self, a: &TensorIr, b: &TensorIr) -> Result<Vec<Dim>, QatError> {
        let (na, nb) = self.batch;
        if a.shape.as_slice().len() != b.shape.as_slice().len() {
            return Err(self.err(
                "a tensor whose rank depends on the batch size".into(),
                "graph mode needs one graph for every batch size",
            ));
        }
        a.shape
            .as_slice()
            .iter()
            .zip(b.shape.as_slice().iter())
            .map(|(&va, &vb)| {
                if va == vb {
                    Ok(Dim::Fixed(va))
                } else if vb > va && (vb - va) % (nb - na) == 0 && va == (vb - va) / (nb - na) * na
                {
                    Ok(Dim::Batch((vb - va) / (nb - na)))
                } else {
                    Err(self.err(
                        format!("a size {va} at batch {na} and {vb} at batch {nb}"),
                        "graph mode handles sizes that are fixed or a multiple of the batch",
                    ))
                }
            })
            .collect()
    }

    fn push(
        &mut self,
        op: Op,
        inputs: Vec<usize>,
        out: (&TensorIr, &TensorIr),
    ) -> Result<usize, QatError> {
        if out.0.shape.as_slice().len() > MAX_RANK {
            return Err(self.err(
                format!("a tensor of rank {}", out.0.shape.as_slice().len()),
                "graph mode handles ranks 1 to 6",
            ));
        }
        let shape = self.dims(out.0, out.1)?;
        let name = self.name_of(&op);
        self.nodes.push(Node {
            op,
            inputs,
            name,
            shape,
        });
        let i = self.nodes.len() - 1;
        self.env.insert(out.0.id, Src::Node(i));
        Ok(i)
    }

    /// A node's name: the layer's module path, or `<last layer>/<op>` for parameter-free ops.
    fn name_of(&self, op: &Op) -> String {
        match op {
            Op::Layer { .. } => self.near.clone(),
            other if self.near.is_empty() => other.name().to_lowercase(),
            other => format!("{}/{}", self.near, other.name().to_lowercase()),
        }
    }

    fn layer(
        &mut self,
        layer: GraphLayer,
        input: usize,
        out: (&TensorIr, &TensorIr),
        near: String,
    ) -> Result<usize, QatError> {
        self.near = near;
        let kind = layer.kind();
        self.layers.push(layer);
        let index = self.layers.len() - 1;
        self.push(Op::Layer { index, kind }, vec![input], out)
    }

    fn tensor<const D: usize>(&self, id: TensorId) -> Tensor<D> {
        Tensor::from_data(self.trace.values[&id].clone(), &self.device)
    }

    fn param<const D: usize>(&self, id: TensorId) -> Param<Tensor<D>> {
        let p = &self.trace.params[&id];
        let t = self.tensor::<D>(id);
        Param::initialized(p.id, t).set_require_grad(p.trainable)
    }

    fn running(&self, id: TensorId) -> RunningState<Tensor<1>> {
        RunningState::with_id(self.trace.params[&id].id, self.tensor::<1>(id))
    }

    fn path(&self, id: TensorId) -> String {
        self.trace.params[&id].module_path().to_string()
    }

    fn check_rank(&self, id: TensorId, rank: usize, what: &str) -> Result<(), QatError> {
        let got = self.trace.values[&id].shape().len();
        if got != rank {
            return Err(self.err(
                format!("{what} `{}` of rank {got}", self.trace.params[&id].path),
                &format!("expected rank {rank}"),
            ));
        }
        Ok(())
    }

    fn float_layer(&self) -> FusedConfig {
        FusedConfig::new().with_weight(None).with_output(None)
    }

    /// Lifts one recorded op, `a` at the first batch size and `b` the same op at the second:
    /// one lifter per op family.
    fn op(&mut self, a: &OperationIr, b: &OperationIr) -> Result<(), QatError> {
        match (a, b) {
            (OperationIr::Drop(_) | OperationIr::Init(_), _) => Ok(()),
            (OperationIr::Custom(c), _) => self.custom(a, c),
            (OperationIr::BaseFloat(x), OperationIr::BaseFloat(y)) => self.layout(a, x, y),
            (OperationIr::NumericFloat(_, x), OperationIr::NumericFloat(_, y)) => {
                self.numeric(a, x, y)
            }
            (OperationIr::Float(_, x), OperationIr::Float(_, y)) => self.float(a, x, y),
            (OperationIr::Activation(x), OperationIr::Activation(y)) => self.activation(a, x, y),
            (OperationIr::Module(x), OperationIr::Module(y)) => self.module(a, x, y),
            _ if std::mem::discriminant(a) != std::mem::discriminant(b) => Err(self.err(
                format!("{} at one batch size and {} at another", op_words(a), op_words(b)),
                "the forward branches on the batch size; graph mode needs one graph for every batch",
            )),
            _ => self.unsupported(a),
        }
    }

    /// The refusal of an op graph mode does not lift.
    fn unsupported(&self, a: &OperationIr) -> Result<(), QatError> {
        Err(self.err(
            op_words(a),
            "graph mode does not support this op yet: keep it outside the traced forward, or file an issue \
             naming the op",
        ))
    }

    /// `op` on the node that computes `x` (`what` names the op in errors), its output `out`.
    fn one_input(
        &mut self,
        op: Op,
        x: &TensorIr,
        what: &str,
        out: (&TensorIr, &TensorIr),
    ) -> Result<(), QatError> {
        let i = self.node_input(x, what)?;
        self.push(op, vec![i], out).map(drop)
    }

    /// A custom (backend-extension) op. A burn-qat quantizer already in the model (`quantize`,
    /// a custom layer holding a `FakeQuant`): the float graph reads through it; graph mode
    /// places its own quantizers by its `QatConfig`. Its grid arithmetic is not live (see
    /// `live_ops`). Any other is refused.
    fn custom(&mut self, a: &OperationIr, c: &CustomOpIr) -> Result<(), QatError> {
        if is_pass_through(&c.id) {
            if let (Some(x), Some(out)) = (c.inputs.first(), c.outputs.first()) {
                let src = self.src(x)?;
                self.env.insert(out.id, src);
            }
            return Ok(());
        }
        Err(self.err(
            format!("the custom op `{}`", c.id),
            if is_refused_marked(a) {
                "a PACT or trainable min/max clip (or an observer's range) in the traced \
                 forward is part of what the model computes and is not lifted yet: trace the \
                 float model, graph mode places its own quantizers"
            } else {
                "graph mode does not support custom backend-extension ops: keep it outside the \
                 traced forward"
            },
        ))
    }

    /// Reshape, swap_dims, permute and cat.
    fn layout(
        &mut self,
        a: &OperationIr,
        x: &BaseOperationIr,
        y: &BaseOperationIr,
    ) -> Result<(), QatError> {
        use BaseOperationIr as Bs;
        match (x, y) {
            (Bs::Reshape(o), Bs::Reshape(p)) => self.reshape(o, p),
            (Bs::SwapDims(o), Bs::SwapDims(p)) => {
                let op = Op::SwapDims {
                    a: o.dim1,
                    b: o.dim2,
                };
                self.one_input(op, &o.input, "swap_dims", (&o.out, &p.out))
            }
            (Bs::Permute(o), Bs::Permute(p)) => {
                let op = Op::Permute {
                    axes: o.axes.clone(),
                };
                self.one_input(op, &o.input, "permute", (&o.out, &p.out))
            }
            (Bs::Cat(o), Bs::Cat(p)) => {
                let inputs = o
                    .tensors
                    .iter()
                    .map(|t| self.node_input(t, "cat"))
                    .collect::<Result<Vec<_>, _>>()?;
                self.push(Op::Concat { axis: o.dim }, inputs, (&o.out, &p.out))
                    .map(drop)
            }
            (Bs::Select(o), Bs::Select(p)) => self.select(o, p),
            (Bs::Slice(o), Bs::Slice(p)) => self.slice(o, p),
            _ => self.unsupported(a),
        }
    }

    /// `Tensor::select` with indices made from data in the forward (`Tensor::from_ints`,
    /// `Tensor::arange_step`): a `Select` node.
    fn select(&mut self, o: &SelectOpIr, p: &SelectOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.tensor, "select")?;
        let what = || "`Tensor::select`".to_string();
        if o.dim != p.dim || o.indices.shape != p.indices.shape {
            return Err(self.err(
                format!("{} of other entries at another batch size", what()),
                "graph mode needs one graph for every batch size: select the same entries",
            ));
        }
        if o.dim == 0 {
            return Err(self.err(
                format!("{} along the batch axis", what()),
                "graph mode keeps every item of a batch: select along the other axes",
            ));
        }
        let Some(data) = self.constant(o.indices.id) else {
            return Err(self.err(
                format!("{} with indices computed in the forward", what()),
                "graph mode takes constant indices: make them from data (`Tensor::from_ints`, \
                 `Tensor::arange_step`)",
            ));
        };
        let size = o.tensor.shape.as_slice()[o.dim];
        let indices: Vec<usize> = data
            .iter::<i64>()
            .map(|i| usize::try_from(i).ok().filter(|&i| i < size))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                self.err(
                    format!("{} of an index outside 0..{size}", what()),
                    "select entries of the axis",
                )
            })?;
        if indices.is_empty() {
            return Err(self.err(format!("{} of no entries", what()), "select at least one"));
        }
        self.push(
            Op::Select {
                axis: o.dim,
                indices,
            },
            vec![x],
            (&o.out, &p.out),
        )
        .map(drop)
    }

    /// `Tensor::slice` (a step included): a `Select` node per axis it narrows, nothing when it
    /// takes everything.
    fn slice(&mut self, o: &SliceOpIr, p: &SliceOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.tensor, "slice")?;
        let (da, db) = (o.tensor.shape.as_slice(), p.tensor.shape.as_slice());
        let picked = |r: &burn::tensor::Slice, n: usize| -> Option<Vec<usize>> {
            (r.step > 0).then(|| r.to_range(n).step_by(r.step as usize).collect())
        };
        let mut picks = vec![];
        for (axis, (r, q)) in o.ranges.iter().zip(&p.ranges).enumerate() {
            let (Some(ia), Some(ib)) = (picked(r, da[axis]), picked(q, db[axis])) else {
                return Err(self.err(
                    "`Tensor::slice` with a negative step".into(),
                    "graph mode takes slices with a positive step",
                ));
            };
            let full =
                |i: &[usize], n: usize| i.len() == n && i.iter().enumerate().all(|(k, &v)| k == v);
            if full(&ia, da[axis]) && full(&ib, db[axis]) {
                continue;
            }
            if axis == 0 || ia != ib {
                return Err(self.err(
                    format!("`Tensor::slice` of {:?} along axis {axis}", r),
                    "graph mode keeps every item of a batch: slice the other axes, by sizes that \
                     do not depend on the batch",
                ));
            }
            if ia.is_empty() {
                return Err(self.err(
                    format!("`Tensor::slice` of no entries along axis {axis}"),
                    "slice at least one",
                ));
            }
            picks.push((axis, ia));
        }
        self.selects(x, picks, (&o.out, &p.out))
    }

    /// Nearest-neighbour `interpolate`: output entry `o` of an axis of `n` entries resized to
    /// `m` is input entry `floor(o * n / m)` (Burn's rule), a `Select` per resized axis.
    fn interpolate(&mut self, o: &InterpolateOpIr, p: &InterpolateOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.x, "interpolate")?;
        let dims = o.x.shape.as_slice();
        let mut picks = vec![];
        for (k, &m) in o.output_size.iter().enumerate() {
            let (axis, n) = (2 + k, dims[2 + k]);
            if m == n {
                continue;
            }
            let ratio = n as f64 / m as f64;
            let indices = (0..m)
                .map(|j| ((j as f64 * ratio).floor() as usize).min(n - 1))
                .collect();
            picks.push((axis, indices));
        }
        self.selects(x, picks, (&o.out, &p.out))
    }

    /// `Select` nodes on `x`, one per `(axis, indices)`, the last one's output `out`; `x`
    /// itself when there are none.
    fn selects(
        &mut self,
        mut x: usize,
        mut picks: Vec<(usize, Vec<usize>)>,
        out: (&TensorIr, &TensorIr),
    ) -> Result<(), QatError> {
        let Some((last_axis, last)) = picks.pop() else {
            self.env.insert(out.0.id, Src::Node(x));
            return Ok(());
        };
        for (axis, indices) in picks {
            let mut shape = self.nodes[x].shape.clone();
            shape[axis] = Dim::Fixed(indices.len());
            let name = self.name_of(&Op::Select {
                axis,
                indices: vec![],
            });
            self.nodes.push(Node {
                op: Op::Select { axis, indices },
                inputs: vec![x],
                name,
                shape,
            });
            x = self.nodes.len() - 1;
        }
        let op = Op::Select {
            axis: last_axis,
            indices: last,
        };
        self.push(op, vec![x], out).map(drop)
    }

    /// A reshape of a parameter stays that parameter (a bias reshaped for broadcasting); of a
    /// node, a `Reshape` node.
    fn reshape(&mut self, o: &ShapeOpIr, p: &ShapeOpIr) -> Result<(), QatError> {
        match self.src(&o.input)? {
            Src::Param(root) => {
                self.env.insert(o.out.id, Src::Param(root));
                Ok(())
            }
            Src::Node(i) => {
                let shape = self.dims(&o.out, &p.out)?;
                self.push(Op::Reshape { shape }, vec![i], (&o.out, &p.out))
                    .map(drop)
            }
        }
    }

    /// Elementwise arithmetic (with a tensor or a scalar), clamps, mean and sum along an axis.
    fn numeric(
        &mut self,
        a: &OperationIr,
        na: &NumericOperationIr,
        nb: &NumericOperationIr,
    ) -> Result<(), QatError> {
        use NumericOperationIr as N;
        let (inf, neg_inf) = (f64::INFINITY, f64::NEG_INFINITY);
        match (na, nb) {
            (N::Add(o), N::Add(p)) => self.add(o, p),
            (N::Sub(o), N::Sub(p)) => self.binary(Op::Sub, o, p),
            (N::Mul(o), N::Mul(p)) => self.binary(Op::Mul, o, p),
            (N::Div(o), N::Div(p)) => self.binary(Op::Div, o, p),
            (N::AddScalar(o), N::AddScalar(p)) => {
                self.scalar_op(Op::AddScalar, "a scalar op", o, p)
            }
            (N::SubScalar(o), N::SubScalar(p)) => {
                self.scalar_op(Op::SubScalar, "a scalar op", o, p)
            }
            (N::MulScalar(o), N::MulScalar(p)) => {
                self.scalar_op(Op::MulScalar, "a scalar op", o, p)
            }
            (N::DivScalar(o), N::DivScalar(p)) => {
                self.scalar_op(Op::DivScalar, "a scalar op", o, p)
            }
            (N::Clamp(o), N::Clamp(p)) => {
                let (min, max) = (scalar(&o.min), scalar(&o.max));
                self.one_input(Op::Clamp { min, max }, &o.tensor, "clamp", (&o.out, &p.out))
            }
            (N::ClampMin(o), N::ClampMin(p)) => {
                self.scalar_op(|min| Op::Clamp { min, max: inf }, "clamp", o, p)
            }
            (N::ClampMax(o), N::ClampMax(p)) => {
                self.scalar_op(|max| Op::Clamp { min: neg_inf, max }, "clamp", o, p)
            }
            (N::MeanDim(o), N::MeanDim(p)) => {
                let op = Op::MeanDim { axis: o.axis };
                self.one_input(op, &o.input, "a reduction", (&o.out, &p.out))
            }
            (N::Abs(o), N::Abs(p)) => {
                self.one_input(Op::Abs, &o.input, "`Tensor::abs`", (&o.out, &p.out))
            }
            (N::SumDim(o), N::SumDim(p)) => {
                let op = Op::SumDim { axis: o.axis };
                self.one_input(op, &o.input, "a reduction", (&o.out, &p.out))
            }
            _ => self.unsupported(a),
        }
    }

    /// A tensor op with a scalar operand: `op(scalar)` on the tensor (`what` names it in
    /// errors).
    fn scalar_op(
        &mut self,
        op: impl FnOnce(f64) -> Op,
        what: &str,
        o: &ScalarOpIr,
        p: &ScalarOpIr,
    ) -> Result<(), QatError> {
        let i = self.node_input(&o.lhs, what)?;
        let op = op(scalar(&o.rhs));
        self.push(op, vec![i], (&o.out, &p.out)).map(drop)
    }

    /// Sub, mul and div of two tensors.
    fn binary(&mut self, op: Op, o: &BinaryOpIr, p: &BinaryOpIr) -> Result<(), QatError> {
        let (l, r) = (
            self.node_input(&o.lhs, "a binary op")?,
            self.node_input(&o.rhs, "a binary op")?,
        );
        self.push(op, vec![l, r], (&o.out, &p.out)).map(drop)
    }

    /// An add: a Linear's bias (its matmul's output plus a 1-D bias parameter) joins the
    /// Linear; otherwise an `Add` of two tensors.
    fn add(&mut self, o: &BinaryOpIr, p: &BinaryOpIr) -> Result<(), QatError> {
        if let (Src::Node(l), Src::Param(bias)) = (self.src(&o.lhs)?, self.src(&o.rhs)?)
            && let Op::Layer {
                index,
                kind: LayerKind::Linear,
            } = self.nodes[l].op
            && let GraphLayer::Linear(fused) = &self.layers[index]
            && fused.layer.bias.is_none()
            && self.trace.values[&bias].shape().len() == 1
        {
            let b = self.param::<1>(bias);
            if let GraphLayer::Linear(fused) = &mut self.layers[index] {
                fused.layer.bias = Some(b);
            }
            self.env.insert(o.out.id, Src::Node(l));
            return Ok(());
        }
        let (l, r) = (
            self.node_input(&o.lhs, "add")?,
            self.node_input(&o.rhs, "add")?,
        );
        self.push(Op::Add, vec![l, r], (&o.out, &p.out)).map(drop)
    }

    /// A matmul by a weight parameter (a Linear, whose bias may follow), tanh and exp.
    fn float(
        &mut self,
        a: &OperationIr,
        fa: &FloatOperationIr,
        fb: &FloatOperationIr,
    ) -> Result<(), QatError> {
        use FloatOperationIr as F;
        match (fa, fb) {
            (F::Matmul(o), F::Matmul(p)) if matches!(self.src(&o.rhs)?, Src::Node(_)) => {
                let a = self.node_input(&o.lhs, "matmul")?;
                let b = self.node_input(&o.rhs, "matmul")?;
                self.push(Op::MatMul, vec![a, b], (&o.out, &p.out))
                    .map(drop)
            }
            (F::Matmul(o), F::Matmul(p)) => {
                let x = self.node_input(&o.lhs, "matmul")?;
                let w = self.param_root(&o.rhs, "a matmul whose right operand is")?;
                self.check_rank(w, 2, "Linear weight")?;
                let near = self.path(w);
                let linear = Linear {
                    weight: self.param::<2>(w),
                    bias: None,
                };
                let fused = self.float_layer().init(linear, None)?;
                self.layer(GraphLayer::Linear(fused), x, (&o.out, &p.out), near)
                    .map(drop)
            }
            (F::Tanh(o), F::Tanh(p)) => {
                self.one_input(Op::Tanh, &o.input, "an activation", (&o.out, &p.out))
            }
            (F::Exp(o), F::Exp(p)) => {
                self.one_input(Op::Exp, &o.input, "an activation", (&o.out, &p.out))
            }
            _ => self.unsupported(a),
        }
    }

    /// ReLU, GELU, sigmoid, hard sigmoid, leaky ReLU and softmax.
    fn activation(
        &mut self,
        a: &OperationIr,
        aa: &ActivationOperationIr,
        ab: &ActivationOperationIr,
    ) -> Result<(), QatError> {
        use ActivationOperationIr as A;
        let (op, o, p) = match (aa, ab) {
            (A::Relu(o), A::Relu(p)) => (Op::Relu, &o.input, &p.out),
            (A::Gelu(o), A::Gelu(p)) => (Op::Gelu, &o.input, &p.out),
            (A::Sigmoid(o), A::Sigmoid(p)) => (Op::Sigmoid, &o.input, &p.out),
            (A::HardSigmoid(o), A::HardSigmoid(p)) => (
                Op::HardSigmoid {
                    alpha: scalar(&o.alpha),
                    beta: scalar(&o.beta),
                },
                &o.tensor,
                &p.out,
            ),
            (A::LeakyRelu(o), A::LeakyRelu(p)) => (
                Op::LeakyRelu {
                    slope: scalar(&o.rhs),
                },
                &o.lhs,
                &p.out,
            ),
            (A::Softmax(o), A::Softmax(p)) => (Op::Softmax { axis: o.axis }, &o.input, &p.out),
            _ => return self.unsupported(a),
        };
        self.one_input(op, o, "an activation", (activation_out(aa), p))
    }

    /// Burn's modules: conv, linear, BatchNorm (layers holding the user's parameters) and
    /// pooling.
    fn module(
        &mut self,
        a: &OperationIr,
        ma: &ModuleOperationIr,
        mb: &ModuleOperationIr,
    ) -> Result<(), QatError> {
        use ModuleOperationIr as M;
        match (ma, mb) {
            (M::Conv2d(o), M::Conv2d(p)) => self.conv2d(o, p),
            (M::Conv1d(o), M::Conv1d(p)) => self.conv1d(o, p),
            (M::Linear(o), M::Linear(p)) => self.linear(o, p),
            (M::BatchNorm(o), M::BatchNorm(p)) => self.batch_norm(o, p),
            (M::LayerNorm(o), M::LayerNorm(p)) => self.layer_norm(o, p),
            (M::MaxPool2d(o), M::MaxPool2d(p)) => {
                self.one_input(max_pool2d(o), &o.x, "max_pool2d", (&o.out, &p.out))
            }
            (M::MaxPool1d(o), M::MaxPool1d(p)) => {
                self.one_input(max_pool1d(o), &o.x, "max_pool1d", (&o.out, &p.out))
            }
            (M::AvgPool2d(o), M::AvgPool2d(p)) => {
                self.one_input(avg_pool2d(o), &o.x, "avg_pool2d", (&o.out, &p.out))
            }
            (M::AvgPool1d(o), M::AvgPool1d(p)) => {
                self.one_input(avg_pool1d(o), &o.x, "avg_pool1d", (&o.out, &p.out))
            }
            (M::AdaptiveAvgPool2d(o), M::AdaptiveAvgPool2d(p)) => {
                let op = Op::AdaptiveAvgPool2d {
                    output: o.output_size,
                };
                self.one_input(op, &o.x, "adaptive_avg_pool2d", (&o.out, &p.out))
            }
            (M::AdaptiveAvgPool1d(o), M::AdaptiveAvgPool1d(p)) => {
                let op = Op::AdaptiveAvgPool1d {
                    output: o.output_size,
                };
                self.one_input(op, &o.x, "adaptive_avg_pool1d", (&o.out, &p.out))
            }
            (M::Interpolate(o), M::Interpolate(p))
                if o.options.mode == InterpolateModeIr::Nearest
                    && o.output_size == p.output_size =>
            {
                self.interpolate(o, p)
            }
            (M::Interpolate(o), M::Interpolate(p))
                if o.options.mode == InterpolateModeIr::Bilinear
                    && o.output_size == p.output_size
                    && o.x.shape.len() == 4 =>
            {
                let op = Op::Bilinear {
                    size: o.output_size,
                    align_corners: o.options.align_corners,
                };
                self.one_input(op, &o.x, "interpolate", (&o.out, &p.out))
            }
            (M::Interpolate(o), _)
                if matches!(
                    o.options.mode,
                    InterpolateModeIr::Nearest | InterpolateModeIr::Bilinear
                ) =>
            {
                Err(self.err(
                    format!("{} to a size that depends on the batch size", op_words(a)),
                    "graph mode needs one graph for every batch size: resize to a fixed size",
                ))
            }
            (M::Interpolate(_), _) => Err(self.err(
                op_words(a),
                "graph mode resizes with nearest-neighbour (entries copied) or bilinear \
                 interpolation, which the integer model and ONNX compute too; bicubic and \
                 Lanczos are not lifted yet: use `InterpolateMode::Nearest` or `Bilinear`",
            )),
            _ => self.unsupported(a),
        }
    }

    /// A `Conv2d` layer on the user's weight and bias parameters.
    fn conv2d(&mut self, o: &Conv2dOpIr, p: &Conv2dOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.x, "conv2d")?;
        let w = self.param_root(&o.weight, "a conv2d weight")?;
        self.check_rank(w, 4, "Conv2d weight")?;
        let bias = o
            .bias
            .as_ref()
            .map(|b| self.param_root(b, "a conv2d bias"))
            .transpose()?;
        let ks = &self.trace.values[&w].shape();
        let [(top, bottom), (left, right)] = o.options.padding;
        let conv = Conv2d {
            weight: self.param::<4>(w),
            bias: bias.map(|b| self.param::<1>(b)),
            stride: o.options.stride,
            kernel_size: [ks[2], ks[3]],
            dilation: o.options.dilation,
            groups: o.options.groups,
            padding: PaddingConfig2d::Explicit(top, left, bottom, right),
        };
        let near = self.path(w);
        let fused = self.float_layer().init(conv, None)?;
        self.layer(GraphLayer::Conv2d(fused), x, (&o.out, &p.out), near)
            .map(drop)
    }

    /// A `Conv1d` layer on the user's weight and bias parameters.
    fn conv1d(&mut self, o: &Conv1dOpIr, p: &Conv1dOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.x, "conv1d")?;
        let w = self.param_root(&o.weight, "a conv1d weight")?;
        self.check_rank(w, 3, "Conv1d weight")?;
        let bias = o
            .bias
            .as_ref()
            .map(|b| self.param_root(b, "a conv1d bias"))
            .transpose()?;
        let ks = &self.trace.values[&w].shape();
        let [(left, right)] = o.options.padding;
        let conv = Conv1d {
            weight: self.param::<3>(w),
            bias: bias.map(|b| self.param::<1>(b)),
            stride: o.options.stride[0],
            kernel_size: ks[2],
            dilation: o.options.dilation[0],
            groups: o.options.groups,
            padding: PaddingConfig1d::Explicit(left, right),
        };
        let near = self.path(w);
        let fused = self.float_layer().init(conv, None)?;
        self.layer(GraphLayer::Conv1d(fused), x, (&o.out, &p.out), near)
            .map(drop)
    }

    /// A `Linear` layer on the user's weight and bias parameters.
    fn linear(&mut self, o: &LinearOpIr, p: &LinearOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.x, "linear")?;
        let w = self.param_root(&o.weight, "a linear weight")?;
        self.check_rank(w, 2, "Linear weight")?;
        let bias = o
            .bias
            .as_ref()
            .map(|b| self.param_root(b, "a linear bias"))
            .transpose()?;
        let linear = Linear {
            weight: self.param::<2>(w),
            bias: bias.map(|b| self.param::<1>(b)),
        };
        let near = self.path(w);
        let fused = self.float_layer().init(linear, None)?;
        self.layer(GraphLayer::Linear(fused), x, (&o.out, &p.out), near)
            .map(drop)
    }

    /// A `LayerNorm` on the user's scale and shift (its epsilon as recorded).
    fn layer_norm(&mut self, o: &LayerNormOpIr, p: &LayerNormOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.input, "layer_norm")?;
        let g = self.param_root(&o.gamma, "a LayerNorm gamma")?;
        self.check_rank(g, 1, "LayerNorm gamma")?;
        let b = o
            .beta
            .as_ref()
            .map(|b| self.param_root(b, "a LayerNorm beta"))
            .transpose()?;
        let d = self.trace.values[&g].shape()[0];
        let epsilon = scalar(&o.epsilon);
        let mut norm = LayerNormConfig::new(d)
            .with_epsilon(epsilon)
            .with_bias(b.is_some())
            .init(&self.device);
        norm.gamma = self.param::<1>(g);
        norm.beta = b.map(|b| self.param::<1>(b));
        let near = self.path(g);
        let ln = GraphLayerNorm { norm, epsilon };
        self.layer(GraphLayer::LayerNorm(ln), x, (&o.out, &p.out), near)
            .map(drop)
    }

    /// A `BatchNorm` layer on the user's parameters and running statistics.
    fn batch_norm(&mut self, o: &BatchNormOpIr, p: &BatchNormOpIr) -> Result<(), QatError> {
        let x = self.node_input(&o.x, "batch_norm")?;
        let g = self.param_root(&o.gamma, "a BatchNorm gamma")?;
        let bt = self.param_root(&o.beta, "a BatchNorm beta")?;
        let m = self.param_root(&o.mean, "a BatchNorm running mean")?;
        let v = self.param_root(&o.variance, "a BatchNorm running variance")?;
        let bn = BatchNorm {
            gamma: self.param::<1>(g),
            beta: self.param::<1>(bt),
            training: Param::from_bool(true),
            running_mean: self.running(m),
            running_var: self.running(v),
            momentum: 0.1,
            epsilon: scalar(&o.epsilon),
        };
        let near = self.path(g);
        self.layer(GraphLayer::BatchNorm(bn), x, (&o.out, &p.out), near)
            .map(drop)
    }
}

fn max_pool2d(o: &MaxPool2dOpIr) -> Op {
    Op::MaxPool2d {
        kernel: o.kernel_size,
        stride: o.stride,
        padding: o.padding,
        dilation: o.dilation,
        ceil_mode: o.ceil_mode,
    }
}

fn max_pool1d(o: &MaxPool1dOpIr) -> Op {
    Op::MaxPool1d {
        kernel: o.kernel_size,
        stride: o.stride,
        padding: o.padding,
        dilation: o.dilation,
        ceil_mode: o.ceil_mode,
    }
}

fn avg_pool2d(o: &AvgPool2dOpIr) -> Op {
    Op::AvgPool2d {
        kernel: o.kernel_size,
        stride: o.stride,
        padding: o.padding,
        count_include_pad: o.count_include_pad,
        ceil_mode: o.ceil_mode,
    }
}

fn avg_pool1d(o: &AvgPool1dOpIr) -> Op {
    Op::AvgPool1d {
        kernel: o.kernel_size,
        stride: o.stride,
        padding: o.padding,
        count_include_pad: o.count_include_pad,
        ceil_mode: o.ceil_mode,
    }
}

fn activation_out(a: &ActivationOperationIr) -> &TensorIr {
    use ActivationOperationIr as A;
    match a {
        A::Relu(o) | A::Gelu(o) | A::Sigmoid(o) => &o.out,
        A::HardSigmoid(o) => &o.out,
        A::LeakyRelu(o) => &o.out,
        A::Softmax(o) => &o.out,
        _ => unreachable!("only lifted activations reach here"),
    }
}

/// Lifts `trace` into a float [`QatGraph`] on `device`: the user's forward, op for op.
pub fn lift(trace: &Trace, device: &Device) -> Result<QatGraph, QatError> {
    let batch = trace.input_dims[0][0];
    let mut lifter = Lifter {
        trace,
        device: device.clone(),
        env: HashMap::new(),
        consts: HashMap::new(),
        interpreter: None,
        nodes: vec![],
        layers: vec![],
        near: String::new(),
        inside: None,
        at: 0,
        param_nodes: HashMap::new(),
        batch: (batch, batch + 1),
    };
    for (k, (dims, &id)) in trace.input_dims.iter().zip(&trace.inputs).enumerate() {
        let mut shape: Vec<Dim> = dims.iter().map(|&d| Dim::Fixed(d)).collect();
        shape[0] = Dim::Batch(1);
        lifter.nodes.push(Node {
            op: Op::Input,
            inputs: vec![],
            name: if trace.inputs.len() == 1 {
                "input".into()
            } else {
                format!("input.{k}")
            },
            shape,
        });
        if lifter.env.insert(id, Src::Node(k)).is_some() {
            return Err(lifter.err(
                format!("input {k} is the same tensor as an earlier input"),
                "pass each input once",
            ));
        }
    }
    let live = live_ops(&trace.ops, &trace.outputs);
    // A marked op the float graph cannot read through (a learned clip) is reported by name
    // before the arithmetic on its parameters fails with a less useful message.
    let marked = trace
        .ops
        .iter()
        .zip(&live)
        .find(|(op, live)| **live && is_refused_marked(op));
    if let Some((op, _)) = marked {
        lifter.inside = param_near(trace, op);
        lifter.op(op, op)?;
        lifter.inside = None;
    }
    for (at, ((a, b), live)) in trace
        .ops
        .iter()
        .zip(&trace.ops_next_batch)
        .zip(live)
        .enumerate()
    {
        if live {
            lifter.at = at;
            if lifter.fold(a, b)? {
                continue;
            }
            lifter.constant_nodes(a, b)?;
            lifter.op(a, b)?;
        }
    }
    let mut outputs = Vec::with_capacity(trace.outputs.len());
    for (k, id) in trace.outputs.iter().enumerate() {
        match lifter.env.get(id) {
            Some(Src::Node(i)) => outputs.push(*i),
            _ => {
                return Err(lifter.err(
                    if trace.outputs.len() == 1 {
                        "the forward returns a parameter, not a value computed from the input"
                            .into()
                    } else {
                        format!("output {k} is a parameter, not a value computed from the inputs")
                    },
                    "return the model's outputs",
                ));
            }
        }
    }
    let mut program = Program {
        nodes: lifter.nodes,
        outputs,
        integer_end: None,
    };
    super::rewrite::fuse_gated_activations(&mut program);
    super::rewrite::compose_activations(&mut program);
    Ok(super::rewrite::Editor::new(QatGraph {
        layers: lifter.layers,
        program,
    })
    .finish())
}

/// The value of a future that is ready at once (the CPU interpreter's reads).
fn ready<T>(f: impl std::future::Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}
