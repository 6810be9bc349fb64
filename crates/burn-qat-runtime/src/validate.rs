//! [`IntegerModel::validate`]: the invariants the kernels rely on, so that a model read from a
//! file or built by hand is refused with a message instead of panicking or allocating without
//! bound, and its cost within its [`Budget`]. Every number read from the model enters
//! arithmetic checked, saturating or widened (`i64`/`u64`/`u128`), so that no value, `i64::MIN`
//! included, overflows here or in the kernels.

use crate::budget::{self, Budget, Cost, NodeCost};
use crate::model::{
    Dim, Grid, IntAdd, IntConv2d, IntLayerNorm, IntLinear, IntMatMul, IntMul, IntNode, IntOp,
    IntSoftmax, IntegerModel, Lut, MAX_ITEM_VALUES, ModelError, Output, Window,
};
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
/// One rule per op below.
pub(crate) fn infer(
    op: &IntOp,
    inputs: &[Vec<usize>],
    declared: &[usize],
) -> Result<Vec<usize>, String> {
    let x = || inputs[0].clone();
    match op {
        IntOp::Input => Ok(declared.to_vec()),
        IntOp::Quantize(_) | IntOp::Lut(_) => Ok(x()),
        IntOp::ChannelLut { channels, .. } => channel_lut_shape(*channels, x()),
        IntOp::Conv2d(c) => conv2d_shape(c, x()),
        IntOp::Linear(l) => linear_shape(l, x()),
        IntOp::Add(_) | IntOp::Mul(_) => ops::broadcast_shape(&inputs[0], &inputs[1]).ok_or(
            format!("{:?} and {:?} do not broadcast", inputs[0], inputs[1]),
        ),
        IntOp::Concat { axis, .. } => concat_shape(*axis, inputs),
        IntOp::MaxPool(w) | IntOp::AvgPool { window: w, .. } => {
            ops::pool_shape(w, &x()).ok_or(format!("window does not fit {:?}", x()))
        }
        IntOp::AdaptiveAvgPool { output, .. } => adaptive_avg_pool_shape(*output, x()),
        IntOp::Bilinear { size, .. } => match x().as_slice() {
            [n, c, h, w] if *h > 0 && *w > 0 => Ok(vec![*n, *c, size[0], size[1]]),
            s => Err(format!(
                "bilinear resizing of {s:?} (needs [n, c, h, w], h and w above 0)"
            )),
        },
        IntOp::Reduce { axis, .. } => reduce_shape(*axis, x()),
        IntOp::Reshape => reshape_shape(&x(), declared),
        IntOp::Permute { perm } => permute_shape(perm, x()),
        IntOp::Select { axis, indices } => select_shape(*axis, indices, x()),
        IntOp::MatMul(_) => ops::matmul_shape(&inputs[0], &inputs[1]),
        IntOp::Softmax(s) if s.axis == 0 || s.axis >= inputs[0].len() => Err(format!(
            "softmax along axis {} of {:?} (an axis after the batch axis)",
            s.axis, inputs[0]
        )),
        IntOp::Softmax(_) => Ok(x()),
        IntOp::Constant { values } => {
            if values.len() == declared.iter().product::<usize>() {
                Ok(declared.to_vec())
            } else {
                Err(format!(
                    "a constant of {} values declared {declared:?}",
                    values.len()
                ))
            }
        }
        IntOp::LayerNorm(l) => match x().last() {
            Some(&d) if d == l.gamma.len() => Ok(x()),
            _ => Err(format!(
                "layer norm of {} features on {:?}",
                l.gamma.len(),
                inputs[0]
            )),
        },
    }
}

/// One table per channel along axis 1.
fn channel_lut_shape(channels: usize, s: Vec<usize>) -> Result<Vec<usize>, String> {
    if s.len() < 2 || s[1] != channels {
        return Err(format!("{channels} per-channel tables for input {s:?}"));
    }
    Ok(s)
}

/// NCHW, or NCL for a 1-D convolution (`kernel[0] == 1`, no padding along the first axis).
fn conv2d_shape(c: &IntConv2d, s: Vec<usize>) -> Result<Vec<usize>, String> {
    let one_d = s.len() == 3 && c.kernel[0] == 1 && c.padding[0] + c.padding[1] == 0;
    if !(s.len() == 4 || one_d) || s[1] != c.in_channels {
        return Err(format!(
            "convolution of {} channels on input {s:?}",
            c.in_channels
        ));
    }
    let w = Window {
        kernel: c.kernel,
        stride: c.stride,
        padding: c.padding,
        dilation: c.dilation,
    };
    let mut out = ops::pool_shape(&w, &s).ok_or(format!("kernel does not fit {s:?}"))?;
    out[1] = c.out_channels;
    Ok(out)
}

/// The last axis, `in_features` to `out_features`.
fn linear_shape(l: &IntLinear, mut s: Vec<usize>) -> Result<Vec<usize>, String> {
    match s.last_mut() {
        Some(last) if *last == l.in_features => *last = l.out_features,
        _ => return Err(format!("linear of {} features on {s:?}", l.in_features)),
    }
    Ok(s)
}

/// Inputs that agree on every axis but `axis`, summed along it.
fn concat_shape(axis: usize, inputs: &[Vec<usize>]) -> Result<Vec<usize>, String> {
    let mut out = inputs[0].clone();
    if axis >= out.len() {
        return Err(format!("axis {axis} of {out:?}"));
    }
    out[axis] = 0;
    for s in inputs {
        let fits = s.len() == out.len()
            && s.iter()
                .zip(&inputs[0])
                .enumerate()
                .all(|(d, (a, b))| d == axis || a == b);
        if !fits {
            return Err(format!("{s:?} does not concatenate with {:?}", inputs[0]));
        }
        out[axis] = out[axis].saturating_add(s[axis]);
    }
    Ok(out)
}

/// NCHW to `[n, c, output]`, or NCL to `[n, c, output[1]]` when `output[0] == 1`.
fn adaptive_avg_pool_shape(output: [usize; 2], s: Vec<usize>) -> Result<Vec<usize>, String> {
    match s.len() {
        4 => Ok(vec![s[0], s[1], output[0], output[1]]),
        3 if output[0] == 1 => Ok(vec![s[0], s[1], output[1]]),
        _ => Err(format!("adaptive pooling to {output:?} of {s:?}")),
    }
}

/// `axis` kept, of size 1.
fn reduce_shape(axis: usize, mut s: Vec<usize>) -> Result<Vec<usize>, String> {
    if axis >= s.len() {
        return Err(format!("axis {axis} of {s:?}"));
    }
    s[axis] = 1;
    Ok(s)
}

/// The declared shape, with as many values as the input.
fn reshape_shape(s: &[usize], declared: &[usize]) -> Result<Vec<usize>, String> {
    let (a, b): (usize, usize) = (s.iter().product(), declared.iter().product());
    if a != b {
        return Err(format!("reshape of {s:?} ({a} values) to {declared:?}"));
    }
    Ok(declared.to_vec())
}

/// Output axis `i` is input axis `perm[i]`; `perm` names every axis once.
fn permute_shape(perm: &[usize], s: Vec<usize>) -> Result<Vec<usize>, String> {
    let mut seen = vec![false; s.len()];
    for p in perm {
        if *p >= s.len() || std::mem::replace(&mut seen[*p], true) {
            return Err(format!("{perm:?} is not a permutation of {} axes", s.len()));
        }
    }
    if perm.len() != s.len() {
        return Err(format!("{perm:?} is not a permutation of {} axes", s.len()));
    }
    Ok(perm.iter().map(|p| s[*p]).collect())
}

/// The entries `indices` of axis `axis` (not axis 0, the batch), at least one, each inside it.
fn select_shape(axis: usize, indices: &[usize], mut s: Vec<usize>) -> Result<Vec<usize>, String> {
    if axis == 0 || axis >= s.len() {
        return Err(format!(
            "select along axis {axis} of {s:?}: allowed are axes 1 to {}",
            s.len().saturating_sub(1)
        ));
    }
    if indices.is_empty() {
        return Err("select of no entries".into());
    }
    if let Some(i) = indices.iter().find(|&&i| i >= s[axis]) {
        return Err(format!(
            "select of entry {i} along axis {axis} of {s:?}: allowed are 0 to {}",
            s[axis].saturating_sub(1)
        ));
    }
    s[axis] = indices.len();
    Ok(s)
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
fn table_ok(t: &Lut, len: usize) -> Result<(), String> {
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

/// Structural checks of one node: it reads as many inputs as its op takes, and its parameters
/// agree with each other (one rule per op below).
fn check_params(op: &IntOp, n_inputs: usize) -> Result<(), String> {
    arity_ok(op, n_inputs)?;
    match op {
        IntOp::Input | IntOp::Reshape | IntOp::Permute { .. } | IntOp::Select { .. } => Ok(()),
        IntOp::Quantize(g) => grid_ok(g, "quantization"),
        IntOp::Conv2d(c) => conv2d_ok(c),
        IntOp::Linear(l) => linear_ok(l),
        IntOp::Add(a) => add_ok(a),
        IntOp::Mul(m) => mul_ok(m),
        IntOp::MatMul(m) => matmul_ok(m),
        IntOp::Softmax(s) => softmax_ok(s),
        IntOp::LayerNorm(l) => layer_norm_ok(l),
        IntOp::Constant { .. } => Ok(()),
        IntOp::ChannelLut { lut, channels } => channel_lut_ok(lut, *channels),
        IntOp::Lut(t) => table_ok(t, 256),
        IntOp::Concat { requantize, .. } => requantize
            .iter()
            .flatten()
            .try_for_each(|t| table_ok(t, 256)),
        IntOp::MaxPool(w) => window_ok(w.kernel, w.stride, w.padding, w.dilation),
        IntOp::AvgPool {
            window: w, input, ..
        } => avg_pool_ok(w, input),
        IntOp::AdaptiveAvgPool { output, input } => adaptive_avg_pool_ok(*output, input),
        IntOp::Bilinear { size, input, .. } => {
            if size.contains(&0) {
                return Err(format!("bilinear resizing to {size:?}: an empty output"));
            }
            grid_ok(input, "input")
        }
        IntOp::Reduce { input, .. } => grid_ok(input, "input"),
    }
}

/// The number of inputs the op reads: none for the input, two for add and mul, one per table
/// (at least one) for a concatenation, one otherwise.
fn arity_ok(op: &IntOp, n_inputs: usize) -> Result<(), String> {
    let arity = match op {
        IntOp::Input | IntOp::Constant { .. } => 0,
        IntOp::Add(_) | IntOp::Mul(_) | IntOp::MatMul(_) => 2,
        IntOp::Concat { requantize, .. } if requantize.is_empty() => {
            return Err("a concatenation of no inputs".into());
        }
        IntOp::Concat { requantize, .. } => requantize.len(),
        _ => 1,
    };
    if n_inputs != arity {
        return Err(format!("{n_inputs} inputs, the op takes {arity}"));
    }
    Ok(())
}

/// Groups, weight and bias lengths, window, weights and output of a convolution.
fn conv2d_ok(c: &IntConv2d) -> Result<(), String> {
    let g = c.groups;
    if g == 0 || !c.in_channels.is_multiple_of(g) || !c.out_channels.is_multiple_of(g) {
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
        return Err("bias or weight scales do not have one value per output channel".into());
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
    output_ok(&c.output, c.out_channels)
}

/// Weight and bias lengths, weights and output of a linear layer.
fn linear_ok(l: &IntLinear) -> Result<(), String> {
    if l.in_features.checked_mul(l.out_features) != Some(l.weight.len()) {
        return Err(format!(
            "{} weights for [{}, {}]",
            l.weight.len(),
            l.in_features,
            l.out_features
        ));
    }
    if l.bias.len() != l.out_features || l.weight_scale.len() != l.out_features {
        return Err("bias or weight scales do not have one value per output feature".into());
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
    output_ok(&l.output, l.out_features)
}

/// Grids, fixed-point multipliers and clamp of an add, its rescaled sum within range.
fn add_ok(a: &IntAdd) -> Result<(), String> {
    for g in [&a.a, &a.b, &a.out] {
        grid_ok(g, "add")?;
    }
    // `unsigned_abs`: `i64::MIN` has no `abs`.
    let bound = 1u64 << 62;
    if !(1..=62).contains(&a.shift) || a.ma.unsigned_abs() >= bound || a.mb.unsigned_abs() >= bound
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
    Ok(())
}

/// Grids, parameters (finite, one shift per scale) and epsilon (finite, not negative) of a
/// layer norm.
fn layer_norm_ok(l: &IntLayerNorm) -> Result<(), String> {
    grid_ok(&l.input, "layer norm input")?;
    grid_ok(&l.output, "layer norm output")?;
    if l.gamma.is_empty() || l.gamma.len() != l.beta.len() {
        return Err(format!(
            "layer norm with {} scales and {} shifts (one each per feature)",
            l.gamma.len(),
            l.beta.len()
        ));
    }
    if l.gamma.iter().chain(&l.beta).any(|v| !v.is_finite()) {
        return Err("layer norm parameters are not all finite".into());
    }
    if !(l.epsilon.is_finite() && l.epsilon >= 0.0) {
        return Err(format!("layer norm epsilon {} (finite, >= 0)", l.epsilon));
    }
    Ok(())
}

/// Grids and table of a softmax: 256 entries from `1 << ONE_BITS` down, never rising (an
/// exponential of distances below the maximum).
fn softmax_ok(s: &IntSoftmax) -> Result<(), String> {
    grid_ok(&s.input, "softmax input")?;
    grid_ok(&s.output, "softmax output")?;
    if s.table.len() != 256 {
        return Err(format!(
            "softmax table of {} entries (256 needed)",
            s.table.len()
        ));
    }
    if s.table[0] != 1 << IntSoftmax::ONE_BITS {
        return Err(format!(
            "softmax table starts at {} (exp(0) is {})",
            s.table[0],
            1u32 << IntSoftmax::ONE_BITS
        ));
    }
    if s.table.windows(2).any(|w| w[1] > w[0]) {
        return Err("softmax table rises (exp of a distance below the maximum falls)".into());
    }
    Ok(())
}

/// Grids, multiplier and clamp of a matrix product.
fn matmul_ok(m: &IntMatMul) -> Result<(), String> {
    for g in [&m.a, &m.b, &m.out] {
        grid_ok(g, "matmul")?;
    }
    if !multiplier_ok(&m.multiplier) {
        return Err("multiplier out of range".into());
    }
    clamp_ok(m.lo, m.hi)?;
    within(m.lo, m.hi, &m.out)
}

/// Grids, multiplier and clamp of a multiply.
fn mul_ok(m: &IntMul) -> Result<(), String> {
    for g in [&m.a, &m.b, &m.out] {
        grid_ok(g, "mul")?;
    }
    if !multiplier_ok(&m.multiplier) {
        return Err("multiplier out of range".into());
    }
    clamp_ok(m.lo, m.hi)?;
    within(m.lo, m.hi, &m.out)
}

/// One 256-entry table per channel.
fn channel_lut_ok(lut: &Lut, channels: usize) -> Result<(), String> {
    if channels == 0 || channels.checked_mul(256) != Some(lut.table.len()) {
        return Err(format!(
            "{} table entries for {channels} channels of 256",
            lut.table.len()
        ));
    }
    table_ok(lut, lut.table.len())
}

/// A window whose int32 sum stays in range, on a usable input grid.
fn avg_pool_ok(w: &Window, input: &Grid) -> Result<(), String> {
    window_ok(w.kernel, w.stride, w.padding, w.dilation)?;
    if w.kernel[0].saturating_mul(w.kernel[1]) > MAX_SUM_TERMS {
        return Err(format!(
            "an average over a {:?} window sums more than {MAX_SUM_TERMS} values in int32",
            w.kernel
        ));
    }
    grid_ok(input, "input")
}

/// A non-empty output, on a usable input grid.
fn adaptive_avg_pool_ok(output: [usize; 2], input: &Grid) -> Result<(), String> {
    if output.contains(&0) {
        return Err("adaptive pooling to an empty output".into());
    }
    grid_ok(input, "input")
}

/// Whether the op reads integers and whether it writes them, given whether its first input is
/// an integer tensor (`None`: it has no input).
fn integer_flow(op: &IntOp, first: Option<bool>) -> Result<(bool, bool), String> {
    Ok(match op {
        IntOp::Input => (false, false),
        IntOp::Quantize(_) if first == Some(true) => {
            return Err("quantizes an integer tensor".into());
        }
        IntOp::Quantize(_) => (false, true),
        IntOp::Reshape | IntOp::Permute { .. } | IntOp::Select { .. } => {
            (false, first == Some(true))
        }
        IntOp::Conv2d(c) => (true, matches!(c.output, Output::Quantized { .. })),
        IntOp::Linear(l) => (true, matches!(l.output, Output::Quantized { .. })),
        IntOp::Add(_)
        | IntOp::Mul(_)
        | IntOp::MatMul(_)
        | IntOp::Softmax(_)
        | IntOp::LayerNorm(_)
        | IntOp::Constant { .. }
        | IntOp::Concat { .. }
        | IntOp::MaxPool(_)
        | IntOp::AvgPool { .. }
        | IntOp::AdaptiveAvgPool { .. }
        | IntOp::Bilinear { .. }
        | IntOp::Reduce { .. }
        | IntOp::Lut(_)
        | IntOp::ChannelLut { .. } => (true, true),
    })
}

/// The output grid the op's parameters give (`own`: the node's declared grid, for the ops that
/// choose it freely; `first`: the grid of its first input, for those that keep it).
fn output_grid(op: &IntOp, own: Option<Grid>, first: impl Fn() -> Option<Grid>) -> Option<Grid> {
    match op {
        IntOp::Quantize(g) => Some(*g),
        IntOp::Conv2d(c) => c.output.grid(),
        IntOp::Linear(l) => l.output.grid(),
        IntOp::Add(a) => Some(a.out),
        IntOp::Mul(m) => Some(m.out),
        IntOp::MatMul(m) => Some(m.out),
        IntOp::Softmax(s) => Some(s.output),
        IntOp::LayerNorm(l) => Some(l.output),
        IntOp::Lut(t) | IntOp::ChannelLut { lut: t, .. } => Some(t.output),
        IntOp::MaxPool(_) | IntOp::Reshape | IntOp::Permute { .. } | IntOp::Select { .. } => {
            first()
        }
        IntOp::Input
        | IntOp::Constant { .. }
        | IntOp::Concat { .. }
        | IntOp::AvgPool { .. }
        | IntOp::AdaptiveAvgPool { .. }
        | IntOp::Bilinear { .. }
        | IntOp::Reduce { .. } => own,
    }
}

/// The grid the op expects on its inputs, by input index (`own`: the node's declared grid, on
/// which a concatenation expects its inputs that have no table).
fn input_grids(op: &IntOp, own: Option<Grid>) -> Vec<(usize, Grid)> {
    match op {
        IntOp::Conv2d(c) => vec![(0, c.input)],
        IntOp::Linear(l) => vec![(0, l.input)],
        IntOp::Add(a) => vec![(0, a.a), (1, a.b)],
        IntOp::Mul(m) => vec![(0, m.a), (1, m.b)],
        IntOp::MatMul(m) => vec![(0, m.a), (1, m.b)],
        IntOp::Softmax(s) => vec![(0, s.input)],
        IntOp::LayerNorm(l) => vec![(0, l.input)],
        IntOp::Lut(t) | IntOp::ChannelLut { lut: t, .. } => vec![(0, t.input)],
        IntOp::AvgPool { input, .. }
        | IntOp::AdaptiveAvgPool { input, .. }
        | IntOp::Bilinear { input, .. }
        | IntOp::Reduce { input, .. } => vec![(0, *input)],
        IntOp::Concat { requantize, .. } => {
            let untabled = own.unwrap_or(Grid {
                scale: 1.0,
                zero_point: 0,
                qmin: -128,
                qmax: 127,
            });
            requantize
                .iter()
                .enumerate()
                .map(|(k, t)| (k, t.as_ref().map_or(untabled, |t| t.input)))
                .collect()
        }
        IntOp::Input
        | IntOp::Constant { .. }
        | IntOp::Quantize(_)
        | IntOp::MaxPool(_)
        | IntOp::Reshape
        | IntOp::Permute { .. }
        | IntOp::Select { .. } => vec![],
    }
}

/// The most outputs a model may return.
pub const MAX_OUTPUTS: usize = 64;

/// A node on its own: it reads earlier nodes, its parameters agree, and its declared shape
/// has rank at most 8 and at most [`MAX_ITEM_VALUES`] values per item (that inputs lead the
/// node list is [`IntegerModel::ends_ok`]'s).
fn node_ok(i: usize, node: &IntNode) -> Result<(), String> {
    if let Some(j) = node.inputs.iter().find(|j| **j >= i) {
        return Err(format!("reads node {j}, which does not run before it"));
    }
    check_params(&node.op, node.inputs.len())?;
    if let IntOp::Constant { values } = &node.op {
        if node.shape.iter().any(|d| matches!(d, Dim::Batch(_))) {
            return Err(format!(
                "a constant of shape {:?} (no batch axis)",
                node.shape
            ));
        }
        let Some(g) = node.grid else {
            return Err("a constant without a grid".into());
        };
        if let Some(v) = values
            .iter()
            .find(|v| !(g.qmin..=g.qmax).contains(&(**v as i32)))
        {
            return Err(format!(
                "constant value {v} is outside its grid [{}, {}]",
                g.qmin, g.qmax
            ));
        }
    }
    if node.shape.len() > 8 {
        return Err(format!("rank {} is above 8", node.shape.len()));
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
                format!(
                    "shape {:?} is above {MAX_ITEM_VALUES} values per item",
                    node.shape
                )
            })?;
    }
    Ok(())
}

/// How a model from a trusted source gets a larger budget.
const RAISE: &str = "a model from a trusted source can have more with \
                     `IntegerModel::with_budget` or `format::load_with_budget`";

/// The budget's ledger: when each value dies (as the runner frees it: after its last reader;
/// never for the output or a value nobody reads), the bytes alive, kept and working.
struct Ledger {
    last_use: Vec<usize>,
    alive: Vec<u64>,
    live: u64,
    peak: u64,
    kept: u64,
    scratch: u64,
    cost: Cost,
}

impl Ledger {
    fn new(model: &IntegerModel) -> Self {
        let mut last_use = vec![0usize; model.nodes.len()];
        for (i, node) in model.nodes.iter().enumerate() {
            for j in &node.inputs {
                if let Some(l) = last_use.get_mut(*j) {
                    *l = i;
                }
            }
        }
        for &o in &model.outputs {
            if let Some(l) = last_use.get_mut(o) {
                *l = usize::MAX;
            }
        }
        Self {
            last_use,
            alive: vec![0u64; model.nodes.len()],
            live: 0,
            peak: 0,
            kept: 0,
            scratch: 0,
            cost: Cost::default(),
        }
    }

    /// Counts node `i`'s `share`; the model's totals up to it stay within `budget`.
    fn add(
        &mut self,
        i: usize,
        node: &IntNode,
        share: NodeCost,
        budget: &Budget,
    ) -> Result<(), String> {
        self.cost.work = self.cost.work.saturating_add(share.work);
        if self.cost.work > budget.max_work {
            return Err(format!(
                "the model needs {} units of work per batch item up to this node ({} \
                 here), above the budget's max_work of {}: {RAISE}",
                self.cost.work, share.work, budget.max_work
            ));
        }
        self.alive[i] = share.output;
        self.live = self.live.saturating_add(share.output);
        self.peak = self.peak.max(self.live);
        for j in &node.inputs {
            if self.last_use[*j] == i {
                self.live = self
                    .live
                    .saturating_sub(std::mem::take(&mut self.alive[*j]));
            }
        }
        self.kept = self.kept.saturating_add(share.kept);
        self.scratch = self.scratch.max(share.scratch);
        self.cost.memory_bytes = self
            .kept
            .saturating_add(self.peak)
            .saturating_add(self.scratch);
        if self.cost.memory_bytes > budget.max_memory_bytes {
            return Err(format!(
                "the model needs {} bytes of memory up to this node (its output {} \
                 bytes, its kernel's buffers {}, the model with its packed weights and \
                 tables {}, the largest set of values alive at once {}), above the \
                 budget's max_memory_bytes of {}: {RAISE}",
                self.cost.memory_bytes,
                share.output,
                share.scratch,
                self.kept,
                self.peak,
                budget.max_memory_bytes
            ));
        }
        Ok(())
    }
}

/// What validation knows of the nodes checked so far: whether each is an integer tensor, its
/// grid, its shapes at batch 1 and 2, and the budget's ledger.
struct Walk {
    int: Vec<bool>,
    grids: Vec<Option<Grid>>,
    shapes: [Vec<Vec<usize>>; 2],
    ledger: Ledger,
}

impl Walk {
    fn new(model: &IntegerModel) -> Self {
        Self {
            int: Vec::with_capacity(model.nodes.len()),
            grids: Vec::with_capacity(model.nodes.len()),
            shapes: [Vec::new(), Vec::new()],
            ledger: Ledger::new(model),
        }
    }

    /// Checks node `i` (the model's output if `is_output`) after the nodes before it.
    fn node(
        &mut self,
        i: usize,
        node: &IntNode,
        is_output: bool,
        budget: &Budget,
    ) -> Result<(), String> {
        node_ok(i, node)?;
        self.shapes_ok(node)?;
        let batch1 = &self.shapes[0];
        if let Some(j) = node.inputs.first() {
            resources_ok(&node.op, &batch1[*j])?;
        }
        let ins: Vec<Vec<usize>> = node.inputs.iter().map(|j| batch1[*j].clone()).collect();
        let share = budget::node_cost(node, &ins, &batch1[i], is_output);
        self.ledger.add(i, node, share, budget)?;
        let out_int = self.integers_ok(node)?;
        self.grids_ok(node)?;
        self.grids.push(node.grid);
        self.int.push(out_int);
        Ok(())
    }

    /// The declared shape follows from the inputs' at batch 1 and 2; records it.
    fn shapes_ok(&mut self, node: &IntNode) -> Result<(), String> {
        for (b, batch) in [1usize, 2].into_iter().enumerate() {
            let declared: Vec<usize> = node.shape.iter().map(|d| d.at(batch)).collect();
            let ins: Vec<Vec<usize>> = node
                .inputs
                .iter()
                .map(|j| self.shapes[b][*j].clone())
                .collect();
            let got = infer(&node.op, &ins, &declared)?;
            if got != declared {
                return Err(format!(
                    "computes shape {got:?} at batch {batch}, declares {declared:?}"
                ));
            }
            self.shapes[b].push(got);
        }
        Ok(())
    }

    /// Integer ops read integer tensors, and the node's grid says whether it writes one.
    /// Returns whether it does.
    fn integers_ok(&self, node: &IntNode) -> Result<bool, String> {
        let first = node.inputs.first().map(|j| self.int[*j]);
        let (needs_int, out_int) = integer_flow(&node.op, first)?;
        if needs_int && let Some(j) = node.inputs.iter().find(|j| !self.int[**j]) {
            return Err(format!("reads node {j}, which is not an integer tensor"));
        }
        if out_int != node.grid.is_some() {
            return Err("its grid does not say whether its output is an integer tensor".into());
        }
        Ok(out_int)
    }

    /// The node's grid is usable and the op's, and its inputs are on the grids it expects.
    fn grids_ok(&self, node: &IntNode) -> Result<(), String> {
        if let Some(g) = &node.grid {
            grid_ok(g, "output")?;
        }
        let reads = |k: usize| self.grids[node.inputs[k]];
        let declared = output_grid(&node.op, node.grid, || reads(0));
        if declared != node.grid {
            return Err(format!(
                "output grid {:?} differs from its op's {declared:?}",
                node.grid
            ));
        }
        if let IntOp::Concat { requantize, .. } = &node.op
            && requantize
                .iter()
                .flatten()
                .any(|t| Some(t.output) != node.grid)
        {
            return Err("a requantization table does not map to the concatenation's grid".into());
        }
        for (k, g) in input_grids(&node.op, node.grid) {
            if reads(k) != Some(g) {
                return Err(format!(
                    "input {k} is on grid {:?}, the op expects {g:?}",
                    reads(k)
                ));
            }
        }
        Ok(())
    }
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
        self.ends_ok().map_err(|(i, e)| fail(i, e))?;
        let mut walk = Walk::new(self);
        for (i, node) in self.nodes.iter().enumerate() {
            walk.node(i, node, self.outputs.contains(&i), budget)
                .map_err(|e| fail(i, e))?;
        }
        Ok(walk.ledger.cost)
    }

    /// The inputs lead the node list (node 0 is one) and have shapes `[batch, fixed sizes >
    /// 0]`; there is at least one output, at most [`MAX_OUTPUTS`], and each exists; errors
    /// name the node at fault.
    fn ends_ok(&self) -> Result<(), (usize, String)> {
        if !matches!(self.nodes.first().map(|n| &n.op), Some(IntOp::Input)) {
            return Err((0, "the first node must be an input".into()));
        }
        let inputs = self.inputs();
        if let Some(i) =
            (inputs.end..self.nodes.len()).find(|&i| matches!(self.nodes[i].op, IntOp::Input))
        {
            return Err((
                i,
                format!(
                    "an input after other nodes (inputs are the leading nodes; {} lead here)",
                    inputs.end
                ),
            ));
        }
        if self.outputs.is_empty() || self.outputs.len() > MAX_OUTPUTS {
            return Err((
                self.nodes.len() - 1,
                format!(
                    "{} outputs (a model returns 1 to {MAX_OUTPUTS})",
                    self.outputs.len()
                ),
            ));
        }
        if let Some(&o) = self.outputs.iter().find(|&&o| o >= self.nodes.len()) {
            return Err((o, format!("output node {o} does not exist")));
        }
        for i in inputs {
            let input = &self.nodes[i].shape;
            if input.first() != Some(&Dim::Batch(1))
                || input[1..]
                    .iter()
                    .any(|d| !matches!(d, Dim::Fixed(v) if *v > 0))
            {
                return Err((
                    i,
                    format!("input shape {input:?} is not [batch, fixed sizes > 0]"),
                ));
            }
        }
        Ok(())
    }
}
