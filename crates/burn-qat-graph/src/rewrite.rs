//! Rewriting a program: redirecting readers, dropping nodes, renumbering layers.

use super::ir::{Op, Program};
use super::module::{GraphLayer, QatGraph};

/// A graph being rewritten: layers can be taken out, nodes bypassed.
pub struct Editor {
    /// The graph's layers; `None` once taken out.
    pub layers: Vec<Option<GraphLayer>>,
    /// The program being edited (node indices stay valid until [`finish`](Self::finish)).
    pub program: Program,
    /// `redirect[i] = j`: readers of node `i` read node `j` instead.
    redirect: Vec<usize>,
}

impl Editor {
    /// Starts editing `graph`.
    pub fn new(graph: QatGraph) -> Self {
        let n = graph.program.nodes.len();
        Self {
            layers: graph.layers.into_iter().map(Some).collect(),
            program: graph.program,
            redirect: (0..n).collect(),
        }
    }

    /// Readers of `node` (and the output, if it is) read `to` instead; `node` is then unused.
    pub fn bypass(&mut self, node: usize, to: usize) {
        self.redirect[node] = to;
    }

    fn resolve(&self, mut i: usize) -> usize {
        while self.redirect[i] != i {
            i = self.redirect[i];
        }
        i
    }

    /// The layer of node `i`, if it runs one.
    pub fn layer_mut(&mut self, i: usize) -> Option<&mut GraphLayer> {
        match self.program.nodes[i].op {
            Op::Layer { index, .. } => self.layers[index].as_mut(),
            _ => None,
        }
    }

    /// Takes the layer out of node `i` (the node must then be bypassed).
    pub fn take_layer(&mut self, i: usize) -> Option<GraphLayer> {
        match self.program.nodes[i].op {
            Op::Layer { index, .. } => self.layers[index].take(),
            _ => None,
        }
    }

    /// Applies the redirections, drops every node the outputs do not need, and renumbers
    /// nodes and layers.
    pub fn finish(mut self) -> QatGraph {
        for n in 0..self.program.nodes.len() {
            let inputs: Vec<usize> = self.program.nodes[n]
                .inputs
                .iter()
                .map(|&j| self.resolve(j))
                .collect();
            self.program.nodes[n].inputs = inputs;
        }
        self.program.outputs = (0..self.program.outputs.len())
            .map(|k| self.resolve(self.program.outputs[k]))
            .collect();
        self.program.integer_end = self.program.integer_end.map(|k| self.resolve(k));
        let nodes = &self.program.nodes;
        let mut needed = vec![false; nodes.len()];
        // Every input stays (they are the forward's arguments), read or not.
        for i in self.program.inputs() {
            needed[i] = true;
        }
        for &o in &self.program.outputs {
            needed[o] = true;
        }
        if let Some(k) = self.program.integer_end {
            needed[k] = true;
        }
        for i in (0..nodes.len()).rev() {
            if needed[i] {
                for &j in &nodes[i].inputs {
                    needed[j] = true;
                }
            }
        }
        let mut new_index = vec![usize::MAX; nodes.len()];
        let mut layers = Vec::new();
        let mut kept = Vec::new();
        for (i, mut node) in std::mem::take(&mut self.program.nodes)
            .into_iter()
            .enumerate()
        {
            if !needed[i] {
                continue;
            }
            node.inputs = node.inputs.iter().map(|&j| new_index[j]).collect();
            if let Op::Layer { index, .. } = &mut node.op {
                layers.push(
                    self.layers[*index]
                        .take()
                        .expect("a needed node's layer is still in place"),
                );
                *index = layers.len() - 1;
            }
            new_index[i] = kept.len();
            kept.push(node);
        }
        QatGraph {
            layers,
            program: super::ir::Program {
                nodes: kept,
                outputs: self.program.outputs.iter().map(|&o| new_index[o]).collect(),
                integer_end: self.program.integer_end.map(|k| new_index[k]),
            },
        }
    }
}

/// `x * sigmoid(x)` becomes one `Silu` node and `x * hard_sigmoid(x, 1/6, 1/2)` one `HardSwish`
/// node (int8 runtimes run each as one table lookup), when the gate has no other reader.
pub(crate) fn fuse_gated_activations(program: &mut Program) {
    let users = program.consumers();
    for i in 0..program.nodes.len() {
        if program.nodes[i].op != Op::Mul {
            continue;
        }
        let (a, b) = (program.nodes[i].inputs[0], program.nodes[i].inputs[1]);
        for (x, gate) in [(a, b), (b, a)] {
            let g = &program.nodes[gate];
            let fused = match g.op {
                Op::Sigmoid => Op::Silu,
                Op::HardSigmoid { alpha, beta } if alpha == 1.0 / 6.0 && beta == 0.5 => {
                    Op::HardSwish
                }
                _ => continue,
            };
            if g.inputs == [x] && users[gate] == [i] {
                let node = &mut program.nodes[i];
                node.op = fused;
                node.inputs = vec![x];
                node.name = node
                    .name
                    .replace("/mul", &format!("/{}", node.op.name().to_lowercase()));
                break;
            }
        }
    }
    // The bypassed gates are dropped when the graph is finished (nothing reads them).
}

/// Chains of ReLU/clamp nodes (`relu(x).clamp_max(6.0)`, `x.clamp_min(0.0).clamp_max(6.0)`, a
/// hardtanh after a ReLU) become one clamp node
/// ([`Activation::then`](burn_qat_transform::Activation::then)) when each inner node has no
/// other reader: a conv/linear before the chain then fuses all of it, and one fake-quantizer
/// follows, as the integer model computes it. The composed node keeps the last node's name.
pub(crate) fn compose_activations(program: &mut Program) {
    let users = program.consumers();
    for i in 0..program.nodes.len() {
        let Some(outer) = program.nodes[i].op.activation() else {
            continue;
        };
        let j = program.nodes[i].inputs[0];
        let Some(inner) = program.nodes[j].op.activation() else {
            continue;
        };
        if users[j] != [i] || program.outputs.contains(&j) {
            continue;
        }
        // Nodes are in order, so `j` already holds the chain before it.
        let input = program.nodes[j].inputs[0];
        let node = &mut program.nodes[i];
        node.op = Op::from_activation(inner.then(outer));
        node.inputs = vec![input];
    }
    // The absorbed nodes are dropped when the graph is finished (nothing reads them).
}
