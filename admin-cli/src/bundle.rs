//! `moatctl keys` and `moatctl bundle`: the ML team's side of model bundles. Packing turns
//! a model directory plus `bundle.toml` into a bundle tar whose manifest lists every file
//! with its size and SHA-256; signing adds `manifest.sig`; inspecting checks both.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use ed25519_dalek::SigningKey;
use moat_core::audit::encoding::hex;
use moat_core::bundle::archive::{BundleWriter, hash_reader, unpack};
use moat_core::bundle::manifest::valid_file_name;
use moat_core::bundle::signature::{key_id, parse_secret_key, public_key_text, secret_key_text};
use moat_core::bundle::{
    Admit, BundleManifest, BundleSignature, GoldenExpectation, MANIFEST_FILE, ReceivedFile,
    SIGNATURE_FILE, TrustedKey, Unpacked, check_files,
};

use crate::audit::bytes_bar;

/// The file in a model directory that says what the bundle is (all of the manifest but
/// `[model]` and `[[files]]`, which packing fills in).
pub const BUNDLE_INFO_FILE: &str = "bundle.toml";
/// The model directory's metadata, which becomes the manifest's `[model]` table.
const METADATA_FILE: &str = "moat-model.json";
/// Where moatd looks for the keys it trusts.
pub const DEFAULT_TRUSTED_KEYS: &str = "/etc/moat/trusted-keys";

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a bundle signing key pair: NAME.key (secret, mode 0600) and NAME.pub.
    ///
    /// Keep NAME.key with the ML team (offline if you can); copy NAME.pub into every
    /// node's trusted keys directory (/etc/moat/trusted-keys/).
    #[command(after_help = "Example:\n  \
        moatctl keys generate --out ml-team --comment 'ML team release key'\n  \
        sudo install -m 0644 ml-team.pub /etc/moat/trusted-keys/")]
    Generate {
        /// Path and base name of the two files (NAME.key, NAME.pub); never overwritten.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
        /// A note kept in the public key file.
        #[arg(long, default_value = "")]
        comment: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Pack a model directory into a bundle tar (unsigned).
    ///
    /// DIR holds model.onnx, tokenizer.json, moat-model.json, any other file the graph needs
    /// (external weights), and bundle.toml: name, version, task, and optionally
    /// classification_ceiling, [sampling], [response_schema] and [[golden]] prompts. Every
    /// regular file but bundle.toml, moat-model.json and hidden files goes into the bundle.
    #[command(after_help = "Example:\n  \
        moatctl bundle pack local/models/smollm2-135m-instruct-exact --info packaging/bundles/smollm2-135m-instruct.toml --out smollm2-1.0.0.tar\n  \
        moatctl bundle pack DIR --out model.tar    (DIR/bundle.toml describes the bundle)")]
    Pack {
        dir: PathBuf,
        /// The bundle tar to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// bundle.toml to use instead of DIR/bundle.toml.
        #[arg(long, value_name = "FILE")]
        info: Option<PathBuf>,
    },
    /// Sign a bundle's manifest with a signing key (the files are checked against the
    /// manifest first). An earlier signature is replaced.
    #[command(after_help = "Example:\n  \
        moatctl bundle sign smollm2-1.0.0.tar --key ml-team.key")]
    Sign {
        bundle: PathBuf,
        /// Secret key file from `moatctl keys generate`.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Write the signed bundle here instead of replacing BUNDLE.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Show a bundle's manifest, check its files and, with trusted keys, its signature.
    #[command(after_help = "Example:\n  \
        moatctl bundle inspect smollm2-1.0.0.tar --trusted-keys /etc/moat/trusted-keys")]
    Inspect {
        /// A bundle tar, or a directory holding manifest.toml, manifest.sig and the files.
        bundle: PathBuf,
        /// Directory of trusted public keys (*.pub) to check the signature against.
        #[arg(long, value_name = "DIR")]
        trusted_keys: Option<PathBuf>,
    },
}

pub fn keys(command: KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::Generate { out, comment } = command;
    // The seed comes from the operating system's generator (rand's thread RNG is seeded by it).
    let secret = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let public = secret.verifying_key();
    let with_ext = |ext: &str| {
        let mut name = out.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    let (secret_path, public_path) = (with_ext(".key"), with_ext(".pub"));
    write_new(&secret_path, secret_key_text(&secret).as_bytes(), 0o600)?;
    write_new(
        &public_path,
        public_key_text(&public, &comment).as_bytes(),
        0o644,
    )?;
    println!(
        "secret key: {} (keep it with the ML team)",
        secret_path.display()
    );
    println!(
        "public key: {} (id {}; copy it into {DEFAULT_TRUSTED_KEYS}/ on every node)",
        public_path.display(),
        key_id(&public)
    );
    Ok(())
}

pub fn run(command: BundleCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        BundleCommand::Pack { dir, out, info } => pack(&dir, &out, info.as_deref()),
        BundleCommand::Sign { bundle, key, out } => sign(&bundle, &key, out.as_deref()),
        BundleCommand::Inspect {
            bundle,
            trusted_keys,
        } => return inspect(&bundle, trusted_keys.as_deref()),
    }
    .map(|()| std::process::ExitCode::SUCCESS)
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it is never overwritten)", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Strips JSON nulls (TOML has none: an absent key means the same).
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(without_nulls).collect())
        }
        other => other,
    }
}

/// The files of a model directory that go into its bundle, sorted by name.
fn bundle_files(dir: &Path, skip: &[&str]) -> anyhow::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Hidden files (build markers, editor state) are never part of a model.
        if skip.contains(&name.as_str()) || name.starts_with('.') {
            continue;
        }
        let meta = fs::symlink_metadata(entry.path())?;
        if !meta.is_file() {
            bail!(
                "{} is not a regular file: a bundle holds regular files only (move it out of {})",
                entry.path().display(),
                dir.display()
            );
        }
        if !valid_file_name(&name) {
            bail!(
                "{name:?} in {} is not a usable bundle file name (letters, digits, '.', '_', '-')",
                dir.display()
            );
        }
        files.push((name, meta.len()));
    }
    files.sort();
    Ok(files)
}

fn pack(dir: &Path, out: &Path, info: Option<&Path>) -> anyhow::Result<()> {
    let info_path = info.map_or_else(|| dir.join(BUNDLE_INFO_FILE), Path::to_path_buf);
    let info_text = fs::read_to_string(&info_path)
        .with_context(|| format!("cannot read {}", info_path.display()))?;
    let mut table: toml::Table = toml::from_str(&info_text)
        .with_context(|| format!("{} is not valid TOML", info_path.display()))?;
    for key in ["model", "files"] {
        if table.contains_key(key) {
            bail!(
                "{} sets `{key}`; packing writes it from the model directory",
                info_path.display()
            );
        }
    }
    table
        .entry("format")
        .or_insert(toml::Value::Integer(i64::from(
            moat_core::bundle::manifest::MANIFEST_FORMAT,
        )));
    let metadata_path = dir.join(METADATA_FILE);
    let metadata: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&metadata_path)
            .with_context(|| format!("cannot read {}", metadata_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", metadata_path.display()))?;
    let model = toml::Value::try_from(without_nulls(metadata))
        .with_context(|| format!("{} cannot be written as TOML", metadata_path.display()))?;
    table.insert("model".into(), model);

    let files = bundle_files(dir, &[BUNDLE_INFO_FILE, METADATA_FILE])?;
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    let bar = bytes_bar("hashing");
    bar.set_length(total);
    let mut lines = Vec::new();
    for (name, _) in &files {
        let path = dir.join(name);
        let file = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let hashed = hash_reader(bar.wrap_read(BufReader::new(file)))
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut line = toml::Table::new();
        line.insert("path".into(), toml::Value::String(name.clone()));
        line.insert("size".into(), toml::Value::Integer(hashed.size as i64));
        line.insert("sha256".into(), toml::Value::String(hex(&hashed.sha256)));
        lines.push(toml::Value::Table(line));
    }
    bar.finish_and_clear();
    table.insert("files".into(), toml::Value::Array(lines));
    let manifest_text = toml::to_string(&table).context("cannot write the manifest as TOML")?;
    let manifest = BundleManifest::parse(manifest_text.as_bytes()).with_context(|| {
        format!(
            "the bundle described by {} is not valid",
            info_path.display()
        )
    })?;

    let bar = bytes_bar("packing");
    bar.set_length(total);
    write_bundle(out, manifest_text.as_bytes(), None, |writer| {
        for (name, size) in &files {
            let file = File::open(dir.join(name))?;
            writer.add(name, *size, bar.wrap_read(BufReader::new(file)))?;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    println!(
        "packed {} ({} files, {} bytes) into {}",
        manifest.label(),
        manifest.files.len(),
        total,
        out.display()
    );
    println!(
        "unsigned: sign it with `moatctl bundle sign {} --key KEY`",
        out.display()
    );
    Ok(())
}

/// Writes a bundle tar next to `out`, then renames it into place (no half-written
/// bundle is ever at `out`).
fn write_bundle(
    out: &Path,
    manifest: &[u8],
    signature: Option<&[u8]>,
    add_files: impl FnOnce(&mut BundleWriter<BufWriter<File>>) -> io::Result<()>,
) -> anyhow::Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let temp = tempfile::NamedTempFile::new_in(parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    let written = (|| -> io::Result<()> {
        let mut writer = BundleWriter::new(
            BufWriter::new(temp.as_file().try_clone()?),
            manifest,
            signature,
        )?;
        add_files(&mut writer)?;
        let mut file = writer.finish()?;
        file.flush()?;
        file.get_ref().sync_all()
    })();
    written.with_context(|| format!("cannot write {}", out.display()))?;
    temp.persist(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// A bundle's tar bytes: the file itself, or a directory packed on the fly.
pub enum Source {
    File(File),
    Packed(tempfile::NamedTempFile),
}

impl Source {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if !path.is_dir() {
            return Ok(Source::File(
                File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
            ));
        }
        let manifest = fs::read(path.join(MANIFEST_FILE))
            .with_context(|| format!("{} holds no {MANIFEST_FILE}", path.display()))?;
        let signature = match fs::read(path.join(SIGNATURE_FILE)) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).context(format!("cannot read {SIGNATURE_FILE}")),
        };
        let files = bundle_files(path, &[MANIFEST_FILE, SIGNATURE_FILE])?;
        let mut temp = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
        {
            let mut writer = BundleWriter::new(
                BufWriter::new(temp.as_file_mut()),
                &manifest,
                signature.as_deref(),
            )?;
            for (name, size) in &files {
                writer.add(name, *size, BufReader::new(File::open(path.join(name))?))?;
            }
            writer.finish()?.flush()?;
        }
        Ok(Source::Packed(temp))
    }

    pub fn file(&self) -> anyhow::Result<File> {
        let file = match self {
            Source::File(file) => file.try_clone()?,
            Source::Packed(temp) => temp.reopen()?,
        };
        Ok(file)
    }
}

/// Reads a bundle (tar or directory) with a progress bar, each file going to the writer
/// `create` opens for it, and returns what it held with every file hashed.
fn read_bundle<W: io::Write>(
    path: &Path,
    message: &'static str,
    create: impl FnMut(&str) -> io::Result<W>,
) -> anyhow::Result<Unpacked> {
    let source = Source::open(path)?;
    let file = source.file()?;
    let bar = bytes_bar(message);
    bar.set_length(file.metadata().map(|m| m.len()).unwrap_or(0));
    let unpacked = unpack(
        bar.wrap_read(BufReader::new(file)),
        |_, _| Ok(Admit::Any),
        create,
    )
    .with_context(|| format!("{} is not a usable bundle", path.display()))?;
    bar.finish_and_clear();
    Ok(unpacked)
}

fn sign(bundle: &Path, key: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    let key_text =
        fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?;
    let secret = parse_secret_key(&key_text).with_context(|| key.display().to_string())?;
    // One pass: the files are hashed as they are copied to a scratch directory, from which
    // the signed bundle is written (the output may be the input).
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let unpacked = read_bundle(bundle, "checking", |name| {
        File::create(scratch.path().join(name)).map(BufWriter::new)
    })?;
    let manifest = BundleManifest::parse(&unpacked.manifest)
        .with_context(|| format!("{}: {MANIFEST_FILE} is not valid", bundle.display()))?;
    check_files(&manifest, &unpacked.files)
        .with_context(|| format!("{}: refusing to sign", bundle.display()))?;
    if unpacked.signature.is_some() {
        eprintln!("note: replacing the bundle's earlier signature");
    }
    let signature = BundleSignature::sign(&unpacked.manifest, &secret).to_toml();
    let out = out.unwrap_or(bundle);
    let bar = bytes_bar("writing");
    bar.set_length(manifest.total_bytes());
    write_bundle(
        out,
        &unpacked.manifest,
        Some(signature.as_bytes()),
        |writer| {
            for file in &manifest.files {
                let reader = BufReader::new(File::open(scratch.path().join(&file.path))?);
                writer.add(&file.path, file.size, bar.wrap_read(reader))?;
            }
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    println!(
        "signed {} with key {} into {}",
        manifest.label(),
        key_id(&secret.verifying_key()),
        out.display()
    );
    Ok(())
}

/// The public keys (`*.pub`) in a trusted keys directory, named after their files.
pub fn load_trusted_keys(dir: &Path) -> anyhow::Result<Vec<TrustedKey>> {
    let mut keys = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "pub") {
            continue;
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        keys.push(TrustedKey::from_file(&name, &text).with_context(|| path.display().to_string())?);
    }
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(keys)
}

fn inspect(bundle: &Path, trusted_keys: Option<&Path>) -> anyhow::Result<std::process::ExitCode> {
    let unpacked = read_bundle(bundle, "hashing", |_| Ok(io::sink()))?;
    let manifest = BundleManifest::parse(&unpacked.manifest)
        .with_context(|| format!("{}: {MANIFEST_FILE} is not valid", bundle.display()))?;
    print_manifest(&manifest, &unpacked.files);
    let mut good = true;
    match check_files(&manifest, &unpacked.files) {
        Ok(()) => println!(
            "files:        all {} match the manifest",
            manifest.files.len()
        ),
        Err(e) => {
            println!("files:        REFUSED: {e}");
            good = false;
        }
    }
    let signature = unpacked
        .signature
        .as_deref()
        .map(BundleSignature::parse)
        .transpose();
    match (signature, trusted_keys) {
        (Ok(None), _) => {
            println!("signature:    none (unsigned)");
            good = false;
        }
        (Err(e), _) => {
            println!("signature:    REFUSED: {e}");
            good = false;
        }
        (Ok(Some(signature)), None) => println!(
            "signature:    by key {} (not checked: pass --trusted-keys DIR)",
            signature.key_id
        ),
        (Ok(Some(signature)), Some(dir)) => {
            let keys = load_trusted_keys(dir)?;
            match signature.verify(&unpacked.manifest, &keys) {
                Ok(key) => println!("signature:    valid, by {} (key {})", key.name, key.id()),
                Err(e) => {
                    println!("signature:    REFUSED: {e}");
                    good = false;
                }
            }
        }
    }
    Ok(if good {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn print_manifest(manifest: &BundleManifest, files: &BTreeMap<String, ReceivedFile>) {
    let model = &manifest.model;
    println!("bundle:       {} ({})", manifest.label(), manifest.task);
    if let Some(description) = &manifest.description {
        println!("description:  {description}");
    }
    println!(
        "model:        {} {}, {} I/O, context {} tokens, EOS {:?}",
        model.architecture,
        model.name,
        model.io_contract,
        model.context_length,
        model.eos_token_ids
    );
    println!(
        "ceiling:      {}",
        manifest
            .classification_ceiling
            .as_deref()
            .unwrap_or("(the policy's)")
    );
    println!(
        "schema:       {}",
        if manifest.response_schema.is_some() {
            "every answer follows the bundle's JSON schema"
        } else {
            "none"
        }
    );
    println!("sampling:     {:?}", manifest.sampling);
    for (i, golden) in manifest.golden.iter().enumerate() {
        let expect = match &golden.expect {
            GoldenExpectation::Exact(text) => format!("exactly {text:?}"),
            GoldenExpectation::Pattern(re) => format!("matching /{re}/"),
            GoldenExpectation::Embeds => "a vector".into(),
        };
        println!("golden {i}:     {:?} -> {expect}", golden.prompt);
    }
    for file in &manifest.files {
        let state = match files.get(&file.path) {
            Some(found) if found.sha256 == file.sha256 && found.size == file.size => "ok",
            Some(_) => "ALTERED",
            None => "MISSING",
        };
        println!(
            "  {:<24} {:>12} bytes  sha256 {}  {state}",
            file.path,
            file.size,
            hex(&file.sha256)
        );
    }
}
