//! CLIP image preprocessing with the semantics and arithmetic of HF `CLIPImageProcessor`.
//!
//! Order, as HF: (RGB) -> resize on u8 -> center crop on u8 (zero padding where the image is smaller than
//! the crop) -> rescale and normalize to f32 -> channels first. The arithmetic of each step follows the
//! configured [`PreprocessBackend`]:
//!
//! | step | `Torchvision` (transformers 5 default) | `Pil` |
//! |---|---|---|
//! | resize | ATen uint8 antialiased kernel (i16 weights) | Pillow `resize` (22-bit weights) |
//! | crop offset | `int((h - ch) / 2)`, padding `(ch - h) // 2` before | `(h - ch) // 2`, padding `ceil((ch - h) / 2)` before |
//! | rescale + normalize | `(f32(x) - f32(mean)*f32(1/r)) / (f32(std)*f32(1/r))` | `f32(f64(x) * r)`, then `(v - mean) / std` in f32 |

use image::RgbImage;

use crate::config::{ImageProcessorConfig, PreprocessBackend, Resample, ResizeTarget};
use crate::decode::{DecodeLimits, decode_image};
use crate::error::{PreprocessError, ProcessorError};
use crate::resample::{ResizeArithmetic, resize_rgb8};

/// One preprocessed image: f32 values in channels-first order.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    /// `channels * height * width` values, channel-major (`data[(c * height + y) * width + x]`).
    pub data: Vec<f32>,
    /// Number of channels (always 3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

impl PixelValues {
    /// The tensor shape `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

/// The `(height, width)` HF's `get_resize_output_image_size` computes for an input of `(height, width)`.
///
/// For `shortest_edge` the long side is `int(n * long / short)`: a correctly rounded f64 division,
/// truncated, exactly as Python evaluates it.
pub fn resize_output_size(target: ResizeTarget, (height, width): (u32, u32)) -> (u64, u64) {
    match target {
        ResizeTarget::Exact { height, width } => (u64::from(height), u64::from(width)),
        ResizeTarget::ShortestEdge(edge) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_short = u64::from(edge);
            let new_long = (f64::from(edge) * f64::from(long) / f64::from(short)) as u64;
            if width <= height {
                (new_long, new_short)
            } else {
                (new_short, new_long)
            }
        }
    }
}

/// HF's `center_crop` on an interleaved RGB u8 image. Both backends start the crop at
/// `floor((h - crop_h) / 2)`; where the crop is larger than the image and the margin is odd, numpy's pads
/// the extra zero row/column before the image and torchvision's after it.
fn center_crop(
    pixels: &[u8],
    (height, width): (usize, usize),
    (crop_height, crop_width): (usize, usize),
    backend: PreprocessBackend,
) -> Vec<u8> {
    // Source row/column of output row/column 0, possibly negative when padding.
    let offset = |size: usize, crop: usize| -> i64 {
        if size >= crop {
            ((size - crop) / 2) as i64
        } else {
            let margin = (crop - size) as i64;
            match backend {
                PreprocessBackend::Pil => -((margin + 1) / 2),
                PreprocessBackend::Torchvision => -(margin / 2),
            }
        }
    };
    let top = offset(height, crop_height);
    let left = offset(width, crop_width);
    let mut output = vec![0u8; crop_height * crop_width * 3];
    for (out_y, out_row) in output.chunks_exact_mut(crop_width * 3).enumerate() {
        let source_y = out_y as i64 + top;
        if source_y < 0 || source_y >= height as i64 {
            continue;
        }
        let source_row = &pixels[source_y as usize * width * 3..][..width * 3];
        for (out_x, out_pixel) in out_row.chunks_exact_mut(3).enumerate() {
            let source_x = out_x as i64 + left;
            if source_x < 0 || source_x >= width as i64 {
                continue;
            }
            out_pixel.copy_from_slice(&source_row[source_x as usize * 3..][..3]);
        }
    }
    output
}

/// Runs the CLIP pipeline of `config` on an RGB image.
pub fn preprocess(
    image: &RgbImage,
    config: &ImageProcessorConfig,
) -> Result<PixelValues, PreprocessError> {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::EmptyImage { width, height });
    }
    let mut pixels: Vec<u8> = image.as_raw().clone();
    let (mut current_height, mut current_width) = (height as usize, width as usize);

    if config.do_resize {
        let (target_height, target_width) = resize_output_size(config.size, (height, width));
        let limit = u64::from(u32::MAX);
        if target_height == 0 || target_width == 0 || target_height > limit || target_width > limit
        {
            return Err(PreprocessError::InvalidTarget {
                width: target_width,
                height: target_height,
            });
        }
        let target = (target_width as usize, target_height as usize);
        let (filter, arithmetic) = resize_method(config)?;
        pixels = resize_rgb8(
            &pixels,
            (current_width, current_height),
            target,
            filter,
            arithmetic,
        );
        (current_width, current_height) = target;
    }
    if config.do_center_crop {
        let (crop_height, crop_width) = (config.crop_size.0 as usize, config.crop_size.1 as usize);
        pixels = center_crop(
            &pixels,
            (current_height, current_width),
            (crop_height, crop_width),
            config.backend,
        );
        (current_height, current_width) = (crop_height, crop_width);
    }

    let to_float = value_transform(config);
    let plane = current_height * current_width;
    let mut data = vec![0f32; 3 * plane];
    for (index, pixel) in pixels.chunks_exact(3).enumerate() {
        for (channel, &value) in pixel.iter().enumerate() {
            data[channel * plane + index] = to_float(channel, value);
        }
    }
    Ok(PixelValues {
        data,
        channels: 3,
        height: current_height,
        width: current_width,
    })
}

/// The filter and arithmetic of the resize: torchvision has no tensor Lanczos (HF falls back to bicubic
/// with a warning) and no box or Hamming filter at all.
fn resize_method(
    config: &ImageProcessorConfig,
) -> Result<(Resample, ResizeArithmetic), PreprocessError> {
    match (config.backend, config.resample) {
        (PreprocessBackend::Pil, filter) => Ok((filter, ResizeArithmetic::Pillow)),
        (PreprocessBackend::Torchvision, Resample::Lanczos | Resample::Bicubic) => {
            Ok((Resample::Bicubic, ResizeArithmetic::Torchvision))
        }
        (PreprocessBackend::Torchvision, Resample::Bilinear) => {
            Ok((Resample::Bilinear, ResizeArithmetic::Torchvision))
        }
        (PreprocessBackend::Torchvision, filter @ (Resample::Box | Resample::Hamming)) => {
            Err(PreprocessError::UnsupportedResample {
                resample: format!("{filter:?}").to_lowercase(),
            })
        }
    }
}

/// The u8 -> f32 map of rescale and normalize for one channel, with the backend's float arithmetic.
fn value_transform(config: &ImageProcessorConfig) -> impl Fn(usize, u8) -> f32 {
    let mean = config.image_mean.map(|m| m as f32);
    let std = config.image_std.map(|s| s as f32);
    let (do_rescale, do_normalize, factor) = (
        config.do_rescale,
        config.do_normalize,
        config.rescale_factor,
    );
    // torchvision backend: `torch.tensor(mean) * (1.0 / rescale_factor)`, a float32 product.
    let inverse_factor = (1.0 / factor) as f32;
    let fused_mean = mean.map(|m| m * inverse_factor);
    let fused_std = std.map(|s| s * inverse_factor);
    let backend = config.backend;
    move |channel, value| {
        let value = f32::from(value);
        match (backend, do_rescale, do_normalize) {
            (_, false, false) => value,
            (_, false, true) => (value - mean[channel]) / std[channel],
            (PreprocessBackend::Torchvision, true, true) => {
                (value - fused_mean[channel]) / fused_std[channel]
            }
            (PreprocessBackend::Torchvision, true, false) => value * factor as f32,
            // numpy: `image.astype(float64) * scale`, then `.astype(float32)`; normalize in float32.
            (PreprocessBackend::Pil, true, normalize) => {
                let rescaled = (f64::from(value) * factor) as f32;
                if normalize {
                    (rescaled - mean[channel]) / std[channel]
                } else {
                    rescaled
                }
            }
        }
    }
}

/// Decodes untrusted bytes within `limits`, then preprocesses them with `config`.
pub fn decode_and_preprocess(
    bytes: &[u8],
    limits: &DecodeLimits,
    config: &ImageProcessorConfig,
) -> Result<PixelValues, ProcessorError> {
    let image = decode_image(bytes, limits)?;
    Ok(preprocess(&image, config)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};

    #[test]
    fn shortest_edge_truncates_the_long_side_like_python_int() {
        // 224 * 500 / 333 = 336.336... -> 336; 224 * 3 / 2 = 336 exactly.
        assert_eq!(
            resize_output_size(ResizeTarget::ShortestEdge(224), (333, 500)),
            (224, 336)
        );
        assert_eq!(
            resize_output_size(ResizeTarget::ShortestEdge(224), (300, 200)),
            (336, 224)
        );
        assert_eq!(
            resize_output_size(ResizeTarget::ShortestEdge(32), (50, 50)),
            (32, 32)
        );
        let exact = ResizeTarget::Exact {
            height: 7,
            width: 9,
        };
        assert_eq!(resize_output_size(exact, (1000, 10)), (7, 9));
    }

    #[test]
    fn center_crop_uses_floor_offsets() {
        // 5 wide, crop 2: left = (5 - 2) // 2 = 1.
        let pixels: Vec<u8> = (0..5u8).flat_map(|x| [x, x, x]).collect();
        for backend in [PreprocessBackend::Pil, PreprocessBackend::Torchvision] {
            assert_eq!(
                center_crop(&pixels, (1, 5), (1, 2), backend),
                vec![1, 1, 1, 2, 2, 2]
            );
        }
    }

    #[test]
    fn center_crop_pads_with_zeros_when_the_crop_is_larger() {
        // 1x1 image of value 9 into 1x4: numpy pads ceil(3 / 2) = 2 before, torchvision 3 // 2 = 1.
        let numpy = center_crop(&[9, 9, 9], (1, 1), (1, 4), PreprocessBackend::Pil);
        assert_eq!(numpy, vec![0, 0, 0, 0, 0, 0, 9, 9, 9, 0, 0, 0]);
        let torchvision = center_crop(&[9, 9, 9], (1, 1), (1, 4), PreprocessBackend::Torchvision);
        assert_eq!(torchvision, vec![0, 0, 0, 9, 9, 9, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn torchvision_fuses_rescale_into_normalize() {
        let image = RgbImage::from_raw(1, 1, vec![255, 0, 128]).expect("1x1 buffer");
        let config = ImageProcessorConfig {
            do_resize: false,
            do_center_crop: false,
            ..ImageProcessorConfig::default()
        };
        let pixels = preprocess(&image, &config).expect("valid image");
        let expected_blue =
            (128.0f32 - OPENAI_CLIP_MEAN[2] as f32 * 255.0) / (OPENAI_CLIP_STD[2] as f32 * 255.0);
        assert_eq!(pixels.data[2], expected_blue);
    }

    #[test]
    fn pil_rescales_in_f64_then_normalizes_in_f32() {
        let image = RgbImage::from_raw(1, 1, vec![255, 0, 128]).expect("1x1 buffer");
        let config = ImageProcessorConfig {
            do_resize: false,
            do_center_crop: false,
            backend: PreprocessBackend::Pil,
            ..ImageProcessorConfig::default()
        };
        let pixels = preprocess(&image, &config).expect("valid image");
        assert_eq!(pixels.shape(), [3, 1, 1]);
        let expected_red = (1.0f32 - OPENAI_CLIP_MEAN[0] as f32) / OPENAI_CLIP_STD[0] as f32;
        let expected_blue =
            ((128.0f64 / 255.0) as f32 - OPENAI_CLIP_MEAN[2] as f32) / OPENAI_CLIP_STD[2] as f32;
        assert_eq!(pixels.data[0], expected_red);
        assert_eq!(pixels.data[2], expected_blue);
    }

    #[test]
    fn output_is_channels_first() {
        let image = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).expect("2x1 buffer");
        let config = ImageProcessorConfig {
            do_resize: false,
            do_center_crop: false,
            do_rescale: false,
            do_normalize: false,
            ..ImageProcessorConfig::default()
        };
        let pixels = preprocess(&image, &config).expect("valid image");
        assert_eq!(pixels.data, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn torchvision_has_no_box_filter() {
        let image = RgbImage::new(4, 4);
        let config = ImageProcessorConfig {
            resample: Resample::Box,
            ..ImageProcessorConfig::default()
        };
        assert!(matches!(
            preprocess(&image, &config),
            Err(PreprocessError::UnsupportedResample { .. })
        ));
    }

    #[test]
    fn an_empty_image_is_an_error() {
        let image = RgbImage::new(0, 3);
        assert_eq!(
            preprocess(&image, &ImageProcessorConfig::default()),
            Err(PreprocessError::EmptyImage {
                width: 0,
                height: 3
            })
        );
    }
}
