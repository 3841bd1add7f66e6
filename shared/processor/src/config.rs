//! `preprocessor_config.json` with the semantics of HF `CLIPImageProcessor`.
//!
//! Missing keys take HF's defaults (`CLIPImageProcessor.__init__`), unknown keys are ignored, and a key
//! with a malformed value is an error that names the key. The accepted shapes follow HF's
//! `get_size_dict`: `size` may be an integer (shortest edge), a `[height, width]` list, or an object with
//! `shortest_edge` or `height` + `width` (`longest_edge` and `max_height` are rejected); `crop_size` may
//! be an integer (square), a list or a `height` + `width` object.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ConfigError;

/// OpenAI CLIP mean, HF's default `image_mean`.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP standard deviation, HF's default `image_std`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How `do_resize` picks the output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Short side to `n`, long side to `int(n * long / short)` (aspect preserved, then usually cropped).
    ShortestEdge(u32),
    /// Exact output size, aspect ratio not preserved.
    Exact {
        /// Output height.
        height: u32,
        /// Output width.
        width: u32,
    },
}

/// A PIL resampling filter, numbered as `PIL.Image.Resampling` (the `resample` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// `LANCZOS` (1), a 3-lobe windowed sinc.
    Lanczos,
    /// `BILINEAR` (2), the triangle filter.
    Bilinear,
    /// `BICUBIC` (3), cubic convolution with a = -0.5 (CLIP's default).
    Bicubic,
    /// `BOX` (4), area averaging.
    Box,
    /// `HAMMING` (5), a Hamming-windowed sinc.
    Hamming,
}

impl Resample {
    /// Maps PIL's integer code to a filter; `NEAREST` (0) is not implemented.
    pub fn from_pil_code(code: i64) -> Option<Resample> {
        match code {
            1 => Some(Resample::Lanczos),
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            4 => Some(Resample::Box),
            5 => Some(Resample::Hamming),
            _ => None,
        }
    }
}

/// Which HF image processor implementation to reproduce. `preprocessor_config.json` does not record it
/// (transformers 5 saves both as `CLIPImageProcessor`), so it is chosen in code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreprocessBackend {
    /// transformers 5 `CLIPImageProcessor` (the default there): torchvision's uint8 antialiased resize,
    /// torchvision's center crop, rescale fused into normalize as `(x - mean/r) / (std/r)` in f32.
    #[default]
    Torchvision,
    /// `CLIPImageProcessorPil` (transformers 4's `CLIPImageProcessor`): Pillow's resize, numpy's center crop,
    /// rescale in f64 then normalize in f32.
    Pil,
}

/// A validated CLIP image processor configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Map<String, Value>")]
pub struct ImageProcessorConfig {
    /// Convert any input to 3-channel RGB first (always effectively on: the pipeline works on RGB).
    pub do_convert_rgb: bool,
    /// Resize to `size`.
    pub do_resize: bool,
    /// The resize target.
    pub size: ResizeTarget,
    /// Resampling filter for the resize.
    pub resample: Resample,
    /// Center crop to `crop_size` (padding with zeros where the image is smaller).
    pub do_center_crop: bool,
    /// Crop `(height, width)`.
    pub crop_size: (u32, u32),
    /// Multiply the u8 values by `rescale_factor` (in f64, then cast to f32, as numpy does).
    pub do_rescale: bool,
    /// The rescale factor, HF default `1/255`.
    pub rescale_factor: f64,
    /// Normalize with `image_mean` and `image_std` (in f32).
    pub do_normalize: bool,
    /// Per-channel mean.
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation.
    pub image_std: [f64; 3],
    /// The HF implementation whose arithmetic is reproduced (not read from the JSON).
    pub backend: PreprocessBackend,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_convert_rgb: true,
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            backend: PreprocessBackend::default(),
        }
    }
}

impl ImageProcessorConfig {
    /// Parses the text of a `preprocessor_config.json`.
    pub fn from_json_str(json: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(json).map_err(|err| ConfigError::Json(err.to_string()))?;
        match value {
            Value::Object(map) => Self::try_from(map),
            other => Err(ConfigError::Json(format!("got {}", json_kind(&other)))),
        }
    }

    /// Reads and parses a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::from_json_str(&read_text(path.as_ref())?)
    }
}

/// The text of a config file, or an error naming it.
pub(crate) fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl TryFrom<Map<String, Value>> for ImageProcessorConfig {
    type Error = ConfigError;

    fn try_from(map: Map<String, Value>) -> Result<Self, ConfigError> {
        let defaults = ImageProcessorConfig::default();
        let size = match map.get("size") {
            None | Some(Value::Null) => defaults.size,
            Some(value) => parse_size(value)?,
        };
        // HF's Kosmos-2 backwards compatibility: `use_square_size` squashes to `shortest_edge` squared.
        let use_square_size = optional_bool(&map, "use_square_size")?.unwrap_or(false);
        let size = match (use_square_size, size) {
            (true, ResizeTarget::ShortestEdge(edge)) => ResizeTarget::Exact {
                height: edge,
                width: edge,
            },
            (_, size) => size,
        };
        let crop_size = match map.get("crop_size") {
            None | Some(Value::Null) => defaults.crop_size,
            Some(value) => parse_crop_size(value)?,
        };
        let resample = match map.get("resample") {
            None | Some(Value::Null) => defaults.resample,
            Some(value) => {
                let code = value
                    .as_i64()
                    .ok_or_else(|| invalid("resample", "must be an integer", value))?;
                Resample::from_pil_code(code).ok_or_else(|| {
                    invalid(
                        "resample",
                        "must be a PIL filter 1..=5 (nearest is not supported)",
                        value,
                    )
                })?
            }
        };
        let rescale_factor = match map.get("rescale_factor") {
            None | Some(Value::Null) => defaults.rescale_factor,
            Some(value) => value
                .as_f64()
                .filter(|factor| factor.is_finite())
                .ok_or_else(|| invalid("rescale_factor", "must be a finite number", value))?,
        };
        let image_mean = optional_channels(&map, "image_mean")?.unwrap_or(defaults.image_mean);
        let image_std = optional_channels(&map, "image_std")?.unwrap_or(defaults.image_std);
        if image_std.contains(&0.0) {
            return Err(ConfigError::InvalidKey {
                key: "image_std",
                message: format!("must not contain zero, got {image_std:?}"),
            });
        }
        Ok(ImageProcessorConfig {
            do_convert_rgb: optional_bool(&map, "do_convert_rgb")?
                .unwrap_or(defaults.do_convert_rgb),
            do_resize: optional_bool(&map, "do_resize")?.unwrap_or(defaults.do_resize),
            size,
            resample,
            do_center_crop: optional_bool(&map, "do_center_crop")?
                .unwrap_or(defaults.do_center_crop),
            crop_size,
            do_rescale: optional_bool(&map, "do_rescale")?.unwrap_or(defaults.do_rescale),
            rescale_factor,
            do_normalize: optional_bool(&map, "do_normalize")?.unwrap_or(defaults.do_normalize),
            image_mean,
            image_std,
            backend: defaults.backend,
        })
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn invalid(key: &'static str, requirement: &str, value: &Value) -> ConfigError {
    ConfigError::InvalidKey {
        key,
        message: format!("{requirement}, got {value}"),
    }
}

fn optional_bool(map: &Map<String, Value>, key: &'static str) -> Result<Option<bool>, ConfigError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(*flag)),
        Some(other) => Err(invalid(key, "must be a boolean", other)),
    }
}

fn positive_u32(key: &'static str, value: &Value) -> Result<u32, ConfigError> {
    value
        .as_u64()
        .filter(|&n| n >= 1)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid(key, "must hold positive integers", value))
}

/// `image_mean` / `image_std`: one number for every channel, or a list of three.
fn optional_channels(
    map: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<[f64; 3]>, ConfigError> {
    let Some(value) = map.get(key) else {
        return Ok(None);
    };
    let requirement = "must be a number or a list of 3 finite numbers";
    match value {
        Value::Null => Ok(None),
        Value::Number(number) => {
            let single = number
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| invalid(key, requirement, value))?;
            Ok(Some([single; 3]))
        }
        Value::Array(items) if items.len() == 3 => {
            let mut channels = [0.0; 3];
            for (slot, item) in channels.iter_mut().zip(items) {
                *slot = item
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| invalid(key, requirement, value))?;
            }
            Ok(Some(channels))
        }
        other => Err(invalid(key, requirement, other)),
    }
}

fn parse_size(value: &Value) -> Result<ResizeTarget, ConfigError> {
    const KEY: &str = "size";
    let requirement =
        "must be an integer, [height, width], {\"shortest_edge\"} or {\"height\", \"width\"}";
    match value {
        Value::Number(_) => Ok(ResizeTarget::ShortestEdge(positive_u32(KEY, value)?)),
        Value::Array(items) if items.len() == 2 => Ok(ResizeTarget::Exact {
            height: positive_u32(KEY, &items[0])?,
            width: positive_u32(KEY, &items[1])?,
        }),
        Value::Object(fields) => {
            // transformers 5 resizes `shortest_edge` + `longest_edge` differently (transformers 4 ignored
            // `longest_edge`); neither appears in Kosmos configs, so it is rejected rather than guessed.
            if fields.contains_key("longest_edge") || fields.contains_key("max_height") {
                return Err(invalid(
                    KEY,
                    "with `longest_edge` or `max_height` is not supported",
                    value,
                ));
            }
            if let Some(edge) = fields.get("shortest_edge") {
                return Ok(ResizeTarget::ShortestEdge(positive_u32(KEY, edge)?));
            }
            match (fields.get("height"), fields.get("width")) {
                (Some(height), Some(width)) => Ok(ResizeTarget::Exact {
                    height: positive_u32(KEY, height)?,
                    width: positive_u32(KEY, width)?,
                }),
                _ => Err(invalid(KEY, requirement, value)),
            }
        }
        other => Err(invalid(KEY, requirement, other)),
    }
}

fn parse_crop_size(value: &Value) -> Result<(u32, u32), ConfigError> {
    const KEY: &str = "crop_size";
    let requirement = "must be an integer, [height, width] or {\"height\", \"width\"}";
    match value {
        Value::Number(_) => {
            let side = positive_u32(KEY, value)?;
            Ok((side, side))
        }
        Value::Array(items) if items.len() == 2 => {
            Ok((positive_u32(KEY, &items[0])?, positive_u32(KEY, &items[1])?))
        }
        Value::Object(fields) => match (fields.get("height"), fields.get("width")) {
            (Some(height), Some(width)) => {
                Ok((positive_u32(KEY, height)?, positive_u32(KEY, width)?))
            }
            _ => Err(invalid(KEY, requirement, value)),
        },
        other => Err(invalid(KEY, requirement, other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_hf_defaults() {
        let config = ImageProcessorConfig::from_json_str("{}").expect("empty object is valid");
        assert_eq!(config, ImageProcessorConfig::default());
        assert_eq!(config.size, ResizeTarget::ShortestEdge(224));
        assert_eq!(config.rescale_factor, 0.00392156862745098);
    }

    #[test]
    fn unknown_keys_are_ignored_and_known_keys_are_read() {
        let json = r#"{"image_processor_type": "CLIPImageProcessor", "processor_class": "Kosmos2Processor",
            "size": {"height": 224, "width": 200}, "crop_size": 180, "resample": 2, "do_center_crop": false,
            "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3], "rescale_factor": 0.5}"#;
        let config = ImageProcessorConfig::from_json_str(json).expect("valid config");
        assert_eq!(
            config.size,
            ResizeTarget::Exact {
                height: 224,
                width: 200
            }
        );
        assert_eq!(config.crop_size, (180, 180));
        assert_eq!(config.resample, Resample::Bilinear);
        assert!(!config.do_center_crop);
        assert_eq!(config.image_mean, [0.5; 3]);
        assert_eq!(config.image_std, [0.1, 0.2, 0.3]);
        assert_eq!(config.rescale_factor, 0.5);
    }

    #[test]
    fn use_square_size_turns_shortest_edge_into_a_square() {
        let json = r#"{"size": {"shortest_edge": 224}, "use_square_size": true}"#;
        let config = ImageProcessorConfig::from_json_str(json).expect("valid config");
        assert_eq!(
            config.size,
            ResizeTarget::Exact {
                height: 224,
                width: 224
            }
        );
    }

    #[test]
    fn integer_and_list_sizes_follow_get_size_dict() {
        let config = ImageProcessorConfig::from_json_str(r#"{"size": 300, "crop_size": [10, 20]}"#)
            .expect("valid config");
        assert_eq!(config.size, ResizeTarget::ShortestEdge(300));
        assert_eq!(config.crop_size, (10, 20));
    }

    #[test]
    fn malformed_values_are_errors_naming_the_key() {
        let cases = [
            (r#"{"size": {"longest_edge": 3}}"#, "size"),
            (
                r#"{"size": {"shortest_edge": 3, "longest_edge": 5}}"#,
                "size",
            ),
            (r#"{"size": "big"}"#, "size"),
            (r#"{"crop_size": {"height": 0, "width": 3}}"#, "crop_size"),
            (r#"{"resample": 0}"#, "resample"),
            (r#"{"do_resize": "yes"}"#, "do_resize"),
            (r#"{"image_mean": [1, 2]}"#, "image_mean"),
            (r#"{"image_std": [1, 0, 2]}"#, "image_std"),
            (r#"{"rescale_factor": "x"}"#, "rescale_factor"),
        ];
        for (json, expected_key) in cases {
            match ImageProcessorConfig::from_json_str(json) {
                Err(ConfigError::InvalidKey { key, .. }) => assert_eq!(key, expected_key, "{json}"),
                other => panic!("{json}: expected an invalid key error, got {other:?}"),
            }
        }
        assert!(matches!(
            ImageProcessorConfig::from_json_str("[1]"),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn serde_deserialize_uses_the_same_validation() {
        let config: ImageProcessorConfig =
            serde_json::from_str(r#"{"size": {"shortest_edge": 32}}"#).expect("valid config");
        assert_eq!(config.size, ResizeTarget::ShortestEdge(32));
        let error = serde_json::from_str::<ImageProcessorConfig>(r#"{"size": true}"#)
            .expect_err("invalid size");
        assert!(error.to_string().contains("`size`"), "{error}");
    }
}
