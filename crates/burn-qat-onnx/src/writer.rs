use std::path::Path;

use burn_qat_export::model::{ActQ, IntConv2d, IntLayer, IntLinear, IntegerModel, Output};
use prost::Message;
use thiserror::Error;

use crate::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

/// Export settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnnxOptions {
    /// The ONNX opset: 13 (default) or 21.
    pub opset: i64,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        Self { opset: 13 }
    }
}

/// Why a model cannot be exported.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// An unsupported option.
    #[error("invalid ONNX export option: `opset` is {0}, allowed: 13 or 21")]
    Opset(i64),
    /// Conversion to the integer model failed (it names the module path).
    #[error(transparent)]
    Convert(#[from] burn_qat_export::ExportError),
    /// The integer model is inconsistent (its layers do not fit together).
    #[error("{0}")]
    Invalid(String),
    /// Writing the file failed; nothing is left at the output path.
    #[error("writing {path}: {source}")]
    Io {
        /// The output path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    count: usize,
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

impl Graph {
    fn name(&mut self, base: &str) -> String {
        self.count += 1;
        format!("{base}_{}", self.count)
    }

    fn init(&mut self, base: &str, dtype: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        let name = self.name(base);
        self.inits.push(TensorProto {
            name: Some(name.clone()),
            data_type: Some(dtype as i32),
            dims: dims.iter().map(|d| *d as i64).collect(),
            raw_data: Some(raw),
            ..Default::default()
        });
        name
    }

    fn f32s(&mut self, base: &str, dims: &[usize], v: &[f32]) -> String {
        self.init(
            base,
            DataType::Float,
            dims,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn i8s(&mut self, base: &str, dims: &[usize], v: &[i8]) -> String {
        self.init(
            base,
            DataType::Int8,
            dims,
            v.iter().map(|x| *x as u8).collect(),
        )
    }

    fn i32s(&mut self, base: &str, dims: &[usize], v: &[i32]) -> String {
        self.init(
            base,
            DataType::Int32,
            dims,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<AttributeProto>) -> String {
        let out = self.name(&op.to_lowercase());
        let name = self.name(op);
        self.nodes.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input: inputs,
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    /// Quantize then dequantize `x` with `q` (per tensor): the activation edge. A grid
    /// narrower than int8 (fewer bits) says so in the `QuantizeLinear` node's doc string.
    fn qdq(&mut self, x: String, q: &ActQ) -> String {
        let s = self.f32s("scale", &[], &[q.scale]);
        let z = self.i8s("zero_point", &[], &[q.zero_point as i8]);
        let xq = self.node("QuantizeLinear", vec![x, s.clone(), z.clone()], vec![]);
        if (q.qmin, q.qmax) != (-128, 127)
            && let Some(node) = self.nodes.last_mut()
        {
            node.doc_string = Some(format!(
                "{}-bit values in an int8 container: [{}, {}]",
                q.bits(),
                q.qmin,
                q.qmax
            ));
        }
        self.node("DequantizeLinear", vec![xq, s, z], vec![])
    }

    /// Per-channel dequantized weight and bias initializers.
    fn weights(
        &mut self,
        w: &[i8],
        dims: &[usize],
        scale: &[f32],
        bias: &[i32],
        input: &ActQ,
        axis: i64,
    ) -> (String, String) {
        let c = scale.len();
        let wq = self.i8s("weight_q", dims, w);
        let ws = self.f32s("weight_scale", &[c], scale);
        let wz = self.i8s("weight_zero_point", &[c], &vec![0; c]);
        let wd = self.node(
            "DequantizeLinear",
            vec![wq, ws, wz],
            vec![attr_int("axis", axis)],
        );
        let bq = self.i32s("bias_q", &[c], bias);
        let bscale: Vec<f32> = scale.iter().map(|s| input.scale * s).collect();
        let bs = self.f32s("bias_scale", &[c], &bscale);
        let bz = self.i32s("bias_zero_point", &[c], &vec![0; c]);
        let bd = self.node(
            "DequantizeLinear",
            vec![bq, bs, bz],
            vec![attr_int("axis", 0)],
        );
        (wd, bd)
    }

    /// The fused activation as float bounds, then the output edge.
    fn finish(&mut self, y: String, output: &Output) -> String {
        match output {
            Output::Quantized { act, lo, hi, .. } => {
                let y = self.clip_int(y, *lo, *hi, act);
                self.qdq(y, act)
            }
            Output::Float { lo, hi, .. } => {
                let lower = lo.is_finite().then_some(*lo);
                let upper = hi.is_finite().then_some(*hi);
                self.clip(y, lower, upper)
            }
        }
    }

    /// The integer clamp `[lo, hi]` on the grid of `act` as a float `Relu`/`Clip` (nothing where
    /// a bound is int8's own: `QuantizeLinear` saturates there; sub-8-bit grids are clipped).
    fn clip_int(&mut self, y: String, lo: i32, hi: i32, act: &ActQ) -> String {
        let lower = (lo > -128).then(|| (lo - act.zero_point) as f32 * act.scale);
        let upper = (hi < 127).then(|| (hi - act.zero_point) as f32 * act.scale);
        self.clip(y, lower, upper)
    }

    fn clip(&mut self, y: String, lower: Option<f32>, upper: Option<f32>) -> String {
        match (lower, upper) {
            (None, None) => y,
            (Some(l), None) if l == 0.0 => self.node("Relu", vec![y], vec![]),
            (l, u) => {
                let l = self.f32s("clip_min", &[], &[l.unwrap_or(f32::MIN)]);
                let u = self.f32s("clip_max", &[], &[u.unwrap_or(f32::MAX)]);
                self.node("Clip", vec![y, l, u], vec![])
            }
        }
    }

    fn conv(&mut self, x: String, c: &IntConv2d, one_d: bool) -> String {
        let kin = c.in_channels / c.groups;
        let (dims, kernel, strides, pads, dilations): (
            Vec<usize>,
            Vec<i64>,
            Vec<i64>,
            Vec<i64>,
            Vec<i64>,
        ) = if one_d {
            (
                vec![c.out_channels, kin, c.kernel[1]],
                vec![c.kernel[1] as i64],
                vec![c.stride[1] as i64],
                vec![c.padding[2] as i64, c.padding[3] as i64],
                vec![c.dilation[1] as i64],
            )
        } else {
            (
                vec![c.out_channels, kin, c.kernel[0], c.kernel[1]],
                c.kernel.iter().map(|v| *v as i64).collect(),
                c.stride.iter().map(|v| *v as i64).collect(),
                // ONNX: [top, left, bottom, right]
                vec![
                    c.padding[0] as i64,
                    c.padding[2] as i64,
                    c.padding[1] as i64,
                    c.padding[3] as i64,
                ],
                c.dilation.iter().map(|v| *v as i64).collect(),
            )
        };
        let (w, b) = self.weights(&c.weight, &dims, &c.weight_scale, &c.bias, &c.input, 0);
        let y = self.node(
            "Conv",
            vec![x, w, b],
            vec![
                attr_ints("kernel_shape", &kernel),
                attr_ints("strides", &strides),
                attr_ints("pads", &pads),
                attr_ints("dilations", &dilations),
                attr_int("group", c.groups as i64),
            ],
        );
        self.finish(y, &c.output)
    }

    fn linear(&mut self, x: String, l: &IntLinear) -> String {
        let (w, b) = self.weights(
            &l.weight,
            &[l.in_features, l.out_features],
            &l.weight_scale,
            &l.bias,
            &l.input,
            1,
        );
        let y = self.node("Gemm", vec![x, w, b], vec![]);
        self.finish(y, &l.output)
    }

    /// Returns the output name, the output's quantization (if quantized) and its shape.
    fn layers(
        &mut self,
        mut x: String,
        layers: &[IntLayer],
        mut q: Option<ActQ>,
        mut shape: Vec<usize>,
    ) -> (String, Option<ActQ>, Vec<usize>) {
        for layer in layers {
            let next = layer.output_shape(&shape).expect("the model was validated");
            match layer {
                IntLayer::Quantize(a) => {
                    x = self.clip_int(x, a.qmin, a.qmax, a);
                    x = self.qdq(x, a);
                    q = Some(*a);
                }
                IntLayer::Conv2d(c) => {
                    x = self.conv(x, c, shape.len() == 2);
                    q = c.output.act();
                }
                IntLayer::Linear(l) => {
                    x = self.linear(x, l);
                    q = l.output.act();
                }
                IntLayer::MaxPool2d { kernel, stride } | IntLayer::AvgPool2d { kernel, stride } => {
                    let op = if matches!(layer, IntLayer::MaxPool2d { .. }) {
                        "MaxPool"
                    } else {
                        "AveragePool"
                    };
                    let k: Vec<i64> = kernel.iter().map(|v| *v as i64).collect();
                    let s: Vec<i64> = stride.iter().map(|v| *v as i64).collect();
                    x = self.node(
                        op,
                        vec![x],
                        vec![attr_ints("kernel_shape", &k), attr_ints("strides", &s)],
                    );
                    if let Some(a) = &q {
                        x = self.qdq(x, a);
                    }
                }
                IntLayer::Clamp { lo, hi } => {
                    if let Some(a) = q {
                        x = self.clip_int(x, *lo, *hi, &a);
                        x = self.qdq(x, &a);
                    }
                }
                IntLayer::Flatten => {
                    x = self.node("Flatten", vec![x], vec![attr_int("axis", 1)]);
                    if let Some(a) = &q {
                        x = self.qdq(x, a);
                    }
                }
                IntLayer::Residual { body, add } => {
                    let (b, _, _) = self.layers(x.clone(), body, q, shape.clone());
                    let y = self.node("Add", vec![x, b], vec![]);
                    let y = self.clip_int(y, add.lo, add.hi, &add.out);
                    x = self.qdq(y, &add.out);
                    q = Some(add.out);
                }
            }
            shape = next;
        }
        (x, q, shape)
    }
}

fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(v) => tensor_shape_proto::dimension::Value::DimValue(*v as i64),
                None => tensor_shape_proto::dimension::Value::DimParam("N".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ONNX model (QDQ form) of `model`.
///
/// # Errors
///
/// An opset other than 13 or 21.
pub fn to_model_proto(
    model: &IntegerModel,
    options: &OnnxOptions,
) -> Result<ModelProto, OnnxError> {
    if options.opset != 13 && options.opset != 21 {
        return Err(OnnxError::Opset(options.opset));
    }
    burn_qat_export::format::validate(model).map_err(|e| OnnxError::Invalid(e.to_string()))?;
    let mut g = Graph::default();
    let (out, _, shape) = g.layers(
        "input".into(),
        &model.layers,
        None,
        model.input_shape.clone(),
    );
    let identity = NodeProto {
        name: Some("output".into()),
        op_type: Some("Identity".into()),
        input: vec![out],
        output: vec!["logits".into()],
        ..Default::default()
    };
    g.nodes.push(identity);
    let mut input_dims = vec![None];
    input_dims.extend(model.input_shape.iter().map(|d| Some(*d)));
    let mut output_dims = vec![None];
    output_dims.extend(shape.iter().map(|d| Some(*d)));
    Ok(ModelProto {
        ir_version: Some(if options.opset >= 21 { 10 } else { 7 }),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(options.opset),
        }],
        producer_name: Some("burn-qat".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        metadata_props: vec![StringStringEntryProto {
            key: Some("burn_qat.precision".into()),
            value: Some(model.precision().join("\n")),
        }],
        graph: Some(GraphProto {
            name: Some("burn_qat_model".into()),
            node: g.nodes,
            initializer: g.inits,
            input: vec![value_info("input", &input_dims)],
            output: vec![value_info("logits", &output_dims)],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Writes `model` as ONNX to `path` (through a temporary file: a failure leaves nothing
/// half-written at `path`).
pub fn save(model: &IntegerModel, path: &Path, options: &OnnxOptions) -> Result<(), OnnxError> {
    let bytes = to_model_proto(model, options)?.encode_to_vec();
    let io = |source| OnnxError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("onnx.part");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Decodes ONNX model bytes (to inspect an exported file).
pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}
