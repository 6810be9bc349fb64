//! [`Isa::NeonDot`](super::Isa::NeonDot) and [`Isa::Neon`](super::Isa::Neon): the word GEMM on
//! tiles of 128-bit vectors, [`interleave4`](super::gemm::interleave4) by `st4`, and the direct
//! depthwise kernel (`tbl` lays four outputs' four taps side by side).
//!
//! NEON multiplies bytes of one signedness: the unsigned operand's mate is flipped by 128
//! (`eor`) and the sum corrected per row of the left operand, exactly (modulo 2^32):
//!
//! - signed left words (convolutions: weights times `u8` image words): the image bytes become
//!   `u - 128` (`i8`), `sum w u = sum w (u - 128) + 128 sum w`, an `i8 x i8` product (`sdot`);
//! - unsigned left words (linear layers: `u8` activations times weights): the weight bytes
//!   become `w + 128` (`u8`), `sum u w = sum u (w + 128) - 128 sum u`, a `u8 x u8` product
//!   (`udot`).
//!
//! The correction needs the left rows' byte sums only, made once per row tile ([`correction`]).
//! With the dot product instructions (`dotprod`), one `sdot`/`udot` per four lanes and word;
//! without, `smull`/`umull` (16-bit products, exact) and `sadalp`/`uadalp` (pairs added into
//! 32-bit lanes), the two halves of each word's sum joined at the end (`addp`).
//!
//! A value of [`Neon`] exists only where the CPU has what its code needs ([`get`]): that is
//! what makes its safe methods sound.

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::depthwise::{Depthwise, Plane};
use super::gemm::{self, Bias, Gemm, Words, lane_blocks, row_blocks};
use super::isa;

/// Rows of a tile with the dot product (`4 x 16` lanes: sixteen accumulators).
const MR_DOT: usize = 4;
/// Rows of a tile without it (`2 x 16` lanes, two accumulators per four lanes).
const MR_WIDE: usize = 2;
/// Vectors of 16 lanes of a one-row tile, with the dot product.
const NR_ROW_DOT: usize = 4;
/// Vectors of 16 lanes of a one-row tile, without it.
const NR_ROW_WIDE: usize = 2;

/// The NEON kernels, with `sdot`/`udot` where `dot`; only [`get`] hands one out.
pub(super) struct Neon {
    dot: bool,
}

static NEON: Neon = Neon { dot: false };
static NEON_DOT: Neon = Neon { dot: true };

/// The NEON kernels (`dot`: with the dot product instructions), where the CPU has them.
pub(super) fn get(dot: bool) -> Option<&'static Neon> {
    let cpu = isa::cpu();
    if dot {
        cpu.neon_dot.then_some(&NEON_DOT)
    } else {
        cpu.neon.then_some(&NEON)
    }
}

/// `acc + dot4(a, b)` per 32-bit lane, bytes signed (`sdot`; not yet a stable intrinsic).
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: `sdot` reads and writes these registers only; this function runs only where the
    // CPU has `dotprod` (its target feature).
    unsafe {
        asm!(
            "sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
            inout(vreg) acc,
            in(vreg) a,
            in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

/// `acc + dot4(a, b)` per 32-bit lane, bytes unsigned (`udot`).
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn udot(mut acc: uint32x4_t, a: uint8x16_t, b: uint8x16_t) -> uint32x4_t {
    // SAFETY: as in `sdot`.
    unsafe {
        asm!(
            "udot {0:v}.4s, {1:v}.16b, {2:v}.16b",
            inout(vreg) acc,
            in(vreg) a,
            in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        )
    };
    acc
}

/// What a row of left words `a` adds to its products once the right bytes are flipped by 128
/// (see the module's notes): `128 sum(a)` for signed bytes, `-128 sum(a)` for unsigned ones,
/// wrapping.
#[target_feature(enable = "neon")]
fn correction(a: &[u32], signed: bool) -> i32 {
    let mut chunks = a.chunks_exact(4);
    let mut sum = if signed {
        let mut acc = vdupq_n_s32(0);
        for c in chunks.by_ref() {
            // SAFETY: four words are sixteen bytes.
            let v = unsafe { vld1q_s8(c.as_ptr() as *const i8) };
            acc = vpadalq_s16(acc, vpaddlq_s8(v));
        }
        vaddvq_s32(acc)
    } else {
        let mut acc = vdupq_n_u32(0);
        for c in chunks.by_ref() {
            // SAFETY: four words are sixteen bytes.
            let v = unsafe { vld1q_u8(c.as_ptr() as *const u8) };
            acc = vpadalq_u16(acc, vpaddlq_u8(v));
        }
        vaddvq_u32(acc) as i32
    };
    for w in chunks.remainder() {
        for b in w.to_le_bytes() {
            sum = sum.wrapping_add(if signed { b as i8 as i32 } else { b as i32 });
        }
    }
    sum.wrapping_mul(if signed { 128 } else { -128 })
}

/// One tile's operands: `k` words of the reduction, rows of `a` every `a_row` words,
/// `b + b_off[k]`, the bias, each row's [`correction`].
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const u32,
    a_row: usize,
    b: *const u32,
    b_off: *const usize,
    bias: *const i32,
    per_row: bool,
    correction: [i32; MR_DOT],
    out: *mut i32,
    row_stride: usize,
}

impl Gemm for Neon {
    unsafe fn product(
        &self,
        w: &Words,
        rows: Range<usize>,
        lanes: Range<usize>,
        out: &mut [i32],
        row_stride: usize,
    ) {
        let k4 = w.b_off.len();
        let (mr, nr) = match (rows.len() == 1, self.dot) {
            (true, true) => (1, NR_ROW_DOT),
            (true, false) => (1, NR_ROW_WIDE),
            (false, true) => (MR_DOT, 1),
            (false, false) => (MR_WIDE, 1),
        };
        for (m0, mv) in row_blocks(rows.clone(), mr) {
            let mut corrections = [0i32; MR_DOT];
            for (i, c) in corrections.iter_mut().enumerate().take(mv) {
                // SAFETY: `self` exists only where the CPU has NEON (`get`).
                *c = unsafe { correction(&w.a[(m0 + i) * w.a_row..][..k4], w.a_signed) };
            }
            for (n0, nv) in lane_blocks(lanes.clone(), nr) {
                let at = (m0 - rows.start) * row_stride + (n0 - lanes.start);
                let (bias, per_row) = match w.bias {
                    Bias::Rows(b) => (b[m0..].as_ptr(), true),
                    Bias::Lanes(b) => (b[n0..].as_ptr(), false),
                };
                let t = Tile {
                    k: k4,
                    a: w.a[m0 * w.a_row..].as_ptr(),
                    a_row: w.a_row,
                    b: w.b[n0..].as_ptr(),
                    b_off: w.b_off.as_ptr(),
                    bias,
                    per_row,
                    correction: corrections,
                    out: out[at..].as_mut_ptr(),
                    row_stride,
                };
                // SAFETY: `self` exists only where the CPU has NEON, and the dot product
                // instructions when `dot` (`get`). The caller's bounds (`gemm::product`) cover
                // the tile: rows `m0..m0 + mv` of `a` hold `k4` words, `16 nv` words from each
                // `b_off[k] + n0` are in `b`, the bias covers rows `..rows.end` or 16-lane
                // blocks of `lanes`, and `out` holds `at + (mv - 1) * row_stride + 16 nv`.
                unsafe { tile(self.dot, mv, nv, w.a_signed, t) };
            }
        }
    }

    unsafe fn interleave4(&self, rows: [&[i8]; 4], dst: &mut [u32]) {
        // SAFETY: the caller makes every row at least as long as `dst`.
        unsafe { interleave4(rows, dst) }
    }
}

/// Dispatches one tile to its monomorphized kernel: `mv` rows of `nv` vectors of 16 lanes.
///
/// # Safety
/// The CPU has NEON (and `dotprod` when `with_dot`); for `i < mv`, `k < t.k`: `t.a + i * t.a_row +
/// k`, the `16 nv` words from `t.b + t.b_off[k]`, the bias (`mv` rows or `16 nv` lanes) and
/// the `16 nv` values from `t.out + i * t.row_stride` are in bounds.
unsafe fn tile(with_dot: bool, mv: usize, nv: usize, a_signed: bool, t: Tile) {
    macro_rules! pick {
        ($f:ident; $($m:literal, $n:literal);*) => {
            match (mv, nv, a_signed) {
                $(
                    // SAFETY: the caller's conditions are the kernel's (`4 nv` vectors of four
                    // lanes).
                    ($m, $n, true) => unsafe { $f::<$m, { 4 * $n }, true>(t) },
                    // SAFETY: as above.
                    ($m, $n, false) => unsafe { $f::<$m, { 4 * $n }, false>(t) },
                )*
                _ => unreachable!("tile shapes are at most MR x 1 or 1 x NR_ROW"),
            }
        };
    }
    if with_dot {
        pick!(dot; 1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 3, 1; 4, 1)
    } else {
        pick!(wide; 1, 1; 1, 2; 2, 1)
    }
}

/// A tile's starting sums: the bias plus each row's correction, `M` rows of `N` vectors of
/// four lanes.
///
/// # Safety
/// The bias (`M` rows or `4 N` lanes) is in bounds; `M <= MR_DOT`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn start<const M: usize, const N: usize>(t: &Tile) -> [[int32x4_t; N]; M] {
    let mut acc = [[vdupq_n_s32(0); N]; M];
    for (i, row) in acc.iter_mut().enumerate() {
        let c = vdupq_n_s32(t.correction[i]);
        for (j, v) in row.iter_mut().enumerate() {
            *v = if t.per_row {
                // SAFETY: row `i < M` of the bias.
                vaddq_s32(vdupq_n_s32(unsafe { *t.bias.add(i) }), c)
            } else {
                // SAFETY: lanes `4 j..4 j + 4 <= 4 N` of the bias.
                vaddq_s32(unsafe { vld1q_s32(t.bias.add(4 * j)) }, c)
            };
        }
    }
    acc
}

/// Stores a tile's sums.
///
/// # Safety
/// The `4 N` values from each `t.out + i * t.row_stride`, `i < M`, are in bounds.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn finish<const M: usize, const N: usize>(t: &Tile, acc: &[[int32x4_t; N]; M]) {
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: values `4 j..4 j + 4` of output row `i < M`.
            unsafe { vst1q_s32(t.out.add(i * t.row_stride + 4 * j), *v) };
        }
    }
}

/// The right words of step `k`, flipped by 128.
///
/// # Safety
/// Offset `k` is in bounds of `t.b_off`, and the `4 N` words from `t.b + t.b_off[k]` in
/// bounds.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn right<const N: usize>(t: &Tile, k: usize) -> [uint8x16_t; N] {
    let flip = vdupq_n_u8(0x80);
    // SAFETY: the caller's bounds.
    let bp = unsafe { t.b.add(*t.b_off.add(k)) };
    let mut bv = [flip; N];
    for (j, v) in bv.iter_mut().enumerate() {
        // SAFETY: words `4 j..4 j + 4` from `bp`.
        *v = veorq_u8(unsafe { vld1q_u8(bp.add(4 * j) as *const u8) }, flip);
    }
    bv
}

/// `M x N` tile with `sdot` (signed left bytes) or `udot` (unsigned ones).
///
/// # Safety
/// As [`tile`] says, for `M` rows of `N` vectors of four lanes, on a CPU with `dotprod`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot<const M: usize, const N: usize, const A_SIGNED: bool>(t: Tile) {
    // SAFETY: the caller's bounds.
    let mut acc = unsafe { start::<M, N>(&t) };
    for k in 0..t.k {
        // SAFETY: `k < t.k`, the caller's bounds.
        let bv = unsafe { right::<N>(&t, k) };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: word `k` of row `i < M` of `a`.
            let av = vreinterpretq_u8_u32(vdupq_n_u32(unsafe { *t.a.add(i * t.a_row + k) }));
            for (c, b) in row.iter_mut().zip(&bv) {
                *c = if A_SIGNED {
                    sdot(*c, vreinterpretq_s8_u8(av), vreinterpretq_s8_u8(*b))
                } else {
                    vreinterpretq_s32_u32(udot(vreinterpretq_u32_s32(*c), av, *b))
                };
            }
        }
    }
    // SAFETY: the caller's bounds.
    unsafe { finish::<M, N>(&t, &acc) };
}

/// `M x N` tile with widening multiplies: per four lanes, the products of words 0, 1 and of
/// words 2, 3 (16-bit, exact) added pairwise into 32-bit lanes (two partial sums per word),
/// joined by `addp` at the end.
///
/// # Safety
/// As [`tile`] says, for `M` rows of `N` vectors of four lanes.
#[target_feature(enable = "neon")]
unsafe fn wide<const M: usize, const N: usize, const A_SIGNED: bool>(t: Tile) {
    let mut lo = [[vdupq_n_s32(0); N]; M];
    let mut hi = [[vdupq_n_s32(0); N]; M];
    for k in 0..t.k {
        // SAFETY: `k < t.k`, the caller's bounds.
        let bv = unsafe { right::<N>(&t, k) };
        for i in 0..M {
            // SAFETY: word `k` of row `i < M` of `a`.
            let av = vreinterpretq_u8_u32(vdupq_n_u32(unsafe { *t.a.add(i * t.a_row + k) }));
            for (j, b) in bv.iter().enumerate() {
                if A_SIGNED {
                    let (a, b) = (vreinterpretq_s8_u8(av), vreinterpretq_s8_u8(*b));
                    lo[i][j] = vpadalq_s16(lo[i][j], vmull_s8(vget_low_s8(a), vget_low_s8(b)));
                    hi[i][j] = vpadalq_s16(hi[i][j], vmull_high_s8(a, b));
                } else {
                    let l = vmull_u8(vget_low_u8(av), vget_low_u8(*b));
                    let h = vmull_high_u8(av, *b);
                    lo[i][j] =
                        vreinterpretq_s32_u32(vpadalq_u16(vreinterpretq_u32_s32(lo[i][j]), l));
                    hi[i][j] =
                        vreinterpretq_s32_u32(vpadalq_u16(vreinterpretq_u32_s32(hi[i][j]), h));
                }
            }
        }
    }
    // SAFETY: the caller's bounds.
    let mut acc = unsafe { start::<M, N>(&t) };
    for i in 0..M {
        for j in 0..N {
            acc[i][j] = vaddq_s32(acc[i][j], vpaddq_s32(lo[i][j], hi[i][j]));
        }
    }
    // SAFETY: the caller's bounds.
    unsafe { finish::<M, N>(&t, &acc) };
}

/// [`super::gemm::interleave4`], sixteen words per `st4`.
///
/// # Safety
/// Every row is at least as long as `dst`.
#[target_feature(enable = "neon")]
unsafe fn interleave4(rows: [&[i8]; 4], dst: &mut [u32]) {
    let flip = vdupq_n_u8(0x80);
    let n = dst.len();
    let mut x = 0;
    while x + 16 <= n {
        macro_rules! load {
            ($r:expr) => {{
                // SAFETY: bytes `x..x + 16 <= n` of a row at least as long as `dst`.
                let v = unsafe { vld1q_u8($r.as_ptr().add(x) as *const u8) };
                veorq_u8(v, flip)
            }};
        }
        let v = uint8x16x4_t(
            load!(rows[0]),
            load!(rows[1]),
            load!(rows[2]),
            load!(rows[3]),
        );
        // SAFETY: words `x..x + 16 <= n` of `dst` (64 bytes), byte `j` of word `x + i` from
        // row `j`.
        unsafe { vst4q_u8(dst.as_mut_ptr().add(x) as *mut u8, v) };
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

impl Depthwise for Neon {
    /// Four outputs' windows in sixteen bytes: `3 sw + 3 dw < 16`.
    fn supports(&self, g: &Plane, _groups: usize) -> bool {
        g.stride[1]
            .checked_add(g.dilation[1])
            .is_some_and(|s| s <= 5)
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
            g.reach(groups, 8, 4 * g.stride[1] + 16)
                .is_some_and(|r| r <= padded.len())
        );
        let words = &words[..g.kh * groups];
        // The taps enter as `u - 128`: the channel's weights times 128 restore them.
        // SAFETY: `self` exists only where the CPU has NEON (`get`).
        let start = bias.wrapping_add(unsafe { correction(words, true) });
        // SAFETY: every load ends before `reach <= padded.len()` (blocks of eight outputs, two
        // 16-byte loads `4 sw` apart), the table indices `3 sw + 3 dw` are below 16
        // (`supports`), the weights hold `kh * groups` words and the stores stay within
        // `oh * ow <= out.len()` (all asserted above); `self` exists only where the CPU has
        // `dotprod` when `dot` (`get`).
        unsafe {
            if self.dot {
                plane_dot(padded, words, groups, start, g, out)
            } else {
                plane_wide(padded, words, groups, start, g, out)
            }
        }
    }
}

/// The table that lays four outputs' four taps side by side: byte `4 l + j` is
/// `x[l sw + j dw]`.
#[target_feature(enable = "neon")]
fn tap_index(g: &Plane) -> uint8x16_t {
    let [_, sw] = g.stride;
    let [_, dw] = g.dilation;
    let mut index = [0u8; 16];
    for (i, v) in index.iter_mut().enumerate() {
        *v = ((i / 4) * sw + (i % 4) * dw) as u8;
    }
    // SAFETY: 16 bytes of a local array.
    unsafe { vld1q_u8(index.as_ptr()) }
}

/// The taps of outputs `0..4` and `4..8` of a block for the group at `at`, flipped to `i8`.
///
/// # Safety
/// Bytes `at..at + 4 sw + 16` of `padded` are in bounds.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn taps(padded: &[u8], at: usize, sw: usize, index: uint8x16_t) -> [int8x16_t; 2] {
    let flip = vdupq_n_u8(0x80);
    // SAFETY: the caller's bounds.
    let (v0, v1) = unsafe {
        let p = padded.as_ptr().add(at);
        (vld1q_u8(p), vld1q_u8(p.add(4 * sw)))
    };
    [v0, v1].map(|v| vreinterpretq_s8_u8(veorq_u8(vqtbl1q_u8(v, index), flip)))
}

/// Stores the first `n` of eight outputs.
///
/// # Safety
/// Values `at..at + n` of `out` are in bounds.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn store8(out: &mut [i32], at: usize, n: usize, v: [int32x4_t; 2]) {
    if n == 8 {
        // SAFETY: the caller's bounds.
        unsafe {
            vst1q_s32(out.as_mut_ptr().add(at), v[0]);
            vst1q_s32(out.as_mut_ptr().add(at + 4), v[1]);
        }
        return;
    }
    let mut tmp = [0i32; 8];
    // SAFETY: eight values of a local array.
    unsafe {
        vst1q_s32(tmp.as_mut_ptr(), v[0]);
        vst1q_s32(tmp.as_mut_ptr().add(4), v[1]);
    }
    // SAFETY: the caller's bounds.
    unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.as_mut_ptr().add(at), n) };
}

/// The direct depthwise kernel with `sdot`: eight outputs per step.
///
/// # Safety
/// As [`Neon::plane`] asserts, on a CPU with `dotprod`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn plane_dot(
    padded: &[u8],
    words: &[u32],
    groups: usize,
    start: i32,
    g: &Plane,
    out: &mut [i32],
) {
    let [sh, sw] = g.stride;
    let [dh, dw] = g.dilation;
    let index = tap_index(g);
    for oy in 0..g.oh {
        let mut ox = 0;
        while ox < g.ow {
            let mut acc = [vdupq_n_s32(start); 2];
            for ky in 0..g.kh {
                let row = (oy * sh + ky * dh) * g.pw + ox * sw;
                for q in 0..groups {
                    // SAFETY: within `reach` (`Neon::plane`).
                    let x = unsafe { taps(padded, row + 4 * q * dw, sw, index) };
                    let w = vreinterpretq_s8_u32(vdupq_n_u32(words[ky * groups + q]));
                    acc = [sdot(acc[0], x[0], w), sdot(acc[1], x[1], w)];
                }
            }
            // SAFETY: outputs `oy * ow + ox..+ min(8, ow - ox)` of `oh * ow <= out.len()`.
            unsafe { store8(out, oy * g.ow + ox, (g.ow - ox).min(8), acc) };
            ox += 8;
        }
    }
}

/// The direct depthwise kernel with widening multiplies: eight outputs per step.
///
/// # Safety
/// As [`Neon::plane`] asserts.
#[target_feature(enable = "neon")]
unsafe fn plane_wide(
    padded: &[u8],
    words: &[u32],
    groups: usize,
    start: i32,
    g: &Plane,
    out: &mut [i32],
) {
    let [sh, sw] = g.stride;
    let [dh, dw] = g.dilation;
    let index = tap_index(g);
    for oy in 0..g.oh {
        let mut ox = 0;
        while ox < g.ow {
            let mut lo = [vdupq_n_s32(0); 2];
            let mut hi = [vdupq_n_s32(0); 2];
            for ky in 0..g.kh {
                let row = (oy * sh + ky * dh) * g.pw + ox * sw;
                for q in 0..groups {
                    // SAFETY: within `reach` (`Neon::plane`).
                    let x = unsafe { taps(padded, row + 4 * q * dw, sw, index) };
                    let w = vreinterpretq_s8_u32(vdupq_n_u32(words[ky * groups + q]));
                    for h in 0..2 {
                        lo[h] = vpadalq_s16(lo[h], vmull_s8(vget_low_s8(x[h]), vget_low_s8(w)));
                        hi[h] = vpadalq_s16(hi[h], vmull_high_s8(x[h], w));
                    }
                }
            }
            let acc = [0, 1].map(|h| vaddq_s32(vdupq_n_s32(start), vpaddq_s32(lo[h], hi[h])));
            // SAFETY: outputs `oy * ow + ox..+ min(8, ow - ox)` of `oh * ow <= out.len()`.
            unsafe { store8(out, oy * g.ow + ox, (g.ow - ox).min(8), acc) };
            ox += 8;
        }
    }
}
