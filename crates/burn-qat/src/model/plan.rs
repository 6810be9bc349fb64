use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn_qat_core::{Granularity, QatError, QuantSpec, RoundingMode};
use burn_qat_nn::tree::{self, TreePath, burn_types};
use burn_qat_nn::{FakeQuantConfig, LearnedRange, Observer, WeightFakeQuantizer};
use burn_qat_transform::{BnFoldMode, Fused};
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

/// Weight quantization settings for one layer; the channel axis comes from the layer type.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightQuant {
    /// Bit width, 2..=16.
    pub bits: u32,
    /// One scale per output channel (on the layer's output-channel axis) or one per tensor.
    pub per_channel: bool,
    /// Symmetric (zero point 0) or asymmetric.
    pub symmetric: bool,
    /// Narrow range (`[-127, 127]` for 8 bits).
    pub narrow_range: bool,
    /// Rounding mode.
    pub rounding: RoundingMode,
    /// `false` keeps this layer's weights in float.
    pub enabled: bool,
    /// Learn the step size with LSQ (initialized from the weight) instead of using the
    /// weight's min/max.
    #[serde(default)]
    pub learned: bool,
}

impl Default for WeightQuant {
    fn default() -> Self {
        Self::int8_per_channel()
    }
}

impl WeightQuant {
    /// 8-bit symmetric narrow-range per-channel weights: tfmot's and PyTorch's default.
    pub fn int8_per_channel() -> Self {
        Self {
            bits: 8,
            per_channel: true,
            symmetric: true,
            narrow_range: true,
            rounding: RoundingMode::HalfToEven,
            enabled: true,
            learned: false,
        }
    }
    /// `bits`-bit symmetric narrow-range per-channel weights with LSQ-learned step sizes.
    pub fn lsq(bits: u32) -> Self {
        Self {
            bits,
            learned: true,
            ..Self::int8_per_channel()
        }
    }
    /// 8-bit symmetric narrow-range weights, one scale per tensor.
    pub fn int8_per_tensor() -> Self {
        Self {
            per_channel: false,
            ..Self::int8_per_channel()
        }
    }
    /// 4-bit symmetric narrow-range (`[-7, 7]`) per-channel weights.
    pub fn int4_per_channel() -> Self {
        Self {
            bits: 4,
            ..Self::int8_per_channel()
        }
    }
    /// `bits`-bit symmetric narrow-range per-channel weights.
    pub fn per_channel_bits(bits: u32) -> Self {
        Self {
            bits,
            ..Self::int8_per_channel()
        }
    }
    /// Keep the weights in float.
    pub fn float() -> Self {
        Self {
            enabled: false,
            ..Self::int8_per_channel()
        }
    }
    /// The spec for a weight whose output channels lie on `axis` (`None`: per tensor).
    pub fn spec(&self, axis: Option<usize>) -> QuantSpec {
        let granularity = match (self.per_channel, axis) {
            (true, Some(axis)) => Granularity::PerChannel { axis },
            _ => Granularity::PerTensor,
        };
        QuantSpec {
            bits: self.bits,
            signed: true,
            symmetric: self.symmetric,
            narrow_range: self.narrow_range,
            granularity,
            rounding: self.rounding,
        }
    }
}

/// Which layers a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    /// A module path pattern, dot-separated like the record paths (`blocks.0.conv`): `*` matches
    /// one name, `**` any number of names, `{a,b}` alternatives. It matches a layer's module
    /// path or the full parameter path (`blocks.0.conv.weight`).
    Path(String),
    /// A layer type, as its struct is named (`Linear`, `Conv2d`, or a custom `MyLayer`).
    Type(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Path(p) => write!(f, "path pattern {p:?}"),
            Selector::Type(t) => write!(f, "layer type {t:?}"),
        }
    }
}

/// A layer type whose weights burn-qat should quantize, with their output-channel axes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomLayer {
    /// The struct name (what `#[derive(Module)]` reports, e.g. `MyLayer`).
    pub name: String,
    /// `(field, axis)`: each float parameter field to quantize and its output-channel axis
    /// (`None` for per-tensor scales).
    pub weights: Vec<(String, Option<usize>)>,
}

/// Make your own layer type quantizable with the right per-channel axes.
///
/// Without it, burn-qat still quantizes any parameter of rank >= 2 of an unknown layer, with
/// one scale per tensor, and says so in the [summary](super::summary).
///
/// ```
/// use burn::module::{Module, Param};
/// use burn::prelude::*;
/// use burn_qat::model::{QatConfig, QuantizableLayer, quantize, summary};
///
/// /// A layer computing `x · wᵀ` with `w: [d_output, d_input]`: output channels on axis 0.
/// #[derive(Module, Debug)]
/// struct Projection { w: Param<Tensor<2>> }
///
/// impl QuantizableLayer for Projection {
///     const NAME: &'static str = "Projection";
///     fn quantizable_weights() -> Vec<(&'static str, Option<usize>)> {
///         vec![("w", Some(0))]
///     }
/// }
///
/// let device = Device::flex().autodiff();
/// let layer = Projection { w: Param::from_tensor(Tensor::ones([3, 5], &device)) };
/// let config = QatConfig::new().register::<Projection>();
/// let layer = quantize(layer, &config).unwrap();
/// let report = summary(&layer);
/// assert_eq!(report.layers[0].spec.unwrap().axis(), Some(0));
/// ```
pub trait QuantizableLayer {
    /// The struct name, as `#[derive(Module)]` reports it.
    const NAME: &'static str;
    /// `(field, axis)` for each weight to quantize; `None` for per-tensor scales.
    fn quantizable_weights() -> Vec<(&'static str, Option<usize>)>;
}

macro_rules! builtin {
    ($ty:ty, $name:literal, $axis:expr) => {
        impl QuantizableLayer for $ty {
            const NAME: &'static str = $name;
            fn quantizable_weights() -> Vec<(&'static str, Option<usize>)> {
                vec![(burn_types::WEIGHT, $axis)]
            }
        }
    };
}
builtin!(burn::nn::Linear, "Linear", Some(1));
builtin!(burn::nn::conv::Conv1d, "Conv1d", Some(0));
builtin!(burn::nn::conv::Conv2d, "Conv2d", Some(0));
builtin!(burn::nn::conv::Conv3d, "Conv3d", Some(0));
builtin!(burn::nn::conv::ConvTranspose1d, "ConvTranspose1d", Some(1));
builtin!(burn::nn::conv::ConvTranspose2d, "ConvTranspose2d", Some(1));
builtin!(burn::nn::conv::ConvTranspose3d, "ConvTranspose3d", Some(1));
builtin!(burn::nn::Embedding, "Embedding", Some(0));

/// Layer types whose parameters are never quantized: normalizations keep float statistics and
/// affine parameters (folding BatchNorm into the preceding layer is a model transform).
const NEVER: [&str; 6] = [
    "BatchNorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm",
    "RmsNorm",
    "FakeQuant",
];

fn builtin_layers() -> Vec<CustomLayer> {
    fn entry<L: QuantizableLayer>() -> CustomLayer {
        CustomLayer {
            name: L::NAME.to_string(),
            weights: L::quantizable_weights()
                .into_iter()
                .map(|(f, a)| (f.to_string(), a))
                .collect(),
        }
    }
    vec![
        entry::<burn::nn::Linear>(),
        entry::<burn::nn::conv::Conv1d>(),
        entry::<burn::nn::conv::Conv2d>(),
        entry::<burn::nn::conv::Conv3d>(),
        entry::<burn::nn::conv::ConvTranspose1d>(),
        entry::<burn::nn::conv::ConvTranspose2d>(),
        entry::<burn::nn::conv::ConvTranspose3d>(),
        entry::<burn::nn::Embedding>(),
    ]
}

/// How to quantize a model's weights: a default, per-layer rules that win over it, skips, and
/// custom layer types. Serializable, so it can live in a training config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QatConfig {
    /// Settings for every layer that no rule selects.
    pub default: WeightQuant,
    /// Per-layer settings: a path rule wins over a type rule, which wins over the default.
    pub rules: Vec<(Selector, WeightQuant)>,
    /// Layers left in float.
    pub skip: Vec<Selector>,
    /// Registered custom layer types.
    pub custom_layers: Vec<CustomLayer>,
    /// Graph mode: activation fake-quant settings for every quantizer no activation rule
    /// selects.
    #[serde(default)]
    pub activations: ActivationQuant,
    /// Graph mode: per-layer activation settings, selected by the producing layer's path (for a
    /// parameter-free op, `<nearest layer>/<op>`, e.g. `layer1.0.conv2/add`).
    #[serde(default)]
    pub activation_rules: Vec<(Selector, ActivationQuant)>,
    /// Graph mode: how BatchNorm is folded into the conv/linear before it while training.
    #[serde(default)]
    pub bn_fold: BnFoldMode,
    /// Graph mode: leave the model's output in float (no activation quantizer after the layer
    /// that computes it, nor after the reshapes/permutes between). A conv/linear output then
    /// becomes exact float logits in the integer model (`acc * s_in * s_w`), as classifiers
    /// want: 8-bit logits tie and cost accuracy. Default: quantized, as TFLite and PyTorch FX.
    #[serde(default)]
    pub float_output: bool,
    /// Graph mode: where the integer model ends, when it ends before the model's output: a
    /// node as `QatGraph::plan` prints it (a layer's module path such as `head.cls`, or
    /// `<nearest layer>/<op>`). The nodes after it are a float tail (a detection head's box
    /// decoding, a softmax): they get no fake-quant, train in float, may use ops the integer
    /// model has no kernel for, and stay in your code at deployment; `export::convert` returns
    /// that node's value (the ONNX file ends with a `DequantizeLinear` there). `None`: the
    /// integer model computes the whole forward, and `graph::prepare` refuses up front an op it
    /// cannot compute.
    #[serde(default)]
    pub integer_until: Option<String>,
}

/// Activation fake-quant settings for graph mode: the grid after each conv/linear (+ its fused
/// activation), add, concat, pooling average and float activation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivationQuant {
    /// Bit width, 2..=16.
    pub bits: u32,
    /// Symmetric (zero point 0) instead of asymmetric.
    pub symmetric: bool,
    /// How the range is observed.
    pub observer: Observer,
    /// Learn the range after observing (LSQ, LSQ+, PACT, min/max); `None` keeps the observer's.
    pub learned: Option<LearnedRange>,
    /// `false` leaves these activations in float.
    pub enabled: bool,
}

impl Default for ActivationQuant {
    fn default() -> Self {
        Self::int8()
    }
}

impl ActivationQuant {
    /// 8-bit asymmetric per-tensor activations with a moving-average observer (decay 0.999):
    /// tfmot's and PyTorch's default.
    pub fn int8() -> Self {
        Self {
            bits: 8,
            symmetric: false,
            observer: Observer::MovingAverage { decay: 0.999 },
            learned: None,
            enabled: true,
        }
    }
    /// `bits`-bit asymmetric activations with the default observer.
    pub fn bits(bits: u32) -> Self {
        Self {
            bits,
            ..Self::int8()
        }
    }
    /// Activations left in float.
    pub fn float() -> Self {
        Self {
            enabled: false,
            ..Self::int8()
        }
    }
    /// With a learned range after the observe phase.
    pub fn with_learned(mut self, learned: LearnedRange) -> Self {
        self.learned = Some(learned);
        self
    }
    /// With another observer.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = observer;
        self
    }
    /// The fake-quant configuration these settings describe.
    pub fn config(&self) -> FakeQuantConfig {
        FakeQuantConfig::new(
            QuantSpec::act_per_tensor_asymmetric(self.bits).with_symmetric(self.symmetric),
        )
        .with_observer(self.observer)
    }
}

impl Default for QatConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl QatConfig {
    /// tfmot's default: every weight 8-bit symmetric, per output channel.
    pub fn new() -> Self {
        Self {
            default: WeightQuant::int8_per_channel(),
            rules: vec![],
            skip: vec![],
            custom_layers: vec![],
            activations: ActivationQuant::int8(),
            activation_rules: vec![],
            bn_fold: BnFoldMode::Approximate,
            float_output: false,
            integer_until: None,
        }
    }
    /// Graph mode: the default activation settings.
    pub fn with_activations(mut self, activations: ActivationQuant) -> Self {
        self.activations = activations;
        self
    }
    /// Graph mode: activation settings for the outputs of the layers whose path matches
    /// `pattern` (see [`Selector::Path`]; parameter-free ops are named `<nearest layer>/<op>`).
    pub fn with_layer_activations(mut self, pattern: &str, activations: ActivationQuant) -> Self {
        self.activation_rules
            .push((Selector::Path(pattern.to_string()), activations));
        self
    }
    /// Graph mode: keep the model's output in float (see [`float_output`](Self::float_output)).
    pub fn with_float_output(mut self, float: bool) -> Self {
        self.float_output = float;
        self
    }
    /// Graph mode: the integer model ends at the node named `node` (see
    /// [`integer_until`](Self::integer_until)); what follows is a float tail.
    pub fn with_integer_until(mut self, node: &str) -> Self {
        self.integer_until = Some(node.to_string());
        self
    }
    /// Graph mode: the BatchNorm folding mode in training.
    pub fn with_bn_fold(mut self, mode: BnFoldMode) -> Self {
        self.bn_fold = mode;
        self
    }
    /// Preset: 8-bit per-channel symmetric weights (same as [`new`](Self::new)).
    pub fn int8_weights_per_channel() -> Self {
        Self::new()
    }
    /// Preset: 8-bit symmetric weights with one scale per tensor.
    pub fn int8_weights_per_tensor() -> Self {
        Self::new().with_default(WeightQuant::int8_per_tensor())
    }
    /// Preset: 4-bit per-channel weights for every quantized layer. TFLite and the LSQ paper
    /// keep the first and last layers at 8 bits; add those rules with
    /// [`with_layer`](Self::with_layer) (`.with_layer("conv1", WeightQuant::int8_per_channel())`).
    pub fn int4_weights_per_channel() -> Self {
        Self::new().with_default(WeightQuant::int4_per_channel())
    }
    /// Sets the default settings.
    pub fn with_default(mut self, default: WeightQuant) -> Self {
        self.default = default;
        self
    }
    /// Settings for the layers whose path matches `pattern` (see [`Selector::Path`]).
    pub fn with_layer(mut self, pattern: &str, quant: WeightQuant) -> Self {
        self.rules
            .push((Selector::Path(pattern.to_string()), quant));
        self
    }
    /// Settings for every layer of type `type_name` (`"Linear"`, `"Conv2d"`, ...).
    pub fn with_layer_type(mut self, type_name: &str, quant: WeightQuant) -> Self {
        self.rules
            .push((Selector::Type(type_name.to_string()), quant));
        self
    }
    /// Leaves the layers matching `pattern` in float.
    pub fn skip(mut self, pattern: &str) -> Self {
        self.skip.push(Selector::Path(pattern.to_string()));
        self
    }
    /// Leaves every layer of type `type_name` in float.
    pub fn skip_type(mut self, type_name: &str) -> Self {
        self.skip.push(Selector::Type(type_name.to_string()));
        self
    }
    /// Registers a custom layer type (see [`QuantizableLayer`]).
    pub fn register<L: QuantizableLayer>(mut self) -> Self {
        self.custom_layers.push(CustomLayer {
            name: L::NAME.to_string(),
            weights: L::quantizable_weights()
                .into_iter()
                .map(|(f, a)| (f.to_string(), a))
                .collect(),
        });
        self
    }
}

/// One float parameter of the model, as the planner sees it.
#[derive(Clone, Debug)]
pub(crate) struct ParamInfo {
    pub path: String,
    pub module_path: String,
    pub field: String,
    pub layer_type: String,
    pub dims: Vec<usize>,
    pub frozen: bool,
    pub reparameterized: bool,
    pub inside_fused: bool,
}

#[derive(Default)]
struct Collect {
    at: TreePath,
    params: Vec<ParamInfo>,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if container_type == burn_types::REPARAMETERIZATION
            && let Some(last) = self.params.last_mut()
        {
            last.reparameterized = true;
        }
        self.at.enter(name, container_type);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.at.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.at.inside(burn_types::REPARAMETERIZATION) {
            return; // state inside a quantizer
        }
        let device = param.lazy_device();
        let frozen = device.is_autodiff() && !param.is_require_grad();
        self.params.push(ParamInfo {
            path: self.at.path(),
            module_path: self.at.prefix(1),
            field: self.at.field().unwrap_or_default().to_string(),
            layer_type: tree::short_type(self.at.holder().unwrap_or_default()).to_string(),
            dims: param.lazy_shape().dims::<D>().to_vec(),
            frozen,
            reparameterized: false,
            inside_fused: self.at.inside(Fused::<()>::TYPE),
        });
    }
}

pub(crate) fn collect<M: Module>(model: &M) -> Vec<ParamInfo> {
    let mut c = Collect::default();
    model.visit(&mut c);
    c.params
}

/// What [`plan`] decided for one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedParam {
    /// Dotted parameter path (`blocks.0.conv.weight`).
    pub path: String,
    /// The layer type that owns it (`Conv2d`).
    pub layer_type: String,
    /// Parameter dimensions.
    pub dims: Vec<usize>,
    /// The spec, or `None` if it stays float.
    pub spec: Option<QuantSpec>,
    /// Why it got this decision (`default`, `rule path pattern "fc2"`, `frozen`, ...).
    pub reason: String,
    /// The settings that chose `spec` (`None` when it stays float). Graph mode applies them
    /// with the channel axis it sees the weight used on, also for layer types it does not know.
    pub settings: Option<WeightQuant>,
    /// Whether a skip rule selected it (graph mode then also leaves the layer's output float).
    pub skipped: bool,
    /// Whether the step size is learned (LSQ).
    pub learned: bool,
}

pub(crate) fn glob(pattern: &str) -> Result<GlobMatcher, QatError> {
    let as_path = pattern.replace('.', "/");
    Glob::new(&as_path)
        .map(|g| g.compile_matcher())
        .map_err(|e| QatError::InvalidPattern {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })
}

fn selects(matcher: &(Selector, Option<GlobMatcher>), p: &ParamInfo) -> bool {
    match matcher {
        (Selector::Path(_), Some(g)) => {
            g.is_match(p.module_path.replace('.', "/")) || g.is_match(p.path.replace('.', "/"))
        }
        (Selector::Type(t), _) => &p.layer_type == t,
        _ => false,
    }
}

/// Decides, for every float parameter of `model`, whether and how its weight is quantized,
/// without changing the model. [`quantize`] applies this plan.
///
/// # Errors
///
/// A selector that matches nothing, an invalid setting, a registered axis that a weight does
/// not have, conflicting rules for one layer, a model with nothing to quantize, or a model
/// already quantized.
pub fn plan<M: Module>(model: &M, config: &QatConfig) -> Result<Vec<PlannedParam>, QatError> {
    plan_with(model, config, false)
}

/// [`plan`], also for a model whose weights are quantized already when `allow_quantized`.
pub(crate) fn plan_with<M: Module>(
    model: &M,
    config: &QatConfig,
    allow_quantized: bool,
) -> Result<Vec<PlannedParam>, QatError> {
    let params = collect(model);
    if !allow_quantized && let Some(p) = params.iter().find(|p| p.reparameterized) {
        return Err(QatError::AlreadyQuantized {
            param: p.path.clone(),
        });
    }
    settings_ok(config)?;
    let rules = Rules::compile(config)?;
    rules.all_select(&params)?;
    let layers = known_layers(config);
    let out = params
        .iter()
        .map(|p| decide(p, &rules, &layers, config.default))
        .collect::<Result<Vec<_>, _>>()?;
    if !out.iter().any(|p| p.spec.is_some()) {
        let listed: Vec<String> = out
            .iter()
            .map(|p| format!("{} ({})", p.path, p.reason))
            .collect();
        return Err(QatError::NothingToQuantize { params: listed });
    }
    Ok(out)
}

/// The default's and every rule's settings make a valid spec; errors name the setting
/// (`QatConfig.default.bits`, `QatConfig.rules[2].bits`).
fn settings_ok(config: &QatConfig) -> Result<(), QatError> {
    for (i, (_, quant)) in std::iter::once(&(Selector::Path("<default>".into()), config.default))
        .chain(config.rules.iter())
        .enumerate()
    {
        quant.spec(None).validate().map_err(|e| match e {
            QatError::InvalidSpec {
                field,
                value,
                allowed,
            } => QatError::InvalidConfig {
                field: if i == 0 {
                    format!("QatConfig.default.{field}")
                } else {
                    format!("QatConfig.rules[{}].{field}", i - 1)
                },
                value,
                allowed,
            },
            other => other,
        })?;
    }
    Ok(())
}

/// A selector with its compiled glob (for a path selector).
type Matcher = (Selector, Option<GlobMatcher>);

fn compile(s: &Selector) -> Result<Matcher, QatError> {
    match s {
        Selector::Path(p) => Ok((s.clone(), Some(glob(p)?))),
        Selector::Type(_) => Ok((s.clone(), None)),
    }
}

/// A config's rules and skips, compiled.
struct Rules {
    rules: Vec<(Matcher, WeightQuant)>,
    skips: Vec<Matcher>,
}

impl Rules {
    fn compile(config: &QatConfig) -> Result<Self, QatError> {
        Ok(Self {
            rules: config
                .rules
                .iter()
                .map(|(s, q)| Ok((compile(s)?, *q)))
                .collect::<Result<_, QatError>>()?,
            skips: config.skip.iter().map(compile).collect::<Result<_, _>>()?,
        })
    }

    /// Every selector selects some parameter of `params`; the error lists what there is.
    fn all_select(&self, params: &[ParamInfo]) -> Result<(), QatError> {
        let all_modules: Vec<&str> = {
            let mut v: Vec<&str> = params.iter().map(|p| p.module_path.as_str()).collect();
            v.dedup();
            v
        };
        let all_types: Vec<&str> = {
            let mut v: Vec<&str> = params.iter().map(|p| p.layer_type.as_str()).collect();
            v.sort();
            v.dedup();
            v
        };
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let matchers = self.rules.iter().map(|(m, _)| m).chain(self.skips.iter());
        match matchers
            .into_iter()
            .find(|m| !params.iter().any(|p| selects(m, p)))
        {
            None => Ok(()),
            Some((Selector::Path(pat), _)) => Err(QatError::MatchesNothing {
                what: "layer pattern",
                selector: pat.clone(),
                among: "module of this model",
                listing: "modules",
                available: owned(&all_modules),
                hint: ". Patterns are dot-separated: `*` matches one name, `**` any number",
            }),
            Some((Selector::Type(t), _)) => Err(QatError::MatchesNothing {
                what: "layer type",
                selector: t.clone(),
                among: "layer of this model",
                listing: "layer types",
                available: owned(&all_types),
                hint: "",
            }),
        }
    }

    /// The path rules (`paths`) or type rules that select `p`.
    fn selecting(&self, p: &ParamInfo, paths: bool) -> Vec<(Selector, WeightQuant)> {
        self.rules
            .iter()
            .filter(|(m, _)| matches!(m.0, Selector::Path(_)) == paths && selects(m, p))
            .map(|(m, q)| (m.0.clone(), *q))
            .collect()
    }

    /// What the rules say of `p`: skipped, or the settings of the path rule, else the type
    /// rule, else `default`, with the reason. Rules that select `p` must agree.
    fn choose(&self, p: &ParamInfo, default: WeightQuant) -> Result<Choice, QatError> {
        let skipped = self.skips.iter().find(|m| selects(m, p)).map(|m| &m.0);
        let path_rules = self.selecting(p, true);
        let type_rules = self.selecting(p, false);
        if let Some(s) = skipped {
            if let Some((sel, _)) = path_rules.first().or(type_rules.first()) {
                return Err(conflict(p, s, &format!("skip rule and {sel}")));
            }
            return Ok(Choice::Skipped(format!("skipped by {s}")));
        }
        let chosen = match pick(p, &path_rules)? {
            Some(r) => Some(r),
            None => pick(p, &type_rules)?,
        };
        Ok(match chosen {
            Some((sel, q)) => Choice::Settings(q, format!("{sel}")),
            None => Choice::Settings(default, "default".to_string()),
        })
    }
}

/// What the rules decided for one parameter, with the reason.
enum Choice {
    Skipped(String),
    Settings(WeightQuant, String),
}

fn conflict(p: &ParamInfo, a: &Selector, b: &str) -> QatError {
    QatError::ConflictingSettings {
        param: p.path.clone(),
        first: a.to_string(),
        second: b.to_string(),
    }
}

/// The first of `rs` (rules that select `p`), if all of them agree.
fn pick(
    p: &ParamInfo,
    rs: &[(Selector, WeightQuant)],
) -> Result<Option<(Selector, WeightQuant)>, QatError> {
    if let Some(first) = rs.first() {
        if let Some(other) = rs.iter().find(|r| r.1 != first.1) {
            return Err(conflict(p, &first.0, &other.0.to_string()));
        }
        return Ok(Some(first.clone()));
    }
    Ok(None)
}

/// The built-in layer types and the config's registered ones (which win), by name.
fn known_layers(config: &QatConfig) -> BTreeMap<String, CustomLayer> {
    let mut layers = BTreeMap::new();
    for l in builtin_layers()
        .into_iter()
        .chain(config.custom_layers.iter().cloned())
    {
        layers.insert(l.name.clone(), l);
    }
    layers
}

impl PlannedParam {
    /// `p`'s plan entry with `spec`, nothing learned, skipped or set yet.
    fn of(p: &ParamInfo, spec: Option<QuantSpec>, reason: String) -> Self {
        Self {
            path: p.path.clone(),
            layer_type: p.layer_type.clone(),
            dims: p.dims.clone(),
            spec,
            reason,
            learned: false,
            settings: None,
            skipped: false,
        }
    }
}

/// Why `p` stays float whatever the rules say (its rank, its owner), if it does.
fn float_by_kind(p: &ParamInfo, known: Option<&CustomLayer>) -> Option<String> {
    if p.dims.len() < 2 {
        return Some("rank < 2 (bias, norm or state)".into());
    }
    if p.inside_fused {
        return Some("quantized by its fused module (BatchNorm folded first)".into());
    }
    if NEVER.contains(&p.layer_type.as_str()) {
        return Some(format!("{} parameters stay float", p.layer_type));
    }
    match known {
        Some(layer) if !layer.weights.iter().any(|(f, _)| *f == p.field) => Some(format!(
            "field `{}` is not a weight of {}",
            p.field, p.layer_type
        )),
        _ => None,
    }
}

/// The channel axis `p`'s layer type registers for it (`None`: per tensor, or not
/// registered), within `p`'s rank.
fn registered_axis(p: &ParamInfo, known: Option<&CustomLayer>) -> Result<Option<usize>, QatError> {
    let axis = known
        .and_then(|layer| layer.weights.iter().find(|(f, _)| *f == p.field))
        .and_then(|(_, axis)| *axis);
    if let Some(a) = axis
        && a >= p.dims.len()
    {
        return Err(QatError::AxisOutOfRange {
            axis: a,
            rank: p.dims.len(),
            context: format!(
                " (parameter `{}` of layer type {}, registered with axis {a}: fix its QuantizableLayer::quantizable_weights)",
                p.path, p.layer_type
            ),
        });
    }
    Ok(axis)
}

/// The plan for one parameter: float for its kind, frozen, skipped or disabled; else the
/// chosen settings on its registered axis.
fn decide(
    p: &ParamInfo,
    rules: &Rules,
    layers: &BTreeMap<String, CustomLayer>,
    default: WeightQuant,
) -> Result<PlannedParam, QatError> {
    let known = layers.get(&p.layer_type);
    if let Some(reason) = float_by_kind(p, known) {
        return Ok(PlannedParam::of(p, None, reason));
    }
    let axis = registered_axis(p, known)?;
    if p.frozen {
        let reason = "frozen by the user (does not require grad)".into();
        return Ok(PlannedParam::of(p, None, reason));
    }
    let (quant, reason) = match rules.choose(p, default)? {
        Choice::Skipped(reason) => {
            let skipped = PlannedParam::of(p, None, reason);
            return Ok(PlannedParam {
                skipped: true,
                ..skipped
            });
        }
        Choice::Settings(quant, reason) => (quant, reason),
    };
    if !quant.enabled {
        return Ok(PlannedParam::of(p, None, format!("float by {reason}")));
    }
    let mut reason = if known.is_none() {
        format!(
            "{reason}; per-tensor: layer type {} is not registered (QatConfig::register)",
            p.layer_type
        )
    } else {
        reason
    };
    if quant.learned {
        reason.push_str("; LSQ-learned step size");
    }
    Ok(PlannedParam {
        settings: Some(quant),
        learned: quant.learned,
        ..PlannedParam::of(p, Some(quant.spec(axis)), reason)
    })
}

/// Attaches weight fake-quantization to `model` following `config`: one call, no change to the
/// model's code. Returns the same type; train it as before.
///
/// Gradients reach the float weights (`param.base()`), which the optimizer updates; the
/// quantizers (`WeightFakeQuant`) are recorded with the model.
///
/// # Errors
///
/// See [`plan`].
pub fn quantize<M: Module>(model: M, config: &QatConfig) -> Result<M, QatError> {
    let planned = plan(&model, config)?;
    let learned: Vec<String> = planned
        .iter()
        .filter(|p| p.spec.is_some() && p.learned)
        .map(|p| p.path.clone())
        .collect();
    let specs: BTreeMap<String, QuantSpec> = planned
        .into_iter()
        .filter_map(|p| p.spec.map(|s| (p.path, s)))
        .collect();
    Ok(model.apply_reparameterization(
        WeightFakeQuantizer::new(|path: &str, _dims: &[usize]| specs.get(path).copied())
            .with_learned(learned),
    ))
}

/// Bakes the fake-quantized weights into ordinary float weights for inference: the result is
/// the model in evaluation mode (`valid()`) with every weight reparameterization folded
/// (`materialize()`). Its weights hold exactly the values the QAT model computed with.
pub fn bake<M: Module>(model: M) -> M {
    model.valid().materialize()
}
