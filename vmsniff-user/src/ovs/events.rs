//! OVSDB changes as wake-ups: a VM's OVS port deleted and added again while its tap stays (a
//! replug by os-vif or by hand), or a vmsniff Mirror or GRE port removed by someone. Link events
//! do not show these. A thread holds an OVSDB `monitor` on the columns that matter and wakes the
//! daemon on every change; it reconnects when OVSDB goes away (an Open vSwitch restart), and
//! wakes the daemon then too, since anything may have changed meanwhile.
use std::time::Duration;

use tokio::sync::mpsc;

use crate::{
    model::sources::Sources,
    ovsdb::{Client, OvsdbError, vswitch::DATABASE},
};

/// The columns whose changes can call for a reconcile; not statistics, which change all the time.
const WATCHED: [(&str, &[&str]); 3] = [
    ("Bridge", &["ports", "mirrors"]),
    ("Port", &["name", "interfaces"]),
    ("Mirror", &["select_src_port", "select_dst_port", "output_port"]),
];

/// How soon to try again after OVSDB went away or could not be reached.
const RECONNECT: Duration = Duration::from_secs(2);

pub struct OvsEvents {
    changes: mpsc::Receiver<()>,
}

impl OvsEvents {
    /// Starts watching the OVSDB that `sources` names (or the default socket).
    pub fn watch(sources: &Sources) -> std::io::Result<OvsEvents> {
        // One pending wake-up is enough: a pass reads everything anew.
        let (wake, changes) = mpsc::channel(1);
        let ovsdb = sources.ovsdb.clone();
        std::thread::Builder::new().name("ovsdb-monitor".into()).spawn(move || watch(ovsdb, wake))?;
        Ok(OvsEvents { changes })
    }

    /// The next change; pending forever if the thread ended.
    pub async fn next(&mut self) {
        if self.changes.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

fn watch(ovsdb: Option<String>, wake: mpsc::Sender<()>) {
    let mut connected_before = false;
    loop {
        let error = monitor(ovsdb.as_deref(), &wake, &mut connected_before);
        if wake.is_closed() {
            return;
        }
        match error {
            Err(e) if connected_before => {
                log::warn!(
                    "daemon: lost the OVSDB monitor ({e}); reconnecting every {} s",
                    RECONNECT.as_secs()
                );
                connected_before = false;
            }
            Err(e) => log::debug!("no OVSDB to watch: {e}"),
            Ok(()) => {}
        }
        std::thread::sleep(RECONNECT);
    }
}

fn monitor(ovsdb: Option<&str>, wake: &mpsc::Sender<()>, connected: &mut bool) -> Result<(), OvsdbError> {
    let mut client = Client::open(ovsdb)?;
    client.monitor(DATABASE, &WATCHED)?;
    if !*connected {
        log::info!("daemon: watching OVSDB for port and mirror changes");
        *connected = true;
    }
    loop {
        if wake.try_send(()).is_err() && wake.is_closed() {
            return Ok(());
        }
        client.next_update()?;
    }
}
