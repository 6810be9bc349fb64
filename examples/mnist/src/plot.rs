//! The accuracy-against-bits plot (PNG, drawn with plotters).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::bits::{Ranges, SweepReport};

/// TrueType fonts tried, in order, when no font is given.
const FONTS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Why the plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// No font for the labels.
    #[error("no TrueType font for the plot's labels (tried {tried:?}): pass --font FILE.ttf")]
    NoFont {
        /// The paths tried.
        tried: Vec<PathBuf>,
    },
    /// The font file is not a TrueType/OpenType font.
    #[error("`{0}` is not a usable TrueType font")]
    BadFont(PathBuf),
    /// Drawing or encoding failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The PNG being written.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

fn register_font(font: Option<&Path>) -> Result<(), PlotError> {
    let candidates: Vec<PathBuf> = match font {
        Some(f) => vec![f.to_path_buf()],
        None => FONTS.iter().map(PathBuf::from).collect(),
    };
    let Some((path, bytes)) = candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok().map(|b| (p.clone(), b)))
    else {
        return Err(PlotError::NoFont { tried: candidates });
    };
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| PlotError::BadFont(path))
}

/// Draws integer-model test accuracy (%) against bit width, one line per range method, with
/// the float model's accuracy as a dashed reference, into `path` (800 x 500 PNG).
pub fn accuracy_vs_bits(
    r: &SweepReport,
    path: &Path,
    font: Option<&Path>,
) -> Result<(), PlotError> {
    register_font(font)?;
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let bits: Vec<u32> = r.rows.iter().map(|row| row.bits).collect();
    let (bmin, bmax) = (
        bits.iter().copied().min().unwrap_or(2),
        bits.iter().copied().max().unwrap_or(8),
    );
    let lowest = r
        .rows
        .iter()
        .map(|row| row.int_test_acc)
        .fold(r.float_test_acc, f64::min);
    let y_lo = ((lowest * 100.0 - 2.0) / 5.0).floor() * 5.0;
    let mut chart = ChartBuilder::on(&root)
        .caption("MNIST bn model: accuracy vs bit width", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(
            (bmin as f64 - 0.3)..(bmax as f64 + 0.3),
            y_lo.max(0.0)..100.5,
        )
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("bits (weights and activations)")
        .y_desc("integer model test accuracy (%)")
        .x_labels((bmax - bmin + 1) as usize)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| draw(&e))?;
    let float = r.float_test_acc * 100.0;
    chart
        .draw_series(DashedLineSeries::new(
            [(bmin as f64 - 0.3, float), (bmax as f64 + 0.3, float)],
            8,
            6,
            BLACK.stroke_width(1),
        ))
        .map_err(|e| draw(&e))?
        .label(format!("float {float:.2}%"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    for (ranges, color) in [(Ranges::Observers, RED), (Ranges::Lsq, BLUE)] {
        let mut points: Vec<(f64, f64)> = r
            .rows
            .iter()
            .filter(|row| row.ranges == ranges)
            .map(|row| (row.bits as f64, row.int_test_acc * 100.0))
            .collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let name = match ranges {
            Ranges::Observers => "observer ranges",
            Ranges::Lsq => "LSQ (learned ranges)",
        };
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| draw(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}
