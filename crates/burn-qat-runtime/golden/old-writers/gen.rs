//! Writes v1 and v2 integer model files with the old burn-qat-export code (old_v1a = 4ee6218,
//! the first v1 layout; old_v1b = 03ffdeb, the last v1 layout; old_v2 = c068d46, the last v2
//! commit) and runs them with the old runner, saving input and output beside each file.
use std::path::Path;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + (self.next() % (hi - lo + 1) as u32) as i32
    }
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        // Multiples of 1/64: exact in JSON and in f32.
        let steps = ((hi - lo) * 64.0) as i32;
        lo + self.int(0, steps) as f32 / 64.0
    }
    fn vec_i8(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i8> {
        (0..n).map(|_| self.int(lo, hi) as i8).collect()
    }
    fn vec_i32(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i32> {
        (0..n).map(|_| self.int(lo, hi)).collect()
    }
}

fn save(dir: &Path, name: &str, bytes: &[u8], input: &[f32], input_shape: &[usize], output: (Vec<f32>, Vec<usize>), int: Option<Vec<i8>>) {
    std::fs::write(dir.join(format!("{name}.bqi")), bytes).unwrap();
    let mut shape = vec![1];
    shape.extend(input_shape);
    let json = serde_json::json!({
        "input": input,
        "input_shape": shape,
        "output": output.0,
        "output_bits": output.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "output_shape": output.1,
        "output_int": int,
    });
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    println!("{name}: {} bytes, output {:?}", bytes.len(), output.0);
}

/// The first v1 layout (4ee6218): conv, residual (conv + clamp), max pool, clamp, flatten,
/// float linear.
fn v1a(dir: &Path) {
    use old_v1a::model::*;
    use old_v1a::requant::FixedMultiplier;
    let mut r = Lcg(1);
    let q_in = ActQ { scale: 0.05, zero_point: -3, qmin: -128, qmax: 127 };
    let g1 = ActQ { scale: 0.1, zero_point: -20, qmin: -128, qmax: 127 };
    let g2 = ActQ { scale: 0.08, zero_point: 5, qmin: -128, qmax: 127 };
    let g3 = ActQ { scale: 0.12, zero_point: -10, qmin: -128, qmax: 127 };
    let conv = |r: &mut Lcg, cin: usize, cout: usize, input: ActQ, out: ActQ, lo: i32| {
        let ws: Vec<f32> = (0..cout).map(|c| 0.01 + 0.002 * c as f32).collect();
        IntConv2d {
            in_channels: cin, out_channels: cout, groups: 1, kernel: [3, 3], stride: [1, 1], dilation: [1, 1],
            padding: [1, 1, 1, 1], weight: r.vec_i8(cout * cin * 9, -127, 127),
            bias: r.vec_i32(cout, -300, 300),
            output: Output::Quantized {
                act: out,
                requant: ws.iter().map(|w| FixedMultiplier::new((input.scale * w / out.scale) as f64)).collect(),
                lo, hi: 127,
            },
            weight_scale: ws, input,
        }
    };
    let c1 = conv(&mut r, 2, 3, q_in, g1, g1.zero_point);
    let c2 = conv(&mut r, 3, 3, g1, g2, -128);
    let shift = 40;
    let add = IntAdd {
        a: g1, b: g2, out: g3,
        ma: ((g1.scale / g3.scale) as f64 * (1u64 << shift) as f64).round() as i64,
        mb: ((g2.scale / g3.scale) as f64 * (1u64 << shift) as f64).round() as i64,
        shift, lo: -128, hi: 127,
    };
    let ws: Vec<f32> = (0..4).map(|c| 0.02 + 0.001 * c as f32).collect();
    let lin = IntLinear {
        in_features: 12, out_features: 4, weight: r.vec_i8(48, -127, 127), bias: r.vec_i32(4, -500, 500),
        output: Output::Float { scale: ws.iter().map(|w| g3.scale * w).collect(), lo: f32::NEG_INFINITY, hi: f32::INFINITY },
        weight_scale: ws, input: g3,
    };
    let model = IntegerModel {
        input_shape: vec![2, 5, 5],
        layers: vec![
            IntLayer::Quantize(q_in),
            IntLayer::Conv2d(c1),
            IntLayer::Residual { body: vec![IntLayer::Conv2d(c2), IntLayer::Clamp { lo: -100, hi: 100 }], add },
            IntLayer::MaxPool2d { kernel: [2, 2], stride: [2, 2] },
            IntLayer::Clamp { lo: -110, hi: 90 },
            IntLayer::Flatten,
            IntLayer::Linear(lin),
        ],
    };
    let input: Vec<f32> = (0..50).map(|_| r.f32(-3.0, 3.0)).collect();
    let bytes = old_v1a::format::to_bytes(&model);
    assert_eq!(old_v1a::format::from_bytes(&bytes).unwrap(), model);
    let out = model.forward_reference(&input);
    assert_eq!(out, model.forward(&input));
    save(dir, "residual.v1", &bytes, &input, &model.input_shape, out, None);
}

/// The last v1 layout (03ffdeb): a 1-D convolution, and average pooling.
fn v1b(dir: &Path) {
    use old_v1b::model::*;
    use old_v1b::requant::FixedMultiplier;
    let mut r = Lcg(2);
    let q_in = ActQ { scale: 0.04, zero_point: 7, qmin: -128, qmax: 127 };
    let g1 = ActQ { scale: 0.09, zero_point: -128, qmin: -128, qmax: 127 };
    let g2 = ActQ { scale: 0.2, zero_point: 3, qmin: -128, qmax: 127 };
    let ws: Vec<f32> = (0..4).map(|c| 0.015 + 0.003 * c as f32).collect();
    let conv = IntConv2d {
        in_channels: 3, out_channels: 4, groups: 1, kernel: [1, 3], stride: [1, 2], dilation: [1, 1],
        padding: [0, 0, 1, 1], weight: r.vec_i8(4 * 3 * 3, -127, 127), bias: r.vec_i32(4, -200, 200),
        output: Output::Quantized {
            act: g1,
            requant: ws.iter().map(|w| FixedMultiplier::new((q_in.scale * w / g1.scale) as f64)).collect(),
            lo: g1.zero_point, hi: 127,
        },
        weight_scale: ws, input: q_in, packed: Default::default(),
    };
    let ws: Vec<f32> = (0..3).map(|c| 0.01 + 0.004 * c as f32).collect();
    let lin = IntLinear {
        in_features: 20, out_features: 3, weight: r.vec_i8(60, -127, 127), bias: r.vec_i32(3, -400, 400),
        output: Output::Quantized {
            act: g2,
            requant: ws.iter().map(|w| FixedMultiplier::new((g1.scale * w / g2.scale) as f64)).collect(),
            lo: -128, hi: 127,
        },
        weight_scale: ws, input: g1, packed: Default::default(),
    };
    let model = IntegerModel {
        input_shape: vec![3, 9],
        layers: vec![IntLayer::Quantize(q_in), IntLayer::Conv2d(conv), IntLayer::Flatten, IntLayer::Linear(lin)],
    };
    let input: Vec<f32> = (0..27).map(|_| r.f32(-4.0, 4.0)).collect();
    let bytes = old_v1b::format::to_bytes(&model);
    assert_eq!(old_v1b::format::from_bytes(&bytes).unwrap(), model);
    let out = model.forward_reference(&input).unwrap();
    assert_eq!(out, model.forward(&input).unwrap());
    let int = model.forward_int(&input).unwrap().map(|(d, _, _)| d);
    save(dir, "conv1d.v1", &bytes, &input, &model.input_shape, out, int);

    let ws: Vec<f32> = vec![0.03, 0.025];
    let lin = IntLinear {
        in_features: 8, out_features: 2, weight: r.vec_i8(16, -127, 127), bias: r.vec_i32(2, -100, 100),
        output: Output::Float { scale: ws.iter().map(|w| q_in.scale * w).collect(), lo: 0.0, hi: f32::INFINITY },
        weight_scale: ws, input: q_in, packed: Default::default(),
    };
    let model = IntegerModel {
        input_shape: vec![2, 6, 6],
        layers: vec![
            IntLayer::Quantize(q_in),
            IntLayer::AvgPool2d { kernel: [3, 3], stride: [1, 1] },
            IntLayer::AvgPool2d { kernel: [2, 2], stride: [2, 2] },
            IntLayer::Clamp { lo: -50, hi: 60 },
            IntLayer::Flatten,
            IntLayer::Linear(lin),
        ],
    };
    let input: Vec<f32> = (0..72).map(|_| r.f32(-5.0, 5.0)).collect();
    let bytes = old_v1b::format::to_bytes(&model);
    assert_eq!(old_v1b::format::from_bytes(&bytes).unwrap(), model);
    let out = model.forward_reference(&input).unwrap();
    assert_eq!(out, model.forward(&input).unwrap());
    save(dir, "avgpool.v1", &bytes, &input, &model.input_shape, out, None);
}

/// v2 (c068d46): sub-8-bit weights (weight_bits), a narrow unsigned activation grid stored
/// shifted into int8, a depthwise convolution, a residual, both poolings, a bounded float head.
fn v2(dir: &Path) {
    use old_v2::model::*;
    use old_v2::requant::FixedMultiplier;
    let mut r = Lcg(3);
    let q_in = ActQ { scale: 0.03, zero_point: 0, qmin: -128, qmax: 127 };
    // 4-bit unsigned, stored as int8 shifted by -128: [0, 15] -> [-128, -113].
    let g4 = ActQ { scale: 0.1, zero_point: -128, qmin: -128, qmax: -113 };
    let g5 = ActQ { scale: 0.07, zero_point: -4, qmin: -8, qmax: 7 };
    let g6 = ActQ { scale: 0.15, zero_point: -120, qmin: -128, qmax: -113 };
    let quant = |input: ActQ, out: ActQ, ws: &[f32], lo: i32, hi: i32| Output::Quantized {
        act: out,
        requant: ws.iter().map(|w| FixedMultiplier::new((input.scale * w / out.scale) as f64)).collect(),
        lo, hi,
    };
    let ws: Vec<f32> = vec![0.05, 0.04, 0.06, 0.045];
    let dw = IntConv2d {
        in_channels: 4, out_channels: 4, groups: 4, kernel: [3, 3], stride: [1, 1], dilation: [1, 1],
        padding: [1, 1, 1, 1], weight: r.vec_i8(36, -7, 7), weight_bits: 4, bias: r.vec_i32(4, -60, 60),
        output: quant(q_in, g4, &ws, -128, -113), weight_scale: ws, input: q_in, packed: Default::default(),
    };
    let ws: Vec<f32> = vec![0.3, 0.25, 0.35, 0.2];
    let pw = IntConv2d {
        in_channels: 4, out_channels: 4, groups: 1, kernel: [1, 1], stride: [1, 1], dilation: [1, 1],
        padding: [0, 0, 0, 0], weight: r.vec_i8(16, -1, 1), weight_bits: 2, bias: r.vec_i32(4, -5, 5),
        output: quant(g4, g5, &ws, -8, 7), weight_scale: ws, input: g4, packed: Default::default(),
    };
    let shift = 40;
    let add = IntAdd {
        a: g4, b: g5, out: g6,
        ma: ((g4.scale / g6.scale) as f64 * (1u64 << shift) as f64).round() as i64,
        mb: ((g5.scale / g6.scale) as f64 * (1u64 << shift) as f64).round() as i64,
        shift, lo: -120, hi: -113,
    };
    let ws: Vec<f32> = vec![0.2, 0.1, 0.15];
    let lin = IntLinear {
        in_features: 4, out_features: 3, weight: r.vec_i8(12, -7, 7), weight_bits: 4, bias: r.vec_i32(3, -30, 30),
        output: Output::Float { scale: ws.iter().map(|w| g6.scale * w).collect(), lo: -0.5, hi: 0.75 },
        weight_scale: ws, input: g6, packed: Default::default(),
    };
    let model = IntegerModel {
        input_shape: vec![4, 4, 4],
        layers: vec![
            IntLayer::Quantize(q_in),
            IntLayer::Conv2d(dw),
            IntLayer::Residual { body: vec![IntLayer::Conv2d(pw)], add },
            IntLayer::AvgPool2d { kernel: [2, 2], stride: [2, 2] },
            IntLayer::MaxPool2d { kernel: [2, 2], stride: [1, 1] },
            IntLayer::Flatten,
            IntLayer::Linear(lin),
        ],
    };
    let input: Vec<f32> = (0..64).map(|_| r.f32(-3.5, 3.5)).collect();
    let bytes = old_v2::format::to_bytes(&model);
    assert_eq!(old_v2::format::from_bytes(&bytes).unwrap(), model);
    let out = model.forward_reference(&input).unwrap();
    assert_eq!(out, model.forward(&input).unwrap());
    save(dir, "lowbit.v2", &bytes, &input, &model.input_shape, out, None);
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("output folder"));
    std::fs::create_dir_all(&dir).unwrap();
    v1a(&dir);
    v1b(&dir);
    v2(&dir);
}
