//! Which sessions a command acts on: `SESSION|VM`, `--tap`, `--session`, `--vm`, `--all`, as
//! `detach` and `update` take them.
use std::collections::BTreeSet;

use anyhow::bail;
use clap::Args;

use super::target::NicArgs;
use crate::{
    model::observed::Observed,
    resolve::{
        interface::validate_name,
        select::NicChoice,
        vm::{Sources, vm_taps},
    },
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
    /// Refuses contradictory choices before anything is read or locked.
    pub fn check(&self) -> anyhow::Result<NicChoice> {
        let choice = self.nic.choice();
        if choice != NicChoice::Unspecified && (self.all || self.session.is_some() || self.tap.is_some()) {
            bail!(
                "--nic and --mac choose among a VM's NICs: use them with a VM, not with --all, --session or --tap"
            );
        }
        Ok(choice)
    }

    /// The sessions named, all existing; an error names what matched nothing.
    /// `command` names the command in the error that asks for a choice.
    pub fn select(
        &self,
        command: &str,
        sources: &Sources,
        observed: &Observed,
    ) -> anyhow::Result<BTreeSet<u32>> {
        select(command, sources, observed, self, self.check()?)
    }
}

fn select(
    command: &str,
    sources: &Sources,
    observed: &Observed,
    args: &SessionArgs,
    choice: NicChoice,
) -> anyhow::Result<BTreeSet<u32>> {
    if args.all {
        return Ok(observed.sessions.keys().copied().collect());
    }
    if let Some(id) = args.session {
        return session(observed, id);
    }
    if let Some(text) = &args.target
        && !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && let Ok(id) = text.parse::<u32>()
        && observed.sessions.contains_key(&id)
    {
        return Ok(BTreeSet::from([id]));
    }
    let (name, is_tap_flag) = match (&args.tap, &args.vm, &args.target) {
        (Some(tap), _, _) => (tap, true),
        (None, Some(vm), _) | (None, None, Some(vm)) => (vm, false),
        (None, None, None) => bail!("say what to {command}: a session id, a VM, --tap TAP, or --all"),
    };
    if is_tap_flag {
        validate_name(name)?;
    }
    // A tap that is gone (its VM stopped) is still found by the name recorded at attach.
    if choice == NicChoice::Unspecified {
        let by_name = sessions_on(observed, std::slice::from_ref(name));
        if !by_name.is_empty() {
            return Ok(by_name);
        }
    }
    if is_tap_flag {
        bail!("tap {name:?} is not mirrored here; `vmsniff status` lists the sessions");
    }
    if args.vm.is_none() && name.bytes().all(|b| b.is_ascii_digit()) {
        bail!(
            "there is no session {name} here, and no VM or tap named {name:?}; `vmsniff status` lists the sessions"
        );
    }
    let taps = vm_taps(sources, name, choice)?;
    let ids = sessions_on(observed, &taps);
    if ids.is_empty() {
        bail!(
            "VM {name:?} (tap {}) is not mirrored here; `vmsniff status` lists the sessions",
            taps.join(", ")
        );
    }
    Ok(ids)
}

/// The sessions of the taps recorded under these names.
fn sessions_on(observed: &Observed, taps: &[String]) -> BTreeSet<u32> {
    observed
        .taps
        .values()
        .filter(|t| taps.contains(&crate::plan::detach::ifname(&t.ifname)))
        .flat_map(|t| t.ids.iter().filter(|&&id| id != 0).map(|&id| u32::from(id)))
        .collect()
}

fn session(observed: &Observed, id: u32) -> anyhow::Result<BTreeSet<u32>> {
    if !observed.sessions.contains_key(&id) {
        bail!("there is no session {id} in this network namespace; `vmsniff status` lists the sessions");
    }
    Ok(BTreeSet::from([id]))
}
