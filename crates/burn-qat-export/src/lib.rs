//! # burn-qat-export
//!
//! The top layer of burn-qat's library crates: a trained QAT model becomes a real integer model
//! with int8 weights, int32 biases, 8-bit activations and fixed-point requantization, equal to
//! the fake-quant model by construction (same grids, same rounding) and by test.
#![warn(missing_docs)]

mod convert;
pub mod format;
mod kernels;
pub mod model;
pub mod requant;

pub use convert::{ExportError, convert};
pub use model::{ActQ, IntAdd, IntConv2d, IntLayer, IntLinear, IntegerModel, Output, RunError};
