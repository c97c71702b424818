//! Build-script helper shared by the lora-rs crates.
//!
//! tch's own build script (in `torch-sys`) finds libtorch and tells the linker where it is,
//! but two things it cannot do for downstream packages, because `cargo:rustc-link-arg`
//! applies only to the package whose build script prints it:
//!
//! 1. **An rpath to the libtorch lib dir**, so that test, example and bench binaries run
//!    without `LD_LIBRARY_PATH`.
//! 2. **`--no-as-needed` for `libtorch_cuda`**: nothing in the Rust code references a CUDA
//!    symbol directly, so with the linker's default `--as-needed` the CUDA backend would be
//!    dropped and `tch::Cuda::is_available()` would be false on a GPU machine.
//!
//! Each crate that has binaries calls [`link_libtorch`] from its `build.rs`. The crate must
//! depend on `torch-sys` *directly*: that is what makes cargo hand its build script the
//! `DEP_TCH_LIBTORCH_LIB` variable (torch-sys declares `links = "tch"`).

use std::path::PathBuf;

/// The libtorch library directory announced by `torch-sys`, canonicalised (so binaries keep
/// working if the path went through a symlink that later moves).
///
/// # Panics
///
/// When the calling package does not depend on `torch-sys` directly (build scripts report
/// errors by panicking).
pub fn libtorch_lib_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: this package must depend on torch-sys directly")
    });
    let lib = PathBuf::from(lib);
    std::fs::canonicalize(&lib).unwrap_or(lib)
}

/// libtorch's include directories (the wheel layout: `<torch>/include` and the C++ API
/// headers under `<torch>/include/torch/csrc/api/include`).
pub fn libtorch_include_dirs() -> Vec<PathBuf> {
    let root = libtorch_lib_dir().parent().map(PathBuf::from).unwrap_or_default();
    let include = root.join("include");
    vec![include.join("torch/csrc/api/include"), include]
}

/// Prints the link arguments for this package's tests, examples, benches and binaries: an
/// rpath to libtorch and, when the libtorch build has CUDA, a forced dependency on
/// `libtorch_cuda` so the same binary uses the GPU where one exists.
pub fn link_libtorch() {
    let lib = libtorch_lib_dir();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
