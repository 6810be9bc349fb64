//! # burn-qat
//!
//! Quantization-aware training for [Burn](https://burn.dev) 0.22: train in float with the
//! int8 inference path simulated ("fake quantization"), so the model learns weights that
//! survive quantization.
//!
//! The crate map, bottom-up (each layer only uses the ones below it):
//!
//! | crate | what | depends on |
//! |---|---|---|
//! | `burn-qat-core` ([`core`]) | specs, quantization parameters, scalar reference, tensor fake-quant + STE | burn |
//! | `burn-qat-nn` ([`nn`]) | `FakeQuant` + observers, weight fake-quant reparameterization, switches | core |
//! | `burn-qat-transform` ([`transform`]) | BatchNorm folding, fused Conv/Linear+BN+activation, schedules | nn, core |
//! | `burn-qat-export` ([`export`]) | integer model: int8 weights, int32 bias, fixed-point requantization, int8 GEMM | transform, nn, core |
//! | `burn-qat` (this crate) | the public API: whole-model QAT ([`model`]), backend selection ([`backend`]) | transform, nn, core |
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat::{FakeQuantConfig, QuantSpec};
//!
//! let device = burn_qat::backend::default_device().autodiff();
//! let act = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric()).init(&device).unwrap();
//! let x = Tensor::<2>::random([4, 8], burn::tensor::Distribution::Default, &device);
//! let y = act.forward(x.clone());
//! assert_eq!(y.dims(), x.dims());
//! ```
//!
//! # Feature flags
//!
//! - `flex` (default): Burn's pure-Rust CPU backend.
//! - `ndarray`: the (deprecated) ndarray CPU backend.
//! - `wgpu`: the wgpu GPU backend.
#![warn(missing_docs)]

pub mod backend;
pub mod graph;
pub mod model;

/// The pure math layer (re-export of `burn-qat-core`).
pub use burn_qat_core as core;
/// Integer conversion: int8 model with integer arithmetic (re-export of `burn-qat-export`).
pub use burn_qat_export as export;
/// The module layer (re-export of `burn-qat-nn`).
pub use burn_qat_nn as nn;
/// ONNX QDQ export of integer models (re-export of `burn-qat-onnx`).
pub use burn_qat_onnx as onnx;
/// The integer runtime without Burn (re-export of `burn-qat-runtime`; also re-exported by
/// [`export`]).
pub use burn_qat_runtime as runtime;
/// Model transforms: BatchNorm folding, activation fusion, schedules (re-export of
/// `burn-qat-transform`).
pub use burn_qat_transform as transform;

pub use burn_qat_core::{
    Granularity, QParams, QatError, QuantSpec, RoundingMode, qparams_from_range,
};
pub use burn_qat_nn::record::{load_file, load_record};

/// The README's Rust examples, compiled and run by `cargo test` as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
pub use burn_qat_nn::{
    ActQuant, FakeQuant, FakeQuantConfig, LearnedFakeQuant, LearnedFakeQuantConfig, LearnedRange,
    Observer, WeightFakeQuant, WeightFakeQuantConfig, WeightFakeQuantizer, start_learning,
    switches,
};
