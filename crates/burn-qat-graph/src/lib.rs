//! # burn-qat-graph
//!
//! Graph mode's lower half: [`trace`] records any Burn model's forward with Burn 0.22.1's
//! capture backend, [`lift`] turns the recording into a [`QatGraph`] (a Burn module holding the
//! model's own weights and `ParamId`s, and a plain-data [`Program`]), [`rewrite`] edits it, and
//! [`QatGraph::write_back`] returns trained weights to the user's type. Preparing a graph for
//! QAT from a `QatConfig` is `burn_qat::graph::prepare` (the facade crate, which owns the
//! configuration); the integer model and ONNX are built from a `QatGraph` by `burn-qat-export`
//! and `burn-qat-onnx`.
#![warn(missing_docs)]

mod capture;
mod io;
mod ir;
mod lift;
mod lower;
mod module;
pub mod rewrite;
mod words;
mod write_back;

use burn::module::Module;
use burn::prelude::*;
use burn_qat_core::QatError;

pub use capture::{Trace, TracedParam, trace, trace_many};
pub use io::{GraphIo, GraphTensor};
pub use ir::{Dim, GridRole, LayerKind, Node, Op, Program};
pub use lift::lift;
pub use lower::from_sequential;
pub use module::{GraphLayer, GraphLayerNorm, GraphParam, MAX_RANK, QatGraph, apply_unary};

/// The device of a model's first parameter (the default device for a model without any).
pub fn model_device<M: Module>(model: &M) -> Device {
    model.devices().into_iter().next().unwrap_or_default()
}

/// The model's forward as a float [`QatGraph`], op for op (no fake-quant, BatchNorm unfolded):
/// on flex its forward equals the model's bit for bit. It lives on the model's device.
///
/// # Errors
///
/// See [`trace`]; also an op graph mode does not support, named with its nearest layer.
pub fn build<M, const DI: usize, const DO: usize, F>(
    model: &M,
    input_dims: &[usize],
    forward: F,
) -> Result<QatGraph, QatError>
where
    M: Module,
    F: Fn(&M, Tensor<DI>) -> Tensor<DO>,
{
    let trace = trace(model, input_dims, forward)?;
    lift::lift(&trace, &model_device(model))
}

/// [`build`] for a forward with several inputs or outputs ([`trace_many`]).
///
/// # Errors
///
/// See [`trace_many`] and [`build`].
pub fn build_many<M, I, O, F>(
    model: &M,
    input_dims: &[&[usize]],
    forward: F,
) -> Result<QatGraph, QatError>
where
    M: Module,
    I: GraphIo,
    O: GraphIo,
    F: Fn(&M, I) -> O,
{
    let trace = trace_many(model, input_dims, forward)?;
    lift::lift(&trace, &model_device(model))
}
