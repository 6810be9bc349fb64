//! # burn-qat-runtime
//!
//! The integer half of burn-qat, with no Burn inside: what ships to a device. A model converted
//! by `burn_qat_runtime::convert` (int8 weights, int32 biases, 8-bit activations, fixed-point
//! requantization and lookup tables) is plain data here, checked, stored, loaded and run.
//!
//! - [`model`]: the integer model as plain data (a DAG of [`IntOp`]s) and its
//!   [`validate`](IntegerModel::validate);
//! - [`grid`]: the integer [`Grid`] of a tensor and the symbolic [`Dim`] of its shape;
//! - running it: [`IntegerModel::forward`] (GEMM kernels with a packed-weight cache beside the
//!   data, a direct depthwise kernel, scalar references for tests);
//! - [`format`](mod@format): the versioned, checksummed file;
//! - [`budget`]: the work and memory a model may cost, checked by
//!   [`validate`](IntegerModel::validate) at load and before every run.
#![warn(missing_docs)]

pub mod budget;
pub mod format;
pub mod grid;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod requant;
mod run;
mod validate;

pub use budget::{Budget, Cost};
pub use grid::{Dim, Grid};
pub use model::{
    IntAdd, IntConv2d, IntLayerNorm, IntLinear, IntMatMul, IntMul, IntNode, IntOp, IntSoftmax,
    IntegerModel, Lut, ModelError, Output, RunError, Window,
};
pub use run::{Plan, Session, Values, WeightCache};
pub use validate::{MAX_OUTPUTS, accumulator_bound};
