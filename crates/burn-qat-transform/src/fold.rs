//! BatchNorm folding for inference: pure functions, modules in and out.
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::BatchNormConfig;
//! use burn::nn::conv::Conv2dConfig;
//! use burn::prelude::*;
//! use burn_qat_transform::fold;
//!
//! let device = Device::flex();
//! let conv = Conv2dConfig::new([2, 3], [3, 3]).init(&device);
//! let bn = BatchNormConfig::new(3).init(&device);
//! let x = Tensor::<4>::ones([1, 2, 5, 5], &device);
//! let want = bn.forward(conv.forward(x.clone()));
//! let folded = fold::fold_conv2d(conv, &bn);
//! folded.forward(x).into_data().assert_approx_eq::<f32>(&want.into_data(), Default::default());
//! ```

use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{BatchNorm, Linear};
use burn::prelude::*;

use crate::Fusable;

/// The per-channel affine map of a BatchNorm in evaluation mode, `y = x * mul + add`:
/// `mul = gamma / sqrt(running_var + eps)`, `add = beta - running_mean * mul`. Differentiable in
/// gamma and beta.
pub fn bn_affine(bn: &BatchNorm) -> (Tensor<1>, Tensor<1>) {
    let device = bn.gamma.val().device();
    let mean = bn.running_mean.value().to_device(&device);
    let var = bn.running_var.value().to_device(&device);
    let mul = bn.gamma.val() / var.add_scalar(bn.epsilon).sqrt();
    let add = bn.beta.val() - mean * mul.clone();
    (mul, add)
}

/// `w * mul` along `axis` and `(b - mean) * mul + beta` (with `b = 0` when absent).
pub fn fold_params<const D: usize>(
    weight: Tensor<D>,
    bias: Option<Tensor<1>>,
    bn: &BatchNorm,
    axis: usize,
) -> (Tensor<D>, Tensor<1>) {
    let (mul, add) = bn_affine(bn);
    let channels = mul.dims()[0];
    let mut shape = [1usize; D];
    shape[axis] = channels;
    let weight = weight * mul.clone().reshape(shape);
    let bias = match bias {
        Some(b) => b * mul + add,
        None => add,
    };
    (weight, bias)
}

/// Folds `bn` into `layer`: the same layer with the folded weight and bias (parameter ids kept).
pub fn fold_into<L, const DI: usize, const DW: usize>(layer: L, bn: &BatchNorm) -> L
where
    L: Fusable<DI, DW>,
{
    let (w, b) = fold_params(layer.weight(), layer.bias(), bn, L::WEIGHT_AXIS);
    layer.with_params(w, b)
}

/// `bn(conv(x))` as one `Conv2d` (grouped, depthwise, any stride/padding/dilation).
pub fn fold_conv2d(conv: Conv2d, bn: &BatchNorm) -> Conv2d {
    fold_into(conv, bn)
}

/// `bn(conv(x))` as one `Conv1d`.
pub fn fold_conv1d(conv: Conv1d, bn: &BatchNorm) -> Conv1d {
    fold_into(conv, bn)
}

/// `bn(linear(x))` as one `Linear` (BatchNorm over the output features; the weight is
/// `[d_input, d_output]`, so its columns are scaled).
pub fn fold_linear(linear: Linear, bn: &BatchNorm) -> Linear {
    fold_into(linear, bn)
}
