//! Preparing a float graph for QAT: BatchNorm folding, activation fusion, fake-quant placement.

use std::collections::HashMap;

use burn::module::ParamId;
use burn::prelude::*;
use burn_qat_core::QatError;
use burn_qat_nn::{ActQuant, WeightFakeQuantConfig};
use burn_qat_transform::{Activation, Fusable, Fused};

use crate::model::plan::glob;
use crate::model::{ActivationQuant, PlannedParam, QatConfig, Selector};
use burn_qat_graph::rewrite::Editor;
use burn_qat_graph::{GraphLayer, QatGraph};
use burn_qat_graph::{GridRole, LayerKind, Node, Op, Program};

fn is_foldable(kind: LayerKind, rank: usize) -> bool {
    matches!(kind, LayerKind::Conv1d | LayerKind::Conv2d)
        || (kind == LayerKind::Linear && rank == 2)
}

/// The activation a node can fuse into the conv/linear before it: ReLU, ReLU6, a clamp with
/// both bounds finite.
fn fused_activation(op: &Op) -> Option<Activation> {
    op.activation().filter(|a| match a {
        Activation::Clamp { min, max } => min.is_finite() && max.is_finite(),
        _ => true,
    })
}

fn set_weight_quant<L, const DI: usize, const DW: usize>(
    fused: &mut Fused<L>,
    entry: Option<&PlannedParam>,
    device: &Device,
) -> Result<(), QatError>
where
    L: Fusable<DI, DW>,
{
    let Some(settings) = entry.and_then(|e| e.settings) else {
        return Ok(());
    };
    let spec = settings.spec(Some(L::WEIGHT_AXIS));
    spec.validate_for_rank(DW)?;
    let channels = match spec.axis() {
        Some(_) => fused.layer.weight().dims()[L::WEIGHT_AXIS],
        None => 1,
    };
    let mut wq = WeightFakeQuantConfig::new(spec)
        .with_channels(channels)
        .init(device)?;
    if settings.learned {
        let (w, _) = fused.folded_params::<DI, DW>();
        wq = wq.with_learned_step(w.detach());
    }
    fused.weight_quant = Some(wq);
    Ok(())
}

/// The activation settings for the output of a node named `name`.
fn activation_settings(
    name: &str,
    config: &QatConfig,
    rules: &[(globset::GlobMatcher, ActivationQuant)],
) -> ActivationQuant {
    let path = name.replace('.', "/");
    rules
        .iter()
        .find(|(g, _)| g.is_match(&path))
        .map(|(_, a)| *a)
        .unwrap_or(config.activations)
}

pub(crate) fn prepare_graph(
    graph: QatGraph,
    planned: &HashMap<ParamId, PlannedParam>,
    config: &QatConfig,
    device: &Device,
) -> Result<QatGraph, QatError> {
    let rules = config
        .activation_rules
        .iter()
        .map(|(s, a)| match s {
            Selector::Path(p) => Ok((glob(p)?, *a)),
            Selector::Type(t) => Err(QatError::InvalidConfig {
                field: "QatConfig.activation_rules".into(),
                value: format!("layer type {t:?}"),
                allowed: "path patterns (with_layer_activations)".into(),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in std::iter::once(&config.activations)
        .chain(config.activation_rules.iter().map(|(_, a)| a))
        .enumerate()
    {
        a.config().validate().map_err(|e| QatError::InvalidConfig {
            field: if i == 0 {
                "QatConfig.activations".into()
            } else {
                format!("QatConfig.activation_rules[{}]", i - 1)
            },
            value: format!("{a:?}"),
            allowed: e.to_string(),
        })?;
    }
    // Where the integer model ends, then what trains must deploy: refuse up front what
    // `export::convert` cannot turn into integers before that end.
    let mut graph = graph;
    graph.program.integer_end = match &config.integer_until {
        Some(name) => Some(integer_end(&graph.program, name)?),
        None => None,
    };
    let integer = graph.program.live_for_all(&graph.program.ends());
    for (i, node) in graph.program.nodes.iter().enumerate() {
        let Some(problem) = node.op.integer_refusal().filter(|_| integer[i]) else {
            continue;
        };
        let suggestion = match node.op {
            Op::AvgPool1d { .. } | Op::AvgPool2d { .. } => None,
            _ => suggested_end(&graph.program, i),
        };
        return Err(QatError::UnsupportedLayer {
            layer: node.name.clone(),
            kind: node.op.call(),
            problem: match suggestion {
                Some(end) => format!(
                    "{problem}; here, e.g. `QatConfig::new().with_integer_until(\"{end}\")`"
                ),
                None => problem.to_string(),
            },
        });
    }
    // The float tail reads the integer model's output only (and the model's input, and
    // constants): what it reads from inside the integer model would not exist at deployment.
    if let Some(end) = graph.program.integer_end {
        let inside = graph
            .program
            .outputs
            .iter()
            .find(|&&o| integer[o] && o != end && graph.program.nodes[o].op != Op::Input);
        if let Some(&o) = inside {
            return Err(QatError::InvalidConfig {
                field: "QatConfig.integer_until".into(),
                value: format!("{:?}", graph.program.nodes[end].name),
                allowed: format!(
                    "a node that every output the integer model computes leads to: the forward \
                     also returns `{}`, inside the integer model, which the integer model would \
                     not return (leave `integer_until` unset: the integer model then returns \
                     every output)",
                    graph.program.nodes[o].name
                ),
            });
        }
        let output_live = graph.program.live();
        for (i, node) in graph.program.nodes.iter().enumerate() {
            if integer[i] || !output_live[i] {
                continue;
            }
            if let Some(&j) = node
                .inputs
                .iter()
                .find(|&&j| integer[j] && j != end && graph.program.nodes[j].op != Op::Input)
            {
                let read = &graph.program.nodes[j].name;
                let end_name = &graph.program.nodes[end].name;
                return Err(QatError::UnsupportedLayer {
                    layer: node.name.clone(),
                    kind: node.op.call(),
                    problem: format!(
                        "it is after the integer model's end `{end_name}` (QatConfig.integer_until) \
                         but reads `{read}`, inside the integer model, which the integer model \
                         does not return: end the integer model after every value the float tail reads"
                    ),
                });
            }
        }
    }
    for (pattern, _) in &config.activation_rules {
        let Selector::Path(p) = pattern else { continue };
        let g = glob(p)?;
        if !graph
            .program
            .nodes
            .iter()
            .any(|n| g.is_match(n.name.replace('.', "/")))
        {
            let names: Vec<String> = graph.program.nodes.iter().map(|n| n.name.clone()).collect();
            return Err(QatError::MatchesNothing {
                what: "activation pattern",
                selector: p.to_string(),
                among: "node of this graph",
                listing: "nodes",
                available: names,
                hint: "",
            });
        }
    }

    // 1. BatchNorm into the conv/linear before it; 2. ReLU/ReLU6/clamp into it.
    let mut e = Editor::new(graph);
    let users = e.program.consumers();
    for i in 0..e.program.nodes.len() {
        let Op::Layer {
            kind: LayerKind::BatchNorm,
            ..
        } = e.program.nodes[i].op
        else {
            continue;
        };
        let c = e.program.nodes[i].inputs[0];
        let Op::Layer { kind, .. } = e.program.nodes[c].op else {
            continue;
        };
        // The integer model's end returns its own value: a BatchNorm after it is the tail's.
        if !is_foldable(kind, e.program.nodes[c].shape.len())
            || users[c] != [i]
            || e.program.ends().contains(&c)
        {
            continue;
        }
        let Some(GraphLayer::BatchNorm(bn)) = e.take_layer(i) else {
            continue;
        };
        match e.layer_mut(c) {
            Some(GraphLayer::Conv1d(f)) => f.bn = Some(bn),
            Some(GraphLayer::Conv2d(f)) => f.bn = Some(bn),
            Some(GraphLayer::Linear(f)) => f.bn = Some(bn),
            _ => unreachable!("checked above"),
        }
        e.bypass(i, c);
    }
    let graph = e.finish();
    let mut e = Editor::new(graph);
    let users = e.program.consumers();
    for i in 0..e.program.nodes.len() {
        let Some(act) = fused_activation(&e.program.nodes[i].op) else {
            continue;
        };
        let c = e.program.nodes[i].inputs[0];
        let Op::Layer { kind, .. } = e.program.nodes[c].op else {
            continue;
        };
        if !matches!(
            kind,
            LayerKind::Conv1d | LayerKind::Conv2d | LayerKind::Linear
        ) || users[c] != [i]
        {
            continue;
        }
        match e.layer_mut(c) {
            Some(GraphLayer::Conv1d(f)) => f.activation = act,
            Some(GraphLayer::Conv2d(f)) => f.activation = act,
            Some(GraphLayer::Linear(f)) => f.activation = act,
            _ => unreachable!("checked above"),
        }
        e.bypass(i, c);
    }
    let mut graph = e.finish();

    // 3. Weight fake-quant per the plan, on the axis the graph uses the weight on; the float
    // tail after the integer model's end keeps float weights.
    let integer = graph.program.live_for_all(&graph.program.ends());
    let mut skipped = vec![false; graph.program.nodes.len()];
    for (i, node) in graph.program.nodes.iter().enumerate() {
        let Op::Layer { index, .. } = node.op else {
            continue;
        };
        if !integer[i] {
            skipped[i] = true;
            continue;
        }
        let layer = &mut graph.layers[index];
        let id = match layer {
            GraphLayer::Conv1d(f) => Some(f.layer.weight.id),
            GraphLayer::Conv2d(f) => Some(f.layer.weight.id),
            GraphLayer::Linear(f) => Some(f.layer.weight.id),
            _ => None,
        };
        let entry = id.and_then(|id| planned.get(&id));
        skipped[i] = entry.is_some_and(|e| e.skipped);
        match layer {
            GraphLayer::Conv1d(f) => {
                f.mode = config.bn_fold;
                set_weight_quant(f, entry, device)?
            }
            GraphLayer::Conv2d(f) => {
                f.mode = config.bn_fold;
                set_weight_quant(f, entry, device)?
            }
            GraphLayer::Linear(f) => {
                f.mode = config.bn_fold;
                set_weight_quant(f, entry, device)?
            }
            _ => {}
        }
    }

    // 4. Activation fake-quant where int8 runtimes requantize.
    let users = graph.program.consumers();
    let nodes = &graph.program.nodes;
    let role = |i: usize| nodes[i].op.grid_role();
    let mut quant_after = vec![false; nodes.len()];
    for i in 0..nodes.len() {
        quant_after[i] = match role(i) {
            GridRole::Quantized => nodes[i].op == Op::Input,
            GridRole::Inherit => false,
            GridRole::FusableActivation => true,
            // Not when the activation after it (in the integer model) takes the quantizer.
            // (A bilinear resize keeps its own: the integer resize writes its grid, and an
            // activation after it reads that grid by table.)
            GridRole::Compute => {
                !(users[i].len() == 1
                    && role(users[i][0]) == GridRole::FusableActivation
                    && integer[users[i][0]])
                    || matches!(nodes[i].op, Op::Bilinear { .. })
            }
        } && !skipped[i]
            && integer[i];
    }
    // An output that only a concat reads is quantized on the concat's grid alone (the integer
    // model requantizes it straight onto that grid, as TFLite's and PyTorch's concat share
    // their inputs' quantization parameters): no second rounding, one fake-quant pass fewer.
    // Last to first, so that a concat read only by another concat has lost its own quantizer
    // before its inputs look at it.
    let ends = graph.program.ends();
    for i in (0..nodes.len()).rev() {
        if let [c] = users[i][..]
            && nodes[i].op != Op::Input
            && quant_after[i]
            && quant_after[c]
            && !ends.contains(&i)
            && matches!(nodes[c].op, Op::Concat { .. })
            && activation_settings(&nodes[c].name, config, &rules).enabled
        {
            quant_after[i] = false;
        }
    }
    if config.float_output {
        // The node that computes the integer model's output, through the ops that keep their
        // input's grid.
        for mut at in graph.program.ends() {
            while role(at) == GridRole::Inherit {
                at = nodes[at].inputs[0];
            }
            quant_after[at] = false;
        }
    }
    let old_outputs = graph.program.outputs.clone();
    let old_end = graph.program.integer_end;
    let mut layers = graph.layers;
    let mut out_nodes: Vec<Node> = Vec::new();
    let mut remap = vec![0; quant_after.len()];
    // The inputs stay the leading nodes: their quantizers follow all of them.
    let inputs = graph.program.inputs().len();
    let quantize_after = |i: usize,
                          layers: &mut Vec<GraphLayer>,
                          out_nodes: &mut Vec<Node>,
                          remap: &mut [usize]|
     -> Result<(), QatError> {
        let (name, shape) = (
            out_nodes[remap[i]].name.clone(),
            out_nodes[remap[i]].shape.clone(),
        );
        let settings = activation_settings(&name, config, &rules);
        if !quant_after[i] || !settings.enabled {
            return Ok(());
        }
        let q = ActQuant::init(&settings.config(), settings.learned, device)?;
        layers.push(GraphLayer::Quant(q));
        out_nodes.push(Node {
            op: Op::Layer {
                index: layers.len() - 1,
                kind: LayerKind::Quant,
            },
            inputs: vec![remap[i]],
            name: format!("{name}/quant"),
            shape,
        });
        remap[i] = out_nodes.len() - 1;
        Ok(())
    };
    for (i, mut node) in graph.program.nodes.into_iter().enumerate() {
        node.inputs = node.inputs.iter().map(|&j| remap[j]).collect();
        out_nodes.push(node);
        remap[i] = out_nodes.len() - 1;
        if i + 1 == inputs {
            for k in 0..inputs {
                quantize_after(k, &mut layers, &mut out_nodes, &mut remap)?;
            }
        } else if i >= inputs {
            quantize_after(i, &mut layers, &mut out_nodes, &mut remap)?;
        }
    }
    let graph = QatGraph {
        layers,
        program: Program {
            nodes: out_nodes,
            outputs: old_outputs.iter().map(|&o| remap[o]).collect(),
            // Its quantizer, if one follows it.
            integer_end: old_end.map(|k| remap[k]),
        },
    };
    Ok(Editor::new(graph).finish())
}

/// Where to end the integer model so that node `r` (which it cannot compute) falls in the float
/// tail: the value `r` (or, for a constant, the op reading it) computes on, walked back
/// through grid-keeping ops (reshape, slices, transposes) that only lead there, to where the
/// forward branches; `None` if that node's name is not unique.
fn suggested_end(program: &Program, r: usize) -> Option<String> {
    let users = program.consumers();
    let nodes = &program.nodes;
    let mut x = match nodes[r].inputs.first() {
        Some(&j) => j,
        None => {
            let c = *users[r].first()?;
            *nodes[c]
                .inputs
                .iter()
                .find(|&&j| j != r && !matches!(nodes[j].op, Op::Constant { .. }))?
        }
    };
    let input = |x: usize| nodes[x].op == Op::Input;
    while !input(x) && nodes[x].op.grid_role() == GridRole::Inherit && users[x].len() == 1 {
        x = nodes[x].inputs[0];
    }
    let name = &nodes[x].name;
    (!input(x) && nodes.iter().filter(|n| &n.name == name).count() == 1).then(|| name.clone())
}

/// The node named `name` (unique), where the integer model ends.
fn integer_end(program: &Program, name: &str) -> Result<usize, QatError> {
    let hits: Vec<usize> = (0..program.nodes.len())
        .filter(|&i| program.nodes[i].name == name)
        .collect();
    match hits[..] {
        [k] if program.nodes[k].op != Op::Input => Ok(k),
        [k] => Err(QatError::InvalidConfig {
            field: "QatConfig.integer_until".into(),
            value: format!("{name:?}"),
            allowed: format!("a node after the inputs (`{name}` is node %{k}, an input)"),
        }),
        [] => {
            let mut names: Vec<&str> = program.nodes.iter().map(|n| n.name.as_str()).collect();
            names.dedup();
            let shown = names.len().min(24);
            let more = if names.len() > shown { ", ..." } else { "" };
            Err(QatError::InvalidConfig {
                field: "QatConfig.integer_until".into(),
                value: format!("{name:?}"),
                allowed: format!(
                    "the name of a node of this graph: {:?}{more} (`graph::build(&model, dims, forward)?.plan()` \
                     lists them all)",
                    &names[..shown]
                ),
            })
        }
        _ => Err(QatError::InvalidConfig {
            field: "QatConfig.integer_until".into(),
            value: format!("{name:?}"),
            allowed: format!(
                "one node's name: {} nodes have this one (a module called {} times); end the \
                 integer model at a node after them",
                hits.len(),
                hits.len()
            ),
        }),
    }
}
