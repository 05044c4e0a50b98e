//! The policy in force: read from the policy directory, decided on by `moat-core`, swapped
//! whole on reload.
//!
//! A policy directory holds `schema.cedarschema`, one or more `*.cedar` files and
//! `moat-policy.toml`. A reload validates the new directory completely before it replaces
//! the old policy; an invalid one is refused and the old one stays in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use moat_core::policy::limits::Limiter;
use moat_core::policy::{AccessPolicy, PolicyError};
use moat_store::policy::{PolicyFiles, ReadError};

/// Why a policy directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// A file is missing or unreadable, or the directory holds no policy.
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the policy in {dir} is invalid: {source}")]
    Invalid {
        dir: PathBuf,
        #[source]
        source: PolicyError,
    },
    #[error("the policy in {dir} fixes an invalid response_schema for model {model}: {reason}")]
    ResponseSchema {
        dir: PathBuf,
        model: String,
        reason: String,
    },
}

/// Reads and validates a policy directory.
pub fn load_dir(dir: &Path) -> Result<AccessPolicy, PolicyLoadError> {
    let files = PolicyFiles::read(dir)?;
    let policy =
        AccessPolicy::load(&files.source()).map_err(|source| PolicyLoadError::Invalid {
            dir: dir.to_path_buf(),
            source,
        })?;
    // A schema the policy fixes must be one answers can follow: refused here, at load,
    // rather than in every request to the model.
    let data = policy.data();
    let fixed = data
        .models
        .iter()
        .filter_map(|(name, rules)| Some((name.as_str(), rules.response_schema.as_ref()?)))
        .chain(
            data.default_model
                .response_schema
                .as_ref()
                .map(|schema| ("(default_model)", schema)),
        );
    for (model, schema) in fixed {
        let problem = if schema.is_object() {
            jsonschema::validator_for(schema)
                .err()
                .map(|e| e.to_string())
        } else {
            Some("it must be a table (a JSON object)".to_owned())
        };
        if let Some(reason) = problem {
            return Err(PolicyLoadError::ResponseSchema {
                dir: dir.to_path_buf(),
                model: model.to_owned(),
                reason,
            });
        }
    }
    Ok(policy)
}

/// The policy in force and the limit state, shared by every request.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: RwLock<Arc<AccessPolicy>>,
    limiter: Limiter,
}

impl PolicyStore {
    /// Loads the directory; the limits start empty.
    pub fn open(dir: &Path) -> Result<Self, PolicyLoadError> {
        let policy = load_dir(dir)?;
        let data = policy.data();
        let limiter = Limiter::new(data.default_limits, data.department_limits());
        Ok(Self {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(policy)),
            limiter,
        })
    }

    /// The policy in force. Requests keep the one they started with.
    pub fn current(&self) -> Arc<AccessPolicy> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and validates the directory again and, only if it is valid, puts it in force
    /// (limits keep their current levels). On error the old policy stays.
    pub fn reload(&self) -> Result<(), PolicyLoadError> {
        let policy = load_dir(&self.dir)?;
        let data = policy.data();
        self.limiter
            .reconfigure(data.default_limits, data.department_limits());
        let policy = Arc::new(policy);
        match self.current.write() {
            Ok(mut guard) => *guard = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_store::policy::{DATA_FILE, SCHEMA_FILE};

    fn directory(data: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        std::fs::copy(shipped.join(SCHEMA_FILE), dir.path().join(SCHEMA_FILE)).expect("schema");
        std::fs::write(
            dir.path().join("all.cedar"),
            "permit (principal, action, resource);\n",
        )
        .expect("policy");
        std::fs::write(dir.path().join(DATA_FILE), data).expect("data");
        dir
    }

    #[test]
    fn a_fixed_response_schema_must_be_a_valid_schema() {
        let good = "[models.m.response_schema]\ntype = \"object\"\nrequired = [\"a\"]\n";
        let policy = load_dir(directory(good).path()).expect("valid");
        let fixed = policy.data().model("m").response_schema.clone();
        assert_eq!(
            fixed,
            Some(serde_json::json!({"type": "object", "required": ["a"]}))
        );
        let bad = "[models.m.response_schema]\ntype = 7\n";
        let error = load_dir(directory(bad).path()).expect_err("invalid schema");
        assert!(
            matches!(&error, PolicyLoadError::ResponseSchema { model, .. } if model == "m"),
            "{error}"
        );
    }
}
