//! Model-wide switches: reach every [`FakeQuant`](crate::FakeQuant) and
//! [`WeightFakeQuant`](crate::WeightFakeQuant) inside any module tree.
//!
//! These are PyTorch's `model.apply(disable_observer)` / `disable_fake_quant` for Burn models.
//! The switches write into the quantizers' shared state (`RunningState` is shared by clones),
//! so apply them to the model you train.
//!
//! ```
//! use burn::prelude::*;
//! use burn_qat_core::QuantSpec;
//! use burn_qat_nn::{FakeQuantConfig, switches};
//!
//! let device = Device::flex().autodiff();
//! let fq = FakeQuantConfig::new(QuantSpec::default()).init(&device).unwrap();
//! let fq = switches::freeze_observers(fq);
//! assert!(fq.is_frozen());
//! let fq = switches::set_fake_quant_enabled(fq, false);
//! assert!(!fq.is_enabled());
//! ```

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;

const QUANTIZERS: [&str; 2] = ["Struct:FakeQuant", "Struct:WeightFakeQuant"];

struct Switch {
    stack: Vec<(String, String)>,
    observing: Option<bool>,
    enabled: Option<bool>,
}

impl Switch {
    fn at(&self, field: &str) -> bool {
        self.stack.last().is_some_and(|(name, container)| {
            name == field && QUANTIZERS.contains(&container.as_str())
        })
    }
}

impl ModuleMapper for Switch {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let set = |param: Param<Tensor<D>>, v: bool| {
            param.map(|t| t.zeros_like().add_scalar(f32::from(v)))
        };
        match (self.enabled, self.observing) {
            (Some(on), _) if self.at("enabled") => set(param, on),
            (_, Some(on)) if self.at("frozen") => set(param, !on),
            _ => param,
        }
    }
}

fn apply<M: Module>(model: M, observing: Option<bool>, enabled: Option<bool>) -> M {
    model.map(&mut Switch {
        stack: Vec::new(),
        observing,
        enabled,
    })
}

/// Stops every observer in `model` from updating its range (it keeps the range it has).
/// The freeze survives `valid()` / `train()`, is recorded with the model, and is shared by
/// clones: calling it on `model.clone()` from a `&self` training step freezes the model.
pub fn freeze_observers<M: Module>(model: M) -> M {
    apply(model, Some(false), None)
}

/// Lets every observer in `model` update again in training.
pub fn unfreeze_observers<M: Module>(model: M) -> M {
    apply(model, Some(true), None)
}

/// Turns fake quantization of every quantizer in `model` on or off (weights and activations).
/// With `false` the model computes in float, as before QAT.
pub fn set_fake_quant_enabled<M: Module>(model: M, enabled: bool) -> M {
    apply(model, None, Some(enabled))
}
