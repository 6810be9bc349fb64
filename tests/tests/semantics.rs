//! What the model says is what it computes: a clone is a copy, every quantizer obeys every
//! switch, a record must match its skeleton, and the summary reads the model.

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{BatchNormConfig, Linear, LinearConfig, Relu};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_qat::graph;
use burn_qat::model::{QatConfig, WeightQuant, bake, quantize, summary};
use burn_qat::nn::tree;
use burn_qat::transform::{FusedConfig, FusedConv2d, QatSchedule, set_bn_frozen};
use burn_qat::{
    FakeQuant, FakeQuantConfig, LearnedFakeQuant, LearnedFakeQuantConfig, LearnedRange, QatError,
    QuantSpec, WeightFakeQuant, WeightFakeQuantizer, start_learning, switches,
};
use burn_qat_tests::{backends, values};

/// Every kind of quantizer: an input `FakeQuant`, a fused Conv+BN with weight and output
/// quantizers, a Linear with a weight quantizer attached to its parameter, an LSQ quantizer
/// still observing and a PACT quantizer already learning.
#[derive(Module, Debug)]
struct Zoo {
    input: FakeQuant,
    conv: FusedConv2d,
    fc: Linear,
    lsq: LearnedFakeQuant,
    pact: LearnedFakeQuant,
    relu: Relu,
}

impl Zoo {
    fn new(device: &Device) -> Self {
        let act = QuantSpec::int8_act_per_tensor_asymmetric();
        let fc = LinearConfig::new(4 * 4 * 4, 8)
            .init(device)
            .apply_reparameterization(WeightFakeQuantizer::new(|path: &str, _: &[usize]| {
                (path == "weight").then_some(QuantSpec::int8_weight_per_channel_symmetric(1))
            }));
        Self {
            input: FakeQuantConfig::new(act).init(device).unwrap(),
            conv: FusedConfig::new()
                .init(
                    Conv2dConfig::new([1, 4], [3, 3]).init(device),
                    Some(BatchNormConfig::new(4).init(device)),
                )
                .unwrap(),
            fc,
            lsq: LearnedFakeQuantConfig::new(act, LearnedRange::Lsq)
                .init(device)
                .unwrap(),
            pact: LearnedFakeQuantConfig::new(
                QuantSpec::act_per_tensor_asymmetric(8).with_signed(false),
                LearnedRange::Pact,
            )
            .init(device)
            .unwrap(),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let y = self.conv.forward(self.input.forward(x));
        let y = self.fc.forward(y.flatten(1, 3));
        self.pact.forward(self.relu.forward(self.lsq.forward(y)))
    }
}

fn input(device: &Device, scale: f32) -> Tensor<4> {
    Tensor::<4>::random([2, 1, 6, 6], Distribution::Normal(0.0, 1.0), device).mul_scalar(scale)
}

/// A trained-looking zoo: every observer has seen data, PACT is learning.
fn zoo(device: &Device) -> Zoo {
    device.seed(5);
    let z = Zoo::new(device);
    for _ in 0..3 {
        let _ = z.forward(input(device, 1.0));
    }
    Zoo {
        pact: z.pact.clone().start_learning(),
        ..z
    }
}

/// Every tensor of the model, by path, after flushing the updates waiting in its shared state
/// (`valid()` does, as any read after a step would).
fn snapshot<M: Module>(m: &M) -> Vec<(String, Vec<f32>)> {
    tree::read(&m.valid(), |_| true)
        .into_iter()
        .map(|v| (v.at.path(), v.values))
        .collect()
}

#[test]
fn a_switched_clone_leaves_the_original_untouched() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let z = zoo(&device);
        let before = snapshot(&z);
        let frozen = switches::freeze_observers(z.clone());
        let ops: Vec<(&str, Box<dyn Fn(Zoo) -> Zoo>)> = vec![
            (
                "set_fake_quant_enabled",
                Box::new(|m| switches::set_fake_quant_enabled(m, false)),
            ),
            ("freeze_observers", Box::new(switches::freeze_observers)),
            (
                "unfreeze_observers",
                Box::new(move |_| switches::unfreeze_observers(frozen.clone())),
            ),
            ("set_bn_frozen", Box::new(|m| set_bn_frozen(m, true))),
            (
                "schedule.step",
                Box::new(|m| QatSchedule::new(Some(1), Some(1)).step(m)),
            ),
            ("start_learning", Box::new(start_learning)),
            ("bake", Box::new(|m| bake(m).train())),
            (
                "FakeQuant::set_enabled",
                Box::new(|m: Zoo| Zoo {
                    input: m.input.clone().set_enabled(false),
                    ..m
                }),
            ),
            (
                "FakeQuant::set_observing",
                Box::new(|m: Zoo| Zoo {
                    input: m.input.clone().set_observing(false),
                    ..m
                }),
            ),
            (
                "FakeQuant::set_range",
                Box::new(|m: Zoo| Zoo {
                    input: m.input.clone().set_range(&[-9.0], &[9.0]).unwrap(),
                    ..m
                }),
            ),
            (
                "Fused::set_bn_frozen",
                Box::new(|m: Zoo| Zoo {
                    conv: m.conv.clone().set_bn_frozen(true),
                    ..m
                }),
            ),
            (
                "LearnedFakeQuant::start_learning",
                Box::new(|m: Zoo| Zoo {
                    lsq: m.lsq.clone().start_learning(),
                    ..m
                }),
            ),
        ];
        for (name, op) in &ops {
            let switched = op(z.clone());
            let after = snapshot(&z);
            let changed: Vec<&String> = after
                .iter()
                .zip(&before)
                .filter(|(a, b)| a != b)
                .map(|(a, _)| &a.0)
                .collect();
            assert!(
                changed.is_empty(),
                "{}: {name} on a clone changed the original: {changed:?}",
                b.name
            );
            if *name != "bake" && *name != "unfreeze_observers" {
                assert!(
                    snapshot(&switched) != before,
                    "{}: {name} changed nothing",
                    b.name
                );
            }
        }
        // The original still trains as before: observers observe, fake quantization is on.
        let range = z.input.observed_range().unwrap();
        let _ = z.forward(input(&device, 10.0));
        assert!(z.input.is_enabled() && !z.input.is_frozen(), "{}", b.name);
        assert_ne!(z.input.observed_range().unwrap(), range, "{}", b.name);
        // Switches through `&model` (burn-train's `&self` step) write the shared state.
        switches::in_place::freeze_observers(&z);
        assert!(z.input.is_frozen(), "{}", b.name);
    }
}

/// The float model: the same zoo with every quantizer off, computed without quantizers.
fn float_forward(z: &Zoo, x: Tensor<4>) -> Tensor<2> {
    let conv = FusedConv2d {
        weight_quant: None,
        output: None,
        ..z.conv.clone()
    };
    let y = conv.forward(x).flatten(1, 3);
    let y =
        y.matmul(z.fc.weight.base().unsqueeze()) + z.fc.bias.as_ref().unwrap().val().unsqueeze();
    Relu::new().forward(y)
}

#[test]
fn every_quantizer_obeys_fake_quant_off() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let z = zoo(&device).valid();
        let plain = b.device.clone();
        let x = input(&plain, 1.0);
        let on = values(z.forward(x.clone()));
        let off = switches::set_fake_quant_enabled(z.clone(), false);
        let got = values(off.forward(x.clone()));
        let want = values(float_forward(&off, x.clone()));
        assert_ne!(on, want, "{}: the zoo quantizes", b.name);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{}: {got:?} vs {want:?}", b.name);
        }
        // Each quantizer alone: identity when off, in both learned phases.
        let t = Tensor::<1>::from_floats([-0.3333, 0.1234, 0.77], &plain);
        let lsq_learning = off.lsq.clone().start_learning();
        assert!(lsq_learning.is_learning());
        for (name, y) in [
            ("FakeQuant", off.input.forward(t.clone())),
            ("LearnedFakeQuant observing", off.lsq.forward(t.clone())),
            ("LearnedFakeQuant learning", lsq_learning.forward(t.clone())),
            (
                "LearnedFakeQuant (PACT) learning",
                off.pact.forward(t.clone()),
            ),
        ] {
            assert_eq!(values(y), values(t.clone()), "{}: {name}", b.name);
        }
        assert_eq!(
            values(off.fc.weight.val()),
            values(off.fc.weight.base()),
            "{}",
            b.name
        );
        // And back on: the same outputs as before.
        let back = switches::set_fake_quant_enabled(off, true);
        assert_eq!(values(back.forward(x)), on, "{}", b.name);
    }
}

#[test]
fn every_quantizer_obeys_frozen_observers() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let z = switches::freeze_observers(zoo(&device));
        let ranges = |z: &Zoo| {
            tree::quantizers(z)
                .into_iter()
                .filter(|q| q.kind != tree::QuantizerKind::Weight)
                .map(|q| (q.path, q.range))
                .collect::<Vec<_>>()
        };
        let before = ranges(&z);
        // Training forward/backward on a much wider input.
        let y = z.forward(input(&device, 50.0));
        let grads = y.sum().backward();
        assert_eq!(ranges(&z), before, "{}: a frozen observer moved", b.name);
        // The learned PACT range gets no gradient while frozen (and one when not).
        let alpha = z.pact.alpha.as_ref().unwrap().val();
        assert!(
            alpha.grad(&grads).is_none(),
            "{}: frozen PACT alpha got a gradient",
            b.name
        );
        let live = switches::unfreeze_observers(z.clone());
        let grads = live.forward(input(&device, 1.0)).sum().backward();
        assert!(
            live.pact
                .alpha
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .is_some(),
            "{}",
            b.name
        );
        // Weight quantizers keep the range of the weight they saw first after the freeze,
        // however the weight changes afterwards.
        let wfq = |z: &Zoo| {
            z.fc.weight
                .reparameterization::<WeightFakeQuant>()
                .unwrap()
                .clone()
        };
        let q = wfq(&z).qparams_for(z.fc.weight.base());
        let doubled = z.fc.weight.base().mul_scalar(2.0);
        assert_eq!(
            wfq(&z).qparams_for(doubled.clone()),
            q,
            "{}: frozen weight range moved",
            b.name
        );
        let live_q = wfq(&live).qparams_for(doubled);
        assert!(
            live_q
                .iter()
                .zip(&q)
                .all(|(a, b)| (a.scale - 2.0 * b.scale).abs() < 1e-6 * a.scale.max(1.0)),
            "{}: an unfrozen weight quantizer follows its weight",
            b.name
        );
        // BatchNorm frozen: training leaves the running statistics alone.
        let bn = set_bn_frozen(z.clone(), true);
        let mean = values(bn.conv.bn.as_ref().unwrap().running_mean.value());
        let _ = bn.forward(input(&device, 3.0));
        assert_eq!(
            values(bn.conv.bn.as_ref().unwrap().running_mean.value()),
            mean,
            "{}",
            b.name
        );
        let _ = live.forward(input(&device, 3.0));
        assert_ne!(
            values(live.conv.bn.as_ref().unwrap().running_mean.value()),
            mean,
            "{}",
            b.name
        );
    }
}

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: FakeQuant,
}

impl Mlp {
    fn new(device: &Device, bits: u32) -> Self {
        Self {
            fc1: LinearConfig::new(4, 8).init(device),
            fc2: LinearConfig::new(8, 2).init(device),
            act: FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(bits))
                .init(device)
                .unwrap(),
        }
    }
}

#[test]
fn a_record_must_match_its_skeleton() {
    let device = backends()[0].device.clone().autodiff();
    let config =
        |bits: u32| QatConfig::new().with_layer("fc2", WeightQuant::per_channel_bits(bits));
    let saved = quantize(Mlp::new(&device, 8), &config(8)).unwrap();
    let _ = saved
        .act
        .forward(Tensor::<2>::from_floats([[-1.0, 2.0]], &device));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mlp.bpk");
    saved.clone().valid().save_file(&path).unwrap();

    // The same configuration: loads with its state.
    let skeleton = quantize(Mlp::new(&device, 8), &config(8)).unwrap();
    let loaded = burn_qat::load_file(skeleton, &path).unwrap();
    assert_eq!(loaded.act.observed_range(), Some((vec![-1.0], vec![2.0])));

    // 4-bit weights in the skeleton: refused, naming the layer and both specs.
    let skeleton = quantize(Mlp::new(&device, 8), &config(4)).unwrap();
    let err = burn_qat::load_file(skeleton, &path).unwrap_err();
    let QatError::RecordMismatch {
        layer,
        recorded,
        model,
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(layer, "fc2.weight");
    assert!(
        recorded.starts_with("8-bit") && model.starts_with("4-bit"),
        "{err}"
    );
    // Activation bits differ: refused too.
    let skeleton = quantize(Mlp::new(&device, 6), &config(8)).unwrap();
    let err = burn_qat::load_file(skeleton, &path).unwrap_err();
    assert!(
        err.to_string().contains("`act`") && err.to_string().contains("6-bit"),
        "{err}"
    );
    // A float skeleton does not fit a quantized record.
    let err = burn_qat::load_file(Mlp::new(&device, 8), &path).unwrap_err();
    assert!(matches!(err, QatError::Record { .. }), "{err}");
    // A missing file names the path.
    let err = burn_qat::load_file(Mlp::new(&device, 8), dir.path().join("nope.bpk")).unwrap_err();
    assert!(err.to_string().contains("nope.bpk"), "{err}");
}

/// Loading a record into a clone (Burn's own `try_load_file`, or burn-qat's checked
/// `load_file`) leaves the original untouched: specs, ranges and switches. Before, every
/// quantizer state was a cell shared by clones, and the original of a 4-bit skeleton loaded
/// with an 8-bit record then reported 8-bit specs and the record's ranges.
#[test]
fn loading_into_a_clone_leaves_the_original_untouched() {
    let device = backends()[0].device.clone().autodiff();
    let config =
        |bits: u32| QatConfig::new().with_layer("fc2", WeightQuant::per_channel_bits(bits));
    let saved = quantize(Mlp::new(&device, 8), &config(8)).unwrap();
    let _ = saved
        .act
        .forward(Tensor::<2>::from_floats([[-1.0, 2.0]], &device));
    let saved = switches::freeze_observers(saved);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mlp.bpk");
    saved.clone().valid().save_file(&path).unwrap();

    for bits in [4, 8] {
        let skeleton = quantize(Mlp::new(&device, 8), &config(bits)).unwrap();
        let _ = skeleton
            .act
            .forward(Tensor::<2>::from_floats([[-5.0, 7.0]], &device));
        let before = (tree::quantizers(&skeleton), snapshot(&skeleton));
        let loaded = skeleton.clone().try_load_file(&path).unwrap();
        assert_eq!(loaded.act.observed_range(), Some((vec![-1.0], vec![2.0])));
        assert!(loaded.act.is_frozen());
        if bits == 8 {
            let checked = burn_qat::load_file(skeleton.clone(), &path).unwrap();
            assert_eq!(checked.act.observed_range(), Some((vec![-1.0], vec![2.0])));
        }
        let after = (tree::quantizers(&skeleton), snapshot(&skeleton));
        assert_eq!(
            before.0, after.0,
            "{bits}-bit skeleton: its quantizers changed"
        );
        assert_eq!(before.1, after.1, "{bits}-bit skeleton: its state changed");
        assert_eq!(skeleton.act.observed_range(), Some((vec![-5.0], vec![7.0])));
        assert!(!skeleton.act.is_frozen());
    }
}

/// Burn's own `BatchNorm` statistics are a `RunningState`, which Burn's loader writes in place
/// (reaching every clone); `burn_qat::load_file` gives the loaded model cells of its own.
#[test]
fn checked_loading_leaves_a_clones_batch_norm_statistics() {
    #[derive(Module, Debug)]
    struct Bn {
        bn: burn::nn::BatchNorm,
        act: FakeQuant,
    }
    let device = backends()[0].device.clone().autodiff();
    let bn = || Bn {
        bn: BatchNormConfig::new(2).init(&device),
        act: FakeQuantConfig::new(QuantSpec::default())
            .init(&device)
            .unwrap(),
    };
    let trained = bn();
    let x = Tensor::<3>::from_floats([[[4.0, 6.0], [-2.0, 8.0]]], &device);
    let _ = trained.act.forward(trained.bn.forward(x));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bn.bpk");
    trained.valid().save_file(&path).unwrap();
    let skeleton = bn();
    let before = snapshot(&skeleton);
    let loaded = burn_qat::load_file(skeleton.clone(), &path).unwrap();
    assert_ne!(snapshot(&loaded), before);
    assert_eq!(
        snapshot(&skeleton),
        before,
        "loading wrote into the skeleton's clone"
    );
}

#[test]
fn summary_reads_the_model() {
    let device = backends()[0].device.clone().autodiff();
    let z = zoo(&device);
    let report = summary(&z);
    let weight = |r: &burn_qat::model::QatSummary, p: &str| {
        r.layers
            .iter()
            .find(|l| l.path == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p}: {r}"))
    };
    let act = |r: &burn_qat::model::QatSummary, p: &str| {
        r.activations
            .iter()
            .find(|a| a.path == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p}: {r}"))
    };
    // Fused weights and weights with an attached quantizer, with their real specs.
    assert_eq!(
        weight(&report, "conv.layer.weight").spec,
        Some(QuantSpec::int8_weight_per_channel_symmetric(0))
    );
    assert_eq!(
        weight(&report, "fc.weight").spec,
        Some(QuantSpec::int8_weight_per_channel_symmetric(1))
    );
    assert!(weight(&report, "fc.weight").enabled);
    let input = act(&report, "input");
    assert!(input.enabled && !input.frozen && input.learning.is_none());
    let (lo, hi) = input.range.unwrap();
    let (want_lo, want_hi) = z.input.observed_range().unwrap();
    assert_eq!((lo, hi), (want_lo[0], want_hi[0]));
    assert_eq!(
        act(&report, "conv.output.Observed").spec,
        Some(QuantSpec::int8_act_per_tensor_asymmetric())
    );
    assert_eq!(act(&report, "lsq").learning, Some(false));
    let pact = act(&report, "pact");
    assert_eq!(pact.learning, Some(true));
    assert_eq!(pact.learned.keys().collect::<Vec<_>>(), ["alpha"]);
    // Switches show.
    let report = summary(&switches::freeze_observers(
        switches::set_fake_quant_enabled(z.clone(), false),
    ));
    assert!(
        report
            .layers
            .iter()
            .filter(|l| l.spec.is_some())
            .all(|l| !l.enabled && l.frozen),
        "{report}"
    );
    assert!(
        report.activations.iter().all(|a| !a.enabled && a.frozen),
        "{report}"
    );
    let text = report.to_string();
    assert!(text.contains("off, frozen"), "{text}");
    // Burn's module display shows the same facts.
    let shown = format!("{z}");
    assert!(
        shown.contains("8-bit signed asymmetric per-tensor"),
        "{shown}"
    );
    assert!(
        shown.contains("phase: learning") && shown.contains("frozen: false"),
        "{shown}"
    );

    // A graph-mode model.
    #[derive(Module, Debug)]
    struct WithAVeryLongNameForTheFirstLayerOfTheNetwork {
        a_rather_long_field_name_for_the_projection: Linear,
        head: Linear,
    }
    let m = WithAVeryLongNameForTheFirstLayerOfTheNetwork {
        a_rather_long_field_name_for_the_projection: LinearConfig::new(4, 8).init(&device),
        head: LinearConfig::new(8, 2).init(&device),
    };
    let g = graph::prepare(
        &m,
        &[1, 4],
        |m: &WithAVeryLongNameForTheFirstLayerOfTheNetwork, x: Tensor<2>| {
            m.head
                .forward(m.a_rather_long_field_name_for_the_projection.forward(x))
        },
        &QatConfig::new().with_layer("head", WeightQuant::per_channel_bits(4)),
    )
    .unwrap();
    let report = graph::summary(&g);
    let paths: Vec<&str> = report.layers.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "a_rather_long_field_name_for_the_projection.weight",
            "head.weight"
        ],
        "{report}"
    );
    assert!(summary(&g).layers[0].path.starts_with("layers."));
    let quantized: Vec<u32> = report
        .layers
        .iter()
        .filter_map(|l| l.spec.map(|s| s.bits))
        .collect();
    assert_eq!(quantized, [8, 4], "{report}");
    assert!(!report.activations.is_empty(), "{report}");
    // Long paths widen their column instead of breaking the table: every row's quantization
    // cell starts where the header's does.
    let text = report.to_string();
    let lines: Vec<&str> = text.lines().take_while(|l| !l.is_empty()).collect();
    let col = lines[0].find("quantization").unwrap();
    for line in &lines[1..] {
        assert!(
            line[col..].starts_with("8-bit")
                || line[col..].starts_with("4-bit")
                || line[col..].starts_with("float"),
            "{text}"
        );
    }
}

#[test]
fn typed_errors_can_be_matched() {
    let device = backends()[0].device.clone().autodiff();
    let err = quantize(
        Mlp::new(&device, 8),
        &QatConfig::new().with_layer("fc9", WeightQuant::int8_per_channel()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, QatError::MatchesNothing { selector, available, .. } if selector == "fc9" && available.contains(&"fc1".to_string())),
        "{err}"
    );
    let err = quantize(
        Mlp::new(&device, 8),
        &QatConfig::new().with_layer("fc[", WeightQuant::int8_per_channel()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, QatError::InvalidPattern { pattern, .. } if pattern == "fc["),
        "{err}"
    );
    let q = quantize(Mlp::new(&device, 8), &QatConfig::new()).unwrap();
    let err = quantize(q, &QatConfig::new()).unwrap_err();
    assert!(
        matches!(&err, QatError::AlreadyQuantized { param } if param == "fc1.weight"),
        "{err}"
    );
    #[derive(Module, Debug)]
    struct Two {
        fc: Linear,
        bn: burn::nn::BatchNorm,
    }
    let two = Two {
        fc: LinearConfig::new(2, 2).with_bias(false).init(&device),
        bn: BatchNormConfig::new(2).init(&device),
    };
    let err =
        burn_qat::transform::fuse_batch_norms(two.clone(), &[("fc", "bn")], 1e-5).unwrap_err();
    assert!(
        matches!(&err, QatError::CannotFold { layer, .. } if layer == "fc"),
        "{err}"
    );
    let err = burn_qat::transform::fuse_batch_norms(two, &[("bn", "fc")], 1e-5).unwrap_err();
    assert!(
        matches!(&err, QatError::CannotFold { layer, .. } if layer == "bn"),
        "{err}"
    );
}

/// Renaming a field of `Fused` without its constant fails here (the quantizers' own names are
/// tested in `burn_qat_nn::tree`).
#[test]
fn fused_names_match_its_fields() {
    let device = backends()[0].device.clone();
    let z = Zoo::new(&device);
    type F = burn_qat::transform::FusedConv2d;
    let frames: Vec<(String, String)> = tree::read(&z.conv, |_| true)
        .into_iter()
        .map(|v| v.at.frames()[0].clone())
        .collect();
    for field in [F::LAYER, F::BN, F::WEIGHT_QUANT, F::OUTPUT, F::BN_FROZEN] {
        assert!(
            frames.contains(&(field.to_string(), F::TYPE.to_string())),
            "`{field}` of {} not in {frames:?}",
            F::TYPE
        );
    }
}

#[test]
fn fuse_batch_norms_on_a_clone_leaves_the_original() {
    #[derive(Module, Debug)]
    struct Two {
        fc: Linear,
        bn: burn::nn::BatchNorm,
    }
    let device = backends()[0].device.clone().autodiff();
    let two = Two {
        fc: LinearConfig::new(3, 2).init(&device),
        bn: BatchNormConfig::new(2).init(&device),
    };
    // Running statistics that are not the identity.
    let _ = two.bn.forward(Tensor::<2>::random(
        [8, 2],
        Distribution::Normal(2.0, 3.0),
        &device,
    ));
    let before = snapshot(&two);
    let folded = burn_qat::transform::fuse_batch_norms(two.clone(), &[("fc", "bn")], 1e-5).unwrap();
    assert_eq!(snapshot(&two), before);
    assert_ne!(snapshot(&folded), before);
}

#[test]
fn a_hand_built_per_channel_weight_quantizer_freezes_too() {
    let device = backends()[0].device.clone().autodiff();
    // Built by hand with the default `channels` (1) for a per-channel spec.
    let wfq = burn_qat::WeightFakeQuantConfig::new(QuantSpec::int8_weight_per_channel_symmetric(0))
        .init(&device)
        .unwrap();
    let wfq = switches::freeze_observers(wfq);
    let w = Tensor::<2>::random([3, 4], Distribution::Normal(0.0, 1.0), &device);
    let q = wfq.qparams_for(w.clone());
    assert_eq!(q.len(), 3);
    assert_eq!(
        wfq.qparams_for(w.mul_scalar(5.0)),
        q,
        "the frozen per-channel range holds"
    );
}
