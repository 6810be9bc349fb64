//! [`ActQuant`]: the activation quantizer that fused layers and residual adds hold, with an
//! observed range ([`FakeQuant`]) or a learned one ([`LearnedFakeQuant`]).

use burn::module::Module;
use burn::prelude::*;
use burn_qat_core::{QParams, QatError, QuantSpec};

use crate::{FakeQuant, FakeQuantConfig, LearnedFakeQuant, LearnedFakeQuantConfig, LearnedRange};

/// An activation quantizer: a range observer, or a learned range (LSQ, LSQ+, PACT, min/max)
/// that starts by observing (see [`crate::start_learning`]).
///
/// ```
/// use burn::prelude::*;
/// use burn_qat_core::QuantSpec;
/// use burn_qat_nn::{ActQuant, FakeQuantConfig, LearnedRange};
///
/// let device = Device::flex().autodiff();
/// let config = FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(4));
/// let fq = ActQuant::init(&config, Some(LearnedRange::Lsq), &device).unwrap();
/// let y = fq.forward(Tensor::<1>::from_floats([0.0, 0.5, 1.0], &device));
/// // Observe phase: the observer's 4-bit grid.
/// let (spec, qp) = fq.grid().unwrap();
/// assert_eq!((spec.bits, qp.len()), (4, 1));
/// ```
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // Burn modules cannot be boxed; one per quantized layer
pub enum ActQuant {
    /// Range from an observer.
    Observed(FakeQuant),
    /// Learned range.
    Learned(LearnedFakeQuant),
}

impl ActQuant {
    /// An observer quantizer from `config`, or with `learned`, a learned one with the same
    /// spec, observer (for the observe phase) and channels.
    pub fn init(
        config: &FakeQuantConfig,
        learned: Option<LearnedRange>,
        device: &Device,
    ) -> Result<Self, QatError> {
        Ok(match learned {
            None => ActQuant::Observed(config.init(device)?),
            Some(method) => ActQuant::Learned(
                LearnedFakeQuantConfig::new(config.spec, method)
                    .with_observer(config.observer)
                    .with_channels(config.channels)
                    .init(device)?,
            ),
        })
    }

    /// Fake-quantizes `input`.
    ///
    /// # Shapes
    ///
    /// - input: any shape
    /// - output: same as input
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        match self {
            ActQuant::Observed(fq) => fq.forward(input),
            ActQuant::Learned(fq) => fq.forward(input),
        }
    }

    /// The grid in use and its quantization parameters (one per channel), or `None` before
    /// any observation. See [`LearnedFakeQuant::grid`] for learned ranges.
    pub fn grid(&self) -> Option<(QuantSpec, Vec<QParams>)> {
        match self {
            ActQuant::Observed(fq) => fq.qparams().map(|q| (fq.spec, q)),
            ActQuant::Learned(fq) => fq.grid(),
        }
    }

    /// The observer (of the observe phase, for learned ranges).
    pub fn observer(&self) -> &FakeQuant {
        match self {
            ActQuant::Observed(fq) => fq,
            ActQuant::Learned(fq) => &fq.observer,
        }
    }

    /// The observed `(min, max)` per channel, or `None` before any observation.
    pub fn observed_range(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        self.observer().observed_range()
    }

    /// The configured grid (for PACT, the unsigned grid is used at run time).
    pub fn spec(&self) -> QuantSpec {
        match self {
            ActQuant::Observed(fq) => fq.spec,
            ActQuant::Learned(fq) => fq.spec,
        }
    }
}

impl From<FakeQuant> for ActQuant {
    fn from(fq: FakeQuant) -> Self {
        ActQuant::Observed(fq)
    }
}

impl From<LearnedFakeQuant> for ActQuant {
    fn from(fq: LearnedFakeQuant) -> Self {
        ActQuant::Learned(fq)
    }
}
