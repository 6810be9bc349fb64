//! # burn-qat-transform
//!
//! Model transforms that make training see the inference path, above the modules of
//! [`burn_qat_nn`]:
//!
//! - [`fold`]: BatchNorm folded into the preceding Conv1d/Conv2d/Linear, for inference
//!   (`w' = w * gamma / sqrt(var + eps)` per output channel, `b' = (b - mean) * gamma / sqrt(var + eps) + beta`).
//! - [`Fused`] ([`FusedConv2d`], [`FusedConv1d`], [`FusedLinear`]): QAT modules for
//!   Conv/Linear + BatchNorm + activation, following PyTorch's `ConvBn2d`: the weight is scaled by
//!   `gamma / sqrt(running_var + eps)` before weight fake-quant, so the quantized weight is the
//!   one deployed; no fake-quant sits between the layer and its activation, one after it.
//! - [`FusedAdd`]: residual `Add` + activation with one fake-quant after.
//! - [`QatSchedule`]: freeze observers after N steps and BatchNorm statistics after M steps.
//! - [`fuse_batch_norms`]: fold BatchNorms into their layers in place in any model, by path.
//! - [`Sequential`]: a container whose layer order is data, with automatic discovery and fusion
//!   of Conv/Linear -> BatchNorm -> ReLU chains, one config for all ([`Sequential::fuse`]) or
//!   per layer path ([`Sequential::fuse_by`]: mixed precision, learned ranges).
#![warn(missing_docs)]

pub mod fold;
mod fused;
mod inplace;
mod schedule;
pub mod sequential;

pub use fused::{
    Activation, BnFoldMode, Fusable, Fused, FusedAdd, FusedConfig, FusedConv1d, FusedConv2d,
    FusedLinear,
};
pub use inplace::fuse_batch_norms;
pub use schedule::{QatSchedule, set_bn_frozen};
pub use sequential::{Flatten, Flow, Relu6, Residual, SeqLayer, Sequential};
