//! Format version 1 (commits 0c9cfa4..03ffdeb): version 2's list of layers without
//! `weight_bits` (every weight was 8-bit), and the upgrade `v1 -> v2`.
//!
//! Version 1 was written with two layer orders under the same number: commit 2ae457e inserted
//! `AvgPool2d` before `Clamp` instead of appending it, so in files of 0c9cfa4..4ee6218 variant 4
//! is `Clamp`, 5 `Flatten` and 6 `Residual`, and in later ones 4 is `AvgPool2d`, 5 `Clamp`, 6
//! `Flatten` and 7 `Residual`. A file that uses none of these variants reads the same both
//! ways. [`super::from_bytes_with_budget`] decodes a version 1 payload in both orders and keeps
//! the one that decodes completely and gives a valid model; a file valid in both orders with
//! different meanings is refused as ambiguous (never guessed). The frozen types here are never
//! edited; this is why new variants are appended.

use serde::Deserialize;

use super::v2::{self, ActQ, IntAdd, Output, nested};

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) struct IntConv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    pub padding: [usize; 4],
    pub weight: Vec<i8>,
    pub weight_scale: Vec<f32>,
    pub bias: Vec<i32>,
    pub input: ActQ,
    pub output: Output,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) struct IntLinear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Vec<i8>,
    pub weight_scale: Vec<f32>,
    pub bias: Vec<i32>,
    pub input: ActQ,
    pub output: Output,
}

/// The layer order of commits 0c9cfa4..4ee6218.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) enum EarlyLayer {
    Quantize(ActQ),
    Conv2d(IntConv2d),
    Linear(IntLinear),
    MaxPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    Clamp {
        lo: i32,
        hi: i32,
    },
    Flatten,
    Residual {
        #[serde(deserialize_with = "nested")]
        body: Vec<EarlyLayer>,
        add: IntAdd,
    },
}

/// The layer order of commits 2ae457e..03ffdeb (version 2's).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) enum LateLayer {
    Quantize(ActQ),
    Conv2d(IntConv2d),
    Linear(IntLinear),
    MaxPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    AvgPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
    },
    Clamp {
        lo: i32,
        hi: i32,
    },
    Flatten,
    Residual {
        #[serde(deserialize_with = "nested")]
        body: Vec<LateLayer>,
        add: IntAdd,
    },
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) struct IntegerModel1<L> {
    pub input_shape: Vec<usize>,
    pub layers: Vec<L>,
}

fn conv(c: IntConv2d) -> v2::IntConv2d {
    v2::IntConv2d {
        in_channels: c.in_channels,
        out_channels: c.out_channels,
        groups: c.groups,
        kernel: c.kernel,
        stride: c.stride,
        dilation: c.dilation,
        padding: c.padding,
        weight: c.weight,
        weight_bits: 8,
        weight_scale: c.weight_scale,
        bias: c.bias,
        input: c.input,
        output: c.output,
    }
}

fn linear(l: IntLinear) -> v2::IntLinear {
    v2::IntLinear {
        in_features: l.in_features,
        out_features: l.out_features,
        weight: l.weight,
        weight_bits: 8,
        weight_scale: l.weight_scale,
        bias: l.bias,
        input: l.input,
        output: l.output,
    }
}

impl From<EarlyLayer> for v2::IntLayer {
    fn from(layer: EarlyLayer) -> Self {
        match layer {
            EarlyLayer::Quantize(q) => v2::IntLayer::Quantize(q),
            EarlyLayer::Conv2d(c) => v2::IntLayer::Conv2d(conv(c)),
            EarlyLayer::Linear(l) => v2::IntLayer::Linear(linear(l)),
            EarlyLayer::MaxPool2d { kernel, stride } => v2::IntLayer::MaxPool2d { kernel, stride },
            EarlyLayer::Clamp { lo, hi } => v2::IntLayer::Clamp { lo, hi },
            EarlyLayer::Flatten => v2::IntLayer::Flatten,
            EarlyLayer::Residual { body, add } => v2::IntLayer::Residual {
                body: body.into_iter().map(Into::into).collect(),
                add,
            },
        }
    }
}

impl From<LateLayer> for v2::IntLayer {
    fn from(layer: LateLayer) -> Self {
        match layer {
            LateLayer::Quantize(q) => v2::IntLayer::Quantize(q),
            LateLayer::Conv2d(c) => v2::IntLayer::Conv2d(conv(c)),
            LateLayer::Linear(l) => v2::IntLayer::Linear(linear(l)),
            LateLayer::MaxPool2d { kernel, stride } => v2::IntLayer::MaxPool2d { kernel, stride },
            LateLayer::AvgPool2d { kernel, stride } => v2::IntLayer::AvgPool2d { kernel, stride },
            LateLayer::Clamp { lo, hi } => v2::IntLayer::Clamp { lo, hi },
            LateLayer::Flatten => v2::IntLayer::Flatten,
            LateLayer::Residual { body, add } => v2::IntLayer::Residual {
                body: body.into_iter().map(Into::into).collect(),
                add,
            },
        }
    }
}

/// The upgrade `v1 -> v2`: weights become 8-bit (`weight_bits = 8`), layers keep their meaning.
pub(super) fn upgrade<L: Into<v2::IntLayer>>(old: IntegerModel1<L>) -> v2::IntegerModel2 {
    v2::IntegerModel2 {
        input_shape: old.input_shape,
        layers: old.layers.into_iter().map(Into::into).collect(),
    }
}
