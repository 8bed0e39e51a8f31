//! Changes to IPVS, and how a list of them is cut into datagrams.

use std::fmt;
use std::ops::Range;

use crate::error::Error;
use crate::netlink::message::{Command, DestAttrs, IpvsMessage, ServiceAttrs};
use crate::types::{Destination, VirtualServer, VirtualServerKey};

/// One change to IPVS. A list of them goes to the kernel in as few datagrams
/// as the socket allows, through [`IpvsClient::apply`].
///
/// [`IpvsClient::apply`]: crate::netlink::IpvsClient::apply
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    AddService(VirtualServer),
    /// Sets the scheduler, flags, timeout and netmask of an existing service.
    UpdateService(VirtualServer),
    /// Deletes the service and its destinations.
    DeleteService(VirtualServerKey),
    AddDest(VirtualServerKey, Destination),
    /// Sets the weight and forwarding method of an existing destination.
    UpdateDest(VirtualServerKey, Destination),
    /// Only the destination's address and port count.
    DeleteDest(VirtualServerKey, Destination),
}

impl Op {
    /// The request that carries it out.
    pub fn message(&self) -> IpvsMessage {
        match self {
            Op::AddService(vs) => {
                IpvsMessage::new(Command::NewService).with_service(ServiceAttrs::from(vs))
            }
            Op::UpdateService(vs) => {
                IpvsMessage::new(Command::SetService).with_service(ServiceAttrs::from(vs))
            }
            Op::DeleteService(key) => {
                IpvsMessage::new(Command::DelService).with_service(ServiceAttrs::from(key))
            }
            Op::AddDest(key, dest) => IpvsMessage::new(Command::NewDest)
                .with_service(ServiceAttrs::from(key))
                .with_dest(DestAttrs::from(dest)),
            Op::UpdateDest(key, dest) => IpvsMessage::new(Command::SetDest)
                .with_service(ServiceAttrs::from(key))
                .with_dest(DestAttrs::from(dest)),
            Op::DeleteDest(key, dest) => IpvsMessage::new(Command::DelDest)
                .with_service(ServiceAttrs::from(key))
                .with_dest(DestAttrs::key_of(dest)),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.message().fmt(f)
    }
}

/// A request of a batch that the kernel refused.
#[derive(Debug)]
pub struct OpFailure {
    /// Its position in the list given to `apply` or `execute`.
    pub index: usize,
    pub error: Error,
}

/// How a batch went. Every request was answered; the refused ones are listed,
/// the others were carried out.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// Requests sent.
    pub sent: usize,
    /// Datagrams they were sent in.
    pub datagrams: usize,
    /// The refused requests, in the order they were given.
    pub failures: Vec<OpFailure>,
}

impl BatchReport {
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The first refusal, if any.
    pub fn into_result(self) -> Result<(), Error> {
        match self.failures.into_iter().next() {
            Some(failure) => Err(failure.error),
            None => Ok(()),
        }
    }
}

/// Cuts requests of these encoded lengths into consecutive runs, each at most
/// `max_bytes` long and `max_requests` many. A request longer than
/// `max_bytes` goes alone (and the kernel will refuse the datagram).
pub(crate) fn split_batches(
    lens: &[usize],
    max_bytes: usize,
    max_requests: usize,
) -> Vec<Range<usize>> {
    let max_requests = max_requests.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &len) in lens.iter().enumerate() {
        let full = i - start == max_requests || (i > start && bytes + len > max_bytes);
        if full {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::message::InetAddr;
    use crate::netlink::sys::*;
    use crate::types::{ForwardMethod, Scheduler};
    use kproxy_model::Protocol;

    fn key() -> VirtualServerKey {
        VirtualServerKey {
            addr: "fd00::10".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    fn dest() -> Destination {
        Destination {
            addr: "fd00::1:2".parse().unwrap(),
            port: 8080,
            weight: 3,
            forward: ForwardMethod::Masquerade,
            active_conns: 7,
            inactive_conns: 8,
        }
    }

    #[test]
    fn each_op_becomes_its_command() {
        let vs = VirtualServer {
            key: key(),
            scheduler: Scheduler::Lc,
            flags: Default::default(),
            timeout: 0,
            netmask: 128,
        };
        let cases = [
            (Op::AddService(vs.clone()), Command::NewService),
            (Op::UpdateService(vs), Command::SetService),
            (Op::DeleteService(key()), Command::DelService),
            (Op::AddDest(key(), dest()), Command::NewDest),
            (Op::UpdateDest(key(), dest()), Command::SetDest),
            (Op::DeleteDest(key(), dest()), Command::DelDest),
        ];
        for (op, cmd) in cases {
            let msg = op.message();
            assert_eq!(msg.cmd, cmd, "{op}");
            let svc = msg.service.as_ref().unwrap();
            assert_eq!(svc.af, Some(AF_INET6));
            assert_eq!(svc.port, Some(80));
            let full = matches!(cmd, Command::NewService | Command::SetService);
            assert_eq!(svc.sched_name.as_deref(), full.then_some("lc"), "{op}");
            assert_eq!(svc.netmask, full.then_some(128), "{op}");
        }
    }

    #[test]
    fn deleting_a_destination_sends_only_its_address() {
        let msg = Op::DeleteDest(key(), dest()).message();
        assert_eq!(
            msg.dest,
            Some(DestAttrs {
                addr: Some(InetAddr::from(dest().addr)),
                port: Some(8080),
                addr_family: Some(AF_INET6),
                ..Default::default()
            })
        );
        let add = Op::AddDest(key(), dest()).message().dest.unwrap();
        assert_eq!(add.weight, Some(3));
        // The counters are the kernel's to report, never sent.
        assert_eq!((add.active_conns, add.inact_conns), (None, None));
    }

    #[test]
    fn ops_describe_themselves() {
        assert_eq!(
            Op::DeleteDest(key(), dest()).to_string(),
            "delete destination [fd00::1:2]:8080 from TCP [fd00::10]:80"
        );
        assert_eq!(
            Op::DeleteService(key()).to_string(),
            "delete virtual server TCP [fd00::10]:80"
        );
    }

    #[test]
    fn batches_respect_the_byte_and_count_limits() {
        assert_eq!(split_batches(&[], 100, 10), Vec::<Range<usize>>::new());
        assert_eq!(split_batches(&[40; 5], 100, 10), vec![0..2, 2..4, 4..5]);
        assert_eq!(split_batches(&[10; 7], 1000, 3), vec![0..3, 3..6, 6..7]);
        assert_eq!(split_batches(&[50, 50, 1], 100, 10), vec![0..2, 2..3]);
        // An oversized request travels alone rather than being dropped.
        assert_eq!(
            split_batches(&[10, 500, 10], 100, 10),
            vec![0..1, 1..2, 2..3]
        );
        assert_eq!(split_batches(&[10; 3], 100, 0), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn a_thousand_ops_fit_a_few_datagrams() {
        let lens = vec![112; 1000];
        let batches = split_batches(&lens, 256 * 1024, 4096);
        assert_eq!(batches, vec![0..1000]);
        let batches = split_batches(&lens, 64 * 1024, 4096);
        assert_eq!(batches.len(), 2);
        let covered: usize = batches.iter().map(|r| r.len()).sum();
        assert_eq!(covered, 1000);
        assert!(batches.iter().all(|r| r.len() * 112 <= 64 * 1024));
    }

    #[test]
    fn a_report_gives_the_first_refusal() {
        let report = BatchReport {
            sent: 3,
            datagrams: 1,
            failures: vec![
                OpFailure {
                    index: 1,
                    error: Error::Exists { op: "a".into() },
                },
                OpFailure {
                    index: 2,
                    error: Error::Exists { op: "b".into() },
                },
            ],
        };
        assert!(!report.is_ok());
        assert!(matches!(report.into_result(), Err(Error::Exists { op }) if op == "a"));
        assert!(BatchReport::default().into_result().is_ok());
    }
}
