//! What each request carries: its images (a reuse pool, or images new to the server), its prompt text, its
//! `max_new_tokens` or Score candidates — a pure function of the seed, the run and the request's index, so a
//! workload replays exactly and a sweep's runs send the same requests.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use image::{Rgb, RgbImage};
use kosmos_proto::v1 as pb;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use super::schema::LengthRange;
use crate::client::{image_bytes_segment, text_segment};

/// Words prompts and Score candidates are made of: the demo model's little world (shapes, colours, words)
/// and common English, so the tokenizer sees ordinary text.
const WORDS: &[&str] = &[
    "a", "an", "the", "image", "of", "picture", "with", "and", "red", "green", "blue", "yellow",
    "purple", "orange", "circle", "square", "triangle", "cross", "star", "word", "shows", "on",
    "left", "right", "top", "bottom", "big", "small", "two", "three", "what", "color", "is",
    "where", "question", "answer",
];

/// Where images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// The image files of a folder (PNG, JPEG or WebP), in name order.
    Folder(PathBuf),
    /// PNGs drawn here: coloured rectangles on a coloured background.
    Generated {
        /// Pixels.
        width: u32,
        /// Pixels.
        height: u32,
    },
}

impl ImageSource {
    /// How the report names it.
    pub fn describe(&self) -> String {
        match self {
            Self::Folder(dir) => format!("folder:{}", dir.display()),
            Self::Generated { width, height } => format!("generated:{width}x{height}"),
        }
    }
}

/// What the workload is made of.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Seed of every random choice.
    pub seed: u64,
    /// Where images come from.
    pub source: ImageSource,
    /// Images per request.
    pub images_per_request: u32,
    /// Share of requests whose images come from the reuse pool.
    pub image_reuse: f64,
    /// Images in the reuse pool.
    pub image_pool: u32,
    /// Words of prompt text.
    pub prompt_words: LengthRange,
    /// `max_new_tokens`.
    pub output_tokens: LengthRange,
    /// Candidates per Score request.
    pub score_candidates: u32,
}

/// One request, ready to send.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    /// Position in the run's plan.
    pub index: u64,
    /// Images, then the text.
    pub prompt: Vec<pb::Segment>,
    /// Images in the prompt.
    pub images: u32,
    /// Their bytes.
    pub image_bytes: u64,
    /// Whether they came from the reuse pool.
    pub reused_images: bool,
    /// Words of text.
    pub prompt_words: u32,
    /// For GenerateStream.
    pub max_new_tokens: u32,
    /// For Score.
    pub candidates: Vec<String>,
}

/// The images and the rules that turn (run, index) into a request.
#[derive(Debug)]
pub struct Workload {
    spec: WorkloadSpec,
    /// Decoded folder images (empty for generated images).
    folder: Vec<RgbImage>,
    /// The reuse pool, encoded once.
    pool: Vec<Arc<Vec<u8>>>,
}

impl Workload {
    /// Reads or draws the images the workload needs.
    pub fn new(spec: WorkloadSpec) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&spec.image_reuse),
            "--image-reuse must lie in [0, 1], got {}",
            spec.image_reuse
        );
        anyhow::ensure!(spec.image_pool >= 1, "--image-pool must be at least 1");
        let folder = match &spec.source {
            ImageSource::Folder(dir) if spec.images_per_request > 0 => read_folder(dir)?,
            _ => Vec::new(),
        };
        let mut workload = Self {
            spec,
            folder,
            pool: Vec::new(),
        };
        if workload.spec.images_per_request > 0 {
            workload.pool = (0..workload.spec.image_pool)
                .map(|slot| workload.pool_image(slot).map(Arc::new))
                .collect::<anyhow::Result<_>>()?;
        }
        Ok(workload)
    }

    /// The settings it was made from.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// Request `index` of run `run` (0-based). Fresh images differ between runs, so a sweep's later runs do not
    /// find the earlier runs' images in the gateway's embedding cache.
    pub fn request(&self, run: u32, index: u64) -> anyhow::Result<PreparedRequest> {
        let spec = &self.spec;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(spec.seed, 0x5245_5155, index));
        let reused_images = spec.images_per_request > 0 && rng.random_bool(spec.image_reuse);
        let mut prompt = Vec::with_capacity(spec.images_per_request as usize + 1);
        let mut image_bytes = 0u64;
        for slot in 0..spec.images_per_request {
            let data = if reused_images {
                self.pool[rng.random_range(0..self.pool.len())]
                    .as_ref()
                    .clone()
            } else {
                self.fresh_image(run, index, slot)?
            };
            image_bytes += data.len() as u64;
            prompt.push(image_bytes_segment(data));
        }
        let prompt_words = draw(&mut rng, spec.prompt_words);
        let text: Vec<&str> = (0..prompt_words)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect();
        if !text.is_empty() {
            prompt.push(text_segment(&text.join(" ")));
        }
        let max_new_tokens = draw(&mut rng, spec.output_tokens);
        let candidates = (0..spec.score_candidates)
            .map(|_| {
                let words = rng.random_range(1..=3);
                (0..words)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        Ok(PreparedRequest {
            index,
            prompt,
            images: spec.images_per_request,
            image_bytes,
            reused_images,
            prompt_words,
            max_new_tokens,
            candidates,
        })
    }

    fn pool_image(&self, slot: u32) -> anyhow::Result<Vec<u8>> {
        match &self.spec.source {
            // The pool: the folder's first files (cycling), marked apart from every fresh image.
            ImageSource::Folder(_) => {
                let image = &self.folder[slot as usize % self.folder.len()];
                encode_png(&mark(image.clone(), u64::MAX - u64::from(slot)))
            }
            ImageSource::Generated { width, height } => encode_png(&draw_image(
                *width,
                *height,
                mix(self.spec.seed, 0x504F_4F4C, u64::from(slot)),
            )),
        }
    }

    /// An image no other request of any run sends: a folder image (cycling) or a drawn one, with its first
    /// pixels set from (run, index, slot).
    fn fresh_image(&self, run: u32, index: u64, slot: u32) -> anyhow::Result<Vec<u8>> {
        let unique = (u64::from(run) << 48) ^ (index << 8) ^ u64::from(slot);
        let image = match &self.spec.source {
            ImageSource::Folder(_) => {
                let position = index * u64::from(self.spec.images_per_request) + u64::from(slot);
                self.folder[(position % self.folder.len() as u64) as usize].clone()
            }
            ImageSource::Generated { width, height } => {
                draw_image(*width, *height, mix(self.spec.seed, unique, 0x4652_4553))
            }
        };
        encode_png(&mark(image, unique))
    }
}

/// A length in the range, uniformly.
fn draw(rng: &mut ChaCha8Rng, range: LengthRange) -> u32 {
    rng.random_range(range.min..=range.max)
}

/// A seed from a base seed and two numbers (splitmix64 finaliser).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed
        .wrapping_add(a.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Writes `unique`'s bytes into the first pixels of the top row, so the encoded file is unique.
fn mark(mut image: RgbImage, unique: u64) -> RgbImage {
    let bytes = unique.to_le_bytes();
    for (i, chunk) in bytes.chunks(3).enumerate() {
        let x = i as u32;
        if x >= image.width() {
            break;
        }
        let mut pixel = [0u8; 3];
        pixel[..chunk.len()].copy_from_slice(chunk);
        image.put_pixel(x, 0, Rgb(pixel));
    }
    image
}

/// A picture of a few coloured rectangles on a coloured background.
fn draw_image(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let background = Rgb([rng.random(), rng.random(), rng.random()]);
    let mut image = RgbImage::from_pixel(width, height, background);
    for _ in 0..4 {
        let fill = Rgb([rng.random(), rng.random(), rng.random()]);
        let x0 = rng.random_range(0..width);
        let y0 = rng.random_range(0..height);
        let x1 = rng.random_range(x0..width).max(x0 + 1).min(width);
        let y1 = rng.random_range(y0..height).max(y0 + 1).min(height);
        for y in y0..y1 {
            for x in x0..x1 {
                image.put_pixel(x, y, fill);
            }
        }
    }
    image
}

fn encode_png(image: &RgbImage) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .context("cannot encode a PNG")?;
    Ok(bytes)
}

/// Every image file of `dir`, decoded, in name order.
fn read_folder(dir: &Path) -> anyhow::Result<Vec<RgbImage>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the image folder {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| {
                    matches!(
                        ext.to_ascii_lowercase().as_str(),
                        "png" | "jpg" | "jpeg" | "webp"
                    )
                })
        })
        .collect();
    paths.sort();
    anyhow::ensure!(
        !paths.is_empty(),
        "{} holds no PNG, JPEG or WebP image",
        dir.display()
    );
    paths
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok(image::load_from_memory(&bytes)
                .with_context(|| format!("cannot decode {}", path.display()))?
                .to_rgb8())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(reuse: f64) -> WorkloadSpec {
        WorkloadSpec {
            seed: 7,
            source: ImageSource::Generated {
                width: 32,
                height: 24,
            },
            images_per_request: 2,
            image_reuse: reuse,
            image_pool: 3,
            prompt_words: LengthRange { min: 2, max: 5 },
            output_tokens: LengthRange { min: 4, max: 9 },
            score_candidates: 2,
        }
    }

    fn image_data(request: &PreparedRequest) -> Vec<Vec<u8>> {
        request
            .prompt
            .iter()
            .filter_map(|segment| match &segment.kind {
                Some(pb::segment::Kind::Image(image)) => Some(image.data.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_requests() {
        let a = Workload::new(spec(0.5)).expect("a test value");
        let b = Workload::new(spec(0.5)).expect("a test value");
        for index in 0..8 {
            let (x, y) = (
                a.request(0, index).expect("a test value"),
                b.request(0, index).expect("a test value"),
            );
            assert_eq!(x.prompt, y.prompt);
            assert_eq!(
                (x.max_new_tokens, x.prompt_words),
                (y.max_new_tokens, y.prompt_words)
            );
            assert!((4..=9).contains(&x.max_new_tokens) && (2..=5).contains(&x.prompt_words));
            assert_eq!(x.images, 2);
        }
    }

    #[test]
    fn fresh_images_are_never_sent_twice_and_pool_images_come_from_the_pool() {
        let workload = Workload::new(spec(0.0)).expect("a test value");
        let mut seen = std::collections::HashSet::new();
        for run in 0..2 {
            for index in 0..6 {
                for data in image_data(&workload.request(run, index).expect("a test value")) {
                    assert!(
                        seen.insert(data),
                        "run {run} request {index} repeats an image"
                    );
                }
            }
        }
        let reusing = Workload::new(spec(1.0)).expect("a test value");
        let pool: std::collections::HashSet<Vec<u8>> = reusing
            .pool
            .iter()
            .map(|data| data.as_ref().clone())
            .collect();
        for index in 0..6 {
            let request = reusing.request(1, index).expect("a test value");
            assert!(request.reused_images);
            assert!(image_data(&request).iter().all(|data| pool.contains(data)));
        }
    }

    #[test]
    fn generated_images_have_the_size_asked_for() {
        let workload = Workload::new(spec(0.0)).expect("a test value");
        let data = image_data(&workload.request(0, 0).expect("a test value")).remove(0);
        let image = image::load_from_memory(&data).expect("a test value");
        assert_eq!((image.width(), image.height()), (32, 24));
    }
}
