//! Emits the libtorch rpath / CUDA link arguments for this package's test binaries.
fn main() {
    lora_build::link_libtorch();
}
