//! The IPVS generic netlink socket: family lookup, dumps and batched changes.

use std::sync::{Mutex, MutexGuard, PoisonError};

use kproxy_netlink::NlSocket;

use crate::error::Error;
use crate::netlink::answers::{AckReader, DumpReader, FamilyReader, ReplyReader};
use crate::netlink::codec::DecodeError;
use crate::netlink::frame::{put_family_request, put_request};
use crate::netlink::message::{Command, IpvsMessage, ServiceAttrs, TimeoutAttrs, af_of};
use crate::netlink::op::{BatchReport, Op, split_batches};
use crate::netlink::sys::*;
use crate::types::{Destination, Timeouts, VirtualServer, VirtualServerKey};

/// Asked of the kernel for the socket's buffers (it doubles them). Raising
/// the limits needs CAP_NET_ADMIN, which IPVS needs anyway; without it the
/// system's defaults apply and batches are smaller.
const RCVBUF_WANTED: libc::c_int = 4 << 20;
const SNDBUF_WANTED: libc::c_int = 1 << 20;
/// A datagram of requests is copied into one kernel buffer; beyond this,
/// larger datagrams save little and cost a large allocation.
const MAX_DATAGRAM: usize = 256 * 1024;
/// What one ack costs in the receive buffer: the kernel charges an skb's
/// truesize, several hundred bytes for a 36-byte capped ack and more with an
/// extended-ack text, so this is a safe ceiling. The kernel answers a whole
/// datagram before kproxy reads any of it, and answers that do not fit are
/// dropped.
const ACK_COST: usize = 2048;

/// A client of the kernel's IPVS over generic netlink.
///
/// It works on the IPVS tables of the network namespace the calling thread
/// was in when [`IpvsClient::new`] ran. Calls block (each wait for the kernel
/// is bounded by a timeout); async code should run them on a blocking thread.
/// Concurrent calls are serialised.
pub struct IpvsClient {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for IpvsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("IpvsClient")
            .field("family", &inner.family)
            .field("port", &inner.socket.port())
            .field("max_datagram", &inner.max_bytes)
            .field("max_requests", &inner.max_requests)
            .finish_non_exhaustive()
    }
}

struct Inner {
    socket: NlSocket,
    family: u16,
    max_bytes: usize,
    max_requests: usize,
}

impl IpvsClient {
    /// Opens the socket and looks up the IPVS family. Fails with
    /// [`Error::IpvsFamilyMissing`] when the ip_vs module is not loaded.
    pub fn new() -> Result<Self, Error> {
        let socket = NlSocket::open(NETLINK_GENERIC).map_err(Error::IpvsSocket)?;
        // The kernel's reason in words, where it gives one; without it (before
        // 4.12), errors just lack the text.
        let _ = socket.set_ext_ack();
        let rcvbuf = socket
            .grow_recv_buffer(RCVBUF_WANTED)
            .map_err(Error::IpvsSocket)?;
        let sndbuf = socket
            .grow_send_buffer(SNDBUF_WANTED)
            .map_err(Error::IpvsSocket)?;
        let mut inner = Inner {
            socket,
            family: 0,
            // netlink_sendmsg refuses datagrams above the send buffer less 32.
            max_bytes: MAX_DATAGRAM.min(sndbuf.saturating_sub(32)),
            max_requests: (rcvbuf / ACK_COST).max(1),
        };
        inner.family = inner.resolve_family()?;
        tracing::debug!(
            family = inner.family,
            rcvbuf,
            sndbuf,
            max_requests = inner.max_requests,
            "IPVS netlink client ready"
        );
        Ok(IpvsClient {
            inner: Mutex::new(inner),
        })
    }

    /// The IPVS generic netlink family id the kernel gave.
    pub fn family_id(&self) -> u16 {
        self.lock().family
    }

    /// Every virtual server. Those kproxy cannot describe (firewall marks,
    /// schedulers it does not support) are logged and left out.
    pub fn services(&self) -> Result<Vec<VirtualServer>, Error> {
        let mut out = Vec::new();
        let mut bad = None;
        self.lock()
            .dump(&IpvsMessage::new(Command::GetService), |msg| {
                let Some(attrs) = msg.service else {
                    bad.get_or_insert(DecodeError::Missing("IPVS_CMD_ATTR_SERVICE"));
                    return;
                };
                match VirtualServer::try_from(&attrs) {
                    Ok(vs) => out.push(vs),
                    Err(reason) => tracing::warn!(
                        service = %attrs,
                        %reason,
                        "ignoring an IPVS virtual server kproxy cannot describe"
                    ),
                }
            })?;
        match bad {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    /// The destinations of one virtual server; none if it does not exist.
    pub fn destinations(&self, key: &VirtualServerKey) -> Result<Vec<Destination>, Error> {
        let af = af_of(&key.addr);
        let request = IpvsMessage::new(Command::GetDest).with_service(ServiceAttrs::from(key));
        let mut out = Vec::new();
        let mut bad = None;
        self.lock().dump(&request, |msg| {
            let Some(attrs) = msg.dest else {
                bad.get_or_insert(DecodeError::Missing("IPVS_CMD_ATTR_DEST"));
                return;
            };
            match attrs.to_destination(af) {
                Ok(dest) => out.push(dest),
                Err(reason) => tracing::warn!(
                    service = %key,
                    dest = %attrs,
                    %reason,
                    "ignoring an IPVS destination kproxy cannot describe"
                ),
            }
        })?;
        match bad {
            Some(e) => Err(e.into()),
            None => Ok(out),
        }
    }

    pub fn add_service(&self, vs: &VirtualServer) -> Result<(), Error> {
        self.apply_one(Op::AddService(vs.clone()))
    }

    pub fn update_service(&self, vs: &VirtualServer) -> Result<(), Error> {
        self.apply_one(Op::UpdateService(vs.clone()))
    }

    pub fn delete_service(&self, key: &VirtualServerKey) -> Result<(), Error> {
        self.apply_one(Op::DeleteService(*key))
    }

    pub fn add_destination(&self, key: &VirtualServerKey, dest: &Destination) -> Result<(), Error> {
        self.apply_one(Op::AddDest(*key, dest.clone()))
    }

    pub fn update_destination(
        &self,
        key: &VirtualServerKey,
        dest: &Destination,
    ) -> Result<(), Error> {
        self.apply_one(Op::UpdateDest(*key, dest.clone()))
    }

    pub fn delete_destination(
        &self,
        key: &VirtualServerKey,
        dest: &Destination,
    ) -> Result<(), Error> {
        self.apply_one(Op::DeleteDest(*key, dest.clone()))
    }

    /// Sets the connection timeouts of the namespace, as `ipvsadm --set`
    /// does. Those left `None` keep their value; when all are, nothing is
    /// sent, as upstream kube-proxy then makes no call. The kernel refuses
    /// (EINVAL) a timeout above `INT_MAX / HZ` seconds, and then changes none.
    pub fn set_timeouts(&self, timeouts: &Timeouts) -> Result<(), Error> {
        if timeouts.is_unchanged() {
            return Ok(());
        }
        let request =
            IpvsMessage::new(Command::SetConfig).with_timeouts(TimeoutAttrs::from(timeouts));
        self.execute(std::slice::from_ref(&request))?.into_result()
    }

    /// The connection timeouts of the namespace, as `ipvsadm -L --timeout`
    /// shows them.
    pub fn timeouts(&self) -> Result<Timeouts, Error> {
        let reply = self.lock().request(&IpvsMessage::new(Command::GetConfig))?;
        Ok(Timeouts::from(&reply.timeouts))
    }

    /// Deletes every virtual server of the namespace, kproxy's or not.
    pub fn flush(&self) -> Result<(), Error> {
        self.execute(&[IpvsMessage::new(Command::Flush)])?
            .into_result()
    }

    /// Carries out `ops` in order, many per datagram, and reports which the
    /// kernel refused. Each is acked on its own, so a refusal does not stop
    /// the others. An `Err` means the socket failed: the ops of the datagram
    /// in flight may or may not have been carried out, and later ones were
    /// not sent.
    pub fn apply(&self, ops: &[Op]) -> Result<BatchReport, Error> {
        let msgs: Vec<IpvsMessage> = ops.iter().map(Op::message).collect();
        self.execute(&msgs)
    }

    /// [`IpvsClient::apply`] for requests built by hand, such as a scheduler
    /// kproxy's types cannot name.
    pub fn execute(&self, requests: &[IpvsMessage]) -> Result<BatchReport, Error> {
        self.lock().execute(requests)
    }

    /// The replies of a dump request (`GET_SERVICE`, or `GET_DEST` with a
    /// service), unconverted.
    pub fn dump(&self, request: &IpvsMessage) -> Result<Vec<IpvsMessage>, Error> {
        let mut out = Vec::new();
        self.lock().dump(request, |msg| out.push(msg))?;
        Ok(out)
    }

    fn apply_one(&self, op: Op) -> Result<(), Error> {
        self.apply(std::slice::from_ref(&op))?.into_result()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state behind the lock is a socket and a counter: still usable
        // after a panic elsewhere.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn resolve_family(&mut self) -> Result<u16, Error> {
        let seq = self.socket.next_seq();
        let mut request = Vec::new();
        put_family_request(&mut request, seq, IPVS_GENL_NAME);
        self.socket.send(&request)?;
        let mut reader = FamilyReader::new(seq, self.socket.port());
        self.socket.recv_until(|datagram| reader.feed(datagram))
    }

    fn dump(
        &mut self,
        request: &IpvsMessage,
        mut each: impl FnMut(IpvsMessage),
    ) -> Result<(), Error> {
        let seq = self.send_one(request, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut reader = DumpReader::new(request, seq, self.socket.port(), self.family);
        self.socket
            .recv_until(|datagram| Ok::<_, Error>(reader.feed(datagram, &mut each)?.then_some(())))
    }

    /// Sends a request the kernel answers with one message before its ack.
    fn request(&mut self, request: &IpvsMessage) -> Result<IpvsMessage, Error> {
        let seq = self.send_one(request, NLM_F_REQUEST | NLM_F_ACK)?;
        let mut reader = ReplyReader::new(request, seq, self.socket.port(), self.family);
        self.socket.recv_until(|datagram| reader.feed(datagram))
    }

    /// Sends one request, once the answers an earlier call left are gone,
    /// and returns its sequence number.
    fn send_one(&mut self, request: &IpvsMessage, flags: u16) -> Result<u32, Error> {
        self.socket.drain();
        let seq = self.socket.next_seq();
        let mut datagram = Vec::new();
        put_request(&mut datagram, self.family, flags, seq, request);
        self.socket.send(&datagram)?;
        Ok(seq)
    }

    fn execute(&mut self, requests: &[IpvsMessage]) -> Result<BatchReport, Error> {
        self.socket.drain();
        let first_seq = self.socket.next_seqs(requests.len());
        let mut bytes = Vec::with_capacity(requests.len() * 112);
        let mut offsets = Vec::with_capacity(requests.len() + 1);
        for (i, msg) in requests.iter().enumerate() {
            offsets.push(bytes.len());
            let seq = first_seq.wrapping_add(i as u32);
            put_request(&mut bytes, self.family, NLM_F_REQUEST | NLM_F_ACK, seq, msg);
        }
        offsets.push(bytes.len());
        let lens: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();

        let mut report = BatchReport::default();
        for batch in split_batches(&lens, self.max_bytes, self.max_requests) {
            self.socket
                .send(&bytes[offsets[batch.start]..offsets[batch.end]])?;
            report.datagrams += 1;
            report.sent += batch.len();
            let mut reader = AckReader::new(requests, first_seq, self.socket.port(), batch);
            let failures = &mut report.failures;
            self.socket.recv_until(|datagram| {
                reader.feed(datagram, failures)?;
                Ok::<_, Error>(reader.done().then_some(()))
            })?;
        }
        Ok(report)
    }
}
