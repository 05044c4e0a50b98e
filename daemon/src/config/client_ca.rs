//! `[[tls.client_ca]]`: each department CA, bound to the departments it may vouch for.
//!
//! A CA that any department brings could otherwise issue a certificate naming another
//! department and be served as that department. So every CA names the departments its
//! certificates may claim, or says `"*"` explicitly (a single organisation-wide CA). The
//! old form, a bare list of files, is refused with a message that shows the new one.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// One department CA and the departments its certificates may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCa {
    /// PEM file with the CA certificate(s).
    pub file: PathBuf,
    pub departments: DepartmentScope,
}

/// Which departments a CA may vouch for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DepartmentScope {
    /// `departments = "*"`: every department (one CA for the whole organisation).
    Any,
    /// `departments = ["finance", ...]`: these and no other.
    Only(BTreeSet<String>),
}

impl DepartmentScope {
    pub fn allows(&self, department: &str) -> bool {
        match self {
            DepartmentScope::Any => true,
            DepartmentScope::Only(names) => names.contains(department),
        }
    }
}

impl fmt::Display for DepartmentScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DepartmentScope::Any => f.write_str("\"*\""),
            DepartmentScope::Only(names) => write!(f, "{names:?}"),
        }
    }
}

/// The message for the old `client_ca = ["file.crt"]` form.
fn old_form_refused(file: &str) -> String {
    format!(
        "a list of CA files is no longer accepted: each CA must name the departments it may \
         vouch for, or any department's CA could speak for every other. Write, for each CA:\n\
         \n[[tls.client_ca]]\nfile = {file:?}\ndepartments = [\"finance\"]   \
         # or departments = \"*\" for one organisation-wide CA\n\n\
         (in TOML, [[tls.client_ca]] tables come after the other keys of [tls])"
    )
}

impl<'de> Deserialize<'de> for ClientCa {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            file: PathBuf,
            departments: DepartmentScope,
        }

        struct ClientCaVisitor;
        impl<'de> Visitor<'de> for ClientCaVisitor {
            type Value = ClientCa;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table with `file` and `departments`")
            }

            fn visit_str<E: de::Error>(self, file: &str) -> Result<ClientCa, E> {
                Err(E::custom(old_form_refused(file)))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ClientCa, A::Error> {
                let fields = Fields::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ClientCa {
                    file: fields.file,
                    departments: fields.departments,
                })
            }
        }

        deserializer.deserialize_any(ClientCaVisitor)
    }
}

impl<'de> Deserialize<'de> for DepartmentScope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScopeVisitor;
        impl<'de> Visitor<'de> for ScopeVisitor {
            type Value = DepartmentScope;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of department names, or \"*\" for every department")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<DepartmentScope, E> {
                if value == "*" {
                    Ok(DepartmentScope::Any)
                } else {
                    Err(E::custom(format!(
                        "departments = {value:?}: write a list ([{value:?}]), or \"*\" for \
                         every department"
                    )))
                }
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DepartmentScope, A::Error> {
                let mut names = BTreeSet::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if name == "*" {
                        // "*" among names would read as a department called "*".
                        return Err(de::Error::custom(
                            "departments: \"*\" stands alone (departments = \"*\"), never in a list",
                        ));
                    }
                    names.insert(name);
                }
                Ok(DepartmentScope::Only(names))
            }
        }

        deserializer.deserialize_any(ScopeVisitor)
    }
}

impl ClientCa {
    /// Problems with this entry (`index` counts from 1, as an admin reads the file).
    pub(super) fn problems(&self, index: usize, problems: &mut Vec<String>) {
        let field = format!("tls.client_ca[{index}]");
        super::check_file(problems, &format!("{field}.file"), &self.file);
        if let DepartmentScope::Only(names) = &self.departments {
            if names.is_empty() {
                problems.push(format!(
                    "{field}.departments is empty: name the departments this CA may vouch for, \
                     or write \"*\" for every department"
                ));
            }
            for name in names {
                if name.trim() != name || name.is_empty() || name.chars().any(char::is_control) {
                    problems.push(format!(
                        "{field}.departments: {name:?} is not a usable name"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Tls {
        client_ca: Vec<ClientCa>,
    }

    fn parse(text: &str) -> Result<Tls, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn each_ca_names_its_departments_or_every_department() {
        let tls = parse(
            "[[client_ca]]\nfile = \"finance.crt\"\ndepartments = [\"finance\"]\n\
             [[client_ca]]\nfile = \"org.crt\"\ndepartments = \"*\"\n",
        )
        .expect("parses");
        assert_eq!(tls.client_ca[0].file, PathBuf::from("finance.crt"));
        assert!(tls.client_ca[0].departments.allows("finance"));
        assert!(!tls.client_ca[0].departments.allows("research"));
        assert_eq!(tls.client_ca[1].departments, DepartmentScope::Any);
        let inline = parse("client_ca = [{ file = \"a.crt\", departments = [\"legal\"] }]\n")
            .expect("inline tables parse");
        assert!(inline.client_ca[0].departments.allows("legal"));
    }

    #[test]
    fn the_old_list_of_files_is_refused_with_the_new_form() {
        let error = parse("client_ca = [\"pki/ca.crt\"]\n").expect_err("refused");
        assert!(error.contains("[[tls.client_ca]]"), "{error}");
        assert!(error.contains("file = \"pki/ca.crt\""), "{error}");
        assert!(error.contains("departments"), "{error}");
    }

    #[test]
    fn a_scope_is_never_guessed() {
        for text in [
            "[[client_ca]]\nfile = \"a.crt\"\n",
            "[[client_ca]]\nfile = \"a.crt\"\ndepartments = \"finance\"\n",
            "[[client_ca]]\nfile = \"a.crt\"\ndepartments = [\"*\", \"finance\"]\n",
            "[[client_ca]]\nfile = \"a.crt\"\ndepartments = [\"x\"]\nspeaks_for = \"*\"\n",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
