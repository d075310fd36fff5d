//! Builds the relay's eBPF programs (C, in ../ebpf) with clang, and generates the Rust view
//! of their map layouts from ebpf/ztna_maps.h with bindgen, so both sides share one
//! definition.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: [&str; 2] = ["xdp_relay", "reuseport"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let src = manifest.join("../ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in ["ztna_maps.h", "steering.h", "xdp_relay.c", "reuseport.c"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }

    let multiarch = match env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("aarch64") => "aarch64-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    check_prerequisites(multiarch);
    for prog in PROGRAMS {
        compile(&src, &out, prog, multiarch);
    }
    bindgen::Builder::default()
        .header(src.join("ztna_maps.h").to_string_lossy())
        .clang_arg(format!("-I/usr/include/{multiarch}"))
        .allowlist_type("ztna_.*")
        .allowlist_var("ZTNA_.*")
        .derive_default(true)
        .derive_debug(true)
        .derive_eq(true)
        .prepend_enum_name(false)
        .use_core()
        .generate()
        .unwrap_or_else(|e| fail(&format!("bindgen could not read ebpf/ztna_maps.h: {e}")))
        .write_to_file(out.join("ztna_maps.rs"))
        .unwrap_or_else(|e| fail(&format!("writing ztna_maps.rs: {e}")));
}

fn check_prerequisites(multiarch: &str) {
    if Command::new("clang").arg("--version").output().is_err() {
        fail("clang was not found; the relay's eBPF programs are C built with clang. Install it: apt-get install clang (or run scripts/install-deps.sh)");
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        fail("/usr/include/bpf/bpf_helpers.h is missing; the relay's eBPF programs need libbpf's headers. Install them: apt-get install libbpf-dev (or run scripts/install-deps.sh)");
    }
    if !Path::new(&format!("/usr/include/{multiarch}/asm/types.h")).exists() {
        fail(&format!("/usr/include/{multiarch}/asm/types.h is missing; install the kernel headers: apt-get install linux-libc-dev"));
    }
}

fn compile(src: &Path, out: &Path, prog: &str, multiarch: &str) {
    let obj = out.join(format!("{prog}.o"));
    let result = Command::new("clang")
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(src.join(format!("{prog}.c")))
        .arg("-o")
        .arg(&obj)
        .output();
    match result {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!("clang failed on ebpf/{prog}.c:\n{}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => fail(&format!("running clang: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}
