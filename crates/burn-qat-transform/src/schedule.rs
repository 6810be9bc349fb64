use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::Module;
use burn_qat_nn::{switches, tree};

use crate::fused::Fused;

/// Freeze observers after `freeze_observers_after` steps and BatchNorm statistics after
/// `freeze_bn_after` steps (PyTorch's tutorial: observers after 4 epochs, BN after 3).
///
/// The schedule counts steps itself; call it once per optimizer step. In a hand-written loop,
/// [`step`](QatSchedule::step) returns the model with the freezes that are due (a copy: clones
/// of the model are left alone). From burn-train's `TrainStep::step(&self, ..)`, which holds
/// only `&model`, [`step_in_place`](QatSchedule::step_in_place) writes the freezes into the
/// state the model shares with the learner's copy. Either way the freezes are recorded with
/// the model and survive save/load. Clones of a schedule share its counter.
///
/// ```
/// use burn::prelude::*;
/// use burn_qat_core::QuantSpec;
/// use burn_qat_nn::FakeQuantConfig;
/// use burn_qat_transform::QatSchedule;
///
/// let device = Device::flex().autodiff();
/// let fq = FakeQuantConfig::new(QuantSpec::default()).init(&device).unwrap();
/// let schedule = QatSchedule::new(Some(2), None);
/// let fq = schedule.step(fq);
/// assert!(!fq.is_frozen());
/// let fq = schedule.step(fq);
/// assert!(fq.is_frozen());
/// // From a `&self` training step:
/// schedule.step_in_place(&fq);
/// assert_eq!(schedule.steps(), 3);
/// ```
#[derive(Clone, Debug)]
pub struct QatSchedule {
    steps: Arc<AtomicUsize>,
    /// Steps after which observers stop updating (`None`: never).
    pub freeze_observers_after: Option<usize>,
    /// Steps after which BatchNorm statistics are frozen in fused modules (`None`: never).
    pub freeze_bn_after: Option<usize>,
}

impl QatSchedule {
    /// A schedule starting at step 0.
    pub fn new(freeze_observers_after: Option<usize>, freeze_bn_after: Option<usize>) -> Self {
        Self {
            steps: Arc::new(AtomicUsize::new(0)),
            freeze_observers_after,
            freeze_bn_after,
        }
    }

    /// Steps counted so far.
    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::SeqCst)
    }

    /// Sets the counter, e.g. when resuming from a checkpoint.
    pub fn set_steps(&self, steps: usize) {
        self.steps.store(steps, Ordering::SeqCst);
    }

    /// Counts one step; returns how many steps are counted and which freezes are due.
    fn count(&self) -> (usize, bool, bool) {
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        let observers = self.freeze_observers_after.is_some_and(|k| n >= k);
        let bn = self.freeze_bn_after.is_some_and(|k| n >= k);
        (n, observers, bn)
    }

    /// Counts one step and returns `model` with the freezes that are due (observers after
    /// `freeze_observers_after` steps, BatchNorm statistics after `freeze_bn_after`). The
    /// returned model has its own state: clones of `model` are left as they were.
    pub fn step<M: Module>(&self, model: M) -> M {
        let (_, observers, bn) = self.count();
        if !(observers || bn) {
            return model;
        }
        let mut model = tree::own_state(model);
        if observers {
            switches::in_place::freeze_observers(&model);
        }
        if bn {
            model = set_bn_frozen_shared(model, true);
        }
        model
    }

    /// Counts one step and writes the freezes that are due into the state `model` shares with
    /// its clones: for burn-train's `TrainStep::step(&self, ..)`, where the learner's model is
    /// the one to freeze. Returns the new step count.
    pub fn step_in_place<M: Module>(&self, model: &M) -> usize {
        let (n, observers, bn) = self.count();
        if observers {
            switches::in_place::freeze_observers(model);
        }
        if bn {
            let _ = set_bn_frozen_shared(model.clone(), true);
        }
        n
    }
}

fn set_bn_frozen_shared<M: Module>(model: M, frozen: bool) -> M {
    tree::fill(model, |at| {
        at.is(Fused::<()>::TYPE, Fused::<()>::BN_FROZEN)
            .then_some(f32::from(frozen))
    })
}

/// Freezes (`true`) or unfreezes the BatchNorm statistics of every fused layer of `model`: a
/// frozen fused layer folds with its running statistics in training too (PyTorch's
/// `freeze_bn_stats`). The returned model has its own state: clones of `model` are left alone.
pub fn set_bn_frozen<M: Module>(model: M, frozen: bool) -> M {
    set_bn_frozen_shared(tree::own_state(model), frozen)
}
