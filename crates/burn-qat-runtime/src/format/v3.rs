//! Format version 3 (commits 1071085..this one's parent): the integer model as a graph of
//! nodes with one input and one output node. Version 4 returns several outputs; its nodes are
//! version 3's (the node types are shared: [`IntOp`](crate::model::IntOp) variants are only
//! ever appended, so a version 3 node decodes as the same node).

use crate::model::{IntNode, IntegerModel};

/// Version 3's payload: the nodes and the one output node.
#[derive(serde::Deserialize)]
pub(super) struct IntegerModel3 {
    nodes: Vec<IntNode>,
    output: usize,
}

/// The same model in the current types: its one output.
pub(super) fn upgrade(old: IntegerModel3) -> IntegerModel {
    IntegerModel::new(old.nodes, old.output)
}
