use thiserror::Error;

/// Everything that burn-qat rejects, with the offending field, its value and what is allowed.
///
/// ```
/// use burn_qat_core::QuantSpec;
///
/// let err = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(1).validate().unwrap_err();
/// assert_eq!(err.to_string(), "invalid quantization spec: `bits` is 1, allowed: 2..=16");
/// ```
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum QatError {
    /// A field of a [`QuantSpec`](crate::QuantSpec) is out of range.
    #[error("invalid quantization spec: `{field}` is {value}, allowed: {allowed}")]
    InvalidSpec {
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// What the field accepts.
        allowed: String,
    },
    /// A configuration field (observer decay, channel count...) is out of range.
    #[error("invalid configuration: `{field}` is {value}, allowed: {allowed}")]
    InvalidConfig {
        /// The field name, with its owner (`FakeQuantConfig.decay`).
        field: String,
        /// The rejected value.
        value: String,
        /// What the field accepts.
        allowed: String,
    },
    /// A per-channel axis that the tensor does not have.
    #[error(
        "per-channel axis {axis} does not exist on a tensor of rank {rank}{context}: use an axis in 0..{rank}"
    )]
    AxisOutOfRange {
        /// The requested axis.
        axis: usize,
        /// The tensor rank.
        rank: usize,
        /// Where (a module path), or empty.
        context: String,
    },
    /// Quantization parameters whose channel count disagrees with the tensor.
    #[error("{what} has {got} channels but the tensor has {expected} along axis {axis}{context}")]
    ChannelMismatch {
        /// Which parameter.
        what: &'static str,
        /// Channels along the axis of the tensor.
        expected: usize,
        /// Channels in the parameter.
        got: usize,
        /// The axis.
        axis: usize,
        /// Where (a module path), or empty.
        context: String,
    },
    /// Graph mode cannot capture or lift an op of a model's forward.
    #[error("graph mode: {what}, {near}: {hint}")]
    Graph {
        /// The Burn call or construct that was refused, in the user's words (`` `Tensor::select` ``,
        /// `` `module::max_pool2d(ceil_mode)` ``, a matmul of two activations).
        what: String,
        /// Where in the forward, by module path: ``in `backbone.act` `` (an op reading that
        /// module's parameters), ``after `layer1.0.conv2` `` (the last layer before a
        /// parameter-free op), ``on the input, before `stem.conv` (the first layer)``, or
        /// `in the forward` (the whole forward).
        near: String,
        /// What to do about it.
        hint: String,
    },
    /// A layer pattern (a glob over dotted module paths) that does not parse.
    #[error(
        "layer pattern {pattern:?} is not a valid pattern ({reason}): use dot-separated names, `*` for one name, `**` for any number"
    )]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// What the glob parser said.
        reason: String,
    },
    /// A selector of a configuration that selects nothing in the model or graph.
    #[error("{what} {selector:?} matches no {among}; its {listing} are {available:?}{hint}")]
    MatchesNothing {
        /// What kind of selector: `layer pattern`, `layer type`, `activation pattern`.
        what: &'static str,
        /// The selector as given.
        selector: String,
        /// What it should have matched: `module of this model`, `node of this graph`.
        among: &'static str,
        /// What `available` lists: `modules`, `layer types`, `nodes`.
        listing: &'static str,
        /// What the model has that the selector could have named.
        available: Vec<String>,
        /// How to write a selector.
        hint: &'static str,
    },
    /// Two rules select the same parameter with different settings.
    #[error(
        "conflicting settings for `{param}`: {first} and {second} both select it with different settings; make the patterns disjoint or remove one"
    )]
    ConflictingSettings {
        /// The parameter's dotted path.
        param: String,
        /// One rule.
        first: String,
        /// The other rule.
        second: String,
    },
    /// A parameter is quantized (or otherwise reparameterized) already.
    #[error(
        "parameter `{param}` already has a reparameterization (weight fake-quant, LoRA...): quantize a model once, and call `bake` first to quantize a baked model again"
    )]
    AlreadyQuantized {
        /// The parameter's dotted path.
        param: String,
    },
    /// No parameter of the model is a weight the configuration quantizes.
    #[error(
        "nothing to quantize: no parameter of this model is a weight to fake-quantize. Parameters: {params:?}. Quantize activations with FakeQuant / Quantized, or register your layer type with QatConfig::register"
    )]
    NothingToQuantize {
        /// Every parameter with the reason it stays float.
        params: Vec<String>,
    },
    /// A BatchNorm cannot be folded into the layer named to receive it.
    #[error("fuse_batch_norms: `{layer}` {problem}")]
    CannotFold {
        /// The module path named in the pair.
        layer: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A layer that the integer/graph path does not support in this form.
    #[error("`{layer}` ({kind}): {problem}")]
    UnsupportedLayer {
        /// The layer's path or name.
        layer: String,
        /// Its type.
        kind: String,
        /// What is not supported and what to use instead.
        problem: String,
    },
    /// Write-back of a graph's parameters into a model that does not match it.
    #[error("write_back: {problem}")]
    WriteBack {
        /// What does not match and what to write back into instead.
        problem: String,
    },
    /// A record that cannot be loaded into the model.
    #[error("the record does not fit this model: {reason}")]
    Record {
        /// What Burn's loader said.
        reason: String,
    },
    /// A record quantizes a layer differently from the model it is loaded into.
    #[error(
        "the record quantizes `{layer}` as {recorded}, but the model it is loaded into as {model}: rebuild the model with the configuration the record was saved with, then load"
    )]
    RecordMismatch {
        /// The quantizer's path.
        layer: String,
        /// The spec in the record.
        recorded: String,
        /// The spec of the model (the skeleton).
        model: String,
    },
}
