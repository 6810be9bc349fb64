//! Conversion of a trained QAT [`Sequential`] into an [`IntegerModel`].

use burn::nn::{PaddingConfig1d, PaddingConfig2d};
use burn_qat_core::{QParams, QuantSpec, reference};
use burn_qat_nn::{ActQuant, FakeQuant};
use burn_qat_transform::{Activation, Fusable, Fused, SeqLayer, Sequential, fold};
use thiserror::Error;

use crate::model::{ActQ, IntConv2d, IntLayer, IntLinear, IntegerModel, Output};
use crate::requant::FixedMultiplier;

/// Why a model cannot become an integer model; each names the module path.
#[derive(Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum ExportError {
    /// A layer kind with no integer implementation.
    #[error("`{path}` ({kind}) cannot be converted to integers: {hint}")]
    Unsupported {
        /// Module path, e.g. `layers.3`.
        path: String,
        /// The layer kind.
        kind: String,
        /// What to do.
        hint: String,
    },
    /// A value that the integer format cannot represent.
    #[error("`{path}`: {what}")]
    NotRepresentable {
        /// Module path.
        path: String,
        /// What overflowed.
        what: String,
    },
}

fn act_of(fq: &FakeQuant, path: &str) -> Result<ActQ, ExportError> {
    act_of_grid(fq.spec, fq.qparams().map(|q| (fq.spec, q)), path)
}

/// The 8-bit container form of an activation grid: sub-8-bit grids keep their narrower
/// `[qmin, qmax]`, unsigned grids move down by 128 (zero point included).
fn act_of_grid(
    configured: QuantSpec,
    grid: Option<(QuantSpec, Vec<QParams>)>,
    path: &str,
) -> Result<ActQ, ExportError> {
    if configured.axis().is_some() {
        return Err(ExportError::Unsupported {
            path: path.into(),
            kind: "per-channel FakeQuant".into(),
            hint: "activations must be quantized per tensor".into(),
        });
    }
    if configured.bits > 8 {
        return Err(ExportError::Unsupported {
            path: path.into(),
            kind: format!("{}-bit FakeQuant", configured.bits),
            hint: "the integer model keeps activations in 8-bit containers: use at most 8 bits"
                .into(),
        });
    }
    let Some((spec, qps)) = grid else {
        return Err(ExportError::Unsupported {
            path: path.into(),
            kind: "FakeQuant".into(),
            hint: "its observer has seen no data: train (or calibrate) before converting".into(),
        });
    };
    let qp = qps[0];
    // Shift unsigned grids into i8 containers: q - 128 with zero point - 128.
    let shift = if spec.signed { 0 } else { 128 };
    Ok(ActQ {
        scale: qp.scale,
        zero_point: qp.zero_point - shift,
        qmin: spec.qmin() - shift,
        qmax: spec.qmax() - shift,
    })
}

fn act_of_quant(fq: &ActQuant, path: &str) -> Result<ActQ, ExportError> {
    act_of_grid(fq.spec(), fq.grid(), path)
}

struct Affine {
    weight: Vec<i8>,
    weight_bits: u32,
    weight_scale: Vec<f32>,
    bias: Vec<i32>,
}

/// Folded, quantized weights (output channel along `axis`) and int32 bias with scale `s_in * s_w`.
fn quantize_affine<L, const DI: usize, const DW: usize>(
    f: &Fused<L>,
    input: &ActQ,
    path: &str,
) -> Result<(Affine, Vec<usize>), ExportError>
where
    L: Fusable<DI, DW>,
{
    let Some(wq) = &f.weight_quant else {
        return Err(ExportError::Unsupported {
            path: path.into(),
            kind: "Fused layer with float weights".into(),
            hint: "give it a weight spec (FusedConfig::with_weight)".into(),
        });
    };
    let spec: QuantSpec = wq.spec;
    if spec.bits > 8 || !spec.symmetric || !spec.signed {
        return Err(ExportError::Unsupported {
            path: path.into(),
            kind: format!(
                "{}-bit weights (symmetric: {}, signed: {})",
                spec.bits, spec.symmetric, spec.signed
            ),
            hint: "the integer model takes signed symmetric weights of at most 8 bits".into(),
        });
    }
    let (w, b) = match &f.bn {
        Some(bn) => {
            let (w, b) = fold::fold_params(f.layer.weight(), f.layer.bias(), bn, L::WEIGHT_AXIS);
            (w, Some(b))
        }
        None => (f.layer.weight(), f.layer.bias()),
    };
    let dims = w.dims().to_vec();
    let qps: Vec<QParams> = wq.qparams_for(w.clone());
    let values = w
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let channels = dims[L::WEIGHT_AXIS];
    let after: usize = dims[L::WEIGHT_AXIS + 1..].iter().product();
    let channel_of = |i: usize| {
        if qps.len() == 1 {
            0
        } else {
            (i / after) % channels
        }
    };
    let weight: Vec<i8> = values
        .iter()
        .enumerate()
        .map(|(i, v)| reference::quantize(*v, qps[channel_of(i)], &spec) as i8)
        .collect();
    let weight_scale: Vec<f32> = (0..channels)
        .map(|c| qps[if qps.len() == 1 { 0 } else { c }].scale)
        .collect();
    let bias_f: Vec<f32> = match b {
        Some(b) => b
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default(),
        None => vec![0.0; channels],
    };
    let mut bias = Vec::with_capacity(channels);
    for c in 0..channels {
        let s = input.scale as f64 * weight_scale[c] as f64;
        let q = (bias_f[c] as f64 / s).round_ties_even();
        if !q.is_finite() || q.abs() > i32::MAX as f64 {
            return Err(ExportError::NotRepresentable {
                path: path.into(),
                what: format!(
                    "bias {} of channel {c} is {q:.3e} in units of s_in * s_w = {s:.3e}: it overflows int32",
                    bias_f[c]
                ),
            });
        }
        bias.push(q as i32);
    }
    Ok((
        Affine {
            weight,
            weight_bits: spec.bits,
            weight_scale,
            bias,
        },
        dims,
    ))
}

fn output(
    f_output: Option<&ActQuant>,
    activation: Activation,
    input: &ActQ,
    weight_scale: &[f32],
    path: &str,
) -> Result<Output, ExportError> {
    match f_output {
        Some(fq) => {
            let act = act_of_quant(fq, &format!("{path}.output"))?;
            let (lo, hi) = clamp_bounds(activation, &act);
            let requant = weight_scale
                .iter()
                .map(|sw| FixedMultiplier::new(input.scale as f64 * *sw as f64 / act.scale as f64))
                .collect();
            Ok(Output::Quantized {
                act,
                requant,
                lo,
                hi,
            })
        }
        None => {
            let (lo, hi) = match activation {
                Activation::Identity => (f32::NEG_INFINITY, f32::INFINITY),
                Activation::Relu => (0.0, f32::INFINITY),
                Activation::Relu6 => (0.0, 6.0),
                Activation::Clamp { min, max } => (min, max),
            };
            Ok(Output::Float {
                scale: weight_scale.iter().map(|sw| input.scale * sw).collect(),
                lo,
                hi,
            })
        }
    }
}

/// Converts a trained QAT model (a [`Sequential`] fused with `Sequential::fuse`, starting with a
/// `FakeQuant` of its input) for inputs of shape `input_shape` (`[c, h, w]`, no batch).
///
/// Supported: `FakeQuant` (first layer), `FusedConv2d` and `FusedLinear` (with or without
/// BatchNorm, any fused activation; int8 per-channel symmetric weights), `FusedConv1d`,
/// `MaxPool2d`, `AvgPool2d` (output on the input's grid, as in TFLite),
/// `Flatten`, `Relu`/`Relu6` on quantized values, `Dropout` (identity), `Residual` blocks
/// (integer `Add` with its fused activation). Anything else is an error naming its path.
pub fn convert(model: &Sequential, input_shape: &[usize]) -> Result<IntegerModel, ExportError> {
    let mut current: Option<ActQ> = None;
    let mut shape: Vec<usize> = input_shape.to_vec();
    let layers = convert_layers(&model.layers, "layers", &mut current, &mut shape, true)?;
    if layers
        .first()
        .is_none_or(|l| !matches!(l, IntLayer::Quantize(_)))
    {
        return Err(ExportError::Unsupported {
            path: "layers.0".into(),
            kind: "model input".into(),
            hint: "start the model with a FakeQuant of its input".into(),
        });
    }
    Ok(IntegerModel {
        input_shape: input_shape.to_vec(),
        layers,
    })
}

fn convert_layers(
    seq: &[SeqLayer],
    prefix: &str,
    current: &mut Option<ActQ>,
    shape: &mut Vec<usize>,
    top: bool,
) -> Result<Vec<IntLayer>, ExportError> {
    let mut layers = Vec::new();
    for (i, layer) in seq.iter().enumerate() {
        let path = format!("{prefix}.{i}");
        let unsupported = |kind: &str, hint: &str| ExportError::Unsupported {
            path: path.clone(),
            kind: kind.into(),
            hint: hint.into(),
        };
        let input = current.ok_or_else(|| {
            unsupported(
                &layer.name(),
                "its input is not quantized: start the model with a FakeQuant of its input",
            )
        });
        let int = match layer {
            SeqLayer::FakeQuant(fq) if current.is_none() => IntLayer::Quantize(act_of(fq, &path)?),
            SeqLayer::FakeQuant(_) => {
                return Err(unsupported(
                    "FakeQuant",
                    "a FakeQuant between layers (requantization) is not supported; \
                     quantize outputs through the fused layers",
                ));
            }
            SeqLayer::FusedConv2d(f) => {
                let conv = &f.layer;
                let padding = match conv.padding {
                    PaddingConfig2d::Valid => [0; 4],
                    PaddingConfig2d::Explicit(top, left, bottom, right) => {
                        [top, bottom, left, right]
                    }
                    PaddingConfig2d::Same => {
                        return Err(unsupported(
                            "Conv2d with Same padding",
                            "use PaddingConfig2d::Explicit",
                        ));
                    }
                };
                let geometry = (
                    [conv.stride[0], conv.stride[1]],
                    [conv.dilation[0], conv.dilation[1]],
                );
                IntLayer::Conv2d(int_conv(
                    f,
                    conv.groups,
                    geometry,
                    padding,
                    4,
                    &input?,
                    &path,
                )?)
            }
            SeqLayer::FusedConv1d(f) => {
                let conv = &f.layer;
                let (left, right) = match conv.padding {
                    PaddingConfig1d::Valid => (0, 0),
                    PaddingConfig1d::Explicit(l, r) => (l, r),
                    PaddingConfig1d::Same => {
                        return Err(unsupported(
                            "Conv1d with Same padding",
                            "use PaddingConfig1d::Explicit",
                        ));
                    }
                };
                let geometry = ([1, conv.stride], [1, conv.dilation]);
                IntLayer::Conv2d(int_conv(
                    f,
                    conv.groups,
                    geometry,
                    [0, 0, left, right],
                    3,
                    &input?,
                    &path,
                )?)
            }
            SeqLayer::FusedLinear(f) => {
                let input = input?;
                let (affine, dims) = quantize_affine(f, &input, &path)?;
                let output = output(
                    f.output.as_ref(),
                    f.activation,
                    &input,
                    &affine.weight_scale,
                    &path,
                )?;
                IntLayer::Linear(IntLinear {
                    in_features: dims[0],
                    out_features: dims[1],
                    weight: affine.weight,
                    weight_bits: affine.weight_bits,
                    weight_scale: affine.weight_scale,
                    bias: affine.bias,
                    input,
                    output,
                    packed: Default::default(),
                })
            }
            SeqLayer::MaxPool2d(p) => {
                input?;
                if !matches!(p.padding, PaddingConfig2d::Valid)
                    || p.dilation != [1, 1]
                    || p.ceil_mode
                {
                    return Err(unsupported(
                        "MaxPool2d with padding, dilation or ceil mode",
                        "use valid padding, dilation 1",
                    ));
                }
                IntLayer::MaxPool2d {
                    kernel: p.kernel_size,
                    stride: p.stride,
                }
            }
            SeqLayer::AvgPool2d(p) => {
                input?;
                if !matches!(p.padding, PaddingConfig2d::Valid) || p.ceil_mode {
                    return Err(unsupported(
                        "AvgPool2d with padding or ceil mode",
                        "use valid padding",
                    ));
                }
                IntLayer::AvgPool2d {
                    kernel: p.kernel_size,
                    stride: p.stride,
                }
            }
            SeqLayer::Flatten(_) => IntLayer::Flatten,
            SeqLayer::Relu(_) | SeqLayer::Relu6(_) => {
                let q = input?;
                let activation = if matches!(layer, SeqLayer::Relu6(_)) {
                    Activation::Relu6
                } else {
                    Activation::Relu
                };
                let (lo, hi) = clamp_bounds(activation, &q);
                IntLayer::Clamp { lo, hi }
            }
            SeqLayer::Residual(r) => {
                let a = input?;
                let mut inner = Some(a);
                let mut body_shape = shape.clone();
                let body = convert_layers(
                    &r.body.layers,
                    &format!("{path}.body.layers"),
                    &mut inner,
                    &mut body_shape,
                    false,
                )?;
                let Some(b) = inner else {
                    return Err(unsupported(
                        "Residual",
                        "its body must end with a quantized output",
                    ));
                };
                let Some(fq) = &r.add.output else {
                    return Err(unsupported(
                        "Residual without output FakeQuant",
                        "fuse the model (Sequential::fuse) so the add is quantized",
                    ));
                };
                let out = act_of_quant(fq, &format!("{path}.add.output"))?;
                const SHIFT: u32 = 40;
                let fixed = |s: f32| {
                    let m = (s as f64 / out.scale as f64 * (1u64 << SHIFT) as f64).round();
                    if m.abs() < i64::MAX as f64 / 512.0 {
                        Ok(m as i64)
                    } else {
                        Err(ExportError::NotRepresentable {
                            path: path.clone(),
                            what: format!(
                                "add input scale {s} is {} times its output scale",
                                s / out.scale
                            ),
                        })
                    }
                };
                let (lo, hi) = clamp_bounds(r.add.activation, &out);
                let add = crate::model::IntAdd {
                    a,
                    b,
                    out,
                    ma: fixed(a.scale)?,
                    mb: fixed(b.scale)?,
                    shift: SHIFT,
                    lo,
                    hi,
                };
                IntLayer::Residual { body, add }
            }
            SeqLayer::Dropout(_) => continue,
            other => {
                let kind = match other {
                    SeqLayer::Conv1d(_)
                    | SeqLayer::Conv2d(_)
                    | SeqLayer::Linear(_)
                    | SeqLayer::BatchNorm(_) => "an unfused layer",
                    _ => "a layer without an integer kernel",
                };
                return Err(unsupported(
                    &other.name(),
                    &format!("{kind}: fuse the model (Sequential::fuse) before QAT and conversion"),
                ));
            }
        };
        let Some(next) = int.output_shape(shape) else {
            return Err(unsupported(
                &layer.name(),
                &format!("it does not accept its input of shape {shape:?}"),
            ));
        };
        *shape = next;
        *current = match &int {
            IntLayer::Quantize(q) => Some(*q),
            IntLayer::Conv2d(IntConv2d { output, .. })
            | IntLayer::Linear(IntLinear { output, .. }) => output.act(),
            IntLayer::Residual { add, .. } => Some(add.out),
            _ => *current,
        };
        if current.is_none() && !(top && i + 1 == seq.len()) {
            return Err(unsupported(
                &format!("{} without output FakeQuant", layer.name()),
                "only the last layer of the model may output float",
            ));
        }
        layers.push(int);
    }
    Ok(layers)
}

/// The integer convolution of a fused `Conv1d` (`weight_rank` 3, run as a convolution of height 1)
/// or `Conv2d` (`weight_rank` 4).
fn int_conv<L, const DI: usize, const DW: usize>(
    f: &Fused<L>,
    groups: usize,
    (stride, dilation): ([usize; 2], [usize; 2]),
    padding: [usize; 4],
    weight_rank: usize,
    input: &ActQ,
    path: &str,
) -> Result<IntConv2d, ExportError>
where
    L: Fusable<DI, DW>,
{
    let (affine, dims) = quantize_affine(f, input, path)?;
    let output = output(
        f.output.as_ref(),
        f.activation,
        input,
        &affine.weight_scale,
        path,
    )?;
    let kernel = if weight_rank == 3 {
        [1, dims[2]]
    } else {
        [dims[2], dims[3]]
    };
    Ok(IntConv2d {
        in_channels: dims[1] * groups,
        out_channels: dims[0],
        groups,
        kernel,
        stride,
        dilation,
        padding,
        weight: affine.weight,
        weight_bits: affine.weight_bits,
        weight_scale: affine.weight_scale,
        bias: affine.bias,
        input: *input,
        output,
        packed: Default::default(),
    })
}

/// The integer clamp of a fused activation on the grid of `act` (ReLU: `lo = zero_point`).
fn clamp_bounds(activation: Activation, act: &ActQ) -> (i32, i32) {
    let q = |v: f32| {
        reference::quantize(
            v,
            act.qparams(),
            &QuantSpec::int8_act_per_tensor_asymmetric().with_bits(16),
        )
    };
    match activation {
        Activation::Identity => (act.qmin, act.qmax),
        Activation::Relu => (act.zero_point.max(act.qmin), act.qmax),
        Activation::Relu6 => (act.zero_point.max(act.qmin), q(6.0).min(act.qmax)),
        Activation::Clamp { min, max } => (q(min).max(act.qmin), q(max).min(act.qmax)),
    }
}
