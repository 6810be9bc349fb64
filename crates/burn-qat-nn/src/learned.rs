//! Learned quantization ranges: LSQ / LSQ+ step sizes, PACT clipping, trainable min/max, for
//! activations ([`LearnedFakeQuant`]); LSQ for weights is [`WeightFakeQuant`]
//! with a learned `scale`.
//!
//! Activations start in an *observe* phase (a [`FakeQuant`] with its observer), then
//! [`start_learning`] hands the observed range over to the learnable parameters (PyTorch's
//! `_LearnableFakeQuantize` observe -> learn hand-off). The parameters are ordinary Burn
//! `Param`s: the optimizer updates them, records save them, `to_device` moves them, and a
//! `ParamGroup` can give them their own learning rate.
//!
//! Reliability: finite inputs and finite parameters always give finite outputs (values whose
//! grid point lies beyond the largest `f32` saturate at `+-f32::MAX`), and a parameter an
//! optimizer drove to NaN or infinity is repaired, not propagated: an LSQ step counts as
//! [`MIN_SCALE`](burn_qat_core::MIN_SCALE), an LSQ+ offset, a PACT `alpha` and a trainable
//! `min`/`max` as 0 (and receive no gradient while broken). The hand-off from any finite
//! observed range gives finite parameters.

use burn::config::Config;
use std::collections::BTreeMap;

use burn::module::{Content, Module, ModuleDisplay, Param};
use burn::prelude::*;
use burn_qat_core::{QParams, QatError, QuantSpec, tensor};
use serde::{Deserialize, Serialize};

use crate::tree::{self, QuantizerKind};
use crate::{FakeQuant, FakeQuantConfig, Observer, WeightFakeQuant};

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
            learning: crate::FlagState::new(false, device),
            spec: self.spec,
            method: self.method,
        })
    }
}

/// Fake quantization with a learned range. Created by [`LearnedFakeQuantConfig`].
///
/// It obeys the [`switches`](crate::switches) of its observer in both phases: with fake
/// quantization disabled it passes values through; with the observer frozen, the observe phase
/// keeps its range and the learn phase keeps its learned range (no gradient reaches it).
#[derive(Module, Debug)]
#[module(custom_display)]
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
    /// Off while observing, on once learning (recorded as `[1]`: 0 or 1).
    pub learning: crate::FlagState,
    /// The grid.
    #[module(skip)]
    pub spec: QuantSpec,
    /// The method.
    #[module(skip)]
    pub method: LearnedRange,
}

/// `println!("{model}")` shows the method, phase, switches and the range in use.
impl ModuleDisplay for LearnedFakeQuant {
    fn custom_content(&self, content: Content) -> Option<Content> {
        let learned = |p: &Option<Param<Tensor<1>>>| {
            p.as_ref().map(|p| format!("{:?}", tree::to_vec(p.val())))
        };
        let mut content = content
            .add("spec", &self.spec.to_string())
            .add("method", &format!("{:?}", self.method))
            .add(
                "phase",
                if self.is_learning() {
                    "learning"
                } else {
                    "observing"
                },
            )
            .add("enabled", &self.observer.is_enabled())
            .add("frozen", &self.observer.is_frozen())
            .add(
                "observed",
                &tree::describe_range(self.observer.observed_range()),
            );
        for (name, p) in [
            (Self::SCALE, &self.scale),
            (Self::OFFSET, &self.offset),
            (Self::ALPHA, &self.alpha),
            (Self::MIN, &self.min),
            (Self::MAX, &self.max),
        ] {
            if let Some(v) = learned(p) {
                content = content.add(name, &v);
            }
        }
        content.optional()
    }
}

impl LearnedFakeQuant {
    /// The container type Burn's visitors report for this module (see [`tree`]).
    pub const TYPE: &'static str = "Struct:LearnedFakeQuant";
    /// Field name of [`observer`](LearnedFakeQuant::observer).
    pub const OBSERVER: &'static str = "observer";
    /// Field name of [`scale`](LearnedFakeQuant::scale).
    pub const SCALE: &'static str = "scale";
    /// Field name of [`offset`](LearnedFakeQuant::offset).
    pub const OFFSET: &'static str = "offset";
    /// Field name of [`alpha`](LearnedFakeQuant::alpha).
    pub const ALPHA: &'static str = "alpha";
    /// Field name of [`min`](LearnedFakeQuant::min).
    pub const MIN: &'static str = "min";
    /// Field name of [`max`](LearnedFakeQuant::max).
    pub const MAX: &'static str = "max";
    /// Field name of [`learning`](LearnedFakeQuant::learning).
    pub const LEARNING: &'static str = "learning";
    /// The learned range parameters' field names.
    pub const RANGE_PARAMS: [&'static str; 5] =
        [Self::SCALE, Self::OFFSET, Self::ALPHA, Self::MIN, Self::MAX];

    /// Whether the learned parameters are in use.
    pub fn is_learning(&self) -> bool {
        self.learning.get()
    }

    /// Observe phase: the observer's fake-quant; learn phase: the learned range.
    ///
    /// # Shapes
    ///
    /// - input: any shape (`channels` along the spec's axis for per-channel LSQ)
    /// - output: same as input
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        // The phase and the observer's switches are host state: no device read.
        let o = &self.observer;
        let (enabled, frozen) = (o.enabled.get(), o.frozen.get());
        if !self.learning.get() {
            return self.observer.forward(input);
        }
        if !enabled {
            return input;
        }
        // A frozen range gets no gradient, so the optimizer leaves it as it is.
        let val = |p: &Option<Param<Tensor<1>>>| {
            let v = p.as_ref().expect("parameter of this method").val();
            if frozen { v.detach() } else { v }
        };
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
    /// `round(-offset / scale)` (clamped to the grid), a shift of at most half a step. Broken
    /// (NaN or infinite) parameters are repaired as the forward pass repairs them (see the
    /// [module docs](crate::learned)).
    pub fn grid(&self) -> Option<(QuantSpec, Vec<QParams>)> {
        if !self.is_learning() {
            return self.observer.qparams().map(|q| (self.spec, q));
        }
        let read = tree::to_vec::<1>;
        let (qmin, qmax) = (self.spec.qmin(), self.spec.qmax());
        Some(match self.method {
            LearnedRange::Lsq | LearnedRange::LsqPlus => {
                let scale = read(tensor::lsq_step(self.scale.as_ref()?.val()));
                // Repaired as the forward pass repairs it: NaN or infinite counts as 0.
                let offset = self.offset.as_ref().map_or_else(
                    || vec![0.0; scale.len()],
                    |p| {
                        read(p.val())
                            .into_iter()
                            .map(burn_qat_core::reference::finite_or_zero)
                            .collect()
                    },
                );
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
    /// `-zero_point * scale`, saturated at `+-f32::MAX`; PACT: `alpha = max`; MinMax:
    /// `[min, max]`). Every finite observed range gives finite parameters (a range as wide as
    /// `[-3e38, 3e38]` included). Parameter ids are kept. Before any observation nothing changes. The returned module has its own state: clones
    /// of `self` stay in their phase.
    pub fn start_learning(self) -> Self {
        let mut s = tree::own_state(self);
        let Some((lo, hi)) = s.observer.observed_range() else {
            return s;
        };
        let device = s.learning.value().device();
        let start = Handoff::new(&s.spec, s.offset.is_some(), &lo, &hi);
        let set = |p: Option<Param<Tensor<1>>>, v: &[f32]| {
            p.map(|p| crate::param_with(Some(&p), Tensor::from_floats(v, &device)))
        };
        s.scale = set(s.scale, &start.scale);
        s.offset = set(s.offset, &start.offset);
        s.alpha = set(s.alpha, &[start.top]);
        s.min = set(s.min, &[start.bottom]);
        s.max = set(s.max, &[start.top]);
        s.learning.set(true);
        s
    }
}

/// The learned parameters' first values, from the observed per-channel range `[lo, hi]`.
struct Handoff {
    /// LSQ/LSQ+ step per channel.
    scale: Vec<f32>,
    /// LSQ+ offset per channel (`-zero_point * scale`, saturated at `+-f32::MAX`).
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
                // In f64, then saturated: a zero point of 15 times a step of f32::MAX / 15
                // overflows f32 (an observed range of [-f32::MAX, 0] on 4 unsigned bits).
                let offset = -f64::from(q.zero_point) * f64::from(q.scale);
                let offset = offset.clamp(-f64::from(f32::MAX), f64::from(f32::MAX)) as f32;
                (q.scale, offset)
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
/// line up. The returned model has its own state: clones of `model` stay in their phase.
pub fn start_learning<M: Module>(model: M) -> M {
    let model = tree::own_state(model);
    let starts: BTreeMap<String, Handoff> = tree::quantizers(&model)
        .into_iter()
        .filter(|q| q.kind == QuantizerKind::Learned)
        .filter_map(|q| {
            let spec = q.spec?;
            let (lo, hi) = q.range?;
            let offset = q.learned.contains_key(LearnedFakeQuant::OFFSET);
            Some((q.path, Handoff::new(&spec, offset, &lo, &hi)))
        })
        .collect();
    tree::map_values(model, |at, _| {
        let (field, holder) = at.up(0)?;
        if holder != LearnedFakeQuant::TYPE {
            return None;
        }
        let start = starts.get(&at.prefix(1))?;
        Some(match field {
            LearnedFakeQuant::SCALE => start.scale.clone(),
            LearnedFakeQuant::OFFSET => start.offset.clone(),
            LearnedFakeQuant::ALPHA | LearnedFakeQuant::MAX => vec![start.top],
            LearnedFakeQuant::MIN => vec![start.bottom],
            LearnedFakeQuant::LEARNING => vec![1.0],
            _ => return None,
        })
    })
}

/// The learned quantization parameters of `model` (LSQ/LSQ+ steps and offsets, PACT `alpha`,
/// trainable `min`/`max` of every [`LearnedFakeQuant`], and the LSQ `scale` of every
/// [`WeightFakeQuant`]) as a Burn `ParamGroup`, to give them their own
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
    let ids = tree::read(model, |at| {
        at.is_any(LearnedFakeQuant::TYPE, &LearnedFakeQuant::RANGE_PARAMS)
            || at.is(WeightFakeQuant::TYPE, WeightFakeQuant::SCALE)
    })
    .into_iter()
    .map(|v| v.id)
    .collect::<Vec<_>>();
    burn::module::ParamGroup::from_ids(ids)
}
