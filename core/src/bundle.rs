//! Model bundles: what the ML team ships and the appliance verifies before serving.
//!
//! A bundle is a tar (or a directory) of `manifest.toml`, `manifest.sig` and the files the
//! manifest lists. Verification runs in a fixed order, and nothing is registered unless all
//! of it passes: the signature over the manifest bytes by a trusted key, then the manifest
//! itself, then every file's size and SHA-256 against the manifest (no file missing, none
//! unlisted). Anti-rollback (the version must rise) is the registry's check, after these.
//! The graph itself is the bundle's last check ([`check_graph`]): a signature says who
//! shipped it, not what it may ask of the node, so its operators and external data files
//! are held to [`graph`]'s rules at import and at every load.

pub mod archive;
pub mod eval;
pub mod graph;
pub mod manifest;
pub mod signature;

use std::collections::BTreeMap;

use crate::audit::encoding::hex;
pub use archive::{Admit, ArchiveError, ReceivedFile, Unpacked};
pub use graph::{ExternalDataProblem, GRAPH_FILE, GraphError, GraphInventory};
pub use manifest::{BundleManifest, BundleTask, GoldenExpectation, ManifestError};
pub use signature::{BundleSignature, SignatureError, TrustedKey};

pub const MANIFEST_FILE: &str = "manifest.toml";
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(
        "the bundle is not signed: it holds no {SIGNATURE_FILE} (sign it with `moatctl bundle sign`)"
    )]
    Unsigned,
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("manifest.toml: {0}")]
    Manifest(#[from] ManifestError),
    #[error("{path} is listed in the manifest but missing from the bundle")]
    MissingFile { path: String },
    #[error("{path} is in the bundle but not listed in the manifest")]
    UnlistedFile { path: String },
    #[error(
        "{path} is {found} bytes, but the manifest says {listed}: the file was altered or truncated"
    )]
    SizeMismatch {
        path: String,
        listed: u64,
        found: u64,
    },
    #[error("{path} has SHA-256 {found}, but the manifest says {listed}: the file was altered")]
    HashMismatch {
        path: String,
        listed: String,
        found: String,
    },
    /// The bundle's [`GRAPH_FILE`] is refused.
    #[error("{GRAPH_FILE}: {source}")]
    Graph {
        /// Boxed: the graph's names make it the largest reason, and it is rare.
        #[source]
        source: Box<GraphError>,
    },
}

impl BundleError {
    /// A short stable code for audit records and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            BundleError::Archive(_) => "bad_archive",
            BundleError::Unsigned => "unsigned",
            BundleError::Signature(SignatureError::UnknownKey { .. }) => "untrusted_key",
            BundleError::Signature(_) => "bad_signature",
            BundleError::Manifest(_) => "bad_manifest",
            BundleError::MissingFile { .. } => "missing_file",
            BundleError::UnlistedFile { .. } => "unlisted_file",
            BundleError::SizeMismatch { .. } | BundleError::HashMismatch { .. } => "hash_mismatch",
            BundleError::Graph { source, .. } => match **source {
                GraphError::ExternalData { .. } => "external_data",
                _ => "graph_refused",
            },
        }
    }
}

/// A bundle whose signature, manifest and files all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    pub manifest: BundleManifest,
    /// The trusted key that signed it: its file name and id.
    pub signer: String,
    pub signer_id: String,
}

/// Verifies what a tar (or a directory) held: signature first, then the manifest, then the
/// files.
pub fn verify(unpacked: &Unpacked, trusted: &[TrustedKey]) -> Result<VerifiedBundle, BundleError> {
    let vetted = vet(&unpacked.manifest, unpacked.signature.as_deref(), trusted)?;
    check_files(&vetted.manifest, &unpacked.files)?;
    Ok(vetted)
}

/// The signature by a trusted key, then the manifest.
fn vet(
    manifest: &[u8],
    signature: Option<&[u8]>,
    trusted: &[TrustedKey],
) -> Result<VerifiedBundle, BundleError> {
    let signature = signature.ok_or(BundleError::Unsigned)?;
    let signer = BundleSignature::parse(signature)?.verify(manifest, trusted)?;
    Ok(VerifiedBundle {
        manifest: BundleManifest::parse(manifest)?,
        signer: signer.name.clone(),
        signer_id: signer.id(),
    })
}

/// Reads a bundle tar as an appliance imports it: the signature by a trusted key and the
/// manifest are checked before any file is accepted; then only the files the manifest lists
/// are written (through `create`), each at its listed size, and every file's hash is
/// checked at the end.
pub fn unpack_verified<R: std::io::Read, W: std::io::Write>(
    reader: R,
    trusted: &[TrustedKey],
    create: impl FnMut(&str) -> std::io::Result<W>,
) -> Result<(VerifiedBundle, Unpacked), BundleError> {
    let mut vetted = None;
    let unpacked = archive::unpack(
        reader,
        |manifest, signature| {
            let verified = vet(manifest, signature, trusted)?;
            let listed = verified.manifest.files.iter();
            let admit = Admit::Listed(listed.map(|f| (f.path.clone(), f.size)).collect());
            vetted = Some(verified);
            Ok(admit)
        },
        create,
    )?;
    // `unpack` vets every bundle it returns, files or none.
    let verified = vetted.ok_or(ArchiveError::NoManifest)?;
    check_files(&verified.manifest, &unpacked.files)?;
    Ok((verified, unpacked))
}

/// Holds a verified bundle's graph (the bytes of its [`GRAPH_FILE`]) to [`graph`]'s rules,
/// and every external data file it reads to the manifest: listed, and read within its
/// listed size. Runs after [`check_files`], before the graph reaches ONNX Runtime.
pub fn check_graph(
    manifest: &BundleManifest,
    graph_bytes: &[u8],
) -> Result<GraphInventory, BundleError> {
    let refused = |source| BundleError::Graph {
        source: Box::new(source),
    };
    let inventory = graph::inspect(graph_bytes).map_err(refused)?;
    inventory.check_listed(&manifest.files).map_err(refused)?;
    Ok(inventory)
}

/// Every listed file is there with its size and hash, and nothing else is.
pub fn check_files(
    manifest: &BundleManifest,
    files: &BTreeMap<String, ReceivedFile>,
) -> Result<(), BundleError> {
    for listed in &manifest.files {
        let Some(found) = files.get(&listed.path) else {
            return Err(BundleError::MissingFile {
                path: listed.path.clone(),
            });
        };
        if found.size != listed.size {
            return Err(BundleError::SizeMismatch {
                path: listed.path.clone(),
                listed: listed.size,
                found: found.size,
            });
        }
        if found.sha256 != listed.sha256 {
            return Err(BundleError::HashMismatch {
                path: listed.path.clone(),
                listed: hex(&listed.sha256),
                found: hex(&found.sha256),
            });
        }
    }
    if let Some(extra) = files
        .keys()
        .find(|name| !manifest.files.iter().any(|f| &f.path == *name))
    {
        return Err(BundleError::UnlistedFile {
            path: extra.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
