//! Scraping a `--metrics` endpoint the way Prometheus does, over plain HTTP from inside a
//! test's namespace, and reading the OpenMetrics text back.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use crate::netns::Netns;

/// One sample: the series' name, its labels, its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `GET /metrics` on 127.0.0.1:`port` in `ns`: the HTTP status line, the headers, the body.
pub fn get(ns: &Netns, port: u16, path: &str) -> (String, String, String) {
    let path = path.to_owned();
    let response = ns.enter(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read the response");
        response
    });
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// Scrapes /metrics, asserting a 200 with OpenMetrics text, and parses the samples.
pub fn scrape(ns: &Netns, port: u16) -> Vec<Sample> {
    let (status, headers, body) = get(ns, port, "/metrics");
    assert!(status.ends_with("200 OK"), "scrape: {status}\n{body}");
    assert!(headers.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{headers}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF:\n{body}");
    parse(&body)
}

/// The samples of OpenMetrics text (label values without escapes, as vmsniff's are).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|l| !l.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Sample { name: name.to_owned(), labels, value: value.parse().expect("a number") }
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`; panics naming what
/// was there when there is not exactly one.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name} {labels:?}: {} samples; those named {name}: {:#?}",
        found.len(),
        samples.iter().filter(|s| s.name == name).collect::<Vec<_>>()
    );
    found[0].value as u64
}
