use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn_qat_core::QatError;
use burn_qat_nn::tree::{self, burn_types};

/// Folds BatchNorms into the layers before them, in place, in any model: for each
/// `(layer, batch_norm)` pair of module paths, the layer (`Conv1d`, `Conv2d` or `Linear`, with a
/// bias) gets the folded weight and bias, and the BatchNorm becomes the identity
/// (gamma 1, beta 0, mean 0, var `1 - eps`, training flag off). The model keeps its type and
/// its forward code, and from then on trains and runs the folded layer: AIMET's "fold before
/// QAT". For BatchNorm folding *during* QAT, use [`Fused`](crate::Fused) layers.
///
/// Why pairs must be named: a Rust model's forward is code, not a graph; the module tree shows
/// fields, not the order in which `forward` calls them, so `conv -> bn` cannot be discovered
/// from an arbitrary struct. `epsilon` must be the BatchNorms' (Burn's default is 1e-5): it is a
/// constant field that module visitors cannot read.
///
/// # Errors
///
/// A path that is not a module of the expected type, a layer without a bias (create it with a
/// bias, or use `Fused`), or channel counts that differ.
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
/// use burn::prelude::*;
/// use burn_qat_transform::fuse_batch_norms;
///
/// #[derive(Module, Debug)]
/// struct Net { fc: Linear, bn: BatchNorm }
///
/// let device = Device::flex();
/// let net = Net { fc: LinearConfig::new(3, 2).init(&device), bn: BatchNormConfig::new(2).init(&device) };
/// let x = Tensor::<2>::ones([4, 3], &device);
/// let want = net.bn.forward(net.fc.forward(x.clone()));
/// let net = fuse_batch_norms(net, &[("fc", "bn")], 1e-5).unwrap();
/// let got = net.bn.forward(net.fc.forward(x));
/// got.into_data().assert_approx_eq::<f32>(&want.into_data(), Default::default());
/// ```
pub fn fuse_batch_norms<M: Module>(
    model: M,
    pairs: &[(&str, &str)],
    epsilon: f64,
) -> Result<M, QatError> {
    let mut tensors = Tensors::default();
    model.visit(&mut tensors);
    let mut updates: BTreeMap<String, Tensor<1>> = BTreeMap::new();
    let mut weight_updates: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    for (layer, bn) in pairs {
        let get = |key: String| tensors.values.get(&key).cloned();
        let ty = tensors
            .types
            .get(&format!("{layer}.{}", burn_types::WEIGHT))
            .cloned()
            .unwrap_or_default();
        let axis = match ty.as_str() {
            burn_types::CONV2D | burn_types::CONV1D => 0,
            burn_types::LINEAR => 1,
            _ => {
                return Err(QatError::CannotFold {
                    layer: layer.to_string(),
                    problem: format!(
                        "is not a Conv1d, Conv2d or Linear module of this model (found {})",
                        if ty.is_empty() {
                            "nothing"
                        } else {
                            tree::short_type(&ty)
                        }
                    ),
                });
            }
        };
        if tensors
            .types
            .get(&format!("{bn}.{}", burn_types::GAMMA))
            .map(String::as_str)
            != Some(burn_types::BATCH_NORM)
        {
            return Err(QatError::CannotFold {
                layer: bn.to_string(),
                problem: "is not a BatchNorm module of this model".into(),
            });
        }
        let (dims, w) = get(format!("{layer}.{}", burn_types::WEIGHT)).unwrap();
        let Some((_, b)) = get(format!("{layer}.{}", burn_types::BIAS)) else {
            return Err(QatError::CannotFold {
                layer: layer.to_string(),
                problem: "has no bias to receive the folded BatchNorm shift: create it with a bias \
                          (`with_bias(true)`), or fuse it for QAT with `FusedConfig::init(layer, Some(bn))`"
                    .into(),
            });
        };
        let (_, gamma) = get(format!("{bn}.{}", burn_types::GAMMA)).unwrap();
        let (_, beta) = get(format!("{bn}.{}", burn_types::BETA)).unwrap();
        let (_, mean) = get(format!("{bn}.{}", burn_types::RUNNING_MEAN)).unwrap();
        let (_, var) = get(format!("{bn}.{}", burn_types::RUNNING_VAR)).unwrap();
        let c = dims[axis];
        if gamma.len() != c {
            return Err(QatError::ChannelMismatch {
                what: "BatchNorm",
                expected: c,
                got: gamma.len(),
                axis,
                context: format!(" (`{bn}` after `{layer}`)"),
            });
        }
        let mul: Vec<f32> = (0..c)
            .map(|i| gamma[i] / ((var[i] as f64 + epsilon).sqrt() as f32))
            .collect();
        let stride_after: usize = dims[axis + 1..].iter().product();
        let new_w: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, v)| v * mul[(i / stride_after) % c])
            .collect();
        let new_b: Vec<f32> = (0..c)
            .map(|i| (b[i] - mean[i]) * mul[i] + beta[i])
            .collect();
        let device = tensors.device.clone().expect("a model with tensors");
        weight_updates.insert(
            format!("{layer}.{}", burn_types::WEIGHT),
            (dims.clone(), new_w),
        );
        updates.insert(
            format!("{layer}.{}", burn_types::BIAS),
            Tensor::from_floats(new_b.as_slice(), &device),
        );
        updates.insert(
            format!("{bn}.{}", burn_types::GAMMA),
            Tensor::ones([c], &device),
        );
        updates.insert(
            format!("{bn}.{}", burn_types::BETA),
            Tensor::zeros([c], &device),
        );
        updates.insert(
            format!("{bn}.{}", burn_types::RUNNING_MEAN),
            Tensor::zeros([c], &device),
        );
        updates.insert(
            format!("{bn}.{}", burn_types::RUNNING_VAR),
            Tensor::ones([c], &device).sub_scalar(epsilon),
        );
    }
    let bns: Vec<String> = pairs.iter().map(|(_, bn)| bn.to_string()).collect();
    // BatchNorm statistics are shared by clones: give the result its own state.
    Ok(tree::own_state(model).map(&mut Replace {
        stack: vec![],
        updates,
        weight_updates,
        bns,
    }))
}

#[derive(Default)]
struct Tensors {
    stack: Vec<(String, String)>,
    values: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    types: BTreeMap<String, String>,
    device: Option<Device>,
}

impl ModuleVisitor for Tensors {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path: Vec<&str> = self.stack.iter().map(|(n, _)| n.as_str()).collect();
        let key = path.join(".");
        let t = param.val();
        self.device.get_or_insert_with(|| t.device());
        let dims = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        if let Some((_, container)) = self.stack.last() {
            self.types.insert(key.clone(), container.clone());
        }
        self.values.insert(key, (dims, data));
    }
}

struct Replace {
    stack: Vec<(String, String)>,
    updates: BTreeMap<String, Tensor<1>>,
    weight_updates: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    bns: Vec<String>,
}

impl ModuleMapper for Replace {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn map_flag(&mut self, flag: Param<burn::module::Flag>) -> Param<burn::module::Flag> {
        let path: Vec<&str> = self.stack.iter().map(|(n, _)| n.as_str()).collect();
        let module = path[..path.len().saturating_sub(1)].join(".");
        if self.bns.contains(&module) && path.last() == Some(&"training") {
            flag.with_value(false)
        } else {
            flag
        }
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key: Vec<&str> = self.stack.iter().map(|(n, _)| n.as_str()).collect();
        let key = key.join(".");
        if let Some((dims, data)) = self.weight_updates.get(&key) {
            let dims = dims.clone();
            let data = data.clone();
            return param.map(move |old| {
                let device = old.device();
                let t = Tensor::<1>::from_floats(data.as_slice(), &device);
                let t: Tensor<D> = t
                    .reshape(<[usize; D]>::try_from(dims.as_slice()).expect("rank"))
                    .detach();
                if old.is_require_grad() {
                    t.require_grad()
                } else {
                    t
                }
            });
        }
        if D == 1
            && let Some(new) = self.updates.get(&key)
        {
            let new = new.clone();
            return param.map(move |old| {
                let device = old.device();
                let t: Tensor<D> = new.to_device(&device).reshape([old.dims()[0]; D]).detach();
                if old.is_require_grad() {
                    t.require_grad()
                } else {
                    t
                }
            });
        }
        param
    }
}
