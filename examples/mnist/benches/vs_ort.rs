//! The integer model against onnxruntime running the very ONNX file burn-qat exports, for every
//! example model (`tutorial`, `bn`, `residual`, `mobile`, `resnet`), batch 1 and 256, same thread
//! count: the integer model timed in this process, onnxruntime by `.ci/ort_bench.py` in the venv
//! CI builds (`BURN_QAT_VENV`, default `~/.cache/burn-qat/venv`). Prints one table with the
//! ratios. Models are calibrated on random images (speed does not depend on the weights).
//!
//! ```sh
//! cargo bench -p burn-qat -p mnist --all-features --bench vs_ort   # reuses CI's release build
//! VS_ORT_MODELS=bn,mobile cargo bench -p burn-qat -p mnist --all-features --bench vs_ort
//! ```

use std::path::PathBuf;
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

fn export<M: Classifier>(
    name: &str,
    model: M,
    device: &Device,
    dir: &std::path::Path,
) -> (String, [f64; 2]) {
    let qat = prepare_qat(&model, 8, 8).expect("prepare");
    for _ in 0..2 {
        let x = Tensor::<4>::random([32, 1, 28, 28], Distribution::Uniform(0.0, 1.0), device);
        let _: Tensor<2> = qat.forward(x);
    }
    let int8 = burn_qat::export::convert(&qat.valid()).expect("convert");
    burn_qat::onnx::save(
        &int8,
        &dir.join(format!("{name}.onnx")),
        &Default::default(),
    )
    .expect("onnx");
    // `VS_ORT_BATCH=1`: time only this batch size (for profiling; the other reads 0).
    let only: Option<usize> = std::env::var("VS_ORT_BATCH").ok().and_then(|b| b.parse().ok());
    let times = [1usize, 256].map(|batch| {
        if only.is_some_and(|b| b != batch) {
            return 0.0;
        }
        let x: Vec<f32> = (0..batch * 28 * 28)
            .map(|i| (i % 255) as f32 / 255.0)
            .collect();
        median_time(Duration::from_secs(3), || {
            drop(int8.forward(&x).expect("forward"))
        })
    });
    (name.to_string(), times)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    let device = Device::flex().autodiff();
    device.seed(0);
    let dir = tempfile_dir();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // `VS_ORT_MODELS=bn,mobile`: only these (for profiling one model).
    let only = std::env::var("VS_ORT_MODELS").ok();
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.split(',').any(|m| m == name));
    let mut ours = vec![];
    if wanted("tutorial") {
        ours.push(export("tutorial", Tutorial::new(&device), &device, &dir));
    }
    if wanted("bn") {
        ours.push(export("bn", BnNet::new(&device), &device, &dir));
    }
    if wanted("residual") {
        ours.push(export("residual", ResidualNet::new(&device), &device, &dir));
    }
    if wanted("mobile") {
        ours.push(export("mobile", MobileNet::new(&device), &device, &dir));
    }
    if wanted("resnet") {
        ours.push(export("resnet", ResNet::new(&device), &device, &dir));
    }
    let venv = std::env::var("BURN_QAT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/burn-qat/venv")
        });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/ort_bench.py");
    let ort = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(&dir)
        .arg(threads.to_string())
        .output();
    let ort: std::collections::HashMap<String, [f64; 2]> = match &ort {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() != 3 {
                    return None;
                }
                Some((f[0].to_string(), [f[1].parse().ok()?, f[2].parse().ok()?]))
            })
            .collect(),
        Ok(out) => {
            eprintln!(
                "onnxruntime skipped: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Default::default()
        }
        Err(e) => {
            eprintln!("onnxruntime skipped: {} not runnable ({e})", venv.display());
            Default::default()
        }
    };
    println!(
        "\nmedian ms per call, {threads} threads (integer model: rayon; onnxruntime: intra-op threads, all optimizations)"
    );
    println!(
        "| model | int8 batch 1 | ORT batch 1 | int8 / ORT | int8 batch 256 | ORT batch 256 | int8 / ORT |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, [b1, b256]) in ours {
        let cell = |ours: f64, i: usize| match ort.get(&name) {
            Some(t) => format!("{:.3} | {:.2}x", t[i] * 1e3, ours / t[i]),
            None => "n/a | n/a".to_string(),
        };
        println!(
            "| {name} | {:.3} | {} | {:.3} | {} |",
            b1 * 1e3,
            cell(b1, 0),
            b256 * 1e3,
            cell(b256, 1)
        );
    }
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-qat-vs-ort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
