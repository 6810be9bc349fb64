//! [`Isa::Avx512Vnni`](super::Isa::Avx512Vnni): the word GEMM on `8 x 48` tiles of `vpdpbusd`
//! (512-bit), [`interleave4`](super::gemm::interleave4) sixteen words per step, and the direct
//! depthwise kernel with VBMI (`vpermb`). A value of [`Avx512`] or [`Avx512Depthwise`] exists
//! only where the CPU has the features its code needs ([`get`], [`depthwise`]): that is what
//! makes their safe methods sound.

use std::arch::x86_64::*;
use std::ops::Range;

use super::depthwise::{Depthwise, Plane};
use super::gemm::{Bias, Gemm, MR, Words, lane_blocks, row_blocks};
use super::isa;

/// Vectors of 16 lanes of a tile (`MR x 16 NR` accumulators).
const NR: usize = 3;
/// Vectors of a one-row tile (matrix-vector products).
const NR_ROW: usize = 8;

/// The AVX-512 VNNI GEMM; only [`get`] makes one.
pub(super) struct Avx512(());

static AVX512: Avx512 = Avx512(());

/// The AVX-512 VNNI GEMM, where the CPU has AVX-512 F, BW, VL and VNNI.
pub(super) fn get() -> Option<&'static Avx512> {
    isa::cpu().avx512_vnni.then_some(&AVX512)
}

impl Gemm for Avx512 {
    unsafe fn product(
        &self,
        w: &Words,
        rows: Range<usize>,
        lanes: Range<usize>,
        out: &mut [i32],
        row_stride: usize,
    ) {
        let (mr, nr) = if rows.len() == 1 {
            (1, NR_ROW)
        } else {
            (MR, NR)
        };
        for (n0, nv) in lane_blocks(lanes.clone(), nr) {
            for (m0, mv) in row_blocks(rows.clone(), mr) {
                let at = (m0 - rows.start) * row_stride + (n0 - lanes.start);
                // SAFETY: `self` exists only where the CPU has the features (`get`); the
                // caller's bounds (`gemm::product`) cover every access: rows `m0..m0 + mv` of
                // `a` hold `k4` words, each `b_off[k] + n0 + 16 nv <= b.len()`, the bias
                // covers rows `..rows.end` or lanes `..lanes.start + width`, and `out` holds
                // `at + (mv - 1) * row_stride + 16 nv`.
                unsafe { tile(mv, nv, w, m0, n0, &mut out[at..], row_stride) };
            }
        }
    }

    unsafe fn interleave4(&self, rows: [&[i8]; 4], dst: &mut [u32]) {
        // SAFETY: `self` exists only where the CPU has AVX-512 BW and VL (`get`); the caller
        // makes every row at least as long as `dst`.
        unsafe { interleave4(rows, dst) }
    }

    fn unsigned_words(&self, x: &[i8], dst: &mut Vec<u32>) {
        // SAFETY: `self` exists only where the CPU has AVX-512 F and BW (`get`).
        unsafe { unsigned_words(x, dst) }
    }
}

/// [`super::gemm::unsigned_words_portable`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unsigned_words(x: &[i8], dst: &mut Vec<u32>) {
    super::gemm::unsigned_words_portable(x, dst)
}

/// Dispatches one tile to its monomorphized kernel.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; rows `m0..m0 + mv` of `w.a` hold `b_off.len()` words
/// from `m0 * a_row`, `w.b` holds `16 nv` words from every `b_off[k] + n0`, the bias holds rows
/// `m0..m0 + mv` or lanes `n0..n0 + 16 nv`, and `out` holds `(mv - 1) * row_stride + 16 nv`
/// values.
unsafe fn tile(
    mv: usize,
    nv: usize,
    w: &Words,
    m0: usize,
    n0: usize,
    out: &mut [i32],
    row_stride: usize,
) {
    // SAFETY: in bounds of `w.a` (the caller's first condition).
    let a = unsafe { w.a.as_ptr().add(m0 * w.a_row) };
    // SAFETY: `n0 <= b_off[k] + n0 <= w.b.len()` (the second).
    let b = unsafe { w.b.as_ptr().add(n0) };
    let bias = match w.bias {
        // SAFETY: row `m0` is in the bias (the third).
        Bias::Rows(v) => (unsafe { v.as_ptr().add(m0) }, true),
        // SAFETY: lane `n0` is in the bias (the third).
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
                    // SAFETY: the caller's conditions are the kernel's.
                    ($m, $n, true) => unsafe { kernel::<$m, $n, true>(args) },
                    // SAFETY: as above.
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
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `a + i * a_row + k` for `i < M`, `k < k4`, the `16 N`
/// words from each `b + b_off[k]`, the bias (`M` rows or `16 N` lanes) and the `16 N` values
/// from each `out + i * row_stride` are in bounds.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const M: usize, const N: usize, const A_SIGNED: bool>(
    (k4, a, a_row, b, b_off, (bias, per_row), (out, row_stride)): Args,
) {
    let mut acc = [[_mm512_setzero_si512(); N]; M];
    for (i, row) in acc.iter_mut().enumerate() {
        for (j, c) in row.iter_mut().enumerate() {
            *c = if per_row {
                // SAFETY: row `i < M` of the bias.
                _mm512_set1_epi32(unsafe { *bias.add(i) })
            } else {
                // SAFETY: lanes `16 j..16 j + 16 <= 16 N` of the bias.
                unsafe { _mm512_loadu_si512(bias.add(16 * j) as *const _) }
            };
        }
    }
    for k in 0..k4 {
        // SAFETY: `k < k4` offsets, each in bounds of `b` with `16 N` words after it.
        let bp = unsafe { b.add(*b_off.add(k)) };
        let mut bv = [_mm512_setzero_si512(); N];
        for (j, v) in bv.iter_mut().enumerate() {
            // SAFETY: words `16 j..16 j + 16` from `bp`.
            *v = unsafe { _mm512_loadu_si512(bp.add(16 * j) as *const _) };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: word `k` of row `i < M` of `a`.
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
            // SAFETY: values `16 j..16 j + 16` of output row `i < M`.
            unsafe { _mm512_storeu_si512(out.add(i * row_stride + j * 16) as *mut _, *v) };
        }
    }
}

/// [`super::gemm::interleave4`], sixteen words per step.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; every row is at least as long as `dst`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn interleave4(rows: [&[i8]; 4], dst: &mut [u32]) {
    let flip = _mm_set1_epi8(-128);
    let mut x = 0;
    while x < dst.len() {
        let n = (dst.len() - x).min(16);
        let bytes: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
        macro_rules! load {
            ($r:expr) => {
                _mm_xor_si128(
                    // SAFETY: the mask reads bytes `x..x + n` of a row at least as long as
                    // `dst`.
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
            // SAFETY: the mask writes words `x + start..x + min(n, start + 4)` of `dst`.
            unsafe { _mm_mask_storeu_epi32(dst.as_mut_ptr().add(x + start) as *mut i32, m, *v) };
        }
        x += 16;
    }
}

/// The direct depthwise kernel on VNNI with VBMI; only [`depthwise`] makes one.
pub(super) struct Avx512Depthwise(());

static DEPTHWISE: Avx512Depthwise = Avx512Depthwise(());

/// The direct depthwise kernel, where the CPU has AVX-512 VNNI and VBMI.
pub(super) fn depthwise() -> Option<&'static Avx512Depthwise> {
    isa::cpu().avx512_vbmi.then_some(&DEPTHWISE)
}

impl Depthwise for Avx512Depthwise {
    /// Sixteen outputs' windows in one 64-byte load: `15 sw + 3 dw < 64`.
    fn supports(&self, g: &Plane, _groups: usize) -> bool {
        g.stride[1]
            .checked_mul(15)
            .and_then(|s| g.dilation[1].checked_mul(3).and_then(|d| s.checked_add(d)))
            .is_some_and(|span| span < 64)
    }

    fn plane(
        &self,
        padded: &[u8],
        words: &[u32],
        groups: usize,
        bias: i32,
        g: &Plane,
        out: &mut [i32],
    ) {
        assert!(self.supports(g, groups));
        assert!(out.len() >= g.oh * g.ow && words.len() >= g.kh * groups);
        assert!(g.reach(groups, 16, 64).is_some_and(|r| r <= padded.len()));
        // SAFETY: `self` exists only where the CPU has the features (`depthwise`); every load
        // ends before `reach <= padded.len()`, the permutation indices `15 sw + 3 dw` are
        // below 64 (`supports`), the weights hold `kh * groups` words and stores are masked to
        // `oh * ow <= out.len()` (all asserted above).
        unsafe { plane(padded, words, groups, bias, g, out) }
    }
}

/// Per output row, sixteen outputs at a time: one 64-byte load of a padded input row per kernel
/// row and group of four taps, `vpermb` to lay each output's four taps side by side
/// (`x[l sw + j dw]` in lane `l`, byte `j`), one `vpdpbusd` against the four weights.
///
/// # Safety
/// As [`Avx512Depthwise::plane`] asserts: the CPU has AVX-512 F, BW, VNNI and VBMI, and the
/// loads, indices, weights and stores are in bounds.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn plane(
    padded: &[u8],
    words: &[u32],
    groups: usize,
    bias: i32,
    g: &Plane,
    out: &mut [i32],
) {
    let [sh, sw] = g.stride;
    let [dh, dw] = g.dilation;
    let mut index = [0u8; 64];
    for (i, v) in index.iter_mut().enumerate() {
        *v = ((i / 4) * sw + (i % 4) * dw) as u8;
    }
    // SAFETY: 64 bytes of a local array.
    let index = unsafe { _mm512_loadu_si512(index.as_ptr() as *const _) };
    let bias = _mm512_set1_epi32(bias);
    for oy in 0..g.oh {
        let mut ox = 0;
        while ox < g.ow {
            let n = (g.ow - ox).min(16);
            let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
            let mut acc = bias;
            for ky in 0..g.kh {
                let row = (oy * sh + ky * dh) * g.pw + ox * sw;
                for q in 0..groups {
                    let at = row + 4 * q * dw;
                    // SAFETY: `at + 64 <= reach <= padded.len()` (`Plane::reach` with blocks of
                    // sixteen and 64-byte loads).
                    let v = unsafe { _mm512_loadu_si512(padded.as_ptr().add(at) as *const _) };
                    let x = _mm512_permutexvar_epi8(index, v);
                    let w = _mm512_set1_epi32(words[ky * groups + q] as i32);
                    acc = _mm512_dpbusd_epi32(acc, x, w);
                }
            }
            // SAFETY: the mask writes outputs `oy * ow + ox..oy * ow + ox + n <= oh * ow`.
            unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add(oy * g.ow + ox), mask, acc) };
            ox += 16;
        }
    }
}
