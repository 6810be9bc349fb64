use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;

/// Freeze observers after `freeze_observers_after` steps and BatchNorm statistics after
/// `freeze_bn_after` steps (PyTorch's tutorial: observers after 4 epochs, BN after 3).
///
/// The schedule counts steps itself; call [`step`](QatSchedule::step) once per optimizer step
/// with the model. It works from a hand-written loop and from burn-train's `TrainStep::step`
/// (`&self`): the freezes write into the model's shared, recorded state, so they reach the
/// trained model and survive save/load. Clones of a schedule share its counter.
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
/// schedule.step(&fq);
/// assert!(!fq.is_frozen());
/// schedule.step(&fq);
/// assert!(fq.is_frozen());
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

    /// Counts one step and applies the freezes that are due to `model` (through its shared
    /// state, so `&self` suffices). Returns the new step count.
    pub fn step<M: Module>(&self, model: &M) -> usize {
        let n = self.steps.fetch_add(1, Ordering::SeqCst) + 1;
        let observers = self.freeze_observers_after.is_some_and(|k| n >= k);
        let bn = self.freeze_bn_after.is_some_and(|k| n >= k);
        if observers || bn {
            let _ = model.clone().map(&mut Freeze {
                stack: vec![],
                observers,
                bn,
            });
        }
        n
    }
}

struct Freeze {
    stack: Vec<(String, String)>,
    observers: bool,
    bn: bool,
}

impl ModuleMapper for Freeze {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((name, container)) = self.stack.last() else {
            return param;
        };
        let hit = (self.observers && name == "frozen" && container == "Struct:FakeQuant")
            || (self.bn && name == "bn_frozen" && container == "Struct:Fused");
        if hit {
            param.map(|t| t.ones_like())
        } else {
            param
        }
    }
}
