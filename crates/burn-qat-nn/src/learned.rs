//! Learned quantization ranges: LSQ / LSQ+ step sizes, PACT clipping, trainable min/max, for
//! activations ([`LearnedFakeQuant`]); LSQ for weights is [`WeightFakeQuant`](crate::WeightFakeQuant)
//! with a learned `scale`.
//!
//! Activations start in an *observe* phase (a [`FakeQuant`] with its observer), then
//! [`start_learning`] hands the observed range over to the learnable parameters (PyTorch's
//! `_LearnableFakeQuantize` observe -> learn hand-off). The parameters are ordinary Burn
//! `Param`s: the optimizer updates them, records save them, `to_device` moves them, and a
//! `ParamGroup` can give them their own learning rate.

use burn::config::Config;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId, RunningState};
use burn::prelude::*;
use burn_qat_core::{QParams, QatError, QuantSpec, tensor};
use serde::{Deserialize, Serialize};

use crate::{FakeQuant, FakeQuantConfig, Observer};

/// Which range is learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LearnedRange {
    /// LSQ (Esser et al. 2019): a learnable step size, gradient scaled by `1/sqrt(N * qmax)`.
    Lsq,
    /// LSQ+ (Bhalgat et al. 2020): LSQ plus a learnable offset, for asymmetric activations.
    LsqPlus,
    /// PACT (Choi et al. 2018): a learnable clipping level `alpha` on an unsigned grid.
    Pact,
    /// The note's trainable `[min, max]` clip (TF's `FakeQuantWithMinMaxVars` gradients).
    MinMax,
}

/// Configuration to create a [`LearnedFakeQuant`] using the [init function](LearnedFakeQuantConfig::init).
#[derive(Config, Debug)]
pub struct LearnedFakeQuantConfig {
    /// The integer grid.
    pub spec: QuantSpec,
    /// What is learned.
    pub method: LearnedRange,
    /// Observer of the observe phase.
    #[config(default = "Observer::MovingAverage { decay: 0.999 }")]
    pub observer: Observer,
    /// Channels along the spec's axis (1 per tensor).
    #[config(default = 1)]
    pub channels: usize,
}

impl LearnedFakeQuantConfig {
    /// Initializes the module, in the observe phase.
    pub fn init(&self, device: &Device) -> Result<LearnedFakeQuant, QatError> {
        let observer = FakeQuantConfig::new(self.spec)
            .with_observer(self.observer)
            .with_channels(self.channels)
            .init(device)?;
        let p = |v: f32, n: usize| Param::from_tensor(Tensor::<1>::full([n], v, device));
        let c = self.channels;
        let (scale, offset, alpha, min, max) = match self.method {
            LearnedRange::Lsq => (Some(p(1.0, c)), None, None, None, None),
            LearnedRange::LsqPlus => (Some(p(1.0, c)), Some(p(0.0, c)), None, None, None),
            LearnedRange::Pact => (None, None, Some(p(1.0, 1)), None, None),
            LearnedRange::MinMax => (None, None, None, Some(p(-1.0, 1)), Some(p(1.0, 1))),
        };
        Ok(LearnedFakeQuant {
            observer,
            scale,
            offset,
            alpha,
            min,
            max,
            learning: RunningState::new(Tensor::zeros([1], device)),
            spec: self.spec,
            method: self.method,
        })
    }
}

/// Fake quantization with a learned range. Created by [`LearnedFakeQuantConfig`].
#[derive(Module, Debug)]
pub struct LearnedFakeQuant {
    /// The observe-phase quantizer (its range initializes the learned parameters).
    pub observer: FakeQuant,
    /// LSQ step size, `[channels]`.
    pub scale: Option<Param<Tensor<1>>>,
    /// LSQ+ offset (real value of grid point 0), `[channels]`.
    pub offset: Option<Param<Tensor<1>>>,
    /// PACT clipping level, `[1]`.
    pub alpha: Option<Param<Tensor<1>>>,
    /// Trainable lower clip, `[1]`.
    pub min: Option<Param<Tensor<1>>>,
    /// Trainable upper clip, `[1]`.
    pub max: Option<Param<Tensor<1>>>,
    /// `[1]`: 0 while observing, 1 once learning (recorded).
    pub learning: RunningState<Tensor<1>>,
    /// The grid.
    #[module(skip)]
    pub spec: QuantSpec,
    /// The method.
    #[module(skip)]
    pub method: LearnedRange,
}

impl LearnedFakeQuant {
    /// Whether the learned parameters are in use.
    pub fn is_learning(&self) -> bool {
        self.learning.value().into_scalar::<f32>() > 0.5
    }

    /// Observe phase: the observer's fake-quant; learn phase: the learned range.
    ///
    /// # Shapes
    ///
    /// - input: any shape (`channels` along the spec's axis for per-channel LSQ)
    /// - output: same as input
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if !self.is_learning() {
            return self.observer.forward(input);
        }
        let val =
            |p: &Option<Param<Tensor<1>>>| p.as_ref().expect("parameter of this method").val();
        match self.method {
            LearnedRange::Lsq | LearnedRange::LsqPlus => {
                let n = input.dims().iter().product::<usize>() / self.observer.channels.max(1);
                let g = tensor::lsq_grad_factor(n, self.spec.qmax());
                let offset = self.offset.as_ref().map(|o| o.val());
                tensor::fake_quant_lsq(input, val(&self.scale), offset, &self.spec, g)
            }
            LearnedRange::Pact => tensor::fake_quant_pact(input, val(&self.alpha), &self.spec),
            LearnedRange::MinMax => {
                tensor::fake_quant_min_max(input, val(&self.min), val(&self.max), &self.spec)
            }
        }
    }

    /// The grid this module quantizes to and its parameters (one per channel), for integer
    /// conversion; `None` before any observation.
    ///
    /// Observe phase: the observer's. Learned: LSQ, the spec's grid with step `scale` and zero
    /// point 0; PACT, the unsigned grid with step `alpha / qmax`; MinMax, the grid of
    /// `[min, max]` (as the forward pass computes it). LSQ+ learns a real-valued offset, which
    /// a grid with an integer zero point represents only approximately: the zero point is
    /// `round(-offset / scale)` (clamped to the grid), a shift of at most half a step.
    pub fn grid(&self) -> Option<(QuantSpec, Vec<QParams>)> {
        if !self.is_learning() {
            return self.observer.qparams().map(|q| (self.spec, q));
        }
        let read = |t: Tensor<1>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        };
        let (qmin, qmax) = (self.spec.qmin(), self.spec.qmax());
        Some(match self.method {
            LearnedRange::Lsq | LearnedRange::LsqPlus => {
                let scale = read(tensor::lsq_step(self.scale.as_ref()?.val()));
                let offset = self
                    .offset
                    .as_ref()
                    .map_or_else(|| vec![0.0; scale.len()], |p| read(p.val()));
                let qps = scale
                    .iter()
                    .zip(&offset)
                    .map(|(s, o)| QParams {
                        scale: *s,
                        zero_point: ((-o / s).round_ties_even() as i32).clamp(qmin, qmax),
                    })
                    .collect();
                (self.spec, qps)
            }
            LearnedRange::Pact => {
                let alpha = self.alpha.as_ref()?.val();
                let (spec, scale) = tensor::pact_grid(alpha, &self.spec);
                (spec, tensor::to_qparams(&scale, &scale.zeros_like()))
            }
            LearnedRange::MinMax => {
                let device = self.learning.value().device();
                let val =
                    |p: &Option<Param<Tensor<1>>>| p.as_ref().map(|p| p.val().to_device(&device));
                let (s, z) = tensor::qparams(val(&self.min)?, val(&self.max)?, &self.spec);
                (self.spec, tensor::to_qparams(&s, &z))
            }
        })
    }

    /// The observe -> learn hand-off for this module: the learned parameters take the values
    /// that reproduce the observed range (LSQ: its scale; LSQ+: scale and offset
    /// `-zero_point * scale`; PACT: `alpha = max`; MinMax: `[min, max]`). Parameter ids are kept.
    /// Before any observation nothing changes.
    pub fn start_learning(mut self) -> Self {
        let Some((lo, hi)) = self.observer.observed_range() else {
            return self;
        };
        let device = self.learning.value().device();
        let start = Handoff::new(&self.spec, self.offset.is_some(), &lo, &hi);
        let set = |p: Option<Param<Tensor<1>>>, v: &[f32]| {
            p.map(|p| crate::param_with(Some(&p), Tensor::from_floats(v, &device)))
        };
        self.scale = set(self.scale, &start.scale);
        self.offset = set(self.offset, &start.offset);
        self.alpha = set(self.alpha, &[start.top]);
        self.min = set(self.min, &[start.bottom]);
        self.max = set(self.max, &[start.top]);
        self.learning.update(Tensor::ones([1], &device));
        let _ = self.learning.value_sync();
        self
    }
}

/// The learned parameters' first values, from the observed per-channel range `[lo, hi]`.
struct Handoff {
    /// LSQ/LSQ+ step per channel.
    scale: Vec<f32>,
    /// LSQ+ offset per channel (`-zero_point * scale`).
    offset: Vec<f32>,
    /// PACT `alpha` and the trainable `max`.
    top: f32,
    /// The trainable `min`.
    bottom: f32,
}

impl Handoff {
    fn new(spec: &QuantSpec, with_offset: bool, lo: &[f32], hi: &[f32]) -> Self {
        let (scale, offset) = lo
            .iter()
            .zip(hi)
            .map(|(l, h)| {
                // LSQ has no zero point: a symmetric step on signed grids, [0, max] on
                // unsigned ones (after a ReLU); LSQ+ keeps the asymmetric grid.
                let (l, s) = if with_offset {
                    (*l, *spec)
                } else if spec.signed {
                    (*l, spec.with_symmetric(true))
                } else {
                    (0.0, spec.with_symmetric(false))
                };
                let q = burn_qat_core::qparams_from_range(l, *h, &s);
                (q.scale, -(q.zero_point as f32) * q.scale)
            })
            .unzip();
        Self {
            scale,
            offset,
            top: hi.iter().copied().fold(0f32, f32::max).max(1e-3),
            bottom: lo.iter().copied().fold(0f32, f32::min),
        }
    }
}

/// Hands every [`LearnedFakeQuant`] of `model` over from observing to learning (see
/// [`LearnedFakeQuant::start_learning`]), keeping parameter ids so optimizer state and records
/// line up.
pub fn start_learning<M: Module>(model: M) -> M {
    struct Ranges {
        stack: Vec<(String, String)>,
        found: std::collections::BTreeMap<String, (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)>,
        offsets: std::collections::BTreeSet<String>,
    }
    impl ModuleVisitor for Ranges {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.push((name.into(), container_type.into()));
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = self.stack.len();
            let _ = param.id;
            if n >= 1
                && self.stack[n - 1].1 == "Struct:LearnedFakeQuant"
                && self.stack[n - 1].0 == "offset"
            {
                let key: Vec<&str> = self.stack[..n - 1]
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect();
                self.offsets.insert(key.join("."));
            }
            if n >= 3
                && self.stack[n - 2].1 == "Struct:LearnedFakeQuant"
                && self.stack[n - 1].1 == "Struct:FakeQuant"
            {
                let key: Vec<&str> = self.stack[..n - 2]
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect();
                let v = param
                    .val()
                    .into_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap_or_default();
                let e = self.found.entry(key.join(".")).or_default();
                match self.stack[n - 1].0.as_str() {
                    "min" => e.0 = v,
                    "max" => e.1 = v,
                    "observed" => e.2 = v,
                    "spec_code" => e.3 = v,
                    _ => {}
                }
            }
        }
    }
    struct Set {
        stack: Vec<(String, String)>,
        found: std::collections::BTreeMap<String, (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)>,
        offsets: std::collections::BTreeSet<String>,
    }
    impl ModuleMapper for Set {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.push((name.into(), container_type.into()));
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let n = self.stack.len();
            if n < 1 || self.stack[n - 1].1 != "Struct:LearnedFakeQuant" {
                return param;
            }
            let key: Vec<&str> = self.stack[..n - 1]
                .iter()
                .map(|(s, _)| s.as_str())
                .collect();
            let Some((lo, hi, observed, code)) = self.found.get(&key.join(".")) else {
                return param;
            };
            if observed.first().copied().unwrap_or(0.0) < 0.5 {
                return param;
            }
            let Some(spec) = crate::decode_spec(code) else {
                return param;
            };
            let start = Handoff::new(&spec, self.offsets.contains(&key.join(".")), lo, hi);
            let values: Vec<f32> = match self.stack[n - 1].0.as_str() {
                "scale" => start.scale,
                "offset" => start.offset,
                "alpha" | "max" => vec![start.top],
                "min" => vec![start.bottom],
                "learning" => vec![1.0],
                _ => return param,
            };
            param.map(move |old| {
                let t =
                    Tensor::<1>::from_floats(values.as_slice(), &old.device()).reshape(old.dims());
                if old.is_require_grad() {
                    t.detach().require_grad()
                } else {
                    t.detach()
                }
            })
        }
    }
    let mut ranges = Ranges {
        stack: vec![],
        found: Default::default(),
        offsets: Default::default(),
    };
    model.visit(&mut ranges);
    model.map(&mut Set {
        stack: vec![],
        found: ranges.found,
        offsets: ranges.offsets,
    })
}

/// The learned quantization parameters of `model` (LSQ/LSQ+ steps and offsets, PACT `alpha`,
/// trainable `min`/`max` of every [`LearnedFakeQuant`], and the LSQ `scale` of every
/// [`WeightFakeQuant`](crate::WeightFakeQuant)) as a Burn `ParamGroup`, to give them their own
/// learning rate or optimizer:
///
/// ```
/// use burn::optim::lr_scheduler::LrSchedulerConfig;
/// use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrSchedulerConfig;
/// use burn::prelude::*;
/// use burn_qat_core::QuantSpec;
/// use burn_qat_nn::{LearnedFakeQuantConfig, LearnedRange, learned::range_params};
///
/// let device = Device::flex().autodiff();
/// let fq = LearnedFakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(4), LearnedRange::Pact)
///     .init(&device)
///     .unwrap();
/// // Weights at 1e-3, ranges at 1e-2: pass `lr` to `optimizer.step(lr, model, grads)`.
/// let lr = ModuleLrSchedulerConfig::new(LrSchedulerConfig::Constant(1e-3))
///     .with_group(range_params(&fq), LrSchedulerConfig::Constant(1e-2))
///     .init()
///     .unwrap()
///     .step();
/// let alpha = fq.alpha.as_ref().unwrap();
/// assert_eq!(lr.lr_from_param(alpha.id, None), 1e-2);
/// ```
pub fn range_params<M: Module>(model: &M) -> burn::module::ParamGroup {
    struct Collect {
        stack: Vec<(String, String)>,
        ids: Vec<ParamId>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.stack.push((name.into(), container_type.into()));
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // The stack holds (field name, type of the struct holding the field).
            let Some((name, parent)) = self.stack.last() else {
                return;
            };
            let learned = parent == "Struct:LearnedFakeQuant"
                && matches!(name.as_str(), "scale" | "offset" | "alpha" | "min" | "max");
            let weight_step = parent == "Struct:WeightFakeQuant" && name == "scale";
            if learned || weight_step {
                self.ids.push(param.id);
            }
        }
    }
    let mut c = Collect {
        stack: vec![],
        ids: vec![],
    };
    model.visit(&mut c);
    burn::module::ParamGroup::from_ids(c.ids)
}
