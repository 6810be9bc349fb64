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
