//! TCP flows over tunnel streams (PROTOCOL.md §13.4): each local TCP connection is one QUIC
//! stream, and bytes move between them with back-pressure on every hop. The reader task may
//! hold at most its credit, the writer's queue is bounded, and when that queue is full the
//! stream is not read, so QUIC flow control stalls the sender (see `flows.rs`).
//!
//! The agent opens streams and sends the preamble first; the connector takes a new stream
//! from the agent, reads its preamble and announces it, so the caller can reach the backend.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use ztna_proto::SessionId;
use ztna_proto::tunnel::StreamKind;

use crate::flows::{self, FlowEvent, FlowKey, FlowTasks, WriterMsg};
use crate::metrics::ClientMetrics;
use crate::path::Side;
use crate::tunnel::{Tunnel, stream_error};

/// One tunnelled TCP flow.
struct Flow {
    /// The local connection's tasks; the connector has none until the backend answers.
    tasks: Option<FlowTasks>,
    /// Bytes from the local side waiting for stream capacity.
    pending: VecDeque<Vec<u8>>,
    pending_offset: usize,
    local_eof: bool,
    fin_sent: bool,
    remote_done: bool,
    /// The writer's queue was full last time: read the QUIC stream again when it drains.
    read_blocked: bool,
    /// Agent: the stream preamble still has to go out. Connector: it has not arrived yet.
    preamble_pending: bool,
}

impl Flow {
    fn new(tasks: Option<FlowTasks>) -> Self {
        Flow {
            tasks,
            pending: VecDeque::new(),
            pending_offset: 0,
            local_eof: false,
            fin_sent: false,
            remote_done: false,
            read_blocked: false,
            preamble_pending: true,
        }
    }
}

/// The TCP flows of every tunnel of one client.
pub struct Streams {
    side: Side,
    flows: HashMap<FlowKey, Flow>,
    /// Where the flows' local tasks report.
    events: mpsc::UnboundedSender<FlowEvent>,
    metrics: Arc<ClientMetrics>,
    buf: Vec<u8>,
}

impl Streams {
    pub fn new(side: Side, events: mpsc::UnboundedSender<FlowEvent>, metrics: Arc<ClientMetrics>) -> Self {
        Streams { side, flows: HashMap::new(), events, metrics, buf: vec![0u8; flows::CHUNK] }
    }

    fn insert(&mut self, key: FlowKey, tasks: Option<FlowTasks>) {
        self.flows.insert(key, Flow::new(tasks));
        self.metrics.streams.inc();
        self.metrics.streams_total.inc();
    }

    /// Agent: a local connection becomes a new stream of the tunnel.
    pub fn open(&mut self, t: &mut Tunnel, stream: TcpStream) {
        let key = (t.session, t.open_stream());
        self.insert(key, Some(flows::spawn(key, stream, self.events.clone())));
        self.pump_writable(t);
    }

    /// Connector: the backend of an announced stream answered; bytes may flow both ways.
    pub fn attach(&mut self, t: Option<&mut Tunnel>, key: FlowKey, stream: TcpStream) {
        let Some(flow) = self.flows.get_mut(&key) else { return };
        flow.tasks = Some(flows::spawn(key, stream, self.events.clone()));
        if let Some(t) = t {
            self.stream_to_local(t, key);
            self.local_to_stream(t, key);
        }
    }

    /// What a flow's local tasks report.
    pub fn on_flow_event(&mut self, t: Option<&mut Tunnel>, event: FlowEvent) {
        match event {
            FlowEvent::Data(key, data) => {
                let Some(flow) = self.flows.get_mut(&key) else { return };
                flow.pending.push_back(data);
                if let Some(t) = t {
                    self.local_to_stream(t, key);
                }
            }
            FlowEvent::Eof(key) => {
                let Some(flow) = self.flows.get_mut(&key) else { return };
                flow.local_eof = true;
                if let Some(t) = t {
                    self.local_to_stream(t, key);
                }
            }
            FlowEvent::ReadFailed(key) | FlowEvent::WriteFailed(key) => self.reset(t, key, stream_error::TCP_RESET),
            FlowEvent::Drained(key) => {
                if let Some(t) = t
                    && self.flows.get(&key).is_some_and(|f| f.read_blocked)
                {
                    self.stream_to_local(t, key);
                }
            }
        }
    }

    /// QUIC -> local: reads the tunnel's readable streams whose writers have room. Returns
    /// the streams whose preamble arrived just now (connector), which want their backend.
    pub fn pump_readable(&mut self, t: &mut Tunnel) -> Vec<FlowKey> {
        let mut announced = Vec::new();
        let readable: Vec<u64> = t.conn.readable().collect();
        for id in readable {
            announced.extend(self.stream_to_local(t, (t.session, id)));
        }
        announced
    }

    /// Local -> QUIC: moves pending bytes of every flow of the tunnel into its streams.
    pub fn pump_writable(&mut self, t: &mut Tunnel) {
        let keys: Vec<FlowKey> = self.flows.keys().filter(|k| k.0 == t.session).copied().collect();
        for key in keys {
            self.local_to_stream(t, key);
        }
    }

    fn stream_to_local(&mut self, t: &mut Tunnel, key: FlowKey) -> Option<FlowKey> {
        let id = key.1;
        let connector = self.side == Side::Connector;
        if !self.flows.contains_key(&key) {
            // Only a client-initiated bidirectional stream (0, 4, 8, ...) is a new flow.
            if !connector || !id.is_multiple_of(4) {
                return None;
            }
            // A new stream from the agent: reach the backend first, read nothing until then.
            self.insert(key, None);
        }
        let flow = self.flows.get_mut(&key)?;
        if connector && flow.preamble_pending {
            let mut first = [0u8; 1];
            match t.conn.stream_recv(id, &mut first) {
                Ok((1, _)) if StreamKind::from_preamble(first[0]) == Ok(StreamKind::Tcp) => {
                    flow.preamble_pending = false;
                    return Some(key);
                }
                Ok(_) | Err(quiche::Error::StreamReset(_)) => {
                    let _ = t.conn.stream_shutdown(id, quiche::Shutdown::Read, stream_error::TCP_RESET);
                    let _ = t.conn.stream_shutdown(id, quiche::Shutdown::Write, stream_error::TCP_RESET);
                    self.remove(key);
                }
                Err(_) => {}
            }
            return None;
        }
        let tasks = flow.tasks.as_ref()?;
        let mut reset = false;
        loop {
            let Ok(permit) = tasks.writer.try_reserve() else {
                flow.read_blocked = true;
                return None;
            };
            match t.conn.stream_recv(id, &mut self.buf) {
                Ok((n, fin)) => {
                    self.metrics.bytes_from_peer.inc_by(n as u64);
                    permit.send(WriterMsg { data: self.buf[..n].to_vec(), fin });
                    if fin {
                        flow.remote_done = true;
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(quiche::Error::StreamReset(code)) => {
                    tracing::debug!(?key, code, "stream reset by peer");
                    drop(permit);
                    tasks.reset();
                    reset = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if reset {
            self.remove(key);
            return None;
        }
        flow.read_blocked = false;
        self.maybe_finish(key);
        None
    }

    fn local_to_stream(&mut self, t: &mut Tunnel, key: FlowKey) {
        let id = key.1;
        let Some(flow) = self.flows.get_mut(&key) else { return };
        if self.side == Side::Agent && flow.preamble_pending {
            match t.conn.stream_send(id, &[StreamKind::Tcp.preamble()], false) {
                Ok(1) => flow.preamble_pending = false,
                _ => return,
            }
        }
        while let Some(chunk) = flow.pending.front() {
            let rest = &chunk[flow.pending_offset..];
            match t.conn.stream_send(id, rest, false) {
                Ok(n) => {
                    self.metrics.bytes_to_peer.inc_by(n as u64);
                    flow.pending_offset += n;
                    if flow.pending_offset < chunk.len() {
                        break;
                    }
                    let done = flow.pending.pop_front().map_or(0, |c| c.len());
                    flow.pending_offset = 0;
                    // In QUIC now: the reader may buffer that much again.
                    if let Some(tasks) = &flow.tasks {
                        tasks.credit.add_permits(done);
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(quiche::Error::StreamStopped(_)) | Err(_) => {
                    // The peer no longer reads this stream: stop reading locally.
                    if let Some(tasks) = &flow.tasks {
                        tasks.reader.abort();
                    }
                    flow.pending.clear();
                    flow.local_eof = true;
                    flow.fin_sent = true;
                    break;
                }
            }
        }
        // The fin goes out as a zero-length write, usually after the data is already on the
        // wire. Stock quiche 0.30 could then collect the stream (dropping the fin) when the
        // data's ACK arrived before the fin was sent and the peer's fin had been read: the
        // peer saw every byte but never the end, and its local connection hung half-open.
        // The workspace patches quiche for this (vendor/quiche/ZTNA-PATCH.md).
        if flow.pending.is_empty() && flow.local_eof && !flow.fin_sent && t.conn.stream_send(id, &[], true).is_ok() {
            flow.fin_sent = true;
        }
        self.maybe_finish(key);
    }

    fn maybe_finish(&mut self, key: FlowKey) {
        if self.flows.get(&key).is_some_and(|f| f.fin_sent && f.remote_done) {
            self.remove(key);
        }
    }

    fn remove(&mut self, key: FlowKey) {
        if self.flows.remove(&key).is_some() {
            self.metrics.streams.dec();
        }
    }

    /// Resets a flow both ways (a side saw an error or went away); `t` is its tunnel, if it
    /// is still open.
    pub fn reset(&mut self, t: Option<&mut Tunnel>, key: FlowKey, code: u64) {
        if let Some(t) = t {
            let _ = t.conn.stream_shutdown(key.1, quiche::Shutdown::Read, code);
            let _ = t.conn.stream_shutdown(key.1, quiche::Shutdown::Write, code);
        }
        if let Some(tasks) = self.flows.get(&key).and_then(|f| f.tasks.as_ref()) {
            tasks.reset();
        }
        self.remove(key);
    }

    /// The session's tunnel is gone: its local connections are reset.
    pub fn reset_session(&mut self, session: SessionId) {
        let keys: Vec<FlowKey> = self.flows.keys().filter(|k| k.0 == session).copied().collect();
        for key in keys {
            self.reset(None, key, stream_error::TUNNEL_CLOSED);
        }
    }
}
