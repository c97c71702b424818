//! Compiles the native shims (`native/shim.cpp`, `native/dist.cpp`) against the libtorch that
//! tch links, and emits the libtorch rpath / CUDA link arguments for this package's own test
//! binaries.
fn main() {
    let includes = lora_build::libtorch_include_dirs();
    println!("cargo:rerun-if-changed=native/shim.cpp");
    println!("cargo:rerun-if-changed=native/quant.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .includes(&includes)
        .warnings(false)
        .file("native/shim.cpp")
        .file("native/quant.cpp")
        .compile("lora_core_shim");
    // c10d process groups. The wheel ships c10d's headers but not gloo's, which
    // ProcessGroupGloo.hpp includes: `native/gloo_compat` holds our declaration-only stand-ins
    // (see native/README.md, "Gloo without gloo's headers"). USE_C10D_GLOO unlocks the class
    // declaration, as it does in libtorch's own build.
    println!("cargo:rerun-if-changed=native/dist.cpp");
    println!("cargo:rerun-if-changed=native/gloo_compat");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .define("USE_C10D_GLOO", None)
        .include("native/gloo_compat")
        .includes(&includes)
        .warnings(false)
        .file("native/dist.cpp")
        .compile("lora_core_dist");
    build_nccl(&includes);
    lora_build::link_libtorch();
}

/// Where the CUDA runtime and NCCL headers of the PyTorch wheel's `nvidia-*` packages are
/// (`site-packages/nvidia/cu*/include`, `nvidia/nccl/include`), plus a `crt/` directory for
/// `cuda_runtime.h` (the runtime wheel does not ship it: taken from the CUDA include dir if
/// present, else from triton's bundled CUDA headers). `None` when any is missing or when this
/// libtorch has no `libtorch_cuda.so`.
struct CudaHeaders {
    cuda: std::path::PathBuf,
    nccl: std::path::PathBuf,
    crt_fallback: Option<std::path::PathBuf>,
}

fn find_cuda_headers() -> Option<CudaHeaders> {
    let lib = lora_build::libtorch_lib_dir();
    if !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let site = lib.parent()?.parent()?.to_path_buf();
    let nvidia = site.join("nvidia");
    println!("cargo:rerun-if-changed={}", nvidia.display());
    let mut dirs: Vec<_> =
        std::fs::read_dir(&nvidia).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    dirs.sort();
    // cu13 wheels: nvidia/cu13/include; cu12 wheels: nvidia/cuda_runtime/include.
    let cuda = dirs
        .iter()
        .map(|d| d.join("include"))
        .find(|inc| inc.join("cuda_runtime_api.h").exists() && inc.join("cuda.h").exists())?;
    let nccl = nvidia.join("nccl/include");
    if !nccl.join("nccl.h").exists() {
        return None;
    }
    let crt_fallback = if cuda.join("crt/host_config.h").exists() {
        None
    } else {
        let triton = site.join("triton/backends/nvidia/include");
        if !triton.join("crt/host_config.h").exists() {
            return None;
        }
        Some(triton)
    };
    Some(CudaHeaders { cuda, nccl, crt_fallback })
}

/// `native/dist_nccl.cpp`: `c10d::ProcessGroupNCCL` against the real CUDA / NCCL headers when
/// [`find_cuda_headers`] finds them, else the same file as a stub whose entry points report
/// "NCCL support was not built". See native/README.md, "NCCL".
fn build_nccl(includes: &[std::path::PathBuf]) {
    println!("cargo:rerun-if-changed=native/dist_nccl.cpp");
    println!("cargo:rerun-if-changed=native/dist_backend.hpp");
    println!("cargo:rerun-if-changed=native/cuda_compat");
    let mut b = cc::Build::new();
    b.cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .includes(includes)
        .warnings(false)
        .file("native/dist_nccl.cpp");
    let found = find_cuda_headers();
    if let Some(h) = &found {
        // The CUDA headers only after torch's; `cuda_compat` supplies CCCL's <nv/target>
        // (host-only), and triton's `crt/` comes last so it never shadows the runtime's own.
        b.define("USE_C10D_NCCL", None)
            .define("LORA_RS_NCCL", None)
            .include(&h.cuda)
            .include(&h.nccl)
            .include("native/cuda_compat");
        if let Some(crt) = &h.crt_fallback {
            b.flag("-idirafter").flag(crt.to_str().unwrap_or_default());
        }
    }
    b.compile("lora_core_dist_nccl");
    if found.is_some() {
        // ProcessGroupNCCL's constructors live in libtorch_cuda, c10::cuda::device_count in
        // libc10_cuda: name both for every binary that links this crate (libtorch_cuda is
        // also forced by lora_build::link_libtorch; neither needs a GPU to load).
        let lib = lora_build::libtorch_lib_dir();
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
