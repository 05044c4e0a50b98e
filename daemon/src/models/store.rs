//! Bundles on disk: `<store>/bundles/<name>/<version>/` holds what an import verified
//! (`manifest.toml`, `manifest.sig` and the files). An import unpacks into
//! `<store>/staging/` first and moves into place only once everything checked out; a
//! version directory is verified again, file by file, every time it is loaded. Both times
//! the graph is held to the bundle's graph rules (`moat_core::bundle::check_graph`) before
//! ONNX Runtime can see it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use moat_core::bundle::archive::hash_reader;
use moat_core::bundle::{
    BundleError, BundleManifest, GRAPH_FILE, MANIFEST_FILE, SIGNATURE_FILE, TrustedKey, Unpacked,
    VerifiedBundle, check_graph, unpack_verified, verify,
};

/// Why a bundle could not be stored or read back.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bundle refused: {0}")]
    Bundle(#[from] BundleError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no trusted bundle key in {dir}: add the ML team's public key (NAME.pub) there")]
    NoTrustedKeys { dir: PathBuf },
    #[error("trusted key {path} is not usable: {reason}")]
    BadTrustedKey { path: PathBuf, reason: String },
    #[error("{label} is already imported")]
    AlreadyImported { label: String },
    #[error("{label} is not imported (moatctl model list shows what is)")]
    NotImported { label: String },
    #[error(
        "the files of {label} are missing from {dir}; remove the version and import it again with --allow-downgrade"
    )]
    FilesMissing { label: String, dir: PathBuf },
    #[error(
        "{path} is a {kind}, not a regular file: the bundle store was altered; remove the version and import it again with --allow-downgrade"
    )]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "{dir} holds {found}, not {label}: the bundle store was altered; remove the version and import it again with --allow-downgrade"
    )]
    Misplaced {
        label: String,
        found: String,
        dir: PathBuf,
    },
    #[error(
        "{path} is not the file its manifest lists (size or SHA-256 differs): the bundle store was altered; remove the version and import it again with --allow-downgrade"
    )]
    Altered { path: PathBuf },
}

impl StoreError {
    /// A short stable code for audit records.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Bundle(e) => e.code(),
            StoreError::Io { .. } => "io_error",
            StoreError::NoTrustedKeys { .. } | StoreError::BadTrustedKey { .. } => "trusted_keys",
            StoreError::AlreadyImported { .. } => "already_imported",
            StoreError::NotImported { .. } => "not_imported",
            StoreError::FilesMissing { .. }
            | StoreError::NotAFile { .. }
            | StoreError::Misplaced { .. }
            | StoreError::Altered { .. } => "store_damaged",
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The public keys (`*.pub`) of the trusted keys directory, read afresh for every check so
/// that removing a key file withdraws its trust.
pub fn trusted_keys(dir: &Path) -> Result<Vec<TrustedKey>, StoreError> {
    let mut keys = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NoTrustedKeys {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(io_error(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().is_none_or(|e| e != "pub") {
            continue;
        }
        let text = fs::read_to_string(&path).map_err(io_error(&path))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let key = TrustedKey::from_file(&name, &text).map_err(|e| StoreError::BadTrustedKey {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(StoreError::NoTrustedKeys {
            dir: dir.to_path_buf(),
        });
    }
    Ok(keys)
}

#[derive(Debug)]
pub struct BundleStore {
    bundles: PathBuf,
    staging: PathBuf,
}

/// A verified bundle unpacked in staging; removed unless installed.
#[derive(Debug)]
pub struct Staged {
    pub verified: VerifiedBundle,
    dir: Option<tempfile::TempDir>,
}

fn private_dir(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(path)
        .map_err(io_error(path))
}

impl BundleStore {
    /// Opens (creating) the store under `root`; leftovers of an interrupted import go.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let store = Self {
            bundles: root.join("bundles"),
            staging: root.join("staging"),
        };
        private_dir(&store.bundles)?;
        if store.staging.exists() {
            fs::remove_dir_all(&store.staging).map_err(io_error(&store.staging))?;
        }
        private_dir(&store.staging)?;
        Ok(store)
    }

    pub fn version_dir(&self, name: &str, version: &semver::Version) -> PathBuf {
        self.bundles.join(name).join(version.to_string())
    }

    /// Unpacks a bundle tar into staging and verifies it: signature, manifest, files.
    pub fn receive(
        &self,
        mut reader: impl Read,
        trusted: &[TrustedKey],
    ) -> Result<Staged, StoreError> {
        let received = self.receive_from(&mut reader, trusted);
        // The sender is told why only once it has sent everything: read what is left.
        let _ = io::copy(&mut reader, &mut io::sink());
        received
    }

    fn receive_from(
        &self,
        reader: impl Read,
        trusted: &[TrustedKey],
    ) -> Result<Staged, StoreError> {
        let dir = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&self.staging)
            .map_err(io_error(&self.staging))?;
        let root = dir.path().to_path_buf();
        // The signature and manifest are checked before any file is accepted; then only
        // the files the manifest lists, at their listed sizes, are written.
        let (verified, unpacked) = unpack_verified(reader, trusted, |name| {
            // Names were checked by `unpack`: plain, top-level, listed, not seen before.
            File::create_new(root.join(name)).map(BufWriter::new)
        })?;
        let write = |name: &str, bytes: &[u8]| {
            let path = root.join(name);
            fs::write(&path, bytes).map_err(io_error(&path))
        };
        write(MANIFEST_FILE, &unpacked.manifest)?;
        write(
            SIGNATURE_FILE,
            unpacked.signature.as_deref().unwrap_or_default(),
        )?;
        let graph = root.join(GRAPH_FILE);
        check_graph(
            &verified.manifest,
            &fs::read(&graph).map_err(io_error(&graph))?,
        )?;
        Ok(Staged {
            verified,
            dir: Some(dir),
        })
    }

    /// Moves a staged bundle to its version directory.
    pub fn install(&self, mut staged: Staged) -> Result<VerifiedBundle, StoreError> {
        let manifest = &staged.verified.manifest;
        let target = self.version_dir(&manifest.name, &manifest.version);
        if target.exists() {
            return Err(StoreError::AlreadyImported {
                label: manifest.label(),
            });
        }
        if let Some(parent) = target.parent() {
            private_dir(parent)?;
        }
        let Some(dir) = staged.dir.take() else {
            return Err(StoreError::NotImported {
                label: manifest.label(),
            });
        };
        let path = dir.keep();
        fs::rename(&path, &target).map_err(io_error(&target))?;
        if let Ok(parent) = File::open(target.parent().unwrap_or(&target)) {
            let _ = parent.sync_all();
        }
        Ok(staged.verified)
    }

    /// Verifies an installed version again, every file hashed from disk, and returns it
    /// with its directory.
    pub fn open_version(
        &self,
        name: &str,
        version: &semver::Version,
        trusted: &[TrustedKey],
    ) -> Result<(VerifiedBundle, PathBuf), StoreError> {
        let dir = self.version_dir(name, version);
        if !dir.is_dir() {
            return Err(StoreError::FilesMissing {
                label: format!("{name}@{version}"),
                dir,
            });
        }
        let read = |file: &str| {
            let path = dir.join(file);
            fs::read(&path).map_err(io_error(&path))
        };
        let manifest = read(MANIFEST_FILE)?;
        let signature = read(SIGNATURE_FILE)?;
        let mut files = BTreeMap::new();
        let mut graph = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let path = entry.path();
            // An import writes regular files only; a link here could point anywhere.
            let kind = entry.file_type().map_err(io_error(&path))?;
            if !kind.is_file() {
                let kind = if kind.is_symlink() {
                    "symbolic link"
                } else {
                    "directory or special file"
                };
                return Err(StoreError::NotAFile { path, kind });
            }
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name == MANIFEST_FILE || file_name == SIGNATURE_FILE {
                continue;
            }
            let hashed = if file_name == GRAPH_FILE {
                // Read once: hashed now, and checked once the manifest is verified.
                graph = fs::read(&path).map_err(io_error(&path))?;
                hash_reader(graph.as_slice()).map_err(io_error(&path))?
            } else {
                File::open(&path)
                    .and_then(|f| hash_reader(BufReader::new(f)))
                    .map_err(io_error(&path))?
            };
            files.insert(file_name, hashed);
        }
        let unpacked = Unpacked {
            manifest,
            signature: Some(signature),
            files,
        };
        let verified = verify(&unpacked, trusted)?;
        check_graph(&verified.manifest, &graph)?;
        if verified.manifest.name != name || verified.manifest.version != *version {
            return Err(StoreError::Misplaced {
                label: format!("{name}@{version}"),
                found: verified.manifest.label(),
                dir,
            });
        }
        Ok((verified, dir))
    }

    /// A stored version's manifest and one of its small files (at most `max_bytes`), checked
    /// against the size and SHA-256 the manifest lists; `None` when the bundle has no such
    /// file. For files read after load (the evaluation set), without hashing the weights
    /// again: the whole version was verified when it was imported and when it loaded.
    pub fn read_listed(
        &self,
        name: &str,
        version: &semver::Version,
        file: &str,
        max_bytes: u64,
    ) -> Result<(BundleManifest, Option<Vec<u8>>), StoreError> {
        let dir = self.version_dir(name, version);
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest = fs::read(&manifest_path).map_err(io_error(&manifest_path))?;
        let manifest = BundleManifest::parse(&manifest).map_err(BundleError::from)?;
        let Some(entry) = manifest.files.iter().find(|f| f.path == file) else {
            return Ok((manifest, None));
        };
        let path = dir.join(file);
        if entry.size > max_bytes {
            return Err(StoreError::Altered { path });
        }
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut bytes))
            .map_err(io_error(&path))?;
        let hashed = hash_reader(bytes.as_slice()).map_err(io_error(&path))?;
        if hashed.size != entry.size || hashed.sha256 != entry.sha256 {
            return Err(StoreError::Altered { path });
        }
        Ok((manifest, Some(bytes)))
    }

    pub fn remove(&self, name: &str, version: &semver::Version) -> Result<(), StoreError> {
        let dir = self.version_dir(name, version);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error(&dir)(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
