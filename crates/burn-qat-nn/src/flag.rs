//! [`FlagState`]: a recorded on/off switch that the forward pass reads on the host.
//!
//! Quantizer switches (`enabled`, `frozen`, `observed`, `learning`, BatchNorm's `bn_frozen`)
//! must be recorded with the model (a resumed run stays frozen) and reachable by Burn's
//! visitors (the model-wide [`switches`](crate::switches), summaries, the record checker), yet a
//! forward pass that read them from a tensor would pay a host transfer per quantizer per step:
//! a device sync on GPU backends. A `FlagState` keeps both in one cell: a host `bool`, which the
//! forward pass reads, and the `[1]` tensor (`0.0` or `1.0`) that visitors see and records store.
//! Every way in writes both: [`set`](FlagState::set), and Burn's mappers (record loading,
//! [`tree::map_values`](crate::tree::map_values)) through the parameter's load hook, where the
//! new value is read once. A mapper that only passes the parameter through (an optimizer step)
//! reads nothing; one that rewrites it without loading it (`param.map(..)` rather than
//! `Param::transform_for_load`, which Burn's record loader and burn-store use) is ignored, so
//! the tensor always says what the `bool` does.
//!
//! Like Burn's `RunningState` the cell is shared by clones (a forward pass sets `observed`
//! through `&self`, and the replicas of a multi-device step see it), and `valid()` / `train()`
//! make fresh cells, which is how [`tree::own_state`](crate::tree::own_state) gives a module
//! state of its own. Unlike `RunningState`, a record loaded by Burn's loader goes into a fresh
//! cell: loading into `skeleton.clone()` leaves `skeleton` as it was;
//! [`tree::map_values`](crate::tree::map_values) alone writes through to every clone. The
//! record is the same `[1]` tensor a `RunningState<Tensor<1>>` records,
//! so files written before this type load unchanged.
//!
//! ```
//! use burn::module::Module;
//! use burn::prelude::*;
//! use burn_qat_nn::FlagState;
//!
//! let device = Device::flex().autodiff();
//! let flag = FlagState::new(false, &device);
//! let shared = flag.clone();
//! flag.set(true);
//! assert!(shared.get()); // clones share the cell, as RunningState's do
//! let own = flag.valid(); // fresh cell
//! own.set(false);
//! assert!(flag.get() && !own.get());
//! assert_eq!(flag.value().into_data().to_vec::<f32>().unwrap(), vec![1.0]);
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param, ParamId,
};
use burn::prelude::*;

use crate::state::Mapped;

/// A recorded boolean state, read on the host (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct FlagState {
    id: ParamId,
    cell: Arc<Mutex<Cell>>,
}

#[derive(Debug)]
struct Cell {
    on: bool,
    /// `[1]`: `1.0` when `on`, else `0.0`; on the module's device.
    tensor: Tensor<1>,
}

fn encode(on: bool, device: &Device) -> Tensor<1> {
    Tensor::from_floats([f32::from(on)], device)
}

impl FlagState {
    /// Whether recorded values (a `[1]` flag tensor's, first value) say on: above 0.5. The one
    /// decoding of a recorded flag, for readers of records and visitors.
    pub fn decode(values: &[f32]) -> bool {
        values.first().is_some_and(|v| *v > 0.5)
    }

    /// A new state, `on` or off, with its tensor on `device`.
    pub fn new(on: bool, device: &Device) -> Self {
        Self::with_id(ParamId::new(), on, device)
    }

    /// A new state with the given parameter id (lifting a recorded model).
    pub fn with_id(id: ParamId, on: bool, device: &Device) -> Self {
        Self::from_cell(id, on, encode(on, device))
    }

    fn from_cell(id: ParamId, on: bool, tensor: Tensor<1>) -> Self {
        Self {
            id,
            cell: Arc::new(Mutex::new(Cell { on, tensor })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Cell> {
        // A panic while holding the lock leaves a bool and a tensor: keep using them.
        self.cell.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, read on the host (no device transfer).
    pub fn get(&self) -> bool {
        self.lock().on
    }

    /// Sets the state in the cell this value shares with its clones (as
    /// `RunningState::update`); give a module its own cells first
    /// ([`tree::own_state`](crate::tree::own_state)) to leave clones alone.
    pub fn set(&self, on: bool) {
        let mut cell = self.lock();
        if cell.on != on {
            cell.tensor = encode(on, &cell.tensor.device());
            cell.on = on;
        }
    }

    /// The recorded `[1]` tensor: `1.0` when on, `0.0` when off.
    pub fn value(&self) -> Tensor<1> {
        self.lock().tensor.clone()
    }

    /// The parameter id under which visitors and records see the state.
    pub fn id(&self) -> ParamId {
        self.id
    }
}

impl std::fmt::Display for FlagState {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "FlagState({})", self.get())
    }
}

impl ModuleDisplayDefault for FlagState {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&self.to_string()).optional()
    }
}

impl ModuleDisplay for FlagState {}

impl Module for FlagState {
    fn collect_devices(&self, mut devices: Devices) -> Devices {
        let device = self.lock().tensor.device();
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
            cell.tensor = cell.tensor.clone().to_device(device);
        }
        self
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        let tensor = self.value();
        visitor.visit_float(&Param::initialized(self.id, tensor));
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        // What a mapper loads (a record, `tree::map_values`) goes through the load hook; an
        // optimizer step passes the parameter through and costs no read.
        match crate::state::map_state(self.id, self.value(), mapper) {
            // Burn's record loader: the loaded module gets a cell of its own, so loading into
            // a clone leaves the original as it was.
            Mapped::Loaded(t) => {
                let device = self.lock().tensor.device();
                Self::with_id(self.id, Self::decode(&crate::tree::to_vec(t)), &device)
            }
            // `tree::map_values`: written through to every clone, as it means to.
            Mapped::WrittenThrough(t) => {
                self.set(Self::decode(&crate::tree::to_vec(t)));
                self
            }
            Mapped::Passed(_) => self,
        }
    }

    fn materialize(self) -> Self {
        self
    }

    fn valid(&self) -> Self {
        let cell = self.lock();
        Self::from_cell(self.id, cell.on, cell.tensor.clone().without_autodiff())
    }

    fn train(self) -> Self {
        let (on, tensor) = {
            let cell = self.lock();
            (cell.on, cell.tensor.clone())
        };
        Self::from_cell(self.id, on, Tensor::from_inner(tensor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree;

    #[derive(Module, Debug)]
    struct Holder {
        flag: FlagState,
        weight: Param<Tensor<1>>,
    }

    fn holder(on: bool, device: &Device) -> Holder {
        Holder {
            flag: FlagState::new(on, device),
            weight: Param::from_tensor(Tensor::from_floats([1.0, 2.0], device)),
        }
    }

    fn recorded(h: &Holder) -> f32 {
        tree::read(h, |at| at.field() == Some("flag"))[0].values[0]
    }

    #[test]
    fn a_loaded_record_sets_the_host_value() {
        let device = Device::flex();
        let record = holder(true, &device).into_record();
        let skeleton = holder(false, &device);
        let loaded = skeleton.clone().load_record(record);
        assert!(
            loaded.flag.get(),
            "loaded record not seen by the host value"
        );
        assert_eq!(recorded(&loaded), 1.0);
        // Unlike Burn's RunningState, loading leaves the cell the skeleton shares alone.
        assert!(
            !skeleton.flag.get(),
            "loading into a clone switched the original"
        );
    }

    #[test]
    fn tree_fill_sets_the_host_value() {
        let device = Device::flex();
        let h = tree::fill(holder(false, &device), |at| {
            (at.field() == Some("flag")).then_some(1.0)
        });
        assert!(h.flag.get());
        assert_eq!(recorded(&h), 1.0);
    }

    /// An optimizer step passes the flag through; a mapper that rewrites the value without
    /// loading it is ignored, so the record always says what the host value does.
    #[test]
    fn other_mappers_leave_the_state_as_it_is() {
        struct Rewrite;
        impl ModuleMapper for Rewrite {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                param.map(|t| t.ones_like())
            }
        }
        let device = Device::flex();
        let h = holder(false, &device).map(&mut Rewrite);
        assert!(!h.flag.get());
        assert_eq!(recorded(&h), 0.0);
        assert_eq!(tree::to_vec(h.weight.val()), vec![1.0, 1.0]);
    }

    #[test]
    fn valid_and_train_make_fresh_cells_on_the_right_devices() {
        let device = Device::flex().autodiff();
        let h = holder(true, &device);
        let v = h.valid();
        assert!(!v.flag.value().device().is_autodiff());
        v.flag.set(false);
        assert!(h.flag.get(), "valid() must not share the cell");
        let t = v.train();
        assert!(t.flag.value().device().is_autodiff());
        assert!(!t.flag.get());
        assert_eq!(t.flag.id(), h.flag.id());
    }
}
