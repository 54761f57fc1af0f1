//! docs/asyncapi.yaml against the wire module: its channels are the topics `wire` builds,
//! its payload fields the keys the payload types serialize, its enums the types' values.
//! Read line by line (the document's shape is fixed: two-space indents, one key a line),
//! so the workspace needs no YAML parser.

use fhecam_proto::wire::{self, Availability, CockpitResult, DeadLetter, Leaf, RefusalCode};
use fhecam_proto::wire::{Snapshot, Status};
use std::collections::BTreeSet;

fn doc() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/asyncapi.yaml");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

type Lines = [String];

/// The lines nested under line `at` (indented deeper), as indices.
fn block(lines: &Lines, at: usize) -> std::ops::Range<usize> {
    let n = indent(&lines[at]);
    let end = lines[at + 1..]
        .iter()
        .position(|l| !l.trim().is_empty() && indent(l) <= n)
        .map_or(lines.len(), |p| at + 1 + p);
    at + 1..end
}

/// The lines of `range` directly nested (the least indented), as indices.
fn direct(lines: &Lines, range: std::ops::Range<usize>) -> Vec<usize> {
    let blank = |i: &usize| lines[*i].trim().is_empty();
    let n = range
        .clone()
        .filter(|i| !blank(i))
        .map(|i| indent(&lines[i]))
        .min()
        .unwrap();
    range
        .filter(|i| !blank(i) && indent(&lines[*i]) == n)
        .collect()
}

fn key_of(l: &str) -> String {
    l.trim().split(':').next().unwrap().to_string()
}

/// The line `key:` directly under line `at`.
fn child(lines: &Lines, at: usize, key: &str) -> usize {
    direct(lines, block(lines, at))
        .into_iter()
        .find(|&i| key_of(&lines[i]) == key)
        .unwrap_or_else(|| panic!("no {key}: under {:?}", lines[at]))
}

/// The keys directly under line `at`.
fn keys(lines: &Lines, at: usize) -> BTreeSet<String> {
    direct(lines, block(lines, at))
        .into_iter()
        .map(|i| key_of(&lines[i]))
        .collect()
}

/// The items of the first `<key>: [a, b]` under line `at`.
fn list(lines: &Lines, at: usize, key: &str) -> BTreeSet<String> {
    let tag = format!("{key}: [");
    let l = block(lines, at)
        .map(|i| &lines[i])
        .find(|l| l.contains(&tag))
        .unwrap_or_else(|| panic!("no {tag} under {:?}", lines[at]));
    let items = l.split(&tag).nth(1).unwrap().split(']').next().unwrap();
    items.split(',').map(|v| v.trim().to_string()).collect()
}

fn top(lines: &Lines, key: &str) -> usize {
    lines
        .iter()
        .position(|l| l == &format!("{key}:"))
        .unwrap_or_else(|| panic!("no top-level {key}:"))
}

/// The `payload` line of message `name`.
fn payload(lines: &Lines, name: &str) -> usize {
    let messages = child(lines, top(lines, "components"), "messages");
    child(lines, child(lines, messages, name), "payload")
}

fn json_keys<T: serde::Serialize>(v: &T) -> BTreeSet<String> {
    match serde_json::to_value(v).unwrap() {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

/// The payload's `properties` keys, checked against its `required`.
fn payload_properties(lines: &Lines, name: &str) -> BTreeSet<String> {
    let p = payload(lines, name);
    let props = keys(lines, child(lines, p, "properties"));
    let required = list(lines, p, "required");
    assert!(
        required.is_subset(&props),
        "{name}: {required:?} not all in {props:?}"
    );
    props
}

#[test]
fn channels_are_the_wire_topics() {
    let lines = doc();
    let channels = keys(&lines, top(&lines, "channels"));
    let (p, d, c) = (wire::DEFAULT_EDGE_PREFIX, "{device_id}", "{camera_id}");
    let mut ours: BTreeSet<String> = Leaf::ALL
        .into_iter()
        .map(|l| wire::camera_topic(p, d, c, l))
        .collect();
    ours.extend(wire::deploy_topics(p, d));
    ours.insert(wire::cockpit_topic(wire::DEFAULT_COCKPIT_PREFIX, d, c));
    ours.insert(wire::DEFAULT_DEAD_LETTER_TOPIC.into());
    assert_eq!(channels, ours);
}

#[test]
fn payload_fields_are_the_wire_types() {
    let lines = doc();
    let status = Status {
        counters: Snapshot {
            last_inference_unix_ms: Some(1),
            last_refusal: Some("r".into()),
            ..Snapshot::default()
        },
        model_id: "m".into(),
        model_name: "n".into(),
        model_version: 1,
        input_mode: "encrypted".into(),
        sent_unix_ms: 1,
    };
    assert_eq!(payload_properties(&lines, "Stats"), json_keys(&status));
    let result = CockpitResult {
        device_id: "d".into(),
        camera_id: "c".into(),
        model_id: "m".into(),
        model_version: 1,
        epoch: 1,
        sequence: 1,
        label: 0,
        frame_timestamp_ms: 1,
        frame_time: "t".into(),
        decrypt_ms: 1.0,
        logits: Some(vec![1]),
    };
    assert_eq!(
        payload_properties(&lines, "CockpitResult"),
        json_keys(&result)
    );
    let dead = DeadLetter {
        code: RefusalCode::Internal,
        reason: "r".into(),
        topic: "t".into(),
        payload_bytes: 1,
        time: "t".into(),
    };
    assert_eq!(payload_properties(&lines, "DeadLetter"), json_keys(&dead));
}

#[test]
fn enums_are_the_wire_values() {
    let lines = doc();
    let props = child(&lines, payload(&lines, "DeadLetter"), "properties");
    let code = child(&lines, props, "code");
    let codes: BTreeSet<String> = RefusalCode::ALL
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(list(&lines, code, "enum"), codes);
    let channels = top(&lines, "channels");
    let availability = wire::camera_topic(
        wire::DEFAULT_EDGE_PREFIX,
        "{device_id}",
        "{camera_id}",
        Leaf::Availability,
    );
    let at = child(&lines, channels, &availability);
    let words: BTreeSet<String> = Availability::ALL
        .iter()
        .map(|a| a.as_str().to_string())
        .collect();
    assert_eq!(list(&lines, at, "enum"), words);
}
