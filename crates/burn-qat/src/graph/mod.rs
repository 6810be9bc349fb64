//! Graph mode: QAT for any Burn model by recording its forward (Burn's torch.fx).
//!
//! A Burn model is a struct with a Rust `forward`: code, not data. Graph mode records that
//! forward with Burn 0.22.1's capture backend (no kernel runs), lifts the recorded ops into a
//! [`QatGraph`] (a Burn [`Module`] holding the model's own weights and `ParamId`s), and prepares
//! it for QAT the way int8 runtimes will run it: BatchNorm folded into the conv/linear before
//! it, ReLU/ReLU6 fused, weights fake-quantized per output channel, and activation
//! fake-quantizers where TFLite and PyTorch FX put them (graph input; after each conv/linear
//! with its activation, add, mul, concat, average pooling and float activation; none after max
//! pooling, reshape, flatten or permute, which keep their input's grid; an output that only a
//! concat reads is quantized on the concat's grid alone, as TFLite and PyTorch share it).
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::conv::{Conv2d, Conv2dConfig};
//! use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, Relu};
//! use burn::prelude::*;
//! use burn::tensor::Distribution;
//! use burn_qat::graph::{self, QatGraph};
//! use burn_qat::model::QatConfig;
//!
//! // A user's model, written with no thought of QAT.
//! #[derive(Module, Debug)]
//! struct Net { conv: Conv2d, bn: BatchNorm, relu: Relu, fc: Linear }
//! impl Net {
//!     fn forward(&self, x: Tensor<4>) -> Tensor<2> {
//!         let x = self.relu.forward(self.bn.forward(self.conv.forward(x)));
//!         self.fc.forward(x.flatten(1, 3))
//!     }
//! }
//!
//! let device = Device::flex().autodiff();
//! let model = Net {
//!     conv: Conv2dConfig::new([1, 4], [3, 3]).with_bias(false).init(&device),
//!     bn: BatchNormConfig::new(4).init(&device),
//!     relu: Relu::new(),
//!     fc: LinearConfig::new(4 * 6 * 6, 10).init(&device),
//! };
//! let qat: QatGraph =
//!     graph::prepare(&model, &[1, 1, 8, 8], |m: &Net, x: Tensor<4>| m.forward(x), &QatConfig::new())
//!         .unwrap();
//! println!("{}", qat.plan()); // input quant, conv+bn+relu (folded), fc, output quant
//! let logits: Tensor<2> = qat.forward(Tensor::<4>::random([3, 1, 8, 8], Distribution::Default, &device)); // any batch
//! assert_eq!(logits.dims(), [3, 10]); // (training on autodiff also calibrates the quantizers)
//!
//! // Deploy: an integer model (input shape from the trace), its file, ONNX.
//! let int8 = burn_qat::export::convert(&qat.valid()).unwrap();
//! let (out, shape) = int8.forward(&[0.5; 2 * 64]).unwrap(); // two images
//! assert_eq!((out.len(), shape), (20, vec![2, 10]));
//! let proto = burn_qat::onnx::to_model_proto(&int8, &Default::default()).unwrap();
//! # let _ = proto;
//! let back: Net = qat.write_back(model).unwrap(); // trained weights in the user's type
//! # let _ = back;
//! ```
//!
//! Supported ops: Conv1d, Conv2d (groups, depthwise, stride, padding, dilation, with or without
//! bias), Linear (any input rank), raw `Param`s read as data (position embeddings), BatchNorm,
//! LayerNorm, ReLU, ReLU6 and clamps, leaky ReLU, GELU,
//! sigmoid, tanh, hard sigmoid, hard swish, SiLU, softmax, exp, abs, max/avg pooling (1-D and 2-D),
//! adaptive average pooling, nearest and bilinear resizing (`interpolate`), add, sub, mul, div
//! (of two tensors or by a scalar), matmul of two activations, concat,
//! reshape/flatten/squeeze/unsqueeze, swap_dims/permute, mean and sum along an axis. Anything
//! else is an error naming the op, the nearest layer and what to do. Division of two tensors
//! has no integer kernel: [`prepare`] refuses it unless it comes after the end
//! of the integer model ([`QatConfig::with_integer_until`]: a float tail, no fake-quant, left
//! in your code at deployment); [`build`] (float graphs) takes them anywhere.

mod prepare;

use std::collections::HashMap;

use burn::module::Module;
use burn::prelude::*;
use burn_qat_core::QatError;

pub use burn_qat_graph::*;

use crate::model::QatConfig;

/// Records the model's forward and prepares it for QAT following `config`: BatchNorm folded
/// (`config.bn_fold`), activations fused, weights fake-quantized as [`plan`](fn@crate::model::plan) decides for the
/// model's own parameter paths (per output channel on the axis the graph uses the weight on),
/// activation fake-quant placed as TFLite/PyTorch FX do (`config.activations` and
/// `config.activation_rules`). The graph lives on the model's device (autodiff included),
/// ready to train; skipped layers keep float weights and a float output.
///
/// # Errors
///
/// See [`build`] and [`plan`](fn@crate::model::plan); invalid activation settings or an activation pattern that
/// matches no node; an op the integer model cannot compute before its end (division of two
/// tensors, constants, average pooling in ceil mode: the error names the call, the module and the
/// `QatConfig::with_integer_until` to declare instead); an `integer_until` that names no node
/// or several.
pub fn prepare<M, const DI: usize, const DO: usize, F>(
    model: &M,
    input_dims: &[usize],
    forward: F,
    config: &QatConfig,
) -> Result<QatGraph, QatError>
where
    M: Module,
    F: Fn(&M, Tensor<DI>) -> Tensor<DO>,
{
    prepare_many(model, &[input_dims], forward, config)
}

/// [`prepare`] for a forward with several inputs or outputs ([`trace_many`]): the inputs as one
/// tensor or a tuple (shapes in `input_dims`, one per input, batch first), the outputs likewise.
/// Every output is quantized where it is computed; the integer model ([`convert`]) takes the
/// same inputs and returns every output ([`IntegerModel::forward_many`], one ONNX graph
/// input and output each), unless `config` ends it earlier
/// ([`QatConfig::with_integer_until`], one end).
///
/// [`convert`]: crate::export::convert
/// [`IntegerModel::forward_many`]: crate::runtime::IntegerModel::forward_many
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig, Relu};
/// use burn::prelude::*;
/// use burn_qat::graph::{self, QatGraph};
/// use burn_qat::model::QatConfig;
///
/// // Image features and metadata in; class logits and a regression out.
/// #[derive(Module, Debug)]
/// struct Net { image: Linear, meta: Linear, relu: Relu, cls: Linear, reg: Linear }
/// impl Net {
///     fn forward(&self, x: Tensor<2>, meta: Tensor<2>) -> (Tensor<2>, Tensor<2>) {
///         let h = self.relu.forward(self.image.forward(x) + self.meta.forward(meta));
///         (self.cls.forward(h.clone()), self.reg.forward(h))
///     }
/// }
///
/// let device = Device::flex().autodiff();
/// let model = Net {
///     image: LinearConfig::new(16, 8).init(&device),
///     meta: LinearConfig::new(3, 8).init(&device),
///     relu: Relu::new(),
///     cls: LinearConfig::new(8, 10).init(&device),
///     reg: LinearConfig::new(8, 1).init(&device),
/// };
/// let run = |m: &Net, (x, meta): (Tensor<2>, Tensor<2>)| m.forward(x, meta);
/// let qat: QatGraph = graph::prepare_many(&model, &[&[1, 16], &[1, 3]], run, &QatConfig::new()).unwrap();
/// let (logits, reg): (Tensor<2>, Tensor<2>) =
///     qat.forward_many((Tensor::<2>::ones([4, 16], &device), Tensor::<2>::ones([4, 3], &device)));
/// assert_eq!((logits.dims(), reg.dims()), ([4, 10], [4, 1]));
///
/// let int8 = burn_qat::export::convert(&qat.valid()).unwrap();
/// let outs = int8.forward_many(&[&[1.0; 2 * 16], &[1.0; 2 * 3]]).unwrap(); // batch 2
/// assert_eq!((outs[0].1.clone(), outs[1].1.clone()), (vec![2, 10], vec![2, 1]));
/// ```
///
/// # Errors
///
/// As [`prepare`] and [`trace_many`]; also an `integer_until` that leaves an output inside the
/// integer model.
pub fn prepare_many<M, I, O, F>(
    model: &M,
    input_dims: &[&[usize]],
    forward: F,
    config: &QatConfig,
) -> Result<QatGraph, QatError>
where
    M: Module,
    I: GraphIo,
    O: GraphIo,
    F: Fn(&M, I) -> O,
{
    // A model already wrapped by `quantize` prepares as its float model: its weight
    // quantizers are marked ops the float graph reads through (graph mode places its own).
    let planned = crate::model::plan::plan_with(model, config, true)?;
    let trace = trace_many(model, input_dims, forward)?;
    let device = model_device(model);
    let float = lift(&trace, &device)?;
    let by_path: HashMap<&str, &crate::model::PlannedParam> =
        planned.iter().map(|p| (p.path.as_str(), p)).collect();
    let by_id = trace
        .params
        .values()
        .filter_map(|p| by_path.get(p.path.as_str()).map(|e| (p.id, (*e).clone())))
        .collect();
    prepare::prepare_graph(float, &by_id, config, &device)
}

/// [`model::summary`](crate::model::summary) of a graph, with *your* module paths: the graph's
/// own paths (`layers.3.Linear.layer.weight`, `layers.4.Quant.Observed`) become the names of the
/// nodes that use those layers (`fc1.weight`, `fc1/output`), as in [`QatGraph::plan`].
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::prelude::*;
/// use burn_qat::graph;
/// use burn_qat::model::QatConfig;
///
/// #[derive(Module, Debug)]
/// struct Net { encoder: Linear, head: Linear }
///
/// let device = Device::flex().autodiff();
/// let net = Net { encoder: LinearConfig::new(4, 8).init(&device), head: LinearConfig::new(8, 2).init(&device) };
/// let run = |m: &Net, x: Tensor<2>| m.head.forward(m.encoder.forward(x));
/// let g = graph::prepare(&net, &[1, 4], run, &QatConfig::new()).unwrap();
/// let report = graph::summary(&g);
/// let paths: Vec<&str> = report.layers.iter().map(|l| l.path.as_str()).collect();
/// assert_eq!(paths, ["encoder.weight", "head.weight"]);
/// ```
pub fn summary(graph: &QatGraph) -> crate::model::QatSummary {
    let names: HashMap<usize, &str> = graph
        .program
        .nodes
        .iter()
        .filter_map(|n| match n.op {
            Op::Layer { index, .. } => Some((index, n.name.as_str())),
            _ => None,
        })
        .collect();
    // `layers.<index>.<variant>[.<rest>]` -> `<name>[.<rest>]`, the fused layer's own `layer.`
    // level dropped (`.layer.weight` -> `.weight`).
    let rename = |path: &str| -> String {
        let mut parts = path.splitn(4, '.');
        let (Some("layers"), Some(index), Some(_variant)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return path.to_string();
        };
        let Some(name) = index.parse::<usize>().ok().and_then(|i| names.get(&i)) else {
            return path.to_string();
        };
        match parts.next() {
            None | Some("Observed") | Some("Learned") => name.to_string(),
            Some(rest) => {
                let layer = format!("{}.", burn_qat_transform::Fused::<()>::LAYER);
                format!("{name}.{}", rest.strip_prefix(&layer).unwrap_or(rest))
            }
        }
    };
    let mut report = crate::model::summary(graph);
    for l in &mut report.layers {
        l.path = rename(&l.path);
    }
    for a in &mut report.activations {
        a.path = rename(&a.path);
    }
    report
}
