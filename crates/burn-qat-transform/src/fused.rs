use burn::config::Config;
use burn::module::{Module, Param, ParamId, Reparameterization};
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{BatchNorm, Linear};
use burn::prelude::*;
use burn::tensor::activation;
use burn_qat_core::{Granularity, QatError, QuantSpec, tensor};
use burn_qat_nn::FlagState;
use burn_qat_nn::{
    ActQuant, FakeQuantConfig, LearnedRange, WeightFakeQuant, WeightFakeQuantConfig, param_with,
};
use serde::{Deserialize, Serialize};

use crate::fold::bn_affine;

/// The activation fused after a layer: no fake-quant between the layer and it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
pub enum Activation {
    /// No activation.
    #[default]
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `min(max(x, min), max)`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

impl Activation {
    /// Applies the activation.
    ///
    /// A clamp with lower bound 0 runs as Burn's `relu` then `clamp_max` (one comparison and
    /// mask each way instead of two: Burn's autodiff records `clamp` as `clamp_max` then
    /// `clamp_min`, and on flex those masks were a sixth of a MobileNetV2 training step).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match *self {
            Activation::Identity => x,
            Activation::Relu => activation::relu(x),
            Activation::Relu6 => activation::relu(x).clamp_max(6.0),
            Activation::Clamp {
                min: 0.0,
                max: f32::INFINITY,
            } => activation::relu(x),
            Activation::Clamp { min: 0.0, max } => activation::relu(x).clamp_max(max),
            Activation::Clamp { min, max } => x.clamp(min, max),
        }
    }

    /// The interval `[lo, hi]` the activation clamps to: every variant is a clamp
    /// (`Identity` is `[-inf, inf]`, `Relu` is `[0, inf]`, `Relu6` is `[0, 6]`).
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Activation::Identity => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Relu6 => (0.0, 6.0),
            Activation::Clamp { min, max } => (min, max),
        }
    }

    /// The clamp to `[lo, hi]` as its simplest variant: `Identity` for `[-inf, inf]`, `Relu`
    /// for `[0, inf]`, `Relu6` for `[0, 6]`, `Clamp` otherwise.
    pub fn from_bounds(lo: f32, hi: f32) -> Self {
        if lo == f32::NEG_INFINITY && hi == f32::INFINITY {
            Activation::Identity
        } else if lo == 0.0 && hi == f32::INFINITY {
            Activation::Relu
        } else if lo == 0.0 && hi == 6.0 {
            Activation::Relu6
        } else {
            Activation::Clamp { min: lo, max: hi }
        }
    }

    /// `self` then `next` as one activation (its simplest variant, see
    /// [`from_bounds`](Self::from_bounds)).
    ///
    /// Every activation is a clamp, and a clamp followed by a clamp is one clamp:
    /// `clamp(clamp(x, l1, h1), l2, h2) == clamp(x, clamp(l1, l2, h2), clamp(h1, l2, h2))` for
    /// every `x`, for bounds with `l <= h` (infinite ones included). When the two intervals
    /// are disjoint the result is a constant (`lo == hi`). This is how `relu(x).clamp_max(6.0)`,
    /// `x.clamp_min(0.0).clamp_max(6.0)` or a hardtanh after a ReLU become the one clamp that a
    /// conv/linear layer fuses and the integer model applies.
    ///
    /// ```
    /// use burn_qat_transform::Activation;
    ///
    /// let clamp_max_6 = Activation::Clamp { min: f32::NEG_INFINITY, max: 6.0 };
    /// assert_eq!(Activation::Relu.then(clamp_max_6), Activation::Relu6);
    /// let hardtanh = Activation::Clamp { min: -1.0, max: 1.0 };
    /// assert_eq!(Activation::Relu.then(hardtanh), Activation::Clamp { min: 0.0, max: 1.0 });
    /// // Disjoint intervals: a constant.
    /// let high = Activation::Clamp { min: 7.0, max: 9.0 };
    /// assert_eq!(Activation::Relu6.then(high), Activation::Clamp { min: 7.0, max: 7.0 });
    /// assert_eq!(Activation::Identity.then(Activation::Relu), Activation::Relu);
    /// ```
    pub fn then(self, next: Activation) -> Activation {
        let (l1, h1) = self.bounds();
        let (l2, h2) = next.bounds();
        // `f32::clamp` panics on NaN or `l2 > h2`; `max` then `min` is Burn's clamp.
        let clamp = |v: f32| v.max(l2).min(h2);
        Activation::from_bounds(clamp(l1), clamp(h1))
    }
}

/// How BatchNorm is folded while training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BnFoldMode {
    /// PyTorch's `_forward_approximate`: weights scaled by the running statistics before
    /// fake-quant, the conv output rescaled back, then BatchNorm with batch statistics.
    #[default]
    Approximate,
    /// Krishnamoorthi (2018) / PyTorch's `_forward_slow`: an extra float conv computes the batch
    /// statistics, and the folded (running-statistics) output is corrected by
    /// `running_std / batch_std`.
    Exact,
}

/// A layer that a BatchNorm can be folded into: `Conv1d`, `Conv2d`, `Linear`.
///
/// `DI` is the rank of its input and output, `DW` the rank of its weight.
pub trait Fusable<const DI: usize, const DW: usize>: Module {
    /// The output-channel axis of the weight (0 for convolutions, 1 for Burn's `Linear`).
    const WEIGHT_AXIS: usize;
    /// The float weight.
    fn weight(&self) -> Tensor<DW>;
    /// The bias, if any.
    fn bias(&self) -> Option<Tensor<1>>;
    /// The layer's forward with another weight and bias.
    fn forward_with(
        &self,
        input: Tensor<DI>,
        weight: Tensor<DW>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<DI>;
    /// The same layer holding `weight` and `bias` (baked, detached).
    fn with_params(self, weight: Tensor<DW>, bias: Tensor<1>) -> Self;
}

macro_rules! fusable_conv {
    ($ty:ident, $rank:literal) => {
        impl Fusable<$rank, $rank> for $ty {
            const WEIGHT_AXIS: usize = 0;
            fn weight(&self) -> Tensor<$rank> {
                self.weight.val()
            }
            fn bias(&self) -> Option<Tensor<1>> {
                self.bias.as_ref().map(|b| b.val())
            }
            fn forward_with(
                &self,
                input: Tensor<$rank>,
                weight: Tensor<$rank>,
                bias: Option<Tensor<1>>,
            ) -> Tensor<$rank> {
                let conv = $ty {
                    weight: Param::initialized(self.weight.id, weight),
                    bias: bias.map(|b| Param::initialized(ParamId::new(), b)),
                    ..self.clone()
                };
                conv.forward(input)
            }
            fn with_params(self, weight: Tensor<$rank>, bias: Tensor<1>) -> Self {
                $ty {
                    weight: param_with(Some(&self.weight), weight),
                    bias: Some(param_with(self.bias.as_ref(), bias)),
                    ..self
                }
            }
        }
    };
}
fusable_conv!(Conv2d, 4);
fusable_conv!(Conv1d, 3);

impl Fusable<2, 2> for Linear {
    const WEIGHT_AXIS: usize = 1;
    fn weight(&self) -> Tensor<2> {
        self.weight.val()
    }
    fn bias(&self) -> Option<Tensor<1>> {
        self.bias.as_ref().map(|b| b.val())
    }
    fn forward_with(
        &self,
        input: Tensor<2>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<2> {
        burn::tensor::module::linear(input, weight, bias)
    }
    fn with_params(self, weight: Tensor<2>, bias: Tensor<1>) -> Self {
        Linear {
            weight: param_with(Some(&self.weight), weight),
            bias: Some(param_with(self.bias.as_ref(), bias)),
        }
    }
}

/// Configuration to create a [`Fused`] module using the [init function](FusedConfig::init).
#[derive(Config, Debug)]
pub struct FusedConfig {
    /// Weight fake-quant; `None` keeps the folded weights in float. A per-channel spec
    /// quantizes per output channel of the layer it is applied to (axis 0 of a convolution's
    /// weight, axis 1 of a `Linear`'s), whatever axis it names, so one config serves both.
    #[config(default = "Some(QuantSpec::int8_weight_per_channel_symmetric(0))")]
    pub weight: Option<QuantSpec>,
    /// The activation after the (folded) layer.
    #[config(default = "Activation::Identity")]
    pub activation: Activation,
    /// Fake-quant after the activation (`None`: the next layer quantizes its input).
    #[config(default = "Some(FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric()))")]
    pub output: Option<FakeQuantConfig>,
    /// How BatchNorm is folded in training.
    #[config(default = "BnFoldMode::Approximate")]
    pub mode: BnFoldMode,
    /// Learn the weight step size with LSQ (initialized from the folded weight) instead of
    /// taking the weight's min/max.
    #[config(default = false)]
    pub learned_weight: bool,
    /// Learn the output range (LSQ, LSQ+, PACT, min/max) after observing with `output`'s
    /// observer; `None` keeps the observer's range.
    #[config(default = "None")]
    pub learned_output: Option<LearnedRange>,
}

impl FusedConfig {
    /// The output quantizer this config describes (`output`, learned if `learned_output`).
    pub fn init_output(&self, device: &Device) -> Result<Option<ActQuant>, QatError> {
        self.output
            .as_ref()
            .map(|c| ActQuant::init(c, self.learned_output, device))
            .transpose()
    }

    /// Builds the fused QAT module from a user's existing (trained) layer and BatchNorm, keeping
    /// their weights and statistics.
    ///
    /// # Errors
    ///
    /// An invalid spec, a weight spec whose per-channel axis is not the layer's output-channel
    /// axis, or a BatchNorm whose channel count differs from the layer's outputs.
    pub fn init<L, const DI: usize, const DW: usize>(
        &self,
        layer: L,
        bn: Option<BatchNorm>,
    ) -> Result<Fused<L>, QatError>
    where
        L: Fusable<DI, DW>,
    {
        let w = layer.weight();
        let device = w.device();
        let channels = w.dims()[L::WEIGHT_AXIS];
        // Per channel means per output channel of this layer (the channels BatchNorm folds
        // into): axis 0 for convolutions, 1 for Burn's `Linear`, whatever the spec named.
        let weight = self.weight.map(|s| match s.granularity {
            Granularity::PerChannel { .. } => s.with_granularity(Granularity::PerChannel {
                axis: L::WEIGHT_AXIS,
            }),
            Granularity::PerTensor => s,
        });
        if let Some(spec) = &weight {
            spec.validate_for_rank(DW)?;
        }
        if let Some(bn) = &bn {
            let c = bn.gamma.val().dims()[0];
            if c != channels {
                return Err(QatError::ChannelMismatch {
                    what: "BatchNorm",
                    expected: channels,
                    got: c,
                    axis: L::WEIGHT_AXIS,
                    context: " (the layer's output channels)".into(),
                });
            }
        }
        let mut fused = Fused {
            weight_quant: weight
                .map(|s| {
                    let c = if s.axis().is_some() { channels } else { 1 };
                    WeightFakeQuantConfig::new(s).with_channels(c).init(&device)
                })
                .transpose()?,
            output: self.init_output(&device)?,
            bn_frozen: FlagState::new(false, &device),
            layer,
            bn,
            activation: self.activation,
            mode: self.mode,
        };
        if self.learned_weight {
            let (w, _) = fused.folded_float();
            fused.weight_quant = fused.weight_quant.map(|wq| wq.with_learned_step(w));
        }
        Ok(fused)
    }
}

/// Layer + BatchNorm + activation, trained as deployed: BatchNorm folded into the weights before
/// weight fake-quant, the activation fused, one fake-quant after it. Built by [`FusedConfig`].
///
/// In training (autodiff device, BatchNorm training flag on, statistics not frozen) BatchNorm
/// uses batch statistics and updates its running statistics; otherwise the module computes
/// exactly what [`folded`](Fused::folded) computes, so the QAT model in evaluation and the
/// folded inference model agree bit for bit.
///
/// ```
/// use burn::nn::BatchNormConfig;
/// use burn::nn::conv::Conv2dConfig;
/// use burn::prelude::*;
/// use burn_qat_transform::{Activation, FusedConfig, FusedConv2d};
///
/// let device = Device::flex().autodiff();
/// let conv = Conv2dConfig::new([1, 4], [3, 3]).init(&device);
/// let bn = BatchNormConfig::new(4).init(&device);
/// let fused: FusedConv2d = FusedConfig::new()
///     .with_activation(Activation::Relu)
///     .init(conv, Some(bn))
///     .unwrap();
/// let y = fused.forward(Tensor::<4>::ones([2, 1, 6, 6], &device));
/// assert_eq!(y.dims(), [2, 4, 4, 4]);
/// ```
#[derive(Module, Debug)]
pub struct Fused<L> {
    /// The layer, holding the float (unfolded) weights that the optimizer updates.
    pub layer: L,
    /// The BatchNorm folded into it, if any.
    pub bn: Option<BatchNorm>,
    /// Fake-quant of the folded weight.
    pub weight_quant: Option<WeightFakeQuant>,
    /// Fake-quant after the activation.
    pub output: Option<ActQuant>,
    /// On once BatchNorm statistics are frozen (running statistics used in training);
    /// recorded.
    pub bn_frozen: FlagState,
    /// The fused activation.
    #[module(skip)]
    pub activation: Activation,
    /// The folding mode in training.
    #[module(skip)]
    pub mode: BnFoldMode,
}

/// `Conv2d` (+ BatchNorm) (+ activation), fused for QAT.
pub type FusedConv2d = Fused<Conv2d>;
/// `Conv1d` (+ BatchNorm) (+ activation), fused for QAT.
pub type FusedConv1d = Fused<Conv1d>;
/// `Linear` (+ BatchNorm1d) (+ activation), fused for QAT.
pub type FusedLinear = Fused<Linear>;

fn channel_shape<const D: usize>(channels: usize, axis: usize) -> [usize; D] {
    let mut shape = [1; D];
    shape[axis] = channels;
    shape
}

impl<L> Fused<L> {
    /// The container type Burn's visitors report for any `Fused<L>` (see
    /// [`burn_qat_nn::tree`]).
    pub const TYPE: &'static str = "Struct:Fused";
    /// Field name of [`layer`](Fused::layer).
    pub const LAYER: &'static str = "layer";
    /// Field name of [`bn`](Fused::bn).
    pub const BN: &'static str = "bn";
    /// Field name of [`weight_quant`](Fused::weight_quant).
    pub const WEIGHT_QUANT: &'static str = "weight_quant";
    /// Field name of [`output`](Fused::output).
    pub const OUTPUT: &'static str = "output";
    /// Field name of [`bn_frozen`](Fused::bn_frozen).
    pub const BN_FROZEN: &'static str = "bn_frozen";
}

impl<L: Module> Fused<L> {
    /// Whether BatchNorm statistics are frozen.
    pub fn is_bn_frozen(&self) -> bool {
        self.bn_frozen.get()
    }

    /// Freezes (`true`) BatchNorm statistics: training then uses the running statistics, as
    /// PyTorch's `freeze_bn_stats`. Recorded; the returned module has its own state, so clones
    /// of `self` are left as they were.
    pub fn set_bn_frozen(self, frozen: bool) -> Self
    where
        Self: Module,
    {
        let fused = burn_qat_nn::tree::own_state(self);
        fused.bn_frozen.set(frozen);
        fused
    }

    fn quantize_weight<const DW: usize>(&self, w: Tensor<DW>) -> Tensor<DW> {
        match &self.weight_quant {
            Some(q) => q.apply(w),
            None => w,
        }
    }

    /// The folded weight (fake-quantized) and bias that evaluation uses.
    pub fn folded_params<const DI: usize, const DW: usize>(&self) -> (Tensor<DW>, Option<Tensor<1>>)
    where
        L: Fusable<DI, DW>,
    {
        self.folded_params_on_grid(None)
    }

    /// [`folded_params`](Self::folded_params) with the integer model's bias for an input of
    /// scale `input_scale` (see [`forward_on_grid`](Self::forward_on_grid)).
    pub fn folded_params_on_grid<const DI: usize, const DW: usize>(
        &self,
        input_scale: Option<f32>,
    ) -> (Tensor<DW>, Option<Tensor<1>>)
    where
        L: Fusable<DI, DW>,
    {
        let (w, b) = self.folded_float();
        let b = match (b, input_scale, &self.weight_quant) {
            (Some(b), Some(s_in), Some(wq)) if wq.is_enabled() => {
                Some(integer_bias(b, s_in, &wq.qparams_for(w.clone())))
            }
            (b, ..) => b,
        };
        (self.quantize_weight(w), b)
    }

    /// The folded weight before weight fake-quant, and the folded bias (running statistics).
    fn folded_float<const DI: usize, const DW: usize>(&self) -> (Tensor<DW>, Option<Tensor<1>>)
    where
        L: Fusable<DI, DW>,
    {
        match &self.bn {
            None => (self.layer.weight(), self.layer.bias()),
            Some(bn) => {
                let (w, b) = crate::fold::fold_params(
                    self.layer.weight(),
                    self.layer.bias(),
                    bn,
                    L::WEIGHT_AXIS,
                );
                (w, Some(b))
            }
        }
    }

    /// Forward pass: folded layer, activation, output fake-quant.
    ///
    /// # Shapes
    ///
    /// Those of the layer (`[batch, channels_in, ...]` to `[batch, channels_out, ...]`; for
    /// `Linear`, `[batch, d_input]` to `[batch, d_output]`).
    pub fn forward<const DI: usize, const DW: usize>(&self, input: Tensor<DI>) -> Tensor<DI>
    where
        L: Fusable<DI, DW>,
    {
        self.forward_on_grid(input, None)
    }

    /// [`forward`](Self::forward) on an input quantized with scale `input_scale`: the bias is
    /// the integer model's, `bias_steps * input_scale * s_w` ([`reference::bias_steps`], int32
    /// steps of the accumulator; gradient straight through to the float bias), so the layer
    /// computes what the integer layer computes. `None`, an unquantized weight or a BatchNorm
    /// folded with batch statistics (training: the bias changes every batch) keep the float
    /// bias. [`QatGraph`](https://docs.rs/burn-qat-graph) passes the scale of the quantizer in
    /// front of each layer in evaluation (inputs without autodiff: a `valid()` graph), so that
    /// it equals the integer model; training keeps the float bias.
    ///
    /// [`reference::bias_steps`]: burn_qat_core::reference::bias_steps
    ///
    /// # Shapes
    ///
    /// Those of [`forward`](Self::forward).
    pub fn forward_on_grid<const DI: usize, const DW: usize>(
        &self,
        input: Tensor<DI>,
        input_scale: Option<f32>,
    ) -> Tensor<DI>
    where
        L: Fusable<DI, DW>,
    {
        let training_bn = match &self.bn {
            Some(bn) => input.is_autodiff() && bn.training.is_enabled() && !self.is_bn_frozen(),
            None => false,
        };
        let y = match (&self.bn, training_bn) {
            (Some(bn), true) => match self.mode {
                BnFoldMode::Approximate => self.forward_approximate(input, bn),
                BnFoldMode::Exact => self.forward_exact(input, bn),
            },
            _ => match (input_scale, &self.weight_quant) {
                // Evaluation on a grid with symmetric weights: the integer layer's arithmetic.
                (Some(s_in), Some(wq))
                    if !input.is_autodiff() && wq.is_enabled() && wq.spec.symmetric =>
                {
                    self.forward_integer(input, s_in, wq)
                }
                _ => {
                    let (w, b) = self.folded_params_on_grid(input_scale);
                    self.layer.forward_with(input, w, b)
                }
            },
        };
        let y = self.activation.forward(y);
        match &self.output {
            Some(fq) => fq.forward(y),
            None => y,
        }
    }

    /// The integer layer's sum in float: `(sum (q - z_in) * q_w + bias_steps) * s_in * s_w`,
    /// the products and sums of integers (exact in `f32` while a sum stays under 2^24), the
    /// bias in accumulator steps, one rounding at the end, as the integer model requantizes
    /// `acc + bias` with one fixed-point multiplier. Summing `s_in * q` times `s_w * q_w`
    /// instead rounds every product and partial sum: rare 1-step flips that compound with
    /// depth (4% of a ResNet-18's logits).
    fn forward_integer<const DI: usize, const DW: usize>(
        &self,
        input: Tensor<DI>,
        s_in: f32,
        wq: &WeightFakeQuant,
    ) -> Tensor<DI>
    where
        L: Fusable<DI, DW>,
    {
        let (wf, b) = self.folded_float();
        let qps = wq.qparams_for(wf.clone());
        let w = self.quantize_weight(wf);
        let c = w.dims()[L::WEIGHT_AXIS];
        let device = w.device();
        let s_w = |ch: usize| weight_scale(&qps, ch);
        let per_channel =
            |values: Vec<f32>| Tensor::<1>::from_data(TensorData::new(values, [c]), &device);
        let w_steps =
            per_channel((0..c).map(s_w).collect()).reshape(channel_shape::<DW>(c, L::WEIGHT_AXIS));
        let w_int = (w / w_steps).round();
        let x_int = input.div_scalar(s_in).round();
        let acc = self.layer.forward_with(x_int, w_int, None);
        let bias = match b {
            Some(b) => bias_in_steps(&burn_qat_nn::tree::to_vec::<1>(b), s_in, &qps),
            None => vec![0.0; c],
        };
        let unit = per_channel((0..c).map(|ch| s_in * s_w(ch)).collect());
        let shape = channel_shape::<DI>(c, 1);
        (acc + per_channel(bias).reshape(shape)) * unit.reshape(shape)
    }

    fn forward_approximate<const DI: usize, const DW: usize>(
        &self,
        input: Tensor<DI>,
        bn: &BatchNorm,
    ) -> Tensor<DI>
    where
        L: Fusable<DI, DW>,
    {
        let (mul, _) = bn_affine(bn);
        let c = mul.dims()[0];
        let w = self.quantize_weight(
            self.layer.weight() * mul.clone().reshape(channel_shape::<DW>(c, L::WEIGHT_AXIS)),
        );
        let y = self.layer.forward_with(input, w, None);
        // `y / mul + bias`, one fused pass each way where the backend has the kernels.
        bn.forward(tensor::divide_add_channels(y, mul, self.layer.bias(), 1))
    }

    fn forward_exact<const DI: usize, const DW: usize>(
        &self,
        input: Tensor<DI>,
        bn: &BatchNorm,
    ) -> Tensor<DI>
    where
        L: Fusable<DI, DW>,
    {
        let c = bn.gamma.val().dims()[0];
        let bshape = channel_shape::<DI>(c, 1);
        let conv_out = self
            .layer
            .forward_with(input.clone(), self.layer.weight(), None);
        // Update the running statistics with this batch (output unused).
        let with_bias = match self.layer.bias() {
            Some(b) => conv_out.clone() + b.reshape(bshape),
            None => conv_out.clone(),
        };
        let _ = bn.forward(with_bias.detach());
        let device = conv_out.device();
        let running_var = bn.running_var.value().to_device(&device);
        let running_std = running_var.add_scalar(bn.epsilon).sqrt();
        let mul = bn.gamma.val() / running_std.clone();
        let w = self.quantize_weight(
            self.layer.weight() * mul.reshape(channel_shape::<DW>(c, L::WEIGHT_AXIS)),
        );
        let conv_bn = self.layer.forward_with(input, w, None);
        // Batch statistics over every axis but the channel axis.
        let dims = conv_out.dims();
        let n: usize = dims.iter().product::<usize>() / c;
        let per_channel: Tensor<2> = conv_out.swap_dims(0, 1).reshape([c, n]);
        let batch_mean = per_channel.clone().mean_dim(1).reshape([c]);
        let centered = per_channel - batch_mean.clone().reshape([c, 1]);
        let batch_var = (centered.clone() * centered).mean_dim(1).reshape([c]);
        let batch_std = batch_var.add_scalar(bn.epsilon).sqrt();
        let conv_bn = conv_bn * (running_std / batch_std.clone()).reshape(bshape);
        let fused_bias = bn.beta.val() - bn.gamma.val() * batch_mean / batch_std;
        conv_bn + fused_bias.reshape(bshape)
    }

    /// The inference form: the layer holding the folded, fake-quantized weight and folded bias,
    /// no BatchNorm and no weight quantizer; activation and output fake-quant kept. Same
    /// outputs as this module in evaluation.
    pub fn folded<const DI: usize, const DW: usize>(self) -> Self
    where
        L: Fusable<DI, DW>,
    {
        self.folded_on_grid(None)
    }

    /// [`folded`](Self::folded), baking the integer model's bias for an input of scale
    /// `input_scale` (see [`forward_on_grid`](Self::forward_on_grid)).
    pub fn folded_on_grid<const DI: usize, const DW: usize>(self, input_scale: Option<f32>) -> Self
    where
        L: Fusable<DI, DW>,
    {
        let (w, b) = self.folded_params_on_grid(input_scale);
        let c = w.dims()[L::WEIGHT_AXIS];
        let b = b.unwrap_or_else(|| Tensor::zeros([c], &w.device()));
        Fused {
            layer: self.layer.with_params(w, b),
            bn: None,
            weight_quant: None,
            output: self.output,
            bn_frozen: self.bn_frozen,
            activation: self.activation,
            mode: self.mode,
        }
    }
}

/// A residual `Add` with its activation fused: `fq(act(a + b))`, no fake-quant between the add
/// and the activation.
#[derive(Module, Debug)]
pub struct FusedAdd {
    /// Fake-quant after the activation.
    pub output: Option<ActQuant>,
    /// The fused activation.
    #[module(skip)]
    pub activation: Activation,
}

impl FusedAdd {
    /// `activation` then `output` after the add.
    pub fn new(activation: Activation, output: Option<ActQuant>) -> Self {
        Self { output, activation }
    }
    /// `fq(act(a + b))`.
    pub fn forward<const D: usize>(&self, a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
        let y = self.activation.forward(a + b);
        match &self.output {
            Some(fq) => fq.forward(y),
            None => y,
        }
    }
}

/// `bias` replaced by the integer model's: per channel `bias_steps(b, s_in, s_w) * s_in * s_w`
/// (the int32 bias in accumulator units), the float bias's gradient passed straight through.
/// A non-finite bias or step stays as it is (conversion refuses it with its channel).
fn integer_bias(bias: Tensor<1>, input_scale: f32, weight: &[burn_qat_core::QParams]) -> Tensor<1> {
    let device = bias.device();
    let steps = bias_in_steps(
        &burn_qat_nn::tree::to_vec::<1>(bias.clone().detach()),
        input_scale,
        weight,
    );
    let emulated: Vec<f32> = steps
        .iter()
        .enumerate()
        .map(|(c, &q)| q * (input_scale * weight_scale(weight, c)))
        .collect();
    let n = emulated.len();
    let emulated = Tensor::<1>::from_data(TensorData::new(emulated, [n]), &device);
    // `e + (b - b)`: exactly `e` forward (`b + (e - b)` would round twice), gradient 1 to `b`.
    emulated + (bias.clone() - bias.detach())
}

/// The weight scale of channel `c` (one scale for every channel of a per-tensor grid).
fn weight_scale(weight: &[burn_qat_core::QParams], c: usize) -> f32 {
    weight[if weight.len() == 1 { 0 } else { c }].scale
}

/// Each channel's bias in int32 steps of its accumulator (`reference::bias_steps`); a
/// non-finite one (conversion refuses it) keeps its float value in those units.
fn bias_in_steps(bias: &[f32], input_scale: f32, weight: &[burn_qat_core::QParams]) -> Vec<f32> {
    bias.iter()
        .enumerate()
        .map(|(c, &b)| {
            let s_w = weight_scale(weight, c);
            let steps = burn_qat_core::reference::bias_steps(b, input_scale, s_w);
            if steps.is_finite() {
                steps
            } else {
                b / (input_scale * s_w)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Activation;
    use burn::prelude::*;

    /// `x` clamped by `a` as Burn's clamp does it: `min(max(x, lo), hi)`.
    fn apply(a: Activation, x: f32) -> f32 {
        let (lo, hi) = a.bounds();
        x.max(lo).min(hi)
    }

    /// Activations with bounds drawn from a small set (so that equal, nested, overlapping and
    /// disjoint intervals all occur), infinite bounds included.
    fn activations() -> Vec<Activation> {
        let points = [
            f32::NEG_INFINITY,
            -6.0,
            -1.0,
            -0.25,
            0.0,
            0.5,
            1.0,
            6.0,
            7.5,
            f32::INFINITY,
        ];
        let mut all = vec![Activation::Identity, Activation::Relu, Activation::Relu6];
        for (i, lo) in points.iter().enumerate() {
            for hi in &points[i..] {
                all.push(Activation::Clamp { min: *lo, max: *hi });
            }
        }
        all
    }

    /// Values around and between every bound, and random ones (a fixed LCG).
    fn xs() -> Vec<f32> {
        let mut xs = vec![
            f32::NEG_INFINITY,
            -1e30,
            -7.0,
            -6.0,
            -1.0,
            -0.25,
            -0.0,
            0.0,
            0.5,
            1.0,
            3.0,
            6.0,
            7.5,
            8.0,
            1e30,
            f32::INFINITY,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..500 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            xs.push(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 24.0);
        }
        xs
    }

    #[test]
    fn then_equals_the_two_step_application() {
        let xs = xs();
        let all = activations();
        let mut disjoint = 0;
        for a in &all {
            for b in &all {
                let ab = a.then(*b);
                let (lo, hi) = ab.bounds();
                assert!(lo <= hi, "{a:?} then {b:?} = {ab:?}");
                disjoint += usize::from(lo == hi);
                for x in &xs {
                    assert_eq!(
                        apply(ab, *x),
                        apply(*b, apply(*a, *x)),
                        "{a:?} then {b:?} = {ab:?} at {x}"
                    );
                }
            }
        }
        assert!(disjoint > 10, "disjoint pairs are covered");
    }

    #[test]
    fn then_equals_the_two_step_forward_on_tensors() {
        let device = Device::flex();
        let xs: Vec<f32> = xs().into_iter().filter(|x| x.is_finite()).collect();
        let x = Tensor::<1>::from_floats(xs.as_slice(), &device);
        let all = activations();
        for a in &all {
            for b in &all {
                let values = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
                let want = values(b.forward(a.forward(x.clone())));
                let got = values(a.then(*b).forward(x.clone()));
                assert_eq!(got, want, "{a:?} then {b:?}");
            }
        }
    }

    #[test]
    fn then_picks_the_simplest_variant() {
        use Activation::*;
        let inf = f32::INFINITY;
        let clamp_min_0 = Clamp { min: 0.0, max: inf };
        let clamp_max_6 = Clamp {
            min: -inf,
            max: 6.0,
        };
        assert_eq!(Relu.then(clamp_max_6), Relu6);
        assert_eq!(clamp_min_0.then(clamp_max_6), Relu6);
        assert_eq!(clamp_max_6.then(clamp_min_0), Relu6);
        assert_eq!(Identity.then(clamp_min_0), Relu);
        assert_eq!(Relu6.then(Relu), Relu6);
        assert_eq!(Identity.then(Identity), Identity);
        assert_eq!(
            Relu.then(Clamp {
                min: -1.0,
                max: 1.0
            }),
            Clamp { min: 0.0, max: 1.0 }
        );
    }
}
