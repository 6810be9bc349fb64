//! Writing a graph's trained weights back into the user's own model, by `ParamId`.

use std::collections::HashMap;

use burn::backend::TensorMetadata;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId, RunningState};
use burn::nn::BatchNorm;
use burn::prelude::*;
use burn::tensor::DispatchTensor;
use burn_qat_core::QatError;
use burn_qat_transform::{Fusable, Fused};

use super::module::{GraphLayer, QatGraph};

/// Checks shapes before anything is written, so a refused write-back leaves the model as it was.
struct Check<'a> {
    values: &'a HashMap<ParamId, (DispatchTensor, Vec<usize>)>,
    found: usize,
    stack: Vec<String>,
    error: Option<QatError>,
}

impl ModuleVisitor for Check<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some((_, dims)) = self.values.get(&param.id) else {
            return;
        };
        let shape = param.lazy_shape().dims::<D>().to_vec();
        if &shape != dims {
            self.error.get_or_insert(QatError::WriteBack {
                problem: format!(
                    "`{}` has shape {shape:?} in the model but {dims:?} in the graph: write back into the \
                     model the graph was prepared from",
                    self.stack.join(".")
                ),
            });
        }
        self.found += 1;
    }
}

struct Values {
    values: HashMap<ParamId, (DispatchTensor, Vec<usize>)>,
}

impl ModuleMapper for Values {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((value, _)) = self.values.get(&param.id) else {
            return param;
        };
        let data = Tensor::<D>::from_dispatch(value.clone()).into_data();
        param.map(|old| {
            let moved = Tensor::<D>::from_data(data, &old.device());
            if old.is_require_grad() {
                moved.require_grad()
            } else {
                moved
            }
        })
    }
}

fn put<const D: usize>(
    values: &mut HashMap<ParamId, (DispatchTensor, Vec<usize>)>,
    id: ParamId,
    t: Tensor<D>,
) {
    let dims = t.dims().to_vec();
    values.insert(id, (t.into_dispatch(), dims));
}

fn put_bn(values: &mut HashMap<ParamId, (DispatchTensor, Vec<usize>)>, bn: &BatchNorm) {
    put(values, bn.gamma.id, bn.gamma.val());
    put(values, bn.beta.id, bn.beta.val());
    put(
        values,
        running_id(&bn.running_mean),
        bn.running_mean.value(),
    );
    put(values, running_id(&bn.running_var), bn.running_var.value());
}

/// A `RunningState`'s id (visited as a param; the field is private).
pub(crate) fn running_id(state: &RunningState<Tensor<1>>) -> ParamId {
    struct Id(Option<ParamId>);
    impl ModuleVisitor for Id {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0 = Some(param.id);
        }
    }
    let mut id = Id(None);
    state.visit(&mut id);
    id.0.expect("a RunningState visits its value")
}

/// The weight to write for a fused layer: its float weight, or (baked) the folded
/// fake-quantized weight divided back by BatchNorm's per-channel scale, so that the user's
/// conv -> BatchNorm computes the folded, quantized layer.
fn layer_weight<L, const DI: usize, const DW: usize>(fused: &Fused<L>, baked: bool) -> Tensor<DW>
where
    L: Fusable<DI, DW>,
{
    if !baked {
        return fused.layer.weight();
    }
    let (w, _) = fused.folded_params::<DI, DW>();
    match &fused.bn {
        None => w,
        Some(bn) => {
            let c = bn.gamma.val().dims()[0];
            let mul = bn.gamma.val()
                / bn.running_var
                    .value()
                    .to_device(&w.device())
                    .add_scalar(bn.epsilon)
                    .sqrt();
            let mut shape = [1; DW];
            shape[L::WEIGHT_AXIS] = c;
            w / mul.reshape(shape)
        }
    }
}

fn put_fused<L, const DI: usize, const DW: usize>(
    values: &mut HashMap<ParamId, (DispatchTensor, Vec<usize>)>,
    fused: &Fused<L>,
    weight_id: ParamId,
    bias: Option<(ParamId, Tensor<1>)>,
    baked: bool,
) where
    L: Fusable<DI, DW>,
{
    put(values, weight_id, layer_weight(fused, baked));
    if let Some((id, b)) = bias {
        put(values, id, b);
    }
    if let Some(bn) = &fused.bn {
        put_bn(values, bn);
    }
}

impl QatGraph {
    fn values(&self, baked: bool) -> HashMap<ParamId, (DispatchTensor, Vec<usize>)> {
        let mut values = HashMap::new();
        for layer in &self.layers {
            match layer {
                GraphLayer::Conv1d(f) => {
                    let bias = f.layer.bias.as_ref().map(|b| (b.id, b.val()));
                    put_fused(&mut values, f, f.layer.weight.id, bias, baked)
                }
                GraphLayer::Conv2d(f) => {
                    let bias = f.layer.bias.as_ref().map(|b| (b.id, b.val()));
                    put_fused(&mut values, f, f.layer.weight.id, bias, baked)
                }
                GraphLayer::Linear(f) => {
                    let bias = f.layer.bias.as_ref().map(|b| (b.id, b.val()));
                    put_fused(&mut values, f, f.layer.weight.id, bias, baked)
                }
                GraphLayer::BatchNorm(bn) => put_bn(&mut values, bn),
                GraphLayer::LayerNorm(ln) => {
                    let ln = &ln.norm;
                    put(&mut values, ln.gamma.id, ln.gamma.val());
                    if let Some(beta) = &ln.beta {
                        put(&mut values, beta.id, beta.val());
                    }
                }
                GraphLayer::Param(p) => {
                    let (id, value) = p.id_value();
                    let dims = value.shape().to_vec();
                    values.insert(id, (value, dims));
                }
                GraphLayer::Quant(_) => {}
            }
        }
        values
    }

    /// Writes the graph's trained float weights, biases and BatchNorm parameters and statistics
    /// into `model` (the model the graph was prepared from, or one with the same `ParamId`s:
    /// a clone or a reloaded record), matched by `ParamId`. The user keeps their own type; its
    /// forward then equals this graph's float forward (fake-quant off).
    ///
    /// # Errors
    ///
    /// A model that holds none of the graph's parameters, or one whose shapes differ.
    pub fn write_back<M: Module>(&self, model: M) -> Result<M, QatError> {
        write_into(model, self.values(false))
    }

    /// Like [`write_back`](Self::write_back), but with the weights the QAT model computes with:
    /// fake-quantized, and for a folded BatchNorm divided back by its per-channel scale, so the
    /// user's conv -> BatchNorm computes the folded, quantized layer (up to float rounding).
    ///
    /// # Errors
    ///
    /// As [`write_back`](Self::write_back).
    pub fn write_back_baked<M: Module>(&self, model: M) -> Result<M, QatError> {
        write_into(model, self.values(true))
    }
}

fn write_into<M: Module>(
    model: M,
    values: HashMap<ParamId, (DispatchTensor, Vec<usize>)>,
) -> Result<M, QatError> {
    let mut check = Check {
        values: &values,
        found: 0,
        stack: vec![],
        error: None,
    };
    model.visit(&mut check);
    if let Some(e) = check.error {
        return Err(e);
    }
    if check.found == 0 && !values.is_empty() {
        return Err(QatError::WriteBack {
            problem: "the model holds none of the graph's parameters (matched by ParamId): write back into the \
                      model the graph was prepared from, a clone of it, or one loaded from its record"
                .into(),
        });
    }
    Ok(model.map(&mut Values { values }))
}
