//! The relay's TCP/TLS fallback: while UDP to the relay goes unanswered (the engine says so),
//! relay frames go through an upgraded HTTPS connection to the coordinator, which the node
//! reaches anyway; it still reaches every peer.

use crate::coordinator::Api;
use crate::datapath::Datapath;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Bytes of relay frames written to, and read from, the TCP/TLS fallback at once.
const TCP_RELAY_BATCH: usize = 64 * 1024;

/// Waits for `failing` (the engine found UDP to the relay unanswered), then holds the fallback
/// until it breaks; again until `stop`.
pub async fn keep(api: Api, dp: Arc<Datapath>, failing: Arc<Notify>, stop: CancellationToken) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    loop {
        tokio::select! {
            _ = failing.notified() => {}
            _ = stop.cancelled() => return,
        }
        if dp.tcp_relay_active() {
            continue;
        }
        let Some(relay) = dp.engine.relay_udp_failing(std::time::Instant::now()) else {
            continue;
        };
        let up = match api.relay_over_tcp().await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "relay over TCP/TLS unavailable");
                continue;
            }
        };
        tracing::warn!(%relay, "UDP to the relay is blocked: relaying over TCP/TLS to the coordinator");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        dp.set_tcp_relay(Some((relay, tx)));
        let (r, mut w) = tokio::io::split(up);
        let writer = tokio::spawn(async move {
            // Datagrams queued meanwhile go out with the first one: one TLS record and one
            // write per batch, not per datagram.
            let mut batch =
                Vec::with_capacity(TCP_RELAY_BATCH + homeport_proto::relay::TCP_FRAME_MAX);
            while let Some(b) = rx.recv().await {
                batch.clear();
                let _ = homeport_proto::relay::tcp_frame(&mut batch, &b);
                while batch.len() < TCP_RELAY_BATCH {
                    let Ok(b) = rx.try_recv() else { break };
                    let _ = homeport_proto::relay::tcp_frame(&mut batch, &b);
                }
                if w.write_all(&batch).await.is_err() {
                    break;
                }
            }
        });
        let mut r = tokio::io::BufReader::with_capacity(TCP_RELAY_BATCH, r);
        let mut buf = vec![0u8; 65536];
        loop {
            // The whole frames already read go to the data path at once (one TUN write for
            // the batch); a frame cut by the buffer's end is read on its own.
            let avail = tokio::select! {
                a = r.fill_buf() => match a { Ok(a) if !a.is_empty() => a, _ => break },
                _ = stop.cancelled() => break,
            };
            let whole = homeport_proto::relay::tcp_frames_len(avail);
            if whole > 0 {
                dp.relay_input_frames(relay, &avail[..whole]);
                r.consume(whole);
                continue;
            }
            let mut len = [0u8; homeport_proto::relay::TCP_FRAME_HEADER];
            if r.read_exact(&mut len).await.is_err() {
                break;
            }
            let n = homeport_proto::relay::tcp_frame_len(len);
            if r.read_exact(&mut buf[..n]).await.is_err() {
                break;
            }
            dp.relay_input(relay, &buf[..n]);
        }
        writer.abort();
        dp.set_tcp_relay(None);
        tracing::warn!("relay over TCP/TLS ended");
    }
}
