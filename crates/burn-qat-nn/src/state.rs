//! [`StateTensor`]: a quantizer's recorded tensor state (observed range, frozen weight range,
//! recorded spec), shared by the replicas of a training step, copied by a loaded record.
//!
//! Burn's `RunningState` is the model for it: a cell shared by clones, so that a forward pass
//! updating it through `&self` on one replica is seen by the others (burn-train's multi-device
//! strategy runs clones of one model), and written in place by mappers. Unlike `RunningState`,
//! a record loaded by Burn's loader (`load_record`, `load_file`, burn-store) goes into a cell of
//! its own: loading into `skeleton.clone()` leaves `skeleton` as it was. Writing through to
//! every clone stays possible where it is meant, through
//! [`tree::map_values`](crate::tree::map_values) (the in-place switches and schedules).
//!
//! Every mapping that is not a load (an optimizer step, a device or dtype mapper) writes the
//! mapped value into the shared cell, as `RunningState` does, and counts one more
//! [`generation`](StateTensor::generation) for this value (not for its clones): replicas of a
//! training step are clones of one model with one generation, and the next step's model has the
//! next one. [`FakeQuant`](crate::FakeQuant) uses it to tell the steps of several devices apart.
//!
//! ```
//! use burn::module::Module;
//! use burn::prelude::*;
//! use burn_qat_nn::StateTensor;
//!
//! let device = Device::flex();
//! let state = StateTensor::new(Tensor::from_floats([1.0, 2.0], &device));
//! let shared = state.clone();
//! state.set(Tensor::from_floats([3.0, 4.0], &device));
//! // Clones share the cell, as RunningState's do...
//! assert_eq!(shared.value().into_data().to_vec::<f32>().unwrap(), vec![3.0, 4.0]);
//! // ...and `valid()` makes a fresh one.
//! let own = state.valid();
//! own.set(Tensor::from_floats([0.0, 0.0], &device));
//! assert_eq!(state.value().into_data().to_vec::<f32>().unwrap(), vec![3.0, 4.0]);
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param, ParamId,
};
use burn::prelude::*;

/// A recorded tensor state shared by clones and copied by loads (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct StateTensor {
    id: ParamId,
    cell: Arc<Mutex<Tensor<1>>>,
    generation: u64,
}

impl StateTensor {
    /// A new state holding `value` (its gradient requirement dropped).
    pub fn new(value: Tensor<1>) -> Self {
        Self::with_id(ParamId::new(), value)
    }

    /// A new state with the given parameter id.
    pub fn with_id(id: ParamId, value: Tensor<1>) -> Self {
        Self {
            id,
            cell: Arc::new(Mutex::new(value.detach().set_require_grad(false))),
            generation: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tensor<1>> {
        // A panic while holding the lock leaves a tensor: keep using it.
        self.cell.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current value.
    pub fn value(&self) -> Tensor<1> {
        self.lock().clone()
    }

    /// Writes `value` into the cell this state shares with its clones (as
    /// `RunningState::update`, without its per-thread averaging); give a module its own cells
    /// first ([`tree::own_state`](crate::tree::own_state)) to leave clones alone.
    pub fn set(&self, value: Tensor<1>) {
        *self.lock() = value.detach().set_require_grad(false);
    }

    /// The parameter id under which visitors and records see the state.
    pub fn id(&self) -> ParamId {
        self.id
    }

    /// How many non-load mappings (optimizer steps, for a model being trained) made this value
    /// from the one the cell was created with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether `self` and `other` share one cell (one is a clone of the other, with no load or
    /// `valid()` in between).
    pub fn shares_cell_with(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cell, &other.cell)
    }

    /// An address that identifies the shared cell while it lives.
    pub(crate) fn cell_key(&self) -> usize {
        Arc::as_ptr(&self.cell) as *const () as usize
    }
}

impl std::fmt::Display for StateTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "StateTensor(id={})", self.id)
    }
}

impl ModuleDisplayDefault for StateTensor {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&"StateTensor".to_string()).optional()
    }
}

impl ModuleDisplay for StateTensor {}

impl Module for StateTensor {
    fn collect_devices(&self, mut devices: Devices) -> Devices {
        let device = self.lock().device();
        if !devices.contains(&device) {
            devices.push(device);
        }
        devices
    }

    fn fork(self, device: &Device) -> Self {
        self.to_device(device)
    }

    fn to_device(self, device: &Device) -> Self {
        {
            let mut cell = self.lock();
            *cell = cell.clone().to_device(device);
        }
        self
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.visit_float(&Param::initialized(self.id, self.value()));
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        // The lock is held while mapping: no forward's update is lost between read and write.
        let mut cell = self.lock();
        let mapped = map_state(self.id, cell.clone(), mapper);
        match mapped {
            Mapped::Loaded(t) => {
                drop(cell);
                Self {
                    generation: self.generation,
                    ..Self::with_id(self.id, t)
                }
            }
            Mapped::WrittenThrough(t) => {
                *cell = t.detach().set_require_grad(false);
                drop(cell);
                self
            }
            Mapped::Passed(t) => {
                *cell = t.detach().set_require_grad(false);
                drop(cell);
                Self {
                    generation: self.generation.wrapping_add(1),
                    ..self
                }
            }
        }
    }

    fn materialize(self) -> Self {
        self
    }

    fn valid(&self) -> Self {
        Self {
            generation: self.generation,
            ..Self::with_id(self.id, self.value().without_autodiff())
        }
    }

    fn train(self) -> Self {
        let value = self.value();
        Self {
            generation: self.generation,
            ..Self::with_id(self.id, Tensor::from_inner(value))
        }
    }
}

/// How a mapper treated a recorded state value: the one reading of Burn's load hook for
/// [`StateTensor`] and [`FlagState`](crate::FlagState).
pub(crate) enum Mapped {
    /// Loaded by Burn's record loader: the loaded module gets a cell of its own.
    Loaded(Tensor<1>),
    /// Loaded by [`tree::map_values`](crate::tree::map_values): written through to every clone.
    WrittenThrough(Tensor<1>),
    /// Any other mapping (an optimizer step, a device or dtype mapper), with its result.
    Passed(Tensor<1>),
}

/// Hands `value` to `mapper` as the parameter `id`, telling a load (through the parameter's
/// load hook) from any other mapping.
pub(crate) fn map_state<M: ModuleMapper>(id: ParamId, value: Tensor<1>, mapper: &mut M) -> Mapped {
    let loaded: Arc<Mutex<Option<Tensor<1>>>> = Arc::default();
    let hook = loaded.clone();
    let param = Param::initialized(id, value).load_mapper(move |t: Tensor<1>| {
        *hook.lock().unwrap_or_else(PoisonError::into_inner) = Some(t.clone());
        t
    });
    let (_, mapped, _) = mapper.map_float(param).consume();
    let new = loaded.lock().unwrap_or_else(PoisonError::into_inner).take();
    match new {
        Some(t) if crate::tree::writing_in_place() => Mapped::WrittenThrough(t),
        Some(t) => Mapped::Loaded(t),
        None => Mapped::Passed(mapped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree;

    #[derive(Module, Debug)]
    struct Holder {
        state: StateTensor,
        weight: Param<Tensor<1>>,
    }

    fn holder(v: f32, device: &Device) -> Holder {
        Holder {
            state: StateTensor::new(Tensor::from_floats([v, v], device)),
            weight: Param::from_tensor(Tensor::from_floats([1.0, 2.0], device)),
        }
    }

    fn values(h: &Holder) -> Vec<f32> {
        tree::to_vec(h.state.value())
    }

    #[test]
    fn a_loaded_record_gets_its_own_cell() {
        let device = Device::flex();
        let record = holder(5.0, &device).into_record();
        let skeleton = holder(1.0, &device);
        let loaded = skeleton.clone().load_record(record);
        assert_eq!(values(&loaded), vec![5.0, 5.0]);
        assert_eq!(
            values(&skeleton),
            vec![1.0, 1.0],
            "the skeleton was written"
        );
        assert!(!loaded.state.shares_cell_with(&skeleton.state));
    }

    #[test]
    fn map_values_writes_through_to_clones() {
        let device = Device::flex();
        let h = holder(1.0, &device);
        let written = tree::fill(h.clone(), |at| (at.field() == Some("state")).then_some(7.0));
        assert_eq!(values(&written), vec![7.0, 7.0]);
        assert_eq!(values(&h), vec![7.0, 7.0]);
    }

    /// An optimizer-like mapper writes in place and counts a generation for the mapped value
    /// only.
    #[test]
    fn other_mappers_write_in_place_and_count_generations() {
        struct Double;
        impl ModuleMapper for Double {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                param.map(|t| t.mul_scalar(2.0))
            }
        }
        let device = Device::flex();
        let h = holder(1.0, &device);
        let mapped = h.clone().map(&mut Double);
        assert_eq!(values(&mapped), vec![2.0, 2.0]);
        assert_eq!(values(&h), vec![2.0, 2.0]);
        assert!(mapped.state.shares_cell_with(&h.state));
        assert_eq!((h.state.generation(), mapped.state.generation()), (0, 1));
    }

    #[test]
    fn valid_and_train_make_fresh_cells_on_the_right_devices() {
        let device = Device::flex().autodiff();
        let h = holder(1.0, &device);
        let v = h.valid();
        assert!(!v.state.value().device().is_autodiff());
        v.state
            .set(Tensor::from_floats([3.0, 3.0], &Device::flex()));
        assert_eq!(values(&h), vec![1.0, 1.0]);
        let t = v.train();
        assert!(t.state.value().device().is_autodiff());
        assert_eq!(t.state.id(), h.state.id());
    }
}
