//! A QAT model trained by burn-train's `Learner` (`SupervisedTraining`), on every backend.

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::AdamConfig;
use burn::prelude::*;
use burn::train::metric::LossMetric;
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use burn_qat::WeightFakeQuant;
use burn_qat::model::{QatConfig, QuantLinear, Quantized, quantize};
use burn_qat_tests::backends;

#[derive(Module, Debug)]
struct Net {
    fc1: QuantLinear,
    fc2: Linear,
    relu: Relu,
}

impl Net {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
    }
    fn classify(&self, batch: Batch) -> ClassificationOutput {
        let output = self.forward(batch.x);
        let loss = CrossEntropyLossConfig::new()
            .init(&output.device())
            .forward(output.clone(), batch.y.clone());
        ClassificationOutput::new(loss, output, batch.y)
    }
}

#[derive(Clone, Debug)]
struct Item {
    x: [f32; 8],
    y: i64,
}

#[derive(Clone, Debug)]
struct Batch {
    x: Tensor<2>,
    y: Tensor<1, Int>,
}

#[derive(Clone)]
struct ItemBatcher;

impl Batcher<Item, Batch> for ItemBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> Batch {
        let n = items.len();
        let xs: Vec<f32> = items.iter().flat_map(|i| i.x).collect();
        let ys: Vec<i64> = items.iter().map(|i| i.y).collect();
        Batch {
            x: Tensor::<1>::from_floats(xs.as_slice(), device).reshape([n, 8]),
            y: Tensor::<1, Int>::from_ints(ys.as_slice(), device),
        }
    }
}

/// burn-train's step traits for a model with `classify`.
macro_rules! learner_steps {
    ($ty:ty) => {
        impl TrainStep for $ty {
            type Input = Batch;
            type Output = ClassificationOutput;
            fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
                let item = self.classify(batch);
                TrainOutput::new(self, item.loss.backward(), item)
            }
        }

        impl InferenceStep for $ty {
            type Input = Batch;
            type Output = ClassificationOutput;
            fn step(&self, batch: Batch) -> ClassificationOutput {
                self.classify(batch)
            }
        }
    };
}

learner_steps!(Net);

fn items(n: usize, seed: u64) -> Vec<Item> {
    // Deterministic pseudo-random points; the class is the sign pattern of two projections.
    let mut next = burn_qat_tests::uniform(seed);
    (0..n)
        .map(|_| {
            let x: [f32; 8] = std::array::from_fn(|_| next());
            let a = x[0] + x[1] - x[2] > 0.0;
            let b = x[3] - x[4] + x[5] > 0.0;
            Item {
                x,
                y: i64::from(a) * 2 + i64::from(b),
            }
        })
        .collect()
}

#[test]
fn learner_trains_a_quantized_model() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        device.seed(1);
        let net = Net {
            fc1: Quantized::new(LinearConfig::new(8, 32).init(&device), &device),
            fc2: LinearConfig::new(32, 4).init(&device),
            relu: Relu::new(),
        };
        let net = quantize(net, &QatConfig::new()).unwrap();
        let train = DataLoaderBuilder::new(ItemBatcher)
            .batch_size(32)
            .shuffle(1)
            .build(InMemDataset::new(items(512, 1)));
        let valid = DataLoaderBuilder::new(ItemBatcher)
            .batch_size(128)
            .build(InMemDataset::new(items(256, 2)));
        let before = {
            let batch = ItemBatcher.batch(items(256, 2), &b.device);
            net.valid().classify(batch).loss.into_scalar::<f32>()
        };
        let dir = tempfile::tempdir().unwrap();
        let result = SupervisedTraining::new(dir.path(), train, valid)
            .metrics((LossMetric::new(),))
            .num_epochs(4)
            .launch(Learner::new(net, AdamConfig::new().init(), 1e-2));
        let model = result.model;
        let after = model
            .classify(ItemBatcher.batch(items(256, 2), &b.device))
            .loss
            .into_scalar::<f32>();
        assert!(
            after < 0.7 * before,
            "{}: validation loss {before} -> {after}",
            b.name
        );
        assert!(
            model
                .fc1
                .inner
                .weight
                .reparameterization::<WeightFakeQuant>()
                .is_some(),
            "{}",
            b.name
        );
        assert!(
            model.fc1.input.as_ref().unwrap().is_observed(),
            "{}",
            b.name
        );
    }
}

/// A user's plain model (no burn-qat types), for graph mode.
#[derive(Module, Debug)]
struct Plain {
    fc1: Linear,
    fc2: Linear,
    relu: Relu,
}

impl Plain {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
    }
}

/// burn-train needs its step traits on a local type: the graph in a one-field wrapper.
#[derive(Module, Debug)]
struct GraphNet {
    graph: burn_qat::graph::QatGraph,
}

impl GraphNet {
    fn classify(&self, batch: Batch) -> ClassificationOutput {
        let output: Tensor<2> = self.graph.forward(batch.x);
        let loss = CrossEntropyLossConfig::new()
            .init(&output.device())
            .forward(output.clone(), batch.y.clone());
        ClassificationOutput::new(loss, output, batch.y)
    }
}

learner_steps!(GraphNet);

#[test]
fn learner_trains_a_qat_graph() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        device.seed(2);
        let plain = Plain {
            fc1: LinearConfig::new(8, 32).init(&device),
            fc2: LinearConfig::new(32, 4).init(&device),
            relu: Relu::new(),
        };
        let graph = burn_qat::graph::prepare(
            &plain,
            &[1, 8],
            |m: &Plain, x: Tensor<2>| m.forward(x),
            &QatConfig::new(),
        )
        .unwrap();
        let net = GraphNet { graph };
        let train = DataLoaderBuilder::new(ItemBatcher)
            .batch_size(32)
            .shuffle(1)
            .build(InMemDataset::new(items(512, 1)));
        let valid = DataLoaderBuilder::new(ItemBatcher)
            .batch_size(128)
            .build(InMemDataset::new(items(256, 2)));
        let before = net
            .valid()
            .classify(ItemBatcher.batch(items(256, 2), &b.device))
            .loss
            .into_scalar::<f32>();
        let dir = tempfile::tempdir().unwrap();
        let result = SupervisedTraining::new(dir.path(), train, valid)
            .metrics((LossMetric::new(),))
            .num_epochs(8)
            .launch(Learner::new(net, AdamConfig::new().init(), 1e-2));
        let model = result.model;
        let after = model
            .classify(ItemBatcher.batch(items(256, 2), &b.device))
            .loss
            .into_scalar::<f32>();
        assert!(
            after < 0.7 * before,
            "{}: validation loss {before} -> {after}",
            b.name
        );
        // The activation quantizers observed the training batches.
        let observed = model
            .graph
            .layers
            .iter()
            .filter(|l| matches!(l, burn_qat::graph::GraphLayer::Quant(q) if q.observer().is_observed()))
            .count();
        assert_eq!(
            observed, 3,
            "{}: input, hidden and output quantizers",
            b.name
        );
        // Trained weights back in the user's type.
        let back = model.graph.write_back(plain).unwrap();
        assert_eq!(
            back.fc2.weight.val().into_data(),
            model
                .graph
                .layers
                .iter()
                .rev()
                .find_map(|l| match l {
                    burn_qat::graph::GraphLayer::Linear(f) =>
                        Some(f.layer.weight.val().into_data()),
                    _ => None,
                })
                .unwrap(),
            "{}",
            b.name
        );
    }
}
