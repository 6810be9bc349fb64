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

/// Runs `kernel(range, out)` over `out` in parallel chunks (sequentially for small inputs).
fn split<T: Send>(out: &mut [T], kernel: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync) {
    if out.len() < PARALLEL_MIN {
        let n = out.len();
        kernel(0..n, out);
        return;
    }
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, chunk)| {
        let start = k * CHUNK;
        kernel(start..start + chunk.len(), chunk)
    });
}

/// Fake quantization forward: `(clamp(round(x / s) + zp, qmin, qmax) - zp) * s` per element,
/// `s`, `zp` of the element's channel.
pub fn fake_quant(x: &[f32], scale: &[f32], zero_point: &[f32], ch: Channels, b: Bounds) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    split(&mut out, |range, out| {
        let base = range.start;
        ch.runs(range, |start, end, c| {
            let (s, zp) = (scale[c], zero_point[c]);
            let xs = &x[start..end];
            let ys = &mut out[start - base..end - base];
            if b.half_up {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = (clamp(round_half_up(x / s) + zp, b.qmin, b.qmax) - zp) * s;
                }
            } else {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = (clamp(round_half_even(x / s) + zp, b.qmin, b.qmax) - zp) * s;
                }
            }
        });
    });
    out
}

/// Fake quantization backward (the clipped straight-through estimator): `grad` where
/// `qmin <= x / s + zp <= qmax`, 0 elsewhere (and for NaN).
pub fn fake_quant_grad(
    grad: &[f32],
    x: &[f32],
    scale: &[f32],
    zero_point: &[f32],
    ch: Channels,
    b: Bounds,
) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    split(&mut out, |range, out| {
        let base = range.start;
        ch.runs(range, |start, end, c| {
            let (s, zp) = (scale[c], zero_point[c]);
            let it = out[start - base..end - base]
                .iter_mut()
                .zip(&x[start..end])
                .zip(&grad[start..end]);
            for ((y, &x), &g) in it {
                let v = x / s + zp;
                *y = if v >= b.qmin && v <= b.qmax { g } else { 0.0 };
            }
        });
    });
    out
}

/// LSQ / LSQ+ forward: `round(clamp((x - o) / s, qmin, qmax)) * s + o` (half to even).
pub fn lsq(x: &[f32], step: &[f32], offset: &[f32], ch: Channels, b: Bounds) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    split(&mut out, |range, out| {
        let base = range.start;
        ch.runs(range, |start, end, c| {
            let (s, o) = (step[c], offset[c]);
            for (y, &x) in out[start - base..end - base].iter_mut().zip(&x[start..end]) {
                *y = round_half_even(clamp((x - o) / s, b.qmin, b.qmax)) * s + o;
            }
        });
    });
    out
}

/// LSQ / LSQ+ backward in one pass: the gradient of `x` (`grad` inside the range, 0 outside)
/// and, per channel, the sums `Σ grad · (round(v) - v)` inside / `grad · qmin|qmax` outside
/// (the step's gradient) and `Σ grad` outside (the offset's), `v = (x - o) / s`. The sums are
/// accumulated in `f64`.
pub fn lsq_grad(
    grad: &[f32],
    x: &[f32],
    step: &[f32],
    offset: &[f32],
    ch: Channels,
    b: Bounds,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0.0; x.len()];
    let sums = |range: std::ops::Range<usize>, dx: &mut [f32]| {
        let base = range.start;
        let mut ds = vec![0.0f64; ch.channels];
        let mut doff = vec![0.0f64; ch.channels];
        ch.runs(range, |start, end, c| {
            let (s, o) = (step[c], offset[c]);
            let (mut acc_s, mut acc_o) = (0.0f64, 0.0f64);
            let it = dx[start - base..end - base]
                .iter_mut()
                .zip(&x[start..end])
                .zip(&grad[start..end]);
            for ((d, &x), &g) in it {
                let v = (x - o) / s;
                let inside = v >= b.qmin && v <= b.qmax;
                *d = if inside { g } else { 0.0 };
                let dv = if inside {
                    round_half_even(v) - v
                } else if v < b.qmin {
                    b.qmin
                } else {
                    b.qmax
                };
                // NaN inputs contribute nothing (as their masked gradient).
                acc_s += if v.is_nan() { 0.0 } else { f64::from(g * dv) };
                acc_o += if inside || v.is_nan() { 0.0 } else { f64::from(g) };
            }
            ds[c] += acc_s;
            doff[c] += acc_o;
        });
        (ds, doff)
    };
    let (ds, doff) = if x.len() < PARALLEL_MIN {
        let n = x.len();
        sums(0..n, &mut dx)
    } else {
        dx.par_chunks_mut(CHUNK)
            .enumerate()
            .map(|(k, chunk)| sums(k * CHUNK..k * CHUNK + chunk.len(), chunk))
            .reduce(
                || (vec![0.0; ch.channels], vec![0.0; ch.channels]),
                |(mut a, mut b), (c, d)| {
                    a.iter_mut().zip(c).for_each(|(a, c)| *a += c);
                    b.iter_mut().zip(d).for_each(|(b, d)| *b += d);
                    (a, b)
                },
            )
    };
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, f(ds), f(doff))
}

/// Per-channel minimum and maximum in one pass, NaN and infinities skipped, widened to contain
/// 0 (what observers record).
pub fn min_max(x: &[f32], ch: Channels) -> (Vec<f32>, Vec<f32>) {
    let part = |range: std::ops::Range<usize>| {
        let mut lo = vec![0.0f32; ch.channels];
        let mut hi = vec![0.0f32; ch.channels];
        ch.runs(range, |start, end, c| {
            let (mut l, mut h) = (lo[c], hi[c]);
            for &v in &x[start..end] {
                // Non-finite values count as 0, which the range contains anyway.
                let v = if v.is_finite() { v } else { 0.0 };
                l = if v < l { v } else { l };
                h = if v > h { v } else { h };
            }
            lo[c] = l;
            hi[c] = h;
        });
        (lo, hi)
    };
    if x.len() < PARALLEL_MIN {
        return part(0..x.len());
    }
    let chunks = x.len().div_ceil(CHUNK);
    (0..chunks)
        .into_par_iter()
        .map(|k| part(k * CHUNK..((k + 1) * CHUNK).min(x.len())))
        .reduce(
            || (vec![0.0; ch.channels], vec![0.0; ch.channels]),
            |(mut a, mut b), (c, d)| {
                a.iter_mut().zip(c).for_each(|(a, c)| *a = a.min(c));
                b.iter_mut().zip(d).for_each(|(b, d)| *b = b.max(d));
                (a, b)
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_std_on_hard_values() {
        let hard = [
            0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 8_388_607.5, -8_388_607.5,
            8_388_608.0, 16_777_217.0, 1e30, -1e30, 0.0, -0.0, 3.4e38, f32::MIN_POSITIVE,
        ];
        for v in hard {
            assert_eq!(round_half_even(v).to_bits(), v.round_ties_even().to_bits(), "{v}");
            assert_eq!(round_half_up(v).to_bits(), (v + 0.5).floor().to_bits(), "{v}");
        }
        assert!(round_half_even(f32::NAN).is_nan());
        assert_eq!(round_half_even(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_half_up(f32::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn channel_runs_cover_every_element_once() {
        // [2, 3, 4] along axis 1: runs of 4, channels 0,1,2,0,1,2.
        let ch = Channels::of(&[2, 3, 4], 1, 3);
        let mut seen = vec![usize::MAX; 24];
        ch.runs(5..23, |s, e, c| seen[s..e].iter_mut().for_each(|v| *v = c));
        for (i, &c) in seen.iter().enumerate() {
            let want = if (5..23).contains(&i) { (i / 4) % 3 } else { usize::MAX };
            assert_eq!(c, want, "element {i}");
        }
    }
}
