//! Which sessions a command acts on: `SESSION|VM`, `--tap`, `--session`, `--vm`, `--all`, as
//! `detach` and `update` take them. The rules themselves are the service's
//! (`service::select`).
use anyhow::bail;
use clap::Args;

use crate::{
    model::mirror::NicChoice,
    service::{Selection, flags::NicArgs},
};

#[derive(Args, Debug)]
pub struct SessionArgs {
    /// A session id (as `attach` printed it), or a VM: its Nova name, UUID, libvirt domain, MAC
    /// or tap.
    #[arg(value_name = "SESSION|VM", conflicts_with_all = ["tap", "all", "session", "vm"])]
    pub target: Option<String>,

    /// Every session of this tap.
    #[arg(long, value_name = "TAP", conflicts_with_all = ["all", "session", "vm"])]
    pub tap: Option<String>,

    /// This session, even if the argument could name a VM.
    #[arg(long, value_name = "N", conflicts_with_all = ["all", "vm"])]
    pub session: Option<u32>,

    /// This VM, even if the argument is all digits.
    #[arg(long, value_name = "VM", conflicts_with = "all")]
    pub vm: Option<String>,

    /// Every session in this network namespace.
    #[arg(long)]
    pub all: bool,

    /// Of a VM's NICs, only this one (all of them otherwise).
    #[command(flatten)]
    pub nic: NicArgs,
}

impl SessionArgs {
    /// What the arguments name; contradictory or missing choices are refused before anything
    /// is read or locked. `command` names the command in the error that asks for a choice.
    pub fn selection(&self, command: &str) -> anyhow::Result<Selection> {
        let nic = self.nic.choice();
        if nic != NicChoice::Unspecified && (self.all || self.session.is_some() || self.tap.is_some()) {
            bail!(
                "--nic and --mac choose among a VM's NICs: use them with a VM, not with --all, --session or --tap"
            );
        }
        Ok(match (self.all, self.session, &self.tap, &self.vm, &self.target) {
            (true, ..) => Selection::All,
            (false, Some(id), ..) => Selection::Session(id),
            (false, None, Some(tap), ..) => Selection::Tap(tap.clone()),
            (false, None, None, Some(vm), _) => Selection::Vm { name: vm.clone(), nic, forced: true },
            (false, None, None, None, Some(text)) => Selection::Vm { name: text.clone(), nic, forced: false },
            (false, None, None, None, None) => {
                bail!("say what to {command}: a session id, a VM, --tap TAP, or --all")
            }
        })
    }
}
