//! Mapping the kernel's refusals of IPVS requests, and what goes wrong on the
//! socket, to the crate's [`Error`] (the IPVS variants live in `crate::error`,
//! under their own heading).

use std::io;

use kproxy_netlink::SocketError;

use crate::error::Error;
use crate::netlink::frame::Ack;
use crate::netlink::message::{Command, IpvsMessage};

impl Error {
    /// The kernel's errno behind a refused IPVS request, if this is one.
    pub fn ipvs_errno(&self) -> Option<i32> {
        match self {
            Error::Exists { .. } => Some(libc::EEXIST),
            Error::NoService { .. } => Some(libc::ESRCH),
            Error::NoDestination { .. } | Error::SchedulerMissing { .. } => Some(libc::ENOENT),
            Error::IpvsRefused { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The error for a request the kernel refused. ENOENT means a missing
    /// scheduler for a virtual server request and a missing destination for a
    /// destination request.
    pub(crate) fn refused(msg: &IpvsMessage, ack: Ack) -> Error {
        let op = msg.to_string();
        let service = || {
            msg.service
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        let sched = msg
            .service
            .as_ref()
            .filter(|s| s.pe_name.is_none())
            .and_then(|s| s.sched_name.clone());
        match (ack.errno, msg.cmd) {
            (libc::EEXIST, _) => Error::Exists { op },
            (libc::ESRCH, _) => Error::NoService {
                op,
                service: service(),
            },
            (libc::ENOENT, Command::NewService | Command::SetService) if sched.is_some() => {
                Error::SchedulerMissing {
                    op,
                    scheduler: sched.unwrap_or_default(),
                }
            }
            (libc::ENOENT, Command::SetDest | Command::DelDest) => Error::NoDestination {
                op,
                dest: msg
                    .dest
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            },
            (errno, _) => Error::IpvsRefused {
                op,
                source: io::Error::from_raw_os_error(errno),
                detail: ack.message,
            },
        }
    }
}

impl From<SocketError> for Error {
    fn from(e: SocketError) -> Self {
        match e {
            SocketError::Send(e) => Error::IpvsSend(e),
            SocketError::Recv(e) => Error::IpvsRecv(e),
            SocketError::Timeout(after) => Error::IpvsTimeout(after),
            SocketError::Overrun => Error::IpvsAnswersLost,
            SocketError::Truncated { len, cap } => Error::IpvsTruncated { len, cap },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::message::{DestAttrs, ServiceAttrs};
    use crate::types::{Destination, ForwardMethod, Scheduler, VirtualServer, VirtualServerKey};
    use kproxy_model::Protocol;

    fn vs() -> VirtualServer {
        VirtualServer {
            key: VirtualServerKey {
                addr: "10.96.0.10".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 53,
            },
            scheduler: Scheduler::Sed,
            flags: Default::default(),
            timeout: 0,
            netmask: u32::MAX,
        }
    }

    fn dest() -> Destination {
        Destination {
            addr: "10.0.0.1".parse().unwrap(),
            port: 53,
            weight: 1,
            forward: ForwardMethod::Masquerade,
            active_conns: 0,
            inactive_conns: 0,
        }
    }

    fn ack(errno: i32) -> Ack {
        Ack {
            errno,
            message: None,
        }
    }

    fn new_service() -> IpvsMessage {
        IpvsMessage::new(Command::NewService).with_service(ServiceAttrs::from(&vs()))
    }

    fn dest_msg(cmd: Command) -> IpvsMessage {
        IpvsMessage::new(cmd)
            .with_service(ServiceAttrs::from(&vs().key))
            .with_dest(DestAttrs::from(&dest()))
    }

    #[test]
    fn eexist_says_the_object_exists() {
        let err = Error::refused(&new_service(), ack(libc::EEXIST));
        assert!(matches!(err, Error::Exists { .. }));
        assert_eq!(
            err.to_string(),
            "add virtual server UDP 10.96.0.10:53: it exists already"
        );
        assert_eq!(err.ipvs_errno(), Some(libc::EEXIST));
    }

    #[test]
    fn esrch_names_the_missing_service() {
        let err = Error::refused(&dest_msg(Command::NewDest), ack(libc::ESRCH));
        assert_eq!(
            err.to_string(),
            "add destination 10.0.0.1:53 to UDP 10.96.0.10:53: \
             virtual server UDP 10.96.0.10:53 does not exist"
        );
        assert_eq!(err.ipvs_errno(), Some(libc::ESRCH));
    }

    #[test]
    fn enoent_for_a_service_names_the_scheduler_module() {
        for cmd in [Command::NewService, Command::SetService] {
            let msg = IpvsMessage {
                cmd,
                ..new_service()
            };
            let err = Error::refused(&msg, ack(libc::ENOENT));
            match &err {
                Error::SchedulerMissing { scheduler, .. } => assert_eq!(scheduler, "sed"),
                other => panic!("{other:?}"),
            }
            assert!(err.to_string().contains("ip_vs_sed kernel module"), "{err}");
        }
    }

    #[test]
    fn enoent_for_a_destination_says_it_is_missing() {
        for cmd in [Command::SetDest, Command::DelDest] {
            let err = Error::refused(&dest_msg(cmd), ack(libc::ENOENT));
            assert!(
                matches!(&err, Error::NoDestination { dest, .. } if dest == "10.0.0.1:53"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn other_errors_keep_the_errno_the_op_and_the_kernels_text() {
        let err = Error::refused(
            &new_service(),
            Ack {
                errno: libc::EINVAL,
                message: Some("Attribute failed policy validation".into()),
            },
        );
        assert_eq!(err.ipvs_errno(), Some(libc::EINVAL));
        let text = err.to_string();
        assert!(
            text.starts_with("add virtual server UDP 10.96.0.10:53: "),
            "{text}"
        );
        assert!(
            text.ends_with("(Attribute failed policy validation)"),
            "{text}"
        );
        // ENOENT where no scheduler is involved stays generic.
        let err = Error::refused(&dest_msg(Command::NewDest), ack(libc::ENOENT));
        assert!(matches!(err, Error::IpvsRefused { .. }), "{err:?}");
    }
}
