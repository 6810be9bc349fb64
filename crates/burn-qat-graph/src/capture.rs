//! Recording a model's forward with Burn's capture backend.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};

use burn::backend::Capture;
use burn::backend::capture::TensorId;
use burn::backend::ir::OperationIr;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn_qat_core::QatError;

use crate::io::GraphIo;

/// One parameter of the traced model: where it lives in the user's module tree.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedParam {
    /// Dotted parameter path in the user's model (`layer1.0.conv1.weight`).
    pub path: String,
    /// Its id, kept by the graph so optimizers, records and `write_back` line up.
    pub id: ParamId,
    /// Whether the user's model trains it (false for frozen parameters and running statistics
    /// of a model on an autodiff device).
    pub trainable: bool,
}

impl TracedParam {
    /// The module path (the parameter path without its field name).
    pub fn module_path(&self) -> &str {
        self.path.rsplit_once('.').map(|(m, _)| m).unwrap_or("")
    }
}

/// A recorded forward: the op list, the values of every parameter, and which parameter each
/// recorded value is. Made by [`trace`](crate::trace) and [`trace_many`](crate::trace_many).
#[derive(Clone, Debug)]
pub struct Trace {
    /// The recorded ops, in execution order, at [`input_dims`](Self::input_dims).
    pub ops: Vec<OperationIr>,
    /// The same forward recorded at batch size + 1 (used to find batch-dependent shapes).
    pub ops_next_batch: Vec<OperationIr>,
    /// Concrete values of the parameters and other constants of the trace.
    pub values: BTreeMap<TensorId, TensorData>,
    /// Recorded id of each parameter value.
    pub params: HashMap<TensorId, TracedParam>,
    /// The graph inputs, in the order of the forward's arguments.
    pub inputs: Vec<TensorId>,
    /// The graph outputs, in the order the forward returns them.
    pub outputs: Vec<TensorId>,
    /// Shape of each input of the traced call (batch first).
    pub input_dims: Vec<Vec<usize>>,
    /// Shape of each output of the traced call.
    pub output_dims: Vec<Vec<usize>>,
}

#[derive(Default)]
struct ParamIds {
    stack: Vec<String>,
    found: Vec<(TensorId, String, ParamId)>,
    error: Option<String>,
}

impl ModuleVisitor for ParamIds {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        match tensor_id(&param.val()) {
            Ok(id) => self.found.push((id, self.stack.join("."), param.id)),
            Err(e) => self.error = Some(format!("{}: {e}", self.stack.join("."))),
        }
    }
}

/// Trainable flags by `ParamId`, read from the caller's model without touching it.
#[derive(Default)]
struct ParamFlags {
    flags: HashMap<ParamId, bool>,
}

impl ModuleVisitor for ParamFlags {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let trainable = !param.lazy_device().is_autodiff() || param.is_require_grad();
        self.flags.insert(param.id, trainable);
    }
}

pub(crate) fn tensor_id<const D: usize>(t: &Tensor<D>) -> Result<TensorId, String> {
    t.clone()
        .try_into_primitive::<Capture>()
        .map(|p| p.id())
        .map_err(|e| format!("not a capture tensor ({e:?})"))
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

struct Recorded {
    ops: Vec<OperationIr>,
    values: BTreeMap<TensorId, TensorData>,
    params: Vec<(TensorId, String, ParamId)>,
    inputs: Vec<TensorId>,
    outputs: Vec<TensorId>,
    output_dims: Vec<Vec<usize>>,
}

type Ids = (
    Vec<(TensorId, String, ParamId)>,
    Vec<TensorId>,
    Vec<TensorId>,
    Vec<Vec<usize>>,
);

fn record<M, I, O, F>(model: &M, dims: &[Vec<usize>], forward: &F) -> Result<Recorded, QatError>
where
    M: Module,
    I: GraphIo,
    O: GraphIo,
    F: Fn(&M, I) -> O,
{
    // `valid()` builds fresh RunningState cells and strips autodiff: moving a clone would move
    // the caller's BatchNorm statistics onto the capture device.
    let snapshot = model.valid();
    let device = Device::capture();
    let out: RefCell<Option<Result<Ids, String>>> = RefCell::new(None);
    let result = catch_unwind(AssertUnwindSafe(|| {
        device.capture_scope(|scope| {
            let moved = snapshot.to_device(&device);
            let mut ids = ParamIds::default();
            moved.visit(&mut ids);
            let x = I::zeros(dims, &device);
            let ids_x = x.capture_ids();
            let y = forward(&moved, x);
            let output_dims = y.shapes();
            let ids_y = y.capture_ids();
            match (ids.error, ids_x, ids_y) {
                (None, Ok(xi), Ok(yi)) => {
                    *out.borrow_mut() = Some(Ok((ids.found, xi.clone(), yi.clone(), output_dims)));
                    scope.complete(xi, yi)
                }
                (e, a, b) => {
                    *out.borrow_mut() = Some(Err(e.or(a.err()).or(b.err()).unwrap_or_default()));
                    scope.complete([], [])
                }
            }
        })
    }));
    let captured = match result {
        Err(payload) => {
            let msg = panic_message(payload);
            let hint = if msg.contains("no concrete value") {
                "the forward reads tensor values (`into_scalar`, `into_data`, a branch on data): graph mode records \
                 ops without running them; make the forward depend on shapes only"
            } else if msg.contains("autodiff") {
                "capture the float model on a plain device (burn-qat calls `valid()` for you; a custom module may \
                 hold an autodiff tensor outside `Param`)"
            } else {
                "the forward called something the capture backend cannot record (Burn's quantized tensors, `seed()`, \
                 a backend extension without `Capture`)"
            };
            return Err(QatError::Graph {
                what: format!("the forward panicked while being recorded: {msg}"),
                near: "in the forward".into(),
                hint: hint.into(),
            });
        }
        Ok(Err(e)) => {
            return Err(QatError::Graph {
                what: format!("capture failed: {e:?}"),
                near: "in the forward".into(),
                hint: "trace one model at a time on a fresh capture device".into(),
            });
        }
        Ok(Ok(graph)) => graph,
    };
    let (params, inputs, outputs, output_dims) = match out.into_inner() {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            return Err(QatError::Graph {
                what: format!("a recorded tensor has no capture id: {e}"),
                near: "in the forward".into(),
                hint: "the forward must return a tensor computed from its input".into(),
            });
        }
        None => unreachable!("the capture closure always reports"),
    };
    Ok(Recorded {
        ops: captured.graph.operations,
        values: captured.values,
        params,
        inputs,
        outputs,
        output_dims,
    })
}

/// The op kind of a recorded op (`BaseFloat(Reshape`, `Custom(burn_qat.fake_quant)`): what it
/// computes, without its tensors' ids and shapes.
fn op_kind(op: &OperationIr) -> String {
    if let OperationIr::Custom(c) = op {
        return format!("Custom({})", c.id);
    }
    let text = format!("{op:?}");
    let second = text.match_indices('(').nth(1).map(|(i, _)| i);
    let brace = text.find('{');
    let end = match (second, brace) {
        (Some(p), Some(b)) => p.min(b),
        (Some(p), None) => p,
        (None, Some(b)) => b,
        (None, None) => text.len(),
    };
    text[..end].trim_end().to_string()
}

/// Where two recordings differ (count, or the first op of another kind), `None` if they do not.
fn first_difference(a: &[OperationIr], b: &[OperationIr]) -> Option<String> {
    if let Some(k) = (0..a.len().min(b.len())).find(|&k| op_kind(&a[k]) != op_kind(&b[k])) {
        return Some(format!(
            "op {k} is `{}` in one and `{}` in the other",
            op_kind(&a[k]),
            op_kind(&b[k])
        ));
    }
    (a.len() != b.len()).then(|| format!("{} ops against {}", a.len(), b.len()))
}

/// Records `forward(model, x)` for an input of shape `input_dims` (batch first) without running
/// it, and maps every recorded parameter value to its module path and `ParamId`.
///
/// The model is traced as `model.valid()`; the caller's model is not touched. The forward is
/// recorded twice, at batch size `input_dims[0]` and one more, so that shapes that depend on the
/// batch (a flatten's `[batch, -1]`) are found; where Burn decomposes an op differently at those
/// two sizes (a `Linear` on a 3-D input at batch 1), at the first pair of 2, 3, 4 and one more
/// that records the same ops. [`trace_many`] records a forward with several
/// inputs or outputs.
///
/// # Errors
///
/// `input_dims` of the wrong rank or with a zero, a forward that panics while recorded (it reads
/// values: `into_scalar`, data-dependent branches), a forward that branches on the batch size.
pub fn trace<M, const DI: usize, const DO: usize, F>(
    model: &M,
    input_dims: &[usize],
    forward: F,
) -> Result<Trace, QatError>
where
    M: Module,
    F: Fn(&M, Tensor<DI>) -> Tensor<DO>,
{
    trace_many(model, &[input_dims], forward)
}

/// [`trace`] for a forward with several inputs or outputs: `forward(model, inputs)` takes the
/// tensors of [`GraphIo`] `I` (one tensor or a tuple), of shapes `input_dims` (one per input,
/// each batch first, the same batch size), and returns one tensor or a tuple.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::prelude::*;
///
/// #[derive(Module, Debug)]
/// struct TwoHeads { image: Linear, meta: Linear, head: Linear, aux: Linear }
///
/// let device = Device::flex();
/// let m = TwoHeads {
///     image: LinearConfig::new(16, 8).init(&device),
///     meta: LinearConfig::new(3, 8).init(&device),
///     head: LinearConfig::new(8, 10).init(&device),
///     aux: LinearConfig::new(8, 1).init(&device),
/// };
/// let trace = burn_qat_graph::trace_many(
///     &m,
///     &[&[1, 16], &[1, 3]],
///     |m: &TwoHeads, (x, meta): (Tensor<2>, Tensor<2>)| {
///         let h = m.image.forward(x) + m.meta.forward(meta);
///         (m.head.forward(h.clone()), m.aux.forward(h))
///     },
/// )
/// .unwrap();
/// assert_eq!((trace.inputs.len(), trace.outputs.len()), (2, 2));
/// assert_eq!(trace.output_dims, [vec![1, 10], vec![1, 1]]);
/// ```
///
/// # Errors
///
/// As [`trace`]; also a count of `input_dims` other than the forward's inputs, or inputs of
/// different batch sizes.
pub fn trace_many<M, I, O, F>(
    model: &M,
    input_dims: &[&[usize]],
    forward: F,
) -> Result<Trace, QatError>
where
    M: Module,
    I: GraphIo,
    O: GraphIo,
    F: Fn(&M, I) -> O,
{
    let ranks = I::ranks();
    let field = |k: usize| {
        if ranks.len() == 1 {
            "input_dims".to_string()
        } else {
            format!("input_dims[{k}]")
        }
    };
    if input_dims.len() != ranks.len() {
        return Err(QatError::InvalidConfig {
            field: "input_dims".into(),
            value: format!("{input_dims:?}"),
            allowed: format!("{} shapes, one per input of the forward", ranks.len()),
        });
    }
    for (k, (dims, &rank)) in input_dims.iter().zip(&ranks).enumerate() {
        if dims.len() != rank {
            return Err(QatError::InvalidConfig {
                field: field(k),
                value: format!("{dims:?}"),
                allowed: format!(
                    "{rank} dimensions, the rank of the forward's input (batch first)"
                ),
            });
        }
        if dims.contains(&0) {
            return Err(QatError::InvalidConfig {
                field: field(k),
                value: format!("{dims:?}"),
                allowed: "non-zero sizes (the batch size is free later; any batch works here)"
                    .into(),
            });
        }
        if dims[0] != input_dims[0][0] {
            return Err(QatError::InvalidConfig {
                field: field(k),
                value: format!("{dims:?}"),
                allowed: format!(
                    "the batch size of the first input, {} (inputs are batch first)",
                    input_dims[0][0]
                ),
            });
        }
    }
    let dims: Vec<Vec<usize>> = input_dims.iter().map(|d| d.to_vec()).collect();
    let mut flags = ParamFlags::default();
    model.visit(&mut flags);
    // Burn picks an op's decomposition by shape (a `Linear` on a 3-D input is one batched
    // matmul at batch 1 and one matmul over merged rows at larger batches), so recordings at
    // two batch sizes can differ with no branch in the forward: the first pair of consecutive
    // batch sizes (from the one given, then 2, 3, 4) that records the same ops is kept, if the
    // given batch computes the same ops.
    let at = |n: usize| -> Vec<Vec<usize>> {
        dims.iter()
            .map(|d| {
                let mut d = d.clone();
                d[0] = n;
                d
            })
            .collect()
    };
    let b = dims[0][0];
    let mut recorded: HashMap<usize, Recorded> = HashMap::new();
    let mut mismatch = None;
    let mut pair = None;
    let mut tried = Vec::new();
    for n in [b, 2, 3, 4] {
        if pair.is_some() {
            break;
        }
        if tried.contains(&n) {
            continue;
        }
        tried.push(n);
        for m in [n, n + 1] {
            if let std::collections::hash_map::Entry::Vacant(e) = recorded.entry(m) {
                e.insert(record(model, &at(m), &forward)?);
            }
        }
        match first_difference(&recorded[&n].ops, &recorded[&(n + 1)].ops) {
            None => pair = Some(n),
            Some(d) => {
                mismatch.get_or_insert((n, d));
            }
        }
    }
    // Another pair than the given batch's is kept only if the given batch's recording differs
    // from it by reshapes alone (how Burn lays out the same ops), not by what it computes.
    let pair = pair.filter(|&n| {
        n == b || {
            let computing = |ops: &[OperationIr]| -> Vec<String> {
                ops.iter()
                    .map(op_kind)
                    .filter(|k| k != "BaseFloat(Reshape")
                    .collect()
            };
            computing(&recorded[&b].ops) == computing(&recorded[&n].ops)
        }
    });
    let Some(n) = pair else {
        let (n, what) = mismatch.expect("a pair was tried");
        return Err(QatError::Graph {
            what: format!(
                "the forward records other ops at batch {n} than at batch {}: {what}",
                n + 1
            ),
            near: "in the forward".into(),
            hint:
                "the forward branches on the batch size; graph mode needs one graph for every batch"
                    .into(),
        });
    };
    let first = recorded.remove(&n).expect("recorded");
    let second = recorded.remove(&(n + 1)).expect("recorded");
    let dims = at(n);
    let params = first
        .params
        .into_iter()
        .map(|(tid, path, id)| {
            let trainable = flags.flags.get(&id).copied().unwrap_or(true);
            (
                tid,
                TracedParam {
                    path,
                    id,
                    trainable,
                },
            )
        })
        .collect();
    Ok(Trace {
        ops: first.ops,
        ops_next_batch: second.ops,
        values: first.values,
        params,
        inputs: first.inputs,
        outputs: first.outputs,
        input_dims: dims,
        output_dims: first.output_dims,
    })
}
