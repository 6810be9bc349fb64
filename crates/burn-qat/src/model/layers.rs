use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::{BatchNorm, Dropout, Gelu, LayerNorm, Linear, Relu, Sigmoid, Tanh};
use burn::prelude::*;
use burn_qat_core::{QatError, QuantSpec};
use burn_qat_nn::{FakeQuant, FakeQuantConfig};

/// A module with a forward pass from a rank-`DI` tensor to a rank-`DO` tensor, so
/// [`Quantized`] can wrap it. Implemented for the burn-nn layers; implement it for your own.
///
/// ```
/// use burn::module::Module;
/// use burn::prelude::*;
/// use burn_qat::model::{Layer, Quantized};
///
/// #[derive(Module, Debug)]
/// struct Scale { factor: f32 }
///
/// impl Layer<2, 2> for Scale {
///     fn forward_layer(&self, x: Tensor<2>) -> Tensor<2> { x * self.factor }
/// }
///
/// let device = Device::flex().autodiff();
/// let layer: Quantized<Scale> = Quantized::new(Scale { factor: 2.0 }, &device);
/// let y: Tensor<2> = layer.forward(Tensor::ones([1, 3], &device));
/// assert_eq!(y.dims(), [1, 3]);
/// ```
pub trait Layer<const DI: usize, const DO: usize> {
    /// The wrapped module's forward pass.
    fn forward_layer(&self, input: Tensor<DI>) -> Tensor<DO>;
}

impl<const D: usize> Layer<D, D> for Linear {
    fn forward_layer(&self, input: Tensor<D>) -> Tensor<D> {
        self.forward(input)
    }
}
impl Layer<3, 3> for Conv1d {
    fn forward_layer(&self, input: Tensor<3>) -> Tensor<3> {
        self.forward(input)
    }
}
impl Layer<4, 4> for Conv2d {
    fn forward_layer(&self, input: Tensor<4>) -> Tensor<4> {
        self.forward(input)
    }
}
macro_rules! any_rank {
    ($($ty:ty),*) => {$(
        impl<const D: usize> Layer<D, D> for $ty {
            fn forward_layer(&self, input: Tensor<D>) -> Tensor<D> {
                self.forward(input)
            }
        }
    )*};
}
any_rank!(Relu, Gelu, Sigmoid, Tanh, Dropout, LayerNorm, BatchNorm);

/// Configuration to create a [`Quantized`] wrapper using the [init function](QuantizedConfig::init).
#[derive(Config, Debug)]
pub struct QuantizedConfig {
    /// Quantizer of the wrapped module's input (`None`: not quantized).
    #[config(default = "Some(FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric()))")]
    pub input: Option<FakeQuantConfig>,
    /// Quantizer of the wrapped module's output (`None`: not quantized).
    #[config(default = "None")]
    pub output: Option<FakeQuantConfig>,
}

impl QuantizedConfig {
    /// Wraps `inner`, with quantizer state on `device`.
    pub fn init<M: Module>(&self, inner: M, device: &Device) -> Result<Quantized<M>, QatError> {
        Ok(Quantized {
            inner,
            input: self.input.as_ref().map(|c| c.init(device)).transpose()?,
            output: self.output.as_ref().map(|c| c.init(device)).transpose()?,
        })
    }
}

/// Any module with its input and/or output fake-quantized: activation QAT for a model not
/// written for QAT, by changing a field's type (`Linear` -> `Quantized<Linear>`, alias
/// [`QuantLinear`]); the forward call stays the same.
///
/// Weights are quantized separately, for the whole model, by [`quantize`](super::quantize).
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::prelude::*;
/// use burn_qat::model::{QuantLinear, Quantized};
///
/// #[derive(Module, Debug)]
/// struct Head { fc: QuantLinear }           // was `fc: Linear`
///
/// let device = Device::flex().autodiff();
/// let head = Head { fc: Quantized::new(LinearConfig::new(4, 2).init(&device), &device) };
/// let y = head.fc.forward(Tensor::<2>::ones([3, 4], &device)); // unchanged call
/// assert_eq!(y.dims(), [3, 2]);
/// assert!(head.fc.input.as_ref().unwrap().is_observed());
/// ```
#[derive(Module, Debug)]
pub struct Quantized<M> {
    /// The wrapped module.
    pub inner: M,
    /// Input quantizer.
    pub input: Option<FakeQuant>,
    /// Output quantizer.
    pub output: Option<FakeQuant>,
}

/// `Linear` with its input fake-quantized.
pub type QuantLinear = Quantized<Linear>;
/// `Conv2d` with its input fake-quantized.
pub type QuantConv2d = Quantized<Conv2d>;
/// `Conv1d` with its input fake-quantized.
pub type QuantConv1d = Quantized<Conv1d>;

impl<M: Module> Quantized<M> {
    /// Wraps `inner` with the default [`QuantizedConfig`]: 8-bit asymmetric per-tensor input,
    /// moving-average observer (decay 0.999).
    pub fn new(inner: M, device: &Device) -> Self {
        QuantizedConfig::new()
            .init(inner, device)
            .expect("the default configuration is valid")
    }

    /// Fake-quantizes the input, runs the wrapped module, fake-quantizes the output.
    ///
    /// # Shapes
    ///
    /// Those of the wrapped module's forward.
    pub fn forward<const DI: usize, const DO: usize>(&self, input: Tensor<DI>) -> Tensor<DO>
    where
        M: Layer<DI, DO>,
    {
        let x = match &self.input {
            Some(fq) => fq.forward(input),
            None => input,
        };
        let y = self.inner.forward_layer(x);
        match &self.output {
            Some(fq) => fq.forward(y),
            None => y,
        }
    }

    /// The wrapped module, quantizers dropped.
    pub fn into_inner(self) -> M {
        self.inner
    }
}

impl<const DI: usize, const DO: usize, M: Module + Layer<DI, DO>> Layer<DI, DO> for Quantized<M> {
    fn forward_layer(&self, input: Tensor<DI>) -> Tensor<DO> {
        self.forward(input)
    }
}
