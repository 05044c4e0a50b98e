//! The live audit trail, from the running moatd over its audit or admin socket: `moatctl audit
//! export` without `--store`, and `moatctl audit verify --live`. moatd signs a checkpoint
//! over everything stored, then streams the export, its header and end signed with the
//! node's key; nothing here needs the node's key or an auditor's.

use std::io::{BufRead as _, BufReader, BufWriter, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

use moat_core::admin::{AnswerError, Request, RequestLine, read_acceptance, refusal_in};
use moat_core::audit::encoding::hex;
use moat_core::audit::export::select::TimeRange;

use super::staged::StagedFile;
use super::{Error, Held, progress_bar};

/// Asks moatd on `socket` for the export of `range` and writes it to `out`.
pub fn fetch(socket: &Path, range: TimeRange, out: &mut impl std::io::Write) -> Result<(), Error> {
    let socket_error = |source| Error::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(socket_error)?;
    let request = RequestLine::new(Request::AuditExport {
        since_unix_ms: range.since_unix_ms,
        until_unix_ms: range.until_unix_ms,
    });
    // A request of plain fields always serializes.
    let request = serde_json::to_string(&request).unwrap_or_default();
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(socket_error)?;
    let mut input = BufReader::new(stream);
    let mut line = String::new();
    let bar = progress_bar("receiving", "{msg} {bytes} {spinner}");
    let mut first = true;
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(socket_error)? == 0 {
            break;
        }
        let refused = |message: String| Error::Refused {
            path: socket.to_path_buf(),
            message,
        };
        if first {
            // moatd's answer line: {"ok": true}, or why not.
            first = false;
            match read_acceptance(&line) {
                Ok(()) => continue,
                Err(AnswerError::Refused(refusal)) => return Err(refused(refusal.error)),
                Err(other) => return Err(refused(other.to_string())),
            }
        }
        // The first payload line may be moatd's word that the range is empty.
        if let Some(refusal) = refusal_in(&line) {
            return Err(refused(refusal.error));
        }
        out.write_all(line.as_bytes())
            .map_err(|source| Error::Output {
                path: socket.to_path_buf(),
                source,
            })?;
        bar.inc(line.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

/// `moatctl audit export --out FILE` through the running moatd.
pub fn export(socket: &Path, out: &Path, range: TimeRange) -> Result<ExitCode, Error> {
    let output_error = |source| Error::Output {
        path: out.to_path_buf(),
        source,
    };
    let mut staged = StagedFile::create(out).map_err(output_error)?;
    {
        let mut writer = BufWriter::new(staged.file());
        fetch(socket, range, &mut writer)?;
        writer.flush().map_err(output_error)?;
    }
    let verdict = super::export::verify_written(&staged, out);
    staged.commit().map_err(output_error)?;
    let (header, verified) = verdict?;
    println!(
        "exported {} record(s) and {} checkpoint(s) from the running moatd to {}",
        verified.chain.records,
        verified.chain.checkpoints,
        out.display()
    );
    println!("  node id:         {}", header.node_id);
    println!("  node key:        {}", hex(&header.node_key));
    if let (Some(first), Some(last)) = (verified.chain.first, verified.chain.last) {
        println!("  records:         sequence {first} to {last}");
    }
    println!("  chain head:      {}", verified.end.head);
    println!(
        "Give the auditor the node key through another channel than the file: \
         `moatctl audit verify {} --node-key {}`",
        out.display(),
        hex(&header.node_key)
    );
    Ok(ExitCode::SUCCESS)
}

/// `moatctl audit verify --live`: the whole trail, fetched and verified (as extending
/// `held`, if given).
pub fn verify(
    socket: &Path,
    trusted: Option<[u8; 32]>,
    held: Option<&Held>,
) -> Result<ExitCode, Error> {
    let mut temp = tempfile::NamedTempFile::new().map_err(|source| Error::Output {
        path: std::env::temp_dir(),
        source,
    })?;
    let path = temp.path().to_path_buf();
    {
        let mut writer = BufWriter::new(temp.as_file_mut());
        fetch(socket, TimeRange::default(), &mut writer)?;
        writer
            .flush()
            .map_err(|source| Error::Output { path, source })?;
    }
    println!("the live audit trail of the moatd on {}:", socket.display());
    super::verify::run(temp.path(), trusted, held)
}
