//! [`Isa::Avx2`](super::Isa::Avx2) and [`Isa::AvxVnni`](super::Isa::AvxVnni): the word GEMM
//! on `4 x 16` tiles of 256-bit vectors (`6 x 16` with AVX-VNNI),
//! [`interleave4`](super::gemm::interleave4) sixteen words per step, and the direct depthwise
//! kernel (`vpshufb` lays four outputs' four taps side by side from sixteen bytes). One step
//! multiplies a `u8` word with an `i8` word lane by lane in one of three ways, all exact:
//!
//! - AVX-VNNI: `vpdpbusd` (256-bit), as on AVX-512;
//! - `vpmaddubsw` (`u8 x i8` pairs summed to `i16`, saturating) then `vpmaddwd` with ones (to
//!   `i32`): exact only when no pair sum can leave `i16`, that is when every pair of weights has
//!   `|w0| + |w1| <= 128` ([`pairs_fit_i16`](super::gemm::pairs_fit_i16), decided when the
//!   weights are packed, or per channel for depthwise layers);
//! - otherwise widening: the even and odd bytes of both words as 16-bit halves (`vpand` /
//!   `vpsrlw`, `vpsllw` / `vpsraw`), two `vpmaddwd`. The left operand's halves are made once per
//!   row tile ([`widen`]), `KC` words at a time; the depthwise kernel shuffles the taps straight
//!   into halves (two `vpshufb`).
//!
//! Two `vpmaddwd` (or `vpmaddubsw` + `vpmaddwd`) per 32 multiply-adds on the two vector
//! multiply ports make AVX2 about 2.5 to 3 times slower than AVX-512 VNNI's one `vpdpbusd` per
//! 64 on compute-bound layers; AVX-VNNI is about 1.5 times slower.
//!
//! A value of [`Avx2`] exists only where the CPU has what its code needs ([`get`]): that is
//! what makes its safe methods sound.

use std::arch::x86_64::*;
use std::ops::Range;

use super::depthwise::{Depthwise, Plane};
use super::gemm::{self, Bias, Gemm, Words, lane_blocks, row_blocks};
use super::isa;

/// Rows of a tile (`MR x 16` lanes: eight accumulators, the right words' halves and the left
/// word's in the sixteen registers).
const MR: usize = 4;
/// Rows of an AVX-VNNI tile (twelve accumulators: more products in flight).
const MR_VNNI: usize = 6;
/// Vectors of 16 lanes of a one-row tile (a row tile has one).
const NR_ROW: usize = 4;
/// Words of the reduction widened at a time (exact mode): the tile's halves stay in L1.
const KC: usize = 256;
/// Weight words per channel (`kh * groups`) of the direct depthwise kernel, held in registers or
/// on the stack.
const MAX_TAP_WORDS: usize = 32;

/// How a step multiplies `u8` words with `i8` words.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 16-bit halves, `vpmaddwd`.
    Exact,
    /// `vpmaddubsw` + `vpmaddwd` with ones (weights whose pairs fit in `i16`).
    Maddubs,
    /// `vpdpbusd` (AVX-VNNI).
    Vnni,
}

/// The AVX2 kernels, with AVX-VNNI where `vnni`; only [`get`] hands one out.
pub(super) struct Avx2 {
    vnni: bool,
}

static AVX2: Avx2 = Avx2 { vnni: false };
static AVX_VNNI: Avx2 = Avx2 { vnni: true };

/// The AVX2 kernels (`vnni`: with AVX-VNNI), where the CPU has them.
pub(super) fn get(vnni: bool) -> Option<&'static Avx2> {
    let cpu = isa::cpu();
    if vnni {
        cpu.avx_vnni.then_some(&AVX_VNNI)
    } else {
        cpu.avx2.then_some(&AVX2)
    }
}

impl Avx2 {
    fn mode(&self, pairs_fit_i16: bool) -> Mode {
        if self.vnni {
            Mode::Vnni
        } else if pairs_fit_i16 {
            Mode::Maddubs
        } else {
            Mode::Exact
        }
    }
}

/// One tile's operands: `k` words of the reduction, rows of `a` every `a_row` words (exact
/// mode: the even halves, the odd ones `odd` words after them), `b + b_off[k]`, the bias
/// (`first` pass) or the partial sums in `out` (later passes).
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const u32,
    a_row: usize,
    odd: usize,
    b: *const u32,
    b_off: *const usize,
    bias: *const i32,
    per_row: bool,
    first: bool,
    out: *mut i32,
    row_stride: usize,
}

impl Gemm for Avx2 {
    unsafe fn product(
        &self,
        w: &Words,
        rows: Range<usize>,
        lanes: Range<usize>,
        out: &mut [i32],
        row_stride: usize,
    ) {
        let mode = self.mode(w.pairs_fit_i16);
        let k4 = w.b_off.len();
        let (mr, nr) = match (rows.len() == 1, mode) {
            (true, _) => (1, NR_ROW),
            (false, Mode::Vnni) => (MR_VNNI, 1),
            (false, _) => (MR, 1),
        };
        // Exact mode: a row tile's left words as halves, `KC` words at a time: row `i`'s even
        // halves at `halves[2 i KC..]`, its odd ones `KC` words later.
        let mut halves = [0u32; 2 * MR * KC];
        for (m0, mv) in row_blocks(rows.clone(), mr) {
            let mut k0 = 0;
            while k0 < k4 {
                let kc = if mode == Mode::Exact {
                    KC.min(k4 - k0)
                } else {
                    k4
                };
                let (a, a_row, odd) = if mode == Mode::Exact {
                    for i in 0..mv {
                        let words = &w.a[(m0 + i) * w.a_row + k0..][..kc];
                        let (even, odd) = halves[2 * i * KC..(2 * i + 2) * KC].split_at_mut(KC);
                        // SAFETY: `self` exists only where the CPU has AVX2 (`get`).
                        unsafe { widen(words, w.a_signed, &mut even[..kc], &mut odd[..kc]) };
                    }
                    (halves.as_ptr(), 2 * KC, KC)
                } else {
                    (w.a[m0 * w.a_row..].as_ptr(), w.a_row, 0)
                };
                for (n0, nv) in lane_blocks(lanes.clone(), nr) {
                    let at = (m0 - rows.start) * row_stride + (n0 - lanes.start);
                    let (bias, per_row) = match w.bias {
                        Bias::Rows(b) => (b[m0..].as_ptr(), true),
                        Bias::Lanes(b) => (b[n0..].as_ptr(), false),
                    };
                    let t = Tile {
                        k: kc,
                        a,
                        a_row,
                        odd,
                        b: w.b[n0..].as_ptr(),
                        b_off: w.b_off[k0..].as_ptr(),
                        bias,
                        per_row,
                        first: k0 == 0,
                        out: out[at..].as_mut_ptr(),
                        row_stride,
                    };
                    // SAFETY: `self` exists only where the CPU has AVX2, and AVX-VNNI when
                    // `vnni` (`get`). The caller's bounds (`gemm::product`) cover the tile: rows
                    // `m0..m0 + mv` of `a` hold words `k0..k0 + kc` (exact mode: `halves` holds
                    // `kc` of each row's even and odd halves), `16 nv` words from each
                    // `b_off[k] + n0` are in `b`, the bias covers rows `..rows.end` or 16-lane
                    // blocks of `lanes`, and `out` holds `at + (mv - 1) * row_stride + 16 nv`.
                    unsafe { tile(mode, mv, nv, w.a_signed, t) };
                }
                k0 += kc;
            }
        }
    }

    unsafe fn interleave4(&self, rows: [&[i8]; 4], dst: &mut [u32]) {
        // SAFETY: `self` exists only where the CPU has AVX2 (`get`); the caller makes every row
        // at least as long as `dst`.
        unsafe { interleave4(rows, dst) }
    }

    fn unsigned_words(&self, x: &[i8], dst: &mut Vec<u32>) {
        // SAFETY: `self` exists only where the CPU has AVX2 (`get`).
        unsafe { unsigned_words(x, dst) }
    }
}

/// [`super::gemm::unsigned_words_portable`] compiled for AVX2.
#[target_feature(enable = "avx2")]
fn unsigned_words(x: &[i8], dst: &mut Vec<u32>) {
    super::gemm::unsigned_words_portable(x, dst)
}

/// `words` as 16-bit halves: `even[k]` holds bytes 0 and 2 of `words[k]`, `odd[k]` bytes 1
/// and 3, each sign-extended (`signed`) or zero-extended to 16 bits; as far as the shortest of
/// the three goes.
#[target_feature(enable = "avx2")]
fn widen(words: &[u32], signed: bool, even: &mut [u32], odd: &mut [u32]) {
    let n = words.len().min(even.len()).min(odd.len());
    let low = _mm256_set1_epi32(0x00ff_00ff);
    let mut k = 0;
    while k + 8 <= n {
        // SAFETY: words `k..k + 8 <= n` of `words`.
        let v = unsafe { _mm256_loadu_si256(words.as_ptr().add(k) as *const _) };
        let (e, o) = if signed {
            (
                _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(v)),
                _mm256_srai_epi16::<8>(v),
            )
        } else {
            (_mm256_and_si256(v, low), _mm256_srli_epi16::<8>(v))
        };
        // SAFETY: words `k..k + 8 <= n` of `even` and `odd`.
        unsafe {
            _mm256_storeu_si256(even.as_mut_ptr().add(k) as *mut _, e);
            _mm256_storeu_si256(odd.as_mut_ptr().add(k) as *mut _, o);
        }
        k += 8;
    }
    for k in k..n {
        (even[k], odd[k]) = widen_word(words[k], signed);
    }
}

/// One word as its even and odd 16-bit halves (see [`widen`]).
fn widen_word(w: u32, signed: bool) -> (u32, u32) {
    let b = w.to_le_bytes();
    let h = |x: u8| {
        (if signed {
            x as i8 as i16 as u16
        } else {
            x as u16
        }) as u32
    };
    (h(b[0]) | h(b[2]) << 16, h(b[1]) | h(b[3]) << 16)
}

/// Dispatches one tile to its monomorphized kernel: `mv` rows (at most [`MR`], [`MR_VNNI`] for
/// AVX-VNNI) of `nv` vectors of 16 lanes (one unless `mv` is 1, then at most [`NR_ROW`]).
///
/// # Safety
/// The CPU has AVX2 (and AVX-VNNI for [`Mode::Vnni`]); for `i < mv`, `k < t.k`: `t.a + i *
/// t.a_row + k` (and `+ t.odd` in exact mode), the `16 nv` words from `t.b + t.b_off[k]`, the
/// bias (`mv` rows or `16 nv` lanes) and the `16 nv` values from `t.out + i * t.row_stride`
/// are in bounds.
unsafe fn tile(mode: Mode, mv: usize, nv: usize, a_signed: bool, t: Tile) {
    macro_rules! pick {
        ($f:ident; $($m:literal, $n:literal);*) => {
            match (mv, nv, a_signed) {
                $(
                    // SAFETY: the caller's conditions are the kernel's (`2 nv` vectors of
                    // eight lanes).
                    ($m, $n, true) => unsafe { $f::<$m, { 2 * $n }, true>(t) },
                    // SAFETY: as above.
                    ($m, $n, false) => unsafe { $f::<$m, { 2 * $n }, false>(t) },
                )*
                _ => unreachable!("tile shapes are at most MR_VNNI x 1 or 1 x NR_ROW"),
            }
        };
    }
    match mode {
        Mode::Exact => pick!(exact; 1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 3, 1; 4, 1),
        Mode::Maddubs => pick!(maddubs; 1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 3, 1; 4, 1),
        Mode::Vnni => pick!(vnni; 1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 3, 1; 4, 1; 5, 1; 6, 1),
    }
}

/// A tile's accumulators: `M` rows of `N` vectors of eight lanes, from the bias (first pass)
/// or the partial sums stored by the previous one.
///
/// # Safety
/// The CPU has AVX2; the bias (`M` rows or `8 N` lanes) or the `8 N` values from each
/// `t.out + i * t.row_stride` are in bounds.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn start<const M: usize, const N: usize>(t: &Tile) -> [[__m256i; N]; M] {
    let mut acc = [[_mm256_setzero_si256(); N]; M];
    for (i, row) in acc.iter_mut().enumerate() {
        for (j, c) in row.iter_mut().enumerate() {
            *c = if !t.first {
                // SAFETY: values `8 j..8 j + 8` of output row `i < M`.
                unsafe { _mm256_loadu_si256(t.out.add(i * t.row_stride + 8 * j) as *const _) }
            } else if t.per_row {
                // SAFETY: row `i < M` of the bias.
                _mm256_set1_epi32(unsafe { *t.bias.add(i) })
            } else {
                // SAFETY: lanes `8 j..8 j + 8 <= 8 N` of the bias.
                unsafe { _mm256_loadu_si256(t.bias.add(8 * j) as *const _) }
            };
        }
    }
    acc
}

/// Stores a tile's accumulators.
///
/// # Safety
/// The CPU has AVX2; the `8 N` values from each `t.out + i * t.row_stride`, `i < M`, are in
/// bounds.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn finish<const M: usize, const N: usize>(t: &Tile, acc: &[[__m256i; N]; M]) {
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: values `8 j..8 j + 8` of output row `i < M`.
            unsafe { _mm256_storeu_si256(t.out.add(i * t.row_stride + 8 * j) as *mut _, *v) };
        }
    }
}

/// A kernel whose step takes the words as they are: `|acc, u, s|` adds `dot4(u, s)` lane by
/// lane to `acc`, `u` unsigned, `s` signed.
macro_rules! byte_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$acc:ident, $u:ident, $s:ident| $step:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`tile`] says, for `M` rows of `N` vectors of eight lanes.
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize, const N: usize, const A_SIGNED: bool>(t: Tile) {
            // SAFETY: the caller's bounds.
            let mut acc = unsafe { start::<M, N>(&t) };
            for k in 0..t.k {
                // SAFETY: offset `k < t.k`, in bounds of `b` with `8 N` words after it.
                let bp = unsafe { t.b.add(*t.b_off.add(k)) };
                let mut bv = [_mm256_setzero_si256(); N];
                for (j, v) in bv.iter_mut().enumerate() {
                    // SAFETY: words `8 j..8 j + 8` from `bp`.
                    *v = unsafe { _mm256_loadu_si256(bp.add(8 * j) as *const _) };
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    // SAFETY: word `k` of row `i < M` of `a`.
                    let av = _mm256_set1_epi32(unsafe { *t.a.add(i * t.a_row + k) } as i32);
                    for (c, v) in row.iter_mut().zip(&bv) {
                        let ($acc, $u, $s) = if A_SIGNED { (*c, *v, av) } else { (*c, av, *v) };
                        *c = $step;
                    }
                }
            }
            // SAFETY: the caller's bounds.
            unsafe { finish::<M, N>(&t, &acc) };
        }
    };
}

byte_kernel!(
    /// `vpmaddubsw` pair sums (exact for weights whose pairs fit in `i16`), widened to `i32` by
    /// `vpmaddwd` with ones.
    maddubs,
    "avx2",
    |acc, u, s| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    )
);

byte_kernel!(
    /// `vpdpbusd` on 256-bit vectors.
    vnni,
    "avx2,avxvnni",
    |acc, u, s| _mm256_dpbusd_avx_epi32(acc, u, s)
);

/// The widening kernel: the right words split into even and odd 16-bit halves per step, the
/// left ones read as halves ([`widen`]), two `vpmaddwd`.
///
/// # Safety
/// As [`tile`] says, for `M` rows of `N` vectors of eight lanes, with `t.a` the halves.
#[target_feature(enable = "avx2")]
unsafe fn exact<const M: usize, const N: usize, const A_SIGNED: bool>(t: Tile) {
    // SAFETY: the caller's bounds.
    let mut acc = unsafe { start::<M, N>(&t) };
    let low = _mm256_set1_epi32(0x00ff_00ff);
    for k in 0..t.k {
        // SAFETY: offset `k < t.k`, in bounds of `b` with `8 N` words after it.
        let bp = unsafe { t.b.add(*t.b_off.add(k)) };
        let mut even = [_mm256_setzero_si256(); N];
        let mut odd = [_mm256_setzero_si256(); N];
        for j in 0..N {
            // SAFETY: words `8 j..8 j + 8` from `bp`.
            let v = unsafe { _mm256_loadu_si256(bp.add(8 * j) as *const _) };
            (even[j], odd[j]) = if A_SIGNED {
                // Right bytes unsigned.
                (_mm256_and_si256(v, low), _mm256_srli_epi16::<8>(v))
            } else {
                (
                    _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(v)),
                    _mm256_srai_epi16::<8>(v),
                )
            };
        }
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: half `k` of row `i < M`, even and odd.
            let (ae, ao) = unsafe {
                let p = t.a.add(i * t.a_row + k);
                (
                    _mm256_set1_epi32(*p as i32),
                    _mm256_set1_epi32(*p.add(t.odd) as i32),
                )
            };
            for (j, c) in row.iter_mut().enumerate() {
                let sum = _mm256_add_epi32(
                    _mm256_madd_epi16(even[j], ae),
                    _mm256_madd_epi16(odd[j], ao),
                );
                *c = _mm256_add_epi32(*c, sum);
            }
        }
    }
    // SAFETY: the caller's bounds.
    unsafe { finish::<M, N>(&t, &acc) };
}

/// [`super::gemm::interleave4`], sixteen words per step.
///
/// # Safety
/// The CPU has AVX2; every row is at least as long as `dst`.
#[target_feature(enable = "avx2")]
unsafe fn interleave4(rows: [&[i8]; 4], dst: &mut [u32]) {
    let flip = _mm_set1_epi8(-128);
    let n = dst.len();
    let mut x = 0;
    while x + 16 <= n {
        macro_rules! load {
            ($r:expr) => {{
                // SAFETY: bytes `x..x + 16 <= n` of a row at least as long as `dst`.
                let v = unsafe { _mm_loadu_si128($r.as_ptr().add(x) as *const _) };
                _mm_xor_si128(v, flip)
            }};
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
            // SAFETY: words `x + 4 q..x + 4 q + 4 <= n` of `dst`.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(x + 4 * q) as *mut _, *v) };
        }
        x += 16;
    }
    gemm::interleave4_portable(
        [
            &rows[0][x..n],
            &rows[1][x..n],
            &rows[2][x..n],
            &rows[3][x..n],
        ],
        &mut dst[x..],
    );
}

impl Depthwise for Avx2 {
    /// Four outputs' windows in sixteen bytes (`3 sw + 3 dw < 16`), and the weights on the
    /// stack.
    fn supports(&self, g: &Plane, groups: usize) -> bool {
        g.stride[1]
            .checked_add(g.dilation[1])
            .is_some_and(|s| s <= 5)
            && g.kh.checked_mul(groups).is_some_and(|n| n <= MAX_TAP_WORDS)
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
        assert!(
            g.reach(groups, 16, 12 * g.stride[1] + 16)
                .is_some_and(|r| r <= padded.len())
        );
        let words = &words[..g.kh * groups];
        // SAFETY: `self` exists only where the CPU has AVX2, and AVX-VNNI when `vnni` (`get`);
        // every load ends before `reach <= padded.len()` (blocks of sixteen outputs, four
        // 16-byte loads `4 sw` apart; this also covers the blocks of eight of the byte
        // kernels), the shuffle indices `3 sw + 3 dw` are below 16 and the weights fit the
        // stack arrays (`supports`), stores stay within `oh * ow <= out.len()` (all asserted
        // above).
        unsafe {
            match self.mode(gemm::pairs_fit_i16(words)) {
                Mode::Exact => plane_exact(padded, words, groups, bias, g, out),
                Mode::Maddubs => plane_maddubs(padded, words, groups, bias, g, out),
                Mode::Vnni => plane_vnni(padded, words, groups, bias, g, out),
            }
        }
    }
}

/// Stores the first `n` lanes of `acc` (at most eight; none when `n` is 0) from `dst` on.
///
/// # Safety
/// The CPU has AVX2; `dst..dst + n` is writable.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_lanes(dst: *mut i32, n: usize, acc: __m256i) {
    if n >= 8 {
        // SAFETY: the caller's eight values.
        unsafe { _mm256_storeu_si256(dst as *mut _, acc) };
    } else if n > 0 {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
        // SAFETY: the mask writes the caller's `n` values only.
        unsafe { _mm256_maskstore_epi32(dst, mask, acc) };
    }
}

/// Depthwise, widening: two shuffles lay the taps' even and odd bytes out as 16-bit halves
/// (zero-extended), against the weights' halves; sixteen outputs per step.
///
/// # Safety
/// As [`Avx2::plane`] asserts (with blocks of sixteen: `reach(groups, 16, 12 sw + 16)`), and
/// the CPU has AVX2.
#[target_feature(enable = "avx2")]
unsafe fn plane_exact(
    padded: &[u8],
    words: &[u32],
    groups: usize,
    bias: i32,
    g: &Plane,
    out: &mut [i32],
) {
    let mut even = [_mm256_setzero_si256(); MAX_TAP_WORDS];
    let mut odd = [_mm256_setzero_si256(); MAX_TAP_WORDS];
    for (t, w) in words.iter().enumerate() {
        let (e, o) = widen_word(*w, true);
        (even[t], odd[t]) = (_mm256_set1_epi32(e as i32), _mm256_set1_epi32(o as i32));
    }
    let [sh, sw] = g.stride;
    let [dh, dw] = g.dilation;
    let (mut ie, mut io) = ([0x80u8; 32], [0x80u8; 32]);
    for i in 0..32 {
        let l = i % 16 / 4;
        if i % 2 == 0 {
            let j = i % 4; // 0 or 2
            ie[i] = (l * sw + j * dw) as u8;
            io[i] = (l * sw + (j + 1) * dw) as u8;
        }
    }
    // SAFETY: 32 bytes of local arrays.
    let (ie, io) = unsafe {
        (
            _mm256_loadu_si256(ie.as_ptr() as *const _),
            _mm256_loadu_si256(io.as_ptr() as *const _),
        )
    };
    for oy in 0..g.oh {
        let mut ox = 0;
        while ox < g.ow {
            let n = (g.ow - ox).min(16);
            let mut acc = [_mm256_set1_epi32(bias); 2];
            for ky in 0..g.kh {
                let row = (oy * sh + ky * dh) * g.pw + ox * sw;
                for q in 0..groups {
                    let (e, o) = (even[ky * groups + q], odd[ky * groups + q]);
                    for (h, a) in acc.iter_mut().enumerate() {
                        // SAFETY: within `reach` (blocks of sixteen).
                        let v = unsafe {
                            let p = padded.as_ptr().add(row + 4 * q * dw + 8 * h * sw);
                            _mm256_set_m128i(
                                _mm_loadu_si128(p.add(4 * sw) as *const _),
                                _mm_loadu_si128(p as *const _),
                            )
                        };
                        let sum = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_shuffle_epi8(v, ie), e),
                            _mm256_madd_epi16(_mm256_shuffle_epi8(v, io), o),
                        );
                        *a = _mm256_add_epi32(*a, sum);
                    }
                }
            }
            // SAFETY: outputs `oy * ow + ox..oy * ow + ox + n <= oh * ow <= out.len()`, the
            // first eight from the first vector, the rest (none when `n <= 8`) from the second.
            unsafe {
                let dst = out.as_mut_ptr().add(oy * g.ow + ox);
                store_lanes(dst, n.min(8), acc[0]);
                store_lanes(dst.add(n.min(8)), n.saturating_sub(8), acc[1]);
            }
            ox += 16;
        }
    }
}

/// A direct depthwise kernel on whole words: eight outputs per step, each kernel row's groups
/// of four taps from two 16-byte loads (outputs `0..4` and `4..8`) laid out by `vpshufb`;
/// `|acc, x, w|` adds `dot4(x, w)` lane by lane to `acc`, `x` the unsigned taps, `w` the
/// group's four weights.
macro_rules! plane_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, |$acc:ident, $x:ident, $w:ident| $step:expr) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// As [`Avx2::plane`] asserts, and the CPU has the features.
        #[target_feature(enable = $features)]
        unsafe fn $name(
            padded: &[u8],
            words: &[u32],
            groups: usize,
            bias: i32,
            g: &Plane,
            out: &mut [i32],
        ) {
            let mut weights = [_mm256_setzero_si256(); MAX_TAP_WORDS];
            for (v, w) in weights.iter_mut().zip(words) {
                *v = _mm256_set1_epi32(*w as i32);
            }
            let [sh, sw] = g.stride;
            let [dh, dw] = g.dilation;
            let mut index = [0u8; 32];
            for (i, v) in index.iter_mut().enumerate() {
                *v = ((i % 16 / 4) * sw + (i % 4) * dw) as u8;
            }
            // SAFETY: 32 bytes of a local array.
            let index = unsafe { _mm256_loadu_si256(index.as_ptr() as *const _) };
            for oy in 0..g.oh {
                let mut ox = 0;
                while ox < g.ow {
                    let n = (g.ow - ox).min(8);
                    let mut acc = _mm256_set1_epi32(bias);
                    for ky in 0..g.kh {
                        let row = (oy * sh + ky * dh) * g.pw + ox * sw;
                        for q in 0..groups {
                            // SAFETY: bytes `at..at + 4 sw + 16 <= reach <= padded.len()`
                            // (`Plane::reach`).
                            let v = unsafe {
                                let p = padded.as_ptr().add(row + 4 * q * dw);
                                _mm256_set_m128i(
                                    _mm_loadu_si128(p.add(4 * sw) as *const _),
                                    _mm_loadu_si128(p as *const _),
                                )
                            };
                            let ($acc, $x, $w) =
                                (acc, _mm256_shuffle_epi8(v, index), weights[ky * groups + q]);
                            acc = $step;
                        }
                    }
                    // SAFETY: outputs `oy * ow + ox..oy * ow + ox + n <= oh * ow <= out.len()`.
                    unsafe { store_lanes(out.as_mut_ptr().add(oy * g.ow + ox), n, acc) };
                    ox += 8;
                }
            }
        }
    };
}

plane_kernel!(
    /// Depthwise, `vpmaddubsw` (a channel whose weight pairs fit in `i16`).
    plane_maddubs,
    "avx2",
    |acc, x, w| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1))
    )
);

plane_kernel!(
    /// Depthwise, AVX-VNNI.
    plane_vnni,
    "avx2,avxvnni",
    |acc, x, w| _mm256_dpbusd_avx_epi32(acc, x, w)
);
