//! The burn-qat MNIST example as a library: data loading, models (plain Burn structs), graph-mode
//! QAT, training and the report. The binary (`src/main.rs`) is a thin command line over it.
#![warn(missing_docs)]

pub mod bits;
pub mod data;
pub mod model;
pub mod plot;
pub mod report;
pub mod training;

/// Every process linking the example (its binaries, benches and tests) allocates through
/// mimalloc, with purging off. Burn's CPU backends allocate a fresh buffer per tensor op;
/// glibc's `malloc` hands buffers of this size back to the kernel on free and maps them again
/// on the next op, so that page faults took about a fifth of a `bn` training step on flex (5.1
/// million faults in 47 s of the `qat_step` bench). mimalloc keeps them, but by default it
/// still returns ("purges") freed pages to the kernel 10 ms after the free, and the kernel
/// hands them back zeroed on the next touch: on a YOLOX-nano-sized step at batch 8, 278,000
/// page faults and a fifth of the time in the kernel zeroing pages, more on the QAT step
/// (it allocates more). With purging off (the first allocation sets mimalloc's
/// `purge_delay` to -1; the same as `MIMALLOC_PURGE_DELAY=-1`) the run had 2,100 faults,
/// took 24 s instead of 32, and QAT / float went from 1.78x to 1.26x. The process keeps its
/// peak memory. Your own training binaries on flex or ndarray gain the same with
/// [`KeepPages`].
#[global_allocator]
static ALLOCATOR: KeepPages = KeepPages;

/// mimalloc with purging switched off on the first allocation (see the note on the example's
/// allocator above): freed memory stays mapped for the next tensor of the same size. A process
/// that links this crate already allocates through it (one global allocator per process); in
/// your own binary, copy these forty lines or set `MIMALLOC_PURGE_DELAY=-1` with plain
/// `mimalloc::MiMalloc`.
pub struct KeepPages;

static PURGE_OFF: std::sync::Once = std::sync::Once::new();

// mimalloc's option index of `mi_option_purge_delay` (its v2 and v3 headers agree).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn purge_off() {
    // SAFETY: sets a plain integer option (no allocation); mimalloc reads it when it purges.
    PURGE_OFF.call_once(|| unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) });
}

// SAFETY: every call goes to mimalloc unchanged, after an option that neither allocates nor
// touches the memory handed out.
unsafe impl std::alloc::GlobalAlloc for KeepPages {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        purge_off();
        // SAFETY: forwarded as is.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        purge_off();
        // SAFETY: forwarded as is.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded as is.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        purge_off();
        // SAFETY: forwarded as is.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

use std::path::Path;

use burn::module::Module;

use crate::data::Mnist;
use burn::prelude::Device;

use crate::model::{
    BnNet, Classifier, MobileNet, ModelKind, ResNet, ResidualNet, Tutorial, prepare_qat,
};
use crate::report::Report;
use crate::training::{adam, evaluate, float_size_bytes, train_epoch};

/// A run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The model.
    pub model: ModelKind,
    /// Backend name (`flex`, `ndarray`, `wgpu`).
    pub device: String,
    /// Seed of initialization and shuffling.
    pub seed: u64,
    /// Float epochs.
    pub epochs_float: usize,
    /// QAT epochs.
    pub epochs_qat: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Use at most this many training images.
    pub train_limit: Option<usize>,
    /// Use at most this many test images.
    pub test_limit: Option<usize>,
    /// Weight bits (8 for W8A8).
    pub weight_bits: u32,
    /// Activation bits.
    pub activation_bits: u32,
}

impl RunConfig {
    /// Checks every field before any work starts: each error names the setting, its value and
    /// what is allowed.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |field: &str, value: String, allowed: &str| {
            Err(format!("--{field} is {value}; allowed: {allowed}"))
        };
        if self.batch_size == 0 {
            return bad("batch-size", "0".into(), "at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "lr",
                self.learning_rate.to_string(),
                "a finite value > 0, e.g. 1e-3",
            );
        }
        if self.train_limit == Some(0) {
            return bad("train-limit", "0".into(), "at least 1 image");
        }
        if self.test_limit == Some(0) {
            return bad("test-limit", "0".into(), "at least 1 image");
        }
        for (field, bits) in [
            ("weight-bits", self.weight_bits),
            ("act-bits", self.activation_bits),
        ] {
            if !(2..=8).contains(&bits) {
                return bad(
                    field,
                    bits.to_string(),
                    "2 to 8 (the integer model stores 8-bit values)",
                );
            }
        }
        if self.epochs_float + self.epochs_qat == 0 {
            return bad(
                "epochs-float/--epochs-qat",
                "0 and 0".into(),
                "at least one epoch",
            );
        }
        burn_qat::backend::device(&self.device).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Checks that `out` is a directory that can be written (creating it), before hours of
/// training would end in a failed write.
pub fn check_out_dir(out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out)
        .map_err(|e| format!("--out {}: cannot create the directory: {e}", out.display()))?;
    let probe = out.join(".burn-qat-write-test");
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| format!("--out {}: cannot write there: {e}", out.display()))
}

/// Checks that `--data-dir` names a directory.
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "--data-dir {}: not a directory (give the directory holding the four MNIST IDX files)",
            dir.display()
        ))
    }
}

/// Trains the float model, prepares and fine-tunes it with QAT (graph mode), evaluates,
/// converts it to an integer model, and returns the report.
pub fn run(
    config: &RunConfig,
    data: &Mnist,
    out: Option<&Path>,
) -> Result<Report, Box<dyn std::error::Error>> {
    config.validate()?;
    let device = burn_qat::backend::device(&config.device)?.autodiff();
    device.seed(config.seed);
    match config.model {
        ModelKind::Tutorial => run_model(config, data, out, Tutorial::new(&device), &device),
        ModelKind::Bn => run_model(config, data, out, BnNet::new(&device), &device),
        ModelKind::Residual => run_model(config, data, out, ResidualNet::new(&device), &device),
        ModelKind::Mobile => run_model(config, data, out, MobileNet::new(&device), &device),
        ModelKind::Resnet => run_model(config, data, out, ResNet::new(&device), &device),
    }
}

/// [`run`] on a freshly initialized `model`.
fn run_model<M: Classifier>(
    config: &RunConfig,
    data: &Mnist,
    out: Option<&Path>,
    model: M,
    device: &Device,
) -> Result<Report, Box<dyn std::error::Error>> {
    let train = match config.train_limit {
        Some(n) => data.train.take(n),
        None => data.train.clone(),
    };
    let test = match config.test_limit {
        Some(n) => data.test.take(n),
        None => data.test.clone(),
    };
    let eval_device = device.clone().inner();

    let mut model = model;
    let mut optim = adam();
    let mut float_speed = 0.0;
    for epoch in 0..config.epochs_float {
        let (m, stats) = train_epoch(
            model,
            &mut optim,
            &train,
            config.batch_size,
            config.learning_rate,
            config.seed + epoch as u64,
            device,
            &format!("float {}/{}", epoch + 1, config.epochs_float),
        );
        model = m;
        float_speed = stats.images_per_s;
        println!(
            "float epoch {}: loss {:.4}, train acc {:.2}%, {:.0} images/s",
            epoch + 1,
            stats.loss,
            stats.accuracy * 100.0,
            stats.images_per_s
        );
    }
    let float_acc = evaluate(&model.valid(), &test, &eval_device);
    println!("float test accuracy {:.2}%", float_acc * 100.0);
    let float_bytes = float_size_bytes(&model);

    let mut qat = prepare_qat(&model, config.weight_bits, config.activation_bits)?;
    println!("QAT graph:\n{}", qat.plan());
    let mut optim = adam();
    let mut qat_speed = 0.0;
    for epoch in 0..config.epochs_qat {
        let (m, stats) = train_epoch(
            qat,
            &mut optim,
            &train,
            config.batch_size,
            config.learning_rate,
            config.seed + 1000 + epoch as u64,
            device,
            &format!("QAT {}/{}", epoch + 1, config.epochs_qat),
        );
        qat = m;
        qat_speed = stats.images_per_s;
        println!(
            "QAT epoch {}: loss {:.4}, train acc {:.2}%, {:.0} images/s",
            epoch + 1,
            stats.loss,
            stats.accuracy * 100.0,
            stats.images_per_s
        );
    }
    let qat_eval = qat.valid();
    let qat_acc = evaluate(&qat_eval, &test, &eval_device);
    let int8 = burn_qat::export::convert(&qat_eval)?;
    let int8_bytes = burn_qat::export::format::to_bytes(&int8);
    let int8_acc = evaluate_int8(&int8, &test)?;
    let folded_acc = evaluate(&qat_eval.clone().folded(), &test, &eval_device);
    // The trained weights back in the user's own type (BatchNorm unfolded).
    let _trained: M = qat.write_back(model)?;
    println!(
        "QAT test accuracy {:.2}%, integer model {:.2}% ({} bytes)",
        qat_acc * 100.0,
        int8_acc * 100.0,
        int8_bytes.len()
    );

    let report = Report {
        dataset: if config.train_limit.is_some() || config.test_limit.is_some() {
            "mnist (subset)".into()
        } else {
            "mnist".into()
        },
        model: config.model,
        device: config.device.clone(),
        seed: config.seed,
        epochs_float: config.epochs_float,
        epochs_qat: config.epochs_qat,
        batch_size: config.batch_size,
        learning_rate: config.learning_rate,
        train_images: train.len(),
        test_images: test.len(),
        weight_bits: config.weight_bits,
        activation_bits: config.activation_bits,
        float_test_acc: float_acc,
        qat_test_acc: qat_acc,
        folded_test_acc: folded_acc,
        int8_test_acc: Some(int8_acc),
        float_size_bytes: float_bytes,
        int8_size_bytes: Some(int8_bytes.len()),
        train_images_per_s_float: float_speed,
        train_images_per_s_qat: qat_speed,
        tfmot_qat_test_acc: Some(config.model.tfmot_qat_accuracy()).filter(|v| v.is_finite()),
    };
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join("report.json.part");
        std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)?;
        std::fs::rename(&tmp, dir.join("report.json"))?;
        burn_qat::export::format::save(&int8, &dir.join("model.bqi"))?;
        burn_qat::onnx::save(
            &int8,
            &dir.join("model.onnx"),
            &burn_qat::onnx::OnnxOptions::default(),
        )?;
        // The integer model's logits on the test images, for checks in other runtimes.
        let (logits, _) = int8.forward(&test.pixels(0..test.len()))?;
        write_npy(&dir.join("int8_logits.npy"), &logits, &[test.len(), 10])?;
    }
    Ok(report)
}

/// Writes a float32 array in NumPy's `.npy` format (any shape).
pub fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, bytes)
}

/// Accuracy of the integer model over `split`, in batches of 1000 images.
pub fn evaluate_int8(
    model: &burn_qat::export::IntegerModel,
    split: &data::Split,
) -> Result<f64, burn_qat::export::RunError> {
    let mut correct = 0usize;
    for start in (0..split.len()).step_by(1000) {
        let end = (start + 1000).min(split.len());
        let (logits, _) = model.forward(&split.pixels(start..end))?;
        for (i, row) in logits.chunks(10).enumerate() {
            // The first largest logit, as Burn's `argmax` picks.
            let pred = (1..10).fold(0, |best, c| if row[c] > row[best] { c } else { best });
            correct += usize::from(pred == split.labels[start + i] as usize);
        }
    }
    Ok(correct as f64 / split.len().max(1) as f64)
}

/// The final table.
pub fn table(r: &Report) -> String {
    let pct = |v: f64| format!("{:.2}%", v * 100.0);
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), pct);
    let mut s = String::new();
    s += &format!(
        "{:<34} {:?} / {} / {}\n",
        "model / device / seed", r.model, r.device, r.seed
    );
    s += &format!(
        "{:<34} {} float + {} QAT epochs, batch {}, {} train / {} test images\n",
        "schedule", r.epochs_float, r.epochs_qat, r.batch_size, r.train_images, r.test_images
    );
    s += &format!("{:<34} {}\n", "float test accuracy", pct(r.float_test_acc));
    s += &format!(
        "{:<34} {}  (W{}A{}; tfmot: {})\n",
        "QAT test accuracy",
        pct(r.qat_test_acc),
        r.weight_bits,
        r.activation_bits,
        opt(r.tfmot_qat_test_acc)
    );
    s += &format!(
        "{:<34} {}\n",
        "folded QAT model test accuracy",
        pct(r.folded_test_acc)
    );
    s += &format!("{:<34} {}\n", "int8 test accuracy", opt(r.int8_test_acc));
    s += &format!("{:<34} {} bytes\n", "float model size", r.float_size_bytes);
    if let Some(b) = r.int8_size_bytes {
        s += &format!(
            "{:<34} {} bytes ({:.1}% of float)\n",
            "int8 model file",
            b,
            100.0 * b as f64 / r.float_size_bytes as f64
        );
    }
    s += &format!(
        "{:<34} {:.0} float, {:.0} QAT ({:.2}x)\n",
        "training images/s",
        r.train_images_per_s_float,
        r.train_images_per_s_qat,
        r.train_images_per_s_float / r.train_images_per_s_qat.max(1e-9)
    );
    s
}
