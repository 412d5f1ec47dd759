//! The one `/metrics` endpoint of every binary (`--metrics-listen ADDR`).
//!
//! Each binary builds a [`Registry`] with the prefix `homeport_<role>` (role: coordinator, node,
//! exit; [`registry`]) and registers its metrics there: live ones (counters it updates) or a
//! [`Collector`] that reads its state at scrape time. Names follow Prometheus practice:
//! `homeport_<role>_<what>[_<unit>]`, counters end in `_total` (the client library appends it,
//! and the unit), and [`serve`] exposes the registry as OpenMetrics text at `GET /metrics`.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
pub use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
pub use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An empty registry whose metric names all start with `homeport_<role>_`.
pub fn registry(role: &str) -> Registry {
    Registry::with_prefix(format!("homeport_{role}"))
}

/// The registry as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut s = String::new();
    // Writing into a String fails only if a collector returns an error; what was written so
    // far is still worth serving.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut s, registry) {
        tracing::warn!(error = %e, "encoding metrics failed part way");
    }
    s
}

/// `GET /metrics` over `registry`; anything else is answered with what is served.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let r = registry.clone();
                async move { ([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], render(&r)) }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try GET /metrics\n") })
}

/// Binds `addr` for `--metrics-listen`; the error names the flag and the address.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))
}

/// Serves `registry` at `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, stop: CancellationToken) {
    if let Err(e) = axum::serve(listener, router(registry))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "metrics server failed");
    }
}

/// Writes one gauge from a collector.
pub fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

/// Writes one counter from a collector (the name without `_total`; the unit, if any, is
/// appended to the name).
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

/// Writes a gauge family (one sample per label set) from a collector.
pub fn gauge_family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a counter family (one sample per label set) from a collector.
pub fn counter_family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            gauge(&mut enc, "peers", "Peers", 3)?;
            counter_family(
                &mut enc,
                "peer_rx",
                "Bytes received per peer",
                Some(&Unit::Bytes),
                [([("peer", "home")], u64::MAX)],
            )
        }
    }

    /// The whole HTTP/1.1 response to `GET path`.
    async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_prefixed_names_with_units_and_total() {
        let mut r = registry("node");
        r.register_collector(Box::new(Fixed));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(l, Arc::new(r), stop.clone()));
        let body = http_get(addr, "/metrics").await;
        assert!(body.contains("homeport_node_peers 3"), "{body}");
        assert!(
            body.contains("homeport_node_peer_rx_bytes_total{peer=\"home\"} 18446744073709551615"),
            "{body}"
        );
        assert!(body.contains("# EOF"), "{body}");
        let other = http_get(addr, "/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        assert!(other.contains("try GET /metrics"), "{other}");
        stop.cancel();
        server.await.unwrap();
    }
}
