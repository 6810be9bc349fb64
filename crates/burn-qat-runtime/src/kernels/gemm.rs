//! The u8 x i8 -> i32 matrix product under every convolution and linear layer, on 4-byte
//! words: a word holds four consecutive values of the reduction axis, and one step multiplies a
//! broadcast word of the left operand with sixteen words of the right operand (`vpdpbusd`, four
//! multiply-adds per lane). The left operand is read in place (`a[m * a_row + k]`) and the right
//! one through a per-word row offset (`b[b_off[k] + n]`), so a convolution reads its input image
//! directly (each `k` one kernel tap of four channels) instead of copying an im2col matrix.
//!
//! One operand is unsigned (`u8`: activations as `int8 + 128`), the other signed (`i8`:
//! weights); callers subtract the zero point through the bias. Arithmetic wraps modulo 2^32, as
//! `vpdpbusd` does: the product is exact whenever the true result fits in `i32`, which
//! validation guarantees (`accumulator_bound`).
//!
//! Two implementations with one result: AVX-512 VNNI tiles chosen at run time, and portable
//! loops (any CPU; [`force_portable`] selects them so tests cover both on one machine).

use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows of a tile of the blocked kernel.
pub(crate) const MR: usize = 8;
/// Vectors of 16 lanes of a tile of the blocked kernel (`MR x 16 NR` accumulators).
pub(crate) const NR: usize = 3;
/// Vectors of a one-row tile (matrix-vector products).
pub(crate) const NR_ROW: usize = 8;

static PORTABLE: AtomicBool = AtomicBool::new(false);

/// Makes every integer matrix product of this process use the portable loops instead of the
/// AVX-512 VNNI tiles (`false` restores the run-time choice). For tests and benchmarks: both
/// give the same bits.
pub fn force_portable(portable: bool) {
    PORTABLE.store(portable, Ordering::Relaxed);
}

/// Whether products run on the AVX-512 VNNI tiles (the CPU has them and
/// [`force_portable`] is off).
pub fn uses_vnni() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    !PORTABLE.load(Ordering::Relaxed) && *DETECTED.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// The operands of one product `C[m][n] = sum_k dot4(A[m][k], B[k][n])`.
pub(crate) struct Words<'a> {
    /// Left words: row `m`, word `k` at `a[m * a_row + k]`.
    pub a: &'a [u32],
    pub a_row: usize,
    /// Right words: word `k`, lane `n` at `b[b_off[k] + n]`; `b_off.len()` is the reduction
    /// length in words.
    pub b: &'a [u32],
    pub b_off: &'a [usize],
    /// `true`: left bytes are `i8` and right bytes `u8` (convolutions: weights times image);
    /// `false`: left `u8`, right `i8` (linear layers: activations times weights).
    pub a_signed: bool,
    /// Added to every product.
    pub bias: Bias<'a>,
}

/// The bias a product starts from.
#[derive(Clone, Copy)]
pub(crate) enum Bias<'a> {
    /// One value per row `m` (convolutions: per output channel).
    Rows(&'a [i32]),
    /// One value per lane `n` (linear layers: per output feature), readable up to the lane
    /// range rounded up to 16.
    Lanes(&'a [i32]),
}

/// `C[m][n]` for `m` in `rows`, `n` in `lanes`, stored to
/// `out[(m - rows.start) * row_stride + n - lanes.start]`. Whole tiles are stored: each row's
/// lanes run to the next multiple of 16 (`row_stride` leaves room for them). Tiles are
/// `MR x 16 NR`, or one row of `16 NR_ROW` lanes for a single row (a matrix-vector product).
///
/// # Panics
/// If the operands or `out` are shorter than `rows`, `lanes` and `b_off` say (a caller's bug:
/// the unchecked loads and stores rely on it).
pub(crate) fn product(
    w: &Words,
    rows: Range<usize>,
    lanes: Range<usize>,
    out: &mut [i32],
    row_stride: usize,
) {
    let k4 = w.b_off.len();
    if rows.is_empty() || lanes.is_empty() {
        return;
    }
    // Checked arithmetic: these bounds guard the unchecked loads and stores below for any
    // arguments.
    let fits = |a: Option<usize>, len: usize| a.is_some_and(|a| a <= len);
    let width = lanes.len().next_multiple_of(16);
    let lanes_end16 = lanes.start.checked_add(width);
    assert!(k4 > 0 && w.a_row >= k4);
    assert!(fits(
        (rows.end - 1)
            .checked_mul(w.a_row)
            .and_then(|a| a.checked_add(k4)),
        w.a.len()
    ));
    assert!(
        w.b_off
            .iter()
            .all(|o| fits(lanes_end16.and_then(|e| e.checked_add(*o)), w.b.len()))
    );
    assert!(match w.bias {
        Bias::Rows(b) => b.len() >= rows.end,
        Bias::Lanes(b) => fits(lanes_end16, b.len()),
    });
    assert!(row_stride >= width);
    assert!(fits(
        (rows.len() - 1)
            .checked_mul(row_stride)
            .and_then(|a| a.checked_add(width)),
        out.len()
    ));
    let (mr, nr) = if rows.len() == 1 {
        (1, NR_ROW)
    } else {
        (MR, NR)
    };
    let vnni = uses_vnni();
    let mut n0 = lanes.start;
    while n0 < lanes.end {
        let nv = nr.min((lanes.end - n0).div_ceil(16));
        let mut m0 = rows.start;
        while m0 < rows.end {
            let mv = mr.min(rows.end - m0);
            let at = (m0 - rows.start) * row_stride + (n0 - lanes.start);
            if vnni {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has the features (`uses_vnni`); the asserts above bound every
                // access: rows `m0..m0 + mv` of `a` hold `k4` words, each `b_off[k] + n0 + 16 nv
                // <= b_off[k] + lanes_end16 <= b.len()`, the bias covers rows `..rows.end` or
                // lanes `..lanes_end16`, and `out` holds `at + (mv - 1) * row_stride + 16 nv`.
                unsafe {
                    x86::tile(mv, nv, w, m0, n0, &mut out[at..], row_stride)
                };
            } else {
                portable_tile(w, m0, mv, n0, nv, &mut out[at..], row_stride);
            }
            m0 += mv;
        }
        n0 += nv * 16;
    }
}

/// One tile, in portable Rust: rows `m0..m0 + mv`, lanes `n0..n0 + 16 nv`, row `i` into
/// `out[i * row_stride..]`.
fn portable_tile(
    w: &Words,
    m0: usize,
    mv: usize,
    n0: usize,
    nv: usize,
    out: &mut [i32],
    row_stride: usize,
) {
    let lanes = nv * 16;
    let k4 = w.b_off.len();
    for i in 0..mv {
        let out = &mut out[i * row_stride..i * row_stride + lanes];
        match w.bias {
            Bias::Rows(b) => out.fill(b[m0 + i]),
            Bias::Lanes(b) => out.copy_from_slice(&b[n0..n0 + lanes]),
        }
        let a_row = &w.a[(m0 + i) * w.a_row..][..k4];
        for (aw, off) in a_row.iter().zip(w.b_off) {
            let ab = aw.to_le_bytes();
            let b_row = &w.b[off + n0..][..lanes];
            for (o, bw) in out.iter_mut().zip(b_row) {
                let bb = bw.to_le_bytes();
                let mut s = 0i32;
                for j in 0..4 {
                    s += if w.a_signed {
                        ab[j] as i8 as i32 * bb[j] as i32
                    } else {
                        ab[j] as i32 * bb[j] as i8 as i32
                    };
                }
                *o = o.wrapping_add(s);
            }
        }
    }
}

/// `dst[x]` = the word of `rows[0][x], .., rows[3][x]` (byte `j` from row `j`), each byte
/// `int8 + 128`. Rows are as long as `dst`.
pub(crate) fn interleave4(rows: [&[i8]; 4], dst: &mut [u32]) {
    assert!(rows.iter().all(|r| r.len() == dst.len()));
    #[cfg(target_arch = "x86_64")]
    if uses_vnni() {
        // SAFETY: the CPU has AVX-512 BW/VL (`uses_vnni`); every row is as long as `dst`.
        unsafe { x86::interleave4(rows, dst) };
        return;
    }
    for (x, d) in dst.iter_mut().enumerate() {
        *d = u32::from_le_bytes([
            rows[0][x] as u8 ^ 0x80,
            rows[1][x] as u8 ^ 0x80,
            rows[2][x] as u8 ^ 0x80,
            rows[3][x] as u8 ^ 0x80,
        ]);
    }
}

/// `int8` values as `u8` words (`int8 + 128`, four per word) appended to `dst`, the last word
/// padded with 128 (`int8` 0; it meets zero weights).
pub(crate) fn unsigned_words(x: &[i8], dst: &mut Vec<u32>) {
    let mut chunks = x.chunks_exact(4);
    dst.extend(chunks.by_ref().map(|c| {
        u32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8]) ^ 0x8080_8080
    }));
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut b = [0x80; 4];
        for (d, v) in b.iter_mut().zip(rest) {
            *d = *v as u8 ^ 0x80;
        }
        dst.push(u32::from_le_bytes(b));
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Bias, Words};
    use std::arch::x86_64::*;

    /// Dispatches one tile to its monomorphized kernel.
    ///
    /// # Safety
    /// As [`super::product`]'s SAFETY note: features present, loads in bounds.
    pub(super) unsafe fn tile(
        mv: usize,
        nv: usize,
        w: &Words,
        m0: usize,
        n0: usize,
        out: &mut [i32],
        row_stride: usize,
    ) {
        let a = unsafe { w.a.as_ptr().add(m0 * w.a_row) };
        let b = unsafe { w.b.as_ptr().add(n0) };
        let bias = match w.bias {
            Bias::Rows(v) => (unsafe { v.as_ptr().add(m0) }, true),
            Bias::Lanes(v) => (unsafe { v.as_ptr().add(n0) }, false),
        };
        let args = (
            w.b_off.len(),
            a,
            w.a_row,
            b,
            w.b_off.as_ptr(),
            bias,
            (out.as_mut_ptr(), row_stride),
        );
        macro_rules! pick {
            ($($m:literal, $n:literal);*) => {
                match (mv, nv, w.a_signed) {
                    $(
                        ($m, $n, true) => unsafe { kernel::<$m, $n, true>(args) },
                        ($m, $n, false) => unsafe { kernel::<$m, $n, false>(args) },
                    )*
                    _ => unreachable!("tile shapes are at most MR x NR or 1 x NR_ROW"),
                }
            };
        }
        pick!(
            1, 1; 1, 2; 1, 3; 1, 4; 1, 5; 1, 6; 1, 7; 1, 8;
            2, 1; 2, 2; 2, 3; 3, 1; 3, 2; 3, 3; 4, 1; 4, 2; 4, 3;
            5, 1; 5, 2; 5, 3; 6, 1; 6, 2; 6, 3; 7, 1; 7, 2; 7, 3;
            8, 1; 8, 2; 8, 3
        )
    }

    /// `(k4, a, a_row, b, b_off, (bias, per row), (out, row_stride))`.
    type Args = (
        usize,
        *const u32,
        usize,
        *const u32,
        *const usize,
        (*const i32, bool),
        (*mut i32, usize),
    );

    /// `M x N` tile: `M` broadcast left words against `N` vectors of right words per step.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn kernel<const M: usize, const N: usize, const A_SIGNED: bool>(
        (k4, a, a_row, b, b_off, (bias, per_row), (out, row_stride)): Args,
    ) {
        let mut acc = [[_mm512_setzero_si512(); N]; M];
        for (i, row) in acc.iter_mut().enumerate() {
            for (j, c) in row.iter_mut().enumerate() {
                *c = if per_row {
                    _mm512_set1_epi32(unsafe { *bias.add(i) })
                } else {
                    unsafe { _mm512_loadu_si512(bias.add(16 * j) as *const _) }
                };
            }
        }
        for k in 0..k4 {
            let bp = unsafe { b.add(*b_off.add(k)) };
            let mut bv = [_mm512_setzero_si512(); N];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = unsafe { _mm512_loadu_si512(bp.add(16 * j) as *const _) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(unsafe { *a.add(i * a_row + k) } as i32);
                for (c, v) in row.iter_mut().zip(&bv) {
                    *c = if A_SIGNED {
                        _mm512_dpbusd_epi32(*c, *v, av)
                    } else {
                        _mm512_dpbusd_epi32(*c, av, *v)
                    };
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                unsafe { _mm512_storeu_si512(out.add(i * row_stride + j * 16) as *mut _, *v) };
            }
        }
    }

    /// [`super::interleave4`], sixteen words per step.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn interleave4(rows: [&[i8]; 4], dst: &mut [u32]) {
        let flip = _mm_set1_epi8(-128);
        let mut x = 0;
        while x < dst.len() {
            let n = (dst.len() - x).min(16);
            let bytes: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
            macro_rules! load {
                ($r:expr) => {
                    _mm_xor_si128(
                        unsafe { _mm_maskz_loadu_epi8(bytes, $r.as_ptr().add(x)) },
                        flip,
                    )
                };
            }
            let (r0, r1, r2, r3) = (
                load!(rows[0]),
                load!(rows[1]),
                load!(rows[2]),
                load!(rows[3]),
            );
            let (lo01, hi01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
            let (lo23, hi23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
            let words = [
                _mm_unpacklo_epi16(lo01, lo23),
                _mm_unpackhi_epi16(lo01, lo23),
                _mm_unpacklo_epi16(hi01, hi23),
                _mm_unpackhi_epi16(hi01, hi23),
            ];
            for (q, v) in words.iter().enumerate() {
                let start = 4 * q;
                if start >= n {
                    break;
                }
                let m: __mmask8 = ((1u16 << (n - start).min(4)) - 1) as u8;
                unsafe {
                    _mm_mask_storeu_epi32(dst.as_mut_ptr().add(x + start) as *mut i32, m, *v)
                };
            }
            x += 16;
        }
    }
}
