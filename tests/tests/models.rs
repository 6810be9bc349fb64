//! Quantizing models not written for QAT: an MLP, a CNN with BatchNorm, and a nested model with
//! a `Vec` of residual blocks and an `Option` head. Each trains on every backend with the loss
//! going down; save/load/resume; errors.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Distribution;
use burn_qat::model::{
    QatConfig, QuantLinear, Quantized, WeightQuant, bake, plan, quantize, summary,
};
use burn_qat::{WeightFakeQuant, switches};
use burn_qat_tests::{backends, values};

// ---------------------------------------------------------------- models, written without QAT

#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    relu: Relu,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(16, 32).init(device),
            fc2: LinearConfig::new(32, 4).init(device),
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
    }
}

#[derive(Module, Debug)]
struct Cnn {
    conv: Conv2d,
    bn: BatchNorm,
    relu: Relu,
    fc: Linear,
}

impl Cnn {
    fn new(device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([1, 4], [3, 3]).init(device),
            bn: BatchNormConfig::new(4).init(device),
            relu: Relu::new(),
            fc: LinearConfig::new(4 * 2 * 2, 4).init(device),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let x = x.reshape([n, 1, 4, 4]);
        let x = self.relu.forward(self.bn.forward(self.conv.forward(x)));
        self.fc.forward(x.reshape([n, 4 * 2 * 2]))
    }
}

/// A residual block. For activation QAT the only change is the field type `QuantLinear`
/// (was `Linear`); its forward code is untouched.
#[derive(Module, Debug)]
struct Block {
    fc: QuantLinear,
    relu: Relu,
}

#[derive(Module, Debug)]
struct Nested {
    stem: Linear,
    blocks: Vec<Block>,
    head: Option<Linear>,
}

impl Nested {
    fn new(device: &Device) -> Self {
        Self {
            stem: LinearConfig::new(16, 24).init(device),
            blocks: (0..2)
                .map(|_| Block {
                    fc: Quantized::new(LinearConfig::new(24, 24).init(device), device),
                    relu: Relu::new(),
                })
                .collect(),
            head: Some(LinearConfig::new(24, 4).init(device)),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut x = self.stem.forward(x);
        for block in &self.blocks {
            x = x.clone() + block.fc.forward(block.relu.forward(x));
        }
        match &self.head {
            Some(head) => head.forward(x),
            None => x,
        }
    }
}

// ---------------------------------------------------------------- training helpers

fn data(device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    device.seed(7);
    let x = Tensor::<2>::random([64, 16], Distribution::Normal(0.0, 1.0), device);
    let teacher = Tensor::<2>::random([16, 4], Distribution::Normal(0.0, 1.0), device);
    let y = x.clone().matmul(teacher).argmax(1).reshape([64]);
    (x, y)
}

fn loss_of(logits: Tensor<2>, y: Tensor<1, Int>) -> Tensor<1> {
    CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, y)
}

/// A hand-written loop: returns the model and the losses.
fn train<M: Module>(
    mut model: M,
    forward: impl Fn(&M, Tensor<2>) -> Tensor<2>,
    steps: usize,
    device: &Device,
) -> (M, Vec<f32>) {
    let (x, y) = data(device);
    let mut optim = AdamConfig::new().init();
    let mut losses = vec![];
    for _ in 0..steps {
        let loss = loss_of(forward(&model, x.clone()), y.clone());
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    (model, losses)
}

fn assert_learns(name: &str, backend: &str, losses: &[f32]) {
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last.is_finite() && last < 0.8 * first,
        "{name} on {backend}: loss {first} -> {last} ({losses:?})"
    );
}

fn count_quantized<M: Module>(model: &M) -> usize {
    summary(model)
        .layers
        .iter()
        .filter(|l| l.spec.is_some())
        .count()
}

// ---------------------------------------------------------------- tests

#[test]
fn mlp_trains_with_weight_qat_on_every_backend() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let config = QatConfig::new();
        let model = quantize(Mlp::new(&device), &config).unwrap();
        assert_eq!(count_quantized(&model), 2);
        let (model, losses) = train(model, |m, x| m.forward(x), 25, &device);
        assert_learns("mlp", b.name, &losses);
        // The weights seen by forward are on the 8-bit grid of each output channel.
        let w = model.fc1.weight.val();
        let wfq = model
            .fc1
            .weight
            .reparameterization::<WeightFakeQuant>()
            .unwrap();
        let qps = wfq.qparams_for(model.fc1.weight.base());
        let cols = w.dims()[1];
        for (i, v) in values(w).into_iter().enumerate() {
            let q = v / qps[i % cols].scale;
            assert!(
                (q - q.round()).abs() < 1e-3 && q.abs() <= 127.01,
                "{}: weight {v} is not on the grid",
                b.name
            );
        }
    }
}

#[test]
fn cnn_with_batchnorm_trains_and_keeps_bn_statistics_float() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let config = QatConfig::new();
        let model = quantize(Cnn::new(&device), &config).unwrap();
        let report = summary(&model);
        let conv = report
            .layers
            .iter()
            .find(|l| l.path == "conv.weight")
            .unwrap();
        assert_eq!(
            conv.spec.unwrap().axis(),
            Some(0),
            "conv weights are per output channel (axis 0)"
        );
        let fc = report
            .layers
            .iter()
            .find(|l| l.path == "fc.weight")
            .unwrap();
        assert_eq!(
            fc.spec.unwrap().axis(),
            Some(1),
            "Linear weights are [d_in, d_out]: axis 1"
        );
        let (model, losses) = train(model, |m, x| m.forward(x), 25, &device);
        assert_learns("cnn", b.name, &losses);
        // Running statistics were updated by training and not quantized: still arbitrary floats.
        let var = values(model.bn.running_var.value());
        assert!(
            var.iter().all(|v| v.is_finite() && *v > 0.0)
                && var.iter().any(|v| (*v - 1.0).abs() > 1e-3),
            "{}: {var:?}",
            b.name
        );
        assert!(
            model
                .bn
                .gamma
                .reparameterization::<WeightFakeQuant>()
                .is_none()
        );
    }
}

#[test]
fn nested_model_with_vec_blocks_and_option_head() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let config = QatConfig::new()
            .with_layer("blocks.*.fc.inner", WeightQuant::int4_per_channel())
            .skip("stem");
        let model = quantize(Nested::new(&device), &config).unwrap();
        let report = summary(&model);
        let spec_of = |p: &str| report.layers.iter().find(|l| l.path == p).unwrap().spec;
        assert_eq!(spec_of("stem.weight"), None);
        assert_eq!(spec_of("blocks.0.fc.inner.weight").unwrap().bits, 4);
        assert_eq!(spec_of("blocks.1.fc.inner.weight").unwrap().bits, 4);
        assert_eq!(spec_of("head.weight").unwrap().bits, 8);
        let (model, losses) = train(model, |m, x| m.forward(x), 25, &device);
        assert_learns("nested", b.name, &losses);
        // Activation quantizers observed their inputs during training.
        let report = summary(&model);
        assert_eq!(report.activations.len(), 2, "{report}");
        assert!(
            report
                .activations
                .iter()
                .all(|a| a.range.is_some() && a.spec.unwrap().bits == 8),
            "{report}"
        );
        println!("{report}");
    }
}

#[test]
fn gradients_reach_float_weights_and_optimizer_updates_them() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let model = quantize(Mlp::new(&device), &QatConfig::new()).unwrap();
        let before = values(model.fc1.weight.base());
        let (x, y) = data(&device);
        let loss = loss_of(model.forward(x), y);
        let grads = loss.backward();
        let g = model
            .fc1
            .weight
            .base()
            .grad(&grads)
            .expect("gradient on the float weight");
        assert!(values(g).iter().any(|v| *v != 0.0), "{}", b.name);
        let gp = GradientsParams::from_grads(grads, &model);
        let mut optim = AdamConfig::new().init();
        let model = optim.step(1e-2, model, gp);
        let after = values(model.fc1.weight.base());
        // Adam's first step moves every weight with a gradient by about lr.
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| (*a - *b).abs() > 1e-3)
            .count();
        assert!(
            moved > before.len() / 2,
            "{}: only {moved} of {} weights moved",
            b.name,
            before.len()
        );
        assert!(
            model
                .fc1
                .weight
                .reparameterization::<WeightFakeQuant>()
                .is_some()
        );
    }
}

#[test]
fn frozen_parameters_are_not_quantized() {
    let device = backends()[0].device.clone().autodiff();
    let mut mlp = Mlp::new(&device);
    mlp.fc1 = mlp.fc1.freeze();
    let config = QatConfig::new();
    let planned = plan(&mlp, &config).unwrap();
    let fc1 = planned.iter().find(|p| p.path == "fc1.weight").unwrap();
    assert_eq!(fc1.spec, None);
    assert!(fc1.reason.contains("frozen"), "{}", fc1.reason);
}

#[test]
fn save_load_resume_equals_uninterrupted_training() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        device.seed(3);
        let config = QatConfig::new();
        let initial = quantize(Nested::new(&device), &config).unwrap();
        let (x, y) = data(&device);
        let step = |model: Nested, optim: &mut burn::optim::ModuleOptimizer| {
            let loss = loss_of(model.forward(x.clone()), y.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            optim.step(1e-2, model, grads)
        };
        let dir = tempfile::tempdir().unwrap();

        // Uninterrupted: 6 steps.
        let mut optim = AdamConfig::new().init();
        let mut model = initial.clone().load_record(initial.clone().into_record());
        for i in 0..6 {
            model = step(model, &mut optim);
            if i == 2 {
                model
                    .clone()
                    .into_record()
                    .save(dir.path().join("model.bpk"))
                    .unwrap();
                optim.save(dir.path().join("optim.bpk")).unwrap();
            }
        }
        let want = values(model.valid().forward(x.clone().inner()));

        // Interrupted after 3 steps: a fresh process builds the model, loads, resumes.
        let fresh = quantize(Nested::new(&device), &config).unwrap();
        let mut resumed =
            fresh.load_record(ModuleRecord::load(dir.path().join("model.bpk")).unwrap());
        let mut optim = AdamConfig::new()
            .init()
            .load(dir.path().join("optim.bpk"))
            .unwrap();
        for _ in 3..6 {
            resumed = step(resumed, &mut optim);
        }
        let got = values(resumed.valid().forward(x.clone().inner()));
        assert_eq!(got, want, "{}: resumed training diverged", b.name);
    }
}

#[test]
fn bake_gives_a_plain_model_with_the_quantized_weights() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let model = quantize(Mlp::new(&device), &QatConfig::new()).unwrap();
        let (x, _) = data(&device);
        let want = values(model.valid().forward(x.clone().inner()));
        let baked = bake(model.clone());
        assert!(
            baked
                .fc1
                .weight
                .reparameterization::<WeightFakeQuant>()
                .is_none()
        );
        assert_eq!(values(baked.forward(x.clone().inner())), want, "{}", b.name);
        // Switching fake-quant off gives the float model (different outputs).
        let float = switches::set_fake_quant_enabled(model, false);
        assert_ne!(values(float.valid().forward(x.inner())), want, "{}", b.name);
    }
}

#[test]
fn clear_errors() {
    let device = backends()[0].device.clone().autodiff();
    let err = quantize(
        Mlp::new(&device),
        &QatConfig::new().with_layer("fc3", WeightQuant::int4_per_channel()),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("layer pattern \"fc3\" matches no module of this model; its modules are [\"fc1\", \"fc2\"]"),
        "{err}"
    );
    let err = quantize(
        Mlp::new(&device),
        &QatConfig::new().with_layer_type("Conv2d", WeightQuant::float()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains(
            "layer type \"Conv2d\" matches no layer of this model; its layer types are [\"Linear\"]"
        ),
        "{err}"
    );
    let err = quantize(
        Mlp::new(&device),
        &QatConfig::new()
            .with_layer("fc*", WeightQuant::int4_per_channel())
            .with_layer("fc1", WeightQuant::int8_per_channel())
            .with_layer("*1", WeightQuant::int8_per_tensor()),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("conflicting settings for `fc1.weight`"),
        "{err}"
    );
    let err = quantize(
        Mlp::new(&device),
        &QatConfig::new()
            .with_layer("fc1", WeightQuant::int4_per_channel())
            .skip("fc1"),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("conflicting settings for `fc1.weight`"),
        "{err}"
    );
    let err = quantize(
        Mlp::new(&device),
        &QatConfig::new().with_default(WeightQuant {
            bits: 1,
            ..WeightQuant::default()
        }),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: `QatConfig.default.bits` is 1, allowed: 2..=16"
    );
    let err = quantize(Relu::new(), &QatConfig::new()).unwrap_err();
    assert!(err.to_string().starts_with("nothing to quantize"), "{err}");
    let bn = BatchNormConfig::new(3).init(&device);
    let err = quantize(bn, &QatConfig::new()).unwrap_err();
    assert!(err.to_string().starts_with("nothing to quantize"), "{err}");
    let twice = quantize(Mlp::new(&device), &QatConfig::new()).unwrap();
    let err = quantize(twice, &QatConfig::new()).unwrap_err();
    assert!(
        err.to_string().contains("already has a reparameterization"),
        "{err}"
    );

    #[derive(Module, Debug)]
    struct Odd {
        w: Param<Tensor<2>>,
    }
    impl burn_qat::model::QuantizableLayer for Odd {
        const NAME: &'static str = "Odd";
        fn quantizable_weights() -> Vec<(&'static str, Option<usize>)> {
            vec![("w", Some(2))]
        }
    }
    let odd = Odd {
        w: Param::from_tensor(Tensor::ones([2, 2], &device)),
    };
    let err = quantize(odd, &QatConfig::new().register::<Odd>()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("per-channel axis 2 does not exist on a tensor of rank 2 (parameter `w` of layer type Odd"),
        "{err}"
    );
}
