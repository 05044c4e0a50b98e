//! A policy directory, read the one way moatd loads it and moatctl checks it:
//! `schema.cedarschema`, every `*.cedar` file in name order, and `moat-policy.toml`.

use std::io;
use std::path::{Path, PathBuf};

use moat_core::policy::{PolicySource, SourceFile};

/// The schema every policy is checked against.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// The data rules: classification scale, ceilings, content rules, limits.
pub const DATA_FILE: &str = "moat-policy.toml";
/// What a policy directory holds, for messages.
const LAYOUT: &str = "a policy directory holds schema.cedarschema, one or more *.cedar files and \
     moat-policy.toml";

/// Why a policy directory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The directory itself cannot be listed.
    #[error("cannot read the policy directory {}", .dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A required file is absent.
    #[error("{} is missing ({LAYOUT})", .path.display())]
    Missing { path: PathBuf },
    /// The directory has no `*.cedar` file.
    #[error("the policy directory {} holds no .cedar file ({LAYOUT})", .dir.display())]
    NoPolicies { dir: PathBuf },
    /// A file exists but cannot be read as UTF-8 text.
    #[error("cannot read {}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One file's name (its path, as messages show it) and text.
#[derive(Debug)]
struct NamedText {
    name: String,
    text: String,
}

/// The texts of a policy directory, in the order moatd loads them.
#[derive(Debug)]
pub struct PolicyFiles {
    schema: NamedText,
    policies: Vec<NamedText>,
    data: NamedText,
}

impl PolicyFiles {
    /// Reads `schema.cedarschema`, every `*.cedar` file sorted by name, and
    /// `moat-policy.toml` from `dir`.
    pub fn read(dir: &Path) -> Result<Self, ReadError> {
        let entries = std::fs::read_dir(dir).map_err(|source| ReadError::Directory {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut cedar: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "cedar") && path.is_file())
            .collect();
        cedar.sort();
        // A directory without policies is not a policy directory, whatever else it holds.
        if cedar.is_empty() {
            return Err(ReadError::NoPolicies {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Self {
            schema: read_text(&dir.join(SCHEMA_FILE))?,
            policies: cedar
                .iter()
                .map(|path| read_text(path))
                .collect::<Result<_, _>>()?,
            data: read_text(&dir.join(DATA_FILE))?,
        })
    }

    /// The texts as `moat-core` takes them.
    pub fn source(&self) -> PolicySource<'_> {
        fn file(named: &NamedText) -> SourceFile<'_> {
            SourceFile {
                name: &named.name,
                text: &named.text,
            }
        }
        PolicySource {
            schema: file(&self.schema),
            policies: self.policies.iter().map(file).collect(),
            data: file(&self.data),
        }
    }
}

fn read_text(path: &Path) -> Result<NamedText, ReadError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(NamedText {
            name: path.display().to_string(),
            text,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ReadError::Missing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(ReadError::File {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn reads_every_cedar_file_in_name_order() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), SCHEMA_FILE, "namespace Moat {}");
        write(tmp.path(), DATA_FILE, "");
        write(tmp.path(), "b.cedar", "// b");
        write(tmp.path(), "a.cedar", "// a");
        write(tmp.path(), "notes.txt", "not a policy");
        let files = PolicyFiles::read(tmp.path()).expect("reads");
        let source = files.source();
        let texts: Vec<&str> = source.policies.iter().map(|f| f.text).collect();
        assert_eq!(texts, ["// a", "// b"]);
        assert!(source.policies[0].name.ends_with("a.cedar"));
        assert_eq!(source.schema.text, "namespace Moat {}");
    }

    #[test]
    fn names_the_missing_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), SCHEMA_FILE, "");
        write(tmp.path(), "a.cedar", "");
        let error = PolicyFiles::read(tmp.path()).expect_err("no data file");
        assert!(matches!(&error, ReadError::Missing { path } if path.ends_with(DATA_FILE)));
        assert!(error.to_string().contains(DATA_FILE), "{error}");
    }

    #[test]
    fn a_directory_without_policies_is_refused_before_its_files_are_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let error = PolicyFiles::read(tmp.path()).expect_err("nothing there");
        assert!(matches!(error, ReadError::NoPolicies { .. }), "{error}");
    }

    #[test]
    fn refuses_a_directory_without_policies() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write(tmp.path(), SCHEMA_FILE, "");
        write(tmp.path(), DATA_FILE, "");
        let error = PolicyFiles::read(tmp.path()).expect_err("no .cedar file");
        assert!(matches!(error, ReadError::NoPolicies { .. }));
    }
}
