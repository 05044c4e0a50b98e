//! moat-core: the logic that `moatd` and `moatctl` share and that needs no I/O.
//!
//! It owns plain data formats and the rules over them: today the model metadata that a
//! model directory carries (`moat-model.json`), the bundle manifest and its signature,
//! policy evaluation, the audit chain and the admin socket's protocol ([`admin`]). It must
//! not depend on tokio, actix, ONNX Runtime, sled or anything else that touches the network,
//! the disk or hardware: callers read the bytes and hand them in.

pub mod admin;
pub mod audit;
pub mod bundle;
pub mod model_metadata;
pub mod policy;

pub use model_metadata::{
    EmbeddingSpec, IoContract, KvDtype, MetadataError, ModelMetadata, ModelTask, Pooling,
};
