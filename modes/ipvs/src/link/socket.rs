//! kube-ipvs0's rtnetlink exchanges: one request at a time, answered by its
//! messages and an ack, or by a dump ending in `NLMSG_DONE`.
//!
//! The socket, the framing and the acks are kproxy-netlink's, as for the
//! IPVS client; only the message bodies (links, addresses) are
//! netlink-packet-route's.

use std::io;

use kproxy_netlink::message::{frames, put_message_with, read_ack, read_done};
use kproxy_netlink::sys::{
    NETLINK_ROUTE, NLM_F_ACK, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_MIN_TYPE,
};
use kproxy_netlink::{NlSocket, SocketError};
use netlink_packet_core::{Emitable, ParseableParametrized};
use netlink_packet_route::RouteNetlinkMessage;

/// A dump interrupted by a concurrent change is retried this many times.
const DUMP_ATTEMPTS: usize = 5;

pub(super) struct RtnlSocket {
    socket: NlSocket,
}

impl RtnlSocket {
    pub(super) fn new() -> io::Result<Self> {
        Ok(RtnlSocket {
            socket: NlSocket::open(NETLINK_ROUTE)?,
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
        let mut answers = Answers::new(seq, self.socket.port(), End::Ack);
        self.recv_until(|datagram| answers.feed(datagram))
    }

    /// Lists a table, retrying when a concurrent change interrupted the dump.
    pub(super) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.send(message.clone(), NLM_F_REQUEST | NLM_F_DUMP)?;
            let mut answers = Answers::new(seq, self.socket.port(), End::Done);
            let entries = self.recv_until(|datagram| answers.feed(datagram))?;
            if !answers.interrupted {
                return Ok(entries);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!("dump interrupted by concurrent changes {DUMP_ATTEMPTS} times"),
        ))
    }

    /// Sends one request, once the answers an earlier, failed call left are
    /// gone, and returns its sequence number.
    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.socket.drain();
        let seq = self.socket.next_seq();
        self.socket
            .send(&encode(message, flags, seq))
            .map_err(io_error)?;
        Ok(seq)
    }

    /// Receives datagrams, handing each to `feed`, until it has the answer.
    fn recv_until<T>(
        &mut self,
        mut feed: impl FnMut(&[u8]) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        loop {
            if let Some(answer) = feed(self.socket.recv().map_err(io_error)?)? {
                return Ok(answer);
            }
        }
    }
}

/// One whole request, as the kernel reads it.
pub(super) fn encode(message: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(64);
    put_message_with(&mut datagram, message.message_type(), flags, seq, |out| {
        let start = out.len();
        out.resize(start + message.buffer_len(), 0);
        message.emit(&mut out[start..]);
    });
    datagram
}

/// How the kernel ends its answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// An ack: the request was sent with `NLM_F_ACK`.
    Ack,
    /// `NLMSG_DONE`: the request was a dump.
    Done,
}

/// The answers to one request, read one datagram at a time: the messages
/// that come before its end. Answers to other requests are skipped.
#[derive(Debug)]
struct Answers {
    seq: u32,
    port: u32,
    end: End,
    messages: Vec<RouteNetlinkMessage>,
    /// A concurrent change made the dump inconsistent: the kernel flags any
    /// message of it, its end included.
    interrupted: bool,
    /// A message that cannot be read fails the request only once it is
    /// answered in full, so that none of its answers is left on the socket.
    bad: Option<io::Error>,
}

impl Answers {
    fn new(seq: u32, port: u32, end: End) -> Self {
        Answers {
            seq,
            port,
            end,
            messages: Vec::new(),
            interrupted: false,
            bad: None,
        }
    }

    /// Reads one datagram; the messages once the answer is over. The kernel's
    /// refusal comes back as its errno.
    fn feed(&mut self, datagram: &[u8]) -> io::Result<Option<Vec<RouteNetlinkMessage>>> {
        for frame in frames(datagram) {
            let frame = frame.map_err(invalid)?;
            if frame.seq != self.seq || frame.pid != self.port {
                continue;
            }
            self.interrupted |= frame.flags & NLM_F_DUMP_INTR != 0;
            let over = match frame.kind {
                NLMSG_ERROR => match read_ack(frame.flags, frame.payload).map_err(invalid)?.errno {
                    0 => self.end == End::Ack,
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                },
                NLMSG_DONE if self.end == End::Done => match read_done(frame.payload) {
                    Ok(code) if code < 0 => {
                        return Err(io::Error::from_raw_os_error(code.saturating_abs()));
                    }
                    Ok(_) => true,
                    Err(e) => return Err(invalid(e)),
                },
                kind if kind < NLMSG_MIN_TYPE => false,
                kind => {
                    match RouteNetlinkMessage::parse_with_param(frame.payload, kind) {
                        Ok(message) => self.messages.push(message),
                        Err(e) => {
                            self.bad.get_or_insert(invalid(e));
                        }
                    }
                    false
                }
            };
            if over {
                return match self.bad.take() {
                    Some(e) => Err(e),
                    None => Ok(Some(std::mem::take(&mut self.messages))),
                };
            }
        }
        Ok(None)
    }
}

/// The socket's errors as the `io::Error`s link.rs reports, with the kinds
/// they had when the socket was rtnetlink's own.
fn io_error(e: SocketError) -> io::Error {
    match e {
        SocketError::Send(e) | SocketError::Recv(e) => e,
        SocketError::Overrun => io::Error::from_raw_os_error(libc::ENOBUFS),
        e @ SocketError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, e),
        e @ SocketError::Truncated { .. } => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_netlink::sys::{NLM_F_CAPPED, NLM_F_MULTI};
    use netlink_packet_route::address::AddressMessage;
    use netlink_packet_route::link::LinkMessage;

    const PORT: u32 = 4242;
    const SEQ: u32 = 7;

    /// One answer of the kernel's, addressed to the socket on `PORT`.
    fn answer(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, payload: &[u8]) {
        let start = out.len();
        put_message_with(out, kind, flags, seq, |out| out.extend_from_slice(payload));
        out[start + 12..start + 16].copy_from_slice(&PORT.to_ne_bytes());
    }

    /// A route message as the kernel sends it, addressed to `PORT`.
    fn message(out: &mut Vec<u8>, message: RouteNetlinkMessage, flags: u16, seq: u32) {
        let mut bytes = encode(message, flags, seq);
        bytes[12..16].copy_from_slice(&PORT.to_ne_bytes());
        out.extend(bytes);
    }

    fn address(index: u32) -> RouteNetlinkMessage {
        let mut addr = AddressMessage::default();
        addr.header.index = index;
        RouteNetlinkMessage::NewAddress(addr)
    }

    /// An ack of request `seq`, capped (NETLINK_CAP_ACK): the code, then the
    /// request's header.
    fn ack(out: &mut Vec<u8>, seq: u32, errno: i32) {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        payload.extend(&encode(address(0), NLM_F_REQUEST | NLM_F_ACK, seq)[..16]);
        answer(out, NLMSG_ERROR, NLM_F_CAPPED, seq, &payload);
    }

    fn done(out: &mut Vec<u8>, flags: u16, seq: u32, code: i32) {
        answer(out, NLMSG_DONE, flags, seq, &code.to_ne_bytes());
    }

    fn indexes(messages: &[RouteNetlinkMessage]) -> Vec<u32> {
        messages
            .iter()
            .map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => a.header.index,
                RouteNetlinkMessage::NewLink(l) => l.header.index,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_request_collects_its_messages_until_its_ack() {
        let mut answers = Answers::new(SEQ, PORT, End::Ack);
        let mut first = Vec::new();
        // A stale answer of an earlier request, then this one's.
        message(&mut first, address(9), 0, SEQ - 1);
        let mut link = LinkMessage::default();
        link.header.index = 3;
        message(&mut first, RouteNetlinkMessage::NewLink(link), 0, SEQ);
        assert_eq!(answers.feed(&first).unwrap(), None);
        let mut second = Vec::new();
        // A message for another socket is not ours either.
        message(&mut second, address(8), 0, SEQ);
        second[12..16].copy_from_slice(&(PORT + 1).to_ne_bytes());
        message(&mut second, address(4), 0, SEQ);
        ack(&mut second, SEQ, 0);
        assert_eq!(indexes(&answers.feed(&second).unwrap().unwrap()), [3, 4]);
    }

    #[test]
    fn a_refused_request_fails_with_its_errno() {
        let mut answers = Answers::new(SEQ, PORT, End::Ack);
        let mut datagram = Vec::new();
        ack(&mut datagram, SEQ - 1, 0);
        ack(&mut datagram, SEQ, libc::EEXIST);
        let err = answers.feed(&datagram).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn a_dump_ends_at_done_and_notices_interruptions() {
        let mut answers = Answers::new(SEQ, PORT, End::Done);
        let mut datagram = Vec::new();
        message(&mut datagram, address(1), NLM_F_MULTI, SEQ);
        message(&mut datagram, address(2), NLM_F_MULTI, SEQ);
        assert_eq!(answers.feed(&datagram).unwrap(), None);
        assert!(!answers.interrupted);
        // Only the end says that the listing changed under the dump.
        let mut end = Vec::new();
        done(&mut end, NLM_F_MULTI | NLM_F_DUMP_INTR, SEQ, 0);
        assert_eq!(indexes(&answers.feed(&end).unwrap().unwrap()), [1, 2]);
        assert!(answers.interrupted);
    }

    #[test]
    fn a_dump_the_kernel_aborts_fails_with_its_errno() {
        let mut answers = Answers::new(SEQ, PORT, End::Done);
        let mut datagram = Vec::new();
        message(&mut datagram, address(1), NLM_F_MULTI, SEQ);
        done(&mut datagram, NLM_F_MULTI, SEQ, -libc::EMSGSIZE);
        let err = answers.feed(&datagram).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE));
    }

    #[test]
    fn an_unreadable_message_fails_the_request_once_it_is_answered() {
        let mut answers = Answers::new(SEQ, PORT, End::Ack);
        let mut datagram = Vec::new();
        // RTM_NEWADDR with a 3-byte body: shorter than struct ifaddrmsg.
        answer(&mut datagram, 20, 0, SEQ, &[2, 32, 0]);
        message(&mut datagram, address(5), 0, SEQ);
        assert_eq!(answers.feed(&datagram).unwrap(), None);
        let mut end = Vec::new();
        ack(&mut end, SEQ, 0);
        let err = answers.feed(&end).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_message_longer_than_its_datagram_is_an_error_not_a_panic() {
        let mut datagram = Vec::new();
        message(&mut datagram, address(1), 0, SEQ);
        datagram[0] = 200;
        let err = Answers::new(SEQ, PORT, End::Ack)
            .feed(&datagram)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn socket_errors_keep_their_kinds() {
        assert_eq!(
            io_error(SocketError::Overrun).raw_os_error(),
            Some(libc::ENOBUFS)
        );
        let timeout = io_error(SocketError::Timeout(std::time::Duration::from_secs(10)));
        assert_eq!(timeout.kind(), io::ErrorKind::TimedOut);
        assert_eq!(timeout.to_string(), "no answer within 10s");
        let refused = io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(
            io_error(SocketError::Send(refused)).raw_os_error(),
            Some(libc::EPERM)
        );
    }
}
