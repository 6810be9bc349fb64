//! Integer kernels of convolutions and linear layers: the fast path (a u8 x i8 -> i32 product
//! on 4-byte words, see `gemm`, in one implementation per instruction set, see [`Isa`], on the
//! caller plus worker threads of `parallel`) and the scalar reference (nested loops) they are tested against. No float arithmetic between
//! quantized input and requantized output, except in a `Float` last layer. Public for
//! benchmarks and tests; [`IntegerModel::forward`](crate::IntegerModel::forward) picks the
//! kernel and checks the shapes first (these functions expect shapes that fit the layer).
//!
//! Every buffer whose size comes from the model (outputs, accumulators, padded images, im2col
//! words) is allocated fallibly: a size the allocator refuses is an [`OutOfMemory`] error, not
//! an abort. How large they get is part of the memory budget of
//! [`IntegerModel::validate`](crate::IntegerModel::validate).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod depthwise;
mod gemm;
mod isa;
#[cfg(target_arch = "aarch64")]
mod neon;
mod parallel;

pub use isa::{
    ISA_VAR, Isa, IsaError, IsaGuard, available, best, env_isa, force_isa, isa, set_isa,
    unavailable,
};
pub use parallel::threads;

use gemm::Bias;
pub(crate) use parallel::for_each_chunk;

use std::ops::Range;
use std::sync::OnceLock;

use crate::model::{IntConv2d, IntLinear, Output, Window, conv_output_len};
use crate::run::Values;

/// A buffer the kernels could not allocate: its size came from the model's shapes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("could not allocate a buffer of {bytes} bytes")]
pub struct OutOfMemory {
    /// The bytes asked for.
    pub bytes: u64,
}

/// `v` resized to `len` values (new ones `value`), its allocation fallible.
fn try_resize<T: Clone>(v: &mut Vec<T>, len: usize, value: T) -> Result<(), OutOfMemory> {
    if len > v.len() {
        v.try_reserve(len - v.len()).map_err(|_| OutOfMemory {
            bytes: (len as u64).saturating_mul(std::mem::size_of::<T>() as u64),
        })?;
    }
    v.resize(len, value);
    Ok(())
}

/// `len` copies of `value`, allocated fallibly.
pub(crate) fn try_filled<T: Clone>(len: usize, value: T) -> Result<Vec<T>, OutOfMemory> {
    let mut v = Vec::new();
    try_resize(&mut v, len, value)?;
    Ok(v)
}

/// The first error of the chunks of a parallel loop.
struct FirstError(std::sync::Mutex<Option<OutOfMemory>>);

impl FirstError {
    fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    fn keep(&self, result: Result<(), OutOfMemory>) {
        if let Err(e) = result {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    }

    fn into_result(self) -> Result<(), OutOfMemory> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Shapes were checked when the model was converted or loaded (`IntLayer::output_shape`).
fn out_size(input: usize, pad: usize, dilation: usize, kernel: usize, stride: usize) -> usize {
    conv_output_len(input, pad, dilation, kernel, stride)
        .expect("shapes checked at conversion or load")
}

/// An element of a layer's output: `i8` on a quantized output's grid, `f32` for a float last
/// layer.
pub(crate) trait OutputValue: Copy + Default + Send + Sync {
    /// Accumulators (bias included) laid out `[.., channels, inner]` (each channel's `inner`
    /// values contiguous, the channels repeating from `first`) to output values in `dst` (same
    /// layout), one multiplier or scale per channel.
    fn rows(acc: &[i32], inner: usize, output: &Output, first: usize, dst: &mut [Self]);
    /// `data` of `shape` as the layer's values.
    fn values(data: Vec<Self>, shape: Vec<usize>, output: &Output) -> Values;
    /// The worker's buffer of this type for one channel over virtual columns.
    fn tmp(s: &mut ConvScratch) -> &mut Vec<Self>;
}

impl OutputValue for i8 {
    /// Requantization with each channel's fixed-point multiplier, clamped on the grid.
    fn rows(acc: &[i32], inner: usize, output: &Output, first: usize, dst: &mut [i8]) {
        let Output::Quantized {
            grid,
            requant,
            lo,
            hi,
        } = output
        else {
            unreachable!("i8 values are written for quantized outputs")
        };
        for (i, (row, dst)) in acc.chunks(inner).zip(dst.chunks_mut(inner)).enumerate() {
            requant[(first + i) % requant.len()].requantize(row, grid.zero_point, *lo, *hi, dst);
        }
    }

    fn tmp(s: &mut ConvScratch) -> &mut Vec<i8> {
        &mut s.tmp_i8
    }

    fn values(data: Vec<i8>, shape: Vec<usize>, output: &Output) -> Values {
        Values::Int {
            data,
            shape,
            grid: output
                .grid()
                .expect("i8 values are written for quantized outputs"),
        }
    }
}

impl OutputValue for f32 {
    /// Each channel scaled by `s_in * s_w`, clamped.
    fn rows(acc: &[i32], inner: usize, output: &Output, first: usize, dst: &mut [f32]) {
        let Output::Float { scale, lo, hi } = output else {
            unreachable!("f32 values are written for float outputs")
        };
        for (i, (row, dst)) in acc.chunks(inner).zip(dst.chunks_mut(inner)).enumerate() {
            let s = scale[(first + i) % scale.len()];
            for (o, a) in dst.iter_mut().zip(row) {
                *o = (*a as f32 * s).clamp(*lo, *hi);
            }
        }
    }

    fn tmp(s: &mut ConvScratch) -> &mut Vec<f32> {
        &mut s.tmp_f32
    }

    fn values(data: Vec<f32>, shape: Vec<usize>, _: &Output) -> Values {
        Values::Float { data, shape }
    }
}

/// The layer's output values from accumulators laid out `[.., channels, inner]`.
fn output_values(
    output: &Output,
    acc: &[i32],
    inner: usize,
    shape: Vec<usize>,
) -> Result<Values, OutOfMemory> {
    fn typed<T: OutputValue>(
        output: &Output,
        acc: &[i32],
        inner: usize,
        shape: Vec<usize>,
    ) -> Result<Values, OutOfMemory> {
        let mut data = try_filled(acc.len(), T::default())?;
        T::rows(acc, inner, output, 0, &mut data);
        Ok(T::values(data, shape, output))
    }
    match output {
        Output::Quantized { .. } => typed::<i8>(output, acc, inner, shape),
        Output::Float { .. } => typed::<f32>(output, acc, inner, shape),
    }
}

/// Rows of `width` values taken from `src` every `src_stride` values, packed into `dst`. A
/// short row is copied as one block of 32 values when that fits (spilling into the next row,
/// which is written right after): no `memcpy` call per row.
fn compact_rows<T: Copy>(src: &[T], src_stride: usize, width: usize, dst: &mut [T]) {
    const BLOCK: usize = 32;
    for (r, at) in (0..dst.len()).step_by(width.max(1)).enumerate() {
        let from = &src[r * src_stride..];
        if width <= BLOCK && at + BLOCK <= dst.len() && from.len() >= BLOCK {
            dst[at..at + BLOCK].copy_from_slice(&from[..BLOCK]);
        } else {
            dst[at..at + width].copy_from_slice(&from[..width]);
        }
    }
}

/// Extra columns per output row up to which virtual columns are used whatever the width
/// (beyond, only while they at most double the row).
const VIRTUAL_EXTRA: usize = 16;

/// Multiply-adds below which a single image or row is not split across threads.
const SPLIT_WORK: usize = 1 << 16;

/// What a node prepares once and keeps in the model's weight cache (not saved).
pub enum Packed {
    /// A convolution's weights.
    Conv(ConvWeights),
    /// A linear layer's weights.
    Linear(LinearWeights),
    /// A two-input op's table of every output ([`crate::ops::pair_table`]).
    Table(Vec<i8>),
}

/// A convolution's weights as words of four `i8` (see `gemm`), with the bias that also
/// removes the input zero point.
pub struct ConvWeights {
    /// Channel words (stride 1): word `(q, ky, kx)` holds input channels `4q..4q + 4` of one
    /// tap, and the product reads the image in place. Otherwise tap words: four consecutive
    /// values of the flattened `(ic, ky, kx)` axis, against an im2col matrix.
    channel_words: bool,
    /// Words per output channel.
    k4: usize,
    /// `[cout, k4]`.
    words: Vec<u32>,
    /// [`gemm::pairs_fit_i16`] of `words`.
    pairs_fit_i16: bool,
    /// `bias - (zp + 128) * sum(w)` per output channel, wrapping: activations enter as
    /// `q + 128`, and padding (the zero point) then contributes nothing.
    bias: Vec<i32>,
    /// A depthwise layer's words for the direct kernel (see `depthwise`).
    depthwise: Option<depthwise::DepthwiseWords>,
}

impl ConvWeights {
    fn new(c: &IntConv2d) -> Self {
        let taps = c.kernel[0] * c.kernel[1];
        let cin_g = c.in_channels / c.groups;
        let per_out = cin_g * taps;
        let channel_words = uses_channel_words(c);
        let k4 = if channel_words {
            cin_g.div_ceil(4) * taps
        } else {
            per_out.div_ceil(4)
        };
        let shift = c.input.zero_point.wrapping_add(128);
        let mut words = Vec::with_capacity(c.out_channels * k4);
        let mut bias = Vec::with_capacity(c.out_channels);
        for (oc, w) in c.weight.chunks_exact(per_out.max(1)).enumerate() {
            for k in 0..k4 {
                let byte = |j: usize| -> u8 {
                    let v = if channel_words {
                        let ic = 4 * (k / taps) + j;
                        if ic < cin_g {
                            w[ic * taps + k % taps]
                        } else {
                            0
                        }
                    } else {
                        w.get(4 * k + j).copied().unwrap_or(0)
                    };
                    v as u8
                };
                words.push(u32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)]));
            }
            let sum = w.iter().fold(0i32, |s, v| s.wrapping_add(*v as i32));
            bias.push(c.bias[oc].wrapping_sub(shift.wrapping_mul(sum)));
        }
        Self {
            channel_words,
            k4,
            pairs_fit_i16: gemm::pairs_fit_i16(&words),
            words,
            bias,
            depthwise: depthwise::DepthwiseWords::new(c),
        }
    }
}

/// Whether a convolution's weights are channel words (see [`ConvWeights`]): read over virtual
/// columns, so only when they add few (`(kw - 1) dw`).
fn uses_channel_words(c: &IntConv2d) -> bool {
    let cin_g = c.in_channels / c.groups.max(1);
    c.stride == [1, 1]
        && c.kernel[1].saturating_sub(1).saturating_mul(c.dilation[1]) <= VIRTUAL_EXTRA
        && (cin_g.is_multiple_of(4) || cin_g >= 16)
}

/// Bytes a layer's kernels allocate besides its output, at batch 1 (sizes saturate at
/// `u64::MAX`), for the memory and work budget of
/// [`IntegerModel::validate`](crate::IntegerModel::validate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Buffers {
    /// Working buffers: one thread's scratch on the fast path (kept between calls and only
    /// grown) and the reference kernel's accumulators.
    pub scratch: u64,
    /// Bytes of those buffers written per image and group (padded images, im2col words): work.
    pub built: u64,
    /// The packed weights kept in the weight cache.
    pub packed: u64,
}

/// The product of `xs`, saturating.
fn product(xs: &[u64]) -> u64 {
    xs.iter().fold(1u64, |p, x| p.saturating_mul(*x))
}

/// The sum of `xs`, saturating.
fn sum(xs: &[u64]) -> u64 {
    xs.iter().fold(0u64, |p, x| p.saturating_add(*x))
}

/// `x` rounded up to a multiple of 16, saturating.
fn up16(x: u64) -> u64 {
    x.div_ceil(16).saturating_mul(16)
}

/// What [`conv2d`], [`conv2d_max_pool`] and [`conv2d_reference`] allocate for `c` on an input
/// of shape `shape` (batch 1) that fits it, besides the output: the buffers of
/// `ConvPlan::channels`, `image_words`, `im2col_words` and `depthwise`, computed as they
/// compute them.
pub(crate) fn conv_buffers(c: &IntConv2d, shape: &[usize]) -> Buffers {
    let u = |v: usize| v as u64;
    let [_, cin, h, w] = nchw(shape).map(u);
    let [kh, kw] = c.kernel.map(u);
    let [sh, sw] = c.stride.map(u);
    let [dh, dw] = c.dilation.map(u);
    let [top, bottom, left, right] = c.padding.map(u);
    let groups = u(c.groups.max(1));
    let cout = u(c.out_channels);
    let cin_g = cin / groups;
    let ph = sum(&[h, top, bottom]);
    let pw = sum(&[w, left, right]);
    let len = |input: u64, pad: u64, d: u64, k: u64, s: u64| {
        let span = product(&[d, k.saturating_sub(1)]).saturating_add(1);
        input
            .saturating_add(pad)
            .checked_sub(span)
            .map_or(0, |v| v / s.max(1) + 1)
    };
    let oh = len(h, top + bottom, dh, kh, sh);
    let ow = len(w, left + right, dw, kw, sw);
    let p = product(&[oh, ow]);
    let pwv = pw.div_ceil(sw.max(1));
    let channel_words = uses_channel_words(c);
    let virtual_columns =
        channel_words || pwv - ow.min(pwv) <= VIRTUAL_EXTRA as u64 || pwv <= ow.saturating_mul(2);
    let lanes = if virtual_columns {
        product(&[oh, pwv])
    } else {
        p
    };
    let stride = up16(lanes);
    let taps = product(&[kh, kw]);
    // `ConvPlan::channels`: accumulators of every channel, the compacted rows (f32 at most).
    let acc = product(&[cout, stride, 4]);
    let tmp = product(&[oh, pwv, 4]);
    let (words, k4) = if channel_words {
        // `image_words`: the padded group as channel words, their offsets, a zero row.
        let quads = cin_g.div_ceil(4);
        let plane = product(&[ph, pw]);
        let last = sum(&[
            product(&[quads.saturating_sub(1), plane]),
            product(&[kh.saturating_sub(1), dh, pw]),
            product(&[kw.saturating_sub(1), dw]),
        ]);
        let b = product(&[quads, plane]).max(last.saturating_add(up16(product(&[oh, pw]))));
        let words = sum(&[product(&[b, 4]), product(&[quads, taps, 8]), w]);
        (words, product(&[quads, taps]))
    } else {
        // `im2col_words`: the padded group split into stride phases, tap words, their
        // offsets and starts, the gathered rows.
        let phv = ph.div_ceil(sh.max(1));
        let channel_len = product(&[sh.min(ph), sw.min(pw), phv, pwv]);
        let padded = sum(&[
            product(&[cin_g, channel_len]),
            product(&[kw.saturating_sub(1), dw]) / sw.max(1),
            1,
        ]);
        let k4 = product(&[cin_g, taps]).div_ceil(4);
        let words = sum(&[
            padded,
            product(&[sw.min(pw), 24]),
            lanes.max(product(&[5, p])),
            product(&[k4, stride, 4]),
            product(&[k4, 5 * 8]),
        ]);
        (words, k4)
    };
    // The direct depthwise kernel: one padded channel and its accumulators.
    let depthwise = if c.is_depthwise() {
        sum(&[
            product(&[ph, pw]),
            u(depthwise::slack(c)),
            product(&[p.max(1), 4]),
        ])
    } else {
        0
    };
    // Max pooling fused after it: the unpooled channels and a row.
    let unpooled = sum(&[product(&[cout, p]), ow]);
    let reference = product(&[cout, p, 4]);
    let built = if c.is_depthwise() {
        // Either path: every channel padded, or every group's words.
        product(&[groups, words]).max(product(&[cout, depthwise]))
    } else {
        product(&[groups, words])
    };
    Buffers {
        scratch: sum(&[acc, tmp, words, depthwise, unpooled, reference]),
        built,
        packed: sum(&[
            product(&[cout, k4, 4]),
            product(&[cout, 4]),
            if c.is_depthwise() {
                product(&[cout, kh, kw.div_ceil(4), 4])
            } else {
                0
            },
        ]),
    }
}

/// What [`linear`] and [`linear_reference`] allocate for `l` on `rows` rows (batch 1),
/// besides the output: the input as words, the accumulators (rows of 16 lanes) and the
/// reference's accumulators; its packed weights.
pub(crate) fn linear_buffers(l: &IntLinear, rows: usize) -> Buffers {
    let (rows, inp, out) = (rows as u64, l.in_features as u64, l.out_features as u64);
    let k4 = inp.div_ceil(4);
    let stride = up16(out);
    let a = product(&[product(&[rows, inp]).div_ceil(4).saturating_add(k4), 4]);
    Buffers {
        scratch: sum(&[a, product(&[rows, stride, 4]), product(&[rows, out, 4])]),
        built: a,
        packed: sum(&[
            product(&[k4, stride, 4]),
            product(&[k4, 8]),
            product(&[stride, 4]),
        ]),
    }
}

/// `[n, c, h, w]`, with `[n, c, length]` read as `h = 1`.
fn nchw(shape: &[usize]) -> [usize; 4] {
    if shape.len() == 3 {
        [shape[0], shape[1], 1, shape[2]]
    } else {
        [shape[0], shape[1], shape[2], shape[3]]
    }
}

fn out_shape(input: &[usize], cout: usize, oh: usize, ow: usize) -> Vec<usize> {
    if input.len() == 3 {
        vec![input[0], cout, ow]
    } else {
        vec![input[0], cout, oh, ow]
    }
}

/// Convolution, fast path. Per image and group, the `[cout_g, k]` weight words times the image
/// as words (see `gemm`): with stride 1 the padded image itself, four channels interleaved per
/// word, read at one offset per kernel tap; otherwise tap words, each tap a slice of the
/// padded image split into stride phases (both over "virtual" output columns spanning the
/// padded width, the extra ones dropped); depthwise layers on the direct kernel (see
/// `depthwise`). The result is
/// `[cout, oh * ow]`, already NCHW, each output channel requantized as one row with one
/// multiplier. Images run in parallel; a single large image splits its output channels.
pub fn conv2d(
    c: &IntConv2d,
    cache: &OnceLock<Packed>,
    x: &[i8],
    shape: &[usize],
) -> Result<Values, OutOfMemory> {
    fn typed<T: OutputValue>(
        c: &IntConv2d,
        cache: &OnceLock<Packed>,
        x: &[i8],
        shape: &[usize],
    ) -> Result<Values, OutOfMemory> {
        let mut data = Vec::new();
        conv2d_into::<T>(c, cache, x, shape, &mut data)?;
        let plan = ConvPlan::new(c, shape);
        Ok(T::values(
            data,
            out_shape(shape, c.out_channels, plan.oh, plan.ow),
            &c.output,
        ))
    }
    match c.output {
        Output::Quantized { .. } => typed::<i8>(c, cache, x, shape),
        Output::Float { .. } => typed::<f32>(c, cache, x, shape),
    }
}

/// [`conv2d`] into `out` (resized; `i8` for a quantized output, `f32` for a float one): no
/// allocation once `out` and the workers' buffers have room.
pub(crate) fn conv2d_into<T: OutputValue>(
    c: &IntConv2d,
    cache: &OnceLock<Packed>,
    x: &[i8],
    shape: &[usize],
    out: &mut Vec<T>,
) -> Result<(), OutOfMemory> {
    let plan = ConvPlan::new(c, shape);
    try_resize(out, shape[0] * c.out_channels * plan.p, T::default())?;
    plan.run(c, cache, x, out, |acc, channel, dst| {
        T::rows(acc, acc.len(), &c.output, channel, dst)
    })
}

/// A convolution with a quantized output followed by max pooling without dilation or padding
/// but ceil mode's at the end (a pooling window `w` for which `ops::row_wise` holds, whose
/// input is this convolution alone), fused: each chunk of output
/// channels of an image is pooled while it is still in cache, and only the pooled tensor is
/// written. Equal to [`conv2d`] then [`crate::ops::max_pool`]: the same requantized values,
/// pooled by the same function.
pub fn conv2d_max_pool(
    c: &IntConv2d,
    cache: &OnceLock<Packed>,
    x: &[i8],
    shape: &[usize],
    w: &Window,
) -> Result<Values, OutOfMemory> {
    let Output::Quantized { grid, .. } = &c.output else {
        unreachable!("fused only for quantized outputs")
    };
    let plan = ConvPlan::new(c, shape);
    let conv_shape = out_shape(shape, c.out_channels, plan.oh, plan.ow);
    let pooled_shape =
        crate::ops::pool_shape(w, &conv_shape).expect("shapes checked by the runner");
    let mut data = Vec::new();
    conv2d_max_pool_into(c, cache, x, shape, w, &mut data)?;
    Ok(Values::Int {
        data,
        shape: pooled_shape,
        grid: *grid,
    })
}

/// [`conv2d_max_pool`] into `out` (resized): no allocation once `out` and the workers'
/// buffers have room.
pub(crate) fn conv2d_max_pool_into(
    c: &IntConv2d,
    cache: &OnceLock<Packed>,
    x: &[i8],
    shape: &[usize],
    w: &Window,
    out: &mut Vec<i8>,
) -> Result<(), OutOfMemory> {
    let plan = ConvPlan::new(c, shape);
    let (poh, pow) =
        crate::ops::pool_hw(w, plan.oh, plan.ow).expect("shapes checked by the runner");
    try_resize(out, plan.n * c.out_channels * poh * pow, 0i8)?;
    let dims = [plan.oh, plan.ow, poh, pow];
    plan.chunks(
        c,
        cache,
        x,
        out,
        poh * pow,
        |weights, image, channels, dst, s| {
            let mut unpooled = std::mem::take(&mut s.unpooled);
            let mut rows_max = std::mem::take(&mut s.rows_max);
            let result = try_resize(&mut unpooled, channels.len() * plan.p, 0)
                .and_then(|_| try_resize(&mut rows_max, plan.ow, 0))
                .and_then(|_| {
                    plan.channels(
                        c,
                        weights,
                        image,
                        channels,
                        &mut unpooled,
                        s,
                        &|acc, channel, dst| i8::rows(acc, acc.len(), &c.output, channel, dst),
                    )
                });
            if result.is_ok() {
                crate::ops::max_pool_planes(w, &unpooled, dims, &mut rows_max, dst);
            }
            (s.unpooled, s.rows_max) = (unpooled, rows_max);
            result
        },
    )
}

/// The geometry of one convolution call.
struct ConvPlan {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    ph: usize,
    pw: usize,
    /// Virtual output columns per row: `ceil(pw / sw)` (outputs `ow..pwv` are computed and
    /// dropped, so that each tap reads contiguous memory).
    pwv: usize,
    /// Whether the product runs over the virtual columns (they add at most `VIRTUAL_EXTRA`
    /// per row or double it at most; otherwise tap rows are gathered over the real columns).
    virtual_columns: bool,
    oh: usize,
    ow: usize,
    cin_g: usize,
    cout_g: usize,
    p: usize,
}

thread_local! {
    /// This thread's kernel buffers, kept between calls: a layer's buffers are allocated on
    /// its first call, and [`equalize_scratch`] gives every thread the largest.
    static SCRATCH: std::cell::RefCell<ConvScratch> = Default::default();
}

/// Gives every kernel thread (the pool's workers and the caller) buffers as large as the
/// largest any of them holds. Work is split between threads differently from call to call, so
/// after one call at a shape and this, no later call at that shape allocates.
pub(crate) fn equalize_scratch() {
    let most = std::sync::Mutex::new([0usize; SCRATCH_BUFFERS]);
    parallel::on_every_thread(&|| {
        let caps = SCRATCH.with_borrow(ConvScratch::capacities);
        let mut most = most.lock().unwrap_or_else(|e| e.into_inner());
        for (m, c) in most.iter_mut().zip(caps) {
            *m = (*m).max(c);
        }
    });
    let most = most.into_inner().unwrap_or_else(|e| e.into_inner());
    parallel::on_every_thread(&|| SCRATCH.with_borrow_mut(|s| s.reserve(most)));
}

/// How many buffers a [`ConvScratch`] holds.
const SCRATCH_BUFFERS: usize = 13;

/// One worker's buffers, kept between calls (see [`equalize_scratch`]).
#[derive(Default)]
pub(crate) struct ConvScratch {
    /// Where each tap's row starts (`im2col_words`).
    starts: Vec<usize>,
    /// Per column phase: first column, where it lands, how many (`im2col_words`).
    phases: Vec<(usize, usize, usize)>,
    /// One channel over virtual columns, before dropping the extra ones.
    tmp_i8: Vec<i8>,
    /// The same for float outputs.
    tmp_f32: Vec<f32>,
    /// Rows of a linear layer's input as `u8` words.
    words: Vec<u32>,
    acc: Vec<i32>,
    /// A chunk's convolution output before pooling (`conv2d_max_pool`).
    unpooled: Vec<i8>,
    /// A pooled row's column maxima.
    rows_max: Vec<i8>,
    /// A depthwise channel padded, as `int8 + 128`.
    unsigned: Vec<u8>,
    b: Vec<u32>,
    b_off: Vec<usize>,
    padded: Vec<i8>,
    cols: Vec<i8>,
}

impl ConvScratch {
    fn capacities(&self) -> [usize; SCRATCH_BUFFERS] {
        [
            self.starts.capacity(),
            self.phases.capacity(),
            self.tmp_i8.capacity(),
            self.tmp_f32.capacity(),
            self.words.capacity(),
            self.acc.capacity(),
            self.unpooled.capacity(),
            self.rows_max.capacity(),
            self.unsigned.capacity(),
            self.b.capacity(),
            self.b_off.capacity(),
            self.padded.capacity(),
            self.cols.capacity(),
        ]
    }

    /// Room for `caps` values in each buffer (as [`capacities`](Self::capacities) lists them);
    /// a buffer the allocator refuses stays as it is (the kernel reports it when it needs it).
    fn reserve(&mut self, caps: [usize; SCRATCH_BUFFERS]) {
        fn room<T>(v: &mut Vec<T>, cap: usize) {
            // Exact: amortized growth would hand the next thread more than the largest, and
            // each evening-out would double the buffers.
            if v.capacity() < cap {
                let _ = v.try_reserve_exact(cap - v.len());
            }
        }
        room(&mut self.starts, caps[0]);
        room(&mut self.phases, caps[1]);
        room(&mut self.tmp_i8, caps[2]);
        room(&mut self.tmp_f32, caps[3]);
        room(&mut self.words, caps[4]);
        room(&mut self.acc, caps[5]);
        room(&mut self.unpooled, caps[6]);
        room(&mut self.rows_max, caps[7]);
        room(&mut self.unsigned, caps[8]);
        room(&mut self.b, caps[9]);
        room(&mut self.b_off, caps[10]);
        room(&mut self.padded, caps[11]);
        room(&mut self.cols, caps[12]);
    }
}

impl ConvPlan {
    fn new(c: &IntConv2d, shape: &[usize]) -> Self {
        let [n, cin, h, w] = nchw(shape);
        let [kh, kw] = c.kernel;
        let [top, bottom, left, right] = c.padding;
        let oh = out_size(h, top + bottom, c.dilation[0], kh, c.stride[0]);
        let ow = out_size(w, left + right, c.dilation[1], kw, c.stride[1]);
        Self {
            n,
            cin,
            h,
            w,
            ph: h + top + bottom,
            pw: w + left + right,
            pwv: (w + left + right).div_ceil(c.stride[1]),
            virtual_columns: {
                let pwv = (w + left + right).div_ceil(c.stride[1]);
                pwv - ow.min(pwv) <= VIRTUAL_EXTRA || pwv <= 2 * ow
            },
            oh,
            ow,
            cin_g: cin / c.groups,
            cout_g: c.out_channels / c.groups,
            p: oh * ow,
        }
    }

    /// Runs every image, handing each output channel's accumulators (bias included), the
    /// channel and its place in `out` to `write`.
    fn run<T: OutputValue>(
        &self,
        c: &IntConv2d,
        cache: &OnceLock<Packed>,
        x: &[i8],
        out: &mut [T],
        write: impl Fn(&[i32], usize, &mut [T]) + Sync,
    ) -> Result<(), OutOfMemory> {
        self.chunks(
            c,
            cache,
            x,
            out,
            self.p,
            |weights, image, channels, dst, s| {
                self.channels(c, weights, image, channels, dst, s, &write)
            },
        )
    }

    /// Splits the output into chunks of channels of one image (`per_channel` values of `out`
    /// per channel) and runs `body(weights, image, channels, chunk, scratch)` on each, in
    /// parallel: a batch by images, a single large image by channels. The first buffer a
    /// chunk could not allocate is the error.
    fn chunks<T: Send>(
        &self,
        c: &IntConv2d,
        cache: &OnceLock<Packed>,
        x: &[i8],
        out: &mut [T],
        per_channel: usize,
        body: impl Fn(
            &ConvWeights,
            &[i8],
            Range<usize>,
            &mut [T],
            &mut ConvScratch,
        ) -> Result<(), OutOfMemory>
        + Sync,
    ) -> Result<(), OutOfMemory> {
        let per_image = c.out_channels * self.p;
        if per_image == 0 || self.n == 0 || per_channel == 0 {
            return Ok(());
        }
        let packed = cache.get_or_init(|| Packed::Conv(ConvWeights::new(c)));
        let Packed::Conv(weights) = packed else {
            unreachable!("a convolution keeps its weights as Packed::Conv")
        };
        let image_len = self.cin * self.h * self.w;
        let work = per_image * weights.k4 * 4;
        let threads = threads();
        let rows = if self.n == 1 && threads > 1 && work >= SPLIT_WORK {
            c.out_channels
                .div_ceil(threads)
                .next_multiple_of(gemm::MR)
                .min(c.out_channels)
        } else {
            c.out_channels
        };
        let chunks_per_image = c.out_channels.div_ceil(rows);
        // Chunks of `rows` channels never straddle images: either one chunk per image or one
        // image.
        let failed = FirstError::new();
        for_each_chunk(out, rows * per_channel, |i, dst, _: &mut ()| {
            let (img, part) = (i / chunks_per_image, i % chunks_per_image);
            let first = part * rows;
            let channels = first..(first + rows).min(c.out_channels);
            let image = &x[img * image_len..(img + 1) * image_len];
            failed.keep(SCRATCH.with_borrow_mut(|s| body(weights, image, channels, dst, s)));
        });
        failed.into_result()
    }

    /// Output channels `channels` of one image into `dst` (`[channels, p]`), through
    /// `write`.
    #[allow(clippy::too_many_arguments)]
    fn channels<T: OutputValue>(
        &self,
        c: &IntConv2d,
        weights: &ConvWeights,
        image: &[i8],
        channels: std::ops::Range<usize>,
        dst: &mut [T],
        s: &mut ConvScratch,
        write: &impl Fn(&[i32], usize, &mut [T]),
    ) -> Result<(), OutOfMemory> {
        if let Some(dw) = weights.depthwise.as_ref() {
            return self.depthwise(c, weights, dw, image, channels, dst, s, write);
        }
        // `[channels, stride]` (over virtual columns, see `virtual_columns`), every row written
        // whole by the product: the buffer only grows.
        let virtual_columns = weights.channel_words || self.virtual_columns;
        let lanes = if virtual_columns {
            self.oh * self.pwv
        } else {
            self.p
        };
        let stride = lanes.next_multiple_of(16);
        let len = channels.len() * stride;
        if s.acc.len() < len {
            try_resize(&mut s.acc, len, 0)?;
        }
        let first_group = channels.start / self.cout_g.max(1);
        for g in first_group..c.groups {
            let start = (g * self.cout_g).max(channels.start);
            let end = ((g + 1) * self.cout_g).min(channels.end);
            if start >= end {
                break;
            }
            if weights.channel_words {
                self.image_words(c, image, g, s)?;
            } else {
                self.im2col_words(c, image, g, s)?;
            }
            let words = gemm::Words {
                a: &weights.words,
                a_row: weights.k4,
                b: &s.b,
                b_off: &s.b_off,
                a_signed: true,
                pairs_fit_i16: weights.pairs_fit_i16,
                bias: Bias::Rows(&weights.bias),
            };
            let at = (start - channels.start) * stride;
            gemm::product(&words, start..end, 0..lanes, &mut s.acc[at..], stride);
        }
        let (p, ow, pwv) = (self.p, self.ow, self.pwv);
        let virtual_columns = virtual_columns && pwv != ow;
        let mut tmp = std::mem::take(T::tmp(s));
        for (i, dst) in dst.chunks_exact_mut(p.max(1)).enumerate() {
            let acc = &s.acc[i * stride..];
            if !virtual_columns {
                write(&acc[..p], channels.start + i, dst);
                continue;
            }
            // Virtual columns: lane `n` is output `(n / pwv, n % pwv)`, kept when
            // `n % pwv < ow`.
            try_resize(&mut tmp, self.oh * pwv, T::default())?;
            write(&acc[..self.oh * pwv], channels.start + i, &mut tmp);
            compact_rows(&tmp, pwv, ow, dst);
        }
        *T::tmp(s) = tmp;
        Ok(())
    }

    /// Output channels `channels` of one image of a depthwise layer, on the direct kernel.
    #[allow(clippy::too_many_arguments)]
    fn depthwise<T>(
        &self,
        c: &IntConv2d,
        weights: &ConvWeights,
        dw: &depthwise::DepthwiseWords,
        image: &[i8],
        channels: Range<usize>,
        dst: &mut [T],
        s: &mut ConvScratch,
        write: &impl Fn(&[i32], usize, &mut [T]),
    ) -> Result<(), OutOfMemory> {
        let [top, _, left, _] = c.padding;
        let (h, w, ph, pw, p) = (self.h, self.w, self.ph, self.pw, self.p);
        let geometry = depthwise::Plane {
            oh: self.oh,
            ow: self.ow,
            pw,
            kh: c.kernel[0],
            stride: c.stride,
            dilation: c.dilation,
        };
        let pad = c.input.zero_point as u8 ^ 0x80;
        let per_channel = c.kernel[0] * dw.groups;
        try_resize(&mut s.acc, p.max(1), 0)?;
        let padded = &mut s.unsigned;
        for (i, dst) in channels.clone().zip(dst.chunks_exact_mut(p.max(1))) {
            // The channel padded with the zero point, as `int8 + 128`.
            padded.clear();
            try_resize(padded, ph * pw + depthwise::slack(c), pad)?;
            let plane = &image[i * h * w..(i + 1) * h * w];
            for (y, row) in plane.chunks_exact(w.max(1)).enumerate() {
                let at = (top + y) * pw + left;
                for (d, v) in padded[at..at + w].iter_mut().zip(row) {
                    *d = *v as u8 ^ 0x80;
                }
            }
            let words = &dw.words[i * per_channel..(i + 1) * per_channel];
            let bias = weights.bias[i];
            depthwise::plane(padded, words, dw.groups, bias, &geometry, &mut s.acc);
            write(&s.acc[..p], i, dst);
        }
        Ok(())
    }

    /// Group `g` of the image, padded with the input zero point, as channel words
    /// `[cin_g / 4, ph, pw]` in `s.b`, with one offset per `(q, ky, kx)` word in `s.b_off`,
    /// read over the virtual output columns `oh * pw`.
    fn image_words(
        &self,
        c: &IntConv2d,
        image: &[i8],
        g: usize,
        s: &mut ConvScratch,
    ) -> Result<(), OutOfMemory> {
        let [kh, kw] = c.kernel;
        let [dh, dw] = c.dilation;
        let [top, _, left, _] = c.padding;
        let (h, w, ph, pw) = (self.h, self.w, self.ph, self.pw);
        let quads = self.cin_g.div_ceil(4);
        let plane = ph * pw;
        let lanes = self.oh * pw;
        s.b_off.clear();
        s.b_off
            .try_reserve(quads * kh * kw)
            .map_err(|_| OutOfMemory {
                bytes: (quads * kh * kw * 8) as u64,
            })?;
        for q in 0..quads {
            for ky in 0..kh {
                for kx in 0..kw {
                    s.b_off.push(q * plane + ky * dh * pw + kx * dw);
                }
            }
        }
        let last = s.b_off.iter().copied().max().unwrap_or(0);
        let pad = (c.input.zero_point as u8 ^ 0x80) as u32 * 0x0101_0101;
        s.b.clear();
        try_resize(
            &mut s.b,
            (quads * plane).max(last + lanes.next_multiple_of(16)),
            pad,
        )?;
        s.padded.clear();
        try_resize(&mut s.padded, w, 0)?;
        let zeros = &s.padded[..];
        for q in 0..quads {
            for y in 0..h {
                let row = |j: usize| -> &[i8] {
                    let ic = 4 * q + j;
                    if ic < self.cin_g {
                        let at = ((g * self.cin_g + ic) * h + y) * w;
                        &image[at..at + w]
                    } else {
                        zeros
                    }
                };
                let at = q * plane + (top + y) * pw + left;
                gemm::interleave4([row(0), row(1), row(2), row(3)], &mut s.b[at..at + w]);
            }
        }
        Ok(())
    }

    /// Group `g`'s im2col matrix (from the image padded with the input zero point) as tap
    /// words `[k4, oh * pwv]` in `s.b`, over virtual columns. The padded image is first split
    /// into `sh * sw` stride phases (`phase[ry][rx][y][x] = padded[y * sh + ry][x * sw + rx]`,
    /// each `ceil(ph / sh) x pwv`), so that at any stride the im2col row of tap `(ic, ky, kx)`
    /// is one contiguous slice of a phase from `(ky dh / sh) * pwv + kx dw / sw` on: each word
    /// row interleaves four slices (the last taps read a few bytes past the last phase: slack).
    fn im2col_words(
        &self,
        c: &IntConv2d,
        image: &[i8],
        g: usize,
        s: &mut ConvScratch,
    ) -> Result<(), OutOfMemory> {
        let [top, _, left, _] = c.padding;
        let (h, w, pwv) = (self.h, self.w, self.pwv);
        let ([kh, kw], [sh, sw], [dh, dw]) = (c.kernel, c.stride, c.dilation);
        let phv = self.ph.div_ceil(sh);
        let phase_len = phv * pwv;
        // Phases that hold any column: a stride beyond the padded size leaves one per row or
        // column (`ry = y` when `y < ph <= sh`).
        let (row_phases, column_phases_n) = (sh.min(self.ph), sw.min(self.pw));
        let channel_len = row_phases * column_phases_n * phase_len;
        let group = &image[g * self.cin_g * h * w..(g + 1) * self.cin_g * h * w];
        let k = self.cin_g * kh * kw;
        let k4 = k.div_ceil(4);
        let lanes = if self.virtual_columns {
            self.oh * pwv
        } else {
            self.p
        };
        let stride = lanes.next_multiple_of(16);
        s.padded.clear();
        try_resize(
            &mut s.padded,
            self.cin_g * channel_len + (kw - 1) * dw / sw + 1,
            c.input.zero_point as i8,
        )?;
        // Per column phase: the first column taken, where it lands, how many (no division in
        // the loops below).
        let mut column_phases = std::mem::take(&mut s.phases);
        column_phases.clear();
        column_phases.extend((0..column_phases_n).map(|rx| {
            let x0 = (rx + sw - left % sw) % sw;
            (x0, (left + x0) / sw, w.saturating_sub(x0).div_ceil(sw))
        }));
        for (ch, plane) in group.chunks(h * w).enumerate() {
            let base = ch * channel_len;
            let (mut ry, mut yv) = (top % sh, top / sh);
            for row in plane.chunks(w) {
                if sw == 1 {
                    let at = base + ry * column_phases_n * phase_len + yv * pwv + left;
                    s.padded[at..at + w].copy_from_slice(row);
                } else {
                    // Phase `rx` takes the columns `x` with `(left + x) % sw == rx`, in order.
                    for (rx, &(x0, xv0, count)) in column_phases.iter().enumerate() {
                        let at = base + (ry * column_phases_n + rx) * phase_len + yv * pwv + xv0;
                        let src = row.iter().skip(x0).step_by(sw);
                        for (d, v) in s.padded[at..at + count].iter_mut().zip(src) {
                            *d = *v;
                        }
                    }
                }
                ry += 1;
                if ry == sh {
                    (ry, yv) = (0, yv + 1);
                }
            }
        }
        s.phases = column_phases;
        s.cols.clear();
        try_resize(&mut s.cols, lanes, 0)?;
        s.b.clear();
        try_resize(&mut s.b, k4 * stride, 0)?;
        s.b_off.clear();
        // Where each tap's row starts, in `(ic, ky, kx)` order.
        // (A buffer taken from the scratch and lost to an error is only reallocated.)
        let mut starts = std::mem::take(&mut s.starts);
        starts.clear();
        starts.try_reserve(4 * k4).map_err(|_| OutOfMemory {
            bytes: (4 * k4 * 8) as u64,
        })?;
        for ic in 0..self.cin_g {
            for ky in 0..kh {
                for kx in 0..kw {
                    let (ry, rx) = ((ky * dh) % sh, (kx * dw) % sw);
                    starts.push(
                        ic * channel_len
                            + (ry * column_phases_n + rx) * phase_len
                            + (ky * dh / sh) * pwv
                            + kx * dw / sw,
                    );
                }
            }
        }
        if self.virtual_columns {
            let row = |t: usize| -> &[i8] {
                match starts.get(t) {
                    Some(at) => &s.padded[*at..*at + lanes],
                    None => &s.cols[..],
                }
            };
            for q in 0..k4 {
                let rows = [row(4 * q), row(4 * q + 1), row(4 * q + 2), row(4 * q + 3)];
                gemm::interleave4(rows, &mut s.b[q * stride..q * stride + lanes]);
            }
        } else {
            // Real columns: each tap row gathered from its phase one output row at a time
            // (rows `0..4` of `s.cols`; row 4 stays zero for taps past `k`).
            let (p, ow) = (self.p, self.ow);
            try_resize(&mut s.cols, 5 * p, 0)?;
            for q in 0..k4 {
                for j in 0..4 {
                    let Some(at) = starts.get(4 * q + j) else {
                        s.cols.copy_within(4 * p..5 * p, j * p);
                        continue;
                    };
                    for oy in 0..self.oh {
                        let from = at + oy * pwv;
                        let to = j * p + oy * ow;
                        s.cols[to..to + ow].copy_from_slice(&s.padded[from..from + ow]);
                    }
                }
                let (r0, rest) = s.cols.split_at(p);
                let (r1, rest) = rest.split_at(p);
                let (r2, rest) = rest.split_at(p);
                let r3 = &rest[..p];
                gemm::interleave4([r0, r1, r2, r3], &mut s.b[q * stride..q * stride + lanes]);
            }
        }
        s.starts = starts;
        s.b_off.extend((0..k4).map(|q| q * stride));
        Ok(())
    }
}

/// Convolution, scalar reference: the definition, one multiply-add at a time, in `i32`.
pub fn conv2d_reference(c: &IntConv2d, x: &[i8], shape: &[usize]) -> Result<Values, OutOfMemory> {
    let [n, cin, h, w] = nchw(shape);
    let [kh, kw] = c.kernel;
    let oh = out_size(
        h,
        c.padding[0] + c.padding[1],
        c.dilation[0],
        kh,
        c.stride[0],
    );
    let ow = out_size(
        w,
        c.padding[2] + c.padding[3],
        c.dilation[1],
        kw,
        c.stride[1],
    );
    let (cin_g, cout_g) = (cin / c.groups, c.out_channels / c.groups);
    let cout = c.out_channels;
    let mut acc = try_filled(n * oh * ow * cout, 0i32)?;
    for img in 0..n {
        for oc in 0..cout {
            let g = oc / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = c.bias[oc];
                    for ic in 0..cin_g {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize
                                    - c.padding[0] as isize;
                                let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize
                                    - c.padding[2] as isize;
                                let v = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                {
                                    c.input.zero_point
                                } else {
                                    x[((img * cin + g * cin_g + ic) * h + iy as usize) * w
                                        + ix as usize] as i32
                                };
                                let wv = c.weight[((oc * cin_g + ic) * kh + ky) * kw + kx] as i32;
                                sum += (v - c.input.zero_point) * wv;
                            }
                        }
                    }
                    acc[((img * cout + oc) * oh + oy) * ow + ox] = sum;
                }
            }
        }
    }
    output_values(&c.output, &acc, oh * ow, out_shape(shape, cout, oh, ow))
}

/// A linear layer's weights as words of four `i8` inputs, `[k4, out]` (lanes padded to 16),
/// with the bias that also removes the input zero point.
pub struct LinearWeights {
    /// `[k4, stride]`.
    words: Vec<u32>,
    /// [`gemm::pairs_fit_i16`] of `words`.
    pairs_fit_i16: bool,
    /// Offset of each word row.
    offsets: Vec<usize>,
    /// `bias - (zp + 128) * sum(w)` per output feature, wrapping, padded to `stride`.
    bias: Vec<i32>,
}

impl LinearWeights {
    fn new(l: &IntLinear) -> Self {
        let (inp, out) = (l.in_features, l.out_features);
        let k4 = inp.div_ceil(4);
        let stride = out.next_multiple_of(16);
        let mut words = vec![0u32; k4 * stride];
        for (k, row) in words.chunks_exact_mut(stride.max(1)).enumerate() {
            for (o, word) in row.iter_mut().enumerate().take(out) {
                let byte = |j: usize| {
                    let i = 4 * k + j;
                    if i < inp {
                        l.weight[i * out + o] as u8
                    } else {
                        0
                    }
                };
                *word = u32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)]);
            }
        }
        let shift = l.input.zero_point.wrapping_add(128);
        let bias = (0..stride)
            .map(|o| {
                if o >= out {
                    return 0;
                }
                let sum = (0..inp).fold(0i32, |s, i| s.wrapping_add(l.weight[i * out + o] as i32));
                l.bias[o].wrapping_sub(shift.wrapping_mul(sum))
            })
            .collect();
        Self {
            pairs_fit_i16: gemm::pairs_fit_i16(&words),
            words,
            offsets: (0..k4).map(|k| k * stride).collect(),
            bias,
        }
    }
}

/// Fully connected layer, fast path: the `[n, in]` input as `u8` words (`int8 + 128`) times
/// the `[in, out]` weight words (prepared once), bias added. Rows run in parallel in chunks; a
/// single large row splits its outputs.
pub fn linear(
    l: &IntLinear,
    cache: &OnceLock<Packed>,
    x: &[i8],
    shape: &[usize],
) -> Result<Values, OutOfMemory> {
    fn typed<T: OutputValue>(
        l: &IntLinear,
        cache: &OnceLock<Packed>,
        x: &[i8],
        shape: &[usize],
    ) -> Result<Values, OutOfMemory> {
        let (mut acc, mut data) = (Vec::new(), Vec::new());
        linear_into::<T>(l, cache, x, &mut acc, &mut data)?;
        Ok(T::values(
            data,
            linear_shape(shape, l.out_features),
            &l.output,
        ))
    }
    match l.output {
        Output::Quantized { .. } => typed::<i8>(l, cache, x, shape),
        Output::Float { .. } => typed::<f32>(l, cache, x, shape),
    }
}

/// [`linear`] into `out` (resized; `i8` for a quantized output, `f32` for a float one), with
/// `acc` for the accumulators: no allocation once both and the workers' buffers have room.
pub(crate) fn linear_into<T: OutputValue>(
    l: &IntLinear,
    cache: &OnceLock<Packed>,
    x: &[i8],
    acc: &mut Vec<i32>,
    out: &mut Vec<T>,
) -> Result<(), OutOfMemory> {
    let inp = l.in_features;
    let n = x.len() / inp.max(1);
    let width = l.out_features;
    let Packed::Linear(weights) = cache.get_or_init(|| Packed::Linear(LinearWeights::new(l)))
    else {
        unreachable!("a linear layer keeps its weights as Packed::Linear")
    };
    let k4 = inp.div_ceil(4);
    // Rows of `x` as `u8` words, `[rows, k4]`, in the worker's buffer.
    let unsigned = |x: &[i8], a: &mut Vec<u32>| -> Result<(), OutOfMemory> {
        a.clear();
        let len = x.len().div_ceil(4) + k4;
        a.try_reserve(len).map_err(|_| OutOfMemory {
            bytes: (len * 4) as u64,
        })?;
        for r in x.chunks_exact(inp.max(1)) {
            gemm::unsigned_words(r, a);
        }
        Ok(())
    };
    fn words<'a>(a: &'a [u32], k4: usize, weights: &'a LinearWeights) -> gemm::Words<'a> {
        gemm::Words {
            a,
            a_row: k4,
            b: &weights.words,
            b_off: &weights.offsets,
            a_signed: false,
            pairs_fit_i16: weights.pairs_fit_i16,
            bias: Bias::Lanes(&weights.bias),
        }
    }
    // `[n, stride]`: the product stores whole rows of 16 lanes.
    let stride = width.next_multiple_of(16);
    acc.clear();
    try_resize(acc, n * stride, 0i32)?;
    let threads = threads();
    if n == 1 {
        let lanes = if threads > 1 && inp * width >= SPLIT_WORK {
            width.div_ceil(threads).next_multiple_of(16)
        } else {
            stride
        };
        SCRATCH.with_borrow_mut(|s| -> Result<(), OutOfMemory> {
            unsigned(x, &mut s.words)?;
            let words = words(&s.words, k4, weights);
            for_each_chunk(acc, lanes, |i, dst, _: &mut ()| {
                let first = i * lanes;
                let end = (first + dst.len()).min(width);
                gemm::product(&words, 0..1, first..end, dst, dst.len());
            });
            Ok(())
        })?;
    } else {
        // Chunks of rows, each converting its own rows.
        let rows = n.div_ceil(threads).next_multiple_of(gemm::MR).min(n);
        let failed = FirstError::new();
        for_each_chunk(acc, rows * stride, |i, dst, _: &mut ()| {
            let first = i * rows;
            let count = dst.len() / stride;
            failed.keep(SCRATCH.with_borrow_mut(|s| {
                unsigned(&x[first * inp..(first + count) * inp], &mut s.words).map(|_| {
                    let words = words(&s.words, k4, weights);
                    gemm::product(&words, 0..count, 0..width, dst, stride)
                })
            }));
        });
        failed.into_result()?;
    }
    // Requantized in chunks of rows too.
    let rows = 64;
    try_resize(out, n * width, T::default())?;
    let acc = &acc[..];
    for_each_chunk(out, rows * width, |i, dst, _: &mut ()| {
        for (r, d) in (i * rows..).zip(dst.chunks_exact_mut(width.max(1))) {
            T::rows(&acc[r * stride..r * stride + width], 1, &l.output, 0, d);
        }
    });
    Ok(())
}

/// Fully connected layer, scalar reference.
pub fn linear_reference(l: &IntLinear, x: &[i8], shape: &[usize]) -> Result<Values, OutOfMemory> {
    let n = x.len() / l.in_features.max(1);
    let out = l.out_features;
    let mut acc = try_filled(n * out, 0i32)?;
    for r in 0..n {
        for c in 0..out {
            let mut sum = l.bias[c];
            for i in 0..l.in_features {
                sum += (x[r * l.in_features + i] as i32 - l.input.zero_point)
                    * l.weight[i * out + c] as i32;
            }
            acc[r * out + c] = sum;
        }
    }
    output_values(&l.output, &acc, 1, linear_shape(shape, out))
}

fn linear_shape(shape: &[usize], out: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(last) = s.last_mut() {
        *last = out;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_the_allocator_refuses_is_an_error() {
        let err = try_filled(usize::MAX / 2, 0u32).unwrap_err();
        assert_eq!(err.bytes, u64::MAX);
        let mut v = vec![1u8; 3];
        assert!(try_resize(&mut v, usize::MAX, 0).is_err());
        assert_eq!(v, [1, 1, 1], "unchanged after a refusal");
        assert_eq!(try_filled(4, 7i8).unwrap(), [7; 4]);
    }
}
