//! The fused kernels on host slices: one pass over the input for each forward and backward,
//! channels walked in contiguous runs (no transpose), split across threads above
//! [`PARALLEL_MIN`] elements.
//!
//! Every function computes the same `f32` operations, in the same order, as the composed tensor
//! path in [`tensor`](crate::tensor) and the scalar [`reference`](crate::reference), so the
//! results are bit-equal; the rounding is written branch-free so that the loops vectorize on
//! baseline x86-64 and ARM (no `roundps`/`frintn` call per element).

use rayon::prelude::*;

/// Inputs at least this large are split across threads.
pub const PARALLEL_MIN: usize = 1 << 16;
/// Elements per parallel chunk (a multiple of 64, so that chunks start on cache lines).
const CHUNK: usize = 1 << 15;

/// The instruction sets the hot loops are also compiled for (the baseline is always there),
/// the best picked at run time. Rust never contracts `a * b + c` to an FMA, so every variant
/// computes the same bits (the tests compare them with the composed ops).
macro_rules! simd_loops {
    ($($(#[$meta:meta])* fn $name:ident $($rest:tt)*)*) => {$(
        $(#[$meta])*
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512vl+avx512dq+avx512bw",
            "x86_64+avx2+fma"
        ))]
        fn $name $($rest)*
    )*};
}

/// Where the channels of a quantization axis lie in a row-major buffer: element `i` belongs to
/// channel `(i / inner) % channels`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channels {
    /// Number of channels (1 per tensor).
    pub channels: usize,
    /// Elements of one channel's contiguous run (the product of the dimensions after the axis;
    /// the whole tensor per tensor).
    pub inner: usize,
}

impl Channels {
    /// The channel layout of a tensor of shape `dims` quantized along `axis` with `channels`
    /// parameters (`channels == 1`: one pair for the whole tensor).
    pub fn of(dims: &[usize], axis: usize, channels: usize) -> Self {
        if channels <= 1 || axis >= dims.len() {
            return Self {
                channels: 1,
                inner: dims.iter().product::<usize>().max(1),
            };
        }
        Self {
            channels,
            inner: dims[axis + 1..].iter().product::<usize>().max(1),
        }
    }

    /// Calls `f(start, end, channel)` for the runs of one channel that cover `range`.
    fn runs(self, range: std::ops::Range<usize>, mut f: impl FnMut(usize, usize, usize)) {
        let mut i = range.start;
        while i < range.end {
            let run = i / self.inner;
            let end = ((run + 1) * self.inner).min(range.end);
            f(i, end, run % self.channels);
            i = end;
        }
    }
}

/// `round(v)` half to even, branch-free: exact for every `f32` (values of magnitude `2^23` and
/// above are integers already; NaN stays NaN).
#[inline(always)]
pub fn round_half_even(v: f32) -> f32 {
    const BIG: f32 = 8_388_608.0; // 2^23: adding it leaves no fraction bits
    let a = v.abs();
    let r = (a + BIG) - BIG;
    if a < BIG { r.copysign(v) } else { v }
}

/// `floor(v + 0.5)` (TF's half-up rounding) from [`round_half_even`]: one less where rounding
/// went up past `w = v + 0.5`.
#[inline(always)]
pub fn round_half_up(v: f32) -> f32 {
    let w = v + 0.5;
    let r = round_half_even(w);
    if r > w { r - 1.0 } else { r }
}

/// `clamp` that keeps NaN (as Burn's `clamp` does).
#[inline(always)]
fn clamp(q: f32, lo: f32, hi: f32) -> f32 {
    if q < lo {
        lo
    } else if q > hi {
        hi
    } else {
        q
    }
}

/// The integer grid of one fused call.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Smallest integer (as `f32`).
    pub qmin: f32,
    /// Largest integer (as `f32`).
    pub qmax: f32,
    /// TF's half-up rounding instead of half to even.
    pub half_up: bool,
}

/// Runs longer than this walk one channel at a time; shorter ones (e.g. a Linear weight
/// `[in, out]` per output channel: runs of 1) use an expanded period (`Kind::Row`).
const RUN_MIN: usize = 64;

/// The quantization parameters of one call, laid out for the loops.
pub struct Params {
    kind: Kind,
    ch: Channels,
}

enum Kind {
    /// One pair for the whole tensor.
    Const(f32, f32),
    /// Long runs: one pair per run, looked up per run.
    Runs(Vec<f32>, Vec<f32>),
    /// Short runs: both parameters expanded to one period of `channels * inner` elements.
    Row(Vec<f32>, Vec<f32>),
}

/// The parameters of one stretch of elements: constant, or one pair per element.
enum Seg<'a> {
    Const(f32, f32),
    Slice(&'a [f32], &'a [f32]),
}

impl Params {
    /// Lays out `a`, `b` (one value per channel) for `ch`.
    pub fn new(a: &[f32], b: &[f32], ch: Channels) -> Self {
        let kind = if ch.channels <= 1 || a.len() <= 1 {
            Kind::Const(
                a.first().copied().unwrap_or(1.0),
                b.first().copied().unwrap_or(0.0),
            )
        } else if ch.inner >= RUN_MIN {
            Kind::Runs(a.to_vec(), b.to_vec())
        } else {
            let expand = |v: &[f32]| -> Vec<f32> {
                v.iter()
                    .flat_map(|&v| std::iter::repeat_n(v, ch.inner))
                    .collect()
            };
            Kind::Row(expand(a), expand(b))
        };
        Self { kind, ch }
    }

    /// Calls `f(start, end, seg)` over stretches covering `range`; for `Kind::Row` `seg`
    /// holds `end - start` values. The stretch's position in the period (`start % period`) is
    /// passed too, for per-position accumulators.
    fn walk(&self, range: std::ops::Range<usize>, mut f: impl FnMut(usize, usize, Seg<'_>, usize)) {
        match &self.kind {
            Kind::Const(a, b) => f(range.start, range.end, Seg::Const(*a, *b), 0),
            Kind::Runs(a, b) => self
                .ch
                .runs(range, |s, e, c| f(s, e, Seg::Const(a[c], b[c]), c)),
            Kind::Row(a, b) => {
                let period = a.len();
                let mut i = range.start;
                while i < range.end {
                    let p = i % period;
                    let len = (period - p).min(range.end - i);
                    f(i, i + len, Seg::Slice(&a[p..p + len], &b[p..p + len]), p);
                    i += len;
                }
            }
        }
    }

    /// Number of accumulator slots per-channel reductions need (channels, or one period).
    fn slots(&self) -> usize {
        match &self.kind {
            Kind::Const(..) => 1,
            Kind::Runs(a, _) => a.len(),
            Kind::Row(a, _) => a.len(),
        }
    }

    /// Folds per-slot accumulators into per-channel values with `fold`.
    fn to_channels<T: Copy>(&self, slots: Vec<T>, init: T, fold: impl Fn(T, T) -> T) -> Vec<T> {
        match &self.kind {
            Kind::Const(..) | Kind::Runs(..) => slots,
            Kind::Row(..) => {
                let mut out = vec![init; self.ch.channels];
                for (p, v) in slots.into_iter().enumerate() {
                    let c = p / self.ch.inner;
                    out[c] = fold(out[c], v);
                }
                out
            }
        }
    }
}

/// An output element a kernel writes: an `f32` of a buffer updated in place, or a
/// `MaybeUninit<f32>` of a fresh one.
trait Slot {
    fn put(&mut self, value: f32);
}

impl Slot for f32 {
    #[inline(always)]
    fn put(&mut self, value: f32) {
        *self = value;
    }
}

impl Slot for std::mem::MaybeUninit<f32> {
    #[inline(always)]
    fn put(&mut self, value: f32) {
        self.write(value);
    }
}

/// Writes `op(x, a, b)` elementwise over a stretch, two loop forms so that both vectorize.
macro_rules! map_seg {
    ($seg:expr, $out:expr, $xs:expr, |$x:ident, $a:ident, $b:ident| $body:expr) => {
        match $seg {
            Seg::Const(a, b) => map_const($out, $xs, a, b, |$x, $a, $b| $body),
            Seg::Slice(sa, sb) => map_slice($out, $xs, sa, sb, |$x, $a, $b| $body),
        }
    };
}

simd_loops! {
/// `ys[i] = op(xs[i], a, b)`, compiled for the instruction sets of [`simd_loops`].
fn map_const<S: Slot, F: Fn(f32, f32, f32) -> f32>(
    ys: &mut [S],
    xs: &[f32],
    a: f32,
    b: f32,
    op: F,
) {
    for (y, &x) in ys.iter_mut().zip(xs) {
        y.put(op(x, a, b));
    }
}
}

simd_loops! {
/// `ys[i] = op(xs[i], a[i], b[i])`, compiled like [`map_const`].
fn map_slice<S: Slot, F: Fn(f32, f32, f32) -> f32>(
    ys: &mut [S],
    xs: &[f32],
    sa: &[f32],
    sb: &[f32],
    op: F,
) {
    for ((y, &x), (&a, &b)) in ys.iter_mut().zip(xs).zip(sa.iter().zip(sb)) {
        y.put(op(x, a, b));
    }
}
}

/// A fresh `n`-element output filled by `kernel(range, out)` in parallel chunks. The buffer is
/// not zeroed first (profile: zeroing 16 MB outputs cost as much as the kernel): the kernel
/// writes every element once.
fn fill_new(
    n: usize,
    kernel: impl Fn(std::ops::Range<usize>, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    fold_chunks(&mut out.spare_capacity_mut()[..n], kernel, |(), ()| ());
    // SAFETY: `fold_chunks` handed every element of the first `n` to exactly one `kernel`
    // call, and every kernel passed here writes each element of its chunk.
    unsafe { out.set_len(n) };
    out
}

/// Runs `kernel(range, chunk)` over `out` in chunks, in parallel above [`PARALLEL_MIN`]
/// elements, and combines the chunks' results with `combine`.
fn fold_chunks<T: Send, R: Send>(
    out: &mut [T],
    kernel: impl Fn(std::ops::Range<usize>, &mut [T]) -> R + Sync,
    combine: impl Fn(R, R) -> R + Sync + Send,
) -> R {
    if out.len() < PARALLEL_MIN {
        let n = out.len();
        return kernel(0..n, out);
    }
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(k, chunk)| {
            let start = k * CHUNK;
            kernel(start..start + chunk.len(), chunk)
        })
        .reduce_with(&combine)
        .expect("at least one chunk above the threshold")
}

/// `y` clamped to `[-f32::MAX, f32::MAX]`, NaN kept: outputs saturate at the edge of `f32`
/// (a grid end beyond the largest `f32` would otherwise overflow to an infinity).
#[inline(always)]
fn saturate(y: f32) -> f32 {
    clamp(y, -f32::MAX, f32::MAX)
}

#[inline(always)]
fn fq_even(x: f32, s: f32, zp: f32, b: Bounds) -> f32 {
    saturate((clamp(round_half_even(x / s) + zp, b.qmin, b.qmax) - zp) * s)
}

#[inline(always)]
fn fq_up(x: f32, s: f32, zp: f32, b: Bounds) -> f32 {
    saturate((clamp(round_half_up(x / s) + zp, b.qmin, b.qmax) - zp) * s)
}

/// Fake quantization forward: `(clamp(round(x / s) + zp, qmin, qmax) - zp) * s` per element,
/// `s`, `zp` of the element's channel, saturated at `+-f32::MAX`.
pub fn fake_quant(x: &[f32], p: &Params, b: Bounds) -> Vec<f32> {
    fill_new(x.len(), |range, out| {
        let base = range.start;
        p.walk(range, |start, end, seg, _| {
            let xs = &x[start..end];
            let ys = &mut out[start - base..end - base];
            if b.half_up {
                map_seg!(seg, ys, xs, |x, s, z| fq_up(x, s, z, b));
            } else {
                map_seg!(seg, ys, xs, |x, s, z| fq_even(x, s, z, b));
            }
        });
    })
}

/// Fake quantization backward (the clipped straight-through estimator), in place: `grad`
/// stays where `qmin <= x / s + zp <= qmax`, becomes 0 elsewhere (and for NaN).
pub fn fake_quant_grad(grad: &mut [f32], x: &[f32], p: &Params, b: Bounds) {
    fold_chunks(
        grad,
        |range, out| {
            let base = range.start;
            p.walk(range, |start, end, seg, _| {
                let xs = &x[start..end];
                let gs = &mut out[start - base..end - base];
                let inside = |x: f32, s: f32, zp: f32| {
                    let v = x / s + zp;
                    v >= b.qmin && v <= b.qmax
                };
                match seg {
                    Seg::Const(s, zp) => mask_const(gs, xs, s, zp, inside),
                    Seg::Slice(ss, zs) => mask_slice(gs, xs, ss, zs, inside),
                }
            });
        },
        |(), ()| (),
    )
}

simd_loops! {
/// `gs[i] = 0` where `keep(xs[i], a, b)` is false, compiled like [`map_const`].
fn mask_const<F: Fn(f32, f32, f32) -> bool>(
    gs: &mut [f32],
    xs: &[f32],
    a: f32,
    b: f32,
    keep: F,
) {
    for (g, &x) in gs.iter_mut().zip(xs) {
        *g = if keep(x, a, b) { *g } else { 0.0 };
    }
}
}

simd_loops! {
/// `gs[i] = 0` where `keep(xs[i], a[i], b[i])` is false, compiled like [`map_const`].
fn mask_slice<F: Fn(f32, f32, f32) -> bool>(
    gs: &mut [f32],
    xs: &[f32],
    sa: &[f32],
    sb: &[f32],
    keep: F,
) {
    for ((g, &x), (&a, &b)) in gs.iter_mut().zip(xs).zip(sa.iter().zip(sb)) {
        *g = if keep(x, a, b) { *g } else { 0.0 };
    }
}
}

/// Independent partial sums: a reduction written as one running sum is a serial chain of
/// additions (the compiler may not reorder float sums), and `f64` conversions per element do
/// not vectorize (profile: two thirds of a PACT step). So element `i` of each run of
/// `SUM_LANES` goes to `f32` lane `i`, and every [`SUM_BLOCK`] elements the lanes join the
/// `f64` totals: at most 64 roundings of a lane's partial sum (Burn's own `sum_dim` adds up a
/// whole tensor in `f32`).
const SUM_LANES: usize = 16;

/// Elements summed in `f32` lanes before a block's sums join the `f64` totals.
const SUM_BLOCK: usize = 1024;

simd_loops! {
/// Runs `one(grad, x)` on every element (it may rewrite `grad`) and returns the sums of the two
/// values it returns (see [`SUM_LANES`]). Compiled like [`map_const`].
fn sum_pairs<F: FnMut(&mut f32, f32) -> (f32, f32)>(
    gs: &mut [f32],
    xs: &[f32],
    mut one: F,
) -> (f64, f64) {
    const L: usize = SUM_LANES;
    let (mut total_a, mut total_c) = (0.0f64, 0.0f64);
    for (gs, xs) in gs.chunks_mut(SUM_BLOCK).zip(xs.chunks(SUM_BLOCK)) {
        let (mut a, mut c) = ([0.0f32; L], [0.0f32; L]);
        let mut g_runs = gs.chunks_exact_mut(L);
        let mut x_runs = xs.chunks_exact(L);
        for (g, x) in (&mut g_runs).zip(&mut x_runs) {
            for k in 0..L {
                let (da, dc) = one(&mut g[k], x[k]);
                a[k] += da;
                c[k] += dc;
            }
        }
        total_a += a.iter().map(|&v| f64::from(v)).sum::<f64>();
        total_c += c.iter().map(|&v| f64::from(v)).sum::<f64>();
        for (g, &x) in g_runs.into_remainder().iter_mut().zip(x_runs.remainder()) {
            let (da, dc) = one(g, x);
            total_a += f64::from(da);
            total_c += f64::from(dc);
        }
    }
    (total_a, total_c)
}
}

simd_loops! {
/// Like [`sum_pairs`] with one pair of parameters and one pair of `f64` accumulators per
/// element (a period of short runs): `acc.0[i] += a`, `acc.1[i] += c` for
/// `(a, c) = one(grad[i], x[i], pa[i], pb[i])`. Compiled like [`map_const`].
fn sum_pairs_per_slot<F: FnMut(&mut f32, f32, f32, f32) -> (f32, f32)>(
    gs: &mut [f32],
    xs: &[f32],
    pa: &[f32],
    pb: &[f32],
    acc: (&mut [f64], &mut [f64]),
    mut one: F,
) {
    let (acc_a, acc_c) = acc;
    for (((g, &x), (&a, &b)), (sa, sc)) in gs
        .iter_mut()
        .zip(xs)
        .zip(pa.iter().zip(pb))
        .zip(acc_a.iter_mut().zip(acc_c.iter_mut()))
    {
        let (da, dc) = one(g, x, a, b);
        *sa += f64::from(da);
        *sc += f64::from(dc);
    }
}
}

/// The LSQ value before saturation, `round(clamp(v, qmin, qmax)) * s + o`.
#[inline(always)]
fn lsq_unsaturated(v: f32, s: f32, o: f32, b: Bounds) -> f32 {
    round_half_even(clamp(v, b.qmin, b.qmax)) * s + o
}

/// LSQ / LSQ+ forward: `round(clamp((x - o) / s, qmin, qmax)) * s + o` (half to even),
/// saturated at `+-f32::MAX`; `p` holds steps and offsets.
pub fn lsq(x: &[f32], p: &Params, b: Bounds) -> Vec<f32> {
    fill_new(x.len(), |range, out| {
        let base = range.start;
        p.walk(range, |start, end, seg, _| {
            let xs = &x[start..end];
            let ys = &mut out[start - base..end - base];
            map_seg!(seg, ys, xs, |x, s, o| saturate(lsq_unsaturated(
                (x - o) / s,
                s,
                o,
                b
            )));
        });
    })
}

/// LSQ / LSQ+ backward in one pass, in place on `grad` (becomes the gradient of `x`: kept
/// inside the range, 0 outside) and, per channel, the sums `Σ grad · (round(v) - v)` inside /
/// `grad · qmin|qmax` outside (the step's gradient) and `Σ grad` outside (the offset's),
/// `v = (x - o) / s`, summed in `f32` lanes joined in `f64` every 1,024 elements. NaN inputs
/// contribute nothing, and neither do elements whose value saturated at `+-f32::MAX` (the
/// composed form's clamp passes them no gradient).
pub fn lsq_grad(grad: &mut [f32], x: &[f32], p: &Params, b: Bounds) -> (Vec<f32>, Vec<f32>) {
    channel_sums(grad, x, p, |g, x, s, o| {
        let v = (x - o) / s;
        let inside = v >= b.qmin && v <= b.qmax;
        let dv = if inside {
            round_half_even(v) - v
        } else if v < b.qmin {
            b.qmin
        } else {
            b.qmax
        };
        let saturated = lsq_unsaturated(v, s, o, b).abs() > f32::MAX;
        let gv = if saturated { 0.0 } else { *g };
        *g = if inside { gv } else { 0.0 };
        if v.is_nan() {
            (0.0, 0.0)
        } else {
            (gv * dv, if inside { 0.0 } else { gv })
        }
    })
}

/// Runs `one(grad, x, a, b)` on every element with its channel's parameters (it may rewrite
/// `grad`) and returns, per channel, the sums of the two values it returns (see
/// [`SUM_LANES`]).
fn channel_sums<F: Fn(&mut f32, f32, f32, f32) -> (f32, f32) + Copy + Sync>(
    grad: &mut [f32],
    x: &[f32],
    p: &Params,
    one: F,
) -> (Vec<f32>, Vec<f32>) {
    let slots = p.slots();
    let sums = |range: std::ops::Range<usize>, gs: &mut [f32]| {
        let base = range.start;
        let (mut sa, mut sc) = (vec![0.0f64; slots], vec![0.0f64; slots]);
        p.walk(range, |start, end, seg, slot| {
            let xs = &x[start..end];
            let gs = &mut gs[start - base..end - base];
            match seg {
                Seg::Const(a, b) => {
                    let (u, v) = sum_pairs(gs, xs, |g, x| one(g, x, a, b));
                    sa[slot] += u;
                    sc[slot] += v;
                }
                Seg::Slice(pa, pb) => {
                    let n = xs.len();
                    let acc = (&mut sa[slot..slot + n], &mut sc[slot..slot + n]);
                    sum_pairs_per_slot(gs, xs, pa, pb, acc, one);
                }
            }
        });
        (sa, sc)
    };
    let (sa, sc) = fold_chunks(grad, sums, |(mut a, mut b), (c, d)| {
        a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
        b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
        (a, b)
    });
    let f = |v: Vec<f64>| {
        p.to_channels(v, 0.0, |a, b| a + b)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    };
    (f(sa), f(sc))
}

/// The clip of PACT and of trainable min/max (both per tensor): `[lo, hi]`, and the grid the
/// clipped value is fake-quantized to.
#[derive(Debug, Clone, Copy)]
pub struct Clip {
    /// Lower clip (PACT: 0).
    pub lo: f32,
    /// Upper clip (PACT: alpha).
    pub hi: f32,
    /// The grid's scale.
    pub scale: f32,
    /// The grid's zero point.
    pub zero_point: f32,
}

/// `min(max(x, lo), hi)` as Burn's `max_pair` then `min_pair` compute it (`x` where it is not
/// below `lo`, NaN included; then `hi` where `hi` is below that), with which clip was taken:
/// `(value, lo taken, hi taken)` (at most one of the two).
#[inline(always)]
fn clip(x: f32, lo: f32, hi: f32) -> (f32, bool, bool) {
    // Selects of computed values only (no early return): the loops compile without branches.
    let below = x < lo;
    let t = if below { lo } else { x };
    let above = hi < t;
    let y = if above { hi } else { t };
    (y, below & !above, above)
}

/// Clip then fake-quantize, straight through: `t + (fq(t) - t)` with `t` the clipped value
/// (the composed form's `y + (q - y).detach()`, bit for bit).
pub fn clip_fake_quant(x: &[f32], c: Clip, b: Bounds) -> Vec<f32> {
    let (s, zp) = (c.scale, c.zero_point);
    fill_new(x.len(), |range, out| {
        let xs = &x[range];
        if b.half_up {
            for (y, &x) in out.iter_mut().zip(xs) {
                let (t, ..) = clip(x, c.lo, c.hi);
                y.put(t + (fq_up(t, s, zp, b) - t));
            }
        } else {
            for (y, &x) in out.iter_mut().zip(xs) {
                let (t, ..) = clip(x, c.lo, c.hi);
                y.put(t + (fq_even(t, s, zp, b) - t));
            }
        }
    })
}

/// [`clip_fake_quant`]'s backward in one pass, in place on `grad` (becomes the gradient of `x`:
/// kept where `x` passed the clip, 0 where `lo` or `hi` replaced it), and the sums of `grad`
/// where `lo` (`x < lo <= hi`) and where `hi` (`hi < clip`) was taken: the gradients of the two
/// clips, summed in `f32` lanes joined in `f64` every 1,024 elements.
pub fn clip_fake_quant_grad(grad: &mut [f32], x: &[f32], c: Clip) -> (f32, f32) {
    let (lo, hi) = (c.lo, c.hi);
    let (dlo, dhi) = fold_chunks(
        grad,
        |range, gs| {
            sum_pairs(gs, &x[range], |g, x| {
                let (_, below, above) = clip(x, lo, hi);
                let gv = *g;
                *g = if below | above { 0.0 } else { gv };
                let to_lo = if below { gv } else { 0.0 };
                let to_hi = if above { gv } else { 0.0 };
                (to_lo, to_hi)
            })
        },
        |(a, b), (c, d)| (a + c, b + d),
    );
    (dlo as f32, dhi as f32)
}

/// BatchNorm folding's rescaling of a layer's output: `z / d + b` per element, `d`, `b` of the
/// element's channel (the same two roundings as the composed divide and add).
pub fn divide_add(z: &[f32], p: &Params) -> Vec<f32> {
    fill_new(z.len(), |range, out| {
        let base = range.start;
        p.walk(range, |start, end, seg, _| {
            let ys = &mut out[start - base..end - base];
            map_seg!(seg, ys, &z[start..end], |z, d, b| z / d + b);
        });
    })
}

/// The backward of [`divide_add`], in place: `grad` becomes `grad * r` with `r = 1 / d` (as
/// Burn's autodiff computes a quotient's gradient; `p` holds `r`); returns per channel
/// `sum(grad * z)` and `sum(grad)` (of the incoming gradient), from which `d`'s gradient is
/// `-sum(grad * z) / d^2` and `b`'s is `sum(grad)` (summed in `f32` lanes joined in `f64` every
/// 1,024 elements).
pub fn divide_add_grad(grad: &mut [f32], z: &[f32], p: &Params) -> (Vec<f32>, Vec<f32>) {
    channel_sums(grad, z, p, |g, z, r, _| {
        let gv = *g;
        *g = gv * r;
        (gv * z, gv)
    })
}

/// Independent running minima and maxima per stretch (four SSE or two AVX registers).
const MIN_MAX_LANES: usize = 16;

simd_loops! {
/// The minimum and maximum of `lo`, `hi` and the finite values of `xs` (non-finite values count
/// as 0). Independent lanes: one running minimum is a serial chain of compares that the
/// compiler may not reorder (profile: 3% of a `bn` QAT step, scalar). Compiled like
/// [`map_const`].
fn min_max_run(xs: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    let finite = |v: f32| if v.is_finite() { v } else { 0.0 };
    let (mut l, mut h) = ([lo; MIN_MAX_LANES], [hi; MIN_MAX_LANES]);
    let mut runs = xs.chunks_exact(MIN_MAX_LANES);
    for run in &mut runs {
        for k in 0..MIN_MAX_LANES {
            let v = finite(run[k]);
            l[k] = if v < l[k] { v } else { l[k] };
            h[k] = if v > h[k] { v } else { h[k] };
        }
    }
    let (mut l, mut h) = (
        l.into_iter().fold(lo, f32::min),
        h.into_iter().fold(hi, f32::max),
    );
    for &v in runs.remainder() {
        let v = finite(v);
        l = if v < l { v } else { l };
        h = if v > h { v } else { h };
    }
    (l, h)
}
}

/// Per-channel minimum and maximum in one pass, NaN and infinities skipped, widened to contain
/// 0 (what observers record).
pub fn min_max(x: &[f32], ch: Channels) -> (Vec<f32>, Vec<f32>) {
    let ones = vec![1.0; ch.channels];
    let p = Params::new(&ones, &ones, ch);
    let slots = p.slots();
    let part = |range: std::ops::Range<usize>| {
        let mut lo = vec![0.0f32; slots];
        let mut hi = vec![0.0f32; slots];
        p.walk(range, |start, end, seg, slot| {
            let xs = &x[start..end];
            // Non-finite values count as 0, which the range contains anyway.
            let finite = |v: f32| if v.is_finite() { v } else { 0.0 };
            match seg {
                Seg::Const(..) => {
                    let (l, h) = min_max_run(xs, lo[slot], hi[slot]);
                    lo[slot] = l;
                    hi[slot] = h;
                }
                Seg::Slice(..) => {
                    let (ls, hs) = (
                        &mut lo[slot..slot + xs.len()],
                        &mut hi[slot..slot + xs.len()],
                    );
                    for ((l, h), &v) in ls.iter_mut().zip(hs.iter_mut()).zip(xs) {
                        let v = finite(v);
                        *l = if v < *l { v } else { *l };
                        *h = if v > *h { v } else { *h };
                    }
                }
            }
        });
        (lo, hi)
    };
    // Nothing to write: the chunks are laid over zero-sized placeholders (no allocation).
    let (lo, hi) = fold_chunks(
        &mut vec![(); x.len()],
        |range, _| part(range),
        |(mut a, mut b), (c, d)| {
            a.iter_mut().zip(c).for_each(|(a, c)| *a = a.min(c));
            b.iter_mut().zip(d).for_each(|(b, d)| *b = b.max(d));
            (a, b)
        },
    );
    (
        p.to_channels(lo, 0.0, f32::min),
        p.to_channels(hi, 0.0, f32::max),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_std_on_hard_values() {
        let hard = [
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999997,
            -0.49999997,
            8_388_607.5,
            -8_388_607.5,
            8_388_608.0,
            16_777_217.0,
            1e30,
            -1e30,
            0.0,
            -0.0,
            3.4e38,
            f32::MIN_POSITIVE,
        ];
        for v in hard {
            assert_eq!(
                round_half_even(v).to_bits(),
                v.round_ties_even().to_bits(),
                "{v}"
            );
            assert_eq!(
                round_half_up(v).to_bits(),
                (v + 0.5).floor().to_bits(),
                "{v}"
            );
        }
        assert!(round_half_even(f32::NAN).is_nan());
        assert_eq!(round_half_even(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_half_up(f32::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn channel_runs_cover_every_element_once() {
        // [2, 3, 4] along axis 1: runs of 4, channels 0,1,2,0,1,2.
        let ch = Channels::of(&[2, 3, 4], 1, 3);
        let mut seen = [usize::MAX; 24];
        ch.runs(5..23, |s, e, c| seen[s..e].iter_mut().for_each(|v| *v = c));
        for (i, &c) in seen.iter().enumerate() {
            let want = if (5..23).contains(&i) {
                (i / 4) % 3
            } else {
                usize::MAX
            };
            assert_eq!(c, want, "element {i}");
        }
    }
}
