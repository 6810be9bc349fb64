//! One training step (forward, backward, Adam) of the example's `tutorial` (batch 32) and `bn`
//! (batch 128) models: float, the QAT graph with its fake-quant switched off, QAT with the fused
//! fake-quant kernels, and QAT with the composed tensor ops (the path before the kernels, and
//! the one backends without them run), in this process, on the device `BURN_DEVICE` names (flex by default). Prints QAT / float ratios.
//! `QAT_STEP_MODELS=bn` (or `tutorial`) runs one model. The zoo's patterns (see `zoo`), batch 8
//! at `QAT_STEP_SIZE` (default 224; YOLOX at 416, its own size: `QAT_STEP_YOLOX_SIZE`), run
//! when named: `QAT_STEP_MODELS=resnet18,mobilenetv2,squeezenet,yolox`.
//!
//! ```sh
//! cargo bench -p mnist --all-features --bench qat_step
//! ```

use burn::prelude::*;
use burn::tensor::Distribution;
use criterion::{Criterion, criterion_group, criterion_main};
use mnist::model::{BnNet, Classifier, Tutorial, qat_config};

#[path = "../../../crates/burn-qat/benches/common/mod.rs"]
mod common;
mod train_step;
mod zoo;
use common::mean;
use train_step::{alternating_ratios, bench_step, stepper};

fn model_steps<M: Classifier + 'static>(
    c: &mut Criterion,
    name: &str,
    batch: usize,
    model: M,
    [channels, side]: [usize; 2],
    device: &Device,
) {
    let x = Tensor::<4>::random(
        [batch, channels, side, side],
        Distribution::Uniform(0.0, 1.0),
        device,
    );
    let y = Tensor::<1, Int>::from_ints(
        (0..batch as i64)
            .map(|i| i % 10)
            .collect::<Vec<_>>()
            .as_slice(),
        device,
    );
    let graph = burn_qat::graph::prepare(
        &model,
        &[1, channels, side, side],
        |m: &M, x: Tensor<4>| m.logits(x),
        &qat_config(8, 8),
    )
    .expect("prepare");
    // The same prepared graph with every fake-quant switched off and observers frozen: the
    // module structure of the QAT model (folded BatchNorm, lifted layers) without quantization.
    use burn_qat::nn::switches;
    let graph_off =
        switches::set_fake_quant_enabled(switches::freeze_observers(graph.clone()), false);
    // The ratios that the README quotes: float, fake-quant-off and QAT steps taken in turn
    // (skipped when a criterion filter names other benchmarks, e.g. for profiling).
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !"alternating".contains(f.as_str())) {
        return criterion_steps(c, name, batch, model, graph, graph_off, &x, &y);
    }
    // Rounds of at least about half a second, so that the cost of switching models (caches,
    // the allocator's free lists) stays small against the steps.
    let (rounds, steps) = match std::env::var("QAT_STEP_ROUNDS") {
        Ok(r) => (r.parse().expect("QAT_STEP_ROUNDS: a number"), 1),
        Err(_) if side > 28 => (9, 1),
        Err(_) => (15, if batch < 64 { 100 } else { 2 }),
    };
    let r = alternating_ratios(
        &mut [
            stepper(model.clone(), &x, &y),
            stepper(graph_off.clone(), &x, &y),
            stepper(graph.clone(), &x, &y),
        ],
        rounds,
        steps,
    );
    let median = |r: &[f64]| {
        format!(
            "{:.3}x (rounds {:.3}-{:.3}x)",
            r[rounds / 2],
            r[0],
            r[rounds - 1]
        )
    };
    println!(
        "RATIO {name} batch {batch}, alternating ({rounds} rounds of {steps} steps each), medians: \
         QAT graph fake-quant off / float {}, QAT fused / float {}",
        median(&r[0]),
        median(&r[1])
    );
    criterion_steps(c, name, batch, model, graph, graph_off, &x, &y);
}

/// The four steps of `model_steps` under criterion, and their ratios.
#[allow(clippy::too_many_arguments)]
fn criterion_steps<M: Classifier + 'static>(
    c: &mut Criterion,
    name: &str,
    batch: usize,
    model: M,
    graph: burn_qat::graph::QatGraph,
    graph_off: burn_qat::graph::QatGraph,
    x: &Tensor<4>,
    y: &Tensor<1, Int>,
) {
    let (x, y) = (x.clone(), y.clone());
    let group = format!("train_step_{name}_batch_{batch}");
    bench_step(c, &group, "float", model, true, &x, &y);
    bench_step(c, &group, "graph_fq_off", graph_off, true, &x, &y);
    bench_step(c, &group, "qat_fused", graph.clone(), true, &x, &y);
    bench_step(c, &group, "qat_composed", graph, false, &x, &y);
    let t = |k: &str| mean(&format!("{group}/{k}"));
    // A criterion filter may have skipped some: print the ratios only when all four ran.
    let (Some(float), Some(off), Some(fast), Some(slow)) = (
        t("float"),
        t("graph_fq_off"),
        t("qat_fused"),
        t("qat_composed"),
    ) else {
        return;
    };
    println!(
        "RATIO {name} batch {batch}: float {:.2} ms, QAT graph fake-quant off {:.2} ms, \
         QAT fused {:.2} ms ({:.3}x float, {:.3}x off), QAT composed {:.2} ms ({:.3}x float, {:.3}x off)",
        float * 1e3,
        off * 1e3,
        fast * 1e3,
        fast / float,
        fast / off,
        slow * 1e3,
        slow / float,
        slow / off
    );
}

fn bench(c: &mut Criterion) {
    let device = burn_qat::backend::default_device().autodiff();
    device.seed(0);
    // `QAT_STEP_MODELS=bn` runs one model (for profiling).
    let models = std::env::var("QAT_STEP_MODELS").unwrap_or_else(|_| "tutorial,bn".into());
    let models: Vec<&str> = models.split(',').collect();
    let mnist = [1, 28];
    if models.contains(&"tutorial") {
        model_steps(c, "tutorial", 32, Tutorial::new(&device), mnist, &device);
    }
    if models.contains(&"bn") {
        model_steps(c, "bn", 128, BnNet::new(&device), mnist, &device);
    }
    let size = |var: &str, default: usize| {
        std::env::var(var).map_or(default, |s| s.parse().expect("a size in pixels"))
    };
    let side = [3, size("QAT_STEP_SIZE", 224)];
    if models.contains(&"resnet18") {
        model_steps(c, "resnet18", 8, zoo::ResNet18::new(&device), side, &device);
    }
    if models.contains(&"mobilenetv2") {
        model_steps(
            c,
            "mobilenetv2",
            8,
            zoo::MobileNetV2::new(&device),
            side,
            &device,
        );
    }
    if models.contains(&"squeezenet") {
        model_steps(
            c,
            "squeezenet",
            8,
            zoo::SqueezeNet::new(&device),
            side,
            &device,
        );
    }
    if models.contains(&"yolox") {
        let side = [3, size("QAT_STEP_YOLOX_SIZE", 416)];
        model_steps(c, "yolox", 8, zoo::Yolox::new(&device), side, &device);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
