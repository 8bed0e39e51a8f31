//! What can go wrong between kproxy and ctnetlink.

use std::io;
use std::time::Duration;

use kproxy_model::IpFamily;

use kproxy_netlink::{DecodeError, SocketError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No ctnetlink socket: no netlink support, or not allowed.
    #[error("cannot open a ctnetlink socket: {0}")]
    Socket(#[source] io::Error),

    #[error("cannot send to ctnetlink: {0}")]
    Send(#[source] io::Error),

    #[error("cannot receive from ctnetlink: {0}")]
    Recv(#[source] io::Error),

    /// The kernel did not answer: kproxy gives up rather than hang a sync.
    #[error("ctnetlink did not answer within {0:?}")]
    Timeout(Duration),

    /// The kernel refused or aborted the listing of a table.
    #[error("ctnetlink could not list the {family} conntrack table: {source}")]
    Dump {
        family: IpFamily,
        #[source]
        source: io::Error,
    },

    /// Some deletions failed for a reason other than the entry being gone
    /// already. The others were carried out.
    #[error("ctnetlink refused to delete {failed} conntrack entries ({deleted} deleted): {source}")]
    Delete {
        deleted: usize,
        failed: usize,
        #[source]
        source: io::Error,
    },

    /// The kernel sent something this crate cannot read.
    #[error("malformed ctnetlink message: {0}")]
    Decode(#[from] DecodeError),

    #[error("a {len}-byte ctnetlink message did not fit the {cap}-byte receive buffer")]
    Truncated { len: usize, cap: usize },
}

impl From<SocketError> for Error {
    fn from(e: SocketError) -> Self {
        match e {
            SocketError::Send(e) => Error::Send(e),
            SocketError::Recv(e) => Error::Recv(e),
            SocketError::Timeout(after) => Error::Timeout(after),
            SocketError::Truncated { len, cap } => Error::Truncated { len, cap },
            // Callers of the cleaner see it as the failed receive it is.
            SocketError::Overrun => Error::Recv(io::Error::from_raw_os_error(libc::ENOBUFS)),
        }
    }
}
