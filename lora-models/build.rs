//! Compiles the gradient-checkpointing shim (`native/checkpoint.cpp`) against the libtorch
//! that tch links, and emits the libtorch rpath / CUDA link arguments for this package's own
//! test binaries.
fn main() {
    let includes = lora_build::libtorch_include_dirs();
    println!("cargo:rerun-if-changed=native/checkpoint.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .includes(&includes)
        .warnings(false)
        .file("native/checkpoint.cpp")
        .compile("lora_models_checkpoint");
    lora_build::link_libtorch();
}
