//! The fused ops on Burn's graph-capture device: each op is recorded as one marked
//! `OperationIr::Custom` with its inputs, its grid and its layout, instead of the fifteen
//! primitives of the composed form. Nothing runs (the capture device never executes).
//!
//! A trace of a model holding burn-qat quantizers therefore shows, for every fake-quant, one
//! op named [`ids::FAKE_QUANT`] (inputs `[x, scale, zero_point]`, scalars
//! `[axis, qmin, qmax, half_up]`), and likewise [`ids::LSQ`], [`ids::CLIP_FAKE_QUANT`] and
//! [`ids::MIN_MAX`]: what a graph reader needs to find the quantizer and its grid without
//! pattern-matching primitives.

use burn::backend::Capture;
use burn::backend::TensorMetadata;
use burn::backend::ir::{CustomOpIr, OperationIr, ScalarIr, TensorIr};
use burn::backend::tensor::FloatTensor;
use burn::tensor::Shape;
use burn_router::RouterClient;

use super::FakeQuantOps;

/// The ids of the marked ops in a trace (one place: readers match these).
pub mod ids {
    /// The prefix every id below starts with.
    pub const PREFIX: &str = "burn_qat.";
    /// [`FakeQuantOps::qat_fake_quant`](super::FakeQuantOps::qat_fake_quant): inputs
    /// `[x, scale, zero_point]`, scalars `[axis, qmin, qmax, half_up]`.
    pub const FAKE_QUANT: &str = "burn_qat.fake_quant";
    /// Its backward: inputs `[grad, x, scale, zero_point]`, scalars `[axis, qmin, qmax]`.
    pub const FAKE_QUANT_GRAD: &str = "burn_qat.fake_quant_grad";
    /// [`FakeQuantOps::qat_lsq`](super::FakeQuantOps::qat_lsq): inputs `[x, step, offset]`,
    /// scalars `[axis, qmin, qmax]`.
    pub const LSQ: &str = "burn_qat.lsq";
    /// Its backward: inputs `[grad, x, step, offset]`, scalars `[axis, qmin, qmax]`.
    pub const LSQ_GRAD: &str = "burn_qat.lsq_grad";
    /// [`FakeQuantOps::qat_clip_fake_quant`](super::FakeQuantOps::qat_clip_fake_quant): inputs
    /// `[x, lo, hi, scale, zero_point]`, scalars `[qmin, qmax, half_up]`.
    pub const CLIP_FAKE_QUANT: &str = "burn_qat.clip_fake_quant";
    /// Its backward: inputs `[grad, x, lo, hi]`.
    pub const CLIP_FAKE_QUANT_GRAD: &str = "burn_qat.clip_fake_quant_grad";
    /// [`FakeQuantOps::qat_min_max`](super::FakeQuantOps::qat_min_max): input `[x]`, scalars
    /// `[axis, channels]`, outputs `[min, max]`.
    pub const MIN_MAX: &str = "burn_qat.min_max";
    /// [`FakeQuantOps::qat_divide_add`](super::FakeQuantOps::qat_divide_add) (BatchNorm
    /// folding in training): inputs `[z, divisor, bias]`, scalars `[axis]`.
    pub const DIVIDE_ADD: &str = "burn_qat.divide_add";
    /// Its backward: inputs `[grad, z, divisor]`, scalars `[axis]`.
    pub const DIVIDE_ADD_GRAD: &str = "burn_qat.divide_add_grad";
}

type T = FloatTensor<Capture>;

/// Records one marked op with outputs of the given shapes (the first input's dtype).
fn record(id: &'static str, inputs: Vec<T>, outputs: &[Shape], scalars: Vec<ScalarIr>) -> Vec<T> {
    let client = inputs[0].client.clone();
    let dtype = inputs[0].dtype();
    let outs: Vec<TensorIr> = outputs
        .iter()
        .map(|shape| TensorIr::uninit(client.create_empty_handle(), shape.clone(), dtype))
        .collect();
    let ins: Vec<TensorIr> = inputs.into_iter().map(T::into_ir).collect();
    client.register(OperationIr::Custom(CustomOpIr::with_scalars(
        id, &ins, &outs, scalars,
    )))
}

fn one(mut outputs: Vec<T>) -> T {
    outputs.remove(0)
}

fn three(outputs: Vec<T>) -> (T, T, T) {
    let mut it = outputs.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => unreachable!("three outputs were declared"),
    }
}

fn uint(v: usize) -> ScalarIr {
    ScalarIr::UInt(v as u64)
}

fn float(v: f32) -> ScalarIr {
    ScalarIr::Float(f64::from(v))
}

impl FakeQuantOps for Capture {
    fn qat_fake_quant(
        x: T,
        scale: T,
        zero_point: T,
        axis: usize,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> T {
        let shape = x.shape();
        let scalars = vec![
            uint(axis),
            float(qmin),
            float(qmax),
            ScalarIr::Bool(half_up),
        ];
        one(record(
            ids::FAKE_QUANT,
            vec![x, scale, zero_point],
            &[shape],
            scalars,
        ))
    }

    fn qat_fake_quant_grad(
        grad: T,
        x: T,
        scale: T,
        zero_point: T,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> T {
        let shape = x.shape();
        let scalars = vec![uint(axis), float(qmin), float(qmax)];
        let inputs = vec![grad, x, scale, zero_point];
        one(record(ids::FAKE_QUANT_GRAD, inputs, &[shape], scalars))
    }

    fn qat_lsq(x: T, step: T, offset: T, axis: usize, qmin: f32, qmax: f32) -> T {
        let shape = x.shape();
        let scalars = vec![uint(axis), float(qmin), float(qmax)];
        one(record(ids::LSQ, vec![x, step, offset], &[shape], scalars))
    }

    fn qat_lsq_grad(
        grad: T,
        x: T,
        step: T,
        offset: T,
        axis: usize,
        qmin: f32,
        qmax: f32,
    ) -> (T, T, T) {
        let shapes = [x.shape(), step.shape(), step.shape()];
        let scalars = vec![uint(axis), float(qmin), float(qmax)];
        three(record(
            ids::LSQ_GRAD,
            vec![grad, x, step, offset],
            &shapes,
            scalars,
        ))
    }

    fn qat_clip_fake_quant(
        x: T,
        lo: T,
        hi: T,
        scale: T,
        zero_point: T,
        qmin: f32,
        qmax: f32,
        half_up: bool,
    ) -> T {
        let shape = x.shape();
        let scalars = vec![float(qmin), float(qmax), ScalarIr::Bool(half_up)];
        let inputs = vec![x, lo, hi, scale, zero_point];
        one(record(ids::CLIP_FAKE_QUANT, inputs, &[shape], scalars))
    }

    fn qat_clip_fake_quant_grad(grad: T, x: T, lo: T, hi: T) -> (T, T, T) {
        let shapes = [x.shape(), lo.shape(), hi.shape()];
        three(record(
            ids::CLIP_FAKE_QUANT_GRAD,
            vec![grad, x, lo, hi],
            &shapes,
            vec![],
        ))
    }

    fn qat_min_max(x: T, axis: usize, channels: usize) -> (T, T) {
        let shape = Shape::new([channels]);
        let scalars = vec![uint(axis), uint(channels)];
        let mut out = record(ids::MIN_MAX, vec![x], &[shape.clone(), shape], scalars);
        let hi = out.pop().expect("two outputs were declared");
        let lo = out.pop().expect("two outputs were declared");
        (lo, hi)
    }

    fn qat_divide_add(z: T, divisor: T, bias: T, axis: usize) -> T {
        let shape = z.shape();
        one(record(
            ids::DIVIDE_ADD,
            vec![z, divisor, bias],
            &[shape],
            vec![uint(axis)],
        ))
    }

    fn qat_divide_add_grad(grad: T, z: T, divisor: T, axis: usize) -> (T, T, T) {
        let shapes = [z.shape(), divisor.shape(), divisor.shape()];
        three(record(
            ids::DIVIDE_ADD_GRAD,
            vec![grad, z, divisor],
            &shapes,
            vec![uint(axis)],
        ))
    }
}
