//! PKI files on disk: private keys never exist with permissions wider than 0600, and every file
//! is replaced by a rename, so a reader sees the old content or the new, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::Error;

/// Mode of private keys.
pub const PRIVATE: u32 = 0o600;
/// Mode of certificates, CRLs and the revocation record.
pub const PUBLIC: u32 = 0o644;

/// Replaces `path` with `contents`. The bytes go to a temporary file beside `path`, created with
/// `mode` (the umask may narrow it, never widen it), synced, then renamed over `path`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = temp_path(path);
    let written = write_new(&tmp, contents, mode).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        // The temporary file is ours alone; leaving it would only confuse the next run.
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(|source| Error::Write {
        path: path.to_owned(),
        source,
    })?;
    sync_parent(path)
}

/// Fails with [`Error::AlreadyExists`] for the first of `paths` that exists, unless `force`.
pub fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<(), Error> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|path| path.exists()) {
        Some(path) => Err(Error::AlreadyExists {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Creates `dir` and its parents if missing.
pub fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Reads a whole text file.
pub fn read_text(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a private key, refusing one that group or others may read or write.
pub fn read_private(path: &Path) -> Result<String, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(read_error)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyExposed {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(read_error)
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // The name carries our process id, so a file already there was left by a process that died.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn sync_parent(path: &Path) -> Result<(), Error> {
    let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| Error::Write {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_created_0600_and_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        write_atomic(&path, b"first", PRIVATE).expect("first write");
        write_atomic(&path, b"second", PRIVATE).expect("second write");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).expect("read"), b"second");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).expect("list").collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.key");
        write_atomic(&path, b"secret", 0o640).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            read_private(&path),
            Err(Error::KeyExposed { mode: 0o640, .. })
        ));
    }
}
