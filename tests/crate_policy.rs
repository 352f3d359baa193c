//! What a library user's build contains: no CLI crate in the dependency tree, and no
//! dependency whose declared minimum Rust version is above warren's own `rust-version`.
//!
//! Both read cargo's own view (`cargo tree`, `cargo metadata`, offline: the lock file is the
//! truth). The MSRV toolchain itself is not installed on CI; clippy's `incompatible_msrv`
//! lint (on in `cargo clippy`, which reads `rust-version`) covers warren's use of the
//! standard library, and this test covers the dependencies.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

fn cargo(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("cargo prints UTF-8")
}

/// `name version` of every crate a library user's build compiles (normal edges, default
/// features, this platform).
fn library_tree(features: &[&str]) -> BTreeSet<(String, String)> {
    let mut args = vec![
        "tree",
        "--offline",
        "--locked",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ];
    let joined = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", joined.as_str()]);
    }
    cargo(&args)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?.to_string();
            let version = words.next()?.trim_start_matches('v').to_string();
            Some((name, version))
        })
        .collect()
}

fn names(tree: &BTreeSet<(String, String)>) -> BTreeSet<&str> {
    tree.iter().map(|(name, _)| name.as_str()).collect()
}

#[test]
fn a_library_user_compiles_no_cli_crate() {
    let library = library_tree(&[]);
    let crates = names(&library);
    assert!(crates.contains("amiquip"), "the tree was read: {crates:?}");
    for cli_only in ["clap", "clap_complete", "env_logger", "metrics"] {
        assert!(
            !crates.contains(cli_only),
            "{cli_only} is in a library user's tree: {crates:?}"
        );
    }
    let with_cli = library_tree(&["cli"]);
    assert!(
        names(&with_cli).contains("clap"),
        "the cli feature brings the CLI's crates"
    );
    let with_metrics = library_tree(&["metrics"]);
    assert!(names(&with_metrics).contains("metrics"));
    assert!(!names(&with_metrics).contains("clap"));
}

/// `"1.76"` or `"1.76.0"` as a comparable pair (major, minor); patch levels are ignored.
fn minor_version(text: &str) -> (u64, u64) {
    let mut parts = text
        .split('.')
        .map(|p| p.parse::<u64>().expect("a version number"));
    (
        parts.next().expect("major"),
        parts.next().unwrap_or_default(),
    )
}

/// The host's target triple (`cargo tree`'s default platform), from `rustc -vV`.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc).arg("-vV").output().expect("rustc runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

#[test]
fn no_dependency_needs_a_newer_rust_than_the_declared_msrv() {
    // This platform's packages only, as `cargo tree` below: those of other platforms
    // (Windows console crates, say) are never downloaded here, and the check is offline.
    let host = host_triple();
    let metadata: Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--offline",
        "--locked",
        "--format-version",
        "1",
        "--filter-platform",
        &host,
    ]))
    .expect("cargo metadata is JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let rust_version = |name: &str, version: &str| -> Option<String> {
        packages
            .iter()
            .find(|p| p["name"] == name && p["version"] == version)
            .and_then(|p| p["rust_version"].as_str().map(str::to_string))
    };
    let ours = rust_version("warren", env!("CARGO_PKG_VERSION")).expect("warren has rust-version");
    let msrv = minor_version(&ours);

    let mut too_new = BTreeMap::new();
    let mut checked = 0;
    for features in [&[][..], &["metrics"][..]] {
        for (name, version) in library_tree(features) {
            if let Some(needed) = rust_version(&name, &version) {
                checked += 1;
                if minor_version(&needed) > msrv {
                    too_new.insert(format!("{name} {version}"), needed);
                }
            }
        }
    }
    assert!(checked > 10, "only {checked} crates declare a rust-version");
    assert!(
        too_new.is_empty(),
        "dependencies needing a newer Rust than warren's rust-version {ours}: {too_new:?}"
    );
}
