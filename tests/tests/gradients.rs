//! Exact straight-through-estimator gradients on every backend's autodiff device.

use burn::prelude::*;
use burn_qat::core::{reference, tensor};
use burn_qat::{FakeQuantConfig, Observer, QParams, QuantSpec};
use burn_qat_tests::{backends, values};

#[test]
fn clipped_ste_is_one_inside_zero_outside_per_tensor() {
    // 3-bit signed grid [-4, 3], scale 0.25: representable range [-1, 0.75].
    let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(3);
    let qp = QParams {
        scale: 0.25,
        zero_point: 0,
    };
    let xs = [-2.0, -1.0, -0.26, 0.0, 0.13, 0.5, 0.75, 0.76, 3.0];
    let upstream = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
    let want = [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0, 0.0];
    for b in backends() {
        let device = b.device.clone().autodiff();
        for path in ["scalar", "tensor"] {
            let x = Tensor::<1>::from_floats(xs, &device).require_grad();
            let y = match path {
                "scalar" => tensor::fake_quant_per_tensor(x.clone(), qp, &spec),
                _ => tensor::fake_quant(
                    x.clone(),
                    Tensor::from_floats([0.25], &device),
                    Tensor::from_floats([0.0], &device),
                    &spec,
                ),
            };
            let fwd = values(y.clone());
            let expected_fwd: Vec<f32> = xs
                .iter()
                .map(|x| reference::fake_quant(*x, qp, &spec))
                .collect();
            assert_eq!(fwd, expected_fwd, "{} {path}: forward", b.name);
            let grads = (y * Tensor::<1>::from_floats(upstream, &device))
                .sum()
                .backward();
            assert_eq!(
                values(x.grad(&grads).unwrap()),
                want.to_vec(),
                "{} {path}: gradient",
                b.name
            );
        }
    }
}

#[test]
fn clipped_ste_per_channel() {
    // Two output channels of a Linear weight [d_in=2, d_out=2], ranges [-1, 1] and [-0.1, 0.1].
    let spec = QuantSpec::int8_weight_per_channel_symmetric(1);
    for b in backends() {
        let device = b.device.clone().autodiff();
        let w = Tensor::<2>::from_floats([[0.5, 0.5], [-2.0, 0.05]], &device).require_grad();
        let scale = Tensor::<1>::from_floats([1.0 / 127.0, 0.1 / 127.0], &device);
        let zp = Tensor::<1>::zeros([2], &device);
        let y = tensor::fake_quant(w.clone(), scale, zp, &spec);
        let grads = (y * 3.0).sum().backward();
        // 0.5 is outside channel 1's range [-0.1, 0.1]; -2.0 outside channel 0's.
        assert_eq!(
            values(w.grad(&grads).unwrap()),
            vec![3.0, 0.0, 0.0, 3.0],
            "{}",
            b.name
        );
    }
}

#[test]
fn fake_quant_module_passes_gradient_and_no_gradient_to_range() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    for b in backends() {
        let device = b.device.clone().autodiff();
        let fq = FakeQuantConfig::new(spec)
            .with_observer(Observer::LastValue)
            .init(&device)
            .unwrap();
        let x = Tensor::<2>::from_floats([[-1.0, 0.2], [0.7, 2.0]], &device).require_grad();
        let y = fq.forward(x.clone());
        let grads = y.sum().backward();
        // The range was observed from x itself, so every value is inside it.
        assert_eq!(values(x.grad(&grads).unwrap()), vec![1.0; 4], "{}", b.name);
    }
}

#[test]
fn round_ste_is_identity_backward() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats([0.4, 1.5, 2.5, -7.2], &device).require_grad();
        let y = tensor::round_ste(x.clone());
        assert_eq!(values(y.clone()), vec![0.0, 2.0, 2.0, -7.0], "{}", b.name);
        let grads = (y * 2.0).sum().backward();
        assert_eq!(values(x.grad(&grads).unwrap()), vec![2.0; 4], "{}", b.name);
    }
}
