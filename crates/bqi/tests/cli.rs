//! The `bqi` binary on a small integer model: its output file equals `IntegerModel::forward`,
//! `--info` describes the model, and bad inputs are errors naming the file and what is allowed.

use std::path::Path;
use std::process::Command;

use burn_qat_runtime::model::{Dim, Grid, IntLinear, IntNode, IntOp, IntegerModel, Output};
use npyz::WriterBuilder;

fn node(name: &str, op: IntOp, inputs: Vec<usize>, shape: Vec<Dim>, grid: Option<Grid>) -> IntNode {
    IntNode {
        name: name.into(),
        op,
        inputs,
        shape,
        grid,
    }
}

/// `[N, 3] -> quantize -> linear(3 -> 2) -> float`.
fn model() -> IntegerModel {
    let g = Grid {
        scale: 0.05,
        zero_point: -3,
        qmin: -128,
        qmax: 127,
    };
    let linear = IntLinear {
        in_features: 3,
        out_features: 2,
        weight: vec![10, -20, 30, 40, -50, 60],
        weight_bits: 8,
        weight_scale: vec![0.2, 0.4],
        bias: vec![7, -9],
        input: g,
        output: Output::Float {
            scale: vec![0.01, 0.02],
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
        },
    };
    IntegerModel::new(
        vec![
            node(
                "input",
                IntOp::Input,
                vec![],
                vec![Dim::Batch(1), Dim::Fixed(3)],
                None,
            ),
            node(
                "q",
                IntOp::Quantize(g),
                vec![0],
                vec![Dim::Batch(1), Dim::Fixed(3)],
                Some(g),
            ),
            node(
                "fc",
                IntOp::Linear(linear),
                vec![1],
                vec![Dim::Batch(1), Dim::Fixed(2)],
                None,
            ),
        ],
        2,
    )
}

fn write_npy(path: &Path, data: &[f32], shape: &[u64]) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(file)
        .begin_nd()
        .unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn bqi(args: &[&Path]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bqi"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn runs_a_model_file_and_writes_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let (file, input, output) = (
        dir.path().join("m.bqi"),
        dir.path().join("x.npy"),
        dir.path().join("y.npy"),
    );
    let model = model();
    burn_qat_runtime::format::save(&model, &file).unwrap();
    let x = [0.5, -1.0, 2.0, 0.0, 0.25, -0.75];
    write_npy(&input, &x, &[2, 3]);
    let out = bqi(&[&file, &input, Path::new("-o"), &output]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("output shape [2, 2]"), "{text}");
    let bytes = std::fs::read(&output).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    assert_eq!(npy.shape(), &[2, 2]);
    let got: Vec<f32> = npy.into_vec().unwrap();
    let (want, shape) = model.forward(&x).unwrap();
    assert_eq!(shape, vec![2, 2]);
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // One item without the batch axis is batch 1.
    write_npy(&input, &x[..3], &[3]);
    let out = bqi(&[&file, &input]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("output shape [1, 2]"));
}

#[test]
fn info_describes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.bqi");
    burn_qat_runtime::format::save(&model(), &file).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bqi"))
        .arg("--info")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("input [N, 3]"), "{text}");
    assert!(text.contains("nodes 3"), "{text}");
    assert!(text.contains("Linear"), "{text}");
}

#[test]
fn bad_inputs_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (file, input) = (dir.path().join("m.bqi"), dir.path().join("x.npy"));
    burn_qat_runtime::format::save(&model(), &file).unwrap();
    write_npy(&input, &[1.0; 8], &[2, 4]);
    let out = bqi(&[&file, &input]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("x.npy") && err.contains("[2, 4]") && err.contains("allowed [n, 3]"),
        "{err}"
    );
    // A file that is not a model.
    let out = bqi(&[&input, &input]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("x.npy"));
    // Missing file.
    let out = bqi(&[&dir.path().join("none.bqi")]);
    assert!(!out.status.success());
}
