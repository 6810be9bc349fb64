//! # burn-qat-export
//!
//! A trained QAT graph becomes a real integer model: int8 weights, int32 biases, 8-bit
//! activations, fixed-point requantization and lookup tables, equal to the fake-quant graph
//! within one step of its grid (same grids, same rounding) by construction and by test.
//!
//! - [`model`]: the integer model as plain data (a DAG of [`IntOp`]s) and its
//!   [`validate`](IntegerModel::validate);
//! - [`convert()`]: from a [`burn_qat_graph::QatGraph`], one small function per op;
//! - running it: [`IntegerModel::forward`] (GEMM kernels with a packed-weight cache beside the
//!   data, a direct depthwise kernel, scalar references for tests);
//! - [`format`](mod@format): the versioned, checksummed file;
//! - [`budget`]: the work and memory a model may cost, checked by
//!   [`validate`](IntegerModel::validate) at load and before every run.
#![warn(missing_docs)]

pub mod budget;
mod convert;
pub mod format;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod requant;
mod run;
mod validate;

pub use budget::{Budget, Cost};
pub use convert::{ExportError, convert};
pub use model::{
    Grid, IntAdd, IntConv2d, IntLinear, IntMul, IntNode, IntOp, IntegerModel, Lut, ModelError,
    Output, RunError, Window,
};
pub use run::{Values, WeightCache};
