//! `moatctl audit decrypt`: an export's records, verified and decrypted with an auditor's
//! age identity, listed as JSON lines or CSV.

use std::io::{self, BufReader, BufWriter, Read as _, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use moat_core::audit::export::ExportReader;
use moat_core::audit::{AuditRecord, ChainEntry};

use super::listing::{ListingFormat, RecordListing};
use super::staged::StagedFile;
use super::{Error, OpenedExport, bytes_bar, open_export};

pub const HELP: &str = concat!(
    "Examples:
  moatctl audit decrypt --identity ~/auditor.key node-a.moat-audit --format csv \\
      --out node-a.csv
  moatctl audit decrypt --identity ~/auditor.key node-a.moat-audit --format jsonl \\
      --node-key 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29 | jq .

The identity file is what `age-keygen` writes: one AGE-SECRET-KEY-1... line per identity,
lines starting with # are comments. The fields of both formats are described in
docs/audit.md.

",
    exit_codes!()
);

/// An age identity, as `age` hands them out.
type Identity = Box<dyn age::Identity + Send + Sync>;

/// Why records cannot be decrypted.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    /// The identity file cannot be read or holds something else than identities.
    #[error("cannot read the identity file {}", .path.display())]
    IdentityFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The identity file holds no identity.
    #[error("the identity file {} holds no age identity (AGE-SECRET-KEY-1...)", .path.display())]
    NoIdentity { path: PathBuf },
    /// No identity given opens a record: it was encrypted to other auditors.
    #[error(
        "no identity in {} opens record {sequence}: it was encrypted to other auditors' keys \
         (wrong key?)",
        .path.display()
    )]
    WrongKey { path: PathBuf, sequence: u64 },
    /// A record's body is not an age file, does not decrypt, or is not an audit record.
    #[error("record {sequence} cannot be decrypted: {reason}")]
    Body { sequence: u64, reason: String },
}

/// What was decrypted.
#[derive(Debug, Default)]
struct Decrypted {
    records: u64,
    sequences: Option<(u64, u64)>,
}

/// Decrypts the export `file` with the identities in `identity_file` to `out` (standard
/// output when `None`).
pub fn run(
    file: &Path,
    identity_file: &Path,
    format: ListingFormat,
    out: Option<&Path>,
    trusted: Option<[u8; 32]>,
) -> Result<ExitCode, Error> {
    let identities = read_identities(identity_file)?;
    let decryption = Decryption {
        file,
        identity_file,
        identities: &identities,
        format,
        trusted,
    };
    let decrypted = match out {
        Some(out) => {
            let output_error = |source| Error::Output {
                path: out.to_path_buf(),
                source,
            };
            let mut staged = StagedFile::create(out).map_err(output_error)?;
            let decrypted =
                decryption.write_to(BufWriter::new(staged.file()), out, "decrypting")?;
            staged.commit().map_err(output_error)?;
            decrypted
        }
        None => {
            // Nothing reaches the terminal or the pipe unless everything verifies and opens.
            let stdout = Path::new("standard output");
            decryption.write_to(io::sink(), stdout, "verifying")?;
            match decryption.write_to(io::stdout().lock(), stdout, "decrypting") {
                // The reader (`| head`) has all it wants.
                Err(Error::Output { source, .. }) if source.kind() == io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS);
                }
                decrypted => decrypted?,
            }
        }
    };
    let target = out.map_or("standard output".into(), |p| p.display().to_string());
    match decrypted.sequences {
        Some((first, last)) => eprintln!(
            "decrypted {} record(s), sequence {first} to {last}, of the verified export {} to {target}",
            decrypted.records,
            file.display()
        ),
        None => eprintln!("the export {} verifies and holds no record", file.display()),
    }
    Ok(ExitCode::SUCCESS)
}

/// One pass over an export.
struct Decryption<'a> {
    file: &'a Path,
    identity_file: &'a Path,
    identities: &'a [Identity],
    format: ListingFormat,
    trusted: Option<[u8; 32]>,
}

impl std::fmt::Debug for Decryption<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Identities are secrets.
        f.debug_struct("Decryption")
            .field("file", &self.file)
            .field("identity_file", &self.identity_file)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl Decryption<'_> {
    /// Verifies and decrypts the whole export, listing its records on `out` (`target` in
    /// messages).
    fn write_to<W: Write>(
        &self,
        out: W,
        target: &Path,
        message: &'static str,
    ) -> Result<Decrypted, Error> {
        let bar = bytes_bar(message);
        let OpenedExport { header, key, input } = open_export(self.file, self.trusted, &bar)?;
        let failed = |source| Error::reading(self.file, source);
        let mut reader = ExportReader::new(input, header, &key).map_err(failed)?;
        let output_error = |source| Error::Output {
            path: target.to_path_buf(),
            source,
        };
        let mut listing = RecordListing::new(self.format, out).map_err(output_error)?;
        let mut decrypted = Decrypted::default();
        while let Some(entry) = reader.next_record().map_err(failed)? {
            let record = self.open(&entry)?;
            listing
                .write(entry.sequence, entry.unix_ms, &record)
                .map_err(output_error)?;
            decrypted.records += 1;
            decrypted.sequences = Some(
                decrypted
                    .sequences
                    .map_or((entry.sequence, entry.sequence), |(first, _)| {
                        (first, entry.sequence)
                    }),
            );
        }
        reader.finish().map_err(failed)?;
        listing.finish().map_err(output_error)?;
        bar.finish_and_clear();
        Ok(decrypted)
    }

    /// The record in `entry`'s body.
    fn open(&self, entry: &ChainEntry) -> Result<AuditRecord, DecryptError> {
        let sequence = entry.sequence;
        let body = |reason: String| DecryptError::Body { sequence, reason };
        let decryptor = age::Decryptor::new(&entry.ciphertext[..])
            .map_err(|e| body(format!("its body is not an age file ({e})")))?;
        let identities = self
            .identities
            .iter()
            .map(|i| i.as_ref() as &dyn age::Identity);
        let mut plaintext = Vec::new();
        decryptor
            .decrypt(identities)
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => DecryptError::WrongKey {
                    path: self.identity_file.to_path_buf(),
                    sequence,
                },
                other => body(other.to_string()),
            })?
            .read_to_end(&mut plaintext)
            .map_err(|e| body(e.to_string()))?;
        AuditRecord::from_bytes(&plaintext).map_err(|e| {
            body(format!(
                "it decrypts to something else than an audit record ({e})"
            ))
        })
    }
}

/// The identities in an age identity file.
fn read_identities(path: &Path) -> Result<Vec<Identity>, DecryptError> {
    let read_error = |source| DecryptError::IdentityFile {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let identities = age::IdentityFile::from_buffer(BufReader::new(file))
        .map_err(read_error)?
        .into_identities()
        .map_err(|e| read_error(io::Error::other(e.to_string())))?;
    if identities.is_empty() {
        return Err(DecryptError::NoIdentity {
            path: path.to_path_buf(),
        });
    }
    Ok(identities)
}
