//! The service's [`BatchEncoder`]: the model's vision half on its device: the CLIP tower and connector
//! (KOSMOS-1 / Kosmos-2), or Kosmos-2.5's page encoder.

use kosmos_model::{DType, Device, ModelError, Tensor, VisionHalf};

use super::{BatchEncoder, ModelInput};

/// The shape every input of a batch must have.
#[derive(Debug, Clone, Copy)]
enum InputShape {
    /// `(3, size, size)` pixels.
    Pixels { size: usize },
    /// `(max_patches, row_len)` flattened patches.
    Page { max_patches: usize, row_len: usize },
}

/// The vision half of a model on a device, encoding stacked batches.
#[derive(Debug)]
pub struct VisionEngine {
    half: VisionHalf,
    device: Device,
    dtype: DType,
    shape: InputShape,
}

impl VisionEngine {
    /// Wraps a loaded CLIP vision half whose weights are `dtype` on `device`, taking `(3, image_size, image_size)`
    /// pixels.
    pub fn new(half: VisionHalf, device: Device, dtype: DType, image_size: usize) -> Self {
        Self {
            half,
            device,
            dtype,
            shape: InputShape::Pixels { size: image_size },
        }
    }

    /// Wraps a loaded Kosmos-2.5 page encoder taking `max_patches` rows of `row_len` values.
    pub fn pages(
        half: VisionHalf,
        device: Device,
        dtype: DType,
        max_patches: usize,
        row_len: usize,
    ) -> Self {
        Self {
            half,
            device,
            dtype,
            shape: InputShape::Page {
                max_patches,
                row_len,
            },
        }
    }

    /// The vision half.
    pub fn half(&self) -> &VisionHalf {
        &self.half
    }
}

impl BatchEncoder for VisionEngine {
    type Error = ModelError;

    fn encode(&mut self, images: &[&ModelInput]) -> Result<Vec<Vec<f32>>, ModelError> {
        let (per_image, dims): (usize, Vec<usize>) = match self.shape {
            InputShape::Pixels { size } => (3 * size * size, vec![3, size, size]),
            InputShape::Page {
                max_patches,
                row_len,
            } => (max_patches * row_len, vec![max_patches, row_len]),
        };
        let mut stacked = Vec::with_capacity(images.len() * per_image);
        for (index, image) in images.iter().enumerate() {
            let kind_matches = matches!(
                (image, self.shape),
                (ModelInput::Pixels(_), InputShape::Pixels { .. })
                    | (ModelInput::Page(_), InputShape::Page { .. })
            );
            if !kind_matches || image.values().len() != per_image {
                return Err(ModelError::InvalidInput(format!(
                    "batch image {index} has {} values, the model takes {dims:?}",
                    image.values().len()
                )));
            }
            stacked.extend_from_slice(image.values());
        }
        let mut shape = vec![images.len()];
        shape.extend(&dims);
        let input = Tensor::from_vec(stacked, shape, &self.device)?;
        // (images, tokens, hidden)
        let embeddings = match self.shape {
            InputShape::Pixels { .. } => self.half.encode(&input.to_dtype(self.dtype)?)?,
            // The patches stay f32 (row and column ids are exact there); the tower casts the pixels.
            InputShape::Page { .. } => self.half.encode_pages(&input)?,
        }
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
        let (_, tokens, hidden) = embeddings.dims3()?;
        let flat = embeddings.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat
            .chunks_exact(tokens * hidden)
            .map(<[f32]>::to_vec)
            .collect())
    }
}
