//! Running an [`IntegerModel`]: shape checks, the weight cache, and one kernel per node.

use std::sync::OnceLock;

use crate::kernels::{self, Packed};
use crate::model::{Grid, IntOp, IntegerModel, ModelError, RunError};
use crate::ops;

/// A tensor flowing through the integer model.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Values {
    /// 8-bit values on a grid.
    Int {
        data: Vec<i8>,
        shape: Vec<usize>,
        grid: Grid,
    },
    /// Float values (model input, a float last layer).
    Float { data: Vec<f32>, shape: Vec<usize> },
}

impl Values {
    fn shape(&self) -> &[usize] {
        match self {
            Values::Int { shape, .. } | Values::Float { shape, .. } => shape,
        }
    }
}

/// Weights laid out for this machine's GEMM kernels, one slot per node, filled on first use.
/// Kept beside the model's data, never saved or compared; a clone starts empty. After editing
/// a model's nodes in place, call [`IntegerModel::clear_cache`].
#[derive(Default)]
pub struct WeightCache(OnceLock<Vec<OnceLock<Packed>>>);

impl WeightCache {
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

    /// Forgets the packed weights (after editing nodes in place).
    pub fn clear_cache(&mut self) {
        self.cache = WeightCache::default();
    }

    fn run(&self, input: &[f32], reference: bool) -> Result<Values, RunError> {
        self.validate()?;
        let item: usize = self.input_shape().iter().product();
        if item == 0 || input.len() % item != 0 {
            return Err(RunError::Input {
                len: input.len(),
                input_shape: self.input_shape(),
            });
        }
        let batch = input.len() / item;
        let mut last_use = vec![0; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for j in &n.inputs {
                last_use[*j] = i;
            }
        }
        last_use[self.output] = usize::MAX;
        let mut values: Vec<Option<Values>> = vec![None; self.nodes.len()];
        // On a pool thread, so that the kernels' parallel loops split without a hand-off per node.
        rayon::scope(|_| {
            for i in 0..self.nodes.len() {
                let v = self.node(i, batch, input, &values, reference)?;
                let want: Vec<usize> = self.nodes[i].shape.iter().map(|d| d.at(batch)).collect();
                if v.shape() != want {
                    return Err(err(
                        self,
                        i,
                        format!("computes shape {:?}, declares {want:?}", v.shape()),
                    ));
                }
                values[i] = Some(v);
                for j in &self.nodes[i].inputs {
                    if last_use[*j] == i {
                        values[*j] = None;
                    }
                }
            }
            Ok(())
        })?;
        Ok(values[self.output].take().expect("the output is kept"))
    }

    fn node(
        &self,
        i: usize,
        batch: usize,
        input: &[f32],
        values: &[Option<Values>],
        reference: bool,
    ) -> Result<Values, RunError> {
        let node = &self.nodes[i];
        let int = |k: usize| -> Result<(&[i8], &[usize], Grid), RunError> {
            match values[node.inputs[k]].as_ref() {
                Some(Values::Int { data, shape, grid }) => Ok((data, shape, *grid)),
                _ => Err(err(self, i, format!("input {k} is not an integer tensor"))),
            }
        };
        let grid = || {
            node.grid
                .ok_or_else(|| err(self, i, "has no output grid".into()))
        };
        let with = |data: Vec<i8>, shape: Vec<usize>| -> Result<Values, RunError> {
            Ok(Values::Int {
                data,
                shape,
                grid: grid()?,
            })
        };
        Ok(match &node.op {
            IntOp::Input => Values::Float {
                data: input.to_vec(),
                shape: node.shape.iter().map(|d| d.at(batch)).collect(),
            },
            IntOp::Quantize(g) => match values[node.inputs[0]].as_ref() {
                Some(Values::Float { data, shape }) => Values::Int {
                    data: ops::quantize(g, data),
                    shape: shape.clone(),
                    grid: *g,
                },
                _ => return Err(err(self, i, "quantizes a non-float tensor".into())),
            },
            IntOp::Conv2d(c) => {
                let (x, shape, _) = int(0)?;
                check_conv(c, shape).map_err(|e| err(self, i, e))?;
                if reference {
                    kernels::conv2d_reference(c, x, shape)
                } else if c.is_depthwise() {
                    kernels::depthwise_conv2d(c, x, shape)
                } else {
                    kernels::conv2d(c, self.cache.slot(i, self.nodes.len()), x, shape)
                }
            }
            IntOp::Linear(l) => {
                let (x, shape, _) = int(0)?;
                if shape.last() != Some(&l.in_features) {
                    return Err(err(
                        self,
                        i,
                        format!("input {shape:?} does not end in {}", l.in_features),
                    ));
                }
                if reference {
                    kernels::linear_reference(l, x, shape)
                } else {
                    kernels::linear(l, self.cache.slot(i, self.nodes.len()), x, shape)
                }
            }
            IntOp::Add(a) => {
                let ((x, sx, _), (y, sy, _)) = (int(0)?, int(1)?);
                let out = ops::broadcast_shape(sx, sy)
                    .ok_or_else(|| err(self, i, format!("{sx:?} and {sy:?} do not broadcast")))?;
                with(ops::add(a, x, sx, y, sy, &out), out)?
            }
            IntOp::Mul(m) => {
                let ((x, sx, _), (y, sy, _)) = (int(0)?, int(1)?);
                let out = ops::broadcast_shape(sx, sy)
                    .ok_or_else(|| err(self, i, format!("{sx:?} and {sy:?} do not broadcast")))?;
                with(ops::mul(m, x, sx, y, sy, &out), out)?
            }
            IntOp::Concat { axis, requantize } => {
                let mut parts: Vec<(std::borrow::Cow<[i8]>, &[usize])> = Vec::new();
                for (k, table) in requantize.iter().enumerate() {
                    let (x, s, _) = int(k)?;
                    let first = parts.first().map(|p| p.1).unwrap_or(s);
                    let fits = s.len() == first.len()
                        && *axis < s.len()
                        && s.iter()
                            .zip(first)
                            .enumerate()
                            .all(|(d, (a, b))| d == *axis || a == b);
                    if !fits {
                        return Err(err(
                            self,
                            i,
                            format!(
                                "input {k} of shape {s:?} does not concatenate with {first:?} on axis {axis}"
                            ),
                        ));
                    }
                    parts.push((
                        match table {
                            Some(t) => std::borrow::Cow::Owned(ops::lut(t, x)),
                            None => std::borrow::Cow::Borrowed(x),
                        },
                        s,
                    ));
                }
                let refs: Vec<(&[i8], &[usize])> =
                    parts.iter().map(|(d, s)| (&d[..], *s)).collect();
                let (data, shape) = ops::concat(*axis, &refs);
                with(data, shape)?
            }
            IntOp::MaxPool(w) => {
                let (x, shape, g) = int(0)?;
                ops::pool_shape(w, shape)
                    .ok_or_else(|| err(self, i, format!("window does not fit {shape:?}")))?;
                let (data, shape) = ops::max_pool(w, x, shape);
                Values::Int {
                    data,
                    shape,
                    grid: g,
                }
            }
            IntOp::AvgPool {
                window,
                count_include_pad,
                input: g_in,
            } => {
                let (x, shape, _) = int(0)?;
                ops::pool_shape(window, shape)
                    .ok_or_else(|| err(self, i, format!("window does not fit {shape:?}")))?;
                let (data, shape) =
                    ops::avg_pool(window, *count_include_pad, g_in, &grid()?, x, shape);
                with(data, shape)?
            }
            IntOp::AdaptiveAvgPool {
                output,
                input: g_in,
            } => {
                let (x, shape, _) = int(0)?;
                if !(shape.len() == 4 || shape.len() == 3 && output[0] == 1) {
                    return Err(err(self, i, format!("adaptive pooling of {shape:?}")));
                }
                let (data, shape) = ops::adaptive_avg_pool(*output, g_in, &grid()?, x, shape);
                with(data, shape)?
            }
            IntOp::Reduce {
                axis,
                mean,
                input: g_in,
            } => {
                let (x, shape, _) = int(0)?;
                if *axis >= shape.len() {
                    return Err(err(self, i, format!("axis {axis} of {shape:?}")));
                }
                let (data, shape) = ops::reduce(*axis, *mean, g_in, &grid()?, x, shape);
                with(data, shape)?
            }
            IntOp::Lut(t) => {
                let (x, shape, _) = int(0)?;
                with(ops::lut(t, x), shape.to_vec())?
            }
            IntOp::Reshape => {
                let shape: Vec<usize> = node.shape.iter().map(|d| d.at(batch)).collect();
                match values[node.inputs[0]].as_ref() {
                    Some(Values::Int { data, grid, .. })
                        if data.len() == shape.iter().product::<usize>() =>
                    {
                        Values::Int {
                            data: data.clone(),
                            shape,
                            grid: *grid,
                        }
                    }
                    Some(Values::Float { data, .. })
                        if data.len() == shape.iter().product::<usize>() =>
                    {
                        Values::Float {
                            data: data.clone(),
                            shape,
                        }
                    }
                    _ => {
                        return Err(err(
                            self,
                            i,
                            format!("cannot reshape its input to {shape:?}"),
                        ));
                    }
                }
            }
            IntOp::Permute { perm } => match values[node.inputs[0]].as_ref() {
                Some(Values::Int { data, shape, grid }) if perm.len() == shape.len() => {
                    let (data, shape) = ops::permute(perm, data, shape);
                    Values::Int {
                        data,
                        shape,
                        grid: *grid,
                    }
                }
                Some(Values::Float { data, shape }) if perm.len() == shape.len() => {
                    let (data, shape) = ops::permute(perm, data, shape);
                    Values::Float { data, shape }
                }
                _ => {
                    return Err(err(
                        self,
                        i,
                        "permutation rank differs from its input's".into(),
                    ));
                }
            },
        })
    }
}

fn check_conv(c: &crate::model::IntConv2d, shape: &[usize]) -> Result<(), String> {
    let ok = match shape.len() {
        4 => true,
        3 => c.kernel[0] == 1 && c.padding[0] + c.padding[1] == 0,
        _ => false,
    };
    if !ok || shape[1] != c.in_channels {
        return Err(format!(
            "input {shape:?} is not [n, {}, h, w] (or [n, {}, l] for a 1-D convolution)",
            c.in_channels, c.in_channels
        ));
    }
    let [_, _, h, w] = ops::nchw(shape);
    let fits = crate::model::conv_output_len(
        h,
        c.padding[0] + c.padding[1],
        c.dilation[0],
        c.kernel[0],
        c.stride[0],
    )
    .is_some()
        && crate::model::conv_output_len(
            w,
            c.padding[2] + c.padding[3],
            c.dilation[1],
            c.kernel[1],
            c.stride[1],
        )
        .is_some();
    if !fits {
        return Err(format!(
            "kernel {:?} does not fit input {shape:?}",
            c.kernel
        ));
    }
    Ok(())
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
