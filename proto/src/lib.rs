//! The gRPC contracts of kosmos-serve and their generated code (the only generated code in the workspace).
//!
//! * [`tensor::v1`]: tensors on the wire (image embeddings);
//! * [`encoder::v1`]: the internal vision-encoder API;
//! * [`decoder::v1`]: the internal decoder API;
//! * [`v1`]: the public API (`kosmos.v1.Kosmos`), served by the gateway.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Tensors on the wire.
pub mod tensor {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("kosmos.tensor.v1");
    }
}

/// The internal vision-encoder API.
pub mod encoder {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("kosmos.encoder.v1");
    }
}

/// The internal decoder API.
pub mod decoder {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("kosmos.decoder.v1");
    }
}

/// The public API, served by the gateway (`kosmos.v1`).
pub mod v1 {
    tonic::include_proto!("kosmos.v1");
}

/// The encoded `FileDescriptorSet` of every kosmos proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kosmos_descriptor");
