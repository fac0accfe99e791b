//! The PNG chart: grouped bar panels drawn with plotters on a bitmap. Text comes from the
//! font8x8 glyphs (public-domain 8x8 bitmaps), so no system or embedded TTF font is needed.

use std::path::Path;

use plotters::prelude::*;

/// One bar group: a label under it and one value per series, with the (lowest, highest) of
/// the rounds behind it where there were several.
pub struct Group {
    pub label: String,
    pub values: Vec<Option<f64>>,
    pub spread: Vec<Option<(f64, f64)>>,
}

/// One panel of grouped bars.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub groups: Vec<Group>,
}

pub const SERIES_COLORS: [RGBColor; 4] = [
    RGBColor(0x8c, 0x8c, 0x8c), // plaintext: grey
    RGBColor(0x2b, 0x6c, 0xb0), // veil: blue
    RGBColor(0xd9, 0x7a, 0x1e), // boringtun-cli: orange
    RGBColor(0x4a, 0xa5, 0x5a), // wireguard-go: green
];

fn glyph(c: char) -> [u8; 8] {
    let cp = c as u32;
    if cp < 128 {
        font8x8::legacy::BASIC_LEGACY[cp as usize]
    } else if (0xa0..0x100).contains(&cp) {
        font8x8::legacy::LATIN_LEGACY[(cp - 0xa0) as usize]
    } else {
        font8x8::legacy::BASIC_LEGACY['?' as usize]
    }
}

/// Width in pixels of `text` at `scale` (8 px per character per scale step).
pub fn text_width(text: &str, scale: i32) -> i32 {
    text.chars().count() as i32 * 8 * scale
}

/// Draws `text` with its top-left corner at (x, y).
pub fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    x: i32,
    y: i32,
    text: &str,
    scale: i32,
    color: &RGBColor,
) -> anyhow::Result<()> {
    let mut cx = x;
    for c in text.chars() {
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..8 {
                // font8x8: bit 0 is the leftmost pixel.
                if bits & (1 << col) != 0 {
                    let px = cx + col * scale;
                    let py = y + row as i32 * scale;
                    if scale == 1 {
                        area.draw_pixel((px, py), color)
                            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    } else {
                        area.draw(&Rectangle::new(
                            [(px, py), (px + scale - 1, py + scale - 1)],
                            color.filled(),
                        ))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    }
                }
            }
        }
        cx += 8 * scale;
    }
    Ok(())
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if m * mag >= v * 1.08 {
            return m * mag;
        }
    }
    10.0 * mag
}

pub fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders panels side by side with a shared legend and a footer line.
pub fn render(
    path: &Path,
    title: &str,
    footer: &str,
    series: &[&str],
    panels: &[Panel],
) -> anyhow::Result<()> {
    let (w, h) = (520 * panels.len() as u32, 560u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("{e:?}");
    root.fill(&WHITE).map_err(e)?;
    let black = RGBColor(0x20, 0x20, 0x20);
    let grey = RGBColor(0xdd, 0xdd, 0xdd);
    draw_text(&root, 16, 12, title, 2, &black)?;
    // Legend.
    let mut lx = 16;
    for (i, s) in series.iter().enumerate() {
        let c = SERIES_COLORS[i % SERIES_COLORS.len()];
        root.draw(&Rectangle::new([(lx, 40), (lx + 16, 56)], c.filled()))
            .map_err(e)?;
        draw_text(&root, lx + 22, 44, s, 1, &black)?;
        lx += 22 + text_width(s, 1) + 30;
    }
    draw_text(&root, 16, h as i32 - 20, footer, 1, &black)?;

    let panels_area = root.margin(70, 30, 0, 0);
    let cells = panels_area.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(cells) {
        let (pw, ph) = area.dim_in_pixel();
        let (pw, ph) = (pw as i32, ph as i32);
        draw_text(&area, 60, 4, &panel.title, 1, &black)?;
        draw_text(&area, 60, 16, &format!("({})", panel.unit), 1, &black)?;
        let (x0, x1, y0, y1) = (60, pw - 16, 36, ph - 40);
        let max = panel
            .groups
            .iter()
            .flat_map(|g| {
                g.values
                    .iter()
                    .flatten()
                    .copied()
                    .chain(g.spread.iter().flatten().map(|s| s.1))
            })
            .fold(0.0f64, f64::max);
        let top = nice_max(max);
        // Grid and y labels.
        for i in 0..=4 {
            let v = top * f64::from(i) / 4.0;
            let y = y1 - ((y1 - y0) as f64 * f64::from(i) / 4.0) as i32;
            area.draw(&PathElement::new(vec![(x0, y), (x1, y)], grey))
                .map_err(e)?;
            let label = format_value(v);
            draw_text(
                &area,
                x0 - 6 - text_width(&label, 1),
                y - 4,
                &label,
                1,
                &black,
            )?;
        }
        area.draw(&PathElement::new(vec![(x0, y0), (x0, y1), (x1, y1)], black))
            .map_err(e)?;
        let ng = panel.groups.len().max(1) as i32;
        let gw = (x1 - x0) / ng;
        for (gi, g) in panel.groups.iter().enumerate() {
            let gx = x0 + gi as i32 * gw;
            let nb = g.values.len().max(1) as i32;
            let bw = ((gw - 24) / nb).max(4);
            for (bi, v) in g.values.iter().enumerate() {
                let bx = gx + 12 + bi as i32 * bw;
                let c = SERIES_COLORS[bi % SERIES_COLORS.len()];
                match v {
                    Some(v) => {
                        let bh = ((y1 - y0) as f64 * (v / top)).round() as i32;
                        area.draw(&Rectangle::new(
                            [(bx + 2, y1 - bh), (bx + bw - 2, y1 - 1)],
                            c.filled(),
                        ))
                        .map_err(e)?;
                        let y_of = |x: f64| y1 - ((y1 - y0) as f64 * (x / top)).round() as i32;
                        let mut label_y = y1 - bh - 11;
                        if let Some(Some((lo, hi))) = g.spread.get(bi) {
                            // The rounds' range: a line with caps at the bar's centre.
                            let (cx, ylo, yhi) = (bx + bw / 2, y_of(*lo), y_of(*hi));
                            for seg in [
                                vec![(cx, ylo), (cx, yhi)],
                                vec![(cx - 3, ylo), (cx + 3, ylo)],
                                vec![(cx - 3, yhi), (cx + 3, yhi)],
                            ] {
                                area.draw(&PathElement::new(seg, black)).map_err(e)?;
                            }
                            label_y = label_y.min(yhi - 11);
                        }
                        let label = format_value(*v);
                        let tx = bx + bw / 2 - text_width(&label, 1) / 2;
                        draw_text(&area, tx, label_y, &label, 1, &black)?;
                    }
                    None => {
                        draw_text(&area, bx + bw / 2 - 8, y1 - 11, "n/a", 1, &black)?;
                    }
                }
            }
            let tx = gx + gw / 2 - text_width(&g.label, 1) / 2;
            draw_text(&area, tx, y1 + 8, &g.label, 1, &black)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}
