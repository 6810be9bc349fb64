//! Integer kernels other than the GEMM ones: broadcasting add/mul, lookup tables, pooling,
//! reductions, concat and permute. Plain loops over `i8` buffers (the compiler vectorizes the
//! contiguous ones); each is its own definition, checked against the fake-quant graph.

use crate::kernels::for_each_chunk;
use crate::model::{
    Grid, IntAdd, IntLayerNorm, IntMatMul, IntMul, IntSoftmax, Lut, Window, conv_output_len,
};
use crate::requant::FixedMultiplier;

/// `out` resized to `len` values (contents unspecified: every op overwrites them all); no
/// allocation when it has room.
fn sized<T: Copy + Default>(out: &mut Vec<T>, len: usize) -> &mut [T] {
    out.clear();
    out.resize(len, T::default());
    out
}

/// NumPy broadcast of two shapes of the same rank, `None` if they do not broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    if a.len() != b.len() {
        return None;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x, y) {
            _ if x == y => Some(*x),
            (1, _) => Some(*y),
            (_, 1) => Some(*x),
            _ => None,
        })
        .collect()
}

/// `f(a[i], b[i])` over the broadcast of `a` and `b` (shapes checked by the caller).
fn binary(
    a: &[i8],
    sa: &[usize],
    b: &[i8],
    sb: &[usize],
    out_shape: &[usize],
    f: impl Fn(i8, i8) -> i8 + Sync,
    out: &mut Vec<i8>,
) {
    if sa == sb {
        // Same shapes: in parallel chunks.
        let data = sized(out, a.len());
        let chunk = 1 << 15;
        for_each_chunk(data, chunk, |i, dst, _: &mut ()| {
            let (a, b) = (&a[i * chunk..], &b[i * chunk..]);
            for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
                *d = f(*x, *y);
            }
        });
        return;
    }
    let total: usize = out_shape.iter().product();
    out.clear();
    out.extend((0..total).map(|i| {
        // The output index's coordinates, last axis first, and the inputs' offsets.
        let (mut rest, mut ia, mut ib, mut ta, mut tb) = (i, 0, 0, 1, 1);
        for d in (0..out_shape.len()).rev() {
            let c = rest % out_shape[d];
            rest /= out_shape[d];
            if sa[d] != 1 {
                ia += c * ta;
            }
            if sb[d] != 1 {
                ib += c * tb;
            }
            (ta, tb) = (ta * sa[d], tb * sb[d]);
        }
        f(a[ia], b[ib])
    }));
}

/// Every output of a two-input integer op, `table[(x + 128) * 256 + y + 128] = f(x, y)`: 64 KiB
/// that replace the op's wide arithmetic with one lookup (built once per node).
pub fn pair_table(f: impl Fn(i8, i8) -> i8) -> Vec<i8> {
    (0..=u16::MAX)
        .map(|i| f((i >> 8) as u8 as i8 ^ i8::MIN, i as u8 as i8 ^ i8::MIN))
        .collect()
}

/// A two-input op through its [`pair_table`], with broadcasting.
pub fn binary_lookup(
    table: &[i8],
    a: &[i8],
    sa: &[usize],
    b: &[i8],
    sb: &[usize],
    shape: &[usize],
    out: &mut Vec<i8>,
) {
    let table: &[i8; 1 << 16] = table.try_into().expect("a pair table has 65536 entries");
    let f = |x: i8, y: i8| table[((x as u8 ^ 0x80) as usize) << 8 | (y as u8 ^ 0x80) as usize];
    binary(a, sa, b, sb, shape, f, out)
}

/// Integer add/subtract with broadcasting, into `out` (`shape` is the output's).
#[allow(clippy::too_many_arguments)]
pub fn add(
    op: &IntAdd,
    a: &[i8],
    sa: &[usize],
    b: &[i8],
    sb: &[usize],
    shape: &[usize],
    out: &mut Vec<i8>,
) {
    binary(a, sa, b, sb, shape, |x, y| op.apply(x, y), out)
}

/// Integer multiply with broadcasting, into `out` (`shape` is the output's).
#[allow(clippy::too_many_arguments)]
pub fn mul(
    op: &IntMul,
    a: &[i8],
    sa: &[usize],
    b: &[i8],
    sb: &[usize],
    shape: &[usize],
    out: &mut Vec<i8>,
) {
    binary(a, sa, b, sb, shape, |x, y| op.apply(x, y), out)
}

/// The output shape of a matrix product `[.., m, k] x [.., k, n]`: leading axes equal or 1 in
/// either (broadcast), the inner axis at most [`IntMatMul::MAX_INNER`].
pub fn matmul_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let (ra, rb) = (a.len(), b.len());
    if ra < 2 || ra != rb {
        return Err(format!(
            "matmul of {a:?} and {b:?} (needs two tensors of one rank >= 2)"
        ));
    }
    let (m, k, k2, n) = (a[ra - 2], a[ra - 1], b[rb - 2], b[rb - 1]);
    if k != k2 {
        return Err(format!(
            "matmul of {a:?} and {b:?}: inner sizes {k} and {k2} differ"
        ));
    }
    if k > IntMatMul::MAX_INNER {
        return Err(format!(
            "matmul with an inner axis of {k} (at most {}: the integer sum must fit i32)",
            IntMatMul::MAX_INNER
        ));
    }
    let mut out = Vec::with_capacity(ra);
    for (&x, &y) in a[..ra - 2].iter().zip(&b[..rb - 2]) {
        if x != y && x != 1 && y != 1 {
            return Err(format!(
                "matmul of {a:?} and {b:?}: leading axes do not broadcast"
            ));
        }
        out.push(x.max(y));
    }
    out.extend([m, n]);
    Ok(out)
}

/// Integer matrix product (shapes checked by [`matmul_shape`]), into `out`: exact `i32` sums
/// of zero-point-shifted products, one requantization per value.
pub fn matmul(op: &IntMatMul, a: &[i8], sa: &[usize], b: &[i8], sb: &[usize], out: &mut Vec<i8>) {
    let r = sa.len();
    let (m, k, n) = (sa[r - 2], sa[r - 1], sb[r - 1]);
    let lead: Vec<usize> = sa[..r - 2]
        .iter()
        .zip(&sb[..r - 2])
        .map(|(&x, &y)| x.max(y))
        .collect();
    let count: usize = lead.iter().product();
    // Offset of matrix `t` (row-major index over `lead`) in a tensor of leading axes `s`.
    let offset = |s: &[usize], mut t: usize, size: usize| -> usize {
        let mut at = 0;
        let mut stride = 1;
        for d in (0..lead.len()).rev() {
            let i = t % lead[d];
            t /= lead[d];
            if s[d] != 1 {
                at += i * stride;
            }
            stride *= s[d];
        }
        at * size
    };
    let (za, zb) = (op.a.zero_point, op.b.zero_point);
    out.clear();
    out.reserve(count * m * n);
    let mut bt = vec![0i32; k * n];
    for t in 0..count {
        let pa = &a[offset(&sa[..r - 2], t, m * k)..][..m * k];
        let pb = &b[offset(&sb[..r - 2], t, k * n)..][..k * n];
        // The right matrix transposed and shifted once, then row by row.
        for kk in 0..k {
            for j in 0..n {
                bt[j * k + kk] = pb[kk * n + j] as i32 - zb;
            }
        }
        for i in 0..m {
            let row = &pa[i * k..(i + 1) * k];
            for j in 0..n {
                let col = &bt[j * k..(j + 1) * k];
                let acc: i32 = row
                    .iter()
                    .zip(col)
                    .map(|(&x, &y)| (x as i32 - za) * y)
                    .sum();
                out.push(op.finish(acc));
            }
        }
    }
}

/// Layer normalization over the last axis of `shape` (see
/// [`IntLayerNorm`]), into `out`.
pub fn layer_norm(op: &IntLayerNorm, x: &[i8], shape: &[usize], out: &mut Vec<i8>) {
    let d = shape.last().copied().unwrap_or(1).max(1);
    let (gi, go) = (&op.input, &op.output);
    let eps = op.epsilon as f32;
    out.clear();
    out.reserve(x.len());
    let mut row = vec![0f32; d];
    for chunk in x.chunks(d) {
        for (r, q) in row.iter_mut().zip(chunk) {
            *r = gi.dequantize(*q as i32);
        }
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let denom = (var + eps).sqrt();
        for (k, v) in row.iter().enumerate() {
            let y = (v - mean) / denom * op.gamma[k] + op.beta[k];
            out.push(go.quantize(y) as i8);
        }
    }
}

/// Softmax along `op.axis` of `shape` on the integer grid (see
/// [`IntOp::Softmax`](crate::model::IntOp::Softmax)), into `out`.
pub fn softmax(op: &IntSoftmax, x: &[i8], shape: &[usize], out: &mut Vec<i8>) {
    let len = shape[op.axis];
    let inner: usize = shape[op.axis + 1..].iter().product();
    let outer: usize = shape[..op.axis].iter().product();
    let g = &op.output;
    out.clear();
    out.resize(x.len(), 0);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            let max = (0..len).map(|j| x[at(j)]).max().unwrap_or(0) as i32;
            let e = |j: usize| op.table[(max - x[at(j)] as i32) as usize] as u64;
            let sum: u64 = (0..len).map(e).sum();
            // sum >= table[0] > 0: the maximum is in the row.
            let per_step = sum as f64 * g.scale as f64;
            for j in 0..len {
                let q = (e(j) as f64 / per_step).round_ties_even() as i64 + g.zero_point as i64;
                out[at(j)] = q.clamp(g.qmin as i64, g.qmax as i64) as i8;
            }
        }
    }
}

/// A lookup table on every value, into `out`.
pub fn lut(table: &Lut, x: &[i8], out: &mut Vec<i8>) {
    out.clear();
    out.extend(x.iter().map(|q| table.apply(*q)));
}

/// One table per channel (axis 1 of `shape`): `table[c * 256 + q + 128]`, into `out`.
pub fn channel_lut(table: &Lut, channels: usize, x: &[i8], shape: &[usize], out: &mut Vec<i8>) {
    let inner: usize = shape[2..].iter().product();
    out.clear();
    out.extend(
        x.chunks(inner.max(1))
            .enumerate()
            .flat_map(|(row, values)| {
                let base = (row % channels) * 256;
                values
                    .iter()
                    .map(move |q| table.table[base + (*q as i32 + 128) as usize])
            }),
    );
}

/// Float to 8-bit on `grid` (in parallel chunks when large), into `out`.
pub fn quantize(grid: &Grid, x: &[f32], out: &mut Vec<i8>) {
    let data = sized(out, x.len());
    let chunk = 1 << 14;
    for_each_chunk(data, chunk, |i, dst, _: &mut ()| {
        for (o, v) in dst.iter_mut().zip(&x[i * chunk..]) {
            *o = grid.quantize(*v) as i8;
        }
    });
}

/// `[n, c, h, w]` of a rank-4 shape, or of a rank-3 `[n, c, l]` read as `h = 1`.
pub fn nchw(shape: &[usize]) -> [usize; 4] {
    if shape.len() == 3 {
        [shape[0], shape[1], 1, shape[2]]
    } else {
        [shape[0], shape[1], shape[2], shape[3]]
    }
}

/// The output shape of a pooling window on `shape` (rank 4, or rank 3 with a height-1 window).
pub fn pool_shape(w: &Window, shape: &[usize]) -> Option<Vec<usize>> {
    let one_d = shape.len() == 3;
    if !(shape.len() == 4 || one_d && w.kernel[0] == 1 && w.padding[0] + w.padding[1] == 0) {
        return None;
    }
    let [n, c, h, wd] = nchw(shape);
    let (oh, ow) = pool_hw(w, h, wd)?;
    Some(if one_d {
        vec![n, c, ow]
    } else {
        vec![n, c, oh, ow]
    })
}

/// For every output position of every plane, `f(plane, oy, ox, values in the window)`.
/// The output height and width of the window `w` on an `h x wd` plane.
pub(crate) fn pool_hw(w: &Window, h: usize, wd: usize) -> Option<(usize, usize)> {
    let oh = conv_output_len(
        h,
        w.padding[0] + w.padding[1],
        w.dilation[0],
        w.kernel[0],
        w.stride[0],
    )?;
    let ow = conv_output_len(
        wd,
        w.padding[2] + w.padding[3],
        w.dilation[1],
        w.kernel[1],
        w.stride[1],
    )?;
    Some((oh, ow))
}

fn windows(
    w: &Window,
    x: &[i8],
    shape: &[usize],
    mut f: impl FnMut(&mut dyn Iterator<Item = Option<i8>>) -> i8,
    out: &mut Vec<i8>,
) {
    let [n, c, h, wd] = nchw(shape);
    let (oh, ow) = pool_hw(w, h, wd).expect("shape checked by the runner");
    out.clear();
    for plane in x.chunks(h * wd).take(n * c) {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut it = (0..w.kernel[0]).flat_map(|ky| {
                    (0..w.kernel[1]).map(move |kx| {
                        let iy = (oy * w.stride[0] + ky * w.dilation[0]) as isize
                            - w.padding[0] as isize;
                        let ix = (ox * w.stride[1] + kx * w.dilation[1]) as isize
                            - w.padding[2] as isize;
                        (iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd)
                            .then(|| plane[iy as usize * wd + ix as usize])
                    })
                });
                out.push(f(&mut it));
            }
        }
    }
}

/// Max pooling; padded positions never win (they are `-inf` in the float model). Windows
/// without dilation or begin padding, whose end padding is narrower than the kernel (no
/// padding, the common case, or the end padding of ceil mode), take a row-wise fast path.
pub fn max_pool(w: &Window, x: &[i8], shape: &[usize], out: &mut Vec<i8>) {
    if row_wise(w) {
        return max_pool_valid(w, x, shape, out);
    }
    if let Some(inner) = without_begin_padding(w) {
        thread_local! {
            /// The input with its begin padding written out (kept between calls).
            static PADDED: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let [n, c, h, wd] = nchw(shape);
        let [top, left] = [w.padding[0], w.padding[2]];
        let (ph, pw) = (h + top, wd + left);
        return PADDED.with_borrow_mut(|padded| {
            padded.clear();
            padded.resize(n * c * ph * pw, i8::MIN);
            for (plane, src) in padded.chunks_exact_mut(ph * pw).zip(x.chunks_exact(h * wd)) {
                for (row, src) in plane[top * pw..]
                    .chunks_exact_mut(pw)
                    .zip(src.chunks_exact(wd))
                {
                    row[left..].copy_from_slice(src);
                }
            }
            max_pool_valid(&inner, padded, &[n, c, ph, pw], out)
        });
    }
    windows(w, x, shape, |it| it.flatten().fold(i8::MIN, i8::max), out)
}

/// `w` without its begin padding, for an input with that padding written out as `i8::MIN`
/// (which never wins against the window's part inside the input: every window of a padding
/// narrower than the kernel holds some of the input), when the rest is [`row_wise`]. ResNet's
/// stem pooling (3x3, stride 2, padding 1) takes the row-wise path this way.
fn without_begin_padding(w: &Window) -> Option<Window> {
    let narrower = w.padding[0] < w.kernel[0] && w.padding[2] < w.kernel[1];
    let inner = Window {
        padding: [0, w.padding[1], 0, w.padding[3]],
        ..*w
    };
    (narrower && row_wise(&inner)).then_some(inner)
}

/// Whether [`max_pool_planes`] pools with window `w`: no dilation, no begin padding, end
/// padding narrower than the kernel (so every window starts inside the input; its part past
/// the end is left out).
pub(crate) fn row_wise(w: &Window) -> bool {
    w.dilation == [1, 1]
        && w.padding[0] == 0
        && w.padding[2] == 0
        && w.padding[1] < w.kernel[0]
        && w.padding[3] < w.kernel[1]
}

/// Max pooling with a [`row_wise`] window, one output row at a time: the column-wise max of
/// the window's rows (contiguous, vectorized), then the max along each window's columns.
/// Planes run in parallel in chunks when the tensor is large.
fn max_pool_valid(w: &Window, x: &[i8], shape: &[usize], out: &mut Vec<i8>) {
    thread_local! {
        /// A row's column maxima, kept between calls (no allocation after the first).
        static ROWS_MAX: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let [n, c, h, wd] = nchw(shape);
    let (oh, ow) = pool_hw(w, h, wd).expect("shape checked by the runner");
    let out = sized(out, n * c * oh * ow);
    if out.is_empty() {
        return;
    }
    // Planes per chunk: about 16 KiB of input.
    let planes = ((1 << 14) / (h * wd).max(1)).max(1);
    for_each_chunk(out, planes * oh * ow, |i, dst, _: &mut ()| {
        let first = i * planes;
        let src = &x[first * h * wd..(first + dst.len() / (oh * ow)) * h * wd];
        ROWS_MAX.with_borrow_mut(|rows_max| {
            rows_max.resize(wd, 0);
            max_pool_planes(w, src, [h, wd, oh, ow], rows_max, dst)
        })
    });
}

/// Max pooling with a [`row_wise`] window of whole planes `x` (`[.., h, wd]`) into `out`
/// (`[.., oh, ow]`), with `rows_max` (`wd` values) as scratch.
pub(crate) fn max_pool_planes(
    w: &Window,
    x: &[i8],
    dims: [usize; 4],
    rows_max: &mut [i8],
    out: &mut [i8],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::isa().x86_avx2() {
        // SAFETY: the current instruction set has AVX2 (`Isa::x86_avx2`), and the current
        // choice is always one this CPU runs (`kernels::isa`).
        return unsafe { max_planes_avx2(w, x, dims, rows_max, out) };
    }
    max_planes(w, x, dims, rows_max, out)
}

/// [`max_planes`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn max_planes_avx2(w: &Window, x: &[i8], dims: [usize; 4], rows: &mut [i8], out: &mut [i8]) {
    max_planes(w, x, dims, rows, out)
}

/// `dst[i] = max(row[2i], row[2i + 1])`, sixteen at a time: the odd and even bytes
/// sign-extended to `i16`, their max packed back to bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn pair_max_avx2(row: &[i8], dst: &mut [i8]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(row.len() / 2);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: `2 (i + 16) <= row.len()` and `i + 16 <= dst.len()`.
        let m = unsafe { _mm256_loadu_si256(row.as_ptr().add(2 * i) as *const __m256i) };
        let odd = _mm256_srai_epi16(m, 8);
        let even = _mm256_srai_epi16(_mm256_slli_epi16(m, 8), 8);
        let packed = _mm256_packs_epi16(_mm256_max_epi16(even, odd), _mm256_setzero_si256());
        let bytes = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
        // SAFETY: bytes `i..i + 16 <= dst.len()`.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, bytes) };
        i += 16;
    }
    if i + 8 <= n {
        // SAFETY: `2 (i + 8) <= row.len()` and `i + 8 <= dst.len()`.
        let m = unsafe { _mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i) };
        let odd = _mm_srai_epi16(m, 8);
        let even = _mm_srai_epi16(_mm_slli_epi16(m, 8), 8);
        let packed = _mm_packs_epi16(_mm_max_epi16(even, odd), _mm_setzero_si128());
        // SAFETY: bytes `i..i + 8 <= dst.len()`.
        unsafe { _mm_storel_epi64(dst.as_mut_ptr().add(i) as *mut __m128i, packed) };
        i += 8;
    }
    for (d, pair) in dst[i..n].iter_mut().zip(row[2 * i..].chunks_exact(2)) {
        *d = pair[0].max(pair[1]);
    }
}

/// [`max_pool_valid`] on whole planes `x` (`[.., h, wd]`) into `out` (`[.., oh, ow]`).
#[inline(always)]
fn max_planes(
    w: &Window,
    x: &[i8],
    [h, wd, oh, ow]: [usize; 4],
    rows_max: &mut [i8],
    out: &mut [i8],
) {
    let (kernel, stride) = (w.kernel, w.stride);
    for (plane, dst_plane) in x.chunks(h * wd).zip(out.chunks_mut(oh * ow)) {
        for (oy, dst) in dst_plane.chunks_mut(ow).enumerate() {
            let first = oy * stride[0];
            rows_max.copy_from_slice(&plane[first * wd..(first + 1) * wd]);
            // With end padding the last windows run past the input: their rows inside it.
            for ky in 1..kernel[0].min(h - first) {
                let row = &plane[(first + ky) * wd..(first + ky + 1) * wd];
                for (m, v) in rows_max.iter_mut().zip(row) {
                    *m = (*m).max(*v);
                }
            }
            if kernel[1] == 2 && stride[1] == 2 {
                #[cfg(target_arch = "x86_64")]
                let done = crate::kernels::isa().x86_avx2() && {
                    // SAFETY: the current instruction set has AVX2 (`Isa::x86_avx2`), and the
                    // current choice is always one this CPU runs (`kernels::isa`).
                    unsafe { pair_max_avx2(rows_max, dst) };
                    true
                };
                #[cfg(not(target_arch = "x86_64"))]
                let done = false;
                if !done {
                    for (d, pair) in dst.iter_mut().zip(rows_max.chunks_exact(2)) {
                        *d = pair[0].max(pair[1]);
                    }
                }
                // An odd width with end padding: the last window holds one column.
                if dst.len() > wd / 2 {
                    dst[wd / 2] = rows_max[wd - 1];
                }
            } else {
                // Three wide (ResNet's, SqueezeNet's pooling): the max of every three neighbours
                // in place, one vectorized pass (each write reads only entries after it), then
                // every stride-th; windows that run past the end keep the fold below.
                let full = if kernel[1] == 3 {
                    let full = wd.saturating_sub(2);
                    for i in 0..full {
                        rows_max[i] = rows_max[i].max(rows_max[i + 1]).max(rows_max[i + 2]);
                    }
                    full
                } else {
                    0
                };
                for (ox, d) in dst.iter_mut().enumerate() {
                    let start = ox * stride[1];
                    *d = if start < full {
                        rows_max[start]
                    } else {
                        let window = &rows_max[start..(start + kernel[1]).min(wd)];
                        window.iter().copied().fold(i8::MIN, i8::max)
                    };
                }
            }
        }
    }
}

/// Requantizes `sum` of `count` values from `input` to `out`: `round(sum * s_in / (count *
/// s_out)) + zp_out`, one fixed-point multiplier per distinct count.
struct Averager {
    out: Grid,
    ratio: f64,
    /// The multipliers of the last few window counts, made on first use (a pooling has one
    /// count inside and a few at the borders): no allocation.
    recent: [(usize, FixedMultiplier); 4],
    next: usize,
}

impl Averager {
    fn new(input: &Grid, out: &Grid, _max_count: usize) -> Self {
        let ratio = input.scale as f64 / out.scale as f64;
        Self {
            out: *out,
            ratio,
            recent: [(0, FixedMultiplier::new(ratio)); 4],
            next: 0,
        }
    }

    fn apply(&mut self, sum: i32, count: usize) -> i8 {
        let count = count.max(1);
        let m = match self.recent.iter().find(|(c, _)| *c == count) {
            Some((_, m)) => *m,
            None => {
                let m = FixedMultiplier::new(self.ratio / count as f64);
                self.recent[self.next] = (count, m);
                self.next = (self.next + 1) % self.recent.len();
                m
            }
        };
        (m.apply(sum).saturating_add(self.out.zero_point)).clamp(self.out.qmin, self.out.qmax) as i8
    }
}

/// Average pooling, requantized to `out`.
pub fn avg_pool(
    w: &Window,
    count_include_pad: bool,
    input: &Grid,
    out: &Grid,
    x: &[i8],
    shape: &[usize],
    dst: &mut Vec<i8>,
) {
    let full = w.kernel[0] * w.kernel[1];
    let mut avg = Averager::new(input, out, full);
    let zp = input.zero_point;
    let average = |it: &mut dyn Iterator<Item = Option<i8>>| {
        let (mut sum, mut count) = (0i32, 0usize);
        for v in it.flatten() {
            sum += v as i32 - zp;
            count += 1;
        }
        avg.apply(sum, if count_include_pad { full } else { count })
    };
    windows(w, x, shape, average, dst)
}

/// PyTorch's adaptive window `[start, end)` of output `i` of `out` over `len`.
fn adaptive_range(i: usize, len: usize, out: usize) -> (usize, usize) {
    (i * len / out, ((i + 1) * len).div_ceil(out))
}

/// The two input entries and the weight of the second for output entry `o` of an axis resized
/// from `n_in` to `n_out` entries, as Burn's flex backend computes them (in `f64`).
fn bilinear_tap(o: usize, n_in: usize, n_out: usize, align_corners: bool) -> (usize, usize, f32) {
    let at = if align_corners {
        o as f64 * ((n_in as f64 - 1.0) / (n_out.max(1) - 1).max(1) as f64)
    } else {
        (o as f64 + 0.5) * (n_in as f64 / n_out as f64) - 0.5
    };
    let low = (at.floor().max(0.0) as usize).min(n_in - 1);
    let high = (low + 1).min(n_in - 1);
    (low, high, (at - low as f64).max(0.0) as f32)
}

/// Bilinear resizing of `[n, c, h, w]` (`shape`) to `[n, c, size[0], size[1]]`: each output
/// the four neighbours' dequantized values weighted in `f32` in Burn's order,
/// `a (1 - wx)(1 - wy) + b wx (1 - wy) + c (1 - wx) wy + d wx wy`, quantized to `out`. Planes
/// run in parallel chunks.
pub fn bilinear(
    size: [usize; 2],
    align_corners: bool,
    input: &Grid,
    out: &Grid,
    x: &[i8],
    shape: &[usize],
    dst: &mut Vec<i8>,
) {
    let [n, c, h, wd] = nchw(shape);
    let [oh, ow] = size;
    let data = sized(dst, n * c * oh * ow);
    if data.is_empty() || h == 0 || wd == 0 {
        return;
    }
    let value: Vec<f32> = (-128..128).map(|q| input.dequantize(q)).collect();
    let v = |q: i8| value[(q as i32 + 128) as usize];
    let ys: Vec<_> = (0..oh)
        .map(|o| bilinear_tap(o, h, oh, align_corners))
        .collect();
    let xs: Vec<_> = (0..ow)
        .map(|o| bilinear_tap(o, wd, ow, align_corners))
        .collect();
    let planes = ((1 << 14) / (oh * ow).max(1)).max(1);
    for_each_chunk(data, planes * oh * ow, |i, dst, _: &mut ()| {
        let src = x.chunks(h * wd).skip(i * planes);
        for (plane, dst) in src.zip(dst.chunks_mut(oh * ow)) {
            for (&(y0, y1, wy), dst) in ys.iter().zip(dst.chunks_mut(ow)) {
                let (r0, r1) = (&plane[y0 * wd..][..wd], &plane[y1 * wd..][..wd]);
                for (&(x0, x1, wx), d) in xs.iter().zip(dst.iter_mut()) {
                    let one = 1.0f32;
                    let result = v(r0[x0]) * (one - wx) * (one - wy)
                        + v(r0[x1]) * wx * (one - wy)
                        + v(r1[x0]) * (one - wx) * wy
                        + v(r1[x1]) * wx * wy;
                    *d = out.quantize(result) as i8;
                }
            }
        }
    });
}

/// Adaptive average pooling to `size` (`[1, l]` for rank-3 inputs), requantized to `out`.
pub fn adaptive_avg_pool(
    size: [usize; 2],
    input: &Grid,
    out: &Grid,
    x: &[i8],
    shape: &[usize],
    dst: &mut Vec<i8>,
) {
    let [n, c, h, wd] = nchw(shape);
    let [oh, ow] = size;
    let zp = input.zero_point;
    let data = sized(dst, n * c * oh * ow);
    if data.is_empty() {
        return;
    }
    // Planes in parallel chunks of about 16 KiB of input, each with its own averager.
    let planes = ((1 << 14) / (h * wd).max(1)).max(1);
    for_each_chunk(data, planes * oh * ow, |i, dst, _: &mut ()| {
        let mut avg = Averager::new(input, out, h * wd);
        let first = i * planes;
        let src = x.chunks(h * wd).skip(first);
        for (plane, dst) in src.zip(dst.chunks_mut(oh * ow)) {
            let mut dst = dst.iter_mut();
            for oy in 0..oh {
                let (y0, y1) = adaptive_range(oy, h, oh);
                for ox in 0..ow {
                    let (x0, x1) = adaptive_range(ox, wd, ow);
                    let mut sum = 0i32;
                    for y in y0..y1 {
                        for v in &plane[y * wd + x0..y * wd + x1] {
                            sum += *v as i32 - zp;
                        }
                    }
                    if let Some(d) = dst.next() {
                        *d = avg.apply(sum, (y1 - y0) * (x1 - x0));
                    }
                }
            }
        }
    });
}

/// Mean or sum along `axis` (kept with size 1, as Burn's `mean_dim`), requantized to `out`.
pub fn reduce(
    axis: usize,
    mean: bool,
    input: &Grid,
    out: &Grid,
    x: &[i8],
    shape: &[usize],
    data: &mut Vec<i8>,
) {
    let outer: usize = shape[..axis].iter().product();
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut avg = Averager::new(input, out, len);
    let zp = input.zero_point;
    data.clear();
    for o in 0..outer {
        for i in 0..inner {
            let sum: i32 = (0..len)
                .map(|k| x[(o * len + k) * inner + i] as i32 - zp)
                .sum();
            data.push(avg.apply(sum, if mean { len } else { 1 }));
        }
    }
}

/// Concatenation along `axis` of `count` inputs, `input(k)` giving input `k`'s values, its
/// shape and the table that requantizes it to the output grid (`None`: same grid), into `out`.
pub fn concat<'a>(
    axis: usize,
    count: usize,
    input: impl Fn(usize) -> (&'a [i8], &'a [usize], Option<&'a Lut>),
    out: &mut Vec<i8>,
) {
    out.clear();
    if count == 0 {
        return;
    }
    let outer: usize = input(0).1[..axis].iter().product();
    for o in 0..outer {
        for k in 0..count {
            let (x, s, table) = input(k);
            let chunk: usize = s[axis..].iter().product();
            let part = &x[o * chunk..(o + 1) * chunk];
            match table {
                Some(t) => out.extend(part.iter().map(|q| t.apply(*q))),
                None => out.extend_from_slice(part),
            }
        }
    }
}

/// Axes permuted: output axis `i` is input axis `perm[i]`.
pub fn permute<T: Copy>(perm: &[usize], x: &[T], shape: &[usize], out: &mut Vec<T>) {
    out.clear();
    out.extend((0..x.len()).map(|i| {
        // The output index's coordinates, last axis first; output axis `d` is input axis
        // `perm[d]`, whose stride is the product of the input sizes after it.
        let (mut rest, mut src) = (i, 0);
        for d in (0..perm.len()).rev() {
            let size = shape[perm[d]];
            let stride: usize = shape[perm[d] + 1..].iter().product();
            src += (rest % size) * stride;
            rest /= size;
        }
        x[src]
    }));
}

/// The entries `indices` of axis `axis` of `x` (of shape `shape`), in that order: a copy of
/// `indices.len()` runs of the axis' inner size per outer index.
pub fn select<T: Copy>(axis: usize, indices: &[usize], x: &[T], shape: &[usize], out: &mut Vec<T>) {
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    let block = shape[axis] * inner;
    out.clear();
    for o in 0..outer {
        for &i in indices {
            let start = o * block + i * inner;
            out.extend_from_slice(&x[start..start + inner]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn select_equals_the_coordinate_definition(
            dims in proptest::collection::vec(1usize..5, 2..5),
            axis_seed in any::<usize>(),
            picks in proptest::collection::vec(any::<usize>(), 1..7),
        ) {
            let axis = 1 + axis_seed % (dims.len() - 1);
            let indices: Vec<usize> = picks.iter().map(|p| p % dims[axis]).collect();
            let x: Vec<i32> = (0..dims.iter().product::<usize>() as i32).collect();
            let mut out = vec![9; 2];
            select(axis, &indices, &x, &dims, &mut out);
            let mut shape = dims.clone();
            shape[axis] = indices.len();
            prop_assert_eq!(out.len(), shape.iter().product::<usize>());
            for (flat, v) in out.iter().enumerate() {
                // The output coordinates, last axis first; the input's differ on `axis` only.
                let (mut rest, mut src, mut stride) = (flat, 0, 1);
                for d in (0..shape.len()).rev() {
                    let c = rest % shape[d];
                    rest /= shape[d];
                    src += if d == axis { indices[c] } else { c } * stride;
                    stride *= dims[d];
                }
                prop_assert_eq!(*v, x[src]);
            }
        }

        #[test]
        fn fast_max_pool_equals_the_window_definition(
            n in 1usize..3, c in 1usize..4, h in 2usize..9, w in 2usize..9,
            kh in 1usize..4, kw in 1usize..4, sh in 1usize..3, sw in 1usize..3,
            seed in any::<u64>(),
        ) {
            prop_assume!(kh <= h && kw <= w);
            // End padding narrower than the kernel (ceil mode's), or none; begin padding
            // narrower than the kernel (ResNet's stem pooling) every other case.
            let (eh, ew) = ((seed % 7) as usize % kh, (seed / 7 % 7) as usize % kw);
            let (bh, bw) = if seed % 2 == 0 { (0, 0) } else { ((seed / 49) as usize % kh, (seed / 343) as usize % kw) };
            let win = Window { kernel: [kh, kw], stride: [sh, sw], padding: [bh, eh, bw, ew], dilation: [1, 1] };
            prop_assert!(row_wise(&win) || without_begin_padding(&win).is_some());
            let shape = [n, c, h, w];
            let x: Vec<i8> = (0..n * c * h * w)
                .map(|i| (seed.wrapping_mul(6364136223846793005).wrapping_add((i as u64).wrapping_mul(1442695040888963407)) >> 56) as i8)
                .collect();
            let mut slow = Vec::new();
            windows(&win, &x, &shape, |it| it.flatten().fold(i8::MIN, i8::max), &mut slow);
            let mut fast = vec![7; 3];
            max_pool(&win, &x, &shape, &mut fast);
            prop_assert_eq!(fast, slow);
        }
    }
}
