//! Batched UDP, shared by the node's data path and the coordinator's relay.
//!
//! Both keep a non-blocking socket with quinn-udp's options set (GRO, ECN, packet info) and
//! large kernel buffers, wait for readiness with poll(2) on their own threads, receive up to
//! [`BATCH`] datagrams (each possibly a GRO run of equal-sized segments) per syscall, and send a
//! run of equal-sized datagrams to one destination with one GSO call.

use quinn_udp::UdpSockRef;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

pub use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

/// Datagrams per recvmmsg (quinn-udp's batch on Linux).
pub const BATCH: usize = quinn_udp::BATCH_SIZE;
/// Size of one receive buffer: one GRO run can be up to 64 KiB.
pub const GRO_BUF: usize = 65536;
/// Kernel buffer sizes tried in turn (the first the kernel accepts is kept; without privileges
/// it caps them at net.core.rmem_max / wmem_max).
const BUFFER_SIZES: [usize; 3] = [8 << 20, 4 << 20, 1 << 20];

/// Binds a UDP socket on `addr` and prepares it with [`prepare`].
pub fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, UdpSocketState)> {
    let domain = match addr {
        SocketAddr::V4(_) => socket2::Domain::IPV4,
        SocketAddr::V6(_) => socket2::Domain::IPV6,
    };
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    sock.bind(&addr.into())?;
    prepare(sock.into())
}

/// Sets quinn-udp's options and large buffers on `socket`, and makes it non-blocking
/// (quinn-udp's recvmmsg would otherwise wait for a whole batch): callers wait with
/// [`wait_ready`] and [`send`] retries a send that would block.
pub fn prepare(socket: UdpSocket) -> std::io::Result<(UdpSocket, UdpSocketState)> {
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    for size in BUFFER_SIZES {
        if state
            .set_recv_buffer_size(UdpSockRef::from(&socket), size)
            .is_ok()
        {
            break;
        }
    }
    for size in BUFFER_SIZES {
        if state
            .set_send_buffer_size(UdpSockRef::from(&socket), size)
            .is_ok()
        {
            break;
        }
    }
    socket.set_nonblocking(true)?;
    Ok((socket, state))
}

/// Waits until `socket` is ready for `events` (`libc::POLLIN`/`POLLOUT`) or `timeout_ms` passed.
pub fn wait_ready(socket: &UdpSocket, events: libc::c_short, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}

/// Receives up to `bufs.len()` datagrams without blocking; `Ok(0)` or `WouldBlock` when none
/// is queued.
pub fn recv(
    socket: &UdpSocket,
    state: &UdpSocketState,
    bufs: &mut [std::io::IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> std::io::Result<usize> {
    state.recv(UdpSockRef::from(socket), bufs, meta)
}

/// Sends a transmit; when the socket buffer is full, waits for room (back-pressure) instead of
/// dropping, for at most ~100 ms. A transmit with more segments than the socket's GSO takes is
/// sent in several calls.
pub fn send(socket: &UdpSocket, state: &UdpSocketState, t: &Transmit<'_>) -> std::io::Result<()> {
    let max = state.max_gso_segments().max(1);
    match t.segment_size {
        Some(seg) if seg > 0 && t.contents.len() > seg * max => {
            for part in t.contents.chunks(seg * max) {
                send_whole(
                    socket,
                    state,
                    &Transmit {
                        contents: part,
                        segment_size: (part.len() > seg).then_some(seg),
                        ..*t
                    },
                )?;
            }
            Ok(())
        }
        _ => send_whole(socket, state, t),
    }
}

fn send_whole(socket: &UdpSocket, state: &UdpSocketState, t: &Transmit<'_>) -> std::io::Result<()> {
    for _ in 0..10 {
        match state.try_send(UdpSockRef::from(socket), t) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait_ready(socket, libc::POLLOUT, 10);
            }
            r => return r,
        }
    }
    Err(std::io::ErrorKind::WouldBlock.into())
}

/// Sends a transmit if the socket buffer has room now; `WouldBlock` otherwise (for callers
/// that must not wait, such as async tasks).
pub fn try_send(
    socket: &UdpSocket,
    state: &UdpSocketState,
    t: &Transmit<'_>,
) -> std::io::Result<()> {
    state.try_send(UdpSockRef::from(socket), t)
}

/// Sends one datagram to `to`, with back-pressure like [`send`].
pub fn send_to(
    socket: &UdpSocket,
    state: &UdpSocketState,
    to: SocketAddr,
    data: &[u8],
) -> std::io::Result<()> {
    send(
        socket,
        state,
        &Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        },
    )
}

/// The segments of a received datagram: `len` bytes cut at `stride` (0: one segment).
pub fn segments(buf: &[u8], stride: usize) -> std::slice::Chunks<'_, u8> {
    buf.chunks(if stride == 0 {
        buf.len().max(1)
    } else {
        stride
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;

    #[test]
    fn a_gso_run_arrives_as_its_segments() {
        let (a, sa) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (b, sb) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = b.local_addr().unwrap();
        // 5 segments of 1000 bytes and a last one of 300, each filled with its index.
        let mut data = vec![];
        for i in 0..6u8 {
            let n = if i == 5 { 300 } else { 1000 };
            data.extend(std::iter::repeat_n(i, n));
        }
        send(
            &a,
            &sa,
            &Transmit {
                destination: to,
                ecn: None,
                contents: &data,
                segment_size: Some(1000),
                src_ip: None,
            },
        )
        .unwrap();
        let mut got: Vec<Vec<u8>> = vec![];
        let mut store = vec![vec![0u8; GRO_BUF]; BATCH];
        let mut meta = vec![RecvMeta::default(); BATCH];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 6 && std::time::Instant::now() < deadline {
            if !wait_ready(&b, libc::POLLIN, 100) {
                continue;
            }
            let mut iovs: Vec<IoSliceMut> = store.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let n = match recv(&b, &sb, &mut iovs, &mut meta) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("recv: {e}"),
            };
            drop(iovs);
            for (m, buf) in meta[..n].iter().zip(&store) {
                assert_eq!(m.addr, a.local_addr().unwrap());
                got.extend(segments(&buf[..m.len], m.stride).map(<[u8]>::to_vec));
            }
        }
        assert_eq!(got.len(), 6, "segments received: {}", got.len());
        for (i, s) in got.iter().enumerate() {
            assert_eq!(s.len(), if i == 5 { 300 } else { 1000 });
            assert!(
                s.iter().all(|&x| x == i as u8),
                "segment {i} out of order or mixed"
            );
        }
    }
}
