//! Learned ranges: exact LSQ, LSQ+, PACT and trainable min/max gradients against the analytic
//! formulas, on every backend.

use burn::prelude::*;
use burn_qat::QuantSpec;
use burn_qat::core::tensor::{
    fake_quant_lsq, fake_quant_min_max, fake_quant_pact, lsq_grad_factor,
};
use burn_qat_tests::{backends, values};

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

#[test]
fn lsq_gradients_match_the_paper() {
    // 3-bit signed grid [-4, 3], s = 0.25: v = x / s = [-8, -1.2, 0, 1.04, 3.6, 20].
    let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(3);
    let xs = [-2.0f32, -0.3, 0.0, 0.26, 0.9, 5.0];
    for b in backends() {
        let d = b.device.clone().autodiff();
        for g in [1.0, lsq_grad_factor(xs.len(), spec.qmax())] {
            let x = Tensor::<1>::from_floats(xs, &d).require_grad();
            let s = Tensor::<1>::from_floats([0.25], &d).require_grad();
            let y = fake_quant_lsq(x.clone(), s.clone(), None, &spec, g);
            assert_eq!(
                values(y.clone()),
                vec![-1.0, -0.25, 0.0, 0.25, 0.75, 0.75],
                "{}",
                b.name
            );
            let grads = y.sum().backward();
            assert_eq!(
                values(x.grad(&grads).unwrap()),
                vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
                "{}",
                b.name
            );
            // ds = sum(qmin | round(v) - v | qmax) * g = (-4 + 0.2 + 0 - 0.04 + 3 + 3) * g
            let ds = values(s.grad(&grads).unwrap())[0];
            assert!(
                close(ds, 2.16 * g),
                "{}: ds {ds}, analytic {}",
                b.name,
                2.16 * g
            );
        }
    }
}

#[test]
fn lsq_plus_offset_gradient() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(3);
    let xs = [-2.0f32, -0.3, 0.0, 0.26, 0.9, 5.0];
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats(xs, &d).require_grad();
        let s = Tensor::<1>::from_floats([0.25], &d).require_grad();
        let o = Tensor::<1>::from_floats([0.1], &d).require_grad();
        let y = fake_quant_lsq(x.clone(), s.clone(), Some(o.clone()), &spec, 1.0);
        let grads = y.sum().backward();
        // v = (x - 0.1) / 0.25 = [-8.4, -1.6, -0.4, 0.64, 3.2, 19.6]
        assert_eq!(
            values(x.grad(&grads).unwrap()),
            vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0],
            "{}",
            b.name
        );
        let ds = values(s.grad(&grads).unwrap())[0];
        assert!(
            close(ds, -4.0 - 0.4 + 0.4 + 0.36 + 3.0 + 3.0),
            "{}: ds {ds}",
            b.name
        );
        let d_offset = values(o.grad(&grads).unwrap())[0];
        assert!(
            close(d_offset, 3.0),
            "{}: d offset {d_offset} (1 outside the range, 0 inside)",
            b.name
        );
    }
}

#[test]
fn lsq_per_channel() {
    let spec = QuantSpec::weight_per_channel_symmetric(4, 1);
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<2>::from_floats([[0.1, 2.0], [-0.33, -0.05]], &d).require_grad();
        let s = Tensor::<1>::from_floats([0.1, 0.01], &d).require_grad();
        let y = fake_quant_lsq(x.clone(), s.clone(), None, &spec, 1.0);
        assert!(
            values(y.clone())
                .iter()
                .zip([0.1, 0.07, -0.3, -0.05])
                .all(|(a, b)| close(*a, b)),
            "{}: {:?}",
            b.name,
            values(y)
        );
        let grads = y.sum().backward();
        // channel 0: v = [1, -3.3] -> [0, round(-3.3) + 3.3 = 0.3]; channel 1: v = [200, -5] -> [7, round(-5) + 5 = 0]
        let ds = values(s.grad(&grads).unwrap());
        assert!(close(ds[0], 0.3) && close(ds[1], 7.0), "{}: {ds:?}", b.name);
    }
}

#[test]
fn pact_gradients() {
    let spec = QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4);
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats([-0.5, 0.3, 0.99, 1.5, 3.0], &d).require_grad();
        let a = Tensor::<1>::from_floats([1.0], &d).require_grad();
        let y = fake_quant_pact(x.clone(), a.clone(), &spec);
        let yv = values(y.clone());
        assert_eq!(yv[0], 0.0, "{}", b.name);
        assert!(
            close(yv[1], 0.2666667) && close(yv[3], 1.0),
            "{}: {yv:?}",
            b.name
        );
        let grads = y.sum().backward();
        assert_eq!(
            values(x.grad(&grads).unwrap()),
            vec![0.0, 1.0, 1.0, 0.0, 0.0],
            "{}",
            b.name
        );
        assert_eq!(
            values(a.grad(&grads).unwrap()),
            vec![2.0],
            "{}: d alpha = #(x >= alpha)",
            b.name
        );
    }
}

#[test]
fn trainable_min_max_clip_gradients() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats([-3.0, -0.5, 0.5, 2.0, 4.0], &d).require_grad();
        let lo = Tensor::<1>::from_floats([-1.0], &d).require_grad();
        let hi = Tensor::<1>::from_floats([1.0], &d).require_grad();
        let y = fake_quant_min_max(x.clone(), lo.clone(), hi.clone(), &spec);
        let grads = (y * Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0, 5.0], &d))
            .sum()
            .backward();
        assert_eq!(
            values(x.grad(&grads).unwrap()),
            vec![0.0, 2.0, 3.0, 0.0, 0.0],
            "{}",
            b.name
        );
        assert_eq!(
            values(lo.grad(&grads).unwrap()),
            vec![1.0],
            "{}: min gets the gradient of values below it",
            b.name
        );
        assert_eq!(
            values(hi.grad(&grads).unwrap()),
            vec![9.0],
            "{}: max gets the gradient of values above it",
            b.name
        );
    }
}

mod modules {
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::prelude::*;
    use burn::store::ModuleRecord;
    use burn_qat::model::{QatConfig, WeightQuant, quantize};
    use burn_qat::nn::{LearnedFakeQuant, LearnedFakeQuantConfig, LearnedRange, start_learning};
    use burn_qat::{QuantSpec, WeightFakeQuant};
    use burn_qat_tests::{backends, values};

    #[derive(Module, Debug)]
    struct Net {
        act: LearnedFakeQuant,
        fc: Linear,
    }

    fn net(method: LearnedRange, device: &Device) -> Net {
        let spec = match method {
            LearnedRange::Pact => QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4),
            _ => QuantSpec::act_per_tensor_asymmetric(4),
        };
        Net {
            act: LearnedFakeQuantConfig::new(spec, method)
                .init(device)
                .unwrap(),
            fc: LinearConfig::new(4, 2).init(device),
        }
    }

    #[test]
    fn observe_then_learn_then_train_save_load_and_move() {
        for b in backends() {
            let d = b.device.clone().autodiff();
            d.seed(2);
            for method in [
                LearnedRange::Lsq,
                LearnedRange::LsqPlus,
                LearnedRange::Pact,
                LearnedRange::MinMax,
            ] {
                let model = net(method, &d);
                let x =
                    Tensor::<2>::from_floats([[-1.0, 0.5, 2.0, 0.25], [0.75, -0.5, 1.5, 3.0]], &d);
                let observed = values(model.act.forward(x.clone()));
                let model = start_learning(model);
                assert!(model.act.is_learning(), "{} {method:?}", b.name);
                let learned = values(model.act.forward(x.clone()));
                // Right after the hand-off the learned range reproduces the observed one (LSQ/LSQ+/
                // MinMax exactly up to a tie, PACT on its own unsigned grid).
                if method != LearnedRange::Pact {
                    // observed range [-1, 3]: asymmetric step 4/15; LSQ's symmetric step 3/7.
                    let step = if method == LearnedRange::Lsq {
                        3.0 / 7.0
                    } else {
                        4.0 / 15.0
                    };
                    for (o, l) in observed.iter().zip(&learned) {
                        assert!(
                            (o - l).abs() <= step * 1.01,
                            "{} {method:?}: {observed:?} vs {learned:?}",
                            b.name
                        );
                    }
                }
                // The learned parameter gets a gradient and Adam moves it.
                let param = |m: &Net| match method {
                    LearnedRange::Lsq | LearnedRange::LsqPlus => {
                        m.act.scale.as_ref().unwrap().val()
                    }
                    LearnedRange::Pact => m.act.alpha.as_ref().unwrap().val(),
                    LearnedRange::MinMax => m.act.max.as_ref().unwrap().val(),
                };
                let before = values(param(&model));
                let loss = model
                    .fc
                    .forward(model.act.forward(x.clone() * 3.0))
                    .powf_scalar(2.0)
                    .mean();
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                let mut optim = AdamConfig::new().init();
                let model = optim.step(1e-2, model, grads);
                let after = values(param(&model));
                assert_ne!(
                    before, after,
                    "{} {method:?}: the learned range did not move",
                    b.name
                );
                // Saved and restored with the model.
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("m.bpk");
                model.clone().into_record().save(&path).unwrap();
                let loaded = net(method, &d).load_record(ModuleRecord::load(&path).unwrap());
                assert!(loaded.act.is_learning(), "{} {method:?}", b.name);
                assert_eq!(values(param(&loaded)), after, "{} {method:?}", b.name);
                // Moved to another device with the model.
                let other = backends().last().unwrap().device.clone();
                let moved = loaded.valid().to_device(&other);
                assert_eq!(values(param(&moved)), after, "{} {method:?}", b.name);
            }
        }
    }

    #[test]
    fn lsq_on_an_unsigned_grid_starts_at_max_over_qmax() {
        for b in backends() {
            let d = b.device.clone().autodiff();
            let spec = QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4);
            let x = Tensor::<1>::from_floats([0.0, 1.0, 3.0], &d);
            // Both hand-offs: the module's own and the model-wide mapper.
            let fq = LearnedFakeQuantConfig::new(spec, LearnedRange::Lsq)
                .init(&d)
                .unwrap();
            let _ = fq.forward(x.clone());
            let own = fq.start_learning();
            let net = Net {
                act: LearnedFakeQuantConfig::new(spec, LearnedRange::Lsq)
                    .init(&d)
                    .unwrap(),
                fc: LinearConfig::new(3, 1).init(&d),
            };
            let _ = net.act.forward(x.clone());
            let mapped = start_learning(net).act;
            for m in [own, mapped] {
                let s = values(m.scale.as_ref().unwrap().val());
                assert!(
                    (s[0] - 0.2).abs() < 1e-6,
                    "{}: step {s:?}, want 3 / 15",
                    b.name
                );
                // The grid [0, 15] * 0.2 reproduces the observed values.
                assert_eq!(
                    values(m.forward(x.clone())),
                    vec![0.0, 1.0, 3.0],
                    "{}",
                    b.name
                );
            }
        }
    }

    #[derive(Module, Debug)]
    struct Mlp {
        fc1: Linear,
        fc2: Linear,
    }

    #[test]
    fn lsq_weights_through_the_model_api_learn() {
        for b in backends() {
            let d = b.device.clone().autodiff();
            d.seed(4);
            let mlp = Mlp {
                fc1: LinearConfig::new(8, 16).init(&d),
                fc2: LinearConfig::new(16, 3).init(&d),
            };
            let config = QatConfig::new()
                .with_default(WeightQuant::lsq(4))
                .with_layer("fc2", WeightQuant::lsq(8));
            let mut model = quantize(mlp, &config).unwrap();
            let wfq = model
                .fc1
                .weight
                .reparameterization::<WeightFakeQuant>()
                .unwrap();
            let s0 = values(wfq.scale.as_ref().expect("learned scale").val());
            assert_eq!(s0.len(), 16, "{}: one step size per output channel", b.name);
            let x = Tensor::<2>::random([32, 8], burn::tensor::Distribution::Normal(0.0, 1.0), &d);
            let y = x.clone().matmul(Tensor::<2>::random(
                [8, 3],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &d,
            ));
            let mut optim = AdamConfig::new().init();
            let mut losses = vec![];
            for _ in 0..30 {
                let out = model
                    .fc2
                    .forward(burn::tensor::activation::relu(model.fc1.forward(x.clone())));
                let loss = (out - y.clone()).powf_scalar(2.0).mean();
                losses.push(loss.clone().into_scalar::<f32>());
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(1e-2, model, grads);
            }
            assert!(losses[29] < 0.7 * losses[0], "{}: {losses:?}", b.name);
            let s1 = values(
                model
                    .fc1
                    .weight
                    .reparameterization::<WeightFakeQuant>()
                    .unwrap()
                    .scale
                    .as_ref()
                    .unwrap()
                    .val(),
            );
            assert_ne!(s0, s1, "{}: LSQ step sizes must learn", b.name);
            // 4-bit weights: at most 15 levels per output channel.
            let w = values(model.fc1.weight.val());
            for c in 0..16 {
                let col: Vec<f32> = (0..8).map(|r| w[r * 16 + c] / s1[c]).collect();
                assert!(
                    col.iter()
                        .all(|q| (q - q.round()).abs() < 1e-3 && q.abs() <= 7.001),
                    "{}: {col:?}",
                    b.name
                );
            }
        }
    }
}

/// Learned ranges inside fused `Sequential` models: per-layer bit widths, their own learning
/// rate through a Burn param group, and conversion to the integer model (sub-8-bit grids in
/// int8 containers) and ONNX.
mod sequential {
    use burn::module::Module;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::pool::MaxPool2dConfig;
    use burn::nn::{BatchNormConfig, LinearConfig, PaddingConfig2d, Relu};
    use burn::optim::lr_scheduler::LrSchedulerConfig;
    use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLrSchedulerConfig;
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use burn_qat::export::{IntOp, convert};
    use burn_qat::nn::learned::range_params;
    use burn_qat::nn::{ActQuant, LearnedRange, start_learning};
    use burn_qat::transform::{FusedConfig, SeqLayer, Sequential};
    use burn_qat::{FakeQuantConfig, QuantSpec};
    use burn_qat_tests::{backends, values};

    /// Conv -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear, `bits` everywhere but the input
    /// and the first layer's weights (8-bit), learned with `method`, logits quantized too.
    fn model(method: LearnedRange, bits: u32, device: &Device) -> Sequential {
        let float = Sequential::new(vec![
            SeqLayer::Conv2d(
                Conv2dConfig::new([2, 6], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
            ),
            SeqLayer::BatchNorm(BatchNormConfig::new(6).init(device)),
            SeqLayer::Relu(Relu::new()),
            SeqLayer::MaxPool2d(MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
            SeqLayer::Flatten(Default::default()),
            SeqLayer::Linear(LinearConfig::new(6 * 5 * 5, 16).init(device)),
            SeqLayer::Relu(Relu::new()),
            SeqLayer::Linear(LinearConfig::new(16, 5).init(device)),
        ]);
        let act_spec = |b: u32| match method {
            LearnedRange::Pact => QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(b),
            _ => QuantSpec::act_per_tensor_asymmetric(b),
        };
        let config = |path: &str| {
            let wbits = if path == "layers.0" { 8 } else { bits };
            FusedConfig::new()
                .with_weight(Some(QuantSpec::weight_per_channel_symmetric(wbits, 0)))
                .with_output(Some(FakeQuantConfig::new(act_spec(bits))))
                .with_learned_weight(true)
                .with_learned_output(Some(method))
        };
        let mut m = float.fuse_by(config).unwrap();
        m.layers.insert(
            0,
            SeqLayer::FakeQuant(
                FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric())
                    .init(device)
                    .unwrap(),
            ),
        );
        if let Some(SeqLayer::FusedLinear(last)) = m.layers.last_mut() {
            last.output = Some(
                ActQuant::init(
                    &FakeQuantConfig::new(QuantSpec::act_per_tensor_asymmetric(bits)),
                    Some(LearnedRange::MinMax),
                    device,
                )
                .unwrap(),
            );
        }
        m
    }

    fn batch(device: &Device) -> Tensor<4> {
        Tensor::<4>::random([16, 2, 10, 10], Distribution::Normal(0.0, 1.0), device)
    }

    /// Observes 3 batches, hands over to learning, then trains `steps` Adam steps with the
    /// range parameters at `range_lr` and the rest at 1e-2. Returns the model and its range
    /// parameters right after the hand-off.
    fn train(
        mut m: Sequential,
        steps: usize,
        range_lr: f64,
        device: &Device,
    ) -> (Sequential, Vec<f32>) {
        for _ in 0..3 {
            let _ = m.forward(batch(device));
        }
        m = start_learning(m);
        let handed_over = ranges(&m);
        let target = Tensor::<2>::random([16, 5], Distribution::Normal(0.0, 1.0), device);
        let mut optim = AdamConfig::new().init();
        let lr = ModuleLrSchedulerConfig::new(LrSchedulerConfig::Constant(1e-2))
            .with_group(range_params(&m), LrSchedulerConfig::Constant(range_lr))
            .init()
            .unwrap()
            .step();
        for _ in 0..steps {
            let loss = (m.forward(batch(device)) - target.clone())
                .powf_scalar(2.0)
                .mean();
            let grads = GradientsParams::from_grads(loss.backward(), &m);
            m = optim.step(lr.clone(), m, grads);
        }
        (m, handed_over)
    }

    /// Every learned range parameter of the model, in visiting order.
    fn ranges(m: &Sequential) -> Vec<f32> {
        let group = range_params(m);
        let mut out = vec![];
        struct Read<'a>(&'a burn::module::ParamGroup, &'a mut Vec<f32>);
        impl burn::module::ModuleVisitor for Read<'_> {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
                if self.0.matches(&p.id, None) {
                    self.1.extend(values(p.val()));
                }
            }
        }
        m.visit(&mut Read(&group, &mut out));
        out
    }

    #[test]
    fn range_parameters_take_their_own_learning_rate() {
        for b in backends() {
            let d = b.device.clone().autodiff();
            d.seed(5);
            let m = model(LearnedRange::Lsq, 4, &d);
            // 3 weight steps (per channel: 6 + 16 + 5) + 3 LSQ output steps + min/max on logits.
            let started = start_learning(m.clone());
            let n = ranges(&started).len();
            assert_eq!(n, 6 + 16 + 5 + 1 + 1 + 2, "{}", b.name);
            let (frozen, start) = train(model(LearnedRange::Lsq, 4, &d), 3, 0.0, &d);
            assert_eq!(
                ranges(&frozen),
                start,
                "{}: lr 0 must keep the ranges",
                b.name
            );
            let (moving, start) = train(model(LearnedRange::Lsq, 4, &d), 3, 1e-2, &d);
            let moved = ranges(&moving);
            // Every parameter that gets a gradient moves (a dead ReLU channel's step may not).
            let n_moved = moved.iter().zip(&start).filter(|(a, b)| a != b).count();
            assert!(
                n_moved * 4 >= 3 * start.len(),
                "{}: lr 1e-2 must move the range parameters: {start:?} -> {moved:?}",
                b.name
            );
        }
    }

    #[test]
    fn learned_low_bit_models_convert_within_one_lsb() {
        let device = Device::flex().autodiff();
        for (i, method) in [LearnedRange::Lsq, LearnedRange::Pact, LearnedRange::MinMax]
            .into_iter()
            .enumerate()
        {
            for bits in [8, 4, 2] {
                device.seed(11 + i as u64);
                let trained = train(model(method, bits, &device), 5, 1e-2, &device)
                    .0
                    .valid();
                let int =
                    convert(&burn_qat::graph::from_sequential(&trained, &[1, 2, 10, 10]).unwrap())
                        .unwrap();
                let x = batch(&Device::flex());
                let fq = values(trained.forward(x.clone()));
                let (q, _, a) = int.forward_int(&values(x)).unwrap().unwrap();
                assert_eq!(a.bits(), bits, "{method:?}");
                let (mut exact, mut within) = (0, 0);
                for (f, qi) in fq.iter().zip(&q) {
                    let q_fq = (f / a.scale).round_ties_even() as i32 + a.zero_point;
                    exact += usize::from(q_fq == *qi as i32);
                    within += usize::from((q_fq - *qi as i32).abs() <= 1);
                    assert!(
                        (a.qmin..=a.qmax).contains(&(*qi as i32)),
                        "{method:?}: {qi}"
                    );
                }
                // At 2 bits a 1-LSB flip in a hidden layer (bias rounded to int32 in the integer
                // model, float in QAT) moves the logits by more than one of their steps; each
                // layer is within 1 LSB of its input, so the end-to-end check is statistical.
                let needed = if bits == 2 {
                    q.len() * 95 / 100
                } else {
                    q.len()
                };
                assert!(
                    within >= needed,
                    "{method:?} {bits}-bit: {within} within 1 LSB ({exact} exact) of {}",
                    q.len()
                );
                // Sub-8-bit grids in int8 containers, and said so.
                for node in &int.nodes {
                    if let IntOp::Linear(l) = &node.op {
                        assert_eq!(l.weight_bits, bits);
                        let m = (1i32 << (bits - 1)) - 1;
                        assert!(
                            l.weight.iter().all(|w| (-m..=m).contains(&(*w as i32))),
                            "{method:?}"
                        );
                    }
                }
                let precision = int.precision().join("\n");
                assert!(
                    precision.contains(&format!("weights {bits}-bit in int8")),
                    "{precision}"
                );
                let onnx = burn_qat::onnx::to_model_proto(&int, &Default::default()).unwrap();
                let docs: Vec<String> = onnx
                    .graph
                    .unwrap()
                    .node
                    .iter()
                    .filter_map(|n| n.doc_string.clone())
                    .collect();
                assert!(
                    bits == 8
                        || docs
                            .iter()
                            .any(|d| d
                                .starts_with(&format!("{bits}-bit values in a uint8 container"))),
                    "{docs:?}"
                );
                assert_eq!(
                    onnx.metadata_props[0].value.as_deref(),
                    Some(precision.as_str())
                );
            }
        }
    }
}

/// A graph's plan names each learned quantizer's method and phase, read from the module.
#[test]
fn the_graph_plan_names_the_learned_method_and_phase() {
    use burn::nn::{Linear, LinearConfig};
    use burn_qat::graph;
    use burn_qat::model::{ActivationQuant, QatConfig};
    use burn_qat::nn::LearnedRange;

    let device = Device::flex().autodiff();
    let fc = LinearConfig::new(4, 3).init(&device);
    let config = QatConfig::new()
        .with_activations(ActivationQuant::bits(4).with_learned(LearnedRange::Pact));
    let qat = graph::prepare(
        &fc,
        &[1, 4],
        |m: &Linear, x: Tensor<2>| m.forward(x),
        &config,
    )
    .unwrap();
    let plan = qat.plan().to_string();
    assert!(
        plan.contains("Pact observing") && !plan.contains("Pact learning"),
        "{plan}"
    );
    let _ = qat.forward::<2, 2>(Tensor::<2>::ones([2, 4], &device));
    let plan = burn_qat::nn::start_learning(qat).plan().to_string();
    assert!(
        plan.contains("Pact learning") && !plan.contains("Pact observing"),
        "{plan}"
    );
}

/// Issue 33, class 4: learned ranges at the edges of `f32`. Every learned method, fused and
/// composed, against the scalar reference (`burn_qat::core::reference`), with inputs and
/// parameters drawn from `+-f32::MAX`, huge finite values, subnormals (`1e-45`) and zeros; no
/// finite input with finite parameters may give a non-finite output, and broken (NaN or
/// infinite) parameters are repaired as the reference repairs them.
mod f32_edges {
    use burn::prelude::*;
    use burn_qat::core::{reference, tensor};
    use burn_qat::nn::{LearnedFakeQuant, LearnedFakeQuantConfig, LearnedRange, start_learning};
    use burn_qat::{QuantSpec, RoundingMode};
    use burn_qat_tests::{Backend, backends, cases, values};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    const MAX: f32 = f32::MAX;

    /// Finite values at and near the edges of `f32`, and ordinary ones.
    const EDGES: [f32; 24] = [
        MAX,
        -MAX,
        3.4e38,
        -3.4e38,
        3e38,
        -3e38,
        1e38,
        -1e38,
        2.5e37,
        1e-45,
        -1e-45,
        1.4e-44,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::EPSILON,
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.3,
        -2.75,
        65504.0,
    ];

    fn finite() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => proptest::sample::select(EDGES.to_vec()),
            1 => proptest::num::f32::NORMAL | proptest::num::f32::SUBNORMAL | proptest::num::f32::ZERO,
        ]
    }

    /// A learned parameter: finite mostly, sometimes broken by an optimizer.
    fn param() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => finite(),
            1 => proptest::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        ]
    }

    fn spec() -> impl Strategy<Value = QuantSpec> {
        (
            2u32..=8,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(bits, signed, symmetric, narrow, tf)| {
                QuantSpec::act_per_tensor_asymmetric(bits)
                    .with_signed(signed)
                    .with_symmetric(symmetric)
                    .with_narrow_range(narrow)
                    .with_rounding(if tf {
                        RoundingMode::TfHalfUp
                    } else {
                        RoundingMode::HalfToEven
                    })
            })
            .prop_filter("a valid spec", |s| s.validate().is_ok())
    }

    const METHODS: [LearnedRange; 4] = [
        LearnedRange::Lsq,
        LearnedRange::LsqPlus,
        LearnedRange::Pact,
        LearnedRange::MinMax,
    ];

    /// The scalar reference of `method` with parameters `(a, b)`: (step, offset), (alpha, -),
    /// (min, max).
    fn oracle(method: LearnedRange, x: f32, (a, b): (f32, f32), spec: &QuantSpec) -> f32 {
        match method {
            LearnedRange::Lsq => reference::fake_quant_lsq(x, a, 0.0, spec),
            LearnedRange::LsqPlus => reference::fake_quant_lsq(x, a, b, spec),
            LearnedRange::Pact => reference::fake_quant_pact(x, a, spec),
            LearnedRange::MinMax => reference::fake_quant_min_max(x, a, b, spec),
        }
    }

    /// The grid value `q` of the clip methods (their output is `t + (q - t)`, `t` the clipped
    /// input; a GPU compiler may simplify that to `q`, see `tests/tests/fused.rs`), `None` for
    /// LSQ.
    fn oracle_q(method: LearnedRange, x: f32, (a, b): (f32, f32), spec: &QuantSpec) -> Option<f32> {
        use reference::{clip, finite_or_zero};
        match method {
            LearnedRange::Lsq | LearnedRange::LsqPlus => None,
            LearnedRange::Pact => {
                let qp = burn_qat::QParams {
                    scale: reference::pact_scale(a, spec),
                    zero_point: 0,
                };
                let t = clip(x, 0.0, finite_or_zero(a));
                Some(reference::fake_quant(t, qp, &reference::pact_spec(spec)))
            }
            LearnedRange::MinMax => {
                let t = clip(x, finite_or_zero(a), finite_or_zero(b));
                let qp = burn_qat::qparams_from_range(a, b, spec);
                Some(reference::fake_quant(t, qp, spec))
            }
        }
    }

    /// `method` on tensors (`composed`: the composed ops instead of the fused path), on an
    /// autodiff device: the values and the gradients of `x` and of the parameters.
    fn run(
        device: &Device,
        method: LearnedRange,
        xs: &[f32],
        (a, b): (f32, f32),
        spec: &QuantSpec,
        composed: bool,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let x = Tensor::<1>::from_floats(xs, device).require_grad();
        let pa = Tensor::<1>::from_floats([a], device).require_grad();
        let pb = Tensor::<1>::from_floats([b], device).require_grad();
        let factor = tensor::lsq_grad_factor(xs.len(), spec.qmax());
        let y = match (method, composed) {
            (LearnedRange::Lsq, false) => {
                tensor::fake_quant_lsq(x.clone(), pa.clone(), None, spec, factor)
            }
            (LearnedRange::Lsq, true) => {
                tensor::fake_quant_lsq_composed(x.clone(), pa.clone(), None, spec, factor)
            }
            (LearnedRange::LsqPlus, false) => {
                tensor::fake_quant_lsq(x.clone(), pa.clone(), Some(pb.clone()), spec, factor)
            }
            (LearnedRange::LsqPlus, true) => tensor::fake_quant_lsq_composed(
                x.clone(),
                pa.clone(),
                Some(pb.clone()),
                spec,
                factor,
            ),
            (LearnedRange::Pact, false) => tensor::fake_quant_pact(x.clone(), pa.clone(), spec),
            (LearnedRange::Pact, true) => {
                tensor::fake_quant_pact_composed(x.clone(), pa.clone(), spec)
            }
            (LearnedRange::MinMax, false) => {
                tensor::fake_quant_min_max(x.clone(), pa.clone(), pb.clone(), spec)
            }
            (LearnedRange::MinMax, true) => {
                tensor::fake_quant_min_max_composed(x.clone(), pa.clone(), pb.clone(), spec)
            }
        };
        let grads = y.clone().sum().backward();
        let grad = |t: &Tensor<1>| t.grad(&grads).map(values).unwrap_or_default();
        (values(y), vec![grad(&x), grad(&pa), grad(&pb)])
    }

    /// Equal as the reference computes them: NaN matches NaN, zeros by value (`r * s + 0` is
    /// +0 where the composed LSQ keeps -0), every other value bit for bit.
    fn same(got: f32, want: f32) -> bool {
        (got.is_nan() && want.is_nan()) || got.to_bits() == want.to_bits() || got == want
    }

    fn check(
        b: &Backend,
        test: impl Fn(
            &Device,
            LearnedRange,
            QuantSpec,
            Vec<f32>,
            (f32, f32),
        ) -> Result<(), TestCaseError>,
    ) {
        let device = b.device.clone().autodiff();
        let strategy = (
            proptest::sample::select(METHODS.to_vec()),
            spec(),
            proptest::collection::vec(finite(), 1..12),
            (param(), param()),
        );
        let mut runner = TestRunner::new(Config {
            cases: cases(b, 512),
            ..Config::default()
        });
        runner
            .run(&strategy, |(method, spec, xs, params)| {
                test(&device, method, spec, xs, params)
            })
            .unwrap_or_else(|e| panic!("{}: {e}", b.name));
    }

    /// Fused and composed values equal the scalar reference, which repairs broken parameters;
    /// finite inputs and finite parameters give finite values, and broken parameters too. On
    /// wgpu the clip methods may give the grid value `q` itself where `t + (q - t)` rounds
    /// (the shader compiler reassociates; `x = f32::MAX` clipped to `-f32::MAX` on the grid of
    /// `[0, 0]`: `q = -2.4e-7`, `t + (q - t) = 0`).
    #[test]
    fn every_learned_method_matches_the_reference_at_the_f32_edges() {
        for b in backends() {
            let gpu = b.name == "wgpu";
            check(&b, |device, method, spec, xs, params| {
                for composed in [false, true] {
                    let (ys, _) = run(device, method, &xs, params, &spec, composed);
                    for (x, y) in xs.iter().zip(&ys) {
                        let want = oracle(method, *x, params, &spec);
                        let q = oracle_q(method, *x, params, &spec);
                        prop_assert!(
                            same(*y, want) || (gpu && q.is_some_and(|q| same(*y, q))),
                            "{method:?} composed={composed} {spec} x={x:e} params={params:?}: got {y:e}, reference {want:e}"
                        );
                        prop_assert!(
                            y.is_finite(),
                            "{method:?} composed={composed} {spec} x={x:e} params={params:?}: {y}"
                        );
                    }
                }
                Ok(())
            });
        }
    }

    /// The gradients of the fused path (what every backend with kernels trains with) stay
    /// finite at the f32 edges, and the gradient of `x` is the composed one.
    #[test]
    fn learned_gradients_stay_finite_at_the_f32_edges() {
        for b in backends() {
            if !burn_qat::core::fused::has_kernels(&b.device) {
                continue;
            }
            check(&b, |device, method, spec, xs, params| {
                let (_, fast) = run(device, method, &xs, params, &spec, false);
                let (_, slow) = run(device, method, &xs, params, &spec, true);
                for (what, g) in ["x", "first parameter", "second parameter"]
                    .iter()
                    .zip(&fast)
                {
                    prop_assert!(
                        g.iter().all(|v| v.is_finite()),
                        "{method:?} {spec} xs={xs:?} params={params:?}: {what} gradient {g:?}"
                    );
                }
                for (p, q) in fast[0].iter().zip(&slow[0]) {
                    prop_assert!(
                        (*p == 0.0) == (*q == 0.0),
                        "{method:?} {spec} xs={xs:?} params={params:?}: x gradient fused {:?}, composed {:?}",
                        fast[0],
                        slow[0]
                    );
                }
                Ok(())
            });
        }
    }

    /// An LSQ+ offset an optimizer drove to NaN or infinity counts as 0, on the tensor path and
    /// in the module (forward and grid), and receives no gradient while broken.
    #[test]
    fn a_broken_lsq_plus_offset_is_repaired_to_zero() {
        let spec = QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4);
        let xs = [-1.0f32, 0.0, 0.3, 1.7, 9.0];
        for b in backends() {
            let d = b.device.clone().autodiff();
            let x = Tensor::<1>::from_floats(xs, &d);
            let step = Tensor::<1>::from_floats([0.25], &d);
            let clean = values(tensor::fake_quant_lsq(
                x.clone(),
                step.clone(),
                Some(Tensor::from_floats([0.0], &d)),
                &spec,
                1.0,
            ));
            assert_eq!(clean, vec![0.0, 0.0, 0.25, 1.75, 3.75], "{}", b.name);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let offset = Tensor::<1>::from_floats([bad], &d).require_grad();
                for composed in [false, true] {
                    let f = if composed {
                        tensor::fake_quant_lsq_composed::<1>
                    } else {
                        tensor::fake_quant_lsq::<1>
                    };
                    let y = f(x.clone(), step.clone(), Some(offset.clone()), &spec, 1.0);
                    assert_eq!(values(y.clone()), clean, "{} {bad} {composed}", b.name);
                    let grads = y.sum().backward();
                    let g = offset.grad(&grads).map(values).unwrap_or(vec![0.0]);
                    assert_eq!(g, vec![0.0], "{} {bad} composed={composed}", b.name);
                }
                // The module: forward and the grid conversion reads.
                let mut fq = LearnedFakeQuantConfig::new(spec, LearnedRange::LsqPlus)
                    .init(&d)
                    .unwrap();
                fq.observer = fq.observer.set_range(&[0.0], &[3.75]).unwrap();
                let mut fq = fq.start_learning();
                let device = d.clone();
                fq.offset = fq
                    .offset
                    .map(|p| p.map(|_| Tensor::from_floats([bad], &device)));
                assert_eq!(values(fq.forward(x.clone())), clean, "{} {bad}", b.name);
                let (_, qps) = fq.grid().unwrap();
                assert_eq!(qps[0].zero_point, 0, "{} {bad}: {qps:?}", b.name);
                assert!(qps[0].scale.is_finite(), "{} {bad}: {qps:?}", b.name);
            }
        }
    }

    #[derive(burn::module::Module, Debug)]
    struct Holder {
        act: LearnedFakeQuant,
    }

    /// The observe -> learn hand-off from huge but finite observed ranges gives finite
    /// parameters, whose forward pass is finite on finite inputs; through both hand-offs (the
    /// module's own and the model-wide mapper).
    #[test]
    fn the_hand_off_from_huge_finite_ranges_gives_finite_parameters() {
        let ranges = [
            (-3e38f32, 3e38f32),
            (-MAX, MAX),
            (-MAX, 1e-45),
            (-1e-45, MAX),
            (-MAX, 0.0),
            (0.0, MAX),
            (-3.4e38, 1.0),
            (-1e-45, 1e-45),
        ];
        let specs = [
            QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4),
            QuantSpec::uint8_act_per_tensor_asymmetric(),
            QuantSpec::int8_act_per_tensor_asymmetric(),
            QuantSpec::act_per_tensor_asymmetric(2),
            QuantSpec::int8_act_per_tensor_asymmetric().with_narrow_range(true),
            QuantSpec::int8_act_per_tensor_asymmetric().with_symmetric(true),
        ];
        for b in backends() {
            let d = b.device.clone().autodiff();
            let x = Tensor::<1>::from_floats(EDGES, &d);
            for method in METHODS {
                for spec in specs {
                    for (lo, hi) in ranges {
                        let mut fq = LearnedFakeQuantConfig::new(spec, method).init(&d).unwrap();
                        fq.observer = fq.observer.set_range(&[lo], &[hi]).unwrap();
                        let own = fq.clone().start_learning();
                        let mapped = start_learning(Holder { act: fq }).act;
                        for (how, m) in [("own", own), ("mapped", mapped)] {
                            let ctx =
                                format!("{} {method:?} {spec} [{lo:e}, {hi:e}] {how}", b.name);
                            assert!(m.is_learning(), "{ctx}");
                            for p in [&m.scale, &m.offset, &m.alpha, &m.min, &m.max]
                                .into_iter()
                                .flatten()
                            {
                                let v = values(p.val());
                                assert!(v.iter().all(|v| v.is_finite()), "{ctx}: {v:?}");
                            }
                            let y = values(m.forward(x.clone()));
                            assert!(y.iter().all(|v| v.is_finite()), "{ctx}: {y:?}");
                            let (_, qps) = m.grid().unwrap();
                            assert!(qps.iter().all(|q| q.scale.is_finite()), "{ctx}: {qps:?}");
                        }
                    }
                }
            }
        }
    }
}
