//! Finds libfabric with pkg-config, generates Rust bindings for its headers
//! with bindgen, and compiles C wrappers for the functions libfabric defines
//! `static inline` in its headers (fi_domain, fi_send, fi_cq_read, ...), which
//! have no symbol in libfabric.so that Rust could link to.

use std::path::PathBuf;

const MIN_VERSION: &str = "1.17";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let lib = match pkg_config::Config::new().atleast_version(MIN_VERSION).probe("libfabric") {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "\nclaudefs-fabric-sys: libfabric >= {MIN_VERSION} was not found by pkg-config ({e}).\n\
                 Install its development files (Debian: `apt-get install libfabric-dev libclang-dev`, \
                 or run hack/deps.sh), or build without libfabric: \
                 `cargo build --no-default-features` keeps only the plain TCP transport.\n"
            );
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrappers = out.join("static_fns");
    let clang_args: Vec<String> = lib.include_paths.iter().map(|p| format!("-I{}", p.display())).collect();
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(&clang_args)
        .allowlist_function("fi_.*")
        .allowlist_type("fi_.*|fid_.*|fid")
        .allowlist_var("FI_.*")
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|e| {
            eprintln!(
                "\nclaudefs-fabric-sys: generating bindings for libfabric {} failed: {e}.\n\
                 bindgen needs libclang (Debian: `apt-get install libclang-dev`, or run hack/deps.sh).\n",
                lib.version
            );
            std::process::exit(1);
        });
    bindings.write_to_file(out.join("bindings.rs")).expect("writing bindings.rs into OUT_DIR");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let mut build = cc::Build::new();
    build.file(wrappers.with_extension("c")).include(&manifest).warnings(false);
    for p in &lib.include_paths {
        build.include(p);
    }
    build.compile("fabric_static_fns");
    println!("cargo:version={}", lib.version);
}
