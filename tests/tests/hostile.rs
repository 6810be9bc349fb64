//! Hostile input: an integer model that `validate` (and so `format::load`) accepts never panics,
//! hangs or disagrees with the reference kernels, whatever its payload says (the mutation
//! harness in `common/hostile_harness.rs`); bad values never poison state (one regression test
//! per finding below).

#[path = "common/hostile_harness.rs"]
mod harness;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn_qat::export::model::IntegerModel;
use burn_qat::graph;
use burn_qat::model::QatConfig;

#[test]
fn mutated_models_never_panic_or_disagree() {
    // More cases: BURN_QAT_HOSTILE_CASES=100000 (and BURN_QAT_HOSTILE_SEED).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("BURN_QAT_HOSTILE_CASES").unwrap_or(4000) as usize;
    let tally = harness::run(
        cases,
        env("BURN_QAT_HOSTILE_SEED").unwrap_or(0x9E37_79B9_7F4A_7C15),
        None,
    );
    println!(
        "{} cases: {} refused, {} accepted ({} refused at run time), slowest accepted case {:?}",
        tally.cases, tally.refused, tally.accepted, tally.run_errors, tally.slowest
    );
    assert!(
        tally.accepted > 200,
        "too few accepted cases to mean anything: {}",
        tally.accepted
    );
    assert!(
        tally.findings.is_empty(),
        "{} findings:\n{}",
        tally.findings.len(),
        tally
            .findings
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------- regression tests, one per finding

use burn_qat::core::tensor as qt;
use burn_qat::export::model::{Dim, Grid, IntLinear, IntNode, IntOp, Output};
use burn_qat::nn::tree;
use burn_qat::{FakeQuantConfig, QatError, QuantSpec, qparams_from_range};

fn flex() -> Device {
    burn_qat::backend::device("flex").unwrap()
}

#[test]
fn set_range_refuses_what_would_stick() {
    let fq = FakeQuantConfig::new(QuantSpec::default())
        .init(&flex())
        .unwrap();
    for (lo, hi) in [
        (f32::NEG_INFINITY, 2.0),
        (-1.0, f32::NAN),
        (-1.0, f32::INFINITY),
    ] {
        let err = fq.clone().set_range(&[lo], &[hi]).unwrap_err();
        assert!(matches!(err, QatError::InvalidConfig { .. }), "{err}");
    }
    assert!(fq.clone().set_range(&[-1.0, 0.0], &[1.0, 1.0]).is_err());
    let fq = fq.set_range(&[-1.0], &[2.0]).unwrap();
    assert_eq!(fq.observed_range(), Some((vec![-1.0], vec![2.0])));
}

#[test]
fn training_saturates_infinity_as_evaluation_does() {
    let device = flex().autodiff();
    let fq = FakeQuantConfig::new(QuantSpec::default())
        .init(&device)
        .unwrap()
        .set_range(&[-1.0], &[1.0])
        .unwrap();
    let fq = burn_qat::switches::freeze_observers(fq);
    let x =
        Tensor::<1>::from_floats([f32::INFINITY, f32::NEG_INFINITY, 0.5], &device).require_grad();
    let y = fq.forward(x.clone());
    let eval = fq.valid().forward(x.clone().inner());
    let (train, eval) = (
        y.clone().into_data().try_to_vec::<f32>().unwrap(),
        eval.into_data().try_to_vec::<f32>().unwrap(),
    );
    assert!(train.iter().all(|v| v.is_finite()), "{train:?}");
    assert_eq!(train, eval);
    let grads = y.sum().backward();
    let g = x
        .grad(&grads)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(g, [0.0, 0.0, 1.0], "saturated values pass no gradient");
}

#[test]
fn pact_on_a_narrow_spec_keeps_zero_exact() {
    let spec = QuantSpec::act_per_tensor_asymmetric(4).with_narrow_range(true);
    let x = Tensor::<1>::from_floats([0.0, 0.3, 2.0], &flex());
    let y = qt::fake_quant_pact(x, Tensor::from_floats([1.0], &flex()), &spec);
    let y = y.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(y[0], 0.0, "{y:?}");
    assert_eq!(y[2], 1.0, "{y:?}");
}

#[test]
fn ranges_wider_than_f32_max_give_the_representable_step() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    let qp = qparams_from_range(-3e38, 3e38, &spec);
    let want = 6e38f64 / 255.0;
    assert!(((qp.scale as f64 - want) / want).abs() < 1e-6, "{qp:?}");
    let (s, z) = qt::qparams(
        Tensor::from_floats([-3e38], &flex()),
        Tensor::from_floats([3e38], &flex()),
        &spec,
    );
    assert_eq!(qt::to_qparams(&s, &z), vec![qp]);
    let sym = QuantSpec::int8_weight_per_tensor_symmetric();
    let qp = qparams_from_range(-3e38, 3e38, &sym);
    assert!(
        ((qp.scale as f64 - 3e38 / 127.0) / (3e38 / 127.0)).abs() < 1e-6,
        "{qp:?}"
    );
    // Ordinary ranges keep their exact f32 step.
    assert_eq!(qparams_from_range(-1.0, 1.0, &sym).scale, 2.0f32 / 254.0);
    // qmin/qmax never overflow, whatever `bits` says.
    for bits in [0, 1, 31, 32, 64, u32::MAX] {
        let s = spec.with_bits(bits);
        assert!(s.qmin() < s.qmax(), "{bits}");
    }
}

#[test]
fn broken_learned_ranges_are_repaired_not_propagated() {
    let x = Tensor::<1>::from_floats([-1.0, 0.25, 3.0], &flex());
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    for bad in [f32::NAN, f32::INFINITY] {
        let p = Tensor::<1>::from_floats([bad], &flex());
        let outs = [
            qt::fake_quant_lsq(x.clone(), p.clone(), None, &spec, 1.0),
            qt::fake_quant_pact(x.clone(), p.clone(), &spec),
            qt::fake_quant_min_max(
                x.clone(),
                p.clone(),
                Tensor::from_floats([1.0], &flex()),
                &spec,
            ),
        ];
        for y in outs {
            let y = y.into_data().try_to_vec::<f32>().unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{bad}: {y:?}");
        }
    }
}

#[test]
fn a_record_with_a_non_finite_range_is_refused() {
    let device = flex();
    let fq = FakeQuantConfig::new(QuantSpec::default())
        .init(&device)
        .unwrap();
    let fq = fq.set_range(&[-1.0], &[1.0]).unwrap();
    // Written past `set_range`, as a hand-edited record would be.
    let poisoned = tree::fill(fq, |at| {
        at.is("Struct:FakeQuant", "min")
            .then_some(f32::NEG_INFINITY)
    });
    let record = poisoned.into_record();
    let skeleton = FakeQuantConfig::new(QuantSpec::default())
        .init(&device)
        .unwrap();
    let err = burn_qat::load_record(skeleton, record).unwrap_err();
    assert!(
        matches!(err, QatError::Record { .. }) && err.to_string().contains("-inf"),
        "{err}"
    );
}

fn linear_model(weight: Vec<i8>, bias: Vec<i32>) -> IntegerModel {
    let g = Grid {
        scale: 0.01,
        zero_point: 0,
        qmin: -128,
        qmax: 127,
    };
    let shape = |n| vec![Dim::Batch(1), Dim::Fixed(n)];
    let (inputs, outputs) = (weight.len() / bias.len().max(1), bias.len());
    let input = IntNode {
        name: "input".into(),
        op: IntOp::Input,
        inputs: vec![],
        shape: shape(inputs),
        grid: None,
    };
    let quant = IntNode {
        name: "q".into(),
        op: IntOp::Quantize(g),
        inputs: vec![0],
        shape: shape(inputs),
        grid: Some(g),
    };
    let fc = IntNode {
        name: "fc".into(),
        op: IntOp::Linear(IntLinear {
            in_features: inputs,
            out_features: outputs,
            weight_bits: 8,
            weight_scale: vec![0.01; outputs],
            weight,
            bias,
            input: g,
            output: Output::Float {
                scale: vec![1e-4; outputs],
                lo: f32::NEG_INFINITY,
                hi: f32::INFINITY,
            },
        }),
        inputs: vec![1],
        shape: shape(outputs),
        grid: None,
    };
    IntegerModel::new(vec![input, quant, fc], 2)
}

#[test]
fn an_accumulator_that_could_wrap_is_refused() {
    // 4 inputs of at most |128| times weights 127, plus a bias near i32::MAX: could wrap.
    let model = linear_model(vec![127; 4], vec![i32::MAX - 1000]);
    let err = model.validate().unwrap_err();
    assert!(err.to_string().contains("accumulator"), "{err}");
    assert!(model.forward(&[100.0; 4]).is_err());
    // With headroom it runs.
    assert!(
        linear_model(vec![127; 4], vec![1_000_000])
            .forward(&[1.0; 4])
            .is_ok()
    );
    // A linear layer with no outputs, a zero point outside the grid: refused, not run.
    let mut empty = linear_model(vec![1; 4], vec![0]);
    if let IntOp::Linear(l) = &mut empty.nodes[2].op {
        (l.out_features, l.weight, l.bias, l.weight_scale) = (0, vec![], vec![], vec![]);
        l.output = Output::Float {
            scale: vec![],
            lo: 0.0,
            hi: 1.0,
        };
    }
    empty.nodes[2].shape = vec![Dim::Batch(1), Dim::Fixed(0)];
    assert!(
        empty
            .validate()
            .unwrap_err()
            .to_string()
            .contains("without features")
    );
    let mut zp = linear_model(vec![1; 4], vec![0]);
    if let IntOp::Quantize(g) = &mut zp.nodes[1].op {
        g.zero_point = 128;
    }
    zp.nodes[1].grid = match &zp.nodes[1].op {
        IntOp::Quantize(g) => Some(*g),
        _ => None,
    };
    assert!(
        zp.validate()
            .unwrap_err()
            .to_string()
            .contains("zero_point")
    );
}

#[derive(Module, Debug)]
struct Affine {
    fc: Linear,
}

/// A QAT graph of one Linear with the given weights and bias, observed on inputs in [-1, 1].
fn affine_graph(weight: f32, bias: f32) -> burn_qat::graph::QatGraph {
    let device = flex().autodiff();
    let mut fc = LinearConfig::new(4, 1).init(&device);
    fc.weight = fc
        .weight
        .map(|w| w.ones_like().mul_scalar(weight).detach().require_grad());
    fc.bias = fc
        .bias
        .map(|b| b.map(|t| t.ones_like().mul_scalar(bias).detach().require_grad()));
    let model = Affine { fc };
    let g = graph::prepare(
        &model,
        &[1, 4],
        |m: &Affine, x: Tensor<2>| m.fc.forward(x),
        &QatConfig::new(),
    )
    .unwrap();
    let _: Tensor<2> =
        g.forward(Tensor::<1>::from_floats([-1.0, 1.0, 0.5, -0.5], &device).reshape([1, 4]));
    g.valid()
}

#[test]
fn conversion_refuses_what_int32_cannot_hold() {
    // s_in * s_w = (2 / 255) * (1 / 127): a bias just below i32::MAX in those units leaves no
    // room for the sum of products (4 * 127 * 255).
    let s = (2.0f64 / 255.0) as f32 as f64 * (1.0f64 / 127.0) as f32 as f64;
    let bias = ((i32::MAX - 50_000) as f64 * s) as f32;
    let err = burn_qat::export::convert(&affine_graph(1.0, bias)).unwrap_err();
    assert!(err.to_string().contains("accumulator"), "{err}");
    assert!(burn_qat::export::convert(&affine_graph(1.0, 0.5)).is_ok());
    // NaN weights or bias: refused, saying so.
    let err = burn_qat::export::convert(&affine_graph(f32::NAN, 0.5)).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let err = burn_qat::export::convert(&affine_graph(1.0, f32::NAN)).unwrap_err();
    assert!(
        err.to_string().contains("NaN") && !err.to_string().contains("overflow"),
        "{err}"
    );
}

#[test]
fn the_example_checks_its_settings_before_training() {
    let good = mnist::RunConfig {
        model: mnist::model::ModelKind::Bn,
        device: "flex".into(),
        seed: 1,
        epochs_float: 1,
        epochs_qat: 1,
        batch_size: 32,
        learning_rate: 1e-3,
        train_limit: None,
        test_limit: None,
        weight_bits: 8,
        activation_bits: 8,
    };
    assert!(good.validate().is_ok());
    let cases: Vec<(&str, mnist::RunConfig)> = vec![
        (
            "--batch-size",
            mnist::RunConfig {
                batch_size: 0,
                ..good.clone()
            },
        ),
        (
            "--lr",
            mnist::RunConfig {
                learning_rate: -1.0,
                ..good.clone()
            },
        ),
        (
            "--lr",
            mnist::RunConfig {
                learning_rate: f64::NAN,
                ..good.clone()
            },
        ),
        (
            "--test-limit",
            mnist::RunConfig {
                test_limit: Some(0),
                ..good.clone()
            },
        ),
        (
            "--train-limit",
            mnist::RunConfig {
                train_limit: Some(0),
                ..good.clone()
            },
        ),
        (
            "--weight-bits",
            mnist::RunConfig {
                weight_bits: 12,
                ..good.clone()
            },
        ),
        (
            "--act-bits",
            mnist::RunConfig {
                activation_bits: 1,
                ..good.clone()
            },
        ),
        (
            "device",
            mnist::RunConfig {
                device: "tpu".into(),
                ..good.clone()
            },
        ),
    ];
    for (field, config) in cases {
        let err = config.validate().unwrap_err();
        assert!(err.contains(field), "{field}: {err}");
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    assert!(
        mnist::check_data_dir(file.path())
            .unwrap_err()
            .contains("--data-dir")
    );
    assert!(
        mnist::check_out_dir(&file.path().join("sub"))
            .unwrap_err()
            .contains("--out")
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(mnist::check_out_dir(&dir.path().join("new")).is_ok());
}

#[test]
fn idx_files_gzipped_in_several_members_are_read_whole() {
    use std::io::Write;
    let mut idx = vec![0, 0, 8, 1, 0, 0, 0, 10];
    idx.extend(0..10u8);
    let member = |bytes: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels-idx1-ubyte.gz");
    let mut two = member(&idx[..12]);
    two.extend(member(&idx[12..]));
    std::fs::write(&path, two).unwrap();
    assert_eq!(
        mnist::data::read_labels(&path).unwrap(),
        (0..10u8).collect::<Vec<_>>()
    );
}

/// Findings of the review of the validation: each is refused before a kernel can misbehave.
#[test]
fn inconsistent_models_found_in_review_are_refused() {
    use burn_qat::export::requant::FixedMultiplier;
    let kitchen = harness::kitchen_model();
    let find = |kind: &str| {
        kitchen
            .nodes
            .iter()
            .position(|n| n.op.kind() == kind)
            .unwrap()
    };
    let refused = |m: &IntegerModel, what: &str| {
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains(what), "expected `{what}`: {err}");
    };
    // A concatenation of no inputs.
    let mut m = kitchen.clone();
    if let IntOp::Concat { requantize, .. } = &mut m.nodes[find("Concat")].op {
        requantize.clear();
    }
    refused(&m, "no inputs");
    // A convolution whose padded image would need 2^62 bytes.
    let mut m = kitchen.clone();
    if let IntOp::Conv2d(c) = &mut m.nodes[find("Conv2d")].op {
        c.padding = [1 << 30; 4];
        c.stride = [1 << 31; 2];
    }
    // Declared as the window computes it ([.., 2, 2]), so that the bound itself refuses it.
    let conv = find("Conv2d");
    let mut shape = m.nodes[conv].shape.clone();
    shape[2] = Dim::Fixed(2);
    shape[3] = Dim::Fixed(2);
    m.nodes[conv].shape = shape;
    refused(&m, "padded input");
    // An average over a window whose int32 sum could overflow.
    let mut m = kitchen.clone();
    if let IntOp::AvgPool { window, .. } = &mut m.nodes[find("AvgPool")].op {
        window.kernel = [4096, 4096];
        window.padding = [4096; 4];
    }
    refused(&m, "sums more than");
    // A clamp that lets values leave their grid (the next layer's int32 bound assumes they
    // stay on it): a 4-bit output clamped to the int8 range.
    let g4 = Grid {
        scale: 0.1,
        zero_point: 0,
        qmin: -8,
        qmax: 7,
    };
    let mut m = linear_model(vec![127; 4], vec![0]);
    if let IntOp::Linear(l) = &mut m.nodes[2].op {
        l.output = Output::Quantized {
            grid: g4,
            requant: vec![FixedMultiplier::new(0.5)],
            lo: -128,
            hi: 127,
        };
    }
    m.nodes[2].grid = Some(g4);
    refused(&m, "leaves the output grid");
}

// ------------------------------------------------------------ issue 33: budget and overflow

use burn_qat::export::budget::Budget;
use burn_qat::export::format;
use burn_qat::export::model::{IntAdd, IntConv2d};
use burn_qat::export::requant::FixedMultiplier;

/// The 8-bit grid of the hand-built models below.
fn g8() -> Grid {
    Grid {
        scale: 0.05,
        zero_point: 0,
        qmin: -128,
        qmax: 127,
    }
}

/// `input [n, values] -> quantize -> add -> add -> ...`: `adds` valid add nodes, each adding
/// the previous node to the quantized input.
fn add_chain(adds: usize, values: usize) -> IntegerModel {
    let shape = vec![Dim::Batch(1), Dim::Fixed(values)];
    let g = g8();
    let mut nodes = vec![
        IntNode {
            name: "input".into(),
            op: IntOp::Input,
            inputs: vec![],
            shape: shape.clone(),
            grid: None,
        },
        IntNode {
            name: "q".into(),
            op: IntOp::Quantize(g),
            inputs: vec![0],
            shape: shape.clone(),
            grid: Some(g),
        },
    ];
    for k in 0..adds {
        nodes.push(IntNode {
            name: format!("add{k}"),
            op: IntOp::Add(IntAdd {
                a: g,
                b: g,
                out: g,
                ma: 1 << 39,
                mb: 1 << 39,
                shift: 40,
                lo: -128,
                hi: 127,
            }),
            inputs: vec![nodes.len() - 1, 1],
            shape: shape.clone(),
            grid: Some(g),
        });
    }
    let output = nodes.len() - 1;
    IntegerModel::new(nodes, output)
}

/// `input [1, 2, 8, 8] -> quantize -> conv 2 -> 4, 3 x 3` with `padding` and `stride`, its
/// output shape declared as the window computes it.
fn padded_conv(padding: [usize; 4], stride: [usize; 2]) -> IntegerModel {
    let g = g8();
    let input = vec![Dim::Batch(1), Dim::Fixed(2), Dim::Fixed(8), Dim::Fixed(8)];
    let out_len = |len: usize, pad: usize, s: usize| (len + pad - 3) / s + 1;
    let shape = vec![
        Dim::Batch(1),
        Dim::Fixed(4),
        Dim::Fixed(out_len(8, padding[0] + padding[1], stride[0])),
        Dim::Fixed(out_len(8, padding[2] + padding[3], stride[1])),
    ];
    let conv = IntConv2d {
        in_channels: 2,
        out_channels: 4,
        groups: 1,
        kernel: [3, 3],
        stride,
        dilation: [1, 1],
        padding,
        weight: vec![1; 4 * 2 * 9],
        weight_bits: 8,
        weight_scale: vec![0.01; 4],
        bias: vec![0; 4],
        input: g,
        output: Output::Quantized {
            grid: g,
            requant: vec![FixedMultiplier::new(0.01); 4],
            lo: -128,
            hi: 127,
        },
    };
    let nodes = vec![
        IntNode {
            name: "input".into(),
            op: IntOp::Input,
            inputs: vec![],
            shape: input.clone(),
            grid: None,
        },
        IntNode {
            name: "q".into(),
            op: IntOp::Quantize(g),
            inputs: vec![0],
            shape: input,
            grid: Some(g),
        },
        IntNode {
            name: "padded".into(),
            op: IntOp::Conv2d(conv),
            inputs: vec![1],
            shape,
            grid: Some(g),
        },
    ];
    IntegerModel::new(nodes, 2)
}

/// Issue 33, class 2: a 2 MB file of 30,000 valid add nodes (and a 7 MB one of 100,000) took a
/// minute and 2 GB (6.5 GB) in its first `forward`, building each node's 64 KiB table; the
/// tables are now in the budget, and the default refuses the file at load, naming the node.
#[test]
fn a_long_chain_of_valid_adds_is_refused_by_the_default_budget() {
    for adds in [30_000, 100_000] {
        let model = add_chain(adds, 8);
        let bytes = format::to_bytes(&model);
        assert!(bytes.len() < 10 << 20, "{} bytes", bytes.len());
        let err = format::from_bytes(&bytes).unwrap_err().to_string();
        assert!(
            err.contains("(add") && err.contains("max_memory_bytes") && err.contains("with_budget"),
            "{err}"
        );
        let err = model.forward(&[0.5; 8]).unwrap_err().to_string();
        assert!(err.contains("max_memory_bytes"), "{err}");
        // What it would cost: its tables alone are 64 KiB each.
        let cost = model.cost().unwrap();
        assert!(cost.memory_bytes > adds as u64 * 65_536, "{cost:?}");
        assert!(cost.work > Budget::DEFAULT.max_work, "{cost:?}");
    }
}

/// Issue 33, class 2: a 269-byte model whose convolution is padded by 2^24 on one side passed
/// validation and aborted the process in its first `forward` ("memory allocation of 2684355840
/// bytes failed" in `ConvPlan::channels`); its buffers are now in the budget.
#[test]
fn a_conv_padded_by_two_to_the_24_is_refused_naming_it() {
    let model = padded_conv([1 << 24, 0, 1, 1], [1, 1]);
    let err = model.validate().unwrap_err();
    assert_eq!((err.node, err.name.as_str()), (2, "padded"), "{err}");
    assert!(err.what.contains("max_memory_bytes"), "{err}");
    let bytes = format::to_bytes(&model);
    assert!(bytes.len() < 1024);
    let err = format::from_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("(padded)"), "{err}");
    let err = model.forward(&[0.5; 128]).unwrap_err().to_string();
    assert!(err.contains("(padded)"), "{err}");
    // The same padding with a stride that keeps the output 8 x 8 reads a padded image of
    // 2 x 8 x 2^24 values; counted too.
    let strided = padded_conv([1 << 24, 0, 1, 1], [(1 << 24) / 7, 1]);
    assert_eq!(strided.nodes[2].shape[2], Dim::Fixed(8));
    let cost = strided.cost().unwrap();
    assert!(cost.memory_bytes > 2 << 24, "{cost:?}");
    // A padding of 2^20 with a stride of 2^17 fits the default budget, and runs.
    let fits = padded_conv([1 << 20, 0, 1, 1], [1 << 17, 1]);
    assert!(fits.validate().is_ok());
    assert_eq!(fits.forward(&[0.5; 128]).unwrap().1, vec![1, 4, 9, 8]);
}

/// Issue 33, class 2: the budget is a setting; a trusted model that needs more loads with a
/// larger one (which it keeps: validation and `forward` use it), and a smaller one refuses it.
#[test]
fn a_larger_budget_admits_a_larger_model() {
    let model = add_chain(10_000, 8);
    let bytes = format::to_bytes(&model);
    let err = format::from_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("max_memory_bytes"), "{err}");
    let cost = model.cost().unwrap();
    let larger = Budget::DEFAULT
        .with_max_memory_bytes(cost.memory_bytes)
        .with_max_work(cost.work);
    let loaded = format::from_bytes_with_budget(&bytes, larger).unwrap();
    assert_eq!(loaded.budget(), larger);
    assert_eq!(
        loaded, model,
        "the budget is a setting, not part of the model"
    );
    assert!(loaded.validate().is_ok());
    // One byte or unit less is refused, naming the last node.
    let tight = larger.with_max_memory_bytes(cost.memory_bytes - 1);
    let err = model.clone().with_budget(tight).validate().unwrap_err();
    assert_eq!(err.node, model.nodes.len() - 1, "{err}");
    let tight = larger.with_max_work(cost.work - 1);
    let err = model.clone().with_budget(tight).validate().unwrap_err();
    assert!(err.what.contains("max_work"), "{err}");
    // Through a file too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chain.bqat");
    format::save(&model, &path).unwrap();
    assert!(format::load(&path).is_err());
    assert_eq!(format::load_with_budget(&path, larger).unwrap(), model);
    // A smaller model runs with the default budget, and is refused by a small one.
    let small = add_chain(20, 8);
    assert!(small.forward(&[0.5; 8]).is_ok());
    let tiny = Budget::DEFAULT.with_max_memory_bytes(1 << 20);
    let small = small.with_budget(tiny);
    let err = small.forward(&[0.5; 8]).unwrap_err().to_string();
    assert!(err.contains("max_memory_bytes of 1048576"), "{err}");
}

/// Issue 33, class 3b: validation took `abs()` of a file's `i64::MIN` add multiplier ("attempt
/// to negate with overflow" in debug builds). Every integer field the model holds, set to
/// `i64::MIN`, `i64::MAX`, `i32::MIN` and more, loads with overflow checks on (this debug
/// build) into a clean error or a model that runs.
#[test]
fn extreme_integers_in_every_field_give_clean_errors() {
    let kitchen = harness::kitchen_model();
    let mut add = kitchen.clone();
    let at = add.nodes.iter().position(|n| n.op.kind() == "Add").unwrap();
    if let IntOp::Add(a) = &mut add.nodes[at].op {
        a.ma = i64::MIN;
    }
    let err = add.validate().unwrap_err();
    assert!(err.what.contains("out of range"), "{err}");
    let input: Vec<f32> = (0..2 * 8 * 8).map(|i| (i % 7) as f32 / 3.0 - 1.0).collect();
    let (mut fields, mut refused) = (std::collections::BTreeSet::new(), 0);
    for (what, case) in harness::extreme_field_cases(&kitchen) {
        fields.insert(what.split(" = ").next().unwrap_or_default().to_string());
        match case {
            Ok(m) => match m.validate() {
                Ok(()) => {
                    let _ = m.forward(&input);
                    let _ = m.forward_reference(&input);
                }
                Err(e) => {
                    assert!(!e.what.is_empty(), "{what}");
                    refused += 1;
                }
            },
            Err(_) => refused += 1,
        }
    }
    // Every node's integer fields: grids, clamps, multipliers, shifts, sizes, windows, axes,
    // inputs, shapes, weights, biases, tables.
    assert!(fields.len() > 150, "{} fields", fields.len());
    assert!(refused > 0);
}
