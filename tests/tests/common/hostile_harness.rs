//! The mutation harness of the hostile-input tests, shared by `tests/tests/hostile.rs` (debug,
//! in the test suite) and `crates/burn-qat/benches/hostile.rs` (the same cases in release).
//!
//! A real model with every integer op is mutated two ways, with a fixed seed: semantic edits of
//! its fields (every number set to boundary values, list elements deleted, duplicated, swapped,
//! lists emptied) through its serde form, and byte edits of the file payload with a valid
//! checksum. Each accepted model runs `forward`, `forward_reference` (which must agree bit for
//! bit), `forward_int`, the ONNX writer, `precision`, `plan` and a save/load round trip, inside
//! `catch_unwind`.

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
use burn_qat::export::model::IntegerModel;
use burn_qat::graph;
use burn_qat::model::QatConfig;
use serde_json::Value;

/// Every integer op: conv (padding, BatchNorm, ReLU), depthwise conv (ReLU6), add, mul,
/// sigmoid (table), concat, BatchNorm after the concat (per-channel tables), max/avg/adaptive
/// pooling, mean, flatten, linear with GELU, a float head.
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
        let mean = p.mean_dim(3).mean_dim(2).flatten::<2>(1, 3);
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

/// One semantic edit of the model's serde form.
fn mutate_json(v: &mut Value, rng: &mut Rng) -> String {
    let (mut numbers, mut arrays) = (vec![], vec![]);
    leaves(v, &mut vec![], &mut numbers, &mut arrays);
    if rng.below(3) > 0 && !numbers.is_empty() {
        let path = &numbers[rng.below(numbers.len())];
        let n = NUMBERS[rng.below(NUMBERS.len())];
        let slot = at(v, path).expect("path");
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

#[derive(Default)]
pub struct Tally {
    pub cases: usize,
    pub refused: usize,
    pub accepted: usize,
    pub run_errors: usize,
    pub findings: Vec<String>,
    pub slowest: Duration,
}

/// Runs everything a user can run on an accepted model.
fn exercise(model: &IntegerModel, what: &str, input: &[f32], tally: &mut Tally) {
    if model.validate().is_err() {
        tally.refused += 1;
        return;
    }
    tally.accepted += 1;
    let start = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let fast = model.forward(input);
        let reference = model.forward_reference(input);
        let _ = model.forward_int(input);
        let _ = burn_qat::onnx::to_model_proto(model, &Default::default());
        let _ = (model.precision(), model.plan(), model.parameter_bytes());
        let again = format::from_bytes(&format::to_bytes(model)).map(|m| m == *model);
        (fast, reference, again)
    }));
    tally.slowest = tally.slowest.max(start.elapsed());
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

pub fn run(cases: usize, seed: u64) -> Tally {
    let model = kitchen_model();
    let json = serde_json::to_value(&model).unwrap();
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
    for case in 0..cases {
        tally.cases += 1;
        if case % 2 == 0 {
            let mut v = json.clone();
            let edits: Vec<String> = (0..1 + rng.below(3))
                .map(|_| mutate_json(&mut v, &mut rng))
                .collect();
            match serde_json::from_value::<IntegerModel>(v) {
                Ok(m) => exercise(&m, &format!("case {case} {edits:?}"), &input, &mut tally),
                Err(_) => tally.refused += 1,
            }
        } else {
            let mut b = bytes.clone();
            let edits: Vec<String> = (0..1 + rng.below(3))
                .map(|_| mutate_bytes(&mut b, &mut rng))
                .collect();
            match format::from_bytes(&b) {
                Ok(m) => exercise(&m, &format!("case {case} {edits:?}"), &input, &mut tally),
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
