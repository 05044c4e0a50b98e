//! `moatctl pki` as an operator runs it: the real binary in a temporary directory, its output
//! checked by parsing the certificates and CRLs it writes.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::Oid;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_X509_COMMON_NAME, OID_X509_ORGANIZATION_NAME, OID_X509_ORGANIZATIONAL_UNIT,
};
use x509_parser::pem::{Pem, parse_x509_pem};
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::X509Name;

fn moatctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .args(args)
        .output()
        .expect("moatctl runs")
}

/// Runs a command that must succeed; returns the paths it printed.
fn ok(args: &[&str]) -> Vec<PathBuf> {
    let out = moatctl(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Runs a command that must fail with exit code 1; returns its error message.
fn fails(args: &[&str]) -> String {
    let out = moatctl(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} did not fail with 1");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

/// A temporary directory with a CA in its `pki` subdirectory.
fn with_ca(org: &str) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki").display().to_string();
    ok(&["pki", "init", "--dir", &dir, "--org", org]);
    (tmp, dir)
}

/// `pki issue-client` arguments for `name` in `department`, then `extra`.
fn client<'a>(dir: &'a str, department: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "pki",
        "issue-client",
        "--dir",
        dir,
        "--department",
        department,
        "--name",
        name,
    ];
    args.extend_from_slice(extra);
    args
}

fn pem(path: impl AsRef<Path>) -> Pem {
    let bytes = fs::read(path.as_ref()).expect("read PEM file");
    parse_x509_pem(&bytes).expect("PEM").1
}

fn cert(pem: &Pem) -> X509Certificate<'_> {
    pem.parse_x509().expect("certificate")
}

fn crl(pem: &Pem) -> CertificateRevocationList<'_> {
    x509_parser::parse_x509_crl(&pem.contents).expect("CRL").1
}

fn mode(path: impl AsRef<Path>) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

fn attr(name: &X509Name<'_>, oid: &Oid<'_>) -> String {
    name.iter_by_oid(oid)
        .map(|a| a.as_str().expect("string attribute"))
        .collect::<Vec<_>>()
        .join("|")
}

fn assert_near(actual: OffsetDateTime, expected: OffsetDateTime) {
    assert!(
        (actual - expected).abs() < Duration::minutes(1),
        "{actual} is not close to {expected}"
    );
}

fn crl_serials(crl: &CertificateRevocationList<'_>) -> Vec<Vec<u8>> {
    crl.iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect()
}

#[test]
fn init_makes_a_ca_whose_key_only_its_owner_reads() {
    let (_tmp, dir) = with_ca("Example Bank");
    let ca_pem = pem(format!("{dir}/ca.crt"));
    let ca = cert(&ca_pem);
    assert_eq!(
        ca.subject().to_string(),
        "O=Example Bank, CN=Example Bank CA"
    );
    assert_eq!(ca.issuer(), ca.subject());
    ca.verify_signature(None).expect("self-signed");
    let constraints = ca.basic_constraints().expect("parses").expect("present");
    assert!(constraints.value.ca);
    let usage = ca.key_usage().expect("parses").expect("present").value;
    assert!(usage.key_cert_sign() && usage.crl_sign() && !usage.digital_signature());
    let days = ca.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
    assert!((3649..=3650).contains(&days.whole_days()), "{days}");
    assert_eq!(mode(format!("{dir}/ca.key")), 0o600);
    let empty = pem(format!("{dir}/crl.pem"));
    assert!(crl_serials(&crl(&empty)).is_empty());
}

#[test]
fn init_refuses_to_replace_a_ca_without_force() {
    let (_tmp, dir) = with_ca("moat dev");
    let before = fs::read(format!("{dir}/ca.crt")).expect("ca.crt");
    let error = fails(&["pki", "init", "--dir", &dir]);
    assert!(
        error.contains("already exists") && error.contains("--force"),
        "{error}"
    );
    assert_eq!(fs::read(format!("{dir}/ca.crt")).expect("ca.crt"), before);
    ok(&["pki", "init", "--dir", &dir, "--force"]);
    assert_ne!(fs::read(format!("{dir}/ca.crt")).expect("ca.crt"), before);
}

#[test]
fn client_certificates_name_department_and_holder() {
    let (_tmp, dir) = with_ca("moat dev");
    let written = ok(&client(
        &dir,
        "Risk Analytics",
        "alice",
        &["--email", "alice@example.org"],
    ));
    let cert_path = PathBuf::from(format!("{dir}/clients/alice.crt"));
    let key_path = PathBuf::from(format!("{dir}/clients/alice.key"));
    assert_eq!(written, vec![cert_path.clone(), key_path.clone()]);
    assert_eq!(mode(&key_path), 0o600);

    let ca_pem = pem(format!("{dir}/ca.crt"));
    let ca = cert(&ca_pem);
    let leaf_pem = pem(&cert_path);
    let leaf = cert(&leaf_pem);
    assert_eq!(
        attr(leaf.subject(), &OID_X509_ORGANIZATION_NAME),
        "moat dev"
    );
    assert_eq!(
        attr(leaf.subject(), &OID_X509_ORGANIZATIONAL_UNIT),
        "Risk Analytics"
    );
    assert_eq!(attr(leaf.subject(), &OID_X509_COMMON_NAME), "alice");
    assert_eq!(leaf.issuer(), ca.subject());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA");

    let eku = leaf
        .extended_key_usage()
        .expect("parses")
        .expect("present")
        .value;
    assert!(eku.client_auth && !eku.server_auth && !eku.any && eku.other.is_empty());
    let sans = &leaf
        .subject_alternative_name()
        .expect("parses")
        .expect("present")
        .value;
    assert_eq!(
        sans.general_names,
        vec![GeneralName::RFC822Name("alice@example.org")]
    );
    assert!(
        !leaf
            .basic_constraints()
            .expect("parses")
            .is_some_and(|b| b.value.ca)
    );

    let now = OffsetDateTime::now_utc();
    assert_near(
        leaf.validity().not_before.to_datetime(),
        now - Duration::minutes(5),
    );
    assert_near(
        leaf.validity().not_after.to_datetime(),
        now + Duration::days(365),
    );
    assert!(leaf.raw_serial().len() >= 16);
    assert!(leaf.raw_serial()[0] < 0x80, "serial is negative");

    ok(&client(&dir, "Risk", "bob", &[]));
    let bob_pem = pem(format!("{dir}/clients/bob.crt"));
    assert_ne!(cert(&bob_pem).raw_serial(), leaf.raw_serial());
    let bob = cert(&bob_pem);
    assert!(bob.subject_alternative_name().expect("parses").is_none());
}

#[test]
fn client_certificates_are_not_replaced_without_force() {
    let (_tmp, dir) = with_ca("moat dev");
    let issue = client(&dir, "Risk", "alice", &[]);
    ok(&issue);
    let error = fails(&issue);
    assert!(error.contains("alice.crt already exists"), "{error}");
    ok(&client(&dir, "Risk", "alice", &["--force"]));
}

#[test]
fn names_that_could_escape_the_directory_are_refused() {
    let (tmp, dir) = with_ca("moat dev");
    let error = fails(&client(&dir, "Risk", "../x", &[]));
    assert!(error.contains("--name \"../x\" contains '/'"), "{error}");
    assert!(!tmp.path().join("pki/x.crt").exists());
    assert!(!tmp.path().join("pki/clients").exists());
    let error = fails(&client(&dir, "R&D", "x", &[]));
    assert!(
        error.contains("--department \"R&D\" contains '&'"),
        "{error}"
    );
    let error = fails(&[
        "pki",
        "issue-server",
        "--dir",
        &dir,
        "--dns",
        "x",
        "--name",
        "ca",
    ]);
    assert!(error.contains("reserved"), "{error}");
}

#[test]
fn a_ca_key_others_can_read_is_refused() {
    let (_tmp, dir) = with_ca("moat dev");
    let key = format!("{dir}/ca.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = fails(&client(&dir, "Risk", "alice", &[]));
    assert!(
        error.contains(&format!(
            "{key} is readable by others (mode 0644); run chmod 600 {key}"
        )),
        "{error}"
    );
}

#[test]
fn issuing_without_a_ca_says_how_to_make_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().display().to_string();
    let error = fails(&["pki", "issue-server", "--dir", &dir, "--dns", "localhost"]);
    assert!(
        error.contains("no CA in") && error.contains("pki init"),
        "{error}"
    );
}

#[test]
fn server_certificates_carry_their_names_and_nothing_else() {
    let (_tmp, dir) = with_ca("moat dev");
    let written = ok(&[
        "pki",
        "issue-server",
        "--dir",
        &dir,
        "--dns",
        "moat.example.org",
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
        "--ip",
        "::1",
    ]);
    assert_eq!(
        written,
        vec![
            PathBuf::from(format!("{dir}/server.crt")),
            PathBuf::from(format!("{dir}/server.key"))
        ]
    );
    assert_eq!(mode(format!("{dir}/server.key")), 0o600);
    let text = fs::read_to_string(format!("{dir}/server.crt")).expect("server.crt");
    assert_eq!(
        text.matches("-----BEGIN").count(),
        1,
        "only the leaf: {text}"
    );

    let ca_pem = pem(format!("{dir}/ca.crt"));
    let leaf_pem = pem(format!("{dir}/server.crt"));
    let leaf = cert(&leaf_pem);
    leaf.verify_signature(Some(cert(&ca_pem).public_key()))
        .expect("signed by the CA");
    assert_eq!(
        leaf.subject().to_string(),
        "O=moat dev, CN=moat.example.org"
    );
    let sans = &leaf
        .subject_alternative_name()
        .expect("parses")
        .expect("present")
        .value;
    let mut v6 = [0u8; 16];
    v6[15] = 1;
    assert_eq!(
        sans.general_names,
        vec![
            GeneralName::DNSName("moat.example.org"),
            GeneralName::DNSName("localhost"),
            GeneralName::IPAddress(&[127, 0, 0, 1]),
            GeneralName::IPAddress(&v6),
        ]
    );
    let eku = leaf
        .extended_key_usage()
        .expect("parses")
        .expect("present")
        .value;
    assert!(eku.server_auth && !eku.client_auth);
    let days = leaf.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
    assert!((824..=825).contains(&days.whole_days()), "{days}");

    ok(&[
        "pki",
        "issue-server",
        "--dir",
        &dir,
        "--ip",
        "10.0.0.7",
        "--name",
        "edge",
    ]);
    let edge_pem = pem(format!("{dir}/edge.crt"));
    assert_eq!(
        cert(&edge_pem).subject().to_string(),
        "O=moat dev, CN=10.0.0.7"
    );
}

#[test]
fn revocation_lists_each_serial_once_under_increasing_crl_numbers() {
    let (_tmp, dir) = with_ca("moat dev");
    ok(&client(&dir, "Risk", "alice", &[]));
    ok(&["pki", "issue-server", "--dir", &dir, "--dns", "localhost"]);
    let ca_pem = pem(format!("{dir}/ca.crt"));
    let ca = cert(&ca_pem);
    let alice_pem = pem(format!("{dir}/clients/alice.crt"));
    let alice = cert(&alice_pem).raw_serial().to_vec();
    let server_pem = pem(format!("{dir}/server.crt"));
    let server = cert(&server_pem).raw_serial().to_vec();

    let revoke_alice = [
        "pki",
        "revoke",
        "--dir",
        &dir,
        "--name",
        "alice",
        "--reason",
        "keyCompromise",
        "--crl-days",
        "7",
    ];
    let written = ok(&revoke_alice);
    let expected = [format!("{dir}/revoked.json"), format!("{dir}/crl.pem")].map(PathBuf::from);
    assert_eq!(written, expected);
    let first_pem = pem(format!("{dir}/crl.pem"));
    let first = crl(&first_pem);
    first
        .verify_signature(ca.public_key())
        .expect("signed by the CA");
    assert_eq!(first.issuer(), ca.subject());
    assert_eq!(crl_serials(&first), vec![alice.clone()]);
    let entry = first.iter_revoked_certificates().next().expect("one entry");
    assert_eq!(entry.reason_code().map(|(_, code)| code.0), Some(1));
    let number =
        |crl: &CertificateRevocationList<'_>| crl.crl_number().expect("number").to_string();
    assert_eq!(number(&first), "2", "init wrote CRL 1");
    let now = OffsetDateTime::now_utc();
    assert_near(first.last_update().to_datetime(), now);
    assert_near(
        first.next_update().expect("next").to_datetime(),
        now + Duration::days(7),
    );

    ok(&revoke_alice);
    let second_pem = pem(format!("{dir}/crl.pem"));
    let second = crl(&second_pem);
    assert_eq!(crl_serials(&second), vec![alice.clone()]);
    assert_eq!(number(&second), "3");

    ok(&[
        "pki",
        "revoke",
        "--dir",
        &dir,
        "--cert",
        &format!("{dir}/server.crt"),
    ]);
    ok(&["pki", "crl", "--dir", &dir, "--crl-days", "60"]);
    let refreshed_pem = pem(format!("{dir}/crl.pem"));
    let refreshed = crl(&refreshed_pem);
    assert_eq!(crl_serials(&refreshed), vec![alice, server]);
    assert_eq!(number(&refreshed), "5");
    assert_near(
        refreshed.next_update().expect("next").to_datetime(),
        now + Duration::days(60),
    );
    let record = fs::read_to_string(format!("{dir}/revoked.json")).expect("record");
    assert!(record.contains("\"crl_number\": 5"), "{record}");
}

#[test]
fn certificates_of_another_ca_cannot_be_revoked() {
    let (_tmp, dir) = with_ca("moat dev");
    let (_other_tmp, other) = with_ca("other");
    ok(&["pki", "issue-server", "--dir", &other, "--dns", "localhost"]);
    let foreign = format!("{other}/server.crt");
    let error = fails(&["pki", "revoke", "--dir", &dir, "--cert", &foreign]);
    assert!(error.contains("was not issued by the CA"), "{error}");

    // Same name, new key: certificates of the replaced CA are not its own.
    ok(&["pki", "issue-server", "--dir", &dir, "--dns", "localhost"]);
    ok(&["pki", "init", "--dir", &dir, "--force"]);
    let replaced = format!("{dir}/server.crt");
    let error = fails(&["pki", "revoke", "--dir", &dir, "--cert", &replaced]);
    assert!(error.contains("was not issued by the CA"), "{error}");
}

#[test]
fn explicit_validity_windows_make_expired_and_future_certificates() {
    let (_tmp, dir) = with_ca("moat dev");
    let now = OffsetDateTime::now_utc();
    ok(&client(
        &dir,
        "Risk",
        "expired",
        &["--not-after", "2024-01-31T00:00:00Z"],
    ));
    let expired_pem = pem(format!("{dir}/clients/expired.crt"));
    let expired = cert(&expired_pem);
    assert!(expired.validity().not_after.to_datetime() < now);
    assert!(expired.validity().not_before < expired.validity().not_after);

    ok(&client(
        &dir,
        "Risk",
        "future",
        &[
            "--not-before",
            "2099-01-01T00:00:00Z",
            "--not-after",
            "2099-02-01T00:00:00+01:00",
        ],
    ));
    let future_pem = pem(format!("{dir}/clients/future.crt"));
    let future = cert(&future_pem);
    assert_eq!(future.validity().not_before.to_datetime().year(), 2099);
    assert_eq!(
        future.validity().not_after.to_datetime(),
        OffsetDateTime::new_utc(
            time::Date::from_calendar_date(2099, time::Month::January, 31).expect("date"),
            time::Time::from_hms(23, 0, 0).expect("time"),
        )
    );

    let error = fails(&client(
        &dir,
        "Risk",
        "empty",
        &[
            "--not-before",
            "2030-01-01T00:00:00Z",
            "--not-after",
            "2029-01-01T00:00:00Z",
        ],
    ));
    assert!(error.contains("validity window is empty"), "{error}");
}
