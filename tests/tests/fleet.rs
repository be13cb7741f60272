//! The fleet: mirrors declared in a real etcd (Debian's etcd-server on 127.0.0.1, its own data
//! directory and ports) and kept by nodes' daemons, each node a network namespace with its own
//! run directory, tap and libvirt test-driver XML.
// Test code throughout: helpers outside `#[test]` functions fail the test by panicking too.
#![expect(clippy::expect_used, reason = "a failed step fails the test")]

use serde_json::Value;
use vmsniff_tests::{etcd::Etcd, netns::Netns, privileged_on_host, vmsniff};

const HOST_ONLY: &str = "the fleet's control plane (etcd, libvirt, the daemon's loop) is user space";

/// `vmsniff fleet ARGS` against `etcd`, run in `ns`.
fn fleet_args<'a>(etcd: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["fleet", "--endpoints", etcd];
    all.extend_from_slice(args);
    all
}

fn status(ns: &Netns, etcd: &str) -> Value {
    let out = vmsniff::ok(ns, &fleet_args(etcd, &["status", "--json"]));
    serde_json::from_str(&out).expect("fleet status --json is JSON")
}

#[test]
fn cli_declares_with_unique_keys_and_refuses_bad_input_writing_nothing() {
    if !privileged_on_host("cli_declares_with_unique_keys_and_refuses_bad_input_writing_nothing", HOST_ONLY) {
        return;
    }
    let Some(etcd) = Etcd::start() else { return };
    let ctl = Netns::new("ctl");
    etcd.reach_from(&ctl);
    let ep = etcd.endpoint();
    let ep = ep.as_str();
    // Keys: the lowest free one, a given one, gaps filled again after a removal.
    assert_eq!(
        vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "web", "c-private", "--to", "192.0.2.2"])).trim(),
        "1"
    );
    assert_eq!(
        vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "db", "c-web", "--to", "192.0.2.2", "--key", "5"]))
            .trim(),
        "5"
    );
    assert_eq!(
        vmsniff::ok(&ctl, &fleet_args(ep, &["mirror", "app", "c-dup", "--to", "192.0.2.2"])).trim(),
        "2"
    );
    vmsniff::ok(&ctl, &fleet_args(ep, &["rm", "web"]));
    assert_eq!(
        vmsniff::ok(
            &ctl,
            &fleet_args(ep, &["mirror", "web2", "c-private", "--to", "192.0.2.2", "--encap", "erspan"])
        )
        .trim(),
        "1"
    );
    vmsniff::ok(&ctl, &fleet_args(ep, &["update", "db", "--filter", "tcp port 443", "--snaplen", "96"]));
    let s = status(&ctl, ep);
    let db = s["mirrors"].as_array().unwrap().iter().find(|m| m["name"] == "db").unwrap();
    assert_eq!(db["key"], 5);
    assert!(db["args"].to_string().contains("tcp port 443"), "{db}");
    assert_eq!(db["state"], "waiting-for-vm", "no node runs it: {db}");

    // Every refusal names the problem and the fix and leaves etcd's revision where it was.
    let before = etcd.revision();
    let bad = "127.0.0.1:1";
    let cacert = etcd.dir.join("not-a-ca.pem");
    std::fs::write(&cacert, "not a certificate").unwrap();
    let cacert = cacert.to_string_lossy().into_owned();
    for (args, expected) in [
        (
            fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--key", "5"]),
            "key 5 is held by fleet mirror db",
        ),
        (fleet_args(ep, &["mirror", "db", "c-x", "--to", "192.0.2.2"]), "fleet mirror db exists already"),
        (fleet_args(ep, &["mirror", "x", "tapf7eae624-34", "--to", "192.0.2.2"]), "taps are per node"),
        (fleet_args(ep, &["mirror", "x", "--tap", "tap0", "--to", "192.0.2.2"]), "taps are per node"),
        (fleet_args(ep, &["mirror", "a/b", "c-x", "--to", "192.0.2.2"]), "use 1 to 64 letters"),
        (
            fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--filter", "tcp port"]),
            "can't parse filter",
        ),
        (fleet_args(ep, &["mirror", "x", "c-x", "--to", "192.0.2.2", "--direction", "sideways"]), "sideways"),
        (fleet_args(ep, &["update", "db"]), "nothing to change"),
        (fleet_args(ep, &["update", "nope", "--filter", "tcp"]), "no fleet mirror nope"),
        (fleet_args(ep, &["rm", "nope"]), "no fleet mirror nope"),
        (fleet_args(bad, &["mirror", "x", "c-x", "--to", "192.0.2.2"]), "cannot reach etcd at 127.0.0.1:1"),
        (fleet_args(ep, &["--cacert", "/nonexistent/ca.pem", "status"]), "cannot read the CA certificate"),
        (fleet_args(ep, &["--cacert", &cacert, "mirror", "x", "c-x", "--to", "192.0.2.2"]), "--cacert"),
        (fleet_args(ep, &["--prefix", "vmsniff/", "status"]), "key prefix"),
    ] {
        let err = vmsniff::fails(&ctl, &args);
        assert!(err.contains(expected), "vmsniff {}: expected {expected:?} in:\n{err}", args.join(" "));
    }
    assert_eq!(etcd.revision(), before, "a refused command wrote to etcd");
    // ETCDCTL_* is read as etcdctl reads it.
    let out = ctl.sh(&format!("ETCDCTL_ENDPOINTS={ep} {} fleet status", vmsniff::binary().display()));
    assert!(out.contains("db") && out.contains("web2"), "{out}");
}
