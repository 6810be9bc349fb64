//! The fused kernels on CubeCL (the wgpu backend, and every other CubeCL runtime Burn builds):
//! one thread per element, the channel of element `i` being `(i / inner) % channels` on the
//! contiguous layout (no transpose), the same arithmetic in the same order as the composed ops
//! so that results are bit-equal on the same device.
//!
//! The per-channel reductions (LSQ's step and offset gradients, observers' min/max) write one
//! term per element in the kernel's single pass and reduce them with Burn's own CubeCL
//! reductions over a `[outer, channels, inner]` view (a reshape, not a copy).

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::FakeQuantOps;
use super::cpu::Channels;

/// The grid of one elementwise launch over `n` elements (one unit per element, at
/// `ABSOLUTE_POS`), as Burn's own elementwise kernels size it.
fn launch_grid(client: &cubecl::client::Client, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(client, n);
    (cubecl::calculate_cube_count_elemwise(client, n, dim), dim)
}

/// `clamp` that keeps NaN (as Burn's `clamp` does): comparisons with NaN are false.
#[cube]
fn clamp_keep_nan<F: Float>(q: F, lo: F, hi: F) -> F {
    let mut out = q;
    if q < lo {
        out = lo;
    }
    if q > hi {
        out = hi;
    }
    out
}

/// `y` clamped to `[-limit, limit]`, NaN kept: outputs saturate at the edge of `f32` (the
/// kernels take `limit = f32::MAX` as a launch scalar, not a literal the shader compiler would
/// have to print exactly).
#[cube]
fn saturate<F: Float>(y: F, limit: f32) -> F {
    let hi = F::cast_from(limit);
    clamp_keep_nan::<F>(y, F::new(0.0) - hi, hi)
}

/// The channel of element `i` (see [`ChannelMode`]): integer division and remainder are
/// skipped where the layout makes them trivial (software Vulkan runs them per element on the
/// CPU, where they do not vectorize).
#[cube]
fn channel_of(i: usize, inner: usize, channels: usize, #[comptime] mode: u32) -> usize {
    let mut c = 0;
    if comptime!(mode == ChannelMode::Outer as u32) {
        c = i / inner;
    } else if comptime!(mode == ChannelMode::Inner as u32) {
        c = i % channels;
    } else if comptime!(mode == ChannelMode::General as u32) {
        c = (i / inner) % channels;
    }
    c
}

/// How a kernel finds an element's channel, fixed per launch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChannelMode {
    /// One channel: 0.
    PerTensor = 0,
    /// The channel axis is the outermost: `i / inner`.
    Outer = 1,
    /// The channel axis is the innermost: `i % channels`.
    Inner = 2,
    /// `(i / inner) % channels`.
    General = 3,
}

impl ChannelMode {
    /// The mode of a layout over `n` elements.
    fn of(ch: Channels, n: usize) -> u32 {
        let mode = if ch.channels <= 1 {
            Self::PerTensor
        } else if ch.inner == 1 {
            Self::Inner
        } else if n == ch.channels * ch.inner {
            Self::Outer
        } else {
            Self::General
        };
        mode as u32
    }
}

#[cube(launch)]
fn fake_quant_kernel<F: Float>(
    x: &Tensor<F>,
    scale: &Tensor<F>,
    zero_point: &Tensor<F>,
    out: &mut Tensor<F>,
    inner: usize,
    channels: usize,
    #[comptime] mode: u32,
    qmin: f32,
    qmax: f32,
    limit: f32,
    #[comptime] half_up: bool,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let c = channel_of(i, inner, channels, mode);
    let s = scale[c];
    let zp = zero_point[c];
    let v = x[i] / s;
    let mut r = F::round(v);
    if comptime!(half_up) {
        r = F::floor(v + F::new(0.5));
    }
    let q = clamp_keep_nan::<F>(r + zp, F::cast_from(qmin), F::cast_from(qmax));
    out[i] = saturate::<F>((q - zp) * s, limit);
}

#[cube(launch)]
fn fake_quant_grad_kernel<F: Float>(
    grad: &Tensor<F>,
    x: &Tensor<F>,
    scale: &Tensor<F>,
    zero_point: &Tensor<F>,
    out: &mut Tensor<F>,
    inner: usize,
    channels: usize,
    #[comptime] mode: u32,
    qmin: f32,
    qmax: f32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let c = channel_of(i, inner, channels, mode);
    let v = x[i] / scale[c] + zero_point[c];
    let mut g = F::new(0.0);
    if v >= F::cast_from(qmin) && v <= F::cast_from(qmax) {
        g = grad[i];
    }
    out[i] = g;
}

#[cube(launch)]
fn lsq_kernel<F: Float>(
    x: &Tensor<F>,
    step: &Tensor<F>,
    offset: &Tensor<F>,
    out: &mut Tensor<F>,
    inner: usize,
    channels: usize,
    #[comptime] mode: u32,
    qmin: f32,
    qmax: f32,
    limit: f32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let c = channel_of(i, inner, channels, mode);
    let s = step[c];
    let o = offset[c];
    let v = clamp_keep_nan::<F>((x[i] - o) / s, F::cast_from(qmin), F::cast_from(qmax));
    out[i] = saturate::<F>(F::round(v) * s + o, limit);
}

/// LSQ's backward: `dx` (kept inside the range), and per element the step's term
/// `grad * (round(v) - v | qmin | qmax)` and the offset's term `grad` outside the range; all
/// three 0 where the forward value saturated (beyond `limit`).
#[cube(launch)]
fn lsq_grad_kernel<F: Float>(
    grad: &Tensor<F>,
    x: &Tensor<F>,
    step: &Tensor<F>,
    offset: &Tensor<F>,
    dx: &mut Tensor<F>,
    step_terms: &mut Tensor<F>,
    offset_terms: &mut Tensor<F>,
    inner: usize,
    channels: usize,
    #[comptime] mode: u32,
    qmin: f32,
    qmax: f32,
    limit: f32,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= dx.len() {
        terminate!();
    }
    let c = channel_of(i, inner, channels, mode);
    let lo = F::cast_from(qmin);
    let hi = F::cast_from(qmax);
    let v = (x[i] - offset[c]) / step[c];
    let zero = F::new(0.0);
    let y = F::round(clamp_keep_nan::<F>(v, lo, hi)) * step[c] + offset[c];
    let mut g = grad[i];
    if F::abs(y) > F::cast_from(limit) {
        g = zero;
    }
    let mut d = zero;
    let mut ds = zero;
    let mut doff = zero;
    if v >= lo && v <= hi {
        d = g;
        ds = g * (F::round(v) - v);
    } else if v < lo {
        ds = g * lo;
        doff = g;
    } else if v > hi {
        ds = g * hi;
        doff = g;
    }
    // NaN: no comparison holds, every output stays 0.
    dx[i] = d;
    step_terms[i] = ds;
    offset_terms[i] = doff;
}

/// `min(max(x, lo), hi)` as Burn's `max_pair` then `min_pair` compute it.
#[cube]
fn clip<F: Float>(x: F, lo: F, hi: F) -> F {
    let mut t = x;
    if x < lo {
        t = lo;
    }
    if hi < t {
        t = hi;
    }
    t
}

#[cube(launch)]
fn clip_fake_quant_kernel<F: Float>(
    x: &Tensor<F>,
    lo: &Tensor<F>,
    hi: &Tensor<F>,
    scale: &Tensor<F>,
    zero_point: &Tensor<F>,
    out: &mut Tensor<F>,
    qmin: f32,
    qmax: f32,
    limit: f32,
    #[comptime] half_up: bool,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let s = scale[0];
    let zp = zero_point[0];
    let t = clip::<F>(x[i], lo[0], hi[0]);
    let v = t / s;
    let mut r = F::round(v);
    if comptime!(half_up) {
        r = F::floor(v + F::new(0.5));
    }
    let q = saturate::<F>(
        (clamp_keep_nan::<F>(r + zp, F::cast_from(qmin), F::cast_from(qmax)) - zp) * s,
        limit,
    );
    out[i] = t + (q - t);
}

/// The clip's backward: `dx` where `x` passed the clip, and per element the terms of the two
/// clips' gradients (`grad` where `lo`, resp. `hi`, was taken).
#[cube(launch)]
fn clip_grad_kernel<F: Float>(
    grad: &Tensor<F>,
    x: &Tensor<F>,
    lo: &Tensor<F>,
    hi: &Tensor<F>,
    dx: &mut Tensor<F>,
    lo_terms: &mut Tensor<F>,
    hi_terms: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= dx.len() {
        terminate!();
    }
    let l = lo[0];
    let h = hi[0];
    let xv = x[i];
    let g = grad[i];
    let zero = F::new(0.0);
    let below = xv < l;
    let mut t = xv;
    if below {
        t = l;
    }
    let above = h < t;
    let mut d = g;
    let mut dl = zero;
    let mut dh = zero;
    if above {
        dh = g;
        d = zero;
    } else if below {
        dl = g;
        d = zero;
    }
    dx[i] = d;
    lo_terms[i] = dl;
    hi_terms[i] = dh;
}

/// `x` with NaN and infinities replaced by 0 (which every observed range contains).
#[cube(launch)]
fn finite_or_zero_kernel<F: Float>(
    x: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let v = x[i];
    let mut o = F::new(0.0);
    // False for NaN (every comparison is) and for infinities.
    if F::abs(v) <= F::max_value() {
        o = v;
    }
    out[i] = o;
}

fn f32_type() -> ElemType {
    dtype_to_storage_type(DType::F32)
}

/// A fresh tensor like `like` (contiguous, same device and dtype).
fn empty_like(like: &CubeTensor) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        like.shape(),
        like.dtype,
    )
}

/// The channel layout of `x` for parameters of `params` values along `axis`.
fn layout(x: &CubeTensor, axis: usize, params: usize) -> Channels {
    Channels::of(x.shape().as_slice(), axis, params)
}

/// The shape that broadcasts `channels` values along `axis` of `x` (all ones but `axis`; all
/// ones per tensor).
fn broadcast_shape(x: &CubeTensor, axis: usize, channels: usize) -> Shape {
    let rank = x.shape().num_dims();
    let mut dims = vec![1; rank];
    if channels > 1 && axis < rank {
        dims[axis] = channels;
    }
    Shape::from(dims)
}

/// Reduces `t` (shaped like the tensor the layout describes) per channel with `reduce_dim`
/// (one of Burn's `*_dim` reductions) over a `[outer, channels, inner]` view (a reshape, not a
/// copy): `[channels]`. Dimensions of size 1 are not reduced (Burn runs that as a full copy).
fn per_channel(
    t: CubeTensor,
    ch: Channels,
    reduce_dim: impl Fn(CubeTensor, usize) -> CubeTensor,
) -> CubeTensor {
    let n = t.shape().num_elements();
    let outer = n / (ch.channels * ch.inner).max(1);
    let mut t = CubeBackend::float_reshape(t, Shape::new([outer, ch.channels, ch.inner]));
    if ch.inner > 1 {
        t = reduce_dim(t, 2);
    }
    if outer > 1 {
        t = reduce_dim(t, 0);
    }
    CubeBackend::float_reshape(t, Shape::new([ch.channels]))
}

/// Sums `terms` per channel (see [`per_channel`]).
fn sum_per_channel(terms: CubeTensor, ch: Channels) -> CubeTensor {
    per_channel(terms, ch, CubeBackend::float_sum_dim)
}

impl FakeQuantOps for CubeBackend {
    fn qat_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let (scale, zero_point) = (into_contiguous(scale), into_contiguous(zero_point));
        let ch = layout(&x, axis, scale.shape().num_elements());
        let out = empty_like(&x);
        let n = x.shape().num_elements();
        let (count, dim) = launch_grid(&x.client, n);
        fake_quant_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            scale.into_tensor_arg(),
            zero_point.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            ch.inner,
            ch.channels,
            ChannelMode::of(ch, n),
            qmin,
            qmax,
            f32::MAX,
            half_up,
            f32_type(),
        );
        out
    }

    fn qat_fake_quant_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> FloatTensor<Self> {
        let (grad, x) = (into_contiguous(grad), into_contiguous(x));
        let (scale, zero_point) = (into_contiguous(scale), into_contiguous(zero_point));
        let ch = layout(&x, axis, scale.shape().num_elements());
        let out = empty_like(&x);
        let n = x.shape().num_elements();
        let (count, dim) = launch_grid(&x.client, n);
        fake_quant_grad_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            grad.into_tensor_arg(),
            x.into_tensor_arg(),
            scale.into_tensor_arg(),
            zero_point.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            ch.inner,
            ch.channels,
            ChannelMode::of(ch, n),
            qmin,
            qmax,
            f32_type(),
        );
        out
    }

    fn qat_lsq(
        x: FloatTensor<Self>,
        step: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let (step, offset) = (into_contiguous(step), into_contiguous(offset));
        let ch = layout(&x, axis, step.shape().num_elements());
        let out = empty_like(&x);
        let n = x.shape().num_elements();
        let (count, dim) = launch_grid(&x.client, n);
        lsq_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            step.into_tensor_arg(),
            offset.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            ch.inner,
            ch.channels,
            ChannelMode::of(ch, n),
            qmin,
            qmax,
            f32::MAX,
            f32_type(),
        );
        out
    }

    fn qat_lsq_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        step: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (grad, x) = (into_contiguous(grad), into_contiguous(x));
        let (step, offset) = (into_contiguous(step), into_contiguous(offset));
        let ch = layout(&x, axis, step.shape().num_elements());
        let dx = empty_like(&x);
        let step_terms = empty_like(&x);
        let offset_terms = empty_like(&x);
        let n = x.shape().num_elements();
        let (count, dim) = launch_grid(&x.client, n);
        lsq_grad_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            grad.into_tensor_arg(),
            x.into_tensor_arg(),
            step.into_tensor_arg(),
            offset.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            step_terms.clone().into_tensor_arg(),
            offset_terms.clone().into_tensor_arg(),
            ch.inner,
            ch.channels,
            ChannelMode::of(ch, n),
            qmin,
            qmax,
            f32::MAX,
            f32_type(),
        );
        (
            dx,
            sum_per_channel(step_terms, ch),
            sum_per_channel(offset_terms, ch),
        )
    }

    fn qat_clip_fake_quant(
        x: FloatTensor<Self>,
        lo: FloatTensor<Self>,
        hi: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> FloatTensor<Self> {
        let x = into_contiguous(x);
        let out = empty_like(&x);
        let (count, dim) = launch_grid(&x.client, x.shape().num_elements());
        clip_fake_quant_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            into_contiguous(lo).into_tensor_arg(),
            into_contiguous(hi).into_tensor_arg(),
            into_contiguous(scale).into_tensor_arg(),
            into_contiguous(zero_point).into_tensor_arg(),
            out.clone().into_tensor_arg(),
            qmin,
            qmax,
            f32::MAX,
            half_up,
            f32_type(),
        );
        out
    }

    fn qat_clip_fake_quant_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        lo: FloatTensor<Self>,
        hi: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (grad, x) = (into_contiguous(grad), into_contiguous(x));
        let dx = empty_like(&x);
        let lo_terms = empty_like(&x);
        let hi_terms = empty_like(&x);
        let n = x.shape().num_elements();
        let (count, dim) = launch_grid(&x.client, n);
        clip_grad_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            grad.into_tensor_arg(),
            x.into_tensor_arg(),
            into_contiguous(lo).into_tensor_arg(),
            into_contiguous(hi).into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            lo_terms.clone().into_tensor_arg(),
            hi_terms.clone().into_tensor_arg(),
            f32_type(),
        );
        let whole = layout(&dx, 0, 1);
        (
            dx,
            sum_per_channel(lo_terms, whole),
            sum_per_channel(hi_terms, whole),
        )
    }

    fn qat_min_max(
        x: FloatTensor<Self>,
        axis: usize,
        channels: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let x = into_contiguous(x);
        let ch = layout(&x, axis, channels);
        let clean = empty_like(&x);
        let n = x.shape().num_elements();
        let (count, dim) = launch_grid(&x.client, n);
        finite_or_zero_kernel::launch(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            clean.clone().into_tensor_arg(),
            f32_type(),
        );
        let lo = per_channel(clean.clone(), ch, CubeBackend::float_min_dim);
        let hi = per_channel(clean, ch, CubeBackend::float_max_dim);
        (
            CubeBackend::float_clamp_max(lo, 0.0f32.into()),
            CubeBackend::float_clamp_min(hi, 0.0f32.into()),
        )
    }

    fn qat_divide_add(
        z: FloatTensor<Self>,
        divisor: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        axis: usize,
    ) -> FloatTensor<Self> {
        // Two elementwise ops, which the fusion wrapper around this backend merges anyway.
        let shape = broadcast_shape(&z, axis, divisor.shape().num_elements());
        let d = CubeBackend::float_reshape(divisor, shape.clone());
        let b = CubeBackend::float_reshape(bias, shape);
        CubeBackend::float_add(CubeBackend::float_div(z, d), b)
    }

    fn qat_divide_add_grad(
        grad: FloatTensor<Self>,
        z: FloatTensor<Self>,
        divisor: FloatTensor<Self>,
        axis: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (grad, z) = (into_contiguous(grad), into_contiguous(z));
        let channels = divisor.shape().num_elements();
        let ch = layout(&z, axis, channels);
        let shape = broadcast_shape(&z, axis, channels);
        let d = CubeBackend::float_reshape(divisor.clone(), shape);
        let dz = CubeBackend::float_mul(grad.clone(), CubeBackend::float_recip(d));
        let gz = sum_per_channel(CubeBackend::float_mul(grad.clone(), z), ch);
        let dd = CubeBackend::float_neg(CubeBackend::float_div(
            gz,
            CubeBackend::float_mul(divisor.clone(), divisor),
        ));
        (dz, dd, sum_per_channel(grad, ch))
    }
}
