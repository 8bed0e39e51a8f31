//! The ctnetlink socket: listing a table and deleting entries.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kproxy_model::{IpFamily, Protocol};
use netlink_sys::{Socket, SocketAddr};

use crate::codec::{Codec, Reader};
use crate::error::Error;
use crate::filter::{Filter, FilterSet};
use crate::flow::Flow;
use crate::message::{CtMessage, ct_type, put_message, read_done, read_error, read_message};
use crate::sys::*;

/// Netlink never builds a dump datagram above 32 KiB; twice that leaves room.
const RECV_BUF: usize = 64 * 1024;
/// Deletes sent in one datagram. Each is acked separately, and the acks of a
/// batch must fit the socket's default receive buffer at once.
const DELETE_BATCH: usize = 64;
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// A ctnetlink socket.
///
/// It works on the conntrack table of the network namespace the calling thread
/// was in when [`Conntrack::new`] ran, wherever it is used afterwards. Calls
/// block (each wait for the kernel is bounded by a timeout); async code should
/// run them on a blocking thread. Concurrent calls are serialised.
pub struct Conntrack {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("port", &self.lock().port)
            .finish_non_exhaustive()
    }
}

struct Inner {
    socket: Socket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    pub fn new() -> Result<Self, Error> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(Error::Socket)?;
        let addr = socket.bind_auto().map_err(Error::Socket)?;
        // Acks then carry only the request's header, not the whole request.
        socket.set_cap_ack(true).map_err(Error::Socket)?;
        set_recv_timeout(&socket, RECV_TIMEOUT).map_err(Error::Socket)?;
        Ok(Conntrack {
            inner: Mutex::new(Inner {
                socket,
                port: addr.port_number(),
                seq: 0,
                buf: Vec::with_capacity(RECV_BUF),
            }),
        })
    }

    /// Every entry of one family's table.
    pub fn flows(&self, family: IpFamily) -> Result<Vec<Flow>, Error> {
        let mut flows = Vec::new();
        self.lock().dump(family, |flow| flows.push(flow))?;
        Ok(flows)
    }

    /// Deletes these entries, and returns how many the kernel deleted. An entry
    /// that is gone already (expired, or deleted by someone else) is not an
    /// error; it is just not counted.
    pub fn delete(&self, flows: &[Flow]) -> Result<usize, Error> {
        self.lock().delete(flows)
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
        let mut inner = self.lock();
        let mut doomed = Vec::new();
        inner.dump(family, |flow| {
            if set.matches(&flow) {
                doomed.push(flow);
            }
        })?;
        tracing::debug!(%family, matched = doomed.len(), "deleting conntrack entries");
        inner.delete(&doomed)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state behind the lock is a socket and a counter: still usable
        // after a panic elsewhere.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, datagram: &[u8]) -> Result<(), Error> {
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.socket.send_to(datagram, &kernel, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Send(e)),
            }
        }
    }

    /// Receives one datagram into `self.buf`.
    fn recv(&mut self) -> Result<(), Error> {
        self.buf.clear();
        loop {
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                // With MSG_TRUNC the kernel reports the datagram's real size.
                Ok(len) if len > self.buf.capacity() => {
                    return Err(Error::Truncated {
                        len,
                        cap: self.buf.capacity(),
                    });
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::Timeout(RECV_TIMEOUT));
                }
                Err(e) => return Err(Error::Recv(e)),
            }
        }
    }

    /// Lists one family's table, handing each entry to `each`.
    fn dump(&mut self, family: IpFamily, mut each: impl FnMut(Flow)) -> Result<(), Error> {
        let seq = self.next_seq();
        let mut request = Vec::new();
        put_message(
            &mut request,
            ct_type(IPCTNL_MSG_CT_GET),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &CtMessage::dump(family),
        );
        self.send(&request)?;
        // A bad entry fails the listing, but only once the dump is over: the
        // kernel refuses a new dump on a socket whose last one was left open.
        let mut failure = None;
        loop {
            self.recv()?;
            let mut r = Reader::new(&self.buf);
            while !r.is_empty() {
                let (hdr, body) = read_message(&mut r)?;
                if hdr.seq != seq || hdr.pid != self.port {
                    tracing::debug!(seq = hdr.seq, "skipping a stale ctnetlink message");
                    continue;
                }
                match hdr.kind {
                    NLMSG_DONE => {
                        let errno = read_done(body)?;
                        return match failure {
                            Some(e) => Err(e),
                            None if errno < 0 => Err(Error::Dump {
                                family,
                                source: io::Error::from_raw_os_error(-errno),
                            }),
                            None => Ok(()),
                        };
                    }
                    NLMSG_ERROR => match read_error(hdr.flags, body)? {
                        0 => {}
                        errno => {
                            return Err(Error::Dump {
                                family,
                                source: io::Error::from_raw_os_error(-errno),
                            });
                        }
                    },
                    kind if kind == ct_type(IPCTNL_MSG_CT_NEW)
                        || kind == ct_type(IPCTNL_MSG_CT_GET) =>
                    {
                        match CtMessage::decode(body, "conntrack entry")
                            .and_then(CtMessage::into_flow)
                        {
                            Ok(flow) => each(flow),
                            Err(e) => {
                                failure.get_or_insert(Error::Decode(e));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<usize, Error> {
        let mut deleted = 0;
        let mut failed = 0;
        let mut first_error = None;
        for batch in flows.chunks(DELETE_BATCH) {
            let first_seq = self.seq.wrapping_add(1);
            let mut request = Vec::with_capacity(batch.len() * 128);
            for flow in batch {
                let seq = self.next_seq();
                put_message(
                    &mut request,
                    ct_type(IPCTNL_MSG_CT_DELETE),
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    &CtMessage::delete(flow),
                );
            }
            self.send(&request)?;
            let mut acked = vec![false; batch.len()];
            let mut pending = batch.len();
            while pending > 0 {
                self.recv()?;
                let mut r = Reader::new(&self.buf);
                while !r.is_empty() {
                    let (hdr, body) = read_message(&mut r)?;
                    let index = hdr.seq.wrapping_sub(first_seq) as usize;
                    if hdr.kind != NLMSG_ERROR
                        || hdr.pid != self.port
                        || index >= batch.len()
                        || acked[index]
                    {
                        continue;
                    }
                    acked[index] = true;
                    pending -= 1;
                    match read_error(hdr.flags, body)? {
                        0 => deleted += 1,
                        errno if errno == -libc::ENOENT => {}
                        errno => {
                            failed += 1;
                            tracing::debug!(flow = %batch[index], errno, "conntrack delete refused");
                            first_error.get_or_insert(io::Error::from_raw_os_error(-errno));
                        }
                    }
                }
            }
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
}

fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is a socket this process owns, and `tv` is a valid
    // `struct timeval` whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
