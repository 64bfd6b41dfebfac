//! One listening socket, several single-threaded runtimes: each accepted connection goes to the
//! runtime ("lane") with the fewest live connections.
//!
//! With one `SO_REUSEPORT` listener per runtime the kernel spreads connections by a hash of
//! their addresses, so 64 keep-alive connections can land 40/24 on two runtimes and stay that
//! way: the busier runtime's queue sets the tail latency. Handing each accepted socket to the
//! least-loaded lane keeps them even, and a connection still never hops between threads once
//! it is running. The hand-off costs one channel send per connection, not per request.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::Listener;

type Handoff = (std::net::TcpStream, SocketAddr);

struct Lane {
    handoff: mpsc::UnboundedSender<Handoff>,
    live: Arc<AtomicUsize>,
}

/// Accepts on the shared socket and deals connections out to the lanes.
pub struct Acceptor {
    listener: tokio::net::TcpListener,
    lanes: Vec<Lane>,
}

/// A lane's source of connections: a [`Listener`] for [`crate::Sidecar::serve`] on that lane's
/// runtime.
pub struct LaneListener {
    handoff: mpsc::UnboundedReceiver<Handoff>,
    live: Arc<AtomicUsize>,
}

/// Splits `listener` into an [`Acceptor`] (drive [`Acceptor::run`] on any runtime) and `lanes`
/// listeners, one per runtime.
pub fn balanced(listener: tokio::net::TcpListener, lanes: usize) -> (Acceptor, Vec<LaneListener>) {
    let (senders, listeners) = (0..lanes.max(1))
        .map(|_| {
            let (handoff, receiver) = mpsc::unbounded_channel();
            let live = Arc::new(AtomicUsize::new(0));
            (
                Lane {
                    handoff,
                    live: live.clone(),
                },
                LaneListener {
                    handoff: receiver,
                    live,
                },
            )
        })
        .unzip();
    (
        Acceptor {
            listener,
            lanes: senders,
        },
        listeners,
    )
}

impl Acceptor {
    /// Accepts until every lane has stopped listening (the sidecar drains), then closes the
    /// listening socket.
    pub async fn run(self) {
        let Acceptor { listener, lanes } = self;
        let all_closed = async {
            for lane in &lanes {
                lane.handoff.closed().await;
            }
        };
        tokio::pin!(all_closed);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut all_closed => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors or a connection reset before accept: not fatal,
                        // but do not spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            let open = lanes.iter().filter(|l| !l.handoff.is_closed());
            let Some(lane) = open.min_by_key(|l| l.live.load(Ordering::Relaxed)) else {
                break;
            };
            // Counted from the hand-off, so a burst of accepts spreads before any lane runs.
            lane.live.fetch_add(1, Ordering::Relaxed);
            if lane.handoff.send((stream, peer)).is_err() {
                lane.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Listener for LaneListener {
    type Io = CountedStream;

    async fn accept(&mut self) -> io::Result<(Self::Io, SocketAddr)> {
        loop {
            let Some((stream, peer)) = self.handoff.recv().await else {
                // The acceptor is gone: nothing will ever arrive.
                return std::future::pending().await;
            };
            let counted = Counted(self.live.clone());
            // Registering with this lane's runtime; a socket that fails here is dropped.
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                continue;
            };
            // Small request/response exchanges must not wait for Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            return Ok((
                CountedStream {
                    stream,
                    _counted: counted,
                },
                peer,
            ));
        }
    }
}

/// Takes one connection off its lane's count when dropped.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection that counts on its lane while it lives.
pub struct CountedStream {
    stream: tokio::net::TcpStream,
    _counted: Counted,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_lane_and_leave_it_when_closed() {
        let (socket, addr) = listener().await;
        let (acceptor, mut lanes) = balanced(socket, 2);
        tokio::spawn(acceptor.run());

        // Six clients: the lanes take turns, whatever the kernel's hash would have said.
        let mut clients = Vec::new();
        let mut served = Vec::new();
        for i in 0..6 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let lane = i % 2;
            let (io, _) =
                tokio::time::timeout(std::time::Duration::from_secs(5), lanes[lane].accept())
                    .await
                    .expect("the least-loaded lane gets the connection")
                    .unwrap();
            served.push(io);
        }
        assert_eq!(lanes[0].live.load(Ordering::Relaxed), 3);
        assert_eq!(lanes[1].live.load(Ordering::Relaxed), 3);

        // Lane 0's connections end: the next three go to lane 0.
        for io in served.iter_mut().step_by(2) {
            io.shutdown().await.unwrap();
        }
        let mut kept: Vec<CountedStream> = Vec::new();
        for (i, io) in served.into_iter().enumerate() {
            if i % 2 == 1 {
                kept.push(io);
            }
        }
        assert_eq!(lanes[0].live.load(Ordering::Relaxed), 0);
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let (io, _) =
                tokio::time::timeout(std::time::Duration::from_secs(5), lanes[0].accept())
                    .await
                    .expect("lane 0 is the least loaded")
                    .unwrap();
            kept.push(io);
        }
        assert_eq!(lanes[0].live.load(Ordering::Relaxed), 3);

        // Bytes flow through a handed-off connection.
        let mut client = clients.pop().unwrap();
        let mut server = kept.pop().unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn the_listening_socket_closes_once_every_lane_stopped() {
        let (socket, addr) = listener().await;
        let (acceptor, lanes) = balanced(socket, 2);
        let running = tokio::spawn(acceptor.run());
        drop(lanes);
        tokio::time::timeout(std::time::Duration::from_secs(5), running)
            .await
            .expect("the acceptor stops")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "nothing listens any more"
        );
    }
}
