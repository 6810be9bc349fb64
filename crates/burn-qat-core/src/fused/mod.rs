//! Fused fake quantization: one pass over the tensor for the forward, one for the backward.
//!
//! [`tensor::fake_quant`](crate::tensor::fake_quant) written with Burn's tensor API costs about
//! fifteen elementwise ops (divide, round, add, clamp, subtract, multiply, and the comparisons
//! and masks of the straight-through estimator), each a pass over memory. Here the same
//! arithmetic runs as one Burn backend extension op ([`FakeQuantOps`]) per pass, with a
//! hand-written backward (`Backward` of Burn's autodiff) that recomputes the in-range mask
//! from `x` instead of storing it.
//!
//! Kernels exist for the CPU backends, `flex` and `ndarray` ([`cpu`]): tight loops over the
//! buffer, channels walked in contiguous runs (no transpose), split across threads above
//! [`cpu::PARALLEL_MIN`] elements; and, with the `wgpu` feature, for every CubeCL runtime (one
//! thread per element, registered with Burn's fusion wrapper as an opaque op). On Burn's
//! graph-capture device each op is recorded as one marked op with its grid ([`capture`]).
//! For non-`f32` tensors, on other backends or when switched off with [`set_enabled`], the
//! functions here are not used and [`tensor`](crate::tensor) runs the composed ops, which are
//! also the reference the tests hold these kernels to (bit-equal values and gradients).
//!
//! Ops: fake-quant ([`fake_quant`]), LSQ/LSQ+ ([`lsq`], step and offset gradients reduced in the
//! backward pass), PACT and trainable min/max ([`clip_fake_quant`], the clips' gradients reduced
//! likewise), observers' per-channel min/max ([`min_max`], no transpose), and BatchNorm
//! folding's per-channel rescaling in training ([`divide_add`], the divisor's and bias's
//! gradients reduced likewise).
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat_core::{QuantSpec, fused, tensor};
//!
//! let device = Device::flex().autodiff();
//! let x = Tensor::<1>::from_floats([-2.0, -0.26, 0.13, 0.5, 3.0], &device).require_grad();
//! let spec = QuantSpec::int8_act_per_tensor_asymmetric();
//! let (scale, zp) = tensor::qparams(Tensor::from_floats([-1.0], &device), Tensor::from_floats([1.0], &device), &spec);
//! assert!(fused::available(&x));
//! let y = tensor::fake_quant(x.clone(), scale.clone(), zp.clone(), &spec); // fused here
//! let reference = tensor::fake_quant_composed(x.clone(), scale, zp, &spec);
//! assert_eq!(y.to_data(), reference.to_data());
//! let g: Vec<f32> = x.grad(&y.sum().backward()).unwrap().into_data().to_vec().unwrap();
//! assert_eq!(g, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
//! ```

// The ops take a tensor, its quantization parameters and the grid as separate arguments, as
// Burn's own ops do.
#![allow(clippy::too_many_arguments)]

pub mod capture;
pub mod cpu;
#[cfg(feature = "wgpu")]
mod cube;

use std::cell::Cell;

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind, unary},
};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::prelude::*;
use burn::tensor::DType;

use cpu::{Bounds, Channels, Params};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns the fused kernels on (the default) or off for the calling thread; off, every function
/// in [`tensor`](crate::tensor) called from this thread runs the composed ops. For comparisons
/// and benchmarks (per thread, so that tests running side by side do not switch each other).
pub fn set_enabled(enabled: bool) {
    ENABLED.with(|e| e.set(enabled));
}

/// Whether the fused kernels are switched on for the calling thread (see [`set_enabled`]).
pub fn is_enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Whether `x` would take the fused path: kernels switched on, an `f32` tensor on a device
/// with fused kernels (see [`has_kernels`]), with or without autodiff.
pub fn available<const D: usize>(x: &Tensor<D>) -> bool {
    is_enabled() && x.dtype() == DType::F32 && has_kernels(&x.device())
}

/// Whether `device` (or the device an autodiff device wraps) has fused kernels: `flex`,
/// `ndarray`, a CubeCL device with the `wgpu` feature, and Burn's capture device (marked ops).
pub fn has_kernels(device: &Device) -> bool {
    use burn::backend::DispatchDevice;
    let base = match device.as_dispatch() {
        DispatchDevice::Autodiff(inner) => inner.clone().inner(),
        other => other.clone(),
    };
    match base {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[cfg(feature = "wgpu")]
        DispatchDevice::Cube(_) => true,
        // Recorded as one marked op each (see [`capture`]).
        DispatchDevice::Capture(_) => true,
        _ => false,
    }
}

/// The fused ops, one Burn backend extension. Quantization parameters are `[C]` tensors
/// (`C == 1`: per tensor) applied along `axis` (ignored per tensor); `qmin`/`qmax` are the
/// integer grid as `f32`.
#[backend_extension(
    Autodiff,
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray"),
    Cube: cfg(feature = "wgpu"),
    Fusion: cfg(feature = "wgpu"),
    Capture,
)]
pub trait FakeQuantOps: Backend {
    /// `(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`; the clipped straight-through
    /// estimator under autodiff.
    #[fusion(dtype = x, shape = x)]
    fn qat_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> FloatTensor<Self>;

    /// The backward of [`qat_fake_quant`](FakeQuantOps::qat_fake_quant): `grad` where
    /// `qmin <= x / s + zp <= qmax`, else 0.
    #[fusion(dtype = x, shape = x)]
    fn qat_fake_quant_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> FloatTensor<Self>;

    /// LSQ / LSQ+: `round(clamp((x - o) / s, qmin, qmax)) * s + o`; under autodiff the
    /// gradients of `x`, `step` and `offset` come from one backward pass.
    #[fusion(dtype = x, shape = x)]
    fn qat_lsq(
        x: FloatTensor<Self>,
        step: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> FloatTensor<Self>;

    /// The backward of [`qat_lsq`](FakeQuantOps::qat_lsq): `(dx, dstep, doffset)`, the last
    /// two reduced to the shape of `step`.
    #[fusion(meta = |_grad, x, step, _offset, _axis, _qmin, _qmax| (x.clone(), step.clone(), step.clone()))]
    fn qat_lsq_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        step: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// PACT / trainable min/max: `t + (fq(t) - t)` with `t = min(max(x, lo), hi)` (as Burn's
    /// `max_pair`/`min_pair`) and `fq` the fake-quant of `scale`, `zero_point` (all `[1]`);
    /// under autodiff `x`, `lo` and `hi` get their gradients from one backward pass, the grid
    /// none (straight through).
    #[fusion(dtype = x, shape = x)]
    fn qat_clip_fake_quant(
        x: FloatTensor<Self>,
        lo: FloatTensor<Self>,
        hi: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> FloatTensor<Self>;

    /// The backward of [`qat_clip_fake_quant`](FakeQuantOps::qat_clip_fake_quant):
    /// `(dx, dlo, dhi)`, `dx` where `x` passed the clip, `dlo`/`dhi` the `[1]` sums of `grad`
    /// where the clip replaced it.
    #[fusion(meta = |_grad, x, lo, hi| (x.clone(), lo.clone(), hi.clone()))]
    fn qat_clip_fake_quant_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        lo: FloatTensor<Self>,
        hi: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Per-channel `(min, max)` along `axis` (`channels == 1`: the whole tensor), NaN and
    /// infinities skipped, widened to contain 0. Never tracked by autodiff.
    #[fusion(meta = |x, _axis, channels| {
        let spec = burn::backend::fusion::custom::TensorSpec::new([*channels].into(), x.dtype);
        (spec.clone(), spec)
    })]
    fn qat_min_max(
        x: FloatTensor<Self>,
        axis: usize,
        channels: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// `z / divisor + bias` per channel along `axis` (`divisor`, `bias`: `[C]`), BatchNorm
    /// folding's rescaling of a layer's output (see [`divide_add`]); under autodiff the
    /// gradients of all three come from one backward pass.
    #[fusion(dtype = z, shape = z)]
    fn qat_divide_add(
        z: FloatTensor<Self>,
        divisor: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        axis: usize,
    ) -> FloatTensor<Self>;

    /// The backward of [`qat_divide_add`](FakeQuantOps::qat_divide_add):
    /// `(grad * (1 / d), -sum(grad * z) / d^2, sum(grad))`, the sums per channel.
    #[fusion(meta = |_grad, z, divisor, _axis| (z.clone(), divisor.clone(), divisor.clone()))]
    fn qat_divide_add_grad(
        grad: FloatTensor<Self>,
        z: FloatTensor<Self>,
        divisor: FloatTensor<Self>,
        axis: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// A CPU backend's float primitive read as a host `f32` slice and built from a `Vec<f32>`.
trait HostF32: Sized {
    fn dims(&self) -> Vec<usize>;
    fn with_slice<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R;
    fn from_vec(values: Vec<f32>, dims: Vec<usize>) -> Self;
    /// Runs `f` on the values in place when this tensor owns its dense buffer, else on a copy.
    fn map_in_place(self, f: impl FnOnce(&mut [f32])) -> Self;
}

#[cfg(feature = "flex")]
impl HostF32 for burn::backend::flex::FlexTensor {
    fn dims(&self) -> Vec<usize> {
        self.layout().shape().to_vec()
    }
    fn with_slice<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self.as_slice::<f32>() {
            Some(values) => f(values),
            None => {
                let dense = self.to_contiguous();
                f(dense.as_slice::<f32>().unwrap_or(&[]))
            }
        }
    }
    fn from_vec(values: Vec<f32>, dims: Vec<usize>) -> Self {
        Self::from_data(TensorData::new(values, dims))
    }
    fn map_in_place(mut self, f: impl FnOnce(&mut [f32])) -> Self {
        let dense = self.layout().is_contiguous()
            && self.layout().start_offset() == 0
            && self.bytes().len() == self.layout().num_elements() * 4;
        if dense && let Some(values) = self.try_storage_mut::<f32>() {
            f(values);
            return self;
        }
        let dims = self.dims();
        let mut values = self.with_slice(|v| v.to_vec());
        f(&mut values);
        Self::from_vec(values, dims)
    }
}

#[cfg(feature = "ndarray")]
impl HostF32 for burn::backend::ndarray::NdArrayTensor {
    fn dims(&self) -> Vec<usize> {
        burn::backend::TensorMetadata::shape(self).to_vec()
    }
    fn with_slice<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            Self::F32(storage) => {
                let view = storage.view();
                match view.as_slice() {
                    Some(values) => f(values),
                    None => f(&view.iter().copied().collect::<Vec<f32>>()),
                }
            }
            // `available` sends only f32 tensors here.
            _ => f(&[]),
        }
    }
    fn from_vec(values: Vec<f32>, dims: Vec<usize>) -> Self {
        Self::from_data(TensorData::new(values, dims))
    }
    fn map_in_place(self, f: impl FnOnce(&mut [f32])) -> Self {
        if let Self::F32(storage) = self {
            // Copy-on-write: in place when unique and dense, else on a copy.
            let mut array = storage.into_owned();
            if let Some(values) = array.as_slice_mut() {
                f(values);
                return array.into();
            }
            let dims = array.shape().to_vec();
            let mut values: Vec<f32> = array.iter().copied().collect();
            f(&mut values);
            return Self::from_vec(values, dims);
        }
        self
    }
}

fn bounds(qmin: f32, qmax: f32, half_up: bool) -> Bounds {
    Bounds {
        qmin,
        qmax,
        half_up,
    }
}

/// The clip and grid of a [`FakeQuantOps::qat_clip_fake_quant`] call, from its `[1]` tensors.
#[cfg(any(feature = "flex", feature = "ndarray"))]
fn clip_of<T: HostF32>(lo: &T, hi: &T, grid: Option<(&T, &T)>) -> cpu::Clip {
    let first = |t: &T, default: f32| t.with_slice(|v| v.first().copied().unwrap_or(default));
    let (scale, zero_point) = grid.map_or((1.0, 0.0), |(s, z)| (first(s, 1.0), first(z, 0.0)));
    cpu::Clip {
        lo: first(lo, 0.0),
        hi: first(hi, 0.0),
        scale,
        zero_point,
    }
}

/// The kernels of one CPU backend, on its primitive `T`.
#[allow(unused_macros)]
macro_rules! cpu_backend {
    ($backend:ty) => {
        impl FakeQuantOps for $backend {
            fn qat_fake_quant(
                x: FloatTensor<Self>,
                scale: FloatTensor<Self>,
                zero_point: FloatTensor<Self>,
                axis: usize,
                qmin: f32,
                qmax: f32,
                half_up: bool,
            ) -> FloatTensor<Self> {
                let dims = x.dims();
                let out = scale.with_slice(|s| {
                    zero_point.with_slice(|z| {
                        x.with_slice(|x| {
                            let p = Params::new(s, z, Channels::of(&dims, axis, s.len()));
                            cpu::fake_quant(x, &p, bounds(qmin, qmax, half_up))
                        })
                    })
                });
                HostF32::from_vec(out, dims)
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
                let dims = x.dims();
                let p = scale.with_slice(|s| {
                    zero_point.with_slice(|z| Params::new(s, z, Channels::of(&dims, axis, s.len())))
                });
                grad.map_in_place(|g| {
                    x.with_slice(|x| cpu::fake_quant_grad(g, x, &p, bounds(qmin, qmax, false)))
                })
            }

            fn qat_lsq(
                x: FloatTensor<Self>,
                step: FloatTensor<Self>,
                offset: FloatTensor<Self>,
                axis: usize,
                qmin: f32,
                qmax: f32,
            ) -> FloatTensor<Self> {
                let dims = x.dims();
                let out = step.with_slice(|s| {
                    offset.with_slice(|o| {
                        x.with_slice(|x| {
                            let p = Params::new(s, o, Channels::of(&dims, axis, s.len()));
                            cpu::lsq(x, &p, bounds(qmin, qmax, false))
                        })
                    })
                });
                HostF32::from_vec(out, dims)
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
                let dims = x.dims();
                let channels = step.dims();
                let p = step.with_slice(|s| {
                    offset.with_slice(|o| Params::new(s, o, Channels::of(&dims, axis, s.len())))
                });
                let mut sums = (Vec::new(), Vec::new());
                let dx = grad.map_in_place(|g| {
                    sums = x.with_slice(|x| cpu::lsq_grad(g, x, &p, bounds(qmin, qmax, false)));
                });
                let (ds, doff) = sums;
                (
                    dx,
                    HostF32::from_vec(ds, channels.clone()),
                    HostF32::from_vec(doff, channels),
                )
            }

            fn qat_divide_add(
                z: FloatTensor<Self>,
                divisor: FloatTensor<Self>,
                bias: FloatTensor<Self>,
                axis: usize,
            ) -> FloatTensor<Self> {
                let dims = z.dims();
                let out = divisor.with_slice(|d| {
                    bias.with_slice(|b| {
                        z.with_slice(|z| {
                            let p = Params::new(d, b, Channels::of(&dims, axis, d.len()));
                            cpu::divide_add(z, &p)
                        })
                    })
                });
                HostF32::from_vec(out, dims)
            }

            fn qat_divide_add_grad(
                grad: FloatTensor<Self>,
                z: FloatTensor<Self>,
                divisor: FloatTensor<Self>,
                axis: usize,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                let dims = z.dims();
                let channels = divisor.dims();
                let d = divisor.with_slice(|d| d.to_vec());
                let r: Vec<f32> = d.iter().map(|d| 1.0 / d).collect();
                let p = Params::new(&r, &d, Channels::of(&dims, axis, d.len()));
                let mut sums = (Vec::new(), Vec::new());
                let dz = grad.map_in_place(|g| {
                    sums = z.with_slice(|z| cpu::divide_add_grad(g, z, &p));
                });
                let (gz, g) = sums;
                let dd = gz.iter().zip(&d).map(|(&s, &d)| -s / (d * d)).collect();
                (
                    dz,
                    HostF32::from_vec(dd, channels.clone()),
                    HostF32::from_vec(g, channels),
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
                let dims = x.dims();
                let c = clip_of(&lo, &hi, Some((&scale, &zero_point)));
                let out = x.with_slice(|x| cpu::clip_fake_quant(x, c, bounds(qmin, qmax, half_up)));
                HostF32::from_vec(out, dims)
            }

            fn qat_clip_fake_quant_grad(
                grad: FloatTensor<Self>,
                x: FloatTensor<Self>,
                lo: FloatTensor<Self>,
                hi: FloatTensor<Self>,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                let c = clip_of(&lo, &hi, None);
                let mut sums = (0.0, 0.0);
                let dx = grad.map_in_place(|g| {
                    sums = x.with_slice(|x| cpu::clip_fake_quant_grad(g, x, c));
                });
                (
                    dx,
                    HostF32::from_vec(vec![sums.0], vec![1]),
                    HostF32::from_vec(vec![sums.1], vec![1]),
                )
            }

            fn qat_min_max(
                x: FloatTensor<Self>,
                axis: usize,
                channels: usize,
            ) -> (FloatTensor<Self>, FloatTensor<Self>) {
                let dims = x.dims();
                let ch = Channels::of(&dims, axis, channels);
                let (lo, hi) = x.with_slice(|x| cpu::min_max(x, ch));
                let n = vec![lo.len()];
                (HostF32::from_vec(lo, n.clone()), HostF32::from_vec(hi, n))
            }
        }
    };
}

#[cfg(feature = "flex")]
cpu_backend!(burn::backend::Flex);
#[cfg(feature = "ndarray")]
cpu_backend!(burn::backend::NdArray);

/// What a fused autodiff node keeps for its backward: the input, the two per-channel
/// parameters (scale and zero point, or step and offset) and the grid; the backward recomputes
/// everything else from them.
#[derive(Debug, Clone)]
struct Saved<B: Backend> {
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    axis: usize,
    qmin: f32,
    qmax: f32,
}

#[derive(Debug)]
struct FakeQuantBackward;

impl<B: FakeQuantOps> Backward<B, 1> for FakeQuantBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            x,
            a,
            b,
            axis,
            qmin,
            qmax,
        } = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::qat_fake_quant_grad(grad, x, a, b, axis, qmin, qmax)
        });
    }
}

#[derive(Debug)]
struct LsqBackward;

impl<B: FakeQuantOps> Backward<B, 3> for LsqBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward3(ops, grads, |g, s| {
            B::qat_lsq_grad(g, s.x, s.a, s.b, s.axis, s.qmin, s.qmax)
        });
    }
}

/// The backward of a fused op with three tracked inputs (`x` and its two range parameters):
/// `grads_of` turns the node's gradient and the saved state into one gradient per input, each
/// registered with its parent (untracked parents get none).
fn backward3<B: FakeQuantOps>(
    ops: Ops<Saved<B>, 3>,
    grads: &mut Gradients,
    grads_of: impl FnOnce(FloatTensor<B>, Saved<B>) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
) {
    let grad = grads.consume::<B>(&ops.node);
    let (g0, g1, g2) = grads_of(grad, ops.state);
    let [p0, p1, p2] = ops.parents;
    for (parent, g) in [(p0, g0), (p1, g1), (p2, g2)] {
        if let Some(node) = parent {
            grads.register::<B>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct DivideAddBackward;

impl<B: FakeQuantOps> Backward<B, 3> for DivideAddBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward3(ops, grads, |g, s| {
            B::qat_divide_add_grad(g, s.x, s.a, s.axis)
        });
    }
}

#[derive(Debug)]
struct ClipBackward;

impl<B: FakeQuantOps> Backward<B, 3> for ClipBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Saved<B>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        backward3(ops, grads, |g, s| {
            B::qat_clip_fake_quant_grad(g, s.x, s.a, s.b)
        });
    }
}

/// Finishes a fused op's forward under autodiff: `forward(x, a, b)`, and where an input is
/// tracked the three tensors and the grid saved for the op's backward.
fn finish_saved<
    B: FakeQuantOps,
    BO: Backward<B, N, State = Saved<B>>,
    C: CheckpointStrategy,
    const N: usize,
>(
    prep: OpsKind<BO, B, Saved<B>, C, N>,
    (x, a, b): (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
    (axis, qmin, qmax): (usize, f32, f32),
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match prep {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                x: x.clone(),
                a: a.clone(),
                b: b.clone(),
                axis,
                qmin,
                qmax,
            };
            prep.finish(saved, forward(x, a, b))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x, a, b)),
    }
}

impl<B: FakeQuantOps, C: CheckpointStrategy> FakeQuantOps for Autodiff<B, C> {
    fn qat_fake_quant(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        zero_point: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> FloatTensor<Self> {
        let prep = FakeQuantBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful();
        let (x, a, b) = (
            x.into_primitive(),
            scale.into_primitive(),
            zero_point.into_primitive(),
        );
        finish_saved(prep, (x, a, b), (axis, qmin, qmax), |x, a, b| {
            B::qat_fake_quant(x, a, b, axis, qmin, qmax, half_up)
        })
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
        // A gradient of a gradient is not tracked (the estimator is piecewise constant).
        FloatTensor::<Self>::new(B::qat_fake_quant_grad(
            grad.into_primitive(),
            x.into_primitive(),
            scale.into_primitive(),
            zero_point.into_primitive(),
            axis,
            qmin,
            qmax,
        ))
    }

    fn qat_lsq(
        x: FloatTensor<Self>,
        step: FloatTensor<Self>,
        offset: FloatTensor<Self>,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), step.node(), offset.node()];
        let prep = LsqBackward.prepare::<C>(nodes).compute_bound().stateful();
        let (x, a, b) = (
            x.into_primitive(),
            step.into_primitive(),
            offset.into_primitive(),
        );
        finish_saved(prep, (x, a, b), (axis, qmin, qmax), |x, a, b| {
            B::qat_lsq(x, a, b, axis, qmin, qmax)
        })
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
        let (dx, ds, doff) = B::qat_lsq_grad(
            grad.into_primitive(),
            x.into_primitive(),
            step.into_primitive(),
            offset.into_primitive(),
            axis,
            qmin,
            qmax,
        );
        (
            FloatTensor::<Self>::new(dx),
            FloatTensor::<Self>::new(ds),
            FloatTensor::<Self>::new(doff),
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
        let nodes = [x.node(), lo.node(), hi.node()];
        let prep = ClipBackward.prepare::<C>(nodes).compute_bound().stateful();
        let (x, lo, hi) = (x.into_primitive(), lo.into_primitive(), hi.into_primitive());
        let (s, z) = (scale.into_primitive(), zero_point.into_primitive());
        let forward = |x, lo, hi| B::qat_clip_fake_quant(x, lo, hi, s, z, qmin, qmax, half_up);
        finish_saved(prep, (x, lo, hi), (0, qmin, qmax), forward)
    }

    fn qat_clip_fake_quant_grad(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        lo: FloatTensor<Self>,
        hi: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, dlo, dhi) = B::qat_clip_fake_quant_grad(
            grad.into_primitive(),
            x.into_primitive(),
            lo.into_primitive(),
            hi.into_primitive(),
        );
        (
            FloatTensor::<Self>::new(dx),
            FloatTensor::<Self>::new(dlo),
            FloatTensor::<Self>::new(dhi),
        )
    }

    fn qat_min_max(
        x: FloatTensor<Self>,
        axis: usize,
        channels: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (lo, hi) = B::qat_min_max(x.into_primitive(), axis, channels);
        (FloatTensor::<Self>::new(lo), FloatTensor::<Self>::new(hi))
    }

    fn qat_divide_add(
        z: FloatTensor<Self>,
        divisor: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        axis: usize,
    ) -> FloatTensor<Self> {
        let nodes = [z.node(), divisor.node(), bias.node()];
        let prep = DivideAddBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful();
        let (z, d, b) = (
            z.into_primitive(),
            divisor.into_primitive(),
            bias.into_primitive(),
        );
        finish_saved(prep, (z, d, b), (axis, 0.0, 0.0), |z, d, b| {
            B::qat_divide_add(z, d, b, axis)
        })
    }

    fn qat_divide_add_grad(
        grad: FloatTensor<Self>,
        z: FloatTensor<Self>,
        divisor: FloatTensor<Self>,
        axis: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dz, dd, db) = B::qat_divide_add_grad(
            grad.into_primitive(),
            z.into_primitive(),
            divisor.into_primitive(),
            axis,
        );
        (
            FloatTensor::<Self>::new(dz),
            FloatTensor::<Self>::new(dd),
            FloatTensor::<Self>::new(db),
        )
    }
}

/// Fused [`tensor::fake_quant`](crate::tensor::fake_quant): `scale`, `zero_point` of shape
/// `[1]` or `[x.dims()[axis]]`. Call only where [`available`] says so.
pub fn fake_quant<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    zero_point: Tensor<1>,
    axis: usize,
    qmin: f32,
    qmax: f32,
    half_up: bool,
) -> Tensor<D> {
    let y = Dispatch::qat_fake_quant(
        x.into_dispatch(),
        scale.detach().into_dispatch(),
        zero_point.detach().into_dispatch(),
        axis,
        qmin,
        qmax,
        half_up,
    );
    Tensor::from_dispatch(y)
}

/// Fused LSQ / LSQ+ (see [`tensor::fake_quant_lsq`](crate::tensor::fake_quant_lsq)): `step`
/// and `offset` of shape `[1]` or `[x.dims()[axis]]`, both receiving gradients.
pub fn lsq<const D: usize>(
    x: Tensor<D>,
    step: Tensor<1>,
    offset: Tensor<1>,
    axis: usize,
    qmin: f32,
    qmax: f32,
) -> Tensor<D> {
    let y = Dispatch::qat_lsq(
        x.into_dispatch(),
        step.into_dispatch(),
        offset.into_dispatch(),
        axis,
        qmin,
        qmax,
    );
    Tensor::from_dispatch(y)
}

/// Fused [`tensor::min_max`](crate::tensor::min_max) over `channels` along `axis` (1: the
/// whole tensor), detached.
pub fn min_max<const D: usize>(
    x: Tensor<D>,
    axis: usize,
    channels: usize,
) -> (Tensor<1>, Tensor<1>) {
    let (lo, hi) = Dispatch::qat_min_max(x.detach().into_dispatch(), axis, channels);
    (Tensor::from_dispatch(lo), Tensor::from_dispatch(hi))
}

/// Fused PACT / trainable min/max (see [`tensor::fake_quant_pact`](crate::tensor::fake_quant_pact),
/// [`tensor::fake_quant_min_max`](crate::tensor::fake_quant_min_max)): `x` clipped to
/// `[lo, hi]` (both `[1]`, receiving gradients), then fake-quantized with `scale`, `zero_point`
/// (`[1]`, detached) straight through.
///
/// # Panics
///
/// If `lo`, `hi`, `scale` or `zero_point` does not hold exactly one value.
pub fn clip_fake_quant<const D: usize>(
    x: Tensor<D>,
    lo: Tensor<1>,
    hi: Tensor<1>,
    scale: Tensor<1>,
    zero_point: Tensor<1>,
    qmin: f32,
    qmax: f32,
    half_up: bool,
) -> Tensor<D> {
    for (what, t) in [
        ("lo", &lo),
        ("hi", &hi),
        ("scale", &scale),
        ("zero_point", &zero_point),
    ] {
        assert_eq!(
            t.dims(),
            [1],
            "fused::clip_fake_quant: `{what}` must hold one value"
        );
    }
    let y = Dispatch::qat_clip_fake_quant(
        x.into_dispatch(),
        lo.into_dispatch(),
        hi.into_dispatch(),
        scale.detach().into_dispatch(),
        zero_point.detach().into_dispatch(),
        qmin,
        qmax,
        half_up,
    );
    Tensor::from_dispatch(y)
}

/// Fused `z / divisor + bias` per channel along `axis` (`divisor`, `bias`: `[z.dims()[axis]]`,
/// both receiving gradients): the rescaling that BatchNorm folding applies to a layer's output
/// (see [`tensor::divide_add_channels`](crate::tensor::divide_add_channels), which picks this
/// or the composed ops). Call only where [`available`] says so and not on the capture device.
pub fn divide_add<const D: usize>(
    z: Tensor<D>,
    divisor: Tensor<1>,
    bias: Tensor<1>,
    axis: usize,
) -> Tensor<D> {
    let y = Dispatch::qat_divide_add(
        z.into_dispatch(),
        divisor.into_dispatch(),
        bias.into_dispatch(),
        axis,
    );
    Tensor::from_dispatch(y)
}
