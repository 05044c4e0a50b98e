//! Certificates, the mTLS client and a permissive policy for benchmarks that talk to moatd.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

/// A CA, a server certificate for 127.0.0.1 and a client certificate (OU `bench`), with
/// the server's files written to `dir` as ca.crt, server.crt and server.key.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub client_pem: String,
    pub client_key_pem: String,
}

/// An HTTPS agent that trusts the bench CA and presents the client certificate.
pub fn client(pki: &Pki) -> ureq::Agent {
    use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
    let ca = Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA PEM");
    let cert = Certificate::from_pem(pki.client_pem.as_bytes()).expect("client PEM");
    let key = PrivateKey::from_pem(pki.client_key_pem.as_bytes()).expect("key PEM");
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
        .client_cert(Some(ClientCert::new_with_certs(&[cert], key)))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

pub fn make_pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usage, ou: Option<&str>| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("names");
        params.extended_key_usages = vec![usage];
        if let Some(ou) = ou {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
            params.distinguished_name.push(DnType::CommonName, "bench");
        }
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(
        vec!["127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        None,
    );
    let (client_pem, client_key_pem) = leaf(
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
        Some("bench"),
    );
    let write =
        |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
    write("ca.crt", &ca_cert.pem());
    write("server.crt", &server_pem);
    write("server.key", &server_key);
    Pki {
        ca_pem: ca_cert.pem(),
        client_pem,
        client_key_pem,
        dir,
    }
}

/// The shipped schema and data rules with one policy permitting everything: the bench
/// measures the serving plane with its policy gate, not a refusal.
pub fn write_permissive_policy(dir: &Path) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::create_dir_all(dir).expect("policy dir");
    for file in ["schema.cedarschema", "moat-policy.toml"] {
        std::fs::copy(shipped.join(file), dir.join(file)).expect("copy policy file");
    }
    std::fs::write(
        dir.join("bench.cedar"),
        "permit (principal, action, resource);\n",
    )
    .expect("write policy");
}
