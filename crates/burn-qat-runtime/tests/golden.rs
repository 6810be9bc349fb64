//! Golden files: the integer model file format, pinned byte for byte.
//!
//! `golden/` holds small models in every format version ever written, each `NAME.vN.bqi` with
//! `NAME.vN.json` beside it: an input (`input`, `input_shape`) and the output the model gives
//! on it (`output` as numbers, `output_bits` as the exact `f32` bits, `output_int` the integers
//! when the model ends in integers). The current version's models are built by hand below,
//! covering every [`IntOp`] variant (version 3 files of the same models are kept: version 4
//! only added several inputs and outputs, `multi_io`); the version 1 and 2 files were written by the old writers
//! themselves and their outputs computed by the old runner (see `golden/README.md`).
//!
//! The tests check that (a) writing each current model gives its committed file byte for
//! byte, and its input and output are the committed ones; (b) every committed file of every
//! version loads and, run on its committed input, gives its committed output value for value;
//! (c) a file of a newer version is refused, naming both versions.
//!
//! Regenerating the current version's files is explicit:
//!
//! ```text
//! BURN_QAT_BLESS=1 cargo test -p burn-qat-runtime --test golden -- --test-threads 1
//! ```
//!
//! Bless only files that are new (a new op gets a new model here) or whose model changed in
//! this test. A committed file whose bytes or output change under an unchanged model is a
//! format change: it needs a new `format::VERSION`, the old version's types frozen in
//! `src/format/` with an upgrade, and the old files kept (see the `format` module docs).
//! The files of older versions are never rewritten.

use std::path::{Path, PathBuf};

use burn_qat_runtime::format::{self, FormatError};
use burn_qat_runtime::model::{
    Dim, Grid, IntAdd, IntConv2d, IntLayerNorm, IntLinear, IntMatMul, IntMul, IntNode, IntOp,
    IntSoftmax, IntegerModel, Lut, Output, Window,
};
use burn_qat_runtime::requant::FixedMultiplier;
use serde_json::{Value, json};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden")
}

fn bless() -> bool {
    std::env::var_os("BURN_QAT_BLESS").is_some_and(|v| v == "1")
}

const HOW_TO_BLESS: &str = "if the model in tests/golden.rs changed on purpose, regenerate with \
    `BURN_QAT_BLESS=1 cargo test -p burn-qat-runtime --test golden -- --test-threads 1`; if it did not, the file \
    format changed: that needs a new format::VERSION and an upgrade from the old one (see the \
    format module docs), never a re-blessed file";

/// A deterministic stream of small numbers.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi - lo + 1) as u32) as i32
    }
    fn i8s(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i8> {
        (0..n).map(|_| self.int(lo, hi) as i8).collect()
    }
    fn i32s(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        (0..n).map(|_| self.int(lo, hi)).collect()
    }
    /// Multiples of 1/64 in `[lo, hi]`: exact in `f32` and in JSON.
    fn f32s(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        let steps = ((hi - lo) * 64.0) as i32;
        (0..n)
            .map(|_| lo + self.int(0, steps) as f32 / 64.0)
            .collect()
    }
}

fn grid(scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> Grid {
    Grid {
        scale,
        zero_point,
        qmin,
        qmax,
    }
}

/// 8-bit signed.
fn g8(scale: f32, zero_point: i32) -> Grid {
    grid(scale, zero_point, -128, 127)
}

fn shape(dims: &[usize]) -> Vec<Dim> {
    std::iter::once(Dim::Batch(1))
        .chain(dims.iter().map(|&d| Dim::Fixed(d)))
        .collect()
}

/// Builds a model node by node.
struct Graph(Vec<IntNode>);

impl Graph {
    fn new(input: &[usize]) -> Self {
        Graph(vec![IntNode {
            name: "input".into(),
            op: IntOp::Input,
            inputs: vec![],
            shape: shape(input),
            grid: None,
        }])
    }
    fn add(&mut self, name: &str, op: IntOp, inputs: &[usize], dims: &[usize]) -> usize {
        let grid = match &op {
            IntOp::Input => None,
            IntOp::Quantize(g) => Some(*g),
            IntOp::Conv2d(c) => c.output.grid(),
            IntOp::Linear(l) => l.output.grid(),
            IntOp::Add(a) => Some(a.out),
            IntOp::Mul(m) => Some(m.out),
            IntOp::MatMul(m) => Some(m.out),
            IntOp::Softmax(s) => Some(s.output),
            IntOp::LayerNorm(l) => Some(l.output),
            IntOp::Lut(t) | IntOp::ChannelLut { lut: t, .. } => Some(t.output),
            _ => self.0[inputs[0]].grid,
        };
        self.0.push(IntNode {
            name: name.into(),
            op,
            inputs: inputs.to_vec(),
            shape: shape(dims),
            grid,
        });
        self.0.len() - 1
    }
    fn model(self) -> IntegerModel {
        let output = self.0.len() - 1;
        IntegerModel::new(self.0, output)
    }
}

/// `s_in * s_w[c] / s_out` per channel, or the float scales `s_in * s_w[c]`.
fn quantized(input: Grid, ws: &[f32], out: Grid, lo: i32, hi: i32) -> Output {
    Output::Quantized {
        grid: out,
        requant: ws
            .iter()
            .map(|w| FixedMultiplier::new(input.scale as f64 * *w as f64 / out.scale as f64))
            .collect(),
        lo,
        hi,
    }
}

fn float(input: Grid, ws: &[f32], lo: f32, hi: f32) -> Output {
    Output::Float {
        scale: ws.iter().map(|w| input.scale * w).collect(),
        lo,
        hi,
    }
}

#[allow(clippy::too_many_arguments)]
fn conv(
    r: &mut Lcg,
    (cin, cout, groups): (usize, usize, usize),
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: [usize; 4],
    weight_bits: u32,
    input: Grid,
    output: impl FnOnce(&[f32]) -> Output,
) -> IntOp {
    let wmax = (1 << (weight_bits - 1)) - 1;
    let weight_scale: Vec<f32> = (0..cout).map(|c| 0.02 + 0.005 * c as f32).collect();
    IntOp::Conv2d(IntConv2d {
        in_channels: cin,
        out_channels: cout,
        groups,
        kernel,
        stride,
        dilation,
        padding,
        weight: r.i8s(cout * cin / groups * kernel[0] * kernel[1], -wmax, wmax),
        weight_bits,
        bias: r.i32s(cout, -200, 200),
        output: output(&weight_scale),
        weight_scale,
        input,
    })
}

fn linear(
    r: &mut Lcg,
    (fin, fout): (usize, usize),
    weight_bits: u32,
    input: Grid,
    output: impl FnOnce(&[f32]) -> Output,
) -> IntOp {
    let wmax = (1 << (weight_bits - 1)) - 1;
    let weight_scale: Vec<f32> = (0..fout).map(|c| 0.03 + 0.01 * c as f32).collect();
    IntOp::Linear(IntLinear {
        in_features: fin,
        out_features: fout,
        weight: r.i8s(fin * fout, -wmax, wmax),
        weight_bits,
        bias: r.i32s(fout, -300, 300),
        output: output(&weight_scale),
        weight_scale,
        input,
    })
}

/// A 256-entry table computing `f` from `input` to `output`.
fn table(function: &str, input: Grid, output: Grid, f: impl Fn(f32) -> f32) -> Lut {
    Lut {
        function: function.into(),
        input,
        output,
        table: (-128..=127)
            .map(|q: i32| {
                output.quantize(f(input.dequantize(q.clamp(input.qmin, input.qmax)))) as i8
            })
            .collect(),
    }
}

fn fixed_add(a: Grid, b: Grid, out: Grid, sign: f64) -> IntAdd {
    let shift = 40;
    let m = |s: f32| (s as f64 / out.scale as f64 * (1u64 << shift) as f64).round() as i64;
    IntAdd {
        a,
        b,
        out,
        ma: m(a.scale),
        mb: (sign * m(b.scale) as f64) as i64,
        shift,
        lo: out.qmin,
        hi: out.qmax,
    }
}

/// Convolutions: strided and padded with a ReLU clamp, depthwise with 4-bit weights onto a
/// narrow unsigned grid (4-bit `[0, 15]` stored as `[-128, -113]`), pointwise dilated to a
/// bounded float output.
fn conv_model() -> (IntegerModel, Vec<usize>) {
    let mut r = Lcg(11);
    let gi = g8(0.05, -3);
    let g1 = g8(0.1, -20);
    let g4 = grid(0.2, -128, -128, -113);
    let mut g = Graph::new(&[3, 6, 6]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[3, 6, 6]);
    let op = conv(
        &mut r,
        (3, 4, 1),
        [3, 3],
        [2, 2],
        [1, 1],
        [1, 1, 1, 1],
        8,
        gi,
        |ws| quantized(gi, ws, g1, g1.zero_point, 127),
    );
    let c1 = g.add("conv", op, &[q], &[4, 3, 3]);
    let op = conv(
        &mut r,
        (4, 4, 4),
        [3, 3],
        [1, 1],
        [1, 1],
        [1, 1, 1, 1],
        4,
        g1,
        |ws| quantized(g1, ws, g4, -128, -113),
    );
    let dw = g.add("depthwise", op, &[c1], &[4, 3, 3]);
    let op = conv(
        &mut r,
        (4, 2, 1),
        [2, 2],
        [1, 1],
        [2, 2],
        [1, 1, 1, 1],
        8,
        g4,
        |ws| float(g4, ws, -2.0, 2.5),
    );
    g.add("head", op, &[dw], &[2, 3, 3]);
    (g.model(), vec![3, 6, 6])
}

/// A 1-D convolution (dilated, padded), a linear layer on the last axis of a 3-D tensor with
/// 2-bit weights onto a narrow signed 4-bit grid, a linear layer with a float output.
fn linear_model() -> (IntegerModel, Vec<usize>) {
    let mut r = Lcg(12);
    let gi = g8(0.04, 7);
    let g1 = g8(0.09, -128);
    let g2 = grid(0.3, 0, -8, 7);
    let mut g = Graph::new(&[3, 8]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[3, 8]);
    let op = conv(
        &mut r,
        (3, 4, 1),
        [1, 3],
        [1, 1],
        [1, 2],
        [0, 0, 2, 2],
        8,
        gi,
        |ws| quantized(gi, ws, g1, -128, 127),
    );
    let c = g.add("conv1d", op, &[q], &[4, 8]);
    let op = linear(&mut r, (8, 5), 2, g1, |ws| quantized(g1, ws, g2, -8, 7));
    let l1 = g.add("fc1", op, &[c], &[4, 5]);
    let op = linear(&mut r, (5, 3), 8, g2, |ws| {
        float(g2, ws, f32::NEG_INFINITY, f32::INFINITY)
    });
    g.add("fc2", op, &[l1], &[4, 3]);
    (g.model(), vec![3, 8])
}

/// Tables and arithmetic: a lookup table, a mean, add / subtract / multiply broadcasting a
/// `[2, 3, 1]` tensor over `[2, 3, 4]`, per-channel tables, a sum.
fn elementwise_model() -> (IntegerModel, Vec<usize>) {
    let gi = g8(0.04, 5);
    let gt = grid(1.0 / 127.0, 0, -127, 127);
    let gr = g8(0.005, 0);
    let ga = g8(0.02, -10);
    let gs = g8(0.015, 3);
    let gm = g8(0.001, 0);
    let gc = g8(0.002, -50);
    let gsum = g8(0.01, 0);
    let mut g = Graph::new(&[2, 3, 4]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[2, 3, 4]);
    let t = g.add(
        "tanh",
        IntOp::Lut(table("Tanh", gi, gt, f32::tanh)),
        &[q],
        &[2, 3, 4],
    );
    let mean = IntOp::Reduce {
        axis: 3,
        mean: true,
        input: gt,
    };
    let m = g.add_with_grid("mean", mean, &[t], &[2, 3, 1], gr);
    let a = g.add(
        "add",
        IntOp::Add(fixed_add(gt, gr, ga, 1.0)),
        &[t, m],
        &[2, 3, 4],
    );
    let s = g.add(
        "sub",
        IntOp::Add(fixed_add(ga, gr, gs, -1.0)),
        &[a, m],
        &[2, 3, 4],
    );
    let mul = IntMul {
        a: gs,
        b: gr,
        out: gm,
        multiplier: FixedMultiplier::new(gs.scale as f64 * gr.scale as f64 / gm.scale as f64),
        lo: gm.qmin,
        hi: gm.qmax,
    };
    let p = g.add("mul", IntOp::Mul(mul), &[s, m], &[2, 3, 4]);
    let mut tables = table("Affine", gm, gc, |x| x * 0.5 + 0.01).table;
    tables.extend(table("Affine", gm, gc, |x| -x - 0.02).table);
    let lut = Lut {
        function: "Affine".into(),
        input: gm,
        output: gc,
        table: tables,
    };
    let cl = g.add(
        "per_channel",
        IntOp::ChannelLut { lut, channels: 2 },
        &[p],
        &[2, 3, 4],
    );
    let sum = IntOp::Reduce {
        axis: 2,
        mean: false,
        input: gc,
    };
    g.add_with_grid("sum", sum, &[cl], &[2, 1, 4], gsum);
    (g.model(), vec![2, 3, 4])
}

/// Pooling: max pooling in ceil mode (end padding) on an unsigned grid (`[0, 255]` stored as
/// int8, zero point -128), average pooling with padding not counted, onto another grid, and
/// adaptive average pooling with uneven windows.
fn pool_model() -> (IntegerModel, Vec<usize>) {
    let gu = g8(0.05, -128);
    let ga = g8(0.04, -100);
    let gd = g8(0.03, -90);
    let mut g = Graph::new(&[2, 7, 7]);
    let q = g.add("quant", IntOp::Quantize(gu), &[0], &[2, 7, 7]);
    let w = Window {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0, 1, 0, 1],
        dilation: [1, 1],
    };
    let mp = g.add("maxpool_ceil", IntOp::MaxPool(w), &[q], &[2, 4, 4]);
    let avg = IntOp::AvgPool {
        window: Window {
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1, 1, 1],
            dilation: [1, 1],
        },
        count_include_pad: false,
        input: gu,
    };
    let ap = g.add_with_grid("avgpool", avg, &[mp], &[2, 4, 4], ga);
    let ad = IntOp::AdaptiveAvgPool {
        output: [3, 2],
        input: ga,
    };
    g.add_with_grid("adaptive", ad, &[ap], &[2, 3, 2], gd);
    (g.model(), vec![2, 7, 7])
}

/// Bilinear resizing both ways: up with half-pixel centres (to a size that is not a multiple
/// of the input), down with aligned corners, each requantized to a grid of its own.
fn resize_model() -> (IntegerModel, Vec<usize>) {
    let (gi, gu, gd) = (g8(0.05, 3), g8(0.04, -5), g8(0.06, 2));
    let mut g = Graph::new(&[2, 3, 4]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[2, 3, 4]);
    let up = IntOp::Bilinear {
        size: [7, 5],
        align_corners: false,
        input: gi,
    };
    let up = g.add_with_grid("bilinear_up", up, &[q], &[2, 7, 5], gu);
    let down = IntOp::Bilinear {
        size: [2, 3],
        align_corners: true,
        input: gu,
    };
    g.add_with_grid("bilinear_down", down, &[up], &[2, 2, 3], gd);
    (g.model(), vec![2, 3, 4])
}

/// Layout ops: permute, reshape, a table, a concatenation requantizing one of its inputs.
fn layout_model() -> (IntegerModel, Vec<usize>) {
    let gi = g8(0.05, 0);
    let gsig = g8(1.0 / 255.0, -128);
    let mut g = Graph::new(&[4, 3]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[4, 3]);
    let p = g.add(
        "permute",
        IntOp::Permute {
            perm: vec![0, 2, 1],
        },
        &[q],
        &[3, 4],
    );
    let flat = g.add("reshape", IntOp::Reshape, &[p], &[12]);
    let sig = g.add(
        "sigmoid",
        IntOp::Lut(table("Sigmoid", gi, gsig, |x| 1.0 / (1.0 + (-x).exp()))),
        &[flat],
        &[12],
    );
    let cat = IntOp::Concat {
        axis: 1,
        requantize: vec![None, Some(table("Requantize", gsig, gi, |x| x))],
    };
    let c = g.add("concat", cat, &[flat, sig], &[24]);
    let r = g.add("reshape2", IntOp::Reshape, &[c], &[2, 12]);
    g.add(
        "permute2",
        IntOp::Permute {
            perm: vec![0, 2, 1],
        },
        &[r],
        &[12, 2],
    );
    (g.model(), vec![4, 3])
}

/// Select: every other row of an image (a Focus stem's slice), then columns picked out of
/// order and twice.
fn select_model() -> (IntegerModel, Vec<usize>) {
    let gi = g8(0.05, 3);
    let mut g = Graph::new(&[3, 4, 4]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[3, 4, 4]);
    let rows = IntOp::Select {
        axis: 2,
        indices: vec![0, 2],
    };
    let r = g.add("rows", rows, &[q], &[3, 2, 4]);
    let cols = IntOp::Select {
        axis: 3,
        indices: vec![3, 1, 1],
    };
    g.add("cols", cols, &[r], &[3, 2, 3]);
    (g.model(), vec![3, 4, 4])
}

impl Graph {
    /// A node whose op does not name its output grid (pooling, reductions).
    fn add_with_grid(
        &mut self,
        name: &str,
        op: IntOp,
        inputs: &[usize],
        dims: &[usize],
        grid: Grid,
    ) -> usize {
        let node = self.add(name, op, inputs, dims);
        self.0[node].grid = Some(grid);
        node
    }
}

/// Attention-style matrix products on `[n, 2, 3, 4]`: each `3 x 4` matrix times its own
/// transpose (through a permute) onto an unsigned grid with a clamp, then those `[n, 2, 3, 3]`
/// scores times the first head's `[n, 1, 3, 4]` values, broadcast over the head axis.
fn matmul_model() -> (IntegerModel, Vec<usize>) {
    let gi = g8(0.05, 3);
    let (gs, go) = (grid(0.3, -128, -128, 127), g8(4.0, -2));
    let mm = |a: Grid, b: Grid, out: Grid, lo: i32, hi: i32| {
        IntOp::MatMul(IntMatMul {
            a,
            b,
            out,
            multiplier: FixedMultiplier::new(a.scale as f64 * b.scale as f64 / out.scale as f64),
            lo,
            hi,
        })
    };
    let mut g = Graph::new(&[2, 3, 4]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[2, 3, 4]);
    let perm = IntOp::Permute {
        perm: vec![0, 1, 3, 2],
    };
    let t = g.add("transpose", perm, &[q], &[2, 4, 3]);
    let s = g.add("scores", mm(gi, gi, gs, -128, 100), &[q, t], &[2, 3, 3]);
    let head = IntOp::Select {
        axis: 1,
        indices: vec![0],
    };
    let v = g.add("values", head, &[q], &[1, 3, 4]);
    g.add("context", mm(gs, gi, go, -128, 127), &[s, v], &[2, 3, 4]);
    (g.model(), vec![2, 3, 4])
}

/// Softmax along the last axis of `[n, 3, 5]` onto an unsigned 8-bit grid, then along the
/// middle axis (rows of three, every fifth value) of that result onto a narrower one.
fn softmax_model() -> (IntegerModel, Vec<usize>) {
    let gi = g8(0.06, -4);
    let (g1, g2) = (
        grid(1.0 / 255.0, -128, -128, 127),
        grid(1.0 / 15.0, -128, -128, -113),
    );
    let softmax = |axis: usize, input: Grid, output: Grid| {
        IntOp::Softmax(IntSoftmax {
            axis,
            input,
            output,
            table: IntSoftmax::table_for(input.scale),
        })
    };
    let mut g = Graph::new(&[3, 5]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[3, 5]);
    let s = g.add("softmax_last", softmax(2, gi, g1), &[q], &[3, 5]);
    g.add("softmax_middle", softmax(1, g1, g2), &[s], &[3, 5]);
    (g.model(), vec![3, 5])
}

/// Layer normalization over the last axis of `[n, 3, 6]` with a scale and shift onto another
/// grid, then one without a shift (zeros) and a large epsilon onto a 4-bit grid.
fn layer_norm_model() -> (IntegerModel, Vec<usize>) {
    let gi = g8(0.04, 6);
    let (g1, g2) = (g8(0.02, -3), grid(0.3, 0, -8, 7));
    let norm = |input: Grid, output: Grid, gamma: Vec<f32>, beta: Vec<f32>, epsilon: f64| {
        IntOp::LayerNorm(IntLayerNorm {
            input,
            output,
            gamma,
            beta,
            epsilon,
        })
    };
    let mut g = Graph::new(&[3, 6]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[3, 6]);
    let gamma = vec![1.0, 0.5, -0.75, 1.25, 0.9, 1.1];
    let beta = vec![0.1, -0.2, 0.0, 0.3, -0.05, 0.5];
    let a = g.add("ln1", norm(gi, g1, gamma, beta, 1e-5), &[q], &[3, 6]);
    g.add(
        "ln2",
        norm(g1, g2, vec![2.0; 6], vec![0.0; 6], 0.5),
        &[a],
        &[3, 6],
    );
    (g.model(), vec![3, 6])
}

/// A learned position embedding: a `[1, 3, 4]` constant on its own grid added to every item
/// of the quantized `[n, 3, 4]` input.
fn constant_model() -> (IntegerModel, Vec<usize>) {
    let (gi, gc, go) = (g8(0.05, 1), g8(0.01, -7), g8(0.06, 2));
    let mut g = Graph::new(&[3, 4]);
    let q = g.add("quant", IntOp::Quantize(gi), &[0], &[3, 4]);
    g.0.push(IntNode {
        name: "pos".into(),
        op: IntOp::Constant {
            values: Lcg(23).i8s(12, -128, 127),
        },
        inputs: vec![],
        shape: vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(4)],
        grid: Some(gc),
    });
    let c = g.0.len() - 1;
    g.add(
        "add",
        IntOp::Add(fixed_add(gi, gc, go, 1.0)),
        &[q, c],
        &[3, 4],
    );
    (g.model(), vec![3, 4])
}

/// Two inputs and two outputs (format version 4 on): the first input through a linear layer,
/// the second quantized and added to it (a quantized output), and a float head after the add
/// (a float output).
fn multi_io_model() -> IntegerModel {
    let mut r = Lcg(19);
    let (g0, g1) = (g8(0.05, 2), g8(0.03, -4));
    let (gl, ga) = (g8(0.08, 0), g8(0.1, -6));
    let mut g = Graph::new(&[6]);
    g.0.push(IntNode {
        name: "input.1".into(),
        op: IntOp::Input,
        inputs: vec![],
        shape: shape(&[4]),
        grid: None,
    });
    let q0 = g.add("quant0", IntOp::Quantize(g0), &[0], &[6]);
    let q1 = g.add("quant1", IntOp::Quantize(g1), &[1], &[4]);
    let op = linear(&mut r, (6, 4), 8, g0, |ws| quantized(g0, ws, gl, -128, 127));
    let l = g.add("fc", op, &[q0], &[4]);
    let a = g.add(
        "add",
        IntOp::Add(fixed_add(gl, g1, ga, 1.0)),
        &[l, q1],
        &[4],
    );
    let op = linear(&mut r, (4, 2), 8, ga, |ws| {
        float(ga, ws, f32::NEG_INFINITY, f32::INFINITY)
    });
    let h = g.add("head", op, &[a], &[2]);
    IntegerModel::with_outputs(g.0, vec![a, h])
}

/// Inputs and outputs of the two-input model on a batch of three.
fn multi_io_expected(model: &IntegerModel) -> Value {
    let mut r = Lcg(200);
    let inputs = [r.f32s(3 * 6, -4.0, 4.0), r.f32s(3 * 4, -4.0, 4.0)];
    let outs = model
        .forward_many(&[&inputs[0], &inputs[1]])
        .expect("the golden model runs");
    json!({
        "inputs": inputs,
        "outputs_bits": outs.iter().map(|(o, _)| o.iter().map(|v| v.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "outputs": outs.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>(),
        "output_shapes": outs.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>(),
    })
}

/// The two-input, two-output model writes its committed file byte for byte, and the committed
/// file loads and gives its committed outputs bit for bit (fast and reference kernels).
#[test]
fn several_inputs_and_outputs_write_and_read_the_committed_bytes() {
    let model = multi_io_model();
    model.validate().unwrap();
    assert_eq!((model.inputs(), model.outputs.clone()), (0..2, vec![5, 6]));
    let bytes = format::to_bytes(&model);
    let name = format!("multi_io.v{}", format::VERSION);
    check_file(&format!("{name}.bqi"), &bytes);
    let json = serde_json::to_string_pretty(&multi_io_expected(&model)).unwrap() + "\n";
    check_file(&format!("{name}.json"), json.as_bytes());
    let loaded = format::load(&dir().join(format!("{name}.bqi"))).unwrap();
    assert_eq!(loaded, model);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{name}.json"))).unwrap())
            .unwrap();
    let inputs: Vec<Vec<f32>> = numbers(&json, "inputs");
    let refs: Vec<&[f32]> = inputs.iter().map(|v| &v[..]).collect();
    let want: Vec<Vec<u32>> = numbers(&json, "outputs_bits");
    for outs in [
        loaded.forward_many(&refs).unwrap(),
        loaded.forward_reference_many(&refs).unwrap(),
    ] {
        let bits: Vec<Vec<u32>> = outs
            .iter()
            .map(|(o, _)| o.iter().map(|v| v.to_bits()).collect())
            .collect();
        assert_eq!(bits, want);
    }
    // The one-output calls refuse it, naming the call to use.
    let err = loaded.forward(&inputs[0]).unwrap_err().to_string();
    assert!(
        err.contains("2 outputs") && err.contains("forward_many"),
        "{err}"
    );
}

/// A version 3 file is one input and one output: it loads as a model of `outputs == [output]`.
#[test]
fn version_3_files_load_with_their_one_output() {
    let built = models();
    for (path, version) in golden_files() {
        if version != 3 {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let model = format::load(&path).unwrap();
        let base = name.split('.').next().unwrap();
        let (_, m, _) = built
            .iter()
            .find(|(n, _, _)| *n == base)
            .expect("a built model");
        assert_eq!(&model, m, "{name}");
        assert_eq!(model.outputs, [model.nodes.len() - 1], "{name}");
    }
}

/// The single-output models: name, model, input shape of one item (each written as the
/// current version; the version 3 files of the same models are kept).
fn models() -> Vec<(&'static str, IntegerModel, Vec<usize>)> {
    let named = [
        ("conv", conv_model()),
        ("linear", linear_model()),
        ("elementwise", elementwise_model()),
        ("pool", pool_model()),
        ("layout", layout_model()),
        ("select", select_model()),
        ("resize", resize_model()),
        ("matmul", matmul_model()),
        ("softmax", softmax_model()),
        ("layernorm", layer_norm_model()),
        ("constant", constant_model()),
    ];
    named.into_iter().map(|(n, (m, s))| (n, m, s)).collect()
}

/// Index of an op's variant: a new [`IntOp`] variant fails to compile here until it has a
/// golden model.
fn variant(op: &IntOp) -> usize {
    match op {
        IntOp::Input => 0,
        IntOp::Quantize(_) => 1,
        IntOp::Conv2d(_) => 2,
        IntOp::Linear(_) => 3,
        IntOp::Add(_) => 4,
        IntOp::Mul(_) => 5,
        IntOp::Concat { .. } => 6,
        IntOp::MaxPool(_) => 7,
        IntOp::AvgPool { .. } => 8,
        IntOp::AdaptiveAvgPool { .. } => 9,
        IntOp::Reduce { .. } => 10,
        IntOp::Lut(_) => 11,
        IntOp::ChannelLut { .. } => 12,
        IntOp::Reshape => 13,
        IntOp::Permute { .. } => 14,
        IntOp::Select { .. } => 15,
        IntOp::Bilinear { .. } => 16,
        IntOp::MatMul(_) => 17,
        IntOp::Softmax(_) => 18,
        IntOp::LayerNorm(_) => 19,
        IntOp::Constant { .. } => 20,
    }
}
const VARIANTS: usize = 21;

/// Input, output and integer output of `model` on a batch of two items.
fn expected(model: &IntegerModel, item: &[usize], seed: u64) -> Value {
    let n: usize = item.iter().product();
    let input = Lcg(seed).f32s(2 * n, -4.0, 4.0);
    let (output, output_shape) = model.forward(&input).expect("the golden model runs");
    let int = model.forward_int(&input).expect("the golden model runs");
    let input_shape: Vec<usize> = std::iter::once(2).chain(item.iter().copied()).collect();
    json!({
        "input": input,
        "input_shape": input_shape,
        "output": output,
        "output_bits": output.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "output_shape": output_shape,
        "output_int": int.map(|(d, _, _)| d),
    })
}

/// Compares `bytes` with the committed file `name`, or writes it when blessing.
fn check_file(name: &str, bytes: &[u8]) {
    let path = dir().join(name);
    if bless() {
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let committed = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("golden file {}: {e}; {HOW_TO_BLESS}", path.display()));
    if committed != bytes {
        let first = committed
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(committed.len().min(bytes.len()));
        panic!(
            "golden file {name} differs from what this build writes ({} bytes committed, {} \
             written, first difference at byte {first}); {HOW_TO_BLESS}",
            committed.len(),
            bytes.len()
        );
    }
}

/// (a) Each model writes its committed file of the current version byte for byte, with its
/// committed input and output; together they hold every op.
#[test]
fn current_version_writes_the_committed_bytes() {
    let mut seen = [false; VARIANTS];
    for (k, (name, model, item)) in models().into_iter().enumerate() {
        model.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in &model.nodes {
            seen[variant(&n.op)] = true;
        }
        let bytes = format::to_bytes(&model);
        assert_eq!(format::from_bytes(&bytes).unwrap(), model, "{name}");
        check_file(&format!("{name}.v{}.bqi", format::VERSION), &bytes);
        let json =
            serde_json::to_string_pretty(&expected(&model, &item, 100 + k as u64)).unwrap() + "\n";
        check_file(
            &format!("{name}.v{}.json", format::VERSION),
            json.as_bytes(),
        );
    }
    assert!(
        seen.iter().all(|s| *s),
        "ops without a golden model: {seen:?}"
    );
}

/// The committed `.bqi` files, with their versions.
fn golden_files() -> Vec<(PathBuf, u32)> {
    let mut files: Vec<(PathBuf, u32)> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bqi"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            (p, version)
        })
        .collect();
    files.sort();
    files
}

fn numbers<T: serde::de::DeserializeOwned>(v: &Value, key: &str) -> T {
    serde_json::from_value(v[key].clone()).unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// (b) Every committed file of every version loads and gives its committed output, bit for
/// bit; the version 3 files give the models above.
#[test]
fn every_version_loads_and_computes_its_output() {
    let files = golden_files();
    for version in format::OLDEST_VERSION..=format::VERSION {
        assert!(
            files.iter().any(|(_, v)| *v == version),
            "no golden file of version {version}"
        );
    }
    let built = models();
    for (path, version) in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let stem = name.strip_suffix(".bqi").unwrap();
        assert!(
            stem.ends_with(&format!(".v{version}")),
            "{name} holds version {version}"
        );
        let model = format::load(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        if name.starts_with("multi_io.") {
            // Several inputs and outputs: its own test.
            continue;
        }
        if *version == format::VERSION {
            let base = stem.split('.').next().unwrap();
            let (_, m, _) = built
                .iter()
                .find(|(n, _, _)| *n == base)
                .expect("a built model");
            assert_eq!(&model, m, "{name}");
        }
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(path.with_extension("json")).unwrap())
                .unwrap();
        let input: Vec<f32> = numbers(&json, "input");
        let (output, shape) = model
            .forward(&input)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bits: Vec<u32> = output.iter().map(|v| v.to_bits()).collect();
        assert_eq!(
            bits,
            numbers::<Vec<u32>>(&json, "output_bits"),
            "{name}: output {output:?}"
        );
        assert_eq!(
            shape,
            numbers::<Vec<usize>>(&json, "output_shape"),
            "{name}"
        );
        let int = model.forward_int(&input).unwrap().map(|(d, _, _)| d);
        let want: Option<Vec<i8>> = numbers(&json, "output_int");
        if want.is_some() {
            assert_eq!(int, want, "{name}");
        }
        // The reference kernels agree.
        let (reference, _) = model.forward_reference(&input).unwrap();
        assert_eq!(
            reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            bits,
            "{name}"
        );
    }
}

/// The version 1 files of both layer orders are there: `residual.v1` uses the first order
/// (clamp, flatten and residual at 4, 5, 6), `avgpool.v1` the second (average pooling at 4).
#[test]
fn version_1_reads_both_layer_orders() {
    for name in ["residual.v1.bqi", "avgpool.v1.bqi", "conv1d.v1.bqi"] {
        let model = format::load(&dir().join(name)).unwrap();
        let kinds: Vec<&str> = model.nodes.iter().map(|n| n.op.kind()).collect();
        match name {
            "residual.v1.bqi" => assert_eq!(
                kinds,
                [
                    "Input", "Quantize", "Conv2d", "Conv2d", "Lut", "Add", "MaxPool", "Lut",
                    "Reshape", "Linear"
                ]
            ),
            "avgpool.v1.bqi" => assert_eq!(
                kinds,
                [
                    "Input", "Quantize", "AvgPool", "AvgPool", "Lut", "Reshape", "Linear"
                ]
            ),
            _ => assert_eq!(kinds, ["Input", "Quantize", "Conv2d", "Reshape", "Linear"]),
        }
    }
}

/// (c) A newer version is refused, naming both versions; version 0 was never written.
#[test]
fn newer_version_is_refused_naming_both() {
    let (_, model, _) = models().remove(0);
    let mut bytes = format::to_bytes(&model);
    let newer = format::VERSION + 1;
    bytes[8..12].copy_from_slice(&newer.to_le_bytes());
    let err = format::from_bytes(&bytes).unwrap_err();
    assert!(
        matches!(err, FormatError::Newer { found, supported } if found == newer && supported == format::VERSION),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("version {newer}"))
            && msg.contains(&format!("version {}", format::VERSION)),
        "{msg}"
    );
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    let err = format::from_bytes(&bytes).unwrap_err();
    assert!(matches!(err, FormatError::Version { found: 0 }), "{err:?}");
    assert!(err.to_string().contains("never written"), "{err}");
}

/// Bytes after the model, with the header's length and checksum fixed to cover them, are
/// refused in every version (a reader that ignored them would accept a file another writer
/// meant differently).
#[test]
fn bytes_after_the_model_are_refused_in_every_version() {
    for (path, version) in golden_files() {
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(format::from_bytes(&bytes).is_ok(), "{}", path.display());
        bytes.extend_from_slice(&[0, 0, 0]);
        let len = (bytes.len() - 24) as u64;
        bytes[12..20].copy_from_slice(&len.to_le_bytes());
        let crc = crc(&bytes[24..]);
        bytes[20..24].copy_from_slice(&crc.to_le_bytes());
        let err = format::from_bytes(&bytes).unwrap_err().to_string();
        // Version 1 is tried in both of its layer orders: the error is the first order's.
        assert!(
            version == 1 || err.contains("3 bytes after the model"),
            "version {version} ({}): {err}",
            path.display()
        );
    }
}

/// Damaged old files are errors, never panics: every truncation, and every single-byte change
/// with its checksum fixed, of each version 1 and 2 file.
#[test]
fn damaged_old_files_are_errors() {
    for (path, version) in golden_files() {
        if version == format::VERSION {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for len in 0..bytes.len() {
            assert!(format::from_bytes(&bytes[..len]).is_err());
        }
        for i in 24..bytes.len() {
            for delta in [1u8, 0x80, 0xFF] {
                let mut b = bytes.clone();
                b[i] = b[i].wrapping_add(delta);
                let crc = crc(&b[24..]);
                b[20..24].copy_from_slice(&crc.to_le_bytes());
                let _ = format::from_bytes(&b);
            }
        }
    }
}

/// Residual blocks nested past the limit are refused before the decoder recurses further.
#[test]
fn deeply_nested_old_residuals_are_refused() {
    // input_shape [4]; one layer: Residual (variant 7) { body: [Residual { body: [...] }] }.
    let mut payload = vec![1, 4, 1];
    for _ in 0..100_000 {
        payload.extend_from_slice(&[7, 1]);
    }
    let mut bytes = b"BQATINT8".to_vec();
    bytes.extend_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    let err = format::from_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("nested deeper than"), "{err}");
}

/// CRC-32 (IEEE), as the file header stores it.
fn crc(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A select outside its axis, along the batch axis or of nothing is refused at validation,
/// naming the entry, the axis and what is allowed.
#[test]
fn bad_selects_are_refused_by_name() {
    let (model, _) = select_model();
    let cases: [(usize, Vec<usize>, &str); 3] = [
        (
            3,
            vec![1, 4],
            "select of entry 4 along axis 3 of [1, 3, 2, 4]: allowed are 0 to 3",
        ),
        (
            0,
            vec![0],
            "select along axis 0 of [1, 3, 2, 4]: allowed are axes 1 to 3",
        ),
        (3, vec![], "select of no entries"),
    ];
    for (axis, indices, want) in cases {
        let mut bad = model.clone();
        bad.nodes[3].op = IntOp::Select { axis, indices };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// A bilinear resize to nothing, of a tensor that is not `[n, c, h, w]`, or reading a grid
/// that is not usable is refused at validation, naming what is wrong.
#[test]
fn bad_bilinear_resizes_are_refused_by_name() {
    let (model, _) = resize_model();
    let up = |size: [usize; 2], input: Grid| IntOp::Bilinear {
        size,
        align_corners: false,
        input,
    };
    let cases = [
        (
            up([0, 5], g8(0.05, 3)),
            "bilinear resizing to [0, 5]: an empty output",
        ),
        (up([7, 5], g8(f32::NAN, 3)), "input"),
    ];
    for (op, want) in cases {
        let mut bad = model.clone();
        bad.nodes[2].op = op;
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    // A rank-3 input (the model's item is [3, 4]: rank 3 with the batch).
    let mut flat = model.clone();
    flat.nodes[2].inputs = vec![1];
    flat.nodes[1].shape = vec![Dim::Batch(1), Dim::Fixed(12)];
    flat.nodes[0].shape = vec![Dim::Batch(1), Dim::Fixed(12)];
    assert!(flat.validate().is_err());
}

/// The resize's integers against the definition written out: the four neighbours' values
/// weighed in `f32` in Burn's order, rounded half to even onto the output grid.
#[test]
fn bilinear_resizes_equal_the_definition() {
    let (model, item) = resize_model();
    let n: usize = item.iter().product();
    let input = Lcg(7).f32s(2 * n, -4.0, 4.0);
    let IntOp::Bilinear { input: gi, .. } = model.nodes[2].op else {
        unreachable!("the resize model's node 2 resizes")
    };
    let gu = model.nodes[2].grid.expect("a grid");
    let up_only = IntegerModel::new(model.nodes[..3].to_vec(), 2);
    let (q, shape, _) = up_only.forward_int(&input).unwrap().expect("integers");
    assert_eq!(shape, vec![2, 2, 7, 5]);
    let xq: Vec<i32> = input.iter().map(|v| gi.quantize(*v)).collect();
    let tap = |o: usize, n_in: usize, n_out: usize| {
        let at = (o as f64 + 0.5) * (n_in as f64 / n_out as f64) - 0.5;
        let low = at.floor().max(0.0) as usize;
        (
            (low).min(n_in - 1),
            (low + 1).min(n_in - 1),
            (at - low as f64).max(0.0) as f32,
        )
    };
    let mut k = 0;
    for plane in xq.chunks(12) {
        for oy in 0..7 {
            let (y0, y1, wy) = tap(oy, 3, 7);
            for ox in 0..5 {
                let (x0, x1, wx) = tap(ox, 4, 5);
                let v = |y: usize, x: usize| gi.dequantize(plane[y * 4 + x]);
                let want = v(y0, x0) * (1.0 - wx) * (1.0 - wy)
                    + v(y0, x1) * wx * (1.0 - wy)
                    + v(y1, x0) * (1.0 - wx) * wy
                    + v(y1, x1) * wx * wy;
                assert_eq!(q[k] as i32, gu.quantize(want), "output {k}");
                k += 1;
            }
        }
    }
    assert_eq!(k, q.len());
}

/// Several inputs and outputs are checked as any model: inputs only at the start, one to
/// `MAX_OUTPUTS` outputs that exist; a session's `run_many` gives `forward_many`'s outputs.
#[test]
fn several_inputs_and_outputs_are_validated() {
    let model = multi_io_model();
    let mut late_input = model.clone();
    let input = late_input.nodes.remove(1);
    late_input.nodes.push(input);
    let err = late_input.validate().unwrap_err().to_string();
    assert!(
        err.contains("reads node") || err.contains("an input after other nodes"),
        "{err}"
    );
    let mut moved = model.clone();
    moved.nodes.swap(1, 2);
    for n in &mut moved.nodes {
        for i in &mut n.inputs {
            *i = match *i {
                1 => 2,
                2 => 1,
                i => i,
            };
        }
    }
    let err = moved.validate().unwrap_err().to_string();
    assert!(err.contains("an input after other nodes"), "{err}");
    let mut none = model.clone();
    none.outputs.clear();
    assert!(
        none.validate()
            .unwrap_err()
            .to_string()
            .contains("0 outputs")
    );
    let mut many = model.clone();
    many.outputs = vec![6; burn_qat_runtime::MAX_OUTPUTS + 1];
    assert!(
        many.validate()
            .unwrap_err()
            .to_string()
            .contains("outputs (a model returns 1 to")
    );
    let mut missing = model.clone();
    missing.outputs = vec![6, 99];
    assert!(
        missing
            .validate()
            .unwrap_err()
            .to_string()
            .contains("output node 99 does not exist")
    );
    let mut r = Lcg(5);
    let (a, b) = (r.f32s(2 * 6, -2.0, 2.0), r.f32s(2 * 4, -2.0, 2.0));
    let want = model.forward_many(&[&a, &b]).unwrap();
    let mut session = model.session();
    let got: Vec<(Vec<f32>, Vec<usize>)> = session
        .run_many(&[&a, &b])
        .unwrap()
        .into_iter()
        .map(|(v, s)| (v.to_vec(), s.to_vec()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        session.plan(2).unwrap().output_shapes(),
        [&[2usize, 4][..], &[2, 2][..]]
    );
}
