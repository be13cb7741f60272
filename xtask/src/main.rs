//! Project commands: `cargo xtask setup | demo | test | vm-run | vm-test`.
mod setup;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "vmsniff's project commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install every prerequisite (idempotent): Debian's eBPF toolchain, bpf-linker, QEMU,
    /// busybox and the tools the tests use.
    Setup,
    /// Boot a Debian kernel under QEMU and run one command inside it.
    VmRun(vm::VmRunArgs),
    /// Run the privileged test suite inside Debian kernels under QEMU (and on the host).
    VmTest(vm::VmTestArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::VmRun(args) => vm::run_command(args),
        Command::VmTest(args) => vm::test_command(args),
    }
}
