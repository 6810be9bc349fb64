//! MNIST with burn-qat: float training, QAT fine-tune, evaluation, report.
//!
//! ```sh
//! cargo run --release -p mnist -- --data-dir ../shared/data/mnist --model bn --out out
//! cargo run --release -p mnist -- --quick                 # a small subset, under 3 minutes
//! cargo run --release -p mnist --features wgpu -- --device wgpu
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mnist::data::Mnist;
use mnist::model::ModelKind;
use mnist::{RunConfig, run, table};

/// Train a float CNN on MNIST, fine-tune it with quantization-aware training, evaluate both.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory with the four MNIST IDX files (raw or .gz); then $MNIST_DIR, then the cache
    /// directory, then a download.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The model.
    #[arg(long, value_enum, default_value = "bn")]
    model: ModelKind,
    /// Backend: flex, ndarray or wgpu (those compiled in).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Write report.json into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of initialization and shuffling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Float epochs (default: the model's tfmot schedule).
    #[arg(long)]
    epochs_float: Option<usize>,
    /// QAT epochs (default: the model's tfmot schedule).
    #[arg(long)]
    epochs_qat: Option<usize>,
    /// Batch size (default: the model's tfmot schedule).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Weight bits.
    #[arg(long, default_value_t = 8)]
    weight_bits: u32,
    /// Activation bits.
    #[arg(long, default_value_t = 8)]
    act_bits: u32,
    /// Use at most this many training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use at most this many test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Smoke test: 1 float + 1 QAT epoch on 4,000 training and 2,000 test images.
    #[arg(long)]
    quick: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (ef, eq, bs) = args.model.schedule();
    let quick = args.quick;
    let config = RunConfig {
        model: args.model,
        device: args.device.clone(),
        seed: args.seed,
        epochs_float: args.epochs_float.unwrap_or(if quick { 1 } else { ef }),
        epochs_qat: args.epochs_qat.unwrap_or(if quick { 1 } else { eq }),
        batch_size: args.batch_size.unwrap_or(bs),
        learning_rate: args.lr,
        train_limit: args.train_limit.or(quick.then_some(4000)),
        test_limit: args.test_limit.or(quick.then_some(2000)),
        weight_bits: args.weight_bits,
        activation_bits: args.act_bits,
    };
    let checks = config
        .validate()
        .and_then(|_| {
            args.data_dir
                .as_deref()
                .map_or(Ok(()), mnist::check_data_dir)
        })
        .and_then(|_| args.out.as_deref().map_or(Ok(()), mnist::check_out_dir));
    if let Err(e) = checks {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let data = match Mnist::load_or_download(args.data_dir.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "MNIST from {}: {} train, {} test images",
        data.dir.display(),
        data.train.len(),
        data.test.len()
    );
    match run(&config, &data, args.out.as_deref()) {
        Ok(report) => {
            println!("\n{}", table(&report));
            if let Some(out) = &args.out {
                println!("report written to {}", out.join("report.json").display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
