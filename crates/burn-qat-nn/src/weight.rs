use burn::config::Config;
use burn::module::{Content, Module, ModuleDisplay, Param, Reparameterization, Reparameterizer};
use burn::prelude::*;
use burn_qat_core::{QParams, QatError, QuantSpec, tensor};

use crate::{FlagState, StateTensor};

/// Configuration to create a [`WeightFakeQuant`] using the [init function](WeightFakeQuantConfig::init).
#[derive(Config, Debug)]
pub struct WeightFakeQuantConfig {
    /// The integer grid; per-channel specs name the output-channel axis of the weight.
    pub spec: QuantSpec,
    /// Whether fake quantization starts enabled.
    #[config(default = true)]
    pub enabled: bool,
    /// Output channels of the weight along the spec's axis (1 for per-tensor specs): the size
    /// of the range kept while the quantizer is frozen, so that a skeleton's record matches a
    /// frozen model's. `quantize`, fused layers and graph mode set it.
    #[config(default = 1)]
    pub channels: usize,
}

impl WeightFakeQuantConfig {
    /// Initializes a [`WeightFakeQuant`] on `device` after validating the spec and channels.
    pub fn init(&self, device: &Device) -> Result<WeightFakeQuant, QatError> {
        self.spec.validate()?;
        let per_channel = self.spec.axis().is_some();
        if self.channels == 0 || (!per_channel && self.channels != 1) {
            return Err(QatError::InvalidConfig {
                field: "WeightFakeQuantConfig.channels".into(),
                value: self.channels.to_string(),
                allowed: if per_channel {
                    "at least 1: the weight's size along the per-channel axis".into()
                } else {
                    "1 for a per-tensor spec".into()
                },
            });
        }
        let zeros = Tensor::<1>::zeros([self.channels], device);
        Ok(WeightFakeQuant {
            enabled: FlagState::new(self.enabled, device),
            frozen: FlagState::new(false, device),
            observed: FlagState::new(false, device),
            min: StateTensor::new(zeros.clone()),
            max: StateTensor::new(zeros),
            spec_code: StateTensor::new(Tensor::from_floats(
                crate::encode_spec(&self.spec),
                device,
            )),
            scale: None,
            spec: self.spec,
        })
    }
}

/// Weight fake quantization, attached to a weight parameter with Burn's `Reparameterization`
/// API: `param.val()` returns the fake-quantized weight, `param.base()` the float weight that
/// the optimizer updates, and `module.materialize()` bakes the quantized values in.
///
/// The range is the weight's own current min/max (tfmot's `LastValueQuantizer`): recomputed on
/// every forward, in training and in evaluation alike, so nothing can go stale. Frozen
/// ([`switches::freeze_observers`](crate::switches::freeze_observers), PyTorch's
/// `disable_observer`), it keeps the range of the weight it first sees after the freeze; a
/// learned LSQ step stops receiving gradients.
///
/// Attach it with [`WeightFakeQuantizer`] (or the whole-model API of the `burn-qat` crate).
///
/// ```
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::prelude::*;
/// use burn_qat_core::QuantSpec;
/// use burn_qat_nn::{WeightFakeQuant, WeightFakeQuantizer};
///
/// let device = Device::flex();
/// let linear = LinearConfig::new(3, 2).init(&device).apply_reparameterization(
///     WeightFakeQuantizer::new(|_path: &str, dims: &[usize]| {
///         (dims.len() == 2).then(|| QuantSpec::int4_weight_per_channel_symmetric(1))
///     }),
/// );
/// assert!(linear.weight.reparameterization::<WeightFakeQuant>().is_some());
/// assert!(linear.bias.as_ref().unwrap().reparameterization::<WeightFakeQuant>().is_none());
/// // 4-bit symmetric narrow per column: at most 15 distinct values per output channel.
/// let w = linear.weight.val().swap_dims(0, 1).into_data().try_to_vec::<f32>().unwrap();
/// let mut column: Vec<f32> = w[..3].to_vec();
/// column.dedup();
/// assert!(column.len() <= 3);
/// ```
#[derive(Module, Debug)]
#[module(custom_display)]
pub struct WeightFakeQuant {
    /// On if fake quantization is applied, off to pass the float weight through (recorded).
    pub enabled: FlagState,
    /// On while the range is frozen (recorded).
    pub frozen: FlagState,
    /// On once a frozen range has been captured in `min`/`max` (recorded).
    pub observed: FlagState,
    /// The frozen range's minimum, `[channels]`.
    pub min: StateTensor,
    /// The frozen range's maximum, `[channels]`.
    pub max: StateTensor,
    /// `[6]`: the spec, recorded with the model (see [`encode_spec`](crate::encode_spec)).
    pub spec_code: StateTensor,
    /// LSQ: a learned step size per output channel (`[channels]`, or `[1]`); `None` uses the
    /// weight's own min/max.
    pub scale: Option<Param<Tensor<1>>>,
    /// The integer grid.
    #[module(skip)]
    pub spec: QuantSpec,
}

/// `println!("{model}")` shows the spec, the switches and the step or frozen range in use.
impl ModuleDisplay for WeightFakeQuant {
    fn custom_content(&self, content: Content) -> Option<Content> {
        let [_, frozen, observed] = self.switches();
        let range = if self.scale.is_some() {
            "learned step".to_string()
        } else if frozen && observed {
            let read = crate::tree::to_vec::<1>;
            crate::tree::describe_range(Some((read(self.min.value()), read(self.max.value()))))
        } else {
            "the weight's own min/max".to_string()
        };
        let content = content
            .add("spec", &self.spec.to_string())
            .add("enabled", &self.is_enabled())
            .add("frozen", &frozen)
            .add("range", &range);
        match &self.scale {
            Some(s) => content.add("scale", &format!("{:?}", crate::tree::to_vec(s.val()))),
            None => content,
        }
        .optional()
    }
}

impl WeightFakeQuant {
    /// The container type Burn's visitors report for this module (see [`tree`](crate::tree)).
    pub const TYPE: &'static str = "Struct:WeightFakeQuant";
    /// Field name of [`enabled`](WeightFakeQuant::enabled).
    pub const ENABLED: &'static str = "enabled";
    /// Field name of [`frozen`](WeightFakeQuant::frozen).
    pub const FROZEN: &'static str = "frozen";
    /// Field name of [`observed`](WeightFakeQuant::observed).
    pub const OBSERVED: &'static str = "observed";
    /// Field name of [`min`](WeightFakeQuant::min).
    pub const MIN: &'static str = "min";
    /// Field name of [`max`](WeightFakeQuant::max).
    pub const MAX: &'static str = "max";
    /// Field name of [`spec_code`](WeightFakeQuant::spec_code).
    pub const SPEC_CODE: &'static str = "spec_code";
    /// Field name of [`scale`](WeightFakeQuant::scale).
    pub const SCALE: &'static str = "scale";

    /// Whether fake quantization is applied.
    pub fn is_enabled(&self) -> bool {
        self.switches()[0]
    }

    /// Whether the range is frozen.
    pub fn is_frozen(&self) -> bool {
        self.switches()[1]
    }

    /// `[enabled, frozen, observed]`, host state (no device read).
    fn switches(&self) -> [bool; 3] {
        [self.enabled.get(), self.frozen.get(), self.observed.get()]
    }

    /// The range that quantizes `weight`: the frozen one when there is one, else the weight's
    /// own min/max (captured as the frozen range when frozen and none is held yet).
    fn range_of<const D: usize>(&self, weight: Tensor<D>) -> (Tensor<1>, Tensor<1>) {
        let [_, frozen, observed] = self.switches();
        self.range_with(weight, frozen, observed)
    }

    fn range_with<const D: usize>(
        &self,
        weight: Tensor<D>,
        frozen: bool,
        observed: bool,
    ) -> (Tensor<1>, Tensor<1>) {
        let device = weight.device();
        if frozen && observed {
            return (
                self.min.value().to_device(&device),
                self.max.value().to_device(&device),
            );
        }
        let (min, max) = tensor::min_max(weight, self.spec.granularity);
        // Captured whatever `channels` said (a hand-built per-channel quantizer left at the
        // default 1 still freezes; its record then has the weight's channel count).
        if frozen {
            let state = self.min.value().device();
            self.min.set(min.clone().to_device(&state));
            self.max.set(max.clone().to_device(&state));
            // The range first, then `observed`: a replica reading `observed` sees the range.
            self.observed.set(true);
        }
        (min, max)
    }

    /// The quantization parameters for `weight` (one per output channel for per-channel specs),
    /// as the forward pass computes them.
    pub fn qparams_for<const D: usize>(&self, weight: Tensor<D>) -> Vec<QParams> {
        if let Some(scale) = &self.scale {
            let s = tensor::lsq_step(scale.val());
            let z = s.zeros_like();
            return tensor::to_qparams(&s, &z);
        }
        let (min, max) = self.range_of(weight);
        let (s, z) = tensor::qparams(min, max, &self.spec);
        tensor::to_qparams(&s, &z)
    }

    /// LSQ: learn the step size, starting from `weight` as LSQ prescribes
    /// (`2 * mean|w| / sqrt(qmax)`, per channel for per-channel specs).
    pub fn with_learned_step<const D: usize>(mut self, weight: Tensor<D>) -> Self {
        let init = lsq_init(weight, &self.spec);
        self.scale = Some(crate::param_with(self.scale.as_ref(), init));
        self
    }

    /// The range `(min, max)` that quantizes `weight`, per channel: the frozen one when there is
    /// one, else the weight's own.
    pub fn range_for<const D: usize>(&self, weight: Tensor<D>) -> (Vec<f32>, Vec<f32>) {
        let (min, max) = self.range_of(weight);
        (crate::tree::to_vec(min), crate::tree::to_vec(max))
    }
}

impl Reparameterization for WeightFakeQuant {
    const NAME: &'static str = "weight_fake_quant";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        // The switches are host state: no device read.
        let [enabled, frozen, observed] = self.switches();
        if !enabled {
            return base;
        }
        if let Some(scale) = &self.scale {
            let scale = if frozen {
                scale.val().detach()
            } else {
                scale.val()
            };
            let channels = scale.dims()[0];
            let n = base.dims().iter().product::<usize>() / channels.max(1);
            let g = tensor::lsq_grad_factor(n, self.spec.qmax());
            return tensor::fake_quant_lsq(base, scale, None, &self.spec, g);
        }
        let (min, max) = self.range_with(base.clone(), frozen, observed);
        let (scale, zero_point) = tensor::qparams(min, max, &self.spec);
        tensor::fake_quant(base, scale, zero_point, &self.spec)
    }
}

/// A Burn `Reparameterizer` that attaches a [`WeightFakeQuant`] to every float parameter for
/// which `rule(path, dims)` returns a spec. Use with `module.apply_reparameterization(..)`.
///
/// Parameters that do not require gradients on an autodiff device (frozen by the user) are left
/// alone, and so is any parameter whose spec does not fit its rank.
pub struct WeightFakeQuantizer<F> {
    rule: F,
    learned: std::collections::BTreeSet<String>,
}

impl<F: FnMut(&str, &[usize]) -> Option<QuantSpec>> WeightFakeQuantizer<F> {
    /// A quantizer that asks `rule` for the spec of each parameter (its dotted module path and
    /// its dimensions); `None` leaves the parameter in float.
    pub fn new(rule: F) -> Self {
        Self {
            rule,
            learned: Default::default(),
        }
    }

    /// The parameters (by path) whose step size is learned with LSQ, initialized from the weight
    /// as LSQ prescribes (`2 * mean|w| / sqrt(qmax)`, per channel).
    pub fn with_learned(mut self, paths: impl IntoIterator<Item = String>) -> Self {
        self.learned.extend(paths);
        self
    }
}

impl<F: FnMut(&str, &[usize]) -> Option<QuantSpec>> Reparameterizer for WeightFakeQuantizer<F> {
    type Reparam = WeightFakeQuant;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<WeightFakeQuant>) {
        let device = param.lazy_device();
        if device.is_autodiff() && !param.is_require_grad() {
            return (param, None);
        }
        let dims = param.lazy_shape().dims::<D>();
        let Some(spec) = (self.rule)(path, &dims) else {
            return (param, None);
        };
        let channels = spec.axis().and_then(|a| dims.get(a)).copied().unwrap_or(1);
        match WeightFakeQuantConfig::new(spec)
            .with_channels(channels)
            .init(&device)
        {
            Ok(mut wfq) if spec.validate_for_rank(D).is_ok() => {
                if self.learned.contains(path) {
                    wfq.scale = Some(Param::from_tensor(lsq_init(param.val(), &spec)));
                }
                (param, Some(wfq))
            }
            _ => (param, None),
        }
    }
}

/// LSQ's initial step size for `weight`: `2 * mean|w| / sqrt(qmax)` per channel.
fn lsq_init<const D: usize>(weight: Tensor<D>, spec: &QuantSpec) -> Tensor<1> {
    let w = weight.detach();
    let abs = w.abs();
    let mean: Tensor<1> = match spec.axis() {
        None => abs.mean().reshape([1]),
        Some(axis) => {
            let c = abs.dims()[axis];
            let flat: Tensor<2> = abs.swap_dims(axis, 0).reshape([c as i32, -1]);
            flat.mean_dim(1).reshape([c])
        }
    };
    tensor::trainable_leaf(
        mean.mul_scalar(2.0 / (spec.qmax().max(1) as f32).sqrt())
            .clamp_min(burn_qat_core::MIN_SCALE),
    )
}
