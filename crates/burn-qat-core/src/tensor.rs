//! Fake quantization on Burn tensors, with the clipped straight-through estimator.
//!
//! Forward: `q = clamp(round(x / scale) + zero_point, qmin, qmax)`, output
//! `(q - zero_point) * scale` saturated at `+-f32::MAX` (bit-equal to
//! [`reference::fake_quant`](crate::reference::fake_quant)). Every function here gives finite
//! outputs for finite inputs and finite parameters, and repairs learned parameters an optimizer
//! drove to NaN or infinity (see [`lsq_step`], [`fake_quant_lsq`], [`fake_quant_pact`],
//! [`fake_quant_min_max`]).
//! Backward: the incoming gradient where `x` lies inside the representable range, 0 outside.
//! Nothing here holds state; the modules in `burn-qat-nn` do.
//!
//! Quantization parameters are tensors of shape `[1]` (per tensor) or `[C]` (per channel along
//! the spec's axis), so they can stay on the device (and be learned) without a host round trip.
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat_core::{QuantSpec, tensor};
//!
//! let device = Device::flex().autodiff();
//! let spec = QuantSpec::int8_weight_per_channel_symmetric(1);
//! // A Burn Linear weight is [d_input, d_output]: channels along axis 1.
//! let w = Tensor::<2>::from_floats([[0.5, -2.0], [1.27, 0.3]], &device).require_grad();
//! let (min, max) = tensor::min_max(w.clone(), spec.granularity);
//! let (scale, zero_point) = tensor::qparams(min, max, &spec);
//! let wq = tensor::fake_quant(w.clone(), scale, zero_point, &spec);
//! let grads = wq.sum().backward();
//! let g: Vec<f32> = w.grad(&grads).unwrap().into_data().try_to_vec().unwrap();
//! assert_eq!(g, vec![1.0; 4]); // every weight is inside its channel's range
//! ```

use burn::prelude::*;

use crate::{MIN_SCALE, QParams, QatError, QuantSpec, RoundingMode};

/// `round` forward (half to even), identity backward.
pub fn round_ste<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() + (x.clone().round() - x).detach()
}

/// The shape that broadcasts a `[channels]` tensor along `axis` of a rank-`D` tensor.
pub fn channel_shape<const D: usize>(channels: usize, axis: Option<usize>) -> [usize; D] {
    let mut shape = [1; D];
    if let Some(axis) = axis {
        shape[axis] = channels;
    }
    shape
}

/// Checks that `scale`/`zero_point` fit `x` under `spec` (axis exists, channel counts agree).
pub fn check_qparams<const D: usize>(
    x: &Tensor<D>,
    scale: &Tensor<1>,
    zero_point: &Tensor<1>,
    spec: &QuantSpec,
) -> Result<(), QatError> {
    spec.validate_for_rank(D)?;
    let expected = spec.axis().map_or(1, |axis| x.dims()[axis]);
    for (what, t) in [("scale", scale), ("zero_point", zero_point)] {
        let got = t.dims()[0];
        if got != expected && got != 1 {
            return Err(QatError::ChannelMismatch {
                what,
                expected,
                got,
                axis: spec.axis().unwrap_or(0),
                context: String::new(),
            });
        }
    }
    Ok(())
}

/// Fake-quantizes `x` with quantization parameters held in tensors.
///
/// # Shapes
///
/// - `x`: any shape `[d0, ..., d(D-1)]`
/// - `scale`, `zero_point`: `[1]`, or `[d_axis]` for [`Granularity::PerChannel`](crate::Granularity)
/// - output: same as `x`
///
/// # Panics
///
/// If the spec's axis does not exist or the channel counts disagree; call
/// [`try_fake_quant`] to get these as an error instead.
pub fn fake_quant<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    zero_point: Tensor<1>,
    spec: &QuantSpec,
) -> Tensor<D> {
    match try_fake_quant(x, scale, zero_point, spec) {
        Ok(y) => y,
        Err(err) => panic!("{err}"),
    }
}

/// [`fake_quant`] that reports bad arguments as an error instead of panicking.
pub fn try_fake_quant<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    zero_point: Tensor<1>,
    spec: &QuantSpec,
) -> Result<Tensor<D>, QatError> {
    check_qparams(&x, &scale, &zero_point, spec)?;
    if crate::fused::available(&x) {
        let (qmin, qmax, half_up) = fused_grid(spec);
        let axis = spec.axis().unwrap_or(0);
        let zero_point = zero_point.to_device(&x.device());
        let scale = scale.to_device(&x.device());
        return Ok(crate::fused::fake_quant(
            x, scale, zero_point, axis, qmin, qmax, half_up,
        ));
    }
    Ok(fake_quant_composed(x, scale, zero_point, spec))
}

/// [`fake_quant`] written with Burn's tensor ops (about fifteen elementwise passes): what runs
/// on backends without [`fused`](crate::fused) kernels, and the reference the fused kernels are
/// tested against (bit-equal values and gradients).
///
/// # Panics
///
/// As [`fake_quant`], on quantization parameters that do not fit `x`.
pub fn fake_quant_composed<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    zero_point: Tensor<1>,
    spec: &QuantSpec,
) -> Tensor<D> {
    if let Err(err) = check_qparams(&x, &scale, &zero_point, spec) {
        panic!("{err}");
    }
    let channels = scale.dims()[0];
    let axis = if channels == 1 { None } else { spec.axis() };
    let shape: [usize; D] = channel_shape(channels, axis);
    let scale = scale.detach().reshape(shape);
    let zero_point = zero_point.detach().reshape(shape);
    let xd = x.clone().detach();
    let v = xd.clone() / scale.clone();
    let r = round(v.clone(), spec.rounding) + zero_point.clone();
    let (qmin, qmax) = (spec.qmin() as f32, spec.qmax() as f32);
    // Saturated: a grid end beyond the largest f32 gives +-f32::MAX, not an infinity.
    let y = ((r.clamp(qmin, qmax) - zero_point.clone()) * scale).clamp(-f32::MAX, f32::MAX);
    if x.is_autodiff() {
        let v = v + zero_point;
        let inside = v
            .clone()
            .greater_equal_elem(qmin)
            .bool_and(v.lower_equal_elem(qmax));
        // `x - xd` is 0 with x's gradient; masked (not multiplied) so that +-inf, whose
        // `x - xd` is NaN, saturate as in evaluation.
        y + (x - xd).mask_fill(inside.bool_not(), 0.0)
    } else {
        y
    }
}

/// Fake-quantizes `x` with one pair of scalar parameters (per tensor). Cheaper than
/// [`fake_quant`]: scalar operands, no broadcasting.
pub fn fake_quant_per_tensor<const D: usize>(
    x: Tensor<D>,
    qp: QParams,
    spec: &QuantSpec,
) -> Tensor<D> {
    if crate::fused::available(&x) {
        let device = x.device();
        let scale = Tensor::<1>::from_floats([qp.scale], &device);
        let zp = Tensor::<1>::from_floats([qp.zero_point as f32], &device);
        let (qmin, qmax, half_up) = fused_grid(spec);
        return crate::fused::fake_quant(x, scale, zp, 0, qmin, qmax, half_up);
    }
    let xd = x.clone().detach();
    let zp = qp.zero_point as f32;
    let (qmin, qmax) = (spec.qmin() as f32, spec.qmax() as f32);
    let v = xd.clone().div_scalar(qp.scale);
    let y = round(v.clone(), spec.rounding)
        .add_scalar(zp)
        .clamp(qmin, qmax)
        .sub_scalar(zp)
        .mul_scalar(qp.scale)
        .clamp(-f32::MAX, f32::MAX);
    if x.is_autodiff() {
        let v = v.add_scalar(zp);
        let inside = v
            .clone()
            .greater_equal_elem(qmin)
            .bool_and(v.lower_equal_elem(qmax));
        y + (x - xd).mask_fill(inside.bool_not(), 0.0)
    } else {
        y
    }
}

/// `spec`'s grid as the fused ops take it: `(qmin, qmax, half_up)`.
fn fused_grid(spec: &QuantSpec) -> (f32, f32, bool) {
    (
        spec.qmin() as f32,
        spec.qmax() as f32,
        spec.rounding == RoundingMode::TfHalfUp,
    )
}

fn round<const D: usize>(v: Tensor<D>, rounding: RoundingMode) -> Tensor<D> {
    match rounding {
        RoundingMode::HalfToEven => v.round(),
        RoundingMode::TfHalfUp => v.add_scalar(0.5).floor(),
    }
}

/// The range of `x` that observers record: per tensor (`[1]`) or per channel (`[C]`),
/// non-finite values ignored, and widened to contain 0 (`min <= 0 <= max`, as tfmot and TFLite
/// require). No gradient flows through the result.
pub fn min_max<const D: usize>(
    x: Tensor<D>,
    granularity: crate::Granularity,
) -> (Tensor<1>, Tensor<1>) {
    let x = x.detach();
    let device = x.device();
    let dims = x.dims();
    let numel: usize = dims.iter().product();
    let channels = match granularity {
        crate::Granularity::PerTensor => 1,
        crate::Granularity::PerChannel { axis } => dims[axis],
    };
    if numel == 0 || channels == 0 {
        let z = Tensor::<1>::zeros([channels.max(1)], &device);
        return (z.clone(), z);
    }
    if crate::fused::available(&x) {
        let axis = match granularity {
            crate::Granularity::PerTensor => 0,
            crate::Granularity::PerChannel { axis } => axis,
        };
        return crate::fused::min_max(x, axis, channels);
    }
    // Non-finite values become 0, which the widened range contains anyway.
    let bad = x.clone().is_finite().bool_not();
    let x = x.mask_fill(bad, 0.0);
    let flat: Tensor<2> = match granularity {
        crate::Granularity::PerTensor => x.reshape([1, numel]),
        crate::Granularity::PerChannel { axis } => {
            x.swap_dims(axis, 0).reshape([channels, numel / channels])
        }
    };
    let min = flat.clone().min_dim(1).reshape([channels]).clamp_max(0.0);
    let max = flat.max_dim(1).reshape([channels]).clamp_min(0.0);
    (min, max)
}

/// [`qparams_from_range`](crate::qparams_from_range) on tensors: `(scale, zero_point)`, both of
/// the shape of `min` and `max`, the zero point as integer-valued floats.
pub fn qparams(min: Tensor<1>, max: Tensor<1>, spec: &QuantSpec) -> (Tensor<1>, Tensor<1>) {
    let min = min.detach();
    let max = max.detach();
    let bad_min = min.clone().is_finite().bool_not();
    let bad_max = max.clone().is_finite().bool_not();
    let min = min.mask_fill(bad_min, 0.0).clamp_max(0.0);
    let max = max.mask_fill(bad_max, 0.0).clamp_min(0.0);
    let (qmin, qmax) = (spec.qmin(), spec.qmax());
    let steps = (qmax - qmin) as f32;
    if spec.symmetric {
        let m = max.max_pair(min.neg());
        // m / (steps / 2) is 2m / steps exactly (IEEE division is correctly rounded and
        // doubling is exact), without overflowing for m above f32::MAX / 2.
        let scale = m.div_scalar(steps / 2.0).clamp(MIN_SCALE, f32::MAX);
        let zero_point = scale
            .zeros_like()
            .add_scalar(spec.symmetric_zero_point() as f32);
        return (scale, zero_point);
    }
    let scale = (max.clone() - min.clone()).div_scalar(steps);
    // A range wider than f32::MAX: max / steps - min / steps is the representable step.
    let wide = scale.clone().is_finite().bool_not();
    let split = max.div_scalar(steps) - min.clone().div_scalar(steps);
    let scale = scale.mask_where(wide, split).clamp(MIN_SCALE, f32::MAX);
    let ratio = min / scale.clone();
    let rounded = match spec.rounding {
        RoundingMode::HalfToEven => ratio.round(),
        // -round_half_away(-ratio) with -ratio >= 0: -floor(0.5 - ratio).
        RoundingMode::TfHalfUp => ratio.neg().add_scalar(0.5).floor().neg(),
    };
    let zero_point = rounded
        .neg()
        .add_scalar(qmin as f32)
        .clamp(qmin as f32, qmax as f32);
    (scale, zero_point)
}

/// Reads tensor quantization parameters back to the host, one [`QParams`] per channel.
pub fn to_qparams(scale: &Tensor<1>, zero_point: &Tensor<1>) -> Vec<QParams> {
    let s: Vec<f32> = scale
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let z: Vec<f32> = zero_point
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    s.into_iter()
        .zip(z)
        .map(|(scale, zp)| QParams {
            scale,
            zero_point: zp as i32,
        })
        .collect()
}

/// `value` as a fresh leaf that trains: detached from any graph, and requiring gradients when it
/// lives on an autodiff device (for values written into parameters: folded weights, learned
/// ranges initialized from observers).
pub fn trainable_leaf<const D: usize>(value: Tensor<D>) -> Tensor<D> {
    let value = value.detach();
    if value.is_autodiff() {
        value.require_grad()
    } else {
        value
    }
}

/// Scales the gradient of `x` by `factor` without changing its value (LSQ's gradient
/// scaling): `x.detach() + (x * factor - (x * factor).detach())`, whose value is `x` bit for bit
/// (`(x - x * factor).detach() + x * factor` rounds twice, and can round `f32::MAX` up to
/// infinity). `factor` is expected in `(0, 1]` (as [`lsq_grad_factor`] gives it): a product
/// `x * factor` that overflows makes the value NaN.
pub fn grad_scale<const D: usize>(x: Tensor<D>, factor: f32) -> Tensor<D> {
    let scaled = x.clone().mul_scalar(factor);
    x.detach() + (scaled.clone() - scaled.detach())
}

/// LSQ's gradient scale for a step size shared by `n` values on a grid whose top is `qmax`:
/// `1 / sqrt(n * qmax)` (Esser et al. 2019; PyTorch's `_LearnableFakeQuantize`).
pub fn lsq_grad_factor(n: usize, qmax: i32) -> f32 {
    1.0 / ((n.max(1) as f32) * (qmax.max(1) as f32)).sqrt()
}

/// The step an LSQ parameter stands for: `max(|scale|, MIN_SCALE)`, and [`MIN_SCALE`] where the
/// optimizer drove it to NaN or infinity (no gradient reaches such an entry). An optimizer may
/// push a small step through zero; the grid then stays the same size (PyTorch's learnable
/// fake-quant clamps the parameter instead, which stops its gradient). Scalar twin:
/// [`reference::lsq_step`](crate::reference::lsq_step).
pub fn lsq_step(scale: Tensor<1>) -> Tensor<1> {
    // A step the optimizer drove to NaN or infinity is repaired to the smallest step: the
    // outputs stay finite (saturated) instead of poisoning every later layer.
    let bad = scale.clone().is_finite().bool_not();
    scale.abs().mask_fill(bad, MIN_SCALE).clamp_min(MIN_SCALE)
}

/// LSQ / LSQ+ fake quantization with a learnable step size (and, for LSQ+, a learnable float
/// offset): `x_hat = round(clamp((x - offset) / s, qmin, qmax)) * s + offset`, with
/// `s = `[`lsq_step`]`(scale)`, saturated at `+-f32::MAX` (scalar twin:
/// [`reference::fake_quant_lsq`](crate::reference::fake_quant_lsq)).
///
/// Repairs: a step the optimizer drove to NaN or infinity counts as [`MIN_SCALE`]
/// ([`lsq_step`]), an offset driven to NaN or infinity as 0; neither receives a gradient
/// while broken. Finite inputs and finite parameters give finite outputs.
///
/// Gradients (exact, through autodiff): `dx_hat/dx` is 1 inside the range and 0 outside;
/// `dx_hat/ds` is `round(v) - v` inside and `qmin`/`qmax` outside (`v = (x - offset) / s`),
/// times `grad_factor`; `dx_hat/d offset` is 0 inside and 1 outside, times `grad_factor`. An
/// element whose value saturated (its grid point lies beyond `+-f32::MAX`) passes no gradient.
///
/// # Shapes
///
/// - `x`: any; `scale`, `offset`: `[1]` or `[C]` along the spec's axis.
pub fn fake_quant_lsq<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    offset: Option<Tensor<1>>,
    spec: &QuantSpec,
    grad_factor: f32,
) -> Tensor<D> {
    let channels = scale.dims()[0];
    let axis = if channels == 1 { None } else { spec.axis() };
    if crate::fused::available(&x) {
        let (qmin, qmax) = (spec.qmin() as f32, spec.qmax() as f32);
        let s = grad_scale(lsq_step(scale), grad_factor);
        let o = match offset {
            Some(o) => grad_scale(finite_or(o, 0.0), grad_factor),
            None => s.zeros_like().detach(),
        };
        return crate::fused::lsq(x, s, o, axis.unwrap_or(0), qmin, qmax);
    }
    fake_quant_lsq_composed(x, scale, offset, spec, grad_factor)
}

/// [`fake_quant_lsq`] written with Burn's tensor ops and autodiff: what runs on backends without
/// [`fused`](crate::fused) kernels, and the reference the fused kernels are tested against.
pub fn fake_quant_lsq_composed<const D: usize>(
    x: Tensor<D>,
    scale: Tensor<1>,
    offset: Option<Tensor<1>>,
    spec: &QuantSpec,
    grad_factor: f32,
) -> Tensor<D> {
    let channels = scale.dims()[0];
    let axis = if channels == 1 { None } else { spec.axis() };
    let shape: [usize; D] = channel_shape(channels, axis);
    let s = grad_scale(lsq_step(scale), grad_factor).reshape(shape);
    let (qmin, qmax) = (spec.qmin() as f32, spec.qmax() as f32);
    let y = match offset {
        None => round_ste((x / s.clone()).clamp(qmin, qmax)) * s,
        Some(o) => {
            let o = grad_scale(finite_or(o, 0.0), grad_factor).reshape(shape);
            round_ste(((x - o.clone()) / s.clone()).clamp(qmin, qmax)) * s + o
        }
    };
    // Saturated at the edge of f32 (no gradient where it saturates, as Burn's clamp passes none).
    y.clamp(-f32::MAX, f32::MAX)
}

/// `t` with its NaN and infinite values replaced by `value` (gradient kept elsewhere): a learned
/// range the optimizer broke is repaired instead of poisoning the outputs.
fn finite_or(t: Tensor<1>, value: f32) -> Tensor<1> {
    let bad = t.clone().is_finite().bool_not();
    t.mask_fill(bad, value)
}

/// PACT's grid for a clipping level `alpha`: the unsigned, asymmetric, per-tensor form of
/// `spec` and its step `max(alpha / qmax, MIN_SCALE)` (zero point 0); an `alpha` the optimizer
/// drove to NaN or infinity counts as 0 (scalar twins: [`reference::pact_spec`],
/// [`reference::pact_scale`](crate::reference::pact_scale)).
///
/// [`reference::pact_spec`]: crate::reference::pact_spec
pub fn pact_grid(alpha: Tensor<1>, spec: &QuantSpec) -> (QuantSpec, Tensor<1>) {
    // Unsigned and not narrow: 0.0 is grid point 0, exactly (a narrow unsigned grid would
    // start at 1 and turn 0.0 into one step).
    let unsigned = crate::reference::pact_spec(spec);
    let alpha = finite_or(alpha, 0.0);
    let scale = alpha
        .div_scalar(unsigned.qmax().max(1) as f32)
        .clamp_min(MIN_SCALE);
    (unsigned, scale)
}

/// PACT (Choi et al. 2018): `y = clamp(x, 0, alpha)` with a learnable `alpha`, then
/// fake-quantized on an unsigned grid with scale `alpha / qmax` (straight-through), saturated
/// at `+-f32::MAX` (scalar twin: [`reference::fake_quant_pact`](crate::reference::fake_quant_pact)).
/// The gradient reaches `x` inside `[0, alpha]` (ties included) and `alpha` where `x > alpha`
/// (PACT's `dy/dalpha`). An `alpha` the optimizer drove to NaN or infinity counts as 0 (every
/// output 0) and receives no gradient while broken.
pub fn fake_quant_pact<const D: usize>(
    x: Tensor<D>,
    alpha: Tensor<1>,
    spec: &QuantSpec,
) -> Tensor<D> {
    if crate::fused::available(&x) {
        let (unsigned, scale) = pact_grid(alpha.clone().detach(), spec);
        let hi = finite_or(alpha, 0.0);
        let (lo, zero) = (hi.zeros_like().detach(), scale.zeros_like());
        let (qmin, qmax, half_up) = fused_grid(&unsigned);
        return crate::fused::clip_fake_quant(x, lo, hi, scale, zero, qmin, qmax, half_up);
    }
    fake_quant_pact_composed(x, alpha, spec)
}

/// [`fake_quant_pact`] written with Burn's tensor ops and autodiff: what runs on backends
/// without [`fused`](crate::fused) kernels, and the reference the fused kernels are tested
/// against.
pub fn fake_quant_pact_composed<const D: usize>(
    x: Tensor<D>,
    alpha: Tensor<1>,
    spec: &QuantSpec,
) -> Tensor<D> {
    let dims = x.dims();
    let a: Tensor<D> = finite_or(alpha.clone(), 0.0).reshape([1; D]).expand(dims);
    let y = x.clamp_min(0.0).min_pair(a);
    let (unsigned, scale) = pact_grid(alpha.detach(), spec);
    let zero = scale.zeros_like();
    let q = fake_quant_composed(y.clone().detach(), scale, zero, &unsigned);
    y.clone() + (q - y).detach()
}

/// The note's trainable clip: `x` clamped to learnable `[min, max]`, then fake-quantized with
/// that range (straight-through), saturated at `+-f32::MAX` (scalar twin:
/// [`reference::fake_quant_min_max`](crate::reference::fake_quant_min_max)). As TF's
/// `FakeQuantWithMinMaxVarsGradient`, `min` receives the gradient of the values below it and
/// `max` of those above it. A bound the optimizer drove to NaN or infinity counts as 0 (the
/// grid then starts or ends at 0, as [`qparams`] treats it) and receives no gradient while
/// broken.
pub fn fake_quant_min_max<const D: usize>(
    x: Tensor<D>,
    min: Tensor<1>,
    max: Tensor<1>,
    spec: &QuantSpec,
) -> Tensor<D> {
    if crate::fused::available(&x) {
        let (scale, zp) = qparams(min.clone().detach(), max.clone().detach(), spec);
        let (lo, hi) = (finite_or(min, 0.0), finite_or(max, 0.0));
        let (qmin, qmax, half_up) = fused_grid(spec);
        return crate::fused::clip_fake_quant(x, lo, hi, scale, zp, qmin, qmax, half_up);
    }
    fake_quant_min_max_composed(x, min, max, spec)
}

/// [`fake_quant_min_max`] written with Burn's tensor ops and autodiff: what runs on backends
/// without [`fused`](crate::fused) kernels, and the reference the fused kernels are tested
/// against.
pub fn fake_quant_min_max_composed<const D: usize>(
    x: Tensor<D>,
    min: Tensor<1>,
    max: Tensor<1>,
    spec: &QuantSpec,
) -> Tensor<D> {
    let lo: Tensor<D> = finite_or(min.clone(), 0.0).reshape([1; D]);
    let hi: Tensor<D> = finite_or(max.clone(), 0.0).reshape([1; D]);
    let dims = x.dims();
    let y = x.max_pair(lo.expand(dims)).min_pair(hi.expand(dims));
    let (scale, zp) = qparams(min.detach(), max.detach(), spec);
    let q = fake_quant_composed(y.clone().detach(), scale, zp, spec);
    y.clone() + (q - y).detach()
}

/// `z / divisor + bias` per channel along `axis` (`divisor`, `bias`: one value per channel,
/// `bias` none for 0): how BatchNorm folding in training (PyTorch's approximate folding) turns
/// the output of a layer with BatchNorm-scaled weights back to the unscaled layer's output.
/// One fused op per pass where [`fused::available`](crate::fused::available) (the gradients of
/// `z`, `divisor` and `bias` from one backward pass), the composed divide and add elsewhere
/// ([`divide_add_channels_composed`]); same values either way.
///
/// # Panics
///
/// If `divisor` does not hold one value per channel of `z` along `axis`.
///
/// # Shapes
///
/// - z: `[d0, ..., C (at axis), ...]`
/// - divisor, bias: `[C]`
/// - output: as `z`
///
/// ```
/// use burn::prelude::*;
/// use burn_qat_core::tensor;
///
/// let device = Device::flex().autodiff();
/// let z = Tensor::<2>::from_floats([[1.0, 4.0], [3.0, -8.0]], &device);
/// let d = Tensor::<1>::from_floats([2.0, 4.0], &device);
/// let b = Tensor::<1>::from_floats([0.5, 0.0], &device);
/// let y = tensor::divide_add_channels(z, d, Some(b), 1);
/// assert_eq!(y.into_data().to_vec::<f32>().unwrap(), vec![1.0, 1.0, 2.0, -2.0]);
/// ```
pub fn divide_add_channels<const D: usize>(
    z: Tensor<D>,
    divisor: Tensor<1>,
    bias: Option<Tensor<1>>,
    axis: usize,
) -> Tensor<D> {
    assert!(
        axis < D && divisor.dims()[0] == z.dims()[axis],
        "divide_add_channels: {} divisors for axis {axis} of a tensor of shape {:?}",
        divisor.dims()[0],
        z.dims()
    );
    if crate::fused::available(&z) {
        let bias = bias.unwrap_or_else(|| divisor.zeros_like());
        return crate::fused::divide_add(z, divisor, bias, axis);
    }
    divide_add_channels_composed(z, divisor, bias, axis)
}

/// [`divide_add_channels`] as Burn tensor ops (the reference the fused op is tested against).
pub fn divide_add_channels_composed<const D: usize>(
    z: Tensor<D>,
    divisor: Tensor<1>,
    bias: Option<Tensor<1>>,
    axis: usize,
) -> Tensor<D> {
    let c = divisor.dims()[0];
    let shape = channel_shape::<D>(c, Some(axis));
    let y = z / divisor.reshape(shape);
    match bias {
        Some(b) => y + b.reshape(shape),
        None => y,
    }
}
