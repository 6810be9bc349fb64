//! Compile once, run many: a [`Session`] allocates nothing after its first call at a batch
//! size (counted by a global allocator that counts every thread's allocations), its outputs
//! equal a fresh model's `forward` and the scalar reference, and plans reuse buffers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use burn_qat_runtime::model::{
    Dim, Grid, IntAdd, IntConv2d, IntLinear, IntNode, IntOp, IntegerModel, Lut, Output, Window,
};
use burn_qat_runtime::requant::FixedMultiplier;

/// Counts allocations (and growths) while `COUNTING` is set, on every thread.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged; the
// counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as `dealloc`, and `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on any thread.
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn grid(scale: f32, zero_point: i32) -> Grid {
    Grid {
        scale,
        zero_point,
        qmin: -128,
        qmax: 127,
    }
}

fn weights(n: usize, seed: usize) -> Vec<i8> {
    (0..n).map(|i| ((i * 37 + seed * 11) % 255) as i8).collect()
}

fn conv(cin: usize, cout: usize, groups: usize, k: usize, stride: usize, pad: usize) -> IntConv2d {
    let (input, out) = (grid(0.1, 2), grid(0.1, 2));
    IntConv2d {
        in_channels: cin,
        out_channels: cout,
        groups,
        kernel: [k, k],
        stride: [stride, stride],
        dilation: [1, 1],
        padding: [pad; 4],
        weight: weights(cout * cin / groups * k * k, cout)
            .into_iter()
            .map(|w| w / 4)
            .collect(),
        weight_bits: 8,
        weight_scale: vec![0.01; cout],
        bias: (0..cout as i32).map(|c| c * 50 - 300).collect(),
        input,
        output: Output::Quantized {
            grid: out,
            requant: (0..cout)
                .map(|c| FixedMultiplier::new(0.0005 * (1.0 + c as f64 / 8.0)))
                .collect(),
            lo: -128,
            hi: 127,
        },
    }
}

fn node(name: &str, op: IntOp, inputs: Vec<usize>, shape: &[usize], grid: Option<Grid>) -> IntNode {
    let mut dims = vec![Dim::Batch(1)];
    dims.extend(shape.iter().map(|d| Dim::Fixed(*d)));
    IntNode {
        name: name.into(),
        op,
        inputs,
        shape: dims,
        grid,
    }
}

/// Input `[N, 4, 12, 12]`: quantize, conv 3x3 + max pool 2x2 (fused), depthwise 3x3, a
/// residual add, a strided conv, a lookup table, concat, average pooling, reshape, linear.
fn model() -> IntegerModel {
    let (g_in, g) = (grid(0.05, -3), grid(0.1, 2));
    let pool = Window {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0; 4],
        dilation: [1, 1],
    };
    let add = IntAdd {
        a: g,
        b: g,
        out: g,
        ma: 1 << 39,
        mb: 1 << 39,
        shift: 40,
        lo: -128,
        hi: 127,
    };
    let lut = Lut {
        function: "Half".into(),
        input: g,
        output: g,
        table: (0..256).map(|i: i32| ((i - 128) / 2) as i8).collect(),
    };
    let mut c1 = conv(4, 8, 1, 3, 1, 1);
    c1.input = g_in;
    let dw = conv(8, 8, 8, 3, 1, 1);
    let c2 = conv(8, 8, 1, 3, 2, 1);
    let linear = IntLinear {
        in_features: 64,
        out_features: 5,
        weight: weights(64 * 5, 3),
        weight_bits: 8,
        weight_scale: vec![0.02; 5],
        bias: vec![10, -20, 30, -40, 50],
        input: g,
        output: Output::Float {
            scale: vec![0.002; 5],
            lo: f32::NEG_INFINITY,
            hi: f32::INFINITY,
        },
    };
    let avg = Window {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0, 1, 0, 1],
        dilation: [1, 1],
    };
    IntegerModel::new(
        vec![
            node("x", IntOp::Input, vec![], &[4, 12, 12], None),
            node(
                "q",
                IntOp::Quantize(g_in),
                vec![0],
                &[4, 12, 12],
                Some(g_in),
            ),
            node("c1", IntOp::Conv2d(c1), vec![1], &[8, 12, 12], Some(g)),
            node("pool", IntOp::MaxPool(pool), vec![2], &[8, 6, 6], Some(g)),
            node("dw", IntOp::Conv2d(dw), vec![3], &[8, 6, 6], Some(g)),
            node("add", IntOp::Add(add), vec![3, 4], &[8, 6, 6], Some(g)),
            node("c2", IntOp::Conv2d(c2), vec![5], &[8, 3, 3], Some(g)),
            node("lut", IntOp::Lut(lut), vec![6], &[8, 3, 3], Some(g)),
            node(
                "cat",
                IntOp::Concat {
                    axis: 1,
                    requantize: vec![None, None],
                },
                vec![6, 7],
                &[16, 3, 3],
                Some(g),
            ),
            node(
                "avg",
                IntOp::AvgPool {
                    window: avg,
                    count_include_pad: false,
                    input: g,
                },
                vec![8],
                &[16, 2, 2],
                Some(g),
            ),
            node("flat", IntOp::Reshape, vec![9], &[64], Some(g)),
            node("fc", IntOp::Linear(linear), vec![10], &[5], None),
        ],
        11,
    )
}

fn input(batch: usize) -> Vec<f32> {
    (0..batch * 4 * 144)
        .map(|i| ((i * 7919) % 509) as f32 / 509.0 * 4.0 - 2.0)
        .collect()
}

#[test]
fn a_session_allocates_nothing_after_its_first_call_at_a_batch_size() {
    let model = model();
    model.validate().unwrap();
    let mut session = model.session();
    // Miri interprets every step: one small batch there.
    let batches: &[usize] = if cfg!(miri) { &[2] } else { &[1, 3, 16] };
    for &batch in batches {
        let x = input(batch);
        let first = session.run(&x).unwrap().0.to_vec();
        let mut again = Vec::with_capacity(batch * 5);
        let count = allocations(|| {
            for _ in 0..3 {
                let (y, shape) = session.run(&x).unwrap();
                assert_eq!(shape, [batch, 5]);
                again.clear();
                again.extend_from_slice(y);
            }
        });
        assert_eq!(
            count, 0,
            "allocations at batch {batch} after the first call"
        );
        assert_eq!(again, first);
        if cfg!(miri) {
            continue;
        }
        // Equal to a fresh model's forward and to the scalar reference.
        let (fresh, _) = model.clone().forward(&x).unwrap();
        let (reference, _) = model.forward_reference(&x).unwrap();
        assert_eq!(fresh, first);
        assert_eq!(reference, first);
    }
    // Back to an earlier batch size: its plan is kept.
    let x = input(batches[0]);
    assert_eq!(allocations(|| assert!(session.run(&x).is_ok())), 0);
}

#[test]
fn a_plan_fuses_and_reuses_buffers() {
    let model = model();
    let plan = model.plan_for(2).unwrap();
    assert_eq!(plan.batch(), 2);
    assert_eq!(plan.output_shape(), &[2, 5]);
    // 12 nodes: the max pooling runs inside the first conv, the reshape moves its input.
    assert_eq!(plan.steps(), 10);
    // 8-bit values alive at once: at most three (the residual's two inputs and its output;
    // the concat's two inputs and its output); the logits reuse the input's float buffer.
    let (ints, floats) = plan.buffers();
    assert_eq!((ints, floats), (3, 1));
}

#[test]
fn a_plan_refuses_a_model_inconsistent_at_its_batch_size() {
    let mut model = model();
    // The linear layer reads 36 values where the reshape gives 64.
    if let IntOp::Linear(l) = &mut model.nodes[11].op {
        l.in_features = 36;
        l.weight = weights(36 * 5, 3);
    }
    let err = model.plan_for(1).unwrap_err().to_string();
    assert!(err.contains("fc"), "{err}");
}
