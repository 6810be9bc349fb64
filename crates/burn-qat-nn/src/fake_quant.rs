use burn::config::Config;
use burn::module::{Content, Module, ModuleDisplay, Param};

use crate::{FlagState, StateTensor};
use burn::prelude::*;
use burn_qat_core::{QatError, QuantSpec, ema, tensor};
use serde::{Deserialize, Serialize};

/// How a [`FakeQuant`] tracks the range of what flows through it.
///
/// All observers widen the range to contain 0 and ignore NaN and infinite values, so one bad
/// batch never poisons the range.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Observer {
    /// The min/max of the latest batch (tfmot's `LastValueQuantizer`, used for weights).
    LastValue,
    /// An exponential moving average of the batch min/max: `old * decay + batch * (1 - decay)`;
    /// the first batch sets the range. tfmot uses decay 0.999, PyTorch 0.99.
    MovingAverage {
        /// Weight of the old value, in `[0, 1)`.
        decay: f32,
    },
    /// The min/max of everything seen so far (tfmot's `AllValuesQuantizer`).
    RunningMinMax,
}

impl Observer {
    /// Checks the observer's parameters.
    pub fn validate(&self) -> Result<(), QatError> {
        if let Observer::MovingAverage { decay } = self
            && !(decay.is_finite() && (0.0..1.0).contains(decay))
        {
            return Err(QatError::InvalidConfig {
                field: "Observer::MovingAverage.decay".into(),
                value: decay.to_string(),
                allowed: "a finite value in [0, 1), e.g. 0.999 (tfmot) or 0.99 (PyTorch)".into(),
            });
        }
        Ok(())
    }
}

/// Configuration to create a [`FakeQuant`] module using the [init function](FakeQuantConfig::init).
#[derive(Config, Debug)]
pub struct FakeQuantConfig {
    /// The integer grid.
    pub spec: QuantSpec,
    /// How the range is tracked.
    #[config(default = "Observer::MovingAverage { decay: 0.999 }")]
    pub observer: Observer,
    /// Number of channels along the spec's axis; must be set for per-channel specs and 1 for
    /// per-tensor ones.
    #[config(default = 1)]
    pub channels: usize,
    /// Whether fake quantization starts enabled.
    #[config(default = true)]
    pub enabled: bool,
}

impl FakeQuantConfig {
    /// Checks every field: the spec, the observer and the channel count.
    pub fn validate(&self) -> Result<(), QatError> {
        self.spec.validate()?;
        self.observer.validate()?;
        let per_channel = self.spec.axis().is_some();
        if self.channels == 0 || (!per_channel && self.channels != 1) {
            return Err(QatError::InvalidConfig {
                field: "FakeQuantConfig.channels".into(),
                value: self.channels.to_string(),
                allowed: if per_channel {
                    "at least 1: the size of the per-channel axis".into()
                } else {
                    "1 for a per-tensor spec (use Granularity::PerChannel for more)".into()
                },
            });
        }
        Ok(())
    }

    /// Initializes a new [`FakeQuant`] module on `device`, after [`validate`](Self::validate).
    pub fn init(&self, device: &Device) -> Result<FakeQuant, QatError> {
        self.validate()?;
        let zeros = Tensor::<1>::zeros([self.channels], device);
        Ok(FakeQuant {
            min: StateTensor::new(zeros.clone()),
            max: StateTensor::new(zeros),
            observed: FlagState::new(false, device),
            enabled: FlagState::new(self.enabled, device),
            frozen: FlagState::new(false, device),
            spec_code: StateTensor::new(Tensor::from_floats(
                crate::encode_spec(&self.spec),
                device,
            )),
            observing: Param::from_bool(true),
            spec: self.spec,
            observer: self.observer,
            channels: self.channels,
            step: StepSync::default(),
        })
    }
}

/// Fake quantization of activations (or of any tensor) with a range observer.
///
/// In training (an autodiff device and [`observing`](FakeQuant::observing) enabled, BatchNorm's
/// rule) the observer first updates the range from the input, then the input is
/// fake-quantized with the quantization parameters of that range. In evaluation
/// (`module.valid()`, or a device without autodiff) the stored range is used as is.
/// Before any observation the module passes values through unchanged.
///
/// The range (`min`, `max`) and whether it has been observed are recorded with the model, so a
/// saved and loaded model quantizes the same way. Switches are applied with
/// [`switches`](crate::switches) or directly with [`set_enabled`](FakeQuant::set_enabled) and
/// [`set_observing`](FakeQuant::set_observing).
///
/// Should be created with [`FakeQuantConfig`].
///
/// In training the forward pass fake-quantizes with the range as it stood before the batch
/// (the range the previous steps stored), and the batch updates the stored range for the next
/// step; the first batch, with no range stored yet, passes through. (tfmot and PyTorch
/// quantize with the range after the batch's update; using the range from before it is what
/// makes several devices compute what one device computes, below. The two differ by one
/// step's update.)
///
/// The state is a [`StateTensor`]: the forward pass updates it from `&self` (as BatchNorm's
/// statistics), so a training step sees the update in every clone of the module. The setters
/// and the [`switches`](crate::switches) return modules with their own state, and a record
/// loaded into a clone goes into state of its own: the original is left untouched. Trained on
/// several devices (replicas that are clones, one thread each, as burn-train's
/// `ExecutionStrategy::multi`), the replicas' observations of a step are combined: every
/// replica fake-quantizes with the range from before the step, and the stored range is the one
/// a single device observing the combined batch would store, whatever order the replicas run
/// in (see [`observe`](FakeQuant::observe)).
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct FakeQuant {
    /// Observed minimum, `[channels]`, always `<= 0`.
    pub min: StateTensor,
    /// Observed maximum, `[channels]`, always `>= 0`.
    pub max: StateTensor,
    /// On once a range has been observed (recorded as `[1]`: 1, or 0 before).
    pub observed: FlagState,
    /// On if fake quantization is applied, off to pass values through (recorded).
    pub enabled: FlagState,
    /// On once the observer is frozen (kept across `valid()`/`train()` and recorded, so a
    /// resumed run stays frozen).
    pub frozen: FlagState,
    /// `[6]`: the spec, recorded so that a saved model says how it was quantized
    /// (see [`encode_spec`](crate::encode_spec)).
    pub spec_code: StateTensor,
    /// Training flag (Burn's convention, off in `valid()`): the observer updates only while it
    /// is on, the device has autodiff and the observer is not [`frozen`](FakeQuant::frozen).
    pub observing: Param<burn::module::Flag>,
    /// The integer grid.
    #[module(skip)]
    pub spec: QuantSpec,
    /// The observer kind.
    #[module(skip)]
    pub observer: Observer,
    /// Channels along the spec's axis (1 per tensor).
    #[module(skip)]
    pub channels: usize,
    /// The current training step's observations from several replicas (see
    /// [`observe`](FakeQuant::observe)); transient, not recorded.
    #[module(skip)]
    step: StepSync,
}

/// The observations of one training step, shared by the replicas of a multi-device step.
#[derive(Clone, Default)]
struct StepSync(std::sync::Arc<std::sync::Mutex<StepState>>);

#[derive(Default)]
struct StepState {
    /// The step: the range cell observed and its generation (see [`StepStart`]).
    key: Option<(usize, u64)>,
    /// Threads that observed in this step.
    contributors: Vec<std::thread::ThreadId>,
    /// The range as stored before this step.
    base: Option<StepStart>,
    /// Min of the replicas' batch minima, max of their maxima, so far in this step.
    combined: Option<(Tensor<1>, Tensor<1>)>,
}

/// The range as it stood at the start of a training step: what every replica of the step
/// fake-quantizes with.
#[derive(Clone)]
struct StepStart {
    min: Tensor<1>,
    max: Tensor<1>,
    observed: bool,
}

impl StepSync {
    fn lock(&self) -> std::sync::MutexGuard<'_, StepState> {
        // A replica that panicked mid-step leaves plain data: keep using it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for StepSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepSync")
    }
}

/// `println!("{model}")` shows what the quantizer does now: its spec, observer, switches and
/// range, read from the module's state.
impl ModuleDisplay for FakeQuant {
    fn custom_content(&self, content: Content) -> Option<Content> {
        content
            .add("spec", &self.spec.to_string())
            .add("observer", &format!("{:?}", self.observer))
            .add("enabled", &self.is_enabled())
            .add("frozen", &self.is_frozen())
            .add("range", &crate::tree::describe_range(self.observed_range()))
            .optional()
    }
}

impl FakeQuant {
    /// The container type Burn's visitors report for this module (see [`tree`](crate::tree)).
    pub const TYPE: &'static str = "Struct:FakeQuant";
    /// Field name of [`min`](FakeQuant::min).
    pub const MIN: &'static str = "min";
    /// Field name of [`max`](FakeQuant::max).
    pub const MAX: &'static str = "max";
    /// Field name of [`observed`](FakeQuant::observed).
    pub const OBSERVED: &'static str = "observed";
    /// Field name of [`enabled`](FakeQuant::enabled).
    pub const ENABLED: &'static str = "enabled";
    /// Field name of [`frozen`](FakeQuant::frozen).
    pub const FROZEN: &'static str = "frozen";
    /// Field name of [`spec_code`](FakeQuant::spec_code).
    pub const SPEC_CODE: &'static str = "spec_code";

    /// Observes (in training) and fake-quantizes `input`.
    ///
    /// # Shapes
    ///
    /// - input: any shape; for a per-channel spec, `channels` along the spec's axis
    /// - output: same as input
    ///
    /// # Panics
    ///
    /// If a per-channel axis is missing from the input or has another size than `channels`.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if let Some(axis) = self.spec.axis() {
            assert!(
                axis < D && input.dims()[axis] == self.channels,
                "FakeQuant: per-channel axis {axis} must exist with {} channels, input shape is {:?}",
                self.channels,
                input.dims()
            );
        }
        let device = input.device();
        // The switches are host state: no device read.
        let observing = input.is_autodiff() && self.observing.is_enabled() && !self.frozen.get();
        let start = if observing {
            self.observe_step(&input)
        } else {
            StepStart {
                min: self.min.value(),
                max: self.max.value(),
                observed: self.observed.get(),
            }
        };
        if !self.enabled.get() || !start.observed {
            return input;
        }
        let (min, max) = (start.min.to_device(&device), start.max.to_device(&device));
        let (scale, zero_point) = tensor::qparams(min, max, &self.spec);
        tensor::fake_quant(input, scale, zero_point, &self.spec)
    }

    /// Updates the observed range with `input`, whatever the mode.
    ///
    /// On several devices (burn-train's `ExecutionStrategy::multi`: one replica per device, one
    /// thread each, clones of one model) the replicas' observations of one step are combined
    /// into one: the stored range is the observer rule applied once to the min of their minima
    /// and the max of their maxima, what one device observing the combined batch would store,
    /// and every replica's forward fake-quantizes with the range from before the step, so the
    /// result does not depend on which replica runs first. A step is what the replicas of one
    /// model value observe: the optimizer's update (any mapping of the model other than a
    /// load) starts the next one, which [`StateTensor::generation`] counts; a step in which
    /// some replicas have no batch is combined over those that do. Without mappings between
    /// calls (a calibration loop), a thread that already observed in the step starts the next
    /// one: on one device every call is a step, and a quantizer called twice in one forward
    /// counts as two steps, on one device as on several.
    pub fn observe<const D: usize>(&self, input: &Tensor<D>) {
        let _ = self.observe_step(input);
    }

    /// [`observe`](Self::observe), returning the range as it stood at the start of the step.
    fn observe_step<const D: usize>(&self, input: &Tensor<D>) -> StepStart {
        let device = self.min.value().device();
        let (bmin, bmax) = tensor::min_max(input.clone(), self.spec.granularity);
        let (bmin, bmax) = (bmin.to_device(&device), bmax.to_device(&device));
        // One thread at a time: the step's bookkeeping and the state cells change together.
        let mut step = self.step.lock();
        let me = std::thread::current().id();
        let key = (self.min.cell_key(), self.min.generation());
        if step.key != Some(key) || step.base.is_none() || step.contributors.contains(&me) {
            step.key = Some(key);
            step.contributors.clear();
            step.combined = None;
            step.base = Some(StepStart {
                min: self.min.value(),
                max: self.max.value(),
                observed: self.observed.get(),
            });
        }
        step.contributors.push(me);
        let (bmin, bmax) = match step.combined.take() {
            None => (bmin, bmax),
            Some((lo, hi)) => (
                lo.to_device(&device).min_pair(bmin),
                hi.to_device(&device).max_pair(bmax),
            ),
        };
        step.combined = Some((bmin.clone(), bmax.clone()));
        let start = step.base.clone().expect("set above");
        let (old_min, old_max) = (
            start.min.clone().to_device(&device),
            start.max.clone().to_device(&device),
        );
        let (new_min, new_max) = match self.observer {
            Observer::LastValue => (bmin, bmax),
            // Both ranges contain 0 and start at [0, 0], so min/max needs no first-batch rule.
            Observer::RunningMinMax => (old_min.min_pair(bmin), old_max.max_pair(bmax)),
            // ema on observed state, the batch itself before the first observation.
            Observer::MovingAverage { decay } if start.observed => {
                debug_assert_eq!(ema(0.0, 1.0, decay), 1.0 - decay);
                let blend = |old: Tensor<1>, new: Tensor<1>| {
                    old.mul_scalar(decay) + new.mul_scalar(1.0 - decay)
                };
                (blend(old_min, bmin), blend(old_max, bmax))
            }
            Observer::MovingAverage { .. } => (bmin, bmax),
        };
        // The range first, then `observed`: a reader never sees `observed` before the range it
        // stands for.
        self.min.set(new_min);
        self.max.set(new_max);
        self.observed.set(true);
        start
    }

    /// The current scale and zero point tensors (`[channels]`) on `device`.
    pub fn qparams_on(&self, device: &Device) -> (Tensor<1>, Tensor<1>) {
        let min = self.min.value().to_device(device);
        let max = self.max.value().to_device(device);
        tensor::qparams(min, max, &self.spec)
    }

    /// The current quantization parameters, one per channel, or `None` before any observation.
    pub fn qparams(&self) -> Option<Vec<burn_qat_core::QParams>> {
        if !self.is_observed() {
            return None;
        }
        let (s, z) = self.qparams_on(&self.min.value().device());
        Some(tensor::to_qparams(&s, &z))
    }

    /// The observed `(min, max)` per channel, or `None` before any observation.
    pub fn observed_range(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        if !self.is_observed() {
            return None;
        }
        let read = crate::tree::to_vec::<1>;
        Some((read(self.min.value()), read(self.max.value())))
    }

    /// Whether fake quantization is applied.
    pub fn is_enabled(&self) -> bool {
        self.enabled.get()
    }

    /// Whether a range has been observed (or loaded).
    pub fn is_observed(&self) -> bool {
        self.observed.get()
    }

    /// Turns fake quantization on or off (the observer keeps observing in training). The
    /// returned module has its own state: clones of `self` are left as they were.
    pub fn set_enabled(self, enabled: bool) -> Self {
        let fq = crate::tree::own_state(self);
        fq.enabled.set(enabled);
        fq
    }

    /// Whether the observer is frozen (keeps its range in training).
    pub fn is_frozen(&self) -> bool {
        self.frozen.get()
    }

    /// Freezes (`false`) or unfreezes (`true`) the observer; a frozen observer keeps its range.
    /// The returned module has its own state: clones of `self` are left as they were.
    pub fn set_observing(self, observing: bool) -> Self {
        let fq = crate::tree::own_state(self);
        fq.frozen.set(!observing);
        fq
    }

    /// Sets the range by hand (e.g. from a calibration run) and marks it observed; the range is
    /// widened to contain 0, as observers do. The returned module has its own state: clones of
    /// `self` keep their range.
    ///
    /// # Errors
    ///
    /// [`QatError::InvalidConfig`] if `min` or `max` does not have `channels` values or holds a
    /// NaN or infinite value (which would stick in the range forever).
    pub fn set_range(self, min: &[f32], max: &[f32]) -> Result<Self, QatError> {
        if min.len() != self.channels || max.len() != self.channels {
            return Err(QatError::InvalidConfig {
                field: "FakeQuant::set_range".into(),
                value: format!("{} minima and {} maxima", min.len(), max.len()),
                allowed: format!("{} of each, one per channel", self.channels),
            });
        }
        if let Some(v) = min.iter().chain(max).find(|v| !v.is_finite()) {
            return Err(QatError::InvalidConfig {
                field: "FakeQuant::set_range".into(),
                value: v.to_string(),
                allowed: "finite values".into(),
            });
        }
        let fq = crate::tree::own_state(self);
        let device = fq.min.value().device();
        let min = Tensor::<1>::from_floats(min, &device).clamp_max(0.0);
        let max = Tensor::<1>::from_floats(max, &device).clamp_min(0.0);
        fq.min.set(min);
        fq.max.set(max);
        fq.observed.set(true);
        Ok(fq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_qat_core::{QParams, qparams_from_range, reference};

    fn spec() -> QuantSpec {
        QuantSpec::int8_act_per_tensor_asymmetric()
    }

    #[test]
    fn moving_average_first_batch_then_ema() {
        let device = Device::flex().autodiff();
        let fq = FakeQuantConfig::new(spec())
            .with_observer(Observer::MovingAverage { decay: 0.5 })
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<1>::from_floats([-2.0, 4.0], &device));
        assert_eq!(fq.observed_range(), Some((vec![-2.0], vec![4.0])));
        fq.forward(Tensor::<1>::from_floats([-4.0, 2.0], &device));
        assert_eq!(fq.observed_range(), Some((vec![-3.0], vec![3.0])));
        // NaN and infinities do not poison the range.
        fq.forward(Tensor::<1>::from_floats(
            [f32::NAN, f32::INFINITY, -3.0, 3.0],
            &device,
        ));
        assert_eq!(fq.observed_range(), Some((vec![-3.0], vec![3.0])));
    }

    #[test]
    fn eval_does_not_observe_and_uses_stored_range() {
        let device = Device::flex().autodiff();
        let fq = FakeQuantConfig::new(spec())
            .with_observer(Observer::LastValue)
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<1>::from_floats([-1.0, 1.0], &device));
        let eval = fq.valid();
        let y = eval.forward(Tensor::<1>::from_floats([0.3, 5.0], &Device::flex()));
        assert_eq!(eval.observed_range(), Some((vec![-1.0], vec![1.0])));
        let qp = qparams_from_range(-1.0, 1.0, &spec());
        let want = [
            reference::fake_quant(0.3, qp, &spec()),
            reference::fake_quant(5.0, qp, &spec()),
        ];
        assert_eq!(y.into_data().try_to_vec::<f32>().unwrap(), want.to_vec());
        // Plain (non-autodiff) device: no observation either.
        let plain = FakeQuantConfig::new(spec()).init(&Device::flex()).unwrap();
        let x = Tensor::<1>::from_floats([0.3], &Device::flex());
        assert_eq!(
            plain.forward(x).into_data().try_to_vec::<f32>().unwrap(),
            vec![0.3]
        );
        assert!(!plain.is_observed());
    }

    #[test]
    fn frozen_observer_and_disabled_fake_quant() {
        let device = Device::flex().autodiff();
        let fq = FakeQuantConfig::new(spec())
            .with_observer(Observer::LastValue)
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<1>::from_floats([-1.0, 1.0], &device));
        let fq = fq.set_observing(false);
        fq.forward(Tensor::<1>::from_floats([-8.0, 8.0], &device));
        assert_eq!(fq.observed_range(), Some((vec![-1.0], vec![1.0])));
        // The freeze survives valid() -> train().
        let fq = fq.valid().train();
        fq.forward(Tensor::<1>::from_floats([-8.0, 8.0], &device));
        assert_eq!(fq.observed_range(), Some((vec![-1.0], vec![1.0])));
        let fq = fq.set_enabled(false);
        let y = fq.forward(Tensor::<1>::from_floats([0.123], &device));
        assert_eq!(y.into_data().try_to_vec::<f32>().unwrap(), vec![0.123]);
        let want: QParams = qparams_from_range(-1.0, 1.0, &spec());
        assert_eq!(fq.qparams().unwrap(), vec![want]);
    }

    #[test]
    fn bad_config_is_an_error() {
        let device = Device::flex();
        let err = FakeQuantConfig::new(spec())
            .with_observer(Observer::MovingAverage { decay: 1.5 })
            .init(&device)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: `Observer::MovingAverage.decay` is 1.5, allowed: a finite value in [0, 1), e.g. 0.999 (tfmot) or 0.99 (PyTorch)"
        );
        let err = FakeQuantConfig::new(spec())
            .with_channels(4)
            .init(&device)
            .unwrap_err();
        assert!(
            err.to_string().contains("`FakeQuantConfig.channels` is 4"),
            "{err}"
        );
        let err = FakeQuantConfig::new(spec().with_bits(40))
            .init(&device)
            .unwrap_err();
        assert!(
            err.to_string().contains("`bits` is 40, allowed: 2..=16"),
            "{err}"
        );
    }
}
