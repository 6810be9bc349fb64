//! The integer model against onnxruntime running the very ONNX file burn-qat exports, for every
//! example model (`tutorial`, `bn`, `residual`, `mobile`, `resnet`), batch 1 and 256, and, when
//! named in `VS_ORT_MODELS`, the model zoo's patterns of the `qat_step` bench (`zoo-resnet18`,
//! `zoo-mobilenetv2`, `zoo-squeezenet` at 3x224x224, `zoo-yolox` at 3x416x416; batch 1 and 8),
//! same thread count: the integer model timed in this process, onnxruntime by `.ci/ort_bench.py` in the venv
//! CI builds (`BURN_QAT_VENV`, default `~/.cache/burn-qat/venv`), in alternating rounds
//! (`VS_ORT_ROUNDS`, default 3). Prints one table with the ratios of the medians. Models are
//! calibrated on random images (speed does not depend on the weights).
//!
//! ```sh
//! cargo bench -p burn-qat -p mnist --all-features --bench vs_ort   # reuses CI's release build
//! # one model, one batch size, ours only (for profiling):
//! VS_ORT_MODELS=bn VS_ORT_BATCH=1 BURN_QAT_VENV=/none cargo bench -p mnist --all-features --bench vs_ort
//! # the integer kernels on AVX2 (or avx512, avx-vnni, neon-dot, neon, portable) instead of the
//! # fastest instruction set of the machine; the table's header names the one used:
//! BURN_QAT_ISA=avx2 cargo bench -p burn-qat -p mnist --all-features --bench vs_ort
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use burn::prelude::*;
use burn::tensor::Distribution;
use mnist::model::{BnNet, Classifier, MobileNet, ResNet, ResidualNet, Tutorial, qat_config};

#[allow(dead_code)] // the zoo's classifiers only; `qat_step` uses the rest
mod zoo;

/// Median seconds per call of `f` over about `budget` of calls (after one warm-up call).
fn median_time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = vec![];
    let start = Instant::now();
    while start.elapsed() < budget || times.len() < 5 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// The model prepared for QAT, calibrated, converted, and its ONNX file written to
/// `dir/name/name.onnx` (one directory per model: the script times every file of a directory).
fn export<M: Classifier>(
    name: &str,
    model: M,
    input: [usize; 3],
    device: &Device,
    dir: &Path,
) -> Exported {
    let [c, h, w] = input;
    let qat = burn_qat::graph::prepare(
        &model,
        &[1, c, h, w],
        |m: &M, x: Tensor<4>| m.logits(x),
        &qat_config(8, 8),
    )
    .expect("prepare");
    let calibration = if h > 28 { 4 } else { 32 };
    for _ in 0..2 {
        let x = Tensor::<4>::random(
            [calibration, c, h, w],
            Distribution::Uniform(0.0, 1.0),
            device,
        );
        let _: Tensor<2> = qat.forward(x);
    }
    let int8 = burn_qat::export::convert(&qat.valid()).expect("convert");
    let own = dir.join(name);
    std::fs::create_dir_all(&own).expect("model directory");
    burn_qat::onnx::save(
        &int8,
        &own.join(format!("{name}.onnx")),
        &Default::default(),
    )
    .expect("onnx");
    // Batch 256 at MNIST's size; the zoo's models at 224 px and more take batch 8.
    let batches = [1, if h > 28 { 8 } else { 256 }];
    Exported {
        name: name.to_string(),
        int8,
        item: c * h * w,
        batches,
    }
}

/// A converted model, its ONNX file written.
struct Exported {
    name: String,
    int8: burn_qat::export::IntegerModel,
    /// Values per input item.
    item: usize,
    /// The two batch sizes timed.
    batches: [usize; 2],
}

/// Median seconds per call of the integer model at its two batch sizes (`None` for a batch
/// `VS_ORT_BATCH` leaves out), about `budget` each.
fn ours(model: &Exported, budget: Duration) -> [Option<f64>; 2] {
    let only: Option<usize> = std::env::var("VS_ORT_BATCH")
        .ok()
        .and_then(|b| b.parse().ok());
    let int8 = &model.int8;
    model.batches.map(|batch| {
        if only.is_some_and(|b| b != batch) {
            return None;
        }
        let x: Vec<f32> = (0..batch * model.item)
            .map(|i| (i % 255) as f32 / 255.0)
            .collect();
        Some(median_time(budget, || {
            drop(int8.forward(&x).expect("forward"))
        }))
    })
}

/// onnxruntime's median seconds per call at the two batch sizes on the model's file, or why
/// not.
fn ort(
    venv: &Path,
    dir: &Path,
    threads: usize,
    seconds: f64,
    batches: [usize; 2],
) -> Result<[f64; 2], String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/ort_bench.py");
    let out = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(dir)
        .arg(threads.to_string())
        .arg(seconds.to_string())
        .arg(format!("{},{}", batches[0], batches[1]))
        .output()
        .map_err(|e| format!("{} not runnable ({e})", venv.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    match f.as_slice() {
        [_, a, b] => Ok([
            a.parse().map_err(|_| text.to_string())?,
            b.parse().map_err(|_| text.to_string())?,
        ]),
        _ => Err(format!("unexpected output: {text}")),
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    let device = Device::flex().autodiff();
    device.seed(0);
    let dir = tempfile_dir();
    let threads = burn_qat::export::kernels::threads();
    // `VS_ORT_MODELS=bn,mobile`: only these (for profiling one model).
    let only = std::env::var("VS_ORT_MODELS").ok();
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|m| m == name))
    };
    let mnist = [1, 28, 28];
    let mut models = vec![];
    if wanted("tutorial") {
        models.push(export(
            "tutorial",
            Tutorial::new(&device),
            mnist,
            &device,
            &dir,
        ));
    }
    if wanted("bn") {
        models.push(export("bn", BnNet::new(&device), mnist, &device, &dir));
    }
    if wanted("residual") {
        models.push(export(
            "residual",
            ResidualNet::new(&device),
            mnist,
            &device,
            &dir,
        ));
    }
    if wanted("mobile") {
        models.push(export(
            "mobile",
            MobileNet::new(&device),
            mnist,
            &device,
            &dir,
        ));
    }
    if wanted("resnet") {
        models.push(export("resnet", ResNet::new(&device), mnist, &device, &dir));
    }
    // The zoo's patterns, only when named.
    let named = |name: &str| {
        only.as_ref()
            .is_some_and(|o| o.split(',').any(|m| m == name))
    };
    let imagenet = [3, 224, 224];
    if named("zoo-resnet18") {
        let m = zoo::ResNet18::new(&device);
        models.push(export("zoo-resnet18", m, imagenet, &device, &dir));
    }
    if named("zoo-mobilenetv2") {
        let m = zoo::MobileNetV2::new(&device);
        models.push(export("zoo-mobilenetv2", m, imagenet, &device, &dir));
    }
    if named("zoo-squeezenet") {
        let m = zoo::SqueezeNet::new(&device);
        models.push(export("zoo-squeezenet", m, imagenet, &device, &dir));
    }
    if named("zoo-yolox") {
        let m = zoo::Yolox::new(&device);
        models.push(export("zoo-yolox", m, [3, 416, 416], &device, &dir));
    }
    let venv = std::env::var("BURN_QAT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/burn-qat/venv")
        });
    // Rounds alternate the two runtimes model by model, so that a slow spell of a shared
    // machine hits both; each time is the median over rounds.
    let rounds: usize = std::env::var("VS_ORT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let budget = Duration::from_secs(1);
    let mut times: Vec<[[Vec<f64>; 2]; 2]> = vec![Default::default(); models.len()];
    let mut ort_error = None;
    for _ in 0..rounds.max(1) {
        for (model, t) in models.iter().zip(&mut times) {
            for (b, v) in ours(model, budget).into_iter().enumerate() {
                t[0][b].extend(v);
            }
            if ort_error.is_none() {
                let seconds = budget.as_secs_f64();
                let folder = dir.join(&model.name);
                match ort(&venv, &folder, threads, seconds, model.batches) {
                    Ok(v) => (0..2).for_each(|b| t[1][b].push(v[b])),
                    Err(e) => ort_error = Some(e),
                }
            }
        }
    }
    if let Some(e) = &ort_error {
        eprintln!("onnxruntime skipped: {e}");
    }
    // The instruction set the integer kernels ran on (`BURN_QAT_ISA` picks another).
    let cpu = format!("{} kernels", burn_qat::export::kernels::isa());
    println!(
        "\nmedian ms per call over {rounds} alternating rounds, {threads} threads, {cpu} (integer model: caller + workers; onnxruntime: intra-op threads, all optimizations)"
    );
    println!(
        "| model | int8 batch 1 | ORT batch 1 | int8 / ORT | batch | int8 batch 256 (zoo: 8) | ORT | int8 / ORT |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let ms = |t: Option<f64>| t.map_or("n/a".to_string(), |t| format!("{:.3}", t * 1e3));
    for (model, t) in models.iter().zip(times) {
        let cells: Vec<String> = (0..2)
            .map(|b| {
                let (a, o) = (median(t[0][b].clone()), median(t[1][b].clone()));
                let ratio = match (a, o) {
                    (Some(a), Some(o)) => format!("{:.2}x", a / o),
                    _ => "n/a".to_string(),
                };
                format!("{} | {} | {ratio}", ms(a), ms(o))
            })
            .collect();
        println!(
            "| {} | {} | {} | {} |",
            model.name, cells[0], model.batches[1], cells[1]
        );
    }
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-qat-vs-ort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
