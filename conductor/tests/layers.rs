//! The conductor's modules form layers: no import cycle between them
//! (ARCHITECTURE.md, "Conductor layers"). Reads the sources: every
//! `crate::<module>` a module's code names (comments and `#[cfg(test)]`
//! parts left out), and in `http/` the sibling modules it names through
//! `super::`; the server module (`http/mod.rs`) depends on the children it
//! names. A cycle fails with the modules on it.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn code_of(path: &Path) -> String {
    let src = std::fs::read_to_string(path).unwrap();
    let src = match src.find("#[cfg(test)]") {
        Some(i) => &src[..i],
        None => &src[..],
    };
    src.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers following `prefix` in `code`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut modules = BTreeSet::new();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "rs") {
            modules.insert(p.file_stem().unwrap().to_string_lossy().into_owned());
        } else if p.is_dir() {
            modules.insert(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    let http_children: BTreeSet<String> = std::fs::read_dir(src.join("http"))
        .unwrap()
        .flatten()
        .map(|e| e.path().file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "mod")
        .collect();
    let mut add = |node: String, path: &Path| {
        let code = code_of(path);
        let deps = g.entry(node.clone()).or_default();
        for m in names_after(&code, "crate::") {
            if modules.contains(&m) {
                deps.insert(m);
            }
        }
        if node.starts_with("http") {
            for m in names_after(&code, "super::") {
                deps.insert(if http_children.contains(&m) {
                    format!("http/{m}")
                } else {
                    "http".into()
                });
            }
            if node == "http" {
                for c in &http_children {
                    if code.contains(&format!("{c}::")) {
                        deps.insert(format!("http/{c}"));
                    }
                }
            }
        }
        deps.remove(&node);
    };
    for m in &modules {
        if m == "lib" || m == "main" || m == "http" {
            continue;
        }
        let file = src.join(format!("{m}.rs"));
        if file.is_file() {
            add(m.clone(), &file);
        }
        let dir = src.join(m);
        if dir.is_dir() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                add(m.clone(), &e.path());
            }
        }
    }
    for e in std::fs::read_dir(src.join("http")).unwrap().flatten() {
        let stem = e.path().file_stem().unwrap().to_string_lossy().into_owned();
        let node = if stem == "mod" {
            "http".to_string()
        } else {
            format!("http/{stem}")
        };
        add(node, &e.path());
    }
    // `crate::http` from outside means the server module.
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(g, n, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_conductor_modules_have_no_import_cycle() {
    let g = graph();
    assert!(g.len() > 20, "modules found: {:?}", g.keys());
    assert!(g["ingest"].contains("state"), "the reader sees imports");
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&g).unwrap().len(), 4);
    g.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}
