//! The checked-in CRD manifests must be exactly what the Rust types generate: regenerate them with
//! `make crds` after changing a type.

fn check(relative: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
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
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/crds.md");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = umw_crds::reference::markdown().expect("the reference renders");
    assert!(on_disk == generated, "docs/crds.md is out of date with the Rust types; run `make crds` and commit it");
}
