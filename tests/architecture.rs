//! The one-way architecture of `docs/ARCHITECTURE.md`, checked over the source text: every
//! `crate::…` (and `super::…`) path in `src/` that reaches another top-level module must reach one
//! of the same layer or a lower one; nothing outside `train/` and the binaries (the CLI holds the
//! demo, which shows a short training run) uses `train`; the library does not use clap; every top-level
//! module has a layer; no source file is over 600 lines. Comments are not code and are not checked.

use std::path::{Path, PathBuf};

/// The library's top-level modules by layer, lowest first. A module may use its own layer and the
/// layers before it.
const LAYERS: &[&[&str]] = &[
    &["progress"],
    &["data"],
    &["model"],
    &["cpu"],
    &["infer"],
    &["store"],
    &["render"],
    &["search"],
    &["train"],
    &["serve"],
    &["benchkit"],
];

/// The binaries (`src/main.rs`, `src/cli/`, `src/bin/`): they may use every module, and no module
/// may use them. `lib.rs` only declares the modules.
const TOP: &[&str] = &["main", "cli", "bin", "lib"];

const MAX_LINES: usize = 600;

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file below `src/`: `src/train/step.rs` → [train, step],
/// `src/train/mod.rs` → [train], `src/serve/mod.rs` → [serve].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    parts
}

/// A line without its `//` comment (a `//` inside a string literal is kept).
fn code(line: &str) -> &str {
    let b = line.as_bytes();
    let mut in_str = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a line of code names through `crate::` (or `$crate::`, including
/// `crate::{a, b::c}`) and through `super::` paths that leave `here` (the file's module path).
fn targets(line: &str, here: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in line.match_indices("crate::") {
        let before = line[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &line[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c}`: the first name of each item.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_ascii_alphanumeric() || c == '_') => {
                        out.push(ident_at(&group[j..]).to_string());
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident_at(rest).to_string());
        }
    }
    let mut from = 0;
    while let Some(i) = line[from..].find("super::") {
        let at = from + i;
        let before = line[..at].chars().next_back();
        let mut rest = &line[at..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        from = line.len() - rest.len();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let base = here.len().saturating_sub(ups);
        let target = if base == 0 {
            ident_at(rest).to_string()
        } else {
            here[0].clone()
        };
        if !target.is_empty() {
            out.push(target);
        }
    }
    out.retain(|t| !t.is_empty() && t != "self" && t != "super");
    out
}

#[test]
fn dependencies_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let here = module_path(rel);
        let top = here[0].as_str();
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        if lines > MAX_LINES {
            bad.push(format!(
                "src/{}: {lines} lines (at most {MAX_LINES})",
                rel.display()
            ));
        }
        if TOP.contains(&top) {
            continue;
        }
        let Some(mine) = layer(top) else {
            bad.push(format!(
                "src/{}: module `{top}` has no layer in tests/architecture.rs",
                rel.display()
            ));
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let line = code(line);
            if line.contains("clap") {
                bad.push(format!(
                    "src/{}:{}: the library uses clap: {}",
                    rel.display(),
                    n + 1,
                    line.trim()
                ));
            }
            for t in targets(line, &here) {
                let ok = (t != "train" || top == "train")
                    && match layer(&t) {
                        Some(l) => l <= mine,
                        // Not a top-level module (a macro's `$crate::` path, an item of lib.rs).
                        None => !TOP.contains(&t.as_str()),
                    };
                if !ok {
                    bad.push(format!(
                        "src/{}:{}: `{top}` (layer {mine}) uses `{t}` (layer {}): {}",
                        rel.display(),
                        n + 1,
                        layer(&t).map_or("binary".to_string(), |l| l.to_string()),
                        line.trim()
                    ));
                }
            }
        }
    }
    // Every module lib.rs declares has a layer, and every layer's module is declared.
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    for m in &declared {
        if layer(m).is_none() {
            bad.push(format!(
                "src/lib.rs: module `{m}` has no layer in tests/architecture.rs"
            ));
        }
    }
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        if !declared.contains(m) {
            bad.push(format!(
                "tests/architecture.rs: layer module `{m}` is not declared in src/lib.rs"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "architecture violations:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_checker_sees_paths() {
    let here = vec!["cpu".to_string(), "pass".to_string()];
    assert_eq!(
        targets("use crate::train::glue::Pending;", &here),
        ["train"]
    );
    assert_eq!(
        targets("use crate::{data::x, model};", &here),
        ["data", "model"]
    );
    assert_eq!(targets("$crate::cpu::simd::m!()", &here), ["cpu"]);
    assert_eq!(targets("use super::engine::Engine;", &here), ["cpu"]);
    assert_eq!(targets("use super::super::train::x;", &here), ["train"]);
    let line = "let s = \"http://crate::train\"; // crate::train";
    assert_eq!(targets(code(line), &here), ["train"]);
    assert!(targets(code("// crate::train"), &here).is_empty());
    assert!(targets("use deeprank_crate::train;", &here).is_empty());
}
