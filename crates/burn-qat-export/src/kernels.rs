//! Integer kernels: the fast path (im2col + `rten-gemm`'s u8 x i8 -> i32 GEMM, VNNI/AVX2/NEON
//! kernels) and the scalar reference (nested loops) it is tested against. No float arithmetic
//! between quantized input and requantized output, except in a `Float` last layer.

use rten_gemm::{GemmExecutor, GemmInputA, GemmInputB, GemmOptions, QuantParams};
use rten_tensor::NdTensorView;

use crate::model::{IntConv2d, IntLinear, Output, Values, conv_output_len};

/// Shapes were checked when the model was converted or loaded (`IntLayer::output_shape`).
fn out_size(input: usize, pad: usize, dilation: usize, kernel: usize, stride: usize) -> usize {
    conv_output_len(input, pad, dilation, kernel, stride)
        .expect("shapes checked at conversion or load")
}

/// Turns per-(row, channel) accumulators (bias included) into the layer's output values, laid
/// out by `index(row, channel)`.
fn finish(
    acc: &[i32],
    rows: usize,
    channels: usize,
    output: &Output,
    shape: Vec<usize>,
    index: impl Fn(usize, usize) -> usize,
) -> Values {
    match output {
        Output::Quantized {
            act,
            requant,
            lo,
            hi,
        } => {
            let mut data = vec![0i8; rows * channels];
            for r in 0..rows {
                for c in 0..channels {
                    let q = requant[c]
                        .apply(acc[r * channels + c])
                        .saturating_add(act.zero_point);
                    data[index(r, c)] = q.clamp(*lo, *hi) as i8;
                }
            }
            Values::Int {
                data,
                shape,
                q: *act,
            }
        }
        Output::Float { scale, lo, hi } => {
            let mut data = vec![0f32; rows * channels];
            for r in 0..rows {
                for c in 0..channels {
                    data[index(r, c)] = (acc[r * channels + c] as f32 * scale[c]).clamp(*lo, *hi);
                }
            }
            Values::Float { data, shape }
        }
    }
}

fn gemm_u8_i8(a: &[u8], a_zero: u8, m: usize, k: usize, b: &[i8], n: usize) -> Vec<i32> {
    let mut out = vec![0i32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    thread_local! {
        static GEMM: GemmExecutor<u8, i8, i32> = GemmExecutor::<u8, i8, i32>::default();
    }
    let zero_points = vec![a_zero; m];
    let a = NdTensorView::from_data([m, k], a);
    let b = NdTensorView::from_data([k, n], b);
    GEMM.with(|gemm| {
        gemm.gemm(
            &mut out,
            GemmInputA::Unpacked(a),
            GemmInputB::Unpacked(b),
            GemmOptions {
                a_quant: Some(QuantParams {
                    zero_point: &zero_points,
                }),
                ..Default::default()
            },
        )
        .expect("shapes are consistent by construction")
    });
    out
}

/// Convolution, fast path: per group, im2col of `[n * oh * ow, cin_g * kh * kw]` u8 patches
/// (int8 + 128, padding = the zero point) times the `[cin_g * kh * kw, cout_g]` weights.
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

pub fn conv2d(c: &IntConv2d, x: &[i8], shape: &[usize]) -> Values {
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
    let k = cin_g * kh * kw;
    let m = n * oh * ow;
    let zp = (c.input.zero_point + 128) as u8;
    let mut acc = vec![0i32; m * c.out_channels];
    let mut patches = vec![zp; m * k];
    let mut b = vec![0i8; k * cout_g];
    for g in 0..c.groups {
        patches.fill(zp);
        for img in 0..n {
            for oy in 0..oh {
                for ox in 0..ow {
                    let row = (img * oh + oy) * ow + ox;
                    let dst = &mut patches[row * k..(row + 1) * k];
                    for ic in 0..cin_g {
                        let plane = ((img * cin + g * cin_g + ic) * h) * w;
                        for ky in 0..kh {
                            let iy = (oy * c.stride[0] + ky * c.dilation[0]) as isize
                                - c.padding[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * c.stride[1] + kx * c.dilation[1]) as isize
                                    - c.padding[2] as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let v = x[plane + iy as usize * w + ix as usize];
                                dst[(ic * kh + ky) * kw + kx] = (v as i16 + 128) as u8;
                            }
                        }
                    }
                }
            }
        }
        for oc in 0..cout_g {
            let src = &c.weight[(g * cout_g + oc) * k..(g * cout_g + oc + 1) * k];
            for (i, v) in src.iter().enumerate() {
                b[i * cout_g + oc] = *v;
            }
        }
        let part = gemm_u8_i8(&patches, zp, m, k, &b, cout_g);
        for row in 0..m {
            for oc in 0..cout_g {
                let ch = g * cout_g + oc;
                acc[row * c.out_channels + ch] = part[row * cout_g + oc].saturating_add(c.bias[ch]);
            }
        }
    }
    let cout = c.out_channels;
    finish(
        &acc,
        m,
        cout,
        &c.output,
        out_shape(shape, cout, oh, ow),
        |row, ch| {
            let (img, pix) = (row / (oh * ow), row % (oh * ow));
            (img * cout + ch) * oh * ow + pix
        },
    )
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
                    acc[((img * oh + oy) * ow + ox) * cout + oc] = sum;
                }
            }
        }
    }
    finish(
        &acc,
        n * oh * ow,
        cout,
        &c.output,
        out_shape(shape, cout, oh, ow),
        |row, ch| {
            let (img, pix) = (row / (oh * ow), row % (oh * ow));
            (img * cout + ch) * oh * ow + pix
        },
    )
}

/// Fully connected layer, fast path.
pub fn linear(l: &IntLinear, x: &[i8], shape: &[usize]) -> Values {
    let n = shape[0];
    let zp = (l.input.zero_point + 128) as u8;
    let a: Vec<u8> = x.iter().map(|v| (*v as i16 + 128) as u8).collect();
    let mut acc = gemm_u8_i8(&a, zp, n, l.in_features, &l.weight, l.out_features);
    for r in 0..n {
        for c in 0..l.out_features {
            acc[r * l.out_features + c] = acc[r * l.out_features + c].saturating_add(l.bias[c]);
        }
    }
    let out = l.out_features;
    finish(&acc, n, out, &l.output, vec![n, out], |r, c| r * out + c)
}

/// Fully connected layer, scalar reference.
pub fn linear_reference(l: &IntLinear, x: &[i8], shape: &[usize]) -> Values {
    let n = shape[0];
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
    finish(&acc, n, out, &l.output, vec![n, out], |r, c| r * out + c)
}

/// Max pooling (no padding) on integers.
pub fn max_pool2d(
    x: &[i8],
    shape: &[usize],
    kernel: [usize; 2],
    stride: [usize; 2],
) -> (Vec<i8>, Vec<usize>) {
    let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
    let oh = out_size(h, 0, 1, kernel[0], stride[0]);
    let ow = out_size(w, 0, 1, kernel[1], stride[1]);
    let mut out = vec![i8::MIN; n * c * oh * ow];
    for p in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut m = i8::MIN;
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        m = m.max(x[(p * h + oy * stride[0] + ky) * w + ox * stride[1] + kx]);
                    }
                }
                out[(p * oh + oy) * ow + ox] = m;
            }
        }
    }
    (out, vec![n, c, oh, ow])
}

/// Average pooling (no padding) on integers, on the input's grid, rounding half to even.
pub fn avg_pool2d(
    x: &[i8],
    shape: &[usize],
    kernel: [usize; 2],
    stride: [usize; 2],
    zero_point: i32,
) -> (Vec<i8>, Vec<usize>) {
    let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
    let oh = out_size(h, 0, 1, kernel[0], stride[0]);
    let ow = out_size(w, 0, 1, kernel[1], stride[1]);
    let count = (kernel[0] * kernel[1]) as i32;
    let mut out = vec![0i8; n * c * oh * ow];
    for p in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = 0i32;
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        sum += x[(p * h + oy * stride[0] + ky) * w + ox * stride[1] + kx] as i32
                            - zero_point;
                    }
                }
                let floor = sum.div_euclid(count);
                let rem2 = 2 * sum.rem_euclid(count);
                let q = if rem2 > count || (rem2 == count && floor & 1 == 1) {
                    floor + 1
                } else {
                    floor
                };
                out[(p * oh + oy) * ow + ox] = (q + zero_point).clamp(-128, 127) as i8;
            }
        }
    }
    (out, vec![n, c, oh, ow])
}
