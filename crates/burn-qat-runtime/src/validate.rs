//! [`IntegerModel::validate`]: the invariants the kernels rely on, so that a model read from a
//! file or built by hand is refused with a message instead of panicking or allocating without
//! bound, and its cost within its [`Budget`]. Every number read from the model enters
//! arithmetic checked, saturating or widened (`i64`/`u64`/`u128`), so that no value, `i64::MIN`
//! included, overflows here or in the kernels.

use crate::budget::{self, Budget, Cost};
use crate::model::{Dim, Grid, IntOp, IntegerModel, MAX_ITEM_VALUES, ModelError, Output};
use crate::ops;
use crate::requant::FixedMultiplier;

fn multiplier_ok(m: &FixedMultiplier) -> bool {
    (-31..=62).contains(&m.shift) && m.m0 >= 0
}

fn grid_ok(g: &Grid, what: &str) -> Result<(), String> {
    if g.is_valid() {
        Ok(())
    } else {
        Err(format!(
            "{what} grid {g:?} is not usable (scale must be finite and > 0, -128 <= qmin < qmax <= 127, \
             qmin <= zero_point <= qmax)"
        ))
    }
}

fn clamp_ok(lo: i32, hi: i32) -> Result<(), String> {
    if lo > hi || lo < -128 || hi > 127 {
        return Err(format!("clamp [{lo}, {hi}] is not an interval within int8"));
    }
    Ok(())
}

/// A clamp that keeps values on the output grid (the next layer's accumulator bound assumes
/// its inputs are).
fn within(lo: i32, hi: i32, g: &Grid) -> Result<(), String> {
    if lo < g.qmin || hi > g.qmax {
        return Err(format!(
            "clamp [{lo}, {hi}] leaves the output grid [{}, {}]",
            g.qmin, g.qmax
        ));
    }
    Ok(())
}

/// Largest number of 8-bit differences `q - zp` (each at most 255 in magnitude) an int32 sum
/// of a pooling window or reduction may add up.
const MAX_SUM_TERMS: usize = (i32::MAX / 255) as usize;

/// The largest `|accumulator|` any output channel can reach: `|bias| + sum |w| * max |q - zp|`
/// over the input grid's integers. Every partial sum is bounded by it too. `channel_of(i)` is
/// the output channel of weight `i`; validation refuses a conv/linear whose bound passes
/// `i32::MAX`, and conversion uses it to choose the weights' bits.
///
/// ```
/// use burn_qat_runtime::{Grid, accumulator_bound};
///
/// let input = Grid { scale: 0.1, zero_point: -28, qmin: -128, qmax: 127 };
/// // One channel: |5| + (|2| + |-3|) * max(127 + 28, -28 + 128) = 5 + 5 * 155.
/// assert_eq!(accumulator_bound(&[2, -3], |_| 0, &[5], &input), 780);
/// ```
pub fn accumulator_bound(
    weight: &[i8],
    channel_of: impl Fn(usize) -> usize,
    bias: &[i32],
    input: &Grid,
) -> i64 {
    let mut sums = vec![0i64; bias.len()];
    for (i, w) in weight.iter().enumerate() {
        if let Some(s) = sums.get_mut(channel_of(i)) {
            *s += (*w as i64).abs();
        }
    }
    let x = i64::from((input.qmax - input.zero_point).max(input.zero_point - input.qmin));
    sums.iter()
        .zip(bias)
        .map(|(s, b)| (*b as i64).abs() + s * x)
        .max()
        .unwrap_or(0)
}

/// Weights, their bits and scales, bias and input of a conv/linear, and how its accumulator
/// stays in int32.
fn affine_ok(
    weight: &[i8],
    bits: u32,
    scales: &[f32],
    bias: &[i32],
    input: &Grid,
    channel_of: impl Fn(usize) -> usize,
) -> Result<(), String> {
    if !(2..=8).contains(&bits) {
        return Err(format!("{bits}-bit weights: weights have 2 to 8 bits"));
    }
    if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(format!("weight scale {s}: scales are finite and > 0"));
    }
    grid_ok(input, "input")?;
    let bound = accumulator_bound(weight, channel_of, bias, input);
    if bound > i32::MAX as i64 {
        return Err(format!(
            "the int32 accumulator can reach {bound} (bias plus the largest sum of products), above {}",
            i32::MAX
        ));
    }
    Ok(())
}

fn output_ok(o: &Output, channels: usize) -> Result<(), String> {
    match o {
        Output::Quantized {
            grid,
            requant,
            lo,
            hi,
        } => {
            grid_ok(grid, "output")?;
            if requant.len() != channels || !requant.iter().all(multiplier_ok) {
                return Err(format!(
                    "{} requantization multipliers for {channels} channels (or one out of range)",
                    requant.len()
                ));
            }
            clamp_ok(*lo, *hi)?;
            within(*lo, *hi, grid)?;
        }
        Output::Float { scale, lo, hi } => {
            if scale.len() != channels {
                return Err(format!(
                    "{} output scales for {channels} channels",
                    scale.len()
                ));
            }
            if let Some(s) = scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(format!("output scale {s}: scales are finite and > 0"));
            }
            if lo.is_nan() || hi.is_nan() || lo > hi {
                return Err(format!("float clamp [{lo}, {hi}] is not an interval"));
            }
        }
    }
    Ok(())
}

/// The output shape of node `op` at one batch size, from its inputs' shapes: the one shape
/// rule, used by [`IntegerModel::validate`] (at batch 1 and 2) and before every kernel runs.
pub(crate) fn infer(
    op: &IntOp,
    inputs: &[Vec<usize>],
    declared: &[usize],
) -> Result<Vec<usize>, String> {
    let x = || inputs[0].clone();
    Ok(match op {
        IntOp::Input => declared.to_vec(),
        IntOp::Quantize(_) | IntOp::Lut(_) => x(),
        IntOp::ChannelLut { channels, .. } => {
            let s = x();
            if s.len() < 2 || s[1] != *channels {
                return Err(format!("{channels} per-channel tables for input {s:?}"));
            }
            s
        }
        IntOp::Conv2d(c) => {
            let s = x();
            let one_d = s.len() == 3 && c.kernel[0] == 1 && c.padding[0] + c.padding[1] == 0;
            if !(s.len() == 4 || one_d) || s[1] != c.in_channels {
                return Err(format!(
                    "convolution of {} channels on input {s:?}",
                    c.in_channels
                ));
            }
            let w = crate::model::Window {
                kernel: c.kernel,
                stride: c.stride,
                padding: c.padding,
                dilation: c.dilation,
            };
            let mut out = ops::pool_shape(&w, &s).ok_or(format!("kernel does not fit {s:?}"))?;
            out[1] = c.out_channels;
            out
        }
        IntOp::Linear(l) => {
            let mut s = x();
            match s.last_mut() {
                Some(last) if *last == l.in_features => *last = l.out_features,
                _ => return Err(format!("linear of {} features on {s:?}", l.in_features)),
            }
            s
        }
        IntOp::Add(_) | IntOp::Mul(_) => ops::broadcast_shape(&inputs[0], &inputs[1]).ok_or(
            format!("{:?} and {:?} do not broadcast", inputs[0], inputs[1]),
        )?,
        IntOp::Concat { axis, .. } => {
            let mut out = x();
            if *axis >= out.len() {
                return Err(format!("axis {axis} of {out:?}"));
            }
            out[*axis] = 0;
            for s in inputs {
                let fits = s.len() == out.len()
                    && s.iter()
                        .zip(&inputs[0])
                        .enumerate()
                        .all(|(d, (a, b))| d == *axis || a == b);
                if !fits {
                    return Err(format!("{s:?} does not concatenate with {:?}", inputs[0]));
                }
                out[*axis] = out[*axis].saturating_add(s[*axis]);
            }
            out
        }
        IntOp::MaxPool(w) | IntOp::AvgPool { window: w, .. } => {
            ops::pool_shape(w, &x()).ok_or(format!("window does not fit {:?}", x()))?
        }
        IntOp::AdaptiveAvgPool { output, .. } => {
            let s = x();
            match s.len() {
                4 => vec![s[0], s[1], output[0], output[1]],
                3 if output[0] == 1 => vec![s[0], s[1], output[1]],
                _ => return Err(format!("adaptive pooling to {output:?} of {s:?}")),
            }
        }
        IntOp::Reduce { axis, .. } => {
            let mut s = x();
            if *axis >= s.len() {
                return Err(format!("axis {axis} of {s:?}"));
            }
            s[*axis] = 1;
            s
        }
        IntOp::Reshape => {
            let (a, b): (usize, usize) = (x().iter().product(), declared.iter().product());
            if a != b {
                return Err(format!("reshape of {:?} ({a} values) to {declared:?}", x()));
            }
            declared.to_vec()
        }
        IntOp::Permute { perm } => {
            let s = x();
            let mut seen = vec![false; s.len()];
            for p in perm {
                if *p >= s.len() || std::mem::replace(&mut seen[*p], true) {
                    return Err(format!("{perm:?} is not a permutation of {} axes", s.len()));
                }
            }
            if perm.len() != s.len() {
                return Err(format!("{perm:?} is not a permutation of {} axes", s.len()));
            }
            perm.iter().map(|p| s[*p]).collect()
        }
    })
}

/// Window sizes small enough that no size computed from them overflows.
fn window_ok(
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 4],
    dilation: [usize; 2],
) -> Result<(), String> {
    if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
        return Err("zero stride, dilation or kernel".into());
    }
    let all = kernel
        .iter()
        .chain(&stride)
        .chain(&padding)
        .chain(&dilation);
    if let Some(v) = all.into_iter().find(|v| **v > MAX_ITEM_VALUES) {
        return Err(format!("window size {v} is above {MAX_ITEM_VALUES}"));
    }
    Ok(())
}

/// What a kernel allocates or sums for input shape `s` (batch 1) stays bounded: the padded
/// image a convolution builds (and indexes with i32 offsets), and the int32 sums of pooling
/// windows and reductions.
fn resources_ok(op: &IntOp, s: &[usize]) -> Result<(), String> {
    let padded_plane = |padding: [usize; 4]| -> Option<usize> {
        let [_, _, h, w] = ops::nchw(s);
        h.checked_add(padding[0] + padding[1])?
            .checked_mul(w.checked_add(padding[2] + padding[3])?)
    };
    match op {
        IntOp::Conv2d(c) if s.len() >= 3 => {
            let image = padded_plane(c.padding).and_then(|p| p.checked_mul(c.in_channels));
            if image.is_none_or(|v| v > i32::MAX as usize) {
                return Err(format!(
                    "the padded input ({} channels of {s:?} with padding {:?}) is above {} values",
                    c.in_channels,
                    c.padding,
                    i32::MAX
                ));
            }
        }
        IntOp::AdaptiveAvgPool { .. } if s.len() >= 3 => {
            let [_, _, h, w] = ops::nchw(s);
            if h.saturating_mul(w) > MAX_SUM_TERMS {
                return Err(format!(
                    "adaptive pooling of {h} x {w} planes can sum more than {MAX_SUM_TERMS} values in int32"
                ));
            }
        }
        IntOp::Reduce { axis, .. } if s.get(*axis).is_some_and(|n| *n > MAX_SUM_TERMS) => {
            return Err(format!(
                "a reduction over {} values sums more than {MAX_SUM_TERMS} values in int32",
                s[*axis]
            ));
        }
        _ => {}
    }
    Ok(())
}

/// A table of `len` entries between two usable grids, its values on the output grid.
fn table_ok(t: &crate::model::Lut, len: usize) -> Result<(), String> {
    if t.table.len() != len {
        return Err(format!(
            "lookup table of {} entries, not {len}",
            t.table.len()
        ));
    }
    grid_ok(&t.input, "table input")?;
    grid_ok(&t.output, "table output")?;
    if let Some(v) = t
        .table
        .iter()
        .find(|v| !(t.output.qmin..=t.output.qmax).contains(&i32::from(**v)))
    {
        return Err(format!(
            "table value {v} is outside its output grid [{}, {}]",
            t.output.qmin, t.output.qmax
        ));
    }
    Ok(())
}

/// Structural checks of one node: its parameters agree with each other.
fn check_params(op: &IntOp, n_inputs: usize) -> Result<(), String> {
    let arity = match op {
        IntOp::Input => 0,
        IntOp::Add(_) | IntOp::Mul(_) => 2,
        IntOp::Concat { requantize, .. } if requantize.is_empty() => {
            return Err("a concatenation of no inputs".into());
        }
        IntOp::Concat { requantize, .. } => requantize.len(),
        _ => 1,
    };
    if n_inputs != arity {
        return Err(format!("{n_inputs} inputs, the op takes {arity}"));
    }
    match op {
        IntOp::Quantize(g) => grid_ok(g, "quantization")?,
        IntOp::Conv2d(c) => {
            let g = c.groups;
            if g == 0 || c.in_channels % g != 0 || c.out_channels % g != 0 {
                return Err(format!(
                    "{} groups do not divide {} input and {} output channels",
                    g, c.in_channels, c.out_channels
                ));
            }
            let len = c
                .out_channels
                .checked_mul(c.in_channels / g)
                .and_then(|v| v.checked_mul(c.kernel[0]))
                .and_then(|v| v.checked_mul(c.kernel[1]));
            if len != Some(c.weight.len()) {
                return Err(format!(
                    "{} weights for [{}, {}, {}, {}]",
                    c.weight.len(),
                    c.out_channels,
                    c.in_channels / g,
                    c.kernel[0],
                    c.kernel[1]
                ));
            }
            if c.bias.len() != c.out_channels || c.weight_scale.len() != c.out_channels {
                return Err(
                    "bias or weight scales do not have one value per output channel".into(),
                );
            }
            window_ok(c.kernel, c.stride, c.padding, c.dilation)?;
            if c.in_channels == 0 || c.out_channels == 0 {
                return Err("a convolution without channels".into());
            }
            let per = c.weight.len() / c.out_channels;
            affine_ok(
                &c.weight,
                c.weight_bits,
                &c.weight_scale,
                &c.bias,
                &c.input,
                |i| i / per,
            )?;
            output_ok(&c.output, c.out_channels)?;
        }
        IntOp::Linear(l) => {
            if l.in_features.checked_mul(l.out_features) != Some(l.weight.len()) {
                return Err(format!(
                    "{} weights for [{}, {}]",
                    l.weight.len(),
                    l.in_features,
                    l.out_features
                ));
            }
            if l.bias.len() != l.out_features || l.weight_scale.len() != l.out_features {
                return Err(
                    "bias or weight scales do not have one value per output feature".into(),
                );
            }
            if l.in_features == 0 || l.out_features == 0 {
                return Err("a linear layer without features".into());
            }
            let out = l.out_features;
            affine_ok(
                &l.weight,
                l.weight_bits,
                &l.weight_scale,
                &l.bias,
                &l.input,
                |i| i % out,
            )?;
            output_ok(&l.output, l.out_features)?;
        }
        IntOp::Add(a) => {
            for g in [&a.a, &a.b, &a.out] {
                grid_ok(g, "add")?;
            }
            // `unsigned_abs`: `i64::MIN` has no `abs`.
            let bound = 1u64 << 62;
            if !(1..=62).contains(&a.shift)
                || a.ma.unsigned_abs() >= bound
                || a.mb.unsigned_abs() >= bound
            {
                return Err(format!(
                    "fixed-point add shift {} or multipliers {} and {} out of range (shift in 1..=62, \
                     |multiplier| < 2^62)",
                    a.shift, a.ma, a.mb
                ));
            }
            clamp_ok(a.lo, a.hi)?;
            within(a.lo, a.hi, &a.out)?;
            // The rescaled sum must fit i64 after the shift (and an int8 before the clamp).
            let reach = (a.ma.unsigned_abs() as u128 + a.mb.unsigned_abs() as u128) * 256;
            if reach >> a.shift > i32::MAX as u128 {
                return Err("fixed-point add multipliers too large for their shift".into());
            }
        }
        IntOp::Mul(m) => {
            for g in [&m.a, &m.b, &m.out] {
                grid_ok(g, "mul")?;
            }
            if !multiplier_ok(&m.multiplier) {
                return Err("multiplier out of range".into());
            }
            clamp_ok(m.lo, m.hi)?;
            within(m.lo, m.hi, &m.out)?;
        }
        IntOp::ChannelLut { lut, channels } => {
            if *channels == 0 || channels.checked_mul(256) != Some(lut.table.len()) {
                return Err(format!(
                    "{} table entries for {channels} channels of 256",
                    lut.table.len()
                ));
            }
            table_ok(lut, lut.table.len())?;
        }
        IntOp::Lut(t) => table_ok(t, 256)?,
        IntOp::Concat { requantize, .. } => {
            for t in requantize.iter().flatten() {
                table_ok(t, 256)?;
            }
        }
        IntOp::MaxPool(w) => window_ok(w.kernel, w.stride, w.padding, w.dilation)?,
        IntOp::AvgPool {
            window: w, input, ..
        } => {
            window_ok(w.kernel, w.stride, w.padding, w.dilation)?;
            if w.kernel[0].saturating_mul(w.kernel[1]) > MAX_SUM_TERMS {
                return Err(format!(
                    "an average over a {:?} window sums more than {MAX_SUM_TERMS} values in int32",
                    w.kernel
                ));
            }
            grid_ok(input, "input")?;
        }
        IntOp::AdaptiveAvgPool { output, input } => {
            if output.contains(&0) {
                return Err("adaptive pooling to an empty output".into());
            }
            grid_ok(input, "input")?;
        }
        IntOp::Reduce { input, .. } => grid_ok(input, "input")?,
        _ => {}
    }
    Ok(())
}

impl IntegerModel {
    /// Checks every invariant the kernels rely on: node 0 is the only input, every node reads
    /// earlier nodes with the right number of inputs, parameters agree with each other (weight
    /// and bias lengths, groups, 256-entry tables, multipliers in range, usable grids), every
    /// declared shape follows from its inputs' at two batch sizes, no tensor exceeds
    /// [`MAX_ITEM_VALUES`] values per item, integer ops read integer tensors, and the model's
    /// work and memory per batch item stay within its [`Budget`] (the default, or the one
    /// given by [`with_budget`](Self::with_budget)); see [`cost`](Self::cost).
    ///
    /// # Errors
    ///
    /// The first problem, naming the node (for the budget, the node where a total crossed
    /// its limit, the limit and how to raise it).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.check(&self.budget).map(|_| ())
    }

    /// [`validate`](Self::validate) against `budget`, returning the model's cost.
    pub(crate) fn check(&self, budget: &Budget) -> Result<Cost, ModelError> {
        let fail = |i: usize, what: String| ModelError {
            node: i,
            name: self
                .nodes
                .get(i)
                .map_or_else(String::new, |n| n.name.clone()),
            what,
        };
        if !matches!(self.nodes.first().map(|n| &n.op), Some(IntOp::Input)) {
            return Err(fail(0, "the first node must be the input".into()));
        }
        if self.output >= self.nodes.len() {
            return Err(fail(
                self.output,
                format!("output node {} does not exist", self.output),
            ));
        }
        let input = &self.nodes[0].shape;
        if input.first() != Some(&Dim::Batch(1))
            || input[1..]
                .iter()
                .any(|d| !matches!(d, Dim::Fixed(v) if *v > 0))
        {
            return Err(fail(
                0,
                format!("input shape {input:?} is not [batch, fixed sizes > 0]"),
            ));
        }
        let mut int = vec![false; self.nodes.len()];
        let mut grids: Vec<Option<Grid>> = Vec::with_capacity(self.nodes.len());
        let mut shapes: [Vec<Vec<usize>>; 2] = [Vec::new(), Vec::new()];
        // The budget: when each value dies (as the runner frees it: after its last reader;
        // never for the output or a value nobody reads), the bytes alive, kept and working.
        let mut last_use = vec![0usize; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for j in &node.inputs {
                if let Some(l) = last_use.get_mut(*j) {
                    *l = i;
                }
            }
        }
        last_use[self.output] = usize::MAX;
        let mut alive = vec![0u64; self.nodes.len()];
        let (mut live, mut peak, mut kept, mut scratch) = (0u64, 0u64, 0u64, 0u64);
        let mut cost = Cost::default();
        let raise = "a model from a trusted source can have more with \
                     `IntegerModel::with_budget` or `format::load_with_budget`";
        for (i, node) in self.nodes.iter().enumerate() {
            if i > 0 && matches!(node.op, IntOp::Input) {
                return Err(fail(i, "a second input".into()));
            }
            if let Some(j) = node.inputs.iter().find(|j| **j >= i) {
                return Err(fail(
                    i,
                    format!("reads node {j}, which does not run before it"),
                ));
            }
            check_params(&node.op, node.inputs.len()).map_err(|e| fail(i, e))?;
            if node.shape.len() > 8 {
                return Err(fail(i, format!("rank {} is above 8", node.shape.len())));
            }
            let mut item = 1usize;
            for d in &node.shape {
                let v = match d {
                    Dim::Fixed(v) | Dim::Batch(v) => *v,
                };
                item = item
                    .checked_mul(v.max(1))
                    .filter(|v| *v <= MAX_ITEM_VALUES)
                    .ok_or_else(|| {
                        fail(
                            i,
                            format!(
                                "shape {:?} is above {MAX_ITEM_VALUES} values per item",
                                node.shape
                            ),
                        )
                    })?;
            }
            for (b, batch) in [1usize, 2].into_iter().enumerate() {
                let declared: Vec<usize> = node.shape.iter().map(|d| d.at(batch)).collect();
                let ins: Vec<Vec<usize>> =
                    node.inputs.iter().map(|j| shapes[b][*j].clone()).collect();
                let got = infer(&node.op, &ins, &declared).map_err(|e| fail(i, e))?;
                if got != declared {
                    return Err(fail(
                        i,
                        format!("computes shape {got:?} at batch {batch}, declares {declared:?}"),
                    ));
                }
                shapes[b].push(got);
            }
            if let Some(j) = node.inputs.first() {
                resources_ok(&node.op, &shapes[0][*j]).map_err(|e| fail(i, e))?;
            }
            let ins: Vec<Vec<usize>> = node.inputs.iter().map(|j| shapes[0][*j].clone()).collect();
            let share = budget::node_cost(node, &ins, &shapes[0][i], i == self.output);
            cost.work = cost.work.saturating_add(share.work);
            if cost.work > budget.max_work {
                return Err(fail(
                    i,
                    format!(
                        "the model needs {} units of work per batch item up to this node ({} \
                         here), above the budget's max_work of {}: {raise}",
                        cost.work, share.work, budget.max_work
                    ),
                ));
            }
            alive[i] = share.output;
            live = live.saturating_add(share.output);
            peak = peak.max(live);
            for j in &node.inputs {
                if last_use[*j] == i {
                    live = live.saturating_sub(std::mem::take(&mut alive[*j]));
                }
            }
            kept = kept.saturating_add(share.kept);
            scratch = scratch.max(share.scratch);
            cost.memory_bytes = kept.saturating_add(peak).saturating_add(scratch);
            if cost.memory_bytes > budget.max_memory_bytes {
                return Err(fail(
                    i,
                    format!(
                        "the model needs {} bytes of memory up to this node (its output {} \
                         bytes, its kernel's buffers {}, the model with its packed weights and \
                         tables {}, the largest set of values alive at once {}), above the \
                         budget's max_memory_bytes of {}: {raise}",
                        cost.memory_bytes,
                        share.output,
                        share.scratch,
                        kept,
                        peak,
                        budget.max_memory_bytes
                    ),
                ));
            }
            // Which inputs must be integers, and whether the output is.
            let (needs_int, out_int) = match &node.op {
                IntOp::Input => (false, false),
                IntOp::Quantize(_) => {
                    if int[node.inputs[0]] {
                        return Err(fail(i, "quantizes an integer tensor".into()));
                    }
                    (false, true)
                }
                IntOp::Reshape | IntOp::Permute { .. } => (false, int[node.inputs[0]]),
                IntOp::Conv2d(c) => (true, matches!(c.output, Output::Quantized { .. })),
                IntOp::Linear(l) => (true, matches!(l.output, Output::Quantized { .. })),
                _ => (true, true),
            };
            if needs_int && let Some(j) = node.inputs.iter().find(|j| !int[**j]) {
                return Err(fail(
                    i,
                    format!("reads node {j}, which is not an integer tensor"),
                ));
            }
            if out_int != node.grid.is_some() {
                return Err(fail(
                    i,
                    "its grid does not say whether its output is an integer tensor".into(),
                ));
            }
            if let Some(g) = &node.grid {
                grid_ok(g, "output").map_err(|e| fail(i, e))?;
            }
            let declared = match &node.op {
                IntOp::Quantize(g) => Some(*g),
                IntOp::Conv2d(c) => c.output.grid(),
                IntOp::Linear(l) => l.output.grid(),
                IntOp::Add(a) => Some(a.out),
                IntOp::Mul(m) => Some(m.out),
                IntOp::Lut(t) | IntOp::ChannelLut { lut: t, .. } => Some(t.output),
                IntOp::MaxPool(_) | IntOp::Reshape | IntOp::Permute { .. } => grids[node.inputs[0]],
                _ => node.grid,
            };
            if declared != node.grid {
                return Err(fail(
                    i,
                    format!(
                        "output grid {:?} differs from its op's {declared:?}",
                        node.grid
                    ),
                ));
            }
            let reads = |k: usize| grids[node.inputs[k]];
            let expected_inputs: Vec<(usize, Grid)> = match &node.op {
                IntOp::Conv2d(c) => vec![(0, c.input)],
                IntOp::Linear(l) => vec![(0, l.input)],
                IntOp::Add(a) => vec![(0, a.a), (1, a.b)],
                IntOp::Mul(m) => vec![(0, m.a), (1, m.b)],
                IntOp::Lut(t) | IntOp::ChannelLut { lut: t, .. } => vec![(0, t.input)],
                IntOp::AvgPool { input, .. }
                | IntOp::AdaptiveAvgPool { input, .. }
                | IntOp::Reduce { input, .. } => vec![(0, *input)],
                IntOp::Concat { requantize, .. } => requantize
                    .iter()
                    .enumerate()
                    .map(|(k, t)| {
                        (
                            k,
                            t.as_ref().map_or(
                                node.grid.unwrap_or(Grid {
                                    scale: 1.0,
                                    zero_point: 0,
                                    qmin: -128,
                                    qmax: 127,
                                }),
                                |t| t.input,
                            ),
                        )
                    })
                    .collect(),
                _ => vec![],
            };
            if let IntOp::Concat { requantize, .. } = &node.op
                && requantize
                    .iter()
                    .flatten()
                    .any(|t| Some(t.output) != node.grid)
            {
                return Err(fail(
                    i,
                    "a requantization table does not map to the concatenation's grid".into(),
                ));
            }
            for (k, g) in expected_inputs {
                if reads(k) != Some(g) {
                    return Err(fail(
                        i,
                        format!("input {k} is on grid {:?}, the op expects {g:?}", reads(k)),
                    ));
                }
            }
            grids.push(node.grid);
            int[i] = out_int;
        }
        Ok(cost)
    }
}
