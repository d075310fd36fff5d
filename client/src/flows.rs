//! Local ends of tunnelled flows: a task that reads a TCP socket and one that writes it,
//! talking to the engine through messages. Memory per flow is bounded: the reader may hold
//! at most [`READ_CREDIT`] bytes the engine has not yet put into QUIC, and the writer's
//! queue holds at most [`WRITE_QUEUE`] chunks (the engine stops reading the QUIC stream when
//! it is full, so QUIC flow control stalls the sender).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore, mpsc};
use ztna_proto::SessionId;

/// A TCP flow: the session's tunnel and the QUIC stream id.
pub type FlowKey = (SessionId, u64);

pub const CHUNK: usize = 32 * 1024;
pub const READ_CREDIT: usize = 4 * CHUNK;
pub const WRITE_QUEUE: usize = 8;

/// From flow tasks to the engine.
#[derive(Debug)]
pub enum FlowEvent {
    Data(FlowKey, Vec<u8>),
    Eof(FlowKey),
    ReadFailed(FlowKey),
    /// The writer finished a chunk: the engine may read more from the QUIC stream.
    Drained(FlowKey),
    WriteFailed(FlowKey),
}

impl FlowEvent {
    pub fn key(&self) -> FlowKey {
        match self {
            FlowEvent::Data(key, _)
            | FlowEvent::Eof(key)
            | FlowEvent::ReadFailed(key)
            | FlowEvent::Drained(key)
            | FlowEvent::WriteFailed(key) => *key,
        }
    }
}

/// From the engine to a flow's writer task: bytes, then `fin` once the peer finished
/// sending (half-close our side).
#[derive(Debug)]
pub struct WriterMsg {
    pub data: Vec<u8>,
    pub fin: bool,
}

pub struct FlowTasks {
    pub writer: mpsc::Sender<WriterMsg>,
    pub credit: Arc<Semaphore>,
    pub reader: tokio::task::AbortHandle,
    /// Reset the TCP connection (RST, not FIN); never lost, even when the queue is full.
    pub reset: Arc<Notify>,
}

impl FlowTasks {
    /// The peer reset the stream, or the flow is being torn down.
    pub fn reset(&self) {
        self.reader.abort();
        self.reset.notify_one();
    }
}

/// Starts the reader and writer tasks of one TCP connection.
pub fn spawn(key: FlowKey, stream: tokio::net::TcpStream, events: mpsc::UnboundedSender<FlowEvent>) -> FlowTasks {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let credit = Arc::new(Semaphore::new(READ_CREDIT));
    let (writer, writer_rx) = mpsc::channel(WRITE_QUEUE);
    let reset = Arc::new(Notify::new());
    let reader = tokio::spawn(read_loop(key, rd, credit.clone(), events.clone())).abort_handle();
    tokio::spawn(write_loop(key, wr, writer_rx, reset.clone(), events));
    FlowTasks { writer, credit, reader, reset }
}

async fn read_loop(
    key: FlowKey,
    mut rd: OwnedReadHalf,
    credit: Arc<Semaphore>,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Wait until the engine has room for a whole chunk before reading it.
        let Ok(permit) = credit.acquire_many(CHUNK as u32).await else { return };
        let event = match rd.read(&mut buf).await {
            Ok(0) => FlowEvent::Eof(key),
            Ok(n) => {
                permit.forget();
                // Give back what this read did not use; the engine returns the rest later.
                credit.add_permits(CHUNK - n);
                FlowEvent::Data(key, buf[..n].to_vec())
            }
            Err(_) => FlowEvent::ReadFailed(key),
        };
        let last = !matches!(event, FlowEvent::Data(..));
        if events.send(event).is_err() || last {
            return;
        }
    }
}

async fn write_loop(
    key: FlowKey,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<WriterMsg>,
    reset: Arc<Notify>,
    events: mpsc::UnboundedSender<FlowEvent>,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = reset.notified() => {
                // Linger 0 makes close send RST, so the local application sees a reset.
                // (The deprecation is about blocking on a non-zero linger; zero never blocks.)
                #[allow(deprecated)]
                let _ = wr.as_ref().set_linger(Some(Duration::ZERO));
                // Dropping a write half would send FIN first; forget it so the socket closes
                // (with RST) once the reader, aborted by the engine, lets go of its half.
                wr.forget();
                return;
            }
            m = rx.recv() => match m {
                Some(m) => m,
                None => return,
            },
        };
        if !msg.data.is_empty() && wr.write_all(&msg.data).await.is_err() {
            let _ = events.send(FlowEvent::WriteFailed(key));
            return;
        }
        if msg.fin {
            let _ = wr.shutdown().await;
        }
        let _ = events.send(FlowEvent::Drained(key));
    }
}

/// Closes a local TCP connection with RST, so its application sees a reset, not an orderly end.
pub fn reset_local(stream: tokio::net::TcpStream) {
    // Linger 0 never blocks (the deprecation is about non-zero values).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}
