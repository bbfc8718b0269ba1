//! fuzz/ and fuzz/seed-corpus/ are cargo workspaces of their own (libFuzzer
//! and sanitizer flags, fuzz/README.md), so they do not inherit the root's
//! `[workspace.lints]`: each carries a copy, which must stay equal to the
//! root's, and their packages must use it (`[lints] workspace = true`).

use std::path::Path;

/// `manifest` (relative to the repository root), parsed.
fn manifest(manifest: &str) -> toml::Table {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(manifest);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `[workspace.lints]` table of `manifest`.
fn workspace_lints(manifest_path: &str) -> toml::Value {
    manifest(manifest_path)
        .get("workspace")
        .and_then(|w| w.get("lints"))
        .cloned()
        .unwrap_or_else(|| panic!("{manifest_path} has no [workspace.lints]"))
}

#[test]
fn fuzz_workspaces_lint_like_the_root() {
    let root = workspace_lints("Cargo.toml");
    for group in ["rust", "clippy"] {
        assert!(
            root.get(group)
                .and_then(toml::Value::as_table)
                .is_some_and(|t| !t.is_empty()),
            "the root Cargo.toml has no [workspace.lints.{group}]"
        );
    }
    for m in ["fuzz/Cargo.toml", "fuzz/seed-corpus/Cargo.toml"] {
        assert_eq!(
            workspace_lints(m),
            root,
            "{m}: [workspace.lints] differs from the root Cargo.toml's"
        );
        assert_eq!(
            manifest(m).get("lints").and_then(|l| l.get("workspace")),
            Some(&toml::Value::Boolean(true)),
            "{m}: its package does not use [lints] workspace = true"
        );
    }
}
