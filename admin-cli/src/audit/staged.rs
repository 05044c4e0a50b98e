//! An output file written under a temporary name beside its final one, and put in place
//! only when complete: a reader never finds half a file under the final name.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// A file being written for `path`. Dropped without [`StagedFile::commit`], it is removed.
#[derive(Debug)]
pub struct StagedFile {
    temp: NamedTempFile,
    path: PathBuf,
}

impl StagedFile {
    /// Creates the temporary file in `path`'s directory (readable by its owner only).
    pub fn create(path: &Path) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".partial")
            .tempfile_in(directory_of(path))?;
        Ok(Self {
            temp,
            path: path.to_path_buf(),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// The temporary file's path, to read back what was written.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Syncs the file, renames it to its final name and syncs the directory.
    pub fn commit(self) -> io::Result<()> {
        self.temp.as_file().sync_all()?;
        self.temp.persist(&self.path).map_err(|e| e.error)?;
        File::open(directory_of(&self.path))?.sync_all()
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn nothing_is_under_the_final_name_until_commit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.jsonl");
        let mut staged = StagedFile::create(&path).expect("created");
        staged.file().write_all(b"half").expect("written");
        assert!(!path.exists());
        assert_eq!(staged.temp_path().parent(), Some(dir.path()));
        staged.commit().expect("committed");
        assert_eq!(std::fs::read(&path).expect("read"), b"half");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);

        let abandoned = dir.path().join("abandoned.csv");
        drop(StagedFile::create(&abandoned).expect("created"));
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
