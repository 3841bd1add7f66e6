//! A faithful port of Pillow's separable resampler for 8-bit images (`libImaging/Resample.c`).
//!
//! HF's image processors resize through `PIL.Image.resize`, so matching HF's `pixel_values` means matching
//! Pillow bit for bit:
//! - coefficients come from `precompute_coeffs` (the filter support grows with the downscale factor, which
//!   is the antialiasing; bounds are rounded with C's truncating `(int)(x + 0.5)`);
//! - each row of coefficients is normalised to sum 1 in f64, then converted to fixed point with
//!   `PRECISION_BITS = 22` (`normalize_coeffs_8bpc`, rounding half away from zero);
//! - the horizontal pass runs first, then the vertical pass, each accumulating in i32 from `1 << 21`
//!   and clipping `acc >> 22` to 0..=255, so the intermediate image is rounded to u8 like Pillow's;
//! - a pass whose size does not change is skipped (Pillow copies).
//!
//! torchvision's uint8 antialiased resize (`F.resize(uint8_tensor, antialias=True)`, what HF's
//! torchvision backend runs on CPU) is the same algorithm, ported from Pillow-SIMD, with two arithmetic
//! differences reproduced by [`ResizeArithmetic::Torchvision`]: the weights are i16 with a precision chosen
//! per direction from the largest weight (`_compute_index_ranges_int16_weights`), and the outer cubic
//! branch is evaluated as `((a*x - 5a)*x + 8a)*x - 4a` (ATen's `cubic_convolution2`).

use crate::config::Resample;

/// Whose fixed-point arithmetic the resampler reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeArithmetic {
    /// Pillow's `ImagingResample` on 8-bit images (22-bit i32 weights).
    Pillow,
    /// torchvision/ATen's uint8 antialiased kernel (i16 weights, dynamic precision).
    Torchvision,
}

/// Pillow's fixed-point precision for 8-bit images: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 22;

impl Resample {
    /// Filter support in input pixels at scale 1.
    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// The filter kernel, exactly as Pillow (or ATen) evaluates it (f64).
    fn weight(self, x: f64, arithmetic: ResizeArithmetic) -> f64 {
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes the window constants as C floats (`0.54f`, `0.46f`).
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    match arithmetic {
                        ResizeArithmetic::Pillow => (((x - 5.0) * x + 8.0) * x - 4.0) * A,
                        ResizeArithmetic::Torchvision => {
                            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                        }
                    }
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Fixed-point coefficients of one resampling direction.
struct Coefficients {
    /// Fractional bits of the weights.
    precision: u32,
    /// Maximum taps per output sample (the row stride of `weights`).
    taps: usize,
    /// Per output sample: first input index and number of taps used.
    bounds: Vec<(usize, usize)>,
    /// `out_size * taps` fixed-point weights.
    weights: Vec<i32>,
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc` (Pillow) or the i16 conversion of
/// `_compute_index_ranges_int16_weights` (ATen), for the box `[0, in_size)`.
fn precompute_coefficients(
    in_size: usize,
    out_size: usize,
    filter: Resample,
    arithmetic: ResizeArithmetic,
) -> Coefficients {
    // Pillow receives the box as C floats: `(double)(in1 - in0) / outSize`.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let taps = support.ceil() as usize * 2 + 1;
    let inverse_filter_scale = 1.0 / filter_scale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut normalised_weights = vec![0.0f64; out_size * taps];
    let mut largest_weight = 0.0f64;
    for (out_index, row) in normalised_weights.chunks_exact_mut(taps).enumerate() {
        let center = f64::from(in0) + (out_index as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; Rust's `as` does the same (and saturates).
        let first = ((center - support + 0.5) as i64).max(0);
        let end = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (end - first).max(0) as usize;
        let first = first as usize;

        let count = count.min(taps);
        let mut total = 0.0f64;
        for (tap, slot) in row.iter_mut().enumerate().take(count) {
            let weight = filter.weight(
                ((tap + first) as f64 - center + 0.5) * inverse_filter_scale,
                arithmetic,
            );
            *slot = weight;
            total += weight;
        }
        if total != 0.0 {
            for slot in row.iter_mut().take(count) {
                *slot /= total;
                largest_weight = largest_weight.max(*slot);
            }
        }
        bounds.push((first, count));
    }
    let precision = match arithmetic {
        ResizeArithmetic::Pillow => PRECISION_BITS,
        ResizeArithmetic::Torchvision => int16_precision(largest_weight),
    };
    let scale = f64::from(1u32 << precision);
    // Both round half away from zero with C's truncating cast.
    let weights = normalised_weights
        .iter()
        .map(|&weight| {
            let fixed = weight * scale;
            let rounded = if weight < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
            match arithmetic {
                ResizeArithmetic::Pillow => rounded,
                // ATen stores the value in an int16_t.
                ResizeArithmetic::Torchvision => i32::from(rounded as i16),
            }
        })
        .collect();
    Coefficients {
        precision,
        taps,
        bounds,
        weights,
    }
}

/// ATen's weight precision: starting from 0, `p` grows while `round(max_weight * 2^(p+1)) < 2^15`, up to 22,
/// so that the largest weight uses the i16 range.
fn int16_precision(largest_weight: f64) -> u32 {
    let mut precision = 0u32;
    while precision < 22 {
        let next_value = (0.5 + largest_weight * f64::from(1u32 << (precision + 1))) as i32;
        if next_value >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    precision
}

/// Pillow's `clip8`: round (the accumulator starts at one half) and clamp to u8.
#[inline]
fn clip8(accumulator: i32, precision: u32) -> u8 {
    (accumulator >> precision).clamp(0, 255) as u8
}

/// The rounding term the accumulators start from.
fn rounding_half(precision: u32) -> i32 {
    if precision == 0 {
        0
    } else {
        1 << (precision - 1)
    }
}

/// Resamples one dimension of interleaved 3-channel rows: (rows, in_width, 3) -> (rows, out_width, 3).
fn resample_horizontal(
    input: &[u8],
    rows: usize,
    in_width: usize,
    coefficients: &Coefficients,
) -> Vec<u8> {
    let out_width = coefficients.bounds.len();
    let mut output = vec![0u8; rows * out_width * 3];
    for (in_row, out_row) in input
        .chunks_exact(in_width * 3)
        .zip(output.chunks_exact_mut(out_width * 3))
    {
        for (out_x, out_pixel) in out_row.chunks_exact_mut(3).enumerate() {
            let (first, count) = coefficients.bounds[out_x];
            let weights = &coefficients.weights[out_x * coefficients.taps..][..count];
            let taps = &in_row[first * 3..(first + count) * 3];
            let mut accumulators = [rounding_half(coefficients.precision); 3];
            for (pixel, &weight) in taps.chunks_exact(3).zip(weights) {
                accumulators[0] += i32::from(pixel[0]) * weight;
                accumulators[1] += i32::from(pixel[1]) * weight;
                accumulators[2] += i32::from(pixel[2]) * weight;
            }
            for (out_value, accumulator) in out_pixel.iter_mut().zip(accumulators) {
                *out_value = clip8(accumulator, coefficients.precision);
            }
        }
    }
    output
}

/// Resamples the other dimension: (in_height, width, 3) -> (out_height, width, 3).
fn resample_vertical(input: &[u8], width: usize, coefficients: &Coefficients) -> Vec<u8> {
    let row_len = width * 3;
    let out_height = coefficients.bounds.len();
    let mut output = vec![0u8; out_height * row_len];
    let mut accumulators = vec![0i32; row_len];
    for (out_y, out_row) in output.chunks_exact_mut(row_len).enumerate() {
        let (first, count) = coefficients.bounds[out_y];
        let weights = &coefficients.weights[out_y * coefficients.taps..][..count];
        accumulators.fill(rounding_half(coefficients.precision));
        // Row-major accumulation gives the same integer sums as Pillow's per-pixel loop.
        for (tap, &weight) in weights.iter().enumerate() {
            let in_row = &input[(first + tap) * row_len..][..row_len];
            for (accumulator, &value) in accumulators.iter_mut().zip(in_row) {
                *accumulator += i32::from(value) * weight;
            }
        }
        for (out_value, &accumulator) in out_row.iter_mut().zip(&accumulators) {
            *out_value = clip8(accumulator, coefficients.precision);
        }
    }
    output
}

/// Resizes an interleaved RGB u8 image like `PIL.Image.resize((out_width, out_height), filter)` or
/// torchvision's uint8 antialiased resize, depending on `arithmetic`.
///
/// `pixels` holds `height * width * 3` bytes; the result holds `out_height * out_width * 3`. All sizes
/// must be non-zero (the caller checks).
pub(crate) fn resize_rgb8(
    pixels: &[u8],
    (width, height): (usize, usize),
    (out_width, out_height): (usize, usize),
    filter: Resample,
    arithmetic: ResizeArithmetic,
) -> Vec<u8> {
    debug_assert_eq!(pixels.len(), width * height * 3);
    debug_assert!(width > 0 && height > 0 && out_width > 0 && out_height > 0);
    let need_horizontal = out_width != width;
    let need_vertical = out_height != height;
    if !need_horizontal && !need_vertical {
        return pixels.to_vec();
    }
    let vertical = precompute_coefficients(height, out_height, filter, arithmetic);
    if !need_horizontal {
        return resample_vertical(pixels, width, &vertical);
    }
    let horizontal = precompute_coefficients(width, out_width, filter, arithmetic);
    if !need_vertical {
        return resample_horizontal(pixels, height, width, &horizontal);
    }
    // Like Pillow, only the source rows the vertical pass reads go through the horizontal pass.
    let first_row = vertical.bounds.first().map_or(0, |&(first, _)| first);
    let end_row = vertical
        .bounds
        .last()
        .map_or(height, |&(first, count)| first + count);
    let band = &pixels[first_row * width * 3..end_row * width * 3];
    let intermediate = resample_horizontal(band, end_row - first_row, width, &horizontal);
    let shifted = Coefficients {
        precision: vertical.precision,
        taps: vertical.taps,
        bounds: vertical
            .bounds
            .iter()
            .map(|&(first, count)| (first - first_row, count))
            .collect(),
        weights: vertical.weights,
    };
    resample_vertical(&intermediate, out_width, &shifted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: [ResizeArithmetic; 2] = [ResizeArithmetic::Pillow, ResizeArithmetic::Torchvision];

    #[test]
    fn bicubic_coefficients_sum_to_one_in_fixed_point() {
        for arithmetic in BOTH {
            for (in_size, out_size) in [(32, 224), (640, 224), (225, 224), (7, 3), (1000, 1)] {
                let coefficients =
                    precompute_coefficients(in_size, out_size, Resample::Bicubic, arithmetic);
                for (index, &(first, count)) in coefficients.bounds.iter().enumerate() {
                    assert!(first + count <= in_size);
                    let sum: i64 = coefficients.weights[index * coefficients.taps..][..count]
                        .iter()
                        .map(|&w| i64::from(w))
                        .sum();
                    // Rounding each weight moves the sum by at most half a unit per tap.
                    let one = 1i64 << coefficients.precision;
                    assert!(
                        (sum - one).abs() <= count as i64,
                        "{arithmetic:?} {in_size}->{out_size}: {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn torchvision_weights_use_the_int16_range() {
        // Upscaling: the largest bicubic weight is close to 1, so 14 fractional bits fit below 2^15.
        let upscale =
            precompute_coefficients(32, 224, Resample::Bicubic, ResizeArithmetic::Torchvision);
        assert_eq!(upscale.precision, 14);
        assert!(
            upscale
                .weights
                .iter()
                .all(|&w| i32::from(i16::MIN) <= w && w <= i32::from(i16::MAX))
        );
        let pillow = precompute_coefficients(32, 224, Resample::Bicubic, ResizeArithmetic::Pillow);
        assert_eq!(pillow.precision, PRECISION_BITS);
    }

    #[test]
    fn resizing_to_the_same_size_copies() {
        let pixels: Vec<u8> = (0..4 * 3 * 3).map(|v| v as u8).collect();
        for arithmetic in BOTH {
            assert_eq!(
                resize_rgb8(&pixels, (4, 3), (4, 3), Resample::Bicubic, arithmetic),
                pixels
            );
        }
    }

    #[test]
    fn a_flat_image_stays_flat_when_resized() {
        let pixels = [200u8, 10, 77].repeat(50 * 30);
        for arithmetic in BOTH {
            let resized = resize_rgb8(&pixels, (50, 30), (17, 61), Resample::Bicubic, arithmetic);
            assert_eq!(resized, [200u8, 10, 77].repeat(17 * 61));
        }
    }

    #[test]
    fn bicubic_overshoot_is_clipped_to_u8() {
        // A hard edge rings with a = -0.5; the ringing must be clipped, not wrapped.
        let mut pixels = Vec::new();
        for x in 0..8 {
            let value = if x < 4 { 0u8 } else { 255 };
            pixels.extend_from_slice(&[value, value, value]);
        }
        for arithmetic in BOTH {
            let resized = resize_rgb8(&pixels, (8, 1), (19, 1), Resample::Bicubic, arithmetic);
            assert_eq!(resized.len(), 19 * 3);
            assert_eq!(resized[0], 0);
            assert_eq!(resized[18 * 3], 255);
        }
    }
}
