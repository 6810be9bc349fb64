use std::collections::BTreeMap;
use std::fmt;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn_qat_core::{QatError, QuantSpec};

use super::plan::{QatConfig, plan_with};

/// One weight of the model: how it is quantized and its current range.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSummary {
    /// Dotted parameter path.
    pub path: String,
    /// The owning layer type.
    pub layer_type: String,
    /// Parameter dimensions.
    pub dims: Vec<usize>,
    /// The spec, or `None` if the weight stays float.
    pub spec: Option<QuantSpec>,
    /// Why.
    pub reason: String,
    /// Current min and max of the float weight.
    pub range: (f32, f32),
}

/// One activation quantizer ([`FakeQuant`](crate::FakeQuant)) of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationSummary {
    /// Dotted module path of the quantizer.
    pub path: String,
    /// Its spec, read from the recorded state.
    pub spec: Option<QuantSpec>,
    /// Observed range (min over channels, max over channels), `None` before any observation.
    pub range: Option<(f32, f32)>,
}

/// What is quantized how: per weight and per activation quantizer.
#[derive(Clone, Debug, PartialEq)]
pub struct QatSummary {
    /// Weights (parameters of rank >= 2).
    pub layers: Vec<LayerSummary>,
    /// Activation quantizers.
    pub activations: Vec<ActivationSummary>,
}

fn describe(spec: &Option<QuantSpec>) -> String {
    match spec {
        None => "float".to_string(),
        Some(s) => format!(
            "{}-bit {} {}{}{}",
            s.bits,
            if s.signed { "signed" } else { "unsigned" },
            if s.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            if s.narrow_range { " narrow" } else { "" },
            match s.axis() {
                Some(a) => format!(" per-channel(axis {a})"),
                None => " per-tensor".to_string(),
            }
        ),
    }
}

impl fmt::Display for QatSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<28} {:<10} {:<14} {:<48} {:>22}  reason",
            "weight", "layer", "shape", "quantization", "range"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "{:<28} {:<10} {:<14} {:<48} {:>22}  {}",
                l.path,
                l.layer_type,
                format!("{:?}", l.dims),
                describe(&l.spec),
                format!("[{:.4}, {:.4}]", l.range.0, l.range.1),
                l.reason
            )?;
        }
        if !self.activations.is_empty() {
            writeln!(
                f,
                "{:<28} {:<48} {:>22}",
                "activation", "quantization", "observed range"
            )?;
            for a in &self.activations {
                let range = a.range.map_or("not observed".to_string(), |(lo, hi)| {
                    format!("[{lo:.4}, {hi:.4}]")
                });
                writeln!(f, "{:<28} {:<48} {:>22}", a.path, describe(&a.spec), range)?;
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Ranges {
    stack: Vec<(String, String)>,
    weights: BTreeMap<String, (f32, f32)>,
    fq: BTreeMap<String, BTreeMap<String, Vec<f32>>>,
}

fn read<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

impl ModuleVisitor for Ranges {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path: Vec<&str> = self.stack.iter().map(|(n, _)| n.as_str()).collect();
        if let Some((field, container)) = self.stack.last()
            && container == "Struct:FakeQuant"
        {
            let module = path[..path.len() - 1].join(".");
            self.fq
                .entry(module)
                .or_default()
                .insert(field.clone(), read(param.val()));
            return;
        }
        if D >= 2 && !self.stack.iter().any(|(_, c)| c == "Reparameterization") {
            let v = param.val().detach();
            let lo = v.clone().min().into_scalar::<f32>();
            let hi = v.max().into_scalar::<f32>();
            self.weights.insert(path.join("."), (lo, hi));
        }
    }
}

/// Summarizes what `config` quantizes in `model` (quantized already or not) and the current
/// ranges: weights from their values, activations from their observers. `Display` prints a
/// table.
///
/// # Errors
///
/// Those of [`plan`](super::plan), except that an already quantized model is accepted.
pub fn summary<M: Module>(model: &M, config: &QatConfig) -> Result<QatSummary, QatError> {
    let planned = plan_with(model, config, true)?;
    let mut ranges = Ranges::default();
    model.visit(&mut ranges);
    let layers = planned
        .into_iter()
        .filter(|p| p.dims.len() >= 2)
        .map(|p| LayerSummary {
            range: ranges.weights.get(&p.path).copied().unwrap_or((0.0, 0.0)),
            path: p.path,
            layer_type: p.layer_type,
            dims: p.dims,
            spec: p.spec,
            reason: p.reason,
        })
        .collect();
    let activations = ranges
        .fq
        .into_iter()
        .map(|(path, fields)| {
            let observed = fields
                .get("observed")
                .and_then(|v| v.first())
                .copied()
                .unwrap_or(0.0)
                > 0.5;
            let fold = |k: &str, init: f32, f: fn(f32, f32) -> f32| {
                fields.get(k).map(|v| v.iter().copied().fold(init, f))
            };
            let range = match (
                observed,
                fold("min", 0.0, f32::min),
                fold("max", 0.0, f32::max),
            ) {
                (true, Some(lo), Some(hi)) => Some((lo, hi)),
                _ => None,
            };
            ActivationSummary {
                spec: fields
                    .get("spec_code")
                    .and_then(|c| burn_qat_nn::decode_spec(c)),
                path,
                range,
            }
        })
        .collect();
    Ok(QatSummary {
        layers,
        activations,
    })
}
