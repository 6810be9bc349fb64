//! Quantize any existing Burn model: the whole model in one call, chosen layers, per-layer
//! settings, custom layers.
//!
//! Weights are fake-quantized through Burn's `Reparameterization` API, so the model's own
//! `forward` sees quantized weights with no change to its code, the optimizer updates the float
//! weights underneath, records save it, and [`bake`] folds it away. Activations are quantized
//! where the model says so, with [`Quantized`] fields or [`FakeQuant`](crate::FakeQuant)
//! calls (a Rust struct's `forward` is code, not a graph that could be rewritten).
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig, Relu};
//! use burn::prelude::*;
//! use burn_qat::model::{QatConfig, WeightQuant, quantize, summary};
//!
//! #[derive(Module, Debug)]
//! struct Mlp { fc1: Linear, fc2: Linear, relu: Relu }
//!
//! let device = Device::flex().autodiff();
//! let mlp = Mlp {
//!     fc1: LinearConfig::new(4, 8).init(&device),
//!     fc2: LinearConfig::new(8, 2).init(&device),
//!     relu: Relu::new(),
//! };
//! // Whole model, tfmot's default: 8-bit symmetric per-channel weights...
//! let config = QatConfig::new()
//!     // ...but 4 bits for fc2.
//!     .with_layer("fc2", WeightQuant::int4_per_channel());
//! let qat = quantize(mlp, &config).unwrap();
//! let report = summary(&qat);
//! assert_eq!(report.layers.len(), 2);
//! assert_eq!(report.layers[1].spec.unwrap().bits, 4);
//! println!("{report}");
//! ```

mod layers;
pub(crate) mod plan;
mod summary;

pub use layers::{Layer, QuantConv1d, QuantConv2d, QuantLinear, Quantized, QuantizedConfig};
pub use plan::{
    ActivationQuant, CustomLayer, PlannedParam, QatConfig, QuantizableLayer, Selector, WeightQuant,
    bake, plan, quantize,
};
pub use summary::{ActivationSummary, LayerSummary, QatSummary, summary};
