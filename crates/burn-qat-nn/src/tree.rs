//! Module-tree wiring: the one place that knows how Burn's visitors describe a model.
//!
//! Burn's [`ModuleVisitor`] and [`ModuleMapper`] report each tensor with the stack of fields
//! that lead to it, each field with the type of the struct holding it (`"Struct:FakeQuant"`,
//! `"Reparameterization"`, ...). Switches, schedules, summaries, the observe -> learn hand-off
//! and in-place folding all find their state this way. They share:
//!
//! - [`TreePath`], the path stack and its questions ("is this the `frozen` field of a
//!   `FakeQuant`?");
//! - [`read`] and [`map_values`], one visitor and one mapper that hand every float tensor to a
//!   closure with its [`TreePath`];
//! - [`own_state`], which gives a module its own `RunningState` cells, so that a switch
//!   applied to a clone leaves the original untouched;
//! - [`quantizers`], every quantizer of a model with its recorded state.
//!
//! The names themselves are constants owned by the modules they describe
//! ([`FakeQuant::TYPE`](crate::FakeQuant::TYPE), [`FakeQuant::FROZEN`](crate::FakeQuant::FROZEN),
//! ...); the tests of this module fail when a recorded field is renamed without its constant.
//! Names of Burn's own layers are in [`burn_types`].

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn_qat_core::QuantSpec;

use crate::{FakeQuant, LearnedFakeQuant, WeightFakeQuant};

/// Container type names of Burn's own modules, as its visitors report them.
pub mod burn_types {
    /// `burn::nn::conv::Conv1d`.
    pub const CONV1D: &str = "Struct:Conv1d";
    /// `burn::nn::conv::Conv2d`.
    pub const CONV2D: &str = "Struct:Conv2d";
    /// `burn::nn::Linear`.
    pub const LINEAR: &str = "Struct:Linear";
    /// `burn::nn::BatchNorm`.
    pub const BATCH_NORM: &str = "Struct:BatchNorm";
    /// The frame Burn pushes around a parameter's reparameterization state.
    pub const REPARAMETERIZATION: &str = "Reparameterization";
    /// The prefixes Burn puts before a derived type's name.
    pub const PREFIXES: [&str; 2] = ["Struct:", "Enum:"];
    /// Field of Burn's Linear and convolutions.
    pub const WEIGHT: &str = "weight";
    /// Field of Burn's Linear and convolutions.
    pub const BIAS: &str = "bias";
    /// Field of Burn's BatchNorm.
    pub const GAMMA: &str = "gamma";
    /// Field of Burn's BatchNorm.
    pub const BETA: &str = "beta";
    /// Field of Burn's BatchNorm.
    pub const RUNNING_MEAN: &str = "running_mean";
    /// Field of Burn's BatchNorm.
    pub const RUNNING_VAR: &str = "running_var";
}

/// Where a visited tensor sits: the stack of `(field name, type of the module holding it)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreePath {
    frames: Vec<(String, String)>,
}

impl TreePath {
    /// Enters a field (call from `enter_module`).
    pub fn enter(&mut self, name: &str, container_type: &str) {
        self.frames
            .push((name.to_string(), container_type.to_string()));
    }

    /// Leaves the innermost field (call from `exit_module`).
    pub fn exit(&mut self) {
        self.frames.pop();
    }

    /// The frames, outermost first.
    pub fn frames(&self) -> &[(String, String)] {
        &self.frames
    }

    /// The innermost field name.
    pub fn field(&self) -> Option<&str> {
        self.frames.last().map(|(n, _)| n.as_str())
    }

    /// The type of the module holding the innermost field.
    pub fn holder(&self) -> Option<&str> {
        self.frames.last().map(|(_, c)| c.as_str())
    }

    /// The frame `up` levels above the innermost (0: the innermost).
    pub fn up(&self, up: usize) -> Option<(&str, &str)> {
        let n = self.frames.len();
        (up < n).then(|| {
            let (a, b) = &self.frames[n - 1 - up];
            (a.as_str(), b.as_str())
        })
    }

    /// Whether the innermost field is `field` of a module of type `holder`.
    pub fn is(&self, holder: &str, field: &str) -> bool {
        self.up(0) == Some((field, holder))
    }

    /// Whether the innermost field is one of `fields` of a module of type `holder`.
    pub fn is_any(&self, holder: &str, fields: &[&str]) -> bool {
        self.up(0)
            .is_some_and(|(f, h)| h == holder && fields.contains(&f))
    }

    /// Whether any enclosing module has type `ty`.
    pub fn inside(&self, ty: &str) -> bool {
        self.frames.iter().any(|(_, c)| c == ty)
    }

    /// The dotted path of all fields.
    pub fn path(&self) -> String {
        self.prefix(0)
    }

    /// The dotted path without the innermost `drop` fields.
    pub fn prefix(&self, drop: usize) -> String {
        let n = self.frames.len().saturating_sub(drop);
        let names: Vec<&str> = self.frames[..n].iter().map(|(s, _)| s.as_str()).collect();
        names.join(".")
    }
}

/// A type name without Burn's `Struct:`/`Enum:` prefix.
pub fn short_type(container_type: &str) -> &str {
    burn_types::PREFIXES
        .iter()
        .find_map(|p| container_type.strip_prefix(p))
        .unwrap_or(container_type)
}

/// One float tensor read by [`read`].
#[derive(Clone, Debug)]
pub struct Visited {
    /// Where it sits.
    pub at: TreePath,
    /// Its parameter id.
    pub id: burn::module::ParamId,
    /// Its dimensions.
    pub dims: Vec<usize>,
    /// Its values.
    pub values: Vec<f32>,
}

/// A tensor's values as `f32`.
pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap_or_default()
}

/// Visits every float tensor of `model` and returns those `wanted` selects, with their values.
pub fn read<M: Module>(model: &M, wanted: impl FnMut(&TreePath) -> bool) -> Vec<Visited> {
    struct Reader<F> {
        at: TreePath,
        wanted: F,
        out: Vec<Visited>,
    }
    impl<F: FnMut(&TreePath) -> bool> ModuleVisitor for Reader<F> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.at.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.at.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if (self.wanted)(&self.at) {
                self.out.push(Visited {
                    at: self.at.clone(),
                    id: param.id,
                    dims: param.lazy_shape().dims::<D>().to_vec(),
                    values: to_vec(param.val().detach()),
                });
            }
        }
    }
    let mut reader = Reader {
        at: TreePath::default(),
        wanted,
        out: vec![],
    };
    model.visit(&mut reader);
    reader.out
}

/// Maps every float tensor of `model`: `f` gets where it sits and its dimensions and returns
/// new values (same number, row-major) or `None` to keep it. Parameter ids, devices and
/// gradient requirements are kept.
///
/// Mapping writes `RunningState`, [`StateTensor`](crate::StateTensor) and
/// [`FlagState`](crate::FlagState) cells in place, and those are shared by clones: call
/// [`own_state`] first unless the caller means to write through to every clone. New values go
/// through each parameter's load hook, as a loaded record's do (which, unlike this function,
/// gives the quantizers' state cells of their own).
pub fn map_values<M: Module>(
    model: M,
    f: impl FnMut(&TreePath, &[usize]) -> Option<Vec<f32>>,
) -> M {
    struct Mapper<F> {
        at: TreePath,
        f: F,
    }
    impl<F: FnMut(&TreePath, &[usize]) -> Option<Vec<f32>>> ModuleMapper for Mapper<F> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.at.enter(name, container_type);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.at.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dims = param.lazy_shape().dims::<D>();
            let Some(values) = (self.f)(&self.at, &dims) else {
                return param;
            };
            if values.len() != dims.iter().product::<usize>() {
                return param;
            }
            // Written as a record would be (save hook, then load hook: a layout hook such as
            // `Linear`'s column layout round-trips to the same tensor), so a `FlagState` reads
            // its new value in its load hook; the gradient requirement is set last, on the
            // loaded leaf.
            let (id, old, mapper) = param.consume();
            let grad = old.is_require_grad();
            let t = Tensor::<1>::from_floats(values.as_slice(), &old.device()).reshape(old.dims());
            let t = mapper.on_load(mapper.on_save(t.detach())).detach();
            let t = if grad { t.require_grad() } else { t };
            Param::from_mapped_value(id, t, mapper)
        }
    }
    let _in_place = InPlace::enter();
    model.map(&mut Mapper {
        at: TreePath::default(),
        f,
    })
}

thread_local! {
    static IN_PLACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as writing in place ([`map_values`]) until dropped (also on a panic).
struct InPlace(bool);

impl InPlace {
    fn enter() -> Self {
        Self(IN_PLACE.with(|c| c.replace(true)))
    }
}

impl Drop for InPlace {
    fn drop(&mut self) {
        IN_PLACE.with(|c| c.set(self.0));
    }
}

/// Whether the values being loaded on this thread come from [`map_values`], which writes
/// shared state cells in place, rather than from Burn's record loader, whose values go into
/// cells of their own ([`StateTensor`](crate::StateTensor), [`FlagState`](crate::FlagState)).
pub(crate) fn writing_in_place() -> bool {
    IN_PLACE.with(|c| c.get())
}

/// Sets every element of the tensors `f` selects to the value it returns.
pub fn fill<M: Module>(model: M, mut f: impl FnMut(&TreePath) -> Option<f32>) -> M {
    map_values(model, |at, dims| {
        f(at).map(|v| vec![v; dims.iter().product()])
    })
}

/// `model` with its own state cells (`RunningState`, [`StateTensor`](crate::StateTensor),
/// [`FlagState`](crate::FlagState)): the same values, ids and mode.
///
/// Burn's `RunningState` (observer ranges, switches, BatchNorm statistics) is shared by
/// clones, so writing a switch into `model.clone()` would also switch `model`. Every switch of
/// burn-qat calls this first: a clone is a copy. The cells are made the way Burn's `valid()`
/// makes them; a model on an autodiff device is returned to training with `train()`, which
/// restores its parameters' gradient requirements and its training flags.
pub fn own_state<M: Module>(model: M) -> M {
    let autodiff = model.devices().iter().any(|d| d.is_autodiff());
    if autodiff {
        model.valid().train()
    } else {
        model.valid()
    }
}

/// What kind of quantizer a [`QuantizerState`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizerKind {
    /// A [`FakeQuant`] (activations, or any tensor) with a range observer.
    Observed,
    /// A [`LearnedFakeQuant`].
    Learned,
    /// A [`WeightFakeQuant`].
    Weight,
}

/// One quantizer of a model, as recorded in it.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizerState {
    /// Dotted path: the quantizer module's, or for a weight quantizer attached to a parameter,
    /// the parameter's.
    pub path: String,
    /// Its kind.
    pub kind: QuantizerKind,
    /// The recorded spec (`None` if the record holds no valid spec).
    pub spec: Option<QuantSpec>,
    /// Whether fake quantization is applied.
    pub enabled: bool,
    /// Whether its range is frozen.
    pub frozen: bool,
    /// Whether it holds a range: observed, loaded, or (frozen weights) captured.
    pub observed: bool,
    /// Learned quantizers: whether the learned range is in use.
    pub learning: bool,
    /// Observed (or frozen) range per channel.
    pub range: Option<(Vec<f32>, Vec<f32>)>,
    /// Learned parameters by field name (`scale`, `offset`, `alpha`, `min`, `max`).
    pub learned: BTreeMap<String, Vec<f32>>,
}

impl QuantizerState {
    fn new(path: String, kind: QuantizerKind) -> Self {
        Self {
            path,
            kind,
            spec: None,
            enabled: false,
            frozen: false,
            observed: false,
            learning: false,
            range: None,
            learned: BTreeMap::new(),
        }
    }
}

/// Where the quantizer holding the innermost field sits, and its kind, or `None` if the field
/// belongs to no quantizer.
fn owner(at: &TreePath) -> Option<(String, QuantizerKind)> {
    let (_, holder) = at.up(0)?;
    if holder == FakeQuant::TYPE {
        if at.up(1) == Some((LearnedFakeQuant::OBSERVER, LearnedFakeQuant::TYPE)) {
            return Some((at.prefix(2), QuantizerKind::Learned));
        }
        return Some((at.prefix(1), QuantizerKind::Observed));
    }
    if holder == LearnedFakeQuant::TYPE {
        return Some((at.prefix(1), QuantizerKind::Learned));
    }
    if holder == WeightFakeQuant::TYPE {
        // Attached to a parameter: `<param>.<reparameterization name>.<field>`.
        let reparam = at
            .up(1)
            .is_some_and(|(_, h)| h == burn_types::REPARAMETERIZATION);
        return Some((
            at.prefix(if reparam { 2 } else { 1 }),
            QuantizerKind::Weight,
        ));
    }
    None
}

/// Every quantizer of `model` ([`FakeQuant`], [`LearnedFakeQuant`], [`WeightFakeQuant`]) with
/// its recorded state, in visiting order. This reads the model, not a configuration.
pub fn quantizers<M: Module>(model: &M) -> Vec<QuantizerState> {
    let mut order: Vec<String> = vec![];
    let mut found: BTreeMap<String, QuantizerState> = BTreeMap::new();
    for v in read(model, |at| owner(at).is_some()) {
        let Some((path, kind)) = owner(&v.at) else {
            continue;
        };
        let state = found.entry(path.clone()).or_insert_with(|| {
            order.push(path.clone());
            QuantizerState::new(path, kind)
        });
        let flag = crate::FlagState::decode(&v.values);
        let is = |holder: &str, fields: &[&str]| v.at.is_any(holder, fields);
        let (fq, w, l) = (
            FakeQuant::TYPE,
            WeightFakeQuant::TYPE,
            LearnedFakeQuant::TYPE,
        );
        if is(fq, &[FakeQuant::SPEC_CODE]) || is(w, &[WeightFakeQuant::SPEC_CODE]) {
            state.spec = crate::decode_spec(&v.values);
        } else if is(fq, &[FakeQuant::ENABLED]) || is(w, &[WeightFakeQuant::ENABLED]) {
            state.enabled = flag;
        } else if is(fq, &[FakeQuant::FROZEN]) || is(w, &[WeightFakeQuant::FROZEN]) {
            state.frozen = flag;
        } else if is(fq, &[FakeQuant::OBSERVED]) || is(w, &[WeightFakeQuant::OBSERVED]) {
            state.observed = flag;
        } else if is(fq, &[FakeQuant::MIN]) || is(w, &[WeightFakeQuant::MIN]) {
            state.range.get_or_insert_with(Default::default).0 = v.values;
        } else if is(fq, &[FakeQuant::MAX]) || is(w, &[WeightFakeQuant::MAX]) {
            state.range.get_or_insert_with(Default::default).1 = v.values;
        } else if is(l, &[LearnedFakeQuant::LEARNING]) {
            state.learning = flag;
        } else if is(l, &LearnedFakeQuant::RANGE_PARAMS) || is(w, &[WeightFakeQuant::SCALE]) {
            let field = v.at.field().unwrap_or_default().to_string();
            state.learned.insert(field, v.values);
        }
    }
    order
        .into_iter()
        .filter_map(|p| found.remove(&p))
        .map(|mut q| {
            if !q.observed {
                q.range = None;
            }
            q
        })
        .collect()
}

/// `[-1.0000, 3.0000]` (the hull over channels, with the channel count when there are
/// several), or `not observed`: how summaries and module displays print a range.
pub fn describe_range(range: Option<(Vec<f32>, Vec<f32>)>) -> String {
    match range {
        None => "not observed".to_string(),
        Some((lo, hi)) => {
            let l = lo.iter().copied().fold(0f32, f32::min);
            let h = hi.iter().copied().fold(0f32, f32::max);
            if lo.len() > 1 {
                format!("[{l:.4}, {h:.4}] over {} channels", lo.len())
            } else {
                format!("[{l:.4}, {h:.4}]")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        FakeQuantConfig, LearnedFakeQuantConfig, LearnedRange, WeightFakeQuantConfig,
        WeightFakeQuantizer,
    };
    use burn::nn::{Linear, LinearConfig};

    fn seen<M: Module>(m: &M) -> Vec<(String, String)> {
        read(m, |_| true)
            .into_iter()
            .map(|v| {
                let (f, h) = v.at.up(0).unwrap();
                (f.to_string(), h.to_string())
            })
            .collect()
    }

    fn pairs(holder: &str, fields: &[&str]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| (f.to_string(), holder.to_string()))
            .collect()
    }

    /// Renaming a recorded field of a quantizer without its constant fails here.
    #[test]
    fn names_match_the_quantizers_fields() {
        let device = Device::flex();
        let spec = QuantSpec::default();
        let fq = FakeQuantConfig::new(spec).init(&device).unwrap();
        let fq_fields = [
            FakeQuant::MIN,
            FakeQuant::MAX,
            FakeQuant::OBSERVED,
            FakeQuant::ENABLED,
            FakeQuant::FROZEN,
            FakeQuant::SPEC_CODE,
        ];
        assert_eq!(seen(&fq), pairs(FakeQuant::TYPE, &fq_fields));

        let wfq = WeightFakeQuantConfig::new(spec).init(&device).unwrap();
        let w_fields = [
            WeightFakeQuant::ENABLED,
            WeightFakeQuant::FROZEN,
            WeightFakeQuant::OBSERVED,
            WeightFakeQuant::MIN,
            WeightFakeQuant::MAX,
            WeightFakeQuant::SPEC_CODE,
        ];
        assert_eq!(seen(&wfq), pairs(WeightFakeQuant::TYPE, &w_fields));
        let wfq = wfq.with_learned_step(Tensor::<2>::ones([2, 2], &device));
        assert_eq!(
            seen(&wfq).last(),
            Some(&(
                WeightFakeQuant::SCALE.to_string(),
                WeightFakeQuant::TYPE.to_string()
            ))
        );

        for (method, learned) in [
            (
                LearnedRange::LsqPlus,
                [LearnedFakeQuant::SCALE, LearnedFakeQuant::OFFSET],
            ),
            (
                LearnedRange::MinMax,
                [LearnedFakeQuant::MIN, LearnedFakeQuant::MAX],
            ),
        ] {
            let lfq = LearnedFakeQuantConfig::new(spec, method)
                .init(&device)
                .unwrap();
            let mut want = pairs(FakeQuant::TYPE, &fq_fields);
            want.extend(pairs(LearnedFakeQuant::TYPE, &learned));
            want.extend(pairs(LearnedFakeQuant::TYPE, &[LearnedFakeQuant::LEARNING]));
            assert_eq!(seen(&lfq), want, "{method:?}");
            let observer = read(&lfq, |_| true)[0].at.up(1).unwrap().0.to_string();
            assert_eq!(observer, LearnedFakeQuant::OBSERVER);
        }
        let pact = LearnedFakeQuantConfig::new(spec, LearnedRange::Pact)
            .init(&device)
            .unwrap();
        assert!(seen(&pact).contains(&(
            LearnedFakeQuant::ALPHA.to_string(),
            LearnedFakeQuant::TYPE.to_string()
        )));
    }

    #[test]
    fn burn_type_names_match_burn() {
        let device = Device::flex();
        let linear: Linear = LinearConfig::new(2, 3).init(&device);
        assert_eq!(
            seen(&linear),
            pairs(burn_types::LINEAR, &[burn_types::WEIGHT, burn_types::BIAS])
        );
        let bn = burn::nn::BatchNormConfig::new(2).init(&device);
        let bn_fields = [
            burn_types::GAMMA,
            burn_types::BETA,
            burn_types::RUNNING_MEAN,
            burn_types::RUNNING_VAR,
        ];
        assert_eq!(seen(&bn), pairs(burn_types::BATCH_NORM, &bn_fields));
        let conv = burn::nn::conv::Conv2dConfig::new([1, 2], [3, 3]).init(&device);
        assert!(seen(&conv).iter().all(|(_, h)| h == burn_types::CONV2D));
        let conv = burn::nn::conv::Conv1dConfig::new(1, 2, 3).init(&device);
        assert!(seen(&conv).iter().all(|(_, h)| h == burn_types::CONV1D));
        // A weight quantizer attached to a parameter sits under Burn's reparameterization frame,
        // and `quantizers` reports it at the parameter's path.
        let linear =
            linear.apply_reparameterization(WeightFakeQuantizer::new(|path: &str, _: &[usize]| {
                (path == "weight").then_some(QuantSpec::default())
            }));
        let inside = read(&linear, |at| at.inside(burn_types::REPARAMETERIZATION));
        assert!(!inside.is_empty());
        let q = quantizers(&linear);
        assert_eq!(q.len(), 1);
        assert_eq!(
            (q[0].path.as_str(), q[0].kind),
            ("weight", QuantizerKind::Weight)
        );
        assert_eq!(q[0].spec, Some(QuantSpec::default()));
    }

    #[test]
    fn own_state_makes_a_clone_a_copy() {
        let device = Device::flex().autodiff();
        let fq = FakeQuantConfig::new(QuantSpec::default())
            .init(&device)
            .unwrap();
        let copy = own_state(fq.clone());
        let copy = fill(copy, |at| {
            at.is(FakeQuant::TYPE, FakeQuant::ENABLED).then_some(0.0)
        });
        assert!(!copy.is_enabled());
        assert!(fq.is_enabled());
        // Without own_state, the write reaches every clone (Burn's RunningState).
        let shared = fill(fq.clone(), |at| {
            at.is(FakeQuant::TYPE, FakeQuant::ENABLED).then_some(0.0)
        });
        assert!(!shared.is_enabled());
        assert!(!fq.is_enabled());
    }
}
