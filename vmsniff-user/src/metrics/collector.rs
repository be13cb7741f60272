//! `vmsniff collect --metrics`: what the collector counted, per sender, key and direction, and
//! what it could not use, by reason. Series are bounded: streams by the stream table
//! (`--max-streams`), reasons by the decoder's fixed set.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use vmsniff_ebpf::Direction;

use std::sync::Arc;

use super::Scrape;
use crate::collect::stats::{SharedStats, Snapshot};

/// A scrape: the counts copied out of each shard under its lock (which its reading thread holds
/// between two blocks, for the copy only), encoded after they are released.
pub fn scrape(stats: SharedStats) -> Scrape {
    Arc::new(move || {
        let snapshot = stats.snapshot();
        Box::pin(async move { render(&snapshot) })
    })
}

/// One stream. `key` is the session's key K as on the wire (the session id unless `--key` was
/// given; a span id for ERSPAN, a plain mirror's GRE key): the hypervisor's metrics carry it
/// as `key` too, so the two ends join on (key, direction).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabels {
    sender: String,
    encap: &'static str,
    key: u32,
    /// `out`, `in`, or empty where the encapsulation does not say (a plain GRE mirror).
    direction: Option<&'static str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The metrics text of what the collector counted.
pub fn render(stats: &Snapshot) -> Result<String, String> {
    let stream_family = Family::<StreamLabels, Counter>::default;
    let (packets, bytes, lost, reordered, duplicates, restarts) = (
        stream_family(),
        stream_family(),
        stream_family(),
        stream_family(),
        stream_family(),
        stream_family(),
    );
    let undecodable = Family::<ReasonLabels, Counter>::default();
    let refused = Family::<ReasonLabels, Counter>::default();
    let (socket_drops, written) = (Counter::<u64>::default(), Counter::<u64>::default());
    let (streams, limit) = (Gauge::<i64>::default(), Gauge::<i64>::default());

    let mut registry = Registry::default();
    let r = &mut registry;
    r.register("vmsniff_collect_packets", "Copies received, per sender, key and direction", packets.clone());
    r.register("vmsniff_collect_bytes", "Bytes of the mirrored frames received", bytes.clone());
    r.register(
        "vmsniff_collect_lost",
        "Copies lost on the way: GRE sequence numbers never seen (streams with sequence numbers only)",
        lost.clone(),
    );
    r.register(
        "vmsniff_collect_reordered",
        "Copies that arrived after a higher sequence number",
        reordered.clone(),
    );
    r.register("vmsniff_collect_duplicates", "Sequence numbers that arrived twice", duplicates.clone());
    r.register(
        "vmsniff_collect_restarts",
        "Times a stream's numbers jumped far back: the hypervisor re-created the session",
        restarts.clone(),
    );
    r.register("vmsniff_collect_undecodable", "Packets that were no copies, by reason", undecodable.clone());
    r.register("vmsniff_collect_refused", "Copies refused, by reason: not-from (sender outside --from), stream-limit (a new stream with the stream table full), plain-gre (GRE without vmsniff's sequence numbers, not asked for with --plain-gre)", refused.clone());
    r.register("vmsniff_collect_socket_drops", "Packets this host's kernel dropped because the collector's socket buffer was full (they show as lost too)", socket_drops.clone());
    r.register("vmsniff_collect_written", "Copies written to the capture", written.clone());
    r.register("vmsniff_collect_streams", "Streams counted now", streams.clone());
    r.register(
        "vmsniff_collect_stream_limit",
        "Streams counted at most; copies of more are refused",
        limit.clone(),
    );
    super::register_build_info(r);

    for (key, counts) in &stats.streams {
        let labels = StreamLabels {
            sender: key.sender.to_string(),
            encap: key.kind.as_str(),
            key: key.session,
            direction: key.direction.map(Direction::as_str),
        };
        packets.get_or_create(&labels).inc_by(counts.packets);
        bytes.get_or_create(&labels).inc_by(counts.bytes);
        // Without sequence numbers nothing can be told lost: no series rather than a false 0.
        if counts.sequenced {
            lost.get_or_create(&labels).inc_by(counts.lost);
            reordered.get_or_create(&labels).inc_by(counts.reordered);
            duplicates.get_or_create(&labels).inc_by(counts.duplicates);
            restarts.get_or_create(&labels).inc_by(counts.restarts);
        }
    }
    for (why, n) in &stats.undecodable {
        undecodable.get_or_create(&ReasonLabels { reason: reason_label(&why.to_string()) }).inc_by(*n);
    }
    for (reason, n) in [
        ("not-from", stats.ignored),
        ("stream-limit", stats.refused_streams),
        ("plain-gre", stats.refused_plain),
    ] {
        refused.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc_by(n);
    }
    socket_drops.inc_by(stats.socket_drops);
    written.inc_by(stats.written);
    streams.set(i64::try_from(stats.streams.len()).unwrap_or(i64::MAX));
    limit.set(i64::try_from(stats.max_streams).unwrap_or(i64::MAX));
    super::encode(&registry)
}

/// A reason's message as a label value: `truncated GRE header` → `truncated-gre-header`. The
/// reasons are the decoder's fixed set, so the values are too.
fn reason_label(message: &str) -> String {
    message
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;
    use crate::collect::{
        decode::{Kind, Undecodable},
        stats::{Stats, StreamKey},
    };

    fn key(session: u32, direction: Option<Direction>, kind: Kind) -> StreamKey {
        StreamKey { sender: Ipv4Addr::new(192, 0, 2, 1).into(), kind, session, direction }
    }

    #[test]
    fn streams_reasons_and_refusals_are_labelled() {
        let mut stats = Stats::default();
        for seq in [1, 2, 4] {
            stats.copy(key(7, Some(Direction::Out), Kind::VmsniffGre), 100, Some(seq));
        }
        stats.copy(key(77, None, Kind::PlainGre), 60, None);
        stats.undecodable(Undecodable::TruncatedGre);
        stats.undecodable(Undecodable::TruncatedGre);
        stats.ignored = 3;
        stats.refused_plain = 4;
        stats.socket_drops = BTreeMap::from([(0, 2)]);
        let text = render(&stats.snapshot()).unwrap();
        let stream = r#"{sender="192.0.2.1",encap="gre",key="7",direction="out"}"#;
        for line in [
            format!("vmsniff_collect_packets_total{stream} 3"),
            format!("vmsniff_collect_bytes_total{stream} 300"),
            format!("vmsniff_collect_lost_total{stream} 1"),
            format!("vmsniff_collect_reordered_total{stream} 0"),
            r#"vmsniff_collect_packets_total{sender="192.0.2.1",encap="plain-gre",key="77",direction=""} 1"#
                .into(),
            r#"vmsniff_collect_undecodable_total{reason="truncated-gre-header"} 2"#.into(),
            r#"vmsniff_collect_refused_total{reason="not-from"} 3"#.into(),
            r#"vmsniff_collect_refused_total{reason="stream-limit"} 0"#.into(),
            r#"vmsniff_collect_refused_total{reason="plain-gre"} 4"#.into(),
            "vmsniff_collect_socket_drops_total 2".into(),
            "vmsniff_collect_streams 2".into(),
            "vmsniff_collect_stream_limit 4096".into(),
            "# TYPE vmsniff_collect_lost counter".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(
            !text.contains(r#"vmsniff_collect_lost_total{sender="192.0.2.1",encap="plain-gre""#),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_spray_of_keys_stays_within_the_stream_limit() {
        let mut stats = Stats::with_limit(100);
        for session in 0..200 {
            stats.copy(key(session, Some(Direction::In), Kind::VmsniffGre), 60, Some(0));
        }
        let text = render(&stats.snapshot()).unwrap();
        let series = text.lines().filter(|l| l.starts_with("vmsniff_collect_packets_total{")).count();
        assert_eq!(series, 100);
        for line in [
            r#"vmsniff_collect_refused_total{reason="stream-limit"} 100"#,
            "vmsniff_collect_stream_limit 100",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}");
        }
    }

    #[test]
    fn reasons_become_label_values() {
        assert_eq!(reason_label("truncated GRE header"), "truncated-gre-header");
        assert_eq!(
            reason_label("GRE version or routing not supported"),
            "gre-version-or-routing-not-supported"
        );
        assert_eq!(reason_label("ERSPAN frame type not Ethernet"), "erspan-frame-type-not-ethernet");
    }
}
