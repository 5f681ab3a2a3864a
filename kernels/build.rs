//! With the `cuda` feature, compiles src/cuda/ember.cu to PTX with nvcc for the GPU generation
//! in `CUDA_COMPUTE_CAP` (e.g. 90 for an H100; asked of nvidia-smi when unset). Without the
//! feature it does nothing, so a CPU build needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/ember.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = build_ptx() {
        eprintln!("error: building Ember's CUDA kernels: {message}");
        std::process::exit(1);
    }
}

fn build_ptx() -> Result<(), String> {
    let cap = compute_cap()?;
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?).join("ember.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "src/cuda/ember.cu", "-o"])
        .arg(&out)
        .status()
        .map_err(|e| {
            format!(
                "could not run `{nvcc}` ({e}): install the CUDA toolkit or run scripts/install-nvcc.sh and put the \
                 directory it prints on PATH (or set NVCC)"
            )
        })?;
    if !status.success() {
        return Err(format!("`{nvcc}` failed ({status}) on src/cuda/ember.cu"));
    }
    Ok(())
}

/// `CUDA_COMPUTE_CAP` as candle reads it ("90" or "9.0"), else the first GPU's from nvidia-smi.
fn compute_cap() -> Result<String, String> {
    let raw = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(v) => v,
        Err(_) => Command::new("nvidia-smi")
            .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .ok_or("set CUDA_COMPUTE_CAP to the GPU's compute capability (e.g. 90 for an H100, 89 for an L4)")?,
    };
    let cap: String = raw.trim().chars().filter(char::is_ascii_digit).collect();
    if cap.len() < 2 {
        return Err(format!("CUDA_COMPUTE_CAP={raw:?} is not a compute capability like 90 or 8.9"));
    }
    Ok(cap)
}
