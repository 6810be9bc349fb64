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

use burn::module::Param;
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{BatchNorm, Linear};
use burn::prelude::*;

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

fn param<const D: usize>(old: Option<&Param<Tensor<D>>>, value: Tensor<D>) -> Param<Tensor<D>> {
    let value = value.detach();
    match old {
        Some(p) => Param::initialized(
            p.id,
            if value.is_autodiff() {
                value.require_grad()
            } else {
                value
            },
        ),
        None => Param::from_tensor(value),
    }
}

/// `bn(conv(x))` as one `Conv2d` (grouped, depthwise, any stride/padding/dilation).
pub fn fold_conv2d(conv: Conv2d, bn: &BatchNorm) -> Conv2d {
    let (w, b) = fold_params(
        conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()),
        bn,
        0,
    );
    Conv2d {
        weight: param(Some(&conv.weight), w),
        bias: Some(param(conv.bias.as_ref(), b)),
        ..conv
    }
}

/// `bn(conv(x))` as one `Conv1d`.
pub fn fold_conv1d(conv: Conv1d, bn: &BatchNorm) -> Conv1d {
    let (w, b) = fold_params(
        conv.weight.val(),
        conv.bias.as_ref().map(|b| b.val()),
        bn,
        0,
    );
    Conv1d {
        weight: param(Some(&conv.weight), w),
        bias: Some(param(conv.bias.as_ref(), b)),
        ..conv
    }
}

/// `bn(linear(x))` as one `Linear` (BatchNorm over the output features; the weight is
/// `[d_input, d_output]`, so its columns are scaled).
pub fn fold_linear(linear: Linear, bn: &BatchNorm) -> Linear {
    let (w, b) = fold_params(
        linear.weight.val(),
        linear.bias.as_ref().map(|b| b.val()),
        bn,
        1,
    );
    Linear {
        weight: param(Some(&linear.weight), w),
        bias: Some(param(linear.bias.as_ref(), b)),
    }
}
