//! Format version 2 (commits 0d01961..c068d46): the integer model as a list of layers, with
//! residual blocks holding a body of layers, and the upgrade `v2 -> current` to a chain of
//! nodes.
//!
//! The types here are frozen copies of the payload types of that time (their serde layout is
//! the file's layout): never edit them, only the upgrade. Version 1 files decode into these
//! types too (see [`super::v1`]).

use serde::{Deserialize, Deserializer};

use crate::model::{self, Dim, IntNode, IntOp, IntegerModel, Window};
use crate::requant;

/// An activation grid (version 1 and 2's `ActQ`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub(super) struct ActQ {
    pub scale: f32,
    pub zero_point: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl From<ActQ> for model::Grid {
    fn from(q: ActQ) -> Self {
        model::Grid {
            scale: q.scale,
            zero_point: q.zero_point,
            qmin: q.qmin,
            qmax: q.qmax,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub(super) struct FixedMultiplier {
    pub m0: i32,
    pub shift: i32,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) enum Output {
    Quantized {
        act: ActQ,
        requant: Vec<FixedMultiplier>,
        lo: i32,
        hi: i32,
    },
    Float {
        scale: Vec<f32>,
        lo: f32,
        hi: f32,
    },
}

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
    pub weight_bits: u32,
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
    pub weight_bits: u32,
    pub weight_scale: Vec<f32>,
    pub bias: Vec<i32>,
    pub input: ActQ,
    pub output: Output,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) struct IntAdd {
    pub a: ActQ,
    pub b: ActQ,
    pub out: ActQ,
    pub ma: i64,
    pub mb: i64,
    pub shift: u32,
    pub lo: i32,
    pub hi: i32,
}

/// One layer; the variant order is the file's (also version 1's since commit 2ae457e).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) enum IntLayer {
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
        body: Vec<IntLayer>,
        add: IntAdd,
    },
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub(super) struct IntegerModel2 {
    pub input_shape: Vec<usize>,
    pub layers: Vec<IntLayer>,
}

/// Deepest nesting of residual blocks a version 1 or 2 file may hold (the converter of that
/// time wrote one level): deeper files are refused before the decoder's recursion can exhaust
/// the stack.
pub(super) const MAX_NESTING: usize = 16;

thread_local! {
    /// The nesting of the residual body being decoded, and whether the limit was hit (postcard
    /// keeps no message of a custom error).
    static DEPTH: std::cell::Cell<(usize, bool)> = const { std::cell::Cell::new((0, false)) };
}

/// Decodes a residual body, one level deeper, refusing more than [`MAX_NESTING`] levels.
pub(super) fn nested<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let (depth, _) = DEPTH.with(|c| c.get());
    if depth >= MAX_NESTING {
        DEPTH.with(|c| c.set((depth, true)));
        return Err(serde::de::Error::custom("nested too deep"));
    }
    DEPTH.with(|c| c.set((depth + 1, false)));
    let body = Vec::<T>::deserialize(d);
    DEPTH.with(|c| c.set((depth, c.get().1)));
    body
}

/// Decodes a whole payload of type `T` (every byte used).
pub(super) fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, String> {
    DEPTH.with(|c| c.set((0, false)));
    let decoded = postcard::take_from_bytes::<T>(payload);
    let (_, too_deep) = DEPTH.with(|c| c.replace((0, false)));
    match decoded {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} bytes after the model", rest.len())),
        Err(_) if too_deep => Err(format!(
            "residual blocks nested deeper than {MAX_NESTING} levels (the converter of versions \
             1 and 2 wrote one level)"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn output(o: Output) -> model::Output {
    match o {
        Output::Quantized {
            act,
            requant,
            lo,
            hi,
        } => model::Output::Quantized {
            grid: act.into(),
            requant: requant
                .into_iter()
                .map(|m| requant::FixedMultiplier {
                    m0: m.m0,
                    shift: m.shift,
                })
                .collect(),
            lo,
            hi,
        },
        Output::Float { scale, lo, hi } => model::Output::Float { scale, lo, hi },
    }
}

/// The value a layer reads: its node, its shape without the batch axis, its grid (`None`:
/// float).
#[derive(Clone)]
struct Value {
    node: usize,
    shape: Vec<usize>,
    grid: Option<model::Grid>,
}

struct Chain {
    nodes: Vec<IntNode>,
}

impl Chain {
    fn push(
        &mut self,
        name: String,
        op: IntOp,
        inputs: Vec<usize>,
        shape: Vec<usize>,
        grid: Option<model::Grid>,
    ) -> Value {
        let mut dims = vec![Dim::Batch(1)];
        dims.extend(shape.iter().map(|&d| Dim::Fixed(d)));
        self.nodes.push(IntNode {
            name,
            op,
            inputs,
            shape: dims,
            grid,
        });
        Value {
            node: self.nodes.len() - 1,
            shape,
            grid,
        }
    }

    /// Appends `layers` reading `v`, as the old runner ran them one after the other.
    fn layers(
        &mut self,
        layers: Vec<IntLayer>,
        mut v: Value,
        prefix: &str,
    ) -> Result<Value, String> {
        for (i, layer) in layers.into_iter().enumerate() {
            let name = format!("{prefix}.{i}");
            v = self.layer(layer, v, name)?;
        }
        Ok(v)
    }

    fn layer(&mut self, layer: IntLayer, v: Value, name: String) -> Result<Value, String> {
        let refuse = |what: &str| {
            Err(format!(
                "{name} ({what}) does not accept input of shape {:?}",
                v.shape
            ))
        };
        let int = |what: &str| match v.grid {
            Some(g) => Ok(g),
            None => Err(format!(
                "{name} ({what}) reads float values (the model's input before its Quantize layer)"
            )),
        };
        let pooled = |kernel: [usize; 2], stride: [usize; 2]| match v.shape[..] {
            [c, h, w] => Some(vec![
                c,
                model::conv_output_len(h, 0, 1, kernel[0], stride[0])?,
                model::conv_output_len(w, 0, 1, kernel[1], stride[1])?,
            ]),
            _ => None,
        };
        let window = |kernel, stride| Window {
            kernel,
            stride,
            padding: [0; 4],
            dilation: [1, 1],
        };
        Ok(match layer {
            // The old runner let integer values pass a Quantize layer unchanged.
            IntLayer::Quantize(_) if v.grid.is_some() => v,
            IntLayer::Quantize(q) => {
                let shape = v.shape.clone();
                self.push(
                    name,
                    IntOp::Quantize(q.into()),
                    vec![v.node],
                    shape,
                    Some(q.into()),
                )
            }
            IntLayer::Conv2d(c) => {
                int("Conv2d")?;
                let (ph, pw) = (c.padding[0] + c.padding[1], c.padding[2] + c.padding[3]);
                let shape = match v.shape[..] {
                    // A 1-D convolution: `[c, length]`.
                    [cin, len] if cin == c.in_channels && c.kernel[0] == 1 && ph == 0 => {
                        model::conv_output_len(len, pw, c.dilation[1], c.kernel[1], c.stride[1])
                            .map(|l| vec![c.out_channels, l])
                    }
                    [cin, h, w] if cin == c.in_channels => (|| {
                        let oh =
                            model::conv_output_len(h, ph, c.dilation[0], c.kernel[0], c.stride[0])?;
                        let ow =
                            model::conv_output_len(w, pw, c.dilation[1], c.kernel[1], c.stride[1])?;
                        Some(vec![c.out_channels, oh, ow])
                    })(),
                    _ => None,
                };
                let Some(shape) = shape else {
                    return refuse("Conv2d");
                };
                let out = output(c.output);
                let grid = out.grid();
                let op = IntOp::Conv2d(model::IntConv2d {
                    in_channels: c.in_channels,
                    out_channels: c.out_channels,
                    groups: c.groups,
                    kernel: c.kernel,
                    stride: c.stride,
                    dilation: c.dilation,
                    padding: c.padding,
                    weight: c.weight,
                    weight_bits: c.weight_bits,
                    weight_scale: c.weight_scale,
                    bias: c.bias,
                    input: c.input.into(),
                    output: out,
                });
                self.push(name, op, vec![v.node], shape, grid)
            }
            IntLayer::Linear(l) => {
                int("Linear")?;
                if v.shape != [l.in_features] {
                    return refuse("Linear");
                }
                let out = output(l.output);
                let grid = out.grid();
                let op = IntOp::Linear(model::IntLinear {
                    in_features: l.in_features,
                    out_features: l.out_features,
                    weight: l.weight,
                    weight_bits: l.weight_bits,
                    weight_scale: l.weight_scale,
                    bias: l.bias,
                    input: l.input.into(),
                    output: out,
                });
                self.push(name, op, vec![v.node], vec![l.out_features], grid)
            }
            IntLayer::MaxPool2d { kernel, stride } => {
                int("MaxPool2d")?;
                let Some(shape) = pooled(kernel, stride) else {
                    return refuse("MaxPool2d");
                };
                self.push(
                    name,
                    IntOp::MaxPool(window(kernel, stride)),
                    vec![v.node],
                    shape,
                    v.grid,
                )
            }
            // On the input's grid, no padding: every window counts `kh * kw` values.
            IntLayer::AvgPool2d { kernel, stride } => {
                let g = int("AvgPool2d")?;
                let Some(shape) = pooled(kernel, stride) else {
                    return refuse("AvgPool2d");
                };
                let op = IntOp::AvgPool {
                    window: window(kernel, stride),
                    count_include_pad: true,
                    input: g,
                };
                self.push(name, op, vec![v.node], shape, v.grid)
            }
            // `clamp(q, lo, hi)` on the grid's integers, as a table.
            IntLayer::Clamp { lo, hi } => {
                let g = int("Clamp")?;
                if lo > hi {
                    return Err(format!(
                        "{name} (Clamp): lower bound {lo} above upper bound {hi}"
                    ));
                }
                let table = (-128..=127)
                    .map(|q: i32| q.clamp(g.qmin, g.qmax).clamp(lo, hi) as i8)
                    .collect();
                let lut = model::Lut {
                    function: "Clamp".into(),
                    input: g,
                    output: g,
                    table,
                };
                let shape = v.shape.clone();
                self.push(name, IntOp::Lut(lut), vec![v.node], shape, Some(g))
            }
            IntLayer::Flatten => {
                let len = v.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                let Some(len) = len else {
                    return refuse("Flatten");
                };
                self.push(name, IntOp::Reshape, vec![v.node], vec![len], v.grid)
            }
            // `add(x, body(x))`, the input first.
            IntLayer::Residual { body, add } => {
                int("Residual")?;
                let branch = self.layers(body, v.clone(), &format!("{name}.body"))?;
                if branch.shape != v.shape || branch.grid.is_none() {
                    return Err(format!(
                        "{name} (Residual): its body gives {}, not integers of its input's shape {:?}",
                        if branch.grid.is_none() {
                            "float values".to_string()
                        } else {
                            format!("shape {:?}", branch.shape)
                        },
                        v.shape
                    ));
                }
                let op = IntOp::Add(model::IntAdd {
                    a: add.a.into(),
                    b: add.b.into(),
                    out: add.out.into(),
                    ma: add.ma,
                    mb: add.mb,
                    shift: add.shift,
                    lo: add.lo,
                    hi: add.hi,
                });
                let shape = v.shape.clone();
                self.push(
                    format!("{name}.add"),
                    op,
                    vec![v.node, branch.node],
                    shape,
                    Some(add.out.into()),
                )
            }
        })
    }
}

/// The upgrade `v2 -> current`: the layers become a chain of nodes (a residual block its
/// body's nodes and an add reading the block's input and the body's last node), named by
/// their place in the old model (`layers.3`, `layers.3.body.0`, `layers.3.add`). Not
/// validated yet.
pub(super) fn upgrade(old: IntegerModel2) -> Result<IntegerModel, String> {
    if old.input_shape.is_empty() || old.input_shape.len() > 3 || old.input_shape.contains(&0) {
        return Err(format!(
            "input shape {:?} is not [features], [c, length] or [c, h, w]",
            old.input_shape
        ));
    }
    let mut chain = Chain { nodes: vec![] };
    let input = chain.push("input".into(), IntOp::Input, vec![], old.input_shape, None);
    let out = chain.layers(old.layers, input, "layers")?;
    Ok(IntegerModel::new(chain.nodes, out.node))
}
