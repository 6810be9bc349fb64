//! The op patterns of Burn's vision model zoo (GitHub `tracel-ai/models`) at the zoo's widths,
//! written here (the zoo's code is not copied): ResNet-18 (basic blocks, 1x1 projection
//! shortcuts), MobileNetV2 (inverted residuals, ReLU6 written as `relu(x).clamp_max(6)` as the
//! zoo writes it), SqueezeNet 1.1 (fire modules, ceil-mode max pooling) and YOLOX-nano (Focus
//! stem by `select`, CSP blocks, depthwise convs, SiLU, SPP max pooling, nearest upsampling,
//! PAFPN concats, a decoupled head on three levels). Three input channels, any square size.
//! Each implements the example's `Classifier` so that the training-step benches can step it;
//! YOLOX's "logits" are its raw head outputs averaged over the cells (the cost of the step is
//! the network's; the loss only needs ten numbers per image).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::interpolate::{Interpolate2d, Interpolate2dConfig, InterpolateMode};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{relu, silu};
use mnist::model::Classifier;

const CLASSES: usize = 10;

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    groups: usize,
    device: &Device,
) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_groups(groups)
        .with_bias(false)
        .init(device)
}

/// Conv (no bias) + BatchNorm: the zoo's building block before its activation.
#[derive(Module, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        Self {
            conv: conv(cin, cout, k, stride, groups, device),
            bn: BatchNormConfig::new(cout).init(device),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x))
    }
}

// ------------------------------------------------------------------ ResNet-18

#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    downsample: Option<ConvBn>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv1: ConvBn::new(cin, cout, 3, stride, 1, device),
            conv2: ConvBn::new(cout, cout, 3, 1, 1, device),
            downsample: (stride != 1 || cin != cout)
                .then(|| ConvBn::new(cin, cout, 1, stride, 1, device)),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(d) => d.forward(x.clone()),
            None => x.clone(),
        };
        let y = self.conv2.forward(relu(self.conv1.forward(x)));
        relu(y + identity)
    }
}

/// ResNet-18: 7x7 stem, max pooling, four stages of two basic blocks (64-512 channels).
#[derive(Module, Debug)]
pub struct ResNet18 {
    stem: ConvBn,
    pool: MaxPool2d,
    blocks: Vec<BasicBlock>,
    avgpool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet18 {
    pub fn new(device: &Device) -> Self {
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (stage, w) in [64, 128, 256, 512].into_iter().enumerate() {
            blocks.push(BasicBlock::new(
                cin,
                w,
                if stage == 0 { 1 } else { 2 },
                device,
            ));
            blocks.push(BasicBlock::new(w, w, 1, device));
            cin = w;
        }
        Self {
            stem: ConvBn::new(3, 64, 7, 2, 1, device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            blocks,
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(512, CLASSES).init(device),
        }
    }
}

impl Classifier for ResNet18 {
    fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.stem.forward(x)));
        let x = self.blocks.iter().fold(x, |x, b| b.forward(x));
        self.fc.forward(self.avgpool.forward(x).flatten(1, 3))
    }
}

// ------------------------------------------------------------------ MobileNetV2

fn relu6(x: Tensor<4>) -> Tensor<4> {
    relu(x).clamp_max(6.0) // as the zoo writes it
}

#[derive(Module, Debug)]
pub struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl InvertedResidual {
    fn new(cin: usize, cout: usize, stride: usize, t: usize, device: &Device) -> Self {
        let hidden = cin * t;
        Self {
            expand: (t != 1).then(|| ConvBn::new(cin, hidden, 1, 1, 1, device)),
            depthwise: ConvBn::new(hidden, hidden, 3, stride, hidden, device),
            project: ConvBn::new(hidden, cout, 1, 1, 1, device),
            residual: stride == 1 && cin == cout,
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = match &self.expand {
            Some(e) => relu6(e.forward(x.clone())),
            None => x.clone(),
        };
        let y = self.project.forward(relu6(self.depthwise.forward(y)));
        if self.residual { x + y } else { y }
    }
}

/// MobileNetV2 (width 1.0): the torchvision settings, 1280 features, a linear classifier.
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    last: ConvBn,
    avgpool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl MobileNetV2 {
    pub fn new(device: &Device) -> Self {
        let settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ];
        let mut blocks = Vec::new();
        let mut cin = 32;
        for (t, c, n, s) in settings {
            for i in 0..n {
                blocks.push(InvertedResidual::new(
                    cin,
                    c,
                    if i == 0 { s } else { 1 },
                    t,
                    device,
                ));
                cin = c;
            }
        }
        Self {
            stem: ConvBn::new(3, 32, 3, 2, 1, device),
            blocks,
            last: ConvBn::new(320, 1280, 1, 1, 1, device),
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(1280, CLASSES).init(device),
        }
    }
}

impl Classifier for MobileNetV2 {
    fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        let x = relu6(self.stem.forward(x));
        let x = self.blocks.iter().fold(x, |x, b| b.forward(x));
        let x = relu6(self.last.forward(x));
        self.fc.forward(self.avgpool.forward(x).flatten(1, 3))
    }
}

// ------------------------------------------------------------------ SqueezeNet 1.1

#[derive(Module, Debug)]
pub struct Fire {
    squeeze: Conv2d,
    expand1: Conv2d,
    expand3: Conv2d,
}

impl Fire {
    fn new(cin: usize, squeeze: usize, expand: usize, device: &Device) -> Self {
        let with_bias = |c: Conv2dConfig| c.with_bias(true).init(device);
        Self {
            squeeze: with_bias(Conv2dConfig::new([cin, squeeze], [1, 1])),
            expand1: with_bias(Conv2dConfig::new([squeeze, expand], [1, 1])),
            expand3: with_bias(
                Conv2dConfig::new([squeeze, expand], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)),
            ),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let s = relu(self.squeeze.forward(x));
        Tensor::cat(
            vec![
                relu(self.expand1.forward(s.clone())),
                relu(self.expand3.forward(s)),
            ],
            1,
        )
    }
}

/// SqueezeNet 1.1: 3x3 stem, eight fire modules between ceil-mode max pooling, a 1x1 conv
/// classifier, global average pooling.
#[derive(Module, Debug)]
pub struct SqueezeNet {
    stem: Conv2d,
    pool: MaxPool2d,
    fires: Vec<Fire>,
    classifier: Conv2d,
    avgpool: AdaptiveAvgPool2d,
}

impl SqueezeNet {
    pub fn new(device: &Device) -> Self {
        let fires = [
            (64, 16, 64),
            (128, 16, 64),
            (128, 32, 128),
            (256, 32, 128),
            (256, 48, 192),
            (384, 48, 192),
            (384, 64, 256),
            (512, 64, 256),
        ]
        .into_iter()
        .map(|(c, s, e)| Fire::new(c, s, e, device))
        .collect();
        Self {
            stem: Conv2dConfig::new([3, 64], [3, 3])
                .with_stride([2, 2])
                .init(device),
            pool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_ceil_mode(true)
                .init(),
            fires,
            classifier: Conv2dConfig::new([512, CLASSES], [1, 1]).init(device),
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
        }
    }
}

impl Classifier for SqueezeNet {
    fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = self.pool.forward(relu(self.stem.forward(x)));
        for (i, fire) in self.fires.iter().enumerate() {
            x = fire.forward(x);
            if i == 1 || i == 3 {
                x = self.pool.forward(x);
            }
        }
        let x = relu(self.classifier.forward(x));
        self.avgpool.forward(x).flatten(1, 3)
    }
}

// ------------------------------------------------------------------ YOLOX-nano

/// Conv + BatchNorm + SiLU (YOLOX's `BaseConv`).
#[derive(Module, Debug)]
pub struct BaseConv {
    inner: ConvBn,
}

impl BaseConv {
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        Self {
            inner: ConvBn::new(cin, cout, k, stride, groups, device),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        silu(self.inner.forward(x))
    }
}

/// Depthwise then pointwise `BaseConv` (YOLOX's `DWConv`).
#[derive(Module, Debug)]
pub struct DwConv {
    depthwise: BaseConv,
    pointwise: BaseConv,
}

impl DwConv {
    fn new(cin: usize, cout: usize, k: usize, stride: usize, device: &Device) -> Self {
        Self {
            depthwise: BaseConv::new(cin, cin, k, stride, cin, device),
            pointwise: BaseConv::new(cin, cout, 1, 1, 1, device),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.pointwise.forward(self.depthwise.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct Bottleneck {
    conv1: BaseConv,
    conv2: DwConv,
    shortcut: bool,
}

impl Bottleneck {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.conv2.forward(self.conv1.forward(x.clone()));
        if self.shortcut { y + x } else { y }
    }
}

/// Cross-stage partial block: two 1x1 branches, bottlenecks on one, concat, 1x1.
#[derive(Module, Debug)]
pub struct CspLayer {
    conv1: BaseConv,
    conv2: BaseConv,
    conv3: BaseConv,
    m: Vec<Bottleneck>,
}

impl CspLayer {
    fn new(cin: usize, cout: usize, n: usize, shortcut: bool, device: &Device) -> Self {
        let hidden = cout / 2;
        Self {
            conv1: BaseConv::new(cin, hidden, 1, 1, 1, device),
            conv2: BaseConv::new(cin, hidden, 1, 1, 1, device),
            conv3: BaseConv::new(2 * hidden, cout, 1, 1, 1, device),
            m: (0..n)
                .map(|_| Bottleneck {
                    conv1: BaseConv::new(hidden, hidden, 1, 1, 1, device),
                    conv2: DwConv::new(hidden, hidden, 3, 1, device),
                    shortcut,
                })
                .collect(),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let a = self
            .m
            .iter()
            .fold(self.conv1.forward(x.clone()), |a, b| b.forward(a));
        self.conv3
            .forward(Tensor::cat(vec![a, self.conv2.forward(x)], 1))
    }
}

/// Spatial pyramid pooling: max pooling 5/9/13 (stride 1, same size) concatenated.
#[derive(Module, Debug)]
pub struct Spp {
    conv1: BaseConv,
    pools: Vec<MaxPool2d>,
    conv2: BaseConv,
}

impl Spp {
    fn new(cin: usize, cout: usize, device: &Device) -> Self {
        let hidden = cin / 2;
        Self {
            conv1: BaseConv::new(cin, hidden, 1, 1, 1, device),
            pools: [5, 9, 13]
                .map(|k| {
                    MaxPool2dConfig::new([k, k])
                        .with_strides([1, 1])
                        .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                        .init()
                })
                .to_vec(),
            conv2: BaseConv::new(4 * hidden, cout, 1, 1, 1, device),
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.conv1.forward(x);
        let mut all = vec![x.clone()];
        all.extend(self.pools.iter().map(|p| p.forward(x.clone())));
        self.conv2.forward(Tensor::cat(all, 1))
    }
}

/// One level of the decoupled head: stem, two depthwise convs per branch, three predictions.
#[derive(Module, Debug)]
pub struct HeadLevel {
    stem: BaseConv,
    cls: Vec<DwConv>,
    reg: Vec<DwConv>,
    cls_pred: Conv2d,
    reg_pred: Conv2d,
    obj_pred: Conv2d,
}

impl HeadLevel {
    fn new(cin: usize, width: usize, classes: usize, device: &Device) -> Self {
        let pred = |c: usize| Conv2dConfig::new([width, c], [1, 1]).init(device);
        Self {
            stem: BaseConv::new(cin, width, 1, 1, 1, device),
            cls: (0..2)
                .map(|_| DwConv::new(width, width, 3, 1, device))
                .collect(),
            reg: (0..2)
                .map(|_| DwConv::new(width, width, 3, 1, device))
                .collect(),
            cls_pred: pred(classes),
            reg_pred: pred(4),
            obj_pred: pred(1),
        }
    }
    /// `[N, 5 + classes, H * W]`.
    fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let x = self.stem.forward(x);
        let c = self.cls.iter().fold(x.clone(), |c, l| l.forward(c));
        let r = self.reg.iter().fold(x, |r, l| l.forward(r));
        let out = Tensor::cat(
            vec![
                self.reg_pred.forward(r.clone()),
                self.obj_pred.forward(r),
                self.cls_pred.forward(c),
            ],
            1,
        );
        out.flatten(2, 3)
    }
}

/// YOLOX-nano (depth 0.33, width 0.25, depthwise): Focus, CSPDarknet, SPP, PAFPN, the head on
/// strides 8/16/32.
#[derive(Module, Debug)]
pub struct Yolox {
    focus: BaseConv,
    dark2: (DwConv, CspLayer),
    dark3: (DwConv, CspLayer),
    dark4: (DwConv, CspLayer),
    dark5: (DwConv, Spp, CspLayer),
    lateral0: BaseConv,
    c3_p4: CspLayer,
    reduce1: BaseConv,
    c3_p3: CspLayer,
    bu2: DwConv,
    c3_n3: CspLayer,
    bu1: DwConv,
    c3_n4: CspLayer,
    upsample: Interpolate2d,
    heads: Vec<HeadLevel>,
}

impl Yolox {
    pub fn new(device: &Device) -> Self {
        let csp = |c: usize, n: usize, s: bool| CspLayer::new(c, c, n, s, device);
        Self {
            focus: BaseConv::new(12, 16, 3, 1, 1, device),
            dark2: (DwConv::new(16, 32, 3, 2, device), csp(32, 1, true)),
            dark3: (DwConv::new(32, 64, 3, 2, device), csp(64, 1, true)),
            dark4: (DwConv::new(64, 128, 3, 2, device), csp(128, 1, true)),
            dark5: (
                DwConv::new(128, 256, 3, 2, device),
                Spp::new(256, 256, device),
                csp(256, 1, false),
            ),
            lateral0: BaseConv::new(256, 128, 1, 1, 1, device),
            c3_p4: CspLayer::new(256, 128, 1, false, device),
            reduce1: BaseConv::new(128, 64, 1, 1, 1, device),
            c3_p3: CspLayer::new(128, 64, 1, false, device),
            bu2: DwConv::new(64, 64, 3, 2, device),
            c3_n3: CspLayer::new(128, 128, 1, false, device),
            bu1: DwConv::new(128, 128, 3, 2, device),
            c3_n4: CspLayer::new(256, 256, 1, false, device),
            upsample: Interpolate2dConfig::new()
                .with_scale_factor(Some([2.0, 2.0]))
                .with_mode(InterpolateMode::Nearest)
                .init(),
            heads: [64, 128, 256]
                .map(|c| HeadLevel::new(c, 64, CLASSES - 5, device))
                .to_vec(),
        }
    }

    /// The raw predictions of every cell, `[N, cells, 5 + classes]` (before YOLOX's decoding).
    pub fn predictions(&self, x: Tensor<4>) -> Tensor<3> {
        // Focus: every other row and column by `select`, four patches on the channels.
        let device = x.device();
        let [_, _, h, w] = x.dims();
        let rows = |start: i64| Tensor::<1, Int>::arange_step(start..h as i64, 2, &device);
        let cols = |start: i64| Tensor::<1, Int>::arange_step(start..w as i64, 2, &device);
        let patch = |r: i64, c: i64| x.clone().select(2, rows(r)).select(3, cols(c));
        let x = Tensor::cat(vec![patch(0, 0), patch(1, 0), patch(0, 1), patch(1, 1)], 1);
        let x = self.focus.forward(x);
        let x = self.dark2.1.forward(self.dark2.0.forward(x));
        let d3 = self.dark3.1.forward(self.dark3.0.forward(x));
        let d4 = self.dark4.1.forward(self.dark4.0.forward(d3.clone()));
        let d5 = self
            .dark5
            .2
            .forward(self.dark5.1.forward(self.dark5.0.forward(d4.clone())));
        let fpn0 = self.lateral0.forward(d5);
        let f = self.c3_p4.forward(Tensor::cat(
            vec![self.upsample.forward(fpn0.clone()), d4],
            1,
        ));
        let fpn1 = self.reduce1.forward(f);
        let p3 = self.c3_p3.forward(Tensor::cat(
            vec![self.upsample.forward(fpn1.clone()), d3],
            1,
        ));
        let p4 = self
            .c3_n3
            .forward(Tensor::cat(vec![self.bu2.forward(p3.clone()), fpn1], 1));
        let p5 = self
            .c3_n4
            .forward(Tensor::cat(vec![self.bu1.forward(p4.clone()), fpn0], 1));
        let outs = [p3, p4, p5]
            .into_iter()
            .zip(&self.heads)
            .map(|(p, head)| head.forward(p))
            .collect();
        Tensor::cat(outs, 2).swap_dims(1, 2)
    }
}

impl Classifier for Yolox {
    fn logits(&self, x: Tensor<4>) -> Tensor<2> {
        self.predictions(x).mean_dim(1).squeeze_dim(1)
    }
}
