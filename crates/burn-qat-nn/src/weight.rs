use burn::config::Config;
use burn::module::{Module, Param, Reparameterization, Reparameterizer, RunningState};
use burn::prelude::*;
use burn_qat_core::{QParams, QatError, QuantSpec, tensor};

/// Configuration to create a [`WeightFakeQuant`] using the [init function](WeightFakeQuantConfig::init).
#[derive(Config, Debug)]
pub struct WeightFakeQuantConfig {
    /// The integer grid; per-channel specs name the output-channel axis of the weight.
    pub spec: QuantSpec,
    /// Whether fake quantization starts enabled.
    #[config(default = true)]
    pub enabled: bool,
}

impl WeightFakeQuantConfig {
    /// Initializes a [`WeightFakeQuant`] on `device` after validating the spec.
    pub fn init(&self, device: &Device) -> Result<WeightFakeQuant, QatError> {
        self.spec.validate()?;
        Ok(WeightFakeQuant {
            enabled: RunningState::new(Tensor::from_floats([f32::from(self.enabled)], device)),
            spec_code: RunningState::new(Tensor::from_floats(
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
/// every forward, in training and in evaluation alike, so nothing can go stale.
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
pub struct WeightFakeQuant {
    /// `[1]`: 1 if fake quantization is applied, 0 to pass the float weight through.
    pub enabled: RunningState<Tensor<1>>,
    /// `[6]`: the spec, recorded with the model (see [`encode_spec`](crate::encode_spec)).
    pub spec_code: RunningState<Tensor<1>>,
    /// LSQ: a learned step size per output channel (`[channels]`, or `[1]`); `None` uses the
    /// weight's own min/max.
    pub scale: Option<Param<Tensor<1>>>,
    /// The integer grid.
    #[module(skip)]
    pub spec: QuantSpec,
}

impl WeightFakeQuant {
    /// Whether fake quantization is applied.
    pub fn is_enabled(&self) -> bool {
        self.enabled.value().into_scalar::<f32>() > 0.5
    }

    /// The quantization parameters for `weight` (one per output channel for per-channel specs).
    pub fn qparams_for<const D: usize>(&self, weight: Tensor<D>) -> Vec<QParams> {
        if let Some(scale) = &self.scale {
            let s = tensor::lsq_step(scale.val());
            let z = s.zeros_like();
            return tensor::to_qparams(&s, &z);
        }
        let (min, max) = tensor::min_max(weight, self.spec.granularity);
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

    /// The observed range `(min, max)` of `weight`, per channel.
    pub fn range_for<const D: usize>(&self, weight: Tensor<D>) -> (Vec<f32>, Vec<f32>) {
        let (min, max) = tensor::min_max(weight, self.spec.granularity);
        let read = |t: Tensor<1>| {
            t.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        };
        (read(min), read(max))
    }
}

impl Reparameterization for WeightFakeQuant {
    const NAME: &'static str = "weight_fake_quant";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        if !self.is_enabled() {
            return base;
        }
        if let Some(scale) = &self.scale {
            let scale = scale.val();
            let channels = scale.dims()[0];
            let n = base.dims().iter().product::<usize>() / channels.max(1);
            let g = tensor::lsq_grad_factor(n, self.spec.qmax());
            return tensor::fake_quant_lsq(base, scale, None, &self.spec, g);
        }
        let (min, max) = tensor::min_max(base.clone(), self.spec.granularity);
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
        match WeightFakeQuantConfig::new(spec).init(&device) {
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
