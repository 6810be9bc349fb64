//! `bqi`: runs a burn-qat integer model file (`.bqi`) on an `.npy` input, built from
//! `burn-qat-runtime` alone (no Burn).
//!
//! ```sh
//! bqi model.bqi input.npy                 # output summary and timing
//! bqi model.bqi input.npy -o out.npy -r 50 # the output as .npy, median of 50 runs
//! bqi --info model.bqi                     # the model: input shape, nodes, grids, cost
//! ```
//!
//! The input is an array of `[n, ..input_shape]` (or `input_shape`, one item) of any real or
//! integer dtype; it is converted to `f32`. The output is written as `f32` (dequantized
//! when the model's output is quantized).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use burn_qat_runtime::{Budget, IntegerModel, format, kernels};
use clap::Parser;
use npyz::{DType, TypeChar, WriterBuilder};

/// Runs a burn-qat integer model (.bqi) on an .npy input.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The integer model file.
    model: PathBuf,
    /// The input array (.npy): `[n, ..input_shape]` or `input_shape`.
    input: Option<PathBuf>,
    /// Print the model (input shape, nodes, grids, parameters, cost) and exit.
    #[arg(long)]
    info: bool,
    /// Write the output here as an f32 .npy.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Timed runs after the first (the median is printed).
    #[arg(short, long, default_value_t = 10)]
    repeat: usize,
    /// Work budget for loading, in work units (default: the runtime's).
    #[arg(long)]
    max_work: Option<u64>,
    /// Memory budget per batch item, in bytes (default: the runtime's).
    #[arg(long)]
    max_memory: Option<u64>,
    /// Instruction set of the kernels: avx512, avx-vnni, avx2, neon-dot, neon or portable
    /// (default: `BURN_QAT_ISA`, else the best this CPU runs).
    #[arg(long)]
    isa: Option<kernels::Isa>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bqi: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    if let Some(isa) = args.isa {
        kernels::set_isa(isa).map_err(|e| format!("--isa {isa}: {e}"))?;
    }
    let budget = Budget {
        max_work: args.max_work.unwrap_or(Budget::DEFAULT.max_work),
        max_memory_bytes: args.max_memory.unwrap_or(Budget::DEFAULT.max_memory_bytes),
    };
    let model = format::load_with_budget(&args.model, budget)
        .map_err(|e| format!("{}: {e}", args.model.display()))?;
    if args.info {
        print!("{}", info(&model));
        if args.input.is_none() {
            return Ok(());
        }
    }
    let Some(input_path) = &args.input else {
        return Err("no input: give an .npy file after the model, or --info".into());
    };
    if model.inputs().len() != 1 || model.outputs.len() != 1 {
        return Err(format!(
            "{}: the model takes {} inputs and returns {} outputs; bqi runs models of one input \
             and one output (run the others with IntegerModel::forward_many)",
            args.model.display(),
            model.inputs().len(),
            model.outputs.len()
        ));
    }
    let (data, shape) = read_npy(input_path)?;
    let item = model.input_shape();
    let item_len: usize = item.iter().product();
    let batch_shape = if shape == item {
        std::iter::once(1).chain(item.iter().copied()).collect()
    } else {
        shape.clone()
    };
    if batch_shape.len() != item.len() + 1 || batch_shape[1..] != item[..] || item_len == 0 {
        return Err(format!(
            "{}: shape {shape:?} does not fit the model's input: allowed [n, {}] or [{}]",
            input_path.display(),
            join(&item),
            join(&item)
        ));
    }
    let start = Instant::now();
    let (out, out_shape) = model.forward(&data).map_err(|e| e.to_string())?;
    let first = start.elapsed();
    let mut times = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let t = Instant::now();
        model.forward(&data).map_err(|e| e.to_string())?;
        times.push(t.elapsed());
    }
    times.sort();
    let median = times.get(times.len() / 2).copied();
    println!(
        "input {} (batch {}), kernels: {}",
        input_path.display(),
        batch_shape[0],
        kernels::isa()
    );
    println!(
        "time: first call {}, median of {} {}",
        ms(first),
        args.repeat,
        median.map_or("-".into(), ms)
    );
    println!("output shape [{}]", join(&out_shape));
    let row = out_shape.iter().skip(1).product::<usize>().max(1);
    for (r, values) in out.chunks(row).enumerate().take(8) {
        let argmax = values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        let head: Vec<String> = values.iter().take(10).map(|v| format!("{v:.4}")).collect();
        let more = if values.len() > 10 { ", ..." } else { "" };
        println!("  [{r}] argmax {argmax}: [{}{more}]", head.join(", "));
    }
    if out.len() / row > 8 {
        println!("  ... ({} rows)", out.len() / row);
    }
    if let Some(path) = &args.output {
        write_npy(path, &out, &out_shape)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The model's description: input shape, parameters, cost, kernels, node table.
fn info(model: &IntegerModel) -> String {
    let cost = match model.cost() {
        Ok(c) => format!("{} work units, {} bytes", c.work, c.memory_bytes),
        Err(e) => format!("unknown ({e})"),
    };
    let inputs: Vec<String> = model
        .input_shapes()
        .iter()
        .map(|s| format!("[N, {}]", join(s)))
        .collect();
    format!(
        "input{} {}\nnodes {}, parameters {} bytes\ncost per batch item: {cost} \
         (budget {} units, {} bytes)\nkernels: {}\nprecision: {}\n{}",
        if inputs.len() == 1 { "" } else { "s" },
        inputs.join(", "),
        model.nodes.len(),
        model.parameter_bytes(),
        model.budget().max_work,
        model.budget().max_memory_bytes,
        kernels::isa(),
        model.precision().join("; "),
        model.plan()
    )
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn join(xs: &[usize]) -> String {
    xs.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An .npy array of any real or integer dtype as `f32`, with its shape.
fn read_npy(path: &PathBuf) -> Result<(Vec<f32>, Vec<usize>), String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let bytes = std::fs::read(path).map_err(at)?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(at)?;
    let shape: Vec<usize> = npy.shape().iter().map(|d| *d as usize).collect();
    let DType::Plain(ty) = npy.dtype() else {
        return Err(format!(
            "{}: structured arrays are not inputs: allowed a plain real or integer dtype",
            path.display()
        ));
    };
    let data: Vec<f32> = match (ty.type_char(), ty.size_field()) {
        (TypeChar::Float, 4) => npy.into_vec::<f32>().map_err(at)?,
        (TypeChar::Float, 8) => convert(npy.into_vec::<f64>().map_err(at)?),
        (TypeChar::Uint, 1) => convert(npy.into_vec::<u8>().map_err(at)?),
        (TypeChar::Int, 1) => convert(npy.into_vec::<i8>().map_err(at)?),
        (TypeChar::Int, 4) => convert(npy.into_vec::<i32>().map_err(at)?),
        (TypeChar::Int, 8) => {
            let xs = npy.into_vec::<i64>().map_err(at)?;
            xs.into_iter().map(|x| x as f32).collect()
        }
        _ => {
            return Err(format!(
                "{}: dtype {ty} is not an input: allowed f4, f8, u1, i1, i4, i8",
                path.display()
            ));
        }
    };
    Ok((data, shape))
}

fn convert<T: Copy + Into<f64>>(xs: Vec<T>) -> Vec<f32> {
    xs.into_iter().map(|x| x.into() as f32).collect()
}

fn write_npy(path: &PathBuf, data: &[f32], shape: &[usize]) -> Result<(), String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = std::fs::File::create(path).map_err(at)?;
    let shape: Vec<u64> = shape.iter().map(|d| *d as u64).collect();
    let mut writer = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(std::io::BufWriter::new(file))
        .begin_nd()
        .map_err(at)?;
    writer.extend(data.iter().copied()).map_err(at)?;
    writer.finish().map_err(at)
}
