//! The u8 x i8 -> i32 matrix product under every convolution and linear layer, on 4-byte
//! words: a word holds four consecutive values of the reduction axis, and one step multiplies a
//! broadcast word of the left operand with a vector of words of the right operand (`vpdpbusd`,
//! four multiply-adds per lane). The left operand is read in place (`a[m * a_row + k]`) and the
//! right one through a per-word row offset (`b[b_off[k] + n]`), so a convolution reads its input
//! image directly (each `k` one kernel tap of four channels) instead of copying an im2col
//! matrix.
//!
//! One operand is unsigned (`u8`: activations as `int8 + 128`), the other signed (`i8`:
//! weights); callers subtract the zero point through the bias. Arithmetic wraps modulo 2^32, as
//! `vpdpbusd` does: the product is exact whenever the true result fits in `i32`, which
//! validation guarantees (`accumulator_bound`).
//!
//! One implementation per instruction set ([`Gemm`], picked by [`super::isa`](fn@super::isa)),
//! one result: AVX-512 VNNI tiles (`avx512`), AVX2 and AVX-VNNI tiles (`avx2`), NEON tiles with
//! or without `sdot`/`udot` (`neon`), and the portable loops here.

use std::ops::Range;

use super::isa::{self, Isa};

/// Rows of the largest tile of any implementation: callers that split rows across threads
/// split them at multiples of it.
pub(crate) const MR: usize = 8;

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
    /// Whether every pair of the signed operand's bytes (bytes 0, 1 and bytes 2, 3 of each
    /// word) has `|w0| + |w1| <= 128` ([`pairs_fit_i16`]): then `vpmaddubsw`'s 16-bit pair
    /// sums of `u8 x i8` products (at most `255 * 128`) cannot saturate, and AVX2 uses it.
    /// Decided when the weights are packed.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub pairs_fit_i16: bool,
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

/// Whether `vpmaddubsw` is exact on signed words `words` against any `u8` words: every pair
/// of bytes it sums into 16 bits (bytes 0 and 1, bytes 2 and 3 of a word) has
/// `255 * (|w0| + |w1|) <= 32767`, that is `|w0| + |w1| <= 128`.
pub(crate) fn pairs_fit_i16(words: &[u32]) -> bool {
    words.iter().all(|w| {
        let b = w.to_le_bytes().map(|b| (b as i8).unsigned_abs() as u32);
        b[0] + b[1] <= 128 && b[2] + b[3] <= 128
    })
}

/// One implementation of the product and its packing helpers, for one instruction set. Every
/// implementation gives the same bits.
pub(crate) trait Gemm: Sync {
    /// [`product`] after its checks.
    ///
    /// # Safety
    /// `rows` and `lanes` are not empty and every bound [`product`] asserts holds: the loads of
    /// `w` and the stores to `out` of every tile are in bounds.
    unsafe fn product(
        &self,
        w: &Words,
        rows: Range<usize>,
        lanes: Range<usize>,
        out: &mut [i32],
        row_stride: usize,
    );

    /// [`interleave4`] after its check.
    ///
    /// # Safety
    /// Every row is at least as long as `dst`.
    unsafe fn interleave4(&self, rows: [&[i8]; 4], dst: &mut [u32]);

    /// [`unsigned_words`].
    fn unsigned_words(&self, x: &[i8], dst: &mut Vec<u32>) {
        unsigned_words_portable(x, dst)
    }
}

/// The implementation for `isa`, which this machine runs (the current choice of
/// [`isa::isa`] always is one).
pub(crate) fn for_isa(isa: Isa) -> &'static dyn Gemm {
    let fast: Option<&'static dyn Gemm> = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => super::avx512::get().map(|k| k as _),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => super::avx2::get(true).map(|k| k as _),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => super::avx2::get(false).map(|k| k as _),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => super::neon::get(true).map(|k| k as _),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => super::neon::get(false).map(|k| k as _),
        _ => None,
    };
    fast.unwrap_or(&Portable)
}

/// The implementation of the current instruction set.
fn kernel() -> &'static dyn Gemm {
    for_isa(isa::isa())
}

/// `C[m][n]` for `m` in `rows`, `n` in `lanes`, stored to
/// `out[(m - rows.start) * row_stride + n - lanes.start]`. Whole tiles are stored: each row's
/// lanes run to the next multiple of 16 (`row_stride` leaves room for them).
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
    // Checked arithmetic: these bounds guard the unchecked loads and stores of every
    // implementation, for any arguments.
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
    // SAFETY: `rows` and `lanes` are not empty and the asserts above are the bounds
    // `Gemm::product` requires; `kernel` returns an implementation this machine runs.
    unsafe { kernel().product(w, rows, lanes, out, row_stride) }
}

/// Tiles of `rows`: `(m0, mv)`, `mv <= mr` rows from `m0`.
pub(crate) fn row_blocks(rows: Range<usize>, mr: usize) -> impl Iterator<Item = (usize, usize)> {
    rows.clone()
        .step_by(mr)
        .map(move |m0| (m0, mr.min(rows.end - m0)))
}

/// Tiles of `lanes`: `(n0, nv)`, `nv <= nr` vectors of 16 lanes from `n0` (the last one
/// rounded up to 16 lanes).
pub(crate) fn lane_blocks(lanes: Range<usize>, nr: usize) -> impl Iterator<Item = (usize, usize)> {
    lanes
        .clone()
        .step_by(16 * nr)
        .map(move |n0| (n0, nr.min((lanes.end - n0).div_ceil(16))))
}

/// The portable loops: any CPU.
pub(crate) struct Portable;

impl Gemm for Portable {
    unsafe fn product(
        &self,
        w: &Words,
        rows: Range<usize>,
        lanes: Range<usize>,
        out: &mut [i32],
        row_stride: usize,
    ) {
        for (n0, nv) in lane_blocks(lanes.clone(), 3) {
            for (m0, mv) in row_blocks(rows.clone(), MR) {
                let at = (m0 - rows.start) * row_stride + (n0 - lanes.start);
                portable_tile(w, m0, mv, n0, nv, &mut out[at..], row_stride);
            }
        }
    }

    unsafe fn interleave4(&self, rows: [&[i8]; 4], dst: &mut [u32]) {
        interleave4_portable(rows, dst)
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
    // SAFETY: every row is as long as `dst` (asserted); `kernel` returns an implementation
    // this machine runs.
    unsafe { kernel().interleave4(rows, dst) }
}

/// [`interleave4`] from `x` on, one word at a time (the tail of the vector implementations).
pub(crate) fn interleave4_portable(rows: [&[i8]; 4], dst: &mut [u32]) {
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
    kernel().unsigned_words(x, dst)
}

/// [`unsigned_words`] as plain Rust, inlined into the implementations that compile it for
/// their instruction set.
#[inline(always)]
pub(crate) fn unsigned_words_portable(x: &[i8], dst: &mut Vec<u32>) {
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
