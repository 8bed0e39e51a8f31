//! A netlink socket that talks to the kernel one request/answer exchange at a
//! time: sequence numbers, sending, and receiving datagrams with a timeout.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr};

/// Netlink never builds a dump datagram above 32 KiB; twice that leaves room.
const RECV_BUF: usize = 64 * 1024;
/// How long a call waits for the kernel before giving up rather than hang a
/// sync.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong on the socket once it is open.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot send: {0}")]
    Send(#[source] io::Error),
    #[error("cannot receive: {0}")]
    Recv(#[source] io::Error),
    /// The kernel did not answer within [`RECV_TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The socket's receive buffer overflowed (ENOBUFS): the kernel dropped
    /// answers, which will never come.
    #[error("the kernel dropped answers: receive buffer full")]
    Overrun,
    #[error("a {len}-byte datagram did not fit the {cap}-byte receive buffer")]
    Truncated { len: usize, cap: usize },
}

/// A netlink socket bound to a port of its own, on the network namespace the
/// calling thread was in when it was opened. Acks echo only the header of a
/// refused request (`NETLINK_CAP_ACK`).
pub struct NlSocket {
    socket: Socket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for NlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NlSocket")
            .field("port", &self.port)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl AsRawFd for NlSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl NlSocket {
    /// Opens a socket of `protocol` (`NETLINK_GENERIC`, ...).
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        let addr = socket.bind_auto()?;
        socket.set_cap_ack(true)?;
        set_recv_timeout(socket.as_raw_fd(), RECV_TIMEOUT)?;
        Ok(NlSocket {
            socket,
            port: addr.port_number(),
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    /// Asks for the kernel's reason in words with each refusal
    /// (`NETLINK_EXT_ACK`); kernels before 4.12 do not know the option.
    pub fn set_ext_ack(&self) -> io::Result<()> {
        self.socket.set_ext_ack(true)
    }

    /// Raises the receive buffer towards `wanted` bytes (the kernel doubles
    /// it), and returns the size the kernel settled on.
    pub fn grow_recv_buffer(&self, wanted: libc::c_int) -> io::Result<usize> {
        grow_buffer(
            self.as_raw_fd(),
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            wanted,
        )
    }

    /// [`NlSocket::grow_recv_buffer`] for the send buffer.
    pub fn grow_send_buffer(&self, wanted: libc::c_int) -> io::Result<usize> {
        grow_buffer(
            self.as_raw_fd(),
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            wanted,
        )
    }

    /// The socket's port: the kernel addresses its answers to it.
    pub fn port(&self) -> u32 {
        self.port
    }

    pub fn next_seq(&mut self) -> u32 {
        self.next_seqs(1)
    }

    /// Takes `n` consecutive sequence numbers, for a batch of requests, and
    /// returns the first.
    pub fn next_seqs(&mut self, n: usize) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(n as u32);
        first
    }

    /// Sends a datagram of requests to the kernel.
    pub fn send(&self, datagram: &[u8]) -> Result<(), SocketError> {
        let kernel = SocketAddr::new(0, 0);
        loop {
            match self.socket.send_to(datagram, &kernel, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SocketError::Send(e)),
            }
        }
    }

    /// Receives one datagram.
    pub fn recv(&mut self) -> Result<&[u8], SocketError> {
        self.buf.clear();
        loop {
            match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                // With MSG_TRUNC the kernel reports the datagram's real size.
                Ok(len) if len > self.buf.capacity() => {
                    return Err(SocketError::Truncated {
                        len,
                        cap: self.buf.capacity(),
                    });
                }
                Ok(_) => return Ok(&self.buf),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(SocketError::Timeout(RECV_TIMEOUT));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(SocketError::Overrun);
                }
                Err(e) => return Err(SocketError::Recv(e)),
            }
        }
    }

    /// Receives datagrams, handing each to `feed`, until `feed` has the
    /// answer.
    pub fn recv_until<T, E: From<SocketError>>(
        &mut self,
        mut feed: impl FnMut(&[u8]) -> Result<Option<T>, E>,
    ) -> Result<T, E> {
        loop {
            if let Some(answer) = feed(self.recv()?)? {
                return Ok(answer);
            }
        }
    }

    /// Throws away whatever an earlier, failed call left unread, so that its
    /// answers neither fill the buffer nor get mistaken for new ones.
    pub fn drain(&mut self) {
        loop {
            self.buf.clear();
            match self.socket.recv(&mut self.buf, libc::MSG_DONTWAIT) {
                Ok(_) => tracing::debug!(port = self.port, "dropping a stale netlink answer"),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

fn set_recv_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the fd is a socket this process owns, and `tv` is a valid
    // `struct timeval` whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
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

fn set_int(fd: RawFd, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is a socket this process owns; the option value is a
    // c_int whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn get_int(fd: RawFd, name: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as for `set_int`; `len` holds the size of `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.max(0) as usize)
}

/// Raises a socket buffer past the system limit if allowed (CAP_NET_ADMIN),
/// else up to it, and returns the size the kernel settled on.
fn grow_buffer(
    fd: RawFd,
    force: libc::c_int,
    plain: libc::c_int,
    wanted: libc::c_int,
) -> io::Result<usize> {
    let current = get_int(fd, plain)?;
    if current >= 2 * wanted as usize {
        return Ok(current);
    }
    if set_int(fd, force, wanted).is_err() {
        // Without CAP_NET_ADMIN: up to net.core.{r,w}mem_max.
        let _ = set_int(fd, plain, wanted);
    }
    get_int(fd, plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::AckReader;
    use crate::message::put_message_with;
    use crate::sys::{NETLINK_ROUTE, NLM_F_ACK, NLM_F_REQUEST, NLMSG_NOOP};

    #[test]
    fn sequence_numbers_count_up_and_wrap() {
        let mut socket = NlSocket::open(NETLINK_ROUTE).expect("netlink socket");
        assert_eq!(socket.next_seq(), 1);
        assert_eq!(socket.next_seqs(3), 2);
        assert_eq!(socket.next_seq(), 5);
        socket.seq = u32::MAX - 1;
        assert_eq!(socket.next_seqs(2), u32::MAX);
        assert_eq!(socket.next_seq(), 1);
    }

    /// The kernel acks any request sent with NLM_F_ACK, even one of a type
    /// no family handles: a round trip that needs no privilege.
    #[test]
    fn the_kernel_acks_what_it_is_sent() {
        let mut socket = NlSocket::open(NETLINK_ROUTE).expect("netlink socket");
        socket.drain();
        let first = socket.next_seqs(2);
        let mut datagram = Vec::new();
        for seq in [first, first.wrapping_add(1)] {
            put_message_with(
                &mut datagram,
                NLMSG_NOOP,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                |_| {},
            );
        }
        socket.send(&datagram).unwrap();
        let mut acks = AckReader::new(first, socket.port(), 0..2);
        let mut seen = Vec::new();
        socket
            .recv_until(|d| {
                acks.feed(d, |i, ack| seen.push((i, ack.errno)))
                    .map_err(|e| SocketError::Recv(io::Error::other(e)))?;
                Ok::<_, SocketError>(acks.done().then_some(()))
            })
            .unwrap();
        assert_eq!(seen, vec![(0, 0), (1, 0)]);
    }
}
