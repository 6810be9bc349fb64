//! Model transforms on every backend: BatchNorm folding equivalence, fused QAT modules, in-place
//! fusion, schedules, and a fused Conv-BN-ReLU CNN trained on real MNIST whose folded form
//! predicts like the QAT model.

use burn::module::{Module, Param, RunningState};
use burn::nn::conv::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig1d, PaddingConfig2d,
};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_qat::transform::{
    Activation, BnFoldMode, FusedConfig, FusedConv2d, FusedLinear, QatSchedule, fold,
    fuse_batch_norms,
};
use burn_qat::{FakeQuant, FakeQuantConfig, QuantSpec};
use burn_qat_tests::{backends, skip, values};

/// Folding changes the order of float operations: allow 1e-5 relative to the output's scale.
const FOLD_RTOL: f32 = 1e-5;

fn assert_close(got: Vec<f32>, want: Vec<f32>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= FOLD_RTOL * (w.abs() + scale),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

/// A BatchNorm with non-trivial statistics and affine parameters.
fn random_bn(c: usize, device: &Device) -> BatchNorm {
    let bn = BatchNormConfig::new(c).with_epsilon(1e-3).init(device);
    let r = |lo: f64, hi: f64| Tensor::<1>::random([c], Distribution::Uniform(lo, hi), device);
    BatchNorm {
        gamma: Param::from_tensor(r(0.5, 2.0)),
        beta: Param::from_tensor(r(-1.0, 1.0)),
        running_mean: RunningState::new(r(-0.5, 0.5)),
        running_var: RunningState::new(r(0.2, 3.0)),
        ..bn
    }
}

#[test]
fn fold_conv2d_equals_bn_of_conv() {
    for b in backends() {
        let d = &b.device;
        d.seed(11);
        #[rustfmt::skip]
        let cases: &[(&str, usize, usize, usize, [usize; 2], [usize; 2], usize, bool)] = &[
            // name, c_in, c_out, groups, stride, dilation, padding, bias
            ("plain", 3, 4, 1, [1, 1], [1, 1], 0, true),
            ("no bias", 3, 4, 1, [1, 1], [1, 1], 0, false),
            ("grouped", 4, 6, 2, [1, 1], [1, 1], 1, true),
            ("depthwise", 4, 4, 4, [1, 1], [1, 1], 1, false),
            ("stride 2 padding 1", 3, 5, 1, [2, 2], [1, 1], 1, true),
            ("dilation 2", 2, 3, 1, [1, 1], [2, 2], 2, true),
        ];
        for &(name, cin, cout, groups, stride, dilation, pad, bias) in cases {
            let conv = Conv2dConfig::new([cin, cout], [3, 3])
                .with_groups(groups)
                .with_stride(stride)
                .with_dilation(dilation)
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(bias)
                .init(d);
            let bn = random_bn(cout, d);
            let x = Tensor::<4>::random([2, cin, 9, 9], Distribution::Normal(0.0, 1.0), d);
            let want = values(bn.forward(conv.forward(x.clone())));
            let folded = fold::fold_conv2d(conv, &bn);
            assert_close(
                values(folded.forward(x)),
                want,
                &format!("{} conv2d {name}", b.name),
            );
        }
    }
}

#[test]
fn fold_conv1d_and_linear_equal_bn_of_layer() {
    for b in backends() {
        let d = &b.device;
        d.seed(12);
        for bias in [true, false] {
            let conv: Conv1d = Conv1dConfig::new(3, 4, 3)
                .with_stride(2)
                .with_padding(PaddingConfig1d::Explicit(1, 1))
                .with_bias(bias)
                .init(d);
            let bn = random_bn(4, d);
            let x = Tensor::<3>::random([2, 3, 11], Distribution::Normal(0.0, 1.0), d);
            let want = values(bn.forward(conv.forward(x.clone())));
            assert_close(
                values(fold::fold_conv1d(conv, &bn).forward(x)),
                want,
                &format!("{} conv1d bias={bias}", b.name),
            );

            let lin: Linear = LinearConfig::new(5, 3).with_bias(bias).init(d);
            let bn = random_bn(3, d);
            let x = Tensor::<2>::random([4, 5], Distribution::Normal(0.0, 1.0), d);
            let want = values(bn.forward(lin.forward(x.clone())));
            assert_close(
                values(fold::fold_linear(lin, &bn).forward(x)),
                want,
                &format!("{} linear bias={bias}", b.name),
            );
        }
    }
}

#[derive(Module, Debug)]
struct Plain {
    conv: Conv2d,
    bn: BatchNorm,
}

#[test]
fn fuse_batch_norms_in_place_keeps_the_model_type_and_outputs() {
    for b in backends() {
        let d = &b.device;
        d.seed(13);
        let model = Plain {
            conv: Conv2dConfig::new([2, 3], [3, 3]).init(d),
            bn: random_bn(3, d),
        };
        let x = Tensor::<4>::random([2, 2, 6, 6], Distribution::Normal(0.0, 1.0), d);
        let want = values(model.bn.forward(model.conv.forward(x.clone())));
        let fused = fuse_batch_norms(model, &[("conv", "bn")], 1e-3).unwrap();
        assert_close(
            values(fused.bn.forward(fused.conv.forward(x.clone()))),
            want.clone(),
            &format!("{} in place", b.name),
        );
        // The BatchNorm is now the identity.
        assert_close(
            values(fused.bn.forward(fused.conv.forward(x.clone()))),
            values(fused.conv.forward(x)),
            &format!("{} identity bn", b.name),
        );
    }
    let d = &backends()[0].device;
    let model = Plain {
        conv: Conv2dConfig::new([2, 3], [3, 3]).with_bias(false).init(d),
        bn: random_bn(3, d),
    };
    let err = fuse_batch_norms(model, &[("conv", "bn")], 1e-3)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`conv` has no bias"), "{err}");
    let model = Plain {
        conv: Conv2dConfig::new([2, 3], [3, 3]).init(d),
        bn: random_bn(3, d),
    };
    let err = fuse_batch_norms(model, &[("bn", "conv")], 1e-3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`bn` is not a Conv1d, Conv2d or Linear module"),
        "{err}"
    );
}

fn fused(conv: Conv2d, bn: BatchNorm, weight: Option<QuantSpec>, mode: BnFoldMode) -> FusedConv2d {
    FusedConfig::new()
        .with_weight(weight)
        .with_output(None)
        .with_activation(Activation::Relu)
        .with_mode(mode)
        .init(conv, Some(bn))
        .unwrap()
}

#[test]
fn fused_module_in_training_matches_conv_bn_relu_with_batch_statistics() {
    for b in backends() {
        let d = b.device.clone().autodiff();
        d.seed(14);
        for mode in [BnFoldMode::Approximate, BnFoldMode::Exact] {
            let conv = Conv2dConfig::new([2, 4], [3, 3]).init(&d);
            let bn = random_bn(4, &d);
            // The same layers with their own (unshared) running statistics.
            let reference = Plain {
                conv: conv.clone(),
                bn: BatchNorm {
                    running_mean: RunningState::new(bn.running_mean.value()),
                    running_var: RunningState::new(bn.running_var.value()),
                    ..bn.clone()
                },
            };
            let f = fused(conv, bn, None, mode);
            let x = Tensor::<4>::random([3, 2, 7, 7], Distribution::Normal(0.0, 1.0), &d);
            let want = burn::tensor::activation::relu(
                reference.bn.forward(reference.conv.forward(x.clone())),
            );
            let got = f.forward(x);
            // Gradients under a non-uniform upstream gradient: the folded form trains the
            // conv weight and bias, gamma and beta as conv + BatchNorm would.
            let upstream = Tensor::<4>::random(want.dims(), Distribution::Uniform(0.5, 2.0), &d);
            let g_want = (want.clone() * upstream.clone()).sum().backward();
            let g_got = (got.clone() * upstream).sum().backward();
            assert_close(
                values(got),
                values(want),
                &format!("{} {mode:?} training forward", b.name),
            );
            let fbn = f.bn.as_ref().unwrap();
            for (what, got, want) in [
                (
                    "conv weight",
                    values(f.layer.weight.val().grad(&g_got).unwrap()),
                    values(reference.conv.weight.val().grad(&g_want).unwrap()),
                ),
                (
                    "gamma",
                    values(fbn.gamma.val().grad(&g_got).unwrap()),
                    values(reference.bn.gamma.val().grad(&g_want).unwrap()),
                ),
                (
                    "beta",
                    values(fbn.beta.val().grad(&g_got).unwrap()),
                    values(reference.bn.beta.val().grad(&g_want).unwrap()),
                ),
            ] {
                assert_close(
                    got,
                    want,
                    &format!("{} {mode:?} gradient of the {what}", b.name),
                );
            }
            // A per-channel shift before BatchNorm on batch statistics changes nothing: the conv
            // bias's gradient is 0 up to rounding (against beta's, which is the sum of upstream).
            let beta_scale: f32 = values(fbn.beta.val().grad(&g_got).unwrap())
                .iter()
                .map(|v| v.abs())
                .sum();
            // (The exact mode takes batch statistics without the bias: no gradient at all.)
            let bias_grad = f.layer.bias.as_ref().unwrap().val().grad(&g_got);
            assert_eq!(
                bias_grad.is_some(),
                mode == BnFoldMode::Approximate,
                "{} {mode:?}",
                b.name
            );
            for g in bias_grad.map(values).unwrap_or_default() {
                assert!(
                    g.abs() <= 1e-5 * beta_scale,
                    "{} {mode:?}: conv bias gradient {g}",
                    b.name
                );
            }
            assert_close(
                values(f.bn.as_ref().unwrap().running_mean.value()),
                values(reference.bn.running_mean.value()),
                &format!("{} {mode:?} running mean updated like BatchNorm", b.name),
            );
        }
    }
}

#[test]
fn fused_module_eval_equals_folded_bit_for_bit_and_freeze_bn_stats() {
    for b in backends() {
        let d = b.device.clone().autodiff();
        d.seed(15);
        let conv = Conv2dConfig::new([2, 4], [3, 3]).init(&d);
        let f = fused(
            conv,
            random_bn(4, &d),
            Some(QuantSpec::int8_weight_per_channel_symmetric(0)),
            BnFoldMode::Approximate,
        );
        let x = Tensor::<4>::random([3, 2, 7, 7], Distribution::Normal(0.0, 1.0), &d);
        // Gradients reach the float conv weight and gamma.
        let grads = f.forward(x.clone()).sum().backward();
        assert!(
            f.layer.weight.val().grad(&grads).is_some()
                && f.bn.as_ref().unwrap().gamma.val().grad(&grads).is_some(),
            "{}",
            b.name
        );
        let eval = f.valid();
        let xe = x.clone().inner();
        let want = values(eval.forward(xe.clone()));
        let folded = eval.clone().folded();
        assert!(folded.bn.is_none() && folded.weight_quant.is_none());
        assert_eq!(
            values(folded.forward(xe)),
            want,
            "{}: folded must equal the QAT model in eval",
            b.name
        );
        // The folded weight is on the int8 grid of each output channel.
        let w = folded.layer.weight.val();
        let per = w.dims()[1] * 9;
        let wv = values(w);
        for ch in 0..4 {
            let chunk = &wv[ch * per..(ch + 1) * per];
            let m = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
            for v in chunk {
                let q = v / (m / 127.0);
                assert!(
                    (q - q.round()).abs() < 1e-3,
                    "{}: {v} not on channel {ch}'s grid",
                    b.name
                );
            }
        }
        // freeze_bn_stats: running statistics stop moving, training uses them.
        let f = f.set_bn_frozen(true);
        let before = values(f.bn.as_ref().unwrap().running_var.value());
        let y_train = values(f.forward(x.clone()));
        assert_eq!(
            values(f.bn.as_ref().unwrap().running_var.value()),
            before,
            "{}",
            b.name
        );
        assert_eq!(
            y_train,
            values(f.valid().forward(x.inner())),
            "{}: frozen training path = eval path",
            b.name
        );
    }
}

#[test]
fn fused_config_errors() {
    let d = &backends()[0].device;
    let conv = Conv2dConfig::new([2, 4], [3, 3]).init(d);
    // Per channel is per output channel of the layer, whatever axis the spec names: one
    // config serves convolutions (axis 0) and Linear layers (axis 1).
    let fused = FusedConfig::new()
        .with_weight(Some(QuantSpec::int8_weight_per_channel_symmetric(1)))
        .init(conv.clone(), None)
        .unwrap();
    assert_eq!(fused.weight_quant.unwrap().spec.axis(), Some(0));
    let linear = FusedConfig::new()
        .init(LinearConfig::new(3, 5).init(d), None)
        .unwrap();
    assert_eq!(linear.weight_quant.unwrap().spec.axis(), Some(1));
    let err = FusedConfig::new()
        .init(conv, Some(random_bn(3, d)))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("BatchNorm has 3 channels but the tensor has 4"),
        "{err}"
    );
}

#[derive(Module, Debug)]
struct Tiny {
    act: FakeQuant,
    conv: FusedConv2d,
}

#[test]
fn schedule_freezes_observers_and_bn_from_a_hand_loop_and_from_shared_self() {
    for b in backends() {
        let d = b.device.clone().autodiff();
        let model = Tiny {
            act: FakeQuantConfig::new(QuantSpec::default()).init(&d).unwrap(),
            conv: FusedConfig::new()
                .init(
                    Conv2dConfig::new([1, 2], [3, 3]).init(&d),
                    Some(BatchNormConfig::new(2).init(&d)),
                )
                .unwrap(),
        };
        let schedule = QatSchedule::new(Some(3), Some(2));
        let x = Tensor::<4>::random([2, 1, 5, 5], Distribution::Normal(0.0, 1.0), &d);
        let mut frozen_at = (None, None);
        for step in 1..=4 {
            // `&model` only, as in burn-train's `TrainStep::step(&self, ..)`.
            let _ = model.conv.forward(model.act.forward(x.clone()));
            schedule.step_in_place(&model);
            if frozen_at.0.is_none() && model.act.is_frozen() {
                frozen_at.0 = Some(step);
            }
            if frozen_at.1.is_none() && model.conv.is_bn_frozen() {
                frozen_at.1 = Some(step);
            }
        }
        assert_eq!(frozen_at, (Some(3), Some(2)), "{}", b.name);
        assert_eq!(schedule.steps(), 4);
        // The freeze is recorded and survives a save/load round trip.
        let record = model.clone().into_record();
        let fresh = Tiny {
            act: FakeQuantConfig::new(QuantSpec::default()).init(&d).unwrap(),
            conv: FusedConfig::new()
                .init(
                    Conv2dConfig::new([1, 2], [3, 3]).init(&d),
                    Some(BatchNormConfig::new(2).init(&d)),
                )
                .unwrap(),
        }
        .load_record(record);
        assert!(
            fresh.act.is_frozen() && fresh.conv.is_bn_frozen(),
            "{}",
            b.name
        );
    }
}

// ------------------------------------------------------------------ real MNIST

#[derive(Module, Debug)]
struct MnistCnn {
    input: FakeQuant,
    conv: FusedConv2d,
    pool: MaxPool2d,
    fc: FusedLinear,
}

impl MnistCnn {
    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(self.conv.forward(self.input.forward(x)));
        let [n, c, h, w] = x.dims();
        self.fc.forward(x.reshape([n, c * h * w]))
    }
    fn folded(self) -> Self {
        Self {
            input: self.input,
            conv: self.conv.folded(),
            pool: self.pool,
            fc: self.fc.folded(),
        }
    }
}

fn mnist_dir() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("MNIST_DIR").map(Into::into),
        Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist")),
    ];
    candidates.into_iter().flatten().find(|d| {
        d.join("t10k-labels-idx1-ubyte.gz").is_file() || d.join("t10k-labels-idx1-ubyte").is_file()
    })
}

#[test]
fn fused_qat_cnn_on_mnist_folds_to_the_same_predictions() {
    let Some(dir) = mnist_dir() else {
        skip(
            "fused_qat_cnn_on_mnist_folds_to_the_same_predictions",
            "all",
            "real MNIST not found (set MNIST_DIR or provide ../shared/data/mnist)",
        );
        return;
    };
    let data = mnist::data::Mnist::load_dir(&dir).expect("MNIST");
    let b = &backends()[0]; // training in a debug build: once, on the first backend
    let d = b.device.clone().autodiff();
    d.seed(5);
    let model = MnistCnn {
        input: FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric())
            .init(&d)
            .unwrap(),
        conv: FusedConfig::new()
            .with_activation(Activation::Relu)
            .init(
                Conv2dConfig::new([1, 8], [3, 3]).init(&d),
                Some(BatchNormConfig::new(8).init(&d)),
            )
            .unwrap(),
        pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
        fc: FusedConfig::new()
            .with_weight(Some(QuantSpec::int8_weight_per_channel_symmetric(1)))
            .with_output(None)
            .init(LinearConfig::new(8 * 13 * 13, 10).init(&d), None)
            .unwrap(),
    };
    let schedule = QatSchedule::new(Some(80), Some(60));
    let mut model = model;
    let mut optim = AdamConfig::new().init();
    let batch = 64;
    for step in 0..100 {
        let r = (step * batch) % 6000..(step * batch) % 6000 + batch;
        let x = Tensor::<1>::from_floats(data.train.pixels(r.clone()).as_slice(), &d)
            .reshape([batch, 1, 28, 28]);
        let labels: Vec<i64> = data.train.labels[r].iter().map(|l| *l as i64).collect();
        let y = Tensor::<1, Int>::from_ints(labels.as_slice(), &d);
        let loss = burn::nn::loss::CrossEntropyLossConfig::new()
            .init(&d)
            .forward(model.forward(x), y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-3, model, grads);
        model = schedule.step(model);
    }
    let qat = model.valid();
    let folded = qat.clone().folded();
    let (mut same, mut correct, n) = (0usize, 0usize, data.test.len());
    for start in (0..n).step_by(1000) {
        let x =
            Tensor::<1>::from_floats(data.test.pixels(start..start + 1000).as_slice(), &b.device)
                .reshape([1000, 1, 28, 28]);
        let p_qat: Vec<i64> = qat
            .forward(x.clone())
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        let p_fold: Vec<i64> = folded
            .forward(x)
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .try_to_vec()
            .unwrap();
        for i in 0..1000 {
            same += usize::from(p_qat[i] == p_fold[i]);
            correct += usize::from(p_qat[i] == data.test.labels[start + i] as i64);
        }
    }
    let agree = same as f64 / n as f64;
    let acc = correct as f64 / n as f64;
    println!(
        "{}: QAT test accuracy {:.2}%, folded agrees on {:.3}% of 10,000 test images",
        b.name,
        acc * 100.0,
        agree * 100.0
    );
    assert!(
        agree >= 0.999,
        "folded and QAT predictions agree on only {:.3}%",
        agree * 100.0
    );
    assert!(
        acc > 0.85,
        "the fused QAT CNN did not learn: {:.2}%",
        acc * 100.0
    );
}

#[test]
fn sequential_discovers_and_fuses_conv_bn_relu_chains() {
    use burn::nn::Relu;
    use burn_qat::transform::{SeqLayer, Sequential};
    for b in backends() {
        let d = b.device.clone().autodiff();
        d.seed(21);
        let model = Sequential::new(vec![
            SeqLayer::Conv2d(Conv2dConfig::new([1, 4], [3, 3]).init(&d)),
            SeqLayer::BatchNorm(random_bn(4, &d)),
            SeqLayer::Relu(Relu::new()),
            SeqLayer::Conv2d(Conv2dConfig::new([4, 4], [3, 3]).with_bias(false).init(&d)),
            SeqLayer::BatchNorm(random_bn(4, &d)),
            SeqLayer::MaxPool2d(MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
            SeqLayer::Flatten(Default::default()),
            SeqLayer::Linear(LinearConfig::new(4 * 3 * 3, 8).init(&d)),
            SeqLayer::Relu(Relu::new()),
            SeqLayer::Linear(LinearConfig::new(8, 3).init(&d)),
        ]);
        let x = Tensor::<4>::random([2, 1, 10, 10], Distribution::Normal(0.0, 1.0), &b.device);
        let want = values(model.valid().forward(x.clone()));
        // Float fusion (no fake-quant): the fused model computes the same function.
        let float = FusedConfig::new().with_weight(None).with_output(None);
        let fused = model.fuse(&float).unwrap();
        assert_eq!(
            fused.describe(),
            vec![
                "FusedConv2d(BatchNorm, Relu)",
                "FusedConv2d(BatchNorm)",
                "MaxPool2d",
                "Flatten",
                "FusedLinear(Relu)",
                "FusedLinear"
            ],
            "{}",
            b.name
        );
        let eval = fused.valid();
        assert_close(
            values(eval.forward(x.clone())),
            want,
            &format!("{} fused sequential", b.name),
        );
        assert_eq!(
            values(eval.clone().folded().forward(x.clone())),
            values(eval.forward(x.clone())),
            "{}",
            b.name
        );
    }
}

#[test]
fn sequential_quantized_fusion_folds_bit_for_bit() {
    use burn::nn::Relu;
    use burn_qat::transform::{SeqLayer, Sequential};
    for b in backends() {
        let d = b.device.clone().autodiff();
        d.seed(22);
        let model = Sequential::new(vec![
            SeqLayer::Conv2d(Conv2dConfig::new([1, 4], [3, 3]).init(&d)),
            SeqLayer::BatchNorm(random_bn(4, &d)),
            SeqLayer::Relu(Relu::new()),
            SeqLayer::Flatten(Default::default()),
            SeqLayer::Linear(LinearConfig::new(4 * 8 * 8, 3).init(&d)),
        ])
        .fuse(&FusedConfig::new())
        .unwrap();
        let x = Tensor::<4>::random([2, 1, 10, 10], Distribution::Normal(0.0, 1.0), &d);
        let _ = model.forward(x.clone()); // training step: observers see data
        let eval = model.valid();
        let xe = x.inner();
        assert_eq!(
            values(eval.clone().folded().forward(xe.clone())),
            values(eval.forward(xe)),
            "{}",
            b.name
        );
    }
}

#[test]
fn fused_conv1d_and_linear_with_bn_train_like_the_pair_and_fold_bit_for_bit() {
    use burn_qat::transform::{FusedAdd, FusedConv1d};
    for b in backends() {
        let d = b.device.clone().autodiff();
        d.seed(31);
        // Conv1d + BN + ReLU6.
        let conv: Conv1d = Conv1dConfig::new(2, 3, 3).init(&d);
        let bn = random_bn(3, &d);
        let pair_bn = BatchNorm {
            running_mean: RunningState::new(bn.running_mean.value()),
            running_var: RunningState::new(bn.running_var.value()),
            ..bn.clone()
        };
        let f: FusedConv1d = FusedConfig::new()
            .with_weight(None)
            .with_output(None)
            .with_activation(Activation::Relu6)
            .init(conv.clone(), Some(bn))
            .unwrap();
        let x = Tensor::<3>::random([4, 2, 9], Distribution::Normal(0.0, 2.0), &d);
        let want = values(burn::tensor::activation::relu6(
            pair_bn.forward(conv.forward(x.clone())),
        ));
        assert_close(
            values(f.forward(x.clone())),
            want,
            &format!("{} fused conv1d training", b.name),
        );
        let eval = f.valid();
        assert_eq!(
            values(eval.clone().folded().forward(x.clone().inner())),
            values(eval.forward(x.inner())),
            "{}",
            b.name
        );
        // Linear + BatchNorm1d, exact mode.
        let lin: Linear = LinearConfig::new(5, 3).init(&d);
        let bn = random_bn(3, &d);
        let pair_bn = BatchNorm {
            running_mean: RunningState::new(bn.running_mean.value()),
            running_var: RunningState::new(bn.running_var.value()),
            ..bn.clone()
        };
        let f: FusedLinear = FusedConfig::new()
            .with_weight(None)
            .with_output(None)
            .with_mode(BnFoldMode::Exact)
            .init(lin.clone(), Some(bn))
            .unwrap();
        let x = Tensor::<2>::random([6, 5], Distribution::Normal(0.0, 1.0), &d);
        let want = values(pair_bn.forward(lin.forward(x.clone())));
        assert_close(
            values(f.forward(x.clone())),
            want,
            &format!("{} fused linear exact training", b.name),
        );
        // Add + ReLU with one fake-quant after the ReLU.
        let add = FusedAdd::new(
            Activation::Relu,
            Some(
                FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric())
                    .init(&d)
                    .unwrap()
                    .into(),
            ),
        );
        let a = Tensor::<1>::from_floats([1.0, -2.0, 0.5], &d);
        let c = Tensor::<1>::from_floats([0.5, 1.0, -1.0], &d);
        let y = values(add.forward(a, c));
        assert_eq!(y[1], 0.0, "{}", b.name);
        assert_eq!(y[2], 0.0, "{}", b.name);
        assert!((y[0] - 1.5).abs() < 1.5 / 255.0, "{}: {y:?}", b.name);
        assert_eq!(
            add.output.as_ref().unwrap().observed_range(),
            Some((vec![0.0], vec![1.5])),
            "{}: observed after the ReLU",
            b.name
        );
    }
}

/// Given an input grid of scale `s_in`, the layer adds the integer model's bias
/// (`bias_steps(b, s_in, s_w) * s_in * s_w`, exactly) instead of the float bias, on autodiff
/// inputs too (a `QatGraph` passes the scale in evaluation only), with the float bias's
/// gradient passed straight through; the folded form
/// bakes it; without a scale or with weight fake-quant off the float bias stays.
#[test]
fn on_an_input_grid_the_bias_is_the_integer_models() {
    use burn_qat::core::reference::bias_steps;
    for b in backends() {
        let device = b.device.clone().autodiff();
        let mut linear = LinearConfig::new(3, 4).init(&device);
        // Biases between grid steps of the accumulator.
        let s_in = 0.05f32;
        linear.bias = Some(Param::from_tensor(Tensor::from_floats(
            [0.0123, -0.0456, 0.3, 0.77],
            &device,
        )));
        let fused = FusedConfig::new()
            .with_output(None)
            .init(linear, None)
            .unwrap();
        let x = Tensor::<2>::zeros([1, 3], &device).require_grad();
        // Zero input: the output is the bias alone.
        let y = fused.forward_on_grid::<2, 2>(x.clone(), Some(s_in));
        let wq = fused.weight_quant.as_ref().unwrap();
        let qps = wq.qparams_for(fused.layer.weight.val());
        let floats = values(fused.layer.bias.as_ref().unwrap().val());
        let want: Vec<f32> = floats
            .iter()
            .zip(&qps)
            .map(|(&bias, qp)| bias_steps(bias, s_in, qp.scale) * (s_in * qp.scale))
            .collect();
        assert_eq!(values(y.clone()), want, "{}", b.name);
        assert_ne!(
            want, floats,
            "{}: the test needs biases off the grid",
            b.name
        );
        // Straight through: d(sum y)/d(bias) = 1 per channel.
        let grads = y.sum().backward();
        let g = fused.layer.bias.as_ref().unwrap().grad(&grads).unwrap();
        assert_eq!(values(g), vec![1.0; 4], "{}", b.name);
        // Evaluation and the folded form: the same values.
        let eval = fused.valid();
        let x = Tensor::<2>::zeros([1, 3], &b.device);
        assert_eq!(
            values(eval.forward_on_grid::<2, 2>(x.clone(), Some(s_in))),
            want
        );
        let folded = eval.clone().folded_on_grid::<2, 2>(Some(s_in));
        assert_eq!(values(folded.forward::<2, 2>(x.clone())), want);
        // No input scale, or weight fake-quant off: the float bias.
        assert_eq!(
            values(eval.forward_on_grid::<2, 2>(x.clone(), None)),
            floats
        );
        let off = burn_qat::switches::set_fake_quant_enabled(eval, false);
        assert_eq!(values(off.forward_on_grid::<2, 2>(x, Some(s_in))), floats);
    }
}

/// In evaluation on an input grid, a layer computes the integer layer's sum: every output is
/// `(sum (x / s_in) * (w / s_w) + bias_steps) * (s_in * s_w)` exactly (integers summed, one
/// rounding), which a float sum of the dequantized products would miss in the last bits.
#[test]
fn on_an_input_grid_evaluation_computes_the_integer_sum() {
    use burn_qat::core::reference::bias_steps;
    let device = Device::flex();
    let (d_in, d_out, n) = (64, 16, 8);
    let linear = LinearConfig::new(d_in, d_out).init(&device);
    let fused = FusedConfig::new()
        .with_output(None)
        .init(linear, None)
        .unwrap();
    // Inputs on a grid of scale s_in: s_in * (q - z) for q - z in [-128, 127].
    let s_in = 0.0371f32;
    let mut r = burn_qat_tests::uniform(17);
    let steps: Vec<f32> = (0..n * d_in).map(|_| (r() * 127.0).round()).collect();
    let x: Vec<f32> = steps.iter().map(|q| q * s_in).collect();
    let input = Tensor::<2>::from_data(TensorData::new(x, [n, d_in]), &device);
    let got = values(fused.forward_on_grid::<2, 2>(input.clone(), Some(s_in)));

    let wq = fused.weight_quant.as_ref().unwrap();
    let w = fused.layer.weight.val();
    let qps = wq.qparams_for(w.clone());
    let w_fq = values(burn::module::Reparameterization::apply(wq, w)); // [d_in, d_out]
    let bias = values(fused.layer.bias.as_ref().unwrap().val());
    let mut want = vec![0f32; n * d_out];
    for i in 0..n {
        for c in 0..d_out {
            let s_w = qps[c].scale;
            let mut acc = 0f32;
            for k in 0..d_in {
                acc += steps[i * d_in + k] * (w_fq[k * d_out + c] / s_w).round();
            }
            want[i * d_out + c] = (acc + bias_steps(bias[c], s_in, s_w)) * (s_in * s_w);
        }
    }
    assert_eq!(got, want);
    // The float arithmetic (no grid) differs from it somewhere: the test can tell them apart.
    let float = values(fused.forward_on_grid::<2, 2>(input, None));
    assert_ne!(float, want);
}
