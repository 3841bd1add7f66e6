//! Kosmos-2.5 image preprocessing: HF `Kosmos2_5ImageProcessor` (transformers 5, torchvision backend), a
//! Pix2Struct-style page to a variable grid of flattened patches.
//!
//! Order and arithmetic, as HF:
//! 1. **Normalise per image**, on the u8 values as f32: `(x - mean) / max(std, 1 / sqrt(n))` over all `n = 3 * h *
//!    w` values, `std` unbiased (`torch.std`). Mean and std are accumulated in f64 and rounded to f32 (torch reduces
//!    in f32 with cascaded sums and gets the same value to within an ulp).
//! 2. **Resize to the patch grid**: the largest `rows x cols` grid with `rows * cols <= max_patches` (aspect kept,
//!    each side at least one patch), by `torch.nn.functional.interpolate(bilinear, antialias=True,
//!    align_corners=False)` on the normalised floats: ATen's separable antialiased kernel, weights computed in f32
//!    as ATen computes them, width first, then height, a pass whose size does not change skipped.
//! 3. **Flatten**: patch `(r, c)` becomes row `r * cols + c` of `[r + 1, c + 1, values...]`, the values ordered
//!    (y in patch, x in patch, channel); rows up to `max_patches` are zeros, and `attention_mask` is 1 exactly on
//!    the rows whose sum is not zero.
//!
//! The output is what the vision encoder takes: `max_patches` rows of `2 + patch_height * patch_width * 3` values,
//! plus the resized `width`/`height` and the grid, which post-processing needs to map boxes back to the page.

use std::path::Path;

use image::RgbImage;
use serde_json::{Map, Value};

use crate::error::{ConfigError, PreprocessError};

/// The most patches a configuration may ask for (Kosmos-2.5 uses 4096; one row is 770 floats at 16x16).
pub const MAX_PATCHES_LIMIT: usize = 16_384;

/// The largest patch side a configuration may ask for.
pub const MAX_PATCH_SIDE: u32 = 64;

/// A validated `Kosmos2_5ImageProcessor` configuration (`preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlattenedPatchConfig {
    /// Patch height in pixels (`patch_size.height`, HF default 16).
    pub patch_height: u32,
    /// Patch width in pixels (`patch_size.width`, HF default 16).
    pub patch_width: u32,
    /// Rows of the output (`max_patches`, HF default 4096): the patch budget of a page.
    pub max_patches: usize,
}

impl Default for FlattenedPatchConfig {
    fn default() -> Self {
        FlattenedPatchConfig {
            patch_height: 16,
            patch_width: 16,
            max_patches: 4096,
        }
    }
}

impl FlattenedPatchConfig {
    /// Parses the text of a Kosmos-2.5 `preprocessor_config.json`. Missing keys take HF's defaults; `do_normalize:
    /// false` is refused (HF would then resize the u8 tensor through another kernel, which no Kosmos-2.5 uses).
    pub fn from_json_str(json: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(json).map_err(|err| ConfigError::Json(err.to_string()))?;
        let Value::Object(map) = value else {
            return Err(ConfigError::Json(format!("got {value}")));
        };
        Self::from_map(&map)
    }

    /// Reads and parses a Kosmos-2.5 `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::from_json_str(&crate::config::read_text(path.as_ref())?)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        if let Some(value) = map.get("do_normalize")
            && !value.is_null()
            && value.as_bool() != Some(true)
        {
            return Err(ConfigError::InvalidKey {
                key: "do_normalize",
                message: format!("must be true (per-image normalisation), got {value}"),
            });
        }
        let (patch_height, patch_width) = match map.get("patch_size") {
            None | Some(Value::Null) => (defaults.patch_height, defaults.patch_width),
            Some(value) => {
                let side = |name: &str| {
                    value
                        .get(name)
                        .and_then(Value::as_u64)
                        .filter(|&side| (1..=u64::from(MAX_PATCH_SIDE)).contains(&side))
                        .map(|side| side as u32)
                };
                match (side("height"), side("width")) {
                    (Some(height), Some(width)) => (height, width),
                    _ => {
                        return Err(ConfigError::InvalidKey {
                            key: "patch_size",
                            message: format!(
                                "must be {{\"height\", \"width\"}} with sides 1..={MAX_PATCH_SIDE}, got {value}"
                            ),
                        });
                    }
                }
            }
        };
        let max_patches = match map.get("max_patches") {
            None | Some(Value::Null) => defaults.max_patches,
            Some(value) => value
                .as_u64()
                .filter(|&n| (1..=MAX_PATCHES_LIMIT as u64).contains(&n))
                .map(|n| n as usize)
                .ok_or_else(|| ConfigError::InvalidKey {
                    key: "max_patches",
                    message: format!("must be an integer in 1..={MAX_PATCHES_LIMIT}, got {value}"),
                })?,
        };
        Ok(FlattenedPatchConfig {
            patch_height,
            patch_width,
            max_patches,
        })
    }

    /// Values in one output row: the row and column ids, then the patch's pixels.
    pub fn row_len(&self) -> usize {
        2 + (self.patch_height * self.patch_width) as usize * 3
    }

    /// The patch grid `(rows, cols)` HF picks for an image of `(height, width)`: the scale that would fill
    /// `max_patches` exactly, floored to whole patches per side, each side in `1..=max_patches`.
    pub fn grid(&self, (height, width): (u32, u32)) -> (usize, usize) {
        let (patch_height, patch_width) =
            (f64::from(self.patch_height), f64::from(self.patch_width));
        let (height, width) = (f64::from(height), f64::from(width));
        // Python: math.sqrt(max_patches * (patch_height / image_height) * (patch_width / image_width))
        let scale =
            (self.max_patches as f64 * (patch_height / height) * (patch_width / width)).sqrt();
        let side = |pixels: f64, patch: f64| {
            ((scale * pixels / patch).floor() as usize).clamp(1, self.max_patches)
        };
        (side(height, patch_height), side(width, patch_width))
    }
}

/// A page as the Kosmos-2.5 vision encoder takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlattenedPatches {
    /// `max_patches * row_len` values, row-major: row `r * cols + c` is `[r + 1, c + 1, pixels...]` with the
    /// pixels ordered (y, x, channel) within the patch; rows from `rows * cols` on are zeros.
    pub data: Vec<f32>,
    /// `max_patches` values: 1 on rows whose sum is not zero (the patches), else 0.
    pub attention_mask: Vec<f32>,
    /// Values per row, `2 + patch_height * patch_width * 3`.
    pub row_len: usize,
    /// Patch rows of the resized page.
    pub rows: usize,
    /// Patch columns of the resized page.
    pub cols: usize,
    /// Width of the resized page in pixels (`cols * patch_width`).
    pub width: usize,
    /// Height of the resized page in pixels (`rows * patch_height`).
    pub height: usize,
}

impl FlattenedPatches {
    /// The number of output rows (`max_patches`).
    pub fn max_patches(&self) -> usize {
        self.attention_mask.len()
    }
}

/// Runs `Kosmos2_5ImageProcessor` on an RGB image.
pub fn flatten_patches(
    image: &RgbImage,
    config: &FlattenedPatchConfig,
) -> Result<FlattenedPatches, PreprocessError> {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::EmptyImage { width, height });
    }
    let (width, height) = (width as usize, height as usize);

    // 1. Per-image normalisation, channels first.
    let raw = image.as_raw();
    let count = raw.len();
    let mean = raw.iter().map(|&v| f64::from(v)).sum::<f64>() / count as f64;
    let variance = raw
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (count.max(2) - 1) as f64;
    let mean = mean as f32;
    let std = (variance.sqrt() as f32).max((1.0 / (count as f64).sqrt()) as f32);
    let plane = width * height;
    let mut pixels = vec![0f32; count];
    for (index, pixel) in raw.chunks_exact(3).enumerate() {
        for (channel, &value) in pixel.iter().enumerate() {
            pixels[channel * plane + index] = (f32::from(value) - mean) / std;
        }
    }

    // 2. Resize to whole patches.
    let (rows, cols) = config.grid((height as u32, width as u32));
    let (patch_height, patch_width) = (config.patch_height as usize, config.patch_width as usize);
    let (out_height, out_width) = (rows * patch_height, cols * patch_width);
    let resized = resize_bilinear_antialias(&pixels, (height, width), (out_height, out_width));

    // 3. Flatten, pad, mask.
    let row_len = config.row_len();
    let out_plane = out_height * out_width;
    let mut data = vec![0f32; config.max_patches * row_len];
    let mut attention_mask = vec![0f32; config.max_patches];
    for r in 0..rows {
        for c in 0..cols {
            let index = r * cols + c;
            let row = &mut data[index * row_len..(index + 1) * row_len];
            row[0] = (r + 1) as f32;
            row[1] = (c + 1) as f32;
            let mut at = 2;
            for y in 0..patch_height {
                for x in 0..patch_width {
                    let offset = (r * patch_height + y) * out_width + c * patch_width + x;
                    for channel in 0..3 {
                        row[at] = resized[channel * out_plane + offset];
                        at += 1;
                    }
                }
            }
            let sum: f32 = row.iter().sum();
            attention_mask[index] = if sum != 0.0 { 1.0 } else { 0.0 };
        }
    }
    Ok(FlattenedPatches {
        data,
        attention_mask,
        row_len,
        rows,
        cols,
        width: out_width,
        height: out_height,
    })
}

/// ATen's antialiased interpolation weights of one dimension (`_compute_index_ranges_weights` with the bilinear
/// `aa_filter`, in f32 as for a float tensor): per output index, the first input index and its weights.
fn aa_weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    // area_pixel_compute_scale<float>: input / output in f32.
    let scale = input as f32 / output as f32;
    // interp_size 2 for bilinear; the support grows with the downscale factor (the antialiasing).
    let support: f32 = if scale >= 1.0 { scale } else { 1.0 };
    let max_taps = (support.ceil() as usize) * 2 + 1;
    let invscale: f32 = if scale >= 1.0 {
        (1.0 / f64::from(scale)) as f32
    } else {
        1.0
    };
    let filter = |x: f32| -> f32 {
        let x = x.abs();
        if x < 1.0 {
            (1.0 - f64::from(x)) as f32
        } else {
            0.0
        }
    };
    (0..output)
        .map(|i| {
            // `scale * (i + 0.5)` evaluates in f64 and is stored as f32.
            let center = (f64::from(scale) * (i as f64 + 0.5)) as f32;
            let first = ((f64::from(center - support) + 0.5) as i64).max(0) as usize;
            let end = ((f64::from(center + support) + 0.5) as i64).min(input as i64);
            let taps = (end - first as i64).clamp(0, max_taps as i64) as usize;
            let mut weights: Vec<f32> = (0..taps)
                .map(|j| {
                    // `(j + xmin - center + 0.5) * invscale`: the integer minus the f32, then f64, then f32.
                    let offset = ((j + first) as f32 - center) as f64 + 0.5;
                    filter((offset * f64::from(invscale)) as f32)
                })
                .collect();
            let total: f32 = weights.iter().fold(0.0, |sum, &w| sum + w);
            if total != 0.0 {
                for weight in &mut weights {
                    *weight /= total;
                }
            }
            (first, weights)
        })
        .collect()
}

/// `interpolate(bilinear, antialias=True, align_corners=False)` of a 3-channel channels-first f32 image.
fn resize_bilinear_antialias(
    pixels: &[f32],
    (height, width): (usize, usize),
    (out_height, out_width): (usize, usize),
) -> Vec<f32> {
    let mut current = pixels.to_vec();
    let mut current_width = width;
    if out_width != width {
        let weights = aa_weights(width, out_width);
        let mut next = vec![0f32; 3 * height * out_width];
        for (line, out) in current
            .chunks_exact(width)
            .zip(next.chunks_exact_mut(out_width))
        {
            for (value, (first, taps)) in out.iter_mut().zip(&weights) {
                *value = dot(&line[*first..], taps, 1);
            }
        }
        current = next;
        current_width = out_width;
    }
    if out_height != height {
        let weights = aa_weights(height, out_height);
        let mut next = vec![0f32; 3 * out_height * current_width];
        for channel in 0..3 {
            let source = &current[channel * height * current_width..][..height * current_width];
            let target =
                &mut next[channel * out_height * current_width..][..out_height * current_width];
            for (y, (first, taps)) in weights.iter().enumerate() {
                for x in 0..current_width {
                    target[y * current_width + x] =
                        dot(&source[first * current_width + x..], taps, current_width);
                }
            }
        }
        current = next;
    }
    current
}

/// `src[0] * w[0] + src[stride] * w[1] + ...`, accumulated left to right in f32 as ATen does.
fn dot(source: &[f32], weights: &[f32], stride: usize) -> f32 {
    let mut taps = weights.iter().enumerate();
    let Some((_, &first)) = taps.next() else {
        return 0.0;
    };
    let mut total = source[0] * first;
    for (j, &weight) in taps {
        total += source[j * stride] * weight;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_the_largest_that_fits_and_keeps_the_aspect() {
        let config = FlattenedPatchConfig::default();
        // A4 at 150 dpi: 1754 x 1240 (h x w).
        let (rows, cols) = config.grid((1754, 1240));
        assert!(rows * cols <= 4096, "{rows}x{cols}");
        assert_eq!((rows, cols), (76, 53));
        // A long strip still gets one patch on its short side.
        assert_eq!(config.grid((1, 100_000)).0, 1);
        let small = FlattenedPatchConfig {
            max_patches: 1,
            ..config
        };
        assert_eq!(small.grid((3000, 20)), (1, 1));
    }

    #[test]
    fn configs_take_hf_defaults_and_name_bad_keys() {
        let config = FlattenedPatchConfig::from_json_str(
            r#"{"image_processor_type": "Kosmos2_5ImageProcessor", "max_patches": 1024}"#,
        )
        .expect("parses");
        assert_eq!(
            config,
            FlattenedPatchConfig {
                patch_height: 16,
                patch_width: 16,
                max_patches: 1024
            }
        );
        for (json, key) in [
            (r#"{"max_patches": 0}"#, "max_patches"),
            (r#"{"max_patches": 100000}"#, "max_patches"),
            (r#"{"patch_size": {"height": 16}}"#, "patch_size"),
            (
                r#"{"patch_size": {"height": 0, "width": 16}}"#,
                "patch_size",
            ),
            (r#"{"do_normalize": false}"#, "do_normalize"),
        ] {
            let err = FlattenedPatchConfig::from_json_str(json).expect_err(json);
            assert!(err.to_string().contains(key), "{json}: {err}");
        }
    }

    #[test]
    fn a_constant_image_is_all_zero_pixels_and_still_masked_in() {
        let image = RgbImage::from_pixel(20, 10, image::Rgb([200, 200, 200]));
        let config = FlattenedPatchConfig {
            patch_height: 4,
            patch_width: 4,
            max_patches: 5,
        };
        let out = flatten_patches(&image, &config).expect("flattens");
        assert_eq!((out.rows, out.cols), (1, 3));
        assert_eq!(out.attention_mask, vec![1., 1., 1., 0., 0.]);
        assert_eq!(&out.data[..2], &[1.0, 1.0]);
        assert!(out.data[2..out.row_len].iter().all(|&v| v == 0.0));
        assert_eq!(&out.data[2 * out.row_len..2 * out.row_len + 2], &[1.0, 3.0]);
        assert!(out.data[3 * out.row_len..].iter().all(|&v| v == 0.0));
    }
}
