//! The shape of the crate, checked: each top-level module imports only modules of lower layers
//! (and itself), and front ends only the service layer and the model. A `use` that runs the
//! wrong way fails `cargo test` with the file, the import and the rule. ARCHITECTURE.md draws
//! the same layers.
#![cfg(test)]

use std::{collections::BTreeMap, fs, path::Path};

/// Layers, lowest first. A module may import its own layer's module and any lower layer's,
/// except where `FRONT_ENDS` narrows it.
const LAYERS: &[(&str, &[&str])] = &[
    ("the vocabulary", &["model"]),
    ("kernel handles, the OVSDB client", &["sys", "ovsdb"]),
    ("the collector", &["collect"]),
    ("resolve", &["resolve"]),
    ("plan", &["plan"]),
    ("apply and observe", &["apply", "observe"]),
    ("OVS mode", &["ovs"]),
    ("the service layer", &["service"]),
    ("the fleet (etcd)", &["fleet"]),
    ("the daemon", &["daemon"]),
    ("the metrics endpoint", &["metrics"]),
    ("the command line", &["cli"]),
];

/// Front ends reach the rest only through the service layer (which re-exports the types its
/// operations take and return), the model, and the front ends below them.
/// The metrics endpoint reads what the service's status, the daemon's state and the collector's
/// counts say; it changes nothing. The daemon runs the fleet's mirrors of its node: it watches
/// etcd through `fleet`.
const FRONT_ENDS: &[(&str, &[&str])] = &[
    ("fleet", &["service", "model"]),
    ("daemon", &["service", "model", "fleet"]),
    ("metrics", &["service", "model", "daemon", "collect"]),
    ("cli", &["service", "model", "daemon", "collect", "metrics", "fleet"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, modules)| modules.contains(&module))
}

/// The top-level modules a file's non-test code names through `crate::` (and `super::` from a
/// module's own mod.rs, which is the crate root).
fn imports(text: &str, is_mod_rs: bool) -> Vec<String> {
    // Tests sit at the end of each file; they may reach anywhere.
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code: String =
        code.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let mut found = Vec::new();
    let roots: &[&str] = if is_mod_rs { &["crate::", "super::"] } else { &["crate::"] };
    for root in roots {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(root) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + root.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                found.extend(group_heads(group));
            } else {
                found.push(ident(rest));
            }
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// The first segment of each item of a `{ a::b, c::{d, e} }` group (`group` starts after `{`).
fn group_heads(group: &str) -> Vec<String> {
    let (mut depth, mut heads, mut at_item) = (0_usize, Vec::new(), true);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_item = true,
            c if at_item && !c.is_whitespace() => {
                heads.push(ident(&group[i..]));
                at_item = false;
            }
            _ => {}
        }
    }
    heads
}

/// Every violation, as "file: imports X (why)"; and the module graph found.
fn check(src: &Path) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let mut violations = Vec::new();
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut files = Vec::new();
    collect_files(src, &mut files);
    for file in files {
        let relative = file.strip_prefix(src).unwrap_or(&file).to_string_lossy().into_owned();
        let module = relative.split(['/', '.']).next().unwrap_or_default().to_owned();
        if module == "lib" || module == "main" || module == "layers" {
            continue;
        }
        let Some(layer) = layer_of(&module) else {
            violations.push(format!("{relative}: module {module} has no layer in layers.rs"));
            continue;
        };
        let text = fs::read_to_string(&file).unwrap_or_default();
        for imported in imports(&text, relative.ends_with("/mod.rs")) {
            if imported == module || imported == "vmsniff_ebpf" {
                continue;
            }
            let entry = graph.entry(module.clone()).or_default();
            if !entry.contains(&imported) {
                entry.push(imported.clone());
            }
            let allowed = match FRONT_ENDS.iter().find(|(front, _)| *front == module) {
                Some((_, allowed)) => allowed.contains(&imported.as_str()),
                None => layer_of(&imported).is_some_and(|l| l < layer),
            };
            if !allowed {
                let why = match FRONT_ENDS.iter().find(|(front, _)| *front == module) {
                    Some((_, allowed)) => format!("a front end uses only {}", allowed.join(", ")),
                    None => format!(
                        "{module} is in layer {:?}, {imported} in {:?}: imports run downward only",
                        LAYERS[layer].0,
                        layer_of(&imported).map_or("none", |l| LAYERS[l].0)
                    ),
                };
                violations.push(format!("{relative}: imports {imported} ({why})"));
            }
        }
    }
    (violations, graph)
}

fn collect_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (violations, graph) = check(&src);
    for (layer, (name, modules)) in LAYERS.iter().enumerate() {
        for module in *modules {
            let mut uses = graph.get(*module).cloned().unwrap_or_default();
            uses.sort();
            println!("{layer} {name:<48} {module:<8} -> {}", uses.join(" "));
        }
    }
    assert!(violations.is_empty(), "imports that run the wrong way:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_groups_nested_paths_and_super() {
    let text = "use crate::{\n    apply::x,\n    model::{a, b::{c}},\n};\nfn f() { crate::ovs::g(); notcrate::plan::h(); }\n// crate::cli in a comment\n#[cfg(test)]\nmod tests { use crate::daemon::x; }";
    assert_eq!(imports(text, false), ["apply", "model", "ovs"]);
    assert_eq!(imports("use super::{plan::x, sys};", true), ["plan", "sys"]);
    assert!(imports("use super::x;", false).is_empty());
}
