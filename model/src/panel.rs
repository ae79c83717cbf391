//! PNG panels of an MAE step (people judge an MAE by looking): for up to four samples, the
//! input (first channel), what the encoder saw (masked patches grey), and the reconstruction
//! (visible patches from the input, masked ones from the prediction, un-normalised with each
//! patch's own mean and variance over its valid values).

use std::io::BufWriter;
use std::path::Path;

use crate::mae::Masking;

/// Normalised values in `[-3, 3]` map to 0…255; invalid pixels are black.
fn grey(v: f32) -> u8 {
    ((v.clamp(-3.0, 3.0) + 3.0) / 6.0 * 255.0).round() as u8
}

/// Grey of a masked patch in the middle column.
pub const MASKED_GREY: u8 = 128;

/// Build the panel: `images` `[B, C, n, n]` and `valid` `[B, n, n]` flattened, `pred`
/// `[B][N][C·p·p]`. Returns `(width, height, grey pixels)`.
pub fn panel(
    images: &[f32],
    valid: &[f32],
    pred: &[Vec<Vec<f32>>],
    masking: &Masking,
    channels: usize,
    n: usize,
    patch: usize,
) -> (usize, usize, Vec<u8>) {
    let rows = pred.len().min(4);
    let gap = 4;
    let width = 3 * n + 2 * gap;
    let height = rows * n + rows.saturating_sub(1) * gap;
    let mut out = vec![255u8; width * height];
    let grid = n / patch;
    let pv = channels * patch * patch;
    for b in 0..rows {
        let img = &images[b * channels * n * n..(b + 1) * channels * n * n];
        let val = &valid[b * n * n..(b + 1) * n * n];
        let y0 = b * (n + gap);
        for (t, pred_t) in pred[b].iter().enumerate().take(grid * grid) {
            let (r, c) = (t / grid, t % grid);
            let masked = masking.is_masked(b, t);
            // The patch's values in (channel, i, j) order, with their validity.
            let mut vals = Vec::with_capacity(pv);
            let mut ok = Vec::with_capacity(pv);
            for ch in 0..channels {
                for i in 0..patch {
                    for j in 0..patch {
                        let (y, x) = (r * patch + i, c * patch + j);
                        vals.push(img[ch * n * n + y * n + x]);
                        ok.push(val[y * n + x] > 0.5);
                    }
                }
            }
            let cnt = ok.iter().filter(|&&o| o).count() as f32;
            let mean = vals
                .iter()
                .zip(&ok)
                .filter(|(_, o)| **o)
                .map(|(v, _)| v)
                .sum::<f32>()
                / cnt.max(1.0);
            let var = vals
                .iter()
                .zip(&ok)
                .filter(|(_, o)| **o)
                .map(|(v, _)| (v - mean).powi(2))
                .sum::<f32>()
                / (cnt - 1.0).max(1.0);
            let std = (var + 1e-6).sqrt();
            for i in 0..patch {
                for j in 0..patch {
                    let (y, x) = (r * patch + i, c * patch + j);
                    let k = i * patch + j; // channel 0
                    let input = if ok[k] { grey(vals[k]) } else { 0 };
                    let row = (y0 + y) * width;
                    out[row + x] = input;
                    out[row + n + gap + x] = if masked { MASKED_GREY } else { input };
                    out[row + 2 * (n + gap) + x] = if !masked {
                        input
                    } else if ok[k] {
                        grey(pred_t[k] * std + mean)
                    } else {
                        0
                    };
                }
            }
        }
    }
    (width, height, out)
}

/// Write a grey panel as PNG, through a temporary file renamed into place (a full disk or a
/// kill never leaves a cut-off image).
pub fn write_png(path: &Path, width: usize, height: usize, pixels: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(name);
    let written = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(std::io::Error::other)?;
        w.write_image_data(pixels).map_err(std::io::Error::other)?;
        w.finish().map_err(std::io::Error::other)?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_png_write_leaves_the_earlier_image_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        write_png(&path, 2, 2, &[0, 64, 128, 255]).unwrap();
        let before = std::fs::read(&path).unwrap();
        assert_eq!(&before[..8], b"\x89PNG\r\n\x1a\n");
        // Three pixels for a 2 x 2 image: the encoder fails part-way.
        assert!(write_png(&path, 2, 2, &[1, 2, 3]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["p.png"]);
    }

    #[test]
    fn panel_columns_show_input_masked_and_reconstruction() {
        // One sample, 1 channel, 4 × 4 image, patch 2 → 4 tokens; tokens 1 and 2 masked.
        let n = 4;
        let images: Vec<f32> = (0..16).map(|i| i as f32 / 8.0 - 1.0).collect();
        let valid = vec![1.0f32; 16];
        let masking = Masking::from_noise(&[vec![0.1, 0.8, 0.9, 0.2]], 0.5);
        assert!(masking.is_masked(0, 1) && masking.is_masked(0, 2));
        // Predict exactly the normalised target: the reconstruction equals the input.
        let mut pred = vec![vec![vec![0f32; 4]; 4]];
        for (t, p) in pred[0].iter_mut().enumerate() {
            let (r, c) = (t / 2, t % 2);
            let v: Vec<f32> = (0..4)
                .map(|k| images[(r * 2 + k / 2) * n + c * 2 + k % 2])
                .collect();
            let mean = v.iter().sum::<f32>() / 4.0;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 3.0;
            for (p, x) in p.iter_mut().zip(&v) {
                *p = (x - mean) / (var + 1e-6).sqrt();
            }
        }
        let (w, h, px) = panel(&images, &valid, &pred, &masking, 1, n, 2);
        assert_eq!((w, h), (3 * 4 + 8, 4));
        for y in 0..4 {
            for x in 0..4 {
                let input = px[y * w + x];
                assert_eq!(input, grey(images[y * n + x]));
                let token = (y / 2) * 2 + x / 2;
                let seen = px[y * w + n + 4 + x];
                assert_eq!(
                    seen,
                    if masking.is_masked(0, token) {
                        MASKED_GREY
                    } else {
                        input
                    }
                );
                let recon = px[y * w + 2 * (n + 4) + x];
                assert!((i32::from(recon) - i32::from(input)).abs() <= 1, "{y} {x}");
            }
        }
        let dir = std::env::temp_dir().join(format!("icefm-panel-{}", std::process::id()));
        let path = dir.join("p.png");
        write_png(&path, w, h, &px).expect("png");
        assert!(std::fs::metadata(&path).expect("written").len() > 50);
        let _ = std::fs::remove_dir_all(dir);
    }
}
