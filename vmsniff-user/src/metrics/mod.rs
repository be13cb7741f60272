//! `--metrics ADDR:PORT`: OpenMetrics text on `/metrics`, for `vmsniff daemon` (every session
//! of this node, read from the kernel at each scrape) and `vmsniff collect` (what it counted).
//! A front end like `cli` and `daemon`: it reads through the service layer and changes nothing.
//!
//! The endpoint is its own task on the runtime: a scrape waits at await points only (netlink,
//! the shared lock, libvirt and OVSDB on the blocking pool), so the daemon's loop goes on
//! hearing signals and link events while one runs.
pub mod collector;
pub mod hypervisor;

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::{net::TcpListener, sync::Semaphore};

/// The media type of the OpenMetrics text prometheus-client writes; Prometheus asks for it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A scrape that takes longer (vmsniff's lock held by a long attach, say) answers 503 rather
/// than outlive Prometheus's own scrape timeout (10 s by default).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(8);
/// Connections served at once; more are closed at once. Scrapers are few: this bounds what a
/// stray client can make vmsniff hold.
const MAX_CONNECTIONS: usize = 8;
/// A client that does not send its request headers within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error(
        "--metrics {addr}: the port is in use (`ss -ltnp 'sport = :{port}'` shows which process \
         listens there); choose another port",
        port = addr.port()
    )]
    InUse { addr: SocketAddr },
    #[error(
        "--metrics {addr}: that address is not one of this host's (`ip -br addr` lists them); give \
         one of its addresses, 127.0.0.1 or 0.0.0.0"
    )]
    NotLocal { addr: SocketAddr },
    #[error("--metrics {addr}: a port below 1024 needs CAP_NET_BIND_SERVICE; choose one above 1023")]
    Privileged { addr: SocketAddr },
    #[error("--metrics {addr}: cannot listen there")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Listens on `addr`; every error names the problem and the fix, and leaves nothing open.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| match source.raw_os_error() {
        Some(libc::EADDRINUSE) => MetricsError::InUse { addr },
        Some(libc::EADDRNOTAVAIL) => MetricsError::NotLocal { addr },
        Some(libc::EACCES) => MetricsError::Privileged { addr },
        _ => MetricsError::Listen { addr, source },
    })
}

/// What a scrape renders: the metrics text, or why there is none this time (a 503).
pub type Scrape = Arc<dyn Fn() -> BoxFuture<'static, Result<String, String>> + Send + Sync>;

/// Serves `/metrics` until the runtime ends. Errors of one connection end that connection.
pub async fn serve(listener: TcpListener, scrape: Scrape) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, say: the next accept may work; do not spin meanwhile.
            Err(e) => {
                log::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            log::debug!("metrics: {peer}: {MAX_CONNECTIONS} connections open already, closing this one");
            continue;
        };
        let scrape = Arc::clone(&scrape);
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, Arc::clone(&scrape)));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                log::debug!("metrics: {peer}: {e}");
            }
            drop(slot);
        });
    }
}

async fn respond(request: Request<Incoming>, scrape: Scrape) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, "vmsniff serves its metrics at /metrics\n".into()));
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "/metrics answers GET\n".into());
        response.headers_mut().insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let rendered = match tokio::time::timeout(SCRAPE_TIMEOUT, scrape()).await {
        Ok(rendered) => rendered,
        Err(_) => Err(format!(
            "reading the counters took over {} s (vmsniff's lock is held by a long attach or \
             detach); the next scrape tries again",
            SCRAPE_TIMEOUT.as_secs()
        )),
    };
    Ok(match rendered {
        Ok(text) => {
            let mut response = reply(StatusCode::OK, text);
            response.headers_mut().insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(OPENMETRICS));
            response
        }
        Err(why) => {
            log::warn!("metrics: scrape failed: {why}");
            reply(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
        }
    })
}

/// `vmsniff_build_info`: the version and the kernel/user ABI this binary speaks.
fn register_build_info(registry: &mut prometheus_client::registry::Registry) {
    registry.register(
        "vmsniff_build",
        "vmsniff's version and the ABI version of its eBPF maps",
        prometheus_client::metrics::info::Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("abi", vmsniff_ebpf::ABI_VERSION.to_string()),
        ]),
    );
}

/// The registry as OpenMetrics text, `# EOF` included.
fn encode(registry: &prometheus_client::registry::Registry) -> Result<String, String> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .map_err(|e| format!("encoding the metrics: {e}"))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_in_use_is_named_and_nothing_is_left_listening() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = first.local_addr().unwrap();
        let error = bind(addr).await.unwrap_err();
        assert!(matches!(error, MetricsError::InUse { .. }), "{error:?}");
        assert!(error.to_string().contains("choose another port"), "{error}");
        let error = bind("192.0.2.77:9466".parse().unwrap()).await.unwrap_err();
        assert!(matches!(error, MetricsError::NotLocal { .. }), "{error:?}");
    }

    #[test]
    fn build_info_is_an_info_metric() {
        let mut registry = prometheus_client::registry::Registry::default();
        register_build_info(&mut registry);
        let text = encode(&registry).unwrap();
        assert!(text.contains("# TYPE vmsniff_build info\n"), "{text}");
        assert!(
            text.contains(&format!(
                "vmsniff_build_info{{version=\"{}\",abi=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                vmsniff_ebpf::ABI_VERSION
            )),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
