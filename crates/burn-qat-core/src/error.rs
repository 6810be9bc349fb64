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
    #[error("graph mode: {what} (near `{near}`): {hint}")]
    Graph {
        /// The op or construct that was refused (`Matmul of two activations`, `into_scalar`).
        what: String,
        /// The nearest module path (parameter-free ops name the closest layer).
        near: String,
        /// What to do about it.
        hint: String,
    },
    /// A model-level problem (selection, conversion) described in full.
    #[error("{0}")]
    Model(String),
}
