//! vmsniff's tc programs. Built for `bpfel-unknown-none` by vmsniff-user's build script and
//! embedded in the `vmsniff` binary.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod tap;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Built for the host (for example by `cargo build --workspace`), this crate has nothing to run.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "vmsniff-ebpf holds eBPF programs: vmsniff-user's build script compiles them for \
         bpfel-unknown-none; run `cargo build -p vmsniff-user` instead"
    );
    std::process::exit(2);
}
