//! Quantization-aware training of a small classifier, in one call.
//!
//! ```sh
//! cargo run -p quickstart --release                 # flex (CPU)
//! cargo run -p quickstart --release --features wgpu -- --device wgpu
//! ```
//!
//! The model is an ordinary Burn MLP; its hidden layer's input is quantized by wrapping the
//! field in `Quantized`, and `quantize` fake-quantizes every weight to 8 bits per channel. It
//! trains on a synthetic task, then prints the summary and the accuracy of the float-baked
//! model against the QAT model (they agree by construction).

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_qat::model::{QatConfig, QuantLinear, Quantized, bake, quantize, summary};

#[derive(Module, Debug)]
struct Model {
    input: QuantLinear, // was `Linear`: the input of this layer is now fake-quantized
    output: Linear,
    relu: Relu,
}

impl Model {
    fn new(device: &Device) -> Self {
        Self {
            input: Quantized::new(LinearConfig::new(32, 64).init(device), device),
            output: LinearConfig::new(64, 4).init(device),
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.output
            .forward(self.relu.forward(self.input.forward(x)))
    }
}

fn accuracy(logits: Tensor<2>, y: &Tensor<1, Int>) -> f32 {
    let n = y.dims()[0] as f32;
    logits
        .argmax(1)
        .reshape([y.dims()[0]])
        .equal(y.clone())
        .int()
        .sum()
        .into_scalar::<i64>() as f32
        / n
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut name = burn_qat::backend::enabled()[0].to_string();
    let mut steps = 200usize;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => name = args.next().unwrap_or_default(),
            "--steps" => steps = args.next().and_then(|s| s.parse().ok()).unwrap_or(steps),
            other => {
                eprintln!(
                    "unknown argument {other:?}; usage: quickstart [--device flex|ndarray|wgpu] [--steps N]"
                );
                std::process::exit(2);
            }
        }
    }
    let device = match burn_qat::backend::device(&name) {
        Ok(d) => d.autodiff(),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    device.seed(42);

    // A synthetic task: 4 classes from a random linear teacher.
    let teacher = Tensor::<2>::random([32, 4], Distribution::Normal(0.0, 1.0), &device);
    let make = |n: usize| {
        let x = Tensor::<2>::random([n, 32], Distribution::Normal(0.0, 1.0), &device);
        let y = x.clone().matmul(teacher.clone()).argmax(1).reshape([n]);
        (x, y)
    };
    let (x_test, y_test) = make(1024);

    let config = QatConfig::new(); // 8-bit per-channel symmetric weights (tfmot's default)
    let mut model = quantize(Model::new(&device), &config).expect("a model with Linear layers");
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    for step in 1..=steps {
        let (x, y) = make(128);
        let loss = loss_fn.forward(model.forward(x), y);
        if step == 1 || step % 50 == 0 {
            println!(
                "step {step:>4}  loss {:.4}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
    }

    println!("\n{}", summary(&model));
    let eval = model.valid();
    let qat_acc = accuracy(
        eval.forward(x_test.clone().inner()),
        &y_test.clone().inner(),
    );
    let baked = bake(model);
    let baked_acc = accuracy(baked.forward(x_test.inner()), &y_test.inner());
    println!(
        "device {name}: QAT test accuracy {:.2}%, baked float model {:.2}%",
        qat_acc * 100.0,
        baked_acc * 100.0
    );
}
