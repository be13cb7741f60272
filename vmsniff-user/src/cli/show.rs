//! `vmsniff show VM`: a VM's NICs with their OVS ports and sessions, and the path each NIC's
//! frames take on this host now, every hop checked.
use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::list::{read_ovs, read_sessions};
use crate::{
    observe::{
        inventory::{self, LIST_VERSION, NicRow, nic_row},
        path::{Hop, frame_path},
    },
    resolve::{
        domain::Nic,
        libvirt::Libvirt,
        select::{NicChoice, choose_nic, find_vm},
        vm::Sources,
    },
    service::flags::NicArgs,
    sys::netlink::Netlink,
};

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The VM: its Nova name, UUID, libvirt domain, MAC or tap.
    #[arg(value_name = "VM")]
    pub vm: String,

    /// Only this NIC (all of them otherwise).
    #[command(flatten)]
    pub nic: NicArgs,

    /// Print JSON (`{"version": 1, "vm": {...}, "nics": [...]}`) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ShownNic {
    #[serde(flatten)]
    row: NicRow,
    path: Vec<Hop>,
}

pub async fn run(sources: &Sources, args: ShowArgs) -> anyhow::Result<()> {
    let vms = Libvirt::open(sources.libvirt.clone())?.vms()?;
    let found = find_vm(&vms, &args.vm)?;
    let choice = args.nic.choice();
    let nics: Vec<&Nic> = if found.nic.is_some() || choice != NicChoice::Unspecified {
        vec![choose_nic(&args.vm, &found, choice)?]
    } else {
        found.vm.xml.nics.iter().collect()
    };
    let vm = found.vm;
    let ovs = read_ovs(sources, std::slice::from_ref(vm));
    let sessions = read_sessions();
    let netlink = Netlink::open().context("opening a netlink socket")?;
    let mut shown = Vec::new();
    for nic in nics {
        let row = nic_row(vm, nic, &ovs, sessions.as_ref());
        let path = if vm.state.has_taps() {
            frame_path(&netlink, nic, &ovs, row.ovs_port.as_ref()).await.context("reading the interfaces")?
        } else {
            Vec::new()
        };
        shown.push(ShownNic { row, path });
    }
    if args.json {
        let value = json!({
            "version": LIST_VERSION,
            "vm": {"nova-name": vm.nova_name(), "domain": vm.xml.name, "uuid": vm.xml.uuid, "state": vm.state},
            "nics": shown,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "VM {} (domain {}, uuid {}, {})",
        vm.display_name(),
        vm.xml.name,
        vm.xml.uuid,
        vm.state.as_str()
    );
    for ShownNic { row, path } in &shown {
        print!("{}", render_nic(row, path, vm.state.has_taps()));
    }
    Ok(())
}

fn render_nic(row: &NicRow, path: &[Hop], running: bool) -> String {
    let mut out = format!(
        "\nNIC {}  {}  tap {}  plug {}{}\n",
        row.nic,
        row.mac.map_or("-".into(), |m| m.to_string()),
        row.tap.as_deref().unwrap_or("-"),
        row.plug,
        row.bridge.as_deref().map(|b| format!(" (bridge {b})")).unwrap_or_default()
    );
    if let Some(port) = &row.port_id {
        out.push_str(&format!("  neutron port: {port}\n"));
    }
    if let Some(why) = row.cannot_mirror {
        out.push_str(&format!("  cannot be mirrored: {why}\n"));
    }
    if let Some(a) = &row.ovs_port {
        out.push_str(&format!(
            "  ovs port:     {} on {} (from {})\n",
            a.interface,
            a.bridge.as_deref().unwrap_or("?"),
            a.found_by.describe()
        ));
    }
    out.push_str(&format!("  sessions:     {}\n", inventory::sessions_cell(row)));
    if !running {
        out.push_str("  path:         none: the VM is not running, so its taps do not exist\n");
        return out;
    }
    if !path.is_empty() {
        out.push_str("  path (checked now):\n");
        let width = path.iter().map(|h| h.name.len()).max().unwrap_or(0);
        for hop in path {
            out.push_str(&format!(
                "    {:<8} {:<width$}  {:<18}  {}\n",
                hop.state.as_str(),
                hop.name,
                hop.role,
                hop.detail
            ));
        }
    }
    out
}
