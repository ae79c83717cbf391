//! An RGB canvas with an embedded 5×7 bitmap font (the machines that run icefm have no
//! fonts), and its PNG encoding: what the quicklooks, evaluation panels, confusion matrices
//! and line plots draw on.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use crate::error::StoreError;

pub(crate) const WHITE: [u8; 3] = [255, 255, 255];
pub(crate) const BLACK: [u8; 3] = [0, 0, 0];
/// Frame around each panel, so white (SIC 100 %) stays visible on the white background.
pub(crate) const FRAME_COLOUR: [u8; 3] = [128, 128, 128];
/// Lines between confusion cells, so white (0 %) cells stay apart.
pub(crate) const GRID_COLOUR: [u8; 3] = [224, 224, 224];
/// Text is drawn at this multiple of the font's size.
pub(crate) const TEXT_SCALE: usize = 2;
/// Horizontal distance between glyph origins: 5 columns and 1 blank.
pub(crate) const ADVANCE: usize = 6 * TEXT_SCALE;
/// Height of drawn text, descenders included.
pub(crate) const TEXT_HEIGHT: usize = 8 * TEXT_SCALE;
/// Line height: 8 rows and 1 blank.
pub(crate) const LINE_HEIGHT: usize = 9 * TEXT_SCALE;
pub(crate) const MARGIN: usize = 16;
pub(crate) const LEGEND_ROW: usize = LINE_HEIGHT + 4;

/// The font for ' ' (0x20) to '~' (0x7E), 5×7 glyphs (Hitachi HD44780 shapes) in 5×8 cells whose
/// last row takes descenders: one u64 a glyph, its highest byte the top row; in each row bit 4
/// is the left column.
#[rustfmt::skip]
const FONT: [u64; 95] = [
    0x00_00_00_00_00_00_00_00, 0x04_04_04_04_00_00_04_00, 0x0A_0A_0A_00_00_00_00_00, //   ! "
    0x0A_0A_1F_0A_1F_0A_0A_00, 0x04_0F_14_0E_05_1E_04_00, 0x18_19_02_04_08_13_03_00, // # $ %
    0x0C_12_14_08_15_12_0D_00, 0x0C_04_08_00_00_00_00_00, 0x02_04_08_08_08_04_02_00, // & ' (
    0x08_04_02_02_02_04_08_00, 0x00_04_15_0E_15_04_00_00, 0x00_04_04_1F_04_04_00_00, // ) * +
    0x00_00_00_00_00_0C_04_08, 0x00_00_00_1F_00_00_00_00, 0x00_00_00_00_00_0C_0C_00, // , - .
    0x00_01_02_04_08_10_00_00, 0x0E_11_13_15_19_11_0E_00, 0x04_0C_04_04_04_04_0E_00, // / 0 1
    0x0E_11_01_02_04_08_1F_00, 0x1F_02_04_02_01_11_0E_00, 0x02_06_0A_12_1F_02_02_00, // 2 3 4
    0x1F_10_1E_01_01_11_0E_00, 0x06_08_10_1E_11_11_0E_00, 0x1F_01_02_04_08_08_08_00, // 5 6 7
    0x0E_11_11_0E_11_11_0E_00, 0x0E_11_11_0F_01_02_0C_00, 0x00_0C_0C_00_0C_0C_00_00, // 8 9 :
    0x00_0C_0C_00_0C_04_08_00, 0x02_04_08_10_08_04_02_00, 0x00_00_1F_00_1F_00_00_00, // ; < =
    0x08_04_02_01_02_04_08_00, 0x0E_11_01_02_04_00_04_00, 0x0E_11_01_0D_15_15_0E_00, // > ? @
    0x0E_11_11_11_1F_11_11_00, 0x1E_11_11_1E_11_11_1E_00, 0x0E_11_10_10_10_11_0E_00, // A B C
    0x1C_12_11_11_11_12_1C_00, 0x1F_10_10_1E_10_10_1F_00, 0x1F_10_10_1E_10_10_10_00, // D E F
    0x0E_11_10_17_11_11_0F_00, 0x11_11_11_1F_11_11_11_00, 0x0E_04_04_04_04_04_0E_00, // G H I
    0x07_02_02_02_02_12_0C_00, 0x11_12_14_18_14_12_11_00, 0x10_10_10_10_10_10_1F_00, // J K L
    0x11_1B_15_15_11_11_11_00, 0x11_11_19_15_13_11_11_00, 0x0E_11_11_11_11_11_0E_00, // M N O
    0x1E_11_11_1E_10_10_10_00, 0x0E_11_11_11_15_12_0D_00, 0x1E_11_11_1E_14_12_11_00, // P Q R
    0x0F_10_10_0E_01_01_1E_00, 0x1F_04_04_04_04_04_04_00, 0x11_11_11_11_11_11_0E_00, // S T U
    0x11_11_11_11_11_0A_04_00, 0x11_11_11_15_15_15_0A_00, 0x11_11_0A_04_0A_11_11_00, // V W X
    0x11_11_11_0A_04_04_04_00, 0x1F_01_02_04_08_10_1F_00, 0x0E_08_08_08_08_08_0E_00, // Y Z [
    0x00_10_08_04_02_01_00_00, 0x0E_02_02_02_02_02_0E_00, 0x04_0A_11_00_00_00_00_00, // \ ] ^
    0x00_00_00_00_00_00_1F_00, 0x08_04_02_00_00_00_00_00, 0x00_00_0E_01_0F_11_0F_00, // _ ` a
    0x10_10_16_19_11_11_1E_00, 0x00_00_0E_10_10_11_0E_00, 0x01_01_0D_13_11_11_0F_00, // b c d
    0x00_00_0E_11_1F_10_0E_00, 0x06_09_08_1C_08_08_08_00, 0x00_00_0F_11_11_0F_01_0E, // e f g
    0x10_10_16_19_11_11_11_00, 0x04_00_0C_04_04_04_0E_00, 0x02_00_06_02_02_02_12_0C, // h i j
    0x10_10_12_14_18_14_12_00, 0x0C_04_04_04_04_04_0E_00, 0x00_00_1A_15_15_11_11_00, // k l m
    0x00_00_16_19_11_11_11_00, 0x00_00_0E_11_11_11_0E_00, 0x00_00_1E_11_11_1E_10_10, // n o p
    0x00_00_0F_11_11_0F_01_01, 0x00_00_16_19_10_10_10_00, 0x00_00_0E_10_0E_01_1E_00, // q r s
    0x08_08_1C_08_08_09_06_00, 0x00_00_11_11_11_13_0D_00, 0x00_00_11_11_11_0A_04_00, // t u v
    0x00_00_11_11_15_15_0A_00, 0x00_00_11_0A_04_0A_11_00, 0x00_00_11_11_11_0F_01_0E, // w x y
    0x00_00_1F_02_04_08_1F_00, 0x02_04_04_08_04_04_02_00, 0x04_04_04_04_04_04_04_00, // z { |
    0x08_04_04_02_04_04_08_00, 0x00_00_08_15_02_00_00_00, // } ~
];

/// The glyph of `c`; '?' for characters outside printable ASCII.
fn glyph(c: char) -> u64 {
    let question_mark = FONT[usize::from(b'?') - 0x20];
    FONT.get((c as usize).wrapping_sub(0x20))
        .copied()
        .unwrap_or(question_mark)
}

/// Width in pixels of `text` drawn by [`Canvas::text`] (no blank after the last glyph).
pub(crate) fn text_width(text: &str) -> usize {
    (text.chars().count() * ADVANCE).saturating_sub(TEXT_SCALE)
}

/// An RGB image, row-major, 3 bytes a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Canvas {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) rgb: Vec<u8>,
}

impl Canvas {
    pub(crate) fn new(width: usize, height: usize, colour: [u8; 3]) -> Self {
        Self {
            width,
            height,
            rgb: colour.repeat(width * height),
        }
    }

    /// Set one pixel; pixels outside the canvas are dropped.
    pub(crate) fn set(&mut self, x: usize, y: usize, colour: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = 3 * (y * self.width + x);
            self.rgb[i..i + 3].copy_from_slice(&colour);
        }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    pub(crate) fn fill_rect(&mut self, x: usize, y: usize, w: usize, h: usize, colour: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, colour);
            }
        }
    }

    /// Draw `text` with its top-left corner at (x, y).
    pub(crate) fn text(&mut self, x: usize, y: usize, text: &str, colour: [u8; 3]) {
        for (n, c) in text.chars().enumerate() {
            let g = glyph(c);
            for row in 0..8 {
                let bits = (g >> (8 * (7 - row))) & 0x1F;
                for col in 0..5 {
                    if bits & (1 << (4 - col)) != 0 {
                        let (px, py) = (x + n * ADVANCE + col * TEXT_SCALE, y + row * TEXT_SCALE);
                        self.fill_rect(px, py, TEXT_SCALE, TEXT_SCALE, colour);
                    }
                }
            }
        }
    }

    /// Draw `text` downwards, one character a line, the first with its top-left corner at
    /// (x, y) (the font has no rotated glyphs).
    pub(crate) fn text_down(&mut self, x: usize, y: usize, text: &str, colour: [u8; 3]) {
        let mut buf = [0; 4];
        for (n, c) in text.chars().enumerate() {
            self.text(x, y + n * LINE_HEIGHT, c.encode_utf8(&mut buf), colour);
        }
    }
}

/// Encode `canvas` as an 8-bit RGB PNG at `path`, through a temporary file renamed into place:
/// a full disk or a kill never leaves a cut-off image (or an earlier one half overwritten).
pub(crate) fn write_png(path: &Path, canvas: &Canvas) -> Result<(), StoreError> {
    let too_big = |_| StoreError::io(path, std::io::Error::other("image too large for PNG"));
    let width = u32::try_from(canvas.width).map_err(too_big)?;
    let height = u32::try_from(canvas.height).map_err(too_big)?;
    let tmp = crate::manifest::temporary_path(path);
    let written = (|| {
        let png_error = |e: png::EncodingError| StoreError::io(path, std::io::Error::other(e));
        let file = File::create(&tmp).map_err(|e| StoreError::io(path, e))?;
        let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(&canvas.rgb).map_err(png_error)?;
        writer.finish().map_err(png_error)?;
        std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn font_glyphs_fit_5_columns_and_only_space_is_blank() {
        for (c, &g) in (' '..='~').zip(&FONT) {
            assert_eq!(g & !0x1F_1F_1F_1F_1F_1F_1F_1F, 0, "{c:?} too wide");
            assert_eq!(g == 0, c == ' ', "{c:?}");
        }
        assert_eq!((' '..='~').count(), FONT.len());
        assert_eq!(glyph('é'), glyph('?'));
        assert_eq!(glyph('A'), 0x0E_11_11_11_1F_11_11_00);
    }

    #[test]
    fn text_is_dark_inside_its_box_and_nowhere_else() {
        let (x0, y0, text) = (5, 7, "Ab%9 (x)/.-_g");
        let (xs, ys) = (x0..x0 + text_width(text), y0..y0 + TEXT_HEIGHT);
        let mut canvas = Canvas::new(xs.end + 10, ys.end + 10, WHITE);
        canvas.text(x0, y0, text, BLACK);
        let mut dark = 0;
        for (y, x) in (0..canvas.height).flat_map(|y| (0..canvas.width).map(move |x| (y, x))) {
            let px = canvas.get(x, y);
            assert!(px == WHITE || px == BLACK);
            if px == BLACK {
                assert!(xs.contains(&x) && ys.contains(&y), "({x}, {y})");
                dark += 1;
            }
        }
        assert!(dark > 100, "{dark}");
        // The box is tight: 'A' reaches its left edge, 'b' its top, 'g' its bottom and right.
        assert_eq!(canvas.get(x0, y0 + TEXT_HEIGHT / 2), BLACK);
        assert!(xs.clone().any(|x| canvas.get(x, y0) == BLACK));
        assert!(xs.clone().any(|x| canvas.get(x, ys.end - 1) == BLACK));
        assert!(ys.clone().any(|y| canvas.get(xs.end - 1, y) == BLACK));
        assert_eq!(text_width(""), 0);
        assert_eq!(text_width("ab"), 2 * ADVANCE - TEXT_SCALE);
    }
}
