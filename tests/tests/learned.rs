//! Learned ranges: exact LSQ, LSQ+, PACT and trainable min/max gradients against the analytic
//! formulas, on every backend.

use burn::prelude::*;
use burn_qat::QuantSpec;
use burn_qat::core::tensor::{fake_quant_lsq, fake_quant_min_max, fake_quant_pact, lsq_grad_factor};
use burn_qat_tests::{backends, values};

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

#[test]
fn lsq_gradients_match_the_paper() {
    // 3-bit signed grid [-4, 3], s = 0.25: v = x / s = [-8, -1.2, 0, 1.04, 3.6, 20].
    let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(3);
    let xs = [-2.0f32, -0.3, 0.0, 0.26, 0.9, 5.0];
    for b in backends() {
        let d = b.device.clone().autodiff();
        for g in [1.0, lsq_grad_factor(xs.len(), spec.qmax())] {
            let x = Tensor::<1>::from_floats(xs, &d).require_grad();
            let s = Tensor::<1>::from_floats([0.25], &d).require_grad();
            let y = fake_quant_lsq(x.clone(), s.clone(), None, &spec, g);
            assert_eq!(values(y.clone()), vec![-1.0, -0.25, 0.0, 0.25, 0.75, 0.75], "{}", b.name);
            let grads = y.sum().backward();
            assert_eq!(values(x.grad(&grads).unwrap()), vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0], "{}", b.name);
            // ds = sum(qmin | round(v) - v | qmax) * g = (-4 + 0.2 + 0 - 0.04 + 3 + 3) * g
            let ds = values(s.grad(&grads).unwrap())[0];
            assert!(close(ds, 2.16 * g), "{}: ds {ds}, analytic {}", b.name, 2.16 * g);
        }
    }
}

#[test]
fn lsq_plus_offset_gradient() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric().with_bits(3);
    let xs = [-2.0f32, -0.3, 0.0, 0.26, 0.9, 5.0];
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats(xs, &d).require_grad();
        let s = Tensor::<1>::from_floats([0.25], &d).require_grad();
        let o = Tensor::<1>::from_floats([0.1], &d).require_grad();
        let y = fake_quant_lsq(x.clone(), s.clone(), Some(o.clone()), &spec, 1.0);
        let grads = y.sum().backward();
        // v = (x - 0.1) / 0.25 = [-8.4, -1.6, -0.4, 0.64, 3.2, 19.6]
        assert_eq!(values(x.grad(&grads).unwrap()), vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0], "{}", b.name);
        let ds = values(s.grad(&grads).unwrap())[0];
        assert!(close(ds, -4.0 - 0.4 + 0.4 + 0.36 + 3.0 + 3.0), "{}: ds {ds}", b.name);
        let d_offset = values(o.grad(&grads).unwrap())[0];
        assert!(close(d_offset, 3.0), "{}: d offset {d_offset} (1 outside the range, 0 inside)", b.name);
    }
}

#[test]
fn lsq_per_channel() {
    let spec = QuantSpec::weight_per_channel_symmetric(4, 1);
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<2>::from_floats([[0.1, 2.0], [-0.33, -0.05]], &d).require_grad();
        let s = Tensor::<1>::from_floats([0.1, 0.01], &d).require_grad();
        let y = fake_quant_lsq(x.clone(), s.clone(), None, &spec, 1.0);
        assert!(values(y.clone()).iter().zip([0.1, 0.07, -0.3, -0.05]).all(|(a, b)| close(*a, b)), "{}: {:?}", b.name, values(y));
        let grads = y.sum().backward();
        // channel 0: v = [1, -3.3] -> [0, round(-3.3) + 3.3 = 0.3]; channel 1: v = [200, -5] -> [7, round(-5) + 5 = 0]
        let ds = values(s.grad(&grads).unwrap());
        assert!(close(ds[0], 0.3) && close(ds[1], 7.0), "{}: {ds:?}", b.name);
    }
}

#[test]
fn pact_gradients() {
    let spec = QuantSpec::uint8_act_per_tensor_asymmetric().with_bits(4);
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats([-0.5, 0.3, 0.99, 1.5, 3.0], &d).require_grad();
        let a = Tensor::<1>::from_floats([1.0], &d).require_grad();
        let y = fake_quant_pact(x.clone(), a.clone(), &spec);
        let yv = values(y.clone());
        assert_eq!(yv[0], 0.0, "{}", b.name);
        assert!(close(yv[1], 0.2666667) && close(yv[3], 1.0), "{}: {yv:?}", b.name);
        let grads = y.sum().backward();
        assert_eq!(values(x.grad(&grads).unwrap()), vec![0.0, 1.0, 1.0, 0.0, 0.0], "{}", b.name);
        assert_eq!(values(a.grad(&grads).unwrap()), vec![2.0], "{}: d alpha = #(x >= alpha)", b.name);
    }
}

#[test]
fn trainable_min_max_clip_gradients() {
    let spec = QuantSpec::int8_act_per_tensor_asymmetric();
    for b in backends() {
        let d = b.device.clone().autodiff();
        let x = Tensor::<1>::from_floats([-3.0, -0.5, 0.5, 2.0, 4.0], &d).require_grad();
        let lo = Tensor::<1>::from_floats([-1.0], &d).require_grad();
        let hi = Tensor::<1>::from_floats([1.0], &d).require_grad();
        let y = fake_quant_min_max(x.clone(), lo.clone(), hi.clone(), &spec);
        let grads = (y * Tensor::<1>::from_floats([1.0, 2.0, 3.0, 4.0, 5.0], &d)).sum().backward();
        assert_eq!(values(x.grad(&grads).unwrap()), vec![0.0, 2.0, 3.0, 0.0, 0.0], "{}", b.name);
        assert_eq!(values(lo.grad(&grads).unwrap()), vec![1.0], "{}: min gets the gradient of values below it", b.name);
        assert_eq!(values(hi.grad(&grads).unwrap()), vec![9.0], "{}: max gets the gradient of values above it", b.name);
    }
}
