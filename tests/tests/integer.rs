//! The integer model equals the fake-quant model: within 1 LSB on every quantized output, fast
//! kernels equal the scalar reference exactly, errors name the module path.

use burn::module::{Module, Param, RunningState};
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::nn::{BatchNorm, BatchNormConfig, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_qat::export::Dim;
use burn_qat::export::kernels::{self, Isa};
use burn_qat::export::requant::FixedMultiplier;
use burn_qat::export::{
    Grid, IntConv2d, IntLinear, IntNode, IntOp, IntegerModel, Output, Window, convert,
};
use burn_qat::graph::from_sequential;
use burn_qat::transform::{FusedConfig, SeqLayer, Sequential};
use burn_qat::{FakeQuantConfig, QuantSpec};
use burn_qat_tests::values;
use proptest::prelude::*;

fn random_bn(c: usize, device: &Device) -> BatchNorm {
    let bn = BatchNormConfig::new(c).init(device);
    let r = |lo: f64, hi: f64| Tensor::<1>::random([c], Distribution::Uniform(lo, hi), device);
    BatchNorm {
        gamma: Param::from_tensor(r(0.5, 2.0)),
        beta: Param::from_tensor(r(-0.5, 0.5)),
        running_mean: RunningState::new(r(-0.2, 0.2)),
        running_var: RunningState::new(r(0.5, 2.0)),
        ..bn
    }
}

/// A QAT model with every supported layer; `quantized_output` puts a FakeQuant on the logits.
fn qat_model(device: &Device, quantized_output: bool) -> Sequential {
    let float = Sequential::new(vec![
        SeqLayer::Conv2d(
            Conv2dConfig::new([2, 6], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
        ),
        SeqLayer::BatchNorm(random_bn(6, device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::MaxPool2d(MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
        SeqLayer::Conv2d(
            Conv2dConfig::new([6, 6], [3, 3])
                .with_groups(3)
                .with_stride([2, 2])
                .with_dilation([1, 1])
                .init(device),
        ),
        SeqLayer::BatchNorm(random_bn(6, device)),
        SeqLayer::Relu6(Default::default()),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(6 * 2 * 2, 16).init(device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Linear(LinearConfig::new(16, 5).init(device)),
    ]);
    let act = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric());
    let mut m = float
        .fuse(&FusedConfig::new().with_output(Some(act.clone())))
        .unwrap();
    m.layers
        .insert(0, SeqLayer::FakeQuant(act.init(device).unwrap()));
    if quantized_output && let Some(SeqLayer::FusedLinear(last)) = m.layers.last_mut() {
        last.output = Some(act.init(device).unwrap().into());
    }
    m
}

fn calibrated(quantized_output: bool) -> (Sequential, Device) {
    let device = Device::flex().autodiff();
    device.seed(3);
    let model = qat_model(&device, quantized_output);
    for _ in 0..3 {
        let x = Tensor::<4>::random([8, 2, 10, 10], Distribution::Normal(0.0, 1.0), &device);
        let _ = model.forward(x);
    }
    (model.valid(), device)
}

#[test]
fn every_quantized_output_is_within_one_lsb_of_the_fake_quant_model() {
    let (model, _) = calibrated(true);
    let int = convert(&from_sequential(&model, &[1, 2, 10, 10]).unwrap()).unwrap();
    let plain = Device::flex();
    let x = Tensor::<4>::random([16, 2, 10, 10], Distribution::Normal(0.0, 1.5), &plain);
    let fq = values(model.forward(x.clone()));
    let (q, shape, act) = int
        .forward_int(&values(x))
        .unwrap()
        .expect("quantized output");
    assert_eq!(shape, vec![16, 5]);
    let mut exact = 0;
    for (i, (f, qi)) in fq.iter().zip(&q).enumerate() {
        let q_fq = (f / act.scale).round_ties_even() as i32 + act.zero_point;
        let d = (q_fq - *qi as i32).abs();
        assert!(d <= 1, "output {i}: fake-quant {q_fq}, integer {qi}");
        exact += usize::from(d == 0);
    }
    println!(
        "{exact} of {} outputs bit-exact, the rest within 1 LSB",
        q.len()
    );
}

#[test]
fn float_logits_match_and_predictions_agree() {
    let (model, _) = calibrated(false);
    let int = convert(&from_sequential(&model, &[1, 2, 10, 10]).unwrap()).unwrap();
    let plain = Device::flex();
    let x = Tensor::<4>::random([64, 2, 10, 10], Distribution::Normal(0.0, 1.5), &plain);
    let fq = values(model.forward(x.clone()));
    let (logits, shape) = int.forward(&values(x.clone())).unwrap();
    assert_eq!(shape, vec![64, 5]);
    let (reference, _) = int.forward_reference(&values(x)).unwrap();
    assert_eq!(
        logits, reference,
        "fast kernels must equal the scalar reference"
    );
    let span = fq.iter().fold(0f32, |a, v| a.max(v.abs()));
    let mut agree = 0;
    for r in 0..64 {
        let row = |v: &[f32]| {
            (0..5)
                .max_by(|a, b| v[r * 5 + a].total_cmp(&v[r * 5 + b]))
                .unwrap()
        };
        agree += usize::from(row(&fq) == row(&logits));
        for c in 0..5 {
            assert!(
                (fq[r * 5 + c] - logits[r * 5 + c]).abs() <= 0.02 * span,
                "logit {r},{c}: {} vs {}",
                fq[r * 5 + c],
                logits[r * 5 + c]
            );
        }
    }
    assert!(agree >= 63, "predictions agree on {agree}/64");
    assert!(int.parameter_bytes() > 0);
}

#[test]
fn unsupported_layers_and_unrepresentable_values_name_the_path() {
    let device = Device::flex();
    let float = Sequential::new(vec![
        SeqLayer::FakeQuant(
            FakeQuantConfig::new(QuantSpec::default())
                .init(&device)
                .unwrap()
                .set_range(&[-1.0], &[1.0])
                .unwrap(),
        ),
        SeqLayer::Conv2d(Conv2dConfig::new([1, 2], [3, 3]).init(&device)),
    ]);
    let err = from_sequential(&float, &[1, 1, 5, 5])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`layers.1` (Conv2d): an unfused layer"),
        "{err}"
    );
    let no_input = Sequential::new(vec![SeqLayer::Flatten(Default::default())]);
    let err = convert(&from_sequential(&no_input, &[1, 1, 5, 5]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("start the model with a FakeQuant"), "{err}");
    // A bias that overflows int32 in units of s_in * s_w.
    let lin = LinearConfig::new(2, 2).init(&device);
    let lin = burn::nn::Linear {
        bias: Some(Param::from_tensor(Tensor::from_floats([1e9, 0.0], &device))),
        ..lin
    };
    let model = Sequential::new(vec![
        SeqLayer::FakeQuant(
            FakeQuantConfig::new(QuantSpec::default())
                .init(&device)
                .unwrap()
                .set_range(&[-1e-3], &[1e-3])
                .unwrap(),
        ),
        SeqLayer::Linear(lin),
    ])
    .fuse(&FusedConfig::new())
    .unwrap();
    let err = convert(&from_sequential(&model, &[1, 2]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("`layers.1`: bias 1000000000 of channel 0")
            && err.contains("overflows int32"),
        "{err}"
    );
}

fn conv_case() -> impl Strategy<Value = (IntegerModel, Vec<f32>)> {
    // Channel counts on both sides of the fast path's choices (channel words need stride 1 and
    // a multiple of 4 or at least 16 channels per group), output channels across tile rows (8)
    // and images across tile columns (48 lanes), rectangular kernels, strides and padding.
    (
        (
            1usize..4,
            1usize..4,
            prop::sample::select(vec![1usize, 2, 3, 4, 5, 8, 16, 17]),
            1usize..20,
        ),
        (1usize..4, 1usize..4, 1usize..3, 1usize..3, 1usize..3),
        (
            proptest::array::uniform4(0usize..3),
            4usize..20,
            -128i32..128,
        ),
    )
        .prop_flat_map(
            |((n, g, cin_g, cout_g), (kh, kw, sh, sw, dil), (pad, hw, zp))| {
                let k = [kh, kw];
                let cin = g * cin_g;
                let cout = g * cout_g;
                let wlen = cout * cin_g * kh * kw;
                (
                    proptest::collection::vec(any::<i8>(), wlen),
                    proptest::collection::vec(-5000i32..5000, cout),
                    proptest::collection::vec(1e-4f64..0.05, cout),
                    proptest::collection::vec(-3.0f32..3.0, n * cin * hw * hw),
                    0..3,
                )
                    .prop_map(move |(weight, bias, mult, input, mode)| {
                        let input_q = Grid {
                            scale: 0.05,
                            zero_point: zp,
                            qmin: -128,
                            qmax: 127,
                        };
                        let out_q = Grid {
                            scale: 0.1,
                            zero_point: (-zp).min(127),
                            qmin: -128,
                            qmax: 127,
                        };
                        let output = match mode {
                            0 | 1 => Output::Quantized {
                                grid: out_q,
                                requant: mult.iter().map(|m| FixedMultiplier::new(*m)).collect(),
                                lo: if mode == 1 { out_q.zero_point } else { -128 },
                                hi: 127,
                            },
                            _ => Output::Float {
                                scale: mult.iter().map(|m| *m as f32).collect(),
                                lo: f32::MIN,
                                hi: f32::MAX,
                            },
                        };
                        let conv = IntConv2d {
                            in_channels: cin,
                            out_channels: cout,
                            groups: g,
                            kernel: k,
                            stride: [sh, sw],
                            dilation: [dil, dil],
                            padding: pad,
                            weight,
                            weight_bits: 8,
                            weight_scale: vec![0.01; cout],
                            bias,
                            input: input_q,
                            output,
                        };
                        let len = |pad: usize, k: usize, s: usize| {
                            (hw + pad > dil * (k - 1))
                                .then(|| (hw + pad - dil * (k - 1) - 1) / s + 1)
                        };
                        let (oh, ow) = (len(pad[0] + pad[1], kh, sh), len(pad[2] + pad[3], kw, sw));
                        let fits = oh.is_some() && ow.is_some();
                        let out = [cout, oh.unwrap_or(0), ow.unwrap_or(0)];
                        let model = single_op(&[cin, hw, hw], input_q, IntOp::Conv2d(conv), &out);
                        (model, input, fits)
                    })
            },
        )
        .prop_filter("kernel fits", |(_, _, fits)| *fits)
        .prop_map(|(m, x, _)| (m, x))
}

/// `input -> Quantize(input_q) -> op` with output shape `out` (batch excluded).
fn single_op(input: &[usize], input_q: Grid, op: IntOp, out: &[usize]) -> IntegerModel {
    chain(input, input_q, vec![(op, out.to_vec())])
}

/// `input -> Quantize(input_q) -> ops[0] -> ops[1] -> ..`, each op with its output shape
/// (batch excluded); a max pooling keeps its input's grid.
fn chain(input: &[usize], input_q: Grid, ops: Vec<(IntOp, Vec<usize>)>) -> IntegerModel {
    let dims = |s: &[usize]| -> Vec<Dim> {
        std::iter::once(Dim::Batch(1))
            .chain(s.iter().map(|d| Dim::Fixed(*d)))
            .collect()
    };
    let node = |name: String, op, inputs, shape, grid| IntNode {
        name,
        op,
        inputs,
        shape,
        grid,
    };
    let mut nodes = vec![
        node("input".into(), IntOp::Input, vec![], dims(input), None),
        node(
            "quant".into(),
            IntOp::Quantize(input_q),
            vec![0],
            dims(input),
            Some(input_q),
        ),
    ];
    let mut grid = Some(input_q);
    for (k, (op, out)) in ops.into_iter().enumerate() {
        grid = match &op {
            IntOp::Conv2d(c) => c.output.grid(),
            IntOp::Linear(l) => l.output.grid(),
            IntOp::MaxPool(_) => grid,
            _ => None,
        };
        nodes.push(node(format!("op{k}"), op, vec![k + 1], dims(&out), grid));
    }
    let output = nodes.len() - 1;
    IntegerModel::new(nodes, output)
}

/// The 8-bit grid of the hand-built layers below (scale 0.05).
fn grid8(zero_point: i32) -> Grid {
    Grid {
        scale: 0.05,
        zero_point,
        qmin: -128,
        qmax: 127,
    }
}

/// A quantized output on `grid8(zero_point)`, channel `i` with multiplier `m(i)`.
fn quantized(zero_point: i32, channels: usize, m: impl Fn(usize) -> f64) -> Output {
    Output::Quantized {
        grid: grid8(zero_point),
        requant: (0..channels).map(|i| FixedMultiplier::new(m(i))).collect(),
        lo: -128,
        hi: 127,
    }
}

/// A convolution `cin -> cout` with `kernel`, these weights and biases, its input on
/// `grid8(input_zp)`: groups, stride and dilation 1, padding 1 (others by struct update).
fn conv_layer(
    [cin, cout]: [usize; 2],
    kernel: [usize; 2],
    weight: Vec<i8>,
    bias: Vec<i32>,
    input_zp: i32,
    output: Output,
) -> IntConv2d {
    IntConv2d {
        in_channels: cin,
        out_channels: cout,
        groups: 1,
        kernel,
        stride: [1, 1],
        dilation: [1, 1],
        padding: [1; 4],
        weight,
        weight_bits: 8,
        weight_scale: vec![0.01; cout],
        bias,
        input: grid8(input_zp),
        output,
    }
}

/// A random integer linear layer (batch 1 takes the GEMV path, larger batches packed weights).
fn linear_case() -> impl Strategy<Value = (IntegerModel, Vec<f32>)> {
    // Rows across tile rows (8), outputs across one-row tiles (128 lanes).
    (1usize..20, 1usize..70, 1usize..150, -128i32..128).prop_flat_map(|(n, fin, fout, zp)| {
        (
            proptest::collection::vec(any::<i8>(), fin * fout),
            proptest::collection::vec(-5000i32..5000, fout),
            proptest::collection::vec(1e-4f64..0.05, fout),
            proptest::collection::vec(-3.0f32..3.0, n * fin),
            any::<bool>(),
        )
            .prop_map(move |(weight, bias, mult, input, float)| {
                let input_q = Grid {
                    scale: 0.05,
                    zero_point: zp,
                    qmin: -128,
                    qmax: 127,
                };
                let output = if float {
                    Output::Float {
                        scale: mult.iter().map(|m| *m as f32).collect(),
                        lo: f32::MIN,
                        hi: f32::MAX,
                    }
                } else {
                    Output::Quantized {
                        grid: Grid {
                            scale: 0.1,
                            zero_point: 3,
                            qmin: -128,
                            qmax: 127,
                        },
                        requant: mult.iter().map(|m| FixedMultiplier::new(*m)).collect(),
                        lo: -128,
                        hi: 127,
                    }
                };
                let linear = IntLinear {
                    in_features: fin,
                    out_features: fout,
                    weight,
                    weight_bits: 8,
                    weight_scale: vec![0.01; fout],
                    bias,
                    input: input_q,
                    output,
                };
                let model = single_op(&[fin], input_q, IntOp::Linear(linear), &[fout]);
                (model, input)
            })
    })
}

/// The instruction sets of the integer kernels this machine runs; the others are named on
/// stderr once per process (uncaptured), with the reason. Callers force each in turn with
/// `kernels::force_isa`, whose guard keeps other tests from switching it meanwhile.
fn isas() -> Vec<Isa> {
    static REPORT: std::sync::Once = std::sync::Once::new();
    REPORT.call_once(|| {
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        for (isa, why) in kernels::unavailable() {
            let _ = writeln!(err, "integer tests: SKIPPED {isa}: {why}");
        }
    });
    kernels::available()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn fast_conv_equals_scalar_reference((model, input) in conv_case()) {
        let reference = model.forward_reference(&input).unwrap();
        // Every implementation of the integer product; the weights packed by the first run
        // serve all of them.
        for isa in isas() {
            let _isa = kernels::force_isa(isa).unwrap();
            prop_assert_eq!(&model.forward(&input).unwrap(), &reference, "{}", isa);
        }
    }

    #[test]
    fn fast_linear_equals_scalar_reference((model, input) in linear_case()) {
        let reference = model.forward_reference(&input).unwrap();
        for isa in isas() {
            let _isa = kernels::force_isa(isa).unwrap();
            prop_assert_eq!(&model.forward(&input).unwrap(), &reference, "{}", isa);
            prop_assert_eq!(&model.forward(&input[..model.input_shape()[0]]).unwrap().0[..], &reference.0[..reference.0.len() / reference.1[0]], "{}", isa);
        }
    }
}

#[test]
fn bad_inputs_and_hand_edited_models_are_errors() {
    use burn_qat::export::RunError;
    let (model, _) = calibrated(false);
    let int = convert(&from_sequential(&model, &[1, 2, 10, 10]).unwrap()).unwrap();
    let err = int.forward(&[0.0; 199]).unwrap_err();
    assert_eq!(
        err,
        RunError::Input {
            len: 199,
            input_shape: vec![2, 10, 10]
        }
    );
    assert!(err.to_string().contains("199 values"), "{err}");
    assert_eq!(int.forward(&[]).unwrap().0, Vec::<f32>::new());
    let mut edited = int.clone();
    if let Some(IntOp::Conv2d(c)) = edited
        .nodes
        .iter_mut()
        .map(|n| &mut n.op)
        .find(|o| o.kind() == "Conv2d")
    {
        c.weight.pop();
    }
    let err = edited.forward(&[0.0; 200]).unwrap_err();
    assert!(
        matches!(&err, RunError::Model(m) if m.what.contains("weights for")),
        "{err}"
    );
}

#[test]
fn file_round_trip_and_damaged_files() {
    use burn_qat::export::format;
    let (model, _) = calibrated(false);
    let int = convert(&from_sequential(&model, &[1, 2, 10, 10]).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bqi");
    format::save(&int, &path).unwrap();
    let loaded = format::load(&path).unwrap();
    let x: Vec<f32> = (0..2 * 2 * 10 * 10)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    assert_eq!(loaded.forward(&x).unwrap(), int.forward(&x).unwrap());
    let bytes = std::fs::read(&path).unwrap();
    // Truncated anywhere: an error.
    for cut in [0, 5, 23, 24, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            format::from_bytes(&bytes[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    // Any flipped payload byte: checksum error.
    for at in [24, bytes.len() / 2, bytes.len() - 1] {
        let mut b = bytes.clone();
        b[at] ^= 0x55;
        let err = format::from_bytes(&b).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
    // A header announcing a huge payload: an error, no allocation of that size.
    let mut b = bytes.clone();
    b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(
        format::from_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("announces")
    );
    let mut b = bytes.clone();
    b[8..12].copy_from_slice(&7u32.to_le_bytes());
    assert!(
        format::from_bytes(&b)
            .unwrap_err()
            .to_string()
            .contains("version 7")
    );
    assert!(
        format::from_bytes(b"PNG\x89 definitely not a model file")
            .unwrap_err()
            .to_string()
            .contains("wrong magic")
    );
    // A well-formed file whose layers do not fit together: rejected at load.
    let mut crafted = int.clone();
    crafted.nodes[0].shape[1] = Dim::Fixed(3);
    let err = format::from_bytes(&format::to_bytes(&crafted))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("computes shape [1, 3, 10, 10] at batch 1, declares [1, 2, 10, 10]"),
        "{err}"
    );
}

#[test]
fn residual_add_is_within_one_lsb_and_round_trips() {
    use burn_qat::transform::{Activation, Residual};
    let device = Device::flex().autodiff();
    device.seed(8);
    let body = Sequential::new(vec![
        SeqLayer::Conv2d(
            Conv2dConfig::new([4, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device),
        ),
        SeqLayer::BatchNorm(random_bn(4, &device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Conv2d(
            Conv2dConfig::new([4, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device),
        ),
    ]);
    let float = Sequential::new(vec![
        SeqLayer::Conv2d(Conv2dConfig::new([1, 4], [3, 3]).init(&device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Residual(Residual::new(body, Activation::Relu)),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(4 * 6 * 6, 3).init(&device)),
    ]);
    let act = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric());
    let mut model = float
        .fuse(&FusedConfig::new().with_output(Some(act.clone())))
        .unwrap();
    model
        .layers
        .insert(0, SeqLayer::FakeQuant(act.init(&device).unwrap()));
    if let Some(SeqLayer::FusedLinear(last)) = model.layers.last_mut() {
        last.output = Some(act.init(&device).unwrap().into());
    }
    assert_eq!(
        model.describe()[2],
        "Residual[FusedConv2d(BatchNorm, Relu) -> FusedConv2d] + Add(Relu)"
    );
    for _ in 0..3 {
        let _ = model.forward(Tensor::<4>::random(
            [8, 1, 8, 8],
            Distribution::Normal(0.0, 1.0),
            &device,
        ));
    }
    let model = model.valid();
    let int = convert(&from_sequential(&model, &[1, 1, 8, 8]).unwrap()).unwrap();
    let x = Tensor::<4>::random(
        [32, 1, 8, 8],
        Distribution::Normal(0.0, 1.0),
        &Device::flex(),
    );
    let fq = values(model.forward(x.clone()));
    let (q, _, a) = int.forward_int(&values(x.clone())).unwrap().unwrap();
    for (i, (f, qi)) in fq.iter().zip(&q).enumerate() {
        let q_fq = (f / a.scale).round_ties_even() as i32 + a.zero_point;
        assert!(
            (q_fq - *qi as i32).abs() <= 1,
            "output {i}: fake-quant {q_fq}, integer {qi}"
        );
    }
    let bytes = burn_qat::export::format::to_bytes(&int);
    let back = burn_qat::export::format::from_bytes(&bytes).unwrap();
    assert_eq!(
        back.forward(&values(x.clone())).unwrap(),
        int.forward(&values(x)).unwrap()
    );
}

/// Calibrates `float` fused for QAT (input FakeQuant, quantized logits), converts it, and
/// checks every output within 1 LSB of the fake-quant model, plus the file round trip.
fn check_within_one_lsb<const D: usize>(
    float: Sequential,
    input: [usize; D],
    wrap: fn(Tensor<D>) -> burn_qat::transform::Flow,
) {
    let device = Device::flex().autodiff();
    let seed: u64 = std::env::var("BURN_QAT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(17);
    device.seed(seed);
    Device::flex().seed(seed);
    let act = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric());
    let mut model = float
        .fuse(&FusedConfig::new().with_output(Some(act.clone())))
        .unwrap();
    model
        .layers
        .insert(0, SeqLayer::FakeQuant(act.init(&device).unwrap()));
    if let Some(SeqLayer::FusedLinear(last)) = model.layers.last_mut() {
        last.output = Some(act.init(&device).unwrap().into());
    }
    for _ in 0..3 {
        let _ = model.forward_flow(wrap(Tensor::<D>::random(
            input,
            Distribution::Normal(0.0, 1.0),
            &device,
        )));
    }
    let model = model.valid();
    let int = convert(&from_sequential(&model, &input).unwrap()).unwrap();
    let x = Tensor::<D>::random(input, Distribution::Normal(0.0, 1.0), &Device::flex());
    let fq = match model.forward_flow(wrap(x.clone())) {
        burn_qat::transform::Flow::Features(t) => values(t),
        _ => panic!("features expected"),
    };
    let xs = values(x);
    let (q, _, a) = int.forward_int(&xs).unwrap().unwrap();
    for (i, (f, qi)) in fq.iter().zip(&q).enumerate() {
        let q_fq = (f / a.scale).round_ties_even() as i32 + a.zero_point;
        assert!(
            (q_fq - *qi as i32).abs() <= 1,
            "seed {seed}: output {i}: fake-quant {q_fq}, integer {qi}"
        );
    }
    let back =
        burn_qat::export::format::from_bytes(&burn_qat::export::format::to_bytes(&int)).unwrap();
    assert_eq!(back.forward(&xs).unwrap(), int.forward(&xs).unwrap());
    assert_eq!(
        int.forward(&xs).unwrap(),
        int.forward_reference(&xs).unwrap()
    );
}

#[test]
fn conv1d_model_is_within_one_lsb() {
    use burn::nn::PaddingConfig1d;
    use burn::nn::conv::Conv1dConfig;
    let device = Device::flex().autodiff();
    device.seed(9);
    let conv1d = Sequential::new(vec![
        SeqLayer::Conv1d(
            Conv1dConfig::new(2, 4, 3)
                .with_stride(2)
                .with_padding(PaddingConfig1d::Explicit(1, 1))
                .init(&device),
        ),
        SeqLayer::BatchNorm(random_bn(4, &device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::Conv1d(
            Conv1dConfig::new(4, 4, 3)
                .with_groups(2)
                .with_dilation(2)
                .init(&device),
        ),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(4 * 4, 3).init(&device)),
    ]);
    check_within_one_lsb(conv1d, [16, 2, 16], burn_qat::transform::Flow::Sequence);
}

#[test]
fn avg_pool_model_is_within_one_lsb() {
    use burn::nn::pool::AvgPool2dConfig;
    let device = Device::flex().autodiff();
    device.seed(9);
    let avg = Sequential::new(vec![
        SeqLayer::Conv2d(Conv2dConfig::new([1, 3], [3, 3]).init(&device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::AvgPool2d(AvgPool2dConfig::new([2, 2]).with_strides([2, 2]).init()),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(3 * 4 * 4, 3).init(&device)),
    ]);
    check_within_one_lsb(avg, [16, 1, 10, 10], burn_qat::transform::Flow::Images);
}

#[test]
fn onnx_export_writes_a_qdq_graph_and_fails_cleanly() {
    use burn_qat::onnx::{OnnxOptions, decode_model, save, to_model_proto};
    let (model, _) = calibrated(false);
    let int = convert(&from_sequential(&model, &[1, 2, 10, 10]).unwrap()).unwrap();
    let proto = to_model_proto(&int, &OnnxOptions::default()).unwrap();
    let ops: Vec<String> = proto
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type.clone().unwrap())
        .collect();
    for op in [
        "QuantizeLinear",
        "DequantizeLinear",
        "Conv",
        "MaxPool",
        "Reshape",
        "Gemm",
    ] {
        assert!(ops.iter().any(|o| o == op), "{op} missing from {ops:?}");
    }
    // Every Conv/Gemm input is a DequantizeLinear output (QDQ form).
    let graph = proto.graph.as_ref().unwrap();
    let produced_by = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
            .and_then(|n| n.op_type.clone())
    };
    for n in graph
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_deref(), Some("Conv") | Some("Gemm")))
    {
        for input in &n.input {
            assert_eq!(
                produced_by(input).as_deref(),
                Some("DequantizeLinear"),
                "{:?} input {input}",
                n.op_type
            );
        }
    }
    assert_eq!(proto.opset_import[0].version, Some(13));
    let err = to_model_proto(&int, &OnnxOptions { opset: 7 })
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "invalid ONNX export option: `opset` is 7, allowed: 13 or 21"
    );
    // Saving into a missing directory fails and leaves nothing behind.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("model.onnx");
    assert!(save(&int, &path, &OnnxOptions::default()).is_err());
    assert!(!path.exists());
    let ok = dir.path().join("model.onnx");
    save(&int, &ok, &OnnxOptions { opset: 21 }).unwrap();
    let back = decode_model(&std::fs::read(&ok).unwrap()).unwrap();
    assert_eq!(back.opset_import[0].version, Some(21));
}

/// Layers large enough that one image (or one row) is split across threads, on both
/// implementations of the integer product: equal to the scalar reference.
#[test]
fn large_layers_split_across_threads_equal_scalar_reference() {
    let mut r = burn_qat_tests::uniform(17);
    let mut bytes = |n: usize| -> Vec<i8> { (0..n).map(|_| (r() * 127.0) as i8).collect() };
    let multiplier = |i: usize| 0.0002 + i as f64 * 1e-5;
    let (cin, cout, hw) = (16, 40, 24);
    let conv = conv_layer(
        [cin, cout],
        [3, 3],
        bytes(cout * cin * 9),
        (0..cout as i32).map(|i| i * 37 - 700).collect(),
        7,
        quantized(-5, cout, multiplier),
    );
    let conv = single_op(
        &[cin, hw, hw],
        grid8(7),
        IntOp::Conv2d(conv),
        &[cout, hw, hw],
    );
    let (fin, fout) = (700, 500);
    let linear = IntLinear {
        in_features: fin,
        out_features: fout,
        weight: bytes(fin * fout),
        weight_bits: 8,
        weight_scale: vec![0.01; fout],
        bias: (0..fout as i32).map(|i| 400 - i * 3).collect(),
        input: grid8(-20),
        output: quantized(-5, fout, multiplier),
    };
    let linear = single_op(&[fin], grid8(-20), IntOp::Linear(linear), &[fout]);
    let mut r = burn_qat_tests::uniform(3);
    let mut input = |n: usize| -> Vec<f32> { (0..n).map(|_| r() * 6.0).collect() };
    let cases = [
        (&conv, input(cin * hw * hw)),
        (&conv, input(3 * cin * hw * hw)),
        (&linear, input(fin)),
        (&linear, input(37 * fin)),
    ];
    for isa in isas() {
        let _isa = kernels::force_isa(isa).unwrap();
        for (model, x) in &cases {
            let reference = model.forward_reference(x).unwrap();
            assert_eq!(model.forward(x).unwrap(), reference, "{isa}");
        }
    }
}

/// Forwards from several threads at once (they share the integer runtime's workers, or run
/// alone while another holds them), at batch sizes that split images, rows and channels
/// differently: every result equals the scalar reference.
#[test]
fn concurrent_forwards_equal_scalar_reference() {
    let mut r = burn_qat_tests::uniform(29);
    let (cin, cout, hw) = (8, 24, 12);
    let conv = conv_layer(
        [cin, cout],
        [3, 3],
        (0..cout * cin * 9).map(|_| (r() * 127.0) as i8).collect(),
        (0..cout as i32).map(|i| i * 13 - 100).collect(),
        3,
        quantized(-2, cout, |_| 0.003),
    );
    let model = single_op(
        &[cin, hw, hw],
        grid8(3),
        IntOp::Conv2d(conv),
        &[cout, hw, hw],
    );
    let cases: Vec<(Vec<f32>, _)> = [1usize, 2, 5, 17]
        .iter()
        .map(|n| {
            let x: Vec<f32> = (0..n * cin * hw * hw).map(|_| r() * 4.0).collect();
            let want = model.forward_reference(&x).unwrap();
            (x, want)
        })
        .collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (model, cases) = (&model, &cases);
            s.spawn(move || {
                for i in 0..40 {
                    let (x, want) = &cases[(t + i) % cases.len()];
                    assert_eq!(&model.forward(x).unwrap(), want, "thread {t} call {i}");
                }
            });
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// A convolution read only by a max pooling runs fused with it (pooled while in cache):
    /// equal to the scalar reference, which runs them one after the other.
    #[test]
    fn fused_conv_max_pool_equals_scalar_reference(
        (n, cin, cout, hw) in (1usize..4, 1usize..9, 1usize..20, 6usize..16),
        (k, pk, ps) in (1usize..4, 1usize..4, 1usize..3),
        seed in any::<u64>(),
    ) {
        let mut r = burn_qat_tests::uniform(seed);
        let conv = conv_layer(
            [cin, cout],
            [k, k],
            (0..cout * cin * k * k).map(|_| (r() * 127.0) as i8).collect(),
            (0..cout).map(|_| (r() * 2000.0) as i32).collect(),
            4,
            quantized(-7, cout, |i| 0.002 + i as f64 * 1e-4),
        );
        let side = hw + 2 - k + 1;
        prop_assume!(side >= pk);
        let pooled = (side - pk) / ps + 1;
        let window = Window { kernel: [pk, pk], stride: [ps, ps], padding: [0; 4], dilation: [1, 1] };
        let model = chain(&[cin, hw, hw], grid8(4), vec![
            (IntOp::Conv2d(conv), vec![cout, side, side]),
            (IntOp::MaxPool(window), vec![cout, pooled, pooled]),
        ]);
        let x: Vec<f32> = (0..n * cin * hw * hw).map(|_| r() * 4.0).collect();
        let reference = model.forward_reference(&x).unwrap();
        prop_assert_eq!(&model.forward(&x).unwrap(), &reference);
        prop_assert_eq!(&model.forward(&x[..cin * hw * hw]).unwrap().0[..], &reference.0[..reference.0.len() / n]);
    }
}

/// Strides far beyond the image and dilations that leave one output column run (they used to
/// allocate by stride, gigabytes to an abort, or compute the dilated kernel's whole span per
/// output) and equal the reference.
#[test]
fn huge_strides_and_dilations_run_and_equal_the_reference() {
    let conv = |cin: usize, cout: usize, kernel: [usize; 2], stride, dilation| IntConv2d {
        stride,
        dilation,
        padding: [0; 4],
        ..conv_layer(
            [cin, cout],
            kernel,
            (0..cout * cin * kernel[0] * kernel[1])
                .map(|i| (i * 37 % 251) as i8)
                .collect(),
            vec![17; cout],
            2,
            quantized(-1, cout, |_| 0.004),
        )
    };
    let cases = [
        (
            conv(8, 8, [1, 1], [1 << 20, 1 << 20], [1, 1]),
            [8, 8, 8],
            [8, 1, 1],
        ),
        (
            conv(1, 4, [2, 2], [1 << 31, 1 << 31], [1, 1]),
            [1, 8, 8],
            [4, 1, 1],
        ),
        (
            conv(16, 32, [1, 2], [1, 1], [1, 4095]),
            [16, 1, 4096],
            [32, 1, 1],
        ),
        (
            conv(3, 8, [1, 2], [1, 1], [1, 999]),
            [3, 2, 1000],
            [8, 2, 1],
        ),
    ];
    for (c, input, out) in cases {
        let model = single_op(&input, grid8(2), IntOp::Conv2d(c), &out);
        let x: Vec<f32> = (0..input.iter().product::<usize>())
            .map(|i| (i % 97) as f32 / 20.0 - 2.0)
            .collect();
        let reference = model.forward_reference(&x).unwrap();
        for isa in isas() {
            let _isa = kernels::force_isa(isa).unwrap();
            assert_eq!(
                model.forward(&x).unwrap(),
                reference,
                "{isa}: {input:?} -> {out:?}"
            );
        }
    }
}

/// Depthwise layers (the direct kernel of every instruction set, its portable one where a
/// shape does not fit the vector one) over kernels, strides, dilations and padding: equal to
/// the scalar reference.
#[test]
fn depthwise_layers_equal_scalar_reference() {
    let mut r = burn_qat_tests::uniform(41);
    for (kernel, stride, dilation, pad) in [
        ([3, 3], 1, 1, 1),
        ([3, 3], 2, 1, 1),
        ([5, 5], 1, 2, 2),
        ([1, 7], 3, 1, 0),
        ([3, 3], 2, 3, 0),
    ] {
        for isa in isas() {
            let _isa = kernels::force_isa(isa).unwrap();
            let (c, hw) = (20, 23);
            let conv = IntConv2d {
                groups: c,
                stride: [stride, stride],
                dilation: [dilation, dilation],
                padding: [pad; 4],
                ..conv_layer(
                    [c, c],
                    kernel,
                    (0..c * kernel[0] * kernel[1])
                        .map(|_| (r() * 127.0) as i8)
                        .collect(),
                    (0..c).map(|_| (r() * 3000.0) as i32).collect(),
                    -9,
                    quantized(4, c, |i| 0.003 + i as f64 * 1e-4),
                )
            };
            let len = |k: usize| (hw + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
            let out = [c, len(kernel[0]), len(kernel[1])];
            let model = single_op(&[c, hw, hw], grid8(-9), IntOp::Conv2d(conv), &out);
            for n in [1usize, 3] {
                let x: Vec<f32> = (0..n * c * hw * hw).map(|_| r() * 5.0).collect();
                let reference = model.forward_reference(&x).unwrap();
                assert_eq!(
                    model.forward(&x).unwrap(),
                    reference,
                    "{kernel:?} stride {stride} dilation {dilation} pad {pad} {isa}"
                );
            }
        }
    }
}

/// A `Sequential` with ceil-mode max pooling (2x2, stride 2 on 5x5: the last window of each axis
/// holds one column or row of the input) lowers with Burn's output size and converts within
/// 1 LSB of the fake-quant model.
#[test]
fn sequential_ceil_mode_max_pooling_converts() {
    let device = Device::flex().autodiff();
    device.seed(4);
    let float = Sequential::new(vec![
        SeqLayer::Conv2d(Conv2dConfig::new([2, 4], [3, 3]).init(&device)),
        SeqLayer::Relu(Relu::new()),
        SeqLayer::MaxPool2d(
            MaxPool2dConfig::new([2, 2])
                .with_strides([2, 2])
                .with_ceil_mode(true)
                .init(),
        ),
        SeqLayer::Flatten(Default::default()),
        SeqLayer::Linear(LinearConfig::new(4 * 3 * 3, 5).init(&device)),
    ]);
    let act = FakeQuantConfig::new(QuantSpec::int8_act_per_tensor_asymmetric());
    let mut model = float
        .fuse(&FusedConfig::new().with_output(Some(act.clone())))
        .unwrap();
    model
        .layers
        .insert(0, SeqLayer::FakeQuant(act.init(&device).unwrap()));
    if let Some(SeqLayer::FusedLinear(last)) = model.layers.last_mut() {
        last.output = Some(act.init(&device).unwrap().into());
    }
    for _ in 0..3 {
        let x = Tensor::<4>::random([8, 2, 7, 7], Distribution::Normal(0.0, 1.0), &device);
        let _ = model.forward(x);
    }
    let model = model.valid();
    let graph = from_sequential(&model, &[1, 2, 7, 7]).unwrap();
    let int = convert(&graph).unwrap();
    let pool = int
        .nodes
        .iter()
        .find_map(|n| match &n.op {
            IntOp::MaxPool(w) => Some(*w),
            _ => None,
        })
        .expect("a max pooling");
    assert_eq!(pool.padding, [0, 1, 0, 1], "ceil mode as end padding");
    let x = Tensor::<4>::random(
        [16, 2, 7, 7],
        Distribution::Normal(0.0, 1.5),
        &Device::flex(),
    );
    let fq = values(model.forward(x.clone()));
    let pixels = values(x);
    assert_eq!(
        int.forward(&pixels).unwrap(),
        int.forward_reference(&pixels).unwrap()
    );
    let (q, shape, act) = int.forward_int(&pixels).unwrap().expect("quantized output");
    assert_eq!(shape, vec![16, 5]);
    for (i, (f, qi)) in fq.iter().zip(&q).enumerate() {
        let d = (act.quantize(*f) - *qi as i32).abs();
        assert!(
            d <= 1,
            "output {i}: fake-quant {}, integer {qi}",
            act.quantize(*f)
        );
    }
}
