//! The bundle as a tar: `manifest.toml` first, `manifest.sig` second, then the files, all
//! regular files at the top level. Reading refuses anything else (directories, links,
//! devices, names with a path in them, repeated names) before a byte of it is written
//! anywhere, and hashes every file as it passes. Because the manifest and signature come
//! first, a reader can check them before it accepts any file, and then accept only the
//! files the signed manifest lists, at their listed sizes.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use super::manifest::valid_file_name;
use super::{BundleError, MANIFEST_FILE, SIGNATURE_FILE};

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
    #[error(
        "the bundle's first entry is {0:?}: manifest.toml must come first, then manifest.sig (moatctl bundle pack and sign write them so)"
    )]
    ManifestNotFirst(String),
    #[error("manifest.sig must directly follow manifest.toml in the bundle")]
    SignatureNotSecond,
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

/// Which files a reader accepts, decided once it has seen the manifest and signature.
#[derive(Debug, Clone)]
pub enum Admit {
    /// Every well-formed entry (packing, signing and inspecting a bundle on the ML team's
    /// side, where the files are checked against the manifest afterwards).
    Any,
    /// Only these names, each at exactly this size (from a manifest whose signature the
    /// caller verified): anything else is refused before a byte of it is written.
    Listed(BTreeMap<String, u64>),
}

/// Reads a bundle tar. `vet` sees the manifest and signature bytes before any file and says
/// which files to accept; each accepted file is copied to the writer `create` opens for its
/// name (an `io::sink()` to only hash it).
pub fn unpack<R: Read, W: Write>(
    reader: R,
    vet: impl FnOnce(&[u8], Option<&[u8]>) -> Result<Admit, BundleError>,
    mut create: impl FnMut(&str) -> io::Result<W>,
) -> Result<Unpacked, BundleError> {
    let mut archive = tar::Archive::new(reader);
    let mut manifest: Option<Vec<u8>> = None;
    let mut signature: Option<Vec<u8>> = None;
    let mut vet = Some(vet);
    let mut admit = None;
    let mut files = BTreeMap::new();
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(ArchiveError::NotAFile {
                path: raw,
                kind: kind_name(kind),
            }
            .into());
        }
        let name = raw.strip_prefix("./").unwrap_or(&raw).to_owned();
        match (name.as_str(), &manifest, &signature, &admit) {
            (MANIFEST_FILE, None, _, _) => {
                manifest = Some(read_metadata(&mut entry, MANIFEST_FILE)?);
                continue;
            }
            (_, None, _, _) => return Err(ArchiveError::ManifestNotFirst(raw).into()),
            (SIGNATURE_FILE, Some(_), None, None) => {
                signature = Some(read_metadata(&mut entry, SIGNATURE_FILE)?);
                continue;
            }
            (SIGNATURE_FILE, _, None, Some(_)) => {
                return Err(ArchiveError::SignatureNotSecond.into());
            }
            (MANIFEST_FILE | SIGNATURE_FILE, ..) => {
                return Err(ArchiveError::Duplicate(name).into());
            }
            _ => {}
        }
        if !valid_file_name(&name) {
            return Err(ArchiveError::BadPath { path: raw }.into());
        }
        if files.contains_key(&name) {
            return Err(ArchiveError::Duplicate(name).into());
        }
        let admit = match (&admit, vet.take()) {
            (Some(admit), _) => admit,
            (None, Some(vet)) => admit.insert(vet(
                manifest.as_deref().unwrap_or_default(),
                signature.as_deref(),
            )?),
            (None, None) => return Err(ArchiveError::NoManifest.into()),
        };
        // The size the reader will deliver (a PAX record may override the header's).
        let found = entry.size();
        if let Admit::Listed(listed) = admit {
            match listed.get(&name) {
                None => return Err(BundleError::UnlistedFile { path: name }),
                Some(&size) if size != found => {
                    return Err(BundleError::SizeMismatch {
                        path: name,
                        listed: size,
                        found,
                    });
                }
                Some(_) => {}
            }
        }
        let write_error = |source| ArchiveError::Write {
            path: name.clone(),
            source,
        };
        let mut out = create(&name).map_err(write_error)?;
        // Never more than the size checked above, whatever the archive claims later.
        let received =
            copy_hashing(&mut (&mut entry).take(found), &mut out).map_err(|e| match e {
                Copy::Read(e) => ArchiveError::Read(e),
                Copy::Write(e) => write_error(e),
            })?;
        out.flush().map_err(write_error)?;
        files.insert(name, received);
    }
    let manifest = manifest.ok_or(ArchiveError::NoManifest)?;
    // A bundle of no files is still vetted: its manifest and signature must pass.
    if let Some(vet) = vet.take()
        && admit.is_none()
    {
        vet(&manifest, signature.as_deref())?;
    }
    Ok(Unpacked {
        manifest,
        signature,
        files,
    })
}

fn read_metadata(entry: &mut impl Read, file: &'static str) -> Result<Vec<u8>, ArchiveError> {
    let mut bytes = Vec::new();
    entry
        .take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ArchiveError::Read)?;
    if bytes.len() as u64 > MAX_METADATA_BYTES {
        return Err(ArchiveError::MetadataTooLarge(file));
    }
    Ok(bytes)
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
