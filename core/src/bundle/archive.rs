//! The bundle as a tar: `manifest.toml`, `manifest.sig`, then the files, all regular
//! files at the top level. Reading refuses anything else (directories, links, devices,
//! names with a path in them, repeated names) before a byte of it is written anywhere, and
//! hashes every file as it passes.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use super::manifest::valid_file_name;
use super::{MANIFEST_FILE, SIGNATURE_FILE};

/// The largest `manifest.toml` or `manifest.sig` read into memory.
const MAX_METADATA_BYTES: u64 = 4 << 20;

/// Why a tar was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the bundle is not a readable tar: {0}")]
    Read(#[source] io::Error),
    #[error("the bundle holds {path:?}, which is a {kind}: a bundle holds regular files only")]
    NotAFile { path: String, kind: &'static str },
    #[error(
        "the bundle holds {path:?}: entries must be plain file names at the top level (no '/', '..' or leading '.')"
    )]
    BadPath { path: String },
    #[error("the bundle holds {0:?} twice")]
    Duplicate(String),
    #[error("{0} in the bundle is larger than {MAX_METADATA_BYTES} bytes")]
    MetadataTooLarge(&'static str),
    #[error("the bundle holds no manifest.toml")]
    NoManifest,
    #[error("cannot store {path} from the bundle: {source}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// A file as it came out of the tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// What a tar held: the manifest and signature bytes, and each other file's size and hash
/// (its bytes went to the caller's sink).
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub manifest: Vec<u8>,
    pub signature: Option<Vec<u8>>,
    pub files: BTreeMap<String, ReceivedFile>,
}

/// Reads a bundle tar. Each file other than the manifest and signature is copied to the
/// writer `create` opens for its name (an `io::sink()` to only hash it).
pub fn unpack<R: Read, W: Write>(
    reader: R,
    mut create: impl FnMut(&str) -> io::Result<W>,
) -> Result<Unpacked, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let mut manifest = None;
    let mut signature = None;
    let mut files = BTreeMap::new();
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(ArchiveError::NotAFile {
                path: raw,
                kind: kind_name(kind),
            });
        }
        let name = raw.strip_prefix("./").unwrap_or(&raw).to_owned();
        let metadata = match name.as_str() {
            MANIFEST_FILE => Some((&mut manifest, MANIFEST_FILE)),
            SIGNATURE_FILE => Some((&mut signature, SIGNATURE_FILE)),
            _ => None,
        };
        if let Some((slot, file)) = metadata {
            if slot.is_some() {
                return Err(ArchiveError::Duplicate(name));
            }
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_METADATA_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(ArchiveError::Read)?;
            if bytes.len() as u64 > MAX_METADATA_BYTES {
                return Err(ArchiveError::MetadataTooLarge(file));
            }
            *slot = Some(bytes);
            continue;
        }
        if !valid_file_name(&name) {
            return Err(ArchiveError::BadPath { path: raw });
        }
        if files.contains_key(&name) {
            return Err(ArchiveError::Duplicate(name));
        }
        let write_error = |source| ArchiveError::Write {
            path: name.clone(),
            source,
        };
        let mut out = create(&name).map_err(write_error)?;
        let received = copy_hashing(&mut entry, &mut out).map_err(|e| match e {
            Copy::Read(e) => ArchiveError::Read(e),
            Copy::Write(e) => write_error(e),
        })?;
        out.flush().map_err(write_error)?;
        files.insert(name, received);
    }
    Ok(Unpacked {
        manifest: manifest.ok_or(ArchiveError::NoManifest)?,
        signature,
        files,
    })
}

enum Copy {
    Read(io::Error),
    Write(io::Error),
}

fn copy_hashing(reader: &mut impl Read, out: &mut impl Write) -> Result<ReceivedFile, Copy> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Copy::Read(e)),
        };
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(Copy::Write)?;
        size += n as u64;
    }
    Ok(ReceivedFile {
        size,
        sha256: hasher.finalize().into(),
    })
}

/// Size and SHA-256 of whatever `reader` yields (a file already on disk).
pub fn hash_reader(mut reader: impl Read) -> io::Result<ReceivedFile> {
    copy_hashing(&mut reader, &mut io::sink()).map_err(|e| match e {
        Copy::Read(e) | Copy::Write(e) => e,
    })
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Directory => "directory",
        tar::EntryType::Symlink => "symbolic link",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char | tar::EntryType::Block => "device",
        tar::EntryType::Fifo => "FIFO",
        _ => "special entry",
    }
}

/// Writes a bundle tar: the manifest, the signature if any, then each file (name, size and
/// contents). Headers carry no owner, time or mode of the packer's machine, so the same
/// bundle packs to the same bytes.
pub struct BundleWriter<W: Write> {
    builder: tar::Builder<W>,
}

impl<W: Write> std::fmt::Debug for BundleWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BundleWriter")
    }
}

impl<W: Write> BundleWriter<W> {
    pub fn new(out: W, manifest: &[u8], signature: Option<&[u8]>) -> io::Result<Self> {
        let mut writer = Self {
            builder: tar::Builder::new(out),
        };
        writer.add(MANIFEST_FILE, manifest.len() as u64, manifest)?;
        if let Some(signature) = signature {
            writer.add(SIGNATURE_FILE, signature.len() as u64, signature)?;
        }
        Ok(writer)
    }

    pub fn add(&mut self, name: &str, size: u64, contents: impl Read) -> io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_path(name)?;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        self.builder.append(&header, contents)
    }

    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }
}
