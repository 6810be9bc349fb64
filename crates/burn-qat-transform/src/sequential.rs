//! A sequential container whose order of layers is data, so Conv -> BatchNorm -> ReLU chains can
//! be discovered and fused automatically ([`Sequential::fuse`]).
//!
//! In an arbitrary Rust struct model the order of layers lives in the `forward` code, which no
//! module visitor can see (the module tree lists fields, in declaration order, not in call
//! order). There, name the pairs with [`fuse_batch_norms`](crate::fuse_batch_norms) or build
//! [`Fused`] layers directly.
//!
//! ```
//! use burn::nn::conv::Conv2dConfig;
//! use burn::nn::{BatchNormConfig, LinearConfig, Relu};
//! use burn::prelude::*;
//! use burn_qat_transform::{FusedConfig, Sequential, SeqLayer};
//!
//! let device = Device::flex().autodiff();
//! let model = Sequential::new(vec![
//!     SeqLayer::Conv2d(Conv2dConfig::new([1, 4], [3, 3]).init(&device)),
//!     SeqLayer::BatchNorm(BatchNormConfig::new(4).init(&device)),
//!     SeqLayer::Relu(Relu::new()),
//!     SeqLayer::Flatten(Default::default()),
//!     SeqLayer::Linear(LinearConfig::new(4 * 4 * 4, 10).init(&device)),
//! ]);
//! let fused = model.fuse(&FusedConfig::new()).unwrap();
//! assert_eq!(fused.describe(), vec!["FusedConv2d(BatchNorm, Relu)", "Flatten", "FusedLinear"]);
//! let y = fused.forward(Tensor::<4>::ones([2, 1, 6, 6], &device));
//! assert_eq!(y.dims(), [2, 10]);
//! ```

use burn::module::Module;
use burn::nn::conv::{Conv1d, Conv2d};
use burn::nn::pool::{AvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, Dropout, Linear, Relu};
use burn::prelude::*;
use burn_qat_core::{QatError, QuantSpec};
use burn_qat_nn::{ActQuant, FakeQuant};

use crate::{Activation, Fused, FusedAdd, FusedConfig, FusedConv1d, FusedConv2d, FusedLinear};

/// Flattens `[batch, c, h, w]` to `[batch, c * h * w]`.
#[derive(Module, Debug, Default)]
pub struct Flatten;

/// `min(max(x, 0), 6)`.
#[derive(Module, Debug, Default)]
pub struct Relu6;

/// One layer of a [`Sequential`].
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum SeqLayer {
    /// 1-D convolution (`[batch, channels, length]`).
    Conv1d(Conv1d),
    /// 2-D convolution.
    Conv2d(Conv2d),
    /// Batch normalization.
    BatchNorm(BatchNorm),
    /// ReLU.
    Relu(Relu),
    /// ReLU6.
    Relu6(Relu6),
    /// Max pooling.
    MaxPool2d(MaxPool2d),
    /// Average pooling.
    AvgPool2d(AvgPool2d),
    /// Dropout.
    Dropout(Dropout),
    /// Flatten to `[batch, features]`.
    Flatten(Flatten),
    /// Fully connected layer.
    Linear(Linear),
    /// A fake-quant point (e.g. the model input).
    FakeQuant(FakeQuant),
    /// Fused Conv1d (+ BatchNorm) (+ activation).
    FusedConv1d(FusedConv1d),
    /// Fused Conv2d (+ BatchNorm) (+ activation).
    FusedConv2d(FusedConv2d),
    /// Fused Linear (+ BatchNorm) (+ activation).
    FusedLinear(FusedLinear),
    /// A residual block: `add(x, body(x))`.
    Residual(Residual),
}

/// A residual block: `activation(x + body(x))`, with the `Add` and its activation fused
/// ([`FusedAdd`]): one fake-quant after the activation once fused.
#[derive(Module, Debug)]
pub struct Residual {
    /// The branch.
    pub body: Sequential,
    /// The add (and its activation and output quantizer).
    pub add: FusedAdd,
}

impl Residual {
    /// `activation(x + body(x))`, not yet quantized.
    pub fn new(body: Sequential, activation: Activation) -> Self {
        Self {
            body,
            add: FusedAdd::new(activation, None),
        }
    }
}

/// The activations flowing through a [`Sequential`]: images or features.
#[derive(Clone, Debug)]
pub enum Flow {
    /// `[batch, channels, height, width]`.
    Images(Tensor<4>),
    /// `[batch, features]`.
    Features(Tensor<2>),
    /// `[batch, channels, length]`.
    Sequence(Tensor<3>),
}

impl Flow {
    fn dims(&self) -> Vec<usize> {
        match self {
            Flow::Images(x) => x.dims().to_vec(),
            Flow::Features(x) => x.dims().to_vec(),
            Flow::Sequence(x) => x.dims().to_vec(),
        }
    }
    fn images(self, layer: &str) -> Tensor<4> {
        match self {
            Flow::Images(x) => x,
            other => panic!(
                "{layer} needs [batch, channels, height, width] input, got {:?}",
                other.dims()
            ),
        }
    }
    fn features(self, layer: &str) -> Tensor<2> {
        match self {
            Flow::Features(x) => x,
            other => panic!(
                "{layer} needs [batch, features] input, got {:?}: add a Flatten",
                other.dims()
            ),
        }
    }
    fn sequence(self, layer: &str) -> Tensor<3> {
        match self {
            Flow::Sequence(x) => x,
            other => panic!(
                "{layer} needs [batch, channels, length] input, got {:?}",
                other.dims()
            ),
        }
    }
    fn map(
        self,
        f2: impl Fn(Tensor<2>) -> Tensor<2>,
        f3: impl Fn(Tensor<3>) -> Tensor<3>,
        f4: impl Fn(Tensor<4>) -> Tensor<4>,
    ) -> Flow {
        match self {
            Flow::Features(x) => Flow::Features(f2(x)),
            Flow::Sequence(x) => Flow::Sequence(f3(x)),
            Flow::Images(x) => Flow::Images(f4(x)),
        }
    }
}

impl SeqLayer {
    fn forward(&self, x: Flow, last_quantizer: &mut Option<ActQuant>) -> Flow {
        use burn::tensor::activation::{relu, relu6};
        let out = match (self, x) {
            (SeqLayer::Conv1d(m), x) => Flow::Sequence(m.forward(x.sequence("Conv1d"))),
            (SeqLayer::Conv2d(m), x) => Flow::Images(m.forward(x.images("Conv2d"))),
            (SeqLayer::BatchNorm(m), x) => {
                x.map(|t| m.forward(t), |t| m.forward(t), |t| m.forward(t))
            }
            (SeqLayer::Relu(_), x) => x.map(relu, relu, relu),
            (SeqLayer::Relu6(_), x) => x.map(relu6, relu6, relu6),
            (SeqLayer::MaxPool2d(m), x) => Flow::Images(m.forward(x.images("MaxPool2d"))),
            (SeqLayer::AvgPool2d(m), x) => {
                let x = x.images("AvgPool2d");
                let y = m.forward(x.clone());
                // TFLite's AVERAGE_POOL_2D keeps the input's grid. Average the integer grid
                // indices (exact in f32) and round half to even, as the integer kernel does;
                // the gradient is the float average's (straight-through).
                Flow::Images(match last_quantizer.as_ref() {
                    Some(ActQuant::Observed(fq))
                        if fq.is_enabled() && fq.is_observed() && fq.spec.axis().is_none() =>
                    {
                        let (scale, zero_point) = fq.qparams_on(&x.device());
                        let s: Tensor<4> = scale.reshape([1, 1, 1, 1]);
                        let z: Tensor<4> = zero_point.reshape([1, 1, 1, 1]);
                        let q = (x.detach() / s.clone()).round();
                        let (qmin, qmax) = (fq.spec.qmin() as f32, fq.spec.qmax() as f32);
                        let exact = ((m.forward(q).round() + z.clone()).clamp(qmin, qmax) - z) * s;
                        y.clone() + (exact - y).detach()
                    }
                    _ => y,
                })
            }
            (SeqLayer::Dropout(m), x) => {
                x.map(|t| m.forward(t), |t| m.forward(t), |t| m.forward(t))
            }
            (SeqLayer::Flatten(_), Flow::Images(x)) => {
                let [n, c, h, w] = x.dims();
                Flow::Features(x.reshape([n, c * h * w]))
            }
            (SeqLayer::Flatten(_), Flow::Sequence(x)) => {
                let [n, c, l] = x.dims();
                Flow::Features(x.reshape([n, c * l]))
            }
            (SeqLayer::Flatten(_), f) => f,
            (SeqLayer::Linear(m), x) => Flow::Features(m.forward(x.features("Linear"))),
            (SeqLayer::FakeQuant(m), x) => {
                x.map(|t| m.forward(t), |t| m.forward(t), |t| m.forward(t))
            }
            (SeqLayer::FusedConv1d(m), x) => Flow::Sequence(m.forward(x.sequence("FusedConv1d"))),
            (SeqLayer::FusedConv2d(m), x) => Flow::Images(m.forward(x.images("FusedConv2d"))),
            (SeqLayer::FusedLinear(m), x) => Flow::Features(m.forward(x.features("FusedLinear"))),
            (SeqLayer::Residual(r), x) => {
                let mut inner = last_quantizer.clone();
                let y = r.body.forward_with(x.clone(), &mut inner);
                match (x, y) {
                    (Flow::Images(a), Flow::Images(b)) => Flow::Images(r.add.forward(a, b)),
                    (Flow::Features(a), Flow::Features(b)) => Flow::Features(r.add.forward(a, b)),
                    (Flow::Sequence(a), Flow::Sequence(b)) => Flow::Sequence(r.add.forward(a, b)),
                    (a, b) => panic!(
                        "a residual body must keep the input's rank: {:?} -> {:?}",
                        a.dims(),
                        b.dims()
                    ),
                }
            }
        };
        match self {
            SeqLayer::FakeQuant(m) => *last_quantizer = Some(m.clone().into()),
            SeqLayer::FusedConv1d(Fused { output, .. }) => *last_quantizer = output.clone(),
            SeqLayer::FusedConv2d(Fused { output, .. }) => *last_quantizer = output.clone(),
            SeqLayer::FusedLinear(Fused { output, .. }) => *last_quantizer = output.clone(),
            SeqLayer::Residual(r) => *last_quantizer = r.add.output.clone(),
            SeqLayer::Conv1d(_)
            | SeqLayer::Conv2d(_)
            | SeqLayer::Linear(_)
            | SeqLayer::BatchNorm(_) => *last_quantizer = None,
            _ => {}
        }
        out
    }

    /// The layer's kind, fused ones with what they contain (`FusedConv2d(BatchNorm, Relu)`).
    pub fn name(&self) -> String {
        let fused = |bn: bool, act: Activation| {
            let mut parts = vec![];
            if bn {
                parts.push("BatchNorm".to_string());
            }
            if act != Activation::Identity {
                parts.push(format!("{act:?}"));
            }
            if parts.is_empty() {
                String::new()
            } else {
                format!("({})", parts.join(", "))
            }
        };
        match self {
            SeqLayer::Conv1d(_) => "Conv1d".into(),
            SeqLayer::Conv2d(_) => "Conv2d".into(),
            SeqLayer::BatchNorm(_) => "BatchNorm".into(),
            SeqLayer::Relu(_) => "Relu".into(),
            SeqLayer::Relu6(_) => "Relu6".into(),
            SeqLayer::MaxPool2d(_) => "MaxPool2d".into(),
            SeqLayer::AvgPool2d(_) => "AvgPool2d".into(),
            SeqLayer::Dropout(_) => "Dropout".into(),
            SeqLayer::Flatten(_) => "Flatten".into(),
            SeqLayer::Linear(_) => "Linear".into(),
            SeqLayer::FakeQuant(_) => "FakeQuant".into(),
            SeqLayer::FusedConv1d(m) => {
                format!("FusedConv1d{}", fused(m.bn.is_some(), m.activation))
            }
            SeqLayer::FusedConv2d(m) => {
                format!("FusedConv2d{}", fused(m.bn.is_some(), m.activation))
            }
            SeqLayer::FusedLinear(m) => {
                format!("FusedLinear{}", fused(m.bn.is_some(), m.activation))
            }
            SeqLayer::Residual(r) => format!(
                "Residual[{}] + Add{}",
                r.body.describe().join(" -> "),
                fused(false, r.add.activation)
            ),
        }
    }
}

/// Layers applied in order.
#[derive(Module, Debug)]
pub struct Sequential {
    /// The layers.
    pub layers: Vec<SeqLayer>,
}

impl Sequential {
    /// A sequential model of `layers`.
    pub fn new(layers: Vec<SeqLayer>) -> Self {
        Self { layers }
    }

    /// Runs the layers in order on images.
    ///
    /// # Shapes
    ///
    /// - input: `[batch, channels, height, width]`
    /// - output: `[batch, features]` (the model must end in features)
    ///
    /// # Panics
    ///
    /// If a layer gets the wrong kind of input (a `Linear` before a `Flatten`, ...).
    pub fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        self.forward_flow(Flow::Images(input))
            .features("the model output")
    }

    /// Runs the layers in order on any [`Flow`].
    pub fn forward_flow(&self, input: Flow) -> Flow {
        self.forward_with(input, &mut None)
    }

    fn forward_with(&self, input: Flow, last_quantizer: &mut Option<ActQuant>) -> Flow {
        self.layers
            .iter()
            .fold(input, |x, layer| layer.forward(x, last_quantizer))
    }

    /// The layer names, fused ones with what they contain.
    pub fn describe(&self) -> Vec<String> {
        self.layers.iter().map(SeqLayer::name).collect()
    }

    /// Discovers every `Conv2d -> [BatchNorm] -> [Relu | Relu6]` and
    /// `Linear -> [BatchNorm] -> [Relu | Relu6]` chain and replaces it by one fused QAT layer
    /// (weights quantized per output channel, BatchNorm folded, activation fused, `config.output`
    /// after the activation), inside residual bodies too; each residual `Add` gets
    /// `config.output` after its activation. Existing trained weights and statistics are kept.
    ///
    /// `config.weight`'s per-channel axis is set per layer (0 for Conv2d, 1 for Linear). The last
    /// layer of the model gets no output fake-quant (its logits stay float, as in TFLite); the last
    /// layer of a residual body keeps it (the add takes quantized inputs).
    pub fn fuse(self, config: &FusedConfig) -> Result<Self, QatError> {
        self.fuse_by(|_| config.clone())
    }

    /// [`fuse`](Self::fuse) with a config per layer: `config_for` gets the path of each
    /// `Conv`/`Linear` layer that starts a chain (`layers.3`, `layers.4.body.layers.0`) and of
    /// each residual add (`layers.4.add`). Mixed precision, learned ranges for some layers,
    /// 8-bit first and last layers:
    ///
    /// ```
    /// use burn::nn::{LinearConfig, Relu};
    /// use burn::prelude::*;
    /// use burn_qat_core::QuantSpec;
    /// use burn_qat_nn::{FakeQuantConfig, LearnedRange};
    /// use burn_qat_transform::{FusedConfig, SeqLayer, Sequential};
    ///
    /// let device = Device::flex().autodiff();
    /// let model = Sequential::new(vec![
    ///     SeqLayer::Linear(LinearConfig::new(8, 16).init(&device)),
    ///     SeqLayer::Relu(Relu::new()),
    ///     SeqLayer::Linear(LinearConfig::new(16, 4).init(&device)),
    /// ]);
    /// let fused = model
    ///     .fuse_by(|path| {
    ///         let bits = if path == "layers.0" { 4 } else { 8 };
    ///         FusedConfig::new()
    ///             .with_weight(Some(QuantSpec::weight_per_channel_symmetric(bits, 0)))
    ///             .with_output(Some(FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(bits))))
    ///             .with_learned_weight(bits < 8)
    ///             .with_learned_output((bits < 8).then_some(LearnedRange::Lsq))
    ///     })
    ///     .unwrap();
    /// assert_eq!(fused.describe(), ["FusedLinear(Relu)", "FusedLinear"]);
    /// ```
    pub fn fuse_by(
        self,
        mut config_for: impl FnMut(&str) -> FusedConfig,
    ) -> Result<Self, QatError> {
        self.fuse_with(&mut config_for, "layers", true)
    }

    fn fuse_with(
        self,
        config_for: &mut dyn FnMut(&str) -> FusedConfig,
        prefix: &str,
        top: bool,
    ) -> Result<Self, QatError> {
        let mut out: Vec<SeqLayer> = Vec::new();
        let mut iter = self.layers.into_iter().enumerate().peekable();
        while let Some((index, layer)) = iter.next() {
            let path = format!("{prefix}.{index}");
            enum Base {
                C1(Conv1d),
                C2(Conv2d),
                L(Linear),
            }
            let base = match layer {
                SeqLayer::Conv1d(c) => Base::C1(c),
                SeqLayer::Conv2d(c) => Base::C2(c),
                SeqLayer::Linear(l) => Base::L(l),
                SeqLayer::Residual(r) => {
                    let output = match r.body.devices().first() {
                        Some(device) => config_for(&format!("{path}.add")).init_output(device)?,
                        None => None,
                    };
                    let body =
                        r.body
                            .fuse_with(config_for, &format!("{path}.body.layers"), false)?;
                    out.push(SeqLayer::Residual(Residual {
                        body,
                        add: FusedAdd::new(r.add.activation, output),
                    }));
                    continue;
                }
                other => {
                    out.push(other);
                    continue;
                }
            };
            let bn = match iter.peek() {
                Some((_, SeqLayer::BatchNorm(_))) => match iter.next() {
                    Some((_, SeqLayer::BatchNorm(bn))) => Some(bn),
                    _ => None,
                },
                _ => None,
            };
            let activation = match iter.peek() {
                Some((_, SeqLayer::Relu(_))) => {
                    iter.next();
                    Activation::Relu
                }
                Some((_, SeqLayer::Relu6(_))) => {
                    iter.next();
                    Activation::Relu6
                }
                _ => Activation::Identity,
            };
            let last = top && iter.peek().is_none();
            let config = config_for(&path);
            let with_axis = |axis: usize| {
                let mut c = config.clone().with_activation(activation);
                c.weight = c.weight.map(|s: QuantSpec| match s.axis() {
                    Some(_) => s.with_granularity(burn_qat_core::Granularity::PerChannel { axis }),
                    None => s,
                });
                if last {
                    c.output = None;
                }
                c
            };
            match base {
                Base::C1(conv) => out.push(SeqLayer::FusedConv1d(with_axis(0).init(conv, bn)?)),
                Base::C2(conv) => out.push(SeqLayer::FusedConv2d(with_axis(0).init(conv, bn)?)),
                Base::L(linear) => out.push(SeqLayer::FusedLinear(with_axis(1).init(linear, bn)?)),
            }
        }
        Ok(Self { layers: out })
    }

    /// The inference form: every fused layer [folded](crate::Fused::folded).
    pub fn folded(self) -> Self {
        let layers = self
            .layers
            .into_iter()
            .map(|l| match l {
                SeqLayer::FusedConv1d(m) => SeqLayer::FusedConv1d(m.folded()),
                SeqLayer::FusedConv2d(m) => SeqLayer::FusedConv2d(m.folded()),
                SeqLayer::FusedLinear(m) => SeqLayer::FusedLinear(m.folded()),
                SeqLayer::Residual(r) => SeqLayer::Residual(Residual {
                    body: r.body.folded(),
                    add: r.add,
                }),
                other => other,
            })
            .collect();
        Self { layers }
    }
}
