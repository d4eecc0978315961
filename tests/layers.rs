//! The layering ARCHITECTURE.md states, checked against the imports of
//! every file under `src/`: a module imports only from its own row or the
//! rows below it, and no two top-level modules import each other, directly
//! or through others. A new module must be given a row.
//!
//! The imports are read from the source text: every `crate::…`, `super::…`
//! and `self::…` path (in `use` trees and inline), resolved to the longest
//! module file it names. Unit-test modules (`#[cfg(test)] mod …` to the end
//! of the file) are left out: a test may build its fixtures from anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside the crate: `["matching", "score"]`.
type Module = Vec<String>;

/// Every module file under `src/` by its module path (`lib.rs` is `[]`).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let Ok(relative) = path.strip_prefix(src) else {
                continue;
            };
            let mut module: Module = relative
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|l| l == "mod") {
                module.pop();
            }
            if module == ["lib"] {
                module.clear();
            }
            if module == ["main"] {
                // The binary: its own crate root, at the top of everything.
                continue;
            }
            out.insert(module, path);
        }
    }
    out
}

/// The source without comments and without its unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        // A trailing comment; `//` inside a string (a URL) is rare in paths
        // that follow it on the same line.
        let line = match line.find(" // ") {
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        out.push(format!("{prefix}{tree}"));
        return;
    };
    let head = &tree[..open];
    let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
    let body = &tree[open + 1..close];
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand(&body[start..i], &format!("{prefix}{head}"), out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !body[start..].trim().is_empty() {
        expand(&body[start..], &format!("{prefix}{head}"), out);
    }
}

/// Every path the code names from the crate root or relative to `module`,
/// as absolute module paths (not yet resolved to a file).
fn paths(code: &str, module: &Module) -> Vec<Vec<String>> {
    // The module `super` and `self` are relative to: a file's own module.
    let here: Module = module.clone();
    let parent: Module = module[..module.len().saturating_sub(1)].to_vec();
    let absolute = |path: &str| -> Option<Vec<String>> {
        let parts: Vec<String> = path
            .split("::")
            .map(|p| p.split(" as ").next().unwrap_or("").trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        let (base, rest) = match parts.first().map(String::as_str) {
            Some("crate") => (Vec::new(), &parts[1..]),
            Some("super") => {
                let mut base = parent.clone();
                let mut rest = &parts[1..];
                while rest.first().is_some_and(|p| p == "super") {
                    base.pop();
                    rest = &rest[1..];
                }
                (base, rest)
            }
            Some("self") => (here.clone(), &parts[1..]),
            _ => return None,
        };
        Some(base.into_iter().chain(rest.iter().cloned()).collect())
    };
    let mut out = Vec::new();
    // `use` trees, which may span lines.
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        let tree: String = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        let mut expanded = Vec::new();
        expand(&tree, "", &mut expanded);
        out.extend(expanded.iter().filter_map(|p| absolute(p)));
    }
    // Inline paths: `crate::a::b`, `super::a`.
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(start) {
            let before = rest[..i].chars().last();
            let tail = &rest[i..];
            let len = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                if let Some(p) = absolute(tail[..len].trim_end_matches(':')) {
                    out.push(p);
                }
            }
            rest = &rest[i + start.len()..];
        }
    }
    out
}

/// The module a path lands in: the longest module-file prefix of it.
/// Items of the crate root are the error module's (`crate::Result`,
/// `crate::Error`) or the root's own helpers.
fn resolve(path: &[String], modules: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    if path.len() == 1 && (path[0] == "Result" || path[0] == "Error") {
        return Some(vec!["error".to_string()]);
    }
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains_key(m))
}

/// The rows of the "Layers" section of ARCHITECTURE.md, top first: each a
/// numbered line of backquoted top-level modules (`bench/`, `stage.rs`).
fn layers(architecture: &str) -> Vec<Vec<String>> {
    let section = architecture
        .split("\n## ")
        .find(|s| s.starts_with("Layers"))
        .expect("ARCHITECTURE.md has a \"## Layers\" section");
    section
        .lines()
        .filter(|l| {
            l.split_once(". ")
                .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
        .map(|l| {
            l.split('`')
                .skip(1)
                .step_by(2)
                .map(|name| {
                    name.trim_end_matches('/')
                        .trim_end_matches(".rs")
                        .to_string()
                })
                .collect()
        })
        .collect()
}

struct Graph {
    /// Every import between files: (from, to).
    edges: BTreeSet<(Module, Module)>,
    /// Where each import was seen, for the message.
    files: BTreeMap<Module, PathBuf>,
}

fn graph() -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = modules(&root.join("src"));
    let mut edges = BTreeSet::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for p in paths(&code(&text), module) {
            if let Some(to) = resolve(&p, &files) {
                if &to != module {
                    edges.insert((module.clone(), to));
                }
            }
        }
    }
    Graph { edges, files }
}

/// The top-level module of a module path (`""` for the crate root).
fn top(m: &Module) -> String {
    m.first().cloned().unwrap_or_default()
}

#[test]
fn every_import_points_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap_or_default();
    let rows = layers(&architecture);
    assert!(
        rows.len() >= 5,
        "the Layers section lists too few rows: {rows:?}"
    );
    let mut row_of: BTreeMap<String, usize> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        for name in row {
            assert!(
                row_of.insert(name.clone(), rows.len() - i).is_none(),
                "`{name}` is on two rows of ARCHITECTURE.md's Layers"
            );
        }
    }
    let g = graph();
    let tops: BTreeSet<String> = g.files.keys().map(top).filter(|t| !t.is_empty()).collect();
    let unplaced: Vec<&String> = tops.iter().filter(|t| !row_of.contains_key(*t)).collect();
    assert!(
        unplaced.is_empty(),
        "these modules have no row in ARCHITECTURE.md's Layers: {unplaced:?}"
    );
    let upward: Vec<String> = g
        .edges
        .iter()
        .filter(|(from, to)| {
            let (a, b) = (top(from), top(to));
            !a.is_empty() && a != b && row_of.get(&b) > row_of.get(&a)
        })
        .map(|(from, to)| {
            let file = g.files[from].strip_prefix(root).unwrap_or(&g.files[from]);
            format!("{} imports {}", file.display(), to.join("::"))
        })
        .collect();
    assert!(
        upward.is_empty(),
        "imports that point up the layers of ARCHITECTURE.md:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_top_level_modules_import_each_other_in_a_cycle() {
    let g = graph();
    let mut next: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in &g.edges {
        let (a, b) = (top(from), top(to));
        if !a.is_empty() && a != b {
            next.entry(a).or_default().insert(b);
        }
    }
    // A module is on a cycle when it reaches itself.
    let mut cycles = Vec::new();
    for start in next.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        while let Some((m, route)) = stack.pop() {
            for n in next.get(&m).into_iter().flatten() {
                if n == start {
                    cycles.push(
                        route
                            .iter()
                            .chain([n])
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(" → "),
                    );
                } else if seen.insert(n.clone()) {
                    let mut r = route.clone();
                    r.push(n.clone());
                    stack.push((n.clone(), r));
                }
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_reader_finds_imports_of_every_form() {
    // The checks above are only as good as this reader: a use tree, a
    // nested group, `super`, an inline path and a renamed import.
    let code = code(
        "use crate::a::{b, c::{d, e as f}};\nuse super::g;\nfn x() { crate::h::i(); } // crate::j\n\
         #[cfg(test)]\nmod tests { use crate::k; }\n",
    );
    let found: BTreeSet<String> = paths(&code, &vec!["m".into(), "n".into()])
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    for want in ["a::b", "a::c::d", "a::c::e", "m::g", "h::i"] {
        assert!(found.contains(want), "{want} not in {found:?}");
    }
    assert!(
        !found
            .iter()
            .any(|p| p.starts_with('j') || p.starts_with('k')),
        "{found:?}"
    );
}
