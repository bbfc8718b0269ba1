//! The topic tables people read are kept in step with [`TopicKind::ALL`]:
//! the repository README, `protocol/README.md` (with each topic's
//! direction checked against [`TopicKind::publisher`]) and the module docs
//! of `topic.rs`. A topic added to the code and not to a table, or a table
//! row for a topic that does not exist, fails here.

#![allow(clippy::unwrap_used)] // tests: a panic is a failure report

use std::collections::BTreeSet;

use protocol::topic::Publisher;
use protocol::TopicKind;

/// `json/{birth,metrics}` → `json/birth`, `json/metrics`.
fn expand(leaf: &str) -> Vec<String> {
    match (leaf.find('{'), leaf.find('}')) {
        (Some(a), Some(b)) if a < b => leaf[a + 1..b]
            .split(',')
            .map(|alt| format!("{}{}{}", &leaf[..a], alt.trim(), &leaf[b + 1..]))
            .collect(),
        _ => vec![leaf.to_string()],
    }
}

/// The leaf of every `| `aerekos/v1/<id>/LEAF` |` table row, with the row's
/// other cells.
fn table_rows(doc: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix("| `aerekos/v1/<id>/") else {
            continue;
        };
        let (leaf, cells) = rest.split_once('`').unwrap();
        let cells: Vec<String> = cells
            .split('|')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        for l in expand(leaf) {
            out.push((l, cells.clone()));
        }
    }
    out
}

fn all_leaves() -> BTreeSet<String> {
    TopicKind::ALL
        .iter()
        .map(|k| k.leaf().to_string())
        .collect()
}

fn kind_of(leaf: &str) -> TopicKind {
    *TopicKind::ALL.iter().find(|k| k.leaf() == leaf).unwrap()
}

#[test]
fn the_readme_topic_table_lists_every_topic_once() {
    let rows = table_rows(include_str!("../../README.md"));
    let leaves: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    let set: BTreeSet<String> = leaves.iter().cloned().collect();
    assert_eq!(set.len(), leaves.len(), "a topic listed twice: {leaves:?}");
    assert_eq!(
        set,
        all_leaves(),
        "README.md's topic tree vs TopicKind::ALL"
    );
}

#[test]
fn the_protocol_readme_lists_every_topic_with_its_direction() {
    let rows = table_rows(include_str!("../README.md"));
    let set: BTreeSet<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(set.len(), rows.len(), "a topic listed twice");
    assert_eq!(set, all_leaves(), "protocol/README.md vs TopicKind::ALL");
    for (leaf, cells) in &rows {
        let direction = cells.first().unwrap();
        let from_worker = direction.starts_with("worker");
        let expected = kind_of(leaf).publisher() == Publisher::Worker;
        assert_eq!(from_worker, expected, "{leaf}: {direction}");
    }
}

#[test]
fn the_protocol_readme_lists_the_partitioned_kinds() {
    let leaves: Vec<String> = include_str!("../README.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `aerekos/v1/part/<n>/<id>/"))
        .filter_map(|rest| rest.split_once('`'))
        .flat_map(|(leaf, _)| expand(leaf))
        .collect();
    let expected: Vec<String> = TopicKind::ALL
        .iter()
        .filter(|k| k.partitioned())
        .map(|k| k.leaf().to_string())
        .collect();
    assert_eq!(leaves, expected, "protocol/README.md's partitioned row");
}

#[test]
fn the_topic_module_docs_list_every_topic() {
    let src = include_str!("../src/topic.rs");
    let leaves: BTreeSet<String> = src
        .lines()
        .filter_map(|l| l.strip_prefix("//! aerekos/v1/<worker_id>/"))
        .filter_map(|rest| rest.split_whitespace().next())
        .flat_map(expand)
        .collect();
    assert_eq!(
        leaves,
        all_leaves(),
        "topic.rs module docs vs TopicKind::ALL"
    );
}

#[test]
fn expand_braces() {
    assert_eq!(
        expand("json/{birth,metrics}"),
        ["json/birth", "json/metrics"]
    );
    assert_eq!(expand("cmd"), ["cmd"]);
}
