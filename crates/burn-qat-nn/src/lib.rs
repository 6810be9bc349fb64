//! # burn-qat-nn
//!
//! The stateful layer of burn-qat, on top of the pure math of [`burn_qat_core`]:
//!
//! - [`FakeQuant`] (made by [`FakeQuantConfig`]): an activation quantizer with a range
//!   [`Observer`], usable anywhere in a forward pass.
//! - [`LearnedFakeQuant`]: learned ranges (LSQ, LSQ+, PACT, trainable min/max), and
//!   [`ActQuant`], the observed-or-learned quantizer that fused layers hold.
//! - [`WeightFakeQuant`]: weight fake-quant attached to a parameter through Burn's
//!   `Reparameterization` API, so a model's own `forward` sees quantized weights.
//! - [`switches`]: model-wide switches (freeze observers, disable fake-quant).
//! - [`FlagState`]: the recorded on/off state of those switches, read on the host so that a
//!   forward pass never waits for the device.
//! - [`StateTensor`]: a quantizer's recorded tensor state (ranges, spec), shared by the
//!   replicas of a training step and copied by a loaded record.
//! - [`record`]: loading records checked against the model's quantizers.
//! - [`tree`]: the one home of module-tree wiring (path stack, quantizer state, own state).
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat_nn::{FakeQuantConfig, Observer};
//! use burn_qat_core::QuantSpec;
//!
//! let device = Device::flex().autodiff();
//! let fq = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric())
//!     .with_observer(Observer::MovingAverage { decay: 0.9 })
//!     .init(&device)
//!     .unwrap();
//! // Training mode on an autodiff device: the observer records [-1, 3], then fake-quantizes.
//! let x = Tensor::<2>::from_floats([[-1.0, 0.5], [2.0, 3.0]], &device);
//! let y = fq.forward(x);
//! assert_eq!(fq.observed_range(), Some((vec![-1.0], vec![3.0])));
//! ```
#![warn(missing_docs)]

mod act_quant;
mod fake_quant;
pub mod flag;
pub mod learned;
pub mod record;
pub mod state;
pub mod switches;
pub mod tree;
mod weight;

mod spec_code;

pub use act_quant::ActQuant;
pub use fake_quant::{FakeQuant, FakeQuantConfig, Observer};
pub use flag::FlagState;
pub use state::StateTensor;
/// A parameter holding `value` as a trainable leaf, keeping `old`'s id when there is one (so
/// optimizer state and records line up).
pub fn param_with<const D: usize>(
    old: Option<&burn::module::Param<burn::tensor::Tensor<D>>>,
    value: burn::tensor::Tensor<D>,
) -> burn::module::Param<burn::tensor::Tensor<D>> {
    let value = burn_qat_core::tensor::trainable_leaf(value);
    match old {
        Some(p) => burn::module::Param::initialized(p.id, value),
        None => burn::module::Param::from_tensor(value),
    }
}

pub use learned::{LearnedFakeQuant, LearnedFakeQuantConfig, LearnedRange, start_learning};
pub use spec_code::{decode_spec, encode_spec};
pub use weight::{WeightFakeQuant, WeightFakeQuantConfig, WeightFakeQuantizer};
