//! The checked-in CRD manifests must be exactly what the Rust types generate: regenerate them with
//! `make crds` after changing a type.

/// This crate's directory: the one `cargo test` names when it runs the test (a binary reused from a
/// shared target directory may have been compiled in a clone elsewhere), else the one compiled in.
fn crate_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}

fn check(relative: &str) {
    let path = crate_dir().join(relative);
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = umw_crds::crds_yaml().expect("the CRDs serialise");
    assert!(
        on_disk == generated,
        "{} is out of date with the Rust types in crds/src; run `make crds` and commit the result",
        path.display()
    );
}

#[test]
fn crds_manifest_is_current() {
    check("manifests/crds.yaml");
}

#[test]
fn chart_crds_are_current() {
    check("../charts/umw/crds/crds.yaml");
}

#[test]
fn crd_reference_is_current() {
    let path = crate_dir().join("../docs/crds.md");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = umw_crds::reference::markdown().expect("the reference renders");
    assert!(on_disk == generated, "docs/crds.md is out of date with the Rust types; run `make crds` and commit it");
}

#[test]
fn chart_values_schema_is_current() {
    let path = crate_dir().join("../charts/umw/values.schema.json");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == umw_crds::chart::values_schema_json(),
        "charts/umw/values.schema.json is out of date with crds/src/chart.rs; run `make crds` and commit it"
    );
}
