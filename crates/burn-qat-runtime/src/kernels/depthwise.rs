//! Depthwise convolutions on AVX-512 VNNI with VBMI: per output row, sixteen outputs at a time,
//! one 64-byte load of a padded input row per kernel row and group of four taps, `vpermb` to
//! lay each output's four taps side by side (`x[l sw + j dw]` in lane `l`, byte `j`), one
//! `vpdpbusd` against the four weights. No im2col words are built: the GEMM path spent more on
//! building them than on the multiply-adds for these layers. Other CPUs and shapes run the GEMM
//! path; both equal the scalar reference.

use crate::model::IntConv2d;

/// A depthwise layer's weights as words of four taps of one kernel row, `[c, kh, groups]`
/// (`groups = ceil(kw / 4)`, missing taps 0).
pub(crate) struct DepthwiseWords {
    pub groups: usize,
    pub words: Vec<u32>,
}

impl DepthwiseWords {
    /// `None` where the direct kernel does not run this layer (CPU or shape).
    pub(crate) fn new(c: &IntConv2d) -> Option<Self> {
        if !supported(c) {
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

/// Whether the CPU has the instructions and the window fits one 64-byte load per sixteen
/// outputs (`15 sw + 3 dw < 64`).
fn supported(c: &IntConv2d) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        c.is_depthwise()
            && super::uses_vnni()
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && c.stride[1]
                .checked_mul(15)
                .and_then(|s| c.dilation[1].checked_mul(3).and_then(|d| s.checked_add(d)))
                .is_some_and(|span| span < 64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = c;
        false
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
    // The furthest load: the last row's last block of sixteen, last kernel row and group.
    let last = ((g.oh - 1) * g.stride[0] + (g.kh - 1) * g.dilation[0]) * g.pw
        + (g.ow - 1) / 16 * 16 * g.stride[1]
        + 4 * (groups - 1) * g.dilation[1];
    assert!(last + 64 <= padded.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked the features before these words were built; every load is at
    // most `last + 64 <= padded.len()`, stores are masked to `oh * ow <= out.len()`.
    unsafe {
        x86::plane(padded, words, groups, bias, g, out)
    }
}

/// Bytes a padded plane needs after its last row.
pub(crate) fn slack(c: &IntConv2d) -> usize {
    64 + 16 * c.stride[1] + 4 * c.kernel[1].div_ceil(4) * c.dilation[1]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Plane;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    pub(super) unsafe fn plane(
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
                        let v = unsafe { _mm512_loadu_si512(padded.as_ptr().add(at) as *const _) };
                        let x = _mm512_permutexvar_epi8(index, v);
                        let w = _mm512_set1_epi32(words[ky * groups + q] as i32);
                        acc = _mm512_dpbusd_epi32(acc, x, w);
                    }
                }
                unsafe {
                    _mm512_mask_storeu_epi32(out.as_mut_ptr().add(oy * g.ow + ox), mask, acc)
                };
                ox += 16;
            }
        }
    }
}
