//! Issue 33, class 5: edges. Fake quantization at `+-f32::MAX` saturates instead of overflowing
//! (reference, tensor path, kernels), checked loading refuses ranges that exclude 0, and the
//! NaN contract of the QAT and integer models. One regression test per finding; learned ranges
//! at the f32 edges (class 4) are in `learned.rs` (`f32_edges`); the integer model's mutation
//! harness and its findings are in `hostile.rs`.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn_qat::core::reference::{self, saturate};
use burn_qat::core::tensor as qt;
use burn_qat::graph;
use burn_qat::model::QatConfig;
use burn_qat::nn::tree;
use burn_qat::{
    FakeQuant, FakeQuantConfig, QParams, QatError, QuantSpec, RoundingMode, qparams_from_range,
};

const MAX: f32 = f32::MAX;

/// Finite values at the edges of `f32` and ordinary ones.
const EDGES: [f32; 16] = [
    MAX,
    -MAX,
    3.4e38,
    -3.4e38,
    3e38,
    -3e38,
    1e38,
    -1e38,
    1e-45,
    -1e-45,
    1e-40,
    f32::MIN_POSITIVE,
    0.0,
    -0.0,
    1.0,
    -0.3,
];

fn flex() -> Device {
    burn_qat::backend::device("flex").unwrap()
}

/// Every valid spec of 2 to 8 bits (signed or not, symmetric or not, narrow or not, both
/// roundings).
fn specs() -> Vec<QuantSpec> {
    let mut out = vec![];
    for bits in 2..=8 {
        for flags in 0..16u32 {
            let spec = QuantSpec::act_per_tensor_asymmetric(bits)
                .with_signed(flags & 1 != 0)
                .with_symmetric(flags & 2 != 0)
                .with_narrow_range(flags & 4 != 0)
                .with_rounding(if flags & 8 != 0 {
                    RoundingMode::TfHalfUp
                } else {
                    RoundingMode::HalfToEven
                });
            if spec.validate().is_ok() {
                out.push(spec);
            }
        }
    }
    out
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// The finding: `[-f32::MAX, 1e-45]` on 4 unsigned bits has the step `f32::MAX / 15` (rounded
/// up) and zero point 15, so `-f32::MAX`, quantized to 0, dequantized as `-15 * step`, which
/// overflowed to -inf. Outputs now saturate at `+-f32::MAX`: in the reference, `dequantize`
/// and the tensor path (fused, composed, per tensor), for every edge input, every range made
/// of edge values and every spec.
#[test]
fn fake_quant_saturates_at_f32_max_instead_of_overflowing() {
    let u4 = QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4);
    let qp = qparams_from_range(-MAX, 1e-45, &u4);
    assert_eq!(qp.zero_point, 15, "{qp:?}");
    assert_eq!(reference::fake_quant(-MAX, qp, &u4), -MAX);
    assert_eq!(reference::dequantize(0, qp), -MAX);
    assert_eq!(saturate(f32::INFINITY), MAX);
    assert!(saturate(f32::NAN).is_nan());

    let device = flex();
    let x = Tensor::<1>::from_floats(EDGES, &device);
    let mut checked = 0;
    for spec in specs() {
        for lo in EDGES {
            for hi in EDGES {
                let qp = qparams_from_range(lo, hi, &spec);
                let want: Vec<f32> = EDGES
                    .iter()
                    .map(|&v| reference::fake_quant(v, qp, &spec))
                    .collect();
                let ctx = format!("{spec} [{lo:e}, {hi:e}] {qp:?}");
                assert!(want.iter().all(|v| v.is_finite()), "{ctx}: {want:?}");
                for q in spec.qmin()..=spec.qmax() {
                    assert!(reference::dequantize(q, qp).is_finite(), "{ctx}: q = {q}");
                }
                let (s, z) = (
                    Tensor::<1>::from_floats([qp.scale], &device),
                    Tensor::<1>::from_floats([qp.zero_point as f32], &device),
                );
                let paths = [
                    (
                        "fused",
                        qt::fake_quant(x.clone(), s.clone(), z.clone(), &spec),
                    ),
                    ("composed", qt::fake_quant_composed(x.clone(), s, z, &spec)),
                    (
                        "per tensor",
                        qt::fake_quant_per_tensor(x.clone(), qp, &spec),
                    ),
                ];
                for (path, y) in paths {
                    let got = values(y);
                    let same = got.iter().zip(&want).all(|(g, w)| g == w);
                    assert!(same, "{ctx} {path}: {got:?}, reference {want:?}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000, "{checked}");
}

#[derive(Module, Debug)]
struct Holder {
    act: FakeQuant,
}

fn holder(device: &Device) -> Holder {
    Holder {
        act: FakeQuantConfig::new(QuantSpec::default())
            .init(device)
            .unwrap(),
    }
}

/// Ranges always contain 0 (`min <= 0 <= max`, as every observer records them): a hand-edited
/// record with `min = 3.4e38` (or `max = -1`) is refused, naming the quantizer's path, the
/// field and the value, where it used to load and break that rule.
#[test]
fn a_record_whose_range_excludes_zero_is_refused() {
    let device = flex();
    let observed = || Holder {
        act: holder(&device).act.set_range(&[-1.0], &[1.0]).unwrap(),
    };
    for (field, bad, shown) in [("min", 3.4e38f32, "3.4e38"), ("max", -1.0, "-1.0")] {
        // Written past `set_range`, as a hand-edited record would be.
        let poisoned = tree::fill(observed(), |at| {
            at.is(FakeQuant::TYPE, field).then_some(bad)
        });
        let err = burn_qat::load_record(holder(&device), poisoned.into_record()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, QatError::Record { .. }), "{msg}");
        for part in ["`act`".to_string(), format!("`{field}`"), shown.to_string()] {
            assert!(msg.contains(&part), "{msg} does not name {part}");
        }
    }
    // The honest record loads.
    let loaded = burn_qat::load_record(holder(&device), observed().into_record()).unwrap();
    assert_eq!(loaded.act.observed_range(), Some((vec![-1.0], vec![1.0])));
}

#[derive(Module, Debug)]
struct Affine {
    fc: Linear,
}

/// The NaN contract. The QAT model propagates NaN (fake quantization of NaN is NaN); the
/// integer model cannot represent NaN: its input quantization maps a NaN input to the input
/// grid's zero point, i.e. it computes as if the value were 0.0, and its outputs stay finite.
/// Infinities saturate to the ends of the input grid in both models.
#[test]
fn nan_inputs_read_as_zero_in_the_integer_model_and_stay_nan_in_the_qat_model() {
    let device = flex().autodiff();
    let model = Affine {
        fc: LinearConfig::new(4, 2).init(&device),
    };
    let qat = graph::prepare(
        &model,
        &[1, 4],
        |m: &Affine, x: Tensor<2>| m.fc.forward(x),
        &QatConfig::new(),
    )
    .unwrap();
    let _: Tensor<2> =
        qat.forward(Tensor::<1>::from_floats([-1.0, 1.0, 0.5, -0.5], &device).reshape([1, 4]));
    let qat = qat.valid();
    let int8 = burn_qat::export::convert(&qat).unwrap();
    let run = |x: [f32; 4]| int8.forward(&x).unwrap().0;
    let with_nan = run([0.5, f32::NAN, -0.25, 1.0]);
    assert_eq!(with_nan, run([0.5, 0.0, -0.25, 1.0]));
    assert!(with_nan.iter().all(|v| v.is_finite()), "{with_nan:?}");
    assert_eq!(run([f32::INFINITY; 4]), run([1e30; 4]));
    assert_eq!(run([f32::NEG_INFINITY; 4]), run([-1e30; 4]));

    let inner = flex();
    let qat_run = |x: [f32; 4]| -> Vec<f32> {
        let y: Tensor<2> = qat.forward(Tensor::<1>::from_floats(x, &inner).reshape([1, 4]));
        values(y)
    };
    let y = qat_run([0.5, f32::NAN, -0.25, 1.0]);
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    let y = qat_run([f32::INFINITY; 4]);
    assert_eq!(y, qat_run([1e30; 4]));
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    // The scalar reference says the same: NaN quantizes to the zero point, fake-quantizes to NaN.
    let qp = QParams {
        scale: 0.5,
        zero_point: 3,
    };
    assert_eq!(reference::quantize(f32::NAN, qp, &QuantSpec::default()), 3);
    assert!(reference::fake_quant(f32::NAN, qp, &QuantSpec::default()).is_nan());
}
