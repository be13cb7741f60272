//! Which sessions a command acts on, one set of rules for both modes (session ids are shared):
//! a session id, every session of a tap (as recorded at attach, so a tap that is gone still
//! counts), of a VM's NICs, or all. See conventions.md, "Sessions".
use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::{
    model::{mirror::NicChoice, sources::Sources},
    resolve::{
        interface::{InterfaceError, validate_name},
        vm::{ResolveError, vm_taps},
    },
};

/// What a command names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    All,
    /// `--session N`.
    Session(u32),
    /// `--tap TAP`.
    Tap(String),
    /// `--vm VM` (`forced`), or a positional argument that may be a session id or a VM.
    Vm {
        name: String,
        nic: NicChoice,
        forced: bool,
    },
}

#[derive(Debug, Error)]
pub enum SelectionError {
    #[error("there is no session {id} in this network namespace; `vmsniff status` lists the sessions")]
    NoSession { id: u32 },
    #[error("tap {name:?} is not mirrored here; `vmsniff status` lists the sessions")]
    TapNotMirrored { name: String },
    #[error(
        "there is no session {name} here, and no VM or tap named {name:?}; `vmsniff status` lists the sessions"
    )]
    NothingNamed { name: String },
    #[error("VM {name:?} (tap {}) is not mirrored here; `vmsniff status` lists the sessions", taps.join(", "))]
    VmNotMirrored { name: String, taps: Vec<String> },
    #[error(transparent)]
    BadName(#[from] InterfaceError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
}

/// The sessions a selection may pick from: each id with the tap recorded at attach.
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    pub taps: BTreeMap<u32, String>,
}

impl Candidates {
    fn on_taps(&self, taps: &[String]) -> BTreeSet<u32> {
        self.taps.iter().filter(|(_, tap)| taps.contains(tap)).map(|(&id, _)| id).collect()
    }
}

/// The sessions named, all among `candidates`; an error names what matched nothing.
pub async fn select(
    selection: &Selection,
    candidates: &Candidates,
    sources: &Sources,
) -> Result<BTreeSet<u32>, SelectionError> {
    let (name, nic, forced) = match selection {
        Selection::All => return Ok(candidates.taps.keys().copied().collect()),
        Selection::Session(id) if candidates.taps.contains_key(id) => return Ok(BTreeSet::from([*id])),
        Selection::Session(id) => return Err(SelectionError::NoSession { id: *id }),
        Selection::Tap(name) => {
            validate_name(name)?;
            let ids = candidates.on_taps(std::slice::from_ref(name));
            return if ids.is_empty() {
                Err(SelectionError::TapNotMirrored { name: name.clone() })
            } else {
                Ok(ids)
            };
        }
        Selection::Vm { name, nic, forced } => (name, *nic, *forced),
    };
    let all_digits = !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit());
    if !forced
        && all_digits
        && let Ok(id) = name.parse::<u32>()
        && candidates.taps.contains_key(&id)
    {
        return Ok(BTreeSet::from([id]));
    }
    // A tap that is gone (its VM stopped) is still found by the name recorded at attach.
    if nic == NicChoice::Unspecified {
        let by_name = candidates.on_taps(std::slice::from_ref(name));
        if !by_name.is_empty() {
            return Ok(by_name);
        }
    }
    if !forced && all_digits {
        return Err(SelectionError::NothingNamed { name: name.clone() });
    }
    let taps = vm_taps(sources, name, nic).await?;
    let ids = candidates.on_taps(&taps);
    if ids.is_empty() {
        return Err(SelectionError::VmNotMirrored { name: name.clone(), taps });
    }
    Ok(ids)
}

/// The taps a `status VM` shows: the name itself when sessions recorded it (no libvirt needed,
/// the VM may be gone), else the VM's NICs' taps through libvirt.
pub async fn status_taps(
    name: &str,
    nic: NicChoice,
    recorded: &BTreeSet<String>,
    sources: &Sources,
) -> Result<Vec<String>, ResolveError> {
    if nic == NicChoice::Unspecified && recorded.contains(name) {
        return Ok(vec![name.to_owned()]);
    }
    vm_taps(sources, name, nic).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sources::LibvirtUri;

    fn candidates() -> Candidates {
        Candidates {
            taps: BTreeMap::from([(3, "tap0".to_owned()), (4, "tap0".to_owned()), (12, "7".to_owned())]),
        }
    }

    async fn pick(selection: Selection) -> Result<BTreeSet<u32>, SelectionError> {
        // No libvirt behind this URI: every rule below must decide without it.
        let sources = Sources { libvirt: LibvirtUri::new(Some("test:///nonexistent".into())), ovsdb: None };
        select(&selection, &candidates(), &sources).await
    }

    fn vm(name: &str, forced: bool) -> Selection {
        Selection::Vm { name: name.into(), nic: NicChoice::Unspecified, forced }
    }

    #[tokio::test]
    async fn ids_taps_and_all_are_chosen_as_the_conventions_say() {
        assert_eq!(pick(Selection::All).await.unwrap(), BTreeSet::from([3, 4, 12]));
        assert_eq!(pick(Selection::Session(4)).await.unwrap(), BTreeSet::from([4]));
        assert!(matches!(pick(Selection::Session(5)).await, Err(SelectionError::NoSession { id: 5 })));
        assert_eq!(pick(Selection::Tap("tap0".into())).await.unwrap(), BTreeSet::from([3, 4]));
        assert!(matches!(
            pick(Selection::Tap("tap1".into())).await,
            Err(SelectionError::TapNotMirrored { .. })
        ));
        assert!(matches!(pick(Selection::Tap("a/b".into())).await, Err(SelectionError::BadName(_))));
        // An all-digit argument is a session first, then a recorded tap of that name.
        assert_eq!(pick(vm("12", false)).await.unwrap(), BTreeSet::from([12]));
        assert_eq!(pick(vm("7", false)).await.unwrap(), BTreeSet::from([12]));
        assert!(matches!(pick(vm("8", false)).await, Err(SelectionError::NothingNamed { .. })));
        // --vm 12 is never session 12.
        assert!(pick(vm("12", true)).await.is_err());
        assert_eq!(pick(vm("tap0", false)).await.unwrap(), BTreeSet::from([3, 4]));
    }
}
