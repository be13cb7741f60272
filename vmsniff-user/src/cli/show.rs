//! `vmsniff show VM`: a VM's NICs with their OVS ports and sessions, and the path each NIC's
//! frames take on this host now, every hop checked.
use clap::Args;

use crate::{
    model::sources::Sources,
    service::{
        flags::NicArgs,
        inventory::{self, Hop, NicRow, ShownNic},
    },
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

pub async fn run(sources: &Sources, args: ShowArgs) -> anyhow::Result<()> {
    let shown = inventory::show(sources, &args.vm, args.nic.choice()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&shown.to_json())?);
        return Ok(());
    }
    let vm = &shown.vm;
    println!(
        "VM {} (domain {}, uuid {}, {})",
        vm.display_name(),
        vm.xml.name,
        vm.xml.uuid,
        vm.state.as_str()
    );
    for ShownNic { row, path } in &shown.nics {
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
    out.push_str(&format!("  sessions:     {}\n", row.sessions_cell()));
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
