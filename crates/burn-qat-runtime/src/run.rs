//! Running an [`IntegerModel`]: shape checks, the weight cache, and one kernel per node.

use std::borrow::Cow;
use std::sync::OnceLock;

use crate::kernels::{self, Packed};
use crate::model::{Grid, IntOp, IntegerModel, ModelError, RunError, Window};
use crate::ops;
use crate::validate::infer;

/// A tensor flowing through the integer model (what the [`kernels`](crate::kernels) return).
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// 8-bit values on a grid.
    Int {
        /// Values, row-major.
        data: Vec<i8>,
        /// Shape, batch first.
        shape: Vec<usize>,
        /// Their grid.
        grid: Grid,
    },
    /// Float values (model input, a float last layer).
    Float {
        /// Values, row-major.
        data: Vec<f32>,
        /// Shape, batch first.
        shape: Vec<usize>,
    },
}

impl Values {
    /// The shape, batch first.
    pub fn shape(&self) -> &[usize] {
        match self {
            Values::Int { shape, .. } | Values::Float { shape, .. } => shape,
        }
    }
}

/// What a model learns about itself on its first forward: that it is valid, and its weights
/// laid out for this machine's GEMM kernels (one slot per node, filled on first use). Kept
/// beside the model's data, never saved or compared; a clone starts empty. After editing a
/// model's nodes in place, call [`IntegerModel::clear_cache`].
#[derive(Default)]
pub struct WeightCache(
    OnceLock<Vec<OnceLock<Packed>>>,
    OnceLock<Result<(), ModelError>>,
);

impl WeightCache {
    /// Forgets the validation (kept: the packed weights).
    pub(crate) fn forget_validation(&mut self) {
        self.1 = OnceLock::new();
    }

    fn slot(&self, node: usize, nodes: usize) -> &OnceLock<Packed> {
        &self
            .0
            .get_or_init(|| (0..nodes).map(|_| OnceLock::new()).collect())[node]
    }
}

impl Clone for WeightCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for WeightCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for WeightCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self
            .0
            .get()
            .map_or(0, |v| v.iter().filter(|s| s.get().is_some()).count());
        write!(f, "WeightCache({packed} nodes packed)")
    }
}

/// A buffer of node `node` that could not be allocated at batch size `batch`, as its error.
fn out_of_memory(
    model: &IntegerModel,
    node: usize,
    batch: usize,
    e: kernels::OutOfMemory,
) -> RunError {
    err(
        model,
        node,
        format!(
            "{e} at batch size {batch}: values grow with the batch (a smaller batch needs \
             less), the rest stays within the model's budget of {} bytes",
            model.budget.max_memory_bytes
        ),
    )
}

fn err(model: &IntegerModel, node: usize, what: String) -> RunError {
    RunError::Model(ModelError {
        node,
        name: model
            .nodes
            .get(node)
            .map_or_else(String::new, |n| n.name.clone()),
        what,
    })
}

impl IntegerModel {
    /// Runs the model on a batch of float inputs (`[n, ..input_shape]` row-major, `n` inferred
    /// from the length), returning the float outputs (dequantized if the output node is
    /// quantized) and their shape. Integer arithmetic only between the input quantization and
    /// the output.
    ///
    /// # Errors
    ///
    /// [`RunError::Input`] if `input.len()` is not a whole batch; [`RunError::Model`] if the
    /// model is inconsistent (see [`validate`](Self::validate)).
    pub fn forward(&self, input: &[f32]) -> Result<(Vec<f32>, Vec<usize>), RunError> {
        self.run(input, false).map(to_float)
    }

    /// Like [`forward`](Self::forward), with the slow scalar reference kernels for
    /// convolutions and linear layers (nested loops).
    pub fn forward_reference(&self, input: &[f32]) -> Result<(Vec<f32>, Vec<usize>), RunError> {
        self.run(input, true).map(to_float)
    }

    /// Runs the model and returns the raw integer output with its shape and grid, or `None`
    /// if the model's output is float.
    pub fn forward_int(
        &self,
        input: &[f32],
    ) -> Result<Option<(Vec<i8>, Vec<usize>, Grid)>, RunError> {
        Ok(match self.run(input, false)? {
            Values::Int { data, shape, grid } => Some((data, shape, grid)),
            Values::Float { .. } => None,
        })
    }

    /// Forgets the packed weights and the validation (after editing nodes in place).
    pub fn clear_cache(&mut self) {
        self.cache = WeightCache::default();
    }

    fn run(&self, input: &[f32], reference: bool) -> Result<Values, RunError> {
        self.cache.1.get_or_init(|| self.validate()).clone()?;
        let item: usize = self.input_shape().iter().product();
        if item == 0 || !input.len().is_multiple_of(item) {
            return Err(RunError::Input {
                len: input.len(),
                input_shape: self.input_shape(),
            });
        }
        let batch = input.len() / item;
        let mut last_use = vec![0; self.nodes.len()];
        let mut readers = vec![0usize; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for j in &n.inputs {
                last_use[*j] = i;
                readers[*j] += 1;
            }
        }
        last_use[self.output] = usize::MAX;
        let mut values: Vec<Option<Values>> = vec![None; self.nodes.len()];
        let mut fused = None;
        for (i, node) in self.nodes.iter().enumerate() {
            if fused == Some(i) {
                continue;
            }
            let shape: Vec<usize> = node.shape.iter().map(|d| d.at(batch)).collect();
            let ins: Vec<Vec<usize>> = node
                .inputs
                .iter()
                .map(|j| {
                    values[*j]
                        .as_ref()
                        .map_or_else(Vec::new, |v| v.shape().to_vec())
                })
                .collect();
            self.check_shape(i, &ins, &shape)?;
            // A reshape of a value nobody else reads moves it instead of copying it.
            if matches!(node.op, IntOp::Reshape)
                && last_use[node.inputs[0]] == i
                && let Some(mut v) = values[node.inputs[0]].take()
            {
                match &mut v {
                    Values::Int { shape: s, .. } | Values::Float { shape: s, .. } => *s = shape,
                }
                values[i] = Some(v);
                continue;
            }
            // A convolution whose only reader is the max pooling right after it: both at once
            // (`kernels::conv2d_max_pool`), the pooled output stored as the pooling's.
            if !reference
                && let Some((w, pooled)) = self.pool_after(i, batch, &readers)
                && let (IntOp::Conv2d(c), Some(Values::Int { data, shape: s, .. })) =
                    (&node.op, values[node.inputs[0]].as_ref())
            {
                self.check_shape(i + 1, &[shape], &pooled)?;
                let slot = self.cache.slot(i, self.nodes.len());
                let pooled = kernels::conv2d_max_pool(c, slot, data, s, w)
                    .map_err(|e| out_of_memory(self, i, batch, e))?;
                values[i + 1] = Some(pooled);
                fused = Some(i + 1);
            } else {
                values[i] = Some(self.node(i, shape, input, &values, reference, batch)?);
            }
            for j in &node.inputs {
                if last_use[*j] == i {
                    values[*j] = None;
                }
            }
        }
        Ok(values[self.output].take().expect("the output is kept"))
    }

    /// The shape rule of `validate` for node `i` at this batch size (the kernels rely on it):
    /// its inputs' shapes `ins` give `shape`.
    fn check_shape(&self, i: usize, ins: &[Vec<usize>], shape: &[usize]) -> Result<(), RunError> {
        match infer(&self.nodes[i].op, ins, shape) {
            Ok(got) if got == shape => Ok(()),
            Ok(got) => Err(err(
                self,
                i,
                format!("computes {got:?}, declares {shape:?}"),
            )),
            Err(e) => Err(err(self, i, e)),
        }
    }

    /// The pooling window and output shape (at `batch`) of node `i + 1` when node `i` is a
    /// convolution with a quantized output (not the model's output) whose one reader is node
    /// `i + 1`, a max pooling the row-wise kernel runs (`ops::row_wise`: no dilation, no
    /// padding but ceil mode's at the end) (`readers`: per node, how many inputs name it).
    fn pool_after(
        &self,
        i: usize,
        batch: usize,
        readers: &[usize],
    ) -> Option<(&Window, Vec<usize>)> {
        let IntOp::Conv2d(c) = &self.nodes[i].op else {
            return None;
        };
        let next = self.nodes.get(i + 1)?;
        let IntOp::MaxPool(w) = &next.op else {
            return None;
        };
        let only_reader = next.inputs == [i] && readers[i] == 1 && i != self.output;
        let plain = crate::ops::row_wise(w);
        (only_reader && plain && c.output.grid().is_some())
            .then(|| (w, next.shape.iter().map(|d| d.at(batch)).collect()))
    }

    /// Runs node `i`, whose output shape (checked against its inputs') is `shape`.
    fn node(
        &self,
        i: usize,
        shape: Vec<usize>,
        input: &[f32],
        values: &[Option<Values>],
        reference: bool,
        batch: usize,
    ) -> Result<Values, RunError> {
        let node = &self.nodes[i];
        let oom = |e| out_of_memory(self, i, batch, e);
        let int = |k: usize| -> Result<(&[i8], &[usize], Grid), RunError> {
            match values[node.inputs[k]].as_ref() {
                Some(Values::Int { data, shape, grid }) => Ok((data, shape, *grid)),
                _ => Err(err(self, i, format!("input {k} is not an integer tensor"))),
            }
        };
        let grid = node
            .grid
            .ok_or_else(|| err(self, i, "has no output grid".into()));
        let int_out = |data: Vec<i8>| -> Result<Values, RunError> {
            Ok(Values::Int {
                data,
                shape: shape.clone(),
                grid: grid.clone()?,
            })
        };
        let slot = || self.cache.slot(i, self.nodes.len());
        match &node.op {
            IntOp::Input => Ok(Values::Float {
                data: input.to_vec(),
                shape,
            }),
            IntOp::Quantize(g) => match values[node.inputs[0]].as_ref() {
                Some(Values::Float { data, .. }) => Ok(Values::Int {
                    data: ops::quantize(g, data),
                    shape,
                    grid: *g,
                }),
                _ => Err(err(self, i, "quantizes a non-float tensor".into())),
            },
            IntOp::Conv2d(c) => {
                let (x, s, _) = int(0)?;
                if reference {
                    kernels::conv2d_reference(c, x, s)
                } else {
                    kernels::conv2d(c, slot(), x, s)
                }
                .map_err(oom)
            }
            IntOp::Linear(l) => {
                let (x, s, _) = int(0)?;
                if reference {
                    kernels::linear_reference(l, x, s)
                } else {
                    kernels::linear(l, slot(), x, s)
                }
                .map_err(oom)
            }
            IntOp::Add(a) => {
                let ((x, sx, _), (y, sy, _)) = (int(0)?, int(1)?);
                int_out(if reference {
                    ops::add(a, x, sx, y, sy, &shape)
                } else {
                    let table = pair_table(slot(), |x, y| a.apply(x, y));
                    ops::binary_lookup(table, x, sx, y, sy, &shape)
                })
            }
            IntOp::Mul(m) => {
                let ((x, sx, _), (y, sy, _)) = (int(0)?, int(1)?);
                int_out(if reference {
                    ops::mul(m, x, sx, y, sy, &shape)
                } else {
                    let table = pair_table(slot(), |x, y| m.apply(x, y));
                    ops::binary_lookup(table, x, sx, y, sy, &shape)
                })
            }
            IntOp::Concat { axis, requantize } => {
                let mut parts: Vec<(Cow<[i8]>, &[usize])> = Vec::new();
                for (k, table) in requantize.iter().enumerate() {
                    let (x, s, _) = int(k)?;
                    let x = match table {
                        Some(t) => Cow::Owned(ops::lut(t, x)),
                        None => Cow::Borrowed(x),
                    };
                    parts.push((x, s));
                }
                let refs: Vec<(&[i8], &[usize])> =
                    parts.iter().map(|(d, s)| (&d[..], *s)).collect();
                int_out(ops::concat(*axis, &refs))
            }
            IntOp::MaxPool(w) => {
                let (x, s, g) = int(0)?;
                Ok(Values::Int {
                    data: ops::max_pool(w, x, s),
                    shape,
                    grid: g,
                })
            }
            IntOp::AvgPool {
                window,
                count_include_pad,
                input: g_in,
            } => {
                let (x, s, _) = int(0)?;
                int_out(ops::avg_pool(
                    window,
                    *count_include_pad,
                    g_in,
                    &grid.clone()?,
                    x,
                    s,
                ))
            }
            IntOp::AdaptiveAvgPool {
                output,
                input: g_in,
            } => {
                let (x, s, _) = int(0)?;
                int_out(ops::adaptive_avg_pool(*output, g_in, &grid.clone()?, x, s))
            }
            IntOp::Reduce {
                axis,
                mean,
                input: g_in,
            } => {
                let (x, s, _) = int(0)?;
                int_out(ops::reduce(*axis, *mean, g_in, &grid.clone()?, x, s))
            }
            IntOp::Lut(t) => int_out(ops::lut(t, int(0)?.0)),
            IntOp::ChannelLut { lut, channels } => {
                let (x, s, _) = int(0)?;
                int_out(ops::channel_lut(lut, *channels, x, s))
            }
            IntOp::Reshape => Ok(match values[node.inputs[0]].as_ref() {
                Some(Values::Int { data, grid, .. }) => Values::Int {
                    data: data.clone(),
                    shape,
                    grid: *grid,
                },
                Some(Values::Float { data, .. }) => Values::Float {
                    data: data.clone(),
                    shape,
                },
                None => return Err(err(self, i, "its input was not computed".into())),
            }),
            IntOp::Permute { perm } => Ok(match values[node.inputs[0]].as_ref() {
                Some(Values::Int {
                    data,
                    shape: s,
                    grid,
                }) => Values::Int {
                    data: ops::permute(perm, data, s),
                    shape,
                    grid: *grid,
                },
                Some(Values::Float { data, shape: s }) => Values::Float {
                    data: ops::permute(perm, data, s),
                    shape,
                },
                None => return Err(err(self, i, "its input was not computed".into())),
            }),
        }
    }
}

fn to_float(v: Values) -> (Vec<f32>, Vec<usize>) {
    match v {
        Values::Float { data, shape } => (data, shape),
        Values::Int { data, shape, grid } => (
            data.iter().map(|x| grid.dequantize(*x as i32)).collect(),
            shape,
        ),
    }
}

/// The node's table of every output of a two-input op (kept by the weight cache).
fn pair_table(slot: &OnceLock<Packed>, f: impl Fn(i8, i8) -> i8) -> &[i8] {
    let Packed::Table(table) = slot.get_or_init(|| Packed::Table(ops::pair_table(f))) else {
        unreachable!("a two-input op keeps its table as Packed::Table")
    };
    table
}
