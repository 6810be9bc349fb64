//! The integer model against onnxruntime running the very ONNX file burn-qat exports, for every
//! example model (`tutorial`, `bn`, `residual`, `mobile`, `resnet`), batch 1 and 256, same thread
//! count: the integer model timed in this process, onnxruntime by `.ci/ort_bench.py` in the venv
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
use mnist::model::{BnNet, Classifier, MobileNet, ResNet, ResidualNet, Tutorial, prepare_qat};

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
    device: &Device,
    dir: &Path,
) -> (String, burn_qat::export::IntegerModel) {
    let qat = prepare_qat(&model, 8, 8).expect("prepare");
    for _ in 0..2 {
        let x = Tensor::<4>::random([32, 1, 28, 28], Distribution::Uniform(0.0, 1.0), device);
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
    (name.to_string(), int8)
}

/// Median seconds per call of the integer model at batch 1 and 256 (`None` for a batch
/// `VS_ORT_BATCH` leaves out), about `budget` each.
fn ours(int8: &burn_qat::export::IntegerModel, budget: Duration) -> [Option<f64>; 2] {
    let only: Option<usize> = std::env::var("VS_ORT_BATCH")
        .ok()
        .and_then(|b| b.parse().ok());
    [1usize, 256].map(|batch| {
        if only.is_some_and(|b| b != batch) {
            return None;
        }
        let x: Vec<f32> = (0..batch * 28 * 28)
            .map(|i| (i % 255) as f32 / 255.0)
            .collect();
        Some(median_time(budget, || {
            drop(int8.forward(&x).expect("forward"))
        }))
    })
}

/// onnxruntime's median seconds per call at batch 1 and 256 on the model's file, or why not.
fn ort(venv: &Path, dir: &Path, threads: usize, seconds: f64) -> Result<[f64; 2], String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/ort_bench.py");
    let out = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(dir)
        .arg(threads.to_string())
        .arg(seconds.to_string())
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
    let mut models = vec![];
    if wanted("tutorial") {
        models.push(export("tutorial", Tutorial::new(&device), &device, &dir));
    }
    if wanted("bn") {
        models.push(export("bn", BnNet::new(&device), &device, &dir));
    }
    if wanted("residual") {
        models.push(export("residual", ResidualNet::new(&device), &device, &dir));
    }
    if wanted("mobile") {
        models.push(export("mobile", MobileNet::new(&device), &device, &dir));
    }
    if wanted("resnet") {
        models.push(export("resnet", ResNet::new(&device), &device, &dir));
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
        for ((name, int8), t) in models.iter().zip(&mut times) {
            for (b, v) in ours(int8, budget).into_iter().enumerate() {
                t[0][b].extend(v);
            }
            if ort_error.is_none() {
                match ort(&venv, &dir.join(name), threads, budget.as_secs_f64()) {
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
        "| model | int8 batch 1 | ORT batch 1 | int8 / ORT | int8 batch 256 | ORT batch 256 | int8 / ORT |"
    );
    println!("|---|---|---|---|---|---|---|");
    let ms = |t: Option<f64>| t.map_or("n/a".to_string(), |t| format!("{:.3}", t * 1e3));
    for ((name, _), t) in models.iter().zip(times) {
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
        println!("| {name} | {} | {} |", cells[0], cells[1]);
    }
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-qat-vs-ort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
