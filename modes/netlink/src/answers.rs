//! Matching the kernel's answers to requests, one datagram at a time and apart
//! from the socket, so that hand-built datagrams can test it: the messages and
//! the end of a dump, and the acks of a batch of requests.

use std::ops::Range;

use crate::codec::DecodeError;
use crate::message::{Ack, Frame, frames, read_ack, read_done};
use crate::sys::{NLMSG_DONE, NLMSG_ERROR, NLMSG_MIN_TYPE};

/// Why a dump failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DumpError {
    /// An answer could not be read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The kernel refused the dump, or aborted it: a positive errno.
    #[error("the kernel failed the dump with errno {0}")]
    Failed(i32),
}

/// The answers to one dump request.
#[derive(Debug)]
pub struct DumpReader {
    seq: u32,
    port: u32,
    /// A message that could not be read fails the dump, but only once it is
    /// over: the kernel refuses a new dump on a socket whose last one was left
    /// open.
    bad: Option<DecodeError>,
}

impl DumpReader {
    /// For the request sent with `seq` from the socket bound to `port`.
    pub fn new(seq: u32, port: u32) -> Self {
        DumpReader {
            seq,
            port,
            bad: None,
        }
    }

    /// Reads one datagram, handing each message of the dump to `each`; true
    /// once the dump is over. Answers to other requests are skipped.
    pub fn feed<'a>(
        &mut self,
        datagram: &'a [u8],
        mut each: impl FnMut(Frame<'a>) -> Result<(), DecodeError>,
    ) -> Result<bool, DumpError> {
        for frame in frames(datagram) {
            let frame = frame?;
            if frame.seq != self.seq || frame.pid != self.port {
                tracing::debug!(seq = frame.seq, "skipping a stale netlink message");
                continue;
            }
            match frame.kind {
                NLMSG_DONE => {
                    let code = read_done(frame.payload)?;
                    return match self.bad.take() {
                        Some(e) => Err(e.into()),
                        None if code < 0 => Err(DumpError::Failed(code.saturating_abs())),
                        None => Ok(true),
                    };
                }
                NLMSG_ERROR => match read_ack(frame.flags, frame.payload)?.errno {
                    0 => {}
                    errno => return Err(DumpError::Failed(errno)),
                },
                kind if kind < NLMSG_MIN_TYPE => {}
                _ => {
                    if let Err(e) = each(frame) {
                        self.bad.get_or_insert(e);
                    }
                }
            }
        }
        Ok(false)
    }
}

/// The acks of one datagram of requests sent with `NLM_F_ACK`: `batch`
/// numbers the requests, whose sequence numbers count up from `first_seq`
/// (that of request 0).
#[derive(Debug)]
pub struct AckReader {
    first_seq: u32,
    port: u32,
    batch: Range<usize>,
    answered: Vec<bool>,
    pending: usize,
}

impl AckReader {
    pub fn new(first_seq: u32, port: u32, batch: Range<usize>) -> Self {
        AckReader {
            first_seq,
            port,
            answered: vec![false; batch.len()],
            pending: batch.len(),
            batch,
        }
    }

    /// Whether every request of the batch is answered.
    pub fn done(&self) -> bool {
        self.pending == 0
    }

    /// Reads one datagram of acks, handing each with its request's number to
    /// `each`. Acks of other requests (left from an earlier call) and repeated
    /// ones are ignored.
    pub fn feed(
        &mut self,
        datagram: &[u8],
        mut each: impl FnMut(usize, Ack),
    ) -> Result<(), DecodeError> {
        for frame in frames(datagram) {
            let frame = frame?;
            let index = frame.seq.wrapping_sub(self.first_seq) as usize;
            if frame.kind != NLMSG_ERROR
                || frame.pid != self.port
                || !self.batch.contains(&index)
                || self.answered[index - self.batch.start]
            {
                continue;
            }
            self.answered[index - self.batch.start] = true;
            self.pending -= 1;
            each(index, read_ack(frame.flags, frame.payload)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::message::{NlMsgHdr, put_message_with};
    use crate::sys::*;

    const PORT: u32 = 4242;
    const DATA: u16 = 0x20;

    fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, payload: &[u8]) {
        let start = out.len();
        put_message_with(out, kind, flags, seq, |out| out.extend_from_slice(payload));
        // The kernel addresses its answers to our port.
        out[start + 12..start + 16].copy_from_slice(&PORT.to_ne_bytes());
    }

    fn done(out: &mut Vec<u8>, seq: u32, code: i32) {
        message(out, NLMSG_DONE, NLM_F_MULTI, seq, &code.to_ne_bytes());
    }

    fn ack(out: &mut Vec<u8>, seq: u32, errno: i32) {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        NlMsgHdr {
            len: NLMSG_HDRLEN as u32,
            kind: DATA,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq,
            pid: 0,
        }
        .encode(&mut payload);
        message(out, NLMSG_ERROR, NLM_F_CAPPED, seq, &payload);
    }

    /// Feeds datagrams until the dump ends, collecting the first payload byte
    /// of each message; a payload starting with 0xff cannot be read.
    fn collect(datagrams: &[Vec<u8>], seq: u32) -> Result<Vec<u8>, DumpError> {
        let mut reader = DumpReader::new(seq, PORT);
        let mut out = Vec::new();
        for d in datagrams {
            let over = reader.feed(d, |frame| match frame.payload {
                [0xff, ..] => Err(DecodeError::Missing("a readable byte")),
                [byte, ..] => {
                    out.push(*byte);
                    Ok(())
                }
                [] => Err(DecodeError::Missing("a byte")),
            })?;
            if over {
                return Ok(out);
            }
        }
        panic!("the dump never ended");
    }

    #[test]
    fn a_dump_collects_its_own_messages_across_datagrams() {
        let mut first = Vec::new();
        message(&mut first, DATA, NLM_F_MULTI, 7, &[1]);
        message(&mut first, NLMSG_NOOP, 0, 7, &[9]);
        message(&mut first, DATA, NLM_F_MULTI, 7, &[2]);
        let mut second = Vec::new();
        // A stale answer of an earlier request, then the end.
        message(&mut second, DATA, NLM_F_MULTI, 6, &[3]);
        done(&mut second, 7, 0);
        assert_eq!(collect(&[first, second], 7), Ok(vec![1, 2]));
    }

    #[test]
    fn a_bad_message_fails_the_dump_only_at_its_end() {
        let mut datagram = Vec::new();
        message(&mut datagram, DATA, NLM_F_MULTI, 2, &[0xff]);
        message(&mut datagram, DATA, NLM_F_MULTI, 2, &[]);
        message(&mut datagram, DATA, NLM_F_MULTI, 2, &[4]);
        let mut reader = DumpReader::new(2, PORT);
        let mut seen = 0;
        let mut count = |_: Frame<'_>| {
            seen += 1;
            Err(DecodeError::Missing("first"))
        };
        assert_eq!(reader.feed(&datagram, &mut count), Ok(false));
        let mut end = Vec::new();
        done(&mut end, 2, 0);
        assert_eq!(
            reader.feed(&end, &mut count),
            Err(DumpError::Decode(DecodeError::Missing("first")))
        );
        assert_eq!(seen, 3);
        // Where only one message is bad, the others are still handed over.
        let mut datagram = Vec::new();
        message(&mut datagram, DATA, NLM_F_MULTI, 2, &[0xff]);
        message(&mut datagram, DATA, NLM_F_MULTI, 2, &[4]);
        done(&mut datagram, 2, 0);
        let mut reader = DumpReader::new(2, PORT);
        let mut good = Vec::new();
        let result = reader.feed(&datagram, |frame| match frame.payload {
            [0xff] => Err(DecodeError::Missing("x")),
            other => {
                good.extend_from_slice(other);
                Ok(())
            }
        });
        assert_eq!(result, Err(DumpError::Decode(DecodeError::Missing("x"))));
        assert_eq!(good, vec![4]);
    }

    #[test]
    fn a_dump_the_kernel_refuses_or_aborts_fails_with_its_errno() {
        let mut aborted = Vec::new();
        message(&mut aborted, DATA, NLM_F_MULTI, 4, &[1]);
        done(&mut aborted, 4, -libc::EMSGSIZE);
        assert_eq!(
            collect(&[aborted], 4),
            Err(DumpError::Failed(libc::EMSGSIZE))
        );
        let mut refused = Vec::new();
        ack(&mut refused, 5, libc::EPERM);
        assert_eq!(collect(&[refused], 5), Err(DumpError::Failed(libc::EPERM)));
        // Framing errors fail it at once.
        let mut torn = Vec::new();
        message(&mut torn, DATA, NLM_F_MULTI, 6, &[1]);
        torn.extend_from_slice(&[0; 8]);
        assert!(matches!(
            DumpReader::new(6, PORT).feed(&torn, |_| Ok(())),
            Err(DumpError::Decode(DecodeError::Truncated { .. }))
        ));
    }

    #[test]
    fn acks_are_matched_to_their_requests_in_any_order() {
        // Sequence numbers 100..=103; this datagram carries requests 1..4.
        let mut reader = AckReader::new(100, PORT, 1..4);
        let mut seen = Vec::new();
        let mut first = Vec::new();
        ack(&mut first, 103, 0);
        ack(&mut first, 100, 0); // not of this datagram: ignored
        ack(&mut first, 101, libc::EEXIST);
        reader
            .feed(&first, |i, ack| seen.push((i, ack.errno)))
            .unwrap();
        assert!(!reader.done());
        let mut second = Vec::new();
        ack(&mut second, 101, 0); // a repeat: ignored
        message(&mut second, DATA, 0, 102, &[1]); // not an ack
        ack(&mut second, 102, libc::ENOENT);
        reader
            .feed(&second, |i, ack| seen.push((i, ack.errno)))
            .unwrap();
        assert!(reader.done());
        assert_eq!(seen, vec![(3, 0), (1, libc::EEXIST), (2, libc::ENOENT)]);
    }

    #[test]
    fn acks_for_another_socket_are_ignored() {
        let mut reader = AckReader::new(1, PORT, 0..1);
        let mut datagram = Vec::new();
        ack(&mut datagram, 1, libc::ESRCH);
        datagram[12..16].copy_from_slice(&(PORT + 1).to_ne_bytes());
        let mut seen = 0;
        reader.feed(&datagram, |_, _| seen += 1).unwrap();
        assert!(!reader.done());
        assert_eq!(seen, 0);
    }

    #[test]
    fn a_malformed_ack_is_an_error() {
        let mut reader = AckReader::new(1, PORT, 0..1);
        let mut datagram = Vec::new();
        message(&mut datagram, NLMSG_ERROR, NLM_F_CAPPED, 1, &[0, 0, 0, 0]);
        assert!(matches!(
            reader.feed(&datagram, |_, _| {}),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
