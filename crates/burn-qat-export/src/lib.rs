//! # burn-qat-export
//!
//! A trained QAT graph becomes a real integer model: int8 weights, int32 biases, 8-bit
//! activations, fixed-point requantization and lookup tables, equal to the fake-quant graph
//! within one step of its grid (same grids, same rounding) by construction and by test.
//!
//! This crate is the one bridge between Burn and the integer runtime: [`convert()`] reads a
//! [`burn_qat_graph::QatGraph`] (one small function per op) and returns the runtime's
//! [`IntegerModel`]. Everything after conversion (the model as data, validation, the file
//! format, the runner and its kernels) lives in [`burn_qat_runtime`], which has no Burn inside
//! and is re-exported here.
#![warn(missing_docs)]

mod convert;

pub use burn_qat_runtime::{
    Budget, Cost, Dim, Grid, IntAdd, IntConv2d, IntLayerNorm, IntLinear, IntMatMul, IntMul,
    IntNode, IntOp, IntSoftmax, IntegerModel, Lut, ModelError, Output, RunError, Values,
    WeightCache, Window, accumulator_bound, budget, format, grid, kernels, model, ops, requant,
};
pub use convert::{ExportError, convert, convert_until, grid_from_spec};
