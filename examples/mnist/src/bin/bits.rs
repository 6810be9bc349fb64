//! Accuracy against bit width on MNIST (`bn` model): observer ranges vs LSQ at 8, 6, 4, 3 and 2
//! bits, QAT and integer models. Writes bits.json, bits.md and bits.png.
//!
//! ```sh
//! cargo run --release -p mnist --bin bits -- --data-dir ../shared/data/mnist --out results
//! cargo run --release -p mnist --bin bits -- --quick --out /tmp/bits   # a smoke test
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mnist::bits::{Ranges, SweepConfig, markdown, sweep, write};
use mnist::data::Mnist;

/// Train the MNIST `bn` CNN once in float, then fine-tune it with QAT at each bit width with
/// observer ranges and with LSQ; report QAT and integer-model test accuracy.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory with the four MNIST IDX files (raw or .gz); then $MNIST_DIR, the cache, a
    /// download.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output directory for bits.json, bits.md and bits.png.
    #[arg(long, default_value = "out/bits")]
    out: PathBuf,
    /// Backend: flex, ndarray or wgpu (those compiled in).
    #[arg(long, default_value = "flex")]
    device: String,
    /// Bit widths.
    #[arg(long, value_delimiter = ',', default_value = "8,6,4,3,2")]
    bits: Vec<u32>,
    /// Range methods.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "observers,lsq"
    )]
    ranges: Vec<Ranges>,
    /// Quantize every layer at the given bits (default: input, first-layer weights and the
    /// last layer stay at 8 bits).
    #[arg(long)]
    all_layers: bool,
    /// Float epochs (once).
    #[arg(long, default_value_t = 2)]
    epochs_float: usize,
    /// QAT epochs per configuration.
    #[arg(long, default_value_t = 1)]
    epochs_qat: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Adam learning rate of the weights.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Adam learning rate of the LSQ step sizes.
    #[arg(long, default_value_t = 1e-4)]
    range_lr: f64,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Use at most this many training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Use at most this many test images.
    #[arg(long)]
    test_limit: Option<usize>,
    /// TrueType font for the plot's labels (default: DejaVu Sans or Arial where installed).
    #[arg(long)]
    font: Option<PathBuf>,
    /// Smoke test: 3,000 training and 1,000 test images, 8, 4 and 2 bits.
    #[arg(long)]
    quick: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let quick = args.quick;
    let config = SweepConfig {
        device: args.device.clone(),
        seed: args.seed,
        bits: if quick && args.bits == [8, 6, 4, 3, 2] {
            vec![8, 4, 2]
        } else {
            args.bits.clone()
        },
        ranges: args.ranges.clone(),
        ends_8bit: !args.all_layers,
        epochs_float: args.epochs_float,
        epochs_qat: args.epochs_qat,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        range_learning_rate: args.range_lr,
        observe_batches: 20,
        train_limit: args.train_limit.or(quick.then_some(3000)),
        test_limit: args.test_limit.or(quick.then_some(1000)),
    };
    if let Some(b) = config.bits.iter().find(|b| !(2..=8).contains(*b)) {
        eprintln!("error: --bits: {b} is not in 2..=8 (the integer model keeps 8-bit containers)");
        return ExitCode::from(2);
    }
    let checks = [
        (config.batch_size == 0).then(|| "--batch-size is 0; allowed: at least 1".to_string()),
        (!(config.learning_rate.is_finite() && config.learning_rate > 0.0)).then(|| {
            format!(
                "--lr is {}; allowed: a finite value > 0",
                config.learning_rate
            )
        }),
        (!(config.range_learning_rate.is_finite() && config.range_learning_rate >= 0.0)).then(
            || {
                format!(
                    "--range-lr is {}; allowed: a finite value >= 0",
                    config.range_learning_rate
                )
            },
        ),
        (config.train_limit == Some(0)).then(|| "--train-limit is 0; allowed: at least 1".into()),
        (config.test_limit == Some(0)).then(|| "--test-limit is 0; allowed: at least 1".into()),
        (config.bits.is_empty()).then(|| "--bits is empty; allowed: bit widths in 2..=8".into()),
        burn_qat::backend::device(&config.device)
            .err()
            .map(|e| e.to_string()),
        args.data_dir
            .as_deref()
            .and_then(|d| mnist::check_data_dir(d).err()),
        mnist::check_out_dir(&args.out).err(),
    ];
    if let Some(e) = checks.into_iter().flatten().next() {
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
    let report = match sweep(&config, &data) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("\n{}", markdown(&report));
    match write(&report, &args.out, args.font.as_deref()) {
        Ok(()) => {
            println!("written to {}/bits.{{json,md,png}}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
