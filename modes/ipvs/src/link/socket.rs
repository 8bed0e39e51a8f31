//! A blocking rtnetlink socket: one request at a time, answered by its
//! messages and an acknowledgement, or by a dump ending in NLMSG_DONE.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The kernel answers rtnetlink at once; a silent socket means something is
/// badly wrong, and a sync must not hang on it.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);
/// Large enough for any single rtnetlink datagram (the kernel sizes dump
/// datagrams to the page size, or to 32 KiB at most).
const RECV_BUFFER: usize = 64 * 1024;
/// A dump interrupted by a concurrent change is retried this many times.
const DUMP_ATTEMPTS: usize = 5;

pub(super) struct RtnlSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl RtnlSocket {
    pub(super) fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        // Errors then carry only the failed request's header, not all of it.
        socket.set_cap_ack(true)?;
        set_recv_timeout(&socket, RECV_TIMEOUT)?;
        Ok(RtnlSocket {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Sends a request and waits for its acknowledgement, returning the
    /// messages that came before it (the answer to a GET). A kernel error
    /// comes back as its errno.
    pub(super) fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_ACK | flags)?;
        let mut answers = Vec::new();
        loop {
            self.recv()?;
            for reply in parse_datagram(&self.buf)? {
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(err) => {
                        return match err.code {
                            None => Ok(answers),
                            Some(_) => Err(err.to_io()),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }

    /// Lists a table, retrying when a concurrent change interrupted the dump.
    pub(super) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            if let Some(entries) = self.dump_once(message.clone())? {
                return Ok(entries);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("dump interrupted by concurrent changes {DUMP_ATTEMPTS} times"),
        ))
    }

    /// `None` when the dump was interrupted and must start over.
    fn dump_once(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> io::Result<Option<Vec<RouteNetlinkMessage>>> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut entries = Vec::new();
        let mut interrupted = false;
        loop {
            self.recv()?;
            for reply in parse_datagram(&self.buf)? {
                if reply.header.sequence_number != seq {
                    continue;
                }
                interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok((!interrupted).then_some(entries)),
                    NetlinkPayload::Error(err) if err.code.is_some() => return Err(err.to_io()),
                    NetlinkPayload::InnerMessage(inner) => entries.push(inner),
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let datagram = encode(message, flags, self.seq);
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.socket.send_to(&datagram, &kernel, 0) {
                Ok(_) => return Ok(self.seq),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one datagram into `self.buf`.
    fn recv(&mut self) -> io::Result<()> {
        self.buf.clear();
        loop {
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                // With MSG_TRUNC the kernel reports the datagram's real size.
                Ok(len) if len > self.buf.capacity() => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a {len}-byte datagram did not fit the {}-byte buffer",
                            self.buf.capacity()
                        ),
                    ));
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {RECV_TIMEOUT:?}"),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

pub(super) fn encode(message: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    let mut datagram = vec![0; message.buffer_len()];
    message.serialize(&mut datagram);
    datagram
}

/// Splits a datagram into its netlink messages.
pub(super) fn parse_datagram(
    mut datagram: &[u8],
) -> io::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut messages = Vec::new();
    while !datagram.is_empty() {
        let len = NetlinkBuffer::new_checked(datagram)
            .map_err(invalid)?
            .length() as usize;
        let message = NetlinkMessage::deserialize(&datagram[..len]).map_err(invalid)?;
        messages.push(message);
        // Messages are 4-byte aligned; the last one may lack its padding.
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
    }
    Ok(messages)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
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
