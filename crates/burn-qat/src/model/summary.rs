use std::collections::BTreeMap;
use std::fmt;

use burn::module::Module;
use burn_qat_core::QuantSpec;
use burn_qat_nn::tree::{self, QuantizerKind, QuantizerState, burn_types};
use burn_qat_transform::Fused;

/// One weight of the model (a float parameter of rank >= 2) and the quantizer attached to it.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSummary {
    /// Dotted parameter path.
    pub path: String,
    /// The owning layer type.
    pub layer_type: String,
    /// Parameter dimensions.
    pub dims: Vec<usize>,
    /// The spec of its quantizer as the model records it, or `None` if the weight stays float.
    pub spec: Option<QuantSpec>,
    /// Whether its quantizer is enabled (`false` for float weights).
    pub enabled: bool,
    /// Whether its quantizer's range is frozen.
    pub frozen: bool,
    /// Whether its step size is learned (LSQ).
    pub learned: bool,
    /// The range that quantizes the weight: the frozen range of a frozen weight quantizer, else
    /// the float weight's current min and max.
    pub range: (f32, f32),
}

/// One activation quantizer ([`FakeQuant`](crate::FakeQuant) or
/// [`LearnedFakeQuant`](crate::LearnedFakeQuant)) of the model, as its state says.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationSummary {
    /// Dotted module path of the quantizer.
    pub path: String,
    /// Its spec, read from the recorded state.
    pub spec: Option<QuantSpec>,
    /// Whether fake quantization is applied.
    pub enabled: bool,
    /// Whether the observer (or learned range) is frozen.
    pub frozen: bool,
    /// Learned quantizers: `Some(true)` once learning, `Some(false)` while observing; `None`
    /// for observed quantizers.
    pub learning: Option<bool>,
    /// Channels of its range.
    pub channels: usize,
    /// Observed range (min over channels, max over channels), `None` before any observation.
    pub range: Option<(f32, f32)>,
    /// Learned parameters by name (`scale`, `offset`, `alpha`, `min`, `max`).
    pub learned: BTreeMap<String, Vec<f32>>,
}

/// What the model quantizes and how, read from the model itself: per weight and per
/// activation quantizer.
#[derive(Clone, Debug, PartialEq)]
pub struct QatSummary {
    /// Weights (parameters of rank >= 2), quantized or not.
    pub layers: Vec<LayerSummary>,
    /// Activation quantizers.
    pub activations: Vec<ActivationSummary>,
}

fn describe(spec: &Option<QuantSpec>) -> String {
    spec.map_or_else(|| "float".to_string(), |s| s.to_string())
}

fn state(enabled: bool, frozen: bool) -> &'static str {
    match (enabled, frozen) {
        (true, false) => "on",
        (true, true) => "on, frozen",
        (false, false) => "off",
        (false, true) => "off, frozen",
    }
}

/// Writes rows as a table whose columns are as wide as their longest cell.
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>]) -> fmt::Result {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(f, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

impl fmt::Display for QatSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![
            ["weight", "layer", "shape", "quantization", "state", "range"]
                .map(String::from)
                .to_vec(),
        ];
        for l in &self.layers {
            rows.push(vec![
                l.path.clone(),
                l.layer_type.clone(),
                format!("{:?}", l.dims),
                describe(&l.spec) + if l.learned { " (learned step)" } else { "" },
                if l.spec.is_some() {
                    state(l.enabled, l.frozen).to_string()
                } else {
                    "-".to_string()
                },
                format!("[{:.4}, {:.4}]", l.range.0, l.range.1),
            ]);
        }
        table(f, &rows)?;
        if !self.activations.is_empty() {
            writeln!(f)?;
            let mut rows = vec![
                ["activation", "quantization", "state", "phase", "range"]
                    .map(String::from)
                    .to_vec(),
            ];
            for a in &self.activations {
                let range = a.range.map_or("not observed".to_string(), |(lo, hi)| {
                    format!("[{lo:.4}, {hi:.4}]")
                });
                let phase = match a.learning {
                    None => "observed".to_string(),
                    Some(false) => "learned: observing".to_string(),
                    Some(true) => {
                        let params: Vec<String> = a
                            .learned
                            .iter()
                            .map(|(k, v)| match v.as_slice() {
                                [x] => format!("{k} {x:.4}"),
                                v => format!("{k} x{}", v.len()),
                            })
                            .collect();
                        format!("learned: {}", params.join(", "))
                    }
                };
                rows.push(vec![
                    a.path.clone(),
                    describe(&a.spec),
                    state(a.enabled, a.frozen).to_string(),
                    phase,
                    range,
                ]);
            }
            table(f, &rows)?;
        }
        Ok(())
    }
}

fn hull(range: &Option<(Vec<f32>, Vec<f32>)>) -> Option<(f32, f32)> {
    range.as_ref().map(|(lo, hi)| {
        (
            lo.iter().copied().fold(0f32, f32::min),
            hi.iter().copied().fold(0f32, f32::max),
        )
    })
}

/// The weight a weight quantizer quantizes: its own path when attached to a parameter, the
/// fused layer's weight for a [`Fused`] layer's `weight_quant`.
fn weight_of(q: &QuantizerState) -> String {
    let suffix = format!(".{}", Fused::<()>::WEIGHT_QUANT);
    match q.path.strip_suffix(&suffix) {
        Some(layer) => format!("{layer}.{}.{}", Fused::<()>::LAYER, burn_types::WEIGHT),
        None if q.path == Fused::<()>::WEIGHT_QUANT => {
            format!("{}.{}", Fused::<()>::LAYER, burn_types::WEIGHT)
        }
        None => q.path.clone(),
    }
}

/// Summarizes what `model` quantizes and how, reading the model: each weight with the spec and
/// switches of the quantizer attached to it (or `float`), and each activation quantizer with
/// its recorded spec, switches, phase and observed or learned range. Works on any model:
/// quantized with [`quantize`](super::quantize), built from fused layers, or a graph-mode
/// [`QatGraph`](crate::graph::QatGraph). `Display` prints a table; `println!("{model}")`
/// shows the same facts per quantizer.
pub fn summary<M: Module>(model: &M) -> QatSummary {
    let quantizers = tree::quantizers(model);
    let weights: BTreeMap<String, &QuantizerState> = quantizers
        .iter()
        .filter(|q| q.kind == QuantizerKind::Weight)
        .map(|q| (weight_of(q), q))
        .collect();
    let is_quantizer_state = |at: &tree::TreePath| {
        at.inside(burn_types::REPARAMETERIZATION)
            || at.frames().iter().any(|(_, c)| {
                c == burn_qat_nn::FakeQuant::TYPE
                    || c == burn_qat_nn::WeightFakeQuant::TYPE
                    || c == burn_qat_nn::LearnedFakeQuant::TYPE
            })
    };
    let layers = tree::read(model, |at| !is_quantizer_state(at))
        .into_iter()
        .filter(|v| v.dims.len() >= 2)
        .map(|v| {
            let path = v.at.path();
            let q = weights.get(&path);
            let lo = v.values.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = v.values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let frozen_range = q.filter(|q| q.frozen).and_then(|q| hull(&q.range));
            LayerSummary {
                layer_type: tree::short_type(v.at.holder().unwrap_or_default()).to_string(),
                dims: v.dims,
                spec: q.and_then(|q| q.spec),
                enabled: q.is_some_and(|q| q.enabled),
                frozen: q.is_some_and(|q| q.frozen),
                learned: q.is_some_and(|q| !q.learned.is_empty()),
                range: frozen_range.unwrap_or((lo, hi)),
                path,
            }
        })
        .collect();
    let activations = quantizers
        .into_iter()
        .filter(|q| q.kind != QuantizerKind::Weight)
        .map(|q| ActivationSummary {
            range: hull(&q.range),
            channels: q.range.as_ref().map_or(1, |(lo, _)| lo.len().max(1)),
            learning: (q.kind == QuantizerKind::Learned).then_some(q.learning),
            path: q.path,
            spec: q.spec,
            enabled: q.enabled,
            frozen: q.frozen,
            learned: q.learned,
        })
        .collect();
    QatSummary {
        layers,
        activations,
    }
}
