//! The mutation harness of the hostile-input tests, shared by `tests/tests/hostile.rs` (debug,
//! in the test suite) and `crates/burn-qat/benches/hostile.rs` (the same cases in release).
//!
//! A real model with every integer op is mutated, with a fixed seed: first every integer field
//! of every node set in turn to the extremes of the integer types (`i64::MIN`, `i64::MAX`,
//! `i32::MIN`, `u64::MAX`) and to 2^24; then random semantic edits of its fields through its
//! serde form (numbers set to boundary values and extremes, a field chosen uniformly half the
//! time so that a node's few scalars are edited as often as its many weights; list elements
//! deleted, duplicated, swapped, lists emptied), long valid chains of add, multiply or reshape
//! nodes spliced in (up to 100,000 nodes, one case in 128), and byte edits of the file payload with a valid
//! checksum. Each accepted model runs `forward`, `forward_reference` (which must agree bit for
//! bit), `forward_int`, the ONNX writer, `precision`, `plan` and a save/load round trip, inside
//! `catch_unwind`; with a [`Probe`] (a counting allocator in the binary), the memory its
//! forwards allocate must stay within its budget estimate ([`IntegerModel::cost`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{
    AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, AvgPool2d, AvgPool2dConfig, MaxPool2d,
    MaxPool2dConfig,
};
use burn::nn::{BatchNorm, BatchNormConfig, Gelu, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::{sigmoid, silu};
use burn_qat::export::format;
use burn_qat::export::model::{IntAdd, IntMul, IntNode, IntOp, IntegerModel};
use burn_qat::export::requant::FixedMultiplier;
use burn_qat::graph;
use burn_qat::model::QatConfig;
use serde_json::Value;

/// Every integer op: conv (padding, BatchNorm, ReLU), depthwise conv (ReLU6), add, mul,
/// sigmoid (table), concat, BatchNorm after the concat (per-channel tables), max/avg/adaptive
/// pooling, permute, mean, flatten, select, linear with GELU, a float head.
#[derive(Module, Debug)]
struct Kitchen {
    c1: Conv2d,
    bn1: BatchNorm,
    dw: Conv2d,
    c2: Conv2d,
    bn2: BatchNorm,
    max: MaxPool2d,
    avg: AvgPool2d,
    gap: AdaptiveAvgPool2d,
    fc: Linear,
    gelu: Gelu,
    head: Linear,
    relu: Relu,
}

impl Kitchen {
    fn new(device: &Device) -> Self {
        let pad = PaddingConfig2d::Explicit(1, 1, 1, 1);
        Self {
            c1: Conv2dConfig::new([2, 4], [3, 3])
                .with_padding(pad.clone())
                .init(device),
            bn1: BatchNormConfig::new(4).init(device),
            dw: Conv2dConfig::new([4, 4], [3, 3])
                .with_groups(4)
                .with_padding(pad)
                .init(device),
            c2: Conv2dConfig::new([2, 4], [1, 1])
                .with_bias(false)
                .init(device),
            bn2: BatchNormConfig::new(8).init(device),
            max: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            avg: AvgPool2dConfig::new([2, 2]).with_strides([1, 1]).init(),
            gap: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(8 + 8, 6).init(device),
            gelu: Gelu::new(),
            head: LinearConfig::new(6, 3).init(device),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let a = self
            .relu
            .forward(self.bn1.forward(self.c1.forward(x.clone())));
        let b = self.dw.forward(a.clone()).clamp(0.0, 6.0);
        let s = a + b.clone();
        let g = s * sigmoid(b);
        let c = self.c2.forward(x);
        let n = silu(self.bn2.forward(Tensor::cat(vec![g, c], 1)));
        let p = self.avg.forward(self.max.forward(n));
        let pooled = self.gap.forward(p.clone()).flatten::<2>(1, 3);
        // Permuted, then entries picked out of order and twice (Permute, Select).
        let mean = p
            .permute([0, 1, 3, 2])
            .mean_dim(3)
            .mean_dim(2)
            .flatten::<2>(1, 3);
        let picks = Tensor::<1, Int>::from_ints([7, 0, 3, 3, 1, 2, 5, 6], &mean.device());
        let mean = mean.select(1, picks);
        let h = self
            .gelu
            .forward(self.fc.forward(Tensor::cat(vec![pooled, mean], 1)));
        self.head.forward(h)
    }
}

const DIMS: [usize; 4] = [1, 2, 8, 8];

pub fn kitchen_model() -> IntegerModel {
    let device = burn_qat::backend::device("flex").unwrap().autodiff();
    device.seed(17);
    let model = Kitchen::new(&device);
    let qat = graph::prepare(
        &model,
        &DIMS,
        |m: &Kitchen, x: Tensor<4>| m.forward(x),
        &QatConfig::new(),
    )
    .unwrap();
    for _ in 0..3 {
        let x = Tensor::<4>::random([4, 2, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let _: Tensor<2> = qat.forward(x);
    }
    let int8 = burn_qat::export::convert(&qat.valid()).unwrap();
    let kinds: Vec<&str> = int8.nodes.iter().map(|n| n.op.kind()).collect();
    for kind in [
        "Quantize",
        "Conv2d",
        "DepthwiseConv2d",
        "Add",
        "Mul",
        "Lut",
        "Concat",
        "ChannelLut",
        "MaxPool",
        "AvgPool",
        "AdaptiveAvgPool",
        "Mean",
        "Reshape",
        "Permute",
        "Select",
        "Linear",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    int8
}

/// A small deterministic generator (xorshift), so the cases are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const NUMBERS: [f64; 34] = [
    0.0,
    1.0,
    -1.0,
    2.0,
    3.0,
    -2.0,
    8.0,
    9.0,
    31.0,
    32.0,
    40.0,
    62.0,
    63.0,
    64.0,
    200.0,
    127.0,
    128.0,
    -128.0,
    -129.0,
    255.0,
    256.0,
    1_048_576.0,
    2_147_483_647.0,
    2_147_483_648.0,
    4_294_967_296.0,
    1_099_511_627_776.0,
    4.611_686_018_427_388e18,
    9.223_372_036_854_776e18,
    -9.223_372_036_854_776e18,
    1e-45,
    1e-30,
    1e30,
    3.4e38,
    -3.4e38,
];

/// Exact integers the edits of integer fields use besides `NUMBERS`: the extremes of the
/// integer types a field can have, and sizes that ask for a lot (a padding of 2^24).
const EXTREMES: [i128; 10] = [
    i64::MIN as i128,
    i64::MAX as i128,
    i32::MIN as i128,
    i32::MAX as i128,
    u32::MAX as i128,
    u64::MAX as i128,
    1 << 24,
    -(1 << 24),
    1 << 40,
    1 << 62,
];

/// The extremes every integer field is set to, one at a time.
const FIELD_EXTREMES: [i128; 5] = [
    i64::MIN as i128,
    i64::MAX as i128,
    i32::MIN as i128,
    u64::MAX as i128,
    1 << 24,
];

/// `x` as a JSON integer.
fn integer(x: i128) -> Value {
    if x < 0 {
        Value::from(x as i64)
    } else {
        Value::from(x as u64)
    }
}

/// The field a path to a number names: its array indices dropped, except the node's.
fn field(path: &[PathStep]) -> String {
    let mut key = String::new();
    for (k, step) in path.iter().enumerate() {
        match step {
            PathStep::Key(s) => {
                key.push('.');
                key.push_str(s);
            }
            PathStep::Index(i) if k == 1 => key.push_str(&format!("[{i}]")),
            PathStep::Index(_) => key.push_str("[]"),
        }
    }
    key
}

/// Paths to the numbers of a JSON value grouped by field (see [`field`]), in order.
fn fields(v: &Value) -> Vec<(String, Vec<Vec<PathStep>>)> {
    let (mut numbers, mut arrays) = (vec![], vec![]);
    leaves(v, &mut vec![], &mut numbers, &mut arrays);
    let mut groups: Vec<(String, Vec<Vec<PathStep>>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for path in numbers {
        let key = field(&path);
        let at = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, vec![]));
            groups.len() - 1
        });
        groups[at].1.push(path);
    }
    groups
}

/// `model` with each integer field of each node (its first value, for a list) set in turn to
/// each of [`FIELD_EXTREMES`]: what the edit was, and the model or why serde refused it.
pub fn extreme_field_cases(
    model: &IntegerModel,
) -> impl Iterator<Item = (String, Result<IntegerModel, String>)> {
    let json = serde_json::to_value(model).expect("a model serializes");
    let targets: Vec<(String, Vec<PathStep>)> = fields(&json)
        .into_iter()
        .filter_map(|(key, paths)| {
            let first = paths.into_iter().next()?;
            let mut probe = json.clone();
            at(&mut probe, &first)
                .is_some_and(|v| v.is_i64() || v.is_u64())
                .then_some((key, first))
        })
        .collect();
    targets.into_iter().flat_map(move |(key, path)| {
        let json = json.clone();
        FIELD_EXTREMES.into_iter().map(move |x| {
            let mut v = json.clone();
            if let Some(slot) = at(&mut v, &path) {
                *slot = integer(x);
            }
            (
                format!("{key} = {x}"),
                serde_json::from_value::<IntegerModel>(v).map_err(|e| e.to_string()),
            )
        })
    })
}

/// A valid chain of `len` add, multiply or reshape nodes spliced in after a node (its readers
/// then read the chain's end): a long file of valid nodes, each cheap to store.
fn splice_chain(m: &mut IntegerModel, rng: &mut Rng) -> String {
    let kind = rng.below(3);
    // Accepted chains of adds and multiplies build one 64 KiB table per node: 100 take a
    // quarter second in the debug test; 100,000 (7 MB) must be refused by the budget.
    let lengths: [usize; 4] = if kind == 2 {
        [2, 40, 400, 10_000]
    } else {
        [2, 10, 100, 100_000]
    };
    let len = lengths[rng.below(4)];
    let candidates: Vec<usize> = (0..m.nodes.len())
        .filter(|j| kind == 2 || m.nodes[*j].grid.is_some())
        .collect();
    let j = candidates[rng.below(candidates.len())];
    let (shape, grid) = (m.nodes[j].shape.clone(), m.nodes[j].grid);
    let chain: Vec<IntNode> = (0..len)
        .map(|k| {
            let op = match (kind, grid) {
                (0, Some(g)) => IntOp::Add(IntAdd {
                    a: g,
                    b: g,
                    out: g,
                    ma: 1 << 39,
                    mb: -(1 << 38),
                    shift: 40,
                    lo: g.qmin,
                    hi: g.qmax,
                }),
                (1, Some(g)) => IntOp::Mul(IntMul {
                    a: g,
                    b: g,
                    out: g,
                    multiplier: FixedMultiplier::new(0.02),
                    lo: g.qmin,
                    hi: g.qmax,
                }),
                _ => IntOp::Reshape,
            };
            let inputs = match op {
                IntOp::Reshape => vec![j + k],
                _ => vec![j + k, j],
            };
            IntNode {
                name: format!("chain{k}"),
                op,
                inputs,
                shape: shape.clone(),
                grid,
            }
        })
        .collect();
    for n in &mut m.nodes[j + 1..] {
        for i in &mut n.inputs {
            if *i >= j {
                *i += len;
            }
        }
    }
    for o in &mut m.outputs {
        if *o >= j {
            *o += len;
        }
    }
    m.nodes.splice(j + 1..j + 1, chain);
    format!(
        "{len} {} nodes spliced in after node {j}",
        ["Add", "Mul", "Reshape"][kind]
    )
}

/// Paths to every number and every array in a JSON value.
fn leaves(
    v: &Value,
    path: &mut Vec<PathStep>,
    numbers: &mut Vec<Vec<PathStep>>,
    arrays: &mut Vec<Vec<PathStep>>,
) {
    match v {
        Value::Number(_) => numbers.push(path.clone()),
        Value::Array(a) => {
            arrays.push(path.clone());
            for (i, x) in a.iter().enumerate() {
                path.push(PathStep::Index(i));
                leaves(x, path, numbers, arrays);
                path.pop();
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                path.push(PathStep::Key(k.clone()));
                leaves(x, path, numbers, arrays);
                path.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut v = v;
    for step in path {
        v = match step {
            PathStep::Key(k) => v.get_mut(k.as_str())?,
            PathStep::Index(i) => v.get_mut(*i)?,
        };
    }
    Some(v)
}

/// One semantic edit of the model's serde form; `by_field`: the original model's numbers
/// grouped by field.
fn mutate_json(v: &mut Value, rng: &mut Rng, by_field: &[(String, Vec<Vec<PathStep>>)]) -> String {
    let (mut numbers, mut arrays) = (vec![], vec![]);
    leaves(v, &mut vec![], &mut numbers, &mut arrays);
    if rng.below(3) > 0 && !numbers.is_empty() {
        // Half the time a field first, then one of its values (an earlier edit may have moved
        // it: then nothing changes).
        let path = if rng.below(2) == 0 && !by_field.is_empty() {
            let paths = &by_field[rng.below(by_field.len())].1;
            paths[rng.below(paths.len())].clone()
        } else {
            numbers[rng.below(numbers.len())].clone()
        };
        let Some(slot) = at(v, &path) else {
            return format!("{path:?}: gone");
        };
        if rng.below(4) == 0 && (slot.is_i64() || slot.is_u64()) {
            let x = EXTREMES[rng.below(EXTREMES.len())];
            *slot = integer(x);
            return format!("{path:?} = {x}");
        }
        let n = NUMBERS[rng.below(NUMBERS.len())];
        let new = if n.fract() == 0.0 && n.abs() < 9.2e18 && slot.is_i64() || slot.is_u64() {
            if n < 0.0 {
                Value::from(n as i64)
            } else {
                Value::from(n as u64)
            }
        } else {
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
        };
        *slot = new;
        return format!("{path:?} = {n}");
    }
    let path = arrays[rng.below(arrays.len())].clone();
    let Some(Value::Array(a)) = at(v, &path) else {
        return String::new();
    };
    if a.is_empty() {
        return String::new();
    }
    let i = rng.below(a.len());
    match rng.below(4) {
        0 => {
            a.remove(i);
            format!("{path:?}: removed {i}")
        }
        1 => {
            let x = a[i].clone();
            a.insert(i, x);
            format!("{path:?}: duplicated {i}")
        }
        2 => {
            let j = rng.below(a.len());
            a.swap(i, j);
            format!("{path:?}: swapped {i} and {j}")
        }
        _ => {
            a.clear();
            format!("{path:?}: emptied")
        }
    }
}

/// One byte edit of the file payload, with the checksum recomputed.
fn mutate_bytes(bytes: &mut [u8], rng: &mut Rng) -> String {
    const HEADER: usize = 24;
    let i = HEADER + rng.below(bytes.len() - HEADER);
    let old = bytes[i];
    bytes[i] = [
        0x00,
        0x01,
        0x7F,
        0x80,
        0xFF,
        0xFE,
        old ^ 0x40,
        old.wrapping_add(1),
    ][rng.below(8)];
    let crc = crc32fast::hash(&bytes[HEADER..]);
    bytes[20..24].copy_from_slice(&crc.to_le_bytes());
    format!("byte {i}: {old:#04x} -> {:#04x}", bytes[i])
}

thread_local! {
    /// Messages of the panics caught on the harness thread, latest last.
    static PANICS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A counting allocator's readings, from the binary that runs the harness: [`Probe::reset`]
/// returns the bytes allocated now and restarts the peak there; [`Probe::peak`] is the most
/// allocated at once since.
pub struct Probe {
    pub reset: fn() -> usize,
    pub peak: fn() -> usize,
}

#[derive(Default)]
pub struct Tally {
    pub cases: usize,
    pub refused: usize,
    pub accepted: usize,
    pub run_errors: usize,
    pub findings: Vec<String>,
    pub slowest: Duration,
    /// The most memory a case's forward allocated, over its estimate (with a probe).
    pub memory_ratio: f64,
}

/// Runs everything a user can run on an accepted model.
fn exercise(
    model: &IntegerModel,
    what: &str,
    input: &[f32],
    tally: &mut Tally,
    probe: Option<&Probe>,
) {
    if model.validate().is_err() {
        tally.refused += 1;
        return;
    }
    tally.accepted += 1;
    let start = Instant::now();
    let used = std::cell::Cell::new(0usize);
    let measured = |f: &dyn Fn() -> _| {
        let base = probe.map(|p| (p.reset)());
        let out = f();
        if let (Some(p), Some(base)) = (probe, base) {
            used.set(used.get().max((p.peak)().saturating_sub(base)));
        }
        out
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let fast = measured(&|| model.forward(input));
        let reference = measured(&|| model.forward_reference(input));
        let _ = model.forward_int(input);
        let _ = burn_qat::onnx::to_model_proto(model, &Default::default());
        let _ = (model.precision(), model.plan(), model.parameter_bytes());
        let again = format::from_bytes(&format::to_bytes(model)).map(|m| m == *model);
        (fast, reference, again)
    }));
    tally.slowest = tally.slowest.max(start.elapsed());
    // The input is a batch of 2: values take twice their batch-1 estimate, the rest less.
    let batch = (input.len() / model.input_shape().iter().product::<usize>().max(1)).max(1);
    if let (Some(_), Ok(cost)) = (probe, model.cost()) {
        let allowed = cost.memory_bytes.saturating_mul(batch as u64);
        tally.memory_ratio = tally
            .memory_ratio
            .max(used.get() as f64 / cost.memory_bytes.max(1) as f64);
        if used.get() as u64 > allowed {
            tally.findings.push(format!(
                "forward allocated {} bytes at batch {batch}, above its estimate of {} per item: {what}",
                used.get(),
                cost.memory_bytes
            ));
        }
    }
    match result {
        Err(_) => {
            let message = PANICS.with(|p| p.borrow_mut().pop()).unwrap_or_default();
            tally.findings.push(format!("panic: {what} -- {message}"));
        }
        Ok((fast, reference, again)) => {
            match (&fast, &reference) {
                (Ok(f), Ok(r))
                    if f.1 != r.1
                        || f.0
                            .iter()
                            .zip(&r.0)
                            .any(|(a, b)| a.to_bits() != b.to_bits()) =>
                {
                    tally.findings.push(format!("fast != reference: {what}"));
                }
                (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                    tally
                        .findings
                        .push(format!("only one of fast/reference failed ({e}): {what}"));
                }
                (Err(_), Err(_)) => tally.run_errors += 1,
                _ => {}
            }
            if !matches!(again, Ok(true)) {
                tally
                    .findings
                    .push(format!("save/load round trip changed the model: {what}"));
            }
        }
    }
}

pub fn run(cases: usize, seed: u64, probe: Option<&Probe>) -> Tally {
    let model = kitchen_model();
    let json = serde_json::to_value(&model).unwrap();
    let by_field = fields(&json);
    let bytes = format::to_bytes(&model);
    let mut rng = Rng(seed);
    let input: Vec<f32> = (0..2 * 2 * 8 * 8)
        .map(|i| ((i * 37 % 101) as f32 / 25.0) - 2.0)
        .collect();
    // Panics are the findings: their messages go with them instead of into the output. Panics
    // of other threads (other tests running beside this one) go to the usual hook.
    let previous = Arc::new(std::panic::take_hook());
    let forward = previous.clone();
    let me = std::thread::current().id();
    let workers = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = workers.clone();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        if thread.id() == me {
            PANICS.with(|p| p.borrow_mut().push(info.to_string()));
        } else if thread
            .name()
            .is_some_and(|n| n != "main" && !n.contains("rayon") && !n.starts_with("burn-qat-int"))
        {
            forward(info);
        } else {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(info.to_string());
        }
    }));
    let mut tally = Tally::default();
    for (what, case) in extreme_field_cases(&model) {
        tally.cases += 1;
        match case {
            Ok(m) => exercise(&m, &what, &input, &mut tally, probe),
            Err(_) => tally.refused += 1,
        }
    }
    for case in 0..cases {
        tally.cases += 1;
        if case % 2 == 0 && rng.below(64) == 0 {
            let mut m = model.clone();
            let edit = splice_chain(&mut m, &mut rng);
            exercise(
                &m,
                &format!("case {case} {edit}"),
                &input,
                &mut tally,
                probe,
            );
        } else if case % 2 == 0 {
            let mut v = json.clone();
            let edits: Vec<String> = (0..1 + rng.below(3))
                .map(|_| mutate_json(&mut v, &mut rng, &by_field))
                .collect();
            match serde_json::from_value::<IntegerModel>(v) {
                Ok(m) => exercise(
                    &m,
                    &format!("case {case} {edits:?}"),
                    &input,
                    &mut tally,
                    probe,
                ),
                Err(_) => tally.refused += 1,
            }
        } else {
            let mut b = bytes.clone();
            let edits: Vec<String> = (0..1 + rng.below(3))
                .map(|_| mutate_bytes(&mut b, &mut rng))
                .collect();
            match format::from_bytes(&b) {
                Ok(m) => exercise(
                    &m,
                    &format!("case {case} {edits:?}"),
                    &input,
                    &mut tally,
                    probe,
                ),
                Err(_) => tally.refused += 1,
            }
        }
    }
    drop(std::panic::take_hook());
    let previous = Arc::try_unwrap(previous).unwrap_or_else(|_| Box::new(|_| {}));
    std::panic::set_hook(previous);
    let workers = workers.lock().unwrap_or_else(|e| e.into_inner());
    if !workers.is_empty() {
        tally.findings.push(format!(
            "panics on worker threads: {:?}",
            &workers[..workers.len().min(5)]
        ));
    }
    tally
}
