//! The data plane's layout rule, held mechanically: the kernel imports no component and nothing that
//! assembles components; a component imports the kernel (and `umw-crds`) and nothing of its siblings,
//! the runtime or the server; the runtime imports no component. What one component needs of another goes
//! through the kernel's ports.

use std::path::{Path, PathBuf};

const COMPONENTS: &[&str] = &["proxy", "cache", "events", "outbox", "auth"];
/// Modules that assemble components or serve them.
const ASSEMBLY: &[&str] = &["runtime", "chain", "server", "admin", "app", "reload"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Every `crate::<module>` path a file names (in `use` lines or inline), as `module` or
/// `components::module`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if name == "components" {
            let inner = &rest["components::".len().min(rest.len())..];
            let sub: String = inner.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.push(format!("components::{sub}"));
        } else if !name.is_empty() {
            found.push(name);
        }
    }
    // `use crate::{a, b}` names several modules at once.
    for (i, _) in text.match_indices("crate::{") {
        let rest = &text[i + "crate::{".len()..];
        let group = &rest[..rest.find('}').unwrap_or(rest.len())];
        found.extend(group.split(',').map(|m| m.trim().split("::").next().unwrap_or("").to_string()));
    }
    found
}

fn violations(dir: &str, allowed: impl Fn(&str, &Path) -> bool) -> Vec<String> {
    let mut wrong = Vec::new();
    for file in rust_files(&src().join(dir)) {
        let text = std::fs::read_to_string(&file).unwrap();
        for path in crate_paths(&text) {
            if !allowed(&path, &file) {
                wrong.push(format!("{} names crate::{path}", file.strip_prefix(src()).unwrap().display()));
            }
        }
    }
    wrong
}

#[test]
fn the_kernel_imports_no_component_and_nothing_that_assembles_them() {
    let wrong = violations("kernel", |path, _| path == "kernel");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn components_import_the_kernel_and_nothing_of_each_other() {
    for component in COMPONENTS {
        let own = format!("components::{component}");
        let wrong = violations(&format!("components/{component}"), |path, _| path == "kernel" || path == own);
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
    // Nor through the library's re-exports (`crate::cache` is `crate::components::cache`).
    for component in COMPONENTS {
        let wrong = violations(&format!("components/{component}"), |path, _| {
            !COMPONENTS.contains(&path) && !ASSEMBLY.contains(&path)
        });
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}

#[test]
fn the_runtime_is_generic_and_short() {
    let wrong = violations("runtime", |path, _| path == "kernel" || path == "runtime");
    assert!(wrong.is_empty(), "the runtime names no component: {wrong:#?}");
    let text = std::fs::read_to_string(src().join("runtime/mod.rs")).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap_or("").lines().count();
    assert!(code <= 400, "runtime/mod.rs has {code} lines outside its tests");
}

#[test]
fn the_rule_is_checked_on_something() {
    // A rule over no files would pass by itself: each folder has code, and a sibling import is caught.
    for dir in ["kernel", "runtime", "components/proxy", "components/cache", "components/events", "components/outbox"] {
        assert!(!rust_files(&src().join(dir)).is_empty(), "{dir} has no Rust files");
    }
    assert_eq!(crate_paths("use crate::components::proxy::Proxied;"), ["components::proxy"]);
    assert_eq!(crate_paths("use crate::{chain, config};"), ["chain", "config"]);
}
