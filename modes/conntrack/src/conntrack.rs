//! The ctnetlink socket: listing a table and deleting entries.

use std::io;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use kproxy_model::{IpFamily, Protocol};
use kproxy_netlink::message::put_message;
use kproxy_netlink::sys::{NETLINK_NETFILTER, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use kproxy_netlink::{AckReader, Codec, DumpError, DumpReader, Frame, NlSocket};

use crate::error::Error;
use crate::filter::{Filter, FilterSet};
use crate::flow::Flow;
use crate::message::{CtMessage, ct_type};
use crate::sys::*;

/// Deletes sent in one datagram. Each is acked separately, and the acks of a
/// batch must fit the socket's default receive buffer at once.
const DELETE_BATCH: usize = 64;

/// A ctnetlink socket.
///
/// It works on the conntrack table of the network namespace the calling thread
/// was in when [`Conntrack::new`] ran, wherever it is used afterwards. Calls
/// block (each wait for the kernel is bounded by a timeout); async code should
/// run them on a blocking thread. Concurrent calls are serialised.
pub struct Conntrack {
    socket: Mutex<NlSocket>,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("port", &self.lock().port())
            .finish_non_exhaustive()
    }
}

impl Conntrack {
    pub fn new() -> Result<Self, Error> {
        let socket = NlSocket::open(NETLINK_NETFILTER).map_err(Error::Socket)?;
        Ok(Conntrack {
            socket: Mutex::new(socket),
        })
    }

    /// Every entry of one family's table.
    pub fn flows(&self, family: IpFamily) -> Result<Vec<Flow>, Error> {
        let mut flows = Vec::new();
        dump(&mut self.lock(), family, |flow| flows.push(flow))?;
        Ok(flows)
    }

    /// Deletes these entries, and returns how many the kernel deleted. An entry
    /// that is gone already (expired, or deleted by someone else) is not an
    /// error; it is just not counted.
    pub fn delete(&self, flows: &[Flow]) -> Result<usize, Error> {
        delete(&mut self.lock(), flows)
    }

    /// Deletes every entry of `family` that matches any of `filters`, with one
    /// listing of the table, and returns how many were deleted.
    ///
    /// A controller gathers the filters of a whole sync and calls this once per
    /// family, after the new rules are in the kernel: deleting earlier would
    /// let the next packet recreate an entry towards the old endpoint.
    pub fn clear(&self, family: IpFamily, filters: &[Filter]) -> Result<usize, Error> {
        if filters.is_empty() {
            return Ok(0);
        }
        let set = FilterSet::new(filters);
        let mut socket = self.lock();
        let mut doomed = Vec::new();
        dump(&mut socket, family, |flow| {
            if set.matches(&flow) {
                doomed.push(flow);
            }
        })?;
        tracing::debug!(%family, matched = doomed.len(), "deleting conntrack entries");
        delete(&mut socket, &doomed)
    }

    /// Deletes the UDP entries sent to a service address (ClusterIP, external
    /// IP or load-balancer IP) and port, whatever endpoint they reached: when a
    /// service gets its first endpoint, those entries were blackholing clients.
    pub fn clear_service(&self, ip: IpAddr, port: u16) -> Result<usize, Error> {
        self.clear(
            IpFamily::of(&ip),
            &[Filter::service(Protocol::Udp, ip, port)],
        )
    }

    /// Deletes the UDP entries sent to a service address and port that were
    /// DNATed to `endpoint`: when that endpoint goes away.
    pub fn clear_service_endpoint(
        &self,
        ip: IpAddr,
        port: u16,
        endpoint: IpAddr,
    ) -> Result<usize, Error> {
        self.clear(
            IpFamily::of(&ip),
            &[Filter::service(Protocol::Udp, ip, port).to_endpoint(endpoint)],
        )
    }

    /// Deletes the UDP entries of `family` sent to `node_port` on any address.
    pub fn clear_node_port(&self, family: IpFamily, node_port: u16) -> Result<usize, Error> {
        self.clear(family, &[Filter::node_port(Protocol::Udp, node_port)])
    }

    /// Deletes the UDP entries sent to `node_port` on any address that were
    /// DNATed to `endpoint`.
    pub fn clear_node_port_endpoint(
        &self,
        node_port: u16,
        endpoint: IpAddr,
    ) -> Result<usize, Error> {
        self.clear(
            IpFamily::of(&endpoint),
            &[Filter::node_port(Protocol::Udp, node_port).to_endpoint(endpoint)],
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NlSocket> {
        // The state behind the lock is a socket and a counter: still usable
        // after a panic elsewhere.
        self.socket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Lists one family's table, handing each entry to `each`.
fn dump(socket: &mut NlSocket, family: IpFamily, mut each: impl FnMut(Flow)) -> Result<(), Error> {
    let seq = socket.next_seq();
    let mut request = Vec::new();
    put_message(
        &mut request,
        ct_type(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &CtMessage::dump(family),
    );
    socket.send(&request)?;
    let mut answers = DumpReader::new(seq, socket.port());
    let mut entry = |frame: Frame<'_>| {
        if frame.kind == ct_type(IPCTNL_MSG_CT_NEW) || frame.kind == ct_type(IPCTNL_MSG_CT_GET) {
            each(CtMessage::decode(frame.payload, "conntrack entry")?.into_flow()?);
        }
        Ok(())
    };
    socket.recv_until(|datagram| match answers.feed(datagram, &mut entry) {
        Ok(over) => Ok(over.then_some(())),
        Err(DumpError::Decode(e)) => Err(Error::Decode(e)),
        Err(DumpError::Failed(errno)) => Err(Error::Dump {
            family,
            source: io::Error::from_raw_os_error(errno),
        }),
    })
}

fn delete(socket: &mut NlSocket, flows: &[Flow]) -> Result<usize, Error> {
    let mut deleted = 0;
    let mut failed = 0;
    let mut first_error = None;
    for batch in flows.chunks(DELETE_BATCH) {
        let first_seq = socket.next_seqs(batch.len());
        let mut request = Vec::with_capacity(batch.len() * 128);
        for (i, flow) in batch.iter().enumerate() {
            put_message(
                &mut request,
                ct_type(IPCTNL_MSG_CT_DELETE),
                NLM_F_REQUEST | NLM_F_ACK,
                first_seq.wrapping_add(i as u32),
                &CtMessage::delete(flow),
            );
        }
        socket.send(&request)?;
        let mut acks = AckReader::new(first_seq, socket.port(), 0..batch.len());
        socket.recv_until(|datagram| {
            acks.feed(datagram, |index, ack| match ack.errno {
                0 => deleted += 1,
                libc::ENOENT => {}
                errno => {
                    failed += 1;
                    tracing::debug!(flow = %batch[index], errno, "conntrack delete refused");
                    first_error.get_or_insert(io::Error::from_raw_os_error(errno));
                }
            })?;
            Ok::<_, Error>(acks.done().then_some(()))
        })?;
    }
    match first_error {
        Some(source) => Err(Error::Delete {
            deleted,
            failed,
            source,
        }),
        None => Ok(deleted),
    }
}
