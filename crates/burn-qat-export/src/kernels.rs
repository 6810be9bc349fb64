//! Integer kernels of convolutions and linear layers: the fast path (im2col + `rten-gemm`'s
//! u8 x i8 -> i32 GEMM, VNNI/AVX2/NEON kernels; a direct kernel for depthwise convolutions) and
//! the scalar reference (nested loops) they are tested against. No float arithmetic between
//! quantized input and requantized output, except in a `Float` last layer. Public for
//! benchmarks and tests; [`IntegerModel::forward`](crate::IntegerModel::forward) picks the
//! kernel and checks the shapes first (these functions expect shapes that fit the layer).

use rayon::prelude::*;
use rten_gemm::{
    BiasVector, GemmExecutor, GemmInputA, GemmInputB, GemmOptions, PackedBMatrix, QuantParams,
};
use rten_tensor::NdTensorView;

use std::sync::OnceLock;

use crate::model::{IntConv2d, IntLinear, Output, conv_output_len};
use crate::run::Values;

/// Shapes were checked when the model was converted or loaded (`IntLayer::output_shape`).
fn out_size(input: usize, pad: usize, dilation: usize, kernel: usize, stride: usize) -> usize {
    conv_output_len(input, pad, dilation, kernel, stride)
        .expect("shapes checked at conversion or load")
}

/// Requantizes accumulators (bias included) laid out `[.., channels, inner]` (each channel's
/// `inner` values contiguous, the channels repeating) to the output grid, each channel with its
/// own fixed-point multiplier, into `dst` (same layout).
fn requantize_rows(acc: &[i32], inner: usize, output: &Output, dst: &mut [i8]) {
    let Output::Quantized {
        grid,
        requant,
        lo,
        hi,
    } = output
    else {
        unreachable!("called for quantized outputs")
    };
    for (i, (row, dst)) in acc.chunks(inner).zip(dst.chunks_mut(inner)).enumerate() {
        requant[i % requant.len()].requantize(row, grid.zero_point, *lo, *hi, dst);
    }
}

/// [`requantize_rows`] for a float last layer: each channel scaled by `s_in * s_w`, clamped.
fn scale_rows(acc: &[i32], inner: usize, output: &Output, dst: &mut [f32]) {
    let Output::Float { scale, lo, hi } = output else {
        unreachable!("called for float outputs")
    };
    for (i, (row, dst)) in acc.chunks(inner).zip(dst.chunks_mut(inner)).enumerate() {
        let s = scale[i % scale.len()];
        for (o, a) in dst.iter_mut().zip(row) {
            *o = (*a as f32 * s).clamp(*lo, *hi);
        }
    }
}

/// The layer's output values from accumulators laid out `[.., channels, inner]`.
fn output_values(output: &Output, acc: &[i32], inner: usize, shape: Vec<usize>) -> Values {
    match output {
        Output::Quantized { grid, .. } => {
            let mut data = vec![0i8; acc.len()];
            requantize_rows(acc, inner, output, &mut data);
            Values::Int {
                data,
                shape,
                grid: *grid,
            }
        }
        Output::Float { .. } => {
            let mut data = vec![0f32; acc.len()];
            scale_rows(acc, inner, output, &mut data);
            Values::Float { data, shape }
        }
    }
}

/// Runs `f` with this thread's GEMM executor (VNNI, AVX2, NEON or generic kernels, chosen at
/// run time; every executor of a machine picks the same kernel, so packed weights are shared).
fn with_gemm<R>(f: impl FnOnce(&GemmExecutor<u8, i8, i32>) -> R) -> R {
    thread_local! {
        static GEMM: GemmExecutor<u8, i8, i32> = GemmExecutor::default();
    }
    GEMM.with(f)
}

/// Weights packed for the GEMM, once per node, kept by the model's weight cache (not saved).
pub enum Packed {
    /// The `[cout, cin_g * kh * kw]` weights as the u8 left operand (int8 + 128, zero point
    /// 128). Not packed: rten-gemm's int8 kernels take the left operand's zero points from the
    /// packing, and `prepack_a` records none.
    Conv(Vec<u8>),
    /// The `[in, out]` weights as the i8 right operand.
    Linear(PackedBMatrix<i8>),
}

/// `[n, c, h, w]`, with `[n, c, length]` read as `h = 1`.
fn nchw(shape: &[usize]) -> [usize; 4] {
    if shape.len() == 3 {
        [shape[0], shape[1], 1, shape[2]]
    } else {
        [shape[0], shape[1], shape[2], shape[3]]
    }
}

fn out_shape(input: &[usize], cout: usize, oh: usize, ow: usize) -> Vec<usize> {
    if input.len() == 3 {
        vec![input[0], cout, ow]
    } else {
        vec![input[0], cout, oh, ow]
    }
}

/// Convolution, fast path. Per image and group, `weights [cout_g, cin_g * kh * kw]` times the
/// im2col matrix `[cin_g * kh * kw, oh * ow]` of the image (built row by row with slice copies
/// from the image padded with the input zero point; rten-gemm's own im2col gather through
/// offsets cost three times the multiply-adds), with the bias added by the GEMM: the result is
/// `[cout, oh * ow]`, already NCHW, and each output channel is requantized as one contiguous row
/// with one multiplier. Images run in parallel.
pub fn conv2d(c: &IntConv2d, cache: &OnceLock<Packed>, x: &[i8], shape: &[usize]) -> Values {
    let plan = ConvPlan::new(c, shape);
    let per_image = c.out_channels * plan.p;
    let n = shape[0];
    let shape = out_shape(shape, c.out_channels, plan.oh, plan.ow);
    match &c.output {
        Output::Quantized { grid, .. } => {
            let mut data = vec![0i8; n * per_image];
            plan.run(c, cache, x, &mut data, |acc, dst| {
                requantize_rows(acc, plan.p, &c.output, dst)
            });
            Values::Int {
                data,
                shape,
                grid: *grid,
            }
        }
        Output::Float { .. } => {
            let mut data = vec![0f32; n * per_image];
            plan.run(c, cache, x, &mut data, |acc, dst| {
                scale_rows(acc, plan.p, &c.output, dst)
            });
            Values::Float { data, shape }
        }
    }
}

/// The geometry of one convolution call.
struct ConvPlan {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
    cin_g: usize,
    cout_g: usize,
    k: usize,
    p: usize,
}

impl ConvPlan {
    fn new(c: &IntConv2d, shape: &[usize]) -> Self {
        let [n, cin, h, w] = nchw(shape);
        let [kh, kw] = c.kernel;
        let [top, bottom, left, right] = c.padding;
        let oh = out_size(h, top + bottom, c.dilation[0], kh, c.stride[0]);
        let ow = out_size(w, left + right, c.dilation[1], kw, c.stride[1]);
        let (cin_g, cout_g) = (cin / c.groups, c.out_channels / c.groups);
        Self {
            n,
            cin,
            h,
            w,
            ph: h + top + bottom,
            pw: w + left + right,
            oh,
            ow,
            cin_g,
            cout_g,
            k: cin_g * kh * kw,
            p: oh * ow,
        }
    }

    /// Runs every image (in parallel), handing each image's `[cout, p]` accumulators and its
    /// slice of `out` to `write`.
    fn run<T: Send>(
        &self,
        c: &IntConv2d,
        cache: &OnceLock<Packed>,
        x: &[i8],
        out: &mut [T],
        write: impl Fn(&[i32], &mut [T]) + Sync,
    ) {
        let per_image = c.out_channels * self.p;
        if per_image == 0 || self.n == 0 {
            return;
        }
        let packed = cache
            .get_or_init(|| Packed::Conv(c.weight.iter().map(|v| (*v as u8) ^ 0x80).collect()));
        let Packed::Conv(weights) = packed else {
            unreachable!("a convolution keeps its weights as Packed::Conv")
        };
        let image_len = self.cin * self.h * self.w;
        if self.n == 1 {
            // One image: no hand-off to the thread pool (the GEMM still splits its blocks).
            let mut acc = vec![0i32; per_image];
            self.image(c, weights, x, &mut acc, &mut Vec::new(), &mut Vec::new());
            write(&acc, out);
            return;
        }
        out.par_chunks_mut(per_image).enumerate().for_each_init(
            || (vec![0i32; per_image], Vec::new(), Vec::new()),
            |(acc, padded, cols), (img, dst)| {
                let image = &x[img * image_len..(img + 1) * image_len];
                self.image(c, weights, image, acc, padded, cols);
                write(acc, dst);
            },
        );
    }

    /// The `[cout, p]` accumulators (bias included) of one image.
    fn image(
        &self,
        c: &IntConv2d,
        weights: &[u8],
        image: &[i8],
        acc: &mut [i32],
        padded: &mut Vec<i8>,
        cols: &mut Vec<i8>,
    ) {
        let [top, bottom, left, right] = c.padding;
        let (h, w, ph, pw, p) = (self.h, self.w, self.ph, self.pw, self.p);
        let zp = c.input.zero_point as i8;
        let image = if top + bottom + left + right > 0 {
            padded.clear();
            padded.resize(self.cin * ph * pw, zp);
            for (ch, plane) in image.chunks(h * w).enumerate() {
                for (y, row) in plane.chunks(w).enumerate() {
                    let at = (ch * ph + top + y) * pw + left;
                    padded[at..at + w].copy_from_slice(row);
                }
            }
            &padded[..]
        } else {
            image
        };
        let b_zero = vec![zp; p];
        let a_zero = vec![128u8; self.cout_g];
        let group_len = self.cin_g * ph * pw;
        let ([kh, kw], [sh, sw], [dh, dw]) = (c.kernel, c.stride, c.dilation);
        let (oh, ow) = (self.oh, self.ow);
        with_gemm(|gemm| {
            for g in 0..c.groups {
                // The im2col rows `(ic, ky, kx)`, columns `(oy, ox)`.
                let group = &image[g * group_len..(g + 1) * group_len];
                cols.clear();
                cols.resize(self.k * p, 0);
                let mut rows = cols.chunks_exact_mut(p.max(1));
                for ic in 0..self.cin_g {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let row = rows.next().expect("k rows of p columns");
                            for (oy, out) in row.chunks_exact_mut(ow.max(1)).enumerate().take(oh) {
                                let at = (ic * ph + oy * sh + ky * dh) * pw + kx * dw;
                                if sw == 1 {
                                    out.copy_from_slice(&group[at..at + ow]);
                                } else {
                                    for (ox, v) in out.iter_mut().enumerate() {
                                        *v = group[at + ox * sw];
                                    }
                                }
                            }
                        }
                    }
                }
                let groups = g * self.cout_g..(g + 1) * self.cout_g;
                gemm.gemm(
                    &mut acc[groups.start * p..groups.end * p],
                    GemmInputA::Unpacked(NdTensorView::from_data(
                        [self.cout_g, self.k],
                        &weights[groups.start * self.k..groups.end * self.k],
                    )),
                    GemmInputB::Unpacked(NdTensorView::from_data([self.k, p], &cols[..])),
                    GemmOptions {
                        bias: Some(BiasVector::Column(&c.bias[groups])),
                        a_quant: Some(QuantParams {
                            zero_point: &a_zero,
                        }),
                        b_quant: Some(QuantParams {
                            zero_point: &b_zero,
                        }),
                        ..Default::default()
                    },
                )
                .expect("shapes are consistent by construction");
            }
        });
    }
}

/// Convolution, scalar reference: the definition, one multiply-add at a time, in `i32`.
pub fn conv2d_reference(c: &IntConv2d, x: &[i8], shape: &[usize]) -> Values {
    let [n, cin, h, w] = nchw(shape);
    let [kh, kw] = c.kernel;
    let oh = out_size(
        h,
        c.padding[0] + c.padding[1],
        c.dilation[0],
        kh,
        c.stride[0],
    );
    let ow = out_size(
        w,
        c.padding[2] + c.padding[3],
        c.dilation[1],
        kw,
        c.stride[1],
    );
    let (cin_g, cout_g) = (cin / c.groups, c.out_channels / c.groups);
    let cout = c.out_channels;
    let mut acc = vec![0i32; n * oh * ow * cout];
    for img in 0..n {
        for oc in 0..cout {
            let g = oc / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut sum = c.bias[oc];
                    for ic in 0..cin_g {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize
                                    - c.padding[0] as isize;
                                let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize
                                    - c.padding[2] as isize;
                                let v = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                {
                                    c.input.zero_point
                                } else {
                                    x[((img * cin + g * cin_g + ic) * h + iy as usize) * w
                                        + ix as usize] as i32
                                };
                                let wv = c.weight[((oc * cin_g + ic) * kh + ky) * kw + kx] as i32;
                                sum += (v - c.input.zero_point) * wv;
                            }
                        }
                    }
                    acc[((img * cout + oc) * oh + oy) * ow + ox] = sum;
                }
            }
        }
    }
    output_values(&c.output, &acc, oh * ow, out_shape(shape, cout, oh, ow))
}

/// Fully connected layer, fast path: `x [n, in]` (as u8, int8 + 128) times the `[in, out]`
/// weights (packed once; a single row takes rten-gemm's matrix-vector kernel on the unpacked
/// weights), the bias added by the GEMM.
pub fn linear(l: &IntLinear, cache: &OnceLock<Packed>, x: &[i8], shape: &[usize]) -> Values {
    let n = x.len() / l.in_features.max(1);
    let out = l.out_features;
    with_gemm(|gemm| {
        let a: Vec<u8> = x.iter().map(|v| (*v as u8) ^ 0x80).collect();
        let a_zero = vec![(l.input.zero_point + 128) as u8; n];
        let weights = NdTensorView::from_data([l.in_features, out], &l.weight[..]);
        let b = if n == 1 {
            GemmInputB::Unpacked(weights)
        } else {
            let Packed::Linear(packed) =
                cache.get_or_init(|| Packed::Linear(gemm.prepack_b(weights)))
            else {
                unreachable!("a linear layer packs its weights as Packed::Linear")
            };
            GemmInputB::Packed(packed)
        };
        let mut acc = vec![0i32; n * out];
        gemm.gemm(
            &mut acc,
            GemmInputA::Unpacked(NdTensorView::from_data([n, l.in_features], &a[..])),
            b,
            GemmOptions {
                bias: Some(BiasVector::Row(&l.bias)),
                a_quant: Some(QuantParams {
                    zero_point: &a_zero,
                }),
                ..Default::default()
            },
        )
        .expect("shapes are consistent by construction");
        output_values(&l.output, &acc, 1, linear_shape(shape, out))
    })
}

/// Fully connected layer, scalar reference.
pub fn linear_reference(l: &IntLinear, x: &[i8], shape: &[usize]) -> Values {
    let n = x.len() / l.in_features.max(1);
    let out = l.out_features;
    let mut acc = vec![0i32; n * out];
    for r in 0..n {
        for c in 0..out {
            let mut sum = l.bias[c];
            for i in 0..l.in_features {
                sum += (x[r * l.in_features + i] as i32 - l.input.zero_point)
                    * l.weight[i * out + c] as i32;
            }
            acc[r * out + c] = sum;
        }
    }
    output_values(&l.output, &acc, 1, linear_shape(shape, out))
}

fn linear_shape(shape: &[usize], out: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(last) = s.last_mut() {
        *last = out;
    }
    s
}

/// Depthwise convolution (one input and one output channel per group), direct: per plane, the
/// input minus its zero point (padding contributes 0) in `i16`, then one multiply-add of a
/// weight with a whole output row per kernel tap, in `i32`; planes run in parallel. The
/// MobileNet hot spot: a GEMM per channel would run `n * c` tiny matrix products.
pub fn depthwise_conv2d(c: &IntConv2d, x: &[i8], shape: &[usize]) -> Values {
    let [n, ch, h, w] = nchw(shape);
    let [kh, kw] = c.kernel;
    let [top, bottom, left, right] = c.padding;
    let oh = out_size(h, top + bottom, c.dilation[0], kh, c.stride[0]);
    let ow = out_size(w, left + right, c.dilation[1], kw, c.stride[1]);
    let (ph, pw) = (h + top + bottom, w + left + right);
    let zp = c.input.zero_point;
    let mut acc = vec![0i32; n * ch * oh * ow];
    if acc.is_empty() {
        return output_values(
            &c.output,
            &acc,
            oh * ow,
            out_shape(shape, c.out_channels, oh, ow),
        );
    }
    let plane = |(p, dst): (usize, &mut [i32]), padded: &mut Vec<i16>| {
        let chan = p % ch;
        padded.clear();
        padded.resize(ph * pw, 0);
        let src = &x[p * h * w..(p + 1) * h * w];
        for (y, row) in src.chunks(w).enumerate() {
            let at = (top + y) * pw + left;
            for (d, v) in padded[at..at + w].iter_mut().zip(row) {
                *d = *v as i16 - zp as i16;
            }
        }
        dst.fill(c.bias[chan]);
        let taps = &c.weight[chan * kh * kw..(chan + 1) * kh * kw];
        for oy in 0..oh {
            let out_row = &mut dst[oy * ow..(oy + 1) * ow];
            for ky in 0..kh {
                let row = &padded[(oy * c.stride[0] + ky * c.dilation[0]) * pw..];
                for kx in 0..kw {
                    let wv = taps[ky * kw + kx] as i32;
                    let start = kx * c.dilation[1];
                    if c.stride[1] == 1 {
                        for (o, v) in out_row.iter_mut().zip(&row[start..start + ow]) {
                            *o += wv * *v as i32;
                        }
                    } else {
                        for (ox, o) in out_row.iter_mut().enumerate() {
                            *o += wv * row[start + ox * c.stride[1]] as i32;
                        }
                    }
                }
            }
        }
    };
    if n * ch * oh * ow < 1 << 14 {
        let mut padded = Vec::new();
        acc.chunks_mut(oh * ow.max(1))
            .enumerate()
            .for_each(|item| plane(item, &mut padded));
    } else {
        acc.par_chunks_mut(oh * ow.max(1))
            .enumerate()
            .for_each_init(Vec::new, |padded, item| plane(item, padded));
    }
    output_values(
        &c.output,
        &acc,
        oh * ow,
        out_shape(shape, c.out_channels, oh, ow),
    )
}
