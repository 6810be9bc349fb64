//! Depthwise convolutions, direct: per output row, a block of outputs at a time, each output's
//! taps laid side by side as words of four (`x[l sw + j dw]` in lane `l`, byte `j`) straight
//! from the padded input row and multiplied with the four weights of a kernel row (`vpermb` +
//! `vpdpbusd` on AVX-512 VBMI and VNNI, `vpshufb` + `vpmaddubsw`/`vpmaddwd`/AVX-VNNI on AVX2,
//! `tbl` + `sdot` or widening multiplies on NEON). No im2col words are built: the GEMM path
//! spent more on building them than on the multiply-adds for these layers. The portable
//! implementation runs every shape the others do not; all equal the scalar reference.

use super::isa::{self, Isa};
use crate::model::IntConv2d;

/// A depthwise layer's weights as words of four taps of one kernel row, `[c, kh, groups]`
/// (`groups = ceil(kw / 4)`, missing taps 0).
pub(crate) struct DepthwiseWords {
    pub groups: usize,
    pub words: Vec<u32>,
}

impl DepthwiseWords {
    /// `None` where the layer is not depthwise.
    pub(crate) fn new(c: &IntConv2d) -> Option<Self> {
        if !c.is_depthwise() {
            return None;
        }
        let [kh, kw] = c.kernel;
        let groups = kw.div_ceil(4);
        let mut words = Vec::with_capacity(c.out_channels * kh * groups);
        for w in c.weight.chunks_exact(kh * kw) {
            for row in w.chunks_exact(kw) {
                for g in 0..groups {
                    let byte = |j: usize| row.get(4 * g + j).map_or(0, |v| *v as u8);
                    words.push(u32::from_le_bytes([byte(0), byte(1), byte(2), byte(3)]));
                }
            }
        }
        Some(Self { groups, words })
    }
}

/// The geometry of one plane.
pub(crate) struct Plane {
    pub oh: usize,
    pub ow: usize,
    pub pw: usize,
    pub kh: usize,
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
}

impl Plane {
    /// One past the last byte read by a kernel that computes `block` outputs of a row per step
    /// and reads `window` bytes from each step's first tap of a group (`row + ox sw + 4 q dw`),
    /// with `groups` groups of four taps per kernel row; `None` on overflow.
    pub(crate) fn reach(&self, groups: usize, block: usize, window: usize) -> Option<usize> {
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        let last_row = (self.oh.checked_sub(1)?)
            .checked_mul(sh)?
            .checked_add(self.kh.checked_sub(1)?.checked_mul(dh)?)?
            .checked_mul(self.pw)?;
        let last_block = ((self.ow.checked_sub(1)?) / block * block).checked_mul(sw)?;
        let last_group = 4usize
            .checked_mul(groups.checked_sub(1)?)?
            .checked_mul(dw)?;
        last_row
            .checked_add(last_block)?
            .checked_add(last_group)?
            .checked_add(window)
    }
}

/// One implementation of the direct kernel, for one instruction set. Every implementation
/// gives the bits of the portable one.
pub(crate) trait Depthwise: Sync {
    /// Whether it runs planes of this geometry, with `groups` words per kernel row.
    fn supports(&self, g: &Plane, groups: usize) -> bool;

    /// [`plane`], for a geometry it [`supports`](Depthwise::supports).
    ///
    /// # Panics
    /// If it does not support the geometry, or `padded`, `words` or `out` are shorter than it
    /// reads or writes.
    fn plane(
        &self,
        padded: &[u8],
        words: &[u32],
        groups: usize,
        bias: i32,
        g: &Plane,
        out: &mut [i32],
    );
}

/// The implementations to try for `isa`, in order, before the portable one.
fn candidates(isa: Isa) -> [Option<&'static dyn Depthwise>; 2] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => [
            super::avx512::depthwise().map(|k| k as _),
            super::avx2::get(false).map(|k| k as _),
        ],
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => [super::avx2::get(true).map(|k| k as _), None],
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => [super::avx2::get(false).map(|k| k as _), None],
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => [super::neon::get(true).map(|k| k as _), None],
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => [super::neon::get(false).map(|k| k as _), None],
        _ => [None, None],
    }
}

/// Accumulators `[oh, ow]` of one channel into `out`, starting from `bias`: `padded` is the
/// channel padded with the input zero point, as `int8 + 128`, rows of `pw`, followed by at least
/// [`slack`] bytes; `words` the channel's `[kh, groups]` weight words.
pub(crate) fn plane(
    padded: &[u8],
    words: &[u32],
    groups: usize,
    bias: i32,
    g: &Plane,
    out: &mut [i32],
) {
    assert!(out.len() >= g.oh * g.ow && words.len() >= g.kh * groups && groups > 0);
    if g.oh == 0 || g.ow == 0 {
        return;
    }
    let kernel = candidates(isa::isa())
        .into_iter()
        .flatten()
        .find(|k| k.supports(g, groups))
        .unwrap_or(&Portable);
    kernel.plane(padded, words, groups, bias, g, out)
}

/// Bytes a padded plane needs after its last row.
pub(crate) fn slack(c: &IntConv2d) -> usize {
    64 + 16 * c.stride[1] + 4 * c.kernel[1].div_ceil(4) * c.dilation[1]
}

/// The portable direct kernel: any geometry.
pub(crate) struct Portable;

impl Depthwise for Portable {
    fn supports(&self, _: &Plane, _: usize) -> bool {
        true
    }

    /// Tap by tap over whole output rows (contiguous at stride 1: the compiler vectorizes it),
    /// zero taps skipped (the padding taps past `kw` among them, so nothing past the plane's
    /// last tap is read).
    fn plane(
        &self,
        padded: &[u8],
        words: &[u32],
        groups: usize,
        bias: i32,
        g: &Plane,
        out: &mut [i32],
    ) {
        let (oh, ow) = (g.oh, g.ow);
        let [sh, sw] = g.stride;
        let [dh, dw] = g.dilation;
        let out = &mut out[..oh * ow];
        out.fill(bias);
        for ky in 0..g.kh {
            for q in 0..groups {
                for (j, w) in words[ky * groups + q].to_le_bytes().into_iter().enumerate() {
                    let w = w as i8 as i32;
                    if w == 0 {
                        continue;
                    }
                    for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
                        let start = (oy * sh + ky * dh) * g.pw + (4 * q + j) * dw;
                        if sw == 1 {
                            for (o, x) in row.iter_mut().zip(&padded[start..start + ow]) {
                                *o = o.wrapping_add(*x as i32 * w);
                            }
                        } else {
                            for (ox, o) in row.iter_mut().enumerate() {
                                *o = o.wrapping_add(padded[start + ox * sw] as i32 * w);
                            }
                        }
                    }
                }
            }
        }
    }
}
