//! `moatctl pki`: a development PKI for moat's mutual TLS. It makes a CA, client certificates
//! that name a person and their department, server certificates for the daemon, and the CRL
//! that withdraws them, all as files in one directory. It is meant for development and trials;
//! production deployments bring their own CA.

mod authority;
mod files;
mod names;
mod revocation;
mod serial;

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Subcommand};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use authority::{CA_CERT, CA_KEY, CertificateAuthority, ClientSubject, Issued, Validity};
use names::{CertName, Department, NameError};
use revocation::{CRL, RECORD, Reason, RevocationRecord, RevokedCertificate};

/// Directory under the PKI directory that holds client certificates and keys.
const CLIENTS: &str = "clients";
/// Days from one CRL to its next update, unless told otherwise.
const CRL_DAYS: u32 = 30;

/// `moatctl pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a self-signed CA in DIR: ca.crt, ca.key (mode 0600), and an empty CRL.
    #[command(
        after_help = "Example:\n  moatctl pki init --dir local/pki --org \"Example Bank\" --days 3650"
    )]
    Init(InitArgs),
    /// Issue a client certificate naming a person and their department.
    #[command(
        after_help = "Example:\n  moatctl pki issue-client --dir local/pki --department \"Risk Analytics\" \\\n    --name alice --email alice@example.org"
    )]
    IssueClient(IssueClientArgs),
    /// Issue the daemon's server certificate for its DNS names and addresses.
    #[command(
        after_help = "Example:\n  moatctl pki issue-server --dir local/pki --dns moat.example.org --dns localhost \\\n    --ip 127.0.0.1"
    )]
    IssueServer(IssueServerArgs),
    /// Revoke a certificate and write a new CRL listing it.
    #[command(
        after_help = "Examples:\n  moatctl pki revoke --dir local/pki --name alice --reason keyCompromise\n  moatctl pki revoke --dir local/pki --cert local/pki/server.crt --reason superseded"
    )]
    Revoke(RevokeArgs),
    /// Write a new CRL without revoking anything, to move its next update forward.
    #[command(after_help = "Example:\n  moatctl pki crl --dir local/pki --crl-days 30")]
    Crl(CrlArgs),
}

/// Arguments of `pki init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory for the CA's files; created if missing.
    #[arg(long)]
    dir: PathBuf,
    /// Organisation (O) of the CA and of every certificate it issues.
    #[arg(long, default_value = "moat dev")]
    org: String,
    /// Days the CA certificate is valid.
    #[arg(long, default_value_t = 3650, value_parser = days())]
    days: u32,
    /// Replace an existing CA. Its revocation record and CRL are reset, and certificates it
    /// issued stop being trusted by whoever trusts the new one.
    #[arg(long)]
    force: bool,
}

/// Arguments of `pki issue-client`.
#[derive(Debug, Args)]
pub struct IssueClientArgs {
    /// Directory holding the CA; the certificate goes to DIR/clients/NAME.crt and .key.
    #[arg(long)]
    dir: PathBuf,
    /// Department of the holder, the certificate's OU: letters, digits, space, '.', '_', '-'.
    #[arg(long)]
    department: String,
    /// Name of the holder, the certificate's CN and file name: letters, digits, '.', '_', '-'.
    #[arg(long)]
    name: String,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365, value_parser = days())]
    days: u32,
    /// E-mail address of the holder, added as an rfc822Name subject alternative name.
    #[arg(long)]
    email: Option<String>,
    /// Start of validity (RFC 3339), instead of five minutes ago; for testing validity windows.
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
    not_before: Option<OffsetDateTime>,
    /// End of validity (RFC 3339), instead of --days from now; for testing expiry. When it is
    /// in the past and --not-before is not given, the certificate starts --days before it.
    #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
    not_after: Option<OffsetDateTime>,
    /// Replace an existing certificate and key of that name.
    #[arg(long)]
    force: bool,
}

/// Arguments of `pki issue-server`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("names").required(true).multiple(true).args(["dns", "ip"])))]
pub struct IssueServerArgs {
    /// Directory holding the CA; the certificate goes to DIR/NAME.crt and DIR/NAME.key.
    #[arg(long)]
    dir: PathBuf,
    /// DNS name the daemon is reached by; repeat for several. The first is the subject CN.
    #[arg(long, value_name = "NAME")]
    dns: Vec<String>,
    /// IP address the daemon is reached by; repeat for several.
    #[arg(long, value_name = "ADDR")]
    ip: Vec<IpAddr>,
    /// File stem of the certificate and key.
    #[arg(long, default_value = "server")]
    name: String,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 825, value_parser = days())]
    days: u32,
    /// Replace an existing certificate and key of that name.
    #[arg(long)]
    force: bool,
}

/// Arguments of `pki revoke`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["name", "cert"])))]
pub struct RevokeArgs {
    /// Directory holding the CA.
    #[arg(long)]
    dir: PathBuf,
    /// Name of a client certificate in DIR/clients.
    #[arg(long)]
    name: Option<String>,
    /// Any certificate file issued by this CA, such as a server certificate.
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Why the certificate is revoked.
    #[arg(long, value_enum, default_value_t = Reason::Unspecified)]
    reason: Reason,
    /// Days until the CRL's next update.
    #[arg(long, default_value_t = CRL_DAYS, value_parser = days())]
    crl_days: u32,
}

/// Arguments of `pki crl`.
#[derive(Debug, Args)]
pub struct CrlArgs {
    /// Directory holding the CA.
    #[arg(long)]
    dir: PathBuf,
    /// Days until the CRL's next update.
    #[arg(long, default_value_t = CRL_DAYS, value_parser = days())]
    crl_days: u32,
}

/// Why a PKI command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("could not read {}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A file or directory could not be written.
    #[error("could not write {}", .path.display())]
    Write { path: PathBuf, source: io::Error },
    /// The command would replace a file and --force was not given.
    #[error("{} already exists; pass --force to replace it", .path.display())]
    AlreadyExists { path: PathBuf },
    /// A private key that group or others may access.
    #[error("{path} is readable by others (mode {mode:04o}); run chmod 600 {path}", path = .path.display())]
    KeyExposed { path: PathBuf, mode: u32 },
    /// The directory holds no CA.
    #[error(
        "no CA in {dir}: {} is missing; create one with `moatctl pki init --dir {dir}`",
        .missing.display(), dir = .dir.display()
    )]
    NoAuthority { dir: PathBuf, missing: PathBuf },
    /// A file that should hold a PEM certificate does not.
    #[error("{} holds no PEM certificate", .path.display())]
    NotPem { path: PathBuf },
    /// A PEM certificate that does not parse.
    #[error("{} is not a valid certificate", .path.display())]
    InvalidCertificate {
        path: PathBuf,
        source: x509_parser::error::X509Error,
    },
    /// The CA certificate parses but cannot serve as an issuer.
    #[error("{} cannot be used as the CA certificate", .path.display())]
    InvalidCaCertificate { path: PathBuf, source: rcgen::Error },
    /// The CA key file is not a usable private key.
    #[error("{} is not a usable private key", .path.display())]
    InvalidKey { path: PathBuf, source: rcgen::Error },
    /// The CA key is not the key of the CA certificate.
    #[error("{} is not the key of {}", .key.display(), .cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    /// The CA certificate names no organisation, which issued certificates copy.
    #[error("{} names no organisation (O) in its subject", .path.display())]
    MissingOrganization { path: PathBuf },
    /// The CA certificate is past its end of validity.
    #[error(
        "the CA certificate {} expired at {}; create a new CA with `moatctl pki init --force`",
        .path.display(), rfc3339(*.not_after)
    )]
    AuthorityExpired {
        path: PathBuf,
        not_after: OffsetDateTime,
    },
    /// A certificate to revoke that another CA issued.
    #[error("{} was not issued by the CA in {}", .path.display(), .dir.display())]
    ForeignCertificate { path: PathBuf, dir: PathBuf },
    /// --not-before is not earlier than the end of validity.
    #[error(
        "the validity window is empty: not-before {} is not earlier than not-after {}",
        rfc3339(*.not_before), rfc3339(*.not_after)
    )]
    EmptyValidity {
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    },
    /// A server certificate needs at least one DNS name or address.
    #[error("a server certificate needs at least one --dns or --ip")]
    NoServerNames,
    /// A name, department, e-mail address or DNS name was refused.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The revocation record does not parse.
    #[error("{} is not a valid revocation record", .path.display())]
    InvalidRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// rcgen refused to make a key, certificate or CRL.
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// Runs `command`, returning the files it wrote in the order written.
pub fn run(command: PkiCommand) -> Result<Vec<PathBuf>, Error> {
    let now = now();
    match command {
        PkiCommand::Init(args) => init(&args, now),
        PkiCommand::IssueClient(args) => issue_client(&args, now),
        PkiCommand::IssueServer(args) => issue_server(&args, now),
        PkiCommand::Revoke(args) => revoke(&args, now),
        PkiCommand::Crl(args) => refresh_crl(&args.dir, args.crl_days, now),
    }
}

fn init(args: &InitArgs, now: OffsetDateTime) -> Result<Vec<PathBuf>, Error> {
    names::check_organization("--org", &args.org)?;
    let cert_path = args.dir.join(CA_CERT);
    let key_path = args.dir.join(CA_KEY);
    files::refuse_overwrite(&[&cert_path, &key_path], args.force)?;
    files::create_dir(&args.dir)?;
    let issued = authority::create(&args.org, Validity::days_from(now, args.days))?;
    let mut written = write_pair(&issued, &cert_path, &key_path)?;
    let ca = CertificateAuthority::load(&args.dir, now)?;
    // A new CA starts with no revocations; a replaced CA's record means nothing to it.
    let mut record = RevocationRecord::default();
    written.extend(write_crl(&ca, &mut record, &args.dir, CRL_DAYS, now)?);
    Ok(written)
}

fn issue_client(args: &IssueClientArgs, now: OffsetDateTime) -> Result<Vec<PathBuf>, Error> {
    let department = Department::parse("--department", &args.department)?;
    let name = CertName::parse("--name", &args.name)?;
    if let Some(email) = &args.email {
        names::check_email(email)?;
    }
    let validity = client_validity(args, now)?;
    let ca = CertificateAuthority::load(&args.dir, now)?;
    let (cert_path, key_path) = client_paths(&args.dir, &name);
    files::refuse_overwrite(&[&cert_path, &key_path], args.force)?;
    files::create_dir(&args.dir.join(CLIENTS))?;
    let subject = ClientSubject {
        department: &department,
        name: &name,
        email: args.email.as_deref(),
    };
    let issued = ca.issue_client(&subject, validity)?;
    write_pair(&issued, &cert_path, &key_path)
}

/// --days from now, unless --not-before or --not-after say otherwise. A --not-after that falls
/// before the default start, without --not-before, makes a window of --days ending there.
fn client_validity(args: &IssueClientArgs, now: OffsetDateTime) -> Result<Validity, Error> {
    let default = Validity::days_from(now, args.days);
    let not_after = args.not_after.unwrap_or(default.not_after());
    let not_before = match args.not_before {
        Some(not_before) => not_before,
        None if not_after <= default.not_before() => {
            not_after - Duration::days(i64::from(args.days))
        }
        None => default.not_before(),
    };
    Validity::new(not_before, not_after)
}

fn issue_server(args: &IssueServerArgs, now: OffsetDateTime) -> Result<Vec<PathBuf>, Error> {
    let name = CertName::parse_server("--name", &args.name)?;
    for dns in &args.dns {
        names::check_dns_name(dns)?;
    }
    let ca = CertificateAuthority::load(&args.dir, now)?;
    let cert_path = args.dir.join(format!("{name}.crt"));
    let key_path = args.dir.join(format!("{name}.key"));
    files::refuse_overwrite(&[&cert_path, &key_path], args.force)?;
    let issued = ca.issue_server(&args.dns, &args.ip, Validity::days_from(now, args.days))?;
    write_pair(&issued, &cert_path, &key_path)
}

fn revoke(args: &RevokeArgs, now: OffsetDateTime) -> Result<Vec<PathBuf>, Error> {
    let cert_path = match &args.cert {
        Some(path) => path.clone(),
        None => {
            let name = CertName::parse("--name", args.name.as_deref().unwrap_or_default())?;
            client_paths(&args.dir, &name).0
        }
    };
    let ca = CertificateAuthority::load(&args.dir, now)?;
    let text = files::read_text(&cert_path)?;
    let pem = authority::read_pem(&cert_path, &text)?;
    let cert = authority::parse_certificate(&cert_path, &pem)?;
    if !ca.is_issuer_of(&cert) {
        return Err(Error::ForeignCertificate {
            path: cert_path,
            dir: args.dir.clone(),
        });
    }
    let record_path = args.dir.join(RECORD);
    let mut record = RevocationRecord::load(&record_path)?;
    record.revoke(RevokedCertificate {
        serial: serial::Serial::from_be_bytes(cert.raw_serial()),
        subject: cert.subject().to_string(),
        revoked_at: now,
        reason: args.reason,
    });
    write_crl(&ca, &mut record, &args.dir, args.crl_days, now)
}

fn refresh_crl(dir: &Path, crl_days: u32, now: OffsetDateTime) -> Result<Vec<PathBuf>, Error> {
    let ca = CertificateAuthority::load(dir, now)?;
    let mut record = RevocationRecord::load(&dir.join(RECORD))?;
    write_crl(&ca, &mut record, dir, crl_days, now)
}

/// Signs the next CRL from `record`, then saves the record before the CRL, so that a CRL
/// number once written is never handed out again.
fn write_crl(
    ca: &CertificateAuthority,
    record: &mut RevocationRecord,
    dir: &Path,
    crl_days: u32,
    now: OffsetDateTime,
) -> Result<Vec<PathBuf>, Error> {
    let next_update = now + Duration::days(i64::from(crl_days));
    let crl = record.next_crl(ca, now, next_update)?;
    let record_path = dir.join(RECORD);
    let crl_path = dir.join(CRL);
    record.save(&record_path)?;
    files::write_atomic(&crl_path, crl.as_bytes(), files::PUBLIC)?;
    Ok(vec![record_path, crl_path])
}

/// Writes the key (0600) first, so a certificate on disk always has its key beside it.
fn write_pair(issued: &Issued, cert_path: &Path, key_path: &Path) -> Result<Vec<PathBuf>, Error> {
    files::write_atomic(key_path, issued.key_pem.as_bytes(), files::PRIVATE)?;
    files::write_atomic(cert_path, issued.cert_pem.as_bytes(), files::PUBLIC)?;
    Ok(vec![cert_path.to_owned(), key_path.to_owned()])
}

fn client_paths(dir: &Path, name: &CertName) -> (PathBuf, PathBuf) {
    let clients = dir.join(CLIENTS);
    (
        clients.join(format!("{name}.crt")),
        clients.join(format!("{name}.key")),
    )
}

/// The current time, whole seconds: certificates and CRLs carry no finer time.
fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - Duration::nanoseconds(i64::from(now.nanosecond()))
}

/// Validity lengths in days: at least one, at most a hundred years.
fn days() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=36_500)
}

fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}
