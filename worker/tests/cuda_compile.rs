//! The CUDA kernels compile with NVRTC for Hopper (`sm_90`) on a machine
//! without a GPU: a syntax or type error in `kernels.cu` fails here, not on
//! a device. NVRTC comes from PyPI's `nvidia-cuda-nvrtc` wheel
//! (`scripts/nvrtc-env.sh`, on `LD_LIBRARY_PATH`). Without the library the
//! tests skip, unless `PIPEWRIGHT_REQUIRE_NVRTC=1` (set by `scripts/test.sh`).
#![cfg(feature = "cuda")]

use pipewright::kernels::cuda::{self, GpuError};

fn nvrtc_or_skip() -> bool {
    if cuda::nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var("PIPEWRIGHT_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "PIPEWRIGHT_REQUIRE_NVRTC=1 but libnvrtc does not load (LD_LIBRARY_PATH={:?})",
        std::env::var("LD_LIBRARY_PATH").ok()
    );
    eprintln!("skipped: libnvrtc is not on the library path");
    false
}

#[test]
fn every_kernel_compiles_for_sm_90() {
    if !nvrtc_or_skip() {
        return;
    }
    let ptx = cuda::compile("sm_90").expect("kernels compile for sm_90");
    let text = ptx.to_src();
    if let Ok(path) = std::env::var("PIPEWRIGHT_PTX_OUT") {
        // For inspection with ptxas -v (registers, spills).
        std::fs::write(path, &text).expect("write the PTX");
    }
    assert!(text.contains(".target sm_90"), "PTX targets sm_90");
    for name in cuda::kernel_names() {
        assert!(
            text.contains(&format!(".entry {name}(")),
            "kernel {name} is missing from the PTX"
        );
    }
}

#[test]
fn a_broken_kernel_is_reported_with_the_compiler_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let src = "extern \"C\" __global__ void broken(float* x) { x[0] = undeclared_name; }";
    match cuda::compile_source(src, "sm_90") {
        Err(GpuError::Compile { arch, log }) => {
            assert_eq!(arch, "sm_90");
            assert!(
                log.contains("undeclared_name"),
                "log names the error: {log}"
            );
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn without_a_device_opening_one_is_an_error_not_a_panic() {
    if cuda::driver_present() {
        return; // a machine with a driver: the device tests cover it
    }
    let err = cuda::Gpu::open(0).expect_err("no driver, no device");
    assert!(matches!(err, GpuError::NoDriver), "{err}");
}
