//! Model-wide switches: reach every [`FakeQuant`] and
//! [`WeightFakeQuant`] inside any module tree.
//!
//! These are PyTorch's `model.apply(disable_observer)` / `disable_fake_quant` for Burn models.
//! Each switch returns the switched model with its own state: switching `model.clone()` to
//! compare leaves `model` as it was (Burn's `RunningState` is otherwise shared by clones).
//! [`in_place`] has the same switches for code that holds only `&model`.
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

use std::collections::BTreeSet;

use burn::module::Module;

use crate::tree::{self, TreePath};
use crate::{FakeQuant, WeightFakeQuant};

fn is_flag(at: &TreePath, fq_field: &str, w_field: &str) -> bool {
    at.is(FakeQuant::TYPE, fq_field) || at.is(WeightFakeQuant::TYPE, w_field)
}

/// Freezes in the cells `model` holds (shared with its clones).
fn freeze_shared<M: Module>(model: M, observing: bool) -> M {
    // A weight quantizer frozen already keeps the range it captured.
    let already: BTreeSet<String> = tree::read(&model, |at| {
        at.is(WeightFakeQuant::TYPE, WeightFakeQuant::FROZEN)
    })
    .into_iter()
    .filter(|v| crate::FlagState::decode(&v.values))
    .map(|v| v.at.prefix(1))
    .collect();
    tree::fill(model, |at| {
        if is_flag(at, FakeQuant::FROZEN, WeightFakeQuant::FROZEN) {
            Some(f32::from(!observing))
        } else if at.is(WeightFakeQuant::TYPE, WeightFakeQuant::OBSERVED)
            && (observing || !already.contains(&at.prefix(1)))
        {
            Some(0.0)
        } else {
            None
        }
    })
}

fn enable_shared<M: Module>(model: M, enabled: bool) -> M {
    tree::fill(model, |at| {
        is_flag(at, FakeQuant::ENABLED, WeightFakeQuant::ENABLED).then_some(f32::from(enabled))
    })
}

/// Stops every observer in `model` from updating its range: activation quantizers keep the
/// range they have, learned ranges stop receiving gradients, weight quantizers keep the range of
/// the weight they see next. The freeze survives `valid()` / `train()` and is recorded with the
/// model. The returned model has its own state: clones of `model` are left as they were.
pub fn freeze_observers<M: Module>(model: M) -> M {
    freeze_shared(tree::own_state(model), false)
}

/// Lets every observer in `model` update again in training (weight quantizers follow their
/// weight again). The returned model has its own state.
pub fn unfreeze_observers<M: Module>(model: M) -> M {
    freeze_shared(tree::own_state(model), true)
}

/// Turns fake quantization of every quantizer in `model` on or off (weights and activations,
/// observed and learned). With `false` the model computes in float, as before QAT; observers
/// keep observing in training. The returned model has its own state: clones of `model` are left
/// as they were.
pub fn set_fake_quant_enabled<M: Module>(model: M, enabled: bool) -> M {
    enable_shared(tree::own_state(model), enabled)
}

/// The same switches, written into the state `model` shares with its clones, for code that
/// only holds `&model`: burn-train's `TrainStep::step(&self, ..)` (the learner keeps the
/// model whose state is written), or a schedule. Everywhere else use the switches above, which
/// leave clones alone.
pub mod in_place {
    use burn::module::Module;

    /// [`freeze_observers`](super::freeze_observers) through `model`'s shared state.
    pub fn freeze_observers<M: Module>(model: &M) {
        let _ = super::freeze_shared(model.clone(), false);
    }

    /// [`unfreeze_observers`](super::unfreeze_observers) through `model`'s shared state.
    pub fn unfreeze_observers<M: Module>(model: &M) {
        let _ = super::freeze_shared(model.clone(), true);
    }

    /// [`set_fake_quant_enabled`](super::set_fake_quant_enabled) through `model`'s shared state.
    pub fn set_fake_quant_enabled<M: Module>(model: &M, enabled: bool) {
        let _ = super::enable_shared(model.clone(), enabled);
    }
}
