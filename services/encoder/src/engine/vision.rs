//! The service's [`BatchEncoder`]: the model's vision half (CLIP tower + connector) on its device.

use kosmos_model::{DType, Device, ModelError, Tensor, VisionHalf};
use kosmos_processor::PixelValues;

use super::BatchEncoder;

/// The vision half of a model on a device, encoding stacked batches.
#[derive(Debug)]
pub struct VisionEngine {
    half: VisionHalf,
    device: Device,
    dtype: DType,
    image_size: usize,
}

impl VisionEngine {
    /// Wraps a loaded vision half whose weights are `dtype` on `device`.
    pub fn new(half: VisionHalf, device: Device, dtype: DType) -> Self {
        let image_size = half.config().vision_config.image_size;
        Self {
            half,
            device,
            dtype,
            image_size,
        }
    }

    /// The vision half.
    pub fn half(&self) -> &VisionHalf {
        &self.half
    }
}

impl BatchEncoder for VisionEngine {
    type Error = ModelError;

    fn encode(&mut self, images: &[&PixelValues]) -> Result<Vec<Vec<f32>>, ModelError> {
        let size = self.image_size;
        let plane = 3 * size * size;
        let mut stacked = Vec::with_capacity(images.len() * plane);
        for (index, image) in images.iter().enumerate() {
            if image.data.len() != plane {
                return Err(ModelError::InvalidInput(format!(
                    "batch image {index} has {} values, expected 3x{size}x{size}",
                    image.data.len()
                )));
            }
            stacked.extend_from_slice(&image.data);
        }
        // (images, 3, size, size)
        let pixels = Tensor::from_vec(stacked, (images.len(), 3, size, size), &self.device)?
            .to_dtype(self.dtype)?;
        // (images, tokens, hidden)
        let embeddings = self
            .half
            .encode(&pixels)?
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
