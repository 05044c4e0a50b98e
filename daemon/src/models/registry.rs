//! The model registry in sled: imported versions by name, which is active, which is the
//! canary and with what share, the previous active version, and the highest version ever
//! imported for each name (anti-rollback; removing a version never lowers it). Every change
//! is flushed before the command that made it answers, so it survives a crash or restart.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why the registry could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the model registry in {dir} cannot be opened: {source}")]
    Open {
        dir: String,
        #[source]
        source: sled::Error,
    },
    #[error("the model registry cannot be used: {0}")]
    Store(#[from] sled::Error),
    #[error("the model registry holds a damaged entry for {name}: {reason}")]
    Damaged { name: String, reason: String },
}

/// One imported version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub imported_unix_ms: i64,
    /// The trusted key file that signed it, and the key's id.
    pub signer: String,
    pub signer_id: String,
    pub bytes: u64,
    pub task: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryEntry {
    pub version: String,
    pub percent: u8,
}

/// Everything the registry knows of one name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub versions: BTreeMap<String, VersionEntry>,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub canary: Option<CanaryEntry>,
}

fn decode(name: &str, bytes: &[u8]) -> Result<ModelEntry, RegistryError> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Damaged {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

#[derive(Debug)]
pub struct Registry {
    db: sled::Db,
    models: sled::Tree,
    highest: sled::Tree,
}

impl Registry {
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|source| RegistryError::Open {
                dir: dir.display().to_string(),
                source,
            })?;
        Ok(Self {
            models: db.open_tree("models")?,
            highest: db.open_tree("highest")?,
            db,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<ModelEntry>, RegistryError> {
        self.models
            .get(name)?
            .map(|bytes| decode(name, &bytes))
            .transpose()
    }

    pub fn all(&self) -> Result<BTreeMap<String, ModelEntry>, RegistryError> {
        let mut all = BTreeMap::new();
        for item in &self.models {
            let (key, bytes) = item?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let entry = decode(&name, &bytes)?;
            all.insert(name, entry);
        }
        Ok(all)
    }

    /// Stores the entry (removes it when it holds no version) and flushes.
    pub fn put(&self, name: &str, entry: &ModelEntry) -> Result<(), RegistryError> {
        if entry.versions.is_empty() {
            self.models.remove(name)?;
        } else {
            // A plain struct of strings and numbers always serializes.
            let bytes = serde_json::to_vec(entry).unwrap_or_default();
            self.models.insert(name, bytes)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// The highest version ever imported under `name`.
    pub fn highest(&self, name: &str) -> Result<Option<semver::Version>, RegistryError> {
        let Some(bytes) = self.highest.get(name)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        semver::Version::parse(&text)
            .map(Some)
            .map_err(|e| RegistryError::Damaged {
                name: name.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Records an import: the version and, if it is higher, the new highest, in one
    /// flushed step.
    pub fn record_import(
        &self,
        name: &str,
        version: &semver::Version,
        entry: VersionEntry,
    ) -> Result<(), RegistryError> {
        let mut model = self.get(name)?.unwrap_or_default();
        model.versions.insert(version.to_string(), entry);
        if self.highest(name)?.is_none_or(|h| *version > h) {
            self.highest.insert(name, version.to_string().as_bytes())?;
        }
        self.put(name, &model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> VersionEntry {
        VersionEntry {
            imported_unix_ms: 1,
            signer: "ml.pub".into(),
            signer_id: "00".into(),
            bytes: 10,
            task: "chat".into(),
        }
    }

    #[test]
    fn state_survives_reopening_and_removal_never_lowers_the_highest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let v = |s: &str| semver::Version::parse(s).expect("version");
        {
            let registry = Registry::open(dir.path()).expect("opens");
            registry
                .record_import("m", &v("1.0.0"), entry())
                .expect("ok");
            registry
                .record_import("m", &v("2.0.0"), entry())
                .expect("ok");
            let mut model = registry.get("m").expect("reads").expect("there");
            model.active = Some("2.0.0".into());
            model.previous = Some("1.0.0".into());
            model.versions.remove("2.0.0");
            registry.put("m", &model).expect("ok");
        }
        let registry = Registry::open(dir.path()).expect("reopens");
        let model = registry.get("m").expect("reads").expect("there");
        assert_eq!(model.active.as_deref(), Some("2.0.0"));
        assert_eq!(model.versions.len(), 1);
        assert_eq!(registry.highest("m").expect("reads"), Some(v("2.0.0")));
        registry.put("m", &ModelEntry::default()).expect("ok");
        assert!(registry.all().expect("reads").is_empty());
        assert_eq!(registry.highest("m").expect("reads"), Some(v("2.0.0")));
    }
}
