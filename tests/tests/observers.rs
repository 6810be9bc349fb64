//! Observers on every backend: update rules, training/eval behaviour, switches, and the
//! save/load round trip of their state.

use burn::module::Module;
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn_qat::core::reference;
use burn_qat::{FakeQuantConfig, Granularity, Observer, QuantSpec, qparams_from_range, switches};
use burn_qat_tests::{backends, values};

fn act() -> QuantSpec {
    QuantSpec::int8_act_per_tensor_asymmetric()
}

#[test]
fn update_rules() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let batches = [[-2.0, 4.0], [-1.0, 1.0], [-6.0, 2.0]];
        for (observer, want) in [
            (Observer::LastValue, (-6.0, 2.0)),
            (Observer::RunningMinMax, (-6.0, 4.0)),
            // EMA decay 0.5: [-2,4] -> [-1.5, 2.5] -> [-3.75, 2.25]
            (Observer::MovingAverage { decay: 0.5 }, (-3.75, 2.25)),
        ] {
            let fq = FakeQuantConfig::new(act())
                .with_observer(observer)
                .init(&device)
                .unwrap();
            for batch in batches {
                fq.forward(Tensor::<1>::from_floats(batch, &device));
            }
            let (lo, hi) = fq.observed_range().unwrap();
            assert_eq!((lo[0], hi[0]), want, "{} {observer:?}", b.name);
        }
    }
}

#[test]
fn positive_only_inputs_still_contain_zero() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let fq = FakeQuantConfig::new(act())
            .with_observer(Observer::LastValue)
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<1>::from_floats([1.0, 3.0], &device));
        assert_eq!(
            fq.observed_range(),
            Some((vec![0.0], vec![3.0])),
            "{}",
            b.name
        );
    }
}

#[test]
fn nan_and_inf_never_poison_the_range() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let fq = FakeQuantConfig::new(act())
            .with_observer(Observer::MovingAverage { decay: 0.9 })
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<1>::from_floats([-1.0, 1.0], &device));
        fq.forward(Tensor::<1>::from_floats(
            [f32::NAN, f32::INFINITY, f32::NEG_INFINITY],
            &device,
        ));
        let (lo, hi) = fq.observed_range().unwrap();
        assert!(
            lo[0].is_finite() && hi[0].is_finite(),
            "{}: {lo:?} {hi:?}",
            b.name
        );
        assert!(
            (lo[0] + 0.9).abs() < 1e-6 && (hi[0] - 0.9).abs() < 1e-6,
            "{}: {lo:?} {hi:?}",
            b.name
        );
    }
}

#[test]
fn per_channel_activation_observer() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let spec = act().with_granularity(Granularity::PerChannel { axis: 1 });
        let fq = FakeQuantConfig::new(spec)
            .with_channels(3)
            .with_observer(Observer::LastValue)
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<2>::from_floats(
            [[1.0, -2.0, 0.5], [-1.0, 4.0, 0.25]],
            &device,
        ));
        assert_eq!(
            fq.observed_range(),
            Some((vec![-1.0, -2.0, 0.0], vec![1.0, 4.0, 0.5])),
            "{}",
            b.name
        );
    }
}

#[test]
fn only_training_on_autodiff_observes() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let fq = FakeQuantConfig::new(act())
            .with_observer(Observer::LastValue)
            .init(&device)
            .unwrap();
        fq.forward(Tensor::<1>::from_floats([-1.0, 1.0], &device));
        // valid(): evaluation, no observation, stored range used.
        let eval = fq.valid();
        let y = values(eval.forward(Tensor::<1>::from_floats([0.3, 9.0], &b.device)));
        let qp = qparams_from_range(-1.0, 1.0, &act());
        assert_eq!(
            y,
            vec![
                reference::fake_quant(0.3, qp, &act()),
                reference::fake_quant(9.0, qp, &act())
            ],
            "{}",
            b.name
        );
        assert_eq!(
            eval.observed_range(),
            Some((vec![-1.0], vec![1.0])),
            "{}",
            b.name
        );
        // A frozen observer in training keeps its range.
        let frozen = switches::freeze_observers(fq.clone());
        frozen.forward(Tensor::<1>::from_floats([-5.0, 5.0], &device));
        assert_eq!(
            frozen.observed_range(),
            Some((vec![-1.0], vec![1.0])),
            "{}",
            b.name
        );
        let thawed = switches::unfreeze_observers(frozen);
        thawed.forward(Tensor::<1>::from_floats([-5.0, 5.0], &device));
        assert_eq!(
            thawed.observed_range(),
            Some((vec![-5.0], vec![5.0])),
            "{}",
            b.name
        );
        // Disabled fake-quant passes values through.
        let off = switches::set_fake_quant_enabled(thawed, false);
        assert_eq!(
            values(off.forward(Tensor::<1>::from_floats([0.123], &device))),
            vec![0.123],
            "{}",
            b.name
        );
    }
}

#[test]
fn observer_state_survives_save_and_load() {
    for b in backends() {
        let device = b.device.clone().autodiff();
        let config =
            FakeQuantConfig::new(act()).with_observer(Observer::MovingAverage { decay: 0.5 });
        let trained = config.init(&device).unwrap();
        trained.forward(Tensor::<1>::from_floats([-2.0, 4.0], &device));
        trained.forward(Tensor::<1>::from_floats([-4.0, 2.0], &device));
        let x = Tensor::<1>::from_floats([0.01, 1.234, 5.0], &b.device);
        let want = values(trained.valid().forward(x.clone()));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fq.bpk");
        trained.clone().into_record().save(&path).unwrap();

        let fresh = config.init(&device).unwrap();
        // Without the state the output would differ (a fresh quantizer passes values through).
        assert_ne!(
            values(fresh.valid().forward(x.clone())),
            want,
            "{}: the test must be able to fail",
            b.name
        );
        let loaded = fresh.load_record(ModuleRecord::load(&path).unwrap());
        assert_eq!(
            loaded.observed_range(),
            Some((vec![-3.0], vec![3.0])),
            "{}",
            b.name
        );
        assert_eq!(values(loaded.valid().forward(x)), want, "{}", b.name);
        // The EMA continues from the loaded state.
        loaded.forward(Tensor::<1>::from_floats([-1.0, 1.0], &device));
        assert_eq!(
            loaded.observed_range(),
            Some((vec![-2.0], vec![2.0])),
            "{}",
            b.name
        );
    }
}
