//! `moatctl policy` as an operator runs it: the real binary on policy directories written
//! in a temporary directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");

/// Finance may chat with and complete on models tagged "finance"; everyone lists models.
const FINANCE_POLICIES: &str = r#"
@id("everyone-lists-models")
permit (principal, action == Moat::Action::"list_models", resource);

@id("finance-uses-its-models")
permit (
  principal in Moat::Department::"finance",
  action in [Moat::Action::"chat", Moat::Action::"complete"],
  resource
)
when { resource.tags.contains("finance") };
"#;

const FINANCE_DATA: &str = r#"
[default_department]
classification = "internal"
ceiling = "internal"

[departments.finance]
ceiling = "confidential"

[models.finance-model]
ceiling = "confidential"
tags = ["finance"]

[[content]]
detector = "card_number"
action = "deny"
"#;

/// Cases that all pass against the finance policy.
const PASSING_CASES: &str = r#"
[[case]]
name = "anyone lists the models"
department = "legal"
action = "list_models"
expect = "allow"

[[case]]
name = "finance chats at confidential"
department = "finance"
subject = "alice"
action = "chat"
model = "finance-model"
classification = "confidential"
source_ip = "10.1.2.3"
time = 2025-01-06T10:00:00Z
expect = "allow"

[[case]]
name = "legal has no permit"
department = "legal"
action = "chat"
model = "finance-model"
expect = "deny.no_permit"

[[case]]
name = "secret is above the ceilings"
department = "finance"
action = "complete"
model = "finance-model"
classification = "secret"
expect = "deny.classification"

[[case]]
name = "labels off the scale"
department = "finance"
action = "chat"
model = "finance-model"
classification = "top-secret"
expect = "deny.unknown_classification"

[[case]]
name = "card numbers are refused"
department = "finance"
action = "chat"
model = "finance-model"
prompt = "Please refund 4111 1111 1111 1111 today."
prompt_tokens = 12
max_tokens = 100
expect = "content.card_number"
"#;

fn moatctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .args(args)
        .output()
        .expect("moatctl runs")
}

/// Runs moatctl; asserts its exit status; returns stdout and stderr.
fn expect_status(args: &[&str], code: i32) -> (String, String) {
    let out = moatctl(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// A policy directory in a temporary directory: the shipped schema with `policies` as
/// policies.cedar and `data` as moat-policy.toml.
fn policy_dir(policies: &str, data: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("policies");
    fs::create_dir(&dir).expect("mkdir");
    fs::copy(
        Path::new(SHIPPED).join("schema.cedarschema"),
        dir.join("schema.cedarschema"),
    )
    .expect("copy schema");
    fs::write(dir.join("policies.cedar"), policies).expect("write policies");
    fs::write(dir.join("moat-policy.toml"), data).expect("write data");
    (tmp, dir)
}

fn shipped_copy() -> (tempfile::TempDir, PathBuf) {
    let read = |name: &str| fs::read_to_string(Path::new(SHIPPED).join(name)).expect("shipped");
    policy_dir(&read("policies.cedar"), &read("moat-policy.toml"))
}

fn path(dir: &Path) -> &str {
    dir.to_str().expect("UTF-8 path")
}

/// `policy validate DIR` must fail with 1; returns its stderr.
fn invalid(dir: &Path) -> String {
    let (_, stderr) = expect_status(&["policy", "validate", path(dir)], 1);
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn validate_accepts_the_shipped_policies() {
    let (stdout, _) = expect_status(&["policy", "validate", SHIPPED], 0);
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(stdout.contains("policies.cedar: 1"), "{stdout}");
    assert!(
        stdout.contains("public < internal < confidential < secret"),
        "{stdout}"
    );
    assert!(stdout.contains("content rules: 4"), "{stdout}");
}

#[test]
fn validate_summarises_departments_models_and_every_file() {
    let (_tmp, dir) = policy_dir(FINANCE_POLICIES, FINANCE_DATA);
    fs::write(dir.join("extra.cedar"), "// nothing yet\n").expect("write");
    let (stdout, _) = expect_status(&["policy", "validate", path(&dir)], 0);
    let extra = stdout.find("extra.cedar: 0").expect("extra.cedar listed");
    let main = stdout
        .find("policies.cedar: 2")
        .expect("policies.cedar listed");
    assert!(extra < main, "files in name order:\n{stdout}");
    assert!(
        stdout.contains("departments with their own rules: finance (ceiling confidential)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("models with their own rules: finance-model (ceiling confidential)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("content rules: 1 (card_number: deny)"),
        "{stdout}"
    );
}

#[test]
fn validate_locates_a_syntax_error() {
    let (_tmp, dir) = shipped_copy();
    fs::write(
        dir.join("broken.cedar"),
        "// one policy\npermit (\n  principal,\n  action ==\n);\n",
    )
    .expect("write");
    let stderr = invalid(&dir);
    let file = dir.join("broken.cedar").display().to_string();
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{file}:5:1: "))),
        "{stderr}"
    );
}

#[test]
fn validate_checks_policies_against_the_schema() {
    let (_tmp, dir) = policy_dir(
        "permit (principal, action == Moat::Action::\"chat\", resource)\n\
         when { resource.owner == \"finance\" };\n\
         permit (principal in Moat::Team::\"x\", action, resource);\n",
        "",
    );
    let stderr = invalid(&dir);
    let file = dir.join("policies.cedar").display().to_string();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&file)).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{file}:2:8: ")) && l.contains("owner")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{file}:3:")) && l.contains("Moat::Team")),
        "{stderr}"
    );
}

#[test]
fn validate_refuses_labels_off_the_scale() {
    let (_tmp, dir) = policy_dir(
        FINANCE_POLICIES,
        "[departments.finance]\nceiling = \"top-secret\"\n",
    );
    let stderr = invalid(&dir);
    let file = dir.join("moat-policy.toml").display().to_string();
    assert!(
        stderr.lines().any(|l| l.starts_with(&file)
            && l.contains("departments.finance.ceiling")
            && l.contains("top-secret")),
        "{stderr}"
    );
}

#[test]
fn validate_names_a_missing_file() {
    let (_tmp, dir) = shipped_copy();
    fs::remove_file(dir.join("schema.cedarschema")).expect("rm");
    let stderr = invalid(&dir);
    assert!(stderr.contains("schema.cedarschema is missing"), "{stderr}");
}

#[test]
fn test_passes_when_every_case_does() {
    let (tmp, dir) = policy_dir(FINANCE_POLICIES, FINANCE_DATA);
    let cases = tmp.path().join("cases.toml");
    fs::write(&cases, PASSING_CASES).expect("write");
    let (stdout, _) = expect_status(&["policy", "test", path(&dir), "--cases", path(&cases)], 0);
    assert_eq!(stdout.matches("PASS ").count(), 6, "{stdout}");
    assert!(
        stdout.contains(
            "PASS finance chats at confidential: expected allow, got allow (finance-uses-its-models)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("6 case(s): 6 passed, 0 failed"), "{stdout}");
}

#[test]
fn the_shipped_cases_pass_on_the_shipped_policies() {
    let cases = format!("{SHIPPED}/tests/cases.toml");
    let (stdout, _) = expect_status(&["policy", "test", SHIPPED, "--cases", &cases], 0);
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

#[test]
fn test_fails_when_a_case_does() {
    let (tmp, dir) = policy_dir(FINANCE_POLICIES, FINANCE_DATA);
    let cases = tmp.path().join("cases.toml");
    let wrong = "[[case]]\ndepartment = \"legal\"\naction = \"chat\"\nmodel = \"finance-model\"\n\
                 expect = \"allow\"\n";
    fs::write(&cases, format!("{PASSING_CASES}{wrong}")).expect("write");
    let (stdout, _) = expect_status(&["policy", "test", path(&dir), "--cases", path(&cases)], 1);
    assert!(
        stdout.contains("FAIL case 7: expected allow, got deny.no_permit"),
        "{stdout}"
    );
    assert!(stdout.contains("7 case(s): 6 passed, 1 failed"), "{stdout}");
}

#[test]
fn test_refuses_a_bad_cases_file_with_2() {
    let (tmp, dir) = policy_dir(FINANCE_POLICIES, FINANCE_DATA);
    let cases = tmp.path().join("cases.toml");
    fs::write(
        &cases,
        "[[case]]\ndepartment = \"finance\"\naction = \"chat\"\nmodel = \"m\"\n\
         expect = \"allow\"\nclassifcation = \"secret\"\n",
    )
    .expect("write");
    let args = ["policy", "test", path(&dir), "--cases", path(&cases)];
    let (_, stderr) = expect_status(&args, 2);
    assert!(stderr.contains("classifcation"), "{stderr}");
    fs::write(
        &cases,
        "[[case]]\ndepartment = \"finance\"\naction = \"chat\"\nexpect = \"allow\"\n",
    )
    .expect("write");
    let (_, stderr) = expect_status(&args, 2);
    assert!(
        stderr.contains("case 1 (case 1): chat needs a model"),
        "{stderr}"
    );
    let missing = tmp.path().join("absent.toml");
    let (_, stderr) = expect_status(
        &["policy", "test", path(&dir), "--cases", path(&missing)],
        2,
    );
    assert!(stderr.contains("absent.toml"), "{stderr}");
}
