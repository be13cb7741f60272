//! The VM harness: Debian's kernels under QEMU.
use clap::Args;

#[derive(Args)]
pub struct VmRunArgs {}

#[derive(Args)]
pub struct VmTestArgs {}

pub fn run_command(_args: VmRunArgs) -> anyhow::Result<()> {
    anyhow::bail!("the VM harness is being built")
}

pub fn test_command(_args: VmTestArgs) -> anyhow::Result<()> {
    anyhow::bail!("the VM harness is being built")
}
