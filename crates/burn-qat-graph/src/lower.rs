//! [`from_sequential`]: burn-qat's `Sequential` as a [`QatGraph`], so that one converter, one
//! file format and one ONNX writer serve both.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn_qat_core::QatError;
use burn_qat_nn::ActQuant;
use burn_qat_transform::{Activation, Fused, SeqLayer, Sequential};

use crate::ir::{Dim, Node, Op, Program};
use crate::module::{GraphLayer, QatGraph};

struct Lowering {
    layers: Vec<GraphLayer>,
    nodes: Vec<Node>,
}

fn out_len(
    input: usize,
    pad: usize,
    dilation: usize,
    kernel: usize,
    stride: usize,
) -> Option<usize> {
    (input + pad)
        .checked_sub(dilation * (kernel.max(1) - 1) + 1)
        .map(|v| v / stride.max(1) + 1)
}

fn fixed(shape: &[Dim], k: usize) -> usize {
    match shape.get(k) {
        Some(Dim::Fixed(v)) => *v,
        _ => 0,
    }
}

/// The `[n, c, h, w]` output of a valid 2-D pooling window on `shape`, `None` if it does not fit.
/// In ceil mode a last window that runs past the input counts, as in Burn's pooling (one that
/// would start past the input does not).
fn pooled(
    shape: &[Dim],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
) -> Option<Vec<Dim>> {
    let len = |a: usize| {
        let n = fixed(shape, 2 + a);
        let floor = out_len(n, 0, dilation[a], kernel[a], stride[a])?;
        let s = stride[a].max(1);
        // One more window when the floor-mode windows leave input values uncovered.
        let more = ceil_mode && (floor - 1) * s + dilation[a] * (kernel[a].max(1) - 1) + 1 < n;
        Some(if more && floor * s < n {
            floor + 1
        } else {
            floor
        })
    };
    Some(vec![
        shape[0],
        shape[1],
        Dim::Fixed(len(0)?),
        Dim::Fixed(len(1)?),
    ])
}

impl Lowering {
    fn push(&mut self, op: Op, inputs: Vec<usize>, name: String, shape: Vec<Dim>) -> usize {
        self.nodes.push(Node {
            op,
            inputs,
            name,
            shape,
        });
        self.nodes.len() - 1
    }

    fn layer(&mut self, layer: GraphLayer, input: usize, name: String, shape: Vec<Dim>) -> usize {
        let kind = layer.kind();
        self.layers.push(layer);
        let index = self.layers.len() - 1;
        self.push(Op::Layer { index, kind }, vec![input], name, shape)
    }

    fn quant(&mut self, q: Option<ActQuant>, input: usize, name: &str) -> usize {
        match q {
            Some(q) => {
                let shape = self.nodes[input].shape.clone();
                self.layer(GraphLayer::Quant(q), input, format!("{name}.output"), shape)
            }
            None => input,
        }
    }

    fn activation(&mut self, a: Activation, input: usize, name: &str) -> usize {
        let shape = self.nodes[input].shape.clone();
        if a == Activation::Identity {
            return input;
        }
        let op = Op::from_activation(a);
        self.push(op, vec![input], format!("{name}.activation"), shape)
    }

    fn fused<L: Clone>(f: &Fused<L>) -> (Fused<L>, Option<ActQuant>)
    where
        Fused<L>: Clone,
    {
        let mut layer = f.clone();
        let output = layer.output.take();
        (layer, output)
    }

    fn lower(&mut self, seq: &[SeqLayer], prefix: &str, mut at: usize) -> Result<usize, QatError> {
        for (i, layer) in seq.iter().enumerate() {
            let name = format!("{prefix}.{i}");
            let shape = self.nodes[at].shape.clone();
            let bad = |what: &str| QatError::UnsupportedLayer {
                layer: name.clone(),
                kind: layer.name().to_string(),
                problem: what.to_string(),
            };
            at = match layer {
                SeqLayer::FakeQuant(fq) => self.layer(
                    GraphLayer::Quant(ActQuant::Observed(fq.clone())),
                    at,
                    name,
                    shape,
                ),
                SeqLayer::FusedConv2d(f) => {
                    let conv: &Conv2d = &f.layer;
                    let [_, _, kh, kw] = conv.weight.dims();
                    let (t, l, b, r) = match conv.padding {
                        PaddingConfig2d::Valid => (0, 0, 0, 0),
                        PaddingConfig2d::Explicit(t, l, b, r) => (t, l, b, r),
                        _ => return Err(bad("Same padding: use PaddingConfig2d::Explicit")),
                    };
                    let h = out_len(
                        fixed(&shape, 2),
                        t + b,
                        conv.dilation[0],
                        kh,
                        conv.stride[0],
                    );
                    let w = out_len(
                        fixed(&shape, 3),
                        l + r,
                        conv.dilation[1],
                        kw,
                        conv.stride[1],
                    );
                    let (Some(h), Some(w)) = (h, w) else {
                        return Err(bad(&format!("the kernel does not fit its input {shape:?}")));
                    };
                    let cout = conv.weight.dims()[0];
                    let (layer, output) = Self::fused(f);
                    let out = vec![
                        Dim::Batch(1),
                        Dim::Fixed(cout),
                        Dim::Fixed(h),
                        Dim::Fixed(w),
                    ];
                    let c = self.layer(GraphLayer::Conv2d(layer), at, name.clone(), out);
                    self.quant(output, c, &name)
                }
                SeqLayer::FusedConv1d(f) => {
                    let conv = &f.layer;
                    let [cout, _, k] = conv.weight.dims();
                    let (l, r) = match conv.padding {
                        burn::nn::PaddingConfig1d::Valid => (0, 0),
                        burn::nn::PaddingConfig1d::Explicit(l, r) => (l, r),
                        _ => return Err(bad("Same padding: use PaddingConfig1d::Explicit")),
                    };
                    let Some(len) = out_len(fixed(&shape, 2), l + r, conv.dilation, k, conv.stride)
                    else {
                        return Err(bad(&format!("the kernel does not fit its input {shape:?}")));
                    };
                    let (layer, output) = Self::fused(f);
                    let out = vec![Dim::Batch(1), Dim::Fixed(cout), Dim::Fixed(len)];
                    let c = self.layer(GraphLayer::Conv1d(layer), at, name.clone(), out);
                    self.quant(output, c, &name)
                }
                SeqLayer::FusedLinear(f) => {
                    let [_, out_features] = f.layer.weight.dims();
                    let mut out = shape.clone();
                    if let Some(last) = out.last_mut() {
                        *last = Dim::Fixed(out_features);
                    }
                    let (layer, output) = Self::fused(f);
                    let c = self.layer(GraphLayer::Linear(layer), at, name.clone(), out);
                    self.quant(output, c, &name)
                }
                SeqLayer::MaxPool2d(_) | SeqLayer::AvgPool2d(_) if shape.len() != 4 => {
                    return Err(bad(&format!("2-D pooling of a rank-{} input", shape.len())));
                }
                SeqLayer::MaxPool2d(p) => {
                    let PaddingConfig2d::Valid = p.padding else {
                        return Err(bad("only valid padding is lowered"));
                    };
                    let out = pooled(&shape, p.kernel_size, p.stride, p.dilation, p.ceil_mode)
                        .ok_or_else(|| {
                            bad(&format!("the window does not fit its input {shape:?}"))
                        })?;
                    let op = Op::MaxPool2d {
                        kernel: p.kernel_size,
                        stride: p.stride,
                        padding: [0, 0],
                        dilation: p.dilation,
                        ceil_mode: p.ceil_mode,
                    };
                    self.push(op, vec![at], name, out)
                }
                SeqLayer::AvgPool2d(p) => {
                    let PaddingConfig2d::Valid = p.padding else {
                        return Err(bad("only valid padding is lowered"));
                    };
                    let out = pooled(&shape, p.kernel_size, p.stride, [1, 1], p.ceil_mode)
                        .ok_or_else(|| {
                            bad(&format!("the window does not fit its input {shape:?}"))
                        })?;
                    let op = Op::AvgPool2d {
                        kernel: p.kernel_size,
                        stride: p.stride,
                        padding: [0, 0],
                        count_include_pad: p.count_include_pad,
                        ceil_mode: p.ceil_mode,
                    };
                    self.push(op, vec![at], name, out)
                }
                SeqLayer::Flatten(_) => {
                    let rest: usize = (1..shape.len()).map(|k| fixed(&shape, k)).product();
                    let out = vec![Dim::Batch(1), Dim::Fixed(rest)];
                    self.push(Op::Reshape { shape: out.clone() }, vec![at], name, out)
                }
                SeqLayer::Relu(_) => self.push(Op::Relu, vec![at], name, shape),
                SeqLayer::Relu6(_) => {
                    self.push(Op::Clamp { min: 0.0, max: 6.0 }, vec![at], name, shape)
                }
                SeqLayer::Dropout(_) => at,
                SeqLayer::Residual(r) => {
                    let body = self.lower(&r.body.layers, &format!("{name}.body.layers"), at)?;
                    if self.nodes[body].shape != shape {
                        return Err(bad("its body changes the shape"));
                    }
                    let add = self.push(Op::Add, vec![at, body], format!("{name}.add"), shape);
                    let act = self.activation(r.add.activation, add, &format!("{name}.add"));
                    self.quant(r.add.output.clone(), act, &format!("{name}.add"))
                }
                _ => {
                    return Err(bad(
                        "an unfused layer: fuse the model (Sequential::fuse) before lowering it",
                    ));
                }
            };
        }
        Ok(at)
    }
}

/// burn-qat's [`Sequential`] as a [`QatGraph`] for inputs of `input_dims` (batch first, any
/// batch size accepted later), sharing its modules (clones of its fused layers and
/// quantizers): the graph computes what the `Sequential` computes, and the integer converter
/// and ONNX writer, which take graphs, serve `Sequential` models too.
///
/// A fused layer's output quantizer becomes a quantizer node after it; a `Residual` becomes
/// its body, an add, its activation and its quantizer; `Dropout` disappears.
///
/// # Errors
///
/// [`QatError::UnsupportedLayer`] naming the layer: unfused `Conv`/`Linear`/`BatchNorm` layers, `Same`
/// padding, pooling with padding, a window that does not fit.
pub fn from_sequential(model: &Sequential, input_dims: &[usize]) -> Result<QatGraph, QatError> {
    if input_dims.len() < 2 || input_dims.contains(&0) {
        return Err(QatError::InvalidConfig {
            field: "input_dims".into(),
            value: format!("{input_dims:?}"),
            allowed: "the full input shape, batch first, no zero sizes".into(),
        });
    }
    let mut l = Lowering {
        layers: Vec::new(),
        nodes: Vec::new(),
    };
    let shape: Vec<Dim> = std::iter::once(Dim::Batch(1))
        .chain(input_dims[1..].iter().map(|d| Dim::Fixed(*d)))
        .collect();
    l.push(Op::Input, vec![], "input".into(), shape);
    let output = l.lower(&model.layers, "layers", 0)?;
    let mut program = Program {
        nodes: l.nodes,
        outputs: vec![output],
        integer_end: None,
    };
    // A fused layer's activation followed by `Relu`/`Relu6` layers: one clamp.
    crate::rewrite::compose_activations(&mut program);
    Ok(crate::rewrite::Editor::new(QatGraph {
        layers: l.layers,
        program,
    })
    .finish())
}
