//! Reading the configuration: a YAML file, or every `.yaml`/`.yml` file of a directory in name order,
//! holding one Middleware and its policies (the same documents a user applies to a cluster, or the
//! operator's rendered ConfigMap mounted as a directory).
//!
//! Every problem is reported with its file, document and field path, so that `umw-dataplane check`
//! answers a broken configuration in one go.

use std::path::{Path, PathBuf};

use umw_crds::config::{self, Bundle, Origins};
use umw_crds::validate;

/// The raw files of a configuration, as last read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Files {
    pub files: Vec<(String, String)>,
}

/// A parsed and validated configuration.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub bundle: Bundle,
    pub origins: Origins,
    /// Hash of the normalised configuration; equals the hash the operator computes for what it rendered.
    pub hash: String,
}

/// A configuration that cannot be used: one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct Invalid {
    pub problems: Vec<String>,
}

impl Invalid {
    pub fn one(problem: impl Into<String>) -> Self {
        Self { problems: vec![problem.into()] }
    }
}

/// Reads the files at `path`. In a directory, hidden entries (Kubernetes' `..data` links) are skipped.
pub fn read(path: &Path) -> Result<Files, Invalid> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| Invalid::one(format!("{}: {e}", path.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Invalid::one(format!("{}: no .yaml or .yml files in this directory", path.display())));
        }
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| Invalid::one(format!("{}: {e}", file.display())))?;
        out.push((file.display().to_string(), text));
    }
    Ok(Files { files: out })
}

/// Parses and validates.
pub fn parse(files: &Files) -> Result<Loaded, Invalid> {
    let sources: Vec<(&str, &str)> = files.files.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
    let (loaded, errors) = Bundle::load_all(&sources);
    let mut problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let Some((bundle, origins)) = loaded else { return Err(Invalid { problems }) };
    // Unknown fields do not stop the other checks: every problem is reported at once.
    problems.extend(validate::validate(&bundle).iter().map(|v| {
        let at = origins.get(&v.resource).cloned().unwrap_or_else(|| v.resource.clone());
        format!("{at} ({}): {}: {}", v.resource, v.path, v.message)
    }));
    if !problems.is_empty() {
        return Err(Invalid { problems });
    }
    let text = bundle.to_yaml().map_err(|e| Invalid::one(e.to_string()))?;
    Ok(Loaded { hash: config::hash(&text), bundle, origins })
}

/// Reads and parses.
pub fn load(path: &Path) -> Result<(Files, Loaded), Invalid> {
    let files = read(path)?;
    let loaded = parse(&files)?;
    Ok((files, loaded))
}

impl Loaded {
    /// `namespace/name` of the Middleware (namespace `default` when the file has none).
    pub fn middleware(&self) -> String {
        format!("{}/{}", self.namespace(), self.bundle.middleware.metadata.name.as_deref().unwrap_or(""))
    }

    pub fn namespace(&self) -> &str {
        self.bundle.middleware.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// Where a resource (`Kind/name`) was read from.
    pub fn origin(&self, resource: &str) -> String {
        self.origins.get(resource).cloned().unwrap_or_else(|| resource.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// This crate's directory: the one `cargo test` names when it runs the test (a binary reused from a
    /// shared target directory may have been compiled in a clone elsewhere), else the one compiled in.
    fn crate_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
    }

    fn examples() -> PathBuf {
        crate_dir().join("../examples/shop")
    }

    #[test]
    fn the_examples_are_a_valid_configuration_as_a_directory_and_as_files() {
        let (_, loaded) = load(&examples()).unwrap();
        assert_eq!(loaded.bundle.middleware.metadata.name.as_deref(), Some("shop"));
        let b = &loaded.bundle;
        assert_eq!((b.cache_policies.len(), b.event_routes.len(), b.auth_policies.len()), (1, 1, 1));
    }

    #[test]
    fn every_problem_is_reported_with_its_file_document_and_field() {
        let dir = std::env::temp_dir().join(format!("umw-dataplane-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            "apiVersion: v1\nkind: Secret\n---\napiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec:\n  listeners: {htp: {port: 8080}}\n",
        )
        .unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "not: [valid").unwrap();
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: c}\nspec: {targetRefs: [{name: a}], rules: [{ttl: 1s, jiter: 1}]}\n",
        )
        .unwrap();
        let error = load(&dir).unwrap_err().to_string();
        assert!(error.contains("a.yaml, document 2: unknown field spec.listeners.htp"), "{error}");
        assert!(error.contains("b.yaml, document 1: unknown field spec.rules[0].jiter"), "{error}");
        assert!(!error.contains("hidden"), "hidden files are not configuration: {error}");

        std::fs::write(dir.join("a.yaml"), "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec:\n  routes: [{name: r, upstream: {url: 'ftp://x'}, timeout: 0s}]\n").unwrap();
        std::fs::write(dir.join("b.yaml"), "").unwrap();
        let error = load(&dir).unwrap_err().to_string();
        assert!(error.contains("a.yaml, document 1 (Middleware/a): spec.routes[0].upstream.url:"), "{error}");
        assert!(error.contains("a.yaml, document 1 (Middleware/a): spec.routes[0].timeout:"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn policy_values_are_held_to_the_schema_and_rules_the_api_server_enforces() {
        let dir = std::env::temp_dir().join(format!("umw-dataplane-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mw = "apiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec:\n  routes: [{name: r, upstream: {url: 'http://x'}}]\n";
        let policy = |rules: &str| {
            format!(
                "---\napiVersion: umw.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: c}}\nspec: {{targetRefs: [{{name: a}}], rules: {rules}}}\n"
            )
        };
        for (rules, expected) in [
            ("[{ttl: banana}]", "spec.rules[0].ttl: duration \"banana\" is not"),
            ("[{ttl: 30 seconds}]", "spec.rules[0].ttl: duration \"30 seconds\" is not"),
            ("[{ttl: -30s}]", "spec.rules[0].ttl: duration \"-30s\" is not"),
            ("[{ttl: 0s}]", "spec.rules[0].ttl:"),
            ("[{ttl: 1s, negativeTtl: 0s}]", "spec.rules[0].negativeTtl:"),
            ("[{ttl: 1s, jitterPercent: 150}]", "spec.rules[0].jitterPercent:"),
            ("[{ttl: 1s, maxEntryBytes: -1}]", "spec.rules[0].maxEntryBytes:"),
            ("[]", "spec.rules: needs at least one rule"),
            ("[{ttl: 1s, negativeStatuses: [99]}]", "spec.rules[0].negativeStatuses[0]:"),
            ("[{ttl: 1s, singleFlight: {lockTimeout: 0s}}]", "spec.rules[0].singleFlight.lockTimeout:"),
            ("[{ttl: 1s, tags: ['product:{{ path.x }}']}]", "path takes a segment number"),
        ] {
            std::fs::write(dir.join("a.yaml"), format!("{mw}{}", policy(rules))).unwrap();
            let error = load(&dir).map(|_| ()).unwrap_err().to_string();
            assert!(error.contains(expected), "{rules}: {error}");
            assert!(error.contains("(CachePolicy/c)"), "{rules}: names the document: {error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
